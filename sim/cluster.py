"""The cluster on a virtual clock: N replicas, each the real scheduler with a simulated
engine (the event logic of ``sim.simulator``), behind a load balancer, sized by a model of
the Kubernetes HPA. Pure Python + numpy; deterministic for a seed.

What is modelled:
  replicas     each a ``Scheduler`` (policy ``innfer`` by default) whose batches take the
               profiled p50 times a log-normal factor (as in ``simulate``); one shared RNG
  balancer     ``least``: least outstanding requests (queued + running, ties rotate);
               ``round_robin``. Only ready replicas that are not terminating get traffic
  pods         a new pod is routable ``pod_start_s`` after the HPA asks for it (engine cache
               hit ~10 s, engine build ~60 s); until then it costs but serves nothing. A
               removed pod leaves the balancer at once and drains its queue (no preStop).
               Starting pods go first on scale-down, then the most recently ready
  autoscaler   the HPA's algorithm (autoscaling/v2, ``behavior``): every ``period_s`` a
               desired count per metric - Pods metrics: ceil(sum of per-pod values /
               target), kept at the current count within ``tolerance``; the larger over
               metrics - then the stabilisation windows (up: min of the recommendations of
               the last ``up_stabilization_s``; down: their max over ``down_stabilization_s``)
               and the rate policies (selectPolicy Max: +100 % or +4 pods per 15 s up, 20 %
               or 1 pod per 60 s down), clamped to [min, max]
  signals      ``innfer``: the two per-pod metrics of deploy/k8s/base/hpa.yaml - queue:compute
               (queueing seconds of served requests / engine seconds of batches) and degraded
               share (served below the top tier / served), each over the last ``window_s``,
               0 for a pod with no traffic (the recording rules' fallback) - targets 1, 0.2.
               ``latency``: the baseline that scales on latency alone - the cluster-wide
               p95 latency of requests served in the window vs ``latency_target_s`` (default
               0.8 x the median budget), as an Object metric (ceil(ready pods x p95 / target)).
               ``static``: the initial replicas, never changed
  traces       ``diurnal`` (a day compressed into ``day_s``: sinusoid from ``trough`` to
               ``peak``, times a few short bursts) or ``steps`` (piecewise-constant load);
               load is in multiples of one replica's full-tier capacity
  time_scale   k > 1 makes every engine time, budget and the scheduler's rate window k times
               longer, i.e. replicas k times slower: k times fewer requests to simulate for the
               same load in replicas, same cluster-level clock (HPA, pods, trace)

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

import bisect
import heapq
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from server.scheduling import Refused, Request, Scheduler, TierInfo, make_policy
from sim.simulator import _lat, _sigma, full_capacity

AUTOSCALERS = ("innfer", "latency", "static")
BALANCERS = ("least", "round_robin")
CLUSTER_TRACES = ("diurnal", "steps")


# -- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ScalingPolicy:
    """One HPA scaling policy: ``kind`` "Percent" or "Pods", ``value`` per ``period_s``."""

    kind: str
    value: int
    period_s: float


@dataclass(frozen=True)
class HPAConfig:
    """deploy/k8s/base/hpa.yaml's values by default."""

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


@dataclass(frozen=True)
class DiurnalTrace:
    """Load (multiples of one replica's full-tier capacity) over a day of ``day_s`` seconds:
    ``trough`` at ``trough_at`` (fraction of the day), ``peak`` half a day later, and
    ``bursts`` (start as a fraction of the day, length in seconds, rate multiplier)."""

    day_s: float = 1440.0
    trough: float = 1.5
    peak: float = 6.0
    trough_at: float = 4 / 24
    bursts: tuple[tuple[float, float, float], ...] = (
        (8.5 / 24, 40.0, 2.5),
        (15.0 / 24, 60.0, 2.0),
        (21.0 / 24, 30.0, 3.0),
    )


@dataclass(frozen=True)
class ClusterConfig:
    autoscaler: str = "innfer"  # innfer | latency | static
    balancer: str = "least"  # least | round_robin
    policy: str = "innfer"  # each replica's scheduling policy
    trace: str = "diurnal"  # diurnal | steps
    duration_s: float = 1440.0
    diurnal: DiurnalTrace = field(default_factory=DiurnalTrace)
    steps: tuple[tuple[float, float], ...] = ((0.0, 1.0),)  # (from time s, load)
    budget_ms: tuple[float, float] = (20.0, 100.0)  # uniform, before time_scale
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


# -- traces ----------------------------------------------------------------------------------
def load_at(cfg: ClusterConfig, t: np.ndarray) -> np.ndarray:
    """Offered load (multiples of one replica's full-tier capacity) at times ``t``."""
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
    per second (thinning of one at the highest rate)."""
    rng = np.random.default_rng(cfg.seed)
    grid = np.arange(0.0, cfg.duration_s, 0.25)
    top = float(np.max(load_at(cfg, grid))) * capacity * 1.001
    if top <= 0:
        return np.zeros(0)
    n = int(top * cfg.duration_s * 1.2) + 20
    t = np.cumsum(rng.exponential(1 / top, n))
    while t[-1] < cfg.duration_s:  # rare: draw more
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1 / top, n))])
    t = t[t < cfg.duration_s]
    keep = rng.random(len(t)) < load_at(cfg, t) * capacity / top
    return t[keep]


def scale_tiers(
    tiers: Sequence[TierInfo], p50: Mapping[str, Mapping], k: float
) -> tuple[list[TierInfo], dict]:
    """Tiers and p50 tables with every latency multiplied by ``k``."""
    if k == 1:
        return list(tiers), {n: dict(v) for n, v in p50.items()}
    out = []
    for t in tiers:
        typical = None if t.typical_ms is None else {b: v * k for b, v in t.typical_ms.items()}
        out.append(
            TierInfo(t.name, t.accuracy, {b: v * k for b, v in t.latency_ms.items()}, typical)
        )
    return out, {n: {b: float(v) * k for b, v in table.items()} for n, table in p50.items()}


# -- the HPA ---------------------------------------------------------------------------------
class HPA:
    """The HPA controller's replica arithmetic (pkg/controller/podautoscaler): metric ->
    desired count, stabilisation, rate limits. Times in seconds on the simulation clock."""

    def __init__(self, cfg: HPAConfig) -> None:
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
        return math.ceil(ratio * len(values))

    def object_metric(self, value: float, target: float, current: int, ready: int) -> int:
        """Object/External metric, Value target: scaled by the ready pods."""
        ratio = value / target
        if abs(1 - ratio) <= self.cfg.tolerance:
            return current
        return math.ceil(ratio * ready)

    def step(self, now: float, current: int, desired: int) -> int:
        """The new replica count from the metrics' ``desired`` (normalizeDesiredReplicas-
        WithBehaviors: stabilise, then limit the rate, then clamp to [min, max])."""
        c = self.cfg
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


# -- replicas and balancer -------------------------------------------------------------------
class Replica:
    """One pod: its scheduler, life times and per-``res`` counters for the metrics."""

    def __init__(self, rid: int, created: float, ready_at: float, sched: Scheduler, n: int):
        self.id = rid
        self.created = created
        self.ready_at = ready_at
        self.removed: float | None = None  # left the balancer (terminating)
        self.gone: float | None = None  # drained: no longer costs
        self.sched = sched
        self.outstanding = 0  # queued + running requests
        self.served = np.zeros(n)
        self.degraded = np.zeros(n)
        self.queue_s = np.zeros(n)
        self.compute_s = np.zeros(n)
        self.routed = 0

    def ready(self, now: float) -> bool:
        return self.ready_at <= now and self.removed is None

    def idle(self) -> bool:
        return self.outstanding == 0 and not self.sched.running

    def info(self) -> dict:
        return {
            "id": self.id,
            "created_s": self.created,
            "ready_s": self.ready_at,
            "removed_s": self.removed,
            "gone_s": self.gone,
            "routed": self.routed,
        }


class Balancer:
    def __init__(self, kind: str) -> None:
        if kind not in BALANCERS:
            raise ValueError(f"unknown balancer {kind!r}; choose one of {', '.join(BALANCERS)}")
        self.kind = kind
        self._rr = 0

    def pick(self, routable: Sequence[Replica]) -> Replica | None:
        n = len(routable)
        if not n:
            return None
        start = self._rr % n
        self._rr += 1
        if self.kind == "round_robin":
            return routable[start]
        best = routable[start]
        for j in range(1, n):
            rep = routable[(start + j) % n]
            if rep.outstanding < best.outstanding:
                best = rep
        return best


# -- the simulation --------------------------------------------------------------------------
@dataclass
class ClusterResult:
    config: ClusterConfig
    totals: dict
    bins: dict  # column -> list, one entry per bin
    ticks: list[dict]  # one per HPA evaluation
    replicas: list[dict]
    arrivals: np.ndarray
    deadlines: np.ndarray
    finish: np.ndarray  # nan where not served
    tiers: list[str | None]
    states: list[str]
    replica_of: np.ndarray  # replica id per request, -1: none was ready

    def to_json(self) -> dict:
        return {
            "config": asdict(self.config),
            "totals": self.totals,
            "bins": self.bins,
            "ticks": self.ticks,
            "replicas": self.replicas,
        }


_COMPLETE, _READY, _TICK = 0, 1, 2


def simulate_cluster(
    tiers: Sequence[TierInfo],
    p50: Mapping[str, Mapping],
    cfg: ClusterConfig,
    arrivals: np.ndarray | None = None,
    budgets: np.ndarray | None = None,
) -> ClusterResult:
    """Run the cluster over a trace (``arrivals``/``budgets`` in seconds, after time scaling,
    override the config's trace and budget draw)."""
    if cfg.autoscaler not in AUTOSCALERS:
        raise ValueError(
            f"unknown autoscaler {cfg.autoscaler!r}; choose one of {', '.join(AUTOSCALERS)}"
        )
    h = cfg.hpa
    if not 1 <= h.min_replicas <= h.max_replicas:
        raise ValueError("need 1 <= min_replicas <= max_replicas")
    k = cfg.time_scale
    tiers, p50 = scale_tiers(tiers, p50, k)
    tiers_by = {t.name: t for t in tiers}
    top = max(tiers, key=lambda t: t.accuracy).name
    max_batch = cfg.max_batch or min(t.max_batch for t in tiers)
    capacity = full_capacity(tiers, p50, max_batch, cfg.slots)  # req/s of one replica
    if arrivals is None:
        arrivals = make_cluster_trace(cfg, capacity)
    arrivals = np.asarray(arrivals, float)
    n = len(arrivals)
    rng = np.random.default_rng(cfg.seed + 1)
    if budgets is None:
        budgets = rng.uniform(cfg.budget_ms[0], cfg.budget_ms[1], n) / 1e3 * k
    lat_target = h.latency_target_s or 0.8 * (cfg.budget_ms[0] + cfg.budget_ms[1]) / 2e3 * k

    finish = np.full(n, np.nan)
    served_tier: list[str | None] = [None] * n
    state = ["queued"] * n
    replica_of = np.full(n, -1, dtype=np.int32)
    done_t: list[float] = []  # finish times of served requests, in order
    done_lat: list[float] = []

    res = cfg.metric_res_s
    n_res = math.ceil(cfg.duration_s / res) + 2
    replicas: list[Replica] = []
    routable: list[Replica] = []
    events: list = []  # heap of (time, seq, kind, payload)
    seq = 0

    def push(t: float, kind: int, payload) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    def add_replica(now: float, start_s: float) -> Replica:
        sched = Scheduler(
            tiers,
            make_policy(cfg.policy, tiers, cfg.slots),
            max_batch=max_batch,
            max_queue=cfg.max_queue,
            slots=cfg.slots,
            rate_window_s=0.5 * k,
        )
        rep = Replica(len(replicas), now, now + start_s, sched, n_res)
        replicas.append(rep)
        if start_s <= 0:
            routable.append(rep)
        else:
            push(now + start_s, _READY, rep)
        return rep

    def dispatch(rep: Replica, now: float) -> None:
        for r in rep.sched.expire(now):
            state[r.id] = "refused_deadline"
            rep.outstanding -= 1
        while (d := rep.sched.next(now)) is not None:
            typical = _lat(p50[d.tier], d.rows) / 1e3
            sigma = (
                cfg.noise if cfg.noise is not None else _sigma(tiers_by[d.tier], d.rows, typical)
            )
            compute = typical * float(rng.lognormal(0, sigma))
            push(now + compute, _COMPLETE, (rep, d, compute))

    def remove(now: float, count: int) -> None:
        alive = [r for r in replicas if r.removed is None]
        # Starting pods first (newest first), then the most recently ready.
        order = sorted((r for r in alive if r.ready_at > now), key=lambda r: -r.id)
        order += sorted((r for r in alive if r.ready_at <= now), key=lambda r: (-r.ready_at, -r.id))
        for rep in order[:count]:
            rep.removed = now
            if rep in routable:
                routable.remove(rep)
            if rep.idle():
                rep.gone = now

    hpa = HPA(h)
    ticks: list[dict] = []

    def tick(now: float) -> None:
        pods = [r for r in replicas if r.removed is None]
        current = len(pods)
        ready = [r for r in pods if r.ready_at <= now]
        hi = now - h.metric_lag_s
        lo = hi - h.window_s
        a, b = max(round(lo / res), 0), max(round(hi / res), 0)
        row = {"t": now, "replicas": current, "ready": len(ready)}
        if cfg.autoscaler == "innfer":
            qc, dg = [], []
            for r in pods:  # a starting pod has served nothing: 0, as the rules' fallback
                served, compute = r.served[a:b].sum(), r.compute_s[a:b].sum()
                qc.append(r.queue_s[a:b].sum() / compute if compute > 0 else 0.0)
                dg.append(r.degraded[a:b].sum() / served if served > 0 else 0.0)
            want_q = hpa.pods_metric(qc, h.queue_compute_target, current)
            want_d = hpa.pods_metric(dg, h.degraded_share_target, current)
            desired = max(want_q, want_d)
            row.update(
                queue_compute=float(np.mean(qc)),
                degraded_share=float(np.mean(dg)),
                desired_queue_compute=want_q,
                desired_degraded=want_d,
            )
        else:
            i, j = bisect.bisect_left(done_t, lo), bisect.bisect_left(done_t, hi)
            p = float(np.quantile(done_lat[i:j], h.latency_quantile)) if j > i else 0.0
            desired = hpa.object_metric(p, lat_target, current, len(ready))
            row.update(latency_q_s=p, latency_target_s=lat_target)
        new = hpa.step(now, current, desired)
        row.update(desired_raw=desired, desired=new)
        ticks.append(row)
        if new > current:
            for _ in range(new - current):
                add_replica(now, cfg.pod_start_s)
        elif new < current:
            remove(now, current - new)

    for _ in range(cfg.initial_replicas or h.min_replicas):
        add_replica(0.0, 0.0)
    if cfg.autoscaler != "static":
        push(h.period_s, _TICK, None)
    balancer = Balancer(cfg.balancer)

    i = 0
    while i < n or events:
        next_arrival = arrivals[i] if i < n else math.inf
        if events and events[0][0] <= next_arrival:
            now, _, kind, payload = heapq.heappop(events)
            if kind == _COMPLETE:
                rep, d, compute = payload
                rep.sched.complete(d, now, compute)
                m = min(int(now / res), n_res - 1)
                rep.compute_s[m] += compute
                for r in d.requests:
                    finish[r.id], served_tier[r.id], state[r.id] = now, d.tier, "served"
                    rep.queue_s[m] += r.started - r.arrival
                    done_t.append(now)
                    done_lat.append(now - r.arrival)
                rep.served[m] += len(d.requests)
                if d.tier != top:
                    rep.degraded[m] += len(d.requests)
                rep.outstanding -= len(d.requests)
                dispatch(rep, now)
                if rep.removed is not None and rep.gone is None and rep.idle():
                    rep.gone = now
            elif kind == _READY:
                if payload.removed is None:
                    routable.append(payload)
                    routable.sort(key=lambda r: r.id)
            else:
                tick(now)
                if now + h.period_s <= cfg.duration_s:
                    push(now + h.period_s, _TICK, None)
        else:
            now = next_arrival
            rep = balancer.pick(routable)
            if rep is None:
                state[i] = "refused_unavailable"
            else:
                replica_of[i] = rep.id
                rep.routed += 1
                try:
                    rep.sched.submit(Request(i, now, now + budgets[i]), now)
                    rep.outstanding += 1
                except Refused as exc:
                    state[i] = exc.state.name.lower()
                dispatch(rep, now)
            i += 1

    deadlines = arrivals + budgets
    acc = {t.name: t.accuracy for t in tiers}
    names = [t.name for t in sorted(tiers, key=lambda t: -t.accuracy)]
    totals = _totals(
        arrivals, deadlines, finish, served_tier, state, replicas, ticks, acc, names, capacity, cfg
    )
    bins = _bins(
        arrivals, deadlines, finish, served_tier, state, replicas, acc, names, capacity, cfg
    )
    return ClusterResult(
        cfg,
        totals,
        bins,
        ticks,
        [r.info() for r in replicas],
        arrivals,
        deadlines,
        finish,
        served_tier,
        state,
        replica_of,
    )


# -- summaries -------------------------------------------------------------------------------
def _lifetimes(replicas: Sequence[Replica], end: float):
    """(alive, in spec, ready) intervals per replica, clipped to [0, end]."""
    for r in replicas:
        gone = end if r.gone is None else min(r.gone, end)
        spec = end if r.removed is None else min(r.removed, end)
        yield (r.created, gone), (r.created, spec), (min(r.ready_at, spec), spec)


def _totals(
    arrivals, deadlines, finish, tiers_used, states, replicas, ticks, acc, names, capacity, cfg
) -> dict:
    n = len(arrivals)
    served = ~np.isnan(finish)
    met = served & (finish <= deadlines + 1e-12)
    lat = (finish - arrivals)[served] * 1e3 / cfg.time_scale  # the profile's ms
    mix = Counter(t for t in tiers_used if t is not None)
    n_served = int(served.sum())
    replica_s = sum(max(b - a, 0.0) for (a, b), _, _ in _lifetimes(replicas, cfg.duration_s))
    refused = {k: v for k, v in Counter(states).items() if k != "served"}
    return {
        "requests": n,
        "served": n_served,
        "refused": n - n_served,
        "refused_by_kind": refused,
        "capacity_per_replica_per_s": capacity,
        "mean_offered_load": n / cfg.duration_s / capacity,
        "slo_attainment": float(met.sum() / n) if n else 1.0,
        "mean_served_accuracy": (
            float(np.mean([acc[t] for t in tiers_used if t is not None])) if n_served else None
        ),
        "degraded_share": 1 - mix.get(names[0], 0) / n_served if n_served else 0.0,
        "tier_mix": {t: mix.get(t, 0) / max(n_served, 1) for t in names},
        "p50_latency_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p95_latency_ms": float(np.percentile(lat, 95)) if len(lat) else None,
        "p99_latency_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "replica_seconds": float(replica_s),
        "mean_replicas": float(replica_s / cfg.duration_s),
        "max_replicas": max((t["desired"] for t in ticks), default=len(replicas)),
        "scale_ups": sum(1 for t in ticks if t["desired"] > t["replicas"]),
        "scale_downs": sum(1 for t in ticks if t["desired"] < t["replicas"]),
        "replicas_started": len(replicas),
        "time_scale": cfg.time_scale,
    }


def _overlap(a: float, b: float, edges: np.ndarray) -> np.ndarray:
    """Length of [a, b) inside each bin [edges[i], edges[i + 1])."""
    return np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0, None)


def _bins(
    arrivals, deadlines, finish, tiers_used, states, replicas, acc, names, capacity, cfg
) -> dict:
    edges = np.arange(0.0, cfg.duration_s + cfg.bin_s / 2, cfg.bin_s)
    if edges[-1] < cfg.duration_s:
        edges = np.append(edges, cfg.duration_s)
    nb = len(edges) - 1
    width = np.diff(edges)
    idx = np.clip(np.searchsorted(edges, arrivals, side="right") - 1, 0, nb - 1)
    served = ~np.isnan(finish)
    met = served & (finish <= deadlines + 1e-12)
    count = np.bincount(idx, minlength=nb).astype(float)
    n_served = np.bincount(idx, weights=served, minlength=nb)
    tier_code = np.array([names.index(t) if t is not None else -1 for t in tiers_used])
    accs = np.array([acc[t] if t is not None else 0.0 for t in tiers_used])
    alive, spec, ready = np.zeros(nb), np.zeros(nb), np.zeros(nb)
    for a, s, r in _lifetimes(replicas, cfg.duration_s):
        alive += _overlap(*a, edges)
        spec += _overlap(*s, edges)
        ready += _overlap(*r, edges)
    lat = (finish - arrivals) * 1e3 / cfg.time_scale  # the profile's ms

    def ratio(num, den):
        return [
            float(x) if d > 0 else None for x, d in zip(num / np.maximum(den, 1), den, strict=True)
        ]

    p95 = []
    for b in range(nb):
        v = lat[(idx == b) & served]
        p95.append(float(np.percentile(v, 95)) if len(v) else None)
    mix = {
        t: ratio(np.bincount(idx, weights=tier_code == j, minlength=nb), n_served)
        for j, t in enumerate(names)
    }
    offered = count / width
    return {
        "t_s": edges[:-1].tolist(),
        "offered_per_s": offered.tolist(),
        "offered_load": (offered / capacity).tolist(),
        "target_load": load_at(cfg, edges[:-1] + width / 2).tolist(),
        "replicas_desired": (spec / width).tolist(),
        "replicas_ready": (ready / width).tolist(),
        "replicas_cost": (alive / width).tolist(),
        "slo_attainment": ratio(np.bincount(idx, weights=met, minlength=nb), count),
        "mean_served_accuracy": ratio(np.bincount(idx, weights=accs, minlength=nb), n_served),
        "refused_share": ratio(count - n_served, count),
        "p95_latency_ms": p95,
        "tier_mix": mix,
    }


def format_totals(rows: Mapping[str, dict]) -> str:
    """A markdown table of totals, one row per run."""
    head = (
        "| run | SLO attainment | mean served accuracy | degraded | refused | p95 ms "
        "| replica-s (cost) | mean / max replicas |"
    )
    lines = [head, "|" + " --- |" * 8]
    for name, t in rows.items():
        acc = t["mean_served_accuracy"]
        lines.append(
            f"| {name} | {t['slo_attainment']:.2%} | {'-' if acc is None else f'{acc:.3f}'} "
            f"| {t['degraded_share']:.1%} | {t['refused'] / max(t['requests'], 1):.2%} "
            f"| {t['p95_latency_ms'] or 0:.0f} | {t['replica_seconds']:.0f} "
            f"| {t['mean_replicas']:.2f} / {t['max_replicas']} |"
        )
    return "\n".join(lines)
