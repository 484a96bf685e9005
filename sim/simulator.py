"""``innfer simulate``: the real scheduler on a virtual clock, with an engine model drawn
from a ``profile.json``. Deterministic for a seed.

Arrivals come from ``sim.traces`` (poisson, gamma, varying, file); load is a multiple of the
full tier's capacity, ``slots * max_batch / latency(full, max_batch)`` (the base rate of
``varying``; a ``file`` brings its own times). The offered rate and goodput reported are per
the trace's window (``sim.traces.trace_window``): what it holds, not what was asked for.
Each batch's engine
time comes from ``sim.engine_time``: the profiled p50 times a log-normal factor whose sigma
puts the profiled p90 at its 90th percentile (or ``noise``, if given), both interpolated
between profiled batch sizes as the scheduler does. The scheduler - its admission, its
planner, its latency model with the ``slo_target`` quantile and online correction - is the
server's own object; only the engine is simulated.

Example:
    >>> tiers = [TierInfo("w100", 0.99, {1: 4.0, 8: 16.0}),
    ...          TierInfo("w050", 0.97, {1: 2.0, 8: 6.0})]
    >>> r = simulate(tiers, {"w100": {1: 3.5, 8: 14.0}, "w050": {1: 1.6, 8: 5.0}},
    ...              SimConfig(load=0.5, duration_s=5))
    >>> r.summary["slo_attainment"] > 0.99
    True
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from server.scheduling import Refused, Request, Scheduler, TierInfo, make_policy
from server.scheduling.latency import DEFAULT_SLO_TARGET, tiers_from_profile
from server.scheduling.scheduler import DEFAULT_ADMIT_QUANTILE
from sim.engine_time import EngineTime, full_capacity
from sim.events import Events
from sim.traces import (
    TRACES,
    make_trace,
    offered_rate,
    read_trace,
    recorded,
    trace_window,
    varying_multiplier,
)

# Re-exported: callers import the traces and the capacity from here.
__all__ = [
    "TRACES",
    "SimConfig",
    "SimResult",
    "format_summary",
    "full_capacity",
    "make_trace",
    "offered_rate",
    "plot_timeline",
    "read_trace",
    "replay",
    "simulate",
    "summarise",
    "tiers_from_model_dir",
    "trace_window",
    "varying_multiplier",
]


@dataclass(frozen=True)
class SimConfig:
    """One simulation run."""

    policy: str = "innfer"
    trace: str = "poisson"
    load: float = 1.0  # multiple of the full tier's capacity
    cv2: float = 1.0  # gamma trace only
    duration_s: float = 30.0
    budget_ms: tuple[float, float] = (20.0, 100.0)  # uniform in [lo, hi]
    seed: int = 0
    noise: float | None = None  # log-normal sigma; None: from each entry's p90/p50
    slots: int = 1
    max_queue: int = 1000
    max_batch: int | None = None  # default: the profile's largest batch
    trace_file: str | None = None
    slo_target: float = DEFAULT_SLO_TARGET  # probability plans meet deadlines (model.yaml)
    admit_quantile: float = DEFAULT_ADMIT_QUANTILE  # refusal at arrival (model.yaml)
    # Taken off each budget before it is planned, as the server's budget_margin_ms (the
    # answer's way back); answers are judged by the whole budget. 0: plan with the whole.
    budget_margin_ms: float = 1.0

    def __post_init__(self) -> None:
        """Each field checked where the library is called, as the CLI checks its flags:
        raw numpy errors before, or a silent result (max_queue 0 refused every request,
        max_batch 0 ran the profile's largest batch; review helper-298)."""

        def number(name: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < lo or v > hi or (lo_open and v == lo):
                where = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
                raise ValueError(f"SimConfig.{name} must be a number in {where}, got {v!r}")

        def whole(name: str, lo: int) -> None:
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
                raise ValueError(f"SimConfig.{name} must be a whole number >= {lo}, got {v!r}")

        if self.trace not in TRACES:
            raise ValueError(f"SimConfig.trace must be one of {', '.join(TRACES)}, got "
                             f"{self.trace!r}")  # fmt: skip
        if self.trace == "file" and not self.trace_file:
            raise ValueError("SimConfig.trace 'file' needs trace_file (a recorded traffic CSV)")
        number("load", 0.0, lo_open=True)
        number("cv2", 0.0, lo_open=True)
        number("duration_s", 0.0, lo_open=True)
        lo_hi = self.budget_ms
        if not (isinstance(lo_hi, (tuple, list)) and len(lo_hi) == 2
                and all(isinstance(b, (int, float)) and math.isfinite(b) for b in lo_hi)
                and 0 < lo_hi[0] <= lo_hi[1]):  # fmt: skip
            raise ValueError(f"SimConfig.budget_ms must be (lo, hi) in ms with 0 < lo <= hi, "
                             f"got {lo_hi!r}")  # fmt: skip
        if self.noise is not None:
            number("noise", 0.0)
        whole("seed", 0)
        whole("slots", 1)
        whole("max_queue", 1)
        if self.max_batch is not None:
            whole("max_batch", 1)
        number("slo_target", 0.0, 1.0, lo_open=True)
        number("admit_quantile", 0.0, 1.0, lo_open=True)
        number("budget_margin_ms", 0.0)


@dataclass
class SimResult:
    summary: dict
    arrivals: np.ndarray
    finish: np.ndarray  # nan where not served
    tiers: list[str | None]
    states: list[str]
    config: SimConfig = field(default_factory=SimConfig)

    def to_json(self) -> dict:
        return {"config": asdict(self.config), "summary": self.summary}


# -- the simulation --------------------------------------------------------------------------
# Requests one simulation may generate: --load 1e9 asked numpy for 1.7 PiB ("internal
# error: MemoryError"); 158 k requests take ~20 s here, so this is about 10 minutes.
MAX_REQUESTS = 5_000_000
PROGRESS_EVERY = 4096  # arrivals between updates of replay's progress bar


def simulate(
    tiers: Sequence[TierInfo], p50: Mapping[str, Mapping], cfg: SimConfig, progress: bool = False
) -> SimResult:
    """Run the scheduler over a trace; ``p50`` drives the engine model (ms per batch).

    Example:
        >>> tiers = [TierInfo("w100", 1.0, {8: 16.0}), TierInfo("w025", 0.3, {8: 4.0})]
        >>> p50 = {"w100": {8: 14.0}, "w025": {8: 3.5}}
        >>> r = simulate(tiers, p50, SimConfig(load=2.0, duration_s=2.0))
        >>> r.summary["tier_mix"]["w025"] > 0.3  # twice the full tier's capacity
        True
    """
    rate, arrivals, budgets, rng = requests_for(tiers, p50, cfg)
    traffic = recorded(cfg.trace_file) if cfg.trace == "file" else None
    rows = traffic.rows if traffic is not None else None
    if traffic is not None:
        traffic.check_rows(cfg.max_batch or min(t.max_batch for t in tiers), cfg.trace_file)
    return replay(tiers, p50, arrivals, budgets, cfg, rows=rows, rng=rng, rate=rate,
                  progress=progress)  # fmt: skip


def _check_requests(tiers, p50, arrivals, budgets, rows, planned) -> None:
    """``replay``'s inputs, said as what is wrong: decreasing arrivals replayed at 0.135
    attainment for 1.0, a tier without engine times failed with a KeyError only once the
    policy chose it, lengths that differ with numpy's broadcast error (review helper-298)."""
    if not tiers:
        raise ValueError("tiers is empty: give at least one TierInfo")
    if missing := [t.name for t in tiers if not p50.get(t.name)]:
        raise ValueError(f"p50 has no engine times (ms per batch size) for tier(s) "
                         f"{', '.join(missing)}")  # fmt: skip
    n = len(arrivals)
    for name, a in (("budgets", budgets), ("rows", rows), ("planned", planned)):
        if a is not None and len(a) != n:
            raise ValueError(f"{name} has {len(a)} entries for {n} arrivals: one per request")
    if n and not np.all(np.isfinite(arrivals)):
        raise ValueError("arrivals must be finite times in seconds")
    if n > 1 and np.any(np.diff(arrivals) < 0):
        raise ValueError("arrivals must be in time order (non-decreasing): sort the requests "
                         "by arrival, their budgets and rows with them")  # fmt: skip
    if n and np.any(np.isnan(budgets)):  # (<= 0 is a request hopeless on arrival: allowed)
        raise ValueError("budgets must be seconds, one per request; some are NaN")


def load_rate(tiers: Sequence[TierInfo], p50: Mapping[str, Mapping], cfg: SimConfig) -> float:
    """The rate (requests/s) ``cfg.load`` stands for: that many times the full tier's
    capacity at the largest batch (``full_capacity``)."""
    max_batch = cfg.max_batch or min(t.max_batch for t in tiers)
    return cfg.load * full_capacity(tiers, p50, max_batch, cfg.slots)


def requests_for(tiers: Sequence[TierInfo], p50: Mapping[str, Mapping], cfg: SimConfig):
    """What ``simulate`` serves for ``cfg``: (offered rate per s, arrival times s, budgets s,
    the rng the budgets were drawn from - the engine times continue from it). The same
    requests for the shared-core model (``innfer simulate --host-ms``) and a live run
    (``innfer bench``). The rate is what the trace offers over its window
    (``offered_rate``): about 1.18x ``load`` x capacity for ``varying``, the file's own for
    ``file``."""
    rate = load_rate(tiers, p50, cfg)
    expected = rate * cfg.duration_s * (1.2 if cfg.trace == "varying" else 1.0)
    if cfg.trace != "file" and expected > MAX_REQUESTS:  # before the arrays are made
        raise ValueError(
            f"{cfg.trace} at load {cfg.load:g} for {cfg.duration_s:g} s is about "
            f"{expected:,.0f} requests ({rate:,.0f}/s: the full tier's capacity x load), over "
            f"the {MAX_REQUESTS:,} a run may simulate; lower --load or --duration"
        )
    arrivals = make_trace(cfg, rate)
    if not len(arrivals):  # "SLO attainment 100.00 %" of nothing, exit 0
        raise ValueError(
            f"no request arrives in {cfg.duration_s:g} s at load {cfg.load:g} ({rate:.3g}/s): "
            "raise --load or --duration"
        )
    rng = np.random.default_rng(cfg.seed + 1)
    budgets = rng.uniform(cfg.budget_ms[0], cfg.budget_ms[1], len(arrivals)) / 1e3
    if cfg.trace == "file" and (traffic := recorded(cfg.trace_file)) is not None:
        budgets = traffic.budget_ms / 1e3  # each request's own (drawn ones: rng continues)
    return offered_rate(cfg, arrivals), arrivals, budgets, rng


def closed_loop_budgets(cfg: SimConfig, n: int) -> np.ndarray:
    """The budgets (s) of a closed loop's first ``n`` requests, in send order: drawn from
    ``cfg.budget_ms`` as ``requests_for`` draws an open loop's (the same seed), so that
    ``innfer simulate --clients`` and ``innfer bench --clients`` send the same ones.

    Example:
        >>> b = closed_loop_budgets(SimConfig(budget_ms=(30.0, 30.0)), 3)
        >>> [round(float(x), 3) for x in b]
        [0.03, 0.03, 0.03]
    """
    return np.random.default_rng(cfg.seed + 1).uniform(*cfg.budget_ms, n) / 1e3


def replay(
    tiers: Sequence[TierInfo],
    p50: Mapping[str, Mapping],
    arrivals: np.ndarray,
    budgets: np.ndarray,
    cfg: SimConfig,
    rows: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    rate: float | None = None,
    planned: np.ndarray | None = None,
    grace: float = 0.0,
    speed: float = 1.0,
    host_s: float = 0.0,
    progress: bool = False,
    batch_host_s: float = 0.0,
) -> SimResult:
    """Run the scheduler over given requests: ``arrivals`` (seconds, non-decreasing),
    ``budgets`` (seconds each) and ``rows`` (batch rows each; default 1). Of ``cfg`` it uses
    the policy, slots, queue, batch, noise, SLO target and seed (engine times), and
    ``duration_s`` (or the last arrival, if later: ``trace_window``) as the window of the
    summary's goodput and offered rate (default: arrivals / window); the trace and budget
    fields are ignored.
    A live server's view (``sim.live_host``): the scheduler plans with ``planned`` budgets
    (default ``budgets`` less ``cfg.budget_margin_ms``, as the server plans) and admission
    ``grace`` while answers are judged by ``budgets``, and every batch runs ``speed`` times
    its profiled time - a ``speed`` above 1 is also the latency model's starting level for
    every tier, as the server's swap sets it; its planner counts ``host_s`` of request
    handling's CPU per row (``Scheduler.host_s``) and ``batch_host_s`` per batch
    (``Scheduler.batch_host_s``: its batch sizes count it; the virtual time does not).
    ``progress``: a bar of the requests arrived (a default simulate is millions: minutes).

    Example:
        >>> tiers = [TierInfo("w100", 1.0, {1: 4.0, 8: 16.0})]
        >>> r = replay(tiers, {"w100": {1: 3.5, 8: 14.0}}, np.array([0.0, 0.001]),
        ...            np.array([0.05, 0.05]), SimConfig())
        >>> r.summary["slo_attainment"]
        1.0
    """
    _check_requests(tiers, p50, arrivals, budgets, rows, planned)
    max_batch = cfg.max_batch or min(t.max_batch for t in tiers)
    rng = rng if rng is not None else np.random.default_rng(cfg.seed + 1)
    engine = EngineTime(tiers, p50, rng, cfg.noise)  # draws after the budgets, from one rng
    policy = make_policy(cfg.policy, tiers, cfg.slots)
    sched = Scheduler(
        tiers,
        policy,
        max_batch=max_batch,
        max_queue=cfg.max_queue,
        slots=cfg.slots,
        slo_target=cfg.slo_target,
        admit_quantile=cfg.admit_quantile,
    )
    sched.host_s = host_s
    sched.batch_host_s = batch_host_s
    if speed > 1.0:
        # As a live swap starts its new runtime (ModelRuntime.assume_speed): each tier from
        # the measured speed, not its quiet profile, until its own batches correct it.
        for t in tiers:
            sched.latency.start_from(t.name, speed)
    # The level a server's timing at load would leave (the engine here runs at ``speed`` x
    # its profile): an unused tier relaxes to it, not to the profile (review 201).
    sched.latency.settle()
    n = len(arrivals)
    margin = cfg.budget_margin_ms / 1e3  # (``planned`` given: the caller's, margin included)
    finish = np.full(n, np.nan)
    served_tier: list[str | None] = [None] * n
    state = ["queued"] * n
    running = Events()  # batch ends: (decision, compute seconds)
    from tqdm import tqdm  # (here: the serving image replays through this module)

    bar = tqdm(total=n, desc=f"simulate {cfg.policy}", unit="req", disable=not progress)
    i = 0
    while i < n or running:
        if i % PROGRESS_EVERY == 0:  # (tqdm's own cost per request is not for free)
            bar.update(i - bar.n)
        next_arrival = arrivals[i] if i < n else math.inf
        if running.next_time() <= next_arrival:
            now, (d, compute) = running.pop()
            sched.complete(d, now, compute)
            for r in d.requests:
                finish[r.id], served_tier[r.id], state[r.id] = now, d.tier, "served"
        else:
            now = next_arrival
            plan = budgets[i] - margin if planned is None else planned[i]
            r = Request(i, now, now + plan, int(rows[i]) if rows is not None else 1, grace=grace)
            try:
                sched.submit(r, now)
            except Refused as exc:
                state[i] = exc.state.name.lower()
            i += 1
        for r in sched.expire(now):  # (as sim.shared_core names them: review helper-236)
            state[r.id] = "expired"
        while (d := sched.next(now)) is not None:
            compute = engine.draw_s(d.tier, d.rows) * speed
            running.push(now + compute, (d, compute))
    bar.update(n - bar.n)
    bar.close()
    deadlines = arrivals + budgets
    if rate is None:
        rate = offered_rate(cfg, arrivals)
    summary = summarise(arrivals, deadlines, finish, served_tier, state, tiers, cfg, rate)
    return SimResult(summary, arrivals, finish, served_tier, state, cfg)


def summarise(arrivals, deadlines, finish, tiers_used, states, tiers, cfg, rate) -> dict:
    n = len(arrivals)
    served = ~np.isnan(finish)
    met = served & (finish <= deadlines + 1e-12)
    latency = (finish - arrivals)[served] * 1e3
    acc = {t.name: t.accuracy for t in tiers}
    mix = Counter(t for t in tiers_used if t is not None)
    full = max(tiers, key=lambda t: t.accuracy)
    span = float(arrivals[-1] - arrivals[0]) if n > 1 else 0.0
    return {
        "requests": n,
        "window_s": trace_window(cfg, arrivals),  # what the rates are per
        "span_s": span,  # first to last arrival
        "offered_rate_per_s": rate,
        "slo_attainment": float(met.sum() / n) if n else 1.0,
        "mean_served_accuracy": (
            float(np.mean([acc[t] for t in tiers_used if t is not None])) if mix else None
        ),
        "full_tier_accuracy": full.accuracy,
        "full_tier": full.name,  # the most accurate tier (w075 may beat w100)
        "tier_mix": {t.name: mix.get(t.name, 0) / max(int(served.sum()), 1) for t in tiers},
        "p50_latency_ms": float(np.percentile(latency, 50)) if len(latency) else None,
        "p99_latency_ms": float(np.percentile(latency, 99)) if len(latency) else None,
        "late": int((served & ~met).sum()),  # answered past the budget
        # over the window, or to the last answer where that came later, as bench and the
        # shared-core simulation count it: loose budgets past capacity answered after the
        # window, and a goodput of 754/s was printed for an engine of 257/s (helper-236)
        "goodput_per_s": float(
            met.sum()
            / max(trace_window(cfg, arrivals), float(finish[served].max()) if served.any() else 0)
        ),
        "refused": {k: v for k, v in Counter(states).items() if k != "served"},
    }


def format_ms(value: float | None) -> str:
    """A latency for a summary line: "-" where nothing was served (it printed 0.0 ms), and
    two significant digits below 1 ms (a tiny model's 0.03 ms printed as 0.0).

    Example:
        >>> format_ms(12.345), format_ms(0.0312), format_ms(None)
        ('12.3', '0.031', '-')
    """
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def _span(s: dict) -> str:
    """Where the requests came in a much shorter time than the window the rates are per (a
    recorded traffic file of 10.5 s in the default 30 s): both rates, said apart (review
    helper-145: "768 at 25.6/s" where `tiers suggest` said 73/s of the same file)."""
    window, span = s.get("window_s"), s.get("span_s") or 0.0
    if not window or not span or span >= 0.9 * window:
        return ""
    return (f" over the {window:g} s window ({s['requests'] / span:.1f}/s over the "
            f"{span:.3g} s they came in)")  # fmt: skip


def _named(s: dict) -> str:
    """' NAME' of the summary's most accurate tier ('' in a summary from before it was
    kept): "full tier" named w075's figures where it beat w100 (review helper-300)."""
    return f" {s['full_tier']}" if s.get("full_tier") else ""


def format_summary(s: dict, title: str = "") -> str:
    mix = ", ".join(f"{k} {v:.0%}" for k, v in s["tier_mix"].items())
    acc = s["mean_served_accuracy"]
    lines = [
        title,
        f"  requests        {s['requests']} at {s['offered_rate_per_s']:.1f}/s{_span(s)}",
        f"  SLO attainment  {s['slo_attainment']:.2%}",
        f"  mean accuracy   {'-' if acc is None else f'{acc:.4f}'} "
        f"(most accurate tier{_named(s)} {s['full_tier_accuracy']:.4f})",
        f"  tier mix        {mix}",
        f"  latency p50/p99 {format_ms(s['p50_latency_ms'])} / {format_ms(s['p99_latency_ms'])} ms",
        f"  goodput         {s['goodput_per_s']:.1f}/s",
        f"  refused         {s['refused'] or 'none'}",
        # (late answers were in no line: 92 % attainment beside "refused none")
        f"  late            {s['late']} answered past their budget" if "late" in s else "",
    ]
    return "\n".join(line for line in lines if line)


def plot_timeline(result: SimResult, tiers: Sequence[TierInfo], path: str | Path) -> None:
    """Load, tier mix and p99 latency over time, in 60 bins from 0 to the last answer (or
    the trace's window, if later): arrivals and p99 latency by arrival time, what was
    served by when it was answered - binned by arrival, a queue draining after the
    arrivals stopped was drawn as served before it was, above the engine's best rate
    (review helper-269)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    answered = result.finish[~np.isnan(result.finish)]
    d = max(trace_window(result.config, result.arrivals), float(answered.max(initial=0.0)))
    bins = np.linspace(0, d, 61)
    width = bins[1] - bins[0]

    def binned(times: np.ndarray) -> np.ndarray:
        return np.clip(np.digitize(times, bins) - 1, 0, len(bins) - 2)

    idx = binned(result.arrivals)
    done = binned(np.nan_to_num(result.finish, nan=-1.0))  # (unanswered: masked out below)
    fig, ax = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    ax[0].plot(bins[:-1], np.bincount(idx, minlength=60)[:60] / width)
    ax[0].set_ylabel("arrivals / s")
    bottom = np.zeros(60)
    for t in sorted(tiers, key=lambda t: -t.accuracy):
        mine = np.array([x == t.name for x in result.tiers], bool) & ~np.isnan(result.finish)
        counts = np.bincount(done[mine], minlength=60)[:60]
        ax[1].bar(bins[:-1], counts / width, width, bottom=bottom, label=t.name, align="edge")
        bottom += counts / width
    ax[1].set_ylabel("served / s by tier\n(by answer time)")
    ax[1].legend(fontsize=7, ncol=len(tiers))
    lat = (result.finish - result.arrivals) * 1e3
    p99 = [np.nanpercentile(lat[idx == b], 99) if np.any(~np.isnan(lat[idx == b])) else np.nan
           for b in range(60)]  # fmt: skip
    ax[2].plot(bins[:-1], p99)
    ax[2].set_ylabel("p99 latency (ms)\n(by arrival time)")
    ax[2].set_xlabel("time (s)")
    c = result.config
    load = f"{result.summary['offered_rate_per_s']:.1f}/s" + (
        f" (load {c.load}x)" if c.trace != "file" else ""
    )
    fig.suptitle(f"{c.policy}, {c.trace}, {load}, SLO {result.summary['slo_attainment']:.2%}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def tiers_from_model_dir(model_dir: str | Path) -> tuple[list[TierInfo], dict]:
    """(TierInfo with p90 latencies and accuracies, p50 tables) for the tiers a server
    would serve from a built model: auto-tiering's choice where it made one, else
    model.yaml's (``Repository.served_tiers``)."""
    from runtime.repository import Repository

    d = Path(model_dir).resolve()  # "." inside the model directory has a name too
    records, profile, _ = Repository(d.parent).served_tiers(d.name)
    return tiers_from_profile(profile, records)
