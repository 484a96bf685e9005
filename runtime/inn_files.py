"""The two files of a saved INN, and the completion of a save cut between its renames.

``IntegralModel.save`` writes ``inn.safetensors`` (the tensors) and ``inn.json`` (everything
else, with the tensors' sha256) beside their names - ``.inn.json.<pid>-<hex8>.tmp`` - then
renames them into place, weights first. A process killed between the two renames (SIGKILL,
a node lost: no ``finally`` runs) leaves the new weights under the old ``inn.json``, whose
checksum refuses them - the model lost, old and new - and the new ``inn.json`` in its
temporary file. That file completes the save: it is the one whose checksum the weights now
have. ``pending`` finds it (``load`` reads it, and says so); ``complete`` renames it into
place (the leftovers sweep, once it is older than a save's two renames could be apart).
No dependencies: the torch-free repository code and the INN library both use it.

Example:
    >>> import tempfile
    >>> pending(Path(tempfile.mkdtemp()), "0" * 64) is None
    True
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from runtime.flock import exclusive
from runtime.hashing import sha256_file

WEIGHTS_FILE = "inn.safetensors"
META_FILE = "inn.json"
TEMP_META = re.compile(r"^\.inn\.json\.\d+-[0-9a-f]{8}\.tmp$")  # IntegralModel.save's


@contextlib.contextmanager
def renaming(model_dir: Path) -> Iterator[None]:
    """Hold ``model_dir``'s rename lock (an exclusive ``flock`` of the folder itself: no
    lock file left beside the model) for a save's two renames: two savers into one folder
    (two calibrations, a training run and a calibration) interleaved them into one's weights
    under the other's ``inn.json``, which its checksum refuses - the model lost. Held for
    microseconds; where it cannot be taken (no ``fcntl``; NFS, whose emulated flock refuses
    a folder's read-only descriptor) the renames go on without it.

    Example:
        >>> import tempfile
        >>> with renaming(Path(tempfile.mkdtemp())):
        ...     pass
    """
    with exclusive(model_dir):
        yield


def pending(model_dir: Path, weights_sha256: str) -> tuple[Path, dict] | None:
    """The temporary ``inn.json`` of a save cut between its renames - the one whose
    checksum is ``weights_sha256``, the weights in place - and its content; None if there is
    none (the newest first where several match)."""
    for tmp in sorted(_temp_metas(model_dir), key=_mtime, reverse=True):
        with contextlib.suppress(OSError, ValueError):  # unreadable, half-written: not it
            meta = json.loads(tmp.read_text())
            if isinstance(meta, dict) and meta.get("weights_sha256") == weights_sha256:
                return tmp, meta
    return None


def complete(model_dir: Path, now: float, after_s: float) -> bool:
    """Rename into place the ``inn.json`` of a save cut between its renames, if its temporary
    file is older than ``after_s`` (a live save renames it microseconds after the weights);
    whether one was. The weights are hashed only where such a temporary file exists and
    ``inn.json`` does not describe them."""
    temps = [t for t in _temp_metas(model_dir) if now - _mtime(t) > after_s]
    weights, meta = model_dir / WEIGHTS_FILE, model_dir / META_FILE
    if not temps or not weights.is_file():
        return False
    try:
        before = _identity(weights)
        digest = sha256_file(weights)
        if _checksum(meta) == digest:
            return False  # whole: the temporary files are a dead save's, not this one's
        found = pending(model_dir, digest)
        if found is None or now - _mtime(found[0]) <= after_s:
            return False
        # Hashing takes seconds on large weights: a save that completed meanwhile put new
        # weights and their inn.json in place, and the old temporary file put over them
        # lost the model (review 155). Looked at again just before: the same weights file,
        # still not described.
        with renaming(model_dir):  # (a live save's renames are not in between)
            if _identity(weights) != before or _checksum(meta) == digest:
                return False
            os.replace(found[0], meta)
    except (OSError, AttributeError):  # unreadable, read-only; a JSON that is not an object
        return False
    return True


def _identity(path: Path) -> tuple[int, int, int]:
    """(inode, size, mtime_ns): a rename of another file onto ``path`` changes it."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _checksum(meta: Path) -> str | None:
    """The weights' checksum ``meta`` records; None where it is missing or unreadable (the
    first save of a folder cut between its renames has no ``inn.json`` yet)."""
    try:
        return json.loads(meta.read_text()).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _temp_metas(model_dir: Path) -> list[Path]:
    try:
        return [model_dir / n for n in os.listdir(model_dir) if TEMP_META.match(n)]
    except OSError:
        return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # renamed or removed meanwhile
        return float("-inf")
