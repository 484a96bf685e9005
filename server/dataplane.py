"""The transport-free data plane: models, readiness, metadata and inference.

Works on the OIP protobuf messages (the protocol's data model) but never on grpc: the
service layer (``server.service``) only unpacks the call, passes the gRPC deadline in as a
number, and maps ``server.errors`` to status codes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import errno
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from runtime import __version__
from runtime.engines import EngineError
from runtime.repository import (
    InvalidModelName,
    ModelNotFound,
    Repository,
    RepositoryError,
    ServedModel,
    check_model_name,
)
from runtime.repository.config import ConfigError
from runtime.repository.store import file_known, something_at
from runtime.repository.tokenizer import Encoded, TokenizerError
from server import parameters
from server.autotier import AutoTierer
from server.config import ServerConfig
from server.engine_threads import EngineThreads
from server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InferError,
    InvalidArgument,
    ModelBroken,
    NotFound,
    ResourceExhausted,
    TokenizerFailed,
    TooLarge,
    Unavailable,
)
from server.gpu_load import NvmlLoad, gpu_index
from server.host_cpu import HostCpu
from server.limits import (
    ANSWER_FRAME_BYTES,
    clip,
    clip_message,
    message_limit,
    model_unservable,
    request_bytes,
    response_bytes,
    text_bytes,
)
from server.metrics import Metrics
from server.model_runtime import DRAIN_S, ModelRuntime
from server.overhead import QUIET_QUEUE_S
from server.parameters import BUDGET_SOURCES, VERSION, check_parameter_names
from server.proto_gen import grpc_service_pb2 as pb
from server.repository_poll import build_running
from server.scheduling import plan
from server.scheduling.device import Device
from server.shared_memory import Lease, SharedMemory
from server.stream import StreamPool, StreamWindow
from server.trace import RequestTraces, Transport
from server.traffic import TrafficLog

from . import codec

log = logging.getLogger("innfer.dataplane")

# Triton's names for the extensions served (classification: an output's class_count;
# model_configuration: the ModelConfig RPC; parameters: request and response parameters;
# logging: the log settings RPCs; schedule_policy: the priority and timeout parameters).
# A client that checks before it calls skipped the last two (review helper-235).
EXTENSIONS = (
    "classification", "model_configuration", "model_repository", "parameters", "statistics",
    "logging", "schedule_policy", "trace", "innfer_latency_budget",
)  # fmt: skip
# ... and typically (model name, output names and shapes, six parameters): what the in-flight
# cap reserves for it before it exists (its real size is held once it does).
ANSWER_FRAME_TYPICAL_BYTES = 512
# A text request of more characters than this is tokenized on the tokenizer threads, off the
# event loop: 8 texts of 16 KB took 49 ms there, during which no other request was decoded,
# scheduled or answered. Shorter text is tokenized inline (the hop would cost more).
TOKENIZE_INLINE_CHARS = 2048
# How long RepositoryIndex waits for the repository's folder listing (``repository_names``).
LIST_TIMEOUT_S = 5.0
# How often a model whose `innfer build` ran at start-up is looked at again.
BUILD_WAIT_S = 1.0
# A retired runtime's series stay this long after its drain before they are removed: two
# of Prometheus' default 1-minute scrapes. Removed at once, the last of what the drain
# counted - the requests an unload answered UNAVAILABLE above all - was in no scrape
# (review helper-274). A shutdown does not wait for it.
FORGET_AFTER_S = 120.0
# Threads for that (the tokenizers library releases the GIL while it encodes, and one
# Tokenizer encodes on several threads at once); started by the first long text.
TOKENIZE_THREADS = 2
# Columns token ids may be padded to before the padding is cut (``_decode``); the message
# size limit bounds their bytes in any case.
PADDED_COLUMNS = 1 << 20


class Phase(Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"


# The runtime that has the request ``DataPlane.infer`` answers: the one looked up first, or
# its successor once the request was handed over (``_successor``) - whose statistics count a
# failure (review helper-140: a reload's successor's failures went to the retired runtime).
SERVED_BY: contextvars.ContextVar = contextvars.ContextVar("innfer_served_by")
# The sampled request's trace (server/trace.py), or None: stamped where the request goes.
TRACED: contextvars.ContextVar = contextvars.ContextVar("innfer_traced", default=None)


class DataPlane:
    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.traces = RequestTraces(config.trace)  # Triton's trace extension (server/trace.py)
        self.repo = Repository(config.repository, config.engine_cache_spare)
        self.models: dict[str, ModelRuntime] = {}
        # Models that should be served (configured, or found at start-up) and why each one
        # that is not loaded failed: readiness and /metrics say which.
        self.expected: set[str] = set()
        self.broken: dict[str, str] = {}
        # Loaded models whose last reload failed (the loaded version serves on): why. One log
        # line said it, and RepositoryIndex read READY with no reason (review helper-153).
        self.reload_failed: dict[str, str] = {}
        self.in_repository: set[str] = set()  # model names start-up found (``load_all``)
        # Models unloaded since their last load: RepositoryIndex says "unloaded" of them and
        # lists a model never loaded by name alone, as Triton does (review 186).
        self.unloaded: set[str] = set()
        # Names start-up had still to load when a client unloaded them (``load_all`` skips
        # them).
        self._unloaded_early: set[str] = set()
        # Models being loaded now - at start-up, by a RepositoryModelLoad or the repository
        # poll (a count: loads may overlap). Not served yet, they are UNAVAILABLE "loading"
        # and LOADING in RepositoryIndex, as Triton's: they were NOT_FOUND "not loaded; load
        # it first" while an operator's load ran (minutes of TensorRT builds on a GPU),
        # which a retry policy gives up on (review helper-235).
        self.loading: collections.Counter[str] = collections.Counter()
        # Models start-up found under a running `innfer build`: loaded once it ends.
        self.waiting_build: set[str] = set()
        self.turned_away = 0  # calls answered UNAVAILABLE because the server drains
        self.limits = config.limits
        # The transport's message limit (bytes, both ways), fixed when the server started
        # (Server.start); None: no transport (an embedding, tests).
        self.transport_limit: int | None = None
        # Bytes of accepted requests not yet answered, and of stream answers not yet written
        # (``hold``): what limits.max_inflight_bytes caps.
        self.inflight_bytes = 0
        # What every stream holds of it together (``server.stream``): at its limit streams
        # that hold bytes stop reading, and the rest stays for other calls.
        self.streams = StreamPool(int(self.limits.max_inflight_bytes * self.limits.streams_share))
        self.phase = Phase.LOADING
        self.closing = asyncio.Event()  # set when draining begins: open streams stop reading
        self._forget_now = asyncio.Event()  # set at the drain and at stop_models
        self._lock = asyncio.Lock()
        # One arbiter per device for the models that compute there (server.scheduling
        # .device): ``device`` the CPU's, ``_gpu_devices`` one per CUDA index in use - a
        # CPU model's batch took the GPU model's only slot, each planning behind the other's
        # work (review helper-254). None: each model has its own slot and ignores the
        # others (device_slots: 0).
        self.device = Device(config.device_slots, "cpu") if config.device_slots > 0 else None
        self._gpu_devices: dict[int, Device] = {}
        # Outside load per GPU in use (server.gpu_load; the nvml_load switch): a reader per
        # CUDA index, started by the first model loaded there (None: NVML unusable), and
        # the factor each last reported. A CPU-only server never makes one.
        self._gpu_readers: dict[int, NvmlLoad | None] = {}
        self.external_load: dict[int, float] = {}
        # Request handling's CPU per row, shared by every model (server.host_cpu).
        self.host_cpu = HostCpu()
        metrics.host_cpu.set_function(lambda: self.host_cpu.estimate)
        metrics.host_cpu_batch.set_function(lambda: self.host_cpu.batch_estimate)
        metrics.host_cpu_shared.set_function(lambda: float(self.host_cpu.shares_cpus))
        metrics.inflight_bytes.set_function(lambda: float(self.inflight_bytes))  # at scrape
        metrics.inflight_limit_bytes.set(self.limits.max_inflight_bytes)
        metrics.stream_bytes.set_function(lambda: float(self.streams.held))
        metrics.stream_limit_bytes.set(self.streams.limit)
        # Auto-tiering (models with auto_tiers): what each was sent, kept across reloads,
        # and the background task that may change its tiers.
        self.traffic: dict[str, TrafficLog] = {}
        self.tierers: dict[str, AutoTierer] = {}
        self._stopping_tierers: list[AutoTierer] = []  # stopped, until tierers_stopped
        # Loads in progress and runtimes replaced or unloaded and still stopping (answering
        # their queue): owned here, so that a cancelled RPC cannot abandon them half way.
        self._owned: set[asyncio.Task] = set()
        # Runtimes replaced or unloaded and still draining: their requests are in flight.
        self._retiring: set[ModelRuntime] = set()
        # Runtimes retired with an engine call that never returned, until it does (the task
        # that waits for it): their device slot is held, and readiness says so.
        self._hung: dict[ModelRuntime, asyncio.Future] = {}
        self._said_not_live = False  # liveness's failure logged (not_live_reason)
        # Long texts are tokenized here (``_tokenize``); shut down with the models.
        self.tokenizer_threads = EngineThreads(TOKENIZE_THREADS, "tokenize")
        # RepositoryIndex's folder listing (``repository_names``): one thread, one listing
        # at a time, shared by the calls that come while it runs.
        self._lister = EngineThreads(1, "list")
        self._listing: asyncio.Future | None = None
        # Triton's system shared memory (server.shared_memory): the regions clients registered.
        self.shared_memory = SharedMemory(
            self.limits.max_shared_memory_regions, enabled=config.shared_memory_on
        )

    async def repository_names(self) -> list[str]:
        """The repository's model folders (``Repository.names``), listed off the loop on a
        thread of their own - one listing at a time, shared by every call that comes while
        it runs - and given up on after ``LIST_TIMEOUT_S`` (then []: a stalled volume).
        On the loop, 30,000 folders held every request 0.3 s; on the default executor,
        each call to a stalled volume took a thread for good, until model loads and the
        shutdown waited behind them (reviews 157, 158)."""
        loop = asyncio.get_running_loop()
        if self._listing is None or self._listing.done():
            listing = self._listing = loop.create_future()

            def settle(names, error) -> None:
                if not listing.done():
                    listing.set_exception(error) if error else listing.set_result(names)

            def work() -> None:
                try:
                    names, error = self.repo.names(), None
                except Exception as exc:  # said to the callers, as before
                    names, error = None, exc
                with contextlib.suppress(RuntimeError):  # the loop closed (process exit)
                    loop.call_soon_threadsafe(settle, names, error)

            self._lister.submit(work)
        try:
            return await asyncio.wait_for(asyncio.shield(self._listing), LIST_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("listing the repository %s took over %.0f s (a stalled volume?): "
                        "RepositoryIndex lists the models loaded or failed only",
                        self.repo.root, LIST_TIMEOUT_S)  # fmt: skip
            return []

    # -- lifecycle -------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load every configured model (every model in the repository when none are named).
        A model that fails is logged and reported, never fatal: the others are served."""
        names = list(self.config.models) or self.repo.names()
        # The repository's models as start-up found them: a request for one that is not
        # served is told how to serve it (``_not_loaded_hint``), without a look at the disk
        # per request on the serving loop (a stat on a shared volume can stall it).
        self.in_repository = set(names if not self.config.models else self.repo.names())
        if not self.config.models:  # serving "every model": say which folders are not
            for folder in self.repo.skipped():
                log.warning(
                    "%s is not served: a model's folder is named by a model name (letters, "
                    "digits, '.', '_', '-'; up to 128) and is no symbolic link",
                    clip(folder),
                )
            for said in self.repo.unconfigured():
                log.warning("not served: %s", said)
        self.expected = set(names)
        for name in names:  # 0 until loaded: a load that never ends is a model not ready
            self.metrics.model_ready.labels(name).set(0)  # (no series: no alert could fire)
            # Loading from now on, its turn included: a model waiting behind another's
            # engine builds read not ready and not loading - "a load failed" - and paged
            # (review 165). Its own load clears it (_load_marked).
            self.metrics.model_loading.labels(name).set(1)
        for name in names:
            if self.phase is Phase.DRAINING:  # stopped while starting: load nothing more
                left = names[names.index(name) :]
                log.info("shutting down: models %s not loaded", left)
                for later in left:
                    self.metrics.model_loading.labels(later).set(0)
                return
            if name in self._unloaded_early:
                log.info("model %s: unloaded before start-up reached it; not loaded", name)
                continue
            loop = asyncio.get_running_loop()  # (a look at the disk: off the loop)
            if await loop.run_in_executor(None, build_running, self.repo.root / name):
                # Its folder half written: the load failed, kept as the model's failure
                # with "run `innfer build`" - the build running - until a restart (review
                # helper-278). Loaded once the build is done; not ready until then.
                log.warning("model %s: an `innfer build` of it is running; it is loaded once "
                            "the build is done", name)  # fmt: skip
                self.waiting_build.add(name)
                if self.config.model_control != "poll":  # (the poll loads it as new)
                    task = asyncio.ensure_future(self._load_after_build(name))
                    self._owned.add(task)
                    task.add_done_callback(self._owned.discard)
                continue
            try:
                await self.load(name)
            except InferError as exc:  # reported in readiness and metrics; others go on
                if self.phase is Phase.DRAINING:  # a stop during start-up: no failure
                    # (an ERROR paged for a rollout's stop, "load the model elsewhere";
                    # review helper-241)
                    log.info("shutting down: model %s not loaded", name)
                    continue
                log.error("model %s not loaded: %s", name, exc)
            except Exception:  # not foreseen (a library's own error): still this model only
                log.exception("model %s not loaded", name)
                self._mark_broken(name, "unexpected error while loading; see the server log")
        if self.phase is Phase.LOADING:  # not once draining began (a stop during start-up)
            self.phase = Phase.READY

    async def _load_after_build(self, name: str) -> None:
        """Load ``name`` once the ``innfer build`` that holds its folder ends (looked at each
        ``BUILD_WAIT_S``); nothing once the server stops."""
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, build_running, self.repo.root / name):
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._forget_now.wait(), BUILD_WAIT_S)
            if self._forget_now.is_set():  # stopping: nothing more is loaded
                self.metrics.model_loading.labels(name).set(0)
                return
        log.info("model %s: its `innfer build` is done: loading it", name)
        try:
            await self.load(name)
        except InferError as exc:  # reported in readiness and metrics, as start-up's
            log.error("model %s not loaded: %s", name, exc)

    async def load_asked(self, name: str) -> None:
        """A client's Load (RepositoryModelLoad): ``load``, refused UNAVAILABLE while an
        ``innfer build`` of the model runs - its folder half written, the load failed, was
        kept as the model's failure and told the operator to run the build already running
        (review helper-252); the repository poll waits for the build alike."""
        try:
            check_model_name(name)
        except InvalidModelName as exc:
            raise InvalidArgument(str(exc)) from None
        loop = asyncio.get_running_loop()  # (a look at the disk: off the loop)
        if await loop.run_in_executor(None, build_running, self.repo.root / name):
            raise Unavailable(
                f"an `innfer build` of model {name!r} is running; load it once the build is "
                "done (the version loaded before, if any, keeps serving)"
            )
        await self.load(name)

    async def swap(self, name: str) -> None:
        """Reload ``name`` for a new tier set (auto-tiering): as ``load``, but the old
        runtime serves its whole queue, so no accepted request is failed. Nothing happens
        if ``name`` was unloaded meanwhile (an Unload must not be undone by a choice made
        before it) or the server is shutting down."""
        await self.load(name, drain_s=None, swap=True)

    async def load(self, name: str, drain_s: float | None = DRAIN_S, swap: bool = False) -> None:
        """Load (or reload) ``name``: engines built or verified off the event loop, then
        swapped in atomically; the old runtime answers its queue (for up to ``drain_s``,
        None: all of it), fails the rest, and closes. Runs in a task of the data plane's
        own: a Load RPC cancelled by its client's deadline does not cut it short (a new
        runtime half made would stay on the device with its engines open)."""
        task = asyncio.ensure_future(self._load_marked(name, drain_s, swap))
        self._owned.add(task)
        task.add_done_callback(self._owned.discard)
        # Its failure is recorded (the model's reason) and logged; where the caller has
        # gone (its deadline cancelled the await), nothing else reads it, and asyncio
        # logged "Task exception was never retrieved" on top (review helper-183).
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(task)

    async def _load_marked(self, name: str, drain_s: float | None, swap: bool) -> None:
        """``_load``, with ``innfer_model_loading`` 1 while it runs for a model the server
        knows (a client's name for no model makes no series): a GPU start builds engines
        for many minutes with the model not ready, and the not-ready alert paged for it
        (review 159)."""
        self.waiting_build.discard(name)  # (its build is done: this load is its turn)
        known = name in self.expected or name in self.models or name in self.in_repository
        loading = self.metrics.model_loading.labels(name) if known else None
        if loading is not None:
            loading.set(1)
            self.metrics.load_failures.labels(name)  # from 0, for rate() (review helper-229)
        # A model's name: known, or with a model.yaml in the repository (one added since
        # the start) - not a typo, whose calls were "loading; retry shortly" while its load
        # waited behind another's (review helper-242).
        valid = _valid_name(name) and (
            known or file_known(self.repo.root / name / "model.yaml") is True
        )
        if valid:
            self.loading[name] += 1
        try:
            await self._load(name, drain_s, swap)
        finally:
            if loading is not None:
                loading.set(0)
            if valid:
                self.loading[name] -= 1
                if not self.loading[name]:
                    del self.loading[name]

    async def _load(self, name: str, drain_s: float | None, swap: bool) -> None:
        try:
            check_model_name(name)
        except InvalidModelName as exc:
            raise InvalidArgument(str(exc)) from None
        async with self._lock:
            if self.phase is Phase.DRAINING or (swap and name not in self.models):
                if swap:
                    log.info("model %s: tier swap skipped (unloaded, or shutting down)", name)
                    return
                raise Unavailable("the server is shutting down; load the model elsewhere")
            served, unmet = await self._read_served(name)
            self._warn_over_limit(name, served.config)
            runtime = await self._start_runtime(name, served)
            await self._start_gpu_reader(served)
            if self.phase is Phase.DRAINING:  # shutdown began while it warmed up
                runtime.abandon()
                if swap:
                    return
                raise Unavailable("the server is shutting down; load the model elsewhere")
            old = self._install(name, runtime, swap, unmet)
        # Outside the lock: a swap's drain lasts until the old queue's latest deadline, and
        # other models' loads need not wait for it.
        if old is not None:
            await self._retire(old, drain_s)

    async def _read_served(self, name: str) -> tuple[ServedModel, str | None]:
        """The model's files and engines (``Repository.load``, off the loop) and why its
        auto-tiering goals are unmet (None: met, or none); a failure raised as the status
        that names its fix, and kept for readiness and RepositoryIndex (``_mark_broken``)."""
        loop = asyncio.get_running_loop()
        try:
            served = await loop.run_in_executor(
                None,
                lambda: self.repo.load(
                    name,
                    backend=self.config.backend,
                    check_timing=self.config.profile_at_load,
                    # ONNX Runtime's pool threads, made now, yield as the engine
                    # threads do (a GPU backend ignores it)
                    pool_nice=self.config.engine_nice,
                ),
            )
            unmet = await loop.run_in_executor(None, self.repo.unmet_goals, name, served.config)
        except ModelNotFound as exc:
            # Gone from the repository since start-up: no longer "in the repository but not
            # loaded; load it first" to its requests (review helper-183)
            self.in_repository.discard(name)
            if name not in self.models and name not in self.expected:
                # the series this load made (known then) outlived the folder: nothing
                # listed the name again, so nothing ever removed them (helper-275) - nor an
                # earlier failure's record and its ready gauge at 0, a critical alert for
                # a model that no longer exists (helper-280)
                self.broken.pop(name, None)
                self.unloaded.discard(name)
                families = (self.metrics.model_loading, self.metrics.load_failures,
                            self.metrics.model_ready)  # fmt: skip
                for family in families:
                    with contextlib.suppress(KeyError):
                        family.remove(name)
            raise NotFound(self._public(f"{exc}{self._mark_broken(name, str(exc))}")) from None
        except InvalidModelName as exc:  # a folder that is a link out of the repository
            # A configured one: readiness said "(unloaded)". (A client's Load of one is
            # refused without listing the folder.)
            kept = self._mark_broken(name, str(exc)) if name in self.expected else ""
            raise InvalidArgument(self._public(f"{exc}{kept}")) from None
        except (RepositoryError, EngineError, OSError) as exc:
            # With its fix: readiness and RepositoryIndex say it too.
            why = f"{exc}{_advice(exc, self.config.model_control)}"
            kept = self._mark_broken(name, why)
            raise FailedPrecondition(
                self._public(f"model {name!r} cannot be loaded: {why}{kept}")
            ) from None
        except Exception as exc:  # a reader's gap (review 156: 100,000 nested [ in a
            # tier.json was INTERNAL, with an empty reason): the model's files, still
            log.exception("model %s: reading its files failed", name)
            why = f"its files could not be read ({type(exc).__name__}: {exc}); rebuild it"
            why = clip_message(why)
            kept = self._mark_broken(name, why)
            raise FailedPrecondition(
                self._public(f"model {name!r} cannot be loaded: {why}{kept}")
            ) from None
        return served, unmet

    async def _start_runtime(self, name: str, served: ServedModel) -> ModelRuntime:
        """A runtime for ``served``, warmed up (its timing at load) and ready to start; a
        failure closes what opened, is kept like ``_read_served``'s, and raised as
        FAILED_PRECONDITION."""
        loop = asyncio.get_running_loop()
        runtime = None
        try:
            if (why := model_unservable(self.config.limits, served.config)) is not None:
                raise FailedPrecondition(
                    f"no request to it passes this server's request limits: {why}; raise "
                    "it under limits: in the server config"
                )
            # The scheduler's compiled loops, off the event loop: a fresh pod compiles them
            # (10-60 s), and its Scheduler did so on the loop - health checks and requests
            # timed out instead of hearing "still loading" (review helper-251). Once per
            # process; then the Scheduler's own call is a cache hit.
            await loop.run_in_executor(None, plan.warm)
            device = self._device_for(served)
            runtime = ModelRuntime(
                served, self.metrics, policy=self.config.policy, device=device,
                inline_max_s=self.config.inline_max_ms / 1e3,
                overhead_quantile=self.config.overhead_quantile,
                traffic=self._traffic(name, served.config), host_cpu=self.host_cpu,
                margin_s=self.config.budget_margin_ms / 1e3,
                engine_nice=self.config.engine_nice,
            )  # fmt: skip
            if device is not None:  # shared: another model's hung batch holds it
                runtime.device_stuck = lambda d=device: self._stuck_reason(d)
            runtime.retired_stuck = lambda n=name: self._hung_count(n)
            # Loaded while requests are in flight (a reload, a swap of tiers, another
            # model busy): the timing at load shares the CPU with serving.
            busy = any(m.serving() for m in self.models.values())
            await loop.run_in_executor(
                None, lambda: runtime.warm_up(self.config.profile_at_load, contended=busy)
            )
            replaced = self.models.get(name)
            if replaced is not None and busy:  # its idle times, not the profile's
                runtime.inherit_idle_timing(replaced)
            if replaced is not None and replaced.serving():
                # The engines run beside this traffic as slowly as the old set's did.
                runtime.assume_speed(replaced.engine_speed())
        except Exception as exc:  # e.g. profile.json missing, the engine fails its first run
            if not isinstance(exc, (InferError, EngineError)):  # ONNX Runtime's own errors
                log.exception("model %s: loading failed", name)
            if runtime is not None:
                runtime.abandon()
                # It bound series for its tiers when made: a tier only it had would
                # show at 0 for good beside the set still served (review 161) - its
                # tiers' only: innfer_model_load_failures, counted just now, stays
                # (review 162).
                self._forget_later(name, tiers_only=True)
            else:
                for engine in served.engines.values():
                    engine.close()
            # Another exception than ours (ONNX Runtime's, a bug) by its type too: a
            # KeyError read "cannot be served: 'logits'" (review 189).
            said = str(exc) if isinstance(exc, InferError | EngineError) else (
                f"{type(exc).__name__}: {exc}")  # fmt: skip
            kept = self._mark_broken(name, said)
            # a FailedPrecondition says its own fix (the server's policy); the rest is
            # the repository's (profile, engines): a rebuild
            advice = ("" if isinstance(exc, FailedPrecondition)
                      else _advice(exc, self.config.model_control))  # fmt: skip
            raise FailedPrecondition(
                self._public(f"model {name!r} cannot be served: {said}{advice}{kept}")
            ) from None
        return runtime

    def _install(
        self, name: str, runtime: ModelRuntime, swap: bool, unmet: str | None
    ) -> ModelRuntime | None:
        """Start ``runtime`` and serve ``name`` with it from now on; the runtime it replaced
        (to retire), if any."""
        served = runtime.served
        runtime.start()
        old = self.models.pop(name, None)
        same = False  # a reload of the model as it was
        if old is not None:  # tiers the new set dropped: their series would stay, frozen
            old.unbind_gauges(set(old.accuracy) - set(runtime.accuracy))
            # its queue and in-flight requests (and those of the runtimes it replaced,
            # if they still drain) count until it has drained
            runtime.predecessors += [old, *old.predecessors]
            # The server's own change, or a client's load of the model unchanged (Triton
            # reloads nothing then): not a new version, so Triton's counters go on - and
            # the old set's drain counts in them. "Make sure it is loaded" zeroed them.
            same = _unchanged(old.served, served)
            if swap or same:
                runtime.stats = old.stats
        self.models[name] = runtime
        self._watch_gpu(runtime)
        self.host_cpu.engine_threads = self._engine_threads()
        self.broken.pop(name, None)
        self.reload_failed.pop(name, None)
        self.unloaded.discard(name)
        # (a reload of the model unchanged keeps the loop's last choice: judged anew, a
        # client's "make sure it is loaded" before each session cost an apply each time)
        self._start_tierer(name, served.config, swap or same, unmet)
        # The data plane owns this gauge: it alone knows a replacement is serving.
        self.metrics.model_ready.labels(name).set(1)
        chosen = "auto-tiering's choice" if served.tier_source == "frontier" else "model.yaml"
        log.info("model %s ready: tiers %s from %s (%s), build %s", name,
                 list(served.tiers), chosen, served.backend, served.build_id)  # fmt: skip
        default_ms = served.config.default_latency_budget_ms
        margin_ms = self.config.budget_margin_ms
        if default_ms <= margin_ms:  # every request without a budget is refused (review 190)
            log.warning(
                "model %s: default_latency_budget_ms %g is within the server's budget_margin_ms "
                "%g: every request that sends no budget (nor a gRPC deadline) is refused; "
                "raise the model's default, or lower the margin", name, default_ms, margin_ms,
            )  # fmt: skip
        return old

    async def _retire(self, runtime: ModelRuntime, drain_s: float | None) -> None:
        """Stop ``runtime`` (no longer in ``models``) in a task of the data plane's own: the
        caller - a Load or Unload RPC - may be cancelled (its client's deadline), and a stop
        cut short would leave admitted requests unanswered and engines open."""
        await asyncio.shield(self._start_retire(runtime, drain_s))

    def _start_retire(self, runtime: ModelRuntime, drain_s: float | None) -> asyncio.Task:
        """``_retire``'s task, started (await it shielded)."""
        task = asyncio.ensure_future(runtime.stop(drain_s))
        self._owned.add(task)
        self._retiring.add(runtime)

        def retired(_: asyncio.Future) -> None:
            self._owned.discard(task)
            self._retiring.discard(runtime)
            for successor in self.models.values():
                if runtime in successor.predecessors:
                    successor.predecessors.remove(runtime)
            self._unwatch_gpu(runtime)
            self._forget_later(runtime.name)
            if runtime.hung():  # stop gave up on an engine call: still stuck
                # kept for readiness until the call returns - not in ``_owned`` nor in
                # ``inflight()``: a shutdown does not wait for a hung engine
                done = asyncio.ensure_future(runtime.batches_done())
                self._hung[runtime] = done
                done.add_done_callback(lambda _: self._unhung(runtime))

        task.add_done_callback(retired)
        return task

    def _forget_later(self, name: str, tiers_only: bool = False) -> None:
        """``_forget_retired`` in a task of the data plane's own (it takes the lock: a
        caller may hold it), ``FORGET_AFTER_S`` from now or at the drain if sooner."""

        async def later() -> None:
            if not self._forget_now.is_set():
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._forget_now.wait(), FORGET_AFTER_S)
            await self._forget_retired(name, tiers_only)

        forget = asyncio.ensure_future(later())
        self._owned.add(forget)
        forget.add_done_callback(self._owned.discard)

    async def _forget_retired(self, name: str, tiers_only: bool = False) -> None:
        """A retired runtime's series that nothing serves now: all of its model's (unloaded,
        and no earlier runtime still draining), or those of the tiers neither its successor
        nor a runtime still draining serves (``Metrics.forget_model``) - after its drain, so
        the requests it still answered count. Under the lock: a load of the same name in
        progress has bound its series already, and is judged once it is in place."""
        async with self._lock:
            # What still answers under the name: the runtime serving it, any earlier one
            # still draining (a reload after a reload), and one whose engine call hung past
            # its stop - its batch still answers and counts (into series a forget had left
            # unexported: review 161) - their tiers' series stay until they end.
            serving = [r for r in (self.models.get(name), *self._retiring) if r and r.name == name]
            live = serving + [r for r in list(self._hung) if r.name == name]
            kept = set().union(*(r.accuracy for r in live)) if live else None
            lanes = {str(n) for r in live for n in r.lanes} if live else None
            if kept is None and tiers_only:  # (a failed load: its failure count stays)
                kept, lanes = set(), set()
            try:
                self.metrics.forget_model(name, kept, lanes)
                if not serving and live:
                    # Unloaded with its engine hung (stuck or not yet: it turns stuck at
                    # 30 s): the alert on this gauge must still be able to fire (it went
                    # with the model's series; session 48's list, review 158).
                    self.metrics.stuck_batches.labels(name).set_function(
                        lambda: self._hung_count(name)
                    )
            except Exception:  # bookkeeping: never an unretrieved task error, never silent
                log.exception("model %s: removing its retired series failed", name)

    def _hung_count(self, name: str) -> int:
        """Stuck batches of ``name``'s retired runtimes whose engine call has not returned."""
        return sum(r.stuck_count() for r in list(self._hung) if r.name == name)

    def _unhung(self, runtime: ModelRuntime) -> None:
        """``runtime``'s hung engine call returned: it is forgotten, and so is its model's
        stuck-batch series where nothing of that name is loaded (an unload kept it)."""
        self._hung.pop(runtime, None)
        name = runtime.name
        if name not in self.models and not any(r.name == name for r in list(self._hung)):
            with contextlib.suppress(KeyError):  # never bound: a reload's successor holds it
                self.metrics.stuck_batches.remove(name)
        self._forget_later(name)  # its batch has counted: what it alone kept can go

    async def stop_models(self) -> None:
        """Shutdown (after ``drain``): once any load in progress has settled, stop every
        model - all at once: one whose engine hangs must not hold up the others' - and wait
        for the runtimes still being retired by a reload, swap or unload."""
        self._forget_now.set()  # (retired series: nothing scrapes them after this)
        async with self._lock:  # a load or swap that holds it ends before the snapshot
            for m in list(self.models.values()):
                self._start_retire(m, DRAIN_S)
        while self._owned:
            await asyncio.gather(*list(self._owned), return_exceptions=True)
        # Past the drain (a request still decoding would tokenize inline): the threads
        # end after the texts they hold (milliseconds), waited for off the loop.
        self.tokenizer_threads.shutdown()
        await asyncio.get_running_loop().run_in_executor(None, self.tokenizer_threads.join)
        readers = [r for r in self._gpu_readers.values() if r is not None]
        self._gpu_readers.clear()
        for reader in readers:  # joined off the loop: a read may be inside the driver
            await asyncio.get_running_loop().run_in_executor(None, reader.stop)

    # -- outside load on a GPU (server.gpu_load) --------------------------------------------
    async def _start_gpu_reader(self, served: ServedModel) -> None:
        """Start the outside-load reader for ``served``'s GPU if none is there yet; nothing
        for a CPU model or with nvml_load off (no thread, no import of pynvml). NVML starts
        off the loop: ``nvmlInit`` loads the driver's library and can take a second, and on
        the loop every other model's requests waited for it (session 71's noticed list).
        Under the load lock: no other load starts one meanwhile, and a shutdown stops it."""
        index = gpu_index(served) if self.config.nvml_load else None
        if index is None or index in self._gpu_readers:
            return
        loop = asyncio.get_running_loop()

        def report(i: int, factor: float) -> None:
            # On the reader's thread: the schedulers are the loop's alone.
            with contextlib.suppress(RuntimeError):  # the loop closed (process exit)
                loop.call_soon_threadsafe(self._apply_external, i, factor, reader)

        reader = NvmlLoad(index, report, own_busy=lambda: self._busy_s(index))
        started = await loop.run_in_executor(None, reader.start)
        self._gpu_readers[index] = reader if started else None

    def _watch_gpu(self, runtime: ModelRuntime) -> None:
        """Give ``runtime`` its GPU's outside-load factor in force (its reader started
        before, ``_start_gpu_reader``); nothing for a CPU model."""
        index = gpu_index(runtime.served) if self.config.nvml_load else None
        factor = None if index is None else self.external_load.get(index)
        if factor is not None:
            _set_external(runtime, factor)

    def _unwatch_gpu(self, runtime: ModelRuntime) -> None:
        """``runtime`` has stopped: where no model loaded or still draining runs on its
        GPU any more (the last one there was unloaded), stop that GPU's reader - it read
        NVML every POLL_S for nothing until shutdown - and drop its factor and gauge (a new
        model there starts a fresh reader). A reload or swap keeps it: the successor is
        loaded by then."""
        index = gpu_index(runtime.served) if self.config.nvml_load else None
        if index is None or index not in self._gpu_readers:
            return
        if any(gpu_index(m.served) == index for m in (*self.models.values(), *self._retiring)):
            return
        reader = self._gpu_readers.pop(index)
        self.external_load.pop(index, None)
        with contextlib.suppress(KeyError):  # never set: no read reported yet
            self.metrics.device_external_load.remove(f"cuda:{index}")
        if reader is not None:  # joined off the loop: a read may be inside the driver
            task = asyncio.ensure_future(asyncio.to_thread(reader.stop))
            self._owned.add(task)  # (a shutdown waits for it)
            task.add_done_callback(self._owned.discard)

    def _apply_external(self, index: int, factor: float, reader: NvmlLoad | None = None) -> None:
        """On the loop: GPU ``index``'s outside load is ``factor`` - every model there
        (and those still draining) plans with it from now on. A report of ``reader`` that
        is no longer the GPU's (stopped with the GPU's last model) is dropped."""
        if reader is not None and self._gpu_readers.get(index) is not reader:
            return
        self.external_load[index] = factor
        self.metrics.device_external_load.labels(f"cuda:{index}").set(factor)
        for m in (*self.models.values(), *self._retiring):
            if gpu_index(m.served) == index:
                _set_external(m, factor)

    def _busy_s(self, index: int) -> float | None:
        """Engine seconds run so far on GPU ``index`` by the models loaded now (a reader's
        fallback for its own share). Read on the reader's thread: a snapshot that meets
        the loop changing the models or a model's batch sizes gives up (None)."""
        try:
            return (
                sum(
                    b.compute_infer.ns
                    for m in list(self.models.values())
                    if gpu_index(m.served) == index
                    for b in list(m.stats.batches.values())
                )
                / 1e9
            )
        except RuntimeError:  # dictionary changed size during iteration
            return None

    def describe_stopping(self) -> str:
        """What a shutdown cut short by its grace period leaves behind, for the log: a load
        in progress, models not stopped yet, and those stopping with their running batches
        (an engine call that hangs is named by model and tier)."""
        parts = ["a model load in progress"] if self._lock.locked() else []
        for m in dict.fromkeys([*self.models.values(), *self._retiring]):
            if m in self._retiring:
                running = "; ".join(m.running_batches()) or "draining its queue"
                parts.append(f"model {m.name} stopping ({running})")
            elif not m.stopping:
                parts.append(f"model {m.name} (not stopped yet)")
        return ", ".join(parts) or "nothing"

    def _traffic(self, name: str, config) -> TrafficLog | None:
        if config.auto_tiers is None:
            return None
        return self.traffic.setdefault(name, TrafficLog())

    def _start_tierer(
        self, name: str, config, swap: bool = False, unmet: str | None = None
    ) -> None:
        """One auto-tiering loop per model with auto_tiers (kept across its reloads; one
        with new goals takes over its predecessor's back-off: ``swap``, this load is the
        predecessor's own change). None where its goals are ``unmet`` by its frontier:
        every check would fail alike, each min_interval_s, once traffic came. A frontier
        that is missing, corrupted or built for other settings than model.yaml's
        (``frontier_problem``) is said by the loop as it starts, with its fix, and its checks
        wait (no apply) until ``innfer build`` made a usable one."""
        tierer = self.tierers.get(name)
        if config.auto_tiers_empty:
            log.warning("model %s: %s", name, config.auto_tiers_empty_note)
        if unmet is not None:
            log.error(
                "model %s: auto_tiers cannot be met: %s; auto-tiering is off for this model "
                "(it serves %s) until model.yaml's goals change or `innfer build` measures its "
                "frontier again", name, unmet, self._serving(name),
            )  # fmt: skip
        enabled = self.metrics.tier_set_enabled
        if config.auto_tiers is None or unmet is not None:
            if tierer is not None:  # (after its check: this load may be its own swap)
                self.tierers.pop(name).stop(after_check=swap)
            if unmet is not None or config.auto_tiers_empty:
                enabled.labels(name).set(0)  # asked for, and off: an alert's to see
            else:
                with contextlib.suppress(KeyError):  # not asked for (any more): no series
                    enabled.remove(name)
            return
        enabled.labels(name).set(1)
        if tierer is not None and not swap:
            # A load that is not the loop's own swap may serve another set than the loop
            # last chose for (auto_tiers.json deleted or stale, model.yaml's tiers edited,
            # an operator's choice): the next check judges what is served now, however
            # steady the traffic, and not before min_interval_s from that choice.
            tierer.reloaded()

        def problem() -> str | None:  # on the loop's file thread (it reads the frontier)
            return self.repo.frontier_problem(name, config)

        if tierer is not None and tierer.goals == config.auto_tiers:
            tierer.watch_frontier(problem)  # this load's model.yaml; said now where unusable
        else:
            fresh = AutoTierer(
                name, self.repo.root, config.auto_tiers, self.traffic[name], self.swap,
                self.metrics, live=lambda: self._serving(name),
                host=lambda: self._host(name), frontier_problem=problem,
            )  # fmt: skip
            if tierer is not None:
                # (its own swap, this load: stopped once the check has counted and said it)
                tierer.stop(after_check=swap)
                # New goals for the same model (an unload drops the loop): the back-off goes
                # on - min_interval_s counts from the old loop's last change or failed try,
                # or from now where this load is that loop's own swap (which the old loop's
                # check counts and says before it ends). Only the choice, made for the old
                # goals, is judged anew.
                fresh.last_change = fresh.clock() if swap else tierer.last_change
                fresh.changes = tierer.changes
                if not swap:  # (and from an operator's choice this load brought)
                    fresh.reloaded()
            self.tierers[name] = fresh
            fresh.start()

    def _serving(self, name: str) -> str:
        """What ``name`` serves now, as `innfer tiers apply --live` takes it."""
        served = self.models[name].served
        return f"{served.tier_source}:{','.join(served.tiers)}"

    def _host(self, name: str) -> dict:
        """What serving ``name`` adds to each request beyond queue and compute, and how fast
        its engines run now: the host view auto-tiering's choice replays (``sim.live_host``
        reads this dict)."""
        m = self.models[name]
        return {
            "overhead_ms": (m.overhead.recent() * 1e3).tolist(),
            # Each sample's wait before the handler (same order): the client paid it too.
            "waited_ms": (m.overhead.recent_waited() * 1e3).tolist(),
            "budget_margin_ms": self.config.budget_margin_ms,
            "plan_overhead": self._plans_overhead(m),
            "overhead_quantile": m.overhead.quantile,
            "engine_speed": m.engine_speed(),
            "engine_sigma": m.engine_spread(),
            "host_cpu_ms": self.host_cpu.per_row * 1e3,
            "host_cpu_batch_ms": self.host_cpu.per_batch * 1e3,
            "quiet_overhead_ms": m.overhead.quiet() * 1e3,
            # Batches it may run at once (instances, capped by a shared device's slots).
            "slots": m.scheduler.max_running,
            # A pinned tier names one tier of the live set; another set need not have it.
            "policy": None if self.config.policy.startswith("fixed") else self.config.policy,
        }

    def _plans_overhead(self, m: ModelRuntime) -> bool:
        """The model's plan_overhead, or the server's where the model leaves it unset."""
        own = m.config.plan_overhead
        return self.config.plan_overhead if own is None else own

    def stop_tierers(self) -> None:
        """Stop every auto-tiering loop (server shutdown); ``tierers_stopped`` awaits them."""
        for tierer in self.tierers.values():
            tierer.stop()
        self._stopping_tierers = list(self.tierers.values())
        self.tierers.clear()

    async def tierers_stopped(self) -> None:
        """The loops ``stop_tierers`` stopped have ended and removed their work directories."""
        tierers, self._stopping_tierers = self._stopping_tierers, []
        await asyncio.gather(*(t.stopped() for t in tierers))

    def message_limit(self) -> int:
        """The automatic gRPC message limit: from the largest valid request or answer among
        the models to be served (read from their model.yaml before loading; an unreadable one is
        skipped here and reported when it loads)."""
        largest = 0
        for name in list(self.config.models) or self.repo.names():
            try:
                cfg = self.repo.config(name)
            except Exception:  # any file at all: one model's must not stop the server
                continue
            largest = max(largest, _largest_message(cfg))
        return message_limit(largest)

    def _warn_over_limit(self, name: str, cfg) -> None:
        """A model loaded after start (model control, a reload with a larger max_batch or
        shapes) may need more than the limit the transport was started with: say so once,
        with the fix; its answers above the limit are refused before they run
        (``_answer_bytes``), its requests above it by gRPC."""
        largest = _largest_message(cfg)
        if self.transport_limit is None or largest <= self.transport_limit:
            return
        # (said as it is: the limit may be the config's own, and with one row too large
        # "lower its max_batch" cannot help - review helper-281)
        where = ("max_message_bytes in the server config" if self.config.max_message_bytes
                 else "fixed at start from the models then configured")  # fmt: skip
        one_row = max(request_bytes(cfg), response_bytes(cfg)) / max(cfg.max_batch, 1)
        raise_it = f"set max_message_bytes to at least {message_limit(largest)} and restart"
        if one_row + ANSWER_FRAME_BYTES > self.transport_limit:
            fix = ("not even one row fits: every request fails but those whose outputs go to "
                   f"shared memory; {raise_it}")  # fmt: skip
        else:
            fix = f"requests and answers above it fail; {raise_it}, or lower its max_batch"
        log.warning(
            "model %s: a full batch is %.3g MiB, above this server's gRPC message limit of "
            "%.3g MiB (%s): %s", name, largest / 2**20, self.transport_limit / 2**20, where, fix,
        )  # fmt: skip

    def _answer_bytes(self, rows: int, outputs, id_bytes: int = 0, request_bytes: int = 0) -> int:
        """The bytes the answer to ``rows`` rows of ``outputs`` takes, about (its tensors, the
        request id it echoes, a typical frame). Refuses, before it runs, a request whose
        answer gRPC could not send (it failed after the engine's work, and on a stream ended
        the stream), or that the in-flight cap could never hold beside the request's own
        ``request_bytes`` (refused as load, it was refused so on an idle server forever)."""
        per_row = sum(codec.row_bytes(o) for o in outputs)
        size = rows * per_row + id_bytes + ANSWER_FRAME_TYPICAL_BYTES
        if self.transport_limit is not None:
            room = self.transport_limit - ANSWER_FRAME_BYTES - id_bytes
            if rows * per_row > room:
                fits = room // max(per_row, 1)
                fewer = (f"send fewer rows per request (at most {fits})" if fits else
                         "not even one row fits: raise max_message_bytes")  # fmt: skip
                raise TooLarge(
                    f"the answer to {rows} rows would be {rows * per_row / 2**20:.3g} MiB, "
                    f"above this server's message limit of "
                    f"{self.transport_limit / 2**20:.3g} MiB; {fewer}"
                )
        cap = self.limits.max_inflight_bytes
        if size + request_bytes > cap:  # never held beside its request, however idle
            both = f" and its request {request_bytes / 2**20:.1f} MiB" if request_bytes else ""
            raise TooLarge(
                f"the answer to {rows} rows would be {size / 2**20:.1f} MiB{both}, more than "
                f"this server holds in flight ({cap / 2**20:.1f} MiB, "
                "limits.max_inflight_bytes); send fewer rows per request, or raise the limit"
            )
        return size

    def check_model_control(self) -> None:
        """Raise unless clients may load and unload models (``model_control: explicit``)."""
        if self.config.model_control == "poll":
            raise FailedPrecondition(
                "this server loads what changes in its repository (model_control: poll, "
                f"every {self.config.repository_poll_s:g} s): change the model's files "
                "instead; RepositoryModelLoad/Unload need model_control: explicit"
            )
        if self.config.model_control != "explicit":
            raise FailedPrecondition(
                f"model control is disabled on this server (model_control: "
                f"{self.config.model_control}); set model_control: explicit (with auth on a "
                "network address) for clients to load and unload models (gRPC or REST)"
            )

    def broken_reason(self, name: str) -> str:
        """Why ``name`` failed to load, for clients (RepositoryIndex); for a loaded model,
        why its last reload failed (the version loaded before serves), or ""."""
        if name in self.models:
            why = self.reload_failed.get(name)
            return self._public(
                f"serving the version loaded before; the last reload failed: {why}" if why else ""
            )
        return self._public(self.broken.get(name, ""))

    def _public(self, text: str) -> str:
        """``text`` for a client: the repository's own path left out ("<repository>/..."),
        as in every other message they get (the server log keeps it)."""
        root = self.repo.root
        for path in sorted({str(root.resolve()), str(root)}, key=len, reverse=True):
            # Whole paths only (a relative root "repo" made "the repository" "the
            # <repository>sitory"), and a relative one only where a path goes on from it: a
            # root named "models" is a word too (review helper-136, helper-140).
            end, start = (r"(?![\w.-])", "") if path.startswith("/") else (r"(?=/)", r"(?:\./)?")
            text = re.sub(rf"(?<![\w./-]){start}{re.escape(path)}{end}", "<repository>", text)
        return text

    def _mark_broken(self, name: str, why: str) -> str:
        """Record why ``name`` is not served; returns what to tell the caller besides."""
        if name in self.models:  # a failed reload: the loaded version keeps serving
            log.error("model %s: reload failed, the loaded version keeps serving: %s", name, why)
            self.reload_failed[name] = why
            self.metrics.load_failures.labels(name).inc()
            return " (the loaded version keeps serving)"
        configured = name in self.expected
        # (a folder this process may not look into: there is one)
        # (a model.yaml that is a folder or a link to nothing - an unmounted ConfigMap - is
        # there: its load failure is listed with its reason; helper-275)
        present = configured or something_at(self.repo.root / name / "model.yaml") is not False
        if not present:
            return ""  # a client's name for no model of the repository: nothing to report
        self.metrics.load_failures.labels(name).inc()
        if not (configured and self.phase is Phase.LOADING):  # load_all logs start-up's
            log.error("model %s: load failed: %s", name, why)
        self.broken[name] = why
        self.metrics.model_ready.labels(name).set(0)  # (not configured: an Unload clears it)
        return ""

    async def unload(self, name: str) -> None:
        try:
            check_model_name(name)
        except InvalidModelName as exc:
            raise InvalidArgument(str(exc)) from None
        async with self._lock:
            runtime = self.models.pop(name, None)
            if runtime is None and self.forget_failed(name):
                if something_at(self.repo.root / name / "model.yaml") is not False:
                    self.unloaded.add(name)  # (listed as unloaded, not as failed)
                log.info("model %s: its failed load forgotten (unloaded)", name)
                return
            if runtime is None and self.phase is Phase.LOADING and name in self.expected:
                # Start-up has not reached it yet: it must not load it after this unload,
                # which said OK (review helper-252) - actions on a model in the order asked.
                self._unloaded_early.add(name)
                if name not in self.config.models:  # (as below: the operator's word)
                    self.expected.discard(name)
                self._forget_series(name)  # (a named one's ready stays at 0 ...)
                if name in self.expected:  # (... and it is not loading)
                    self.metrics.model_loading.labels(name).set(0)
                self.unloaded.add(name)
                log.info("model %s unloaded before start-up loaded it", name)
                return
            if runtime is None:  # as Triton: "make sure it is unloaded" succeeds (its own
                # lifecycle tests unload unknown models and fail on any error)
                log.info("model %s: unload asked, and it is not loaded", name)
                return
            self.host_cpu.engine_threads = self._engine_threads()
            tierer = self.tierers.pop(name, None)
            if tierer is not None:
                tierer.stop()
            if name not in self.config.models:  # found in the repository, not named: an
                self.expected.discard(name)  # unload is the operator's word (as Triton's)
            # Kept across reloads, not past an unload: 4.8 MB each once full, for good, and a
            # later load's auto-tiering replayed the old traffic (review helper-133).
            self.traffic.pop(name, None)
            self._forget_series(name)
            if something_at(self.repo.root / name / "model.yaml") is False:
                # its folder is gone: nothing to list as unloaded (a name per model ever
                # unloaded was kept for good; review 203)
                self.in_repository.discard(name)
                self.unloaded.discard(name)
            else:
                self.in_repository.add(name)  # (loaded by a client after start-up: known now)
                self.unloaded.add(name)
            log.info("model %s unloaded", name)
            runtime.unbind_gauges()  # its series, whose callbacks hold it, go
            # Started before the lock is let go (the RPC may be cancelled from then on) and
            # awaited outside it, as a reload's: a stop lasts up to the drain and the running
            # batch (an engine stuck in a call: RUNNING_WAIT_S), and other models' loads,
            # unloads and swaps need not wait for it.
            retiring = self._start_retire(runtime, DRAIN_S)
        await asyncio.shield(retiring)

    def forget_failed(self, name: str) -> bool:
        """Forget the failed load of ``name`` - a model the config does not name and that is
        not loaded (a client's Load, or a folder the repository poll found): its series at 0
        fired the critical not-ready alert, which readiness ignores, for good - nothing but
        a successful load could clear it - and its load failures' count stayed a series per
        broken folder name (review 203). Also one found in the repository at start-up: it
        kept the server not ready, its alert firing, until a restart (review helper-252).
        Whether there was one to forget."""
        if name in self.models or name not in self.broken or name in self.config.models:
            return False
        del self.broken[name]
        self.expected.discard(name)  # (before the series: readiness no longer waits for it)
        self._forget_series(name)
        with contextlib.suppress(KeyError):
            self.metrics.load_failures.remove(name)
        return True

    def _forget_series(self, name: str) -> None:
        """An unloaded model's gauges: a model the config names stays in readiness at 0
        (health is NOT_SERVING without it, and the not-ready alert is right to fire); one
        found in the repository or loaded by a client later goes, with its auto-tiering
        gauges - an operator's deliberate unload must not leave a critical alert firing
        forever, nor the pod out of its Service."""
        gauges = [self.metrics.tier_set_gain, self.metrics.tier_set_swap_seconds,
                  self.metrics.tier_set_enabled]  # fmt: skip
        if name in self.expected:
            self.metrics.model_ready.labels(name).set(0)
        else:
            gauges += [self.metrics.model_ready, self.metrics.model_loading]
        for gauge in gauges:
            with contextlib.suppress(KeyError):  # never set for this model
                gauge.remove(name)

    def _engine_threads(self) -> int:
        """The engine threads the loaded models may run at once: a shared device's slots
        (each batch with its model's intra-op threads), or every model's own instances."""
        if not self.models:
            return 1
        if self.device is not None:  # per device: its slots, each with its models' threads
            devices = {id(m.device): m.device for m in self.models.values()}
            return sum(d.slots * max(m.config.threads for m in self.models.values()
                                     if m.device is d) for d in devices.values())  # fmt: skip
        return sum(m.pool.n * m.config.threads for m in self.models.values())  # (instances)

    def drain(self) -> None:
        self.phase = Phase.DRAINING
        self.closing.set()
        self._forget_now.set()

    def inflight(self) -> int:
        """Requests admitted and not yet answered, those of runtimes still draining after a
        reload, swap or unload included (shutdown waits for and reports them)."""
        # (not those retired with an engine hung, ``_hung``: a shutdown waited its whole
        # grace for them, and left the healthy models no time to stop)
        return sum(m.inflight for m in (*self.models.values(), *self._retiring))

    # -- health and metadata ---------------------------------------------------------------
    def live(self) -> bool:
        """Live unless an engine has been stuck in a batch for ``stuck_restart_s``
        (``not_live_reason``): the process is then restarted by whatever probes it."""
        return self.not_live_reason() is None

    def not_live_reason(self) -> str | None:
        """Why the process should be restarted, or None. A hung engine call cannot be
        interrupted: its thread and the slot it holds are lost until the process ends, and
        readiness keeps the pod out of its Service meanwhile - serving nothing, restarted by
        nothing. After ``stuck_restart_s`` more, liveness fails so the kubelet restarts it.
        Logged once per stuck spell, at ERROR."""
        limit = self.config.stuck_restart_s
        runtimes = (*self.models.values(), *self._retiring, *self._hung)
        worst, runtime = max(((m.stuck_for(), m) for m in runtimes), default=(0.0, None),
                             key=lambda pair: pair[0])  # fmt: skip
        if limit is None or worst <= 0.0 or worst < limit:  # (0: at once, if one is stuck)
            self._said_not_live = False
            return None
        why = (  # the runtime past the limit, not the first one stuck (review 172)
            f"{runtime.stuck()}; stuck {worst:.0f} s past readiness's rule, beyond "
            f"stuck_restart_s ({limit:g} s): restart the process to free the engine"
        )
        if not self._said_not_live:
            self._said_not_live = True
            log.error("liveness fails: %s", why)
        return why

    def ready(self) -> bool:
        """Ready when started, not draining, every expected model is loaded and none has an
        engine stuck in a batch (``ModelRuntime.stuck``)."""
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        if self.phase != Phase.READY:
            return f"server is {self.phase.value}"
        missing = sorted(self.expected - set(self.models))
        if missing:
            return "models not loaded: " + ", ".join(
                f"{n} ({self.broken.get(n) or self._not_loaded_state(n)})" for n in missing
            )
        return self._stuck_reason()

    def _not_loaded_state(self, name: str) -> str:
        """Why an expected model with no failure is not loaded, for readiness' reason."""
        if name in self.waiting_build:
            return "waiting for its `innfer build` to end"
        return "loading" if name in self.loading else "unloaded"

    def _stuck_reason(self, device: Device | None = None) -> str | None:
        """A batch hung on ``device`` (None: on any), said as a reason
        (``ModelRuntime.stuck``), or None."""
        # A runtime a reload retired with its engine hung holds the device's slot as much
        # as a served one: readiness said ready again after the reload.
        runtimes = (*self.models.values(), *self._retiring, *self._hung)
        return next((why for m in runtimes
                     if (device is None or m.device is device) and (why := m.stuck())),
                    None)  # fmt: skip

    def _device_for(self, served: ServedModel) -> Device | None:
        """The arbiter of the device ``served``'s engines compute on (None: none shared)."""
        if self.device is None:
            return None
        index = gpu_index(served)
        if index is None:
            return self.device
        if index not in self._gpu_devices:
            self._gpu_devices[index] = Device(self.config.device_slots, f"cuda:{index}")
        return self._gpu_devices[index]

    def input_check(self, m: ModelRuntime) -> Callable[[Any], None]:
        """A check of one input tensor's name, datatype and shape against ``m``'s inputs,
        for a front end to run before it decodes values the client sent as text (REST's JSON
        ``data``): the declared shape bounds that work, and 12 M values for a model of
        max_batch 4 held the event loop 6.7 s - every client's, gRPC's too - before the data
        plane refused the batch (review helper-265). The rules are ``_decode``'s (a masked or
        text model's width up to its padded columns); a text model's BYTES input: its rows.

        Example:
            >>> check = plane.input_check(plane.models["mnist"])  # doctest: +SKIP
            >>> check(tensor_of_shape_20000_1_28_28)  # doctest: +SKIP
            InvalidArgument: input 'input': batch 20000 is outside [1, 8] (max_batch)
        """
        cfg = m.config
        specs = {s.name: s for s in cfg.inputs}
        padded = cfg.text is not None or cfg.mask_input is not None
        longest = cfg.sequence_lengths[-1] if cfg.sequence_lengths else 0
        max_length = PADDED_COLUMNS if padded else longest
        text = cfg.text.input if cfg.text is not None else None

        def check(t) -> None:
            spec = specs.get(t.name)
            if spec is not None:
                codec.check_shape(t, spec, cfg.max_batch, max_length)
            elif t.name == text:
                if len(t.shape) > 2 or math.prod(t.shape) > cfg.max_batch:
                    raise InvalidArgument(
                        f"input {t.name!r}: shape {list(t.shape)}; send [rows] or [rows, 1] "
                        f"strings, at most {cfg.max_batch} rows (max_batch)"
                    )
            else:
                names = [*specs, *([text] if text else [])]
                raise InvalidArgument(
                    f"unknown input {clip(t.name)}; the model's inputs are {names}"
                )

        return check

    def count_malformed(self, name: str, seconds: float) -> None:
        """A request for model ``name`` refused as malformed before ``infer`` saw it (REST's
        JSON decode), ``seconds`` after it arrived: counted as ``infer`` counts its own - a
        failure in the model's statistics, an invalid request in its metrics - where the
        model is served (nothing otherwise: no model to count it against)."""
        m = self.models.get(name)
        if m is not None:
            m.stats.fail.add(seconds)
            m.count_invalid()

    def count_full(self, name: str, seconds: float) -> None:
        """A request for model ``name`` refused because the in-flight cap was full before
        ``infer`` saw it (REST, while its body arrived), ``seconds`` after it arrived:
        counted as ``_admit`` counts a gRPC one - refused_full (load: the autoscaler's and
        the alerts' series) and a failure in the model's statistics. Its budget is in the
        body not read, so the traffic log auto-tiering replays does not have it."""
        m = self.models.get(name)
        if m is not None:
            m.stats.fail.add(seconds)
            m.count_refused("refused_full", "refused_full")

    def model(self, name: str, version: str = "") -> ModelRuntime:
        if self.phase == Phase.DRAINING:
            self.turned_away += 1  # a stop waits until calls stop coming (server.app)
            raise Unavailable("the server is shutting down; retry on another replica")
        if version not in ("", VERSION):
            parameters.check_version(name, version)
        runtime = self.models.get(name)
        if runtime is None:
            starting = self.phase == Phase.LOADING and name in self.expected
            if name in self.loading:  # (before broken: a failed model loaded again)
                # (start-up's, a RepositoryModelLoad's or the repository poll's: it said "a
                # RepositoryModelLoad is in progress" of a start-up load; review helper-240)
                raise Unavailable(f"model {clip(name)} is {'still ' * starting}loading; "
                                  "retry shortly")  # fmt: skip
            if name in self.broken:  # not a typo, and retrying here will not help
                raise ModelBroken(
                    f"model {clip(name)} failed to load, so it is not served; RepositoryIndex "
                    "and the server log say why (fix it, then "
                    + {
                        "explicit": "load it again or restart)",
                        "poll": "the repository poll loads it once its files change)",
                    }.get(self.config.model_control, "restart the server: model_control is none)")
                )
            if starting:  # (its turn to load at start-up has not come yet)
                raise Unavailable(f"model {name!r} is still loading; retry shortly")
            loaded = ", ".join(sorted(self.models)) or "none"
            hint = self._not_loaded_hint(name)
            if hint:
                raise NotFound(f"model {clip(name)} is in the repository but not loaded; "
                               f"{hint}; loaded models: {loaded}")  # fmt: skip
            raise NotFound(f"unknown model {clip(name)}; models: {loaded}")
        return runtime

    def _not_loaded_hint(self, name: str) -> str:
        """How to serve ``name`` where the repository held it at start-up (or it was
        unloaded since) and this server does not serve it; "" for any other name. No disk
        access: the names are ``in_repository``'s."""
        if name not in self.in_repository:
            return ""
        if self.config.model_control == "explicit":
            return f"load it first (RepositoryModelLoad; tritonclient: load_model({name!r}))"
        if self.config.models:
            return "the server config's models list does not name it: add it and restart"
        return ""  # (every model was loaded at start-up; one that failed is ``broken``)

    def model_ready(
        self, name: str, version: str = "", unknown: type[NotFound] | None = None
    ) -> bool:
        """ModelReady: loaded, and not wedged - every slot held by a hung engine answered
        true while each request was refused UNAVAILABLE (review helper-153). A name or
        version not served here is False too, or with ``unknown`` (NotFound) its error, which
        says why (REST's 404)."""
        try:
            m = self.model(name, version)
        except NotFound:
            if unknown is not None:
                raise
            return False
        except (Unavailable, FailedPrecondition):  # a malformed version ("abc", "-1") is
            return False  # the client's error: INVALID_ARGUMENT, as Triton's
        return m.wedged() is None

    def server_metadata(self) -> pb.ServerMetadataResponse:
        extra = ("system_shared_memory",) if self.shared_memory.enabled else ()
        if self.config.http_port is not None:  # Triton's binary tensors: REST's
            extra += ("binary_tensor_data",)
        return pb.ServerMetadataResponse(
            name="innfer", version=__version__, extensions=EXTENSIONS + extra
        )

    def tiers_json(self, m: ModelRuntime) -> str:
        """Tier list clients may ask for: name, width, accuracy, profiled p50 at batch 1 - for
        a model with sequence lengths, at its longest (``latency_tokens``), and per length
        in ``latency_ms_batch1_by_tokens`` (one 256-token figure read as the tier's latency
        for every sentence)."""
        rows = []
        profile = m.served.profile or {"tiers": {}}
        lengths = profile.get("lengths") or {}
        for name, rec in m.served.tiers.items():
            p50 = profile["tiers"].get(name, {}).get("1", {}).get("p50_ms")
            row = {"name": name, "width": rec.width, "accuracy": rec.accuracy,
                   "latency_ms_batch1": p50, "flops": rec.flops,
                   "onnx_sha256": rec.onnx_sha256}  # fmt: skip
            if lengths:
                row["latency_tokens"] = max(int(n) for n in lengths)
                row["latency_ms_batch1_by_tokens"] = {
                    n: t.get(name, {}).get("1", {}).get("p50_ms")
                    for n, t in sorted(lengths.items(), key=lambda kv: int(kv[0]))
                }
            rows.append(row)
        return json.dumps(rows)

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        m = self.model(name, version)
        resp = pb.ModelMetadataResponse(name=name, versions=[VERSION], platform="innfer_inn")
        if m.config.text is not None:  # either this alone, or the model's own inputs
            resp.inputs.add(name=m.config.text.input, datatype="BYTES", shape=[-1, 1])
        for spec, field in ((m.config.inputs, resp.inputs), (m.config.outputs, resp.outputs)):
            for t in spec:
                field.add(name=t.name, datatype=codec.oip_datatype(t.dtype), shape=[-1, *t.shape])
        return resp

    # -- inference -------------------------------------------------------------------------
    async def infer(
        self,
        request: pb.ModelInferRequest,
        time_remaining: float | None,
        waited_s: float = 0.0,
        size: int | None = None,
        raw: Sequence[memoryview] | None = None,
        deadline_is_budget: bool = True,
        window: StreamWindow | None = None,
        transport: Transport | None = None,
    ) -> pb.ModelInferResponse:
        """Answer one request. ``time_remaining``: seconds to the call's gRPC deadline, if
        any - the request's budget where it sends none (``deadline_is_budget``: a unary
        call's), else only a cap (a stream's deadline is the whole stream's, not each
        request's); ``waited_s``: seconds since the transport began parsing it (counted
        against its budget); ``size``: its bytes on the wire, if known; ``raw``: its
        raw_input_contents when the transport took them out of the message uncopied
        (server/wire.py), else None; ``window``: the stream's, which the bytes the request
        holds of the in-flight cap count against too (None: a unary call); ``transport``:
        its frontend's trace stamps - a traced request's trace is then left in it for the
        frontend to finish once the answer is sent (``RequestTraces.sent``), not finished
        here."""
        m = self.model(request.model_name, request.model_version)
        start = m.clock()
        token = SERVED_BY.set(m)
        # (an id over max_id_bytes is refused below, but a sampled trace kept it whole, and
        # wrote it to the trace file: 300 ids of 1 MB, +290 MiB; review helper-260)
        rid = request.id if parameters.id_size(request.id, self.limits.max_id_bytes) else ""
        trace = self.traces.start(m.name, rid)
        traced = TRACED.set(trace)
        if trace is not None:
            if transport is not None:
                transport.received(trace)
            trace.stamp("REQUEST_START")
        try:
            return await self._admit(m, request, time_remaining, waited_s, size, raw,
                                     deadline_is_budget, window)  # fmt: skip
        except Exception:  # Triton's fail: every error after the model is known, once (a
            # cancelled call is no Exception: not one) - in the statistics of the runtime
            # that had the request last (its successor's, after a hand-over: _successor)
            SERVED_BY.get().stats.fail.add(m.clock() - start)
            raise
        finally:
            SERVED_BY.reset(token)
            TRACED.reset(traced)
            if trace is not None:  # answered, failed or cancelled: its end all the same
                trace.stamp("REQUEST_END")
                if transport is not None:  # the frontend finishes it once it has sent
                    transport.trace = trace
                else:
                    self.traces.finish(trace)

    async def _admit(
        self,
        m: ModelRuntime,
        request: pb.ModelInferRequest,
        time_remaining: float | None,
        waited_s: float,
        size: int | None,
        raw: Sequence[memoryview] | None,
        deadline_is_budget: bool,
        window: StreamWindow | None,
    ) -> pb.ModelInferResponse:
        """``infer`` past the model's lookup: the in-flight cap, then the request."""
        size = request.ByteSize() if size is None else size
        size += self.shared_memory.input_bytes(request)  # copied out at the decode
        cap = self.limits.max_inflight_bytes
        if size > cap:  # alone above the cap: a retry, on any replica, is refused the same
            # way - the request as sent, not load: counted as invalid, not as a shed request
            # (the autoscaler adds replicas for those)
            m.count_invalid()
            raise self.over_cap(size)
        if self.inflight_bytes + size > cap:
            m.count_refused("refused_full", "refused_full")  # load this replica cannot take
            self._log_refused(m, request, time_remaining, waited_s, deadline_is_budget)
            raise self._full()
        self.hold(size, window)
        try:
            return await self._infer(m, request, time_remaining, waited_s, raw,
                                     deadline_is_budget, window, size)  # fmt: skip
        except (InvalidArgument, NotFound) as exc:  # the client's request, not load: not a miss
            if not getattr(exc, "counted", False):  # the runtime counted what its engine refused
                SERVED_BY.get().count_invalid()
            raise
        finally:
            self.release(size, window)

    def over_cap(self, size: int) -> TooLarge:
        """The refusal of a request of ``size`` bytes, more than the in-flight cap holds at
        all: not load - a retry, on any replica, is refused the same way."""
        cap = self.limits.max_inflight_bytes
        return TooLarge(
            f"the request is {size / 2**20:.1f} MiB, more than this server takes in flight "
            f"({cap / 2**20:.1f} MiB, limits.max_inflight_bytes); send fewer rows per "
            "request, or raise the limit"
        )

    def _full(self) -> ResourceExhausted:
        """The refusal of a request the in-flight cap has no room for: load."""
        return ResourceExhausted(
            f"{self.inflight_bytes / 2**20:.1f} MiB of requests and answers are in flight "
            f"(limit {self.limits.max_inflight_bytes / 2**20:.0f} MiB, "
            "limits.max_inflight_bytes); retry shortly or send smaller batches - or, on a "
            "stream, read its answers: they count until read"
        )

    def hold(self, nbytes: int, window: StreamWindow | None = None) -> int:
        """Count ``nbytes`` as in flight - against the server's cap and ``window``, the
        stream's, if any - until ``release(nbytes, window)``: a request's from its admission
        until answered; its answer's reserved size from its decode until made, then the
        answer's own until it is sent (a stream's until its client reads it).

        Example:
            >>> held = plane.hold(resp.ByteSize(), window)  # doctest: +SKIP
            >>> plane.release(held, window)  # written, or dropped  # doctest: +SKIP
        """
        self.inflight_bytes += nbytes
        if window is not None:
            window.add(nbytes)
        return nbytes

    def release(self, nbytes: int, window: StreamWindow | None = None) -> None:
        """The end of ``hold(nbytes, window)``."""
        self.inflight_bytes -= nbytes
        if window is not None:
            window.sub(nbytes)

    def _log_refused(
        self,
        m: ModelRuntime,
        request: pb.ModelInferRequest,
        time_remaining: float | None,
        waited_s: float,
        deadline_is_budget: bool,
    ) -> None:
        """Log a request refused before its decode as traffic all the same, from its
        parameters and first input's batch dim (clamped to ``max_batch``): auto-tiering
        replays what clients sent, and a window without what a full server shed would
        understate the load a tier set is chosen for. Nothing where auto-tiering is off, or
        for parameters that do not parse (not traffic: the client's mistake)."""
        if m.traffic is None:
            return
        if time_remaining is not None and self._plans_overhead(m):
            # as _infer counts a served request's budget: with plan_overhead from the
            # parse's start (the deadline was read after it), else from the handler's
            time_remaining += waited_s
        try:
            default_ms = m.config.default_latency_budget_ms
            budget_s, _ = parameters.budget(request.parameters, time_remaining, default_ms,
                                  deadline_is_budget)  # fmt: skip
        except InvalidArgument:
            return
        shape = request.inputs[0].shape if request.inputs else ()
        rows = min(max(int(shape[0]) if shape else 1, 1), m.config.max_batch)
        m.record_traffic(m.clock() - waited_s, budget_s - m.margin_s, rows)

    async def _infer(
        self,
        m: ModelRuntime,
        request: pb.ModelInferRequest,
        time_remaining: float | None,
        waited_s: float,
        raw: Sequence[memoryview] | None = None,
        deadline_is_budget: bool = True,
        window: StreamWindow | None = None,
        size: int = 0,
    ) -> pb.ModelInferResponse:
        """``_admit`` past the in-flight cap; ``size``: the request's bytes it holds."""
        id_bytes = parameters.id_bytes(request.id, self.limits.max_id_bytes)
        deadline_s = time_remaining  # as the call gave it (a refusal logs its traffic)
        params = request.parameters
        if len(params) > self.limits.max_parameters:
            raise InvalidArgument(
                f"{len(params)} request parameters; at most {self.limits.max_parameters}"
            )
        check_parameter_names(params)
        # The budget is the client's end to end. What this process spends outside queue and
        # compute is learned (server.overhead) and, with plan_overhead, planned for; the
        # margin covers what it cannot see (the client's own processing, the sockets).
        plans = self._plans_overhead(m)
        read_remaining = time_remaining  # (as read at the handler's start)
        if plans and time_remaining is not None:
            # The gRPC deadline was read at this handler's start, after the parse; plans
            # count the budget from the parse's start (``waited_s`` before it), so the
            # deadline is that much further from there - else the parse counts twice.
            time_remaining += waited_s
        budget_s, source = parameters.budget(
            params, time_remaining, m.config.default_latency_budget_ms, deadline_is_budget
        )
        due_at = None  # a stream's deadline, where it made the budget (``ModelRuntime.infer``)
        by_deadline = budget_s == time_remaining  # (not Triton's timeout, where both cut it)
        if window is not None and source.startswith("stream deadline") and by_deadline:
            due_at = (window.deadline_at(m.name, m.clock(), read_remaining)
                      - self.config.budget_margin_ms / 1e3)  # fmt: skip
        budget_s -= self.config.budget_margin_ms / 1e3
        asked_s = None  # the budget asked for, where the call's deadline cut it (``infer``)
        if source in ("deadline", "deadline and timeout") and "latency_budget_ms" in params:
            asked, _ = parameters.budget(params, None, m.config.default_latency_budget_ms)
            asked_s = asked - self.config.budget_margin_ms / 1e3
        # The budget is what the call's deadline had left when this handler read it: what
        # it lost before (gRPC's queue on a busy server) is not known (``ModelRuntime``).
        deadline_only = source == "deadline" and "latency_budget_ms" not in params
        pin = parameters.string_param(params, "tier")
        min_tier = parameters.string_param(params, "min_tier")
        priority = parameters.priority_level(
            params, m.config.priority_levels, m.config.default_priority_level
        )
        decoding = m.clock()
        # When the request is due, as far as its decode can tell (the plan's reserve for
        # the overhead comes after): a text still queued for the tokenizer threads then is
        # refused at that moment, not encoded for an answer that would be late.
        clock = DecodeClock(
            due=decoding - (waited_s if plans else 0.0) + budget_s, budget_s=budget_s,
            cut=asked_s is not None,
        )  # fmt: skip
        try:
            inputs, rows, truncated = await self._decode(m, request, raw, clock)
        except DeadlineExceeded as exc:  # a long text's: said as the scheduler's refusals are
            raise _with_source(exc, source) from None
        m = self._successor(m)  # swapped or reloaded while a long text was tokenized
        SERVED_BY.set(m)
        reserve_s = grace_s = 0.0
        if plans:
            # Plans leave room for the overhead's high quantile - of the request's own lane:
            # a text model's long texts cost more to tokenize - and admission, which refuses
            # only what its median plan misses, gets back the part above its median. A long
            # text's wait for a tokenizer thread is counted as well: near zero while the
            # threads keep up (what the reserve learnt), seconds when they do not.
            reserve_s, grace_s = m.overhead_for(m.lane_for(inputs)).reserve()
            budget_s -= reserve_s
            waited_s += clock.queued_s
        else:
            # The budget counts from the decode's start: what the decode took is the
            # client's time too (microseconds for tensors; for long texts, their wait for
            # the tokenizer threads, which under load runs to seconds - before, unseen).
            waited_s = m.clock() - decoding
        outputs = codec.requested_outputs(request, m.config.outputs, self.limits)
        try:
            answer_bytes = self._answer_bytes(rows, outputs, id_bytes, size)
        except TooLarge:
            m.count_invalid()  # too many rows for any replica's transport: not load
            raise
        # The answer is in flight from here until it is sent (a stream's until its client
        # reads it: ``hold``): an answer many times its request - embeddings of short texts,
        # a large output - is what a client that sends without reading piles up.
        if self.inflight_bytes + answer_bytes > self.limits.max_inflight_bytes:
            m.count_refused("refused_full", "refused_full")
            self._log_refused(m, request, deadline_s, waited_s, deadline_is_budget)
            raise self._full()
        self.hold(answer_bytes, window)
        if window is not None:  # charged now: the advance its stream made on it goes back
            window.charged(asyncio.current_task())
        leases: dict[str, Lease] = {}
        try:
            self._lease_outputs(outputs, rows, leases)
            resp = await self._run(
                m, request, inputs, rows, outputs, budget_s, pin, min_tier, priority,
                waited_s, reserve_s, grace_s, leases, asked_s, due_at, deadline_only,
            )  # fmt: skip
        except DeadlineExceeded as exc:
            raise _with_source(exc, source) from None
        finally:
            self.shared_memory.release(leases.values())
            self.release(answer_bytes, window)
        if truncated:  # texts cut at the model's max_length (truncate=true, the default)
            resp.parameters["truncated_rows"].string_param = json.dumps(truncated)
            self.metrics.truncated_texts.labels(m.name).inc(len(truncated))
        return resp

    def _successor(self, m: ModelRuntime) -> ModelRuntime:
        """``m``, or - where ``m`` began to stop (a swap, a reload) while this request was
        decoded - the runtime now serving its name, if it decodes requests alike (the same
        inputs, text settings, id ranges and tokenizer file): a long text awaits the
        tokenizer threads, and the swap's promise that no accepted request fails held for
        every request but those (UNAVAILABLE while the successor already served; review
        helper-132). Otherwise ``m``, which refuses it UNAVAILABLE ("retry")."""
        if not m.stopping:
            return m
        nxt = self.models.get(m.name)
        if nxt is None or nxt is m or nxt.stopping:
            return m
        if (nxt.config.inputs, nxt.config.text, nxt.input_rows) != (
            m.config.inputs,
            m.config.text,
            m.input_rows,
        ):
            return m
        old_tok, new_tok = m.served.tokenizer, nxt.served.tokenizer
        if (old_tok is None) != (new_tok is None) or (
            old_tok is not None and old_tok.sha256 != new_tok.sha256
        ):
            return m
        return nxt

    def _lease_outputs(self, outputs, rows: int, leases: dict[str, Lease]) -> None:
        """Hold, in ``leases`` (by name), the shared-memory slices ``outputs`` are to be
        written to until the answer is made, each checked to hold ``rows`` rows first. Filled
        in place: where one fails (a region not registered: NotFound), the caller's release
        gives back those taken before it - they stayed held for good when only
        InvalidArgument was caught (review 205)."""
        for o in outputs:
            if o.shared is not None:
                needs = rows * codec.tensor_row_bytes(o.spec)
                leases[o.name] = self.shared_memory.lease(o.shared, f"output {o.name!r}", needs)

    async def _run(
        self, m: ModelRuntime, request: pb.ModelInferRequest, inputs: dict, rows: int,
        outputs, budget_s: float, pin: str | None, min_tier: str | None, priority: int,
        waited_s: float, reserve_s: float, grace_s: float, leases: dict[str, Lease],
        asked_s: float | None = None, due_at: float | None = None, deadline_only: bool = False,
    ) -> pb.ModelInferResponse:  # fmt: skip
        """``_infer`` past admission: the scheduler's run of the decoded ``inputs``, and the
        answer with its tier, timings and the budget planned with (outputs with ``leases``
        written to shared memory)."""
        trace = TRACED.get()
        if trace is not None:
            trace.stamp("QUEUE_START")
        result = await m.infer(
            inputs, rows, budget_s, pin, min_tier, priority, waited_s,
            reserve_s=reserve_s, grace_s=grace_s, asked_s=asked_s, due_at=due_at,
            deadline_only=deadline_only,
        )  # fmt: skip
        if trace is not None:  # the batch's run, placed by the scheduler's own timings
            compute_start = trace.timestamps[-1]["ns"] + 1000 * result.queue_us
            trace.stamp("COMPUTE_START", compute_start)
            trace.stamp("COMPUTE_END", compute_start + 1000 * result.compute_us)
            trace.tier = result.tier
        resp = pb.ModelInferResponse(model_name=m.name, model_version=VERSION, id=request.id)
        codec.encode_outputs(resp, result.outputs, outputs, leases)
        p = resp.parameters
        p["tier"].string_param = result.tier
        if isinstance(result.width, float):
            p["width"].double_param = result.width
        else:
            p["width"].string_param = result.width
        p["queue_us"].int64_param = result.queue_us
        p["compute_us"].int64_param = result.compute_us
        p["batch_size"].int64_param = result.batch_size
        if result.lane:  # a text model: the profiled length it was planned at
            p["sequence_length"].int64_param = result.lane
        # The budget the server planned with (after the margin): says which source won
        # (parameter, gRPC deadline or the model's default) and what was left of it.
        p["budget_us"].int64_param = int(budget_s * 1e6)
        return resp

    def answered(self, resp: pb.ModelInferResponse, total_s: float, waited_s: float = 0.0) -> None:
        """``resp`` left the server ``total_s`` after its handler began (its request parsed):
        teach its model the overhead (the part outside queue and compute: decoding before
        the scheduler's stamp, the hop back, encoding and sending)."""
        m = self.models.get(resp.model_name)
        p = resp.parameters
        if m is None or "queue_us" not in p or "compute_us" not in p:
            return
        inside_us = p["queue_us"].int64_param + p["compute_us"].int64_param
        lane = p["sequence_length"].int64_param if "sequence_length" in p else 0
        overhead = m.overheads.get(lane, m.overhead)  # a reloaded model: other lanes
        # Alone: a batch of its own that did not wait (a quiet server; Overhead.quiet).
        alone = p["batch_size"].int64_param == 1 and p["queue_us"].int64_param < QUIET_QUEUE_S * 1e6
        overhead.observe(total_s - inside_us / 1e6, waited_s, alone)

    async def _decode(
        self,
        m: ModelRuntime,
        request,
        raw: Sequence[memoryview] | None = None,
        clock: DecodeClock | None = None,
    ) -> tuple[dict, int, list[int]]:
        """The model's input arrays and rows: from the tensors as sent, or - for a text
        model sent its text input alone - from the strings, tokenized here; and the rows
        whose text was truncated at the model's ``max_length`` (the request parameter
        ``truncate=false`` refuses such a text instead). ``raw``: the request's
        raw_input_contents, when not in ``request`` itself; ``clock``: when its budget
        runs out, and where ``_tokenize`` notes the wait for a tokenizer thread."""
        cfg = m.config
        text = cfg.text
        n = len(request.inputs)
        if n > self.limits.max_inputs:  # counted before any scan of them (the any() below)
            raise InvalidArgument(
                f"{n} inputs given; at most {self.limits.max_inputs} are accepted "
                f"(limits.max_inputs); model {m.name}'s inputs are "
                f"{sorted(s.name for s in cfg.inputs)}"
            )
        # checked on ids requests too, where it changes nothing: a typo is not let through
        truncate = text is not None and parameters.bool_param(
            request.parameters, "truncate", default=True
        )
        if text is not None and any(t.name == text.input for t in request.inputs):
            texts = codec.decode_text(
                request, text.input, cfg.max_batch, text_bytes(cfg), self.limits, raw,
                self.shared_memory,
            )  # fmt: skip
            try:
                ids, mask, truncated = await self._tokenize(m, texts, clock)
            except TokenizerError as exc:  # it reached the client as INTERNAL "see logs",
                # counted nowhere but gRPC's codes (review 173)
                m.count_refused("failed", "failed")
                raise TokenizerFailed(f"model {m.name}: {exc}") from None
            if truncated and not truncate:
                row = min(truncated)
                raise InvalidArgument(
                    f"{text.input}[{row}] is {truncated[row]} tokens, over max_length "
                    f"{text.max_length}; shorten it or send truncate=true"
                )
            empty = np.flatnonzero(~mask.any(axis=1))
            if len(empty):  # a tokenizer that adds no [CLS]/[SEP] makes nothing of ""
                # (run alone: INTERNAL from the engine's reshape, counted as a failure;
                # beside other texts: a zero vector, served as an embedding)
                raise InvalidArgument(
                    f"{text.input}[{int(empty[0])}] gives no tokens: model {m.name}'s "
                    "tokenizer makes nothing of it (empty, or only characters it drops); "
                    "send text with at least one word"
                )
            arrays = {text.ids: ids, text.mask: mask}
            arrays = {k: a.astype(cfg.input(k).dtype, copy=False) for k, a in arrays.items()}
            return arrays, len(texts), sorted(truncated)
        max_length = cfg.sequence_lengths[-1] if cfg.sequence_lengths else 0
        if text is None and cfg.mask_input is None:
            arrays, rows = codec.decode_inputs(
                request, cfg.inputs, cfg.max_batch, self.limits, max_length, raw,
                shared=self.shared_memory,
            )  # fmt: skip
            if m.input_rows:
                codec.check_ids(arrays, m.input_rows)
            return arrays, rows, []
        if text is None:  # a mask the clients send (mask_input): as a text model's, below
            mask_name = cfg.mask_input
            arrays, rows = self._decode_masked(request, cfg, raw, mask_name, mask_name, max_length)
            codec.check_mask(arrays[mask_name], mask_name)  # 0 / 1, right-padded (helper-142)
            arrays = codec.zero_padding(arrays, cfg.inputs, mask_name)
            if m.input_rows:
                codec.check_ids(arrays, m.input_rows)
            return arrays, rows, []
        names = {t.name for t in request.inputs[: self.limits.max_inputs + 1]}
        if not names or not names <= {s.name for s in cfg.inputs}:
            raise InvalidArgument(
                f"model {m.name} takes text as {text.input!r} (BYTES, shape [-1, 1]) alone, "
                f"or token ids as {text.ids!r} and {text.mask!r}; got inputs "
                f"{', '.join(sorted(clip(n) for n in names)) or 'none'}"
            )
        arrays, rows = self._decode_masked(
            request, cfg, raw, text.mask, text.ids, max_length,
            f", or the text as {text.input!r} (truncated to fit)",
        )  # fmt: skip
        arrays = codec.zero_padding(arrays, cfg.inputs, text.mask)
        codec.check_token_inputs(
            arrays[text.ids], arrays[text.mask], m.served.tokenizer.vocab_size, text.ids, text.mask
        )
        if m.input_rows:  # other id inputs (token_type_ids); ids: the tokenizer's, above
            codec.check_ids(arrays, m.input_rows)
        return arrays, rows, []

    def _decode_masked(
        self, request, cfg, raw, mask_name: str, shown: str, max_length: int, fix: str = ""
    ) -> tuple[dict, int]:
        """The inputs of a model whose padding a mask covers (text:'s, or ``mask_input``),
        decoded at any width and cut after the last column any row's mask marks: a client
        padding to its tokenizer's model_max_length (MiniLM's 512, beyond the longest lane)
        sends short text wide, and it runs and is planned at its real length. Past the
        longest profiled length: InvalidArgument naming ``shown`` (a row without a token
        is the caller's mask check's to refuse)."""
        arrays, rows = codec.decode_inputs(
            request, cfg.inputs, cfg.max_batch, self.limits, PADDED_COLUMNS, raw,
            length_is="the most columns sequence inputs may have before their padding is cut",
            shared=self.shared_memory,
        )  # fmt: skip
        arrays = _cut_padding(arrays, cfg, mask_name)
        width = arrays[mask_name].shape[1]
        if width > max_length and arrays[mask_name].any():
            # A left-padded row keeps every column up to its last token: said as what it
            # is, not as too long (review 173: 4 tokens padded left to 64 were told to send
            # shorter sequences)
            codec.check_mask(arrays[mask_name], mask_name)
            raise InvalidArgument(
                f"input {shown!r}: sequence length {width} is outside [1, {max_length}] (the "
                "longest profiled length; counted to the last column any row's mask marks, "
                f"the padding after it cut); send shorter sequences{fix}"
            )
        return arrays, rows

    async def _tokenize(
        self, m: ModelRuntime, texts: list[str], clock: DecodeClock | None = None
    ) -> Encoded:
        """``m``'s tokenizer's encoding of ``texts``: inline when they are short, else on the
        tokenizer threads while the loop serves other requests (inline once those are shut
        down: the server stopping). Texts no thread has taken by ``clock.due`` (the
        request's budget has run out) are refused then and never encoded
        (DEADLINE_EXCEEDED, counted as a refusal): under more long text than the threads
        keep up with, the queue sheds what could only be answered late instead of growing
        behind it. A budget already spent when they would be queued (below the margin) is
        refused at once, never queued nor encoded: it waited behind the threads' backlog
        and was tokenized only to be refused by the scheduler (review helper-250).
        ``clock.queued_s``: how long they waited for a thread."""
        tokenizer = m.served.tokenizer
        chars = sum(len(s) for s in texts)
        if chars <= TOKENIZE_INLINE_CHARS and m.tokenizer_pace.inline(m.clock()):
            t0 = time.perf_counter()
            encoded = tokenizer.encode_rows(texts)
            said = m.tokenizer_pace.judge(time.perf_counter() - t0, chars, m.clock())
            if said is not None:
                log.warning("model %s: %s", m.name, said)
            return encoded
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        start = m.clock()
        clock = clock or DecodeClock()
        if clock.due <= start:
            # (below the margin from the start: the client's ask - unless the call's deadline
            # cut a larger ask: then the time it lost before the server read the call, load,
            # as ModelRuntime._refusal counts it; spent here since: load)
            why = "refused_budget" if clock.budget_s <= 0 and not clock.cut else "refused_deadline"
            m.count_refused("refused_deadline", why)
            m.record_traffic(clock.due - clock.budget_s, clock.budget_s, len(texts))
            raise DeadlineExceeded(
                f"model {m.name}: the request's budget was spent before its texts could be "
                f"tokenized ({1e3 * clock.budget_s:.1f} ms left after the server's margin, "
                f"{1e3 * (start - clock.due):.1f} ms past it now); send a larger "
                "latency_budget_ms"
            )
        due = clock.due
        # A request cancelled while its texts wait (its client gave up: in-flight bytes are
        # released) must not still cost the threads its encoding: a client sending long
        # texts with tiny deadlines would queue unbounded work otherwise.
        gone = threading.Event()
        done.add_done_callback(lambda f: gone.set() if f.cancelled() else None)

        def settle(result, error: Exception | None) -> None:
            if done.done():  # the request was cancelled meanwhile
                return
            if error is None:
                done.set_result(result)
            else:
                done.set_exception(error)

        started = threading.Event()

        def expire() -> None:
            # On the loop, at the budget's end: texts no thread has taken yet are refused
            # now - the client hears at its deadline, not when a thread frees up, and the
            # request's in-flight bytes are released - and will not be encoded (``gone``).
            if not started.is_set() and not done.done():
                gone.set()
                settle(None, _TokenizerLate())

        def encode() -> None:
            if gone.is_set():
                return
            started.set()
            took = m.clock()
            clock.queued_s = took - start  # one float written before settle: seen after it
            if took >= due:  # (the timer below is due too, and may not have run yet)
                with contextlib.suppress(RuntimeError):  # the loop is gone (process exit)
                    loop.call_soon_threadsafe(settle, None, _TokenizerLate())
                return
            try:
                result, error = tokenizer.encode_rows(texts), None
            except Exception as exc:  # (TokenizerError) raised in the request's handler
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is gone (process exit)
                loop.call_soon_threadsafe(settle, result, error)

        try:
            self.tokenizer_threads.submit(encode)
        except RuntimeError:  # shut down: a request decoded past the grace period
            return tokenizer.encode_rows(texts)
        timer = loop.call_later(due - start, expire) if due < math.inf else None
        try:
            return await done
        except asyncio.CancelledError:
            # Its client went away while the texts waited or were encoded: the runtime never
            # saw the request, so it is counted here, once, as the runtime counts a cancel
            # (nothing counted it: review 161).
            # (``clock.due`` is the plan's: the client's is the margin later)
            margin = self.config.budget_margin_ms / 1e3
            m.count_cancel(clock.due - clock.budget_s, clock.due + margin, True, m.clock())
            raise
        except _TokenizerLate:
            m.count_refused("refused_deadline", "refused_deadline")
            # Traffic all the same: auto-tiering replays what clients sent, and a window
            # without the requests refused here would understate the load it chooses for.
            if clock.budget_s < math.inf:
                m.record_traffic(clock.due - clock.budget_s, clock.budget_s, len(texts))
            raise DeadlineExceeded(
                f"model {m.name}: the request's budget ran out while its texts waited "
                f"{1e3 * (m.clock() - start):.0f} ms for the tokenizer threads; the server "
                "has more long text to tokenize than it keeps up with: retry later, send "
                "shorter texts, or spread the load over more replicas"
            ) from None
        finally:
            if timer is not None:
                timer.cancel()


@dataclass
class DecodeClock:
    """A request's budget as its decode sees it: ``due`` (``ModelRuntime.clock``), the
    budget after the margin (``budget_s``: it counts from ``due - budget_s``), and the
    seconds its texts waited for a tokenizer thread (``queued_s``, set by ``_tokenize``)."""

    due: float = math.inf
    queued_s: float = 0.0
    budget_s: float = math.inf
    cut: bool = False  # the call's deadline cut the budget the client asked for


class _TokenizerLate(Exception):
    """A text's budget ran out before a tokenizer thread took it (``DataPlane._tokenize``)."""


def _with_source(exc: DeadlineExceeded, source: str) -> DeadlineExceeded:
    """A refusal with what raises the budget it had (``BUDGET_SOURCES[source]``) - and,
    where a timeout or the call's deadline cut it, without the advice to send a larger
    latency_budget_ms: the cap cuts any, and the client came back for nothing (review
    helper-258)."""
    if not BUDGET_SOURCES[source]:
        return exc
    said = str(exc)
    if "deadline" in source or "timeout" in source:
        said = said.replace("send a larger latency_budget_ms, or allow", "allow")
        said = said.replace(": send a larger latency_budget_ms;", ";")
        said = said.replace("; send a larger latency_budget_ms", "")
        said = said.replace(", or send a larger latency_budget_ms", "")
    return DeadlineExceeded(f"{said}; {BUDGET_SOURCES[source]}")


def _set_external(runtime: ModelRuntime, factor: float) -> None:
    """Every lane of ``runtime`` plans with outside load ``factor`` (``set_external``)."""
    for lane in runtime.lanes.values():
        lane.latency.set_external(factor)


def _cut_padding(arrays: dict, cfg, mask_name: str) -> dict:
    """Token inputs as sent, cut (views) after the last column where any row's mask is 1:
    a client that pads to a fixed length (``max_length=256``) sends a 4-token sentence as
    256 columns, which was planned (its lane), counted (``innfer_request_tokens``) and run
    at 256 tokens. What is cut is padding the model masks out: the embedding is the same."""
    used = np.flatnonzero(arrays[mask_name].any(axis=0))
    if not len(used) or used[-1] + 1 == arrays[mask_name].shape[1]:
        return arrays
    width = int(used[-1]) + 1
    out = dict(arrays)
    for t in cfg.inputs:
        if t.dynamic:  # (rows, tokens): the codec checked they agree on the length
            cut = [slice(None)] * arrays[t.name].ndim
            cut[1 + t.dynamic[0]] = slice(0, width)
            out[t.name] = arrays[t.name][tuple(cut)]
    return out


def _valid_name(name: str) -> bool:
    """Whether ``name`` may name a model (``check_model_name``)."""
    try:
        check_model_name(name)
    except InvalidModelName:
        return False
    return True


def _largest_message(cfg) -> int:
    """Bytes of the model's largest valid request or answer (a full batch)."""
    return max(request_bytes(cfg), response_bytes(cfg))


def _unchanged(before: ServedModel, after: ServedModel) -> bool:
    """Whether a reload serves what was served: the same config and tiers, each tier the
    same ONNX on the same backend, and a text model the same tokenizer file (its ids
    change every answer: review 173)."""
    onnx = lambda m: {t: r.onnx_sha256 for t, r in m.tiers.items()}  # noqa: E731
    tok = lambda m: m.tokenizer.sha256 if m.tokenizer is not None else None  # noqa: E731
    return (before.config, before.backend, onnx(before), tok(before)) == (
        after.config,
        after.backend,
        onnx(after),
        tok(after),
    )


def _advice(exc: BaseException, control: str = "explicit") -> str:
    """What to do about a model that failed to load, unless its message already says it: a
    model.yaml that is not valid is edited, anything else of the repository is rebuilt;
    then it is loaded again - by a restart where clients may not load (``control``)."""
    said = str(exc)
    if "innfer build" in said or "load the model again" in said or "free space" in said:
        return ""  # it says its own fix
    again = {"explicit": "load the model again",
             "poll": "the repository poll loads it again once its files change"}.get(
        control, "restart the server")  # fmt: skip
    # The volume, not the files: a rebuild (which the serving image may not even have)
    # would not help.
    cause = next((e for e in (exc, exc.__cause__) if isinstance(e, OSError)), None)
    if cause is not None and cause.errno in (errno.EACCES, errno.EPERM):
        return (f"; this process (uid {os.getuid()}) may not read or write it: fix the "
                "volume's owner or mode (Kubernetes: the pod's securityContext fsGroup or "
                f"runAsUser), then {again}")  # fmt: skip
    if cause is not None and cause.errno == errno.EROFS:
        return ("; the repository is read-only here and loading it must write (an engine "
                "to build into its cache): build the engines where it is writable (`innfer "
                "build`, or a server with it mounted read-write) or give the server a writable "
                f"engine_cache_spare, then {again}")  # fmt: skip
    if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"; the volume is full: free space or grow it, then {again}"
    if isinstance(exc, ConfigError) or isinstance(exc.__cause__, ConfigError):
        return f"; fix model.yaml, then {again}"
    if "pip install" in said or "CUDA" in said:  # the host lacks a package or a device
        return f"; then {again}"  # (a rebuild would not help: review helper-149)
    return f"; rebuild it with `innfer build`, then {again}"
