"""Auto-tiering against hand-written tiers and the best fixed set, when the traffic shifts.

Models: the demo model (`innfer demo`: the small ResNet on MNIST, trained at random widths;
accuracy on 1,000 test digits) and the ResNet-18-like CNN of the live benchmarks (width 0.5,
3x224x224, untrained random weights: its "accuracy" is the FLOPs fraction, the scheduler's
proxy, so its figures are mean served size, not accuracy). Each gets ``auto_tiers`` in a
copy of its repository and its frontier measured by the build's own code
(runtime/build/frontier.py) on this machine; the hand-written tiers are its model.yaml's
w100/w075/w050/w025.

Traffic (Poisson, seeded), in two phases of ``--phase-s`` seconds each, scaled to the model:
with T = the full tier's p50 at batch 1 and C = its capacity (max_batch / p50 at max_batch),

  phase 1   budgets U(1.5 T, 8 T) at 0.5 C     (ResNet: U(20, 100) ms, the issue's first phase)
  phase 2   90 % of budgets U(0.4 T, 1.2 T), 10 % as phase 1, at 1.0 C
            (ResNet: mostly 5-15 ms)

Arms, all replayed by the server's scheduler on a virtual clock (sim.simulator.replay) with
engine times drawn from the frontier's measurements, the same draws for every arm:

  hand      model.yaml's tiers throughout
  fixed     the set sim.tiering.choose picks for phase 1 (on another seed's phase-1 traffic),
            throughout: the best an operator could fix offline
  auto      the server's control loop: every ``check_interval_s``, where the traffic of the
            last ``window_s`` (from its last change in budgets or rows, where it holds one:
            server.traffic.since_change) drifted from what the live set was chosen for, a
            choice on it
            (at most ``simulate_requests`` requests), applied when it gains ``min_gain``;
            the new set serves from the check + the measured time of that choice (wall
            clock, this machine) + 1 s for the reload. It starts with ``fixed``.
  auto_prev the same, choosing as the previous release did (``keep_fastest: false``: a set
            need not keep the fastest candidate), starting from its own phase-1 choice
            Segments between swaps are replayed separately (a queue is not carried across a
            swap; the live swap serves it on the old tiers - tests/test_auto_tiers.py). The
            new segment starts on an empty device, which can only flatter auto for requests
            arriving within the longest budget after a swap: their count and share are
            reported per run (``swap_exposure``), the bound of that bias.

Per arm and phase: attainment (answered within budget / sent), mean served accuracy (over
answered), served accuracy (misses count 0), mean served width; auto's swaps with when, what
and how long the choice took. Seeds --seeds; mean and spread (min..max) over seeds.

Writes bench/results/auto_tiers.json and auto_tiers.png; with ``--models`` a subset, the other
models' results are carried over from the file there.

    .venv/bin/python -m bench.auto_tiers [--models mnist,resnet18w50] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.publish import publish
from innfer.tiers import hand_options
from runtime.repository import ACTIVE_FILE, Repository
from runtime.repository.config import AutoTiersConfig, RebuildConfig
from server.traffic import drifted, since_change
from sim.simulator import SimConfig
from sim.tiering import Traffic, choose, frontier_options, outcomes

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
WORK = ROOT / "runs" / "bench-auto"
SOURCES = {  # model -> (repository it is copied from, how to make it)
    "mnist": (ROOT / "runs" / "demo" / "repository", "make run (innfer demo)"),
    "resnet18w50": (ROOT / "runs" / "bench-live", "python -m bench.live_scheduler"),
}
ARMS = ("hand", "fixed", "auto", "auto_prev")
RELOAD_S = 1.0  # allowance for the reload after a choice (engines come from the cache)


def prepare(model: str, goals: dict) -> Repository:
    """A copy of ``model``'s repository with ``auto_tiers`` and its frontier built."""
    from runtime.build.frontier import build_frontier

    src_root, how = SOURCES[model]
    src = src_root / model
    if not (src / "profile.json").is_file():
        raise SystemExit(f"{src} is not built: run {how} first")
    dst = WORK / model
    if not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("frontier", ACTIVE_FILE))
    config = yaml.safe_load((src / "model.yaml").read_text())
    config["auto_tiers"] = goals
    (dst / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (dst / ACTIVE_FILE).unlink(missing_ok=True)
    repo = Repository(WORK)
    t0 = time.perf_counter()
    build_frontier(repo, model, progress=True)
    print(f"{model}: frontier ready in {time.perf_counter() - t0:.0f} s")
    return repo


def phases(options, names, phase_s: float, seed: int) -> tuple[Traffic, float]:
    """The two-phase traffic (see the module doc) and the shift time."""
    full = options[names[0]]
    t1 = full.p50[1]
    batch = max(full.p50)
    capacity = batch / full.p50[batch] * 1e3  # rows per second
    rng = np.random.default_rng(seed)
    parts, start = [], 0.0
    for load, tight in ((0.5, 0.0), (1.0, 0.9)):
        n = int(load * capacity * phase_s * 1.3) + 10
        t = start + np.cumsum(rng.exponential(1 / (load * capacity), n))
        t = t[t < start + phase_s]
        loose = rng.uniform(1.5 * t1, 8 * t1, len(t))
        narrow = rng.uniform(0.4 * t1, 1.2 * t1, len(t))
        parts.append((t, np.where(rng.random(len(t)) < tight, narrow, loose)))
        start += phase_s
    arrivals = np.concatenate([p[0] for p in parts])
    budgets = np.concatenate([p[1] for p in parts])
    return Traffic(arrivals, budgets, np.ones(len(arrivals), dtype=int)), phase_s


def window(traffic: Traffic, lo: float, hi: float) -> Traffic:
    keep = (traffic.arrival_s >= lo) & (traffic.arrival_s < hi)
    a = traffic.arrival_s[keep]
    return Traffic(a, traffic.budget_ms[keep], traffic.rows[keep])


def control_loop(options, start_set, traffic, goals, sim, end_s) -> list[dict]:
    """Auto's swaps: [{at, tiers, choice_s, gain}] starting with ``start_set`` at 0."""
    sets = [{"at": 0.0, "tiers": list(start_set), "choice_s": 0.0, "gain": 0.0}]
    rebuild = goals.rebuild
    t = rebuild.check_interval_s
    chosen_for = None  # as server/autotier.py: choose again only when the traffic moved
    while t < end_s:
        recent = window(traffic, t - goals.window_s, t)
        # as the server: from a shift within the requests a choice replays
        start = since_change((recent.arrival_s, recent.budget_ms, recent.rows), rebuild.drift,
                             rebuild.min_requests, within=goals.simulate_requests)  # fmt: skip
        recent = window(recent, recent.arrival_s[start], t) if start else recent
        live = sets[-1]
        summary = recent.summary()
        if (
            len(recent) >= rebuild.min_requests
            and t - live["at"] >= rebuild.min_interval_s
            and (chosen_for is None or drifted(chosen_for, summary, rebuild.drift))
        ):
            t0 = time.perf_counter()
            c = choose(options, recent, goals, (options, live["tiers"]), sim)
            took = time.perf_counter() - t0
            chosen_for = summary
            if c.worth(rebuild.min_gain):  # as the server decides (server/autotier.py)
                at = t + took + RELOAD_S
                sets.append({"at": at, "tiers": list(c.best.tiers), "choice_s": took,
                             "gain": c.gain, "checked_at": t})  # fmt: skip
        t += rebuild.check_interval_s
    return sets


def run_arm(options, sets, traffic, sim) -> dict:
    """Replay ``traffic`` with the tier sets in force over time; per-request outcomes."""
    n = len(traffic)
    met = np.zeros(n, dtype=bool)
    acc = np.zeros(n)
    width = np.full(n, np.nan)
    bounds = [s["at"] for s in sets[1:]] + [np.inf]
    lo = 0.0
    for s, hi in zip(sets, bounds, strict=True):
        idx = np.flatnonzero((traffic.arrival_s >= lo) & (traffic.arrival_s < hi))
        lo = hi
        if len(idx) == 0:
            continue
        seg = Traffic(traffic.arrival_s[idx], traffic.budget_ms[idx], traffic.rows[idx])
        m, a, w, _ = outcomes(options, s["tiers"], seg, sim)
        met[idx], acc[idx], width[idx] = m, a, w
    return {"met": met, "accuracy": acc, "width": width}


def swap_exposure(sets: list[dict], traffic: Traffic) -> dict:
    """Requests whose outcome the empty queue at a replayed swap can change: those arriving
    within the longest budget after it (later ones see a queue the new tiers built
    themselves). ``share``: of every request sent."""
    horizon = float(traffic.budget_ms.max()) / 1e3 if len(traffic) else 0.0
    exposed = np.zeros(len(traffic), dtype=bool)
    for s in sets[1:]:
        exposed |= (traffic.arrival_s >= s["at"]) & (traffic.arrival_s < s["at"] + horizon)
    n = int(exposed.sum())
    return {"requests": n, "share": n / len(traffic) if len(traffic) else 0.0,
            "horizon_s": horizon}  # fmt: skip


def summarise(arm: dict, mask: np.ndarray) -> dict:
    met, acc, width = arm["met"][mask], arm["accuracy"][mask], arm["width"][mask]
    answered = ~np.isnan(width)
    return {
        "requests": int(mask.sum()),
        "attainment": float(met.mean()) if len(met) else None,  # no requests: no figure
        "mean_served_accuracy": float(acc[answered].mean()) if answered.any() else None,
        "served_accuracy": float(np.where(met, acc, 0.0).mean()) if len(met) else None,
        "mean_served_width": float(width[answered].mean()) if answered.any() else None,
    }


def one_model(model: str, args, goals: AutoTiersConfig) -> dict:
    repo = prepare(model, _goals_yaml(goals))
    from runtime.repository import FRONTIER_DIR, FRONTIER_FILE, Frontier

    frontier = Frontier.read(repo.model_dir(model) / FRONTIER_DIR / FRONTIER_FILE)
    options = frontier_options(frontier, goals.accuracy_floor)
    hand, hand_names = hand_options(repo, model, frontier)
    config = repo.config(model)
    sim = SimConfig(slo_target=config.slo_target, max_batch=config.max_batch,
                    max_queue=config.max_queue, slots=config.instances)  # fmt: skip
    # The scheduler sees tier names: keep the hand-written ones apart from candidates'.
    merged_hand = [f"hand:{n}" for n in hand_names]
    merged = {**options, **{
        f"hand:{n}": dataclasses.replace(o, tier=dataclasses.replace(o.tier, name=f"hand:{n}"))
        for n, o in hand.items()
    }}  # fmt: skip
    runs = []
    for seed in args.seeds:
        traffic, shift = phases(hand, hand_names, args.phase_s, seed)
        offline, _ = phases(hand, hand_names, args.phase_s, seed + 1000)
        t0 = time.perf_counter()
        fixed = choose(options, window(offline, 0, shift), goals, (merged, merged_hand), sim)
        fixed_s = time.perf_counter() - t0
        sets = control_loop(options, fixed.best.tiers, traffic, goals, sim, 2 * args.phase_s)
        fixed_set = [{"at": 0.0, "tiers": list(fixed.best.tiers)}]
        # The previous release's choice (keep_fastest off), started and run the same way.
        prev_goals = dataclasses.replace(goals, keep_fastest=False)
        prev = choose(options, window(offline, 0, shift), prev_goals, (merged, merged_hand), sim)
        prev_sets = control_loop(
            options, prev.best.tiers, traffic, prev_goals, sim, 2 * args.phase_s
        )
        arms = {
            "hand": run_arm(merged, [{"at": 0.0, "tiers": merged_hand}], traffic, sim),
            "fixed": run_arm(options, fixed_set, traffic, sim),
            "auto": run_arm(options, sets, traffic, sim),
            "auto_prev": run_arm(options, prev_sets, traffic, sim),
        }
        p1 = traffic.arrival_s < shift
        result = {
            "seed": seed,
            "requests": len(traffic),
            "fixed_set": list(fixed.best.tiers),
            "fixed_choice_s": fixed_s,
            "auto_sets": sets,
            "auto_prev_sets": prev_sets,
            "swap_exposure": {
                "auto": swap_exposure(sets, traffic),
                "auto_prev": swap_exposure(prev_sets, traffic),
            },
            "arms": {
                a: {"phase1": summarise(v, p1), "phase2": summarise(v, ~p1)}
                for a, v in arms.items()
            },
            "timeline": timeline(arms, traffic, 2 * args.phase_s),
        }
        runs.append(result)
        print(_seed_line(model, result))
    return {
        "model": model,
        "accuracy_source": frontier.accuracy_source,
        "hand_tiers": hand_names,
        "frontier": [dataclasses.asdict(c) for c in frontier.pareto()],
        "candidates": len(frontier.candidates),
        "full_p50_b1_ms": hand[hand_names[0]].p50[1],
        "runs": runs,
        "summary": aggregate(runs),
    }


def timeline(arms: dict, traffic: Traffic, end_s: float, bins: int = 40) -> dict:
    edges = np.linspace(0, end_s, bins + 1)
    idx = np.clip(np.digitize(traffic.arrival_s, edges) - 1, 0, bins - 1)
    out = {"t": ((edges[:-1] + edges[1:]) / 2).tolist()}
    for a, v in arms.items():
        served = np.where(v["met"], v["accuracy"], 0.0)
        out[a] = [float(served[idx == b].mean()) if np.any(idx == b) else None
                  for b in range(bins)]  # fmt: skip
    return out


def _spread(v: list[float]) -> dict:
    """mean, min and max of ``v``; None each when it is empty (nothing to average)."""
    if not v:
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}


def aggregate(runs: list[dict]) -> dict:
    """Per arm and phase the spread of each figure over the seeds that have it, and the
    goal: auto - hand in phase 2, every seed. A seed where either arm has no phase-2 accuracy
    or attainment (nothing answered, or nothing sent) is no evidence: it is counted in
    ``seeds_without_figures`` and the goal is then not met (never a crash on an empty set)."""
    out = {}
    for arm in ARMS:
        for phase in ("phase1", "phase2"):
            for k in ("attainment", "mean_served_accuracy", "served_accuracy",
                      "mean_served_width"):  # fmt: skip
                v = [r["arms"][arm][phase][k] for r in runs if r["arms"][arm][phase][k] is not None]
                out.setdefault(arm, {}).setdefault(phase, {})[k] = _spread(v)
    gain, att = [], []
    for r in runs:
        auto, hand = r["arms"]["auto"]["phase2"], r["arms"]["hand"]["phase2"]
        keys = ("mean_served_accuracy", "attainment")
        if any(x[k] is None for x in (auto, hand) for k in keys):
            continue
        gain.append(auto["mean_served_accuracy"] - hand["mean_served_accuracy"])
        att.append(auto["attainment"] - hand["attainment"])
    missing = len(runs) - len(gain)
    out["auto_minus_hand_phase2"] = {
        "mean_served_accuracy": _spread(gain),
        "attainment": _spread(att),
        "seeds_without_figures": missing,
    }
    out["goal_met"] = bool(gain) and not missing and min(gain) >= 0.02 and min(att) >= 0.0
    return out


def _seed_line(model: str, r: dict) -> str:
    a = r["arms"]

    def fig(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    cells = [f"{k} {fig(a[k]['phase2']['mean_served_accuracy'], '.4f')}/"
             f"{fig(a[k]['phase2']['attainment'], '.1%')}" for k in ARMS]  # fmt: skip
    swaps = ", ".join(f"{s['at']:.0f}s {'+'.join(s['tiers'])}" for s in r["auto_sets"][1:])
    return (
        f"{model} seed {r['seed']}: phase 2 acc/attainment "
        + "  ".join(cells)
        + f"  (auto swaps: {swaps or 'none'})"
    )


def _goals_yaml(goals: AutoTiersConfig) -> dict:
    d = dataclasses.asdict(goals)
    d["widths"] = list(d["widths"])
    return {k: v for k, v in d.items() if v is not None}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 7.5), squeeze=False)
    colors = {"hand": "tab:gray", "fixed": "tab:blue", "auto": "tab:red",
              "auto_prev": "tab:orange"}  # fmt: skip
    for j, m in enumerate(models):
        r0 = m["runs"][0]
        ax = axes[0][j]
        for arm, c in colors.items():
            ax.plot(r0["timeline"]["t"], r0["timeline"][arm], color=c, label=arm)
        for s in r0["auto_sets"][1:]:
            ax.axvline(s["at"], color="tab:red", ls=":", lw=1)
        ax.axvline(m["phase_s"], color="k", lw=1)
        ax.set_title(f"{m['model']}: served accuracy over time (seed {r0['seed']}; "
                     "misses count 0)", fontsize=9)  # fmt: skip
        ax.set_xlabel("time (s); black: the shift, dotted: auto's swaps")
        ax.legend(fontsize=8)
        ax = axes[1][j]
        s = m["summary"]
        xs = np.arange(len(colors))
        for k, (key, label) in enumerate((("mean_served_accuracy", "mean served acc"),
                                          ("attainment", "attainment"))):  # fmt: skip
            got = [s[a]["phase2"][key] for a in colors]  # None (no figure) plots as nothing
            vals = [np.nan if g["mean"] is None else g["mean"] for g in got]
            pairs = list(zip(vals, got, strict=True))
            lo = [0.0 if g["mean"] is None else v - g["min"] for v, g in pairs]
            hi = [0.0 if g["mean"] is None else g["max"] - v for v, g in pairs]
            ax.bar(xs + k * 0.4, vals, 0.38, yerr=[lo, hi], label=label, alpha=0.8)
        ax.set_xticks(xs + 0.2, list(colors))
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{m['model']}: phase 2 (after the shift), mean and min..max over "
                     f"{len(m['runs'])} seeds", fontsize=9)  # fmt: skip
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _spread_text(d: dict, fmt: str, with_range: bool = True) -> str:
    if d["mean"] is None:
        return "-"
    text = format(d["mean"], fmt)
    return f"{text} [{d['min']:{fmt}}..{d['max']:{fmt}}]" if with_range else text


def table(results: dict) -> str:
    lines = []
    for m in results["models"]:
        s = m["summary"]
        lines.append(f"\n{m['model']} ({m['accuracy_source']}); phase 2, mean [min..max] over "
                     f"{len(m['runs'])} seeds:")  # fmt: skip
        for arm in ARMS:
            p = s[arm]["phase2"]
            lines.append(
                f"  {arm:<9} mean served acc {_spread_text(p['mean_served_accuracy'], '.4f')}"
                f"  attainment {_spread_text(p['attainment'], '.2%')}"
                f"  width {_spread_text(p['mean_served_width'], '.3f', False)}"
            )
        d = s["auto_minus_hand_phase2"]
        acc, att = d["mean_served_accuracy"], d["attainment"]
        verdict = "met" if s["goal_met"] else "NOT met"
        without = d.get("seeds_without_figures")
        lines.append(
            f"  auto - hand: accuracy {_spread_text(acc, '+.4f')}, "
            f"attainment {_spread_text(att, '+.2%')}; goal (>= "
            f"+0.02 at equal or better attainment, every seed) {verdict}"
            + (f" ({without} seeds without phase-2 figures)" if without else "")
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mnist,resnet18w50")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--phase-s", type=float, default=None,
                   help="seconds per phase (default: 600; 20 for mnist)")  # fmt: skip
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    models = []
    for model in args.models.split(","):
        # Seconds scale with the model: the mnist net serves ~100x the ResNet's rate, so its
        # phases are shorter for a like number of requests and checks.
        long = model != "mnist"
        phase_s = args.phase_s or (600.0 if long else 20.0)
        goals = AutoTiersConfig(
            max_tiers=4, window_s=60.0 if long else 2.0, simulate_requests=2000,
            rebuild=RebuildConfig(min_interval_s=120.0 if long else 4.0,
                                  check_interval_s=30.0 if long else 1.0, min_gain=0.005,
                                  min_requests=200),
        )  # fmt: skip
        m = one_model(model, argparse.Namespace(**{**vars(args), "phase_s": phase_s}), goals)
        m["phase_s"] = phase_s
        m["goals"] = _goals_yaml(goals)
        models.append(m)
    results = {"models": carried(models, OUT / "auto_tiers.json"), "seeds": args.seeds,
               "reload_s": RELOAD_S, "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    publish(results, OUT, "auto_tiers", plot, table(results))
    return 0


def carried(models: list[dict], previous: Path) -> list[dict]:
    """``models`` and, after them, the models of the ``previous`` results that this run did
    not measure (``--models`` a subset), each marked with where its figures come from."""
    try:
        old = json.loads(previous.read_text())["models"]
    except (OSError, ValueError, KeyError):
        return models
    ran = {m["model"] for m in models}
    kept = [{**m, "measured": m.get("measured") or f"carried over from {previous.name}"}
            for m in old if m["model"] not in ran]  # fmt: skip
    return models + kept


if __name__ == "__main__":
    raise SystemExit(main())
