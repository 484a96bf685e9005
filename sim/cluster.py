"""The cluster on a virtual clock: N replicas, each the real scheduler with a simulated
engine, behind a load balancer, sized by a model of the Kubernetes HPA. Pure Python +
numpy; deterministic for a seed.

What is modelled, and where:
  replicas     each a ``Scheduler`` (policy ``innfer`` by default) whose batches take
               ``sim.engine_time``'s time, as in ``simulate``; one shared RNG (``replica``)
  balancer     least outstanding requests or round robin, over the ready replicas that are
               not terminating (``balancer``)
  pods         a new pod is routable ``pod_start_s`` after the HPA asks for it (engine cache
               hit ~10 s, engine build ~60 s); until then it costs but serves nothing. A
               removed pod leaves the balancer at once and drains its queue (no preStop).
               Starting pods go first on scale-down, then the most recently ready
  autoscaler   the HPA's algorithm (``hpa``) on the signals of ``autoscaler``: innfer's
               queue:compute and degraded share per pod, the latency-only baseline, or a
               static count. ``latency_target_s`` defaults to 0.8 x the median budget
  traces       ``diurnal`` or ``steps`` (``cluster_trace``), in multiples of one replica's
               full-tier capacity
  time_scale   k > 1 makes every engine time, budget and the scheduler's rate window k times
               longer, i.e. replicas k times slower: k times fewer requests to simulate for the
               same load in replicas, same cluster-level clock (HPA, pods, trace)

Results: per-request outcomes and totals (``cluster_result``), per-bin series
(``cluster_bins``), one row per HPA evaluation, one record per replica.

Not modelled: metric pipeline lag beyond ``metric_lag_s`` (Prometheus scrape and rule
intervals, the adapter's cache), the HPA's handling of a metric missing for a pod (here every
pod reports, 0 until it serves), preStop and drain time limits, node provisioning, client
retries of refused requests, per-connection balancing.

Example:
    >>> tiers = [TierInfo("w100", 1.0, {1: 4.0, 8: 16.0}, {1: 3.5, 8: 14.0}),
    ...          TierInfo("w050", 0.3, {1: 2.0, 8: 6.0}, {1: 1.6, 8: 5.0})]
    >>> p50 = {t.name: t.typical_ms for t in tiers}
    >>> cfg = ClusterConfig(trace="steps", steps=((0, 1.0),), duration_s=60, time_scale=20)
    >>> r = simulate_cluster(tiers, p50, cfg)
    >>> r.totals["requests"] == r.totals["served"] + r.totals["refused"]
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from server.scheduling import (
    Refused,
    Request,
    Scheduler,
    State,
    TierInfo,
    best_in_budget,
    make_policy,
    nominal_tier,
)
from sim.autoscaler import AUTOSCALERS, Autoscaler, Completions
from sim.balancer import BALANCERS, Balancer
from sim.cluster_bins import cluster_bins
from sim.cluster_result import ClusterResult, Outcomes, cluster_totals, format_totals
from sim.cluster_trace import CLUSTER_TRACES, DiurnalTrace, load_at, make_cluster_trace
from sim.engine_time import EngineTime, full_capacity, scale_tiers
from sim.events import Events
from sim.hpa import HPA, HPAConfig, ScalingPolicy
from sim.replica import Replica

# Re-exported: bench/, the CLI and the tests import the cluster's parts from here.
__all__ = [
    "AUTOSCALERS",
    "BALANCERS",
    "CLUSTER_TRACES",
    "HPA",
    "Balancer",
    "Cluster",
    "ClusterConfig",
    "ClusterResult",
    "DiurnalTrace",
    "HPAConfig",
    "Replica",
    "ScalingPolicy",
    "format_totals",
    "load_at",
    "make_cluster_trace",
    "scale_tiers",
    "simulate_cluster",
]


@dataclass(frozen=True)
class ClusterConfig:
    """One cluster run.

    Example:
        >>> ClusterConfig(autoscaler="latency", trace="steps", steps=((0.0, 1.5), (60.0, 8.0)),
        ...               duration_s=360.0, time_scale=10.0).hpa.max_replicas
        10
    """

    autoscaler: str = "innfer"  # innfer | latency | static
    balancer: str = "least"  # least | round_robin
    policy: str = "innfer"  # each replica's scheduling policy
    trace: str = "diurnal"  # diurnal | steps
    duration_s: float = 1440.0
    diurnal: DiurnalTrace = field(default_factory=DiurnalTrace)
    steps: tuple[tuple[float, float], ...] = ((0.0, 1.0),)  # (from time s, load)
    budget_ms: tuple[float, float] = (20.0, 100.0)  # uniform, before time_scale
    # Taken off each budget before a replica plans it, as the server's budget_margin_ms
    # (sim.simulator.SimConfig's too); answers are judged by the whole budget.
    budget_margin_ms: float = 1.0
    seed: int = 0
    noise: float | None = None
    slots: int = 1
    max_queue: int = 1000
    max_batch: int | None = None
    time_scale: float = 1.0
    pod_start_s: float = 10.0  # engine cache hit ~10 s; engine build ~60 s
    initial_replicas: int | None = None  # None: hpa.min_replicas, ready at t = 0
    hpa: HPAConfig = field(default_factory=HPAConfig)
    bin_s: float = 30.0  # resolution of the per-bin output
    metric_res_s: float = 1.0  # resolution of the per-pod counters

    def __post_init__(self) -> None:
        # Zero resolutions divided by zero; a zero time scale made every replica infinitely fast.
        for name in ("duration_s", "time_scale", "bin_s", "metric_res_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ClusterConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.pod_start_s >= 0:
            raise ValueError(
                f"ClusterConfig.pod_start_s must be >= 0 seconds, got {self.pod_start_s}"
            )
        # 0 started hpa.min_replicas pods unsaid (``or``); the HPA does not scale from zero.
        if self.initial_replicas is not None and not self.initial_replicas >= 1:
            raise ValueError(
                f"ClusterConfig.initial_replicas must be >= 1 (None: hpa.min_replicas), "
                f"got {self.initial_replicas}"
            )


def simulate_cluster(
    tiers: Sequence[TierInfo],
    p50: Mapping[str, Mapping],
    cfg: ClusterConfig,
    arrivals: np.ndarray | None = None,
    budgets: np.ndarray | None = None,
) -> ClusterResult:
    """Run the cluster over a trace (``arrivals``/``budgets`` in seconds, after time scaling,
    override the config's trace and budget draw); see the module's example."""
    return Cluster(tiers, p50, cfg, arrivals, budgets).run()


class Cluster:
    """One run: replicas, balancer and autoscaler sharing an event queue. Events carry their
    handler, called with the event's time; arrivals come from the trace in between.

    Example:
        >>> tiers = [TierInfo("w100", 1.0, {8: 16.0}, {8: 14.0})]
        >>> cfg = ClusterConfig(autoscaler="static", trace="steps", duration_s=30, time_scale=20)
        >>> r = Cluster(tiers, {"w100": {8: 14.0}}, cfg).run()
        >>> r.totals["replicas_started"], r.ticks  # two replicas, never evaluated
        (2, [])
    """

    def __init__(
        self,
        tiers: Sequence[TierInfo],
        p50: Mapping[str, Mapping],
        cfg: ClusterConfig,
        arrivals: np.ndarray | None = None,
        budgets: np.ndarray | None = None,
    ) -> None:
        k = cfg.time_scale
        self.cfg = cfg
        self.balancer = Balancer(cfg.balancer)
        self.autoscaler = Autoscaler(
            cfg.autoscaler,
            cfg.hpa,
            cfg.hpa.latency_target_s or 0.8 * (cfg.budget_ms[0] + cfg.budget_ms[1]) / 2e3 * k,
        )
        self.tiers, p50 = scale_tiers(tiers, p50, k)
        # Below it a request is degraded (the HPA signal), as the server counts it.
        self.nominal = nominal_tier(make_policy(cfg.policy, self.tiers, cfg.slots), self.tiers)
        self.accuracy = {t.name: t.accuracy for t in self.tiers}
        ranked = sorted(self.accuracy, key=self.accuracy.__getitem__, reverse=True)
        self._at_or_below_nominal = ranked[ranked.index(self.nominal) :]
        self.max_batch = cfg.max_batch or min(t.max_batch for t in self.tiers)
        self.capacity = full_capacity(self.tiers, p50, self.max_batch, cfg.slots)  # one replica
        if arrivals is None:
            arrivals = make_cluster_trace(cfg, self.capacity)
        arrivals = np.asarray(arrivals, float)
        rng = np.random.default_rng(cfg.seed + 1)
        if budgets is None:
            budgets = rng.uniform(cfg.budget_ms[0], cfg.budget_ms[1], len(arrivals)) / 1e3 * k
        self.budgets = budgets
        self.planned = budgets - cfg.budget_margin_ms / 1e3 * k  # what a replica plans with
        self.out = Outcomes.pending(arrivals, budgets)
        self.engine = EngineTime(self.tiers, p50, rng, cfg.noise)  # draws after the budgets
        self.completions = Completions()
        self.events = Events()
        self.replicas: list[Replica] = []
        self.routable: list[Replica] = []  # ready, not terminating, in id order
        n = cfg.hpa.min_replicas if cfg.initial_replicas is None else cfg.initial_replicas
        for _ in range(n):
            self._add_replica(0.0, 0.0)
        # No evaluation after the trace's end (a run shorter than one period has none).
        if self.autoscaler.active and cfg.hpa.period_s <= cfg.duration_s:
            self.events.push(cfg.hpa.period_s, self._tick)
        self._ran = False

    def run(self) -> ClusterResult:
        """Play the trace to the end and every batch to completion (once per ``Cluster``)."""
        if self._ran:
            raise RuntimeError("a Cluster runs once; make a new one")
        self._ran = True
        arrivals = self.out.arrivals
        n, i = len(arrivals), 0
        while i < n or self.events:
            next_arrival = arrivals[i] if i < n else math.inf
            if self.events.next_time() <= next_arrival:
                now, handler = self.events.pop()
                handler(now)
            else:
                self._arrive(i, next_arrival)
                i += 1
        return self._result()

    # -- events ------------------------------------------------------------------------------
    def _arrive(self, i: int, now: float) -> None:
        rep = self.balancer.pick(self.routable)
        if rep is None:
            self.out.states[i] = "refused_unavailable"
            return
        self.out.replica_of[i] = rep.id
        rep.routed += 1
        try:
            rep.sched.submit(Request(i, now, now + self.planned[i]), now)
            rep.outstanding += 1
        except Refused as exc:
            self.out.states[i] = exc.state.name.lower()
            # Load, not the client's ask (a budget below the profile: refused_budget); a
            # full queue is always load.
            if exc.state != State.REFUSED_DEADLINE or not self._below_profile(rep.sched, i, now):
                rep.record_shed(now)
        self._dispatch(rep, now)

    def _below_profile(self, sched: Scheduler, i: int, now: float) -> bool:
        """Whether request ``i``'s budget is below its fastest tier's profiled latency: no
        replica could meet it however idle (the server's reason refused_budget)."""
        r = Request(i, now, now + self.planned[i])
        idle = sched.latency.profiled(sched.ctx.fastest(r), r.rows, sched.admit_quantile)
        return now + idle > sched.admission_deadline(r)

    def _complete(self, rep: Replica, decision, compute: float, now: float) -> None:
        rep.sched.complete(decision, now, compute)
        rep.record(now, decision, compute, degraded=self._degraded(rep.sched, decision))
        for r in decision.requests:
            self.out.serve(r.id, now, decision.tier)
            self.completions.add(now, now - r.arrival)
        self._dispatch(rep, now)
        if rep.removed is not None and rep.gone is None and rep.idle():
            rep.gone = now

    def _degraded(self, sched: Scheduler, decision) -> int:
        """How many of ``decision``'s requests count degraded, as the server counts
        innfer_degraded_requests_total (``ModelRuntime._record``): served below the nominal
        tier and below what an idle replica would serve them at (``best_in_budget``)."""
        served = self.accuracy[decision.tier]
        if served >= self.accuracy[self.nominal]:
            return 0
        ranked, latency = self._at_or_below_nominal, sched.latency
        return sum(
            served < self.accuracy[best_in_budget(ranked, latency, r.rows, r.budget)]
            for r in decision.requests
        )

    def _ready(self, rep: Replica, now: float) -> None:
        if rep.removed is None:
            self.routable.append(rep)
            self.routable.sort(key=lambda r: r.id)

    def _tick(self, now: float) -> None:
        pods = [r for r in self.replicas if r.removed is None]
        current = len(pods)
        new = self.autoscaler.evaluate(now, pods, self.completions)
        for _ in range(new - current):
            self._add_replica(now, self.cfg.pod_start_s)
        if new < current:
            self._remove(now, current - new)
        # No evaluation after the trace's end: the cluster only drains then.
        if now + self.cfg.hpa.period_s <= self.cfg.duration_s:
            self.events.push(now + self.cfg.hpa.period_s, self._tick)

    # -- replicas ----------------------------------------------------------------------------
    def _dispatch(self, rep: Replica, now: float) -> None:
        """Refuse what has expired, start what the scheduler decides now."""
        for r in rep.sched.expire(now):
            self.out.states[r.id] = "refused_deadline"
            rep.outstanding -= 1
            rep.record_shed(now, now - r.arrival)
        while (decision := rep.sched.next(now)) is not None:
            compute = self.engine.draw_s(decision.tier, decision.rows)
            self.events.push(now + compute, partial(self._complete, rep, decision, compute))

    def _add_replica(self, now: float, start_s: float) -> None:
        cfg = self.cfg
        sched = Scheduler(
            self.tiers,
            make_policy(cfg.policy, self.tiers, cfg.slots),
            max_batch=self.max_batch,
            max_queue=cfg.max_queue,
            slots=cfg.slots,
            rate_window_s=0.5 * cfg.time_scale,
        )
        n_res = math.ceil(cfg.duration_s / cfg.metric_res_s) + 2
        rep = Replica(len(self.replicas), now, now + start_s, sched, n_res, cfg.metric_res_s)
        self.replicas.append(rep)
        if start_s <= 0:
            self.routable.append(rep)
        else:
            self.events.push(now + start_s, partial(self._ready, rep))

    def _remove(self, now: float, count: int) -> None:
        alive = [r for r in self.replicas if r.removed is None]
        # Starting pods first (newest first), then the most recently ready.
        order = sorted((r for r in alive if r.ready_at > now), key=lambda r: -r.id)
        order += sorted((r for r in alive if r.ready_at <= now), key=lambda r: (-r.ready_at, -r.id))
        for rep in order[:count]:
            rep.removed = now
            if rep in self.routable:
                self.routable.remove(rep)
            if rep.idle():
                rep.gone = now

    def _result(self) -> ClusterResult:
        out, cfg, ticks = self.out, self.cfg, self.autoscaler.ticks
        return ClusterResult(
            cfg,
            cluster_totals(out, self.replicas, ticks, self.tiers, self.capacity, cfg),
            cluster_bins(out, self.replicas, self.tiers, self.capacity, cfg),
            ticks,
            [r.info() for r in self.replicas],
            out.arrivals,
            out.deadlines,
            out.finish,
            out.tiers,
            out.states,
            out.replica_of,
        )
