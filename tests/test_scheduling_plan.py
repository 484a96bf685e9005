"""server/scheduling/plan.py: the queue as it will run, checked against a plain-Python
reference of the same rules (per fastest allowed tier, next-fit batches in queue order; a
batch runs on the plan's tier where all its requests allow it, else on their fastest
allowed tier; a candidate's head batch taken out of its batches without re-forming them;
batches in the order of their first request (left, where the candidate says the batches it
took from move), each on the slot that frees first; a batch's
end the Fenton-Wilkinson quantile of the sum of independent log-normal batch times)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.scheduling import Context, LatencyModel, Request, TierInfo
from server.scheduling.latency import sum_quantile
from server.scheduling.plan import (
    Candidate,
    Columns,
    admission_finish,
    feasible,
    form_groups,
    group_key,
    quantile,
)

# Noisy tiers (p90 above p50), so that variances and the quantile of sums are exercised.
TIERS = [
    TierInfo("big", 0.99, {1: 3.0, 4: 6.0, 8: 10.0}, {1: 2.5, 4: 5.0, 8: 8.5}),
    TierInfo("mid", 0.95, {1: 2.0, 4: 4.0, 8: 6.5}, {1: 1.6, 4: 3.4, 8: 5.6}),
    TierInfo("small", 0.9, {1: 1.0, 4: 2.0, 8: 3.0}, {1: 0.9, 4: 1.6, 8: 2.7}),
]
NAMES = [t.name for t in TIERS]
# The same, with "mid" profiled only up to 4 rows: a plan that puts more on it can never be
# on time (inf in the tables, a NaN end), which the plan must count as late.
NARROW = [TIERS[0], TierInfo("mid", 0.95, {1: 2.0, 4: 4.0}, {1: 1.6, 4: 3.4}), TIERS[2]]


def reference(queue, ctx, plan, skip, head, others, now, caps=None, moved=False):
    """Whether the rest is feasible, plainly: the specification ``plan`` implements.
    ``caps``: batch rows per fastest tier (default ``ctx.max_batch`` for each); ``moved``:
    a batch the head took from runs at its first request left, else at its first's."""
    lat = ctx.latency
    open_batch: dict[str, list] = {}
    batches = []  # [rows, [requests]] in the order of their first request
    for r in queue:
        key = (ctx.fastest(r), r.group)  # requests of two groups never share a batch
        b = open_batch.get(key)
        cap = ctx.max_batch if caps is None else caps[ctx.fastest(r)]
        if b is None or b[0] + r.rows > cap:
            b = [0, []]
            batches.append(b)
            open_batch[key] = b
        b[0] += r.rows
        b[1].append(r)
    slots = [[0.0, *head]] + [[o, 0.0, 0.0] for o in others]  # offset, mean, variance
    where = {r.id: i for i, r in enumerate(queue)}
    rest = [(reqs[0], [r for r in reqs if r.id not in skip]) for _, reqs in batches]
    placed = sorted((where[(x[0] if moved else first).id], x) for first, x in rest if x)
    for _, left in placed:
        may = set.intersection(*(set(ctx.allowed(r)) for r in left))
        tier = plan if plan in may else ctx.fastest(left[0])
        rows = sum(r.rows for r in left)
        if rows > ctx.tiers[ctx.rank[tier]].max_batch:
            return False  # a size the tier's profile does not reach: never on time
        i = min(range(len(slots)), key=lambda k: (slots[k][0] + slots[k][1], k))
        slots[i][1] += lat.mean(tier, rows)
        slots[i][2] += lat.var(tier, rows)
        off, m, v = slots[i]
        if now + off + float(sum_quantile(m, v, lat.z)) > min(r.deadline for r in left):
            return False
    return True


constraint = st.sampled_from(
    [{}] * 5 + [{"pin": n} for n in NAMES] + [{"min_tier": n} for n in NAMES[:2]]
)
# (deadline ms, rows, constraint, priority, group: most requests of none, some of two lengths)
group = st.sampled_from([None] * 4 + [(3,), (5,)])
request = st.tuples(st.integers(1, 80), st.integers(1, 8), constraint, st.integers(0, 1), group)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.lists(request, min_size=1, max_size=60),
    checks=st.lists(
        st.tuples(st.sampled_from([None, *NAMES]), st.sets(st.integers(0, 12), max_size=6)),
        min_size=1,
        max_size=3,
    ),
    slots=st.integers(1, 3),
    max_batch=st.sampled_from([4, 8]),
    narrow=st.booleans(),
    per_tier=st.sampled_from([None, (8, 2, 4), (1, 8, 3)]),
    moved=st.booleans(),
)
def test_the_compiled_plan_is_the_reference_plan(
    spec, checks, slots, max_batch, narrow, per_tier, moved
):
    """Each candidate with its own plan tier and head batch (so the -1 padding and the
    per-candidate reset of what a head took out are exercised), on 1-3 slots, with and
    without a tier whose profile stops short of the batch size, with one batch size or one
    per tier."""
    tiers = NARROW if narrow else TIERS
    ctx = Context(tiers, LatencyModel(tiers), max_batch)
    # Priorities make the queue order differ from the deadline order.
    queue = [
        Request(k, 0.0, ms * 1e-3, rows=min(rows, max_batch), priority=prio, group=g, **c)
        for k, (ms, rows, c, prio, g) in enumerate(spec)
    ]
    queue.sort(key=lambda r: (-r.priority, r.deadline, r.id))
    head = (ctx.latency.mean("big", 2), ctx.latency.var("big", 2))
    others = [0.0005 * k for k in range(1, slots)]
    now = 0.001
    cols = ctx.columns(queue)
    sizes = [max_batch] * 3 if per_tier is None else [min(b, max_batch) for b in per_tier]
    caps = dict(zip(NAMES, sizes, strict=True))
    groups = form_groups(cols, max_batch if per_tier is None else sizes)
    candidates, want = [], []
    for plan, skip in checks:
        skip = sorted(i for i in skip if i < len(queue))
        rank = None if plan is None else ctx.rank[plan]
        candidates.append(Candidate(skip, *head, rank, moved))
        ids = {queue[i].id for i in skip}
        want.append(reference(queue, ctx, plan, ids, head, others, now, caps, moved))
    got = feasible(groups, cols, candidates, ctx.tables(), ctx.latency.z, others, now)
    assert got == want
    # Every request is in exactly one batch, the one ``of`` names.
    members = [groups.members(g) for g in range(len(groups))]
    assert sorted(i for m in members for i in m) == list(range(len(queue)))
    assert all(groups.of[i] == g for g, m in enumerate(members) for i in m)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.lists(request, min_size=0, max_size=40),
    new=request,
    slots=st.integers(1, 3),
    running=st.floats(0.0, 0.01),
    per_tier=st.sampled_from([None, (8, 2, 4), (1, 8, 3)]),
)
def test_admission_finish_is_the_earliest_of_its_own_batch_and_one_it_joins(
    spec, new, slots, running, per_tier
):
    """The new request's end: its own batch on the fastest tiers' plan, or an earlier batch
    it joins that still ends by its own requests' earliest deadline - a plain sum per slot,
    each batch on the slot that frees first; batches of 8 rows, or of a size per fastest
    tier."""
    ctx = Context(TIERS, LatencyModel(TIERS), 8)
    caps = [8, 8, 8] if per_tier is None else list(per_tier)
    queue = sorted(
        (
            Request(k, 0.0, ms * 1e-3, rows=rows, group=g, **c)
            for k, (ms, rows, c, _, g) in enumerate(spec)
        ),
        key=lambda r: r.deadline,
    )
    _, rows, c, _, g = new
    r = Request(99, 0.0, 1.0, rows=rows, group=g, **c)  # queued last
    lo, hi = ctx.bounds(r)
    busy = [running] + [0.0005 * k for k in range(1, slots)]
    behind = ctx.columns([*queue, Request(100, 0.0, 2.0)])  # one more queued behind r
    got = admission_finish(behind, len(queue), (r.rows, lo, hi), 8 if per_tier is None else caps,
                           ctx.tables(), ctx.latency.z, busy[::-1], group_key(g), 0.0)  # fmt: skip
    lat = ctx.latency
    batches, open_batch = [], {}  # [fastest tier rank, rows, group, due], next-fit per class
    for q in [*queue, r]:
        key = (ctx.bounds(q)[1], q.group)
        k = open_batch.get(key)
        if k is None or batches[k][1] + q.rows > caps[key[0]]:
            k = open_batch[key] = len(batches)
            batches.append([key[0], 0, q.group, math.inf])
        batches[k][1] += q.rows
        if q is not r:
            batches[k][3] = min(batches[k][3], q.deadline)
    mine = open_batch[(hi, g)]  # r's: the last batch of its class
    names = [t.name for t in ctx.tiers]
    chains = [[off, 0.0, 0.0] for off in sorted(busy)]  # offset, mean, variance per slot
    options, after = [], False
    for k in range(mine + 1):
        rank, b, of, due = batches[k]
        t = names[rank]
        off, m, v = min(chains, key=lambda x: x[0] + x[1])
        if k < mine and lo <= rank <= hi and b + r.rows <= caps[rank] and of == g:
            mj, vj = m + lat.mean(t, b + r.rows), v + lat.var(t, b + r.rows)
            end = off + float(sum_quantile(mj, vj, lat.z))
            if end <= due:  # a join that makes the batch miss its own deadline: not a plan
                options.append(end)
        if k == mine and b > r.rows:  # next-fit put r with earlier requests ...
            end = off + float(sum_quantile(m + lat.mean(t, b), v + lat.var(t, b), lat.z))
            after = end > due  # ... whose deadline that batch would miss: it runs alone
            b -= r.rows if after else 0  # after the queue ahead
        slot = min(chains, key=lambda x: x[0] + x[1])
        slot[1] += lat.mean(t, b)
        slot[2] += lat.var(t, b)
    if after:
        for rank, b, _, _ in batches[mine + 1 :]:
            slot = min(chains, key=lambda x: x[0] + x[1])
            slot[1] += lat.mean(names[rank], b)
            slot[2] += lat.var(names[rank], b)
        slot = min(chains, key=lambda x: x[0] + x[1])
        t = names[batches[mine][0]]
        slot = [slot[0], slot[1] + lat.mean(t, r.rows), slot[2] + lat.var(t, r.rows)]
    off, m, v = slot
    options.append(off + float(sum_quantile(m, v, lat.z)))
    assert got == pytest.approx(min(options), rel=1e-9)


def test_batches_are_real_sizes_per_fastest_tier_in_the_order_of_their_first_request():
    ctx = Context(TIERS, LatencyModel(TIERS), 8)
    queue = [
        Request(0, 0.0, 0.010, rows=3),
        Request(1, 0.0, 0.011, pin="big"),
        Request(2, 0.0, 0.012, rows=6),  # does not fit after the 3: a batch of its own
        Request(3, 0.0, 0.013, rows=2),
        Request(4, 0.0, 0.014, min_tier="mid"),
    ]
    g = form_groups(ctx.columns(queue), 8)
    assert [NAMES[t] for t in g.hi] == ["small", "big", "small", "mid"]
    assert g.rows.tolist() == [3, 1, 8, 1] and g.head.tolist() == [0, 1, 2, 4]
    assert g.of.tolist() == [0, 1, 2, 2, 3] and g.members(2) == [2, 3]
    assert [NAMES[t] for t in g.lo] == ["big", "big", "big", "big"]


def test_a_moved_batch_that_lost_its_front_to_the_head_runs_at_its_first_request_left():
    """Queue: an unpinned request due at 3 ms, one pinned to "big" due at 6.5 ms, then
    seven unpinned due at 50 ms - the unpinned form one batch with the first. A head of the
    first request alone leaves that batch's seven: moved, they run after the pinned one
    (their first request is behind it), which then makes its deadline; at the batch's old
    place they make the pinned one late (review helper-178)."""
    tiers = [TierInfo("big", 0.99, {1: 4.0, 8: 14.0}), TierInfo("small", 0.93, {1: 1.0, 8: 3.5})]
    lat = LatencyModel(tiers)
    ctx = Context(tiers, lat, 8)
    queue = [Request(0, 0.0, 0.003), Request(1, 0.0, 0.0065, pin="big")]
    queue += [Request(2 + k, 0.0, 0.050) for k in range(7)]
    cols = ctx.columns(queue)
    g = form_groups(cols, 8)
    assert g.head.tolist() == [0, 1] and g.rows.tolist() == [8, 1]
    head = (lat.mean("small", 1), lat.var("small", 1))
    assert 0.001 + lat.estimate("small", 1) + lat.estimate("big", 1) < 0.0065
    both = [Candidate([0], *head, None, moved=True), Candidate([0], *head, None)]
    assert feasible(g, cols, both, ctx.tables(), lat.z, [], 0.001) == [True, False]
    # The head taking three of the batch (two from behind the pinned one) leaves it late.
    rows3 = (lat.mean("small", 3), lat.var("small", 3))
    three = Candidate([0, 2, 3], *rows3, None, moved=True)
    assert feasible(g, cols, [three], ctx.tables(), lat.z, [], 0.001) == [False]


def test_one_slot_sums_batch_times_and_takes_the_quantile_of_the_sum():
    lat = LatencyModel(TIERS)
    ctx = Context(TIERS, lat, 8)
    tables, z = ctx.tables(), lat.z

    def end(n):  # the n-th request's end: batches of 8 rows on "small", after 2 ms
        cols = ctx.columns([Request(k, 0.0, 1.0) for k in range(n - 1)])
        return admission_finish(cols, n - 1, (1, 0, 2), 8, tables, z, [0.002])

    total_m = lat.mean("small", 8) + lat.mean("small", 4)
    total_v = lat.var("small", 8) + lat.var("small", 4)
    assert end(8) == pytest.approx(0.002 + lat.estimate("small", 8))  # one batch: exact
    assert end(12) == pytest.approx(0.002 + sum_quantile(total_m, total_v, z))
    # Independent batches: the sum's quantile is below the sum of the quantiles.
    assert end(12) < 0.002 + lat.estimate("small", 8) + lat.estimate("small", 4)


def test_a_candidates_head_batch_leaves_its_batches_without_reforming_them():
    """The 12 requests form batches of 8 and 4; a head batch of the first 3 leaves 5 + 4,
    not 8 + 1: the plan stays one that could run, and needs no re-forming per candidate."""
    lat = LatencyModel(TIERS)
    ctx = Context(TIERS, lat, 8)
    queue = [Request(k, 0.0, 0.008) for k in range(12)]
    cols = ctx.columns(queue)
    g = form_groups(cols, 8)
    head = (lat.mean("small", 3), lat.var("small", 3))
    m = head[0] + lat.mean("small", 5) + lat.mean("small", 4)
    v = head[1] + lat.var("small", 5) + lat.var("small", 4)
    end = float(sum_quantile(m, v, lat.z))
    assert end < 0.008
    ok = feasible(g, cols, [Candidate([0, 1, 2], *head, None)], ctx.tables(), lat.z, [], 0.0)
    assert ok == [True]
    tight = feasible(g, cols, [Candidate([0, 1, 2], *head, None)], ctx.tables(), lat.z, [],
                     0.008 - end + 1e-6)  # fmt: skip
    assert tight == [False]  # 8 + 1 (re-formed) would still be on time here
    just = feasible(g, cols, [Candidate([0, 1, 2], *head, None)], ctx.tables(), lat.z, [],
                    0.008 - end - 1e-6)  # fmt: skip
    assert just == [True]  # 8 + 4 (the head not taken out) would be late here


def test_sum_quantile_of_one_lognormal_is_its_quantile():
    s, median, z = 0.3, 0.01, 3.09
    mean = median * math.exp(s * s / 2)
    var = mean * mean * math.expm1(s * s)
    assert sum_quantile(mean, var, z) == pytest.approx(median * math.exp(z * s))
    assert sum_quantile(0.0, 0.0, z) == 0.0  # nothing to sum
    # The compiled one the plan uses is the same function.
    assert quantile(mean, var, z) == pytest.approx(float(sum_quantile(mean, var, z)), rel=1e-12)
    assert quantile(0.0, 0.0, z) == 0.0


def test_admission_needs_a_slot():
    ctx = Context(TIERS, LatencyModel(TIERS), 8)
    cols = ctx.columns([Request(0, 0.0, 1.0)])
    with pytest.raises(ValueError, match="busy is empty"):
        admission_finish(cols, 1, (1, 0, 2), 8, ctx.tables(), ctx.latency.z, [])


def test_a_batch_wider_than_the_latency_tables_is_an_error_not_a_read_past_them():
    ctx = Context(TIERS, LatencyModel(TIERS), 8)
    cols = ctx.columns([Request(0, 0.0, 1.0, rows=4), Request(1, 0.0, 1.0)])
    narrow = tuple(np.ascontiguousarray(t[:, :4]) for t in ctx.tables())  # batches of <= 3
    for t in narrow:
        t.flags.writeable = False  # as the latency model hands them out
    g = form_groups(cols, 8)  # one batch of 5 rows
    with pytest.raises(ValueError, match="more rows than the latency tables"):
        feasible(g, cols, [Candidate([], 1e-3, 0.0, None)], narrow, 3.0, [], 0.0)
    with pytest.raises(ValueError, match="more rows than the latency tables"):
        admission_finish(cols, 1, (1, 0, 2), 3, narrow, 3.0, [0.0])
    # Joining an earlier batch would read a size past the tables: refused up front.
    with pytest.raises(ValueError, match="exceeds the latency tables"):
        admission_finish(cols, 0, (1, 0, 2), 8, narrow, 3.0, [0.0])


def test_bad_indices_are_refused_before_the_compiled_loops_read_them():
    ctx = Context(TIERS, LatencyModel(TIERS), 8)
    cols = ctx.columns([Request(k, 0.0, 1.0) for k in range(3)])
    g, tables = form_groups(cols, 8), ctx.tables()
    for skip in ([0, -1], [0, 3]):
        with pytest.raises(ValueError, match="outside a queue of 3"):
            feasible(g, cols, [Candidate(skip, 1e-3, 0.0, None)], tables, 3.0, [], 0.0)
    with pytest.raises(ValueError, match="at 4 is outside a queue of 3"):
        admission_finish(cols, 4, (1, 0, 2), 8, tables, 3.0, [0.0])
    with pytest.raises(ValueError, match="outside the 3 tiers"):
        admission_finish(cols, 3, (1, 0, 3), 8, tables, 3.0, [0.0])
    bad = Columns.build([1.0], [1], [0], [5])  # a tier rank past the tables
    with pytest.raises(ValueError, match="past the latency tables"):
        feasible(form_groups(bad, 8), bad, [Candidate([], 1e-3, 0.0, None)], tables, 3.0, [], 0.0)
