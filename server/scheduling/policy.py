"""Scheduling policies: given the queue (deadline order) and a free slot, pick a tier and
the requests to batch. Pure functions of their inputs and ``now``: no clock, no transport.

Policies:
  * ``FixedTier``: always one tier (the baselines: "always full", "always smallest").
  * ``SlackFit`` (SuperServe, Ahmad et al. 2024): for the earliest-deadline request, bucket
    the (tier, batch) latencies; take the largest bucket that fits its slack, then the
    largest batch, then the most accurate tier in that bucket.
  * ``Planner`` (innfer's own): plan for the whole queue, not only its head. See its docstring.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .latency import LatencyModel, TierInfo
from .request import Request


@dataclass(frozen=True)
class Decision:
    """Run ``requests`` (their rows concatenated) on ``tier``."""

    tier: str
    requests: list[Request]

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.requests)


class Context:
    """What a policy may look at: tiers (most accurate first), latency model, batch limit."""

    def __init__(self, tiers: Sequence[TierInfo], latency: LatencyModel, max_batch: int) -> None:
        self.arrival_rate = 0.0  # rows/s, kept current by the scheduler
        self.tight_budget = math.inf  # seconds: a low percentile of recent budgets
        # Queue deadlines as an array when every queued request is unconstrained and one
        # row (the fast path of Planner); None otherwise. Set by the scheduler per decision.
        self.deadlines: np.ndarray | None = None
        self.tiers = sorted(tiers, key=lambda t: t.accuracy, reverse=True)
        self.rank = {t.name: i for i, t in enumerate(self.tiers)}  # 0 = most accurate
        self.latency = latency
        self.max_batch = max_batch

    def allowed(self, r: Request) -> list[str]:
        """Tiers request ``r`` may run on, most accurate first (pin / min_tier honoured)."""
        if r.pin is not None:
            return [r.pin]
        names = [t.name for t in self.tiers]
        if r.min_tier is not None:
            return names[: self.rank[r.min_tier] + 1]
        return names

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
    def choose(self, queue: Sequence[Request], now: float, ctx: Context) -> Decision | None:
        """A decision for one free slot, or None to leave it idle. ``queue`` is non-empty
        and in deadline order; every request in it can still meet its deadline alone."""


class FixedTier(Policy):
    """Always ``tier`` (falling back to the nearest tier a pinned request allows)."""

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self.name = f"fixed-{tier}"

    def choose(self, queue, now, ctx):
        head = queue[0]
        allowed = ctx.allowed(head)
        tier = self.tier if self.tier in allowed else allowed[-1]
        return Decision(tier, ctx.take(queue, tier, ctx.max_batch))


class SlackFit(Policy):
    """SuperServe's SlackFit with latency buckets of ``bucket_ms`` milliseconds."""

    name = "slackfit"

    def __init__(self, bucket_ms: float = 2.0) -> None:
        self.bucket = bucket_ms / 1e3

    def choose(self, queue, now, ctx):
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


class Planner(Policy):
    """innfer's policy: plan for the whole queue and for the arrivals still to come.

    Algorithm (per free slot; Q = queue in deadline order, B = max batch, lambda = the
    recent arrival rate, decayed exponentially):
      1. Sustainable tiers: a tier t is a candidate only if it keeps up with arrivals at full
         batches, lambda <= headroom * slots * B / latency(t, B) - otherwise choosing it
         builds a backlog that later requests pay for (the fastest allowed tier is always a
         candidate).
      2. Most accurate first, for each candidate t and batch size b from B down to 1:
         H = the first requests of Q that t may serve (up to b rows); the batch must finish
         by min deadline(H); and the rest R = Q - H must then be servable *at t too* (each
         group of B rows in deadline order, one after another, on ``slots`` slots) - the
         first (t, b) that passes is chosen: accuracy first, then the largest batch.
      3. Else relax the plan for R to each group's fastest allowed tier (Q is too deep to
         stay at one tier; the head still gets the most accurate tier that leaves R
         feasible).
      4. Else the whole queue cannot be saved: throughput first, to save as many as
         possible - the fastest tier's largest batch that meets its own deadlines, then the
         next tier up; else the fastest tier for the head alone.
    Cost: O(tiers x B x |Q| / B) = O(tiers x |Q|) per decision.
    """

    name = "innfer"

    def __init__(self, slots: int = 1, headroom: float = 0.9) -> None:
        self.slots = slots
        self.headroom = headroom

    def choose(self, queue, now, ctx):
        head = queue[0]
        allowed = ctx.allowed(head)
        sustainable = [t for t in allowed if self._sustainable(t, ctx)] or allowed[-1:]
        # Keeping up (the whole queue fits in one batch): allow one tier more accurate than
        # the sustainable ones, so that the mix of tiers - not one tier - matches the load.
        first = allowed.index(sustainable[0])
        queued = sum(r.rows for r in queue)
        candidates = allowed[first - 1 :] if first and queued <= ctx.max_batch else sustainable
        for rest_at_same_tier in (True, False):
            tiers = candidates if rest_at_same_tier else allowed
            for tier in tiers:
                # Only the largest batch that meets its own deadlines is checked: a smaller
                # head batch leaves the same work (or more, less batched) to the rest.
                largest = next(self._batches(queue, tier, now, ctx), None)
                if largest is None:
                    continue
                batch, finish = largest
                plan = tier if rest_at_same_tier else None
                if self._rest_feasible(queue, batch, finish, now, ctx, plan):
                    return Decision(tier, batch)
        for tier in reversed(allowed):
            for batch, _ in self._batches(queue, tier, now, ctx):
                return Decision(tier, batch)
        tier = allowed[-1]
        return Decision(tier, ctx.take(queue, tier, head.rows))

    def _sustainable(self, tier: str, ctx: Context) -> bool:
        b = ctx.max_batch
        capacity = self.slots * b / ctx.latency.estimate(tier, b)
        return ctx.arrival_rate <= self.headroom * capacity

    @staticmethod
    def _batches(queue, tier, now, ctx):
        """(batch, finish) for b = B..1 where the batch alone meets its deadlines, and runs
        short enough that a request with the tightest recent budget, arriving just after it
        starts, can still be served on the fastest tier (bounded head-of-line blocking)."""
        limit_s = ctx.tight_budget - ctx.latency.estimate(ctx.tiers[-1].name, 1)
        seen = 0
        for limit in range(ctx.max_batch, 0, -1):
            batch = ctx.take(queue, tier, limit)
            rows = sum(r.rows for r in batch)
            if not batch or rows == seen:
                continue
            seen = rows
            took = ctx.latency.estimate(tier, rows)
            if now + took <= min(r.deadline for r in batch) and (took <= limit_s or rows == 1):
                yield batch, now + took

    def _rest_feasible(self, queue, batch, finish, now, ctx, plan: str | None) -> bool:
        if ctx.deadlines is not None:
            return self._rest_feasible_fast(batch, finish, now, ctx, plan)
        chosen = {id(r) for r in batch}
        rest = [r for r in queue if id(r) not in chosen]
        # Slot i becomes free at free[i]; the chosen batch occupies one slot until `finish`.
        free = [finish] + [now] * (self.slots - 1)
        while rest:
            allowed = ctx.allowed(rest[0])
            tier = plan if plan in allowed else allowed[-1]
            group = ctx.take(rest, tier, ctx.max_batch)
            i = min(range(len(free)), key=free.__getitem__)
            free[i] += ctx.latency.estimate(tier, sum(r.rows for r in group))
            if free[i] > min(r.deadline for r in group):
                return False
            taken = {id(r) for r in group}
            rest = [r for r in rest if id(r) not in taken]
        return True

    def _rest_feasible_fast(self, batch, finish, now, ctx, plan: str | None) -> bool:
        """Vectorised ``_rest_feasible`` for a queue of unconstrained one-row requests:
        ``take`` then returns prefixes, so the rest is ``queue[k:]`` and its groups are
        consecutive runs of B requests. O(|Q|) in numpy instead of Python."""
        rest = ctx.deadlines[len(batch) :]  # (R,) deadlines in queue order
        if rest.size == 0:
            return True
        b = ctx.max_batch
        tier = plan or ctx.tiers[-1].name
        starts = np.arange(0, rest.size, b)
        group_min = np.minimum.reduceat(rest, starts)  # (G,) tightest deadline per group
        lat = np.full(len(starts), ctx.latency.estimate(tier, b))
        lat[-1] = ctx.latency.estimate(tier, rest.size - starts[-1])
        # The plain path gives each group the slot that frees first. All groups but the last
        # take lat[0], so slot i offers start times free_i, free_i + lat[0], ... and group j
        # starts at the j-th smallest of them (cumsum adds in the plain path's order).
        steps = np.full((self.slots, len(starts)), lat[0])
        steps[:, 0] = [finish] + [now] * (self.slots - 1)
        begin = np.sort(np.cumsum(steps, axis=1), axis=None)[: len(starts)]
        return bool(np.all(begin + lat <= group_min))


POLICIES = ("innfer", "slackfit", "fixed")


def make_policy(name: str, tiers: Sequence[TierInfo], slots: int = 1) -> Policy:
    """``innfer``, ``slackfit``, or ``fixed:<tier>``."""
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
