"""Server overhead and throughput on the MLP tiers (784-2048-2048-10), 127.0.0.1.

One client process (this one: tritonclient.grpc for concurrency 1, tritonclient.grpc.aio
with 8 concurrent callers for concurrency 8, pinned to --client-cpus), each server in its own
process pinned to --server-cpus (where the machine has room for both, else neither), one at a
time, --repeats times over with the servers' order rotating from repeat to repeat (the first
on this machine does worse); figures are the median [min-max] over the repeats:
  ort        ONNX Runtime called in-process (the compute floor), on --server-cpus
  echo       a trivial OIP servicer on the same gRPC stack (the transport floor)
  minimal    a minimal unbatched OIP servicer running the same engine
  innfer     `innfer serve`, tier pinned to the full tier (same compute as minimal)
server overhead (c=1) = innfer p50 - ort p50 - echo p50 (per repeat, then the median).
Writes bench/results/server.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime
from bench.hardening import free_ports
from bench.live_scheduler import _cpus, pin_client
from bench.models import mlp
from bench.order import rotated
from bench.peers import on_cpus
from runtime.build.pipeline import add_model, build_model
from runtime.repository import Repository

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
REPO = ROOT / "runs" / "bench-server"
PORT = 0  # a free port, chosen in main(): a fixed one met another's server


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


def with_server(cmd: list[str], ready: str, fn, cpus: set[int] | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = OUT / "server-bench.log"
    taskset = shutil.which("taskset")
    if cpus and taskset:  # pinned from exec on, as bench/live_scheduler.py's LiveServer
        cmd = [taskset, "-c", ",".join(map(str, sorted(cpus))), *cmd]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if cpus and not taskset:
        os.sched_setaffinity(proc.pid, cpus)
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


FIGURES = ("p50_ms", "p99_ms", "throughput_per_s")


def over_repeats(runs: list[dict]) -> dict:
    """One case's runs (``_stats`` each) over the repeats: per figure the median and, with
    more than one run, its [min, max] (``<figure>_range``); the requests summed."""
    out: dict = {"repeats": len(runs), "requests": sum(r["requests"] for r in runs)}
    for k in FIGURES:
        vals = [r[k] for r in runs]
        out[k] = statistics.median(vals)
        if len(vals) > 1:
            out[f"{k}_range"] = [min(vals), max(vals)]
    out["runs"] = runs
    return out


def _fig(c: dict, k: str, fmt: str) -> str:
    rng = c.get(f"{k}_range")
    text = format(c[k], fmt)
    return f"{text} [{format(rng[0], fmt)}-{format(rng[1], fmt)}]" if rng else text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=800)
    p.add_argument("--repeats", type=int, default=3, help="runs per case, servers rotating")
    p.add_argument("--server-cpus", type=_cpus, default={1})
    p.add_argument("--client-cpus", type=_cpus, default={0})
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    global PORT
    PORT = free_ports(1)[0]
    OUT.mkdir(parents=True, exist_ok=True)
    build_repo()
    n = args.requests
    affinity = pin_client(args)
    cpus = args.server_cpus if affinity["pinned"] else None
    base = [sys.executable, "bench/server_baselines.py"]
    cmd = [sys.executable, "-m", "innfer.cli", "serve", "--repository", str(REPO), "--port",
           str(PORT), "--metrics-port", "0", "--log-level", "INFO"]  # fmt: skip
    params = {"tier": "w100", "latency_budget_ms": 1000}
    servers = {
        kind: ([*base, kind, str(PORT), str(REPO), "mlp"], "ready", {})
        for kind in ("echo", "minimal")
    } | {"innfer": (cmd, '"msg": "ready:', params)}
    runs: dict[str, dict[str, list]] = {k: {"c1": [], "c8": []} for k in ("ort", *servers)}
    orders = []
    for r in range(args.repeats):
        order = rotated(["ort", *servers], r)
        orders.append(order)
        for kind in order:
            print(f"repeat {r + 1}: {kind} ...", file=sys.stderr, flush=True)
            if kind == "ort":
                with on_cpus(cpus):  # the compute floor where the servers compute
                    runs["ort"]["c1"].append(ort_direct(n))
                continue
            srv, ready, prm = servers[kind]
            runs[kind]["c1"].append(with_server(srv, ready, lambda prm=prm: run_c1(prm, n), cpus))
            runs[kind]["c8"].append(with_server(srv, ready, lambda prm=prm: run_c8(prm, n), cpus))
    res: dict = {
        k: {c: over_repeats(v) for c, v in per.items() if v} for k, per in runs.items()
    } | {"params": {"requests": n, "repeats": args.repeats}, "affinity": affinity,
         "orders": orders}  # fmt: skip
    each = [
        i["p50_ms"] - o["p50_ms"] - e["p50_ms"]
        for i, o, e in zip(runs["innfer"]["c1"], runs["ort"]["c1"], runs["echo"]["c1"],
                           strict=True)
    ]  # fmt: skip
    overhead = statistics.median(each)
    res["overhead_p50_ms_c1"] = overhead
    res["overhead_p50_ms_c1_per_repeat"] = each
    ratios = [
        i["throughput_per_s"] / m["throughput_per_s"]
        for i, m in zip(runs["innfer"]["c8"], runs["minimal"]["c8"], strict=True)
    ]
    res["throughput_ratio_c8_innfer_vs_minimal"] = statistics.median(ratios)
    res["throughput_ratio_c8_innfer_vs_minimal_per_repeat"] = ratios
    (OUT / "server.json").write_text(json.dumps(res, indent=1))
    print(f"median [min-max] over {args.repeats} repeats; affinity {affinity}")
    for k in ("ort", "echo", "minimal", "innfer"):
        for c, fig in res[k].items():
            print(f"{k:<8} {c}: p50 {_fig(fig, 'p50_ms', '.3f')} ms, p99 "
                  f"{_fig(fig, 'p99_ms', '.3f')} ms, "
                  f"{_fig(fig, 'throughput_per_s', '.0f')} req/s")  # fmt: skip
    print(
        f"server overhead p50 (c=1): {overhead:.3f} ms [{min(each):.3f}-{max(each):.3f}]; "
        f"throughput c=8 innfer/minimal: {res['throughput_ratio_c8_innfer_vs_minimal']:.2f}x "
        f"[{min(ratios):.2f}-{max(ratios):.2f}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
