"""Text in, embeddings out, live: all-MiniLM-L6-v2 served by `innfer serve` to clients that
send sentences, with one scheduler lane per sequence length against one lane planned at the
longest length - the same tiers, engines and load, in one run.

Model: the MiniLM repository of ``innfer demo --model minilm`` (tiers h100 / h075 / h050 /
h050f025, ONNX Runtime 1 thread, max batch 8), written under runs/bench-text/ with
``--calibrate-seconds`` per tier (default 0: data-free tiers - the scheduling does not depend
on their quality) and reused while that recipe is the same.

Servers (each fresh, pinned to --server-cpus and the load generator to --client-cpus where
the machine has room for both, else neither; each tree serves its own copy of the lanes
repository):
  lanes      model.yaml lengths [16, 32, 64, 128, 256]: a request is planned at the shortest
             profiled length that holds it
  one-lane   the same model with lengths [256] (profile.json cut to that length): every
             request is planned as a 256-token one - what a length-blind scheduler does
  lanes-po   the lanes server with --plan-overhead: budgets planned short by the learned
             request overhead (its overhead_quantile: p90 by default, p99 before session
             76; admission takes its median) - what the demo's model.yaml (plan_overhead:
             true) serves, and since session 76 the server's default; the other servers
             run without it (--no-plan-overhead)
  lanes-m6   the lanes server with a fixed budget_margin_ms of 6 instead (--no-plan-overhead):
             about the time a request spends outside queue + compute on one shared core here
             (gRPC, tokenizer, waiting for the CPU the engine holds) - what an operator would
             hand-tune
  full-only  the lanes server with every request pinned to h100 (tier=h100): serving the
             full model only, as a server without tiers would
  lanes@baseline  with --baseline-tree DIR: the lanes server run from that checkout (an
             older commit), in the same run - what a scheduling change did
  lanes-po@baseline  the same with --plan-overhead (against lanes-po)
Load: closed loop, --concurrency clients, one evaluation sentence per request (the offline
corpus, seeded order; their token counts are reported), budgets 30 ms and U(20, 100) ms;
before each, 16 unrecorded warm-up requests with 16 further sentences of the same draw.
Per point: attainment (answered within budget / sent; refusals count as misses), refused,
late, mean served size (the serving tier's FLOPs / h100's), tier mix, p50 / p99 latency,
goodput.

Writes bench/results/text_serving.json and .png and prints a table.

    .venv/bin/python -m bench.text_serving [--requests 600] [--seconds 30] [--concurrency 4]
        [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hardening import trees_to_measure
from bench.live_scheduler import (
    LiveServer,
    common_args,
    copy_per_tree,
    pin_client,
)
from bench.order import rotated
from bench.publish import publish
from sim.loadgen import run_closed_loop

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
WORK = ROOT / "runs" / "bench-text"
MODEL = "minilm"
STEM = "text_serving"
MAX_TEXT_CHARS = 16384  # server.limits.text_bytes for max_length 256: ASCII text


def repositories(seconds: float, rebuild: bool) -> tuple[Path, Path]:
    """(lanes, one-lane) repositories: the demo's MiniLM, built once; the one-lane copy
    shares its tiers and engines and keeps only the 256-token profile."""
    from runtime.build.pipeline import build_model
    from runtime.demo import minilm_demo
    from runtime.repository import Repository

    lanes = WORK / "lanes"
    if rebuild or not minilm_demo.reusable(lanes / MODEL, seconds):
        shutil.rmtree(lanes, ignore_errors=True)
        minilm_demo.write_repository(lanes, MODEL, seconds, threads=1)
    if rebuild or not (lanes / MODEL / "profile.json").is_file():
        build_model(Repository(lanes), MODEL)
    import yaml

    # plan_overhead is set per server here (flags), not by the demo's model.yaml (which turns
    # it on): the variants below compare it, and an older tree's server can load the file.
    path = lanes / MODEL / "model.yaml"
    cfg = yaml.safe_load(path.read_text())
    if cfg.pop("plan_overhead", None) is not None:
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    one = WORK / "one-lane"
    shutil.rmtree(one, ignore_errors=True)
    shutil.copytree(lanes / MODEL, one / MODEL)
    cfg = yaml.safe_load((one / MODEL / "model.yaml").read_text())
    longest = max(cfg["lengths"])
    cfg["lengths"] = [longest]
    (one / MODEL / "model.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    prof = json.loads((one / MODEL / "profile.json").read_text())
    prof["lengths"] = {str(longest): prof["lengths"][str(longest)]}
    (one / MODEL / "profile.json").write_text(json.dumps(prof, indent=1))
    return lanes, one


def workload(n: int, seed: int, chars: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` evaluation sentences in a seeded order (repeated if needed) and their token
    counts under the model's tokenizer; with ``chars``, each text is its sentence followed
    by the next ones in that order up to ``chars`` characters (long texts: tokenized on the
    server's tokenizer threads above 2,048, truncated at max_length tokens)."""
    from runtime.demo.minilm import MAX_LENGTH, tokenizer_path
    from runtime.demo.text_corpus import load
    from runtime.repository.tokenizer import TextTokenizer

    texts = load("evaluation")
    order = np.random.default_rng(seed).permutation(len(texts))
    chosen = [texts[order[i % len(texts)]] for i in range(n)]
    if chars:
        chosen = [_long(texts, order, i, chars) for i in range(n)]
    return chosen, np.array(TextTokenizer(tokenizer_path(), MAX_LENGTH).lengths(chosen))


def _long(texts: list[str], order: np.ndarray, i: int, chars: int) -> str:
    """Sentences ``order[i], order[i + 1], ...`` joined by spaces, cut at ``chars``."""
    out, size, k = [], 0, i
    while size < chars:
        out.append(texts[order[k % len(texts)]])
        size += len(out[-1]) + 1
        k += 1
    return " ".join(out)[:chars]


def budgets_s(name: str, seed: int, n: int) -> np.ndarray:
    """A budget set by name, in seconds: ``b30`` (every request 30 ms) or ``u20-100``
    (uniform between, drawn as sim.simulator.simulate draws them: seed + 1)."""
    try:
        if name.startswith("b"):
            return np.full(n, float(name[1:]) / 1e3)
        if name.startswith("u"):
            lo, hi = (float(v) for v in name[1:].split("-"))
            if 0 < lo <= hi:
                return np.random.default_rng(seed + 1).uniform(lo, hi, n) / 1e3
    except ValueError:
        pass
    raise ValueError(f"budget set {name!r}: give bMS (b30) or uLO-HI (u20-100), in ms")


def server_cpus(affinity: dict, cpus: set[int]) -> set[int] | None:
    """The servers' CPUs: ``cpus`` where pin_client pinned the load generator, else None
    (not pinned either: one side pinned and the other free is neither layout)."""
    return set(cpus) if affinity.get("pinned") else None


def sizes(model_dir: Path) -> dict[str, float]:
    """Each tier's FLOPs relative to the largest (tier.json), the served-size measure."""
    flops = {
        d.name: json.loads((d / "tier.json").read_text())["flops"]
        for d in (model_dir / "tiers").iterdir()
    }
    top = max(flops.values())
    return {t: f / top for t, f in flops.items()}


WARMUP = 16  # unrecorded requests per server, sentences of their own (not the measured)


def split_workload(texts: list[str], tokens: np.ndarray, requests: int):
    """(measured texts, warm-up texts, measured token counts) from ``workload(requests +
    WARMUP)``: the first ``requests`` are measured and their token counts reported, the
    last WARMUP warm the server up - no measured sentence is sent before it is measured
    and no warm-up sentence is counted in the token statistics."""
    return texts[:requests], texts[requests:], tokens[:requests]


def text_inputs(texts: list[str]):
    def inputs(i: int) -> dict:
        return {"text": np.array([[texts[i].encode()]], dtype=object)}

    return inputs


def point(server: LiveServer, label: str, texts, budgets, args, widths, pin=None, extra=(),
          warm=()):  # fmt: skip
    try:
        info = server.start(label, (MODEL,), extra)
        inputs = text_inputs(texts)
        params = {"tier": pin} if pin else None
        # Not recorded: the first batches pay ORT's allocations; sentences of their own.
        if warm:
            asyncio.run(run_closed_loop(server.address, MODEL, 2, len(warm), 20.0,
                                        lambda i: 1.0, text_inputs(list(warm)),
                                        parameters=params))  # fmt: skip
        report = asyncio.run(
            run_closed_loop(server.address, MODEL, args.concurrency, args.requests,
                            args.seconds, lambda i: budgets[i], inputs, parameters=params)
        )  # fmt: skip
        s = dict(report.summary)
        served = [t for t in report.tiers if t]
        s["mean_served_size"] = float(np.mean([widths[t] for t in served])) if served else None
        s["tier_counts"] = {t: served.count(t) for t in sorted(set(served))}
        s["server_breakdown"] = report.breakdown()
        s["server_alive_after"] = server.proc.poll() is None
        return {**info, **s}
    finally:
        server.stop()


def summarise(results: dict) -> str:
    rows = [f"{'budget':<10}{'server':<11}{'attain':>8}{'refused':>9}{'late':>6}"
            f"{'size':>7}{'p50 ms':>8}{'p99 ms':>8}{'good/s':>8}  tiers"]  # fmt: skip
    for budget, servers in results["points"].items():
        for name, s in servers.items():
            sent = max(s["sent"], 1)
            size = s["mean_served_size"]
            rows.append(
                f"{budget:<10}{name:<11}{s['within_budget'] / sent:>8.1%}"
                f"{s['refused_total'] / sent:>9.1%}{s['late']:>6}"
                f"{size if size is not None else float('nan'):>7.2f}"
                f"{s['p50_latency_ms'] or float('nan'):>8.1f}"
                f"{s['p99_latency_ms'] or float('nan'):>8.1f}"
                f"{s['goodput_per_s']:>8.1f}  {s['tier_counts']}"
            )
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    budgets = list(results["points"])
    servers = list(next(iter(results["points"].values())))
    x = np.arange(len(budgets))
    for k, name in enumerate(servers):
        rows = [results["points"][b][name] for b in budgets]
        att = [r["within_budget"] / max(r["sent"], 1) for r in rows]
        size = [r["mean_served_size"] or 0 for r in rows]
        w = 0.8 / len(servers)
        axes[0].bar(x + k * w, att, w, label=name)
        axes[1].bar(x + k * w, size, w, label=name)
    for ax, title in zip(axes, ("attainment (within budget / sent)", "mean served size (FLOPs)"),
                         strict=True):  # fmt: skip
        ax.set_xticks(x + 0.4 - 0.4 / len(servers), budgets)
        ax.set_title(title)
        ax.set_ylim(0, 1.05)
    axes[0].legend()
    fig.suptitle(f"all-MiniLM-L6-v2, text in, closed loop c={results['concurrency']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p, 600, "requests per point", "b30,u20-100", concurrency=False)
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    p.add_argument("--calibrate-seconds", type=float, default=0.0)
    p.add_argument(
        "--margin-ms", type=float, default=6.0,
        help="budget_margin_ms of the lanes-m server (which does not plan with the learned "
        "overhead): the per-request time outside the plan "
        "(decode, tokenize, encode, the way back) measured here on one shared core",
    )  # fmt: skip
    p.add_argument("--baseline-tree", type=Path, default=None,
                   help="a checkout of an older commit (git worktree add DIR <commit>): its "
                   "lanes server runs beside this tree's")  # fmt: skip
    p.add_argument("--text-chars", type=int, default=0,
                   help="send long texts of this many characters (sentences joined; at most "
                   "16,384, the model's limit) instead of one sentence each; results go to "
                   "text_serving_chars<N>.json")  # fmt: skip
    p.add_argument(
        "--servers", default=None, help="comma-separated server names to run (default: all)"
    )
    p.add_argument("--budgets", type=lambda t: t.split(","), default=["b30", "u20-100"],
                   help="budget sets: bMS (every request MS) or uLO-HI (uniform, ms), comma-"
                   "separated (default b30,u20-100)")  # fmt: skip
    args = p.parse_args()
    if not 0 <= args.text_chars <= MAX_TEXT_CHARS:
        p.error(f"--text-chars must be 0..{MAX_TEXT_CHARS} (the model's limit), got "
                f"{args.text_chars}")  # fmt: skip
    for name in args.budgets:
        try:
            budgets_s(name, 0, 1)
        except ValueError as exc:
            p.error(str(exc))
    stem = f"{STEM}_chars{args.text_chars}" if args.text_chars else STEM
    trees = trees_to_measure(p, args.baseline_tree, "innfer/cli.py")
    t0 = time.perf_counter()
    lanes, one = repositories(args.calibrate_seconds, args.rebuild)
    # Each tree serves its own copy of the repositories (as bench/live_scheduler.py does):
    # an older tree's server may rewrite what the other then loads.
    lanes_of = copy_per_tree(lanes / MODEL, trees, WORK / "trees", "lanes")
    affinity = pin_client(args)
    cpus = server_cpus(affinity, args.server_cpus)
    texts, warm, tokens = split_workload(
        *workload(args.requests + WARMUP, args.seed, args.text_chars), args.requests
    )
    widths = sizes(lanes / MODEL)
    budget_sets = {name: budgets_s(name, args.seed, args.requests) for name in args.budgets}
    log = args.out / f"{stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)  # (an --out not made yet: the servers' log)
    log.unlink(missing_ok=True)
    results = {"concurrency": args.concurrency, "requests": args.requests,
               "seconds": args.seconds, "seed": args.seed, "affinity": affinity,
               "warmup": f"{WARMUP} requests per server, sentences drawn after the measured",
               "tokens": {"p50": float(np.median(tokens)), "p90": float(np.percentile(tokens, 90)),
                          "max": int(tokens.max()), "mean": float(tokens.mean())},
               "sizes": widths, "points": {}}  # fmt: skip
    results["orders"] = {}
    for k, (name, budgets) in enumerate(budget_sets.items()):
        row = {}
        margin = ["--no-plan-overhead", "--budget-margin-ms", str(args.margin_ms)]
        mine = lanes_of["current"]
        off = ("--no-plan-overhead",)  # (spelled out: the server's default is on)
        servers = [("lanes", ROOT, mine, None, off)]
        if "baseline" in trees:
            base = (trees["baseline"], lanes_of["baseline"], None)
            servers += [("lanes@baseline", *base, off),
                        ("lanes-po@baseline", *base, ("--plan-overhead",))]  # fmt: skip
        servers += [
            ("lanes-po", ROOT, mine, None, ("--plan-overhead",)),
            (f"lanes-m{args.margin_ms:g}", ROOT, mine, None, margin),
            ("one-lane", ROOT, one, None, off),
            ("full-only", ROOT, mine, "h100", off),
        ]
        if args.servers:
            servers = [sv for sv in servers if sv[0] in args.servers.split(",")]
        # The server that runs first does worse on this machine: the order rotates from
        # budget set to budget set (and with --seed) and is recorded.
        order = rotated(servers, k + args.seed)
        results["orders"][name] = [sv[0] for sv in order]
        for server, tree, repo, pin, extra in order:
            live = LiveServer(server, tree, repo, log, cpus)
            row[server] = point(live, f"{name}/{server}", texts, budgets, args, widths, pin,
                                extra, warm)  # fmt: skip
        results["points"][name] = {sv[0]: row[sv[0]] for sv in servers}
    results["loadavg_1m_end"] = os.getloadavg()[0]
    results["wall_seconds"] = time.perf_counter() - t0
    results["text_chars"] = args.text_chars
    publish(results, args.out, stem, plot, summarise(results))
    print(f"tokens per request: {results['tokens']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
