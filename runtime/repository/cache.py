"""The engine cache, ``<model>/engines/<key>/``. No torch.

An engine's cache key hashes the ONNX bytes' sha256, the backend and its version, the device
name, the precision and - for a backend whose engines are built for a shape range
(``Backend.shape_profiled``: TensorRT) - the batch profile and (sequence models) the
sequence profile. An entry
whose manifest, key or checksums do not match is logged and rebuilt from the tier's ONNX,
never trusted; so is one whose engine ``innfer build`` finds disagrees with the network the
ONNX was exported from (``discard``). One that verifies but fails to load is built afresh
beside it first: the entry is replaced only where the fresh engine loads - a load that fails
for want of memory or a device error is this replica's trouble, and the shared entry that
every other replica loads stays. A build that fails leaves nothing behind.
Rebuilding from ONNX needs no torch, so a serving image can heal its own cache.

Example:
    >>> cache = EngineCache(Path("repo/mnist/engines"))  # doctest: +SKIP
    >>> onnx = Path("repo/mnist/tiers/w050/model.onnx")  # doctest: +SKIP
    >>> engine, built = cache.get(backend, onnx, options)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.engines import Backend, BuildOptions, Engine, EngineError
from runtime.engines.base import VolumeFull
from runtime.hashing import sha256_file
from runtime.utc import stamp

log = logging.getLogger("innfer.repository")

MANIFEST = "manifest.json"
# A build directory (``<key>.tmp-<pid>-<rand>``) older than this is an interrupted build:
# no engine build of a tier takes an hour, and on a shared volume the pid says nothing.
STALE_BUILD_S = 3600.0


def engine_key(
    onnx_sha256: str, backend: Backend, options: BuildOptions
) -> tuple[str, dict[str, Any]]:
    """(short key, the fields it hashes) for an engine of ``backend`` built from that ONNX."""
    fields = {
        "onnx_sha256": onnx_sha256,
        "backend": backend.name,
        "backend_version": backend.version(),
        "device": backend.device(),
        "precision": options.precision,
        "extra": options.extra,
    }
    # A shape-profiled backend's (TensorRT's) only: ONNX Runtime runs any batch. (An
    # upgrade past the release that dropped it there rebuilt each ONNX Runtime engine once,
    # under its new key; the next `innfer build` removes the old entries: ``prune``.)
    if backend.shape_profiled:
        fields["batch_profile"] = [1, options.opt_batch, options.max_batch]
    if options.sequence is not None and backend.shape_profiled:
        fields["sequence_profile"] = list(options.sequence)
    if options.instances > 1 and backend.shape_profiled:  # one profile per context
        fields["profiles"] = options.instances
    fields.update(backend.key_fields(options))
    if backend.recipe != 1:  # absent at the first recipe: keys from before it stay valid
        fields["recipe"] = backend.recipe
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return digest[:20], fields


class EngineCache:
    """``<model>/engines/<key>/``: build once, verify on every load, rebuild when bad.
    ``spare``: a cache of this process's where an engine is built when ``root`` cannot be
    written (a read-only repository: KServe's /mnt/models, a read-only PVC) - looked in
    whenever ``root`` has no usable entry, built into only when ``root`` cannot be written
    (checked before a build starts: TensorRT's took minutes, then failed to be placed);
    None: such a miss is an EngineError that says how to fix it.
    """

    def __init__(self, root: Path, spare: Path | None = None) -> None:
        self.root = root
        self.spare = spare

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove interrupted builds (``*.tmp-*`` older than ``STALE_BUILD_S``) and entries
        set aside as unusable whose removal was cut short (``*.bad-*``); their names.

        Example:
            >>> EngineCache(Path("repo/mnist/engines")).sweep()  # doctest: +SKIP
            ['3f9c...tmp-4242-1a2b3c4d']
        """
        now = time.time() if now is None else now
        removed, left = [], None
        if not self.root.is_dir():
            return removed
        # (and a TensorRT timing cache's temporary file a killed build left: ``glob("*")``
        # skips dot files, so it stayed for good - review 175)
        left_over = [*self.root.glob("*.tmp-*"), *self.root.glob("*.bad-*"),
                     *self.root.glob(".timing-*.tmp"), *self.root.glob(".probe-*")]  # fmt: skip
        for entry in left_over:
            try:  # an entry set aside as bad (``_discard``) is never used: at any age
                stale = ".bad-" in entry.name or now - entry.stat().st_mtime > STALE_BUILD_S
            except OSError:
                continue  # finished or removed by its builder meanwhile
            if stale:
                _delete(entry)
                if not entry.exists() and not entry.is_symlink():  # (a read-only volume: kept)
                    removed.append(entry.name)
                else:
                    left = entry.name
        if removed:
            log.warning("removed %d interrupted engine builds in %s", len(removed), self.root)
        if left is not None:  # said "removed" at every load of a read-only volume before
            log.info("interrupted engine builds in %s could not be removed (%s, ...): a "
                     "read-only volume? they are never used", self.root, left)  # fmt: skip
        return removed

    def get(
        self,
        backend: Backend,
        onnx_path: Path,
        options: BuildOptions,
        on_build: Callable[[str], None] | None = None,
        onnx_sha256: str | None = None,
    ) -> tuple[Engine, bool]:
        """(engine, built): load the cached engine for this ONNX, or build it first.
        ``onnx_sha256``: the file's hash as the caller checked it against its record - the
        engine of that ONNX is what it gets, or an EngineError where the file changed since
        (hashed here again, a build writing the tier in between had its engine served under
        the old record; a build from the changed file is refused after it, ``_build_aside``)."""
        onnx_sha = onnx_sha256 or sha256_file(onnx_path)
        key, fields = engine_key(onnx_sha, backend, options)
        entry = self.root / key
        # The entry as found; then, where another builder repaired it while this one judged
        # it unusable (``_discard`` keeps theirs), the repaired one: loaded, not built again.
        why = "none is cached"
        if entry.is_symlink() and not entry.exists():  # a link to nothing is no entry, and
            # a build could never put one in its place (review helper-271): it goes
            log.warning("engine cache entry %s is a link to nothing: removed", entry)
            _delete(entry)
        for _ in range(2):
            if not entry.exists():
                break
            judged = _manifest_bytes(entry)  # the entry as it was when judged (below)
            problem = self._verify(entry, fields)
            if problem is None:
                try:
                    return backend.load(entry, options), False
                except EngineError as exc:
                    if on_build is not None:
                        on_build(key)
                    if self.spare is not None and not _writable(self.root):
                        return self._in_spare(backend, onnx_path, options, onnx_sha, key,
                                              f"its entry does not load: {exc}"), True  # fmt: skip
                    return self._replace_unloadable(
                        backend, onnx_path, entry, options, fields, judged, exc
                    ), True  # fmt: skip
            log.warning("engine cache entry %s is unusable (%s)", entry, problem)
            why = f"the cached one is unusable: {problem}"
            if not self._discard(entry, fields, judged, False):
                break  # removed: build it
            log.info("engine cache entry %s was repaired by another builder meanwhile", entry)
        spared = self._spared(backend, key, fields, options)
        if spared is not None:  # built here before, the repository's cache being read-only
            return spared, False
        if on_build is not None:
            on_build(key)
        if self.spare is not None and not _writable(self.root):
            return self._in_spare(backend, onnx_path, options, onnx_sha, key, why), True
        # Said where it happens: a server loading a repository copied from another machine
        # built every engine into it with no word (TensorRT: minutes; review 157).
        log.info("%s: no usable %s engine for %s %s (%s): building it into %s", onnx_path,
                 backend.name, backend.device(), backend.version(), why, entry)  # fmt: skip
        started = time.perf_counter()
        try:
            self._build(backend, onnx_path, entry, options, fields)
        except OSError as exc:  # a read-only repository (an image, a read-only mount), full
            if self.spare is not None:
                said = f"{why}; {self.root}: {exc.strerror or exc}"
                return self._in_spare(backend, onnx_path, options, onnx_sha, key, said), True
            if isinstance(exc, EngineError):  # a full volume (VolumeFull), said with its fix:
                raise  # not the read-only advice below (review helper-259)
            if exc.errno == errno.ENOSPC:  # (the manifest's write, past the engine's own
                # check of the room left: an .ort is larger than its ONNX; helper-278)
                raise VolumeFull(
                    f"the volume holding {self.root} is full ({exc.strerror}) while the "
                    f"{backend.name} engine for {onnx_path} was written: free space or grow it"
                ) from exc
            raise EngineError(
                f"no usable {backend.name} engine for {onnx_path} on {backend.device()} "
                f"({why}), and none can be built here: {exc}. Make {self.root} writable, or "
                f"build the engines for this device where it is (`innfer build` on a machine "
                f"of this kind, with {backend.name} {backend.version()}), or give the server a "
                "writable engine_cache_spare"
            ) from exc
        log.info("%s: built in %.1f s", entry, time.perf_counter() - started)
        return backend.load(entry, options), True

    def _in_spare(self, backend, onnx_path, options, onnx_sha: str, key: str, why: str) -> Engine:
        """The engine built in (or loaded from) the spare cache: ``root`` cannot take it."""
        log.warning("%s: no usable engine %s in %s, which cannot be written (%s): using the "
                    "spare cache %s", onnx_path, key, self.root, why, self.spare)  # fmt: skip
        try:
            return EngineCache(self.spare).get(backend, onnx_path, options, None, onnx_sha)[0]
        except EngineError as exc:  # (its own message named only the spare)
            raise EngineError(
                f"no usable engine for {onnx_path}: {self.root} cannot be written ({why}) "
                f"and the spare cache {self.spare} could not take one either ({exc})"
            ) from exc

    def _spared(self, backend: Backend, key: str, fields: dict, options) -> Engine | None:
        """The spare cache's engine for ``key``, where one verifies and loads; else None."""
        entry = self.spare / key if self.spare is not None else None
        if entry is None or not entry.exists() or self._verify(entry, fields) is not None:
            return None
        try:
            return backend.load(entry, options)
        except EngineError:  # built afresh (in the spare, the repository being read-only)
            return None

    def prune(
        self, keep: set[str], backend: Backend | None = None, options: BuildOptions | None = None
    ) -> tuple[list[str], int]:
        """Remove the entries built from an ONNX whose sha256 is not in ``keep`` (the
        ONNX files the model's tiers and frontier candidates record): every rebuild with new
        weights, and every channel-search candidate not chosen, left a whole engine here for
        good - a TensorRT plan per tier and device on a shared volume. Entries of other
        devices, backends and versions built from a kept ONNX stay (other nodes load them);
        one whose manifest cannot be read is left to the next load's repair. With the
        build's ``backend`` and ``options``, also an entry of that very engine - same ONNX,
        backend, version, device, precision and extra options - under another key than
        ``engine_key`` gives it now: a key whose fields changed (an upgrade past the release
        that dropped ``batch_profile`` from ONNX Runtime's keys built each engine again and
        kept the old one; a TensorRT model whose max_batch changed). Returns the names
        removed and the bytes they held.

        Example:
            >>> cache.prune({record.onnx_sha256 for record in records})  # doctest: +SKIP
            (['3f9c2a...'], 48211968)
        """
        removed, freed = [], 0
        if not self.root.is_dir():
            return removed, freed
        for entry in sorted(self.root.iterdir()):
            if ".tmp-" in entry.name or ".bad-" in entry.name or not entry.is_dir():
                continue  # builds in progress and leftovers: ``sweep``'s
            try:
                fields = json.loads((entry / MANIFEST).read_text())["fields"]
                onnx = fields["onnx_sha256"]
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                continue
            if onnx in keep and not self._superseded(entry.name, fields, backend, options):
                continue
            try:
                size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
            except OSError:  # set aside meanwhile by another builder's repair
                continue
            if self._remove(entry):
                removed.append(entry.name)
                freed += size
        return removed, freed

    @staticmethod
    def _superseded(key: str, fields: dict, backend: Backend | None, options) -> bool:
        """Whether the entry ``key`` (its manifest's ``fields``) holds the engine ``backend``
        builds now with ``options`` for its ONNX, filed under a key that is no longer it."""
        if backend is None or options is None:
            return False
        same = {
            "backend": backend.name, "backend_version": backend.version(),
            "device": backend.device(), "precision": options.precision, "extra": options.extra,
            # another recipe: an engine an older or newer release builds and loads (a
            # rolling upgrade's other pods on this volume); absent at the first recipe
            "recipe": backend.recipe if backend.recipe != 1 else None,
            # and what the backend's own key fields say of this node: TensorRT's compute
            # capability, SM count and CUDA runtime - a MIG slice bears its GPU's name, and
            # each pruned the other's engines as "filed under an old key" (helper-310)
            **backend.key_fields(options),
        }  # fmt: skip
        if any(fields.get(k) != v for k, v in same.items()):
            return False  # another node's, backend's, version's or recipe's engine: it stays
        return key != engine_key(fields["onnx_sha256"], backend, options)[0]

    def discard(self, backend: Backend, onnx_sha256: str, options: BuildOptions) -> bool:
        """Remove the entry of ``backend``'s engine for the ONNX with that sha256 (``innfer
        build`` found it disagrees with the network it was exported from: kept, it would be
        served, and fail every later build's validation); True if there was one.

        Example:
            >>> cache.discard(backend, record.onnx_sha256, options)  # doctest: +SKIP
            True
        """
        key, _ = engine_key(onnx_sha256, backend, options)
        return self._remove(self.root / key)

    def _discard(
        self, entry: Path, fields: dict[str, Any], judged: bytes | None, verified: bool
    ) -> bool:
        """Remove an unusable entry - unless another builder has put a new one in its place
        since it was judged (two pods repairing one key on a shared volume): one that
        verifies now where it did not (``verified``: whether it did when judged), or whose
        manifest differs from ``judged`` and verifies. It is renamed aside first, so that a
        delete never takes an entry someone has just made. An entry that verifies but fails
        to load (the same manifest) is removed. True: the entry was kept (repaired by
        another builder), False: removed or gone."""
        changed = not verified or _manifest_bytes(entry) != judged
        if changed and self._verify(entry, fields) is None:
            return True  # repaired by another builder since it was found bad: keep theirs
        self._remove(entry)
        return False

    @staticmethod
    def _remove(entry: Path) -> bool:
        """Rename ``entry`` aside and delete it; False if it was gone already."""
        aside = entry.with_name(f"{entry.name}.bad-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            entry.rename(aside)
        except OSError:  # gone already (another builder moved it)
            return False
        _delete(aside)
        return True

    def _replace_unloadable(
        self, backend, onnx_path, entry, options, fields, judged, error: EngineError
    ) -> Engine:
        """The engine for ``entry``, which verifies but fails to load with ``error``: a
        bad build (an engine another build of the backend cannot read), or this replica's
        trouble (out of memory, a device error) - only a fresh build tells them apart. It
        is built beside the entry and loaded there; where it loads, it takes the entry's
        place (unless another builder replaced the entry meanwhile: theirs is kept), else
        the entry stays - every other replica may load it - and the error says both."""
        log.warning("engine cache entry %s verifies but does not load (%s); building it "
                    "afresh beside it", entry, error)  # fmt: skip
        tmp = None
        try:
            tmp = self._build_aside(backend, onnx_path, entry, options, fields)
            probe = backend.load(tmp, options)
        except Exception as again:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(again, OSError):  # read-only, full: not this process's memory
                raise EngineError(
                    f"the cached engine {entry} does not load on this replica ({error}), and "
                    f"no fresh one can be built beside it ({again}): the entry is kept; give "
                    "the server a writable repository with room, then load the model again"
                ) from again
            raise EngineError(
                f"the cached engine {entry} does not load on this replica ({error}), and a "
                f"fresh build does not either ({again}): the trouble is this process's (out of "
                "memory? the device?), not the cache's - the entry is kept. Give the server "
                "more memory or free the device, then load the model again"
            ) from again
        with contextlib.suppress(Exception):  # (its memory back before the entry's load)
            probe.close()
        if self._discard(entry, fields, judged, True):
            shutil.rmtree(tmp, ignore_errors=True)  # another builder's repair: kept
            log.info("engine cache entry %s was repaired by another builder meanwhile", entry)
        else:
            log.warning("engine cache entry %s replaced: the fresh build loads", entry)
            self._place(tmp, entry, onnx_path, fields)
        return backend.load(entry, options)

    def _build(self, backend, onnx_path, entry, options, fields) -> None:
        self._place(self._build_aside(backend, onnx_path, entry, options, fields), entry,
                    onnx_path, fields)  # fmt: skip

    def _build_aside(self, backend, onnx_path, entry, options, fields) -> Path:
        """Build the engine into a directory of its own beside ``entry``, manifest last;
        return it. Two pods building the same key on a shared volume must not delete each
        other's half-built files."""
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            t0 = time.perf_counter()
            files = backend.build(onnx_path, tmp, options)
            # The backend read the file again: a rewrite since it was hashed (``innfer build``
            # on the same volume) would put another model's engine under this key.
            if sha256_file(onnx_path) != fields["onnx_sha256"]:
                raise EngineError(
                    f"{onnx_path} changed while its engine was built (another build writing "
                    "the tier?); load the model again once that build is done"
                )
            manifest = {
                "key": entry.name,
                "fields": fields,
                "files": {f: sha256_file(tmp / f) for f in files},
                "build_seconds": round(time.perf_counter() - t0, 3),
                "created": stamp(),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        except BaseException:  # a failed (or interrupted) build leaves no directory behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def _place(self, tmp: Path, entry: Path, onnx_path: Path, fields: dict[str, Any]) -> None:
        """Move the finished build ``tmp`` to ``entry`` - or, where another builder's
        entry is there first, keep theirs if it verifies."""
        try:
            tmp.rename(entry)  # atomic: a crash mid-build leaves only a .tmp, never half an entry
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if not entry.exists():  # not another builder's entry in the way: a real failure
                raise EngineError(
                    f"cannot put the engine built for {onnx_path} in place as {entry}: {exc}"
                ) from exc
            # Someone else finished the same key first; theirs is as good as ours if it verifies.
            problem = self._verify(entry, fields)
            if problem is not None:
                raise EngineError(f"engine cache entry {entry} is unusable: {problem}") from None

    @staticmethod
    def _verify(entry: Path, fields: dict[str, Any]) -> str | None:
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, not UTF-8
            return f"manifest unreadable: {exc}"
        if not isinstance(manifest, dict):
            return "manifest is not a JSON object"
        if manifest.get("fields") != fields:
            return "key fields do not match (different ONNX, backend, device or options)"
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return "manifest lists no files"
        for name, digest in files.items():
            if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
                return f"manifest names {name!r}, not a file of the entry"
            path = entry / name
            if not path.is_file():
                return f"{name} is missing"
            if sha256_file(path) != digest:
                return f"{name} fails its checksum"
        return None


def _writable(root: Path) -> bool:
    """Whether an entry can be built in ``root`` (made if missing; a probe file written and
    removed): a read-only mount stops root too, where file modes do not."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return False
    return True


def _delete(path: Path) -> None:
    """Remove ``path``, a directory or - set aside where an entry should be - a file or
    link (``rmtree`` leaves those: swept, then logged as removed, at every load for good)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _manifest_bytes(entry: Path) -> bytes | None:
    """The entry's manifest as stored (None where unreadable): what identifies one build."""
    try:
        return (entry / MANIFEST).read_bytes()
    except OSError:
        return None
