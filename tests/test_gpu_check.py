"""tools/gpu_check.sh on the CPU: it runs on a lent GPU, so its logic is checked here by its dry run
(DRY_RUN=1), which lists each step's command with every variable expanded and the budget applied. For
every SECTIONS value: no unset variable, the commands' settings are ones the commands take, the
checks named exist; the default order (what never ran on a GPU first) and its fit in the budget; and
the verdicts of the helpers that compare two runs' losses."""

import json
import os
import re
import shlex
import subprocess

import pytest

import train_gpt
from conftest import ROOT
from tools import bench, gpu_check

SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")


def dry_run(**env):
    """The dry run's steps: [(id, estimate or None when skipped, command)], and its stdout."""
    done = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], **env})  # nothing else set: the script sets what it uses
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    steps = []
    for line, command in zip(lines, lines[1:]):
        run = re.match(r"== (\w+) \(~(\d+) s, timeout \d+ s\): ", line)
        skipped = re.match(r"== (\w+): skipped, ", line)
        if run or skipped:
            assert command.startswith("   ")
            steps.append(((run or skipped).group(1), int(run.group(2)) if run else None, command.strip()))
    return steps, done.stdout


def check_command(command, helpers):
    """Each part of a step's command, as the program it calls would take it: train_gpt.py's and
    tools/bench.py's settings parsed by them, tools/gpu_check.py's checks by name, the helpers defined."""
    for part in re.split(r" && | \| ", command):
        words = [w for w in shlex.split(part) if not re.match(r"\d*>", w)]  # no redirections
        words = words[1:] if words[0].startswith("TORCH_LOGS=") else words
        if "train_gpt.py" in words:
            args = words[words.index("train_gpt.py") + 1:]
            s = train_gpt.parse_settings(args)
            if s.resume == "auto":  # a checkpoint to resume from is made by the step's first run
                train_gpt.resolve_model_settings(s)
        elif words[:3] == ["python3", "-m", "tools.bench"]:
            bench.parse_args(words[3:])
        elif words[:3] == ["python3", "-m", "tools.gpu_check"]:
            names = {fn.__name__ for fns in gpu_check.CHECKS.values() for fn in fns} | set(gpu_check.CHECKS)
            assert set(words[3:]) <= names, words
        elif "tools.plan" in words:
            assert "--check" in words and words[0] == "torchrun"
        else:
            assert words[0] in helpers | {"nvidia-smi", "python3", "tee"}, part


def test_every_section_lists_its_steps_with_every_setting_valid():
    """Issue 28.12: SECTIONS=2 printed `GPT2: unbound variable` for every benchmark, then `done`, and
    exit 0. Under set -u every section's dry run expands all its commands, each one valid."""
    helpers = set(re.search(r"^export -f (.+)$", open(SCRIPT).read(), re.M).group(1).split())
    for section in "12345678":
        steps, _ = dry_run(SECTIONS=section, BUDGET_S="100000")
        assert steps[0][0] == "setup" and len(steps) > 1
        assert all(step_id[0] == section and estimate for step_id, estimate, _ in steps[1:]), steps
        for _, _, command in steps:
            assert "$" not in command
            check_command(command, helpers)


def test_the_default_runs_what_never_ran_on_a_gpu_first_within_the_budget():
    """8 (tensor parallelism's code), 6 (banded attention), 7 (the modern GPT), 5 (FSDP + Muon), then
    the MFU benchmarks, then the rest; by their estimates the first four fit in 11 minutes, the rest
    is skipped and named."""
    steps, out = dry_run()
    sections = [step_id[0] for step_id, _, _ in steps[1:]]
    assert list(dict.fromkeys(sections)) == list("86752134")
    ran = [step_id for step_id, estimate, _ in steps if estimate]
    assert [s for s in ran if s[0] in "8675"] == [s for s, _, _ in steps if s[0] in "8675"]
    assert sum(estimate for _, estimate, _ in steps if estimate) <= 660
    assert re.search(r'not run \(or cut\) for the 660 s budget: sections [1-8 ]+; SECTIONS="[1-8 ]+" bash', out)
    assert "| 8 | would run | ~" in out and "| 4c | SKIP (budget) | - |" in out


def test_bad_sections_are_refused_in_one_line():
    done = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env={"PATH": os.environ["PATH"],
                                                                                 "SECTIONS": "2 9"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == 'gpu_check.sh: error: SECTIONS="2 9": 9 is not a section; choose from 1 2 3 4 5 6 7 8\n'


@pytest.mark.parametrize("resumed, tolerance, ok", [({6: 2.5, 7: 2.25}, "0", True), ({6: 2.5, 7: 2.2500001}, "0", False),
                                                    ({6: 2.5, 7: 2.2500001}, "1e-6", True), ({6: 2.5}, "1e-6", False)])
def test_same_losses_compares_a_resumed_run_with_the_straight_one(tmp_path, resumed, tolerance, ok):
    """The helper 5b and 7b end with: the resumed run's losses from step 6 on against the straight run's."""
    for name, losses in (("straight", {5: 3.0, 6: 2.5, 7: 2.25}), ("resumed", resumed)):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps({"step": s, "train_loss": x}) + "\n" for s, x in losses.items())
    helper = re.search(r"^same_losses\(\) \{.*?^\}$", open(SCRIPT).read(), re.M | re.S).group(0)
    done = subprocess.run(["bash", "-c", f"{helper}\nsame_losses {tmp_path}/straight {tmp_path}/resumed 6 {tolerance}"],
                          capture_output=True, text=True)
    assert (done.returncode == 0) is ok, done.stdout + done.stderr
