"""tracking.py: W&B (offline) and TensorBoard receive metrics.jsonl's events from a real training run,
read back with their own readers, and a resumed run continues the same W&B run and TensorBoard folder."""

import glob
import json
import os

import pytest

from support import evals, tracking
import train_gpt
from conftest import read_metrics, tiny_args

# Two short HellaSwag examples, so that the runs log HellaSwag events too (fit block_size 32)
HELLASWAG = [dict(ctx="The cat sat on the", endings=["mat.", "moon.", "sea.", "sky."], label=0),
             dict(ctx="She drank a cup of", endings=["tea.", "rocks.", "shoes.", "air."], label=0)]
TAGS = ("train_loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "val_loss", "hellaswag_acc", "hellaswag_acc_norm")


@pytest.fixture
def fresh_wandb():
    """W&B reads its environment (WANDB_MODE, WANDB_DIR ...) once per process, at its first run:
    each test starts and ends with a fresh W&B, so that the environment it sets is the one used."""
    import wandb
    wandb.teardown()
    yield
    wandb.teardown()


def wandb_records(path):
    """The records of a .wandb file: W&B's log format (LevelDB's: 32 KiB blocks of chunks, each a
    7-byte header of crc32, length and type) holding wandb_internal_pb2.Record protos. wandb 0.31
    no longer ships a Python reader for it."""
    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little of the block left for a header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero fill: the end of what was written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def wandb_offline_run(run_dir):
    """(run id, display name, config, history rows) of an offline run folder."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    run_id, name, config, history = None, None, {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, name = record.run.run_id, record.run.display_name
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append({k: v for k, v in row.items() if not k.startswith("_")})  # W&B's own _step, _runtime
    return run_id, name, config, history


def train_session(args):
    """One training session as its own process would end it, W&B's files complete. run.finish()
    returns once the run's exit is handled, but wandb-core writes an offline run's .wandb file in
    32 KiB blocks and completes it when it closes the run's stream, after finish, asynchronously
    (on a busy machine the file was read still empty: its run id None). A process's exit tears W&B
    down, which waits for wandb-core to exit with every file closed: wandb.teardown() does that here."""
    import wandb
    train_gpt.main(args)
    wandb.teardown()


def scalar_rows(events):
    return [{"step": e["step"], **tracking.scalars(e)} for e in events]


def test_wandb_offline_and_tensorboard_get_every_event_and_a_resume_continues_them(shards, tmp_path, monkeypatch,
                                                                                     one_thread, fresh_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setattr(evals, "hellaswag_examples_distributed", lambda rank=0, **kwargs: HELLASWAG)
    log_dir = str(tmp_path / "run")
    args = tiny_args(shards, log_dir, hellaswag_every=5, wandb_project="tests", wandb_run_name="tiny-run",
                     tensorboard=True)
    train_session(args)  # steps 0-9; checkpoints after 5 and 10 steps
    before = read_metrics(log_dir)
    os.remove(os.path.join(log_dir, "ckpt_0000010.pt"))  # as if the run had died before its last checkpoint
    train_session(args)  # resumes after 5 steps: steps 5-9 again
    events = read_metrics(log_dir)
    # metrics.jsonl was cut back to the checkpoint: steps 0-4 and the evaluations after 5 steps, made
    # before it was written; then the resumed session's events. One line per step (issue 28.6).
    kept = [e for e in before if e["step"] < 5 or (e["step"] == 5 and "train_loss" not in e)]
    assert events[:len(kept)] == kept and len(kept) < len(before)
    after = events[len(kept):]
    assert after[0]["step"] == 5 and {e["step"] for e in before if "hellaswag_acc" in e} == {5, 10}
    assert [e["step"] for e in events if "train_loss" in e] == list(range(10))
    assert [e["step"] for e in events if "val_loss" in e] == [5, 10]

    # W&B: two offline sessions of one run, each holding its session's events and the settings (its
    # history only grows: steps 5-9 are in both)
    run_dirs = sorted(glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*")))
    assert len(run_dirs) == 2
    with open(os.path.join(log_dir, tracking.WANDB_ID_FILE)) as f:
        run_id = f.read().strip()
    for run_dir, session in zip(run_dirs, (before, after)):
        got_id, name, config, history = wandb_offline_run(run_dir)
        assert got_id == run_id and name == "tiny-run"
        assert history == scalar_rows(session)
        assert config["model"] == "tiny" and config["max_steps"] == 10 and config["wandb_project"] == "tests"

    # TensorBoard: its reader merges both sessions' files; the first session's events from the
    # resumed checkpoint on (step 5 and up) are dropped, so it shows what metrics.jsonl holds
    accumulator = EventAccumulator(log_dir)
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) >= set(TAGS)
    for tag in TAGS:
        expected = sorted((e["step"], e[tag]) for e in events if tag in e)
        got = sorted((s.step, s.value) for s in accumulator.Scalars(tag))
        assert [step for step, _ in got] == [step for step, _ in expected], tag
        assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-6), tag


def test_a_tracker_without_its_package_is_a_clear_error_before_training(shards, tmp_path, monkeypatch):
    real_find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "tensorboard") else real_find_spec(name, *a))
    for setting, package in (("--wandb_project=p", "wandb"), ("--tensorboard=True", "tensorboard")):
        log_dir = str(tmp_path / package)
        with pytest.raises(SystemExit) as e:
            train_gpt.main(tiny_args(shards, log_dir) + [setting])
        message = str(e.value.code)
        assert f"needs the {package} package" in message and "pip install -r requirements-extras.txt" in message
        assert not os.path.exists(os.path.join(log_dir, "metrics.jsonl"))  # stopped before any step
    with pytest.raises(SystemExit, match="give --wandb_project"):
        train_gpt.main(tiny_args(shards, str(tmp_path / "id")) + ["--wandb_run_id=abc"])


def test_wandb_not_logged_in_is_a_clear_error_before_training(shards, tmp_path, monkeypatch, fresh_wandb):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there; never reached
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # no saved login
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    log_dir = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train_gpt.main(tiny_args(shards, log_dir, wandb_project="p"))
    message = str(e.value.code)
    assert "W&B could not start the run" in message and "WANDB_MODE=offline" in message, message
    assert not os.path.exists(os.path.join(log_dir, "metrics.jsonl"))
