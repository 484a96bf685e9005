"""Several models on one device (issue 18): one set of slots, deadline order across models,
and each model planning behind the others' work. Pure, on a virtual clock."""

from __future__ import annotations

import pytest

from server.scheduling import Refused, Request, Scheduler, Snapshot, TierInfo, make_policy
from server.scheduling.device import Device

# Two tiers; times per batch of 1 / 8 rows in ms. Narrow spread: p90 close to p50.
TIERS = [TierInfo("w100", 0.99, {1: 10.0, 8: 40.0}), TierInfo("w025", 0.90, {1: 2.5, 8: 10.0})]


def _scheduler(device=None, tiers=TIERS, instances=None):
    return Scheduler(tiers, make_policy("innfer", tiers), max_batch=8, max_queue=256,
                     device=device, instances=instances)  # fmt: skip


def test_one_slot_is_shared_and_the_most_urgent_head_goes_first():
    dev = Device(slots=1)
    a, b = _scheduler(dev), _scheduler(dev)
    a.submit(Request(1, 0.0, 0.200), 0.0)
    b.submit(Request(2, 0.0, 0.080), 0.0)
    assert a.next(0.0) is None  # b's head is due first
    db = b.next(0.0)
    assert db is not None and a.next(0.0) is None  # the only slot is b's
    b.complete(db, 0.01, 0.01)
    assert a.next(0.01) is not None


def test_release_wakes_the_other_models():
    dev = Device(slots=1)
    woken = []
    a, b = _scheduler(dev), _scheduler(dev)
    dev.join(a, on_release=lambda: woken.append("a"))
    dev.join(b, on_release=lambda: woken.append("b"))
    b.submit(Request(1, 0.0, 0.1), 0.0)
    d = b.next(0.0)
    woken.clear()
    b.complete(d, 0.01, 0.01)
    assert woken == ["a"]


def test_a_waiting_policy_does_not_hold_the_device():
    # b was granted the slot but its policy chose to wait for a fuller batch: it passes.
    dev = Device(slots=1)
    a, b = _scheduler(dev), _scheduler(dev)
    b.submit(Request(1, 0.0, 0.050), 0.0)
    a.submit(Request(2, 0.0, 0.300), 0.0)
    dev.passed(b)
    assert a.next(0.0) is not None  # b passed its turn: a may run
    b.submit(Request(3, 0.001, 0.060), 0.001)  # b's queue changed: its head counts again
    assert dev.claim(b) is None  # but the one slot is a's now


def test_admission_counts_the_other_models_work_due_first():
    one = [TierInfo("w", 1.0, {1: 10.0, 8: 10.0})]  # every batch 10 ms
    dev = Device(slots=1)
    a, b = _scheduler(dev, one), _scheduler(dev, one)
    for i in range(24):  # 3 full batches (30 ms) due before b's request
        a.submit(Request(100 + i, 0.0, 0.035 + 0.0001 * i), 0.0)
    # (its own queue is empty: the refusal says what the device's other model holds - it
    # read "behind the 0 requests queued ahead and 0 running"; review helper-267)
    with pytest.raises(
        Refused,
        match=r"0 requests queued ahead and 0 running, and other "
        r"models' 30\.\d ms of more urgent work queued on the device",
    ):
        b.submit(Request(1, 0.0, 0.038), 0.0)  # 30 ms of a's work first, then its 10 ms
    alone = _scheduler(None, one)
    alone.submit(Request(1, 0.0, 0.038), 0.0)  # alone on the device it fits
    b.submit(Request(2, 0.0, 0.080), 0.0)  # behind a's 30 ms + its own 10 ms: fits


def test_a_refusal_behind_another_models_running_batch_says_so():
    dev = Device(slots=1)
    slow = [TierInfo("w", 1.0, {1: 50.0, 8: 50.0})]
    a, b = _scheduler(dev, slow), _scheduler(dev)
    a.submit(Request(1, 0.0, 1.0), 0.0)
    assert a.next(0.0) is not None  # a's 50 ms batch holds the one slot
    with pytest.raises(Refused, match="and 0 running, and other models' 1 batch running on"):
        b.submit(Request(2, 0.0, 0.020), 0.0)


def test_a_refusal_behind_the_models_own_other_lane_names_it_so():
    # A text model's long lane's batch, not another model: a one-model server's refusals
    # read "other models' 1 batch running" (helper-317).
    from server.scheduling.device import Instances

    dev, shared = Device(slots=1), Instances(1)
    slow = [TierInfo("w", 1.0, {1: 50.0, 8: 50.0})]
    long, short = _scheduler(dev, slow, shared), _scheduler(dev, instances=shared)
    long.submit(Request(1, 0.0, 1.0), 0.0)
    assert long.next(0.0) is not None
    with pytest.raises(Refused, match="and this model's other lanes' 1 batch running on"):
        short.submit(Request(2, 0.0, 0.020), 0.0)


def test_the_other_models_work_is_the_planners_backlog():
    # Planner: 12 queued, the rest after a full head batch has ~50 ms of slack on w100.
    s = _scheduler()
    for i in range(12):
        s.submit(Request(i, 0.0, 0.060 + 0.005 * i), 0.0)

    def tier(backlog: float) -> str:
        snap = Snapshot(arrival_rate=0.0, columns=s.columns(), backlog=backlog)
        return s.policy.choose(s.queue, 0.0, s.ctx, snap).tier

    assert tier(0.0) == "w100"
    assert tier(0.040) == "w025"  # 40 ms of another model's work first: shrink


def test_a_shared_device_hands_the_other_models_work_to_the_snapshot():
    dev = Device(slots=1)
    a, b = _scheduler(dev), _scheduler(dev)
    b.submit(Request(1, 0.0, 0.100), 0.0)
    assert b._snapshot(0.0, 0).backlog == 0.0
    for i in range(16):  # two full batches on w025, due before b's request
        a.submit(Request(100 + i, 0.0, 0.090), 0.0)
    assert b._snapshot(0.0, 0).backlog == pytest.approx(2 * b.latency.estimate("w025", 8))


def test_a_measured_host_cpu_makes_the_planner_plan_as_on_a_shared_cpu():
    """``Scheduler.host_s`` (set by the server's meter where handling runs on the engines'
    CPUs) turns on the snapshot's ``shared_cpu``, and step 1's tighter bound with it."""
    sched = _scheduler()
    sched.submit(Request(1, 0.0, 0.100), 0.0)
    assert not sched._snapshot(0.0, 0).shared_cpu
    sched.host_s = 0.002
    assert sched._snapshot(0.0, 0).shared_cpu


def test_the_slot_holder_keeps_the_others_deadlines():
    # Two lanes of one model. a's head is the most urgent; alone it would run on w100
    # (10 ms of its 11.5). But b's request waits behind it, due at 12 ms and needing its own
    # 2.5 ms on w025: a batch of 10 ms would make it miss, so a runs on w025.
    dev = Device(slots=1)
    a, b = _scheduler(dev), _scheduler(dev)
    a.submit(Request(1, 0.0, 0.0115), 0.0)
    b.submit(Request(2, 0.0, 0.012), 0.0)
    hold = a._snapshot(0.0, 0).hold
    assert hold == pytest.approx(0.012 - b.latency.planned("w025")[1])  # b's slack
    assert b.latency.planned("w025")[1] < hold < a.latency.planned("w100")[1]
    d = a.next(0.0)
    assert d.tier == "w025" and [r.id for r in d.requests] == [1]
    alone = _scheduler(Device(slots=1))  # the same request with nobody behind it: w100
    alone.submit(Request(1, 0.0, 0.0115), 0.0)
    assert alone.next(0.0).tier == "w100"


def test_the_hold_binds_only_while_the_others_can_still_be_served():
    dev = Device(slots=1)
    a, b = _scheduler(dev), _scheduler(dev)
    b.submit(Request(2, 0.0, 0.100), 0.0)  # plenty of slack behind a's 10 ms on w100
    a.submit(Request(1, 0.0, 0.020), 0.0)
    assert a.next(0.0).tier == "w100"
    # b's 16 requests (two batches on w025, ~20 ms) due at 200 ms; 1 ms before their last
    # chance not even one row on w025 can run first without making them miss: they are lost
    # whatever runs, so a more urgent request of a's is not held back to w025.
    dev = Device(slots=1)
    a, b = _scheduler(dev), _scheduler(dev)
    for i in range(16):
        b.submit(Request(10 + i, 0.0, 0.200), 0.0)
    now = 0.200 - b.work_ahead(16)[-1][2] - 0.001
    a.submit(Request(1, now, now + 0.015), now)  # due before b's: a's head goes first
    assert a._snapshot(now, 0).hold == pytest.approx(0.001)
    assert a.next(now).tier == "w100"


def test_without_a_device_each_model_keeps_its_own_slot():
    a, b = _scheduler(), _scheduler()
    a.submit(Request(1, 0.0, 0.2), 0.0)
    b.submit(Request(2, 0.0, 0.1), 0.0)
    assert a.next(0.0) is not None and b.next(0.0) is not None


def test_device_needs_a_slot():
    with pytest.raises(ValueError, match="at least one slot"):
        Device(slots=0)


def test_a_member_at_its_instance_limit_does_not_hold_back_a_free_slot():
    # A runs its one instance on slot 0 and its queue head outranks B's: B may still take
    # slot 1 - A cannot start anything until its batch ends (claim waited for it, and B's
    # request expired with a slot free).
    tiers = [TierInfo("w100", 0.99, {1: 10.0})]
    device = Device(slots=2)
    a, b = (
        Scheduler(tiers, make_policy("innfer", tiers), max_batch=1, max_queue=16,
                  device=device, max_running=1)
        for _ in "ab"
    )  # fmt: skip
    a.submit(Request(1, 0.0, 0.1), 0.0)
    assert a.next(0.0) is not None  # on slot 0
    a.submit(Request(2, 0.0, 0.1, priority=1), 0.0)
    b.submit(Request(3, 0.0, 0.015), 0.0)
    d = b.next(0.0)
    assert d is not None and [r.id for r in d.requests] == [3]


def test_admission_plans_a_model_on_its_instances_not_on_every_slot():
    # A has one instance on a two-slot device and runs a 50 ms batch. Its next batch cannot
    # start before that one ends, whatever the other slot does: a 65 ms budget is refused
    # at the door rather than queued to miss (it was admitted on the idle slot 1 before).
    tiers = [TierInfo("w100", 0.99, {1: 50.0, 2: 50.0})]
    device = Device(slots=2)
    a, b = (
        Scheduler(tiers, make_policy("innfer", tiers), max_batch=2, max_queue=16,
                  device=device, max_running=n)
        for n in (1, 2)
    )  # fmt: skip
    a.submit(Request(1, 0.0, 0.2), 0.0)
    assert a.next(0.0) is not None  # slot 0, 50 ms
    assert device.lanes(a, 0.01) == pytest.approx([0.04], abs=0.005)
    with pytest.raises(Refused, match="cannot be met"):
        a.submit(Request(2, 0.01, 0.075), 0.01)  # its lane frees at ~50 ms, then 50 ms more
    a.submit(Request(3, 0.01, 0.2), 0.01)  # behind its own batch it fits
    # B may use both slots: its request runs on the idle one and fits.
    b.submit(Request(4, 0.01, 0.07), 0.01)
    assert device.lanes(b, 0.01) == pytest.approx([0.0, 0.04], abs=0.005)


def test_a_models_lanes_share_its_instances_on_a_larger_device():
    # A sequence model has a scheduler per length (lanes); on a two-slot device with one
    # instance, its second lane neither starts a batch beside the first lane's (only one
    # engine thread would run it) nor plans a request on the idle slot.
    from server.scheduling.device import Instances

    tiers = [TierInfo("w100", 0.99, {1: 50.0, 2: 50.0})]
    device, one = Device(slots=2), Instances(1)
    short, long = (
        Scheduler(tiers, make_policy("innfer", tiers), max_batch=2, max_queue=16,
                  device=device, instances=one)
        for _ in "ab"
    )  # fmt: skip
    short.submit(Request(1, 0.0, 0.2), 0.0)
    first = short.next(0.0)
    assert first is not None  # slot 0, 50 ms
    assert device.lanes(long, 0.01) == pytest.approx([0.04], abs=0.005)
    with pytest.raises(Refused, match="cannot be met"):
        long.submit(Request(2, 0.01, 0.075), 0.01)
    long.submit(Request(3, 0.01, 0.2), 0.01)
    assert long.next(0.01) is None  # the model's one instance is busy; slot 1 stays free
    assert device.free_slot() == 1
    short.complete(first, 0.05, 0.05)
    assert long.next(0.05) is not None
    with pytest.raises(ValueError, match="max_running 2 differs"):
        Scheduler(tiers, make_policy("innfer", tiers), max_batch=2, max_queue=16,
                  device=device, instances=one, max_running=2)  # fmt: skip


def test_a_models_lanes_hold_max_queue_requests_together_not_each():
    # A sequence model's lanes (one scheduler per profiled length) each checked max_queue
    # against their own queue: MiniLM's 5 lanes held 5x what model.yaml says (and
    # ModelConfig's max_queue_size reports).
    from server.scheduling import State
    from server.scheduling.device import Instances

    tiers = [TierInfo("w100", 0.99, {1: 1.0, 2: 1.0})]
    device, one = Device(slots=1), Instances(1)
    lanes = [Scheduler(tiers, make_policy("innfer", tiers), max_batch=2, max_queue=3,
                       device=device, instances=one) for _ in range(3)]  # fmt: skip
    for i, lane in enumerate(lanes):
        lane.submit(Request(i, 0.0, 10.0), 0.0)
    with pytest.raises(Refused, match=r"queue full \(3 requests waiting\)") as refused:
        lanes[0].submit(Request(9, 0.0, 10.0), 0.0)
    assert refused.value.state == State.REFUSED_FULL
    assert one.queued() == 3
    d = lanes[1].next(0.0)  # one leaves the queue to run: room for one more, in any lane
    assert d is not None and one.queued() == 2
    lanes[2].submit(Request(10, 0.0, 10.0), 0.0)


@pytest.mark.parametrize("how", ["expired", "cancelled"])
def test_a_head_that_leaves_the_queue_wakes_the_others_to_a_free_slot(how):
    # A was refused the free slot for B's more urgent head; B's head then expired (or was
    # cancelled) and nobody woke A: its request waited 1.24 s on an idle device and expired
    # (review helper-137).
    dev = Device(slots=1)
    woken = []
    a, b = _scheduler(dev), _scheduler(dev)
    dev.join(a, on_release=lambda: woken.append("a"))
    dev.join(b, on_release=lambda: woken.append("b"))
    a.submit(Request(1, 0.0, 1.5), 0.0)
    head = Request(2, 0.0, 0.020)
    b.submit(head, 0.0)
    assert a.next(0.0) is None  # b's head is due first
    woken.clear()
    if how == "expired":
        assert b.expire(0.019) == [head]  # no tier serves it in the 1 ms left
    else:
        assert b.cancel(head, 0.001)
    assert woken == ["a"] and a.next(0.019) is not None  # a holds the slot now
    woken.clear()
    b.submit(Request(3, 0.02, 0.5), 0.02)
    b.cancel(b.queue[0], 0.021)  # no free slot: nothing to look again for
    assert woken == []
    a.complete(a.running[0][0], 0.03, 0.01)
    woken.clear()
    b.submit(Request(4, 0.03, 0.5), 0.03)
    b.submit(Request(5, 0.03, 0.9), 0.03)
    b.cancel(b.queue[1], 0.031)  # due after the head: what claim compares stays
    assert woken == []
    dev.leave(b)  # a model that stops fails its queue: no wake-up per request
    woken.clear()
    b.cancel(b.queue[0], 0.032)
    assert woken == []


def test_a_batch_runs_no_longer_than_the_tightest_clients_of_the_device_can_wait():
    # A's clients send 500 ms budgets, B's 20 ms: bounded by its own clients alone, A ran
    # 40 ms batches and B's requests arriving behind them were refused or expired - 5-49 %
    # of them at a fifth to half of the device's capacity (review helper-137).
    dev = Device(slots=1)
    a, b = _scheduler(dev), _scheduler(dev)
    now = 0.0
    for k in range(40):  # B's traffic: 20 ms budgets, served one by one
        b.submit(Request(k, now, now + 0.020), now)
        d = b.next(now)
        now += 0.003
        b.complete(d, now, 0.0025)
    for k in range(8):
        a.submit(Request(100 + k, now, now + 0.5), now)
    d = a.next(now)
    planned = a.latency.planned(d.tier)[d.rows]
    assert planned <= 0.020, (d.tier, d.rows, planned)  # w100 x 8 rows: 40 ms before
    alone = _scheduler()  # the same queue on a device of its own: its clients' bound only
    for k in range(8):
        alone.submit(Request(200 + k, now, now + 0.5), now)
    d = alone.next(now)
    assert alone.latency.planned(d.tier)[d.rows] > 0.020
    # B gone quiet: its last bound no longer caps A's batches (it did for good; review
    # helper-140).
    c = _scheduler(dev)
    assert c._snapshot(now, 0).tight_budget == pytest.approx(0.020)  # B sends now
    # ... and 5 s after its last request, a client sending now and then (review helper-141)
    assert c._snapshot(now + 5.0, 0).tight_budget == pytest.approx(0.020)
    later = now + 3600.0
    # B long quiet: A's queued clients bound it, not B's stale 20 ms
    assert c._snapshot(later, 0).tight_budget == pytest.approx(0.5)


def test_a_lone_request_prices_the_neighbours_arrivals_it_would_turn_away():
    # B's clients send 300 ms budgets at 20/s, A's 12 ms at 100/s. B's lone requests went
    # past the head-of-line bound on w100 (32 ms) because the arrivals it turned away were
    # priced at B's own rate and budgets; A's requests behind it were refused, 24-52 % of
    # them (review helper-287).
    slow = [TierInfo("w100", 0.99, {1: 32.0, 8: 60.0}),
            TierInfo("w050", 0.97, {1: 15.0, 8: 30.0}),
            TierInfo("w025", 0.90, {1: 8.6, 8: 20.0})]  # fmt: skip
    fast = [TierInfo("w100", 0.99, {1: 0.3, 8: 1.0})]
    dev = Device(slots=1)
    a, b = _scheduler(dev, fast), _scheduler(dev, slow)
    alone = _scheduler(None, slow)
    now = 0.0
    for k in range(200):  # 2 s of both models' traffic, each request served at once
        a.submit(Request(k, now, now + 0.012), now)
        a.complete(a.next(now), now + 0.0003, 0.0003)
        if k % 5 == 0:
            for m in (b, alone):
                m.submit(Request(1000 + k, now, now + 0.3), now)
                d = m.next(now)
                m.complete(d, now + 0.0086, 0.0086)
        now += 0.010
    b.submit(Request(9999, now, now + 0.3), now)
    alone.submit(Request(9999, now, now + 0.3), now)
    assert alone.next(now).tier == "w100"  # its own clients alone allow it
    snap = b._snapshot(now, 0)
    assert snap.tight_budget == pytest.approx(0.012) and snap.tight_row == pytest.approx(0.0003)
    assert b.next(now).tier == "w025"  # within 12 ms less A's 0.3 ms row


def test_a_neighbours_priority_does_not_put_its_work_ahead_of_another_models():
    # Priorities order one model's queue, as in Triton. Compared across models, a's 24
    # requests of priority 1 due in 1 s ran first, and b's 38 ms request waited 30 ms
    # behind them: any priority a client of a sent - even 100, a low level - cost b's
    # admitted requests their deadlines (41 % within budget; review helper-306).
    one = [TierInfo("w", 1.0, {1: 10.0, 8: 10.0})]
    dev = Device(slots=1)
    a, b = _scheduler(dev, one), _scheduler(dev, one)
    for i in range(24):
        a.submit(Request(100 + i, 0.0, 1.0, priority=1), 0.0)
    b.submit(Request(1, 0.0, 0.038), 0.0)  # due first: it runs first, and is admitted
    assert dev.claim(a) is None and b.next(0.0) is not None


def test_a_models_own_priority_does_not_put_it_ahead_of_a_neighbours_work_due_sooner():
    # a's 24 requests are due before b's: they run first, whatever b's priority - b's 38 ms
    # request waits their 30 ms and then needs its own 10 ms: refused.
    one = [TierInfo("w", 1.0, {1: 10.0, 8: 10.0})]
    dev = Device(slots=1)
    a, b = _scheduler(dev, one), _scheduler(dev, one)
    for i in range(24):
        a.submit(Request(100 + i, 0.0, 0.035 + 0.0001 * i), 0.0)
    with pytest.raises(Refused, match="cannot be met"):
        b.submit(Request(1, 0.0, 0.038, priority=1), 0.0)


def test_the_planners_backlog_counts_a_neighbours_queue_up_to_its_work_due_first():
    # a's requests due at 50 ms run before b's (due at 100 ms) - and with them a's
    # higher-priority ones due at 500 ms, queued ahead of them: once due, a runs its queue
    # in its own order (counted by deadline alone they were left out, and a model beside a
    # was admitted what then expired; review helper-313). Priorities order a's queue only.
    dev = Device(slots=1)
    a, b = _scheduler(dev), _scheduler(dev)
    b.submit(Request(1, 0.0, 0.100), 0.0)
    for i in range(8):
        a.submit(Request(200 + i, 0.0, 0.050), 0.0)
    one_batch = b.latency.estimate("w025", 8)
    assert b._snapshot(0.0, 0).backlog == pytest.approx(one_batch)
    for i in range(16):
        a.submit(Request(100 + i, 0.0, 0.500, priority=2), 0.0)
    assert [r.id for r in a.queue[:1]] == [100] and len(a.queue) == 24
    assert b._snapshot(0.0, 0).backlog == pytest.approx(3 * one_batch)
    c = _scheduler(Device(slots=1))  # alone: a queue due only after b's counts nothing
    for i in range(16):
        c.submit(Request(300 + i, 0.0, 0.500, priority=2), 0.0)
    assert c.work_due(0.100) == 0.0


def test_a_models_next_batch_is_as_urgent_as_the_earliest_request_it_takes():
    # One priority-1 request with a 10 s timeout at the head of a's queue ranked a by its
    # deadline: b's 100 ms work went first for as long as b had any, and the 20 ms requests
    # behind a's head - which a's next batch carries - expired (365 of 376 in a simulated
    # run; review helper-309).
    one = [TierInfo("w", 1.0, {1: 1.0, 8: 4.0})]
    dev = Device(slots=1)
    a, b = _scheduler(dev, one), _scheduler(dev, one)
    a.submit(Request(1, 0.0, 10.0, priority=1), 0.0)
    a.submit(Request(2, 0.0, 0.020), 0.0)
    b.submit(Request(3, 0.0, 0.100), 0.0)
    assert dev.claim(b) is None and dev.claim(a) is not None
    d = a.next(0.0)
    assert {r.id for r in d.requests} == {1, 2}


def test_a_neighbours_requests_of_several_lengths_are_counted_as_the_batches_they_run_as():
    # Requests of 8 lengths run as 8 batches; the backlog and the hold counted them as one
    # (review helper-147: b admitted a 40 ms request behind ~80 ms of a's work).
    one = [TierInfo("w", 1.0, {1: 10.0, 8: 10.0})]
    dev = Device(slots=1)
    a, b = _scheduler(dev, one), _scheduler(dev, one)
    for i in range(8):
        a.submit(Request(100 + i, 0.0, 1.0, group=(i + 3,)), 0.0)
    batch = float(a.ctx.tables()[0][0, 1])  # one row on w, at the planning quantile
    assert a.work_due(2.0) == pytest.approx(8 * batch)
    assert a.work_ahead(8)[-1][2] == pytest.approx(8 * batch)
    b.submit(Request(1, 0.0, 2.0), 0.0)  # due after a's: behind all 8 batches
    assert b._snapshot(0.0, 0).backlog == pytest.approx(8 * batch)
    same = _scheduler(Device(slots=1), one)  # one length: one batch, as before
    for i in range(8):
        same.submit(Request(200 + i, 0.0, 1.0, group=(5,)), 0.0)
    assert same.work_due(2.0) == pytest.approx(batch)


def test_a_member_that_left_is_forgotten_as_passed():
    """``passed`` is kept by id: a member that passed and then left must not leave its id
    behind, or a scheduler joining later at the same address (here: the same object back)
    would not hold the others back with its more urgent head."""
    dev = Device(slots=1)
    a, b = _scheduler(dev), _scheduler(dev)
    a.submit(Request(1, 0.0, 0.050), 0.0)
    dev.passed(a)
    dev.leave(a)
    dev.join(a)
    b.submit(Request(2, 0.0, 0.500), 0.0)
    assert dev.claim(b) is None  # a's head is due first


def test_an_expiry_behind_the_head_wakes_the_members_it_held_back():
    # What claim compares is the first max_batch queued, not the head alone: b's request X
    # (due at 5 ms, behind b's priority head due in 10 s) held a back; X expired and no one
    # was told - the free slot idled and a's request expired at 50 ms (review helper-311).
    one = [TierInfo("w", 1.0, {1: 1.0, 8: 4.0})]
    dev, woke = Device(slots=1), []
    a, b = _scheduler(dev, one), _scheduler(dev, one)
    dev.join(a, on_release=lambda: woke.append("a"))
    dev.join(b, on_release=lambda: woke.append("b"))
    a.submit(Request(1, 0.0, 0.050), 0.0)
    running = a.next(0.0)
    b.submit(Request(2, 0.0, 10.0, priority=1), 0.0)
    b.submit(Request(3, 0.0, 0.005), 0.0)  # X
    a.submit(Request(4, 0.0, 0.050), 0.0)
    now = 0.0045  # a's batch overran its plan: X cannot be met any more
    a.complete(running, now, now)
    assert a.next(now) is None  # b's X is due first
    woke.clear()
    assert [r.id for r in b.expire(now)] == [3]
    assert "a" in woke and a.next(now) is not None  # a is told, and starts


def test_a_models_lanes_keep_its_own_priority_order():
    # A priority orders its model's queue, and a text model's queue is its length lanes:
    # across models the device runs by deadline, but between one model's lanes a priority-1
    # request still goes first and counts as ahead (as before review helper-306's change,
    # which took priorities out of the order between lanes too).
    from server.scheduling.device import Instances

    one = [TierInfo("w", 1.0, {1: 10.0, 8: 10.0})]
    dev, model = Device(slots=1), Instances(1)
    short, long = (_scheduler(dev, one, model) for _ in "ab")
    short.submit(Request(1, 0.0, 1.0, priority=1), 0.0)
    long.submit(Request(2, 0.0, 0.5), 0.0)
    assert dev.claim(long) is None and dev.claim(short) is not None  # priority first
    for i in range(24):  # the short lane's priority-1 work due in 1 s runs first...
        short.submit(Request(10 + i, 0.0, 1.0, priority=1), 0.0)
    with pytest.raises(Refused, match="cannot be met"):  # ... ahead of a 38 ms request
        long.submit(Request(3, 0.0, 0.038), 0.0)
    other = _scheduler(dev, one)  # another model's 38 ms request runs before them
    other.submit(Request(4, 0.0, 0.038), 0.0)


def test_a_lanes_head_that_leaves_wakes_the_models_other_lanes():
    # Between a model's lanes the head ranks (priority first): its cancel changed nothing
    # the next batch's due time showed, and the lane it held back was not told.
    from server.scheduling.device import Instances

    one = [TierInfo("w", 1.0, {1: 10.0, 8: 10.0})]
    dev, model, woke = Device(slots=1), Instances(1), []
    short, long = (_scheduler(dev, one, model) for _ in "ab")
    dev.join(long, on_release=lambda: woke.append("long"))
    head = Request(1, 0.0, 1.0, priority=1)
    short.submit(head, 0.0)
    short.submit(Request(2, 0.0, 0.4), 0.0)
    long.submit(Request(3, 0.0, 0.5), 0.0)
    assert dev.claim(long) is None
    assert short.cancel(head, 0.001)
    assert woke == ["long"] and dev.claim(long) is None  # told; short's 0.4 s is first


def test_a_models_lanes_and_another_model_never_refuse_each_other_in_a_cycle():
    # Lane 1 before lane 2 by priority, lane 2 before model N by deadline, N before lane 1
    # by deadline: ranked lane by lane, each refused the next and every slot idled until a
    # request expired (review helper-312). Across models a model ranks by all its lanes.
    from server.scheduling.device import Instances

    one = [TierInfo("w", 1.0, {1: 1.0, 8: 4.0})]
    dev, model = Device(slots=1), Instances(1)
    lane1, lane2 = (_scheduler(dev, one, model) for _ in "ab")
    n = _scheduler(dev, one)
    lane1.submit(Request(1, 0.0, 1.0, priority=1), 0.0)
    lane2.submit(Request(2, 0.0, 0.005), 0.0)
    n.submit(Request(3, 0.0, 0.010), 0.0)
    assert [s.next(0.0) is not None for s in (lane1, lane2, n)] == [True, False, False]


def test_a_full_batch_of_priority_requests_does_not_hide_the_queue_behind_it():
    # Eight priority-1 requests due in 10 s filled the first max_batch places, and the
    # model ranked at 10 s: its 20 ms request behind them expired while a neighbour's work
    # due later ran (365 of 383 in helper-312's simulation). A queue ranks by its earliest
    # deadline anywhere.
    one = [TierInfo("w", 1.0, {1: 1.0, 8: 4.0})]
    dev = Device(slots=1)
    a, b = _scheduler(dev, one), _scheduler(dev, one)
    for i in range(8):
        a.submit(Request(i, 0.0, 10.0, priority=1), 0.0)
    a.submit(Request(8, 0.0, 0.020), 0.0)
    b.submit(Request(9, 0.0, 0.030), 0.0)
    assert a.next(0.0) is not None and b.next(0.0) is None


def test_the_planners_backlog_is_behind_the_last_queued_not_a_priority_heads_deadline():
    # A priority head due in 10 s, in the very batch being chosen, made the latest deadline
    # queued 10 s: all of a neighbour's queue counted as running first, and the model fell
    # to a smaller tier (helper-312). The last queued in the model's own order counts.
    dev = Device(slots=1)
    a, b = _scheduler(dev), _scheduler(dev)
    for i in range(40):
        b.submit(Request(100 + i, 0.0, 0.300), 0.0)
    a.submit(Request(1, 0.0, 10.0, priority=1), 0.0)
    for i in range(12):
        a.submit(Request(2 + i, 0.0, 0.060), 0.0)
    assert a._snapshot(0.0, 0).backlog == 0.0


def test_a_priority_head_due_late_does_not_lift_the_hold_on_its_neighbours_batches():
    # A's requests behind a priority head due in 10 s were keyed at 10 s: the hold counted
    # a third model's work as running before them, went negative, and the deciding model
    # ran with no limit at all (review helper-313). Keyed by the earliest deadline at or
    # behind each, the hold is what it is without the priority head.
    one = [TierInfo("w", 1.0, {1: 1.0, 8: 4.0})]
    slow = [TierInfo("w", 1.0, {1: 5.0, 8: 20.0})]

    def hold(priority_head: bool) -> float:
        dev = Device(slots=1)
        a, b, c = _scheduler(dev, one), _scheduler(dev), _scheduler(dev, slow)
        for i in range(64):
            c.submit(Request(300 + i, 0.0, 1.0), 0.0)
        if priority_head:
            a.submit(Request(1, 0.0, 10.0, priority=1), 0.0)
        for i in range(24):
            a.submit(Request(100 + i, 0.0, 0.032), 0.0)
        return dev.hold(b, 0.0)

    plain = hold(False)
    assert plain > 0 and hold(True) == pytest.approx(plain, abs=0.002)


def test_an_eviction_of_the_earliest_deadline_wakes_the_members_it_held_back():
    # Y's last request, due at 30 ms behind nine priority heads due in 10 s, was Y's rank;
    # a priority arrival evicted it and no one was told: X's 50 ms request waited beside a
    # free slot until it expired (review helper-313).
    one = [TierInfo("w", 1.0, {1: 1.0, 8: 4.0})]
    dev, woke = Device(slots=1), []
    x = _scheduler(dev, one)
    y = Scheduler(one, make_policy("innfer", one), max_batch=8, max_queue=10, device=dev)
    dev.join(x, on_release=lambda: woke.append("x"))
    for i in range(9):
        y.submit(Request(i, 0.0, 10.0, priority=1), 0.0)
    y.submit(Request(9, 0.0, 0.030), 0.0)
    x.submit(Request(101, 0.0, 0.050), 0.0)
    assert x.next(0.0) is None  # y is due first
    woke.clear()
    y.submit(Request(10, 0.001, 10.0, priority=1), 0.001)  # evicts request 9
    assert "x" in woke and x.next(0.001) is not None
