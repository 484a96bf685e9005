"""The scheduler benchmark's simulated grid, runnable against any source tree.

Every (profile, trace, load, policy) over the seeds, on a built model's profile.json: SLO
attainment and mean served size per seed, their mean and spread. ``bench/scheduler.py``
runs it in-process for this tree and, with ``--baseline-tree``, as a subprocess whose
``sys.path`` starts at the other tree - so the two policies run the same traces, budgets
and engine draws in one run. Imports only what every tree since the first scheduler has
(``sim.simulator``, ``sim.engine_time``); never torch.

    python bench/sim_grid.py --tree DIR --model-dir runs/bench-scheduler/resnet18 \
        --policies innfer --loads 0.5 1 --duration 60      # JSON rows on stdout

``--stalls P K`` adds one-off stalls (each batch K times its drawn time with probability
P: GC pauses, preemption) to the engine model, ``--traces poisson gamma-cv4`` narrows the
traces: what a change to the online latency correction is judged on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

LOADS = (0.5, 1.0, 1.5, 2.0, 3.0)
TRACES = (("poisson", 1.0), ("gamma", 1.0), ("gamma", 4.0), ("gamma", 8.0), ("varying", 1.0))
SEEDS = (0, 1, 2)
# The slow-full-tier profile's engine noise: 5 % log-normal, the second regime.
SLOW_NOISE = 0.05


def profiles(model_dir: Path) -> dict:
    """The repository's own profile, and one whose full tier is slow relative to the budgets:
    the same tiers scaled so that w100 at batch 1 takes a quarter of the smallest budget
    (5 ms of U(20, 100))."""
    from sim.engine_time import scale_tiers
    from sim.simulator import tiers_from_model_dir

    tiers, p50 = tiers_from_model_dir(model_dir)
    full = max(tiers, key=lambda t: t.accuracy)  # (any names: "w100" was assumed)
    k = 5.0 / min(full.latency_ms.values())
    return {"own": (tiers, p50), "slow-full-tier": scale_tiers(tiers, p50, k)}


def with_stalls(probability: float, factor: float) -> None:
    """Make every simulated batch, with ``probability``, take ``factor`` times its drawn
    time: one-off stalls (a GC pause, a page-fault storm) on top of the log-normal noise.
    The stall draws come from their own generator, seeded by the simulation's place in the
    grid (both trees run the grid in the same order): the engine's own draws are those of a
    run without stalls, and the k-th batch of a run stalls in both trees or in neither."""
    import itertools

    import numpy as np

    from sim import engine_time

    draw = engine_time.EngineTime.draw_s
    runs = itertools.count()

    def stalled(self, tier: str, rows: int) -> float:
        if not hasattr(self, "_stall_rng"):
            self._stall_rng = np.random.default_rng((7, next(runs)))
        t = draw(self, tier, rows)
        return t * factor if self._stall_rng.random() < probability else t

    engine_time.EngineTime.draw_s = stalled


def grid(
    model_dir: Path,
    policies: tuple[str, ...],
    loads: tuple[float, ...] = LOADS,
    duration: float = 20.0,
    seeds: tuple[int, ...] = SEEDS,
    label: str = "",
    traces: tuple[tuple[str, float], ...] = TRACES,
    margin_ms: float | None = None,
) -> list[dict]:
    """One row per (profile, trace, load, policy): the mean over ``seeds`` of attainment and
    size, their min / max, and the per-seed summaries. ``label`` is appended to the policy
    name (``innfer@baseline``). ``margin_ms``: the simulated server's budget margin, for a
    tree whose SimConfig has one (None: that tree's default; 0 plans with the whole
    budget, as trees before it did)."""
    from sim.simulator import SimConfig, simulate

    rows = []
    margin = {} if margin_ms is None else {"budget_margin_ms": margin_ms}
    for profile, (tiers, p50) in profiles(model_dir).items():
        noise = SLOW_NOISE if profile == "slow-full-tier" else None
        for trace, cv2 in traces:
            for load in loads:
                for policy in policies:
                    runs = []
                    for seed in seeds:
                        cfg = SimConfig(policy=policy, trace=trace, cv2=cv2, load=load,
                                        duration_s=duration, budget_ms=(20, 100), seed=seed,
                                        noise=noise, **margin)  # fmt: skip
                        runs.append(simulate(tiers, p50, cfg).summary)
                    att = [r["slo_attainment"] for r in runs]
                    size = [r["mean_served_accuracy"] or 0.0 for r in runs]
                    rows.append({
                        "profile": profile, "policy": policy + label, "load": load,
                        "trace": trace + (f"-cv{cv2:g}" if trace == "gamma" else ""),
                        "slo_attainment": statistics.fmean(att),
                        "slo_attainment_min": min(att), "slo_attainment_max": max(att),
                        "mean_served_accuracy": statistics.fmean(size),
                        "size_min": min(size), "size_max": max(size),
                        "missed": sum(round(r["requests"] * (1 - r["slo_attainment"]))
                                      for r in runs),
                        "requests": sum(r["requests"] for r in runs),
                        "per_seed": runs,
                    })  # fmt: skip
    return rows


def parse_trace(name: str) -> tuple[str, float]:
    """ "poisson" -> ("poisson", 1.0); "gamma-cv4" -> ("gamma", 4.0)."""
    kind, _, cv = name.partition("-cv")
    return kind, float(cv) if cv else 1.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, required=True, help="source tree to import from")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--policies", nargs="+", default=["innfer"])
    p.add_argument("--loads", nargs="+", type=float, default=list(LOADS))
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--label", default="")
    p.add_argument("--traces", nargs="+", help="e.g. poisson gamma-cv4 (default: all)")
    p.add_argument("--budget-margin-ms", type=float,
                   help="the simulated server's budget margin (trees that have one; 0: plan "
                        "with the whole budget, as older trees do)")  # fmt: skip
    p.add_argument(
        "--stalls",
        nargs=2,
        type=float,
        metavar=("P", "K"),
        help="each batch takes K times its drawn time with probability P",
    )
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.tree.resolve()))
    if args.stalls:
        with_stalls(*args.stalls)
    traces = TRACES if not args.traces else tuple(parse_trace(t) for t in args.traces)
    rows = grid(args.model_dir.resolve(), tuple(args.policies), tuple(args.loads),
                args.duration, label=args.label, traces=traces,
                margin_ms=args.budget_margin_ms)  # fmt: skip
    json.dump(rows, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
