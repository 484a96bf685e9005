"""Several lanes on one device, on a virtual clock: what ``simulate`` (one scheduler) cannot
show - a text model's length lanes sharing its ``max_queue``, or models sharing a device.

Each lane is a ``Scheduler`` of its own, all on one ``Device`` (one slot); lanes of one
model also share one ``Instances`` (its engine instances and its queue bound), as
``server.model_runtime`` builds a sequence model's lanes. A lane's engine runs the given
profile with every time scaled by its factor (a longer sequence, a bigger model), or its
own profile (``lane_p50``: a text model's lengths). Poisson arrivals at ``load`` x the
capacity of the lanes' mix on ``unit_tier`` (default the full tier; full batches, one
slot), split over the lanes evenly or by ``weights``; budgets uniform in ``budget_ms``,
planned 1 ms short (the server's default margin); each lane's batches start as soon as
its scheduler decides.

Example:
    >>> tiers = [TierInfo("w100", 1.0, {1: 4.0, 8: 16.0}), TierInfo("w050", 0.5, {1: 2.0, 8: 6.0})]
    >>> p50 = {"w100": {1: 3.5, 8: 14.0}, "w050": {1: 1.6, 8: 5.0}}
    >>> r = simulate_lanes(tiers, p50, {"short": 0.5, "long": 1.0}, max_queue=8, load=1.0)
    >>> 0.0 <= r.full_share <= 1.0 - r.attainment + 1e-9
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from server.scheduling import Refused, Request, Scheduler, TierInfo, make_policy
from server.scheduling.device import Device, Instances
from sim.engine_time import EngineTime
from sim.events import Events

MARGIN_S = 1e-3  # the server's default budget_margin_ms


@dataclass(frozen=True)
class LanesResult:
    requests: int
    attainment: float  # answered within budget, of every request
    full_share: float  # refused as queue full, of every request
    mean_size: float  # the served tiers' accuracy (a size proxy without an evaluation)


def simulate_lanes(
    tiers: Sequence[TierInfo],
    p50: Mapping[str, Mapping[int, float]],
    factors: Mapping[str, float],
    max_queue: int,
    load: float,
    same_model: bool = True,
    duration_s: float = 4.0,
    seed: int = 0,
    max_batch: int = 8,
    budget_ms: tuple[float, float] = (20.0, 100.0),
    weights: Mapping[str, float] | None = None,
    lane_p50: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None,
    unit_tier: str | None = None,
) -> LanesResult:
    """Run lanes ``factors`` (name -> time factor) of ``tiers`` / ``p50`` (ms per batch;
    ``tiers[0]`` the full tier) sharing one device slot - one model's (``same_model``: one
    queue bound of ``max_queue`` over them) or one model each (a queue of ``max_queue``
    each). A lane in ``lane_p50`` runs that profile instead of a scaled one; ``weights``
    split the arrivals (default evenly); ``load`` is in units of ``unit_tier``'s capacity
    over that mix (default ``tiers[0]``'s)."""
    rng = np.random.default_rng(seed)
    names = list(factors)
    share = np.array([(weights or {}).get(n, 1.0) for n in names], float)
    share /= share.sum()
    profiles = {}  # lane -> (its tiers, its p50 tables)
    for name, f in factors.items():
        if lane_p50 is not None and name in lane_p50:
            times = {t: dict(m) for t, m in lane_p50[name].items()}
            own = [replace(t, latency_ms={b: v * 1.02 for b, v in times[t.name].items()},
                           typical_ms=None, tail_ms=None) for t in tiers]  # fmt: skip
        else:
            times = {t: {b: v * f for b, v in m.items()} for t, m in p50.items()}
            own = [t.scaled(f) for t in tiers]
        profiles[name] = (own, times)
    unit = unit_tier or tiers[0].name
    per_row_ms = 0.0
    for name, w in zip(names, share, strict=True):
        table = profiles[name][1][unit]
        full = max(b for b in table if b <= max_batch)
        per_row_ms += w * table[full] / full
    rate = load / (per_row_ms / 1e3)
    arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * duration_s * 1.2) + 16))
    arrivals = arrivals[arrivals < duration_s]
    budgets = rng.uniform(budget_ms[0] / 1e3, budget_ms[1] / 1e3, len(arrivals))
    lane_of = rng.choice(names, len(arrivals), p=share)
    device, shared = Device(1), Instances(1)
    lanes, engines = {}, {}
    for name, (own, times) in profiles.items():
        lanes[name] = Scheduler(
            own, make_policy("innfer", own), max_batch=max_batch, max_queue=max_queue,
            device=device, instances=shared if same_model else Instances(1),
        )  # fmt: skip
        engines[name] = EngineTime(own, times, rng, None)
    accuracy = {t.name: t.accuracy for t in tiers}
    met = refused_full = 0
    sizes: list[float] = []
    running, i = Events(), 0
    while i < len(arrivals) or len(running):
        if running.next_time() <= (arrivals[i] if i < len(arrivals) else math.inf):
            now, (name, d, took) = running.pop()
            lanes[name].complete(d, now, took)
            met += sum(now <= r.arrival + budgets[r.id] for r in d.requests)  # the whole budget
            sizes += [accuracy[d.tier]] * len(d.requests)
        else:
            now, name = arrivals[i], str(lane_of[i])
            try:
                lanes[name].submit(Request(i, now, now + budgets[i] - MARGIN_S), now)
            except Refused as exc:
                refused_full += exc.state.name == "REFUSED_FULL"
            i += 1
        for s in lanes.values():
            s.expire(now)
        for name, s in lanes.items():
            while (d := s.next(now)) is not None:
                took = engines[name].draw_s(d.tier, d.rows)
                running.push(now + took, (name, d, took))
    n = len(arrivals)
    return LanesResult(n, float(met / n), refused_full / n, float(np.mean(sizes)) if sizes else 0.0)
