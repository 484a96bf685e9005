"""The Kubernetes HPA's replica arithmetic (autoscaling/v2 with ``behavior``, as in
pkg/controller/podautoscaler), on the simulation clock.

Every ``period_s`` the controller turns each metric into a desired count - Pods metrics:
ceil(sum of per-pod values / target); Object metrics: ceil(ready pods x value / target) -
kept at the current count within ``tolerance``, the largest over the metrics. Then the
stabilisation windows (up: the min of the recommendations of the last
``up_stabilization_s``; down: their max over ``down_stabilization_s``) and the rate
policies (selectPolicy Max: +100 % or +4 pods per 15 s up, 20 % or 1 pod per 60 s down),
clamped to [min, max]. Defaults are deploy/k8s/base/hpa.yaml's.

Example:
    >>> hpa = HPA(HPAConfig(min_replicas=2, max_replicas=10))
    >>> desired = hpa.pods_metric([3.0, 4.0], target=1.0, current=2)  # 3.5 x 2 pods
    >>> desired, hpa.step(15.0, current=2, desired=desired)  # up by at most max(100 %, 4)
    (7, 6)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScalingPolicy:
    """One HPA scaling policy: ``kind`` "Percent" or "Pods", ``value`` per ``period_s``.

    Example:
        >>> ScalingPolicy("Pods", 4, 15.0)  # at most 4 pods added per 15 s
        ScalingPolicy(kind='Pods', value=4, period_s=15.0)
    """

    kind: str
    value: int
    period_s: float


@dataclass(frozen=True)
class HPAConfig:
    """deploy/k8s/base/hpa.yaml's values by default.

    Example:
        >>> HPAConfig(max_replicas=4, down_stabilization_s=120.0).period_s
        15.0
    """

    min_replicas: int = 2
    max_replicas: int = 10
    period_s: float = 15.0  # the HPA controller's sync period
    window_s: float = 60.0  # metric window: the recording rules use rate(...[1m])
    metric_lag_s: float = 0.0  # the window ends this long before the evaluation
    tolerance: float = 0.1
    up_stabilization_s: float = 0.0
    down_stabilization_s: float = 300.0
    up_policies: tuple[ScalingPolicy, ...] = (
        ScalingPolicy("Percent", 100, 15.0),
        ScalingPolicy("Pods", 4, 15.0),
    )
    down_policies: tuple[ScalingPolicy, ...] = (
        ScalingPolicy("Percent", 20, 60.0),
        ScalingPolicy("Pods", 1, 60.0),
    )
    queue_compute_target: float = 1.0  # innfer_queue_compute_ratio, AverageValue 1
    degraded_share_target: float = 0.2  # innfer_degraded_share, AverageValue 200m
    latency_target_s: float | None = None  # None: 0.8 x the median budget (time-scaled)
    latency_quantile: float = 0.95

    def __post_init__(self) -> None:
        # A zero period re-ran the evaluation at the same instant forever.
        for name in ("period_s", "window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HPAConfig.{name} must be > 0 seconds, got {getattr(self, name)}")
        if not self.metric_lag_s >= 0:
            raise ValueError(
                f"HPAConfig.metric_lag_s must be >= 0 seconds, got {self.metric_lag_s}"
            )


class HPA:
    """The controller's state: its recent recommendations and scaling events. Times are
    seconds on the simulation clock; see the module's example."""

    def __init__(self, cfg: HPAConfig) -> None:
        if not 1 <= cfg.min_replicas <= cfg.max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        self.cfg = cfg
        self.recommendations: list[tuple[float, int]] = []
        self.up_events: list[tuple[float, int]] = []
        self.down_events: list[tuple[float, int]] = []

    def pods_metric(self, values: Sequence[float], target: float, current: int) -> int:
        """Pods metric, AverageValue target: every pod's value counts (0 for an idle one)."""
        if not values:
            return current
        ratio = float(np.mean(values)) / target
        if abs(1 - ratio) <= self.cfg.tolerance:
            return current
        # (rounded first: the controller's integer milli-units put 3 pods at 0.4 for a 0.2
        # target at 6 exactly; floats at 6.000000000000001, so 7)
        return math.ceil(round(ratio * len(values), 9))

    def object_metric(self, value: float, target: float, current: int, ready: int) -> int:
        """Object/External metric, Value target: scaled by the ready pods."""
        ratio = value / target
        if abs(1 - ratio) <= self.cfg.tolerance:
            return current
        return math.ceil(ratio * ready)

    def hold(self, now: float, current: int) -> int:
        """The replica count where no metric has a value: ``current`` (a count outside
        [min, max] goes to the bound, as in ``step``), no recommendation stored - the
        controller returns before it stabilises."""
        c = self.cfg
        if current == 0 or c.min_replicas <= current <= c.max_replicas:
            return current
        return self.step(now, current, current)

    def step(self, now: float, current: int, desired: int) -> int:
        """The new replica count from the metrics' ``desired`` (normalizeDesiredReplicas-
        WithBehaviors: stabilise, then limit the rate, then clamp to [min, max]). A count
        outside [min, max] goes to the bound at once, as the controller does before it reads
        any metric: no stabilisation, no rate limit, no recommendation kept; at 0 (scaled to
        zero by hand) the controller does nothing."""
        c = self.cfg
        if current == 0:
            return 0
        if not c.min_replicas <= current <= c.max_replicas:
            rec = min(max(current, c.min_replicas), c.max_replicas)
            events = self.up_events if rec > current else self.down_events
            events.append((now, abs(rec - current)))
            return rec
        up, down = desired, desired
        for t, rec in self.recommendations:
            if t > now - c.up_stabilization_s:
                up = min(up, rec)
            if t > now - c.down_stabilization_s:
                down = max(down, rec)
        keep = max(c.up_stabilization_s, c.down_stabilization_s)
        self.recommendations = [(t, r) for t, r in self.recommendations if t > now - keep]
        self.recommendations.append((now, desired))
        rec = min(max(current, up), down)
        if rec > current:
            limit = max(self._limit(now, current, c.up_policies, +1), current)
            rec = min(rec, c.max_replicas, limit)
        elif rec < current:
            limit = min(self._limit(now, current, c.down_policies, -1), current)
            rec = max(rec, c.min_replicas, limit)
        rec = min(max(rec, c.min_replicas), c.max_replicas)
        if rec > current:
            self.up_events.append((now, rec - current))
        elif rec < current:
            self.down_events.append((now, current - rec))
        return rec

    def _limit(self, now: float, current: int, policies, sign: int) -> int:
        """selectPolicy Max: the policy that allows the largest change."""
        best = None
        for p in policies:
            added = sum(n for t, n in self.up_events if t > now - p.period_s)
            deleted = sum(n for t, n in self.down_events if t > now - p.period_s)
            start = current - added + deleted
            if p.kind == "Pods":
                proposed = start + sign * p.value
            elif p.kind == "Percent":
                proposed = (
                    math.ceil(start * (1 + p.value / 100))
                    if sign > 0
                    else int(start * (1 - p.value / 100))
                )
            else:
                raise ValueError(f"unknown scaling policy type {p.kind!r}")
            best = proposed if best is None else (max if sign > 0 else min)(best, proposed)
        return current if best is None else best
