"""The queue as it will run: batches grouped by tier with their real sizes, and when each
batch ends at the ``slo_target`` quantile. Shared by admission (``Scheduler.submit``) and the
planner's feasibility checks, so both count the work ahead the same way.

The queue is held as columns (numpy arrays in queue order): deadline, rows, the range
of tier ranks each request allows - ``lo`` .. ``hi`` with 0 the most accurate tier, so a pin
is lo == hi and a min_tier m is 0 .. rank(m) - and its ``group`` key (``group_key``: 0 for
none; requests of different groups never share a batch).

The plan (``form_groups``, once per decision): requests are grouped by their fastest
allowed tier ``hi`` and their group; per such class, in queue order, batches of up to B
rows - B the efficient batch of the class's tier ``hi`` (``Context.plan_batches``) - a
request that does not fit closing the batch (next-fit, as ``Context.take``). A batch
may run on any tier from the most demanding ``lo`` of its requests to ``hi``: on a plan's
tier p where that range holds p, else on ``hi``. Batches run in the order of their first
request, each on the slot that frees first. A batch's time is log-normal (the latency
model's, per tier and size), batch times are independent, and a batch ends at the
``slo_target`` quantile of the sum of the times before it on its slot and its own
(``latency.sum_quantile``).

Checking a candidate decision (``feasible``) takes its head batch's requests out of their
batches without re-forming the others - a batch that loses requests runs the rest sooner,
and the plan stays one that could run - and plans the rest at the candidate's tier.

The loops are compiled (numba, ``_kernel``): next-fit and the chains of batch ends are
sequential scans, which numpy can only approximate with a few dozen whole-array calls per
decision - at 1,000 queued requests those calls, not the arithmetic, were a decision's
cost (~0.5 ms, issue 18's budget). Compiled, a pass is O(|Q|) plain loads and stores, and a
check stops at a candidate's first late batch. The first call compiles them (several
seconds; loaded from numba's on-disk cache in about a second after that: ``cache=True``),
so every ``Scheduler`` warms them when it is built (``warm``).

Cost: building the plan is O(|Q|); checking C candidates is O(C x (G x S + B^3)) for G
batches on S slots and head batches of up to B rows (B^3: each of up to B touched batches
scans its up to B members against the B head indices). Nothing is quadratic in |Q|.

Example:
    >>> cols = Columns.build(deadline=[0.010, 0.020, 0.030], rows=[1, 2, 8], lo=[0, 0, 1],
    ...                      hi=[1, 1, 1])
    >>> g = form_groups(cols, max_batch=8)
    >>> g.hi.tolist(), g.rows.tolist(), g.head.tolist(), g.lo.tolist()   # 1+2, then the 8
    ([1, 1], [3, 8], [0, 2], [0, 1])
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from . import _kernel

# Queue length up to which plain Python over the requests beats numpy's cost per call
# (microseconds per call, a few per request): the scheduler's expiry.
SMALL_QUEUE = 24

# ``latency.sum_quantile`` for one (mean, var) of floats, compiled (a call costs less than
# numpy's on scalars).
quantile = _kernel.quantile


def group_key(group: Hashable) -> int:
    """``Request.group`` as the int64 the columns hold: 0 for None (one group), else its
    hash, a hash of 0 as -1 (a value ``hash`` never returns). Two groups whose hashes
    collide are planned as one: an optimistic plan for them, never a shared batch
    (``Context.take`` compares the groups themselves)."""
    if group is None:
        return 0
    return hash(group) or -1


@dataclass(frozen=True)
class Columns:
    """The queue as read-only arrays, in queue order: ``deadline`` (s, float64) and
    ``ints`` (4, n) int64 - ``rows``, ``lo`` and ``hi`` (the allowed tier ranks) and
    ``group`` (``group_key``)."""

    deadline: np.ndarray
    ints: np.ndarray

    @classmethod
    def build(cls, deadline, rows, lo, hi, group=None) -> Columns:
        d = np.asarray(deadline, dtype=np.float64)
        keys = np.zeros(len(d), np.int64) if group is None else group
        ints = np.array([rows, lo, hi, keys], dtype=np.int64).reshape(4, len(d))
        d.flags.writeable = ints.flags.writeable = False
        return cls(d, ints)

    @property
    def rows(self) -> np.ndarray:
        return self.ints[0]

    @property
    def lo(self) -> np.ndarray:
        return self.ints[1]

    @property
    def hi(self) -> np.ndarray:
        return self.ints[2]

    @property
    def group(self) -> np.ndarray:
        return self.ints[3]

    def __len__(self) -> int:
        return len(self.deadline)


@dataclass(frozen=True)
class Groups:
    """The batches of a plan in run order, each (G,): ``hi`` (the fastest tier its requests
    allow; with their group, the batch's class), ``lo`` (the most accurate tier all of them
    allow), ``rows``, ``deadline`` (the earliest of its requests), ``head`` (queue index of
    its first request); its requests are ``order[bounds[g]:bounds[g + 1]]`` (queue order; ``bounds``
    (G + 1,)). ``of`` (n,) maps a queue index to its batch. Views into the three arrays
    the compiled loop returns (``_kernel.groups``)."""

    batch: np.ndarray  # (4, n): hi, lo, rows, head; the first G columns
    due: np.ndarray  # (n,): the first G
    index: np.ndarray  # (3, n + 1): of, order, bounds
    count: int  # G

    @property
    def hi(self) -> np.ndarray:
        return self.batch[0, : self.count]

    @property
    def lo(self) -> np.ndarray:
        return self.batch[1, : self.count]

    @property
    def rows(self) -> np.ndarray:
        return self.batch[2, : self.count]

    @property
    def head(self) -> np.ndarray:
        return self.batch[3, : self.count]

    @property
    def deadline(self) -> np.ndarray:
        return self.due[: self.count]

    @property
    def of(self) -> np.ndarray:
        return self.index[0, :-1]

    @property
    def order(self) -> np.ndarray:
        return self.index[1, :-1]

    @property
    def bounds(self) -> np.ndarray:
        return self.index[2, : self.count + 1]

    def __len__(self) -> int:
        return self.count

    def members(self, g: int) -> list[int]:
        """Queue indices of batch ``g``'s requests."""
        a, b = self.index[2, g : g + 2].tolist()
        return self.index[1, a:b].tolist()


@dataclass(frozen=True)
class Candidate:
    """A decision to check: the head batch's queue indices (``skip``), the mean and
    variance (s, s^2) of its time on this slot, the tier rank the rest is planned at
    (None: each batch on its fastest allowed tier), and where a batch the head took
    requests from runs: at its first request left (``moved``: where the next decisions
    would put it - a pinned batch due before that request runs first) or at its old
    place, its first request's (the default: the plan steps 2 and 3 were tuned with;
    moved in every check, bench/scheduler_groups.py's grouped and pinned traffic moved by
    -0.0007 to +0.0024 of attainment per cell over 8 seeds, within its spread)."""

    skip: Sequence[int]
    mean: float
    var: float
    plan: int | None
    moved: bool = False


def form_groups(cols: Columns, max_batch: int | Sequence[int]) -> Groups:
    """The plan's batches for ``cols`` (see the module docstring), in run order:
    ``max_batch`` rows at most per batch, or per tier rank h of its class's fastest tier
    (a sequence, one entry per tier)."""
    # One size for all: as many entries as the queue's tiers. A sequence too short for a
    # class's tier is refused by the kernel.
    if type(max_batch) is not np.ndarray:  # (plan_batches' int64 array: as it is)
        scalar = np.ndim(max_batch) == 0
        tiers = int(cols.hi.max()) + 1 if scalar and len(cols) else 0
        max_batch = _caps(max_batch, tiers)
    return Groups(*_kernel.groups(cols.ints, cols.deadline, max_batch))


def _caps(max_batch: int | Sequence[int], tiers: int) -> np.ndarray:
    """The batch size per tier rank as the kernels take it: int64, at least ``tiers``
    entries (a single size repeated ``max(tiers, 1)`` times). A size below 1 plans each
    request alone, as 1 does."""
    caps = np.asarray(max_batch, np.int64)  # no copy of an int64 array (plan_batches')
    if caps.ndim == 0:
        caps = np.full(max(tiers, 1), int(caps), np.int64)
    if caps.ndim != 1 or len(caps) < tiers:
        raise ValueError(f"batch sizes {caps.tolist()} do not give one per tier of {tiers}")
    return caps


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
    if not candidates or not groups.count:
        return [True] * len(candidates)
    n = len(cols)
    for x in candidates:
        if len(x.skip) and not (min(x.skip) >= 0 and max(x.skip) < n):
            raise ValueError(f"head batch indices {list(x.skip)} outside a queue of {n}")
    _, mean, var = tables
    none = mean.shape[0]  # a plan past the fastest tier: each batch on its fastest
    width = max(len(x.skip) for x in candidates)
    # One array for all candidates (one conversion): plan, mean, variance, moved, head
    # indices.
    cand = np.array(
        [
            [none if x.plan is None else x.plan, x.mean, x.var, float(x.moved), *x.skip]
            + [-1] * (width - len(x.skip))
            for x in candidates
        ],
        np.float64,
    )
    ok = _kernel.feasible(
        groups.batch, groups.due, groups.index, groups.count, cols.ints, cols.deadline,
        mean, var, cand, float(z), np.asarray(others, np.float64), float(now),
    )  # fmt: skip
    return ok.tolist()


def admission_finish(
    cols: Columns,
    at: int,
    request: tuple[int, int, int],
    max_batch: int | Sequence[int],
    tables: tuple[np.ndarray, np.ndarray, np.ndarray],
    z: float,
    busy: Sequence[float],
    group: int = 0,
    now: float = 0.0,
) -> float:
    """When a new request - ``request``: its (rows, lo, hi); ``group``: its group key -
    queued after the first ``at`` requests of ``cols`` would end, seconds from ``now`` at
    the ``z`` quantile, the batches - ``max_batch`` rows at most, or per tier rank as in
    ``form_groups`` - run on their fastest allowed tiers after the slots free (``busy``:
    seconds per slot): with its own batch, or, if sooner, added to an earlier batch of its
    group that runs on a tier it allows, has room for it and still ends by the earliest
    deadline of its requests (``cols.deadline``, absolute, as ``now``)."""
    if not len(busy):
        raise ValueError("busy is empty: give each slot's seconds until it is free")
    _, mean, var = tables
    rows, lo, hi = request
    if not 0 <= at <= len(cols):
        raise ValueError(f"at {at} is outside a queue of {len(cols)}")
    if not 0 <= lo <= hi < mean.shape[0]:
        raise ValueError(f"tier ranks {lo}..{hi} outside the {mean.shape[0]} tiers")
    caps = _caps(max_batch, mean.shape[0])  # the kernel refuses one past the tables' width
    return _kernel.admission(
        cols.ints, cols.deadline - now, at, rows, lo, hi, group, mean, var, caps, float(z),
        np.asarray(busy, np.float64),
    )  # fmt: skip


@functools.cache
def warm() -> None:
    """Compile (or load from the cache) every kernel now, on a two-request queue, rather
    than in a request's first decision. Once per process (``Scheduler`` calls it)."""
    cols = Columns.build([0.01, 0.02], [1, 2], [0, 0], [0, 0])
    mean, var = np.full((1, 4), 1e-3), np.full((1, 4), 1e-9)
    mean.flags.writeable = var.flags.writeable = False  # as the latency model's tables
    tables = (mean, mean, var)
    g = form_groups(cols, 3)
    feasible(g, cols, [Candidate([0], 1e-3, 1e-9, None)], tables, 3.0, [0.0], 0.0)
    admission_finish(cols, 1, (1, 0, 0), 3, tables, 3.0, [0.0])
    grouped = Columns.build([0.01, 0.02], [1, 2], [0, 0], [0, 0], [5, 7])  # the groups' path
    form_groups(grouped, 3)
    admission_finish(grouped, 1, (1, 0, 0), 3, tables, 3.0, [0.0], group=5)
    quantile(1e-3, 1e-9, 3.0)
