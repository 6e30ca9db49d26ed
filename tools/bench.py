"""Benchmark training speed: tokens/s, ms/step, MFU and peak memory of the real training step, the
peak memory of validating a micro batch, then the data loader's own throughput and host memory. A
measurement, not a test: the numbers depend on the machine and on whatever else runs on it.

    python -m tools.bench --model=tiny --seq_len=256 --micro_batch_size=8        # CPU, small model
    python -m tools.bench --model=gpt2 --seq_len=256 --micro_batch_size=2        # CPU, GPT-2 124M
    python -m tools.bench --device=cuda --model=gpt2 --seq_len=1024 --micro_batch_size=16 --dtype=bfloat16 --compile=True
    python -m tools.bench ... --json                                             # one JSON object
    python -m tools.bench ... --sdpa_kernel=cudnn                                # one SDPA kernel: flash, cudnn, efficient, math
    python -m tools.bench --model=gpt3-small ... --against=attention=dense       # the same step with other settings: the speed ratio

The step is train_gpt.train_step, the one train_gpt.py runs (forward under autocast, backward,
gradient clipping, the optimizer's step, zero_grad), fed random tokens, with the optimizer
train_gpt.build_optimizer makes (AdamW; Muon and AdamW with --optimizer=muon or --recipe=fast or
modern), which the report names. Every train_gpt.py setting is accepted (--model, --n_layer,
--n_head, --n_embd, --attention, --micro_batch_size, --seq_len, --dtype, --compile, --chunked_loss,
--device, --total_batch_size for accumulation, --optimizer, --recipe, ...) with the same defaults,
plus the benchmark's own settings in BenchOptions. --against=name=value,... measures the
step a second time with those settings changed and reports the ratio of the two speeds. KEEP_FREED_MEMORY=0 in the environment runs the
CPU with glibc's default allocator instead (fastpath.keep_freed_memory), for A/B comparisons.

MFU is model.flops_per_token (6 x parameters + attention) x tokens/s over a peak: on CUDA the
datasheet's dense bf16 peak (runlog.GPU_PEAK_FLOPS); on the CPU, which has no such figure,
the rate of a matrix product in the dtype that trains, measured in this run (a 2048^3 product
after every timed step; their median, as for the steps), as the step line's MFU is
(runlog.peak_flops). MFU against the fastest of those products is reported too.

Memory: the peak of the tensors alive during one training step and during validation of one micro
batch (evals.validation, what train_gpt.py runs between steps), model and optimizer included, so
the two compare: on CUDA torch.cuda.max_memory_allocated, on the CPU the allocations torch's
profiler records (tools/plan.py's measure_peak_bytes, on one more step). The host's max RSS is
the process's peak over the timed steps.
"""

import contextlib
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import train_gpt
from dataloader import DataLoader, ValidationData
from model import flops_per_token, num_params
from support import cli, evals, fastpath, runlog, runtime, settings
from tools.plan import measure_peak_bytes


@dataclass
class BenchOptions:
    steps: int = 10  # timed optimizer steps; their median is reported
    warmup: int = 3  # untimed steps first: compilation, lazy initialization, the allocator's first pages
    loader_tokens: int = 200_000_000  # tokens in the synthetic shard the loader reads; 0: skip the loader
    loader_batches: int = 500  # batches the loader is timed over
    json: bool = False  # print one JSON object instead of the table
    sdpa_kernel: str = "default"  # SDPA kernel for the whole run: default (torch's choice), flash, cudnn, efficient, math
    against: str = ""  # name=value,...: also measure the step with these train_gpt settings changed, and the speed ratio


@dataclass
class LoaderResult:
    shard_tokens: int
    batches_per_sec: float
    tokens_per_sec: float
    ms_per_batch: float
    overhead_pct: float  # the loader's time for one step's micro batches, as % of the step's time
    allocated_mb: float  # peak memory the loader allocates (its shard permutation, a batch)
    mapped_mb: float  # shard pages mapped into the process by reading it: page cache, reclaimable


@dataclass
class BenchResult:
    device: str
    model: str
    params: int
    n_layer: int
    n_head: int
    n_embd: int
    micro_batch_size: int
    seq_len: int
    accum: int
    dtype: str
    compile: bool
    chunked_loss: bool
    optimizer: str  # what the step ran (train_gpt.build_optimizer): "AdamW (fused)", "AdamW (fused) + Muon", ...
    attention: str  # the attention pattern (train_gpt --attention: dense, gpt3)
    attention_band: Optional[int]  # gpt3's band
    sdpa_kernel: str  # the SDPA kernel asked for; "default": torch's choice
    threads: int
    keep_freed_memory: bool  # CPU: glibc keeps freed memory (fastpath.keep_freed_memory)
    steps: int
    warmup_s: float  # time of the warm-up steps, compilation included
    ms_per_step: float  # median over the timed steps
    ms_per_step_min: float
    ms_per_step_max: float
    tokens_per_sec: float
    flops_per_token: int
    achieved_flops: float  # model FLOP/s: flops_per_token x tokens/s
    peak_flops: float  # CPU: the median of matmul_rates
    peak_source: str  # "datasheet", "measured bfloat16 matmul" (float32: the dtype that trains), "setting", "unknown"
    matmul_rates: list  # CPU: 2048 x 2048 product rates in the dtype that trains, FLOP/s, one after each timed step
    mfu: float  # achieved_flops / peak_flops
    mfu_vs_best_matmul: Optional[float]  # CPU: against the fastest matmul sample, the strictest yardstick
    peak_memory_mb: float  # CUDA: max allocated; CPU: host max RSS
    host_max_rss_mb: float
    step_allocated_mb: float  # tensors alive at a training step's peak (model and optimizer included)
    eval_allocated_mb: float  # tensors alive at the peak of validating one micro batch (the same included)
    cpu_user_s_per_step: float  # host CPU time, median per step
    cpu_sys_s_per_step: float  # time in the kernel: high when fresh pages are faulted in
    page_faults_per_step: float
    final_loss: float
    loader: Optional[LoaderResult] = None
    against: Optional["BenchResult"] = None  # --against: the same step with those settings
    against_settings: str = ""  # --against's name=value,...
    speed_ratio: Optional[float] = None  # --against: tokens/s of this step over that one's


# ----------------------------------------------------------------------------------------------
# Settings

def parse_args(argv):
    """--name=value arguments -> (train_gpt.Settings, BenchOptions): the benchmark's own settings
    are taken out, the rest are train_gpt.py's and parsed by it (same names, checks, defaults)."""
    fields = {f.name: f for f in dataclasses.fields(BenchOptions)}
    train_fields = {f.name for f in dataclasses.fields(train_gpt.Settings)}
    own, rest = {}, []
    for arg in argv:
        name, eq, text = arg.lstrip("-").partition("=")
        name = name.replace("-", "_")
        if arg.startswith("--") and name not in fields and name not in train_fields:
            raise cli.UserError(f"unknown setting --{name}: see python -m tools.bench --help")
        if arg.startswith("--") and name in fields:
            own[name] = settings.parse_value(name, text if eq else "True", fields[name].type)
        else:
            rest.append(arg)
    opts = BenchOptions(**own)
    if opts.steps <= 0 or opts.warmup < 0 or opts.loader_tokens < 0 or opts.loader_batches <= 0:
        raise cli.UserError("--steps and --loader_batches must be positive, --warmup and --loader_tokens >= 0")
    if opts.sdpa_kernel not in ATTENTION_KERNELS:
        raise cli.UserError(f"--sdpa_kernel={opts.sdpa_kernel!r}; choose one of: {', '.join(ATTENTION_KERNELS)}")
    s = train_gpt.parse_settings(rest)
    if not any(arg.partition("=")[0].lstrip("-").replace("-", "_") == "total_batch_size" for arg in rest):
        s.total_batch_size = None  # not given: a step is one micro batch (resolve)
    return s, opts


ATTENTION_KERNELS = {"default": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                     "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def attention_kernel(name):
    """A context that makes scaled_dot_product_attention use only the named kernel (it raises if
    that kernel cannot run), or a no-op for torch's own choice. Compilation happens inside it, so
    a compiled model is traced with that kernel too."""
    if ATTENTION_KERNELS[name] is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(getattr(SDPBackend, ATTENTION_KERNELS[name]))


def resolve(s):
    """Model config and micro steps per optimizer step. Without --total_batch_size a step is one
    micro batch: the speed of a micro step is what is measured, accumulation only repeats it."""
    if s.micro_batch_size is None:
        raise cli.SettingsError("tools/bench.py measures a given micro batch: --micro_batch_size=N, not auto")
    if s.tensor_parallel > 1:
        raise cli.SettingsError(f"tools/bench.py measures one process; --tensor_parallel={s.tensor_parallel} splits "
                                f"each block over the ranks of a torchrun job: time it by train_gpt.py's step lines")
    if s.total_batch_size is None:
        s.total_batch_size = s.micro_batch_size * (s.seq_len or s.block_size)
    config = settings.resolve_model_settings(s)
    return config, settings.check_batch_divisibility(s, world_size=1)


# ----------------------------------------------------------------------------------------------
# Measuring

def synthetic_batches(s, config, count=4):
    """next_batch() over a few fixed batches of random tokens, shaped as DataLoader's (x, y):
    views of one (B, T+1) buffer. Made up front, so the step's time is the model's alone."""
    g = torch.Generator().manual_seed(s.seed)
    buffers = [torch.randint(0, config.vocab_size, (s.micro_batch_size, s.seq_len + 1), generator=g)
               for _ in range(count)]
    i = 0

    def next_batch():
        nonlocal i
        buf = buffers[i % count]
        i += 1
        return buf[:, :-1], buf[:, 1:]
    return next_batch


class StepTimer:
    """Wall time of one step, and on the CPU the host CPU time and page faults it cost. On CUDA
    the time is taken between CUDA events and waits for the GPU to finish."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        self.usage = resource.getrusage(resource.RUSAGE_SELF)
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.user = after.ru_utime - self.usage.ru_utime
        self.sys = after.ru_stime - self.usage.ru_stime
        self.faults = after.ru_minflt - self.usage.ru_minflt + after.ru_majflt - self.usage.ru_majflt


def host_max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def mapped_file_mb():
    """File pages mapped into this process now (RssFile), in MB; 0 off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("RssFile:")), 0.0)
    except OSError:
        return 0.0


def matmul_sampler(dtype, n=2048):
    """A function that times one n x n product in dtype: the CPU's yardstick, sampled after every
    timed step so that it sees the same machine as the steps (a shared host's speed drifts by
    10% and more within a minute), and summarized by the same statistic, the median."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    return lambda: runlog.matmul_rate(a, b)


def optimizer_name(optimizer):
    """"AdamW (fused)", or for support/optim.py's CombinedOptimizer its parts: "AdamW (fused) + Muon"."""
    parts = getattr(optimizer, "optimizers", {"": optimizer}).values()
    return " + ".join(type(o).__name__ + (" (fused)" if o.defaults.get("fused") else "") for o in parts)


def bench_steps(s, opts, rt, config, accum, sample_yardstick=None):
    """Build the model and optimizer as train_gpt.py does and time train_gpt.train_step. Returns
    the model, the optimizer, the warm-up's seconds, a StepTimer per timed step, the last loss, the
    yardstick samples taken after each step (none without sample_yardstick), and the step itself."""
    raw_model, model = train_gpt.build_model(s, config, rt)
    optimizer = train_gpt.build_optimizer(s, rt, raw_model, log=lambda msg: None)
    next_batch = synthetic_batches(s, config)
    step = lambda: train_gpt.train_step(s, rt, model, raw_model, optimizer, next_batch, accum)
    t0 = time.perf_counter()
    for _ in range(opts.warmup):
        step()
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(rt.device)
    warmup_s = time.perf_counter() - t0
    timers, samples = [], []
    for _ in range(opts.steps):
        with StepTimer(rt.device) as timer:
            loss, _, _ = step()
        timers.append(timer)
        if sample_yardstick:
            samples.append(sample_yardstick())
    return raw_model, optimizer, warmup_s, timers, loss.item(), samples, step


def peak_allocated_mb(device, fn, *holders):
    """MB of tensors alive at the peak of fn(), those of holders (model, optimizer) included: on
    CUDA the allocator's own peak, on the CPU the allocations torch's profiler records."""
    if device.type != "cuda":
        return measure_peak_bytes(fn, *holders) / 2**20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**20


def eval_allocated_mb(s, rt, raw_model, optimizer):
    """peak_allocated_mb of evals.validation over one micro batch of random windows (a val shard
    in a temporary folder), as train_gpt.py validates between steps."""
    with tempfile.TemporaryDirectory(prefix="bench_val_") as folder:
        write_shard(os.path.join(folder, "bench_val_000000.npy"), s.micro_batch_size * s.seq_len + 1, seed=1)
        data = ValidationData(folder, s.seq_len, s.micro_batch_size * s.seq_len)
        validate = lambda: evals.validation(raw_model, data, s.micro_batch_size, amp_dtype=rt.amp_dtype)
        return peak_allocated_mb(rt.device, validate, raw_model, optimizer)


def bench(s, opts):
    rt = runtime.setup_runtime(s)
    if opts.sdpa_kernel in ("cudnn", "efficient") and rt.device.type != "cuda":
        raise cli.UserError(f"--sdpa_kernel={opts.sdpa_kernel} is a CUDA kernel; on {rt.device.type} use default, flash or math")
    config, accum = resolve(s)
    measured = rt.device.type == "cpu" and not s.peak_flops  # else the setting or a datasheet
    with attention_kernel(opts.sdpa_kernel):
        raw_model, optimizer, warmup_s, timers, loss, samples, step = bench_steps(
            s, opts, rt, config, accum, sample_yardstick=matmul_sampler(getattr(torch, s.dtype)) if measured else None)
        peak_memory_mb = torch.cuda.max_memory_allocated(rt.device) / 2**20 if rt.device.type == "cuda" else None
        rss_mb = host_max_rss_mb()  # the timed steps' peak, before the measurements below
        step_mb = peak_memory_mb or peak_allocated_mb(rt.device, step, raw_model, optimizer)
        eval_mb = eval_allocated_mb(s, rt, raw_model, optimizer)
    peak = statistics.median(samples) if measured else runlog.peak_flops(s, rt.device)
    source = ("setting" if s.peak_flops else f"measured {s.dtype} matmul" if measured else
              "datasheet" if peak else "unknown")

    seconds = [t.seconds for t in timers]
    step_s = statistics.median(seconds)
    tokens_per_sec = accum * s.micro_batch_size * s.seq_len / step_s
    flops_token = flops_per_token(config, s.seq_len)
    mfu = lambda peak: runlog.model_flops_utilization(tokens_per_sec, flops_token, peak)
    cuda = rt.device.type == "cuda"
    result = BenchResult(
        device=str(torch.cuda.get_device_name(rt.device) if cuda else rt.device), model=s.model,
        params=num_params(raw_model), n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
        micro_batch_size=s.micro_batch_size, seq_len=s.seq_len, accum=accum, dtype=s.dtype,
        compile=bool(s.compile), chunked_loss=bool(s.chunked_loss), optimizer=optimizer_name(optimizer),
        attention=config.attention,
        attention_band=config.attention_band if config.attention != "dense" else None,
        sdpa_kernel=opts.sdpa_kernel, threads=torch.get_num_threads(),
        keep_freed_memory=rt.device.type == "cpu" and fastpath.keep_freed_memory(),  # idempotent: did it take?
        steps=opts.steps, warmup_s=warmup_s, ms_per_step=step_s * 1000,
        ms_per_step_min=min(seconds) * 1000, ms_per_step_max=max(seconds) * 1000,
        tokens_per_sec=tokens_per_sec, flops_per_token=flops_token,
        achieved_flops=tokens_per_sec * flops_token, peak_flops=peak, peak_source=source,
        matmul_rates=samples, mfu=mfu(peak), mfu_vs_best_matmul=mfu(max(samples)) if measured else None,
        peak_memory_mb=peak_memory_mb or rss_mb, host_max_rss_mb=rss_mb,
        step_allocated_mb=step_mb, eval_allocated_mb=eval_mb,
        cpu_user_s_per_step=statistics.median(t.user for t in timers),
        cpu_sys_s_per_step=statistics.median(t.sys for t in timers),
        page_faults_per_step=statistics.median(t.faults for t in timers), final_loss=loss)
    del raw_model, step, optimizer
    if opts.loader_tokens:
        result.loader = bench_loader(s, opts, step_s / accum)
    return result


def write_shard(path, n_tokens, seed=0, chunk=2**24):
    """A .npy token shard of random GPT-2 ids, written in pieces: the writer never holds it whole."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<u2", "fortran_order": False, "shape": (n_tokens,)})
        for start in range(0, n_tokens, chunk):
            rng.integers(0, 50257, min(chunk, n_tokens - start), dtype=np.uint16).tofile(f)


def bench_loader(s, opts, micro_step_s):
    """DataLoader.next_batch alone on one large shard (deleted afterwards): batches
    per second, its share of a micro step's time, and the host memory it takes. That memory is
    counted in two parts: what the loader allocates (traced by tracemalloc, which sees numpy's
    arrays; process RSS would not show it, as the heap reuses memory the steps freed), and the
    shard's pages mapped into the process (none: the loader reads windows, it maps nothing)."""
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as folder:
        write_shard(os.path.join(folder, "bench_train_000000.npy"), opts.loader_tokens)
        mapped0 = mapped_file_mb()
        loader = DataLoader(folder, s.micro_batch_size, s.seq_len, seed=s.seed, log=lambda msg: None)
        loader.next_batch()  # draws the shard's window permutation
        t0 = time.perf_counter()
        for _ in range(opts.loader_batches):
            loader.next_batch()
        per_batch = (time.perf_counter() - t0) / opts.loader_batches
        mapped = mapped_file_mb() - mapped0
        del loader
        tracemalloc.start()  # a second loader, traced apart from the timing (tracing slows Python down)
        loader = DataLoader(folder, s.micro_batch_size, s.seq_len, seed=s.seed, log=lambda msg: None)
        for _ in range(10):
            loader.next_batch()
        allocated = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        del loader
    return LoaderResult(
        shard_tokens=opts.loader_tokens, batches_per_sec=1 / per_batch,
        tokens_per_sec=s.micro_batch_size * s.seq_len / per_batch, ms_per_batch=per_batch * 1000,
        overhead_pct=100 * per_batch / micro_step_s, allocated_mb=allocated, mapped_mb=mapped)


# ----------------------------------------------------------------------------------------------
# Report

def mfu_text(r):
    if r.matmul_rates:
        return (f"{100 * r.mfu:.1f}% of a {r.dtype} matmul ({r.peak_flops / 1e9:.0f} GFLOP/s, the median of "
                f"{len(r.matmul_rates)} products between the steps; {100 * r.mfu_vs_best_matmul:.1f}% of the best, "
                f"{max(r.matmul_rates) / 1e9:.0f})")
    if r.peak_flops:
        return f"{100 * r.mfu:.1f}% of {r.peak_flops / 1e12:,.0f} TFLOP/s ({r.peak_source})"
    return "unknown peak: give --peak_flops"


def table(r):
    cpu = r.device == "cpu"
    memory = (f"{r.peak_memory_mb:,.0f} MB host max RSS" if cpu else
              f"{r.peak_memory_mb:,.0f} MB max allocated on the GPU, {r.host_max_rss_mb:,.0f} MB host max RSS")
    rows = [
        ("config", f"{r.model}: {r.n_layer} layers, {r.n_head} heads, {r.n_embd} wide, {r.params:,} parameters; "
                   f"batch {r.micro_batch_size} x {r.seq_len}" + (f" x {r.accum} accumulation" if r.accum > 1 else "")),
        ("runtime", f"{r.device}, {r.dtype}, chunked loss {r.chunked_loss}, compile {r.compile}, "
                    f"optimizer {r.optimizer}, "
                    f"attention {r.attention}" + (f" (band {r.attention_band})" if r.attention_band else "") +
                    f", SDPA kernel {r.sdpa_kernel}, "
                    f"{r.threads} threads" + (f", keep freed memory {r.keep_freed_memory}" if cpu else "")),
        ("step", f"{r.ms_per_step:,.1f} ms median of {r.steps} (min {r.ms_per_step_min:,.1f}, "
                 f"max {r.ms_per_step_max:,.1f}); warm-up {r.warmup_s:.1f} s"),
        ("throughput", f"{r.tokens_per_sec:,.0f} tokens/s"),
        ("model FLOP/s", f"{r.achieved_flops / 1e9:,.1f} GFLOP/s ({r.flops_per_token / 1e6:.1f} MFLOP/token)"),
        ("MFU", mfu_text(r)),
        ("peak memory", memory),
        ("allocated", f"{r.step_allocated_mb:,.0f} MB at a training step's peak, {r.eval_allocated_mb:,.0f} MB "
                      f"validating a micro batch (model and optimizer included)"),
        ("CPU per step", f"user {r.cpu_user_s_per_step:.3f} s, sys {r.cpu_sys_s_per_step:.3f} s, "
                         f"{r.page_faults_per_step:,.0f} page faults"),
    ]
    if r.loader:
        L = r.loader
        rows += [("data loader", f"{L.batches_per_sec:,.0f} batches/s, {L.tokens_per_sec / 1e6:,.1f}M tokens/s, "
                                 f"{L.ms_per_batch:.3f} ms/batch = {L.overhead_pct:.2f}% of a micro step"),
                 ("loader memory", f"{L.allocated_mb:.1f} MB allocated, {L.mapped_mb:.0f} MB of shard pages "
                                   f"mapped (page cache) reading a {L.shard_tokens / 1e6:,.0f}M-token shard")]
    width = max(len(name) for name, _ in rows)
    text = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
    if r.against:
        text += (f"\n\nagainst {r.against_settings}:\n{table(r.against)}\n\nspeed ratio: {r.speed_ratio:.3f} "
                 f"({r.tokens_per_sec:,.0f} / {r.against.tokens_per_sec:,.0f} tokens/s)")
    return text


def bench_help():
    """--help: the benchmark's own options, then a pointer to train_gpt.py's."""
    train_settings = ", ".join(f.name for f in dataclasses.fields(train_gpt.Settings))
    return (f"usage: python -m tools.bench [--name=value ...]   (--name alone means True)\n"
            f"{cli.summary(__doc__)}\n\n"
            f"the benchmark's own options:\n{cli.settings_help(BenchOptions)}\n\n"
            f"It also takes every train_gpt.py setting, with train_gpt.py's defaults (except: without "
            f"--total_batch_size a step is one micro batch); `python train_gpt.py --help` explains them: "
            f"{train_settings}.")


def against_argv(argv, changed):
    """The arguments of --against's run: argv with the settings changed (the last given wins),
    without --against itself and without the loader's benchmark (measured once). The first run's
    compiled graphs and memory are let go first, so the second is measured on its own."""
    import gc
    torch.compiler.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [a for a in argv if not a.startswith("--against=")] + changed + ["--loader_tokens=0"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        cli.print_help(bench_help())
        return None
    try:
        s, opts = parse_args(argv)
        result = bench(s, opts)
        if opts.against:
            changed = [f"--{setting}" for setting in opts.against.split(",")]
            result.against = bench(*parse_args(against_argv(argv, changed)))
            result.against_settings = " ".join(changed)
            result.speed_ratio = result.tokens_per_sec / result.against.tokens_per_sec
    except train_gpt.USER_ERRORS as e:
        sys.exit(f"bench.py: error: {e}")
    print(json.dumps(dataclasses.asdict(result)) if opts.json else table(result), flush=True)
    return result


if __name__ == "__main__":
    main()
