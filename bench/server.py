"""Server overhead and throughput on the MLP tiers (784-2048-2048-10), 127.0.0.1.

One client process (this one: tritonclient.grpc for concurrency 1, tritonclient.grpc.aio
with 8 concurrent callers for concurrency 8), each server in its own process, one at a time:
  ort        ONNX Runtime called in-process (the compute floor)
  echo       a trivial OIP servicer on the same gRPC stack (the transport floor)
  minimal    a minimal unbatched OIP servicer running the same engine
  innfer     `innfer serve`, tier pinned to the full tier (same compute as minimal)
server overhead (c=1) = innfer p50 - ort p50 - echo p50.
Writes bench/results/server.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime
from bench.models import mlp
from runtime.build.pipeline import add_model, build_model
from runtime.repository import Repository

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
REPO = ROOT / "runs" / "bench-server"
PORT = 18951


def build_repo() -> None:
    if (REPO / "mlp" / "profile.json").is_file():
        return
    torch.manual_seed(0)
    inn = runtime.convert(mlp().eval(), (torch.randn(1, 1, 28, 28),), permute=False)
    add_model(REPO, "mlp", inn, {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 28, 28]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
        "tiers": [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}],
        "max_batch": 8, "threads": 1, "default_latency_budget_ms": 1000,
    })  # fmt: skip
    build_model(Repository(REPO), "mlp", progress=False)


def x_input(mod):
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    t = mod.InferInput("input", [1, 1, 28, 28], "FP32")
    t.set_data_from_numpy(x)
    return t


def run_c1(params: dict, n: int) -> dict:
    import tritonclient.grpc as tc

    c = tc.InferenceServerClient(f"127.0.0.1:{PORT}")
    t = x_input(tc)
    for _ in range(50):
        c.infer("mlp", [t], parameters=params)
    lat = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        c.infer("mlp", [t], parameters=params)
        lat.append((time.perf_counter() - t0) * 1e3)
    wall = time.perf_counter() - start
    c.close()
    return _stats(lat, wall)


def run_c8(params: dict, n: int) -> dict:
    import tritonclient.grpc.aio as tca

    async def go():
        async with tca.InferenceServerClient(f"127.0.0.1:{PORT}") as c:
            t = x_input(tca)
            lat: list[float] = []

            async def worker(k: int) -> None:
                for _ in range(k):
                    t0 = time.perf_counter()
                    await c.infer("mlp", [t], parameters=params)
                    lat.append((time.perf_counter() - t0) * 1e3)

            await asyncio.gather(*[worker(10) for _ in range(8)])  # warm-up
            lat.clear()
            start = time.perf_counter()
            await asyncio.gather(*[worker(n // 8) for _ in range(8)])
            return _stats(lat, time.perf_counter() - start)

    return asyncio.run(go())


def _stats(lat: list[float], wall: float) -> dict:
    return {"p50_ms": statistics.median(lat), "p99_ms": float(np.percentile(lat, 99)),
            "throughput_per_s": len(lat) / wall, "requests": len(lat)}  # fmt: skip


def with_server(cmd: list[str], ready: str, fn):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = OUT / "server-bench.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        while ready not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text())
            time.sleep(0.1)
        return fn()
    finally:
        proc.terminate()
        proc.wait(30)


def ort_direct(n: int) -> dict:
    served = Repository(REPO).load("mlp")
    engine = served.engines["w100"]
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    for _ in range(50):
        engine.run({"input": x})
    lat = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        engine.run({"input": x})
        lat.append((time.perf_counter() - t0) * 1e3)
    return _stats(lat, time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=800)
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    build_repo()
    n = args.requests
    res: dict = {"ort": {"c1": ort_direct(n)}}
    base = [sys.executable, "bench/server_baselines.py"]
    for kind in ("echo", "minimal"):
        cmd = [*base, kind, str(PORT), str(REPO), "mlp"]
        res[kind] = {"c1": with_server(cmd, "ready", lambda: run_c1({}, n)),
                     "c8": with_server(cmd, "ready", lambda: run_c8({}, n))}  # fmt: skip
    cmd = [sys.executable, "-m", "innfer.cli", "serve", "--repository", str(REPO), "--port",
           str(PORT), "--metrics-port", "0", "--log-level", "WARNING"]  # fmt: skip
    params = {"tier": "w100", "latency_budget_ms": 1000}
    serve_cmd = [*cmd[:-2], "--log-level", "INFO"]
    res["innfer"] = {
        "c1": with_server(serve_cmd, '"msg": "ready:', lambda: run_c1(params, n)),
        "c8": with_server(serve_cmd, '"msg": "ready:', lambda: run_c8(params, n)),
    }
    overhead = (
        res["innfer"]["c1"]["p50_ms"] - res["ort"]["c1"]["p50_ms"] - res["echo"]["c1"]["p50_ms"]
    )
    res["overhead_p50_ms_c1"] = overhead
    res["throughput_ratio_c8_innfer_vs_minimal"] = (
        res["innfer"]["c8"]["throughput_per_s"] / res["minimal"]["c8"]["throughput_per_s"]
    )
    (OUT / "server.json").write_text(json.dumps(res, indent=1))
    cols = ("c1 p50", "c1 p99", "c1 req/s", "c8 p50", "c8 p99", "c8 req/s")
    print(f"{'':<10}" + "".join(f"{c:>10}" for c in cols))
    for k in ("ort", "echo", "minimal", "innfer"):
        c1, c8 = res[k]["c1"], res[k].get("c8")
        line = f"{k:<10}{c1['p50_ms']:>8.3f}m{c1['p99_ms']:>8.3f}m{c1['throughput_per_s']:>10.0f}"
        if c8:
            line += f"{c8['p50_ms']:>8.3f}m{c8['p99_ms']:>8.3f}m{c8['throughput_per_s']:>10.0f}"
        print(line)
    print(
        f"server overhead p50 (c=1): {overhead:.3f} ms; throughput c=8 innfer/minimal: "
        f"{res['throughput_ratio_c8_innfer_vs_minimal']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
