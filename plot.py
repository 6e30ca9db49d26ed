"""Loss and HellaSwag curves from one or more runs' metrics.jsonl (written by train_gpt.py).

    python plot.py log/metrics.jsonl                                  # -> loss.png
    python plot.py runA/metrics.jsonl runB/metrics.jsonl --labels A B -o compare.png

Left: train loss (thin) and validation loss (markers) vs step; right: HellaSwag acc_norm vs step
(only when some run has HellaSwag results).
Dashed lines are the references for a 124M model: GPT-2's validation loss on FineWeb-EDU's val
shard (3.2924) and HellaSwag acc_norm (0.2945), and GPT-3 124M's HellaSwag (0.337). The loss
reference is drawn only once some run's loss comes within REFERENCE_MARGIN of it: another corpus's
losses (the demo's Wikipedia, ~7) are not comparable, and the line would squash their curve.
"""

import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from support import cli

GPT2_124M_VAL_LOSS = 3.2924  # OpenAI's GPT-2 124M on the FineWeb-EDU val shard (build-nanogpt)
GPT2_124M_HELLASWAG = 0.2945  # acc_norm, scored as evaluate.hellaswag does
GPT3_124M_HELLASWAG = 0.337  # the GPT-3 paper's "Small" model

REFERENCE_MARGIN = 1.0  # loss units: the GPT-2 val line is drawn once a run's lowest loss is this close

SERIES = {"train_loss": "train", "val_loss": "val", "hellaswag_acc_norm": "hellaswag"}


@dataclass
class Run:
    """One run's curves: step -> value. A step logged twice (a run resumed from a checkpoint
    repeats the steps since it) keeps the later value."""
    label: str
    train: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)
    hellaswag: dict = field(default_factory=dict)

    def points(self, series):
        steps = sorted(getattr(self, series))
        return steps, [getattr(self, series)[s] for s in steps]


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path, label=None):
    """A Run from a metrics.jsonl file. Unknown keys and events are ignored, and so are skipped
    steps (their loss is logged as the string "nan"); malformed lines, and curve values without a
    numeric step or not finite, are skipped with a warning."""
    run = Run(label or os.path.basename(os.path.dirname(os.path.abspath(path))) or path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as e:
                warnings.warn(f"{path}:{lineno}: skipping a malformed line ({e})")
                continue
            if not isinstance(event, dict):
                warnings.warn(f"{path}:{lineno}: skipping a line that is not a JSON object")
                continue
            if event.get("skipped") or not any(key in event for key in SERIES):
                continue  # other events, and steps the trainer skipped for a non-finite loss
            if not is_number(event.get("step")):
                warnings.warn(f"{path}:{lineno}: skipping a line without a numeric 'step'")
                continue
            for key, series in SERIES.items():
                if key in event:
                    if is_number(event[key]):
                        getattr(run, series)[event["step"]] = event[key]
                    else:
                        warnings.warn(f"{path}:{lineno}: skipping {key}={event[key]!r} (not a finite number)")
    return run


def draws_val_reference(losses):
    """Whether the GPT-2 validation line belongs on a plot of these losses: some come near it."""
    return bool(losses) and min(losses) <= GPT2_124M_VAL_LOSS + REFERENCE_MARGIN


def plot_metrics(paths, out_png, labels=None):
    """Draw the runs' curves into out_png (PNG, Agg backend: no display needed); returns out_png."""
    if labels is not None and len(labels) != len(paths):
        raise cli.BadInput(f"{len(labels)} labels for {len(paths)} runs: give one label per metrics file")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise cli.NotFound(f"no metrics file at {', '.join(missing)} (training writes <log_dir>/metrics.jsonl)")
    runs = [read_metrics(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    for run, path in zip(runs, paths):
        if not (run.train or run.val or run.hellaswag):
            warnings.warn(f"{path}: no train_loss, val_loss or hellaswag_acc_norm events to plot")

    with_hellaswag = any(run.hellaswag for run in runs)  # else one panel: no empty HellaSwag axes
    fig = Figure(figsize=(14 if with_hellaswag else 7, 5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2) if with_hellaswag else [fig.subplots(1, 1)]
    loss_ax = axes[0]
    for i, run in enumerate(runs):
        color = f"C{i}"
        loss_ax.plot(*run.points("train"), color=color, alpha=0.5, linewidth=0.8, label=f"{run.label} train")
        loss_ax.plot(*run.points("val"), color=color, marker="o", markersize=3, label=f"{run.label} val")
    losses = [v for run in runs for v in list(run.train.values()) + list(run.val.values())]
    reference = draws_val_reference(losses)
    if reference:
        loss_ax.axhline(GPT2_124M_VAL_LOSS, color="red", linestyle="--", label=f"GPT-2 124M val ({GPT2_124M_VAL_LOSS})")
    if with_hellaswag:
        hs_ax = axes[1]
        for i, run in enumerate(runs):
            hs_ax.plot(*run.points("hellaswag"), color=f"C{i}", marker="o", markersize=3, label=run.label)
        hs_ax.axhline(GPT2_124M_HELLASWAG, color="red", linestyle="--", label=f"GPT-2 124M ({GPT2_124M_HELLASWAG})")
        hs_ax.axhline(GPT3_124M_HELLASWAG, color="green", linestyle="--", label=f"GPT-3 124M ({GPT3_124M_HELLASWAG})")
        hs_ax.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
    if losses:  # once below 5.5, cut the first steps' loss (~11) that would squash the rest
        top = 6.0 if min(losses) < 5.5 else max(losses)
        bottom = min(min(losses), GPT2_124M_VAL_LOSS) if reference else min(losses)
        loss_ax.set_ylim(bottom - 0.1, top + 0.1)
    loss_ax.set(xlabel="step", ylabel="loss", title="Loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100, format="png")
    return out_png


# What ends the program with one line (the message says what to do); anything else is a bug. OSError:
# the disk's and the file system's problems writing the PNG (its message names the file).
USER_ERRORS = (cli.UserError, OSError)


def main(argv=None):
    p = cli.ArgumentParser(description="Plot loss and HellaSwag curves from metrics.jsonl files.")
    p.add_argument("metrics", nargs="+", help="one metrics.jsonl per run")
    p.add_argument("-o", "--out", default="loss.png", help="the PNG to write")
    p.add_argument("--labels", nargs="+", help="one name per run (default: each file's folder)")
    args = p.parse_args(argv)
    try:
        print(f"wrote {plot_metrics(args.metrics, args.out, args.labels)}")
    except USER_ERRORS as e:
        sys.exit(f"plot.py: error: {e}")


if __name__ == "__main__":
    main()
