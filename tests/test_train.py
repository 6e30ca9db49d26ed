import dataclasses
import math
import os
import subprocess
import sys
from typing import Optional

import pytest
import torch

import convert_hf
import train_gpt
from conftest import ROOT, read_metrics, tiny_args, train_losses
from model import GPT, GPTConfig
from support.fastpath import clip_gradients, gradient_norm
from train_gpt import Settings, accum_steps_at, lr_at, parse_settings
from support import hf, runlog, runtime
from support.settings import SAME_THING


def run(args):
    train_gpt.main(args)


def fail(args, match):
    with pytest.raises(SystemExit) as e:
        train_gpt.main(args)
    assert e.value.code != 0
    assert any(m in str(e.value.code) for m in match.split("|")), e.value.code
    return str(e.value.code)


def _model_with_grads(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 50257, (2, 16))
    model(x, x).mul(50.0).backward()  # a gradient with norm far above 1
    return model


@pytest.mark.parametrize("fused", [True, False])
def test_clip_gradients_matches_torch_clip_then_adamw(fused):
    ref = _model_with_grads()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=fused)
    ref_opt.step()

    model = _model_with_grads()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    norm = gradient_norm(list(model.parameters()))
    clip_gradients(list(model.parameters()), opt, 1.0, norm)
    opt.step()
    assert ref_norm.item() > 10
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)
        # AdamW's update hardly changes when the whole gradient is scaled; its moments do
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[r]["exp_avg"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_train_step_clips_at_grad_clip_and_zero_never_clips(grad_clip):
    """train_step's clipping against torch's clip_grad_norm_ then AdamW, on the moments (AdamW's
    update hardly changes with the gradient's scale); --grad_clip=0 steps on the gradient as it is."""
    config = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = GPT(config, seed=0)
    ref(x, x).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    ref_opt.step()

    model = GPT(config, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    s = Settings(grad_clip=grad_clip)
    rt = runtime.Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), amp_dtype=None, is_main=True)
    loss, norm, finite = train_gpt.train_step(s, rt, model, model, opt, lambda: (x, x), accum=1)
    assert finite and ref_norm.item() > 100 * 1e-3
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[r]["exp_avg"], rtol=1e-5, atol=1e-12)
    unclipped = torch.nn.utils.get_total_norm([opt.state[p]["exp_avg"] for p in model.parameters()]) / 0.1
    assert torch.isclose(unclipped, ref_norm, rtol=1e-4) == (grad_clip == 0)  # the moment is 0.1 x the gradient


def resolved(*args):
    s = parse_settings(list(args))
    train_gpt.resolve_model_settings(s)
    return s


def seed_lr(step, max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073):
    """The seed's schedule in steps, as this project had it before the clock became tokens."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def test_lr_schedule_in_tokens_is_the_seeds_in_steps():
    s = resolved()
    B = 2**19
    assert (s.max_tokens, s.warmup_tokens, s.decay_tokens) == (19073 * B, 715 * B, 19073 * B)
    for step in (0, 1, 357, 714, 715, 716, 9000, 19072, 19073):
        assert lr_at(step * B, B, s) == seed_lr(step, min_lr=s.min_lr), step  # the same floats, not approximately
    assert lr_at(0, B, s) == pytest.approx(6e-4 / 715)
    assert lr_at(714 * B, B, s) == 6e-4 and lr_at(715 * B, B, s) == pytest.approx(6e-4, rel=1e-15)  # the peak
    assert lr_at(19072 * B, B, s) == pytest.approx(6e-5, rel=1e-3)
    assert lr_at(19073 * B, B, s) == pytest.approx(6e-5, rel=1e-15)
    assert sum(1 for _ in train_gpt.plan_steps(s, 32 * 1024)) == 19073


def test_steps_convert_to_tokens_and_the_presets_plan_gpt3s_schedule():
    s = resolved("--max_steps=100", "--warmup_steps=10", "--total_batch_size=65536", "--micro_batch_size=8")
    assert (s.max_tokens, s.warmup_tokens, s.decay_tokens) == (100 * 65536, 10 * 65536, 100 * 65536)
    g3 = resolved("--model=gpt3-xl")
    assert (g3.max_tokens, g3.warmup_tokens, g3.decay_tokens) == (300 * 10**9, 375 * 10**6, 260 * 10**9)
    assert g3.total_batch_size == 2**20
    assert lr_at(270 * 10**9, 2**20, g3) == g3.min_lr  # past 260B: at 10%
    own = resolved("--model=gpt3-xl", "--max_tokens=20e9")
    assert (own.max_tokens, own.decay_tokens) == (20 * 10**9, 20 * 10**9)  # one's own budget decays over itself
    plan = train_gpt.describe_plan(g3, 2**20)
    assert "300,000,000,000 tokens in 286,103 steps of 1,048,576" in plan and "(358 steps)" in plan, plan
    with pytest.raises(ValueError, match="give one of them"):
        resolved("--max_steps=100", "--max_tokens=1e9")
    with pytest.raises(ValueError, match="warmup_tokens"):
        resolved("--warmup_tokens=2e10")


@pytest.mark.parametrize("ranks", [1, 8])
def test_batch_warmup_trains_the_budget_with_gpt3s_lr_warmup(ranks):
    """GPT-2's schedule with a 4B-token batch-size warmup, at 1 x 32 and 8 x 32 micro batches of
    1024, from the schedule functions alone: the budget is trained, the LR warms up over 375M
    tokens and ends at min_lr, the step grows from the smallest allowed and never shrinks."""
    s = resolved("--batch_warmup_tokens=4e9")
    per_micro = 32 * 1024 * ranks
    steps = list(train_gpt.plan_steps(s, per_micro))
    sizes = [n for _, n in steps]
    trained = steps[-1][0] + sizes[-1]
    assert s.max_tokens <= trained < s.max_tokens + sizes[-1]
    assert sizes[0] == max(2**15, per_micro) and sizes[-1] == 2**19
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert len(set(sizes)) == 2**19 // per_micro  # every multiple of a global micro batch on the way
    lrs = [lr_at(t, n, s) for t, n in steps]
    peak = next(i for i, lr in enumerate(lrs) if lr == s.max_lr)
    assert steps[peak][0] < 715 * 2**19 <= steps[peak][0] + sizes[peak]  # warmup ends in this step
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert lr_at(trained, 2**19, s) == s.min_lr and lrs[-1] == pytest.approx(s.min_lr, rel=1e-3)
    assert train_gpt.count_steps(s, per_micro, s.max_tokens) == len(steps)


def test_defaults_are_the_seed_recipe():
    s = resolved()
    assert (s.total_batch_size, s.seq_len, s.max_lr, s.min_lr) == (2**19, 1024, 6e-4, pytest.approx(6e-5))
    assert (s.warmup_tokens // 2**19, s.max_tokens // 2**19, s.weight_decay, s.grad_clip) == (715, 19073, 0.1, 1.0)
    g3 = resolved("--model=gpt3-xl")
    assert (g3.seq_len, g3.total_batch_size, g3.max_lr) == (2048, 2**20, 2e-4)
    assert parse_settings(["--model=gpt3-xl", "--max_lr=1e-3", "--compile=False"]).max_lr == 1e-3


def test_batch_size_warmup_ramps_from_32k():
    s = Settings(total_batch_size=2**19, batch_warmup_tokens=10**9)
    per_micro = 16 * 1024
    assert accum_steps_at(0, s, per_micro) == 2  # 32K tokens
    assert accum_steps_at(5 * 10**8, s, per_micro) == round((2**15 + (2**19 - 2**15) / 2) / per_micro)
    assert accum_steps_at(10**9, s, per_micro) == 32
    assert accum_steps_at(0, Settings(total_batch_size=2**19), per_micro) == 32  # off by default


def test_bad_settings_are_refused_clearly(shards, tmp_path):
    msg = fail(["--no_such=1"], "unknown setting --no_such")
    assert "max_lr" in msg  # lists the valid ones
    fail(["--max_steps=abc"], "--max_steps takes an integer")
    fail(["--compile=maybe"], "takes True or False")
    fail(["--model=gpt5"], "unknown --model")
    fail(tiny_args(shards, str(tmp_path), n_head=3), "not divisible by n_head=3")
    msg = fail(tiny_args(shards, str(tmp_path), total_batch_size=1000), "not divisible")
    assert msg.endswith("Values that work: --total_batch_size=896 or 1024.")  # no micro batch size divides 1000
    msg = fail(tiny_args(shards, str(tmp_path), total_batch_size=4 * 32 * 3, micro_batch_size=8), "not divisible")
    assert msg.endswith("Values that work: --micro_batch_size in [1, 2, 3, 4, 6, 12], or --total_batch_size=256 or 512.")
    fail(tiny_args(shards, str(tmp_path), seq_len=64), "longer than the model's block_size")
    fail(tiny_args(str(tmp_path / "nowhere"), str(tmp_path)), "does not exist")
    fail(tiny_args(shards, str(tmp_path), backend="nccl"), "needs CUDA")
    if not torch.cuda.is_available():
        fail(tiny_args(shards, str(tmp_path), device="cuda"), "CUDA is not available")
    fail(tiny_args(shards, str(tmp_path), resume="/no/such.pt"), "no such checkpoint")
    fail(tiny_args(shards, str(tmp_path), dtype="float16"), "choose float32 or bfloat16")


# train_gpt.py on a machine with N GPUs, faked (this suite runs on CPUs): python -c FAKE_GPUS N ARGS...
FAKE_GPUS = """
import sys, torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: int(sys.argv[1])
import train_gpt
train_gpt.main(sys.argv[2:])
"""


def test_a_gpu_index_is_honoured_or_refused(shards, tmp_path, monkeypatch):
    """Issue 28.13: --device=cuda:1 trained on cuda:0. On a machine with one GPU it is refused in
    one line before any work; cuda:0, as the line advises, and cuda:1 on two GPUs are the devices
    the run trains on and makes current. Under torchrun each process keeps its local rank's GPU."""
    log_dir = str(tmp_path / "log")
    done = subprocess.run([sys.executable, "-c", FAKE_GPUS, "1"] + tiny_args(shards, log_dir, device="cuda:1"),
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr == "train_gpt.py: error: --device=cuda:1, but this machine has 1 GPU: choose cuda:0 or cuda\n"
    assert not os.path.exists(log_dir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        for gpus, device in ((1, "cuda:0"), (2, "cuda:1")):
            monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
            rt = runtime.setup_runtime(parse_settings(tiny_args(shards, log_dir, device=device)))
            assert rt.device == torch.device(device) and made_current[-1] == rt.device
    finally:  # setup_runtime turned TF32 on, as for CUDA: the CPU's later tests get their fp32 back
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    with pytest.raises(train_gpt.SettingsError, match="under torchrun each of the 2 processes trains on its local"):
        runtime.cuda_device("1", local_rank=0, world_size=2)
    assert runtime.cuda_device("", local_rank=1, world_size=2) == torch.device("cuda", 1)


def test_training_learns_logs_and_is_deterministic(shards, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(tiny_args(shards, a, max_steps=30, val_every=10))
    run(tiny_args(shards, b, max_steps=30, val_every=10))
    la, lb = train_losses(a), train_losses(b)
    assert len(la) == 30 and la == lb  # bit-identical, run to run
    events = read_metrics(a)
    first = events[0]
    assert set(first) >= {"step", "train_loss", "lr", "grad_norm", "tokens_per_sec"}
    vals = [e["val_loss"] for e in events if "val_loss" in e]
    assert len(vals) == 3 and vals[-1] < vals[0] < math.log(50257)
    assert la[29] < la[0] - 1.0
    assert os.path.exists(os.path.join(a, "ckpt_0000030.pt"))


def test_accumulation_equals_a_larger_micro_batch(shards, tmp_path):
    """2 micro steps of 4 sequences make the same step as 1 of 8 (fp32): the loss scaling is right."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(tiny_args(shards, a, micro_batch_size=4, total_batch_size=4 * 32 * 4, max_steps=5))
    run(tiny_args(shards, b, micro_batch_size=16, total_batch_size=4 * 32 * 4, max_steps=5))
    la, lb = train_losses(a), train_losses(b)
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-5)
    wa = torch.load(os.path.join(a, "ckpt_0000005.pt"), weights_only=True)["model"]
    wb = torch.load(os.path.join(b, "ckpt_0000005.pt"), weights_only=True)["model"]
    for k in wa:
        # Adam divides by sqrt(v): rows of rare tokens, with gradients near 0, magnify rounding
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)


def test_chunked_and_full_logits_train_alike(shards, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(tiny_args(shards, a, chunked_loss=True, max_steps=5))
    run(tiny_args(shards, b, chunked_loss=False, max_steps=5))
    la, lb = train_losses(a), train_losses(b)
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-4)


def test_init_from_a_checkpoint_or_a_hugging_face_folder(shards, tmp_path):
    from model import GPTConfig
    a = str(tmp_path / "a")
    run(tiny_args(shards, a, max_steps=2, warmup_steps=1, val_every=0))  # no evaluation: weights are compared
    trained = torch.load(os.path.join(a, "ckpt_0000002.pt"), weights_only=True)
    hf_dir = hf.export_hf(trained["model"], GPTConfig(**trained["model_config"]), str(tmp_path / "hf"))
    converted = str(tmp_path / "converted.pt")
    convert_hf.main(["import", hf_dir, converted])
    for source in (os.path.join(a, "ckpt_0000002.pt"), hf_dir, converted):
        b = str(tmp_path / f"b{len(source)}")
        if source == converted:  # weights alone: nothing to resume; the advice, followed, starts from them
            message = fail(tiny_args(shards, b, resume=converted), "holds a model's weights but no training state")
            assert message.endswith(f"(no optimizer or step: convert_hf.py import writes such files): start a run "
                                    f"from its weights with --init_from={converted} instead of --resume")
            torch.save({"weights": {}}, str(tmp_path / "other.pt"))
            fail(tiny_args(shards, b, resume=str(tmp_path / "other.pt")), "is not a checkpoint of a training run "
                 "(it lacks model, model_config, optimizer, step)")
        run(tiny_args(shards, b, max_steps=1, max_lr=0.0, min_lr=0.0, warmup_steps=0, val_every=0, init_from=source))
        start = torch.load(os.path.join(b, "ckpt_0000001.pt"), weights_only=True)["model"]  # lr 0: unchanged
        for k, v in trained["model"].items():
            assert torch.equal(start[k], v), (source, k)
    refused = tmp_path / "c" / "d"  # refused once its lock is taken: it leaves no folder, no run.lock
    fail(tiny_args(shards, str(refused), n_layer=3, init_from=hf_dir), "pick the matching --model")
    assert not os.path.exists(tmp_path / "c")


def test_token_ids_outside_the_vocabulary_stop_the_run_naming_the_shard(tmp_path):
    # Every 20th token is 50304: without the loader's check, an IndexError deep in the embedding.
    import numpy as np
    from conftest import write_shards
    data = write_shards(str(tmp_path / "data"), n_train=1, train_tokens=4000, val_tokens=4000)
    tokens = np.load(os.path.join(data, "test_train_000001.npy"))
    tokens[::20] = 50304
    np.save(os.path.join(data, "test_train_000001.npy"), tokens)
    fail(tiny_args(data, str(tmp_path / "log"), max_steps=2, val_every=0), "test_train_000001.npy: token id 50304")


def test_resume_mid_batch_warmup_is_exact(shards, tmp_path, monkeypatch, one_thread):
    """A batch-size ramp (from one micro batch of 128 tokens: GPT-3's 32K start scaled to the tiny
    model) stopped and resumed in the middle gives the uninterrupted run's losses, bit for bit,
    and trains the token budget."""
    monkeypatch.setattr(train_gpt, "BATCH_WARMUP_START", 128)
    ramp = dict(total_batch_size=4 * 32 * 4, batch_warmup_tokens=1500, max_tokens=2500, max_steps=None,
                warmup_tokens=500, warmup_steps=None, val_every=0, checkpoint_every=100)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run([a for a in tiny_args(shards, a, **ramp) if not a.endswith("=None")])
    events = [e for e in read_metrics(a) if "train_loss" in e]
    sizes = [e["step_tokens"] for e in events]
    assert sizes[0] == 128 and sizes[-1] == 512 and sorted(sizes) == sizes and len(set(sizes)) == 4
    assert 2500 <= events[-1]["tokens"] < 2500 + 512
    stop = sizes.index(256) + 1  # a step in the middle of the ramp
    args = [a for a in tiny_args(shards, b, **ramp) if not a.endswith("=None")]
    run(args + [f"--stop_step={stop}"])
    run(args)
    assert train_losses(b) == train_losses(a)
    assert [e["step_tokens"] for e in read_metrics(b) if "train_loss" in e] == sizes


def test_gpu_peak_flops_match_whole_names():
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
             "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12, "NVIDIA A10": 125e12,
             "NVIDIA A10G": 0.0, "NVIDIA GeForce RTX 4090": 165e12, "Tesla V100-SXM2-16GB": 125e12,
             "NVIDIA B200": 0.0}
    for name, peak in names.items():
        assert runlog.gpu_peak_flops(name) == peak, name


def test_no_step_trains_at_lr_0_and_wsd_on_a_gpt3_preset_decays_to_the_runs_end():
    """Issue 20.1: WSD decays to 0, so on a GPT-3 preset it must end with the run (300B), not at
    the preset's 260B, where cosine holds 10%: its last 40B tokens would train at LR 0."""
    from support.presets import PRESETS
    for model in PRESETS:
        for recipe in train_gpt.RECIPES:
            s = resolved(f"--model={model}", f"--recipe={recipe}")
            last = (train_gpt.count_steps(s, s.total_batch_size, s.max_tokens) - 1) * s.total_batch_size
            assert lr_at(last, s.total_batch_size, s) > 0, (model, recipe)
    fast = resolved("--model=gpt3-small", "--recipe=fast")
    assert fast.decay_tokens == fast.max_tokens == 300 * 10**9 and lr_at(261 * 10**9, 2**19, fast) > 0
    assert "linear decay to 0 at 300,000,000,000 tokens (572,205 steps) (the run's end)" in \
        train_gpt.describe_plan(fast, 2**19)
    gpt3 = resolved("--model=gpt3-small")  # the paper's cosine: decay over 260B, then 10%
    assert gpt3.decay_tokens == 260 * 10**9 and lr_at(261 * 10**9, 2**19, gpt3) == gpt3.min_lr > 0
    assert "then 6e-05 for the last 40,000,000,000 tokens" in train_gpt.describe_plan(gpt3, 2**19)
    # a decay to 0 that ends before the run is refused, naming the fix, however it was asked for
    for args in (("--schedule=wsd", "--decay_tokens=260e9"), ("--decay_tokens=260e9", "--min_lr=0")):
        with pytest.raises(train_gpt.SettingsError, match="would train at LR 0. Give --decay_tokens=300000000000"):
            resolved("--model=gpt3-small", *args)
    assert resolved("--model=gpt3-small", "--min_lr=0").decay_tokens == 300 * 10**9  # the preset's 260B is cosine's


@pytest.mark.parametrize("setting, message", [  # the ranges of numeric settings: the test after this one
    ("min_lr=1", "--min_lr=1 must be between 0 and max_lr=0.003"),
    ("val_tokens=8", "--val_tokens=8 is less than one sequence of seq_len=32"),
    ("decay_fraction=1.5", "--decay_fraction=1.5 must be in (0, 1]"),
    ("device=gpu", "--device=gpu: choose auto, cpu, cuda"),
    ("backend=mpi", "--backend=mpi: choose nccl"),
    ("optimizer=muon --muon_momentum=1.5", "--muon_momentum=1.5 must be in [0, 1)"),
    ("optimizer=muon --max_lr=0", "--max_lr=0 with --optimizer=muon"),
    ("init_from=/no/such/ckpt.pt", "--init_from=/no/such/ckpt.pt: no such file or folder. Give a checkpoint"),
    ("init_from=/", "--init_from=/ is a folder with neither config.json (Hugging Face) nor extra.pt"),
])
def test_every_setting_is_checked_before_any_work(shards, tmp_path, setting, message):
    """Issue 20.6: a value out of range stops the run in one line before anything is built or
    written (before, --checkpoint_every=0 divided by zero after the first step and its evals)."""
    log_dir = str(tmp_path / "log")
    args = tiny_args(shards, log_dir) + [f"--{part}" for part in setting.split(" --")]
    text = fail(args, message)
    assert text.startswith("train_gpt.py: error: ") and "\n" not in text
    assert not os.path.exists(log_dir)


NUMERIC_SETTINGS = [f.name for f in dataclasses.fields(Settings) if f.type in (int, float, Optional[int], Optional[float])]
USED_WITH = dict(muon_lr=dict(optimizer="muon"), muon_momentum=dict(optimizer="muon"),  # where it does something
                 muon_weight_decay=dict(optimizer="muon"), attention_band=dict(attention="gpt3"))
# Two steps of one micro batch, no validation (and, as every tiny run, no timing of the CPU's
# matmul for MFU): ~0.3 s a run.
QUICK = dict(max_steps=2, warmup_steps=1, total_batch_size=4 * 32, val_every=0)
SPEED_ONLY = ("peak_flops",)  # given only to spare the timing; its default trains in tests/test_cli.py's step-line test


@pytest.fixture(scope="module")
def quick_run(shards, tmp_path_factory):
    """The settings of a QUICK run, which trains two finite steps."""
    log_dir = str(tmp_path_factory.mktemp("quick"))
    run(tiny_args(shards, log_dir, **QUICK))
    assert all(map(math.isfinite, train_losses(log_dir).values())) and len(train_losses(log_dir)) == 2
    return parse_settings(tiny_args(shards, log_dir, **QUICK))


@pytest.mark.parametrize("name", NUMERIC_SETTINGS)
def test_every_numeric_setting_at_0_minus_1_nan_and_inf_trains_or_stops_in_one_line(
        name, shards, tmp_path, quick_run, one_thread):
    """Issue 28.8, generated from Settings so that a setting added later is covered too: each value
    stops the run in one line naming the setting, before any step and before the log folder is
    made, or trains finite steps with that very value (seq_len=0 once trained as block_size). No
    setting means anything at -1, NaN or Inf. A value whose settings are the QUICK run's (up to
    SPEED_ONLY settings at their defaults, trained elsewhere) is not trained again."""
    base = {**QUICK, **USED_WITH.get(name, {})}
    for tokens, steps in SAME_THING:  # its other unit would make any value "the same thing twice"
        base.pop(steps if name == tokens else tokens if name == steps else None, None)
    for value in ("0", "-1", "nan", "inf"):
        log_dir = str(tmp_path / value)
        args = tiny_args(shards, log_dir, **base) + [f"--{name}={value}"]
        try:
            s = parse_settings(args)
            at_default = {k: getattr(quick_run, k) for k in SPEED_ONLY if getattr(s, k) == getattr(Settings(), k)}
            trained_already = dataclasses.replace(s, log_dir=quick_run.log_dir, **at_default) == quick_run
        except train_gpt.SettingsError:
            trained_already = False  # main() says why in one line
        try:
            if not trained_already:
                run(args)
        except SystemExit as e:
            line = str(e.code)
            assert line.startswith("train_gpt.py: error: ") and "\n" not in line, line
            assert f"--{name}" in line, line  # names the setting
            assert not os.path.exists(log_dir), line  # before any work
            continue
        assert value == "0", f"--{name}={value} was accepted"
        s = parse_settings(args)
        train_gpt.resolve_model_settings(s)
        assert getattr(s, name) == 0, f"--{name}=0 trained as {getattr(s, name)}"  # not silently another value
        if not trained_already:
            losses = [e for e in read_metrics(log_dir) if "train_loss" in e]
            assert len(losses) == 2 and all(math.isfinite(e["train_loss"]) and not e.get("skipped") for e in losses), \
                (name, losses)


def test_bad_values_stop_the_real_command_in_one_line(tmp_path):
    """Issue 28.8's reports, as a user meets them: --logit_softcap=inf trained NaN steps,
    --seq_len=0 became block_size, and --init_from of a missing file was found only once the log
    folder was made (and reported as "not a folder with config.json")."""
    cases = [("--logit_softcap=inf", "--logit_softcap must be a finite number, got inf"),
             ("--seq_len=0", "--seq_len must be positive, got 0 (or none: the model's block_size)"),
             ("--init_from=/no/such/file.pt", "--init_from=/no/such/file.pt: no such file or folder")]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train_gpt.py"), arg, "--log_dir=log"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arg, _ in cases]
    for proc, (arg, message) in zip(procs, cases):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and out == "" and err.startswith(f"train_gpt.py: error: {message}"), (arg, err)
        assert err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []  # no log folder, no run.lock


def test_a_token_setting_given_with_the_demo_wins_over_its_steps():
    """--help: a setting given with --demo wins; its max_steps and warmup_steps name the same
    things as max_tokens and warmup_tokens, so giving those replaces them."""
    s = parse_settings(["--demo", "--max_tokens=16384", "--warmup_tokens=8192"])
    assert (s.max_tokens, s.max_steps, s.warmup_tokens, s.warmup_steps) == (16384, None, 8192, None)
    train_gpt.resolve_model_settings(s)
    assert (s.max_tokens, s.warmup_tokens) == (16384, 8192)
    assert parse_settings(["--demo", "--max_steps=20"]).max_steps == 20
    with pytest.raises(train_gpt.SettingsError, match="name the same thing"):  # both given: still refused
        train_gpt.resolve_model_settings(parse_settings(["--demo", "--max_steps=20", "--max_tokens=16384"]))
