"""Token shards to (x, y) batches: rank-aware, read window by window, shuffled per epoch, checkpointable.

Reads two shard formats from a folder:
- `*_train_*.npy` / `*_val_*.npy`: a 1-D uint16 numpy array (fineweb.py's output, and the
  published pre-tokenized FineWeb-EDU shards);
- `*_train_*.bin` / `*_val_*.bin`: llm.c / modded-nanogpt shards, a header of 256 int32
  (magic 20240520, version 1, token count) followed by the uint16 tokens.
Shards are never loaded whole: each batch reads just its windows from the files, so host memory
does not grow with shard size. Every batch is checked as it is read (token ids within the
vocabulary, no shard shortened since it was opened), so bad data stops the run with the file and
position named instead of an IndexError deep in the embedding. This file imports nothing from the
rest of the project and works alone.
"""

import glob
import hashlib
import os

import numpy as np
import torch

BIN_MAGIC, BIN_VERSION, BIN_HEADER_INTS = 20240520, 1, 256
SAMPLE_BLOCKS, SAMPLE_BLOCK_TOKENS = 4, 1024  # what the data fingerprint hashes of each shard


class DataError(ValueError):
    """Token data that cannot be read as asked (a damaged shard, too little data): a user's
    mistake, which the scripts print as one line."""


class DataNotFound(FileNotFoundError):
    """No data where it was asked for: a user's mistake, printed as one line."""


def shard_paths(data_dir, split):
    """Sorted shard files of one split ('train' or 'val'); a clear error when there are none."""
    if not os.path.isdir(data_dir):
        raise DataNotFound(
            f"data folder {data_dir!r} does not exist. Make shards with `python fineweb.py` "
            f"(or `python fineweb.py --download`), or point --data_dir at a folder of shards.")
    paths = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.npy")) +
                   glob.glob(os.path.join(data_dir, f"*_{split}_*.bin")))
    if not paths:
        raise DataNotFound(
            f"no {split} shards (*_{split}_*.npy or *_{split}_*.bin) in {data_dir!r}. Make them with "
            f"`python fineweb.py --out-dir={data_dir}`, or point --data_dir at a folder of shards.")
    return paths


class TokenShard:
    """One shard on disk: its token count, and reads of token ranges. A read takes only the tokens
    asked for from the file (np.fromfile at an offset, through the OS page cache); nothing of the
    shard is loaded or kept mapped, so host memory does not grow with shard size."""

    def __init__(self, path, data_offset, n_tokens):
        self.path, self.data_offset, self.n_tokens = path, data_offset, n_tokens

    def __len__(self):
        return self.n_tokens

    def read(self, start, count):
        """Tokens start .. start+count-1 as a uint16 array. The length was checked when the shard
        was opened, so a short read means the file changed under the run: that is an error, not
        a short window (which would fail later as a shape mismatch or an empty batch)."""
        try:
            tokens = np.fromfile(self.path, dtype=np.uint16, count=count, offset=self.data_offset + 2 * start)
        except OSError as e:  # a deleted shard stays a FileNotFoundError, now with the file named
            error = DataNotFound if isinstance(e, FileNotFoundError) else DataError
            raise error(f"{self.path}: shard unreadable during the run ({e}). Restore it, then resume "
                        f"from the last checkpoint.") from e
        if len(tokens) != count:
            raise DataError(
                f"{self.path}: the file ends before token {start + count - 1}, but it held {self.n_tokens} "
                f"tokens when it was opened: it was truncated or replaced during the run. Restore it (or "
                f"re-make it with `python fineweb.py`, which keeps finished shards), then resume from "
                f"the last checkpoint.")
        return tokens

    def fingerprint(self):
        """Name, length and a sha256 of a few blocks spread over the shard (first and last
        included): cheap to compute at any shard size, and different for other data of the same
        length."""
        n, k = self.n_tokens, min(self.n_tokens, SAMPLE_BLOCK_TOKENS)
        digest = hashlib.sha256()
        for start in sorted({(n - k) * i // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)}):
            digest.update(self.read(start, k).tobytes())
        return {"file": os.path.basename(self.path), "tokens": n, "sample_sha256": digest.hexdigest()}


def read_windows(windows, T, vocab_size=None):
    """The windows [(TokenShard, token offset), ...] as a (len(windows), T+1) uint16 array. With
    vocab_size, an id >= vocab_size is an error naming the shard and position: for GPT-2 that is
    any id past 50256, both ids the model cannot embed (>= the padded 50304) and the padded rows
    50257..50303, which no GPT-2 token uses. Checking costs one max() over the batch."""
    buf = np.stack([shard.read(offset, T + 1) for shard, offset in windows])  # (b, T+1)
    if vocab_size is not None and buf.size and int(buf.max()) >= vocab_size:
        row, col = np.argwhere(buf >= vocab_size)[0]
        shard, offset = windows[row]
        raise DataError(
            f"{shard.path}: token id {int(buf[row, col])} at token {offset + col} is outside the vocabulary "
            f"(ids 0..{vocab_size - 1}). This shard was not made with the model's tokenizer, or it is "
            f"damaged: re-make it (GPT-2 tokens: `python fineweb.py`) or remove it from the data folder.")
    return buf


def data_differences(saved, now):
    """What differs between two lists of shard fingerprints, in words (empty when nothing does)."""
    saved_by_name, now_by_name = {s["file"]: s for s in saved}, {s["file"]: s for s in now}
    changes = [f"{name} is missing now" for name in saved_by_name if name not in now_by_name]
    changes += [f"{name} is new" for name in now_by_name if name not in saved_by_name]
    for name in saved_by_name.keys() & now_by_name.keys():
        a, b = saved_by_name[name], now_by_name[name]
        if a["tokens"] != b["tokens"]:
            changes.append(f"{name} held {a['tokens']} tokens then, {b['tokens']} now")
        elif a["sample_sha256"] != b["sample_sha256"]:
            changes.append(f"{name} holds other tokens (same length, sampled blocks differ)")
    return sorted(changes)


def open_shard(path):
    """Check one shard's header and length; return it as a TokenShard."""
    size = os.path.getsize(path)
    if path.endswith(".bin"):
        header = np.fromfile(path, dtype=np.int32, count=BIN_HEADER_INTS)
        if header.size < BIN_HEADER_INTS or header[0] != BIN_MAGIC or header[1] != BIN_VERSION:
            raise DataError(f"{path}: not an llm.c token shard (expected a 1024-byte header with "
                             f"magic {BIN_MAGIC}, version {BIN_VERSION}). Re-download or re-make it.")
        data_offset, n_tokens = 4 * BIN_HEADER_INTS, int(header[2])
        what = "re-download or re-make it"
    else:
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = read_header(f)
                data_offset = f.tell()
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path}: unreadable .npy header ({e}). Delete it and re-make it with "
                             f"`python fineweb.py` (finished shards are kept).") from e
        if dtype != np.uint16 or len(shape) != 1:
            raise DataError(f"{path}: expected a 1-D uint16 token array, got {dtype} with shape "
                             f"{shape}. Re-make it with `python fineweb.py`.")
        n_tokens = shape[0]
        what = "delete it and re-make it with `python fineweb.py` (finished shards are kept)"
    expected = data_offset + 2 * n_tokens
    if size < expected:
        raise DataError(f"{path}: truncated, the header says {n_tokens} tokens ({expected} bytes) but "
                         f"the file has {size} bytes: {what}.")
    return TokenShard(path, data_offset, n_tokens)


class DataLoader:
    """Training batches. A window is T+1 consecutive tokens of one shard (starting at multiples of
    T), giving x = window[:-1] and y = window[1:]. Each epoch visits every window exactly once in
    a shuffled order: the shards in a shuffled order, and within each shard its windows in a
    shuffled order, both drawn from (seed, epoch). Two levels keep memory at one shard's
    permutation rather than one for the whole dataset.

    The epoch's window sequence is cut into global micro batches of B * world_size windows; rank
    r takes rows r*B .. (r+1)*B-1 of each. Ranks are thus disjoint, and the position in that
    sequence is all the state there is: a restored loader continues exactly, even at another
    world size. The windows left over at the end of an epoch (fewer than one global micro batch)
    are skipped and the number is logged."""

    def __init__(self, data_dir, B, T, rank=0, world_size=1, seed=0, split="train", log=print, vocab_size=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.B, self.T, self.rank, self.world_size, self.seed, self.log = B, T, rank, world_size, seed, log
        self.vocab_size = vocab_size  # ids >= this are refused; None: any uint16
        self.paths = shard_paths(data_dir, split)
        self.shards = [open_shard(p) for p in self.paths]
        # A shard shorter than one window gives none (not -1 for an empty one); it stays in the
        # list so that the shard order, and thus a saved position, does not depend on it.
        self.windows_per_shard = np.array([max(0, (len(s) - 1) // T) for s in self.shards], dtype=np.int64)
        for shard in self.shards:
            if len(shard) < T + 1:
                log(f"data: {shard.path} holds {len(shard)} tokens, fewer than one window of {T + 1}: skipped")
        self.total_windows = int(self.windows_per_shard.sum())
        if self.total_windows < B * world_size:
            raise DataError(
                f"the {split} shards in {data_dir!r} hold {self.total_windows} windows of {T + 1} tokens, "
                f"fewer than one global micro batch of {B} x {world_size} ranks. Use more data, or a "
                f"smaller micro_batch_size or seq_len.")
        self.epoch, self.position = 0, 0
        self._order_cache = None  # (epoch, shard order, cumulative window counts)
        self._perm_cache = None  # (epoch, shard index, window permutation)
        self._fingerprint = None  # computed on first use: a state_dict() or load_state_dict()

    def _rng(self, *keys):
        return np.random.default_rng([self.seed, *keys])

    def _epoch_order(self):
        if self._order_cache is None or self._order_cache[0] != self.epoch:
            order = self._rng(self.epoch).permutation(len(self.shards))
            ends = np.cumsum(self.windows_per_shard[order])
            self._order_cache = (self.epoch, order, ends)
        return self._order_cache[1:]

    def _shard_perm(self, shard):
        if self._perm_cache is None or self._perm_cache[:2] != (self.epoch, shard):
            perm = self._rng(self.epoch, 1 + shard).permutation(int(self.windows_per_shard[shard]))
            self._perm_cache = (self.epoch, shard, perm)
        return self._perm_cache[2]

    def _window(self, i):
        """(shard, token offset) of the epoch's i-th window."""
        order, ends = self._epoch_order()
        k = int(np.searchsorted(ends, i, side="right"))
        shard = int(order[k])
        local = i - (int(ends[k - 1]) if k else 0)
        return shard, int(self._shard_perm(shard)[local]) * self.T

    def next_batch(self):
        """This rank's next (x, y), each (B, T) int64 on the CPU."""
        global_batch = self.B * self.world_size
        if self.position + global_batch > self.total_windows:
            skipped = self.total_windows - self.position
            self.epoch, self.position = self.epoch + 1, 0
            self.log(f"data: epoch {self.epoch} starts ({skipped} leftover windows of the last epoch skipped)")
        first = self.position + self.rank * self.B
        windows = [self._window(i) for i in range(first, first + self.B)]
        self.position += global_batch
        buf = read_windows([(self.shards[s], o) for s, o in windows], self.T, self.vocab_size)
        buf = torch.from_numpy(buf.astype(np.int64))  # (B, T+1)
        return buf[:, :-1], buf[:, 1:]

    def fingerprint(self):
        """Every shard's fingerprint: what a restored position must be applied to."""
        if self._fingerprint is None:
            self._fingerprint = [shard.fingerprint() for shard in self.shards]
        return self._fingerprint

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "T": self.T,
                "total_windows": self.total_windows, "shards": self.fingerprint()}

    def load_state_dict(self, state):
        if state["T"] != self.T or state["seed"] != self.seed:
            raise DataError(
                f"data loader state does not match: saved seq_len={state['T']}, seed={state['seed']}; now "
                f"seq_len={self.T}, seed={self.seed}. Resume with the same seq_len and seed.")
        changes = data_differences(state["shards"], self.fingerprint()) if "shards" in state else []
        if changes or state["total_windows"] != self.total_windows:
            shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
            raise DataError(
                f"the saved data loader position is for other data than the {self.total_windows} windows "
                f"here ({state['total_windows']} then{': ' + shown if changes else ''}). Resume with "
                f"the data it was trained on (the same data_dir contents), or start a fresh run.")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class ValidationData:
    """A fixed validation set: the first max_tokens tokens of the split, as windows of T+1 tokens
    (starting at multiples of T). The windows depend on neither world size nor micro batch:
    rank r evaluates windows r, r + world_size, ... Every rank yields the same number of batches
    (sharded models need every rank in every forward), padding with rows whose targets are -1:
    score with F.cross_entropy(..., ignore_index=-1, reduction='sum') and all-reduce the sums."""

    def __init__(self, data_dir, T, max_tokens, split="val", vocab_size=None):
        self.T, self.vocab_size = T, vocab_size  # ids >= vocab_size are refused; None: any uint16
        windows = []  # (shard, offset)
        budget = max_tokens // T
        for path in shard_paths(data_dir, split):
            shard = open_shard(path)
            n = max(0, min((len(shard) - 1) // T, budget - len(windows)))
            windows += [(shard, i * T) for i in range(n)]
            if len(windows) >= budget:
                break
        if not windows:
            raise DataError(f"the {split} split in {data_dir!r} has fewer than {T + 1} tokens")
        self.windows = windows

    @property
    def num_tokens(self):
        return len(self.windows) * self.T

    def batches(self, B, rank=0, world_size=1):
        mine = self.windows[rank::world_size]
        per_rank = -(-len(self.windows) // world_size)  # ceil: the same count on every rank
        for start in range(0, per_rank, B):
            real = mine[start:min(start + B, per_rank)]
            rows = [read_windows(real, self.T, self.vocab_size).astype(np.int64)] if real else []
            padding = min(start + B, per_rank) - start - len(real)  # rows with any tokens and no targets
            rows.append(np.tile(np.concatenate([[0], np.full(self.T, -1)]), (padding, 1)).astype(np.int64))
            buf = torch.from_numpy(np.concatenate(rows))  # (b, T+1)
            x, y = buf[:, :-1].clone(), buf[:, 1:]
            x[x < 0] = 0
            yield x, y
