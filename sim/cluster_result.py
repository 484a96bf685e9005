"""What a cluster run produced: each request's outcome, the run's totals, and a markdown
table of totals to compare runs by. Per-bin series are in ``sim.cluster_bins``.

Latencies in the totals are divided by the run's ``time_scale``: the profile's ms.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from server.scheduling import TierInfo
from sim.replica import Replica

if TYPE_CHECKING:
    from sim.cluster import ClusterConfig


@dataclass
class Outcomes:
    """Per request of a trace: arrival, deadline, finish (nan where not served), tier and
    state, and the replica it was routed to (-1: none was ready).

    Example:
        >>> out = Outcomes.pending(np.array([0.0, 1.0]), np.array([0.1, 0.1]))
        >>> out.serve(1, 1.05, "w100"); out.states, out.met.tolist()
        (['queued', 'served'], [False, True])
    """

    arrivals: np.ndarray
    deadlines: np.ndarray
    finish: np.ndarray
    tiers: list[str | None]
    states: list[str]
    replica_of: np.ndarray

    @classmethod
    def pending(cls, arrivals: np.ndarray, budgets) -> Outcomes:
        """Every request queued, none routed yet."""
        n = len(arrivals)
        return cls(
            arrivals,
            arrivals + budgets,
            np.full(n, np.nan),
            [None] * n,
            ["queued"] * n,
            np.full(n, -1, dtype=np.int32),
        )

    def serve(self, rid: int, now: float, tier: str) -> None:
        self.finish[rid], self.tiers[rid], self.states[rid] = now, tier, "served"

    @property
    def served(self) -> np.ndarray:
        return ~np.isnan(self.finish)

    @property
    def met(self) -> np.ndarray:
        """Served by the deadline."""
        return self.served & (self.finish <= self.deadlines + 1e-12)

    def latency_ms(self, time_scale: float) -> np.ndarray:
        """Finish - arrival in the profile's ms (nan where not served)."""
        return (self.finish - self.arrivals) * 1e3 / time_scale


@dataclass
class ClusterResult:
    config: ClusterConfig
    totals: dict
    bins: dict  # column -> list, one entry per bin
    ticks: list[dict]  # one per HPA evaluation
    replicas: list[dict]
    arrivals: np.ndarray
    deadlines: np.ndarray
    finish: np.ndarray  # nan where not served
    tiers: list[str | None]
    states: list[str]
    replica_of: np.ndarray  # replica id per request, -1: none was ready

    def to_json(self) -> dict:
        return {
            "config": asdict(self.config),
            "totals": self.totals,
            "bins": self.bins,
            "ticks": self.ticks,
            "replicas": self.replicas,
        }


def ranked(tiers: Sequence[TierInfo]) -> list[str]:
    """Tier names, most accurate first."""
    return [t.name for t in sorted(tiers, key=lambda t: -t.accuracy)]


def cluster_totals(
    out: Outcomes,
    replicas: Sequence[Replica],
    ticks: Sequence[dict],
    tiers: Sequence[TierInfo],
    capacity: float,
    cfg: ClusterConfig,
) -> dict:
    """The run's totals: SLO attainment, accuracy, tier mix, latency, replica cost."""
    n = len(out.arrivals)
    served = out.served
    lat = out.latency_ms(cfg.time_scale)[served]
    acc = {t.name: t.accuracy for t in tiers}
    names = ranked(tiers)
    mix = Counter(t for t in out.tiers if t is not None)
    n_served = int(served.sum())
    alive = (r.lifetimes(cfg.duration_s)[0] for r in replicas)
    replica_s = sum(max(b - a, 0.0) for a, b in alive)
    refused = {k: v for k, v in Counter(out.states).items() if k != "served"}
    return {
        "requests": n,
        "served": n_served,
        "refused": n - n_served,
        "refused_by_kind": refused,
        "capacity_per_replica_per_s": capacity,
        "mean_offered_load": n / cfg.duration_s / capacity,
        "slo_attainment": float(out.met.sum() / n) if n else 1.0,
        "mean_served_accuracy": (
            float(np.mean([acc[t] for t in out.tiers if t is not None])) if n_served else None
        ),
        "degraded_share": 1 - mix.get(names[0], 0) / n_served if n_served else 0.0,
        "tier_mix": {t: mix.get(t, 0) / max(n_served, 1) for t in names},
        "p50_latency_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p95_latency_ms": float(np.percentile(lat, 95)) if len(lat) else None,
        "p99_latency_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "replica_seconds": float(replica_s),
        "mean_replicas": float(replica_s / cfg.duration_s),
        "max_replicas": peak_in_spec(replicas, cfg.duration_s),
        "scale_ups": sum(1 for t in ticks if t["desired"] > t["replicas"]),
        "scale_downs": sum(1 for t in ticks if t["desired"] < t["replicas"]),
        "replicas_started": len(replicas),
        "time_scale": cfg.time_scale,
    }


def peak_in_spec(replicas: Sequence[Replica], end: float) -> int:
    """The most pods in spec at once over [0, ``end``]: the replicas that ran, the starting
    ones included (the HPA's desired counts alone miss those it scales down from).

    Example:
        >>> from types import SimpleNamespace as Pod
        >>> pods = [Pod(lifetimes=lambda end, a=a, b=b: ((a, b), (a, b), (a, b)))
        ...         for a, b in ((0, 10), (0, 5), (5, 20))]  # one replaces one at 5 s
        >>> peak_in_spec(pods, 20.0)
        2
    """
    changes = []
    for r in replicas:
        start, stop = r.lifetimes(end)[1]
        if stop > start:
            changes += [(start, 1), (stop, -1)]
    peak = count = 0
    for _, delta in sorted(changes):  # at one instant, removals before additions
        count += delta
        peak = max(peak, count)
    return peak


def format_totals(rows: Mapping[str, dict]) -> str:
    """A markdown table of totals, one row per run.

    Example:
        >>> row = {"slo_attainment": 0.995, "mean_served_accuracy": 0.9, "degraded_share": 0.1,
        ...        "refused": 5, "requests": 1000, "p95_latency_ms": 80.0,
        ...        "replica_seconds": 3600.0, "mean_replicas": 2.5, "max_replicas": 4}
        >>> print(format_totals({"innfer": row}).splitlines()[-1])
        | innfer | 99.50% | 0.900 | 10.0% | 0.50% | 80 | 3600 | 2.50 / 4 |
    """
    head = (
        "| run | SLO attainment | mean served accuracy | degraded | refused | p95 ms "
        "| replica-s (cost) | mean / max replicas |"
    )
    lines = [head, "|" + " --- |" * 8]
    for name, t in rows.items():
        acc = t["mean_served_accuracy"]
        lines.append(
            f"| {name} | {t['slo_attainment']:.2%} | {'-' if acc is None else f'{acc:.3f}'} "
            f"| {t['degraded_share']:.1%} | {t['refused'] / max(t['requests'], 1):.2%} "
            f"| {t['p95_latency_ms'] or 0:.0f} | {t['replica_seconds']:.0f} "
            f"| {t['mean_replicas']:.2f} / {t['max_replicas']} |"
        )
    return "\n".join(lines)
