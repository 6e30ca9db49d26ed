"""What a run tells: the log (printed on rank 0, appended to log.txt and metrics.jsonl, sent to
the trackers), the step line with its MFU and ETA, and the device peaks MFU is measured against."""

import dataclasses
import json
import os
import re
import time

import torch

from model import describe_attention, num_params
from support import run_guard, tracking
from support.cli import RunError
from support.files import replace_atomically
from support.runtime import describe_parallelism

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, for MFU (V100: fp16). A key
# is the words a device name must hold (torch.cuda.get_device_name, split at spaces and dashes:
# "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"); the key with the most matching words wins, so a
# PCIe or NVL card gets its own figure and "L40" is not "L40S" or "L4".
GPU_PEAK_FLOPS = {("H100",): 989e12, ("H100", "PCIe"): 756e12, ("H100", "NVL"): 835e12,
                  ("H200",): 989e12, ("H200", "NVL"): 835e12, ("H800",): 989e12, ("H800", "PCIe"): 756e12,
                  ("A100",): 312e12, ("A800",): 312e12, ("L40S",): 362e12, ("L40",): 181e12,
                  ("L4",): 121e12, ("A10",): 125e12, ("RTX", "4090"): 165e12, ("RTX", "3090"): 71e12,
                  ("V100",): 125e12}


def gpu_peak_flops(name):
    """The GPU_PEAK_FLOPS figure for a device name, or 0.0 for a device the table lacks."""
    words = set(re.split(r"[\s\-_]+", name))
    keys = [key for key in GPU_PEAK_FLOPS if words.issuperset(key)]
    return GPU_PEAK_FLOPS[max(keys, key=len)] if keys else 0.0


def peak_flops(s, device):
    """The device's peak FLOP/s for MFU: the setting, a datasheet table (GPUs), or on the CPU, which
    has no such figure, the rate of a matrix product in the dtype that trains (s.dtype), measured
    now, so that MFU reads as a utilization: against fp32 products a bf16 run reads above 100%."""
    if s.peak_flops > 0:
        return s.peak_flops
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return measure_matmul_flops(dtype=getattr(torch, s.dtype))
    return 0.0


def model_flops_utilization(tokens_per_sec, flops_per_token, peak, devices=1):
    """MFU: the model's training FLOP/s (model.flops_per_token x tokens/s, over all devices) as a
    fraction of the devices' peak; 0 when the peak is unknown."""
    return tokens_per_sec * flops_per_token / (peak * devices) if peak else 0.0


def mfu_label(mfu, s, rt):
    """MFU, and on the CPU without --peak_flops what it is measured against: a matmul measured on
    this (perhaps shared) machine, not a datasheet's peak."""
    if rt.device.type == "cpu" and s.peak_flops <= 0:
        return f"MFU {mfu * 100:.1f}% of a {s.dtype} matmul"
    return f"MFU {mfu * 100:.1f}%"


def measure_matmul_flops(n=2048, trials=5, dtype=torch.float32):
    """The CPU's matrix-product rate in FLOP/s in dtype: the best of a few n x n products (~50 ms
    each in fp32 on 2 cores; the rate levels off from about n=1536). The best, not the mean, as
    other work on a shared machine only ever slows a trial down."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    return max(matmul_rate(a, b) for _ in range(trials))


def matmul_rate(a, b):
    """FLOP/s of one product a @ b, timed now."""
    t0 = time.perf_counter()
    a @ b
    return 2 * a.size(0) * a.size(1) * b.size(1) / (time.perf_counter() - t0)


class RunLog:
    """What a run writes to its log_dir, and the lock that keeps it the only writer there
    (run_guard.log_dir_lock; entered as a context manager, which also closes the trackers).
    Rank 0 prints, and appends to log_dir/log.txt and log_dir/metrics.jsonl, so a resumed run
    continues the same files; metrics.jsonl is first cut back to the step it resumes from
    (cut_metrics). Other ranks stay silent. Each metrics event also goes to the trackers
    (tracking.py: W&B, TensorBoard).

    Lines are printed at once, but written to log.txt only from start() on (the earlier ones
    then too): start() is called once the run is sure to start, so a run refused at start
    (another run's checkpoints, a checkpoint of another model) leaves the log_dir as it was."""

    def __init__(self, log_dir, is_main):
        self.is_main = is_main
        self.log_dir = log_dir
        self.trackers = []
        self.pending = []  # lines printed before start()
        self._lock = None

    def __enter__(self):
        self._lock_context = run_guard.log_dir_lock(self.log_dir, 0 if self.is_main else 1)
        self._lock = self._lock_context.__enter__()
        return self

    def __exit__(self, *exc):
        self.close()
        return self._lock_context.__exit__(*exc)

    def start(self, trackers=(), step=0):
        """The run starts after `step` steps (0, or its checkpoint's): claim log_dir's lock, cut
        metrics.jsonl back to that step, write the lines so far, and log to the trackers. Every
        rank calls this: a write rank 0 cannot make stops them all."""
        error, again = None, []
        if self.is_main:
            try:
                self._lock.claim()
                os.makedirs(self.log_dir, exist_ok=True)
                again = [event for event in self.cut_metrics(step) if event["step"] == step]
                self._append("log.txt", "".join(line + "\n" for line in self.pending))
            except RunError as e:
                error = e
        run_guard.raise_on_every_rank(error)
        self.trackers = list(trackers) if self.is_main else []
        for tracker in self.trackers:
            tracker.start(step, again)
        self.pending = None

    def cut_metrics(self, step):
        """Cut metrics.jsonl back to a run that trains on after `step` steps, so that every reader
        sees one line per step: the events of the steps it trains again go, and lines that do not
        parse (cut short by a crash). Rewritten atomically, and only if something goes. Returns
        the events kept."""
        path = os.path.join(self.log_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            lines = f.readlines()
        kept, events = [], []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if logged_before(event, step):
                kept.append(line if line.endswith("\n") else line + "\n")
                events.append(event)
        if kept != lines:
            try:
                with replace_atomically(path) as tmp:
                    with open(tmp, "w") as f:
                        f.writelines(kept)
            except OSError as e:
                raise run_guard.log_dir_write_failed(self.log_dir, e) from e
        return events

    def _append(self, name, text):
        try:
            with open(os.path.join(self.log_dir, name), "a") as f:
                f.write(text)
        except OSError as e:  # a full disk mid-run: said in one line (the checkpoints written are intact)
            raise run_guard.log_dir_write_failed(self.log_dir, e) from e

    def __call__(self, msg):
        if self.is_main:
            print(msg, flush=True)
            if self.pending is None:
                self._append("log.txt", msg + "\n")
            else:
                self.pending.append(msg)

    def metrics(self, **event):
        if self.is_main:
            self._append("metrics.jsonl", json.dumps(event) + "\n")
            for tracker in self.trackers:
                tracker.log(event)

    def close(self):
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def header(self, s, rt, raw_model, meter, tokens_per_micro, plan, ramp_start):
        """The run's first lines: the model and where it runs, the batch, the plan. ramp_start: the
        tokens a step of the batch-size warmup starts at (train_gpt.BATCH_WARMUP_START)."""
        self(f"model {s.model}: {num_params(raw_model):,} parameters, {meter.flops_token / 1e6:.1f} MFLOPs/token, "
             f"{describe_attention(raw_model.config, s.seq_len)}; "
             f"device {rt.device} x {rt.world_size}, dtype {s.dtype}, compile {s.compile}, "
             f"{describe_parallelism(s, rt)}, activation checkpointing {s.activation_checkpointing}; "
             f"peak {meter.peak / 1e12:.2f} TFLOP/s for MFU")
        ranks = f"{rt.world_size} ranks" if rt.tensor_parallel == 1 else f"{rt.dp_size} TP groups"  # a group: one share
        self(f"batch: {s.total_batch_size:,} tokens/step = {s.micro_batch_size} x {s.seq_len} x "
             f"{ranks} x {s.total_batch_size // tokens_per_micro} accumulation steps")
        if 0 < s.batch_warmup_tokens and tokens_per_micro > min(ramp_start, s.total_batch_size):
            self(f"note: the batch-size warmup starts at one global micro batch, {tokens_per_micro:,} tokens "
                 f"({s.micro_batch_size} x {s.seq_len} x {ranks}), not {ramp_start:,}: "
                 f"a smaller --micro_batch_size starts it lower")
        self(plan)

    def step(self, step, loss, norm, lr, step_tokens, finite, timing, guard):
        """A step's line and its metrics event; a skipped step (NaN/Inf) says so, and how many in a row."""
        loss_value, norm_value = loss.item(), norm.item()  # one copy to the host each
        if finite:
            self(f"step {step:5d} | loss {loss_value:.6f} | lr {lr:.4e} | norm {norm_value:.4f} | "
                 f"{step_tokens:,} tokens | {timing.seconds * 1000:.0f} ms | {timing.tokens_per_sec:,.0f} tok/s | "
                 f"{timing.mfu_text} | {timing.clock_text}")
            self.metrics(step=step, train_loss=loss_value, lr=lr, grad_norm=norm_value,
                         tokens_per_sec=timing.tokens_per_sec, ms=timing.seconds * 1000, mfu=timing.mfu,
                         tokens=timing.tokens, step_tokens=step_tokens)
        else:
            self(f"step {step:5d} | skipped: loss {loss_value} grad norm {norm_value} is not finite "
                 f"({guard.in_a_row} in a row; stopping at {guard.max_bad_steps})")
            self.metrics(step=step, skipped=True, train_loss=str(loss_value), grad_norm=str(norm_value))


def logged_before(event, step):
    """Whether a metrics event belongs to the run's first `step` steps. A step's own event has
    the step's index (the step after `step` steps is step `step`), an evaluation the steps done:
    the evaluations after `step` steps were made before that step's checkpoint was written."""
    if not isinstance(event, dict) or not isinstance(event.get("step"), int):
        return False
    return event["step"] < step if "train_loss" in event else event["step"] <= step


@dataclasses.dataclass
class StepTiming:
    seconds: float
    tokens_per_sec: float
    mfu: float
    mfu_text: str
    clock_text: str
    tokens: int  # trained so far


class StepMeter:
    """Each step's time (the device synchronized first), tokens/s, MFU against the device's peak,
    and the session's elapsed time and ETA (TrainClock)."""

    def __init__(self, s, rt, flops_token, progress):
        self.s, self.rt, self.flops_token = s, rt, flops_token
        self.peak = peak_flops(s, rt.device)
        self.done_at_start = session_done(progress.step, progress.tokens, s)
        self.clock = None  # from the first step on

    def start(self):
        if self.clock is None:
            self.clock = TrainClock(self.done_at_start, 1.0)
        self.t0 = time.perf_counter()

    def stop(self, step_tokens, progress):
        """The step just trained: step_tokens in it; progress holds the tokens after it and its own
        step number (not yet counted)."""
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - self.t0
        tokens_per_sec = step_tokens / dt
        mfu = model_flops_utilization(tokens_per_sec, self.flops_token, self.peak, self.rt.world_size)
        self.clock.step_done(session_done(progress.step + 1, progress.tokens, self.s), dt)
        return StepTiming(dt, tokens_per_sec, mfu, mfu_label(mfu, self.s, self.rt), self.clock.text(), progress.tokens)


def open_trackers(s, rt):
    """W&B and TensorBoard as the settings ask (tracking.py), on rank 0; the settings are the
    runs' config. A missing package or a W&B run that cannot start is an error before any work."""
    if not rt.is_main:
        return []
    try:
        return tracking.open_trackers(s.log_dir, dataclasses.asdict(s), s.wandb_project, s.wandb_run_name,
                                      s.wandb_run_id, s.tensorboard, fresh=s.resume == "off")
    except tracking.TrackerError as e:
        raise RunError(str(e)) from None


def session_done(step, tokens, s):
    """The fraction of this session done after `step` optimizer steps and `tokens` trained: what
    the ETA extrapolates. A session ends at max_tokens, or at stop_step when that comes first."""
    done = tokens / s.max_tokens
    return max(done, step / s.stop_step) if s.stop_step > 0 else done


def format_duration(seconds):
    """4s, 3m07s, 2h05m, 3d04h: short enough for the step line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


class TrainClock:
    """Time since the session's first step (evaluations and checkpoints included), and the ETA:
    the budget left over the rate of the last `window` steps, with step time alone (evaluation
    and checkpoint time excluded, so the ETA is the training's own; they add to it)."""

    def __init__(self, done, end, window=20):
        self.end, self.window = end, window
        self.start = time.perf_counter()
        self.points = [(done, 0.0)]  # (budget done, training seconds so far)

    def step_done(self, done, step_seconds):
        self.points.append((done, self.points[-1][1] + step_seconds))
        self.points = self.points[-(self.window + 1):]

    def eta_seconds(self):
        (done0, t0), (done1, t1) = self.points[0], self.points[-1]
        if done1 <= done0 or t1 <= t0:
            return None
        return (self.end - done1) * (t1 - t0) / (done1 - done0)

    def text(self):
        eta = self.eta_seconds()
        elapsed = format_duration(time.perf_counter() - self.start)
        return f"{elapsed} elapsed, ETA {'?' if eta is None else format_duration(eta)}"
