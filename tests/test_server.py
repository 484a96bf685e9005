"""End to end: the real tritonclient (grpc and grpc.aio) against innfer on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from serverutil import ServerThread, add_onnx_model, slow_loop
from tritonclient.utils import InferenceServerException

from runtime.repository import Repository
from server import service
from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import grpc_service_pb2_grpc as rpc
from server.proto_gen import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.e2e
INVALID = "StatusCode.INVALID_ARGUMENT"


def _input(x: np.ndarray, name: str = "input", dtype: str = "FP32") -> tc.InferInput:
    i = tc.InferInput(name, list(x.shape), dtype)
    i.set_data_from_numpy(x)
    return i


def _x(batch: int = 2, shape=(1, 8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


def _code(exc: InferenceServerException) -> str:
    return exc.status()


# -- health and metadata ----------------------------------------------------------------------
def test_health(server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and not client.is_model_ready("nope")
    with grpc.insecure_channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "liveness", "readiness", "inference.GRPCInferenceService"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == serving
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="bogus"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_metadata_and_config_expose_tiers(client):
    meta = client.get_model_metadata("tiny")
    assert meta.platform == "innfer_inn" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, 1, 8, 8])
    ]
    cfg = client.get_model_config("tiny").config
    assert cfg.max_batch_size == 4
    tiers = json.loads(cfg.parameters["tiers"].string_value)
    assert [t["name"] for t in tiers] == ["w100", "w050"]
    assert all(t["latency_ms_batch1"] > 0 for t in tiers)
    server_meta = client.get_server_metadata()
    assert server_meta.name == "innfer" and "model_repository" in server_meta.extensions
    index = client.get_model_repository_index()
    assert {m.name: m.state for m in index.models} == {"tiny": "READY", "wide": "READY"}


@pytest.mark.parametrize("tiers", [2, 120])
def test_model_metadata_sends_its_tier_trailer_only_while_it_fits(server, client, monkeypatch,
                                                                    tiers):  # fmt: skip
    # The whole table went in a trailer: at 120 tiers (~24 KB) gRPC clients refused every
    # ModelMetadata call with RESOURCE_EXHAUSTED, at 60 every other one (review 169).
    from server.dataplane import DataPlane

    table = json.dumps([{"name": f"w{i:03d}", "width": i / tiers, "accuracy": 0.9,
                         "latency_ms_batch1": 1.0, "flops": 10**6, "onnx_sha256": "ab" * 32}
                        for i in range(tiers)])  # fmt: skip
    monkeypatch.setattr(DataPlane, "tiers_json", lambda self, m: table)
    for _ in range(6):  # the soft limit refused at random
        assert client.get_model_metadata("tiny").name == "tiny"
    with grpc.insecure_channel(server.address) as ch:
        _, call = rpc.GRPCInferenceServiceStub(ch).ModelMetadata.with_call(
            pb.ModelMetadataRequest(name="tiny")
        )
    sent = json.loads(dict(call.trailing_metadata())["innfer-tiers"])
    if tiers == 2:
        assert sent == json.loads(table)
    else:
        assert sent == {"omitted": f"{len(table)} bytes", "see": service.TIERS_ELSEWHERE}
    config = client.get_model_config("tiny").config  # where the whole table always is
    assert json.loads(config.parameters["tiers"].string_value) == json.loads(table)


# -- inference ---------------------------------------------------------------------------------
def test_infer_matches_the_engine_and_reports_the_tier(model_repository, client):
    x = _x(3)
    result = client.infer("tiny", [_input(x)], parameters={"latency_budget_ms": 100})
    params = result.get_response().parameters
    tier = params["tier"].string_param
    engine = Repository(model_repository).load("tiny").engines[tier]
    np.testing.assert_allclose(result.as_numpy("logits"), engine.run({"input": x})["logits"],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert tier == "w100"  # an idle server gives the full network
    assert params["width"].double_param == 1.0
    assert params["batch_size"].int64_param >= 3
    assert params["compute_us"].int64_param > 0 and params["queue_us"].int64_param >= 0


def _budget_ms(result) -> float:
    return result.get_response().parameters["budget_us"].int64_param / 1e3


# tiny's default_latency_budget_ms is 200; the server takes budget_margin_ms (1) off.
def test_infer_without_budget_uses_the_model_default(client):
    result = client.infer("tiny", [_input(_x(1))])
    assert result.as_numpy("logits").shape == (1, 10)
    assert _budget_ms(result) == pytest.approx(199.0, abs=0.01)


def test_budget_as_double_and_from_the_grpc_deadline(client):
    r = client.infer("tiny", [_input(_x(1))], parameters={"latency_budget_ms": 80.5})
    assert r.as_numpy("logits").shape == (1, 10)
    assert _budget_ms(r) == pytest.approx(79.5, abs=0.01)
    r = client.infer("tiny", [_input(_x(1))], client_timeout=5.0)
    assert r.as_numpy("logits").shape == (1, 10)
    # what was left of the 5 s deadline, not 200 ms; never past it: grpc-timeout is sent
    # rounded up to 10 ms steps here, and the server takes the step off (review 194)
    assert 4_000 < _budget_ms(r) < 5_000
    # Triton's timeout (us) caps a larger budget
    r = client.infer("tiny", [_input(_x(1))], parameters={"latency_budget_ms": 500},
                     timeout=50_000)  # fmt: skip
    assert _budget_ms(r) == pytest.approx(49.0, abs=0.01)


def test_tier_pin_and_min_tier(client):
    for tier in ("w050", "w100"):
        r = client.infer("tiny", [_input(_x(2))], parameters={"tier": tier})
        assert r.get_response().parameters["tier"].string_param == tier
    r = client.infer("tiny", [_input(_x(2))], parameters={"min_tier": "w100"})
    assert r.get_response().parameters["tier"].string_param == "w100"


def test_a_misspelt_parameter_is_refused_and_an_unknown_one_ignored(client):
    # `tierr` was ignored: the request was served unpinned, without a word.
    budget = "'latency_budget_ms'"
    for key, value, meant in (("tierr", "w050", "'tier'"), ("latency-budget-ms", 50, budget),
                              ("budget_ms", 50, budget)):  # fmt: skip
        with pytest.raises(InferenceServerException) as err:
            client.infer("tiny", [_input(_x(1))], parameters={key: value})
        assert _code(err.value) == "StatusCode.INVALID_ARGUMENT"
        assert f"unknown request parameter '{key}': did you mean {meant}?" in err.value.message()
    with pytest.raises(InferenceServerException) as err:  # ms or Triton's us: not guessed
        client.infer("tiny", [_input(_x(1))], parameters={"timeout_ms": 50})
    assert "Triton's 'timeout' is in microseconds" in err.value.message()
    # Another client's own extensions (OIP lets a server ignore what it does not know),
    # "time" among them: four letters from "tier" by two edits, not a misspelling of it.
    r = client.infer("tiny", [_input(_x(1))], sequence_id=0,
                     parameters={"x-request-source": "batch-job", "time": "12:00"})  # fmt: skip
    assert r.as_numpy("logits").shape == (1, 10)


def test_a_long_unknown_parameter_name_is_ignored_without_a_spelling_guess(monkeypatch):
    # difflib ran on a 3.5 MB key: 0.45 s of the event loop per request, every client's.
    import difflib

    from server.parameters import check_parameter_names

    def guessed(*args, **kwargs):
        raise AssertionError("difflib ran")

    monkeypatch.setattr(difflib, "get_close_matches", guessed)
    check_parameter_names({"y" * 3_500_000: 1})  # ignored, as any unknown parameter


def test_triton_priority_and_timeout_are_accepted(client):
    r = client.infer("tiny", [_input(_x(1))], priority=1, timeout=2_000_000)
    assert r.as_numpy("logits").shape == (1, 10)


def test_aio_client_concurrent_requests_each_answered_once(tmp_path):
    # A model slow enough (~10 ms a batch, about the same for 1 or 4 rows) that concurrent
    # requests queue behind the running batch and are batched: on the tiny CNN each one
    # may finish before the next is decoded, and then nothing is batched.
    add_onnx_model(tmp_path, "slow", lambda w: slow_loop(w, trips=100), {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1024]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
        "tiers": [{"name": "w100", "width": 1.0}],
        "max_batch": 4, "default_latency_budget_ms": 60_000,
    }, warmup=1, repeats=3)  # fmt: skip
    server = ServerThread({"repository": str(tmp_path)}).start()
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 1024)).astype(np.float32) for _ in range(24)]

    async def run():
        async with tca.InferenceServerClient(server.address) as c:
            calls = [c.infer("slow", [_input(x)], request_id=str(i)) for i, x in enumerate(xs)]
            return await asyncio.gather(*calls)

    try:
        results = asyncio.run(run())
    finally:
        server.stop()
    assert sorted(int(r.get_response().id) for r in results) == list(range(24))
    # Batched requests still get their own rows back: every row against the engine alone.
    engine = Repository(tmp_path).load("slow").engines["w100"]
    batched = 0
    for x, got in zip(xs, results, strict=True):
        want = engine.run({"input": x})["logits"]
        np.testing.assert_allclose(got.as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
        batched += got.get_response().parameters["batch_size"].int64_param > 1
    assert batched > 0, "no request was batched: the demux was not exercised"


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "code", "text"),
    [
        (lambda: [_input(_x(1), name="image")], INVALID, "unknown input 'image'"),
        (lambda: [_input(_x(1, (1, 8, 9)))], INVALID, "does not match [-1, 1, 8, 8]"),
        (lambda: [_input(_x(1).astype(np.float64), dtype="FP64")], INVALID,
         "datatype 'FP64', expected FP32"),
        (lambda: [_input(_x(5))], INVALID, "outside [1, 4]"),
    ],
)  # fmt: skip
def test_bad_inputs(client, make, code, text):
    with pytest.raises(InferenceServerException) as err:
        client.infer("tiny", make())
    assert _code(err.value) == code
    assert text in err.value.message()


@pytest.mark.parametrize("budget", [-5, 0, math.nan])
def test_bad_budget(client, budget):
    with pytest.raises(InferenceServerException) as err:
        client.infer("tiny", [_input(_x(1))], parameters={"latency_budget_ms": budget})
    assert _code(err.value) == "StatusCode.INVALID_ARGUMENT"
    assert "latency_budget_ms must be a positive number" in err.value.message()


def test_a_budget_beyond_any_deadline_is_invalid_before_it_runs(client):
    # 1e16 ms overflowed the answer's int64 budget_us: INTERNAL, after the engine had run.
    with pytest.raises(InferenceServerException) as err:
        client.infer("tiny", [_input(_x(1))], parameters={"latency_budget_ms": 1e16})
    assert _code(err.value) == "StatusCode.INVALID_ARGUMENT"
    assert "latency_budget_ms 1e+16 is above 1,000,000,000" in err.value.message()
    # ... said exactly: 1000000000.5 read "1e+09 is above 1e+09" (review helper-258)
    with pytest.raises(InferenceServerException) as err:
        client.infer("tiny", [_input(_x(1))], parameters={"latency_budget_ms": 1e9 + 0.5})
    assert "1000000000.5 is above 1,000,000,000" in err.value.message()


def test_raw_byte_length_mismatch(server):
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    req.raw_input_contents.append(b"\0" * 10)
    with grpc.insecure_channel(server.address) as ch, pytest.raises(grpc.RpcError) as err:
        rpc.GRPCInferenceServiceStub(ch).ModelInfer(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "10 raw bytes, expected 256" in err.value.details()


@pytest.mark.parametrize(
    ("model", "kwargs", "text"),
    [
        ("nope", {}, "unknown model 'nope'"),
        ("tiny", {"model_version": "7"}, "has no version '7'"),
        ("tiny", {"parameters": {"tier": "w999"}}, "has no tier 'w999'"),
    ],
)
def test_not_found(client, model, kwargs, text):
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [_input(_x(1))], **kwargs)
    assert _code(err.value) == "StatusCode.NOT_FOUND"
    assert text in err.value.message()


def test_impossible_budget_is_refused_at_once(client):
    with pytest.raises(InferenceServerException) as err:
        client.infer("wide", [_input(_x(1, (1, 28, 28)))], parameters={"latency_budget_ms": 1e-3})
    assert _code(err.value) == "StatusCode.DEADLINE_EXCEEDED"
    assert "below the fastest allowed tier" in err.value.message()


def test_full_queue_is_resource_exhausted_and_nothing_is_lost(server):
    async def run():
        async with tca.InferenceServerClient(server.address) as c:
            x = _input(_x(4, (1, 28, 28)))
            calls = [c.infer("wide", [x], parameters={"tier": "w100"}) for _ in range(40)]
            return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(run())
    assert len(outcomes) == 40  # every call answered
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert all(_code(e) == "StatusCode.RESOURCE_EXHAUSTED" for e in errors), errors[:3]
    assert any("queue full" in e.message() for e in errors)
    assert len(errors) < 40  # and the accepted ones were served


def test_server_stays_up_after_bad_requests(client):
    for _ in range(3):
        with pytest.raises(InferenceServerException):
            client.infer("tiny", [_input(_x(1), name="bad")])
    assert client.infer("tiny", [_input(_x(1))]).as_numpy("logits").shape == (1, 10)


# -- statistics and metrics --------------------------------------------------------------------
def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def test_metrics_move_with_traffic(server, client):
    before = _scrape(server.metrics_url)
    served = 'innfer_requests_total{model="tiny",outcome="served",tier="w050"}'
    for _ in range(3):
        client.infer("tiny", [_input(_x(1))], parameters={"tier": "w050"})
    with pytest.raises(InferenceServerException):
        client.infer("tiny", [_input(_x(1))], parameters={"latency_budget_ms": 1e-4})
    after = _scrape(server.metrics_url)
    assert after[served] - before.get(served, 0) == 3
    refused = 'innfer_requests_total{model="tiny",outcome="refused_deadline",tier=""}'
    assert after[refused] - before.get(refused, 0) == 1
    degraded = 'innfer_degraded_requests_total{model="tiny"}'
    assert after[degraded] - before.get(degraded, 0) == 0  # pinned: the client's choice
    acc_n = 'innfer_served_accuracy_count{model="tiny"}'
    assert after[acc_n] - before.get(acc_n, 0) == 3
    assert after['innfer_model_ready{model="tiny"}'] == 1
    assert 'innfer_queue_depth{model="tiny"}' in after
    assert after['innfer_compute_seconds_total{model="tiny"}'] > 0
    # A real engine computes: CPU time, within the process's (the standard process metrics).
    cpu = after['innfer_compute_cpu_seconds_total{model="tiny"}']
    assert 0 < cpu < after["process_cpu_seconds_total"]
    stats = client.get_inference_statistics("tiny").model_stats[0]
    assert stats.inference_count >= 3 and stats.inference_stats.success.ns > 0


def test_grpc_server_metrics_count_every_rpc_with_its_code(server, client):
    # The gRPC ecosystem's server metrics (go-grpc-prometheus names, labels and code names),
    # so that existing gRPC dashboards read innfer: each RPC started and handled, by the code
    # it ended with, and its handling time.
    def key(name, method, code=None, kind="unary"):
        labels = f'grpc_method="{method}",grpc_service="inference.GRPCInferenceService",'
        labels += f'grpc_type="{kind}"'
        if code is not None:
            labels = f'grpc_code="{code}",' + labels
        return f"{name}{{{labels}}}"

    before = _scrape(server.metrics_url)
    client.infer("tiny", [_input(_x(1))], parameters={"tier": "w050"})
    client.infer("tiny", [_input(_x(1))], parameters={"tier": "w050"})
    for bad, params in (("nope", {}), ("tiny", {"latency_budget_ms": -1.0})):
        with pytest.raises(InferenceServerException):
            client.infer(bad, [_input(_x(1))], parameters=params)
    answers = []
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    client.async_stream_infer("tiny", [_input(_x(1))], parameters={"tier": "w050"})
    deadline = time.monotonic() + 10
    while not answers and time.monotonic() < deadline:
        time.sleep(0.01)
    client.stop_stream()
    deadline = time.monotonic() + 10
    stream_ok = key("grpc_server_handled_total", "ModelStreamInfer", "OK", "bidi_stream")
    after = _scrape(server.metrics_url)
    while after.get(stream_ok, 0) == before.get(stream_ok, 0) and time.monotonic() < deadline:
        time.sleep(0.05)  # the stream's handler ends after the client closed it
        after = _scrape(server.metrics_url)

    def moved(k):
        return after.get(k, 0) - before.get(k, 0)

    assert moved(key("grpc_server_started_total", "ModelInfer")) == 4
    assert moved(key("grpc_server_handled_total", "ModelInfer", "OK")) == 2
    assert moved(key("grpc_server_handled_total", "ModelInfer", "NotFound")) == 1
    assert moved(key("grpc_server_handled_total", "ModelInfer", "InvalidArgument")) == 1
    assert moved(key("grpc_server_handling_seconds_count", "ModelInfer")) == 4
    assert moved(key("grpc_server_handling_seconds_sum", "ModelInfer")) > 0
    assert answers and answers[0][1] is None
    assert moved(key("grpc_server_started_total", "ModelStreamInfer", kind="bidi_stream")) == 1
    assert moved(stream_ok) == 1


def test_a_stream_that_fails_is_counted_with_its_code(server, client, monkeypatch):
    # A stream ending in an unexpected error (a read or write failing) was counted OK in
    # grpc_server_handled_total while its client got UNKNOWN: error-ratio alerts missed it.
    from server import service

    async def broken(*args, **kwargs):
        raise RuntimeError("write failed")

    monkeypatch.setattr(service, "serve_stream", broken)
    unknown = (
        'grpc_server_handled_total{grpc_code="Unknown",grpc_method="ModelStreamInfer",'
        'grpc_service="inference.GRPCInferenceService",grpc_type="bidi_stream"}'
    )
    before = _scrape(server.metrics_url).get(unknown, 0)
    errors = []
    client.start_stream(callback=lambda result, error: errors.append(error))
    # The server fails the stream as it starts: its error may reach the client first, and
    # then tritonclient refuses the send (the error is in the callback either way).
    with contextlib.suppress(InferenceServerException):
        client.async_stream_infer("tiny", [_input(_x(1))])
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    client.stop_stream()
    while _scrape(server.metrics_url).get(unknown, 0) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert errors and errors[0] is not None
    assert _scrape(server.metrics_url).get(unknown, 0) - before == 1


def test_unload_and_load(client):
    client.unload_model("wide")
    assert not client.is_model_ready("wide")
    with pytest.raises(InferenceServerException) as err:
        client.infer("wide", [_input(_x(1, (1, 28, 28)))])
    assert _code(err.value) == "StatusCode.NOT_FOUND"
    client.load_model("wide")
    assert client.is_model_ready("wide")


def test_draining_server_answers_unavailable(model_repository):
    s = ServerThread({"repository": str(model_repository), "models": ["tiny"]}).start()
    try:
        s.server.plane.drain()
        c = tc.InferenceServerClient(s.address)
        assert not c.is_server_ready()
        with pytest.raises(InferenceServerException) as err:
            c.infer("tiny", [_input(_x(1))])
        assert _code(err.value) == "StatusCode.UNAVAILABLE"
    finally:
        s.stop()


@pytest.mark.parametrize("pad", range(4))
def test_tensors_at_any_offset_give_the_engines_answer(model_repository, server, pad):
    """The server builds each input array on the received bytes (server/wire.py), so a
    tensor starts wherever the message puts it: an id 0-3 bytes longer shifts it off
    4-byte alignment. Every offset gives the engine's answer."""
    x = _x(2, seed=pad)
    req = pb.ModelInferRequest(model_name="tiny", id="x" * pad)
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    req.parameters["tier"].string_param = "w050"
    with grpc.insecure_channel(server.address) as ch:
        resp = rpc.GRPCInferenceServiceStub(ch).ModelInfer(req)
    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 10)
    engine = Repository(model_repository).load("tiny").engines["w050"]
    np.testing.assert_allclose(got, engine.run({"input": x})["logits"], rtol=1e-5, atol=1e-6)
    assert resp.id == "x" * pad


def test_an_ordered_stream_to_a_slow_reader_holds_only_the_answers_in_flight():
    """In order, an answer written behind the one before it stayed queued among the
    completions until the loop came back for it - never, while a slow reader kept the next
    answer ready at each write: the server grew ~0.5 MiB per 256 KiB answer, outside every
    cap (review 167)."""
    import weakref

    from server.stream import serve_stream

    class Answer:  # stands for a response message
        pass

    alive: weakref.WeakSet = weakref.WeakSet()
    peak = []

    async def requests():
        for i in range(300):
            yield i

    async def answer(i):
        a = Answer()
        alive.add(a)
        return a

    async def write(a):
        await asyncio.sleep(0.0005)  # a client reading slower than the answers come
        peak.append(len(alive))

    async def main():
        await serve_stream(requests(), answer, write, limit=16)

    asyncio.run(asyncio.wait_for(main(), 60))
    assert len(peak) == 300
    assert max(peak) <= 16 + 2, max(peak)  # the slots' answers, not every one written
