"""The per-model scheduler: a bounded deadline-ordered queue, admission control, worker
slots, and a policy that picks (tier, batch) whenever a slot frees. Pure: no grpc, no
threads, no clock - every method takes ``now`` (seconds), so the simulator and the tests
drive it on a virtual clock and the server on ``time.monotonic``.

Lifecycle: submit -> QUEUED -> (next) RUNNING -> (complete) SERVED | FAILED;
or QUEUED -> REFUSED_DEADLINE (expired in the queue) | CANCELLED. A submit that is refused
never enters the queue: ``Refused`` says why (REFUSED_FULL / REFUSED_DEADLINE). Every move
goes through ``Request.advance``, which raises on any other.

Per decision the scheduler hands the policy its static ``Context`` and a fresh, frozen
``Snapshot`` (arrival rate, tight budget, the queue as columns, when the model's other
lanes free up); the ``Decision`` it returns carries the slot it runs on, which
``complete`` frees.

Admission counts the work ahead as it will run (``plan``): the running batches from their
real start times with the latency model's current view of them (an overrun batch is
expected to end soon), then the queue ahead of the new request as batches per tier with
their real sizes, each on its fastest allowed tier. A request is refused when even that plan
does not finish it by its deadline at the ``admit_quantile`` (default the median: a
refusal is a certain miss) while less than a full batch of rows waits, at the ``slo_target``
quantile beyond (``admission_quantile``); the plans are made at ``slo_target``.

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

import numpy as np

from .device import Device, Instances
from .latency import DEFAULT_SLO_TARGET, LatencyModel, TierInfo, z_score
from .plan import SMALL_QUEUE, Columns, admission_finish, group_key, quantile, warm
from .policy import Context, Decision, FixedTier, Policy, Snapshot
from .request import IllegalTransition, Request, State

# Seconds: time constant of the decayed arrival rate. Tens of batches at the profiled
# latencies (about 1-20 ms each), so one batch's worth of arrivals does not look like a
# trend, yet a burst is forgotten within about a second.
RATE_WINDOW_S = 0.5
# Seconds: the arrival rate's start-up correction treats the time since the first arrival as
# at least this long, so that one early request is not an infinite rate (at most ~10x).
RATE_WARMUP_S = 0.05
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
# Weight of each arrival in the idle share (Snapshot.idle_share): about the last 20 requests,
# so a burst after a quiet spell turns the light-load reading off within a few arrivals.
IDLE_ALPHA = 0.05
# For this long after the queue (max_queue) was found full a second time within
# QUEUE_FULL_PAIR_S - two episodes: an arrival found room in between - the planner's tiers
# must keep up with the arrivals (Snapshot.queue_bound): a bounded queue turns the overload
# away before any deadline check sees it. Long against the load's changes: it only tightens
# step 1's bound, which the arrival rate then sets. Not after one burst: one Poisson burst in
# 10 s at 1x (max_queue 16) held the bound for the whole run and cost 0.075 of mean served
# size at no gain, and so did one fan-out of 18 requests at once (simulated; helper-315).
QUEUE_FULL_MEMORY_S = 30.0
QUEUE_FULL_PAIR_S = 1.0
# _forget_if_idle: a tier's correction starts decaying towards its profile once no batch of
# it has completed for FORGET_AFTER_S and requests are still refused on its estimate, with
# time constant FORGET_TAU_S: a 4x factor learned under contention is down to ~1.1x after
# 5 s of refusals (the issue: a bad profile may cost a few seconds, not the rest of the run).
FORGET_AFTER_S = 1.0
# Seconds since a member of a shared device last had an arrival after which its clients'
# tight budget no longer bounds the others' batches: a client sending now and then (one
# request every 2 s) is still there - bound by the 0.5 s rate window instead, a 20 ms model at
# 0.5-3 requests/s beside a 500 ms one got 52-78 % within budget where it had 100 % (review
# helper-141) - while one quiet for minutes is not (it capped the others for good).
NEIGHBOUR_QUIET_S = 30.0
FORGET_TAU_S = 2.0
# A relaxed tier whose next batch leaves its level this far above home (log units: ~10 %)
# showed the slowdown again: the wait before its next relax doubles, up to RELAX_WAIT_MAX_S.
RELAX_UNDONE = 0.1
RELAX_WAIT_MAX_S = 64.0
# Admission's quantile (``admit_quantile``): a request is refused at arrival only when the
# median of the plan that serves it misses its deadline. A refusal is a certain miss, and a
# closed-loop client sends again at once, so refusing at the planner's ``slo_target``
# quantile refused work that was far more likely met than not (issue 18: 40 of 2,000
# requests at 8 clients and 30 ms, each estimated within ~1 ms of its budget at 0.999).
DEFAULT_ADMIT_QUANTILE = 0.5
# Batches grow by what each costs the shared core outside the engine (Snapshot.grow_batches)
# while the arrivals need at least this share of the core at the fastest tier, and stay
# grown down to the second: the batch is how a full core serves more, and below that it
# only swept loose budgets into a tight request's fast batch (Poisson 2x: 0.64 of the core).
GROW_UTILISATION = 0.9
KEEP_GROWN_UTILISATION = 0.75


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
    module docstring for an example. ``slo_target``: the probability with which plans meet
    deadlines (default 0.999); it sets the latency model's planning quantile."""

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
        slo_target: float | None = None,
        device: Device | None = None,
        max_running: int | None = None,
        instances: Instances | None = None,
        admit_quantile: float = DEFAULT_ADMIT_QUANTILE,
    ) -> None:
        if not 0 < admit_quantile < 1:
            raise ValueError(f"admit_quantile must be in (0, 1), got {admit_quantile}")
        short = [f"{t.name} (to {t.max_batch})" for t in tiers if t.max_batch < max_batch]
        if short:  # else a request of more rows than a profile has fails deep in planning
            raise ValueError(
                f"max_batch {max_batch} is above the batch sizes profiled for tier "
                f"{', '.join(short)}: profile every tier up to max_batch, or lower it"
            )
        if latency is None:
            latency = LatencyModel(tiers, slo_target=slo_target or DEFAULT_SLO_TARGET)
        elif slo_target is not None and slo_target != latency.slo_target:
            raise ValueError(
                f"slo_target {slo_target} differs from the latency model's {latency.slo_target}"
            )
        self.latency = latency
        # Admission refuses a request only when even this quantile of its plan misses the
        # deadline (the planner still chooses tiers and batches at ``slo_target``).
        self.admit_quantile = admit_quantile
        trim = not isinstance(policy, FixedTier)  # a fixed tier runs even where dominated
        self.ctx = Context(tiers, self.latency, max_batch, trim_dominated=trim)
        warm()  # the plan's compiled loops, before the first request
        self.policy = policy
        self.max_queue = max_queue
        # The device (``device.Device``; a private one unless shared) owns the slots: this
        # model plans behind every batch on it and starts one only when it grants a slot.
        self.device = device if device is not None else Device(slots, name="private")
        self.slots = self.device.slots
        # At most this many of the device's slots at once (the model's engine instances),
        # counted over the model's lanes where they share ``instances``.
        if instances is None:
            instances = Instances(self.slots if max_running is None else max_running)
        elif max_running is not None and max_running != instances.limit:
            raise ValueError(f"max_running {max_running} differs from instances' {instances.limit}")
        self.instances = instances
        instances.members.append(self)
        self.device.join(self)
        self.queue: list[Request] = []  # sorted by _key
        self._keys: list[tuple] = []
        self._evicted: list[Request] = []  # (``_evict``; ``expire`` hands them back)
        self._cols = _Columns()  # the queue as arrays, kept in step with self.queue
        # slot -> (the decision running there, the time it started)
        self.running: dict[int, tuple[Decision, float]] = {}
        self._seq = itertools.count()
        # Arrival rate, exponentially decayed with time constant tau: each arrival adds
        # rows/tau, so the estimate is in rows per second - the unit of the planner's
        # capacity, batch rows / latency - and forgets bursts within ~tau.
        self._tau = rate_window_s
        self._rate = 0.0
        self._rate_at = 0.0
        self._first: float | None = None  # the first arrival
        self._rows_seen = 0  # rows of every arrival so far
        self._budgets: deque[float] = deque(maxlen=BUDGET_WINDOW)  # seconds
        self._tight_budget = math.inf  # seconds; refreshed by _snapshot
        self._budget_cdf: np.ndarray | None = None  # the budgets sorted, refreshed with it
        self._dispatches = 0
        self._idle_share = 0.0  # EWMA of "this request arrived to an idle device"
        self._idle_weight = 0.0  # the EWMA's total weight: 1 - (1 - IDLE_ALPHA)^arrivals
        self._requests_seen = 0  # arrivals so far (rows per request: _rows_seen over it)
        self._full_at = -math.inf  # when the queue's last full episode began
        self._full_open = False  # in one: no arrival has found room since it began
        self._bound_at = -math.inf  # ... a second within QUEUE_FULL_PAIR_S (queue_bound)
        # CPU seconds per row the serving process spends outside the engine on the engine's
        # CPUs; its owner sets it from what it measures. 0: the host runs elsewhere, or is
        # not measured (the engine-time simulator). Above 0 the planner plans as on a
        # shared CPU (Snapshot.shared_cpu).
        self.host_s = 0.0
        self._growing = False  # batches grow by their host CPU (_grows)
        self._observed_at: dict[str, float] = {}  # tier -> when its last batch completed
        self._forgot_at: dict[str, float] = {}  # tier -> the last _forget_if_idle
        self._relaxed_at: dict[str, float] = {}  # tier -> the last _relax_unused (its own:
        # shared, an idle arrival's relax kept the refusal-time forget of the same arrival
        # from running - for good at arrivals ~1.2 s apart; review 201)
        self._relax_at = -math.inf  # the next idle arrival that relaxes unused tiers
        # tier -> seconds it must go unused before it is relaxed again: doubled each time
        # its next batch after a relax shows the slowdown again (a machine slower than its
        # timing at load for a reason the server does not cause: each relax planned it
        # home and answered late; review 202), back to FORGET_AFTER_S when it does not.
        self._relax_wait: dict[str, float] = {}
        self._relaxed: dict[str, tuple] = {}  # relaxed since their last batch: as before
        # A lane planned by length (``LatencyModel.set_length``): at the mean length of the
        # texts it holds, queued or running - the sum of their batches' times where each
        # runs alone, as a text alone is planned at its own. (At the longest, each batch
        # planned as the longest text's, the MiniLM lanes at 4 closed-loop clients answered
        # 101-132 of 300 mixed-length texts within U(20, 100) ms budgets, against 202-223
        # at the mean and 193-194 before: bench/text_lengths.py.) The queued texts' tokens:
        self._length_aware = self.latency.length_aware
        self._own_length = self.latency.span.hi if self._length_aware else 0
        self._length_sum = self._length_n = 0

    @property
    def slo_target(self) -> float:
        return self.latency.slo_target

    @property
    def batch_host_s(self) -> float:
        """CPU seconds per batch the serving process spends outside the engine on the
        engine's CPUs - deciding, launching and settling it (``server.host_cpu``); 0 where
        handling has CPUs of its own or nothing measures it. Its owner sets it; the
        planner's batch sizes count it once per batch (``LatencyModel.batch_host_s``)."""
        return self.latency.batch_host_s

    @batch_host_s.setter
    def batch_host_s(self, seconds: float) -> None:
        if not 0.0 <= seconds < math.inf:
            raise ValueError(f"batch_host_s must be finite seconds >= 0, got {seconds}")
        self.latency.batch_host_s = seconds

    # -- admission -------------------------------------------------------------------------
    def check_constraints(self, r: Request) -> None:
        """Raise ``InvalidRequest`` for a request the scheduler cannot take at all: an
        unknown tier, no rows or more than the largest batch, a NaN deadline or grace (an
        infinite deadline is fine: no budget). A NaN would pass every deadline comparison
        and break the queue's order."""
        names = {t.name for t in self.ctx.tiers}
        for what, tier in (("tier", r.pin), ("min_tier", r.min_tier)):
            if tier is not None and tier not in names:
                raise InvalidRequest(f"unknown {what} {tier!r}; tiers: {', '.join(sorted(names))}")
        if r.rows > self.ctx.max_batch:
            raise InvalidRequest(
                f"request has {r.rows} rows; the maximum batch is {self.ctx.max_batch}"
            )
        if r.rows < 1:
            raise InvalidRequest(f"request has {r.rows} rows; it needs at least 1")
        if math.isnan(r.deadline) or math.isnan(r.grace):
            raise InvalidRequest(
                f"request {r.id} has a NaN deadline or grace; give a finite latency budget or none"
            )
        # Submitted before (queued, running or answered): a second entry was dispatched
        # twice - next() failed part-way and took a neighbour out of the queue with it, never
        # answered (review helper-232). Its state, or its place among equal keys: O(1).
        if r.state is not State.QUEUED or self._queued_here(r):
            raise InvalidRequest(
                f"request {r.id} was submitted already ({r.state.name.lower()}); submit a new "
                "Request for each call"
            )

    def _queued_here(self, r: Request) -> bool:
        """Whether ``r`` itself is in this lane's queue: among the requests of its priority
        and deadline (the queue's order), found from the last of them back."""
        j = bisect.bisect(self._keys, (-r.priority, r.deadline, math.inf)) - 1
        while j >= 0 and self._keys[j][:2] == (-r.priority, r.deadline):
            if self.queue[j] is r:
                return True
            j -= 1
        return False

    def arrival_rate(self, now: float) -> float:
        """Recent arrival rate in rows per second (refused ones included: they are load
        too). The decayed sum counts only the time since the first arrival, so it is
        divided by the share of the window that has passed (as an EWMA's start-up bias is
        corrected): the first arrivals of a steady load must not look like light load. And
        times (n - 1) / n after n rows, as k arrivals over a span estimate k - 1 gaps: one
        one-row arrival is no rate at all (a first request of 8 rows reads as 7/8 of a
        burst). Read as 1 / ``RATE_WARMUP_S`` (21 rows/s), a lone first request - to a new
        server, or to a text model's lane of long sentences - was served on a small tier
        with a 2 s budget on an idle device."""
        if self._first is None:
            return 0.0
        seen = max(now - self._first, RATE_WARMUP_S)
        n = self._rows_seen
        return self._raw_rate(now) / -math.expm1(-seen / self._tau) * (n - 1) / n

    def _raw_rate(self, now: float) -> float:
        return self._rate * math.exp(-max(0.0, now - self._rate_at) / self._tau)

    def submit(self, r: Request, now: float) -> None:
        """Queue ``r`` or raise ``Refused``; refusing at arrival is better than a late answer."""
        if not self._length_aware:
            self._admit(r, now)
            return
        # Judged with r in the queue (alone: at its own length).
        self._plan_length(r)
        try:
            self._admit(r, now)
        finally:
            self._plan_length()  # r queued (counted) or refused (not)

    def _plan_length(self, joining: Request | None = None) -> None:
        """Plan this lane's batches at the mean length of the texts it holds (by rows: a
        request of 7 texts counts 7), queued or running (and ``joining``); a lane that holds
        none keeps the length it had (what its traffic was, for the other lanes' view of
        it). A request without a length (0) counts as the lane's own length."""
        total, n = self._length_sum, self._length_n
        for d, _ in self.running.values():
            total += sum((r.length or self._own_length) * r.rows for r in d.requests)
            n += d.rows
        if joining is not None:
            total += (joining.length or self._own_length) * joining.rows
            n += joining.rows
        if n:
            self.latency.set_length(math.ceil(total / n))

    def batch_length(self, d: Decision) -> int | None:
        """The tokens batch ``d`` is planned and learned at: its texts' mean (None where this
        lane does not plan by length)."""
        return d.length(self._own_length) if self._length_aware else None

    def _length_ratios(self) -> np.ndarray:
        """Per tier rank, the tables' times now over the lane's own length's (<= 1)."""
        return np.array([self.latency.length_ratio(t.name) for t in self.ctx.tiers])

    def _admit(self, r: Request, now: float) -> None:
        self.check_constraints(r)
        if self._first is None:
            self._first = now
        self._rows_seen += r.rows
        self._requests_seen += 1
        self._rate = self._raw_rate(now) + r.rows / self._tau
        self._rate_at = now
        idle = not self.queue and not self.device.running
        if idle and now >= self._relax_at:
            self._relax_unused(now)
        self._idle_share += IDLE_ALPHA * (float(idle) - self._idle_share)
        self._idle_weight += IDLE_ALPHA * (1.0 - self._idle_weight)
        fastest = self.ctx.fastest(r)
        own = r.length or None  # a text: alone, its batch is padded to its own length
        if now + self.latency.quantile(fastest, r.rows, self.slo_target, own) <= r.deadline:
            # A budget no tier can meet (at the quantile plans are made at) must not shrink,
            # via tight_budget, the batches of the requests that can be served.
            self._budgets.append(r.deadline - now)
        # The quantile of the queue it would make: expiry judges the queue at that one, so
        # the request that fills it to a full batch is refused here rather than admitted at
        # the median and expired at the next pump.
        q = self.admission_quantile(joining=r)
        due = self.admission_deadline(r)
        alone = self.latency.quantile(fastest, r.rows, q, own)
        # Full (over the model's lanes together): a request of higher priority than the
        # least urgent one queued takes its place, once admitted; else it is refused.
        full = self.instances.queued() >= self.max_queue
        if full != self._full_open:
            self._full_episode(full, now)
        victim = self._least_urgent() if full else None
        if full and (victim is None or victim[1].priority >= r.priority):
            raise Refused(
                State.REFUSED_FULL,
                f"queue full ({self.max_queue} requests waiting): retry shortly or on another "
                "replica (the model's max_queue bounds it)",
            )
        # Forgetting helps only a budget the profile itself meets: one below even that (a
        # client's 0.2 ms) would wipe a slowdown learned rightly and plan the next ones short.
        profiled = self.latency.profiled(fastest, r.rows, q, own)
        profile_meets = now + profiled <= due
        if now + alone > due and profile_meets and self._forget_if_idle(fastest, now):
            alone = self.latency.quantile(fastest, r.rows, q, own)
        if now + alone > due:
            # (a faster tier to allow only where the request narrowed them: "allow a faster
            # tier" was said to one that had no pin, of the fastest tier; helper-276)
            narrowed = fastest != self.ctx.fastest_unpinned  # (a pin on it: no advice)
            # Where the profile meets it, this replica runs the tier slower now (contention):
            # "send a larger budget" alone misled a client whose pinned tier was learned 400x
            # its profile on a starved core (review helper-306).
            slower = (
                f" (profiled {1e3 * profiled:.2f} ms; this replica runs it "
                f"{alone / profiled:.1f}x slower now: retry shortly or on another replica)"
                if profile_meets and profiled > 0
                else ""
            )
            raise Refused(
                State.REFUSED_DEADLINE,
                f"budget ({1e3 * (due - now):.1f} ms left to plan with) is below the fastest "
                f"allowed tier's latency ({fastest}: {1e3 * alone:.1f} ms){slower}: send a "
                "larger latency_budget_ms"
                + (", or allow a faster tier (a lower min_tier, no tier pin)" if narrowed else ""),
            )
        key = self._key(r)
        i = bisect.bisect(self._keys, key)
        finish = self.finish_if_admitted(r, now, i, q)
        if finish > due and self._forget_if_idle(fastest, now):  # behind others' batches
            finish = self.finish_if_admitted(r, now, i, q)
        if finish > due:
            raise Refused(
                State.REFUSED_DEADLINE,
                f"budget ({1e3 * (due - now):.1f} ms left to plan with) cannot be met behind the "
                f"{_count(i, 'request')} queued ahead and {len(self.running)} running"
                f"{self._neighbours_ahead(r)} (estimated {1e3 * (finish - now):.1f} ms at the "
                f"{q:g} quantile): retry shortly or on another replica, or send a larger "
                "latency_budget_ms",
            )
        self._enqueue(r, key, i)
        if victim is not None:  # after r is in its place (the victim sorts after it): an
            # eviction that empties its lane tells the device, whose listeners may dispatch
            # from this queue at once - before, r went in at an index from before that, out
            # of order (review helper-232)
            victim[0]._evict(now)
        self.device.touched(self)

    def _full_episode(self, full: bool, now: float) -> None:
        """An arrival found the model's queue full after room (an episode begins: a second
        within ``QUEUE_FULL_PAIR_S`` of the last binds the planner), or room after full (it
        ends). Kept alike on every lane of the model: the bound is the model's."""
        for lane in self.instances.members:
            lane._full_open = full
            if full:
                if now - lane._full_at <= QUEUE_FULL_PAIR_S:
                    lane._bound_at = now
                lane._full_at = now

    def _least_urgent(self) -> tuple[Scheduler, Request] | None:
        """The model's least urgent queued request (lowest priority, latest deadline) over
        its lanes, and the lane that holds it; None when nothing is queued."""
        lanes = [s for s in self.instances.members if s.queue]
        if not lanes:
            return None
        lane = max(lanes, key=lambda s: s._keys[-1][:2])
        return lane, lane.queue[-1]

    def _evict(self, now: float) -> None:
        """Take the last queued request out for a more urgent one at a full queue (Triton
        bounds each priority level's queue: one of priority 1 was refused while default
        ones held every place; review 190). It is answered as refused (REFUSED_FULL), handed
        back by the next ``expire``."""
        r = self.queue[-1]
        due, head = self._ranks()  # (the last may be the earliest deadline: helper-313)
        self._remove_at([len(self.queue) - 1])
        if self._length_aware:
            self._plan_length()
        r.finish(State.REFUSED_FULL, now)
        self._evicted.append(r)
        self._dropped_if_later(due, head)

    def admission_quantile(self, joining: Request | None = None) -> float:
        """The quantile a new request's plan is checked at: ``admit_quantile`` while fewer
        than a full batch of rows (``max_batch``) wait - the rows of ``joining``, the request
        being admitted, counted - else ``slo_target``. A short
        queue is refused only what is more likely missed than met - a refusal is a certain
        miss, and a closed-loop client sends again at once. A longer one means more work
        arrives than runs: a refusal then also sheds load, and the work that piles up is
        partly where the scheduler cannot see it (gRPC's buffers; see docs/design.md).
        Admitting at the median there let a backlog build on one core (Poisson at 3x:
        collapsed to 1-52 % within budget in 6 of 8 runs; at slo_target, 64-96 %)."""
        b = self.ctx.max_batch
        n = len(self.queue) + (joining is not None)
        if n >= b:  # every request has a row at least: a full batch (no sum over the queue)
            return self.slo_target
        rows = sum(r.rows for r in self.queue) + (joining.rows if joining is not None else 0)
        return self.admit_quantile if rows < b else self.slo_target

    def idle_quantile(self, r: Request) -> float:
        """The quantile ``admission_quantile`` checks ``r`` at on an empty queue - what an
        idle replica asks of it: ``slo_target`` where its own rows fill a batch."""
        return self.admit_quantile if r.rows < self.ctx.max_batch else self.slo_target

    def admission_deadline(self, r: Request) -> float:
        """The latest finish admission and expiry accept for ``r``: its deadline plus its
        ``grace``, at either quantile admission checks at. Behind a backlog (``slo_target``)
        the compute is already judged at the planner's quantile; judging the overhead at its
        high quantile on top of that compounded two tails, and refused 2-4x as many
        requests at Poisson 3x live (27 / 50 vs 11 / 13, same runs) for no fewer late ones."""
        return r.deadline + r.grace

    def _forget_if_idle(self, tier: str, now: float) -> bool:
        """A request is refused on ``tier``'s estimate while no batch of ``tier`` runs:
        only its own batches correct its estimate, and this refusal means none will run - a
        correction learned under contention (a profile at load on a busy machine, a burst of
        other work) would refuse everything on it for good. So the correction of a tier not
        observed for a while decays towards the profile, with time constant
        ``FORGET_TAU_S`` from its last batch; if the device is still slow, the next batches
        say so again. Other tiers' batches do not hold it back: under steady traffic on
        them the queue is never empty, and a tier taught 10x under contention refused every
        request pinned to it for the rest of the run (0 of 100 in 10 s; review helper-129).
        Other models' batches on a shared device do not count either: they never correct
        this model's estimate. Returns whether the estimate changed."""
        if any(d.tier == tier for d, _ in self.running.values()):
            return False  # its own batch is about to say how fast it is
        # Never run here (its correction came from the profile at load): since the first request.
        first = self._first if self._first is not None else now
        since = max(self._observed_at.get(tier, first), self._forgot_at.get(tier, -math.inf))
        if now - since < FORGET_AFTER_S:
            return False
        self._forgot_at[tier] = now
        self.latency.forget(tier, math.exp(-(now - since) / FORGET_TAU_S))
        return True

    def _relax_unused(self, now: float) -> None:
        """At an arrival on an idle device, at most every ``FORGET_AFTER_S``: each tier no
        batch of which ran for ``FORGET_AFTER_S`` gives back, with time constant
        ``FORGET_TAU_S``, what load taught it above its timing at load
        (``LatencyModel.relax``). The planner stops running a tier that load made slow, and
        only its own batches corrected it: after a burst an idle replica served below it
        for good - and counted every such request degraded, its HPA metric at 1.0 minutes
        on (review 200). Not below the level the timing at load left (as ``_forget_if_idle``
        goes, to the profile): where the load was timed idle, a machine slower than its
        profile stays planned as slow (a load timed while serving, or not timed, left the
        profile's level, or the replaced runtime's)."""
        self._relax_at = now + FORGET_AFTER_S
        first = self._first if self._first is not None else now
        below = -math.inf  # the last batch of a less accurate tier than the one in hand
        for t in reversed(self.ctx.tiers):  # least accurate first
            ran = self._observed_at.get(t.name, first)
            since = max(ran, self._relaxed_at.get(t.name, -math.inf))
            # Only a tier the planner has passed over for a less accurate one since it last
            # ran: a tier in use keeps a slowdown its own batches taught, however sparse
            # its traffic (and a lone tier or pin has nothing to be passed over for).
            wait = self._relax_wait.get(t.name, FORGET_AFTER_S)
            if below >= ran and now - since >= wait:
                before = self._relaxed.get(t.name) or self.latency.snapshot(t.name)
                if self.latency.relax(t.name, math.exp(-(now - since) / FORGET_TAU_S)):
                    self._relaxed_at[t.name] = now
                    self._relaxed[t.name] = before  # (the first relax's: what load taught)
            below = max(below, self._observed_at.get(t.name, -math.inf))

    def _judge_relax(self, tier: str, observed) -> None:
        """The first batch of a relaxed tier: where it shows the slowdown again (its level
        still ``RELAX_UNDONE`` above home), the relax is undone - what load taught comes
        back, this batch on top - and the tier waits twice as long before the next one;
        else the wait is back to ``FORGET_AFTER_S``. A machine slower than its timing at
        load then costs one late plan per relax, 1, 2, 4 ... 64 s apart (review 202:
        without it, 44 of 60 requests 2 s apart were planned home and late)."""
        before = self._relaxed.pop(tier)
        wait = self._relax_wait.get(tier, FORGET_AFTER_S)
        if self.latency.above_home(tier) <= RELAX_UNDONE:
            self._relax_wait[tier] = FORGET_AFTER_S
            return
        self._relax_wait[tier] = min(2 * wait, RELAX_WAIT_MAX_S)
        self.latency.restore(tier, before)
        for rows, seconds in observed:
            self.latency.observe(tier, rows, seconds)

    def _key(self, r: Request) -> tuple:
        return (-r.priority, r.deadline, next(self._seq))

    def _neighbours_ahead(self, r: Request) -> str:
        """What the device's other models hold ahead of ``r``, for a refusal: their running
        batches and more urgent queued work ("" where there is none). A refusal behind a
        neighbour's 50 ms batch read "behind the 0 requests queued ahead and 0 running"
        (review helper-267). Named for whose it is: the model's other lanes (a text model's
        lengths) are not "other models" (a one-model server's refusals blamed them;
        helper-317)."""
        others = [m for m in self.device.members if m is not self]
        running = sum(len(m.running) for m in others)
        ahead = self.device.backlog(self, r.deadline, r.priority) if others else 0.0
        if not running and ahead <= 0:
            return ""
        parts = [_count(running, "batch", "batches") + " running"] if running else []
        if ahead > 0:
            parts.append(f"{1e3 * ahead:.1f} ms of more urgent work queued")
        mine = any(m.instances is self.instances for m in others)
        foreign = any(m.instances is not self.instances for m in others)
        whose = ("this model's other lanes' and other models'" if mine and foreign
                 else "this model's other lanes'" if mine else "other models'")  # fmt: skip
        return f", and {whose} {' and '.join(parts)} on the device"

    def _enqueue(self, r: Request, key: tuple | None = None, i: int | None = None) -> None:
        """Queue ``r`` in its place (``key``, index ``i``: found where None)."""
        key = self._key(r) if key is None else key
        i = bisect.bisect(self._keys, key) if i is None else i
        self._keys.insert(i, key)
        self.queue.insert(i, r)
        if self._length_aware:
            self._length_sum += (r.length or self._own_length) * r.rows
            self._length_n += r.rows
        if len(self.queue) == 1:  # light load: no arrays for a lone request (see _Columns)
            self._cols.drop()
        else:
            self._cols.insert(i, r, self.ctx)

    def slot_offsets(self, now: float, skip: int | None = None) -> list[float]:
        """Per slot of the device (except ``skip``), the planning time (s) until it is
        free: 0 for an idle one, else what its running batch has left given how long it has
        run (by its own model's latency view, on a shared device)."""
        return self.device.offsets(now, skip)

    def finish_if_admitted(
        self, r: Request, now: float, at: int | None = None, q: float | None = None
    ) -> float:
        """When ``r`` would finish (the ``q`` quantile, default ``admission_quantile()``;
        absolute seconds) if queued
        at index ``at`` (its place by priority and deadline; found if None): the queue ahead
        of it run as the plan forms it on each batch's fastest allowed tier, after the
        running batches - or, if sooner, with ``r`` added to an earlier batch that runs on a
        tier it allows and has room for it (``plan.admission_finish``)."""
        if at is None:
            at = bisect.bisect(self._keys, (-r.priority, r.deadline, math.inf))
        lo, hi = self.ctx.bounds(r)
        q = self.admission_quantile() if q is None else q
        if self.max_running < self.slots:  # fewer instances than the device has slots
            busy = self.device.lanes(self, now, q=q)
        else:
            busy = self.device.offsets(now, q=q)
        # A shared device's work more urgent than r runs first (at the planning quantile:
        # others' plans).
        alone = len(self.device.members) < 2
        ahead = 0.0 if alone else self.device.backlog(self, r.deadline, r.priority)
        if ahead:
            busy = [b + ahead for b in busy]
        tables, z = self.ctx.tables(), z_score(q)
        if at == 0:  # nothing ahead (light load): its own batch on the first free slot
            _, mean, var = tables
            f = 1.0
            if self._length_aware and r.length:  # a text: at its own length
                name = self.ctx.tiers[hi].name
                f = self.latency.length_ratio(name, r.length) / self.latency.length_ratio(name)
            return now + min(busy) + quantile(mean[hi, r.rows] * f, var[hi, r.rows] * f * f, z)
        cols, group, caps = self.columns(), group_key(r.group), self.ctx.plan_batches()
        return now + admission_finish(cols, at, (r.rows, lo, hi), caps, tables, z, busy, group, now)

    def columns(self) -> Columns:
        """The queue as ``Columns`` (read-only arrays, queue order)."""
        if not self._cols.synced or self._cols.n != len(self.queue):  # (or edited by hand)
            self._cols.rebuild(self.queue, self.ctx)
        return self._cols.view()

    # -- dispatch --------------------------------------------------------------------------
    @property
    def max_running(self) -> int:
        """Batches this model may run at once (``Instances``), over all its lanes."""
        return self.instances.limit

    def free_slot(self) -> int | None:
        if self.instances.full():
            return None
        return self.device.claim(self)

    def work_due(self, due: float, priority: float | None = None) -> float:
        """Seconds of the queued work that runs before a request due at ``due`` on a shared
        device: another model's requests due at or before it (the device's order across
        models is by deadline, ``claim``'s; a priority orders only its own model) or, given
        the request's ``priority`` - a lane of the same model - the queue's prefix up to
        (-priority, due) in its own order. Per class (fastest allowed tier and group, as the
        plan batches), their rows as full batches plus one partial, at the planning
        quantile. What a shared device's other members plan behind (``Device.backlog``). By
        tier alone, requests of 8 lengths were one batch of 8 (helper-147)."""
        if not self.queue:
            return 0.0
        cols = self.columns()
        if priority is None:
            # Once due, the model runs its queue in its own order: up to its last request
            # due by then (its requests due by then alone missed a higher-priority head
            # before them, and a model beside it admitted what then expired; helper-313)
            hit = np.flatnonzero(cols.deadline <= due)
            take = slice(0, int(hit[-1]) + 1 if hit.size else 0)
        else:
            take = slice(0, bisect.bisect(self._keys, (-priority, due, math.inf)))
        if not cols.deadline[take].size:
            return 0.0
        quantile, caps = self.ctx.tables()[0], self.ctx.plan_batches().tolist()
        tiers = len(quantile)
        hi, rows, group = cols.hi[take], cols.rows[take], cols.group[take]
        cls = hi
        if group.any():  # dense group codes, then one class per (group, tier)
            cls = np.unique(group, return_inverse=True)[1].reshape(-1) * tiers + hi
        rows = np.bincount(cls, weights=rows)
        total = 0.0
        for c, n in enumerate(rows.astype(np.int64).tolist()):
            if n:
                tier = c % tiers
                b = caps[tier]
                full, rest = divmod(n, b)
                total += full * quantile[tier, b] + (quantile[tier, rest] if rest else 0.0)
        return float(total)

    def work_ahead(self, limit: int) -> list[tuple[float, float, float]]:
        """For each of the first ``limit`` queued requests, in run order: (its place in the
        device's order across models - the earliest deadline at or behind it in the queue:
        the model is due by then, and runs its queue in its own order; its deadline;
        seconds of this queue's work up to and including it), counted as ``work_due``
        counts (per fastest allowed tier and group, full batches plus one partial, at the
        planning quantile). What ``Device.hold`` weighs. (Keyed by the latest deadline up
        to it, a priority head due in 10 s put all behind it at 10 s, the hold went
        negative and no limit held at all; helper-313.)"""
        quantile, caps = self.ctx.tables()[0], self.ctx.plan_batches().tolist()
        rows: dict[tuple, int] = {}  # (group, fastest tier rank) -> rows so far
        cost: dict[tuple, float] = {}  # (group, fastest tier rank) -> their seconds
        total, out = 0.0, []
        if len(self.queue) > 1:  # (a lone request has no columns: see _Columns)
            keys = np.minimum.accumulate(self.columns().deadline[::-1])[::-1].tolist()
        else:
            keys = [r.deadline for r in self.queue]
        for r, due in zip(itertools.islice(self.queue, limit), keys, strict=False):
            t = self.ctx.bounds(r)[1]
            k = (r.group, t)
            n, b = rows.get(k, 0) + r.rows, caps[t]
            full, rest = divmod(n, b)
            c = full * float(quantile[t, b]) + (float(quantile[t, rest]) if rest else 0.0)
            total += c - cost.get(k, 0.0)
            rows[k], cost[k] = n, c
            out.append((due, r.deadline, total))
        return out

    def expire(self, now: float) -> list[Request]:
        """Remove and return queued requests that can no longer meet their deadline, even
        alone on their fastest allowed tier, at the quantile admission uses now
        (``admission_quantile``). A queue that has grown to a full batch of rows judges every
        request at ``slo_target``, those admitted at the median included: load shedding
        (``admission_quantile``'s doc). Admission counts the request it admits, so the one
        that fills the queue is judged as the queue it joins. First in the list: the requests
        a more urgent one took the place of at a full queue (``_evict``; REFUSED_FULL)."""
        evicted, self._evicted = self._evicted, []
        if not self.queue:
            return evicted
        q = self.admission_quantile()
        if len(self.queue) <= SMALL_QUEUE or q != self.slo_target:
            # Plain Python beats numpy's call overhead on a short queue (and a queue below
            # max_batch, the median's case, is short unless max_batch is large).
            fastest, quantile = self.ctx.fastest, self.latency.quantile
            ends = [(i, now + quantile(fastest(r), r.rows, q, r.length or None))
                    for i, r in enumerate(self.queue)]  # fmt: skip
        else:
            cols = self.columns()
            alone = self.ctx.tables()[0][cols.hi, cols.rows]  # (n,) seconds
            if self._length_aware:  # at the lane's own length (the longest any text runs at)
                alone = alone / self._length_ratios()[cols.hi]
            over = np.flatnonzero(now + alone > cols.deadline).tolist()
            ends = [(i, now + alone.item(i)) for i in over]
            if self._length_aware:  # those late at the lane's own length: at their own
                fastest, quantile, queue = self.ctx.fastest, self.latency.quantile, self.queue
                ends = [(i, now + quantile(fastest(queue[i]), queue[i].rows, q,
                                           queue[i].length or None)) for i, _ in ends]  # fmt: skip
        # Late by the planning deadline (few: those expiring), then by the grace too.
        past = [(i, end) for i, end in ends if end > self.queue[i].deadline]
        if not past:
            return evicted
        due, head = self._ranks()
        late = [i for i, end in past if end > self.admission_deadline(self.queue[i])]
        graced = [i for i, end in past if end <= self.admission_deadline(self.queue[i])]
        gone, kept = [self.queue[i] for i in late], [self.queue[i] for i in graced]
        self._remove_at(sorted(late + graced))
        for r in gone:
            r.finish(State.REFUSED_DEADLINE, now)
        # Within its grace only: planned to its deadline plus the grace from now on. Planned
        # to the deadline it could no longer make, the planner counted it lost - no batch
        # of its own, none it joins - while expiry kept it: a high-priority head waited
        # behind a low one until its grace ran out too, and made every plan for the rest of
        # the queue infeasible, down to the fastest tier (review helper-264).
        for r in kept:  # (the client's due, deadline + reserve, stays where it was: it
            # judges the answer met or late - moved too, late answers counted met, h270)
            r.deadline, r.reserve, r.grace = r.deadline + r.grace, r.reserve - r.grace, 0.0
            self._enqueue(r)
        if self._length_aware:  # (the kept ones back in)
            self._plan_length()
        self._dropped_if_later(due, head)
        return evicted + gone

    def _ranks(self) -> tuple[float, Request | None]:
        """What ``claim`` ranks this queue by: its due time, ``next_due`` (against other
        models), and its head (against the model's other lanes)."""
        return self.next_due(), self.queue[0] if self.queue else None

    def _dropped_if_later(self, due: float, head: Request | None) -> None:
        """After requests left: where the queue now ranks later than (``due``, ``head``)
        were, the others look again for a free slot (``next_due``'s note)."""
        if self.next_due() > due or (self.queue[0] if self.queue else None) is not head:
            self.device.dropped(self)

    def next_due(self) -> float:
        """When this queue is due: its earliest deadline (inf for an empty queue) - the
        device's order across models (``claim``, over a model's lanes together). Not the
        head's alone: a priority-1 head due in 10 s held back the 40 ms requests behind it
        (helper-309); nor the first ``max_batch``'s: eight such heads did the same
        (helper-312). Where a request leaves and it grows, the others look again for a free
        slot (``Device.dropped``): a request behind the head that expired changed it and
        told no one, and a neighbour's request expired beside an idle slot (helper-311)."""
        deadline = self.earliest_deadline()
        return deadline if math.isfinite(deadline) else math.inf

    def earliest_deadline(self) -> float:
        """The earliest deadline in the queue (absolute seconds; inf when it is empty): by
        then at the latest ``expire`` takes a request out, so a runtime that must expire
        requests with nothing else to wake it (a batch overrunning its plan) looks then.
        ``expire`` may take one out sooner - once it cannot make its deadline even alone on
        the fastest tier, up to one batch earlier - which a wake-up at this time refuses
        that much later than it could (it said "not expired before it": review
        helper-232)."""
        if len(self.queue) <= SMALL_QUEUE:
            return min((r.deadline for r in self.queue), default=math.inf)
        return float(self.columns().deadline.min())

    def next(self, now: float) -> Decision | None:
        """If a slot is free and the queue is not empty, start the policy's decision: its
        requests leave the queue as RUNNING, and the returned ``Decision`` carries the slot
        (hand it back to ``complete``)."""
        slot = self.free_slot()
        if slot is None or not self.queue:
            return None
        decision = self.policy.choose(self.queue, now, self.ctx, self._snapshot(now, slot))
        if decision is None or not decision.requests:
            self.device.passed(self)
            return None
        # (replace() is slower)
        decision = Decision(decision.tier, decision.requests, slot, decision.saturated)
        self._remove_all(decision.requests)
        rows = decision.rows
        for r in decision.requests:
            r.start(decision.tier, rows, now)
        self.running[slot] = (decision, now)
        if self._length_aware:
            self._plan_length()
        self.device.started(self, decision, now)
        return decision

    def _snapshot(self, now: float, slot: int) -> Snapshot:
        """This decision's measurements, frozen before the policy sees them."""
        # Every TIGHT_BUDGET_EVERY decisions, and while the sorted window holds fewer than
        # half the budgets seen (start-up). (Sorting at every lone request, so that the bound
        # was current when a burst began, was ~9 % of the in-process request path; at light
        # load 16 decisions are 16 new budgets of 200, which move the 5th percentile little.)
        stale = self._budget_cdf is None or 2 * len(self._budget_cdf) < len(self._budgets)
        if stale or not self._dispatches % TIGHT_BUDGET_EVERY:
            self._budget_cdf = np.sort(np.fromiter(self._budgets, float, len(self._budgets)))
            self._budget_cdf.flags.writeable = False  # shared by the snapshots until replaced
            self._tight_budget = _low_percentile(self._budget_cdf)
        self._dispatches += 1
        # The model's other lanes - its own running batches first, then the device slots
        # that free first, up to its instances - not every running batch on the device: a
        # neighbour's nearly finished batch is not a slot this model's next batch can take.
        busy = tuple(self.device.lanes(self, now, skip=slot))
        backlog = 0.0
        if self.queue and len(self.device.members) > 1:
            # The others' work due before our last queued request runs before the rest of
            # our queue (EDF across models); nothing is more urgent than our next batch (we
            # got the slot). The last queued in the model's own order, not the latest
            # deadline: a priority head due in 10 s, in the very batch being chosen, counted
            # all of a neighbour's queue as running first and dropped the model to a
            # smaller tier (helper-312).
            last = self.queue[-1]
            backlog = self.device.backlog(self, last.deadline, last.priority)
        # ... and the others' queued requests wait behind our batch: it may run only as long
        # as they can afford.
        hold = self.device.hold(self, now) if len(self.device.members) > 1 else math.inf
        # The batch may run only as long as the tightest clients of the device can wait -
        # the other models' too: bounded by its own clients' budgets alone, a model with
        # 500 ms budgets ran 40 ms batches and a neighbour's 20 ms requests arriving behind
        # them were refused or expired (5-49 % of them at a fifth to half of the device's
        # capacity; review helper-137).
        # Only members whose clients still send (NEIGHBOUR_QUIET_S): an idle one's last
        # bound stays as it was (it changes in its own decisions), and capped its
        # neighbours' batches for good (review helper-140).
        # Their arrivals, which a long lone request of ours turns away, are priced with our
        # own (``Snapshot.neighbours``; review helper-287).
        tight, tight_row, neighbours = self._tight_budget, None, []
        if len(self.device.members) > 1:
            for m in self.device.members:
                if m is not self and (m.queue or now - m._rate_at <= NEIGHBOUR_QUIET_S):
                    row = m.latency.estimate(m.ctx.tiers[-1].name, 1)
                    neighbours.append((m.arrival_rate(now), m._budget_cdf, row))
                    if m._tight_budget < tight:
                        tight, tight_row = m._tight_budget, row
        # A lone request is decided without arrays (Planner._alone); see _Columns.
        columns = self.columns() if len(self.queue) > 1 else None
        rate = self.arrival_rate(now)
        bound = now - self._bound_at <= QUEUE_FULL_MEMORY_S
        rows, lanes, others = math.inf, (), 0.0
        if bound:
            rows, lanes = self._lanes_need(now, rate)
            others = self._others_need(now)
        elif len(self.instances.members) > 1:  # the model's lanes share its slots, always
            lanes = self._lanes_need(now, rate)[1]
        return Snapshot(
            rate, tight, columns, busy, backlog, self._idle_share, hold, self._budget_cdf,
            self.idle_share, self.host_s > 0, self._grows(rate), tuple(neighbours), tight_row,
            bound, rows, lanes, others, self.device.slots,
        )  # fmt: skip

    def _lanes_need(self, now: float, rate: float) -> tuple[float, tuple[float, ...]]:
        """The rows this lane's share of the model's queue holds (its share of the model's
        arrivals, of ``max_queue`` requests of the rows they bring on average), and per tier
        rank the slot-seconds per second the model's other lanes on the device need to keep
        up with theirs on that tier (a text model's length lanes share its tiers' names), in
        batches of their own shares (``Snapshot.queue_rows``, ``Snapshot.lanes_need``).
        O(lanes x tiers)."""
        lanes = self.instances.members
        rates = {id(m): rate if m is self else m.arrival_rate(now) for m in lanes}
        model_rate = sum(rates.values())
        requests = sum(m._requests_seen for m in lanes)
        per_request = sum(m._rows_seen for m in lanes) / requests if requests else 1.0

        def held(r: float) -> float:  # rows a lane with arrival rate r holds queued
            return self.max_queue * per_request * (r / model_rate if model_rate > 0 else 1.0)

        names = [t.name for t in self.ctx.tiers]
        need = [0.0] * len(names)
        for m in self.device.members:
            if m is self or m.instances is not self.instances:
                continue
            r = rates.get(id(m))  # (a lane the model does not list: its own rate)
            if (r := m.arrival_rate(now) if r is None else r) <= 0:
                continue
            b = min(m.ctx.max_batch, max(1, int(held(r))))
            for k, name in enumerate(names):
                need[k] += r * m.latency.mean(name, b) / b
        return held(rate), tuple(need)

    def _others_need(self, now: float) -> float:
        """The slot-seconds per second the device's other models need to keep up with their
        arrivals on their fastest tiers at full batches: the least they take
        (``Snapshot.others_need``)."""
        total = 0.0
        for m in self.device.members:
            if m.instances is self.instances or (r := m.arrival_rate(now)) <= 0:
                continue
            b = m.ctx.max_batch
            total += r * m.latency.mean(m.ctx.fastest_unpinned, b) / b
        return total

    def _grows(self, rate: float) -> bool:
        """Whether batches grow by their host CPU now (``Snapshot.grow_batches``): the
        arrivals (``rate``, rows/s) at the head's fastest tier in its batches of engine
        time, with the handling's CPU per row, need ``GROW_UTILISATION`` of the core - or,
        once grown, still ``KEEP_GROWN_UTILISATION`` (growing lowers the handling's CPU
        per row, which must not switch it off again)."""
        if self.latency.batch_host_s <= 0 or not self.queue:
            self._growing = False
            return False
        tier = self.ctx.fastest(self.queue[0])
        b = self.ctx.batch_cap(tier)
        busy = rate * (self.latency.mean(tier, b) / b + self.host_s)
        self._growing = busy >= (KEEP_GROWN_UTILISATION if self._growing else GROW_UTILISATION)
        return self._growing

    @property
    def idle_share(self) -> float:
        """The decayed share of recent requests that arrived to an idle device, over the
        arrivals seen so far (the EWMA divided by its weight: the first requests of a closed
        loop count as idle at once, not after ~20 of them). ``Snapshot.paced_share``; step 1
        of the planner keeps the plain EWMA (``Snapshot.idle_share``), which starts at 0."""
        return self._idle_share / self._idle_weight if self._idle_weight else 0.0

    def complete(
        self,
        decision: Decision,
        now: float,
        compute_s: float,
        ok: bool = True,
        served: Sequence[Request] | None = None,
        calls: Sequence[tuple[int, float]] | None = None,
        learn: bool = True,
    ) -> None:
        """The batch finished (``ok``: its time is learned, unless ``learn`` is False - a
        batch its engine hung in says nothing of the tier) or failed after ``compute_s``
        seconds of engine time. ``calls``: (rows, seconds) of each engine call where the
        batch ran as several (a sequence model's runs of equal length): each is learned as
        what it was, not the whole as one call of all the rows. ``decision`` is the one
        ``next`` returned: its slot is freed. ``served``: the requests answered, where a
        failed batch's ran again alone (default: all of them if ``ok``, else none). A
        decision that is not running on its slot here (completed twice, or another
        scheduler's) raises ``IllegalTransition`` before anything changes: freeing the slot
        would free whatever batch runs there now."""
        if decision.slot is None:
            raise ValueError("complete() takes the Decision that next() returned (with its slot)")
        run = self.running.get(decision.slot)
        if run is None or run[0] is not decision:
            raise IllegalTransition(
                f"complete(): the batch of requests {[r.id for r in decision.requests]} is not "
                f"running on slot {decision.slot} of this scheduler (completed twice?)"
            )
        del self.running[decision.slot]
        try:
            if ok and learn:
                observed = calls or ((decision.rows, compute_s),)
                # A text batch is compared with the profile at its texts' mean length, as
                # the lane plans (``_plan_length``): what padding to the longest costs
                # above that is learned, as the level. (Compared at the longest, the plans
                # at the mean ran short: 2-7 late answers in 600 short sentences at 30 ms
                # against 1-2 before, in 6 of 6 pairs.)
                mean = self.batch_length(decision)
                for rows, seconds in observed:
                    self.latency.observe(decision.tier, rows, seconds, mean)
                self._observed_at[decision.tier] = now
                if decision.tier in self._relaxed:  # its first batch since a relax
                    self._judge_relax(decision.tier, observed)
            done = None if served is None else {id(r) for r in served}
            for r in decision.requests:  # (served None: every request alike, the hot path)
                good = ok if done is None else id(r) in done
                r.finish(State.SERVED if good else State.FAILED, now)
        finally:
            # Last: the device frees the slot and tells its members, whose listeners may
            # start a batch there at once - on this scheduler too. Released first, such a
            # batch's entry was the one deleted above: its requests never answered, the
            # slot held for good (review helper-232).
            if self._length_aware:
                self._plan_length()
            self.device.release(decision)

    def cancel(self, r: Request, now: float) -> bool:
        """Withdraw a queued request (client went away); False if it already started, or
        never joined the queue (refused at ``submit``)."""
        if r.state != State.QUEUED or r not in self.queue:
            return False
        due, head = self._ranks()
        self._remove_all([r])
        if self._length_aware:
            self._plan_length()
        r.finish(State.CANCELLED, now)
        self._dropped_if_later(due, head)
        return True

    def _index(self, r: Request) -> int:
        """``r``'s index in the queue: bisect on its deadline and priority, then a short scan
        among equal keys (its sequence number is not kept)."""
        i = bisect.bisect_left(self._keys, (-r.priority, r.deadline))
        while self.queue[i] is not r:
            i += 1
        return i

    def _remove_all(self, reqs: Sequence[Request]) -> None:
        self._remove_at(sorted(self._index(r) for r in reqs))

    def _remove_at(self, idx: list[int]) -> None:
        """Remove the queued requests at the sorted indices ``idx`` (a lane planned by
        length plans at its new mean once its caller is done: ``_plan_length``)."""
        for i in reversed(idx):
            if self._length_aware:
                r = self.queue[i]
                self._length_sum -= (r.length or self._own_length) * r.rows
                self._length_n -= r.rows
            del self.queue[i]
            del self._keys[i]
        if self._cols.synced:
            self._cols.delete(idx)
        elif not self.queue:
            self._cols.clear()  # in step again


class _Columns:
    """The scheduler's queue as numpy arrays (see ``plan.Columns``): deadlines, and rows /
    lo / hi / group key stacked in one integer array, updated per insert and removal - a few O(|Q|)
    memory copies, no Python loop - and replaced rather than written in place, so a view
    handed to a policy never changes under it.

    At light load every request is queued alone and decided alone (the planner's ``_alone``
    needs no arrays), so a lone request is not written into arrays at all: ``drop`` marks
    them out of step (``synced`` False), edits are then skipped, and the next ``columns()``
    rebuilds them from the queue; an emptied queue is in step again. (Two numpy
    concatenations per request were ~6 % of the in-process request path.)"""

    def __init__(self) -> None:
        self.synced = True  # False: out of step with the queue until rebuilt
        self.deadline = np.empty(0)
        self.ints = np.empty((4, 0), dtype=np.int64)  # rows, lo, hi, group key
        self._view: Columns | None = None

    @property
    def n(self) -> int:
        return len(self.deadline)

    def drop(self) -> None:
        """Out of step with the queue from now until ``rebuild`` or ``clear``."""
        self.synced = False
        self._view = None

    def clear(self) -> None:
        """The queue is empty: so are the arrays, in step."""
        self.deadline = np.empty(0)
        self.ints = np.empty((4, 0), dtype=np.int64)
        self.synced = True
        self._view = None

    def insert(self, i: int, r: Request, ctx: Context) -> None:
        if not self.synced:
            return
        lo, hi = ctx.bounds(r)
        d, a = self.deadline, self.ints
        self.deadline = np.concatenate((d[:i], (r.deadline,), d[i:]))
        new = ((r.rows,), (lo,), (hi,), (group_key(r.group),))
        self.ints = np.concatenate((a[:, :i], new, a[:, i:]), axis=1)
        self._view = None

    def delete(self, idx: list[int]) -> None:
        if not idx:
            return
        if len(idx) == len(self.deadline):  # the queue empties
            self.clear()
            return
        # The kept runs between the removed indices, concatenated: idx is short (a batch),
        # and slices plus one concatenate beat a boolean mask over the whole queue.
        runs, prev = [], 0
        for i in idx:
            if i > prev:
                runs.append(slice(prev, i))
            prev = i + 1
        runs.append(slice(prev, None))
        self.deadline = np.concatenate([self.deadline[r] for r in runs])
        self.ints = np.concatenate([self.ints[:, r] for r in runs], axis=1)
        self._view = None

    def rebuild(self, queue: Sequence[Request], ctx: Context) -> None:
        cols = ctx.columns(queue)
        self.deadline = np.array(cols.deadline)
        self.ints = np.array(cols.ints)
        self.synced = True
        self._view = None

    def view(self) -> Columns:
        if self._view is None:
            deadline, ints = self.deadline.view(), self.ints.view()
            deadline.flags.writeable = ints.flags.writeable = False
            self._view = Columns(deadline, ints)
        return self._view


def _low_percentile(ordered: np.ndarray, q: float = TIGHT_BUDGET_QUANTILE) -> float:
    """The ``q`` percentile (lower) of sorted values; inf for none."""
    if not len(ordered):
        return math.inf
    return float(ordered[int(q * (len(ordered) - 1))])


def _count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural where it is not one ("1 request", "3 requests")."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"
