"""plan.py: the fake training step's peak against a measured one, the extrapolation over layers,
the micro batch search and the refusals. Fake steps cost a few seconds each (more on a busy
machine), so the tests share one small setup and plan.peak_bytes' cache."""

import dataclasses
import json

import pytest

from tools import plan
from test_distributed import torchrun

SMALL = plan.Setup("tiny", gpus=1, micro_batch_size=1, fsdp=True, seq_len=64, dtype="float32")


def test_plan_is_within_15_percent_of_the_measured_peak_fsdp_with_checkpointing():
    """2 gloo ranks, FSDP2, full checkpointing, full logits: the peak that torch's CPU allocator
    records in the real step (plan.measure_peak_bytes) against the fake step's plan."""
    code, out = torchrun(["--check", "--model=tiny", "--fsdp=True", "--activation_checkpointing=full",
                          "--micro_batch_size=2", "--dtype=float32"], script=("-m", "tools.plan"))
    assert code == 0, out[-3000:]
    result = json.loads(next(line for line in out.splitlines() if line.startswith('{"setup"')))
    assert result["measured"] > 100 * 2**20  # a real measurement: the model's state alone is 130 MB
    assert abs(result["ratio"] - 1) < 0.15, result


def test_four_and_six_layers_give_the_peak_of_eight():
    eight = dataclasses.replace(SMALL, n_layer=8, gpus=4)
    direct = plan.fake_step_peak(eight)
    extrapolated = plan.peak_bytes(eight)  # from 4 and 6 layers
    assert direct["total"] > plan.peak_bytes(dataclasses.replace(eight, n_layer=6))["total"]
    for key in direct:
        assert extrapolated[key] == pytest.approx(direct[key], rel=1e-3, abs=4096), key


def test_largest_micro_batch_is_the_largest_that_fits():
    batch = 8 * 64  # 8 sequences of 64: micro batches 1, 2, 4, 8
    peaks = {b: plan.peak_bytes(dataclasses.replace(SMALL, micro_batch_size=b))["total"] for b in (1, 2, 4)}
    assert peaks[1] < peaks[2] < peaks[4]
    budget = (peaks[2] + peaks[4]) // 2
    b, peak = plan.largest_micro_batch(SMALL, batch, budget)
    assert (b, peak["total"]) == (2, peaks[2])
    assert plan.largest_micro_batch(SMALL, batch, peaks[1] - 1)[0] is None


def test_impossible_plans_are_refused_with_the_reason(monkeypatch):
    split = plan.make_plan("gpt3-175b", 1024, tensor_parallel=1, log=lambda m: None)  # 1536 sequences a step
    assert not split.fits and "does not split evenly over 1024 GPUs" in split.reason and "512" in split.reason
    assert "--tensor_parallel=2, 4 or 8" in split.reason
    monkeypatch.setitem(plan.GPUS, "small", plan.GPU(2**20, 1e12, None, ""))
    ddp = plan.make_plan("tiny", 1, "small", fsdp=False, activation_checkpointing="full",
                         micro_batch_size="1", log=lambda m: None)
    assert not ddp.fits and "does not fit" in ddp.reason and "try --fsdp" in ddp.reason
    assert ddp.memory_gib["total"] > ddp.budget_gib
    with pytest.raises(ValueError, match="unknown --gpu"):
        plan.make_plan("gpt2", 8, "H100")
    with pytest.raises(ValueError, match="does not divide"):
        plan.make_plan("gpt2", 8, micro_batch_size="3")


def test_time_estimate_follows_the_flops():
    from model import flops_per_token
    from support.presets import preset_config
    est = plan.make_plan("tiny", 1, activation_checkpointing="none", micro_batch_size="1", mfu=0.5,
                         log=lambda m: None)
    assert est.fits and est.accumulation_steps == 2**14 // 256
    gpu = plan.GPUS["H100-80GB"]
    assert est.tokens_per_second == pytest.approx(gpu.peak_flops * 0.5 / flops_per_token(preset_config("tiny"), 256))
    assert est.days == pytest.approx(plan.token_budget("tiny") / est.tokens_per_second / 86400)


def test_auto_micro_batch_on_the_cpu_is_the_largest_divisor_up_to_16(shards, tmp_path, one_thread):
    import train_gpt
    from conftest import read_metrics, tiny_args
    log_dir = str(tmp_path / "auto")
    # 1024 tokens a step: 32 sequences of 32 on one process -> 16, 2 accumulation steps
    train_gpt.main(tiny_args(shards, log_dir, micro_batch_size="auto", total_batch_size=1024, max_steps=1, warmup_steps=1,
                             val_every=0, checkpoint_every=100))
    log = open(f"{log_dir}/log.txt").read()
    assert "micro batch: auto = 16" in log and "= 16 x 32 x 1 ranks x 2 accumulation steps" in log
    assert len(read_metrics(log_dir)) == 1


def test_hybrid_sharding_plans_the_memory_of_one_shard_group():
    """HSDP over 4 GPUs as 2 x 2 holds what 2-way FSDP holds per GPU, more than 4-way FSDP (all at
    TP 1: at micro batch 1 FSDP's time would make auto take TP 2 or 4)."""
    kw = dict(activation_checkpointing="none", micro_batch_size="1", tensor_parallel=1, log=lambda m: None)
    hybrid = plan.make_plan("tiny", 4, fsdp_shard_size=2, **kw)
    assert hybrid.fits and hybrid.sharding == "HSDP (2 replicas x 2-way FSDP2)"
    assert hybrid.accumulation_steps == 2**14 // (256 * 4)  # the batch still splits over all 4 GPUs
    assert hybrid.memory_gib == plan.make_plan("tiny", 2, **kw).memory_gib
    assert hybrid.memory_gib["params"] > plan.make_plan("tiny", 4, **kw).memory_gib["params"]
    with pytest.raises(ValueError, match="must divide --gpus=4"):
        plan.make_plan("tiny", 4, fsdp_shard_size=3, **kw)


def test_muon_under_fsdp_is_planned_with_its_traffic_work_and_step():
    """--optimizer=muon: the tiny preset's 24 matrices (4 blocks of 256: attention's q, k, v and
    output projections, the MLP's two) over 2 GPUs, counted here by hand. Each GPU receives, per
    matrix it steps, the other's half of its weight, gradient and momentum, and per matrix the other
    steps, its half of the new weight and momentum: 20 bytes for every other element, halved over 2
    GPUs. Rounds of 2 alike matrices: the busiest GPU does half of the Newton-Schulz work. Muon's
    sharded momentum is less state than AdamW's two moments (AdamW's at TP 1, as Muon's)."""
    kw = dict(activation_checkpointing="none", micro_batch_size="1", tensor_parallel=1, log=lambda m: None)
    muon, adamw = plan.make_plan("tiny", 2, optimizer="muon", **kw), plan.make_plan("tiny", 2, **kw)
    C, matrices = 256, 4 * 12 * 256 * 256
    assert muon.muon["matrices"] == 24 and muon.muon["largest"] == [4 * C, C]
    assert muon.muon["received_gb"] == pytest.approx(20 * matrices / 2 / 2 / 1e9)
    ns = lambda m, n: 5 * (4 * m * m * n + 2 * m ** 3)  # torch's 5 iterations on the wide orientation
    all_ns = 4 * (4 * ns(C, C) + 2 * ns(C, 4 * C))
    assert muon.muon["newton_schulz_tflop"] == pytest.approx(all_ns / 2 / 1e12)
    assert muon.muon["temporaries_gib"] * plan.GiB > 12 * 4 * C * C  # the largest whole: weight, gradient, momentum
    assert muon.memory_gib["optimizer"] < adamw.memory_gib["optimizer"]
    text = plan.format_plan(muon)
    assert "Muon for 24 block matrices" in text and "Muon's extra communication: 0.02 GB" in text
    with pytest.raises(ValueError, match="choose adamw or muon"):
        plan.make_plan("tiny", 2, optimizer="sgd", **kw)


def test_the_plan_follows_the_attention_pattern():
    """A banded tiny (gpt3's pattern, band 64 of 256) plans fewer FLOPs a token, so at the same MFU
    more tokens a second; the pattern is named in the plan."""
    from model import flops_per_token
    from support.presets import preset_config
    kw = dict(activation_checkpointing="none", micro_batch_size="1", mfu=0.5, log=lambda m: None)
    banded = plan.make_plan("tiny", 1, attention="gpt3", attention_band=64, **kw)
    dense = plan.make_plan("tiny", 1, **kw)
    per_token = flops_per_token(preset_config("tiny", attention="gpt3", attention_band=64), 256)
    assert per_token < flops_per_token(preset_config("tiny"), 256)
    assert banded.tokens_per_second == pytest.approx(plan.GPUS["H100-80GB"].peak_flops * 0.5 / per_token)
    assert banded.tokens_per_second > dense.tokens_per_second
    assert "attention gpt3: 2 of 4 layers banded to the last 64 tokens" in plan.format_plan(banded)
    assert "attention dense" in plan.format_plan(dense)


def test_auto_micro_batch_plans_the_pattern_that_trains(monkeypatch):
    """On a GPU --micro_batch_size=auto runs tools/plan.py: with the run's --attention and band."""
    import subprocess
    import types
    import torch
    import train_gpt
    from support import settings
    s = train_gpt.parse_settings(["--model=gpt3-small", "--attention_band=128", "--micro_batch_size=auto"])
    settings.resolve_model_settings(s)
    asked = []
    answer = dict(fits=True, micro_batch_size=4, memory_gib={"total": 1.0}, budget_gib=2.0)

    def run(cmd, **kwargs):
        asked.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(answer), stderr="")
    monkeypatch.setattr(settings.subprocess, "run", run)
    monkeypatch.setattr(settings.torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=2**36))
    rt = types.SimpleNamespace(device=torch.device("cuda", 0), world_size=1, dp_size=1, is_main=True)
    assert settings.auto_micro_batch(s, rt, log=lambda m: None) == 4
    assert "--attention=gpt3" in asked[0] and "--attention_band=128" in asked[0]
    assert "--tensor_parallel=1" in asked[0]  # the run's degree, not the plan's auto search
    s.tensor_parallel = 8
    settings.auto_micro_batch(s, rt, log=lambda m: None)
    assert "--tensor_parallel=8" in asked[1]


def test_gpt3_175b_on_1024_gpus_at_the_papers_batch_tensor_parallel_8():
    """Without TP the paper's 1,536 sequences do not split over 1,024 GPUs (above); with TP 8 they
    split over 128 data-parallel ranks, 12 each (fake steps of the 128-rank group)."""
    # the search's answer (docs/memory.md: micro batch 4, no checkpointing) planned alone: one fake step,
    # not the search's (test_largest_micro_batch_is_the_largest_that_fits tests the search)
    p = plan.make_plan("gpt3-175b", 1024, total_batch_size=3_145_728, tensor_parallel=8, micro_batch_size=4,
                       activation_checkpointing="none", log=lambda m: None)
    assert p.fits and (p.tensor_parallel, p.data_parallel, p.micro_batch_size) == (8, 128, 4)
    assert 12 % p.micro_batch_size == 0 and p.accumulation_steps == 12 // p.micro_batch_size
    assert p.memory_gib["total"] <= p.budget_gib
    # the TP traffic, counted here from the model: 8 collectives a block, 4 a recomputed block, 4 for
    # the embedding and the head, each 7/8 of a (sequence, 2048, 12288) bf16 tensor, 12 sequences
    from support.activation_checkpoint import checkpointed_blocks
    collectives = 8 * 96 + 4 * len(checkpointed_blocks(96, p.activation_checkpointing)) + 4
    assert p.tensor_parallel_gb * 1e9 == pytest.approx(collectives * 12 * 2048 * 12288 * 2 * 7 / 8)
    assert p.tensor_parallel_seconds == pytest.approx(p.tensor_parallel_gb * 1e9 / plan.GPUS["H100-80GB"].nvlink)
    text = plan.format_plan(p)
    assert "tensor parallel 8 (Megatron-style, sequence parallel) x FSDP2 over 128 data-parallel ranks" in text
    assert f"activation checkpointing {p.activation_checkpointing}, micro batch {p.micro_batch_size} " in text
    assert f"ESTIMATE {p.tensor_parallel_seconds:.2f} s at NVLink's 450 GB/s" in text
    # FSDP over the 128 ranks of one TP rank, one GPU in each node: one NIC's rate
    h100 = plan.GPUS["H100-80GB"]
    [fsdp] = p.data_parallel_communication
    assert fsdp["ranks"] == 128 and fsdp["seconds"] == pytest.approx(fsdp["gb"] * 1e9 / h100.inter_node)
    assert f"FSDP communication: {fsdp['gb']:,.0f} GB received" in text
    assert f"ESTIMATE {fsdp['seconds']:.2f} s at 50 GB/s a direction (InfiniBand: the group's 1 GPU of a node" in text
    assert p.step_seconds == pytest.approx(max(p.compute_seconds, fsdp["seconds"]) + p.tensor_parallel_seconds)
    # (auto plans TP 2, 4 and 8 here, minutes of fake steps: its choice is tested on smaller plans below, and
    # its answer for this run, TP 2, is in docs/memory.md with the command)


def test_tensor_parallel_cuts_the_state_over_dp_x_tp_and_the_activations_over_tp():
    """tiny on 4 GPUs as TP 2 x 2 data-parallel ranks, against the fake step of those 2 ranks at
    TP 1: the sharded state is over all 4 GPUs (AdamW's two fp32 moments: 8 bytes a parameter / 4),
    parameters, gradients and FSDP's buffers halve, and so do the activations, except the gathered
    (B, T, C) inputs of attention's q, k, v, the MLP's fc (each block) and the head, kept whole."""
    from model import GPT, num_params
    setup = dataclasses.replace(SMALL, gpus=4, micro_batch_size=2)
    group = plan.peak_bytes(dataclasses.replace(setup, gpus=2))  # TP 1: the data-parallel group's step
    tp2 = plan.peak_bytes(dataclasses.replace(setup, tensor_parallel=2))
    config = plan.setup_config(setup)
    with __import__("torch").device("meta"):
        n = num_params(GPT(config))
    assert tp2["optimizer"] == pytest.approx(8 * n / 4, rel=0.01)
    assert tp2["optimizer"] == pytest.approx(plan.peak_bytes(setup)["optimizer"], rel=0.01)  # = 4-way FSDP's
    for key in ("params", "grads", "optimizer", "other"):
        assert tp2[key] == pytest.approx(group[key] / 2, abs=1), key
    gathered = (2 * config.n_layer + 1) * 2 * 64 * config.n_embd * 4  # micro batch 2, T 64, fp32
    assert 0 < gathered < group["activations"]
    assert tp2["activations"] == pytest.approx((group["activations"] - gathered) / 2 + gathered, abs=1)
    assert tp2["total"] == sum(tp2[k] for k in ("params", "grads", "optimizer", "activations", "other"))


def test_bad_tensor_parallel_layouts_are_refused_in_one_line():
    kw = dict(activation_checkpointing="none", micro_batch_size="1", log=lambda m: None)
    for model, gpus, tp, problem in [
            ("tiny", 32, 16, "is wider than a node's 8 GPUs"),
            ("gpt2", 6, 4, "does not divide --gpus=6"),
            ("tiny", 8, 8, "does not divide the 4 attention heads"),
            ("gpt2-xl", 5, 5, "does not divide the 50304 rows of the (padded) vocabulary"),
            ("gpt2", 6, 3, "does not divide the sequence of 1024")]:
        with pytest.raises(ValueError) as e:
            plan.make_plan(model, gpus, tensor_parallel=tp, **kw)
        message = str(e.value)
        assert message.startswith(f"--tensor_parallel={tp} {problem}") and ": choose one of " in message, message
        assert "\n" not in message
    with pytest.raises(ValueError, match="not with --optimizer=muon: drop one"):
        plan.make_plan("tiny", 4, tensor_parallel=2, optimizer="muon", **kw)
    with pytest.raises(ValueError, match="not with --fsdp_shard_size: drop one"):
        plan.make_plan("tiny", 4, tensor_parallel=2, fsdp_shard_size=2, **kw)
    with pytest.raises(SystemExit, match="^plan.py: error: --tensor_parallel=8 does not divide the 4 attention heads: "
                                         "choose one of 1, 2, 4 for tiny on 8 GPUs$"):
        plan.main(["--model=tiny", "--gpus=8", "--tensor_parallel=8"])


def test_auto_tensor_parallel_takes_tp_only_when_it_pays():
    """tiny on 4 GPUs (one node), no checkpointing. At micro batch 8 TP 1 fits and FSDP's time hides
    under the compute: no wider TP can be faster (each adds TP's time to the same compute), so none
    is planned. On a GPU too small for TP 1, TP 2. At micro batch 1, 64 micro batches a step gather
    the parameters 64 times, and FSDP's time exceeds the compute: auto plans TP 2 and 4 too, and
    takes TP 4, one data-parallel rank, no FSDP traffic."""
    kw = dict(activation_checkpointing="none", log=lambda m: None)
    alone = plan.make_plan("tiny", 4, micro_batch_size="8", **kw)
    assert alone.fits and alone.tensor_parallel == 1 and not alone.tensor_parallel_choice
    assert 0 < alone.data_parallel_seconds < alone.compute_seconds == alone.step_seconds
    tp2 = plan.peak_bytes(plan.Setup("tiny", 4, 8, tensor_parallel=2))["total"]
    assert tp2 < alone.memory_gib["total"] * plan.GiB
    small = plan.make_plan("tiny", 4, micro_batch_size="8", **kw,
                           gpu_memory=(tp2 + alone.memory_gib["total"] * plan.GiB) / 2 / plan.USABLE)
    assert small.fits and small.tensor_parallel == 2
    assert small.tensor_parallel_choice.startswith("TP 2, the shortest estimated step (TP 1 does not fit; TP 2 ")
    assert "; none wider planned: TP 4 takes at least" in small.tensor_parallel_choice
    assert "tensor parallel auto: TP 2" in plan.format_plan(small)
    one = {t: plan.make_plan("tiny", 4, micro_batch_size="1", tensor_parallel=t, **kw) for t in (1, 2, 4)}
    assert one[1].data_parallel_seconds > one[1].compute_seconds
    wide = plan.make_plan("tiny", 4, micro_batch_size="1", **kw)
    assert wide.tensor_parallel == min(one, key=lambda t: one[t].step_seconds) == 4
    assert wide.data_parallel_communication == [] and wide.step_seconds == one[4].step_seconds
    assert "TP 1 " in wide.tensor_parallel_choice and "TP 2 " in wide.tensor_parallel_choice


def test_data_parallel_collectives_are_timed_on_the_links_they_cross():
    """Bytes at ring_rate, for a model of a billion parameters, 3 micro batches a step, on H100s:
    within a node NVLink; across nodes the NICs of the group's GPUs in a node (ranks TP-innermost)."""
    h100, node, n = plan.GPUS["H100-80GB"], plan.GPUS_PER_NODE, 1e9

    def comm(gpus, tp=1, fsdp=True, shard=None):
        return plan.data_parallel_communication(plan.Setup("tiny", gpus, 1, fsdp=fsdp, shard_size=shard,
                                                           tensor_parallel=tp), n, 3, h100)

    def check(c, nbytes, rate):
        assert c["gb"] * 1e9 == pytest.approx(nbytes) and c["seconds"] == pytest.approx(nbytes / rate)

    check(*comm(8), 8 * n * 7 / 8 * 3, h100.nvlink)  # one node
    check(*comm(128, tp=8), 8 * n / 8 * 15 / 16 * 3, h100.inter_node)  # 16 ranks, one in each node
    check(*comm(128, tp=2), 8 * n / 2 * 63 / 64 * 3, 4 * h100.inter_node)  # 64 ranks, 4 in each node
    check(*comm(32), 8 * n * 31 / 32 * 3, min(node * h100.inter_node, h100.nvlink))  # whole nodes
    assert comm(128, tp=2)[0]["seconds"] == pytest.approx(comm(128, tp=8)[0]["seconds"], rel=0.06)
    gathers, replicas = comm(32, shard=8)  # HSDP: 4 nodes, a shard group in each
    check(gathers, 8 * n * 7 / 8 * 3, h100.nvlink)
    check(replicas, 2 * 4 * n / 8 * 3 / 4 * 3, h100.inter_node)  # 4 replicas, one GPU in each node
    check(*comm(16, fsdp=False), 2 * 4 * n * 15 / 16, min(node * h100.inter_node, h100.nvlink))  # DDP: once
    assert comm(1) == comm(8, tp=8) == []  # one data-parallel rank: nothing to gather or reduce
    a100 = plan.data_parallel_communication(plan.Setup("tiny", 128, 1, tensor_parallel=8), n, 3, plan.GPUS["A100-80GB"])
    assert a100[0]["rate_gb_s"] == 25 and "25 GB/s NIC" in a100[0]["link"]


def test_the_step_is_the_longer_of_compute_and_fsdp_plus_tp():
    """tiny on 16 GPUs (2 nodes) at micro batch 1: FSDP's time, over 8 ranks of TP 2 with 4 GPUs in
    each node, exceeds the compute and shows; DDP's all-reduce, once a step, hides under the last
    micro batch's backward unless it is longer."""
    from model import flops_per_token
    kw = dict(activation_checkpointing="none", micro_batch_size="1", log=lambda m: None)
    h100 = plan.GPUS["H100-80GB"]
    p = plan.make_plan("tiny", 16, tensor_parallel=2, **kw)
    per_token = flops_per_token(plan.setup_config(plan.Setup("tiny", 16, 1)), 256)
    compute = 2**14 * per_token / (16 * h100.peak_flops * p.mfu)
    assert p.compute_seconds == pytest.approx(compute)
    [fsdp] = p.data_parallel_communication
    assert fsdp["seconds"] == pytest.approx(fsdp["gb"] * 1e9 / (4 * h100.inter_node)) and fsdp["ranks"] == 8
    assert p.data_parallel_seconds > p.compute_seconds
    assert p.step_seconds == pytest.approx(p.data_parallel_seconds + p.tensor_parallel_seconds)
    text = plan.format_plan(p)
    assert f"{p.step_seconds:.2f} s a step = compute {p.compute_seconds:.2f} s + " in text
    assert f"of FSDP's {p.data_parallel_seconds:.2f} s not hidden under it + TP" in text
    assert "overlapped with compute (FSDP2's prefetch)" in text
    ddp = plan.make_plan("tiny", 16, fsdp=False, tensor_parallel=1, **kw)
    [reduce] = ddp.data_parallel_communication
    window = ddp.compute_seconds / ddp.accumulation_steps * 2 / 3
    assert reduce["seconds"] > window  # 125 MB at 400 GB/s against a quarter of 2/3 of the compute
    assert ddp.step_seconds == pytest.approx(ddp.compute_seconds + reduce["seconds"] - window)
    assert "overlapped with the last micro batch's backward" in plan.format_plan(ddp)
