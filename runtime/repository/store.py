"""The on-disk model repository and the serving-side loader. No torch.

Layout of one model::

    <repo>/<model>/model.yaml                 config (runtime.repository.config.ModelConfig)
    <repo>/<model>/inn.safetensors, inn.json  the INN (runtime.inn.model)
    <repo>/<model>/tiers/<tier>/model.onnx    the sampled tier, exported (+ module.* for torch)
    <repo>/<model>/tiers/<tier>/tier.json     width, channel counts, FLOPs, params, accuracy,
                                              sha256 of model.onnx, what it was sampled from
    <repo>/<model>/engines/<key>/...          engine files + manifest.json (cache.py)
    <repo>/<model>/profile.json               latency per tier x batch, with the device
    <repo>/<model>/tokenizer.json, text.json  text models: the tokenizer, and its sha256 as
                                              the build saw it (a changed file is refused)
    <repo>/<model>/frontier/, auto_tiers.json auto-tiering: measured candidates and the live
                                              choice among them (frontier.py)

Example:
    >>> repo = Repository("models")  # doctest: +SKIP
    >>> served = repo.load("mnist")  # doctest: +SKIP
    >>> served.engines["w050"].run({"input": x})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runtime.atomic import write_json
from runtime.configspec import MODEL_NAME as MODEL_NAME_PATTERN
from runtime.engines import Backend, BuildOptions, Engine, get_backend
from runtime.hashing import sha256_file
from runtime.repository.cache import EngineCache
from runtime.repository.config import (
    DTYPES,
    FP16_BACKENDS,
    ConfigError,
    ModelConfig,
    TierConfig,
)
from runtime.repository.errors import InvalidModelName, ModelNotFound, RepositoryError
from runtime.repository.frontier import (
    ACTIVE_FILE,
    FRONTIER_DIR,
    FRONTIER_FILE,
    ActiveTiers,
    Frontier,
)
from runtime.repository.leftovers import STAGING, sweep
from runtime.repository.profile import (
    measured_elsewhere,
    profile_problem,
    profile_tiers,
    stale_tiers,
    uncovered,
)
from runtime.repository.records import (
    TIER_FILE,
    InnPrint,
    Rows,
    TierRecord,
    merge_rows,
    warn_once,
)
from runtime.repository.tokenizer import TextTokenizer, TokenizerError

log = logging.getLogger("innfer.repository")


def file_known(path: Path) -> bool | None:
    """Whether ``path`` is a file; None where it cannot be told (a folder of mode 000, or
    owned by another user: ``is_file`` raises PermissionError; a volume's I/O error)."""
    try:
        return path.is_file()
    except OSError:
        return None


def something_at(path: Path) -> bool | None:
    """Whether anything is at ``path`` - a file, a folder, a link even to nothing; None
    where it cannot be told. A model.yaml that is a broken link (a ConfigMap's target not
    mounted) or a folder is listed, so that loading it says what is wrong, where "no
    model.yaml: write one" sent the operator to write a file that is there (review
    helper-183)."""
    try:
        return path.is_symlink() or path.exists()
    except OSError:
        return None


PROFILE_FILE = "profile.json"
# What ``innfer build`` holds locked while it writes a model (runtime/build/lock.py); the
# server's repository poll leaves a model alone while it is held.
BUILD_LOCK_FILE = ".build.lock"
TEXT_FILE = "text.json"
# The last ``innfer build`` of a model that failed, and why ({"at", "error"}; removed by the
# next build that succeeds): a server asked to load a model whose tiers were never written
# said only "run `innfer build`", which fails the same way again (review helper-225). A
# dotfile: the repository poll does not count it as a change.
BUILD_FAILED_FILE = ".build-failed.json"
# A profile measured at load (see Repository._profile_here): timed runs per (tier, batch)
# and the time cap per point - enough for the scheduler's median and p90 to start from.
LOAD_PROFILE_REPEATS = 7
LOAD_PROFILE_S = 0.5
# A model name is one directory name: letters, digits, '.', '_', '-'; at most 128 bytes
# (file systems allow 255 per component; the engine cache adds suffixes to it).
MODEL_NAME = MODEL_NAME_PATTERN.regex


def check_model_name(name: str) -> None:
    """Raise InvalidModelName unless ``name`` is one plain directory name.

    Example:
        >>> check_model_name("mnist")
        >>> check_model_name("../etc")
        Traceback (most recent call last):
        ...
        runtime.repository.errors.InvalidModelName: model name '../etc' is not valid: ...
    """
    if not MODEL_NAME.fullmatch(name) or name in (".", ".."):
        shown = repr(name) if len(name) <= 48 else repr(name[:48]) + f"... ({len(name)} chars)"
        raise InvalidModelName(
            f"model name {shown} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter, digit or '_' (one directory of the repository)"
        )


@dataclass
class ServedModel:
    """A model ready to serve: config, tier records, loaded engines, latency profile."""

    name: str
    config: ModelConfig
    tiers: dict[str, TierRecord]
    engines: dict[str, Engine]
    profile: dict[str, Any] | None
    backend: str
    tokenizer: TextTokenizer | None = None  # text models (model.yaml ``text``) only
    tier_source: str = "model.yaml"  # or "frontier": the auto-tiering choice is served

    @property
    def build_id(self) -> str:
        """Which networks are served: the first 12 hex digits of the sha256 of the tiers'
        names and ONNX hashes (and a text model's tokenizer file's). A rollback, a rebuild
        or a swap of tiers changes it; the same build served again does not (the version is
        always "1": review 157 could tell two builds apart only by their outputs).

        Example:
            >>> served.build_id  # doctest: +SKIP
            '3f9a0c1d2e4b'
        """
        pairs = sorted((t, r.onnx_sha256) for t, r in self.tiers.items())
        if self.tokenizer is not None:  # (a model without one keeps the id it had)
            pairs.append(("tokenizer", self.tokenizer.sha256))
        return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:12]

    @property
    def input_rows(self) -> dict[str, Rows]:
        """Per integer input, the rows of the embedding table it indexes (or per column of
        its last dim: ``Rows``): ids must lie in [0, rows) in every tier (the smallest table
        where tiers differ). Empty where no record says (no such input, or tiers built
        before this was kept).

        Example:
            >>> served.input_rows  # doctest: +SKIP
            {'item_ids': 50000}
        """
        rows: dict[str, Rows] = {}
        for record in self.tiers.values():
            for name, n in (record.input_rows or {}).items():
                rows[name] = merge_rows(rows[name], n) if name in rows else n
        return rows


def _stale(profile: dict[str, Any], config, backend: Backend, onnx: dict[str, str]) -> str | None:
    """Why ``profile`` is not the timing of the tiers ``onnx`` (tier -> sha256) as
    ``config`` serves them with ``backend`` here, or None: measured with another backend,
    version, device or threads, for other tiers or engines (rebuilt since), or short of
    max_batch or a sequence length."""
    why = measured_elsewhere(profile, backend, config.threads, config.spin)
    if why is None and set(timed := profile.get("tiers", {})) != set(onnx):  # tiers edited
        why = (f"profile.json times tiers {', '.join(sorted(timed)) or 'none'}, not the "
               f"tiers served: {', '.join(sorted(onnx))}")  # fmt: skip
    if why is None and (stale := stale_tiers(profile, onnx)):
        why = f"profile.json timed other engines for tiers {', '.join(stale)} (rebuilt since)"
    if why is None:  # model.yaml's max_batch raised, or its lengths changed, since
        why = uncovered(profile, config.max_batch, config.sequence_lengths)
    return why


# A profile whose batch-1 time is this far from a tier's real one, either way, is not the
# engines' (hand-edited, another machine's under the same name): the online correction
# spans 0.2-20x (server.scheduling.latency), and beyond it the model stayed READY
# refusing every request it could have served (review 156).
IMPLAUSIBLE_RATIO = 10.0
CHECK_RUNS = 3


def _implausible(profile: dict[str, Any], engines: dict[str, Engine], config) -> str | None:
    """Why ``profile`` cannot be these ``engines``' - a tier's batch-1 time now (the
    fastest of ``CHECK_RUNS``; the profile's ``tiers`` table is at the longest length) off
    its p50 by ``IMPLAUSIBLE_RATIO`` or more - or None. A few runs per tier: milliseconds."""
    from runtime.repository.profile import random_feeds

    length = config.sequence_lengths[-1] if config.sequence_lengths else 1
    feeds = random_feeds(config.inputs, 1, length=length)
    for tier, engine in engines.items():
        cell = profile["tiers"].get(tier, {}).get("1")
        if cell is None:
            continue
        took = []
        for _ in range(CHECK_RUNS):
            t0 = time.perf_counter()
            engine.run(feeds)
            took.append(time.perf_counter() - t0)
        ratio = min(took) * 1e3 / cell["p50_ms"]
        if not 1 / IMPLAUSIBLE_RATIO < ratio < IMPLAUSIBLE_RATIO:
            ran = min(took) * 1e3
            return (f"profile.json says tier {tier} takes {cell['p50_ms']:.4g} ms at batch "
                    f"1, and it ran in {ran:.3g} ms: not these engines' timing")  # fmt: skip
    return None


def _refuse_links_out(model_dir: Path, served: list[Path]) -> None:
    """RepositoryError where one of ``served`` - what a server reads of the model, folders
    walked - is a link that resolves outside ``model_dir``: a model.yaml linked to
    /etc/passwd was read, and its content shown to clients in the error (review 156).
    Links inside the folder (a Kubernetes ConfigMap's ``..data``) are fine, and so is what
    only a build reads (a data set or calibration text linked from a shared folder). The
    message names the path relative to the repository, never the target."""
    home = model_dir.resolve()
    paths = []
    for path in served:
        paths.append(path)
        if path.is_dir() and not path.is_symlink():
            for top, dirs, files in os.walk(path):  # (links to folders: not descended)
                paths += [Path(top) / n for n in (*dirs, *files)]
    for p in paths:
        if p.is_symlink() and not p.resolve().is_relative_to(home):
            shown = f"{model_dir.name}/{p.relative_to(model_dir)}"
            raise RepositoryError(
                f"{shown} is a link out of the model's folder; copy the file into the "
                "folder instead"
            )


class Repository:
    """A directory of models, one subdirectory each."""

    def __init__(self, root: str | Path, engine_spare: Path | None = None) -> None:
        """``engine_spare``: where engines are built that the repository's own cache lacks
        and cannot be written to (``EngineCache.spare``: one folder per model in it)."""
        self.root = Path(root)
        self.engine_spare = engine_spare
        # profile.json files already said to be corrupted, as (path, mtime_ns, size): one
        # warning per file state (the demo reads it twice deciding what to rebuild)
        self._said_corrupted: set[tuple[Path, int, int]] = set()

    def model_dir(self, name: str) -> Path:
        """``<root>/<name>``, for a valid name of a model that exists (ModelNotFound else).

        The name must be one plain directory name (``check_model_name``), and the directory
        must lie inside the root after resolving links: a request naming
        ``../elsewhere`` or a symlinked directory can never load files from outside.
        """
        check_model_name(name)
        d = self.root / name
        if d.is_symlink() or (d.exists() and d.resolve().parent != self.root.resolve()):
            raise InvalidModelName(
                f"model {name!r} is a link out of the repository; copy the model directory "
                "into the repository instead"
            )
        # (a broken link or a folder: config says so; None - cannot tell, an unreadable
        # folder - too: the load's PermissionError names the owner/mode fix, where "not
        # found ... (models here: mlp, ...)" contradicted itself - review helper-271)
        if something_at(d / "model.yaml") is False:
            available = self.names()
            shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
            # Relative to the repository: an error must not reveal the server's file system.
            raise ModelNotFound(
                f"model {name!r} not found: the repository has no {name}/model.yaml "
                f"(models here: {shown or 'none'})"
            )
        return d

    def skipped(self) -> list[str]:
        """Folders with a model.yaml that ``names`` leaves out: a name that is not a model
        name (``resnet 18``) or a symbolic link - said by the callers, not passed over."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if file_known(p / "model.yaml") is True
            and (not MODEL_NAME.fullmatch(p.name) or p.is_symlink())
        )

    def skip_reason(self, folder: str) -> str:
        """Why ``skipped`` leaves ``folder`` out, and what to do about it."""
        if (self.root / folder).is_symlink():
            return "it is a symbolic link: copy the model's folder into the repository instead"
        return (
            "its name is not a model name (letters, digits, '_', '.' and '-', at most 128, "
            "not starting with . or -): rename it"
        )

    def unconfigured(self) -> list[str]:
        """What callers say of the folders that hold an INN (inn.json) but no model.yaml -
        one forgotten, or misnamed (model.yml): ``names`` passes them over, and a build or
        a server skipped them without a word (review 170)."""
        if not self.root.is_dir():
            return []
        said = []
        for p in sorted(self.root.iterdir(), key=lambda p: p.name):
            if file_known(p / "inn.json") is True and something_at(p / "model.yaml") is False:
                near = [f.name for f in (p / "model.yml", p / "model.YAML") if f.is_file()]
                fix = (f"rename {near[0]} to model.yaml" if near
                       else "write one (README, 'Bring your own model')")  # fmt: skip
                said.append(f"{p.name} holds an INN but no model.yaml: {fix}")
        return said

    def names(self) -> list[str]:
        """The models: folders of a model name holding a model.yaml - or that this process
        may not look into (listed, so that loading it says why it cannot be served; one
        such folder made every listing raise, and the server refused to start at all)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if MODEL_NAME.fullmatch(p.name)
            and not p.is_symlink()
            and something_at(p / "model.yaml") is not False
        )

    def config(self, name: str) -> ModelConfig:
        d = self.model_dir(name)
        _refuse_links_out(d, [d / "model.yaml"])
        return ModelConfig.load(d / "model.yaml")

    def onnx_in_use(self, name: str) -> set[str] | None:
        """The sha256 of every ONNX model ``name``'s records name - each tier directory's
        tier.json (tiers model.yaml lists no more included: nothing is taken from a set
        someone may put back) and every frontier candidate - or None where one of them
        cannot be read (then nothing can be said unused)."""
        d = self.model_dir(name)
        used = set()
        try:
            for record in sorted((d / "tiers").glob(f"*/{TIER_FILE}")):
                used.add(TierRecord.read(record).onnx_sha256)
            frontier = d / FRONTIER_DIR / FRONTIER_FILE
            if frontier.exists():
                used.update(c.onnx_sha256 for c in Frontier.read(frontier).candidates)
        except (RepositoryError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("model %s: a record cannot be read (%s); no engine is pruned", name, exc)
            return None
        return used

    def unlisted_tiers(self, name: str) -> list[tuple[str, int]]:
        """(tier, bytes of its folder) for each built tier of ``name`` that its model.yaml
        no longer lists. Builds keep them on purpose - put back in model.yaml, a tier serves
        again without a rebuild, and its cached engines stay (``onnx_in_use``) - but nothing
        serves them meanwhile: the build says so, or they stayed unknowingly for good.
        Staging and replaced folders of interrupted writers (``leftovers``) are not tiers.

        Example:
            >>> Repository("runs/demo/repository").unlisted_tiers("mnist")  # doctest: +SKIP
            [('w010', 1337)]
        """
        listed = {t.name for t in self.config(name).tiers}
        tiers = self.model_dir(name) / "tiers"
        out = []
        for d in sorted(tiers.iterdir()) if tiers.is_dir() else ():
            if d.name in listed or STAGING.match(d.name) or d.is_symlink():
                continue
            if (d / TIER_FILE).is_file():
                out.append((d.name, sum(f.stat().st_size for f in d.rglob("*") if f.is_file())))
        return out

    def tier_dir(self, name: str, tier: str) -> Path:
        return self.root / name / "tiers" / tier

    def load_record(self, name: str, tier: str) -> TierRecord:
        path = self.tier_dir(name, tier) / TIER_FILE
        try:
            return TierRecord.read(path)
        except RepositoryError as exc:
            if path.exists() or (failed := self.last_build_failure(name)) is None:
                raise
            raise RepositoryError(f"{exc}; its last build failed - {failed}") from exc

    def last_build_failure(self, name: str) -> str | None:
        """What the last ``innfer build`` of ``name`` failed with, and when, where it failed
        and no build has succeeded since (``BUILD_FAILED_FILE``); None otherwise."""
        try:
            data = json.loads((self.model_dir(name) / BUILD_FAILED_FILE).read_text())
            return f"{data['at']}: {data['error']}"
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def _built_record(self, name: str, tier: TierConfig, config: ModelConfig) -> TierRecord:
        """``tier``'s build record, refused where model.yaml gives it another width since
        (edited, not rebuilt)."""
        record = self.load_record(name, tier.name)
        if record.width != tier.width:
            raise RepositoryError(
                f"{self.tier_dir(name, tier.name) / TIER_FILE} was built at width "
                f"{record.width!r}, but {config.source} now gives tier {tier.name} width "
                f"{tier.width}: run `innfer build`"
            )
        if (change := record.sampling_change(config)) is not None:
            raise RepositoryError(
                f"{self.tier_dir(name, tier.name) / TIER_FILE} was sampled with {change} in "
                f"{config.source}: run `innfer build`"
            )
        if config.evaluation is None and record.accuracy_on is not None:
            # (the build sets them null: no stale figure to schedule by; review 157)
            warn_once(
                f"{name}: tier {tier.name}'s accuracy was measured on an evaluation "
                f"{config.source} no longer names: ranked by FLOPs until `innfer build`"
            )
            record = dataclasses.replace(record, accuracy=None, accuracy_on=None)
        return record

    def unbuilt(self, name: str) -> list[str]:
        """The tiers of ``name``'s model.yaml a load would refuse as not built for it (no
        tier.json or model.onnx, built at another width or with other sampling, or sampled
        from another INN than the folder holds): what an interrupted or failed ``innfer
        build`` left to do. (A tier of a replaced INN was said built, and the load refused
        it: review helper-278.)

        Example:
            >>> Repository("runs/demo/repository").unbuilt("mnist")  # doctest: +SKIP
            []
        """
        config = self.config(name)
        inn_now = self._inn_fingerprint(name)
        left = []
        for tier in config.tiers:
            try:
                record = self._built_record(name, tier, config)
                self._check_inn(name, self.tier_dir(name, tier.name), record, inn_now)
                ok = (self.tier_dir(name, tier.name) / "model.onnx").is_file()
            except RepositoryError:
                ok = False
            if not ok:
                left.append(tier.name)
        return left

    def choose_backend(self, config: ModelConfig, override: str | None = None) -> Backend:
        names = [override] if override else list(config.backends)
        why = []
        for n in names:
            backend = get_backend(n)
            reason = backend.unavailable_reason()
            if reason is None:
                return backend
            why.append(f"{n}: {reason}")
        raise RepositoryError(
            f"{config.source}: none of the backends {names} is available on this machine "
            f"({'; '.join(why)}; the onnxruntime CPU backend is always installed with innfer)"
        )

    def build_options(self, config: ModelConfig, backend: Backend) -> BuildOptions:
        extra = (
            {"device": "cuda"} if backend.name == "torch" and "cpu" not in backend.device() else {}
        )
        precision = config.precision
        if precision == "fp16" and backend.name not in FP16_BACKENDS:
            # fp16 where a backend builds it; a listed fallback that builds fp32 only (the
            # ONNX Runtime CPU backend: `backends: [tensorrt, onnxruntime]` on a CPU host)
            # serves fp32 rather than not at all.
            log.warning(
                "%s: precision fp16, but %s builds fp32 engines only: building fp32",
                config.source, backend.name,
            )  # fmt: skip
            precision = "fp32"
        elif precision == "fp16" and backend.name == "torch" and not extra:
            # On a CPU torch computes fp16 slower than fp32 (2.4x on the test CNN) and less
            # exactly: the fallback a CUDA-less host of `backends: [torch, ...]` reaches
            # serves fp32, as the ONNX Runtime one does (review helper-139).
            log.warning(
                "%s: precision fp16, but torch runs on a CPU here (fp16 is slower there): "
                "building fp32",
                config.source,
            )
            precision = "fp32"
        return BuildOptions(
            precision=precision,
            max_batch=config.max_batch,
            opt_batch=min(config.max_batch, 4),
            threads=config.threads,
            spin=config.spin,
            instances=config.instances,
            extra=extra,
            # TensorRT's optimisation profile needs the length range; the other backends run
            # any length, and their cache keys stay free of it (a new `lengths` rebuilds
            # nothing there).
            sequence=config.sequence_profile if backend.shape_profiled else None,
        )

    def load(
        self,
        name: str,
        backend: str | None = None,
        on_build: Callable[[str, str], None] | None = None,
        check_timing: bool = False,
        pool_nice: int = 0,
    ) -> ServedModel:
        """Load every tier's engine (building missing or bad cache entries from ONNX).
        ``check_timing``: run each tier a few times to check that profile.json is these
        engines' (``_implausible``), as a server that times at load does. ``pool_nice``:
        the nice levels the engines' own threads start below this one
        (``BuildOptions.pool_nice``)."""
        try:
            config = self.config(name)
        except ConfigError as exc:
            raise RepositoryError(str(exc)) from exc
        d = self.model_dir(name)
        sweep(self.root / name)  # what interrupted builds and saves left, an hour on
        # (after the sweep, which puts folders back: what is served is checked as it is)
        served = [d / n for n in ("tiers", PROFILE_FILE, FRONTIER_DIR, ACTIVE_FILE, "engines")]
        if config.text is not None:
            served += [d / TEXT_FILE, d / config.text.tokenizer]
        _refuse_links_out(d, served)
        chosen = self.choose_backend(config, backend)
        options = replace(self.build_options(config, chosen), pool_nice=pool_nice)
        spare = self.engine_spare / name if self.engine_spare is not None else None
        cache = EngineCache(self.root / name / "engines", spare)
        cache.sweep()
        if spare is not None:  # (an emptyDir outlives a container killed mid-build)
            EngineCache(spare).sweep()
        auto = self.auto_tiers(name, config)
        profile = self.read_profile(name)
        records = None  # the frontier's, for a chosen set; else each tier's tier.json
        hand = config  # model.yaml's tiers
        if auto is not None:
            config, records, profile = auto
        tiers, engines = {}, {}
        try:
            try:
                self._load_tiers(
                    name, config, records, chosen, options, cache, on_build, tiers, engines
                )
            except RepositoryError as exc:
                if auto is None:
                    raise
                # The chosen set's files: a build replaced frontier/ while they were read,
                # or a candidate's ONNX is damaged. model.yaml's tiers are intact: served,
                # where the model failed whole - at a start, until someone reloaded it
                # (review 168).
                log.warning(
                    "%s: the tiers auto-tiering chose cannot be loaded (%s); serving the "
                    "tiers of model.yaml until it chooses again", name, exc,
                )  # fmt: skip
                for engine in engines.values():
                    engine.close()
                tiers.clear()
                engines.clear()
                auto, config, records, profile = None, hand, None, self.read_profile(name)
                self._load_tiers(
                    name, config, records, chosen, options, cache, on_build, tiers, engines
                )
            onnx = {t: r.onnx_sha256 for t, r in tiers.items()}
            profile = self._profile_here(name, config, chosen, engines, profile, onnx, check_timing)
            tokenizer = self.load_tokenizer(name, config)
        except BaseException:  # what opened stays open otherwise (a GPU engine: its memory)
            for engine in engines.values():
                engine.close()
            raise
        source = "frontier" if auto is not None else "model.yaml"
        return ServedModel(name, config, tiers, engines, profile, chosen.name, tokenizer, source)

    def _load_tiers(
        self, name, config, records, chosen, options, cache, on_build, tiers: dict, engines: dict
    ) -> None:
        """Each tier's record (``records``: a chosen set's, from the frontier; None: its
        tier.json, checked against model.yaml and the INN) and its engine, into ``tiers`` and
        ``engines`` (so that the caller can close what opened on an error)."""
        inn_now = self._inn_fingerprint(name) if records is None else None  # read once
        for tier in config.tiers:
            if records is not None:
                d = self.model_dir(name) / FRONTIER_DIR / tier.name
                tiers[tier.name] = records[tier.name]
                record = d.parent / FRONTIER_FILE  # a candidate has no tier.json of its own
            else:
                d = self.tier_dir(name, tier.name)
                record = d / TIER_FILE
                tiers[tier.name] = self._built_record(name, tier, config)
                self._check_inn(name, d, tiers[tier.name], inn_now)
                if inn_now is None:  # a serving image with tiers only: one build's tiers
                    self._same_inn(name, tiers)
            onnx_path = d / "model.onnx"
            if not onnx_path.is_file():
                raise RepositoryError(f"{onnx_path} is missing: run `innfer build`")
            sha = sha256_file(onnx_path)
            if sha != tiers[tier.name].onnx_sha256 and records is None:
                # A build swapped the tier in whole between the record's read and the hash
                # (``atomic.replace_directory``): the record again, and the file if it moved.
                # Marked broken for a mismatch that was not there, it waited for a restart.
                again = self._built_record(name, tier, config)
                if again.onnx_sha256 != tiers[tier.name].onnx_sha256:
                    tiers[tier.name] = again
                    self._check_inn(name, d, again, inn_now)
                    if sha != again.onnx_sha256:
                        sha = sha256_file(onnx_path)
            if sha != tiers[tier.name].onnx_sha256:
                raise RepositoryError(f"{onnx_path} does not match {record}: run `innfer build`")
            callback = (lambda key, t=tier.name: on_build(t, key)) if on_build else None
            # the engine of the ONNX just checked (hashed once: a build writing the tier
            # between two hashes had its engine served under this record)
            engines[tier.name], _ = cache.get(chosen, onnx_path, options, callback, sha)
            _check_io(config, tier.name, engines[tier.name], d)
        unknown = [t for t, r in tiers.items() if r.inn_sha256 is None]
        if records is None and inn_now is not None and unknown:
            # Built by an innfer that did not record it: _check_inn cannot tell a tier of a
            # replaced INN from a current one (an upgrade served such a tier silently).
            warn_once(
                f"{name}: tiers {', '.join(unknown)} do not record the INN they were sampled "
                "from (built by an older innfer): one sampled from an INN replaced, retrained "
                "or recalibrated since cannot be told apart; run `innfer build` once to "
                "record it"
            )

    def auto_tiers(
        self, name: str, config: ModelConfig
    ) -> tuple[ModelConfig, dict[str, TierRecord], dict[str, Any]] | None:
        """The tier set auto-tiering chose (``auto_tiers.json``) as (config with those
        tiers, their records, their profile); None where model.yaml has no ``auto_tiers``,
        nothing was chosen yet, the choice refers to a frontier measured before the last
        build (unless every network it names is there byte-identical:
        ``ActiveTiers.carries_over``), or it breaks the goals model.yaml says now (tightened
        since the choice; then the hand-written tiers are served, with a warning)."""
        if config.auto_tiers is None:
            return None
        d = self.model_dir(name)
        try:
            active = ActiveTiers.read(d / ACTIVE_FILE)
        except RepositoryError as exc:  # as a corrupted frontier: no choice to serve (it
            # failed the whole model, and a read-only volume left no way to delete it)
            log.warning("%s: %s; serving the tiers of model.yaml", name, exc)
            return None
        if active is None:
            return None
        try:
            frontier = Frontier.read(d / FRONTIER_DIR / FRONTIER_FILE)
        except RepositoryError as exc:
            log.warning("%s: %s; serving the tiers of model.yaml", name, exc)
            return None
        if stale := frontier.stale_settings(config):  # model.yaml edited since the build
            log.warning(
                "%s: the frontier was built for other %s than model.yaml says now; serving the "
                "tiers of model.yaml until `innfer build` measures it again",
                name, ", ".join(stale),
            )  # fmt: skip
            return None
        self.check_frontier_inn(name, frontier)
        if active.frontier_sha256 != frontier.source_sha256 and active.carries_over(frontier):
            log.info("%s/%s was chosen on an older frontier; %s measured again byte-identical: "
                     "served", name, ACTIVE_FILE, ", ".join(active.tiers))  # fmt: skip
        elif active.frontier_sha256 != frontier.source_sha256:
            log.warning(
                "%s/%s was chosen on an older frontier; serving the tiers of model.yaml until "
                "auto-tiering chooses again", name, ACTIVE_FILE,
            )  # fmt: skip
            return None
        records = {}
        for tier in active.tiers:
            try:
                c = frontier.candidate(tier)
            except KeyError as exc:  # model.yaml's tiers are intact: served, not the model
                # failed whole on every replica sharing the volume (review 168)
                log.warning("%s/%s: %s; serving the tiers of model.yaml until auto-tiering "
                            "chooses again", name, ACTIVE_FILE, exc.args[0])  # fmt: skip
                return None
            records[tier] = TierRecord(
                name=c.name, width=c.width, sizes=c.sizes,
                onnx_sha256=c.onnx_sha256, source_sha256=frontier.source_sha256,
                flops=c.flops, params=c.params, accuracy=c.accuracy, input_rows=c.input_rows,
            )  # fmt: skip
        # Goals are hard limits: a choice the goals now forbid (edited since it was made) is
        # not served until auto-tiering chooses again.
        if breaks := frontier.set_breaks(active.tiers, config.auto_tiers):
            log.warning(
                "%s/%s (%s) breaks the goals model.yaml's auto_tiers sets now: %s; serving the "
                "tiers of model.yaml until auto-tiering chooses again",
                name, ACTIVE_FILE, ", ".join(active.tiers), "; ".join(breaks),
            )  # fmt: skip
            return None
        tiers = tuple(TierConfig(name=t, width=records[t].sizes) for t in active.tiers)
        served = dataclasses.replace(config, tiers=tiers)
        return served, records, frontier.profile(list(active.tiers))

    def unmet_goals(self, name: str, config: ModelConfig) -> str | None:
        """Why ``config``'s auto_tiers goals cannot be met by the model's frontier, or None
        (met, no auto_tiers, or no usable frontier yet: ``auto_tiers`` and the build say
        why). ``Frontier.unmet_goals``."""
        path = self.model_dir(name) / FRONTIER_DIR / FRONTIER_FILE
        if config.auto_tiers is None or not path.is_file():
            return None
        try:
            frontier = Frontier.read(path)
        except RepositoryError:
            return None
        if frontier.stale_settings(config):
            return None
        return frontier.unmet_goals(config.auto_tiers)

    def check_frontier_inn(
        self, name: str, frontier: Frontier, config: ModelConfig | None = None
    ) -> None:
        """Refuse ``frontier`` where it was measured on another INN than the model directory
        holds now (replaced, retrained or recalibrated after the build): a set chosen from it
        would serve the old model under the new one's name. Not checked where either
        fingerprint is unknown (a frontier from before they were kept, a serving image
        without the INN). Nor is one built for other candidate settings of model.yaml
        (``config``; default: read now) (``Frontier.stale_settings``) served or chosen
        from."""
        d = self.model_dir(name)
        stale = frontier.stale_settings(config or self.config(name))
        if stale:
            raise RepositoryError(
                f"{d / FRONTIER_DIR / FRONTIER_FILE} was built for other {', '.join(stale)} "
                "than model.yaml says now: run `innfer build` to measure its candidates again"
            )
        current = self._inn_fingerprint(name)
        if current is not None and None in (frontier.inn_sha256, frontier.settings):
            warn_once(
                f"{d / FRONTIER_DIR / FRONTIER_FILE} does not record the INN and model.yaml "
                "settings it was measured for (built by an older innfer): a replaced INN or "
                "edited auto_tiers widths cannot be told apart; run `innfer build` once to "
                "record them"
            )
        if current is not None and not _same_inn_as(current, frontier):
            raise RepositoryError(
                f"{d / FRONTIER_DIR / FRONTIER_FILE} was measured on another INN than {d} "
                "holds now (replaced, retrained, recalibrated or converted again after the "
                "build): run `innfer build`"
            )

    def frontier_problem(self, name: str, config: ModelConfig) -> str | None:
        """Why auto-tiering cannot choose from ``name``'s frontier for ``config`` (this
        load's model.yaml), with the fix, or None (usable, or no ``auto_tiers``): missing,
        corrupted, built for other candidate settings or on another INN - what a server
        says at load rather than at every check once traffic came.

        Example:
            >>> Repository("models").frontier_problem("mnist", config)  # doctest: +SKIP
            '.../frontier/frontier.json is missing: run `innfer build` (...)'
        """
        if config.auto_tiers is None:
            return None
        try:
            frontier = Frontier.read(self.model_dir(name) / FRONTIER_DIR / FRONTIER_FILE)
            self.check_frontier_inn(name, frontier, config)
        except RepositoryError as exc:
            return str(exc)
        return None

    def served_tiers(self, name: str) -> tuple[dict[str, TierRecord], dict[str, Any], str]:
        """What a server would serve for ``name`` now, read without loading an engine:
        (build records, profile, source). Source "frontier": auto-tiering's choice
        (``auto_tiers``), its records and profile from the frontier; else "model.yaml": its
        tiers, with their tier.json and profile.json. For tools that plan offline (``innfer
        simulate``, ``innfer bench``): model.yaml's tiers are not what a model with a
        chosen set is served on.

        Example:
            >>> records, profile, source = Repository("models").served_tiers("mnist")
            ... # doctest: +SKIP
        """
        try:
            config = self.config(name)
        except ConfigError as exc:
            raise RepositoryError(str(exc)) from exc
        auto = self.auto_tiers(name, config)
        if auto is not None:
            _, records, profile = auto
            return records, profile, "frontier"
        profile = self.read_profile(name)
        path = self.root / name / PROFILE_FILE
        if profile is None or not isinstance(profile.get("tiers"), dict):
            raise RepositoryError(f"{path} is missing or corrupted: run `innfer build`")
        # model.yaml's tiers as built, as ``load`` checks them: a tier removed, added or
        # given another width since the build was planned as it had been built, silently.
        records = {t.name: self._built_record(name, t, config) for t in config.tiers}
        # ... and sampled from the INN the directory holds now, as ``load`` checks: planned
        # with the tiers of an INN calibrated since, they were tiers a server refuses
        # (review 176)
        inn_now = self._inn_fingerprint(name)
        for tier, record in records.items():
            self._check_inn(name, self.tier_dir(name, tier), record, inn_now)
            # (presence only, as cheap as the rest: load hashes it)
            if not (onnx_path := self.tier_dir(name, tier) / "model.onnx").is_file():
                raise RepositoryError(f"{onnx_path} is missing: run `innfer build`")
        names = list(records)
        unmeasured = [n for n in names if n not in profile["tiers"]]
        if unmeasured:
            raise RepositoryError(
                f"{path} has no latency for tier {unmeasured[0]} of {config.source}: run "
                "`innfer build`"
            )
        profile = _only_tiers(profile, names)
        if short := uncovered(profile, config.max_batch, config.sequence_lengths):
            # (a server re-measures it at load; planned as it was, simulate and bench ended
            # in "batch 8 exceeds the profiled batch sizes [1]", naming no file: review
            # helper-228)
            raise RepositoryError(
                f"{path}: {short}, so no batch of the sizes model.yaml serves can be planned: "
                f"run `innfer build {self.root} --model {name}` (innfer serve re-measures "
                "such a profile at load)"
            )
        onnx = {n: r.onnx_sha256 for n, r in records.items()}
        with contextlib.suppress(RepositoryError):  # no backend here: nothing to compare
            if why := _stale(profile, config, self.choose_backend(config), onnx):
                # A server re-measures such a profile at load; these tools plan with it as
                # it is - said, not silent (review 157).
                warn_once(
                    f"{name}: {why}; planned with it as it is (a server measures it again "
                    "at load; `innfer build` on this machine stores a new one)"
                )
        return records, profile, "model.yaml"

    def _inn_fingerprint(self, name: str) -> InnPrint | None:
        """The fingerprints of the model directory's INN now; None without one (a serving
        image with tiers only)."""
        d = self.model_dir(name)
        inn_json = d / "inn.json"
        # Read at every load: linked out, an outside file's existence and format were told
        # to clients in the error (review 199)
        _refuse_links_out(d, [inn_json])
        if not inn_json.is_file():
            return None
        try:
            return InnPrint.of(json.loads(inn_json.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise RepositoryError(
                f"{inn_json} is unreadable ({type(exc).__name__}: {exc}); restore it, or "
                "save the INN again (IntegralModel.save) and run `innfer build`"
            ) from None

    def _check_inn(
        self, name: str, tier_dir: Path, record: TierRecord, current: InnPrint | None
    ) -> None:
        """Refuse a tier sampled from another INN than the model directory holds now
        (``current``; it was replaced, retrained, recalibrated or converted again after the
        build): serving it would answer with the old model under the new one's name. A
        repository without the INN, or what a record from before it was kept lacks, is not
        checked."""
        if current is None or _same_inn_as(current, record):
            return
        if record.inn_sha256 not in (None, current.weights):
            raise RepositoryError(
                f"{tier_dir / TIER_FILE} was sampled from another INN than "
                f"{self.model_dir(name)} holds now (its weights, grids or norm statistics "
                "changed: replaced, retrained or recalibrated after the build): run "
                "`innfer build`"
            )
        raise RepositoryError(
            f"{tier_dir / TIER_FILE} was sampled from another network than "
            f"{self.model_dir(name)} holds now (the same weights, but its architecture, groups "
            "or sizes changed: converted again after the build): run `innfer build`"
        )

    def _same_inn(self, name: str, tiers: dict[str, TierRecord]) -> None:
        """Refuse tiers (those read so far) sampled from different INNs. Without the INN
        in the model directory, the tiers still must agree among themselves: one
        copied into the image mid-build (or a build interrupted after some tiers) would
        serve two models under one name, each tier answering like a different network."""
        for field in ("inn_sha256", "inn_structure_sha256"):
            seen = {t: getattr(r, field) for t, r in tiers.items() if getattr(r, field)}
            if len(set(seen.values())) > 1:
                first, last = next(iter(seen)), list(seen)[-1]
                raise RepositoryError(
                    f"tiers {first} and {last} of {self.model_dir(name)} were sampled from "
                    "different INNs (a build interrupted or copied part-way): run `innfer "
                    "build` to completion and copy every tier of that build"
                )

    def record_tokenizer(self, name: str, config: ModelConfig) -> None:
        """At build time: write ``text.json`` with the tokenizer file's sha256 (checked at
        every load, so a tokenizer edited after the build is refused, not half-used)."""
        if config.text is None:
            return
        path = self.model_dir(name) / config.text.tokenizer
        if not path.is_file():
            raise RepositoryError(
                f"{config.source}: text.tokenizer {config.text.tokenizer!r} is not in the model "
                "directory; copy the model's tokenizer.json there"
            )
        record = {"tokenizer": config.text.tokenizer, "sha256": sha256_file(path)}
        write_json(self.model_dir(name) / TEXT_FILE, record)

    def load_tokenizer(self, name: str, config: ModelConfig) -> TextTokenizer | None:
        if config.text is None:
            return None
        d = self.model_dir(name)
        path = d / config.text.tokenizer
        try:
            record = json.loads((d / TEXT_FILE).read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, RecursionError):  # bad JSON, not UTF-8, nested too deep
            raise RepositoryError(
                f"{name}/{TEXT_FILE} is missing or corrupted: run `innfer build`"
            ) from None
        digest = sha256_file(path) if path.is_file() else None
        if digest is None or digest != record.get("sha256"):
            raise RepositoryError(
                f"{name}/{config.text.tokenizer} is missing or differs from the one the model "
                "was built with: restore it or rebuild with `innfer build`"
            )
        try:
            return TextTokenizer(path, config.text.max_length, sha256=digest)
        except TokenizerError as exc:
            raise RepositoryError(str(exc)) from None

    def _profile_here(
        self, name, config, backend, engines, profile, onnx: dict[str, str], check: bool = False
    ) -> dict[str, Any] | None:
        """``profile``, or, where there is none (missing or corrupted: read as None), it
        misses a tier, a batch size up to max_batch or a sequence length, was measured with
        another backend (or version) or on another device, or (CPU) with other threads than
        model.yaml's, or timed other engines than the tiers' ONNX (``onnx``: tier -> sha256)
        make now, a new one measured now on ``engines`` (a few runs per point: seconds on a
        CPU, less on a GPU). Not written back: the repository may be read-only, and ``innfer
        build`` on this machine is how a profile is stored."""
        if profile is None:  # the serving image has no torch to run `innfer build` with
            missing = not (self.model_dir(name) / PROFILE_FILE).is_file()
            why = "profile.json is missing" if missing else "profile.json is corrupted (above)"
        else:
            why = _stale(profile, config, backend, onnx)
        if why is None and check:
            why = _implausible(profile, engines, config)
        if why is None:
            return profile
        t0 = time.perf_counter()
        fresh = profile_tiers(
            engines, config, backend, repeats=LOAD_PROFILE_REPEATS, max_seconds=LOAD_PROFILE_S,
            onnx=onnx,
        )  # fmt: skip
        # (why: "profile.json was measured with torch on NVIDIA H200", "... is missing", ...;
        # the served engines follow it, not appended to it: "profile.json is missing or
        # corrupted, not with onnxruntime ..." read as if the backend were the fault.)
        # The build's advice only where there is an INN to build from: a folder of ONNX
        # tiers alone was told to run a build that refuses it (review helper-219).
        store = (
            f"`innfer build {self.root} --model {name} --backend {backend.name}` on this "
            "machine stores a profile"
            if (self.root / name / "inn.json").is_file()
            else "no inn.json here for `innfer build` to profile from: re-measured at every load"
        )
        log.warning(
            "model %s: %s; re-measured every tier at load in %.1f s with %s %s on %s "
            "(%d threads), as served now (%s)",
            name, why, time.perf_counter() - t0, backend.name, backend.version(),
            backend.device(), config.threads, store,
        )  # fmt: skip
        return fresh

    def read_profile(self, name: str) -> dict[str, Any] | None:
        path = self.root / name / PROFILE_FILE
        if not path.is_file():
            return None
        try:
            profile = json.loads(path.read_text())
        except (ValueError, RecursionError) as exc:  # bad JSON, not UTF-8, nested too deep
            profile, problem = None, f"not JSON: {exc}"
        else:
            problem = "not a JSON object" if not isinstance(profile, dict) else None
        problem = problem or profile_problem(profile)
        if problem is not None:  # read as absent: a build profiles again, a load re-measures
            said = _file_state(path)
            if said not in self._said_corrupted:
                self._said_corrupted.add(said)
                log.warning("%s is corrupted (%s); run `innfer build` to profile the model "
                            "again", path, problem)  # fmt: skip
            return None
        return profile


def _file_state(path: Path) -> tuple[Path, int, int]:
    """``path`` with its modification time and size: another state once it is rewritten."""
    try:
        st = path.stat()
    except OSError:
        return path, -1, -1
    return path, st.st_mtime_ns, st.st_size


def _dtype_mismatch(tier_dir: Path, tier: str, what: str, t, dtype: str) -> str:
    """What a tier's engine taking or giving ``t`` as ``dtype`` against model.yaml says:
    set that dtype in model.yaml - only where model.yaml takes it (``DTYPES``); float64 or
    int8 were advised, and the config then refused them (review helper-254)."""
    verb = "takes" if what == "inputs" else "gives"
    said = (f"{tier_dir}: tier {tier}'s engine {verb} {t.name} as {dtype}, but model.yaml "
            f"says {t.dtype}")  # fmt: skip
    if dtype not in DTYPES:
        cast = "end it with a Cast" if what == "outputs" else "begin it with a Cast"
        return (f"{said}, and innfer does not serve {dtype} tensors ({', '.join(DTYPES)}): "
                f"change the model ({cast} to {t.dtype}) and run `innfer build`")  # fmt: skip
    other = "take" if what == "inputs" else "give"
    return (f"{said}: set its dtype to {dtype} in model.yaml, or change the model to {other} "
            f"{t.dtype} and run `innfer build`")  # fmt: skip


def _check_io(config: ModelConfig, tier: str, engine, tier_dir: Path) -> None:
    """Refuse an engine whose inputs or outputs are not model.yaml's (names, dtypes, and
    each per-sample dim both give): model.yaml edited after the build loaded, passed its warm-up
    and then failed every request (an output renamed: a KeyError, INTERNAL). An input the
    engine takes that model.yaml does not list is refused too (no request could feed it: the
    warm-up failed as "its files could not be read ... rebuild it"; review 188); an output it
    does not list is never answered."""
    for what, want, got in (
        ("inputs", config.inputs, engine.inputs),
        ("outputs", config.outputs, engine.outputs),
    ):
        have = {s.name: s for s in got}
        for t in want:
            spec = have.get(t.name)
            dims = None if spec is None else tuple(spec.shape[1:])
            fits = (
                dims is not None
                and len(dims) == len(t.shape)
                and all(a == b or a < 0 or b < 0 for a, b in zip(dims, t.shape, strict=True))
            )
            if not fits:
                found = ", ".join(f"{s.name} {list(s.shape[1:])}" for s in got)
                raise RepositoryError(
                    f"{tier_dir}: tier {tier}'s engine has {what} {found}, but model.yaml gives "
                    f"{t.name} {list(t.shape)} (edited after the build?): run `innfer build`"
                )
            if spec.dtype != t.dtype:
                # Inputs: requests are checked against model.yaml's dtype and fed as they
                # are, so every one would fail - the load's warm-up said so in ONNX Runtime's
                # words, as "its files could not be read ... rebuild it" (review
                # helper-183). Outputs: answers are cast to model.yaml's dtype, and float
                # scores declared int32 were truncated silently.
                raise RepositoryError(_dtype_mismatch(tier_dir, tier, what, t, spec.dtype))
    # After the listed ones (an input renamed in model.yaml is said as that, above).
    listed = {t.name for t in config.inputs}
    if extra := [s for s in engine.inputs if s.name not in listed]:
        s = extra[0]
        raise RepositoryError(
            f"{tier_dir}: tier {tier}'s engine takes input {s.name} {list(s.shape[1:])} "
            f"({s.dtype}), which model.yaml does not list: add it to model.yaml's inputs, or "
            "change the model not to take it and run `innfer build`"
        )


def _only_tiers(profile: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``profile`` with only the tables of tiers ``names`` (those of tiers model.yaml no
    longer lists dropped), per sequence length too."""
    out = {**profile, "tiers": {n: profile["tiers"][n] for n in names}}
    if isinstance(profile.get("lengths"), dict):
        out["lengths"] = {
            length: {n: t[n] for n in names if n in t} for length, t in profile["lengths"].items()
        }
    return out


def _same_inn_as(current: InnPrint, record) -> bool:
    """Whether a tier's or a frontier's ``record`` was sampled from the INN ``current``
    prints: each fingerprint it recorded matches (one it does not record - built before it
    was kept - cannot be compared)."""
    return record.inn_sha256 in (None, current.weights) and record.inn_structure_sha256 in (
        None,
        current.structure,
    )
