"""Second-pass review of the serving layer (session 27): each test failed before its fix.

Real parts: the gRPC server on loopback, tritonclient, ONNX Runtime engines (the
``model_repository`` fixture), the config parser."""

from __future__ import annotations

import errno
import socket
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from serverutil import ServerThread

from runtime.repository.config import TensorConfig
from server import codec
from server import metrics as metrics_module
from server.config import ConfigError, ServerConfig
from server.errors import InvalidArgument
from server.metrics import Metrics
from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import grpc_service_pb2_grpc as rpc

pytestmark = pytest.mark.e2e


def _input(x: np.ndarray) -> tc.InferInput:
    i = tc.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


@pytest.fixture(scope="module")
def shared(model_repository):
    """'tiny' (one instance) on a server whose shared device runs 3 batches at once, with
    1 MiB of requests in flight at most."""
    s = ServerThread({
        "repository": str(model_repository), "models": ["tiny"], "device_slots": 3,
        "limits": {"max_inflight_bytes": 2**20},
    }).start()  # fmt: skip
    yield s
    s.stop()


def test_model_config_counts_the_models_instances_not_the_devices_slots(shared):
    # instance_group.count said 3 (the device's slots) for a model that runs one batch at a
    # time: what perf_analyzer and operators read as the model's concurrency.
    m = shared.server.plane.models["tiny"]
    assert m.config.instances == 1 and m.scheduler.slots == 3
    with tc.InferenceServerClient(shared.address) as c:
        [group] = c.get_model_config("tiny").config.instance_group
        assert group.count == m.scheduler.max_running == 1
        x = np.zeros((1, 1, 8, 8), np.float32)
        assert c.infer("tiny", [_input(x)]).as_numpy("logits").shape == (1, 10)


def test_a_request_alone_above_the_inflight_cap_is_not_told_to_retry(shared):
    # Nothing else in flight, the request alone above the cap: "retry shortly" could only
    # be refused again; the message says what to change.
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    req.raw_input_contents.append(bytes(2 * 2**20))
    with grpc.insecure_channel(shared.address) as ch, pytest.raises(grpc.RpcError) as err:
        rpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = err.value.details()
    assert "retry" not in message and "limits.max_inflight_bytes" in message, message
    assert "2.0 MiB" in message and "fewer rows" in message
    assert shared.server.plane.inflight_bytes == 0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_host_is_served(model_repository):
    # "::1" passed the config (it is even one of its loopback names) and the server failed
    # to start: gRPC read "::1:<port>" as host "::1:<port>"'s last colon.
    s = ServerThread({"repository": str(model_repository), "models": ["tiny"], "host": "::1"})
    s.start()
    try:
        with tc.InferenceServerClient(f"[::1]:{s.server.port}") as c:
            assert c.is_server_ready()
            x = np.zeros((1, 1, 8, 8), np.float32)
            assert c.infer("tiny", [_input(x)]).as_numpy("logits").shape == (1, 10)
    finally:
        s.stop()


@pytest.mark.parametrize("host", ["localhost:9000", "[::1]", "127.0.0.1:8001"])
def test_a_host_with_a_port_or_brackets_is_refused_by_the_config(host):
    with pytest.raises(ConfigError, match="without a port"):
        ServerConfig.from_dict({"repository": "models", "host": host})
    ServerConfig.from_dict({"repository": "models", "host": "::"})  # IPv6 any: fine


@pytest.mark.parametrize("token", ["  leading-spaces", "trailing-space ", "t\u00f6ken-caf\u00e9"])
def test_a_bearer_token_no_client_can_send_is_refused_by_the_config(token):
    # gRPC metadata is printable ASCII and the server strips the header's ends: with such a
    # token every call was UNAUTHENTICATED (or INTERNAL on the client), whatever it sent.
    with pytest.raises(ConfigError, match="printable ASCII"):
        ServerConfig.from_dict({"repository": "models", "auth": {"bearer_token": token}})
    cfg = ServerConfig.from_dict({"repository": "models", "auth": {"bearer_token": "in ner-ok"}})
    assert cfg.bearer_token == "in ner-ok"  # a space inside is sent and matched as is


def test_typed_fp16_contents_say_to_send_raw_bytes():
    # FP16 has no typed field; the message read "0 values in contents.raw".
    spec = TensorConfig(name="x", dtype="float16", shape=(2,))
    req = pb.ModelInferRequest()
    t = req.inputs.add(name="x", datatype="FP16", shape=[1, 2])
    t.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidArgument, match="send its values in raw_input_contents"):
        codec.decode_inputs(req, [spec], max_batch=4)
    req = pb.ModelInferRequest(raw_input_contents=[np.ones(2, np.float16).tobytes()])
    req.inputs.add(name="x", datatype="FP16", shape=[1, 2])
    arrays, rows = codec.decode_inputs(req, [spec], max_batch=4)
    assert rows == 1 and arrays["x"].dtype == np.float16


def test_server_metadata_lists_the_triton_extensions_served(shared):
    # classification (class_count) and the ModelConfig RPC were served but not declared.
    with tc.InferenceServerClient(shared.address) as c:
        extensions = set(c.get_server_metadata().extensions)
        assert {"classification", "model_configuration", "statistics"} <= extensions
        # the log settings RPCs and priority / timeout too (review helper-235); binary
        # tensors are the REST front end's, which this server does not run
        assert {"logging", "schedule_policy"} <= extensions
        assert "binary_tensor_data" not in extensions
        out = tc.InferRequestedOutput("logits", class_count=2)
        x = np.zeros((1, 1, 8, 8), np.float32)
        assert c.infer("tiny", [_input(x)], outputs=[out]).as_numpy("logits").shape == (1, 2)


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_metrics_on_a_wildcard_host_answer_over_ipv6_and_ipv4(tmp_path):
    # host 0.0.0.0: gRPC listened on both families, /metrics on IPv4 only - on an IPv6
    # cluster every scrape failed (and the HPA lost its metrics).
    s = ServerThread({"repository": str(tmp_path), "host": "0.0.0.0"}).start()
    try:
        port = s.server.metrics_port
        for url in (f"http://[::1]:{port}/metrics", f"http://127.0.0.1:{port}/metrics"):
            with urllib.request.urlopen(url, timeout=10) as r:
                assert "innfer_build_info" in r.read().decode(), url
    finally:
        s.stop()


def test_metrics_on_a_wildcard_host_fall_back_to_ipv4_without_ipv6(monkeypatch):
    def no_ipv6(port, registry):
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(metrics_module, "_serve_dual_stack", no_ipv6)
    httpd, _ = Metrics(version="test").serve_http(0, "0.0.0.0")
    try:
        assert httpd.address_family == socket.AF_INET
        url = f"http://127.0.0.1:{httpd.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert "innfer_build_info" in r.read().decode()
    finally:
        httpd.shutdown()
        httpd.server_close()
