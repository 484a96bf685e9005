"""Serving behaviour a mutation review found untested (review helper-304): each test here
fails with one of the review's surviving mutations (named in its comment) applied.

A real server on 127.0.0.1 over fake engines (``runtime.engines.fake``: no compute, outputs
from the input rows), called with the stock tritonclient, and - where a test needs the
server's overhead reserve or a stream's deadline set exactly - the DataPlane without a
transport, as tests/test_dataplane.py drives it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from serverutil import ServerThread, hold_engines, until_engine_runs
from tritonclient.utils import InferenceServerException

from runtime.engines.fake import write_model
from server.config import ServerConfig
from server.dataplane import DataPlane
from server.errors import DeadlineExceeded
from server.metrics import Metrics
from server.proto_gen import grpc_service_pb2 as pb
from server.stream import StreamWindow

pytestmark = pytest.mark.e2e  # a real server on 127.0.0.1
INVALID = "StatusCode.INVALID_ARGUMENT"
LOOSE_MS = 10_000  # every model's default budget: no test here is about running out of it


def _config(root: Path, **fields) -> ServerConfig:
    """A server config over ``root`` on fake engines ("fake" is set past the validation, as
    tests/test_dataplane.py does). No timing at load, and every batch on an engine thread
    (none inline on the loop): a held engine must not hold the loop."""
    cfg = ServerConfig.from_dict({
        "repository": str(root), "host": "127.0.0.1", "grpc_port": 0, "metrics_port": 0,
        "profile_at_load": False, "inline_max_ms": 0.0, **fields,
    })  # fmt: skip
    return dataclasses.replace(cfg, backend="fake")


def _sequence_model(root: Path, name: str, lengths: list[int]) -> None:
    """A model of one INT64 input ``ids`` [-1] (a sequence axis), profiled at ``lengths``."""
    d = write_model(root, name, {"w100": 1.0}, max_batch=2, lengths=lengths,
                    inputs=[{"name": "ids", "dtype": "int64", "shape": [-1]}],
                    default_latency_budget_ms=LOOSE_MS)  # fmt: skip
    profile = json.loads((d / "profile.json").read_text())
    profile["lengths"] = {str(n): profile["tiers"] for n in lengths}
    (d / "profile.json").write_text(json.dumps(profile))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Models "a" (input [4] -> logits [3], max_batch 4, 1 ms a batch), "pair" (two inputs,
    "a" and "b", [4] each) and "seq" (token ids, profiled at lengths 4 and 8)."""
    root = tmp_path_factory.mktemp("gaps")
    write_model(root, "a", {"w100": 1.0}, {"w100": {1: 1.0, 2: 1.0, 4: 1.0}}, max_batch=4,
                default_latency_budget_ms=LOOSE_MS)  # fmt: skip
    write_model(root, "pair", {"w100": 1.0}, max_batch=4, default_latency_budget_ms=LOOSE_MS,
                inputs=[{"name": "a", "shape": [4]}, {"name": "b", "shape": [4]}])  # fmt: skip
    _sequence_model(root, "seq", [4, 8])
    s = ServerThread(_config(root)).start()
    yield s
    s.stop()


def _input(x: np.ndarray, name: str = "input") -> tc.InferInput:
    i = tc.InferInput(name, list(x.shape), "INT64" if x.dtype == np.int64 else "FP32")
    i.set_data_from_numpy(x)
    return i


def _x(rows: int, value: float = 1.0) -> np.ndarray:
    return np.full((rows, 4), value, np.float32)


def _infer_each(address: str, calls: list[dict]) -> list:
    """Send each of ``calls`` (``client.infer`` keyword arguments) on its own thread and
    client; returns their futures."""
    pool = ThreadPoolExecutor(len(calls))

    def infer(kwargs):
        with tc.InferenceServerClient(address) as c:
            return c.infer(**kwargs)

    futures = [pool.submit(infer, kw) for kw in calls]
    pool.shutdown(wait=False)
    return futures


def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.002)


# -- review helper-304, mutation C05: inputs whose batch sizes disagree -----------------------
def test_inputs_that_disagree_on_the_batch_size_are_invalid_argument(client):
    # With the check gone the request's rows were its last input's: the engine got inputs of
    # 2 and 3 rows and failed (INTERNAL, for every request in the batch), or a graph that
    # runs its inputs apart shifted rows into other clients' answers.
    with pytest.raises(InferenceServerException, match=r"disagree on the batch size") as err:
        client.infer("pair", [_input(_x(2), "a"), _input(_x(3), "b")])
    assert err.value.status() == INVALID
    ok = client.infer("pair", [_input(_x(2, 1.0), "a"), _input(_x(2, 2.0), "b")])
    assert ok.as_numpy("logits").shape == (2, 3)  # the same inputs, agreeing: served


# -- review helper-304, mutation C03: one token past the longest profiled length ---------------
def test_a_sequence_one_past_the_longest_profiled_length_is_invalid_argument(client):
    # Let through, it found no lane (StopIteration in the runtime): the client got an
    # internal error instead of the allowed range; a one-lane model ran past its profile.
    ids = np.ones((1, 8), np.int64)
    assert client.infer("seq", [_input(ids, "ids")]).as_numpy("logits").shape == (1, 3)
    with pytest.raises(InferenceServerException, match=r"sequence length 9 is outside \[1, 8\]"
                       ) as err:  # fmt: skip
        client.infer("seq", [_input(np.ones((1, 9), np.int64), "ids")])
    assert err.value.status() == INVALID


# -- review helper-304, mutation E01: queue_us and compute_us swapped --------------------------
def test_queue_us_and_compute_us_report_the_queue_wait_and_the_engine_time(server):
    # The tests read only compute_us > 0 and queue_us >= 0: the two swapped went unnoticed.
    # The first request is held in its engine (a long compute, no wait before it); the
    # second waits in the queue behind it for as long and then runs in 1 ms.
    a = server.server.plane.models["a"]
    gate = hold_engines(a)
    try:
        call = {"model_name": "a", "inputs": [_input(_x(1))]}
        [first] = _infer_each(server.address, [call])
        server.call(until_engine_runs(a))
        [second] = _infer_each(server.address, [call])
        _until(lambda: len(a.scheduler.queue) == 1)
        time.sleep(0.3)
        gate.set()
        first, second = (f.result(10).get_response().parameters for f in (first, second))
    finally:
        gate.set()
        for e in a.served.engines.values():
            e.gate = None
    assert first["compute_us"].int64_param >= 300_000 > first["queue_us"].int64_param
    assert second["queue_us"].int64_param >= 300_000 > second["compute_us"].int64_param


# -- review helper-304, mutation T02: a batch's compute time once per request ------------------
def test_statistics_count_a_batchs_compute_time_once_per_request_in_it(server, client):
    # Triton's per-request compute_infer adds the batch's time for each request it served
    # (perf_analyzer divides by the count); with one add per batch the compute breakdown
    # read the batch's time divided by its requests.
    a = server.server.plane.models["a"]
    before = client.get_inference_statistics("a").model_stats[0]
    gate = hold_engines(a)
    try:
        call = {"model_name": "a", "inputs": [_input(_x(1))]}
        [held] = _infer_each(server.address, [call])
        server.call(until_engine_runs(a))
        queued = _infer_each(server.address, [call] * 3)  # batched behind the held one
        _until(lambda: len(a.scheduler.queue) == 3)
        gate.set()
        for f in [held, *queued]:
            f.result(10)
    finally:
        gate.set()
        for e in a.served.engines.values():
            e.gate = None
    after = client.get_inference_statistics("a").model_stats[0]
    was = {b.batch_size: b.compute_infer for b in before.batch_stats}
    runs = {}  # batch size -> (executions, ns) since ``before``
    for b in after.batch_stats:
        old = was.get(b.batch_size)
        runs[b.batch_size] = (b.compute_infer.count - (old.count if old else 0),
                              b.compute_infer.ns - (old.ns if old else 0))  # fmt: skip
    assert any(size > 1 and n for size, (n, _) in runs.items()), runs  # a batch of several
    per_request = after.inference_stats.compute_infer, before.inference_stats.compute_infer
    assert per_request[0].count - per_request[1].count == 4
    # each request was one row: a batch of ``size`` rows served ``size`` requests
    expected_ns = sum(size * ns for size, (_, ns) in runs.items())
    assert per_request[0].ns - per_request[1].ns == pytest.approx(expected_ns, abs=1_000)


# -- plan_overhead: the reserve (DataPlane without a transport) -------------------------------
def _request(model: str, **params) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(_x(1).tobytes())
    for key, value in params.items():
        req.parameters[key].double_param = value
    return req


async def _plane_with_reserve(config: ServerConfig, reserve_s: float) -> DataPlane:
    """A loaded DataPlane whose every model has learnt an overhead of ``reserve_s`` seconds
    per request (so plans are made ``reserve_s`` short, with no grace: all samples alike)."""
    plane = DataPlane(config, Metrics())
    await plane.load_all()
    for m in plane.models.values():
        for overhead in m.overheads.values():
            for _ in range(64):
                overhead.observe(reserve_s)
            assert overhead.reserve() == (pytest.approx(reserve_s), 0.0)
    return plane


def _run(coro, timeout: float = 30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_a_streamed_request_is_planned_short_by_the_reserve_as_a_unary_one_is(tmp_path):
    # review helper-304, mutation R02: a stream's deadline (due_at) was planned to without
    # the reserve taken off: its requests were planned reserve_s too late - admitted where
    # the same budget in a unary call is refused, and answered late with no refusal.
    # A tier of 300 ms, a reserve of 450 ms: 600 ms leaves 149 ms to plan with (refused),
    # 1 s leaves 549 ms (served) - whether the budget is the request's or the stream's.
    write_model(tmp_path, "slow", {"w100": 1.0}, {"w100": {1: 300.0, 2: 300.0}}, max_batch=2,
                default_latency_budget_ms=LOOSE_MS)  # fmt: skip
    config = _config(tmp_path, plan_overhead=True, budget_margin_ms=1.0)

    async def stream(plane, deadline_s):  # a stream whose deadline cuts a looser budget
        window = StreamWindow(1 << 30)
        request = _request("slow", latency_budget_ms=60_000.0)
        return await plane.infer(request, deadline_s, deadline_is_budget=False, window=window)

    async def body():
        plane = await _plane_with_reserve(config, 0.45)
        outcomes = {}
        try:
            for name, call in [
                ("unary 600 ms", plane.infer(_request("slow", latency_budget_ms=600.0), None)),
                ("stream 600 ms", stream(plane, 0.6)),
                ("unary 1 s", plane.infer(_request("slow", latency_budget_ms=1000.0), None)),
                ("stream 1 s", stream(plane, 1.0)),
            ]:
                try:
                    resp = await call
                    outcomes[name] = resp.parameters["tier"].string_param
                except DeadlineExceeded:
                    outcomes[name] = "refused"
            return outcomes
        finally:
            await plane.stop_models()

    assert _run(body()) == {
        "unary 600 ms": "refused", "stream 600 ms": "refused",
        "unary 1 s": "w100", "stream 1 s": "w100",
    }  # fmt: skip


def test_an_answer_inside_the_reserve_counts_as_met(tmp_path):
    # review helper-304, mutation R03: met was judged at the planning deadline (the client's
    # due time less the reserve), so answers that reached the client in time were counted
    # late in innfer_deadline_met / innfer_deadline_missed{reason="late"}, which dashboards,
    # the alert rules and the HPA read.
    # A 1 s budget, a 450 ms reserve: planned for 549 ms, due at 999 ms; answered at ~750 ms.
    write_model(tmp_path, "a", {"w100": 1.0}, {"w100": {1: 1.0, 2: 1.0}}, max_batch=2,
                default_latency_budget_ms=LOOSE_MS)  # fmt: skip
    config = _config(tmp_path, plan_overhead=True, budget_margin_ms=1.0)

    async def body():
        plane = await _plane_with_reserve(config, 0.45)
        a = plane.models["a"]
        try:
            gate = hold_engines(a)
            sent = time.monotonic()
            task = asyncio.create_task(plane.infer(_request("a", latency_budget_ms=1000.0), None))
            await until_engine_runs(a)
            await asyncio.sleep(0.75 - (time.monotonic() - sent))
            gate.set()
            resp = await asyncio.wait_for(task, 10)
            a.flush()
            registry = plane.metrics.registry
            met = registry.get_sample_value("innfer_deadline_met_total", {"model": "a"})
            late = registry.get_sample_value(
                "innfer_deadline_missed_total", {"model": "a", "reason": "late"}
            )
            return resp.parameters["budget_us"].int64_param, met, late
        finally:
            await plane.stop_models()

    planned_us, met, late = _run(body())
    assert planned_us < 600_000  # planned short by the reserve: answered past that plan
    assert (met, late or 0.0) == (1.0, 0.0)
