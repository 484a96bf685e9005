"""A request's life in the scheduler: an explicit, ordered state enum and the request record.

Every accepted request reaches exactly one final state; ``Request.finish`` enforces it
(a second finish raises), so "answered exactly once" is checked where it happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class State(IntEnum):
    """Ordered: every state >= SERVED is final."""

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


@dataclass(eq=False)
class Request:
    """One inference request as the policy sees it (times in seconds on the injected clock).

    ``rows``: samples in the request (its batch dimension). ``deadline``: absolute time by
    which the response must be sent. ``pin``: only this tier. ``min_tier``: no tier smaller
    (by width order) than this. ``priority``: 0 is default; larger is more urgent (Triton:
    smaller number = higher priority; the server converts before it gets here).
    """

    id: int
    arrival: float
    deadline: float
    rows: int = 1
    pin: str | None = None
    min_tier: str | None = None
    priority: int = 0
    payload: Any = None
    state: State = State.QUEUED
    tier: str | None = None
    started: float | None = None
    finished: float | None = None
    batch_size: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def budget(self) -> float:
        return self.deadline - self.arrival

    def finish(self, state: State, now: float) -> None:
        if not state.final:
            raise ValueError(f"{state.name} is not a final state")
        if self.state.final:
            raise RuntimeError(
                f"request {self.id} finished twice ({self.state.name}, then {state.name})"
            )
        self.state = state
        self.finished = now
