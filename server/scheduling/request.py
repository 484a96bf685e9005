"""A request's life in the scheduler: an explicit, ordered state enum and the request record.

Every state change goes through ``Request.advance``, which allows only the moves in
``TRANSITIONS`` - always forward in the enum's order - and raises ``IllegalTransition`` on
any other. So "answered exactly once" (a final state is never left) and "only a queued
request starts" are checked where they happen, not assumed by the callers.

Example:
    >>> r = Request(1, arrival=0.0, deadline=0.050)
    >>> r.start("w100", rows=1, now=0.001); r.state.name
    'RUNNING'
    >>> r.finish(State.SERVED, now=0.005); (r.started, r.finished)
    (0.001, 0.005)
    >>> r.finish(State.FAILED, now=0.006)
    Traceback (most recent call last):
    ...
    server.scheduling.request.IllegalTransition: request 1 finished twice (SERVED, then FAILED)
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class State(IntEnum):
    """Ordered: a request only moves to a larger state, and every state >= SERVED is final."""

    QUEUED = 0
    RUNNING = 1
    SERVED = 10
    REFUSED_DEADLINE = 11
    REFUSED_FULL = 12
    FAILED = 13
    CANCELLED = 14

    @property
    def final(self) -> bool:
        return self >= State.SERVED


# The legal moves; a final state has none. A refused submit never enters the queue and its
# request stays QUEUED (``Refused`` carries the reason), so REFUSED_FULL is listed for
# callers that want to record it on the request, not because the scheduler does.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset(
        {State.RUNNING, State.REFUSED_DEADLINE, State.REFUSED_FULL, State.CANCELLED}
    ),
    State.RUNNING: frozenset({State.SERVED, State.FAILED}),
}


class IllegalTransition(RuntimeError):
    """A state change that ``TRANSITIONS`` does not allow (a bug in the caller)."""


@dataclass(eq=False)
class Request:
    """One inference request as the policy sees it (times in seconds on the injected clock).

    ``rows``: samples in the request (its batch dimension). ``deadline``: absolute time by
    which the response must be sent. ``pin``: only this tier. ``min_tier``: this tier or one
    ranked above it in the tiers' order as served (``Context.tiers``: by accuracy - measured
    where every tier has it, else the FLOPs fraction, i.e. by size); a wider tier that
    measured less accurate ranks below it. ``priority``: 0 is default; larger is more
    urgent (Triton: smaller number = higher priority; the server converts before it gets
    here).
    ``payload``: the caller's data (the server's input tensors); the scheduler never reads
    it. ``reserve``: seconds the server moved ``deadline`` earlier than the client's own
    (a high quantile of the time it spends outside queue and compute); the scheduler never
    reads it, the answer is on time until ``due``. ``grace``: seconds past ``deadline`` that
    admission and expiry still accept: the part of the reserve above the overhead they
    judge at (its median, or a quiet server's where lower: ``server.overhead``), so that a
    refusal - a certain miss - does not judge it at the high quantile. ``group``:
    requests of different groups never share a batch (None: one group; the server gives a
    sequence model without a mask each sequence length its own, so that a batch is one
    engine call of one shape, as it is planned). ``length``: the tokens a text's batch is
    padded to for it (0: not planned by length). ``state`` is read-only: it changes through
    ``start``, ``finish`` or ``advance``.

    Example:
        >>> r = Request(7, arrival=0.0, deadline=0.020, rows=2, pin="w050")
        >>> (r.budget, r.state.name)
        (0.02, 'QUEUED')
    """

    id: int
    arrival: float
    deadline: float
    rows: int = 1
    pin: str | None = None
    min_tier: str | None = None
    priority: int = 0
    payload: Any = None
    grace: float = 0.0
    reserve: float = 0.0
    group: Hashable = None
    # Tokens its batch is padded to at least (a text's own length, in a lane that plans by
    # length: ``LatencyModel.set_length``); 0: the lane's length, as for fixed shapes.
    length: int = 0
    # Outcome, written by the transitions below (None / 0 until they happen).
    tier: str | None = None
    started: float | None = None
    finished: float | None = None
    batch_size: int = 0  # rows in the batch this request ran in
    _state: State = field(default=State.QUEUED, init=False, repr=False)

    @property
    def state(self) -> State:
        return self._state

    @property
    def budget(self) -> float:
        return self.deadline - self.arrival

    @property
    def due(self) -> float:
        """The client's deadline as the server counts it: ``deadline`` + ``reserve``."""
        return self.deadline + self.reserve

    def advance(self, to: State, now: float) -> None:
        """The one place the state changes: move to ``to`` at time ``now`` (``started`` for
        RUNNING, ``finished`` for a final state) or raise ``IllegalTransition``."""
        if self._state.final:
            raise IllegalTransition(
                f"request {self.id} finished twice ({self._state.name}, then {to.name})"
            )
        if to not in TRANSITIONS[self._state]:
            raise IllegalTransition(
                f"request {self.id}: {self._state.name} -> {to.name} is not a legal transition"
            )
        self._state = to
        if to.final:
            self.finished = now
        else:
            self.started = now

    def start(self, tier: str, rows: int, now: float) -> None:
        """QUEUED -> RUNNING on ``tier`` in a batch of ``rows`` rows."""
        self.advance(State.RUNNING, now)
        self.tier, self.batch_size = tier, rows

    def finish(self, state: State, now: float) -> None:
        """Move to the final ``state``; a second finish raises ``IllegalTransition``."""
        if not state.final:
            raise ValueError(f"{state.name} is not a final state")
        self.advance(state, now)
