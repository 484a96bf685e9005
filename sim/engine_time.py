"""The simulated engine: how long a batch takes, for ``simulate`` and ``simulate_cluster``.

A batch of ``rows`` on a tier runs as the next profiled batch size (``rows`` rounded up to
one in the profile) and takes that entry's p50 times a log-normal factor. The factor's
sigma puts the profiled p90 at its 90th percentile, p50 x exp(1.2816 sigma) = p90, unless
a fixed ``noise`` is given. The scheduler itself plans with the p90 and its own online
correction, exactly as in the server; only the engine is simulated.

Example:
    >>> tiers = [TierInfo("w100", 1.0, {1: 4.0, 8: 16.0}),
    ...          TierInfo("w050", 0.5, {1: 2.0, 8: 6.0})]
    >>> p50 = {"w100": {1: 3.5, 8: 14.0}, "w050": {1: 1.6, 8: 5.0}}
    >>> engine = EngineTime(tiers, p50, np.random.default_rng(0))
    >>> engine.typical_s("w100", 5)  # 5 rows run as the profiled batch of 8
    0.014
    >>> 0.0 < engine.draw_s("w100", 5) < 0.1
    True
    >>> round(full_capacity(tiers, p50, max_batch=8, slots=1))  # 8 rows per 14 ms
    571
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from server.scheduling import TierInfo

Z90 = 1.2816  # the standard normal's 90th percentile


def profiled_ms(table: Mapping, batch: int) -> float:
    """The entry of a latency table (ms per batch size) for the smallest profiled batch size
    that holds ``batch`` rows. Keys may be ints or, as read from JSON, strings.

    Example:
        >>> profiled_ms({"1": 2.0, "4": 3.0, "8": 6.0}, 3)
        3.0
    """
    sizes = sorted(int(b) for b in table)
    fit = next((b for b in sizes if b >= batch), None)
    if fit is None:
        raise ValueError(f"batch {batch} exceeds the profiled batch sizes {sizes}")
    return float(table[fit] if fit in table else table[str(fit)])


def full_capacity(tiers: Sequence[TierInfo], p50: Mapping, max_batch: int, slots: int) -> float:
    """Requests per second one server sustains on its most accurate tier at ``max_batch``,
    with ``slots`` batches in flight: the unit of offered load.

    Example:
        >>> t = [TierInfo("w100", 1.0, {1: 4.0, 8: 16.0})]
        >>> full_capacity(t, {"w100": {1: 3.5, 8: 16.0}}, max_batch=8, slots=2)
        1000.0
    """
    full = max(tiers, key=lambda t: t.accuracy).name
    return slots * max_batch / (profiled_ms(p50[full], max_batch) / 1e3)


class EngineTime:
    """Engine seconds per batch, drawn from ``rng`` (shared with the caller's other draws,
    so a run stays deterministic for its seed). ``p50`` holds the typical times (ms per
    batch size); each tier's ``latency_ms`` is its profiled p90."""

    def __init__(
        self,
        tiers: Sequence[TierInfo],
        p50: Mapping[str, Mapping],
        rng: np.random.Generator,
        noise: float | None = None,
    ) -> None:
        self.p90 = {t.name: t.latency_ms for t in tiers}
        self.p50 = p50
        self.rng = rng
        self.noise = noise

    def typical_s(self, tier: str, rows: int) -> float:
        """The profiled p50 in seconds."""
        return profiled_ms(self.p50[tier], rows) / 1e3

    def sigma(self, tier: str, rows: int) -> float:
        """The log-normal sigma: ``noise`` if given, else the one that puts the profiled p90
        at the 90th percentile (0 where the p90 is not above the p50)."""
        if self.noise is not None:
            return self.noise
        typical = self.typical_s(tier, rows)
        p90 = profiled_ms(self.p90[tier], rows) / 1e3
        return max(math.log(max(p90, typical) / typical) / Z90, 0.0)

    def draw_s(self, tier: str, rows: int) -> float:
        """One batch's engine seconds (one draw from ``rng``)."""
        return self.typical_s(tier, rows) * float(self.rng.lognormal(0, self.sigma(tier, rows)))


def scale_tiers(
    tiers: Sequence[TierInfo], p50: Mapping[str, Mapping], k: float
) -> tuple[list[TierInfo], dict]:
    """Tiers and p50 tables with every latency multiplied by ``k``: an engine k times slower.

    Example:
        >>> slow, p50 = scale_tiers([TierInfo("w100", 1.0, {8: 16.0})], {"w100": {8: 14.0}}, 10)
        >>> slow[0].latency_ms, p50
        ({8: 160.0}, {'w100': {8: 140.0}})
    """
    if k == 1:
        return list(tiers), {n: dict(v) for n, v in p50.items()}
    out = []
    for t in tiers:
        typical = None if t.typical_ms is None else {b: v * k for b, v in t.typical_ms.items()}
        out.append(
            TierInfo(t.name, t.accuracy, {b: v * k for b, v in t.latency_ms.items()}, typical)
        )
    return out, {n: {b: float(v) * k for b, v in table.items()} for n, table in p50.items()}
