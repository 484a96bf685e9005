"""Cluster-scale plan: innfer's autoscaler signals vs latency-only, on a compressed day.

Both runs share one trace and one profile: N replicas, each the real scheduler (innfer
policy) with a simulated engine, behind a least-outstanding-requests balancer, sized by a
model of the HPA of deploy/k8s/base/hpa.yaml (period 15 s, up at once by +100 % or +4 pods,
down after 300 s of lower demand by 20 % or 1 pod a minute, 2..10 replicas). Signals:

  innfer    queue:compute ratio (target 1) and degraded share (target 0.2), per pod, 1 m
  latency   cluster p95 latency over 1 m vs 0.8 x the median budget (the baseline)

Trace: 24 "hours" in 24 simulated minutes, load 1.5 -> 6 replica-capacities (4x trough to
peak) with bursts of 2.5x (hour 8.5, 40 s), 2x (hour 15, 60 s) and 3x (hour 21, 30 s);
budgets uniform 20-100 ms. A replica's capacity is its full tier's throughput at max batch.
Also run: static max replicas, latency-only with a tighter target (0.7 x), both with a 60 s
pod start (engine build), the day with other seeds and burst times (totals only), a step to
a sustained overload (1.5 -> 8 replica-capacities), and one replica at constant loads (what
each signal reads).

Profile: bench/results/scheduler.json's "profile" (ResNet-18-like, ONNX Runtime, 1 CPU
thread) if present, else a synthetic one. Accuracy: FLOPs fractions from
runs/bench-scheduler/resnet18/tiers/*/tier.json if present, else width-like proxies.
Time scale k (default 10): engine times, budgets and the scheduler's rate window x k, so a
replica serves k times fewer requests per second and the run stays small; HPA, pod start
and trace clocks are unscaled. Latencies printed are divided by k (the profile's ms).

Writes bench/results/cluster.json and deploy/cluster-plan.png; prints the totals (~2 min on
2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from server.scheduling import TierInfo
from sim.cluster import ClusterConfig, format_totals, simulate_cluster

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "bench" / "results" / "scheduler.json"
TIER_DIR = ROOT / "runs" / "bench-scheduler" / "resnet18" / "tiers"
OUT_JSON = ROOT / "bench" / "results" / "cluster.json"
OUT_PNG = ROOT / "deploy" / "cluster-plan.png"
RESPONSE_LOADS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5, 2.0, 3.0)
NAMES = ("w100", "w075", "w050", "w025")
WIDTH_PROXY = {"w100": 1.0, "w075": 0.575, "w050": 0.266, "w025": 0.075}
# Shaped like the measured ResNet-18-like CPU profile (ms per batch of 1, 2, 4, 8).
SYNTHETIC = {
    "w100": (7.0, 13.2, 30.0, 49.4),
    "w075": (4.6, 8.2, 15.7, 31.2),
    "w050": (2.2, 4.4, 6.9, 16.1),
    "w025": (0.85, 1.8, 3.4, 6.5),
}


def load_profile() -> tuple[dict, str]:
    if PROFILE.is_file():
        profile = json.loads(PROFILE.read_text()).get("profile")
        if profile and set(NAMES) <= set(profile.get("tiers", {})):
            where = ", ".join(f"{profile.get(k)}" for k in ("device", "backend", "threads"))
            return profile, f"{PROFILE.relative_to(ROOT)} (device, backend, threads: {where})"
    tiers = {
        name: {
            str(b): {"p50_ms": v, "p90_ms": v * 1.1} for b, v in zip((1, 2, 4, 8), row, strict=True)
        }
        for name, row in SYNTHETIC.items()
    }
    return {"tiers": tiers}, "synthetic profile in bench/cluster.py (p90 = 1.1 x p50)"


def load_accuracy() -> tuple[dict, str]:
    files = {n: TIER_DIR / n / "tier.json" for n in NAMES}
    if all(f.is_file() for f in files.values()):
        recs = {n: json.loads(f.read_text()) for n, f in files.items()}
        if all(r.get("accuracy") is not None for r in recs.values()):
            return {n: float(r["accuracy"]) for n, r in recs.items()}, "measured accuracy"
        full = max(r["flops"] for r in recs.values())
        acc = {n: r["flops"] / full for n, r in recs.items()}
        return acc, f"FLOPs-fraction proxy from {TIER_DIR.relative_to(ROOT)}/*/tier.json"
    return dict(WIDTH_PROXY), "width-like proxies (1.0, 0.575, 0.266, 0.075)"


def make_tiers(profile: dict, acc: dict) -> tuple[list[TierInfo], dict]:
    tiers, p50 = [], {}
    for name in NAMES:
        table = profile["tiers"][name]
        p50[name] = {int(b): v["p50_ms"] for b, v in table.items()}
        p90 = {int(b): v["p90_ms"] for b, v in table.items()}
        tiers.append(TierInfo(name, acc[name], p90, p50[name]))
    return tiers, p50


def response(tiers, p50, base: ClusterConfig, loads=RESPONSE_LOADS) -> list[dict]:
    """What each signal reads on one replica at a constant load (multiples of its full-tier
    capacity): where queue:compute, degraded share and p95 cross their targets."""
    rows = []
    for load in loads:
        cfg = replace(
            base,
            autoscaler="innfer",
            trace="steps",
            steps=((0.0, load),),
            duration_s=120.0,
            initial_replicas=1,
            hpa=replace(base.hpa, min_replicas=1, max_replicas=1, window_s=100.0),
        )
        r = simulate_cluster(tiers, p50, cfg)
        t = r.totals
        rows.append(
            {
                "load": load,
                "queue_compute": r.ticks[-1]["queue_compute"],
                "degraded_share": r.ticks[-1]["degraded_share"],
                "p95_latency_ms": t["p95_latency_ms"],
                "slo_attainment": t["slo_attainment"],
                "mean_served_accuracy": t["mean_served_accuracy"],
            }
        )
    return rows


def format_response(rows: list[dict], cfg: ClusterConfig) -> str:
    hpa = cfg.hpa
    lat = 0.8 * sum(cfg.budget_ms) / 2  # the latency-only target, profile ms
    lines = [
        f"| load per replica | queue:compute (target {hpa.queue_compute_target:g}) "
        f"| degraded share (target {hpa.degraded_share_target:g}) "
        f"| p95 ms (latency-only target {lat:.0f}) | SLO | mean accuracy |",
        "|" + " --- |" * 6,
    ]
    for r in rows:
        lines.append(
            f"| {r['load']:.2f} | {r['queue_compute']:.2f} | {r['degraded_share']:.2f} "
            f"| {r['p95_latency_ms']:.0f} | {r['slo_attainment']:.2%} "
            f"| {r['mean_served_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def variants(tiers, p50, base: ClusterConfig, n: int) -> list[dict]:
    """The same day with other seeds and burst times: is the comparison robust?"""
    out = []
    for v in range(1, n + 1):
        rng = np.random.default_rng(100 + v)
        starts = np.sort(rng.uniform(6, 22, len(base.diurnal.bursts))) / 24
        bursts = tuple(
            (float(s), b[1], b[2]) for s, b in zip(starts, base.diurnal.bursts, strict=True)
        )
        cfg = replace(base, seed=v, diurnal=replace(base.diurnal, bursts=bursts))
        row = {"seed": v, "burst_hours": [round(float(s) * 24, 1) for s in starts]}
        for a in ("innfer", "latency"):
            t = simulate_cluster(tiers, p50, replace(cfg, autoscaler=a)).totals
            row[a] = {
                k: t[k]
                for k in (
                    "slo_attainment",
                    "mean_served_accuracy",
                    "replica_seconds",
                    "degraded_share",
                )
            }
        out.append(row)
        print(f"  seed {v}, bursts at hours {row['burst_hours']}")
    return out


def plot(runs: dict, cfg: ClusterConfig, path: Path, names=("innfer", "latency")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = (runs[n]["bins"] for n in names)
    hours = np.array(a["t_s"]) / cfg.diurnal.day_s * 24
    width = cfg.bin_s / cfg.diurnal.day_s * 24
    mid = hours + width / 2
    colors = {"innfer": "C0", "latency": "C3"}
    label = {"innfer": "innfer signals", "latency": "latency-only"}
    fig, ax = plt.subplots(4, 1, figsize=(10, 11), sharex=True)

    ax[0].fill_between(mid, a["offered_load"], step="mid", color="0.85", label="offered load")
    for n, bins in zip(names, (a, b), strict=True):
        ax[0].step(
            mid, bins["replicas_ready"], where="mid", color=colors[n], label=f"{label[n]}: ready"
        )
        ax[0].step(
            mid,
            bins["replicas_desired"],
            where="mid",
            color=colors[n],
            ls="--",
            lw=0.9,
            label=f"{label[n]}: desired",
        )
    ax[0].axhline(cfg.hpa.max_replicas, color="0.5", lw=0.6, ls=":")
    ax[0].set_ylabel("replicas / load\n(full-tier replica capacities)")
    ax[0].legend(fontsize=7, ncol=3, loc="upper left")

    bottom = np.zeros(len(hours))
    for j, (tier, share) in enumerate(a["tier_mix"].items()):
        v = np.array([x or 0.0 for x in share])
        ax[1].bar(
            hours,
            v,
            width,
            bottom=bottom,
            align="edge",
            label=tier,
            color=plt.cm.viridis(j / max(len(a["tier_mix"]) - 1, 1)),
        )
        bottom += v
    ax[1].set_ylabel("tier mix\n(innfer autoscaler)")
    ax[1].set_ylim(0, 1)
    ax[1].legend(fontsize=7, ncol=4, loc="lower left")

    for n, bins in zip(names, (a, b), strict=True):
        slo = [np.nan if x is None else x for x in bins["slo_attainment"]]
        acc = [np.nan if x is None else x for x in bins["mean_served_accuracy"]]
        t = runs[n]["totals"]
        ax[2].step(
            mid,
            slo,
            where="mid",
            color=colors[n],
            label=f"{label[n]} (total {t['slo_attainment']:.2%})",
        )
        ax[3].step(
            mid,
            acc,
            where="mid",
            color=colors[n],
            label=f"{label[n]} (mean {t['mean_served_accuracy']:.3f}, "
            f"{t['replica_seconds']:.0f} replica-s)",
        )
    lo = min(
        0.98, np.nanmin([x for x in a["slo_attainment"] + b["slo_attainment"] if x is not None])
    )
    ax[2].set_ylim(max(lo - 0.005, 0), 1.001)
    ax[2].set_ylabel("SLO attainment\n(per bin)")
    ax[2].legend(fontsize=7, loc="lower left")
    ax[3].set_ylabel("mean served accuracy\n(FLOPs fraction)")
    ax[3].legend(fontsize=7, loc="lower left")
    ax[3].set_xlabel(
        f"hour of the simulated day ({cfg.diurnal.day_s / 60:.0f} simulated "
        f"minutes; bins of {cfg.bin_s:.0f} s)"
    )
    ax[3].set_xlim(0, 24)
    ax[3].set_xticks(range(0, 25, 2))
    for burst in cfg.diurnal.bursts:
        for x in ax:
            x.axvspan(
                burst[0] * 24,
                burst[0] * 24 + burst[1] / cfg.diurnal.day_s * 24,
                color="orange",
                alpha=0.15,
                lw=0,
            )
    fig.suptitle(
        f"Cluster plan: innfer signals vs latency-only autoscaling "
        f"(pod start {cfg.pod_start_s:.0f} s; bursts shaded)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def run_all(tiers, p50, plan) -> dict:
    runs = {}
    for name, cfg in plan:
        t = time.perf_counter()
        r = simulate_cluster(tiers, p50, cfg)
        runs[name] = {**r.to_json(), "wall_s": time.perf_counter() - t}
        print(f"  {name:<32} {r.totals['requests']:>6} requests, {runs[name]['wall_s']:.1f} s")
    return runs


def format_variants(rows: list[dict]) -> str:
    lines = [
        "| seed | burst hours | innfer: accuracy / replica-s / SLO "
        "| latency-only: accuracy / replica-s / SLO |",
        "|" + " --- |" * 4,
    ]
    for r in rows:
        cells = [
            f"{r[a]['mean_served_accuracy']:.3f} / {r[a]['replica_seconds']:.0f} / "
            f"{r[a]['slo_attainment']:.2%}"
            for a in ("innfer", "latency")
        ]
        hours = ", ".join(f"{h:g}" for h in r["burst_hours"])
        lines.append(f"| {r['seed']} | {hours} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--time-scale", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pod-start", type=float, default=10.0, help="engine cache hit")
    p.add_argument(
        "--slow-start",
        type=float,
        default=60.0,
        help="engine build; also run both autoscalers with it (0: skip)",
    )
    p.add_argument(
        "--variants",
        type=int,
        default=3,
        help="also run both on N other seeds / burst times (totals only)",
    )
    p.add_argument("--json", type=Path, default=OUT_JSON)
    p.add_argument("--png", type=Path, default=OUT_PNG)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    profile, profile_src = load_profile()
    acc, acc_src = load_accuracy()
    tiers, p50 = make_tiers(profile, acc)
    print(
        f"profile:  {profile_src}\naccuracy: {acc_src}: "
        + ", ".join(f"{n} {a:.3f}" for n, a in acc.items())
    )
    base = ClusterConfig(
        time_scale=args.time_scale, seed=args.seed, pod_start_s=args.pod_start, initial_replicas=3
    )
    median_budget = sum(base.budget_ms) / 2e3 * base.time_scale
    plan = [
        ("innfer", base),
        ("latency", replace(base, autoscaler="latency")),
        (
            f"static-{base.hpa.max_replicas}",
            replace(base, autoscaler="static", initial_replicas=base.hpa.max_replicas),
        ),
        (
            "latency, target 0.7 x median budget",
            replace(
                base,
                autoscaler="latency",
                hpa=replace(base.hpa, latency_target_s=0.7 * median_budget),
            ),
        ),
    ]
    if args.slow_start:
        slow = replace(base, pod_start_s=args.slow_start)
        plan += [
            (f"innfer, start {args.slow_start:.0f} s", slow),
            (f"latency, start {args.slow_start:.0f} s", replace(slow, autoscaler="latency")),
        ]
    print("diurnal day:")
    runs = run_all(tiers, p50, plan)
    # A sudden sustained overload: 1.5 -> 8 replica-capacities at t = 60 s, for 5 minutes.
    step = replace(
        base,
        trace="steps",
        steps=((0.0, 1.5), (60.0, 8.0)),
        duration_s=360.0,
        initial_replicas=None,
    )
    print("step to a sustained overload:")
    steps = run_all(
        tiers, p50, [("innfer", step), ("latency", replace(step, autoscaler="latency"))]
    )
    print("variants:")
    sweep = variants(tiers, p50, base, args.variants) if args.variants else []
    curve = response(tiers, p50, base)
    tables = {
        "diurnal": format_totals({n: v["totals"] for n, v in runs.items()}),
        "step": format_totals({n: v["totals"] for n, v in steps.items()}),
        "variants": format_variants(sweep),
        "response": format_response(curve, base),
    }
    print(
        f"\ndiurnal day; pod start {args.pod_start:.0f} s unless stated; latencies in profile "
        f"ms (time scale {args.time_scale:g})\n{tables['diurnal']}"
    )
    print(f"\nstep 1.5 -> 8 replica-capacities at 60 s, 360 s\n{tables['step']}")
    print(f"\nthe day with other seeds and burst times\n{tables['variants']}")
    print(
        f"\none replica at constant load (120 s, signals over the last 100 s)\n{tables['response']}"
    )
    plot(runs, base, args.png)
    wall = time.perf_counter() - t0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "profile_source": profile_src,
                "accuracy_source": acc_src,
                "accuracy": acc,
                "profile": profile,
                "tables": tables,
                "wall_s": wall,
                "runs": runs,
                "step": steps,
                "variants": sweep,
                "response": curve,
            },
            indent=1,
        )
    )
    print(f"\nwrote {args.json} and {args.png} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
