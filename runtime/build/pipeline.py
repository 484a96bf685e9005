"""``innfer build``: INN + model.yaml -> sampled tiers, ONNX, cached engines, latency profile.

Per tier: sample the INN (skipped when tier.json says the same INN and width produced the
ONNX already), export ONNX, build or reuse the engine, validate it against the torch sample
on random inputs, measure accuracy when an evaluation set is configured, then profile every
tier at every batch size and write profile.json; for a model with ``auto_tiers``, then
measure its frontier of candidate widths (runtime/build/frontier.py). With
``channel_search`` in model.yaml, a fractional tier's channel counts are the ones
``runtime.build.channels`` measured best, and tier.json records that search (a rebuild
reads the choice back instead of searching again).

Example:
    >>> report = build_model(Repository("models"), "mnist")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from runtime import utc
from runtime.atomic import replace_directory, write_json
from runtime.build.channels import chosen_sizes, search_channels, search_context
from runtime.build.export import INTEGER_DTYPES, embedding_rows, write_tier_files
from runtime.build.lock import one_build
from runtime.build.sampling import (
    dataset_digest,
    dataset_ref,
    norm_inputs,
    norm_source,
    sample_tier,
    unnormed,
)
from runtime.engines import Backend, BuildOptions, EngineError
from runtime.engines.torch import module_files_problem
from runtime.inn.model import IntegralModel, load
from runtime.inn.report import count_flops
from runtime.repository import (
    PROFILE_FILE,
    TIER_FILE,
    EngineCache,
    Repository,
    TierRecord,
    check_model_name,
    sha256_file,
)
from runtime.repository.config import ModelConfig, TierConfig
from runtime.repository.leftovers import sweep
from runtime.repository.profile import (
    measured_elsewhere,
    profile_tiers,
    random_feeds,
    slower_tiers,
    stale_tiers,
)
from runtime.repository.records import InnPrint, sampling_of
from runtime.repository.store import BUILD_FAILED_FILE

TOLERANCE = {"fp32": (1e-3, 1e-4), "fp16": (2e-2, 2e-2)}  # (rtol, atol) per precision
log = logging.getLogger("innfer.build")


class BuildError(RuntimeError):
    """A tier could not be built or failed validation."""


class EngineRunFailed(BuildError):
    """Validation could not run the engine at all (its error, not its outputs): the engine
    is not shown wrong, so a cached one stays."""


class OutputsDiffer(BuildError):
    """Validation ran the engine and its outputs are not the sampled network's (shape or
    values): the tier's ONNX is not this INN's sample - a kept one is exported again."""


@dataclass
class TierReport:
    name: str
    exported: bool
    engine_built: bool
    max_abs_err: float
    accuracy: float | None
    seconds: float


@dataclass
class BuildReport:
    model: str
    backend: str
    tiers: list[TierReport] = field(default_factory=list)
    profile_path: Path | None = None
    warnings: list[str] = field(default_factory=list)  # what the user should act on
    frontier: Any = None  # runtime.repository.Frontier, for a model with auto_tiers
    # Engines removed as built from an ONNX no tier or candidate records any more (names,
    # bytes): ``EngineCache.prune``.
    pruned: tuple[list[str], int] = ([], 0)

    def warn(self, text: str, progress: bool) -> None:
        """Keep ``text`` for the user and log it (``_warn``)."""
        self.warnings.append(text)
        _warn(text, progress)


def build_model(
    repo: Repository,
    name: str,
    backend: str | None = None,
    progress: bool = True,
    profile: bool = True,
    repeats: int = 20,
    prune: bool = True,
) -> BuildReport:
    """Build ``name``'s tiers (export, engine, validation, accuracy), profile them, build
    its frontier where it has auto_tiers, and (``prune``) remove the cached engines of ONNX
    files no record names any more: each rebuild with new weights left a whole engine per
    tier behind.

    Example:
        >>> report = build_model(Repository("runs/demo/repository"), "mnist")  # doctest: +SKIP
        >>> [t.name for t in report.tiers], len(report.pruned[0])  # doctest: +SKIP
        (['w100', 'w075', 'w050', 'w025'], 4)

    One build of a model at a time (``runtime.build.lock``): another waits for this one.
    """
    failed = repo.model_dir(name) / BUILD_FAILED_FILE
    with one_build(repo.model_dir(name)):
        try:
            report = _build_model(repo, name, backend, progress, profile, repeats, prune)
        except (ValueError, OSError, RuntimeError) as exc:
            with contextlib.suppress(OSError):  # (a read-only folder: the error is said anyway)
                write_json(failed, {"at": utc.stamp(), "error": str(exc)})
            raise
        failed.unlink(missing_ok=True)
        return report


def _build_model(
    repo: Repository,
    name: str,
    backend: str | None,
    progress: bool,
    profile: bool,
    repeats: int,
    prune: bool,
) -> BuildReport:
    b = _start(repo, name, backend, progress)
    config, report = b.config, b.report
    engines: dict = {}  # tier -> engine, each closed at the end, whatever happens in between
    onnx: dict[str, str] = {}  # tier -> its ONNX's sha256
    counts: dict[str, dict] = {}  # tier -> its channel counts (two alike: said)
    records: dict[str, TierRecord] = {}  # tier -> what its build recorded
    try:
        bar = tqdm(config.tiers, desc=f"build {name}", disable=not progress, unit="tier")
        for tier in bar:
            record = records[tier.name] = _build_tier(b, tier, bar, engines)
            onnx[tier.name] = record.onnx_sha256
            _say_same_counts(b, tier, record, counts)
            _say_unshrunk(b, tier, record)
        _say_unchecked_ids(b, record.input_rows or {})
        repo.record_tokenizer(name, config)
        if profile:
            report.profile_path = _profile(b, engines, repeats, onnx, records)
        else:
            _say_stale_profile(b, onnx)
    finally:  # a TensorRT or CUDA engine holds device memory until closed
        _close_all(engines.values())
    if config.auto_tiers_empty:
        report.warn(config.auto_tiers_empty_note, progress)
    _say_below_floor(b)
    if config.auto_tiers is not None:  # (its own engines, after the tiers' are closed)
        from runtime.build.frontier import build_frontier  # it reuses this module's helpers

        report.frontier = build_frontier(repo, name, progress, repeats, backend)
        if (unmet := report.frontier.unmet_goals(config.auto_tiers)) is not None:
            report.warn(
                f"auto_tiers cannot be met: {unmet}. innfer serve will serve the tiers of "
                "model.yaml, with auto-tiering off for this model",
                progress,
            )
    if prune and (keep := repo.onnx_in_use(name)) is not None:
        report.pruned = b.cache.prune(keep, b.chosen, b.options)
    return report


@dataclass
class _Build:
    """What every tier of one ``build_model`` run shares."""

    repo: Repository
    name: str
    config: ModelConfig
    model_dir: Path
    inn: IntegralModel
    chosen: Backend
    options: BuildOptions
    cache: EngineCache
    report: BuildReport
    progress: bool
    score: Any  # engine -> accuracy, or None without an evaluation set
    measured_on: Any  # what that accuracy is measured on (tier.json's accuracy_on)
    inn_print: InnPrint  # the INN's fingerprints (read once per build, not per tier)
    norm_x: Any  # BatchNorm statistics' inputs for tiers the INN stores none for
    vocab_size: int | None  # a text model's token ids


def _start(repo: Repository, name: str, backend: str | None, progress: bool) -> _Build:
    """Checks before any work, and what the tiers share."""
    config = repo.config(name)
    model_dir = repo.model_dir(name)
    if not os.access(model_dir, os.W_OK):  # (a read-only volume: even root may not write)
        # Said before the work: a whole build ran, then failed on profile.json (review 157).
        raise BuildError(
            f"{model_dir} is not writable (a read-only volume?): build on a writable copy of "
            "the repository, then ship it"
        )
    sweep(model_dir)  # what interrupted builds and saves left
    _check_dataset(config, model_dir)
    inn = load(model_dir)
    _check_captured_size(inn, config)
    chosen = repo.choose_backend(config, backend)
    return _Build(
        repo, name, config, model_dir, inn, chosen,
        options=repo.build_options(config, chosen),
        cache=EngineCache(model_dir / "engines"),
        report=BuildReport(name, chosen.name),
        progress=progress,
        score=accuracy_scorer(inn, config, model_dir),
        measured_on=evaluation_key(config, model_dir),
        inn_print=_inn_print(model_dir),
        norm_x=norm_inputs(config),
        vocab_size=_tokenizer_vocab(config, model_dir),
    )  # fmt: skip


def _check_captured_size(inn: IntegralModel, config: ModelConfig) -> None:
    """BuildError where model.yaml serves an image at another size than the one torch.export
    captured the model at: export fixes an image's spatial size (only its batch is dynamic,
    runtime.inn.capture), so code that reads it - a branch, a pooling size - was decided at
    the example's size, and the tiers ran at another one gave wrong outputs without a word
    (review 170: 0.19 off on outputs of ~0.2)."""
    captured = inn.info.get("input_shape")
    if inn.info.get("frontend") != "export" or captured is None or len(config.inputs) != 1:
        return
    served = list(config.inputs[0].shape)
    # The dims export kept static (capture._dynamic_shapes): every one of an image's (rank
    # 3 and more per row), else the last (a 1-D signal's length, a sequence's features) and
    # any of size 1; the others are dynamic and may differ (review 179: [3, L] was missed).
    static = range(len(captured)) if len(captured) >= 3 else [
        d for d in range(len(captured)) if d == len(captured) - 1 or captured[d] == 1
    ]  # fmt: skip
    if len(served) != len(captured) or any(served[d] != captured[d] for d in static):
        raise BuildError(
            f"model.yaml's input {config.inputs[0].name!r} is {served} per row, but the model "
            f"was captured (torch.export: its graph has data-dependent code fx cannot trace) "
            f"at {list(captured)}, a size export fixes: convert it again with an example of "
            f"the size it serves (e.g. torch.randn(2, {', '.join(map(str, served))})), or set "
            f"inputs[0].shape: {list(captured)}"
        )


def _build_tier(b: _Build, tier: TierConfig, bar, engines: dict) -> TierRecord:
    """One tier: sample and export (or keep), build or reuse its engine and validate it,
    check its token ids, measure its accuracy where stale; its engine goes into
    ``engines`` as soon as it is open (the caller closes them all)."""
    repo, name, config = b.repo, b.name, b.config
    t0 = time.perf_counter()
    onnx_path = repo.tier_dir(name, tier.name) / "model.onnx"
    for reuse in (True, False):
        bar.set_postfix_str(f"{tier.name}: sample+export")
        record, module, exported = _export_tier(
            repo, name, b.inn, config, tier, b.chosen, b.options, b.progress, b.score,
            b.inn_print, b.norm_x, reuse=reuse,
        )  # fmt: skip
        bar.set_postfix_str(f"{tier.name}: engine ({b.chosen.name})")
        if module is None:  # the exported network, as _export_tier samples it
            module, _ = sample_tier(b.inn, config, _sampled_width(tier, record), b.norm_x)
        try:
            engine, built, err = validated_engine(
                b.cache, b.chosen, onnx_path, record.onnx_sha256, b.options, module, config,
                tier.name,
            )  # fmt: skip
            break
        except BuildError as exc:
            if exported:  # its files are this build's (the old ones gone): a server
                # rebuilt the engine from them and served it - the NaN outputs validation
                # had refused. Without its record it loads only after a build succeeds.
                (repo.tier_dir(name, tier.name) / TIER_FILE).unlink(missing_ok=True)
                raise
            if not isinstance(exc, OutputsDiffer):  # an engine that cannot be built or run
                raise  # here (a read-only cache, a GPU's memory held): the kept tier stays
            # Kept from an earlier build, its ONNX is not this innfer's sample of the INN
            # (another release's: a sampler changed without SAMPLER_VERSION - a build after
            # an upgrade or a rollback failed so on every run; helper-310): exported again.
            log.warning("tier %s: its kept ONNX disagrees with the INN as this innfer "
                        "samples it (%s): exporting it again", tier.name, exc)  # fmt: skip
    if b.chosen.name == "torch":  # its engine is the module: the ONNX ran nowhere
        try:
            check_exported_onnx(onnx_path, module, config, tier.name)
        except BuildError as exc:
            if set(config.backends) <= {"torch"}:  # no backend builds from the ONNX
                b.report.warn(f"{exc} (only torch is listed in backends)", b.progress)
            else:
                _close_all([engine])
                if exported:  # (as above: no record of files that failed)
                    (repo.tier_dir(name, tier.name) / TIER_FILE).unlink(missing_ok=True)
                raise
    engines[tier.name] = engine
    if b.vocab_size is not None:
        rows = (record.input_rows or {}).get(config.text.ids)  # (parsed at export)
        rows = rows if isinstance(rows, int) else None  # token ids index one table
        check_token_ids(engine, config, tier.name, b.vocab_size, rows)
    accuracy = record.accuracy
    stale = exported or accuracy is None or record.accuracy_on != b.measured_on
    if b.score is not None and stale:
        bar.set_postfix_str(f"{tier.name}: accuracy")
        accuracy = b.score(engine)
    elif b.score is None:
        accuracy = None  # no evaluation configured now: no stale figure to schedule by
    if (accuracy, b.measured_on) != (record.accuracy, record.accuracy_on):
        record = TierRecord(**{**record.__dict__, "accuracy": accuracy,
                               "accuracy_on": b.measured_on})  # fmt: skip
        record.write(repo.tier_dir(name, tier.name) / TIER_FILE)
    _say_uncalibrated(b, tier, record, module)
    b.report.tiers.append(
        TierReport(tier.name, exported, built, err, accuracy, time.perf_counter() - t0)
    )
    return record


def _say_uncalibrated(b: _Build, tier: TierConfig, record: TierRecord, module) -> None:
    """Warn of a tier sampled where sampling alone keeps little: a BatchNorm model's tier
    without statistics of its own, a pretrained transformer's without calibration."""
    name, model_dir = b.name, b.model_dir
    if b.norm_x is None and unnormed(b.inn, module, record.sizes, b.config.method):
        b.report.warn(
            f"tier {tier.name} of {name} has no BatchNorm statistics of its own (they "
            f"are resampled from the full width's, which on a BatchNorm model can cost "
            f"most of the accuracy): name an evaluation dataset in model.yaml (the "
            f"build re-estimates them on its training inputs) or store them with innfer "
            f"calibrate {model_dir} --data DATASET, and build again",
            b.progress,
        )
    if _data_free_transformer_tier(b.inn, record.sizes):
        b.report.warn(
            f"tier {tier.name} of {name} is sampled without calibration: on a pretrained "
            f"transformer such tiers keep little of the model (all-MiniLM-L6-v2 at 50 % "
            f"heads and FFN: cosine 0.31 to the full model's embeddings). "
            + (f"Calibrate on text first: innfer calibrate {model_dir} --text FILE (one "
               "sentence per line)" if b.config.text is not None else
               "innfer calibrate distils transformers on text through a text: section "
               "(tokenizer.json) in model.yaml; add one to calibrate it"),
            b.progress,
        )  # fmt: skip


def _say_same_counts(b: _Build, tier: TierConfig, record: TierRecord, counts: dict) -> None:
    """Warn of a tier whose channel counts an earlier one has (``counts``: tier -> counts,
    this tier's added)."""
    same = [t for t, sizes in counts.items() if sizes == record.sizes]
    counts[tier.name] = record.sizes
    if same:  # w095 rounds to w100's counts at multiple_of 8: one network twice
        b.report.warn(
            f"tier {tier.name} of {b.name} samples the same network as {same[0]} "
            f"(its width rounds to the same channel counts at multiple_of "
            f"{b.config.multiple_of}): the scheduler gains nothing from it; widen the gap "
            "between their widths or drop one",
            b.progress,
        )


def _say_unshrunk(b: _Build, tier: TierConfig, record: TierRecord) -> None:
    """Warn of a uniform tier below full width that keeps groups at their full size: one
    rounding step of theirs (multiple_of, with a grouped conv's or GroupNorm's blocks) is
    the whole group, so the tier is less smaller than its width says (helper-296: a
    GroupNorm(3, 24) at multiple_of 8 stayed 24 channels down to width 0.1)."""
    inn, multiple_of = b.inn, b.config.multiple_of
    if not isinstance(tier.width, float) or tier.width >= 1.0 or multiple_of == 1:
        return
    if record.channel_search is not None:  # its counts are the search's choice (tier.json)
        return
    # only where multiple_of is what keeps them: at multiple_of 1 they would shrink (a
    # 1-channel group, or one of as many blocks as channels, never does; helper-301)
    finer = inn.sizes(tier.width, 1)
    full = [g for g in inn.groups if record.sizes.get(g.name) == g.size > finer[g.name]]
    if full:
        which = ", ".join(f"{g.name} ({g.size}, step {inn.step(g, multiple_of)})" for g in full[:5])
        more = f" and {len(full) - 5} more" if len(full) > 5 else ""
        b.report.warn(
            f"tier {tier.name} of {b.name} keeps group(s) {which}{more} at full size: one "
            f"rounding step of theirs (multiple_of {b.config.multiple_of} with their blocks) "
            "is the whole group; a smaller multiple_of shrinks them",
            b.progress,
        )


def _say_unchecked_ids(b: _Build, input_rows: dict) -> None:
    """Warn of integer inputs the server cannot check against an embedding table (the last
    tier's ``input_rows``: every tier indexes the same tables)."""
    unchecked = _unchecked_ids(b.config, input_rows)
    if unchecked and b.config.text is None:
        b.report.warn(
            f"integer input(s) {', '.join(unchecked)} of {b.name} do not index an embedding "
            "table directly (ids + 1, ids[:, 1:], ...): the server cannot check them "
            "against the tables at decode; a value past a table fails the whole batch it "
            "runs in when the engine meets it (each request in it INVALID_ARGUMENT), a "
            "negative one within a table's size "
            "reads a row from its end unsaid. Index each table with an input of its own, "
            "or one column of one (ids[:, k]), to have them checked",
            b.progress,
        )


def _say_stale_profile(b: _Build, onnx: dict[str, str]) -> None:
    """With ``--no-profile``: warn where the kept profile.json does not time the engines
    built now."""
    kept = b.repo.read_profile(b.name)
    if kept is None:
        return
    # A profile that records what it timed is judged by that alone (a tier re-exported to
    # the same ONNX is timed still: review helper-248); an older one by what was exported
    records = isinstance(kept.get("onnx_sha256"), dict)
    stale = stale_tiers(kept, onnx) if records else [t.name for t in b.report.tiers if t.exported]
    # ... nor where it was measured elsewhere: another backend, device or thread count
    # (model.yaml's threads edited: the build printed the old count's times unsaid; helper-300)
    elsewhere = measured_elsewhere(kept, b.chosen, b.config.threads, b.config.spin)
    if elsewhere is not None:
        b.report.warn(
            f"{elsewhere}, not as {b.name} is built now (--no-profile): its latencies are not "
            f"these engines'; `innfer build {b.repo.root} --model {b.name}` measures them",
            b.progress,
        )
    elif stale:
        b.report.warn(
            f"profile.json does not time the engines of tiers {', '.join(stale)} as built "
            f"now (--no-profile); `innfer build {b.repo.root} --model {b.name}` stores a new "
            "one (innfer "
            f"serve re-measures at load a profile that records the engines it timed; one "
            f"written before profiles recorded them is trusted)",
            b.progress,
        )


def _say_below_floor(b: _Build) -> None:
    """Warn of built tiers below auto_tiers' accuracy floor (served until auto-tiering first
    chooses, or for good where it is off)."""
    config = b.config
    floor = config.auto_tiers.accuracy_floor if config.auto_tiers is not None else None
    below = [t for t in b.report.tiers if floor is not None and t.accuracy is not None
             and t.accuracy < floor]  # fmt: skip
    if below:
        b.report.warn(
            f"tiers {', '.join(f'{t.name} ({t.accuracy:.2%})' for t in below)} are below "
            f"auto_tiers.accuracy_floor {floor:g}: the server serves model.yaml's tiers until "
            "auto-tiering first chooses; drop them from model.yaml, or lower the floor",
            b.progress,
        )


def _close_all(engines) -> None:
    """Close every engine; one that fails to close is logged, the others still close."""
    for engine in engines:
        try:
            engine.close()
        except Exception:  # closing must not hide the build's own error
            log.exception("closing an engine failed")


def _data_free_transformer_tier(inn: IntegralModel, sizes: dict[str, int]) -> bool:
    """Whether ``sizes`` is a smaller width of a transformer (a model with attention-head
    groups) for which no calibrated weights are stored and whose node values were not
    trained at random widths (``info["trained"]``): its data-free sample."""
    if not any(inn.kind(g) == "heads" for g in inn.groups) or sizes == inn.sizes(1.0):
        return False
    if inn.info.get("trained"):
        return False
    return IntegralModel.sizes_key(sizes) not in inn.tiers


def source_hash(
    inn_dir: Path,
    config: ModelConfig,
    tier: TierConfig,
    backend: Backend | None = None,
    inn_sha: str | None = None,
) -> str:
    """What a tier's ONNX depends on: the INN's files and the sampling arguments, and - where
    the tier's channel counts are searched - the search settings and what it times on
    (``backend``, its device, threads, batch): a change there re-runs the search.
    ``inn_sha``: the INN's ``inn_fingerprint`` where the caller has it (else inn.json is
    read)."""
    if inn_sha is None:
        inn_sha = _inn_print(inn_dir).weights
    payload = {
        "sampler": IntegralModel.SAMPLER_VERSION,
        "inn": inn_sha,  # weights, grids, norm statistics
        "width": tier.width,
        "method": config.method,
        "multiple_of": config.multiple_of,
        "inputs": [t.__dict__ for t in config.inputs],
        "outputs": [t.__dict__ for t in config.outputs],
    }
    if norm_source(config) is not None:  # re-estimated BatchNorm statistics (sampling.py)
        payload["norm_inputs"] = norm_source(config)
    if _searches(config, tier):  # absent otherwise: hashes from before the search still match
        if backend is None:
            raise ValueError("source_hash needs the backend of a tier whose channels are searched")
        payload["channel_search"] = search_context(config, backend)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


def _inn_print(model_dir: Path) -> InnPrint:
    """The fingerprints of the INN in ``model_dir`` (inn.json read once per call)."""
    return InnPrint.of(json.loads((model_dir / "inn.json").read_text()))


def _export_tier(
    repo,
    name,
    inn: IntegralModel,
    config: ModelConfig,
    tier: TierConfig,
    backend: Backend,
    options: BuildOptions,
    progress: bool = False,
    score=None,
    inn_print: InnPrint | None = None,
    norm_x=None,
    reuse: bool = True,
):
    """``score(engine) -> accuracy`` (``accuracy_scorer``) ranks a channel search's
    candidates; None: their FLOPs do. ``inn_print``: the INN's fingerprints (read once
    per build, not per tier). ``norm_x``: inputs BatchNorm statistics are re-estimated
    on where the INN stores none for the tier's counts (``sampling.norm_inputs``).
    ``reuse``: False exports the tier even where its recorded source hash matches."""
    d = repo.tier_dir(name, tier.name)
    inn_print = inn_print or _inn_print(repo.model_dir(name))
    inn_sha, structure = inn_print
    src = source_hash(repo.model_dir(name), config, tier, backend, inn_sha)
    old = _recorded(d, src)
    if old is not None and old.inn_structure_sha256 not in (None, structure):
        # The same weights under another network (the source hash holds the weights): the
        # old tier was kept and validated against the new network (review 198).
        old = None
    # Reused only with the module files exported with it: the torch backend builds from
    # those, and refuses them when missing or of another export ("run innfer build").
    if reuse and old is not None and _onnx_matches(d, old) and _module_matches(d, old, tier.name):
        rows = old.input_rows  # the same ONNX as when recorded: parsed once, at export
        if rows is None and _ints(config):  # a record from before they were kept
            rows = embedding_rows((d / "model.onnx").read_bytes(), config)
        sampling = sampling_of(config)  # (the same source hash: the same settings)
        kept = {"inn_sha256": inn_sha, "inn_structure_sha256": structure, "input_rows": rows,
                "sampling": sampling}  # fmt: skip
        if any(getattr(old, k) != v for k, v in kept.items()):
            # kept since: a record of an older build gains them (review 158)
            old = dataclasses.replace(old, **kept)
            old.write(d / TIER_FILE)
        return old, None, False  # cache hit: same INN and sampling -> same ONNX
    search = old.channel_search if old is not None else None  # measured for these inputs
    if search is None and _searches(config, tier):
        try:
            result = search_channels(
                inn,
                config,
                tier.width,
                backend,
                options,
                score,
                progress,
                tier.name,
                cache_dir=repo.model_dir(name) / "engines",
            )
        except (ValueError, EngineError) as exc:
            raise BuildError(f"{config.source}: tier {tier.name}: channel search: {exc}") from exc
        search = result.to_json()
    width = chosen_sizes(search) if search is not None else tier.width
    try:
        module, reestimated = sample_tier(inn, config, width, norm_x)
    except ValueError as exc:
        raise BuildError(f"{config.source}: tier {tier.name}: {exc}") from exc
    if reestimated:
        log.info("tier %s: BatchNorm statistics re-estimated on %d training inputs of %s",
                 tier.name, len(norm_x), config.evaluation.dataset)  # fmt: skip
    # Written beside the tier and swapped in whole (``replace_directory``): rewritten in place, a
    # build killed between the new model.onnx and its tier.json left a tier every load
    # refused ("does not match"), and a model that served before the build did not until a
    # build completed (review helper-150).
    staging = d.with_name(f"{d.name}.build-{uuid.uuid4().hex[:8]}")
    try:
        try:
            data = write_tier_files(staging, module, config)
        except ValueError as exc:  # inputs / outputs not the model's, or over ONNX's 2 GiB
            raise BuildError(f"{config.source}: tier {tier.name}: {exc}") from exc
        example = tuple(
            torch.zeros((1, *t.concrete(config.example_length)), dtype=getattr(torch, t.dtype))
            for t in config.inputs
        )
        record = TierRecord(
            name=tier.name,
            width=tier.width,
            sizes=inn.sizes(width, config.multiple_of),
            onnx_sha256=hashlib.sha256(data).hexdigest(),
            source_sha256=src,
            flops=count_flops(module, example),
            params=sum(p.numel() for p in module.parameters()),
            accuracy=None,
            channel_search=search,
            inn_sha256=inn_sha,
            inn_structure_sha256=structure,
            input_rows=embedding_rows(data, config),
            sampling=sampling_of(config),
        )
        record.write(staging / TIER_FILE)
        if not replace_directory(staging, d):  # another build of this tier swapped first:
            log.info("tier %s was installed by another build meanwhile; keeping it", d)
            record = TierRecord.read(d / TIER_FILE)  # theirs (the same source) is served
    except OSError as exc:  # the staging folder's path named alone, gone by then, and no fix
        # (review helper-278)
        if exc.errno == errno.ENOSPC:
            why = f"the volume holding {d.parent} is full: free space or grow it"
        elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            why = f"{d.parent} cannot be written ({exc.strerror}): make it writable"
        else:
            raise
        raise BuildError(f"tier {tier.name}: its files could not be written: {why}") from exc
    finally:  # an interrupted export leaves no staging folder (a killed one: leftovers.sweep)
        shutil.rmtree(staging, ignore_errors=True)
    return record, module, True


def _searches(config: ModelConfig, tier: TierConfig) -> bool:
    """Whether the build searches this tier's channel counts: only a fractional width has
    roundings to choose from; explicit per-group counts are the operator's choice."""
    return config.channel_search is not None and not isinstance(tier.width, dict)


def _sampled_width(tier: TierConfig, record: TierRecord) -> float | dict[str, int]:
    """What the tier was sampled at: the searched channel counts, else its width."""
    return chosen_sizes(record.channel_search) if record.channel_search else tier.width


def _recorded(d: Path, src: str) -> TierRecord | None:
    """The tier.json in ``d`` if it was built from exactly ``src`` (else None)."""
    try:
        old = TierRecord.read(d / TIER_FILE)
    except Exception:
        return None
    return old if old.source_sha256 == src else None


def _onnx_matches(d: Path, record: TierRecord) -> bool:
    onnx_path = d / "model.onnx"
    return onnx_path.is_file() and sha256_file(onnx_path) == record.onnx_sha256


def _module_matches(d: Path, record: TierRecord, tier: str) -> bool:
    """Whether ``d``'s module files are the ones exported with its model.onnx (else the
    tier is exported again, and says why)."""
    problem = module_files_problem(d, record.onnx_sha256)
    if problem is not None:
        log.info("tier %s: %s; exporting it again", tier, problem)
    return problem is None


def validated_engine(
    cache: EngineCache,
    backend: Backend,
    onnx_path: Path,
    onnx_sha256: str,
    options: BuildOptions,
    module,
    config: ModelConfig,
    tier: str,
):
    """(engine, built, max abs error): the engine of the ONNX at ``onnx_path`` (sha256
    ``onnx_sha256``) from ``cache``, validated against ``module``, the network exported to
    it. An engine that fails validation leaves the cache: kept, it would be served, and
    fail every later build again. A cached one is then built afresh and validated once
    more (an entry from before its files were checked); a new one's failure is the
    build's (BuildError)."""
    for attempt in (1, 2):
        try:
            engine, built = cache.get(backend, onnx_path, options, onnx_sha256=onnx_sha256)
        except EngineError as exc:
            raise BuildError(f"tier {tier}: {exc}") from exc
        try:
            return engine, built, validate(engine, module, config, tier, options.precision)
        except EngineRunFailed:  # maybe passing (a GPU's memory held elsewhere): the cached
            _close_all([engine])  # engine is not known bad - kept (a TensorRT one takes
            raise  # minutes to build again)
        except BuildError as exc:
            _close_all([engine])
            cache.discard(backend, onnx_sha256, options)
            if built or attempt == 2:
                raise
            log.warning("tier %s: removed its cached engine (%s); building it again", tier, exc)
        except BaseException:  # (an engine may hold device memory until closed)
            _close_all([engine])
            raise
    raise AssertionError("unreachable")


def check_exported_onnx(onnx_path: Path, module, config: ModelConfig, tier: str) -> float | None:
    """The tier's ONNX run by ONNX Runtime against ``module`` (``validate`` at fp32); None
    where ONNX Runtime is not installed. A torch engine is the sampled module itself, so its
    validation never ran the ONNX that a host without torch - or ``backends: [torch,
    onnxruntime]`` falling back - builds and serves (review helper-139)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BuildError(f"tier {tier}: ONNX Runtime cannot load its ONNX: {exc}") from exc
    engine = OnnxRuntimeEngine(session)
    try:
        return validate(engine, module, config, f"{tier} (its ONNX, in ONNX Runtime)", "fp32")
    finally:
        engine.close()


@torch.no_grad()
def validate(engine, module, config: ModelConfig, tier: str, precision: str | None = None) -> float:
    """The largest absolute difference between ``engine``'s outputs and ``module``'s on
    random inputs (batch 1 and ``max_batch``); BuildError beyond the tolerance of
    ``precision``, the engine's (default: model.yaml's; a backend that builds fp32 only
    builds fp32 engines for an fp16 model.yaml, ``Repository.build_options``) - or fp16's
    where the model itself computes in float16 (a float16 output: the torch sample rounds
    as the engine does, and an fp32 engine of that ONNX still runs it in float16)."""
    precision = precision or config.precision
    if any(t.dtype == "float16" for t in (*config.inputs, *config.outputs)):
        precision = "fp16"  # (an input too: a model that computes in float16 and returns
        # float32, review 179)  # (review 170: 4.9e-4 of float16 rounding failed every backend)
    rtol, atol = TOLERANCE[precision]
    worst = 0.0
    lengths = config.sequence_lengths or (1,)
    # Batch 1 at the shortest length and a full batch at the longest: both ends of each axis.
    for batch, length in sorted({(1, lengths[0]), (config.max_batch, lengths[-1])}):
        feeds = random_feeds(config.inputs, batch, seed=batch, length=length)
        try:
            got = engine.run(feeds)
        except Exception as exc:  # a bare torch error named no tier ("Input type (float)
            # and bias type (c10::Half) should be the same": fp16 beside a cast in the graph)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            fix = "; try precision: fp32 in model.yaml" if precision == "fp16" else ""
            at = ""
            if config.sequence_lengths:  # (a BERT of 128 positions at 256 tokens: only
                # "invalid expand shape" on "a batch of 8"; review helper-301)
                at = f" at {length} tokens"
                fix += (f"; a model may take no more tokens than its position table holds: "
                        f"lower lengths (longest {lengths[-1]}) and text.max_length in "
                        "model.yaml if it holds fewer")  # fmt: skip
            raise EngineRunFailed(
                f"tier {tier}: the engine failed on a batch of {batch}{at}: "
                f"{type(exc).__name__}: {first}{fix}"
            ) from exc
        ref = module(*[torch.from_numpy(feeds[t.name]) for t in config.inputs])
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        for t, r in zip(config.outputs, refs, strict=True):
            r = r.numpy()
            g = got[t.name].astype(np.float32)
            if g.shape != (batch, *t.shape):
                # a capture that fixed the batch at 1, or an output that keeps no batch dim
                # (y.mean(), y.mean(0)): review helper-244 was told only of the first
                why = (
                    "the model reduces over the batch: every output must keep dim 0, one "
                    "row per input row"
                    if r.shape[:1] != (batch,)
                    else "was the model captured with a batch-1 example? give one of batch >= 2"
                )
                raise OutputsDiffer(
                    f"tier {tier}: engine output {t.name!r} has shape {list(g.shape)} for a "
                    f"batch of {batch}, expected {[batch, *t.shape]} ({why})"
                )
            with np.errstate(invalid="ignore"):  # inf - inf where both mask an entry
                err = float(np.nan_to_num(np.abs(g - r), nan=0.0).max())
            worst = max(worst, err)
            if not np.allclose(g, r, rtol=rtol, atol=atol):
                raise OutputsDiffer(
                    f"tier {tier}: engine output {t.name!r} differs from the torch sample by "
                    f"{err:.3g} (tolerance rtol={rtol}, atol={atol} for {precision})"
                )
    return worst


def _tokenizer_vocab(config: ModelConfig, model_dir: Path) -> int | None:
    """One more than the largest id a text model's tokenizer produces; None for a model
    without text, or whose tokenizer file is missing (the build says so when it records
    the tokenizer)."""
    if config.text is None or not (model_dir / config.text.tokenizer).is_file():
        return None
    from runtime.repository.tokenizer import TextTokenizer, TokenizerError

    try:
        return TextTokenizer(model_dir / config.text.tokenizer, config.text.max_length).vocab_size
    except TokenizerError as exc:
        raise BuildError(f"{config.source}: {exc}") from None


def check_token_ids(
    engine, config: ModelConfig, tier: str, vocab_size: int, rows: int | None = None
) -> None:
    """BuildError unless ``engine`` embeds every id of the model's tokenizer (ids below
    ``vocab_size``): the server checks client ids against the tokenizer alone, and a
    tokenizer with more tokens than the model's embedding table made every batch holding
    such an id fail in the engine (INTERNAL for each request in it). ``validate`` feeds ids
    0 and 1 only; this runs one row of the largest id. ``rows``: the table's rows as the
    tier's record holds them (``TierRecord.input_rows``), else they are read from the
    engine's error."""
    top = vocab_size - 1
    length = (config.sequence_lengths or (1,))[0]
    feeds = random_feeds(config.inputs, 1, seed=1, length=length)
    feeds[config.text.ids][:] = top
    feeds[config.text.mask][:] = 1
    try:
        engine.run(feeds)
        error = None
    except Exception as exc:  # the backend's own error type (ONNX Runtime: an index error)
        error = exc
    if error is None and (rows is None or top < rows):
        return
    if rows is None:
        found = re.search(r"inclusive range \[-(\d+),", str(error))
        rows = int(found[1]) if found else None
    embeds = f"{rows} rows (ids 0-{rows - 1})" if rows is not None else "fewer rows"
    raise BuildError(
        f"tier {tier}: tokenizer ids reach {top}, the model embeds {embeds}: a request with "
        f"such an id would fail its whole batch. {config.text.tokenizer} is not the model's "
        f"tokenizer (or tokens were added to it): use the one it was trained with"
        + (f" (the engine: {error})" if error is not None and rows is None else "")
    )


def _unchecked_ids(config: ModelConfig, rows: dict) -> list[str]:
    """Integer inputs (or columns of one) the record gives no table for: ``ids``, or
    ``ids (columns 2, 3)`` where only other columns index a table directly."""
    out = []
    for t in config.inputs:
        if t.dtype not in INTEGER_DTYPES or t.name == config.mask_input:  # a mask: no ids
            continue
        bound = rows.get(t.name)
        if bound is None:
            out.append(t.name)
        elif isinstance(bound, list) and None in bound:
            cols = ", ".join(str(k) for k, b in enumerate(bound) if b is None)
            out.append(f"{t.name} (columns {cols})")
    return out


def _ints(config: ModelConfig) -> bool:
    """Whether any input is an integer (an id an embedding table may index)."""
    return any(t.dtype in INTEGER_DTYPES for t in config.inputs)


def evaluation_key(config: ModelConfig, model_dir: Path) -> str | None:
    """What a tier's accuracy is measured on, as tier.json records it: the data set or the
    text file (by content hash) and the limit - and for text, the tokenizer (by content
    hash) and max_length, which make its ids (a tier kept 0.9301 measured at max_length 24
    where max_length 4 gives 0.9655); None without an evaluation."""
    e = config.evaluation
    if e is None:
        return None
    if e.text is None:
        return f"dataset {dataset_digest(config)}, first {e.limit}"
    path = model_dir / e.text
    digest = sha256_file(path)[:16] if path.is_file() else "missing"
    key = f"text {e.text} (sha256 {digest}), first {e.limit}"
    if config.text is not None:
        tok = model_dir / config.text.tokenizer
        tok_digest = sha256_file(tok)[:16] if tok.is_file() else "missing"
        key += f", tokenizer sha256 {tok_digest}, max_length {config.text.max_length}"
    return key


def accuracy_scorer(inn: IntegralModel, config: ModelConfig, model_dir: Path):
    """``score(engine) -> float``, the tier accuracy model.yaml's ``evaluation`` asks for, or
    None without one: a classifier's top-1 accuracy on its data set's test split, or a
    text model's embedding fidelity on the held-out sentences of ``evaluation.text`` - the
    mean cosine of the tier's embeddings to the full width's (the INN sampled at 1.0,
    computed once, at the first score)."""
    if config.evaluation is None:
        return None
    if config.evaluation.text is None:
        return lambda engine: evaluate_accuracy(engine, config)
    ids, mask = _evaluation_text(config, model_dir)
    reference: list[np.ndarray] = []

    def score(engine) -> float:
        if not reference:
            from runtime.inn.fidelity import embed

            full = embed(inn.sample(1.0), torch.from_numpy(ids), torch.from_numpy(mask))
            reference.append(full.numpy())
        emb = _engine_embeddings(engine, config, ids, mask)  # (N, D)
        full = reference[0]
        cos = (emb * full).sum(1) / (
            np.linalg.norm(emb, axis=1) * np.linalg.norm(full, axis=1) + 1e-12
        )
        return float(cos.mean())

    return score


def _evaluation_text(config: ModelConfig, model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), (N, T) int64: the first ``evaluation.limit`` non-empty lines of the
    model's ``evaluation.text`` file, tokenized with its tokenizer; BuildError if absent."""
    from runtime.repository.tokenizer import TextTokenizer, read_sentences, text_chars

    path = model_dir / config.evaluation.text
    if not path.is_file():
        raise BuildError(
            f"{config.source}: evaluation.text: {path} does not exist; put held-out "
            f"sentences there, one per line (not the calibration text)"
        )
    try:  # (each line cut far past what max_length tokens span: a huge one costs nothing)
        lines = read_sentences(path, config.evaluation.limit, text_chars(config.text.max_length))
    except ValueError as exc:  # not UTF-8
        raise BuildError(f"{config.source}: evaluation.text: {exc}") from None
    if not lines:
        raise BuildError(f"{config.source}: evaluation.text: {path} has no sentences")
    tok = TextTokenizer(model_dir / config.text.tokenizer, config.text.max_length)
    return tok.encode(lines)


def _engine_embeddings(engine, config: ModelConfig, ids: np.ndarray, mask: np.ndarray):
    """(N, D) the engine's first output for every sentence, in order; batches of
    ``max_batch`` sentences of similar length, each trimmed to its longest."""
    order = np.argsort(mask.sum(1), kind="stable")
    out = None
    for i in range(0, len(order), config.max_batch):
        idx = order[i : i + config.max_batch]
        t = int(mask[idx].sum(1).max())
        feeds = {config.text.ids: ids[idx, :t], config.text.mask: mask[idx, :t]}
        # The tokenizer's int64 as the model takes them (int32 ids and mask are allowed, as
        # the server's decode casts them): ONNX Runtime refused the build's int64 feeds.
        feeds = {n: a.astype(config.input(n).dtype, copy=False) for n, a in feeds.items()}
        y = engine.run(feeds)[config.outputs[0].name]  # (b, D)
        if out is None:
            out = np.empty((len(ids), y.shape[1]), dtype=np.float32)
        out[idx] = y
    return out


def _warn(text: str, progress: bool) -> None:
    """A build warning, also kept in ``BuildReport.warnings``: logged at WARNING, or at INFO
    beside a progress bar - the caller shows the report's warnings then (the logged copy
    was printed into the bar's line, and the CLI printed it again below its table)."""
    (log.info if progress else log.warning)("%s", text)


def _check_dataset(config: ModelConfig, model_dir: Path) -> None:
    """Refuse an unknown ``evaluation.dataset`` before any work, naming the file and field
    (the config cannot list the data sets: it may not import the demo's torch loaders)."""
    from runtime.demo.data import DATASETS, load

    dataset = config.evaluation.dataset if config.evaluation is not None else None
    if dataset is not None and dataset.endswith(".npz"):  # your own: it must load, and fit
        try:
            data = load(dataset_ref(config))
        except (ValueError, OSError) as exc:
            raise BuildError(f"{model_dir / 'model.yaml'}: evaluation.dataset: {exc}") from None
        if (why := _misfit(data, config)) is not None:  # (it crashed the build later as an
            raise BuildError(  # internal error in the engine, stopping the other models)
                f"{model_dir / 'model.yaml'}: evaluation.dataset {dataset}: {why}"
            )
    elif dataset is not None and dataset not in DATASETS:
        raise BuildError(
            f"{model_dir / 'model.yaml'}: evaluation.dataset {dataset!r} is not a data set "
            f"innfer ships; use one of {', '.join(sorted(DATASETS))}, a .npz file of your own "
            f"in the model's directory, or remove the field (text models: evaluation.text)"
        )


def _misfit(data, config: ModelConfig) -> str | None:
    """How a data set does not fit the model's first input and output (None: it fits)."""
    want, got = list(config.inputs[0].shape), list(data.input_shape)
    if len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got, strict=False)):
        return (f"samples of shape {got}, but input {config.inputs[0].name!r} is {want}: give "
                "the model's own data")  # fmt: skip
    out = list(config.outputs[0].shape)
    per = list(data.y_test.shape[1:])
    if per != out[1:]:
        what = f"a label map of {out[1:]} per sample" if out[1:] else "one class per sample"
        return (f"labels of shape {per} per sample, but {config.outputs[0].name!r} is {out}: "
                f"give {what} (class indices, not one-hot)")  # fmt: skip
    if out and data.num_classes > out[0]:
        return f"labels up to {data.num_classes - 1}, but the model has {out[0]} classes"
    return None


def evaluate_accuracy(engine, config: ModelConfig) -> float:
    from runtime.demo.data import load as load_data

    data = load_data(dataset_ref(config))
    x = data.x_test[: config.evaluation.limit].numpy()
    y = data.y_test[: config.evaluation.limit].numpy()
    name, out = config.inputs[0].name, config.outputs[0].name
    correct = 0
    for i in range(0, len(x), config.max_batch):
        batch = x[i : i + config.max_batch].astype(config.inputs[0].dtype)
        try:
            logits = engine.run({name: batch})
        except Exception as exc:  # the data's, not a bug: named (it was "internal error")
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise BuildError(
                f"evaluation.dataset {config.evaluation.dataset}: the engine failed on its "
                f"samples: {type(exc).__name__}: {first}"
            ) from exc
        correct += int((logits[out].argmax(1) == y[i : i + config.max_batch]).sum())
    return correct / max(y.size, 1)  # a map per pixel: the share of pixels right


# Times a tier is timed again where the profile says it is slower than a more accurate
# tier (the server warns about such a tier at load: the planner takes the least accurate
# tier for the fastest). On a quiet machine that is mostly a point timed beside other work:
# the demo's first build said w075 0.83 ms against w100 0.65 ms at batch 8, with p90s of
# ~4.7 ms for both, and a build moments later 0.46 against 0.64 (review helper-225).
RETIMES = 2


def _profile(b: _Build, engines: dict, repeats: int, onnx: dict, records: dict) -> Path:
    """Every tier at every batch size; a sequence model at every profiled length too; with
    the ONNX each tier's tables timed (``onnx``), written whole or not at all. Tiers the
    profile finds slower than a more accurate tier (and that tier) are timed again, up to
    ``RETIMES`` times; where it stays so, the build says it."""

    def bar(points):
        return tqdm(points, desc="profile", disable=not b.progress, unit="point")

    # ranked as the server ranks them: by measured accuracy where every tier has it, else
    # by FLOPs (server.scheduling.latency.tiers_from_profile)
    measured = all(r.accuracy is not None for r in records.values())

    # (equally accurate tiers keep model.yaml's order, as the server's stable sort does:
    # the later one timed slower is said to be slower than an "equally accurate" one)
    ranked = sorted(records, key=lambda t: records[t].accuracy if measured else records[t].flops,
                    reverse=True)  # fmt: skip

    def inverted(doc: dict) -> list[tuple[str, str, list[int]]]:
        return slower_tiers(doc["tiers"], ranked)

    data = profile_tiers(engines, b.config, b.chosen, repeats=repeats, points=bar, onnx=onnx)
    for _ in range(RETIMES):
        if not (found := inverted(data)):
            break
        again = sorted({tier for slow, fast, _ in found for tier in (slow, fast)})
        subset = {t: engines[t] for t in again}
        more = profile_tiers(subset, b.config, b.chosen, repeats=repeats, points=bar, onnx=onnx)
        data["tiers"].update(more["tiers"])
        for n, tables in more.get("lengths", {}).items():
            data["lengths"][n].update(tables)
    for slow, fast, sizes in inverted(data):
        same = measured and records[slow].accuracy == records[fast].accuracy
        than = f"the {'equally' if same else 'more'} accurate {fast}"
        b.report.warn(
            f"model {b.name}: tier {slow} timed slower than {than} at batch "
            f"{sizes}, {RETIMES + 1} times: the server will take {fast} for the faster; drop "
            f"{slow} from model.yaml, or build again on a quiet machine",
            b.progress,
        )
    path = b.repo.model_dir(b.name) / PROFILE_FILE
    write_json(path, data)
    return path


def add_model(repo_root: str | Path, name: str, inn: IntegralModel, config: dict) -> Path:
    """Write ``inn`` and its ``model.yaml`` into ``<repo_root>/<name>`` (config validated first).

    Example:
        >>> add_model("models", "mnist", inn, {"inputs": [...], "outputs": [...],
        ...           "tiers": [{"name": "w100", "width": 1.0}]})  # doctest: +SKIP
    """
    import yaml

    check_model_name(name)  # "../x" was written outside the repository, "a b" never served
    d = Path(repo_root) / name
    ModelConfig.from_dict({"name": name, **config}, source=str(d / "model.yaml"))
    inn.save(d)
    (d / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return d
