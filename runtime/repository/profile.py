"""Latency profiles: how long each tier takes at each batch size. No torch.

``profile.json``::

    {"device": "cpu-x86_64", "backend": "onnxruntime", "backend_version": "1.31.1",
     "measured_at": "...", "warmup": 3, "repeats": 20,
     "tiers": {"w100": {"1": {"p50_ms": 1.9, "p90_ms": 2.1}, "2": {...}}, ...},
     "lengths": {"16": {"w100": {...}, ...}, "256": {...}}}   # sequence models only

``innfer build`` writes it (``profile_tiers``). ``Repository.load`` reads it back as a plain
dict (``ServedModel.profile``), re-measuring at load one that ``stale_tiers`` or
``measured_elsewhere`` says no longer times the engines it would serve; the server turns its
tables into the scheduler's latency model (``server.scheduling.latency.tiers_from_profile``).

Example:
    >>> stale_tiers({"onnx_sha256": {"w100": "a"}}, {"w100": "b"})
    ['w100']
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from runtime.engines import Backend, Engine
from runtime.repository.config import ModelConfig, TensorConfig
from runtime.utc import stamp


def random_feeds(
    inputs: Sequence[TensorConfig], batch: int, seed: int = 0, length: int = 16
) -> dict[str, np.ndarray]:
    """Batch-first random arrays matching each input's dtype and per-sample shape, dynamic
    (-1) axes at ``length``. Integers are 0 or 1: a valid token id, index and mask value
    alike (a mask of 9 would overflow a transformer's additive mask to inf)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in inputs:
        shape = (batch, *t.concrete(length))
        if t.dtype.startswith("float"):
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
        elif t.dtype == "bool":
            feeds[t.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[t.name] = rng.integers(0, 2, shape).astype(t.dtype)
    return feeds


def measure(
    engine: Engine,
    inputs: Sequence[TensorConfig],
    batch_sizes: Iterable[int],
    warmup: int = 3,
    repeats: int = 20,
    max_seconds: float = 5.0,
    length: int = 16,
) -> dict[str, dict[str, float]]:
    """Median and p90 latency (ms) per batch size, after ``warmup`` untimed runs; dynamic
    (sequence) axes at ``length``.

    ``max_seconds`` bounds the timed runs per batch size (at least 5 are kept), so a slow
    tier cannot stretch a build without limit.
    """
    out = {}
    for batch in batch_sizes:
        feeds = random_feeds(inputs, batch, length=length)
        for _ in range(warmup):
            engine.run(feeds)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < repeats and (
            len(times) < 5 or time.perf_counter() - start < max_seconds
        ):
            t0 = time.perf_counter()
            engine.run(feeds)
            times.append((time.perf_counter() - t0) * 1e3)
        out[str(batch)] = {
            "p50_ms": float(np.median(times)),
            "p90_ms": float(np.percentile(times, 90)),
            "runs": len(times),
        }
    return out


def profile_document(
    backend,
    threads: int,
    tiers: dict[str, Any],
    lengths: dict[int, dict] | None = None,
    onnx: Mapping[str, str] | None = None,
    spin: bool = True,
) -> dict[str, Any]:
    """The ``profile.json`` document for per-tier tables measured on ``backend``. A model
    with a sequence axis has one set of tables per profiled length (``lengths``: length ->
    tier -> table); ``tiers`` are then the tables at the longest length. ``onnx``: each
    tier's ONNX sha256, which the tables timed (a tier rebuilt since is not these times:
    ``stale_tiers``). ``spin``: whether ONNX Runtime's idle threads spun (recorded only
    where they did not: profiles from before the option are spinning ones).

    Example:
        >>> from runtime.engines import get_backend
        >>> doc = profile_document(get_backend("onnxruntime"), 1, {"w100": {}})
        >>> doc["backend"], sorted(doc["tiers"])
        ('onnxruntime', ['w100'])
    """
    return {
        "device": backend.device(),
        "backend": backend.name,
        "backend_version": backend.version(),
        "threads": threads,
        **({} if spin else {"spin": False}),
        "measured_at": stamp(),
        "tiers": tiers,
        **({"lengths": {str(n): t for n, t in lengths.items()}} if lengths else {}),
        **({"onnx_sha256": dict(onnx)} if onnx else {}),
    }


def profile_tiers(
    engines: Mapping[str, Engine],
    config: ModelConfig,
    backend: Backend,
    repeats: int = 20,
    max_seconds: float = 5.0,
    points: Callable[[list[tuple[str, int]]], Iterable[tuple[str, int]]] = iter,
    onnx: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``profile.json`` document for ``engines``: every tier at every batch size of
    ``config``, a sequence model at every profiled length too. ``points`` wraps the list of
    (tier, length) points measured, for a progress bar; ``onnx``: each tier's ONNX sha256
    (``profile_document``).

    Example:
        >>> doc = profile_tiers(served.engines, served.config, backend)  # doctest: +SKIP
        >>> sorted(doc["tiers"]["w100"])  # doctest: +SKIP
        ['1', '2', '3', '4', '5', '6', '7', '8']
    """
    lengths = config.sequence_lengths or (1,)
    tables: dict[int, dict] = {n: {} for n in lengths}
    for tier, n in points([(tier, n) for tier in engines for n in lengths]):
        tables[n][tier] = measure(
            engines[tier],
            config.inputs,
            config.batch_sizes,
            repeats=repeats,
            max_seconds=max_seconds,
            length=n,
        )
    by_length = tables if config.sequence_lengths else None
    return profile_document(
        backend, config.threads, tables[lengths[-1]], by_length, onnx, spin=config.spin
    )


# A less accurate tier counts as slower than a more accurate one beyond this margin and by
# at least this much (ms): server.scheduling.latency's SLOWER_MARGIN and SLOWER_MIN_MS, the
# rule its load-time warning uses (the policy imports no runtime and the library no server:
# tests/test_build.py keeps the two equal).
SLOWER_MARGIN = 0.05
SLOWER_MIN_MS = 0.05


def slower_tiers(tables: Mapping[str, Mapping], ranked: Sequence[str]) -> list[tuple]:
    """(tier, a more accurate tier, batch sizes) wherever a tier's p50 in ``tables``
    (profile.json's ``tiers``) is above a more accurate tier's by more than
    ``SLOWER_MARGIN`` and ``SLOWER_MIN_MS``, at the batch sizes both have; ``ranked``: the
    tiers, most accurate first.

    Example:
        >>> t = {"w100": {"1": {"p50_ms": 0.6}, "8": {"p50_ms": 0.65}},
        ...      "w075": {"1": {"p50_ms": 0.5}, "8": {"p50_ms": 0.83}}}
        >>> slower_tiers(t, ["w100", "w075"])
        [('w075', 'w100', [8])]
    """
    out = []
    for i, slow in enumerate(ranked):
        for fast in ranked[:i]:
            a, b = tables[slow], tables[fast]
            worse = sorted(
                int(n) for n in a if n in b and a[n]["p50_ms"] > max(
                    b[n]["p50_ms"] * (1 + SLOWER_MARGIN), b[n]["p50_ms"] + SLOWER_MIN_MS)
            )  # fmt: skip
            if worse:
                out.append((slow, fast, worse))
                break  # the most accurate tier it loses to is enough to name
    return out


MAX_MS = 3.6e6  # an hour: no batch takes longer, a larger figure is a typing slip


def profile_problem(profile: Mapping[str, Any]) -> str | None:
    """What is wrong with the tables of a ``profile.json`` that parsed, or None: every table
    (``tiers``, and each of ``lengths``) maps batch sizes ("1", "8", ...) to positive
    ``p50_ms`` and ``p90_ms`` under an hour (and ``p99_ms`` where given). A hand-edited value
    failed far from the file otherwise ("'int' object is not subscriptable").

    Example:
        >>> profile_problem({"tiers": {"w100": {"1": {"p50_ms": 1.0, "p90_ms": "fast"}}}})
        "tier w100, batch 1: p90_ms is 'fast', not a positive number of milliseconds below an hour"
    """
    tables = [("", profile.get("tiers"))]
    lengths = profile.get("lengths", {})
    if not isinstance(lengths, dict):
        return "lengths is not an object of sequence lengths"
    for n, t in lengths.items():
        if not _whole(n):
            return f"sequence length {n!r} is not a whole number >= 1"
        tables.append((f"length {n}, ", t))
    for where, tiers in tables:
        if not isinstance(tiers, dict) or not tiers:
            return f"{where}tiers is not an object of tiers"
        for tier, table in tiers.items():
            if not isinstance(table, dict) or not table:
                return f"{where}tier {tier}: not an object of batch sizes"
            for batch, cell in table.items():
                if not _whole(batch):
                    return f"{where}tier {tier}: batch size {batch!r} is not a whole number >= 1"
                if not isinstance(cell, dict):
                    return f"{where}tier {tier}, batch {batch}: not an object of p50_ms, p90_ms"
                for key in ("p50_ms", "p90_ms", "p99_ms"):
                    v = cell.get(key)
                    if v is None and key == "p99_ms":
                        continue
                    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                    if not (ok and math.isfinite(v) and 0 < v < MAX_MS):  # (1e300: a digit
                        return (f"{where}tier {tier}, batch {batch}: {key} is {v!r}, not a "
                                "positive number of milliseconds below an hour")  # fmt: skip
    return None


def _whole(key: Any) -> bool:
    """A JSON key that is a whole number >= 1 ("8"; not "²", which str.isdigit() also
    takes and int() refuses)."""
    return isinstance(key, str) and key.isascii() and key.isdigit() and int(key) >= 1


def stale_tiers(profile: Mapping[str, Any] | None, onnx: Mapping[str, str]) -> list[str]:
    """The tiers whose ONNX (``onnx``: tier -> sha256 now) is not the one ``profile`` timed:
    rebuilt since without profiling (``innfer build --no-profile``, or a build interrupted
    while profiling). A profile that records no hashes (hand-written, or older) is trusted.

    Example:
        >>> stale_tiers({"onnx_sha256": {"w100": "a", "w050": "b"}}, {"w100": "a", "w050": "c"})
        ['w050']
        >>> stale_tiers({"tiers": {}}, {"w100": "a"})
        []
    """
    timed = (profile or {}).get("onnx_sha256")
    if not isinstance(timed, dict):
        return []
    return [t for t, sha in onnx.items() if timed.get(t) != sha]


def uncovered(profile: Mapping[str, Any], max_batch: int, lengths: Sequence[int]) -> str | None:
    """What ``profile`` does not time that the model serves now, or None: a batch size up to
    ``max_batch`` (raised in model.yaml since the build) or a sequence length of
    ``lengths`` (changed since). The scheduler cannot plan a batch or length no table has.

    Example:
        >>> uncovered({"tiers": {"w100": {"1": {}, "8": {}}}}, 16, ())
        'profile.json times tier w100 up to batch 8, max_batch is 16'
        >>> uncovered({"tiers": {"w": {"8": {}}}, "lengths": {"16": {}}}, 8, (16, 32))
        'profile.json has no tables at sequence lengths 32'
    """
    tables = [("", profile.get("tiers", {}))]
    if lengths:
        timed = profile.get("lengths") or {}
        missing = [str(n) for n in lengths if str(n) not in timed]
        if missing:
            return f"profile.json has no tables at sequence lengths {', '.join(missing)}"
        tables += [(f" at length {n}", timed[str(n)]) for n in lengths]
    for at, by_tier in tables:
        for tier, table in by_tier.items():
            largest = max((int(b) for b in table), default=0)
            if largest < max_batch:
                return (f"profile.json times tier {tier}{at} up to batch {largest}, max_batch "
                        f"is {max_batch}")  # fmt: skip
    return None


def measured_elsewhere(
    profile: Mapping[str, Any] | None,
    backend: Backend,
    threads: int | None = None,
    spin: bool | None = None,
) -> str | None:
    """Why ``profile`` does not describe ``backend`` on this machine with ``threads`` intra-op
    threads per engine, or None when it does (or says nothing about where it was measured:
    a hand-written profile is trusted; nor about what it does not record).

    A profile holds the shape of latency over batch sizes, which the scheduler plans with: a
    CPU's batch of 8 costs ~8x one row, a GPU's little more than one. The load-time factor
    per tier can rescale a profile, not reshape it, so one from another backend or device is
    no profile at all for this one. Nor is one of another backend version (its engines are
    rebuilt: the cache key holds the version) or, on a CPU, another thread count
    (model.yaml's ``threads`` edited after the build: more threads speed large batches more
    than small ones) - ``innfer build`` and the demo re-profile for both already.

    Example:
        >>> from runtime.engines import get_backend
        >>> ort = get_backend("onnxruntime")
        >>> measured_elsewhere({"backend": "torch", "device": "NVIDIA H200"}, ort)
        'profile.json was measured with torch on NVIDIA H200'
        >>> measured_elsewhere({"tiers": {}}, ort) is None
        True
        >>> measured_elsewhere({"backend": "onnxruntime", "device": ort.device(), "threads": 1},
        ...                    ort, threads=2)
        'profile.json was measured with 1 intra-op threads per engine'
    """
    if not profile or "backend" not in profile or "device" not in profile:
        return None
    if (profile["backend"], profile["device"]) != (backend.name, backend.device()):
        return f"profile.json was measured with {profile['backend']} on {profile['device']}"
    version = profile.get("backend_version")
    if version is not None and version != backend.version():
        return f"profile.json was measured with {backend.name} {version}"
    timed = profile.get("threads")
    # (a GPU engine's speed does not depend on the CPU threads)
    if None not in (threads, timed) and timed != threads and "cpu" in backend.device():
        return f"profile.json was measured with {timed} intra-op threads per engine"
    # Spinning threads or sleeping ones: 1.1 vs 1.5 ms a run at 2 threads (model.yaml spin;
    # bench/spin.py).
    spun = profile.get("spin", True)
    if spin is not None and spun != spin and (threads or 1) > 1 and "cpu" in backend.device():
        return f"profile.json was measured with intra-op spinning {'on' if spun else 'off'}"
    return None
