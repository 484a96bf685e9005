"""``model_control: poll`` (Triton's ``--model-control-mode=poll``): the repository is looked
at every ``repository_poll_s`` and what changed is loaded, as an operator's Load would -
a rebuilt model (new tiers, a new profile, an edited model.yaml) reloaded without a
dropped request (the data plane's swap), a new model folder loaded where the server serves
every model of the repository, a broken model retried once its files change.

What a model's files are, to the poller: its folder's ``*.yaml`` and ``*.json`` (model.yaml,
profile.json, text.json, a tokenizer - not inn.json, which a calibration rewrites without
changing what is served, nor auto-tiering's choice, which the server writes) and every file
of each tier (``tiers/<tier>/``: its record and its network, which a copy may land last;
not a staging folder a build or a swap leaves, which the load itself sweeps), each by its
inode, mtime and size and, up to ``DIGEST_MAX_BYTES``, its content. Engines are not
looked at: the server itself writes them. A reload the poll starts answers the whole
queue of the version it replaces (no drain limit): the change is the server's own, not an
operator's unload. A model whose build lock is held
(``innfer build`` running: runtime/build/lock.py) is left until the build is done, so a
half-written model is never loaded. Unlike Triton, a folder that disappears is not
unloaded - said once, and served on: a rename or a copy under way must not take a model
away; unload it through a restart or model_control: explicit.

Invariants: the look at the disk runs off the event loop (stats of a few files per model;
a model folder that cannot be read is passed over, not the poll); one load per model at a
time, in a task of its own (their installs take turns on the data plane's lock; a replaced
version's drain holds up no other model), the build lock looked at again just before each;
a load that fails
keeps the served version (the data plane's reload) and is tried again only when the files
change again; a folder that failed to load and then went is forgotten (its not-ready
series would have fired for good, with no unload to clear it in this mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import zlib
from pathlib import Path

from runtime.repository.frontier import ACTIVE_FILE
from runtime.repository.leftovers import STAGING
from runtime.repository.store import BUILD_LOCK_FILE
from server.daemon_call import in_daemon_thread

log = logging.getLogger("innfer.poll")

Fingerprint = tuple  # ((relative path, inode, mtime_ns, size, digest), ...), sorted
# Files up to this size are fingerprinted by their content too (model.yaml, profile.json,
# tier.json, a tokenizer: kilobytes): an in-place edit to the same size within the file
# system's timestamp tick (a jiffy, ~4 ms, on ext4) changes no stat field. Larger files - a
# tier's network - by their stat alone: reading megabytes per poll would cost more than
# that race, and a copy or rebuild of a network changes its size, inode or mtime.
DIGEST_MAX_BYTES = 1 << 20
# Top-level files whose changes do not change what is served: auto-tiering's choice (the
# server writes it) and the INN's record (a calibration rewrites it; a rebuild follows).
IGNORED = frozenset({ACTIVE_FILE, "inn.json"})


def fingerprint(model_dir: Path) -> Fingerprint | None:
    """What tells that ``model_dir``'s files changed (None: no model.yaml there).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> fingerprint(d) is None
        True
        >>> _ = (d / "model.yaml").write_text("inputs: []")
    >>> _ = (d / "frontier.png").write_text("a plot")  # not what is served
        >>> [f[0] for f in fingerprint(d)]
        ['model.yaml']
    """
    try:  # (a folder it may not read raises: the caller keeps what it saw last)
        files = [p for p in model_dir.iterdir() if p.suffix in (".yaml", ".json")
                 and not p.name.startswith(".") and p.name not in IGNORED]  # fmt: skip
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        tiers = [t for t in (model_dir / "tiers").iterdir()
                 if not t.name.startswith(".") and not STAGING.match(t.name)]  # fmt: skip
    except OSError:  # no tiers yet
        tiers = []
    for t in tiers:
        with contextlib.suppress(OSError):
            files += [p for p in t.iterdir() if not p.name.startswith(".")]
    stamps = []
    for p in files:
        try:
            st = p.stat()
        except OSError:  # went while looked at, or not to be looked at: the next poll sees
            continue
        # ctime too: a chmod / chown that makes a file readable changes nothing else, and a
        # model that failed on it stayed failed after the fix (review helper-271)
        if stat.S_ISREG(st.st_mode):
            stamps.append((str(p.relative_to(model_dir)), st.st_ino, st.st_mtime_ns,
                           st.st_ctime_ns, st.st_size, _digest(p, st.st_size)))  # fmt: skip
    if not any(s[0] == "model.yaml" for s in stamps):
        # A model.yaml that is there but no file - a link to nothing (a ConfigMap not
        # mounted), a folder - is the model's, failed: read as gone, its failure was
        # forgotten and readiness came back with the model unserved (review helper-271)
        try:
            st = (model_dir / "model.yaml").lstat()
        except OSError:
            return None
        stamps.append(("model.yaml", st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, None))
    return tuple(sorted(stamps))


def _digest(path: Path, size: int) -> int | None:
    """CRC-32 of a file of at most ``DIGEST_MAX_BYTES`` (None: larger, or gone meanwhile -
    the next poll sees it)."""
    if size > DIGEST_MAX_BYTES:
        return None
    try:
        return zlib.crc32(path.read_bytes())
    except OSError:
        return None


def build_running(model_dir: Path) -> bool:
    """Whether an ``innfer build`` holds ``model_dir``'s build lock now (False where the
    lock cannot be looked at: no file, not a regular file, no ``fcntl``, a file system
    without ``flock``)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:  # (non-blocking: a FIFO in its place hung the poll)
        fd = os.open(model_dir / BUILD_LOCK_FILE, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (closing drops the shared lock taken)
    return False


class RepositoryPoller:
    """Loads what changed in the repository, every ``period_s`` (``run``).

    Example:
        >>> poller = RepositoryPoller(plane, period_s=15)  # doctest: +SKIP
        >>> await poller.baseline()  # before the start-up's loads  # doctest: +SKIP
        >>> task = asyncio.ensure_future(poller.run())  # doctest: +SKIP
    """

    def __init__(self, plane, period_s: float) -> None:
        self.plane = plane
        self.period_s = period_s
        self.seen: dict[str, Fingerprint | None] = {}  # as of each model's last load try
        self._said_gone: set[str] = set()
        # Loads started and not done (their replaced version draining its queue): one per
        # model at a time; a slow model's drain no longer holds up every other model's.
        self._loading: dict[str, asyncio.Future] = {}

    async def baseline(self) -> None:
        """The models as the start-up is about to load them (call before load_all: what
        changes while they load is loaded again at the first poll)."""
        names = set(self.plane.config.models)
        self.seen = await in_daemon_thread(self._look, names)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                # (the plane's sets read here, on the loop; the disk off it)
                names = set(self.plane.models) | set(self.plane.broken) | self.plane.expected
                now = await in_daemon_thread(self._look, names)
                await self._load_changed(now)
            except asyncio.CancelledError:
                raise
            except Exception:  # the poller goes on: the next look may be fine
                log.exception("repository poll failed; polling goes on")

    def _look(self, names: set[str]) -> dict[str, Fingerprint | None]:
        """Each model's fingerprint, or None (no model.yaml) - of ``names`` and, where the
        server serves every model of the repository, of every folder's; a model under a
        running build keeps the fingerprint last seen (looked at once the build is done).
        Blocking: off the event loop."""
        if not self.plane.config.models:
            with contextlib.suppress(OSError):
                names = names | set(self.plane.repo.names())
        out = {}
        for name in sorted(names):
            d = self.plane.repo.root / name
            try:
                if build_running(d):  # not looked at: the last fingerprint, else none yet
                    # (None is "no model.yaml": a model first seen under a build was said
                    # gone, then reloaded for no change - review helper-278)
                    if name in self.seen:
                        out[name] = self.seen[name]
                    continue
                out[name] = fingerprint(d)
            except OSError as exc:  # this model's folder only: passed over, the poll goes on
                log.warning("repository poll: model %s's folder cannot be read (%s)", name, exc)
        return out

    async def _load_changed(self, now: dict[str, Fingerprint | None]) -> None:
        for name, stamp in now.items():
            if self.plane.closing.is_set():
                return
            if stamp is None:
                self._gone(name)
                continue
            self._said_gone.discard(name)
            if name in self._loading:  # looked at again once its load is done
                continue
            if stamp == self.seen.get(name) and name in self.seen:
                continue
            # Looked at again just before: loads run one after another, and a build that
            # began since the look (minutes later, behind TensorRT builds) is left alone.
            if await in_daemon_thread(build_running, self.plane.repo.root / name):
                continue
            why = "changed" if name in self.seen else "new"
            self.seen[name] = stamp  # tried once per change, whatever the outcome
            log.info("repository poll: model %s %s: loading it", name, why)
            task = asyncio.ensure_future(self._load(name))
            self._loading[name] = task
            task.add_done_callback(lambda _, n=name: self._loading.pop(n, None))

    async def _load(self, name: str) -> None:
        """Load ``name``; awaited to the end of its replaced version's drain, in a task of
        its own (the loads' installs take turns on the data plane's lock)."""
        try:
            # The whole queue of the version replaced is answered (an operator's unload
            # gives it DRAIN_S): 35 of 50 queued requests of a slow model were failed.
            await self.plane.load(name, drain_s=None)
        except Exception as exc:  # said by the load (and the loaded version serves on)
            log.warning("repository poll: model %s not loaded: %s", name, exc)

    def cancel(self) -> None:
        """Stop waiting for the loads started (the server stopping; each load itself is
        the data plane's and ends as it does)."""
        for task in list(self._loading.values()):
            task.cancel()

    def _gone(self, name: str) -> None:
        if name in self.plane.broken and name not in self.plane.models:
            self.seen.pop(name, None)
            if self.plane.forget_failed(name):  # (never one the config names)
                log.info("repository poll: model %s's folder went: its failed load is "
                         "forgotten", name)  # fmt: skip
            return
        if name in self.plane.models and name not in self._said_gone:
            log.warning("repository poll: model %s's folder (or model.yaml) is gone; it is "
                        "served on as loaded (restart, or unload it with model_control: "
                        "explicit)", name)  # fmt: skip
            self._said_gone.add(name)
