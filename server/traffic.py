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
    n, m = len(before[0]), len(since[0])
    if n == 0 or m == 0:
        return None
    both = tuple(np.concatenate(pair) for pair in zip(before, since, strict=True))
    moved, _, distance = _Scan(both, tolerance, BOUNDS_1).score(n)
    if moved <= 1.0:
        return None
    a, b = summarise_traffic(*before), summarise_traffic(*since)
    return (
        f"budgets p50 {a['budget_ms_p10_p50_p90'][1]:.1f} -> "
        f"{b['budget_ms_p10_p50_p90'][1]:.1f} ms (KS distance {distance:.2f}), rows "
        f"{a['rows_mean']:.2f} -> {b['rows_mean']:.2f}, {m} requests"
    )


# Sampling bounds of the two movements at 1 % (``moved_away``) and at 0.1 % (each of
# ``since_change``'s splits): the KS distance's c(alpha) and the normal quantile for the
# mean rows.
BOUNDS_1 = (1.63, 2.58)
BOUNDS_01 = (1.95, 3.29)


def _score(
    distance: float, rows_a: tuple, rows_b: tuple, tolerance: float, bounds: tuple
) -> tuple[float, float]:
    """(moved, significance) of two sets of requests: ``moved`` is how far past its
    threshold the larger of the two movements lies (above 1: moved) - the budgets' KS
    ``distance`` beyond ``tolerance`` and its sampling bound, the mean rows (``rows_a``,
    ``rows_b``: count, mean, variance) beyond ``tolerance`` (relative) and theirs;
    ``significance`` the same against the sampling bounds alone (where along a window a
    change most likely lies).

    The rows' bound is the standard error of the difference under "no change": from the
    variance of both sets together, not each set's own - a set of 500 single-row requests
    that happened to hold none of the rare batches of 64 has no variance of its own, and
    steady traffic read as moved in up to 59 % of windows (review helper-222); without a
    bound at all, in 14 % of checks of mostly single rows (review helper-216)."""
    (n, mean_a, var_a), (m, mean_b, var_b) = rows_a, rows_b
    delta = abs(mean_b - mean_a)
    pooled = (n * var_a + m * var_b + n * m / (n + m) * delta**2) / (n + m)
    rows_noise = bounds[1] * (pooled * (1 / n + 1 / m)) ** 0.5
    budgets_noise = bounds[0] * ((n + m) / (n * m)) ** 0.5
    moved = max(distance / max(tolerance, budgets_noise),
                _ratio(delta, max(tolerance * mean_a, rows_noise)))  # fmt: skip
    return moved, max(distance / budgets_noise, _ratio(delta, rows_noise))


def _ratio(delta: float, bar: float) -> float:
    return delta / bar if bar > 0 else (float("inf") if delta > 0 else 0.0)


# Splits of a window ``since_change`` tries per pass (each pass between the splits beside
# the last one's best, until it has tried every split there: ~4 passes for 3,000 requests).
CHANGE_SPLITS = 16


def since_change(
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    tolerance: float,
    min_requests: int,
    within: int | None = None,
) -> int:
    """Index of the first request of ``rows`` (arrivals s, budgets ms, rows, in arrival
    order) after a shift in what the clients ask, among the last ``within`` (default: all);
    0 where there is none.

    A split is a change where the requests after it moved away from those before
    (``moved_away``'s test, at 0.1 %: ``BOUNDS_01``) and each side holds at least
    ``min_requests``. Of ``CHANGE_SPLITS`` splits of the last ``within``, the most
    significant change is taken, then again between its neighbours, until every split
    there was tried; the search goes on among the requests after it (up to
    ``CHANGE_LIMIT`` changes). The last change is a shift only where its requests asked
    unlike any earlier stretch of the window as long (``_recurs``):
    traffic that alternates (bursts, periodic clients) is a mix the choice serves as a
    whole - cut at its last turn, each check would choose for one phase of it, and the
    next for another (review helper-222). Budgets that drift gradually are cut where the
    recent part alone moved beyond ``tolerance``. ~5 ms for 3,000 requests (a choice's
    default ``simulate_requests``); ~0.1 s more in a full ring (200,000).

    Why: a choice made for a window that began before a shift is made for traffic that no
    longer comes. Live, the first choice after budgets tightened was made on a window half
    old, half new; found stale after its apply, it was dropped, and the set for the new
    traffic came 46 s after the shift instead of about 20 (bench/auto_tiers_live.py,
    session 61).

    Example:
        >>> t = np.arange(1000) / 100.0
        >>> budgets = np.where(t < 6.0, 50.0, 10.0)
        >>> since_change((t, budgets, np.ones(1000)), 0.2, 200)
        600
        >>> since_change((t, np.full(1000, 50.0), np.ones(1000)), 0.2, 200)
        0
        >>> since_change((t, np.where((t // 2) % 2 == 1, 10.0, 50.0), np.ones(1000)), 0.2, 200)
        0
    """
    n = len(rows[0])
    first = start = n - (n if within is None else min(within, n))
    for _ in range(CHANGE_LIMIT):
        found = _located(tuple(c[start:] for c in rows), tolerance, min_requests)
        if found is None:
            break
        start += found  # a change: the last one is searched for after it
    else:
        return 0  # a change after every change: the traffic alternates
    if start == first:
        return 0
    return 0 if _recurs(rows, start, tolerance) else start


# Changes ``since_change`` follows one after another before it calls the traffic a mix.
CHANGE_LIMIT = 8


# Earlier stretches ``_recurs`` compares with the requests after a change, at most.
RECUR_STRETCHES = 64


def _recurs(rows: tuple, at: int, tolerance: float) -> bool:
    """Whether the requests of ``rows`` from ``at`` on asked like some earlier stretch of as
    many requests (``moved_away``'s test at 0.1 % finds no move): up to
    ``RECUR_STRETCHES`` stretches, a quarter of their length apart or evenly spread."""
    n, length = len(rows[0]), len(rows[0]) - at
    if at < length:
        return False
    count = min(RECUR_STRETCHES, (at - length) * 4 // length + 1)
    scan = _Scan(rows, tolerance)
    after = scan.histogram(at, n)
    for start in np.unique(np.linspace(0, at - length, count).astype(int)):
        stretch = (start, start + length)
        moved, _, _ = scan.compare(stretch, (at, n), scan.histogram(*stretch), after)
        if moved <= 1.0:
            return True
    return False


def _located(rows: tuple, tolerance: float, min_requests: int) -> int | None:
    """The most significant change among ``CHANGE_SPLITS`` splits of ``rows`` that leave
    ``min_requests`` on each side, narrowed down between its neighbours until every split
    there was tried; None where no split is one."""
    n = len(rows[0])
    if n < 2 * min_requests:
        return None
    scan = _Scan(rows, tolerance)
    lo, hi, at = min_requests, n - min_requests, None
    while (best := scan.most_moved(lo, hi)) is not None:
        at = best
        if hi - lo < CHANGE_SPLITS:  # every split in [lo, hi] was tried
            break
        spacing = (hi - lo) / (CHANGE_SPLITS - 1)
        lo, hi = max(lo, int(best - spacing)), min(hi, int(best + spacing) + 1)
    return at


class _Scan:
    """``moved_away``'s test (at ``bounds``: 0.1 % unless said) between any stretches of
    some requests, each in O(n) with no sort: the budgets are coded once by rank, so any
    stretch's distribution is a histogram of its codes, and the rows' moments come from
    prefix sums."""

    def __init__(self, rows: tuple, tolerance: float, bounds: tuple = BOUNDS_01) -> None:
        # as ``write_traffic`` hands them to the chooser: a budget spent before its request
        # was recorded is one demand, the shortest (every "moved" between two such was noise)
        budgets = np.maximum(rows[1], 1e-3)
        values = np.unique(budgets)
        self.codes = np.searchsorted(values, budgets)  # (n,) ranks into ``values``
        self.total = np.cumsum(np.bincount(self.codes, minlength=len(values)))  # (U,)
        r = np.asarray(rows[2], dtype=float)
        self.sums = np.concatenate([[0.0], np.cumsum(r)]), np.concatenate([[0.0], np.cumsum(r * r)])
        self.n, self.tolerance, self.bounds = len(budgets), tolerance, bounds

    def most_moved(self, lo: int, hi: int) -> int | None:
        """Of ``CHANGE_SPLITS`` splits from ``lo`` to ``hi`` requests, the most
        significant of those whose sides moved apart, or None where none did."""
        best, at = 0.0, None
        for cut in np.unique(np.linspace(lo, hi, CHANGE_SPLITS).astype(int)):
            moved, significance, _ = self.score(int(cut))
            if moved > 1.0 and significance > best:
                best, at = significance, int(cut)
        return at

    def score(self, cut: int) -> tuple[float, float, float]:
        """``compare`` of the requests before ``cut`` with those from it on."""
        before = self.histogram(0, cut)
        return self.compare((0, cut), (cut, self.n), before, self.total - before)

    def histogram(self, i: int, j: int) -> np.ndarray:
        """(U,) cumulative counts of the budgets of requests ``i`` to ``j`` by rank."""
        return np.cumsum(np.bincount(self.codes[i:j], minlength=len(self.total)))

    def compare(self, a: tuple, b: tuple, a_cdf: np.ndarray, b_cdf: np.ndarray) -> tuple:
        """(moved, significance: ``_score``; the budgets' KS distance) of requests ``a``
        (start, end) against requests ``b``, given their ``histogram``s."""
        n, m = a[1] - a[0], b[1] - b[0]
        distance = float(np.abs(a_cdf / n - b_cdf / m).max())
        moments = self._moments(*a), self._moments(*b)
        return (*_score(distance, *moments, self.tolerance, self.bounds), distance)

    def _moments(self, i: int, j: int) -> tuple[int, float, float]:
        s, sq = (float(c[j] - c[i]) for c in self.sums)
        mean = s / (j - i)
        return j - i, mean, max(sq / (j - i) - mean * mean, 0.0)


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
