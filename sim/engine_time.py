"""The simulated engine: how long a batch takes, for ``simulate`` and ``simulate_cluster``.

A batch of ``rows`` on a tier takes its p50 times a log-normal factor; p50, p90 (and p99
where profiled) at ``rows`` are interpolated linearly between the profiled batch sizes
(``server.scheduling.latency.interpolate``, the scheduler's own), and the factor's sigma is
the one the scheduler's latency model fits to them (``lognormal_sigma``: the profiled p90
at the 90th percentile, p50 x exp(1.2816 sigma) = p90), unless a fixed ``noise`` is given.
So the engine simulated here is the distribution the scheduler plans with, before its
online correction.

Example:
    >>> tiers = [TierInfo("w100", 1.0, {1: 4.0, 8: 16.0}),
    ...          TierInfo("w050", 0.5, {1: 2.0, 8: 6.0})]
    >>> p50 = {"w100": {1: 3.5, 8: 14.0}, "w050": {1: 1.6, 8: 5.0}}
    >>> engine = EngineTime(tiers, p50, np.random.default_rng(0))
    >>> engine.typical_s("w100", 5)  # 3.5 + (14 - 3.5) * 4 / 7 ms
    0.0095
    >>> 0.0 < engine.draw_s("w100", 5) < 0.1
    True
    >>> round(full_capacity(tiers, p50, max_batch=8, slots=1))  # 8 rows per 14 ms
    571
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from server.scheduling import TierInfo
from server.scheduling.latency import Z90, interpolate, lognormal_sigma

__all__ = ["Z90", "EngineTime", "full_capacity", "profiled_ms", "scale_tiers"]


def profiled_ms(table: Mapping, batch: int) -> float:
    """A latency table's value (ms per batch size) at ``batch`` rows, linear between the
    profiled sizes - the scheduler's ``interpolate``. Keys may be ints or, as read from JSON,
    strings.

    Example:
        >>> profiled_ms({"1": 2.0, "4": 3.0, "8": 6.0}, 3)
        2.6666666666666665
    """
    return interpolate(table, batch)


def full_capacity(
    tiers: Sequence[TierInfo],
    p50: Mapping,
    max_batch: int,
    slots: int,
    host_s: float = 0.0,
    batch_host_s: float = 0.0,
) -> float:
    """Requests per second one server sustains on its most accurate tier at ``max_batch``,
    with ``slots`` batches in flight: the unit of offered load. ``host_s``: CPU seconds of
    request handling per request on the same core (``innfer simulate --host-ms``), which
    serialises with the engine there: ``max_batch`` requests per batch time plus theirs,
    plus ``batch_host_s`` per batch (deciding, launching, settling it:
    ``--host-batch-ms``).

    Example:
        >>> t = [TierInfo("w100", 1.0, {1: 4.0, 8: 16.0})]
        >>> full_capacity(t, {"w100": {1: 3.5, 8: 16.0}}, max_batch=8, slots=2)
        1000.0
    """
    full = max(tiers, key=lambda t: t.accuracy).name
    batch_s = profiled_ms(p50[full], max_batch) / 1e3
    if host_s > 0 or batch_host_s > 0:  # one core: the batches and the handling take turns
        return max_batch / (batch_s + batch_host_s + max_batch * host_s)
    return slots * max_batch / batch_s


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
        self.p99 = {t.name: t.tail_ms for t in tiers}
        self.p50 = p50
        self.rng = rng
        self.noise = noise

    def typical_s(self, tier: str, rows: int) -> float:
        """The profiled p50 in seconds."""
        return profiled_ms(self.p50[tier], rows) / 1e3

    def sigma(self, tier: str, rows: int) -> float:
        """The log-normal sigma: ``noise`` if given, else the latency model's fit to the
        profiled p90 (and p99) at ``rows`` (0 where they are not above the p50)."""
        if self.noise is not None:
            return self.noise
        p99 = self.p99[tier]
        return lognormal_sigma(
            profiled_ms(self.p50[tier], rows),
            profiled_ms(self.p90[tier], rows),
            None if p99 is None else profiled_ms(p99, rows),
        )

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

    def times(table):
        return None if table is None else {b: v * k for b, v in table.items()}

    out = [
        TierInfo(t.name, t.accuracy, times(t.latency_ms), times(t.typical_ms), times(t.tail_ms))
        for t in tiers
    ]
    return out, {n: {b: float(v) * k for b, v in table.items()} for n, table in p50.items()}
