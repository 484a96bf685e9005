"""An exclusive ``flock`` held for a block, waited for, and given up without a word where the
file system cannot lock: what the locks around a model folder's renames and a TensorRT
timing cache's merge share (torch-free: the engines import it)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: Path, flags: int = os.O_RDONLY) -> Iterator[None]:
    """Hold an exclusive ``flock`` of ``path`` (opened with ``flags``: ``os.O_RDONLY`` for a
    folder, ``os.O_RDWR | os.O_CREAT`` for a lock file made on first use) for the block.
    Where none can be had - no ``fcntl``, a path that will not open (a read-only folder),
    a file system whose flock refuses (NFS emulates it with POSIX locks, which refuse a
    read-only descriptor) - the block runs unlocked: the callers' races cost less than
    failing.

    Example:
        >>> import tempfile
        >>> with exclusive(Path(tempfile.mkdtemp())):
        ...     pass
    """
    try:
        import fcntl

        fd = os.open(path, flags, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (closing releases the lock)
