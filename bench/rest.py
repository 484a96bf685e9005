"""REST side by side: innfer's REST port against KServe's and Triton's (PyTriton) REST
endpoints, on the same ONNX file, with the same load generator, in one run.

Servers (each its own process on 127.0.0.1, pinned to --server-cpus; ONNX Runtime with 1
thread in all three; the peers as bench/peers.py runs them, from its venvs):
  innfer    `innfer serve --http-port P` of this tree, pinned to its full tier (tier=w100)
  kserve    KServe 0.21's REST server (FastAPI/uvicorn) over the same kserve.Model, its
            per-request access log off (innfer writes none)
  pytriton  PyTriton 0.7: Triton's own HTTP front end (C++), its dynamic batcher
Load generator: tritonclient.http (what Triton's HTTP users run), closed loop, c clients as
gevent greenlets over one client with c connections, this process pinned to --client-cpus;
at most --requests requests or --seconds s per point; every request carries an id and, in
JSON, `Content-Type: application/json` (KServe needs both). Encodings: `json` (tensors as JSON
numbers both ways: curl's and KServe's REST clients' way) and `binary` (Triton's binary
tensor extension, tritonclient.http's default). Points: the MLP (784-2048-2048-10) at c=1 and
c=8 in both encodings, the ResNet-18-like CNN (3x224x224) at c=1 and c=8 in binary (as JSON,
150,528 floats per request). Each repeat starts fresh servers, in a rotating order; every
server's answer is first checked against the in-process ONNX Runtime output.

Per point and server: throughput (answered / s), p50 / p99 latency (client side), errors;
medians and min-max over --repeats. A server that cannot serve an encoding (an error on the
check) is reported with the error, not measured.

    .venv/bin/python -m bench.rest [--repeats 3] [--requests 1000] [--seconds 20]

Writes bench/results/rest.json and rest.png; the servers' logs to bench/results/rest-*.log.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import peers
from bench.live_scheduler import check_common, commit_of, common_args, pin_client
from bench.order import rotated
from bench.publish import publish

OUT = Path(__file__).parent / "results"
STEM = "rest"
SERVERS = ("innfer", "kserve", "pytriton")
POINTS = {
    "mlp": [(1, "json"), (8, "json"), (1, "binary"), (8, "binary")],
    "resnet": [(1, "binary"), (8, "binary")],
}


# Sent to every server alike. KServe reads a body without `Content-Type: application/json`
# as bytes (tritonclient.http sends none: "received byte inputs, but the
# 'inference-header-content-length' header is missing"), and its response model refuses a
# response without an id where the request had none (a 500).
REQUEST_OPTIONS = {
    "json": {"request_id": "1", "headers": {"Content-Type": "application/json"}},
    "binary": {"request_id": "1"},
}


class RestInnfer(peers.InnferServer):
    """innfer with its REST port on (``http_port``), else as bench/peers.py starts it."""

    def start(self, label: str) -> dict:
        port, mport, hport = peers.free_ports(3)
        self.http_port = hport
        cli = ["--repository", str(self.repo), "--host", peers.HOST, "--port", str(port),
               "--metrics-port", str(mport), "--http-port", str(hport)]  # fmt: skip
        return self._launch(label, cli, port, (self.model,))


def rest_url(name: str, server) -> str:
    """The REST address of a started server: innfer's --http-port, a peer's second port."""
    if name == "innfer":
        return f"{peers.HOST}:{server.http_port}"
    return f"{peers.HOST}:{server.ports[1]}"


def _peer(python: Path, name: str, onnx: Path, model: str, log: Path, cpus, args):
    def command(ports: list[int]) -> list[str]:
        server.ports = ports
        extra = []
        if name == "pytriton":
            extra = ["--metrics-port", str(ports[2]), "--queue-delay-us",
                     str(args.pytriton_queue_delay_us)]  # fmt: skip
        return [str(python), str(peers.PEER_SERVERS / f"{name}_onnx.py"), "--onnx", str(onnx),
                "--model-name", model, "--grpc-port", str(ports[0]), "--http-port",
                str(ports[1]), "--threads", str(peers.THREADS), *extra]  # fmt: skip

    server = peers.PeerServer(name, command, 3 if name == "pytriton" else 2, model, log, cpus)
    return server


def tensors(su: dict, encoding: str) -> tuple[list, list]:
    """tritonclient.http's inputs (the benchmark's) and requested outputs, in ``encoding``."""
    import tritonclient.http as th

    binary = encoding == "binary"
    inputs = []
    for name, x in su["inputs"].items():
        t = th.InferInput(name, list(x.shape), "FP32")
        t.set_data_from_numpy(x, binary_data=binary)
        inputs.append(t)
    return inputs, [th.InferRequestedOutput(n, binary_data=binary) for n in su["reference"]]


def closed_loop(url: str, su: dict, concurrency: int, encoding: str, params, args) -> dict:
    """``concurrency`` greenlets, each sending its next request when its last is answered,
    until --requests are sent or --seconds passed; latencies of the answered ones."""
    import gevent
    import tritonclient.http as th

    client = th.InferenceServerClient(url, concurrency=concurrency, network_timeout=120)
    inputs, outputs = tensors(su, encoding)
    latencies: list[float] = []
    errors: Counter = Counter()
    state = {"sent": 0}
    deadline = time.monotonic() + args.seconds

    def one() -> None:
        while state["sent"] < args.requests and time.monotonic() < deadline:
            state["sent"] += 1
            t0 = time.perf_counter()
            try:
                client.infer(su["model"], inputs, outputs=outputs, parameters=params,
                             **REQUEST_OPTIONS[encoding])  # fmt: skip
            except Exception as exc:  # counted by its first words: bounded
                errors[str(exc)[:80]] += 1
                continue
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    gevent.joinall([gevent.spawn(one) for _ in range(concurrency)])
    wall = time.perf_counter() - start
    client.close()
    ms = sorted(x * 1e3 for x in latencies)
    return {
        "sent": state["sent"],
        "answered": len(ms),
        "throughput_per_s": len(ms) / wall if wall else 0.0,
        "p50_ms": float(np.percentile(ms, 50)) if ms else None,
        "p99_ms": float(np.percentile(ms, 99)) if ms else None,
        "errors": dict(errors),
        "wall_seconds": wall,
    }


def answer_check(url: str, su: dict, encoding: str, params) -> float:
    """The largest |difference| between the server's REST answer and the in-process ONNX
    Runtime output (every server must compute the same model)."""
    import tritonclient.http as th

    client = th.InferenceServerClient(url, network_timeout=120)
    inputs, outputs = tensors(su, encoding)
    r = client.infer(su["model"], inputs, outputs=outputs, parameters=params,
                     **REQUEST_OPTIONS[encoding])  # fmt: skip
    client.close()
    return max(float(np.max(np.abs(r.as_numpy(k) - v))) for k, v in su["reference"].items())


def summarise(runs: list[dict]) -> dict:
    """Medians (and min-max) over the repeats of one server at one point."""
    out: dict = {"repeats": len(runs)}
    for key in ("throughput_per_s", "p50_ms", "p99_ms"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
            out[f"{key}_range"] = [min(values), max(values)]
    out["errors"] = sum(sum(r["errors"].values()) for r in runs)
    out["sent"] = sum(r["sent"] for r in runs)
    return out


def run(args) -> dict:
    from runtime.repository.config import ModelConfig
    from runtime.repository.profile import random_feeds

    pythons = {name: peers.ensure_venv(args.peers_venv, name) for name in SERVERS[1:]}
    affinity = pin_client(args)
    cpus = args.server_cpus if affinity["pinned"] else None
    args.out.mkdir(parents=True, exist_ok=True)
    for name in SERVERS:
        (args.out / f"{STEM}-{name}.log").write_text("")
    results: dict = {
        "params": {"requests": args.requests, "seconds": args.seconds, "repeats": args.repeats,
                   "warmup": args.warmup, "seed": args.seed},
        "setup": {"load_generator": "tritonclient.http (gevent greenlets, one client with c "
                  "connections), closed loop", "affinity": affinity,
                  "innfer_commit": commit_of(peers.ROOT), "threads": peers.THREADS,
                  "versions": {n: peers.versions(p, peers.PEER_PACKAGES[n])
                               for n, p in pythons.items()}},
        "models": {},
    }  # fmt: skip
    t_all = time.monotonic()
    for key in args.models:
        model_dir, how = peers.model_repo(key, args.seed, False)
        onnx = model_dir / "tiers" / peers.FULL_TIER / "model.onnx"
        config = ModelConfig.load(model_dir / "model.yaml")
        su = {"model": peers.MODELS[key], "onnx": onnx,
              "inputs": random_feeds(config.inputs, 1, seed=args.seed)}  # fmt: skip
        su["reference"] = peers.reference_outputs(onnx, su["inputs"])
        repo = peers.serving_copy(model_dir)
        runs: dict = {}
        checks: dict = {}
        for r in range(args.repeats):
            for name in rotated(SERVERS, r):
                log = args.out / f"{STEM}-{name}.log"
                if name == "innfer":
                    server = RestInnfer(repo, su["model"], log, cpus)
                else:
                    server = _peer(pythons[name], name, onnx, su["model"], log, cpus, args)
                server.start(f"{key} repeat {r}")
                try:
                    url = rest_url(name, server)
                    params = peers.PIN if name == "innfer" else None
                    for c, enc in POINTS[key]:
                        point = f"c{c}-{enc}"
                        try:
                            diff = answer_check(url, su, enc, params)
                        except Exception as exc:
                            checks.setdefault(point, {})[name] = f"error: {str(exc)[:200]}"
                            continue
                        checks.setdefault(point, {})[name] = diff
                        warm = argparse.Namespace(requests=args.warmup, seconds=10.0)
                        closed_loop(url, su, c, enc, params, warm)
                        fig = closed_loop(url, su, c, enc, params, args)
                        runs.setdefault(point, {}).setdefault(name, []).append(fig)
                        print(f"{key} r{r} {point:10s} {name:9s} {fig['throughput_per_s']:7.1f}"
                              f"/s p50 {fig['p50_ms']} errors {sum(fig['errors'].values())}",
                              file=sys.stderr, flush=True)  # fmt: skip
                finally:
                    server.stop()
        results["models"][key] = {
            "model": su["model"], "build": how, "onnx_sha256": peers.sha256(onnx),
            "answer_max_abs_diff": checks, "runs": runs,
            "summary": {pt: {n: summarise(v) for n, v in by.items()} for pt, by in runs.items()},
        }  # fmt: skip
        results["models"][key]["ratios"] = ratios(results["models"][key]["summary"])
    results["wall_seconds"] = time.monotonic() - t_all
    return results


def ratios(summary: dict) -> dict:
    """innfer's throughput over the best peer's and its p50 over the lowest peer p50."""
    out = {}
    for point, by in summary.items():
        peer_tp = {n: s["throughput_per_s"] for n, s in by.items()
                   if n != "innfer" and "throughput_per_s" in s}  # fmt: skip
        peer_p50 = {n: s["p50_ms"] for n, s in by.items() if n != "innfer" and "p50_ms" in s}
        mine = by.get("innfer", {})
        if not peer_tp or "throughput_per_s" not in mine:
            continue
        best = max(peer_tp, key=peer_tp.get)
        low = min(peer_p50, key=peer_p50.get)
        out[point] = {
            "best_peer": best,
            "throughput_ratio": mine["throughput_per_s"] / peer_tp[best],
            "lowest_p50_peer": low,
            "p50_ratio": mine["p50_ms"] / peer_p50[low],
        }
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, key in zip(axes[0], models, strict=True):
        summary = results["models"][key]["summary"]
        points = list(summary)
        width = 0.8 / len(SERVERS)
        for i, name in enumerate(SERVERS):
            vals = [summary[p].get(name, {}).get("throughput_per_s", 0.0) for p in points]
            errs = [summary[p].get(name, {}).get("throughput_per_s_range") for p in points]
            lo = [v - e[0] if e else 0 for v, e in zip(vals, errs, strict=True)]
            hi = [e[1] - v if e else 0 for v, e in zip(vals, errs, strict=True)]
            xs = [j + (i - 1) * width for j in range(len(points))]
            ax.bar(xs, vals, width, label=name, yerr=[lo, hi], capsize=3)
        ax.set_xticks(range(len(points)), points)
        ax.set_ylabel("answered / s (median, min-max over repeats)")
        ax.set_title(f"{results['models'][key]['model']}: REST, closed loop")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_text(results: dict) -> str:
    lines = []
    for key, m in results["models"].items():
        for point, by in m["summary"].items():
            for name, s in by.items():
                nan = float("nan")
                lines.append(f"{key:7s} {point:10s} {name:9s} {s.get('throughput_per_s', 0):8.1f}"
                             f"/s  p50 {s.get('p50_ms', nan):7.2f} ms  p99 "
                             f"{s.get('p99_ms', nan):7.2f} ms  errors {s['errors']}")  # fmt: skip
        for point, r in m["ratios"].items():
            lines.append(f"{key:7s} {point:10s} innfer/{r['best_peer']} throughput "
                         f"x{r['throughput_ratio']:.2f}; p50 / {r['lowest_p50_peer']}'s "
                         f"x{r['p50_ratio']:.2f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(p, 1000, "at most this many requests per point", "unused")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", type=lambda s: s.split(","), default=["mlp", "resnet"])
    p.add_argument("--peers-venv", type=Path, default=peers.ROOT / "runs" / "peers-venv")
    p.add_argument("--pytriton-queue-delay-us", type=int, default=0)
    args = p.parse_args(argv)
    check_common(p, args)
    results = run(args)
    publish(results, args.out, STEM, plot, summary_text(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
