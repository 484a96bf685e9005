"""A hostile client against `innfer serve` on 127.0.0.1: the current tree against an older one.

Each tree (current = this repository; baseline = a git worktree of an older commit) serves
the same repository (tests/serverutil.build_repository: "tiny" 1x8x8 and "wide" 1x28x28,
built once, copied per tree) as a subprocess with cwd and PYTHONPATH set to the tree, on
free loopback ports. Per tree, one after the other:
  fuzz      N ModelInfer requests with randomised fields (seeded, the same for both trees:
            model names such as "../tiny" and 20,000-character strings, inputs with random
            names, datatypes and shapes up to 100,000 dims, raw contents of random lengths,
            typed contents, repeated outputs, parameters with NaN / inf / huge / wrong-typed
            values) plus ~10 % raw garbage or mutated bytes on a serializer-free channel;
            8 in flight, 10 s timeout each. Failures: INTERNAL, UNKNOWN, and a hang (no
            answer before the client's own 10 s deadline). Server RSS before and after.
  big       ~1 MiB requests of several shapes (1 MiB raw bytes of the wrong size; 40,000
            input names; 100,000 outputs "logits"; 200,000 dims (0.2 MiB); 250,000 typed fp32
            values; 10,000 parameters), each sent 5 times back to back while another process
            calls health Check every 5 ms: the median answer time of the 5 and the latency of
            the checks that overlapped them (the goal's figures). The shape is then sent on
            until >= 1 s has passed ("sustained": the health p99 under a stream of them).
            After an answer slower than 1 s the next shape waits until the server answers
            health again (it may still be busy with the abandoned request). Then one
            1,000,000 x "logits" request (~9.5 MiB): its answer time and the server's peak
            RSS (VmRSS polled every 5 ms, and VmHWM).
  overload  the "wide" model's capacity (closed loop, concurrency 4, ~3 s), then open-loop
            Poisson arrivals at 4x that rate for --overload-seconds (latency_budget_ms 100,
            real data, non-blocking futures): every request must get exactly one answer (by
            request id; a client timeout counts as no answer), server RSS stays bounded, and
            health Check (every 20 ms, another process) answers quickly. Also reported: the
            end-to-end time of OK answers against the server's own queue + compute time
            (response parameters), and the CPU cores the server and this client used.
Goals (from the hardening issue), checked per tree:
  fuzz      0 INTERNAL / UNKNOWN / hangs, RSS growth <= 50 MiB
  big       each ~1 MiB shape answered in <= 50 ms (median) while health p99 <= 20 ms
  overload  every request answered exactly once, RSS rise <= 64 MiB (our reading of
            "bounded"), health p99 <= 50 ms
Writes bench/results/hardening.json and hardening.png; loopback only, every loop bounded.

    git worktree add /tmp/innfer-base ba73d2f
    python -m bench.hardening --baseline-tree /tmp/innfer-base [--fuzz 10000]
        [--overload-seconds 60] [--repeats 5] [--seed 0] [--out bench/results]
    git worktree remove --force /tmp/innfer-base
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.publish import publish
from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]

OUT = Path(__file__).parent / "results"
HOST = "127.0.0.1"
INFER = "/inference.GRPCInferenceService/ModelInfer"
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
READINESS = health_pb2.HealthCheckRequest(service="readiness")
SERVING = health_pb2.HealthCheckResponse.SERVING
MIB = 2**20

FUZZ_TIMEOUT_S = 10.0
FUZZ_IN_FLIGHT = 8
FUZZ_TIME_LIMIT_S = 900.0
BIG_TIMEOUT_S = 30.0
HUGE_TIMEOUT_S = 60.0
BIG_HEALTH_WINDOW_S = 1.0  # keep sending a shape this long so the probe has samples
BIG_MAX_SENDS = 200
BIG_SHAPE_LIMIT_S = 60.0  # no further sends of a shape once this much time went into it
SETTLE_LIMIT_S = 120.0  # after a hang: wait this long at most for the server to answer again
OVERLOAD_TIMEOUT_S = 10.0
OVERLOAD_MAX_REQUESTS = 500_000
CAPACITY_SECONDS = 3.0
CAPACITY_CONCURRENCY = 4
OVERLOAD_FACTOR = 4.0
FAILURES = ("INTERNAL", "UNKNOWN", "HANG")

GOAL_FUZZ_RSS_MIB = 50.0
GOAL_BIG_ANSWER_MS = 50.0
GOAL_BIG_HEALTH_MS = 20.0
GOAL_OVERLOAD_RSS_MIB = 64.0
GOAL_OVERLOAD_HEALTH_MS = 50.0
GOALS = {
    "fuzz": f"0 INTERNAL/UNKNOWN/hangs, RSS growth <= {GOAL_FUZZ_RSS_MIB:g} MiB",
    "big": f"every ~1 MiB shape answered <= {GOAL_BIG_ANSWER_MS:g} ms (median) "
    f"while health p99 <= {GOAL_BIG_HEALTH_MS:g} ms",
    "overload": f"every request answered exactly once, RSS rise <= {GOAL_OVERLOAD_RSS_MIB:g} "
    f"MiB, health p99 <= {GOAL_OVERLOAD_HEALTH_MS:g} ms",
}

SERVE = (
    "import asyncio, server.app, server.config\n"
    "asyncio.run(server.app.serve(server.config.ServerConfig.from_dict("
    "{{'repository': {repo!r}, 'grpc_port': {port}, 'metrics_port': {mport}, **{extra!r}}})))"
)


# -- the server under test ------------------------------------------------------------------------
def trees_to_measure(p, baseline: Path | None, marker: str) -> dict[str, Path]:
    """{"current": this tree} and, with ``--baseline-tree``, {"baseline": it} - refused
    through ``p`` unless it holds ``marker`` (a file that tree must have)."""
    trees = {"current": ROOT}
    if baseline is not None:
        base = baseline.resolve()
        if not (base / marker).is_file():
            p.error(f"--baseline-tree {base}: no {marker} there")
        trees["baseline"] = base
    return trees


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on the loopback address."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class ServerProcess:
    """`server.app.serve` of one tree in a subprocess (cwd = PYTHONPATH = the tree)."""

    def __init__(self, tree: Path, repo: Path, log: Path, extra: dict | None = None) -> None:
        self.tree, self.repo, self.log = tree, repo, log
        self.extra = extra or {}  # more server config fields (the tree must know them)
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.metrics_url = ""
        self.starts = 0

    def start(self, timeout: float = 120.0) -> float:
        """Start the server and wait until readiness is SERVING; seconds it took."""
        port, mport = free_ports(2)
        self.address = f"{HOST}:{port}"
        self.metrics_url = f"http://{HOST}:{mport}/metrics"
        code = SERVE.format(repo=str(self.repo), port=port, mport=mport, extra=self.extra)
        env = {**os.environ, "PYTHONPATH": str(self.tree), "PYTHONUNBUFFERED": "1"}
        t0 = time.monotonic()
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code], cwd=self.tree, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.starts += 1
        with grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited ({self.proc.returncode}):\n{tail(self.log)}")
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"not ready after {timeout:.0f} s:\n{tail(self.log)}")
                with contextlib.suppress(grpc.RpcError):
                    if stub.Check(READINESS, timeout=1.0).status == SERVING:
                        return time.monotonic() - t0
                time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if not self.alive():
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def memory(self) -> dict[str, float]:
        """VmRSS and VmHWM of the server process in MiB ({} once it has exited)."""
        if self.proc is None:
            return {}
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
        return out

    def rss(self) -> float:
        return self.memory().get("VmRSS", float("nan"))

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process so far (NaN once it has exited)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, AttributeError, IndexError):
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def settle(self, limit_s: float = SETTLE_LIMIT_S) -> float:
        """Seconds until a health Check is answered again (a server still busy with an
        abandoned request would bill it to the next measurement); NaN if it never is."""
        t0 = time.monotonic()
        with grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while self.alive() and time.monotonic() - t0 < limit_s:
                try:
                    stub.Check(READINESS, timeout=1.0)
                    return time.monotonic() - t0
                except grpc.RpcError:
                    time.sleep(0.1)
        return float("nan")


class RssSampler:
    """The server's VmRSS every ``interval_s`` in a thread: the largest value seen."""

    def __init__(self, server: ServerProcess, interval_s: float, max_s: float = 900.0) -> None:
        self.server, self.interval_s, self.max_s = server, interval_s, max_s
        self.max_rss = float("nan")
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        end = time.monotonic() + self.max_s
        while not self._stop.is_set() and time.monotonic() < end:
            rss = self.server.rss()
            if not np.isnan(rss):
                self.max_rss = rss if np.isnan(self.max_rss) else max(self.max_rss, rss)
                self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


# -- health probe in its own process (this one's GIL is busy sending) ----------------------------
def _probe_loop(address: str, interval_s: float, max_s: float, conn, stop) -> None:
    samples: list[tuple[float, float, str]] = []
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        with contextlib.suppress(grpc.RpcError):
            stub.Check(READINESS, timeout=5.0)
        conn.send("ready")
        end = time.monotonic() + max_s
        nxt = time.monotonic()
        while not stop.is_set() and time.monotonic() < end:
            t0 = time.monotonic()
            try:
                status = stub.Check(READINESS, timeout=1.0).status
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as exc:
                name = exc.code().name
            samples.append((t0, (time.monotonic() - t0) * 1e3, name))
            nxt = max(nxt + interval_s, time.monotonic())
            time.sleep(max(0.0, nxt - time.monotonic()))
    conn.send(samples)
    conn.close()


class HealthProbe:
    """grpc.health.v1 Check(readiness) every ``interval_s`` from a spawned process, on its own
    connection; samples are (monotonic start, ms, status), comparable across processes."""

    def __init__(self, address: str, interval_s: float, max_s: float = 900.0) -> None:
        self.address, self.interval_s, self.max_s = address, interval_s, max_s
        self.samples: list[tuple[float, float, str]] = []

    def __enter__(self) -> HealthProbe:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=False)
        self._stop = ctx.Event()
        self._proc = ctx.Process(
            target=_probe_loop,
            args=(self.address, self.interval_s, self.max_s, child, self._stop),
            daemon=True,
        )
        self._proc.start()
        child.close()
        try:
            if not self._conn.poll(60) or self._conn.recv() != "ready":
                raise EOFError
        except (EOFError, OSError):
            self._stop.set()
            self._kill()
            raise RuntimeError("the health probe process did not start") from None
        return self

    def _kill(self) -> None:
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with contextlib.suppress(EOFError, OSError):
            if self._conn.poll(30):
                self.samples = self._conn.recv()
        self._kill()

    def during(self, window: tuple[float, float]) -> dict:
        """Latency of the checks that overlapped ``window`` (monotonic seconds)."""
        a, b = window
        return health_stats([s for s in self.samples if s[0] <= b and s[0] + s[1] / 1e3 >= a])


def health_stats(samples: list[tuple[float, float, str]]) -> dict:
    out = latency_stats([s[1] for s in samples])
    statuses = Counter(s[2] for s in samples)
    out["statuses"] = dict(statuses)
    out["errors"] = sum(c for k, c in statuses.items() if k not in ("SERVING", "NOT_SERVING"))
    return out


def latency_stats(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    a = np.asarray(ms, dtype=float)
    return {
        "n": len(a),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
    }


def code_of(fut, took_s: float, timeout_s: float, hang: str) -> str:
    """The status name of a finished future; a client-side deadline is ``hang``."""
    exc = fut.exception()
    if exc is None:
        return "OK"
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    if code is None:
        return f"CLIENT_{type(exc).__name__}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and took_s >= 0.95 * timeout_s:
        return hang
    return code.name


# -- requests ------------------------------------------------------------------------------------
IN_SHAPES = {"tiny": (1, 8, 8), "wide": (1, 28, 28)}


def valid_request(model: str = "tiny", rng: np.random.Generator | None = None):
    shape = (1, *IN_SHAPES[model])
    x = np.zeros(shape, np.float32) if rng is None else rng.standard_normal(shape, np.float32)
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="FP32", shape=list(shape))
    req.raw_input_contents.append(x.tobytes())
    return req


NAN, INF = float("nan"), float("inf")
MODEL_NAMES = ["tiny", "tiny", "tiny", "wide", "", "nope", "../tiny", "tiny/../tiny", "/tmp/tiny",
               "./tiny", "..", ".", "TINY", "tiny\x00", "ééé", "m" * 300, "m" * 20_000]  # fmt: skip
TENSOR_NAMES = ["input", "input", "logits", "", "x", "input" * 3, "n" * 1000, "ïnput"]
DTYPES = ["FP32", "FP32", "FP16", "FP64", "BF16", "INT8", "INT16", "INT32", "INT64", "UINT8",
          "UINT64", "BOOL", "BYTES", "", "fp32", "D" * 300]  # fmt: skip
PARAM_KEYS = ["latency_budget_ms", "latency_budget_ms", "priority", "priority", "tier", "tier",
              "min_tier", "timeout", "timeout", "sequence_id", "binary_data_output", "",
              "k" * 300]  # fmt: skip
DIMS = [1, 1, 1, 8, 28, 0, -1, 2**31, 2**62, -(2**62), 2**63 - 1]
DOUBLES = [NAN, INF, -INF, 1e308, -1e308, 0.0, -0.0, -1.0, 1e-9, 1.5, 100.0, 1e7, 5e-324]
INTS = [0, -1, 1, 100, 1000, 2**31, 2**62, 2**63 - 1, -(2**63)]
STRINGS = ["w100", "w050", "", "zzz", "100", "nan", "inf", "x" * 10_000]
CONTENTS = ("fp32_contents", "fp64_contents", "int_contents", "int64_contents",
            "uint_contents", "uint64_contents", "bool_contents", "bytes_contents")  # fmt: skip


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _text(rng: np.random.Generator, max_len: int) -> str:
    n = int(rng.integers(0, max_len + 1))
    return "".join(map(chr, rng.integers(32, 0x2FF, n).tolist()))  # no surrogates


def _set_param(p, rng: np.random.Generator) -> None:
    kind = _pick(rng, ["int64_param", "double_param", "string_param", "bool_param",
                       "uint64_param"])  # fmt: skip
    if kind == "int64_param":
        p.int64_param = _pick(rng, INTS)
    elif kind == "double_param":
        p.double_param = _pick(rng, DOUBLES) if rng.random() < 0.8 else float(rng.normal(0, 1e6))
    elif kind == "string_param":
        p.string_param = _pick(rng, STRINGS) if rng.random() < 0.8 else _text(rng, 40)
    elif kind == "bool_param":
        p.bool_param = bool(rng.random() < 0.5)
    else:
        p.uint64_param = int(rng.integers(0, 2**63))


def _fill_contents(t, rng: np.random.Generator) -> None:
    field = _pick(rng, CONTENTS)
    n = int(_pick(rng, [0, 1, 64, 784, int(rng.integers(0, 5000))]))
    c = getattr(t.contents, field)
    if field in ("fp32_contents", "fp64_contents"):
        v = rng.standard_normal(n)
        if n:
            v[0] = _pick(rng, [NAN, INF, 0.0])
        c.extend(v.tolist())
    elif field == "int_contents":
        c.extend(rng.integers(-(2**31), 2**31, n).tolist())
    elif field == "int64_contents":
        c.extend(rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64).tolist())
    elif field == "uint_contents":
        c.extend(rng.integers(0, 2**32, n, dtype=np.uint64).tolist())
    elif field == "uint64_contents":
        c.extend(rng.integers(0, 2**63, n, dtype=np.uint64).tolist())
    elif field == "bool_contents":
        c.extend((rng.random(n) < 0.5).tolist())
    else:
        c.extend(rng.bytes(int(rng.integers(0, 64))) for _ in range(min(n, 500)))


def fuzz_request(rng: np.random.Generator) -> pb.ModelInferRequest:
    """One randomised ModelInferRequest; ~30 % start from a correct one."""
    if rng.random() < 0.3:
        req = valid_request(_pick(rng, ["tiny", "wide"]), rng)
        extra_inputs = int(rng.integers(0, 2))
    else:
        req = pb.ModelInferRequest(model_name=_pick(rng, MODEL_NAMES))
        extra_inputs = int(rng.integers(100, 2000)) if rng.random() < 0.02 else int(rng.integers(5))
    req.model_version = _pick(rng, ["", "", "1", "2", "-1", "v" * 50])
    req.id = _pick(rng, ["", "1", "i" * 5000])
    for _ in range(extra_inputs):
        name = _pick(rng, TENSOR_NAMES) if rng.random() < 0.8 else _text(rng, 30)
        t = req.inputs.add(name=name, datatype=_pick(rng, DTYPES))
        if rng.random() < 0.03:
            t.shape.extend([1] * int(rng.integers(1000, 100_000)))
        else:
            ndim = int(rng.integers(0, 7))
            t.shape.extend(
                _pick(rng, DIMS) if rng.random() < 0.5 else int(rng.integers(-5, 50))
                for _ in range(ndim)
            )
        if rng.random() < 0.3:
            _fill_contents(t, rng)
        if rng.random() < 0.1:
            _set_param(t.parameters[_pick(rng, PARAM_KEYS)], rng)
    for _ in range(int(rng.integers(0, 4))):
        n = int(_pick(rng, [0, 1, 255, 256, 3136, int(rng.integers(0, 65536))]))
        req.raw_input_contents.append(rng.bytes(n))
    if rng.random() < 0.05:
        for _ in range(int(rng.integers(2, 5000))):
            req.outputs.add(name="logits")
    else:
        for _ in range(int(rng.integers(0, 4))):
            o = req.outputs.add(name=_pick(rng, TENSOR_NAMES))
            if rng.random() < 0.1:
                _set_param(o.parameters[_pick(rng, PARAM_KEYS)], rng)
    n_params = int(rng.integers(100, 2000)) if rng.random() < 0.02 else int(rng.integers(0, 5))
    for i in range(n_params):
        key = _pick(rng, PARAM_KEYS) if i < 5 else f"p{i}"
        _set_param(req.parameters[key], rng)
    return req


def garbage(rng: np.random.Generator, valid: bytes) -> bytes:
    """Random bytes, or a correct request with bytes changed, truncated or appended."""
    r = rng.random()
    if r < 0.4:
        return rng.bytes(int(rng.integers(0, 2000)))
    if r < 0.5:
        return rng.bytes(int(rng.integers(2000, 256 * 1024)))
    b = bytearray(valid)
    if r < 0.8:
        for pos in rng.integers(0, len(b), int(rng.integers(1, 16))).tolist():
            b[pos] = int(rng.integers(0, 256))
        return bytes(b)
    if r < 0.9:
        return bytes(b[: int(rng.integers(0, len(b)))])
    return bytes(b) + rng.bytes(int(rng.integers(1, 64)))


def describe(req: pb.ModelInferRequest) -> str:
    def clip(s: str) -> str:
        return repr(s) if len(s) <= 24 else repr(s[:24]) + f"..({len(s)})"

    inputs = [f"{clip(t.name)}:{clip(t.datatype)}:{len(t.shape)}d" for t in req.inputs[:4]]
    params = {k: v.WhichOneof("parameter_choice") for k, v in list(req.parameters.items())[:6]}
    text = (
        f"model={clip(req.model_name)} inputs({len(req.inputs)})={inputs} "
        f"raw={[len(r) for r in req.raw_input_contents]} outputs={len(req.outputs)} "
        f"params({len(req.parameters)})={params}"
    )
    return text[:400]


def hexdump(data: bytes) -> str:
    return f"{len(data)} bytes: {data[:24].hex()}.."


def big_requests() -> dict[str, bytes]:
    """The ~1 MiB shapes, serialized (repeated fields concatenate on the wire)."""
    tiny = valid_request().SerializeToString()
    out: dict[str, bytes] = {}
    r = pb.ModelInferRequest(model_name="tiny")
    r.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    r.raw_input_contents.append(bytes(MIB))
    out["raw 1 MiB, wrong size"] = r.SerializeToString()
    head = pb.ModelInferRequest(model_name="tiny").SerializeToString()
    one = pb.ModelInferRequest()
    t = one.inputs.add(datatype="FP32", shape=[1])
    names = []
    for i in range(40_000):
        t.name = f"in{i:010d}"
        names.append(one.SerializeToString())
    out["40,000 input names"] = head + b"".join(names)
    out["100,000 outputs 'logits'"] = tiny + outputs_logits(100_000)
    r = pb.ModelInferRequest(model_name="tiny")
    r.inputs.add(name="input", datatype="FP32", shape=[1] * 200_000)
    out["200,000 dims"] = r.SerializeToString()
    r = pb.ModelInferRequest(model_name="tiny")
    t = r.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    t.contents.fp32_contents.extend(np.random.default_rng(0).standard_normal(250_000).tolist())
    out["250,000 typed fp32"] = r.SerializeToString()
    r = valid_request()
    for i in range(10_000):
        r.parameters[f"p{i:05d}"].string_param = "v" * 90
    out["10,000 parameters"] = r.SerializeToString()
    return out


def outputs_logits(n: int) -> bytes:
    one = pb.ModelInferRequest()
    one.outputs.add(name="logits")
    return one.SerializeToString() * n


# -- 1. fuzz -------------------------------------------------------------------------------------
def fuzz(server: ServerProcess, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    valid = valid_request().SerializeToString()
    counts: dict[str, Counter] = {"request": Counter(), "garbage": Counter()}
    took_ms: list[float] = []
    examples: list[dict] = []
    lock = threading.Lock()
    slots = threading.Semaphore(FUZZ_IN_FLIGHT)

    def done(fut, kind: str, t0: float, what: Callable[[], str]) -> None:
        try:
            took = time.monotonic() - t0
            code = code_of(fut, took, FUZZ_TIMEOUT_S, "HANG")
            with lock:
                counts[kind][code] += 1
                took_ms.append(took * 1e3)
                if code in FAILURES and len(examples) < 10:
                    exc = fut.exception()
                    details = (exc.details() if exc is not None else "") or ""
                    examples.append({"code": code, "kind": kind, "details": details[:300],
                                     "request": what()})  # fmt: skip
        finally:
            slots.release()

    with grpc.insecure_channel(server.address, options=UNLIMITED) as ch:
        call = ch.unary_unary(INFER)  # bytes in, bytes out
        for _ in range(20):  # warm-up: lazy allocations are not counted as growth
            with contextlib.suppress(grpc.RpcError):
                call(valid, timeout=FUZZ_TIMEOUT_S)
        rss_before = server.rss()
        t_start = time.monotonic()
        sent, stopped_early = 0, False
        for _ in range(n):
            if time.monotonic() - t_start > FUZZ_TIME_LIMIT_S or not server.alive():
                stopped_early = True
                break
            if rng.random() < 0.1:
                data, kind = garbage(rng, valid), "garbage"
                what = functools.partial(hexdump, data)
            else:
                req = fuzz_request(rng)
                data, kind = req.SerializeToString(), "request"
                what = functools.partial(describe, req)
            if not slots.acquire(timeout=FUZZ_TIMEOUT_S + 20):
                stopped_early = True
                break
            t0 = time.monotonic()
            fut = call.future(data, timeout=FUZZ_TIMEOUT_S)
            fut.add_done_callback(functools.partial(done, kind=kind, t0=t0, what=what))
            sent += 1
        drained = all(slots.acquire(timeout=FUZZ_TIMEOUT_S + 20) for _ in range(FUZZ_IN_FLIGHT))
        seconds = time.monotonic() - t_start
    time.sleep(0.5)
    rss_after = server.rss()
    total = counts["request"] + counts["garbage"]
    return {
        "sent": sent,
        "garbage": sum(counts["garbage"].values()),
        "seconds": seconds,
        "requests_per_s": sent / seconds if seconds else 0.0,
        "codes": dict(total.most_common()),
        "codes_by_kind": {k: dict(v.most_common()) for k, v in counts.items()},
        "failures": {f: total.get(f, 0) for f in FAILURES},
        "answer_ms": latency_stats(took_ms),
        "rss_before_mib": rss_before,
        "rss_after_mib": rss_after,
        "rss_growth_mib": rss_after - rss_before,
        "stopped_early": stopped_early,
        "drained": drained,
        "server_alive_after": server.alive(),
        "examples": examples,
    }


# -- 2. big requests while a health probe runs ---------------------------------------------------
def big(server: ServerProcess, repeats: int) -> dict:
    shapes = big_requests()
    huge = valid_request().SerializeToString() + outputs_logits(1_000_000)
    windows: dict[str, tuple[float, float]] = {}
    res: dict = {"shapes": {}}
    with grpc.insecure_channel(server.address, options=UNLIMITED) as ch:
        call = ch.unary_unary(INFER)
        with contextlib.suppress(grpc.RpcError):
            call(valid_request().SerializeToString(), timeout=10)
        with HealthProbe(server.address, 0.005) as probe:
            time.sleep(0.5)
            windows["idle"] = (time.monotonic() - 0.5, time.monotonic())
            for label, data in shapes.items():
                times, codes, details = [], Counter(), ""
                first = time.monotonic()
                while len(times) < BIG_MAX_SENDS and (
                    len(times) < repeats or time.monotonic() - first < BIG_HEALTH_WINDOW_S
                ):
                    if time.monotonic() - first > BIG_SHAPE_LIMIT_S:
                        break
                    code, took, detail = timed_call(call, data, BIG_TIMEOUT_S)
                    times.append(took)
                    codes[code] += 1
                    details = details or detail
                    if len(times) == repeats:
                        windows[label] = (first, time.monotonic())
                    if code == "HANG" or not server.alive():
                        break
                windows.setdefault(label, (first, time.monotonic()))
                windows[f"{label} sustained"] = (first, time.monotonic())
                settle_s = server.settle() if max(times) > 1e3 else 0.0
                print(f"  {label}: {np.median(times[:repeats]):.1f} ms {dict(codes)}",
                      file=sys.stderr, flush=True)  # fmt: skip
                res["shapes"][label] = {
                    "bytes": len(data),
                    "answer_ms": times[:repeats],
                    "median_ms": float(np.median(times[:repeats])),
                    "sends": len(times),
                    "median_all_ms": float(np.median(times)),
                    "codes": dict(codes),
                    "details": details[:300],
                    "settle_s": settle_s,
                }
            mem0 = server.memory()
            with RssSampler(server, 0.005) as sampler:
                t0 = time.monotonic()
                huge_code, huge_ms, huge_detail = timed_call(call, huge, HUGE_TIMEOUT_S)
                windows["huge"] = (t0, time.monotonic())
                time.sleep(0.2)
                huge_settle = server.settle() if huge_ms > 1e3 else 0.0  # peak until it is done
            mem1 = server.memory()
    for label, entry in res["shapes"].items():
        # the goal's figure: the checks that overlapped the ``repeats`` timed sends (if none
        # did, those of the whole window); also those of the whole >= 1 s of sending
        entry["health_sustained"] = probe.during(windows[f"{label} sustained"])
        timed = probe.during(windows[label])
        entry["health"] = timed if timed["n"] else entry["health_sustained"]
    res["health_idle"] = probe.during(windows["idle"])
    res["huge"] = {
        "label": "1,000,000 outputs 'logits'",
        "bytes": len(huge),
        "answer_ms": huge_ms,
        "code": huge_code,
        "details": huge_detail[:300],
        "settle_s": huge_settle,
        "rss_before_mib": mem0.get("VmRSS", float("nan")),
        "rss_max_polled_mib": sampler.max_rss,
        "vmhwm_before_mib": mem0.get("VmHWM", float("nan")),
        "vmhwm_after_mib": mem1.get("VmHWM", float("nan")),
        "health": probe.during(windows["huge"]),
    }
    res["server_alive_after"] = server.alive()
    return res


def timed_call(call, data: bytes, timeout: float) -> tuple[str, float, str]:
    t0 = time.monotonic()
    try:
        call(data, timeout=timeout)
        code, detail = "OK", ""
    except grpc.RpcError as exc:
        code, detail = exc.code().name, exc.details() or ""
    took = time.monotonic() - t0
    if code == "DEADLINE_EXCEEDED" and took >= 0.95 * timeout:
        code = "HANG"
    return code, took * 1e3, detail


# -- 3. open-loop overload -----------------------------------------------------------------------
def capacity(server: ServerProcess, seconds: float = CAPACITY_SECONDS) -> dict:
    data = valid_request("wide", np.random.default_rng(1)).SerializeToString()
    codes: Counter = Counter()
    lock = threading.Lock()
    with grpc.insecure_channel(server.address, options=UNLIMITED) as ch:
        call = ch.unary_unary(INFER)
        for _ in range(20):
            with contextlib.suppress(grpc.RpcError):
                call(data, timeout=10)
        stop_at = time.monotonic() + seconds

        def worker() -> None:
            while time.monotonic() < stop_at:
                code, _, _ = timed_call(call, data, 10.0)
                with lock:
                    codes[code] += 1

        threads = [
            threading.Thread(target=worker, daemon=True) for _ in range(CAPACITY_CONCURRENCY)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 15)
        wall = time.monotonic() - t0
    return {
        "concurrency": CAPACITY_CONCURRENCY,
        "seconds": wall,
        "ok_per_s": codes["OK"] / wall,
        "answers_per_s": sum(codes.values()) / wall,
        "codes": dict(codes),
    }


def overload(server: ServerProcess, seconds: float, seed: int) -> dict:
    cap = capacity(server)
    rate = OVERLOAD_FACTOR * (cap["ok_per_s"] or cap["answers_per_s"] or 25.0)
    rng = np.random.default_rng(seed + 1)
    n_max = min(OVERLOAD_MAX_REQUESTS, int(rate * seconds * 1.5) + 100)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n_max))
    arrivals = arrivals[arrivals < seconds].tolist()
    inputs = [valid_request("wide", rng) for _ in range(16)]  # real data, a few distinct
    for req in inputs:
        req.parameters["latency_budget_ms"].int64_param = 100
    answers: Counter = Counter()
    codes: Counter = Counter()
    took_ms: dict[str, list[float]] = {}
    wrong_id = [0]
    details: dict[str, str] = {}
    server_ms: list[float] = []
    lock = threading.Lock()

    def done(fut, i: int, t0: float) -> None:
        took = time.monotonic() - t0
        code = code_of(fut, took, OVERLOAD_TIMEOUT_S, "CLIENT_TIMEOUT")
        bad, inside_ms = False, None
        if code == "OK":
            try:
                resp = pb.ModelInferResponse.FromString(fut.result())
            except Exception:  # an undecodable answer is still one answer; counted as wrong
                resp = pb.ModelInferResponse(id="<undecodable>")
            bad = resp.id != str(i)
            q, c = resp.parameters.get("queue_us"), resp.parameters.get("compute_us")
            if q is not None and c is not None:
                inside_ms = (q.int64_param + c.int64_param) / 1e3
        with lock:
            if inside_ms is not None:
                server_ms.append(inside_ms)
            if code not in details:
                exc = fut.exception()
                details[code] = "" if exc is None else (exc.details() or "")[:300]
            answers[i] += 1
            codes[code] += 1
            took_ms.setdefault(code, []).append(took * 1e3)
            wrong_id[0] += bad

    sent, max_lag = 0, 0.0
    with grpc.insecure_channel(server.address, options=UNLIMITED) as ch:
        call = ch.unary_unary(INFER)
        with HealthProbe(server.address, 0.020) as probe:
            rss_before = server.rss()
            with RssSampler(server, 0.05) as sampler:
                cpu0 = (server.cpu_seconds(), time.process_time())
                t_start = time.monotonic()
                for i, at in enumerate(arrivals):
                    delay = t_start + at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    else:
                        max_lag = max(max_lag, -delay)
                    req = inputs[i % len(inputs)]
                    req.id = str(i)
                    data = req.SerializeToString()
                    t0 = time.monotonic()
                    fut = call.future(data, timeout=OVERLOAD_TIMEOUT_S)
                    fut.add_done_callback(functools.partial(done, i=i, t0=t0))
                    sent += 1
                send_s = time.monotonic() - t_start
                server_cpu = (server.cpu_seconds() - cpu0[0]) / send_s
                client_cpu = (time.process_time() - cpu0[1]) / send_s
                wait_until = time.monotonic() + OVERLOAD_TIMEOUT_S + 5
                while time.monotonic() < wait_until:
                    with lock:
                        if sum(answers.values()) >= sent:
                            break
                    time.sleep(0.05)
                time.sleep(0.2)
            rss_after = server.rss()
            run_window = (t_start, t_start + send_s)
    with lock:
        missing = sum(1 for i in range(sent) if answers[i] == 0)
        duplicates = sum(c - 1 for c in answers.values() if c > 1)
    exactly_once = (
        missing == 0 and duplicates == 0 and wrong_id[0] == 0 and codes["CLIENT_TIMEOUT"] == 0
    )
    return {
        "capacity": cap,
        "target_per_s": rate,
        "seconds": seconds,
        "sent": sent,
        "send_seconds": send_s,
        "sent_per_s": sent / send_s if send_s else 0.0,
        "max_send_lag_ms": max_lag * 1e3,
        "codes": dict(codes.most_common()),
        "answer_ms": {k: latency_stats(v) for k, v in took_ms.items()},
        "details": details,
        "ok_server_ms": latency_stats(server_ms),
        "server_cpu_cores": server_cpu,
        "client_cpu_cores": client_cpu,
        "missing": missing,
        "duplicates": duplicates,
        "wrong_id": wrong_id[0],
        "client_timeouts": codes["CLIENT_TIMEOUT"],
        "exactly_once": exactly_once,
        "rss_before_mib": rss_before,
        "rss_max_mib": sampler.max_rss,
        "rss_after_mib": rss_after,
        "rss_rise_mib": sampler.max_rss - rss_before,
        "health": probe.during(run_window),
        "server_alive_after": server.alive(),
    }


# -- one tree ------------------------------------------------------------------------------------
def commit_of(tree: Path) -> str:
    try:
        git = ["git", "-C", str(tree)]
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=10)
        head = run([*git, "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run([*git, "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"{head}{'+dirty' if dirty else ''}" if head else "?"


def run_tree(name: str, tree: Path, repo_src: Path, work: Path, args) -> dict:
    repo = work / f"repo-{name}"
    shutil.copytree(repo_src, repo)
    log = work / f"server-{name}.log"
    server = ServerProcess(tree, repo, log)
    res: dict = {"tree": str(tree), "commit": commit_of(tree)}
    phases = {
        "fuzz": lambda: fuzz(server, args.fuzz, args.seed),
        "big": lambda: big(server, args.repeats),
        "overload": lambda: overload(server, args.overload_seconds, args.seed),
    }
    try:
        res["startup_s"] = server.start()
        res["rss_idle_mib"] = server.rss()
        for phase, fn in phases.items():
            if not server.alive():
                res.setdefault("restarted_before", []).append(phase)
                server.start()
            print(f"[{name}] {phase} ...", file=sys.stderr, flush=True)
            settle_s = server.settle()
            t0 = time.monotonic()
            try:
                res[phase] = fn()
            except Exception as exc:  # record and go on with the next phase
                res[phase] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            res[phase]["phase_seconds"] = time.monotonic() - t0
            res[phase]["server_alive_after"] = server.alive()
            res[phase]["settle_before_s"] = settle_s
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"[:4000]
    finally:
        server.stop()
    res["server_starts"] = server.starts
    if res.get("error") or res.get("restarted_before"):
        res["log_tail"] = tail(log)
    res["goals"] = goals(res)
    return res


def goals(r: dict) -> dict[str, bool | None]:
    """Per goal: True met, False not met, None not measured."""
    out: dict[str, bool | None] = {"fuzz": None, "big": None, "overload": None}
    f = r.get("fuzz", {})
    if "failures" in f:
        clean = f["server_alive_after"] and f["drained"] and not f["stopped_early"]
        no_failure = sum(f["failures"].values()) == 0
        out["fuzz"] = clean and no_failure and f["rss_growth_mib"] <= GOAL_FUZZ_RSS_MIB
    b = r.get("big", {})
    if "shapes" in b:
        out["big"] = all(big_ok(s) for s in b["shapes"].values())
    o = r.get("overload", {})
    if "exactly_once" in o:
        bounded = o["rss_rise_mib"] <= GOAL_OVERLOAD_RSS_MIB
        healthy = _health_ok(o["health"], GOAL_OVERLOAD_HEALTH_MS)
        out["overload"] = o["exactly_once"] and bounded and healthy and o["server_alive_after"]
    return out


def big_ok(s: dict) -> bool:
    answered = not any(c in s["codes"] for c in FAILURES)
    fast = s["median_ms"] <= GOAL_BIG_ANSWER_MS
    return answered and fast and _health_ok(s["health"], GOAL_BIG_HEALTH_MS)


# -- report --------------------------------------------------------------------------------------
BIG_LABELS = (
    "raw 1 MiB, wrong size",
    "40,000 input names",
    "100,000 outputs 'logits'",
    "200,000 dims",
    "250,000 typed fp32",
    "10,000 parameters",
)
SHORT = {
    "INVALID_ARGUMENT": "INVALID_ARG",
    "RESOURCE_EXHAUSTED": "EXHAUSTED",
    "DEADLINE_EXCEEDED": "DEADLINE",
    "FAILED_PRECONDITION": "PRECONDITION",
}
Row = Callable[[dict], tuple[str, "bool | None"]]


def _f(v, fmt: str = ".1f") -> str:
    return "n/a" if v is None or v != v else format(v, fmt)


def _health_ok(h: dict, limit_ms: float) -> bool:
    return h.get("n", 0) > 0 and h["p99_ms"] <= limit_ms and h["errors"] == 0


def _fuzz_sent(r: dict):
    f = r["fuzz"]
    return f"{f['sent']} ({f['garbage']}) in {f['seconds']:.0f} s", None


def _fuzz_failures(r: dict):
    f = r["fuzz"]
    fl = f["failures"]
    clean = f["server_alive_after"] and f["drained"] and not f["stopped_early"]
    return f"{fl['INTERNAL']} / {fl['UNKNOWN']} / {fl['HANG']}", clean and not sum(fl.values())


def _fuzz_rss(r: dict):
    f = r["fuzz"]
    g = f["rss_growth_mib"]
    return (
        f"{f['rss_before_mib']:.0f} -> {f['rss_after_mib']:.0f} ({g:+.1f})",
        g <= GOAL_FUZZ_RSS_MIB,
    )


def _big_answer(label: str, r: dict):
    s = r["big"]["shapes"][label]
    codes = ",".join(SHORT.get(c, c) for c in s["codes"])
    answered = not any(c in s["codes"] for c in FAILURES)
    return f"{s['median_ms']:.1f} ms {codes}", answered and s["median_ms"] <= GOAL_BIG_ANSWER_MS


def _big_health(label: str, r: dict):
    s = r["big"]["shapes"][label]
    h, sustained = s["health"], s["health_sustained"]
    text = (
        f"{_f(h.get('p99_ms'))} / {_f(h.get('max_ms'))} ({h['n']}); {_f(sustained.get('p99_ms'))}"
    )
    return text, _health_ok(h, GOAL_BIG_HEALTH_MS)


def _huge_answer(r: dict):
    h = r["big"]["huge"]
    return f"{h['answer_ms']:.0f} ms {SHORT.get(h['code'], h['code'])}", None


def _huge_rss(r: dict):
    h = r["big"]["huge"]
    peak, hwm = _f(h["rss_max_polled_mib"], ".0f"), _f(h["vmhwm_after_mib"], ".0f")
    return f"{h['rss_before_mib']:.0f} / {peak} / {hwm}", None


def _ov_rate(r: dict):
    o = r["overload"]
    return f"{o['target_per_s']:.0f} / {o['sent_per_s']:.0f}", None


def _ov_once(r: dict):
    o = r["overload"]
    text = f"{o['sent']} / {o['missing']} / {o['duplicates']} / {o['client_timeouts']}"
    return text + (f" / wrong id {o['wrong_id']}" if o["wrong_id"] else ""), o["exactly_once"]


def _ov_ok(r: dict):
    o = r["overload"]
    ms = o["answer_ms"].get("OK", {})
    return f"{o['codes'].get('OK', 0)} ({_f(ms.get('p50_ms'))} / {_f(ms.get('p99_ms'))})", None


def _ov_inside(r: dict):
    ms = r["overload"]["ok_server_ms"]
    return f"{_f(ms.get('p50_ms'))} / {_f(ms.get('p99_ms'))} ms", None


def _ov_cpu(r: dict):
    o = r["overload"]
    return f"{o['server_cpu_cores']:.2f} / {o['client_cpu_cores']:.2f}", None


def _ov_other(r: dict):
    other = [f"{SHORT.get(k, k)} {v}" for k, v in r["overload"]["codes"].items() if k != "OK"]
    return ", ".join(other) or "-", None


def _ov_rss(r: dict):
    o = r["overload"]
    rise = o["rss_rise_mib"]
    text = f"{o['rss_before_mib']:.0f} / {o['rss_max_mib']:.0f} ({rise:+.1f})"
    return text, rise <= GOAL_OVERLOAD_RSS_MIB


def _ov_health(r: dict):
    h = r["overload"]["health"]
    text = f"{_f(h.get('p50_ms'))} / {_f(h.get('p99_ms'))} / {_f(h.get('max_ms'))}"
    return text, _health_ok(h, GOAL_OVERLOAD_HEALTH_MS)


def _goal(key: str, r: dict):
    ok = r["goals"][key]
    return ("not measured" if ok is None else "MET" if ok else "NOT MET"), None


def table_rows(sizes: dict[str, int]) -> list[tuple[str, str, Row]]:
    """(label, goal, value) for each line; ``value(tree result)`` -> (text, met or None)."""
    mib = {k: f" ({v / MIB:.{1 if v > 4 * MIB else 2}f} MiB)" for k, v in sizes.items()}
    out: list[tuple[str, str, Row]] = [
        ("commit", "", lambda r: (r["commit"], None)),
        ("server start s", "", lambda r: (f"{r['startup_s']:.1f}", None)),
        ("FUZZ sent (garbage)", "", _fuzz_sent),
        ("  INTERNAL / UNKNOWN / hangs", "0 / 0 / 0", _fuzz_failures),
        ("  RSS before -> after MiB", f"growth <= {GOAL_FUZZ_RSS_MIB:g}", _fuzz_rss),
    ]
    for label in BIG_LABELS:
        out.append((f"BIG {label}{mib.get(label, '')}", f"median <= {GOAL_BIG_ANSWER_MS:g} ms",
                    functools.partial(_big_answer, label)))  # fmt: skip
        out.append(("  health p99 / max (n); sustained p99", f"p99 <= {GOAL_BIG_HEALTH_MS:g} ms",
                    functools.partial(_big_health, label)))  # fmt: skip
    out += [
        (f"HUGE 1M x 'logits'{mib.get('huge', '')}", "", _huge_answer),
        ("  RSS before / peak / VmHWM MiB", "", _huge_rss),
        ("  health max ms during it", "",
         lambda r: (_f(r["big"]["huge"]["health"].get("max_ms")), None)),
        ("OVERLOAD wide capacity (c=4)", "",
         lambda r: (f"{r['overload']['capacity']['ok_per_s']:.0f} OK/s", None)),
        ("  target / achieved send /s", f"{OVERLOAD_FACTOR:g} x capacity", _ov_rate),
        ("  sent / missing / dup / timeout", "exactly once", _ov_once),
        ("  OK answers (p50 / p99 ms)", "", _ov_ok),
        ("  OK in server queue+compute p50/p99", "", _ov_inside),
        ("  CPU cores: server / this client", "", _ov_cpu),
        ("  other answers", "", _ov_other),
        ("  RSS before / max MiB", f"rise <= {GOAL_OVERLOAD_RSS_MIB:g}", _ov_rss),
        ("  health p50 / p99 / max ms", f"p99 <= {GOAL_OVERLOAD_HEALTH_MS:g}", _ov_health),
    ]  # fmt: skip
    out += [(f"GOAL {k}", text, functools.partial(_goal, k)) for k, text in GOALS.items()]
    return out


def _cell(value: Row, r: dict) -> str:
    try:
        text, ok = value(r)
    except (KeyError, TypeError, ValueError):
        return "n/a"
    return text + ("" if ok is None else " [met]" if ok else " [NOT MET]")


def summarise(results: dict) -> str:
    trees = results["trees"]
    names = list(trees)
    sizes: dict[str, int] = {}
    for r in trees.values():
        big_res = r.get("big", {})
        sizes.update({k: v["bytes"] for k, v in big_res.get("shapes", {}).items()})
        if "huge" in big_res:
            sizes["huge"] = big_res["huge"]["bytes"]
    spec = table_rows(sizes)
    cells = [[_cell(value, trees[n]) for n in names] for _, _, value in spec]
    lw = max(len(label) for label, _, _ in spec) + 2
    cw = max(24, *(len(c) + 2 for row in cells for c in row))
    lines = [" " * lw + "".join(f"{n:<{cw}}" for n in names) + "goal"]
    for (label, goal, _), row in zip(spec, cells, strict=True):
        lines.append(f"{label:<{lw}}" + "".join(f"{c:<{cw}}" for c in row) + goal)
    for n in names:
        r = trees[n]
        if "error" in r:
            lines.append(f"\n{n}: {r['error'][:600]}")
        for phase in ("fuzz", "big", "overload"):
            if "error" in r.get(phase, {}):
                lines.append(f"{n} {phase} error: {r[phase]['error'][:300]}")
        if r.get("restarted_before"):
            lines.append(f"{n}: the server died and was restarted before {r['restarted_before']}")
        f = r.get("fuzz", {})
        if "codes" in f:
            lines.append(f"\n{n} fuzz codes: {f['codes']}")
            for ex in f["examples"][:3]:
                detail = ex["details"][:120]
                lines.append(f"  {ex['code']} ({ex['kind']}): {detail!r} <- {ex['request'][:160]}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trees = results["trees"]
    labels = BIG_LABELS
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    xs = np.arange(len(labels))
    w = 0.8 / max(1, len(trees))
    for k, (name, r) in enumerate(trees.items()):
        shapes = r.get("big", {}).get("shapes", {})
        med = [shapes.get(lb, {}).get("median_ms", np.nan) for lb in labels]
        hp = [shapes.get(lb, {}).get("health", {}).get("p99_ms", np.nan) for lb in labels]
        axes[0].bar(xs + k * w, med, w, label=f"{name} ({r.get('commit', '?')})")
        axes[1].bar(xs + k * w, hp, w, label=name)
        o = r.get("overload", {}).get("health", {})
        ov = [o.get(k, np.nan) for k in ("p50_ms", "p99_ms", "max_ms")]
        axes[2].bar(np.arange(3) + k * w, ov, w, label=name)
    titles = (
        (axes[0], GOAL_BIG_ANSWER_MS, "~1 MiB request: median answer ms"),
        (axes[1], GOAL_BIG_HEALTH_MS, "health Check p99 ms while it is sent"),
        (axes[2], GOAL_OVERLOAD_HEALTH_MS, f"overload ({OVERLOAD_FACTOR:g}x capacity): health ms"),
    )
    for ax, goal, title in titles:
        ax.axhline(goal, color="k", linestyle="--", linewidth=1, label="goal")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[:2]:
        ax.set_xticks(xs + w * (len(trees) - 1) / 2)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    axes[2].set_xticks(np.arange(3) + w * (len(trees) - 1) / 2)
    axes[2].set_xticklabels(["p50", "p99", "max"])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--baseline-tree",
        type=Path,
        default=None,
        help="a checkout of an older commit (git worktree add DIR <commit>)",
    )
    p.add_argument("--fuzz", type=int, default=10_000, help="fuzzed requests per tree")
    p.add_argument("--overload-seconds", type=float, default=60.0)
    p.add_argument("--repeats", type=int, default=5, help="sends per big-request shape")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not 0 <= args.fuzz <= 1_000_000:
        p.error("--fuzz must be in [0, 1000000]")
    if not 0 < args.overload_seconds <= 3600:
        p.error("--overload-seconds must be in (0, 3600]")
    if not 1 <= args.repeats <= 100:
        p.error("--repeats must be in [1, 100]")
    trees = trees_to_measure(p, args.baseline_tree, "server/app.py")
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="innfer-hardening-"))
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        from serverutil import build_repository

        repo = build_repository(work / "repo")
        results: dict = {
            "params": {
                "fuzz": args.fuzz,
                "overload_seconds": args.overload_seconds,
                "repeats": args.repeats,
                "seed": args.seed,
                "fuzz_in_flight": FUZZ_IN_FLIGHT,
                "fuzz_timeout_s": FUZZ_TIMEOUT_S,
                "overload_factor": OVERLOAD_FACTOR,
            },
            "goals_text": GOALS,
            "trees": {},
        }
        for name, tree in trees.items():
            results["trees"][name] = run_tree(name, tree, repo, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["wall_seconds"] = time.perf_counter() - t0
    publish(results, args.out, "hardening", plot, summarise(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
