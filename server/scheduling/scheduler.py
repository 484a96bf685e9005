"""The per-model scheduler: a bounded deadline-ordered queue, admission control, worker
slots, and a policy that picks (tier, batch) whenever a slot frees. Pure: no grpc, no
threads, no clock - every method takes ``now`` (seconds), so the simulator and the tests
drive it on a virtual clock and the server on ``time.monotonic``.

Lifecycle: submit -> QUEUED -> (next) RUNNING -> (complete) SERVED | FAILED;
or QUEUED -> REFUSED_DEADLINE (expired in the queue) | CANCELLED. A submit that is refused
never enters the queue: ``Refused`` says why (REFUSED_FULL / REFUSED_DEADLINE). Every move
goes through ``Request.advance``, which raises on any other.

Per decision the scheduler hands the policy its static ``Context`` and a fresh, frozen
``Snapshot`` (arrival rate, tight budget, deadlines array); the ``Decision`` it returns
carries the slot it runs on, which ``complete`` frees.

Example:
    >>> from server.scheduling import Scheduler, TierInfo, Request, make_policy
    >>> tiers = [TierInfo("w100", 0.99, {1: 5.0, 8: 20.0}),
    ...          TierInfo("w050", 0.97, {1: 2.0, 8: 8.0})]
    >>> s = Scheduler(tiers, make_policy("innfer", tiers), max_batch=8, max_queue=64)
    >>> s.submit(Request(1, arrival=0.0, deadline=0.050), now=0.0)
    >>> d = s.next(now=0.0); d.tier, len(d.requests), d.slot
    ('w100', 1, 0)
    >>> s.complete(d, now=0.005, compute_s=0.005); d.requests[0].state.name
    'SERVED'
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .latency import LatencyModel, TierInfo
from .policy import Context, Decision, Policy, Snapshot
from .request import Request, State

# Seconds: time constant of the decayed arrival rate. Tens of batches at the profiled
# latencies (about 1-20 ms each), so one batch's worth of arrivals does not look like a
# trend, yet a burst is forgotten within about a second.
RATE_WINDOW_S = 0.5
# Recent admissible budgets kept for ``tight_budget``: at the 5th percentile the bound is
# then about the 10th-smallest of 200, so one odd client cannot set it alone.
BUDGET_WINDOW = 200
# ``tight_budget`` is this quantile of those budgets, not their minimum: the tightest ~5%
# of clients bound head-of-line blocking (the planner's batch run time), outliers do not.
TIGHT_BUDGET_QUANTILE = 0.05
# The percentile sorts the whole window, O(W log W); recomputing it every 16th decision
# keeps that off the per-decision path while still following a change of client mix
# within a few full batches.
TIGHT_BUDGET_EVERY = 16
# The planner's numpy path pays a fixed cost per call (building the array, reduceat, sort).
# Measured: around 32 queued requests one plain rest check costs about as much as the
# numpy one (tens of microseconds); above it the plain path grows as |Q|^2 / B.
VECTORISE_MIN_QUEUE = 32


class InvalidRequest(KeyError, ValueError):
    """A request the scheduler cannot take at all (an unknown tier, more rows than the
    largest batch): the caller's mistake, not a load condition. A KeyError and a ValueError,
    so existing handlers of either keep working."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Refused(Exception):
    """A request was not admitted; ``state`` is REFUSED_FULL or REFUSED_DEADLINE."""

    def __init__(self, state: State, message: str) -> None:
        super().__init__(message)
        self.state = state


class Scheduler:
    """One model's queue, slots and policy. Times are seconds on the caller's clock; see the
    module docstring for an example."""

    def __init__(
        self,
        tiers: Sequence[TierInfo],
        policy: Policy,
        *,
        max_batch: int,
        max_queue: int,
        slots: int = 1,
        latency: LatencyModel | None = None,
        rate_window_s: float = RATE_WINDOW_S,
    ) -> None:
        self.latency = latency or LatencyModel(tiers)
        self.ctx = Context(tiers, self.latency, max_batch)
        self.policy = policy
        self.max_queue = max_queue
        self.slots = slots
        self.queue: list[Request] = []  # sorted by _key
        self._keys: list[tuple] = []
        # slot -> (the decision running there, its estimated end in seconds)
        self.running: dict[int, tuple[Decision, float]] = {}
        self._seq = itertools.count()
        # Arrival rate, exponentially decayed with time constant tau: each arrival adds
        # rows/tau, so the estimate is in rows per second - the unit of the planner's
        # capacity, batch rows / latency - and forgets bursts within ~tau.
        self._tau = rate_window_s
        self._rate = 0.0
        self._rate_at = 0.0
        self._budgets: deque[float] = deque(maxlen=BUDGET_WINDOW)  # seconds
        self._tight_budget = math.inf  # seconds; refreshed by _snapshot
        self._dispatches = 0
        self._constrained = 0  # queued requests with a pin, a min_tier or several rows

    # -- admission -------------------------------------------------------------------------
    def check_constraints(self, r: Request) -> None:
        names = {t.name for t in self.ctx.tiers}
        for what, tier in (("tier", r.pin), ("min_tier", r.min_tier)):
            if tier is not None and tier not in names:
                raise InvalidRequest(f"unknown {what} {tier!r}; tiers: {', '.join(sorted(names))}")
        if r.rows > self.ctx.max_batch:
            raise InvalidRequest(
                f"request has {r.rows} rows; the maximum batch is {self.ctx.max_batch}"
            )

    def arrival_rate(self, now: float) -> float:
        """Recent arrival rate in rows per second (refused ones included: they are load
        too)."""
        return self._rate * math.exp(-max(0.0, now - self._rate_at) / self._tau)

    def submit(self, r: Request, now: float) -> None:
        """Queue ``r`` or raise ``Refused``; refusing at arrival is better than a late answer."""
        self.check_constraints(r)
        self._rate = self.arrival_rate(now) + r.rows / self._tau
        self._rate_at = now
        fastest = self.ctx.fastest(r)
        alone = self.latency.estimate(fastest, r.rows)
        if now + alone <= r.deadline:
            # A budget no tier can meet is refused whatever the batching: it must not shrink
            # (via tight_budget) the batches of the requests that can be served.
            self._budgets.append(r.deadline - now)
        if len(self.queue) >= self.max_queue:
            raise Refused(State.REFUSED_FULL, f"queue full ({self.max_queue} requests waiting)")
        if now + alone > r.deadline:
            raise Refused(
                State.REFUSED_DEADLINE,
                f"budget {1e3 * (r.deadline - now):.1f} ms is below the fastest allowed tier's "
                f"latency ({fastest}: {1e3 * alone:.1f} ms)",
            )
        finish = self._finish_if_admitted(r, now)
        if finish > r.deadline:
            raise Refused(
                State.REFUSED_DEADLINE,
                f"budget {1e3 * (r.deadline - now):.1f} ms cannot be met behind the "
                f"{len(self.queue)} queued requests (estimated {1e3 * (finish - now):.1f} ms)",
            )
        key = self._key(r)
        i = bisect.bisect(self._keys, key)
        self._keys.insert(i, key)
        self.queue.insert(i, r)
        self._constrained += _constrained(r)

    def _key(self, r: Request) -> tuple:
        return (-r.priority, r.deadline, next(self._seq))

    def _finish_if_admitted(self, r: Request, now: float) -> float:
        """When ``r`` would finish if every request ahead of it ran at its fastest tier."""
        free = sorted(end for _, end in self.running.values())
        free += [now] * (self.slots - len(free))
        free = [max(f, now) for f in free]
        key = self._key(r)
        ahead = [*self.queue[: bisect.bisect(self._keys, key)], r]
        while True:  # r is in the last group at the latest
            tier = self.ctx.fastest(ahead[0])
            group = self.ctx.take(ahead, tier, self.ctx.max_batch)
            i = min(range(len(free)), key=free.__getitem__)
            free[i] += self.latency.estimate(tier, sum(g.rows for g in group))
            if any(g is r for g in group):
                return free[i]  # r's own group; groups planned after it do not delay it
            taken = {id(g) for g in group}
            ahead = [a for a in ahead if id(a) not in taken]

    # -- dispatch --------------------------------------------------------------------------
    def free_slot(self) -> int | None:
        return next((s for s in range(self.slots) if s not in self.running), None)

    def expire(self, now: float) -> list[Request]:
        """Remove and return queued requests that can no longer meet their deadline."""
        gone = [
            r
            for r in self.queue
            if now + self.latency.estimate(self.ctx.fastest(r), r.rows) > r.deadline
        ]
        for r in gone:
            self._remove(r)
            r.finish(State.REFUSED_DEADLINE, now)
        return gone

    def next(self, now: float) -> Decision | None:
        """If a slot is free and the queue is not empty, start the policy's decision: its
        requests leave the queue as RUNNING, and the returned ``Decision`` carries the slot
        (hand it back to ``complete``)."""
        slot = self.free_slot()
        if slot is None or not self.queue:
            return None
        decision = self.policy.choose(self.queue, now, self.ctx, self._snapshot(now))
        if decision is None or not decision.requests:
            return None
        decision = replace(decision, slot=slot)
        for r in decision.requests:
            self._remove(r)
            r.start(decision.tier, decision.rows, now)
        self.running[slot] = (decision, now + self.latency.estimate(decision.tier, decision.rows))
        return decision

    def _snapshot(self, now: float) -> Snapshot:
        """This decision's measurements, frozen before the policy sees them."""
        # The deadlines array is only for the planner's numpy path: every queued request
        # unconstrained and one row (``take`` then returns prefixes), and a long queue.
        simple = self._constrained == 0 and len(self.queue) > VECTORISE_MIN_QUEUE
        deadlines = (
            np.fromiter((r.deadline for r in self.queue), float, len(self.queue))
            if simple
            else None
        )
        # A lone queued request means light load: the sort costs nothing that matters then,
        # and the bound is current when a burst begins.
        if (self._budgets and len(self.queue) == 1) or not self._dispatches % TIGHT_BUDGET_EVERY:
            self._tight_budget = _low_percentile(self._budgets)
        self._dispatches += 1
        return Snapshot(self.arrival_rate(now), self._tight_budget, deadlines)

    def complete(self, decision: Decision, now: float, compute_s: float, ok: bool = True) -> None:
        """The batch finished (or failed) after ``compute_s`` seconds of engine time.
        ``decision`` is the one ``next`` returned: its slot is freed."""
        if decision.slot is None:
            raise ValueError("complete() takes the Decision that next() returned (with its slot)")
        self.running.pop(decision.slot, None)
        if ok:
            self.latency.observe(decision.tier, decision.rows, compute_s)
        for r in decision.requests:
            r.finish(State.SERVED if ok else State.FAILED, now)

    def cancel(self, r: Request, now: float) -> bool:
        """Withdraw a queued request (client went away); False if it already started."""
        if r.state != State.QUEUED:
            return False
        self._remove(r)
        r.finish(State.CANCELLED, now)
        return True

    def _remove(self, r: Request) -> None:
        i = next(i for i, q in enumerate(self.queue) if q is r)
        del self.queue[i]
        del self._keys[i]
        self._constrained -= _constrained(r)


def _low_percentile(values, q: float = TIGHT_BUDGET_QUANTILE) -> float:
    if not values:
        return math.inf
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def _constrained(r: Request) -> bool:
    return r.pin is not None or r.min_tier is not None or r.rows != 1
