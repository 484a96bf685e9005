"""The accuracy-vs-latency frontier of a model's widths: what auto-tiering chooses from.

For a model whose ``model.yaml`` has ``auto_tiers``, ``innfer build`` measures candidate width
settings besides the hand-written tiers:

* uniform: every continuous group at each fraction of ``auto_tiers.widths``;
* shaped (``auto_tiers.shaped``): for each uniform width below 1, the same total channels
  spread by per-group sensitivity - a group whose narrowing distorts the output more keeps
  more of its channels. Sensitivity is label-free: the mean squared change of the model's
  first output, relative to its mean square, when only that group is sampled at half width
  (on the evaluation set's training inputs where there is one, else on random inputs).

Each candidate is sampled (BatchNorm statistics re-estimated on those inputs where the model
keeps norms and stores none for its channel counts), exported to
``frontier/<name>/model.onnx``, built with the model's backend (the engine cache: the swap
later reuses the entry), scored on the evaluation set (else its FLOPs fraction, the
scheduler's proxy) and timed at every profiled batch size. Candidates no other one beats on
accuracy and latency (at batch 1 or at max_batch) are the frontier. A rebuild with the same
INN, widths, sampling, data and backend reads the file back.

Example:
    >>> frontier = build_frontier(Repository("models"), "mnist")  # doctest: +SKIP
    >>> [(c.name, c.accuracy) for c in frontier.pareto()]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from runtime.atomic import replace_directory
from runtime.build.export import embedding_rows, write_tier_files
from runtime.build.pipeline import evaluate_accuracy, evaluation_key, validated_engine
from runtime.build.sampling import dataset_ref, norm_inputs, sample_tier
from runtime.engines.torch import module_files_problem
from runtime.inn.calibrate import recompute_norm_stats
from runtime.inn.model import IntegralModel, load
from runtime.inn.report import count_flops
from runtime.repository import EngineCache, Repository, sha256_file
from runtime.repository.config import ModelConfig
from runtime.repository.errors import RepositoryError
from runtime.repository.frontier import (
    FRONTIER_DIR,
    FRONTIER_FILE,
    Candidate,
    Frontier,
    candidate_settings,
    mark_pareto,
)
from runtime.repository.leftovers import kept_fresh, sweep
from runtime.repository.profile import measure, random_feeds
from runtime.repository.records import InnPrint

log = logging.getLogger("innfer.frontier")

SENSITIVITY_WIDTH = 0.5  # the width one group is sampled at to measure its sensitivity
SHAPE_POWER = 0.5  # channels per group scale with sensitivity ** this (0: uniform)
RECIPE = 3  # the candidates' making, in the source hash (see _source_hash)


def build_frontier(
    repo: Repository,
    name: str,
    progress: bool = True,
    repeats: int = 20,
    backend: str | None = None,
) -> Frontier:
    """Measure every candidate of ``name``'s ``auto_tiers`` and write
    ``frontier/frontier.json`` (see the module doc); returns the frontier. ``backend``: the
    one ``innfer build --backend`` names (default: model.yaml's first available), so the
    frontier is timed on the engines the tiers are.

    Example:
        >>> build_frontier(Repository("models"), "mnist", backend="onnxruntime")
        ... # doctest: +SKIP
    """
    config = repo.config(name)
    if config.auto_tiers is None:
        raise ValueError(f"{config.source}: no auto_tiers, so no frontier to build")
    model_dir = repo.model_dir(name)
    sweep(model_dir)  # earlier builds' leftovers (a reusable frontier returns below)
    chosen = repo.choose_backend(config, backend)
    src = _source_hash(model_dir, config, chosen)
    out = model_dir / FRONTIER_DIR
    inn_sha, structure = InnPrint.of(json.loads((model_dir / "inn.json").read_text()))
    old = _reusable(out, src)
    if old is not None and old.inn_structure_sha256 not in (None, structure):
        old = None  # the same weights under another network (review 198): measured again
    if old is not None:  # before the INN and the data are loaded: a rebuild costs nothing
        if (old.inn_sha256, old.inn_structure_sha256) != (inn_sha, structure):
            # measured before they were kept (the same source)
            old = dataclasses.replace(old, inn_sha256=inn_sha, inn_structure_sha256=structure)
            old.write(out / FRONTIER_FILE)
        return old
    inn = load(model_dir)
    measure_one = _Measure(
        inn, config, chosen, repo.build_options(config, chosen),
        EngineCache(model_dir / "engines"), repeats,
    )  # fmt: skip
    with torch.no_grad():
        sensitivity = (
            _sensitivity(inn, config, measure_one.x_cal) if config.auto_tiers.shaped else {}
        )
    settings = candidate_sizes(inn, config, sensitivity)
    # Candidates are written beside the served frontier and swapped in whole at the end: a
    # rebuild overwrote frontier/<name>/model.onnx in place, so while it ran (or after it
    # was interrupted) the chosen set's files no longer matched frontier.json and
    # auto_tiers.json, and every load of the model failed.
    staging = model_dir / f"{FRONTIER_DIR}.build-{uuid.uuid4().hex[:8]}"
    try:
        with kept_fresh(staging):  # a long build's staging is not a killed one's
            bar = tqdm(settings.items(), desc=f"frontier {name}", disable=not progress, unit="cand")
            candidates = []
            for cname, (width, sizes, shaped) in bar:
                bar.set_postfix_str(cname)
                candidates.append(measure_one(staging / cname, width, sizes, shaped))
            frontier = Frontier(
                candidates=mark_pareto(candidates, (1, config.max_batch)),
                accuracy_source=_accuracy_source(config),
                source_sha256=src,
                backend=chosen.name,
                device=chosen.device(),
                threads=config.threads,
                max_batch=config.max_batch,
                sensitivity=sensitivity,
                inn_sha256=inn_sha,
                inn_structure_sha256=structure,
                settings=candidate_settings(config),
            )
            frontier.write(staging / FRONTIER_FILE)
        _install(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return frontier


class _Measure:
    """One candidate: sampled, exported to its directory, built, validated, scored on the
    evaluation set (else its FLOPs fraction) and timed at every profiled batch."""

    def __init__(self, inn, config, backend, options, cache, repeats) -> None:
        self.inn, self.config, self.backend, self.options = inn, config, backend, options
        self.cache, self.repeats = cache, repeats
        self.x_cal, self.evaluation = _data(config)
        self.example = _example(config)
        with torch.no_grad():
            full = inn.sample(1.0, config.method, config.multiple_of)
            self.full_flops = count_flops(full, self.example)

    def __call__(self, d: Path, width: float, sizes: dict[str, int], shaped: bool) -> Candidate:
        config = self.config
        # The network a tier at these counts serves (runtime/build/sampling.py): stored
        # statistics or weights where the INN has them (and the full width's own), else
        # statistics re-estimated on the calibration inputs. The full width was re-estimated
        # here, so the frontier's w100 was another network than the built tier.
        module, _ = sample_tier(self.inn, config, sizes, self.x_cal)
        onnx = write_tier_files(d, module, config)
        onnx_sha = hashlib.sha256(onnx).hexdigest()
        engine, _, _ = validated_engine(
            self.cache, self.backend, d / "model.onnx", onnx_sha, self.options, module, config,
            d.name,
        )  # fmt: skip
        try:
            flops = count_flops(module, self.example)
            accuracy = self.evaluation(engine) if self.evaluation else flops / self.full_flops
            latency = measure(engine, config.inputs, config.batch_sizes, repeats=self.repeats)
        finally:
            engine.close()
        return Candidate(
            name=d.name, sizes=sizes, width=width, flops=flops,
            params=sum(p.numel() for p in module.parameters()), accuracy=float(accuracy),
            latency=latency, onnx_sha256=onnx_sha, shaped=shaped,
            input_rows=embedding_rows(onnx, config),
        )  # fmt: skip


def _install(staging: Path, out: Path) -> None:
    """Replace the frontier directory ``out`` by ``staging`` (``replace_directory``). A load
    between the renames finds no frontier.json and serves model.yaml's tiers with a warning,
    never a chosen set whose files are half rewritten. A concurrent builder that installs
    its own (the same measurement) in between wins; ours is discarded."""
    if not replace_directory(staging, out):
        log.info("%s was installed by another build meanwhile; keeping it", out)


def candidate_sizes(
    inn: IntegralModel, config: ModelConfig, sensitivity: dict[str, float]
) -> dict[str, tuple[float, dict[str, int], bool]]:
    """name -> (width, channel counts, shaped) for every distinct candidate: uniform
    ``w<percent>`` and, where ``sensitivity`` is given, shaped ``s<percent>``."""
    out: dict[str, tuple[float, dict[str, int], bool]] = {}
    seen: set[str] = set()

    def add(cname: str, width: float, sizes: dict[str, int], shaped: bool) -> None:
        key = IntegralModel.sizes_key(sizes)
        if key not in seen:
            seen.add(key)
            out[cname] = (width, sizes, shaped)

    for w in sorted(config.auto_tiers.widths, reverse=True):
        add(f"w{round(w * 100):03d}", w, inn.sizes(w, config.multiple_of), False)
    if len(sensitivity) >= 2:
        for w in sorted(config.auto_tiers.widths, reverse=True):
            if w < 1.0:
                add(f"s{round(w * 100):03d}", w, _shaped(inn, config, w, sensitivity), True)
    return out


def _shaped(
    inn: IntegralModel, config: ModelConfig, width: float, sensitivity: dict[str, float]
) -> dict[str, int]:
    """Channel counts with the same total as the uniform ``width`` (over continuous
    groups), each group's fraction proportional to sensitivity ** SHAPE_POWER, clipped to
    (0, 1]; found by bisection on the common scale."""
    full = inn.sizes(1.0)
    groups = [g for g in sensitivity if g in full]
    s = np.array([max(sensitivity[g], 1e-12) for g in groups])
    r = (s / np.exp(np.log(s).mean())) ** SHAPE_POWER
    n = np.array([full[g] for g in groups], dtype=float)
    target = width * n.sum()
    lo, hi = 0.0, 1.0 / r.min()
    for _ in range(50):
        k = (lo + hi) / 2
        if (np.clip(k * width * r, 0, 1) * n).sum() < target:
            lo = k
        else:
            hi = k
    fractions = np.clip(hi * width * r, 1.0 / n, 1.0)
    # Each group rounded as a uniform width would round it (multiple_of, conv blocks, heads).
    counts = {
        g: inn.sizes(float(f), config.multiple_of)[g]
        for g, f in zip(groups, fractions, strict=True)
    }
    return inn.sizes({**inn.sizes(width, config.multiple_of), **counts})


@torch.no_grad()
def _sensitivity(inn: IntegralModel, config: ModelConfig, x_cal) -> dict[str, float]:
    """Per continuous group: relative mean squared change of the first output when only
    that group is sampled at SENSITIVITY_WIDTH (norm statistics re-estimated)."""
    x = x_cal if x_cal is not None else _random_inputs(config)
    full_sizes = inn.sizes(1.0)
    ref = _first(inn.sample(1.0, config.method)(x))
    scale = float((ref**2).mean()) or 1.0
    out = {}
    for g, n in full_sizes.items():
        half = inn.sizes({g: inn.sizes(SENSITIVITY_WIDTH, config.multiple_of)[g]})
        if half[g] == n:
            continue
        module = inn.sample(half, config.method)
        recompute_norm_stats(module, x)
        out[g] = float(((_first(module(x)) - ref) ** 2).mean()) / scale
    return out


def _data(config: ModelConfig):
    """(calibration inputs or None, accuracy function of an engine or None): the inputs the
    build re-estimates norm statistics on (``sampling.norm_inputs``), also the sensitivity's."""
    if config.evaluation is None:
        return None, None
    return norm_inputs(config), lambda engine: evaluate_accuracy(engine, config)


def _accuracy_source(config: ModelConfig) -> str:
    """What the candidates' accuracy was measured on: the samples ``evaluate_accuracy``
    scores (the limit, or fewer where the test split is smaller: digits' 500 were said as
    1,000 - review 176)."""
    e = config.evaluation
    if e is None:
        return "flops (no evaluation set: FLOPs fraction of the full width)"
    if e.dataset is None:  # held-out sentences: those the file has, up to the limit
        from runtime.repository.tokenizer import read_sentences, text_chars

        path = Path(config.source).parent / e.text
        try:
            n = len(read_sentences(path, e.limit, text_chars(config.text.max_length)))
        except (OSError, ValueError):  # (the build itself says what is wrong with it)
            n = e.limit
        return f"evaluation {e.text} ({n} sentences)"
    from runtime.demo.data import load as load_data

    scored = min(e.limit, len(load_data(dataset_ref(config)).x_test))
    return f"evaluation {e.dataset} ({scored} samples)"


def _random_inputs(config: ModelConfig) -> torch.Tensor:
    feeds = random_feeds(config.inputs, 64, seed=0, length=config.example_length)
    return torch.from_numpy(feeds[config.inputs[0].name])


def _example(config: ModelConfig) -> tuple:
    return tuple(
        torch.zeros((1, *t.concrete(config.example_length)), dtype=getattr(torch, t.dtype))
        for t in config.inputs
    )


def _first(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def _source_hash(model_dir, config: ModelConfig, backend) -> str:
    """What the frontier depends on: the INN, the candidates, sampling, data, backend."""
    meta = json.loads((model_dir / "inn.json").read_text())
    sampling = meta.get("info", {}).get("norm_stats_sampling")
    payload = {
        # How candidates are made: bumped when that changes, so a rebuild measures again
        # (2: statistics stored for a candidate's counts are kept, not re-estimated).
        "recipe": RECIPE,
        "sampler": IntegralModel.SAMPLER_VERSION,
        "weights": meta["weights_sha256"],
        "info": {k: meta.get("info", {}).get(k) for k in ("grids", "norm_stats", "tiers")},
        # Only what makes the candidates; the choice's goals do not change the frontier.
        "candidates": [list(config.auto_tiers.widths), config.auto_tiers.shaped],
        "method": config.method,
        "multiple_of": config.multiple_of,
        # by content (a .npz or text file rewritten is measured again), as the tiers' records
        "evaluation": evaluation_key(config, model_dir),
        "inputs": [t.__dict__ for t in config.inputs],
        "outputs": [t.__dict__ for t in config.outputs],
        # (absent where none is recorded: frontiers measured before it stay valid)
        **({"norm_stats_sampling": sampling} if sampling else {}),
        "max_batch": config.max_batch,
        "backend": [backend.name, backend.version(), backend.device(), config.threads],
        "precision": config.precision,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


def _reusable(out, src: str) -> Frontier | None:
    """The frontier in ``out`` if it was measured from exactly ``src`` with its files: each
    candidate's model.onnx, and the module files exported with it (the torch backend's)."""
    try:
        old = Frontier.read(out / FRONTIER_FILE)
    except RepositoryError:
        return None
    if old.source_sha256 != src:
        return None
    for c in old.candidates:
        onnx_path = out / c.name / "model.onnx"
        if not onnx_path.is_file() or sha256_file(onnx_path) != c.onnx_sha256:
            return None
        problem = module_files_problem(out / c.name, c.onnx_sha256)
        if problem is not None:
            log.info("frontier candidate %s: %s; measuring the frontier again", c.name, problem)
            return None
    return old
