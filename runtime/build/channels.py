"""Channel search: time a few roundings of a tier's channel counts and keep the best one.

Why: a fractional tier becomes one channel count per group, rounded to ``multiple_of``. Small
or odd counts waste vector lanes (ONNX Runtime's NCHWc blocks are 8 floats wide with AVX2, 16
with AVX-512; GPUs have tensor-core tiles), so a tier can run much slower than its FLOPs say:
the ResNet-18-like w025 ran at 1.47x its FLOPs ratio. Which rounding runs fast depends on the
backend and the machine, so the build measures it instead of guessing.

Candidates (``candidate_sizes``): ``inn.sizes(width, m)`` for the tier's own ``multiple_of``
- the *baseline*, what a build without the search exports - and for each ``m`` in
``channel_search.multiples``; equal channel counts are one candidate. Where the INN holds
calibrated weights for the baseline's counts and no evaluation set can show what they are
worth, only calibrated candidates compete (the FLOPs proxy cannot see what calibration bought).

Measurement (``search_channels``): each candidate is sampled, exported to ONNX in a temporary
directory, built and loaded with the model's backend and options exactly as a tier would be,
and timed at one batch size (``channel_search.batch``, else ``max_batch``) and, for a sequence
model, at the length TensorRT tunes for (``sequence_profile[1]``: a length the model is served
at, inside every engine's profile): ``repeats`` runs each, round-robin across the candidates
with a rotating start, so that a burst of load from elsewhere on a shared machine lands on all
of them rather than on one; the median counts.
Accuracy is measured on ``evaluation`` when model.yaml has one, else FLOPs relative to the
full width stand in for it, the scheduler's own proxy (server/scheduling/latency.py).

The rule (``choose``), on accuracy ``a`` and median latency ``t``:
  1. A candidate stays within ``ACCURACY_TOLERANCE`` (0.5 point; with the proxy, 0.5 % of the
     full width's FLOPs) below the baseline's accuracy: the search makes tiers faster, not
     smaller, and a rounding that drops channels is a different tier.
  2. It is at most ``LATENCY_SLACK`` (10 %) slower than the baseline: the width says where the
     tier sits between its neighbours. Without this, FLOPs per ms (the proxy's ``a / t``) would
     favour a larger, more efficient candidate and quietly turn w025 into w035.
  3. Among those (the baseline always is one) the best ``a / t`` wins if it beats the
     baseline's by more than ``MIN_GAIN`` (3 %); else the baseline stays: smaller differences
     are within timing noise here, and the baseline is what a build without the search makes.

Example:
    >>> base = Candidate((8,), {"c1": 8}, flops=100, accuracy=0.90, latency_ms=10.0)
    >>> wide = Candidate((16,), {"c1": 16}, flops=150, accuracy=0.91, latency_ms=8.0)
    >>> choose([base, wide])
    1
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from runtime.atomic import write_bytes
from runtime.build.export import write_tier_files
from runtime.build.sampling import norm_inputs, sample_tier
from runtime.engines import Backend, BuildOptions, Engine
from runtime.engines.tensorrt import TIMING_CACHES
from runtime.inn.model import IntegralModel
from runtime.inn.report import count_flops
from runtime.repository.config import ModelConfig, to_dict
from runtime.repository.profile import random_feeds

ACCURACY_TOLERANCE = 0.005  # accuracy (or FLOPs fraction) a candidate may give up
LATENCY_SLACK = 0.10  # how much slower than the baseline a candidate may be
MIN_GAIN = 0.03  # accuracy per ms a candidate must gain over the baseline to replace it
WARMUP = 2  # untimed runs per candidate before the timed rounds
RULE = (
    f"best accuracy per ms among candidates at most {ACCURACY_TOLERANCE:g} below the "
    f"baseline's accuracy and at most {LATENCY_SLACK:.0%} slower; the baseline stays unless "
    f"the best beats its accuracy per ms by more than {MIN_GAIN:.0%}"
)


@dataclass(frozen=True)
class Candidate:
    """One set of channel counts: the roundings that give it, its cost and its worth."""

    multiples: tuple[int, ...]  # the multiple_of values that round the width to these sizes
    sizes: dict[str, int]
    flops: int | None = None
    accuracy: float | None = None  # measured, or FLOPs / full FLOPs
    latency_ms: float | None = None  # median at the search's batch size

    @property
    def score(self) -> float:
        """Accuracy per millisecond."""
        return self.accuracy / self.latency_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "multiples": list(self.multiples),
            "sizes": self.sizes,
            "flops": self.flops,
            "latency_ms": self.latency_ms,
            "accuracy": self.accuracy,
        }


def choose(candidates: Sequence[Candidate]) -> int:
    """Index of the candidate to export; ``candidates[0]`` is the baseline (module docstring).

    Example:
        >>> base = Candidate((8,), {"c": 8}, accuracy=0.90, latency_ms=10.0)
        >>> lossy = Candidate((32,), {"c": 4}, accuracy=0.80, latency_ms=5.0)
        >>> choose([base, lossy])  # twice as fast, but 10 points less accurate
        0
    """
    base = candidates[0]
    eligible = [
        i
        for i, c in enumerate(candidates)
        if c.accuracy >= base.accuracy - ACCURACY_TOLERANCE
        and c.latency_ms <= base.latency_ms * (1 + LATENCY_SLACK)
    ]
    best = max(eligible, key=lambda i: candidates[i].score)
    return best if candidates[best].score > base.score * (1 + MIN_GAIN) else 0


def candidate_sizes(
    inn: IntegralModel,
    width: float,
    multiple_of: int,
    multiples: Sequence[int],
    measured: bool = False,
) -> list[Candidate]:
    """The baseline (``multiple_of``'s rounding) first, then each other distinct rounding.

    ``measured``: accuracy will be measured on an evaluation set. Without one, a calibrated
    baseline competes only with calibrated counts (the FLOPs proxy cannot see calibration).

    Example:
        >>> # an INN whose counts at width 0.5 are already multiples of 8
        >>> [c.multiples for c in candidate_sizes(inn, 0.5, 1, (8, 16))]  # doctest: +SKIP
        [(1, 8), (16,)]
    """
    found: dict[str, Candidate] = {}
    for m in (multiple_of, *multiples):
        sizes = inn.sizes(width, m)
        key = inn.sizes_key(sizes)
        if key in found:
            old = found[key]
            if m not in old.multiples:
                found[key] = Candidate((*old.multiples, m), sizes)
        else:
            found[key] = Candidate((m,), sizes)
    out = list(found.values())
    if not measured and inn.sizes_key(out[0].sizes) in inn.tiers:
        out = [c for c in out if inn.sizes_key(c.sizes) in inn.tiers]
    return out


@dataclass(frozen=True)
class SearchResult:
    """The measured candidates of one tier and the index ``choose`` picked."""

    candidates: list[Candidate]
    chosen: int
    context: dict[str, Any]  # what the timings depend on: backend, device, batch, ...

    @property
    def sizes(self) -> dict[str, int]:
        return self.candidates[self.chosen].sizes

    def to_json(self) -> dict[str, Any]:
        """The ``channel_search`` entry of tier.json."""
        return {
            **self.context,
            "rule": RULE,
            "baseline": 0,
            "chosen": self.chosen,
            "candidates": [c.to_json() for c in self.candidates],
        }


def chosen_sizes(record: dict[str, Any]) -> dict[str, int]:
    """The channel counts a tier.json ``channel_search`` entry chose (no new measurement).

    Example:
        >>> chosen_sizes({"chosen": 1, "candidates": [{"sizes": {"c": 8}}, {"sizes": {"c": 16}}]})
        {'c': 16}
    """
    return dict(record["candidates"][record["chosen"]]["sizes"])


def search_context(config: ModelConfig, backend: Backend) -> dict[str, Any]:
    """What a search's outcome depends on besides the INN and the width: the search settings,
    the backend and device, threads, precision, batch, evaluation set and - for a sequence
    model - the length the candidates are timed at (``search_length``). Part of the tier's
    source hash, so a change re-runs the search.

    Example:
        >>> search_context(config, get_backend("onnxruntime"))["batch"]  # doctest: +SKIP
        8
    """
    search = config.channel_search
    context = {
        "multiples": list(search.multiples),
        "repeats": search.repeats,
        "batch": search.batch or config.max_batch,
        "backend": backend.name,
        "device": backend.device(),
        "threads": config.threads,
        "precision": config.precision,
        # the candidates' accuracy: the evaluation set, or null for the FLOPs proxy
        "evaluation": to_dict(config.evaluation) if config.evaluation else None,
    }
    length = search_length(config)
    if length is not None:  # absent for fixed shapes: their hashes from before still match
        context["length"] = length
    return context


def search_length(config: ModelConfig) -> int | None:
    """The sequence length candidates are timed at: the one TensorRT tunes its profile for
    (``sequence_profile[1]``, a profiled length); None for a model with fixed shapes.
    Not the shortest profiled length: a tier's cost at short lengths says little about
    its cost where most of the work is, and not a fixed 16, which may lie outside the
    profile (a TensorRT engine refuses it) or be a length never served.

    Example:
        >>> search_length(config)  # lengths [16, 64, 256]  # doctest: +SKIP
        64
    """
    profile = config.sequence_profile
    return None if profile is None else profile[1]


def search_channels(
    inn: IntegralModel,
    config: ModelConfig,
    width: float,
    backend: Backend,
    options: BuildOptions,
    accuracy: Callable[[Engine], float] | None = None,
    progress: bool = True,
    label: str = "",
    cache_dir: Path | None = None,
) -> SearchResult:
    """Measure every candidate rounding of ``width`` and choose one (module docstring).

    ``accuracy(engine)`` scores a candidate on the evaluation set; None: FLOPs / full FLOPs.
    ``cache_dir``: the model's engine cache (``<model>/engines``), whose files a backend
    keeps beside its engines (TensorRT's timing cache per GPU and version) the candidates'
    builds start from and add to; the candidates' engines themselves are temporary.

    Example:
        >>> result = search_channels(inn, config, 0.25, get_backend("onnxruntime"),
        ...                          BuildOptions(max_batch=8))  # doctest: +SKIP
        >>> result.sizes  # doctest: +SKIP
        {'blocks.0.conv1': 16, ...}
    """
    search = config.channel_search
    context = search_context(config, backend)
    cands = candidate_sizes(inn, width, config.multiple_of, search.multiples, bool(accuracy))
    if len(cands) == 1:  # every rounding gives the same counts: nothing to compare
        return SearchResult(cands, 0, context)
    full = None if accuracy else count_flops(inn.sample(1.0, config.method), _example(config))
    bar = tqdm(
        total=len(cands) + search.repeats,
        desc=f"channels {label}".strip(),
        disable=not progress,
        leave=False,
        unit="step",
    )
    engines: list[Engine] = []
    measured: list[Candidate] = []
    with tempfile.TemporaryDirectory(prefix="innfer-channels-") as tmp, bar:
        # One parent for every candidate's engine: a backend's shared files (TensorRT keeps
        # its timing cache in the engine directory's parent) serve them all - each
        # candidate in a directory of its own timed every kernel again - seeded from, and
        # given back to, the model's cache.
        shared = Path(tmp) / "engines"
        shared.mkdir()
        _copy_shared(cache_dir, shared)
        try:
            for i, cand in enumerate(cands):
                bar.set_postfix_str(f"build {i + 1}/{len(cands)}")
                engine, flops = _open_candidate(
                    inn, config, cand, backend, options, Path(tmp) / "tiers" / str(i),
                    shared / str(i),
                )  # fmt: skip
                engines.append(engine)
                score = accuracy(engine) if accuracy else flops / full
                measured.append(Candidate(cand.multiples, cand.sizes, flops, score))
                bar.update()
            bar.set_postfix_str("timing")
            # (a model with fixed shapes has no dynamic axis for the length to size)
            length = context.get("length", 1)
            feeds = random_feeds(config.inputs, context["batch"], length=length)
            medians = time_candidates(engines, feeds, search.repeats, on_round=bar.update)
        finally:
            for engine in engines:
                engine.close()
        _copy_shared(shared, cache_dir)
    timed = [
        Candidate(c.multiples, c.sizes, c.flops, c.accuracy, ms)
        for c, ms in zip(measured, medians, strict=True)
    ]
    return SearchResult(timed, choose(timed), context)


def _copy_shared(src: Path | None, dst: Path | None) -> None:
    """Copy the backend files kept beside engines (TensorRT's ``timing-*.cache``) from
    ``src`` to ``dst``, each written whole; a copy holding no more than the one already at
    ``dst`` is skipped (a timing cache only grows: another build's additions are kept)."""
    if src is None or dst is None or not src.is_dir():
        return
    for f in src.glob(TIMING_CACHES):
        there = dst / f.name
        if not there.is_file() or f.stat().st_size > there.stat().st_size:
            dst.mkdir(parents=True, exist_ok=True)
            write_bytes(there, f.read_bytes())


def _open_candidate(inn, config, cand: Candidate, backend, options, d: Path, engine: Path):
    """(engine, FLOPs) for one candidate: sampled (BatchNorm statistics re-estimated where
    the tier's would be: an accuracy-scored search ranked candidates on the full width's
    statistics resampled), exported to ``d``, built into ``engine`` and loaded like a
    tier."""
    module, _ = sample_tier(inn, config, cand.sizes, norm_inputs(config))
    flops = count_flops(module, _example(config))
    write_tier_files(d, module, config)
    backend.build(d / "model.onnx", engine, options)
    return backend.load(engine, options), flops


def _example(config: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Batch-1 zeros for each input: what FLOPs are counted on (as the build counts them)."""
    length = config.example_length
    return tuple(
        torch.zeros((1, *t.concrete(length)), dtype=getattr(torch, t.dtype)) for t in config.inputs
    )


def time_candidates(
    engines: Sequence[Engine],
    feeds: dict[str, np.ndarray],
    repeats: int,
    on_round: Callable[[], Any] | None = None,
) -> list[float]:
    """Median milliseconds per engine over ``repeats`` rounds, one timed run per engine per
    round, each round starting one engine later (no engine always runs after the same one).

    Example:
        >>> time_candidates([engine_a, engine_b], feeds, repeats=10)  # doctest: +SKIP
        [12.1, 9.8]
    """
    for engine in engines:
        for _ in range(WARMUP):
            engine.run(feeds)
    n = len(engines)
    times: list[list[float]] = [[] for _ in engines]
    for r in range(repeats):
        for i in [(r + k) % n for k in range(n)]:
            t0 = time.perf_counter()
            engines[i].run(feeds)
            times[i].append((time.perf_counter() - t0) * 1e3)
        if on_round is not None:
            on_round()
    return [float(np.median(t)) for t in times]
