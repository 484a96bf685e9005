"""The requests a model was sent, as auto-tiering replays them. No grpc, no numpy beyond
arrays.

Every request that reaches a model's scheduler - admitted or refused: both are demand - is
recorded with its arrival (the server's monotonic clock), latency budget and rows, in a ring
of fixed size. ``write_csv`` hands the recent window to the background chooser
(``innfer tiers apply``) in the format ``sim.tiering.Traffic.read`` parses.

Example:
    >>> log = TrafficLog(capacity=4)
    >>> for t in (0.0, 0.1, 0.2): log.record(t, 0.05, 1)
    >>> arrivals, budgets_ms, rows = log.window(now=0.2, seconds=0.15)
    >>> arrivals.tolist(), budgets_ms.tolist()
    ([0.1, 0.2], [50.0, 50.0])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CAPACITY = 200_000  # requests kept (~5 MB): minutes of traffic at the rates one replica takes


class TrafficLog:
    """A ring of (arrival s, budget s, rows), oldest overwritten first."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._data = np.zeros((capacity, 3))
        self._next = 0  # total recorded; the slot written next is _next % capacity

    def __len__(self) -> int:
        return min(self._next, len(self._data))

    def record(self, arrival: float, budget_s: float, rows: int) -> None:
        self._data[self._next % len(self._data)] = (arrival, budget_s, rows)
        self._next += 1

    def window(self, now: float, seconds: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(arrivals s, budgets ms, rows) of the requests recorded in the last ``seconds``
        before ``now``, in arrival order."""
        n, cap = len(self), len(self._data)
        order = (np.arange(self._next - n, self._next) % cap) if n else np.arange(0)
        rows = self._data[order]
        rows = rows[rows[:, 0] >= now - seconds]
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
        return rows[:, 0], rows[:, 1] * 1e3, rows[:, 2].astype(int)

    def write_csv(self, path: Path, now: float, seconds: float) -> int:
        """Write the window to ``path`` (arrivals from 0); returns the request count."""
        arrivals, budgets_ms, rows = self.window(now, seconds)
        start = arrivals[0] if len(arrivals) else 0.0
        lines = ["arrival_s,budget_ms,rows"]
        rows_out = zip(arrivals - start, budgets_ms, rows, strict=True)
        lines += [f"{a:.6f},{b:.3f},{r}" for a, b, r in rows_out]
        Path(path).write_text("\n".join(lines) + "\n")
        return len(arrivals)
