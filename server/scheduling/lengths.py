"""A sequence model's latency between two profiled lengths: what a lane plans texts shorter
than its own length at.

A text model is profiled at a few sequence lengths (16/32/64/128/256 tokens) and has one
scheduler - a *lane* - per length: a request joins the shortest length that holds it. Its
batch is padded to its longest request, not to the lane's length, so a 140-token text in
the 256 lane runs in about the time of 140 tokens. Planned at 256, it was refused on an
idle replica ("budget below the fastest tier") at budgets the replica met in half the time;
and the batches of such texts taught the lane's online correction that 256-token batches
were that fast, planning the long ones short (review helper-317).

``LengthSpan`` holds a lane's profile (at ``hi`` tokens) and the next shorter one's (at
``lo``) and gives the lane's profile at a length in between: the lane's own, times the
ratio of the two profiles' batch-1 times at that length - linear in the length from ``lo``
to ``hi`` (transformer encoders at these lengths are close to linear; where attention's
quadratic part shows, the chord lies above the curve: slower than the engine, not
faster). A shorter length's time above the lane's own (a noisy profile) is taken as the
lane's. Across batch sizes the lane keeps its own profile's shape: a batch of texts of
several lengths is padded to its longest and gains less from batching than the shorter
length's profile of equal lengths says (interpolated per batch size instead, the MiniLM
lanes batched long texts with short ones into batches that ran late).

Plans use a length rounded up to one of ``STEPS`` points between ``lo`` and ``hi``, so that
a lane's tables change only when that length crosses one of them; an observed batch is
compared with the profile at its exact length.

Example:
    >>> hi = [TierInfo("w100", 1.0, {1: 20.0, 8: 100.0}, {1: 18.0, 8: 90.0})]
    >>> lo = [TierInfo("w100", 1.0, {1: 12.0, 8: 50.0}, {1: 10.0, 8: 45.0})]
    >>> span = LengthSpan(128, 256, lo)
    >>> span.step(140), span.step(256), span.step(100)   # of STEPS (8): 1/8 is 16 tokens
    (1, 8, 1)
    >>> round(span.ratio(hi[0], 0.5), 4)                 # 192 tokens: (10 + 4) / 18
    0.7778
    >>> p50, p90, sigma = span.rows(hi[0], span.step(140))
    >>> round(p50[1] * 1e3, 3), round(p50[8] * 1e3, 3)   # 144 tokens: x 11 / 18
    (11.0, 55.0)
    >>> round(span.typical(hi[0], 8, 192) * 1e3, 3)      # exact length: x 14 / 18
    70.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.scheduling.latency import PROFILE_SIGMA_MAX, TierInfo, interpolate, lognormal_sigma

# Points between the shorter length and the lane's own that plans are made at (the length
# a lane plans at rounded up to one): 8 - in the 256 lane above 128, steps of 16 tokens, a
# plan at most ~6 % of the lane's time above the exact length's; each change of step
# rewrites the lane's tables (a few tens of microseconds per tier).
STEPS = 8


def profile_rows(t: TierInfo) -> tuple[list[float], list[float], list[float] | None]:
    """``t``'s p50, p90 and p99 (seconds; None: no p99), indexed by rows (0 unused): the
    profile interpolated at every batch size up to its largest. Without a p50 the p90
    stands for it (a hand-written, deterministic profile)."""
    typical = t.typical_ms if t.typical_ms is not None else t.latency_ms
    sizes = range(1, t.max_batch + 1)
    p50 = [0.0, *(interpolate(typical, b) / 1e3 for b in sizes)]
    p90 = [0.0, *(interpolate(t.latency_ms, b) / 1e3 for b in sizes)]
    p99 = [0.0, *(interpolate(t.tail_ms, b) / 1e3 for b in sizes)] if t.tail_ms else None
    return p50, p90, p99


def profile_sigma(t: TierInfo, p50, p90, p99) -> list[float]:
    """Per rows, the log-normal spread of ``t``'s profile (0 for a profile with no p50)."""
    if t.typical_ms is None:
        return [0.0] * len(p50)
    return [0.0] + [
        min(lognormal_sigma(p50[b], p90[b], p99[b] if p99 else None), PROFILE_SIGMA_MAX)
        for b in range(1, len(p50))
    ]


@dataclass
class LengthSpan:
    """The profile at ``lo`` tokens (``tiers``: the next shorter lane's) below a lane's own
    at ``hi``; see the module's docstring."""

    lo: int
    hi: int
    tiers: Sequence[TierInfo]
    _lo_one: dict = field(default_factory=dict, init=False, repr=False)
    _hi_one: dict = field(default_factory=dict, init=False, repr=False)  # (per request: cached)
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.lo < self.hi:
            raise ValueError(f"need 0 < lo < hi tokens, got {self.lo} and {self.hi}")
        self._lo_one = {t.name: profile_rows(t)[0][1] for t in self.tiers}  # p50, 1 row

    def step(self, length: int) -> int:
        """The plan point (1..``STEPS``) at or above ``length`` tokens: ``STEPS`` is the
        lane's own length; a length at or below ``lo`` (not in this lane) is point 1, the
        lowest a text of this lane needs (lo + 1 tokens)."""
        if length >= self.hi:
            return STEPS
        frac = (length - self.lo) / (self.hi - self.lo)
        return min(max(math.ceil(frac * STEPS - 1e-9), 1), STEPS)

    def ratio(self, t: TierInfo, frac: float) -> float:
        """``t``'s time ``frac`` of the way from ``lo`` to ``hi`` tokens over its time at
        ``hi``, both at batch 1 (1 for a tier the shorter profile lacks)."""
        hi = self._hi_one.get(t.name)
        if hi is None:
            hi = self._hi_one[t.name] = profile_rows(t)[0][1]
        lo = self._lo_one.get(t.name)
        if lo is None or hi <= 0:
            return 1.0
        lo = min(lo, hi)
        return (lo + (hi - lo) * min(max(frac, 0.0), 1.0)) / hi

    def ratio_at(self, t: TierInfo, step: int) -> float:
        """``ratio`` at plan point ``step`` (``STEPS``: the lane's own length, 1)."""
        return self.ratio(t, step / STEPS)

    def length_at(self, step: int) -> int:
        """The tokens plan point ``step`` stands for."""
        return self.lo + (self.hi - self.lo) * step // STEPS

    def rows(self, t: TierInfo, step: int) -> tuple[list[float], list[float], list[float]]:
        """``t``'s p50, p90 (seconds) and profile spread per rows at plan point ``step``
        (cached): the lane's own profile times ``ratio`` there. ``t`` is the lane's tier."""
        key = (t.name, step)
        hit = self._cache.get(key)
        if hit is None:
            p50, p90, p99 = profile_rows(t)
            f = self.ratio_at(t, step)
            sigma = profile_sigma(t, p50, p90, p99)  # (a ratio leaves the spread as it is)
            hit = self._cache[key] = ([v * f for v in p50], [v * f for v in p90], sigma)
        return hit

    def typical(self, t: TierInfo, rows: int, length: int) -> float:
        """``t``'s p50 (seconds) for a batch of ``rows`` padded to exactly ``length`` tokens:
        what an observed batch is compared with."""
        frac = (length - self.lo) / (self.hi - self.lo)
        return self.rows(t, STEPS)[0][max(rows, 1)] * self.ratio(t, frac)
