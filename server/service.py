"""The thin gRPC layer: OIP servicer, grpc.health.v1, and the one place where domain errors
become status codes. No traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError

from server import log_settings, wire
from server.bearer_token import BearerToken
from server.config import loopback
from server.dataplane import DataPlane
from server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    EngineFailed,
    FailedPrecondition,
    InferError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TokenizerFailed,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from server.limits import (
    MESSAGE_CHARS,
    OTHER_FIELDS,
    TENSOR_FIELDS,
    RequestLimits,
    clip,
    clip_message,
    request_fields,
    tensor_fields,
)
from server.model_runtime import CANCEL_AT_DEADLINE, VERDICT, Duration, ModelRuntime, Verdict
from server.parameters import CANCEL_CAP_S, cancel_at_deadline, id_size
from server.proto_gen import POOL, health_pb2, health_pb2_grpc
from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import grpc_service_pb2_grpc as rpc
from server.proto_gen import model_config_pb2 as mc
from server.stream import StreamWindow, serve_stream
from server.trace import GRPC_STAMPS, Transport, as_ns

log = logging.getLogger("innfer.service")

# ModelInferRequest's fields that hold its input and output tensors (grpc_service.proto).
INPUTS, OUTPUTS = 5, 6
INPUT_CONTENTS = 5  # ModelInferRequest.InferInputTensor.contents
INPUT_SHAPE = 3  # InferInputTensor.shape (packed int64); an output tensor has no field 3
MAX_SHAPE_DIMS = 64  # far past any model's rank (ONNX Runtime allows 8 on many kernels)
MAX_SHAPE_BYTES = 10 * MAX_SHAPE_DIMS  # an int64 varint takes at most 10 bytes

STATUS_OF: dict[type[InferError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    EngineFailed: grpc.StatusCode.INTERNAL,  # Triton answers a backend's error so, too
    TokenizerFailed: grpc.StatusCode.INTERNAL,
}


def status_of(exc: InferError) -> grpc.StatusCode:
    """The status code of ``exc``'s nearest class in ``STATUS_OF`` (subclasses included)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def deadline_left(context, step: float | None = None) -> float | None:
    """Seconds to the call's deadline as its client set it, at the most; None without one.

    gRPC sends a deadline as ``grpc-timeout``, rounded up to about three significant digits
    from 1 s (10 ms steps to 10 s, 100 ms to 100 s, 1 s to 1,000 s, 10 s beyond, then
    minutes and hours): ``time_remaining()`` may be that step past the client's own
    deadline. A 1 s deadline arrived as 1.009 s and 10 s as 10.099 s, and a request planned
    to them was answered after its client had given up (review 194). The step is taken for
    a tenth more than is left, as the handler may start a while after the header came (a
    10.099 s deadline read at 9.99 s is still in 100 ms steps). Below 1 s the step is a
    millisecond, which the budget margin covers.

    Example:
        >>> class Call:
        ...     def time_remaining(self): return 10.0985
        >>> round(deadline_left(Call()), 4)
        9.9985
    """
    left = context.time_remaining()
    if left is None:
        return None
    short = left - (rounding_step(left) if step is None else step)
    # Within the step of its end (a stream's: the step its start had): the deadline may or
    # may not have been rounded up - a 10 s one is sent exact - so what the server's clock
    # has left is planned with, best effort: taken off, a 10 s stream's last 100 ms refused
    # every request, saying the client's budget was negative (review helper-280).
    return short if short > 0 else left


def rounding_step(left: float | None) -> float:
    """The step gRPC rounds a deadline of ``left`` seconds up by (``deadline_left``); 0
    below 1 s. A stream takes it once, at its start: read again for each request, a 10.01 s
    stream's step shrank to 10 ms past 10 s and to nothing below 1 s, and its late requests
    were planned up to 90 ms past the client's deadline (review helper-279).

    Example:
        >>> rounding_step(10.0985), rounding_step(0.5)
        (0.1, 0.0)
    """
    if left is None or 1.1 * left < 1:  # (a 1 s deadline read at 0.99 s: 10 ms steps)
        return 0.0
    return 10.0 ** (math.floor(math.log10(1.1 * left)) - 2)


def _one_repository(request) -> None:
    """Refuse a named repository as Triton does (UNSUPPORTED, which its gRPC front end sends
    as UNIMPLEMENTED): the name was ignored, and a client that meant another repository, or
    misspelt it, was told OK about this one's models (review 194)."""
    if request.repository_name:
        raise Unimplemented(
            f"repository_name {clip(request.repository_name)} is not supported: innfer "
            "serves the one repository it was started with (innfer serve --repository); "
            "leave repository_name empty"
        )


class Undecodable:
    """What a request deserializer returns for bytes that are not the expected message, so
    the handler can answer INVALID_ARGUMENT (grpc itself would answer UNKNOWN). ``header``:
    for a ModelInferRequest, its model name, version and id where the bytes still say them
    (``wire.leading_strings``), else None - a stream's error answer carries the id, without
    which a client matching answers by id waits for it for good."""

    def __init__(self, message: str, error: Exception, header=None) -> None:
        self.message = message
        self.error = error
        self.header = header


def _require_decoded(request) -> None:
    """INVALID_ARGUMENT for a request our deserializer could not decode, or refused unparsed
    for holding more fields than any valid request (server/wire.py)."""
    if isinstance(request, Undecodable):
        if isinstance(request.error, wire.TooManyFields):
            raise InvalidArgument(f"the request has {request.error}")
        raise InvalidArgument(
            f"the request bytes are not a valid {request.message}: {request.error}"
        )


# When the current RPC's request began to be parsed (time.monotonic): the earliest moment
# this process handles it; and its size on the wire (bytes: what the in-flight cap counts,
# without protobuf's ByteSize, ~40 us on a 600 KB request). grpc.aio calls the
# deserializer in the RPC's own task, just before the handler, so the handler reads it back
# from this task's context.
RECEIVED: contextvars.ContextVar[tuple[float, int]] = contextvars.ContextVar("innfer_received")
# A ModelInferRequest's raw_input_contents as views of the received bytes (server/wire.py),
# set beside RECEIVED; the parsed message holds none of them. None: read the message's own.
RAW_INPUTS: contextvars.ContextVar[list[memoryview] | None] = contextvars.ContextVar(
    "innfer_raw_inputs", default=None
)


# A message the bounded walk cannot follow is parsed whole by protobuf (which names its
# error) only up to this size: its field count, and so its parse, stays small.
WALK_FALLBACK_BYTES = 4096
MALFORMED = (
    "a group (wire type 3/4, not part of this protocol), an invalid wire type or a field cut "
    "short; send a message serialized by a protobuf library"
)


def _tolerant(cls, bound: wire.Bound | int = 0, split: bool = False) -> Callable[[bytes], object]:
    """``cls``'s parser that returns Undecodable instead of raising. ``bound`` (an int: top-
    level fields only; 0: none): a message with more fields is Undecodable without being
    parsed - protobuf's parse costs per field, on the event loop. ``split`` (unary
    ModelInfer only: its handler reads RAW_INPUTS; a stream's requests share one context):
    the tensors are taken out uncopied (server/wire.py)."""

    def undecodable(data: bytes, exc: Exception) -> Undecodable:
        header = None
        if cls is pb.ModelInferRequest:
            s = wire.leading_strings(data, last=3)  # model_name, model_version, id
            header = pb.ModelInferRequest(model_name=s.get(1, ""), model_version=s.get(2, ""),
                                          id=s.get(3, ""))  # fmt: skip
        return Undecodable(cls.DESCRIPTOR.full_name, exc, header)

    def parse(data: bytes):
        RECEIVED.set((time.monotonic(), len(data)))
        parts = None
        try:
            if bound or split:
                number = wire.RAW_INPUT_CONTENTS if split else None
                parts = wire.split_field(data, number, bound or 1 << 20)
        except wire.TooManyFields as exc:
            return undecodable(data, exc)
        if parts is None and bound and len(data) > WALK_FALLBACK_BYTES:
            # Not well formed where the walk went (a group, an invalid wire type, a field cut
            # short): protobuf would parse the rest unbounded (an unknown group in front of
            # 2 M empty inputs: 0.14 s, 180 MiB), so only a small message goes to it for its
            # precise error.
            return undecodable(data, ValueError(MALFORMED))
        raw = parts[1] if parts is not None and parts[1] else None
        RAW_INPUTS.set(raw)
        try:
            return cls.FromString(data if raw is None else parts[0])
        except DecodeError as exc:
            return undecodable(data, exc)

    return parse


def request_bounds(limits: RequestLimits) -> tuple[wire.Bound, wire.Bound]:
    """The field bounds of a ModelInferRequest (unary or streamed) and of every other
    request, from the request limits (server/limits.py)."""
    fix = (
        f"send at most {limits.max_parameters} request parameters, {limits.max_inputs} inputs "
        f"and {limits.max_outputs} outputs (limits.max_parameters, max_inputs, max_outputs in "
        "the server config)"
    )
    infer = wire.Bound(
        request_fields(limits),
        what="top-level fields (model_name, model_version, id, and one per request "
        "parameter, input, output and raw tensor)",
        nested=frozenset({INPUTS, OUTPUTS}),
        nested_fields=tensor_fields(limits),
        nested_what="fields in its inputs and outputs together (each one's name, datatype, "
        f"shape and contents, and their parameters: {TENSOR_FIELDS} per tensor, "
        f"{limits.max_parameters} more in all)",
        fix=fix,
        deep=INPUT_CONTENTS,
        deep_fields=limits.max_contents_values,
        deep_what="values sent one by one in its inputs' contents (a BYTES string or an "
        "unpacked number each; send numbers in raw_input_contents, or raise "
        "limits.max_contents_values in the server config)",
        packed=INPUT_SHAPE,
        packed_bytes=MAX_SHAPE_BYTES,
        packed_what=f"tensor shape (at most {MAX_SHAPE_DIMS} dims)",
    )
    other = wire.Bound(
        OTHER_FIELDS + limits.max_parameters,
        what="top-level fields (a name, a version, and one per parameter)",
        fix=f"send at most {limits.max_parameters} parameters (limits.max_parameters)",
    )
    return infer, other


def add_inference_service(servicer: InferenceService, server) -> None:
    """Register ``servicer`` like the generated ``add_GRPCInferenceServiceServicer_to_server``,
    with deserializers that turn undecodable request bytes into INVALID_ARGUMENT and refuse
    unparsed a request of more fields than the request limits allow."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    infer, other = request_bounds(servicer.plane.limits)
    handlers = {}
    for method in service.methods:
        request, response = (
            getattr(pb, method.input_type.name),
            getattr(pb, method.output_type.name),
        )
        kind = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        bound = infer if request is pb.ModelInferRequest else other
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(request, bound, split=method.name == "ModelInfer"),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


OPEN_METHODS = {"ServerLive", "ServerReady"}  # probes need no token


def rpc_method(fn: Callable) -> Callable:
    """Authenticate, run, and map errors: domain errors to their code and message,
    anything else to INTERNAL with the traceback logged here and never sent. Each call is
    counted in the grpc_server_* metrics with the code it ends with."""

    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: InferenceService, request, context: grpc.aio.ServicerContext):
        metrics = self.plane.metrics
        metrics.rpc_started("unary", SERVICE, name)
        t0, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            if name not in OPEN_METHODS:  # AuthInterceptor refused it before; kept here
                self.authenticate(context.invocation_metadata())  # for servers without it
            _require_decoded(request)
            return await fn(self, request, context)
        except InferError as exc:
            code = status_of(exc)
            await _abort(context, code, clip_message(str(exc)))
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("%s failed", name)
            code = grpc.StatusCode.INTERNAL
            await _abort(context, code, f"internal error in {name}; see logs")
        finally:
            took = time.perf_counter() - t0
            code = _heard(code, context, took=took)
            metrics.rpc_handled("unary", SERVICE, name, CODE_NAME[code], took)

    return wrapper


async def _abort(context, code: grpc.StatusCode, message: str) -> None:
    """``context.abort``; where the call has ended under it (its client gone, its deadline
    passed) there is nothing to send, and gRPC's core refuses the batch - ExecuteBatchError,
    which grpc logs as an error with a traceback unless it already saw the client close (a
    race: review helper-148, a 0.5 ms client_timeout). Ended as the cancellation it is."""
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception as exc:  # grpc._cython.cygrpc.ExecuteBatchError (not public API)
        raise asyncio.CancelledError(f"the call ended before its {code.name} was sent") from exc


SERVICE = "inference.GRPCInferenceService"
# grpc-go's names of the status codes (codes.Code.String()): what gRPC dashboards filter on.
CODE_NAME = {c: "".join(w.capitalize() for w in c.name.split("_")) for c in grpc.StatusCode} | {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
}


def _heard(code: grpc.StatusCode, context, step: float = 0.0, took: float = 0.0) -> grpc.StatusCode:
    """The code a call's client heard, for the grpc_server_handled metric: a call that ended
    OK or cancelled after its deadline passed is DEADLINE_EXCEEDED (gRPC cancels the handler
    at the deadline, and a stream whose reading ended there returned OK); one that ended OK
    on a call its client had cancelled is CANCELLED (gRPC ends the request stream of a
    cancelled call as a half-close would: a stream cancelled before its first message was
    read returned OK - review 167). A cancel near the deadline is the deadline's
    (``parameters.cancel_at_deadline`` of the ``took`` seconds the handler ran and what was
    left: the rule the request's own outcome is counted by)."""
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
        return code
    try:
        left = context.time_remaining()
    except Exception:  # no deadline to read
        left = None
    # Near the call's own deadline, as its request was judged (from the request's due
    # time; apart, they disagreed in a band of a millisecond: helper-302) - only there: a
    # request's budget of its own (latency_budget_ms, the default) ending is no deadline
    # the client heard (helper-303: cancels with no deadline, or 29.6 s of it left, were
    # counted DeadlineExceeded).
    judged = CANCEL_AT_DEADLINE.get()
    near = left is not None and left - step <= CANCEL_CAP_S
    if code is grpc.StatusCode.CANCELLED and judged is not None and near:
        return grpc.StatusCode.DEADLINE_EXCEEDED if judged else code
    # (``step``: a stream's ``rounding_step``, for a cancel gRPC made at the client's
    # deadline; a stream its client ended OK was not cut by it - review helper-280)
    if left is not None and (
        left <= 0 if code is not grpc.StatusCode.CANCELLED
        else left - step <= 0 or cancel_at_deadline(left - step, took + left)
    ):  # fmt: skip
        return grpc.StatusCode.DEADLINE_EXCEEDED
    with contextlib.suppress(Exception):  # (a context that cannot tell)
        if code is grpc.StatusCode.OK and context.cancelled():
            return grpc.StatusCode.CANCELLED
    return code


def _aborted_code(context) -> grpc.StatusCode:
    """The code a handler aborted ``context`` with (UNKNOWN where gRPC does not say)."""
    try:
        code = context.code()
    except Exception:  # an older grpc.aio without ServicerContext.code()
        return grpc.StatusCode.UNKNOWN
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


_NO_SHM = (
    "innfer does not implement {} shared memory: send the tensors in the request "
    "(raw_input_contents; tritonclient's set_data_from_numpy), or through system shared "
    "memory on the server's host"
)


def _not_served(name: str, message: str) -> Callable:
    """An RPC method ``name`` that answers UNIMPLEMENTED with ``message``."""

    async def method(self, request, context):
        raise Unimplemented(message)

    method.__name__ = method.__qualname__ = name  # rpc_method keys on the name (auth, logs)
    return rpc_method(method)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses an OIP call without the bearer token (``InferenceService.authenticate``)
    before its request is read into a message: the call is handed to a handler without a
    deserializer that answers UNAUTHENTICATED, so an unauthenticated client costs no parse
    (before, a request was parsed - protobuf's cost per field, on the event loop - and only
    then refused). ServerLive, ServerReady, grpc.health and reflection stay open."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        prefix, _, name = details.method.rpartition("/")
        if handler is None or prefix != f"/{SERVICE_NAME}" or name in OPEN_METHODS:
            return handler
        try:
            self.service.authenticate(details.invocation_metadata)
        except InferError as exc:
            self.service.plane.metrics.auth_refused.labels(name).inc()
            return _refusal(handler, status_of(exc), clip_message(str(exc)))
        return handler


def _refusal(handler, code: grpc.StatusCode, message: str):
    """A handler of ``handler``'s kind that reads no request and answers ``code``."""

    async def refuse(request, context):  # request: raw bytes, or the stream unread
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class InferenceService(rpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, token: str | BearerToken | None) -> None:
        """``token``: None (auth off), the token, or one followed as its file changes."""
        if token is not None and not (token.current if isinstance(token, BearerToken) else token):
            # None is auth off; an empty token (a secret file that read empty) must never
            # turn it off: every client would be let in.
            raise ValueError(
                "auth is configured but the bearer token is empty: put the token in "
                "auth.bearer_token_file (or auth.bearer_token), or remove auth"
            )
        self.plane = plane
        self._token = BearerToken(token) if isinstance(token, str) else token
        if self._token is not None:  # every guarded method's series from 0: one that first
            # appears at 1 is invisible to rate() and increase() (review helper-229)
            methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
            for m in methods:
                if m.name not in OPEN_METHODS:
                    plane.metrics.auth_refused.labels(m.name)

    def interceptors(self) -> tuple[grpc.aio.ServerInterceptor, ...]:
        """What the gRPC server must be made with (``grpc.aio.server(interceptors=...)``):
        with auth on, the check before any request is parsed; none without (no cost)."""
        return () if self._token is None else (AuthInterceptor(self),)

    @property
    def auth_on(self) -> bool:
        """Whether calls need the bearer token (``auth`` in the server config)."""
        return self._token is not None

    def authenticate(self, metadata) -> None:
        """Unauthenticated unless ``metadata`` (a call's invocation metadata: key, value
        pairs) carries ``authorization: Bearer <token>``; nothing to check with auth off."""
        if self._token is None:
            return
        for key, value in metadata or ():
            if key == "authorization":
                # (surrogateescape: aiohttp decodes a header's non-UTF-8 bytes so, and a plain
                # encode raised - a 500 with a traceback per request, no token needed;
                # review helper-256)
                given = value
                if isinstance(value, str):
                    given = value.encode("utf-8", "surrogateescape")
                scheme, _, credentials = given.strip().partition(b" ")
                # RFC 6750 / 7235: the scheme is case-insensitive, the token is not.
                if scheme.lower() == b"bearer" and self._token.accepts(credentials.strip()):
                    return
        raise Unauthenticated("missing or wrong bearer token: send 'authorization: Bearer <token>'")

    def _still_accepted(self, context) -> None:
        """Unauthenticated where the token a stream was opened with is no longer accepted
        (rotated out, its grace over): each request it sends is refused from then on."""
        try:
            self.authenticate(context.invocation_metadata())
        except Unauthenticated:
            raise Unauthenticated(
                "the bearer token this stream was opened with is no longer accepted (rotated "
                "out): open the stream again with the current token"
            ) from None

    @rpc_method
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.plane.live())

    @rpc_method
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.ready())

    @rpc_method
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    @rpc_method
    async def ServerMetadata(self, request, context):
        return self.plane.server_metadata()

    @rpc_method
    async def ModelMetadata(self, request, context):
        resp = self.plane.model_metadata(request.name, request.version)
        # innfer extension (OIP's response has no parameters): the tiers a client may ask
        # for, as long as they fit a gRPC client's metadata limits - past 8 KiB its soft
        # limit failed calls at random, past 16 KiB every one, RESOURCE_EXHAUSTED "received
        # metadata size exceeds ..." (40 plain tiers, ~24 text ones; review 169). The same
        # table is always in ModelConfig's parameters["tiers"].
        m = self.plane.model(request.name, request.version)
        tiers = self.plane.tiers_json(m)
        if len(tiers) > TIERS_TRAILER_MAX:
            tiers = json.dumps({"omitted": f"{len(tiers)} bytes", "see": TIERS_ELSEWHERE})
        context.set_trailing_metadata((("innfer-tiers", tiers),))
        return resp

    @rpc_method
    async def ModelConfig(self, request, context):
        m = self.plane.model(request.name, request.version)
        return pb.ModelConfigResponse(config=self._model_config(m))

    def _model_config(self, m: ModelRuntime) -> mc.ModelConfig:
        """Triton's ModelConfig for ``m``, with the fields perf_analyzer and model navigators
        read: one version (latest 1), dynamic batching, the instance group, the backend."""
        cfg = mc.ModelConfig(
            name=m.name,
            platform="innfer_inn",
            backend=m.served.backend,
            max_batch_size=m.config.max_batch,
        )
        cfg.version_policy.latest.num_versions = 1
        text = m.config.text
        if text is not None:  # clients send this alone, or the model's own inputs
            entry = cfg.input.add(name=text.input, dims=[1], optional=True)
            entry.data_type = mc.DataType.TYPE_STRING
        for spec, field in ((m.config.inputs, cfg.input), (m.config.outputs, cfg.output)):
            for t in spec:
                entry = field.add(name=t.name, dims=list(t.shape))
                entry.data_type = mc.DataType.Value(_triton_type(t.dtype))
                if text is not None and field is cfg.input:
                    entry.optional = True
        # innfer's scheduler never holds a batch open to wait for more requests: a batch
        # starts as soon as a slot is free, so the queue delay is 0; the batch sizes it plans
        # with are the profiled ones (1, 2, 4, ... max_batch).
        batching = cfg.dynamic_batching
        batching.preferred_batch_size.extend(m.config.batch_sizes)
        batching.max_queue_delay_microseconds = 0
        if m.config.priority_levels:  # (0: every level outranks none; Triton's tools read
            # it as priority off, so it is said in the README, not here)
            batching.priority_levels = m.config.priority_levels
            batching.default_priority_level = (
                m.config.default_priority_level or m.config.priority_levels
            )
        queue = batching.default_queue_policy
        queue.max_queue_size = m.config.max_queue
        queue.timeout_action = mc.ModelQueuePolicy.REJECT
        queue.default_timeout_microseconds = int(m.config.default_latency_budget_ms * 1e3)
        queue.allow_timeout_override = True  # latency_budget_ms, the deadline, `timeout`
        device = str((m.served.profile or {}).get("device", "cpu")).lower()
        on_cpu = device == "cpu" or device.startswith(("cpu-", "fake"))
        # Triton's count is the model's instances: its batches at once (``max_running``,
        # capped by a shared device's slots), not the slots of the device it shares.
        group = cfg.instance_group.add(name=f"{m.name}_0", count=m.scheduler.max_running)
        if on_cpu:
            group.kind = mc.ModelInstanceGroup.KIND_CPU
        else:
            group.kind = mc.ModelInstanceGroup.KIND_GPU
            group.gpus.append(0)  # engines run on the process's current CUDA device
        cfg.parameters["tiers"].string_value = self.plane.tiers_json(m)
        cfg.parameters["default_latency_budget_ms"].string_value = str(
            m.config.default_latency_budget_ms
        )
        cfg.parameters["policy"].string_value = self.plane.config.policy
        return cfg

    @rpc_method
    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else list(self.plane.models)
        # Every model ("") is every loaded one, whatever the version (Triton reads it only
        # for a named model: "" with version 2 was NOT_FOUND for the first; review 186).
        version = request.version if request.name else ""
        resp = pb.ModelStatisticsResponse()
        for name in names:
            m = self.plane.model(name, version)
            m.flush()  # the batches answered last are counted once their answers are out
            st = m.stats
            s = resp.model_stats.add(name=name, version="1")
            s.last_inference = st.last_inference_ms
            s.inference_count = st.inference_count
            s.execution_count = st.execution_count
            out = s.inference_stats
            for field in _DURATIONS:
                _duration(getattr(out, field), getattr(st, field))
            for size in sorted(st.batches):
                batch, entry = st.batches[size], s.batch_stats.add(batch_size=size)
                for field in ("compute_input", "compute_infer", "compute_output"):
                    _duration(getattr(entry, field), getattr(batch, field))
        return resp

    @rpc_method
    async def RepositoryIndex(self, request, context):
        _one_repository(request)
        resp = pb.RepositoryIndexResponse()
        # What is served or failed counts too: a model still serving after its directory
        # went, or one named in the config that failed to load, was missing from the index
        # the errors refer clients to.
        plane = self.plane
        # The folder listing off the loop: 30,000 folders took 0.3 s, and every request
        # waited behind it (review 157; a stalled volume, for ever). A ready-only index
        # needs none.
        listed = [] if request.ready else await plane.repository_names()
        for name in sorted({*listed, *plane.models, *plane.broken, *plane.loading}):
            loaded = name in plane.models
            if request.ready and not loaded:
                continue
            if not loaded and name in plane.loading:  # a RepositoryModelLoad runs (Triton's)
                resp.models.add(name=name, version="1", state="LOADING")
                continue
            if not loaded and name not in plane.broken and name not in plane.unloaded:
                resp.models.add(name=name)  # never loaded: no version nor state (Triton's)
                continue
            reason = plane.broken_reason(name) or ("unloaded" if name in plane.unloaded else "")
            resp.models.add(
                name=name, version="1", state="READY" if loaded else "UNAVAILABLE",
                reason=clip_message(reason),
            )  # fmt: skip
        return resp

    @rpc_method
    async def RepositoryModelLoad(self, request, context):
        _one_repository(request)
        self.plane.check_model_control()
        if request.parameters:  # Triton's config override / file upload: refused, not ignored
            raise InvalidArgument(
                f"RepositoryModelLoad parameters are not supported "
                f"({', '.join(sorted(clip(k) for k in request.parameters))}): innfer loads the "
                "model as its repository has it; change model.yaml there and load again"
            )
        await self.plane.load_asked(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc_method
    async def RepositoryModelUnload(self, request, context):
        _one_repository(request)
        self.plane.check_model_control()
        await self.plane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- Triton's system shared memory (server.shared_memory) --------------------------------
    @rpc_method
    async def SystemSharedMemoryStatus(self, request, context):
        resp = pb.SystemSharedMemoryStatusResponse()
        for r in self.plane.shared_memory.status(request.name):
            resp.regions[r.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
                )
            )
        return resp

    @rpc_method
    async def SystemSharedMemoryRegister(self, request, context):
        self.plane.shared_memory.register(
            request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc_method
    async def SystemSharedMemoryUnregister(self, request, context):
        self.plane.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # -- Triton's RPCs innfer leaves out: UNIMPLEMENTED with what to do instead (grpc's
    # default answer was "Unexpected <class 'NotImplementedError'>: Method not implemented!")
    CudaSharedMemoryRegister = _not_served("CudaSharedMemoryRegister", _NO_SHM.format("CUDA"))

    # No CUDA region is ever registered: its status lists none and unregistering succeeds,
    # as a Triton without one answers - perf_analyzer's clean-up unregisters both kinds and
    # printed "Unable to unregister all shared memory regions" after every run.
    @rpc_method
    async def CudaSharedMemoryStatus(self, request, context):
        if request.name:
            raise NotFound(
                f"no CUDA shared memory region {clip(request.name)} is registered ("
                + _NO_SHM.format("CUDA")
                + ")"
            )
        return pb.CudaSharedMemoryStatusResponse()

    @rpc_method
    async def CudaSharedMemoryUnregister(self, request, context):
        return pb.CudaSharedMemoryUnregisterResponse()

    @rpc_method
    async def TraceSetting(self, request, context):
        """Triton's trace extension (server/trace.py): the settings in force for the model
        named, or the global ones; changed where the request gives any (by whom: as the
        log settings - auth, or a port only this host reaches)."""
        name = request.model_name
        if name and name not in self.plane.models and name not in self.plane.expected:
            self.plane.model(name)  # NotFound, as inference says it: the names it serves
        if request.settings:
            cfg = self.plane.config
            if cfg.auth is None and not loopback(cfg.host):  # (anyone could fill the disk)
                raise FailedPrecondition(
                    f"trace settings are read-only on {cfg.host} without auth: set auth (a "
                    "bearer token) in server.yaml to change them over the network, or set "
                    "trace: there and restart"
                )
            changes = {k: list(v.value) for k, v in request.settings.items()}
            self.plane.traces.update(name, changes)
        resp = pb.TraceSettingResponse()
        for key, values in self.plane.traces.settings(name).items():
            resp.settings[key].value.extend(values)
        return resp

    @rpc_method
    async def LogSettings(self, request, context):
        if request.settings:
            log_settings.update(request.settings, self._log_settings_refused())
        resp = pb.LogSettingsResponse()
        for name, value in log_settings.current().items():
            setattr(resp.settings[name], log_settings.KINDS[name], value)
        return resp

    def _log_settings_refused(self) -> str | None:
        """Why a client may not change the log level here (None: it may): as model control,
        only with a token or where only this host reaches the port - DEBUG from anyone
        would fill the log (and the disk behind it) at a request's cost."""
        cfg = self.plane.config
        if cfg.auth is not None or loopback(cfg.host):
            return None
        return (
            f"log settings are read-only on {cfg.host} without auth: set auth (a bearer "
            "token) in server.yaml to change them over the network, or restart with "
            "--log-level"
        )

    @rpc_method
    async def ModelInfer(self, request, context):
        received, size = RECEIVED.get((None, None))
        now = time.monotonic()
        waited = now - received if received is not None else 0.0
        raw = RAW_INPUTS.get()
        # (read from: the message's parse, where the transport timed it, else the handler)
        transport = Transport(GRPC_STAMPS, as_ns(now - waited), as_ns(now))
        try:
            resp = await self.plane.infer(
                request, deadline_left(context), waited, size, raw, transport=transport
            )
        except asyncio.CancelledError:  # nothing to send: the trace ends here
            self.plane.traces.sent(transport, None)
            raise
        finally:
            if transport.trace is not None:  # a traced request: stamped once the call ends
                made = time.monotonic_ns()  # (an error's status is sent as an answer is)
                context.add_done_callback(lambda _: self.plane.traces.sent(transport, made))
        if received is not None:  # once gRPC has sent it: the overhead the client also paid
            # From this handler's start: the budget already counts the parse before it, and
            # the queue time counts from the scheduler's stamp (decoding is overhead).
            context.add_done_callback(
                lambda _: self.plane.answered(resp, time.monotonic() - received - waited, waited)
            )
        return resp

    async def ModelStreamInfer(self, request_iterator, context: grpc.aio.ServicerContext):
        """Triton's bidirectional stream: each request is answered on the stream with its id,
        through the same data plane as ModelInfer, concurrently; the answers go back in the
        order the requests came, as Triton's do, or - where the stream was opened with the
        header ``innfer-stream-order: completion`` - each as it completes (see
        ``server.stream``). A failed request is a response with ``error_message`` (its status
        code's name first, its id last) and the stream stays open; only a wrong token or an
        unknown order ends it - and a message over ``max_message_bytes``, which gRPC refuses
        for the whole call (RESOURCE_EXHAUSTED; the requests read and not yet answered are
        cancelled)."""
        metrics = self.plane.metrics
        metrics.rpc_started("bidi_stream", SERVICE, "ModelStreamInfer")
        t0, code = time.perf_counter(), grpc.StatusCode.OK
        step = rounding_step(context.time_remaining())  # the stream's, once
        try:
            await self._stream(request_iterator, context, step)
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except asyncio.CancelledError:  # the client closed it, its deadline, or the server stops
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:  # a read or write error: gRPC answers the client UNKNOWN
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            took = time.perf_counter() - t0
            code = _heard(code, context, step, took)
            metrics.rpc_handled("bidi_stream", SERVICE, "ModelStreamInfer", CODE_NAME[code], took)

    async def _stream(
        self, request_iterator, context: grpc.aio.ServicerContext, step: float = 0.0
    ) -> None:
        metadata = context.invocation_metadata()
        try:
            self.authenticate(metadata)
            ordered = _stream_order(metadata)
        except InferError as exc:  # (``_abort``: a client gone meanwhile is a cancellation)
            await _abort(context, status_of(exc), clip_message(str(exc)))

        plane = self.plane
        # What this stream holds of the in-flight cap: at limits.max_stream_bytes, or when
        # all streams hold limits.streams_share of it, it stops reading - so that clients
        # that do not read fill their own windows, not the cap.
        stalls = plane.metrics.stream_stalls
        window = StreamWindow(
            plane.limits.max_stream_bytes, plane.streams,
            lambda bound: stalls.labels(bound=bound).inc(),
        )  # fmt: skip

        async def answer(request) -> _StreamAnswer:
            # Met or late once it is written (this task's own context): an answer that waits
            # behind slower ones read before it reaches its client only then.
            verdict = Verdict()
            VERDICT.set(verdict)
            transport = Transport(GRPC_STAMPS, 0, 0)  # (its reading: _stream_answer's)
            try:
                resp, sent = await self._stream_answer(request, context, window, step, transport)
            except BaseException:  # (cancelled: the stream ended) its trace ends unsent
                plane.traces.sent(transport, None)
                raise
            # Until written, the answer counts against the in-flight bytes and the stream's
            # window (no await between here and serve_stream taking it: it is released by
            # write or by discard). Before session 34 a client that sent and did not read
            # had up to MAX_STREAM_INFLIGHT answers per stream held beyond the cap.
            held = plane.hold(resp.ByteSize(), window)
            return _StreamAnswer(resp, sent, held, verdict, transport)

        async def write(a: _StreamAnswer) -> None:
            started, sending, written = time.monotonic(), time.monotonic_ns(), False
            try:
                await context.write(a.resp)
                written = True
            except asyncio.CancelledError:  # the client went: never delivered
                a.verdict.dropped()
                raise
            except Exception as exc:  # the call ended under the write (an oversized message
                # gRPC refused ends the whole stream): gRPC's core refuses the batch -
                # ExecuteBatchError, logged as an ERROR and counted UNKNOWN (review
                # helper-253). Ended as the cancellation it is, as ``_abort`` does.
                a.verdict.dropped()
                raise asyncio.CancelledError("the stream ended before its answer was sent") from exc
            except BaseException:
                a.verdict.dropped()
                raise
            finally:
                plane.release(a.held, window)
                plane.traces.sent(a.transport, sending if written else None)
            a.verdict.sent()  # gRPC took it (a client not reading holds the write up)
            if a.sent is not None:
                try:
                    a.sent(started)
                except Exception:  # bookkeeping: it must not end the client's stream
                    log.exception("ModelStreamInfer: noting an answer's overhead failed")

        def discard(a: _StreamAnswer) -> None:
            a.verdict.dropped()
            plane.release(a.held, window)
            plane.traces.sent(a.transport, None)

        if await serve_stream(request_iterator, answer, write, closing=plane.closing,
                              ordered=ordered, discard=discard, window=window):  # fmt: skip
            # Draining: the requests read are answered; the client reopens the stream
            # (elsewhere) and resends what it sent after them, as after any UNAVAILABLE.
            exc = Unavailable("the server is shutting down: open the stream again")
            await _abort(context, status_of(exc), str(exc))

    async def _stream_answer(
        self, request, context, window: StreamWindow, step: float = 0.0,
        transport: Transport | None = None,
    ) -> tuple[pb.ModelStreamInferResponse, Callable | None]:  # fmt: skip
        """The stream's answer to ``request``, and what to note once it is written (called
        with the time its write began: the overhead the client paid, as for ModelInfer, less
        any time the answer was held behind earlier ones - that is the stream's order, not
        this server's cost per request, and in the learned overhead it would raise every
        request's reserve; None for a failure). ``transport``: its trace stamps (the reading
        is stamped here; the send, by the stream's writer)."""
        # Set by the deserializer in the stream's reading task, whose context this request's
        # task copied when it was made: this message's own.
        received, size = RECEIVED.get((None, None))
        now = time.monotonic()
        waited = now - received if received is not None else 0.0
        if transport is not None:
            transport.read_from_ns, transport.read_to_ns = as_ns(now - waited), as_ns(now)
        try:
            _require_decoded(request)
            if self._token is not None:  # checked once at the open, a stream outlived the
                self._still_accepted(context)  # token's rotation and grace (review 206)
            # The stream's deadline is the whole stream's: a cap, not each request's budget
            # (a 10-minute stream would plan every request at minutes, on the top tier).
            resp = await self.plane.infer(
                request, deadline_left(context, step), waited, size, deadline_is_budget=False,
                window=window, transport=transport,
            )  # fmt: skip
            # Every answer is its request's last, as Triton marks each stream response: the
            # documented way a streaming client knows a request is done (decoupled models)
            resp.parameters[FINAL].bool_param = True
            if received is None:
                return pb.ModelStreamInferResponse(infer_response=resp), None
            ready = time.monotonic()

            def sent(write_started: float) -> None:
                held = max(0.0, write_started - ready)
                self.plane.answered(resp, time.monotonic() - received - waited - held, waited)

            return pb.ModelStreamInferResponse(infer_response=resp), sent
        except InferError as exc:
            code, text = status_of(exc), str(exc)
        except Exception:
            log.exception("ModelStreamInfer failed")
            code, text = grpc.StatusCode.INTERNAL, "internal error in ModelStreamInfer; see logs"
        # As Triton does, the failed request's id goes back in infer_response - whole, as an
        # answer's, unless the id itself is what is wrong; tritonclient hands callbacks only
        # the message, so it ends with the id too, never cut off by the message's cap.
        failed = pb.ModelStreamInferResponse()
        message = f"{code.name}: {text}"
        if isinstance(request, Undecodable) and request.header is not None:
            request = request.header  # what the bytes still say: the id above all
        if isinstance(request, pb.ModelInferRequest):
            r = failed.infer_response
            rid = request.id
            fits = id_size(rid, self.plane.limits.max_id_bytes) is not None
            r.model_name, r.model_version, r.id = (
                request.model_name[:255], request.model_version[:255], rid if fits else rid[:255],
            )  # fmt: skip
            if rid:
                tag = f" (request id {clip(rid, ID_ECHO_CHARS)})"
                if len(tag) > MESSAGE_CHARS // 2:  # repr's escapes (control characters)
                    tag = f" (request id {clip(rid)})"
                message = clip_message(message)[: MESSAGE_CHARS - len(tag)] + tag
        failed.error_message = clip_message(message)
        failed.infer_response.parameters[FINAL].bool_param = True
        return failed, None


class _StreamAnswer(NamedTuple):
    """A stream's answer on its way out: the message, what to note once its write began
    (None for a failure; ``_stream_answer``), the bytes it holds of the in-flight cap,
    whether it met its budget (told when it is written or dropped), and its trace stamps
    (finished when it is written or dropped)."""

    resp: pb.ModelStreamInferResponse
    sent: Callable[[float], None] | None
    held: int
    verdict: Verdict
    transport: Transport  # its trace, if traced, until the answer is written or dropped


# The parameter Triton sets on every stream response (true: the request's last one).
FINAL = "triton_final_response"
STREAM_ORDER_HEADER = "innfer-stream-order"
# A failed stream request's id in its error message: whole up to this (a uuid-based id is
# 36-80 characters; the 48 of other echoes cut them), clipped beyond.
ID_ECHO_CHARS = 255


def _stream_order(metadata) -> bool:
    """Whether a stream's answers go back in request order (True: the default, Triton's) or
    as they complete (header ``innfer-stream-order: completion``). Given twice, the
    values must agree (the first silently won)."""
    order = None
    for key, value in metadata or ():
        if key == STREAM_ORDER_HEADER:
            value = value.decode(errors="replace") if isinstance(value, bytes) else value
            if value not in ("request", "completion"):
                raise InvalidArgument(
                    f"{STREAM_ORDER_HEADER} {clip(value)}: send 'request' (answers in the "
                    "order the requests came, the default) or 'completion' (each as it "
                    "completes)"
                )
            if order is not None and value != order:
                raise InvalidArgument(
                    f"{STREAM_ORDER_HEADER} is given as both {order!r} and {value!r}: send it once"
                )
            order = value
    return order != "completion"


class HealthService(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: "" and "liveness" are SERVING while the process runs and no engine
    has been stuck in a batch for ``stuck_restart_s`` (``DataPlane.live``); "readiness"
    (and the OIP service name) only when every configured model is loaded and warm, no
    engine is stuck in a batch and the server is not draining - what Kubernetes' gRPC
    readiness probe asks."""

    SERVICES = ("", "liveness", "readiness", "inference.GRPCInferenceService")

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        # Watch streams open now, and what wakes them: one pulse for them all reads the
        # statuses every HEALTH_WATCH_PERIOD_S and sets ``_changed`` (then a fresh one) when
        # any changed or the drain began. Each stream polled on its own before: 3,100 idle
        # streams, open without a token, took 11 % of a core (review 199).
        self._watching = 0
        self._changed: asyncio.Event | None = None
        self._pulse: asyncio.Task | None = None
        # What the pulse last read, per service; a stream that read otherwise (a change
        # between two beats, or one undone before the next) marks it stale, so that the
        # next beat wakes the streams though its own reading did not change (review 201).
        self._seen: dict[str, int] = {}
        self._stale = False

    def status(self, service: str) -> int:
        S = health_pb2.HealthCheckResponse
        if service not in self.SERVICES:
            return S.SERVICE_UNKNOWN
        if service in ("", "liveness"):
            return S.SERVING if self.plane.live() else S.NOT_SERVING
        return S.SERVING if self.plane.ready() else S.NOT_SERVING

    async def Check(self, request, context):
        await _abort_undecodable(request, context)
        status = self.status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown service {clip(request.service)}; this server answers "
                f"{', '.join(map(repr, self.SERVICES))}",
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        """The service's status now, then each change (checked every
        ``HEALTH_WATCH_PERIOD_S``) until the client cancels or the server drains (the last
        status then sent: the stream must not hold the drain to its grace period); an
        unknown service is SERVICE_UNKNOWN, not an error (grpc.health.v1). At most
        ``limits.max_health_watches`` streams at once; more: RESOURCE_EXHAUSTED."""
        await _abort_undecodable(request, context)
        limit = self.plane.limits.max_health_watches
        if self._watching >= limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{limit} health Watch streams are open (limits.max_health_watches): use "
                "Check, or close a stream first",
            )
        self._watching += 1
        try:
            closing, last = self.plane.closing, None
            while True:
                changed = self._next_change()  # taken first: a change from here on sets it
                # Whether draining has begun is read before the status: the drain sets the
                # phase before ``closing``, so a status read after sees it. Read after the
                # yield (which waits for the write), a drain that began during the write
                # ended the stream with SERVING the last thing sent.
                draining = closing.is_set()
                status = self.status(request.service)
                if self._seen.get(request.service, status) != status:
                    self._stale = True
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                if draining:
                    return
                await changed.wait()
        finally:
            self._watching -= 1

    def _next_change(self) -> asyncio.Event:
        """The event the pulse sets at the next change of any status or at the drain; the
        pulse runs while a stream watches."""
        if self._changed is None:
            self._changed = asyncio.Event()
        if self._pulse is None:  # its first statuses read now, with the caller's
            self._seen = self._statuses()
            self._pulse = asyncio.get_running_loop().create_task(self._beat())
        return self._changed

    def _statuses(self) -> dict[str, int]:
        return {s: self.status(s) for s in self.SERVICES}

    async def _beat(self) -> None:
        """Read every status each ``HEALTH_WATCH_PERIOD_S`` (or at once when the drain
        begins) while a stream watches; wake the streams where any changed since the last
        reading, or a stream read otherwise than it (``_stale``)."""
        closing = self.plane.closing
        try:
            while self._watching:
                if closing.is_set():  # every stream sends its last status and ends
                    return
                # (asyncio's TimeoutError is the builtin only from Python 3.11)
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(closing.wait(), HEALTH_WATCH_PERIOD_S)
                try:
                    now = self._statuses()
                except Exception:  # (the streams it wakes start another)
                    log.exception("health: reading the statuses failed")
                    raise
                if now != self._seen or self._stale:
                    self._seen, self._stale = now, False
                    self._wake()
        finally:
            self._pulse = None
            if self._watching:  # the drain, or a pulse that failed: no stream waits on
                self._wake()  # for ever (a failed one is started again by the next wait)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


# The largest tier table ModelMetadata sends in its trailer: gRPC clients refuse a response
# whose metadata passes 8 KiB at random and 16 KiB always (grpc.max_metadata_size), and the
# call's other headers share those limits.
TIERS_TRAILER_MAX = 4096
TIERS_ELSEWHERE = 'ModelConfig: config.parameters["tiers"]'


# How often the Watch streams' shared pulse reads the statuses (readiness changes at a
# load, an unload, a stuck engine or a drain: a second is well inside a probe's period).
HEALTH_WATCH_PERIOD_S = 1.0


async def _abort_undecodable(request, context) -> None:
    """``_require_decoded`` for the health and reflection services, whose handlers
    ``rpc_method`` does not wrap: its refusal as the status it maps to."""
    try:
        _require_decoded(request)
    except InferError as exc:
        await context.abort(status_of(exc), str(exc))


def add_health_service(servicer: HealthService, server) -> None:
    """Register ``servicer`` like the generated ``add_HealthServicer_to_server``, with
    deserializers that answer undecodable bytes INVALID_ARGUMENT (grpc itself answers
    UNKNOWN and logs a traceback per call: the health service is open without a token).

    ``Check`` - what Kubernetes' gRPC probes call - is a registered method: gRPC queues its
    calls apart from the generic methods' (every OIP call) and always has one of them
    requested, so a probe neither waits behind a backlog of inference calls in gRPC's queue
    nor is cancelled with them once that queue is full (``max_pending_calls``, which bounds
    Check's own queue alike: only that many checks arriving in one busy spell of the loop
    would cancel one - helper-321 saw 6 of 12 cancelled at 4). As a generic
    method it was both: ~1 s behind the backlog of an MLP sent 1.6x what its core handles
    (a probe's timeout is 3-5 s), and cancelled with the inference calls under the bound."""
    request = health_pb2.HealthCheckRequest
    response = health_pb2.HealthCheckResponse.SerializeToString
    parse = _tolerant(request, OTHER_FIELDS)
    name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    check = grpc.unary_unary_rpc_method_handler(servicer.Check, parse, response)
    server.add_registered_method_handlers(name, {"Check": check})
    watch = {"Watch": grpc.unary_stream_rpc_method_handler(servicer.Watch, parse, response)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, watch),))


def _pool_knows(file) -> None:
    """Add ``file`` (a FileDescriptor) and what it imports to ``POOL`` where it is not there."""
    try:
        POOL.FindFileByName(file.name)
        return
    except KeyError:
        pass
    for dependency in file.dependencies:
        _pool_knows(dependency)
    POOL.AddSerializedFile(file.serialized_pb)


def add_reflection_service(server, names: Sequence[str]) -> bool:
    """Register grpcio-reflection's servicer (v1alpha, what grpcurl asks for) for ``names``,
    as ``add_health_service`` registers health: undecodable bytes answered INVALID_ARGUMENT
    - grpcio's default parser answered UNKNOWN and logged a traceback per call, about
    0.5 MB of ERROR log a second from one client, no token needed (review 177). False
    where grpcio-reflection is not installed."""
    try:
        from grpc_reflection.v1alpha import reflection, reflection_pb2
        from grpc_reflection.v1alpha.reflection import aio
    except ImportError:  # optional dependency; the server works without it
        return False
    # The services' messages are in innfer's own pool (server.proto_gen.POOL), which is where
    # a describe looks: in protobuf's default pool nothing was found, and grpcurl could list
    # the services but not describe or call them (review 179).
    _pool_knows(reflection_pb2.DESCRIPTOR)
    servicer = aio.ReflectionServicer([*names, reflection.SERVICE_NAME], pool=POOL)
    parse = _tolerant(reflection_pb2.ServerReflectionRequest, OTHER_FIELDS)

    async def info(requests, context):
        async def decoded():
            async for request in requests:
                await _abort_undecodable(request, context)
                yield request

        async for response in servicer.ServerReflectionInfo(decoded(), context):
            yield response

    handler = grpc.stream_stream_rpc_method_handler(
        info, parse, reflection_pb2.ServerReflectionResponse.SerializeToString
    )
    methods = {"ServerReflectionInfo": handler}
    generic = grpc.method_handlers_generic_handler(reflection.SERVICE_NAME, methods)
    server.add_generic_rpc_handlers((generic,))
    return True


_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def _duration(out, value: Duration) -> None:
    out.count, out.ns = value.count, value.ns


def _triton_type(dtype: str) -> str:
    return {
        "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64",
        "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
    }[dtype]  # fmt: skip
