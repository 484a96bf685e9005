"""What interrupted writers leave in a model's folder, and its removal. No torch.

A process killed mid-write (SIGKILL, a node lost) runs no ``finally``: it leaves the
temporary file of an atomic write (``.<name>.<pid>-<hex8>.tmp``, ``runtime.atomic`` and
``IntegralModel.save``: full-size hidden copies of ONNX files and weights) and staging
folders: a frontier build's (``frontier.build-<hex8>``, up to a candidate's ONNX and weights
per width) and a tier export's (``tiers/<tier>.build-<hex8>``). Nothing removed them: a
killed build's leftovers stayed for good, through later builds and loads (review
helper-150). ``sweep`` removes those older than ``STALE_S`` - a younger one may be another
builder's, still writing on a shared volume - and a replaced frontier or tier
(``frontier.old-<hex8>``, ``tiers/<tier>.old-<hex8>``) whose removal was cut short, at any
age; a replaced one with nothing in its place (a writer killed between the two renames of a
swap) is put back instead (the newest of them), and the ``inn.json`` of an INN save killed
between its renames is put in place (``runtime.inn_files``). The engine cache's own
interrupted builds are ``EngineCache.sweep``'s.

Example:
    >>> sweep(Path("models/mnist"))  # doctest: +SKIP
    ['tiers/w050/.model.onnx.4242-1a2b3c4d.tmp']
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from runtime import inn_files
from runtime.repository.cache import STALE_BUILD_S

log = logging.getLogger("innfer.repository")

# Seconds: no write of one file, and no frontier build, takes an hour - the engine cache's
# interrupted builds' age too (one notion of "interrupted").
STALE_S = STALE_BUILD_S
TEMP_FILE = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp$")
STAGING = re.compile(r"^(?P<base>[\w.-]+)\.(?P<kind>build|old)-[0-9a-f]{8}$")  # frontier, tiers/*
# Seconds a replaced folder (``.old-``) with nothing in its place waits before it is put
# back: a swap between its two renames has one for microseconds (``atomic.replace_directory``);
# one still there after this was left by a writer killed between them - the only copy.
RESTORE_AFTER_S = 60.0
ENGINES = "engines"  # EngineCache.sweep's
# Seconds between the touches that keep a live build's staging folder young (``kept_fresh``):
# well inside STALE_S, whatever one step of the build takes.
FRESH_EVERY_S = STALE_S / 6


def sweep(model_dir: Path, now: float | None = None) -> list[str]:
    """Remove the leftovers of interrupted writers in ``model_dir`` (see the module doc);
    their paths relative to it. Best effort: a read-only volume keeps them, unsaid (they
    are never read)."""
    now = time.time() if now is None else now
    # Before the temporary files go: a save's new inn.json, cut from its weights by a kill
    # between their renames, is the model's only description that matches them.
    if inn_files.complete(model_dir, now, RESTORE_AFTER_S):
        log.warning("%s: %s of a save killed between its renames put in place", model_dir,
                    inn_files.META_FILE)  # fmt: skip
    removed = []
    for top, dirs, files in os.walk(model_dir, onerror=lambda exc: None):
        here = Path(top)
        if here == model_dir:
            dirs[:] = [d for d in dirs if d != ENGINES]
        staged = here == model_dir or here == model_dir / "tiers"  # where staging folders are
        for d in sorted(dirs, key=lambda d: _mtime(here / d), reverse=True):  # newest first
            m = STAGING.match(d) if staged else None
            if m is None or (here / d).is_symlink():  # writers make folders, never links:
                continue  # one put back as the served folder was read from outside it
            dirs.remove(d)  # not walked into: removed whole, put back whole, or left
            name = str((here / d).relative_to(model_dir))
            base = here / m.group("base")
            if m.group("kind") == "old" and not base.exists():
                if _older(here / d, now, RESTORE_AFTER_S) and _restore(here / d, base):
                    log.warning("%s: %s put back as %s (a swap killed between its renames)",
                                model_dir, name, base.name)  # fmt: skip
                continue
            if (m.group("kind") == "old" or _older(here / d, now)) and _rmtree(here / d):
                removed.append(name)
        for f in files:
            if TEMP_FILE.match(f) and _older(here / f, now):
                with contextlib.suppress(OSError):
                    (here / f).unlink()
                    removed.append(str((here / f).relative_to(model_dir)))
    if removed:
        log.warning("%s: removed %d leftovers of interrupted writes (%s%s)", model_dir,
                    len(removed), ", ".join(removed[:3]), ", ..." * (len(removed) > 3))  # fmt: skip
    return removed


@contextlib.contextmanager
def kept_fresh(path: Path) -> Iterator[None]:
    """Touch ``path`` (a staging folder, once it exists) every ``FRESH_EVERY_S`` while the
    block runs, so that ``sweep`` - another builder's, a load's - never takes it for a killed
    build's: its age was its last new entry's, and one frontier candidate measured for over
    an hour (a large model, a big evaluation set, a niced background build) let a sweep
    remove the folder under the build (review 152 #7). A time, not a lock: it reads the same
    from every node of a shared volume.

    Example:
        >>> with kept_fresh(Path("models/mnist/frontier.build-1a2b3c4d")):  # doctest: +SKIP
        ...     measure_every_candidate()
    """
    done = threading.Event()

    def touch() -> None:
        while not done.wait(FRESH_EVERY_S):
            with contextlib.suppress(OSError):  # not made yet, or removed: nothing to keep
                os.utime(path)

    thread = threading.Thread(target=touch, name=f"fresh-{path.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile (its writer finished)
        return float("nan")


def _older(path: Path, now: float, seconds: float = STALE_S) -> bool:
    return now - _mtime(path) > seconds  # (False for nan: gone)


def _restore(old: Path, base: Path) -> bool:
    try:
        os.rename(old, base)
    except OSError:  # a writer put a folder there meanwhile, or a read-only volume
        return False
    return True


def _rmtree(path: Path) -> bool:
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()
