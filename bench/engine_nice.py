"""Engine threads below request handling (``engine_nice``) against equal priority, one
server config apart, in one run.

The MLP of issue 14 (784-2048-2048-10, tiers w100 and w050, ONNX Runtime 1 thread,
runs/bench-server) served by `innfer serve` of this tree pinned to --server-cpus (one core:
engine and request handling share it), the load generator (sim.loadgen over
tritonclient.grpc.aio) on --client-cpus. Per point and repeat, a fresh server with
``engine_nice: 0`` and one with ``engine_nice: 5`` (the default), their order alternating:
  c8          closed loop, 8 clients, pinned to w100, no budget: throughput, p50, mean batch
  open-<R>    open loop, Poisson arrivals at R requests/s (seed --seed; the same arrivals for
              both), budgets U(20, 100) ms, the scheduler free: share answered within budget,
              goodput, the share served at w100
Per point: each repeat's figures, the medians, and nice-5 / nice-0 per paired repeat.

    .venv/bin/python -m bench.engine_nice [--rates 600,900,1500] [--repeats 2]

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.live_scheduler import (
    LiveServer,
    commit_of,
    common_args,
    pin_client,
)
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
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not args.rates or min(args.rates) <= 0 or not 1 <= args.repeats <= 10:
        p.error("--rates: positive numbers; --repeats in [1, 10]")
    return args


def serve(repo: Path, nice: int, log: Path, cpus, work: Path) -> LiveServer:
    """A started `innfer serve` of this tree with ``engine_nice: nice``."""
    config = work / f"nice{nice}.yaml"
    config.write_text(f"engine_nice: {nice}\n")
    server = LiveServer("innfer", ROOT, repo, log, cpus)
    server.start(f"engine_nice {nice}", ("mlp",), extra=["--config", str(config)])
    return server


def closed(server: LiveServer, inputs, args) -> dict:
    """8 closed-loop clients pinned to w100, no budget."""
    from sim.loadgen import run_closed_loop

    rep = asyncio.run(
        run_closed_loop(
            server.address,
            "mlp",
            8,
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
    inputs = random_feeds(ModelConfig.load(model_dir / "model.yaml").inputs, 1, seed=args.seed)
    affinity = pin_client(args)
    cpus = args.server_cpus if affinity["pinned"] else None
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / f"{STEM}-server.log"
    log.write_text("")
    rng = np.random.default_rng(args.seed)
    points = [{"id": "c8"}] + [{"id": f"open-{r:g}", "rate": r} for r in args.rates]
    for pt in points:
        if "rate" in pt:
            n = int(pt["rate"] * OPEN_SECONDS)
            pt["arrivals"] = np.cumsum(rng.exponential(1 / pt["rate"], n))
            pt["budgets"] = rng.uniform(*BUDGET_MS, n) / 1e3
    results: dict = {
        "params": {
            "rates": args.rates,
            "repeats": args.repeats,
            "requests": args.requests,
            "seed": args.seed,
        },
        "setup": {
            "tree": commit_of(ROOT),
            "affinity": affinity,
            "model": "mlp 784-2048-2048-10 (runs/bench-server), tiers w100/w050",
            "budgets_ms": BUDGET_MS,
            "open_seconds": OPEN_SECONDS,
        },
        "points": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for pt in points:
            runs: dict[int, list[dict]] = {n: [] for n in NICES}
            for r in range(args.repeats):
                for nice in NICES if r % 2 == 0 else NICES[::-1]:
                    print(f"  {pt['id']} engine_nice {nice}, repeat {r + 1}", file=sys.stderr)
                    server = serve(repo, nice, log, cpus, Path(tmp))
                    try:
                        fig = (
                            closed(server, inputs, args)
                            if "rate" not in pt
                            else open_loop(server, inputs, pt["arrivals"], pt["budgets"])
                        )
                    finally:
                        server.stop()
                    runs[nice].append(fig)
            key = "throughput_per_s" if "rate" not in pt else "within_budget"
            ratios = [
                b[key] / a[key] if a[key] else None for a, b in zip(runs[0], runs[5], strict=True)
            ]
            results["points"].append(
                {
                    "id": pt["id"],
                    "rate_per_s": pt.get("rate"),
                    "runs": {str(n): runs[n] for n in NICES},
                    "median": {
                        str(n): {k: statistics.median(f[k] for f in runs[n]) for k in runs[n][0]}
                        for n in NICES
                    },
                    f"{key}_ratio_5_over_0_per_repeat": ratios,
                }
            )
    results["wall_seconds"] = time.perf_counter() - t_start
    publish(results, args.out, STEM, plot, summarise(results))
    return 0


def summarise(results: dict) -> str:
    lines = ["point        engine_nice 0                      engine_nice 5"]
    for pt in results["points"]:
        m = pt["median"]
        if pt["rate_per_s"] is None:
            row = [
                f"{m[n]['throughput_per_s']:7.1f} req/s p50 {m[n]['p50_ms']:5.2f} ms"
                for n in ("0", "5")
            ]
        else:
            row = [
                f"{100 * m[n]['within_budget']:5.1f} % in budget, w100 {m[n]['w100_share']:.2f}"
                for n in ("0", "5")
            ]
        ratios = next(v for k, v in pt.items() if k.endswith("per_repeat"))
        per = "/".join("-" if r is None else f"{r:.2f}" for r in ratios)
        lines.append(f"{pt['id']:<12} {row[0]:<34} {row[1]:<34} 5/0 per repeat {per}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    c8 = next(p for p in results["points"] if p["rate_per_s"] is None)
    for k, n in enumerate(("0", "5")):
        vals = [f["throughput_per_s"] for f in c8["runs"][n]]
        ax1.bar(
            k,
            statistics.median(vals),
            yerr=[[statistics.median(vals) - min(vals)], [max(vals) - statistics.median(vals)]],
            label=f"engine_nice {n}",
        )
    ax1.set_xticks([0, 1], ["nice 0", "nice 5"])
    ax1.set_ylabel("req/s, 8 closed-loop clients (w100)")
    opens = [p for p in results["points"] if p["rate_per_s"] is not None]
    for n, marker in (("0", "o"), ("5", "s")):
        for p in opens:
            ys = [100 * f["within_budget"] for f in p["runs"][n]]
            ax2.scatter(
                [p["rate_per_s"]] * len(ys),
                ys,
                marker=marker,
                color="C0" if n == "0" else "C1",
                label=f"engine_nice {n}" if p is opens[0] else None,
            )
    ax2.set_xlabel("open-loop rate (req/s), budgets U(20, 100) ms")
    ax2.set_ylabel("% answered within budget (each repeat)")
    ax2.legend(fontsize=8)
    fig.suptitle(
        f"MLP on one core: engine threads 5 nice levels below request handling vs "
        f"equal ({results['setup']['tree']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
