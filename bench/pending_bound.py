"""gRPC's pending queue under overload and in bursts: ``max_pending_calls`` side by side.

Model: the MLP 784-2048-2048-10 of bench/multi_model.py (tiers w100/w075/w050/w025, ONNX
Runtime, 1 thread, max batch 8), alone, served by `innfer serve` pinned to one core. Its
engine runs a request in well under a millisecond, so the request handling in Python is
what fills the core: past ~1,400 calls/s the backlog builds in gRPC's queue of calls the
event loop has not taken up, where no budget is planned (server/pending.py).

For each bound (--bounds; "none": gRPC's own), on fresh servers, in an order that
alternates from repeat to repeat:
  open-R   Poisson arrivals at R calls/s (--rates) for --seconds, budgets U(20, 100) ms
           (seeded; the same for every bound): sent, within budget, late, refused by gRPC
           code, attainment (refusals are misses), goodput, p50 / p99 of the answered, and
           the server's own innfer_pending_wait_seconds over the point (p50 / p99 from its
           histogram's buckets: the bucket's upper edge), and the share of the calls gRPC
           cancelled beside the share of the server's probes it cancelled (which stands for
           the calls' in innfer_pending_probes_total);
  burst-B  on an idle server, B calls sent at once, 5 s budgets, for each B of --bursts:
           how many were answered and how many gRPC cancelled.

Writes bench/results/pending_bound.json and .png (attainment against the rate per bound;
calls cancelled against the burst size) and prints a table.

    .venv/bin/python -m bench.pending_bound [--bounds none,16,64] [--rates 1500,2250]
        [--seconds 6] [--bursts 16,32,64,128] [--repeat 1] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hardening import free_ports
from bench.live_scheduler import HOST, LiveServer, _cpus, commit_of, pin_client
from bench.multi_model import MLP, MODELS_DIR, ROOT, build_models
from bench.publish import publish
from sim.loadgen import run_closed_loop, run_load

STEM = "pending_bound"
OUT = ROOT / "bench" / "results"
WORK = ROOT / "runs" / "bench-pending"
INPUTS = {"input": np.zeros((1, 1, 28, 28), np.float32)}
BUDGETS_MS = (20.0, 100.0)
BURST_BUDGET_MS = 5000.0
WARMUP = 200  # unrecorded calls per server, one at a time
HISTOGRAM = "innfer_pending_wait_seconds"
PROBES = "innfer_pending_probes_total"


def ensure_mlp(seed: int) -> Path:
    """The MLP's model directory from bench/multi_model.py (reused while its recipe is the
    same, else built), copied into a repository of its own."""
    build_models(seed, only=(MLP,))
    repo = WORK / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(MODELS_DIR / MLP, repo / MLP)
    return repo


class PendingServer(LiveServer):
    """`innfer serve --config FILE` with ``max_pending_calls`` set (None: gRPC's own)."""

    def __init__(self, repo: Path, log: Path, cpus: set[int] | None) -> None:
        super().__init__("pending", ROOT, repo, log, cpus)

    def start_bound(self, label: str, bound: int | None) -> dict:
        port, mport = free_ports(2)
        config = {"repository": str(self.repo), "host": HOST, "grpc_port": port,
                  "metrics_port": mport, "max_pending_calls": bound}  # fmt: skip
        path = WORK / f"server-{bound}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.metrics_url = f"http://{HOST}:{mport}/metrics"
        return self._launch(label, ["--config", str(path)], port, (MLP,))


def histogram(metrics_url: str) -> dict:
    """The server's innfer_pending_wait_seconds buckets now (upper edge -> count) and its
    probes by outcome ("answered" / "cancelled" / "failed" -> count)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict = {"buckets": {}, "probes": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if family.name == HISTOGRAM and s.name.endswith("_bucket"):
                out["buckets"][float(s.labels["le"])] = s.value
            elif s.name == PROBES:
                out["probes"][s.labels["outcome"]] = s.value
    return out


def quantiles(before: dict, after: dict) -> dict:
    """p50 / p99 (the bucket's upper edge) of the samples between two readings, and the
    probes by outcome between them (the share cancelled: what stands for the clients')."""
    probes = {k: after["probes"][k] - before["probes"].get(k, 0.0) for k in after["probes"]}
    total = sum(probes.values())
    out = {
        "probes": probes,
        "probes_cancelled_share": probes.get("cancelled", 0.0) / total if total else None,
    }
    edges = sorted(after["buckets"])
    counts = np.array([after["buckets"][e] - before["buckets"].get(e, 0.0) for e in edges])
    if not len(counts) or counts[-1] <= 0:
        return {**out, "samples": 0}

    def q(p: float) -> float:
        return float(edges[int(np.searchsorted(counts, p * counts[-1]))])

    return {**out, "samples": int(counts[-1]), "p50_s": q(0.5), "p99_s": q(0.99)}


def open_point(server: PendingServer, rate: float, args) -> dict:
    rng = np.random.default_rng(args.seed + int(rate))
    n = int(rate * args.seconds)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    budgets = rng.uniform(*BUDGETS_MS, n) / 1e3
    before = histogram(server.metrics_url)
    report = asyncio.run(run_load(server.address, MLP, arrivals, budgets, INPUTS, args.seconds))
    out = {k: v for k, v in report.summary.items() if not isinstance(v, list)}
    refused = out.get("refused") or {}
    out["cancelled_share"] = refused.get("CANCELLED", 0) / max(1, out["sent"])
    return {**out, "pending_wait": quantiles(before, histogram(server.metrics_url))}


async def _bursts(address: str, sizes: list[int]) -> dict:
    import tritonclient.grpc.aio as tca
    from tritonclient.utils import InferenceServerException

    async with tca.InferenceServerClient(address) as client:

        async def one() -> str:
            i = tca.InferInput("input", list(INPUTS["input"].shape), "FP32")
            i.set_data_from_numpy(INPUTS["input"])
            try:
                await client.infer(MLP, [i], parameters={"latency_budget_ms": BURST_BUDGET_MS})
                return "OK"
            except InferenceServerException as exc:
                return str(exc.status()).removeprefix("StatusCode.")

        out = {}
        for b in sizes:
            codes = await asyncio.gather(*[one() for _ in range(b)])
            out[str(b)] = {c: codes.count(c) for c in sorted(set(codes))}
            await asyncio.sleep(0.5)  # idle again
        return out


def warm_up(address: str) -> None:
    asyncio.run(run_closed_loop(address, MLP, 1, WARMUP, 30.0, lambda i: 1.0, INPUTS))


def one_bound(bound: int | None, args, repo: Path, log: Path) -> dict:
    name = "none" if bound is None else str(bound)
    row: dict = {"bound": name}
    server = PendingServer(repo, log, args.server_cpus)
    for rate in args.rates:
        try:
            server.start_bound(f"max_pending_calls {name}, open {rate:g}/s", bound)
            warm_up(server.address)
            row[f"open-{rate:g}"] = open_point(server, rate, args)
        finally:
            server.stop()
        time.sleep(1.0)
    try:
        server.start_bound(f"max_pending_calls {name}, bursts", bound)
        warm_up(server.address)
        row["bursts"] = asyncio.run(_bursts(server.address, args.bursts))
    finally:
        server.stop()
    return row


def summarise(results: dict) -> str:
    lines = [f"{'bound':>6} {'point':>10} {'sent':>6} {'ok':>6} {'late':>6} {'ref':>6} "
             f"{'attain':>7} {'good/s':>7} {'p50ms':>7} {'wait p99':>9} "
             f"{'cancelled: calls / probes':>26}"]  # fmt: skip
    for rep, rows in enumerate(results["repeats"]):
        lines.append(f"-- repeat {rep}")
        for row in rows:
            for rate in results["params"]["rates"]:
                p = row[f"open-{rate:g}"]
                wait = p["pending_wait"].get("p99_s")
                probes = p["pending_wait"].get("probes_cancelled_share")
                share = (f"{100 * p['cancelled_share']:.1f} / "
                         f"{'-' if probes is None else f'{100 * probes:.1f}'} %")  # fmt: skip
                lines.append(
                    f"{row['bound']:>6} {f'open-{rate:g}':>10} {p['sent']:>6} "
                    f"{p['within_budget']:>6} {p['late']:>6} {p['refused_total']:>6} "
                    f"{100 * p['slo_attainment']:>6.1f}% {p['goodput_per_s']:>7.1f} "
                    f"{p['p50_latency_ms']:>7.1f} "
                    f"{'-' if wait is None else f'{1e3 * wait:.0f} ms':>9} {share:>26}"
                )
            bursts = ", ".join(
                f"{b}: {c.get('CANCELLED', 0)} cancelled" for b, c in row["bursts"].items()
            )
            lines.append(f"{row['bound']:>6} {'bursts':>10} {bursts}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    rates = results["params"]["rates"]
    for rows in results["repeats"]:
        for row in rows:
            color = f"C{results['params']['bounds'].index(row['bound'])}"
            ys = [100 * row[f"open-{r:g}"]["slo_attainment"] for r in rates]
            a.plot(rates, ys, "o-", color=color, alpha=0.8,
                   label=f"max_pending_calls {row['bound']}")  # fmt: skip
            sizes = [int(s) for s in row["bursts"]]
            cut = [row["bursts"][str(s)].get("CANCELLED", 0) for s in sizes]
            b.plot(sizes, cut, "o-", color=color, alpha=0.8, label=row["bound"])
    handles, labels = a.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    a.legend(unique.values(), unique.keys(), fontsize=8)
    a.set(xlabel="offered calls/s (MLP, one core)", ylabel="within budget (%)",
          title="overload: budgets U(20, 100) ms")  # fmt: skip
    b.set(xlabel="calls sent at once on an idle server", ylabel="cancelled by gRPC",
          title="bursts", xscale="log")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bound(text: str) -> int | None:
    if text == "none":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a bound is 'none' or >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bounds", type=lambda s: [_bound(x) for x in s.split(",")],
                   default=[None, 16, 64])  # fmt: skip
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                   default=[1500.0, 2250.0])  # fmt: skip
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--bursts", type=lambda s: [int(x) for x in s.split(",")],
                   default=[16, 32, 64, 128])  # fmt: skip
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-cpus", type=_cpus, default={1})
    p.add_argument("--client-cpus", type=_cpus, default={0})
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not 0 < args.seconds <= 120 or args.repeat < 1 or min(args.rates) <= 0:
        p.error("--seconds in (0, 120], --repeat >= 1, rates > 0")
    if max(args.bursts) > 1000 or min(args.bursts) < 1:
        p.error("--bursts: 1 to 1,000 calls each")
    t0 = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    repo = ensure_mlp(args.seed)
    affinity = pin_client(args)
    log = args.out / f"{STEM}-server.log"
    args.out.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    names = ["none" if b is None else str(b) for b in args.bounds]
    repeats = []
    for rep in range(args.repeat):
        order = args.bounds if rep % 2 == 0 else args.bounds[::-1]
        rows = [one_bound(b, args, repo, log) for b in order]
        repeats.append(sorted(rows, key=lambda r: names.index(r["bound"])))
    results = {
        "params": {
            "bounds": names,
            "rates": args.rates,
            "seconds": args.seconds,
            "bursts": args.bursts,
            "repeat": args.repeat,
            "seed": args.seed,
            "budgets_ms": BUDGETS_MS,
            "burst_budget_ms": BURST_BUDGET_MS,
            "warmup": WARMUP,
        },
        "commit": commit_of(ROOT),
        "affinity": affinity,
        "repeats": repeats,
        "wall_seconds": time.perf_counter() - t0,
    }
    publish(results, args.out, STEM, plot, summarise(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
