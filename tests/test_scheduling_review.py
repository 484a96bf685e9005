"""Review findings on server/scheduling/ (one test per fix; pure, on a scripted clock)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from server.scheduling import (
    LatencyModel,
    Refused,
    Request,
    Scheduler,
    Snapshot,
    TierInfo,
    make_policy,
)
from server.scheduling.device import Device, Instances
from server.scheduling.latency import Z90
from server.scheduling.policy import Context, Planner
from server.scheduling.request import IllegalTransition
from server.scheduling.scheduler import InvalidRequest

MS = 1e-3


# -- 1. the planner's other slots are the model's own lanes ------------------------------------
# w100 runs 9 ms at any batch size, w050 2-3 ms; no spread (hand-written profile).
LANE_TIERS = [TierInfo("w100", 0.99, {1: 9.0, 8: 9.0}), TierInfo("w050", 0.97, {1: 2.0, 8: 3.0})]


def _three_models(a_on_low_slot: bool):
    """A three-slot device: model A (two instances) runs a 9 ms batch of its own, model B (one
    instance) a batch with ~1.6 ms left; 16 requests due at 11.5 ms wait at A. Which slot
    numbers the two batches got is decided by a third model C, which runs first and leaves."""
    dev = Device(3)
    a, b, c = (
        Scheduler(LANE_TIERS, Planner(slots=n), max_batch=8, max_queue=64, device=dev,
                  instances=Instances(n))
        for n in (2, 1, 1)
    )  # fmt: skip
    if a_on_low_slot:  # C takes slot 0, so B lands on slot 1; C leaves before A starts
        c.submit(Request(100, -0.010, 1.0, pin="w100"), -0.010)
        dc = c.next(-0.010)
    b.submit(Request(200, -0.009, 1.0, pin="w100"), -0.009)
    db = b.next(-0.009)
    if a_on_low_slot:
        c.complete(dc, -0.0001, 0.0099)
    a.submit(Request(1, 0.0, 1.0, pin="w100"), 0.0)
    da = a.next(0.0)
    assert (da.slot < db.slot) == a_on_low_slot
    for k in range(16):
        a.submit(Request(10 + k, 0.0, 0.0115), 0.0)
    return dev, a, b


@pytest.mark.parametrize("a_on_low_slot", [False, True])
def test_the_planner_plans_its_queue_on_its_own_lanes_not_on_another_models_slot(a_on_low_slot):
    """A's second batch can start only when one of A's two instances frees: its running
    batch (9 ms) or the batch it starts now. B's batch ending in 1.6 ms frees a slot A has no
    instance for. Planned as if it did (slot numbers decided which batch counted), A ran 8 on
    w100 and the other 8 (w050 after 9 ms: 12 ms) missed 11.5 ms; planned on its own lanes,
    w050 now and w050 at 3 ms meets all 16, whatever the slot numbers."""
    dev, a, _ = _three_models(a_on_low_slot)
    d = a.next(0.0)
    assert (d.tier, d.rows) == ("w050", 8)
    # What A planned behind: its own running batch, not B's.
    assert dev.lanes(a, 0.0, skip=d.slot) == pytest.approx([9 * MS])


def test_a_lone_row_is_not_priced_when_one_of_its_lanes_is_idle():
    """Two of three slots idle, one running another model's batch: the model (two
    instances) has an idle lane besides the slot its decision takes, so a long single row is
    not priced (a tight arrival runs on that lane). Counted by running batches, the other
    model's batch read as "no spare slot"."""
    dev = Device(3)
    a = Scheduler(LANE_TIERS, Planner(slots=2), max_batch=8, max_queue=64, device=dev,
                  instances=Instances(2))  # fmt: skip
    b = Scheduler(LANE_TIERS, Planner(slots=1), max_batch=8, max_queue=64, device=dev,
                  instances=Instances(1))  # fmt: skip
    b.submit(Request(1, 0.0, 1.0, pin="w100"), 0.0)
    assert b.next(0.0).slot == 0
    assert a._snapshot(0.001, slot=1).busy == (0.0,)  # slot 2 is A's other lane, idle
    # The policy reads a listed idle lane as a spare one (as it reads an unlisted one).
    tiers = [
        TierInfo("w100", 1.0, {1: 11.2, 8: 90.0}),
        TierInfo("w025", 0.07, {1: 2.2, 8: 12.0}),
    ]
    ctx = Context(tiers, LatencyModel(tiers), max_batch=8)
    rng = np.random.default_rng(0)
    tight = rng.random(200) < 0.9
    budgets = np.sort(
        np.where(tight, rng.uniform(4.5e-3, 13.5e-3, 200), rng.uniform(17e-3, 90e-3, 200))
    )
    snap = Snapshot(arrival_rate=90.0, tight_budget=float(budgets[9]), budgets=budgets)
    r = Request(0, 0.0, 0.012)
    assert Planner().choose([r], 0.0, ctx, snap).tier == "w025"  # priced: turns away arrivals
    assert Planner(slots=2).choose([r], 0.0, ctx, replace(snap, busy=(0.0,))).tier == "w100"
    assert Planner(slots=2).choose([r], 0.0, ctx, replace(snap, busy=(0.005,))).tier == "w025"


# -- 2. forgetting an inflated estimate does not wait for the other models ---------------------
def test_an_inflated_estimate_is_forgotten_while_another_model_keeps_the_device_busy():
    """A's w025 learned 5x its profile in a burst of contention, then the engine is back to
    its profile. A's own batches are what would correct it, and a refusal means none runs:
    so the correction decays. That decay waited for the whole device to be idle, and a
    neighbour with a batch running at each of A's arrivals kept A refusing all 200 requests
    (10 s); it now waits only for A's own queue and batches - and applies to a refusal
    behind the neighbour's running batch too, not only to one on A's estimate alone."""
    tiers = [
        TierInfo("w100", 0.99, {1: 10.0}, {1: 9.0}),
        TierInfo("w025", 0.90, {1: 3.0}, {1: 2.7}),
    ]
    dev = Device(1)
    a, b = (
        Scheduler(tiers, make_policy("innfer", tiers), max_batch=1, max_queue=64, device=dev)
        for _ in "ab"
    )
    for _ in range(10):
        a.latency.observe("w025", 1, 0.0135)
    refused, ids = 0, iter(range(1, 10**6))
    for step in range(200):  # an A request every 50 ms, 10 ms budget
        now = 0.05 * step
        b.submit(Request(next(ids), now - 0.001, now + 1.0, pin="w025"), now - 0.001)
        bd = b.next(now - 0.001)  # B's batch runs while A's request arrives
        assert bd is not None
        try:
            a.submit(Request(next(ids), now, now + 0.010), now)
        except Refused:
            refused += 1
        b.complete(bd, now + 0.002, 0.003)
        d = a.next(now + 0.002)
        if d is not None:
            a.complete(d, now + 0.0047, 0.0027)
    assert refused <= 50  # the first two seconds (40: FORGET_AFTER_S, FORGET_TAU_S)
    assert a.latency.factor["w025"] < 1.5


# -- 4. "a full batch waits" counts rows ------------------------------------------------------
SPREAD_TIERS = [
    TierInfo("w100", 0.99, {1: 10.0, 8: 40.0}, {1: 8.0, 8: 32.0}),
    TierInfo("w050", 0.97, {1: 8.0, 8: 20.0}, {1: 5.0, 8: 10.0}),
]


def test_admission_switches_to_slo_target_once_a_full_batch_of_rows_waits():
    """Admission returns to ``slo_target`` once a full batch waits; it counted requests, so
    six 8-row requests (six full batches) still admitted at the median."""
    s = Scheduler(SPREAD_TIERS, make_policy("innfer", SPREAD_TIERS), max_batch=8, max_queue=64)
    one = Request(99, 0.0, 1.0)
    assert s.admission_quantile(joining=one) == 0.5
    s.submit(Request(1, 0.0, 1.0, rows=3), 0.0)
    s.submit(Request(2, 0.0, 1.0, rows=4), 0.0)
    assert s.admission_quantile() == 0.5  # 7 rows wait
    assert s.admission_quantile(joining=one) == s.slo_target  # with it, 8: a full batch
    s.cancel(s.queue[-1], 0.0)
    assert s.admission_quantile(joining=Request(98, 0.0, 1.0, rows=4)) == 0.5  # 3 + 4
    assert s.admission_quantile(joining=Request(97, 0.0, 1.0, rows=5)) == s.slo_target
    # Behind one queued 8-row request (ahead by priority) a 1-row request due in 40 ms is
    # met at the median (~10 + 5 ms on w050) but not at 0.999: refused (it was admitted).
    s = Scheduler(SPREAD_TIERS, make_policy("innfer", SPREAD_TIERS), max_batch=8, max_queue=64)
    s.submit(Request(1, 0.0, 1.0, rows=8, priority=1), 0.0)
    with pytest.raises(Refused):
        s.submit(Request(2, 0.0, 0.040), 0.0)


# -- 5. non-finite and non-positive inputs -----------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -0.004])
def test_a_batch_time_that_is_not_a_positive_finite_number_is_not_learned(bad):
    """One NaN observation made the level NaN for good: every estimate NaN, every deadline
    check False (a request pinned to the tier admitted whatever its budget)."""
    lat = LatencyModel(SPREAD_TIERS)
    before = lat.estimate("w100", 1)
    lat.observe("w100", 1, bad)
    assert lat.estimate("w100", 1) == before and lat.factor["w100"] == 1.0
    for _ in range(30):
        lat.observe("w100", 1, 0.004)  # half the profile's median: still learned
    assert lat.factor["w100"] == pytest.approx(0.5, rel=0.01)


@pytest.mark.parametrize(
    ("what", "bad"),
    [
        ("NaN deadline", Request(1, 0.0, float("nan"))),
        ("NaN grace", Request(1, 0.0, 0.05, grace=float("nan"))),
        ("0 rows", Request(1, 0.0, 0.05, rows=0)),
        ("-1 rows", Request(1, 0.0, 0.05, rows=-1)),
    ],
)
def test_a_request_with_a_nan_deadline_or_no_rows_is_invalid(what, bad):
    """A NaN deadline was admitted and broke the queue's deadline order (a later request
    due sooner queued behind it); a request of 0 or -1 rows was admitted and ran as a batch
    of 0 or -1 rows. Both are the caller's mistake: InvalidRequest (INVALID_ARGUMENT)."""
    s = Scheduler(SPREAD_TIERS, make_policy("innfer", SPREAD_TIERS), max_batch=8, max_queue=64)
    s.submit(Request(0, 0.0, 0.050), 0.0)
    with pytest.raises(InvalidRequest, match=r"NaN|rows"):
        s.submit(bad, 0.0)
    assert [r.id for r in s.queue] == [0]
    s.submit(Request(2, 0.0, 0.040), 0.0)
    assert [r.deadline for r in s.queue] == [0.040, 0.050]  # still in deadline order
    s.submit(Request(3, 0.0, float("inf")), 0.0)  # no deadline at all: still fine
    assert s.queue[-1].id == 3


# -- 6. completing a batch twice changes nothing ----------------------------------------------
def test_completing_a_batch_twice_raises_before_freeing_the_slot_or_learning_again():
    """A's batch completed twice, the second time after B's batch took the one slot: the
    second complete freed B's slot (and observed A's time again) before the requests'
    state machine raised, so A started a batch beside B's on a one-slot device."""
    dev = Device(1)
    a, b = (
        Scheduler(SPREAD_TIERS, make_policy("innfer", SPREAD_TIERS), max_batch=8, max_queue=64,
                  device=dev)
        for _ in "ab"
    )  # fmt: skip
    a.submit(Request(1, 0.0, 0.050), 0.0)
    d1 = a.next(0.0)
    a.complete(d1, 0.005, 0.005)
    seen = a.latency.tier_estimate(d1.tier).observed_batches
    b.submit(Request(2, 0.005, 0.055), 0.005)
    d2 = b.next(0.005)
    with pytest.raises(IllegalTransition, match="completed twice"):
        a.complete(d1, 0.006, 0.005)
    assert dev.running[0][1] is d2 and 0 in b.running
    assert a.latency.tier_estimate(d1.tier).observed_batches == seen
    a.submit(Request(3, 0.006, 0.056), 0.006)
    assert a.next(0.006) is None  # the slot is still B's
    b.complete(d2, 0.010, 0.004)
    # One scheduler: the stale decision must not free its own newer batch either.
    d3 = a.next(0.010)
    with pytest.raises(IllegalTransition):
        a.complete(d1, 0.011, 0.005)
    assert a.running[d3.slot][0] is d3 and dev.running[d3.slot][1] is d3
    with pytest.raises(IllegalTransition):  # nor a device release of a stale decision
        dev.release(d1)
    a.complete(d3, 0.012, 0.002)
    assert not dev.running and not a.running


# -- 7. min_tier ranks by the tiers' order as served (accuracy) ---------------------------------
def test_min_tier_allows_the_tier_and_the_more_accurate_ones_not_the_wider_ones():
    """What Request's docstring now says (it said "by width order"): a wider tier that
    measured less accurate (w100 0.951 < w050 0.953) ranks below, so min_tier="w050" does not
    allow it and min_tier="w100" allows w050 - the most accurate allowed tier, so it runs
    there. (Only the docstring changed: this pins the behaviour it now describes.)"""
    tiers = [
        TierInfo("w100", 0.951, {1: 8.0}),
        TierInfo("w050", 0.953, {1: 3.0}),
        TierInfo("w025", 0.90, {1: 1.0}),
    ]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=1, max_queue=8)
    assert s.ctx.allowed(Request(1, 0.0, 1.0, min_tier="w050")) == ["w050"]
    # w100, slower than the more accurate w050, is dominated: never the fallback (session 27)
    assert s.ctx.allowed(Request(2, 0.0, 1.0, min_tier="w100")) == ["w050"]
    s.submit(Request(3, 0.0, 0.010, min_tier="w100"), 0.0)
    assert s.next(0.0).tier == "w050"
    assert "accuracy" in Request.__doc__ and "width order" not in Request.__doc__


# -- 3. plans at slo_target are met as often as promised once online correction runs ---------
def _miss_rate(slo: float, sigma: float, n: int, seed: int) -> tuple[float, LatencyModel]:
    """A stationary engine whose profile is exactly right (p50 10 ms, log-normal sigma):
    the share of batches that ran longer than the estimate made just before them, after
    200 batches of warm-up."""
    rng = np.random.default_rng(seed)
    tier = TierInfo("w", 1.0, {1: 10.0 * math.exp(Z90 * sigma)}, {1: 10.0})
    lat = LatencyModel([tier], slo_target=slo)
    times = 0.010 * np.exp(sigma * rng.standard_normal(n))
    late = 0
    for i, t in enumerate(times.tolist()):
        if i >= 200:
            late += t > lat.estimate("w", 1)
        if i % 97 == 0:  # the median is the level's: the margin widens the tail only
            assert lat.quantile("w", 1, 0.5) == pytest.approx(0.010 * lat.factor["w"], rel=1e-12)
        lat.observe("w", 1, t)
    return late / (n - 200), lat


@pytest.mark.parametrize(("slo", "sigma"), [(0.999, 0.1), (0.999, 0.3), (0.99, 0.05)])
def test_online_plans_are_missed_about_as_often_as_slo_target_allows(slo, sigma):
    """Planned at median x exp(z sigma) with the noisy EWMA level (alpha 0.3) and noisy
    learned sigma (alpha 0.1) taken as exact, 0.999 plans were missed 5.6-5.9x as often as
    promised (0.0056-0.0059); with the planning spread widened for both noises, ~1.1-1.2x."""
    n = 60_000 if slo == 0.999 else 20_000
    rate, lat = _miss_rate(slo, sigma, n, seed=7)
    assert 0.5 * (1 - slo) <= rate <= 2 * (1 - slo), rate
    # The learned spread itself is the engine's (what engine_spread exports), not the margin.
    assert lat.sigma("w", 1) == pytest.approx(sigma, rel=0.5)
    assert lat.planning_sigma("w", 1) > 1.1 * lat.sigma("w", 1)


def test_the_planning_spread_is_the_profiles_before_any_batch_and_without_noise():
    """No batch yet: the profile's spread as is (an exact profile's p99.9 is met 0.1 % of the
    time). Deterministic batch times: no spread to widen, the estimate is the level."""
    lat = LatencyModel([TierInfo("w", 1.0, {1: 10.0 * math.exp(Z90 * 0.1)}, {1: 10.0})])
    assert lat.planning_sigma("w", 1) == lat.sigma("w", 1) == pytest.approx(0.1)
    assert lat.estimate("w", 1) == pytest.approx(0.010 * math.exp(lat.z * 0.1))
    flat = LatencyModel([TierInfo("w", 1.0, {1: 10.0})])
    for _ in range(50):
        flat.observe("w", 1, 0.004)
    assert flat.estimate("w", 1) == pytest.approx(flat.median("w", 1)) and flat.sigma("w", 1) == 0
