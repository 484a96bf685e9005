"""Scheduling policies: given the queue (deadline order) and a free slot, pick a tier and
the requests to batch. Pure functions of their inputs and ``now``: no clock, no transport.

A policy sees two read-only things besides the queue: the scheduler's static ``Context``
(tiers, latency model with its ``slo_target``, batch limit) and a ``Snapshot`` of what the
scheduler measured just before this decision (arrival rate, tight budget, the queue as
columns, when the other slots free up).

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
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from .latency import LatencyModel, TierInfo, dominated
from .plan import Candidate, Columns, Groups, feasible, form_groups, group_key
from .request import Request

# Planner step 1: when at least this share of recent requests arrived to an idle device,
# the load is light whatever the arrival rate (it is paced by our answers); the deadline
# checks of steps 2-4 still bound every choice. Poisson arrivals find the device idle with
# probability 1 - utilisation, so open loads above ~10 % utilisation keep the rate test.
LIGHT_IDLE_SHARE = 0.9
# Context.plan_batch: batch sizes within 2 % of the best time per row count as equally
# efficient, and the largest of them is planned (fewer, fuller batches at no cost).
EFFICIENT_BATCH_SLACK = 0.02
# Context.batch_cap: a batch grows only while it still serves rows faster - to within 1 %
# of the best time per row. A CPU convolution runs 8 rows in about 8x one row's time: a
# batch of 8 serves no more rows per second and makes its first seven requests wait -
# unless each batch also costs CPU the engine would have run on (deciding, handing off,
# settling it: ``LatencyModel.batch_host_s``), which a batch of 8 pays once: while the core
# is nearly full (``Snapshot.grow_batches``) the cap counts that cost, up to the size plans
# form (``plan_batch``, engine time alone). Always counted, it swept requests with loose
# budgets into the fast tier's batches of a tight one at Poisson 2x (served size 0.27-0.41
# vs 0.32-0.45, one run each of 6, against batches of engine time). Counted in the
# plans too, it made a tier whose batches are slower per row (w050 on the live ResNet:
# 2.5 ms alone, 21 ms for 8) look efficient in batches of 8, and the planner chose it
# into late answers: 98.2 vs 99.8 % within budget at 8 clients / 30 ms, 97.0 vs 99.8 %
# open loop at 2x (one run each, against plans of engine time).
BATCH_GROWTH_SLACK = 0.01
# Step 4 on a saturated core runs the longest prefix whose expected met deadlines are
# within this many of the most any prefix meets - and at least half of it (a whole batch of
# tight heads can meet none).
MET_COUNT_SLACK = 0.5
# Planner step 1: a tier is a candidate while the arrivals are at most 2x its full-batch
# throughput (at its mean batch time) where the engines have their CPUs (or a GPU) to
# themselves. Above 1x it cannot carry the load alone: the deadline checks of steps 2-4
# mix in faster tiers as the queue deepens, which is how such a load is carried at the
# highest mean accuracy. On the issue-18 grid (engine time, 2 profiles x 5 traces x 5
# loads, 3 seeds, 30 s) the 0.9 bound left the mean served size below SlackFit's, at equal
# or better attainment, in 22 of the 50 cells. 1.5 sat on the edge of the grid's 1.5x load
# (the full tier's throughput x 1.5 = the arrival rate), where the rate estimate's noise
# let the full tier in and out: below SlackFit's size in 6 of the grid's 10 cells at 1.5x
# (by 0.001-0.007). 1.75, 2 and 3 give the same grid - 48 of 50 cells, mean size 0.6397 /
# 0.6402 / 0.6403 (0.6377 at 1.5), each cell within 0.006 - so the deadline checks, not this
# bound, set the mix there. The 2 cells left (own profile at 1.5x, 0.636 vs 0.639) are the
# head-of-line bound's price: 0.648 without it, at 99.52 %. Attainment >= 99.92 % in every
# seed of every cell. With 2 slots (Poisson and Gamma CV² 8, 1-3x, both profiles, 3 seeds)
# 2 against 1.5 raised the size by up to 0.022 at 1.5-3x at equal or better attainment. The
# bound stays for a rate far past a tier's throughput.
SUSTAINABLE_HEADROOM = 2.0
# ... and at most 0.9x (no tier past its throughput; the 10 % absorb the rate estimate's
# error and partial batches) where request handling runs on the engines' CPUs
# (``Snapshot.shared_cpu``). There the deadline checks do not see what competes with the
# engine - the handling of the requests queued and arriving, requests still in gRPC's
# buffers - and the wider mix lost attainment: live on the issue-18 ResNet pinned to one
# core, 1.5x (with the handling's share of the CPU taken off) trailed 0.9x in 9 of 10
# alternating A/B pairs (open 1x 98.6 / 98.1 vs 99.3 / 99.4 %, open 2x 98.3 / 96.0 vs
# 98.8 / 98.0 %) at no larger served size; the shared-core simulation agreed (2x: 99.78
# vs 99.86 %), and with no bound at all lost a point at 3x.
SHARED_CPU_HEADROOM = 0.9
# Step 1's bound while a bounded queue keeps filling (Snapshot.queue_bound), on the whole
# device's need: a queue of a few batches overflows in the bursts of a load near its
# tiers' capacity. Two lanes of the ResNet profile (one at half its times) sharing
# max_queue 16 at 3x, simulated: 93.1 % within budget at 0.9, 99.2 % at 0.8, 99.5 % at 0.7;
# max_queue 8, one lane, 1x: 99.63 / 99.84 / 99.84 % at mean served size 0.66 / 0.47 / 0.40
# (tests/test_queue_bound.py's harness and profile).
QUEUE_BOUND_HEADROOM = 0.8
# Step 1's bound for a model of several lanes (a text model's lengths), on the need of all
# its lanes: each lane's deadline checks see its own arrivals, not the others', and under
# the 2x bound the short lanes kept the full tier while the long texts were refused. The
# MiniLM lanes as built here, mixed lengths, budgets 100-300 ms, simulated
# (tests/test_queue_bound.py): at 0.85x the smallest tier's capacity 95.2 % within budget at
# 2x, 98.9 % at 0.9; at 0.5x 100 % both, mean served size 0.990 vs 0.986. The price where
# lanes cost alike (the ResNet profile scaled 1/8-1x, four lanes, 1x / 2x): served size
# 0.98 / 0.59 vs 0.95 / 0.48, every request within budget either way.
LANES_HEADROOM = 0.9
# A one-row batch may run past the head-of-line bound only while the arrivals it is expected
# to turn away (those whose budgets its extra time makes unmeetable) stay under this share
# of the misses the SLO allows: the planner's quantile plans spend the rest.
BLOCKING_MISS_SHARE = 0.5
# ... unless at least this share of recent requests found the device idle: then arrivals
# are paced by the answers (one closed-loop client) and none comes during the batch. Higher
# than LIGHT_IDLE_SHARE: Poisson arrivals at 20 % utilisation find it idle 80 % of the time,
# and the decayed share (about 20 arrivals) then reaches 0.98 only by chance.
PACED_IDLE_SHARE = 0.98
# The head-of-line bound never cuts batches below the size the fastest tier needs to serve
# the arrivals at this utilisation (``_hol_limit``): below it, every arrival waits, not just
# the tight ones.
KEEP_UP_UTILISATION = 0.8
# SlackFit's latency bucket: (tier, batch) choices whose latencies differ by less than this
# count as equally fast, so the larger batch, then the more accurate tier, wins. About one
# single-row inference of a small tier: finer buckets would make SlackFit pick by latency
# noise.
SLACKFIT_BUCKET_MS = 2.0


@dataclass(frozen=True)
class Decision:
    """Run ``requests`` (their rows concatenated) on ``tier``. ``slot`` is the worker slot
    it runs on: None as a policy returns it, set by ``Scheduler.next`` when it starts.
    ``saturated``: chosen throughput first because the core the engine shares with request
    handling is nearly full and the queue cannot be saved in full (``throughput_fallback``):
    the replica is past its capacity.

    Example:
        >>> d = Decision("w050", [Request(1, 0.0, 0.05, rows=3), Request(2, 0.0, 0.06)])
        >>> (d.tier, d.rows, d.slot)
        ('w050', 4, None)
    """

    tier: str
    requests: list[Request]
    slot: int | None = None
    saturated: bool = False

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.requests)

    def length(self, own: int) -> int:
        """The mean tokens of its texts, by rows (``Request.length``; a request without one
        counts as ``own``, the lane's length) - what a lane plans and learns a batch at.

        Example:
            >>> texts = [Request(1, 0.0, 1.0, rows=3, length=100), Request(2, 0.0, 1.0)]
            >>> Decision("w050", texts).length(own=20)
            80
        """
        total = sum((r.length or own) * r.rows for r in self.requests)
        return math.ceil(total / max(self.rows, 1))


@dataclass(frozen=True, eq=False)
class Snapshot:
    """What the scheduler measured just before one decision: built per call, never changed.

    ``arrival_rate``: recent arrivals in rows/s (exponentially decayed). ``tight_budget``:
    seconds, a low percentile of recent request budgets (inf before any). ``columns``: the
    queue as read-only arrays (``plan.Columns``) in queue order, kept up to date by the
    scheduler; None makes the planner build them from the queue. ``busy``: for each of the
    model's other lanes (``Device.lanes``: its instances less this decision's), the planning
    time (s) until it can start a batch - its own running batches first, then the device
    slots that free first (0: idle; lanes not listed count as idle) - from each batch's real
    start and the latency model's current view, never a stale end. ``backlog``: seconds of
    other models' queued work on a shared device (``device.Device``) that runs before the
    rest of this queue; the planner checks the rest as if it started that much later
    (conservative: the head batch runs now). ``idle_share``: the decayed share of recent
    requests that arrived to an idle device (empty queue, nothing running). ``hold``: on a
    shared device, the longest (s, at the planning quantile) this decision's batch may run
    before another member's queued requests - which run after it, most urgent first - would
    miss a deadline (``Device.hold``; inf when nothing else is queued): without it a lane or
    model that got the slot plans only its own queue and may pick a slow tier that makes the
    others' requests late. ``budgets``: the recent admissible budgets (s), sorted and
    read-only - their empirical distribution prices the arrivals a long single row would
    turn away (None: none yet, nothing is priced). ``paced_share``: the idle share over the
    arrivals seen so far (not decayed from 0 at start): whether arrivals are paced by the
    answers, for that pricing. ``shared_cpu``: request handling (receiving, decoding,
    encoding, sending) runs on the engines' CPUs and costs them measurable time
    (``Scheduler.host_s`` > 0): step 1 keeps its tighter bound. ``grow_batches``: the core
    that handling shares is nearly full (``Scheduler.batch_host_s`` > 0 and the arrivals
    at the head's fastest tier need ``GROW_UTILISATION`` of it): batches grow by what each
    costs the core outside the engine (``Context.batch_cap``). ``neighbours``: on a shared
    device, each other member whose clients still send, as (arrival rate rows/s, its
    recent budgets sorted or None, its fastest tier's one row s) - their arrivals a long
    lone request turns away are priced too (``_blocks_little``). ``tight_row``: the one
    row on the fastest tier of the member whose budget ``tight_budget`` is (s; None: this
    model's own) - what ``_hol_limit`` leaves room for. ``queue_bound``: the model's queue
    (``max_queue``) was found full in two episodes lately (``QUEUE_FULL_MEMORY_S``): a
    bounded queue turns the overload away before the deadline checks see a backlog, so
    step 1 keeps a tighter bound (``QUEUE_BOUND_HEADROOM``) over the model's and the
    device's load, not this lane's alone. Then ``queue_rows`` is the rows this lane's
    share of the queue holds (its share of the model's arrivals, times ``max_queue`` and
    the rows per request; no batch gathers more), ``others_need`` what the device's other
    models need on their fastest tiers, and ``device_slots`` the device's slots (the
    model's own are the planner's ``slots``: its instances). ``lanes_need`` (bound or
    not): per tier rank the slot-seconds per second the model's other lanes - a text
    model's length lanes - need to keep up on that tier; () for a model of one lane.

    Example:
        >>> snap = Snapshot(arrival_rate=400.0, busy=(0.004,))
        >>> snap.arrival_rate = 0.0
        Traceback (most recent call last):
        ...
        dataclasses.FrozenInstanceError: cannot assign to field 'arrival_rate'
    """

    arrival_rate: float = 0.0
    tight_budget: float = math.inf
    columns: Columns | None = None
    busy: tuple[float, ...] = ()
    backlog: float = 0.0
    idle_share: float = 0.0
    hold: float = math.inf
    budgets: np.ndarray | None = None
    paced_share: float = 0.0
    shared_cpu: bool = False
    grow_batches: bool = False
    neighbours: tuple[tuple[float, np.ndarray | None, float], ...] = ()
    tight_row: float | None = None
    queue_bound: bool = False
    queue_rows: float = math.inf
    lanes_need: tuple[float, ...] = ()
    others_need: float = 0.0
    device_slots: int = 0


class Context:
    """The static part of what a policy sees, built once per scheduler: tiers (most accurate
    first), ``rank`` (tier name -> index in that order, 0 = most accurate), the latency
    model, the batch limit in rows and ``slo_target`` - the probability with which plans
    meet deadlines (the latency model's; ``Scheduler(slo_target=...)`` sets it). Read-only:
    per-decision facts go in ``Snapshot``. (The latency model it holds still learns online;
    that is the scheduler's doing.)

    Example:
        >>> tiers = [TierInfo("w050", 0.97, {8: 9.0}), TierInfo("w100", 0.99, {8: 18.0})]
        >>> ctx = Context(tiers, LatencyModel(tiers), max_batch=8)
        >>> ctx.allowed(Request(1, 0.0, 1.0)), ctx.fastest(Request(2, 0.0, 1.0, pin="w100"))
        (['w100', 'w050'], 'w100')
        >>> ctx.bounds(Request(3, 0.0, 1.0, min_tier="w100")), ctx.slo_target
        ((0, 0), 0.999)
    """

    __slots__ = (
        "_batch",
        "_names",
        "_plan_sizes",
        "_tail",
        "latency",
        "max_batch",
        "rank",
        "tiers",
    )

    def __init__(
        self,
        tiers: Sequence[TierInfo],
        latency: LatencyModel,
        max_batch: int,
        trim_dominated: bool = True,
    ) -> None:
        ordered = tuple(sorted(tiers, key=lambda t: t.accuracy, reverse=True))
        init = object.__setattr__  # __setattr__ below refuses every later write
        init(self, "tiers", ordered)
        init(self, "rank", MappingProxyType({t.name: i for i, t in enumerate(ordered)}))
        init(self, "latency", latency)
        init(self, "max_batch", max_batch)
        init(self, "_names", tuple(t.name for t in ordered))
        # tier -> (the means and per-batch host CPU it was computed from, batch sizes)
        init(self, "_batch", {})
        # plan_batches' array (the same one, kept current) and the means it was read from.
        init(self, "_plan_sizes", (np.zeros(len(ordered), np.int64), [None] * len(ordered)))
        # _tail[k]: the last rank <= k not dominated by a more accurate tier (latency.
        # dominated). An unpinned request's range ends there: its least accurate allowed tier
        # is what plans fall back to as its fastest, and a dominated one is slower than a
        # tier it also allows (under overload, a slow full network beside a calibrated w050
        # that beats it took 98 % of the requests). Not for a fixed policy
        # (``trim_dominated=False``): its tier is the operator's choice, served as named.
        beaten, tail, last = dominated(ordered) if trim_dominated else {}, [], 0
        for k, t in enumerate(ordered):
            last = last if t.name in beaten else k
            tail.append(last)
        init(self, "_tail", tuple(tail))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Context is read-only (setting {name!r}); see Snapshot")

    def allowed(self, r: Request) -> list[str]:
        """Tiers request ``r`` may run on, most accurate first: ``r.pin`` alone, or
        ``r.min_tier`` and every tier more accurate than it (not: every wider tier) - less
        the dominated tiers at the end of that list (slower than a tier above them)."""
        if r.pin is not None:
            return [r.pin]
        return list(self._names[: self.bounds(r)[1] + 1])

    def fastest(self, r: Request) -> str:
        return self.allowed(r)[-1]

    @property
    def fastest_unpinned(self) -> str:
        """The fastest tier a request with no pin nor ``min_tier`` may run on."""
        return self._names[self._tail[-1]]

    def bounds(self, r: Request) -> tuple[int, int]:
        """(lo, hi): the ranks of the most accurate and the fastest tier ``r`` allows."""
        if r.pin is not None:
            k = self.rank[r.pin]
            return k, k
        if r.min_tier is not None:
            return 0, self._tail[self.rank[r.min_tier]]
        return 0, self._tail[-1]

    @property
    def slo_target(self) -> float:
        return self.latency.slo_target

    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(quantile, mean, variance) per (tier rank, rows), seconds; see
        ``LatencyModel.tables``."""
        return self.latency.tables(self._names, self.max_batch + 1)

    def plan_batch(self, tier: str | None = None) -> int:
        """The batch size that serves rows fastest on ``tier`` (default: the fastest tier),
        up to ``max_batch``: the largest within ``EFFICIENT_BATCH_SLACK`` of the best time
        per row. Plans form batches of this size: on a CPU a batch of 8 can take longer per
        row than a batch of 2 (caches), so planning the queue as full batches would refuse
        work that fits (8 closed-loop clients at 30 ms with w025 at 5.4 / 6.3 / 39 ms for
        1 / 2 / 8 rows: as batches of 8 nothing fits; as batches of 2, all do)."""
        return self._batch_sizes(tier)[0]

    def plan_batches(self) -> np.ndarray:
        """``plan_batch`` per tier rank (int64 (T,); one array, kept current - read it
        before the latency model next learns): the batches a plan forms for a class of
        requests whose fastest allowed tier has that rank. One size for every class -
        the fastest tier's - planned the requests pinned to a tier that batches well in
        the fastest tier's small batches, and admission refused a pinned request that the
        planner then served in time (review helper-178)."""
        sizes, seen = self._plan_sizes  # updated in place: a tier whose means changed
        for k, name in enumerate(self._names):
            means = self.latency.means(name)  # replaced when it changes
            if seen[k] is not means:
                sizes[k], seen[k] = self._batch_sizes(name)[0], means
        return sizes

    def batch_cap(self, tier: str, grow: bool = False) -> int:
        """The most rows a batch on ``tier`` runs: the smallest size within
        ``BATCH_GROWTH_SLACK`` of the best time per row, at most ``plan_batch``. Rows past
        it buy no throughput and only delay the batch's first requests. ``grow`` (the core
        is nearly full: ``Snapshot.grow_batches``): per row, a batch's mean time plus the
        latency model's ``batch_host_s`` (CPU each batch costs the engines outside them)."""
        return self._batch_sizes(tier)[2 if grow else 1]

    def _batch_sizes(self, tier: str | None) -> tuple[int, int, int]:
        """(plan_batch, batch_cap, batch_cap grown), cached until the latency model learns
        about ``tier`` or its per-batch host CPU changes. Plain Python: nine floats are
        cheaper in a loop than in numpy (two calls per request)."""
        name = tier if tier is not None else self._names[-1]
        means = self.latency.means(name)  # indexed by rows; replaced when it changes
        host = self.latency.batch_host_s
        cached = self._batch.get(name)
        if cached is not None and cached[0] is means and cached[1] == host:
            return cached[2]
        top = min(self.max_batch, len(means) - 1)
        per_row = [means[b] / b for b in range(1, top + 1)]  # engine time
        paid = [(means[b] + host) / b for b in range(1, top + 1)]  # and the batch's host CPU
        # One pass each (plan_batches runs it for each tier a finished batch taught): the
        # largest size within the efficiency slack, the smallest within the growth one.
        # (default 1: no size passes where a time is not a number - one row, not a crash)
        within = min(per_row) * (1 + EFFICIENT_BATCH_SLACK)
        plan = max((b for b, t in enumerate(per_row, 1) if t <= within), default=1)
        within = min(per_row) * (1 + BATCH_GROWTH_SLACK)
        cap = min((b for b, t in enumerate(per_row, 1) if t <= within), default=1)
        within = min(paid) * (1 + BATCH_GROWTH_SLACK)
        grown = min((b for b, t in enumerate(paid, 1) if t <= within), default=1)
        sizes = (plan, min(cap, plan), min(max(grown, cap), plan))
        self._batch[name] = (means, host, sizes)
        return sizes

    def columns(self, queue: Sequence[Request]) -> Columns:
        """``queue`` as ``Columns`` (O(|Q|) in Python; the scheduler keeps its own up to
        date and hands them over in ``Snapshot.columns``)."""
        bounds = [self.bounds(r) for r in queue]
        return Columns.build(
            [r.deadline for r in queue],
            [r.rows for r in queue],
            [b[0] for b in bounds],
            [b[1] for b in bounds],
            [group_key(r.group) for r in queue],
        )

    def take(self, queue: Sequence[Request], tier: str, limit_rows: int) -> list[Request]:
        """Deadline-ordered requests that may run on ``tier``, up to ``limit_rows`` rows,
        all of the first one's ``group``."""
        batch, rows = [], 0
        for r in queue:
            if tier not in self.allowed(r):
                continue  # not a candidate: it must not cut the batch short either
            if batch and r.group != batch[0].group:
                continue  # another shape: neither in this batch nor cutting it short
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


def nominal_tier(policy: Policy, tiers: Sequence[TierInfo]) -> str:
    """The tier a request is served at when load takes nothing from it: a fixed policy's
    tier (the operator's choice), else the most accurate. Below it a request is degraded -
    the autoscaler's signal - so a choice the operator made must not read as load.

    Example:
        >>> tiers = [TierInfo("w100", 0.99, {8: 18.0}), TierInfo("w050", 0.97, {8: 9.0})]
        >>> nominal_tier(FixedTier("w050"), tiers), nominal_tier(Planner(), tiers)
        ('w050', 'w100')
    """
    if isinstance(policy, FixedTier):
        return policy.tier
    return max(tiers, key=lambda t: t.accuracy).name


def best_in_budget(ranked: Sequence[str], latency: LatencyModel, rows: int, budget: float) -> str:
    """The first tier of ``ranked`` (most accurate first) that ``latency`` (the server
    passes the tiers' times as its timing at load left them) answers ``rows`` rows on
    within ``budget`` seconds alone - the fastest
    (the last) where none would: what an idle replica serves such a request at. Served below
    it, a request lost accuracy to load (degraded); served at it, to its own budget, which
    more replicas would not change (review 159). The server's metric and the simulated
    cluster count degraded by it.

    Example:
        >>> tiers = [TierInfo("w100", 0.99, {1: 4.0}), TierInfo("w050", 0.97, {1: 1.0})]
        >>> best_in_budget(["w100", "w050"], LatencyModel(tiers), 1, 0.002)
        'w050'
    """
    return next((t for t in ranked if latency.planned(t)[rows] <= budget), ranked[-1])


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
                # The batch's slack, not the head's: with priorities the head is not the
                # earliest deadline it takes (a 100 ms priority-1 head batched a 5 ms
                # request and answered it late; review helper-287). A larger limit takes
                # more rows and no later deadline: no larger batch fits either.
                if est > min(r.deadline for r in batch) - now:
                    break
                key = (math.floor(est / self.bucket), rows, ctx.accuracy(tier))
                if best is None or key > best[0]:
                    best = (key, tier, batch)
        if best is None:
            tier = ctx.fastest(head)
            return Decision(tier, ctx.take(queue, tier, head.rows))
        return Decision(best[1], best[2])


# (batch, finish time in seconds at the slo_target quantile) of a head batch.
HeadBatch = tuple[list[Request], float]
# A head batch's candidates are looked for in Python among the first SCAN_FIRST x B queued
# requests (usually enough: most requests allow most tiers), then in numpy, so that a queue
# full of requests pinned elsewhere costs no more Python steps than that.
SCAN_FIRST = 4


class Planner(Policy):
    """innfer's policy: plan for the whole queue and for the arrivals still to come.

    Notation: Q = the queue in deadline order, head = Q[0], B = max batch (rows), S = slots,
    T = the tiers the head allows (most accurate first), lambda = the recent arrival rate
    (rows/s, decayed), q = ``ctx.slo_target``. Every "meets its deadline" below means: at
    the q quantile of the latency model (a batch's time is log-normal per tier and batch
    size, corrected online; a sequence of batches is the sum of independent ones).
    ``largest_batch(t)`` is the head batch every step uses: the first requests of Q that
    tier t may serve (``Context.take``), the longest prefix of them that finishes by its own
    earliest deadline and runs no longer than tight_budget - latency(fastest tier, 1 row),
    so a client with a tight budget arriving just after it starts can still be served:
    bounded head-of-line blocking - a bound never below the batch the fastest tier needs to
    keep up with lambda (``_hol_limit``). A single row may run longer where the arrivals its extra
    time is expected to turn away - priced from the arrival rate and the recent budgets'
    distribution - stay under half the misses ``slo_target`` allows (``_blocks_little``),
    where arrivals are paced by the answers, or, for a lone request, where another slot
    stays free; the head's fastest tier is always allowed; on a shared device it also runs no
    longer than ``Snapshot.hold``, so the other lanes' or models' queued requests, which run
    after it, keep their deadlines. Only that largest batch is tried per
    tier - a smaller head batch leaves the same requests, less batched, to the rest.
    ``rest_feasible(t, plan)`` checks that after it, R = Q - batch still meets every
    deadline, R planned as it would run (``plan``): batches per fastest allowed tier, in
    deadline order, of their real sizes, each run on tier ``plan`` where its requests allow
    it, else on their fastest allowed tier; in the order of their first request, each on
    the slot that frees first - the head batch's slot after it, the model's other lanes
    (its instances) after their running batches (``Snapshot.busy``).

    Per free slot, ``choose`` runs:
      1. ``sustainable_tiers``: the tiers t in T within the headroom of keeping up with
         arrivals at full batches, lambda <= headroom * S * B / mean latency(t, B) - 2
         where the engines have their CPUs to themselves, 0.9 where request handling
         shares them; a tier further behind builds a backlog that later requests pay for.
         T's fastest tier if none is within it.
      1b. ``one_tier_above``: if the whole queue fits one batch and we keep up (T's
         fastest tier sustains lambda, and after the queue's batch one tier up a full batch
         on the fastest tier still fits the tight budget) and the most accurate sustainable
         tier is not T's first, the candidates are T from one tier above it down to the
         fastest, so that the mix of tiers - not one tier - matches the load. Otherwise the
         candidates are the sustainable tiers.
      2. ``accuracy_first``: for each candidate t, most accurate first, the first whose
         ``largest_batch(t)`` exists and leaves ``rest_feasible(t, plan=t)`` - the rest
         planned at the same tier - is chosen.
      3. ``relaxed``: else the same over every tier in T with the rest planned at each
         batch's fastest allowed tier (Q is too deep to stay at one tier; the head still
         gets the most accurate tier that leaves R feasible).
      3b. ``shorter``: else, where T's fastest tier's largest batch passed over a queued
         request to take ones behind it, its longest prefix that stops before such a
         request and leaves the rest feasible - at the quantile, else at the median, the
         batch it leaves planned where it will run (``plan.Candidate.moved``): the largest
         batch delayed the request it passed over past its deadline.
      4. ``throughput_fallback``: else the queue cannot be saved in full; to save as many
         as possible, on T's fastest tier the batch expected to meet the most deadlines
         per second (at the latency model's median and spread, not at q), or its
         ``largest_batch`` where that is as good; then the next tier up's
         ``largest_batch``; else the head alone on T's fastest tier. While a shared core
         is nearly full (``grow_batches``), the longest prefix of that batch that meets
         about the most deadlines instead (throughput first).

    Cost per decision: ``largest_batch`` once per tier (one ``take``: O(B) rows scanned, or
    O(|Q|) in numpy when requests pinned elsewhere must be skipped; then O(B) prefixes); the
    plan of Q built once (one compiled O(|Q|) pass); step 2's first candidate checked
    alone, then the other checks of steps 2 and 3 in one compiled pass, O(T x (|Q| / B x
    S + B^3)) with S slots. Nothing is quadratic in |Q|,
    pins, min_tier and multi-row requests included. ``work`` counts the requests and
    batches a decision looked at (a cost probe for tests).

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
        self.work = 0  # requests and batches looked at by the last decision: a cost probe
        self._decision: _Decision | None = None  # what one decision computes once

    def choose(self, queue, now, ctx, snap):
        self.work = 0
        allowed = ctx.allowed(queue[0])
        sustainable = self.sustainable_tiers(allowed, ctx, snap)  # 1
        candidates = self.one_tier_above(allowed, sustainable, queue, ctx, snap)  # 1b
        if len(queue) == 1:  # light load: most decisions
            # Another slot stays free (nothing else waits for it, here or on a shared
            # device): a tight arrival runs there, not behind a long row.
            others = snap.busy[: self.slots - 1]
            spare = (len(others) < self.slots - 1 or 0.0 in others) and snap.hold == math.inf
            return self._alone(queue[0], candidates, allowed, now, ctx, snap, spare, self.slots)
        if snap.columns is None or len(snap.columns) != len(queue):
            snap = replace(snap, columns=ctx.columns(queue))
        self._decision = _Decision()
        # Step 2's first candidate alone (most decisions end there), then every other check
        # of steps 2 and 3 in one pass: a check's cost is mostly per pass (the Python
        # around the compiled loop), and a queue that fails step 2 needs step 3 anyway.
        first = candidates[0]
        checked = self._precheck(queue, [(first, first)], now, ctx, snap)
        if not checked[self._key(first, first, ctx)]:
            pairs = [(t, t) for t in candidates[1:]] + [(t, None) for t in allowed]
            self._precheck(queue, pairs, now, ctx, snap)
        decision = (
            self.accuracy_first(queue, candidates, now, ctx, snap)  # 2
            or self.relaxed(queue, allowed, now, ctx, snap)  # 3
            or self.shorter(queue, allowed, now, ctx, snap)  # 3b
            or self.throughput_fallback(queue, allowed, now, ctx, snap)  # 4
        )
        self._decision = None
        return decision

    @staticmethod
    def _alone(
        r: Request, candidates, allowed, now, ctx, snap, spare: bool = False, slots: int = 1
    ) -> Decision:
        """Steps 2-4 for a queue of one request, without their machinery: with nothing
        behind it, every rest is feasible, so step 2 (then 3) picks the first candidate
        (then allowed) tier on which ``r``'s batch passes ``_largest``'s checks - its
        deadline, and the head-of-line bound unless it turns away few arrivals
        (``_blocks_little``) - and step 4 runs it on
        its fastest allowed tier. Same decisions as the general path (tested). ``spare``: a
        long lone request is not priced (``_blocks_little``): another slot stays free."""
        limit_s = _hol_limit(ctx, snap, slots)
        hold = _hold(ctx, snap)
        for tiers in (candidates, allowed):
            for tier in tiers:
                took = ctx.latency.planned(tier)[r.rows]
                if now + took > r.deadline or took > hold:
                    continue
                if took <= limit_s:
                    return Decision(tier, [r])
                if spare or _blocks_little(took, allowed[-1], ctx, snap, r.rows):
                    return Decision(tier, [r])
        return Decision(allowed[-1], [r])

    # -- the steps -------------------------------------------------------------------------
    def sustainable_tiers(self, allowed: list[str], ctx: Context, snap: Snapshot) -> list[str]:
        """Step 1: the tiers of ``allowed`` whose full-batch throughput over the slots,
        times the headroom, covers ``snap.arrival_rate`` (``keeps_up``); the fastest if
        none does. When nearly every recent request found the device idle
        (``snap.idle_share``), every allowed tier: the arrivals are then paced by the
        answers (a closed loop of few clients), so their rate measures how fast we answer,
        not a load to keep up with - reading it as load spiralled one client down to the
        smallest tier."""
        if snap.idle_share >= LIGHT_IDLE_SHARE:
            return list(allowed)
        return [t for t in allowed if self.keeps_up(t, ctx, snap)] or allowed[-1:]

    def keeps_up(self, tier: str, ctx: Context, snap: Snapshot) -> bool:
        """Whether ``tier`` at full batches on every slot, times the headroom (the tighter
        one where handling shares the engines' CPUs: ``snap.shared_cpu``), serves rows as
        fast as they arrive (``snap.arrival_rate``) - with the model's other lanes' need
        (``snap.lanes_need``), which share its slots: judged on its own arrivals, each of
        a text model's length lanes kept the full tier while the long texts were refused
        (MiniLM, mixed lengths at 0.85x its smallest tier's capacity: 92.9 % within
        budget; helper-317). Under a queue bound (``snap.queue_bound``),
        ``_keeps_up_bounded``."""
        if snap.queue_bound:
            return self._keeps_up_bounded(tier, ctx, snap)
        b = ctx.max_batch
        headroom = min(self.headroom, SHARED_CPU_HEADROOM) if snap.shared_cpu else self.headroom
        if snap.lanes_need:  # slot-seconds per second, over the model's lanes
            need = snap.arrival_rate * ctx.latency.mean(tier, b) / b
            headroom = min(headroom, LANES_HEADROOM)
            return need + snap.lanes_need[ctx.rank[tier]] <= headroom * self.slots
        capacity = self.slots * b / ctx.latency.mean(tier, b)  # rows/s
        return snap.arrival_rate <= headroom * capacity

    def _keeps_up_bounded(self, tier: str, ctx: Context, snap: Snapshot) -> bool:
        """``keeps_up`` under a queue bound: this lane's rows in batches of at most what
        its share of the queue holds, plus its model's other lanes' need (slot-seconds per
        second), within ``QUEUE_BOUND_HEADROOM`` of the model's slots (its instances), and
        with the device's other models within that of the device's. Judged at
        ``max_batch`` on this lane's arrivals alone, the full tier "kept up" at 2x its
        capacity while the queue turned away 44 % of the requests as full (ResNet w50,
        max_queue 4), and each of a text model's four length lanes kept it while half were
        (simulated). Against the model's own slots alone with the other models counted, a
        light neighbour on a 4-slot device sent a 1-instance model to its fastest tier
        (helper-316)."""
        b = min(ctx.max_batch, max(1, int(snap.queue_rows)))
        need = snap.arrival_rate * ctx.latency.mean(tier, b) / b
        if snap.lanes_need:
            need += snap.lanes_need[ctx.rank[tier]]
        headroom = min(self.headroom, QUEUE_BOUND_HEADROOM)
        if need > headroom * self.slots:
            return False
        return snap.device_slots <= 0 or need + snap.others_need <= headroom * snap.device_slots

    def one_tier_above(
        self,
        allowed: list[str],
        sustainable: list[str],
        queue: Sequence[Request],
        ctx: Context,
        snap: Snapshot | None = None,
    ) -> list[str]:
        """Step 1b: the candidate tiers - from one above the most accurate sustainable tier
        down to the fastest when the whole queue fits one batch and we keep up, else
        ``sustainable``. Keeping up: the fastest tier sustains the arrivals, and after the
        queue's batch on the tier above, a full batch of new arrivals on the fastest tier
        still fits the tight budget - clients in a closed loop return together, and a
        slower batch must not make them unservable (with a 30 ms budget, a 2-row batch on
        a tier 2x slower used to turn away the next 6 requests)."""
        snap = snap or Snapshot()
        first = allowed.index(sustainable[0])
        b = ctx.max_batch
        rows = sum(r.rows for r in queue) if len(queue) <= b else b + 1
        # (A queue bounded at a batch or less always fits one: then the mix above the load
        # is what fills it and turns arrivals away.)
        small = snap.queue_bound and snap.queue_rows <= b
        if not first or rows > b or small or not self.keeps_up(allowed[-1], ctx, snap):
            return sustainable
        up = allowed[first - 1]
        after = ctx.latency.estimate(up, rows) + ctx.latency.estimate(allowed[-1], b)
        if after > snap.tight_budget:
            return sustainable
        return allowed[first - 1 :]

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
        feasible with each batch on its fastest allowed tier; None if there is none."""
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
        tier (step 2) or on each batch's fastest allowed tier (step 3). The checks ``choose``
        ran ahead (step 2's first candidate, then the others in one pass) are reused; the
        first feasible candidate in ``tiers`` order wins, as if they had been checked one by
        one."""
        for tier in tiers:
            plan = tier if rest_at_same_tier else None
            if self._precheck(queue, [(tier, plan)], now, ctx, snap)[self._key(tier, plan, ctx)]:
                return Decision(tier, self._largest_once(queue, tier, now, ctx, snap)[0])
        return None

    @staticmethod
    def _key(tier: str, plan: str | None, ctx: Context) -> tuple[str, int | None]:
        """A check's identity: planning the rest on the fastest tier is planning it on each
        batch's fastest allowed tier."""
        p = None if plan is None else ctx.rank[plan]
        return tier, None if p == len(ctx.tiers) - 1 else p

    def _precheck(self, queue, pairs, now, ctx, snap) -> dict:
        """Check the (head tier, plan tier) pairs not checked yet in this decision, in one
        pass; returns every result so far (a pair whose tier has no head batch: False)."""
        checked = self._decision.checked if self._decision is not None else {}
        todo, heads, plans = [], [], []
        for tier, plan in pairs:
            key = self._key(tier, plan, ctx)
            if key in checked or key in todo:
                continue
            head = self._largest_once(queue, tier, now, ctx, snap)
            if head is None:
                checked[key] = False
                continue
            todo.append(key)
            heads.append((tier, head[0], head[2]))
            plans.append(plan)
        if todo:
            ok = self._check(queue, heads, plans, now, ctx, snap)
            checked.update(zip(todo, ok, strict=True))
        return checked

    def shorter(
        self,
        queue: Sequence[Request],
        allowed: list[str],
        now: float,
        ctx: Context,
        snap: Snapshot,
    ) -> Decision | None:
        """Step 3b: where the fastest allowed tier's largest batch passed over a queued
        request (pinned elsewhere, of another group, outside the tier's range) to take
        ones behind it, the longest of its prefixes that stop before such a jump whose
        rest is feasible (each batch on its fastest allowed tier, the one it took from at
        its first request left: ``plan.Candidate.moved``) at the ``slo_target`` quantile,
        else at the median; None if there is none. The largest batch delayed the request
        it passed over past its deadline while the prefix left everyone's met: without
        this, step 4 ran it (its met-rate counts only the batch's own requests) and the
        passed-over one expired although admission had planned it in time (review
        helper-178). On step 4's tier only: the queue cannot be saved in full by steps 2
        and 3, and every tier's prefixes, the most accurate first, cost attainment
        (bench/scheduler_groups.py, 8 seeds: 8 length groups at full load 0.966 against
        0.973, 10 % pinned at half load 0.978 against 0.981); on the fastest tier, every
        cell as without the step. A queue of one class - no pins, groups or min_tier - has
        no jumps. One compiled pass per quantile over at most B - 1 prefixes."""
        fastest = allowed[-1]
        found = self._largest_once(queue, fastest, now, ctx, snap)
        if found is None:
            return None
        batch, _, where = found
        if where[-1] - where[0] == len(where) - 1:
            return None  # consecutive queue indices (ascending): no jump
        # A prefix passes what _largest asks of a batch (planned times need not grow with
        # the rows: a noisy single row can be planned longer than two).
        state = self._decision
        limit_s = state.hol if state is not None else _hol_limit(ctx, snap, self.slots)
        hold, planned, own = _hold(ctx, snap), ctx.latency.planned(fastest), ctx.fastest(batch[0])
        heads, rows, due = [], 0, math.inf
        for k in range(1, len(batch)):
            rows, due = rows + batch[k - 1].rows, min(due, batch[k - 1].deadline)
            jump = where[k] != where[k - 1] + 1
            took = planned[rows]
            if jump and _runs(took, rows, due - now, hold, limit_s, own, ctx, snap, k == 1):
                heads.append((fastest, batch[:k], where[:k]))
        if not heads:
            return None
        for z in (ctx.latency.z, 0.0):
            ok = self._check(queue, heads, [None] * len(heads), now, ctx, snap, z, moved=True)
            fine = [h for h, good in zip(heads, ok, strict=True) if good]
            if fine:
                return Decision(fastest, fine[-1][1])  # ascending length: the longest
        return None

    def throughput_fallback(
        self,
        queue: Sequence[Request],
        allowed: list[str],
        now: float,
        ctx: Context,
        snap: Snapshot,
    ) -> Decision:
        """Step 4: the queue cannot be saved in full. On the fastest allowed tier, its
        largest batch if it takes every row that tier would batch; else the prefix of that
        batch expected to meet the most deadlines per second (``_met_rates``), if it beats
        the largest batch's; then the next tier up's largest batch; else the head alone on the
        fastest allowed tier. Counting met deadlines per second, not the head's at
        ``slo_target``: held to the quantile, an overloaded queue ran a row or two per batch
        on a tier whose full batches would have kept up (one tier at 1.0 / 2.0 ms for 1 / 8
        rows, budgets U(4, 8) ms: 30 % within budget at full-batch capacity, against 85 %
        for plain full batches).

        While the core is nearly full (``snap.grow_batches``: handling shares it and each
        batch costs it ``batch_host_s``), the longest prefix of that tier's batch that meets
        about the most deadlines (within ``MET_COUNT_SLACK`` of the most expected, and at
        least half of it), not the most per second: throughput first. Per second the head
        alone wins when it is tight, and a queue of heads that are all tight - what a
        saturated core's queue is - then runs one row at a time, pays the per-batch cost for
        every row and stays that tight for good; the rows left behind still need the core
        later (issue 18's ResNet on one core at 10 closed-loop clients, 30 ms: 0.39 within
        budget over 5 simulated seeds, 0.85 this way; live 4.3 / 4.2 % before, 51.9 /
        68.3 % after, in the same run). Gating it on a standing queue (most recent
        decisions reaching this step) was measured and not kept (docs/design.md)."""
        fastest = allowed[-1]
        found = self._largest_once(queue, fastest, now, ctx, snap)
        takes = self._decision.takes if self._decision is not None else {}
        batch, _ = takes.get(fastest) or self._take(queue, fastest, ctx, snap)
        if snap.grow_batches and len(batch) > 1:
            counts = _expected_met(batch, fastest, now, ctx, _hold(ctx, snap))
            most = max(counts)
            least = most - min(MET_COUNT_SLACK, most / 2)  # (most < 1: not a batch of none)
            k = max(i for i, met in enumerate(counts) if met >= least)
            return Decision(fastest, batch[: k + 1], saturated=True)
        if found is None or len(found[0]) < len(batch):
            rates = _met_rates(batch, fastest, now, ctx, _hold(ctx, snap))
            least = 0.0 if found is None else max(rates[len(found[0]) - 1], 0.0)
            best = max(range(len(rates)), key=lambda k: (rates[k], k), default=None)
            if best is not None and rates[best] > least * (1 + 1e-9):
                return Decision(fastest, _with_head(batch[: best + 1], fastest, now, ctx))
        if found is not None:
            return Decision(fastest, found[0])
        for tier in reversed(allowed[:-1]):
            found = self._largest_once(queue, tier, now, ctx, snap)
            if found is not None:
                return Decision(tier, found[0])
        return Decision(fastest, ctx.take(queue, fastest, queue[0].rows))

    # -- what the steps share --------------------------------------------------------------
    @staticmethod
    def largest_batch(
        queue: Sequence[Request], tier: str, now: float, ctx: Context, snap: Snapshot, slots=1
    ) -> HeadBatch | None:
        """(batch, finish) for the longest prefix of ``take(queue, tier, B)`` that meets its
        own deadlines on ``tier`` and runs within the head-of-line bound (``_hol_limit``,
        over ``slots`` slots); None if none does."""
        found = Planner._largest(queue, tier, now, ctx, snap, slots)
        return None if found is None else found[:2]

    def _largest_once(self, queue, tier, now, ctx, snap):
        """``_largest``, computed once per tier and decision (steps 2, 3 and 4 share it)."""
        state = self._decision if self._decision is not None else _Decision()
        if tier not in state.heads:
            if state.hol is None:
                state.hol = _hol_limit(ctx, snap, self.slots)
            state.heads[tier] = self._largest(
                queue, tier, now, ctx, snap, self.slots, state.hol, state.takes
            )
            self.work += ctx.max_batch
        return state.heads[tier]

    @staticmethod
    def _largest(
        queue: Sequence[Request],
        tier: str,
        now: float,
        ctx: Context,
        snap: Snapshot,
        slots: int = 1,
        limit_s: float | None = None,
        takes: dict | None = None,
    ) -> tuple[list[Request], float, list[int]] | None:
        """``largest_batch`` plus the queue indices of the batch's requests. ``limit_s``:
        ``_hol_limit`` if already known; ``takes``: where to keep ``_take``'s answer."""
        if limit_s is None:
            limit_s = _hol_limit(ctx, snap, slots)
        hold = _hold(ctx, snap)
        batch, where = Planner._take(queue, tier, ctx, snap)
        if takes is not None:
            takes[tier] = (batch, where)
        planned = ctx.latency.planned(tier)  # seconds by rows
        rows = [0]
        due = [math.inf]
        for r in batch:
            rows.append(rows[-1] + r.rows)
            due.append(min(due[-1], r.deadline))
        for k in range(len(batch), 0, -1):
            took = planned[rows[k]]
            own = ctx.fastest(batch[0])
            if _runs(took, rows[k], due[k] - now, hold, limit_s, own, ctx, snap, k == 1):
                return batch[:k], now + took, where[:k]
        return None

    @staticmethod
    def _take(
        queue: Sequence[Request], tier: str, ctx: Context, snap: Snapshot
    ) -> tuple[list[Request], list[int]]:
        """``ctx.take(queue, tier, b)`` and the queue indices it took, ``b`` the tier's
        ``batch_cap`` (rows past it buy no throughput); a first request of more rows than
        ``b`` runs alone. b candidates are always enough (each has a row); see
        ``SCAN_FIRST``. Only requests of the first candidate's ``group`` are candidates."""
        cols = snap.columns
        k = ctx.rank[tier]
        b = ctx.batch_cap(tier, snap.grow_batches)
        reach = min(len(queue), SCAN_FIRST * b)
        candidates = []
        group = None
        for i in range(reach):
            r = queue[i]
            if _allows(ctx, r, k) and (not candidates or r.group == group):
                candidates.append(i)
                group = r.group
                if len(candidates) == b:
                    break
        if len(candidates) < b and reach < len(queue):
            # Requests pinned elsewhere fill the front of the queue: find the rest in numpy.
            if cols is None:
                cols = ctx.columns(queue)
            more = np.flatnonzero((cols.lo[reach:] <= k) & (k <= cols.hi[reach:])) + reach
            if group is None and not candidates:
                group = queue[int(more[0])].group if len(more) else None
            # The group's by its key (a hash), then by the group itself (keys may collide).
            more = more[cols.group[more] == group_key(group)]
            for i in more.tolist():
                if queue[i].group == group:
                    candidates.append(i)
                    if len(candidates) == b:
                        break
        batch, where, rows = [], [], 0
        for i in candidates:
            r = queue[i]
            if batch and rows + r.rows > b:
                break
            batch.append(r)
            where.append(i)
            rows += r.rows
        return batch, where

    def rest_feasible(
        self,
        queue: Sequence[Request],
        batch: list[Request],
        tier: str,
        now: float,
        ctx: Context,
        snap: Snapshot,
        plan: str | None,
    ) -> bool:
        """Whether every request of ``queue`` not in ``batch`` (which runs on ``tier`` on this
        slot, starting now) meets its deadline, its batch planned on ``plan`` where the
        batch allows it, else on its fastest allowed tier (always when ``plan`` is None)."""
        head = (tier, batch, _positions(batch, queue))
        return self._check(queue, [head], [plan], now, ctx, snap)[0]

    def _check(self, queue, heads, plans, now, ctx, snap, z=None, moved=False) -> list[bool]:
        """``rest_feasible`` for several (tier, batch, queue indices) at once, at the
        ``z`` score (default: the latency model's, ``slo_target``'s); ``moved``: see
        ``plan.Candidate``."""
        if all(len(where) == len(queue) for _, _, where in heads):
            return [True] * len(heads)  # each batch takes the whole queue: no rest to check
        state = self._decision
        if state is None or state.plan is None:
            plan = self._plan(queue, now, ctx, snap)
            if state is not None:
                state.plan = plan
        else:
            plan = state.plan
        lat = ctx.latency
        candidates = []
        for (tier, batch, where), rest in zip(heads, plans, strict=True):
            rows = sum(r.rows for r in batch)
            rank = None if rest is None else ctx.rank[rest]
            mean, var = lat.mean(tier, rows), lat.var(tier, rows)
            candidates.append(Candidate(where, mean, var, rank, moved))
        self.work += len(candidates) * len(plan.groups)
        return feasible(
            plan.groups,
            plan.cols,
            candidates,
            plan.tables,
            lat.z if z is None else z,
            plan.others,
            plan.start,
        )

    def _plan(self, queue, now, ctx, snap) -> _Plan:
        """What every check of one decision shares (see ``_Plan``)."""
        cols = snap.columns
        if cols is None or len(cols) != len(queue):
            cols = ctx.columns(queue)
        groups = form_groups(cols, ctx.plan_batches())
        self.work += len(cols)
        others = list(snap.busy[: self.slots - 1])
        others += [0.0] * (self.slots - 1 - len(others))
        start = now + snap.backlog  # a shared device's other work goes first
        return _Plan(groups, cols, ctx.tables(), others, start)


class _Plan(NamedTuple):
    """The queue's plan for one decision's checks: its batches (``groups``), its columns,
    the latency tables, the other slots' planning times (s) and when the rest may start
    (s)."""

    groups: Groups
    cols: Columns
    tables: tuple[np.ndarray, np.ndarray, np.ndarray]
    others: list[float]
    start: float


class _Decision:
    """What one ``Planner.choose`` computes once and its steps share."""

    __slots__ = ("checked", "heads", "hol", "plan", "takes")

    def __init__(self) -> None:
        self.heads: dict[str, tuple | None] = {}  # tier -> _largest's answer
        self.takes: dict[str, tuple] = {}  # tier -> _take's answer (the batch before cuts)
        self.hol: float | None = None  # _hol_limit, the same for every tier
        self.plan: _Plan | None = None  # the whole queue's plan, for every check
        self.checked: dict[tuple, bool] = {}  # (tier, plan rank) -> rest feasible


def turned_away(budgets: np.ndarray, lo: float, hi: float) -> float:
    """The integral of the budgets' empirical CDF F over [lo, hi] (seconds): arrivals at
    rate 1/s during a batch that ends ``hi - l`` seconds from now, each needing ``l`` more
    after it, are turned away at the rate F(remaining + l) - integrated over the batch, and
    counted only beyond the first ``lo - l`` seconds (what the batch costs in any case).

    Example:
        >>> budgets = np.array([0.005, 0.010, 0.020, 0.040])
        >>> turned_away(budgets, 0.0, 0.010)   # F: 1/4 from 5 ms, 1/2 from 10 ms
        0.00125
        >>> turned_away(budgets, 0.010, 0.010)
        0.0
    """
    if hi <= lo or len(budgets) == 0:
        return 0.0
    return float(np.clip(hi - budgets, 0.0, hi - lo).mean())


def _blocks_little(took: float, fastest: str, ctx: Context, snap: Snapshot, rows: int = 1) -> bool:
    """Whether one request's batch (``rows`` rows) of ``took`` seconds, past the
    head-of-line bound, turns away few enough arrivals: beyond the request's rows on
    ``fastest`` (its fastest allowed tier, which it must run on anyway - a request's rows
    are never split), at the recent arrival rate and budgets, the
    expected arrivals whose budgets its extra time makes unmeetable (each then needs the
    fastest tier's one row) stay under ``BLOCKING_MISS_SHARE`` of the misses ``slo_target``
    allows. The rate is in rows/s, so multi-row traffic is priced as that many arrivals
    (conservative), and it counts refused arrivals, which would be refused anyway. It may
    when the budgets are unknown (none admissible yet: the bound is inf too), and when
    arrivals are paced by the answers (``PACED_IDLE_SHARE``: one closed-loop client comes
    back after its answer, never during the batch). (One row only, before: an idle replica
    that had seen a few tight budgets served one client's 8-row requests with 1 s budgets
    on the fastest tier for its next ~200 requests, each counted degraded; review
    helper-258.) On a shared device the neighbours' arrivals (``snap.neighbours``) are
    priced as well, each needing its own fastest row after the batch, and never as paced
    by our answers: priced on this model's alone, a model with 300 ms budgets ran its lone
    requests on a 32 ms tier while a neighbour's 12-20 ms requests behind them were
    refused, 24-52 % of them (review helper-287)."""
    least = ctx.latency.planned(fastest)[rows]
    if took <= least:
        return True
    lost = 0.0
    if snap.budgets is not None and snap.paced_share < PACED_IDLE_SHARE:
        after = ctx.latency.estimate(ctx.tiers[-1].name, 1)
        lost += snap.arrival_rate * turned_away(snap.budgets, least + after, took + after)
    for rate, budgets, after in snap.neighbours:
        if budgets is not None:
            lost += rate * turned_away(budgets, least + after, took + after)
    return lost <= BLOCKING_MISS_SHARE * (1 - ctx.slo_target)


def _runs(
    took: float,
    rows: int,
    left: float,
    hold: float,
    limit_s: float,
    fastest: str,
    ctx: Context,
    snap: Snapshot,
    alone: bool = False,
) -> bool:
    """Whether a head batch of ``rows`` rows planned at ``took`` seconds may run: it meets
    its own earliest deadline (``left`` seconds away), runs within ``hold``, and within the
    head-of-line bound ``limit_s`` - or is one request (``alone``) that turns away few
    arrivals (``_blocks_little``; ``fastest``: its fastest allowed tier)."""
    if took > left or took > hold:
        return False
    return took <= limit_s or (alone and _blocks_little(took, fastest, ctx, snap, rows))


def _met_rates(batch: list[Request], tier: str, now: float, ctx: Context, hold: float) -> list:
    """For each prefix of ``batch`` on ``tier`` (k = 1, 2, ... requests; one entry each,
    so that entry k - 1 is the prefix of k), the deadlines it is expected to meet per
    second: ``_expected_met`` over its mean time (-inf past ``hold``)."""
    lat, rows = ctx.latency, 0
    rates = []
    for met, r in zip(_expected_met(batch, tier, now, ctx, hold), batch, strict=True):
        rows += r.rows
        rates.append(met / lat.mean(tier, rows) if met > -math.inf else met)
    return rates


def _expected_met(batch: list[Request], tier: str, now: float, ctx: Context, hold: float):
    """For each prefix of ``batch`` on ``tier`` (entry k - 1 for the first k requests),
    the expected number of its requests whose deadline its batch time meets - that time
    log-normal with the latency model's current median and planning sigma; -inf where its
    planned time exceeds ``hold`` (the first is always allowed). Not cut at the first
    prefix over ``hold``: a noisy profile's planned times need not grow with the rows, and
    ``_largest`` may have taken a longer prefix past a shorter one that is over it."""
    lat = ctx.latency
    planned = lat.planned(tier)  # seconds by rows
    counts, rows = [], 0
    for k, r in enumerate(batch, 1):
        rows += r.rows
        if k > 1 and planned[rows] > hold:
            counts.append(-math.inf)
            continue
        median, sigma = lat.median(tier, rows), lat.planning_sigma(tier, rows)
        met = 0.0
        for q in batch[:k]:
            left = q.deadline - now
            if left <= 0:
                continue
            met += _normal_cdf(math.log(left / median) / sigma) if sigma > 0 else left >= median
        counts.append(met)
    return counts


def _likely_met(batch: list[Request], tier: str, now: float, ctx: Context) -> list[Request]:
    """``batch`` less the requests its time on ``tier`` is expected to miss (a deadline
    before its median): they expire in the queue at their deadlines rather than ride late in
    a batch their rows slow. The batch only gets faster, so with exact latencies nothing
    kept is late (a pinned head with priority took a tight request into its batch of 5 on
    the full tier: answered at 12 ms for a 7.8 ms deadline). All of it if that keeps none.

    Example:
        >>> tiers = [TierInfo("w100", 0.99, {1: 4.0, 8: 18.0})]
        >>> ctx = Context(tiers, LatencyModel(tiers), max_batch=8)
        >>> batch = [Request(1, 0.0, 0.050), Request(2, 0.0, 0.003), Request(3, 0.0, 0.050)]
        >>> [r.id for r in _likely_met(batch, "w100", 0.0, ctx)]
        [1, 3]
    """
    median = ctx.latency.median(tier, sum(r.rows for r in batch))
    kept = [r for r in batch if r.deadline >= now + median]
    return kept or batch


def _with_head(batch: list[Request], tier: str, now: float, ctx: Context) -> list[Request]:
    """``_likely_met`` of the longest prefix of ``batch`` that keeps its head (the most
    urgent request), where the head alone is likely met and the requests that prefix leaves
    behind can wait for the batch after it (each batch at its planned time): the rows
    behind the head slowed the batch past its deadline, ``_likely_met`` dropped the head,
    and the slot ran a request with 100 ms of slack while the head - met alone - expired
    behind it (review helper-129). Otherwise ``_likely_met`` of it all: where the rest
    cannot wait (budgets a few batches long, a saturated queue), a smaller batch for the
    head's sake lost them and the throughput with them - one tier at 1 / 2 ms for 1 / 8
    rows, budgets U(3, 5) ms at full load: 67.9 % within budget against 74.6 % for the
    fixed tier's plain batches (review helper-305).

    Example:
        >>> tiers = [TierInfo("t", 0.9, {1: 4.0, 2: 4.4})]
        >>> ctx = Context(tiers, LatencyModel(tiers), max_batch=2)
        >>> head, rest = Request(1, 0.0, 0.0042), Request(2, 0.0, 0.100)
        >>> [r.id for r in _with_head([head, rest], "t", 0.0, ctx)]
        [1]
        >>> tight = Request(3, 0.0, 0.0060)  # cannot wait 4 ms more for a batch of its own
        >>> [r.id for r in _with_head([head, tight], "t", 0.0, ctx)]
        [3]
    """
    whole = _likely_met(batch, tier, now, ctx)
    head = batch[0]
    if whole[0] is head:
        return whole
    for k in range(len(batch), 0, -1):  # (at k = 1 it keeps the head whatever)
        kept = _likely_met(batch[:k], tier, now, ctx)
        if kept[0] is head:
            break
    if k == 1 and head.deadline < now + ctx.latency.median(tier, head.rows):
        return whole  # late even alone
    rest = [r for r in whole if r not in kept]
    # A head that outranks the rest is kept whatever they lose: the trade of one request
    # for more is made among equals only (priority-1 requests, a tenth of a saturated
    # queue, were the ones dropped: 97.0 % within budget against 99.3 % before; helper-309)
    if any(head.priority > r.priority for r in rest):
        return kept
    if _can_wait(rest, now + ctx.latency.planned(tier)[sum(r.rows for r in kept)], tier, ctx):
        return kept
    return whole


def _can_wait(rest: list[Request], start: float, tier: str, ctx: Context) -> bool:
    """Whether ``rest``, as one batch on ``tier`` from ``start``, is met as planned: each
    deadline at or after the batch's planned end (at the planning quantile, not the median:
    a head kept at the cost of rows that then expire loses more than it saves)."""
    if not rest:
        return True
    end = start + ctx.latency.planned(tier)[sum(r.rows for r in rest)]
    return all(r.deadline >= end for r in rest)


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _hol_limit(ctx: Context, snap: Snapshot, slots: int) -> float:
    """The head-of-line bound (s) on a batch's planned time: the tight budget less one row
    on the fastest tier, so that a tight arrival just after the batch starts can still be
    served - but never below the planned time of the batch the fastest tier needs to serve
    the arrivals over ``slots`` slots at ``KEEP_UP_UTILISATION``. Tight budgets near a full
    batch's time otherwise cut every batch to a row or two, the device falls behind, and
    every arrival waits, not just the tight ones (one tier at 1.0 / 2.0 ms for 1 / 8 rows,
    p90 1.3x, budgets U(4, 8) ms, 2,000 rows/s: 61 % within budget, against 99.6 % for
    plain full batches)."""
    fastest = ctx.tiers[-1].name
    # (room for the tight client's own row: a neighbour's 0.3 ms, not this model's 8.6)
    row = snap.tight_row if snap.tight_row is not None else ctx.latency.estimate(fastest, 1)
    limit = snap.tight_budget - row
    means = ctx.latency.means(fastest)  # seconds, indexed by rows
    need = snap.arrival_rate / (KEEP_UP_UTILISATION * slots)  # rows/s per slot
    top = min(ctx.max_batch, len(means) - 1)
    rows = next((b for b in range(1, top + 1) if b / means[b] >= need), top)
    return limit if rows == 1 else max(limit, ctx.latency.planned(fastest)[rows])


def _hold(ctx: Context, snap: Snapshot) -> float:
    """``snap.hold``, unless not even one row on the fastest tier fits it: the others'
    requests then miss whatever runs (or are refused), and bounding this batch would only
    cost throughput."""
    hold = snap.hold
    if hold == math.inf or hold < ctx.latency.planned(ctx.tiers[-1].name)[1]:
        return math.inf
    return hold


def _allows(ctx: Context, r: Request, k: int) -> bool:
    """Whether ``r`` may run on the tier of rank ``k`` - an unpinned one too: a trailing
    tier less accurate and slower than another (dominated) is not among its tiers, and a
    pinned request's batch on it took unpinned ones along (review helper-129)."""
    lo, hi = ctx.bounds(r)
    return lo <= k <= hi


def _positions(batch: list[Request], queue: Sequence[Request]) -> list[int]:
    """The queue indices of ``batch``'s requests (a scan from the front: a head batch's
    requests are the first ones a tier allows)."""
    wanted = {id(r) for r in batch}
    found = {}
    for i, r in enumerate(queue):
        if id(r) in wanted:
            found[id(r)] = i
            if len(found) == len(wanted):
                break
    return [found[id(r)] for r in batch]


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
