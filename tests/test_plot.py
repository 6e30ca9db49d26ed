"""plot.py: curves from metrics.jsonl files as train_gpt.py writes them."""

import json
import os
import subprocess
import sys
import warnings

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path, steps=20, bad_line=True):
    """A run's metrics.jsonl: train events every step, validation and HellaSwag every 5, one
    skipped step, an unknown event, and (optionally) a malformed line."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = []
    for s in range(steps):
        lines.append(json.dumps(dict(step=s, train_loss=11 - 0.3 * s, lr=6e-4, grad_norm=1.0, tokens_per_sec=1e5,
                                     ms=100.0, mfu=0.4, tokens=s * 2**19)))
        if s % 5 == 0:
            lines.append(json.dumps(dict(step=s, val_loss=11.2 - 0.3 * s)))
            lines.append(json.dumps(dict(step=s, hellaswag_acc=0.25, hellaswag_acc_norm=0.25 + 0.002 * s,
                                         hellaswag_n=10042)))
    lines.append(json.dumps(dict(step=steps, skipped=True, train_loss="nan", grad_norm="inf")))
    lines.append(json.dumps(dict(event="resumed", checkpoint="ckpt_0000010.pt")))
    if bad_line:
        lines.append('{"step": 3, "train_loss": 4.')  # a line cut off by a crash
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000  # two panels with curves, not an empty canvas


def test_plot_two_runs_writes_a_png(tmp_path):
    a = write_run(tmp_path / "runA" / "metrics.jsonl", bad_line=False)
    b = write_run(tmp_path / "runB" / "metrics.jsonl", steps=12, bad_line=False)
    out = plot.plot_metrics([a, b], str(tmp_path / "out" / "loss.png"), labels=["A", "B"])
    assert out == str(tmp_path / "out" / "loss.png")
    assert_png(out)


def png_width(path):
    with open(path, "rb") as f:
        return int.from_bytes(f.read(24)[16:20], "big")  # the IHDR chunk's width


def test_hellaswag_panel_only_when_there_are_results(tmp_path):
    with_hs = write_run(tmp_path / "a" / "metrics.jsonl", bad_line=False)
    lines = [l for l in open(with_hs) if "hellaswag" not in l]
    without = tmp_path / "b" / "metrics.jsonl"
    os.makedirs(without.parent)
    without.write_text("".join(lines))
    two = plot.plot_metrics([with_hs], str(tmp_path / "two.png"))
    one = plot.plot_metrics([str(without)], str(tmp_path / "one.png"))
    assert_png(one)
    assert png_width(two) == 1400 and png_width(one) == 700  # 14 and 7 inches at 100 dpi


def test_read_metrics_keeps_the_curves_and_skips_bad_lines_with_a_warning(tmp_path):
    path = write_run(tmp_path / "run" / "metrics.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(dict(step=4, train_loss=1.5)) + "\n")  # step 4 again, after a resume
    with open(path, "a") as f:
        f.write(json.dumps(dict(val_loss=2.0)) + "\n")  # a curve value without a step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = plot.read_metrics(path)
    messages = sorted(str(w.message).split(": ", 1)[1].split(" (")[0] for w in caught)
    assert messages == ["skipping a line without a numeric 'step'",  # the unknown and skipped events
                        "skipping a malformed line"]  # pass quietly
    assert run.label == "run"
    assert len(run.train) == 20 and run.train[4] == 1.5 and run.train[5] == pytest.approx(9.5)
    assert run.points("val") == ([0, 5, 10, 15], pytest.approx([11.2, 9.7, 8.2, 6.7]))
    assert run.hellaswag[15] == pytest.approx(0.28)


def test_plot_cli(tmp_path):
    path = write_run(tmp_path / "run" / "metrics.jsonl")
    out = tmp_path / "cli.png"
    done = subprocess.run([sys.executable, os.path.join(REPO, "plot.py"), path, "-o", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "skipping a malformed line" in done.stderr and f"wrote {out}" in done.stdout
    assert_png(out)


def test_plot_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file at .*missing.jsonl"):
        plot.plot_metrics([str(tmp_path / "missing.jsonl")], str(tmp_path / "x.png"))
    path = write_run(tmp_path / "run" / "metrics.jsonl", bad_line=False)
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        plot.plot_metrics([path], str(tmp_path / "x.png"), labels=["a", "b"])
    assert not os.path.exists(tmp_path / "x.png")
