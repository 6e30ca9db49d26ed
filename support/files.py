"""Files a run writes for others to read (metrics, exports, W&B's run id): written under a temporary
name and renamed into place, so a reader never sees half a file."""

import contextlib
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
