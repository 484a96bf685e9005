"""Triton's own perf_analyzer against innfer, with the flags operators use for Triton.

``perf_analyzer -m MODEL -u HOST:PORT -i grpc`` (no ``-x``), unary and ``--streaming``, must
run, report a client throughput and the server-side breakdown, and that breakdown must agree
with innfer's ModelStatistics over the run within 10 %. perf_analyzer is a C++ binary that
deploy/tools/install-perf-analyzer.sh installs as runs/tools/bin/perf_analyzer (or point
``INNFER_PERF_ANALYZER`` at one); without it these tests skip and say why.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import tritonclient.grpc as tc

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "deploy/tools/install-perf-analyzer.sh"
REL = 0.10  # the tolerance
RUN_TIMEOUT_S = 90  # one bounded perf_analyzer run, generous for a loaded 2-core machine
DURATIONS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


@pytest.fixture(scope="module")
def perf_analyzer() -> str:
    """The perf_analyzer command, or a skip with the reason it cannot be used here."""
    path = os.environ.get("INNFER_PERF_ANALYZER") or str(ROOT / "runs/tools/bin/perf_analyzer")
    if not os.access(path, os.X_OK):
        pytest.skip(
            f"perf_analyzer not found at {path}: run {INSTALL} (or set INNFER_PERF_ANALYZER)"
        )
    try:
        probe = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"perf_analyzer at {path} cannot start: {exc}")
    if probe.returncode != 0:  # e.g. "error while loading shared libraries: libb64.so.0d"
        out = (probe.stderr + probe.stdout).strip().splitlines()
        pytest.skip(f"perf_analyzer at {path} cannot start ({INSTALL} fixes it): {out[:3]}")
    return path


@pytest.fixture(scope="module")
def pa_server(perf_analyzer, model_repository):
    """A dedicated innfer server on 127.0.0.1 (started only when perf_analyzer is usable)."""
    from serverutil import ServerThread

    s = ServerThread({"repository": str(model_repository), "http_port": 0}).start()
    yield s
    s.stop()


def _run(perf_analyzer: str, address: str, args: list[str], protocol: str = "grpc") -> str:
    cmd = [perf_analyzer, "-u", address, "-i", protocol, *args]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} ran past {RUN_TIMEOUT_S} s: {exc.stdout!r}")
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"{' '.join(cmd)} exited {run.returncode}:\n{out}"
    return out


def _parse(out: str) -> dict[str, float]:
    """perf_analyzer's client and server figures (durations in microseconds)."""
    patterns = {
        "client_requests": r"Client:\s+Request count: (\d+)",
        "throughput": r"Throughput: ([\d.]+) infer/sec",
        "inference_count": r"Server:\s+Inference count: (\d+)",
        "execution_count": r"Execution count: (\d+)",
        "success_count": r"Successful request count: (\d+)",
    }
    got = {}
    for key, pattern in patterns.items():
        m = re.search(pattern, out)
        assert m, f"perf_analyzer did not report {key!r}:\n{out}"
        got[key] = float(m.group(1))
    m = re.search(
        r"Avg request latency: (\d+) usec \(overhead (\d+) usec \+ queue (\d+) usec \+ "
        r"compute input (\d+) usec \+ compute infer (\d+) usec \+ compute output (\d+) usec\)",
        out,
    )
    assert m, f"perf_analyzer did not report the server-side breakdown:\n{out}"
    keys = ("success", "overhead", "queue", "compute_input", "compute_infer", "compute_output")
    got.update(zip(keys, map(float, m.groups()), strict=True))
    return got


def _stats(address: str, model: str):
    c = tc.InferenceServerClient(address)
    try:
        return c.get_inference_statistics(model).model_stats[0]
    finally:
        c.close()


def _delta(before, after) -> dict[str, float]:
    """innfer's ModelStatistics over the run: counts, and per-request averages in us."""
    d = {
        "inference_count": after.inference_count - before.inference_count,
        "execution_count": after.execution_count - before.execution_count,
    }
    for field in (*DURATIONS, "fail"):
        a, b = getattr(after.inference_stats, field), getattr(before.inference_stats, field)
        d[f"{field}_count"] = a.count - b.count
        d[field] = (a.ns - b.ns) / max(a.count - b.count, 1) / 1e3
    return d


def _close(a: float, b: float, abs_tol: float = 0.0) -> bool:
    # perf_analyzer prints whole microseconds (truncated): 1 us of slack on durations
    return abs(a - b) <= max(REL * max(abs(a), abs(b)), abs_tol)


def _measured(perf_analyzer, server, model: str, args: list[str], protocol: str = "grpc"):
    """Run perf_analyzer over ``protocol`` (grpc, or http: the REST port); (its parsed
    figures, innfer's statistics delta over the run, both with its output as text for
    assertion messages)."""
    before = _stats(server.address, model)
    address = server.address if protocol == "grpc" else f"127.0.0.1:{server.server.rest.port}"
    out = _run(perf_analyzer, address, args, protocol)
    ours = _delta(before, _stats(server.address, model))
    pa = _parse(out)
    print(f"\n{' '.join(args)}\n  perf_analyzer {pa}\n  innfer        {ours}")
    return pa, ours, f"perf_analyzer {pa}\ninnfer {ours}\n{out}"


@pytest.mark.parametrize(
    ("model", "streaming", "batch", "protocol"),
    [("tiny", False, 1, "grpc"), ("tiny", True, 1, "grpc"), ("wide", False, 2, "grpc"),
     ("wide", True, 2, "grpc"), ("tiny", False, 1, "http"), ("wide", False, 2, "http")],
    ids=["tiny-unary", "tiny-streaming", "wide-unary-b2", "wide-streaming-b2", "tiny-http",
         "wide-http-b2"],
)  # fmt: skip
def test_counts_and_breakdown_agree_with_model_statistics(
    perf_analyzer, pa_server, model, streaming, batch, protocol
):
    """A fixed number of requests (--request-count): perf_analyzer measures exactly the run
    that the ModelStatistics delta covers, so counts and per-request durations compare -
    over gRPC and over REST (``-i http``, its default protocol: the statistics it reads
    there are the REST API's JSON)."""
    requests = 300
    args = ["-m", model, "-b", str(batch), "--concurrency-range", "2"]
    args += ["--request-count", str(requests), *(["--streaming"] if streaming else [])]
    pa, ours, figures = _measured(perf_analyzer, pa_server, model, args, protocol)

    assert pa["throughput"] > 0 and pa["client_requests"] == requests, figures
    assert ours["fail_count"] == 0, figures
    # counts: rows (inference_count), batches run (execution_count), requests answered
    assert _close(pa["inference_count"], requests * batch), figures
    assert _close(pa["success_count"], requests), figures
    for key in ("inference_count", "execution_count", "success_count"):
        assert _close(pa[key], ours[key]), f"{key}: {figures}"
    for field in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert ours[f"{field}_count"] == ours["success_count"], f"{field}: {figures}"
    # per-request durations: perf_analyzer divides the same deltas innfer reports
    for field in DURATIONS:
        assert _close(pa[field], ours[field], abs_tol=1.0), f"{field}: {figures}"


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_time_windows_as_operators_run_it(perf_analyzer, pa_server, streaming):
    """perf_analyzer's default mode (stabilising over time windows), bounded: 1 s windows, at
    most 5, any spread accepted (-s 1000: this machine is shared). Its server figures cover
    the last 3 windows, a part of the run: they must match its own client count and fit in
    innfer's delta over the whole run."""
    model = "tiny"
    args = ["-m", model, "--concurrency-range", "2", "-p", "1000", "-r", "5", "-s", "1000"]
    args += ["--streaming"] if streaming else []
    pa, ours, figures = _measured(perf_analyzer, pa_server, model, args)

    assert pa["throughput"] > 0 and pa["client_requests"] > 0, figures
    assert _close(pa["inference_count"], pa["client_requests"]), figures
    assert _close(pa["success_count"], pa["client_requests"]), figures
    assert pa["inference_count"] <= ours["inference_count"], figures
    assert pa["success_count"] <= ours["success_count"], figures
    assert ours["fail_count"] == 0, figures
    for field in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert 0 <= pa[field] <= pa["success"], f"{field}: {figures}"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("outputs", [False, True], ids=["inputs", "inputs-and-outputs"])
def test_system_shared_memory_as_operators_run_it(perf_analyzer, pa_server, outputs, protocol):
    """``--shared-memory system`` (Triton's flag): perf_analyzer makes /dev/shm regions,
    registers them, sends every request through them, and unregisters them at the end (its
    clean-up unregisters CUDA regions too, and printed an error when that was refused)."""
    model = "tiny"
    args = ["-m", model, "--concurrency-range", "2", "--request-count", "200"]
    args += ["--shared-memory", "system"]
    args += ["--output-shared-memory-size", "40"] if outputs else []
    pa, ours, figures = _measured(perf_analyzer, pa_server, model, args, protocol)

    assert pa["client_requests"] == 200 and ours["success_count"] == 200, figures
    assert ours["fail_count"] == 0, figures
    assert "Unable to unregister" not in figures, figures
    assert pa_server.server.plane.shared_memory.status("") == []  # all unregistered
