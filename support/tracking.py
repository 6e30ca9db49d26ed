"""Experiment tracking: a run's metrics events, also sent to Weights & Biases and/or TensorBoard.

Both are optional (pip install -r requirements-extras.txt). train_gpt.RunLog hands every event it
appends to metrics.jsonl (train loss, lr, grad norm, tokens/s, MFU, val loss, HellaSwag) to the
trackers opened here, on rank 0 only, under the same names and with metrics.jsonl's `step` as the
x axis. The run's settings are recorded as its config.

A resumed run continues its runs: W&B by the run id kept in log_dir/wandb_run_id (W&B's own resume),
TensorBoard by writing to the same log_dir, where the reader merges the event files of every
session. A resume from a checkpoint older than the last logged step logs those steps again:
TensorBoard then shows the new values only, as metrics.jsonl keeps them (RunLog.cut_metrics); W&B
shows both, as its history only grows.
"""

import atexit
import importlib.util
import os

from support.files import replace_atomically

EXTRAS = "pip install -r requirements-extras.txt"
WANDB_ID_FILE = "wandb_run_id"


class TrackerError(RuntimeError):
    """A tracker that was asked for cannot start: its package is missing, or W&B refused the run."""


def require(package, pip_name, setting):
    if importlib.util.find_spec(package) is None:
        raise TrackerError(f"{setting} needs the {pip_name} package, which is not installed: {EXTRAS} "
                           f"(or pip install {pip_name})")


def scalars(event):
    """The event's numbers other than its step; text (a skipped step's 'nan' loss) is left out."""
    return {k: float(v) for k, v in event.items() if k != "step" and isinstance(v, (int, float))}


class TensorBoardTracker:
    """Event files in log_dir, for `tensorboard --logdir=log_dir` (or a folder above several
    runs' log_dirs). Each session adds its own file and the reader merges them.

    A session that trains on after N steps (a checkpoint's, or 0) starts its file with
    TensorBoard's restart marker (purge_step) at N: the reader drops the earlier sessions'
    events from step N on, which this one logs again, and, before its own, the evaluations at
    step N that metrics.jsonl keeps (made before the checkpoint, not made again). So TensorBoard
    shows what metrics.jsonl holds, one value a step."""

    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter  # imported now: a broken install fails before training
        self.new_writer = lambda purge_step: SummaryWriter(log_dir, purge_step=purge_step, flush_secs=30)
        self.writer = None
        atexit.register(self.close)  # a run that stops on an error keeps its last events too

    def start(self, step, again):
        """The session trains on after `step` steps; `again`: metrics.jsonl's events at that step."""
        self.writer = self.new_writer(purge_step=step)
        for event in again:
            self.log(event)

    def log(self, event):
        for name, value in scalars(event).items():
            self.writer.add_scalar(name, value, event["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()


class WandbTracker:
    """One W&B run per log_dir. Its id is kept in log_dir/wandb_run_id, so a resumed training run
    continues the same W&B run (resume="allow"); run_id overrides it. The settings are the run's
    config. W&B's files go to log_dir/wandb/ unless WANDB_DIR says otherwise; WANDB_MODE=offline
    logs without an account (upload later with `wandb sync`)."""

    def __init__(self, project, name, run_id, log_dir, config, fresh):
        import wandb
        run_id = run_id or saved_run_id(log_dir, fresh)  # None: W&B makes a new id
        try:
            self.run = wandb.init(project=project, name=name or None, id=run_id, resume="allow",
                                  dir=None if os.environ.get("WANDB_DIR") else log_dir)
        except wandb.errors.Error as e:  # not logged in, server unreachable, a bad id...
            raise TrackerError(f"W&B could not start the run: {e} Log in (`wandb login`, or set WANDB_API_KEY), "
                               f"or log offline with WANDB_MODE=offline and upload later with `wandb sync`") from e
        save_run_id(log_dir, self.run.id)
        # on a resume the settings may differ (--max_steps raised, say): the newest are recorded
        self.run.config.update(config, allow_val_change=True)
        # x axis: the training step, not W&B's own counter of log calls (which a resume does not rewind)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def start(self, step, again):
        """Nothing to do: W&B's history only grows, so after a resume from a checkpoint older than
        the last logged step it holds those steps twice (docs/tracking.md)."""

    def log(self, event):
        self.run.log({"step": event["step"], **scalars(event)})

    def close(self):
        self.run.finish()


def saved_run_id(log_dir, fresh):
    path = os.path.join(log_dir, WANDB_ID_FILE)
    if fresh or not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def save_run_id(log_dir, run_id):
    with replace_atomically(os.path.join(log_dir, WANDB_ID_FILE)) as tmp:
        with open(tmp, "w") as f:
            f.write(run_id + "\n")


def check_trackers(wandb_project="", wandb_run_name="", wandb_run_id="", tensorboard=False):
    """The trackers' settings and packages, checked before any work (TrackerError names the fix)."""
    if (wandb_run_name or wandb_run_id) and not wandb_project:
        raise TrackerError("--wandb_run_name and --wandb_run_id name a W&B run: give --wandb_project=NAME too")
    if wandb_project:
        require("wandb", "wandb", "--wandb_project")
    if tensorboard:
        require("tensorboard", "tensorboard", "--tensorboard")


def open_trackers(log_dir, config, wandb_project="", wandb_run_name="", wandb_run_id="", tensorboard=False,
                  fresh=False):
    """The trackers asked for (a list, maybe empty). Call on rank 0 only, once the run is sure to
    start: a W&B run opened here writes log_dir/wandb_run_id and its config. fresh: a run that
    starts over (--resume=off) gets a new W&B run instead of the one saved in log_dir."""
    check_trackers(wandb_project, wandb_run_name, wandb_run_id, tensorboard)
    os.makedirs(log_dir, exist_ok=True)
    trackers = []
    if tensorboard:
        trackers.append(TensorBoardTracker(log_dir))
    if wandb_project:
        trackers.append(WandbTracker(wandb_project, wandb_run_name, wandb_run_id, log_dir, config, fresh))
    return trackers
