"""One build of a model at a time.

Two ``innfer build`` runs of one model that export different bytes for a tier (the INN
replaced or calibrated while the first ran) each install their tier folder; the one whose
folder was replaced then deleted or rewrote the other's ``tier.json`` - both exited 0 and
the model no longer loaded (review 187). A build now holds an exclusive ``flock`` of
``<model>/.build.lock`` from its first read of the model to its last write; a second build
of the same model waits for it (and says so), then reads the model as the first left it.
Builds of other models, and the server's reads, are not held up. Where a lock cannot be
taken (no ``fcntl``; a file system without ``flock``; a read-only folder, which the build
refuses anyway) the build goes on without it, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from runtime.repository.store import BUILD_LOCK_FILE

log = logging.getLogger("innfer.build")

LOCK_FILE = BUILD_LOCK_FILE


def _open(path: Path) -> int:
    """The lock file, made 0o666 (less the umask) and opened for writing where it may be
    (NFS emulates flock with POSIX locks, which need it), else read-only: flock needs no
    write access, and a file only its creator could open left another user's builds
    unlocked (review 189)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def _take_soon(fcntl, fd: int) -> None:
    """The lock, tried a few times over 0.2 s before BlockingIOError: a server's repository
    poll holds it shared for microseconds to see whether a build runs, and a build starting
    then said it waited for another build."""
    for _ in range(4):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.05)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextlib.contextmanager
def one_build(model_dir: Path) -> Iterator[None]:
    """Hold ``model_dir``'s build lock for the ``with`` block, waiting for another build
    of that model to finish first (logged once, at WARNING: a build that seems to hang
    says what it waits for).

    Example:
        >>> import tempfile
        >>> with one_build(Path(tempfile.mkdtemp())):
        ...     pass
    """
    try:
        import fcntl

        fd = _open(model_dir / LOCK_FILE)
    except ImportError:
        yield
        return
    except OSError as exc:
        if os.access(model_dir, os.W_OK):  # (a read-only folder: the build refuses it)
            log.warning("%s: builds of it run unlocked (%s)", model_dir.name, exc)
        yield
        return
    try:
        try:
            _take_soon(fcntl, fd)
        except BlockingIOError:
            log.warning(
                "waiting for another build of %s to finish (it holds %s)",
                model_dir.name, model_dir / LOCK_FILE,
            )  # fmt: skip
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no flock on this file system: unlocked, as before
            pass
        yield
    finally:
        os.close(fd)  # (closing releases the lock)
