"""The queue as it will run: batches grouped by tier with their real sizes, and when each
batch ends at the ``slo_target`` quantile. Shared by admission (``Scheduler.submit``) and the
planner's feasibility checks, so both count the work ahead the same way.

The queue is held as columns (numpy arrays in queue order): deadline, rows, and the range
of tier ranks each request allows - ``lo`` .. ``hi`` with 0 the most accurate tier, so a pin
is lo == hi and a min_tier m is 0 .. rank(m).

The plan (``form_groups``, once per decision): requests are grouped by their fastest
allowed tier ``hi``; per such class, in queue order, batches of up to B rows, a request that
does not fit closing the batch (next-fit, as ``Context.take``). A batch may run on any tier
from the most demanding ``lo`` of its requests to ``hi``: on a plan's tier p where that
range holds p, else on ``hi``. Batches run in the order of their first request, each on the
slot that frees first. A batch's time is log-normal (the latency model's, per tier and
size), batch times are independent, and a batch ends at the ``slo_target`` quantile of the
sum of the times before it on its slot and its own (``latency.sum_quantile``).

Checking a candidate decision (``feasible``) takes its head batch's requests out of their
batches without re-forming the others - a batch that loses requests runs the rest sooner,
and the plan stays one that could run - and plans the rest at the candidate's tier. All of
a planner step's candidates are checked in one vectorised pass.

Up to ``SMALL_QUEUE`` queued requests the same plan is computed in plain Python
(``small_groups``, ``small_feasible``): numpy's fixed cost per call would dominate there.
Both give the same answers (tests/test_scheduling_plan.py checks them against a plain
reference).

Cost: building the plan is O(n) numpy work (a stable sort of small integers when several
classes are queued, cumulative sums, reductions) plus an O(G) Python walk over the G batch
starts when multi-row requests are queued; checking C candidates is O(C x G) numpy work
plus O(B) Python per batch a head batch touches (O(C x G log S) Python with S > 1 slots).

Example:
    >>> cols = Columns.build(deadline=[0.010, 0.020, 0.030], rows=[1, 2, 8], lo=[0, 0, 1],
    ...                      hi=[1, 1, 1])
    >>> g = form_groups(cols, max_batch=8)
    >>> g.hi.tolist(), g.rows.tolist(), g.head.tolist(), g.lo.tolist()   # 1+2, then the 8
    ([1, 1], [3, 8], [0, 2], [0, 1])
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .latency import sum_quantile

# Queue length up to which plans are computed in plain Python: below it numpy's cost per
# call (microseconds, a few dozen calls per decision) is more than the work itself.
SMALL_QUEUE = 24


@dataclass(frozen=True)
class Columns:
    """The queue as read-only arrays, in queue order: ``deadline`` (s, float64) and
    ``ints`` (3, n) int64 - ``rows``, ``lo`` and ``hi`` (the allowed tier ranks); ``multi``:
    any request has more than one row; ``one_class``: every request has the same ``hi``
    (False when unknown - the plan is the same, found with a sort)."""

    deadline: np.ndarray
    ints: np.ndarray
    multi: bool
    one_class: bool

    @classmethod
    def build(cls, deadline, rows, lo, hi) -> Columns:
        d = np.asarray(deadline, dtype=np.float64)
        ints = np.array([rows, lo, hi], dtype=np.int64).reshape(3, len(d))
        d.flags.writeable = ints.flags.writeable = False
        n = len(d)
        return cls(
            d, ints, bool(n and ints[0].max() > 1), bool(n and ints[2].min() == ints[2].max())
        )

    @property
    def rows(self) -> np.ndarray:
        return self.ints[0]

    @property
    def lo(self) -> np.ndarray:
        return self.ints[1]

    @property
    def hi(self) -> np.ndarray:
        return self.ints[2]

    def __len__(self) -> int:
        return len(self.deadline)

    def ahead_and(self, at: int, deadline: float, rows: int, lo: int, hi: int) -> Columns:
        """The first ``at`` requests and then one more (admission: the queue ahead of a new
        request, and the request)."""
        same = self.one_class and (at == 0 or hi == int(self.ints[2, 0]))
        return Columns(
            np.append(self.deadline[:at], deadline),
            np.concatenate((self.ints[:, :at], ((rows,), (lo,), (hi,))), axis=1),
            self.multi or rows > 1,
            same or at == 0,
        )


@dataclass(frozen=True)
class Groups:
    """The batches of a plan in run order, each (G,): ``hi`` (its class: the fastest tier
    its requests allow), ``lo`` (the most accurate tier all of them allow), ``rows``,
    ``deadline`` (the earliest of its requests), ``head`` (queue index of its first
    request), ``start``/``stop`` (its requests are ``order[start:stop]``; ``order`` None
    means queue order). ``of`` (n,) maps a queue index to its batch."""

    hi: np.ndarray
    lo: np.ndarray
    rows: np.ndarray
    deadline: np.ndarray
    head: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    order: np.ndarray | None
    of: np.ndarray

    def __len__(self) -> int:
        return len(self.hi)

    def members(self, g: int) -> list[int]:
        """Queue indices of batch ``g``'s requests."""
        a, b = int(self.start[g]), int(self.stop[g])
        return list(range(a, b)) if self.order is None else self.order[a:b].tolist()


@dataclass(frozen=True)
class Candidate:
    """A decision to check: the head batch's queue indices (``skip``), the mean and
    variance (s, s^2) of its time on this slot, and the tier rank the rest is planned at
    (None: each batch on its fastest allowed tier)."""

    skip: Sequence[int]
    mean: float
    var: float
    plan: int | None


def form_groups(cols: Columns, max_batch: int) -> Groups:
    """The plan's batches for ``cols`` (see the module docstring), in run order."""
    n = len(cols)
    if n == 0:
        e = np.empty(0, dtype=np.int64)
        return Groups(e, e, e, np.empty(0), e, e, e, None, e)
    if cols.one_class:  # the common case: nothing pinned or limited
        order, due_s = None, cols.deadline
        rows_s, lo_s, hi_s = cols.ints
    else:
        order = np.argsort(cols.hi.astype(np.int8), kind="stable")  # by class, stable
        # np.take, not ints[:, order]: numpy's mixed slice-and-array indexing is ~4x slower.
        rows_s, lo_s, hi_s = np.take(cols.ints, order, axis=1)
        due_s = cols.deadline[order]
    if not cols.multi and cols.one_class:
        starts = np.arange(0, n, max_batch)  # one row each: a batch every B requests
    elif not cols.multi:
        new_class = np.empty(n, dtype=bool)
        new_class[0] = True
        np.not_equal(hi_s[1:], hi_s[:-1], out=new_class[1:])
        first = np.maximum.accumulate(np.where(new_class, np.arange(n), 0))  # class's first
        starts = np.flatnonzero((np.arange(n) - first) % max_batch == 0)
    else:
        starts = _next_fit_starts(rows_s, None if cols.one_class else hi_s, max_batch)
    stops = np.append(starts[1:], n)
    g_rows = np.add.reduceat(rows_s, starts)
    g_lo = np.maximum.reduceat(lo_s, starts)
    g_due = np.minimum.reduceat(due_s, starts)
    sizes = stops - starts
    if cols.one_class:  # run order is class order
        of = np.repeat(np.arange(len(starts)), sizes)
        return Groups(hi_s[starts], g_lo, g_rows, g_due, starts, starts, stops, None, of)
    g_head = order[starts]
    run = np.argsort(g_head)  # (G,) run order: by first request (heads are distinct)
    rank = np.empty(len(run), dtype=np.int64)
    rank[run] = np.arange(len(run))
    of = np.empty(n, dtype=np.int64)
    of[order] = np.repeat(rank, sizes)
    stacked = np.stack((hi_s[starts], g_lo, g_rows, g_head, starts, stops))
    hi, lo, rows, head, start, stop = np.take(stacked, run, axis=1)
    return Groups(hi, lo, rows, g_due[run], head, start, stop, order, of)


def _next_fit_starts(rows: np.ndarray, hi: np.ndarray | None, max_batch: int) -> np.ndarray:
    """Where next-fit batches of ``rows`` (in class order; ``hi`` the class of each, None:
    one class) start. From a batch starting at i the next starts at the first j whose rows
    no longer fit; B rows of padding before each class's first request end its last batch
    there. The jumps are found in numpy, then walked from the start: O(G) Python steps."""
    n = len(rows)
    padded = rows
    if hi is not None:
        padded = rows + np.concatenate(((0,), (hi[1:] != hi[:-1]) * max_batch))
    cum = np.cumsum(padded)
    nxt = np.searchsorted(cum, cum - rows + max_batch, side="right")
    # A request of more rows than the batch runs alone: the next one starts a batch.
    jump = np.maximum(nxt, np.arange(1, n + 1), out=nxt).tolist()
    out, i = [], 0
    while i < n:
        out.append(i)
        i = jump[i]
    return np.asarray(out, dtype=np.int64)


def slot_chains(
    m: np.ndarray, v: np.ndarray, busy: Sequence[tuple[float, float, float]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offset, mean, variance) per batch - of mean time ``m`` and variance ``v``, in this
    order - of the time from now until it ends: a deterministic offset plus the sum of the
    batch times on its slot up to it.

    ``busy``: per slot, (offset, mean, variance) of the time until it can start the first
    batch - a deterministic offset (a running batch's remaining time) plus a random part (a
    batch about to start there). One slot: the batches run back to back on it. Several:
    each batch on the slot whose expected free time is earliest."""
    if len(busy) == 1:
        off, m0, v0 = busy[0]
        return np.full(len(m), off), m0 + np.cumsum(m), v0 + np.cumsum(v)
    state = [list(b) for b in busy]  # per slot: offset, mean, variance so far
    heap = [(off + m0, i) for i, (off, m0, _) in enumerate(busy)]  # (expected free, slot)
    heapq.heapify(heap)
    ends = []
    for gm, gv in zip(m.tolist(), v.tolist(), strict=True):
        if gm <= 0:  # an emptied batch takes no slot and ends at once
            ends.append((0.0, 0.0, 0.0))
            continue
        _, i = heapq.heappop(heap)
        s = state[i]
        s[1] += gm
        s[2] += gv
        ends.append((s[0], s[1], s[2]))
        heapq.heappush(heap, (s[0] + s[1], i))
    off, tm, tv = np.asarray(ends, dtype=float).reshape(-1, 3).T
    return off, tm, tv


def run_tiers(lo: np.ndarray, hi: np.ndarray, plan) -> np.ndarray:
    """The tier each batch runs on: ``plan`` (an int, or an array broadcasting against the
    batches) where the batch allows it, else its fastest allowed tier ``hi``; ``plan`` None
    or beyond the fastest tier means ``hi``."""
    if plan is None:
        return hi
    return np.where((lo <= plan) & (plan <= hi), plan, hi)


def feasible(
    groups: Groups,
    cols: Columns,
    candidates: Sequence[Candidate],
    tables: tuple[np.ndarray, np.ndarray, np.ndarray],
    z: float,
    others: Sequence[float],
    now: float,
) -> list[bool]:
    """For each candidate: whether every request not in its head batch meets its deadline
    at the ``z`` quantile, the head batch running first on this slot and the ``others``
    slots freeing after the given planning times (s)."""
    c, g = len(candidates), len(groups)
    if c == 0 or g == 0:
        return [True] * c
    _, mean, var = tables
    names, width = mean.shape
    plans = np.array([names if x.plan is None else x.plan for x in candidates])[:, None]
    tier = run_tiers(groups.lo, groups.hi, plans)  # (C, G)
    # Flat gathers: numpy's 2-D fancy indexing ``mean[tier, rows]`` costs ~3x as much.
    flat = tier * width
    flat += groups.rows
    m = mean.take(flat)  # (C, G) seconds
    v = var.take(flat)
    late = []  # (candidate, batch, deadline) where a head batch changed a batch's deadline
    left_by = {}  # head batch -> what it leaves of its batches (candidates share head batches)
    for k, cand in enumerate(candidates):
        plan = int(plans[k, 0])
        skip = tuple(cand.skip)
        if skip not in left_by:
            left_by[skip] = _taken_out(groups, cols, skip)
        for b, rows, due, lo in left_by[skip]:
            if rows == 0:
                m[k, b] = v[k, b] = 0.0
                late.append((k, b, np.inf))
                continue
            hi = int(groups.hi[b])
            t = plan if lo <= plan <= hi else hi
            m[k, b], v[k, b] = mean[t, rows], var[t, rows]
            late.append((k, b, due))
    if not others:
        # The head batch first: its time joins every batch's sum (column 0, then summed).
        m[:, 0] += [x.mean for x in candidates]
        v[:, 0] += [x.var for x in candidates]
        np.cumsum(m, axis=1, out=m)
        np.cumsum(v, axis=1, out=v)
        ends = sum_quantile(m, v, z)
        ends += now  # (C, G) absolute
    else:
        ends = np.empty_like(m)
        for k, cand in enumerate(candidates):
            busy = [(0.0, cand.mean, cand.var), *((o, 0.0, 0.0) for o in others)]
            off, mk, vk = slot_chains(m[k], v[k], busy)
            ends[k] = now + off + sum_quantile(mk, vk, z)
    ok = ends <= groups.deadline  # (C, G)
    for k, b, due in late:
        ok[k, b] = ends[k, b] <= due
    return ok.all(axis=1).tolist()


def _taken_out(groups: Groups, cols: Columns, skip: Sequence[int]):
    """(batch, rows, earliest deadline, most accurate allowed tier) of each batch that the
    requests at queue indices ``skip`` leave - what remains of it (rows 0: emptied)."""
    if not len(skip):
        return []
    gone = set(skip)
    of, rows, due, lo = groups.of.item, cols.rows.item, cols.deadline.item, cols.lo.item
    out = []
    for b in sorted({of(i) for i in skip}):
        left = [i for i in groups.members(b) if i not in gone]  # at most B: scalar reads
        if not left:
            out.append((b, 0, np.inf, 0))
            continue
        out.append((b, sum(map(rows, left)), min(map(due, left)), max(map(lo, left))))
    return out


# -- the same plan in plain Python, for short queues -----------------------------------------
@dataclass(frozen=True)
class SmallGroups:
    """``Groups`` as Python lists, in run order: per batch [hi, lo, rows, deadline,
    members]; ``of`` maps a queue index to its batch. ``lists`` keeps what
    ``small_feasible`` last read from numpy for it (the tables and columns it was given,
    and their lists): a decision checks one plan several times, and a plan lives for one
    decision, during which the latency tables do not change."""

    batches: list[list]
    of: list[int]
    lists: list = field(default_factory=list, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.batches)


def small_groups(cols: Columns, max_batch: int) -> SmallGroups:
    """``form_groups`` in plain Python (see ``SMALL_QUEUE``)."""
    lists = (a.tolist() for a in (cols.deadline, cols.rows, cols.lo, cols.hi))
    return small_groups_of(*lists, max_batch)


def small_groups_of(deadline, rows, lo, hi, max_batch: int) -> SmallGroups:
    """``small_groups`` from Python lists (queue order)."""
    batches: list[list] = []
    open_batch: dict[int, int] = {}  # class -> index of its batch being filled
    of = []
    for i, c in enumerate(hi):
        k = open_batch.get(c)
        if k is None or batches[k][2] + rows[i] > max_batch:
            k = open_batch[c] = len(batches)
            batches.append([c, lo[i], 0, deadline[i], []])
        b = batches[k]
        b[1] = max(b[1], lo[i])
        b[2] += rows[i]
        b[3] = min(b[3], deadline[i])
        b[4].append(i)
        of.append(k)
    return SmallGroups(batches, of)


def small_feasible(
    groups: SmallGroups,
    cols: Columns,
    candidates: Sequence[Candidate],
    tables: tuple[np.ndarray, np.ndarray, np.ndarray],
    z: float,
    others: Sequence[float],
    now: float,
) -> list[bool]:
    """``feasible`` in plain Python (see ``SMALL_QUEUE``): the same sums in the same order."""
    memo = groups.lists
    if not memo or memo[0] is not tables or memo[1] is not cols:
        memo[:] = (
            tables, cols, tables[1].tolist(), tables[2].tolist(),
            cols.rows.tolist(), cols.deadline.tolist(), cols.lo.tolist(),
        )  # fmt: skip
    mean, var, rows_of, due_of, lo_of = memo[2:]
    names = len(mean)
    out = []
    for cand in candidates:
        plan = names if cand.plan is None else cand.plan
        gone = set(cand.skip)
        ms, vs, dues = [], [], []
        for hi, lo, rows, due, members in groups.batches:
            if gone and not gone.isdisjoint(members):
                left = [i for i in members if i not in gone]
                if not left:
                    ms.append(0.0)
                    vs.append(0.0)
                    dues.append(math.inf)
                    continue
                rows = sum(rows_of[i] for i in left)
                due = min(due_of[i] for i in left)
                lo = max(lo_of[i] for i in left)
            t = plan if lo <= plan <= hi else hi
            ms.append(mean[t][rows])
            vs.append(var[t][rows])
            dues.append(due)
        if not others:
            out.append(_chain_ok(ms, vs, dues, cand.mean, cand.var, z, now))
            continue
        busy = [(0.0, cand.mean, cand.var), *((o, 0.0, 0.0) for o in others)]
        off, tm, tv = slot_chains(np.asarray(ms), np.asarray(vs), busy)
        ends = now + off + sum_quantile(tm, tv, z)
        out.append(bool(np.all(ends <= np.asarray(dues))))
    return out


def _chain_ok(ms, vs, dues, m0, v0, z, now) -> bool:
    """One slot, batches back to back after a head of mean ``m0`` and variance ``v0``: does
    each end by its deadline? Sums in numpy's order (the head, then cumulative sums)."""
    am, av = m0, v0
    for m, v, due in zip(ms, vs, dues, strict=True):
        am += m
        av += v
        if now + _quantile(am, av, z) > due:
            return False
    return True


def _quantile(m: float, v: float, z: float) -> float:
    """``sum_quantile`` for floats, with ``math``."""
    s2 = math.log1p(v / max(m * m, 1e-300))
    return m * math.exp(z * math.sqrt(s2) - 0.5 * s2)


def admission_finish(
    cols: Columns,
    max_batch: int,
    tables: tuple[np.ndarray, np.ndarray, np.ndarray],
    z: float,
    busy: Sequence[float],
) -> float:
    """When the last request of ``cols`` (a new one, after the queue ahead of it) would end,
    seconds from now at the ``z`` quantile, the batches run on their fastest allowed tiers
    after the slots free (``busy``: seconds per slot): with its own batch, or, if sooner,
    added to an earlier batch that runs on a tier it allows and has room for it."""
    at = len(cols) - 1
    r_rows, r_lo, r_hi = int(cols.rows[at]), int(cols.lo[at]), int(cols.hi[at])
    if len(cols) <= SMALL_QUEUE and len(busy) == 1:
        groups = small_groups(cols, max_batch)
        return small_admission(groups, max_batch, tables, z, busy[0], r_rows, r_lo, r_hi)
    chains = [(off, 0.0, 0.0) for off in sorted(busy)]
    groups = form_groups(cols, max_batch)
    mine = int(groups.of[at])
    tier, rows = groups.hi[: mine + 1], groups.rows[: mine + 1]  # r's batch and before
    _, mean, var = tables
    off, m, v = slot_chains(mean[tier, rows], var[tier, rows], chains)
    best = float(off[mine] + sum_quantile(m[mine], v[mine], z))
    tier, rows = tier[:mine], rows[:mine]
    room = np.flatnonzero((r_lo <= tier) & (tier <= r_hi) & (rows + r_rows <= max_batch))
    if len(room):
        t, b = tier[room], rows[room]
        dm = mean[t, b + r_rows] - mean[t, b]  # (k,) the new request's rows added
        dv = var[t, b + r_rows] - var[t, b]
        joined = off[room] + sum_quantile(m[room] + dm, v[room] + dv, z)
        best = min(best, float(joined.min()))
    return best


def small_admission(
    groups: SmallGroups,
    max_batch: int,
    tables: tuple[np.ndarray, np.ndarray, np.ndarray],
    z: float,
    off: float,
    r_rows: int,
    r_lo: int,
    r_hi: int,
) -> float:
    """``admission_finish`` in plain Python for one slot, from the ``small_groups`` of the
    queue ahead and the new request (queued last: ``r_rows``, ``r_lo``, ``r_hi``)."""
    mine = groups.of[-1]
    mean, var = tables[1].tolist(), tables[2].tolist()
    best = math.inf
    am = av = 0.0
    for k, (hi, _, rows, _, _) in enumerate(groups.batches[: mine + 1]):
        am += mean[hi][rows]
        av += var[hi][rows]
        if k < mine and r_lo <= hi <= r_hi and rows + r_rows <= max_batch:
            dm = mean[hi][rows + r_rows] - mean[hi][rows]  # numpy's order of operations
            dv = var[hi][rows + r_rows] - var[hi][rows]
            best = min(best, off + _quantile(am + dm, av + dv, z))
    return min(best, off + _quantile(am, av, z))
