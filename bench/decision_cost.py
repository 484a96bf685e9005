"""What one scheduling decision costs, old (HEAD) code vs new, measured in the same run.

A decision is one ``Scheduler.next(now)``: the snapshot, the policy's choice and the
bookkeeping of the requests it starts. An admission is one ``Scheduler.submit`` of a new
request into the same queue (refused or not). Each is timed on queues of 100, 1,000 and
2,000 requests (and 8: the live case of 8 clients), built directly (not through admission,
which would refuse most of a deep queue), in deadline order, with budgets of 20-100 ms
counted from arrival times up to 15 ms ago (a queue the server could hold):

  * unconstrained: one row each, no pins;
  * constrained: 10% pinned to a random tier, 10% with a random min_tier, 20% of 2-4 rows;
  * grouped: one row each, no pins, each of ``GROUPS`` groups (a text model's length
    buckets: requests of different groups never share a batch).

Two profiles: ``cpu`` is the live ResNet-like CNN of issue 18 (w100 13.0 / 101.5 ms and
w025 2.3 / 18.4 ms at batch 1 / 8, p90 = 1.1 x p50), on which a queue of 1,000 with such
budgets cannot be served and plans fail early; ``gpu`` is the same 40x faster, so most of a
deep queue can be served and the plan checks run through the whole queue - the expensive
case.

The old code is HEAD's ``server/scheduling`` (``git show HEAD:...`` into a temporary
package) or a directory given with ``--old`` that holds ``server/scheduling``; it is loaded
under another package name, so both run in one process. The garbage collector is off while
timing. Times are wall-clock microseconds on this machine (shared and noisy): compare the
two columns of one run, not runs with each other.

Writes bench/results/decision_cost.json and prints a table.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import server.scheduling as new_scheduling  # noqa: E402

OUT = Path(__file__).parent / "results" / "decision_cost.json"
FILES = ("__init__", "_kernel", "device", "latency", "plan", "policy", "request", "scheduler")
SIZES = (8, 100, 1000, 2000)
NAMES = ("w100", "w075", "w050", "w025")
ACCURACY = {"w100": 0.99, "w075": 0.985, "w050": 0.97, "w025": 0.93}
# ms at batch 1 / 8 (w100, w025 measured live; w075, w050 in between), linear between.
CPU = {"w100": (13.0, 101.5), "w075": (8.0, 62.0), "w050": (4.6, 35.0), "w025": (2.3, 18.4)}
BATCHES = (1, 2, 4, 8)
SPREAD = 1.1  # p90 / p50
BUDGET_MS = (20.0, 100.0)
AGE_MS = 15.0
GROUPS = 32
MIXES = ("unconstrained", "constrained", "grouped")


def tiers(mod, scale: float) -> list:
    out = []
    for name in NAMES:
        b1, b8 = CPU[name]
        p50 = {b: (b1 + (b8 - b1) * (b - 1) / 7) / scale for b in BATCHES}
        p90 = {b: v * SPREAD for b, v in p50.items()}
        out.append(mod.TierInfo(name, ACCURACY[name], p90, p50))
    return out


def load_old(old_dir: str | None):
    """HEAD's server/scheduling as the package ``old_scheduling``."""
    tmp = Path(tempfile.mkdtemp(prefix="decision-cost-"))
    pkg = tmp / "old_scheduling"
    pkg.mkdir()
    for name in FILES:
        rel = f"server/scheduling/{name}.py"
        if old_dir is not None:
            src = Path(old_dir) / rel
            if not src.is_file():
                continue
            text = src.read_text()
        else:
            got = subprocess.run(
                ["git", "show", f"HEAD:{rel}"], cwd=ROOT, capture_output=True, text=True
            )
            if got.returncode != 0:
                continue  # a module HEAD does not have
            text = got.stdout
        (pkg / f"{name}.py").write_text(text)
    sys.path.insert(0, str(tmp))
    return importlib.import_module("old_scheduling")


def queue_spec(n: int, mix: str, rng: np.random.Generator) -> list[dict]:
    constrained = mix == "constrained"
    now = 0.0
    budgets = rng.uniform(*BUDGET_MS, n) / 1e3
    ages = rng.uniform(0.0, AGE_MS, n) / 1e3
    spec = []
    for k in range(n):
        r = {"deadline": float(now - ages[k] + budgets[k])}
        if constrained:
            u = rng.random()
            if u < 0.1:
                r["pin"] = NAMES[rng.integers(len(NAMES))]
            elif u < 0.2:
                r["min_tier"] = NAMES[rng.integers(len(NAMES) - 1)]
            if rng.random() < 0.2:
                r["rows"] = int(rng.integers(2, 5))
        if mix == "grouped":
            r["group"] = int(rng.integers(GROUPS))
        spec.append(r)
    spec.sort(key=lambda r: r["deadline"])
    return spec


def build(mod, tier_list, spec: list[dict], old: bool):
    """A scheduler holding ``spec`` as its queue, built without admission."""
    s = mod.Scheduler(
        tier_list, mod.make_policy("innfer", tier_list), max_batch=8, max_queue=len(spec) + 10
    )
    old = hasattr(s, "_constrained")  # a scheduler from before the queue kept its columns
    for i, r in enumerate(spec):
        req = mod.Request(i, -AGE_MS / 1e3, **r)
        s.queue.append(req)
        s._keys.append((0, req.deadline, i))
        if old:
            s._constrained += req.pin is not None or req.min_tier is not None or req.rows != 1
    if not old:
        # Built as requests arrive and batches complete, not per decision: the columns (per
        # submit) and the latency tables (per observed batch).
        s.columns()
        s.ctx.tables()
    s._seq = iter(range(len(spec) + 1, 10**9))
    return s


def refill(mod, s, d, old: bool) -> None:
    """Put requests like the ones decision ``d`` started back in the queue (untimed, as if
    they had just arrived), so that every decision sees a queue of the same length."""
    old = hasattr(s, "_constrained")  # see build
    for r in d.requests:
        req = mod.Request(r.id, r.arrival, r.deadline, r.rows, r.pin, r.min_tier, group=r.group)
        key = s._key(req)
        i = bisect.bisect(s._keys, key)
        s._keys.insert(i, key)
        s.queue.insert(i, req)
        if old:
            s._constrained += req.pin is not None or req.min_tier is not None or req.rows != 1
        else:
            s._cols.insert(i, req, s.ctx)


def turns(impls, samples: int) -> list[str]:
    """The order of timed calls: ``samples`` per implementation, in rounds of one call each,
    the order reversed every round (no implementation always first), so that every
    implementation has as many samples (a p99 over 60 is not one over 200) and all of them
    interleaved over the same stretch of a shared, noisy machine."""
    impls = list(impls)
    return [impl for k in range(samples) for impl in (impls if k % 2 else impls[::-1])]


def time_decisions(mods, tier_lists, spec, samples: int) -> tuple[dict, list]:
    """Per implementation, ``samples`` timed decisions, each at the full queue length:
    the started requests are completed (their engine time the profiled p50, teaching the
    latency model as a server would) and put back, untimed. The implementations take turns
    (``turns``), so that both see the same machine (shared, noisy)."""
    scheds = {impl: build(mods[impl], tier_lists[impl], spec, impl == "old") for impl in mods}
    times = {impl: [] for impl in mods}
    work = []
    for impl in turns(mods, samples):
        s = scheds[impl]
        gc.disable()
        t0 = time.perf_counter_ns()
        d = s.next(0.0)
        t1 = time.perf_counter_ns()
        gc.enable()
        times[impl].append((t1 - t0) / 1e3)
        if impl == "new":
            work.append(s.policy.work)
        s.complete(d, 0.0, s.latency.typical(d.tier, d.rows))  # the engine as profiled
        refill(mods[impl], s, d, impl == "old")
    return times, work


def time_admissions(mods, tier_lists, spec, samples: int, seed: int, grouped: bool) -> dict:
    """Per implementation, ``samples`` timed ``submit`` calls of a new request (deadline
    20-100 ms; ``grouped``: of a random one of ``GROUPS`` groups) into the queue, taking
    turns as in ``turns`` (each round's request the same for all); one admitted is
    cancelled again (untimed), so the queue stays as built."""
    scheds = {impl: build(mods[impl], tier_lists[impl], spec, impl == "old") for impl in mods}
    rng = np.random.default_rng(seed)
    times = {impl: [] for impl in mods}
    order = turns(mods, samples)
    for k in range(samples):
        deadline = float(rng.uniform(*BUDGET_MS) / 1e3)
        group = int(rng.integers(GROUPS)) if grouped else None
        for impl in order[k * len(mods) : (k + 1) * len(mods)]:
            mod, s = mods[impl], scheds[impl]
            req = mod.Request(10**6 + k, 0.0, deadline, rows=1, group=group)
            gc.disable()
            t0 = time.perf_counter_ns()
            try:
                s.submit(req, 0.0)
                admitted = True
            except mod.Refused:
                admitted = False
            t1 = time.perf_counter_ns()
            gc.enable()
            times[impl].append((t1 - t0) / 1e3)
            if admitted:
                s.cancel(req, 0.0)
    return times


def noise_floor(samples: int) -> dict:
    """The same timing of a fixed workload (pure Python and numpy, ~0.3 ms): its p99 / p50
    is what this machine's scheduling noise alone does to a p99."""
    a = np.arange(1000.0)
    times = []
    for _ in range(samples):
        gc.disable()
        t0 = time.perf_counter_ns()
        sum(range(10_000))
        for _ in range(20):
            np.cumsum(a)
        t1 = time.perf_counter_ns()
        gc.enable()
        times.append((t1 - t0) / 1e3)
    return stats(times)


def stats(times: list[float]) -> dict:
    return {
        "p50_us": float(np.percentile(times, 50)),
        "p99_us": float(np.percentile(times, 99)),
        "samples": len(times),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", help="directory holding the old server/scheduling (default: HEAD)")
    p.add_argument(
        "--samples", type=int, default=200,
        help="decisions and admissions timed per case and implementation (the same for old "
        "and new: a p99 over fewer samples is not comparable)",
    )  # fmt: skip
    p.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    p.add_argument("--mixes", nargs="*", default=list(MIXES), choices=MIXES)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    mods = {"old": load_old(args.old), "new": new_scheduling}
    samples = args.samples
    rows = []
    for profile, scale in (("cpu", 1.0), ("gpu", 40.0)):
        tier_lists = {impl: tiers(mod, scale) for impl, mod in mods.items()}
        for mix in args.mixes:
            for n in args.sizes:
                spec = queue_spec(n, mix, np.random.default_rng(n + 7 * MIXES.index(mix)))
                dec, work = time_decisions(mods, tier_lists, spec, samples)
                adm = time_admissions(mods, tier_lists, spec, samples, n, mix == "grouped")
                for impl in mods:
                    row = {
                        "profile": profile,
                        "queue": n,
                        "mix": mix,
                        "impl": impl,
                        "decision": stats(dec[impl]),
                        "admission": stats(adm[impl]),
                    }
                    if impl == "new":
                        row["requests_and_batches_looked_at_p50"] = float(np.median(work))
                    rows.append(row)
                    print(
                        f"{profile:4} {mix:13} {n:5} {impl:3}  decision p50 "
                        f"{row['decision']['p50_us']:8.0f} p99 {row['decision']['p99_us']:8.0f} us"
                        f"   admission p50 {row['admission']['p50_us']:8.0f} "
                        f"p99 {row['admission']['p99_us']:8.0f} us",
                        flush=True,
                    )
    floor = noise_floor(args.samples * 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "rows": rows,
        "goal": goal(rows),
        "noise_floor": floor,
        "note": " ".join(__doc__.split("\n\n")[1:3]),
    }
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {args.out}")
    print(table(rows))
    print(f"goal (p99 <= 500 us at 1,000 queued, constrained): {doc['goal']}")
    print(
        f"noise floor (a fixed ~0.3 ms workload timed the same way): p50 "
        f"{floor['p50_us']:.0f} us, p99 {floor['p99_us']:.0f} us"
    )
    return 0


def goal(rows: list[dict]) -> dict:
    """Issue 18's goal: one decision <= 0.5 ms p99 at 1,000 queued requests with pins,
    min_tier and multi-row requests mixed in - per profile, the new code's p99 there."""
    p99 = {
        r["profile"]: r["decision"]["p99_us"]
        for r in rows
        if r["impl"] == "new" and r["mix"] == "constrained" and r["queue"] == 1000
    }
    # Not judged (None) where the run left that case out (--mixes, --sizes): "not met" read
    # as a failure of a run that never measured it.
    return {"p99_us_at_1000_constrained": p99, "limit_us": 500.0,
            "met": max(p99.values()) <= 500.0 if p99 else None}  # fmt: skip


def table(rows: list[dict]) -> str:
    out = [
        f"{'profile':7} {'mix':13} {'queue':>5} | {'decision p50/p99 us: old':>26} "
        f"{'new':>16} | {'admission p50/p99 us: old':>27} {'new':>14}"
    ]
    keyed = {(r["profile"], r["mix"], r["queue"], r["impl"]): r for r in rows}
    for (profile, mix, n, impl), r in keyed.items():
        if impl != "new":
            continue
        o = keyed.get((profile, mix, n, "old"))

        def pair(row, what):
            if row is None:
                return "-"
            return f"{row[what]['p50_us']:.0f} / {row[what]['p99_us']:.0f}"

        out.append(
            f"{profile:7} {mix:13} {n:5} | {pair(o, 'decision'):>26} {pair(r, 'decision'):>16} "
            f"| {pair(o, 'admission'):>27} {pair(r, 'admission'):>14}"
        )
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
