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

from runtime.atomic import write_bytes
from runtime.repository.config import TRAFFIC_CAPACITY

# Requests kept (~5 MB): minutes of traffic at the rates one replica takes. Defined beside
# rebuild.min_requests, which the spec caps at it.
CAPACITY = TRAFFIC_CAPACITY


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

    def snapshot(self) -> TrafficLog:
        """A copy of the ring (one array copy, ~1 ms at capacity): the loop keeps recording
        into this one while the copy is filtered and sorted off it (16-34 ms at capacity
        for a 120-600 s window: too long to stall the serving loop for)."""
        copy = TrafficLog.__new__(TrafficLog)
        copy._data, copy._next = self._data.copy(), self._next
        return copy

    def window(self, now: float, seconds: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(arrivals s, budgets ms, rows) of the requests recorded in the last ``seconds``
        before ``now``, in arrival order."""
        n, cap = len(self), len(self._data)
        order = (np.arange(self._next - n, self._next) % cap) if n else np.arange(0)
        rows = self._data[order]
        rows = rows[rows[:, 0] >= now - seconds]
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
        return rows[:, 0], rows[:, 1] * 1e3, rows[:, 2].astype(int)

    def summary(self, now: float, seconds: float) -> dict:
        """``summarise_traffic`` of the last ``seconds``."""
        return summarise_traffic(*self.window(now, seconds))

    def write_csv(self, path: Path, now: float, seconds: float) -> int:
        """Write the window to ``path`` (``write_traffic``); returns the request count."""
        arrivals, budgets_ms, rows = self.window(now, seconds)
        write_traffic(path, arrivals, budgets_ms, rows)
        return len(arrivals)


def write_traffic(path: Path, arrivals: np.ndarray, budgets_ms: np.ndarray, rows) -> None:
    """The CSV ``sim.tiering.Traffic.read`` parses: header ``arrival_s,budget_ms,rows``,
    arrivals from 0. A budget at or below 0 (a request refused at once: its client's
    deadline had passed) is written as 0.001 ms: demand that no tier meets."""
    start = arrivals[0] if len(arrivals) else 0.0
    budgets_ms = np.maximum(budgets_ms, 1e-3)
    lines = ["arrival_s,budget_ms,rows"]
    lines += [
        f"{a:.6f},{b:.3f},{int(r)}"
        for a, b, r in zip(arrivals - start, budgets_ms, rows, strict=True)
    ]
    write_bytes(path, ("\n".join(lines) + "\n").encode())  # the apply process reads it


def summarise_traffic(arrivals: np.ndarray, budgets_ms: np.ndarray, rows: np.ndarray) -> dict:
    """Request count, span, mean rate, budget p10/p50/p90 and mean rows of some traffic.

    Example:
        >>> s = summarise_traffic(np.array([0.0, 1.0, 2.0]), np.array([10.0, 20, 30]),
        ...                       np.array([1, 1, 1]))
        >>> s["rate_per_s"], s["budget_ms_p10_p50_p90"]
        (1.0, [12.0, 20.0, 28.0])
    """
    n = len(arrivals)
    span = float(arrivals[-1] - arrivals[0]) if n > 1 else 0.0
    q = np.percentile(budgets_ms, [10, 50, 90]) if n else [float("nan")] * 3
    return {
        "requests": n,
        "seconds": span,
        "rate_per_s": (n - 1) / span if span > 0 else 0.0,
        "budget_ms_p10_p50_p90": [float(v) for v in q],
        "rows_mean": float(rows.mean()) if n else 0.0,
    }


def moved_away(
    before: tuple[np.ndarray, np.ndarray, np.ndarray],
    since: tuple[np.ndarray, np.ndarray, np.ndarray],
    tolerance: float,
) -> str | None:
    """How the requests ``since`` (arrivals s, budgets ms, rows - a few seconds' worth)
    differ from the window ``before`` in what their clients ask, or None where they do not
    beyond ``tolerance``: the mean rows changed by more than it (relative), or the budgets'
    distributions lie further apart than it (two-sample Kolmogorov-Smirnov distance: the
    largest share of requests whose budgets crossed) - each also beyond what sampling
    explains at 1 % (1.63 sqrt((n + m) / nm) for the distance, 2.58 standard errors for the
    mean rows). Not ``drifted``'s quantiles: a window that
    began before a shift keeps the old traffic in its p10 / p90 long after most of it is
    gone. Not the rate: closed-loop clients send at the server's pace, and a choice running
    beside it slows that pace (the next check's drift sees a rate that stays moved).

    Example:
        >>> t = np.arange(400) / 100.0
        >>> loose, tight = np.full(400, 50.0), np.full(400, 10.0)
        >>> moved_away((t, loose, t * 0 + 1), (t + 4, loose, t * 0 + 1), 0.2) is None
        True
        >>> moved_away((t, loose, t * 0 + 1), (t + 4, tight, t * 0 + 1), 0.2)
        'budgets p50 50.0 -> 10.0 ms (KS distance 1.00), rows 1.00 -> 1.00, 400 requests'
    """
    a, b = summarise_traffic(*before), summarise_traffic(*since)
    # as ``write_traffic`` hands them to the chooser: a budget spent before its request was
    # recorded is one demand, the shortest (every "moved" between two such was noise)
    x, y = (np.sort(np.maximum(t[1], 1e-3)) for t in (before, since))
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        return None
    grid = np.concatenate([x, y])
    distance = float(
        np.abs(np.searchsorted(x, grid, "right") / n - np.searchsorted(y, grid, "right") / m).max()
    )
    # The mean rows moved beyond ``tolerance`` and beyond what sampling explains (2.58
    # standard errors, its 1 % bound, as the budgets'): mostly single rows with a few large
    # batches read as moved in 14 % of checks of steady traffic at 500 requests, and in
    # every one at drift 0 (review helper-216).
    delta = abs(b["rows_mean"] - a["rows_mean"])
    noise = 2.58 * (float(before[2].var()) / n + float(since[2].var()) / m) ** 0.5
    rows = delta > tolerance * a["rows_mean"] and delta > noise
    if not (rows or distance > max(tolerance, 1.63 * ((n + m) / (n * m)) ** 0.5)):
        return None
    return (
        f"budgets p50 {a['budget_ms_p10_p50_p90'][1]:.1f} -> "
        f"{b['budget_ms_p10_p50_p90'][1]:.1f} ms (KS distance {distance:.2f}), rows "
        f"{a['rows_mean']:.2f} -> {b['rows_mean']:.2f}, {m} requests"
    )


def drifted(before: dict, now: dict, tolerance: float) -> bool:
    """Whether traffic moved since ``before`` (a summary a choice was made for): its rate,
    a budget quantile or the mean rows changed by more than ``tolerance`` (relative).

    Example:
        >>> a = {"rate_per_s": 100.0, "budget_ms_p10_p50_p90": [20, 50, 90], "rows_mean": 1}
        >>> drifted(a, {**a, "rate_per_s": 110.0}, 0.2), drifted(a, {**a, "rate_per_s": 150.0}, 0.2)
        (False, True)
    """
    pairs = [(before["rate_per_s"], now["rate_per_s"]), (before["rows_mean"], now["rows_mean"])]
    pairs += list(zip(before["budget_ms_p10_p50_p90"], now["budget_ms_p10_p50_p90"], strict=True))
    return any(abs(b - a) > tolerance * max(abs(a), 1e-9) for a, b in pairs)
