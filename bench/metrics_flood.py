"""Inference beside a /metrics flood: how much a client scraping /metrics in a loop slows
the requests served beside it, this tree against a baseline tree in the same run.

/metrics renders in the serving process, under its GIL. Prometheus scrapes once per 10-60 s;
a misconfigured exporter, a dashboard refreshing every 100 ms, or a client with the port
open scraping in a loop is what this measures.

Per tree (this one; ``--baseline-tree DIR`` a checkout of an earlier commit): `innfer serve`
on the MLP of bench/server.py (runs/bench-server, 784-2048-2048-10) pinned to CPU 1
(``--server-cpus``); this process (load and scrapers) on the others. Rounds alternate
``quiet`` (no scraping) and ``flood`` (``--scrapers`` threads in a child process, each
scraping /metrics in a loop); each round is a closed loop of ``--concurrency``
tritonclient.grpc.aio clients pinned to the full tier (``tier=w100``, no budget), for
``--requests`` requests or ``--seconds``. The trees take turns going first per round.

Per tree and condition: req/s and p50 / p99 latency per round; the flood's scrapes per
second; and the ratio flood / quiet of the medians (throughput: 1.0 is no slow-down).

Writes bench/results/metrics_flood.json and .png.

    .venv/bin/python -m bench.metrics_flood --baseline-tree /tmp/base [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import multiprocessing as mp
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hardening import commit_of
from bench.live_scheduler import LiveServer
from bench.peers import NO_BUDGET_MS
from bench.publish import publish
from sim.loadgen import run_closed_loop

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
REPO = ROOT / "runs" / "bench-server"
MODEL = "mlp"


def _scrape_loop(url: str, threads: int, stop, count) -> None:
    """A child process: ``threads`` threads scraping ``url`` until ``stop`` is set; the
    scrapes completed go to ``count``."""

    def one() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    resp.read()
                with count.get_lock():
                    count.value += 1
            except (OSError, http.client.HTTPException):  # cut at the connection cap
                time.sleep(0.01)

    workers = [threading.Thread(target=one, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def one_round(server: LiveServer, flood: bool, args) -> dict:
    """One closed loop on ``server``, with or without scrapers beside it."""
    stop, count, scraper = mp.Event(), mp.Value("l", 0), None
    if flood:
        scraper = mp.Process(target=_scrape_loop, args=(server.metrics_url, args.scrapers, stop,
                                                        count), daemon=True)  # fmt: skip
        scraper.start()
        time.sleep(0.5)  # the scrapers connected
    t0, scraped0 = time.monotonic(), count.value
    report = asyncio.run(
        run_closed_loop(
            server.address,
            MODEL,
            args.concurrency,
            args.requests,
            args.seconds,
            lambda i: NO_BUDGET_MS / 1e3,
            {"input": args.x},
            parameters={"tier": "w100"},
        )
    )
    wall = time.monotonic() - t0
    scrapes = count.value - scraped0
    if scraper is not None:
        stop.set()
        scraper.join(15)
        if scraper.is_alive():
            scraper.kill()
    s = report.summary
    ok = report.codes.count("OK")
    return {"flood": flood, "answered": ok, "not_ok": len(report.codes) - ok,
            "req_per_s": ok / wall, "p50_ms": s["p50_latency_ms"], "p99_ms": s["p99_latency_ms"],
            "scrapes_per_s": scrapes / wall if flood else 0.0}  # fmt: skip


def ratios(rounds: list[dict]) -> dict:
    """Medians per condition and flood / quiet (req/s; p50 and p99 latency)."""
    med = {c: {k: float(np.median([r[k] for r in rounds if r["flood"] == (c == "flood")]))
               for k in ("req_per_s", "p50_ms", "p99_ms", "scrapes_per_s")}
           for c in ("quiet", "flood")}  # fmt: skip
    quiet, flood = med["quiet"], med["flood"]
    return {**med, "throughput_flood_over_quiet": flood["req_per_s"] / quiet["req_per_s"],
            "p50_flood_over_quiet": flood["p50_ms"] / quiet["p50_ms"]}  # fmt: skip


def plot(results: dict, path: Path) -> None:
    """Requests per second per round, quiet and flooded, per tree (bars: the medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, tree in enumerate(results["trees"].values()):
        for j, cond in enumerate(("quiet", "flood")):
            x = 3 * i + j
            ax.bar(x, tree["summary"][cond]["req_per_s"], color=("C0", "C3")[j], alpha=0.6)
            ys = [r["req_per_s"] for r in tree["rounds"] if r["flood"] == (cond == "flood")]
            ax.plot([x] * len(ys), ys, "k.")
    names = list(results["trees"])
    ax.set_xticks([3 * i + j for i in range(len(names)) for j in (0, 1)])
    ax.set_xticklabels([f"{n}\n{c}" for n in names for c in ("quiet", "flood")])
    ax.set_ylabel("requests / s (w100, closed loop)")
    ax.set_title(f"MLP beside {results['scrapers']} threads scraping /metrics in a loop")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    lines = ["| tree | quiet req/s (p50 ms) | flood req/s (p50 ms) | scrapes/s | flood / quiet |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, tree in results["trees"].items():
        r = tree["summary"]
        q, f = r["quiet"], r["flood"]
        lines.append(f"| {name} ({tree['commit']}) | {q['req_per_s']:.0f} ({q['p50_ms']:.2f}) | "
                     f"{f['req_per_s']:.0f} ({f['p50_ms']:.2f}) | {f['scrapes_per_s']:.0f} | "
                     f"{r['throughput_flood_over_quiet']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-tree", type=Path, help="a checkout to compare (same rounds)")
    p.add_argument("--rounds", type=int, default=3, help="quiet + flood pairs per tree")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--scrapers", type=int, default=4)
    p.add_argument("--server-cpus", default="1")
    args = p.parse_args(argv)
    if not (REPO / MODEL / "profile.json").is_file():
        raise SystemExit(f"{REPO / MODEL} is not built: run python -m bench.server first")
    cpus = {int(c) for c in args.server_cpus.split(",")}
    others = set(range(os.cpu_count() or 1)) - cpus
    if others:
        os.sched_setaffinity(0, others)
    args.x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    trees = {"current": ROOT, **({"baseline": args.baseline_tree} if args.baseline_tree else {})}
    servers = {}
    t0 = time.perf_counter()
    try:
        for name, tree in trees.items():
            servers[name] = LiveServer(name, tree, REPO, OUT / f"metrics_flood-{name}.log", cpus)
            (OUT / f"metrics_flood-{name}.log").write_text("")
            servers[name].start(name, models=(MODEL,))
        rounds: dict[str, list] = {name: [] for name in trees}
        for i in range(args.rounds):
            order = list(trees) if i % 2 == 0 else list(trees)[::-1]
            for name in order:
                for flood in (False, True) if i % 2 == 0 else (True, False):
                    rounds[name].append(one_round(servers[name], flood, args))
                    r = rounds[name][-1]
                    print(f"round {i} {name:8s} {'flood' if flood else 'quiet'}: "
                          f"{r['req_per_s']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
                          f"{r['scrapes_per_s']:.0f} scrapes/s", flush=True)  # fmt: skip
    finally:
        for server in servers.values():
            server.stop()
    results = {
        "model": MODEL, "concurrency": args.concurrency, "scrapers": args.scrapers,
        "requests_per_round": args.requests, "server_cpus": sorted(cpus),
        "trees": {name: {"commit": commit_of(tree), "rounds": rounds[name],
                         "summary": ratios(rounds[name])} for name, tree in trees.items()},
        "wall_seconds": time.perf_counter() - t0,
    }  # fmt: skip
    publish(results, OUT, "metrics_flood", plot, table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
