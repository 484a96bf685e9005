"""The MiniLM demo's calibration at its default budget: what each tier keeps after
``calibrate_text`` at 60 s per tier, on the demo's 3,000 calibration sentences, scored on
1,000 held-out sentences (cosine to the full model, retrieval top-1 / top-10) with the
seconds and steps it spent. With ``--baseline-tree DIR`` an older checkout calibrates
the same tiers in the same run; with several ``--lr`` each tree runs at each peak rate, and
with several ``--sentences`` on each count of calibration sentences. Every arm (tree x rate
x count) runs once per repeat, the arms taking turns (repeat i: seed + i in
all of them; the order reversed on odd repeats, so none always runs first).

    python -m bench.demo_calibration [--baseline-tree DIR] [--repeats 2] [--seconds 60]
        [--lr 1e-3 3e-4] [--sentences 3000 10000] [--out bench/results/demo_calibration.json]

Each arm runs in its own process with ``PYTHONPATH`` set to its tree (this file is run by
path, so it imports only what both trees have: ``runtime.*``). Needs the ``[zoo]`` extra
(the packaged all-MiniLM-L6-v2). About 5 minutes per arm at 60 s per tier on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "demo_calibration.json"
EVALUATION = 1000


def arm(
    seconds: float, seed: int, threads: int, lr: float | None = None, sentences: int | None = None
) -> dict:
    """One calibration of the demo's tiers in this process's tree; per tier its scores.
    ``sentences``: calibration sentences (None: the demo's own count)."""
    import torch

    from runtime.demo.minilm import MAX_LENGTH, convert_minilm, tokenizer_path
    from runtime.demo.minilm_demo import CALIBRATION_SENTENCES, MULTIPLE_OF, tiers
    from runtime.demo.text_corpus import load as load_text
    from runtime.inn.distill import calibrate_text
    from runtime.inn.fidelity import embed, evaluate
    from runtime.inn.model import IntegralModel
    from runtime.repository.tokenizer import TextTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tok = TextTokenizer(tokenizer_path(), MAX_LENGTH)
    ids, mask = (
        torch.from_numpy(a)
        for a in tok.encode(load_text("calibration")[: sentences or CALIBRATION_SENTENCES])
    )
    held = tuple(torch.from_numpy(a) for a in tok.encode(load_text("evaluation")[:EVALUATION]))
    inn = convert_minilm(progress=False)
    full = embed(inn.sample(1.0), *held)
    widths = {t["name"]: t["width"] for t in tiers(True)[1:]}
    start = time.perf_counter()
    options = {} if lr is None else {"lr": lr}  # None: calibrate_text's own default
    tuned = calibrate_text(inn, ids, mask, list(widths.values()), seconds, seed=seed,
                           multiple_of=MULTIPLE_OF, progress=False, **options)  # fmt: skip
    out = {"wall_seconds": time.perf_counter() - start, "sentences": len(ids), "tiers": {}}
    for name, width in widths.items():
        sizes = tuned.sizes(width, MULTIPLE_OF)
        record = tuned.info["text_calibration"][IntegralModel.sizes_key(sizes)]
        scores = evaluate(tuned.sample(sizes), held, full)
        keep = (
            "seconds",
            "refit_seconds",
            "select_seconds",
            "distil_seconds",
            "steps",
            "kept",
            "check_cosine",
            "check_held_out",
        )
        out["tiers"][name] = {**{k: v for k, v in scores.items() if not isinstance(v, dict)},
                              **{k: record.get(k) for k in keep}}  # fmt: skip
    return out


def run_arm(tree: Path, lr: float | None, sentences: int | None, args, seed: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm",
           "--seconds", str(args.seconds), "--seed", str(seed),
           "--threads", str(args.threads),
           *(["--lr", str(lr)] if lr is not None else []),
           *(["--sentences", str(sentences)] if sentences is not None else [])]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the arm in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    """Per tier: median and range over the repeats of cosine, top-10 and steps."""
    out = {}
    for name in runs[0]["tiers"]:
        rows = [r["tiers"][name] for r in runs]
        out[name] = {k: {"median": statistics.median(r[k] for r in rows),
                         "min": min(r[k] for r in rows), "max": max(r[k] for r in rows)}
                     for k in ("cosine", "top10", "steps", "refit_seconds")}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-tree", type=Path)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seconds", type=float, default=60.0, help="per tier (the demo's default)")
    p.add_argument("--seed", type=int, default=0, help="repeat i runs seed + i, in both trees")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--lr", type=float, nargs="+", default=[None],
                   help="peak distillation learning rate(s), each an arm per tree "
                        "(default: distil's own)")  # fmt: skip
    p.add_argument("--sentences", type=int, nargs="+", default=[None],
                   help="calibration sentences, each an arm per tree and rate (default: the "
                        "demo's)")  # fmt: skip
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--arm", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.arm:
        # run by path, this file's folder leads sys.path - and bench/transformers.py would
        # then be imported as Hugging Face's transformers
        here = Path(__file__).resolve().parent
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
        print(json.dumps(arm(args.seconds, args.seed, args.threads, args.lr[0],
                             args.sentences[0])))  # fmt: skip
        return 0
    from bench.hardening import commit_of, trees_to_measure  # not in an arm: any tree's

    trees = trees_to_measure(p, args.baseline_tree, "runtime/inn/distill.py")
    arms = {name + ("" if len(args.lr) == 1 else f"_lr{lr:g}")
            + ("" if len(args.sentences) == 1 else f"_n{n}"): (tree, lr, n)
            for name, tree in trees.items() for lr in args.lr
            for n in args.sentences}  # fmt: skip
    runs: dict[str, list] = {name: [] for name in arms}
    result = {"seconds_per_tier": args.seconds, "threads": args.threads,
              "lr": args.lr if len(args.lr) > 1 else args.lr[0],
              "sentences": args.sentences if len(args.sentences) > 1 else args.sentences[0],
              "arms": {name: {"tree": tree.name, "lr": lr, "sentences": n}
                       for name, (tree, lr, n) in arms.items()},
              "seeds": [args.seed + i for i in range(args.repeats)],
              "evaluation_sentences": EVALUATION,
              "commits": {name: commit_of(tree) for name, tree in trees.items()},
              "runs": runs}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i in range(args.repeats):  # repeat i: seed + i in every arm
        for name in arms if i % 2 == 0 else reversed(arms):  # turns: none always first
            runs[name].append(run_arm(*arms[name], args, args.seed + i))
            print(name, i, json.dumps({t: (round(r["cosine"], 4), round(r["top10"], 4), r["steps"])
                                       for t, r in runs[name][-1]["tiers"].items()}))  # fmt: skip
            args.out.write_text(json.dumps(result, indent=1))  # an arm that fails loses no other
    result["summary"] = {name: summary(r) for name, r in runs.items()}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
