"""Writing files so that a crash or a failure never leaves a partial one, nor loses the old
one: weights (glcic_fast.save), checkpoints and a training run's other files."""

import contextlib
import os
import re
import tempfile

_TMP_PREFIX = ".glcic_fast-tmp-"
#: Temporary files of an interrupted atomic write: ".glcic_fast-tmp-*.tmp".
TMP_NAME = re.compile(r"^\.glcic_fast-.*\.tmp$")


def _fsync_dir(directory: str):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (os.umask both
    sets and returns, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write, mode: str = "wb"):
    """Write ``path`` through ``write(file)`` into a temporary file in the same folder,
    fsync it, then ``os.replace`` it over ``path``: readers (and a crash) see the old
    file or the complete new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            # mkstemp makes the file private (0600); the result should have the permissions
            # any new file gets (0666 less the umask), like the file it replaces would have.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
