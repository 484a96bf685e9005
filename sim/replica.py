"""One pod of the cluster: its scheduler, when it was asked for, became ready and left, and
per-``res``-second counters from which it reports the autoscaler's per-pod metrics.

A pod is routable from ``ready_at`` until it is removed; a removed pod drains what it holds
(no preStop limit) and stops costing once idle (``gone``).

Example:
    >>> from server.scheduling import TierInfo, make_policy, Scheduler
    >>> tiers = [TierInfo("w100", 1.0, {1: 4.0, 8: 16.0})]
    >>> sched = Scheduler(tiers, make_policy("innfer", tiers, 1), max_batch=8, max_queue=100)
    >>> pod = Replica(0, created=0.0, ready_at=10.0, sched=sched, n=120)
    >>> pod.ready(5.0), pod.ready(10.0), pod.signals(0.0, 60.0)
    (False, True, (0.0, 0.0))
"""

from __future__ import annotations

import numpy as np

from server.scheduling import Scheduler

# queue:compute's cap in deploy/monitoring's recording rule (clamp_max; QUEUE_COMPUTE_CAP in
# tests/test_deploy.py checks the two agree): the HPA reads the capped value.
QUEUE_COMPUTE_CAP = 20.0


class Replica:
    """One pod; counters have ``n`` slots of ``res`` seconds (the last takes any later time)."""

    def __init__(
        self, rid: int, created: float, ready_at: float, sched: Scheduler, n: int, res: float = 1.0
    ):
        self.id = rid
        self.created = created
        self.ready_at = ready_at
        self.removed: float | None = None  # left the balancer (terminating)
        self.gone: float | None = None  # drained: no longer costs
        self.sched = sched
        self.outstanding = 0  # queued + running requests
        self.res = res
        self.served = np.zeros(n)
        self.degraded = np.zeros(n)
        self.shed = np.zeros(n)  # refused for load (deadline, queue full) or expired queued
        self.queue_s = np.zeros(n)
        self.compute_s = np.zeros(n)
        self.routed = 0

    def ready(self, now: float) -> bool:
        return self.ready_at <= now and self.removed is None

    def idle(self) -> bool:
        return self.outstanding == 0 and not self.sched.running

    def record(self, now: float, decision, compute_s: float, degraded: int) -> None:
        """Count a finished batch (a ``Decision``) at ``now``: its requests leave the pod,
        ``degraded`` of them served below what an idle pod would have served them at."""
        m = min(int(now / self.res), len(self.served) - 1)
        self.compute_s[m] += compute_s
        for r in decision.requests:
            self.queue_s[m] += r.started - r.arrival
        n = len(decision.requests)
        self.served[m] += n
        self.degraded[m] += degraded
        self.outstanding -= n

    def record_shed(self, now: float, queued_s: float = 0.0) -> None:
        """Count a request the pod could not take at ``now``: refused at arrival for the
        work ahead or a full queue (``queued_s`` 0), or expired after ``queued_s`` in the
        queue. A budget below the fastest tier's profile is the client's ask, not load: the
        caller leaves it out, as the recording rules do (reason refused_budget)."""
        m = min(int(now / self.res), len(self.served) - 1)
        self.shed[m] += 1
        self.queue_s[m] += queued_s

    def signals(self, lo: float, hi: float) -> tuple[float, float]:
        """(queue:compute, degraded share) over [lo, hi), as deploy/monitoring's recording
        rules compute them: queueing seconds of every request that queued (served or
        expired) / engine seconds of the batches, and (served degraded - below the nominal
        tier and below what its budget allows on an idle pod, as ``Cluster._degraded``
        counts it - + shed) / (served + shed). 0 where the pod served and shed nothing - the
        rules' fallback."""
        a, b = max(round(lo / self.res), 0), max(round(hi / self.res), 0)
        served, compute = self.served[a:b].sum(), self.compute_s[a:b].sum()
        shed = self.shed[a:b].sum()
        queue_compute = self.queue_s[a:b].sum() / compute if compute > 0 else 0.0
        queue_compute = min(queue_compute, QUEUE_COMPUTE_CAP)  # the rule's clamp_max
        took = served + shed
        degraded = (self.degraded[a:b].sum() + shed) / took if took > 0 else 0.0
        return queue_compute, degraded

    def lifetimes(self, end: float) -> tuple[tuple[float, float], ...]:
        """(alive, in spec, ready) intervals, clipped to [0, end]: alive costs, in spec is
        what the HPA counts, ready takes traffic."""
        gone = end if self.gone is None else min(self.gone, end)
        spec = end if self.removed is None else min(self.removed, end)
        return (self.created, gone), (self.created, spec), (min(self.ready_at, spec), spec)

    def info(self) -> dict:
        return {
            "id": self.id,
            "created_s": self.created,
            "ready_s": self.ready_at,
            "removed_s": self.removed,
            "gone_s": self.gone,
            "routed": self.routed,
        }
