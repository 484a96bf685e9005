"""One served model: its engines, its scheduler, and the asyncio loop that executes batches.

The scheduler (pure) decides; this module does the I/O around it. On every arrival and
completion it asks the scheduler for work at once (``_pump``, synchronous: no task to wake),
concatenates the chosen requests' rows into one batch and hands it to an engine thread
(ONNX Runtime and TensorRT release the GIL). The thread runs the engine and schedules one
callback on the loop (``_finish``), which splits the outputs per request, resolves each
request's future exactly once and pumps again. So a request costs one hop into the engine
thread and one back - the event loop's own handoffs (a dispatcher task woken by an event,
a task per batch, an executor future chained to an asyncio future) are gone: at one
client on the MLP they cost more than the rest of the server's Python.

The scheduler's ``Request`` knows nothing of asyncio: the future a caller awaits lives in a
``Pending`` beside it, found by request id.

A model with a sequence axis (a transformer) has one scheduler - a *lane* - per profiled
length: a request joins the lane of the shortest length that holds it, is planned with that
length's latency tables, and is batched only with requests of its lane (padded with zeros
to the longest of the batch: at most the lane's length; for an engine that prefers fixed
lengths, a text model's batch to the lane's length). The lanes share one device
(``server.scheduling.device``: the server's, or the model's own with ``instances`` slots),
which runs the most urgent head first across lanes and makes each lane plan behind the
others' backlog. So a short sentence is never planned as a 256-token one, nor a long one
as a short one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.engines import EngineError
from runtime.repository import ServedModel
from server.apart import Apart, listed, nonfinite, output_problem, run_apart
from server.engine_threads import EngineThreads
from server.equal_lengths import EqualLengthRuns, equal_length_runs, length_key
from server.errors import (
    DeadlineExceeded,
    EngineFailed,
    FailedPrecondition,
    InferError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    UnknownTier,
)
from server.gc_pause import gc_cpu_s
from server.gpu_load import gpu_index
from server.host_cpu import HostCpu, available_cpus
from server.limits import clip
from server.log_throttle import LogThrottle
from server.loop_idle import IdleWatch, idle_watch
from server.metrics import MISS_REASONS, Metrics
from server.overhead import MIN_SAMPLES as OVERHEAD_MIN_SAMPLES
from server.overhead import QUANTILE as OVERHEAD_QUANTILE
from server.overhead import Overhead
from server.parameters import cancel_at_deadline
from server.scheduling import (
    Decision,
    InvalidRequest,
    Refused,
    Request,
    Scheduler,
    State,
    TierInfo,
    best_in_budget,
    make_policy,
    nominal_tier,
)
from server.scheduling.device import Device, Instances
from server.scheduling.latency import (
    DEFAULT_SLO_TARGET,
    LatencyModel,
    dominated,
    slower_than_more_accurate,
    tiers_from_profile,
)
from server.scheduling.lengths import LengthSpan
from server.tokenizer_pace import TokenizerPace
from server.traffic import TrafficLog

# Backends whose engines run on the CPU and may be called from any thread, so a short batch
# may run on the event loop's (ModelRuntime._may_run_inline): ONNX Runtime's CPU session,
# and the test backend that stands in for it. CUDA/TensorRT engines keep their own threads.
INLINE_BACKENDS = ("onnxruntime", "fake")
# Backends whose engines compute on the calling thread (ONNX Runtime's CPU session: its
# intra-op pool works beside it), so a timing at load that got less than BUSY_CPU_SHARE of
# that thread's CPU per second of wall time ran on a busy machine (ModelRuntime.warm_up).
CPU_TIMED_BACKENDS = ("onnxruntime",)
BUSY_CPU_SHARE = 0.6
# Of the last INLINE_WINDOW arrivals, how many must have found the model empty and the loop
# idle for a batch to run inline (ModelRuntime._may_run_inline). Not all: at one client a
# fast client's next request is sometimes there before the loop gets back to waiting (a
# quarter of them, MLP over loopback gRPC); at saturation almost none.
INLINE_WINDOW = 8
INLINE_MIN_ALONE = 4
# An inline run longer than this many times inline_max_s (and INLINE_OVERRUN_MIN_S) held
# the loop - every model's requests, health, model control, stuck detection - that long:
# its tier runs on the engine threads from then on (a batch slow on some inputs, or hung,
# froze the whole server for its 20 s; review helper-267).
INLINE_OVERRUN = 5.0
INLINE_OVERRUN_MIN_S = 0.050
_WINDOW_MASK = (1 << INLINE_WINDOW) - 1
log = logging.getLogger("innfer.model")
# A batch running this many times its planned latency, and at least this long, is taken for
# a hung engine (ModelRuntime.stuck): far beyond any slowdown the online correction follows.
STUCK_FACTOR = 100.0
STUCK_MIN_S = 30.0

# An absolute path in an engine's message (its build tree, a model file): not the client's.
_PATH = re.compile(r"(?:/[\w.+-]+){2,}")


# ONNX Runtime's words for an index outside a table (Gather / GatherElements / ScatterND):
# the request's own values, read through ops the build could not follow to the table.
_OUT_OF_TABLE = re.compile(r"out of (?:data )?bounds|must be within the inclusive range")


def engine_failed(model: str, tier: str, exc: BaseException) -> InferError:
    """What a client is told when the engine raised on its batch: model, tier and the
    engine's reason (first line, paths left out, clipped), not "see logs" - the reason is
    often the client's own input (an index outside an embedding table).

    Example:
        >>> str(engine_failed("m", "w100", RuntimeError("idx=100 out of range\\n at /a/b/c.cc")))
        'model m tier w100: inference failed: RuntimeError: idx=100 out of range'
    """
    first = (str(exc).strip().splitlines() or [""])[0]
    reason = _PATH.sub("<path>", first)[:300]
    if _OUT_OF_TABLE.search(first):  # the client's values (ids[:, 1] past its table)
        return InvalidArgument(
            f"model {model} tier {tier}: a value of the request indexes past a table the "
            f"model reads ({reason}); send ids within the model's tables"
        )
    return EngineFailed(f"model {model} tier {tier}: inference failed: "
                        f"{type(exc).__name__}: {reason}".rstrip(": "))  # fmt: skip


# stop(): how long queued requests may still be served before they are failed with
# UNAVAILABLE. Short: on a reload the new engines are already serving, and a client retry
# (UNAVAILABLE is retryable) is faster than waiting behind a queue that is going away.
DRAIN_S = 0.5
# The expiry timer (``_arm_expiry``) fires no sooner than this after it is armed: a queued
# request inside its grace past the deadline is looked at again this often, not at once.
EXPIRY_STEP_S = 0.002
# stop(): how long a running batch may take to finish before its engines are closed anyway
# (an engine call cannot be interrupted; closing under it would crash the worker).
RUNNING_WAIT_S = 10.0
# warm_up(profile=True): timed batches per tier and size at load, and the time cap per tier.
# Five pairs move the correction most of the way (EWMA, alpha 0.3) for a second or so.
PROFILE_RUNS = 5
SPEED_MIN_BATCHES = 8  # a tier's factor counts in engine_speed after this many batches
PROFILE_BUDGET_S = 1.0
# warm_up: the longest a model's engines spend running every batch size once at load where
# a new shape is slow (CUDA graph captures: tens of ms each; max_batch 64 x 4 lanes x 4
# tiers is 1,024 of them). Past it, the shapes left are captured on first use, said once.
SHAPES_BUDGET_S = 60.0


@dataclass
class InferResult:
    outputs: dict[str, np.ndarray]
    tier: str
    width: float | str
    queue_us: int
    compute_us: int
    batch_size: int
    lane: int = 0  # the sequence length it was planned at (0: fixed shapes)


@dataclass
class Duration:
    """A count and the total time it took, in nanoseconds (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, int(seconds * 1e9))


@dataclass
class BatchStats:
    """One batch size's executions: each phase counted once per execution."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """Triton's ModelStatistics counters, as perf_analyzer reads them.

    ``inference_count`` counts the rows of answered requests (each element of a batched
    request is one inference), ``execution_count`` engine runs (one per batch). Per request:
    ``success`` (arrival to answer), ``fail`` (the data plane's: from the model's lookup to
    the error, every error once), ``queue`` (arrival to its batch's start) and the three
    compute phases of the batch it ran in (concatenating the inputs and handing them to an
    engine thread - under load mostly the thread's wait for the event loop to yield
    Python's GIL (review helper-274: 5.3 ms of a 5.5 ms compute_input) - the engine,
    splitting the outputs). ``batches`` holds per-execution phases keyed by the batch's rows.

    Example:
        >>> s = ModelStats()
        >>> s.record_batch(rows=3, requests=2, compute=(1e-6, 2e-3, 1e-6))
        >>> s.record_request(0.001, 0.004, rows=2); s.record_request(0.001, 0.004, rows=1)
        >>> s.inference_count, s.execution_count, s.compute_infer.count
        (3, 1, 2)
        >>> s.batches[3].compute_infer
        Duration(count=1, ns=2000000)
    """

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def record_batch(self, rows: int, requests: int, compute: tuple[float, float, float]) -> None:
        """One execution of ``rows`` rows for ``requests`` requests; ``compute`` is its
        (input, infer, output) seconds. Queue and success are per request
        (``record_request``)."""
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1e3)
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = BatchStats()
        phases = (
            (self.compute_input, batch.compute_input),
            (self.compute_infer, batch.compute_infer),
            (self.compute_output, batch.compute_output),
        )
        for (per_request, per_batch), seconds in zip(phases, compute, strict=True):
            per_request.add(seconds * requests, requests)
            per_batch.add(seconds)

    def record_request(self, queued: float, total: float, rows: int = 1) -> None:
        """A request of ``rows`` rows answered: Triton's inference_count counts the rows of
        successful requests only (not those of one cancelled while its batch ran)."""
        self.inference_count += rows
        self.queue.add(queued)
        self.success.add(total)


@dataclass(eq=False)
class Pending:
    """A request admitted to the scheduler and the future its ``infer`` call awaits.

    Example:
        >>> async def demo():
        ...     p = Pending(Request(1, 0.0, 0.05), asyncio.get_running_loop().create_future())
        ...     p.fail(DeadlineExceeded("budget ran out"))
        ...     p.fail(RuntimeError("too late"))  # already answered: ignored
        ...     return type(p.future.exception()).__name__
        >>> asyncio.run(demo())
        'DeadlineExceeded'
    """

    request: Request
    future: asyncio.Future[InferResult]
    lane: int = 0  # the sequence length of the scheduler it queues in (0: fixed shapes)
    verdict: Verdict | None = None  # whether it met its budget: judged when it is sent

    def resolve(self, result: InferResult) -> None:
        if not self.future.done():  # the caller may have cancelled meanwhile
            self.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Verdict:
    """Whether a request met its budget, judged when its answer leaves rather than when its
    batch completes: a stream's answer can wait after it is made (in request order, behind
    slower answers read before it; or for a client that does not read), and the client hears
    it only then. Set ``VERDICT`` to one in the request's task before its ``infer``; the
    runtime counts such a request served but leaves met or late to ``sent`` (written) or
    ``dropped`` (never written: late only past its budget, as a cancelled request).

    Example:
        >>> v = Verdict()
        >>> token = VERDICT.set(v)  # doctest: +SKIP
        >>> resp = await plane.infer(request, None)  # doctest: +SKIP
        >>> v.sent()  # it was written now  # doctest: +SKIP
    """

    __slots__ = ("due", "runtime")

    def __init__(self) -> None:
        self.runtime: ModelRuntime | None = None  # set once its batch answered it
        self.due = 0.0

    def sent(self) -> None:
        if self.runtime is not None:
            self.runtime.judge(self.due, late_only=False)
            self.runtime = None

    def dropped(self) -> None:
        if self.runtime is not None:
            self.runtime.judge(self.due, late_only=True)
            self.runtime = None


# The Verdict of the request the current task serves (None: judged when its batch completes).
VERDICT: contextvars.ContextVar[Verdict | None] = contextvars.ContextVar(
    "innfer_verdict", default=None
)
# Whether the request the current task served was cancelled at its deadline (True) or by
# its client's choice (False), as ``count_cancel`` judged it (None: not cancelled): the
# gRPC code the call is counted with follows the same verdict (judged apart, from the
# call's deadline rather than the request's due time, the two disagreed in a band of a
# millisecond; review helper-302).
CANCEL_AT_DEADLINE: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "innfer_cancel_at_deadline", default=None
)


def tier_infos(served: ServedModel, length: int = 0) -> list[TierInfo]:
    """Tiers for the scheduler: measured accuracy where the build had an evaluation set,
    else the FLOPs fraction as a monotone proxy; latency from the profile (p90) - at
    sequence ``length`` for a model with a sequence axis."""
    profile = served.profile
    if profile is None or set(profile.get("tiers", {})) != set(served.tiers):
        raise Unavailable(
            f"model {served.name}: profile.json is missing, corrupted (the log says what is "
            "wrong) or does not cover every tier; "
            f"run `innfer build` to profile it"
        )
    if length:
        tables = profile.get("lengths", {}).get(str(length))
        if tables is None or set(tables) != set(served.tiers):
            raise Unavailable(
                f"model {served.name}: profile.json has no tables at sequence length {length} "
                f"for every tier (model.yaml lengths changed?); run `innfer build`"
            )
        profile = {"tiers": tables}
    _check_batches(served, profile["tiers"], length)
    return tiers_from_profile(profile, served.tiers)[0]


def _check_batches(served: ServedModel, tables: dict, length: int) -> None:
    """Every tier's table must reach max_batch: a profile kept from before max_batch was
    raised would fail the first larger batch inside the latency model (INTERNAL)."""
    want = served.config.max_batch
    for tier, table in tables.items():
        largest = max((int(b) for b in table), default=0)
        if largest < want:
            at = f" at sequence length {length}" if length else ""
            raise Unavailable(
                f"model {served.name}: profile.json times tier {tier}{at} up to batch "
                f"{largest}, but max_batch is {want} (model.yaml changed?); run `innfer build`"
            )


class _TimingAtLoad:
    """A latency model's planned times per tier (``planned(tier)[rows]``, seconds) as they
    stood when taken: what ``best_in_budget`` reads."""

    def __init__(self, latency: LatencyModel, tiers) -> None:
        self._planned = {t: tuple(latency.planned(t)) for t in tiers}

    def planned(self, tier: str) -> Sequence[float]:
        return self._planned[tier]

    def take(self, other: _TimingAtLoad) -> None:
        """``other``'s times for the tiers both hold (rows as far as both reach)."""
        for tier, mine in self._planned.items():
            theirs = other._planned.get(tier)
            if theirs is not None and len(theirs) == len(mine):
                self._planned[tier] = theirs


class _AtLength:
    """``timing``'s planned times for a text of ``length`` tokens: taken at the lane's own
    length (``_TimingAtLoad``), or at the length in force (``now``: the latency model
    itself), scaled by the profile's ratio between the two lengths."""

    def __init__(self, timing, latency: LatencyModel, length: int, now: bool) -> None:
        self._timing, self._latency, self._length, self._now = timing, latency, length, now

    def planned(self, tier: str) -> list[float]:
        f = self._latency.length_ratio(tier, self._length)
        if self._now:
            f /= self._latency.length_ratio(tier)
        return [v * f for v in self._timing.planned(tier)]


def _engines_own(exc: BaseException) -> bool:
    """Whether ``exc`` is an engine's failure rather than a bug in the caller: ONNX
    Runtime's exceptions derive from Exception alone."""
    own = ("onnxruntime", "tensorrt", "torch")
    return isinstance(exc, (EngineError, RuntimeError)) or type(exc).__module__.startswith(own)


def _instances(served: ServedModel) -> int:
    """model.yaml's ``instances``, or fewer where the engines run fewer batches at once
    (``Engine.concurrent_runs``: the torch backend's one module per tier): the plans
    counted a second batch running that waited for the first."""
    want = served.config.instances
    caps = [e.concurrent_runs for e in served.engines.values() if e.concurrent_runs]
    if not caps or min(caps) >= want:
        return want
    log.warning(
        "model %s: instances %d, but %s engines run %d batch(es) at a time each: planned "
        "with %d (run more replicas, or more models on the device, for more at once)",
        served.name, want, served.backend, min(caps), min(caps),
    )  # fmt: skip
    return min(caps)


def _stuck_after(planned: float) -> float:
    """Seconds a batch planned at ``planned`` s runs before it counts as stuck."""
    return max(STUCK_MIN_S, STUCK_FACTOR * planned)


class ModelRuntime:
    """Serves one model. ``clock`` is injectable for tests; it must be monotonic seconds."""

    def __init__(
        self,
        served: ServedModel,
        metrics: Metrics,
        policy: str = "innfer",
        clock: Callable[[], float] = time.monotonic,
        device: Device | None = None,
        inline_max_s: float = 0.0,
        overhead_quantile: float = OVERHEAD_QUANTILE,
        traffic: TrafficLog | None = None,
        host_cpu: HostCpu | None = None,
        margin_s: float = 0.0,
        engine_nice: int = 0,
    ) -> None:
        self.served = served
        # The server's budget margin, taken off each budget before infer(): the traffic log
        # records the client's own budget (the replay takes the margin off again itself).
        self.margin_s = margin_s
        # The process's CPU per row and per batch outside the engines, shared by every
        # model: fed here, handed to the planner (Scheduler.host_s, batch_host_s) before
        # each decision after it changed (_sync_host). None: not measured (tests, tools).
        self.host_cpu = host_cpu
        self._host_version = -1  # the HostCpu.version this runtime's lanes were given
        self.traffic = traffic  # auto-tiering's record of what was asked (kept across reloads)
        self.name = served.name
        self.config = served.config
        self.input_rows = served.input_rows  # checked per request (dataplane._decode)
        # Per-row output shapes (-1: varies) every engine call's outputs are checked against
        self._output_shapes = {s.name: s.shape for s in self.config.outputs}
        # A sequence model without a mask (text:, or mask_input): its requests are batched
        # only with requests of their lengths (server.equal_lengths); {}: every batch is
        # padded to its longest and run whole.
        self._unmasked = (
            {s.name: s.dynamic for s in self.config.inputs if s.dynamic}
            if self.config.text is None and self.config.mask_input is None
            else {}
        )
        self.metrics = metrics
        self.clock = clock
        self._log_throttle = LogThrottle()
        lengths = self.config.sequence_lengths or (0,)
        infos = {n: tier_infos(served, n) for n in lengths}  # per lane (length)
        self.tiers = infos[lengths[-1]]
        self.top_tier = max(self.tiers, key=lambda t: t.accuracy).name
        self.accuracy = {t.name: t.accuracy for t in self.tiers}
        self._ranked = sorted(self.accuracy, key=self.accuracy.__getitem__, reverse=True)
        # lane's latency model (id) -> its planned times as the load's timing left them
        # (``warm_up``): what the degraded count judges a budget by
        self._idle_timing: dict[int, _TimingAtLoad] = {}
        beaten = dominated(self.tiers)
        for slow, fast in beaten.items():
            log.warning(
                "model %s: tier %s is slower than the more accurate %s at every profiled "
                "batch size (profile.json): requests run on it only when they pin it (or a "
                "fixed policy names it): re-profile on a quiet machine (`innfer build` of the "
                "repository - a profile timed beside other work often says this), or drop it "
                "from model.yaml",
                self.name, slow, fast,
            )  # fmt: skip
        for slow, fast, sizes in slower_than_more_accurate(self.tiers):
            # An auto-tiering set may hold such a tier on purpose: the fastest at one row
            # (sim.tiering keeps it where the traffic runs one row at a time), replayed
            # against this very order - and model.yaml is not where it came from.
            if slow in beaten or served.tier_source == "frontier":
                continue
            log.warning(
                "model %s: tier %s is slower than the more accurate %s at batch %s "
                "(profile.json); the scheduler counts a request's least accurate tier as its "
                "fastest, so it may refuse work %s could serve: re-profile on a quiet machine "
                "(`innfer build` of the repository - a profile timed beside other work often "
                "says this), or drop %s from model.yaml",
                self.name, slow, fast, sizes, fast, slow,
            )  # fmt: skip
        instances = _instances(served)
        if device is None and len(lengths) > 1:
            device = Device(instances, name=f"{self.name}-lanes")  # the lanes share slots
            self._own_device = True
        else:
            self._own_device = False
        self.device = device  # shared with the other models (dataplane); None: own slots
        # The batches this model can have running at once: its instances, on a shared
        # device no more than the device's slots.
        slots = min(instances, device.slots) if device is not None else instances
        if device is not None and device.slots < instances:  # (review 188: capped unsaid)
            log.warning(
                "model %s: instances %d, but the device runs %d batch(es) at once "
                "(device_slots %d in the server config): it runs %d; raise device_slots, "
                "or set it to 0 for a private set of slots per model",
                self.name, self.config.instances, device.slots, device.slots, slots,
            )  # fmt: skip
        self._slot_count = slots  # (a request is refused at once when every one is stuck)
        limit = Instances(slots)  # over all the lanes: a lane alone must not take them all
        try:
            policies = {n: make_policy(policy, infos[n], slots) for n in lengths}
        except ValueError as exc:  # fixed:<tier> naming a tier this set lacks
            raise FailedPrecondition(
                f"the server's policy {policy!r} does not fit its tiers "
                f"({', '.join(t.name for t in self.tiers)}): {exc}; use policy innfer or "
                "slackfit and pin a tier per request (parameter tier)"
            ) from None
        # Below it (or below a request's own pin) a request is degraded: a choice made by
        # the operator or the client must not read as load.
        self.nominal_tier = nominal_tier(policies[lengths[-1]], self.tiers)
        # Where a request's sequence length is read: (input, axis incl. batch); None when
        # the model has fixed shapes.
        seq = next((t for t in self.config.inputs if t.dynamic), None)
        self._seq_axis = (seq.name, 1 + seq.dynamic[0]) if seq is not None else None
        # Below request handling where both compute on the host's CPUs (engine_threads.py).
        nice = engine_nice if gpu_index(served) is None else 0
        self.pool = EngineThreads(slots, f"engine-{self.name}", nice=nice)
        # A batch planned at most this long may run on the loop thread when nothing else is
        # in flight (``_may_run_inline``).
        self.inline_max_s = inline_max_s if served.backend in INLINE_BACKENDS else 0.0
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: IdleWatch | None = None  # the loop's waits for I/O (start() binds it)
        self._idle_mark = -1  # its count when the last batch was launched
        # The last INLINE_WINDOW arrivals, newest in bit 0: 1 where it found the model empty
        # and the loop idle since the last launch.
        self._alone_bits = 0
        self._not_inline: set[str] = set()  # tiers an inline run overran (INLINE_OVERRUN)
        # Inline runs' results, each ``_finish``'s arguments, answered at the end of the
        # pump that ran them (``_finish_inline``), and the loop turn the last one ran in.
        self._inline_done: list[tuple] = []
        self._inline_turn = -1
        self._running = 0  # batches handed to an engine thread and not yet finished
        # Each running batch's start and planned seconds (id(decision) -> (clock, s)): one
        # far past its plan is an engine that hung (readiness, ``stuck``).
        self._batch_started: dict[int, tuple[float, float, str]] = {}
        # Batches running as runs of equal length (server.equal_lengths), by id(decision):
        # the scheduler learns their calls' times one by one.
        self._runs: dict[int, EqualLengthRuns] = {}
        self._all_done: asyncio.Event | None = None  # set while _running == 0
        self._pending: dict[int, Pending] = {}  # request id -> its caller's future
        self.stopping = False  # set by stop(): no new requests; the queue drains or fails
        self.inflight = 0
        # Runtimes of this model this one replaced, still draining (the data plane keeps the
        # list): their queued and in-flight requests count in this one's gauges.
        self.predecessors: list[ModelRuntime] = []
        self.stats = ModelStats()  # Triton's ModelStatistics (server.service reports it)
        # Time outside queue + compute, learned from answers - per lane: a text model's long
        # texts (tokenizing 10k characters) must not shrink every short sentence's budget
        # (demo MiniLM: a 7.2 ms reserve became 11.9 ms after 8 of them). ``overhead`` is
        # the longest lane's (the only one of a fixed-shape model).
        self.overheads = {n: Overhead(quantile=overhead_quantile) for n in lengths}
        self.overhead = self.overheads[lengths[-1]]
        self._bound: list[tuple] = []  # (gauge, labels) of each scrape-time series bound here
        self._bind_metrics()
        # A text model whose batches are padded to their longest text plans each lane by
        # tokens (server.scheduling.lengths: a text alone at its own, the queue at the mean
        # of the texts it holds), between its length and the next shorter one's;
        # Request.length is then each text's tokens (0: planned at the lane's).
        self._by_length = (
            len(lengths) > 1
            and not self._unmasked
            and not any(e.prefers_fixed_lengths for e in self.served.engines.values())
        )
        spans = dict.fromkeys(lengths)
        if self._by_length:
            for lo, hi in itertools.pairwise(lengths):
                spans[hi] = LengthSpan(lo, hi, infos[lo])
        slo_target = self.config.slo_target or DEFAULT_SLO_TARGET
        # Last: each lane joins the device as it is made (Scheduler). One that fails (a
        # length's profile table that does not parse) takes the lanes made before it off
        # the device again - else a runtime that never existed would stay a member for good.
        try:
            self.lanes = {
                n: Scheduler(
                    infos[n],
                    policies[n],
                    latency=LatencyModel(infos[n], slo_target=slo_target, span=spans[n]),
                    max_batch=self.config.max_batch,
                    max_queue=self.config.max_queue,
                    slots=instances if device is None else device.slots,
                    slo_target=self.config.slo_target,
                    admit_quantile=self.config.admit_quantile,
                    device=device,
                    instances=limit,
                )
                for n in lengths
            }
        except BaseException:
            if device is not None:
                for lane in list(limit.members):
                    device.leave(lane)
            raise
        self.scheduler = self.lanes[lengths[-1]]  # the longest lane: slots, load timing
        self._lane_length = {id(s): n for n, s in self.lanes.items()}  # 0: fixed shapes
        self._expiry: asyncio.TimerHandle | None = None  # _arm_expiry's, due at _expiry_at
        self._expiry_at = math.inf
        self._said_stuck: set[int] = set()  # batches (id of the decision) logged as stuck
        self._expired_cancelled: set[int] = set()  # ids expired before their cancel counted
        # Why the device's slots are held, over every model on it (the data plane's; None:
        # this model's own): a request that expires behind another model's hung batch says so.
        self.device_stuck: Callable[[], str | None] | None = None
        # Stuck batches of runtimes of this model a reload retired with their engine hung
        # (the data plane's): still this model's, on its gauge.
        self.retired_stuck: Callable[[], int] = lambda: 0
        # Whether its short texts are tokenized on the loop (DataPlane._tokenize).
        self.tokenizer_pace = TokenizerPace()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = idle_watch(self._loop)
        self._all_done = asyncio.Event()
        self._all_done.set()
        if self.device is not None:
            # Another model (or lane) freed a device slot: look again - on the next loop
            # turn, not inside that model's completion (its scheduler is mid-update there).
            for lane in self.lanes.values():
                self.device.join(lane, on_release=lambda: self._loop.call_soon(self._pump))
        self._gauges()

    async def stop(self, drain_s: float | None = DRAIN_S) -> int:
        """Stop serving: refuse new requests, serve the queue for up to ``drain_s``, fail
        what is left with UNAVAILABLE, wait for running batches, then close the engines.
        ``drain_s=None`` (a tier swap: another runtime already takes the new requests)
        serves the whole queue: every queued request runs or expires by its own deadline,
        so none is failed.

        Every request admitted here is answered exactly once, within
        ``drain_s`` (or the latest queued deadline) + the running batch. Returns how many
        queued requests were failed. A batch still running after ``RUNNING_WAIT_S`` (an
        engine call that hangs) is not waited for: it is logged, and the engines close
        when it returns (its requests are answered then, or by their clients' deadlines).
        The ``innfer_model_ready`` gauge belongs to the data plane, which knows whether a
        new runtime has replaced this one.
        """
        self.stopping = True
        await self._drain(drain_s)
        self._leave_device()
        failed = self._fail_queued()
        await self._wait_running()
        if self._expiry is not None:  # nothing is queued any more: no expiry to look for
            self._expiry.cancel()
            self._expiry = None
        closed = self._close_in_thread()
        if self._running:
            # An engine call that does not return (a hung GPU, a deadlocked library) cannot
            # be interrupted, and closing its engine under it could crash the process: the
            # engines close once it returns (never, if the process exits first), and no
            # reload, unload or shutdown waits for it any longer.
            log.error(
                "model %s: an engine call has not returned %.0f s after the model stopped "
                "(%s); its engines close when it does", self.name, RUNNING_WAIT_S,
                "; ".join(self.running_batches()),
            )  # fmt: skip
            return failed
        await closed
        return failed

    async def _drain(self, drain_s: float | None) -> None:
        """Serve the queue for up to ``drain_s`` (None: until each queued request has run or
        expired by its own deadline)."""
        if drain_s is None:
            latest = max((p.request.deadline for p in self._pending.values()), default=0.0)
            deadline = max(latest, self.clock()) + DRAIN_S
        else:
            deadline = self.clock() + drain_s
        # On a shared device the model stays a member while it drains (``stop`` leaves
        # after): its queue is claimed in urgency order with the others'. Left first, a busy
        # neighbour's completions took every freed slot and this queue was failed at the
        # drain's end, with work of a millisecond due before the neighbour's (helper-275).
        while self._pending and self.clock() < deadline:
            await asyncio.sleep(0.005)
            # Nothing arrives here to pump: expire what can no longer run (a release wakes
            # it for a freed slot; the poll also covers a model with its own slots).
            self._pump()
        self.flush()

    def _fail_queued(self) -> int:
        """Fail every request still queued with UNAVAILABLE (retryable); how many."""
        failed = 0
        for pending in list(self._pending.values()):
            if pending.future.done():  # cancelled by its client meanwhile: counted then
                continue
            if self.lanes[pending.lane].cancel(pending.request, self.clock()):
                failed += 1
                self.metrics.requests.labels(self.name, "", "unavailable").inc()
                self._missed["unavailable"].inc()
                self._queue_total.inc(self.clock() - pending.request.arrival)
                pending.fail(Unavailable(
                    f"model {self.name} was unloaded or reloaded before this request ran; retry"
                ))  # fmt: skip
        return failed

    async def _wait_running(self) -> None:
        """Let the batches already on an engine answer their requests, for up to
        ``RUNNING_WAIT_S``, and settle their bookkeeping before the engines close."""
        if self._all_done is not None and self._running:
            # (asyncio's own TimeoutError: another class before Python 3.11)
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._all_done.wait(), RUNNING_WAIT_S)
        self.flush()

    def running_batches(self) -> list[str]:
        """The batches on an engine now, as the log names them (tier, rows, for how long)."""
        self.flush()  # a batch answered already is settled, not running
        now = self.clock()
        return [
            f"tier {d.tier}, {d.rows} rows, running for {now - started:.1f} s"
            for lane in self.lanes.values()
            for d, started in lane.running.values()
        ]

    def flush(self) -> None:
        """Run the loop's deferred bookkeeping (``_settle``) now: call before reading what
        it updates - ``stats``, the scheduler's state, the metrics - from the loop thread."""
        if self._idle is not None:
            self._idle.flush()

    def _leave_device(self) -> None:
        if self.device is not None and not self._own_device:
            for lane in self.lanes.values():
                self.device.leave(lane)

    def abandon(self) -> None:
        """Undo a runtime that never started (its warm-up failed): take its lanes off the
        shared device (they joined it when made) and close its engines."""
        self._leave_device()
        self._close_engines()

    def _close_in_thread(self) -> asyncio.Future:
        """Close the engines on a thread of their own, once the engine threads have ended;
        the future is done when they are closed. Not the loop's default executor: repository
        loads run there, and a close waiting for a stuck batch must not hold one up."""
        loop = asyncio.get_running_loop()
        closed = loop.create_future()

        def done() -> None:
            if not closed.done():
                closed.set_result(None)

        def close() -> None:
            try:
                self._close_engines()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone (process exit)
                    loop.call_soon_threadsafe(done)

        threading.Thread(target=close, name=f"close-{self.name}", daemon=True).start()
        return closed

    def _close_engines(self) -> None:
        """After the batches on the engine threads (every one submitted runs): close every
        engine."""
        self.pool.shutdown()
        self.pool.join()
        for tier, engine in self.served.engines.items():
            try:
                engine.close()
            except Exception:  # one engine's failure must not keep the others open
                log.exception("model %s tier %s: closing the engine failed", self.name, tier)

    def warm_up(self, profile: bool = False, contended: bool = False) -> dict[str, float]:
        """Run every tier once so the first request does not pay for lazy initialisation
        (every batch size at every lane's length for an engine whose first run of a shape
        is slow: ``Engine.slow_first_shapes``, a torch CUDA engine's graph captures); with
        ``profile``, then time each tier briefly here (``PROFILE_RUNS`` batches of 1 and of
        ``max_batch`` rows, at most ``PROFILE_BUDGET_S`` per tier) and feed the
        times to the latency model - the online correction starts from this machine, now,
        not from whatever the build machine was doing. ``contended``: the timing shares the
        CPU with requests being served (a reload under load): it may then show that the
        profile is too slow, never that it is too fast - a tier it finds slower starts from
        its profile, and its own batches correct it - and it times batch 1 only. (Live, a
        swap of tiers under load measured them 1.5-2.8x their profile, and the new set
        planned as if that were so: 77 vs 92 % within budget, bench/auto_tiers_live.py.)
        Returns tier -> latency factor."""
        from runtime.repository.profile import random_feeds

        # Batch 1 and max_batch on every tier, timed or not: a graph whose batch is fixed
        # (a Reshape to a constant shape) failed the whole model at load with profiling
        # and was served batch by batch apart without it (review 188). The timing below
        # runs max_batch itself (run here as well, it took the ResNet-18-like w50's load
        # from 1.37 to 1.58 s, bench/load_time.py); not while serving (a swap: innfer's own
        # exports, and full batches cost the requests; see below).
        first = [1] if contended or profile else sorted({1, self.config.max_batch})
        for tier, engine in self.served.engines.items():
            for b in first:
                self._warm_run(tier, engine, random_feeds(self.config.inputs, b), b)
        self._warm_shapes(random_feeds)
        if not profile:
            self._remember_idle_timing()
            return {}
        # Contended, batch 1 alone: the timing can only lower a tier's level (one factor
        # per tier), which batch 1 shows as well. Full batches of four ResNet tiers take
        # 1.1 s of a quiet core (batch 1: 0.16 s), taken from serving during a swap; live,
        # attainment was 87-93 % in the 5 s after each swap (bench/auto_tiers_live.py).
        sizes = [1] if contended else sorted({1, self.config.max_batch})
        wall = cpu = 0.0  # the timing's, for a busy machine (below)
        for n, lane in self.lanes.items():
            feeds = {b: random_feeds(self.config.inputs, b, length=n or 1) for b in sizes}
            for tier, engine in self.served.engines.items():
                spent = 0.0
                for _ in range(PROFILE_RUNS):
                    for b in sizes:
                        t0, c0 = time.perf_counter(), time.thread_time()
                        self._warm_run(tier, engine, feeds[b], b)
                        took = time.perf_counter() - t0
                        cpu += time.thread_time() - c0
                        lane.latency.observe(tier, b, took)
                        spent += took
                    if spent > PROFILE_BUDGET_S / len(self.lanes):
                        break
                wall += spent
        # A CPU engine works on the calling thread: timed on a machine whose cores other
        # processes hold, its runs take wall time without CPU. Kept as home, such a timing
        # planned the accurate tiers past every budget for good - they never ran, so
        # nothing corrected them (0 of 1,165 requests on w100 at a 3x timing; review
        # helper-287) - so it is taken as a timing beside traffic is (``contended``).
        # (not where the engine's own pool outnumbers the CPUs this process may use: it
        # starves the calling thread itself - 4 threads on 2 cores read 26 %; helper-291)
        stolen = (
            self.served.backend in CPU_TIMED_BACKENDS
            and self.config.threads <= available_cpus()
            and cpu < BUSY_CPU_SHARE * wall
        )
        latency = self.scheduler.latency
        factors = {t: latency.tier_estimate(t).factor for t in self.served.engines}
        log.info("model %s measured at load%s: latency / profile.json %s", self.name,
                 " while serving" if contended else
                 f" on a busy machine (the timing had {cpu / wall:.0%} of a core; a tier "
                 "found slower starts from its profile)" if stolen else "",
                 {t: round(f, 2) for t, f in factors.items()})  # fmt: skip
        if contended or stolen:
            for lane in self.lanes.values():
                for tier in self.served.engines:
                    if lane.latency.tier_estimate(tier).factor > 1.0:
                        lane.latency.forget(tier, 0.0)
            factors = {t: latency.tier_estimate(t).factor for t in self.served.engines}
        self._remember_idle_timing()
        return factors

    def _remember_idle_timing(self) -> None:
        """Keep each lane's planned times as the load's timing left them - this machine,
        idle (or the profile's, contended or untimed) - for the degraded count
        (``_best_in_budget``)."""
        self._idle_timing = {
            id(lane.latency): _TimingAtLoad(lane.latency, self.served.engines)
            for lane in self.lanes.values()
        }
        for lane in self.lanes.values():  # where an unused tier's level returns to, idle
            lane.latency.settle()

    def inherit_idle_timing(self, old: ModelRuntime) -> None:
        """Take ``old``'s idle times for the tiers both serve, lane by lane: a load timed
        while serving (a reload, a swap) keeps the profile's times, and on a machine slower
        than the build's an idle replica counted every request whose budget fit the profile
        but not this machine as degraded (review 193)."""
        for n, lane in self.lanes.items():
            mine = self._idle_timing.get(id(lane.latency))
            theirs = old._idle_timing.get(id(old.lanes[n].latency)) if n in old.lanes else None
            if mine is not None and theirs is not None:
                mine.take(theirs)
                lane.latency.settle_as(old.lanes[n].latency)

    def _warm_run(self, tier: str, engine, feeds: dict, batch: int) -> None:
        """Run ``engine`` on ``feeds`` (``batch`` rows) at load; an engine's failure (an
        EngineError or RuntimeError, or an exception of ONNX Runtime's, TensorRT's or
        torch's own) names the tier and the batch, and where only batches fail, the fix.
        Anything else is a bug and keeps its type and traceback."""
        try:
            engine.run(feeds)
        except Exception as exc:
            if not _engines_own(exc):
                raise
            said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if batch == 1:
                raise EngineError(f"tier {tier} fails at batch 1: {said}") from exc
            if "shape" not in said.lower():  # (out of memory, ...): the engine's words first
                raise FailedPrecondition(
                    f"tier {tier} runs batch 1 but fails at batch {batch} (max_batch): "
                    f"{said[:300]}; lower max_batch, or serve it where that batch fits"
                ) from exc
            raise FailedPrecondition(  # the fix first: ORT's own text runs long
                f"tier {tier} runs batch 1 but fails at batch {batch} (max_batch): an ONNX "
                "graph whose batch is fixed (a Reshape to a constant shape) runs one row at a "
                "time; export it with a dynamic batch axis, or set max_batch: 1 (the engine "
                f"said: {said[:200]})"
            ) from exc

    def _warm_shapes(self, random_feeds) -> None:
        """Run every batch size at every lane's length once on each engine whose first run
        of a shape is slow (``Engine.slow_first_shapes``) - also contended: a capture under
        load costs more - within ``SHAPES_BUDGET_S``; logs what it ran and how long."""
        slow = {t: e for t, e in self.served.engines.items() if e.slow_first_shapes}
        if not slow:
            return
        shapes = [(n or 1, b) for n in self.lanes for b in range(1, self.config.max_batch + 1)]
        t0, ran = time.perf_counter(), 0
        for engine in slow.values():
            for length, batch in shapes:
                if time.perf_counter() - t0 > SHAPES_BUDGET_S:
                    log.warning(
                        "model %s: ran %d of %d engine shapes at load in %.0f s (each a CUDA "
                        "graph capture); the rest capture on first use, delaying those "
                        "batches (lower max_batch, or fewer lengths, to fit them all)",
                        self.name, ran, len(slow) * len(shapes), time.perf_counter() - t0,
                    )  # fmt: skip
                    return
                engine.run(random_feeds(self.config.inputs, batch, length=length))
                ran += 1
        log.info("model %s: ran every batch size and length once on tiers %s at load (%d "
                 "shapes, %.1f s)", self.name, ", ".join(slow), ran,
                 time.perf_counter() - t0)  # fmt: skip

    def assume_speed(self, speed: float) -> list[str]:
        """Start every tier whose timing at load did not find it faster than its profile
        from ``speed`` x its profile (only ``speed`` > 1: assuming slower engines costs
        served size until corrected, assuming faster ones costs deadlines). A runtime that
        replaces one serving under load (a swap of tiers) takes the old one's
        ``engine_speed``: the engines run as slowly beside this traffic whatever the set,
        and a fresh runtime planned each new tier at its quiet profile until its own
        batches corrected it (live, 87-93 % within budget in the 5 s after a swap).
        Returns the tiers changed."""
        if not speed > 1.0:
            return []
        changed = []
        for lane in self.lanes.values():
            for tier in self.served.engines:
                if lane.latency.tier_estimate(tier).factor >= 1.0:
                    lane.latency.start_from(tier, speed)
                    changed.append(tier)
        return sorted(set(changed))

    def engine_speed(self, min_batches: int = SPEED_MIN_BATCHES) -> float:
        """Live engine time / profiled, the median over tiers that ran at least
        ``min_batches`` batches (1.0 where none has): how much slower or faster this
        machine runs now than the profiles say - auto-tiering's choice scales its
        candidates' times by it (``sim.live_host``)."""
        self.flush()  # the latency model as of the last answered batch
        seen = self._seen_tiers(min_batches)
        factors = [self.latency_of(t).tier_estimate(t).factor for t in seen]
        return float(np.median(factors)) if seen else 1.0

    def engine_spread(self, min_batches: int = SPEED_MIN_BATCHES) -> float | None:
        """The log-normal sigma of one batch's time as the latency model has learned it
        here (at batch 1), the median over tiers that ran at least ``min_batches`` batches;
        None where none has. Auto-tiering's replay draws engine times with it: the spread
        that makes the live planner keep to smaller tiers (``sim.live_host``)."""
        self.flush()
        seen = self._seen_tiers(min_batches)
        return float(np.median([self.latency_of(t).sigma(t, 1) for t in seen])) if seen else None

    def _seen_tiers(self, min_batches: int) -> list[str]:
        return [t for t in self.served.engines
                if self.latency_of(t).tier_estimate(t).observed_batches >= min_batches]  # fmt: skip

    def latency_of(self, tier: str):
        """The latency model that has seen ``tier`` run most: a sequence model's lane whose
        traffic ran it the most batches (ties: the longer lane), its one scheduler's
        otherwise. Short sentences never reach the longest lane, whose view of a tier
        stayed at its profile however slow the engines ran (the gauges, the engine speed
        a swap starts from)."""
        lanes = self.lanes
        if len(lanes) == 1:
            return self.scheduler.latency
        ranked = reversed(list(lanes.values()))  # longest first: max keeps the first best
        return max(ranked, key=lambda s: s.latency.tier_estimate(tier).observed_batches).latency

    def hung(self) -> bool:
        """Whether a batch is still on an engine (after ``stop``: one it gave up waiting
        for)."""
        return self._running > 0

    async def batches_done(self) -> None:
        """Return once no batch of this runtime is on an engine."""
        await self._all_done.wait()

    def stuck(self) -> str | None:
        """A batch that has run ``STUCK_FACTOR`` times its plan and at least ``STUCK_MIN_S``
        - an engine hung in it - said as a reason, or None. Readiness reads it: a pod whose
        engine hangs takes no new connections' traffic, where its queue only expired."""
        stuck = self._stuck_batches()
        return stuck[0] if stuck else None

    def stuck_for(self) -> float:
        """Seconds since this runtime's longest-stuck batch became stuck (``stuck``'s rule:
        ``STUCK_FACTOR`` times its plan and at least ``STUCK_MIN_S``), 0.0 if none is.
        Liveness reads it (``DataPlane.not_live_reason``)."""
        now = self.clock()
        over = [now - started - _stuck_after(planned)
                for started, planned, _ in list(self._batch_started.values())]  # fmt: skip
        return max((s for s in over if s > 0), default=0.0)

    def stuck_count(self) -> int:
        """How many of this runtime's batches are stuck (``stuck``)."""
        return len(self._stuck_batches())

    def wedged(self) -> str | None:
        """Why every one of the model's slots is held by a hung engine (it can serve
        nothing: requests are refused UNAVAILABLE, ModelReady says false), or None."""
        if len(self._batch_started) < self._slot_count:
            return None
        stuck = self._stuck_batches()
        return stuck[0] if len(stuck) >= self._slot_count else None

    def _stuck_batches(self) -> list[str]:
        return [why for _, why in self._stuck_by_batch()]

    def _stuck_by_batch(self) -> list[tuple[int, str]]:
        """(batch key, reason) of each stuck batch; each logged once, at ERROR, when first
        found (the model's other requests wait behind it, and a shared device's other
        models' too; ``_finish`` says when it returns). Looked at by readiness (probed every
        few seconds), /metrics (``innfer_stuck_batches``), expiries and arrivals that find
        every slot busy - not by a timer of its own: one always pending cost the light-load
        hot path ~0.05-0.1 ms per request (bench/hot_path.py, session 48). Read by /metrics'
        thread too: the items are copied first (a dict changing size under an iteration
        raises)."""
        now = self.clock()
        found = [
            (key, f"model {self.name}: a batch of tier {tier} has run {ran:.0f} s (planned "
                  f"{planned * 1e3:.1f} ms): its engine is stuck")
            for key, (started, planned, tier) in list(self._batch_started.items())
            if (ran := now - started) > _stuck_after(planned)
        ]  # fmt: skip
        for key, why in found:
            if key not in self._said_stuck:
                self._said_stuck.add(key)
                log.error("%s; requests behind it wait and expire, and readiness fails until "
                          "it returns (a hung driver or GPU: liveness fails after the server's "
                          "stuck_restart_s unless it is null, to restart the process)",
                          why)  # fmt: skip
        return found

    def serving(self) -> bool:
        """Whether requests are in flight or arrived lately (a decayed rate of at least one
        row a second, about the last second's arrivals): what a load beside it competes
        with for the CPU."""
        now = self.clock()
        return self.inflight > 0 or any(s.arrival_rate(now) >= 1.0 for s in self.lanes.values())

    # -- requests --------------------------------------------------------------------------
    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        budget_s: float,
        pin: str | None = None,
        min_tier: str | None = None,
        priority: int = 0,
        waited_s: float = 0.0,
        *,
        reserve_s: float = 0.0,
        grace_s: float = 0.0,
        asked_s: float | None = None,
        due_at: float | None = None,
        deadline_only: bool = False,
    ) -> InferResult:
        """Queue one request and await its answer (a failure - refused, expired, engine
        error, unloaded - raises; ``DataPlane.infer`` counts it in ``stats.fail`` with the
        failures before the runtime, such as a malformed input).
        ``waited_s``: how long ago the request reached the server (its parsing and decoding
        before this call): its budget counts from then, its queue time from this call.
        ``reserve_s``: how much shorter than the client's ``budget_s`` already is (the
        server's overhead reserve; an answer is on time until it is spent too);
        ``grace_s``: seconds past the budget that admission still accepts (it judges the
        overhead at ``Overhead.judged``: its median, or a quiet server's where lower)
        (``Request.reserve`` and ``Request.grace``); ``asked_s``: the budget the client
        asked for where the call's gRPC deadline cut it to ``budget_s`` (None: not cut) - a
        refusal an idle replica would not make at ``asked_s`` is counted as load;
        ``due_at``: where a stream's deadline made ``budget_s``, that deadline (less the
        margin) on this runtime's clock, fixed once for the stream - every request it caps
        is then due at the same time and they queue in arrival order (from each one's own
        reading of the deadline they differed by microseconds, and the queue ran a stream's
        requests in close to random order; review helper-297); ``deadline_only``: the
        budget is what the call's gRPC deadline had left when the server read it (no
        ``latency_budget_ms``) - see ``_refusal``."""
        return await self._serve(
            inputs, rows, budget_s, pin, min_tier, priority, waited_s, reserve_s, grace_s,
            asked_s, due_at, deadline_only,
        )  # fmt: skip

    async def _serve(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        budget_s: float,
        pin: str | None,
        min_tier: str | None,
        priority: int,
        waited_s: float = 0.0,
        reserve_s: float = 0.0,
        grace_s: float = 0.0,
        asked_s: float | None = None,
        due_at: float | None = None,
        deadline_only: bool = False,
    ) -> InferResult:
        if self.stopping:
            self.count_refused("unavailable", "unavailable")
            raise Unavailable(f"model {self.name} is being unloaded or reloaded; retry")
        if (stuck := self.wedged()) is not None:  # queued, it would only expire here
            self.count_refused("unavailable", "unavailable")
            raise Unavailable(f"{stuck}; retry (another replica serves it)")
        self._idle.flush()  # admission reads the running batches and the latency model
        now = self.clock()
        self._check_tiers(pin, min_tier)
        reached = now - max(waited_s, 0.0)
        self.record_traffic(reached, budget_s + reserve_s, rows)
        # Queued from now (Triton's queue time: waiting for the scheduler, not parsing),
        # due from when the request reached the server.
        due = reached + budget_s if due_at is None else due_at - reserve_s
        tokens = 0
        if self._seq_axis is not None:  # a sequence model: one observation per request
            name, axis = self._seq_axis
            tokens = int(inputs[name].shape[axis])
            self._tokens.observe(tokens)
        req = Request(
            next(self._ids), now, due, rows, pin, min_tier, priority,
            payload=inputs, grace=max(grace_s, 0.0), reserve=max(reserve_s, 0.0),
            group=length_key(inputs, self._unmasked) if self._unmasked else None,
            length=tokens if self._by_length else 0,
        )  # fmt: skip
        lane = self.lane_for(inputs)
        if self._seq_axis is not None:
            self._lane_requests[lane].inc()
        if self.host_cpu is not None:
            self.host_cpu.arrived(rows)
        try:
            self.lanes[lane].submit(req, now)
        except Refused as exc:
            raise self._refusal(
                exc, req, lane, reached, reserve_s, asked_s, deadline_only
            ) from None
        except InvalidRequest as exc:
            raise InvalidArgument(str(exc)) from None
        return await self._await_answer(req, lane)

    def _check_tiers(self, pin: str | None, min_tier: str | None) -> None:
        """A request's ``tier`` and ``min_tier`` parameters name tiers of this model, and
        the pin does not rank below min_tier."""
        for what, tier in (("tier", pin), ("min_tier", min_tier)):
            if tier is not None and tier not in self.accuracy:
                raise UnknownTier(
                    f"model {self.name} has no {what} {clip(tier)}; tiers: "
                    f"{', '.join(self.accuracy)}"
                )
        if (
            pin is not None
            and min_tier is not None
            and self.accuracy[pin] < self.accuracy[min_tier]
        ):
            # The pin would win and min_tier be dropped without a word: ask which was meant.
            raise InvalidArgument(
                f"tier {pin!r} ranks below min_tier {min_tier!r} (tiers rank by measured "
                f"accuracy, else by size, lowest first: "
                f"{', '.join(sorted(self.accuracy, key=self.accuracy.__getitem__))}); send one "
                f"of the two, or pin a tier from {min_tier!r} up"
            )

    def _refusal(
        self, exc: Refused, req: Request, lane: int, reached: float, reserve_s: float,
        asked_s: float | None = None, deadline_only: bool = False,
    ) -> InferError:  # fmt: skip
        """Count admission's refusal of ``req`` and the error its client gets."""
        now = req.arrival
        outcome = exc.state.name.lower()
        if reserve_s > 0 and exc.state == State.REFUSED_DEADLINE:
            self.overhead_for(lane).refused(now)  # (refusals alone leave it stale)
        self._log_refused(outcome, str(exc), now)
        self.metrics.requests.labels(self.name, "", outcome).inc()
        why = outcome  # refused_full; refused_deadline: the work ahead, or a slow replica
        # What the deadline has left now, from its end (with plan_overhead the budget counts
        # from the parse: what was read plus the parse, never 0 - helper-303)
        left = req.deadline - now + reserve_s + self.margin_s
        if exc.state == State.REFUSED_DEADLINE:
            # refused_budget: the budget is below the fastest allowed tier's profiled time
            # at the quantile an idle replica admits at (no online correction; a full
            # batch's own rows are checked at slo_target): no replica meets it however idle
            # - the client's ask, not load, which the autoscaler must not scale out for.
            # Contention that slowed this replica is load, and so is time the request
            # already spent here (a long text's wait for a tokenizer thread): judged from
            # when it reached the server, not from now. So is what the call's gRPC deadline
            # lost before the server read it (gRPC's queue, a busy loop): where it cut a
            # budget an idle replica meets (``asked_s``), the refusal is load - it was the
            # client's ask, and overload hid from the autoscaler (review helper-251).
            # The overhead reserve is load too (a burst raises it): judged against the
            # budget before it was taken off (helper-273: a reserve inflated by overload
            # counted 1,300 refusals as the clients' ask).
            # A budget that is only what the call's deadline had left when it was read
            # (no latency_budget_ms) hides what it lost before. Lost for sure where nothing
            # was left (the client sent more than nothing), and likely while the loop is
            # saturated - not once waited for I/O since the last batch launch: calls wait in
            # gRPC's queue; such a refusal is load (a closed loop of 64 at 10 ms deadlines on
            # a saturated server counted 3,409 refusals as the clients' ask against 4 as
            # load, all read with -0.0 ms left; review helper-297). Not merely with a batch
            # in flight: a 50 ms deadline on a 170 ms model is the client's ask (helper-302).
            s = self.lanes[lane]
            idle = s.latency.profiled(
                s.ctx.fastest(req), req.rows, s.idle_quantile(req), req.length or None
            )
            # ("nothing": within a microsecond - a deadline read at 0 came out +1e-17 after
            # the sums above on one machine and -1e-17 on another)
            busy = deadline_only and (left < 1e-6 or self._idle.waits == self._idle_mark)
            # Planned for the overhead, a quiet replica still spends its quiet median
            # outside queue and compute (``Overhead.quiet``): a budget short of that too is
            # the client's ask. Counted as load, an idle pod's 1.5 ms budgets on a 0.05 ms
            # model - 1 ms margin + 0.5 ms overhead - read as 99 % degraded, and the
            # autoscaler would add pods that refuse them alike (review helper-323). No more
            # than admission judges at (``Overhead.judged``), so that a quiet median above
            # the loaded one (a fresh server's slow first answers) does not call load the
            # client's ask (helper-324); nothing where no quiet median is known.
            overhead = self.overhead_for(lane)
            known = reserve_s > 0 and overhead.quiet() > 0
            quiet = overhead.judged() if known else 0.0
            short = reached + idle + quiet > req.due
            if short and (asked_s is None or idle + quiet > asked_s) and not busy:
                why = "refused_budget"
        self._missed[why].inc()
        if exc.state == State.REFUSED_FULL:
            return ResourceExhausted(f"model {self.name}: {exc}")
        budget_s = req.deadline - reached
        spent = self._budget_spent(
            budget_s, reserve_s, now - reached, req.grace, left if deadline_only else None
        )
        return DeadlineExceeded(f"model {self.name}: {exc}; {spent}")

    async def _await_answer(self, req: Request, lane: int) -> InferResult:
        """Await ``req``'s answer (submitted to ``lane``): start what can run, and count a
        cancel by its client where it is."""
        # No await since submit, and the pump runs below: the request cannot have run yet.
        future = asyncio.get_running_loop().create_future()
        self._pending[req.id] = Pending(req, future, lane, VERDICT.get())
        # Light load, as inline runs need it: the request found the model empty and the loop
        # idle since the last launch (nothing waiting in gRPC's queue either).
        alone = self.inflight == 0 and self._idle.waits != self._idle_mark
        self._alone_bits = (self._alone_bits << 1 | alone) & _WINDOW_MASK
        self.inflight += 1
        try:
            try:
                self._pump()  # inside: a pump that raises must not leak the pending entry
            except Exception:  # a scheduling bug: the request fails, counted once, and
                # leaves its queue - it stayed there, counted nowhere, to run later for
                # nobody (review 161); a batch holding it drops its answer (``_resolve``)
                log.exception("model %s: a scheduling decision failed", self.name)
                if future.done():  # answered by this pump's inline run, before the failed
                    return future.result()  # decision: served (and counted) once (helper-315)
                self.lanes[lane].cancel(req, self.clock())
                self.metrics.requests.labels(self.name, "", "failed").inc()
                raise
            return await future
        except asyncio.CancelledError:
            self._cancelled(req, lane, future)
            raise
        finally:
            del self._pending[req.id]
            self.inflight -= 1

    def _cancelled(self, req: Request, lane: int, future: asyncio.Future) -> None:
        """Count a request its client cancelled: once, as ``cancelled`` - or, where its
        budget ran out (the gRPC deadline), as the miss it is: ``expired`` from the queue
        (outcome ``refused_deadline``, as the server's own expiry), ``late`` while its batch
        ran. Queued, it leaves the queue; running, its batch goes on and its answer is
        dropped (``_resolve`` finds it gone; nothing counts it served or failed). Answered
        already (cancelled on its way out), it was counted served."""
        if future.done() and not future.cancelled():
            pending = self._pending.get(req.id)
            if pending is not None and pending.verdict is not None:
                pending.verdict.dropped()  # its answer is lost with its caller
            return
        t = self.clock()
        queued = self.lanes[lane].cancel(req, t)
        if req.id in self._expired_cancelled:  # the expiry took it out of the queue first
            self._expired_cancelled.discard(req.id)
            queued = True
        if queued:
            self._queue_total.inc(t - req.arrival)
        self.count_cancel(req.arrival, req.due, queued, t)

    def count_cancel(self, arrival: float, due: float, waiting: bool, now: float) -> None:
        """Count, once, a request its client cancelled at ``now`` (``clock``): ``cancelled``
        where budget was left (the client's choice, no miss); where its budget ran out -
        gRPC's deadline ends the call, and the client's, sent as the deadline, arrives as a
        cancel within a millisecond of ``due`` either side - as the server's own expiry
        would count it while it was ``waiting`` (queued, or for a tokenizer thread; in the
        statistics' ``fail`` too), else
        late while its batch ran: it was "cancelled", no miss, 2 of 3 times behind a hung
        engine (review helper-153). One cancelled while ``waiting`` is in the statistics'
        ``fail`` whatever its budget, as Triton counts a request cancelled in its queue
        (they missed such cancels: review helper-261)."""
        at_deadline = due != math.inf and cancel_at_deadline(due - now, due - arrival)
        CANCEL_AT_DEADLINE.set(at_deadline)
        if not at_deadline:
            self.metrics.requests.labels(self.name, "", "cancelled").inc()
            if waiting:
                self.stats.fail.add(now - arrival)
            return
        outcome = "refused_deadline" if waiting else "cancelled"
        self.metrics.requests.labels(self.name, "", outcome).inc()
        self._missed["expired" if waiting else "late"].inc()
        if waiting:  # Triton's fail too, as the server's own expiry is: ModelStatistics
            # counted one fewer failure than the metrics' refusals (review 195)
            self.stats.fail.add(now - arrival)

    def _budget_spent(
        self, budget_s: float, reserve_s: float, waited_s: float, grace_s: float = 0.0,
        deadline_left: float | None = None,
    ) -> str:  # fmt: skip
        """What the server set aside of the client's budget before planning: a refusal's
        "left to plan with" is what remains (a 0.5 ms budget read "-0.5 ms" on its own).
        Admission judges at ``Overhead.judged``: the reserve less ``grace_s`` (the whole
        reserve, 55.6 ms, was named beside -5.1 ms left of 15 ms: helper-273).
        ``deadline_left``: where the budget was the call's deadline alone, what it had left
        when the request was planned (a 10 ms deadline that waited in gRPC's queue was "the
        client's budget was -0.0 ms"; helper-297)."""
        parts = [f"the server's {1e3 * self.margin_s:.1f} ms margin"]
        if reserve_s > 0:
            parts.append(f"{1e3 * (reserve_s - grace_s):.1f} ms reserved for request handling "
                         "(its learnt median, or a quiet server's where lower)")  # fmt: skip
        if deadline_left is not None:  # (what was spent before is taken off it already)
            return (f"the call's deadline had {1e3 * deadline_left:.1f} ms left when the "
                    f"server planned it, less {', '.join(parts)}")  # fmt: skip
        if waited_s >= 5e-5:
            parts.append(f"{1e3 * waited_s:.1f} ms already spent before it was planned")
        client_ms = 1e3 * (budget_s + reserve_s + self.margin_s)
        return f"the client's budget was {client_ms:.1f} ms, less {', '.join(parts)}"

    def count_invalid(self) -> None:
        """A request refused as malformed (a bad input, parameter or tier name): counted in
        innfer_requests_total{outcome="invalid"}, not as a miss of the SLO."""
        self.metrics.requests.labels(self.name, "", "invalid").inc()

    def count_refused(self, outcome: str, reason: str) -> None:
        """A request refused before it reached the scheduler (a stopping model, the server's
        in-flight byte limit): counted like any refusal, as a miss of the SLO."""
        self.metrics.requests.labels(self.name, "", outcome).inc()
        self._missed[reason].inc()

    def record_traffic(self, reached: float, budget_s: float, rows: int) -> None:
        """Note a request in the traffic log auto-tiering replays (where it has one): when
        it reached the server (``clock``), its budget as planned (the client's less the
        margin, which is added back: the log holds what the client asked) and its rows."""
        if self.traffic is not None:
            self.traffic.record(reached, budget_s + self.margin_s, rows)

    def overhead_for(self, lane: int) -> Overhead:
        """The overhead a request of ``lane`` is planned with: its lane's, once that has
        learnt from ``MIN_SAMPLES`` answers; until then the lane's with the most answers (a
        rarely used lane of long texts planned with none at all otherwise)."""
        own = self.overheads[lane]
        if own.samples >= OVERHEAD_MIN_SAMPLES:
            return own
        return max(self.overheads.values(), key=lambda o: o.samples)

    def lane_for(self, inputs: dict[str, np.ndarray]) -> int:
        """The lane a request of these (decoded) inputs joins: 0 for fixed shapes."""
        if self._seq_axis is None:
            return self._lane(0)
        name, axis = self._seq_axis
        return self._lane(int(inputs[name].shape[axis]))

    def _lane(self, length: int) -> int:
        """The lane of a request of sequence ``length``: the shortest profiled length that
        holds it (the codec has checked it is at most the longest); 0 for fixed shapes."""
        if len(self.lanes) == 1:
            return next(iter(self.lanes))
        return next(n for n in self.lanes if n >= length)

    def _bind_metrics(self) -> None:
        """Resolve every labelled child once: ``.labels()`` is a dict lookup under a lock,
        and the request path would otherwise do a dozen of them per request."""
        m, name = self.metrics, self.name
        self._compute_total = m.compute_total.labels(name)
        self._compute_cpu_total = m.compute_cpu_total.labels(name)
        self._queue_total = m.queue_total.labels(name)
        self._served_accuracy = m.served_accuracy.labels(name)
        # Only a model with a sequence axis observes it (``_serve``): every other model had
        # some 14 series at 0 for good.
        self._tokens = m.request_tokens.labels(name) if self._seq_axis is not None else None
        # The histogram's buckets are fixed; the lanes are the model's lengths (8/16/24...).
        # (Bound before the lanes are made: ``overheads`` has one entry per lane.)
        lanes = self.overheads if self._seq_axis is not None else ()
        self._lane_requests = {n: m.lane_requests.labels(name, str(n)) for n in lanes}
        self._degraded = m.degraded.labels(name)
        self._saturated = m.saturated_batches.labels(name)
        self._met = m.deadline_met.labels(name)
        self._missed = {why: m.deadline_missed.labels(name, why) for why in MISS_REASONS}
        # Every outcome's series exists from load, at 0: a counter that first appears at its
        # first increment loses that increment to rate(), and the shares read it as absent.
        # ("failed" without a tier: a scheduling decision that raised - review 165)
        for outcome in ("refused_deadline", "refused_full", "cancelled", "unavailable",
                        "invalid", "failed"):  # fmt: skip
            m.requests.labels(name, "", outcome)
        for t in self.tiers:
            m.requests.labels(name, t.name, "failed")
            m.nonfinite_outputs.labels(name, t.name)
        self._per_tier = {
            t.name: (
                m.requests.labels(name, t.name, "served"),
                m.request_seconds.labels(name, t.name),
                m.queue_seconds.labels(name, t.name),
                m.compute_seconds.labels(name, t.name),
                m.batch_size.labels(name, t.name),
            )
            for t in self.tiers
        }

    def _gauges(self) -> None:
        """Queue depth, requests in flight and each tier's latency view, read when Prometheus
        scrapes (``set_function``): nothing to update per request. A runtime that replaces
        this one (a reload) binds the same series to itself when it starts; the requests of
        the runtimes it replaced (``predecessors``: still draining) count in them."""
        m, name = self.metrics, self.name

        def queued() -> int:
            return sum(len(s.queue) for r in (self, *self.predecessors) for s in r.lanes.values())

        self._bind(m.queue_depth, (name,), queued)
        self._bind(m.inflight, (name,), lambda: self.inflight + sum(
            p.inflight for p in self.predecessors))  # fmt: skip
        self._bind(m.stuck_batches, (name,), lambda: self.retired_stuck() + sum(
            r.stuck_count() for r in (self, *self.predecessors)))  # fmt: skip
        self._bind(m.request_overhead, (name,),
                   lambda: max(o.estimate() for o in self.overheads.values()))  # fmt: skip
        self._bind(m.request_overhead_quiet, (name,),
                   lambda: max(o.quiet() for o in self.overheads.values()))  # fmt: skip

        def estimate(tier: str):  # a sequence model's: the lane its traffic runs most
            return self.latency_of(tier).tier_estimate(tier)

        for tier in self.accuracy:
            self._bind(m.tier_latency_factor, (name, tier),
                       lambda t=tier: estimate(t).factor)  # fmt: skip
            self._bind(m.tier_planned_latency, (name, tier),
                       lambda t=tier: estimate(t).planned_s_max_batch)  # fmt: skip

    def _bind(self, gauge, labels: tuple[str, ...], read: Callable[[], float]) -> None:
        gauge.labels(*labels).set_function(read)
        self._bound.append((gauge, labels))

    def unbind_gauges(self, tiers: Iterable[str] | None = None) -> None:
        """Remove the scrape-time series ``_gauges`` bound to this runtime - their callbacks
        hold it, and its engines, alive: all of them when its model is unloaded, those of
        ``tiers`` when a reload's new set drops them (the new runtime rebinds the rest)."""
        for gauge, labels in self._bound:
            if tiers is None or (len(labels) > 1 and labels[1] in tiers):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)

    # -- execution -------------------------------------------------------------------------
    def _pump(self) -> None:
        """Fail what can no longer make its deadline, then start every batch the scheduler
        decides on now (one per free slot). Called on every arrival and completion, on the
        loop thread; it never awaits, so no other request runs in between."""
        self._idle.flush()  # a finished batch's bookkeeping, before any decision
        self._sync_host()
        now = self.clock()
        for lane in self.lanes.values():
            for r in lane.expire(now):
                if self._waiting(r) is None:  # its client cancelled: counted then, as that
                    # (a cancel whose callback has not run yet - the gRPC deadline's, in the
                    # same loop turn - finds it out of the queue: it expired from there)
                    self._expired_cancelled.add(r.id)
                    continue
                self._queue_total.inc(now - r.arrival)  # it waited, and got nothing
                if r.state == State.REFUSED_FULL:  # a more urgent request took its place
                    why = (f"model {self.name}: queue full ({self.config.max_queue} requests "
                           "waiting): a request of higher priority took this one's place; "
                           "retry shortly or on another replica")  # fmt: skip
                    self.metrics.requests.labels(self.name, "", "refused_full").inc()
                    self._missed["refused_full"].inc()
                    self._log_refused("refused_full", why, now)
                    self._reject(r, ResourceExhausted(why))
                    continue
                self.metrics.requests.labels(self.name, "", "refused_deadline").inc()
                self._missed["expired"].inc()
                held = (self.device_stuck or self.stuck)()  # (rare: looked up per expiry)
                why = f"model {self.name}: the request's budget ran out in the queue" + (
                    f" (the device is held: {held})" if held else "")  # fmt: skip
                self._log_refused("expired", why, now)
                self._reject(r, DeadlineExceeded(why))
        # Lanes in turn; on a shared device only the most urgent head's lane is granted a
        # slot (Device.claim), so the order here does not decide who runs first.
        try:
            for lane in self.lanes.values():
                while True:
                    c0 = self._loop_cpu()
                    if (decision := lane.next(now)) is None:
                        break
                    self._meter_loop(c0)  # a decision is a batch's cost, not its rows'
                    self._launch(lane, decision)
        finally:  # (a decision that raised leaves the rest queued: they still expire)
            try:
                self._arm_expiry(now)
            finally:  # (what ran inline is answered whatever else raised)
                self._finish_inline()

    def _finish_inline(self) -> None:
        """Answer the batches this pump ran inline, now: their requests' handlers find
        their answers done and go on in the same loop turn. Through ``call_soon`` each
        answer waited two more turns (the callback's, then its task's wake-up): ~10 % of
        the MLP's request path at one client, outside the engine (bench/hot_path.py).
        After the pump's decisions, not inside them: ``_finish`` may pump again. A finish
        that raises is logged, as the loop logged a callback's error, and the rest still
        finish: raised into the pump's caller, it would fail a request already answered."""
        while self._inline_done:
            args = self._inline_done.pop(0)
            try:
                self._finish(*args)
            except Exception:
                log.exception("model %s: answering a batch run inline failed", self.name)

    def _arm_expiry(self, now: float) -> None:
        """Pump again when the earliest queued deadline has passed (``EXPIRY_STEP_S`` from
        now at the soonest): expiry ran only when something pumped - an arrival, a finished
        batch - so a batch overrunning its plan (a stalled engine call) held the queue past
        its budgets (a 300 ms budget refused after a 3 s stall, the gRPC deadline of a
        stream's request no help). One timer per runtime: an earlier deadline re-arms it, a
        later one waits for it to fire, and a timer that finds nothing to expire costs one
        pump."""
        due = min((lane.earliest_deadline() for lane in self.lanes.values()), default=math.inf)
        if due == math.inf:
            return
        at = max(due, now + EXPIRY_STEP_S)
        if self._expiry is not None:
            if self._expiry_at <= at:
                return
            self._expiry.cancel()
        self._expiry_at = at
        self._expiry = self._loop.call_later(at - now, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self._pump()

    def _launch(self, lane: Scheduler, d: Decision) -> None:
        """Concatenate ``d``'s inputs (padded to its longest sequence, or to its lane's
        length for an engine that prefers fixed lengths; a sequence model without a text
        mask: runs of equal length, unpadded) and hand the batch to an engine thread."""
        reqs = d.requests
        t_in = time.perf_counter()
        # Only a model with a mask (text:, mask_input): it covers the padding (another
        # sequence model's answer could change with it).
        masked = self.config.text is not None or self.config.mask_input is not None
        pad_to = self._lane_length[id(lane)] if masked else None
        if not self.served.engines[d.tier].prefers_fixed_lengths:
            pad_to = None
        try:
            runs = None
            if self._unmasked and len(reqs) > 1:
                names = [s.name for s in self.config.inputs]
                payloads = [{n: r.payload[n] for n in names} for r in reqs]
                runs = equal_length_runs(payloads, self._unmasked)
            feeds = runs or {
                s.name: batch_rows([r.payload[s.name] for r in reqs], s.dynamic, pad_to)
                for s in self.config.inputs
            }
            if runs is not None:
                self._runs[id(d)] = runs
        except Exception as exc:  # e.g. out of memory: fail this batch, keep serving
            self._failed(lane, d, exc)
            return
        self._running += 1
        self._all_done.clear()
        c0 = self._loop_cpu()  # the hand-off (the inputs' concatenation is per row)
        try:
            planned = lane.latency.planned(d.tier)[d.rows]
            self._batch_started[id(d)] = (self.clock(), planned, d.tier)
            inline = self._may_run_inline(lane, d)
            self._idle_mark = self._idle.waits
            if inline:
                self._meter_loop(c0)
                # On the loop thread, at once; answered as this pump ends (not from
                # inside its decisions: _finish pumps again).
                gc0 = gc_cpu_s()
                outputs, error, times = self._execute(d, feeds, t_in)
                self._check_inline(d, times[2] - (gc_cpu_s() - gc0))
                if self._idle.counting:
                    self._inline_turn = self._idle.turns
                    self._inline_done.append((lane, d, outputs, error, times))
                else:  # (no turns to tell a burst by: answered a turn later, in flight till then)
                    self._loop.call_soon(self._finish, lane, d, outputs, error, times)
                return
            self.pool.submit(self._run, lane, d, feeds, t_in)
            self._meter_loop(c0)
        except Exception as exc:  # no thread to run it ("can't start new thread", shut
            # down), or a bug on the way: the batch still finishes - failed, its slot freed
            # - on the next loop turn. Raised from here, it left every request of the
            # decision unanswered and the slot held: the model wedged (review 162).
            self._loop.call_soon(self._finish, lane, d, None, exc, (0.0, 0.0, 0.0))

    def _may_run_inline(self, lane: Scheduler, d: Decision) -> bool:
        """Whether ``d`` runs on the loop thread rather than an engine thread: it is planned
        within ``inline_max_s``, its requests are all this model has in flight, no other
        batch runs or waits on the device, and at least ``INLINE_MIN_ALONE`` of the last
        ``INLINE_WINDOW`` arrivals found the model empty and the loop idle. At light load
        every request is such a batch, and the two thread hand-offs (to the engine thread,
        and back through the loop's self-pipe) cost ~0.1 ms of a ~0.7 ms request path
        (bench/hot_path.py).

        The price: a request that arrives meanwhile is parsed up to ``inline_max_s`` later
        (its budget counts from then) and misses the next batch. At load that is every
        request: while the loop runs a batch the next ones wait in gRPC's queue, unseen,
        so each is found alone, run inline, and the server never batches (the MLP at 8
        closed-loop clients: 87 % batches of one, 20-30 % less throughput). Whether the
        loop went idle before an arrival (server/loop_idle.py) is what tells the two
        apart; a majority of recent arrivals, not one, lets inline runs resume."""
        if self.inline_max_s <= 0 or self.inflight != len(d.requests) or self.device is None:
            return False
        if self._inline_turn == self._idle.turns:  # one ran inline in this loop turn: this
            # request came with it (a burst, handlers started together), and is answered
            # after it either way - on an engine thread it may batch with the burst's rest
            return False
        if self._alone_bits.bit_count() < INLINE_MIN_ALONE:
            return False
        if len(self.device.running) != 1 or any(m.queue for m in self.device.members):
            return False
        if d.tier in self._not_inline:
            return False
        return lane.latency.planned(d.tier)[d.rows] <= self.inline_max_s

    def _check_inline(self, d: Decision, cpu_s: float) -> None:
        """After an inline run that took ``cpu_s`` of the loop thread's CPU: a tier whose run
        worked well past ``inline_max_s`` runs on the engine threads from now on, said once.
        The plan cannot foresee such a run (an engine slow on some inputs): the first one
        still holds the loop; none after it. Judged on CPU, not wall time: a stall of the
        whole host (a pod at its CPU limit, a paused process) is not the tier's, and took a
        tier off the loop for good - three times in 8 minutes on a busy machine (review
        helper-286). Nor the garbage collector's: ``cpu_s`` comes without the collections
        the run triggered (``server.gc_pause``). (A hang never returns: the check cannot
        see it.)"""
        if cpu_s <= max(INLINE_OVERRUN * self.inline_max_s, INLINE_OVERRUN_MIN_S):
            return
        if d.tier not in self._not_inline:
            self._not_inline.add(d.tier)
            log.warning(
                "model %s: a batch of tier %s took %.1f ms of CPU on the event loop "
                "(inline_max_ms %.1f): every request and probe waited; its batches run on the "
                "engine threads from now on", self.name, d.tier, 1e3 * cpu_s,
                1e3 * self.inline_max_s,
            )  # fmt: skip

    def _execute(
        self, d: Decision, feeds: dict[str, np.ndarray] | EqualLengthRuns, t_in: float
    ) -> tuple:
        """Run the batch: (outputs or None, the error or None, (prepare s, compute wall s,
        compute CPU s of this thread))."""
        t0, c0 = time.perf_counter(), time.thread_time()
        engine = self.served.engines[d.tier]
        runs = feeds if isinstance(feeds, EqualLengthRuns) else None
        try:
            shapes = self._output_shapes
            ran = runs.run(engine, shapes) if runs is not None else engine.run(feeds)
            outputs = listed(ran, shapes)
            if (problem := output_problem(outputs, d.rows, self._output_shapes)) is not None:
                raise EngineError(f"tier {d.tier}: {problem}")  # then run apart, below
        except Exception as exc:
            outputs, error = None, exc
            if len(d.requests) > 1:  # maybe not every request's error: each runs alone

                def waiting(i: int) -> bool:  # (a read from this thread: no state changes)
                    return self._waiting(d.requests[i]) is not None

                try:
                    parts = runs.parts if runs is not None else feeds
                    outputs = run_apart(engine, parts, [r.rows for r in d.requests], exc,
                                        waiting, self._output_shapes)  # fmt: skip
                except Exception as apart:  # the batch must still finish (failed): an escape
                    outputs, error = None, apart  # here left its slot and requests held
        else:
            error = None
        # Wall time (what latency plans need) and this thread's CPU time: on a core shared
        # with request handling the wall time also holds the handler's slices.
        return outputs, error, (t0 - t_in, time.perf_counter() - t0, time.thread_time() - c0)

    def _run(self, lane: Scheduler, d: Decision, feeds, t_in: float) -> None:
        """On an engine thread: run the batch, then hand the result to the loop (once)."""
        self._loop.call_soon_threadsafe(self._finish, lane, d, *self._execute(d, feeds, t_in))

    def _finish(
        self, lane: Scheduler, d: Decision, outputs, error: BaseException | None, times
    ) -> None:
        """On the loop: answer ``d``'s requests from the engine's outputs (or fail them),
        then look for the next batch."""
        self._running -= 1
        started = self._batch_started.pop(id(d), None)
        hung = id(d) in self._said_stuck
        if hung:  # (its key, before another batch can reuse the id)
            self._said_stuck.discard(id(d))
            log.warning("model %s: the batch of tier %s logged as stuck returned after %.0f s",
                        self.name, d.tier, self.clock() - started[0])  # fmt: skip
        runs = self._runs.pop(id(d), None)
        if not self._running:
            self._all_done.set()
        now = self.clock()
        if isinstance(outputs, Apart):
            try:
                self._finish_apart(lane, d, outputs, times, now)
            finally:
                self._pump()
            return
        if error is None:
            try:
                answered, output_s, later = self._resolve(d, outputs, times[1])
            except Exception as exc:  # outputs that do not split into its requests' rows
                error = exc
        if error is not None:
            # Whatever was answered stays answered (a future resolves once); the rest fail,
            # and the slot is freed here, not left to a settle that never comes.
            self._account_cpu(times[2])
            self._compute_total.inc(times[1])  # the engine ran (and failed): its time counts
            self._log_failure(d.tier, error, "engine failed on a batch of %d", d.rows)
            try:
                self._failed(lane, d, error)
            finally:
                self._pump()
            return
        # Answer first, account later: the bookkeeping (latency model, slot, metrics,
        # statistics: ~0.1-0.3 ms at one client on the MLP) runs when the loop is next idle -
        # after the answers are sent - or at the next flush (server/loop_idle.py).
        calls = runs.timings if runs is not None else None
        self._idle.defer(
            self._settle, lane, d, times, now, answered, output_s, later, calls, outputs, hung
        )
        if self._device_waiting():
            self._pump()  # its flush settles this batch before the next decision

    def _device_waiting(self) -> bool:
        """Whether a request of this model or of any model on its device is queued (then a
        finished batch is settled and the next decision taken at once). Its own lanes count
        apart from the device's members: a stopping model has left the device, and its
        queue must still run within the drain."""
        if any(lane.queue for lane in self.lanes.values()):
            return True
        return self.device is not None and any(m.queue for m in self.device.members)

    def _account_cpu(self, engine_cpu_s: float) -> None:
        self._compute_cpu_total.inc(engine_cpu_s)  # a failed batch's CPU was the engine's too
        self._meter_host(engine_cpu_s)

    def _loop_cpu(self) -> float:
        """This thread's CPU seconds so far, where the host's CPU is metered (else 0)."""
        return time.thread_time() if self.host_cpu is not None else 0.0

    def _meter_loop(self, since: float) -> None:
        """Count the loop's CPU since ``since`` (``_loop_cpu``) as a batch's own handling
        (``HostCpu.loop_batch``): its decision, hand-off and settling."""
        if self.host_cpu is not None:
            self.host_cpu.loop_batch(time.thread_time() - since)

    def _meter_host(self, engine_cpu_s: float) -> None:
        """Count a batch's engine CPU; every ``WINDOW_S`` hand the planner the process's
        CPU per row outside the engines (``server.host_cpu``)."""
        if self.host_cpu is None:
            return
        self.host_cpu.engine(engine_cpu_s)
        now = self.clock()
        if not self.host_cpu.due(now):
            return
        self.host_cpu.refresh(time.process_time(), now)
        self._sync_host()  # (the other models' lanes at their next decision)

    def _sync_host(self) -> None:
        """Hand the lanes the host CPU's current figures if they changed since: the windows
        close on whichever model's batch comes next, so a model with few requests beside a
        busy one (or a reload's new runtime) planned with none of it."""
        host = self.host_cpu
        if host is None or host.version == self._host_version:
            return
        self._host_version = host.version
        for lane in self.lanes.values():
            lane.host_s = host.per_row
            lane.batch_host_s = host.per_batch

    def _failed(self, lane: Scheduler, d: Decision, exc: BaseException) -> None:
        lane.complete(d, self.clock(), 0.0, ok=False)
        for r in d.requests:
            self._fail_one(d.tier, r, exc)

    def _waiting(self, r: Request) -> Pending | None:
        """``r``'s entry while its caller still waits for an answer; None once it has one
        or was cancelled. A cancelled caller's entry stays until its task resumes (in a
        later loop turn): an answer, expiry or failure in between must not count it too."""
        pending = self._pending.get(r.id)
        return pending if pending is not None and not pending.future.done() else None

    def _fail_one(self, tier: str, r: Request, exc: BaseException) -> None:
        if self._waiting(r) is None:  # cancelled while it ran: counted then (_cancelled)
            return
        error = exc if isinstance(exc, InferError) else engine_failed(self.name, tier, exc)
        self._queue_total.inc(r.started - r.arrival)
        if isinstance(error, InvalidArgument):  # its own bad values: not an engine failure
            self.count_invalid()
            error.counted = True  # DataPlane._admit counts the invalid it sees raised: not twice
        else:
            self.metrics.requests.labels(self.name, tier, "failed").inc()
            self._missed["failed"].inc()
        self._reject(r, error)

    def _log_refused(self, kind: str, why: str, now: float) -> None:
        """One WARNING per kind of refusal (refused_full, refused_deadline, expired) and
        ``LogThrottle`` window, with how many it left out: an overload was said by metrics
        alone, not one log line (review helper-153)."""
        skipped = self._log_throttle.allow(("refused", kind), now)
        if skipped is not None:
            more = f" ({skipped} more like it not logged since the last)" if skipped else ""
            log.warning("model %s: %s: %s%s", self.name, kind, why, more)

    def _log_failure(self, tier: str, error: BaseException | None, what: str, *args) -> None:
        """One record per tier, kind of error and ``LogThrottle`` window, saying how many of
        that kind it left out: a model failing at 1,000 requests/s logs a line per 10 s, not
        per batch. An engine failure is an ERROR with its traceback; an error the client's
        own values caused (answered INVALID_ARGUMENT, ``engine_failed``) a WARNING without:
        under one key, a client sending ids past a table kept every real failure out of the
        log, and read as an engine failing (review helper-153). The clients' errors name the
        reason (``engine_failed``)."""
        mapped = error if isinstance(error, InferError) or error is None else (
            engine_failed(self.name, tier, error))  # fmt: skip
        client = isinstance(mapped, InvalidArgument)
        kind = "invalid" if client else type(error).__name__
        skipped = self._log_throttle.allow((tier, kind), self.clock())
        if skipped is None:
            return
        more = f" ({skipped} more like it not logged since the last)" if skipped else ""
        if client:
            log.warning("model %s tier %s: " + what + " - the request's values (answered "
                        "INVALID_ARGUMENT): %s" + more, self.name, tier, *args, mapped)  # fmt: skip
        else:
            log.error("model %s tier %s: " + what + more, self.name, tier, *args, exc_info=error)

    def _finish_apart(
        self, lane: Scheduler, d: Decision, apart: Apart, times: tuple, now: float
    ) -> None:
        """``d`` failed whole and its requests ran again alone (``server.apart``): answer
        the ones that ran, fail the rest with their own error; one cancelled meanwhile was
        skipped. The slot is freed and the latency model learns nothing (the time holds the
        failed batch and the re-runs); metrics and statistics count each re-run as the
        batch of one request it was."""
        self._account_cpu(times[2])
        self._log_failure(
            d.tier, apart.error, "a batch of %d requests failed; run again one by one, %d "
            "answered", len(d.requests), apart.answered,
        )  # fmt: skip
        ran = [r for r, out in zip(d.requests, apart.outputs, strict=True) if out is not None]
        lane.complete(d, now, 0.0, ok=False, served=ran)
        # The engine time outside the answered re-runs: the failed batch, failed re-runs.
        self._compute_total.inc(max(0.0, times[1] - sum(
            t for t, out in zip(apart.seconds, apart.outputs, strict=True) if out is not None
        )))  # fmt: skip
        for r, out, exc, secs in zip(
            d.requests, apart.outputs, apart.errors, apart.seconds, strict=True
        ):
            if exc is not None:
                self._fail_one(d.tier, r, exc)
                continue
            pending = self._waiting(r)
            if out is None or pending is None:  # cancelled (counted then): skipped, or gone
                continue
            later = self._answer(pending, r, InferResult(
                out, d.tier, self._width(d.tier), int(1e6 * (r.started - r.arrival)),
                int(1e6 * secs), r.rows, pending.lane,
            ))  # fmt: skip
            alone = Decision(d.tier, [r], d.slot)
            self._record(alone, [r], secs, now, lane.latency, {r.id} if later else ())
            self._count_nonfinite(alone, [r], out)
            self._record_triton(alone, [r], (0.0, secs, 0.0), now)

    def _answer(self, pending: Pending, r: Request, result: InferResult) -> bool:
        """Resolve ``pending`` (``r``'s) with ``result``; True where its met or late waits
        for the answer to leave (its ``Verdict``, told here what it is judged against: the
        caller may send before this batch's bookkeeping runs)."""
        pending.resolve(result)
        if pending.verdict is None:
            return False
        pending.verdict.runtime, pending.verdict.due = self, r.due
        return True

    def _resolve(
        self, d: Decision, outputs: dict[str, np.ndarray], compute: float
    ) -> tuple[list[Request], float, set[int]]:
        """Hand each of ``d``'s requests its rows of ``outputs``; (the requests answered -
        not those cancelled while the batch ran -, the seconds it took, the ids of those
        whose verdict waits for their answer to leave)."""
        t_out = time.perf_counter()  # (outputs: checked by _execute, output_problem)
        offset = 0
        answered, later = [], set()
        for r in d.requests:
            part = {k: v[offset : offset + r.rows] for k, v in outputs.items()}
            offset += r.rows
            pending = self._waiting(r)
            if pending is not None:
                answered.append(r)
                if self._answer(pending, r, InferResult(
                    part, d.tier, self._width(d.tier), int(1e6 * (r.started - r.arrival)),
                    int(1e6 * compute), d.rows, pending.lane,
                )):  # fmt: skip
                    later.add(r.id)
        return answered, time.perf_counter() - t_out, later

    def _settle(
        self, lane: Scheduler, d: Decision, times: tuple[float, float, float], now: float,
        answered: list[Request], output_s: float, later: Collection[int] = (),
        calls: list[tuple[int, float]] | None = None,
        outputs: dict[str, np.ndarray] | None = None,
        hung: bool = False,
    ) -> None:  # fmt: skip
        """The bookkeeping of a batch answered at ``now``: the scheduler learns its time
        (``calls``: each engine call's, where it ran as several) and frees its slot, then
        metrics and Triton's statistics count it (and ``outputs``' NaNs, if any). A batch
        logged as stuck (``hung``) is not learned: its minutes would raise the tier's plan,
        and with it the next hang's stuck threshold and liveness's restart (review 172)."""
        c0 = self._loop_cpu()
        prepare, compute, cpu = times
        lane.complete(d, now, compute, calls=calls, learn=not hung)
        self._account_cpu(cpu)
        if outputs is not None:
            self._count_nonfinite(d, answered, outputs)
        self._meter_loop(c0)  # the batch's own; what follows is mostly per request
        self._record(d, answered, compute, now, lane.latency, later)
        # A request cancelled while its batch ran is not a success.
        self._record_triton(d, answered, (prepare, compute, output_s), now)

    def _count_nonfinite(
        self, d: Decision, answered: list[Request], outputs: dict[str, np.ndarray]
    ) -> None:
        """Count (and log, throttled per tier) the ``answered`` requests of ``d`` whose
        outputs hold a NaN or an infinity (``server.apart.nonfinite``)."""
        bad = nonfinite(outputs, [r.rows for r in d.requests])
        if not bad:
            return
        ids = {r.id for r in answered}
        n = sum(d.requests[i].id in ids for i in bad)  # (not those cancelled meanwhile)
        if not n:
            return
        self.metrics.nonfinite_outputs.labels(self.name, d.tier).inc(n)
        skipped = self._log_throttle.allow((d.tier, "nonfinite"), self.clock())
        if skipped is not None:
            more = f" ({skipped} more like it not logged since the last)" if skipped else ""
            log.warning("model %s tier %s: %d of a batch's %d requests answered with NaN or "
                        "infinite outputs; check the tier's accuracy (innfer report) and its "
                        "inputs' range%s", self.name, d.tier, n, len(d.requests), more)  # fmt: skip

    def _reject(self, r: Request, exc: BaseException) -> None:
        pending = self._waiting(r)
        if pending is not None:
            pending.fail(exc)

    def _record(
        self, d: Decision, answered: list[Request], compute: float, now: float,
        latency: LatencyModel, later: Collection[int] = (),
    ) -> None:  # fmt: skip
        """Metrics of batch ``d``; per request, of those ``answered`` (one cancelled while
        the batch ran was counted as cancelled, not served nor met); met or late, except for
        the ids in ``later`` (their ``Verdict`` tells when their answers leave)."""
        tier = d.tier
        served, request_s, queue_s, compute_s, batch = self._per_tier[tier]
        batch.observe(d.rows)
        if d.saturated:
            self._saturated.inc()
        self._compute_total.inc(compute)
        for r in answered:
            queued = r.started - r.arrival
            served.inc()
            request_s.observe(now - r.arrival)
            queue_s.observe(queued)
            compute_s.observe(compute)
            self._queue_total.inc(queued)
            self._served_accuracy.observe(self.accuracy[tier])
            best = self._best_allowed(r)  # (served at it, the common case: nothing more)
            if self.accuracy[tier] < self.accuracy[best] and (
                self.accuracy[tier] < self.accuracy[self._best_in_budget(r, best, latency)]
            ):
                self._degraded.inc()
            if r.id not in later:
                (self._met if now <= r.due else self._missed["late"]).inc()

    def judge(self, due: float, late_only: bool = False) -> None:
        """Count a served request whose verdict waited for its answer to leave (``Verdict``)
        met or late by now; ``late_only``: its answer was never sent - a miss only if the
        client waited out its budget, as for a cancelled request."""
        late = self.clock() > due
        if late:
            self._missed["late"].inc()
        elif not late_only:
            self._met.inc()

    def _best_allowed(self, r: Request) -> str:
        """The tier ``r`` is served at when load takes nothing from it: its pin, else the
        nominal tier (top, or a fixed policy's) or its min_tier, whichever is better."""
        if r.pin is not None:
            return r.pin
        floor = r.min_tier or self.nominal_tier
        return max((self.nominal_tier, floor), key=self.accuracy.__getitem__)

    def _best_in_budget(self, r: Request, best: str, latency: LatencyModel) -> str:
        """The most accurate tier an idle replica would serve ``r`` at within its budget:
        ``best``, the best it allows (``_best_allowed``), or, where the planner's time for
        that tier - as the load's timing left it: this machine, idle - cannot answer its
        rows in the budget even alone, the most accurate one below it that can (the fastest
        where none can). Served below this, load took accuracy from it; served at it, its
        budget did - and more replicas would give it nothing: counted degraded, a budget
        tighter than the top tier pinned the HPA at maxReplicas on an idle replica (review
        159). Not the time as the engines run now: a replica slowed by its own load (request
        handling on the engines' cores) then read every request it served below the top tier
        as budget-limited - a degraded share of 0 with all the load degraded, and no
        scale-out (review 192). ``latency``: the lane's model, where no load timed it."""
        below = self._ranked[self._ranked.index(best) :]
        timing = self._idle_timing.get(id(latency))
        if r.length and latency.length_aware:  # a text: alone, at its own tokens
            timing = _AtLength(timing or latency, latency, r.length, now=timing is None)
        # (``budget``: what the planner had, the margin and reserve already off)
        return best_in_budget(below, timing or latency, r.rows, r.budget)

    def _record_triton(
        self, d: Decision, answered: list[Request], compute: tuple[float, float, float],
        now: float,
    ) -> None:  # fmt: skip
        self.stats.record_batch(d.rows, len(answered), compute)
        for r in answered:
            self.stats.record_request(r.started - r.arrival, now - r.arrival, r.rows)

    def _width(self, tier: str) -> float | str:
        w = self.served.tiers[tier].width
        # A per-group width goes back as JSON, as ModelConfig's tier list writes it (str() of
        # the mapping was a Python repr no client could parse).
        return float(w) if isinstance(w, (int, float)) else json.dumps(w, sort_keys=True)


def batch_rows(
    parts: list[np.ndarray], dynamic: tuple[int, ...], pad_to: int | None = None
) -> np.ndarray:
    """One batch from the requests' arrays of one input (each (rows, *per-sample)): joined
    along the batch axis, and where the input has a dynamic (sequence) axis, each part first
    padded with zeros to the longest (at least ``pad_to``) - id 0 and mask 0, which a masked
    model ignores.

    Example:
        >>> a, b = np.ones((1, 2), np.int64), np.ones((2, 3), np.int64)
        >>> batch_rows([a, b], (0,)).tolist()
        [[1, 1, 0], [1, 1, 1], [1, 1, 1]]
        >>> batch_rows([a], (0,), pad_to=4).tolist()
        [[1, 1, 0, 0]]
    """
    if len(parts) == 1 and (pad_to is None or not dynamic):
        return parts[0]
    for axis in dynamic:
        longest = max(max(p.shape[1 + axis] for p in parts), pad_to or 0)
        pads = [[(0, 0)] * p.ndim for p in parts]
        for p, pad in zip(parts, pads, strict=True):
            pad[1 + axis] = (0, longest - p.shape[1 + axis])
        parts = [
            np.pad(p, pad) if any(x for _, x in pad) else p
            for p, pad in zip(parts, pads, strict=True)
        ]
    return np.concatenate(parts)
