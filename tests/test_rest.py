"""The OIP REST front end (server/rest.py) against a real server: real aiohttp, the stock
``tritonclient.http`` client (Triton's binary tensor extension) and plain JSON over urllib,
beside ``tritonclient.grpc`` on the same server - the two transports must answer alike."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from serverutil import ServerThread, add_onnx_model, slow_loop, tiny_cnn
from tritonclient.utils import InferenceServerException

from server import rest, rest_codec
from server.errors import InvalidArgument

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(model_repository):
    s = ServerThread({"repository": str(model_repository), "model_control": "explicit",
                      "http_port": 0}).start()  # fmt: skip
    yield s
    s.stop()


@pytest.fixture
def http(server):
    c = th.InferenceServerClient(f"127.0.0.1:{server.server.rest.port}")
    yield c
    c.close()


def _call(server, path: str, body=None, method=None, headers=None):
    """(status, headers, body bytes) of one plain HTTP call."""
    url = f"http://127.0.0.1:{server.server.rest.port}{path}"
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _error(server, path, body=None, method=None, headers=None) -> tuple[int, str]:
    status, _, data = _call(server, path, body, method, headers)
    return status, json.loads(data)["error"]


def _x(batch=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 1, 8, 8)).astype(np.float32)


def _infer_body(x, **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}], **extra}  # fmt: skip


def test_health_metadata_and_config_as_triton_http_clients_read_them(server, http):
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready("tiny") and not http.is_model_ready("nope")
    meta = http.get_model_metadata("tiny")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    config = http.get_model_config("tiny")
    assert config["max_batch_size"] == 4 and config["input"][0]["dims"] == [1, 8, 8]
    assert json.loads(config["parameters"]["tiers"]["string_value"])[0]["name"] == "w100"
    meta = http.get_server_metadata()
    assert meta["name"] == "innfer" and "binary_tensor_data" in meta["extensions"]
    # Probes: 200 while ready; every answer is JSON
    status, headers, body = _call(server, "/v2/health/ready")
    assert (status, json.loads(body)) == (200, {"ready": True})
    assert headers["Content-Type"].startswith("application/json")


def test_statistics_write_zero_durations_as_triton_does(server, http):
    stats = http.get_inference_statistics("wide")["model_stats"][0]
    assert set(stats["inference_stats"]) >= {"success", "fail", "queue", "compute_infer"}
    assert all(set(d) == {"count", "ns"} for d in stats["inference_stats"].values())


def test_binary_and_json_answers_match_grpc_on_the_same_tier(server, http):
    x = _x()
    grpc = tg.InferenceServerClient(server.address)
    t = tg.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    want = grpc.infer("tiny", [t], parameters={"tier": "w050"}).as_numpy("logits")
    grpc.close()
    # tritonclient.http: the input and the output as binary data (its defaults)
    h = th.InferInput("input", list(x.shape), "FP32")
    h.set_data_from_numpy(x)
    r = http.infer("tiny", [h], parameters={"tier": "w050"})
    np.testing.assert_array_equal(r.as_numpy("logits"), want)
    params = r.get_response()["parameters"]
    assert params["tier"] == "w050" and params["batch_size"] == 2
    # plain JSON both ways
    status, headers, body = _call(server, "/v2/models/tiny/infer",
                                  _infer_body(x, id="r1", parameters={"tier": "w050"}))  # fmt: skip
    doc = json.loads(body)
    assert status == 200 and doc["id"] == "r1" and codec_header(headers) is None
    out = doc["outputs"][0]
    assert out["shape"] == [2, 10] and out["datatype"] == "FP32"
    np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(2, 10), want)
    # a nested JSON list is read in row-major order, as the flat one
    nested = _infer_body(x, parameters={"tier": "w050"})
    nested["inputs"][0]["data"] = x.tolist()
    doc = json.loads(_call(server, "/v2/models/versions/1/infer".replace(
        "versions", "tiny/versions"), nested)[2])  # fmt: skip
    np.testing.assert_array_equal(np.array(doc["outputs"][0]["data"], np.float32), want.ravel())


def codec_header(headers):
    return headers.get("Inference-Header-Content-Length")


def test_a_json_input_with_a_binary_output_and_classification(server, http):
    x = _x(1)
    binary = {"name": "logits", "parameters": {"binary_data": True}}
    body = _infer_body(x, parameters={"tier": "w100"}, outputs=[binary])
    status, headers, data = _call(server, "/v2/models/tiny/infer", body)
    n = int(codec_header(headers))
    doc = json.loads(data[:n])
    assert status == 200 and doc["outputs"][0]["parameters"] == {"binary_data_size": 40}
    logits = np.frombuffer(data[n:], np.float32)
    h = th.InferInput("input", [1, 1, 8, 8], "FP32")
    h.set_data_from_numpy(x, binary_data=False)  # JSON in
    out = th.InferRequestedOutput("logits", binary_data=False, class_count=3)
    r = http.infer("tiny", [h], outputs=[out], parameters={"tier": "w100"})
    top = r.as_numpy("logits")[0]
    assert [int(str(s).split(":")[1]) for s in top] == list(np.argsort(-logits)[:3])


def test_an_answer_is_gzipped_where_the_client_accepts_it(server):
    import gzip

    req = urllib.request.Request(
        f"http://127.0.0.1:{server.server.rest.port}/v2/models/wide/infer",
        data=json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28],
                                     "datatype": "FP32", "data": [0.25] * 784}]}).encode(),
        headers={"Accept-Encoding": "gzip"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        doc = json.loads(gzip.decompress(r.read()))
    assert doc["outputs"][0]["shape"] == [1, 10]
    req.headers["Accept-encoding"] = "gzip;q=0, identity"  # (RFC 9110: q=0 refuses it)
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Encoding"] is None
        assert json.loads(r.read())["outputs"][0]["shape"] == [1, 10]


def test_a_parameter_in_uint64_range_is_taken_as_grpc_takes_it(server):
    """JSON has one kind of number: a whole number in [2**63, 2**64) is a uint64_param, as a
    gRPC client sends it (an unknown one ignored, as OIP says); REST alone refused it with
    "must be ... a finite number ..., not a number" (review helper-282)."""
    from server.proto_gen import grpc_service_pb2 as pb

    parsed = rest_codec.parse_infer(
        json.dumps(_infer_body(_x(1), parameters={"seed": 2**64 - 1})).encode(), None
    )
    assert parsed.request.parameters["seed"] == pb.InferParameter(uint64_param=2**64 - 1)
    status, _, data = _call(
        server, "/v2/models/tiny/infer", _infer_body(_x(1), parameters={"seed": 2**63})
    )
    assert status == 200, data


@pytest.mark.parametrize(
    "body, where",
    [
        (b"{not json", "not JSON"),
        ({"inputs": []}, "has no inputs"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [1.0] * 63}]}, "63 values in data, expected 64"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": ["a"] * 64}]}, "FP32 data must be numbers"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [[1.0], [1.0, 2.0]]}]}, "nested unevenly"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "INT32",
                      "data": [2**40] * 64}]}, "outside INT32's range"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "INT32",
                      "data": [1] * 64}]}, "datatype"),  # the model's input is FP32
        # past FP32's range: served as inf, every output NaN, with 200 (review helper-227)
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [1e39] + [0.0] * 63}]}, "outside FP32's range (about +-3.403e+38)"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP16",
                      "data": [7e4] + [0.0] * 63}]}, "outside FP16's range"),
        # whole numbers past int64: "INT64 data must be whole numbers" (numpy made them
        # floats, or Python ints)
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "INT64",
                      "data": [-1, 2**64 - 1] + [0] * 62}]}, "outside INT64's range"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "UINT64",
                      "data": [2**70] + [0] * 63}]}, "outside UINT64's range"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "INT64",
                      "data": [0.5] * 64}]}, "INT64 data must be whole numbers"),
        # values in the body and in a region: gRPC's words, "raw_input_contents has 1
        # entries for 0 inputs", which a REST client never sends
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [0.0] * 64, "parameters": {"shared_memory_region": "r"}}]},
         "has both data and parameters.shared_memory_region"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "parameters": {"shared_memory_region": "r", "binary_data_size": 256}}]},
         "has both parameters.binary_data_size and parameters.shared_memory_region"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [0.0] * 64, "paramters": {}}]}, "unknown field 'paramters'"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32"}]},
         "has no data"),
        ({"inputs": [{"name": "input", "shape": "1x64", "datatype": "FP32", "data": []}]},
         "shape must be a list"),
        # review helper-260: 8 M empty lists (24 KB of gzip) held the loop 9 s
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [[]] * 200_000}]}, "200,005 lists and objects; at most 131,072"),
        # review helper-256: counted before any is read (60,000 inputs held the loop 14.6 s)
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [0.0] * 64}] * 65}, "65 inputs given; at most 64"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [0.0] * 64}], "outputs": [{"name": "logits"}] * 65},
         "65 outputs given; at most 64"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [0.0] * 64}], "parameters": {f"p{i}": 1 for i in range(65)}},
         "65 request parameters given; at most 64"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [0.0] * 64, "parameters": {f"p{i}": 1 for i in range(65)}}]},
         "65 inputs[0] parameters given"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [[0.0] * 64] * 1000}]},
         "more than 64 values in data, expected 64"),
        # review helper-249: said in numpy's terms ("nested unevenly") or as a Python value
        ({"inputs": [{"name": "input", "shape": [1] * 65, "datatype": "FP32", "data": [0.0]}]},
         "shape has 65 dims; a tensor has at most 64"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": functools.reduce(lambda d, _: [d], range(66), [0.0])}]},
         "nested deeper than 64 levels"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "parameters": {"binary_data_size": True}}]}, "not a boolean"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [0.0] * 64}], "parameters": {"tierr": "w100"}},
         "did you mean 'tier'"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [0.0] * 64}], "parameters": {"latency_budget_ms": [1]}},
         "'latency_budget_ms' must be a string, a finite number or a boolean"),
        # in plain words: it said "got a string_param" / "a bool_param" (review helper-235)
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [0.0] * 64}], "parameters": {"latency_budget_ms": "20"}},
         "'latency_budget_ms' must be a number, got the string '20'"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                      "data": [0.0] * 64}], "parameters": {"priority": True}},
         "'priority' must be a number, got true"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_saying_what_is_wrong(server, body, where):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    inputs = body.get("inputs", []) if isinstance(body, dict) else []
    if where != "datatype" and any(i.get("datatype") != "FP32" for i in inputs):
        # the codec's own checks of another datatype, in process: tiny's input is FP32, so
        # the server refuses the datatype before it reads such values (rest_codec's check)
        with pytest.raises(InvalidArgument, match=re.escape(where)):
            rest_codec.parse_infer(data, None)
        return
    status, message = _error(server, "/v2/models/tiny/infer", data)
    assert status == 400 and where in message, message


def test_binary_lengths_that_do_not_add_up_are_refused(server):
    x = _x(1)
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 256}}]}).encode()  # fmt: skip
    url = "/v2/models/tiny/infer"
    ok = _call(server, url, head + x.tobytes(), headers={"Inference-Header-Content-Length":
                                                         str(len(head))})  # fmt: skip
    assert ok[0] == 200
    cases = [
        (head + x.tobytes()[:100], str(len(head)), "only 100 bytes of binary data are left"),
        (head + x.tobytes() + b"xx", str(len(head)), "2 bytes of binary data after the JSON"),
        (head + x.tobytes(), str(len(head) + 10**6), "the body has"),
        (head + x.tobytes(), "ten", "must be a number of bytes"),
    ]
    for body, length, where in cases:
        status, message = _error(server, url, body, headers={
            "Inference-Header-Content-Length": length})  # fmt: skip
        assert status == 400 and where in message, message


def test_statuses_follow_the_error(server):
    assert _error(server, "/v2/models/nope/infer", _infer_body(_x(1)))[0] == 404
    # a misspelt model with a bad body: the route's 404 first, as with a good body (a 400
    # for the body before - review helper-225)
    status, message = _error(server, "/v2/models/nope/infer", {})
    assert status == 404 and "unknown model 'nope'" in message, message
    assert _error(server, "/v2/models/tiny/infer", {})[0] == 400
    status, message = _error(
        server, "/v2/models/tiny/infer", _infer_body(_x(1), parameters={"latency_budget_ms": 0.001})
    )
    assert status == 504 and "budget" in message
    status, message = _error(server, "/v2/models/tiny/infer", method="GET")
    assert status == 405 and "use POST" in message
    assert _call(server, "/v2/models/tiny/infer", method="GET")[1]["Allow"] == "POST"
    status, message = _error(server, "/v3/anything")
    assert status == 404 and "no route GET /v3/anything" in message
    assert _error(server, "/v2/trace/setting", {"trace_file": "/etc/x"}, method="POST")[0] == 400
    assert _error(server, "/v2/cudasharedmemory/region/r/register", {}, method="POST")[0] == 501
    # a name or version not served: 404 saying so (503 "not ready" had a balancer retry a
    # typo for good: review helper-227); a served model's readiness as before
    status, message = _error(server, "/v2/models/nope/ready")
    assert status == 404 and "unknown model 'nope'" in message, message
    status, message = _error(server, "/v2/models/tiny/versions/7/ready")
    assert status == 404 and "version" in message, message
    assert _call(server, "/v2/models/tiny/ready")[0] == 200
    # a misspelt field of a repository or shared-memory body: refused, not ignored
    status, message = _error(server, "/v2/repository/index", {"redy": True}, "POST")
    assert status == 400 and "unknown field 'redy'" in message, message
    status, message = _error(server, "/v2/repository/models/tiny/load", {"parameter": {}}, "POST")
    assert status == 400 and "unknown field 'parameter'" in message, message
    status, message = _error(server, "/v2/systemsharedmemory/region/r/register",
                             {"key": "/k", "bytesize": 8}, "POST")  # fmt: skip
    assert status == 400 and "unknown field 'bytesize'" in message, message


def _small_limit_server(tmp_path) -> ServerThread:
    """The tiny CNN alone, behind a 1 MiB message (and REST body) limit."""
    add_onnx_model(tmp_path, "tiny", tiny_cnn, {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
        "tiers": [{"name": "w100", "width": 1.0}], "max_batch": 4,
    }, warmup=0, repeats=1)  # fmt: skip
    return ServerThread({"repository": str(tmp_path), "http_port": 0,
                         "max_message_bytes": 2**20}).start()  # fmt: skip


def test_a_body_over_the_message_limit_is_413_naming_the_setting(tmp_path):
    s = _small_limit_server(tmp_path)
    try:
        # (REST bodies: 6x the gRPC limit, room for JSON's text; this one is 7 MiB)
        status, message = _error(s, "/v2/models/tiny/infer", b"[" + b"0," * (7 * 2**19) + b"0]")
        assert status == 413 and "6x max_message_bytes" in message
        assert message.endswith("or the tensors as binary data"), message
        # A body already binary is not told to send binary data (review helper-235)
        status, message = _error(s, "/v2/models/tiny/infer", b"{}" + bytes(7 * 2**20),
                                 headers={"Inference-Header-Content-Length": "2"})  # fmt: skip
        assert status == 413 and "binary data" not in message, message
        assert "or raise max_message_bytes" in message, message
        assert _call(s, "/v2/health/live")[0] == 200  # still serving
    finally:
        s.stop()


def test_repository_and_log_settings_over_rest(server, http):
    index = http.get_model_repository_index()
    assert {m["name"]: m["state"] for m in index} == {"tiny": "READY", "wide": "READY"}
    http.unload_model("wide")
    try:
        assert not http.is_model_ready("wide")
        assert {m["name"]: m.get("reason") for m in http.get_model_repository_index()}[
            "wide"] == "unloaded"  # fmt: skip
    finally:
        http.load_model("wide")
    assert http.is_model_ready("wide")
    settings = http.get_log_settings()
    assert settings["log_error"] is True and "log_verbose_level" in settings
    with pytest.raises(InferenceServerException, match="log_file"):
        http.update_log_settings({"log_file": "/tmp/x.log"})


def test_every_call_is_counted_by_route_and_status(server):
    _call(server, "/v2/models/tiny/infer", _infer_body(_x(1)))
    _call(server, "/v2/models/nope/infer", _infer_body(_x(1)))
    with urllib.request.urlopen(server.metrics_url) as r:
        text = r.read().decode()
    assert 'innfer_http_requests_total{code="200",handler="infer",method="POST"}' in text
    assert 'innfer_http_requests_total{code="404",handler="infer",method="POST"}' in text
    assert "innfer_http_request_duration_seconds_bucket" in text


def test_auth_guards_every_route_but_the_probes(model_repository):
    s = ServerThread({"repository": str(model_repository), "http_port": 0,
                      "auth": {"bearer_token": "s3cret-token-value"}}).start()  # fmt: skip
    try:
        assert _call(s, "/v2/health/ready")[0] == 200
        status, message = _error(s, "/v2/models/tiny/infer", _infer_body(_x(1)))
        assert status == 401 and "bearer token" in message
        assert _error(s, "/v2/models/tiny")[0] == 401
        ok = {"Authorization": "Bearer s3cret-token-value"}
        assert _call(s, "/v2/models/tiny/infer", _infer_body(_x(1)), headers=ok)[0] == 200
        c = th.InferenceServerClient(f"127.0.0.1:{s.server.rest.port}")
        assert c.get_model_metadata("tiny", headers=ok)["name"] == "tiny"
        c.close()
        # with auth on, a browser's request is judged by its token alone (a page has none)
        page = {**ok, "Origin": "http://localhost:3000"}
        assert _call(s, "/v2/models/tiny/infer", _infer_body(_x(1)), headers=page)[0] == 200
    finally:
        s.stop()


def test_a_web_pages_request_is_refused_without_auth(server):
    # A browser on this machine drove a loopback server on behalf of any page: a "simple"
    # cross-origin POST (text/plain) registered shared memory, had an answer written over
    # another program's object, turned logging up and unloaded models (review helper-277).
    # Browsers send Origin on every POST; clients do not.
    page = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    for path, body in (
        ("/v2/models/tiny/infer", _infer_body(_x(1))),
        ("/v2/logging", {"log_verbose_level": 1}),
        ("/v2/systemsharedmemory/unregister", b""),
        ("/v2/repository/models/tiny/unload", b""),
    ):
        status, message = _error(server, path, body, "POST", headers=page)
        assert status == 403 and "a browser's request (Origin: 'http://evil.example')" in message
    assert _call(server, "/v2/models/tiny/ready")[0] == 200  # nothing unloaded
    assert _call(server, "/v2/health/ready", headers=page)[0] == 200  # probes stay open
    assert _call(server, "/v2/models/tiny/infer", _infer_body(_x(1)))[0] == 200  # a client


def test_a_stop_answers_the_call_in_flight_then_closes_the_port(tmp_path):
    add_onnx_model(tmp_path, "slow", slow_loop, {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1024]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
        "tiers": [{"name": "w100", "width": 1.0}], "max_batch": 1,
        "default_latency_budget_ms": 60_000,
    }, warmup=0, repeats=1)  # fmt: skip
    s = ServerThread({"repository": str(tmp_path), "http_port": 0,
                      "profile_at_load": False}).start()  # fmt: skip
    port = s.server.rest.port
    body = {"inputs": [{"name": "input", "shape": [1, 1024], "datatype": "FP32",
                        "data": [0.5] * 1024}]}  # fmt: skip
    answers = []
    call = threading.Thread(target=lambda: answers.append(
        _call(s, "/v2/models/slow/infer", body)))  # fmt: skip
    call.start()
    deadline = time.monotonic() + 10
    while not s.server.plane.inflight() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert s.server.plane.inflight()  # (~0.35 s of engine time from here)
    s.stop(grace=20)
    call.join(20)
    assert answers and answers[0][0] == 200  # accepted before the stop: answered
    assert len(json.loads(answers[0][2])["outputs"][0]["data"]) == 10
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=5)


def test_http_port_clashing_with_another_port_is_refused_in_the_config():
    from server.config import ServerConfig

    with pytest.raises(ValueError, match=r"http_port.*a port other than grpc_port"):
        ServerConfig.from_dict({"repository": "m", "http_port": 8001})


# -- review 210's findings: each test failed before its fix ----------------------------------
@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A server whose one model takes ~0.35 s a batch (requests stay in flight)."""
    root = tmp_path_factory.mktemp("slow")
    add_onnx_model(root, "slow", slow_loop, {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1024]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
        "tiers": [{"name": "w100", "width": 1.0}], "max_batch": 1,
        "default_latency_budget_ms": 60_000,
    }, warmup=0, repeats=1)  # fmt: skip
    s = ServerThread({"repository": str(root), "http_port": 0, "profile_at_load": False})
    yield s.start()
    s.stop()


def _sample(server, name: str, labels: dict) -> float:
    return server.server.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_client_that_leaves_cancels_its_call_without_an_error_logged(slow_server, caplog):
    # Its answer was written into the closed socket: ERROR "REST infer failed" with a
    # traceback and a 500 in the metrics, and the model ran on for nobody.
    import socket

    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1024], "datatype": "FP32",
                                   "data": [0.5] * 1024}]}).encode()  # fmt: skip
    head = (f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    labels = {"handler": "infer", "method": "POST", "code": "499"}
    before = _sample(slow_server, "innfer_http_requests_total", labels)
    with caplog.at_level(logging.DEBUG, logger="innfer"):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", slow_server.server.rest.port)) as c:
                c.sendall(head + body)
                time.sleep(0.1)
        deadline = time.monotonic() + 10
        while _sample(slow_server, "innfer_http_requests_total", labels) < before + 3:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
    assert "REST infer failed" not in caplog.text
    assert _sample(slow_server, "innfer_http_requests_total",
                   {**labels, "code": "500"}) == 0  # fmt: skip
    while slow_server.server.plane.inflight() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow_server.server.plane.inflight() == 0
    assert _call(slow_server, "/v2/health/live")[0] == 200


def test_json_values_count_against_the_in_flight_cap_as_decoded(server, monkeypatch):
    # FP32 zeros "0," are 2 bytes of JSON and 4 decoded: only the body was counted.
    sizes = []
    real = server.server.plane.infer

    async def spy(request, time_remaining, waited_s=0.0, size=None, raw=None, **kw):
        sizes.append((size, sum(len(r) for r in raw)))
        return await real(request, time_remaining, waited_s, size, raw, **kw)

    monkeypatch.setattr(server.server.plane, "infer", spy)
    body = json.dumps({"inputs": [{"name": "input", "shape": [4, 1, 8, 8], "datatype": "FP32",
                                   "data": [0] * 256}]}).encode()  # fmt: skip
    assert _call(server, "/v2/models/tiny/infer", body)[0] == 200
    ((size, decoded),) = sizes
    assert decoded == 1024 and size == len(body) + decoded


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v2/models/tiny/infer", b'{"inputs": [{"name": "input", "shape": [9223372036854775808],'
         b' "datatype": "FP32", "data": [1]}]}'),
        ("/v2/models/tiny/infer", b'{"inputs": [{"name": "in\\ud800", "shape": [1, 1, 8, 8],'
         b' "datatype": "FP32", "data": [' + b"0," * 63 + b'0]}]}'),
        ("/v2/models/tiny/infer", b'{"id": "\\ud800", "inputs": [{"name": "input", "shape": '
         b'[1, 1, 8, 8], "datatype": "FP32", "data": [' + b"0," * 63 + b'0]}]}'),
        ("/v2/models/tiny/infer", b'{"inputs": [{"name": "input", "shape": [1], "datatype": '
         b'"FP32", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"),
        ("/v2/systemsharedmemory/region/r/register", b'{"key": "/k", "offset": -1}'),
        ("/v2/systemsharedmemory/region/r/register", b'{"key": "/k", "byte_size": ' +
         str(2**70).encode() + b"}"),
        ("/v2/repository/models/tiny/load", b'{"parameters": "abc"}'),
        ("/v2/logging", b'{"\\ud800": true}'),
        # review 211: Python refuses integers of more than 4,300 digits with a ValueError
        ("/v2/models/tiny/infer", b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], '
         b'"datatype": "FP32", "data": [' + b"9" * 5000 + b"]}]}"),
        ("/v2/logging", b'{"log_verbose_level": ' + b"9" * 5000 + b"}"),
        # review helper-249: the count's 5,600 digits failed to format (and 30,000 such
        # dims held the event loop 2.9 s multiplying them)
        ("/v2/models/tiny/infer", json.dumps({"inputs": [{"name": "input", "shape": [2**62] * 300,
         "datatype": "FP32", "data": [0.0]}]}).encode()),
        # taken as no parameters, and an unload's body was never read (review helper-249)
        ("/v2/repository/models/tiny/load", b'{"parameters": ""}'),
        ("/v2/repository/models/nosuch/unload", b"{"),
        ("/v2/repository/models/nosuch/unload", b'{"paramters": {}}'),
        # review helper-256: built into messages key by key (300,000: 4.5 s of the loop)
        ("/v2/logging", json.dumps({f"k{i}": True for i in range(65)}).encode()),
        ("/v2/trace/setting", json.dumps({"trace_level": ["TIMESTAMPS"] * 65}).encode()),
        ("/v2/repository/models/tiny/load",
         json.dumps({"parameters": {f"k{i}": "v" for i in range(65)}}).encode()),
    ],
    ids=["shape-2**63", "surrogate-name", "surrogate-id", "deep-nesting", "shm-offset",
         "shm-size", "load-parameters", "log-key", "5000-digits", "5000-digits-logging",
         "many-dims", "load-parameters-empty", "unload-not-json", "unload-misspelt",
         "logging-keys", "trace-values", "load-parameter-keys"],
)  # fmt: skip
def test_client_mistakes_that_were_internal_errors_are_400(server, caplog, path, body):
    with caplog.at_level(logging.ERROR, logger="innfer"):
        status, message = _error(server, path, body, method="POST")
    assert status == 400, message
    assert "internal error" not in message and "failed" not in caplog.text


def test_a_413_is_counted_once(tmp_path):
    s = _small_limit_server(tmp_path)
    try:
        assert _error(s, "/v2/models/tiny/infer", b"0" * (6 * 2**20 + 1))[0] == 413
        counts = {
            sample.labels["handler"]: sample.value
            for metric in s.server.metrics.registry.collect()
            if metric.name == "innfer_http_requests"
            for sample in metric.samples
            if sample.name.endswith("_total") and sample.labels["code"] == "413"
        }
        assert counts == {"infer": 1.0}
    finally:
        s.stop()


def test_non_finite_outputs_are_strict_json(server):
    # json.dumps wrote bare NaN, which strict parsers (JSON.parse, Go, jq) refuse.
    body = b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [' \
        + b"NaN," * 63 + b"NaN]}]}"  # fmt: skip
    status, _, data = _call(server, "/v2/models/tiny/infer", body)

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    doc = json.loads(data, parse_constant=refuse)
    assert status == 200 and doc["outputs"][0]["data"] == ["NaN"] * 10
    # ... and read back in those words: strict JSON has no other way to send them, and
    # the server's own answer could not be sent back to it (review helper-235)
    for word in ("NaN", "Infinity", "-Infinity"):
        body = _infer_body(_x(1))
        body["inputs"][0]["data"][0] = word
        status, _, data = _call(server, "/v2/models/tiny/infer", json.dumps(body).encode())
        assert status == 200, data
    body = _infer_body(_x(1))
    body["inputs"][0]["data"][0] = "nan"  # not protobuf's word: refused as before
    status, message = _error(server, "/v2/models/tiny/infer", json.dumps(body).encode())
    assert status == 400 and '"NaN", "Infinity"' in message, message


def test_http_conventions_head_auth_challenge_and_strict_lengths(model_repository):
    import http.client

    s = ServerThread({"repository": str(model_repository), "http_port": 0,
                      "auth": {"bearer_token": "s3cret-token-value"}}).start()  # fmt: skip
    port = s.server.rest.port
    try:
        assert _call(s, "/v2/health/live", method="HEAD")[0] == 200  # was 405
        status, headers, _ = _call(s, "/v2/models/tiny")
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        # every Authorization header is read, as gRPC reads every authorization entry
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.putrequest("GET", "/v2/models/tiny")
        c.putheader("Authorization", "Bearer wrong")
        c.putheader("Authorization", "Bearer s3cret-token-value")
        c.endheaders()
        assert c.getresponse().status == 200
        c.close()
        ok = {"Authorization": "Bearer s3cret-token-value"}
        head = json.dumps(_infer_body(_x(1))).encode()
        for length in (f" +{len(head)} ", "1_0", "9" * 5000):
            status, message = _error(s, "/v2/models/tiny/infer", head, headers={
                **ok, "Inference-Header-Content-Length": length})  # fmt: skip
            assert status == 400 and "must be a number of bytes" in message
    finally:
        s.stop()


def test_a_stop_with_no_grace_left_does_not_wait_for_a_long_call(model_repository, monkeypatch):
    # Review 211: the REST port's wait was given the grace left, and aiohttp reads 0 as no
    # limit: a stop with nothing left waited for every REST call in flight, however long.
    s = ServerThread({"repository": str(model_repository), "http_port": 0}).start()
    started = threading.Event()

    async def long_call(*args, **kwargs):
        started.set()
        await asyncio.sleep(60)

    monkeypatch.setattr(s.server.plane, "infer", long_call)
    answers = []

    def send():  # cut by the stop: the connection closes without an answer
        try:
            answers.append(_call(s, "/v2/models/tiny/infer", _infer_body(_x(1)))[0])
        except Exception as exc:  # http.client.RemoteDisconnected
            answers.append(type(exc).__name__)

    call = threading.Thread(target=send, daemon=True)
    call.start()
    assert started.wait(10)
    t0 = time.monotonic()
    s.stop(grace=0.0)
    assert time.monotonic() - t0 < 30  # (was the call's whole 60 s)
    call.join(10)
    assert answers and answers[0] != 200


def test_a_body_that_does_not_decode_is_400_not_an_internal_error(server, caplog):
    # aiohttp decompresses a body itself; one that is not what its Content-Encoding says
    # raised RequestPayloadError: 500 "internal error" with a traceback logged per call, a
    # flood of the error log for any client (review helper-217)
    body = json.dumps(_infer_body(_x(1))).encode()
    calls = [("/v2/models/tiny/infer", "gzip"), ("/v2/models/tiny/infer", "br"),
             ("/v2/repository/index", "deflate"), ("/v2/logging", "gzip")]  # fmt: skip
    with caplog.at_level(logging.ERROR):
        for path, coding in calls:
            status, message = _error(server, path, body, "POST", {"Content-Encoding": coding})
            assert status == 400 and "could not be read" in message, (path, coding, message)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert _call(server, "/v2/models/tiny/infer", body)[0] == 200  # and serves on


def test_a_request_that_is_not_http_is_400_without_a_traceback_logged(server, caplog):
    # aiohttp answers it itself, before any route or token check, and logged an ERROR with
    # a traceback for each: 79 kB of log for 100 requests of 32 bytes (review helper-227)
    import socket

    bad = [b"GET /v2/health/live HTTP/1.1\r\n\r\n",  # no Host header
           b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
           b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
           b"\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"]  # fmt: skip
    bad.append(b"GET /v2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cr3t\x7f\r\n\r\n")
    with caplog.at_level(logging.DEBUG, logger="innfer.rest"):
        for raw in bad:
            with socket.create_connection(("127.0.0.1", server.server.rest.port), 10) as sock:
                sock.sendall(raw)
                sock.settimeout(10)
                answer = sock.recv(4096)
            assert answer.split(b" ", 2)[1] == b"400", (raw, answer)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "s3cr3t" not in caplog.text  # a malformed Authorization line is not logged
    assert _call(server, "/v2/health/live")[0] == 200  # and serves on


def test_a_json_request_over_the_grpc_message_limit_is_served(tmp_path):
    # The body limit was the gRPC message limit, sized for raw tensors; JSON writes a value
    # in ~5x its raw bytes, and valid JSON requests of 4 of 8 ResNet rows were 413 (review
    # helper-217). Here 256 values written out in ~4 KB each: 1.1 MB, over the 1 MiB limit.
    s = _small_limit_server(tmp_path)
    try:
        long = "0." + "1" * 4200
        values = ",".join([long] * 256)
        body = ('{"inputs": [{"name": "input", "shape": [4, 1, 8, 8], "datatype": "FP32", '
                f'"data": [{values}]}}]}}').encode()  # fmt: skip
        assert len(body) > 2**20
        status, _, data = _call(s, "/v2/models/tiny/infer", body)
        assert status == 200, data
        assert json.loads(data)["outputs"][0]["shape"] == [4, 10]
    finally:
        s.stop()


def test_a_slow_upload_is_not_counted_against_the_budget(model_repository):
    # With plan_overhead the budget counts from the request's arrival; REST took it before
    # reading the body, so a client's 0.3 s upload spent a 200 ms budget: 504 "-101 ms left
    # to plan with" where gRPC, counting from the whole message, served it (review
    # helper-217)
    import socket

    s = ServerThread({"repository": str(model_repository), "http_port": 0,
                      "plan_overhead": True}).start()  # fmt: skip
    try:
        body = json.dumps(_infer_body(_x(1), parameters={"latency_budget_ms": 200})).encode()
        head = (
            "POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", s.server.rest.port), timeout=30) as c:
            c.sendall(head.encode() + body[:100])
            time.sleep(0.3)
            c.sendall(body[100:])
            answer = b""
            while chunk := c.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    finally:
        s.stop()


def test_a_json_request_refused_by_its_decode_is_in_the_models_statistics(server, http):
    # gRPC counts a request whose raw tensor has the wrong size as a failure of its model
    # (the data plane checks it); REST's JSON decode refused the same request before the
    # data plane saw it, uncounted (review helper-217)
    def fails() -> int:
        stats = http.get_inference_statistics("tiny")["model_stats"][0]
        return stats["inference_stats"]["fail"]["count"]

    def invalid() -> float:
        with urllib.request.urlopen(server.metrics_url) as r:
            for line in r.read().decode().splitlines():
                if (
                    line.startswith("innfer_requests_total{")
                    and 'model="tiny"' in line
                    and ('outcome="invalid"' in line)
                ):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = (fails(), invalid())
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "data": [0.0] * 63}]}  # fmt: skip
    status, message = _error(server, "/v2/models/tiny/infer", body, "POST")
    assert status == 400 and "63" in message, message
    assert (fails(), invalid()) == (before[0] + 1, before[1] + 1)


def test_a_shape_the_model_refuses_is_refused_before_its_json_values_are_read(server, http):
    # The values were decoded one by one for the client's declared shape, on the event loop,
    # and the model's shape checked after: 12 M values for a max_batch-4 model held every
    # client 6.7 s (review helper-265). Values that are not numbers show which came first.
    junk = ["x"] * 64
    for shape, name, said in (
        ([100, 1, 8, 8], "input", "batch 100 is outside [1, "),
        ([1, 1, 8, 1000], "input", "shape [1, 1, 8, 1000] does not match [-1, 1, 8, 8]"),
        ([1, 1, 8, 8], "nope", "unknown input 'nope'; the model's inputs are ['input']"),
    ):
        body = {"inputs": [{"name": name, "shape": shape, "datatype": "FP32", "data": junk}]}
        status, message = _error(server, "/v2/models/tiny/infer", body, "POST")
        assert status == 400 and said in message, message
    # a body large enough to be parsed off the loop answers as one parsed on it
    x = _x(4)
    body = json.dumps(_infer_body(x)).encode()
    answers = []
    for inline in (1 << 30, 0):
        rest.JSON_INLINE_BYTES, saved = inline, rest.JSON_INLINE_BYTES
        try:
            status, _, data = _call(server, "/v2/models/tiny/infer", body)
        finally:
            rest.JSON_INLINE_BYTES = saved
        assert status == 200, data
        answers.append(json.loads(data)["outputs"][0]["data"])
    assert answers[0] == answers[1]


def test_a_path_whose_escapes_are_not_utf8_is_refused(server):
    # aiohttp leaves a segment whose escapes are not UTF-8 as sent: a region registered
    # under "%FF" while "a%20b" named "a b" (review helper-218)
    for path in ("/v2/systemsharedmemory/region/%FF/register", "/v2/models/%ED%A0%80/infer"):
        status, message = _error(server, path, {"key": "/k", "byte_size": 8}, "POST")
        assert status == 400 and "not UTF-8" in message, (path, message)
    regions = json.loads(_call(server, "/v2/systemsharedmemory/status")[2])
    assert not any("%" in r["name"] for r in regions)
    assert _call(server, "/v2/models/caf%C3%A9/ready")[0] == 404  # UTF-8: a name, not known


def test_strings_in_numeric_data_are_refused_before_numpy_sizes_them(server):
    # numpy made a fixed-width array of count x longest string x 4 bytes before any check:
    # one 500 KB body took the server past 1.5 GB, on the event loop (review helper-233).
    # The server runs in this process: its allocations are traced here.
    import tracemalloc

    data = ["x" * 1_000_000] + [""] * 63  # 1 MB of JSON; 256 MB as numpy's unicode array
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": data}]}).encode()  # fmt: skip
    tracemalloc.start()
    try:
        status, message = _error(server, "/v2/models/tiny/infer", body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 400 and "FP32 data must be numbers" in message, message
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB traced"
    # true/false among numbers: read as 1.0 / 0.0 before, silently
    status, message = _error(server, "/v2/models/tiny/infer", _infer_body(_x(1)) | {
        "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                    "data": [True] + [0.5] * 63}]})  # fmt: skip
    assert status == 400 and "FP32 data must be numbers" in message, message


def _gzip_of_zeros(n_mib: int) -> bytes:
    """A gzip stream of ``n_mib`` MiB of zeros (about 1 KB per MiB)."""
    import zlib

    z, chunk = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS), bytes(2**20)
    return b"".join([*(z.compress(chunk) for _ in range(n_mib)), z.flush()])


def test_a_compressed_body_no_route_reads_costs_no_inflating(server, http):
    # aiohttp inflated a body no handler read (a 404, a 401, a health probe) while draining
    # it after the answer: a 1 MB gzip bomb cost ~2.7 s of the event loop, unauthenticated
    # (review helper-233). Bodies are inflated by the routes that read them, bounded.
    # The server runs in this process: its CPU is counted here.
    bomb = _gzip_of_zeros(512)  # 512 MiB inflated: ~0.9 s of inflating here
    t0 = time.process_time()
    status, _ = _error(server, "/v2/nothing", bomb, "POST", {"Content-Encoding": "gzip"})
    status_live, _, _ = _call(server, "/v2/health/live", bomb, "POST",
                              {"Content-Encoding": "gzip"})  # fmt: skip
    spent = time.process_time() - t0
    assert status == 404 and status_live in (200, 405), (status, status_live)
    assert spent < 0.3, f"{spent:.2f} s of CPU"
    # a route that reads it inflates up to the body limit, then 413
    status, message = _error(server, "/v2/models/tiny/infer", bomb, "POST",
                             {"Content-Encoding": "gzip"})  # fmt: skip
    assert status == 413 and "the request body is over" in message, message
    # and real compressed requests are read as before (tritonclient compresses them)
    x = _x(2)
    for algorithm in ("gzip", "deflate"):
        inp = th.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = http.infer("tiny", [inp], request_compression_algorithm=algorithm)
        assert got.as_numpy("logits").shape == (2, 10)


def test_from_the_drain_on_every_answer_closes_its_connection(model_repository):
    # A keep-alive client sent its next request on the connection; the stop closed it as
    # idle before that request was read, and the client got no answer at all (a POST it
    # cannot tell ran or not). From the drain on each answer says Connection: close, so the
    # next request goes on a new connection and gets a clean 503 (review helper-241).
    import http.client

    s = ServerThread({"repository": str(model_repository), "http_port": 0}).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.server.rest.port, timeout=30)
        conn.request("GET", "/v2/health/live")
        r = conn.getresponse()
        r.read()
        assert r.status == 200 and r.getheader("Connection") != "close"

        async def drain():
            s.server.plane.drain()

        s.call(drain())
        conn.request("GET", "/v2/health/ready")  # the same connection, kept alive
        r = conn.getresponse()
        r.read()
        assert r.status == 503 and r.getheader("Connection") == "close"
        conn.close()
    finally:
        s.stop()


def test_a_connection_older_than_max_connection_age_is_closed_by_its_next_answer(
    model_repository,
):
    # Only gRPC's connections aged: a pooled REST connection stayed on its first pod for
    # good, and replicas the autoscaler added got no REST traffic (review helper-285).
    import http.client

    s = ServerThread({"repository": str(model_repository), "http_port": 0,
                      "max_connection_age_s": 1}).start()  # fmt: skip
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.server.rest.port, timeout=30)
        seen, start = [], time.monotonic()
        while time.monotonic() - start < 5 and "close" not in seen:
            conn.request("GET", "/v2/health/live")
            r = conn.getresponse()
            r.read()
            assert r.status == 200
            seen.append(r.getheader("Connection"))
            time.sleep(0.05)
        age = time.monotonic() - start
        assert seen[0] != "close" and seen[-1] == "close", seen
        assert 0.85 < age < 4.0, age  # 1 s +-10 %, from the first answer
        conn.close()
    finally:
        s.stop()


def test_an_out_of_range_value_is_refused_without_a_warning_on_stderr():
    # numpy's "RuntimeWarning: overflow encountered in cast" went to the server's stderr,
    # whose lines are JSON, before the 400 said the same (review helper-240).
    import warnings

    from server import rest_codec
    from server.errors import InvalidArgument
    from server.proto_gen import grpc_service_pb2 as pb

    t = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidArgument, match="outside FP32's range"):
            rest_codec._tensor_bytes([1e39, 0.0], t, "input 'x'")


def test_non_finite_names_nested_deeply_are_a_400_not_a_500():
    # "NaN" strings converted with a recursion per level of nesting: ~500 levels raised
    # RecursionError, a 500 with a traceback logged per request (review helper-242).
    from server import rest_codec
    from server.errors import InvalidArgument
    from server.proto_gen import grpc_service_pb2 as pb

    t = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1])
    data: list = ["NaN"]
    for _ in range(900):
        data = [data]
    with pytest.raises(InvalidArgument):
        rest_codec._tensor_bytes(data, t, "input 'x'")
    t = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2, 2])
    got = rest_codec._tensor_bytes([["NaN", 1.0], [2.0, "-Infinity"]], t, "input 'x'")
    assert np.frombuffer(got, "<f4").tolist()[1:3] == [1.0, 2.0]


def _upload_head(length: int) -> bytes:
    return (
        "POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        f"\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _wait(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_body_being_uploaded_counts_in_flight_and_a_full_cap_refuses_the_next(
    model_repository,
):
    """aiohttp held whole bodies before any accounting: 20 stalled 20 MiB uploads held 400
    MiB beyond a 256 MiB cap that read 0 (review helper-249)."""
    import socket

    s = ServerThread({"repository": str(model_repository), "http_port": 0,
                      "limits": {"max_inflight_bytes": 2**20}}).start()  # fmt: skip
    plane, port = s.server.plane, s.server.rest.port
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as first:
            first.sendall(_upload_head(2**20 - 500) + b"0" * (2**20 - 1000))  # (fits the cap)
            assert _wait(lambda: plane.inflight_bytes >= 2**20 - 1000), plane.inflight_bytes
            with socket.create_connection(("127.0.0.1", port), timeout=30) as second:
                second.sendall(_upload_head(4096) + b"0" * 4096)
                answer = second.recv(65536)
            assert b" 429 " in answer.split(b"\r\n")[0], answer[:200]
            assert b"limits.max_inflight_bytes" in answer
        # the stalled upload's connection closed: its bytes let go
        assert _wait(lambda: plane.inflight_bytes == 0), plane.inflight_bytes
        # counted as gRPC's refusal is: load (the autoscaler's and the alerts' series) and a
        # failure in the model's statistics - only the HTTP 429 counter saw it (helper-282)
        full = {"model": "tiny", "tier": "", "outcome": "refused_full"}
        assert plane.metrics.registry.get_sample_value("innfer_requests_total", full) == 1
        missed = {"model": "tiny", "reason": "refused_full"}
        assert plane.metrics.registry.get_sample_value("innfer_deadline_missed_total", missed) == 1
        assert plane.models["tiny"].stats.fail.count == 1
    finally:
        s.stop()


def test_a_json_body_counts_in_flight_while_it_is_parsed(model_repository, monkeypatch):
    """The upload's bytes were let go when it ended, and held again only once the data plane
    had the parsed request: bodies queued for and in a parse thread counted against no limit,
    7.4 MiB held at once under a 4 MiB cap that read 0 (review helper-282)."""
    seen = []
    parse = rest_codec.parse_infer

    def spy(body, *args):
        seen.append((len(body), s.server.plane.inflight_bytes))
        return parse(body, *args)

    monkeypatch.setattr(rest_codec, "parse_infer", spy)
    s = ServerThread({"repository": str(model_repository), "http_port": 0}).start()
    try:
        small = json.dumps(_infer_body(_x(1))).encode()
        large = small + b" " * (2 * 65536)  # parsed on a thread (JSON_INLINE_BYTES)
        for body in (small, large):
            status, _, data = _call(s, "/v2/models/tiny/infer", body)
            assert status == 200, data
        assert [size for size, _ in seen] == [len(small), len(large)]
        assert all(held >= size for size, held in seen), seen
        assert _wait(lambda: s.server.plane.inflight_bytes == 0), s.server.plane.inflight_bytes
    finally:
        s.stop()


def test_an_inflated_body_past_the_in_flight_cap_is_refused_before_its_parse(
    model_repository, monkeypatch
):
    """A gzip body inflates past what came: the decoded body is held before its parse, and
    refused as an upload of its size would be - its 2 MiB never parsed (they were, on a
    thread, and refused only by the data plane after)."""
    import gzip

    parsed = []
    parse = rest_codec.parse_infer
    monkeypatch.setattr(rest_codec, "parse_infer", lambda *a: parsed.append(1) or parse(*a))
    s = ServerThread({"repository": str(model_repository), "http_port": 0,
                      "limits": {"max_inflight_bytes": 2**20}}).start()  # fmt: skip
    try:
        body = json.dumps(_infer_body(_x(1))).encode() + b" " * (2 * 2**20)
        status, message = _error(s, "/v2/models/tiny/infer", gzip.compress(body),
                                 headers={"Content-Encoding": "gzip"})  # fmt: skip
        assert status == 413 and "more than this server takes in flight" in message, message
        assert parsed == [] and s.server.plane.inflight_bytes == 0
    finally:
        s.stop()


def test_an_upload_that_stops_is_408_and_its_connection_closed(model_repository, monkeypatch):
    import socket

    from server import rest

    monkeypatch.setattr(rest, "UPLOAD_IDLE_S", 0.5)
    s = ServerThread({"repository": str(model_repository), "http_port": 0}).start()
    try:
        with socket.create_connection(("127.0.0.1", s.server.rest.port), timeout=30) as c:
            c.sendall(_upload_head(10_000) + b'{"inputs": [')
            answer = b""
            while chunk := c.recv(65536):  # to the end: the server closes the connection
                answer += chunk
        assert b" 408 " in answer.split(b"\r\n")[0], answer[:200]
        assert b"12 bytes in" in answer and b"no byte for 0.5 s" in answer, answer
        assert s.server.plane.inflight_bytes == 0
        assert _call(s, "/v2/health/live")[0] == 200
    finally:
        s.stop()


def _expect_head(path: str, length: int, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nExpect: 100-continue\r\n{auth}\r\n").encode()  # fmt: skip


def test_expect_100_continue_is_said_only_to_a_body_the_server_would_read(server):
    """aiohttp said "100 Continue" to a 10 GB Content-Length, and the client uploaded up to
    the body limit for its 413 (review helper-249)."""
    import socket

    port = server.server.rest.port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(_expect_head("/v2/models/tiny/infer", 10**10))
        answer = c.recv(65536)
    status = answer.split(b"\r\n")[0]
    assert b" 413 " in status and b"max_message_bytes" in answer, answer[:300]
    body = json.dumps(_infer_body(_x(1))).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(_expect_head("/v2/models/tiny/infer", len(body)))
        assert c.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        c.sendall(body)
        answer = c.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


def test_an_unknown_expectation_is_a_json_417(server):
    # raised in the Expect handler, it went out as aiohttp's text/plain (review helper-265)
    import socket

    head = _expect_head("/v2/models/tiny/infer", 10).replace(b"100-continue", b"foo")
    with socket.create_connection(("127.0.0.1", server.server.rest.port), timeout=30) as c:
        c.sendall(head)
        answer = c.recv(65536)
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 417 ") and b"application/json" in status, answer
    assert json.loads(body)["error"].startswith("unknown Expect: foo; send 100-continue")


def test_expect_100_continue_without_the_token_is_401_at_once(model_repository):
    import socket

    s = ServerThread({"repository": str(model_repository), "http_port": 0,
                      "auth": {"bearer_token": "s3cret-token-value"}}).start()  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", s.server.rest.port), timeout=30) as c:
            c.sendall(_expect_head("/v2/models/tiny/infer", 4096))
            answer = c.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:300]
        assert b"WWW-Authenticate: Bearer" in answer
        with socket.create_connection(("127.0.0.1", s.server.rest.port), timeout=30) as c:
            c.sendall(_expect_head("/v2/models/tiny/infer", 4096, token="s3cret-token-value"))
            assert c.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    finally:
        s.stop()


def test_a_token_header_that_is_not_utf8_is_a_401_not_a_500(model_repository, caplog):
    """aiohttp decodes a header's non-UTF-8 bytes with surrogateescape; the token check's
    encode raised: 400 "not valid Unicode" without Expect, a 500 and a traceback per request
    with it - no token needed to flood the log (review helper-256)."""
    import socket

    s = ServerThread({"repository": str(model_repository), "http_port": 0,
                      "auth": {"bearer_token": "s3cret-token-value"}}).start()  # fmt: skip
    try:
        for expect in (b"", b"Expect: 100-continue\r\n"):
            with socket.create_connection(("127.0.0.1", s.server.rest.port), timeout=30) as c:
                c.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
                          b"Authorization: Bearer \xe9t\xe9\r\n" + expect +
                          b"Content-Length: 2\r\n\r\n{}")  # fmt: skip
                answer = c.recv(65536)
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert "Traceback" not in caplog.text
    finally:
        s.stop()


def test_an_idle_keep_alive_connection_is_closed(model_repository, monkeypatch):
    """aiohttp kept an idle connection 3,630 s: a client holding many of them used up the
    process's descriptors, and gRPC, REST and /metrics could accept none (review
    helper-256)."""
    import socket

    from server import rest

    monkeypatch.setattr(rest, "REST_IDLE_S", 0.5)
    s = ServerThread({"repository": str(model_repository), "http_port": 0}).start()
    try:
        with socket.create_connection(("127.0.0.1", s.server.rest.port), timeout=30) as c:
            c.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
            t0 = time.monotonic()
            assert c.recv(65536) == b""  # closed by the server, idle
            assert time.monotonic() - t0 < 10
    finally:
        s.stop()


def test_innfer_serve_raises_its_open_files_limit_to_the_hard_one():
    import subprocess
    import sys

    code = ("import resource; from server.app import raise_open_files; "
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard)); "
            "raise_open_files(); "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out


def test_a_body_larger_than_the_in_flight_cap_is_said_to_never_fit(model_repository):
    """Counted as it arrived, a body over the whole cap was told "retry shortly" (429 from a
    full cap), which clients that retry on 429 did for good (review helper-259)."""
    s = ServerThread({"repository": str(model_repository), "http_port": 0,
                      "limits": {"max_inflight_bytes": 2**20}}).start()  # fmt: skip
    try:
        body = json.dumps(_infer_body(_x(1)), indent=2).encode() + b" " * (2 * 2**20)
        status, message = _error(s, "/v2/models/tiny/infer", body)
        # 413, not 429: urllib3's Retry(status_forcelist=[429, 503]) sent it 5 times more,
        # and every retry is refused the same way (review helper-307)
        assert status == 413 and "more than this server takes in flight" in message, message
        assert "retry" not in message
    finally:
        s.stop()


def test_a_settings_body_is_read_and_inflated_to_1_mib_at_most(server):
    """Parsed on the event loop; a 24 KB gzip of 24 MiB of spaces was inflated whole first,
    ~0.3 s of the loop per request (review helper-260)."""
    import gzip

    status, _ = _error(server, "/v2/logging", b'{"log_info": true, "x": "' + b"y" * 2**20 + b'"}')
    assert status == 413
    status, message = _error(server, "/v2/logging", gzip.compress(b" " * 24 * 2**20),
                             headers={"Content-Encoding": "gzip"})  # fmt: skip
    assert status == 413, message


def test_a_gzip_body_with_bytes_after_its_stream_is_refused(server):
    """The rest was dropped unsaid: valid gzip then junk was served 200 (review helper-260)."""
    import gzip

    body = gzip.compress(json.dumps(_infer_body(_x(1))).encode()) + b"junk"
    status, message = _error(server, "/v2/models/tiny/infer", body,
                             headers={"Content-Encoding": "gzip"})  # fmt: skip
    assert status == 400 and "4 bytes after its gzip stream" in message, message


def test_a_client_that_goes_mid_upload_cancels_its_call_without_an_error(model_repository, caplog):
    """A reset mid-body was a 500 with an ERROR traceback per request, and the partial body
    stayed in memory until the collector's next full pass (review helper-260)."""
    import socket

    s = ServerThread({"repository": str(model_repository), "http_port": 0}).start()
    try:
        with caplog.at_level(logging.ERROR, logger="innfer"):
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", s.server.rest.port)) as c:
                    c.sendall(_upload_head(2**20) + b"0" * 2**16)
                    time.sleep(0.1)
            assert _wait(lambda: _sample(s, "innfer_http_requests_total",
                                         {"code": "499", "handler": "infer",
                                          "method": "POST"}) == 3)  # fmt: skip
        assert "REST infer failed" not in caplog.text
        assert not _sample(s, "innfer_http_requests_total",
                           {"code": "500", "handler": "infer", "method": "POST"})  # fmt: skip
        assert s.server.plane.inflight_bytes == 0
    finally:
        s.stop()


def test_an_upload_slower_than_the_rate_floor_is_408(model_repository, monkeypatch):
    """A byte every 20 s per upload held the whole in-flight cap for good, gRPC's calls
    refused with it (review helper-260)."""
    import socket

    from server import rest

    monkeypatch.setattr(rest, "UPLOAD_GRACE_S", 0.5)
    s = ServerThread({"repository": str(model_repository), "http_port": 0}).start()
    try:
        with socket.create_connection(("127.0.0.1", s.server.rest.port), timeout=30) as c:
            c.sendall(_upload_head(10_000) + b"{")
            t0 = time.monotonic()
            answer = b""
            for _ in range(40):  # a byte every 0.1 s: never idle 30 s, far under 64 KiB/s
                try:
                    c.sendall(b" ")
                except OSError:
                    break
                time.sleep(0.1)
                c.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    answer += c.recv(65536)
                c.setblocking(True)
                if answer:
                    break
        assert b" 408 " in answer.split(b"\r\n")[0], answer[:200]
        assert b"under 64 KiB/s" in answer and time.monotonic() - t0 < 3
    finally:
        s.stop()


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no writable /dev/shm here")
def test_the_unregister_all_route_refuses_a_body_and_keeps_the_regions(server):
    # POST /v2/systemsharedmemory/unregister did not read its body: one naming a region
    # (or junk) unregistered every client's regions, each of them then NOT_FOUND
    # (review helper-275).
    import uuid

    import tritonclient.utils.shared_memory as shm

    keys = [f"/innfer-test-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    handles = [shm.create_shared_memory_region(k.lstrip("/"), k, 64) for k in keys]
    try:
        for name, key in zip(("mine", "theirs"), keys, strict=True):
            body = {"key": key, "byte_size": 64}
            assert _call(server, f"/v2/systemsharedmemory/region/{name}/register", body)[0] == 200
        for body in ({"name": "mine"}, b"not json"):
            status, message = _error(server, "/v2/systemsharedmemory/unregister", body, "POST")
            assert status == 400, (body, message)
        assert (
            "name the region in the path"
            in _error(server, "/v2/systemsharedmemory/unregister", {"name": "mine"}, "POST")[1]
        )
        regions = json.loads(_call(server, "/v2/systemsharedmemory/status")[2])
        assert sorted(r["name"] for r in regions) == ["mine", "theirs"]
        assert _call(server, "/v2/systemsharedmemory/region/mine/unregister", b"", "POST")[0] == 200
        regions = json.loads(_call(server, "/v2/systemsharedmemory/status")[2])
        assert [r["name"] for r in regions] == ["theirs"]
    finally:
        _call(server, "/v2/systemsharedmemory/unregister", b"", "POST")
        for h in handles:
            shm.destroy_shared_memory_region(h)


def test_log_settings_over_rest_take_null_and_say_what_each_setting_takes(server, http):
    # null was refused over REST where gRPC leaves the setting as it is (tritonclient's
    # None), and every bad value - an unknown name's too - read "a boolean, a count or a
    # string" (review helper-274).
    before = http.get_log_settings()
    assert http.update_log_settings({"log_verbose_level": None}) == before
    for body, said in (
        ({"bogus": None}, "unknown log setting 'bogus'"),
        ({"bogus": 1.5}, "unknown log setting 'bogus'"),
        (
            {"log_verbose_level": -1},
            "'log_verbose_level' takes a whole number in [0, 2**32), got '-1'",
        ),
        ({"log_verbose_level": 1.0}, "takes a whole number in [0, 2**32), got '1.0'"),
        ({"log_info": [True]}, "'log_info' takes true or false, got '[true]'"),
    ):
        status, message = _error(server, "/v2/logging", body, "POST")
        assert status == 400 and said in message, (body, message)
    assert http.get_log_settings() == before


def test_kserves_rest_clients_body_with_its_model_name_and_nulls_is_served(server):
    # kserve's InferRequest.to_rest() writes "model_name" (and "parameters": null,
    # "outputs": null where unset) into every body: refused as unknown fields, every
    # inference of kserve's InferenceRESTClient failed with 400 (review helper-307).
    x = _x(1)
    path = "/v2/models/tiny/infer"
    body = _infer_body(x, id=None, model_name="tiny", parameters=None, outputs=None)
    body["inputs"][0]["parameters"] = None
    status, _, data = _call(server, path, body)
    assert status == 200, data
    assert json.loads(data)["outputs"][0]["name"]
    status, message = _error(server, path, _infer_body(x, model_name="other"))
    assert status == 400 and "the body's model_name is 'other' but the URL's is 'tiny'" in message
    status, message = _error(server, path, _infer_body(x, model_nam="tiny"))
    assert status == 400 and "unknown field 'model_nam'" in message  # a typo still is one
    assert _call(server, path, _infer_body(x, model_version="1"))[0] == 200
    # A version the URL leaves out is the one served: "7" was served by version 1, which
    # /versions/7/infer refuses (review helper-309).
    status, message = _error(server, path, _infer_body(x, model_version="7"))
    assert status == 400 and "model_version is '7' but the URL's is '1'" in message, message


def test_a_body_naming_another_model_is_counted_as_the_models_invalid_request(server, http):
    # Refused after the parse that counts malformed bodies, it was counted nowhere (review
    # helper-309).
    def failed():
        stats = http.get_inference_statistics("tiny")["model_stats"][0]["inference_stats"]
        return int(stats["fail"]["count"])

    before = failed()
    status, _ = _error(server, "/v2/models/tiny/infer", _infer_body(_x(1), model_name="wide"))
    assert status == 400 and failed() == before + 1


def test_a_model_that_failed_to_load_is_503_on_its_routes_as_on_ready(model_repository, tmp_path):
    # This replica's state, not the client's mistake: its infer, metadata and config routes
    # answered 400 while its /ready route said 503 - load balancers did not fail over and
    # 5xx alerts stayed quiet (review helper-307). gRPC's code stays FAILED_PRECONDITION.
    import shutil

    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    repo = tmp_path / "repo"
    shutil.copytree(model_repository, repo)
    (repo / "bad").mkdir()
    (repo / "bad" / "model.yaml").write_text("max_batch: -1\n")
    s = ServerThread({"repository": str(repo), "http_port": 0}).start()
    try:
        assert _call(s, "/v2/models/bad/ready")[0] == 503
        for path, body in (("/v2/models/bad/infer", _infer_body(_x(1))),
                           ("/v2/models/bad", None), ("/v2/models/bad/config", None)):  # fmt: skip
            status, message = _error(s, path, body)
            assert status == 503 and "failed to load" in message, (path, status, message)
        assert _call(s, "/v2/models/tiny/infer", _infer_body(_x(1)))[0] == 200
        with pytest.raises(InferenceServerException) as refused:
            tg.InferenceServerClient(s.address).get_model_metadata("bad")
        assert refused.value.status() == "StatusCode.FAILED_PRECONDITION"
    finally:
        s.stop()


def test_an_unknown_tier_is_400_not_the_routes_404(server):
    # A 404 on /v2/models/tiny/infer reads to clients and gateways as "no such model here";
    # the tier is a parameter's value (review helper-307). gRPC keeps NOT_FOUND
    # (test_server.py::test_not_found).
    for key in ("tier", "min_tier"):
        body = _infer_body(_x(1), parameters={key: "w999"})
        status, message = _error(server, "/v2/models/tiny/infer", body)
        assert status == 400 and f"has no {key} 'w999'" in message, (status, message)


def test_a_body_with_a_lone_surrogate_is_counted_as_the_models_invalid_request(server, http):
    # Refused 400 by the route itself, it moved neither the model's failure statistics nor
    # innfer_requests_total{outcome="invalid"}, as any other malformed body does (review
    # helper-307).
    def counts():
        fail = http.get_inference_statistics("tiny")["model_stats"][0]["inference_stats"]
        invalid = {"model": "tiny", "tier": "", "outcome": "invalid"}
        return int(fail["fail"]["count"]), _sample(server, "innfer_requests_total", invalid)

    zeros = b"0," * 63 + b"0"
    before = counts()
    for body in (b'{"id": "\\ud800", "inputs": [{"name": "input", "shape": [1, 1, 8, 8], '
                 b'"datatype": "FP32", "data": [' + zeros + b"]}]}",
                 b'{"parameters": {"\\udc00": 1}, "inputs": [{"name": "input", "shape": '
                 b'[1, 1, 8, 8], "datatype": "FP32", "data": [' + zeros + b"]}]}"):  # fmt: skip
        status, message = _error(server, "/v2/models/tiny/infer", body, method="POST")
        assert status == 400 and "not valid Unicode" in message, message
    after = counts()
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)


def test_an_answer_counts_in_flight_until_it_is_written(server, monkeypatch):
    # The JSON answer (about 5x its raw tensors) was held uncounted while the client read it
    # - or did not: 12 clients that never read held 60 MiB past the cap, the gauge at 0,
    # and more requests were admitted (review helper-307).
    from aiohttp import web

    seen = []
    write_eof = web.Response.write_eof

    async def counted(self, *args, **kwargs):
        seen.append((server.server.plane.inflight_bytes, len(self.body or b"")))
        return await write_eof(self, *args, **kwargs)

    monkeypatch.setattr(web.Response, "write_eof", counted)
    status, _, data = _call(server, "/v2/models/tiny/infer", _infer_body(_x(4)))
    assert status == 200
    held, size = next((h, n) for h, n in seen if n == len(data))
    assert held >= size > 0
    for _ in range(200):  # released once written (the client may read it first)
        if server.server.plane.inflight_bytes == 0:
            break
        time.sleep(0.01)
    assert server.server.plane.inflight_bytes == 0
