"""The request hot path at light load: what the scheduler and the data plane cost per request.

1. Scheduler cycle, old code vs new in one run (alternating rounds): ``submit``,
   ``expire``, ``next`` and ``complete`` of one request on an otherwise empty queue (the
   light-load case: every request is decided alone), pinned and unpinned, on the MLP's
   profiled tiers. The old
   code is HEAD's ``server/scheduling`` or the one under ``--old DIR`` (loaded as in
   bench/decision_cost.py).
2. Data plane in process, this tree and (with ``--old``) the old tree's, each in
   subprocesses taking turns over ``--rounds`` rounds: ``DataPlane.infer`` of one MLP
   request pinned to w100, awaited back to back on one event loop with the real ONNX
   Runtime engine, minus the same engine run alone (interleaved): the server's own work
   per request, without gRPC; medians over the rounds, and relative to the engine's time.
3. Through gRPC (``--grpc-rounds N``, needs ``--old``): `innfer serve` of each tree on the
   MLP, pinned to CPU 1, the load generator (sim.loadgen, tritonclient.grpc.aio) on CPU 0,
   one closed-loop client pinned to w100, ``--grpc-requests`` per round, the trees taking
   turns on fresh servers: client p50 and throughput per round, their medians, and the
   paired per-round differences (new - old).

    python -m bench.hot_path [--old DIR] [--cycles 3000] [--requests 8000] [--rounds 4]
        [--grpc-rounds 8] [--grpc-requests 1500] [--out hot_path.json]

Needs runs/bench-server (bench/server.py builds it). Writes bench/results/hot_path.json
(or ``--out``).
Run it pinned (``taskset -c 1``) on a quiet machine: the figures are tens of microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# --data-plane-only --tree DIR: this script re-run with another tree's server/ on the path
# (the old code's data plane, in a process of its own); bench/ always comes from this tree.
_TREE = sys.argv[sys.argv.index("--tree") + 1] if "--tree" in sys.argv else None
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The bench package is bound to this tree before the other tree goes on the path (an older
# tree's bench/ lacks bench.order: "No module named" in every old-tree round); nothing that
# imports server/ may come before it, or the "old" rounds would run this tree's server.
from bench.order import rotated  # noqa: E402 - torch- and server-free

if _TREE:
    sys.path.insert(0, _TREE)

import server.scheduling as new_scheduling  # noqa: E402 - after the path is chosen
from bench.decision_cost import load_old  # noqa: E402 - imports server: after the path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
REPO = ROOT / "runs" / "bench-server"
WORK = ROOT / "runs" / "hot-path"  # the per-tree copies of REPO's model for the gRPC rounds
MODEL = "mlp"
PHASES = ("submit", "expire", "next", "complete")
ROUNDS = 5  # alternating old / new rounds; the median of the rounds' medians is reported


def mlp_tiers() -> list:
    """The MLP's tiers (accuracy by FLOPs, latency from profile.json), as this tree's
    TierInfo; ``as_tiers`` copies them into another tree's."""
    from runtime.repository import Repository
    from server.model_runtime import tier_infos

    return tier_infos(Repository(REPO).load(MODEL))


def as_tiers(mod, tiers: list) -> list:
    return [mod.TierInfo(t.name, t.accuracy, t.latency_ms, t.typical_ms, t.tail_ms) for t in tiers]


def scheduler_cycle(mod, tiers, pin: str | None, cycles: int) -> dict:
    """Median microseconds per phase of one request's cycle through ``mod.Scheduler``."""
    s = mod.Scheduler(tiers, mod.make_policy("innfer", tiers), max_batch=8, max_queue=256)
    times = {p: [] for p in PHASES}
    now = 0.0
    for i in range(cycles):
        now += 0.004
        r = mod.Request(i, now, now + 10.0, 1, pin, None, 0)
        t0 = time.perf_counter()
        s.submit(r, now)
        t1 = time.perf_counter()
        s.expire(now)
        t2 = time.perf_counter()
        d = s.next(now)
        t3 = time.perf_counter()
        s.complete(d, now + 0.001, 0.001)
        t4 = time.perf_counter()
        for p, a, b in zip(PHASES, (t0, t1, t2, t3), (t1, t2, t3, t4), strict=True):
            times[p].append(b - a)
    warm = cycles // 5  # the first decisions fill caches and the latency model's tables
    out = {p: 1e6 * statistics.median(v[warm:]) for p, v in times.items()}
    out["total"] = sum(out[p] for p in PHASES)
    return out


async def data_plane(requests: int) -> dict:
    """Median microseconds of DataPlane.infer and of the engine inside it."""
    from server.config import ServerConfig
    from server.dataplane import DataPlane
    from server.metrics import Metrics
    from server.proto_gen import grpc_service_pb2 as pb

    cfg = ServerConfig.from_dict(
        {"repository": str(REPO), "grpc_port": 0, "profile_at_load": False, "models": [MODEL]}
    )
    plane = DataPlane(cfg, Metrics())
    await plane.load_all()
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    req.parameters["latency_budget_ms"].double_param = 10_000.0
    req.parameters["tier"].string_param = "w100"
    data = req.SerializeToString()
    engine = plane.models[MODEL].served.engines["w100"]
    total, alone = [], []
    try:
        for i in range(requests + 200):
            t0 = time.perf_counter()
            await plane.infer(pb.ModelInferRequest.FromString(data), None)
            took = time.perf_counter() - t0
            # The loop waits for the next request, as it waits for a client's (a loop that
            # never waits reads as saturated: no inline runs, server/loop_idle.py).
            await asyncio.sleep(1e-4)
            t1 = time.perf_counter()
            engine.run({"input": x})  # the same engine alone, interleaved: the floor
            if i >= 200:  # warm-up
                total.append(took)
                alone.append(time.perf_counter() - t1)
    finally:
        for m in plane.models.values():
            await m.stop()
    t, e = statistics.median(total), statistics.median(alone)
    return {"infer_us": 1e6 * t, "engine_alone_us": 1e6 * e, "overhead_us": 1e6 * (t - e)}


def data_plane_rounds(trees: dict[str, str], requests: int, rounds: int) -> dict:
    """Per tree (name -> directory), ``rounds`` runs of ``data_plane`` of ``requests``
    each, in subprocesses, the trees taking turns (this VM's speed drifts by up to ~1.5x
    over minutes, and the in-process engine with it): every round's figures, and the
    medians of infer, engine and overhead time and of overhead / engine time - the ratio is
    what the drift moves least."""
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for k in range(rounds):
        for name in trees if k % 2 == 0 else list(trees)[::-1]:
            runs[name].append(tree_data_plane(trees[name], requests))
    out = {}
    for name, rs in runs.items():
        out[name] = {
            key: statistics.median(r[key] for r in rs)
            for key in ("infer_us", "engine_alone_us", "overhead_us")
        }
        out[name]["overhead_per_engine"] = statistics.median(
            r["overhead_us"] / r["engine_alone_us"] for r in rs
        )
        out[name]["rounds"] = rs
    return out


def tree_data_plane(tree: str, requests: int) -> dict:
    """``data_plane`` with ``tree``'s server/ (a subprocess: two trees cannot share one)."""
    got = subprocess.run(
        [sys.executable, __file__, "--data-plane-only", "--tree", tree,
         "--requests", str(requests)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(got.stdout.strip().splitlines()[-1])


def grpc_rounds(trees: dict[str, str], requests: int, rounds: int) -> tuple[dict, dict]:
    """Closed loop c=1 through gRPC, per tree, the trees taking turns (section 3); the
    figures and how the two sides were pinned."""
    from bench.live_scheduler import LiveServer, copy_per_tree, pin_client
    from runtime.repository.config import ModelConfig
    from runtime.repository.profile import random_feeds
    from sim.loadgen import run_closed_loop

    inputs = random_feeds(ModelConfig.load(REPO / MODEL / "model.yaml").inputs, 1, seed=0)
    params = {"tier": "w100"}
    # load generator on CPU 0, server on CPU 1, where this machine lets both be used (it
    # pinned to {0} and {1} unchecked: taskset failed on a 1-CPU or restricted machine)
    # Run under `taskset -c 1` (as the docstring advises for the in-process rounds), this
    # process sees one CPU: pin_client then pinned nothing, and server and client shared
    # CPU 1 unsaid (review helper-130). Both CPUs back first, where the machine allows.
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    affinity = pin_client(argparse.Namespace(server_cpus={1}, client_cpus={0}))
    server_cpus = {1} if affinity["pinned"] else None
    # Each tree serves its own copy of the repository (an older tree may rewrite its cache).
    repos = copy_per_tree(REPO / MODEL, trees, WORK)
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for k in range(rounds):
        for name in trees if k % 2 == 0 else list(trees)[::-1]:
            log = OUT / f"hot_path-{name}.log"
            server = LiveServer(name, Path(trees[name]), repos[name], log, server_cpus)
            server.start(f"round {k}", (MODEL,))
            try:
                for n in (200, requests):  # warm-up, then the measured run
                    report = asyncio.run(run_closed_loop(
                        server.address, MODEL, 1, n, 60.0, lambda i: 10.0, inputs,
                        parameters=params,
                    ))  # fmt: skip
            finally:
                server.stop()
            runs[name].append(round_figures(report.summary))
    return grpc_summary(runs), affinity


def round_figures(s: dict) -> dict:
    """One gRPC round from sim.loadgen's summary: p50 over the answered requests and the
    throughput of the same answered requests (within budget + late, as bench/peers.py's
    figures()), not of those sent: a refused or failed request is no throughput. A round
    with any error (or no answer) is marked unusable."""
    answered = s["within_budget"] + s["late"]
    wall = s["wall_seconds"]
    return {
        "p50_ms": s["p50_latency_ms"],
        "throughput_per_s": answered / wall if wall else 0.0,
        "sent": s["sent"],
        "answered": answered,
        "errors": s["refused_total"],
        "usable": s["refused_total"] == 0 and answered > 0,
    }


def grpc_summary(runs: dict[str, list[dict]]) -> dict:
    """Per tree the medians of p50 and throughput over its usable rounds (None if none),
    how many rounds were left out for errors, and (with "old" and "new") the paired p50
    differences over the rounds both trees ran usably."""
    out: dict = {}
    for name, rs in runs.items():
        good = [r for r in rs if r["usable"]]
        out[name] = {
            key: statistics.median(r[key] for r in good) if good else None
            for key in ("p50_ms", "throughput_per_s")
        } | {"usable_rounds": len(good), "unusable_rounds": len(rs) - len(good), "rounds": rs}
    if "old" in runs and "new" in runs:
        diffs = [n["p50_ms"] - o["p50_ms"]
                 for n, o in zip(runs["new"], runs["old"], strict=True)
                 if n["usable"] and o["usable"]]  # fmt: skip
        out["paired_p50_diff_ms"] = {
            "median": statistics.median(diffs) if diffs else None,
            "each": diffs,
            "new_lower": sum(d < 0 for d in diffs),
            "pairs_left_out": len(runs["new"]) - len(diffs),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--old", help="directory holding the old server/scheduling (default: HEAD)")
    p.add_argument("--cycles", type=int, default=3000)
    p.add_argument("--requests", type=int, default=8000, help="data plane, over all rounds")
    p.add_argument("--rounds", type=int, default=4, help="data plane runs per tree, alternating")
    p.add_argument("--grpc-rounds", type=int, default=0, help="gRPC c=1 rounds per tree")
    p.add_argument("--grpc-requests", type=int, default=1500)
    p.add_argument("--out", default="hot_path.json", help="file name in bench/results")
    p.add_argument("--data-plane-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (REPO / MODEL / "profile.json").is_file():
        p.error(f"{REPO / MODEL} is not built; run bench/server.py first")
    if args.data_plane_only:
        print(json.dumps(asyncio.run(data_plane(args.requests))))
        return 0
    old = load_old(args.old)
    res: dict = {"scheduler_cycle_us": {}, "old": args.old or "HEAD", "rounds": ROUNDS}
    mods = {"old": old, "new": new_scheduling}
    loaded = mlp_tiers()  # engines are built and loaded once, for both trees
    tiers = {impl: as_tiers(mod, loaded) for impl, mod in mods.items()}
    rounds: dict[str, list[dict]] = {}
    res["scheduler_cycle_orders"] = []
    for r in range(ROUNDS):  # old and new alternate: a slow spell of the machine hits both
        order = rotated(list(mods), r)  # and neither always goes first
        res["scheduler_cycle_orders"].append(order)
        for impl in order:
            mod = mods[impl]
            for pin in ("w100", None):
                key = f"{impl} {'pinned' if pin else 'unpinned'}"
                cycle = scheduler_cycle(mod, tiers[impl], pin, args.cycles // ROUNDS)
                rounds.setdefault(key, []).append(cycle)
    for key, runs in rounds.items():
        res["scheduler_cycle_us"][key] = {
            k: statistics.median(r[k] for r in runs) for k in (*PHASES, "total")
        }
    trees = {"new": str(ROOT), **({"old": args.old} if args.old else {})}
    from bench.live_scheduler import commit_of

    res["commits"] = {name: commit_of(Path(t)) for name, t in trees.items()}  # traceable
    res["data_plane_us"] = data_plane_rounds(trees, args.requests // args.rounds, args.rounds)
    res["data_plane_rounds"] = args.rounds
    if args.grpc_rounds:
        res["grpc_c1"], res["grpc_affinity"] = grpc_rounds(
            trees, args.grpc_requests, args.grpc_rounds
        )
    OUT.mkdir(exist_ok=True)
    (OUT / args.out).write_text(json.dumps(res, indent=1))
    print("scheduler cycle on a one-deep queue, median us per phase")
    for key, v in res["scheduler_cycle_us"].items():
        phases = "  ".join(f"{ph} {v[ph]:6.1f}" for ph in PHASES)
        print(f"  {key:16s} {phases}  total {v['total']:6.1f}")
    for impl, d in res["data_plane_us"].items():
        each = ", ".join(f"{r['overhead_us']:.0f}" for r in d["rounds"])
        print(
            f"data plane in process ({impl}, median of {args.rounds} rounds): infer "
            f"{d['infer_us']:.0f} us, the engine alone {d['engine_alone_us']:.0f} us, overhead "
            f"{d['overhead_us']:.0f} us = {d['overhead_per_engine']:.2f} of the engine's time "
            f"(rounds: {each} us)"
        )
    for impl, d in res.get("grpc_c1", {}).items():
        if impl == "paired_p50_diff_ms":
            med = "-" if d["median"] is None else f"{d['median']:+.3f} ms"
            print(f"gRPC c=1 p50 new - old, paired rounds: median {med}, new lower in "
                  f"{d['new_lower']} of {len(d['each'])}"
                  + (f" ({d['pairs_left_out']} pairs left out: a round with errors)"
                     if d["pairs_left_out"] else ""))  # fmt: skip
            continue
        each = ", ".join(
            f"{r['p50_ms']:.2f}" if r["usable"] else f"unusable ({r['errors']} errors)"
            for r in d["rounds"]
        )
        if d["p50_ms"] is None:
            print(f"gRPC c=1 ({impl}): no usable round (rounds: {each})")
            continue
        n_bad = d["unusable_rounds"]
        left = f", {n_bad} rounds with errors left out" if n_bad else ""
        print(f"gRPC c=1 ({impl}): p50 {d['p50_ms']:.3f} ms, {d['throughput_per_s']:.1f} "
              f"answered/s over {d['usable_rounds']} rounds{left} "
              f"(rounds' p50: {each})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
