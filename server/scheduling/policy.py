"""Scheduling policies: given the queue (deadline order) and a free slot, pick a tier and
the requests to batch. Pure functions of their inputs and ``now``: no clock, no transport.

A policy sees two read-only things besides the queue: the scheduler's static ``Context``
(tiers, latency model, batch limit) and a ``Snapshot`` of what the scheduler measured just
before this decision (arrival rate, tight budget, the queue's deadlines as an array).

Policies:
  * ``FixedTier``: always one tier (the baselines: "always full", "always smallest").
  * ``SlackFit`` (SuperServe, Ahmad et al. 2024): for the earliest-deadline request, bucket
    the (tier, batch) latencies; take the largest bucket that fits its slack, then the
    largest batch, then the most accurate tier in that bucket.
  * ``Planner`` (innfer's own): plan for the whole queue, not only its head. Its docstring
    is its algorithm, step by step.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from .latency import LatencyModel, TierInfo
from .request import Request

# Planner step 1: plan to use at most 90% of a tier's full-batch throughput. The p90
# latency already covers engine jitter; these 10% absorb the error of the decayed
# arrival-rate estimate and the partial batches a real queue runs.
SUSTAINABLE_HEADROOM = 0.9
# SlackFit's latency bucket: (tier, batch) choices whose latencies differ by less than this
# count as equally fast, so the larger batch, then the more accurate tier, wins. About one
# single-row inference of a small tier: finer buckets would make SlackFit pick by latency
# noise.
SLACKFIT_BUCKET_MS = 2.0


@dataclass(frozen=True)
class Decision:
    """Run ``requests`` (their rows concatenated) on ``tier``. ``slot`` is the worker slot
    it runs on: None as a policy returns it, set by ``Scheduler.next`` when it starts.

    Example:
        >>> d = Decision("w050", [Request(1, 0.0, 0.05, rows=3), Request(2, 0.0, 0.06)])
        >>> (d.tier, d.rows, d.slot)
        ('w050', 4, None)
    """

    tier: str
    requests: list[Request]
    slot: int | None = None

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.requests)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """What the scheduler measured just before one decision: built per call, never changed.

    ``arrival_rate``: recent arrivals in rows/s (exponentially decayed). ``tight_budget``:
    seconds, a low percentile of recent request budgets (inf before any). ``deadlines``:
    (|Q|,) absolute deadlines in queue order when every queued request is unconstrained and
    one row and the queue is long (``Planner``'s numpy path), else None; the array is a
    read-only view.

    Example:
        >>> snap = Snapshot(arrival_rate=400.0, deadlines=np.array([0.01, 0.02]))
        >>> snap.arrival_rate = 0.0
        Traceback (most recent call last):
        ...
        dataclasses.FrozenInstanceError: cannot assign to field 'arrival_rate'
        >>> snap.deadlines[0] = 1.0
        Traceback (most recent call last):
        ...
        ValueError: assignment destination is read-only
    """

    arrival_rate: float = 0.0
    tight_budget: float = math.inf
    deadlines: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.deadlines is not None:
            view = self.deadlines.view()  # the caller's array keeps its own flags
            view.flags.writeable = False
            object.__setattr__(self, "deadlines", view)


class Context:
    """The static part of what a policy sees, built once per scheduler: tiers (most accurate
    first), ``rank`` (tier name -> index in that order, 0 = most accurate), the latency
    model and the batch limit in rows. Read-only: per-decision facts go in ``Snapshot``. (The
    latency model it holds still learns online; that is the scheduler's doing.)

    Example:
        >>> tiers = [TierInfo("w050", 0.97, {8: 9.0}), TierInfo("w100", 0.99, {8: 18.0})]
        >>> ctx = Context(tiers, LatencyModel(tiers), max_batch=8)
        >>> ctx.allowed(Request(1, 0.0, 1.0)), ctx.fastest(Request(2, 0.0, 1.0, pin="w100"))
        (['w100', 'w050'], 'w100')
    """

    __slots__ = ("_names", "latency", "max_batch", "rank", "tiers")

    def __init__(self, tiers: Sequence[TierInfo], latency: LatencyModel, max_batch: int) -> None:
        ordered = tuple(sorted(tiers, key=lambda t: t.accuracy, reverse=True))
        init = object.__setattr__  # __setattr__ below refuses every later write
        init(self, "tiers", ordered)
        init(self, "rank", MappingProxyType({t.name: i for i, t in enumerate(ordered)}))
        init(self, "latency", latency)
        init(self, "max_batch", max_batch)
        init(self, "_names", tuple(t.name for t in ordered))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Context is read-only (setting {name!r}); see Snapshot")

    def allowed(self, r: Request) -> list[str]:
        """Tiers request ``r`` may run on, most accurate first (pin / min_tier honoured)."""
        if r.pin is not None:
            return [r.pin]
        if r.min_tier is not None:
            return list(self._names[: self.rank[r.min_tier] + 1])
        return list(self._names)

    def fastest(self, r: Request) -> str:
        return self.allowed(r)[-1]

    def take(self, queue: Sequence[Request], tier: str, limit_rows: int) -> list[Request]:
        """Deadline-ordered requests that may run on ``tier``, up to ``limit_rows`` rows."""
        batch, rows = [], 0
        for r in queue:
            if tier not in self.allowed(r):
                continue  # not a candidate: it must not cut the batch short either
            if rows + r.rows > limit_rows:
                if rows:
                    break
                continue
            batch.append(r)
            rows += r.rows
        return batch

    def accuracy(self, tier: str) -> float:
        return self.tiers[self.rank[tier]].accuracy


class Policy(ABC):
    name = ""

    @abstractmethod
    def choose(
        self, queue: Sequence[Request], now: float, ctx: Context, snap: Snapshot
    ) -> Decision | None:
        """A decision for one free slot, or None to leave it idle. ``queue`` is non-empty
        and in deadline order; every request in it can still meet its deadline alone."""


class FixedTier(Policy):
    """Always ``tier`` (falling back to the nearest tier a pinned request allows).

    Example:
        >>> tiers = [TierInfo("w100", 0.99, {8: 18.0}), TierInfo("w050", 0.97, {8: 9.0})]
        >>> ctx = Context(tiers, LatencyModel(tiers), max_batch=8)
        >>> FixedTier("w050").choose([Request(1, 0.0, 1.0)], 0.0, ctx, Snapshot()).tier
        'w050'
    """

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self.name = f"fixed-{tier}"

    def choose(self, queue, now, ctx, snap):
        head = queue[0]
        allowed = ctx.allowed(head)
        tier = self.tier if self.tier in allowed else allowed[-1]
        return Decision(tier, ctx.take(queue, tier, ctx.max_batch))


class SlackFit(Policy):
    """SuperServe's SlackFit with latency buckets of ``bucket_ms`` milliseconds.

    Example:
        >>> tiers = [TierInfo("w100", 0.99, {1: 4.0}), TierInfo("w050", 0.97, {1: 1.0})]
        >>> ctx = Context(tiers, LatencyModel(tiers), max_batch=1)
        >>> SlackFit().choose([Request(1, 0.0, 0.003)], 0.0, ctx, Snapshot()).tier
        'w050'
    """

    name = "slackfit"

    def __init__(self, bucket_ms: float = SLACKFIT_BUCKET_MS) -> None:
        self.bucket = bucket_ms / 1e3

    def choose(self, queue, now, ctx, snap):
        head = queue[0]
        slack = head.deadline - now
        best = None  # (bucket, rows, accuracy, tier, batch)
        for tier in ctx.allowed(head):
            for limit in range(1, ctx.max_batch + 1):
                batch = ctx.take(queue, tier, limit)
                if not batch or batch[0] is not head:
                    continue  # limit < head.rows: a batch without the head is no answer
                rows = sum(r.rows for r in batch)
                if rows < limit:
                    continue  # same batch as a smaller limit, or the next request needs more
                est = ctx.latency.estimate(tier, rows)
                if est > slack:
                    break
                key = (math.floor(est / self.bucket), rows, ctx.accuracy(tier))
                if best is None or key > best[0]:
                    best = (key, tier, batch)
        if best is None:
            tier = ctx.fastest(head)
            return Decision(tier, ctx.take(queue, tier, head.rows))
        return Decision(best[1], best[2])


# (batch, finish time in seconds) of a head batch the planner considers.
HeadBatch = tuple[list[Request], float]


class Planner(Policy):
    """innfer's policy: plan for the whole queue and for the arrivals still to come.

    Notation: Q = the queue in deadline order, head = Q[0], B = max batch (rows), S = slots,
    T = the tiers the head allows (most accurate first), lambda = the recent arrival rate
    (rows/s, decayed). ``largest_batch(t)`` is the head batch every step uses: the first
    requests of Q that tier t may serve, up to b rows for b = B, B-1, ..., 1, stopping at the
    first that finishes by its own earliest deadline and runs no longer than
    tight_budget - latency(fastest tier, 1 row) (or is one row), so a client with a tight
    budget arriving just after it starts can still be served: bounded head-of-line
    blocking. Only that largest batch is tried per tier - a smaller head batch leaves the
    same requests, less batched, to the rest. ``rest_feasible(t, plan)`` checks that after
    it, R = Q - batch still meets every deadline: R's groups of up to B rows in deadline
    order, each on the slot that frees first, each on tier ``plan`` where the group's head
    allows it, else on that group's fastest allowed tier. (The other slots count as free
    now: optimistic with several slots.)

    Per free slot, ``choose`` runs:
      1. ``sustainable_tiers``: the tiers t in T that keep up with arrivals at full
         batches, lambda <= headroom * S * B / latency(t, B); choosing another builds a
         backlog that later requests pay for. T's fastest tier if none does.
      1b. ``one_tier_above``: if the whole queue fits one batch (we are keeping up) and the
         most accurate sustainable tier is not T's first, the candidates are T from one
         tier above it down to the fastest, so that the mix of tiers - not one tier -
         matches the load. Otherwise the candidates are the sustainable tiers.
      2. ``accuracy_first``: for each candidate t, most accurate first, the first whose
         ``largest_batch(t)`` exists and leaves ``rest_feasible(t, plan=t)`` - the rest
         planned at the same tier - is chosen.
      3. ``relaxed``: else the same over every tier in T with the rest planned at each
         group's fastest allowed tier (Q is too deep to stay at one tier; the head still
         gets the most accurate tier that leaves R feasible).
      4. ``throughput_fallback``: else the queue cannot be saved in full; to save as many
         as possible, ``largest_batch(t)`` of the fastest tier in T that has one, then the
         next tier up; else the head alone on T's fastest tier.

    Cost per decision: steps 2-4 make at most 3T ``largest_batch`` calls (up to B ``take``
    calls each, O(B) rows scanned each, O(|Q|) when requests pinned elsewhere are skipped) and
    at most 2T ``rest_feasible`` calls. The plain ``rest_feasible`` rebuilds the rest once
    per group: O(|Q| / B groups x |Q|) = O(|Q|^2 / B). So:
      * plain path (a short queue, or any pinned, min_tier or multi-row request queued):
        O(T x (B x |Q| + |Q|^2 / B));
      * numpy path (``Snapshot.deadlines`` set): O(T x (B^2 + |Q| + G log G)) with
        G = S x |Q| / B, the |Q| and G log G parts inside numpy.

    Example:
        >>> tiers = [TierInfo("w100", 0.99, {1: 4.0, 8: 18.0}),
        ...          TierInfo("w050", 0.97, {1: 2.0, 8: 9.0})]
        >>> ctx = Context(tiers, LatencyModel(tiers), max_batch=8)
        >>> queue = [Request(k, 0.0, 0.010) for k in range(8)]  # 8 rows, 10 ms each
        >>> d = Planner().choose(queue, 0.0, ctx, Snapshot())
        >>> (d.tier, d.rows)  # w100 needs 18 ms for 8 rows; w050 makes it in 9
        ('w050', 8)
    """

    name = "innfer"

    def __init__(self, slots: int = 1, headroom: float = SUSTAINABLE_HEADROOM) -> None:
        self.slots = slots
        self.headroom = headroom

    def choose(self, queue, now, ctx, snap):
        allowed = ctx.allowed(queue[0])
        sustainable = self.sustainable_tiers(allowed, ctx, snap)  # 1
        candidates = self.one_tier_above(allowed, sustainable, queue, ctx)  # 1b
        return (
            self.accuracy_first(queue, candidates, now, ctx, snap)  # 2
            or self.relaxed(queue, allowed, now, ctx, snap)  # 3
            or self.throughput_fallback(queue, allowed, now, ctx, snap)  # 4
        )

    # -- the steps -------------------------------------------------------------------------
    def sustainable_tiers(self, allowed: list[str], ctx: Context, snap: Snapshot) -> list[str]:
        """Step 1: the tiers of ``allowed`` whose full-batch throughput over the slots,
        less the headroom, covers ``snap.arrival_rate``; the fastest if none does."""
        b = ctx.max_batch
        capacity = {t: self.slots * b / ctx.latency.estimate(t, b) for t in allowed}  # rows/s
        keeps_up = [t for t in allowed if snap.arrival_rate <= self.headroom * capacity[t]]
        return keeps_up or allowed[-1:]

    @staticmethod
    def one_tier_above(
        allowed: list[str], sustainable: list[str], queue: Sequence[Request], ctx: Context
    ) -> list[str]:
        """Step 1b: the candidate tiers - from one above the most accurate sustainable tier
        down to the fastest when the whole queue fits one batch, else ``sustainable``."""
        first = allowed.index(sustainable[0])
        queued = sum(r.rows for r in queue)
        if first and queued <= ctx.max_batch:
            return allowed[first - 1 :]
        return sustainable

    def accuracy_first(
        self,
        queue: Sequence[Request],
        candidates: list[str],
        now: float,
        ctx: Context,
        snap: Snapshot,
    ) -> Decision | None:
        """Step 2: the most accurate candidate whose largest batch leaves the rest feasible
        at the same tier; None if there is none."""
        return self._first_feasible(queue, candidates, now, ctx, snap, rest_at_same_tier=True)

    def relaxed(
        self,
        queue: Sequence[Request],
        allowed: list[str],
        now: float,
        ctx: Context,
        snap: Snapshot,
    ) -> Decision | None:
        """Step 3: the most accurate allowed tier whose largest batch leaves the rest
        feasible with each group on its fastest allowed tier; None if there is none."""
        return self._first_feasible(queue, allowed, now, ctx, snap, rest_at_same_tier=False)

    def _first_feasible(
        self,
        queue: Sequence[Request],
        tiers: Sequence[str],
        now: float,
        ctx: Context,
        snap: Snapshot,
        rest_at_same_tier: bool,
    ) -> Decision | None:
        """Steps 2 and 3 differ only in where the rest of the queue is planned: at the head's
        tier (step 2) or on each group's fastest allowed tier (step 3)."""
        for tier in tiers:
            found = self.largest_batch(queue, tier, now, ctx, snap)
            if found is None:
                continue
            batch, finish = found
            plan = tier if rest_at_same_tier else None
            if self.rest_feasible(queue, batch, finish, now, ctx, snap, plan=plan):
                return Decision(tier, batch)
        return None

    def throughput_fallback(
        self,
        queue: Sequence[Request],
        allowed: list[str],
        now: float,
        ctx: Context,
        snap: Snapshot,
    ) -> Decision:
        """Step 4: the fastest allowed tier's largest batch, then the next tier up's; else
        the head alone on the fastest allowed tier."""
        for tier in reversed(allowed):
            found = self.largest_batch(queue, tier, now, ctx, snap)
            if found is not None:
                return Decision(tier, found[0])
        tier = allowed[-1]
        return Decision(tier, ctx.take(queue, tier, queue[0].rows))

    # -- what the steps share --------------------------------------------------------------
    @staticmethod
    def largest_batch(
        queue: Sequence[Request], tier: str, now: float, ctx: Context, snap: Snapshot
    ) -> HeadBatch | None:
        """(batch, finish) for the largest b = B..1 whose batch on ``tier`` meets its own
        deadlines and runs within the head-of-line bound; None if no b does."""
        limit_s = snap.tight_budget - ctx.latency.estimate(ctx.tiers[-1].name, 1)
        seen = 0
        for limit in range(ctx.max_batch, 0, -1):
            batch = ctx.take(queue, tier, limit)
            rows = sum(r.rows for r in batch)
            if not batch or rows == seen:
                continue  # the same batch as the larger limit: already rejected
            seen = rows
            took = ctx.latency.estimate(tier, rows)
            if now + took <= min(r.deadline for r in batch) and (took <= limit_s or rows == 1):
                return batch, now + took
        return None

    def rest_feasible(
        self,
        queue: Sequence[Request],
        batch: list[Request],
        finish: float,
        now: float,
        ctx: Context,
        snap: Snapshot,
        plan: str | None,
    ) -> bool:
        """Whether every request of ``queue`` not in ``batch`` (which holds one slot until
        ``finish``) meets its deadline, planned in groups of up to B rows on ``plan`` where a
        group allows it, else on the group's fastest allowed tier (always when ``plan`` is
        None). The other slots count as free now."""
        if snap.deadlines is not None:
            return self._rest_feasible_fast(snap.deadlines, len(batch), finish, now, ctx, plan)
        chosen = {id(r) for r in batch}
        rest = [r for r in queue if id(r) not in chosen]
        free = [finish] + [now] * (self.slots - 1)  # slot i frees at free[i] (s)
        while rest:
            allowed = ctx.allowed(rest[0])
            tier = plan if plan in allowed else allowed[-1]
            group = ctx.take(rest, tier, ctx.max_batch)
            i = min(range(len(free)), key=free.__getitem__)
            free[i] += ctx.latency.estimate(tier, sum(r.rows for r in group))
            if free[i] > min(r.deadline for r in group):
                return False
            taken = {id(r) for r in group}
            rest = [r for r in rest if id(r) not in taken]  # O(|Q|) per group
        return True

    def _rest_feasible_fast(
        self,
        deadlines: np.ndarray,
        taken: int,
        finish: float,
        now: float,
        ctx: Context,
        plan: str | None,
    ) -> bool:
        """Vectorised ``rest_feasible`` for a queue of unconstrained one-row requests:
        ``take`` then returns prefixes, so the rest is ``queue[taken:]`` and its groups are
        consecutive runs of B requests. O(|Q|) in numpy instead of O(|Q|^2 / B) in Python."""
        rest = deadlines[taken:]  # (R,) deadlines in queue order
        if rest.size == 0:
            return True
        b = ctx.max_batch
        tier = plan or ctx.tiers[-1].name
        starts = np.arange(0, rest.size, b)  # (G,) first index of each group
        group_min = np.minimum.reduceat(rest, starts)  # (G,) tightest deadline per group
        lat = np.full(len(starts), ctx.latency.estimate(tier, b))  # (G,) seconds
        lat[-1] = ctx.latency.estimate(tier, rest.size - starts[-1])
        # The plain path gives each group the slot that frees first. All groups but the last
        # take lat[0], so slot i offers start times free_i, free_i + lat[0], ... and group j
        # starts at the j-th smallest of them (cumsum adds in the plain path's order).
        steps = np.full((self.slots, len(starts)), lat[0])  # (S, G)
        steps[:, 0] = [finish] + [now] * (self.slots - 1)
        begin = np.sort(np.cumsum(steps, axis=1), axis=None)[: len(starts)]  # (G,)
        return bool(np.all(begin + lat <= group_min))


POLICIES = ("innfer", "slackfit", "fixed")


def make_policy(name: str, tiers: Sequence[TierInfo], slots: int = 1) -> Policy:
    """``innfer``, ``slackfit``, or ``fixed:<tier>``.

    Example:
        >>> tiers = [TierInfo("w100", 0.99, {8: 18.0})]
        >>> make_policy("fixed:w100", tiers).name, make_policy("innfer", tiers, slots=2).slots
        ('fixed-w100', 2)
    """
    if name == "innfer":
        return Planner(slots)
    if name == "slackfit":
        return SlackFit()
    if name.startswith("fixed:"):
        tier = name.split(":", 1)[1]
        if tier not in {t.name for t in tiers}:
            raise ValueError(f"unknown tier {tier!r} in policy {name!r}")
        return FixedTier(tier)
    raise ValueError(f"unknown policy {name!r}; choose innfer, slackfit or fixed:<tier>")
