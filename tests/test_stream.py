"""ModelStreamInfer as tritonclient uses it, on a real server (127.0.0.1): answer order,
failed requests' ids, what streams teach the server, and the codes streams end with.
Findings of the stream review of session 32; each test failed before its fix."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from serverutil import BIG_ROW, ServerThread, add_big_model, build_repository
from test_triton_parity import _Collector as Answers
from test_triton_parity import add_slow_model

from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import grpc_service_pb2_grpc as rpc

STREAM_LABELS = {
    "grpc_type": "bidi_stream",
    "grpc_service": "inference.GRPCInferenceService",
    "grpc_method": "ModelStreamInfer",
}
TINY = np.zeros((1, 1, 8, 8), np.float32)
SLOW = np.zeros((1, 1024), np.float32)
# "tiny" shares the device's slot with "slow": queued behind a few slow requests on a busy
# machine its default budget (200 ms) ran out and it was refused - these tests are about
# order and what is learned, not budgets.
LOOSE = {"latency_budget_ms": 60_000}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """ "tiny" (1x8x8, fast) and "slow" (~35 ms a request, max_batch 1) on one server."""
    root = build_repository(tmp_path_factory.mktemp("repo"))
    add_slow_model(root)
    s = ServerThread({"repository": str(root)}).start()
    yield s
    s.stop(grace=2.0)


def _input(x: np.ndarray) -> tc.InferInput:
    i = tc.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def _streamed(server, send, n: int, **stream) -> list:
    """Open a tritonclient stream, ``send(client)``, and take ``n`` answers."""
    client, answers = tc.InferenceServerClient(server.address), Answers()
    client.start_stream(callback=answers, **stream)
    try:
        send(client)
        return answers.take(n)
    finally:
        client.stop_stream()
        client.close()


class _Call:
    """A gRPC ServicerContext stand-in: the seconds ``time_remaining`` answers (None: no
    deadline) and whether the call was ``cancelled``."""

    def __init__(self, left: float | None, cancelled: bool = False) -> None:
        self.left, self._cancelled = left, cancelled

    def time_remaining(self):
        return self.left

    def cancelled(self):
        return self._cancelled


def _ids(answers: list) -> list[str]:
    return [r.get_response().id if r is not None else "error" for r, _ in answers]


def test_answers_come_back_in_request_order_as_tritons_do(server):
    # Answers went back as they completed: a client that pairs answers with requests by
    # position (Triton answers a non-decoupled model's stream in request order) got the
    # wrong tensors without an error - even among successes, behind a priority request.
    def send(c):
        c.async_stream_infer("slow", [_input(SLOW)], request_id="first")
        c.async_stream_infer("tiny", [_input(TINY)], request_id="second", parameters=LOOSE)
        c.async_stream_infer(
            "tiny", [_input(TINY)], request_id="third", parameters={"tier": "w999"}
        )  # fmt: skip - refused at once
        for rid in ("A", "B", "C"):
            c.async_stream_infer("slow", [_input(SLOW)], request_id=rid)
        c.async_stream_infer("slow", [_input(SLOW)], request_id="D", priority=1)

    answers = _streamed(server, send, 7)
    assert _ids(answers) == ["first", "second", "error", "A", "B", "C", "D"]
    assert "request id 'third'" in str(answers[2][1])


def test_a_stream_opened_for_completion_order_gets_each_answer_as_it_completes(server):
    def send(c):  # D is urgent: it runs as soon as A's slot is free, before B and C
        for rid in ("A", "B", "C"):
            c.async_stream_infer("slow", [_input(SLOW)], request_id=rid)
        c.async_stream_infer("slow", [_input(SLOW)], request_id="D", priority=1)

    headers = {"innfer-stream-order": "completion"}
    assert _ids(_streamed(server, send, 4, headers=headers)) == ["A", "D", "B", "C"]
    with grpc.insecure_channel(server.address) as channel:
        stub = rpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.ModelStreamInfer(iter(()), metadata=(("innfer-stream-order", "fifo"),),
                                       timeout=10))  # fmt: skip
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "send 'request'" in e.value.details()
    # Given twice, the values must agree: the first silently won (review helper-144).
    both = (("innfer-stream-order", "completion"), ("innfer-stream-order", "request"))
    with grpc.insecure_channel(server.address) as channel:
        stub = rpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.ModelStreamInfer(iter(()), metadata=both, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "both 'completion' and 'request'" in e.value.details()


def test_a_failed_request_comes_back_with_its_whole_id(server):
    # The error answer's id was cut to 255 characters and the message's to 48: a client
    # whose ids are longer (tenant/session/uuid ids) could not tell which request failed -
    # tritonclient hands the callback only the message.
    rid = "tenant-42/session-7f3c2a9e-1b4d-4c8e-9f00-000000000001/req-17"

    def send(c):
        c.async_stream_infer("tiny", [_input(TINY)], request_id=rid, parameters={"tier": "w9"})

    [(result, error)] = _streamed(server, send, 1)
    assert result is None and str(error).endswith(f"(request id {rid!r})")
    long_id = "r" * 300  # within limits.max_id_bytes (1024): echoed whole, as an answer's
    request = pb.ModelInferRequest(model_name="tiny", id=long_id)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(TINY.tobytes())
    request.parameters["tier"].string_param = "w9"
    with grpc.insecure_channel(server.address) as channel:
        stub = rpc.GRPCInferenceServiceStub(channel)
        [failed] = stub.ModelStreamInfer(iter([request]), timeout=20)
    assert failed.error_message and failed.infer_response.id == long_id


def test_streamed_requests_teach_the_overhead_as_unary_ones_do(server):
    # Only ModelInfer fed the learned overhead (plan_overhead's reserve, the overhead
    # histogram, auto-tiering's host view): stream-only traffic planned with none.
    overhead = server.server.plane.models["tiny"].overhead
    before = overhead.samples

    def send(c):
        for i in range(20):
            c.async_stream_infer("tiny", [_input(TINY)], request_id=str(i))

    assert all(e is None for _, e in _streamed(server, send, 20))
    deadline = time.monotonic() + 5
    while overhead.samples < before + 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert overhead.samples == before + 20


def test_a_stream_past_its_deadline_is_counted_deadline_exceeded(server):
    # gRPC cancels the handler at the deadline; the stream was counted Canceled.
    registry = server.server.metrics.registry

    def handled(code):
        labels = {**STREAM_LABELS, "grpc_code": code}
        return registry.get_sample_value("grpc_server_handled_total", labels) or 0.0

    before = {c: handled(c) for c in ("DeadlineExceeded", "Canceled")}
    client, answers = tc.InferenceServerClient(server.address), Answers()
    client.start_stream(callback=answers, stream_timeout=0.4)
    try:
        for i in range(30):  # ~35 ms each: the stream outlives its 0.4 s deadline
            client.async_stream_infer("slow", [_input(SLOW)], request_id=str(i))
        deadline = time.monotonic() + 10
        while handled("DeadlineExceeded") == before["DeadlineExceeded"]:
            assert time.monotonic() < deadline, "the stream was not counted DeadlineExceeded"
            time.sleep(0.05)
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    assert handled("Canceled") == before["Canceled"]
    plane = server.server.plane
    deadline = time.monotonic() + 10
    while plane.inflight_bytes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert plane.inflight_bytes == 0


def test_an_answer_held_behind_slower_ones_does_not_teach_the_overhead_that_wait(server):
    # In request order an answer that finished early waits for the slower answers ahead of
    # it; that wait was learned as the server's overhead per request (~50 ms where it was
    # 0.2 ms in completion order: review of session 32), raising every request's reserve
    # under plan_overhead and auto-tiering's replayed host cost.
    overhead = server.server.plane.models["tiny"].overhead
    before = overhead.samples

    def send(c):
        for i in range(3):  # ~105 ms of "slow" ahead of the tiny ones
            c.async_stream_infer("slow", [_input(SLOW)], request_id=f"s{i}")
        for i in range(8):  # urgent: they run as soon as the device is free, then wait
            c.async_stream_infer(
                "tiny", [_input(TINY)], request_id=f"t{i}", parameters=LOOSE, priority=1
            )

    answers = _streamed(server, send, 11)
    assert _ids(answers)[3:] == [f"t{i}" for i in range(8)]
    # The tiny answers are held at least as long as the slow ones compute after them.
    slow_s = sum(r.get_response().parameters["compute_us"].int64_param for r, _ in answers[:3])
    deadline = time.monotonic() + 5
    while overhead.samples < before + 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    ring = overhead._samples
    learned = [ring[k % len(ring)] for k in range(before, overhead.samples)]
    assert len(learned) == 8 and max(learned) < 0.5 * slow_s / 1e6, (learned, slow_s)


# -- answers a client does not read ------------------------------------------------------------


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """Model "big" (256 KiB answers) on a server taking 1 MiB in flight."""
    root = tmp_path_factory.mktemp("big")
    add_big_model(root)
    s = ServerThread({"repository": str(root), "limits": {"max_inflight_bytes": 2**20}}).start()
    yield s
    s.stop(grace=2.0)


def test_answers_a_stream_client_does_not_read_count_against_the_inflight_cap(capped):
    # They were outside it: a client sending 200 requests on one stream and reading nothing
    # had 79 answers made (20 MiB: up to 64 held per stream, the rest in gRPC's windows)
    # under a 1 MiB cap, and another client's call was still taken - a connection's 1024
    # streams could hold 64 x 1024 answers.
    plane = capped.server.plane
    req = pb.ModelInferRequest(model_name="big")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    req.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    served = {"model": "big", "tier": "w100", "outcome": "served"}
    registry = capped.server.metrics.registry
    done = threading.Event()

    def requests():
        for _ in range(200):
            yield req
        done.wait(30)  # open, never read

    reader = grpc.insecure_channel(capped.address)
    other = grpc.insecure_channel(capped.address, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        call = rpc.GRPCInferenceServiceStub(reader).ModelStreamInfer(requests())
        # Answers wait for a reader, held, until the cap refuses the rest - and another
        # client's call too (the cap is the server's, as for requests). Polled: how soon the
        # client's transport stops taking answers depends on the machine's load.
        deadline = time.monotonic() + 30
        refused = None
        while refused is None:
            assert time.monotonic() < deadline, ("never refused", plane.inflight_bytes)
            try:
                rpc.GRPCInferenceServiceStub(other).ModelInfer(req, timeout=10)
                time.sleep(0.05)
            except grpc.RpcError as exc:
                refused = exc
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "read its answers" in refused.details()
        made = registry.get_sample_value("innfer_requests_total", served)
        assert plane.inflight_bytes <= 2**20 + 64 * 2048  # the cap, and refusals' answers
        # Operators see it: the gauge reads the held bytes at scrape, beside the limit. (Not
        # "over half the cap", nor "over 0": the client's transport may take answers between
        # the refusal and the scrape - 262,316 bytes were left in one fresh-clone CI run, 0
        # in another. What it shows is what is held, read around the scrape.)
        before = plane.inflight_bytes
        scraped = registry.get_sample_value("innfer_inflight_bytes")
        after = plane.inflight_bytes
        assert min(before, after) <= scraped <= max(before, after), (before, scraped, after)
        assert scraped <= 2**20 + 64 * 2048, scraped
        assert registry.get_sample_value("innfer_inflight_limit_bytes") == 2**20
        call.cancel()  # the client goes: what it held is let go
        while plane.inflight_bytes:
            assert time.monotonic() < deadline + 10, plane.inflight_bytes
            time.sleep(0.02)
        answer = rpc.GRPCInferenceServiceStub(other).ModelInfer(req, timeout=10)
        assert len(answer.raw_output_contents[0]) == 4 * BIG_ROW
        assert registry.get_sample_value("innfer_inflight_bytes") == 0
        # Bounded by the cap (and what the client's transport took), not by the stream's
        # 64; the other client's calls before the refusal count too.
        assert made < 60, made
    finally:
        done.set()
        reader.close()
        other.close()


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """Model "big" (256 KiB answers) on a server taking 8 MiB in flight, 1 MiB per stream."""
    root = tmp_path_factory.mktemp("big-windowed")
    add_big_model(root)
    limits = {"max_inflight_bytes": 8 * 2**20, "max_stream_bytes": 2**20}
    s = ServerThread({"repository": str(root), "limits": limits}).start()
    yield s
    s.stop(grace=2.0)


def _big_request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="big")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    req.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    return req


@contextlib.contextmanager
def _unread_streams(server, n: int, per_stream: int):
    """``n`` streams to "big" on connections of their own (as separate clients have), each
    sending ``per_stream`` requests and reading nothing; yields (their calls, a stub on one
    more connection). Closes everything on the way out."""
    req, done = _big_request(), threading.Event()

    def requests():
        for _ in range(per_stream):
            yield req
        done.wait(30)  # open, never read

    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(server.address, options=own) for _ in range(n + 1)]
    try:
        calls = [rpc.GRPCInferenceServiceStub(c).ModelStreamInfer(requests())
                 for c in channels[:n]]  # fmt: skip
        yield calls, rpc.GRPCInferenceServiceStub(channels[n])
    finally:
        done.set()
        for c in channels:
            c.close()


def _settled(plane, within_s: float = 30.0) -> int:
    """The bytes in flight once nothing has moved for half a second (the streams' answers
    wait for readers)."""
    deadline, last, still = time.monotonic() + within_s, -1, 0
    while still < 10:
        assert time.monotonic() < deadline, ("never settled", plane.inflight_bytes)
        held = plane.inflight_bytes
        still = still + 1 if held == last and held > 0 else 0
        last = held
        time.sleep(0.05)
    return last


def _all_let_go(plane, calls, within_s: float = 10.0) -> None:
    """Cancel ``calls`` (the clients go) and wait until what their streams held is let go."""
    for call in calls:
        call.cancel()
    deadline = time.monotonic() + within_s
    while plane.inflight_bytes or plane.streams.held or plane.streams.waiters:
        assert time.monotonic() < deadline, (plane.inflight_bytes, plane.streams.held)
        time.sleep(0.02)


def test_streams_that_do_not_read_stall_at_their_window_and_other_clients_are_served(windowed):
    # Each stream holds at most limits.max_stream_bytes of the cap: three streams that send
    # without reading stop being read at 1 MiB each (gRPC's flow control then holds their
    # sends), and another client's calls are served. Before, each held up to 64 answers
    # (16 MiB) and the three filled the 8 MiB cap: every other call was refused.
    plane = windowed.server.plane
    registry = windowed.server.metrics.registry
    with _unread_streams(windowed, 3, 100) as (calls, other):
        held = _settled(plane)
        # Each stream: its window, overshot by at most the request and answer read last.
        per_stream = 2**20 + 2 * (4 * BIG_ROW + 4096)
        assert 3 * 2**19 < held <= 3 * per_stream, held
        # Operators see why: each stream stopped reading at its window at least once.
        stalls = registry.get_sample_value("innfer_stream_stalls_total", {"bound": "window"})
        assert stalls >= 3
        for _ in range(5):
            answer = other.ModelInfer(_big_request(), timeout=10)
            assert len(answer.raw_output_contents[0]) == 4 * BIG_ROW
        _all_let_go(plane, calls)


def test_more_streams_that_do_not_read_than_the_cap_holds_leave_room_for_other_calls(windowed):
    # Twelve streams at 1 MiB each would take 12 MiB of the 8 MiB cap: they filled it and
    # every other call was refused (the window alone bounds a few streams, not many). They
    # stop at the streams' share (0.75: 6 MiB, overshot by the requests of streams that
    # held nothing yet), and other calls are served. 10,000 requests a stream: never runs
    # out (a stream refused at the cap reads on).
    plane = windowed.server.plane
    registry = windowed.server.metrics.registry
    with _unread_streams(windowed, 12, 10_000) as (calls, other):
        held = _settled(plane)
        share = plane.streams.limit
        assert share == 6 * 2**20
        assert plane.streams.held == held  # the streams' own bytes
        assert share <= held <= share + 12 * (4 * BIG_ROW + 4096)
        assert registry.get_sample_value("innfer_stream_bytes") == plane.streams.held
        assert registry.get_sample_value("innfer_stream_limit_bytes") == share
        assert registry.get_sample_value("innfer_stream_stalls_total", {"bound": "share"}) >= 1
        for _ in range(5):
            answer = other.ModelInfer(_big_request(), timeout=10)
            assert len(answer.raw_output_contents[0]) == 4 * BIG_ROW
        _all_let_go(plane, calls)


# A client process that opens a stream to "big", sends and reads nothing (argv: address).
_SILENT_CLIENT = """
import sys, threading
import grpc, numpy as np
from server.proto_gen import grpc_service_pb2 as pb, grpc_service_pb2_grpc as rpc
req = pb.ModelInferRequest(model_name="big")
req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
req.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
def requests():
    for _ in range(40):
        yield req
    threading.Event().wait(120)
call = rpc.GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1])).ModelStreamInfer(
    requests())
print("open", flush=True)
threading.Event().wait(120)
"""


def test_a_client_that_vanishes_without_closing_lets_go_of_what_it_held(tmp_path):
    # A client that stops answering - its node lost, a partition, a stopped process - sends
    # no FIN: before keepalive_s its stream and the answers it held of the cap stayed for
    # hours (gRPC's server pings first after 2 h). Here the client process is stopped
    # (SIGSTOP): its kernel still holds the socket open, its gRPC answers no ping.
    root = tmp_path / "repo"
    add_big_model(root)
    config = {"repository": str(root), "keepalive_s": 1, "keepalive_timeout_s": 1}
    s = ServerThread(config).start()
    plane = s.server.plane
    repo_root = Path(__file__).resolve().parents[1]
    client = subprocess.Popen(
        [sys.executable, "-c", _SILENT_CLIENT, s.address], cwd=repo_root,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert client.stdout.readline().strip() == "open"
        last = _settled(plane)  # the answers it does not read are held
        # Alive and not reading: its gRPC answers the pings, and the stream is kept.
        time.sleep(3)
        assert plane.inflight_bytes == last > 0
        os.kill(client.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        while plane.inflight_bytes:
            assert time.monotonic() < stopped + 20, plane.inflight_bytes
            time.sleep(0.05)
    finally:
        client.kill()  # SIGKILL ends a stopped process too
        client.wait(10)
        s.stop(grace=2.0)


def test_an_answer_held_behind_slower_ones_past_its_budget_is_counted_late(server):
    # In request order an answer made in time can reach its client late, held behind slower
    # answers read before it; it was counted met when its batch completed (noticed in
    # session 33): attainment read higher than what ordered-stream clients got.
    registry = server.server.metrics.registry

    def count(name, **labels):
        return registry.get_sample_value(name, {"model": "tiny", **labels}) or 0.0

    before = (count("innfer_deadline_met_total"), count("innfer_deadline_missed_total",
                                                         reason="late"))  # fmt: skip

    # ~1.2 s of "slow" ahead of the tiny ones, counted from this machine's profile of it: a
    # fixed 40 was ~1.4 s here but 0.7 s on a fast CPU, a margin of 1.17x over the 0.6 s
    # asserted below (review helper-226).
    profile = Path(server.server.plane.config.repository) / "slow" / "profile.json"
    p50_s = json.loads(profile.read_text())["tiers"]["w100"]["1"]["p50_ms"] / 1e3
    n = min(max(40, math.ceil(1.2 / p50_s)), 200)  # within the model's max_queue (256)

    def send(c):
        for i in range(n):
            c.async_stream_infer("slow", [_input(SLOW)], request_id=f"s{i}")
        for i in range(4):  # urgent: made within ~2 slow batches, well inside 300 ms
            c.async_stream_infer("tiny", [_input(TINY)], request_id=f"t{i}",
                                 parameters={"latency_budget_ms": 300}, priority=1)  # fmt: skip

    answers = _streamed(server, send, n + 4)
    tiny = [r for r, e in answers[n:] if e is None]
    slow_us = sum(r.get_response().parameters["compute_us"].int64_param for r, _ in answers[:n])
    # The hold is the slow ones' compute after the tiny ones arrived (within a few of them):
    # well past the 300 ms budget. A refused tiny one is not served: no verdict.
    assert tiny and slow_us > 600_000, slow_us
    for r in tiny:  # made in time: the server's own queue + compute was inside the budget
        p = r.get_response().parameters
        assert p["queue_us"].int64_param + p["compute_us"].int64_param < 300_000
    met = count("innfer_deadline_met_total") - before[0]
    late = count("innfer_deadline_missed_total", reason="late") - before[1]
    assert (met, late) == (0, len(tiny)), (met, late, len(tiny))


@pytest.mark.parametrize(
    ("code", "left", "cancelled", "heard"),
    [
        ("OK", None, False, "OK"),
        # gRPC ends a cancelled call's request stream as a half-close would: a stream
        # cancelled before its first message was read returned OK (review 167)
        ("OK", None, True, "CANCELLED"),
        ("OK", 0.0, True, "DEADLINE_EXCEEDED"),
        ("CANCELLED", 5.0, True, "CANCELLED"),
        ("UNKNOWN", None, True, "UNKNOWN"),
    ],
)
def test_the_code_a_stream_is_counted_with_is_the_one_its_client_heard(
    code, left, cancelled, heard
):
    from types import SimpleNamespace

    from server.service import _heard

    context = SimpleNamespace(time_remaining=lambda: left, cancelled=lambda: cancelled)
    assert _heard(grpc.StatusCode[code], context) is grpc.StatusCode[heard]


def test_an_oversized_message_ends_its_stream_without_an_error_logged(server, caplog):
    """gRPC refuses a message over max_message_bytes for the whole call: the stream ends
    RESOURCE_EXHAUSTED. An answer written as it ended raised ExecuteBatchError, logged as an
    ERROR with a traceback and counted UNKNOWN (review helper-253)."""
    import logging

    slow = pb.ModelInferRequest(model_name="slow")
    slow.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    slow.raw_input_contents.append(np.ones((1, 1, 8, 8), np.float32).tobytes())
    big = pb.ModelInferRequest(model_name="tiny")
    big.raw_input_contents.append(b"\0" * (5 * 2**20))  # over the 4 MiB limit

    def requests():
        yield from [slow] * 5
        yield big

    with caplog.at_level(logging.ERROR), grpc.insecure_channel(server.address) as channel:
        call = rpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
    assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)
    plane, deadline = server.server.plane, time.monotonic() + 10
    while plane.inflight_bytes or plane.inflight():  # the cancelled requests let go
        assert time.monotonic() < deadline, (plane.inflight_bytes, plane.inflight())
        time.sleep(0.02)
    assert "ModelStreamInfer" not in caplog.text and "Traceback" not in caplog.text


def test_a_late_request_on_a_long_stream_is_planned_within_the_clients_deadline(server):
    # gRPC rounds a stream's deadline up (12.345 s arrives as 12.4 s: 100 ms steps). The step
    # was taken off again for each request from the time then left - 10 ms once under ~9 s,
    # none under 1 s - so late requests were planned up to a step past the client's own
    # deadline (review helper-279: +91 ms with 58 ms left). It is the stream's, taken once.
    from server.proto_gen import grpc_service_pb2 as pb
    from server.proto_gen import grpc_service_pb2_grpc as rpc

    def request(i: int) -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name="tiny", id=str(i))
        r.parameters["latency_budget_ms"].int64_param = 60_000
        r.inputs.add(name="input", datatype="FP32", shape=list(TINY.shape))
        r.raw_input_contents.append(TINY.tobytes())
        return r

    left_at_send = []
    opened = time.monotonic()

    def requests():
        for i, wait in enumerate((0.0, 3.6)):  # the second with under 9.09 s left
            time.sleep(wait)
            left_at_send.append(12.345 - (time.monotonic() - opened))
            yield request(i)

    with grpc.insecure_channel(server.address) as channel:
        stub = rpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(requests(), timeout=12.345))
    planned = [a.infer_response.parameters["budget_us"].int64_param / 1e6 for a in answers]
    assert len(planned) == 2, answers
    for left, budget in zip(left_at_send, planned, strict=True):
        assert budget < left, (left_at_send, planned)  # (before: the second 40 ms past it)


def test_a_streams_step_is_taken_off_until_its_last_step_then_what_is_left_is_planned():
    # A stream's step is its start's (100 ms for 10 s). Taken off to the end, a 10 s stream -
    # sent exact, not rounded - refused every request of its last 100 ms, saying the
    # client's budget was negative (review helper-280): within the step, best effort.
    from server.service import deadline_left

    assert deadline_left(_Call(5.0), 0.1) == pytest.approx(4.9)
    assert deadline_left(_Call(0.15), 0.1) == pytest.approx(0.05)
    assert deadline_left(_Call(0.08), 0.1) == pytest.approx(0.08)
    assert deadline_left(_Call(None), 0.1) is None


def test_a_stream_is_counted_as_its_client_heard_it_within_its_last_step():
    # Cancelled within the step of its deadline: gRPC's cut at the client's deadline
    # (DeadlineExceeded; it was counted Canceled: helper-279). Ended OK there by its client:
    # OK (it was counted DeadlineExceeded: helper-280).
    from server.service import _heard

    class Call:
        def time_remaining(self):
            return 0.05

        def cancelled(self):
            return False

    assert _heard(grpc.StatusCode.CANCELLED, Call(), 0.1) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _heard(grpc.StatusCode.OK, Call(), 0.1) == grpc.StatusCode.OK
    # 50 ms left of a 0.45 s call: its deadline (the client's timer fires a transit earlier)
    assert (_heard(grpc.StatusCode.CANCELLED, Call(), 0.0, took=0.4)
            == grpc.StatusCode.DEADLINE_EXCEEDED)  # fmt: skip
    Call.time_remaining = lambda self: 0.2  # (a cancel with time left: the client's)
    assert _heard(grpc.StatusCode.CANCELLED, Call(), 0.0) == grpc.StatusCode.CANCELLED
    # 40 ms left of a 45 ms deadline is the client's cancel, as its request is counted
    # (DeadlineExceeded with any 50 ms or less left: review helper-297)
    Call.time_remaining = lambda self: 0.04
    assert _heard(grpc.StatusCode.CANCELLED, Call(), 0.0, took=0.005) == grpc.StatusCode.CANCELLED
    Call.time_remaining = lambda self: 0.004
    assert (_heard(grpc.StatusCode.CANCELLED, Call(), 0.0, took=0.041)
            == grpc.StatusCode.DEADLINE_EXCEEDED)  # fmt: skip


def test_a_streams_deadline_keeps_its_requests_in_arrival_order(server):
    # Where the stream's deadline made each request's budget (budgets longer than it), each
    # request read the deadline itself and their due times differed by microseconds: the
    # queue, earliest deadline first, ran them in close to random order (review helper-297:
    # 1,730 of 4,950 pairs out of order for 100 requests). One deadline for the stream now.
    def send(c):
        for i in range(12):
            c.async_stream_infer("slow", [_input(SLOW)], request_id=str(i), parameters=LOOSE)

    answers = _streamed(server, send, 12, stream_timeout=30.0,
                        headers={"innfer-stream-order": "completion"})  # fmt: skip
    assert _ids(answers) == [str(i) for i in range(12)]
    planned = {r.get_response().parameters["budget_us"].int64_param for r, _ in answers}
    assert max(planned) < 30e6  # the stream's deadline made their budgets


def test_a_unary_cancel_is_counted_with_the_verdict_its_request_got():
    # The call's code and its request's outcome were judged apart - from the call's deadline
    # and from the request's due time, a margin and a parse earlier - and disagreed for
    # cancels in a band of about a millisecond (review helper-302). The request's verdict,
    # where it was judged, decides both.
    import contextvars

    from server.model_runtime import CANCEL_AT_DEADLINE
    from server.service import _heard

    def heard(verdict, left):
        def run():
            if verdict is not None:
                CANCEL_AT_DEADLINE.set(verdict)
            return _heard(grpc.StatusCode.CANCELLED, _Call(left, cancelled=True), took=0.039)

        return contextvars.copy_context().run(run)

    assert heard(None, 0.006) == grpc.StatusCode.CANCELLED  # by the call's own clock
    assert heard(True, 0.006) == grpc.StatusCode.DEADLINE_EXCEEDED  # as the request counted
    assert heard(False, 0.004) == grpc.StatusCode.CANCELLED
    assert heard(None, 0.004) == grpc.StatusCode.DEADLINE_EXCEEDED
    # a request's own budget ending is no deadline the client heard: far from the call's
    # deadline, or without one, its cancel is the client's (helper-303)
    assert heard(True, 29.6) == grpc.StatusCode.CANCELLED
    assert heard(True, None) == grpc.StatusCode.CANCELLED
