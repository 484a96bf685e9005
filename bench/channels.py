"""Channel search: do searched tiers run closer to their FLOPs ratio than rounded ones?

Model: the ResNet-18-like CNN (bench/models.py) at width 0.5, as in bench/live_scheduler.py
(converted, sampled at 0.5 with channels in multiples of 8, converted again), 3x224x224,
1,000 classes, untrained (torch seed --seed); tiers w100/w075/w050/w025, multiple_of 8, ONNX
Runtime with 1 intra-op thread, max batch 8. Built twice with the repository's pipeline into
runs/bench-channels/: ``plain`` (no channel_search: today's rounding) and ``searched``
(channel_search multiples [8, 16, 32], FLOPs proxy, since the model has no evaluation set).

Then the eight served engines (Repository.load, the ORT engines a server runs) are timed in
this one run at batch 8, round-robin across all of them with a rotating start (--rounds
timed runs each, median). Per tier and build: FLOPs ratio to its build's w100, latency ratio
to its build's w100, and latency ratio / FLOPs ratio - the issue's figure (w025 ran at 1.47x
its FLOPs ratio). Also each searched tier's candidates as tier.json recorded them, and the
two builds' wall times (the search's cost).

Where the search kept the baseline, both builds serve the same ONNX ("same" in the table):
their difference is this run's timing noise.

Writes bench/results/channels.json and channels.png, and prints a table. ``--tiers`` and
``--multiple-of`` try other tier sets (e.g. ``--multiple-of 1 --tiers w100=1,w030=0.3``, whose
channel counts are not lane-aligned) under another ``--stem``.

    .venv/bin/python -m bench.channels [--rounds 100] [--seed 0] [--reuse]
        [--tiers w100=1,w075=0.75,...] [--multiple-of 8] [--stem channels]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.live_scheduler import (  # the ResNet: the same model as the live benchmark
    BASE_WIDTH,
    CLASSES,
    INPUT,
    MAX_BATCH,
    MODEL,
    MULTIPLE_OF,
    THREADS,
    TIERS,
    model_yaml,
    resnet_inn,
)
from bench.publish import publish

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
RUNS = ROOT / "runs" / "bench-channels"
STEM = "channels"
SEARCH = {"multiples": [8, 16, 32]}
BUILDS = {"plain": None, "searched": SEARCH}


def build(seed: int, reuse: bool, tiers: dict[str, float], multiple_of: int) -> dict:
    """Build both repositories (unless --reuse finds them); wall seconds per build."""
    from runtime.build.pipeline import add_model, build_model
    from runtime.repository import Repository

    inn = resnet_inn(seed)
    seconds = {}
    for name, search in BUILDS.items():
        root = RUNS / name
        if not reuse:
            shutil.rmtree(root, ignore_errors=True)
        config = model_yaml(
            INPUT,
            CLASSES,
            tiers=[{"name": k, "width": w} for k, w in tiers.items()],
            multiple_of=multiple_of,
            **({"channel_search": search} if search else {}),
        )
        add_model(root, MODEL, inn, config)
        t0 = time.perf_counter()
        build_model(Repository(root), MODEL, backend="onnxruntime", profile=False)
        seconds[name] = time.perf_counter() - t0
    return seconds


def time_engines(engines: dict, rounds: int) -> dict:
    """Median ms per engine at batch MAX_BATCH, one run each per round, rotating the start."""
    x = np.random.default_rng(0).standard_normal((MAX_BATCH, *INPUT), dtype=np.float32)
    keys = list(engines)
    for k in keys:
        for _ in range(2):
            engines[k].run({"input": x})
    times = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t0 = time.perf_counter()
            engines[k].run({"input": x})
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def measure(rounds: int, tiers: list[str]) -> dict:
    from runtime.repository import Repository

    served = {name: Repository(RUNS / name).load(MODEL) for name in BUILDS}
    engines = {(b, t): served[b].engines[t] for b in BUILDS for t in tiers}
    ms = time_engines(engines, rounds)
    full = tiers[0]  # the tier the ratios are to (w100 by default)
    out = {}
    for b in BUILDS:
        records = served[b].tiers
        rows = {}
        for t in tiers:
            flops_ratio = records[t].flops / records[full].flops
            latency_ratio = ms[(b, t)] / ms[(b, full)]
            rows[t] = {
                "sizes": records[t].sizes,
                "flops": records[t].flops,
                "same_onnx_as_plain": records[t].onnx_sha256
                == served["plain"].tiers[t].onnx_sha256,
                "b8_ms": ms[(b, t)],
                "flops_ratio": flops_ratio,
                "latency_ratio": latency_ratio,
                "latency_over_flops": latency_ratio / flops_ratio,
            }
            search = records[t].channel_search
            if search is not None:
                rows[t]["chosen_multiples"] = search["candidates"][search["chosen"]]["multiples"]
                rows[t]["search"] = search
        out[b] = rows
    return out


def summarise(results: dict) -> str:
    plain = f"-- plain (multiple_of {results['multiple_of']}) --"
    lines = [
        f"ResNet-18-like w50, 224x224, ORT {THREADS} thread, batch {MAX_BATCH}, "
        f"{results['rounds']} interleaved rounds, multiple_of {results['multiple_of']}; builds: "
        + ", ".join(f"{b} {s:.0f} s" for b, s in results["build_seconds"].items()),
        f"{'tier':<6}{'FLOPs':>8}{'lat':>8}{'lat/FLOPs':>10}   {'FLOPs':>8}{'lat':>8}"
        f"{'lat/FLOPs':>10}  chosen (ONNX)",
        f"{'':<6}{plain:^26}   {'-- searched --':^26}",
    ]
    for t in results["tiers"]:
        p, s = results["plain"][t], results["searched"][t]
        chosen = s.get("chosen_multiples", "-")
        same = "same" if s["same_onnx_as_plain"] else "differs"
        lines.append(
            f"{t:<6}{p['flops_ratio']:>8.3f}{p['latency_ratio']:>8.3f}"
            f"{p['latency_over_flops']:>10.2f}   {s['flops_ratio']:>8.3f}"
            f"{s['latency_ratio']:>8.3f}{s['latency_over_flops']:>10.2f}  {chosen} ({same})"
        )
    lines.append("\nsearched tiers' candidates (as tier.json recorded them at build time):")
    for t in results["tiers"]:
        search = results["searched"][t].get("search")
        if search is None:
            continue
        for i, c in enumerate(search["candidates"]):
            lat = "-" if c["latency_ms"] is None else f"{c['latency_ms']:.2f} ms"
            flops = "-" if c["flops"] is None else f"{c['flops'] / 1e6:.0f} MFLOPs"
            mark = "*" if i == search["chosen"] else " "
            lines.append(f" {mark} {t} multiples {c['multiples']}: {flops}, {lat}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", label="latency = FLOPs")
    for b, marker in zip(BUILDS, "os", strict=True):
        rows, tiers = results[b], results["tiers"]
        fr = [rows[t]["flops_ratio"] for t in tiers]
        lr = [rows[t]["latency_ratio"] for t in tiers]
        ax.plot(fr, lr, marker=marker, label=b)
        for t, x, y in zip(tiers, fr, lr, strict=True):
            ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel(f"FLOPs ratio to {results['tiers'][0]}")
    ax.set_ylabel(f"latency ratio to {results['tiers'][0]} (ORT, batch {MAX_BATCH})")
    ax.set_title("channel search: tier latency vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=100, help="timed runs per engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="keep runs/bench-channels if built")
    p.add_argument("--tiers", type=_tiers, default=TIERS, help="name=width,... (full first)")
    p.add_argument("--multiple-of", type=int, default=MULTIPLE_OF)
    p.add_argument("--stem", default=STEM, help="output file names under --out")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    seconds = build(args.seed, args.reuse, args.tiers, args.multiple_of)
    results = {
        "model": "bench.models.ResNet18Like",
        "base_width": BASE_WIDTH,
        "input": INPUT,
        "multiple_of": args.multiple_of,
        "tiers": list(args.tiers),
        "widths": args.tiers,
        "threads": THREADS,
        "batch": MAX_BATCH,
        "channel_search": SEARCH,
        "rounds": args.rounds,
        "seed": args.seed,
        "build_seconds": seconds,
        **measure(args.rounds, list(args.tiers)),
    }
    results["wall_seconds"] = time.perf_counter() - t0
    publish(results, args.out, args.stem, plot, summarise(results))
    return 0


def _tiers(text: str) -> dict[str, float]:
    """``w100=1,w030=0.3`` -> {"w100": 1.0, "w030": 0.3}."""
    pairs = [item.split("=") for item in text.split(",")]
    return {name.strip(): float(width) for name, width in pairs}


if __name__ == "__main__":
    sys.exit(main())
