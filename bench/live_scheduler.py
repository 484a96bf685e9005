"""The scheduler, live: `innfer serve` under closed- and open-loop load, against the simulator
and (optionally) an older tree, all in one run.

Model: the ResNet-18-like CNN (bench/models.py) at width 0.5 (converted to an INN, sampled at
0.5 with channels in multiples of 8, and converted again, so that its full width is the
half-width network), 3x224x224 input, 1,000 classes, untrained random weights (torch seed
--seed); tiers w100/w075/w050/w025 (multiple_of 8); ONNX Runtime, 1 intra-op thread, max
batch 8, max queue 1,000; built with the repository's pipeline (add_model, build_model) into
runs/bench-live/ and reused while its recipe (bench-live.json beside the model) is the same.

Points (each its own fresh server per tree, bounded by --requests and --seconds):
  closed-c{1,8,32}-b30     closed loop, N clients, budget 30 ms each
  closed-c{1,8,32}-u20-100 closed loop, N clients, budgets U(20, 100) ms (seeded)
  open-{1,2,3}x            open loop, Poisson at 1/2/3x the full tier's capacity
                           (max_batch / p50 of w100 at max batch, profile.json), U(20, 100) ms
Per point: sent, answered within budget (client latency <= budget), late, refused (gRPC code,
first message), attainment = within / sent, goodput (within / s), p50 / p99 latency of answered
requests, mean served size (width of the tier that served, over answered requests), tier mix.
closed-c32-b30 also gets the issue's Little's-law bound: w025's best rate (batch 8 / its p50 at
batch 8), and achieved goodput / bound. Each closed-loop point is also run (at most
1,000 requests) against a transport floor, bench/server_baselines.py echo on the server's CPUs:
a grpc.aio servicer that answers at once with an empty response - what any Python gRPC server
attains with these 600 KB requests on this core before it does any work (--no-floor skips
it). Each open-loop point is also run through
sim.simulator.simulate on the same profile, arrivals (trace file) and budgets, and again
(column simL, sim_at_load) on that profile scaled per tier by what the live server planned
with when the point's load began (innfer_tier_latency_factor: its timing at load): a profile
measured on a busier or quieter machine makes the first sim differ from live for reasons that
are not the scheduler's. The engine-only simulator
has no closed-loop mode, so closed-loop points have no simulated figures here; the
shared-core model replays them (`bench/shared_core.py` on this file's points, or `innfer
simulate --clients N --host-ms ...` on one). The server is
pinned to CPU --server-cpus, this process (the load generator) to --client-cpus.

Writes bench/results/live_scheduler.json and live_scheduler.png, the servers' logs to
bench/results/live_scheduler-<tree>.log, and prints a table.

    .venv/bin/python -m bench.live_scheduler [--baseline-tree DIR] [--requests 2000]
        [--seconds 30] [--points closed-c8-*,open-2x] [--seed 0] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hardening import free_ports, tail, trees_to_measure
from bench.publish import publish
from sim.loadgen import run_closed_loop, run_load

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
REPO = ROOT / "runs" / "bench-live"
MODEL = "resnet18w50"
STEM = "live_scheduler"
HOST = "127.0.0.1"

BASE_WIDTH = 0.5
INPUT = [3, 224, 224]
CLASSES = 1000
TIERS = {"w100": 1.0, "w075": 0.75, "w050": 0.5, "w025": 0.25}
MAX_BATCH = 8
THREADS = 1
MULTIPLE_OF = 8
MAX_QUEUE = 1000
PROFILE_REPEATS = 30

FIXED_BUDGET_MS = 30.0
UNIFORM_BUDGET_MS = (20.0, 100.0)
CONCURRENCY = (1, 8, 32)
LOADS = (1.0, 2.0, 3.0)
BOUND_POINT = "closed-c32-b30"
WARMUP_BUDGET_MS = 1000.0
# Each point's first this many requests are reported apart too (--onset-requests): the
# issue's quoted point (8 clients, 30 ms) on a fresh server lost nearly all its misses there
# - about a second of load - and then ran at 99.9 % (session 76).
ONSET_REQUESTS = 300
READY_TIMEOUT_S = 300.0
NO_CLOSED_LOOP_SIM = (
    "sim.simulator.simulate replays open-loop arrival traces only (no closed-loop mode): "
    "closed-loop points are simulated by the shared-core model (bench/shared_core.py, "
    "innfer simulate --clients N --host-ms ...)"
)


# -- the model ------------------------------------------------------------------------------
def recipe(seed: int, backend: str = "onnxruntime") -> dict:
    """What the built repository depends on; another recipe rebuilds it."""
    return {
        "model": "bench.models.ResNet18Like",
        "base_width": BASE_WIDTH,
        "input": INPUT,
        "classes": CLASSES,
        "torch_seed": seed,
        "tiers": TIERS,
        "multiple_of": MULTIPLE_OF,
        "max_batch": MAX_BATCH,
        "threads": THREADS,
        "max_queue": MAX_QUEUE,
        "backend": backend,
        "profile_repeats": PROFILE_REPEATS,
    }


def resnet_inn(seed: int):
    """The issue's model as an INN: ResNet18Like (untrained, ``seed``) sampled at
    ``BASE_WIDTH`` - the served model's full width - and converted again."""
    import torch

    import runtime
    from bench.models import ResNet18Like

    torch.manual_seed(seed)
    x = torch.randn(1, *INPUT)
    full = runtime.convert(ResNet18Like(num_classes=CLASSES).eval(), (x,), permute=False)
    half = full.sample(BASE_WIDTH, multiple_of=MULTIPLE_OF)
    return runtime.convert(half, (x,), permute=False)


def model_yaml(inp: list[int], classes: int, **override) -> dict:
    """model.yaml of the live benchmarks' models (input "input", output "logits", the
    TIERS), with ``override`` keys replaced or added."""
    return {
        "inputs": [{"name": "input", "dtype": "float32", "shape": inp}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [classes]}],
        "tiers": [{"name": k, "width": w} for k, w in TIERS.items()],
        "backends": ["onnxruntime"],
        "max_batch": MAX_BATCH,
        "threads": THREADS,
        "multiple_of": MULTIPLE_OF,
        "max_queue": MAX_QUEUE,
        "default_latency_budget_ms": 100,
        **override,
    }


def repo_root(backend: str = "onnxruntime") -> Path:
    """The benchmark's repository for ``backend``: runs/bench-live (ONNX Runtime), else
    runs/bench-live-<backend> (the torch backend: on CUDA with graphs where a GPU is)."""
    return REPO if backend == "onnxruntime" else REPO.with_name(f"{REPO.name}-{backend}")


def build_repo(seed: int, rebuild: bool = False, backend: str = "onnxruntime") -> tuple[Path, str]:
    """The model directory, built (minutes: export + engines + profile) or reused; and
    "reused" / "built"."""
    root = repo_root(backend)
    model_dir = root / MODEL
    want = recipe(seed, backend)
    record = model_dir / "bench-live.json"
    if (
        not rebuild
        and (model_dir / "profile.json").is_file()
        and record.is_file()
        and json.loads(record.read_text()).get("recipe") == want
    ):
        return model_dir, "reused"
    import torch

    from runtime.build.pipeline import add_model, build_model
    from runtime.repository import Repository

    shutil.rmtree(model_dir, ignore_errors=True)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    add_model(root, MODEL, resnet_inn(seed), model_yaml(INPUT, CLASSES, backends=[backend]))
    build_model(Repository(root), MODEL, backend=backend, repeats=PROFILE_REPEATS)
    record.write_text(json.dumps({"recipe": want, "built_at": time.strftime("%F %T")}))
    return model_dir, "built"


def tier_widths(model_dir: Path) -> dict[str, float]:
    """Tier name -> width fraction (from tier.json; else parsed from a name like "w075")."""
    out = {}
    for name in TIERS:
        try:
            out[name] = float(
                json.loads((model_dir / "tiers" / name / "tier.json").read_text())["width"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            out[name] = int(name[1:]) / 100
    return out


def p50_ms(profile: dict, tier: str, batch: int) -> float:
    return float(profile["tiers"][tier][str(batch)]["p50_ms"])


# -- points ---------------------------------------------------------------------------------
def all_points(concurrency: Sequence[int] = CONCURRENCY) -> list[dict]:
    pts = []
    for c in concurrency:
        pts.append(
            {
                "id": f"closed-c{c}-b30",
                "kind": "closed",
                "concurrency": c,
                "budget": {"fixed_ms": FIXED_BUDGET_MS},
            }
        )
        pts.append(
            {
                "id": f"closed-c{c}-u20-100",
                "kind": "closed",
                "concurrency": c,
                "budget": {"uniform_ms": list(UNIFORM_BUDGET_MS)},
            }
        )
    for load in LOADS:
        pts.append(
            {
                "id": f"open-{load:g}x",
                "kind": "open",
                "load": load,
                "budget": {"uniform_ms": list(UNIFORM_BUDGET_MS)},
            }
        )
    return pts


def select(points: list[dict], spec: str | None) -> list[dict]:
    if not spec:
        return points
    pats = [p.strip() for p in spec.split(",") if p.strip()]
    chosen = [p for p in points if any(fnmatch.fnmatchcase(p["id"], pat) for pat in pats)]
    if not chosen:
        ids = ", ".join(p["id"] for p in points)
        raise SystemExit(f"--points {spec!r} matches none of: {ids}")
    return chosen


def uniform_budgets_s(seed: int, n: int) -> np.ndarray:
    """U(20, 100) ms in seconds, drawn as sim.simulator.simulate draws them (seed + 1)."""
    lo, hi = UNIFORM_BUDGET_MS
    return np.random.default_rng(seed + 1).uniform(lo, hi, n) / 1e3


def closed_budgets_s(point: dict, seed: int, n: int) -> np.ndarray:
    """The budgets (s) of a closed-loop point's ``n`` requests: fixed or U(20, 100) ms."""
    if "fixed_ms" in point["budget"]:
        return np.full(n, FIXED_BUDGET_MS / 1e3)
    return uniform_budgets_s(seed, n)


def open_arrivals(point: dict, capacity: float, seconds: float, requests: int, seed: int):
    """Poisson arrivals (s) at load x capacity for min(seconds, requests / rate) s, at most
    ``requests`` of them, shifted to start at 0."""
    from sim.simulator import SimConfig, make_trace

    rate = point["load"] * capacity
    duration = min(seconds, requests / rate)
    t = make_trace(SimConfig(trace="poisson", duration_s=duration, seed=seed), rate)
    t = t[:requests]
    return t - t[0] if len(t) else t


def open_trace(point: dict, capacity: float, args, work: Path) -> tuple[np.ndarray, Path]:
    """``open_arrivals`` for the run's --seconds, --requests and --seed, also written to a
    trace file (so the simulator replays exactly these arrivals)."""
    t = open_arrivals(point, capacity, args.seconds, args.requests, args.seed)
    path = work / f"trace-{point['id']}-seed{args.seed}.txt"
    path.write_text("".join(f"{float(v)!r}\n" for v in t))  # repr: exact round trip
    return t, path


def simulate_open(
    model_dir: Path,
    point: dict,
    trace: Path,
    arrivals: np.ndarray,
    args,
    factors: dict[str, float] | None = None,
) -> dict:
    """simulate() on the trace file, with the profile, max batch / queue and seed of the
    live point; its budgets are drawn as uniform_budgets_s draws them. ``factors`` (tier ->
    observed / profiled time, the server's ``innfer_tier_latency_factor`` after its timing
    at load) scale each tier's stored latencies: the profile the live server planned with."""
    from runtime.repository import Repository
    from runtime.repository.config import ModelConfig
    from server.scheduling.latency import tiers_from_profile
    from sim.simulator import SimConfig, simulate

    records, stored, _ = Repository(model_dir.parent).served_tiers(model_dir.name)
    tiers, p50 = tiers_from_profile(scaled_profile(stored, factors or {}), records)
    span = float(arrivals[-1]) if len(arrivals) > 1 else 1.0
    kw = {
        "policy": "innfer",
        "trace": "file",
        "trace_file": str(trace),
        "load": point["load"],
        "duration_s": max(span, 1e-3),
        "budget_ms": UNIFORM_BUDGET_MS,
        "seed": args.seed,
        "max_queue": MAX_QUEUE,
        "max_batch": MAX_BATCH,
    }
    slo_target = getattr(ModelConfig.load(model_dir / "model.yaml"), "slo_target", None)
    if slo_target is not None:  # the model's own, as the server plans with it
        kw["slo_target"] = slo_target
    known = {f.name for f in fields(SimConfig)}
    cfg = SimConfig(**{k: v for k, v in kw.items() if k in known})
    r = simulate(tiers, p50, cfg)
    s = dict(r.summary)
    widths = tier_widths(model_dir)
    mix = s.get("tier_mix") or {}
    served = sum(mix.values())
    s["mean_served_size"] = sum(widths[k] * v for k, v in mix.items()) / served if served else None
    s["config"] = {k: v for k, v in kw.items() if k in known}
    s["same_arrivals_as_live"] = bool(
        len(r.arrivals) == len(arrivals) and np.array_equal(r.arrivals, arrivals)
    )
    return s


def sims_at_load(model_dir: Path, pt: dict, files: dict, traces: dict, row: dict, args):
    """Per tree, the open-loop point simulated on the profile its server planned with when
    the load began (stored latencies x ``tier_factors_before``): the stored profile may
    have been measured on a busier or quieter machine than the server's timing at load,
    and the parity goal is about the scheduler, not about a stale file."""
    out = {}
    for tree, s in row["live"].items():
        factors = s.get("tier_factors_before")
        if factors:
            sim = simulate_open(model_dir, pt, files[pt["id"]], traces[pt["id"]], args, factors)
            out[tree] = {**sim, "tier_factors": factors}
    return out


def scaled_profile(profile: dict, factors: dict[str, float]) -> dict:
    """``profile`` with every latency of tier t (keys ending in _ms) times factors[t]."""
    out = copy.deepcopy(profile)
    for tier, factor in factors.items():
        for row in out["tiers"].get(tier, {}).values():
            for key in [k for k in row if k.endswith("_ms")]:
                row[key] *= factor
    return out


def tier_factors(metrics_url: str) -> dict[str, float]:
    """The server's ``innfer_tier_latency_factor`` per tier of MODEL now (observed /
    profiled batch time; {} when the server exports none)."""
    out = {}
    for sample in scrape(metrics_url):
        if sample.name == "innfer_tier_latency_factor" and sample.labels.get("model") == MODEL:
            out[sample.labels["tier"]] = float(sample.value)
    return out


def scrape(metrics_url: str) -> list:
    """Every sample the server's /metrics page shows now."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


# -- the server under test ------------------------------------------------------------------
class LiveServer:
    """`innfer serve` of one tree (cwd = PYTHONPATH = the tree) on free loopback ports,
    pinned to ``cpus`` (``taskset -c``; else os.sched_setaffinity on the child's pid)."""

    def __init__(self, name: str, tree: Path, repo: Path, log: Path, cpus: set[int] | None):
        self.name, self.tree, self.repo, self.log, self.cpus = name, tree, repo, log, cpus
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.metrics_url = ""

    def start(self, label: str, models: tuple[str, ...] = (MODEL,), extra=()) -> dict:
        """Serve the repository (``extra``: more `innfer serve` flags); ready once every one
        of ``models`` is."""
        port, mport = free_ports(2)
        self.metrics_url = f"http://{HOST}:{mport}/metrics"
        args = ["--repository", str(self.repo), "--host", HOST, "--port", str(port),
                "--metrics-port", str(mport), *extra]  # fmt: skip
        return self._launch(label, args, port, models)

    def _launch(self, label: str, cli: list[str], port: int, models) -> dict:
        """Start ``innfer serve <cli>`` from the tree, pinned, and wait until every one of
        ``models`` is ready; returns the start-up time and the server's CPUs."""

        self.address = f"{HOST}:{port}"
        cmd = [sys.executable, "-m", "innfer.cli", "serve", *cli]
        env = {
            **os.environ,
            "PYTHONPATH": str(self.tree),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(THREADS),
        }
        taskset = shutil.which("taskset")
        if self.cpus and taskset:  # pinned from exec on, before any thread exists
            cmd = [taskset, "-c", ",".join(map(str, sorted(self.cpus))), *cmd]
        with open(self.log, "a") as log:
            log.write(f"\n===== {label}: {' '.join(cmd)}\n")
            log.flush()
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                cmd, cwd=self.tree, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        if self.cpus and not taskset:  # the interpreter starts no thread before its imports
            os.sched_setaffinity(self.proc.pid, self.cpus)
        waiting = set(models)

        def ready(client) -> bool:
            for m in sorted(waiting):
                if client.is_model_ready(m):
                    waiting.discard(m)
            return not waiting

        return wait_ready(self.proc, self.log, self.address, ready, t0, f"models {sorted(models)}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -- the transport floor -------------------------------------------------------------------
FLOOR_REQUESTS = 1000  # per closed-loop point; the floor settles within a few hundred


def transport_floor(point: dict, inputs, args, log: Path, cpus: set[int] | None) -> dict:
    """The point's closed loop against bench/server_baselines.py ``echo`` - a grpc.aio
    ModelInfer servicer that answers at once with an empty response (no decode, no model) -
    on the server's CPUs: what any Python gRPC server attains with these requests on this
    core before it does any work. Its CPU per request is read from /proc (utime + stime)."""
    port = free_ports(1)[0]
    script = Path(__file__).resolve().parent / "server_baselines.py"
    cmd = [sys.executable, str(script), "echo", str(port), "-", "-"]
    taskset = shutil.which("taskset")
    if cpus and taskset:
        cmd = [taskset, "-c", ",".join(map(str, sorted(cpus))), *cmd]
    address = f"{HOST}:{port}"
    with open(log, "a") as out:
        out.write(f"\n===== floor {point['id']}: {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_ready(proc, log, address, lambda c: c.is_server_live(), time.monotonic(), "echo")
        n = min(args.requests, FLOOR_REQUESTS)
        budgets = closed_budgets_s(point, args.seed, n)
        cpu0 = process_cpu_s(proc.pid)
        report = asyncio.run(
            run_closed_loop(
                address, MODEL, point["concurrency"], n, args.seconds, lambda i: budgets[i], inputs
            )
        )
        cpu = process_cpu_s(proc.pid) - cpu0
        s = report.summary
        keep = ("sent", "within_budget", "late", "refused_total", "slo_attainment",
                "p50_latency_ms", "p99_latency_ms", "goodput_per_s", "wall_seconds")  # fmt: skip
        out = {k: s.get(k) for k in keep}
        out["cpu_ms_per_request"] = 1e3 * cpu / s["sent"] if s["sent"] else None
        out["server"] = "bench/server_baselines.py echo (grpc.aio, empty answer)"
        return out
    except Exception as exc:  # the point's own figures stand without it
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far, from /proc/PID/stat."""
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


# The server's CPU account, from its Prometheus metrics: the process's CPU, and the engine
# threads' CPU and wall time while running batches (all models). Older trees export fewer.
CPU_METRICS = {
    "process_s": "process_cpu_seconds_total",
    "engine_cpu_s": "innfer_compute_cpu_seconds_total",
    "engine_wall_s": "innfer_compute_seconds_total",
    "batches": "innfer_batch_size_count",  # batches run (a histogram's count, every tier)
    "saturated": "innfer_saturated_batches_total",  # of them run throughput first
}
# Gauges read at a point's end (not differenced): the server's own estimates, seconds.
GAUGE_METRICS = {
    "host_per_row": "innfer_host_cpu_per_row_seconds",
    "host_per_batch": "innfer_host_cpu_per_batch_seconds",
}


def cpu_account(metrics_url: str) -> dict[str, float]:
    """The ``CPU_METRICS`` sums and ``GAUGE_METRICS`` now (seconds, a count of batches; a
    metric the server lacks is left out)."""
    key_of = {metric: key for key, metric in {**CPU_METRICS, **GAUGE_METRICS}.items()}
    out: dict[str, float] = {}
    for sample in scrape(metrics_url):
        key = key_of.get(sample.name)
        if key is not None:
            out[key] = out.get(key, 0.0) + sample.value
    return out


def cpu_per_request(before: dict, after: dict, sent: int) -> dict | None:
    """Milliseconds of server CPU per request sent (answered or refused) during a point:
    the process's, the engine's (thread CPU while running batches) and the rest - request
    handling (gRPC, parsing, admission, answering), what ``sim.shared_core`` calls the host
    cost - plus the engine's wall / CPU ratio (above 1: it waited for the core), the batches
    run per request, and the server's own estimates at the point's end (its gauges, ms): the
    loop's CPU per batch (deciding, launching, settling; part of ``host_ms``) and the
    handling's CPU per row."""
    if not sent or "process_s" not in after or "engine_cpu_s" not in after:
        return None
    d = {k: after[k] - before.get(k, 0.0) for k in CPU_METRICS if k in after}
    out = {
        "process_ms": 1e3 * d["process_s"] / sent,
        "engine_ms": 1e3 * d["engine_cpu_s"] / sent,
        "host_ms": 1e3 * (d["process_s"] - d["engine_cpu_s"]) / sent,
    }
    if d["engine_cpu_s"] > 0 and "engine_wall_s" in d:
        out["engine_wall_over_cpu"] = d["engine_wall_s"] / d["engine_cpu_s"]
    if "batches" in d:
        out["batches_per_request"] = d["batches"] / sent
    if "saturated" in d:
        out["saturated_batches"] = d["saturated"]
    for key in GAUGE_METRICS:
        if key in after:
            out[f"{key}_ms"] = 1e3 * after[key]
    return out


def wait_ready(proc, log: Path, address: str, ready, t0: float, what: str) -> dict:
    """Poll ``ready(client)`` (a tritonclient.grpc client of ``address``) until it is true;
    raise with the log's tail if ``proc`` exits or ``READY_TIMEOUT_S`` passes. Returns the
    start-up time (from ``t0``, monotonic) and the CPUs the server may run on."""
    import tritonclient.grpc as tc

    with tc.InferenceServerClient(address) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: server exited ({proc.returncode}):\n{tail(log)}")
            if time.monotonic() - t0 > READY_TIMEOUT_S:
                raise RuntimeError(f"{what} not ready after {READY_TIMEOUT_S:.0f} s:\n{tail(log)}")
            with contextlib.suppress(Exception):  # not listening yet
                if ready(client):
                    break
            time.sleep(0.2)
    try:
        affinity = sorted(os.sched_getaffinity(proc.pid))
    except OSError:
        affinity = None
    return {"startup_s": time.monotonic() - t0, "server_cpus": affinity}


def arm_order(order: list[str], repeat: int, index: int) -> list[str]:
    """The trees in the order they run at point ``index`` of repeat ``repeat``: which goes
    first alternates at each point across its repeats (and between neighbouring points),
    so drift on this shared machine hits both. By the row's place alone, an even number of
    points put the same tree first at a point in every repeat (review helper-130).

    Example:
        >>> [arm_order(["new", "old"], r, 0)[0] for r in range(3)]
        ['new', 'old', 'new']
    """
    return order if (repeat + index) % 2 == 0 else order[::-1]


# The packages a served tree's code lives in (a new, un-added file there changes the run).
SOURCE_DIRS = ("server", "runtime", "sim", "innfer", "proto")


def commit_of(tree: Path) -> str:
    """HEAD of ``tree`` (+dirty: a change to a tracked file, or a new source file in the
    packages a server runs - results and logs beside them do not count), read without
    taking git's index lock (the tree may be in use: GIT_OPTIONAL_LOCKS=0)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tree), *cmd], capture_output=True, text=True, timeout=10, env=env
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no") or git(
            "status", "--porcelain", "--", *SOURCE_DIRS
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"{head}{'+dirty' if dirty else ''}" if head else "?"


# -- one point on one tree ------------------------------------------------------------------
def serve_args(args, tree: str) -> list[str]:
    """The extra `innfer serve` flags of ``tree``'s servers: --baseline-serve-args for the
    baseline where given (two configurations of one tree), else --serve-args."""
    if tree == "baseline" and args.baseline_serve_args is not None:
        return args.baseline_serve_args
    return args.serve_args


def live_point(server: LiveServer, point: dict, inputs, widths, trace, args) -> dict:
    try:
        info = server.start(point["id"], extra=serve_args(args, server.name))
        if args.warmup:  # not recorded: the first batches of each size pay ORT's allocations
            asyncio.run(
                run_closed_loop(
                    server.address,
                    MODEL,
                    min(8, args.warmup),
                    args.warmup,
                    30.0,
                    lambda i: WARMUP_BUDGET_MS / 1e3,
                    inputs,
                )
            )
        load_before = os.getloadavg()[0]
        cpu_before = cpu_account(server.metrics_url)
        factors = tier_factors(server.metrics_url)  # its timing at load, then the warm-up
        if point["kind"] == "closed":
            budgets = closed_budgets_s(point, args.seed, args.requests)
            report = asyncio.run(
                run_closed_loop(
                    server.address,
                    MODEL,
                    point["concurrency"],
                    args.requests,
                    args.seconds,
                    lambda i: budgets[i],
                    inputs,
                    deadline=args.client_deadline,
                )
            )
        else:
            arrivals = trace
            budgets = uniform_budgets_s(args.seed, len(arrivals))
            report = asyncio.run(
                run_load(
                    server.address,
                    MODEL,
                    arrivals,
                    budgets,
                    inputs,
                    max_seconds=args.seconds + 5,
                    deadline=args.client_deadline,
                )
            )
        s = dict(report.summary)
        served = [t for t in report.tiers if t]
        s["mean_served_size"] = (
            float(np.mean([widths.get(t, np.nan) for t in served])) if served else None
        )
        s["tier_counts"] = {t: served.count(t) for t in sorted(set(served))}
        s["server_breakdown"] = report.breakdown()
        s["onset"] = report.onset(args.onset_requests) if args.onset_requests else None
        try:
            cpu_after = cpu_account(server.metrics_url)
        except OSError as exc:  # the figures above stand without it
            cpu_after, s["server_cpu_error"] = {}, f"{type(exc).__name__}: {exc}"
        s["server_cpu"] = cpu_per_request(cpu_before, cpu_after, s["sent"])
        s["loadavg_1m_before"] = load_before
        s["loadavg_1m_after"] = os.getloadavg()[0]
        s["server_alive_after"] = server.proc.poll() is None
        s["tier_factors_before"] = factors
        return {**info, **s}
    finally:
        server.stop()


def core_demand(point: dict, s: dict, rate_per_s: float | None) -> dict | None:
    """What the point asks of the server's core at the CPU per request this run measured
    (``server_cpu.process_ms``: engine and request handling together): open loop, the
    offered rate's share of one core (above ~0.9 a backlog builds outside the server);
    closed loop, the shortest mean latency N clients can see (Little: N x CPU per request,
    the core never idle) - above the budget, no schedule meets it on average."""
    cpu = s.get("server_cpu")
    if not cpu or cpu["process_ms"] <= 0:  # (process CPU moves in 10 ms ticks)
        return None
    per_ms = cpu["process_ms"]
    out = {"cpu_ms_per_request": per_ms, "capacity_per_s": 1e3 / per_ms}
    if point["kind"] == "open" and rate_per_s:
        out["core_share_offered"] = rate_per_s * per_ms / 1e3
    elif point["kind"] == "closed":
        out["min_mean_latency_ms"] = point["concurrency"] * per_ms
    return out


def floor_line(f: dict) -> str:
    if "error" in f:
        return f"transport floor (echo): {f['error'][:90]}"
    cpu = f.get("cpu_ms_per_request")
    return (
        f"transport floor (echo server, answers at once): {_pct(f['slo_attainment'])} within "
        f"budget, p50 {_num(f['p50_latency_ms'])} ms, p99 {_num(f['p99_latency_ms'])} ms, "
        f"server CPU {_num(cpu, '.2f')} ms/request ({f['sent']} sent)"
    )


def onset_line(o: dict) -> str:
    first, rest = o["first"], o["rest"]
    return (
        f"first {o['first_requests']} requests {_pct(first['slo_attainment'])} within budget "
        f"(late {first['late']}, refused {first['refused']}); the other {rest['requests']} "
        f"{_pct(rest['slo_attainment'])} (late {rest['late']}, refused {rest['refused']})"
    )


def core_line(c: dict) -> str:
    text = f"server CPU {c['cpu_ms_per_request']:.2f} ms/request -> {c['capacity_per_s']:.0f}/s"
    if "core_share_offered" in c:
        text += f"; the offered load needs {c['core_share_offered']:.2f} of the core"
    if "min_mean_latency_ms" in c:
        text += f"; mean latency >= {c['min_mean_latency_ms']:.1f} ms (Little)"
    return text


def littles_law(profile: dict, live: dict) -> dict:
    """The issue's bound for closed-c32-b30: w025's best rate, batch 8 / p50(w025, 8)."""
    small = min(TIERS, key=TIERS.get)
    lat = p50_ms(profile, small, MAX_BATCH)
    bound = MAX_BATCH / (lat / 1e3)
    out = {
        "tier": small,
        "batch": MAX_BATCH,
        "p50_ms_at_batch": lat,
        "fits_budget": lat <= FIXED_BUDGET_MS,
        "bound_per_s": bound,
        "note": "best within-budget goodput the smallest tier can give: batch 8 / its p50 "
        "at batch 8 (profile.json); achieved = live within-budget goodput. The engine's time "
        "only: min_mean_latency_ms_with_request_handling is Little's bound with the CPU per "
        "request this run measured on the server's core (engine and request handling)",
    }
    for tree, s in live.items():
        if "goodput_per_s" in s:
            out[tree] = {
                "achieved_per_s": s["goodput_per_s"],
                "achieved_over_bound": s["goodput_per_s"] / bound,
            }
            if s.get("core") and "min_mean_latency_ms" in s["core"]:
                out[tree]["min_mean_latency_ms_with_request_handling"] = s["core"][
                    "min_mean_latency_ms"
                ]
    return out


def littles_law_rows(points: list[dict]) -> list[dict]:
    """Every row's Little's-law figures (BOUND_POINT's rows: one per repeat), each with its
    repeat - not the last repeat's alone."""
    return [{"repeat": r.get("repeat", 0), **r["littles_law"]} for r in points
            if "littles_law" in r]  # fmt: skip


# -- output ---------------------------------------------------------------------------------
def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _num(v, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def summarise(results: dict) -> str:
    head = (
        f"{'point':<20}{'tree':<10}{'sent':>6}{'ok':>6}{'late':>6}{'ref':>6}"
        f"{'attain':>8}{'sim':>8}{'simL':>8}{'good/s':>8}{'p50ms':>7}{'p99ms':>7}"
        f"{'size':>6}{'simsz':>6}{'simLsz':>7}  tiers (answered)"
    )
    lines = [head, "-" * len(head)]
    for p in results["points"]:
        sim = p.get("sim") or {}
        for tree, s in p["live"].items():
            if "error" in s:
                lines.append(f"{p['id']:<20}{tree:<10}  error: {s['error'][:80]}")
                continue
            mix = " ".join(f"{k}:{v:.0%}" for k, v in s["tier_mix"].items())
            at_load = (p.get("sim_at_load") or {}).get(tree) or {}
            lines.append(
                f"{p['id']:<20}{tree:<10}{s['sent']:>6}{s['within_budget']:>6}{s['late']:>6}"
                f"{s['refused_total']:>6}{_pct(s['slo_attainment']):>8}"
                f"{_pct(sim.get('slo_attainment')):>8}{_pct(at_load.get('slo_attainment')):>8}"
                f"{s['goodput_per_s']:>8.1f}"
                f"{_num(s['p50_latency_ms']):>7}{_num(s['p99_latency_ms']):>7}"
                f"{_num(s['mean_served_size'], '.3f'):>6}"
                f"{_num(sim.get('mean_served_size'), '.3f'):>6}"
                f"{_num(at_load.get('mean_served_size'), '.3f'):>7}  {mix}"
            )
            if s["refused_total"]:
                lines.append(
                    f"{'':<30}refused {s['refused']}; first: {(s['first_error'] or '')[:100]}"
                )
            if s.get("core"):
                lines.append(f"{'':<30}{core_line(s['core'])}")
            if s.get("onset"):
                lines.append(f"{'':<30}{onset_line(s['onset'])}")
        floor = p.get("transport_floor")
        if floor:
            lines.append(f"{'':<30}{floor_line(floor)}")
    lls = results.get("littles_law") or []
    if isinstance(lls, dict):  # a results file from before the per-repeat list
        lls = [lls]
    for ll in lls:
        lines.append(
            f"\nLittle's-law bound ({BOUND_POINT}, repeat {ll.get('repeat', 0)}): {ll['tier']} "
            f"at batch {ll['batch']}, p50 {ll['p50_ms_at_batch']:.1f} ms -> "
            f"{ll['bound_per_s']:.1f}/s"
        )
        for tree in results["trees"]:
            if tree in ll:
                with_host = ll[tree].get("min_mean_latency_ms_with_request_handling")
                lines.append(
                    f"  {tree}: {ll[tree]['achieved_per_s']:.1f}/s = "
                    f"{ll[tree]['achieved_over_bound']:.1%} of the bound"
                    + (
                        f" (with request handling on the core: mean latency >= "
                        f"{with_host:.0f} ms at 32 clients)"
                        if with_host
                        else ""
                    )
                )
    c = results["config"]
    lines.append(
        f"\ncapacity (w100, batch {MAX_BATCH}) {c['capacity_per_s']:.1f}/s; "
        f"affinity {results['affinity']}"
    )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = results["points"]
    ids = [p["id"] for p in pts]
    series = [(f"live {t}", lambda p, t=t: p["live"].get(t, {})) for t in results["trees"]]
    series.append(("simulated", lambda p: p.get("sim") or {}))
    fig, ax = plt.subplots(2, 1, figsize=(max(7.0, 1.1 * len(ids) + 2), 6.5), sharex=True)
    x = np.arange(len(ids))
    w = 0.8 / len(series)
    for k, (label, get) in enumerate(series):
        att = [get(p).get("slo_attainment") for p in pts]
        size = [get(p).get("mean_served_size") for p in pts]
        off = x - 0.4 + w * (k + 0.5)
        ax[0].bar(off, [np.nan if v is None else v for v in att], w, label=label)
        ax[1].bar(off, [np.nan if v is None else v for v in size], w, label=label)
    ax[0].set_ylabel("attainment (within budget / sent)")
    ax[0].set_ylim(0, 1.05)
    ax[1].set_ylabel("mean served size (width)")
    ax[1].set_ylim(0, 1.05)
    ax[1].set_xticks(x, ids, rotation=30, ha="right", fontsize=8)
    ax[0].legend(fontsize=8, ncol=len(series))
    ax[0].set_title(
        f"{MODEL}: live vs simulated (simulator: open loop only), "
        f"{results['params']['requests']} req / {results['params']['seconds']:g} s "
        "per point",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------
def common_args(
    p: argparse.ArgumentParser, requests: int, requests_help: str, example: str,
    concurrency: bool = True,
):  # fmt: skip
    """The flags every live benchmark takes (bench/multi_model.py too); ``concurrency``:
    with ``--concurrency`` as a list of client counts (bench/text_serving.py has one count
    of its own - both made it fail at its first line, review helper-305)."""
    p.add_argument("--requests", type=int, default=requests, help=requests_help)
    p.add_argument("--seconds", type=float, default=30.0, help="at most this long per point")
    p.add_argument("--points", help=f"comma-separated point ids or patterns ({example})")
    p.add_argument("--seed", type=int, default=0, help="weights, traces and budgets")
    if concurrency:
        p.add_argument(
            "--concurrency", type=client_counts, default=CONCURRENCY,
            help="closed-loop client counts (default the issue's 1,8,32; e.g. 8,12,16 for "
            "where the core runs out)",
        )  # fmt: skip
    p.add_argument("--warmup", type=int, default=16, help="unrecorded requests per server")
    p.add_argument("--server-cpus", type=_cpus, default={1})
    p.add_argument("--client-cpus", type=_cpus, default={0})
    p.add_argument("--rebuild", action="store_true", help="build the model(s) again")
    p.add_argument("--out", type=Path, default=OUT)


def check_common(p: argparse.ArgumentParser, args) -> None:
    if not 1 <= args.requests <= 1_000_000:
        p.error("--requests must be in [1, 1000000]")
    if not 0 < args.seconds <= 3600:
        p.error("--seconds must be in (0, 3600]")
    if not 0 <= args.warmup <= 1000:
        p.error("--warmup must be in [0, 1000]")


def pin_client(args) -> dict:
    """Pin this process (the load generator) to ``--client-cpus`` when the machine has room
    for both sides; the servers pin themselves to ``--server-cpus``. Returns what was done."""
    usable = os.sched_getaffinity(0)
    pinned = len(usable) >= 2 and args.server_cpus <= usable and args.client_cpus <= usable
    affinity = {
        "pinned": pinned,
        "method": (
            "server: taskset -c" if shutil.which("taskset") else "server: os.sched_setaffinity"
        )
        + "; load generator: os.sched_setaffinity",
        "server_cpus": sorted(args.server_cpus) if pinned else None,
        "client_cpus": sorted(args.client_cpus) if pinned else None,
        "cpus_available": sorted(usable),
        "os_cpu_count": os.cpu_count(),
    }
    if pinned:
        os.sched_setaffinity(0, args.client_cpus)
    else:
        affinity["why_not"] = "fewer than 2 usable CPUs or the asked CPUs are not usable"
    return affinity


def copy_per_tree(model_dir: Path, trees, work: Path, stem: str = "repo") -> dict[str, Path]:
    """A repository per tree (``work/<stem>-<tree>``) holding a copy of ``model_dir``: each
    tree's server serves its own, so that one tree's caches (an older tree may rebuild or
    rewrite them) are not what the other loads. Returns tree name -> repository."""
    repos = {}
    for name in trees:
        repos[name] = work / f"{stem}-{name}"
        shutil.rmtree(repos[name], ignore_errors=True)
        shutil.copytree(model_dir, repos[name] / model_dir.name)
    return repos


def client_counts(text: str) -> list[int]:
    """``8,12,16`` -> [8, 12, 16]: distinct closed-loop client counts >= 1, ascending (the
    point ids name them; a repeat would be a duplicate id)."""
    try:
        counts = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"client counts >= 1 like 8,12,16, got {text!r}")
    return counts


def _cpus(text: str) -> set[int]:
    try:
        return {int(c) for c in text.split(",") if c.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"CPU list like 0 or 0,1, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--baseline-tree",
        type=Path,
        default=None,
        help="a checkout of an older commit (git worktree add DIR <commit>)",
    )
    common_args(p, 2000, "at most this many per point", "closed-c8-*")
    p.add_argument(
        "--client-deadline",
        action="store_true",
        help="clients also send each budget as the gRPC deadline (tritonclient client_timeout)",
    )
    p.add_argument(
        "--serve-args",
        type=shlex.split,
        default=[],
        help="extra `innfer serve` flags for every server, e.g. '--budget-margin-ms 3'",
    )
    p.add_argument(
        "--baseline-serve-args",
        type=shlex.split,
        default=None,
        help="the baseline's flags instead (compare two configurations: --baseline-tree "
        "a checkout of the same commit, e.g. --serve-args '--engine-nice 4' "
        "--baseline-serve-args '')",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the selected points this many times over (each a row of its own, with "
        "the same arrivals); the tree that goes first alternates from row to row, also for "
        "one point: on this machine the first arm of an A/A pair did worse",
    )
    p.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the transport floor: each closed-loop point against an echo server "
        "that answers at once (bench/server_baselines.py echo) on the server's CPUs",
    )
    p.add_argument(
        "--backend",
        choices=("onnxruntime", "torch"),
        default="onnxruntime",
        help="the engines: ONNX Runtime on the CPU (the issue's setup), or torch - on an "
        "NVIDIA GPU with CUDA graphs where one is (repository runs/bench-live-torch, "
        "results live_scheduler_torch.*)",
    )
    p.add_argument(
        "--onset-requests",
        type=int,
        default=ONSET_REQUESTS,
        help="report each point's first this many requests and the rest apart as well "
        f"(default {ONSET_REQUESTS}: a fresh server's start of load; 0: not apart)",
    )
    args = p.parse_args(argv)
    check_common(p, args)
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.onset_requests < 0:
        p.error(f"--onset-requests must be >= 0, got {args.onset_requests}")
    points = select(all_points(args.concurrency), args.points)
    trees = trees_to_measure(p, args.baseline_tree, "innfer/cli.py")

    t_start = time.perf_counter()
    model_dir, how = build_repo(args.seed, args.rebuild, args.backend)
    stem = STEM if args.backend == "onnxruntime" else f"{STEM}_{args.backend}"
    print(f"model {model_dir} ({how})", file=sys.stderr, flush=True)
    profile = json.loads((model_dir / "profile.json").read_text())
    widths = tier_widths(model_dir)
    capacity = MAX_BATCH / (p50_ms(profile, "w100", MAX_BATCH) / 1e3)

    work = model_dir.parent / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    repos = copy_per_tree(model_dir, trees, work)  # an older tree may rebuild its cache

    traces, trace_files, sims = {}, {}, {}
    for pt in points:  # simulate first, before the servers and the pinning
        if pt["kind"] == "open":
            arrivals, path = open_trace(pt, capacity, args, work)
            traces[pt["id"]], trace_files[pt["id"]] = arrivals, path
            sims[pt["id"]] = simulate_open(model_dir, pt, path, arrivals, args)

    affinity = pin_client(args)
    pinned = affinity["pinned"]

    from runtime.repository.config import ModelConfig
    from runtime.repository.profile import random_feeds

    config = ModelConfig.load(model_dir / "model.yaml")
    inputs = random_feeds(config.inputs, 1, seed=args.seed)
    (args.out).mkdir(parents=True, exist_ok=True)
    servers = {}
    for name, tree in trees.items():
        log = args.out / f"{stem}-{name}.log"
        log.write_text("")
        servers[name] = LiveServer(
            name, tree, repos[name], log, args.server_cpus if pinned else None
        )

    results: dict = {
        "params": {
            "requests": args.requests,
            "seconds": args.seconds,
            "seed": args.seed,
            "warmup": args.warmup,
            "points": [pt["id"] for pt in points],
            "client_deadline": args.client_deadline,
        },
        "seeds": {
            "torch_weights": args.seed,
            "poisson_trace": f"sim.traces.make_trace(SimConfig(seed={args.seed}))",
            "uniform_budgets": (
                f"numpy default_rng({args.seed + 1}).uniform(20, 100, n), "
                "as sim.simulator.simulate draws them"
            ),
            "inputs": f"runtime.repository.profile.random_feeds(seed={args.seed})",
        },
        "config": {
            "model": MODEL,
            "recipe": recipe(args.seed, args.backend),
            "repository": str(model_dir.parent),
            "build": how,
            "tier_widths": widths,
            "capacity_per_s": capacity,
            "capacity_rule": f"max_batch / p50(w100, batch {MAX_BATCH}) from profile.json",
            "server_command": (
                "python -m innfer.cli serve --repository R --host 127.0.0.1 "
                "--port P --metrics-port M (cwd = PYTHONPATH = tree)"
            ),
            "server_env": {"OMP_NUM_THREADS": str(THREADS)},
            "fresh_server_per_point": True,
        },
        "profile": profile,
        "affinity": affinity,
        "trees": {
            n: {"tree": str(t), "commit": commit_of(t), "serve_args": serve_args(args, n)}
            for n, t in trees.items()
        },
        "simulator": {
            "closed_loop": NO_CLOSED_LOOP_SIM,
            "open_loop": "simulate(policy innfer, trace file = the live arrivals, budgets "
            "U(20, 100) ms from the same seed, max_batch, max_queue and the model's profile)",
            "open_loop_at_load": "sim_at_load: the same, on the stored profile scaled per "
            "tier by the server's innfer_tier_latency_factor when the point's load began (its "
            "timing at load and the warm-up): the profile the live scheduler planned with",
            "budget_margin": "the server plans with budget - budget_margin_ms (default 1 ms) "
            "- and, with plan_overhead (its default), less its learned request overhead - "
            "and the client's latency includes the transport; the simulator has neither",
        },
        "points": [],
    }
    order = list(trees)
    rows = [(r, i, pt) for r in range(args.repeat) for i, pt in enumerate(points)]
    for repeat, index, pt in rows:
        row = {**pt, "repeat": repeat, "live": {}}
        if pt["kind"] == "open":
            row["rate_per_s"] = pt["load"] * capacity
            row["n_arrivals"] = len(traces[pt["id"]])
            row["sim"] = sims[pt["id"]]
        else:
            row["sim"] = None
            row["sim_note"] = NO_CLOSED_LOOP_SIM
        turn = arm_order(order, repeat, index)
        row["first"] = turn[0]
        for name in turn:
            print(f"[{name}] {pt['id']} ...", file=sys.stderr, flush=True)
            try:
                row["live"][name] = live_point(
                    servers[name], pt, inputs, widths, traces.get(pt["id"]), args
                )
            except Exception as exc:  # record and go on
                row["live"][name] = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
        row["live"] = {n: row["live"][n] for n in order}
        if pt["kind"] == "open":
            row["sim_at_load"] = sims_at_load(model_dir, pt, trace_files, traces, row, args)
        elif args.floor:
            print(f"[echo] {pt['id']} ...", file=sys.stderr, flush=True)
            floor_log = args.out / f"{stem}-echo.log"
            cpus = args.server_cpus if pinned else None
            row["transport_floor"] = transport_floor(pt, inputs, args, floor_log, cpus)
        for s in row["live"].values():
            if "error" not in s:
                s["core"] = core_demand(pt, s, row.get("rate_per_s"))
        if pt["id"] == BOUND_POINT:  # per row: with --repeat, one per repeat
            row["littles_law"] = littles_law(profile, row["live"])
        results["points"].append(row)
    results["littles_law"] = littles_law_rows(results["points"])
    results["wall_seconds"] = time.perf_counter() - t_start
    publish(results, args.out, stem, plot, summarise(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
