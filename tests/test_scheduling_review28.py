"""Review 28 findings on server/scheduling/policy.py (pure, on a scripted or virtual clock):
with budgets a few full batches long, the planner cut every batch to a row or two and fell
behind a load that plain full batches serve."""

from __future__ import annotations

import pytest

from server.scheduling import LatencyModel, Request, Snapshot, TierInfo
from server.scheduling.policy import Context, Planner
from sim.simulator import SimConfig, simulate

MS = 1e-3
# One tier, 1.0 / 2.0 ms median at 1 / 8 rows, p90 1.3x (log-normal sigma ~0.2): a GPU-like
# profile whose full batch costs only twice one row.
NOISY = [TierInfo("w025", 0.90, {1: 1.3, 8: 2.6}, {1: 1.0, 8: 2.0})]
EXACT = [TierInfo("w025", 0.90, {1: 1.0, 8: 2.0})]  # no spread


def test_the_head_of_line_bound_never_cuts_batches_below_what_keeps_up():
    ctx = Context(EXACT, LatencyModel(EXACT), max_batch=8)
    queue = [Request(k, 0.0, 0.010) for k in range(8)]
    # Tight budgets of 2.5 ms leave 1.5 ms per batch after one row: 4 rows (1.43 ms).
    quiet = Snapshot(tight_budget=0.0025, arrival_rate=100.0)
    assert len(Planner.largest_batch(queue, "w025", 0.0, ctx, quiet)[0]) == 4
    # At 3,000 rows/s one slot needs batches of 3,750 rows/s at 80 % utilisation: 6 rows
    # (6 / 1.71 ms = 3,500/s is short, 7 / 1.86 ms = 3,769/s keeps up).
    busy = Snapshot(tight_budget=0.0025, arrival_rate=3000.0)
    assert len(Planner.largest_batch(queue, "w025", 0.0, ctx, busy)[0]) == 7
    # Two slots share the load: 4 rows per batch keep up, the tight bound stands.
    assert len(Planner.largest_batch(queue, "w025", 0.0, ctx, busy, slots=2)[0]) == 4


def test_an_overloaded_queue_runs_the_batch_that_meets_the_most_deadlines_per_second():
    ctx = Context(NOISY, LatencyModel(NOISY), max_batch=8)
    # Nine requests due in 2.5 ms. At the 0.999 quantile (~1.9x the median) only 3 rows
    # meet it; 7 or 8 rows (1.9 / 2.0 ms median) meet it most of the time.
    queue = [Request(k, 0.0, 0.0025) for k in range(9)]
    d = Planner().throughput_fallback(queue, ["w025"], 0.0, ctx, Snapshot())
    largest = Planner.largest_batch(queue, "w025", 0.0, ctx, Snapshot())[0]
    assert len(largest) == 3 and d.rows >= 7
    # Nothing has a chance (every deadline passed): the head alone, as before.
    late = [Request(k, 0.0, 0.0005) for k in range(3)]
    d = Planner().throughput_fallback(late, ["w025"], 0.001, ctx, Snapshot())
    assert [r.id for r in d.requests] == [0]


@pytest.mark.parametrize(
    ("budget", "load", "least"), [((4.0, 8.0), 0.5, 0.98), ((3.0, 5.0), 0.5, 0.97)]
)
def test_tight_budgets_at_half_load_are_served_about_as_well_as_plain_full_batches(
    budget, load, least
):
    # Before: 61 % and 45 % within budget, against 99.6 % and 98.7 % for fixed:w025.
    p50 = {"w025": {1: 1.0, 8: 2.0}}
    # The planner against plain full batches on the whole budget: no transport margin
    # (1 ms of a 3-5 ms budget is a third of it; with it: 0.89 vs 0.94 for fixed:w025).
    cfg = SimConfig(policy="innfer", load=load, duration_s=2, budget_ms=budget, seed=0,
                    budget_margin_ms=0.0)  # fmt: skip
    innfer = simulate(NOISY, p50, cfg).summary["slo_attainment"]
    fixed = simulate(NOISY, p50, SimConfig(**{**cfg.__dict__, "policy": "fixed:w025"}))
    assert innfer >= least and innfer >= fixed.summary["slo_attainment"] - 0.01


def test_a_budget_below_the_profile_does_not_make_an_idle_scheduler_forget_a_slowdown():
    from server.scheduling import Refused, Scheduler, make_policy

    tiers = [
        TierInfo("w100", 0.99, {1: 4.0, 8: 16.0}, {1: 3.5, 8: 14.0}),
        TierInfo("w025", 0.90, {1: 1.2, 8: 3.0}, {1: 1.0, 8: 2.5}),
    ]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=8, max_queue=64)
    t = 0.0
    for i in range(30):  # the engine runs 2x its profile
        s.submit(Request(i, t, t + 1.0, pin="w025"), t)
        d = s.next(t)
        took = 2 * s.latency.typical(d.tier, d.rows)
        t += took
        s.complete(d, t, took)
    learned = s.latency.factor["w025"]
    assert learned == pytest.approx(2.0, rel=0.1)
    t += 3.0  # quiet: long enough to forget
    with pytest.raises(Refused):
        s.submit(Request(99, t, t + 0.0002), t)  # 0.2 ms: below even the profile's 1.0 ms
    assert s.latency.factor["w025"] == learned
    # A budget the profile meets but the slow estimate does not: the idle scheduler forgets
    # (after 3 s, a good part of the slowdown) and admits it.
    s.submit(Request(100, t, t + 0.0016), t)
    assert s.latency.factor["w025"] < 0.7 * learned


def test_a_fixed_policy_serves_its_tier_even_where_a_more_accurate_one_is_faster():
    # The planner's range ends above a dominated tier; the fixed policy took it too and
    # served w050 while it (and the autoscaler's nominal tier) said w025.
    from server.scheduling import Scheduler, make_policy, nominal_tier

    tiers = [
        TierInfo("w100", 0.90, {1: 8.0, 4: 25.0}),
        TierInfo("w050", 0.88, {1: 1.5, 4: 5.0}),
        TierInfo("w025", 0.80, {1: 3.0, 4: 9.0}),  # slower than w050 everywhere
    ]
    for name, served in (("fixed:w025", "w025"), ("innfer", "w100")):
        policy = make_policy(name, tiers)
        s = Scheduler(tiers, policy, max_batch=4, max_queue=16)
        for i in range(3):
            s.submit(Request(i, 0.0, 1.0), now=0.0)
        d = s.next(0.0)
        assert d.tier == served == nominal_tier(policy, tiers) and d.rows == 3
    planner = Scheduler(tiers, make_policy("innfer", tiers), max_batch=4, max_queue=16)
    assert planner.ctx.allowed(Request(9, 0.0, 1.0)) == ["w100", "w050"]  # still trimmed


def test_a_scheduler_refuses_a_max_batch_above_a_tiers_profile():
    # It was accepted; a 6-row request then failed deep in planning with a bare ValueError.
    from server.scheduling import Scheduler, make_policy

    tiers = [TierInfo("w100", 0.99, {1: 4.0, 8: 16.0}), TierInfo("w050", 0.97, {1: 2.0, 4: 6.0})]
    with pytest.raises(ValueError, match=r"max_batch 8 is above .* tier w050 \(to 4\)"):
        Scheduler(tiers, make_policy("innfer", tiers), max_batch=8, max_queue=64)
    Scheduler(tiers, make_policy("innfer", tiers), max_batch=4, max_queue=64)


def test_a_lone_first_request_is_no_load():
    # One arrival read as 1 / RATE_WARMUP_S (21 rows/s): the first request to a new server,
    # or to a text model's lane of long sentences, went to a small tier with 2 s to spare on
    # an idle device (MiniLM, 256 tokens: h050 or h050f025 instead of h100).
    from server.scheduling import Scheduler, make_policy

    tiers = [
        TierInfo("h100", 1.0, {1: 122.0, 8: 1791.0}, {1: 120.0, 8: 1038.0}),
        TierInfo("h050", 0.97, {1: 72.0, 8: 893.0}, {1: 56.0, 8: 805.0}),
    ]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=8, max_queue=64)
    s.submit(Request(0, 100.0, 102.0), 100.0)
    assert s.arrival_rate(100.0) == 0.0
    assert s.next(100.0).tier == "h100"
    # Eight at once are load from the first: 7 gaps' worth over the warm-up.
    burst = Scheduler(tiers, make_policy("innfer", tiers), max_batch=8, max_queue=64)
    for k in range(8):
        burst.submit(Request(k, 0.0, 2.0), 0.0)
    assert burst.arrival_rate(0.0) > 100


def test_step4_survives_a_profile_whose_planned_time_falls_with_rows():
    # A noisy profile (p90 / p50 per size) plans 2 rows at 150 ms and 4 at 6 ms; with a
    # shared device's hold of 6.5 ms, _largest took 4 rows past the 2-row prefix over the
    # hold, while the rates stopped at it: IndexError in every decision of that queue.
    t = TierInfo("w100", 0.99, {1: 2.0, 2: 8.0, 4: 2.2, 5: 2.3}, {1: 1.0, 2: 1.0, 4: 1.1, 5: 1.2})
    ctx = Context([t], LatencyModel([t]), max_batch=5)
    planned = ctx.latency.planned("w100")
    assert planned[2] > 0.0065 > planned[4]
    queue = [Request(k, 0.0, 0.003 if k == 4 else 0.0065) for k in range(12)]
    d = Planner().choose(queue, 0.0, ctx, Snapshot(hold=0.0065))
    assert d.tier == "w100" and d.rows >= 1


def test_a_saturated_core_runs_whole_batches_when_the_queue_cannot_be_saved():
    # w025 runs 8 rows in 8x one row's time; each batch costs the shared core 0.5 ms
    # beyond it (batch_host_s), so a grown batch is 7 rows. The head is due in 2 ms (one
    # row, 1.5 ms, meets it; two rows do not), the rest in 20 ms. Per batch, one row meets
    # the most deadlines per second (1 / 1.5 ms against 6 / 10.5 ms) - and a saturated
    # queue of tight heads run that way stays tight for good. While the core is nearly
    # full (grow_batches), step 4 runs the longest prefix that meets about the most
    # deadlines (here all 7 rows, 6 met); otherwise the met-rate choice.
    linear = [TierInfo("w025", 0.5, {1: 1.5, 8: 12.0})]
    ctx = Context(linear, LatencyModel(linear), max_batch=8)
    ctx.latency.batch_host_s = 0.0005
    queue = [Request(0, 0.0, 2 * MS)] + [Request(k, 0.0, 20 * MS) for k in range(1, 8)]
    full = Snapshot(grow_batches=True)
    calm = Planner().throughput_fallback(queue, ["w025"], 0.0, ctx, Snapshot())
    assert [r.id for r in calm.requests] == [0]
    whole = Planner().throughput_fallback(queue, ["w025"], 0.0, ctx, full)
    assert [r.id for r in whole.requests] == list(range(7))
    assert whole.saturated and not calm.saturated  # (innfer_saturated_batches_total)
    # Not past a shared device's hold (another model's deadline, 5 ms): 3 rows (4.5 ms).
    held = Snapshot(grow_batches=True, hold=5 * MS)
    assert Planner().throughput_fallback(queue, ["w025"], 0.0, ctx, held).rows == 3
    # The rest due in 9.5 ms: the whole batch (10.5 ms) would meet none; 6 rows (9 ms) meet
    # the 5 behind the head, the most any prefix meets.
    tight = [Request(0, 0.0, 2 * MS)] + [Request(k, 0.0, 9.5 * MS) for k in range(1, 8)]
    assert Planner().throughput_fallback(tight, ["w025"], 0.0, ctx, full).rows == 6
    assert Planner().choose(tight, 0.0, ctx, full).rows == 6  # (steps 2-3 save nothing)
    # Where even the best prefix likely misses (the head alone meets it half the time: a
    # 48 % chance at p90 / p50 = 1.33), the batch of 7 late answers is not run: the head.
    noisy = [TierInfo("w025", 0.5, {1: 2.0, 8: 16.0}, {1: 1.5, 8: 12.0})]
    ctx = Context(noisy, LatencyModel(noisy), max_batch=8)
    ctx.latency.batch_host_s = 0.0005
    hopeless = [Request(0, 0.0, 1.48 * MS)] + [Request(k, 0.0, 1.49 * MS) for k in range(1, 8)]
    assert Planner().throughput_fallback(hopeless, ["w025"], 0.0, ctx, full).rows == 1


def test_ten_clients_on_a_saturated_core_are_served_in_whole_batches():
    # Issue 18's ResNet w0.5 pinned to one core (its profile, ms; the request handling
    # measured live: 1.06 ms per request, 0.25 ms per batch), 10 closed-loop clients at
    # 30 ms - just past what 8 clients load. Batches of one kept the queue's heads tight
    # for good: 34-50 % within budget over 5 seeds (live 4.6 %); whole batches 84-85 %.
    from sim.shared_core import HostCost, simulate_shared

    p50 = {
        "w100": {1: 9.68, 2: 18.07, 4: 35.67, 8: 72.56},
        "w075": {1: 6.98, 2: 13.75, 4: 27.27, 8: 53.55},
        "w050": {1: 2.51, 2: 5.72, 4: 10.97, 8: 21.09},
        "w025": {1: 1.48, 2: 2.97, 4: 6.02, 8: 11.83},
    }
    sizes = {"w100": 1.0, "w075": 0.75, "w050": 0.5, "w025": 0.25}
    tiers = [TierInfo(t, sizes[t], {b: 1.1 * v for b, v in p.items()}) for t, p in p50.items()]
    host = HostCost(0.00066, 0.00040, client_s=0.001, batch_s=0.00025)
    r = simulate_shared(tiers, p50, host, lambda i: 0.030, clients=10, n_requests=1500,
                        max_seconds=30.0, max_batch=8, widths=sizes, seed=0)  # fmt: skip
    assert r.summary["rows_per_batch"] > 3.0
    assert r.summary["slo_attainment"] > 0.75, r.summary
