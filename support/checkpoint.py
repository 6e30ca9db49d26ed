"""Checkpoints: atomic, checksummed files of plain dicts and tensors, newest-good-first resume,
keep the last K.

A checkpoint loads with torch.load(..., weights_only=True): no pickled classes, so an untrusted
file cannot run code. One process writes a file (`ckpt_0001000.pt`); with FSDP every rank writes
its shards into a folder (`ckpt_0001000/`) through torch.distributed.checkpoint. Both appear
under their final name only once complete, so a process killed mid-save leaves the previous
checkpoint as the newest.

Each checkpoint carries a SHA-256 of its bytes, written before the checkpoint gets its final
name: a file's in a sidecar (`ckpt_0001000.pt.sha256`), a folder's in `manifest.json` inside
it. A bit flipped on disk, a file overwritten in place or a folder missing a shard is found
before the checkpoint is trusted (verify), instead of loading silently changed weights.
"""

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

CKPT_RE = re.compile(r"^ckpt_(\d{7,})(\.pt)?$")
CHECKSUM_SUFFIX = ".sha256"  # beside a checkpoint file: {"sha256": hex digest, "bytes": size}
MANIFEST = "manifest.json"  # inside a sharded folder: {"files": {name: {"sha256": ..., "bytes": ...}}}


class CorruptCheckpoint(ValueError):
    pass


class WriteFailed(RuntimeError):
    """A checkpoint could not be written because the system refused a write (disk full, quota,
    permissions, I/O error: `errno` says which); nothing of it was left behind. Any other error
    while saving is a bug and is raised as it is."""

    def __init__(self, message, errno=None):
        super().__init__(message)
        self.errno = errno


def checkpoint_path(log_dir, step, sharded=False):
    return os.path.join(log_dir, f"ckpt_{step:07d}" + ("" if sharded else ".pt"))


def list_checkpoints(log_dir):
    """Checkpoints in log_dir as (step, path), newest first, whether readable or not. Temporary
    files are ignored."""
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


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


class _HashingWriter:
    """A file that hashes what torch.save writes through it, so a file's checksum costs no second read."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        self.bytes += len(memoryview(data).cast("B"))
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def _write_json(obj, path):
    """A small JSON file, atomically: temporary name, fsync, rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def save_file(state, path):
    """torch.save to a temporary name beside path, fsync, write the checksum sidecar, then rename:
    readers see the old file or the whole new one, never half of it, and never a file without its
    checksum. A failed write (disk full...) leaves no temporary file and raises WriteFailed."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        _write_json({"sha256": writer.sha256.hexdigest(), "bytes": writer.bytes}, path + CHECKSUM_SUFFIX)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")
    except BaseException as e:
        _remove(tmp)
        cause = os_error_in(e)
        if cause is not None:
            raise WriteFailed(write_failure_message(path, cause), cause.errno) from e
        raise


def os_error_in(error):
    """The OSError behind an error, or None: the error itself, one in its chain (torch reports a
    failed write as a RuntimeError with the OSError as its context), or for DCP's
    CheckpointException one of the ranks' errors it holds."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [e.__cause__, e.__context__]
        if type(e).__name__ == "CheckpointException":
            todo += [failure for failure, _ in e.failures.values()]
    return None


def write_failure_message(path, cause):
    """What failed (the OSError `cause`), on which disk, and how much room it has."""
    folder = os.path.dirname(os.path.abspath(path))
    mount = folder
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    try:
        usage = shutil.disk_usage(folder)
        room = f"{usage.free / 1e9:.2f} GB free of {usage.total / 1e9:.2f} GB"
    except OSError:
        room = "free space unknown"
    what = {errno.ENOSPC: f"the disk is full ({cause})",
            errno.EDQUOT: f"your disk quota is used up ({cause})"}.get(cause.errno, f"{type(cause).__name__}: {cause}")
    return (f"could not write checkpoint {path}: {what} (the disk holding it is mounted at {mount}: {room}); "
            f"the partial file was removed")


def hash_file(path, chunk=1 << 24):
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{what} is missing") from None
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{what} is unreadable: {e}") from e


def _check_file(path, expected):
    """A reason the file does not match its recorded size and hash, or None."""
    if not os.path.isfile(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != expected["bytes"]:
        return f"{path} has {size} bytes, {expected['bytes']} were written (truncated or replaced)"
    if hash_file(path) != expected["sha256"]:
        return f"{path} does not match the checksum written with it (damaged or changed on disk)"
    return None


def verify_file(path):
    """Raise CorruptCheckpoint unless the file's bytes match its checksum sidecar."""
    expected = _read_json(path + CHECKSUM_SUFFIX, f"checkpoint {path}'s checksum file {path + CHECKSUM_SUFFIX}")
    reason = _check_file(path, expected)
    if reason:
        raise CorruptCheckpoint(f"checkpoint {reason}")


def folder_files(folder):
    """The files of a sharded checkpoint folder (relative names), the manifest excluded."""
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names if name != MANIFEST)


def verify_folder(folder, rank=0, world_size=1):
    """Check a sharded folder against its manifest: every file present with its size; the hashes
    of this rank's share of the files (every world_size-th), so ranks hash in parallel. Returns a
    reason or None (on this rank: agree across ranks before acting on it)."""
    try:
        manifest = _read_json(os.path.join(folder, MANIFEST), f"sharded checkpoint {folder}'s {MANIFEST}")
    except CorruptCheckpoint as e:
        return str(e)
    files = manifest["files"]
    extra = set(folder_files(folder)) - set(files)
    if extra:
        return f"sharded checkpoint {folder} holds files its manifest does not list: {sorted(extra)[:3]}"
    names = sorted(files)
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != files[name]["bytes"]:
            return f"sharded checkpoint {folder}: {name} is missing or has the wrong size"
    for name in names[rank::world_size]:
        reason = _check_file(os.path.join(folder, name), files[name])
        if reason:
            return f"sharded checkpoint {reason}"
    return None


def checksum_record(path):
    """Where a checkpoint's checksums are: a folder's manifest, a file's sidecar."""
    return os.path.join(path, MANIFEST) if os.path.isdir(path) else path + CHECKSUM_SUFFIX


def verify(path):
    """In one process, raise CorruptCheckpoint unless the checkpoint (a file, or a sharded folder:
    every shard hashed) matches its checksums. Returns False, having checked nothing, for one
    without its checksum record (written before checksums): the caller loads it unverified and
    says so (unverified_warning), as training does for --resume=PATH."""
    if not os.path.exists(checksum_record(path)):
        return False
    try:
        if os.path.isdir(path):
            reason = verify_folder(path)
            if reason:
                raise CorruptCheckpoint(reason)
        else:
            verify_file(path)
    except CorruptCheckpoint as e:
        raise CorruptCheckpoint(f"{e}: use another checkpoint of its run, or an intact copy of this one") from None
    return True


def unverified_warning(path):
    return (f"warning: {path} has no checksum ({checksum_record(path)} is missing: written before checksums?): "
            f"loaded it unverified")


def looks_intact(path):
    """Cheap check for pruning (no hashing): the checksum record is there and every size matches."""
    try:
        if os.path.isdir(path):
            files = _read_json(os.path.join(path, MANIFEST), "manifest")["files"]
            return all(os.path.getsize(os.path.join(path, n)) == v["bytes"] for n, v in files.items())
        return os.path.getsize(path) == _read_json(path + CHECKSUM_SUFFIX, "checksum")["bytes"]
    except (CorruptCheckpoint, OSError, KeyError, TypeError):
        return False


def load_file(path, verify=False):
    """Load a checkpoint file safely (weights_only); with verify, its checksum is checked first.
    A damaged file, or one that is no checkpoint, raises CorruptCheckpoint."""
    if verify:
        verify_file(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CorruptCheckpoint(f"{path} is damaged, or not a checkpoint that training wrote ({one_line(e)}): "
                                f"give a ckpt_<step>.pt file or ckpt_<step>/ folder from a --log_dir") from e


def one_line(error, limit=200):
    """An error of torch.load or DCP as one short line. torch's refusal of a file that weights_only
    cannot load puts its reason after a paragraph of advice that does not apply to a checkpoint
    (load it with weights_only=False, file an issue); DCP's error holds every failed rank's
    traceback: the first rank's error is the reason."""
    failures = getattr(error, "failures", None)  # DCP's CheckpointException: {rank: (error, traceback)}
    if failures:
        error = next(iter(failures.values()))[0]
    text = " ".join(str(error).split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0].split(". ")[0].strip()
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def nonfinite_tensors(state, prefix=""):
    """Names of the floating-point tensors in a nested dict/list that hold a NaN or Inf (of FSDP's
    DTensors, this rank's shard)."""
    named = []

    def walk(obj, name):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}.{i}")
        elif isinstance(obj, torch.Tensor):
            t = obj.to_local() if hasattr(obj, "to_local") else obj
            if t.is_floating_point() and t.numel():
                named.append((name, t))

    walk(state, prefix)
    bad = []
    for device in {t.device for _, t in named}:
        group = [(n, t) for n, t in named if t.device == device]
        # max |x| propagates NaN and Inf, in one pass without a mask the size of the tensor
        maxabs = torch.stack([torch.linalg.vector_norm(t, float("inf")).float() for _, t in group])
        finite = torch.isfinite(maxabs).tolist()  # one sync a device
        bad += [n for (n, _), ok in zip(group, finite) if not ok]
    return bad


def prune(log_dir, keep, newest_step):
    """Delete all but the newest `keep` intact checkpoints up to newest_step (the one just saved),
    and stale temporary files. Only checkpoints whose checksum record is there and whose sizes
    match take a keep slot or are deleted; unreadable ones and any of a higher step (rejected at
    resume) are left to the user, so neither can push out the current run's newest good one."""
    ours = [(step, path) for step, path in list_checkpoints(log_dir) if step <= newest_step and looks_intact(path)]
    for _, path in ours[max(keep, 1):]:
        _remove(path)
        _remove(path + CHECKSUM_SUFFIX)
    for name in os.listdir(log_dir):
        path = os.path.join(log_dir, name)
        if name.startswith("ckpt_") and (".tmp" in name or (  # a crash mid-save, or a sidecar left without its file
                name.endswith(CHECKSUM_SUFFIX) and not os.path.exists(path[:-len(CHECKSUM_SUFFIX)]))):
            _remove(path)


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

def _shard_writer(folder):
    """DCP's own file writer, except that a write failing with an OSError raises that OSError. DCP
    pickles each rank's error to gather it into a CheckpointException, which drops the chain in
    which torch.save keeps the OSError behind its RuntimeError: the errno would be lost."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            with _raising_the_os_error():
                return super().write_data(plan, planner)

        def finish(self, metadata, results):
            with _raising_the_os_error():
                return super().finish(metadata, results)

    return Writer(folder)


@contextlib.contextmanager
def _raising_the_os_error():
    try:
        yield
    except Exception as e:
        cause = os_error_in(e)
        if cause is None or cause is e:
            raise
        plain = OSError(cause.errno, cause.strerror, cause.filename) if cause.errno is not None else OSError(str(cause))
        raise plain from e  # pickles with its errno, text and file name


def save_sharded(state, path, rank, world_size=None):
    """Every rank calls this. DCP writes each rank's shards of the tensors in `state` (model and
    optimizer from get_state_dict); plain values are written by rank 0 alone, into extra.pt.
    Then each rank hashes its share of the files (read back: DCP writes them, not our hashing
    writer) and rank 0 writes the manifest. The folder gets its final name only after every rank
    has finished. A failed write raises WriteFailed; any other error is raised as it is."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    world_size = world_size or dist.get_world_size()
    tmp = f"{path}.tmp"
    try:
        if rank == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)
        dist.barrier()
        dcp.save({"model": state["model"], "optimizer": state["optimizer"]}, checkpoint_id=tmp,
                 storage_writer=_shard_writer(tmp))
        if rank == 0:
            extra = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
            save_file(extra, os.path.join(tmp, "extra.pt"))
        dist.barrier()
        names = folder_files(tmp)
        mine = {name: {"sha256": hash_file(os.path.join(tmp, name)), "bytes": os.path.getsize(os.path.join(tmp, name))}
                for name in names[rank::world_size]}
        shares = [None] * world_size
        dist.all_gather_object(shares, mine)
        if rank == 0:
            _write_json({"files": {k: v for share in shares for k, v in share.items()}}, os.path.join(tmp, MANIFEST))
            # The folder's entries (the manifest, DCP's files) on disk before its rename. DCP's
            # sync_files (on by default) fsyncs each file it writes and renames .metadata into
            # place, but never fsyncs the folder.
            _fsync_dir(tmp)
            if os.path.exists(path):  # a stale folder of the same step (one rejected at resume)
                old = f"{path}.tmp.old"
                _remove(old)
                os.replace(path, old)
                os.replace(tmp, path)
                _remove(old)
            else:
                os.replace(tmp, path)
            _fsync_dir(os.path.dirname(path) or ".")
        dist.barrier()
    except BaseException as e:
        if rank == 0:
            _remove(tmp)
        cause = None if isinstance(e, WriteFailed) else os_error_in(e)  # extra.pt's: already said
        if cause is not None:
            raise WriteFailed(write_failure_message(path, cause), cause.errno) from e
        raise


def load_sharded(path, model_state, optimizer_state):
    """Every rank calls this with its own (sharded) state dicts, which DCP fills in place.
    Returns the plain values saved beside them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    extra = load_file(os.path.join(path, "extra.pt"))
    try:
        with warnings.catch_warnings():  # read by one process (evaluate.py), DCP warns that it assumes so
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
    except (Exception, CheckpointException) as e:
        raise CorruptCheckpoint(f"sharded checkpoint {path} could not be read ({one_line(e)})") from e
    return extra


def sharded_names(path):
    """The names of the values a sharded folder holds, as DCP flattened them
    ("model.transformer.wte.weight", "optimizer.state.<name>.exp_avg", ...)."""
    from torch.distributed.checkpoint import FileSystemReader
    try:
        return list(FileSystemReader(path).read_metadata().state_dict_metadata)
    except Exception as e:
        raise CorruptCheckpoint(f"sharded checkpoint {path} could not be read ({one_line(e)})") from e


def load_sharded_whole(path, parts=("model", "optimizer")):
    """The whole tensors of a sharded folder's parts (of "model" and "optimizer"), as plain CPU
    tensors, nested as they were saved; every process that calls it reads all of them. For a folder
    whose tensors this run's model names otherwise (support/fused_qkv.py): they are renamed whole,
    then loaded as a checkpoint file's are. Returns (that dict, the plain values of extra.pt)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    extra = load_file(os.path.join(path, "extra.pt"))
    try:
        metadata = FileSystemReader(path).read_metadata()
        flat = {name: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None
                for name, m in metadata.state_dict_metadata.items() if name.split(".")[0] in parts}
        with warnings.catch_warnings():  # read by one process (evaluate.py), DCP warns that it assumes so
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(flat, checkpoint_id=path)
    except (Exception, CheckpointException) as e:
        raise CorruptCheckpoint(f"sharded checkpoint {path} could not be read ({one_line(e)})") from e
    nested = {}
    for name, value in flat.items():  # each value to where it was saved: a path of dict keys and list indices
        *path_to, last = metadata.planner_data[name]
        place = nested
        for key in path_to:
            place = place.setdefault(key, {})
        place[last] = value
    return as_lists(nested), extra


def as_lists(obj):
    """A nested dict with the lists of the saved state as dicts keyed 0, 1, ...: those as lists again."""
    if not isinstance(obj, dict):
        return obj
    items = {k: as_lists(v) for k, v in obj.items()}
    if items and all(isinstance(k, int) for k in items):
        return [items[i] for i in range(len(items))]
    return items
