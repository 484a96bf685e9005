"""all-MiniLM-L6-v2: one random-width distillation run against per-tier calibration, per time
spent (issue 13: "report one random-width-trained run ... and say which is better per time
spent").

  random_width   ``runtime.inn.width_distill.distil_widths``: the INN's node values trained
                 for ``--seconds`` (default 900: the three smaller tiers' 300 s each of
                 per-tier calibration) at the full width, the smallest tier (50 % heads,
                 25 % FFN) and 2 random widths per step (5 levels per kind), each distilled
                 from the source model with the loss ``calibrate_text`` uses; the tiers are
                 then the INN's plain samples on its uniform grid.
  per_tier       ``calibrate_text`` (data-chosen nodes, refit, distillation), 300 s per tier:
                 the ``inn_distil`` rows of bench/results/transformers.json, the same
                 corpus and machine in a separate run (read, not re-measured here).
  data_free      the INN's uniform-grid samples before any training (measured here).

Same calibration sentences, evaluation on the held-out ones (cosine to the full model,
top-1 / top-10 retrieval agreement), as bench/transformers.py. Writes
bench/results/transformers_random_width.json and .png.

    .venv/bin/python -m bench.transformers_random_width [--seconds 900]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.publish import publish
from bench.transformers import (
    BATCH_SIZE,
    MULTIPLE_OF,
    OUT,
    SEED,
    UNIFORM_TIERS,
    load_text,
    machine,
)
from runtime.demo.minilm import MAX_LENGTH, convert_minilm
from runtime.demo.training import seed_everything
from runtime.inn.fidelity import embed, evaluate
from runtime.inn.width_distill import distil_widths

SMALLEST = "h50_f25"
STEM = "transformers_random_width"


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    seed_everything(SEED)
    t0 = time.perf_counter()
    text, corpus = load_text(MAX_LENGTH)
    inn = convert_minilm()
    full_emb = embed(inn.sample(1.0), *text["evaluation"])
    sizes = {name: inn.sizes(w, MULTIPLE_OF) for name, w in UNIFORM_TIERS.items()}
    rows = {"data_free": {}, "random_width": {}}
    for name, s in sizes.items():
        rows["data_free"][name] = evaluate(inn.sample(s), text["evaluation"], full_emb)
    trained, log = distil_widths(inn, *text["calibration"], UNIFORM_TIERS[SMALLEST], args.seconds,
                                 multiple_of=MULTIPLE_OF, batch_size=BATCH_SIZE,
                                 seed=SEED)  # fmt: skip
    for name, s in sizes.items():
        rows["random_width"][name] = evaluate(trained.sample(s), text["evaluation"], full_emb)
        print(f"random_width {name:10s} cosine {rows['random_width'][name]['cosine']:.4f}",
              flush=True)  # fmt: skip
    per_tier = {}
    reference = args.per_tier
    if reference.is_file():
        doc = json.loads(reference.read_text())
        per_tier = {t: {k: r[k] for k in ("cosine", "top1", "top10", "seconds")}
                    for t, r in doc["methods"]["inn_distil"].items()}  # fmt: skip
        rows["per_tier"] = per_tier
    return {
        "rows": rows,
        "random_width_log": log,
        "seconds_random_width": args.seconds,
        "seconds_per_tier_total": sum(r["seconds"] for r in per_tier.values()),
        "per_tier_source": str(reference) if per_tier else None,
        "corpus": corpus,
        "machine": machine(),
        "wall_seconds": time.perf_counter() - t0,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = list(UNIFORM_TIERS)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    labels = {
        "data_free": "data-free INN",
        "random_width": f"random-width INN, {results['seconds_random_width']:.0f} s in all",
        "per_tier": f"per-tier calibration, {results['seconds_per_tier_total']:.0f} s in all",
    }
    for method, rows in results["rows"].items():
        xs = [i for i, t in enumerate(tiers) if t in rows]
        ax.plot(xs, [rows[tiers[i]]["cosine"] for i in xs], marker="o", label=labels[method])
    ax.axhline(0.95, color="grey", linestyle=":", label="issue goal at h50_f50")
    ax.set(xticks=range(len(tiers)), xticklabels=tiers, ylabel="mean cosine to full model",
           title="all-MiniLM-L6-v2: random widths vs per-tier, same time")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(results: dict) -> str:
    lines = [f"{'method':14s} {'tier':10s} {'cosine':>8s} {'top1':>6s} {'top10':>6s}"]
    for method, rows in results["rows"].items():
        for tier, r in rows.items():
            lines.append(f"{method:14s} {tier:10s} {r['cosine']:8.4f} {r['top1']:6.3f} "
                         f"{r['top10']:6.3f}")  # fmt: skip
    log = results["random_width_log"]
    lines.append(f"random width: {log['steps']} steps of {log['widths_per_step']} widths in "
                 f"{log['seconds']:.0f} s")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=900.0, help="random-width training budget")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--per-tier", type=Path, default=OUT / "transformers.json",
                   help="bench/transformers.py's results to compare with")  # fmt: skip
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    results = run(args)
    publish(results, args.out, STEM, plot, summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
