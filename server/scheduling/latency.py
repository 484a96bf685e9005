"""What the scheduler knows about the tiers: accuracy, and latency per batch size.

Latency starts from the build-time profile (p90 by default: the scheduler promises
deadlines, so it plans with a high quantile) and is corrected online: an exponentially
weighted moving average of observed/profiled compute time per tier. Contention on a shared
CPU or GPU shows up here within a few batches.

Example:
    >>> t = TierInfo("w100", accuracy=0.99, latency_ms={1: 2.0, 8: 6.0})
    >>> lat = LatencyModel([t])
    >>> lat.estimate("w100", 4)   # between profiled sizes: the next larger one
    0.006
    >>> lat.observe("w100", 8, 0.012); lat.estimate("w100", 8) > 0.006
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Weight of the newest observation in the online correction: about the last 1/0.2 = 5
# batches count, so contention shows in the plan within a few batches and one batch alone
# moves it by a fifth of its surprise.
EWMA_ALPHA = 0.2
# Observed/typical ratios are clipped to this range before they are averaged: a 20x slower
# batch is already "the machine is contended"; an outlier beyond it (a GC pause, a page
# fault storm) must not swing the plan by more.
RATIO_MIN, RATIO_MAX = 0.2, 20.0
# Seconds; guards the ratio against a zero typical time in a hand-written profile.
MIN_TYPICAL_S = 1e-9


@dataclass(frozen=True)
class TierInfo:
    """One tier: name, measured accuracy (or a proxy such as its width), the latency to
    plan with in milliseconds per batch size (a high quantile, p90), and optionally the
    typical (p50) latency that observed times are compared with."""

    name: str
    accuracy: float
    latency_ms: Mapping[int, float]
    typical_ms: Mapping[int, float] | None = None

    @property
    def max_batch(self) -> int:
        return max(self.latency_ms)


class LatencyModel:
    """Profile x online correction. Times in seconds."""

    def __init__(self, tiers: Sequence[TierInfo], alpha: float = EWMA_ALPHA) -> None:
        if not tiers:
            raise ValueError("at least one tier is needed")
        self.tiers = {t.name: t for t in tiers}
        self.alpha = alpha
        self.factor = {t.name: 1.0 for t in tiers}  # observed / profiled typical, EWMA
        self.spread = {t.name: 0.0 for t in tiers}  # EWMA of |ratio - factor|
        self._sizes = {t.name: sorted(t.latency_ms) for t in tiers}

    def profiled(self, tier: str, batch: int) -> float:
        sizes = self._sizes[tier]
        fit = next((b for b in sizes if b >= batch), None)
        if fit is None:
            raise ValueError(f"batch {batch} exceeds tier {tier}'s profiled maximum {sizes[-1]}")
        return self.tiers[tier].latency_ms[fit] / 1e3

    def estimate(self, tier: str, batch: int) -> float:
        """Planning latency (s): the profiled quantile scaled by the observed slowdown, plus
        the observed jitter - contention makes engine times both longer and less regular."""
        return self.profiled(tier, batch) * (self.factor[tier] + self.spread[tier])

    def typical(self, tier: str, batch: int) -> float:
        t = self.tiers[tier]
        if t.typical_ms is None:
            return self.profiled(tier, batch)
        fit = next(b for b in self._sizes[tier] if b >= batch)
        return t.typical_ms[fit] / 1e3

    def observe(self, tier: str, batch: int, seconds: float) -> None:
        # Compare with the typical time, not the planning quantile: on an uncontended
        # machine the factor stays ~1 and the plan keeps its p90 margin; under contention
        # both scale up together.
        ratio = seconds / max(self.typical(tier, batch), MIN_TYPICAL_S)
        ratio = min(max(ratio, RATIO_MIN), RATIO_MAX)
        self.spread[tier] += self.alpha * (abs(ratio - self.factor[tier]) - self.spread[tier])
        self.factor[tier] += self.alpha * (ratio - self.factor[tier])


def tiers_from_profile(profile: dict, records: Mapping) -> tuple[list[TierInfo], dict]:
    """(tiers with p90 planning latencies, p50 tables in ms) from a ``profile.json`` dict and
    the tiers' build records (anything with ``flops`` and ``accuracy``). A tier without a
    measured accuracy ranks by its FLOPs relative to the largest tier."""
    full = max(r.flops for r in records.values()) or 1
    tiers, p50 = [], {}
    for name, table in profile["tiers"].items():
        rec = records[name]
        acc = rec.accuracy if rec.accuracy is not None else rec.flops / full
        p50[name] = {int(b): v["p50_ms"] for b, v in table.items()}
        tiers.append(
            TierInfo(name, acc, {int(b): v["p90_ms"] for b, v in table.items()}, p50[name])
        )
    return tiers, p50
