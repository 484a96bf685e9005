"""A text model's lane plans by the tokens of the texts it holds - a text alone at its own,
a queue at their mean, a running batch at its own - not at the lane's own length, and
learns each batch at its texts' mean length (``server.scheduling.lengths``). Before, a
140-token text in the 256 lane was planned as 256 tokens: refused on an idle replica at
budgets it met in half the time, and its batches taught the lane that 256-token batches
were that fast (review helper-317). Pure: scripted clock, no engine."""

from __future__ import annotations

import pytest

from server.scheduling import LatencyModel, Refused, Request, Scheduler, TierInfo, make_policy
from server.scheduling.device import Device
from server.scheduling.lengths import LengthSpan

# ms at 128 and 256 tokens per batch of 1 / 8 rows (p50; p90 5 % above): at l tokens
# between, the 256 profile x (0.5 + 0.5 (l - 128) / 128)
AT = {128: {1: 10.0, 8: 40.0}, 256: {1: 20.0, 8: 80.0}}


def tiers(n: int, names=("w100",)) -> list[TierInfo]:
    return [
        TierInfo(name, 1.0 - 0.1 * i, {b: ms * 1.05 for b, ms in AT[n].items()}, AT[n])
        for i, name in enumerate(names)
    ]


def lane(max_batch: int = 8, slots: int = 1, max_queue: int = 100) -> Scheduler:
    span = LengthSpan(128, 256, tiers(128))
    lat = LatencyModel(tiers(256), span=span)
    return Scheduler(tiers(256), make_policy("innfer", tiers(256)), max_batch=max_batch,
                     max_queue=max_queue, latency=lat, device=Device(slots))  # fmt: skip


def text(i: int, tokens: int, budget: float, now: float = 0.0) -> Request:
    return Request(i, now, now + budget, length=tokens)


def test_plan_points_round_a_length_up_between_the_two_profiles():
    span = LengthSpan(128, 256, tiers(128))
    assert [span.step(n) for n in (129, 144, 145, 200, 255, 256, 999)] == [1, 1, 2, 5, 8, 8, 8]
    p50, p90, sigma = span.rows(tiers(256)[0], 4)  # half way: 192 tokens
    assert p50[1] == pytest.approx(0.015) and p50[8] == pytest.approx(0.060)
    assert p90[1] == pytest.approx(0.01575) and sigma[1] > 0
    assert span.typical(tiers(256)[0], 8, 160) == pytest.approx(0.050)  # exact, not rounded


def test_the_lane_keeps_its_own_shape_across_batch_sizes():
    # The 128 profile batches better (8 rows: 3x one row) than the 256 one (4x): a batch
    # of mixed lengths, padded to its longest, does not - planned with the lane's shape.
    lo = [TierInfo("w100", 1.0, {1: 10.0, 8: 30.0}, {1: 10.0, 8: 30.0})]
    p50, _, _ = LengthSpan(128, 256, lo).rows(tiers(256)[0], 4)
    assert p50[8] / p50[1] == pytest.approx(4.0)


def test_a_shorter_profile_slower_than_the_lanes_never_plans_above_the_lanes_own():
    slow = [TierInfo("w100", 1.0, {1: 30.0, 8: 100.0}, {1: 30.0, 8: 100.0})]
    p50, _, _ = LengthSpan(128, 256, slow).rows(tiers(256)[0], 4)
    assert p50[1] == pytest.approx(0.020) and p50[8] == pytest.approx(0.080)


def test_a_tier_the_shorter_profile_lacks_stays_at_the_lanes_length():
    span = LengthSpan(128, 256, tiers(128, names=("other",)))
    assert span.rows(tiers(256)[0], 1)[0][1] == pytest.approx(0.020)


def test_set_length_moves_every_plan_and_only_at_a_new_plan_point():
    lat = LatencyModel(tiers(256), span=LengthSpan(128, 256, tiers(128)))
    assert lat.length_aware and lat.length == 256
    full = lat.estimate("w100", 8)
    v = lat.version
    assert lat.set_length(192) and lat.length == 192 and lat.version == v + 1
    assert lat.estimate("w100", 8) == pytest.approx(full * 0.75, rel=1e-6)
    assert lat.mean("w100", 8) < full
    assert not lat.set_length(180)  # same plan point (176 < 180 <= 192)
    assert lat.set_length(170) and lat.length == 176  # one point down after a move down
    assert lat.set_length(200) and lat.length == 208
    assert not lat.set_length(190) and lat.length == 208  # one down just after a move up: kept
    assert lat.set_length(150) and lat.length == 160
    assert lat.set_length(400) and lat.estimate("w100", 8) == pytest.approx(full)
    plain = LatencyModel(tiers(256))
    assert not plain.length_aware and not plain.set_length(130) and plain.length is None


def test_batches_of_short_texts_teach_no_speed_up_of_the_lanes_long_ones():
    lat = LatencyModel(tiers(256), span=LengthSpan(128, 256, tiers(128)))
    for _ in range(30):  # 160-token batches, exactly as fast as the profile says there
        lat.observe("w100", 8, 0.050, length=160)
    assert lat.factor["w100"] == pytest.approx(1.0, abs=1e-9)
    assert lat.median("w100", 8) == pytest.approx(0.080)  # a 256-token batch: as profiled
    # Compared with the lane's own length (no length: as before), they read as 0.62x
    blind = LatencyModel(tiers(256), span=LengthSpan(128, 256, tiers(128)))
    for _ in range(30):
        blind.observe("w100", 8, 0.050)
    assert blind.factor["w100"] == pytest.approx(0.625, rel=0.01)


def test_an_idle_lane_admits_a_short_text_its_lanes_length_would_not():
    s = lane()
    # alone at 1 row: 140 tokens (planned at 144) 11.25 ms; 256 tokens 20 ms
    s.submit(text(1, 140, budget=0.013), now=0.0)
    with pytest.raises(Refused, match="below the fastest allowed tier"):
        s.submit(text(2, 250, budget=0.013), now=0.0)
    assert s.latency.length == 144  # the refusal left the plan as it was


def test_the_lane_plans_at_the_mean_length_of_the_texts_queued_or_running():
    s = lane(max_batch=1)
    s.submit(text(1, 140, budget=1.0), now=0.0)
    assert s.latency.length == 144  # alone: its own (rounded up to a plan point)
    s.submit(text(2, 250, budget=2.0), now=0.0)
    assert s.latency.length == 208  # mean 195
    d1 = s.next(0.0)
    assert [r.id for r in d1.requests] == [1] and s.latency.length == 208  # running counts
    s.complete(d1, 0.011, compute_s=0.011)
    assert s.latency.length == 256  # the 250-token text alone
    d2 = s.next(0.011)
    s.submit(text(3, 130, budget=1.0), now=0.012)
    assert [r.id for r in d2.requests] == [2] and s.latency.length == 192  # mean 190
    s.complete(d2, 0.031, compute_s=0.020)
    assert s.latency.length == 144  # only the 130-token text is left
    assert s.cancel(s.queue[0], 0.032)
    assert s.latency.length == 144  # nothing held: as it was (not the lowest point)


def test_an_emptied_lane_keeps_planning_at_its_traffics_length():
    # (dropping to the lowest point, the other lanes saw a lane of 250-token texts need
    # half what it does, and its latency gauge read half: review helper-318)
    s = lane(max_batch=1)
    for i in range(3):
        s.submit(text(i, 250, budget=1.0), now=0.0)
        s.complete(s.next(0.0), 0.02, compute_s=0.02)
    assert not s.queue and not s.running and s.latency.length == 256


def test_the_mean_length_counts_texts_not_requests():
    s = lane()
    s.submit(text(2, 130, budget=1.0), now=0.0)
    s.submit(Request(1, 0.0, 1.0, rows=7, length=250), now=0.0)
    assert s.latency.length == 240  # (7 x 250 + 130) / 8 = 235, up to 240 (192 per request)


def test_a_running_batch_is_planned_at_its_own_length_not_the_queues():
    # A 256-token text running; short texts queue behind it in its lane: the slot it holds
    # frees when the long batch ends, whatever the queue's mean (it was planned at 0.55x
    # its time, and another lane admitted a request that was then answered late).
    s = lane(max_batch=1)
    s.submit(text(1, 256, budget=1.0), now=0.0)
    d = s.next(0.0)
    left = s.device.offsets(0.001)[0]
    for i in range(7):
        s.submit(text(10 + i, 130, budget=2.0), now=0.001)
    assert s.latency.length < 200  # the queue's mean
    assert s.device.offsets(0.001)[0] == pytest.approx(left, rel=1e-6)
    assert s.batch_length(d) == 256


def test_a_running_batch_is_planned_at_its_own_length_where_the_model_has_fewer_instances():
    # Device.lanes: one instance on a two-slot device (its own running batches first).
    from server.scheduling.device import Instances

    s = Scheduler(tiers(256), make_policy("innfer", tiers(256)), max_batch=1, max_queue=100,
                  latency=LatencyModel(tiers(256), span=LengthSpan(128, 256, tiers(128))),
                  device=Device(2), instances=Instances(1))  # fmt: skip
    s.submit(text(1, 256, budget=1.0), now=0.0)
    s.next(0.0)
    left = s.device.lanes(s, 0.001)[0]
    for i in range(7):
        s.submit(text(10 + i, 130, budget=2.0), now=0.001)
    assert s.device.lanes(s, 0.001)[0] == pytest.approx(left, rel=1e-6)


def test_a_lane_comes_down_to_traffic_one_point_below_its_own_length():
    # (kept one point high after any move, a fresh 256 lane planned 225-240-token traffic
    # at 256 for good: helper-319)
    s = lane()
    s.submit(text(1, 235, budget=1.0), now=0.0)
    assert s.latency.length == 240


def test_a_batch_is_learned_at_its_texts_mean_length_by_rows():
    s = lane()
    s.submit(Request(1, 0.0, 1.0, rows=7, length=250), now=0.0)
    s.submit(text(2, 130, budget=1.0), now=0.0)
    d = s.next(0.0)
    assert d.rows == 8 and s.batch_length(d) == 235  # (7 x 250 + 130) / 8; per request 190
    p50 = (20.0 + 60.0) * (0.5 + 0.5 * (235 - 128) / 128) / 1e3  # the profile there, 8 rows
    s.complete(d, p50, compute_s=p50)
    assert s.latency.factor["w100"] == pytest.approx(1.0, abs=1e-6)


def test_a_request_without_a_length_counts_as_the_lanes_own_in_its_batch():
    s = lane()
    s.submit(Request(1, 0.0, 1.0), now=0.0)
    s.submit(text(2, 130, budget=1.0), now=0.0)
    assert s.batch_length(s.next(0.0)) == 193  # (256 + 130) / 2


def test_a_short_text_beside_a_long_running_one_is_judged_alone_at_its_own_length():
    # Two slots: one runs a 250-token text, the other is free. The lane plans at their mean
    # (195 -> 208 tokens: 16.25 ms at 1 row); alone, 140 tokens take 11.25 ms.
    s = lane(max_batch=1, slots=2)
    s.submit(text(1, 250, budget=1.0), now=0.0)
    s.next(0.0)
    s.submit(text(2, 140, budget=0.014), now=0.0)
    assert s.queue[0].id == 2


def test_a_text_evicted_by_another_lanes_request_leaves_its_lanes_length():
    # Two lanes share the model's max_queue (2): a more urgent request in one takes the
    # place of the other's least urgent text, whose lane must plan without it.
    from server.scheduling.device import Instances

    device, shared = Device(1), Instances(1)
    lanes = [
        Scheduler(tiers(256), make_policy("innfer", tiers(256)), max_batch=8, max_queue=2,
                  latency=LatencyModel(tiers(256), span=LengthSpan(128, 256, tiers(128))),
                  device=device, instances=shared)
        for _ in range(2)
    ]  # fmt: skip
    a, b = lanes
    a.submit(text(1, 140, budget=1.0), now=0.0)
    a.submit(text(2, 250, budget=2.0), now=0.0)
    assert a.latency.length == 208  # mean 195
    b.submit(Request(3, 0.0, 1.0, priority=1, length=250), now=0.0)
    assert [r.id for r in a.queue] == [1] and a.latency.length == 144


def test_expiry_catches_a_long_text_a_queue_of_short_ones_plans_short():
    # 40 texts of 130 tokens (the array path: > 24 queued) and one of 250 due in 15 ms: at
    # the queue's mean (133 -> 144 tokens) it takes 11.25 ms alone - at its own, 20 ms.
    s = lane()
    for i in range(40):
        s.submit(text(100 + i, 130, budget=60.0), now=0.0)
    long = text(1, 250, budget=1.0)
    s.submit(long, now=0.0)
    assert s.latency.length == 144
    assert long in s.expire(now=1.0 - 0.015)


@pytest.mark.parametrize("queued", [3, 40])  # the plain path, and the array path (> 24)
def test_expiry_judges_a_short_text_at_its_own_length_behind_long_ones(queued):
    s = lane()
    for i in range(queued):
        s.submit(text(100 + i, 250, budget=60.0), now=0.0)
    assert s.latency.length == 256
    short = text(1, 140, budget=1.0)
    s.submit(short, now=0.0)
    # 16 ms before its deadline: alone at 140 tokens it takes 11.25 ms (fastest tier, 1
    # row), at the lane's 256 tokens 20 ms - it is not past hope.
    gone = s.expire(now=1.0 - 0.016)
    assert short not in gone and short in s.queue
    gone = s.expire(now=1.0 - 0.010)
    assert short in gone


def test_a_text_kept_by_its_grace_at_expiry_still_counts_in_the_lanes_length():
    s = lane()
    long = Request(1, 0.0, 1.0, length=250, grace=0.5)  # past its deadline, within grace
    s.submit(long, now=0.0)
    s.submit(text(2, 140, budget=5.0), now=0.0)
    assert s.latency.length == 208  # mean 195
    assert s.expire(now=0.99) == [] and long in s.queue
    assert s.latency.length == 208
