"""The pure scheduler (server/scheduling) on a scripted clock with a fake engine.

No threads, no sleeps, no randomness outside hypothesis: time is a float the tests advance,
and a batch's compute time is the scheduler's own latency estimate (optionally scaled), so
every run is reproducible. ``drive`` is a small event-driven simulator: arrivals at given
times; at every event completions are reported first, then arrivals are submitted, then
``expire(now)`` runs, then every free slot is filled with ``next(now)``.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import FrozenInstanceError, dataclass, field, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server.scheduling import (
    Context,
    Decision,
    FixedTier,
    IllegalTransition,
    LatencyModel,
    Planner,
    Policy,
    Refused,
    Request,
    Scheduler,
    SlackFit,
    Snapshot,
    State,
    TierInfo,
    make_policy,
)
from server.scheduling.request import TRANSITIONS

MS = 1e-3

TIERS = [
    TierInfo("w100", 0.99, {1: 4.0, 2: 6.0, 4: 10.0, 8: 18.0}),
    TierInfo("w075", 0.985, {1: 3.0, 2: 4.5, 4: 7.5, 8: 13.5}),
    TierInfo("w050", 0.97, {1: 2.0, 2: 3.0, 4: 5.0, 8: 9.0}),
    TierInfo("w025", 0.93, {1: 1.0, 2: 1.5, 4: 2.5, 8: 4.5}),
]
NAMES = [t.name for t in TIERS]  # most accurate first
ACCURACY = {t.name: t.accuracy for t in TIERS}
FULL = "w100"
POLICY_NAMES = ["innfer", "slackfit", "fixed:w100", "fixed:w050", "fixed:w025"]


def make(policy: str = "innfer", *, slots: int = 1, max_batch: int = 8, max_queue: int = 256):
    return Scheduler(
        TIERS,
        make_policy(policy, TIERS, slots),
        max_batch=max_batch,
        max_queue=max_queue,
        slots=slots,
    )


# -- the driver ------------------------------------------------------------------------------
@dataclass
class Arrival:
    t: float
    budget: float
    rows: int = 1
    pin: str | None = None
    min_tier: str | None = None
    priority: int = 0


@dataclass
class Run:
    requests: list[Request] = field(default_factory=list)  # every submitted request, by id
    refused: dict[int, State] = field(default_factory=dict)  # id -> Refused.state at submit
    decisions: list[tuple[float, Decision, float]] = field(default_factory=list)  # start, d, end
    expired: list[Request] = field(default_factory=list)  # everything expire() returned
    idle: int = 0  # next() returned None although a slot was free and the queue was not empty
    max_queue_len: int = 0

    def served(self) -> list[Request]:
        return [r for r in self.requests if r.state == State.SERVED]

    def on_time(self) -> list[Request]:
        return [r for r in self.served() if r.finished <= r.deadline]


def exact(sched: Scheduler, d: Decision, now: float) -> float:
    """The fake engine: exactly what the scheduler estimates."""
    return sched.latency.estimate(d.tier, d.rows)


def drive(
    sched: Scheduler,
    arrivals: Sequence[Arrival],
    compute: Callable[[Scheduler, Decision, float], float] = exact,
    rng: random.Random | None = None,
) -> Run:
    """Run ``arrivals`` through ``sched`` until nothing is queued or running."""
    run = Run()
    pending = sorted(enumerate(arrivals), key=lambda ia: (ia[1].t, ia[0]))
    running: list[tuple[float, Decision, float]] = []  # (end, decision, compute seconds)
    i, now = 0, 0.0
    for _step in range(100_000):
        times = [e for e, _, _ in running]
        if i < len(pending):
            times.append(pending[i][1].t)
        if not times:
            if not sched.queue:
                return run
            # Nothing will happen by itself: the policy left every slot idle with work
            # queued. Jump to the earliest deadline so that expire() makes progress.
            times.append(min(r.deadline for r in sched.queue))
        now = max(now, min(times))
        done = [x for x in running if x[0] <= now]
        if rng is not None:
            rng.shuffle(done)  # any completion order among simultaneous ends
        for x in done:
            running.remove(x)
            sched.complete(x[1], now, x[2])
        while i < len(pending) and pending[i][1].t <= now:
            a = pending[i][1]
            r = Request(
                len(run.requests),
                arrival=now,
                deadline=now + a.budget,
                rows=a.rows,
                pin=a.pin,
                min_tier=a.min_tier,
                priority=a.priority,
            )
            run.requests.append(r)
            try:
                sched.submit(r, now)
            except Refused as exc:
                run.refused[r.id] = exc.state
            run.max_queue_len = max(run.max_queue_len, len(sched.queue))
            i += 1
        for r in sched.expire(now):
            run.expired.append(r)
            if r.state == State.REFUSED_FULL:  # a request of higher priority took its place
                assert r.finished == now and max(q.priority for q in sched.queue) > r.priority
                continue
            # Expired exactly when even the fastest allowed tier could no longer make it.
            fastest = sched.latency.estimate(sched.ctx.fastest(r), r.rows)
            assert r.finished == now and now + fastest > r.deadline
        while sched.free_slot() is not None and sched.queue:
            d = sched.next(now)
            if d is None:
                run.idle += 1
                break
            c = compute(sched, d, now)
            running.append((now + c, d, c))
            run.decisions.append((now, d, now + c))
    raise AssertionError("the driver did not finish")


def check_invariants(run: Run, sched: Scheduler) -> None:
    """What must hold after any run, whatever the policy, load or engine timing."""
    ctx = sched.ctx
    assert not sched.queue and not sched.running
    in_decisions = Counter(id(r) for _, d, _ in run.decisions for r in d.requests)
    assert all(n == 1 for n in in_decisions.values()), "a request ran in two decisions"
    for _, d, _ in run.decisions:
        assert d.requests, "an empty decision was started"
        assert d.rows <= ctx.max_batch
        for r in d.requests:
            assert d.tier in ctx.allowed(r), (d.tier, r.pin, r.min_tier)
    expired = Counter(id(r) for r in run.expired)
    assert all(n == 1 for n in expired.values()), "a request expired twice"
    for r in run.requests:
        if r.id in run.refused:
            assert run.refused[r.id] in (State.REFUSED_FULL, State.REFUSED_DEADLINE)
            assert r.state == State.QUEUED and r.finished is None  # never entered
            assert id(r) not in in_decisions and id(r) not in expired
            continue
        assert r.state.final, (r.id, r.state)
        assert r.state in (State.SERVED, State.REFUSED_DEADLINE, State.REFUSED_FULL)
        if r.state == State.SERVED:
            assert in_decisions[id(r)] == 1 and id(r) not in expired
            (start, d, end) = next(x for x in run.decisions if r in x[1].requests)
            assert (r.tier, r.started, r.finished, r.batch_size) == (d.tier, start, end, d.rows)
        else:
            assert expired[id(r)] == 1 and id(r) not in in_decisions


def tiers_of(run: Run) -> list[str]:
    return [d.tier for _, d, _ in run.decisions]


# -- 1. light load ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["innfer", "slackfit"])
@pytest.mark.parametrize("slots", [1, 2])
def test_light_load_serves_everything_on_the_full_tier(policy, slots):
    sched = make(policy, slots=slots)
    arrivals = [Arrival(0.1 * k, 0.050, rows=1 + k % 8) for k in range(20)]
    run = drive(sched, arrivals)
    check_invariants(run, sched)
    assert not run.refused and not run.expired and run.idle == 0
    assert len(run.on_time()) == 20
    assert set(tiers_of(run)) == {FULL}
    assert [len(d.requests) for _, d, _ in run.decisions] == [1] * 20


# -- 2. burst, degradation, recovery ---------------------------------------------------------
def burst(slots: int) -> list[Arrival]:
    """40 one-row requests per slot at once, 60 ms each: 90 ms of w100 work per slot."""
    return [Arrival(0.0, 0.060) for _ in range(40 * slots)]


AFTER = [Arrival(0.3 + 0.1 * k, 0.050, rows=2) for k in range(5)]


@pytest.mark.parametrize("slots", [1, 2])
def test_burst_degrades_meets_deadlines_and_recovers(slots):
    sched = make("innfer", slots=slots)
    run = drive(sched, burst(slots) + AFTER)
    check_invariants(run, sched)
    assert not run.refused and not run.expired
    n = 40 * slots
    during, after = run.requests[:n], run.requests[n:]
    assert all(r.state == State.SERVED and r.finished <= r.deadline for r in run.requests)
    assert any(r.tier != FULL for r in during), "the burst must degrade"
    assert {r.tier for r in after} == {FULL}, "after the burst the full tier comes back"


@pytest.mark.parametrize("slots", [1, 2])
def test_burst_on_the_full_tier_alone_misses(slots):
    """The control for the test above: refusing to degrade loses requests."""
    sched = make("fixed:w100", slots=slots)
    run = drive(sched, burst(slots))
    check_invariants(run, sched)
    assert len(run.on_time()) < 40 * slots


# -- 3. admission: impossible budgets --------------------------------------------------------
def test_budget_below_the_fastest_tier_is_refused():
    sched = make()
    r = Request(1, arrival=0.0, deadline=0.5 * MS)  # w025 needs 1 ms
    with pytest.raises(Refused) as exc:
        sched.submit(r, now=0.0)
    assert exc.value.state == State.REFUSED_DEADLINE
    assert "fastest" in str(exc.value)
    assert not sched.queue and r.state == State.QUEUED and r.finished is None
    # Exactly the fastest tier's latency is enough.
    sched.submit(Request(2, arrival=0.0, deadline=1 * MS), now=0.0)
    assert len(sched.queue) == 1


@pytest.mark.parametrize(
    ("constraint", "needs_ms"), [({"pin": "w100"}, 4.0), ({"min_tier": "w075"}, 3.0)]
)
def test_budget_is_measured_on_the_fastest_tier_the_request_allows(constraint, needs_ms):
    sched = make()
    with pytest.raises(Refused) as exc:
        sched.submit(Request(1, 0.0, (needs_ms - 0.1) * MS, **constraint), now=0.0)
    assert exc.value.state == State.REFUSED_DEADLINE
    sched.submit(Request(2, 0.0, needs_ms * MS, **constraint), now=0.0)


def test_budget_counts_from_now_not_from_arrival():
    sched = make()
    with pytest.raises(Refused):
        sched.submit(Request(1, arrival=0.0, deadline=0.0105), now=0.010)
    sched.submit(Request(2, arrival=0.0, deadline=0.0110), now=0.010)


def test_deadline_impossible_behind_the_queue_is_refused():
    sched = make()
    # Eight full batches with one deadline: 8 x 4.5 ms = 36 ms on w025, so each fits.
    for k in range(8):
        sched.submit(Request(k, arrival=0.0, deadline=0.0365, rows=8), now=0.0)
    late = Request(8, arrival=0.0, deadline=0.0365)  # alone: 1 ms; behind the queue: 37 ms
    with pytest.raises(Refused) as exc:
        sched.submit(late, now=0.0)
    assert exc.value.state == State.REFUSED_DEADLINE
    assert "queued" in str(exc.value)
    assert len(sched.queue) == 8 and late not in sched.queue
    # An earlier deadline goes to the head of the queue, so the same request fits ...
    sched.submit(Request(9, arrival=0.0, deadline=0.0100), now=0.0)
    # ... and so does a more urgent one, which jumps the queue.
    sched.submit(Request(10, arrival=0.0, deadline=0.0365, priority=1), now=0.0)
    assert [r.id for r in sched.queue[:2]] == [10, 9]


def test_running_batch_counts_for_admission():
    sched = make(slots=1)
    sched.submit(Request(0, arrival=0.0, deadline=1.0, rows=8), now=0.0)
    d = sched.next(0.0)
    assert (d.tier, d.rows) == (FULL, 8)  # busy until 18 ms
    with pytest.raises(Refused) as exc:
        sched.submit(Request(1, arrival=0.001, deadline=0.011), now=0.001)
    assert exc.value.state == State.REFUSED_DEADLINE
    sched.submit(Request(2, arrival=0.001, deadline=0.020), now=0.001)  # 18 + 1 ms fits
    # A second slot is free now, so the same tight request fits there.
    two = make(slots=2)
    two.submit(Request(0, arrival=0.0, deadline=1.0, rows=8), now=0.0)
    two.next(0.0)
    two.submit(Request(1, arrival=0.001, deadline=0.011), now=0.001)


def test_admission_finish_is_the_new_requests_own_group():
    """Admission estimates when *the new request* finishes; a pinned request queued ahead
    that runs after it (in its own, later group) does not delay it."""
    sched = make(slots=1)
    sched.submit(Request(0, arrival=0.0, deadline=1.0, min_tier="w100", priority=1), now=0.0)
    sched.submit(Request(1, arrival=0.0, deadline=1.0, pin="w025", rows=8, priority=1), now=0.0)
    # Fastest-tier plan: [0, 2] on w100 (2 rows, 6 ms), then [1] on w025 (4.5 ms).
    r = Request(2, arrival=0.0, deadline=0.008)
    sched.submit(r, now=0.0)
    assert r in sched.queue


def test_admission_counts_no_join_that_makes_the_batch_miss_its_own_deadline():
    # A (3 rows, 7.5 ms; 7 ms alone) queued; B (1 row, 9 ms) was admitted as if it joined A's
    # batch (4 rows: 8 ms) - a batch the planner never runs, A being due at 7.5 - and was
    # refused 4 ms later; after A alone (7 ms) B's own batch ends at 12 ms: no plan serves
    # both, so B is refused at arrival (review helper-264).
    tiers = [TierInfo("t", 0.9, {1: 5.0, 4: 8.0})]
    sched = Scheduler(tiers, make_policy("innfer", tiers), max_batch=4, max_queue=64)
    sched.submit(Request(1, 0.0, 0.0075, rows=3), 0.0)
    late = Request(2, 0.0, 0.0090)
    assert sched.finish_if_admitted(late, 0.0, q=0.5) == pytest.approx(0.012)
    with pytest.raises(Refused, match="cannot be met behind the 1 request queued ahead"):
        sched.submit(late, 0.0)
    fits = Request(3, 0.0, 0.0085)  # A's own deadline 8.5 ms: the batch of 4 serves both
    sched.queue[0].deadline = 0.0085
    sched._cols.drop()
    assert sched.finish_if_admitted(fits, 0.0, q=0.5) == pytest.approx(0.008)


def test_a_request_within_its_grace_is_planned_to_its_deadline_plus_the_grace():
    # Expiry keeps a request that misses its planning deadline but not deadline + grace
    # (plan_overhead); the planner counted it lost: a low-priority request ran first and
    # the urgent one was refused when its grace ran out too, and one such request sent
    # every other plan to the fastest tier (review helper-264). One tier, 0.5 ms a row.
    tiers = [TierInfo("t", 0.9, {1: 0.5, 2: 0.75})]
    sched = Scheduler(tiers, make_policy("innfer", tiers), max_batch=1, max_queue=64)
    urgent = Request(1, 0.0, 0.0003, priority=2, grace=0.0006, reserve=0.001)  # by 0.9
    due = urgent.due  # the client's: it judges the answer met or late, and stays
    sched.submit(urgent, 0.0)
    sched.submit(Request(2, 0.0, math.inf), 0.0)
    assert sched.expire(0.0) == []
    assert (urgent.deadline, urgent.grace) == (pytest.approx(0.0009), 0.0)
    assert urgent.due == pytest.approx(due)
    assert [r.id for r in sched.next(0.0).requests] == [1]
    # the rest of the queue keeps its plan: A on the accurate tier, B (graced) after it
    tiers = [TierInfo("w100", 0.99, {1: 10.0}), TierInfo("w050", 0.97, {1: 2.0})]
    sched = Scheduler(tiers, make_policy("innfer", tiers), max_batch=1, max_queue=64)
    sched.submit(Request(1, 0.0, 0.050, priority=1), 0.0)
    graced = Request(2, 0.0, 0.0003, grace=0.020)  # accepted until 20.3 ms
    sched.submit(graced, 0.0)
    sched.expire(0.0)
    first = sched.next(0.0)
    assert (first.requests[0].id, first.tier) == (1, "w100")
    sched.complete(first, 0.010, 0.010)
    assert sched.expire(0.010) == [] and sched.next(0.010).requests == [graced]


# -- 4. pins and minimum tiers ---------------------------------------------------------------
def test_unknown_tiers_and_oversized_requests_are_errors():
    sched = make(max_batch=4)
    with pytest.raises(KeyError, match="w033"):
        sched.submit(Request(1, arrival=0.0, deadline=1.0, pin="w033"), now=0.0)
    with pytest.raises(KeyError, match="w033"):
        sched.submit(Request(2, arrival=0.0, deadline=1.0, min_tier="w033"), now=0.0)
    with pytest.raises(ValueError, match="maximum batch is 4"):
        sched.submit(Request(3, arrival=0.0, deadline=1.0, rows=5), now=0.0)
    sched.submit(Request(4, arrival=0.0, deadline=1.0, rows=4), now=0.0)
    assert [r.id for r in sched.queue] == [4]


def test_allowed_tiers_follow_accuracy_not_the_given_order():
    ctx = Context(list(reversed(TIERS)), LatencyModel(TIERS), 8)
    assert ctx.allowed(Request(0, 0.0, 1.0)) == NAMES
    assert ctx.allowed(Request(0, 0.0, 1.0, min_tier="w075")) == ["w100", "w075"]
    assert ctx.allowed(Request(0, 0.0, 1.0, pin="w050")) == ["w050"]
    assert ctx.fastest(Request(0, 0.0, 1.0, min_tier="w050")) == "w050"


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_pins_and_min_tiers_hold_under_pressure(policy):
    kinds = [{}, {"pin": "w050"}, {"min_tier": "w075"}, {}, {"pin": "w100"}]
    arrivals = [Arrival(0.0, 0.060, rows=1 + k % 3, **kinds[k % 5]) for k in range(30)]
    arrivals += [Arrival(0.1 + 0.02 * k, 0.040, **kinds[k % 5]) for k in range(10)]
    sched = make(policy, slots=2)
    run = drive(sched, arrivals)
    check_invariants(run, sched)
    assert run.served()
    for r in run.served():
        if r.pin is not None:
            assert r.tier == r.pin
        if r.min_tier == "w075":
            assert r.tier in ("w100", "w075")
    # Pinned requests are served, not only refused.
    assert any(r.pin == "w050" for r in run.served())
    if policy == "innfer":  # the pressure is real: unconstrained requests were degraded
        assert any(r.tier in ("w050", "w025") for r in run.served() if not (r.pin or r.min_tier))


def test_a_large_request_the_tier_cannot_run_does_not_cut_the_batch_short():
    """``Context.take`` batches the requests a tier may serve; one pinned elsewhere is not
    in the way even when it would not fit the batch."""
    ctx = Context(TIERS, LatencyModel(TIERS), 8)
    a = Request(0, 0.0, 1.0)
    x = Request(1, 0.0, 1.0, rows=8, pin="w025")
    b = Request(2, 0.0, 1.0)
    assert ctx.take([a, x, b], "w100", 8) == [a, b]
    assert ctx.take([a, x, b], "w025", 8) == [a]  # deadline order: x does not fit after a
    sched = Scheduler(TIERS, FixedTier("w100"), max_batch=8, max_queue=8)
    for r in (a, x, b):
        sched.submit(r, now=0.0)
    assert sched.next(0.0).requests == [a, b]


# -- 5. queue bound ---------------------------------------------------------------------------
def test_queue_bound_refuses_the_next_request():
    sched = make(max_queue=4)
    for k in range(4):
        sched.submit(Request(k, arrival=0.0, deadline=1.0), now=0.0)
    extra = Request(4, arrival=0.0, deadline=1.0)
    with pytest.raises(Refused) as exc:
        sched.submit(extra, now=0.0)
    assert exc.value.state == State.REFUSED_FULL
    assert len(sched.queue) == 4 and extra.state == State.QUEUED
    # Dispatch frees room (the running batch is not in the queue).
    sched.next(0.0)
    sched.submit(extra, now=0.0)
    assert sched.queue == [extra]


@pytest.mark.parametrize("policy", ["innfer", "slackfit"])
def test_queue_never_exceeds_its_bound(policy):
    sched = make(policy, max_queue=5)
    arrivals = [Arrival(0.002 * (k // 10), 0.5, rows=8) for k in range(60)]
    run = drive(sched, arrivals)
    check_invariants(run, sched)
    assert run.max_queue_len == 5
    full = [i for i, s in run.refused.items() if s == State.REFUSED_FULL]
    assert full, "the bound never bit"
    assert len(run.served()) + len(run.refused) + len(run.expired) == 60


# -- 6. priorities ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_higher_priority_is_dispatched_first(policy):
    sched = make(policy)
    low = [Request(k, arrival=0.0, deadline=0.5 + 0.01 * k, rows=8) for k in range(3)]
    high = Request(3, arrival=0.001, deadline=0.9, rows=8, priority=2)
    mid = Request(4, arrival=0.002, deadline=0.95, rows=8, priority=1)
    for r in low:
        sched.submit(r, now=0.0)
    sched.submit(high, now=0.001)
    sched.submit(mid, now=0.002)
    order = []
    now = 0.002
    while sched.queue:
        d = sched.next(now)
        order += [r.id for r in d.requests]
        now += sched.latency.estimate(d.tier, d.rows)
        sched.complete(d, now, sched.latency.estimate(d.tier, d.rows))
    assert order == [3, 4, 0, 1, 2]
    assert all(r.state == State.SERVED for r in [*low, high, mid])


def test_higher_priority_shares_a_batch_before_lower_ones():
    sched = make(max_batch=2)
    low = [Request(k, arrival=0.0, deadline=0.5) for k in range(3)]
    for r in low:
        sched.submit(r, now=0.0)
    high = Request(9, arrival=0.0, deadline=0.9, priority=1)
    sched.submit(high, now=0.0)
    assert sched.next(0.0).requests == [high, low[0]]


# -- 7. expiry -------------------------------------------------------------------------------
def test_request_expires_in_the_queue_exactly_once():
    sched = make(slots=1)
    slow = 0.040  # the engine takes 40 ms for a batch the model says takes 18 ms

    def engine(s, d, now):
        return slow if d.rows == 8 else exact(s, d, now)

    arrivals = [Arrival(0.0, 1.0, rows=8), Arrival(0.001, 0.024), Arrival(0.030, 0.5)]
    run = drive(sched, arrivals, compute=engine)
    check_invariants(run, sched)
    big, victim, later = run.requests
    assert 2 not in run.refused and 1 not in run.refused  # admitted: 18 + 1 ms < 24 ms
    assert run.expired == [victim]
    assert victim.state == State.REFUSED_DEADLINE
    # Expired at the first event at which it could no longer make it (the 30 ms arrival).
    assert victim.finished == pytest.approx(0.030)
    assert big.state == later.state == State.SERVED
    assert sched.expire(1.0) == [] and not sched.cancel(victim, 1.0)


def test_expire_by_hand():
    sched = make()
    r = Request(0, arrival=0.0, deadline=0.010)
    sched.submit(r, now=0.0)
    assert sched.expire(0.0089) == []  # 8.9 + 1 ms on w025 still fits
    assert sched.expire(0.0095) == [r]
    assert r.state == State.REFUSED_DEADLINE and r.finished == 0.0095 and not sched.queue
    assert sched.expire(0.0095) == [] and sched.next(0.0095) is None
    with pytest.raises(RuntimeError, match="finished twice"):
        r.finish(State.SERVED, 0.02)


# -- 8. cancel -------------------------------------------------------------------------------
def test_cancel_queued_and_running():
    sched = make(max_batch=1)
    a, b = Request(0, 0.0, 1.0), Request(1, 0.0, 1.0)
    sched.submit(a, now=0.0)
    sched.submit(b, now=0.0)
    d = sched.next(0.0)
    assert d.requests == [a] and a.state == State.RUNNING
    assert sched.cancel(a, 0.001) is False and a.state == State.RUNNING
    assert sched.cancel(b, 0.001) is True
    assert b.state == State.CANCELLED and b.finished == 0.001
    assert not sched.queue and sched.next(0.001) is None
    assert sched.cancel(b, 0.002) is False  # already final
    sched.complete(d, 0.004, 0.004)
    assert a.state == State.SERVED and sched.cancel(a, 0.005) is False
    # The queue still works after removals from the middle.
    reqs = [Request(k, 0.0, 1.0 + k) for k in range(2, 6)]
    for r in reqs:
        sched.submit(r, now=0.01)
    assert sched.cancel(reqs[1], 0.01) and sched.cancel(reqs[2], 0.01)
    assert sched.queue == [reqs[0], reqs[3]]
    assert len(sched._keys) == 2


def test_failed_batch_finishes_failed_and_does_not_teach_the_latency_model():
    sched = make()
    sched.submit(Request(0, 0.0, 1.0), now=0.0)
    d = sched.next(0.0)
    sched.complete(d, 0.5, 0.0, ok=False)
    assert d.requests[0].state == State.FAILED
    assert sched.latency.factor[d.tier] == 1.0 and not sched.running


def test_latency_model_learns_a_slow_engine():
    sched = make()
    sched.submit(Request(0, 0.0, 1.0), now=0.0)
    d = sched.next(0.0)
    sched.complete(d, 0.008, 0.008)  # twice the profile
    assert 0.004 * 1.1 < sched.latency.estimate(d.tier, 1) < 0.008  # moved, not jumped
    # A pinned tier that slows down refuses what it can no longer make.
    for _ in range(20):
        sched.latency.observe("w050", 1, 0.006)
    with pytest.raises(Refused):
        sched.submit(Request(1, 0.0, 0.005, pin="w050"), now=0.0)


# -- SlackFit details ------------------------------------------------------------------------
def test_slackfit_never_leaves_the_head_waiting():
    """A 2-row head with 4.2 ms of slack: on w100 only a 1-row batch fits, and the head is
    not in it. SlackFit must serve the head - not leave the slot idle (an empty batch) nor
    run a later request instead."""
    sched = make("slackfit")
    head = Request(0, arrival=0.0, deadline=0.0042, rows=2)
    sched.submit(head, now=0.0)
    d = sched.next(0.0)
    assert d is not None and d.requests == [head] and d.tier == "w050"  # 3 ms

    sched = make("slackfit")
    head = Request(0, arrival=0.0, deadline=0.0042, rows=2)
    other = Request(1, arrival=0.0, deadline=0.5)
    sched.submit(head, now=0.0)
    sched.submit(other, now=0.0)
    d = sched.next(0.0)
    assert d.requests[0] is head and d.tier in ("w050", "w025")


def test_slackfit_sizes_a_batch_to_the_earliest_deadline_it_takes():
    # A 100 ms priority-1 head and a 5 ms request: sized to the head's slack, the batch of
    # both ran on w100 (6 ms) and answered the 5 ms request late (review helper-287).
    tiers = [TierInfo("w100", 0.99, {1: 4.0, 2: 6.0, 4: 10.0, 8: 18.0}),
             TierInfo("w025", 0.93, {1: 1.0, 2: 1.5, 4: 2.5, 8: 4.5})]  # fmt: skip
    sched = Scheduler(tiers, make_policy("slackfit", tiers), max_batch=8, max_queue=64)
    low, high = Request(1, 0.0, 0.005), Request(2, 0.0, 0.100, priority=1000)
    sched.submit(low, 0.0)
    sched.submit(high, 0.0)
    d = sched.next(0.0)
    assert d.requests[0] is high
    assert low not in d.requests or sched.latency.estimate(d.tier, d.rows) <= 0.005, d


def test_slackfit_batches_multi_row_requests():
    sched = make("slackfit")
    reqs = [Request(0, 0.0, 1.0, rows=1), Request(1, 0.0, 1.0, rows=2)]
    for r in reqs:
        sched.submit(r, now=0.0)
    d = sched.next(0.0)
    assert d.requests == reqs and d.tier == FULL


# -- 9. properties ---------------------------------------------------------------------------
constraint = st.sampled_from(
    [{}] * 4 + [{"pin": n} for n in NAMES] + [{"min_tier": n} for n in NAMES[:3]]
)
arrival = st.builds(
    lambda gap, budget, rows, c, prio: (gap, budget, rows, c, prio),
    st.floats(0.0, 0.020),
    st.floats(0.0005, 0.080),
    st.integers(1, 8),
    constraint,
    st.integers(0, 2),
)


def arrivals_from(spec, max_batch):
    t, out = 0.0, []
    for gap, budget, rows, c, prio in spec:
        t += gap
        out.append(Arrival(t, budget, rows=min(rows, max_batch), priority=prio, **c))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.lists(arrival, min_size=1, max_size=30),
    policy=st.sampled_from(POLICY_NAMES),
    slots=st.integers(1, 3),
    max_batch=st.sampled_from([1, 2, 4, 8]),
    max_queue=st.integers(1, 40),
    noise=st.booleans(),
    rng=st.randoms(use_true_random=False),
)
def test_every_request_is_answered_exactly_once(
    spec, policy, slots, max_batch, max_queue, noise, rng
):
    sched = make(policy, slots=slots, max_batch=max_batch, max_queue=max_queue)

    def engine(s, d, now):
        est = s.latency.estimate(d.tier, d.rows)
        # Coarse multipliers make simultaneous ends (and so shuffled completions) common.
        return est * rng.choice([0.5, 1.0, 1.0, 2.0, 3.0]) if noise else est

    run = drive(sched, arrivals_from(spec, max_batch), compute=engine, rng=rng)
    check_invariants(run, sched)
    assert run.idle == 0, "a slot stayed idle while requests waited"
    assert run.max_queue_len <= max_queue


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.lists(arrival, min_size=1, max_size=30),
    max_batch=st.sampled_from([2, 4, 8]),
    slots=st.integers(1, 3),
)
# Found by this search (session 43): a pinned head with priority, the queue past saving -
# step 4's batch took the 7.8 ms request in and answered it at 12 ms.
@example(
    spec=[
        (0.0, 0.0625, 1, {}, 0),
        (0.0, 0.0078125, 1, {}, 0),
        (0.0, 0.0625, 3, {"pin": "w100"}, 1),
    ],
    max_batch=8,
    slots=1,
)
def test_innfer_with_exact_latencies_meets_every_deadline_it_serves(spec, max_batch, slots):
    """With an engine that runs exactly as estimated, what innfer serves is on time (what it
    cannot serve in time expires in the queue instead)."""
    sched = make("innfer", slots=slots, max_batch=max_batch)
    run = drive(sched, arrivals_from(spec, max_batch))
    check_invariants(run, sched)
    for r in run.served():
        assert r.finished <= r.deadline, (r.id, r.tier, r.finished, r.deadline)


# -- 10. innfer vs SlackFit ------------------------------------------------------------------
@dataclass
class Card:
    requests: int
    served: int
    misses: int  # not served by the deadline: refused, expired or late
    served_accuracy: float  # mean over the requests served on time
    offered_accuracy: float  # mean over every request, a miss scoring 0


def scorecard(run: Run) -> Card:
    ok = run.on_time()
    total = sum(ACCURACY[r.tier] for r in ok)
    n = len(run.requests)
    return Card(n, len(ok), n - len(ok), total / len(ok) if ok else 0.0, total / n)


# Trial 169 of a random search (seed 0): multi-row requests in three waves, 24.5 ms budgets.
# The queue cannot be saved in full; the planner's last resort used to pick the most
# accurate tier for the head alone (w100, one row) and let nine queued requests expire.
OVERLOAD_ROWS = [
    (0.01, 1), (0.02, 2), (0.02, 1), (0, 3), (0.02, 2), (0.01, 2), (0, 2), (0.02, 2),
    (0.01, 1), (0, 4), (0.02, 4), (0, 4), (0.01, 1), (0.01, 2), (0, 4), (0, 3), (0, 1),
    (0.01, 4), (0.02, 1), (0, 1), (0.01, 2), (0.02, 1), (0, 4), (0.01, 4), (0, 2), (0, 4),
    (0, 4), (0, 4), (0.01, 1), (0.02, 2), (0, 4), (0, 2), (0.02, 1), (0, 4), (0.02, 3),
]  # fmt: skip

SCRIPTED_BURSTS = {
    "one burst": burst(1) + AFTER,
    "two bursts, mixed rows": [Arrival(0.0, 0.050, rows=1 + k % 4) for k in range(24)]
    + [Arrival(0.080, 0.040, rows=2) for _ in range(12)]
    + [Arrival(0.2 + 0.05 * k, 0.030) for k in range(4)],
    "trickle then burst": [Arrival(0.005 * k, 0.030) for k in range(10)]
    + [Arrival(0.050, 0.045) for _ in range(30)],
    "moderate burst": [Arrival(0.0, 0.060) for _ in range(16)],
    "overload, mixed rows": [Arrival(t, 0.0244723, rows=n) for t, n in OVERLOAD_ROWS],
}


@pytest.mark.parametrize("scenario", sorted(SCRIPTED_BURSTS))
def test_innfer_beats_slackfit_on_a_burst(scenario):
    """Deadlines first, then accuracy. "Mean accuracy over served requests" alone would
    reward dropping requests: on "one burst" SlackFit serves 26 of 40 on time, all on w100
    (mean 0.99), innfer all 40 on a w050/w075 mix (mean 0.980). So accuracy is compared per
    offered request (a miss scores 0), and over served requests where both serve as many."""
    cards = {}
    for policy in ("innfer", "slackfit"):
        sched = make(policy)
        run = drive(sched, SCRIPTED_BURSTS[scenario])
        check_invariants(run, sched)
        cards[policy] = scorecard(run)
    ours, theirs = cards["innfer"], cards["slackfit"]
    assert ours.misses <= theirs.misses, cards
    assert ours.offered_accuracy >= theirs.offered_accuracy, cards
    if ours.served == theirs.served:
        assert ours.served_accuracy >= theirs.served_accuracy, cards
    if scenario != "overload, mixed rows":
        assert ours.misses == 0, cards  # each of these can be served in full


# -- planner internals -----------------------------------------------------------------------
def test_load_is_measured_in_rows():
    """A tier is a candidate while the arrival rate in *rows* per second is within the
    headroom of its capacity (B rows / latency(B)). 62 eight-row requests evenly over the
    0.5 s window are about 992 rows/s of load (the decayed estimate: 16 / (e^(1/62) - 1) =
    984): more than w100 is allowed (2 x 8 / 18 ms = 889 rows/s), less than w075 (1,185).
    The same number of one-row requests is w100's to serve."""
    times = [0.5 * k / 62 for k in range(62)]
    big = make("innfer")
    for k, t in enumerate(times):
        big.submit(Request(k, t, 2.0, rows=8), now=t)
    n = 62 * 8  # rows: k arrivals estimate k - 1 gaps
    assert big.arrival_rate(0.5) == pytest.approx(16 / math.expm1(1 / 62) * (n - 1) / n)
    assert big.next(0.5).tier == "w075"
    small = make("innfer")
    for k, t in enumerate(times):
        small.submit(Request(k, t, 2.0), now=t)
    assert small.next(0.5).tier == FULL


def test_the_arrival_rate_is_not_underestimated_while_its_window_fills():
    """The decayed rate counts arrivals since the first one only; it is divided by the
    share of the window seen so far, so a steady load reads as itself from the start (an
    uncorrected start read 500 rows/s as 90 after 100 ms, and the planner chose slow
    tiers that turned the next arrivals away)."""
    sched = make("innfer", max_queue=100)
    for k in range(50):  # 500 rows/s from t = 0
        sched.submit(Request(k, 0.002 * k, 1.0), now=0.002 * k)
    assert sched.arrival_rate(0.1) == pytest.approx(500, rel=0.1)
    assert make("innfer").arrival_rate(0.0) == 0.0  # nothing arrived: no load


def test_impossible_budgets_do_not_shrink_everyones_batches():
    """The planner bounds batch run time by a low percentile of recent budgets (so a tight
    client is not stuck behind a long batch). Budgets no tier can meet are refused anyway
    and must not count: 10% of such requests used to force batches of one row and made
    the rest miss their deadlines."""
    rng = random.Random(1)
    arrivals, t = [], 0.0
    for _ in range(600):
        t += rng.expovariate(1400.0)  # rows/s: needs batching even on w025 (1 ms per row)
        arrivals.append(Arrival(t, 0.0005 if rng.random() < 0.1 else 0.050))
    sched = make("innfer")
    run = drive(sched, arrivals)
    check_invariants(run, sched)
    real = [r for r in run.requests if r.budget > 0.001]
    assert all(run.refused.get(r.id) == State.REFUSED_DEADLINE for r in run.requests
               if r.budget < 0.001)  # fmt: skip
    assert len(run.on_time()) == len(real)
    assert max(d.rows for _, d, _ in run.decisions) == 8


# -- 11. state transitions -------------------------------------------------------------------
def test_every_legal_transition_moves_forward_and_final_states_have_none():
    for source, targets in TRANSITIONS.items():
        assert not source.final
        assert all(t > source for t in targets), source
    assert all(s not in TRANSITIONS for s in State if s.final)


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], State.SERVED),  # served without running
        ([], State.FAILED),
        ([State.RUNNING], State.RUNNING),  # started twice
        ([State.RUNNING], State.CANCELLED),  # a running batch is not cancelled
        ([State.RUNNING], State.REFUSED_DEADLINE),
        ([State.RUNNING, State.SERVED], State.FAILED),  # answered twice
        ([State.CANCELLED], State.RUNNING),  # a final state is never left
        ([State.REFUSED_DEADLINE], State.QUEUED),
    ],
)
def test_illegal_transitions_raise_and_leave_the_request_as_it_was(path, illegal):
    r = Request(1, 0.0, 1.0)
    for k, state in enumerate(path):
        r.advance(state, now=0.1 * k)
    before = (r.state, r.started, r.finished)
    with pytest.raises(IllegalTransition):
        r.advance(illegal, now=9.0)
    assert (r.state, r.started, r.finished) == before


def test_state_changes_only_through_the_transition_method():
    r = Request(1, 0.0, 1.0)
    with pytest.raises(AttributeError):
        r.state = State.RUNNING
    with pytest.raises(ValueError, match="not a final state"):
        r.finish(State.RUNNING, 0.0)
    r.start("w050", rows=3, now=0.25)
    assert (r.state, r.tier, r.batch_size, r.started) == (State.RUNNING, "w050", 3, 0.25)
    with pytest.raises(IllegalTransition, match="RUNNING -> RUNNING"):
        r.start("w100", rows=1, now=0.5)
    assert r.tier == "w050"  # the failed start changed nothing
    r.finish(State.SERVED, 0.5)
    assert (r.state, r.finished) == (State.SERVED, 0.5)


# -- 12. the per-decision snapshot and the static context ------------------------------------
class Recorder(Policy):
    """FixedTier on w100 that keeps every snapshot and tries to change what it was given."""

    def __init__(self) -> None:
        self.snaps: list[Snapshot] = []
        self.errors: list[type] = []

    def choose(self, queue, now, ctx, snap):
        self.snaps.append(snap)
        for attempt in (
            lambda: setattr(snap, "arrival_rate", 0.0),
            lambda: setattr(snap, "tight_budget", 1.0),
            lambda: setattr(ctx, "max_batch", 1),
        ):
            try:
                attempt()
            except (AttributeError, FrozenInstanceError) as exc:
                self.errors.append(type(exc))
        return FixedTier(FULL).choose(queue, now, ctx, snap)


def test_the_policy_gets_a_fresh_frozen_snapshot_per_decision():
    policy = Recorder()
    sched = Scheduler(TIERS, policy, max_batch=8, max_queue=64)
    for k in range(40):
        sched.submit(Request(k, 0.0, 1.0 + k), now=0.0)
    first = sched.next(0.0)
    sched.complete(first, 0.1, 0.018)
    sched.submit(Request(99, 0.1, 5.0, rows=2), now=0.1)  # a multi-row request
    sched.next(0.1)
    a, b = policy.snaps
    assert a is not b
    assert len(policy.errors) == 6  # every write attempt failed, in both decisions
    assert sched.ctx.max_batch == 8
    # Each snapshot holds what was measured at its own decision: 40 rows at t=0 over the
    # 0.5 s window, of which 50 ms count as seen (the start-up correction; 40 arrivals are
    # 39 gaps), decayed and two more rows by t=0.1.
    assert a.arrival_rate == pytest.approx(40 / 0.5 / -math.expm1(-0.05 / 0.5) * 39 / 40)
    assert b.arrival_rate == pytest.approx(sched.arrival_rate(0.1)) != a.arrival_rate
    # The queue as columns, as it was at each decision: the scheduler replaces its arrays
    # rather than writing them, so the first snapshot's did not change with the queue.
    assert len(a.columns) == 40 and a.columns.rows.max() == 1
    assert a.columns.deadline[0] == 1.0 and a.columns.deadline[-1] == 40.0
    assert len(b.columns) == 33 and b.columns.rows.max() > 1
    assert b.columns.deadline.tolist() == sorted([5.0, *[1.0 + k for k in range(8, 40)]])
    assert a.busy == b.busy == ()  # one slot: nothing else runs
    with pytest.raises(ValueError, match="read-only"):
        a.columns.deadline[0] = 0.0


def test_snapshot_says_when_the_other_slots_free_up():
    """``busy``: the other slots' running batches, from their real start times."""
    policy = Recorder()
    sched = Scheduler(TIERS, policy, max_batch=8, max_queue=64, slots=2)
    for k in range(8):
        sched.submit(Request(k, 0.0, 1.0), now=0.0)
    d = sched.next(0.0)  # w100, 8 rows: 18 ms
    sched.submit(Request(9, 0.005, 1.0), now=0.005)
    sched.next(0.005)
    assert d.rows == 8 and policy.snaps[1].busy == pytest.approx((0.013,))


# -- 13. the decision carries its slot -------------------------------------------------------
def test_decision_carries_the_slot_it_runs_on():
    sched = make("innfer", slots=2, max_batch=1)
    for k in range(3):
        sched.submit(Request(k, 0.0, 1.0), now=0.0)
    d0, d1 = sched.next(0.0), sched.next(0.0)
    assert (d0.slot, d1.slot) == (0, 1) and sched.next(0.0) is None  # both slots busy
    assert sched.running[0][0] is d0 and sched.running[1][0] is d1
    sched.complete(d1, 0.004, 0.004)
    assert sched.free_slot() == 1
    d2 = sched.next(0.004)
    assert d2.slot == 1 and d2.requests[0].id == 2
    # A decision no scheduler started has no slot, so it cannot be completed.
    with pytest.raises(ValueError, match="slot"):
        sched.complete(Decision(FULL, d0.requests), 0.005, 0.004)
    assert Decision(FULL, []).slot is None


# -- 14. the planner's steps, one at a time --------------------------------------------------
CTX = Context(TIERS, LatencyModel(TIERS), 8)
IDLE = Snapshot()  # no recent arrivals, no tight budgets


def test_step1_sustainable_tiers_and_step1b_one_tier_above():
    """1,000 rows/s: w100 is allowed up to 2 x 8 / 18 ms = 889 rows/s, w075 1,185. Where
    request handling shares the engines' CPUs the bound is 0.9x: at 416 rows/s w100
    (0.9 x 444 = 400 rows/s) drops out."""
    planner = Planner(slots=1)
    busy = Snapshot(arrival_rate=1000.0)
    assert planner.sustainable_tiers(NAMES, CTX, IDLE) == NAMES
    assert planner.sustainable_tiers(NAMES, CTX, busy) == NAMES[1:]
    assert planner.sustainable_tiers(NAMES, CTX, Snapshot(arrival_rate=416.0)) == NAMES
    hosted = Snapshot(arrival_rate=416.0, shared_cpu=True)
    assert planner.sustainable_tiers(NAMES, CTX, hosted) == NAMES[1:]
    flood = Snapshot(arrival_rate=1e6)
    assert planner.sustainable_tiers(NAMES, CTX, flood) == ["w025"]  # the fastest, always
    short = [Request(k, 0.0, 1.0, rows=4) for k in range(2)]  # 8 rows: one batch
    deep = [*short, Request(2, 0.0, 1.0)]  # 9 rows
    assert planner.one_tier_above(NAMES, NAMES[1:], short, CTX) == NAMES
    assert planner.one_tier_above(NAMES, NAMES[1:], deep, CTX) == NAMES[1:]
    assert planner.one_tier_above(NAMES, NAMES, short, CTX) == NAMES  # nothing above w100
    # Not keeping up: when not even the fastest tier sustains the arrivals, or when after
    # the batch one tier up (w100: 18 ms for 8 rows) a full batch on the fastest tier
    # (4.5 ms) would no longer fit the tight budget of recent clients.
    assert planner.one_tier_above(NAMES, NAMES[3:], short, CTX, flood) == NAMES[3:]
    tight = Snapshot(arrival_rate=416.0, tight_budget=0.022)
    assert planner.one_tier_above(NAMES, NAMES[1:], short, CTX, tight) == NAMES[1:]
    roomy = Snapshot(arrival_rate=416.0, tight_budget=0.0225)
    assert planner.one_tier_above(NAMES, NAMES[1:], short, CTX, roomy) == NAMES


def test_step1_counts_every_slot_in_what_a_tier_keeps_up_with():
    """1.5x the headroom of w100's capacity (2 x 8 / 18 ms = 889 rows/s on one slot, twice
    that on two): sustainable with two slots and not with one (nor is w075, 1,185 rows/s on
    one slot)."""
    capacity = CTX.max_batch / CTX.latency.mean("w100", CTX.max_batch)  # one slot, rows/s
    one, two = Planner(slots=1), Planner(slots=2)
    load = Snapshot(arrival_rate=1.5 * one.headroom * capacity)
    assert one.headroom * capacity < load.arrival_rate < 2 * two.headroom * capacity
    assert not one.keeps_up("w100", CTX, load) and two.keeps_up("w100", CTX, load)
    assert one.sustainable_tiers(NAMES, CTX, load) == NAMES[2:]
    assert two.sustainable_tiers(NAMES, CTX, load) == NAMES


def tight_head_queue() -> list[Request]:
    """A head due in 5 ms and eight requests due in 12 ms (one row each)."""
    return [Request(0, 0.0, 0.005)] + [Request(k, 0.0, 0.012) for k in range(1, 9)]


def test_largest_batch_meets_its_own_deadlines_and_the_head_of_line_bound():
    queue = tight_head_queue()
    batch, finish = Planner.largest_batch(queue, "w100", 0.0, CTX, IDLE)
    assert [r.id for r in batch] == [0] and finish == pytest.approx(0.004)  # 2 rows: 6 ms
    batch, finish = Planner.largest_batch(queue, "w025", 0.0, CTX, IDLE)
    assert len(batch) == 8 and finish == pytest.approx(0.0045)
    # A 4 ms tight budget leaves 3 ms of run time after the fastest single-row answer.
    bounded = Snapshot(tight_budget=0.004)
    batch, _ = Planner.largest_batch(queue, "w025", 0.0, CTX, bounded)
    assert len(batch) == 5  # 3.0 ms, interpolated between 4 rows (2.5) and 8 (4.5)
    assert Planner.largest_batch([Request(0, 0.0, 0.003)], "w100", 0.0, CTX, IDLE) is None


def test_step2_accuracy_first_keeps_the_rest_at_the_same_tier():
    planner = Planner()
    easy = [Request(k, 0.0, 0.040) for k in range(12)]  # 8 + 4 rows on w100: 18 + 10 ms
    d = planner.accuracy_first(easy, NAMES, 0.0, CTX, IDLE)
    assert (d.tier, d.rows) == ("w100", 8)
    # The head alone fits w100 (4 ms), but the rest on w100 too misses 12 ms (4 + 18); so
    # does w075's plan (4.5 ms for 2 rows, then 12 ms for 7). w050 runs 4 rows in 5 ms and
    # the other 5 in 6 ms (interpolated between 4 and 8 rows): 11 ms, in time. (When a batch
    # of 5 was costed as the profiled 8, 5 + 9 ms missed and w025 was chosen.)
    queue = tight_head_queue()
    d = planner.accuracy_first(queue, NAMES, 0.0, CTX, IDLE)
    assert (d.tier, [r.id for r in d.requests]) == ("w050", [0, 1, 2, 3])
    assert planner.accuracy_first(queue, ["w100", "w075"], 0.0, CTX, IDLE) is None
    d = planner.accuracy_first(queue, ["w100", "w075", "w025"], 0.0, CTX, IDLE)
    assert (d.tier, [r.id for r in d.requests]) == ("w025", list(range(8)))
    # choose() takes step 2's answer when it has one.
    d = planner.choose(queue, 0.0, CTX, IDLE)
    assert (d.tier, [r.id for r in d.requests]) == ("w050", [0, 1, 2, 3])


def test_step3_relaxed_plans_the_rest_on_the_fastest_tier():
    """The same queue: with the rest on w025 (4 + 4.5 ms <= 12 ms) the head gets w100."""
    d = Planner().relaxed(tight_head_queue(), NAMES, 0.0, CTX, IDLE)
    assert (d.tier, [r.id for r in d.requests]) == ("w100", [0])
    doomed = [Request(0, 0.0, 0.001)] + [Request(k, 0.0, 0.002) for k in range(1, 9)]
    assert Planner().relaxed(doomed, NAMES, 0.0, CTX, IDLE) is None


def test_step4_throughput_fallback_saves_as_many_as_it_can():
    planner = Planner()
    # Nine requests due in 2 ms: no plan saves them all; w025's largest batch that meets
    # its own deadlines is the head alone (1 ms; the head is due in 1.2, 2 rows take 1.5).
    doomed = [Request(0, 0.0, 0.0012)] + [Request(k, 0.0, 0.002) for k in range(1, 9)]
    d = planner.throughput_fallback(doomed, NAMES, 0.0, CTX, IDLE)
    assert (d.tier, [r.id for r in d.requests]) == ("w025", [0])
    loose = [Request(k, 0.0, 0.002) for k in range(9)]
    d = planner.throughput_fallback(loose, NAMES, 0.0, CTX, IDLE)
    assert (d.tier, d.rows) == ("w025", 3)  # 2.0 ms, between 2 rows (1.5) and 4 (2.5)
    # The fastest tier first, then the next one up: w075 if the head allows no faster one.
    strict = [Request(0, 0.0, 0.0035, min_tier="w075"), *loose[1:]]
    d = planner.throughput_fallback(strict, ["w100", "w075"], 0.0, CTX, IDLE)
    assert (d.tier, [r.id for r in d.requests]) == ("w075", [0])
    # No tier has a batch that meets its deadlines: the head alone on the fastest tier.
    late = [Request(0, 0.0, 0.0005), Request(1, 0.0, 0.0005)]
    d = planner.throughput_fallback(late, NAMES, 0.0, CTX, IDLE)
    assert (d.tier, [r.id for r in d.requests]) == ("w025", [0])
    assert planner.choose(doomed, 0.0, CTX, IDLE).requests == [doomed[0]]


def test_other_policies_ignore_the_snapshot():
    queue = [Request(k, 0.0, 0.050) for k in range(3)]
    for snap in (IDLE, Snapshot(arrival_rate=1e6, tight_budget=0.001)):
        assert FixedTier("w050").choose(queue, 0.0, CTX, snap).requests == queue
        assert SlackFit().choose(queue, 0.0, CTX, snap).tier == FULL


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 8),
    constraint=st.sampled_from([None, *(("pin", t) for t in NAMES), *(("min", t) for t in NAMES)]),
    budget_ms=st.floats(0.5, 40.0),
    rate=st.floats(0.0, 3000.0),
    tight_ms=st.one_of(st.just(math.inf), st.floats(1.0, 40.0)),
    idle=st.floats(0.0, 1.0),
    budgets_ms=st.one_of(st.none(), st.lists(st.floats(0.5, 60.0), min_size=1, max_size=40)),
)
def test_a_lone_request_gets_the_general_planners_decision(
    rows, constraint, budget_ms, rate, tight_ms, idle, budgets_ms
):
    """Planner.choose decides a one-request queue on a short path (most decisions at light
    load); it must agree with steps 2-4 run in full - long single rows priced alike."""
    pin = constraint[1] if constraint and constraint[0] == "pin" else None
    min_tier = constraint[1] if constraint and constraint[0] == "min" else None
    r = Request(1, 0.0, budget_ms * MS, rows=rows, pin=pin, min_tier=min_tier)
    budgets = None if budgets_ms is None else np.sort(np.array(budgets_ms)) * MS
    snap = Snapshot(arrival_rate=rate, tight_budget=tight_ms * MS, idle_share=idle,
                    budgets=budgets, paced_share=idle)  # fmt: skip
    planner = Planner()
    fast = planner.choose([r], 0.0, CTX, snap)
    full = replace(snap, columns=CTX.columns([r]))
    allowed = CTX.allowed(r)
    candidates = planner.one_tier_above(
        allowed, planner.sustainable_tiers(allowed, CTX, full), [r], CTX, full
    )
    general = (
        planner.accuracy_first([r], candidates, 0.0, CTX, full)
        or planner.relaxed([r], allowed, 0.0, CTX, full)
        or planner.throughput_fallback([r], allowed, 0.0, CTX, full)
    )
    assert (fast.tier, fast.requests) == (general.tier, general.requests)


# -- one long row and the arrivals it turns away ----------------------------------------------
# The ResNet-18-like w50 tiers at 224x224 on this CPU (p50 ms, deterministic here).
RESNET_TIERS = [
    TierInfo("w100", 1.0, {1: 11.2, 8: 90.0}),
    TierInfo("w075", 0.57, {1: 7.0, 8: 55.0}),
    TierInfo("w050", 0.26, {1: 4.5, 8: 30.0}),
    TierInfo("w025", 0.07, {1: 2.2, 8: 12.0}),
]


def _tight_traffic_budgets(n: int, rng: np.random.Generator) -> np.ndarray:
    """90 % of budgets U(4.5, 13.5) ms, 10 % U(17, 90) ms (seconds)."""
    tight = rng.random(n) < 0.9
    return np.where(tight, rng.uniform(4.5e-3, 13.5e-3, n), rng.uniform(17e-3, 90e-3, n))


def test_a_lone_row_on_a_slow_tier_is_priced_by_the_arrivals_it_turns_away():
    """A lone request with 12 ms may run alone on w100 (11.2 ms) only when few arrivals
    come while it runs: at 90/s, most with budgets of 4.5-13.5 ms, about one arrives per
    such run and a third of one would be turned away; at 0.05/s almost none."""
    ctx = Context(RESNET_TIERS, LatencyModel(RESNET_TIERS), max_batch=8)
    budgets = np.sort(_tight_traffic_budgets(200, np.random.default_rng(0)))
    tight = float(budgets[int(0.05 * 199)])
    r = Request(0, 0.0, 0.012)
    for rate, tier in ((90.0, "w025"), (0.05, "w100")):
        snap = Snapshot(arrival_rate=rate, tight_budget=tight, budgets=budgets)
        assert Planner().choose([r], 0.0, ctx, snap).tier == tier
        head = Planner.largest_batch([r], "w100", 0.0, ctx, snap)  # the general path
        assert (head is not None) == (tier == "w100")
    # Nearly every request found the device idle: a closed loop, nobody arrives meanwhile.
    paced = Snapshot(arrival_rate=90.0, tight_budget=tight, budgets=budgets,
                     idle_share=0.99, paced_share=0.99)  # fmt: skip
    assert Planner().choose([r], 0.0, ctx, paced).tier == "w100"
    # Two slots, the other one free: a tight arrival runs there, so nothing is turned away -
    # unless another request takes that slot at once (a queue of two: the general path).
    snap = Snapshot(arrival_rate=90.0, tight_budget=tight, budgets=budgets)
    assert Planner(slots=2).choose([r], 0.0, ctx, snap).tier == "w100"
    assert Planner(slots=2).choose([r], 0.0, ctx, replace(snap, busy=(0.005,))).tier == "w025"
    pair = [r, Request(1, 0.0, 0.012, pin="w100")]
    assert Planner(slots=2).choose(pair, 0.0, ctx, snap).tier == "w025"


def test_mostly_tight_budgets_under_load_are_met_with_four_tiers_as_with_the_smallest():
    """Mostly 4.5-13.5 ms budgets at the full tier's capacity (~89/s). Lone requests on the
    slower tiers used to block the tight arrivals behind them: 89.9 % within budget with
    the four tiers against 99.98 % with w025 alone (simulated, bench/auto_tiers.py)."""
    from sim.simulator import SimConfig, replay

    rng = np.random.default_rng(3)
    arrivals = np.cumsum(rng.exponential(1 / 89.0, 1500))
    budgets = _tight_traffic_budgets(len(arrivals), rng)
    p50 = {t.name: dict(t.latency_ms) for t in RESNET_TIERS}
    four = replay(RESNET_TIERS, p50, arrivals, budgets, SimConfig(noise=0.05, seed=3))
    alone = replay(RESNET_TIERS[-1:], p50, arrivals, budgets, SimConfig(noise=0.05, seed=3))
    assert alone.summary["slo_attainment"] >= 0.99
    assert four.summary["slo_attainment"] >= alone.summary["slo_attainment"] - 0.005


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from("ssnnccek"), st.integers(0, 7)), max_size=60))
def test_the_queue_arrays_match_the_queue_through_every_edit(ops):
    # The arrays are not written for a lone request (light load) and are rebuilt when a
    # second one arrives; whatever the sequence of arrivals, batches and cancellations,
    # what columns() returns is the queue itself.
    s = Scheduler(TIERS, make_policy("innfer", TIERS), max_batch=8, max_queue=64)
    now, ids = 0.0, iter(range(10**6))
    for op, k in ops:
        now += 0.001
        if op == "s":
            pin = [None, None, "w050"][k % 3]
            with contextlib.suppress(Refused):
                s.submit(
                    Request(next(ids), now, now + 0.01 * (k + 1), rows=1 + k % 2, pin=pin), now
                )
        elif op == "n" and (d := s.next(now)) is not None:
            s.complete(d, now, 0.001)
        elif op == "c" and s.queue:
            s.cancel(s.queue[k % len(s.queue)], now)
        elif op == "e":
            s.expire(now)
        if op != "k":  # columns() rebuilds arrays that are out of step: only now and then
            continue
        got, want = s.columns(), s.ctx.columns(s.queue)
        np.testing.assert_array_equal(got.deadline, want.deadline)
        np.testing.assert_array_equal(got.rows, want.rows)
        np.testing.assert_array_equal(got.lo, want.lo)
        np.testing.assert_array_equal(got.hi, want.hi)
        assert len(got) == len(s.queue)


def test_cancelling_a_request_refused_at_submit_is_a_no_op():
    tiers = [TierInfo("w100", 0.99, {1: 10.0})]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=1, max_queue=1)
    s.submit(Request(1, 0.0, 1.0), 0.0)
    r = Request(2, 0.0, 1.0)
    with pytest.raises(Refused):  # the queue is full
        s.submit(r, 0.0)
    assert s.cancel(r, 0.0) is False and len(s.queue) == 1  # (it raised IndexError)


def test_a_zero_median_in_a_profile_does_not_break_the_running_batch_estimate():
    # A hand-written profile may say 0 ms; a batch that has run past it still gets an
    # estimate of what is left (it raised "math domain error" in every snapshot).
    from server.scheduling.latency import LatencyModel

    lat = LatencyModel([TierInfo("w", 1.0, {1: 0.0})])
    assert lat.remaining("w", 1, 0.005) >= 0.0


# A calibrated w050 more accurate than the full network it was sampled from (the README's
# calibrate example: 88.1 vs 84.6 %), and a hand-written tier less accurate and as slow as
# the full one: both slower tiers are dominated by w050.
DOMINATED = [
    TierInfo("w100", 0.846, {1: 8.0, 2: 15.0, 4: 25.0}),
    TierInfo("w050", 0.881, {1: 1.5, 2: 3.0, 4: 5.0}),
    TierInfo("custom", 0.78, {1: 9.7, 2: 16.0, 4: 25.7}),
]


def test_a_dominated_tier_is_never_the_fallback_under_overload():
    # The least accurate allowed tier is what plans fall back to as the fastest: here the
    # slow custom tier took 98 % of the requests at 2x load (innfer simulate) while w050,
    # faster and more accurate, was there.
    sched = Scheduler(DOMINATED, make_policy("innfer", DOMINATED, 1), max_batch=4,
                      max_queue=256, slots=1)  # fmt: skip
    assert sched.ctx.allowed(Request(0, 0.0, 1.0)) == ["w050"]
    assert sched.ctx.allowed(Request(0, 0.0, 1.0, min_tier="custom")) == ["w050"]
    assert sched.ctx.allowed(Request(0, 0.0, 1.0, pin="custom")) == ["custom"]  # pins hold
    arrivals = [Arrival(0.002 * k, 0.030) for k in range(200)]  # ~2x w050's batch-4 rate
    arrivals += [Arrival(0.002 * k + 0.001, 0.200, pin="w100") for k in range(0, 200, 50)]
    run = drive(sched, arrivals)
    check_invariants(run, sched)
    by_tier = Counter(r.tier for r in run.served() if r.pin is None)
    assert set(by_tier) == {"w050"}, by_tier
    assert {r.tier for r in run.served() if r.pin == "w100"} == {"w100"}
    assert len(run.on_time()) > 150  # w050 carries the load


def test_a_tier_faster_at_some_batch_sizes_is_not_dominated():
    tiers = [TierInfo("w050", 0.96, {1: 0.6, 8: 2.0}), TierInfo("w025", 0.95, {1: 0.9, 8: 1.8})]
    ctx = Context(tiers, LatencyModel(tiers), max_batch=8)
    assert ctx.allowed(Request(0, 0.0, 1.0)) == ["w050", "w025"]


def test_relaxing_an_unused_tier_stops_at_its_timing_at_load():
    """On a machine 3x slower than its profile, the timing at load is the floor: an idle
    arrival does not plan the tier at the profile again (the refusal-time forgetting does,
    as it did: a timing at load on a busy machine must not refuse a tier for good)."""
    tiers = [TierInfo("w100", 1.0, {1: 20.0, 2: 20.0}), TierInfo("w050", 0.9, {1: 1.0, 2: 1.0})]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=2, max_queue=8)
    for _ in range(50):
        s.latency.observe("w100", 1, 0.06)  # the timing at load: 3x
    s.latency.settle()
    for _ in range(50):
        s.latency.observe("w100", 1, 0.12)  # then load: 6x
    s.submit(Request(0, arrival=10.0, deadline=10.05), 10.0)  # 50 ms: only w050 fits
    d = s.next(10.0)
    assert d.tier == "w050"
    s.complete(d, 10.001, 0.001)
    s.submit(Request(1, arrival=20.0, deadline=20.05), 20.0)  # idle, w100 unused for 10 s
    assert 2.9 < s.latency.factor["w100"] < 3.1  # relaxed from 6x, down to 3x only
    assert s.next(20.0).tier == "w050"


def test_a_tier_in_sparse_use_keeps_the_slowdown_its_batches_taught():
    """Only a tier passed over for a less accurate one is relaxed: one still chosen, a
    request every 3 s, keeps what its own batches say (the machine is that slow)."""
    tiers = [TierInfo("w100", 1.0, {1: 20.0, 2: 20.0}), TierInfo("w050", 0.9, {1: 1.0, 2: 1.0})]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=2, max_queue=8)
    s.latency.settle()  # the timing at load: the profile
    t = 10.0
    for i in range(20):
        s.submit(Request(i, arrival=t, deadline=t + 1.0), t)  # 1 s: w100 fits even at 2x
        d = s.next(t)
        assert d.tier == "w100"
        s.complete(d, t + 0.04, 0.04)  # 2x its profile
        t += 3.0
    assert s.latency.factor["w100"] > 1.8


@pytest.mark.parametrize("gap", [1.2, 3.0])
def test_the_idle_relax_leaves_the_refusal_time_forget_its_turn(gap):
    """The relax of an idle arrival stamped the same clock the refusal-time forget reads:
    pinned requests whose budget the profile meets but the timing at load does not were
    refused for good at arrivals 1.2 s apart, 75 s at 3 s (review 201). Each keeps its
    own; the first pinned request after the idle spell is admitted, as before the relax."""
    tiers = [TierInfo("w100", 1.0, {1: 20.0, 2: 20.0}), TierInfo("w050", 0.9, {1: 1.0, 2: 1.0})]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=2, max_queue=8)
    for _ in range(50):
        s.latency.observe("w100", 1, 0.03)  # the timing at load: 1.5x (a busy machine)
    s.latency.settle()
    for _ in range(50):
        s.latency.observe("w100", 1, 0.12)  # then a burst: 6x
    s.submit(Request(0, arrival=10.0, deadline=10.05), 10.0)
    d = s.next(10.0)
    s.complete(d, 10.001, 0.001)
    t = 15.0
    s.submit(Request(1, arrival=t, deadline=t + 0.025, pin="w100"), t)  # not refused
    assert s.latency.factor["w100"] < 1.2  # forgotten towards the profile, past home
    s.next(t)


def test_relax_reaches_its_home_and_then_changes_nothing():
    """A keep above 0.5 rounded the last ulp back up: relax never reached home, and every
    call read as a change (the planner's tables rebuilt at each idle arrival)."""
    lat = LatencyModel([TierInfo("w100", 1.0, {1: 20.0})])
    for _ in range(50):
        lat.observe("w100", 1, 0.03)
    lat.settle()
    for _ in range(50):
        lat.observe("w100", 1, 0.12)
    calls = 0
    while lat.relax("w100", math.exp(-1.2 / 2.0)):
        calls += 1
        assert calls < 100
    version = lat.version
    assert not lat.relax("w100", 0.5) and lat.version == version
    assert lat.factor["w100"] == pytest.approx(1.5, rel=0.05)


def test_relax_takes_back_the_spread_load_taught_not_only_the_level():
    """The level alone came home, and the spread learned under load (erratic batches) still
    planned the tier past every budget at the 0.999 quantile: an idle ResNet replica kept
    serving w075 though w100's level was back at its timing at load (review 201, live)."""
    lat = LatencyModel([TierInfo("w100", 1.0, {1: 20.0, 2: 22.0}, {1: 18.0, 2: 20.0})])
    for i in range(30):
        lat.observe("w100", 1 + i % 2, 0.019 + 0.001 * (i % 2))  # calm, at its profile
    lat.settle()
    settled = lat.estimate("w100", 1)
    for i in range(30):
        lat.observe("w100", 1, 0.02 if i % 2 else 0.08)  # a burst: slow and erratic
    assert lat.estimate("w100", 1) > 2 * settled
    assert lat.relax("w100", 0.0)
    # home again, trust included: the burst's trust kept with the home spread planned the
    # tier near its median at the 0.999 quantile (review 202)
    assert lat.estimate("w100", 1) == pytest.approx(settled, rel=1e-9)
    untimed = LatencyModel([TierInfo("w100", 1.0, {1: 20.0, 2: 22.0}, {1: 18.0, 2: 20.0})])
    untimed.settle()  # no timing at load: home is the profile, its spread untrusted
    at_profile = untimed.estimate("w100", 2)
    for i in range(100):
        untimed.observe("w100", 2, 0.02 if i % 2 else 0.08)
    untimed.relax("w100", 0.0)
    assert untimed.estimate("w100", 2) == pytest.approx(at_profile, rel=1e-9)


def test_a_slowdown_that_outlasts_the_load_costs_one_late_plan_per_backoff():
    """A machine slower than its timing at load for a reason the server does not cause:
    each idle relax planned w100 home again and answered late (44 of 60 requests 2 s apart;
    review 202). A relax its next batch undoes is undone, and the wait before the next one
    doubles, up to RELAX_WAIT_MAX_S."""
    tiers = [TierInfo("w100", 1.0, {1: 20.0, 2: 20.0}), TierInfo("w050", 0.9, {1: 2.0, 2: 2.0})]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=2, max_queue=8)
    for _ in range(20):
        s.latency.observe("w100", 1, 0.02)  # the timing at load: as profiled
    s.latency.settle()
    for _ in range(20):
        s.latency.observe("w100", 1, 0.04)  # then 2x, and it stays so
    t, late, on_w100 = 10.0, 0, 0
    for i in range(60):  # 30 ms budgets, 2 s apart: only w050 meets them now
        s.submit(Request(i, arrival=t, deadline=t + 0.03), t)
        d = s.next(t)
        took = 0.04 if d.tier == "w100" else 0.002
        s.complete(d, t + took, took)
        on_w100 += d.tier == "w100"
        late += took > 0.03
        t += 2.0
    assert on_w100 == late and 1 <= late <= 7  # relaxes 1, 2, 4 ... 64 s apart, each undone


@pytest.mark.parametrize(
    ("timed_batches", "keep", "erratic"),
    [(0, 0.97, True), (3, 0.97, True), (0, 0.999, False), (3, 0.999, True), (0, 0.5, False)],
)
def test_an_idle_tier_relaxed_again_and_again_plans_between_the_burst_and_home(
    timed_batches, keep, erratic
):
    """Each relax blended the spread's EWMA weights linearly, squared weights too, and
    rounded the trust's batch count (1 stayed 1 at any keep above 0.5): the spread's
    relative variance (s2 / s1^2) grew as 1 / keep per relax while the trust stayed, and an
    idle tier relaxed a few hundred times planned at 1e18 s, then ``_refresh``'s expm1
    overflowed and the decision raised (``bench.auto_tiers``, the ResNet's phase 2,
    untimed tiers). Every relax now plans the tier between the burst's plan and home's,
    and the relaxes end at home."""
    lat = LatencyModel([TierInfo("w100", 1.0, {1: 20.0, 2: 22.0}, {1: 18.0, 2: 20.0})])
    for i in range(timed_batches):
        lat.observe("w100", 1, 0.019 + 0.002 * i)  # the timing at load, if any
    lat.settle()
    home = lat.estimate("w100", 1)
    for i in range(40):  # a burst: slow, erratic or steady
        lat.observe("w100", 1, (0.02 if i % 2 else 0.07) if erratic else 0.05)
    burst = lat.estimate("w100", 1)
    relaxes = 0
    while lat.relax("w100", keep):
        relaxes += 1
        assert relaxes < 20000
        assert home * (1 - 1e-9) <= lat.estimate("w100", 1) <= burst * (1 + 1e-9)
    assert lat.estimate("w100", 1) == pytest.approx(home, rel=1e-6)


def test_relax_weighs_the_level_noise_of_the_burst_as_the_level_itself():
    """The level's noise (``_level_var``) is a sum of squared EWMA weights (``observe``:
    keep^2 lv + alpha^2); ``relax`` blended it by keep, so mid-relax the tier was planned as
    if the burst's batches weighed keep where its level weighed keep^2 (review helper-216)."""
    lat = LatencyModel([TierInfo("w100", 1.0, {1: 20.0, 2: 22.0}, {1: 18.0, 2: 20.0})])
    lat.settle()
    home = lat._level_var["w100"]
    for i in range(40):
        lat.observe("w100", 1, 0.02 if i % 2 else 0.07)
    burst = lat._level_var["w100"]
    assert burst != pytest.approx(home)
    assert lat.relax("w100", 0.5)
    assert lat._level_var["w100"] == pytest.approx(home + (burst - home) * 0.25, rel=1e-9)


def test_a_corrupted_spread_state_plans_huge_but_finite_times():
    """Where the spread's weights broke their invariant (s2 <= s1^2) the planning scale ran
    to thousands and ``_refresh``'s expm1 overflowed: the decision raised, and so did every
    one after it (the state stayed). Capped at PLAN_SIGMA_MAX sigmas, such a tier is planned
    absurdly slow - never chosen - and the scheduler goes on."""
    lat = LatencyModel([TierInfo("w100", 1.0, {1: 20.0, 2: 22.0}, {1: 18.0, 2: 20.0})])
    for i in range(20):
        lat.observe("w100", 1, 0.02 if i % 2 else 0.07)
    lat._jitter_w["w100"] = (1e-9, 1.0)  # as relax once left it, and worse
    lat.observe("w100", 1, 0.03)
    assert math.isfinite(lat.estimate("w100", 1)) and lat.estimate("w100", 1) > 1e6
    assert all(map(math.isfinite, lat.tables(["w100"])[2][0][1:3]))


# -- re-entrant device listeners, resubmission, zero profiles (review helper-232) -----------


def test_a_listener_that_dispatches_at_once_on_release_keeps_the_new_batch():
    # complete() released the slot (its listeners ran at once) before taking the finished
    # batch out of `running`: a listener that dispatched there had its new batch's entry
    # deleted - its request never answered, the slot held for good.
    from server.scheduling.device import Device

    tiers = [TierInfo("t", 0.9, {1: 1.0, 4: 2.0})]
    dev = Device(slots=2)
    a, c = (Scheduler(tiers, make_policy("innfer", tiers, 2), max_batch=4, max_queue=16,
                      device=dev) for _ in range(2))  # fmt: skip
    started = []
    clock = [0.0]

    def pump_all():  # a dispatcher that looks again at once, for every model on the device
        for s in (a, c):
            while (d := s.next(clock[0])) is not None:
                started.append((s, d))

    dev.join(c, on_release=pump_all)
    a.submit(Request(1, 0.0, 1.0), 0.0)
    c.submit(Request(2, 0.0, 1.0), 0.0)
    pump_all()
    first = next(d for s, d in started if s is a)
    clock[0] = 0.0005
    third = Request(3, clock[0], 1.0)
    a.submit(third, clock[0])  # both slots busy: queued
    clock[0] = 0.001
    a.complete(first, clock[0], 0.001)  # c's listener starts r3 on the slot just freed
    again = started[-1][1]
    assert again.requests == [third] and a.running[again.slot][0] is again
    a.complete(again, 0.003, 0.002)
    assert third.state is State.SERVED and again.slot not in dev.running


def test_an_eviction_whose_listener_dispatches_at_once_keeps_the_queue_in_order():
    # submit() evicted the least urgent request (emptying its lane: the device's listeners
    # ran at once and dispatched from this queue) and then inserted the newcomer at the
    # index computed before: the queue out of order, a later removal IndexError.
    from server.scheduling.device import Device, Instances

    tiers = [TierInfo("t0", 0.99, {1: 2.0, 4: 4.0}), TierInfo("t1", 0.90, {1: 1.0, 4: 2.0})]
    dev, inst = Device(slots=1), Instances(1)
    s, lane = (Scheduler(tiers, make_policy("innfer", tiers, 1), max_batch=4, max_queue=3,
                         device=dev, instances=inst) for _ in range(2))  # fmt: skip
    running = []
    clock = [0.0]

    def pump_lanes():
        for x in (s, lane):
            while (d := x.next(clock[0])) is not None:
                running.append(d)

    dev.join(s, on_release=pump_lanes)
    s.submit(Request(0, 0.0, 1.0, priority=1), 0.0)
    pump_lanes()
    s.submit(Request(1, 0.0, 0.30, pin="t0", priority=1), 0.0)
    s.submit(Request(2, 0.0, 0.50, pin="t1", priority=1), 0.0)
    least = Request(9, 0.0, 0.90, priority=0)
    lane.submit(least, 0.0)
    clock[0] = 0.010
    s.complete(running.pop(), clock[0], 0.002)
    s.submit(Request(3, clock[0], 0.40, priority=1), clock[0])  # full: evicts r9
    assert s._keys == sorted(s._keys) and len(s._keys) == len(s.queue)
    assert [(r.id, r.state) for r in lane.expire(clock[0])] == [(9, State.REFUSED_FULL)]
    for r in list(s.queue):
        assert s.cancel(r, clock[0])


def test_a_request_submitted_twice_is_refused_before_anything_changes():
    # Queued twice, next() took the same index out twice - a neighbour with it, never
    # answered - and then failed on the second start.
    from server.scheduling.scheduler import InvalidRequest

    tiers = [TierInfo("t", 0.9, {1: 1.0, 4: 2.0})]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=4, max_queue=8)
    a, b = Request(1, 0.0, 1.0), Request(2, 0.0, 2.0)
    s.submit(a, 0.0)
    with pytest.raises(InvalidRequest, match="request 1 was submitted already"):
        s.submit(a, 0.0)
    s.submit(b, 0.0)
    d = s.next(0.0)
    assert d.requests == [a, b] and not s.queue
    with pytest.raises(InvalidRequest, match="submitted already \\(running\\)"):
        s.submit(a, 0.0)


@pytest.mark.parametrize("table", [{1: 0.0, 4: 0.0}, {1: 0.0, 4: 2.0}])
def test_a_zero_ms_profile_entry_plans_instead_of_dividing_by_zero(table):
    # Every next() of the innfer policy raised ZeroDivisionError (rows per second of a
    # 0-second batch); the queue stayed, and every request expired.
    tiers = [TierInfo("w", 1.0, table)]
    s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=4, max_queue=16)
    for k in range(3):
        s.submit(Request(k, 0.0, 0.010), 0.0)
    d = s.next(0.0)
    assert d is not None and d.tier == "w" and d.requests[0].id == 0


def test_a_refusal_of_a_budget_the_profile_meets_says_this_replica_runs_slower_now():
    # A pinned tier learned 400x its profile on a starved core was refused with "send a
    # larger latency_budget_ms" alone: the client's budget was fine on any other replica
    # (review helper-306).
    s = make()
    for _ in range(50):  # w025 runs 10x its 1 ms profile here now
        s.latency.observe("w025", 1, 10 * MS)
    with pytest.raises(Refused) as slow:
        s.submit(Request(1, 0.0, 5 * MS, pin="w025"), 0.0)
    assert "(profiled 1." in str(slow.value) and "x slower now: retry shortly or on another " \
        "replica)" in str(slow.value)  # fmt: skip
    s2 = make()  # 1.3x its profile: said so, not "1x" (review helper-311)
    for _ in range(50):
        s2.latency.observe("w025", 1, 1.3 * MS)
    with pytest.raises(Refused) as some:
        s2.submit(Request(3, 0.0, 1.2 * MS, pin="w025"), 0.0)
    assert " 1.3x slower now" in str(some.value) or " 1.4x slower now" in str(some.value), str(
        some.value)  # fmt: skip
    with pytest.raises(Refused) as small:  # below even the profile: the client's ask alone
        s.submit(Request(2, 0.0, 0.5 * MS, pin="w025"), 0.0)
    assert "slower now" not in str(small.value)
    assert "send a larger latency_budget_ms" in str(small.value)
