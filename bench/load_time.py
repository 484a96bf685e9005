"""Time to ready: how long a server's load of a built model takes, this tree against another.

A load reads the model's files, opens each tier's cached engine, runs every tier once (the
warm-up) and, with ``profile_at_load`` (the default), times each tier briefly. Per model,
per ``profile_at_load`` setting and per tree, ``--rounds`` fresh processes each time one
``DataPlane.load`` (a process of its own per load: a second load in one process finds ONNX
Runtime and the page cache warm); the trees take turns, the first alternating by round.
Reported: the median and range of each, and the median of the paired per-round ratios
(this tree / the baseline).

Models: the live benchmark's ResNet-18-like CNN (``runs/bench-live``, bench/live_scheduler.py
builds it; 4 tiers, max_batch 8) and bench/server.py's MLP (``runs/bench-server``).

    python -m bench.load_time --baseline-tree /tmp/base [--rounds 5]
    # -> bench/results/load_time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "load_time.json"
MODELS = {  # model -> its repository
    "resnet18w50": ROOT / "runs" / "bench-live",
    "mlp": ROOT / "runs" / "bench-server",
}

# Run with the tree as the working directory: its server/ and runtime/ are imported.
CHILD = """
import asyncio, json, time
from server.config import ServerConfig
from server.dataplane import DataPlane
from server.metrics import Metrics

async def main():
    cfg = ServerConfig.from_dict({{"repository": {repo!r}, "grpc_port": 0,
                                   "profile_at_load": {profile}, "models": [{model!r}]}})
    plane = DataPlane(cfg, Metrics())
    t0 = time.perf_counter()
    await plane.load({model!r})
    took = time.perf_counter() - t0
    for m in plane.models.values():
        await m.stop()
    print(json.dumps({{"load_s": took}}))

asyncio.run(main())
"""


def one_load(tree: Path, repo: Path, model: str, profile: bool) -> float:
    code = CHILD.format(repo=str(repo), model=model, profile=profile)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["load_s"]


def summary(new: list[float], old: list[float]) -> dict:
    ratios = [a / b for a, b in zip(new, old, strict=True)]
    return {
        "this_tree_s": {"median": statistics.median(new), "min": min(new), "max": max(new),
                        "rounds": new},
        "baseline_s": {"median": statistics.median(old), "min": min(old), "max": max(old),
                       "rounds": old},
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-tree", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    trees = {"this tree": ROOT, "baseline": args.baseline_tree.resolve()}
    rows = []
    for model, repo in MODELS.items():
        if not (repo / model / "profile.json").is_file():
            print(f"{model}: {repo / model} is not built; skipped", file=sys.stderr)
            continue
        for profile in (True, False):
            times: dict[str, list[float]] = {name: [] for name in trees}
            for k in range(args.rounds):
                order = list(trees) if k % 2 == 0 else list(reversed(trees))
                for name in order:
                    times[name].append(one_load(trees[name], repo, model, profile))
            row = {"model": model, "profile_at_load": profile,
                   **summary(times["this tree"], times["baseline"])}  # fmt: skip
            rows.append(row)
            print(f"{model:12s} profile_at_load={profile!s:5s} this tree "
                  f"{row['this_tree_s']['median']:.3f} s vs baseline "
                  f"{row['baseline_s']['median']:.3f} s (paired ratio median "
                  f"{row['ratio_median']:.2f})", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"rounds": args.rounds, "baseline_tree": str(args.baseline_tree)}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
