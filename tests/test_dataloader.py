import os

import numpy as np
import pytest
import torch

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
