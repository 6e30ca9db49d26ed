import os
import shutil

import numpy as np
import pytest
import torch

from conftest import write_shards
from dataloader import BIN_MAGIC, DataLoader, ValidationData


def windows_of_one_epoch(data_dir, B, T, world_size, seed=0):
    loaders = [DataLoader(data_dir, B, T, r, world_size, seed=seed, log=lambda m: None) for r in range(world_size)]
    seen = []
    steps = loaders[0].total_windows // (B * world_size)
    for _ in range(steps):
        for loader in loaders:
            x, y = loader.next_batch()
            assert x.shape == y.shape == (B, T) and x.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
            seen += [tuple(row.tolist()) for row in x]
    return loaders, seen


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_window_exactly_once_per_epoch(tmp_path, world_size):
    # Shards of different lengths, with token values that identify their position.
    for i, n in enumerate([1000, 777, 1500]):
        np.save(tmp_path / f"d_train_{i + 1:06d}.npy", (np.arange(n) + 2000 * i).astype(np.uint16))
    B, T = 4, 16
    loaders, seen = windows_of_one_epoch(str(tmp_path), B, T, world_size)
    total = loaders[0].total_windows
    assert total == 999 // 16 + 776 // 16 + 1499 // 16
    assert len(seen) == len(set(seen))  # no window twice, across ranks and steps
    assert total - len(seen) < B * world_size  # only a remainder smaller than a global batch is skipped
    # the order is shuffled, not the file order
    firsts = [w[0] for w in seen]
    assert firsts != sorted(firsts)


def test_epochs_are_reshuffled_and_logged(tmp_path):
    np.save(tmp_path / "d_train_000001.npy", np.arange(1000, dtype=np.uint16))
    logs = []
    loader = DataLoader(str(tmp_path), 2, 10, log=logs.append)
    per_epoch = loader.total_windows // 2
    first = [loader.next_batch()[0] for _ in range(per_epoch)]
    second = [loader.next_batch()[0] for _ in range(per_epoch)]
    assert loader.epoch == 1 and any("epoch 1" in m for m in logs)
    order = lambda batches: [w for t in batches for w in t[:, 0].tolist()]  # first token: the window
    assert len(set(order(first)) ^ set(order(second))) <= 2  # the same windows (but a leftover < B)...
    assert order(first) != order(second)  # ...in another order


def test_restored_loader_continues_identically(shards):
    a = DataLoader(shards, 4, 32, rank=1, world_size=2, seed=3, log=lambda m: None)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    b = DataLoader(shards, 4, 32, rank=1, world_size=2, seed=3, log=lambda m: None)
    b.load_state_dict(state)
    for _ in range(5):
        xa, _ = a.next_batch()
        xb, _ = b.next_batch()
        assert torch.equal(xa, xb)
    other = DataLoader(shards, 4, 16, rank=1, world_size=2, seed=3, log=lambda m: None)
    with pytest.raises(ValueError, match="seq_len"):
        other.load_state_dict(state)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_host_memory_does_not_grow_with_shard_size(tmp_path):
    np.save(tmp_path / "big_train_000001.npy", np.arange(60_000_000, dtype=np.uint16))  # 120 MB
    loader = DataLoader(str(tmp_path), 8, 1024, log=lambda m: None)
    before = rss_bytes()
    for _ in range(2000):  # ~16M tokens from all over the shard
        loader.next_batch()
    assert rss_bytes() - before < 30 * 2**20


def test_llmc_bin_shards(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [BIN_MAGIC, 1, len(tokens)]
    with open(tmp_path / "fineweb_train_000001.bin", "wb") as f:
        f.write(header.tobytes() + tokens.tobytes())
    loader = DataLoader(str(tmp_path), 2, 16, log=lambda m: None)
    x, y = loader.next_batch()
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive tokens: read at the right offset


def test_bad_data_gets_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*fineweb.py"):
        DataLoader(str(tmp_path / "missing"), 2, 16)
    with pytest.raises(FileNotFoundError, match="no train shards"):
        DataLoader(str(tmp_path), 2, 16)
    bad = tmp_path / "bad"
    bad.mkdir()
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [123, 1, 10]
    (bad / "x_train_000001.bin").write_bytes(header.tobytes() + b"\0" * 20)
    with pytest.raises(ValueError, match="x_train_000001.bin.*magic"):
        DataLoader(str(bad), 2, 4)
    header[0] = BIN_MAGIC
    header[2] = 1000
    (bad / "x_train_000001.bin").write_bytes(header.tobytes() + b"\0" * 20)
    with pytest.raises(ValueError, match="truncated"):
        DataLoader(str(bad), 2, 4)
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    np.save(trunc / "x_train_000001.npy", np.arange(1000, dtype=np.uint16))
    data = (trunc / "x_train_000001.npy").read_bytes()
    (trunc / "x_train_000001.npy").write_bytes(data[:500])
    with pytest.raises(ValueError, match="x_train_000001.npy.*truncated"):
        DataLoader(str(trunc), 2, 4)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    np.save(wrong / "x_train_000001.npy", np.arange(1000, dtype=np.int32))
    with pytest.raises(ValueError, match="uint16"):
        DataLoader(str(wrong), 2, 4)


def test_validation_data_is_the_same_for_any_world_size_and_batch(shards):
    val = ValidationData(shards, 32, 4000)
    assert val.num_tokens == 4000 // 32 * 32

    def windows(B, world_size):
        """All real (non-padding) rows evaluated by all ranks, and each rank's batch count."""
        rows, counts = [], []
        for r in range(world_size):
            batches = list(val.batches(B, r, world_size))
            counts.append(len(batches))
            rows += [tuple(x.tolist()) for xb, yb in batches for x, y in zip(xb, yb) if (y != -1).all()]
        return sorted(rows), counts

    reference, _ = windows(8, 1)
    assert len(reference) == 4000 // 32
    for B, W in [(3, 1), (8, 2), (5, 3)]:
        rows, counts = windows(B, W)
        assert rows == reference
        assert len(set(counts)) == 1  # every rank runs the same number of forward passes


def one_epoch(loader):
    return [loader.next_batch() for _ in range(loader.total_windows // (loader.B * loader.world_size))]


@pytest.mark.parametrize("bad_id", [50257, 50303, 50304, 65535])
def test_token_ids_outside_the_vocabulary_are_named(tmp_path, bad_id):
    # 50257..50303 are the dead padded rows of the embedding, >= 50304 would be an IndexError in it.
    tokens = np.arange(2000, dtype=np.uint16)
    tokens[1234] = bad_id
    np.save(tmp_path / "x_train_000001.npy", tokens)
    np.save(tmp_path / "x_val_000000.npy", tokens)
    assert len(one_epoch(DataLoader(str(tmp_path), 4, 16, log=lambda m: None)))  # no vocab given: uint16 only
    loader = DataLoader(str(tmp_path), 4, 16, log=lambda m: None, vocab_size=50257)
    with pytest.raises(ValueError, match=f"x_train_000001.npy: token id {bad_id} at token 1234 is outside the "
                                         r"vocabulary \(ids 0..50256\).*re-make it"):
        one_epoch(loader)
    val = ValidationData(str(tmp_path), 16, 2000, vocab_size=50257)
    with pytest.raises(ValueError, match=f"x_val_000000.npy: token id {bad_id} at token 1234"):
        list(val.batches(8, rank=1, world_size=2))


@pytest.mark.parametrize("keep_bytes", [1000, 100])  # inside the tokens; inside the .npy header
def test_shard_truncated_during_a_run_is_named(tmp_path, keep_bytes):
    path = tmp_path / "x_train_000001.npy"
    np.save(path, np.arange(2000, dtype=np.uint16))
    loader = DataLoader(str(tmp_path), 4, 16, log=lambda m: None)
    loader.next_batch()
    os.truncate(path, keep_bytes)
    with pytest.raises(ValueError, match="x_train_000001.npy: the file ends before token .* it held 2000 tokens "
                                         "when it was opened: it was truncated or replaced during the run"):
        one_epoch(loader)
    os.remove(path)
    with pytest.raises(FileNotFoundError, match="x_train_000001.npy: shard unreadable during the run"):
        loader.next_batch()


def test_shards_shorter_than_a_window_are_skipped_with_a_note(tmp_path):
    np.save(tmp_path / "x_train_000001.npy", np.arange(1000, dtype=np.uint16))
    np.save(tmp_path / "x_train_000002.npy", np.zeros(0, dtype=np.uint16))
    np.save(tmp_path / "x_train_000003.npy", np.zeros(16, dtype=np.uint16))  # one token short of a window
    logs = []
    loader = DataLoader(str(tmp_path), 1, 16, log=logs.append)
    assert loader.total_windows == 999 // 16  # an empty shard used to count -1 window
    assert [s["tokens"] for s in loader.state_dict()["shards"]] == [1000, 0, 16]
    assert [m for m in logs if "skipped" in m] == [
        f"data: {tmp_path / name} holds {n} tokens, fewer than one window of 17: skipped"
        for name, n in [("x_train_000002.npy", 0), ("x_train_000003.npy", 16)]]
    for _ in range(2):  # two epochs: every window of the real shard each time, no leftover
        rows = sorted(int(x[0, 0]) for x, _ in one_epoch(loader))
        assert rows == list(range(0, 999 // 16 * 16, 16))
    np.save(tmp_path / "x_val_000000.npy", np.zeros(0, dtype=np.uint16))
    np.save(tmp_path / "x_val_000001.npy", np.arange(100, dtype=np.uint16))
    assert ValidationData(str(tmp_path), 16, 1000).num_tokens == 99 // 16 * 16


def test_resume_on_other_data_is_refused_with_what_differs(tmp_path):
    for name, seed in [("a", 0), ("b", 1)]:  # b: other tokens, the same shard names and sizes
        write_shards(str(tmp_path / name), n_train=2, train_tokens=3000, seed=seed)
    a = DataLoader(str(tmp_path / "a"), 2, 16, log=lambda m: None)
    a.next_batch()
    state = a.state_dict()
    b = DataLoader(str(tmp_path / "b"), 2, 16, log=lambda m: None)
    assert b.total_windows == a.total_windows
    with pytest.raises(ValueError, match="other data.*test_train_000001.npy holds other tokens.*"
                                         "test_train_000002.npy holds other tokens"):
        b.load_state_dict(state)
    os.rename(tmp_path / "b" / "test_train_000002.npy", tmp_path / "b" / "test_train_000003.npy")
    with pytest.raises(ValueError, match="test_train_000002.npy is missing now; test_train_000003.npy is new"):
        DataLoader(str(tmp_path / "b"), 2, 16, log=lambda m: None).load_state_dict(state)

    shutil.copytree(tmp_path / "a", tmp_path / "a_moved")  # the same data elsewhere resumes
    moved = DataLoader(str(tmp_path / "a_moved"), 2, 16, log=lambda m: None)
    moved.load_state_dict(state)
    assert torch.equal(moved.next_batch()[0], a.next_batch()[0])
    old = {k: v for k, v in state.items() if k != "shards"}  # a checkpoint from before fingerprints
    DataLoader(str(tmp_path / "a"), 2, 16, log=lambda m: None).load_state_dict(old)
