"""Keeping a run alive and its log_dir its own: graceful stop on SIGTERM, SIGINT, SIGHUP and
SIGQUIT, one writer per log_dir, workers that end with their launcher, the NaN guard, and one
line, not a traceback, for a user's mistake or a stuck collective.

Clusters and spot machines end jobs with SIGTERM and a grace period; Ctrl-C sends SIGINT; a closed
terminal sends SIGHUP. torchrun forwards each of these four to its workers (its default
--signals-to-handle), then SIGKILLs them after --shutdown-timeout (30 s). Any of them now finishes
the current step, writes a checkpoint and exits, on every rank at the same step.
"""

import contextlib
import ctypes
import datetime
import fcntl
import gc
import os
import re
import shutil
import signal
import socket
import sys

import torch
import torch.distributed as dist

from support import checkpoint
from support.cli import RunError
from support.files import write_failure_advice


class Refused(RuntimeError):
    """The run cannot start as asked (its log_dir is in use)."""


class Stopped(BaseException):
    """The run stopped on a signal; `code` is the exit status (128 + the signal's number)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.message, self.code = message, code


SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGHUP: "SIGHUP",
                signal.SIGQUIT: "SIGQUIT"}


class StopOnSignal:
    """While training, SIGTERM, SIGINT, SIGHUP and SIGQUIT set a flag instead of killing the process
    (torchrun forwards all four: a worker that died of one would lose the session); the training
    loop saves and stops after the current step. The flag rides on the step's loss all-reduce
    (`ride`), so every rank learns of a signal any rank got at the same step, with no extra
    collective. Before training starts (nothing to save yet) or on a second Ctrl-C, the process
    stops at once, with a line instead of a traceback. A repeated signal other than Ctrl-C is
    ignored: a scheduler and torchrun may each send one, and the grace period ends with SIGKILL
    anyway. A SIGHUP ignored when the process started (nohup) stays ignored: that run asked to
    outlive its terminal.

    Exit status: 128 + the signal's number (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP, 131 SIGQUIT), as
    a shell reports a process killed by it: the run stopped before its end. A rank stopped because
    another rank got the signal exits 143."""

    def __init__(self):
        self.signum = None
        self.armed = False  # set when the training loop starts
        self.agreed_flag = None  # this step's all-reduced flag (a tensor), from ride()
        self._previous = {}

    def __enter__(self):
        for signum in SIGNAL_NAMES:
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # nohup
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                pass
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        name = SIGNAL_NAMES.get(signum, f"signal {signum}")
        if not self.armed:
            raise Stopped(f"stopped by {name} before training started: nothing to save", 128 + signum)
        if self.signum is not None:
            if signum != signal.SIGINT:
                return
            raise Stopped(f"stopped by a second {name}: quit without saving (the newest checkpoint is "
                          f"intact; a partial one is removed at the next save)", 128 + signum)
        self.signum = signum
        again = " (Ctrl-C again to quit without saving)" if signum == signal.SIGINT else ""
        print(f"{name}: stopping after this step with a checkpoint{again}", file=sys.stderr, flush=True)

    def ride(self, value, world_size):
        """All-reduce (sum) a scalar tensor with this rank's stop flag in the same message."""
        both = torch.stack([value, torch.tensor(float(self.signum is not None), device=value.device)])
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        self.agreed_flag = both[1]
        return both[0]

    def agreed(self):
        """Whether any rank asked to stop, as of this step's all-reduce (or this process alone)."""
        if self.agreed_flag is not None:
            return bool(self.agreed_flag.item() > 0)  # after the step's sync: no wait
        return self.signum is not None

    def stopped(self, step, path, world_size=1, complete=False):
        """The exception that ends the run, once every rank is past rank 0's checkpoint write (a
        rank that exited earlier would make torchrun stop the others mid-write). `complete`: that
        step was the last, so there is nothing to resume, only the evaluations it skipped."""
        if world_size > 1:
            dist.barrier()
        signum = self.signum if self.signum is not None else signal.SIGTERM
        name = SIGNAL_NAMES.get(signum, f"signal {signum}") if self.signum is not None else "a signal to another rank"
        if path is None:  # the NaN guard distrusts the weights: none is written
            return Stopped(f"stopped by {name} at step {step}: no checkpoint written, as the last steps had a NaN/Inf "
                           f"loss or gradient (see the log); run the same command to resume from the newest "
                           f"checkpoint", 128 + signum)
        then = ("training is complete, but its final evaluations were skipped (evaluate.py --checkpoint runs them)"
                if complete else "run the same command to resume")
        return Stopped(f"stopped by {name} at step {step}: saved {path}; {then}", 128 + signum)


class _Lock:
    """The lock file of a log_dir, held (rank 0; None elsewhere); claim() writes who holds it."""

    def __init__(self, f, log_dir):
        self.f, self.log_dir = f, log_dir
        self.claimed = False

    def claim(self):
        self.claimed = True
        if self.f is not None:
            text = f"pid {os.getpid()} on {socket.gethostname()}, started {datetime.datetime.now():%Y-%m-%dT%H:%M:%S}\n"
            try:  # unbuffered: a write that fails is not tried again when the file is closed
                os.ftruncate(self.f.fileno(), 0)
                os.write(self.f.fileno(), text.encode())
            except OSError as e:  # a full disk shows here first: creating the empty file needed no room
                raise log_dir_write_failed(self.log_dir, e) from e


@contextlib.contextmanager
def log_dir_lock(log_dir, rank=0):
    """One run per log_dir: rank 0 holds an flock on log_dir/run.lock while the run lives. The
    kernel releases it when the process dies, however it dies, so a crash never leaves it stuck.
    Yields the lock; its claim() records this process as the holder, once the run is sure to
    start. A run refused before that leaves log_dir as it was: the run.lock and folders it made
    are removed (while it holds the lock; a run that locked the removed file locks anew). Every
    rank calls this: a refusal, or a folder rank 0 cannot write, stops them all with the same line."""
    f, made, error = None, [], None
    if rank == 0:
        try:
            f, made = _take_lock(log_dir)
        except (Refused, RunError) as e:
            error = e
    raise_on_every_rank(error)
    lock = _Lock(f, log_dir)
    try:
        yield lock
    finally:
        if f is not None:
            if not lock.claimed:
                with contextlib.suppress(OSError):
                    for made_path in made:  # the lock file, then the folders, deepest first
                        (os.rmdir if os.path.isdir(made_path) else os.remove)(made_path)  # a folder only if empty
            f.close()  # releases the lock


def _take_lock(log_dir):
    """(the lock file of log_dir, locked and open; the paths made for it, the file first, then the
    folders deepest first). log_dir is made if need be; Refused if another run holds it."""
    path = os.path.join(log_dir, "run.lock")
    folders = []
    folder = os.path.abspath(log_dir)
    while not os.path.exists(folder):
        folders.append(folder)
        folder = os.path.dirname(folder)
    while True:
        try:
            os.makedirs(log_dir, exist_ok=True)
            made_file = not os.path.exists(path)
            f = open(path, "a+")
        except FileNotFoundError:  # a refused run removed the folder it made, just now
            continue
        except OSError as e:
            raise log_dir_write_failed(log_dir, e) from e
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise Refused(f"{log_dir} is in use by another run ({holder}): two runs in one log_dir would "
                          f"overwrite each other's checkpoints and logs. Wait for it to end (or stop it), or "
                          f"give this run another --log_dir.") from None
        except OSError as e:  # a filesystem without locks (ENOLCK), say
            f.close()
            raise log_dir_write_failed(log_dir, e) from e
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                return f, ([path] if made_file else []) + folders
        f.close()  # a refused run removed this file between our open and our lock: lock the new one


def log_dir_write_failed(log_dir, error):
    """The RunError for a write in log_dir that the system refused (error: the OSError), with the
    advice that fits it: a full disk, a read-only one, permissions..."""
    return RunError(f"cannot write in --log_dir={log_dir}: {error}. {write_failure_advice(error.errno)}, then "
                    f"run the command again")


def raise_on_every_rank(error):
    """Raise rank 0's error (a Refused or RunError, or None) on every rank; every rank calls this
    at the same point. Otherwise the others would train on and die in their next collective once
    rank 0 has exited, each with a traceback about a lost connection."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        said = [None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(said, src=0)
        if dist.get_rank() != 0 and said[0] is not None:
            kind, message = said[0]
            error = {"Refused": Refused, "RunError": RunError}[kind](message)
    if error is not None:
        raise error


def stop_with_launcher():
    """Under torchrun: ask the kernel to send this worker SIGTERM when its launcher dies (Linux
    prctl PR_SET_PDEATHSIG), so a SIGKILLed torchrun does not leave workers training into the
    log_dir. SIGTERM takes the graceful path: save, then exit. Returns whether it was set."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    parent = os.getppid()  # read before the call: if the launcher dies in between, this is already 1
    try:
        ok = ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    except OSError:
        return False
    if ok and parent == 1:  # the launcher died before the call: the kernel will not tell us
        os.kill(os.getpid(), signal.SIGTERM)
    return ok


# What gloo and NCCL say when a collective's peer is gone (its process died, or its machine or the
# network failed). NCCL more often hangs instead, until the collective timeout.
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "remote process exited or there was a network error")


def lost_peer_message(error):
    """A clear message for a collective that failed because another rank is gone, or None for
    any other error."""
    text = str(error)
    if not any(k in text for k in LOST_PEER):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0]).split(". ")[0][:200]  # no "[file:line] "
    return (f"lost another rank of the job mid-run: it died (a crash, out of memory, killed) or its machine or the "
            f"network failed; its own output, or torchrun's summary, says which rank and why. This rank stops too. "
            f"Run the same command to resume from the newest checkpoint. ({first})")


def collective_timeout_message(error, timeout_s):
    """A clear message for a collective that timed out (another rank frozen, dead or far behind),
    or None for any other error."""
    text = str(error)
    if not any(k in text for k in ("Timed out", "timed out", "Timeout", "timeout")):
        return None
    first = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
    return (f"a collective operation waited more than --collective_timeout={timeout_s:g} s for the other ranks "
            f"and was abandoned: most likely another rank is frozen (stopped, swapping, a hung GPU or "
            f"filesystem), died, or is far behind (a slow checkpoint write or evaluation). Check the other "
            f"ranks' output; raise --collective_timeout if their work is just slow. The newest checkpoint is "
            f"intact: resume from it. ({first})")


# ----------------------------------------------------------------------------------------------
# The NaN guard: a bad step is skipped, a streak of them or NaN weights stop the run

class NanGuard:
    """A step whose loss or gradient is NaN/Inf is skipped (train_step does not step the optimizer)
    and counted. The weights it started from are distrusted until a step from them is finite
    again: no checkpoint is written meanwhile (Checkpointer.save). max_bad_steps in a row stop
    the run: skipped steps change nothing, so they all started from the same weights, which are
    broken, most likely by the update before them. A checkpoint holding those weights (written
    before the first bad step) is moved to log_dir/distrusted/, and the advice names the newest
    checkpoint before it, where --resume=auto then starts. A finite step whose update made the
    weights NaN/Inf (a learning rate far too high) stops the run at once, before anything is
    saved: undoing the update would need a copy of every weight and moment."""

    def __init__(self, max_bad_steps, log_dir, is_main=True):
        self.max_bad_steps, self.log_dir, self.is_main = max_bad_steps, log_dir, is_main
        self.in_a_row = 0  # a resumed session starts afresh: it may be the fix (a lower --max_lr)
        self.last_finite = None  # (step, lr) of this session's newest finite step

    def step_done(self, finite, raw_model, step, lr):
        """Count the step; for a finite one, check the weights it made. Returns the bad steps in a row."""
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if finite:
            self.last_finite = (step, lr)
            check_weights_finite(raw_model, step, lr, self.log_dir)
        return self.in_a_row

    def stop_if_too_many(self, step):
        """After step `step`: stop the run if it ends max_bad_steps bad steps in a row, with the
        checkpoint of the weights they started from set aside and advice that resumes before it."""
        if self.in_a_row < self.max_bad_steps:
            return
        first = step - self.in_a_row + 1  # its weights are the checkpoint of step `first`, if one was written
        cause = ""
        if self.last_finite and self.last_finite[0] == first - 1:
            cause = f", made by step {first - 1}'s update (at lr {self.last_finite[1]:.3g}: most likely too high)"
        elif first > 0:
            cause = f", made by step {first - 1}'s update"
        text = (f"{self.in_a_row} steps in a row had a NaN/Inf loss or gradient (steps {first} to {step}), all from "
                f"the same weights{cause}: those weights are broken, so the run stops.{self.set_aside(first)}")
        good = [(s, path) for s, path in checkpoint.list_checkpoints(self.log_dir)
                if s < first and checkpoint.looks_intact(path)]
        if good:
            raise RunError(f"{text} Lower --max_lr (or raise --warmup_tokens) and run again with --resume=auto (the "
                           f"default): it resumes from {good[0][1]}, the newest checkpoint before them (step "
                           f"{good[0][0]}).")
        raise RunError(f"{text} No checkpoint holds weights from before them: lower --max_lr (or raise "
                       f"--warmup_tokens) and run again; with --resume=auto (the default) it starts afresh.")

    def set_aside(self, step):
        """Move log_dir's checkpoint of `step` (rank 0), if there is one, into log_dir/distrusted/,
        where --resume=auto does not look; returns the sentence that says so."""
        found = [path for s, path in checkpoint.list_checkpoints(self.log_dir) if s == step]
        if not found:
            return ""
        folder = os.path.join(self.log_dir, "distrusted")
        moved = os.path.join(folder, os.path.basename(found[0]))
        if self.is_main:
            try:
                os.makedirs(folder, exist_ok=True)
                if os.path.isdir(moved):  # set aside before, by a run that went the same way
                    shutil.rmtree(moved)
                for path in (found[0], found[0] + checkpoint.CHECKSUM_SUFFIX):
                    if os.path.exists(path):
                        os.replace(path, os.path.join(folder, os.path.basename(path)))
            except OSError as e:
                return (f" The checkpoint holding them, {found[0]}, could not be moved aside ({e}): move it out of "
                        f"{self.log_dir} before running again (mkdir -p {folder} && mv {found[0]}* {folder}/).")
        return f" The checkpoint holding them was moved to {moved}."


def check_weights_finite(raw_model, step, lr, log_dir):
    """Stop the run if the weights hold a NaN or Inf. The check is the sum of each weight tensor,
    which a NaN or Inf makes non-finite: one reduction a tensor, several times cheaper on the CPU
    than torch's max-abs norm (docs/checkpoints.md). Only a tensor whose values add up past fp32's
    range (1e38), broken anyway, could stop a run without a NaN. Under FSDP each rank checks its
    shards and the verdict is all-reduced."""
    params = list(raw_model.parameters())
    sharded = any(hasattr(p, "to_local") for p in params)
    weights = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    weights = [w for w in weights if w.numel()]  # an FSDP rank may hold an empty shard
    device = params[0].device if params else torch.device("cpu")
    total = torch.stack([w.sum() for w in weights]).sum() if weights else torch.zeros((), device=device)
    bad = (~torch.isfinite(total)).float()
    if sharded and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise RunError(f"step {step}'s update made the weights NaN/Inf although its loss and gradient were finite: "
                       f"the learning rate ({lr:.3g}) is far too high. Nothing was saved after it; the newest "
                       f"checkpoint in {log_dir} (if any) holds no NaN: lower --max_lr (or raise --warmup_tokens) "
                       f"and resume from it (or start again if there is none).")


# ----------------------------------------------------------------------------------------------
# How a command ends

class OneLineErrors:
    """Around a command's work: a user's mistake (an exception of user_errors) ends it with one
    line naming the problem and the fix; a stop on a signal prints its line and exits 128 + the
    signal's number; a collective whose peer is gone (another rank died) or that timed out
    (another rank frozen or dead) says so, naming `collective_timeout` (set it once the settings
    are parsed). Anything else is a bug and keeps its traceback. On the way out the process group
    is destroyed, here rather than at interpreter exit."""

    def __init__(self, prog, user_errors):
        self.prog, self.user_errors = prog, user_errors
        self.collective_timeout = None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        quiet = self._ignore_sigterm() if kind is not None else None
        try:
            if kind is None:
                return False
            if issubclass(kind, self.user_errors):
                sys.exit(f"{self.prog}: error: {error}")
            if issubclass(kind, Stopped):  # SIGTERM, Ctrl-C, SIGHUP, SIGQUIT: one line, the checkpoint saved
                print(error.message, file=sys.stderr, flush=True)
                sys.exit(error.code)
            if issubclass(kind, KeyboardInterrupt):
                print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
                sys.exit(130)
            if issubclass(kind, RuntimeError) and dist.is_initialized() and dist.get_world_size() > 1:
                message = lost_peer_message(error)
                if message is None and self.collective_timeout is not None:
                    message = collective_timeout_message(error, self.collective_timeout)
                if message is not None:
                    sys.exit(f"{self.prog}: error: {message}")
            return False
        finally:
            if dist.is_initialized():
                # FSDP's modules hold the process group through reference cycles: collected first,
                # the group is destroyed here, not at interpreter exit, where a gloo thread releasing
                # tensors can abort the process (seen in a test worker).
                gc.collect()
                dist.destroy_process_group()
            if quiet is not None:
                signal.signal(signal.SIGTERM, quiet)

    @staticmethod
    def _ignore_sigterm():
        """On the way out with an error, SIGTERM is ignored during the clean-up above: when one
        worker fails, torchrun SIGTERMs the others at once, and killed there they would end
        without their line. Returns the handler to restore (None: not the main thread)."""
        try:
            return signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except ValueError:
            return None
