"""Prometheus metrics, declared once. Base units in names, few labels (model, tier, outcome,
reason).

Every request that reaches a model is counted once in ``innfer_requests_total`` by outcome,
and - unless it was cancelled by its client before its deadline, or refused as malformed
(outcome ``invalid``: a bad input, parameter or tier name, or a request no replica takes
as sent - above ``limits.max_inflight_bytes`` alone, or an answer over the message limit)
- once in the SLO view:
``innfer_deadline_met_total`` (answered within its budget) or
``innfer_deadline_missed_total{reason}`` (the client did not get an answer within its budget):

  late              answered (or still running when the client gave up) after the budget;
                    a stream's answer is judged when it is written (in request order it
                    may wait behind slower answers read before it)
  expired           admitted, but the budget ran out in the queue (DEADLINE_EXCEEDED)
  refused_deadline  refused at arrival: the work queued ahead (or this replica running slower
                    than profiled, e.g. contended) would make it late
  refused_budget    refused at arrival: the budget is below the fastest allowed tier's
                    profiled time at the quantile an idle replica admits at (admit_quantile,
                    the median by default) - no replica meets it however idle (the client's
                    ask, not load)
  refused_full      refused at arrival: the queue was full, or the replica's request bytes
                    in flight were at their cap (RESOURCE_EXHAUSTED)
  failed            the engine failed the request: its batch failed, and so did its run alone
                    (server/apart.py)
  unavailable       the model was unloaded or reloaded before the request ran

So SLO attainment = met / (met + missed) is what clients experience: a replica that refuses
82 % of its requests and answers 13 % in time reads 0.13, not 0.95 (the share of *served*
requests that were in time, which is what met / (met + late) alone would say).

Ratios the autoscaler uses (deploy/monitoring/prometheusrule.yaml records them per pod):
  queue:compute  = rate(innfer_queue_seconds_total) / rate(innfer_compute_seconds_total)
                   (queue time of every admitted request: served, failed, expired,
                   cancelled or unloaded in the queue - not only of the served ones)
  degraded share = (rate(innfer_degraded_requests_total) + rate(shed))
                   / (rate(innfer_requests_total{outcome="served"}) + rate(shed))
                   degraded: served below the tier an idle replica would have served in
                   its budget (a budget no better tier meets alone is not load)
                   shed: innfer_deadline_missed_total of the reasons refused_deadline,
                   refused_full and expired - load the replica could not take counts as
                   degraded (refused_budget is not load: more replicas would not serve it)
  mean accuracy  = rate(innfer_served_accuracy_sum) / rate(innfer_served_accuracy_count)

``innfer_requests_total{outcome="refused_deadline"}`` counts refused_deadline,
refused_budget and expired together (the gRPC status they share); the ``reason`` label of
``innfer_deadline_missed_total`` tells them apart.

Each server owns its registry, so several servers can run in one process (tests).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    Summary,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics import MetricWrapperBase

from server.log_throttle import LogThrottle
from server.ports import NO_IPV6, WILDCARD_HOSTS

log = logging.getLogger("innfer.metrics")

# Seconds. Budgets run from a few ms to 10 s and more: a boundary at common budgets (20, 30,
# 50, 100 ms, ...) tells whether a quantile met one - with 20 -> 50 ms, a p99 under a 30 ms
# budget could not be read - and steps stay at most 2.5x; beyond 10 s only +Inf.
# tests/test_deploy.py checks this against the deployed tier sets' default budgets.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0,
    5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Tokens per request of a text model (its sequence length after truncation, padding excluded).
TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

OUTCOMES = (
    "served", "refused_deadline", "refused_full", "failed", "cancelled", "unavailable", "invalid",
)  # fmt: skip
# Why a request missed its deadline (innfer_deadline_missed_total{reason}); see above.
MISS_REASONS = (
    "late", "expired", "refused_deadline", "refused_budget", "refused_full", "failed",
    "unavailable",
)  # fmt: skip
# The misses that are load the replica could not take (the degraded share counts them).
SHED_REASONS = ("refused_deadline", "refused_full", "expired")


HTTP_METHODS = {"GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"}


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, version: str = "") -> None:
        r = self.registry = registry or CollectorRegistry()
        # process_cpu_seconds_total, process_resident_memory_bytes, ... (the standard process
        # metrics a Prometheus client exports; a private registry does not get them itself).
        ProcessCollector(registry=r)
        self.requests = Counter(
            "innfer_requests",
            "Inference requests by outcome: served; refused_deadline (at arrival the budget "
            "could not be met - innfer_deadline_missed_total's refused_deadline and "
            "refused_budget - or it ran out in the queue, its expired); refused_full (queue "
            "or in-flight bytes at their cap); failed (the engine); cancelled (by the client, "
            "with budget left, or while its batch ran); unavailable (unloaded, reloading, a "
            "hung engine); invalid (a malformed request: no SLO miss).",
            ["model", "tier", "outcome"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "innfer_request_duration_seconds", "Time from the scheduler's admission to the end "
            "of the request's batch as the event loop saw it: queue, the batch's hand-off to "
            "an engine thread, compute and the hop back (the hand-offs wait for the loop, "
            "Python's GIL, under load: more than queue + compute then). Decoding before it and "
            "encoding and sending after it are not in it; innfer_request_overhead_seconds is "
            "their overhead_quantile (default 0.9).",
            ["model", "tier"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "innfer_queue_duration_seconds", "Time a request waited before its batch started.",
            ["model", "tier"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "innfer_compute_duration_seconds", "Engine time of the batch a request ran in.",
            ["model", "tier"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "innfer_batch_size", "Rows per executed batch.", ["model", "tier"],
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_tokens = Histogram(
            "innfer_request_tokens", "Sequence length (tokens) of each request to a model with "
            "a sequence axis, admitted or refused by its scheduler: what its lane is chosen by "
            "(texts refused before they were tokenized have no length and are not in it).",
            ["model"], buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.lane_requests = Counter(
            "innfer_lane_requests_total", "Requests to a model with a sequence axis, by the "
            "lane (profiled sequence length) each was planned in, admitted or refused by its "
            "scheduler (not texts refused before they were tokenized); each lane's series "
            "exists from load, at 0.",
            ["model", "lane"], registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "innfer_queue_depth", "Requests waiting in the queue.", ["model"], registry=r
        )
        self.inflight = Gauge(
            "innfer_inflight_requests", "Accepted requests not yet answered.", ["model"],
            registry=r,
        )  # fmt: skip
        self.deadline_met = Counter(
            "innfer_deadline_met", "Requests answered within their latency budget.", ["model"],
            registry=r,
        )  # fmt: skip
        self.deadline_missed = Counter(
            "innfer_deadline_missed",
            "Requests not answered within their latency budget, by reason: late, expired (in "
            "the queue), refused_deadline / refused_budget / refused_full (at arrival), "
            "failed, unavailable.", ["model", "reason"], registry=r,
        )  # fmt: skip
        self.served_accuracy = Summary(
            "innfer_served_accuracy",
            "Accuracy of the tier each request was served by: measured on the model's "
            "evaluation set at build time where it has one, else the tier's FLOPs fraction of "
            "the full width (a size proxy; model.yaml evaluation gives a measured one).",
            ["model"], registry=r,
        )  # fmt: skip
        self.queue_total = Counter(
            "innfer_queue_seconds",
            "Cumulative queueing time of admitted requests, whatever their end (served, "
            "failed, expired, cancelled, unloaded).",
            ["model"],
            registry=r,
        )  # fmt: skip
        self.compute_total = Counter(
            "innfer_compute_seconds", "Cumulative engine time of executed batches.", ["model"],
            registry=r,
        )  # fmt: skip
        self.compute_cpu_total = Counter(
            "innfer_compute_cpu_seconds", "Cumulative CPU time of the threads that ran the "
            "executed batches (the engine's own thread; ONNX Runtime's intra-op pool beyond "
            "it is not counted). Beside innfer_compute_seconds (wall): a wall/CPU ratio above "
            "1 means the engine waited for a core; process_cpu_seconds_total minus this is "
            "the request handling's CPU (with one intra-op thread).",
            ["model"], registry=r,
        )  # fmt: skip
        self.saturated_batches = Counter(
            "innfer_saturated_batches",
            "Batches the planner ran throughput first: the CPU the engine shares with request "
            "handling was nearly full and the queue could not be saved in full, so it ran the "
            "batch that meets the most deadlines rather than the most per second. The replica "
            "is past its capacity (scale out, or give handling CPUs of its own).",
            ["model"], registry=r,
        )  # fmt: skip
        self.degraded = Counter(
            "innfer_degraded_requests",
            "Requests served below the best tier they allowed - the model's top tier (or the "
            "fixed policy's), or the tier the request pinned - that an idle replica would "
            "have served better within their budget (a budget no better tier meets is not "
            "load: more replicas would not serve it better).",
            ["model"], registry=r,
        )  # fmt: skip
        # The scheduler's current latency view per tier (issue 18): what it plans with, so a
        # profile that drifted from the machine shows up here before deadlines are missed.
        self.tier_latency_factor = Gauge(
            "innfer_tier_latency_factor",
            "Observed / profiled median batch time of the tier (1: as profiled).",
            ["model", "tier"], registry=r,
        )  # fmt: skip
        self.tier_planned_latency = Gauge(
            "innfer_tier_planned_latency_seconds",
            "Planned time of a full batch on the tier: the slo_target quantile the scheduler "
            "uses now.", ["model", "tier"], registry=r,
        )  # fmt: skip
        # Outside load on a GPU (server.gpu_load): how much slower than profiled the
        # scheduler plans every model on the device because of other processes' work.
        self.device_external_load = Gauge(
            "innfer_device_external_load_factor",
            "How much slower the device runs because of work outside this server (NVML "
            "utilisation of other processes; 1: none), as the scheduler plans with it.",
            ["device"], registry=r,
        )  # fmt: skip
        self.stuck_batches = Gauge(
            "innfer_stuck_batches",
            "Batches of the model on an engine for 100 times their plan and at least 30 s: an "
            "engine hung in a call (readiness fails while one is; the log says which).",
            ["model"], registry=r,
        )  # fmt: skip
        self.request_overhead = Gauge(
            "innfer_request_overhead_seconds",
            "The recent overhead_quantile (default 0.9) of requests' time in the server "
            "outside queue and compute (decoding, the hop back, encoding, sending); budgets "
            "are planned short by it with plan_overhead (the default).",
            ["model"], registry=r,
        )  # fmt: skip
        self.request_overhead_quiet = Gauge(
            "innfer_request_overhead_quiet_seconds",
            "The median of that time over recent answers that ran alone (a batch of one that "
            "did not queue; 0 before 16 of them): where it is below the recent median, "
            "admission and expiry judge each request at it, not at the loaded median.",
            ["model"], registry=r,
        )  # fmt: skip
        # Set by the data plane to read its server.host_cpu.HostCpu (no labels: one process).
        self.host_cpu = Gauge(
            "innfer_host_cpu_per_row_seconds",
            "CPU the server spends per arriving request row outside its engines (receive, "
            "decode, admit, encode, send), recent windows. With more than one intra-op "
            "thread per engine the engine's pool threads count here too (an overestimate).",
            registry=r,
        )  # fmt: skip
        self.host_cpu_batch = Gauge(
            "innfer_host_cpu_per_batch_seconds",
            "CPU the server's event loop spends per batch on the batch as such (deciding, "
            "handing off, settling it), recent windows. Where handling shares the engines' "
            "CPUs (innfer_host_cpu_shared 1) the planner's batch sizes count it once per batch.",
            registry=r,
        )  # fmt: skip
        # Set by the data plane (no labels: one cap for the whole process).
        self.inflight_bytes = Gauge(
            "innfer_inflight_bytes",
            "Bytes of accepted requests not yet answered and of answers not yet sent (a "
            "stream's: not yet read by its client), against limits.max_inflight_bytes "
            "(innfer_inflight_limit_bytes): at the limit every new request is refused "
            "RESOURCE_EXHAUSTED.",
            registry=r,
        )  # fmt: skip
        self.inflight_limit_bytes = Gauge(
            "innfer_inflight_limit_bytes", "limits.max_inflight_bytes.", registry=r
        )
        self.pending_wait = Histogram(
            "innfer_pending_wait_seconds",
            "How long a call waited in gRPC's queue before the server took it up: a probe "
            "call from the server itself every 50 ms (server.pending), timed from its send to "
            "its handler. No innfer code sees a call before that, and a budget runs there "
            "all the same: a p99 above a few ms means calls come faster than the process "
            "handles them (bound the queue with max_pending_calls; add replicas). No "
            "samples with TLS (no probe).",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            registry=r,
        )  # fmt: skip
        self.pending_probes = Counter(
            "innfer_pending_probes",
            "The probe calls of innfer_pending_wait_seconds by outcome: answered, cancelled "
            "(gRPC's queue was full at max_pending_calls; the share cancelled is the share of "
            "time it was full - under steady load about the share of clients' calls gRPC "
            "cancelled, which no other metric counts, but blind to bursts shorter than the "
            "probe's 50 ms) or failed (anything else: no connection, one closed under it, a "
            "timeout).",
            ["outcome"],
            registry=r,
        )  # fmt: skip
        for outcome in ("answered", "cancelled", "failed"):
            self.pending_probes.labels(outcome)
        self.stream_bytes = Gauge(
            "innfer_stream_bytes",
            "Bytes ModelStreamInfer streams hold against limits.streams_share of the in-flight "
            "limit: their part of innfer_inflight_bytes (requests being answered, answers not "
            "yet read) and, for each request whose answer bytes are not charged yet (until it "
            "is decoded), an advance of the stream's largest charge so far - which "
            "innfer_inflight_bytes does not count, so this may read more than it. At "
            "limits.streams_share of the limit, streams holding bytes stop reading.",
            registry=r,
        )  # fmt: skip
        self.stream_limit_bytes = Gauge(
            "innfer_stream_limit_bytes",
            "limits.streams_share of limits.max_inflight_bytes: at it streams that hold bytes "
            "stop reading.",
            registry=r,
        )  # fmt: skip
        self.stream_stalls = Counter(
            "innfer_stream_stalls_total",
            "Times a ModelStreamInfer stream stopped reading requests: bound=\"window\" when "
            "it held limits.max_stream_bytes of requests and unread answers (its client sends "
            "faster than it reads), bound=\"share\" when all streams held limits.streams_share "
            "of the in-flight limit.",
            ["bound"], registry=r,
        )  # fmt: skip
        for bound in ("window", "share"):  # both series from the start, at 0
            self.stream_stalls.labels(bound=bound)
        self.host_cpu_shared = Gauge(
            "innfer_host_cpu_shared",
            "1 when request handling runs on the engines' CPUs (no more CPUs than engine "
            "threads): the planner then keeps its tighter throughput bound.",
            registry=r,
        )  # fmt: skip
        # Auto-tiering (server/autotier.py): its checks, its last choice's gain, its swaps.
        self.tier_set_checks = Counter(
            "innfer_tier_set_checks", "Auto-tiering checks by outcome: applied (the tier set "
            "changed), kept, stale (traffic moved while the set was chosen: not swapped in), "
            "unchanged (traffic as at the last choice), waiting (too little "
            "traffic or too soon), no_frontier (the frontier is missing or unusable: `innfer "
            "build`), locked (another replica is choosing, or a hand apply runs on this "
            "machine), failed.",
            ["model", "outcome"], registry=r,
        )  # fmt: skip
        self.tier_set_gain = Gauge(
            "innfer_tier_set_expected_gain", "Score of the set auto-tiering chose minus the live "
            "set's on the recent traffic (the last check that chose: kept until the next): "
            "expected served accuracy, less a penalty for attainment below the floor "
            "(sim/tiering.py).", ["model"], registry=r,
        )  # fmt: skip
        self.tier_set_enabled = Gauge(
            "innfer_tier_set_enabled", "1 where auto-tiering runs for the model; 0 where "
            "model.yaml asks for it and it is off (goals no frontier candidate meets, or "
            "auto_tiers with no goals: the log says which); absent without auto_tiers.",
            ["model"], registry=r,
        )  # fmt: skip
        self.tier_set_swap_seconds = Gauge(
            "innfer_tier_set_swap_seconds", "Duration of the last tier-set change: background "
            "choice and engine builds, then the reload.", ["model"], registry=r,
        )  # fmt: skip
        self.truncated_texts = Counter(
            "innfer_truncated_texts",
            "Texts cut at the model's max_length (truncate, the default; each answer names "
            "its truncated rows): the embeddings of long texts lose their ends.",
            ["model"], registry=r,
        )  # fmt: skip
        self.nonfinite_outputs = Counter(
            "innfer_nonfinite_outputs",
            "Requests answered with a NaN or an infinity in their outputs (served as the "
            "engine gave them): a tier that overflows or was calibrated badly.",
            ["model", "tier"], registry=r,
        )  # fmt: skip
        self.load_failures = Counter(
            "innfer_model_load_failures",
            "Loads and reloads of the model that failed (a failed reload leaves the loaded "
            "version serving; RepositoryIndex's reason and the log say why).",
            ["model"], registry=r,
        )  # fmt: skip
        self.model_ready = Gauge(
            "innfer_model_ready", "1 when every tier of the model is loaded.", ["model"],
            registry=r,
        )  # fmt: skip
        self.model_loading = Gauge(
            "innfer_model_loading", "1 while a load of the model runs (engine builds, timing "
            "at load: TensorRT takes minutes per tier) or, at start-up, waits for its turn; a "
            "model not ready and not loading failed to load.", ["model"], registry=r,
        )  # fmt: skip
        # The gRPC ecosystem's server metrics (grpc-ecosystem's go-grpc-middleware
        # providers/prometheus, py-grpc-prometheus): names, labels and code names as there,
        # so that existing gRPC dashboards and alerts read innfer too. Per RPC, from its
        # handler's start (the request parsed) to its answer or error; a call refused before
        # it (a call without the token, with auth on: refused by the interceptor) is not
        # counted; an unparseable request reaches its handler and counts as InvalidArgument.
        rpc = ["grpc_type", "grpc_service", "grpc_method"]
        self.grpc_started = Counter(
            "grpc_server_started", "RPCs started on the server.", rpc, registry=r
        )
        self.grpc_handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, by status code.",
            [*rpc, "grpc_code"], registry=r,
        )  # fmt: skip
        self.grpc_handling = Histogram(
            "grpc_server_handling_seconds", "Time from an RPC's handler start to its answer "
            "(a stream: to its end): decode, queue, compute, encode.", rpc,
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # ... those refused there, by method (the service's own: bounded): token guessing or
        # a client sent without its token was in no metric and no log (review 199)
        self.auth_refused = Counter(
            "innfer_auth_refused", "OIP calls refused for a missing or wrong bearer token "
            "(auth on), before their request was read; REST calls are labelled http:<route>.",
            ["grpc_method"], registry=r,
        )  # fmt: skip
        # The REST front end's calls (server/rest.py), by route name (bounded: the API's
        # routes, "unknown" for a path none matches) and HTTP status.
        self.http_requests = Counter(
            "innfer_http_requests", "OIP REST calls answered, by route and HTTP status.",
            ["handler", "method", "code"], registry=r,
        )  # fmt: skip
        self.http_duration = Histogram(
            "innfer_http_request_duration_seconds", "Time from a REST call's handler start to "
            "its answer (a client that left: its going): body read, decode, queue, compute, "
            "encode, send.", ["handler", "method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._rpc_children: dict = {}
        self._http_children: dict = {}
        Info("innfer_build", "innfer build information.", registry=r).info({"version": version})
        r.register(_NvmlCollector())

    def forget_model(
        self, name: str, keep_tiers: set[str] | None = None, keep_lanes: set[str] | None = None
    ) -> int:
        """Remove the series of model ``name`` a retired runtime leaves: every one labelled
        with it (``keep_tiers`` None: no runtime serves it now), or only those of a tier not
        in ``keep_tiers`` and of a sequence lane not in ``keep_lanes`` (what its successor
        serves; series of neither stay, and lanes all stay where ``keep_lanes`` is None).
        Not readiness nor the auto-tiering gauges (``DataPlane._forget_series``' at the
        unload). Without it each unloaded model left ~190 series for good, each tier a reload
        dropped ~76 (review helper-133), and each lane a reload dropped 2 (review 203).
        Returns how many went.

        Example:
            >>> m = Metrics()
            >>> m.requests.labels("a", "w050", "served").inc()
            >>> m.lane_requests.labels("a", "64").inc()
            >>> m.forget_model("a", keep_tiers={"w100"}, keep_lanes={"32"}), m.forget_model("a")
            (2, 0)
        """
        keep = {id(g) for g in (self.model_ready, self.model_loading, self.tier_set_gain,
                                self.tier_set_swap_seconds, self.tier_set_enabled)}  # fmt: skip
        gone = 0
        for metric in list(vars(self).values()):
            if not isinstance(metric, MetricWrapperBase) or id(metric) in keep:
                continue  # (attributes that are no metric: the RPC children's dict)
            names = metric._labelnames
            if not names or names[0] != "model":
                continue
            second = names[1] if len(names) > 1 else None
            kept = {"tier": keep_tiers, "lane": keep_lanes}.get(second)
            with metric._lock:  # (the children's keys: no public listing)
                labels = [k for k in metric._metrics if k[0] == name]
            for k in labels:
                if keep_tiers is not None and not (kept is not None and k[1] and k[1] not in kept):
                    continue  # served on: the model's own series, or a tier/lane still served
                with contextlib.suppress(KeyError):
                    metric.remove(*k)
                    gone += 1
        return gone

    def rpc_started(self, kind: str, service: str, method: str) -> None:
        """Count an RPC's start (``kind``: unary, bidi_stream, ...)."""
        self._rpc(kind, service, method)[0].inc()

    def http_handled(self, handler: str, method: str, status: int, seconds: float) -> None:
        """Count a REST call's answer (``handler``: its route's name) and its time.

        Example:
            >>> m = Metrics()
            >>> m.http_handled("infer", "POST", 200, 0.004)
            >>> m.registry.get_sample_value("innfer_http_requests_total",
            ...     {"handler": "infer", "method": "POST", "code": "200"})
            1.0
        """
        method = method if method in HTTP_METHODS else "other"  # (a client names it: bounded)
        key = (handler, method, status)
        pair = self._http_children.get(key)  # (cached as _rpc's: labels() costs microseconds)
        if pair is None:
            pair = self._http_children[key] = (
                self.http_requests.labels(handler, method, str(status)),
                self.http_duration.labels(handler, method),
            )
        pair[0].inc()
        pair[1].observe(seconds)

    def rpc_handled(self, kind: str, service: str, method: str, code: str, seconds: float):
        """Count an RPC's end with its status ``code`` (go-grpc's name: OK, InvalidArgument,
        ...) and its handling time.

        Example:
            >>> m = Metrics()
            >>> m.rpc_started("unary", "inference.GRPCInferenceService", "ModelInfer")
            >>> m.rpc_handled("unary", "inference.GRPCInferenceService", "ModelInfer",
            ...               "OK", 0.004)
            >>> m.registry.get_sample_value("grpc_server_handled_total", {
            ...     "grpc_type": "unary", "grpc_service": "inference.GRPCInferenceService",
            ...     "grpc_method": "ModelInfer", "grpc_code": "OK"})
            1.0
        """
        _, handling = self._rpc(kind, service, method)
        handling.observe(seconds)
        key = (kind, service, method, code)
        handled = self._rpc_children.get(key)
        if handled is None:
            handled = self._rpc_children[key] = self.grpc_handled.labels(*key)
        handled.inc()

    def _rpc(self, kind: str, service: str, method: str):
        # Bound children, cached: labels() costs microseconds on every request otherwise.
        key = (kind, service, method)
        pair = self._rpc_children.get(key)
        if pair is None:
            pair = self._rpc_children[key] = (
                self.grpc_started.labels(*key),
                self.grpc_handling.labels(*key),
            )
        return pair

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Expose /metrics; returns (server, thread): prometheus_client's WSGI app on a
        threading server that closes idle connections and caps how many are open
        (``METRICS_TIMEOUT_S``, ``METRICS_MAX_CONNECTIONS``).

        A wildcard ``host`` (0.0.0.0, ::) listens on IPv6 and IPv4 both - one dual-stack
        socket on ``::``, as gRPC does for the same host - or on 0.0.0.0 where the kernel
        has no IPv6: with 0.0.0.0 alone, every scrape of a pod on an IPv6 cluster failed
        while its gRPC port answered.
        """
        if host in WILDCARD_HOSTS:
            try:
                return _serve_dual_stack(port, self.registry)
            except OSError as exc:
                if exc.errno not in NO_IPV6:
                    raise
                log.info("no IPv6 here (%s): /metrics listens on IPv4 (0.0.0.0) only", exc)
                host = "0.0.0.0"
        # The family of the address, as prometheus_client's start_http_server picks it.
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = info[0]
        server = type("_MetricsServerOn", (_MetricsServer,), {"address_family": family})
        return _serve(port, address[0], self.registry, server)


# /metrics connections: prometheus_client's server started a thread per connection and
# waited on each socket without a timeout, so a client that connected and sent nothing held
# a thread of the serving process for good - thousands of them exhausted its threads. Now a
# connection idle this long (seconds, per read or write) is closed, and beyond this many at
# once a new one is closed at once. A scrape is one short request (Prometheus sends one at a
# time per target; two for an HA pair).
METRICS_TIMEOUT_S = 5.0
METRICS_POLL_S = 0.05  # how often the server's loop looks for a shutdown
METRICS_MAX_CONNECTIONS = 16
# And whatever its reads: a connection is closed this long after it was accepted (a client
# trickling a byte every 2 s kept its slot for good - 16 of them failed every scrape; a
# scrape takes milliseconds, Prometheus' own timeout is 10 s) ...
METRICS_DEADLINE_S = 10.0
# ... and with every slot taken, a new connection takes the slot of the oldest one that has
# not sent its request yet, whatever its age (a client that keeps opening connections kept
# every slot younger than any age: 0 of 30 scrapes at 200 connections/s; review
# helper-140), else of the oldest open this long (seconds): a scrape still gets in while
# slow clients hold the slots.
METRICS_EVICT_AFTER_S = 1.0


# Rendering a scrape runs in the serving process, under its GIL: 16 connections scraping in
# a loop rendered 16 pages at once, back to back, and inference slowed with them. Now one
# page renders at a time, and after a render that took d seconds the next waits until
# d / METRICS_RENDER_SHARE seconds after the first began: at most this share of the time goes
# to rendering, however many scrape. One scrape per 15 s never waits.
METRICS_RENDER_SHARE = 0.1
# ... and never more than this long (seconds) between renders: a page that takes 300 ms
# would otherwise hold the next scrape 2.7 s, and one of another format behind it longer,
# near Prometheus' 10 s timeout (review helper-152).
METRICS_MAX_REST_S = 1.0


class _PacedApp:
    """A WSGI app (prometheus_client's) rendering one page at a time, at most ``share`` of
    the time. Scrapes that came while a page rendered wait (their threads sleep, the GIL
    free) and take the next page rendered for the same request - never one begun before they
    came, so a scrape still shows every count made before it was sent.

    >>> calls = []
    >>> def app(environ, start_response):
    ...     calls.append(1)
    ...     start_response("200 OK", [("Content-Type", "text/plain")])
    ...     return [b"x 1\\n"]
    >>> paced = _PacedApp(app)
    >>> paced({"PATH_INFO": "/metrics"}, lambda status, headers: None)
    [b'x 1\\n']
    >>> len(calls)
    1
    """

    def __init__(self, app, share: float = METRICS_RENDER_SHARE, clock=time.monotonic,
                 sleep=time.sleep) -> None:  # fmt: skip
        self._app, self._share, self._clock, self._sleep = app, share, clock, sleep
        self._lock = threading.Lock()
        self._next_at = 0.0  # clock time before which no render starts
        # The last page: (request key, when its render began, status, headers, body). One
        # only: keys come from clients (query strings), and a page is ~100 kB.
        self._last: tuple | None = None

    def __call__(self, environ, start_response):
        came = self._clock()
        key = tuple(environ.get(k) for k in (
            "REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "HTTP_ACCEPT", "HTTP_ACCEPT_ENCODING",
        ))  # fmt: skip
        with self._lock:
            last = self._last
            if last is None or last[0] != key or last[1] < came:
                last = self._last = self._render(environ, key)
        start_response(last[2], last[3])
        return [last[4]]

    def _render(self, environ, key) -> tuple:
        """Render a page (the lock held), waiting first for this render's turn."""
        wait = self._next_at - self._clock()
        if wait > 0:
            self._sleep(wait)
        began = self._clock()
        reply: list = []
        body = b"".join(
            self._app(environ, lambda status, headers, *_: reply.extend((status, headers)))
        )
        took = self._clock() - began
        self._next_at = began + took + min(took * (1 / self._share - 1), METRICS_MAX_REST_S)
        return (key, began, reply[0], reply[1], body)


def _cut(sock: socket.socket) -> None:
    """End a /metrics connection from another thread: its handler's read returns."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _MetricsServer(ThreadingWSGIServer):
    """prometheus_client's threading WSGI server with at most ``METRICS_MAX_CONNECTIONS``
    connections (threads) at once, each closed ``METRICS_DEADLINE_S`` after it came: one
    more takes the slot of the oldest open ``METRICS_EVICT_AFTER_S``, else is closed without
    a thread."""

    max_connections = METRICS_MAX_CONNECTIONS

    def __init__(self, *args, **kwargs) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._log_throttle = LogThrottle()  # only the serve_forever thread uses it
        # connection -> [when it came, whether its request has been read, the peer's address]
        self._open: dict[socket.socket, list] = {}
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def request_read(self, sock: socket.socket) -> None:
        """``sock``'s request line and headers are in (``_QuietHandler``)."""
        with self._open_lock:
            entry = self._open.get(sock)
            if entry is not None:
                entry[1] = True

    def _evict_oldest(self) -> bool:
        """Cut the oldest connection that has not sent its request yet; else the oldest of
        the peer holding the most connections, where one holds several (a client that sends
        its request and never reads the answer held every slot at 50 connections/s: 2 of 20
        scrapes; review helper-141 - Prometheus scrapes a target one connection at a time);
        else the oldest open at least ``METRICS_EVICT_AFTER_S``. Whether one was cut (its
        thread frees its slot as it ends)."""
        with self._open_lock:
            entries = [(t, read, peer, s) for s, (t, read, peer) in self._open.items()]
        waiting = [e for e in entries if not e[1]]
        if not waiting:
            held: dict = {}
            for e in entries:
                held[e[2]] = held.get(e[2], 0) + 1
            busiest = max(held.items(), key=lambda kv: kv[1], default=(None, 0))
            if busiest[1] > 1:
                waiting = [e for e in entries if e[2] == busiest[0]]
        if waiting:
            _cut(min(waiting, key=lambda e: e[0])[3])
            return True
        oldest = min(entries, key=lambda e: e[0], default=None)
        if oldest is None or time.monotonic() - oldest[0] < METRICS_EVICT_AFTER_S:
            return False
        _cut(oldest[3])
        return True

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False) and not (
            self._evict_oldest() and self._slots.acquire(timeout=0.5)
        ):
            self.shutdown_request(request)
            left_out = self._log_throttle.allow("full", time.monotonic())
            if left_out is not None:  # one line per window, not one per connection
                log.warning(
                    "/metrics: %d connections open, the most allowed: closed one from %s "
                    "(%d more closed since the last such line)",
                    self.max_connections, client_address[0], left_out,
                )  # fmt: skip
            return
        try:
            super().process_request(request, client_address)  # its thread releases the slot
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        timer = threading.Timer(METRICS_DEADLINE_S, _cut, (request,))
        timer.daemon = True
        with self._open_lock:
            self._open[request] = [time.monotonic(), False, client_address[0]]
        timer.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            timer.cancel()
            with self._open_lock:
                self._open.pop(request, None)
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        """socketserver printed a traceback to stderr for every error - every idle
        connection closed by its timeout too: those are routine, the rest logged."""
        if isinstance(sys.exc_info()[1], (TimeoutError, ConnectionError)):
            return
        log.exception("/metrics: serving %s failed", client_address[0])


class _DualStackServer(_MetricsServer):
    """The metrics server on an IPv6 socket that takes IPv4 too (IPV6_V6ONLY off: IPv4
    clients arrive as ::ffff:a.b.c.d, whatever the host's net.ipv6.bindv6only says)."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per scrape; a connection idle for ``METRICS_TIMEOUT_S`` is closed
    (socketserver's StreamRequestHandler sets it on the socket)."""

    timeout = METRICS_TIMEOUT_S

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok and hasattr(self.server, "request_read"):
            self.server.request_read(self.request)  # no longer evicted first
        return ok

    def log_message(self, format: str, *args) -> None:
        pass


def _serve_dual_stack(port: int, registry: CollectorRegistry):
    return _serve(port, "::", registry, _DualStackServer)


def _serve(port: int, host: str, registry: CollectorRegistry, server_class):
    httpd = make_server(
        host, port, _PacedApp(make_wsgi_app(registry)), server_class, handler_class=_QuietHandler
    )
    # (a stop's shutdown waits for the serving loop's next poll: 0.5 s by default, past a
    # short grace_period_s - review helper-251)
    serve = functools.partial(httpd.serve_forever, poll_interval=METRICS_POLL_S)
    thread = threading.Thread(target=serve, name="metrics-http", daemon=True)
    thread.start()
    return httpd, thread


class _NvmlCollector:
    """GPU utilisation and memory via NVML where a GPU is present; nothing elsewhere. The
    GPUs this process may use, labelled by their CUDA index (``gpu="0"`` is ``cuda:0``, as
    ``innfer_device_external_load_factor`` names it): NVML numbers every GPU of the host and
    ignores ``CUDA_VISIBLE_DEVICES``, so with ``CUDA_VISIBLE_DEVICES=2`` the GPU in use read
    as "2" and other processes' GPUs were exported too (review helper-231)."""

    def __init__(self, nvml=None) -> None:
        self.handles = []
        try:
            if nvml is None:
                import pynvml as nvml
            from server.gpu_load import nvml_handle

            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None:
                count = min(count, len([e for e in visible.split(",") if e.strip()]))
            self.nvml = nvml
            self.handles = [nvml_handle(nvml, i) for i in range(count)]
        except Exception:  # no pynvml, no driver, no GPU: the metrics are simply absent
            self.handles = []

    def collect(self):
        if not self.handles:
            return
        util = GaugeMetricFamily(
            "innfer_gpu_utilization_ratio", "GPU busy fraction (NVML).", labels=["gpu"]
        )
        mem = GaugeMetricFamily(
            "innfer_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["gpu"]
        )
        for i, h in enumerate(self.handles):
            # each read on its own: utilisation is NOT_SUPPORTED on a MIG slice, whose
            # memory still reads
            with contextlib.suppress(Exception):
                util.add_metric([str(i)], self.nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100)
            with contextlib.suppress(Exception):
                mem.add_metric([str(i)], float(self.nvml.nvmlDeviceGetMemoryInfo(h).used))
        yield util
        yield mem

    def describe(self):
        return []
