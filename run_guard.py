"""Keeping a run alive and its log_dir its own: graceful stop on SIGTERM, SIGINT, SIGHUP and
SIGQUIT, one writer per log_dir, workers that end with their launcher, and a clear message for a
stuck collective.

Clusters and spot machines end jobs with SIGTERM and a grace period; Ctrl-C sends SIGINT; a closed
terminal sends SIGHUP. torchrun forwards each of these four to its workers (its default
--signals-to-handle), then SIGKILLs them after --shutdown-timeout (30 s). Any of them now finishes
the current step, writes a checkpoint and exits, on every rank at the same step.
"""

import contextlib
import ctypes
import datetime
import fcntl
import os
import signal
import socket
import sys

import torch
import torch.distributed as dist


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
        then = ("training is complete, but its final evaluations were skipped (evaluate.py --checkpoint runs them)"
                if complete else "run the same command to resume")
        return Stopped(f"stopped by {name} at step {step}: saved {path}; {then}", 128 + signum)


class _Lock:
    """The lock file of a log_dir, held; claim() writes who holds it."""

    def __init__(self, f):
        self.f = f

    def claim(self):
        if self.f is not None:
            self.f.truncate(0)
            self.f.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                         f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
            self.f.flush()


@contextlib.contextmanager
def log_dir_lock(log_dir, rank=0):
    """One run per log_dir: rank 0 holds an flock on log_dir/run.lock while the run lives. The
    kernel releases it when the process dies, however it dies, so a crash never leaves it stuck.
    Yields the lock; its claim() records this process as the holder, once the run is sure to
    start (a run refused at start leaves the file as it was)."""
    if rank != 0:
        yield _Lock(None)
        return
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, "run.lock")
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise Refused(f"{log_dir} is in use by another run ({holder}): two runs in one log_dir would "
                          f"overwrite each other's checkpoints and logs. Wait for it to end (or stop it), or "
                          f"give this run another --log_dir.") from None
        yield _Lock(f)
    finally:
        f.close()  # releases the lock


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
