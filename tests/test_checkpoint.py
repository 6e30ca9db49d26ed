import functools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from support import checkpoint, resume, runtime
import model as model_module
import train_gpt
from conftest import ROOT, FusedAttention, read_metrics, tiny_args, train_losses


def final_weights(log_dir, step):
    return torch.load(os.path.join(log_dir, f"ckpt_{step:07d}.pt"), weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    """20 steps without interruption: the reference."""
    log_dir = str(tmp_path_factory.mktemp("straight"))
    train_gpt.main(tiny_args(shards, log_dir, max_steps=20))
    return log_dir


def test_resume_is_exact(shards, straight, tmp_path):
    log_dir = str(tmp_path)
    train_gpt.main(tiny_args(shards, log_dir, max_steps=20, stop_step=10))
    assert max(train_losses(log_dir)) == 9
    before = read_metrics(log_dir)
    train_gpt.main(tiny_args(shards, log_dir, max_steps=20))  # --resume=auto is the default
    assert read_metrics(log_dir)[:len(before)] == before  # appended to, not rewritten
    assert len(read_metrics(log_dir)) > len(before)
    assert train_losses(log_dir) == train_losses(straight)  # every loss, bit for bit
    assert_same_weights(final_weights(log_dir, 20), final_weights(straight, 20))
    with open(os.path.join(log_dir, "log.txt")) as f:
        assert "resumed from" in f.read()


def test_a_checkpoint_of_the_fused_q_k_v_resumes_with_the_uninterrupted_runs_losses(shards, straight, tmp_path,
                                                                                 monkeypatch):
    """A run of the code before attention's q, k and v were split (its attention, GPT-2's one c_attn,
    put back for the first 10 steps) writes a checkpoint of that layout: the model's c_attn and
    AdamW's moments of it, numbered as its optimizer numbered them. Today's model resumes from it,
    split as it loads, and trains the losses of the run that never stopped (today's model from the
    start) to float32 rounding: the fused product rounds otherwise than three."""
    log_dir = str(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(model_module, "CausalSelfAttention", FusedAttention)
        train_gpt.main(tiny_args(shards, log_dir, max_steps=20, stop_step=10))
    old = torch.load(os.path.join(log_dir, "ckpt_0000010.pt"), weights_only=True)
    assert "transformer.h.0.attn.c_attn.weight" in old["model"] and not any(".c_q." in k for k in old["model"])
    assert len(old["optimizer"]["state"]) == len(final_weights(straight, 20)) - 1 - 2 * 2 * 2  # tied head; 2 layers
    train_gpt.main(tiny_args(shards, log_dir, max_steps=20))
    with open(os.path.join(log_dir, "log.txt")) as f:
        assert "q, k and v fused in one c_attn" in f.read()
    losses, reference = train_losses(log_dir), train_losses(straight)
    assert sorted(losses) == sorted(reference) == list(range(20))
    worst = max(abs(losses[step] - reference[step]) / reference[step] for step in reference)
    assert worst < 1e-6, worst


def test_checkpoint_is_plain_data_with_everything_to_resume(straight):
    ckpt = torch.load(os.path.join(straight, "ckpt_0000020.pt"), weights_only=True)
    # every key train_run's resume reads (bad_steps too, though a resumed session restarts it at 0)
    assert {"model", "optimizer", "step", "tokens_seen", "bad_steps", "val_loss", "data", "rng", "model_config",
            "settings"} <= set(ckpt)
    assert ckpt["step"] == 20 and ckpt["settings"]["max_steps"] == 20 and ckpt["settings"]["optimizer"] == "adamw"
    assert ckpt["tokens_seen"] == 20 * 4 * 32 * 2 and ckpt["bad_steps"] == 0  # 20 steps of 256 tokens, no NaN
    assert ckpt["val_loss"] == [e["val_loss"] for e in read_metrics(straight) if "val_loss" in e][-1]
    assert ckpt["model_config"]["n_layer"] == 2 and {"epoch", "position", "seed", "T"} <= set(ckpt["data"])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert len(ckpt["rng"]) == 1 and {"torch", "numpy", "python"} <= set(ckpt["rng"][0])  # one per rank


def test_each_rank_restores_its_own_rng_state():
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(checkpoint.rng_state(torch.device("cpu")))
    notes = []
    rt = runtime.Runtime(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"), amp_dtype=None, is_main=False)
    resume.restore_rng_state(states, rt, notes.append)
    assert torch.equal(torch.get_rng_state(), states[1]["torch"]) and notes == []
    resume.restore_rng_state(states[:1], rt, notes.append)  # written by one process
    assert torch.equal(torch.get_rng_state(), states[1]["torch"]) and "start theirs afresh" in notes[0]


def test_keep_last_k(shards, tmp_path):
    train_gpt.main(tiny_args(shards, str(tmp_path), max_steps=8, checkpoint_every=2, keep_checkpoints=2))
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [8, 6]


def test_corrupt_checkpoint_falls_back_under_auto(shards, straight, tmp_path):
    log_dir = str(tmp_path)
    train_gpt.main(tiny_args(shards, log_dir, max_steps=20, stop_step=15))  # checkpoints at 10 and 15
    newest = os.path.join(log_dir, "ckpt_0000015.pt")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with pytest.raises(SystemExit, match="truncated"):
        train_gpt.main(tiny_args(shards, log_dir, max_steps=20, resume=newest))
    train_gpt.main(tiny_args(shards, log_dir, max_steps=20))
    with open(os.path.join(log_dir, "log.txt")) as f:
        text = f.read()
    assert "truncated" in text and "resumed from" in text and "ckpt_0000010.pt" in text
    assert train_losses(log_dir) == train_losses(straight)


def test_mismatched_checkpoint_names_the_setting(shards, straight, tmp_path):
    with pytest.raises(SystemExit, match="n_layer=2.*n_layer"):
        train_gpt.main(tiny_args(shards, straight, max_steps=30, n_layer=3))
    with pytest.raises(SystemExit, match="seq_len"):
        train_gpt.main(tiny_args(shards, straight, max_steps=30, seq_len=16))


SLOW_SAVE = """
import sys, time, torch
import train_gpt
real_save = torch.save
def slow_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    if obj.get("step", 0) >= 10:  # the second checkpoint: written, not yet renamed
        open(sys.argv[1], "w").close()
        time.sleep(60)
torch.save = slow_save
train_gpt.main(sys.argv[2:])
"""


def test_sigkill_during_checkpoint_write_leaves_the_previous_one(shards, straight, tmp_path):
    log_dir = str(tmp_path / "run")
    flag = str(tmp_path / "writing")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, flag, *tiny_args(shards, log_dir, max_steps=20)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(flag) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert os.path.exists(flag), "the run never reached its second checkpoint"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(".tmp" in n for n in os.listdir(log_dir))  # the half-written file is there...
    assert [s for s, _ in checkpoint.list_checkpoints(log_dir)] == [5]  # ...but not as a checkpoint
    train_gpt.main(tiny_args(shards, log_dir, max_steps=20))
    assert train_losses(log_dir) == train_losses(straight)
    assert not any(".tmp" in n for n in os.listdir(log_dir))


def nan_at(calls, monkeypatch):
    """Make the model's training loss NaN on the given training forward calls (counted from 0)."""
    real_forward = model_module.GPT.forward
    count = {"n": 0}

    def forward(self, *args, **kwargs):
        loss = real_forward(self, *args, **kwargs)
        if self.training:
            if count["n"] in calls:
                loss = loss * float("nan")
            count["n"] += 1
        return loss

    monkeypatch.setattr(model_module.GPT, "forward", forward)


def test_nan_step_is_skipped_and_logged(shards, tmp_path, monkeypatch):
    nan_at({6}, monkeypatch)  # 2 micro steps a step: step 3's first micro batch
    train_gpt.main(tiny_args(shards, str(tmp_path), max_steps=10))
    events = read_metrics(str(tmp_path))
    skipped = [e for e in events if e.get("skipped")]
    assert [e["step"] for e in skipped] == [3]
    assert sorted(train_losses(str(tmp_path))) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    weights = final_weights(str(tmp_path), 10)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_repeated_nans_stop_the_run_and_keep_the_good_checkpoint(shards, tmp_path, monkeypatch):
    nan_at(set(range(12, 1000)), monkeypatch)  # every step from step 6 on
    with pytest.raises(SystemExit, match="3 steps in a row had a NaN.*it resumes from .*ckpt_0000005.pt"):
        train_gpt.main(tiny_args(shards, str(tmp_path), max_steps=20, max_bad_steps=3))
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [5]
    assert all(torch.isfinite(w).all() for w in final_weights(str(tmp_path), 5).values())


def test_compiled_training_saves_clean_names_and_resumes(shards, straight, tmp_path, monkeypatch):
    """torch.compile wraps the model (_orig_mod.); checkpoints must not carry that name. Compiled
    with aot_eager (dynamo's and AOTAutograd's graphs, run eagerly): inductor's C++ builds cost this
    CPU seconds; inductor runs on the GPU (tools/gpu_check.sh)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    log_dir = str(tmp_path)
    train_gpt.main(tiny_args(shards, log_dir, max_steps=20, stop_step=10, compile=True))
    saved = torch.load(os.path.join(log_dir, "ckpt_0000010.pt"), weights_only=True)["model"]
    assert set(saved) == set(final_weights(straight, 20))
    train_gpt.main(tiny_args(shards, log_dir, max_steps=20))  # resumed without compile
    losses, reference = train_losses(log_dir), train_losses(straight)
    for step in reference:  # compiled kernels round differently: equal to fp32 rounding
        assert losses[step] == pytest.approx(reference[step], abs=1e-4)
