"""Scheduler benchmark: simulated policies across loads and traces, a live check of the
simulator against the real server, and the scheduler's own cost per decision.

Model: the ResNet-18-like CNN (bench/models.py) at 64x64 input, tiers 100/75/50/25 % width
(multiples of 8), built with `innfer build` on this machine (ONNX Runtime, 1 thread,
max batch 8) - its profile.json drives both the simulator and the scheduler. Its weights
are untrained, so tier "accuracy" is the FLOPs fraction (the server's documented proxy when
no evaluation set is given): mean served accuracy here reads as "mean served size".

  1. simulation: policies innfer, slackfit, fixed:w100, fixed:w025; loads 0.5-3x the full
     tier's capacity; traces poisson, gamma (cv2 1, 4, 8), varying; budgets 20-100 ms;
     with --baseline-tree DIR, that tree's innfer too (same traces, same engine draws)
  2. live: `innfer serve` + the open-loop generator at --live-load x capacity, Poisson,
     vs the simulator's prediction for the same trace and profile
  3. overhead: median / p99 time of one innfer decision with 1,000 queued requests
Writes bench/results/scheduler.json and scheduler.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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
from bench.models import ResNet18Like
from bench.sim_grid import LOADS, SEEDS, grid
from runtime.build.pipeline import add_model, build_model
from runtime.repository import Repository
from runtime.repository.profile import random_feeds
from server.scheduling import Request, Scheduler, make_policy
from sim.loadgen import run_load
from sim.simulator import SimConfig, full_capacity, make_trace, simulate, tiers_from_model_dir

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
REPO = ROOT / "runs" / "bench-scheduler"
POLICIES = ("innfer", "slackfit", "fixed:w100", "fixed:w025")


def build_repo() -> Path:
    model_dir = REPO / "resnet18"
    if (model_dir / "profile.json").is_file():
        return model_dir
    torch.manual_seed(0)
    net = ResNet18Like(num_classes=10).eval()
    inn = runtime.convert(net, (torch.randn(1, 3, 64, 64),), permute=False)
    tiers = [{"name": f"w{round(w * 100):03d}", "width": w} for w in (1.0, 0.75, 0.5, 0.25)]
    add_model(REPO, "resnet18", inn, {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [3, 64, 64]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
        "tiers": tiers, "max_batch": 8, "threads": 1, "multiple_of": 8,
        "default_latency_budget_ms": 100, "max_queue": 1000,
    })  # fmt: skip
    build_model(Repository(REPO), "resnet18", progress=True, repeats=30)
    return model_dir


def simulations(model_dir: Path, duration: float, baseline: Path | None) -> list[dict]:
    """Every (profile, trace, load, policy) over the seeds (``bench/sim_grid.py``); with
    ``baseline``, that tree's innfer policy too, as ``innfer@baseline``, in a subprocess on
    the same traces, budgets and engine draws."""
    rows = grid(model_dir, POLICIES, duration=duration)
    if baseline is not None:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("sim_grid.py")), "--tree",
             str(baseline), "--model-dir", str(model_dir), "--policies", "innfer",
             "--duration", str(duration), "--label", "@baseline"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        rows += json.loads(out.stdout)
    return rows


def empty_run(row: dict) -> bool:
    """Whether a grid row (bench/sim_grid.py) or any of its seeds' runs had no requests."""
    runs = [row, *row.get("per_seed", [])]
    return any(r.get("requests") == 0 for r in runs)


def goals(rows: list[dict], target: float = 0.999, policy: str = "innfer") -> dict:
    """The issue's simulated goals per (profile, trace, load): ``policy``'s attainment >=
    target at <= 1x load and >= 99.5 % up to 3x (mean over seeds), and its mean served size
    >= SlackFit's wherever its attainment is equal or better."""
    cells, misses, short = 0, [], 0
    for r in rows:
        if r["policy"] != policy:
            continue
        cells += 1
        need = target if r["load"] <= 1.0 else 0.995
        sf = next(x for x in rows if x["policy"] == "slackfit" and all(
            x[k] == r[k] for k in ("profile", "trace", "load")))  # fmt: skip
        where = f"{r['profile']} {r['trace']} {r['load']}x"
        if empty_run(r):  # the simulator's summary reads 1.0 attainment for no requests
            short += 1
            misses.append(f"{where}: no requests (a seed's run was empty)")
        elif r["slo_attainment"] < need:
            short += 1
            misses.append(f"{where}: attainment {r['slo_attainment']:.4f} < {need}")
        if (r["slo_attainment"] >= sf["slo_attainment"]
                and r["mean_served_accuracy"] < sf["mean_served_accuracy"] - 1e-9):  # fmt: skip
            misses.append(
                f"{where}: size {r['mean_served_accuracy']:.3f} < slackfit "
                f"{sf['mean_served_accuracy']:.3f} at equal or better attainment"
            )
    return {"cells": cells, "met": cells - len({m.split(":")[0] for m in misses}),
            "attainment_met": cells - short, "misses": misses}  # fmt: skip


def live(model_dir: Path, load: float, duration: float, margin: float = 3.0) -> dict:
    tiers, p50 = tiers_from_model_dir(model_dir)
    cfg = SimConfig(policy="innfer", trace="poisson", load=load, duration_s=duration,
                    budget_ms=(20, 100), seed=1)  # fmt: skip
    predicted = simulate(tiers, p50, cfg).summary
    rate = load * full_capacity(tiers, p50, 8, 1)
    arrivals = make_trace(cfg, rate)
    budgets = np.random.default_rng(cfg.seed + 1).uniform(20, 100, len(arrivals)) / 1e3
    port = free_ports(1)[0]  # (a fixed one met another's server on a shared machine)
    log = OUT / "scheduler-live-server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "innfer.cli", "serve", "--repository", str(REPO),
             "--port", str(port), "--metrics-port", "0", "--budget-margin-ms", str(margin)],
            stderr=err, stdout=subprocess.DEVNULL, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    try:
        _wait_ready(log, proc)
        inputs = random_feeds(Repository(REPO).config("resnet18").inputs, 1)
        accuracy = {t.name: t.accuracy for t in tiers}
        report = asyncio.run(run_load(f"127.0.0.1:{port}", "resnet18", arrivals, budgets, inputs,
                                      max_seconds=duration + 5, accuracy=accuracy))  # fmt: skip
        server_side = _server_slo(log)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return {"load": load, "rate_per_s": rate, "predicted": predicted, "measured": report.summary,
            "server_side": server_side}  # fmt: skip


def _server_slo(log: Path) -> dict:
    """Deadline met/missed as the server counted them (its clock, without the client's
    send/receive time), from its /metrics."""
    import re
    import urllib.request

    port = re.search(r"metrics :(\d+)", log.read_text()).group(1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    def value(name: str, labels: str = "") -> float:
        """The sum over the series of ``name`` whose labels contain ``labels``."""
        rows = re.findall(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.M)
        return sum(float(v) for lab, v in rows if labels in lab)

    # Served requests only (late ones); refusals and expiries are in the client's figures.
    met = value("innfer_deadline_met_total")
    missed = value("innfer_deadline_missed_total", 'reason="late"')
    return {"met": met, "missed": missed, "slo_of_served": met / max(met + missed, 1)}


def _wait_ready(log: Path, proc, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if '"msg": "ready:' in log.read_text():
            return
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.2)
    raise TimeoutError("server did not become ready")


def overhead(model_dir: Path, queue: int = 1000, decisions: int = 300) -> dict:
    tiers, _ = tiers_from_model_dir(model_dir)
    out = {}
    for policy in ("innfer", "slackfit"):
        times = []
        for k in range(decisions):
            s = Scheduler(tiers, make_policy(policy, tiers), max_batch=8, max_queue=queue + 1)
            rng = np.random.default_rng(k)
            # A queue that is feasible on paper: generous, spread deadlines.
            for i, d in enumerate(np.sort(rng.uniform(5.0, 60.0, queue))):
                s.queue.append(Request(i, 0.0, float(d)))
                s._keys.append((0, float(d), i))
            t0 = time.perf_counter()
            s.next(0.0)  # the whole dispatch path: bookkeeping + the policy's choice
            times.append((time.perf_counter() - t0) * 1e6)
        out[policy] = {"median_us": statistics.median(times),
                       "p99_us": float(np.percentile(times, 99))}  # fmt: skip
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["profile"] == "own"]  # the slow profile: in the JSON
    traces = list(dict.fromkeys(r["trace"] for r in rows))
    fig, ax = plt.subplots(2, len(traces), figsize=(3.6 * len(traces), 6), squeeze=False)
    for j, trace in enumerate(traces):
        for policy in dict.fromkeys(r["policy"] for r in rows):
            sel = [r for r in rows if r["trace"] == trace and r["policy"] == policy]
            loads = [r["load"] for r in sel]
            ax[0][j].plot(loads, [r["slo_attainment"] for r in sel], marker="o", label=policy)
            ax[1][j].plot(loads, [r["mean_served_accuracy"] or 0 for r in sel], marker="o")
        ax[0][j].set_title(trace)
        ax[1][j].set_xlabel("load (x full-tier capacity)")
    ax[0][0].set_ylabel("SLO attainment")
    ax[1][0].set_ylabel("mean served size (FLOPs fraction)")
    ax[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0,
                   help="simulated seconds per run (60: ~4,000 requests per seed at 0.5x, so "
                   "one miss moves attainment by 0.025 %%)")  # fmt: skip
    p.add_argument(
        "--baseline-tree",
        type=Path,
        help="another source tree whose innfer policy runs beside this one's",
    )
    p.add_argument("--live-load", type=float, default=1.5)
    p.add_argument("--live-duration", type=float, default=20.0)
    p.add_argument("--skip-live", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model_dir = build_repo()
    OUT.mkdir(parents=True, exist_ok=True)
    profile = json.loads((model_dir / "profile.json").read_text())
    results = {"profile": profile, "overhead": overhead(model_dir)}
    print("decision cost at queue 1000:", results["overhead"])
    results["simulation"] = simulations(model_dir, args.duration, args.baseline_tree)
    _print(results["simulation"])
    policies = ["innfer"] + ["innfer@baseline"] * (args.baseline_tree is not None)
    results["goals"] = {p: goals(results["simulation"], policy=p) for p in policies}
    for p, g in results["goals"].items():
        print(
            f"\nsimulated goals, {p}: attainment met in {g['attainment_met']} of "
            f"{g['cells']} cells, both goals in {g['met']}; misses: {g['misses'] or 'none'}"
        )
    if not args.skip_live:
        results["live"] = live(model_dir, args.live_load, args.live_duration)
        lv = results["live"]
        m, pr = lv["measured"], lv["predicted"]
        print(f"\nlive at {lv['load']}x ({lv['rate_per_s']:.1f}/s): SLO measured "
              f"{m['slo_attainment']:.2%} vs simulated {pr['slo_attainment']:.2%}; "
              f"tier mix measured {m['tier_mix']} vs simulated {pr['tier_mix']}")  # fmt: skip
    (OUT / "scheduler.json").write_text(json.dumps(results, indent=1))
    plot(results["simulation"], OUT / "scheduler.png")
    print(f"wrote {OUT / 'scheduler.json'} and scheduler.png")
    return 0


def _print(rows: list[dict]) -> None:
    """Per profile, trace and load: attainment (mean over seeds, [min, max]) / mean size."""
    for profile in dict.fromkeys(r["profile"] for r in rows):
        print(f"\nprofile {profile}; attainment mean [min-max] over seeds {SEEDS} / size")
        policies = list(dict.fromkeys(r["policy"] for r in rows))
        print(f"{'trace':<12}{'load':>5}  " + "".join(f"{p:>30}" for p in policies))
        for trace in dict.fromkeys(r["trace"] for r in rows):
            for load in LOADS:
                cells = []
                for policy in policies:
                    r = next(x for x in rows if x["profile"] == profile and x["trace"] == trace
                             and x["load"] == load and x["policy"] == policy)  # fmt: skip
                    cells.append(f"{r['slo_attainment']:.2%} [{r['slo_attainment_min']:.1%}-"
                                 f"{r['slo_attainment_max']:.1%}] / "
                                 f"{r['mean_served_accuracy']:.3f}")  # fmt: skip
                print(f"{trace:<12}{load:>5}  " + "".join(f"{c:>30}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
