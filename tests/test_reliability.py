"""Never lose a run: each fault is caused here and the run must end with its newest good state
kept and a message that says what to do (issue 13). Tiny model, a few steps."""

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from support import checkpoint, run_guard
import model as model_module
import train_gpt
from conftest import ROOT, SIGNAL_AT, read_metrics, tiny_args, train_losses

STEPS = dict(max_steps=6, checkpoint_every=2, val_every=0)


def run(args):
    train_gpt.main(args)


def fail(args, *expected):
    with pytest.raises(SystemExit) as e:
        train_gpt.main(args)
    message = str(e.value.code)
    for text in expected:
        assert text in message, message
    return message


def log_text(log_dir):
    with open(os.path.join(log_dir, "log.txt")) as f:
        return f.read()


def steps_in(log_dir):
    return [step for step, _ in checkpoint.list_checkpoints(log_dir)]


def overwrite_middle(path, data=b"\x00\x11\x22\x33"):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(data)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory, one_thread):
    """6 uninterrupted steps."""
    log_dir = str(tmp_path_factory.mktemp("reference"))
    run(tiny_args(shards, log_dir, **STEPS))
    return log_dir


@pytest.fixture(scope="module")
def stopped_at_4(shards, tmp_path_factory, one_thread):
    """The same run stopped at step 4: checkpoints 2 and 4. Tests work on copies."""
    log_dir = str(tmp_path_factory.mktemp("stopped_at_4"))
    run(tiny_args(shards, log_dir, stop_step=4, **STEPS))
    assert steps_in(log_dir) == [4, 2]
    return log_dir


@pytest.fixture
def run_dir(stopped_at_4, tmp_path):
    log_dir = str(tmp_path / "run")
    shutil.copytree(stopped_at_4, log_dir)
    return log_dir


# ----------------------------------------------------------------------------------------------
# 1. another run's checkpoints; pruning

def test_a_new_run_in_a_used_log_dir_is_refused_with_the_choices(shards, run_dir, one_thread):
    def checkpoints():
        return {n: os.path.getmtime(os.path.join(run_dir, n)) for n in os.listdir(run_dir) if n.startswith("ckpt_")}

    before = checkpoints()
    message = fail(tiny_args(shards, run_dir, resume="off", **STEPS),
                   "already holds checkpoints", "--resume=auto", "another --log_dir", "rm -r")
    assert "ckpt_0000004.pt" in message
    fail(tiny_args(shards, run_dir, resume=os.path.join(run_dir, "ckpt_0000002.pt"), **STEPS),
         "already holds checkpoints")  # an older checkpoint of it: its newer ones would be overwritten
    assert checkpoints() == before


def test_prune_keeps_the_newest_good_checkpoint_and_gives_no_slot_to_unreadable_ones(tmp_path):
    log_dir = str(tmp_path)
    for step in (2, 4, 6):
        checkpoint.save_file({"step": step, "w": torch.ones(3)}, checkpoint.checkpoint_path(log_dir, step))
    os.mkdir(os.path.join(log_dir, "ckpt_0000099"))  # a stray unreadable folder
    with open(os.path.join(log_dir, "ckpt_0000050.pt"), "wb") as f:  # and a file without its checksum
        f.write(b"junk")
    checkpoint.prune(log_dir, keep=1, newest_step=6)
    assert steps_in(log_dir) == [99, 50, 6]  # the stray ones neither kept a slot nor were deleted
    assert not os.path.exists(os.path.join(log_dir, "ckpt_0000004.pt.sha256"))  # removed with its file


# ----------------------------------------------------------------------------------------------
# 2. verified checkpoints

def test_checksum_is_written_atomically_with_the_file_and_catches_overwritten_bytes(tmp_path):
    path = str(tmp_path / "ckpt_0000001.pt")
    checkpoint.save_file({"w": torch.randn(256, 256), "step": 1}, path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000001.pt", "ckpt_0000001.pt.sha256"]
    checkpoint.verify_file(path)
    overwrite_middle(path)
    with pytest.raises(checkpoint.CorruptCheckpoint, match="does not match the checksum"):
        checkpoint.load_file(path, verify=True)
    assert torch.load(path, weights_only=True)["step"] == 1  # torch alone would have loaded it


def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(shards, reference, run_dir, one_thread):
    overwrite_middle(os.path.join(run_dir, "ckpt_0000004.pt"))
    run(tiny_args(shards, run_dir, **STEPS))
    text = log_text(run_dir)
    assert "warning: checkpoint" in text and "ckpt_0000004.pt does not match the checksum" in text
    assert "resumed from" in text and "ckpt_0000002.pt at step 2" in text
    assert train_losses(run_dir) == train_losses(reference)  # nothing of the damage reached training
    # issue 28.6: metrics.jsonl was cut back to step 2, so steps 2 and 3, trained again, appear once
    assert [e["step"] for e in read_metrics(run_dir) if "train_loss" in e] == list(range(6))


def test_a_checkpoint_holding_nan_is_never_loaded_as_good(shards, reference, run_dir, one_thread):
    path = os.path.join(run_dir, "ckpt_0000004.pt")
    state = torch.load(path, weights_only=True)
    state["model"]["lm_head.weight"][3, 3] = float("nan")  # with a valid checksum: as an old version wrote it
    checkpoint.save_file(state, path)
    run(tiny_args(shards, run_dir, **STEPS))
    text = log_text(run_dir)
    assert "ckpt_0000004.pt holds NaN/Inf in" in text and "ckpt_0000002.pt at step 2" in text
    assert train_losses(run_dir) == train_losses(reference)


@pytest.fixture
def gloo_group(tmp_path):
    """A process group of one, as save_sharded needs."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_folder_manifest_catches_damaged_and_missing_files(tmp_path):
    """A sharded checkpoint as one process writes it (torch.distributed.checkpoint, gloo group of one)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        state = {"model": {"w": torch.randn(64, 64)}, "optimizer": {}, "step": 3}
        path = str(tmp_path / "ckpt_0000003")
        checkpoint.save_sharded(state, path, rank=0)
    finally:
        dist.destroy_process_group()
    assert checkpoint.verify_folder(path) is None
    shard = next(n for n in os.listdir(path) if n.endswith(".distcp"))
    overwrite_middle(os.path.join(path, shard))
    assert "does not match the checksum" in checkpoint.verify_folder(path)
    os.remove(os.path.join(path, shard))
    assert "missing" in checkpoint.verify_folder(path)
    assert not checkpoint.looks_intact(path)


def test_a_sharded_folder_is_fsynced_with_its_manifest_before_it_is_renamed(tmp_path, gloo_group, monkeypatch):
    """Otherwise a power loss could leave the final folder without its manifest's entry."""
    calls, real_replace, real_fsync_dir = [], os.replace, checkpoint._fsync_dir

    def replace(src, dst):
        calls.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    def fsync_dir(folder):
        calls.append(("fsync", str(folder)))
        real_fsync_dir(folder)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    monkeypatch.setattr(checkpoint, "_fsync_dir", fsync_dir)
    path = str(tmp_path / "ckpt_0000001")
    tmp = path + ".tmp"
    checkpoint.save_sharded({"model": {"w": torch.randn(8, 8)}, "optimizer": {}, "step": 1}, path, rank=0)
    manifest = next(i for i, c in enumerate(calls) if c[0] == "replace" and c[2] == os.path.join(tmp, checkpoint.MANIFEST))
    renamed = calls.index(("replace", tmp, path))
    assert ("fsync", tmp) in calls[manifest + 1:renamed], calls
    assert calls[renamed + 1:] == [("fsync", str(tmp_path))]  # then the new name itself
    assert checkpoint.verify_folder(path) is None


def test_a_failed_write_leaves_nothing_behind_and_names_the_disk(tmp_path):
    """A real write error from the kernel: RLIMIT_FSIZE makes writes past 64 KB fail (EFBIG), as
    a full disk makes them fail with ENOSPC."""
    path = str(tmp_path / "ckpt_0000001.pt")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))
    try:
        with pytest.raises(checkpoint.WriteFailed) as e:
            checkpoint.save_file({"w": torch.randn(512, 512)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert f"could not write checkpoint {path}" in str(e.value) and "mounted at" in str(e.value)
    assert "GB free" in str(e.value)
    assert os.listdir(tmp_path) == []  # no .tmp left


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom")  # a bug, raised from inside torch.save


def test_a_bug_while_saving_is_raised_as_it_is_not_as_a_failed_write(tmp_path):
    with pytest.raises(RuntimeError, match="^boom$") as e:
        checkpoint.save_file({"w": torch.ones(3), "bad": Unpicklable()}, str(tmp_path / "ckpt_0000001.pt"))
    assert not isinstance(e.value, checkpoint.WriteFailed)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("code, where, said, advice", [
    (errno.ENOSPC, "write", "the disk is full", "Free space on that disk"),
    (errno.EDQUOT, "write", "disk quota is used up", "within your quota"),
    (errno.EIO, "write", "OSError: [Errno 5]", "may be failing"),
    (errno.EACCES, "open", "PermissionError: [Errno 13]", "write permission"),
    (errno.EROFS, "open", "OSError: [Errno 30]", "read-only"),
])
def test_a_failed_write_is_named_with_advice_that_fits_it(shards, tmp_path, monkeypatch, one_thread, code, where,
                                                          said, advice):
    """torch.save reports a failed write as a RuntimeError holding the OSError; open raises it
    as it is. Only a full disk or quota gets "free space" advice."""
    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if where == "write":
        monkeypatch.setattr(checkpoint._HashingWriter, "write", lambda self, data: failing())
    else:
        monkeypatch.setattr(checkpoint, "open", failing, raising=False)  # checkpoint.py's open alone
    log_dir = str(tmp_path / "run")
    message = fail(tiny_args(shards, log_dir, max_steps=1, warmup_steps=0), "could not write checkpoint", said,
                   advice, "mounted at", "then resume")
    if code not in (errno.ENOSPC, errno.EDQUOT):
        assert "disk is full" not in message and "Free space" not in message and "with room" not in message
    assert steps_in(log_dir) == []


# A log_dir on a disk of its own, in a mount namespace of its own (unshare: root, or a user
# namespace), so that the faults are the kernel's: a read-only mount, then a full disk. The advice
# of each is followed in turn (remount it read-write, free space) and the third attempt trains.
# python -c DISK_FAULTS RESULTS DISK ARGS...: RESULTS gets each attempt's SystemExit text.
DISK_FAULTS = """
import json, os, subprocess, sys
import train_gpt
results, disk, args = sys.argv[1], sys.argv[2], sys.argv[3:]
log_dir = os.path.join(disk, "log")
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", disk], check=True)
os.mkdir(log_dir)
subprocess.run(["dd", "if=/dev/zero", "of=" + os.path.join(disk, "fill"), "bs=1M"], capture_output=True)
subprocess.run(["mount", "--bind", "-o", "ro", log_dir, log_dir], check=True)

def attempt():
    try:
        train_gpt.main(args + ["--log_dir=" + log_dir])
    except SystemExit as e:
        return str(e.code)
    return sorted(os.listdir(log_dir))

said = [attempt()]
subprocess.run(["umount", log_dir], check=True)  # remount it read-write
said.append(attempt())
os.remove(os.path.join(disk, "fill"))  # free space
said.append(attempt())
with open(results, "w") as f:
    json.dump(said, f)
"""


def test_a_read_only_or_full_log_dir_at_start_is_one_line_whose_advice_works(shards, tmp_path):
    """Issue 28.4: both ended in an OSError traceback from the lock (opening run.lock on the
    read-only disk; writing its holder once the disk is full, as creating the empty file needs
    no room)."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -rm (mount namespaces) to mount a small disk")
    disk, results = tmp_path / "disk", tmp_path / "results.json"
    disk.mkdir()
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", DISK_FAULTS, str(results), str(disk),
                           *[a for a in tiny_args(shards, "-", max_steps=1, warmup_steps=0, val_every=0)
                             if not a.startswith("--log_dir=")]],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    read_only, full, freed = json.loads(results.read_text())
    log_dir = f"--log_dir={disk}/log"
    assert read_only.startswith(f"train_gpt.py: error: cannot write in {log_dir}: [Errno 30] Read-only file system")
    assert "remount it read-write" in read_only and "\n" not in read_only
    assert full.startswith(f"train_gpt.py: error: cannot write in {log_dir}: [Errno 28] No space left on device")
    assert "Free space on that disk" in full and "\n" not in full
    assert freed == ["ckpt_0000001.pt", "ckpt_0000001.pt.sha256", "log.txt", "metrics.jsonl", "run.lock"]


def test_a_failed_sharded_write_names_the_os_error(tmp_path, gloo_group):
    """DCP gathers each rank's error by pickling it, which drops the OSError that torch.save
    chains to its RuntimeError; save_sharded's writer raises the OSError itself (EFBIG here, from
    RLIMIT_FSIZE as in the test above)."""
    path = str(tmp_path / "ckpt_0000001")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))
    try:
        with pytest.raises(checkpoint.WriteFailed) as e:
            checkpoint.save_sharded({"model": {"w": torch.randn(512, 512)}, "optimizer": {}, "step": 1}, path, rank=0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert "File too large" in str(e.value) and "unexpected pos" not in str(e.value), str(e.value)
    assert e.value.errno == errno.EFBIG and "CheckpointException" not in str(e.value)
    assert not os.path.exists(path) and not os.path.exists(path + ".tmp")


def test_a_bug_while_saving_shards_is_raised_as_it_is(tmp_path, gloo_group):
    path = str(tmp_path / "ckpt_0000001")
    with pytest.raises(BaseException) as e:
        checkpoint.save_sharded({"model": {"w": torch.ones(3), "bad": Unpicklable()}, "optimizer": {}, "step": 1},
                                path, rank=0)
    assert type(e.value).__name__ == "CheckpointException" and "boom" in str(e.value)  # DCP's, naming the rank
    assert not os.path.exists(path + ".tmp")


def test_a_checkpoint_without_its_checksum_file_loads_only_when_named(shards, run_dir, one_thread):
    """As a version before checksums wrote it: loaded, with a warning, when given as --resume=PATH."""
    newest = os.path.join(run_dir, "ckpt_0000004.pt")
    os.remove(newest + checkpoint.CHECKSUM_SUFFIX)
    run(tiny_args(shards, run_dir, resume=newest, **STEPS))
    text = log_text(run_dir)
    assert "ckpt_0000004.pt has no checksum" in text and "loaded it unverified" in text
    assert "resumed from " + newest in text and steps_in(run_dir)[0] == 6


# ----------------------------------------------------------------------------------------------
# 3. the NaN guard and its advice

def test_weights_made_nonfinite_by_an_update_stop_the_run_before_any_save(shards, tmp_path, one_thread):
    log_dir = str(tmp_path)
    fail(tiny_args(shards, log_dir, max_lr=1e39, **STEPS), "step 0's update made the weights NaN/Inf",
         "lower --max_lr")
    assert steps_in(log_dir) == []


def test_lower_lr_and_resume_works_as_the_advice_says(shards, run_dir, one_thread):
    fail(tiny_args(shards, run_dir, max_lr=1e39, **STEPS), "step 4's update made the weights NaN/Inf")
    assert steps_in(run_dir) == [4, 2]  # untouched, and finite
    run(tiny_args(shards, run_dir, max_lr=1e-3, **STEPS))  # the advice, as written
    assert "resumed from" in log_text(run_dir) and steps_in(run_dir)[0] == 6
    weights = checkpoint.load_file(os.path.join(run_dir, "ckpt_0000006.pt"), verify=True)["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_streak_of_nan_steps_sets_aside_the_weights_it_came_from_and_the_advice_trains_on(shards, run_dir,
                                                                                              one_thread):
    """Issue 28.1: at --max_lr=1e4 step 4's update is finite but breaks the weights (no NaN in
    them), and every step from them has a NaN/Inf loss or gradient. Before, checkpoints written
    during that streak held the broken weights and pruned the good ones (keep 1), and the advice
    resumed from one of them, failing the same way. Now none is written from weights a step
    failed from, the one written from them before the streak (step 5) is set aside, pruning kept
    the one before it, and the advice, followed with a lower LR, trains to the end."""
    args = dict(STEPS, max_steps=10, checkpoint_every=1, keep_checkpoints=1)
    message = fail(tiny_args(shards, run_dir, max_lr=1e4, max_bad_steps=3, **args),
                   "3 steps in a row had a NaN/Inf loss or gradient (steps 5 to 7)", "made by step 4's update",
                   f"moved to {run_dir}/distrusted/ckpt_0000005.pt", "Lower --max_lr")
    assert steps_in(run_dir) == [4] and sorted(os.listdir(os.path.join(run_dir, "distrusted"))) == [
        "ckpt_0000005.pt", "ckpt_0000005.pt.sha256"]
    resume_from = re.search(r"it resumes from (\S+), the newest checkpoint before them", message).group(1)
    run(tiny_args(shards, run_dir, **args))  # the advice: a lower --max_lr (TINY's 3e-3), --resume=auto
    assert f"resumed from {resume_from} at step 4" in log_text(run_dir) and steps_in(run_dir) == [10, 9]
    weights = checkpoint.load_file(os.path.join(run_dir, "ckpt_0000010.pt"), verify=True)["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(10)) and losses[9] < losses[0]
    assert not any(e.get("skipped") for e in read_metrics(run_dir))  # cut back to step 4 on resume (28.6)


def test_a_resumed_run_gets_a_fresh_allowance_of_bad_steps(shards, run_dir, monkeypatch, one_thread):
    """A checkpoint saved within a streak of NaN steps: the resumed run must not stop at once."""
    path = os.path.join(run_dir, "ckpt_0000004.pt")
    state = torch.load(path, weights_only=True)
    state["bad_steps"] = 2
    checkpoint.save_file(state, path)
    real_forward, calls = model_module.GPT.forward, [0]

    def forward(self, *args, **kwargs):  # step 4's first micro batch gives a NaN loss
        loss = real_forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            loss = loss * float("nan") if calls[0] == 1 else loss
        return loss

    monkeypatch.setattr(model_module.GPT, "forward", forward)
    run(tiny_args(shards, run_dir, max_bad_steps=3, **STEPS))
    assert steps_in(run_dir)[0] == 6 and "skipped" in log_text(run_dir)


# ----------------------------------------------------------------------------------------------
# 4. none loads

def test_checkpoints_that_all_fail_to_load_stop_the_run(shards, run_dir, one_thread):
    for step in (2, 4):
        overwrite_middle(os.path.join(run_dir, f"ckpt_{step:07d}.pt"))
    fail(tiny_args(shards, run_dir, **STEPS), "holds 2 checkpoints and none could be loaded",
         "another --log_dir", "rm -r")
    assert steps_in(run_dir) == [4, 2]  # not started over on top of them


def test_resume_from_a_log_folder(shards, run_dir, tmp_path, one_thread):
    new_dir = str(tmp_path / "new")
    run(tiny_args(shards, new_dir, resume=run_dir, **STEPS))
    assert "ckpt_0000004.pt at step 4" in log_text(new_dir) and steps_in(new_dir) == [6]
    os.makedirs(tmp_path / "empty")
    fail(tiny_args(shards, str(tmp_path / "other"), resume=str(tmp_path / "empty"), **STEPS),
         "is a folder without checkpoints")


# ----------------------------------------------------------------------------------------------
# 5. SIGINT / SIGTERM / SIGHUP / SIGQUIT


def test_ctrl_c_finishes_the_step_saves_and_prints_one_line(shards, reference, tmp_path):
    log_dir = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT, "SIGINT", "0", "5",  # mid step 2
                           *tiny_args(shards, log_dir, **STEPS)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "stopped by SIGINT (Ctrl-C) at step 3: saved" in proc.stderr
    assert steps_in(log_dir) == [3, 2]
    run(tiny_args(shards, log_dir, **STEPS))
    assert train_losses(log_dir) == train_losses(reference)


def test_signal_rules_before_training_repeated_sigterm_and_a_second_ctrl_c():
    previous = signal.getsignal(signal.SIGTERM)
    with run_guard.StopOnSignal() as stop:
        with pytest.raises(run_guard.Stopped) as e:  # nothing to save yet: stop at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert e.value.code == 143 and "before training started" in e.value.message
        stop.armed = True
        for _ in range(2):  # the second SIGTERM is ignored
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert stop.agreed()
        with pytest.raises(run_guard.Stopped) as e:  # an impatient Ctrl-C: quit without saving
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert e.value.code == 130 and "quit without saving" in e.value.message
        # a stop while the NaN guard distrusts the weights: nothing was saved, and it says so
        assert "no checkpoint written" in stop.stopped(3, None).message
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.parametrize("name", ["SIGTERM", "SIGQUIT"])
def test_a_stopping_step_saves_before_its_evaluations_then_stops(shards, reference, tmp_path, monkeypatch, capsys,
                                                                 one_thread, name):
    """A signal mid step 2, and step 3 has a validation due: the checkpoint is written first and
    the validation skipped, as it could outlast the grace period (torchrun: 30 s). SIGQUIT, which
    torchrun forwards too, takes SIGTERM's path. The resumed run trains as if nothing happened."""
    log_dir, signum = str(tmp_path / "run"), getattr(signal, name)
    args = tiny_args(shards, log_dir, **dict(STEPS, val_every=3))
    real_forward, calls = model_module.GPT.forward, [0]

    def forward(self, *a, **kw):
        if self.training:
            calls[0] += 1
            if calls[0] == 5:  # step 2's first micro batch
                os.kill(os.getpid(), signum)
        return real_forward(self, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(model_module.GPT, "forward", forward)
        with pytest.raises(SystemExit) as e:
            run(args)
    assert e.value.code == 128 + signum
    assert f"stopped by {name} at step 3: saved {log_dir}/ckpt_0000003.pt" in capsys.readouterr().err
    text = log_text(log_dir)
    assert "step     3 | val loss" not in text  # neither before the save nor after it
    assert f"saved checkpoint {log_dir}/ckpt_0000003.pt\nstep     3 | validation skipped: stopping on a signal" in text
    assert steps_in(log_dir) == [3, 2]
    run(args)
    assert train_losses(log_dir) == train_losses(reference)


def test_sighup_names_its_signal_and_stays_ignored_under_nohup():
    previous = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as a terminal starts it (the suite may run under nohup)
        with run_guard.StopOnSignal():
            with pytest.raises(run_guard.Stopped) as e:
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(5)
            assert e.value.code == 129 and "stopped by SIGHUP before training started" in e.value.message
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts a process
        with run_guard.StopOnSignal():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGQUIT) not in (signal.SIG_IGN, signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_second_run_on_the_same_log_dir_is_refused_until_the_first_dies(shards, tmp_path, one_thread):
    log_dir = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom support import run_guard\n"
                               "with run_guard.log_dir_lock(sys.argv[1]) as lock:\n    lock.claim(); print('locked', flush=True); time.sleep(300)",
                               log_dir], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fail(tiny_args(shards, log_dir, max_steps=1, warmup_steps=0), "is in use by another run (pid", "another --log_dir")
    finally:
        holder.kill()  # SIGKILL: no clean-up; the kernel releases the lock
        holder.wait()
    run(tiny_args(shards, log_dir, max_steps=1, warmup_steps=0))
    assert steps_in(log_dir) == [1]


# ----------------------------------------------------------------------------------------------
# Issue 20: a refused run changes nothing; a resume trains the settings given now; true advice

def folder_state(folder):
    """Every file under folder with its size, modification time and content hash."""
    import hashlib
    state = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                state[os.path.relpath(path, folder)] = (os.path.getsize(path), os.stat(path).st_mtime_ns,
                                                        hashlib.sha256(f.read()).hexdigest())
    return state


def test_a_refused_run_changes_nothing_in_the_old_folder(shards, run_dir, tmp_path, monkeypatch, one_thread):
    """Issue 20.4: every refusal that can happen at start comes before W&B opens (it would start a
    new W&B run and overwrite log_dir/wandb_run_id) and before anything is logged to log.txt."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    before = folder_state(run_dir)
    tracked = dict(wandb_project="tests", tensorboard=True)
    fail(tiny_args(shards, run_dir, resume="off", **tracked, **STEPS), "already holds checkpoints")
    fail(tiny_args(shards, run_dir, resume=os.path.join(run_dir, "ckpt_0000002.pt"), **tracked, **STEPS),
         "already holds checkpoints")
    fail(tiny_args(shards, run_dir, n_layer=3, **tracked, **STEPS), "the checkpoint's model has n_layer=2")
    fail(tiny_args(shards, run_dir, optimizer="muon", **tracked, **STEPS), "trained with --optimizer=adamw")
    assert folder_state(run_dir) == before
    assert not os.path.exists(tmp_path / "wandb")  # no W&B run was started either


@pytest.fixture(scope="module")
def two_steps(shards, tmp_path_factory, one_thread):
    """For each optimizer, a run stopped after 2 steps (its checkpoint at step 2)."""
    folders = {}
    for optimizer in ("adamw", "muon"):
        folders[optimizer] = str(tmp_path_factory.mktemp(f"two_steps_{optimizer}"))
        run(tiny_args(shards, folders[optimizer], optimizer=optimizer, stop_step=2, **STEPS))
    return folders


@pytest.mark.parametrize("optimizer, setting, value, part, field, expected", [
    ("adamw", "weight_decay", 0.02, None, "weight_decay", 0.02),
    ("muon", "weight_decay", 0.02, "adamw", "weight_decay", 0.02),
    ("muon", "muon_lr", 0.05, "muon", "lr_scale", 0.05 / 3e-3),
    ("muon", "muon_momentum", 0.8, "muon", "momentum", 0.8),
    ("muon", "muon_weight_decay", 0.1, "muon", "weight_decay", 0.1),
    ("muon", "muon_adjust_lr", "match_rms_adamw", "muon", "adjust_lr_fn", "match_rms_adamw"),
])
def test_a_resume_trains_the_optimizer_settings_given_now(shards, two_steps, tmp_path, optimizer, setting, value,
                                                          part, field, expected, one_thread):
    """Issue 20.2: optimizer.load_state_dict restores every param group's fields as saved, so a
    setting given anew on resume did nothing while log.txt, W&B and the next checkpoint said it
    did. The resumed steps must use it (the next checkpoint's groups are those that stepped), and
    the log names the change."""
    log_dir = str(tmp_path / "run")
    shutil.copytree(two_steps[optimizer], log_dir)
    also = dict(muon_lr=train_gpt.Settings.muon_lr) if setting == "muon_adjust_lr" else {}  # its LR is the user's to give
    run(tiny_args(shards, log_dir, optimizer=optimizer, stop_step=3, **{setting: value}, **also, **STEPS))
    saved = torch.load(os.path.join(log_dir, "ckpt_0000003.pt"), weights_only=True)["optimizer"]
    groups = (saved[part] if part else saved)["param_groups"]
    assert groups[0][field] == pytest.approx(expected) if isinstance(expected, float) else groups[0][field] == expected
    text = log_text(log_dir)
    assert "resumed from" in text and "settings changed since the checkpoint (these train now):" in text
    assert f"{setting} " in text.split("settings changed since the checkpoint")[1].splitlines()[0]


def test_the_advice_for_a_checkpoint_without_its_checksum_works_as_written(shards, reference, run_dir, one_thread):
    """Issue 20.7: the advice used to be --resume=PATH, which the one-run-per-log_dir check refuses
    for any checkpoint but the newest; it now names the commands that work, and they do."""
    overwrite_middle(os.path.join(run_dir, "ckpt_0000004.pt"))
    os.remove(os.path.join(run_dir, "ckpt_0000002.pt" + checkpoint.CHECKSUM_SUFFIX))
    message = fail(tiny_args(shards, run_dir, **STEPS), "none could be loaded", "lacks its checksum file")
    commands = message.split("to load it unverified, move the newer ones aside (")[1].split("), then give ")
    subprocess.run(commands[0], shell=True, check=True)
    path = commands[1].rstrip(".").removeprefix("--resume=")
    assert path == os.path.join(run_dir, "ckpt_0000002.pt")
    run(tiny_args(shards, run_dir, resume=path, **STEPS))
    assert f"resumed from {path} at step 2" in log_text(run_dir)
    assert train_losses(run_dir) == train_losses(reference)
