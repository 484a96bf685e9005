"""Engine threads below request handling (``engine_nice``) against equal priority, one
server config apart, in one run.

The MLP of issue 14 (784-2048-2048-10, tiers w100 and w050, ONNX Runtime 1 thread,
runs/bench-server) served by `innfer serve` of this tree pinned to --server-cpus (one core:
engine and request handling share it), the load generator (sim.loadgen over
tritonclient.grpc.aio) on --client-cpus. Per point and repeat, a fresh server with
``engine_nice: 0`` and one with ``engine_nice: 5`` (the default), their order alternating:
  c1, c8      closed loop, 1 or 8 clients, pinned to w100, no budget: throughput, p50 (c1
              runs only where --points names it: its batches mostly run on the loop thread)
  open-<R>    open loop, Poisson arrivals at R requests/s (seed --seed; the same arrivals for
              both), budgets U(20, 100) ms, the scheduler free: share answered within budget,
              goodput, the share served at w100
Per point: each repeat's figures, the medians, and nice-5 / nice-0 per paired repeat.

``--threads N`` serves the model with ONNX Runtime at N intra-op threads (idle threads
sleeping, as deploy/tiers/cpu.model.yaml has it): with ``--server-cpus 0,1`` that is the
deployed CPU tier's shape, where the pool threads share the cores with request handling.
``--baseline-tree DIR`` adds a third server, DIR's code at ``engine_nice: 5`` (label
``base-5``), in the same rotation: the ratio nice-5 / base-5 per repeat compares two trees'
lowering (e.g. one that lowered only the calling thread).

    .venv/bin/python -m bench.engine_nice [--rates 600,900,1500] [--repeats 2]
    .venv/bin/python -m bench.engine_nice --threads 2 --server-cpus 0,1 --client-cpus 0,1 \
        --baseline-tree /tmp/base

Writes bench/results/engine_nice.json and .png (``--out`` for elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.live_scheduler import (
    LiveServer,
    commit_of,
    common_args,
    pin_client,
    select,
)
from bench.order import rotated
from bench.publish import publish

ROOT = Path(__file__).resolve().parents[1]
STEM = "engine_nice"
NICES = (0, 5)
OPEN_SECONDS = 6.0
BUDGET_MS = (20.0, 100.0)


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p, 2000, "closed loop: at most this many requests per run", "c8,open-*")
    p.add_argument("--rates", default="600,900,1500", help="open-loop rates, requests/s")
    p.add_argument("--repeats", type=int, default=2, help="runs of each point per setting")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--baseline-tree", type=Path, help="also serve this tree at engine_nice 5")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not args.rates or min(args.rates) <= 0 or not 1 <= args.repeats <= 10:
        p.error("--rates: positive numbers; --repeats in [1, 10]")
    if not 1 <= args.threads <= 64:
        p.error("--threads must be in [1, 64]")
    if args.baseline_tree is not None and not (args.baseline_tree / "server").is_dir():
        p.error(f"--baseline-tree {args.baseline_tree}: not an innfer tree (no server/)")
    return args


def arms(args) -> list[tuple[str, Path, int]]:
    """(label, tree, engine_nice) of each server a repeat runs, in the first repeat's order."""
    out = [(str(n), ROOT, n) for n in NICES]
    if args.baseline_tree is not None:
        out.append(("base-5", args.baseline_tree.resolve(), 5))
    return out


def order(every: list, r: int) -> list:
    """The arms in repeat ``r``'s order: each rotation, then each reversed, so that over
    2 x len(every) repeats every arm runs in every position and after every other arm
    equally often."""
    seq = rotated(every, r)
    return seq[::-1] if (r // len(every)) % 2 else seq


def serve(repo: Path, arm: tuple[str, Path, int], log: Path, cpus, work: Path) -> LiveServer:
    """A started `innfer serve` of the arm's tree with its ``engine_nice``."""
    label, tree, nice = arm
    config = work / f"nice{nice}.yaml"
    config.write_text(f"engine_nice: {nice}\n")
    server = LiveServer("innfer", tree, repo, log, cpus)
    server.start(f"{label}: engine_nice {nice}", ("mlp",), extra=["--config", str(config)])
    return server


def set_threads(repo: Path, threads: int) -> None:
    """The serving copy's model.yaml at ``threads`` intra-op threads; more than one sleep
    when idle (``spin: false``, the deployed CPU tier's setting)."""
    path = repo / "mlp" / "model.yaml"
    config = yaml.safe_load(path.read_text())
    config["threads"] = threads
    config["spin"] = threads == 1
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def closed(server: LiveServer, inputs, args, clients: int) -> dict:
    """``clients`` closed-loop clients pinned to w100, no budget."""
    from sim.loadgen import run_closed_loop

    rep = asyncio.run(
        run_closed_loop(
            server.address,
            "mlp",
            clients,
            args.requests,
            args.seconds,
            lambda i: 10.0,
            inputs,
            parameters={"tier": "w100"},
        )
    )
    ok = np.array([c == "OK" for c in rep.codes])
    return {
        "answered": int(ok.sum()),
        "throughput_per_s": float(ok.sum() / rep.summary["wall_seconds"]),
        "p50_ms": float(np.nanmedian(rep.latency_ms)),
    }


def open_loop(server: LiveServer, inputs, arrivals, budgets) -> dict:
    """Poisson ``arrivals`` with ``budgets`` (s), the scheduler free."""
    from sim.loadgen import run_load

    rep = asyncio.run(
        run_load(server.address, "mlp", arrivals, budgets, inputs, max_seconds=OPEN_SECONDS + 5)
    )
    ok = np.array([c == "OK" for c in rep.codes])
    within = ok & (np.nan_to_num(rep.latency_ms, nan=np.inf) <= budgets * 1e3)
    tiers = [t for t, o in zip(rep.tiers, ok, strict=True) if o]
    return {
        "sent": len(arrivals),
        "answered": int(ok.sum()),
        "within_budget": float(within.mean()),
        "goodput_per_s": float(within.sum() / OPEN_SECONDS),
        "w100_share": sum(t == "w100" for t in tiers) / max(len(tiers), 1),
    }


def main(argv: list[str] | None = None) -> int:
    from bench import server as mlp_bench
    from bench.peers import serving_copy
    from runtime.repository.config import ModelConfig
    from runtime.repository.profile import random_feeds

    args = parse(argv)
    t_start = time.perf_counter()
    mlp_bench.build_repo()
    model_dir = mlp_bench.REPO / "mlp"
    repo = serving_copy(model_dir)
    set_threads(repo, args.threads)
    inputs = random_feeds(ModelConfig.load(model_dir / "model.yaml").inputs, 1, seed=args.seed)
    affinity = pin_client(args)
    cpus = args.server_cpus if affinity["pinned"] else None
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / f"{STEM}-server.log"
    log.write_text("")
    points = [{"id": "c1", "clients": 1}, {"id": "c8", "clients": 8}]
    points += [{"id": f"open-{r:g}", "rate": r} for r in args.rates]
    points = select(points, args.points or "c8,open-*")  # (--points was ignored before)
    for pt in points:
        if "rate" in pt:
            # A generator per rate: a point's trace does not depend on which others run.
            rng = np.random.default_rng([args.seed, round(pt["rate"] * 1000)])
            n = int(pt["rate"] * OPEN_SECONDS)
            pt["arrivals"] = np.cumsum(rng.exponential(1 / pt["rate"], n))
            pt["budgets"] = rng.uniform(*BUDGET_MS, n) / 1e3
    results: dict = {
        "params": {
            "rates": args.rates,
            "repeats": args.repeats,
            "requests": args.requests,
            "threads": args.threads,
            "seed": args.seed,
        },
        "setup": {
            "tree": commit_of(ROOT),
            "baseline_tree": None if args.baseline_tree is None else commit_of(args.baseline_tree),
            "arms": {label: f"{tree} engine_nice {n}" for label, tree, n in arms(args)},
            "affinity": affinity,
            "model": "mlp 784-2048-2048-10 (runs/bench-server), tiers w100/w050",
            "budgets_ms": BUDGET_MS,
            "open_seconds": OPEN_SECONDS,
        },
        "points": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for pt in points:
            every = arms(args)
            runs: dict[str, list[dict]] = {label: [] for label, _, _ in every}
            for r in range(args.repeats):
                for arm in order(every, r):
                    print(f"  {pt['id']} {arm[0]}, repeat {r + 1}", file=sys.stderr)
                    server = serve(repo, arm, log, cpus, Path(tmp))
                    try:
                        fig = (
                            closed(server, inputs, args, pt["clients"])
                            if "rate" not in pt
                            else open_loop(server, inputs, pt["arrivals"], pt["budgets"])
                        )
                    finally:
                        server.stop()
                    runs[arm[0]].append(fig)
            key = "throughput_per_s" if "rate" not in pt else "within_budget"
            point = {
                "id": pt["id"],
                "rate_per_s": pt.get("rate"),
                "runs": runs,
                "median": {
                    label: {k: statistics.median(f[k] for f in got) for k in got[0]}
                    for label, got in runs.items()
                },
                f"{key}_ratio_5_over_0_per_repeat": _ratios(runs["5"], runs["0"], key),
            }
            if "base-5" in runs:
                point[f"{key}_ratio_5_over_base_per_repeat"] = _ratios(
                    runs["5"], runs["base-5"], key
                )
            results["points"].append(point)
    results["wall_seconds"] = time.perf_counter() - t_start
    publish(results, args.out, STEM, plot, summarise(results))
    return 0


def _ratios(new: list[dict], old: list[dict], key: str) -> list[float | None]:
    """new / old of ``key`` per paired repeat (None where old is 0)."""
    return [b[key] / a[key] if a[key] else None for a, b in zip(old, new, strict=True)]


def summarise(results: dict) -> str:
    labels = list(results["points"][0]["median"])
    lines = ["point        " + "".join(f"{'engine_nice ' + n:<35}" for n in labels)]
    for pt in results["points"]:
        m = pt["median"]
        if pt["rate_per_s"] is None:
            row = [
                f"{m[n]['throughput_per_s']:7.1f} req/s p50 {m[n]['p50_ms']:5.2f} ms"
                for n in labels
            ]
        else:
            row = [
                f"{100 * m[n]['within_budget']:5.1f} % in budget, w100 {m[n]['w100_share']:.2f}"
                for n in labels
            ]
        pers = []
        for k, ratios in pt.items():
            if k.endswith("per_repeat"):
                which = "5/base" if "_over_base_" in k else "5/0"
                per = "/".join("-" if r is None else f"{r:.2f}" for r in ratios)
                pers.append(f"{which} per repeat {per}")
        cells = "".join(f"{c:<35}" for c in row)
        lines.append(f"{pt['id']:<12} {cells}{'; '.join(pers)}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = list(results["points"][0]["runs"])
    shut = [p for p in results["points"] if p["rate_per_s"] is None]
    width = 0.8 / len(labels)
    for k, n in enumerate(labels):
        for j, pt in enumerate(shut):
            vals = [f["throughput_per_s"] for f in pt["runs"][n]]
            mid = statistics.median(vals)
            ax1.bar(
                j + k * width,
                mid,
                width,
                yerr=[[mid - min(vals)], [max(vals) - mid]],
                color=f"C{k}",
                label=f"engine_nice {n}" if j == 0 else None,
            )
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(shut))], [p["id"] for p in shut])
    ax1.set_ylabel("req/s, closed loop (w100)" if shut else "no closed-loop point run")
    if shut:
        ax1.legend(fontsize=8)
    opens = [p for p in results["points"] if p["rate_per_s"] is not None]
    for i, n in enumerate(labels):
        for p in opens:
            ys = [100 * f["within_budget"] for f in p["runs"][n]]
            ax2.scatter(
                [p["rate_per_s"]] * len(ys),
                ys,
                marker="os^"[i % 3],
                color=f"C{i}",
                label=f"engine_nice {n}" if p is opens[0] else None,
            )
    ax2.set_xlabel("open-loop rate (req/s), budgets U(20, 100) ms")
    ax2.set_ylabel("% answered within budget (each repeat)")
    if opens:
        ax2.legend(fontsize=8)
    threads = results.get("params", {}).get("threads", 1)
    base = " and the baseline tree's (base-5)" if "base-5" in labels else ""
    fig.suptitle(
        f"MLP, ONNX Runtime {threads} thread(s): engine threads 5 nice levels below request "
        f"handling vs equal{base} ({results['setup']['tree']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
