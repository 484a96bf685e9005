"""A model whose ``max_queue`` is small: the overload it turns away as "queue full" never
reaches the deadline checks, which is where the planner otherwise learns to shrink its
tiers. Before, the ResNet-like profile below with ``max_queue: 8`` at 2x its full tier's
capacity served w100 for half its batches and refused 40 % of the requests as full
(59.7 % within budget, simulated); with the queue unbounded, 99.95 %."""

from __future__ import annotations

import pytest

from server.scheduling import LatencyModel, Refused, Request, Scheduler, TierInfo, make_policy
from server.scheduling.policy import Context, Planner, Snapshot
from server.scheduling.scheduler import QUEUE_FULL_MEMORY_S
from sim.simulator import SimConfig, simulate

# The issue-18 ResNet's profile (ms per batch of 1 / 2 / 4 / 8 rows, ORT on one core).
P50 = {
    "w100": {1: 5.35, 2: 10.58, 4: 20.54, 8: 41.8},
    "w075": {1: 4.27, 2: 8.35, 4: 15.56, 8: 34.28},
    "w050": {1: 1.84, 2: 3.51, 4: 6.34, 8: 12.62},
    "w025": {1: 0.97, 2: 1.96, 4: 4.22, 8: 8.5},
}
TIERS = [
    TierInfo(name, acc, {b: ms * 1.02 for b, ms in P50[name].items()})
    for name, acc in (("w100", 1.0), ("w075", 0.59), ("w050", 0.28), ("w025", 0.085))
]


@pytest.mark.parametrize("max_queue", [8, 16])
def test_a_small_queue_at_twice_capacity_shrinks_the_tiers_rather_than_refusing(max_queue):
    cfg = SimConfig(load=2.0, duration_s=4.0, max_queue=max_queue, seed=0, policy="innfer")
    s = simulate(TIERS, P50, cfg).summary
    full = s["refused"].get("refused_full", 0)
    assert s["slo_attainment"] >= 0.99, s
    assert full <= 0.01 * s["requests"], s
    assert s["tier_mix"]["w100"] < 0.05, s  # (before: 50 % at max_queue 8)
    unbounded = simulate(TIERS, P50, SimConfig(load=2.0, duration_s=4.0, seed=0)).summary
    assert s["slo_attainment"] >= unbounded["slo_attainment"] - 0.005


def test_below_capacity_a_small_queue_keeps_the_full_tier():
    # At half the full tier's capacity nothing fills the queue: nothing changes.
    cfg = SimConfig(load=0.5, duration_s=4.0, max_queue=8, seed=0, policy="innfer")
    s = simulate(TIERS, P50, cfg).summary
    assert s["tier_mix"]["w100"] == 1.0 and s["slo_attainment"] == 1.0, s


def _scheduler(max_queue: int) -> Scheduler:
    return Scheduler(TIERS, make_policy("innfer", TIERS), max_batch=8, max_queue=max_queue)


def _fill(s: Scheduler, now: float, ids) -> int:
    """Submit requests due in 10 s until one is refused as full; how many were."""
    refused = 0
    for i in ids:
        try:
            s.submit(Request(i, now, now + 10.0), now)
        except Refused:
            refused += 1
    return refused


def _bound(s: Scheduler, now: float) -> bool:
    return s._snapshot(now, s.free_slot()).queue_bound


def test_two_full_queues_within_a_second_bind_the_planner_for_a_while():
    s = _scheduler(max_queue=2)
    assert _fill(s, 0.0, range(3)) == 1  # one arrival found it full: a lone burst
    assert not _bound(s, 0.1)
    assert _fill(s, 0.5, range(3, 4)) == 1  # a second within a second: overload
    assert _bound(s, 0.6)
    assert _bound(s, 0.5 + QUEUE_FULL_MEMORY_S - 0.01)
    assert not _bound(s, 0.5 + QUEUE_FULL_MEMORY_S + 0.01)


def test_two_full_queues_further_apart_do_not():
    s = _scheduler(max_queue=2)
    assert _fill(s, 0.0, range(3)) == 1
    assert _fill(s, 2.0, range(3, 4)) == 1
    assert not _bound(s, 2.1)


def test_keeping_up_is_judged_at_the_batch_the_queue_can_hold():
    # A tier that batches well: 8 rows in 4.4 ms, 4 in 4 ms. With max_queue 4 no batch
    # holds more than 4 rows: 1,000 rows/s, not 1,818.
    tiers = [TierInfo("w100", 1.0, {1: 1.0, 4: 4.0, 8: 4.4})]
    planner = Planner()
    snap = Snapshot(arrival_rate=1500.0, queue_bound=True)
    open_ctx = Context(tiers, LatencyModel(tiers), max_batch=8)
    small_ctx = Context(tiers, open_ctx.latency, max_batch=8, max_queue=4)
    assert small_ctx.full_batch == 4 and open_ctx.full_batch == 8
    assert planner.keeps_up("w100", open_ctx, snap)
    assert not planner.keeps_up("w100", small_ctx, snap)
    # ... and without the queue's bound, step 1's wide headroom (2x) keeps it
    assert planner.keeps_up("w100", small_ctx, Snapshot(arrival_rate=1500.0))
