"""Tier latency vs FLOPs, ONNX Runtime vs torch, cold start and memory per tier set.

For a ResNet-18-like CNN at 224x224 and an MLP (784-2048-2048-10), tiers at 100/75/50/25 %
width (channel counts rounded to multiples of 8) are built into a model repository with
the real build path (sample -> ONNX -> engine cache -> validation). Measured in one run:
  * latency at batch 1 and 8 per tier and backend (median of repeats), relative to the full
    tier, against the FLOPs ratio; goal at batch 8: latency ratio <= 1.15 x FLOPs ratio;
  * cold start: a fresh process (torch blocked) loads the cached engines of 4 tiers;
  * peak RSS of a process holding 4 tiers vs one holding only the full tier.
torch runs where the build puts it: on the CPU here; on an NVIDIA GPU with CUDA graphs
(``torch``) beside eager CUDA (``torch_eager``, INNFER_CUDA_GRAPHS=0), timed in the same run.
Writes bench/results/tiers.json and tiers.png.

    python bench/tiers.py [--threads 2] [--repeats 20] [--models resnet18,mlp] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime
from bench.models import ResNet18Like, mlp
from runtime.build.pipeline import add_model, build_model
from runtime.engines.torch import CUDA_GRAPHS_ENV
from runtime.repository import Repository

OUT = Path(__file__).parent / "results"
WIDTHS = {"w100": 1.0, "w075": 0.75, "w050": 0.5, "w025": 0.25}
MODELS = {
    "resnet18": (ResNet18Like, [3, 224, 224], [1000]),
    "mlp": (mlp, [1, 28, 28], [10]),
}


def interleaved_medians(engines: dict, in_shape, repeats: int, rounds: int = 5) -> dict:
    """Median ms per (tier, backend, batch), timed round-robin so that a burst of load from
    something else on this shared machine spreads over every configuration, not one."""
    rng = np.random.default_rng(0)
    xs = {b: rng.standard_normal((b, *in_shape), dtype=np.float32) for b in (1, 8)}
    samples: dict = {}
    for _ in range(rounds):
        for key, engine in engines.items():
            for batch, x in xs.items():
                engine.run({"input": x})  # warm-up / cache refill after the others ran
                for _ in range(max(1, repeats // rounds)):
                    t0 = time.perf_counter()
                    engine.run({"input": x})
                    samples.setdefault((*key, batch), []).append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter where importing torch fails; it prints JSON."""
    pre = "import sys; sys.modules['torch'] = None\n"
    out = subprocess.run(
        [sys.executable, "-c", pre + code], capture_output=True, text=True, timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


LOAD = """
import json, time
t0 = time.perf_counter()
from runtime.repository import Repository
served = Repository({root!r}).load({name!r})
ready = time.perf_counter() - t0
# VmHWM belongs to this process image; ru_maxrss would carry the (torch-sized) parent's
# peak across fork + exec.
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"ready_s": ready, "tiers": len(served.engines),
                  "peak_rss_mb": int(hwm.split()[1]) / 1024}}))
"""


def bench_model(key: str, root: Path, args) -> dict:
    factory, in_shape, out_shape = MODELS[key]
    torch.manual_seed(0)
    net = factory().eval()
    inn = runtime.convert(net, (torch.randn(1, *in_shape),), permute=False)
    tiers = [{"name": n, "width": w} for n, w in WIDTHS.items()]
    config = {
        "inputs": [{"name": "input", "dtype": "float32", "shape": in_shape}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": out_shape}],
        "tiers": tiers, "max_batch": 8, "threads": args.threads, "multiple_of": 8,
    }  # fmt: skip
    add_model(root, key, inn, config)
    t0 = time.perf_counter()
    build_model(Repository(root), key, progress=False, profile=False)
    first_build_s = time.perf_counter() - t0
    # The profile the cold start's load reads (ONNX Runtime's, model.yaml's backend): without
    # one the load re-measures every tier (3.6 s of the device run's 5.2 s "cold start").
    build_model(Repository(root), key, progress=False, repeats=5)
    repo = Repository(root)
    rows = {}
    backends = ["onnxruntime", "torch"]
    served = {b: repo.load(key, backend=b) for b in backends}
    if torch.cuda.is_available():  # torch runs on the GPU: CUDA graphs beside eager CUDA
        os.environ[CUDA_GRAPHS_ENV] = "0"
        try:
            served["torch_eager"] = repo.load(key, backend="torch")
        finally:
            del os.environ[CUDA_GRAPHS_ENV]
        backends.append("torch_eager")
    full_flops = repo.load_record(key, "w100").flops
    engines = {(t, b): served[b].engines[t] for t in WIDTHS for b in backends}
    medians = interleaved_medians(engines, in_shape, args.repeats)
    for tier in WIDTHS:
        rec = repo.load_record(key, tier)
        row = {"flops": rec.flops, "flops_ratio": rec.flops / full_flops, "params": rec.params}
        row["sizes"] = rec.sizes
        for b in backends:
            for batch in (1, 8):
                row[f"{b}_b{batch}_ms"] = medians[(tier, b, batch)]
        rows[tier] = row
    for row in rows.values():
        for b in backends:
            for batch in (1, 8):
                row[f"{b}_b{batch}_ratio"] = (
                    row[f"{b}_b{batch}_ms"] / rows["w100"][f"{b}_b{batch}_ms"]
                )
        row["ort_b8_ratio_over_flops_ratio"] = row["onnxruntime_b8_ratio"] / row["flops_ratio"]
        row["ort_speedup_vs_torch_b8"] = row["torch_b8_ms"] / row["onnxruntime_b8_ms"]
    cold = child(LOAD.format(root=str(root), name=key))
    # Memory: the same engines, a repository view holding only the full tier.
    only_full = root.parent / f"{root.name}_full"
    shutil.copytree(root / key, only_full / key, dirs_exist_ok=True)
    cfg_path = only_full / key / "model.yaml"
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["tiers"] = [t for t in cfg["tiers"] if t["name"] == "w100"]
    cfg_path.write_text(yaml.safe_dump(cfg))
    full_only = child(LOAD.format(root=str(only_full), name=key))
    return {
        "tiers": rows,
        "backends": backends,
        "torch_device": served["torch"].engines["w100"].device,
        "first_build_s": first_build_s,
        "cold_start_4_tiers_s": cold["ready_s"],
        "peak_rss_mb_4_tiers": cold["peak_rss_mb"],
        "peak_rss_mb_full_only": full_only["peak_rss_mb"],
    }


def print_table(key: str, r: dict) -> None:
    print(f"\n{key}: first build {r['first_build_s']:.1f} s, cold start (4 cached tiers, no "
          f"torch) {r['cold_start_4_tiers_s']:.2f} s, peak RSS {r['peak_rss_mb_4_tiers']:.0f} MB "
          f"(full tier only: {r['peak_rss_mb_full_only']:.0f} MB); torch on "
          f"{r['torch_device']}")  # fmt: skip
    backends = r.get("backends", ["onnxruntime", "torch"])
    head = f"{'tier':<6}{'FLOPs':>7}{'lat/FLOP':>9}"
    for b in backends:
        head += f"{b[:11] + ' b1':>15}{'b8':>8}{'ratio b1/b8':>13}"
    print(head)
    for tier, row in r["tiers"].items():
        line = f"{tier:<6}{row['flops_ratio']:>7.3f}{row['ort_b8_ratio_over_flops_ratio']:>9.2f}"
        for b in backends:
            line += (f"{row[f'{b}_b1_ms']:>13.3f}ms{row[f'{b}_b8_ms']:>6.2f}ms"
                     f"{row[f'{b}_b1_ratio']:>7.2f}/{row[f'{b}_b8_ratio']:.2f}")  # fmt: skip
        print(line)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (key, r) in zip(axes[0], results.items(), strict=True):
        rows = list(r["tiers"].values())
        fr = [row["flops_ratio"] for row in rows]
        ax.plot([0, 1], [0, 1], "k:", label="latency = FLOPs")
        ax.plot([0, 1], [0, 1.15], "k--", alpha=0.4, label="goal bound (1.15x)")
        for b in r.get("backends", ["onnxruntime", "torch"]):
            for batch, mk in ((1, "o"), (8, "s")):
                ax.plot(fr, [row[f"{b}_b{batch}_ratio"] for row in rows], marker=mk,
                        label=f"{b} batch {batch}")  # fmt: skip
        ax.set_title(key)
        ax.set_xlabel("FLOPs ratio to full tier")
        ax.set_ylabel("latency ratio to full tier")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--models", default="resnet18,mlp")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            root = Path(tmp) / f"repo_{key}"
            results[key] = bench_model(key, root, args)
            print_table(key, results[key])
    meta = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__}
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tiers.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    plot(results, args.out / "tiers.png")
    print(f"\nwrote {args.out / 'tiers.json'} and tiers.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
