"""Repository files written whole or not at all.

A build or a calibration interrupted (Ctrl-C, a killed pod, a node losing power) must
leave the file it was writing as it was or as it became, never a part of it that a reader
then trusts or refuses with a confusing error.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "a.json"
    >>> write_json(path, {"x": 1})
    >>> path.read_text()
    '{\\n "x": 1\\n}'
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON: a reader sees the old file or the new one."""
    write_bytes(path, json.dumps(data, indent=1).encode())


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then rename it over ``path``. An
    OSError (a full or read-only volume) names ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid alone is not unique: two threads of one process, or two pods on a shared volume
    # (each apply may run as the same pid in its container) wrote the same temporary file and
    # one writer's rename failed or moved the other's half-written bytes into place.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            # On the disk before the rename: otherwise a node that loses power (a pod's
            # volume) can come back with the new name pointing at an empty or partial file -
            # the rename reaches the journal before the data does on ext4/xfs.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        # Named by the file meant: a write's ENOSPC names none ("[Errno 28] No space left
        # on device", said alone by `innfer build`), the open's names the temporary one.
        if exc.errno is None:
            raise
        # (OSError(...) is the errno's own subclass: PermissionError for EACCES, ...)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        # (On a read-only volume the unlink of a file never made fails too - EROFS, not
        # ENOENT - and its error replaced the one above, naming the temporary file.)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    _sync_directory(path.parent)


def write_output(path: str | Path, data: bytes) -> None:
    """Write a file a user named for output (``--json PATH``): whole or not at all
    (``write_bytes``) where it is a regular file or new; through a symbolic link, to the
    file it names; and written to, not replaced, where it is a pipe or a device
    (``/dev/stdout``, a FIFO, ``/dev/full``'s ENOSPC said): the rename turned each into a
    regular file - a link lost, a reader that got nothing, a device node gone (review 176).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "real.json").write_text("{}")
        >>> (d / "link.json").symlink_to("real.json")
        >>> write_output(d / "link.json", b"[1]")
        >>> (d / "link.json").is_symlink(), (d / "real.json").read_text()
        (True, '[1]')
    """
    path = Path(path)
    # A stream: /dev/stdout, /dev/fd/N and bash's >(...) are links to pipes (their targets
    # have no file names) or to the shell's own file, and a FIFO or device has no contents to
    # replace - each written in place, appended (never truncated: a redirected stdout holds
    # what the command printed before); review 179.
    if str(path).startswith(("/dev/", "/proc/")) or (path.exists() and not path.is_file()):
        sys.stdout.flush()  # (what it printed first comes first)
        sys.stderr.flush()
        fd = _own_fd(str(path))
        try:
            # One of this process's own descriptors (/dev/stdout redirected to a file) is
            # written through a duplicate: it shares the descriptor's offset, where a new
            # open of the file appended at its end and the next print wrote over it.
            with os.fdopen(os.dup(fd), "ab") if fd is not None else open(path, "ab") as f:
                f.write(data)
        except OSError as exc:
            if exc.errno is None:
                raise
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        return
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    write_bytes(path, data)


def _own_fd(name: str) -> int | None:
    """The descriptor number ``name`` opens again (/dev/stdout, /dev/fd/3,
    /proc/self/fd/3), or None."""
    named = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
    if name in named:
        return named[name]
    for prefix in ("/dev/fd/", "/proc/self/fd/"):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            return int(name[len(prefix) :])
    return None


def probe_write(folder: Path, prefix: str = ".innfer-write-") -> None:
    """Make ``folder`` (and its parents) if missing and write a file into it, then remove
    the file: raises the OSError that tells why it cannot be written (root passes
    ``os.access`` on a read-only mount: only a write tells).

    Example:
        >>> import tempfile
        >>> probe_write(Path(tempfile.mkdtemp()) / "new")
    """
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=prefix, dir=folder)
    os.close(fd)
    os.unlink(probe)


def replace_directory(new: Path, out: Path) -> bool:
    """Put the folder ``new`` in the place of ``out``: ``out`` renamed aside, ``new`` renamed
    in, the old one removed. A reader finds the old folder or the new one, each whole - but
    for the instant between the renames, when it finds none. False where another writer's
    folder took the place meanwhile (a concurrent build of the same thing: theirs stays,
    ``new`` is left to the caller to remove). Interrupted between the renames, the old
    folder is put back.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "t").mkdir(); (root / "t.build").mkdir(); (root / "t.build" / "x").touch()
        >>> replace_directory(root / "t.build", root / "t"), sorted(os.listdir(root / "t"))
        (True, ['x'])
    """
    aside = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(out, aside)
        # Dated now: a rename keeps the folder's own time, and ``leftovers.sweep`` puts back
        # an old-enough replaced folder with nothing in its place - mid-swap, this one.
        with contextlib.suppress(OSError):
            os.utime(aside)
    except FileNotFoundError:
        aside = None  # none yet, or another writer's swap has it aside
    try:
        os.rename(new, out)
        placed = True
    except OSError:  # another writer's folder is in place (ENOTEMPTY, EEXIST): it stays
        placed = False
    except BaseException:  # interrupted between the renames: the old one back
        if aside is not None and not out.exists():
            with contextlib.suppress(OSError):
                os.rename(aside, out)
        raise
    if not placed and not out.exists():  # not another's: our rename itself failed
        if aside is not None:
            with contextlib.suppress(OSError):
                os.rename(aside, out)
        raise OSError(f"{new} could not be renamed to {out}")
    _sync_directory(out.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return placed


def sync_file(path: str | Path) -> None:
    """Put ``path``'s bytes on the disk (a file written by a library that does not sync,
    before the rename that makes it the real one: see ``write_bytes``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_directory(directory: Path) -> None:
    """``_sync_directory``, for writers that rename files themselves."""
    _sync_directory(directory)


def _sync_directory(directory: Path) -> None:
    """Make the rename itself durable (best effort: some file systems and platforms cannot
    open or sync a directory; the data is on the disk either way)."""
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
