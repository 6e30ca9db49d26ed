"""Checkpoints: atomic files of plain dicts and tensors, newest-good-first resume, keep the last K.

A checkpoint loads with torch.load(..., weights_only=True): no pickled classes, so an untrusted
file cannot run code. One process writes a file (`ckpt_0001000.pt`); with FSDP every rank writes
its shards into a folder (`ckpt_0001000/`) through torch.distributed.checkpoint. Both appear
under their final name only once complete, so a process killed mid-save leaves the previous
checkpoint as the newest.
"""

import os
import random
import re
import shutil

import numpy as np
import torch

CKPT_RE = re.compile(r"^ckpt_(\d{7,})(\.pt)?$")


class CorruptCheckpoint(ValueError):
    pass


def checkpoint_path(log_dir, step, sharded=False):
    return os.path.join(log_dir, f"ckpt_{step:07d}" + ("" if sharded else ".pt"))


def list_checkpoints(log_dir):
    """Finished checkpoints in log_dir as (step, path), newest first. Temporary files are ignored."""
    if not os.path.isdir(log_dir):
        return []
    found = []
    for name in os.listdir(log_dir):
        m = CKPT_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(log_dir, name)))
    return sorted(found, reverse=True)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(state, path):
    """torch.save to a temporary name beside path, fsync, then rename: readers see the old file or
    the whole new one, never half of it."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def load_file(path):
    """Load a checkpoint file safely (weights_only); a damaged file raises CorruptCheckpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or truncated, or not a checkpoint: "
                                f"{type(e).__name__}: {e}") from e


def prune(log_dir, keep):
    """Delete all but the newest `keep` checkpoints (and stale temporary files). The newest is
    always kept, whatever `keep` says."""
    for _, path in list_checkpoints(log_dir)[max(keep, 1):]:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for name in os.listdir(log_dir):
        if ".tmp" in name and name.startswith("ckpt_"):
            path = os.path.join(log_dir, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


# ----------------------------------------------------------------------------------------------
# RNG state as plain tensors (numpy's and python's states are tuples holding arrays and ints)

def rng_state(device):
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": np.random.get_state()[2],
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP): torch.distributed.checkpoint, every rank writes its own shards

def save_sharded(state, path, rank):
    """Every rank calls this. DCP writes each rank's shards of the tensors in `state` (model and
    optimizer from get_state_dict); plain values are written by rank 0 alone, into extra.pt.
    The folder gets its final name only after every rank has finished."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    tmp = f"{path}.tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save({"model": state["model"], "optimizer": state["optimizer"]}, checkpoint_id=tmp)
    if rank == 0:
        extra = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
        save_file(extra, os.path.join(tmp, "extra.pt"))
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")
    dist.barrier()


def load_sharded(path, model_state, optimizer_state):
    """Every rank calls this with its own (sharded) state dicts, which DCP fills in place.
    Returns the plain values saved beside them."""
    import torch.distributed.checkpoint as dcp
    extra = load_file(os.path.join(path, "extra.pt"))
    try:
        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
    except Exception as e:
        raise CorruptCheckpoint(f"sharded checkpoint {path} could not be read: {type(e).__name__}: {e}") from e
    return extra
