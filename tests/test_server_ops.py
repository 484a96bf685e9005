"""Operations: TLS (and mutual TLS), bearer-token auth, graceful SIGTERM, server config."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from serverutil import ServerThread, add_onnx_model, slow_loop
from tritonclient.utils import InferenceServerException

import server.app as app
from runtime.repository.config import ConfigError
from server.config import ServerConfig
from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import grpc_service_pb2_grpc as rpc
from server.service import InferenceService

pytestmark = pytest.mark.e2e
X = np.zeros((1, 1, 8, 8), np.float32)


def _input(x=X):
    i = tc.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "2", "-subj", "/CN=innfer-test-ca", cwd=d)  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "san.cnf",
                 cwd=d)  # fmt: skip
    return d


def _tls_client(address: str, certs: Path, with_cert: bool) -> tc.InferenceServerClient:
    extra = {}
    if with_cert:
        extra = {"private_key": str(certs / "client.key"),
                 "certificate_chain": str(certs / "client.crt")}  # fmt: skip
    return tc.InferenceServerClient(
        address, ssl=True, root_certificates=str(certs / "ca.crt"), **extra
    )


def test_tls(model_repository, certs):
    tls = {"cert": str(certs / "server.crt"), "key": str(certs / "server.key")}
    s = ServerThread({"repository": str(model_repository), "models": ["tiny"], "tls": tls})
    s.start()
    try:
        c = _tls_client(s.address, certs, with_cert=False)
        assert c.infer("tiny", [_input()]).as_numpy("logits").shape == (1, 10)
        plain = tc.InferenceServerClient(s.address)
        with pytest.raises(InferenceServerException):
            plain.infer("tiny", [_input()], client_timeout=3)
    finally:
        s.stop()


def test_mutual_tls_requires_a_client_certificate(model_repository, certs):
    tls = {"cert": str(certs / "server.crt"), "key": str(certs / "server.key"),
           "client_ca": str(certs / "ca.crt")}  # fmt: skip
    s = ServerThread({"repository": str(model_repository), "models": ["tiny"], "tls": tls})
    s.start()
    try:
        ok = _tls_client(s.address, certs, with_cert=True)
        assert ok.infer("tiny", [_input()]).as_numpy("logits").shape == (1, 10)
        anonymous = _tls_client(s.address, certs, with_cert=False)
        with pytest.raises(InferenceServerException):
            anonymous.infer("tiny", [_input()], client_timeout=3)
    finally:
        s.stop()


def test_bearer_token(model_repository):
    token = "s3cret-token-123"
    s = ServerThread({"repository": str(model_repository), "models": ["tiny"],
                      "auth": {"bearer_token": token}}).start()  # fmt: skip
    try:
        c = tc.InferenceServerClient(s.address)
        assert c.is_server_live() and c.is_server_ready()  # probes stay open
        # every guarded method's refusals and the model's load failures exist from 0 (one
        # that first appears at 1 is invisible to rate(): review helper-229)
        sample = s.server.plane.metrics.registry.get_sample_value
        assert sample("innfer_auth_refused_total", {"grpc_method": "ModelInfer"}) == 0
        assert sample("innfer_auth_refused_total", {"grpc_method": "ModelMetadata"}) == 0
        assert sample("innfer_auth_refused_total", {"grpc_method": "ServerLive"}) is None
        assert sample("innfer_model_load_failures_total", {"model": "tiny"}) == 0
        with pytest.raises(InferenceServerException) as err:
            c.infer("tiny", [_input()])
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException):
            c.infer("tiny", [_input()], headers={"authorization": "Bearer wrong-token"})
        good = c.infer("tiny", [_input()], headers={"authorization": f"Bearer {token}"})
        assert good.as_numpy("logits").shape == (1, 10)
        # the two refusals are counted (review 199: in no metric and no log before)
        refused = s.server.plane.metrics.registry.get_sample_value(
            "innfer_auth_refused_total", {"grpc_method": "ModelInfer"}
        )
        assert refused == 2
    finally:
        s.stop()


@pytest.fixture(scope="module")
def slow_repository(tmp_path_factory) -> Path:
    """One model, 'slow': a single tier that takes about 0.35 s per request (an ONNX Loop of
    MatMuls on ONNX Runtime), max_batch 1, so a second request waits behind the first."""
    root = tmp_path_factory.mktemp("slow")
    add_onnx_model(root, "slow", slow_loop, {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1024]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
        "tiers": [{"name": "w100", "width": 1.0}],
        "max_batch": 1, "default_latency_budget_ms": 60000,
    }, warmup=1, repeats=1)  # fmt: skip
    return root


def _start_process(
    repo: Path, tmp: Path, config: Path | None = None
) -> tuple[subprocess.Popen, str, str, Path]:
    """``innfer serve`` in a child process (with ``config``: ``--config`` too, the
    repository and ports still from the flags; GRPC_VERBOSITY as the command sets it):
    (process, gRPC address, metrics URL, log)."""
    log = tmp / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    with open(log, "w") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "innfer.cli", "serve", "--repository", str(repo),
             "--port", "0", "--metrics-port", "0",
             *(["--config", str(config)] if config else [])],
            stderr=err, stdout=subprocess.DEVNULL, env={**env, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    deadline = time.monotonic() + 120
    address = metrics = None
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            msg = json.loads(line).get("msg", "") if line.startswith("{") else ""
            if msg.startswith("listening on "):
                address = msg.split()[2]
                port = msg.rpartition(":")[2].rstrip(")")
                metrics = f"http://127.0.0.1:{port}/metrics"
            if msg.startswith("ready:") and address:
                return proc, address, metrics, log
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError(log.read_text())


def _inflight(metrics_url: str, model: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    key = f'innfer_inflight_requests{{model="{model}"}} '
    return next((float(line[len(key) :]) for line in text.splitlines() if line.startswith(key)), 0)


async def _until_inflight(metrics_url: str, model: str, n: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while await asyncio.to_thread(_inflight, metrics_url, model) < n:
        if time.monotonic() > end:
            raise TimeoutError(f"{n} requests for {model} never were in flight together")
        await asyncio.sleep(0.01)


def test_failed_tls_handshakes_write_no_plain_text_lines_to_the_json_log(
    model_repository, certs, tmp_path
):
    """gRPC's C core logged each failed handshake at INFO, to stderr as plain text: a
    client without a token wrote a line per connection among the JSON lines (review 199)."""
    config = tmp_path / "server.yaml"
    config.write_text(
        f"tls: {{cert: {certs / 'server.crt'}, key: {certs / 'server.key'}}}\nmodels: [tiny]\n"
    )
    proc, address, _, log = _start_process(model_repository, tmp_path, config)
    try:
        host, port = address.rsplit(":", 1)
        for _ in range(10):  # plaintext HTTP/2 to the TLS port: each handshake fails
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                with contextlib.suppress(OSError):
                    sock.recv(100)
        c = _tls_client(address, certs, with_cert=False)  # (and TLS still serves)
        assert c.infer("tiny", [_input()]).as_numpy("logits").shape == (1, 10)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    plain = [line for line in log.read_text().splitlines() if not line.startswith("{")]
    assert plain == [], plain[:3]


def test_sigterm_drains_in_flight_requests(slow_repository, tmp_path):
    proc, address, metrics_url, log = _start_process(slow_repository, tmp_path)
    x = np.ones((1, 1024), np.float32)

    async def run():
        async with tca.InferenceServerClient(address) as c:
            i = tca.InferInput("input", list(x.shape), "FP32")
            i.set_data_from_numpy(x)
            calls = [asyncio.ensure_future(c.infer("slow", [i]))]
            await _until_inflight(metrics_url, "slow", 1)  # on the engine
            calls.append(asyncio.ensure_future(c.infer("slow", [i])))
            await _until_inflight(metrics_url, "slow", 2)  # and one queued behind it
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*calls, return_exceptions=True)

    try:
        outcomes = asyncio.run(run())
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(not isinstance(o, Exception) for o in outcomes), outcomes
    for o in outcomes:  # both finished their ~0.35 s on the engine after the signal
        np.testing.assert_allclose(o.as_numpy("logits"), np.ones((1, 10)), rtol=1e-4)
    text = log.read_text()
    # At the signal the second request was in flight for sure (queued behind ~0.35 s of
    # compute), the first almost surely (it may just have finished).
    assert re.search(r"draining [12] in-flight requests", text), text
    assert '"msg": "stopped"' in text


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, "repository: got None"),
        ({"repository": "m", "grpc_port": 70000}, "grpc_port: got 70000"),
        ({"repository": "m", "policy": "fastest"}, "policy: got 'fastest'"),
        ({"repository": "m", "tls": {"cert": "nope.crt", "key": "nope.key"}}, "tls.cert"),
        ({"repository": "m", "auth": {"bearer_token": "short"}}, "at least 8 characters"),
        ({"repository": "m", "grace_period_s": -1}, "grace_period_s"),
        ({"repository": "m", "port": 1}, "port: got 1, expected a known field"),
    ],
)
def test_server_config_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        ServerConfig.from_dict(data, source="server.yaml")


def test_a_stopped_server_frees_its_metrics_port(model_repository):
    # The Prometheus listener was shut down but never closed: its port stayed bound.
    srv = ServerThread({"repository": str(model_repository)}).start()
    port = srv.server.metrics_port
    srv.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_an_aged_connection_is_replaced_without_failing_a_call(tmp_path, monkeypatch):
    # Without grpc.max_connection_age_ms a client kept its first connection for ever: it
    # re-resolves DNS only when a connection drops, so pods the HPA added got none of its
    # calls. With max_connection_age_s the server sends GOAWAY; the channel reconnects and
    # the calls on it go on.
    peers = []
    live = InferenceService.ServerLive

    async def recording_live(self, request, context):
        peers.append(context.peer())  # "ipv4:127.0.0.1:<client port>": one per connection
        return await live(self, request, context)

    monkeypatch.setattr(InferenceService, "ServerLive", recording_live)
    s = ServerThread({"repository": str(tmp_path), "max_connection_age_s": 1}).start()
    calls = 0
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = rpc.GRPCInferenceServiceStub(ch)
            end = time.monotonic() + 3.0  # ~3 connection ages (1 s +- 10 % jitter)
            while time.monotonic() < end:
                assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live  # none fails
                calls += 1
                time.sleep(0.01)
    finally:
        s.stop()
    assert len(peers) == calls
    assert len(set(peers)) >= 2, set(peers)  # the connection was replaced


def test_connection_age_config():
    cfg = ServerConfig.from_dict(
        {"repository": "m", "max_concurrent_streams": None, "keepalive_s": None}
    )
    assert cfg.max_connection_age_s == 300 and cfg.max_connection_age_grace_s is None
    cfg = cfg.replace(connection_idle_s=None)
    handshake = ("grpc.server_handshake_timeout_ms", 20_000)
    assert app.connection_options(cfg) == [("grpc.max_connection_age_ms", 300_000), handshake]
    cfg = cfg.replace(max_connection_age_s=60, max_connection_age_grace_s=2.5)
    assert app.connection_options(cfg) == [
        ("grpc.max_connection_age_ms", 60_000),
        ("grpc.max_connection_age_grace_ms", 2_500),
        handshake,
    ]
    ageless = cfg.replace(max_connection_age_s=None, max_connection_age_grace_s=None)
    assert app.connection_options(ageless) == [handshake]
    # Keepalive on by default: a ping each minute, 20 s for its answer - the ping's own
    # timeout too, which grpcio otherwise keeps at 60 s.
    default = app.connection_options(ServerConfig.from_dict({"repository": "m"}))
    assert {("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.ping_timeout_ms", 20_000)} <= set(default)  # fmt: skip
    with pytest.raises(ConfigError, match="keepalive_timeout_s"):
        ServerConfig.from_dict({"repository": "m", "keepalive_timeout_s": 0})
    with pytest.raises(ConfigError, match="max_connection_age_grace_s"):
        ServerConfig.from_dict({"repository": "m", "max_connection_age_s": None,
                                "max_connection_age_grace_s": 10})  # fmt: skip
    with pytest.raises(ConfigError, match="max_connection_age_s"):
        ServerConfig.from_dict({"repository": "m", "max_connection_age_s": 0})


def test_a_token_file_emptied_after_the_config_was_read_keeps_auth_on(model_repository, tmp_path):
    # The token file was read again when the server started: a secret mount that read empty
    # by then gave an empty token, which InferenceService took for "auth off".
    token = tmp_path / "token"
    token.write_text("s3cret-token-123\n")
    (tmp_path / "server.yaml").write_text(
        f"repository: {model_repository}\nmodels: [tiny]\ngrpc_port: 0\nmetrics_port: 0\n"
        "auth: {bearer_token_file: token}\n"
    )
    cfg = ServerConfig.load(tmp_path / "server.yaml")
    token.write_text("")
    s = ServerThread(cfg).start()
    try:
        c = tc.InferenceServerClient(s.address)
        with pytest.raises(InferenceServerException) as err:
            c.infer("tiny", [_input()])
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        good = c.infer("tiny", [_input()], headers={"authorization": "Bearer s3cret-token-123"})
        assert good.as_numpy("logits").shape == (1, 10)
    finally:
        s.stop()
    with pytest.raises(ValueError, match="bearer token is empty"):
        InferenceService(None, "")  # None is auth off; "" must never be taken for it


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``sock`` (it sent nothing); fails after ``seconds``."""
    sock.settimeout(seconds)
    t0 = time.monotonic()
    try:
        assert sock.recv(1) == b""
    except TimeoutError:
        pytest.fail(f"the server kept an idle connection open for {seconds} s")
    return time.monotonic() - t0


def test_an_idle_metrics_connection_is_closed():
    # prometheus_client's server gave each connection a thread that waited without a
    # timeout: a client that connected and sent nothing pinned a thread for good, and
    # thousands of them exhausted the serving process's threads.
    from server.metrics import Metrics

    httpd, _ = Metrics().serve_http(0)
    try:
        with socket.create_connection(("127.0.0.1", httpd.server_port)) as idle:
            assert 3 < _closed_within(idle, 10) < 10  # METRICS_TIMEOUT_S: 5 s
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_metrics_connections_are_capped():
    import server.metrics as metrics

    cap = 16  # metrics.METRICS_MAX_CONNECTIONS, checked last (the old server had no cap)
    httpd, _ = metrics.Metrics().serve_http(0)
    address = ("127.0.0.1", httpd.server_port)
    try:
        held = [socket.create_connection(address) for _ in range(cap)]
        try:
            time.sleep(0.2)  # each has its thread and slot, and has sent no request
            with socket.create_connection(address):
                # no 17th thread: the extra one takes the slot of the oldest held one (none
                # sent its request), which is closed at once, not timed out (5 s): bounded a
                # second short of it (2.5 s was passed at 2.78 s by a fresh-clone CI run
                # beside a load test on this 2-core VM)
                assert _closed_within(held[0], 10) < metrics.METRICS_TIMEOUT_S - 1.0
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5
        while True:  # the slots come back as their threads see the clients gone
            try:
                with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics") as r:
                    assert b"innfer_build_info" in r.read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert cap == metrics.METRICS_MAX_CONNECTIONS


def test_slow_metrics_clients_neither_keep_their_slots_nor_blind_the_scrapes(monkeypatch):
    # 16 connections trickling a header byte every 2 s (under the per-read timeout) held
    # every slot: each scrape was closed at once for as long as they went on (review
    # helper-136). A connection now ends METRICS_DEADLINE_S after it came, and a new one
    # takes the slot of the oldest open over METRICS_EVICT_AFTER_S.
    import server.metrics as metrics

    monkeypatch.setattr(metrics, "METRICS_DEADLINE_S", 1.5)
    httpd, _ = metrics.Metrics().serve_http(0)
    address = ("127.0.0.1", httpd.server_port)
    try:
        with socket.create_connection(address) as slow:  # the deadline, whatever it sends
            slow.sendall(b"GET /metrics HTTP/1.1\r\nX-a: ")
            slow.settimeout(0.3)
            t0, closed = time.monotonic(), False
            while not closed and time.monotonic() - t0 < 5:
                try:
                    closed = slow.recv(1) == b""
                except TimeoutError:
                    with contextlib.suppress(OSError):
                        slow.sendall(b"a")
            assert closed and 1.0 < time.monotonic() - t0 < 3.5
        monkeypatch.setattr(metrics, "METRICS_DEADLINE_S", 60.0)
        held = []
        for _ in range(metrics.METRICS_MAX_CONNECTIONS):
            sock = socket.create_connection(address)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-a: ")
            held.append(sock)
        try:
            time.sleep(metrics.METRICS_EVICT_AFTER_S + 0.3)
            with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics") as r:
                assert b"innfer_build_info" in r.read()  # a slot was taken back for it
        finally:
            for sock in held:
                sock.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    ("host", "auth", "warned"),
    [("0.0.0.0", True, True), ("127.0.0.1", True, False), ("0.0.0.0", False, False)],
)
def test_a_token_sent_in_cleartext_is_warned_about_at_start(tmp_path, caplog, host, auth, warned):
    data = {"repository": str(tmp_path), "host": host}
    if auth:
        data["auth"] = {"bearer_token": "s3cret-token-123"}
    with caplog.at_level("WARNING", logger="innfer.server"):
        s = ServerThread(data).start()
        s.stop()
    said = [r.getMessage() for r in caplog.records if "cleartext" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert host in said[0] and "tls" in said[0] and "s3cret" not in said[0]


@pytest.mark.parametrize("limits, warned", [
    ({}, False),
    ({"max_inflight_bytes": 2**21}, True),  # 1.5 MiB share under a 4 MiB window
    ({"max_inflight_bytes": 2**21, "max_stream_bytes": 2**20}, False),
])  # fmt: skip
def test_a_stream_window_above_the_streams_share_is_warned_about_at_start(
    tmp_path, caplog, limits, warned
):
    # Accepted (the share still bounds the streams), but one stream that never reads then
    # takes the whole share and the others go one request at a time (helper-100).
    with caplog.at_level("WARNING", logger="innfer.server"):
        s = ServerThread({"repository": str(tmp_path), "limits": limits}).start()
        s.stop()
    said = [r.getMessage() for r in caplog.records if "max_stream_bytes" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert "4.0 MiB" in said[0] and "1.50 MiB" in said[0] and "Lower" in said[0]


@pytest.mark.parametrize("reflection", [None, True, False])
def test_server_reflection_is_a_config_switch(tmp_path, reflection):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    data = {"repository": str(tmp_path)}
    if reflection is not None:
        data["reflection"] = reflection
    s = ServerThread(data).start()
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            try:
                (answer,) = stub.ServerReflectionInfo(iter([ask]), timeout=10)
                served = {x.name for x in answer.list_services_response.service}
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
                served = set()
    finally:
        s.stop()
    on = reflection is not False  # default: on
    assert ("inference.GRPCInferenceService" in served) == on, served


def test_undecodable_reflection_requests_are_invalid_argument_without_a_traceback(tmp_path, caplog):
    # grpcio's own parser answered UNKNOWN and logged a traceback per call: reflection is
    # open without a token, and one client wrote ~0.5 MB of ERROR log a second (review 177).
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    s = ServerThread({"repository": str(tmp_path)}).start()
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    try:
        with caplog.at_level("ERROR"), grpc.insecure_channel(s.address) as ch:
            raw = ch.stream_stream(method)  # bytes in, bytes out
            for junk in (b"\xff", b"*\x03abc", bytes(range(256))):
                with pytest.raises(grpc.RpcError) as e:
                    list(raw(iter([junk]), timeout=10))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "ServerReflectionRequest" in e.value.details()
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)  # and it still answers
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            (answer,) = stub.ServerReflectionInfo(iter([ask]), timeout=10)
    finally:
        s.stop()
    served = {x.name for x in answer.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= served  # fmt: skip
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_reflection_describes_the_services_it_lists(tmp_path):
    # The messages live in innfer's own descriptor pool: reflection looked in protobuf's
    # default one, so grpcurl listed the services but could not describe or call them
    # (review 179).
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    s = ServerThread({"repository": str(tmp_path)}).start()
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            asks = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
                    for name in ("inference.GRPCInferenceService", "grpc.health.v1.Health",
                                 "grpc.reflection.v1alpha.ServerReflection")]  # fmt: skip
            answers = list(stub.ServerReflectionInfo(iter(asks), timeout=10))
    finally:
        s.stop()
    methods = {}
    for answer in answers:
        assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
        for data in answer.file_descriptor_response.file_descriptor_proto:
            f = descriptor_pb2.FileDescriptorProto.FromString(data)
            methods.update({sv.name: [m.name for m in sv.method] for sv in f.service})
    assert "ModelInfer" in methods["GRPCInferenceService"] and "Watch" in methods["Health"]
    assert methods["ServerReflection"] == ["ServerReflectionInfo"]


def test_calls_beyond_max_concurrent_streams_on_one_connection_are_refused(model_repository):
    # Without a bound every call gRPC handed over was held until answered: a client sending
    # faster than the server answered grew it by its backlog (bench/results/stream_bound.json).
    s = ServerThread({"repository": str(model_repository), "max_concurrent_streams": 8}).start()
    registry = s.server.metrics.registry
    infer = {"grpc_type": "unary", "grpc_service": "inference.GRPCInferenceService",
             "grpc_method": "ModelInfer"}  # fmt: skip

    def started() -> float:
        return registry.get_sample_value("grpc_server_started_total", infer) or 0.0

    def ready_on_its_own_connection() -> bool:
        # a local subchannel pool: not the burst's connection, which gRPC would share
        opts = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(s.address, options=opts) as other:
            stub = rpc.GRPCInferenceServiceStub(other)
            return stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready

    async def burst(n: int) -> tuple[list[str], bool]:
        async with tca.InferenceServerClient(s.address) as c:

            async def one() -> str:
                i = tca.InferInput("input", list(X.shape), "FP32")
                i.set_data_from_numpy(X)
                try:
                    await c.infer("tiny", [i], parameters={"latency_budget_ms": 60_000})
                    return "OK"
                except InferenceServerException as e:
                    return e.status()

            loop = asyncio.get_running_loop()
            probe = loop.run_in_executor(None, ready_on_its_own_connection)  # during the flood
            codes = await asyncio.gather(*[one() for _ in range(n)])
            return codes, await probe

    try:
        before = started()
        codes, ready = asyncio.run(burst(200))
        assert ready
        assert set(codes) == {"OK", "StatusCode.UNAVAILABLE"}, set(codes)
        # the refused calls never reached the server: it started exactly the others
        assert started() - before == len(codes) - codes.count("StatusCode.UNAVAILABLE")
    finally:
        s.stop()
    default = ServerConfig.from_dict({"repository": "m"})
    assert ("grpc.max_concurrent_streams", 1024) in app.connection_options(default)
    with pytest.raises(ConfigError, match="max_concurrent_streams"):
        ServerConfig.from_dict({"repository": "m", "max_concurrent_streams": 0})


def test_calls_beyond_max_pending_calls_are_cancelled_at_once_and_probes_still_answer(
    model_repository,
):
    # While the event loop is busy, gRPC queues the calls it has received and the loop has
    # not taken up; no budget is planned there. Unbounded (gRPC's 1,000), that queue held the
    # backlog of an overloaded server: an MLP at 2.3x what one core handles answered 0.3 %
    # of its requests within budget, p50 0.7 s. Beyond max_pending_calls gRPC cancels a new
    # call at once; the health service's Check has a queue of its own, so a probe is not.
    n, block_s, sent = 4, 2.0, 16
    s = ServerThread({"repository": str(model_repository), "max_pending_calls": n}).start()
    request = pb.ModelInferRequest(model_name="tiny", id="pending")
    request.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
    request.raw_input_contents.append(X.tobytes())
    request.parameters["latency_budget_ms"].double_param = 60_000
    check = "/grpc.health.v1.Health/Check"
    try:
        with (
            grpc.insecure_channel(s.address) as ch,
            grpc.insecure_channel(
                s.address, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as probe_ch,
        ):  # the probe on a connection of its own, as the kubelet's
            stub = rpc.GRPCInferenceServiceStub(ch)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            probe = probe_ch.unary_unary(check, request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)  # fmt: skip
            probe(b"", timeout=10)  # connected before the loop stops
            stopped = threading.Event()
            s.loop.call_soon_threadsafe(lambda: (stopped.set(), time.sleep(block_s)))
            assert stopped.wait(10)
            t0 = time.monotonic()
            done: dict[int, float] = {}
            calls = [stub.ModelInfer.future(request, timeout=30) for _ in range(sent)]
            for i, c in enumerate(calls):
                c.add_done_callback(lambda _, i=i: done.setdefault(i, time.monotonic()))
            while not done and time.monotonic() - t0 < block_s / 2:
                time.sleep(0.01)  # the first cancellation: the inference queue is full
            health = probe.future(b"", timeout=30)
            codes = [c.code() if c.exception() else grpc.StatusCode.OK for c in calls]
            assert health.exception() is None, health.exception()
    finally:
        s.stop()
    cancelled = [i for i, c in enumerate(codes) if c == grpc.StatusCode.CANCELLED]
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}, codes
    # at most the one call gRPC had matched to the loop's request and n + 1 queued
    assert codes.count(grpc.StatusCode.OK) <= n + 2, codes
    # refused at once, while the loop was still stopped - not after it had caught up
    assert max(done[i] for i in cancelled) - t0 < block_s * 0.75, (done, cancelled)
    bounded = ServerConfig.from_dict({"repository": "m", "max_pending_calls": 16})
    assert ("grpc.server.max_pending_requests_hard_limit", 16) in app.connection_options(bounded)
    default = ServerConfig.from_dict({"repository": "m"})  # gRPC's own: no burst is cut
    assert not any("pending" in k for k, _ in app.connection_options(default))
    with pytest.raises(ConfigError, match="max_pending_calls"):
        ServerConfig.from_dict({"repository": "m", "max_pending_calls": 0})


def test_the_wait_in_grpcs_queue_is_measured_by_the_servers_own_probe(model_repository):
    # A call waits in gRPC's queue while the loop is busy, before any innfer code sees it:
    # the server's own queue metrics read ~20 ms while clients waited 0.7 s. The probe
    # (server.pending) times a call of its own from its send to its handler.
    s = ServerThread({"repository": str(model_repository)}).start()
    registry = s.server.metrics.registry

    def samples(above_s: float | None = None) -> float:
        if above_s is None:
            return registry.get_sample_value("innfer_pending_wait_seconds_count") or 0.0
        under = registry.get_sample_value("innfer_pending_wait_seconds_bucket",
                                          {"le": str(above_s)})  # fmt: skip
        return samples() - (under or 0.0)

    def wait_for(what, limit_s: float = 10.0) -> bool:
        end = time.monotonic() + limit_s
        while not what() and time.monotonic() < end:
            time.sleep(0.02)
        return what()

    try:
        assert wait_for(lambda: samples() >= 3)  # every 50 ms on an idle server
        assert samples(above_s=0.2) == 0
        answered = {"outcome": "answered"}
        assert registry.get_sample_value("innfer_pending_probes_total", answered) >= 3
        s.loop.call_soon_threadsafe(time.sleep, 1.0)  # the loop stops; calls queue in gRPC
        assert wait_for(lambda: samples(above_s=0.5) >= 1)  # (sent <= 50 ms into the stop)
        assert samples(above_s=2.0) == 0
    finally:
        s.stop()


def test_metrics_eviction_takes_from_the_peer_holding_the_most_connections(monkeypatch):
    # A client that sends its request and never reads the answer held every slot with
    # "read" connections younger than the eviction age: 2 of 20 scrapes (review
    # helper-141). Prometheus scrapes a target one connection at a time: the peer holding
    # several gives the slot up first, whatever their ages.
    import threading as th

    import server.metrics as metrics

    cut = []
    monkeypatch.setattr(metrics, "_cut", cut.append)
    server = object.__new__(metrics._MetricsServer)
    server._open_lock = th.Lock()
    now = time.monotonic()
    server._open = {"scrape": [now - 2.0, True, "10.0.0.9"]}  # the oldest, its request read
    server._open |= {f"b{i}": [now - 0.1 * i, True, "10.0.0.66"] for i in range(1, 4)}
    assert server._evict_oldest() and cut == ["b3"]  # the busy peer's oldest, not the scrape
    server._open = {"scrape": [now - 2.0, True, "10.0.0.9"], "b": [now, True, "10.0.0.66"]}
    assert server._evict_oldest() and cut[-1] == "scrape"  # one each: the oldest over 1 s


def test_a_connection_that_sends_no_call_is_closed_once_idle(model_repository):
    # A connection that sent nothing, or only HTTP/2's preface, was held for good - a
    # descriptor each: one client's thousands locked every other client out, health probes
    # included (review helper-277). connection_idle_s closes them.
    import socket

    s = ServerThread({"repository": str(model_repository), "connection_idle_s": 1}).start()
    try:
        host, port = s.address.rsplit(":", 1)
        held = []
        for preface in (b"", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(3) + b"\x04" + bytes(5)):
            c = socket.create_connection((host, int(port)))
            c.sendall(preface)
            c.settimeout(15)
            held.append(c)
        for c in held:
            with c:
                while c.recv(4096):  # until the server closes it (a timeout: still held)
                    pass
        stub = rpc.GRPCInferenceServiceStub(grpc.insecure_channel(s.address))
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    finally:
        s.stop()


def test_serve_sets_the_switch_interval_the_config_asks_for(monkeypatch):
    # gil_switch_ms: how long a thread holds Python's GIL while another waits for it (the
    # engine thread handed a batch, gRPC's poller); measured at the issue-18 point in
    # bench/results/gil_switch_session69 (0.5 ms: less server CPU per request).
    import sys

    calls = []
    monkeypatch.setattr(sys, "setswitchinterval", calls.append)
    cfg = ServerConfig.from_dict({"repository": "m", "tune_malloc": False})
    app.tune_process(cfg, 4 << 20)
    assert calls == []  # null: Python's own 5 ms
    app.tune_process(cfg.replace(gil_switch_ms=0.5), 4 << 20)
    assert calls == [0.0005]
    with pytest.raises(ConfigError, match="gil_switch_ms"):
        ServerConfig.from_dict({"repository": "m", "gil_switch_ms": 0})
