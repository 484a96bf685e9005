"""Two models on one device: the shared arbiter (device_slots: 1) against per-model
scheduling (device_slots: 0), same arrivals, same run (issue 18).

Models (one repository, one `innfer serve`, untrained random weights, torch seed --seed):
  resnet18w50  the ResNet-18-like CNN at width 0.5 of bench/live_scheduler.py, 3x224x224;
               copied from runs/bench-live/ when its recipe (bench-live.json) matches, else
               built here with the same recipe
  mlp          784-2048-2048-10 (bench.models.mlp), 1x28x28 input, converted to an INN
Both: tiers w100/w075/w050/w025 (multiple_of 8), ONNX Runtime with 1 intra-op thread, max
batch 8, max queue 1,000; built with the repository's pipeline (add_model, build_model) into
runs/bench-multi/models/ and reused while their recipe (bench-multi.json) is the same.

Capacity. Profile rule: cap_i = max_batch / p50(w100, batch 8) from profile.json. For the
MLP that rule gives thousands of requests per second, far beyond what one core can carry
through gRPC (~2 ms of Python per request against ~0.3 ms of engine time), so by default
(--capacity served) cap_i = min(profile rule, served rate): requests answered per second by
a server on the pinned core with policy fixed:w100, each model alone, closed loop (24
clients, 2 s budgets), measured at the start of the run. "x combined capacity" L: both
models at once, each at r_i = L * 0.5 * cap_i (equal shares of the device at 1x). The served
rate at fixed:w025 is measured too: with every request on w025 the core is full at
L = 1 / sum_i(0.5 * cap_i / served_w025_i), the most any scheduler can carry (recorded as
load_bound_all_smallest; a per-request cost that does not shrink with width keeps it low).

Points open-{1,2,3}x: Poisson arrivals for each model (independent seeded traces), budgets
U(20, 100) ms per request, both streams at once (two run_load calls in one asyncio loop).
Each point runs over D = min(--seconds, --requests / the slower model's rate): the slower
model (the ResNet) sends at most --requests, the faster one covers the same window (so that
the two compete throughout). Every point runs twice on fresh servers with the same arrivals
and budgets: device_slots 1 (one arbiter) and 0 (per-model slots), alternating which goes
first. The server is pinned to --server-cpus (one core: both models compete for it), the load
generator to --client-cpus.

Per point x configuration x model: sent, within budget, late, refused (gRPC code), attainment
= within / sent (refusals are misses), goodput, p50 / p99 of answered requests, mean served
size (width of the serving tier over answered requests), tier mix; per point x configuration:
server CPU seconds over the load window and the load generator's event-loop lag (a late
sender would understate the offered load).

Writes bench/results/multi_model.json and multi_model.png, the servers' logs to
bench/results/multi_model.log, and prints a table.

    .venv/bin/python -m bench.multi_model [--requests 1500] [--seconds 30]
        [--points open-2x,...] [--capacity served|profile] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hardening import free_ports
from bench.live_scheduler import (
    CLASSES,
    INPUT,
    MAX_BATCH,
    MAX_QUEUE,
    MULTIPLE_OF,
    PROFILE_REPEATS,
    THREADS,
    TIERS,
    LiveServer,
    _num,
    _pct,
    check_common,
    commit_of,
    common_args,
    model_yaml,
    p50_ms,
    pin_client,
    resnet_inn,
    select,
    tier_widths,
)
from bench.live_scheduler import recipe as live_recipe
from bench.publish import publish
from sim.loadgen import run_closed_loop, run_load

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
WORK = ROOT / "runs" / "bench-multi"
MODELS_DIR = WORK / "models"
LIVE_REPO = ROOT / "runs" / "bench-live"
STEM = "multi_model"
HOST = "127.0.0.1"

RESNET, MLP = "resnet18w50", "mlp"
MODELS = (RESNET, MLP)
RESNET_INPUT, RESNET_CLASSES = INPUT, CLASSES  # bench/live_scheduler.py's model
MLP_INPUT, MLP_CLASSES = [1, 28, 28], 10
FULL, SMALL = "w100", "w025"

CONFIGS = {"arbiter": 1, "per-model": 0}  # name -> device_slots
LOADS = (1.0, 2.0, 3.0)
SHARE = 0.5  # each model's share of the device at 1x combined capacity
BUDGET_MS = (20.0, 100.0)
GOAL_POINT, GOAL_ATTAINMENT = "open-2x", 0.995
WARMUP_BUDGET_MS = 1000.0
CAL_CONCURRENCY, CAL_BUDGET_MS = 24, 2000.0
READY_TIMEOUT_S = 300.0
LAG_PROBE_S = 0.01
FOREIGN = "bench/|bench\\.|pytest|innfer.cli"  # pgrep pattern for other heavy runs


# -- the models -----------------------------------------------------------------------------
def mlp_recipe(seed: int) -> dict:
    """What the MLP's build depends on; another recipe rebuilds it."""
    return {
        "model": "bench.models.mlp",
        "layers": [784, 2048, 2048, MLP_CLASSES],
        "input": MLP_INPUT,
        "classes": MLP_CLASSES,
        "torch_seed": seed,
        "tiers": TIERS,
        "multiple_of": MULTIPLE_OF,
        "max_batch": MAX_BATCH,
        "threads": THREADS,
        "max_queue": MAX_QUEUE,
        "backend": "onnxruntime",
        "profile_repeats": PROFILE_REPEATS,
    }


def recipes(seed: int) -> dict[str, dict]:
    return {RESNET: live_recipe(seed), MLP: mlp_recipe(seed)}


def _recipe_of(model_dir: Path, record: str) -> dict | None:
    path = model_dir / record
    if not ((model_dir / "profile.json").is_file() and path.is_file()):
        return None
    try:
        return json.loads(path.read_text()).get("recipe")
    except (OSError, ValueError):
        return None


def _build(name: str, seed: int) -> None:
    """Convert and build ``name`` into MODELS_DIR (minutes for the ResNet)."""
    import torch

    import runtime
    from bench.models import mlp
    from runtime.build.pipeline import add_model, build_model
    from runtime.repository import Repository

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if name == RESNET:  # exactly bench/live_scheduler.py's build
        inn = resnet_inn(seed)
        config = model_yaml(RESNET_INPUT, RESNET_CLASSES)
    else:
        torch.manual_seed(seed)
        x = torch.randn(1, *MLP_INPUT)
        inn = runtime.convert(mlp().eval(), (x,), permute=False)
        config = model_yaml(MLP_INPUT, MLP_CLASSES)
    add_model(MODELS_DIR, name, inn, config)
    build_model(Repository(MODELS_DIR), name, backend="onnxruntime", repeats=PROFILE_REPEATS)


def build_models(
    seed: int, rebuild: bool = False, only: tuple[str, ...] = MODELS
) -> dict[str, str]:
    """Each model directory under MODELS_DIR (of ``only``) reused, copied (the ResNet, from
    runs/bench-live when its recipe matches) or built; model -> how."""
    how = {}
    for name, want in recipes(seed).items():
        if name not in only:
            continue
        dest = MODELS_DIR / name
        if not rebuild and _recipe_of(dest, "bench-multi.json") == want:
            how[name] = "reused"
            continue
        shutil.rmtree(dest, ignore_errors=True)
        src = LIVE_REPO / name
        record = {"recipe": want, "built_at": time.strftime("%F %T")}
        if name == RESNET and not rebuild and _recipe_of(src, "bench-live.json") == want:
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("bench-live.json"))
            how[name] = f"copied from {src.relative_to(ROOT)} (same recipe)"
            record["source"] = how[name]
            record["source_record"] = json.loads((src / "bench-live.json").read_text())
        else:
            print(f"building {name} ...", file=sys.stderr, flush=True)
            _build(name, seed)
            how[name] = "built"
        (dest / "bench-multi.json").write_text(json.dumps(record))
    return how


class MultiServer(LiveServer):
    """`innfer serve --config FILE` over one repository holding both models, on free loopback
    ports, pinned to ``cpus`` (``LiveServer``'s launch)."""

    def __init__(
        self, repo: Path, work: Path, log: Path, cpus: set[int] | None,
        max_pending_calls: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__("multi", ROOT, repo, log, cpus)
        self.work = work
        self.max_pending_calls = max_pending_calls  # the server config's (None: gRPC's)

    def start(self, label: str, device_slots: int, policy: str = "innfer") -> dict:
        port, mport = free_ports(2)
        config = {
            "repository": str(self.repo),
            "host": HOST,
            "grpc_port": port,
            "metrics_port": mport,
            "policy": policy,
            "device_slots": device_slots,
            "max_pending_calls": self.max_pending_calls,
        }
        path = self.work / f"server-slots{device_slots}-{policy.replace(':', '-')}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        info = self._launch(
            f"{label}: device_slots {device_slots}, policy {policy}",
            ["--config", str(path)], port, MODELS,
        )  # fmt: skip
        return {**info, "config": config}

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process so far (NaN once it has exited)."""
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, AttributeError, IndexError):
            return float("nan")
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def foreign_processes(server: MultiServer) -> list[str]:
    """Other benchmark / test / server processes on the machine (they would share the CPUs
    and skew the point): ``pgrep -af`` lines, without this process, its parent and its server."""
    try:
        out = subprocess.run(
            ["pgrep", "-af", FOREIGN], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ["<pgrep failed>"]
    mine = {os.getpid(), os.getppid(), server.proc.pid if server.proc else -1}
    return [
        line
        for line in out.splitlines()
        if line.split(maxsplit=1)[0].isdigit()
        and int(line.split(maxsplit=1)[0]) not in mine
        and "multi_model" not in line  # this run's own shell and wrappers
    ]


def warm_up(address: str, inputs: dict, n: int) -> None:
    """Unrecorded requests per model (the first batches of each size pay ORT's allocations)."""
    if n <= 0:
        return
    for m in MODELS:
        asyncio.run(
            run_closed_loop(
                address, m, min(MAX_BATCH, n), n, 30.0, lambda i: WARMUP_BUDGET_MS / 1e3, inputs[m]
            )
        )


# -- capacity -------------------------------------------------------------------------------
def served_capacity(server: MultiServer, inputs: dict, args, tier: str) -> dict:
    """Requests answered per second with every request on ``tier`` (policy fixed:<tier>),
    each model alone on the pinned server, closed loop with CAL_CONCURRENCY clients and
    CAL_BUDGET_MS budgets (engine + gRPC + Python per request: the serving path's rate)."""
    out = {}
    try:
        out["server"] = server.start(f"capacity {tier}", device_slots=1, policy=f"fixed:{tier}")
        warm_up(server.address, inputs, args.warmup)
        for m in MODELS:
            cpu0 = server.cpu_seconds()
            r = asyncio.run(
                run_closed_loop(
                    server.address, m, CAL_CONCURRENCY, 1_000_000, args.calibrate_seconds,
                    lambda i: CAL_BUDGET_MS / 1e3, inputs[m],
                )
            )  # fmt: skip
            s = r.summary
            answered = s["within_budget"] + s["late"]
            wall = s["wall_seconds"]
            out[m] = {
                "answered_per_s": answered / wall if wall else 0.0,
                "answered": answered,
                "refused": s["refused"],
                "wall_s": wall,
                "server_cpu_share": (server.cpu_seconds() - cpu0) / wall if wall else None,
                "p50_latency_ms": s["p50_latency_ms"],
                "tier_mix": s["tier_mix"],
            }
    finally:
        server.stop()
    return out


# -- one point x configuration --------------------------------------------------------------
def make_streams(rates: dict[str, float], args, k: int) -> dict:
    """Per model: Poisson arrivals over the point's window and U(20, 100) ms budgets, each
    from its own seed (recorded)."""
    from sim.simulator import SimConfig, make_trace

    slow = min(rates.values())
    duration = min(args.seconds, args.requests / slow)
    streams = {}
    for m_i, m in enumerate(MODELS):
        trace_seed = 1000 * args.seed + 100 * (m_i + 1) + k
        budget_seed = trace_seed + 50
        t = make_trace(SimConfig(trace="poisson", duration_s=duration, seed=trace_seed), rates[m])
        if m == min(rates, key=rates.get):
            t = t[: args.requests]
        lo, hi = BUDGET_MS
        b = np.random.default_rng(budget_seed).uniform(lo, hi, len(t)) / 1e3
        streams[m] = {
            "arrivals": t,
            "budgets": b,
            "seeds": {
                "trace": f"sim.traces.make_trace(SimConfig(trace='poisson', seed={trace_seed}))",
                "budgets": f"numpy default_rng({budget_seed}).uniform(20, 100, n) ms",
            },
        }
    return {"duration_s": duration, "streams": streams}


async def _drive(
    address: str, streams: dict, inputs: dict, max_seconds: float, deadline: bool = False
):
    """Both models' open-loop streams at once, plus a probe of this loop's lateness.
    ``deadline``: every request also carries its budget as its gRPC deadline."""
    lag: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(LAG_PROBE_S)
            lag.append((time.perf_counter() - t0 - LAG_PROBE_S) * 1e3)

    task = asyncio.create_task(probe())
    try:
        reports = await asyncio.gather(
            *(
                run_load(
                    address,
                    m,
                    streams[m]["arrivals"],
                    streams[m]["budgets"],
                    inputs[m],
                    max_seconds=max_seconds,
                    deadline=deadline,
                )
                for m in MODELS
            )
        )
    finally:
        done.set()
        await task
    return dict(zip(MODELS, reports, strict=True)), lag


def attains_goal(models: dict[str, dict]) -> bool:
    """Whether every model's stream attained GOAL_ATTAINMENT. A model whose stream sent
    nothing (sim.loadgen's summary then reads 1.0 attainment) or that has no summary at all
    has not: an empty run is no evidence."""
    return all(
        m in models and models[m]["sent"] > 0 and models[m]["slo_attainment"] >= GOAL_ATTAINMENT
        for m in MODELS
    )


def run_config(server: MultiServer, name: str, point: dict, streams: dict, inputs, widths, args):
    try:
        info = server.start(f"{point['id']} {name}", device_slots=CONFIGS[name])
        warm_up(server.address, inputs, args.warmup)
        load_before = os.getloadavg()[0]
        foreign = foreign_processes(server)
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        reports, lag = asyncio.run(
            _drive(server.address, streams, inputs, args.seconds + 5, args.client_deadline)
        )
        wall = time.perf_counter() - t0
        cpu = server.cpu_seconds() - cpu0
        foreign += [f for f in foreign_processes(server) if f not in foreign]
        models = {}
        for m, r in reports.items():
            s = dict(r.summary)
            served = [t for t in r.tiers if t]
            s["mean_served_size"] = (
                float(np.mean([widths[m].get(t, np.nan) for t in served])) if served else None
            )
            s["tier_counts"] = {t: served.count(t) for t in sorted(set(served))}
            models[m] = s
        lag_a = np.asarray(lag) if lag else np.zeros(1)
        return {
            **info,
            "models": models,
            "both_attain_goal": attains_goal(models),
            "window_wall_s": wall,
            "server_cpu_s": cpu,
            "server_cpu_share": cpu / wall if wall else None,
            "client_loop_lag_ms": {
                "p50": float(np.percentile(lag_a, 50)),
                "p99": float(np.percentile(lag_a, 99)),
                "max": float(lag_a.max()),
            },
            "foreign_processes": foreign,
            "loadavg_1m_before": load_before,
            "loadavg_1m_after": os.getloadavg()[0],
            "server_alive_after": server.alive(),
        }
    finally:
        server.stop()


# -- output ---------------------------------------------------------------------------------
def summarise(results: dict) -> str:
    head = (
        f"{'point':<9}{'config':<11}{'model':<13}{'rate/s':>8}{'sent':>7}{'ok':>7}{'late':>6}"
        f"{'ref':>6}{'attain':>8}{'good/s':>8}{'p50ms':>7}{'p99ms':>7}{'size':>6}  tiers"
    )
    lines = [head, "-" * len(head)]
    for p in results["points"]:
        for cfg in CONFIGS:
            c = p["live"].get(cfg, {})
            if "error" in c:
                lines.append(f"{p['id']:<9}{cfg:<11}error: {c['error'][:90]}")
                continue
            for m in MODELS:
                s = c["models"][m]
                mix = " ".join(f"{k}:{v:.0%}" for k, v in s["tier_mix"].items())
                lines.append(
                    f"{p['id']:<9}{cfg:<11}{m:<13}{p['rates_per_s'][m]:>8.1f}{s['sent']:>7}"
                    f"{s['within_budget']:>7}{s['late']:>6}{s['refused_total']:>6}"
                    f"{_pct(s['slo_attainment']):>8}{s['goodput_per_s']:>8.1f}"
                    f"{_num(s['p50_latency_ms']):>7}{_num(s['p99_latency_ms']):>7}"
                    f"{_num(s['mean_served_size'], '.3f'):>6}  {mix}"
                )
                if s["refused_total"]:
                    lines.append(
                        f"{'':<33}refused {s['refused']}; first: {(s['first_error'] or '')[:90]}"
                    )
            lag = c["client_loop_lag_ms"]
            lines.append(
                f"{'':<20}server cpu {_pct(c['server_cpu_share'])} of the window; client loop "
                f"lag p99 {lag['p99']:.1f} ms (max {lag['max']:.0f}); both >= "
                f"{GOAL_ATTAINMENT:.1%}: {'yes' if c['both_attain_goal'] else 'no'}"
            )
            if c.get("foreign_processes"):
                lines.append(f"{'':<20}OTHER RUNS DURING THIS POINT: {c['foreign_processes']}")
    caps = results["capacity"]
    lines.append(f"\ncapacity ({caps['mode']}):")
    for m in MODELS:
        c = caps[m]
        lines.append(
            f"  {m:<12} profile rule {c['profile_per_s']:.1f}/s; served at {FULL} "
            f"{c['served_per_s']:.1f}/s, at {SMALL} {c['served_small_per_s']:.1f}/s -> used "
            f"{c['used_per_s']:.1f}/s"
        )
    lines.append(
        f"  all requests on {SMALL} fill the core at "
        f"{_num(caps['load_bound_all_smallest'], '.2f')}x combined capacity (no scheduler "
        "can do better)"
    )
    lines.append(f"goal ({GOAL_POINT}, both models >= {GOAL_ATTAINMENT:.1%}):")
    for cfg, met in results["goal"].items():
        lines.append(f"  {cfg:<10} {'met' if met else 'not met' if met is not None else '-'}")
    lines.append(f"affinity {results['affinity']}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = results["points"]
    ids = [p["id"] for p in pts]
    x = np.arange(len(ids))
    w = 0.8 / len(CONFIGS)
    fig, ax = plt.subplots(2, len(MODELS), figsize=(max(8.0, 2.2 * len(ids) + 4), 6.5))
    for col, m in enumerate(MODELS):
        for k, cfg in enumerate(CONFIGS):
            att, size = [], []
            for p in pts:
                s = p["live"].get(cfg, {}).get("models", {}).get(m, {})
                att.append(s.get("slo_attainment"))
                size.append(s.get("mean_served_size"))
            off = x - 0.4 + w * (k + 0.5)
            label = f"{cfg} (device_slots {CONFIGS[cfg]})"
            ax[0, col].bar(off, [np.nan if v is None else v for v in att], w, label=label)
            ax[1, col].bar(off, [np.nan if v is None else v for v in size], w, label=label)
        ax[0, col].axhline(GOAL_ATTAINMENT, color="k", lw=0.8, ls="--")
        ax[0, col].set_title(m, fontsize=10)
        ax[0, col].set_ylim(0, 1.05)
        ax[1, col].set_ylim(0, 1.05)
        for r in (0, 1):
            ax[r, col].set_xticks(x, ids, fontsize=8)
    ax[0, 0].set_ylabel(f"attainment (within / sent; -- {GOAL_ATTAINMENT:.1%})")
    ax[1, 0].set_ylabel("mean served size (width)")
    ax[0, 0].legend(fontsize=8)
    prm = results["params"]
    fig.suptitle(
        f"two models, one core: arbiter vs per-model scheduling; load x combined capacity "
        f"({results['capacity']['mode']}), <= {prm['requests']} req (slower model) / "
        f"{prm['seconds']:g} s per point",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------
def all_points() -> list[dict]:
    return [{"id": f"open-{x:g}x", "load": x} for x in LOADS]


def _rates(text: str) -> dict[str, float]:
    """``resnet18w50=68.4,mlp=480`` -> {model: req/s}, each positive."""
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            rate = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not MODEL=RATE") from None
        if not rate > 0:
            raise argparse.ArgumentTypeError(f"{name}: the rate must be > 0, got {value}")
        out[name.strip()] = rate
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p, 1500, "at most this many of the slower model per point", "open-2x,open-3x")
    p.add_argument(
        "--capacity",
        choices=["served", "profile"],
        default="served",
        help="served: min(profile rule, measured rate at w100); profile: the profile rule",
    )
    p.add_argument("--calibrate-seconds", type=float, default=5.0, help="per model (served)")
    p.add_argument(
        "--used-rates",
        type=_rates,
        default=None,
        metavar="MODEL=R,...",
        help="each model's 1x capacity (req/s) instead of this run's measurement, so that "
        "two runs (two trees) offer the same load; the measurement still runs and is reported",
    )
    p.add_argument(
        "--client-deadline",
        action="store_true",
        help="clients also send each budget as the gRPC deadline (tritonclient client_timeout)",
    )
    p.add_argument(
        "--max-pending-calls",
        type=int,
        default=None,
        help="the servers' max_pending_calls (gRPC's queue of calls not yet taken up; "
        "default: gRPC's own bound)",
    )
    args = p.parse_args(argv)
    check_common(p, args)
    if not 0 < args.calibrate_seconds <= 600:
        p.error("--calibrate-seconds must be in (0, 600]")
    points = select(all_points(), args.points)
    if args.used_rates is not None and set(args.used_rates) != set(MODELS):
        p.error(f"--used-rates needs a rate for each of {', '.join(MODELS)}")

    t_start = time.perf_counter()
    how = build_models(args.seed, args.rebuild)
    print(f"models {how}", file=sys.stderr, flush=True)
    profiles = {m: json.loads((MODELS_DIR / m / "profile.json").read_text()) for m in MODELS}
    widths = {m: tier_widths(MODELS_DIR / m) for m in MODELS}

    work = WORK / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    repo = work / "repo"  # served copy (a server may write its engine cache)
    for m in MODELS:
        shutil.copytree(MODELS_DIR / m, repo / m)

    affinity = pin_client(args)
    pinned = affinity["pinned"]

    from runtime.repository.config import ModelConfig
    from runtime.repository.profile import random_feeds

    inputs = {
        m: random_feeds(ModelConfig.load(MODELS_DIR / m / "model.yaml").inputs, 1, seed=args.seed)
        for m in MODELS
    }
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / f"{STEM}.log"
    log.write_text("")
    cpus = args.server_cpus if pinned else None
    server = MultiServer(repo, work, log, cpus, args.max_pending_calls)

    capacity: dict = {"mode": args.capacity}
    cal = {}
    for tier in (FULL, SMALL):  # the served rate at both ends of the tier range
        print(f"capacity: each model alone at fixed:{tier} ...", file=sys.stderr, flush=True)
        cal[tier] = served_capacity(server, inputs, args, tier)
    capacity["served_measurement"] = {
        "policy": f"fixed:{FULL} and fixed:{SMALL}",
        "device_slots": 1,
        "closed_loop_clients": CAL_CONCURRENCY,
        "budget_ms": CAL_BUDGET_MS,
        "seconds_per_model": args.calibrate_seconds,
        "servers": {t: c["server"] for t, c in cal.items()},
    }
    for m in MODELS:
        prof = MAX_BATCH / (p50_ms(profiles[m], FULL, MAX_BATCH) / 1e3)
        served = cal[FULL][m]["answered_per_s"]
        c = {
            "profile_per_s": prof,
            "p50_w100_b8_ms": p50_ms(profiles[m], FULL, MAX_BATCH),
            "served_per_s": served,
            "served_small_per_s": cal[SMALL][m]["answered_per_s"],
            "served": cal[FULL][m],
            "served_small": cal[SMALL][m],
            "used_per_s": min(prof, served) if args.capacity == "served" else prof,
        }
        if args.used_rates is not None:
            c["used_per_s"] = args.used_rates[m]
        capacity[m] = c
    capacity["used_rates_given"] = args.used_rates is not None
    # If every request ran on the smallest tier at its served rate, the device is full at
    # sum_i L * SHARE * used_i / served_small_i = 1: no scheduler carries more than this L.
    cost = sum(
        SHARE * capacity[m]["used_per_s"] / capacity[m]["served_small_per_s"] for m in MODELS
    )
    capacity["load_bound_all_smallest"] = 1 / cost if cost > 0 else None
    capacity["rule"] = (
        f"profile: max_batch / p50({FULL}, batch {MAX_BATCH}) from profile.json; served: the "
        f"smaller of that and the measured answered rate at fixed:{FULL} (engine + gRPC + "
        f"Python per request); rate_i = load x {SHARE} x used_i. load_bound_all_smallest: the "
        f"load at which every request on {SMALL} (at its served rate) fills the core"
    )

    results: dict = {
        "params": {
            "requests": args.requests,
            "seconds": args.seconds,
            "seed": args.seed,
            "warmup": args.warmup,
            "capacity": args.capacity,
            "calibrate_seconds": args.calibrate_seconds,
            "client_deadline": args.client_deadline,
            "max_pending_calls": args.max_pending_calls,
            "used_rates": args.used_rates,
            "points": [pt["id"] for pt in points],
            "requests_rule": "D = min(seconds, requests / slower model's rate); the slower "
            "model sends at most `requests`, the faster covers the same window",
        },
        "seeds": {
            "torch_weights": args.seed,
            "traces": "per point and model: make_trace(poisson, seed = 1000*seed + 100*(model "
            "index + 1) + point index); budgets default_rng(that + 50).uniform(20, 100) ms; "
            "exact seeds in each point's `seeds`",
            "inputs": f"runtime.repository.profile.random_feeds(seed={args.seed})",
        },
        "config": {
            "models": list(MODELS),
            "recipes": recipes(args.seed),
            "build": how,
            "models_dir": str(MODELS_DIR),
            "served_repository": str(repo),
            "tier_widths": widths,
            "configs": {k: {"device_slots": v} for k, v in CONFIGS.items()},
            "server_command": "python -m innfer.cli serve --config FILE (policy innfer, "
            "device_slots per configuration, cwd = PYTHONPATH = repo root)",
            "server_env": {"OMP_NUM_THREADS": str(THREADS)},
            "fresh_server_per_point_and_config": True,
            "budget_ms": list(BUDGET_MS),
            "share_at_1x": SHARE,
        },
        "capacity": capacity,
        "profiles": {
            m: {t: {b: v["p50_ms"] for b, v in bs.items()} for t, bs in pr["tiers"].items()}
            for m, pr in profiles.items()
        },
        "affinity": affinity,
        "commit": commit_of(ROOT),
        "points": [],
    }
    order = list(CONFIGS)
    for k, pt in enumerate(points):
        rates = {m: pt["load"] * SHARE * capacity[m]["used_per_s"] for m in MODELS}
        k_load = LOADS.index(pt["load"])
        made = make_streams(rates, args, k_load)
        streams = made["streams"]
        row = {
            **pt,
            "rates_per_s": rates,
            "duration_s": made["duration_s"],
            "n_arrivals": {m: len(streams[m]["arrivals"]) for m in MODELS},
            "seeds": {m: streams[m]["seeds"] for m in MODELS},
            "order": order if k % 2 == 0 else order[::-1],
            "live": {},
        }
        for name in row["order"]:  # alternate who goes first: drift hits both
            print(f"[{name}] {pt['id']} {rates} ...", file=sys.stderr, flush=True)
            try:
                row["live"][name] = run_config(server, name, pt, streams, inputs, widths, args)
            except Exception as exc:  # record and go on
                row["live"][name] = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
        row["live"] = {n: row["live"][n] for n in order}
        results["points"].append(row)
    goal_row = next((r for r in results["points"] if r["id"] == GOAL_POINT), None)
    results["goal"] = {
        cfg: (
            goal_row["live"][cfg].get("both_attain_goal")
            if goal_row and "error" not in goal_row["live"][cfg]
            else None
        )
        for cfg in CONFIGS
    }
    results["goal_statement"] = (
        f"{GOAL_POINT}: attainment >= {GOAL_ATTAINMENT:.1%} for both models (capacity "
        f"{args.capacity})"
    )
    results["wall_seconds"] = time.perf_counter() - t_start
    publish(results, args.out, STEM, plot, summarise(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
