"""bench.py end to end, the MFU arithmetic, and what the CPU speed work changed: the chunked loss
under bf16 autocast, fused AdamW on the CPU, the allocator switch and the matmul yardstick.
No timing is asserted: speed targets live in the benchmark's output, not here."""

import dataclasses
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from tools import bench
from model import GPT, flops_per_token, optimizer_groups
from support.loss import lm_head_cross_entropy
from support.optim import configure_optimizers
from support.presets import preset_config
from support import fastpath, runlog

TINY_BENCH = ["--model=tiny", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--seq_len=32",
              "--micro_batch_size=2", "--device=cpu", "--steps=2", "--warmup=1",
              "--loader_tokens=100000", "--loader_batches=5"]


def test_mfu_is_model_flops_over_the_peak():
    mfu = runlog.model_flops_utilization
    per_token = flops_per_token(preset_config("gpt2"), 1024)
    assert per_token == 6 * 123_689_472 + 12 * 12 * 768 * 1024  # matmul parameters, attention (test_model)
    # by hand: 100,000 tokens/s x 855,383,040 FLOP/token = 85.538 TFLOP/s, over an H100's 989: 8.649%
    assert mfu(100_000, per_token, 989e12) == pytest.approx(0.08649, abs=1e-5)
    assert mfu(800_000, per_token, 989e12, devices=8) == pytest.approx(0.08649, abs=1e-5)
    assert mfu(1000, 100.0, 0.0) == 0.0  # unknown peak
    # the CPU's yardstick: 2,000 tokens/s x 1 GFLOP/token = 2 TFLOP/s, over a 300 GFLOP/s matmul
    assert mfu(2_000, 1e9, 300e9) == pytest.approx(6.667, abs=1e-3)


def test_bench_runs_end_to_end_and_reports_json(capsys):
    result = bench.main(TINY_BENCH + ["--json"])
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(json.dumps(dataclasses.asdict(result)))
    assert (out["device"], out["steps"], out["accum"], out["n_layer"], out["n_embd"]) == ("cpu", 2, 1, 2, 32)
    for field in ("tokens_per_sec", "ms_per_step", "achieved_flops", "peak_flops", "mfu", "peak_memory_mb"):
        assert out[field] > 0, field
    assert out["tokens_per_sec"] == pytest.approx(2 * 32 / (out["ms_per_step"] / 1000))
    assert out["achieved_flops"] == pytest.approx(out["tokens_per_sec"] * out["flops_per_token"])
    assert out["mfu"] == pytest.approx(out["achieved_flops"] / out["peak_flops"])
    assert out["peak_source"] == f"measured {out['dtype']} matmul" and len(out["matmul_rates"]) == 2
    assert out["peak_flops"] == pytest.approx(sum(out["matmul_rates"]) / 2)  # the median of two
    assert out["mfu_vs_best_matmul"] == pytest.approx(out["achieved_flops"] / max(out["matmul_rates"]))
    assert out["ms_per_step_min"] <= out["ms_per_step"] <= out["ms_per_step_max"]
    loader = out["loader"]
    assert loader["shard_tokens"] == 100_000 and loader["batches_per_sec"] > 0 and loader["overhead_pct"] > 0
    assert 0 < loader["allocated_mb"] < 100
    assert out["final_loss"] == pytest.approx(10.8, abs=0.5)  # random tokens: about ln(50257)
    # memory at a step's peak and validating a micro batch: each above what the model and AdamW hold
    # throughout (weights and two moments, fp32), as both count them
    held_mb = 3 * 4 * out["params"] / 2**20
    assert out["step_allocated_mb"] > held_mb and out["eval_allocated_mb"] > held_mb


def test_bench_prints_a_table_and_accumulates(capsys):
    result = bench.main(TINY_BENCH + ["--total_batch_size=128", "--loader_tokens=0", "--dtype=float32"])
    table = capsys.readouterr().out
    for name in ("step", "throughput", "model FLOP/s", "MFU", "peak memory", "validating a micro batch", "CPU per step"):
        assert name in table
    assert "% of a float32 matmul (" in table and "data loader" not in table
    assert result.accum == 2 and result.loader is None and result.dtype == "float32"


def test_bench_refuses_bad_settings():
    with pytest.raises(SystemExit, match="--steps"):
        bench.main(["--steps=0"])
    with pytest.raises(SystemExit, match="unknown setting --nope"):
        bench.main(["--nope=1"])


def test_chunked_loss_under_bf16_autocast_is_as_close_to_fp32_as_full_logits():
    """The chunked loss's bf16 path (fp32 softmax rounded to bf16, loss as -log p), in one chunk
    and in several (weight gradient summed in fp32), errs from the fp32 loss and gradients no more
    than autocast's full logits with F.cross_entropy, the path it replaces."""
    torch.manual_seed(0)
    h = torch.randn(300, 64, requires_grad=True)
    w = (torch.randn(160, 64) * 0.3).requires_grad_()
    t = torch.randint(0, 150, (300,))

    def full_logits(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = h @ w.t()
        logits = torch.cat([logits[:, :150], torch.full_like(logits[:, 150:], float("-inf"))], dim=1)
        loss = F.cross_entropy(logits.float(), t)
        return (loss, *torch.autograd.grad(loss, (h, w)))

    def chunked(chunk_size):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_head_cross_entropy(h, w, t, vocab_size=150, chunk_size=chunk_size)
        return (loss, *torch.autograd.grad(loss, (h, w)))

    def errors(result):  # loss: absolute; gradients: relative, over the whole tensor
        return [abs(result[0].item() - truth[0].item())] + [((g - r).norm() / r.norm()).item()
                                                             for g, r in zip(result[1:], truth[1:])]

    truth = full_logits(autocast=False)
    reference = errors(full_logits(autocast=True))
    assert reference[0] < 1e-3 and max(reference[1:]) < 1e-2  # bf16 rounding, nothing worse
    for chunk_size in (1024, 64):
        result = chunked(chunk_size)
        assert result[0].dtype == result[1].dtype == result[2].dtype == torch.float32
        for err, ref in zip(errors(result), reference):
            assert err <= 1.25 * ref


def test_chunked_loss_is_finite_for_a_target_beyond_fp32s_range():
    """A target 200 nats less likely than the best id has probability 0 in fp32: the loss is
    capped at -log(smallest fp32), not inf, so the step is not mistaken for a diverged one."""
    h = torch.ones(2, 1, requires_grad=True)
    w = torch.tensor([[200.0], [0.0], [1.0]], requires_grad=True)
    loss = lm_head_cross_entropy(h, w, torch.tensor([1, 0]), vocab_size=3)
    assert loss.item() == pytest.approx(-math.log(torch.finfo(torch.float32).tiny) / 2)  # 87.3 and ~0
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()


def test_adamw_is_fused_on_the_cpu_and_steps_as_the_plain_one():
    def model():
        return GPT(preset_config("tiny", n_layer=1, n_embd=32, n_head=2, block_size=16))  # seed 0: alike

    a, b, c = model(), model(), model()
    fused = configure_optimizers(a, 0.1, 1e-3, "cpu", log=lambda m: None)
    assert fused.defaults["fused"]
    plain = torch.optim.AdamW(optimizer_groups(b, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    undecayed = torch.optim.AdamW(optimizer_groups(c, 0.0), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for m, opt in ((a, fused), (b, plain), (c, undecayed)):
            loss = m(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
    # An AdamW step moves a parameter by about lr at most. The two kernels round differently, and
    # where a gradient is only rounding noise that difference becomes a visible part of a step:
    # the key bias (softmax ignores a constant added to every key, so its true gradient is 0) gets
    # noise / (|noise| + eps), and fused and plain take it apart by up to ~2e-3 x lr in 3 steps
    # (seen: 1.9e-6). A hundredth of a step (1e-5) allows that; a kernel that steps otherwise (other
    # betas, eps or weight decay) misses by more: weight decay alone moves the larger embedding
    # weights by 3 x lr x 0.1 x |w|, ~3e-5, which the undecayed optimizer must show.
    tolerance = dict(atol=1e-2 * 1e-3, rtol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, **tolerance, msg=lambda m: f"{name}: {m}")
    with pytest.raises(AssertionError):
        torch.testing.assert_close(a.transformer.wte.weight, c.transformer.wte.weight, **tolerance)


def test_keep_freed_memory_takes_and_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("KEEP_FREED_MEMORY", "0")
    assert fastpath.keep_freed_memory() is False
    monkeypatch.delenv("KEEP_FREED_MEMORY")
    if sys.platform.startswith("linux"):
        assert fastpath.keep_freed_memory() is True  # mallopt accepted both values


def test_cpu_bf16_can_be_overridden_for_a_float32_machines_run(monkeypatch):
    """CPU_BF16=0 runs what a CPU without bf16 units runs (docs/performance.md measures the demo so):
    the auto dtype float32 and Muon's fp32 Newton-Schulz; CPU_BF16=1 the other way."""
    import train_gpt
    from support import settings
    from support.runtime import setup_runtime
    for value, dtype in (("0", "float32"), ("1", "bfloat16")):
        monkeypatch.setenv("CPU_BF16", value)
        assert fastpath.cpu_has_bf16() is (value == "1")
        s = train_gpt.parse_settings(["--demo", "--log_dir=unused"])
        train_gpt.resolve_model_settings(s)
        rt = setup_runtime(s)
        assert s.dtype == dtype, value
        assert settings.muon_config(s, rt.device).float32 is (value == "0")


def test_matmul_yardstick_is_a_positive_rate():
    assert runlog.measure_matmul_flops(n=64, trials=2) > 0
    assert runlog.measure_matmul_flops(n=64, trials=2, dtype=torch.bfloat16) > 0


def test_bench_attention_kernel_is_recorded_and_checked(capsys):
    fp32 = TINY_BENCH + ["--loader_tokens=0", "--dtype=float32", "--json"]
    default = bench.main(fp32)
    math_kernel = bench.main(fp32 + ["--sdpa_kernel=math"])
    assert math_kernel.sdpa_kernel == "math"
    assert math_kernel.final_loss == pytest.approx(default.final_loss, abs=1e-4)
    with pytest.raises(SystemExit, match="CUDA kernel"):
        bench.main(fp32 + ["--sdpa_kernel=cudnn"])
    with pytest.raises(SystemExit, match="choose one of"):
        bench.main(fp32 + ["--sdpa_kernel=fast"])


def test_bench_against_other_settings_reports_the_speed_ratio(capsys):
    """--against: the step measured again with the attention dense; both results and their ratio."""
    result = bench.main(TINY_BENCH + ["--attention=gpt3", "--attention_band=8", "--loader_tokens=0",
                                      "--dtype=float32", "--steps=1", "--warmup=0",
                                      "--against=attention=dense,attention_band=none"])
    table = capsys.readouterr().out
    assert (result.attention, result.attention_band) == ("gpt3", 8)
    assert (result.against.attention, result.against.attention_band) == ("dense", None)
    assert result.speed_ratio == pytest.approx(result.tokens_per_sec / result.against.tokens_per_sec)
    assert result.flops_per_token < result.against.flops_per_token  # a banded layer counts 8 keys, not 32
    assert "attention gpt3 (band 8)" in table and "against --attention=dense --attention_band=none" in table
    assert f"speed ratio: {result.speed_ratio:.3f}" in table


def test_bench_times_the_optimizer_train_gpt_builds(capsys, monkeypatch):
    """Issue 28.11: --optimizer=muon, --recipe=fast and --against=optimizer=muon timed AdamW, as
    Muon's step was never called. bench's step now runs train_gpt.build_optimizer's optimizer, and
    the report names it."""
    calls, muon_step = [], torch.optim.Muon.step

    def counted_step(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return muon_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Muon, "step", counted_step)  # Float32Muon's step calls it too
    result = bench.main(TINY_BENCH + ["--loader_tokens=0", "--steps=1", "--warmup=0", "--peak_flops=1e12",
                                      "--against=optimizer=muon"])
    table = capsys.readouterr().out
    # the against run's one timed step, and the step whose memory is measured after it (the CPU's
    # profiled step); none in the AdamW run
    assert len(calls) == 2
    assert result.optimizer == "AdamW (fused)" and "optimizer AdamW (fused), " in table
    muon = f"AdamW (fused) + {calls[0]}"  # Muon, or Float32Muon on a CPU without bf16 units
    assert result.against.optimizer == muon and f"optimizer {muon}, " in table
    assert bench.parse_args(["--recipe=fast"])[0].optimizer == "muon"
