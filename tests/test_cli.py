"""The scripts' one voice: --help everywhere, a user's mistake in one line, a bug's traceback kept;
the ETA; progress on long waits; evaluate.py's defaults from the checkpoint; the README's claims."""

import dataclasses
import os
import pickle
import re
import tempfile
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch

from tools import bench
from support import cli, evals, hf, runlog, runtime
from tools import compare
import convert_hf
import evaluate
import fineweb
from tools import plan
import plot
import train_gpt
from conftest import ROOT, tiny_args
from dataloader import ValidationData
from model import GPT, GPTConfig


def exit_message(main, args):
    """The SystemExit a main() ends with: its code, which sys.exit(message) makes the message."""
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


# ----------------------------------------------------------------------------------------------
# --help

@dataclass
class Sections:
    # first: the fields below
    a: int = 1  # the a
    # second, a title
    # over two lines
    b: str = "x"  # the b
    c: Optional[int] = None  # the c, added later with only its comment


def test_help_groups_come_from_the_section_comments():
    groups = cli.dataclass_groups(Sections)
    assert [(title, [(f.name, comment) for f, comment in entries]) for title, entries in groups] == [
        ("first: the fields below", [("a", "the a")]),
        ("second, a title over two lines", [("b", "the b"), ("c", "the c, added later with only its comment")])]
    text = cli.settings_help(Sections)
    assert re.search(r"--c=None +the c, added later", text)
    assert text.index("second, a title") < text.index("--c=None")


def test_train_gpt_help_lists_every_setting_with_default_and_meaning(capsys):
    train_gpt.main(["--help"])
    out = capsys.readouterr().out
    assert "unknown setting" not in out
    groups = cli.dataclass_groups(train_gpt.Settings)
    listed = [f.name for _, entries in groups for f, _ in entries]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(train_gpt.Settings))
    for title, entries in groups:
        assert f"{title}:" in out
        for field, comment in entries:
            assert comment, f"Settings.{field.name} has no trailing # comment for --help"
            line = next(l for l in out.splitlines() if l.strip().startswith(f"--{field.name}="))
            assert line.split()[0] == f"--{field.name}={cli.default_text(field)}"
            assert line.rstrip().endswith(comment)
            assert out.index(f"{title}:") < out.index(line)  # under its own group
    assert "--micro_batch_size=32" in out and "--demo sets model=tiny" in out
    recipes = ", ".join(train_gpt.RECIPES)  # issue 28.17: the list had lost modern; README.md's table too
    assert f"(RECIPES: {recipes})" in out
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f"`recipe` ({', '.join(f'`{name}`' for name in train_gpt.RECIPES)})" in f.read()


def test_every_model_option_is_defined_once_shown_by_help_and_reaches_the_model():
    """The model's options are written once, as model.ModelOptions' fields (issue 29): GPTConfig and
    train_gpt.Settings both inherit them, so each is a setting with the model's default, --help shows
    its comment, and given on the command line it reaches the GPTConfig that trains. Generated from
    the dataclasses: an option added there is tested here without a line of its own. Every option at
    once, each set to a value that is not its default: a bool flipped, a number doubled (a float
    made nonzero), a choice one the presets make, a None a number."""
    from model import GPTConfig, ModelOptions
    from support.presets import PRESETS
    options = dataclasses.fields(ModelOptions)
    settings = {f.name: f for f in dataclasses.fields(train_gpt.Settings)}
    help_text = train_gpt.settings_help()
    given = {}
    for f in options:
        assert (settings[f.name].type, settings[f.name].default) == (f.type, f.default), f.name
        comment = dict((g.name, c) for _, entries in cli.dataclass_groups(ModelOptions) for g, c in entries)[f.name]
        assert comment and re.search(rf"--{f.name}=\S+ +{re.escape(comment)}", help_text), f.name
        if isinstance(f.default, bool):
            given[f.name] = not f.default
        elif isinstance(f.default, (int, float)):
            given[f.name] = 2 * f.default or 1.5
        elif f.default is None:
            given[f.name] = 64
        else:  # a choice: another value the presets take
            given[f.name] = next(getattr(p, f.name) for p in PRESETS.values() if getattr(p, f.name, f.default) != f.default)
    config = train_gpt.resolve_model_settings(train_gpt.parse_settings([f"--{k}={v}" for k, v in given.items()]))
    assert {name: getattr(config, name) for name in given} == given
    own = {f.name for f in dataclasses.fields(GPTConfig)} - {f.name for f in options}
    assert own == {"vocab_size", "padded_vocab_size"}  # the rest of GPTConfig is options, none of them settings


def test_bench_help_lists_its_own_options(capsys):
    bench.main(["--help"])
    out = capsys.readouterr().out
    for field in dataclasses.fields(bench.BenchOptions):
        assert f"--{field.name}={cli.default_text(field)}" in out
    assert "unknown setting" not in out and "python train_gpt.py --help" in out
    assert "unknown setting --stepz" in exit_message(bench.main, ["--stepz=3"])


def test_compare_help_lists_its_own_options(capsys):
    compare.main(["--help"])
    out = capsys.readouterr().out
    for field in dataclasses.fields(compare.Bench):
        assert f"--{field.name}={cli.default_text(field)}" in out
    assert "python train_gpt.py --help" in out
    message = exit_message(compare.main, ["--stepz=3"])
    assert message.startswith("compare.py: error: unknown setting --stepz") and "\n" not in message


@pytest.mark.parametrize("main, own_option", [
    (evaluate.main, "--hellaswag_limit"), (convert_hf.main, "export"), (plot.main, "--labels"),
    (fineweb.main, "--shard-size"), (plan.main, "--gpu_memory")])
def test_every_script_answers_help_and_a_bad_argument_in_one_line(main, own_option, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and own_option in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--no_such_option"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and ": error: " in err and err.endswith("(see --help)\n")


@pytest.mark.parametrize("command", ["train_gpt.py"])  # tools.compare and tools.bench print it as it does (cli.print_help)
def test_help_read_only_in_part_ends_quietly(command):
    """`python train_gpt.py --help | head` ended in a BrokenPipeError traceback once head stopped reading.
    `true` reads nothing and has exited before Python starts: every write meets a closed pipe."""
    import subprocess, sys
    done = subprocess.run(f"set -o pipefail; {sys.executable} {command} --help | true", shell=True, cwd=ROOT,
                          capture_output=True, text=True, executable="/bin/bash")
    assert done.returncode == 0 and done.stderr == "", done.stderr


# ----------------------------------------------------------------------------------------------
# One line for a user's mistake, the traceback for a bug

def test_a_bug_keeps_its_traceback(monkeypatch):
    def buggy_train(s, stop=None):
        raise ValueError("a bug deep inside")
    monkeypatch.setattr(train_gpt, "train", buggy_train)
    with pytest.raises(ValueError, match="a bug deep inside"):
        train_gpt.main(["--model=tiny"])


def test_user_errors_end_in_one_line(tmp_path):
    np.save(tmp_path / "tokens.npy", np.arange(5))  # not a checkpoint: torch's refusal of it spans 6 lines
    not_a_checkpoint = "is damaged, or not a checkpoint that training wrote (UnpicklingError: "
    for main, args, expected in [
        (train_gpt.main, ["--max_steps=abc"], "train_gpt.py: error: --max_steps takes an integer, got 'abc'"),
        (train_gpt.main, ["--model=tiny", f"--data_dir={tmp_path}/none"], "data folder"),
        (evaluate.main, [f"--checkpoint={tmp_path}/none.pt", "--sample"], "is not a checkpoint file"),
        (convert_hf.main, ["export", f"{tmp_path}/none.pt", str(tmp_path / "out")], "is not a checkpoint file"),
        (convert_hf.main, ["import", f"{tmp_path}/none", str(tmp_path / "x.pt")], "is not a folder"),
        (evaluate.main, [f"--checkpoint={tmp_path}/tokens.npy", "--sample"], not_a_checkpoint),
        (convert_hf.main, ["export", f"{tmp_path}/tokens.npy", str(tmp_path / "out")], not_a_checkpoint),
        (plot.main, [f"{tmp_path}/none.jsonl"], "no metrics file"),
        (fineweb.main, ["--input", f"{tmp_path}/none.txt", "--out-dir", str(tmp_path / "o")], "does not exist"),
        (bench.main, ["--steps=0"], "--steps and --loader_batches must be positive"),
    ]:
        message = exit_message(main, args)
        assert isinstance(message, str) and "\n" not in message and expected in message, message
        assert re.match(r"\w+\.py: error: ", message), message
    assert not os.path.exists(tmp_path / "none")  # no log folder made for a run that cannot start
    # a pickle of numpy arrays: nor is torch's warning about its protocol shown (a line or two more on stderr)
    with open(tmp_path / "arrays.pkl", "wb") as f:
        pickle.dump({"w": np.arange(5)}, f, protocol=4)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        message = exit_message(convert_hf.main, ["export", str(tmp_path / "arrays.pkl"), str(tmp_path / "out")])
    assert shown == [] and re.fullmatch(
        f"convert_hf.py: error: {re.escape(str(tmp_path))}/arrays.pkl is damaged, or not a checkpoint that training "
        r"wrote \(UnpicklingError: [^\n]+\): give a ckpt_<step>.pt file or ckpt_<step>/ folder from a --log_dir",
        message), message


def test_batch_error_names_only_values_that_work():
    s = train_gpt.parse_settings(["--total_batch_size=1000"])
    train_gpt.resolve_model_settings(s)
    with pytest.raises(train_gpt.SettingsError) as e:
        train_gpt.check_batch_divisibility(s, 1)
    assert str(e.value).endswith("= 32 x 1024 x 1 = 32768. Values that work: --total_batch_size=32768.")
    s = train_gpt.parse_settings(["--micro_batch_size=24"])
    train_gpt.resolve_model_settings(s)
    with pytest.raises(train_gpt.SettingsError) as e:
        train_gpt.check_batch_divisibility(s, 1)
    # the README quotes this message for the default settings: it must stay what they give
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = " ".join(f.read().split())
    assert "python train_gpt.py --micro_batch_size=24" in readme
    assert str(e.value) in readme, str(e.value)
    assert "--micro_batch_size in [1, 2, 4, 8, 16, 32], or --total_batch_size=516096 or 540672." in str(e.value)


def test_bad_settings_stop_the_demo_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--demo", "--micro_batch_size=24", f"--log_dir={tmp_path}/log", f"--data_dir={tmp_path}/data"]
    message = exit_message(train_gpt.main, args)
    assert "not divisible" in message
    assert capsys.readouterr().out == ""  # no banner
    assert os.listdir(tmp_path) == []  # no data prepared, no log folder


def test_the_demo_names_one_real_run(tmp_path, capsys, monkeypatch):
    logged = []
    monkeypatch.setattr(fineweb, "prepare_dataset", lambda *a, **k: None)
    rt = runtime.Runtime(0, 0, 1, torch.device("cpu"), None, True)
    s = train_gpt.Settings(demo=True, data_dir=str(tmp_path / "data"), log_dir=str(tmp_path))
    train_gpt.prepare_demo_data(s, rt, logged.append)
    assert train_gpt.REAL_RUN in logged[0]
    assert "preparing the demo data once" in logged[1]  # the minute of preparation is announced
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 0, "train_loss": 10.9}\n{"step": 1, "val_loss": 9.0}\n')
    train_gpt.finish_demo(s)
    assert train_gpt.REAL_RUN in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Time: the ETA and progress

def test_eta_from_the_recent_step_rate():
    clock = runlog.TrainClock(done=0.0, end=1.0, window=2)
    assert clock.eta_seconds() is None
    clock.step_done(0.1, 30.0)  # a slow first step (start-up) ...
    assert clock.eta_seconds() == pytest.approx(270.0)
    clock.step_done(0.2, 1.0)
    clock.step_done(0.3, 1.0)  # ... forgotten once the window holds only steady steps
    assert clock.eta_seconds() == pytest.approx(7.0)
    assert re.fullmatch(r"\d+s elapsed, ETA 7s", clock.text())
    resumed = runlog.TrainClock(done=0.5, end=0.75)  # a resumed session aiming at a --stop_step
    resumed.step_done(0.55, 2.0)
    assert resumed.eta_seconds() == pytest.approx(8.0)
    assert [runlog.format_duration(x) for x in (4.4, 187, 7500, 3 * 86400 + 4 * 3600)] == \
        ["4s", "3m07s", "2h05m", "3d04h"]
    s = train_gpt.Settings(max_tokens=1000)
    assert runlog.session_done(50, 250, s) == 0.25  # the budget's tokens
    s.stop_step = 100
    assert runlog.session_done(50, 250, s) == 0.5  # a session that ends at its stop_step first


def test_step_line_carries_elapsed_and_eta(shards, tmp_path, monkeypatch):
    """... and on the CPU its MFU against a matmul in the dtype that trains, named (issue 28.14: a bf16
    run was measured against fp32 products and read "1.48x fp32 matmul")."""
    timed = []  # the yardstick's products, by dtype (not run: only what was asked is checked here)
    monkeypatch.setattr(runlog, "matmul_rate", lambda a, b: timed.append((a.dtype, b.dtype)) or 1e12)
    train_gpt.main(tiny_args(shards, str(tmp_path), max_steps=3, val_every=0, checkpoint_every=100, dtype="bfloat16",
                               peak_flops=0))  # 0: measured
    with open(tmp_path / "log.txt") as f:
        steps = [line for line in f if line.startswith("step ")]
    assert len(steps) == 3 and all(re.search(r"\| \d+s elapsed, ETA (\d+s|\d+m\d\ds)$", l) for l in steps)
    assert timed and set(timed) == {(torch.bfloat16, torch.bfloat16)}
    assert all(re.search(r" \| MFU \d+\.\d% of a bfloat16 matmul \| ", l) for l in steps), steps[0]


def test_validation_and_hellaswag_show_progress_when_asked(shards, capsys):
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16))
    data = ValidationData(shards, 32, 4096)
    quiet = evals.val_loss(model, data, 8)
    assert capsys.readouterr().err == ""
    assert evals.val_loss(model, data, 8, progress=True) == quiet
    assert "validation" in capsys.readouterr().err
    example = {"ctx": "A man sits", "endings": ["down.", "up.", "still.", "fast."], "label": 0}
    evals.hellaswag(model, [example] * 3, batch_size=2, progress=True)
    assert "HellaSwag" in capsys.readouterr().err


def test_fineweb_counts_documents_as_they_are_read():
    class Bar:
        shown = []

        def set_postfix_str(self, text, refresh):
            self.shown.append(text)
    docs = [f"document {i}" for i in range(3)]
    assert list(fineweb.counted(iter(docs), Bar())) == docs
    assert Bar.shown[0] == "1 documents read"  # the bar moves before any token comes back


# ----------------------------------------------------------------------------------------------
# evaluate.py on a checkpoint: its own data and sequence length

def test_evaluate_val_defaults_to_the_checkpoints_data(shards, tmp_path, monkeypatch, capsys):
    log = str(tmp_path / "log")
    train_gpt.main(tiny_args(shards, log, max_steps=2, seq_len=16, val_every=0, checkpoint_every=2))
    ckpt = os.path.join(log, "ckpt_0000002.pt")
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # no edu_fineweb10B here: the old default would fail
    results = evaluate.main([f"--checkpoint={ckpt}", "--val", "--val_tokens=2048", "--quiet"])
    model = evals.load_checkpoint_model(ckpt)
    expected = evals.val_loss(model, ValidationData(shards, 16, 2048), 16)  # seq_len 16, not block 32
    assert results["val_loss"] == pytest.approx(expected, rel=1e-6)
    out = capsys.readouterr()
    assert f" of {shards}" in out.out and out.err == ""  # --quiet: no bar

    state = torch.load(ckpt, weights_only=True)
    state["settings"]["data_dir"] = os.path.join("data", "wiki")  # as the demo's checkpoints say
    torch.save(state, tmp_path / "demo.pt")
    message = exit_message(evaluate.main, [f"--checkpoint={tmp_path}/demo.pt", "--val"])
    assert "'data/wiki' (the checkpoint's data_dir) does not exist" in message
    assert "`python fineweb.py --source wiki`" in message
    assert evaluate.make_data_command("edu_fineweb10B") == "python fineweb.py"
    assert evaluate.make_data_command("mine") == "python fineweb.py --input FILES --out-dir=mine"


# ----------------------------------------------------------------------------------------------
# Files and plots

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_exported_files_follow_the_umask(tmp_path, umask, mode):
    config = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
    old = os.umask(umask)
    try:
        hf.export_hf(GPT(config), config, str(tmp_path))
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode


def test_the_fineweb_reference_line_is_drawn_only_near_the_curves():
    assert not plot.draws_val_reference([10.9, 7.5, 7.1])  # the demo on Wikipedia
    assert plot.draws_val_reference([10.9, 4.0])  # a FineWeb-EDU run getting close
    assert not plot.draws_val_reference([])


def test_tests_write_their_temporary_files_under_pytests_folder(tmp_path_factory):
    assert tempfile.gettempdir().startswith(str(tmp_path_factory.getbasetemp()))
    assert os.environ["TMPDIR"] == tempfile.gettempdir()


def test_hybrid_sharding_settings_are_checked_at_start():
    with pytest.raises(train_gpt.SettingsError, match="it needs --fsdp"):
        train_gpt.check_sharding(train_gpt.parse_settings(["--fsdp_shard_size=2"]), 4)
    with pytest.raises(train_gpt.SettingsError, match=r"choose one of \[1, 2, 3, 6\]"):
        train_gpt.check_sharding(train_gpt.parse_settings(["--fsdp", "--fsdp_shard_size=4"]), 6)
    train_gpt.check_sharding(train_gpt.parse_settings(["--fsdp", "--fsdp_shard_size=2"]), 4)  # 2 x 2: fine
