"""A cluster run over time: per ``bin_s`` bins of arrival time, the offered and target load,
replicas (asked for, ready, costing), SLO attainment, accuracy, refusals, p95 latency (the
profile's ms) and tier mix. Ratios are None in a bin with nothing to divide by.

Example:
    >>> edges = np.array([0.0, 30.0, 60.0])
    >>> overlap(10.0, 45.0, edges).tolist()  # seconds of [10, 45) in each bin
    [20.0, 15.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from server.scheduling import TierInfo
from sim.cluster_result import Outcomes, ranked
from sim.cluster_trace import load_at
from sim.replica import Replica

if TYPE_CHECKING:
    from sim.cluster import ClusterConfig


def bin_edges(duration_s: float, bin_s: float) -> np.ndarray:
    """Bins of ``bin_s`` over [0, duration); the last one shorter if need be (never past
    the duration: a last edge beyond it divided the bin's counts by seconds not run).

    Example:
        >>> bin_edges(70.0, 30.0).tolist(), bin_edges(80.0, 30.0).tolist()
        ([0.0, 30.0, 60.0, 70.0], [0.0, 30.0, 60.0, 80.0])
    """
    n = max(math.ceil(duration_s / bin_s - 1e-9), 1)
    return np.minimum(np.arange(n + 1, dtype=float) * bin_s, float(duration_s))


def overlap(a: float, b: float, edges: np.ndarray) -> np.ndarray:
    """Length of [a, b) inside each bin [edges[i], edges[i + 1]); see the module's example."""
    return np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0, None)


def cluster_bins(
    out: Outcomes,
    replicas: Sequence[Replica],
    tiers: Sequence[TierInfo],
    capacity: float,
    cfg: ClusterConfig,
) -> dict:
    """Column -> one value per bin (lists, for JSON)."""
    edges = bin_edges(cfg.duration_s, cfg.bin_s)
    nb = len(edges) - 1
    width = np.diff(edges)
    idx = np.clip(np.searchsorted(edges, out.arrivals, side="right") - 1, 0, nb - 1)
    served = out.served
    count = np.bincount(idx, minlength=nb).astype(float)
    n_served = np.bincount(idx, weights=served, minlength=nb)
    names = ranked(tiers)
    acc = {t.name: t.accuracy for t in tiers}
    tier_code = np.array([names.index(t) if t is not None else -1 for t in out.tiers])
    accs = np.array([acc[t] if t is not None else 0.0 for t in out.tiers])
    alive, spec, ready = np.zeros(nb), np.zeros(nb), np.zeros(nb)
    for a, s, r in (rep.lifetimes(cfg.duration_s) for rep in replicas):
        alive += overlap(*a, edges)
        spec += overlap(*s, edges)
        ready += overlap(*r, edges)
    lat = out.latency_ms(cfg.time_scale)
    p95 = []
    for b in range(nb):
        v = lat[(idx == b) & served]
        p95.append(float(np.percentile(v, 95)) if len(v) else None)
    mix = {
        t: _ratio(np.bincount(idx, weights=tier_code == j, minlength=nb), n_served)
        for j, t in enumerate(names)
    }
    offered = count / width
    return {
        "t_s": edges[:-1].tolist(),
        "offered_per_s": offered.tolist(),
        "offered_load": (offered / capacity).tolist(),
        "target_load": load_at(cfg, edges[:-1] + width / 2).tolist(),
        "replicas_desired": (spec / width).tolist(),
        "replicas_ready": (ready / width).tolist(),
        "replicas_cost": (alive / width).tolist(),
        "slo_attainment": _ratio(np.bincount(idx, weights=out.met, minlength=nb), count),
        "mean_served_accuracy": _ratio(np.bincount(idx, weights=accs, minlength=nb), n_served),
        "refused_share": _ratio(count - n_served, count),
        "p95_latency_ms": p95,
        "tier_mix": mix,
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [float(x) if d > 0 else None for x, d in zip(num / np.maximum(den, 1), den, strict=True)]
