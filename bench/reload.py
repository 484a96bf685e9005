"""Reload and unload with requests queued (issue 11): time from the RepositoryModelLoad /
Unload call until every one of N queued requests has its answer, and which answers.

The server runs in this process on 127.0.0.1 (tests/serverutil.py's torch-free repository;
the 'wide' model, ~1 ms a batch, its queue raised to 64). Goal: all 40 answered within 1 s.

    python -m bench.reload [--queued 40] [--repeats 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from serverutil import ServerThread, build_repository  # noqa: E402

from bench.publish import publish  # noqa: E402
from server.proto_gen import grpc_service_pb2 as pb  # noqa: E402
from server.proto_gen import grpc_service_pb2_grpc as rpc  # noqa: E402

GOAL_S = 1.0


def _request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="wide")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    req.raw_input_contents.append(np.zeros((1, 1, 28, 28), np.float32).tobytes())
    req.parameters["latency_budget_ms"].int64_param = 5_000
    return req


def measure(stub, action: str, queued: int, repeats: int) -> dict:
    """Seconds from the control call to the last answer, per repeat, and answer codes."""
    req, took, codes = _request(), [], Counter()
    for _ in range(repeats):
        futures = [stub.ModelInfer.future(req, timeout=20) for _ in range(queued)]
        t0 = time.perf_counter()
        if action == "reload":
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="wide"))
        else:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="wide"))
        for f in futures:
            try:
                f.result()
                codes["OK"] += 1
            except grpc.RpcError as exc:  # a client timeout here would be a hang
                codes[exc.code().name] += 1
        took.append(time.perf_counter() - t0)
        if action == "unload":
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="wide"))
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

    fig, ax = plt.subplots(figsize=(5, 3))
    names = list(results["actions"])
    ax.boxplot([results["actions"][a]["seconds"] for a in names], tick_labels=names)
    ax.axhline(GOAL_S, color="tab:red", linestyle="--", label="goal")
    ax.set_ylabel(f"s until all {results['queued']} answered")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queued", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    root = build_repository(Path(tempfile.mkdtemp()) / "repo")
    cfg_path = root / "wide" / "model.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["max_queue"] = max(64, args.queued)
    cfg_path.write_text(yaml.safe_dump(cfg))
    server = ServerThread({"repository": str(root), "model_control": "explicit"}).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = rpc.GRPCInferenceServiceStub(ch)
            actions = {a: measure(stub, a, args.queued, args.repeats) for a in ("reload", "unload")}
    finally:
        server.stop()
    results = {"queued": args.queued, "repeats": args.repeats, "goal_s": GOAL_S,
               "actions": actions, "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    lines = [f"{args.queued} queued requests, {args.repeats} repeats (goal: all answered <= 1 s)"]
    for a, r in actions.items():
        lines.append(f"  {a:<7} median {r['median_s']:.3f} s  max {r['max_s']:.3f} s  "
                     f"{r['codes']}  {'met' if r['met'] else 'NOT MET'}")  # fmt: skip
    publish(results, args.out, "reload", _plot, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
