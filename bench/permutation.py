"""Permutation cost and quality: a 512-channel group, then how both scale with the width.

The 512-channel group is a ResNet-18 layer4-sized pair of 3x3 convs: conv_a's 512 output
channels = conv_b's 512 input channels. Measured in one run:
  identity       the original order (total variation to beat)
  innfer         runtime.inn.permute.smoothing_order (the path it takes at that width), timed
  restarts       the reference implementation's strategy - 2-opt from random starts - with
                 the same vectorised 2-opt, best of --restarts, timed per restart
Weights are smooth-ish synthetic filters (a low-rank structure plus noise, shuffled), so an
ordering exists to be found; plain Gaussian weights have none.

Scaling (``scaling`` in the JSON): the same pair at m = 512, 1,024, 2,048, 4,096 channels
(d = 9,216 features each), seeds 0..2 (data and order seed alike):
  new            smoothing_order as it stands (exact path up to EXACT_MAX, scalable above)
  old            exact_order - the algorithm smoothing_order used for every width before the
                 scalable path (full 2-opt, O(m^3)); run where m <= --old-max (seed 0 only
                 above --old-seeds-max), its time extrapolated as a power law above that
TV is reported against the identity order and against the old algorithm's (same seed).

Wide groups (``wide``): smoothing_order alone on group shapes of real models - a vgg11
classifier pair (4,096 channels, 25,088 + 4,096 + 1 features), an all-MiniLM-L6-v2 FFN
(1,536 channels, 384 + 384 + 1 features; the model has six).

Conversion (``conversion``): runtime.inn.conversion.convert on an untrained ResNet-50
(torchvision's if it imports, else the same layout defined here) and an untrained
all-MiniLM-L6-v2-shaped encoder (defined here; attention projections kept discrete), total
and permutation time.

Writes bench/results/permutation.json.

    python -m bench.permutation [--sizes 512,1024,2048,4096] [--seeds 3] [--old-max 2048]
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
from torch import nn

from runtime.inn.permute import (
    EXACT_MAX,
    _two_opt,
    distance_matrix,
    exact_order,
    smoothing_order,
    total_variation,
)

OUT = Path(__file__).parent / "results"


def layer4_pair(seed: int, m: int = 512, d_a: int = 512 * 9, d_b: int = 512 * 9) -> torch.Tensor:
    """(m, d_a + d_b) features of one group: conv_a's filters (rows), conv_b's input slices."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(m, 1, generator=g)  # a hidden 1-D channel coordinate
    basis_a = torch.randn(8, d_a, generator=g)
    basis_b = torch.randn(8, d_b, generator=g)
    freqs = torch.arange(1, 9).float()
    code = torch.sin(np.pi * t * freqs)  # (m, 8): smooth in t
    a = code @ basis_a + 0.5 * torch.randn(m, d_a, generator=g)
    b = code @ basis_b + 0.5 * torch.randn(m, d_b, generator=g)
    return torch.cat([a, b], dim=1) * 0.02


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def summary(values: list[float]) -> dict:
    """Mean and spread (min, max) of a list; the one value when there is one."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "n": len(values)}  # fmt: skip


def group_512(args) -> dict:
    """The original measurement (keeps the original fields and their meaning)."""
    f = layer4_pair(0)
    tv_identity = total_variation(f)
    times, order = [], None
    for _ in range(args.repeats):
        order, seconds = timed(smoothing_order, f, seed=0)
        times.append(seconds)
    tv_ours = total_variation(f, order)
    dist = distance_matrix(f)
    rng = np.random.default_rng(0)
    restart_tv, restart_times = [], []
    for _ in range(args.restarts):
        path, seconds = timed(_two_opt, dist, rng.permutation(f.shape[0]))
        restart_times.append(seconds)
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
    print(f"512-channel group, {f.shape[1]} features per channel")
    print(f"  innfer smoothing_order   {result['innfer_seconds_median']:.3f} s (median of "
          f"{args.repeats}), TV {tv_ours:,.0f}")  # fmt: skip
    print(f"  identity order           TV {tv_identity:,.0f} "
          f"(innfer removes {result['tv_reduction_vs_identity']:.1%})")  # fmt: skip
    print(f"  random start + 2-opt     {result['restart_seconds_median']:.3f} s per restart, "
          f"best TV of {args.restarts}: {min(restart_tv):,.0f} "
          f"(innfer / best = {result['tv_ratio_vs_restarts']:.3f})")  # fmt: skip
    return result


def scaling(args) -> list[dict]:
    rows = []
    print(f"\nscaling: seeds 0..{args.seeds - 1}, 9,216 features, exact path up to m={EXACT_MAX}")
    print(f"  {'m':>5}  {'new s':>13}  {'old s':>16}  {'new/identity TV':>16}  "
          f"{'new/old TV':>16}")  # fmt: skip
    for m in args.sizes:
        new_s, new_tv, id_tv, old_s, old_tv, vs_old = [], [], [], [], [], []
        for seed in range(args.seeds):
            f = layer4_pair(seed, m)
            order, seconds = timed(smoothing_order, f, seed=seed)
            new_s.append(seconds)
            new_tv.append(total_variation(f, order))
            id_tv.append(total_variation(f))
            run_old = m <= args.old_max and (seed == 0 or m <= args.old_seeds_max)
            if run_old:
                old, seconds = timed(exact_order, f, seed=seed)
                old_s.append(seconds)
                old_tv.append(total_variation(f, old))
                vs_old.append(new_tv[-1] / old_tv[-1])
        row = {
            "channels": m,
            "features": 2 * 512 * 9,
            "path": "exact" if m <= EXACT_MAX else "scalable",
            "new_seconds": summary(new_s),
            "new_tv": summary(new_tv),
            "identity_tv": summary(id_tv),
            "new_tv_vs_identity": summary([a / b for a, b in zip(new_tv, id_tv, strict=True)]),
            "old_seconds": summary(old_s) if old_s else None,
            "old_seconds_extrapolated": None,
            "old_tv": summary(old_tv) if old_tv else None,
            "new_tv_vs_old": summary(vs_old) if vs_old else None,
        }
        if not old_s:
            row["old_seconds_extrapolated"] = _extrapolate(rows, m)
        rows.append(row)
        old_txt = (f"{row['old_seconds']['mean']:7.2f} (n={len(old_s)})" if old_s else
                   f"~{row['old_seconds_extrapolated']:.0f} (extrap.)")  # fmt: skip
        vs_id = _pm([a / b for a, b in zip(new_tv, id_tv, strict=True)], ".4f")
        vs_old_txt = _pm(vs_old, ".4f") if vs_old else "-"
        print(f"  {m:>5}  {_pm(new_s, '.2f'):>13}  {old_txt:>16}  {vs_id:>16}  {vs_old_txt:>16}")
    return rows


def _pm(values: list[float], fmt: str) -> str:
    mean = statistics.fmean(values)
    half = (max(values) - min(values)) / 2
    return f"{mean:{fmt}}±{half:{fmt}}"


def _extrapolate(rows: list[dict], m: int) -> float | None:
    """The old algorithm's time at ``m`` from a power law through its last two measurements."""
    known = [(r["channels"], r["old_seconds"]["mean"]) for r in rows if r["old_seconds"]]
    if len(known) < 2:
        return None
    (m0, t0), (m1, t1) = known[-2:]
    slope = np.log(t1 / t0) / np.log(m1 / m0)
    return float(t1 * (m / m1) ** slope)


def wide_groups() -> list[dict]:
    cases = [
        ("vgg11 classifier fc1/fc2 pair", 4096, 25088, 4096 + 1),
        ("all-MiniLM-L6-v2 FFN (one of six)", 1536, 384, 384 + 1),
    ]
    rows = []
    print("\nwide groups (seed 0)")
    for name, m, d_a, d_b in cases:
        f = layer4_pair(0, m, d_a, d_b)
        order, seconds = timed(smoothing_order, f, seed=0)
        tv, tv_id = total_variation(f, order), total_variation(f)
        rows.append({"name": name, "channels": m, "features": d_a + d_b, "seconds": seconds,
                     "tv": tv, "identity_tv": tv_id})  # fmt: skip
        print(f"  {name:<36} m={m:>5} d={d_a + d_b:>6}  {seconds:6.2f} s  "
              f"TV / identity {tv / tv_id:.4f}")  # fmt: skip
        del f
    return rows


def resnet50() -> tuple[nn.Module, str]:
    """torchvision's resnet50 (untrained) if torchvision imports, else the same layout."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return ResNet50Like(), "bench.permutation.ResNet50Like"
    try:
        from runtime.inn.compat import import_torchvision

        tv_resnet50 = import_torchvision().models.resnet50
        return tv_resnet50(), "torchvision.models.resnet50"
    except Exception:
        return ResNet50Like(), "bench.permutation.ResNet50Like"


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * width
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        skip = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        return self.relu(self.bn3(self.conv3(h)) + skip)


class ResNet50Like(nn.Module):
    """torchvision's ResNet-50 layout: bottlenecks 3-4-6-3, widths 64-128-256-512 (x4 out)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, c_in = [], 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
            blocks = []
            for k in range(n):
                blocks.append(Bottleneck(c_in, width, 2 if k == 0 and i > 0 else 1))
                c_in = 4 * width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class EncoderLayer(nn.Module):
    """A BERT encoder layer as written in plain torch (all-MiniLM-L6-v2: 384 wide, 12 heads,
    FFN 1,536)."""

    def __init__(self, hidden: int = 384, heads: int = 12, ffn: int = 1536) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.ffn_in, self.ffn_out = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x):
        b, t, h = x.shape

        def split(y):
            return y.reshape(b, t, self.heads, h // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / (h // self.heads) ** 0.5, -1) @ v
        x = self.norm1(x + self.out(a.transpose(1, 2).reshape(b, t, h)))
        return self.norm2(x + self.ffn_out(nn.functional.gelu(self.ffn_in(x))))


class MiniLMLike(nn.Module):
    """all-MiniLM-L6-v2's encoder shape: embedding, six 384-wide layers, mean pooling."""

    def __init__(self, vocab: int = 30522, layers: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 384)
        self.layers = nn.Sequential(*[EncoderLayer() for _ in range(layers)])

    def forward(self, ids):
        return self.layers(self.embed(ids)).mean(1)


def conversion() -> list[dict]:
    """convert() on untrained ResNet-50 and MiniLM-shaped models: total and permutation time.

    The attention projections (query/key/value) are kept discrete: head splitting is not
    resampled, so the six FFN groups (1,536 channels each) are what gets permuted there.
    """
    import runtime.inn.conversion as conv

    torch.manual_seed(0)
    model, source = resnet50()
    minilm = MiniLMLike()
    cases = [
        (source, model, torch.randn(1, 3, 224, 224), ()),
        ("bench.permutation.MiniLMLike (all-MiniLM-L6-v2 shape)", minilm,
         torch.randint(0, 30522, (1, 16)),
         [f"layers.{i}.{n}" for i in range(6) for n in ("query", "key", "value")]),
    ]  # fmt: skip
    rows = []
    print()
    for name, net, example, discrete in cases:
        spent: list[tuple[int, float]] = []
        original = conv.smoothing_order

        def timed_order(features, *a, original=original, spent=spent, **kw):
            order, seconds = timed(original, features, *a, **kw)
            spent.append((features.shape[0], seconds))
            return order

        conv.smoothing_order = timed_order
        try:
            _, seconds = timed(conv.convert, net, example, discrete=discrete)
            error = None
        except Exception as exc:  # conversion support is not this benchmark's subject
            seconds, error = None, f"{type(exc).__name__}: {exc}"[:300]
        finally:
            conv.smoothing_order = original
        widest = max((m for m, _ in spent), default=0)
        row = {"model": name, "seconds": seconds, "error": error, "groups": len(spent),
               "permutation_seconds": sum(s for _, s in spent), "widest_group": widest,
               "widest_groups_seconds": sum(s for m, s in spent if m == widest)}  # fmt: skip
        rows.append(row)
        if error:
            print(f"convert({name}) failed: {error}")
        else:
            print(f"convert({name}): {seconds:.1f} s, of which permutation "
                  f"{row['permutation_seconds']:.1f} s over {len(spent)} groups "
                  f"(widest {widest}: {row['widest_groups_seconds']:.1f} s)")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[512, 1024, 2048, 4096])  # fmt: skip
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--old-max", type=int, default=2048, help="largest m to run the old path")
    p.add_argument("--old-seeds-max", type=int, default=1024,
                   help="largest m to run the old path on every seed (seed 0 above)")  # fmt: skip
    p.add_argument("--skip", default="", help="comma list of: scaling, wide, conversion")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    result = group_512(args)
    result["exact_max"] = EXACT_MAX
    if "scaling" not in skip:
        result["scaling"] = scaling(args)
    if "wide" not in skip:
        result["wide"] = wide_groups()
    if "conversion" not in skip:
        result["conversion"] = conversion()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "permutation.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
