"""torchrun on the CPU (gloo): DDP, two 'nodes' on loopback, FSDP, failures and restarts. Each run
is a real torchrun job of 2 processes on a tiny model, compared with one process; runs that only
train (or resume) share one job (runs_in_one_job), a fault and its resume never do."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from support.runtime import free_port

from support import checkpoint
from conftest import ROOT, SIGNAL_AT, tiny_args, train_losses

STEPS = dict(max_steps=10, checkpoint_every=5, val_every=5)
CRASH = """
import os, sys
import model, train_gpt
real_forward, calls = model.GPT.forward, [0]
def forward(self, *args, **kwargs):
    if self.training:
        calls[0] += 1
        if os.environ["RANK"] == "1" and calls[0] == 7 and not os.path.exists(sys.argv[1]):
            open(sys.argv[1], "w").close()
            os._exit(3)  # a hard crash of one rank in the middle of step 6
    return real_forward(self, *args, **kwargs)
model.GPT.forward = forward
train_gpt.main(sys.argv[2:])
"""
SLOW = """
import sys, time
import model, train_gpt
real_forward = model.GPT.forward
def forward(self, *args, **kwargs):
    if self.training:
        time.sleep(0.3)  # steps slow enough to be signalled mid-run; the numbers are unchanged
    return real_forward(self, *args, **kwargs)
model.GPT.forward = forward
train_gpt.main(sys.argv[1:])
"""


def start(cmd, env=None):
    # A session of its own: on timeout or failure the whole process tree is killed, ports freed.
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            env=dict(env or os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))


def descendants(pid):
    """Every process below pid. torchrun starts each worker in a session of its own, so killing
    torchrun's process group would leave them running."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def finish(proc, timeout=180):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            for pid in [proc.pid, *descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


def torchrun(args, nproc=2, extra=(), script=("train_gpt.py",), timeout=180, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *extra, *script, *args]
    code, out = finish(start(cmd, env), timeout)
    return code, out


def run_ok(args, **kwargs):
    code, out = torchrun(args, **kwargs)
    assert code == 0, out[-3000:]
    return out


# Runs train_gpt.main once for each argument list of the JSON in argv[1], one after another in one
# process group, and prints their exit codes: one job for several runs spares the process starts
# (each torchrun worker imports torch: seconds on 2 cores). The group is kept between runs (destroyed
# and made again, a group's name would be reused, which DTensor's caches still hold for the meshes of
# the run before: equal meshes, other groups). With "then SCRIPT ARGS..." in argv[2:], SCRIPT runs
# after them (in this namespace, its arguments in sys.argv[4:]). COMPILE_BACKEND in the environment
# is the backend torch.compile uses in the job (aot_eager: dynamo's and AOTAutograd's graphs, run
# eagerly, without inductor's C++ builds, which take seconds on this CPU).
RUNS_IN_ONE_JOB = r"""
import functools, gc, json, os, sys
import torch, torch.distributed as dist
import train_gpt
from support import runtime
if os.environ.get("COMPILE_BACKEND"):
    torch.compile = functools.partial(torch.compile, backend=os.environ["COMPILE_BACKEND"])
destroy, init = dist.destroy_process_group, runtime.init_process_group
dist.destroy_process_group = lambda group=None: None
runtime.init_process_group = lambda *args: None if dist.is_initialized() else init(*args)
codes = []
for args in json.loads(sys.argv[1]):
    try:
        train_gpt.main(args)
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code)
if os.environ["RANK"] == "0":
    print("EXIT CODES " + json.dumps(codes), flush=True)
if sys.argv[2:3] == ["then"]:
    exec(open(sys.argv[3]).read())
gc.collect()
destroy()
"""


def runs_in_one_job(runs, tmp_path, nproc=2, then=(), compile_backend=None):
    """One torchrun job of nproc processes that trains each of runs (argument lists) in turn
    (RUNS_IN_ONE_JOB), then runs the script then[0] with arguments then[1:], if given; returns the
    runs' exit codes and the job's output. Resuming in the job that wrote the checkpoint still
    tests the resume: each run builds its model, optimizer, data and RNG state anew."""
    script = tmp_path / "runs_in_one_job.py"
    script.write_text(RUNS_IN_ONE_JOB)
    env = dict(os.environ, COMPILE_BACKEND=compile_backend) if compile_backend else None
    code, out = torchrun([json.dumps(runs), *(["then", *then] if then else [])], nproc=nproc,
                         script=(str(script),), timeout=300, env=env)
    assert code == 0, out[-3000:]
    tag = "EXIT CODES "
    return json.loads(next(line for line in out.splitlines() if line.startswith(tag))[len(tag):]), out


@pytest.fixture
def crash_script(tmp_path):
    path = tmp_path / "crash_once.py"
    path.write_text(CRASH)
    return str(path)


def weights(log_dir, step=10):
    return torch.load(checkpoint.checkpoint_path(log_dir, step), weights_only=True)["model"]


def assert_close_runs(a, b, atol=1e-5):
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(10))
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=atol), step


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory):
    """One process, 2 micro steps of 4 sequences: the reference."""
    import train_gpt
    log_dir = str(tmp_path_factory.mktemp("single"))
    train_gpt.main(tiny_args(shards, log_dir, **STEPS))
    return log_dir


@pytest.fixture(scope="module")
def two_rank_runs(shards, tmp_path_factory):
    """Three runs of 2 processes in one job (two process starts spared), for the tests below: DDP,
    1 micro step of 4 sequences a rank (the same 8 sequences a step as `single`); DDP stopped at
    step 5; FSDP2 with unsharded accumulation, 2 micro steps of 2 sequences a rank."""
    folder = tmp_path_factory.mktemp("two_rank_runs")
    dirs = {name: str(folder / name) for name in ("ddp", "ddp_stopped_at_5", "fsdp_unsharded")}
    codes, out = runs_in_one_job([
        tiny_args(shards, dirs["ddp"], **STEPS),
        tiny_args(shards, dirs["ddp_stopped_at_5"], stop_step=5, **STEPS),
        tiny_args(shards, dirs["fsdp_unsharded"], fsdp=True, micro_batch_size=2, fsdp_unsharded_accumulation=True,
                  **STEPS)], folder)
    assert codes == [0, 0, 0] and "DDP" in out and "x 2" in out, (codes, out[-3000:])
    return dirs


@pytest.fixture(scope="module")
def ddp(two_rank_runs):
    return two_rank_runs["ddp"]


def test_ddp_equals_one_process(single, ddp):
    assert_close_runs(single, ddp)
    wa, wb = weights(single), weights(ddp)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in wb)


# GPT-3's attention pattern on TINY (2 layers of 32 positions: layer 1 banded to the last 8), and the
# modern GPT's options (--arch=modern: rotary positions, QK-norm, ReLU², untied head, soft-cap, ...).
BEYOND_GPT2 = dict(attention="gpt3", attention_band=8, arch="modern")


def test_banded_attention_and_the_modern_bundle_under_ddp_and_fsdp_with_activation_checkpointing(
        shards, single, tmp_path, one_thread):
    """GPT-3's banded pattern and the modern bundle on: DDP over 2 ranks with selective activation
    checkpointing (the banded block is the one recomputed) equals one process, losses and every
    weight, and so does FSDP2 sharded over 2 ranks with every block recomputed. And it trains
    otherwise than GPT-2: the options are on. (Their exact resumes: tests/test_attention.py and
    tests/test_architecture.py.)"""
    import train_gpt
    one, ddp, fsdp = (str(tmp_path / name) for name in ("one", "ddp", "fsdp"))
    train_gpt.main(tiny_args(shards, one, **BEYOND_GPT2, **STEPS))
    codes, out = runs_in_one_job([tiny_args(shards, ddp, activation_checkpointing="selective", **BEYOND_GPT2, **STEPS),
                                  tiny_args(shards, fsdp, fsdp=True, activation_checkpointing="full", **BEYOND_GPT2,
                                            **STEPS)], tmp_path)
    assert codes == [0, 0], codes
    assert '"rope": true' in out and '"untied_head": true' in out and "DDP" in out and "FSDP" in out
    assert_close_runs(one, ddp)
    wa, wb = weights(one), weights(ddp)
    assert "lm_head.weight" in wb and "transformer.wpe.weight" not in wb
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)
    assert_close_runs(one, fsdp)
    assert abs(train_losses(single)[9] - train_losses(one)[9]) > 1e-4  # 10 x the tolerance of equal runs


def two_node_job(args, extra=(), script=("train_gpt.py",), env=None):
    """Two torchrun agents of one process each, meeting over c10d on 127.0.0.1: two "nodes".
    Asserts both succeed; returns their outputs."""
    port = free_port()
    procs = [start([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                    f"--node_rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                    "--rdzv-id=test", *extra, *script, *args], env=env)
             for node in (0, 1)]
    results = [finish(p) for p in procs]
    for code, out in results:
        assert code == 0, out[-3000:]
    return [out for _, out in results]


def test_fsdp_unsharded_accumulation_equals_ddp(two_rank_runs):
    """2 micro steps of 2 sequences a rank, reduce-scattered once a step: the same steps."""
    assert_close_runs(two_rank_runs["ddp"], two_rank_runs["fsdp_unsharded"])


def test_fsdp_equals_ddp_resumes_exactly_and_takes_over_a_ddp_checkpoint(shards, ddp, tmp_path):
    """FSDP2 over 2 ranks, stopped at step 5 (a sharded checkpoint folder): DDP's steps. Then a
    model that outgrew DDP moves on: DDP's step-5 checkpoint file, given to an HSDP run
    (--resume=FILE; 2 replicas x 1-way FSDP, a 2-D mesh, as 2 processes allow), is sharded as it
    loads (weights, AdamW's moments, data position, RNG); that run stops at step 8, and its sharded
    checkpoint, rewritten as the code before attention's q, k and v were split wrote it (one
    c_attn), resumes to the end. Every step is DDP's bit for bit: FSDP2 trains DDP's steps exactly
    on the CPU (the same sums of 2 ranks' gradients), so any state lost or misplaced in the move
    would show. (DDP to FSDP with Muon: tests/test_muon.py.)"""
    fresh, moved = str(tmp_path / "fresh"), str(tmp_path / "moved")
    expected = train_losses(ddp)
    hsdp = dict(fsdp=True, fsdp_shard_size=1, **STEPS)
    codes, out = runs_in_one_job([tiny_args(shards, fresh, fsdp=True, stop_step=5, **STEPS),
                                  tiny_args(shards, moved, stop_step=8, resume=checkpoint.checkpoint_path(ddp, 5), **hsdp)],
                                 tmp_path)
    assert codes == [0, 0], codes
    assert "FSDP" in out and os.path.isdir(os.path.join(fresh, "ckpt_0000005"))  # sharded checkpoint folder
    assert train_losses(fresh) == {step: loss for step, loss in expected.items() if step < 5}
    assert "HSDP (2 replicas x 1-way FSDP)" in out
    assert f"resumed from {checkpoint.checkpoint_path(ddp, 5)} at step 5" in out
    assert os.path.isdir(os.path.join(moved, "ckpt_0000008"))
    fuse_sharded_checkpoint(os.path.join(moved, "ckpt_0000008"))  # as written before q, k and v were split
    out = run_ok(tiny_args(shards, moved, **hsdp))
    assert f"resumed from {os.path.join(moved, 'ckpt_0000008')} at step 8" in out
    assert "q, k and v fused in one c_attn" in out
    assert train_losses(moved) == {step: loss for step, loss in expected.items() if step >= 5}
    assert os.path.isdir(os.path.join(moved, "ckpt_0000010"))


def fuse_sharded_checkpoint(folder):
    """Rewrite a sharded checkpoint folder as the code before attention's q, k and v were split
    wrote it: the model's c_q, c_k and c_v tensors one c_attn, and the optimizer's state of them
    (DCP keys it by name) one state of c_attn, their moments concatenated; then the manifest."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp
    from support.fused_qkv import fuse_model_state, fused_name, split_names
    whole, extra = folder + ".whole.pt", folder + ".extra.pt"
    dcp_to_torch_save(folder, whole)
    state = torch.load(whole, weights_only=False)
    state["model"] = fuse_model_state(state["model"])
    optim, fused_state = state["optimizer"], {}
    for name, values in optim["state"].items():
        fused = fused_name(name)
        if fused == name:
            fused_state[name] = values
        elif fused is not None:  # c_q's name: c_attn's state is q's, k's and v's, by rows
            parts = [optim["state"][n] for n in split_names(fused)]
            fused_state[fused] = {k: torch.cat([p[k] for p in parts]) if v.dim() else v for k, v in values.items()}
    optim["state"] = fused_state
    for group in optim["param_groups"]:
        group["params"] = [n for n in map(fused_name, group["params"]) if n is not None]
    assert "transformer.h.0.attn.c_attn.weight" in optim["state"] and len(optim["param_groups"]) == 2
    torch.save(state, whole)
    shutil.move(os.path.join(folder, "extra.pt"), extra)
    shutil.rmtree(folder)
    torch_save_to_dcp(whole, folder)
    shutil.move(extra, os.path.join(folder, "extra.pt"))
    os.remove(whole)
    files = {name: {"sha256": checkpoint.hash_file(os.path.join(folder, name)),
                    "bytes": os.path.getsize(os.path.join(folder, name))} for name in checkpoint.folder_files(folder)}
    with open(os.path.join(folder, checkpoint.MANIFEST), "w") as f:
        json.dump({"files": files}, f)


# What rank 0 says when rank 1 dies mid-step (issue 28.3): one line, no traceback of its own
LOST_RANK = "train_gpt.py: error: lost another rank of the job mid-run"


def assert_one_line_for_the_lost_rank(out):
    assert out.count(LOST_RANK) == 1 and "Run the same command to resume" in out, out[-3000:]
    assert 'train_gpt.py", line' not in out and 'distributed_c10d.py", line' not in out, out[-3000:]


def test_a_log_dir_in_use_is_refused_on_every_rank_in_one_line(shards, tmp_path):
    """Issue 28.3: rank 0 refused and exited; rank 1, waiting for it in a collective, died with
    gloo's "Connection closed by peer" traceback. Now rank 0's refusal reaches every rank."""
    from support import run_guard
    log_dir = str(tmp_path / "log")
    with run_guard.log_dir_lock(log_dir) as lock:  # held by this process, as by another run
        lock.claim()
        code, out = torchrun(tiny_args(shards, log_dir, **STEPS), timeout=120)
    assert code != 0
    assert out.count(f"train_gpt.py: error: {log_dir} is in use by another run (pid {os.getpid()}") == 2, out[-3000:]
    assert 'train_gpt.py", line' not in out and "Connection closed" not in out, out[-3000:]


def assert_resumed_exactly(out, log_dir, ddp):
    assert "resumed from" in out and "ckpt_0000005.pt" in out
    assert train_losses(log_dir) == train_losses(ddp)  # exactly as if nothing had happened
    for k, v in weights(ddp).items():
        assert torch.equal(v, weights(log_dir)[k])


def test_torchrun_restart_after_a_crash_resumes_exactly(shards, ddp, tmp_path, crash_script):
    """torchrun --max-restarts=1: rank 1 dies mid-step 6, torchrun starts both ranks again, they
    meet in a fresh store prefix (runtime.init_process_group) and resume from step 5."""
    log_dir = str(tmp_path / "log")
    out = run_ok([str(tmp_path / "crashed"), *tiny_args(shards, log_dir, **STEPS)], script=(crash_script,),
                 extra=("--max-restarts=1",))
    assert os.path.exists(tmp_path / "crashed")  # it did crash once
    assert_resumed_exactly(out, log_dir, ddp)


def test_two_node_restart_with_a_fresh_store(shards, ddp, tmp_path, crash_script):
    """Two torchrun agents of one process each on loopback: two "nodes". Across nodes the agents'
    restart counts can differ, so a store prefix cannot name the generation; with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the README's advice, printed by rank 0 otherwise) each
    restart gets a fresh store. The two nodes, crashed and restarted, train DDP's steps bit for bit
    (and so one process's: test_ddp_equals_one_process)."""
    log_dir = str(tmp_path / "log")
    outs = two_node_job([str(tmp_path / "crashed"), *tiny_args(shards, log_dir, **STEPS)],
                        extra=("--max-restarts=1",), script=(crash_script,),
                        env=dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    assert os.path.exists(tmp_path / "crashed")
    assert_resumed_exactly(outs[0], log_dir, ddp)


def test_restart_advice_only_for_multi_node_restarts_on_a_shared_store():
    from support.runtime import restart_advice
    multi = dict(GROUP_WORLD_SIZE="2", TORCHELASTIC_MAX_RESTARTS="3", TORCHELASTIC_USE_AGENT_STORE="True")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_advice(multi)
    assert restart_advice(dict(multi, GROUP_WORLD_SIZE="1")) is None  # one node: the prefix handles it
    assert restart_advice(dict(multi, TORCHELASTIC_MAX_RESTARTS="0")) is None
    assert restart_advice(dict(multi, TORCHELASTIC_USE_AGENT_STORE="False")) is None  # a fresh store already
    assert restart_advice({}) is None  # not under torchrun


def test_a_dead_rank_stops_the_job_quickly_and_the_same_command_resumes_exactly(shards, ddp, tmp_path, crash_script):
    """Rank 1 dies mid-step 6 (os._exit(3), as a crashed or killed process ends): the job stops
    quickly, rank 0 says in one line that the same command resumes, and it does: --resume=auto
    continues from the step-5 checkpoint, as does a scheduler's relaunch."""
    log_dir = str(tmp_path / "log")
    t0 = time.time()
    code, out = torchrun([str(tmp_path / "crashed"), *tiny_args(shards, log_dir, **STEPS)], script=(crash_script,),
                         timeout=120)
    assert code != 0 and os.path.exists(tmp_path / "crashed")
    # torchrun names the rank that failed first and its exit code, and ends the other rank
    assert re.search(r"Root Cause.*rank\s*:\s*1 .*exitcode\s*:\s*3", out, re.S), out[-2000:]
    # far below the 600 s a collective would wait: rank 0 is not stuck (its clean exit, line
    # printed, takes seconds on a busy machine: torchrun's SIGTERM no longer cuts it short)
    assert time.time() - t0 < 60
    assert_one_line_for_the_lost_rank(out)
    out = run_ok(tiny_args(shards, log_dir, **STEPS))  # its advice: the same command
    assert_resumed_exactly(out, log_dir, ddp)


# ----------------------------------------------------------------------------------------------
# Stopping a job: signals, a dead launcher, a frozen rank (issue 13)


@pytest.fixture
def signal_script(tmp_path):
    path = tmp_path / "signal_at.py"
    path.write_text(SIGNAL_AT)
    return str(path)


def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint_and_resumes_exactly(shards, ddp, tmp_path,
                                                                                   signal_script):
    """Rank 1 alone gets SIGTERM in the middle of step 6: its flag rides on that step's loss
    all-reduce, both ranks stop after it, the checkpoint of step 7 is written, and a relaunch
    continues as if nothing had happened."""
    log_dir = str(tmp_path / "log")
    code, out = torchrun(["SIGTERM", "1", "7", *tiny_args(shards, log_dir, **STEPS)], script=(signal_script,))
    assert code != 0, out[-3000:]  # the workers exit 143: stopped before the end
    assert "stopped by SIGTERM at step 7: saved" in out and out.count("at step 7: saved") == 2, out[-3000:]
    assert 'train_gpt.py", line' not in out  # no traceback from the workers (torchrun prints its own)
    assert [s for s, _ in checkpoint.list_checkpoints(log_dir)] == [7, 5]
    out = run_ok(tiny_args(shards, log_dir, **STEPS))
    assert "resumed from" in out and "ckpt_0000007.pt" in out
    assert train_losses(log_dir) == train_losses(ddp)
    for k, v in weights(ddp).items():
        assert torch.equal(v, weights(log_dir)[k])


def test_workers_of_a_killed_launcher_save_and_stop(shards, tmp_path, signal_script):
    """torchrun SIGKILLed during step 2: its workers get SIGTERM from the kernel (PR_SET_PDEATHSIG)
    and take the graceful path instead of training on into the log_dir."""
    log_dir = str(tmp_path / "log")
    t0 = time.time()
    code, out = torchrun(["KILL_PARENT", "0", "3", *tiny_args(shards, log_dir, **STEPS)], script=(signal_script,),
                         timeout=120)  # returns when the workers have closed their output: ended
    assert code == -signal.SIGKILL
    stops = re.findall(r"stopped by SIGTERM at step (\d+): saved", out)
    assert len(stops) == 2 and stops[0] == stops[1], out[-3000:]  # both ranks, after the same step
    assert [s for s, _ in checkpoint.list_checkpoints(log_dir)] == [int(stops[0])] and int(stops[0]) < 10
    assert time.time() - t0 < 100


def test_a_frozen_rank_ends_the_job_after_the_collective_timeout(shards, tmp_path, signal_script):
    """Rank 1 SIGSTOPs itself mid step 2: rank 0 waits in the step's all-reduce, gives up after
    --collective_timeout and says why. Two processes started by hand, as torchrun would: under
    torchrun the job then ends when torchrun kills the stopped worker (SIGTERM, 30 s, SIGKILL)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2")
    args = [sys.executable, signal_script, "SIGSTOP", "1", "3",
            *tiny_args(shards, str(tmp_path / "log"), collective_timeout=5, **STEPS)]
    ranks = [start(args, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in (0, 1)]
    try:
        code, out = finish(ranks[0], timeout=150)  # without a timeout it would wait forever
        assert code == 1, out[-3000:]
        assert "--collective_timeout=5 s" in out and "another rank is frozen" in out, out[-3000:]
        assert "Traceback" not in out
    finally:
        os.kill(ranks[1].pid, signal.SIGKILL)
        finish(ranks[1])


# ----------------------------------------------------------------------------------------------
# One resume decision for every rank (issue 20.3)

# Rank 1 gets its own log_dir (sys.argv[1]), as a node with a local disk would, and optionally a
# read error on the checkpoint (sys.argv[2] == "EIO"); the rest of sys.argv is train_gpt's.
OWN_LOG_DIR = """
import errno, os, sys, torch
import train_gpt
argv = sys.argv[3:]
if os.environ["RANK"] == "1":
    if sys.argv[1] != "same":
        argv = [a if not a.startswith("--log_dir=") else "--log_dir=" + sys.argv[1] for a in argv]
    if sys.argv[2] == "EIO":
        def broken_load(*args, **kwargs):
            raise OSError(errno.EIO, "Input/output error")
        torch.load = broken_load
train_gpt.main(argv)
"""


@pytest.fixture(scope="module")
def ddp_stopped_at_5(two_rank_runs):
    return two_rank_runs["ddp_stopped_at_5"]


@pytest.fixture
def own_log_dir_script(tmp_path):
    path = tmp_path / "own_log_dir.py"
    path.write_text(OWN_LOG_DIR)
    return str(path)


def test_ranks_that_do_not_see_rank_0s_checkpoint_stop_the_job(shards, ddp_stopped_at_5, tmp_path,
                                                               own_log_dir_script):
    """Node-local log_dirs: rank 0 resumes from its checkpoint, rank 1 has none. Before, rank 1
    started from step 0 with fresh weights beside rank 0's resumed ones."""
    log_dir, empty = str(tmp_path / "log"), str(tmp_path / "rank1_disk")
    shutil.copytree(ddp_stopped_at_5, log_dir)
    os.makedirs(empty)
    code, out = torchrun([empty, "-", *tiny_args(shards, log_dir, collective_timeout=30, **STEPS)],
                         script=(own_log_dir_script,), timeout=120)
    assert code != 0
    assert re.search(r"log_dir is not shared: rank 1 on host \S+ has no \S*ckpt_0000005\.pt", out), out[-3000:]
    assert [s for s, _ in checkpoint.list_checkpoints(log_dir)] == [5] and os.listdir(empty) == []


def test_a_read_error_on_one_rank_stops_the_job_instead_of_a_fallback_there(shards, ddp_stopped_at_5, tmp_path,
                                                                            own_log_dir_script):
    """Every rank reads the whole checkpoint file; rank 1 alone fails (EIO). Before, rank 1 fell
    back on its own (here: to a fresh start) while rank 0 resumed."""
    log_dir = str(tmp_path / "log")
    shutil.copytree(ddp_stopped_at_5, log_dir)
    code, out = torchrun(["same", "EIO", *tiny_args(shards, log_dir, collective_timeout=30, **STEPS)],
                         script=(own_log_dir_script,), timeout=120)
    assert code != 0
    assert re.search(r"rank 1 on host \S+ could not read \S*ckpt_0000005\.pt \(.*Input/output error.*\), which "
                     r"1 other ranks read", out), out[-3000:]
    assert [s for s, _ in checkpoint.list_checkpoints(log_dir)] == [5]


def signal_when(cmd, ready, signum, marker, timeout=180):
    """Start cmd, send it signum once a line of its output matches `ready` (as a scheduler signals
    a job's launcher), and wait for it and for every process holding its output. Returns (exit
    code, output). In the end no process whose command line holds `marker` is left running."""
    proc = start(cmd)
    lines, seen = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if re.search(ready, line):
                seen.set()
        seen.set()  # the end of the output: ready never came

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        seen.wait(timeout)
        assert re.search(ready, "".join(lines), re.M), "".join(lines)[-3000:]
        proc.send_signal(signum)
        proc.wait(timeout)
        reader.join(timeout)  # the workers too have closed their output: ended
        assert not reader.is_alive(), "".join(lines)[-3000:]
    finally:
        for pid in [proc.pid, *descendants(proc.pid), *processes_with(marker)]:  # workers outlive torchrun
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, "".join(lines)


def processes_with(marker):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
    return found


def test_sighup_to_torchrun_stops_both_workers_with_a_checkpoint_and_resumes_exactly(shards, ddp, tmp_path):
    """A scheduler sends SIGHUP to torchrun itself while steps run; torchrun forwards it to its
    workers (its default --signals-to-handle) and SIGKILLs them 30 s later. Both stop after the
    same step with its checkpoint, and a relaunch goes on as if nothing had happened."""
    log_dir = str(tmp_path / "log")
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *tiny_args(shards, log_dir, **STEPS)]
    code, out = signal_when(cmd, r"^step\s+1 \|", signal.SIGHUP, marker=log_dir)
    assert code != 0, out[-3000:]
    stops = re.findall(r"stopped by SIGHUP at step (\d+): saved", out)
    assert len(stops) == 2 and stops[0] == stops[1], out[-3000:]  # both workers, after the same step
    step = int(stops[0])
    assert 1 < step < 10 and step in [s for s, _ in checkpoint.list_checkpoints(log_dir)], out[-3000:]
    assert 'train_gpt.py", line' not in out
    out = run_ok(tiny_args(shards, log_dir, **STEPS))
    assert "resumed from" in out and f"ckpt_{step:07d}.pt" in out
    assert train_losses(log_dir) == train_losses(ddp)
    for k, v in weights(ddp).items():
        assert torch.equal(v, weights(log_dir)[k])
