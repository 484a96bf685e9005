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


class Busy(ValueError):
    """Another process holds a run's lock on a folder (``one_run``)."""


@contextlib.contextmanager
def one_run(directory: Path, what: str, way_out: str = "give another --out") -> Iterator[None]:
    """Let one run at a time write ``directory`` (``innfer train`` / ``calibrate``): each
    loads the INN there at its start and saves its own over it, so two at once lost one's
    result without a word (review helper-246: both printed "saved"). A second run is refused
    at once (``Busy``) with the first one's pid and ``what`` it does. The lock file lives in
    the temporary folder, not in ``directory`` (a model folder's files are the INN's), so it
    holds between runs of one machine; where none can be taken, the run goes on unlocked.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> with one_run(d, "calibrated"):
        ...     with one_run(d, "trained"):
        ...         pass
        Traceback (most recent call last):
        ...
        runtime.flock.Busy: ... is being calibrated by pid ...: wait for it to end, or ...
    """
    import hashlib
    import tempfile

    key = hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / "innfer-runs" / f"{key}.lock"
    try:
        import fcntl

        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise Busy(f"{directory} is being {holder}: wait for it to end, or {way_out}") from None
        except OSError:  # a file system that cannot lock: unlocked, as ``exclusive``
            pass
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} by pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # (closing releases the lock)
