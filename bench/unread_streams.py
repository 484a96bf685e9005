"""Stream clients that send and never read: what the server makes and holds for them, this
tree vs an older one, in the same run.

A ModelStreamInfer client that sends requests and reads no answer makes the server hold the
answers it cannot write (HTTP/2 flow control stops the writes). Before answers counted
against ``limits.max_inflight_bytes``, each stream could have up to its 64 requests in
flight made into answers beyond the cap. Here: one connection opens ``--streams`` streams to
a model whose answer is 256 KiB (a (1, 64) -> (1, 65536) Tile: 1,000 times its request),
each sending ``--requests`` requests and reading nothing, against each tree's server in a
process of its own, both with the same cap (``--cap-mib``, 32 by default: the default
256 MiB takes a minute of answers to fill at this machine's rate). Per tree, in turn
(``--repeats`` times, trees alternating):
  - the server's RSS rise while the streams hang (its peak over ``--hold-s`` seconds), its
    requests by outcome (answers made: ``served``) and the client's own RSS rise;
  - another connection's ModelInfer, every half second while the streams hang: its status
    codes (do the unread streams refuse other clients?), and a readiness probe;
  - after the client cancels its streams: the RSS left, and whether ModelInfer is served.
A reference arm (``current-reading``) sends the same on this tree with a client that reads
every answer. The server's RSS peak is mostly the churn of making 256 KiB answers (the
reading arm peaks as high or higher), so the count of answers made says more: beyond what
the cap holds, the client's own gRPC accepts some answers per stream into its buffers before
flow control stops the writes - the client's memory, not the server's. Since session 35
each stream holds at most ``limits.max_stream_bytes`` (4 MiB by default), and all of them
``limits.streams_share`` of the cap, before a stream stops reading: the other clients' calls
say whether the rest of the cap stays free for them; the reading arms (this tree's, and the
baseline's where one is given) what the bounds cost a client that reads (answers made in
``--hold-s``).

    .venv/bin/python -m bench.unread_streams [--baseline-tree DIR] [--streams 48]
        [--requests 200] [--hold-s 20] [--cap-mib 32] [--repeats 2] [--out bench/results]

Writes bench/results/unread_streams.json (~5 minutes for two trees, two repeats).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import hardening
from bench.live_scheduler import scrape
from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import grpc_service_pb2_grpc as rpc
from server.proto_gen import health_pb2_grpc

OUT = Path(__file__).parent / "results"


def build(root: Path) -> Path:
    sys.path.insert(0, str(hardening.ROOT / "tests"))
    from serverutil import add_big_model  # model "big": 256 KiB answers

    add_big_model(root)
    return root


def request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="big")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    req.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    return req


def unary(address: str) -> str:
    """Another client's ModelInfer on a connection of its own: its status code's name."""
    with grpc.insecure_channel(address, options=hardening.UNLIMITED) as ch:
        try:
            rpc.GRPCInferenceServiceStub(ch).ModelInfer(request(), timeout=10)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name


def probe(address: str) -> float:
    """Milliseconds a readiness Check took (NaN if it failed)."""
    with grpc.insecure_channel(address) as ch:
        t0 = time.perf_counter()
        try:
            health_pb2_grpc.HealthStub(ch).Check(hardening.READINESS, timeout=10)
        except grpc.RpcError:
            return float("nan")
        return 1e3 * (time.perf_counter() - t0)


def answers_made(server: hardening.ServerProcess) -> dict[str, float]:
    """The server's innfer_requests_total for model big, by outcome."""
    out: dict[str, float] = {}
    for sample in scrape(server.metrics_url):
        if sample.name == "innfer_requests_total" and sample.labels.get("model") == "big":
            key = sample.labels["outcome"]
            out[key] = out.get(key, 0.0) + sample.value
    return out


def one_run(tree: Path, repo: Path, log: Path, args, read: bool = False) -> dict:
    extra = {} if args.cap_mib is None else {"limits": {"max_inflight_bytes": args.cap_mib * 2**20}}
    server = hardening.ServerProcess(tree, repo, log, extra)
    server.start()
    stop = threading.Event()
    req = request()

    def requests():
        for _ in range(args.requests):
            yield req
        stop.wait(args.hold_s + 30)  # open, never read

    try:
        time.sleep(1.0)
        rss0 = server.rss()
        peak = rss0
        with grpc.insecure_channel(server.address, options=hardening.UNLIMITED) as ch:
            stub = rpc.GRPCInferenceServiceStub(ch)
            calls = [stub.ModelStreamInfer(requests()) for _ in range(args.streams)]
            readers = [  # the reference arm: a client that reads every answer
                threading.Thread(target=_drain, args=(c,), daemon=True) for c in calls if read
            ]  # fmt: skip
            for t in readers:
                t.start()
            mine0 = _own_rss_mib()
            t_end = time.monotonic() + args.hold_s
            others: dict[str, int] = {}
            next_call = time.monotonic() + 2.0  # after the streams' first answers
            while time.monotonic() < t_end:
                peak = max(peak, server.rss())
                if time.monotonic() >= next_call:
                    code = unary(server.address)
                    others[code] = others.get(code, 0) + 1
                    next_call += 0.5
                time.sleep(0.1)
            during = {"unary": unary(server.address), "other_calls": others,
                      "readiness_ms": probe(server.address),
                      "requests_by_outcome": answers_made(server),
                      "client_rss_rise_mib": _own_rss_mib() - mine0}  # fmt: skip
            for call in calls:
                call.cancel()
            stop.set()
        time.sleep(2.0)
        after = {"unary": unary(server.address), "rss_rise_mib": server.rss() - rss0}
        return {"rss_before_mib": rss0, "rss_rise_peak_mib": peak - rss0, "while_held": during,
                "after_cancel": after, "server_alive": server.alive()}  # fmt: skip
    finally:
        stop.set()
        server.stop()


def _summary(rs: list[dict]) -> dict:
    """An arm's repeats: RSS peaks, answers made, and other clients' calls served."""
    made = [r["while_held"]["requests_by_outcome"].get("served", 0.0) for r in rs]
    ok = [_ok_share(r["while_held"]["other_calls"]) for r in rs]
    return {"rss_rise_peak_mib_median": statistics.median(r["rss_rise_peak_mib"] for r in rs),
            "rss_rise_peak_mib": [round(r["rss_rise_peak_mib"], 1) for r in rs],
            "answers_made_median": statistics.median(made), "answers_made": made,
            "other_calls_ok_share_median": statistics.median(ok),
            "other_calls_ok_share": ok}  # fmt: skip


def _ok_share(codes: dict[str, int]) -> float:
    return codes.get("OK", 0) / max(1, sum(codes.values()))


def _drain(call) -> None:
    with contextlib.suppress(grpc.RpcError):
        for _ in call:
            pass


def _own_rss_mib() -> float:
    """This (client) process's RSS in MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-tree", type=Path, default=None)
    p.add_argument("--streams", type=int, default=48)
    p.add_argument("--requests", type=int, default=200, help="per stream")
    p.add_argument("--hold-s", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cap-mib", type=int, default=32,
                   help="limits.max_inflight_bytes of both trees' servers (MiB)")  # fmt: skip
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    trees = hardening.trees_to_measure(p, args.baseline_tree, "server/stream.py")
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="innfer-unread-streams-"))
    repo = build(work / "repo")
    arms = {name: (tree, False) for name, tree in trees.items()}
    for name, tree in trees.items():  # the same load, answers read
        arms[f"{name}-reading"] = (tree, True)
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for k in range(args.repeats):
        order = list(arms) if k % 2 == 0 else list(arms)[::-1]
        for name in order:
            tree, read = arms[name]
            r = one_run(tree, repo, work / f"server-{name}.log", args, read)
            runs[name].append(r)
            print(f"{name:>8} #{k}: RSS +{r['rss_rise_peak_mib']:.0f} MiB held, other "
                  f"clients' calls {r['while_held']['other_calls']}, readiness "
                  f"{r['while_held']['readiness_ms']:.1f} ms, made "
                  f"{r['while_held']['requests_by_outcome']}; after cancel +"
                  f"{r['after_cancel']['rss_rise_mib']:.0f} MiB, call "
                  f"{r['after_cancel']['unary']}", flush=True)  # fmt: skip
    summary = {name: _summary(rs) for name, rs in runs.items()}
    result = {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "commits": {name: hardening.commit_of(tree) for name, tree in trees.items()},
        "summary": summary, "runs": runs, "wall_seconds": time.perf_counter() - t0,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unread_streams.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
