"""Reload and unload with requests queued (issue 11): time from the RepositoryModelLoad /
Unload call until every one of N queued requests has its answer, and which answers.

Each tree's server runs as a subprocess on 127.0.0.1 (bench.hardening.ServerProcess) over a
repository holding one deliberately slow model ('queue': tests/serverutil.py's ONNX Loop of
MatMuls, ~90 ms a batch of up to 4, so 40 queued requests are ~1 s of work and a reload
happens while most of them still wait). With --baseline-tree, an older checkout is
measured in the same run (e.g. `git worktree add /tmp/innfer-base ba73d2f`). Goal: all 40
answered within 1 s.

    python -m bench.reload [--baseline-tree DIR] [--queued 40] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from serverutil import add_onnx_model, slow_loop  # noqa: E402

from bench.hardening import ServerProcess, commit_of  # noqa: E402
from bench.publish import publish  # noqa: E402
from server.proto_gen import grpc_service_pb2 as pb  # noqa: E402
from server.proto_gen import grpc_service_pb2_grpc as rpc  # noqa: E402

GOAL_S = 1.0
TIMEOUT_S = 10.0  # the client's deadline: an answer that never comes shows up as this


MODEL = "queue"
TRIPS = 1000  # Loop trips per batch: ~90 ms on one core here


def _request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="input", datatype="FP32", shape=[1, 1024])
    req.raw_input_contents.append(np.zeros((1, 1024), np.float32).tobytes())
    req.parameters["latency_budget_ms"].int64_param = 30_000
    return req


def build(root: Path, queued: int) -> Path:
    """A repository with the slow model, its queue deep enough for ``queued`` requests."""
    add_onnx_model(root, MODEL, lambda w: slow_loop(w, trips=TRIPS), {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1024]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
        "tiers": [{"name": "w100", "width": 1.0}],
        "max_batch": 4, "max_queue": max(64, queued), "default_latency_budget_ms": 60_000,
    }, warmup=1, repeats=2)  # fmt: skip
    return root


def measure(stub, action: str, queued: int, repeats: int) -> dict:
    """Seconds from the control call to the last answer, per repeat, and answer codes."""
    req, took, codes = _request(), [], Counter()
    for _ in range(repeats):
        futures = [stub.ModelInfer.future(req, timeout=TIMEOUT_S) for _ in range(queued)]
        t0 = time.perf_counter()
        if action == "reload":
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL))
        else:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL))
        for f in futures:
            try:
                f.result()
                codes["OK"] += 1
            except grpc.RpcError as exc:  # a client timeout here would be a hang
                codes[exc.code().name] += 1
        took.append(time.perf_counter() - t0)
        if action == "unload":
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL))
    return {
        "seconds": took,
        "median_s": statistics.median(took),
        "max_s": max(took),
        "codes": dict(codes),
        "met": max(took) <= GOAL_S and "DEADLINE_EXCEEDED" not in codes,
    }


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    labels, data = [], []
    for name, tr in results["trees"].items():
        for a, r in tr["actions"].items():
            labels.append(f"{name}\n{a}")
            data.append(r["seconds"])
    ax.boxplot(data, tick_labels=labels)
    ax.axhline(GOAL_S, color="tab:red", linestyle="--", label="goal")
    ax.set_yscale("log")
    ax.set_ylabel(f"s until all {results['queued']} answered")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_tree(tree: Path, repo_src: Path, work: Path, args, extra: dict) -> dict:
    repo = work / f"repo-{tree.name}"
    shutil.copytree(repo_src, repo)
    server = ServerProcess(tree, repo, work / f"server-{tree.name}.log", extra)
    server.start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = rpc.GRPCInferenceServiceStub(ch)
            actions = {a: measure(stub, a, args.queued, args.repeats) for a in ("reload", "unload")}
    finally:
        server.stop()
    return {"tree": str(tree), "commit": commit_of(tree), "actions": actions}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-tree", type=Path, help="an older checkout, measured too")
    ap.add_argument("--queued", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp())
    repo = build(work / "repo", args.queued)
    trees = {"current": run_tree(ROOT, repo, work, args, {"model_control": "explicit"})}
    if args.baseline_tree:  # it predates model_control: load and unload were always allowed
        trees["baseline"] = run_tree(args.baseline_tree.resolve(), repo, work, args, {})
    results = {"queued": args.queued, "repeats": args.repeats, "goal_s": GOAL_S,
               "client_timeout_s": TIMEOUT_S, "trees": trees,
               "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    lines = [f"{args.queued} queued requests, {args.repeats} repeats (goal: all answered <= 1 s)"]
    for name, tr in trees.items():
        for a, r in tr["actions"].items():
            lines.append(f"  {name:<8} {a:<7} median {r['median_s']:.3f} s  max {r['max_s']:.3f} s"
                         f"  {r['codes']}  {'met' if r['met'] else 'NOT MET'}")  # fmt: skip
    publish(results, args.out, "reload", _plot, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
