"""Distillation settings for the MiniLM goal tier (50 % heads, 50 % FFN): one run per
setting, the INN started on data-chosen nodes and refitted as ``calibrate_text`` does,
then distilled for ``--seconds`` with the given ``distil`` options; held-out cosine and
retrieval agreement as bench/transformers.py measures them.

Runs one setting per call (each 300 s of two cores; run them one after another, never
side by side) and appends a line to bench/results/transformers_sweep.jsonl:

    python -m bench.transformers_sweep NAME '{"lr": 0.001}' [--seconds 300]
        [--sentences 6000] [--seed 1] [--batch-size 32]

``--sentences``: a seeded subset of the calibration split (the teacher's pass over all
30,000 takes ~2 minutes and is not charged to the budget anyway; bench/transformers.py
measured 3,000 and 30,000 alike).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.transformers import (
    BATCH_SIZE,
    GOAL_TIER,
    MULTIPLE_OF,
    TIERS,
    load_text,
)
from runtime.demo.minilm import MAX_LENGTH, convert_minilm
from runtime.demo.training import seed_everything
from runtime.inn.distill import calibrate_text
from runtime.inn.fidelity import embed, evaluate
from runtime.inn.model import IntegralModel

OUT = Path(__file__).parent / "results" / "transformers_sweep.jsonl"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("options", type=json.loads, help="distil options as JSON, e.g. '{}'")
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--sentences", type=int, default=6000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument(
        "--shaped",
        action="store_true",
        help="the goal tier shaped by measured sensitivity (runtime.inn.shaping)",
    )
    p.add_argument("--counts", type=json.loads, default={},
                   help="channel counts per group over the goal tier's, as JSON")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    text, _ = load_text(MAX_LENGTH)
    inn = convert_minilm()
    width = {**TIERS[GOAL_TIER], "shaped": True} if args.shaped else TIERS[GOAL_TIER]
    if args.counts:
        width = {**inn.sizes(TIERS[GOAL_TIER], MULTIPLE_OF), **args.counts}
    full_emb = embed(inn.sample(1.0), *text["evaluation"])
    ids, mask = text["calibration"]
    pick = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))[: args.sentences]
    seed_everything(args.seed)
    t0 = time.perf_counter()
    tuned = calibrate_text(inn, ids[pick], mask[pick], [width], args.seconds,
                           multiple_of=MULTIPLE_OF, batch_size=args.batch_size, seed=args.seed,
                           progress=False, **args.options)  # fmt: skip
    sizes = tuned.sizes(width, MULTIPLE_OF)
    log = tuned.info["text_calibration"][IntegralModel.sizes_key(sizes)]
    row = {**evaluate(tuned.sample(sizes), text["evaluation"], full_emb), **log}
    row = {k: v for k, v in row.items() if not isinstance(v, (dict, list))}
    out = {"name": args.name, "options": args.options, "seconds": args.seconds,
           "sentences": args.sentences, "batch_size": args.batch_size, "counts": args.counts,
           "shaped": args.shaped, "sizes": sizes,
           "sensitivity": tuned.info.get("sensitivity"),
           **row,
           "wall": time.perf_counter() - t0}  # fmt: skip
    print(json.dumps(out))
    with OUT.open("a") as f:
        f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
