"""What the HPA scales on: the signals it reads every period and the replica count it sets.

  innfer    the two per-pod metrics of deploy/k8s/base/hpa.yaml, over the last ``window_s``
            (ending ``metric_lag_s`` ago): queue:compute (target 1) and degraded share
            (target 0.2), see ``Replica.signals``; the larger of the two recommendations
  latency   the baseline that scales on latency alone: the cluster-wide p95 latency of the
            requests served in the window vs a target, as an Object metric
            (ceil(ready pods x p95 / target))
  static    never evaluated: the initial replicas stay

Each evaluation appends a row to ``ticks`` (the signals, the raw and the final count).

Example:
    >>> from types import SimpleNamespace as Pod
    >>> scaler = Autoscaler("latency", HPAConfig(), latency_target_s=0.8)
    >>> done = Completions(); done.add(10.0, 1.6); done.add(11.0, 1.6)
    >>> scaler.evaluate(15.0, [Pod(ready_at=0.0), Pod(ready_at=0.0)], done)  # p95 2x target
    4
    >>> {k: scaler.ticks[-1][k] for k in ("latency_q_s", "desired_raw", "desired")}
    {'latency_q_s': 1.6, 'desired_raw': 4, 'desired': 4}
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from sim.hpa import HPA, HPAConfig
from sim.replica import Replica

AUTOSCALERS = ("innfer", "latency", "static")


class Completions:
    """Finish times and latencies (seconds) of served requests, in finish order."""

    def __init__(self) -> None:
        self.t: list[float] = []
        self.latency: list[float] = []

    def add(self, t: float, latency: float) -> None:
        self.t.append(t)
        self.latency.append(latency)

    def quantile(self, lo: float, hi: float, q: float) -> float | None:
        """The ``q`` quantile of the latencies of requests finished in [lo, hi); None if
        none finished (Prometheus's histogram_quantile then has no value)."""
        i, j = bisect.bisect_left(self.t, lo), bisect.bisect_left(self.t, hi)
        return float(np.quantile(self.latency[i:j], q)) if j > i else None


class Autoscaler:
    """One autoscaler (``kind`` in AUTOSCALERS) driving an ``HPA``; see the module's example."""

    def __init__(self, kind: str, cfg: HPAConfig, latency_target_s: float) -> None:
        if kind not in AUTOSCALERS:
            raise ValueError(f"unknown autoscaler {kind!r}; choose one of {', '.join(AUTOSCALERS)}")
        self.kind = kind
        self.cfg = cfg
        self.hpa = HPA(cfg)
        self.latency_target_s = latency_target_s
        self.ticks: list[dict] = []

    @property
    def active(self) -> bool:
        return self.kind != "static"

    def evaluate(self, now: float, pods: Sequence[Replica], completions: Completions) -> int:
        """The replica count at ``now`` for ``pods``, the replicas not terminating."""
        current = len(pods)
        ready = [r for r in pods if r.ready_at <= now]
        hi = now - self.cfg.metric_lag_s
        lo = hi - self.cfg.window_s
        row = {"t": now, "replicas": current, "ready": len(ready)}
        if self.kind == "innfer":
            desired = self._innfer(pods, lo, hi, row)
        else:
            desired = self._latency(completions, lo, hi, len(ready), current, row)
        # No metric: the controller returns before it stabilises (nothing stored), after
        # moving a count outside [min, max] to the bound.
        new = (
            self.hpa.hold(now, current) if desired is None else self.hpa.step(now, current, desired)
        )
        row.update(desired_raw=current if desired is None else desired, desired=new)
        self.ticks.append(row)
        return new

    def _innfer(self, pods: Sequence[Replica], lo: float, hi: float, row: dict) -> int:
        current = len(pods)
        # A starting pod has served nothing: it reports 0, as the recording rules' fallback.
        qc, dg = [], []
        for r in pods:
            queue_compute, degraded = r.signals(lo, hi)
            qc.append(queue_compute)
            dg.append(degraded)
        want_q = self.hpa.pods_metric(qc, self.cfg.queue_compute_target, current)
        want_d = self.hpa.pods_metric(dg, self.cfg.degraded_share_target, current)
        row.update(
            queue_compute=float(np.mean(qc)),
            degraded_share=float(np.mean(dg)),
            desired_queue_compute=want_q,
            desired_degraded=want_d,
        )
        return max(want_q, want_d)

    def _latency(
        self, completions: Completions, lo: float, hi: float, ready: int, current: int, row: dict
    ) -> int | None:
        p = completions.quantile(lo, hi, self.cfg.latency_quantile)
        row.update(latency_q_s=p, latency_target_s=self.latency_target_s)
        if p is None:
            # Nothing finished in the window (idle, or every request refused or timed out):
            # the metric has no value, and a Kubernetes HPA without a metric keeps the
            # replicas it has - and stores no recommendation (review helper-182: stored, it
            # held a later scale-down 90 s past the window). Read as 0 ms it scaled down -
            # in an outage, to the minimum.
            return None
        return self.hpa.object_metric(p, self.latency_target_s, current, ready)
