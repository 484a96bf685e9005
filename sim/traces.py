"""Arrival traces for the single-server simulator and the live load generator (seconds):

  poisson      exponential inter-arrivals
  gamma        Gamma inter-arrivals with squared coefficient of variation ``cv2`` (1, 4, 8):
               the same mean rate, burstier as cv2 grows
  varying      a time-varying rate: ramps from 0.5x to 1.5x the base, two short 3x bursts
               and a quiet tail (thinning of a Poisson process); over the whole trace the
               multiplier averages 1.18, so it offers about 1.18x the base rate
  file         one timestamp per line (seconds), replayed as given and whole: the rate
               asked for is not used, and the run covers the file's span where that is
               longer than the duration. Or a traffic CSV as the server records it
               (``arrival_s,budget_ms[,rows]``: auto-tiering's traffic.csv, ``innfer tiers
               suggest --traffic``'s input): each request's own budget and rows are
               replayed too (``recorded``)

A run's window (``trace_window``) is its duration, or up to the last arrival where that is
later; its offered rate (``offered_rate``) is the arrivals it holds over that window - what
the trace offers, not the base rate it was drawn for.

Example:
    >>> from sim.simulator import SimConfig
    >>> t = make_trace(SimConfig(trace="gamma", cv2=4.0, duration_s=10.0), rate=50.0)
    >>> bool(0 <= t[0] and t[-1] < 10.0 and np.all(np.diff(t) >= 0))
    True
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sim.simulator import SimConfig
    from sim.tiering import Traffic

TRACES = ("poisson", "gamma", "varying", "file")


def make_trace(cfg: SimConfig, rate: float) -> np.ndarray:
    """Arrival times in [0, duration) for mean ``rate`` requests per second (the base rate
    of ``varying``), drawn from a generator seeded with ``cfg.seed``; a ``file`` trace's
    times as the file gives them, whatever ``rate`` and the duration.

    Example:
        >>> from sim.simulator import SimConfig
        >>> len(make_trace(SimConfig(duration_s=10.0, seed=1), rate=100.0))  # about 1000
        991
    """
    rng = np.random.default_rng(cfg.seed)
    d = cfg.duration_s
    if cfg.trace == "file":
        if not cfg.trace_file:
            raise ValueError("trace 'file' needs trace_file (one timestamp per line, seconds)")
        return read_trace(cfg.trace_file)
    if rate <= 0:
        raise ValueError(f"arrival rate must be positive, got {rate}")
    if cfg.trace == "poisson":
        return _until(d, lambda: rng.exponential(1 / rate, int(rate * d * 1.5) + 10))
    if cfg.trace == "gamma":
        if cfg.cv2 <= 0:
            raise ValueError(f"cv2 must be positive, got {cfg.cv2}")
        shape = 1 / cfg.cv2
        return _until(d, lambda: rng.gamma(shape, cfg.cv2 / rate, int(rate * d * 3) + 10))
    if cfg.trace == "varying":
        peak = 3 * rate
        t = _until(d, lambda: rng.exponential(1 / peak, int(peak * d * 1.3) + 10))
        keep = rng.random(len(t)) < varying_multiplier(t / d) * rate / peak
        return t[keep]
    raise ValueError(f"unknown trace {cfg.trace!r}; choose one of {', '.join(TRACES)}")


def _until(d: float, draw) -> np.ndarray:
    """Arrival times in [0, d): the running sum of the gaps ``draw()`` returns, a batch a
    call, drawing again while the sum falls short of ``d`` - a bursty trace's batch can
    (gamma cv2 8 at 5/s for 2 s: about 1 seed in 100), and the trace then ended early. A
    trace whose first batch reaches ``d`` is the one drawn before (the same numbers)."""
    gaps = draw()
    t = np.cumsum(gaps)
    while t[-1] < d:
        gaps = np.concatenate([gaps, draw()])
        t = np.cumsum(gaps)
    return t[t < d]


def trace_window(cfg: SimConfig, arrivals: np.ndarray) -> float:
    """The seconds a run covers: ``cfg.duration_s``, or up to the last arrival where that is
    later (a ``file`` trace longer than the duration). Goodput, the offered rate and the
    timeline's bins are per this window.

    Example:
        >>> from sim.simulator import SimConfig
        >>> trace_window(SimConfig(duration_s=30.0), np.array([0.0, 10.0, 100.0]))
        100.0
    """
    last = float(arrivals[-1]) if len(arrivals) else 0.0
    return max(float(cfg.duration_s), last)


def offered_rate(cfg: SimConfig, arrivals: np.ndarray) -> float:
    """Requests per second the trace offers: its arrivals over its window (``varying``
    offers about 1.18x its base rate; a ``file`` trace, whatever it holds).

    Example:
        >>> from sim.simulator import SimConfig
        >>> offered_rate(SimConfig(duration_s=30.0), np.arange(0.0, 101.0, 10.0))  # 11 in 100 s
        0.11
    """
    window = trace_window(cfg, arrivals)
    return len(arrivals) / window if window > 0 else 0.0


def varying_multiplier(x: np.ndarray) -> np.ndarray:
    """Rate multiplier over normalised time x in [0, 1): ramp up, bursts, ramp down, tail.

    Example:
        >>> varying_multiplier(np.array([0.0, 0.37, 0.9])).tolist()
        [0.5, 3.0, 0.5]
    """
    m = np.interp(x, [0, 0.3, 0.6, 0.8, 1.0], [0.5, 1.5, 1.5, 0.5, 0.5])
    bursts = ((x > 0.35) & (x < 0.40)) | ((x > 0.65) & (x < 0.68))
    return np.where(bursts, 3.0, m)


def recorded(path: str | Path) -> Traffic | None:
    """The requests of a traffic CSV (``sim.tiering.Traffic.read``: header
    ``arrival_s,budget_ms[,rows]``, what the server records), or None for a file of bare
    timestamps. Read once per file version: ``make_trace``, the budgets and the rows of one
    run all come from it.

    Example:
        >>> recorded("runs/repo/mlp/.autotier/traffic.csv").budget_ms[:2]  # doctest: +SKIP
        array([12.5, 80. ])
    """
    p = Path(path)
    # The first line that is not blank nor a '#' comment (one with a comma was read as a
    # misspelt header; review 191), however long the comments before it (review 193).
    with open(p, encoding="utf-8-sig", errors="replace") as f:
        first = next((ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")),
                     "")  # fmt: skip
    head = first.encode()
    # A header with a typo ('arrivals,budget_ms') is a header still: read as one, its error
    # names the column to fix - not "not a timestamp in seconds: 'arrivals,budget_ms'"
    # (review 176). Bare timestamps have no commas.
    header_like = "," in first and any(c.isalpha() and c not in "eE" for c in first)
    if not (head.startswith(b"arrival_s") or header_like):
        return None
    st = p.stat()
    return _read_traffic(str(p), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read_traffic(path: str, mtime_ns: int, size: int) -> Traffic:
    from sim.tiering import Traffic  # (sim.tiering imports the simulator, which imports this)

    traffic = Traffic.read(path)
    if not len(traffic.arrival_s):
        raise ValueError(f"{path}: no requests after the header")
    return traffic


def read_trace(path: str | Path) -> np.ndarray:
    """Timestamps (seconds, one a line; blank lines and ``#`` comments skipped), shifted to
    start at 0; or the arrivals of a traffic CSV (``recorded``), shifted alike.

    Example:
        >>> read_trace("arrivals.txt")  # lines "10.0", "10.5", "12"  # doctest: +SKIP
        array([0. , 0.5, 2. ])
    """
    if (traffic := recorded(path)) is not None:
        return traffic.arrival_s - traffic.arrival_s[0]
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # (a BOM: "not a timestamp: '\ufeff0'")
    except UnicodeDecodeError as exc:  # a bare "'utf-8' codec can't decode byte 0x8b"
        byte = exc.object[exc.start : exc.start + 1].hex()
        raise ValueError(
            f"{path}: not a text file of timestamps nor a traffic CSV (byte 0x{byte}: "
            "compressed? decompress it first)"
        ) from None
    values = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            values.append(float(line))
        except ValueError:
            # rows of a traffic CSV without its header: say that, not "not a timestamp"
            # (review helper-236)
            fix = (" - a traffic CSV needs its header first: arrival_s,budget_ms[,rows]"
                   if "," in line else "")  # fmt: skip
            raise ValueError(f"{path}:{i}: not a timestamp in seconds: {line!r}{fix}") from None
    t = np.array(values)
    if len(t) == 0 or not np.all(np.isfinite(t)) or np.any(np.diff(t) < 0):
        raise ValueError(f"{path}: timestamps must be finite, non-decreasing and non-empty")
    return t - t[0]
