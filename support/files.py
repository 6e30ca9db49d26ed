"""Files a run writes for others to read (metrics, exports, W&B's run id): written under a temporary
name and renamed into place, so a reader never sees half a file. And what to do when the system
refuses a write in log_dir."""

import contextlib
import errno
import os
import tempfile


@contextlib.contextmanager
def replace_atomically(path):
    """A temporary path next to `path`, renamed onto it if the block succeeds and deleted if not:
    readers never see a half-written file, and an interrupted write leaves the old one. The file
    gets the mode a plain open() would give it (0666 less the umask), not mkstemp's private 0600."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def current_umask():
    mask = os.umask(0)  # the only way to read it is to set it: set it straight back
    os.umask(mask)
    return mask


def write_failure_advice(code):
    """What to do about a write in log_dir (a checkpoint, the lock, the logs) that the system
    refused, by its errno: free space only helps a full disk."""
    move = "move --log_dir (with its checkpoints) to"
    return {
        errno.ENOSPC: f"Free space on that disk, or {move} one with room",
        errno.EDQUOT: f"Free space within your quota (or have it raised), or {move} a disk with room",
        errno.EACCES: f"Give this user write permission on --log_dir, or {move} a folder it can write",
        errno.EPERM: f"Give this user write permission on --log_dir, or {move} a folder it can write",
        errno.EROFS: f"That disk is mounted read-only: remount it read-write, or {move} a writable disk",
        errno.EIO: f"The disk may be failing (see the kernel log, dmesg): {move} a sound disk",
        errno.EFBIG: f"A file-size limit (ulimit -f) or the filesystem's largest file was reached: raise the "
                     f"limit, or {move} another filesystem",
    }.get(code, f"Fix what the error names, or {move} another disk")
