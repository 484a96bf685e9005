"""Bounded queues (model.yaml ``max_queue``) under overload: within budget and mean served
size, this tree and (``--baseline-tree``) an older one, the same arrivals and engine draws.

A queue that fills turns the overload away as "queue full" before any deadline check sees
a backlog; the planner must then choose tiers that keep up (docs/design.md, "A bounded
queue"). Two grids on the engine-time simulator (virtual clock, deterministic):

  * one lane - ``sim.simulator.simulate`` as `innfer simulate` runs it - for max_queue in
    4 / 8 / 16 / 32 / 1000, Poisson at 0.5-3x the full tier's capacity, budgets U(20, 100);
  * several lanes on one device (``sim.lanes``): two lanes of one model sharing its queue
    (a text model's length lanes; one at half the other's times), and two models with a
    queue each, max_queue 8 and 16, 1-3x.

The profile: ``--model-dir``'s (default the live benchmark's ResNet-18-like w50,
runs/bench-live/resnet18w50, when built), else the same numbers built in (tests/
test_queue_bound.py's). An older tree's server/ and sim/ are used through a subprocess
whose path starts at that tree; sim/lanes.py is this tree's, loaded by file (older trees
lack it).

    python -m bench.queue_bound [--baseline-tree DIR] [--duration 10] [--out queue_bound.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
MODEL_DIR = ROOT / "runs" / "bench-live" / "resnet18w50"
QUEUES = (4, 8, 16, 32, 1000)
LOADS = (0.5, 1.0, 2.0, 3.0)
LANE_QUEUES, LANE_LOADS = (8, 16), (1.0, 2.0, 3.0)
# ms per batch of 1 / 2 / 4 / 8 rows (ORT, one core): the issue-18 ResNet's profile
BUILT_IN = {
    "w100": (1.0, {1: 5.35, 2: 10.58, 4: 20.54, 8: 41.8}),
    "w075": (0.59, {1: 4.27, 2: 8.35, 4: 15.56, 8: 34.28}),
    "w050": (0.28, {1: 1.84, 2: 3.51, 4: 6.34, 8: 12.62}),
    "w025": (0.085, {1: 0.97, 2: 1.96, 4: 4.22, 8: 8.5}),
}


def profile(model_dir: Path | None):
    """(tiers, p50, where from)."""
    from server.scheduling import TierInfo

    if model_dir is not None and (model_dir / "profile.json").is_file():
        from sim.simulator import tiers_from_model_dir

        tiers, p50 = tiers_from_model_dir(model_dir)[:2]
        return tiers, p50, str(model_dir)
    tiers = [TierInfo(n, a, {b: v * 1.02 for b, v in m.items()}) for n, (a, m) in BUILT_IN.items()]
    return tiers, {n: dict(m) for n, (_, m) in BUILT_IN.items()}, "built in (ResNet-18-like w50)"


def grid(model_dir: Path | None, duration: float) -> dict:
    """Both grids for the tree whose server/ and sim/ are imported."""
    from sim.simulator import SimConfig, simulate

    spec = importlib.util.spec_from_file_location("_lanes", ROOT / "sim" / "lanes.py")
    lanes = importlib.util.module_from_spec(spec)
    sys.modules["_lanes"] = lanes  # (its dataclass looks its module up there)
    spec.loader.exec_module(lanes)
    tiers, p50, source = profile(model_dir)
    one = []
    for q in QUEUES:
        for load in LOADS:
            cfg = SimConfig(load=load, duration_s=duration, max_queue=q, seed=0, policy="innfer")
            s = simulate(tiers, p50, cfg).summary
            one.append({"max_queue": q, "load": load, "attainment": s["slo_attainment"],
                        "size": s["mean_served_accuracy"],
                        "refused_full": s["refused"].get("refused_full", 0),
                        "requests": s["requests"]})  # fmt: skip
    several = []
    for same in (True, False):
        for q in LANE_QUEUES:
            for load in LANE_LOADS:
                r = lanes.simulate_lanes(tiers, p50, {"short": 0.5, "long": 1.0}, q, load, same)
                several.append({"lanes": "one model" if same else "two models", "max_queue": q,
                                "load": load, "attainment": float(r.attainment),
                                "size": r.mean_size, "full_share": r.full_share})  # fmt: skip
    return {"profile": source, "one_lane": one, "lanes": several}


def tree_grid(tree: Path, model_dir: Path | None, duration: float) -> dict:
    """``grid`` with ``tree``'s server/ and sim/ (a subprocess: two trees cannot share one)."""
    cmd = [sys.executable, __file__, "--grid-only", "--tree", str(tree), "--duration",
           str(duration), *(["--model-dir", str(model_dir)] if model_dir else [])]  # fmt: skip
    got = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(got.stdout.strip().splitlines()[-1])


def plot(results: dict, path: Path) -> None:
    """Within budget vs load per max_queue, one lane; this tree solid, the baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, q in enumerate(QUEUES):
        for tree, style in (("current", "-"), ("baseline", "--")):
            rows = [r for r in results.get(tree, {}).get("one_lane", []) if r["max_queue"] == q]
            if rows:
                label = f"max_queue {q}" + (" (baseline)" if tree == "baseline" else "")
                x, y = [r["load"] for r in rows], [100 * r["attainment"] for r in rows]
                ax.plot(x, y, style, color=f"C{k}", marker="o", label=label)
    ax.set_xlabel("load (x the full tier's capacity)")
    ax.set_ylabel("within budget (%)")
    ax.set_title("Bounded queues, one lane (engine-time simulation)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-tree", type=Path, help="a checkout of an older commit")
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR if MODEL_DIR.is_dir() else None)
    p.add_argument("--duration", type=float, default=10.0, help="simulated seconds per cell")
    p.add_argument("--out", default="queue_bound.json", help="file name in bench/results")
    p.add_argument("--grid-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.grid_only:
        print(json.dumps(grid(args.model_dir, args.duration)))
        return 0
    results = {"current": tree_grid(ROOT, args.model_dir, args.duration)}
    if args.baseline_tree is not None:
        results["baseline"] = tree_grid(args.baseline_tree.resolve(), args.model_dir, args.duration)
    for tree, got in results.items():
        print(f"{tree} ({got['profile']})")
        for r in got["one_lane"]:
            print(f"  one lane  max_queue {r['max_queue']:4d} {r['load']:3g}x: "
                  f"{100 * r['attainment']:6.2f} % at size {r['size']:.3f} "
                  f"({r['refused_full']} of {r['requests']} refused as full)")  # fmt: skip
        for r in got["lanes"]:
            print(f"  {r['lanes']:10s} max_queue {r['max_queue']:2d} {r['load']:3g}x: "
                  f"{100 * r['attainment']:6.2f} % at size {r['size']:.3f} "
                  f"({100 * r['full_share']:.1f} % refused as full)")  # fmt: skip
    out = OUT / args.out
    out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    if "--tree" in sys.argv:  # the tree's server/ and sim/ first on the path
        sys.path.insert(0, sys.argv[sys.argv.index("--tree") + 1])
    else:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
