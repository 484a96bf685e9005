"""Texts planned at their own tokens, live: all-MiniLM-L6-v2 served by `innfer serve` with
its length lanes (16/32/64/128/256), this tree against an older one (--baseline-tree) in
the same run, each on fresh servers - what planning a text at the tokens its batch is padded
to changes, against planning it at its lane's length.

Model: the lanes repository of bench/text_serving.py (runs/bench-text; data-free tiers h100
/ h075 / h050 / h050f025, ONNX Runtime 1 thread, max batch 8), served with --plan-overhead
(the demo's setting). Texts: evaluation sentences joined and cut to a token range under the
model's tokenizer ([CLS] and [SEP] counted), seeded.

Phases, each on a fresh server per tree (the order alternates from repeat to repeat):
  fresh    20 texts of 129-250 tokens (the 256 lane's upper part), one at a time, 30 ms
           budgets, on a replica that has served nothing: what a client sees after every
           restart or scale-out; refusals classed as the client's ask
           (innfer_deadline_missed_total{reason="refused_budget"}) reported too
  mixed    texts of 17-256 tokens (uniform in tokens): a closed loop of 4 clients with
           budgets U(20, 100) ms (about the replica's capacity), and one client at 30 ms
  long     after 200 texts of 130-160 tokens at 300 ms (the lane learns from them), 40 texts
           of 240-256 tokens one at a time at 45 ms: late answers are plans made too short
Per phase: within budget / sent (refusals count as misses), refused, late, served size
(tier FLOPs / h100's), tiers.

Writes bench/results/text_lengths.json and .png and prints a table.

    .venv/bin/python -m bench.text_lengths [--baseline-tree DIR] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hardening import trees_to_measure
from bench.live_scheduler import LiveServer, copy_per_tree, pin_client
from bench.publish import publish
from bench.text_serving import MODEL, WORK, repositories, server_cpus, sizes, text_inputs
from sim.loadgen import run_closed_loop

OUT = Path(__file__).parent / "results"
STEM = "text_lengths"
WARM_TEXTS = 16  # unrecorded, 17-64 tokens at 1 s budgets: ORT's first allocations
MISSED = re.compile(r'innfer_deadline_missed_total\{model="minilm",reason="(\w+)"\} (\S+)')


def texts_in(lo: int, hi: int, n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` texts of ``lo``..``hi`` tokens (uniform in tokens), evaluation sentences joined
    in a seeded order and cut at a word; with their token counts."""
    from runtime.demo.minilm import MAX_LENGTH, tokenizer_path
    from runtime.demo.text_corpus import load
    from runtime.repository.tokenizer import TextTokenizer

    sentences = load("evaluation")
    tok = TextTokenizer(tokenizer_path(), MAX_LENGTH)
    rng = np.random.default_rng(seed)
    out, counts = [], []
    for want in rng.integers(lo, hi + 1, n):
        words: list[str] = []
        while True:  # add sentences past the target, then drop words back to it
            words += sentences[rng.integers(len(sentences))].split()
            if tok.lengths([" ".join(words)])[0] >= want:
                break
        while len(words) > 1 and tok.lengths([" ".join(words[:-1])])[0] >= want:
            words.pop()
        text = " ".join(words)
        out.append(text)
        counts.append(int(tok.lengths([text])[0]))
    return out, counts


def missed(metrics_url: str) -> dict[str, float]:
    body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in MISSED.finditer(body)}


def run(server: LiveServer, texts, budget, concurrency: int, widths, teach=None) -> dict:
    """One closed loop of ``texts`` (``budget``: seconds, or per text); with ``teach``
    (texts, budget) first, unrecorded."""
    budgets = np.broadcast_to(np.asarray(budget, float), (len(texts),))
    if teach is not None:
        asyncio.run(run_closed_loop(server.address, MODEL, concurrency, len(teach[0]), 120.0,
                                    lambda i: teach[1], text_inputs(teach[0])))  # fmt: skip
    before = missed(server.metrics_url)
    report = asyncio.run(run_closed_loop(server.address, MODEL, concurrency, len(texts), 120.0,
                                         lambda i: budgets[i], text_inputs(texts)))  # fmt: skip
    after = missed(server.metrics_url)
    s = dict(report.summary)
    served = [t for t in report.tiers if t]
    s["mean_served_size"] = float(np.mean([widths[t] for t in served])) if served else None
    s["tier_counts"] = {t: served.count(t) for t in sorted(set(served))}
    s["missed_by_reason"] = {
        k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)
    }
    s["server_breakdown"] = report.breakdown()
    return s


def phases(seed: int) -> dict[str, dict]:
    """Each phase's texts, budgets, concurrency and teaching texts."""
    fresh, fresh_n = texts_in(129, 250, 20, seed)
    mixed, mixed_n = texts_in(17, 256, 300, seed + 1)
    teach, _ = texts_in(130, 160, 200, seed + 2)
    long, long_n = texts_in(240, 256, 40, seed + 3)
    u = np.random.default_rng(seed + 4).uniform(0.020, 0.100, len(mixed))
    return {
        "fresh": {"texts": fresh, "tokens": fresh_n, "budget": 0.030, "c": 1},
        "mixed-u20-100": {"texts": mixed, "tokens": mixed_n, "budget": u, "c": 4},
        "mixed-b30-c1": {"texts": mixed, "tokens": mixed_n, "budget": 0.030, "c": 1},
        "long": {"texts": long, "tokens": long_n, "budget": 0.045, "c": 1,
                 "teach": (teach, 0.300)},
    }  # fmt: skip


def summarise(results: dict) -> str:
    rows = [f"{'phase':<15}{'tree':<10}{'rep':>4}{'within':>8}{'refused':>8}{'late':>6}"
            f"{'size':>6}  refused_budget  tiers"]  # fmt: skip
    for r in results["rows"]:
        s = r["result"]
        sent = max(s["sent"], 1)
        size = s["mean_served_size"]
        rows.append(
            f"{r['phase']:<15}{r['tree']:<10}{r['repeat']:>4}{s['within_budget'] / sent:>8.1%}"
            f"{s['refused_total']:>8}{s['late']:>6}"
            f"{size if size is not None else float('nan'):>6.2f}"
            f"  {s['missed_by_reason'].get('refused_budget', 0):>14g}  {s['tier_counts']}"
        )
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["phases"])
    trees = list(results["trees"])
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(trees)
    for k, tree in enumerate(trees):
        for j, phase in enumerate(names):
            runs = [
                r["result"] for r in results["rows"] if (r["tree"], r["phase"]) == (tree, phase)
            ]
            vals = [s["within_budget"] / max(s["sent"], 1) for s in runs]
            x = j + k * w
            ax.bar(x, float(np.median(vals)), w, color=f"C{k}", label=tree if j == 0 else None)
            ax.plot([x] * len(vals), vals, "k.", ms=4)
    ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("within budget / sent (median bar, repeats as dots)")
    ax.legend()
    ax.set_title("MiniLM text lanes: planned at the text's tokens vs at the lane's length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--baseline-tree", type=Path, help="an older commit's checkout (git worktree add DIR REV)"
    )
    p.add_argument("--repeat", type=int, default=2, help="runs of every phase per tree")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-cpus", type=lambda t: {int(c) for c in t.split(",")}, default={1})
    p.add_argument("--client-cpus", type=lambda t: {int(c) for c in t.split(",")}, default={0})
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    trees = trees_to_measure(p, args.baseline_tree, "innfer/cli.py")
    t0 = time.perf_counter()
    lanes, _ = repositories(0.0, False)
    repos = copy_per_tree(lanes / MODEL, trees, WORK / "trees", "lengths")
    affinity = pin_client(args)
    cpus = server_cpus(affinity, args.server_cpus)
    widths = sizes(lanes / MODEL)
    plan = phases(args.seed)
    warm, _ = texts_in(17, 64, WARM_TEXTS, args.seed + 9)
    log = args.out / f"{STEM}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    rows = []
    for rep in range(args.repeat):
        order = list(trees) if rep % 2 == 0 else list(reversed(trees))
        for name, ph in plan.items():
            for tree in order:
                server = LiveServer(tree, trees[tree], repos[tree], log, cpus)
                try:
                    server.start(f"{name}/{tree}/{rep}", (MODEL,), ("--plan-overhead",))
                    if name != "fresh":  # (fresh: nothing served before it)
                        asyncio.run(run_closed_loop(server.address, MODEL, 1, len(warm), 60.0,
                                                    lambda i: 1.0, text_inputs(warm)))  # fmt: skip
                    res = run(server, ph["texts"], ph["budget"], ph["c"], widths, ph.get("teach"))
                    res["server_alive_after"] = server.proc.poll() is None
                finally:
                    server.stop()
                rows.append({"phase": name, "tree": tree, "repeat": rep, "result": res})
                print(summarise({"rows": rows[-1:]}).splitlines()[1], flush=True)
    results = {
        "affinity": affinity, "seed": args.seed, "repeat": args.repeat,
        "trees": {t: str(p) for t, p in trees.items()},
        "phases": {n: {"tokens": {"min": min(ph["tokens"]), "max": max(ph["tokens"]),
                                  "median": float(np.median(ph["tokens"]))},
                       "texts": len(ph["texts"]), "concurrency": ph["c"],
                       "budget_ms": "U(20, 100)" if np.ndim(ph["budget"]) else ph["budget"] * 1e3}
                   for n, ph in plan.items()},
        "sizes": widths, "rows": rows, "wall_seconds": time.perf_counter() - t0,
    }  # fmt: skip
    publish(results, args.out, STEM, plot, summarise(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
