"""Auto-tiering live: `innfer serve` with auto_tiers against the same server with its
hand-written tiers, the same shifting load, one after the other in one run.

Model: the ResNet-18-like CNN of bench/live_scheduler.py (width 0.5, 3x224x224, random
weights: "accuracy" is the FLOPs fraction, so the figure is mean served size), its
repository and frontier as bench/auto_tiers.py prepares them (runs/bench-auto/). Two copies
of it: ``hand`` (model.yaml's w100/w075/w050/w025) and ``auto`` (the same plus auto_tiers
with a fast loop: window 20 s, checks every 5 s, at least 20 s between changes, 200
requests, drift 0.2; it starts on the hand-written tiers).

Load (tritonclient.grpc.aio, open loop, Poisson, seeded), C = the full tier's capacity
(max_batch / p50 at max_batch, profile.json):

  phase 1  --phase-s seconds at 0.5 C, budgets U(20, 100) ms
  phase 2  --phase2-s seconds (default --phase-s) at 1.0 C, 90 % of budgets U(5, 15) ms
           (``--tight-ms``), 10 % U(20, 100) ms

With ``--baseline-tree DIR`` (a checkout of an earlier release) a third arm, ``auto_prev``,
serves the same auto-tiering model from that tree: the release's change, in the same run.

The server is pinned to --server-cpus (default CPU 1), this process to the others; the
background `innfer tiers apply` inherits the server's CPU, at idle priority - its cost to serving
is part of what is measured. Per arm and phase: attainment (answered within budget / sent),
mean served size, failed requests (any code but OK and the scheduler's DEADLINE_EXCEEDED /
RESOURCE_EXHAUSTED refusals), attainment per 5 s bin; the auto arm's swaps (from its log:
when, from what to what, how long) and its attainment in the bins while an apply ran; and
every answer but OK - refusals included - of the requests that arrived while an apply ran
or within ``SWAP_AFTER_S`` of its swap (``around_swaps``). ``settled``: every arm's
attainment and mean served size over the same stretch of phase 2 - from ``SWAP_AFTER_S``
after the auto arms' last swap in it to the end - what each serves once auto-tiering has
answered the shift (the phase as a whole also counts the time it takes to).

Writes bench/results/auto_tiers_live.json and .png (``_tLO-HI`` with ``--tight-ms``,
``_p2-SECONDS`` with ``--phase2-s``).

    .venv/bin/python -m bench.auto_tiers_live [--phase-s 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hardening import commit_of
from bench.live_scheduler import LiveServer
from bench.order import rotated
from bench.publish import publish
from runtime.repository import ACTIVE_FILE
from sim.loadgen import run_load

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
SOURCE = ROOT / "runs" / "bench-auto" / "resnet18w50"
WORK = ROOT / "runs" / "bench-auto-live"
MODEL = "resnet18w50"
GOALS = {
    "max_tiers": 4, "window_s": 20.0, "simulate_requests": 1500,
    "rebuild": {"min_interval_s": 20.0, "check_interval_s": 5.0, "min_gain": 0.005,
                "min_requests": 200, "drift": 0.2},
}  # fmt: skip
# Failures: anything but an answer or the scheduler's own refusals (budget, full queue).
REFUSALS = ("OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "unsent")
# Seconds after a swap whose arrivals still count as around it (``around_swaps``): the old
# tiers finish what they hold and close, the new ones take their first batches.
SWAP_AFTER_S = 2.0
# The server's swap line: "tiers ['w100', 'w075'] -> frontier:w100,w056 (expected ...);
# swapped in 6.6 s" (the new set as the data plane names it: its source, then its tiers).
SWAP = re.compile(r"tiers (\[.*?\]) -> (?:[\w.]+:)?([\w.,-]+) .*swapped in ([\d.]+) s")


def prepare(arm: str) -> Path:
    """runs/bench-auto-live/<arm>/<model>: a copy of the prepared model, model.yaml with
    (auto, auto_prev) or without (hand) auto_tiers, no earlier choice."""
    if not (SOURCE / "frontier" / "frontier.json").is_file():
        raise SystemExit(f"{SOURCE} has no frontier: run python -m bench.auto_tiers first")
    dst = WORK / arm / MODEL
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(SOURCE, dst, ignore=shutil.ignore_patterns(ACTIVE_FILE, "auto"))
    config = yaml.safe_load((SOURCE / "model.yaml").read_text())
    config.pop("auto_tiers", None)
    if arm != "hand":
        config["auto_tiers"] = GOALS
    (dst / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dst.parent


def load(profile: dict, phase_s: float, seed: int, tight_ms=(5.0, 15.0), phase2_s=None):
    """(arrivals s, budgets s, shift s) of the two phases (the second ``phase2_s`` long,
    default ``phase_s``)."""
    batch = max(int(b) for b in profile["tiers"]["w100"])
    capacity = batch / profile["tiers"]["w100"][str(batch)]["p50_ms"] * 1e3
    rng = np.random.default_rng(seed)
    arrivals, budgets, start = [], [], 0.0
    phase2_s = phase_s if phase2_s is None else phase2_s
    for rate, tight, span in ((0.5 * capacity, 0.0, phase_s), (capacity, 0.9, phase2_s)):
        t = start + np.cumsum(rng.exponential(1 / rate, int(rate * span * 1.3) + 10))
        t = t[t < start + span]
        loose, narrow = rng.uniform(20, 100, len(t)), rng.uniform(*tight_ms, len(t))
        arrivals.append(t)
        budgets.append(np.where(rng.random(len(t)) < tight, narrow, loose) / 1e3)
        start += span
    return np.concatenate(arrivals), np.concatenate(budgets), phase_s


def widths(model_dir: Path) -> dict[str, float]:
    """Tier name -> FLOPs fraction of the full width, hand-written tiers and candidates."""
    out = {}
    frontier = json.loads((model_dir / "frontier" / "frontier.json").read_text())
    full = max(c["flops"] for c in frontier["candidates"])
    for c in frontier["candidates"]:
        out[c["name"]] = c["flops"] / full
    for t in (model_dir / "tiers").iterdir():
        rec = json.loads((t / "tier.json").read_text())
        out.setdefault(t.name, rec["flops"] / full)
    return out


def run_arm(arm: str, args, arrivals, budgets, shift, inputs, size) -> dict:
    repo = prepare(arm)
    log = OUT / f"{args.name}-{arm}.log"
    log.write_text("")
    tree = args.baseline_tree if arm == "auto_prev" else ROOT
    server = LiveServer(arm, tree, repo, log, args.server_cpus)
    try:
        info = server.start(arm, models=(MODEL,))
        t0, t0_wall = time.monotonic(), time.time()
        report = asyncio.run(run_load(server.address, MODEL, arrivals, budgets, inputs,
                                      max_seconds=args.end_s + 5))  # fmt: skip
        wall = time.monotonic() - t0
    finally:
        server.stop()
    codes = np.array(report.codes)
    met = ~np.isnan(report.latency_ms) & (report.latency_ms <= budgets * 1e3)
    served = np.array([size.get(t, np.nan) if t else np.nan for t in report.tiers])
    p1 = arrivals < shift
    swaps = swap_events(log.read_text(), t0_wall)
    return {
        "startup_s": info["startup_s"],
        "wall_s": wall,
        "phases": {
            "phase1": phase(p1, met, served, codes),
            "phase2": phase(~p1, met, served, codes),
        },
        "failed": {c: int((codes == c).sum()) for c in set(codes) if c not in REFUSALS},
        "swaps": swaps,
        "around_swaps": around_swaps(swaps, arrivals, codes),
        "tier_by_time": tier_changes(arrivals, report.tiers),
        "bins": bins(arrivals, met, served, args.end_s),
        "_outcomes": (met, served, codes),  # for ``settled``; not written
    }


def settled(arms: dict, arrivals, shift: float) -> dict:
    """Every arm's phase-2 figures from ``SWAP_AFTER_S`` after the auto arms' last swap in
    phase 2 (the latest of theirs: the same stretch for all) to the end; from the shift
    where none swapped in phase 2."""
    last = [s["at_s"] for r in arms.values() for s in r["swaps"]
            if s["at_s"] is not None and s["at_s"] >= shift]  # fmt: skip
    start = max(last) + SWAP_AFTER_S if last else shift
    mask = arrivals >= start
    out = {"from_s": start}
    for arm, r in arms.items():
        met, served, codes = r.pop("_outcomes")
        out[arm] = phase(mask, met, served, codes)
    return out


def swap_events(log_text: str, t0_wall: float) -> list[dict]:
    """The server log's swaps: from and to (tier lists), how long the apply took
    (``seconds``) and when it swapped (``at_s``: seconds from the load's start, by the log
    line's timestamp; None where the line has none)."""
    out = []
    for line in log_text.splitlines():
        m = SWAP.search(line)
        if m is None:
            continue
        try:
            ts = datetime.fromisoformat(json.loads(line)["ts"].replace("Z", "+00:00"))
            at = ts.timestamp() - t0_wall
        except (ValueError, KeyError, TypeError):
            at = None
        a, b, seconds = m.groups()
        out.append({"from": json.loads(a.replace("'", '"')), "to": b.split(","),
                    "seconds": float(seconds), "at_s": at})  # fmt: skip
    return out


def around_swaps(swaps: list[dict], arrivals, codes, after_s: float = SWAP_AFTER_S) -> dict:
    """The requests that arrived while an apply ran or within ``after_s`` of its swap: how
    many, and each answer other than OK - refusals included. ``failed`` leaves the
    scheduler's refusals out, which would hide requests a swap cost (the goal: none failed
    or dropped across a swap)."""
    inside = np.zeros(len(arrivals), dtype=bool)
    for s in swaps:
        if s["at_s"] is not None:
            inside |= (arrivals >= s["at_s"] - s["seconds"]) & (arrivals <= s["at_s"] + after_s)
    near = codes[inside]
    return {
        "after_s": after_s,
        "sent": int(inside.sum()),
        "not_ok": {c: int((near == c).sum()) for c in sorted(set(near)) if c != "OK"},
    }


def phase(mask, met, served, codes) -> dict:
    answered = ~np.isnan(served[mask])
    return {
        "sent": int(mask.sum()),
        # None, not NaN (invalid JSON) nor 1.0 (a vacuous "all met"), for a phase with no
        # requests (a --phase-s shorter than the first arrival)
        "attainment": float(met[mask].mean()) if mask.any() else None,
        "mean_served_size": float(served[mask][answered].mean()) if answered.any() else None,
        "refused": {c: int((codes[mask] == c).sum()) for c in set(codes[mask]) if c != "OK"},
    }


def tier_changes(arrivals, tiers) -> list[dict]:
    """When each tier was first and last seen serving (arrival time of the request)."""
    out: dict[str, list[float]] = {}
    for t, tier in zip(arrivals, tiers, strict=True):
        if tier:
            out.setdefault(tier, [t, t])[1] = t
    return [{"tier": k, "first_s": v[0], "last_s": v[1]} for k, v in sorted(out.items())]


def bins(arrivals, met, served, end_s: float, width: float = 5.0) -> dict:
    edges = np.arange(0, end_s + width, width)
    idx = np.digitize(arrivals, edges) - 1
    att, size = [], []
    for b in range(len(edges) - 1):
        m = idx == b
        att.append(float(met[m].mean()) if m.any() else None)
        s = served[m]
        size.append(float(np.nanmean(s)) if np.any(~np.isnan(s)) else None)
    return {"t": (edges[:-1] + width / 2).tolist(), "attainment": att, "size": size}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for arm, color in (("hand", "tab:gray"), ("auto", "tab:red"), ("auto_prev", "tab:blue")):
        if arm not in results["arms"]:
            continue
        b = results["arms"][arm]["bins"]
        axes[0].plot(b["t"], b["attainment"], color=color, label=arm)
        axes[1].plot(b["t"], b["size"], color=color, label=arm)
    for ax in axes:
        ax.axvline(results["phase_s"], color="k", lw=1)
    axes[0].set_ylabel("attainment (5 s bins)")
    axes[1].set_ylabel("mean served size (FLOPs)")
    axes[1].set_xlabel("time (s); black line: the shift")
    axes[0].legend(fontsize=8)
    axes[0].set_title("ResNet-18-like w50, live: hand-written tiers vs auto-tiering", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: dict) -> str:
    lines = []
    after = results.get("settled")
    if after is not None:
        for arm in results["arms"]:
            p = after[arm]
            size = "-" if p["mean_served_size"] is None else f"{p['mean_served_size']:.3f}"
            met = "-" if p["attainment"] is None else f"{p['attainment']:.2%}"
            lines.append(f"{arm:<5} settled (from {after['from_s']:.0f} s): {p['sent']} sent, "
                         f"attainment {met}, size {size}")  # fmt: skip
    for arm, r in results["arms"].items():
        for name, p in r["phases"].items():
            size = "-" if p["mean_served_size"] is None else f"{p['mean_served_size']:.3f}"
            met = "-" if p["attainment"] is None else f"{p['attainment']:.2%}"
            lines.append(f"{arm:<5} {name}: {p['sent']} sent, attainment {met}, "
                         f"size {size}, refused {p['refused'] or 'none'}")  # fmt: skip
        near = r.get("around_swaps")
        if near is not None and r["swaps"]:
            lines.append(
                f"{arm:<5} around swaps (while applying, and {near['after_s']:g} s after): "
                f"{near['sent']} sent, not OK {near['not_ok'] or 'none'}"
            )
        lines.append(f"{arm:<5} failed {r['failed'] or 'none'}; swaps " + (
            "; ".join(f"{s['from']} -> {s['to']} in {s['seconds']:.1f} s" for s in r["swaps"])
            or "none"))  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase-s", type=float, default=60.0)
    p.add_argument("--phase2-s", type=float, default=None,
                   help="phase 2's length (default: --phase-s); a longer one shows what "
                        "auto-tiering serves once it has answered the shift (results go to "
                        "NAME_p2-SECONDS.json)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-cpus", default="1")
    p.add_argument("--baseline-tree", type=Path,
                   help="also run auto-tiering served from this checkout (arm auto_prev; "
                        "e.g. a git worktree of the previous release), same load")  # fmt: skip
    p.add_argument("--tight-ms", default="5,15",
                   help="LO,HI: phase 2's tight budgets, U(LO, HI) ms (default 5,15); other "
                        "than the default, results go to auto_tiers_live_tLO-HI.json")  # fmt: skip
    args = p.parse_args(argv)
    try:
        args.tight_ms = tuple(float(v) for v in args.tight_ms.split(","))
    except ValueError:
        args.tight_ms = ()
    if len(args.tight_ms) != 2 or not 0 < args.tight_ms[0] <= args.tight_ms[1]:
        p.error("--tight-ms takes LO,HI in ms with 0 < LO <= HI, e.g. 10,30")
    lo, hi = (f"{v:g}" for v in args.tight_ms)
    args.name = "auto_tiers_live" if args.tight_ms == (5.0, 15.0) else f"auto_tiers_live_t{lo}-{hi}"
    if args.phase2_s is not None:
        if args.phase2_s <= 0:
            p.error("--phase2-s takes a length in seconds above 0")
        args.name += f"_p2-{args.phase2_s:g}"
    if args.phase_s <= 0:
        p.error("--phase-s takes a length in seconds above 0")
    args.server_cpus = {int(c) for c in args.server_cpus.split(",")}
    others = set(range(os.cpu_count() or 1)) - args.server_cpus
    if others:
        os.sched_setaffinity(0, others)
    t0 = time.perf_counter()
    profile = json.loads((SOURCE / "profile.json").read_text())
    arrivals, budgets, shift = load(profile, args.phase_s, args.seed, args.tight_ms,
                                    args.phase2_s)  # fmt: skip
    args.end_s = args.phase_s + (args.phase_s if args.phase2_s is None else args.phase2_s)
    x = np.random.default_rng(args.seed).standard_normal((1, 3, 224, 224)).astype(np.float32)
    size = widths(SOURCE)
    names = ("hand", "auto", *(["auto_prev"] if args.baseline_tree else []))
    # The arm that runs first does worse on this machine: the order rotates with the seed
    # (seeds 0, 1, 2 put each arm first once) and is recorded.
    order = rotated(names, args.seed)
    ran = {arm: run_arm(arm, args, arrivals, budgets, shift, {"input": x}, size)
           for arm in order}  # fmt: skip
    arms = {arm: ran[arm] for arm in names}
    after = settled(arms, arrivals, shift)
    results = {"phase_s": args.phase_s, "phase2_s": args.end_s - args.phase_s,
               "seed": args.seed, "requests": len(arrivals), "settled": after,
               "goals": GOALS, "server_cpus": sorted(args.server_cpus), "arms": arms,
               "arm_order": order,
               "baseline_tree": args.baseline_tree and commit_of(args.baseline_tree),
               "tight_ms": args.tight_ms,
               "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    publish(results, OUT, args.name, plot, table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
