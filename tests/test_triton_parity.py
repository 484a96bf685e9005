"""Triton parity for the tools operators use: ModelConfig (version policy, dynamic batching,
instance group, backend), ModelStatistics (every duration perf_analyzer reads, batch
statistics) and ModelStreamInfer - the real tritonclient against innfer on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from serverutil import ServerThread, add_onnx_model, slow_loop
from tritonclient.utils import InferenceServerException

from server.proto_gen import grpc_service_pb2 as pb
from server.stream import StreamPool, StreamWindow, serve_stream

pytestmark = pytest.mark.e2e
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def _input(x: np.ndarray, name: str = "input") -> tc.InferInput:
    i = tc.InferInput(name, list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def _x(batch: int = 1, shape=(1, 8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


def _wait_idle(server, timeout: float = 10.0) -> None:
    """Until the server holds no request (nor its bytes) any more."""
    plane = server.server.plane
    deadline = time.monotonic() + timeout
    while (plane.inflight() or plane.inflight_bytes) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert plane.inflight() == 0 and plane.inflight_bytes == 0


# -- ModelConfig -------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "max_queue"), [("tiny", 256), ("wide", 2)])
def test_model_config_has_the_fields_triton_tools_read(client, model, max_queue):
    cfg = client.get_model_config(model).config  # parsed with tritonclient's own protos
    assert cfg.name == model and cfg.backend == "onnxruntime" and cfg.max_batch_size == 4
    # perf_analyzer: "failed to find the requested model version" without a version policy
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest"
    assert cfg.version_policy.latest.num_versions == 1
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    batching = cfg.dynamic_batching
    assert list(batching.preferred_batch_size) == [1, 2, 4]  # the profiled sizes
    assert batching.max_queue_delay_microseconds == 0  # innfer never holds a batch open
    assert batching.default_queue_policy.max_queue_size == max_queue
    assert batching.default_queue_policy.allow_timeout_override
    [group] = cfg.instance_group
    assert (group.name, group.count, group.kind) == (f"{model}_0", 1, 2)  # KIND_CPU
    assert [(t.name, list(t.dims)) for t in cfg.output] == [("logits", [10])]
    as_json = client.get_model_config(model, as_json=True)["config"]
    assert as_json["version_policy"] == {"latest": {"num_versions": 1}}
    assert as_json["instance_group"][0]["kind"] == "KIND_CPU"
    assert as_json["dynamic_batching"]["preferred_batch_size"] == [1, 2, 4]


# -- ModelStatistics ---------------------------------------------------------------------------
def _stats(client, model: str):
    return client.get_inference_statistics(model).model_stats[0]


def _burst(server, n: int, rows: int = 1):
    """``n`` concurrent requests to tiny (aio client): the scheduler batches them."""

    async def run():
        async with tca.InferenceServerClient(server.address) as c:
            calls = [c.infer("tiny", [_input(_x(rows, seed=i))]) for i in range(n)]
            return await asyncio.gather(*calls, return_exceptions=True)

    return asyncio.run(run())


@contextlib.contextmanager
def _held(runtime):
    """Every engine of ``runtime`` (a ModelRuntime of the server) held until the block
    releases it (``release()``, at the latest on the way out), and no batch run on the
    event loop's thread meanwhile (inline runs are off in the block): what arrives while a
    batch is held queues behind it. Yields ``(held, release)``: ``held`` is set once a batch
    waits in an engine."""
    held, gate = threading.Event(), threading.Event()
    engines = list(runtime.served.engines.values())

    def holding(run):
        def run_held(feeds):
            held.set()
            gate.wait(30)
            return run(feeds)

        return run_held

    inline_max_s = runtime.inline_max_s
    runtime.inline_max_s = 0.0
    for e in engines:
        e.run = holding(e.run)
    try:
        yield held, gate.set
    finally:
        gate.set()
        for e in engines:
            del e.run  # the class's own run again
        runtime.inline_max_s = inline_max_s


def test_statistics_count_requests_rows_and_batches(server, client):
    before = _stats(client, "tiny")
    # A burst batches only if it finds a batch running: on a loaded machine each request
    # may be parsed after the previous one finished (a tiny model's batch takes
    # microseconds), or run on the loop's thread. So the burst's first batch is held in its
    # engine until a full batch (4) waits behind it. A request may still be refused on a
    # loaded machine (its budget behind the others): a failure, counted.
    tiny = server.server.plane.models["tiny"]
    with _held(tiny) as (held, release), ThreadPoolExecutor(1) as pool:
        burst = pool.submit(_burst, server, 32)
        assert held.wait(10), "no batch of the burst reached an engine"
        deadline = time.monotonic() + 10
        while len(tiny.scheduler.queue) < 4 and not burst.done():
            assert time.monotonic() < deadline, "the burst did not queue behind the held batch"
            time.sleep(0.002)
        release()
        outcomes = burst.result(30)
    served = [o for o in outcomes if not isinstance(o, Exception)]
    refused = len(outcomes) - len(served)
    batched = any(o.get_response().parameters["batch_size"].int64_param > 1 for o in served)
    assert batched, "no request was batched"
    failed = refused
    with pytest.raises(InferenceServerException):  # refused at once: a failure, counted
        client.infer("tiny", [_input(_x())], parameters={"latency_budget_ms": 1e-4})
    failed += 1
    bad = tc.InferInput("input", [1, 3], "FP32")  # a malformed input: a failure too, counted
    bad.set_data_from_numpy(np.zeros((1, 3), np.float32))  # once (observability review 29)
    with pytest.raises(InferenceServerException, match="dims given"):
        client.infer("tiny", [bad])
    failed += 1
    after = _stats(client, "tiny")
    st, st0 = after.inference_stats, before.inference_stats

    requests = st.success.count - st0.success.count
    assert requests == len(served)
    assert after.inference_count - before.inference_count == len(served)  # 1 row each
    executions = after.execution_count - before.execution_count
    assert 0 < executions < requests  # batches, not requests
    assert st.fail.count - st0.fail.count == failed
    # every per-request duration perf_analyzer reads: one entry per served request, time > 0
    for field in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        got, was = getattr(st, field), getattr(st0, field)
        assert got.count - was.count == requests, field
        assert got.ns > was.ns, field
    assert st.success.ns - st0.success.ns >= st.queue.ns - st0.queue.ns
    assert after.last_inference > 0 and after.last_inference >= before.last_inference

    # batch_stats: one entry per batch size, executions summing to execution_count
    sizes = [b.batch_size for b in after.batch_stats]
    assert sizes == sorted(set(sizes)) and max(sizes) > 1 and max(sizes) <= 4
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in after.batch_stats) == (
        after.inference_count
    )
    for b in after.batch_stats:
        assert b.compute_input.count == b.compute_infer.count == b.compute_output.count
        assert b.compute_infer.ns > 0
    as_json = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    assert int(as_json["execution_count"]) == after.execution_count


def test_statistics_count_rows_of_a_batched_request(client):
    before = _stats(client, "tiny")
    client.infer("tiny", [_input(_x(3))], parameters={"tier": "w050"})
    after = _stats(client, "tiny")
    assert after.inference_count - before.inference_count == 3
    assert after.execution_count - before.execution_count == 1
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1


def test_statistics_of_every_model_and_unknown_version(client):
    names = {s.name for s in client.get_inference_statistics().model_stats}
    assert names == {"tiny", "wide"}
    with pytest.raises(InferenceServerException) as err:
        client.get_inference_statistics("tiny", model_version="2")
    assert err.value.status() == "StatusCode.NOT_FOUND"


# -- ModelStreamInfer --------------------------------------------------------------------------
class _Collector:
    """The stream callback: every (result, error) the client's stream thread delivers."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()

    def __call__(self, result, error) -> None:
        self.items.put((result, error))

    def take(self, n: int, timeout: float = 30.0) -> list:
        return [self.items.get(timeout=timeout) for _ in range(n)]


def test_stream_answers_each_request_once_with_its_id_and_tier(client):
    xs = {f"r{i}": _x(1 + i % 3, seed=i) for i in range(20)}
    tiers = {rid: ("w100", "w050", None)[i % 3] for i, rid in enumerate(xs)}
    got = _Collector()
    client.start_stream(callback=got)
    try:
        for rid, x in xs.items():
            # A loose budget: this test is about ids and tiers. Once on CI one of the 20 came
            # back an error whose message the assertion did not show (it does now); the
            # likeliest cause is "tiny"'s default 200 ms budget on a busy machine.
            params = {"latency_budget_ms": 60_000}
            if tiers[rid]:
                params["tier"] = tiers[rid]
            client.async_stream_infer("tiny", [_input(x)], request_id=rid, parameters=params)
        answers = got.take(20)
    finally:
        client.stop_stream()
    assert got.items.empty()  # nothing more than one answer per request
    assert all(error is None for _, error in answers), [str(e) for _, e in answers if e]
    by_id = {r.get_response().id: r for r, _ in answers}
    assert sorted(by_id) == sorted(xs)
    for rid, result in by_id.items():
        params = result.get_response().parameters
        tier = params["tier"].string_param
        assert tier == (tiers[rid] or tier) and params["batch_size"].int64_param >= 1
        assert "width" in params and "compute_us" in params
        unary = client.infer("tiny", [_input(xs[rid])], parameters={"tier": tier})
        np.testing.assert_allclose(result.as_numpy("logits"), unary.as_numpy("logits"),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_stream_error_is_an_answer_and_the_stream_goes_on(client):
    got = _Collector()
    client.start_stream(callback=got)
    try:
        client.async_stream_infer("tiny", [_input(_x())], request_id="good-1")
        client.async_stream_infer("tiny", [_input(_x(), name="image")], request_id="bad-1")
        client.async_stream_infer("tiny", [_input(_x())], request_id="bad-2",
                                  parameters={"tier": "w999"})  # fmt: skip
        client.async_stream_infer("nope", [_input(_x())], request_id="bad-3")
        client.async_stream_infer("tiny", [_input(_x(2))], request_id="good-2")
        answers = got.take(5)
    finally:
        client.stop_stream()
    ok = sorted(r.get_response().id for r, e in answers if e is None)
    errors = sorted(str(e) for _, e in answers if e is not None)
    assert ok == ["good-1", "good-2"]
    assert len(errors) == 3
    assert errors[0].startswith("INVALID_ARGUMENT: ") and "unknown input 'image'" in errors[0]
    assert "(request id 'bad-1')" in errors[0]
    assert errors[1].startswith("NOT_FOUND: ") and "no tier 'w999'" in errors[1]
    assert errors[2].startswith("NOT_FOUND: ") and "unknown model 'nope'" in errors[2]


def test_undecodable_stream_message_is_answered_and_the_stream_stays_open(server):
    good = pb.ModelInferRequest(model_name="tiny", id="after")
    good.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    good.raw_input_contents.append(_x().tobytes())
    messages = [b"\x0a\xff\x01garbage", good.SerializeToString()]
    with grpc.insecure_channel(server.address) as ch:
        call = ch.stream_stream(
            STREAM,
            request_serializer=lambda b: b,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        answers = list(call(iter(messages), timeout=30))
    # answered as they complete: the undecodable one needs no engine and comes first
    assert [bool(a.error_message) for a in answers] == [True, False]
    assert answers[0].error_message.startswith("INVALID_ARGUMENT: the request bytes are not")
    assert answers[1].infer_response.id == "after"


def _cancelled(server, model: str) -> float:
    labels = {"model": model, "tier": "", "outcome": "cancelled"}
    registry = server.server.metrics.registry
    return registry.get_sample_value("innfer_requests_total", labels) or 0.0


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A server whose one model takes ~35 ms a request (an ONNX Loop of MatMuls, max_batch
    1): requests on it are still queued when the client closes its stream."""
    root = tmp_path_factory.mktemp("slow")
    add_slow_model(root)
    s = ServerThread({"repository": str(root)}).start()
    yield s
    s.stop()


def add_slow_model(root):
    """Model "slow" in ``root``: ~35 ms a request (an ONNX Loop of MatMuls), max_batch 1,
    input [1024] -> logits [10] (tests/test_stream.py serves it beside "tiny")."""
    add_onnx_model(root, "slow", lambda w: slow_loop(w, trips=400), {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1024]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
        "tiers": [{"name": "w100", "width": 1.0}],
        "max_batch": 1, "max_queue": 256, "default_latency_budget_ms": 60_000,
    }, warmup=1, repeats=1)  # fmt: skip


def test_closing_a_stream_with_requests_in_flight_cancels_them(slow_server):
    client = tc.InferenceServerClient(slow_server.address)
    before = _cancelled(slow_server, "slow")
    got = _Collector()
    client.start_stream(callback=got)
    x = np.zeros((1, 1024), np.float32)
    for i in range(150):  # more than a stream may hold in flight: the server stops reading
        client.async_stream_infer("slow", [_input(x)], request_id=str(i))
    first = got.take(1)  # the first answer: the rest of what the server read is queued
    client.stop_stream(cancel_requests=True)
    _wait_idle(slow_server)  # every accepted request was answered or cancelled, bytes released
    answered = [r for r, e in first + got.take(got.items.qsize()) if e is None]
    assert 1 <= len(answered) < 150
    assert _cancelled(slow_server, "slow") > before  # queued requests left the queue
    # and the server goes on serving, unary and streaming
    assert client.infer("slow", [_input(x)]).as_numpy("logits").shape == (1, 10)
    again = _Collector()
    client.start_stream(callback=again)
    try:
        client.async_stream_infer("slow", [_input(x)], request_id="again")
        [(result, error)] = again.take(1)
    finally:
        client.stop_stream()
        client.close()
    assert error is None and result.get_response().id == "again"


def test_aio_client_stream(server):
    async def run():
        async def requests():
            for i in range(10):
                # (a budget of seconds: tiny's default 200 ms, on a loaded CI machine, once
                # refused one - this test is of the aio client's stream, not of budgets)
                yield {"model_name": "tiny", "inputs": [_input(_x(1, seed=i))],
                       "request_id": f"a{i}",
                       "parameters": {"tier": "w050", "latency_budget_ms": 10_000}}  # fmt: skip

        async with tca.InferenceServerClient(server.address) as c:
            return [item async for item in c.stream_infer(requests())]

    answers = asyncio.run(run())
    assert all(error is None for _, error in answers), [e for _, e in answers if e]
    assert sorted(r.get_response().id for r, _ in answers) == sorted(f"a{i}" for i in range(10))
    assert {r.get_response().parameters["tier"].string_param for r, _ in answers} == {"w050"}


def test_stream_needs_the_token_when_auth_is_on(model_repository):
    token = "stream-token-0123456789"
    s = ServerThread({"repository": str(model_repository), "models": ["tiny"],
                      "auth": {"bearer_token": token}}).start()  # fmt: skip
    try:
        c = tc.InferenceServerClient(s.address)
        for headers, ok in ((None, False), ({"authorization": f"Bearer {token}"}, True)):
            got = _Collector()
            c.start_stream(callback=got, headers=headers)
            try:
                try:
                    c.async_stream_infer("tiny", [_input(_x())], request_id="t")
                except InferenceServerException:
                    assert not ok  # the server may end the stream before the client sends
                [(result, error)] = got.take(1)
            finally:
                c.stop_stream(cancel_requests=not ok)
            if ok:
                assert error is None and result.get_response().id == "t"
            else:
                assert result is None and "UNAUTHENTICATED" in str(error)
        c.close()
    finally:
        s.stop()


# -- server.stream: the bound and the cancellation, without grpc -------------------------------
async def _sent(n: int, read: list | None = None, stay_open: bool = False):
    """A client's requests 0 .. n-1 on a stream, each noted in ``read`` as it is read; with
    ``stay_open`` the client does not half-close after them."""
    for i in range(n):
        if read is not None:
            read.append(i)
        yield i
    if stay_open:
        await asyncio.Event().wait()


def test_serve_stream_reads_no_more_than_its_limit_and_cancels_on_close():
    async def run():
        read, cancelled, written = [], [], []
        release = asyncio.Event()

        requests = functools.partial(_sent, 100, read)

        async def answer(i):
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled.append(i)
                raise
            return i

        async def write(i):
            written.append(i)

        # bounded: with every answer blocked, exactly `limit` requests are read
        task = asyncio.create_task(serve_stream(requests(), answer, write, limit=4))
        await asyncio.sleep(0.05)
        assert len(read) == 4 and not written
        release.set()
        await asyncio.wait_for(task, 5)
        assert sorted(written) == list(range(100))

        # the client goes away with requests in flight: all of them cancelled and unwound
        release.clear()
        read.clear()
        task = asyncio.create_task(serve_stream(requests(), answer, write, limit=8))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(cancelled) == list(range(8))

    asyncio.run(run())


def test_serve_stream_reads_nothing_more_while_its_window_is_full():
    # A stream's requests and unread answers hold bytes of the server's cap: with its window
    # full the stream reads no further request (before: up to its 64, whatever their size).
    async def run():
        read, written, stalls = [], [], []
        window = StreamWindow(1000, stalled=stalls.append)
        client_reads = asyncio.Event()  # a client that reads nothing holds every write

        requests = functools.partial(_sent, 100, read)

        async def answer(i):
            window.add(300)  # what the request and its answer hold, until written
            window.charged(asyncio.current_task())  # as the data plane does
            return i

        async def write(i):
            await client_reads.wait()
            written.append(i)
            window.sub(300)

        task = asyncio.create_task(serve_stream(requests(), answer, write, window=window))
        await asyncio.sleep(0.05)
        # 4 x 300 >= 1000: the fourth closed the window; the fifth was read and waits,
        # nothing after it is read
        assert (len(read), window.held, written) == (5, 1200, []), (read, window.held)
        assert stalls == ["window"]
        client_reads.set()  # it reads: the window opens as answers are written
        await asyncio.wait_for(task, 5)
        assert written == list(range(100)) and window.held == 0

        # a stream holding nothing reads its next request, however large: delayed, never
        # refused
        read.clear()
        big = StreamWindow(10)

        async def huge(i):
            big.add(1000)
            return i

        async def out(i):
            big.sub(1000)

        await asyncio.wait_for(serve_stream(requests(), huge, out, window=big), 5)
        assert len(read) == 100 and big.held == 0

    asyncio.run(run())


def test_a_request_whose_answer_is_charged_after_a_wait_holds_its_advance_until_then():
    # A text's answer bytes are charged after its tokenization, which waits on the tokenizer
    # threads: the stream's advance on them stays until then (given back after one loop
    # turn, the stream read all 64 and held 4.3 MB under a 100 kB window: helper-100).
    async def run():
        window = StreamWindow(1000)
        read = []

        requests = functools.partial(_sent, 100, read)

        async def answer(i):
            window.add(10)  # the request itself, at once
            await asyncio.sleep(0.01)  # tokenizing
            window.add(300)  # its answer's reserved bytes
            window.charged(asyncio.current_task())
            return i

        async def write(i):
            await asyncio.Event().wait()  # a client that reads nothing

        task = asyncio.create_task(serve_stream(requests(), answer, write, window=window))
        await asyncio.sleep(0.2)
        # 3 x 310 + advances < 1000 <= 4 x 310: the fourth stopped it, the fifth waits read
        assert len(read) <= 5 and window.held <= 1000 + 310, (len(read), window.held)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())


def test_a_request_read_and_waiting_for_room_when_the_server_drains_is_answered():
    # Draining answers the requests already read: one read and waiting for its stream's
    # window was dropped (its client, told UNAVAILABLE, would not know to send it again).
    async def run():
        window = StreamWindow(100)
        closing = asyncio.Event()
        answered, written = [], []

        requests = functools.partial(_sent, 10)

        async def answer(i):
            window.add(100)  # each fills the window
            answered.append(i)
            return i

        async def write(i):
            written.append(i)
            if i == 0:
                closing.set()  # the second is read and waits for the first's bytes
            await asyncio.sleep(0.05)
            window.sub(100)

        cut = await asyncio.wait_for(
            serve_stream(requests(), answer, write, closing=closing, window=window), 5
        )
        assert cut and answered == written == [0, 1], (answered, written)
        assert window.held == 0

    asyncio.run(run())


def test_a_stream_cancelled_as_the_server_drains_starts_nothing_after_it_ends():
    # The reader waiting for room is cancelled by the drain; the stream itself is cancelled
    # in the same loop turn (its client goes). The message it held was started after the
    # stream had unwound: never written nor discarded, its bytes held for good (helper-101).
    async def run():
        window = StreamWindow(100, StreamPool(10_000))
        closing = asyncio.Event()
        started = []

        requests = functools.partial(_sent, 3, stay_open=True)

        async def answer(i):
            started.append(i)
            window.add(150)  # its answer, held until written or discarded
            window.charged(asyncio.current_task())
            return i

        async def write(i):
            try:
                await asyncio.Event().wait()  # a client that reads nothing
            finally:
                window.sub(150)

        stream = asyncio.create_task(serve_stream(
            requests(), answer, write, closing=closing, discard=lambda i: window.sub(150),
            window=window,
        ))  # fmt: skip
        await asyncio.sleep(0.05)
        assert started == [0] and window.held == 150  # the second waits for room
        closing.set()
        stream.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stream
        await asyncio.sleep(0.05)
        assert started == [0] and window.held == 0 and window.pool.held == 0

    asyncio.run(run())


def test_streams_that_hold_bytes_stop_at_the_pools_limit_and_woken_together_take_turns():
    # Many streams that do not read filled the whole cap (each under its own window) and
    # every other call was refused; at the pool's limit they stop, and when it has room
    # again the streams woken at once pass one by one on what is free, not all on it.
    async def run():
        pool = StreamPool(1000)
        other = StreamWindow(10**6, pool)  # what other streams hold: the pool is full
        other.add(1000)
        clients_read = asyncio.Event()
        reads = [0] * 8
        windows = [StreamWindow(10_000, pool) for _ in range(8)]

        def stream(k):
            async def requests():
                for i in range(50):
                    reads[k] += 1
                    yield i

            async def answer(i):
                windows[k].add(100)
                windows[k].charged(asyncio.current_task())
                return i

            async def write(i):
                await clients_read.wait()
                windows[k].sub(100)

            return serve_stream(requests(), answer, write, window=windows[k])

        tasks = [asyncio.create_task(stream(k)) for k in range(8)]
        await asyncio.sleep(0.05)
        # A stream holding nothing reads whatever the pool holds (else a new client could
        # wait for good behind streams that do not read): one answer each, then they stop.
        assert [w.held for w in windows] == [100] * 8 and pool.held == 1800
        other.sub(1000)  # 800 held: room for two requests of 100
        await asyncio.sleep(0.05)
        # Woken together, two passed: the one past the limit on the estimate of the
        # one before it, at most one request beyond (all eight: 1600)
        assert 1000 <= pool.held <= 1100, [w.held for w in windows]
        clients_read.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert reads == [50] * 8 and pool.held == 0 and not pool.waiters

    asyncio.run(run())


def test_serve_stream_hands_every_answer_to_write_or_discard_once_even_cancelled_twice():
    # An answer made and never written (the client went) held its in-flight bytes for good:
    # the discard ran after the unwinding gather, which gRPC's second cancel of the handler
    # interrupts - 63 answers stayed counted after a non-reading client cancelled.
    async def run():
        made, written, discarded = [], [], []
        blocked = asyncio.Event()

        requests = functools.partial(_sent, 20)

        async def answer(i):
            if i % 2:  # half never finish before the client goes
                await asyncio.Event().wait()
            made.append(i)
            return i

        async def write(i):
            written.append(i)
            if len(written) == 3:  # the client stops reading
                blocked.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(
            serve_stream(
                requests(), answer, write, limit=8, ordered=False, discard=discarded.append
            )
        )
        await asyncio.wait_for(blocked.wait(), 5)
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0)  # the handler is in its unwinding gather
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(3):  # the callbacks' turn
            await asyncio.sleep(0)
        return made, written, discarded

    made, written, discarded = asyncio.run(run())
    assert len(written) == 3 and discarded  # some were made behind the blocked write
    assert sorted(written + discarded) == sorted(made), (made, written, discarded)


def test_a_streams_deadline_caps_its_requests_budgets_but_is_not_their_budget(client):
    # The stream's deadline is the whole stream's: it was taken as each request's budget
    # (a 600 s stream planned every request at 600 s), where a unary call's is its own.
    got = _Collector()
    client.start_stream(callback=got, stream_timeout=600)
    try:
        client.async_stream_infer("tiny", [_input(_x())], request_id="s")
        [(result, error)] = got.take(1)
    finally:
        client.stop_stream()
    assert error is None
    planned_s = result.get_response().parameters["budget_us"].int64_param / 1e6
    unary = client.infer("tiny", [_input(_x())], client_timeout=600)
    assert 0 < planned_s < 60 and unary.get_response().parameters["budget_us"].int64_param > 590e6


def test_classification_output_gives_the_top_classes_as_triton_does(client):
    # InferRequestedOutput(class_count=k) was ignored: the client got the float logits.
    x = _x(2)
    logits = client.infer("tiny", [_input(x)], parameters={"tier": "w100"}).as_numpy("logits")
    got = client.infer(
        "tiny", [_input(x)], outputs=[tc.InferRequestedOutput("logits", class_count=3)],
        parameters={"tier": "w100"},
    ).as_numpy("logits")  # fmt: skip
    assert got.shape == (2, 3) and got.dtype == np.object_
    for row, scores in zip(got, logits, strict=True):
        values, idx = zip(*(s.decode().split(":") for s in row), strict=True)
        assert [int(i) for i in idx] == list(np.argsort(-scores, kind="stable")[:3])
        np.testing.assert_allclose([float(v) for v in values], np.sort(scores)[::-1][:3], atol=1e-6)
    every = tc.InferRequestedOutput("logits", class_count=10_000)  # more than there are: all
    assert client.infer("tiny", [_input(x)], outputs=[every]).as_numpy("logits").shape[1] == 10


def test_classification_ties_keep_the_lower_class_index_first():
    # The parity test above draws random logits (no ties); sorting ascending and reversing
    # put tied classes highest index first, and no test noticed.
    from server.codec import top_classes

    scores = np.array([[0.5, 0.5, 0.1], [0.2, 0.7, 0.7], [0.3, 0.3, 0.3]], np.float32)
    assert top_classes(scores, 2).tolist() == [
        ["0.500000:0", "0.500000:1"],
        ["0.700000:1", "0.700000:2"],
        ["0.300000:0", "0.300000:1"],
    ]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32, np.int32])
def test_classification_ranks_integer_scores_by_value(dtype):
    # argsort(-scores) wrapped around for unsigned outputs (200 ranked below 0) and cannot
    # negate INT32_MIN.
    from server.codec import top_classes

    low = np.iinfo(dtype).min
    scores = np.array([[low, 5, 200, 7]], dtype)
    # printed as their own type prints them, as Triton's std::to_string (review 127)
    assert top_classes(scores, 3).tolist() == [["200:2", "7:3", "5:1"]]


def test_unsupported_output_parameters_are_refused():
    from runtime.repository.config import TensorConfig
    from server.codec import requested_outputs
    from server.errors import InvalidArgument

    spec = [TensorConfig(name="y", dtype="float32", shape=(4,))]
    req = pb.ModelInferRequest()
    req.outputs.add(name="y").parameters["shared_memory_key"].string_param = "r0"
    with pytest.raises(InvalidArgument, match="parameter 'shared_memory_key' is not supp"):
        requested_outputs(req, spec)
    req.outputs[0].parameters.clear()
    req.outputs[0].parameters["classification"].int64_param = 0
    with pytest.raises(InvalidArgument, match="classification must be a positive int64"):
        requested_outputs(req, spec)
    # BOOL scores: refused as Triton does, for their type - it said "has shape [4] per row;
    # classification needs one axis", of a fine shape (review helper-265)
    req.outputs[0].parameters["classification"].int64_param = 2
    flags = [TensorConfig(name="y", dtype="bool", shape=(4,))]
    with pytest.raises(InvalidArgument, match="'y' is BOOL; classification needs numeric"):
        requested_outputs(req, flags)
    assert requested_outputs(req, spec)[0].classes == 2


def test_a_shutdown_answers_what_open_streams_sent_and_does_not_wait_out_its_grace(
    model_repository,
):
    # An idle stream (a client holding it open with nothing to send) held every shutdown
    # for its whole grace period: grpc's stop waits for open calls, and the stream handler
    # waited for the client's next message. Now the stream stops reading when draining
    # begins, answers what it read and ends with UNAVAILABLE (reopen elsewhere).
    s = ServerThread({"repository": str(model_repository), "models": ["tiny"]}).start()
    client = tc.InferenceServerClient(s.address)
    got = _Collector()
    client.start_stream(callback=got)
    try:
        client.async_stream_infer("tiny", [_input(_x())], request_id="before")
        [(result, error)] = got.take(1)
        assert error is None and result.get_response().id == "before"
        t0 = time.monotonic()
        s.stop(grace=30.0)
        stopped_in = time.monotonic() - t0
        [(result, error)] = got.take(1)  # the stream's end
    finally:
        client.stop_stream()
        client.close()
    assert stopped_in < 15.0, stopped_in  # the grace (30 s) was not waited out
    assert result is None and "UNAVAILABLE" in str(error.status()), error
    assert "shutting down" in str(error)


def test_serve_stream_on_closing_answers_what_it_read_and_stops_reading():
    async def run(closing):
        more = asyncio.Event()  # never set: a client that sends nothing after its first two

        async def requests():
            yield 1
            yield 2
            await more.wait()
            yield 3

        async def answer(i):
            await asyncio.sleep(0.05 * i)
            return i

        out = []

        async def write(x):
            out.append(x)
            if x == 1 and closing is not None:
                closing.set()  # draining begins while request 2 is still running

        stream = serve_stream(requests(), answer, write, closing=closing)
        try:
            return await asyncio.wait_for(stream, 2.0), out
        except asyncio.TimeoutError:
            return None, out

    assert asyncio.run(run(asyncio.Event())) == (True, [1, 2])
    assert asyncio.run(run(None)) == (None, [1, 2])  # without it: waits for the client

    async def half_closed_then_closing():
        closing = asyncio.Event()

        async def requests():
            yield 1

        async def answer(i):
            await asyncio.sleep(0.05)
            closing.set()  # draining begins after the client half-closed
            return i

        out = []

        async def write(x):
            out.append(x)

        return await serve_stream(requests(), answer, write, closing=closing), out

    # every request was read before draining began: the stream ends normally (OK)
    assert asyncio.run(half_closed_then_closing()) == (False, [1])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: c.register_cuda_shared_memory("r", b"\0" * 64, 0, 64),
         "CUDA shared memory: send the tensors"),
    ],
)  # fmt: skip
def test_triton_rpcs_innfer_leaves_out_say_so_and_what_to_do(client, call, message):
    # grpc's default answer was "Unexpected <class 'NotImplementedError'>: Method not
    # implemented!"
    with pytest.raises(InferenceServerException, match=message) as e:
        call(client)
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    assert client.is_server_live()
