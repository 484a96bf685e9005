"""The cluster's offered load over time and its arrivals. Load is in multiples of one
replica's full-tier capacity (``sim.engine_time.full_capacity``):

  diurnal   a day compressed into ``day_s``: a sinusoid from ``trough`` to ``peak``, times a
            few short bursts
  steps     piecewise-constant load, ``(from time s, load)`` pairs

Example:
    >>> from sim.cluster import ClusterConfig
    >>> cfg = ClusterConfig(trace="steps", steps=((0.0, 1.0), (60.0, 3.0)), duration_s=120)
    >>> load_at(cfg, np.array([0.0, 59.0, 60.0])).tolist()
    [1.0, 1.0, 3.0]
    >>> t = make_cluster_trace(cfg, capacity=10.0)  # about 10/s, then 30/s
    >>> int((t < 60).sum()), int((t >= 60).sum())
    (585, 1772)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sim.cluster import ClusterConfig

CLUSTER_TRACES = ("diurnal", "steps")


@dataclass(frozen=True)
class DiurnalTrace:
    """Load (multiples of one replica's full-tier capacity) over a day of ``day_s`` seconds:
    ``trough`` at ``trough_at`` (fraction of the day), ``peak`` half a day later, and
    ``bursts`` (start as a fraction of the day, length in seconds, rate multiplier).

    Example:
        >>> DiurnalTrace(day_s=240.0, trough=1.0, peak=4.0, bursts=((0.5, 20.0, 2.5),)).peak
        4.0
    """

    day_s: float = 1440.0
    trough: float = 1.5
    peak: float = 6.0
    trough_at: float = 4 / 24
    bursts: tuple[tuple[float, float, float], ...] = (
        (8.5 / 24, 40.0, 2.5),
        (15.0 / 24, 60.0, 2.0),
        (21.0 / 24, 30.0, 3.0),
    )


def load_at(cfg: ClusterConfig, t: np.ndarray) -> np.ndarray:
    """Offered load (multiples of one replica's full-tier capacity) at times ``t``, from the
    config's ``trace`` (with its ``diurnal`` or ``steps``); see the module's example."""
    t = np.asarray(t, float)
    if cfg.trace == "diurnal":
        d = cfg.diurnal
        phase = 2 * np.pi * (t / d.day_s - d.trough_at)
        load = d.trough + (d.peak - d.trough) * (1 - np.cos(phase)) / 2
        for start, length, mult in d.bursts:
            s = start * d.day_s
            load = np.where((t >= s) & (t < s + length), load * mult, load)
        return load
    if cfg.trace == "steps":
        starts = np.array([s for s, _ in cfg.steps], float)
        loads = np.array([v for _, v in cfg.steps], float)
        if len(starts) == 0 or starts[0] > 0 or np.any(np.diff(starts) < 0):
            raise ValueError("steps must start at 0 and be in time order")
        return loads[np.searchsorted(starts, t, side="right") - 1]
    raise ValueError(f"unknown trace {cfg.trace!r}; choose one of {', '.join(CLUSTER_TRACES)}")


def make_cluster_trace(cfg: ClusterConfig, capacity: float) -> np.ndarray:
    """Arrival times in [0, duration): a Poisson process at ``load_at x capacity`` requests
    per second (thinning of one at the highest rate), seeded with ``cfg.seed``; see the
    module's example. The highest rate is sought on a 0.25 s grid (with 0.1 % to spare for
    the diurnal curve between its points) and at every step and burst start: a step or
    burst shorter than the grid, missed, was thinned at a lower rate than its own, and
    offered a fraction of the load it reports."""
    rng = np.random.default_rng(cfg.seed)
    top = float(np.max(load_at(cfg, np.arange(0.0, cfg.duration_s, 0.25)))) * capacity * 1.001
    if cfg.trace == "steps":
        starts = [s for s, _ in cfg.steps]
    else:
        starts = [start * cfg.diurnal.day_s for start, _, _ in cfg.diurnal.bursts]
    starts = [s for s in starts if 0 <= s < cfg.duration_s]
    if starts:
        top = max(top, float(np.max(load_at(cfg, np.array(starts)))) * capacity)
    if top <= 0:
        return np.zeros(0)
    n = int(top * cfg.duration_s * 1.2) + 20
    t = np.cumsum(rng.exponential(1 / top, n))
    while t[-1] < cfg.duration_s:  # rare: draw more
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1 / top, n))])
    t = t[t < cfg.duration_s]
    keep = rng.random(len(t)) < load_at(cfg, t) * capacity / top
    return t[keep]
