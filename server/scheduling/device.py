"""One device shared by several models: slots, urgency order across models (deadline; a
request's priority orders only its own model's queue), and the backlog each model's
scheduler must plan behind. Pure: no threads, no clock.

Without it every model has its own slots and none knows what the others load on the same
CPU or GPU, so model A's burst makes model B's batches slower than B planned and B misses
deadlines it admitted. With it:

* the device has ``slots`` (batches that may run at once); a model's scheduler may start a
  batch only on a free device slot;
* when a slot frees, the model due first (the earliest deadline queued in any of its
  lanes) goes first, and among a model's lanes its own order (priority, then deadline) -
  ``claim`` refuses the others until it has started (they are woken on every release, and
  whenever a member's rank gets later: an expiry, a cancel). Priorities do not cross
  models, as in
  Triton, where a priority orders one model's queue: compared across them, any priority a
  client of model A sent - even 100, a low level - ran A's work ahead of every request of
  model B's, which B had admitted and then lost in its queue (41 % of B's 30 ms requests
  within budget, 99 % without; review helper-306);
* each scheduler plans behind the device's backlog: every slot's running batch, whatever
  model it belongs to, from its real start; and for admission, the other models' queued
  work due at or before the new request (it will run first), as full batches on each
  request's fastest allowed tier. So
  load on A shrinks B's tiers, or refuses B's requests at arrival, before B's deadlines
  are missed;
* and the other way round: the member that got the slot may run its batch only as long as
  the others' queued requests, which wait behind it, can afford (``hold``). Without it a
  lane of short sentences, alone in planning its own queue, could pick the full tier while
  the long-sentence lane's requests waited behind it and missed.

On a GPU, other processes' work enters each member's latency model, not the arbiter:
``LatencyModel.set_external`` from NVML utilisation (server/gpu_load.py, the data plane's
``nvml_load``), so every plan on the device - and the backlog the arbiter sums - slows at
once when another process takes the GPU. On a CPU the shared queue here is the only signal.

Example:
    >>> from server.scheduling import Request, Scheduler, TierInfo, make_policy
    >>> tiers = [TierInfo("w100", 0.99, {1: 5.0, 8: 20.0}),
    ...          TierInfo("w050", 0.97, {1: 2.0, 8: 8.0})]
    >>> dev = Device(slots=1)
    >>> a, b = (Scheduler(tiers, make_policy("innfer", tiers), max_batch=8, max_queue=64,
    ...                   device=dev) for _ in range(2))
    >>> a.submit(Request(1, 0.0, 0.100), now=0.0); b.submit(Request(2, 0.0, 0.050), now=0.0)
    >>> a.next(now=0.0) is None  # b's head is due first
    True
    >>> b.next(now=0.0).slot, a.next(now=0.0)  # b runs; the one slot is taken
    (0, None)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from .request import IllegalTransition

if TYPE_CHECKING:
    from .policy import Decision
    from .scheduler import Scheduler

# Device.hold: queued requests looked at per other member. The slack that binds is almost
# always among the most urgent few; a deep queue past them is the planner's own business
# (its admission and plans count the backlog), and the bound must stay cheap per decision.
HOLD_SCAN = 32


class Instances:
    """How many batches one model may run at once across its schedulers - its lanes, one
    per profiled length for a sequence model - whatever slots the device has: its engine
    instances; and how many requests they hold queued together (``queued``). The model's
    lanes share one; a scheduler given none gets its own.

    Example:
        >>> limit = Instances(1)
        >>> limit.full(), limit.limit
        (False, 1)
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a model runs at least one batch at once, got {limit}")
        self.limit = limit
        self.members: list[Scheduler] = []

    def running(self) -> int:
        return sum(len(s.running) for s in self.members)

    def queued(self) -> int:
        """Requests waiting in the model's schedulers together: ``max_queue`` bounds them
        as one queue (before, each lane held ``max_queue``: MiniLM's 5 lanes, 5x)."""
        members = self.members
        if len(members) == 1:  # a model with fixed shapes: one scheduler (the hot path)
            return len(members[0].queue)
        return sum(len(s.queue) for s in members)

    def full(self) -> bool:
        members = self.members
        if len(members) == 1:  # a model with fixed shapes: one scheduler (the hot path)
            return len(members[0].running) >= self.limit
        return self.running() >= self.limit


class Device:
    """``slots`` batch slots shared by the schedulers that ``join`` it. A scheduler given no
    device gets a private one: one code path for slots, alone or shared."""

    def __init__(self, slots: int = 1, name: str = "device") -> None:
        if slots < 1:
            raise ValueError(f"a device needs at least one slot, got {slots}")
        self.slots = slots
        self.name = name
        self.members: list[Scheduler] = []
        # slot -> (scheduler, decision, start time)
        self.running: dict[int, tuple[Scheduler, Decision, float]] = {}
        self._listeners: dict[int, Callable[[], None]] = {}
        self._passed: set[int] = set()  # members whose policy chose to wait

    # -- membership ------------------------------------------------------------------------
    def join(self, scheduler: Scheduler, on_release: Callable[[], None] | None = None) -> None:
        """Add ``scheduler``; ``on_release`` is called whenever another member frees a slot
        (its dispatcher should look again: it may be the most urgent now)."""
        if scheduler not in self.members:
            self.members.append(scheduler)
        if on_release is not None:
            self._listeners[id(scheduler)] = on_release

    def leave(self, scheduler: Scheduler) -> None:
        """Remove ``scheduler`` (its model was unloaded); its running batches keep their
        slots until they complete."""
        if scheduler in self.members:
            self.members.remove(scheduler)
        self._listeners.pop(id(scheduler), None)
        # By id: a member made later at the same address must not start out "passed"
        self._passed.discard(id(scheduler))
        self._notify(None)

    # -- slots -----------------------------------------------------------------------------
    def free_slot(self) -> int | None:
        return next((s for s in range(self.slots) if s not in self.running), None)

    def claim(self, scheduler: Scheduler) -> int | None:
        """A free slot for ``scheduler``'s next batch, or None: no slot is free, or another
        member is due first (another model by its earliest deadline, a lane of the same
        model by the model's order): it must start first."""
        slot = self.free_slot()
        if slot is None or not scheduler.queue:
            return slot
        mine = None  # (computed only where another model has work: a pass over the queues)
        due: dict[int, float] = {}  # another model's due time, by its Instances: once each
        for other in self.members:
            if other is scheduler or not other.queue or id(other) in self._passed:
                continue
            if other.instances.full():  # it cannot start anyway: no stall
                continue
            if other.instances is scheduler.instances:  # a lane of the same model: the
                # model's own order, priority first, as within one queue (a text model's
                # length lanes: a priority-1 short sentence goes before long ones)
                if _lane_key(other) < _lane_key(scheduler):
                    return None
            else:
                mine = _urgency(scheduler) if mine is None else mine
                theirs = due.get(id(other.instances))
                if theirs is None:
                    theirs = due[id(other.instances)] = _urgency(other)
                if theirs < mine:
                    return None
        return slot

    def passed(self, scheduler: Scheduler) -> None:
        """``scheduler`` was granted a slot but its policy chose to wait (a fuller batch):
        it stops holding back the others until its queue changes (``touched``). Passing
        again with an unchanged queue wakes nobody: the others were woken the first time (a
        model's lanes pump each other, so a second wake-up would spin)."""
        if id(scheduler) in self._passed:
            return
        self._passed.add(id(scheduler))
        self._notify(scheduler)

    def touched(self, scheduler: Scheduler) -> None:
        """``scheduler``'s queue changed: its head counts again."""
        self._passed.discard(id(scheduler))

    def dropped(self, scheduler: Scheduler) -> None:
        """``scheduler``'s queue lost its head to an expiry or a cancel: the head that made
        ``claim`` refuse the others is gone, so where a slot is free they look again (not
        for a member that has left: its queue fails, request by request, as it stops).
        Without it a free slot sat idle until the refused member's next arrival or timer: a
        request with a 1.5 s budget waited 1.24 s on an idle device and expired (review
        helper-137)."""
        if scheduler in self.members and self.free_slot() is not None:
            self._notify(scheduler)

    def started(self, scheduler: Scheduler, decision: Decision, now: float) -> None:
        """A batch started on ``decision.slot``; the others look again (another slot may be
        free and the most urgent head is now someone else's)."""
        self.running[decision.slot] = (scheduler, decision, now)
        self._passed.discard(id(scheduler))
        self._notify(scheduler)

    def release(self, decision: Decision) -> None:
        """``decision``'s batch ended: free its slot and wake the other members. Raises
        ``IllegalTransition`` (and frees nothing) when ``decision`` is not the batch running
        on its slot: a batch released twice must not free another one's slot."""
        run = self.running.get(decision.slot)
        if run is None or run[1] is not decision:
            raise IllegalTransition(
                f"release(): slot {decision.slot} of device {self.name} does not run this batch "
                "(released twice?)"
            )
        del self.running[decision.slot]
        self._notify(run[0])

    def _notify(self, owner: Scheduler | None) -> None:
        for sched in list(self.members):
            if sched is not owner:
                wake = self._listeners.get(id(sched))
                if wake is not None:
                    wake()

    # -- what a member plans behind ---------------------------------------------------------
    def offsets(self, now: float, skip: int | None = None, q: float | None = None) -> list[float]:
        """Per slot (except ``skip``), the planning time (s) until it is free: 0 when idle,
        else what the batch running there has left by its own model's latency view (at
        quantile ``q``; default: that model's ``slo_target``)."""
        out = []
        for slot in range(self.slots):
            if slot == skip:
                continue
            run = self.running.get(slot)
            if run is None:
                out.append(0.0)
            else:
                sched, d, started = run
                n = sched.batch_length(d)  # (a text lane's; None for fixed shapes)
                out.append(sched.latency.remaining(d.tier, d.rows, now - started, q, n))
        return out

    def lanes(
        self, scheduler: Scheduler, now: float, q: float | None = None, skip: int | None = None
    ) -> list[float]:
        """The planning times (s) until each of the batches ``scheduler``'s model may run
        at once (``Instances``, fewer than the device's slots) can start: its own running
        batches' time left (any of its lanes'), then, for the instances it is not using,
        the other slots that free first (0 for an idle one). ``offsets`` counts every slot -
        as if the model could run a batch on each, which it cannot. ``skip``: the slot a
        decision of this model is about to take; it is left out and takes one instance, so
        the rest are the model's other lanes (what the planner plans its queue's other
        batches on: ``Snapshot.busy``) - never another model's batch in place of its own.

        Example: two slots, this model (one instance) running 50 ms more, the other slot
        idle: ``lanes(m, now)`` is ``[0.05]``, where ``offsets`` says ``[0.05, 0.0]``.
        """
        mine = scheduler.instances.members
        own, others = [], []
        for slot, (sched, d, started) in self.running.items():
            if slot == skip:
                continue
            n = sched.batch_length(d)  # (a text lane's; None for fixed shapes)
            left = sched.latency.remaining(d.tier, d.rows, now - started, q, n)
            (own if any(sched is m for m in mine) else others).append(left)
        idle = self.slots - len(self.running) - (skip is not None and skip not in self.running)
        limit = scheduler.instances.limit - (skip is not None)
        own.sort()
        if len(own) >= limit:
            return own[:limit]
        others.sort()
        return own + ([0.0] * idle + others)[: limit - len(own)]

    def backlog(self, scheduler: Scheduler, due: float, priority: float = 0.0) -> float:
        """Seconds of the other members' queued work that runs before a request of
        ``priority`` due at ``due`` (absolute seconds): other models' work due at or before
        it (``claim``'s order across models is by deadline), and the same model's other
        lanes' work ahead of it in the model's order (priority, then deadline). Counted as
        full batches on each request's fastest allowed tier at the planning quantile,
        spread over the device's slots."""
        total = 0.0
        for other in self.members:
            if other is scheduler or not other.queue:
                continue
            if other.instances is scheduler.instances:  # a lane of the same model
                total += other.work_due(due, priority)
            else:
                total += other.work_due(due)
        return total / self.slots

    def hold(self, scheduler: Scheduler, now: float) -> float:
        """Seconds ``scheduler``'s next batch may run (at the planning quantile) before
        some other member's queued request would miss its deadline, the others' queued
        work running after it in urgency order across members, as ``work_ahead`` counts it
        (the first ``HOLD_SCAN`` of each queue), spread over the device's slots; inf when no
        other member has queued work. Negative when one is already lost."""
        events = []
        for i, other in enumerate(self.members):
            if other is not scheduler and other.queue:
                events += [(key, i, due, work) for key, due, work in other.work_ahead(HOLD_SCAN)]
        events.sort(key=lambda e: e[0])
        ahead: dict[int, float] = {}  # member -> its work up to the current request
        total, slack = 0.0, math.inf  # total: the sum of ahead's values
        for _, i, due, work in events:
            total += work - ahead.get(i, 0.0)
            ahead[i] = work
            slack = min(slack, due - now - total / self.slots)
        return slack


def _lane_key(s: Scheduler) -> tuple[float, float]:
    """``s``'s head in its model's order (priority, then deadline): how a model's lanes
    rank against each other."""
    head = s.queue[0]
    return (-head.priority, head.deadline if math.isfinite(head.deadline) else math.inf)


def _urgency(s: Scheduler) -> float:
    """When ``s``'s model is due: the earliest deadline over all its lanes' queues
    (``Scheduler.next_due``). Across models the device runs the model due first, and among
    its lanes the model's own order (``_lane_key``); a request's priority orders only its
    own model. Ranked lane by lane instead, two orders made a cycle - lane 1 before lane 2
    by priority, lane 2 before another model by deadline, that model before lane 1 - and
    every slot idled until a request expired (review helper-312)."""
    return min(m.next_due() for m in s.instances.members if m.queue)
