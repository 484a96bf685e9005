"""``slo_target``: tiers are chosen so that the predicted probability of missing a deadline
stays under 1 - slo_target (batch times log-normal per tier and batch size, from the
profile's p50 / p90). Accuracy is maximised subject to that: a lower target buys accuracy,
a higher one buys deadlines."""

from __future__ import annotations

import math

import pytest

from server.scheduling import (
    Context,
    LatencyModel,
    Planner,
    Refused,
    Request,
    Scheduler,
    Snapshot,
    TierInfo,
    make_policy,
)
from server.scheduling.latency import DEFAULT_SLO_TARGET
from sim.simulator import SimConfig, simulate

MS = 1e-3
# Noisy: p90 = 1.3 x p50 (sigma 0.205), so the 0.999 quantile is 1.88 x p50, the 0.9 one 1.3.
NOISY = [
    TierInfo("w100", 0.99, {1: 5.2, 8: 13.0}, {1: 4.0, 8: 10.0}),
    TierInfo("w050", 0.97, {1: 2.6, 8: 6.5}, {1: 2.0, 8: 5.0}),
]


def context(slo: float) -> Context:
    return Context(NOISY, LatencyModel(NOISY, slo_target=slo), max_batch=8)


def test_a_higher_slo_target_chooses_a_faster_tier():
    """8 rows due in 15 ms: w100 takes 13 ms at its 0.9 quantile but 18.8 ms at 0.999, so a
    0.9 target runs them on w100 and the default 0.999 on w050 (9.4 ms)."""
    queue = [Request(k, 0.0, 15 * MS) for k in range(8)]
    loose, strict = context(0.9), context(DEFAULT_SLO_TARGET)
    assert loose.latency.estimate("w100", 8) == pytest.approx(13 * MS)
    sigma = math.log(1.3) / 1.2816
    assert strict.latency.estimate("w100", 8) == pytest.approx(
        10 * MS * math.exp(3.0902 * sigma), rel=1e-4
    )
    assert Planner().choose(queue, 0.0, loose, Snapshot()).tier == "w100"
    assert Planner().choose(queue, 0.0, strict, Snapshot()).tier == "w050"
    assert (loose.slo_target, strict.slo_target) == (0.9, 0.999)


def test_admission_at_the_slo_target_refuses_what_it_cannot_promise():
    """One row pinned to w100 with 6 ms: the 0.9 quantile (5.2 ms) fits, the 0.999 one
    (7.5 ms) does not. With ``admit_quantile`` set to the target it is refused at once rather
    than answered late one time in a hundred; by default (the median, 4.6 ms) it is
    admitted whatever the target."""
    for slo, admit, admitted in ((0.9, 0.9, True), (0.999, 0.999, False), (0.999, None, True)):
        kw = {} if admit is None else {"admit_quantile": admit}
        sched = Scheduler(
            NOISY, make_policy("innfer", NOISY), max_batch=8, max_queue=8, slo_target=slo, **kw
        )
        assert sched.slo_target == sched.ctx.slo_target == slo
        r = Request(0, 0.0, 6 * MS, pin="w100")
        if admitted:
            sched.submit(r, now=0.0)
        else:
            with pytest.raises(Refused, match="below the fastest"):
                sched.submit(r, now=0.0)


def test_the_default_target_is_0_999():
    sched = Scheduler(NOISY, make_policy("innfer", NOISY), max_batch=8, max_queue=8)
    assert sched.slo_target == DEFAULT_SLO_TARGET == 0.999
    assert SimConfig().slo_target == 0.999


def test_in_simulation_the_target_trades_accuracy_for_deadlines():
    """The server's scheduler on a virtual clock, with engine times drawn from the same
    profile: at the full tier's capacity a 0.9 target serves more accurately and misses
    more; 0.999 meets (almost) every deadline."""
    p50 = {
        "w100": {1: 7.0, 2: 13.2, 4: 30.0, 8: 49.4},
        "w075": {1: 4.6, 2: 8.2, 4: 15.7, 8: 31.2},
        "w050": {1: 2.2, 2: 4.4, 4: 6.9, 8: 16.1},
        "w025": {1: 0.85, 2: 1.8, 4: 3.4, 8: 6.5},
    }
    acc = {"w100": 1.0, "w075": 0.575, "w050": 0.266, "w025": 0.075}
    tiers = [TierInfo(n, acc[n], {b: v * 1.3 for b, v in p50[n].items()}, p50[n]) for n in p50]
    runs = {
        slo: simulate(tiers, p50, SimConfig(load=1.0, duration_s=6, slo_target=slo, seed=1))
        for slo in (0.9, 0.999)
    }
    loose, strict = runs[0.9].summary, runs[0.999].summary
    assert loose["mean_served_accuracy"] > strict["mean_served_accuracy"] + 0.02
    assert strict["slo_attainment"] >= 0.999
    assert loose["slo_attainment"] <= strict["slo_attainment"]


def test_a_correction_learned_under_contention_is_forgotten_while_everything_is_refused():
    """Only batches correct a tier's estimate. A factor learned while the machine was busy
    (4x here) made every later request look impossible; with nothing admitted, nothing
    ran and the server refused for good. Refused on an idle device, the correction now
    decays towards the profile within seconds, and the requests are served again."""
    tiers = [TierInfo("w025", 0.9, {1: 2.0, 8: 14.0}, {1: 1.9, 8: 13.5})]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=8, max_queue=64)
    now = 0.0
    for _ in range(20):  # contention: every batch of one takes 4x its profile
        s.submit(Request(0, now, now + 1.0), now)
        d = s.next(now)
        now += 0.0076
        s.complete(d, now, 0.0076)
    assert s.latency.tier_estimate("w025").factor > 3
    refused_at = []
    for k in range(1, 200):  # then 4 ms budgets (2 ms at the profile), every 50 ms, idle
        now += 0.050
        try:
            s.submit(Request(k, now, now + 0.004), now)
        except Refused:
            refused_at.append(now)
            continue
        break
    else:
        raise AssertionError("still refusing after 10 s")
    assert refused_at and refused_at[-1] - refused_at[0] < 5.0  # seconds, not for good
    assert s.latency.tier_estimate("w025").factor < 2
