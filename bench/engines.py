"""The ONNX Runtime engine against a plain ONNX Runtime session on the same ONNX file, and
the CPU engine options (intra-op threads, instances), in one process.

For every tier of the issue's ResNet-18-like CNN (width 0.5, 3x224x224; runs/bench-live,
built by bench/live_scheduler.py) and of the MLP (784-2048-2048-10; runs/bench-server,
built by bench/server.py), timed round-robin in one process (bench.tiers.interleaved_medians):
  plain     onnxruntime.InferenceSession(model.onnx), default (full) optimisation, 1 thread
  innfer    the engine innfer serves: built by the repository's engine cache, 1 thread
  previous  the engine of the previous release: optimised at ORT_ENABLE_EXTENDED (no NCHWc
            layout pass), saved as ONNX, loaded with the optimiser off
Reported: median ms at batch 1 and 8 and the ratio innfer / plain (goal: <= 1 within noise;
the previous release: 1.4x on the CNN in the issue, 1.5-2.5x in engines.json). Cold start:
seconds to load every tier from the engine cache, beside a plain session's creation (which
runs the optimiser) per tier.

CPU options on the full tiers at batch 8 (rows per second, 2 cores here):
  1 instance x 1 thread, 1 instance x 2 threads, 2 instances x 1 thread (two callers on
  one session, as two engine threads of a model with `instances: 2` run).

    python -m bench.engines [--repeats 40] [--rounds 5] [--runs 3]

The comparison runs pinned to one core (the last of this process's CPUs); the CPU options
use every core this process may run on.

Writes bench/results/engines.json and engines.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tiers import interleaved_medians
from runtime.repository import Repository

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
MODELS = {  # name -> (repository, model, input shape per row)
    "resnet18w50": (ROOT / "runs" / "bench-live", "resnet18w50", (3, 224, 224)),
    "mlp": (ROOT / "runs" / "bench-server", "mlp", (1, 28, 28)),
}
OPTION_SECONDS = 4.0  # per CPU-option point


class _Session:
    """A plain ORT session with the engine interface ``interleaved_medians`` calls."""

    def __init__(self, path: Path, threads: int = 1, optimise: bool = True) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if not optimise:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        t0 = time.perf_counter()
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.load_s = time.perf_counter() - t0

    def run(self, feeds):
        return self.session.run(None, feeds)


def previous_engine(onnx: Path, work: Path) -> _Session:
    """The previous release's engine: ORT_ENABLE_EXTENDED, saved, loaded unoptimised."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(work / f"{onnx.parent.name}.extended.onnx")
    so.intra_op_num_threads = 1
    ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
    return _Session(Path(so.optimized_model_filepath), optimise=False)


def compare(name: str, repeats: int, rounds: int, work: Path) -> dict:
    repo, model, shape = MODELS[name]
    Repository(repo).load(model)  # builds any engine the cache lacks (a new cache key)
    t0 = time.perf_counter()
    served = Repository(repo).load(model)  # every tier from the engine cache: a cold start
    load_all_s = time.perf_counter() - t0
    engines, load = {}, {}
    for tier, engine in served.engines.items():
        onnx = repo / model / "tiers" / tier / "model.onnx"
        plain = _Session(onnx)
        prev = previous_engine(onnx, work)
        engines[(tier, "plain")] = plain
        engines[(tier, "innfer")] = engine
        engines[(tier, "previous")] = prev
        load[tier] = {"plain_s": plain.load_s, "previous_s": prev.load_s}
    ms = interleaved_medians(engines, shape, repeats, rounds)
    rows = []
    for tier in served.engines:
        for batch in (1, 8):
            p, i, v = (ms[(tier, k, batch)] for k in ("plain", "innfer", "previous"))
            rows.append({
                "tier": tier, "batch": batch, "plain_ms": p, "innfer_ms": i, "previous_ms": v,
                "innfer_vs_plain": i / p, "previous_vs_plain": v / p,
            })  # fmt: skip
    return {"rows": rows, "load": load, "cached_load_all_tiers_s": load_all_s}


def merge_runs(runs: list[dict]) -> dict:
    """Per row the median over runs of each time and ratio, and the ratios' min and max."""
    rows = []
    for k, first in enumerate(runs[0]["rows"]):
        row = {"tier": first["tier"], "batch": first["batch"]}
        for key in ("plain_ms", "innfer_ms", "previous_ms", "innfer_vs_plain",
                    "previous_vs_plain"):  # fmt: skip
            values = [r["rows"][k][key] for r in runs]
            row[key] = float(np.median(values))
            if key.endswith("_vs_plain"):
                row[key + "_range"] = [min(values), max(values)]
        rows.append(row)
    return {
        "rows": rows,
        "load": runs[0]["load"],
        "cached_load_all_tiers_s": float(np.median([r["cached_load_all_tiers_s"] for r in runs])),
    }


def rows_per_s(session_run, x, callers: int, seconds: float) -> float:
    """Rows per second with ``callers`` threads calling ``session_run`` back to back."""
    done = [0] * callers
    stop = time.perf_counter() + seconds

    def caller(k: int) -> None:
        while time.perf_counter() < stop:
            session_run({"input": x})
            done[k] += len(x)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def cpu_options(name: str) -> dict:
    repo, model, shape = MODELS[name]
    onnx = repo / model / "tiers" / "w100" / "model.onnx"
    x = np.random.default_rng(0).standard_normal((8, *shape), dtype=np.float32)
    one, two = _Session(onnx, threads=1), _Session(onnx, threads=2)
    for s in (one, two):
        s.run({"input": x})
    return {
        "batch": 8,
        "cores": len(os.sched_getaffinity(0)),
        "1x1_rows_per_s": rows_per_s(one.run, x, 1, OPTION_SECONDS),
        "1x2threads_rows_per_s": rows_per_s(two.run, x, 1, OPTION_SECONDS),
        "2instances_x1_rows_per_s": rows_per_s(one.run, x, 2, OPTION_SECONDS),
    }


def summary(res: dict) -> str:
    lines = ["model        tier  batch  plain ms  innfer ms  previous ms  innfer/plain  prev/plain"]
    for name, m in res["models"].items():
        for r in m["rows"]:
            lo, hi = r["innfer_vs_plain_range"]
            lines.append(
                f"{name:12s} {r['tier']:5s} {r['batch']:5d} {r['plain_ms']:9.2f} "
                f"{r['innfer_ms']:10.2f} {r['previous_ms']:12.2f} "
                f"{r['innfer_vs_plain']:6.2f} ({lo:.2f}-{hi:.2f}) {r['previous_vs_plain']:11.2f}"
            )
    for name, o in res["options"].items():
        lines.append(
            f"{name}: w100 batch 8 rows/s - 1 instance x 1 thread {o['1x1_rows_per_s']:.0f}, "
            f"1 x 2 threads {o['1x2threads_rows_per_s']:.0f}, 2 instances x 1 thread "
            f"{o['2instances_x1_rows_per_s']:.0f} ({o['cores']} cores)"
        )
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["models"]), figsize=(6 * len(res["models"]), 4))
    for ax, (name, m) in zip(np.atleast_1d(axes), res["models"].items(), strict=True):
        labels = [f"{r['tier']}\nb{r['batch']}" for r in m["rows"]]
        x = np.arange(len(labels))
        for k, (key, label) in enumerate((("innfer_vs_plain", "innfer engine"),
                                          ("previous_vs_plain", "previous release"))):  # fmt: skip
            ax.bar(x + (k - 0.5) * 0.38, [r[key] for r in m["rows"]], 0.38, label=label)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("time / plain ORT session (same ONNX)")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=40, help="timed runs per tier and batch")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    p.add_argument("--runs", type=int, default=3, help="whole comparisons (spread: min-max)")
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    for n in names:
        repo, model, _ = MODELS[n]
        if not (repo / model / "profile.json").is_file():
            p.error(f"{repo / model} is not built; run bench/live_scheduler.py or bench/server.py")
    import onnxruntime

    cores = os.sched_getaffinity(0)
    pinned = {max(cores)}  # the comparison runs on one core: nothing else of ours beside it
    res = {
        "onnxruntime": onnxruntime.__version__, "threads": 1, "runs": args.runs,
        "comparison_cpus": sorted(pinned), "models": {}, "options": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            print(f"[engines] {n}: plain / innfer / previous, interleaved x{args.runs}", flush=True)
            os.sched_setaffinity(0, pinned)
            runs = [compare(n, args.repeats, args.rounds, Path(tmp)) for _ in range(args.runs)]
            os.sched_setaffinity(0, cores)
            res["models"][n] = merge_runs(runs)
            print(f"[engines] {n}: CPU options on {len(cores)} cores", flush=True)
            res["options"][n] = cpu_options(n)
    OUT.mkdir(exist_ok=True)
    (OUT / "engines.json").write_text(json.dumps(res, indent=1))
    plot(res, OUT / "engines.png")
    print(summary(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
