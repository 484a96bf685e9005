"""innfer against KServe and PyTriton, side by side in one run, with the same load generator.

Servers (each its own process on 127.0.0.1, free ports, pinned to --server-cpus with taskset;
ONNX Runtime with 1 intra-op and 1 inter-op thread in all three):
  innfer    `innfer serve` from this tree (bench.live_scheduler.LiveServer), pinned to its full
            tier by the request parameter tier=w100 (the same work as the peers), except at
            the budget point, where it schedules freely
  kserve    KServe 0.21, a custom `kserve.Model` running the ONNX file with ONNX Runtime, its
            gRPC v2 endpoint (bench/peer_servers/kserve_onnx.py); no batching
  pytriton  PyTriton 0.7 (Triton's dynamic batcher, max batch 8, queue delay
            --pytriton-queue-delay-us) with an @batch function running the same ONNX file
            (bench/peer_servers/pytriton_onnx.py)
The peers run in their own virtual environments (--peers-venv DIR: DIR/kserve, DIR/pytriton),
made here on first use with pip from the package registry (pinned versions, onnxruntime at
this environment's version; a marker file lists the requirements) and kept out of the
project's dependencies. Every server serves the same ONNX file: innfer's full tier source,
<repo>/<model>/tiers/w100/model.onnx (innfer runs the ORT-optimised build of that file).

Models: the MLP 784-2048-2048-10 (bench/server.py build_repo, runs/bench-server, "mlp") and
the ResNet-18-like CNN at width 0.5, 3x224x224 (bench/live_scheduler.py build_repo,
runs/bench-live, "resnet18w50"); inputs runtime.repository.profile.random_feeds(seed), batch 1.

Points per model (load generator: sim.loadgen over tritonclient.grpc.aio, this process pinned
to --client-cpus; at most --requests requests or --seconds s each):
  c1, c8      closed loop, 1 and 8 clients, latency_budget_ms 10,000 (no budget), each run
              --repeats times on a fresh server per repeat (servers in rotating order)
  c8-b30      ResNet only: closed loop, 8 clients, latency_budget_ms 30; innfer unpinned;
              goodput within budget (answered within 30 ms / s) for all three
  open-0.8x   open loop, Poisson arrivals (seed --seed) at 0.8 x the best c8 throughput of
              this run (any server), the same arrivals for all three, no budget
Per point and server: sent, answered, throughput (answered / s), p50 / p90 / p99 latency of
answered requests (client side), goodput within budget where budgets apply, errors by gRPC
code, the mean batch size where the server keeps ModelStatistics (innfer, Triton), innfer's
tier mix. With --repeats > 1: the median and min-max over repeats; sent, answered and
errors are totals over the repeats, the tier mix is pooled over them. Each started server is
first checked to answer the benchmark input as the in-process engine does (max |diff|).
Floors, in this run, once per repeat just before its servers: the engine time (a plain ONNX
Runtime session in this process, batch 1, median; run on --server-cpus, where the servers
run, then the process returns to --client-cpus) and, for the MLP, the gRPC echo floor
(bench/server_baselines.py echo, closed loop c=1, p50); reported as medians over the repeats.
The overhead goal pairs each repeat's innfer c1 p50 with that repeat's floors (median of the
differences): the VM's speed drifts by up to ~1.5x over minutes.
Goals (the issue's): innfer throughput >= 1.1 x the best peer's and innfer p50 <= the lowest
peer p50, at c1 and c8 of each model; MLP: innfer c1 p50 - (engine + echo) <= 0.3 ms. The
throughput and p50 goals are judged per repeat, each server's run of repeat r against the
others' of the same repeat (one rotation of fresh servers): met only if met in every repeat
(the medians over repeats are reported beside); and never where a server had request errors
at the point (fewer, easier requests answered are not the same load).

Writes bench/results/peers.json and peers.png, the servers' logs to
bench/results/peers-<server>.log, and prints a table and the goals.

    .venv/bin/python -m bench.peers [--requests 2000] [--seconds 30] [--models mlp,resnet]
        [--repeats 1] [--peers-venv runs/peers-venv] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hardening import free_ports
from bench.live_scheduler import (
    LiveServer,
    check_common,
    commit_of,
    common_args,
    open_trace,
    pin_client,
    select,
    tier_widths,
    wait_ready,
)
from bench.order import rotated
from bench.publish import publish
from sim.loadgen import run_closed_loop, run_load

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
WORK = ROOT / "runs" / "peers"
PEER_SERVERS = Path(__file__).parent / "peer_servers"
STEM = "peers"
HOST = "127.0.0.1"

SERVERS = ("innfer", "kserve", "pytriton")
PEERS = SERVERS[1:]
# innfer from --baseline-tree, beside the others on the same points: a change's same-run
# baseline. Pinned as innfer is; no goal reads it.
BASE = "innfer-base"
MODELS = {"mlp": "mlp", "resnet": "resnet18w50"}  # --models key -> served model name
FULL_TIER = "w100"
THREADS = 1
NO_BUDGET_MS = 10_000.0  # "no budget": far above any latency here, so innfer never refuses
BUDGET_MS = 30.0
OPEN_LOAD = 0.8
PIN = {"tier": FULL_TIER}
PEER_REQUIREMENTS = {
    "kserve": ["kserve==0.21.0"],
    "pytriton": ["nvidia-pytriton==0.7.0", "numpy<2"],  # pytriton 0.7 is built on numpy 1
}
PEER_PACKAGES = {"kserve": ["kserve"], "pytriton": ["nvidia-pytriton", "numpy"]}
MARKER = "innfer-requirements.txt"
QUICK = {"requests": 200, "seconds": 10.0, "warmup": 8}
OVERHEAD_GOAL_MS = 0.3
THROUGHPUT_GOAL = 1.1
HEADLINE = ("throughput_per_s", "p50_ms", "p90_ms", "p99_ms", "goodput_per_s")


# -- the peers' environments ----------------------------------------------------------------
def peer_requirements(name: str) -> list[str]:
    """What the peer's venv installs: its pins, and onnxruntime at this environment's version
    (innfer's), so that all three run the same ONNX Runtime."""
    import onnxruntime

    return [*PEER_REQUIREMENTS[name], f"onnxruntime=={onnxruntime.__version__}"]


def ensure_venv(root: Path, name: str) -> Path:
    """``root/name``'s python, made (python -m venv + pip install) unless its marker file
    already lists exactly these requirements."""
    venv, reqs = root / name, peer_requirements(name)
    python, marker = venv / "bin" / "python", venv / MARKER
    want = "".join(f"{r}\n" for r in reqs)
    if python.is_file() and marker.is_file() and marker.read_text() == want:
        return python
    print(
        f"peer venv {venv}: pip install {' '.join(reqs)} from the package registry "
        "(once; a few minutes)",
        file=sys.stderr,
        flush=True,
    )
    marker.unlink(missing_ok=True)  # a failed install must not look finished
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, "--progress-bar", "off", *reqs], check=True, stdout=sys.stderr)
    marker.write_text(want)
    return python


def versions(python: Path | None, packages: list[str]) -> dict[str, str]:
    """Installed versions of ``packages`` in ``python``'s environment (None: this one)."""
    if python is None:
        return {p: importlib.metadata.version(p) for p in packages}
    code = (
        "import importlib.metadata as m, json, sys; "
        "print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    )
    out = subprocess.run(
        [str(python), "-c", code, *packages], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


# -- the models -----------------------------------------------------------------------------
def model_repo(key: str, seed: int, rebuild: bool) -> tuple[Path, str]:
    """The model directory (built or reused by the benchmark that owns it) and how."""
    if key == "mlp":
        from bench import server

        if rebuild:
            shutil.rmtree(server.REPO / "mlp", ignore_errors=True)
        reused = (server.REPO / "mlp" / "profile.json").is_file()
        server.build_repo()
        return server.REPO / "mlp", "reused" if reused else "built"
    from bench import live_scheduler

    return live_scheduler.build_repo(seed, rebuild)


def serving_copy(model_dir: Path) -> Path:
    """A repository holding only this model (runs/bench-live has other folders beside it),
    copied afresh so that innfer's caches do not touch the source."""
    repo = WORK / f"repo-{model_dir.name}"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(model_dir, repo / model_dir.name)
    return repo


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_points(key: str) -> list[dict]:
    pts = [
        {"id": "c1", "kind": "closed", "concurrency": 1, "budget_ms": None},
        {"id": "c8", "kind": "closed", "concurrency": 8, "budget_ms": None},
    ]
    if key == "resnet":
        pts.append({"id": "c8-b30", "kind": "closed", "concurrency": 8, "budget_ms": BUDGET_MS})
    pts.append({"id": f"open-{OPEN_LOAD:g}x", "kind": "open", "load": OPEN_LOAD, "budget_ms": None})
    return pts


def request_parameters(server: str, point: dict) -> dict | None:
    """innfer is pinned to its full tier where no budget applies; with a budget it chooses.
    The peers get no extra parameters (they ignore latency_budget_ms, which all get)."""
    return PIN if _innfer(server) and point["budget_ms"] is None else None


def _innfer(server: str) -> bool:
    return server in ("innfer", BASE)


# -- the servers ----------------------------------------------------------------------------
class InnferServer(LiveServer):
    """`innfer serve` of this tree over a one-model repository (LiveServer's launch)."""

    def __init__(
        self, repo: Path, model: str, log: Path, cpus: set[int] | None,
        tree: Path = ROOT, name: str = "innfer",
    ) -> None:  # fmt: skip
        super().__init__(name, tree, repo, log, cpus)
        self.model = model

    def start(self, label: str) -> dict:
        port, mport = free_ports(2)
        cli = ["--repository", str(self.repo), "--host", HOST, "--port", str(port),
               "--metrics-port", str(mport)]  # fmt: skip
        return self._launch(label, cli, port, (self.model,))


class PeerServer:
    """A peer server (or the echo floor) as a subprocess on free loopback ports, pinned to
    ``cpus`` like LiveServer, in a session of its own so that stop() also ends what it
    started (PyTriton runs tritonserver and a Python backend stub as children)."""

    def __init__(
        self,
        name: str,
        command: Callable[[list[int]], list[str]],
        n_ports: int,
        model: str | None,
        log: Path,
        cpus: set[int] | None,
    ) -> None:
        self.name, self.command, self.n_ports = name, command, n_ports
        self.model, self.log, self.cpus = model, log, cpus
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self, label: str) -> dict:
        """Start it and wait until ``model`` is ready (ModelReady; the echo server, which
        has no models, until ServerLive)."""
        ports = free_ports(self.n_ports)
        self.address = f"{HOST}:{ports[0]}"
        cmd = self.command(ports)
        taskset = shutil.which("taskset")
        if self.cpus and taskset:
            cmd = [taskset, "-c", ",".join(map(str, sorted(self.cpus))), *cmd]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(THREADS))
        with open(self.log, "a") as log:
            log.write(f"\n===== {label}: {' '.join(cmd)}\n")
            log.flush()
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self.cpus and not taskset:
            os.sched_setaffinity(self.proc.pid, self.cpus)
        model = self.model

        def ready(client) -> bool:
            return client.is_model_ready(model) if model else client.is_server_live()

        return wait_ready(self.proc, self.log, self.address, ready, t0, self.name)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # both peers shut down cleanly on SIGTERM
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children left behind, if any


def make_servers(
    python: dict[str, Path], repo: Path, model: str, onnx: Path, args, cpus
) -> dict[str, InnferServer | PeerServer]:
    def log(name: str) -> Path:
        return args.out / f"{STEM}-{name}.log"

    def peer(name: str, ports: list[int], *extra: str) -> list[str]:
        return [str(python[name]), str(PEER_SERVERS / f"{name}_onnx.py"), "--onnx", str(onnx),
                "--model-name", model, "--grpc-port", str(ports[0]), "--http-port",
                str(ports[1]), "--threads", str(THREADS), *extra]  # fmt: skip

    def kserve(ports: list[int]) -> list[str]:
        return peer("kserve", ports)

    def pytriton(ports: list[int]) -> list[str]:
        delay = str(args.pytriton_queue_delay_us)
        return peer("pytriton", ports, "--metrics-port", str(ports[2]), "--queue-delay-us", delay)

    servers = {
        "innfer": InnferServer(repo, model, log("innfer"), cpus),
        "kserve": PeerServer("kserve", kserve, 2, model, log("kserve"), cpus),
        "pytriton": PeerServer("pytriton", pytriton, 3, model, log("pytriton"), cpus),
    }
    if args.baseline_tree is not None:
        servers[BASE] = InnferServer(repo, model, log(BASE), cpus, args.baseline_tree, BASE)
    return servers


# -- measuring ------------------------------------------------------------------------------
def figures(report, budget_ms: float | None, widths: dict[str, float]) -> dict:
    """One run of one point on one server, from sim.loadgen's report."""
    s = report.summary
    ok = np.array([c == "OK" for c in report.codes], dtype=bool)
    lat = report.latency_ms[ok]
    wall = s["wall_seconds"]

    def pct(q: float) -> float | None:
        return float(np.percentile(lat, q)) if len(lat) else None

    errors = {k: v for k, v in s["refused"].items() if k != "unsent"}
    out = {
        "sent": s["sent"],
        "answered": int(ok.sum()),
        "throughput_per_s": float(ok.sum() / wall) if wall else 0.0,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "goodput_per_s": s["goodput_per_s"] if budget_ms is not None else None,
        "within_budget": s["within_budget"] if budget_ms is not None else None,
        "errors": errors,
        "first_error": s["first_error"],
        "wall_seconds": wall,
    }
    if s.get("send_lag_max_ms") is not None:  # open loop: how far the client fell behind
        out["send_lag_ms"] = {q: s[f"send_lag_{q}_ms"] for q in ("p50", "p99", "max")}
    served = [t for t in report.tiers if t]
    if served:  # innfer says which tier answered; the peers do not
        out["tier_mix"] = s["tier_mix"]
        out["mean_served_width"] = float(np.mean([widths.get(t, np.nan) for t in served]))
    return out


def run_point(server, point: dict, su: dict, args, arrivals=None) -> dict:
    """One point on a started server; ``su``: the model's setup (name, inputs, widths)."""
    model, inputs = su["model"], su["inputs"]
    params = request_parameters(server.name, point)
    budget_ms = point["budget_ms"]
    budget_s = (NO_BUDGET_MS if budget_ms is None else budget_ms) / 1e3
    load_before = os.getloadavg()[0]
    stats_before = server_stats(server, model)
    if point["kind"] == "closed":
        report = asyncio.run(
            run_closed_loop(
                server.address,
                model,
                point["concurrency"],
                args.requests,
                args.seconds,
                lambda i: budget_s,
                inputs,
                parameters=params,
            )
        )
    else:
        budgets = np.full(len(arrivals), budget_s)
        report = asyncio.run(
            run_load(
                server.address,
                model,
                arrivals,
                budgets,
                inputs,
                max_seconds=args.seconds + 5,
                parameters=params,
            )
        )
    out = figures(report, budget_ms, su["widths"])
    stats_after = server_stats(server, model)
    if stats_before and stats_after:
        diff = {k: np.subtract(stats_after[k], stats_before[k]) for k in stats_after}
        if diff["batches"][1] > 0:
            rows, runs = diff["batches"]
            out["mean_batch"] = float(rows / runs)
        # The server's own account, mean ms per request over the point (Triton's
        # statistics): success = from its receipt to its answer, of which queue and the
        # engine's run (compute_infer).
        out["server_mean_ms"] = {
            k: float(ns / n / 1e6) for k, (n, ns) in diff.items() if k != "batches" and n > 0
        }
    out["request_parameters"] = {**(params or {}), "latency_budget_ms": budget_s * 1e3}
    out["loadavg_1m_before"] = load_before
    return out


STAT_FIELDS = ("success", "queue", "compute_infer")  # of Triton's InferStatistics


def server_stats(server, model: str) -> dict[str, tuple[int, int]] | None:
    """From ModelStatistics, where the server keeps them (Triton, innfer; not KServe):
    ``batches`` (inference_count, execution_count), whose change over a point gives the
    mean batch size, and (count, ns) of each of ``STAT_FIELDS``."""
    import tritonclient.grpc as tc

    try:
        with tc.InferenceServerClient(server.address) as client:
            stats = client.get_inference_statistics(model).model_stats
    except Exception:  # KServe: UNIMPLEMENTED
        return None
    out = {"batches": (sum(s.inference_count for s in stats),
                       sum(s.execution_count for s in stats))}  # fmt: skip
    for f in STAT_FIELDS:
        durations = [getattr(s.inference_stats, f) for s in stats]
        out[f] = (sum(d.count for d in durations), sum(d.ns for d in durations))
    return out


def warm_up(server, su: dict, n: int) -> None:
    """Unrecorded requests (ORT's first runs per batch size allocate), pinned for innfer."""
    if n:
        params = PIN if _innfer(server.name) else None
        asyncio.run(
            run_closed_loop(
                server.address,
                su["model"],
                min(8, n),
                n,
                30.0,
                lambda i: NO_BUDGET_MS / 1e3,
                su["inputs"],
                parameters=params,
            )
        )


def session_points(
    server, points: list[dict], label: str, su: dict, args, arrivals=None
) -> dict[str, dict]:
    """Start ``server``, check its answer against the in-process engine's, warm it up, run
    ``points`` one after the other, stop it. A failure is recorded for every point not yet
    run and the run goes on."""
    out: dict[str, dict] = {}
    try:
        info = server.start(label)
        info["max_abs_diff_vs_engine"] = answer_diff(server, su)
        warm_up(server, su, args.warmup)
        for pt in points:
            print(f"  [{server.name}] {su['model']} {pt['id']} ...", file=sys.stderr, flush=True)
            out[pt["id"]] = {**info, **run_point(server, pt, su, args, arrivals)}
            out[pt["id"]]["server_alive_after"] = server.proc.poll() is None
    except Exception as exc:  # record and go on with the next server
        error = f"{type(exc).__name__}: {exc}"[:3000]
        for pt in points:
            out.setdefault(pt["id"], {"error": error})
    finally:
        server.stop()
    return out


def answer_diff(server, su: dict) -> float:
    """The largest |difference| between the server's outputs for the benchmark's input and
    the in-process engine's (``su["reference"]``): every server must compute the same model
    (innfer runs the ORT-optimised build of the file: float rounding at most)."""
    import tritonclient.grpc as tc
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, x in su["inputs"].items():
        t = tc.InferInput(name, list(x.shape), np_to_triton_dtype(x.dtype))
        t.set_data_from_numpy(x)
        tensors.append(t)
    params = {**(PIN if _innfer(server.name) else {}), "latency_budget_ms": NO_BUDGET_MS}
    with tc.InferenceServerClient(server.address) as client:
        r = client.infer(su["model"], tensors, parameters=params)
    return max(float(np.max(np.abs(r.as_numpy(k) - v))) for k, v in su["reference"].items())


def reference_outputs(onnx: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from bench.peer_servers.ort_session import session

    sess = session(str(onnx), THREADS)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs), strict=True))


def engine_time(onnx: Path, inputs: dict[str, np.ndarray], n: int, max_s: float) -> dict:
    """The in-process engine floor: the same ONNX Runtime session the peers run, called
    directly at batch 1 (20 unrecorded runs, then n runs or max_s seconds)."""
    from bench.peer_servers.ort_session import session

    sess = session(str(onnx), THREADS)
    names = [o.name for o in sess.get_outputs()]
    for _ in range(20):
        sess.run(names, inputs)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < n and time.perf_counter() - start < max_s:
        t0 = time.perf_counter()
        sess.run(names, inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "p50_ms": statistics.median(times),
        "p90_ms": float(np.percentile(times, 90)),
        "runs": len(times),
        "how": f"onnxruntime.InferenceSession, {THREADS} thread, batch 1, in this process",
    }


@contextlib.contextmanager
def on_cpus(cpus: set[int] | None):
    """Run this process on ``cpus`` inside the block (None: leave it), then restore the
    affinity it had (the load generator's)."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def engine_floor(su: dict, args, cpus: set[int] | None) -> dict:
    """``engine_time`` on the servers' CPUs (``cpus``, None when not pinned), not on the
    load generator's: the floor is subtracted from a server's latency, so it must run
    where the servers run. The process is back on its own CPUs afterwards."""
    with on_cpus(cpus):
        floor = engine_time(su["onnx"], su["inputs"], args.requests, args.seconds / 3)
    floor["cpus"] = sorted(cpus) if cpus else None
    return floor


def echo_floor(su: dict, args, cpus) -> dict:
    """The transport floor: bench/server_baselines.py echo (answers at once, no outputs)
    under the same load generator, closed loop c=1."""
    script = str(ROOT / "bench" / "server_baselines.py")
    echo = PeerServer(
        "echo",
        lambda ports: [sys.executable, script, "echo", str(ports[0]), "-", su["model"]],
        1,
        None,
        args.out / f"{STEM}-echo.log",
        cpus,
    )
    point = {"id": "echo-c1", "kind": "closed", "concurrency": 1, "budget_ms": None}
    try:
        echo.start("echo floor")
        warm_up(echo, su, args.warmup)
        return run_point(echo, point, su, args)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:3000]}
    finally:
        echo.stop()


# -- summarising ----------------------------------------------------------------------------
def median_floors(each: list[dict]) -> dict:
    """The floors of every repeat (``each``: per repeat, {"engine": ..., "echo": ...}) as
    one: per floor the median p50 over the repeats that measured it and the fields every
    repeat agrees on (its CPUs, its batch), with every repeat's figures under
    ``"repeats"`` (for the overhead's pairing) - not the last repeat's p90 or throughput
    beside the median p50 (review helper-181)."""
    out: dict = {"repeats": each}
    for kind in ("engine", "echo"):
        got = [f[kind] for f in each if kind in f]
        if not got:
            continue
        p50s = [g["p50_ms"] for g in got if g.get("p50_ms") is not None]
        same = {k: v for k, v in got[0].items() if all(g.get(k) == v for g in got)}
        out[kind] = {**same, "p50_ms": statistics.median(p50s) if p50s else None}
        if len(p50s) > 1:
            out[kind]["p50_ms_range"] = [min(p50s), max(p50s)]
    return out


def headline(runs: list[dict]) -> dict:
    """A point's figures on one server over its repeats: the median of each HEADLINE figure
    and, with more than one run, its [min, max]; counts summed; innfer's tier mix pooled
    over the repeats' answered requests."""
    good = [r for r in runs if "error" not in r]
    out: dict = {"repeats": len(runs), "runs": runs}
    if not good:
        out["error"] = runs[-1]["error"] if runs else "not run"
        return out
    for k in HEADLINE:
        vals = [r[k] for r in good if r.get(k) is not None]
        out[k] = statistics.median(vals) if vals else None
        if len(vals) > 1:
            out[f"{k}_range"] = [min(vals), max(vals)]
    out["sent"] = sum(r["sent"] for r in good)
    out["answered"] = sum(r["answered"] for r in good)
    out["errors"] = dict(sum((Counter(r["errors"]) for r in good), Counter()))
    out["first_error"] = next((r["first_error"] for r in good if r["first_error"]), None)
    widths = [r["mean_served_width"] for r in good if r.get("mean_served_width") is not None]
    if widths:
        out["mean_served_width"] = statistics.median(widths)
        mixes = [(r["tier_mix"], r["answered"]) for r in good if r.get("tier_mix")]
        total = sum(n for _, n in mixes) or 1
        tiers = sorted({t for mix, _ in mixes for t in mix})
        out["tier_mix"] = {t: sum(mix.get(t, 0.0) * n for mix, n in mixes) / total for t in tiers}
    batches = [r["mean_batch"] for r in good if "mean_batch" in r]
    if batches:
        out["mean_batch"] = statistics.median(batches)
    own = [r["server_mean_ms"] for r in good if r.get("server_mean_ms")]
    if own:  # the median per field over the repeats that reported it
        out["server_mean_ms"] = {k: statistics.median(o[k] for o in own if k in o)
                                 for k in own[0]}  # fmt: skip
    diffs = [r["max_abs_diff_vs_engine"] for r in good if "max_abs_diff_vs_engine" in r]
    if diffs:
        out["max_abs_diff_vs_engine"] = max(diffs)
    if len(good) < len(runs):
        out["failed_runs"] = len(runs) - len(good)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def good_repeats(h: dict | None) -> int:
    """How many of a headline's repeats ran without error (0 for a missing or failed one)."""
    if not h or "error" in h:
        return 0
    return h.get("repeats", 0) - h.get("failed_runs", 0)


def missing_peers(srv: dict, key: str) -> list[str]:
    """The peers (of PEERS) whose ``key`` figure at a point is not comparable with innfer's:
    no headline, a failed one, no figure, or fewer (or more) good repeats than innfer's."""
    inn = good_repeats(srv.get("innfer"))
    out = []
    for p in PEERS:
        h = srv.get(p) or {}
        n = good_repeats(h)
        if n == 0 or n != inn or h.get(key) is None:
            out.append(p)
    return out


def paired_repeats(srv: dict, key: str, best: Callable) -> list[dict]:
    """Per repeat r of a point: innfer's ``key`` figure in its run r against the best peer's
    (``best``: max or min) among the peers' runs r, the same rotation of fresh servers.
    A repeat where innfer's or any peer in PEERS's run failed, is missing or lacks the
    figure is unpaired: ``ratio`` None and the servers in ``unpaired``."""
    runs = {s: (srv.get(s) or {}).get("runs") or [] for s in SERVERS}
    out = []
    for r in range(max(len(v) for v in runs.values())):
        fig = {}
        for s in SERVERS:
            run = runs[s][r] if r < len(runs[s]) else None
            ok = run is not None and "error" not in run and run.get(key) is not None
            fig[s] = run[key] if ok else None
        unpaired = [s for s in SERVERS if fig[s] is None]
        row: dict = {"repeat": r + 1, "innfer": fig["innfer"]}
        if unpaired:
            out.append(row | {"best_peer": None, "peer": None, "ratio": None,
                              "unpaired": unpaired})  # fmt: skip
            continue
        peer = best(PEERS, key=lambda p: fig[p])
        out.append(row | {"best_peer": peer, "peer": fig[peer],
                          "ratio": _ratio(fig["innfer"], fig[peer])})  # fmt: skip
    return out


def point_errors(srv: dict) -> dict[str, dict[str, int]]:
    """The request errors (gRPC code or CLIENT_ERROR -> count) each server had at a point,
    summed over its runs; servers without any are left out."""
    out = {}
    for s in SERVERS:
        errs = Counter()
        for run in (srv.get(s) or {}).get("runs") or []:
            errs.update(run.get("errors") or {})
        if errs:
            out[s] = dict(errs)
    return out


# A goal is "met" only over at least this many rotated repeats: each server first once.
MIN_REPEATS_TO_MEET = 3


def judge(row: dict, per_repeat: list[dict], errors: dict, met_in: Callable) -> dict:
    """``row`` completed with the per-repeat verdict: ``met`` True only if every repeat is
    paired and ``met_in(repeat)`` holds in each, with no request errors anywhere at the
    point and no missing peer; False where a paired repeat misses, or where innfer had
    request errors; None (incomplete) where a peer is missing, a repeat unpaired or only a
    peer had errors. ``reason`` says which."""
    ratios = [r["ratio"] for r in per_repeat if r["ratio"] is not None]
    missed = [r["repeat"] for r in per_repeat if r["ratio"] is not None and not met_in(r)]
    unpaired = [r["repeat"] for r in per_repeat if r["ratio"] is None]
    row |= {
        "rule": "per paired repeat: met only if met in every repeat, none unpaired, "
        "no request errors at the point",
        "per_repeat": per_repeat,
        "repeat_ratios": ratios,
        "repeat_ratio_min": min(ratios) if ratios else None,
        "repeat_ratio_max": max(ratios) if ratios else None,
        "errors": errors,
    }
    peer_errors = {s: e for s, e in errors.items() if s != "innfer"}
    if "innfer" in errors:
        met, why = False, f"innfer had request errors at this point: {errors['innfer']}"
    elif row["missing_peers"] or not per_repeat:
        met, why = None, f"peers missing or with unequal repeats: {row['missing_peers']}"
    elif unpaired:
        met, why = None, f"repeats without every server's figure: {unpaired}"
    elif peer_errors:
        met, why = None, f"peers had request errors (not the same load): {peer_errors}"
    elif missed:
        met, why = False, f"missed in repeats {missed} of {len(per_repeat)}"
    elif len(per_repeat) < MIN_REPEATS_TO_MEET:
        # One repeat is one order (innfer first at repeat 0): the first arm on this shared
        # machine runs differently from the others, so it cannot say "met" (review 130)
        met, why = (
            None,
            (
                f"met in {len(per_repeat)} repeat(s), too few to judge: give --repeats "
                f"{MIN_REPEATS_TO_MEET} (each server first once)"
            ),
        )
    else:
        met, why = True, f"met in all {len(per_repeat)} repeats"
    return row | {"met": met, "reason": why}


def goals(results: dict) -> list[dict]:
    """The issue's goals: per model, at c1 and c8, innfer's throughput over the best peer's
    (>= 1.1) and innfer's p50 against the lowest peer p50, each judged per paired repeat
    (``paired_repeats``, ``judge``): met only if met in every repeat, against the best peer
    of that repeat, with no request errors at the point; ``innfer``, ``peer``, ``ratio``
    are the medians over repeats, reported beside. At the budget point the goodput within
    budget (reported, no target); the MLP's c1 overhead over engine + echo (<= 0.3 ms).
    ``met`` is None ("incomplete") where a figure is missing, and for a comparison unless
    every peer in PEERS has the figure over as many good repeats as innfer: the peers that
    do not are listed in the row's ``missing_peers`` (the ratio of medians is then against
    the best of those that remain)."""
    out = []
    for key, m in results["models"].items():
        for pt in m["points"]:
            srv = pt["servers"]
            inn = srv.get("innfer", {})
            peers = {p: srv[p] for p in PEERS if p in srv and "error" not in srv[p]}
            if pt["id"] in ("c1", "c8"):
                errors = point_errors(srv)
                tp = {p: s["throughput_per_s"] for p, s in peers.items()
                      if s.get("throughput_per_s") is not None}  # fmt: skip
                best = max(tp, key=tp.get) if tp else None
                row = {
                    "kind": "throughput",
                    "goal": f"throughput >= {THROUGHPUT_GOAL:g}x best peer",
                    "unit": "req/s",
                    "model": key,
                    "point": pt["id"],
                    "innfer": inn.get("throughput_per_s"),
                    "best_peer": best,
                    "peer": tp.get(best),
                    "ratio": _ratio(inn.get("throughput_per_s"), tp.get(best)),
                    "missing_peers": missing_peers(srv, "throughput_per_s"),
                }
                per = paired_repeats(srv, "throughput_per_s", max)
                out.append(judge(row, per, errors, lambda r: r["ratio"] >= THROUGHPUT_GOAL))
                p50 = {p: s["p50_ms"] for p, s in peers.items() if s.get("p50_ms") is not None}
                low = min(p50, key=p50.get) if p50 else None
                mine = inn.get("p50_ms")
                row = {
                    "kind": "p50",
                    "goal": "p50 <= best peer p50",
                    "unit": "ms",
                    "model": key,
                    "point": pt["id"],
                    "innfer": mine,
                    "best_peer": low,
                    "peer": p50.get(low),
                    "ratio": _ratio(mine, p50.get(low)),
                    "missing_peers": missing_peers(srv, "p50_ms"),
                }
                per = paired_repeats(srv, "p50_ms", min)
                out.append(judge(row, per, errors, lambda r: r["innfer"] <= r["peer"]))
            elif pt["budget_ms"] is not None:
                good = {p: s.get("goodput_per_s") for p, s in peers.items()}
                good = {p: v for p, v in good.items() if v is not None}
                best = max(good, key=good.get) if good else None
                out.append(
                    {
                        "kind": "goodput",
                        "goal": f"goodput within {pt['budget_ms']:g} ms (reported)",
                        "unit": "req/s",
                        "model": key,
                        "point": pt["id"],
                        "innfer": inn.get("goodput_per_s"),
                        "best_peer": best,
                        "peer": good.get(best),
                        "ratio": _ratio(inn.get("goodput_per_s"), good.get(best)),
                        "missing_peers": missing_peers(srv, "goodput_per_s"),
                        "met": None,
                    }
                )
    ov = results.get("overhead")
    if ov:
        v = ov.get("overhead_ms")
        out.append(
            {
                "kind": "overhead",
                "goal": f"p50 - (engine + echo) <= {OVERHEAD_GOAL_MS:g} ms",
                "unit": "ms",
                "model": ov["model"],
                "point": "c1",
                "innfer": v,
                "best_peer": None,
                "peer": None,
                "ratio": None,
                "met": None if v is None else v <= OVERHEAD_GOAL_MS,
            }
        )
    return out


def overhead(results: dict, model_key: str = "mlp") -> dict | None:
    """innfer c1 p50 minus (engine time + echo floor) on ``model_key``."""
    m = results["models"].get(model_key)
    floors = results["floors"].get(model_key, {})
    if m is None or "echo" not in floors:
        return None
    c1 = next((p["servers"].get("innfer", {}) for p in m["points"] if p["id"] == "c1"), {})
    engine = floors["engine"]["p50_ms"]
    echo = floors["echo"].get("p50_ms")
    p50 = c1.get("p50_ms")
    # Paired: each repeat's innfer c1 p50 less that repeat's own floors, then the median.
    # (Floors from before this pairing, one set for every repeat, give the unpaired figure.)
    paired = []
    for run, f in zip(c1.get("runs") or [], floors.get("repeats") or [], strict=False):
        got = (
            run.get("p50_ms"),
            f.get("engine", {}).get("p50_ms"),
            f.get("echo", {}).get("p50_ms"),
        )
        if "error" not in run and None not in got:
            paired.append(got[0] - got[1] - got[2])
    if paired:
        value = statistics.median(paired)
    else:
        value = p50 - engine - echo if None not in (p50, echo) else None
    out = {
        "model": model_key,
        "innfer_c1_p50_ms": p50,
        "engine_p50_ms": engine,
        "echo_c1_p50_ms": echo,
        "overhead_ms": value,
        "overhead_ms_each_repeat": paired,
    }
    # Where it goes, by the server's own means: the engine run in the server against the
    # same engine back to back in one process (caches warm), the server's other work,
    # and what is left (transport, client) against the echo floor. The last is a residual:
    # the client's median p50 minus the server's mean time and the echo p50 - medians and
    # means mixed, so it is not a measured time and can even be negative.
    own = c1.get("server_mean_ms") or {}
    if {"success", "compute_infer"} <= own.keys():
        out["split_ms"] = {
            "engine_in_server_over_floor": own["compute_infer"] - engine,
            "server_outside_engine": own["success"] - own["compute_infer"],
            "residual_outside_server": None if p50 is None or echo is None
            else p50 - own["success"] - echo,
        }  # fmt: skip
        out["split_note"] = (
            "engine_in_server_over_floor and server_outside_engine: the server's own mean "
            "times (Triton statistics); residual_outside_server = client median p50 - server "
            "mean success time - echo median p50, a residual mixing a median with means, "
            "not a measured time"
        )
    return out


def _fig(s: dict, key: str, fmt: str, with_range: bool = True) -> str:
    v = s.get(key)
    if v is None:
        return "-"
    rng = s.get(f"{key}_range") if with_range else None
    text = format(v, fmt)
    return f"{text} [{format(rng[0], fmt)}-{format(rng[1], fmt)}]" if rng else text


def baseline(results: dict) -> list[dict]:
    """innfer against innfer-base (--baseline-tree) at each closed-loop point: throughput and
    p50, per paired repeat (the same rotation of fresh servers) and the medians of the
    per-repeat ratios; empty without a baseline tree.

    Example:
        >>> run = lambda t, p: {"throughput_per_s": t, "p50_ms": p}
        >>> srv = {"innfer": {"runs": [run(110, 9.0)]}, BASE: {"runs": [run(100, 10.0)]}}
        >>> baseline({"models": {"mlp": {"points": [{"id": "c8", "kind": "closed",
        ...     "servers": srv}]}}})[0]["throughput_ratio"]
        1.1
    """
    out = []
    for key, m in results["models"].items():
        for pt in m["points"]:
            srv = pt["servers"]
            if pt["kind"] != "closed" or BASE not in srv:
                continue
            pairs = list(zip((srv["innfer"] or {}).get("runs") or [],
                             (srv[BASE] or {}).get("runs") or [], strict=False))  # fmt: skip
            row: dict = {"model": key, "point": pt["id"], "repeats": len(pairs)}
            for fig in ("throughput_per_s", "p50_ms"):
                ratios = [_ratio(a.get(fig), b.get(fig)) for a, b in pairs]
                ratios = [r for r in ratios if r is not None]
                name = fig.split("_")[0] + "_ratio"
                row[name] = round(statistics.median(ratios), 4) if ratios else None
                row[f"{name}_per_repeat"] = [round(r, 4) for r in ratios]
            out.append(row)
    return out


def summarise(results: dict) -> str:
    rep = results["params"]["repeats"] > 1
    w = 24 if rep else 9
    head = (
        f"{'model':<13}{'point':<11}{'server':<12}{'sent':>6}{'ok':>6}{'req/s':>{w}}"
        f"{'p50 ms':>{w}}{'p90 ms':>9}{'p99 ms':>9}{'good/s':>9}  errors, mean batch, tiers"
    )
    lines = [head, "-" * len(head)]
    for m in results["models"].values():
        for pt in m["points"]:
            for name, s in pt["servers"].items():
                tag = f"{m['model']:<13}{pt['id']:<11}{name:<12}"
                if "error" in s:
                    lines.append(f"{tag}error: {s['error'][:90]}")
                    continue
                extra = " ".join(f"{k}:{v}" for k, v in s["errors"].items())
                if s.get("mean_batch"):
                    extra += f" batch {s['mean_batch']:.2f}"
                if s.get("tier_mix"):
                    extra += " " + " ".join(f"{k}:{v:.0%}" for k, v in s["tier_mix"].items())
                lines.append(
                    f"{tag}{s['sent']:>6}{s['answered']:>6}"
                    f"{_fig(s, 'throughput_per_s', '.1f'):>{w}}{_fig(s, 'p50_ms', '.2f'):>{w}}"
                    f"{_fig(s, 'p90_ms', '.2f', False):>9}{_fig(s, 'p99_ms', '.2f', False):>9}"
                    f"{_fig(s, 'goodput_per_s', '.1f'):>9}  {extra.strip()}"
                )
            if pt.get("rate_per_s"):
                lines.append(
                    f"{'':<24}open loop at {pt['rate_per_s']:.1f}/s ({pt['n_arrivals']} arrivals)"
                )
    for m in results["models"].values():
        diff = {}
        for pt in m["points"]:
            for name, s in pt["servers"].items():
                if "max_abs_diff_vs_engine" in s:
                    diff[name] = max(diff.get(name, 0.0), s["max_abs_diff_vs_engine"])
        lines.append(
            f"\n{m['model']}: answers vs the in-process engine, max |diff| "
            + ", ".join(f"{k} {v:.2g}" for k, v in diff.items())
        )
    for key, f in results["floors"].items():
        eng = f["engine"]["p50_ms"]
        echo = f.get("echo", {}).get("p50_ms")
        lines.append(
            f"\nfloors {MODELS[key]}: engine p50 {eng:.3f} ms (in-process ORT, batch 1, "
            f"CPUs {f['engine'].get('cpus') or 'unpinned'})"
            + (f", gRPC echo c1 p50 {echo:.3f} ms" if echo is not None else "")
        )
    lines.append("\ngoals (innfer pinned to w100 except at the budget point):")
    for g in results["goals"]:
        met = {True: "met", False: "NOT met", None: "-"}[g["met"]]
        if g["met"] is None and g["kind"] in ("throughput", "p50"):
            met = "incomplete"
        fmt = ".3f" if g["unit"] == "ms" else ".1f"
        val = "-" if g["innfer"] is None else f"innfer {g['innfer']:{fmt}} {g['unit']}"
        peer = "" if g["best_peer"] is None else f" vs {g['best_peer']} {g['peer']:{fmt}}"
        ratio = "" if g["ratio"] is None else f" ({g['ratio']:.3f}x of medians)"
        reps = g.get("repeat_ratios")
        if reps:  # the per-repeat ratios the verdict is judged on
            ratio += " per repeat " + "/".join(f"{r:.3f}" for r in reps)
        miss = g.get("missing_peers")
        miss = f"; missing or unequal repeats: {', '.join(miss)}" if miss else ""
        why = f"; {g['reason']}" if g.get("reason") and g["met"] is not True else ""
        lines.append(
            f"  {MODELS[g['model']]:<12}{g['point']:<8}{g['goal']:<33}{met:<11}{val}{peer}{ratio}"
            + miss
            + why
        )
    split = (results.get("overhead") or {}).get("split_ms")
    if split:
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in split.items()
                          if v is not None)  # fmt: skip
        lines.append(
            f"  overhead by the server's means (ms per request): {parts} (the residual: "
            "client median p50 - server mean - echo p50, medians and means mixed)"
        )
    if results.get("baseline"):
        lines.append(f"\ninnfer / {BASE} ({results['setup']['versions'].get(BASE)}), "
                     "per paired repeat:")  # fmt: skip
        for b in results["baseline"]:
            per = "/".join(f"{r:.3f}" for r in b["throughput_ratio_per_repeat"])
            lines.append(f"  {MODELS[b['model']]:<12}{b['point']:<8}throughput "
                         f"{b['throughput_ratio']} ({per}), p50 {b['p50_ratio']}")  # fmt: skip
    lines.append(f"\naffinity {results['setup']['affinity']}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Per model: throughput (goodput within budget at budget points) and p50 per point,
    bars grouped by server; with repeats, whiskers span min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"].values())
    fig, axes = plt.subplots(
        2, len(models), figsize=(max(8.0, 5.5 * len(models)), 6.5), squeeze=False
    )
    names = results["servers"]
    w = 0.8 / len(names)
    for col, m in enumerate(models):
        pts = m["points"]
        x = np.arange(len(pts))
        for row in (0, 1):
            ax = axes[row][col]
            for k, name in enumerate(names):
                vals, err = [], []
                for p in pts:
                    key = "p50_ms" if row else _rate_key(p)
                    s = p["servers"].get(name, {})
                    v = np.nan if s.get(key) is None else s[key]
                    lo, hi = s.get(f"{key}_range", (v, v))
                    vals.append(v)
                    err.append((v - lo, hi - v))
                ax.bar(x - 0.4 + w * (k + 0.5), vals, w, label=name, yerr=np.array(err).T)
            labels = [p["id"] + ("\n(goodput)" if p["budget_ms"] and not row else "") for p in pts]
            ax.set_xticks(x, labels, fontsize=8)
            ax.set_ylabel("p50 latency (ms)" if row else "throughput (req/s)")
            if row == 0:
                ax.set_title(m["model"], fontsize=9)
                ax.legend(fontsize=8)
    p = results["params"]
    fig.suptitle(
        f"innfer (tier w100; free at budget points) vs KServe vs PyTriton\nONNX Runtime "
        f"{THREADS} thread, {p['requests']} requests / {p['seconds']:g} s per point, "
        f"{p['repeats']} repeat(s)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rate_key(point: dict) -> str:
    """What a point's throughput bar shows: answered / s, or within budget / s."""
    return "throughput_per_s" if point["budget_ms"] is None else "goodput_per_s"


# -- main -----------------------------------------------------------------------------------
def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p, 2000, "at most this many per point", "c8,open-*")
    p.add_argument("--models", default="mlp,resnet", help="comma-separated: mlp, resnet")
    p.add_argument("--repeats", type=int, default=MIN_REPEATS_TO_MEET,
                   help="runs of each closed-loop point, each server first in turn (a goal "
                        f"is judged over at least {MIN_REPEATS_TO_MEET})")  # fmt: skip
    p.add_argument("--peers-venv", type=Path, default=ROOT / "runs" / "peers-venv")
    p.add_argument(
        "--baseline-tree", type=Path, default=None,
        help=f"also run `innfer serve` from this tree (e.g. a `git worktree` of the commit "
        f"before a change) as {BASE!r}, pinned as innfer is, on every point: the same-run "
        "baseline; reported as innfer / innfer-base per paired repeat",
    )  # fmt: skip
    p.add_argument(
        "--pytriton-queue-delay-us",
        type=int,
        default=0,
        help="Triton's max_queue_delay_microseconds",
    )
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: at most 200 requests / 10 s per point"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, QUICK["requests"])
        args.seconds = min(args.seconds, QUICK["seconds"])
        args.warmup = min(args.warmup, QUICK["warmup"])
    check_common(p, args)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or set(args.models) - set(MODELS):
        p.error(f"--models: a comma-separated subset of {', '.join(MODELS)}")
    if not 1 <= args.repeats <= 20:
        p.error("--repeats must be in [1, 20]")
    if args.pytriton_queue_delay_us < 0:
        p.error("--pytriton-queue-delay-us must be >= 0")
    if args.baseline_tree is not None:
        args.baseline_tree = args.baseline_tree.resolve()
        if not (args.baseline_tree / "innfer" / "cli.py").is_file():
            p.error(f"--baseline-tree {args.baseline_tree}: not an innfer tree (no innfer/cli.py)")
    # --points may name points some models lack (c8-b30 is the ResNet's): match the union
    union = {pt["id"]: pt for k in args.models for pt in model_points(k)}
    args.point_ids = {pt["id"] for pt in select(list(union.values()), args.points)}
    if any(i.startswith("open") for i in args.point_ids) and "c8" not in args.point_ids:
        p.error("the open-loop point's rate comes from c8: select c8 too")
    args.models = [
        k for k in args.models if any(pt["id"] in args.point_ids for pt in model_points(k))
    ]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t_start = time.perf_counter()
    python = {name: ensure_venv(args.peers_venv.resolve(), name) for name in PEERS}
    WORK.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    names = (*SERVERS, BASE) if args.baseline_tree is not None else SERVERS
    for name in (*names, "echo"):
        (args.out / f"{STEM}-{name}.log").write_text("")

    from runtime.repository.config import ModelConfig
    from runtime.repository.profile import random_feeds

    setups = {}
    for key in args.models:
        model_dir, how = model_repo(key, args.seed, args.rebuild)
        print(f"model {model_dir} ({how})", file=sys.stderr, flush=True)
        onnx = model_dir / "tiers" / FULL_TIER / "model.onnx"
        config = ModelConfig.load(model_dir / "model.yaml")
        setups[key] = {
            "model": MODELS[key],
            "model_dir": model_dir,
            "build": how,
            "onnx": onnx,
            "inputs": random_feeds(config.inputs, 1, seed=args.seed),
            "widths": tier_widths(model_dir),
            "repo": serving_copy(model_dir),
            "points": [pt for pt in model_points(key) if pt["id"] in args.point_ids],
        }

    affinity = pin_client(args)
    cpus = args.server_cpus if affinity["pinned"] else None
    results: dict = {
        "params": {
            "requests": args.requests,
            "seconds": args.seconds,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
            "models": args.models,
            "points": args.points,
            "quick": args.quick,
        },
        "setup": {
            "versions": {
                "innfer": commit_of(ROOT),
                **({BASE: commit_of(args.baseline_tree)} if args.baseline_tree else {}),
                "load generator (this environment)": versions(
                    None, ["onnxruntime", "tritonclient", "grpcio", "numpy"]
                ),
                **{p: versions(python[p], [*PEER_PACKAGES[p], "onnxruntime"]) for p in PEERS},
            },
            "peer_venvs": {p: str(python[p].parents[1]) for p in PEERS},
            "peer_requirements": {p: peer_requirements(p) for p in PEERS},
            "onnxruntime": f"{THREADS} intra-op thread, 1 inter-op thread, sequential, full "
            "graph optimisation (innfer: the ORT-format file optimised at build time)",
            "innfer": f"innfer serve, request parameter tier={FULL_TIER} (except at budget "
            f"points), latency_budget_ms {NO_BUDGET_MS:g} where no budget applies",
            "kserve": "kserve.Model (sync predict, one request at a time), ModelServer "
            "workers 1, gRPC v2 on 127.0.0.1, per-request logs off",
            "pytriton": "Triton dynamic batcher, max_batch_size 8, max_queue_delay_microseconds "
            f"{args.pytriton_queue_delay_us}, @batch infer function, one model instance",
            "load_generator": "sim.loadgen over tritonclient.grpc.aio, one channel; "
            "latency_budget_ms on every request (the peers ignore it)",
            "affinity": affinity,
            "seeds": {
                "inputs": f"runtime.repository.profile.random_feeds(seed={args.seed})",
                "open_loop": f"sim.traces.make_trace(SimConfig(trace='poisson', seed={args.seed}))",
                "weights": args.seed,
            },
        },
        "servers": list(names),
        "floors": {},
        "models": {},
    }

    n_open = 0  # open-loop points run so far: their server order rotates
    for key, su in setups.items():
        model = su["model"]
        print(f"{model}: floors ...", file=sys.stderr, flush=True)
        su["reference"] = reference_outputs(su["onnx"], su["inputs"])
        servers = make_servers(python, su["repo"], model, su["onnx"], args, cpus)
        closed = [pt for pt in su["points"] if pt["kind"] == "closed"]
        runs: dict[str, dict[str, list]] = {pt["id"]: {s: [] for s in names} for pt in closed}
        closed_orders = []
        # The floors once per repeat, just before its servers (this VM's speed drifts by up
        # to ~1.5x over minutes): the overhead goal pairs each repeat's innfer c1 p50 with
        # its own floors, not with floors measured minutes before (review helper-130).
        each: list[dict] = []
        for r in range(max(args.repeats if closed else 0, 1)):
            floors = {"engine": engine_floor(su, args, cpus)}  # on the servers' CPUs
            if key == "mlp":
                floors["echo"] = echo_floor(su, args, cpus)
            each.append(floors)
            if not closed:
                break
            order = rotated(names, r)  # rotate: drift hits every server
            closed_orders.append(order)
            for name in order:
                label = f"{model} closed loop, repeat {r + 1}"
                got = session_points(servers[name], closed, label, su, args)
                for pid, fig in got.items():
                    runs[pid][name].append(fig)
        results["floors"][key] = median_floors(each)
        rows = [{**pt, "servers": {s: headline(runs[pt["id"]][s]) for s in names}} for pt in closed]
        for pt in su["points"]:
            if pt["kind"] != "open":
                continue
            c8 = next(r for r in rows if r["id"] == "c8")["servers"]
            # (innfer-base left out: the rate is the one a run without it would use)
            best = max((s.get("throughput_per_s") or 0.0) for n, s in c8.items() if n != BASE)
            row = {**pt, "servers": {}}
            if best <= 0:
                row["servers"] = {s: {"error": "no c8 throughput to set the rate"} for s in names}
                rows.append(row)
                continue
            arrivals, _ = open_trace(pt, best, args, WORK)
            row.update(
                rate_per_s=pt["load"] * best,
                n_arrivals=len(arrivals),
                rate_rule=f"{pt['load']:g} x the best c8 throughput of this run",
            )
            # one run per server: the first rotates from model to model (and with --seed)
            row["order"] = rotated(names, n_open + args.seed)
            n_open += 1
            for name in row["order"]:
                got = session_points(servers[name], [pt], f"{model} open loop", su, args, arrivals)
                row["servers"][name] = headline([got[pt["id"]]])
            row["servers"] = {s: row["servers"][s] for s in names}
            rows.append(row)
        results["models"][key] = {
            "model": model,
            "model_dir": str(su["model_dir"]),
            "build": su["build"],
            "onnx": str(su["onnx"]),
            "onnx_sha256": sha256(su["onnx"]),
            "closed_orders": closed_orders,
            "points": rows,
        }

    results["overhead"] = overhead(results)
    results["goals"] = goals(results)
    results["baseline"] = baseline(results)
    results["wall_seconds"] = time.perf_counter() - t_start
    publish(results, args.out, STEM, plot, summarise(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
