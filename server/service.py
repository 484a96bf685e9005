"""The thin gRPC layer: OIP servicer, grpc.health.v1, and the one place where domain errors
become status codes. No traceback ever reaches a client.
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError

from server.dataplane import DataPlane
from server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InferError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from server.limits import clip_message
from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import grpc_service_pb2_grpc as rpc
from server.proto_gen import health_pb2, health_pb2_grpc
from server.proto_gen import model_config_pb2 as mc

log = logging.getLogger("innfer.service")

STATUS_OF: dict[type[InferError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(exc: InferError) -> grpc.StatusCode:
    """The status code of ``exc``'s nearest class in ``STATUS_OF`` (subclasses included)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


class Undecodable:
    """What a request deserializer returns for bytes that are not the expected message, so
    the handler can answer INVALID_ARGUMENT (grpc itself would answer UNKNOWN)."""

    def __init__(self, message: str, error: Exception) -> None:
        self.message = message
        self.error = error


def _tolerant(cls) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return Undecodable(cls.DESCRIPTOR.full_name, exc)

    return parse


def add_inference_service(servicer: InferenceService, server) -> None:
    """Register ``servicer`` like the generated ``add_GRPCInferenceServiceServicer_to_server``,
    with deserializers that turn undecodable request bytes into INVALID_ARGUMENT."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
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
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


OPEN_METHODS = {"ServerLive", "ServerReady"}  # probes need no token


def rpc_method(fn: Callable) -> Callable:
    """Authenticate, run, and map errors: domain errors to their code and message,
    anything else to INTERNAL with the traceback logged here and never sent."""

    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: InferenceService, request, context: grpc.aio.ServicerContext):
        try:
            if name not in OPEN_METHODS:
                self.authenticate(context)
            if isinstance(request, Undecodable):
                raise InvalidArgument(
                    f"the request bytes are not a valid {request.message}: {request.error}"
                )
            return await fn(self, request, context)
        except InferError as exc:
            await context.abort(status_of(exc), clip_message(str(exc)))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("%s failed", name)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}; see logs")

    return wrapper


class InferenceService(rpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, token: str | None) -> None:
        self.plane = plane
        self._token = token.encode() if token else None

    def authenticate(self, context) -> None:
        if self._token is None:
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                scheme, _, credentials = given.strip().partition(b" ")
                # RFC 6750 / 7235: the scheme is case-insensitive, the token is not.
                if scheme.lower() == b"bearer" and hmac.compare_digest(
                    credentials.strip(), self._token
                ):
                    return
        raise Unauthenticated("missing or wrong bearer token: send 'authorization: Bearer <token>'")

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
        # innfer extension (OIP leaves metadata parameters open): the tiers a client may ask for
        m = self.plane.model(request.name, request.version)
        context.set_trailing_metadata((("innfer-tiers", self.plane.tiers_json(m)),))
        return resp

    @rpc_method
    async def ModelConfig(self, request, context):
        m = self.plane.model(request.name, request.version)
        cfg = mc.ModelConfig(name=m.name, platform="innfer_inn", max_batch_size=m.config.max_batch)
        for spec, field in ((m.config.inputs, cfg.input), (m.config.outputs, cfg.output)):
            for t in spec:
                entry = field.add(name=t.name, dims=list(t.shape))
                entry.data_type = mc.DataType.Value(_triton_type(t.dtype))
        cfg.parameters["tiers"].string_value = self.plane.tiers_json(m)
        cfg.parameters["default_latency_budget_ms"].string_value = str(
            m.config.default_latency_budget_ms
        )
        cfg.parameters["policy"].string_value = self.plane.config.policy
        return pb.ModelConfigResponse(config=cfg)

    @rpc_method
    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else list(self.plane.models)
        resp = pb.ModelStatisticsResponse()
        for name in names:
            m = self.plane.model(name, request.version)
            s = resp.model_stats.add(name=name, version="1")
            s.last_inference = m.last_inference_ms
            served = sum(v["count"] for v in m.stats.values())
            s.inference_count = served
            s.execution_count = served
            ns = sum(v["ns"] for v in m.stats.values())
            s.inference_stats.success.count = served
            s.inference_stats.success.ns = ns
            s.inference_stats.compute_infer.count = served
            s.inference_stats.compute_infer.ns = ns
        return resp

    @rpc_method
    async def RepositoryIndex(self, request, context):
        resp = pb.RepositoryIndexResponse()
        for name in self.plane.repo.names():
            loaded = name in self.plane.models
            if request.ready and not loaded:
                continue
            resp.models.add(name=name, version="1", state="READY" if loaded else "UNAVAILABLE")
        return resp

    @rpc_method
    async def RepositoryModelLoad(self, request, context):
        self.plane.check_model_control()
        await self.plane.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc_method
    async def RepositoryModelUnload(self, request, context):
        self.plane.check_model_control()
        await self.plane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @rpc_method
    async def ModelInfer(self, request, context):
        return await self.plane.infer(request, context.time_remaining())


class HealthService(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: "" and "liveness" are SERVING while the process runs; "readiness"
    (and the OIP service name) only when every configured model is loaded and warm and the
    server is not draining - what Kubernetes' gRPC readiness probe asks."""

    SERVICES = ("", "liveness", "readiness", "inference.GRPCInferenceService")

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def status(self, service: str) -> int:
        S = health_pb2.HealthCheckResponse
        if service not in self.SERVICES:
            return S.SERVICE_UNKNOWN
        if service in ("", "liveness"):
            return S.SERVING
        return S.SERVING if self.plane.ready() else S.NOT_SERVING

    async def Check(self, request, context):
        status = self.status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)


def _triton_type(dtype: str) -> str:
    return {
        "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64",
        "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
    }[dtype]  # fmt: skip
