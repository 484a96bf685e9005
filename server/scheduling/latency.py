"""What the scheduler knows about the tiers: accuracy, and how long a batch takes.

A batch's engine time on a tier is modelled as log-normal. Its median and spread come from
the build-time profile (p50, p90 and, where measured, p99 per profiled batch size), linearly
interpolated for batch sizes between the profiled ones, and are corrected online from the
batches that ran:

* the **level**: an EWMA of log(observed / profiled p50) per tier - the geometric mean, so a
  profile that is 2x too slow is corrected as fast as one that is 2x too fast;
* the **spread**: an EWMA of successive differences of those log ratios (a level shift counts
  once, not for every batch until the level has caught up), blended with the profile's
  spread as observations accumulate. Where the profile says some batch sizes spread more
  than others, the learned spread keeps that shape: the observed differences are also
  compared with those the profile predicts for the same pairs of batches, and a batch size
  is planned with at least the profile's spread for it times that ratio, at most 1 (a tier
  run mostly at batch 1 must not teach the planner that its noisier batch of 2 is as tight;
  an engine noisier than its profile everywhere gets the observed spread at every size, not
  the profile's differences between sizes magnified).

Work outside this server - other processes on the same GPU - enters as an **external
factor** (``set_external``, >= 1, from NVML utilisation: ``server.gpu_load``): the median
is profile x learned level x external factor now, and batches teach the level only the
residual, observed / (profile x the external factor in force when they are observed). With
steady outside load the learned level stays ~1; a change of outside load moves every plan at
once, before any batch has shown it. At 1 (the default, and always on CPU) nothing changes.

The planning latency (``estimate``) is the ``slo_target`` quantile of the next batch's time
as predicted from those estimates: the scheduler promises deadlines with probability
``slo_target``. The estimates are themselves noisy - the level is an average of the last few
batches, the spread of the last few tens - so the prediction is wider than the learned
spread (``planning_sigma``): by the level's own noise, and by a margin for the spread's, sized
for ``slo_target`` (planned with the learned spread as if exact, 0.999 plans were missed 5-6x
as often as promised). The median is the level's, unchanged.

Example:
    >>> t = TierInfo("w100", accuracy=0.99, latency_ms={1: 2.0, 8: 9.0})
    >>> lat = LatencyModel([t])
    >>> round(lat.estimate("w100", 4) * 1e3, 3)   # between profiled sizes: interpolated
    5.0
    >>> for _ in range(20): lat.observe("w100", 8, 0.0045)    # the engine is 2x faster
    >>> round(lat.estimate("w100", 8) * 1e3, 2)
    4.5
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from server.scheduling.lengths import LengthSpan

# The default probability of meeting a deadline that plans are made for (per model:
# ``slo_target`` in model.yaml). 0.999: one late answer in a thousand admitted requests.
DEFAULT_SLO_TARGET = 0.999
# Weight of the newest batch in the online level correction. 0.3: a profile that is 2x off
# is within 12% after 5 batches and 2% after 10 (a fraction of a second of traffic); the
# level's own noise is then about 0.4 x the per-batch spread.
EWMA_ALPHA = 0.3
# Weight of the newest successive difference in the online spread. Smaller than the level's:
# a spread needs more batches to estimate than a mean, and one odd batch must not make
# every plan pessimistic for long.
JITTER_ALPHA = 0.1
# The planning spread's margin for the noise of the learned spread: the relative variance of
# one successive difference's magnitude, |D|, per batch it averages over. Var|D| / E|D|^2 =
# pi/2 - 1 (0.57) for a normal D, times ~1.4 for the correlation between successive
# differences (two share a batch: corr(|d_i|, |d_i+1|) ~ 0.22). Over the EWMA's effective
# number of batches (19 at JITTER_ALPHA 0.1) the learned spread is then ~20 % off at 1 sd
# (measured: 20 %; 15 % at sigma 0.3, where DIFF_CLIP cuts the largest differences).
SPREAD_NOISE = 0.8
# Batches after which the observed spread counts as much as the profile's (the blend weight
# is n / (n + TRUST_BATCHES)): a profile measured under contention stops widening plans
# within a few tens of batches; a quiet profile of a noisy engine widens them as fast.
TRUST_BATCHES = 10
# Observed/typical ratios are clipped to this range around the level learnt so far before
# they are averaged: an outlier (a GC pause, a page fault storm) must not swing the plan by
# more than a 20x batch does, while a sustained shift is followed step by step. Clipped
# around 1 instead, a tier running 500-1,500x its profile (an engine slow on some inputs)
# was planned at 20x for good, and a neighbour on its device admitted requests behind it
# only to expire them (review helper-267). LEVEL_MAX bounds the level itself.
RATIO_MIN, RATIO_MAX = 0.2, 20.0
LEVEL_MAX = 1e5
LOG_RATIO_MIN, LOG_RATIO_MAX, LOG_LEVEL_MAX = (
    math.log(RATIO_MIN),
    math.log(RATIO_MAX),
    math.log(LEVEL_MAX),
)
# A successive difference of log ratios beyond this (a 2x jump) is clipped: a level shift
# or one outlier then adds at most this much to the spread.
DIFF_CLIP = math.log(2.0)
# The largest external factor ``set_external`` accepts: 10x, outside work holding 90 % of
# the device (``server.gpu_load`` clips the others' share there). Beyond it the
# utilisation says little more (a saturated GPU time-slices, it does not slow by 100x), and
# the learned level can still follow what batches show.
EXTERNAL_MAX = 10.0
# A new external factor within this relative change of the one in force is ignored: NVML
# samples jitter by a few percent, and each change rewrites every tier's tables.
EXTERNAL_STEP = 0.02
# Seconds; guards the ratio against a zero typical time in a hand-written profile.
MIN_TYPICAL_S = 1e-9
# Spread (log-normal sigma) assumed for a batch that has run past its planned quantile when
# the model's own spread is smaller (a hand-written profile has none): it then ends within
# about a fifth of its estimate, sooner the longer it has overrun - never "at the old
# estimate" (already past) nor "never".
OVERRUN_SIGMA = 0.05
# Largest planning spread (log-normal sigma): a batch planned past exp(z x 10), some 1e13 x
# its median at z = 3.09, runs never anyway; beyond ~19 the variance is inf, and beyond
# ~26.6 math.expm1 raises and so does the decision - relax's did at each of the next 107
# arrivals in its test, until the relaxes reached home, and that tier stayed planned at
# 1e18 s. Only a corrupted state gets there (relax left one: tests/test_scheduler.py).
PLAN_SIGMA_MAX = 10.0
# Largest spread taken from a profile (p90 at 3.6x the median): every profile measured here
# has had 0.02-0.13. One stalled run of the 7 a load-time profile takes put its p90 at 90x
# the median (sigma 3.5): a 2.7 ms tier was planned at 51 s at slo_target and an idle server
# refused 20 ms budgets - and a refused request runs no batch, so nothing corrected it
# (review helper-250). Batches that run still raise the spread past it where they show it.
PROFILE_SIGMA_MAX = 1.0

_N = NormalDist()
_Z: dict[float, float] = {}  # quantile -> its standard normal score (z_score's cache)
Z90 = _N.inv_cdf(0.90)
Z99 = _N.inv_cdf(0.99)


def z_score(q: float) -> float:
    """The standard normal score of quantile ``q``, cached: a scheduler asks for a handful
    (its ``slo_target``, its admission quantile) on every request."""
    z = _Z.get(q)
    if z is None:
        z = _Z[q] = _N.inv_cdf(q)
    return z


def interpolate(table: Mapping, rows: int) -> float:
    """A latency table's value (ms per batch size) at ``rows`` rows: linear between the
    profiled batch sizes, the smallest profiled size's value below it. Keys may be ints or,
    as read from JSON, strings.

    Example:
        >>> interpolate({"1": 2.0, "8": 16.0}, 4), interpolate({2: 3.0, 8: 6.0}, 1)
        (8.0, 3.0)
    """
    points = sorted((int(b), float(v)) for b, v in table.items())
    if rows > points[-1][0]:
        raise ValueError(f"batch {rows} exceeds the profiled batch sizes {[b for b, _ in points]}")
    lo_b, lo_v = points[0]
    if rows <= lo_b:
        return lo_v
    for hi_b, hi_v in points[1:]:
        if rows <= hi_b:
            return lo_v + (hi_v - lo_v) * (rows - lo_b) / (hi_b - lo_b)
        lo_b, lo_v = hi_b, hi_v
    return lo_v  # unreachable: rows <= the largest size


def lognormal_sigma(p50: float, p90: float | None = None, p99: float | None = None) -> float:
    """The log-normal sigma that puts the given quantiles where they were measured: the
    larger of the fits to p90 and p99 (the tail is what a deadline cares about); 0 when no
    quantile is above the median.

    Example:
        >>> round(lognormal_sigma(10.0, p90=10.0 * math.exp(Z90 * 0.2)), 6)
        0.2
    """
    fits = [0.0]
    for q, z in ((p90, Z90), (p99, Z99)):
        if q is not None and p50 > 0 and q > p50:
            fits.append(math.log(q / p50) / z)
    return max(fits)


def clipped_abs_mean(sd: float, clip: float) -> float:
    """E[min(|D|, clip)] for D ~ Normal(0, sd^2): what an EWMA of clipped successive
    differences converges to when the two batches' log times have that combined spread.

    Example:
        >>> round(clipped_abs_mean(1.0, 1e9), 4)   # no clip: sd * sqrt(2 / pi)
        0.7979
        >>> clipped_abs_mean(0.0, 0.7), round(clipped_abs_mean(1e4, 0.7), 3)
        (0.0, 0.7)
    """
    if sd <= 0:
        return 0.0
    a = clip / sd
    tail = math.erfc(a / math.sqrt(2))  # P(|D| > clip)
    density = (1 - math.exp(-0.5 * a * a)) / math.sqrt(2 * math.pi)  # phi(0) - phi(a)
    return clip * tail + 2 * sd * density


def sum_quantile(mean, var, z):
    """The quantile at standard-normal score ``z`` of a sum of independent log-normal batch
    times with total ``mean`` and ``var`` (Fenton-Wilkinson: the log-normal with the same
    two moments). Exact for one batch; works on floats and numpy arrays alike.

    Example:
        >>> float(sum_quantile(4.0, 0.0, 3.09))   # no spread: the mean
        4.0
    """
    s2 = np.log1p(var / np.maximum(mean * mean, 1e-300))  # nothing to sum: 0
    return mean * np.exp(z * np.sqrt(s2) - 0.5 * s2)


@dataclass(frozen=True)
class TierInfo:
    """One tier: name, measured accuracy (or a proxy such as its width), and latencies in
    milliseconds per profiled batch size: ``latency_ms`` the profile's p90, ``typical_ms``
    its p50 and ``tail_ms`` its p99 where measured. Without ``typical_ms`` the tier is taken
    as deterministic at ``latency_ms`` (hand-written profiles).

    Example:
        >>> TierInfo("w050", 0.97, {1: 2.0, 8: 9.0}, {1: 1.8, 8: 8.0}).max_batch
        8
    """

    name: str
    accuracy: float
    latency_ms: Mapping[int, float]
    typical_ms: Mapping[int, float] | None = None
    tail_ms: Mapping[int, float] | None = None

    @property
    def max_batch(self) -> int:
        return max(int(b) for b in self.latency_ms)

    def scaled(self, factor: float) -> TierInfo:
        """This tier with every profiled time (p90, p50, p99) ``factor`` times as long.

        Example:
            >>> TierInfo("w050", 0.97, {1: 2.0, 8: 9.0}).scaled(0.5).latency_ms
            {1: 1.0, 8: 4.5}
        """

        def times(m: Mapping[int, float] | None) -> dict[int, float] | None:
            return None if m is None else {b: v * factor for b, v in m.items()}

        return TierInfo(self.name, self.accuracy, times(self.latency_ms),
                        times(self.typical_ms), times(self.tail_ms))  # fmt: skip


@dataclass(frozen=True)
class TierEstimate:
    """The latency model's current view of one tier, for metrics: ``factor`` = observed /
    profiled median (1 = as profiled), ``sigma`` the spread used at the largest batch, and the
    planning latency (``slo_target`` quantile, seconds) at batch 1 and at the largest batch."""

    tier: str
    factor: float
    sigma: float
    planned_s_batch1: float
    planned_s_max_batch: float
    observed_batches: int


def _towards(value: float, home: float, keep: float) -> float:
    """``value`` moved to ``home`` + ``keep`` x what it is above it; not below, and home
    itself within a millionth (a keep above 0.5 rounds the last ulp back up for ever:
    every call read as a change; review 201).

    Example:
        >>> _towards(1.0, 0.5, 0.5), _towards(0.4, 0.5, 0.5), _towards(0.5 + 1e-9, 0.5, 0.9)
        (0.75, 0.4, 0.5)
    """
    if value <= home:
        return value
    excess = (value - home) * keep
    return home + excess if excess > 1e-6 else home


class LatencyModel:
    """Profile x online correction, per tier and batch size. Times in seconds.

    ``slo_target``: the probability with which plans meet deadlines; ``estimate`` is that
    quantile of one batch's time. ``remaining`` is the same for a batch already running.
    ``tables`` gives the per-(tier, rows) quantile / mean / variance as arrays for the
    planner's compiled checks; they are rebuilt only for a tier that observed a batch.
    """

    def __init__(
        self,
        tiers: Sequence[TierInfo],
        alpha: float = EWMA_ALPHA,
        slo_target: float = DEFAULT_SLO_TARGET,
        span: LengthSpan | None = None,
    ) -> None:
        from server.scheduling.lengths import STEPS, profile_rows, profile_sigma  # (imports us)

        if not tiers:
            raise ValueError("at least one tier is needed")
        if not 0.5 <= slo_target < 1.0:
            raise ValueError(f"slo_target must be in [0.5, 1), got {slo_target}")
        self.tiers = {t.name: t for t in tiers}
        self.alpha = alpha
        self.slo_target = slo_target
        self.z = z_score(slo_target)
        self._log_factor = {t.name: 0.0 for t in tiers}
        self._jitter = {t.name: 0.0 for t in tiers}  # EWMA of |successive log-ratio diff|
        # EWMA of the profile's expected (clipped) |successive diff| for the same pairs of
        # batch sizes: jitter / expected scales the profile's per-size spread.
        self._expected = {t.name: 0.0 for t in tiers}
        self._last = dict.fromkeys(self._log_factor)  # the previous (log ratio, rows) per tier
        self._count = {t.name: 0 for t in tiers}
        # The noise of the two estimates, for the planning spread (``_planning_scale``): the
        # level's variance in units of one batch's (the EWMA's sum of squared weights), and
        # the spread EWMA's sum of weights and of squared weights.
        self._level_var = {t.name: 0.0 for t in tiers}
        self._jitter_w = {t.name: (0.0, 0.0) for t in tiers}
        # Each tier's correction as it settled (``settle``: the timing at load; none: the
        # profile's) - where ``relax`` returns what later batches taught above it.
        self._home: dict[str, tuple] = {}
        # Per tier, indexed by rows (0 unused): profiled p50, p90 (s) and profile sigma.
        self._p50: dict[str, list[float]] = {}
        self._p90: dict[str, list[float]] = {}
        self._sigma0: dict[str, list[float]] = {}
        for t in tiers:
            p50, p90, p99 = profile_rows(t)
            self._p50[t.name], self._p90[t.name] = p50, p90
            self._sigma0[t.name] = profile_sigma(t, p50, p90, p99)
        # A sequence model's lane: the profile one length shorter too, and the plan point
        # (``set_length``) the tables above are at - STEPS: the lane's own length.
        self._span = span
        self._step = STEPS
        self._moved_up = False  # the last change of plan point was up (``set_length``)
        self._width = max(t.max_batch for t in tiers) + 1
        self._rows_cache: dict[str, tuple[list[float], ...]] = {}
        # (names, width) -> (name -> row, read-only views, the writable arrays)
        self._tables: dict[tuple, tuple[dict, tuple, tuple]] = {}
        # Outside work's slowdown of the device (``set_external``): a multiplier on every
        # tier's median, not learned from batches (those learn the residual).
        self._external = 1.0
        # CPU seconds each batch costs the engines' CPUs outside the engine (deciding,
        # launching and settling it), where request handling shares them; 0 elsewhere.
        # Not in any batch's time: only batch sizing (policy.Context) counts it, once per
        # batch. Its owner sets it (Scheduler.batch_host_s).
        self.batch_host_s = 0.0
        self.version = 0  # bumped by every change of the tables (observe, set_external, ...)
        for name in self.tiers:
            self._refresh(name)

    # -- the distribution ------------------------------------------------------------------
    def _check(self, tier: str, rows: int) -> None:
        if rows > len(self._p50[tier]) - 1:
            raise ValueError(
                f"batch {rows} exceeds tier {tier}'s profiled maximum {len(self._p50[tier]) - 1}"
            )

    def _refresh(self, tier: str) -> None:
        """Recompute the tier's per-rows median, sigma, quantile, mean and variance after a
        change of its correction (the tables and the scalar methods read the same floats)."""
        n = self._count[tier]
        w = n / (n + TRUST_BATCHES)
        observed = self._jitter[tier] * math.sqrt(math.pi) / 2  # E|d| = 2 sigma / sqrt(pi)
        expected = self._expected[tier]
        scale = min(self._jitter[tier] / expected, 1.0) if expected > 1e-12 else 0.0
        f = math.exp(self._log_factor[tier]) * self._external  # x 1.0 at rest: exact
        # At least MIN_TYPICAL_S: a hand-written profile may say 0 ms, and the planner
        # divides by these (rows per second): every next() of the innfer policy raised
        # ZeroDivisionError on one (review helper-232).
        median = [max(v * f, MIN_TYPICAL_S) for v in self._p50[tier]]
        # Learned: the observed spread, or the profile's at this size scaled down by what
        # was observed, whichever is larger; trusted as batches accumulate.
        sigma = [
            math.sqrt(w * max(observed, scale * s) ** 2 + (1 - w) * s * s)
            for s in self._sigma0[tier]
        ]
        k = self._planning_scale(tier, w)
        plan = [min(s * k, PLAN_SIGMA_MAX) for s in sigma]
        quantile = tuple(m * math.exp(self.z * s) for m, s in zip(median, plan, strict=True))
        mean = tuple(m * math.exp(0.5 * s * s) for m, s in zip(median, plan, strict=True))
        var = [m * m * math.expm1(s * s) for m, s in zip(mean, plan, strict=True)]
        self._rows_cache[tier] = (median, sigma, quantile, mean, var, plan)

    def _planning_scale(self, tier: str, trust: float) -> float:
        """The planning spread over the learned one. In units of the learned sigma, the
        next batch's log time less the level is normal with variance 1 + v, v the level's
        own variance (the EWMA's sum of squared weights); the learned sigma is off by a
        log-normal factor of log-variance tau^2 = log(1 + r), r its relative variance
        (``SPREAD_NOISE`` over the spread EWMA's effective batches, times the blend's trust
        in it, squared). Planned at z k sigma, a batch is late with probability 1 -
        slo_target when k = sqrt(1 + v) a / z, a solving E[P(Z > a exp(tau N))] = P(Z > z)
        (``_tail_threshold``). Both noises are 0 before the first batch: the profile's
        spread is planned as is."""
        s1, s2 = self._jitter_w[tier]
        r = SPREAD_NOISE * trust * trust * s2 / (s1 * s1) if s1 > 0 else 0.0
        level = math.sqrt(1 + self._level_var[tier])
        if self.z <= 0 or r <= 0:
            return level
        return level * _tail_threshold(self.z, round(math.log1p(r), 3)) / self.z

    def median(self, tier: str, rows: int) -> float:
        """The current median time (s) of a batch of ``rows`` on ``tier``."""
        self._check(tier, rows)
        return self._rows_cache[tier][0][max(rows, 1)]

    def sigma(self, tier: str, rows: int) -> float:
        """The current log-normal sigma of a batch of ``rows`` on ``tier``: the engine's
        spread as learned (``planning_sigma`` is what plans use)."""
        self._check(tier, rows)
        return self._rows_cache[tier][1][max(rows, 1)]

    def planning_sigma(self, tier: str, rows: int) -> float:
        """The log-normal sigma the next batch is planned with: ``sigma`` widened for the
        noise of the learned level and spread (``_planning_scale``); ``estimate``,
        ``quantile``, ``mean``, ``var`` and ``remaining`` use it."""
        self._check(tier, rows)
        return self._rows_cache[tier][5][max(rows, 1)]

    def quantile(self, tier: str, rows: int, q: float, length: int | None = None) -> float:
        """The ``q`` quantile (s) of one batch's time (``estimate``'s cached value at
        ``slo_target``); with ``length``, of a batch of that many tokens rather than at the
        length in force (``set_length``)."""
        if q == self.slo_target:
            at = self.estimate(tier, rows)
        else:
            at = self.median(tier, rows) * math.exp(z_score(q) * self.planning_sigma(tier, rows))
        return at * self._length_ratio(tier, rows, length)

    def _length_ratio(self, tier: str, rows: int, length: int | None) -> float:
        """The profile's p50 at ``length`` tokens over its p50 at the length in force (1
        where there are no lengths)."""
        if length is None or self._span is None:
            return 1.0
        at = self._span.rows(self.tiers[tier], self._span.step(length))[0][max(rows, 1)]
        return at / max(self._p50[tier][max(rows, 1)], MIN_TYPICAL_S)

    def estimate(self, tier: str, rows: int) -> float:
        """Planning latency (s): the ``slo_target`` quantile of one batch's time."""
        self._check(tier, rows)
        return self._rows_cache[tier][2][max(rows, 1)]

    def planned(self, tier: str) -> Sequence[float]:
        """``estimate(tier, rows)`` for every rows at once, indexed by rows (for hot loops;
        read-only, replaced by the next ``observe``)."""
        return self._rows_cache[tier][2]

    def means(self, tier: str) -> Sequence[float]:
        """``mean(tier, rows)`` for every rows at once, indexed by rows (read-only; a new
        sequence after each ``observe`` of ``tier``, so its identity says whether it
        changed)."""
        return self._rows_cache[tier][3]

    def mean(self, tier: str, rows: int) -> float:
        """The current mean time (s) of one batch."""
        self._check(tier, rows)
        return self._rows_cache[tier][3][max(rows, 1)]

    def var(self, tier: str, rows: int) -> float:
        """The current variance (s^2) of one batch's time."""
        self._check(tier, rows)
        return self._rows_cache[tier][4][max(rows, 1)]

    def profiled(
        self, tier: str, rows: int, q: float | None = None, length: int | None = None
    ) -> float:
        """The profile's p90 (s) at ``rows``, interpolated; no online correction. With
        ``q``: the profile's ``q`` quantile (its median and log-normal spread), e.g. the
        quantile an idle replica admits at. With ``length``: for a batch of that many
        tokens (a lane's profile between its length and the next shorter one's), else at
        the length in force (``set_length``)."""
        self._check(tier, rows)
        b = max(rows, 1)
        if length is None or self._span is None:
            p50, p90, sigma = self._p50[tier], self._p90[tier], self._sigma0[tier]
        else:
            p50, p90, sigma = self._span.rows(self.tiers[tier], self._span.step(length))
        if q is None:
            return p90[b]
        return p50[b] * math.exp(z_score(q) * sigma[b])

    def typical(self, tier: str, rows: int) -> float:
        """The profile's p50 (s) at ``rows``, interpolated: what observations compare with."""
        self._check(tier, rows)
        return self._p50[tier][max(rows, 1)]

    def remaining(
        self,
        tier: str,
        rows: int,
        elapsed: float,
        q: float | None = None,
        length: int | None = None,
    ) -> float:
        """Planning time (s) still to go for a batch that has run ``elapsed`` seconds: the
        ``q`` (default ``slo_target``) quantile of its time given that it has not ended yet,
        less ``elapsed`` (``length``: of a batch of that many tokens, not at the length in
        force). A batch past that quantile is expected to end soon (see
        ``OVERRUN_SIGMA``), not at the old estimate and not never.

        Example:
            >>> lat = LatencyModel([TierInfo("w100", 1.0, {8: 18.0})])
            >>> round(lat.remaining("w100", 8, 0.001) * 1e3, 3)   # no spread: 18 - 1 ms
            17.0
            >>> 0 < lat.remaining("w100", 8, 0.030) < 0.004        # overran: ends soon
            True
        """
        q = self.slo_target if q is None else q
        planned = self.quantile(tier, rows, q, length)
        if elapsed <= 0:
            return planned
        s = self.planning_sigma(tier, rows)
        if elapsed < planned and s == 0:
            return planned - elapsed
        if elapsed >= planned:
            s = max(s, OVERRUN_SIGMA)
        median = self.median(tier, rows) * self._length_ratio(tier, rows, length)
        mu = math.log(max(median, MIN_TYPICAL_S))  # a profile may say 0
        z_e = (math.log(elapsed) - mu) / s
        tail = 0.5 * math.erfc(z_e / math.sqrt(2))  # P(T > elapsed)
        target = tail * (1 - q)
        if target <= 1e-300:  # far in the tail (z_e > 37): P(Z > z + x | Z > z) ~ exp(-z x)
            z_t = z_e - math.log(1 - q) / z_e
            return max(math.exp(mu + s * z_t) - elapsed, 0.0)
        return max(math.exp(mu - s * _N.inv_cdf(target)) - elapsed, 0.0)

    # -- online correction -----------------------------------------------------------------
    def observe(self, tier: str, rows: int, seconds: float, length: int | None = None) -> None:
        """Learn from one batch: ``rows`` on ``tier`` took ``seconds`` of engine time
        (``length``: padded to that many tokens; None: to the lane's own length). The
        level moves towards it in either direction; the spread follows how much consecutive
        batches differ. A time that is not a positive finite number (a broken clock, a NaN
        from the caller) is ignored: it would make the level NaN for good."""
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        # Compare with the typical time, not the planning quantile: on an uncontended
        # machine the factor stays ~1 and the plan keeps its margin; under contention both
        # scale together. Outside load in force now (``set_external``) is divided out: the
        # level learns only what it does not explain, so the two never count it twice. A
        # lane's batch is compared with the profile at its own length: its short texts
        # must not teach the lane that its long ones are as fast (review helper-317).
        if self._span is None:
            expected = self.typical(tier, rows) * self._external
        else:
            at = self._span.hi if length is None else length
            expected = self._span.typical(self.tiers[tier], rows, at) * self._external
        ratio = seconds / max(expected, MIN_TYPICAL_S)
        level = self._log_factor[tier]
        x = min(max(math.log(max(ratio, 1e-300)), level + LOG_RATIO_MIN), level + LOG_RATIO_MAX)
        x = min(max(x, -LOG_LEVEL_MAX), LOG_LEVEL_MAX)
        self._log_factor[tier] += self.alpha * (x - self._log_factor[tier])
        keep = 1 - self.alpha
        self._level_var[tier] = keep * keep * self._level_var[tier] + self.alpha * self.alpha
        last = self._last[tier]
        if last is not None:
            d = min(abs(x - last[0]), DIFF_CLIP)
            self._jitter[tier] += JITTER_ALPHA * (d - self._jitter[tier])
            s1, s2 = self._jitter_w[tier]
            keep = 1 - JITTER_ALPHA
            self._jitter_w[tier] = (keep * s1 + JITTER_ALPHA, keep * keep * s2 + JITTER_ALPHA**2)
            s0 = self._sigma0[tier]
            e = clipped_abs_mean(math.hypot(s0[max(rows, 1)], s0[max(last[1], 1)]), DIFF_CLIP)
            self._expected[tier] += JITTER_ALPHA * (e - self._expected[tier])
            self._count[tier] += 1
        self._last[tier] = (x, rows)
        self._refresh(tier)
        self._fill(tier)
        self.version += 1

    def forget(self, tier: str, keep: float) -> None:
        """Move ``tier``'s correction back towards the profile: the level (log factor), the
        learned spread and the trust in it are multiplied by ``keep`` (0..1). For a tier
        the scheduler has stopped running because of what it learned: without batches
        nothing else could ever correct it (see ``Scheduler.submit``)."""
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"keep must be in [0, 1], got {keep}")
        self._log_factor[tier] *= keep
        self._level_var[tier] *= keep * keep  # the level is that much less of the batches'
        self._jitter[tier] *= keep
        self._expected[tier] *= keep
        self._count[tier] = int(self._count[tier] * keep)
        self._last[tier] = None
        self._refresh(tier)
        self._fill(tier)
        self.version += 1

    def settle(self) -> None:
        """Take every tier's correction now - level and learned spread, with the trust in
        them - as its home (the runtime calls it once its timing at load is in: this
        machine, idle), the state ``relax`` returns a tier to."""
        self._home = {t: self._state(t) for t in self.tiers}

    def settle_as(self, other: LatencyModel) -> None:
        """Take ``other``'s homes for the tiers both have (a runtime replacing one whose
        timing at load was this machine's, idle)."""
        for tier, home in other._home.items():
            if tier in self._home:
                self._home[tier] = home

    def above_home(self, tier: str) -> float:
        """How far ``tier``'s level is above its home, in log units (0 without a home)."""
        home = self._home.get(tier)
        return self._log_factor[tier] - (home[0] if home else 0.0)

    def _state(self, tier: str) -> tuple:
        return (self._log_factor[tier], self._jitter[tier], self._expected[tier],
                self._count[tier], self._jitter_w[tier], self._level_var[tier])  # fmt: skip

    def snapshot(self, tier: str) -> tuple:
        """``tier``'s correction as it is, for ``restore``."""
        return (*self._state(tier), self._last[tier])

    def restore(self, tier: str, state: tuple) -> None:
        """Put back a ``snapshot`` of ``tier``'s correction (a relax its next batch undid)."""
        (self._log_factor[tier], self._jitter[tier], self._expected[tier], self._count[tier],
         self._jitter_w[tier], self._level_var[tier], self._last[tier]) = state  # fmt: skip
        self._refresh(tier)
        self._fill(tier)
        self.version += 1

    def relax(self, tier: str, keep: float) -> bool:
        """Move ``tier``'s correction back towards its home where load left its level or
        spread above it (what is above kept x ``keep``, 0..1): for a tier the planner
        stopped running because load taught it slow or erratic - nothing else corrects it -
        once the device is idle. The whole correction moves, the trust in the spread with
        it: the level alone came home and the spread learned under load still planned the
        tier past every budget; the spread alone, with the burst's trust kept, planned it
        near its median at the 0.999 quantile (review 202). Never below home. Returns
        whether anything changed.

        Example:
            >>> lat = LatencyModel([TierInfo("w100", 1.0, {1: 2.0})])
            >>> lat.settle(); lat.observe("w100", 1, 0.004); lat.observe("w100", 1, 0.004)
            >>> high = lat.factor["w100"]; lat.relax("w100", 0.0)
            True
            >>> (high > 1.1, lat.factor["w100"], lat.relax("w100", 0.0))
            (True, 1.0, False)
        """
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"keep must be in [0, 1], got {keep}")
        home = self._home.get(tier) or (0.0, 0.0, 0.0, 0, (0.0, 0.0), 0.0)
        level = _towards(self._log_factor[tier], home[0], keep)
        jitter = _towards(self._jitter[tier], home[1], keep)
        if (level, jitter) == (self._log_factor[tier], self._jitter[tier]):
            return False
        self._log_factor[tier], self._jitter[tier] = level, jitter

        def blend(now: float, then: float) -> float:
            return then + (now - then) * keep

        self._expected[tier] = blend(self._expected[tier], home[2])
        # Blended, not rounded: round() kept a count of 1 at every keep above 0.5 for ever,
        # the trust with it, while the weights below went on shrinking; truncated, it lost
        # a whole batch per relax, and at a keep near 1 the trust went home long before the
        # level and planned above the burst (review helper-214).
        self._count[tier] = blend(self._count[tier], home[3])
        # The batches since home lose ``keep`` of their weight each: their squared weights
        # keep^2. Blended by keep, squares and all, the spread's relative variance (s2 /
        # s1^2: 1 / its effective batches) grew as 1 / keep per relax - repeated relaxes of
        # an idle tier planned it at 1e18 s, then overflowed ``_refresh``. s2 <= s1^2 holds
        # for any weights; the clamp keeps it where home and now mix unevenly.
        w1, w2 = self._jitter_w[tier]
        h1, h2 = home[4]
        w1 = blend(w1, h1)
        self._jitter_w[tier] = (w1, min(h2 + (w2 - h2) * keep * keep, w1 * w1))
        # The level's variance is a sum of squared weights too (``observe``: keep^2 lv +
        # alpha^2): blended by keep, it planned mid-relax as if the burst weighed more.
        self._level_var[tier] = home[5] + (self._level_var[tier] - home[5]) * keep * keep
        if (level, jitter) == home[:2]:  # home reached (``_towards`` snaps): all of it
            (_, _, self._expected[tier], self._count[tier], self._jitter_w[tier],
             self._level_var[tier]) = home  # fmt: skip
        self._last[tier] = None  # the next batch is not diffed against the burst's
        self._refresh(tier)
        self._fill(tier)
        self.version += 1
        return True

    def start_from(self, tier: str, factor: float) -> None:
        """Set ``tier``'s level to ``factor`` x its profile, as a prior its own batches then
        correct (the trust in it and the learned spread stay as they are): what a runtime
        replacing another one under load knows about this machine before its first batch.

        Example:
            >>> lat = LatencyModel([TierInfo("w100", 1.0, {1: 2.0})])
            >>> lat.start_from("w100", 1.6); round(lat.tier_estimate("w100").factor, 2)
            1.6
        """
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor must be > 0, got {factor}")
        # (bounded as ``observe`` bounds the level: clamped at 20x, a tier running 1,000x
        # started a replacement runtime at 20x - review helper-270)
        self._log_factor[tier] = math.log(min(max(factor, 1 / LEVEL_MAX), LEVEL_MAX))
        self._refresh(tier)
        self._fill(tier)
        self.version += 1

    def set_external(self, factor: float) -> bool:
        """How much slower the device runs now because of work outside this server (other
        processes on the GPU): ``factor`` >= 1 multiplies every tier's median at once;
        clamped to [1, ``EXTERNAL_MAX``]. A change within ``EXTERNAL_STEP`` of the factor in
        force is ignored (a factor that close to 1 counts as exactly 1, always applied).
        Returns whether the plans changed. Batches observed from now on teach the learned
        level the residual only (``observe``), so the learned factor (``factor``,
        ``tier_estimate``) excludes it.

        Example:
            >>> lat = LatencyModel([TierInfo("w100", 1.0, {1: 2.0})])
            >>> lat.set_external(2.0), round(lat.estimate("w100", 1) * 1e3, 3)
            (True, 4.0)
            >>> lat.set_external(2.01), lat.external   # within 2 %: no change
            (False, 2.0)
        """
        if not math.isfinite(factor):
            raise ValueError(f"external factor must be a finite number >= 1, got {factor}")
        factor = min(max(factor, 1.0), EXTERNAL_MAX)
        if factor <= 1.0 + EXTERNAL_STEP:  # within a sample's noise of none: exactly none,
            factor = 1.0  # so that the plans come back to today's numbers, not 1 % above
        if factor == self._external or (
            factor != 1.0 and abs(factor - self._external) <= EXTERNAL_STEP * self._external
        ):
            return False
        self._external = factor
        for tier in self.tiers:
            self._refresh(tier)
            self._fill(tier)
        self.version += 1
        return True

    @property
    def external(self) -> float:
        """The external factor in force (``set_external``; 1.0: no outside load)."""
        return self._external

    def set_length(self, length: int) -> bool:
        """Plan every batch as one of ``length`` tokens from now (a lane: the mean length of
        the texts it holds, queued or running), rounded up to the span's next plan point
        (``lengths.STEPS``); at or above the lane's own length, as profiled. Just after a
        move up, a length one point below keeps it: a lane of short sentences (16-32
        tokens, 2 per point) moved up and down at nearly every request, each move rewriting
        its tables and the plans' caches on a saturated core (4 of 4 pairs: 99.0-99.8 vs
        99.5-100 % within 30 ms; keeping it, 3 pairs 99.2-99.8 vs 99.3-99.8 %). (Kept after
        any move, a lane that starts at its own length never came down to traffic one point
        below it: helper-319.) Returns whether the tables changed. Without a span (fixed
        shapes, a model's shortest lane) nothing changes. The learned level and spread are
        kept: they are relative to the profile.

        Example:
            >>> from server.scheduling.lengths import LengthSpan
            >>> span = LengthSpan(128, 256, [TierInfo("w100", 1.0, {1: 10.0})])
            >>> lat = LatencyModel([TierInfo("w100", 1.0, {1: 20.0})], span=span)
            >>> lat.set_length(192), round(lat.estimate("w100", 1) * 1e3, 3), lat.length
            (True, 15.0, 192)
            >>> lat.set_length(190), lat.set_length(300), round(lat.estimate("w100", 1) * 1e3, 3)
            (False, True, 20.0)
            >>> lat.set_length(230), lat.length   # one point down, just after a move up: kept
            (False, 256)
            >>> lat.set_length(200), lat.set_length(230), lat.length
            (True, True, 240)
        """
        if self._span is None:
            return False
        step = self._span.step(length)
        if step == self._step or (step == self._step - 1 and self._moved_up):
            return False
        was, self._step = self._step, step
        self._moved_up = step > was
        for t in self.tiers.values():
            name = t.name
            self._p50[name], self._p90[name], self._sigma0[name] = self._span.rows(t, step)
            # A ratio scales every time of the tier alike and leaves its spread: the rows
            # are rescaled rather than recomputed (``_refresh``: 3x the cost; a lane of
            # mixed lengths changes its plan point at most requests).
            f = self._span.ratio_at(t, step) / self._span.ratio_at(t, was)
            median, sigma, quantile, mean, var, plan = self._rows_cache[name]
            self._rows_cache[name] = (
                [max(v * f, MIN_TYPICAL_S) for v in median], sigma,
                tuple(v * f for v in quantile), tuple(v * f for v in mean),
                [v * f * f for v in var], plan,
            )  # fmt: skip
            self._fill(name)
        self.version += 1
        return True

    @property
    def length(self) -> int | None:
        """The tokens batches are planned at now (``set_length``); None without a span."""
        return None if self._span is None else self._span.length_at(self._step)

    def length_ratio(self, tier: str, length: int | None = None) -> float:
        """``tier``'s profile at the length in force (or at ``length`` tokens, rounded up to
        a plan point) over its profile at the lane's own length (1 without a span)."""
        if self._span is None:
            return 1.0
        step = self._step if length is None else self._span.step(length)
        return self._span.ratio_at(self.tiers[tier], step)

    @property
    def span(self) -> LengthSpan | None:
        """The lengths this model plans between (``set_length``); None: fixed."""
        return self._span

    @property
    def length_aware(self) -> bool:
        """Whether ``set_length`` changes anything: the model has a shorter profile."""
        return self._span is not None

    @property
    def factor(self) -> dict[str, float]:
        """Observed / profiled median per tier (1.0 = as profiled), apart from the external
        factor (``set_external``): the part the batches taught."""
        return {t: math.exp(v) for t, v in self._log_factor.items()}

    def tier_estimate(self, tier: str) -> TierEstimate:
        """The current view of ``tier`` - what a runtime exports as gauges.

        Example:
            >>> lat = LatencyModel([TierInfo("w100", 1.0, {1: 2.0, 8: 9.0})])
            >>> lat.observe("w100", 8, 0.018); e = lat.tier_estimate("w100")
            >>> (round(e.factor, 3), e.observed_batches)
            (1.231, 1)
        """
        top = len(self._p50[tier]) - 1
        return TierEstimate(
            tier,
            math.exp(self._log_factor[tier]),
            self.sigma(tier, top),
            self.estimate(tier, 1),
            self.estimate(tier, top),
            round(self._count[tier]) + (self._last[tier] is not None),
        )

    def tables(
        self, names: Sequence[str], width: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(quantile, mean, variance), each (T, W) in seconds: row i for tier ``names[i]``,
        column b for a batch of b rows (W: at least ``width`` and the largest profiled batch
        + 1; column 0 is 0, sizes beyond a tier's profile are inf, so a plan that needs them
        is infeasible). Read-only views, kept current: ``observe`` rewrites the observed
        tier's row in place (a few microseconds), so a caller may hold them."""
        key = (*names, width)
        hit = self._tables.get(key)
        if hit is not None:
            return hit[1]
        shape = (len(names), max(self._width, width))
        out = (np.full(shape, np.inf), np.full(shape, np.inf), np.full(shape, np.inf))
        for table in out:
            table[:, 0] = 0.0  # no rows, no time (a batch emptied by a candidate decision)
        rows = {name: i for i, name in enumerate(names)}
        self._tables[key] = (rows, tuple(_read_only(a) for a in out), out)
        for name in rows:
            self._fill(name)
        return self._tables[key][1]

    def _fill(self, tier: str) -> None:
        """Write ``tier``'s current values into every table set handed out."""
        cache = self._rows_cache[tier]
        for rows, _, writable in self._tables.values():
            i = rows.get(tier)
            if i is None:
                continue
            for table, values in zip(writable, cache[2:5], strict=True):
                table[i, 1 : len(values)] = values[1:]


# Gauss-Hermite nodes and weights for E[f(N)], N standard normal (``_tail_threshold``).
_GH_NODES, _GH_WEIGHTS = (
    a.tolist()
    for a in np.polynomial.hermite_e.hermegauss(48) / np.array([[1.0], [math.sqrt(2 * math.pi)]])
)


@functools.lru_cache(maxsize=4096)
def _tail_threshold(z: float, tau2: float) -> float:
    """The a with E[P(Z > a exp(tau N))] = P(Z > z), Z and N independent standard normals,
    tau2 = tau^2: the threshold (in sigmas) that keeps a tail probability when sigma is known
    only up to a log-normal factor. a = z at tau2 = 0, larger otherwise. Cached: the caller
    rounds ``tau2`` to 0.001 (at 0.999 a moves ~0.4 % per 0.001; tau2 is at most ~0.045),
    so a process computes it a few dozen times (~0.3 ms each), in its first batches.

    Example:
        >>> _tail_threshold(3.0902, 0.0) == 3.0902, round(_tail_threshold(3.0902, 0.04), 2)
        (True, 3.6)
    """
    if tau2 <= 0:
        return z
    tau = math.sqrt(tau2)
    target = math.log(0.5 * math.erfc(z / math.sqrt(2)))

    def log_miss(a: float) -> float:
        total = sum(
            w * math.erfc(a * math.exp(tau * n) / math.sqrt(2))
            for n, w in zip(_GH_NODES, _GH_WEIGHTS, strict=True)
        )
        return math.log(max(0.5 * total, 1e-300))

    lo, hi = z, z * math.exp(3 * tau) + tau
    while log_miss(hi) > target:
        lo, hi = hi, 2 * hi
    for _ in range(25):  # to ~1e-7 of z
        mid = 0.5 * (lo + hi)
        if log_miss(mid) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


# ``slower_than_more_accurate``: a less accurate tier counts as slower only beyond this
# margin, so that timing noise between near-equal tiers (launch-bound GPU batches) is quiet.
SLOWER_MARGIN = 0.05
# ... and by at least this much (ms): a tiny model's tiers differ by timer noise of tens of
# microseconds (a 0.02 ms MLP warned at a 0.01 ms difference), far below any budget.
SLOWER_MIN_MS = 0.05


def slower_than_more_accurate(tiers: Sequence[TierInfo]) -> list[tuple[str, str, list[int]]]:
    """(tier, a more accurate tier, batch sizes) wherever a tier's typical time (p50, else
    p90) is more than ``SLOWER_MARGIN`` (and ``SLOWER_MIN_MS``) above a more accurate tier's
    at those profiled sizes.
    The planner takes the least accurate allowed tier as the fastest; such a tier makes it
    count work on the slower one (and refuse what the faster could serve), so the server
    warns about it at load.

    Example:
        >>> slower_than_more_accurate([TierInfo("w050", 0.96, {1: 0.6, 8: 2.0}),
        ...                            TierInfo("w025", 0.95, {1: 0.9, 8: 1.8})])
        [('w025', 'w050', [1])]
        >>> slower_than_more_accurate([TierInfo("w050", 0.96, {1: 0.02}),
        ...                            TierInfo("w025", 0.95, {1: 0.03})])  # timer noise
        []
    """
    ordered = sorted(tiers, key=lambda t: -t.accuracy)
    out = []
    for i, slow in enumerate(ordered):
        for fast in ordered[:i]:
            _, worse = _slower_at(slow, fast)
            if worse:
                out.append((slow.name, fast.name, worse))
                break  # the most accurate tier it loses to is enough to name
    return out


def dominated(tiers: Sequence[TierInfo]) -> dict[str, str]:
    """Tier -> a tier at least as accurate that is faster at every batch size both profile
    (as ``slower_than_more_accurate`` counts slower). Such a tier is never the better plan
    for a request that may run on either: whatever deadline it meets, the other meets too,
    with at least its accuracy (a calibrated w050 more accurate than the full network makes
    the full network one). The planner falls back to a request's least accurate allowed tier
    as its fastest; a dominated one there is skipped (pins still run on it).

    Example:
        >>> dominated([TierInfo("w100", 0.85, {1: 8.0, 4: 25.0}),
        ...            TierInfo("w050", 0.88, {1: 1.5, 4: 5.0}),
        ...            TierInfo("w025", 0.80, {1: 0.9, 4: 2.0})])
        {'w100': 'w050'}
    """
    ordered = sorted(tiers, key=lambda t: -t.accuracy)
    out = {}
    for i, slow in enumerate(ordered):
        for fast in ordered[:i]:
            sizes, worse = _slower_at(slow, fast)
            if sizes and worse == sizes:
                out[slow.name] = fast.name
                break
    return out


def _slower_at(slow: TierInfo, fast: TierInfo) -> tuple[list[int], list[int]]:
    """(batch sizes both profile, those at which ``slow`` is slower than ``fast`` by more
    than ``SLOWER_MARGIN`` and ``SLOWER_MIN_MS``)."""
    # p50 against p50 where both have it, else p90 against p90.
    typical = slow.typical_ms and fast.typical_ms
    a = slow.typical_ms if typical else slow.latency_ms
    b = fast.typical_ms if typical else fast.latency_ms
    top = max(int(k) for k in b)
    sizes = sorted(int(k) for k in a if int(k) <= top)
    margin = 1 + SLOWER_MARGIN
    worse = [
        n for n in sizes
        if interpolate(a, n) > max(interpolate(b, n) * margin, interpolate(b, n) + SLOWER_MIN_MS)
    ]  # fmt: skip
    return sizes, worse


def tiers_from_profile(profile: dict, records: Mapping) -> tuple[list[TierInfo], dict]:
    """(tiers with p50 / p90 / p99 tables, p50 tables in ms) from a ``profile.json`` dict and
    the tiers' build records (anything with ``flops`` and ``accuracy``). Tiers rank by their
    measured accuracy where every one has it, else all by FLOPs relative to the largest tier
    (one proxy for all: a tier left unscored, by a build interrupted while scoring, at 0.17
    beside others' 0.96 would rank below them all). ``p99_ms`` is used where the profile has
    it for every batch size.

    Example:
        >>> from types import SimpleNamespace as R
        >>> table = {"1": {"p50_ms": 1.0, "p90_ms": 1.2}}
        >>> recs = {"a": R(flops=4, accuracy=0.9), "b": R(flops=1, accuracy=None)}
        >>> [t.accuracy for t in tiers_from_profile({"tiers": {"a": table, "b": table}}, recs)[0]]
        [1.0, 0.25]
    """
    full = max(r.flops for r in records.values()) or 1
    measured = all(records[name].accuracy is not None for name in profile["tiers"])
    tiers, p50 = [], {}
    for name, table in profile["tiers"].items():
        rec = records[name]
        acc = rec.accuracy if measured else rec.flops / full
        p50[name] = {int(b): v["p50_ms"] for b, v in table.items()}
        p99 = (
            {int(b): v["p99_ms"] for b, v in table.items()}
            if all("p99_ms" in v for v in table.values())
            else None
        )
        p90 = {int(b): v["p90_ms"] for b, v in table.items()}
        tiers.append(TierInfo(name, acc, p90, p50[name], p99))
    return tiers, p50
