"""What Triton's system shared memory saves a client on the server's host: tensors in the
gRPC message vs in /dev/shm regions, on the same server in the same run.

`innfer serve` of this tree on the benchmark ResNet (bench/live_scheduler.py's repository,
runs/bench-live: 3x224x224 FP32 inputs, 588 KiB a row; 1,000 logits), pinned to CPU 1;
one closed-loop tritonclient (sync gRPC, c=1) on CPU 0 sends ``--requests`` requests per
arm, pinned to a tier, at batch 1 and 8 (``--batches``). Arms, taking turns each round
(their order alternates):

- ``message``: the input in raw_input_contents, the output in the answer (what every
  other benchmark sends);
- ``shm``: the input and the output in registered system shared-memory regions
  (``set_shared_memory``; the client writes each request's input into its region first,
  as a client making fresh inputs would, and reads the output back as numpy).

Per arm and round: the client's p50 / mean latency and its CPU seconds per request; over
the rounds: medians, the min-max spread, and shm / message ratios of the medians. The
tiers: w025 (the cheapest: the transport's share is largest) and w100.

    python -m bench.shared_memory [--rounds 5] [--requests 300] [--tiers w025 w100]
        [--batches 1 8] [--out bench/results/shared_memory.json]

Writes JSON and a PNG (p50 per tier and batch, both arms, with the rounds' spread).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.live_scheduler import MODEL, LiveServer, build_repo, pin_client

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "shared_memory.json"
ARMS = ("message", "shm")
OUTPUT, CLASSES = "logits", 1000


class Client:
    """A tritonclient of ``address`` with one input and one output region per batch size."""

    def __init__(self, address: str, batches: list[int], shape: tuple[int, ...]):
        import tritonclient.grpc as tc
        import tritonclient.utils.shared_memory as shm

        self.tc, self.shm = tc, shm
        self.client = tc.InferenceServerClient(address)
        self.shape = shape
        self.regions: dict[int, tuple] = {}
        for b in batches:
            in_bytes, out_bytes = b * int(np.prod(shape)) * 4, b * CLASSES * 4
            tag = uuid.uuid4().hex[:8]
            ins = shm.create_shared_memory_region(f"in{b}", f"/innfer-bench-in{b}-{tag}", in_bytes)
            outs = shm.create_shared_memory_region(
                f"out{b}", f"/innfer-bench-out{b}-{tag}", out_bytes
            )
            self.client.register_system_shared_memory(f"in{b}", f"/innfer-bench-in{b}-{tag}",
                                                      in_bytes)  # fmt: skip
            self.client.register_system_shared_memory(f"out{b}", f"/innfer-bench-out{b}-{tag}",
                                                      out_bytes)  # fmt: skip
            self.regions[b] = (ins, outs, in_bytes, out_bytes)

    def infer(self, arm: str, x: np.ndarray, tier: str) -> np.ndarray:
        """One request of ``x`` (rows x shape) on ``tier``; its logits."""
        b = len(x)
        inp = self.tc.InferInput("input", list(x.shape), "FP32")
        out = self.tc.InferRequestedOutput(OUTPUT)
        if arm == "shm":
            ins, _, in_bytes, out_bytes = self.regions[b]
            self.shm.set_shared_memory_region(ins, [x])
            inp.set_shared_memory(f"in{b}", in_bytes)
            out.set_shared_memory(f"out{b}", out_bytes)
        else:
            inp.set_data_from_numpy(x)
        result = self.client.infer(MODEL, [inp], outputs=[out], parameters={"tier": tier})
        if arm == "shm":
            return self.shm.get_contents_as_numpy(self.regions[b][1], np.float32, [b, CLASSES])
        return result.as_numpy(OUTPUT)

    def close(self) -> None:
        self.client.unregister_system_shared_memory()
        for ins, outs, _, _ in self.regions.values():
            self.shm.destroy_shared_memory_region(ins)
            self.shm.destroy_shared_memory_region(outs)
        self.client.close()


def run_arm(client: Client, arm: str, x: np.ndarray, tier: str, requests: int) -> dict:
    """``requests`` back to back (after 20 not counted): latency and client CPU."""
    for _ in range(20):
        client.infer(arm, x, tier)
    lat = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(requests):
        t = time.perf_counter()
        client.infer(arm, x, tier)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - wall0
    return {
        "p50_ms": 1e3 * statistics.median(lat),
        "mean_ms": 1e3 * statistics.fmean(lat),
        "p99_ms": 1e3 * float(np.percentile(lat, 99)),
        "client_cpu_ms_per_request": 1e3 * (time.process_time() - cpu0) / requests,
        "throughput_per_s": requests / wall,
    }


def summary(rounds: list[dict]) -> dict:
    """Per (tier, batch, arm): medians and min-max over the rounds; shm / message ratios."""
    out: dict = {}
    for key in rounds[0]:
        per_arm = {}
        for arm in ARMS:
            rs = [r[key][arm] for r in rounds]
            per_arm[arm] = {
                f: {"median": statistics.median(x[f] for x in rs),
                    "min": min(x[f] for x in rs), "max": max(x[f] for x in rs)}
                for f in rs[0]
            }  # fmt: skip
        ratio = {
            f: per_arm["shm"][f]["median"] / per_arm["message"][f]["median"]
            for f in ("p50_ms", "mean_ms", "client_cpu_ms_per_request", "throughput_per_s")
        }
        wins = sum(r[key]["shm"]["p50_ms"] < r[key]["message"]["p50_ms"] for r in rounds)
        out[key] = {**per_arm, "shm_over_message": ratio, "rounds_shm_p50_lower": wins}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(result["summary"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, arm in enumerate(ARMS):
        med = [result["summary"][k][arm]["p50_ms"]["median"] for k in keys]
        lo = [
            m - result["summary"][k][arm]["p50_ms"]["min"] for k, m in zip(keys, med, strict=True)
        ]
        hi = [
            result["summary"][k][arm]["p50_ms"]["max"] - m for k, m in zip(keys, med, strict=True)
        ]
        xs = [j + (i - 0.5) * width for j in range(len(keys))]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=arm)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("client p50 latency (ms), c=1")
    ax.set_title(f"Tensors in the message vs system shared memory\n({MODEL}, "
                 f"{result['params']['rounds']} rounds: median, min-max)")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=300, help="per arm, tier and batch, a round")
    p.add_argument("--tiers", nargs="+", default=["w025", "w100"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    model_dir, how = build_repo(args.seed)
    affinity = pin_client(argparse.Namespace(server_cpus={1}, client_cpus={0}))
    log = args.out.with_suffix(".log")
    server = LiveServer("shm", ROOT, model_dir.parent, log, {1} if affinity["pinned"] else None)
    server.start("shared memory", (MODEL,))
    client = Client(server.address, args.batches, (3, 224, 224))
    rng = np.random.default_rng(args.seed)
    rounds: list[dict] = []
    started = time.time()
    try:
        for b in args.batches:  # the arms answer alike before anything is timed
            x = rng.standard_normal((b, 3, 224, 224), dtype=np.float32)
            a, s = (client.infer(arm, x, args.tiers[0]) for arm in ARMS)
            np.testing.assert_allclose(s, a, rtol=1e-5, atol=1e-6)
        for k in range(args.rounds):
            row = {}
            for tier in args.tiers:
                for b in args.batches:
                    x = rng.standard_normal((b, 3, 224, 224), dtype=np.float32)
                    arms = ARMS if k % 2 == 0 else ARMS[::-1]
                    row[f"{tier} b{b}"] = {arm: run_arm(client, arm, x, tier, args.requests)
                                           for arm in arms}  # fmt: skip
            rounds.append(row)
            print(f"round {k}: " + ", ".join(
                f"{key} {v['message']['p50_ms']:.2f} / {v['shm']['p50_ms']:.2f} ms"
                for key, v in row.items()), flush=True)  # fmt: skip
    finally:
        client.close()
        server.stop()
    result = {
        "params": {**vars(args), "out": str(args.out), "model": MODEL, "repository": how},
        "affinity": affinity,
        "summary": summary(rounds),
        "rounds": rounds,
        "wall_seconds": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    for key, s in result["summary"].items():
        r = s["shm_over_message"]
        print(f"{key}: p50 message {s['message']['p50_ms']['median']:.2f} ms, shm "
              f"{s['shm']['p50_ms']['median']:.2f} ms (x{r['p50_ms']:.2f}); client CPU "
              f"x{r['client_cpu_ms_per_request']:.2f}; shm lower in "
              f"{s['rounds_shm_p50_lower']}/{len(rounds)} rounds")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
