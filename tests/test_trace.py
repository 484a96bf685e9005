"""Triton's trace extension (server/trace.py) through the stock tritonclient, gRPC and HTTP:
sampled requests' timestamps written as Triton's JSON, settings read and changed per model
and globally, what cannot be changed refused with the reason."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from serverutil import ServerThread
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.e2e

ORDER = ["REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_END", "REQUEST_END"]
# Triton's frontend stamps around them: its trace_summary.py keeps a frontend's traces by
# the first (and printed nothing for innfer's before they were there).
GRPC = ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END", *ORDER, "GRPC_SEND_START", "GRPC_SEND_END"]
HTTP = ["HTTP_RECV_START", "HTTP_RECV_END", *ORDER, "HTTP_SEND_START", "HTTP_SEND_END"]


def _serve(repo, tmp_path, **trace) -> ServerThread:
    cfg = {"file": str(tmp_path / "trace.json"), "level": "TIMESTAMPS", "rate": 1, **trace}
    return ServerThread({"repository": str(repo), "http_port": 0, "trace": cfg}).start()


def _infer(client, n: int, model: str = "tiny") -> list[str]:
    meta = client.get_model_metadata(model, as_json=True)["inputs"][0]
    x = np.zeros([1, *map(int, meta["shape"][1:])], np.float32)
    i = tc.InferInput(meta["name"], list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    tiers = []
    for k in range(n):
        r = client.infer(model, [i], request_id=f"r{k}", parameters={"latency_budget_ms": 5000})
        tiers.append(r.get_response().parameters["tier"].string_param)
    return tiers


def _read(path, timeout: float = 10.0) -> list[dict]:
    end = time.monotonic() + timeout  # written on the trace thread
    while not path.exists() and time.monotonic() < end:
        time.sleep(0.02)
    return json.loads(path.read_text())


def test_sampled_requests_are_written_in_tritons_trace_format(model_repository, tmp_path):
    s = _serve(model_repository, tmp_path, log_frequency=2)
    try:
        with tc.InferenceServerClient(s.address) as client:
            assert "trace" in client.get_server_metadata(as_json=True)["extensions"]
            tiers = _infer(client, 4)
            first, second = _read(tmp_path / "trace.json.0"), _read(tmp_path / "trace.json.1")
    finally:
        s.stop()
    records = first + second
    assert [r["request_id"] for r in records] == ["r0", "r1", "r2", "r3"]
    assert [r["tier"] for r in records] == tiers
    for r in records:
        assert r["model_name"] == "tiny" and r["model_version"] == 1  # Triton's $number
        assert [t["name"] for t in r["timestamps"]] == GRPC
        ns = [t["ns"] for t in r["timestamps"]]
        assert ns == sorted(ns) and ns[-1] - ns[0] < 5e9, ns
    assert len({r["id"] for r in records}) == 4
    assert not (tmp_path / "trace.json").exists()  # each pair went to its own file


def test_log_frequency_0_writes_every_trace_when_the_server_stops(model_repository, tmp_path):
    s = _serve(model_repository, tmp_path, rate=2, count=-1)
    try:
        with tc.InferenceServerClient(s.address) as client:
            _infer(client, 5)
            assert not (tmp_path / "trace.json").exists()
    finally:
        s.stop()
    assert [r["request_id"] for r in _read(tmp_path / "trace.json")] == ["r1", "r3"]  # 1 in 2


def test_settings_are_read_and_changed_per_model_through_tritonclient(model_repository, tmp_path):
    s = _serve(model_repository, tmp_path, level="OFF", count=3)
    try:
        with tc.InferenceServerClient(s.address) as client:
            got = client.get_trace_settings(as_json=True)["settings"]
            assert {k: v["value"] for k, v in got.items()} == {
                "trace_file": [str(tmp_path / "trace.json")], "trace_level": ["OFF"],
                "trace_rate": ["1"], "trace_count": ["3"], "log_frequency": ["0"],
            }  # fmt: skip
            _infer(client, 2)  # OFF: nothing traced, nothing counted down
            # tiny's own level; wide and the global settings stay OFF
            client.update_trace_settings("tiny", {"trace_level": ["TIMESTAMPS"]})
            got = client.get_trace_settings("tiny", as_json=True)["settings"]
            assert got["trace_level"]["value"] == ["TIMESTAMPS"]
            assert client.get_trace_settings(as_json=True)["settings"]["trace_level"]["value"] == [
                "OFF"
            ]
            _infer(client, 2, "wide")
            _infer(client, 5)  # trace_count 3: three traced, then it stops
            count = client.get_trace_settings("tiny", as_json=True)["settings"]["trace_count"]
            assert count["value"] == ["0"]
            client.update_trace_settings("tiny", {"trace_level": None})  # follows global again
            got = client.get_trace_settings("tiny", as_json=True)["settings"]
            assert got["trace_level"]["value"] == ["OFF"]
            for settings, said in (
                ({"trace_file": "/etc/passwd"}, "trace_file cannot be changed by a client"),
                ({"trace_level": ["TENSORS"]}, "it records no TENSORS"),
                ({"trace_rate": "0"}, r"trace_rate: a whole number in \[1, 2147483647\]"),
                ({"trace_rate": "often"}, "trace_rate: one whole number"),
                ({"trace_rate": "1_000"}, "trace_rate: one whole number"),
                ({"trace_colour": "red"}, "unknown trace setting 'trace_colour'"),
            ):
                with pytest.raises(InferenceServerException, match=said) as e:
                    client.update_trace_settings(settings=settings)
                assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
            # A global setting cleared goes back to the server config's (Triton's rule; it
            # was refused: a client could not say "back to the server's" - helper-261)
            client.update_trace_settings(settings={"trace_rate": "7", "trace_count": "9"})
            client.update_trace_settings(settings={"trace_rate": None, "trace_count": None})
            got = client.get_trace_settings(as_json=True)["settings"]
            assert (got["trace_rate"]["value"], got["trace_count"]["value"]) == (["1"], ["3"])
            with pytest.raises(InferenceServerException, match="unknown model 'nope'") as e:
                client.get_trace_settings("nope")
            assert e.value.status() == "StatusCode.NOT_FOUND" and "tiny" in str(e.value)
            with pytest.raises(InferenceServerException, match="log_frequency is global"):
                client.update_trace_settings("tiny", {"log_frequency": "3"})
    finally:
        s.stop()
    traced = _read(tmp_path / "trace.json")
    assert [(r["model_name"], r["request_id"]) for r in traced] == [
        ("tiny", "r0"), ("tiny", "r1"), ("tiny", "r2"),
    ]  # fmt: skip


def test_settings_over_http_as_tritonclient_http_sends_them(model_repository, tmp_path):
    s = _serve(model_repository, tmp_path, level="OFF")
    try:
        http = th.InferenceServerClient(f"127.0.0.1:{s.server.rest.port}")
        got = http.update_trace_settings("tiny", {"trace_rate": "7", "trace_level": ["TIMESTAMPS"]})
        assert got["trace_rate"] == "7" and got["trace_level"] == ["TIMESTAMPS"]
        assert http.get_trace_settings()["trace_rate"] == "1"
        with pytest.raises(InferenceServerException, match="trace_file cannot be changed"):
            http.update_trace_settings(settings={"trace_file": "/tmp/elsewhere.json"})
        http.close()
    finally:
        s.stop()


def test_a_trace_level_without_a_file_is_refused_in_the_config(model_repository):
    from server.config import ServerConfig

    with pytest.raises(ValueError, match=r"trace.file: got None, expected a file path"):
        ServerConfig.from_dict({"repository": str(model_repository),
                                "trace": {"level": "TIMESTAMPS"}})  # fmt: skip


def test_a_trace_finishing_after_the_close_is_dropped_not_raised(tmp_path):
    # A request the stop's grace left running ends after the writer closed: submitting to
    # it raised inside the request's own clean-up.
    from pathlib import Path

    from server.trace import RequestTraces, TraceConfig

    traces = RequestTraces(TraceConfig(file=Path(tmp_path / "t.json"), level="TIMESTAMPS", rate=1))
    late = traces.start("m", "late")
    early = traces.start("m", "early")
    early.stamp("REQUEST_START")
    traces.finish(early)
    traces.close()
    traces.finish(late)
    traces.wait()
    assert [r["request_id"] for r in json.loads((tmp_path / "t.json").read_text())] == ["early"]


def test_review_247_what_triton_does_and_what_would_be_lost(model_repository, tmp_path):
    # A model's settings start as a copy of the global ones (its count its own); a POST of
    # no settings for a model removes them; a version not served is a 404; a trace file
    # that cannot be written is refused when tracing is turned on, not lost at the stop.
    s = _serve(model_repository, tmp_path, level="OFF", count=2)
    try:
        c = tc.InferenceServerClient(s.address)
        c.update_trace_settings("tiny", {"trace_level": ["TIMESTAMPS"]})
        c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
        _infer(c, 1, "wide")  # the global count: 2 -> 1; tiny's copy stays 2
        got = c.get_trace_settings("tiny", as_json=True)["settings"]["trace_count"]["value"]
        assert got == ["2"]
        http = th.InferenceServerClient(f"127.0.0.1:{s.server.rest.port}")
        c.update_trace_settings("tiny", {"trace_rate": "9"})
        assert http.update_trace_settings("tiny", {})["trace_rate"] == "1"  # removed
        http.close()
        import urllib.error
        import urllib.request

        url = f"http://127.0.0.1:{s.server.rest.port}/v2/models/tiny/versions/2/trace/setting"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=10)
        assert e.value.code == 404
        c.close()
    finally:
        s.stop()
    blocked = tmp_path / "afile"
    blocked.write_text("a file where the trace folder would be")
    with pytest.raises(ValueError, match=r"cannot write trace files in .*afile"):
        _serve(model_repository, blocked, level="TIMESTAMPS")


def test_traces_held_for_the_stop_are_bounded(tmp_path, monkeypatch):
    # log_frequency 0 held every trace until the stop: 1.5 kB each, without end
    import server.trace as trace

    monkeypatch.setattr(trace, "MAX_PENDING", 3)
    traces = trace.RequestTraces(trace.TraceConfig(file=tmp_path / "t.json", level="TIMESTAMPS",
                                                   rate=1))  # fmt: skip
    for k in range(7):
        t = traces.start("m", f"r{k}")
        traces.finish(t)
        assert len(traces._pending) < 3
    traces.close()
    traces.wait()
    files = [json.loads((tmp_path / f"t.json.{i}").read_text()) for i in range(3)]
    assert [[r["request_id"] for r in f] for f in files] == [
        ["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6"],
    ]  # fmt: skip
    assert not (tmp_path / "t.json").exists()


def _sorted_stamps(record: dict) -> tuple[list[str], list[int]]:
    names = [t["name"] for t in record["timestamps"]]
    ns = [t["ns"] for t in record["timestamps"]]
    assert ns == sorted(ns) and ns[-1] - ns[0] < 5e9, list(zip(names, ns, strict=True))
    return names, ns


def test_a_refused_over_long_id_is_not_kept_in_its_trace(model_repository, tmp_path):
    """Refused over max_id_bytes, a sampled request's 1 MB id was still kept in its trace and
    written to the file: 300 of them, +290 MiB (review helper-260)."""
    s = _serve(model_repository, tmp_path, log_frequency=1)
    try:
        with tc.InferenceServerClient(s.address) as client:
            x = tc.InferInput("input", [1, 1, 8, 8], "FP32")
            x.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
            with pytest.raises(InferenceServerException, match="the request id is 5,000 bytes"):
                client.infer("tiny", [x], request_id="y" * 5000)
            [record] = _read(tmp_path / "trace.json.0")
    finally:
        s.stop()
    assert record["request_id"] == ""
    # refused after its trace began, it still reaches its client - as a status - and the
    # trace says when (the frontend's stamps around the data plane's first and last)
    names, _ = _sorted_stamps(record)
    assert names == [*GRPC[:3], "REQUEST_END", *GRPC[-2:]], names


def test_a_rest_request_is_traced_with_the_http_frontends_stamps(model_repository, tmp_path):
    s = _serve(model_repository, tmp_path, log_frequency=1)
    try:
        http = th.InferenceServerClient(f"127.0.0.1:{s.server.rest.port}")
        x = th.InferInput("input", [1, 1, 8, 8], "FP32")
        x.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
        http.infer("tiny", [x], request_id="h1", parameters={"latency_budget_ms": 5000})
        http.close()
        [record] = _read(tmp_path / "trace.json.0")
    finally:
        s.stop()
    names, _ = _sorted_stamps(record)
    assert record["request_id"] == "h1" and names == HTTP


def test_sent_finishes_a_trace_once_and_only_with_send_stamps_when_sent(tmp_path):
    from server.trace import GRPC_STAMPS, RequestTraces, TraceConfig, Transport

    traces = RequestTraces(TraceConfig(file=tmp_path / "t.json", level="TIMESTAMPS", rate=1))
    t = Transport(GRPC_STAMPS, read_from_ns=1, read_to_ns=2)
    traces.sent(t, 5)  # no trace (not sampled): nothing
    t.trace = traces.start("m", "a")
    t.received(t.trace)
    traces.sent(t, None)  # the call ended without an answer (cancelled)
    traces.sent(t, 7)  # a second end: nothing more
    u = Transport(GRPC_STAMPS, read_from_ns=1, read_to_ns=2)
    u.trace = traces.start("m", "b")
    traces.sent(u, 9)
    traces.close()
    traces.wait()
    a, b = json.loads((tmp_path / "t.json").read_text())
    assert [x["name"] for x in a["timestamps"]] == list(GRPC_STAMPS[:2])
    assert [x["name"] for x in b["timestamps"]] == list(GRPC_STAMPS[2:])
    assert b["timestamps"][0]["ns"] == 9


def test_stream_requests_are_traced_with_their_write(model_repository, tmp_path):
    # Each request on a stream: read, the data plane, then its answer's write (a stream's
    # requests had no frontend stamps, and trace_summary.py kept none of them).
    import queue

    s = _serve(model_repository, tmp_path, log_frequency=3)
    got: queue.Queue = queue.Queue()
    try:
        with tc.InferenceServerClient(s.address) as client:
            client.start_stream(callback=lambda result, error: got.put((result, error)))
            x = tc.InferInput("input", [1, 1, 8, 8], "FP32")
            x.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
            for k in range(3):
                client.async_stream_infer("tiny", [x], request_id=f"s{k}",
                                          parameters={"latency_budget_ms": 5000})  # fmt: skip
            answers = [got.get(timeout=10) for _ in range(3)]
            client.stop_stream()
            records = _read(tmp_path / "trace.json.0")
    finally:
        s.stop()
    assert all(error is None for _, error in answers), answers
    assert sorted(r["request_id"] for r in records) == ["s0", "s1", "s2"]
    for r in records:
        names, _ = _sorted_stamps(r)
        assert names == GRPC, names
