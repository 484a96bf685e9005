"""The virtual clock's pending events: earliest first, ties in the order they were pushed,
so that a run is deterministic whatever the events carry (they are never compared).

Example:
    >>> events = Events()
    >>> events.push(2.0, "b"); events.push(1.0, "a"); events.push(1.0, "c")
    >>> events.next_time(), events.pop(), events.pop(), len(events)
    (1.0, (1.0, 'a'), (1.0, 'c'), 1)
"""

from __future__ import annotations

import heapq
import math
from typing import Any


class Events:
    """A priority queue of (time, item) in seconds on the simulation clock."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, t: float, item: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, item))

    def next_time(self) -> float:
        """The earliest event's time; infinity when there is none."""
        return self._heap[0][0] if self._heap else math.inf

    def pop(self) -> tuple[float, Any]:
        t, _, item = heapq.heappop(self._heap)
        return t, item
