"""Quality benchmark: train recipes side by side and compare validation loss per token.

    python -m tools.compare                                            # gpt3, fast and modern at the demo's size, data/wiki
    python -m tools.compare --data_dir=data/vimdoc --n_layer=8                 # another data set, a deeper model
    python -m tools.compare --recipes=gpt3,fast,fast:muon_lr=0.04,gpt3:schedule=wsd   # other recipes (an LR sweep)
    python -m tools.compare --short=modern@0.7,modern@0.3              # short runs of one recipe, each at its fraction
    python -m tools.compare --model=gpt2 --data_dir=edu_fineweb10B --tokens=1e9 --total_batch_size=524288 \\
        --micro_batch_size=32 --device=cuda                      # the same at 124M on a GPU

Every recipe trains the same model from the same seed on the same shards for the same token budget
(train_gpt.main, one run after the other), and is evaluated on the same validation tokens at the same
token counts. The table gives the val loss at equal tokens, the tokens each recipe needs to reach the
baseline's (first recipe's) final val loss, and their ratio; the plot shows val loss against tokens.

A schedule that decays at the end (cosine, and wsd even more) reaches low losses only once it has
decayed, so a curve of one long run understates how few tokens a recipe needs. --short=0.7 (the
default) trains each other recipe a second time with 0.7x the budget (its schedule fitted to the
shorter run) and reports whether that run ends at or below the final val loss of each recipe listed
before it: the direct test of "the same loss in 0.7x the tokens". --short=modern@0.7,modern@0.3
trains only the named recipes, each at its own fraction (modern at 0.7x and at 0.3x, each against
fast's final and gpt3's), so one call tests two baselines.

Recipes: a name in train_gpt.RECIPES (gpt3: train_gpt's defaults, AdamW, warmup + cosine to 10%; fast, modern),
each optionally followed by :name=value settings of its own. Any other --name=value is a train_gpt
setting given to every recipe (model size, data, batch, device ...); --model trains that preset's size
and batch instead of the demo's, and the results name the model each recipe trains.
"""

import dataclasses
import glob
import math
import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import torch

import train_gpt
from model import GPT, num_params
from plot import read_metrics
from support import cli


@dataclass
class Bench:
    recipes: str = "gpt3,fast,modern"  # comma-separated; the first is the baseline; name[:setting=value...]
    tokens: float = 245_760  # token budget of each run (60 steps of the demo's 4,096: 0.4 epoch of data/wiki)
    evals: int = 4  # evaluations per run, evenly spaced in tokens (and one at the end)
    short: str = "0.7"  # also train each non-baseline recipe with this fraction of the budget, or RECIPE@FRACTION,... for named ones; 0 = off
    out_dir: str = "log/compare"  # one folder per run, the table (results.md) and the plot (val_loss.png)


# What every run shares unless given: the demo's model, data and batch (train_gpt.DEMO), 16,384 val
# tokens, no HellaSwag or samples, a checkpoint only at the end, warmup over 10% of the steps. With
# --model the preset's size and batch train instead of the demo's (DEMO_SIZE); a setting given wins.
DEMO_SIZE = ("n_head", "n_embd", "total_batch_size", "micro_batch_size")
SHARED = dict({k: v for k, v in train_gpt.DEMO.items() if k in ("model", "data_dir") + DEMO_SIZE}, val_tokens=2**14,
              hellaswag_every=0, sample_every=0, device="cpu", resume="off")


def parse_args(argv):
    """(Bench, {train setting: text}) from --name=value arguments."""
    bench_fields = {f.name: f.type for f in dataclasses.fields(Bench)}
    train_fields = {f.name for f in dataclasses.fields(train_gpt.Settings)}
    bench, shared = {}, dict(SHARED)
    for arg in argv:
        name, eq, text = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"unexpected argument {arg!r}: settings are given as --name=value")
        if name in bench_fields:
            bench[name] = bench_fields[name](float(text)) if bench_fields[name] in (int, float) else text
        elif name in train_fields - {"log_dir", "max_steps", "max_tokens", "decay_tokens", "val_every", "recipe", "stop_step"}:
            shared[name] = text
        else:
            raise ValueError(f"unknown setting --{name}: compare.py takes {', '.join(bench_fields)} and "
                             f"train_gpt's settings except log_dir, max_steps, max_tokens, decay_tokens, val_every, recipe, stop_step")
    given = {arg[2:].partition("=")[0].replace("-", "_") for arg in argv}
    if "model" in given:  # the preset's size and batch, not the demo's
        shared = {k: v for k, v in shared.items() if k not in DEMO_SIZE or k in given}
    return Bench(**bench), shared


def resolve(shared, spec):
    """The settings a recipe's run trains with (train_gpt's, checked as train_gpt.py checks them)
    and its model's GPTConfig."""
    s = train_gpt.parse_settings([f"--{k}={v}" for k, v in shared.items()] + recipe_args(spec))
    return s, train_gpt.resolve_model_settings(s)


def describe_models(shared, specs):
    """One line naming the model each recipe trains: preset, shape and parameters (the
    architectures differ: an untied head adds a matrix)."""
    shapes = {}
    for spec in specs:
        s, config = resolve(shared, spec)
        with torch.device("meta"):  # counted, not allocated
            params = num_params(GPT(config))
        shape = f"{s.model}, {config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, context {s.seq_len}"
        shapes.setdefault(shape, []).append(f"{spec} {params:,} parameters")
    return "model: " + "; ".join(f"{shape} ({', '.join(sizes)})" for shape, sizes in shapes.items())


def recipe_args(spec):
    """'fast:muon_lr=0.04' -> ['--recipe=fast', '--muon_lr=0.04'] (train_gpt.RECIPES; gpt3: the defaults)."""
    name, *overrides = spec.split(":")
    if name not in train_gpt.RECIPES:
        raise ValueError(f"unknown recipe {name!r}: one of {', '.join(train_gpt.RECIPES)}")
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"recipe {spec!r}: write its settings as name=value, got {o!r}")
    return [f"--recipe={name}"] + [f"--{o}" for o in overrides]


def short_runs(text, specs):
    """--short -> [(recipe spec, fraction)]: "0.6" is every recipe but the baseline at 0.6x (0: none),
    "modern@0.7,modern@0.3" the named recipes (as --recipes spells them) at their fractions."""
    runs = []
    for item in text.split(","):
        spec, at, fraction = item.rpartition("@")
        try:
            value = float(fraction)
        except ValueError:
            raise ValueError(f"--short={text}: {item!r} is neither a fraction nor RECIPE@FRACTION") from None
        if not 0 <= value < 1:
            raise ValueError(f"--short={text}: a fraction must be in [0, 1), got {fraction}")
        if at and spec not in specs[1:]:
            raise ValueError(f"--short={text}: {spec!r} is not one of the non-baseline --recipes ({', '.join(specs[1:])})")
        runs += [(name, value) for name in ([spec] if at else specs[1:]) if value > 0 and (name, value) not in runs]
    return runs


def train_tokens(data_dir):
    """Tokens in the training split (every *_train_* shard)."""
    shards = glob.glob(os.path.join(data_dir, "*_train_*"))
    return sum(len(np.load(p, mmap_mode="r")) if p.endswith(".npy") else os.path.getsize(p) // 2 for p in shards)


def epoch_note(budget, have, data_dir):
    if budget <= have:
        return f"budget {budget:,} tokens is under one epoch of {data_dir}'s {have:,} train tokens"
    return (f"NOTE: budget {budget:,} tokens is MORE than one epoch of {data_dir}'s {have:,} train tokens: "
            f"the runs see repeated data")


def run_recipe(spec, steps, batch, val_every, shared, log_dir):
    """Train one recipe from scratch, steps of batch tokens; returns {tokens: val loss}."""
    shutil.rmtree(log_dir, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    args = [f"--{k}={v}" for k, v in shared.items()] + recipe_args(spec)
    args += [f"--max_steps={steps}", f"--val_every={val_every}", f"--checkpoint_every={steps}", f"--log_dir={log_dir}"]
    if not any(a.startswith(("--warmup_steps=", "--warmup_tokens=")) for a in args):
        args.append(f"--warmup_steps={max(1, steps // 10)}")
    print(f"\n== {spec}: python train_gpt.py {' '.join(args)}", flush=True)
    train_gpt.main(args)
    return {step * batch: loss for step, loss in read_metrics(os.path.join(log_dir, "metrics.jsonl")).val.items()}


def tokens_to_reach(curve, target):
    """The tokens at which a val-loss curve first reaches target, interpolated linearly between the
    two evaluations around it; None if it never does."""
    points = sorted(curve.items())
    for i, (tokens, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return tokens
            t0, l0 = points[i - 1]
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
    return None


def results_table(curves, short=None):
    """Markdown: val loss at equal tokens; then, for the baseline (and each later recipe that a
    later one is measured against), the tokens each recipe after it needs to reach its final loss
    and the ratio; then the short runs ({(spec, fraction): curve}), each against the final loss of
    every recipe listed before it."""
    names = list(curves)
    base = names[0]
    finals = {n: curves[n][max(curves[n])] for n in names}
    lines = ["| tokens | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for tokens in sorted(curves[base]):
        lines.append(f"| {tokens:,} | " + " | ".join(f"{curves[n].get(tokens, math.nan):.4f}" for n in names) + " |")
    full = max(curves[base])
    for i, target_name in enumerate(names[:-1]):
        target = finals[target_name]
        which = "the baseline's" if i == 0 else f"{target_name}'s"
        lines += ["", f"Tokens to reach {which} ({target_name}) final val loss {target:.4f}:", "",
                  f"| recipe | final val loss | tokens to reach it | ratio to {'baseline' if i == 0 else target_name} |",
                  "|---|---:|---:|---:|"]
        for n in names[i:] if i == 0 else names[i + 1:]:
            t = tokens_to_reach(curves[n], target)
            lines.append(f"| {n} | {finals[n]:.4f} | {'not reached' if t is None else f'{t:,.0f}'} | "
                         f"{'-' if t is None else f'{t / full:.2f}'} |")
    if short:
        lines += ["", "Trained with a fraction of the tokens (schedule fitted to the shorter run), against the final "
                  "val loss of each recipe listed before it:", "",
                  "| recipe | tokens | final val loss | " + " | ".join(f"reaches {n}'s {finals[n]:.4f}" for n in names[:-1])
                  + " |", "|---|---:|---:|" + "---|" * (len(names) - 1)]
        for (n, _), curve in short.items():
            end = max(curve)
            before = names[:names.index(n)]
            cells = [f"{'yes' if curve[end] <= finals[b] else 'no'} ({curve[end] - finals[b]:+.4f})" if b in before
                     else "-" for b in names[:-1]]
            lines.append(f"| {n} | {end:,} ({end / full:.2f}x) | {curve[end]:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves, short, out_png):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (name, curve) in enumerate(curves.items()):
        x = sorted(curve)
        ax.plot(x, [curve[t] for t in x], marker="o", markersize=3, color=f"C{i}", label=name)
        runs = [(fraction, short_curve) for (spec, fraction), short_curve in short.items() if spec == name]
        for (fraction, short_curve), (marker, style) in zip(runs, [("x", ":"), ("+", "-."), ("^", "--")] * 9):
            xs = sorted(short_curve)
            ax.plot(xs, [short_curve[t] for t in xs], marker=marker, linestyle=style, color=f"C{i}",
                    label=f"{name} ({fraction:g}x run)")
    base = next(iter(curves.values()))
    ax.axhline(base[max(base)], color="grey", linestyle="--", linewidth=0.8, label="baseline final")
    ax.set(xlabel="tokens", ylabel="val loss", title="Validation loss per token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return out_png


def compare_help():
    """--help: compare.py's own options, then what it passes on to train_gpt.py."""
    return (f"usage: python -m tools.compare [--name=value ...]\n{cli.summary(__doc__)}\n\n"
            f"compare.py's own options:\n{cli.settings_help(Bench)}\n\n"
            f"Every other --name=value is a train_gpt.py setting shared by all runs (`python train_gpt.py "
            f"--help`), except log_dir, max_steps, max_tokens, decay_tokens, val_every, recipe and stop_step, "
            f"which compare.py sets. Shared defaults: {', '.join(f'{k}={v}' for k, v in SHARED.items())}; "
            f"with --model, that preset's size and batch instead of the demo's {', '.join(DEMO_SIZE)}.")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        cli.print_help(compare_help())
        return None
    try:
        bench, shared = parse_args(argv)
        specs = bench.recipes.split(",")
        model = describe_models(shared, specs)
        batch = resolve(shared, specs[0])[0].total_batch_size
        steps = int(bench.tokens) // batch
        if steps < bench.evals or bench.evals < 1:
            raise ValueError(f"--tokens={bench.tokens:g} is {steps} steps of {batch} tokens: too few for "
                             f"{bench.evals} evaluations; raise --tokens or lower --evals")
        have = train_tokens(shared["data_dir"])
        if have == 0:
            raise ValueError(f"no *_train_* shards in {shared['data_dir']}: prepare it (python fineweb.py --source wiki)")
        shorts = short_runs(bench.short, specs)
        for spec, fraction in shorts:
            if int(steps * fraction) < 1:
                raise ValueError(f"--short: {spec} at {fraction:g}x of {steps} steps is no step; raise --tokens")
    except ValueError as e:
        sys.exit(f"compare.py: error: {e}")
    note = epoch_note(steps * batch, have, shared["data_dir"])
    print(f"{model}\n{note}", flush=True)
    val_every = steps // bench.evals
    curves, short = {}, {}
    for i, spec in enumerate(specs):
        curves[spec] = run_recipe(spec, steps, batch, val_every, shared, os.path.join(bench.out_dir, f"run{i}"))
    for spec, fraction in shorts:
        short_steps = int(steps * fraction)  # rounded down: never more than the fraction
        short[spec, fraction] = run_recipe(spec, short_steps, batch, max(1, short_steps // 4), shared,
                                           os.path.join(bench.out_dir, f"run{specs.index(spec)}_short{fraction:g}"))
    header = (f"python -m tools.compare {' '.join(argv)}\n\n"
              f"{model}\n\nsettings: {', '.join(f'{k}={v}' for k, v in shared.items())}; {steps} steps of "
              f"{batch:,} tokens\n\n{note}\n")
    table = header + "\n" + results_table(curves, short)
    with open(os.path.join(bench.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    png = plot_curves(curves, short, os.path.join(bench.out_dir, "val_loss.png"))
    print("\n" + table + f"\n\nplot: {png}; table: {bench.out_dir}/results.md")
    return curves, short


if __name__ == "__main__":
    main()
