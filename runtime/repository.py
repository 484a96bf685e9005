"""The on-disk model repository, the engine cache and the serving-side loader. No torch.

Layout of one model::

    <repo>/<model>/model.yaml                 config (runtime.config.ModelConfig)
    <repo>/<model>/inn.safetensors, inn.json  the INN (runtime.model)
    <repo>/<model>/tiers/<tier>/model.onnx    the sampled tier, exported (+ module.* for torch)
    <repo>/<model>/tiers/<tier>/tier.json     width, channel counts, FLOPs, params, accuracy,
                                              sha256 of model.onnx, what it was sampled from
    <repo>/<model>/engines/<key>/...          engine files + manifest.json (checksums, key)
    <repo>/<model>/profile.json               latency per tier x batch, with the device

An engine's cache key hashes the ONNX bytes' sha256, the backend and its version, the device
name, the precision and the batch profile. An entry whose manifest, key or checksums do not
match - or that fails to load - is logged and rebuilt from the tier's ONNX, never trusted.
Rebuilding from ONNX needs no torch, so a serving image can heal its own cache.

Example:
    >>> repo = Repository("models")  # doctest: +SKIP
    >>> served = repo.load("mnist")  # doctest: +SKIP
    >>> served.engines["w050"].run({"input": x})  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig
from .engines import Backend, BuildOptions, Engine, EngineError, get_backend

log = logging.getLogger("innfer.repository")

MANIFEST = "manifest.json"
TIER_FILE = "tier.json"
PROFILE_FILE = "profile.json"


class RepositoryError(RuntimeError):
    """A model, tier or profile is missing or unusable; the message says how to fix it."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class TierRecord:
    """What the build recorded about one tier (``tiers/<tier>/tier.json``)."""

    name: str
    width: Any
    sizes: dict[str, int]
    onnx_sha256: str
    source_sha256: str  # hash of what the tier was sampled from (INN weights + sampling args)
    flops: int
    params: int
    accuracy: float | None = None

    @classmethod
    def read(cls, path: Path) -> TierRecord:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError:
            raise RepositoryError(f"{path} is missing: run `innfer build` for this model") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise RepositoryError(f"{path} is corrupted ({exc}): run `innfer build`") from exc

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=1))


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
        "batch_profile": [1, options.opt_batch, options.max_batch],
        "extra": options.extra,
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return digest[:20], fields


class EngineCache:
    """``<model>/engines/<key>/``: build once, verify on every load, rebuild when bad."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(
        self,
        backend: Backend,
        onnx_path: Path,
        options: BuildOptions,
        on_build: Callable[[str], None] | None = None,
    ) -> tuple[Engine, bool]:
        """(engine, built): load the cached engine for this ONNX, or build it first."""
        onnx_sha = sha256_file(onnx_path)
        key, fields = engine_key(onnx_sha, backend, options)
        entry = self.root / key
        if entry.exists():
            problem = self._verify(entry, fields)
            if problem is None:
                try:
                    return backend.load(entry, options), False
                except EngineError as exc:
                    problem = str(exc)
            log.warning("engine cache entry %s is unusable (%s); rebuilding", entry, problem)
            shutil.rmtree(entry, ignore_errors=True)
        if on_build is not None:
            on_build(key)
        self._build(backend, onnx_path, entry, options, fields)
        return backend.load(entry, options), True

    def _build(self, backend, onnx_path, entry, options, fields) -> None:
        # A directory of our own: two pods building the same key on a shared volume must
        # not delete each other's half-built files.
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        t0 = time.perf_counter()
        files = backend.build(onnx_path, tmp, options)
        manifest = {
            "key": entry.name,
            "fields": fields,
            "files": {f: sha256_file(tmp / f) for f in files},
            "build_seconds": round(time.perf_counter() - t0, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            tmp.rename(entry)  # atomic: a crash mid-build leaves only a .tmp, never half an entry
        except OSError:
            # Someone else finished the same key first; theirs is as good as ours if it verifies.
            shutil.rmtree(tmp, ignore_errors=True)
            problem = self._verify(entry, fields)
            if problem is not None:
                raise EngineError(f"engine cache entry {entry} is unusable: {problem}") from None

    @staticmethod
    def _verify(entry: Path, fields: dict[str, Any]) -> str | None:
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            return f"manifest unreadable: {exc}"
        if manifest.get("fields") != fields:
            return "key fields do not match (different ONNX, backend, device or options)"
        for name, digest in manifest.get("files", {}).items():
            path = entry / name
            if not path.is_file():
                return f"{name} is missing"
            if sha256_file(path) != digest:
                return f"{name} fails its checksum"
        return None


@dataclass
class ServedModel:
    """A model ready to serve: config, tier records, loaded engines, latency profile."""

    name: str
    config: ModelConfig
    tiers: dict[str, TierRecord]
    engines: dict[str, Engine]
    profile: dict[str, Any] | None
    backend: str


class Repository:
    """A directory of models, one subdirectory each."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        d = self.root / name
        if not (d / "model.yaml").is_file():
            raise RepositoryError(
                f"model {name!r} not found: {d / 'model.yaml'} does not exist "
                f"(models here: {', '.join(self.names()) or 'none'})"
            )
        return d

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "model.yaml").is_file())

    def config(self, name: str) -> ModelConfig:
        return ModelConfig.load(self.model_dir(name) / "model.yaml")

    def tier_dir(self, name: str, tier: str) -> Path:
        return self.root / name / "tiers" / tier

    def load_record(self, name: str, tier: str) -> TierRecord:
        return TierRecord.read(self.tier_dir(name, tier) / TIER_FILE)

    def choose_backend(self, config: ModelConfig, override: str | None = None) -> Backend:
        names = [override] if override else list(config.backends)
        for n in names:
            backend = get_backend(n)
            if backend.available():
                return backend
        raise RepositoryError(
            f"{config.source}: none of the backends {names} is available on this machine "
            f"(the onnxruntime CPU backend is always installed with innfer)"
        )

    def build_options(self, config: ModelConfig, backend: Backend) -> BuildOptions:
        extra = (
            {"device": "cuda"} if backend.name == "torch" and "cpu" not in backend.device() else {}
        )
        return BuildOptions(
            precision=config.precision,
            max_batch=config.max_batch,
            opt_batch=min(config.max_batch, 4),
            threads=config.threads,
            extra=extra,
        )

    def load(
        self,
        name: str,
        backend: str | None = None,
        on_build: Callable[[str, str], None] | None = None,
    ) -> ServedModel:
        """Load every tier's engine (building missing or bad cache entries from ONNX)."""
        try:
            config = self.config(name)
        except ConfigError as exc:
            raise RepositoryError(str(exc)) from exc
        chosen = self.choose_backend(config, backend)
        options = self.build_options(config, chosen)
        cache = EngineCache(self.root / name / "engines")
        tiers, engines = {}, {}
        for tier in config.tiers:
            d = self.tier_dir(name, tier.name)
            tiers[tier.name] = TierRecord.read(d / TIER_FILE)
            onnx_path = d / "model.onnx"
            if not onnx_path.is_file():
                raise RepositoryError(f"{onnx_path} is missing: run `innfer build`")
            if sha256_file(onnx_path) != tiers[tier.name].onnx_sha256:
                raise RepositoryError(f"{onnx_path} does not match {d / TIER_FILE}: rebuild")
            callback = (lambda key, t=tier.name: on_build(t, key)) if on_build else None
            engines[tier.name], _ = cache.get(chosen, onnx_path, options, callback)
        return ServedModel(name, config, tiers, engines, self.read_profile(name), chosen.name)

    def read_profile(self, name: str) -> dict[str, Any] | None:
        path = self.root / name / PROFILE_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is corrupted; the model will be re-profiled", path)
            return None
