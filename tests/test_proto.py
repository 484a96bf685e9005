"""The protocol stubs in server/proto_gen: up to date with proto/, and wire-compatible with Triton.

tritonclient's generated modules are the reference: every message we define must carry
Triton's field names, numbers and types, bytes written by either side must parse on the
other, and GRPCInferenceService must expose the same method paths as tritonclient's stub.
"""

from __future__ import annotations

import importlib.util
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc.model_config_pb2 as tmc
import tritonclient.grpc.service_pb2 as tpb
import tritonclient.grpc.service_pb2_grpc as tpb_grpc
from google.protobuf import descriptor_pb2, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from server.proto_gen import (
    POOL,
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    health_pb2,
    health_pb2_grpc,
    model_config_pb2,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# Fields of Triton's ModelConfig that proto/inference/model_config.proto leaves out (and
# reserves). Every other message we define must match Triton's field for field.
MODELCONFIG_OMITTED = {
    "cc_model_filenames": 9,
    "metric_tags": 10,
    "optimization": 12,
    "sequence_batching": 13,
    "ensemble_scheduling": 15,
    "model_warmup": 16,
    "model_operations": 18,
    "batch_input": 20,
    "batch_output": 21,
    "model_repository_agents": 23,
    "model_metrics": 26,
}


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO_ROOT / "proto/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- generation


def test_checked_in_stubs_match_fresh_generation():
    import grpc_tools  # noqa: F401 - the dev extra: fail, not skip

    problems = _load_generator().check()
    assert not problems, "server/proto_gen is stale; run `python proto/generate.py`:\n" + "\n".join(
        problems
    )


def test_generator_check_reports_differences(tmp_path):
    import grpc_tools  # noqa: F401 - the dev extra: fail, not skip

    gen = _load_generator()
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1  # empty: everything missing
    names = gen.generate(tmp_path)
    assert {"__init__.py", "grpc_service_pb2.py", "health_pb2_grpc.py"} <= set(names)
    assert gen.check(tmp_path) == []
    assert gen.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "health_pb2.py").write_text("# edited\n", encoding="utf-8")
    (tmp_path / "old_pb2.py").write_text("", encoding="utf-8")
    problems = gen.check(tmp_path)
    assert any(p.startswith("differs: health_pb2.py") for p in problems), problems
    assert "stale (not generated any more): old_pb2.py" in problems
    gen.generate(tmp_path)  # regenerating repairs both
    assert gen.check(tmp_path) == []


def test_stubs_use_private_descriptor_pool():
    # tritonclient owns the inference.* names in the default pool; ours live in POOL.
    assert grpc_service_pb2.DESCRIPTOR.pool is POOL
    assert POOL.FindMessageTypeByName("inference.ModelInferRequest") is (
        grpc_service_pb2.ModelInferRequest.DESCRIPTOR
    )
    assert grpc_service_pb2.ModelInferRequest.__module__ == "server.proto_gen.grpc_service_pb2"
    assert tpb.ModelInferRequest.DESCRIPTOR is not grpc_service_pb2.ModelInferRequest.DESCRIPTOR


# --------------------------------------------------------------------------- descriptors


def _messages(*files) -> dict[str, Descriptor]:
    """full name -> descriptor of every message in the files, nested ones included."""
    out: dict[str, Descriptor] = {}

    def walk(desc: Descriptor) -> None:
        out[desc.full_name] = desc
        for nested in desc.nested_types:
            walk(nested)

    for file in files:
        for desc in file.message_types_by_name.values():
            walk(desc)
    return out


def _enums(*files) -> dict[str, dict[str, int]]:
    out = {e.full_name: e for f in files for e in f.enum_types_by_name.values()}
    for desc in _messages(*files).values():
        out.update({e.full_name: e for e in desc.enum_types})
    return {name: {v.name: v.number for v in e.values} for name, e in out.items()}


def _field_signature(field: FieldDescriptor) -> tuple:
    sub = field.message_type or field.enum_type
    oneof = field.containing_oneof
    return (
        field.number,
        field.type,
        field.is_repeated,
        sub.full_name if sub is not None else None,
        oneof.name if oneof is not None else None,
    )


def _field_map(desc: Descriptor) -> dict[str, tuple]:
    return {f.name: _field_signature(f) for f in desc.fields}


OURS_FILES = (model_config_pb2.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR)
THEIRS_FILES = (tmc.DESCRIPTOR, tpb.DESCRIPTOR)


def test_every_service_message_is_defined():
    ours = set(_messages(grpc_service_pb2.DESCRIPTOR))
    theirs = set(_messages(tpb.DESCRIPTOR))
    assert ours == theirs
    # model_config.proto is a subset of Triton's.
    assert set(_messages(model_config_pb2.DESCRIPTOR)) <= set(_messages(tmc.DESCRIPTOR))


@pytest.mark.parametrize("name", sorted(_messages(*OURS_FILES)))
def test_field_numbers_match_triton(name):
    ours = _field_map(_messages(*OURS_FILES)[name])
    theirs = _field_map(_messages(*THEIRS_FILES)[name])
    if name != "inference.ModelConfig":
        assert ours == theirs
        return
    assert {k: theirs[k] for k in ours} == ours
    omitted = {k: theirs[k][0] for k in theirs.keys() - ours.keys()}
    assert omitted == MODELCONFIG_OMITTED
    proto = descriptor_pb2.DescriptorProto()
    model_config_pb2.ModelConfig.DESCRIPTOR.CopyToProto(proto)
    reserved = {n for r in proto.reserved_range for n in range(r.start, r.end)}
    assert set(MODELCONFIG_OMITTED.values()) <= reserved


def test_enum_values_match_triton():
    ours, theirs = _enums(*OURS_FILES), _enums(*THEIRS_FILES)
    assert ours
    for name, values in ours.items():
        assert theirs[name] == values, name
    assert ours["inference.DataType"]["TYPE_STRING"] == 13
    assert ours["inference.DataType"]["TYPE_BF16"] == 14


# --------------------------------------------------------------------------- wire round trips


def _to_dict(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _round_trip(ours):
    """ours -> bytes -> tritonclient's class -> bytes -> ours; both views must agree."""
    theirs_cls = getattr(tpb, type(ours).__name__)
    theirs = theirs_cls.FromString(ours.SerializeToString())
    assert _to_dict(theirs) == _to_dict(ours)
    back = type(ours).FromString(theirs.SerializeToString())
    assert back == ours
    return theirs


def _infer_request():
    pb = grpc_service_pb2
    req = pb.ModelInferRequest(model_name="mlp", model_version="3", id="req-17")
    req.parameters["sequence_id"].uint64_param = 2**63 + 5
    req.parameters["priority"].int64_param = -4
    req.parameters["tier"].string_param = "small"
    req.parameters["binary_data_output"].bool_param = True
    req.parameters["budget"].double_param = 0.25
    x = req.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    x.parameters["binary_data_size"].int64_param = 24
    req.inputs.add(name="ids", datatype="INT64", shape=[2]).contents.int64_contents.extend(
        [-1, 2**40]
    )
    typed = req.inputs.add(name="all", datatype="BYTES", shape=[1]).contents
    typed.bool_contents.extend([True, False])
    typed.int_contents.extend([-3, 7])
    typed.uint_contents.extend([2**32 - 1])
    typed.uint64_contents.extend([2**64 - 1])
    typed.fp32_contents.extend([1.5, -0.5])
    typed.fp64_contents.extend([3.25])
    typed.bytes_contents.extend([b"ab", b"\x00\xff"])
    out = req.outputs.add(name="y")
    out.parameters["classification"].int64_param = 3
    req.raw_input_contents.extend([bytes(range(24)), b""])
    return req


def _infer_response():
    pb = grpc_service_pb2
    resp = pb.ModelInferResponse(model_name="mlp", model_version="3", id="req-17")
    resp.parameters["tier"].string_param = "small"
    y = resp.outputs.add(name="y", datatype="FP32", shape=[2, 4])
    y.parameters["binary_data_size"].int64_param = 32
    s = resp.outputs.add(name="label", datatype="BYTES", shape=[1])
    s.contents.bytes_contents.append(b"cat")
    resp.raw_output_contents.extend([b"\x01" * 32])
    return resp


def _model_metadata():
    pb = grpc_service_pb2
    tm = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name="mlp",
        versions=["1", "3"],
        platform="onnxruntime_onnx",
        inputs=[tm(name="x", datatype="FP32", shape=[-1, 3])],
        outputs=[tm(name="y", datatype="FP32", shape=[-1, 4]), tm(name="z", datatype="BYTES")],
    )


def _model_config():
    mc = model_config_pb2
    cfg = mc.ModelConfig(
        name="mlp",
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        runtime="cpu",
        max_batch_size=64,
        default_model_filename="model.onnx",
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=2)),
        input=[
            mc.ModelInput(
                name="x",
                data_type=mc.TYPE_FP32,
                format=mc.ModelInput.FORMAT_NCHW,
                dims=[3, -1],
                reshape=mc.ModelTensorReshape(shape=[3, 1, -1]),
                optional=True,
            )
        ],
        output=[
            mc.ModelOutput(name="y", data_type=mc.TYPE_BF16, dims=[4], label_filename="l.txt"),
            mc.ModelOutput(name="s", data_type=mc.TYPE_STRING, dims=[1], is_shape_tensor=True),
        ],
        instance_group=[
            mc.ModelInstanceGroup(
                name="g",
                kind=mc.ModelInstanceGroup.KIND_GPU,
                count=2,
                gpus=[0, 1],
                profile=["p"],
                rate_limiter=mc.ModelRateLimiter(
                    resources=[mc.ModelRateLimiter.Resource(name="r", count=3, **{"global": True})],
                    priority=1,
                ),
                host_policy="numa0",
            )
        ],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=[8, 32],
            max_queue_delay_microseconds=500,
            preserve_ordering=True,
            priority_levels=2,
            default_priority_level=1,
            default_queue_policy=mc.ModelQueuePolicy(
                timeout_action=mc.ModelQueuePolicy.DELAY,
                default_timeout_microseconds=10_000,
                allow_timeout_override=True,
                max_queue_size=128,
            ),
        ),
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=False),
        response_cache=mc.ModelResponseCache(enable=True),
    )
    cfg.dynamic_batching.priority_queue_policy[1].max_queue_size = 16
    cfg.parameters["tiers"].string_value = "0.25,0.5,1.0"
    cfg.parameters["inn"].string_value = "true"
    return grpc_service_pb2.ModelConfigResponse(config=cfg)


def _model_statistics():
    pb = grpc_service_pb2
    d = pb.StatisticDuration
    stats = pb.ModelStatistics(
        name="mlp",
        version="3",
        last_inference=1_700_000_000_000,
        inference_count=1000,
        execution_count=40,
        inference_stats=pb.InferStatistics(
            success=d(count=1000, ns=5_000_000),
            fail=d(count=2, ns=10),
            queue=d(count=1000, ns=2**40),
            compute_input=d(count=40, ns=1),
            compute_infer=d(count=40, ns=2),
            compute_output=d(count=40, ns=3),
            cache_hit=d(count=1, ns=4),
            cache_miss=d(count=5, ns=6),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=25,
                compute_input=d(count=40, ns=7),
                compute_infer=d(count=40, ns=8),
                compute_output=d(count=40, ns=9),
            )
        ],
        memory_usage=[pb.MemoryUsage(type="CPU", id=0, byte_size=2**33)],
    )
    stats.response_stats["0"].success.count = 9
    stats.response_stats["0"].empty_response.ns = 11
    stats.response_stats["1"].cancel.count = 1
    return pb.ModelStatisticsResponse(model_stats=[stats, pb.ModelStatistics(name="other")])


def _repository_index():
    idx = grpc_service_pb2.RepositoryIndexResponse.ModelIndex
    return grpc_service_pb2.RepositoryIndexResponse(
        models=[
            idx(name="mlp", version="3", state="READY"),
            idx(name="cnn", version="1", state="UNAVAILABLE", reason="failed to load"),
        ]
    )


def _server_metadata():
    return grpc_service_pb2.ServerMetadataResponse(
        name="innfer", version="0.1.0", extensions=["model_repository", "statistics"]
    )


@pytest.mark.parametrize(
    "build",
    [
        _infer_request,
        _infer_response,
        _model_metadata,
        _model_config,
        _model_statistics,
        _repository_index,
        _server_metadata,
    ],
)
def test_round_trip_with_tritonclient(build):
    ours = build()
    assert ours.ByteSize() > 0
    _round_trip(ours)


def test_round_trip_values_spot_check():
    theirs = _round_trip(_infer_request())
    assert theirs.parameters["sequence_id"].uint64_param == 2**63 + 5
    assert theirs.parameters["budget"].WhichOneof("parameter_choice") == "double_param"
    assert list(theirs.inputs[1].contents.int64_contents) == [-1, 2**40]
    assert theirs.raw_input_contents[0] == bytes(range(24))
    cfg = _round_trip(_model_config()).config
    assert cfg.max_batch_size == 64
    assert cfg.input[0].data_type == tmc.TYPE_FP32
    assert cfg.output[0].data_type == tmc.TYPE_BF16
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert cfg.parameters["tiers"].string_value == "0.25,0.5,1.0"
    assert cfg.instance_group[0].kind == tmc.ModelInstanceGroup.KIND_GPU


def _fill(msg, variant: int, depth: int = 0) -> None:
    """Set every field of msg (for each oneof, member number `variant` modulo its size)."""
    assert depth < 8
    desc = msg.DESCRIPTOR
    for field in desc.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.fields[variant % len(oneof.fields)] is not field:
            continue
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key_f, value_f = entry.fields_by_name["key"], entry.fields_by_name["value"]
            container = getattr(msg, field.name)
            for i in (1, 2):
                key = _scalar(key_f, i)
                if value_f.message_type is not None:
                    _fill(container[key], variant + i, depth + 1)
                else:
                    container[key] = _scalar(value_f, i)
        elif field.message_type is not None and field.is_repeated:
            for i in (1, 2):
                _fill(getattr(msg, field.name).add(), variant + i, depth + 1)
        elif field.message_type is not None:
            sub = getattr(msg, field.name)
            sub.SetInParent()
            _fill(sub, variant, depth + 1)
        elif field.is_repeated:
            getattr(msg, field.name).extend([_scalar(field, 1), _scalar(field, 2)])
        else:
            setattr(msg, field.name, _scalar(field, 1))


def _scalar(field: FieldDescriptor, i: int):
    t, n = field.type, field.number + i
    if field.enum_type is not None:
        values = field.enum_type.values
        return values[(n % (len(values) - 1)) + 1].number if len(values) > 1 else 0
    if t == FieldDescriptor.TYPE_BOOL:
        return True
    if t in (FieldDescriptor.TYPE_STRING,):
        return f"{field.name}-{i}"
    if t == FieldDescriptor.TYPE_BYTES:
        return bytes([0, 255, n % 256]) + field.name.encode()
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return n + 0.5
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return 2**31 + n
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return 2**63 + n
    if t in (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
    ):
        return -(2**40) - n
    return -n  # 32-bit signed


_OUR_TOP_LEVEL = sorted(grpc_service_pb2.DESCRIPTOR.message_types_by_name)


@pytest.mark.parametrize("name", _OUR_TOP_LEVEL)
def test_every_field_round_trips(name):
    cls = getattr(grpc_service_pb2, name)
    for variant in range(5):  # the widest oneof (InferParameter) has five members
        msg = cls()
        _fill(msg, variant)
        _round_trip(msg)


# --------------------------------------------------------------------------- service


class _RecordingChannel:
    """Stands in for a grpc.Channel: records which multicallables a stub asks for."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def _record(self, kind):
        def make(path, *args, **kwargs):
            self.calls.append((kind, path))
            return None

        return make

    def __getattr__(self, kind):
        if kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            return self._record(kind)
        raise AttributeError(kind)


def _service_methods(file) -> list[tuple]:
    service = file.services_by_name["GRPCInferenceService"]
    return [
        (
            m.name,
            m.input_type.full_name,
            m.output_type.full_name,
            m.client_streaming,
            m.server_streaming,
        )
        for m in service.methods
    ]


def test_service_matches_tritonclient():
    ours, theirs = grpc_service_pb2.DESCRIPTOR, tpb.DESCRIPTOR
    assert ours.package == theirs.package == "inference"
    assert (
        ours.services_by_name["GRPCInferenceService"].full_name
        == theirs.services_by_name["GRPCInferenceService"].full_name
    )
    assert _service_methods(ours) == _service_methods(theirs)
    names = [m[0] for m in _service_methods(ours)]
    for required in (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    ):
        assert required in names


def test_stub_paths_match_tritonclient():
    ours, theirs = _RecordingChannel(), _RecordingChannel()
    grpc_service_pb2_grpc.GRPCInferenceServiceStub(ours)
    tpb_grpc.GRPCInferenceServiceStub(theirs)
    assert ours.calls == theirs.calls
    assert ("unary_unary", "/inference.GRPCInferenceService/ModelInfer") in ours.calls
    assert ("stream_stream", "/inference.GRPCInferenceService/ModelStreamInfer") in ours.calls
    servicer = grpc_service_pb2_grpc.GRPCInferenceServiceServicer
    for _, path in ours.calls:
        assert callable(getattr(servicer, path.rsplit("/", 1)[1]))


def test_health_service():
    channel = _RecordingChannel()
    health_pb2_grpc.HealthStub(channel)
    assert channel.calls == [
        ("unary_unary", "/grpc.health.v1.Health/Check"),
        ("unary_stream", "/grpc.health.v1.Health/Watch"),
    ]
    status = health_pb2.HealthCheckResponse.ServingStatus
    assert dict(status.items()) == {
        "UNKNOWN": 0,
        "SERVING": 1,
        "NOT_SERVING": 2,
        "SERVICE_UNKNOWN": 3,
    }
    assert [(f.name, f.number) for f in health_pb2.HealthCheckRequest.DESCRIPTOR.fields] == [
        ("service", 1)
    ]
    assert [(f.name, f.number) for f in health_pb2.HealthCheckResponse.DESCRIPTOR.fields] == [
        ("status", 1)
    ]


# --------------------------------------------------------------------------- over a socket


class _EchoServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, request, context):
        return grpc_service_pb2.ServerLiveResponse(live=True)

    def ModelInfer(self, request, context):
        resp = grpc_service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            resp.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            resp.raw_output_contents.append(raw)
        return resp


class _HealthServicer(health_pb2_grpc.HealthServicer):
    def Check(self, request, context):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.e2e
def test_tritonclient_talks_to_our_stubs():
    import numpy as np
    import tritonclient.grpc as tritongrpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_EchoServicer(), server)
    health_pb2_grpc.add_HealthServicer_to_server(_HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = tritongrpc.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live()
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        inp = tritongrpc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("echo", [inp], request_id="r1")
        np.testing.assert_array_equal(result.as_numpy("x"), x)
        assert result.get_response().id == "r1"
        with pytest.raises(
            tritongrpc.InferenceServerException, match=r"UNIMPLEMENTED|nimplemented"
        ):
            client.is_server_ready()
        client.close()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace=None)
