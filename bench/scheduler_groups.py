"""Grouped and pinned traffic on a scripted clock: this tree's scheduler against another
tree's, on the same arrivals, budgets and engine draws.

``innfer simulate`` has no request groups; a text model's length groups (requests of
different lengths never share a batch) and clients pinning a tier are where the planner's
head batch passes over queued requests of another class. Each scenario is Poisson arrivals
on the live ResNet-like CNN's profile (issue 18: w100 13.0 / 101.5 ms and w025 2.3 / 18.4 ms
at 1 / 8 rows, p90 1.1x p50), one slot, max batch 8, each batch taking the latency model's
p50 times a log-normal draw (sigma 0.05) - the profile's, fixed: not the scheduler's own
learned estimate, which each batch it is fed moves (a random walk that drifted to 2.6x the
profile within a run, and apart between the trees; review helper-181). Load is a multiple
of w025's full-batch capacity (435 rows/s); groups cut batches, so the capacity actually
available is lower.

Per (scenario, load, seed): attainment (answered within budget over all sent; refusals and
expiries count as misses), mean served accuracy, and how many requests were refused, expired
in the queue after admission (the failure review 178 found: admitted, then a plan that
served everyone was not the one run) and answered late.

    python -m bench.scheduler_groups --baseline-tree /tmp/base     # ~6 min on one core
    # -> bench/results/scheduler_groups.json, .png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.decision_cost import load_old  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
ACCURACY = {"w100": 0.99, "w075": 0.985, "w050": 0.97, "w025": 0.93}
CPU_MS = {"w100": (13.0, 101.5), "w075": (8.0, 62.0), "w050": (4.6, 35.0), "w025": (2.3, 18.4)}
SCENARIOS = {  # name -> (length groups, share pinned to w100, budget range ms)
    "4 groups, 30 ms": (4, 0.0, (30.0, 30.0)),
    "8 groups, U(20, 100) ms": (8, 0.0, (20.0, 100.0)),
    "8 groups, 10 % pinned, U(20, 100) ms": (8, 0.1, (20.0, 100.0)),
    "no groups, 10 % pinned, U(20, 100) ms": (1, 0.1, (20.0, 100.0)),
}
LOADS = (0.25, 0.5, 1.0)
SEEDS = tuple(range(1, 7))
REQUESTS = 2000
NOISE = 0.05


def p50_ms(tier: str, rows: int) -> float:
    """The profile's median batch time (ms): linear between 1 and 8 rows."""
    b1, b8 = CPU_MS[tier]
    return b1 + (b8 - b1) * (rows - 1) / 7


def tiers(mod) -> list:
    out = []
    for name in CPU_MS:
        p50 = {b: p50_ms(name, b) for b in (1, 2, 4, 8)}
        out.append(mod.TierInfo(name, ACCURACY[name], {b: v * 1.1 for b, v in p50.items()}, p50))
    return out


def arrivals(load: float, seed: int, groups: int, pinned: float, budget) -> list[tuple]:
    """(time s, budget s, group, pin) per request: the same for both trees."""
    rng = np.random.default_rng(seed)
    rate = load * 8 / (CPU_MS["w025"][1] / 1e3)
    t, out = 0.0, []
    for _ in range(REQUESTS):
        t += rng.exponential(1 / rate)
        group = int(rng.integers(groups)) if groups > 1 else None
        pin = "w100" if rng.random() < pinned else None
        out.append((t, rng.uniform(*budget) / 1e3, group, pin))
    return out


def run(mod, trace: list[tuple], seed: int) -> dict:
    """One slot on a scripted clock: arrivals, expiries, batches; every request's fate."""
    profile = tiers(mod)
    s = mod.Scheduler(profile, mod.make_policy("innfer", profile), max_batch=8, max_queue=256)
    draws = np.random.default_rng(10_000 + seed)  # engine noise, the same for both trees
    now, running, i = 0.0, None, 0
    met, late, refused, expired, served = 0, 0, 0, 0, []
    pinned_met = 0

    def pump() -> None:
        nonlocal running, expired
        expired += len(s.expire(now))
        if running is None and (d := s.next(now)) is not None:
            took = p50_ms(d.tier, d.rows) / 1e3 * math.exp(draws.normal(0.0, NOISE))
            running = (now + took, d, took)

    while i < len(trace) or running is not None:
        arrive = trace[i][0] if i < len(trace) else math.inf
        if running is not None and running[0] <= arrive:
            now, d, took = running
            running = None
            s.complete(d, now, took)
            for r in d.requests:
                if now <= r.deadline + 1e-12:
                    met += 1
                    pinned_met += r.pin is not None
                    served.append(ACCURACY[d.tier])
                else:
                    late += 1
        else:
            now, budget, group, pin = trace[i]
            try:
                s.submit(mod.Request(i, now, now + budget, group=group, pin=pin), now)
            except mod.Refused:
                refused += 1
            i += 1
        pump()
    expired += len(s.queue)  # (none: expiry empties a queue the slot cannot serve)
    return {
        "attainment": met / len(trace),
        "accuracy": float(np.mean(served)) if served else 0.0,
        "refused": refused,
        "expired": expired,
        "late": late,
        "pinned": sum(t[3] is not None for t in trace),
        "pinned_met": pinned_met,
    }


def summary(runs: list[dict]) -> dict:
    att = [r["attainment"] for r in runs]
    return {
        "attainment_mean": statistics.fmean(att),
        "attainment_median": statistics.median(att),
        "attainment_min": min(att),
        "attainment_max": max(att),
        "accuracy_mean": statistics.fmean(r["accuracy"] for r in runs),
        **{
            k: sum(r[k] for r in runs)
            for k in ("refused", "expired", "late", "pinned", "pinned_met")
        },
        "per_seed": runs,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCENARIOS), figsize=(4.2 * len(SCENARIOS), 3.6))
    for ax, name in zip(axes, SCENARIOS, strict=True):
        for impl, style in (("baseline", "o--"), ("this tree", "s-")):
            pts = [r for r in rows if r["scenario"] == name and r["impl"] == impl]
            x = [r["load"] for r in pts]
            y = [r["attainment_mean"] for r in pts]
            err = [[r["attainment_mean"] - r["attainment_min"] for r in pts],
                   [r["attainment_max"] - r["attainment_mean"] for r in pts]]  # fmt: skip
            ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=impl)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("load (x w025 full-batch capacity)")
        ax.set_ylim(0.0, 1.02)
    axes[0].set_ylabel(f"attainment, mean and range over {len(SEEDS)} seeds")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-tree", required=True, help="a tree holding server/scheduling")
    p.add_argument("--out", type=Path, default=OUT / "scheduler_groups.json")
    args = p.parse_args(argv)
    import server.scheduling as mine

    impls = {"baseline": load_old(args.baseline_tree), "this tree": mine}
    rows = []
    for name, (groups, pinned, budget) in SCENARIOS.items():
        for load in LOADS:
            traces = {seed: arrivals(load, seed, groups, pinned, budget) for seed in SEEDS}
            for impl, mod in impls.items():
                row = summary([run(mod, traces[seed], seed) for seed in SEEDS])
                rows.append({"scenario": name, "load": load, "impl": impl, **row})
                print(f"{name:38s} load {load:4.2f} {impl:9s} attainment mean "
                      f"{row['attainment_mean']:.4f} median {row['attainment_median']:.4f} "
                      f"range {row['attainment_min']:.4f}-{row['attainment_max']:.4f} "
                      f"accuracy {row['accuracy_mean']:.4f} refused {row['refused']} "
                      f"expired {row['expired']} late {row['late']} pinned met "
                      f"{row['pinned_met']}/{row['pinned']}", flush=True)  # fmt: skip
    meta = {"seeds": list(SEEDS), "requests": REQUESTS, "noise_sigma": NOISE,
            "baseline_tree": args.baseline_tree}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
