"""The server on one shared core: the scheduler, its engine and its request handling
(gRPC receiving, parsing, encoding and sending) competing for the same CPU - what the live
benchmark's server pinned to one core is, and what ``simulate`` (engine time only) leaves
out.

Per request the server spends ``HostCost.parse_s`` of CPU before the scheduler sees it and
``answer_s`` after its batch (``refuse_s`` to turn it away); per batch, ``batch_s`` to
decide, launch and settle it (the event loop's share of a batch as such, which the live
server measures as ``innfer_host_cpu_per_batch_seconds``). The handler thread works
through that in arrival order - a finished batch's settling (even at no cost) waits behind
the requests queued before it, and the next batch starts only when it is done (the loop
decides and launches it there), its answers queued after it; the engine thread runs one
batch at a time. While both have work each runs at half speed (the kernel shares the core
fairly), alone at full speed. The
scheduler is the server's own object and sees what the live server sees: a request when
its parsing ends, a batch's wall time (stretched by sharing) as its compute, the host
CPU per row and per batch as the server hands them to it (``Scheduler.host_s``: the per
row figure counts the batches' share, as the server's does - here averaged over the whole
run, there over recent windows), budgets
planned short by ``budget_margin_s`` - and, with ``plan_overhead`` (the server's option,
on by default there and here), counted from when parsing began and planned short by the
learned overhead too (``server.overhead``, fed the time from a batch's end to its answer
leaving), with the part above what admission judges the overhead at (its median, or
the quiet median of answers that ran alone where lower) given back to it
(``Request.grace``). The client
sees the answer ``client_s`` later. Open loop (arrival times) or closed loop (``clients``
each sending again when answered or refused). Deterministic for a seed.

Example:
    >>> tiers = [TierInfo("w100", 1.0, {1: 4.0, 8: 16.0}), TierInfo("w025", 0.25, {1: 1.0, 8: 4.0})]
    >>> p50 = {"w100": {1: 3.5, 8: 14.0}, "w025": {1: 0.9, 8: 3.5}}
    >>> host = HostCost(parse_s=0.0005, answer_s=0.0003)
    >>> r = simulate_shared(tiers, p50, host, budgets_s=lambda i: 0.030, clients=4,
    ...                     n_requests=500, max_seconds=10.0)
    >>> r.summary["sent"], r.summary["slo_attainment"] > 0.9
    (500, True)
"""

from __future__ import annotations

import argparse
import math
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from server.overhead import QUIET_QUEUE_S, Overhead
from server.scheduling import Refused, Request, Scheduler, TierInfo, make_policy
from server.scheduling.latency import DEFAULT_SLO_TARGET
from server.scheduling.scheduler import DEFAULT_ADMIT_QUANTILE
from sim.engine_time import EngineTime
from sim.events import Events


@dataclass(frozen=True)
class HostCost:
    """CPU seconds per request outside the engine, on the engine's core: before the
    scheduler sees it (receive, parse, decode), after its batch (encode, send), to refuse
    it; and the client's own time after the answer leaves (not the server's CPU). Per batch
    (``batch_s``): the loop's CPU to decide, launch and settle it, whatever its rows."""

    parse_s: float
    answer_s: float
    refuse_s: float | None = None  # default: answer_s
    client_s: float = 0.0
    batch_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("parse_s", "answer_s", "client_s", "batch_s"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"HostCost.{name} must be finite seconds >= 0")
        if self.refuse_s is not None and not 0 <= self.refuse_s < math.inf:
            raise ValueError("HostCost.refuse_s must be finite seconds >= 0")


def host_ms(text: str) -> tuple[float, float, float]:
    """``--host-ms PARSE,ANSWER[,CLIENT]`` (ms, each >= 0; CLIENT 0 when left out) as a
    tuple, for ``HostCost``; the one parser of ``innfer simulate`` and bench/shared_core.py.

    Example:
        >>> host_ms("1.1,0.7")
        (1.1, 0.7, 0.0)
    """
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    # (inf got through: NaN warnings and a summary of nothing served; review 191)
    if len(parts) not in (2, 3) or not all(0 <= v <= HOST_MS_MAX for v in parts):
        raise argparse.ArgumentTypeError(
            f"--host-ms takes PARSE,ANSWER[,CLIENT] in ms (each in [0, {HOST_MS_MAX:g}]), "
            f"got {text!r}"
        )
    return parts[0], parts[1], parts[2] if len(parts) == 3 else 0.0


HOST_MS_MAX = 10_000.0  # --host-ms: each part at most 10 s of a core per request


def host_batch_ms(text: str) -> float:
    """``--host-batch-ms MS`` (ms of the shared core per batch, in [0, HOST_MS_MAX]); the one
    parser of ``innfer simulate`` and bench/shared_core.py.

    Example:
        >>> host_batch_ms("0.25")
        0.25
    """
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 <= v <= HOST_MS_MAX:
        raise argparse.ArgumentTypeError(
            f"--host-batch-ms takes ms per batch in [0, {HOST_MS_MAX:g}], got {text!r}"
        )
    return v


@dataclass
class SharedCoreResult:
    summary: dict
    send: np.ndarray  # (n,) seconds: when each request left its client
    latency_ms: np.ndarray  # (n,) as its client saw it; nan where refused
    tiers: list[str | None]
    states: list[str]  # served | refused_full | refused_deadline | expired


class _Task:
    __slots__ = ("began", "kind", "left", "rid")

    def __init__(self, kind: str, rid: int, work: float) -> None:
        self.kind, self.rid, self.left, self.began = kind, rid, work, math.nan


def simulate_shared(
    tiers: Sequence[TierInfo],
    p50: Mapping[str, Mapping],
    host: HostCost,
    budgets_s: Callable[[int], float],
    arrivals: np.ndarray | None = None,
    clients: int = 0,
    n_requests: int = 0,
    max_seconds: float = 30.0,
    policy: str = "innfer",
    max_batch: int | None = None,
    max_queue: int = 1000,
    slo_target: float = DEFAULT_SLO_TARGET,
    admit_quantile: float = DEFAULT_ADMIT_QUANTILE,
    budget_margin_s: float = 0.001,
    widths: Mapping[str, float] | None = None,
    seed: int = 0,
    noise: float | None = None,
    plan_overhead: bool = True,
) -> SharedCoreResult:
    """Serve an open-loop trace (``arrivals``, seconds) or ``clients`` closed-loop clients
    (at most ``n_requests`` sends, none after ``max_seconds``) on one shared core; request
    ``i`` has budget ``budgets_s(i)``. ``widths`` (tier -> served size) adds the mean served
    size to the summary."""
    if (arrivals is None) == (clients < 1):
        raise ValueError("give arrivals (open loop) or clients >= 1 (closed loop), not both")
    max_batch = max_batch or min(t.max_batch for t in tiers)
    engine = EngineTime(tiers, p50, np.random.default_rng(seed + 1), noise)
    sched = Scheduler(tiers, make_policy(policy, tiers, 1), max_batch=max_batch,
                      max_queue=max_queue, slots=1, slo_target=slo_target,
                      admit_quantile=admit_quantile)  # fmt: skip
    # The server measures its CPU per row and per batch outside the engine (server.host_cpu)
    # and hands them to its scheduler; here they are known (the per-row figure, like the
    # server's, counts each row's share of its batch's: see the batch's end below).
    sched.host_s = host.parse_s + host.answer_s
    sched.batch_host_s = host.batch_s
    batches = rows_run = 0
    overhead = Overhead()
    refuse_s = host.answer_s if host.refuse_s is None else host.refuse_s
    n = len(arrivals) if arrivals is not None else n_requests
    send = np.full(n, np.nan)
    received = np.full(n, np.nan)
    budget = np.full(n, np.nan)
    batch_end = np.full(n, np.nan)
    alone = np.zeros(n, dtype=bool)  # ran as a batch of its own, hardly queued (Overhead.quiet)
    tiers_used: list[str | None] = [None] * n
    states = ["unsent"] * n
    sends = Events()  # (time, request id)
    sent = 0
    if arrivals is not None:
        for i, at in enumerate(arrivals):
            sends.push(float(at), i)
        sent = n
    else:
        for _ in range(min(clients, n)):
            sends.push(0.0, sent)
            sent += 1
    work: deque[_Task] = deque()  # the handler thread's FIFO
    running = None  # [decision, work left, start]
    settling = None  # the finished decision whose settling task is queued: no batch starts
    t = 0.0

    def handle(task: _Task) -> None:
        if not work:
            task.began = t
        work.append(task)

    def answered(rid: int, at: float) -> None:
        nonlocal sent
        received[rid] = at + host.client_s
        if arrivals is None and sent < n and received[rid] <= max_seconds:
            sends.push(received[rid], sent)  # this client sends its next request
            sent += 1

    while True:
        both = bool(work) and running is not None
        rate = 0.5 if both else 1.0
        t_host = t + work[0].left / rate if work else math.inf
        t_engine = t + running[1] / rate if running is not None else math.inf
        t_send = sends.next_time()
        t_next = min(t_host, t_engine, t_send)
        if t_next == math.inf:
            break
        if work:
            work[0].left -= (t_next - t) * rate
        if running is not None:
            running[1] -= (t_next - t) * rate
        t = t_next
        if t_send <= t_host and t_send <= t_engine:
            _, rid = sends.pop()
            send[rid], budget[rid], states[rid] = t, float(budgets_s(rid)), "queued"
            handle(_Task("parse", rid, host.parse_s))
        elif t_engine <= t_host:
            d, _, start = running
            running = None
            sched.complete(d, t, t - start)  # its wall time, as the live server measures
            for r in d.requests:
                batch_end[r.id], tiers_used[r.id], states[r.id] = t, d.tier, "served"
            batches, rows_run = batches + 1, rows_run + d.rows
            # (a whole-run average; the server's is an EWMA over recent windows)
            sched.host_s = host.parse_s + host.answer_s + host.batch_s * batches / rows_run
            # The loop settles it (and launches the next) in turn, whatever that costs: the
            # server's completion callback waits behind the loop's queued work too.
            settling = d
            handle(_Task("settle", -1, host.batch_s))
        else:
            task = work.popleft()
            if work:
                work[0].began = t
            if task.kind == "parse":
                planned = budget[task.rid] - budget_margin_s
                began, grace = t, 0.0
                if plan_overhead:  # as server.dataplane plans it
                    reserve, grace = overhead.reserve()
                    planned, began = planned - reserve, task.began
                r = Request(task.rid, t, began + planned, grace=grace)
                try:
                    sched.submit(r, t)
                except Refused as exc:
                    states[task.rid] = exc.state.name.lower()
                    handle(_Task("refuse", task.rid, refuse_s))
            elif task.kind == "settle":
                for r in settling.requests:
                    handle(_Task("answer", r.id, host.answer_s))
                settling = None
            elif task.kind == "answer":
                overhead.observe(t - batch_end[task.rid], alone=bool(alone[task.rid]))
                answered(task.rid, t)
            else:
                answered(task.rid, t)
        for r in sched.expire(t):
            states[r.id] = "expired"
            handle(_Task("refuse", r.id, refuse_s))
        if running is None and settling is None and (d := sched.next(t)) is not None:
            running = [d, engine.draw_s(d.tier, d.rows), t]
            if d.rows == 1:  # as server.dataplane tells the overhead's quiet answers
                alone[d.requests[0].id] = t - d.requests[0].arrival < QUIET_QUEUE_S
    return _result(send, received, budget, tiers_used, states, widths, batches)


def _result(send, received, budget, tiers_used, states, widths, batches) -> SharedCoreResult:
    sent = ~np.isnan(send)
    served = np.array([s == "served" for s in states], dtype=bool) & ~np.isnan(received)
    latency = np.where(served, (received - send) * 1e3, np.nan)
    met = served & (latency <= budget * 1e3 + 1e-9)
    n = int(sent.sum())
    span = float(np.nanmax(received) - np.nanmin(send)) if n else 0.0
    mix = Counter(t for t, ok in zip(tiers_used, served, strict=True) if ok)
    lat = latency[served]
    summary = {
        "sent": n,
        "within_budget": int(met.sum()),
        "late": int((served & ~met).sum()),
        "refused_total": int((sent & ~served).sum()),
        "slo_attainment": float(met.sum() / n) if n else 1.0,
        "batches": batches,
        "rows_per_batch": float(served.sum() / batches) if batches else None,
        "span_s": span,  # first send to last answer (refusals' included)
        "goodput_per_s": float(met.sum() / span) if span else 0.0,
        "p50_latency_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_latency_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "tier_mix": {k: v / max(int(served.sum()), 1) for k, v in sorted(mix.items())},
        "refused": dict(
            Counter(s for s, ok in zip(states, sent, strict=True) if ok and s != "served")
        ),
        "mean_served_size": (
            float(np.mean([widths[t] for t in mix.elements()])) if widths and mix else None
        ),
    }
    return SharedCoreResult(summary, send, latency, tiers_used, states)
