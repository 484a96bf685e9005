"""model.yaml ``spin``: ONNX Runtime's idle intra-op threads spinning (ORT's default) or
sleeping, on the engine innfer serves.

The MLP's full tier (784-2048-2048-10; runs/bench-server, built by bench/server.py) with 2
intra-op threads, loaded from the engine cache with ``spin`` true and false; requests paced
one every ``--gap-ms`` (a server at light load: the threads idle between runs), batch 1, for
``--seconds`` per point, the two settings taking turns over ``--rounds`` rounds (this VM's
speed drifts). Per point: the cores the process kept busy (its CPU seconds per wall second,
``time.process_time``: the caller's pacing sleeps cost none) and the median run time.
Reported: the medians over rounds, [min-max], and the ratios false / true.

    python -m bench.spin [--rounds 3] [--seconds 4] [--gap-ms 3]

Writes bench/results/spin.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.engines import BuildOptions
from runtime.engines.onnxruntime import OnnxRuntimeBackend
from runtime.repository import EngineCache

ROOT = Path(__file__).resolve().parents[1]
ONNX = ROOT / "runs" / "bench-server" / "mlp" / "tiers" / "w100" / "model.onnx"
OUT = Path(__file__).parent / "results"


def point(engine, x: np.ndarray, seconds: float, gap_s: float) -> dict:
    """Paced runs of ``engine``: cores busy and the median run time (ms)."""
    feeds, runs = {"input": x}, []
    engine.run(feeds)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    stop = wall0 + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        engine.run(feeds)
        runs.append(time.perf_counter() - t0)
        time.sleep(max(0.0, gap_s - runs[-1]))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"cores_busy": cpu / wall, "p50_ms": 1e3 * statistics.median(runs), "runs": len(runs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--gap-ms", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=OUT / "spin.json")
    args = p.parse_args(argv)
    if not ONNX.is_file():
        sys.exit(f"{ONNX} is missing: build it first (python -m bench.server builds it)")
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        cache, backend = EngineCache(Path(tmp)), OnnxRuntimeBackend()
        engines = {s: cache.get(backend, ONNX, BuildOptions(threads=2, spin=s))[0]
                   for s in (True, False)}  # fmt: skip
        points: dict[str, list[dict]] = {"spin_true": [], "spin_false": []}
        for k in range(args.rounds):
            for spin in (True, False) if k % 2 == 0 else (False, True):
                r = point(engines[spin], x, args.seconds, args.gap_ms / 1e3)
                points[f"spin_{str(spin).lower()}"].append(r)
                print(f"round {k} spin={spin}: {r['cores_busy']:.2f} cores busy, "
                      f"p50 {r['p50_ms']:.3f} ms ({r['runs']} runs)", flush=True)  # fmt: skip
    summary = {}
    for name, rs in points.items():
        summary[name] = {
            key: {"median": statistics.median(r[key] for r in rs),
                  "range": [min(r[key] for r in rs), max(r[key] for r in rs)]}
            for key in ("cores_busy", "p50_ms")
        }  # fmt: skip
    ratio = {key: summary["spin_false"][key]["median"] / summary["spin_true"][key]["median"]
             for key in ("cores_busy", "p50_ms")}  # fmt: skip
    result = {"params": vars(args) | {"out": str(args.out), "threads": 2, "batch": 1},
              "points": points, "summary": summary, "ratio_false_over_true": ratio}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, s in summary.items():
        c, q = s["cores_busy"], s["p50_ms"]
        print(f"{name}: cores busy {c['median']:.2f} [{c['range'][0]:.2f}-{c['range'][1]:.2f}], "
              f"p50 {q['median']:.3f} ms [{q['range'][0]:.3f}-{q['range'][1]:.3f}]")  # fmt: skip
    print(f"false / true: cores {ratio['cores_busy']:.2f}x, p50 {ratio['p50_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
