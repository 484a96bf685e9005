"""Permutation cost on a 512-channel group (a ResNet-18 layer4-sized pair of 3x3 convs).

The group is conv_a's 512 output channels = conv_b's 512 input channels. Measured in one run:
  identity       the original order (total variation to beat)
  innfer         runtime.inn.permute.smoothing_order (NN tours + vectorised 2-opt), timed
  restarts       the reference implementation's strategy - 2-opt from random starts - with
                 the same vectorised 2-opt, best of --restarts, timed per restart
Weights are smooth-ish synthetic filters (a low-rank structure plus noise, shuffled), so an
ordering exists to be found; plain Gaussian weights have none. Writes permutation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runtime.inn.permute import _two_opt, distance_matrix, smoothing_order, total_variation

OUT = Path(__file__).parent / "results"


def layer4_pair(seed: int, m: int = 512) -> torch.Tensor:
    """(m, d) features of one group: conv_a's filters (rows) and conv_b's input slices."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(m, 1, generator=g)  # a hidden 1-D channel coordinate
    basis_a = torch.randn(8, 512 * 9, generator=g)
    basis_b = torch.randn(8, 512 * 9, generator=g)
    freqs = torch.arange(1, 9).float()
    code = torch.sin(np.pi * t * freqs)  # (m, 8): smooth in t
    a = code @ basis_a + 0.5 * torch.randn(m, 512 * 9, generator=g)
    b = code @ basis_b + 0.5 * torch.randn(m, 512 * 9, generator=g)
    return torch.cat([a, b], dim=1) * 0.02


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    f = layer4_pair(0)
    tv_identity = total_variation(f)
    times, order = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        order = smoothing_order(f, seed=0)
        times.append(time.perf_counter() - t0)
    tv_ours = total_variation(f, order)
    dist = distance_matrix(f)
    rng = np.random.default_rng(0)
    restart_tv, restart_times = [], []
    for _ in range(args.restarts):
        t0 = time.perf_counter()
        path = _two_opt(dist, rng.permutation(f.shape[0]))
        restart_times.append(time.perf_counter() - t0)
        restart_tv.append(total_variation(f, torch.from_numpy(path)))
    result = {
        "channels": f.shape[0],
        "features": f.shape[1],
        "innfer_seconds_median": statistics.median(times),
        "innfer_tv": tv_ours,
        "identity_tv": tv_identity,
        "restarts": args.restarts,
        "restart_seconds_median": statistics.median(restart_times),
        "restarts_best_tv": min(restart_tv),
        "tv_reduction_vs_identity": 1 - tv_ours / tv_identity,
        "tv_ratio_vs_restarts": tv_ours / min(restart_tv),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "permutation.json").write_text(json.dumps(result, indent=1))
    print(f"512-channel group, {f.shape[1]} features per channel")
    print(f"  innfer smoothing_order   {result['innfer_seconds_median']:.3f} s (median of "
          f"{args.repeats}), TV {tv_ours:,.0f}")  # fmt: skip
    print(f"  identity order           TV {tv_identity:,.0f} "
          f"(innfer removes {result['tv_reduction_vs_identity']:.1%})")  # fmt: skip
    print(f"  random start + 2-opt     {result['restart_seconds_median']:.3f} s per restart, "
          f"best TV of {args.restarts}: {min(restart_tv):,.0f} "
          f"(innfer / best = {result['tv_ratio_vs_restarts']:.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
