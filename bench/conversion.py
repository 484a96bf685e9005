"""Data-free accuracy by width: INN conversion vs pruning baselines, five training seeds.

For each model and seed: train (fixed split), convert, then sample at each width with
  inn_auto       INN, smoothing permutation, the default resampling (point >= 50 %, else cell)
  inn_cell       INN, smoothing permutation, cell averaging
  inn_point      INN, smoothing permutation, point sampling (as in the INN paper)
  inn_noperm     INN without the permutation (cell averaging)
  l1             L1-norm filter pruning on the same channel groups (keep the largest filters)
  truncate       keep the first n channels
No data and no fine-tuning. Prints mean and spread over seeds, writes
bench/results/conversion.json and conversion.png.

    python -m bench.conversion [--seeds 5] [--models digits_mlp,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.publish import publish
from runtime.demo.training import evaluate, train_model
from runtime.inn.continuous import resample_matrix
from runtime.inn.conversion import convert
from runtime.inn.model import IntegralModel

WIDTHS = (1.0, 0.75, 0.5, 0.4, 0.25)
MODELS = ("mnist_resnet", "digits_cnn", "digits_cnn_bn", "digits_mlp")
METHODS = ("inn_auto", "inn_cell", "inn_point", "inn_noperm", "l1", "truncate")
OUT = Path(__file__).parent / "results"


def selection(keep: torch.Tensor, m: int) -> torch.Tensor:
    """(n, m) matrix that picks channels ``keep`` (kept in their original order)."""
    keep = keep.sort().values
    a = torch.zeros(len(keep), m, dtype=torch.float64)
    a[torch.arange(len(keep)), keep] = 1.0
    return a


def l1_scores(inn: IntegralModel, gi: int) -> torch.Tensor:
    """Per-channel L1 norm of every filter that produces group ``gi`` (summed over producers)."""
    g = inn.all_groups[gi]
    score = torch.zeros(g.size, dtype=torch.float64)
    for b in inn.bindings:
        t = inn.state[b.param]
        if b.reduce or b.dim != 0 or t.ndim < 2 or len(b.layout) != 1 or b.layout[0].group != gi:
            continue
        inner = b.layout[0].inner
        score += t.detach().abs().reshape(g.size, inner, -1).sum((1, 2)).double()
    return score


def sample(inn: IntegralModel, plain: IntegralModel, method: str, width: float):
    if method == "inn_auto":
        return inn.sample(width, method="auto")
    if method == "inn_cell":
        return inn.sample(width, method="cell")
    if method == "inn_point":
        return inn.sample(width, method="point")
    sizes = plain.sizes(width)
    if method == "inn_noperm":
        return plain.resample(sizes, lambda g, n: resample_matrix(g.size, n, "cell"))
    index = {g.name: i for i, g in enumerate(plain.all_groups)}
    if method == "l1":
        return plain.resample(
            sizes,
            lambda g, n: selection(l1_scores(plain, index[g.name]).topk(n).indices, g.size),
            quadrature=False,
        )
    if method == "truncate":
        return plain.resample(sizes, lambda g, n: selection(torch.arange(n), g.size), False)
    raise ValueError(method)


def run(models, seeds: int) -> dict:
    results: dict = {"widths": list(WIDTHS), "methods": list(METHODS), "models": {}}
    for name in models:
        runs = []
        for seed in tqdm(range(seeds), desc=name):
            model, data = train_model(name, seed=seed)
            x = data.x_test[:2]
            full = evaluate(model, data.x_test, data.y_test)
            inn = convert(model, (x,), seed=seed)
            plain = convert(model, (x,), permute=False)
            acc = {
                m: [evaluate(sample(inn, plain, m, w), data.x_test, data.y_test) for w in WIDTHS]
                for m in METHODS
            }
            with torch.no_grad():
                err = float((inn.sample(1.0)(data.x_test) - model(data.x_test)).abs().max())
            runs.append({"seed": seed, "full": full, "accuracy": acc, "full_width_abs_err": err})
        results["models"][name] = runs
    return results


def summarise(results: dict) -> str:
    lines = []
    widths = results["widths"]
    for name, runs in results["models"].items():
        fulls = [r["full"] for r in runs]
        lines.append(f"\n{name}: full accuracy {statistics.mean(fulls):.2%} "
                     f"(± {statistics.pstdev(fulls):.2%}), {len(runs)} seeds")  # fmt: skip
        lines.append(f"{'method':<12}" + "".join(f"{w:>16.0%}" for w in widths))
        for m in results["methods"]:
            cells = []
            for i in range(len(widths)):
                v = [r["accuracy"][m][i] for r in runs]
                cells.append(f"{statistics.mean(v):>9.1%} ±{statistics.pstdev(v):>4.1%}")
            lines.append(f"{m:<12}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    widths = results["widths"]
    for ax, name in zip(axes[0], names, strict=True):
        runs = results["models"][name]
        for m in results["methods"]:
            per_w = [[r["accuracy"][m][i] for r in runs] for i in range(len(widths))]
            mean = [statistics.mean(v) for v in per_w]
            sd = [statistics.pstdev(v) for v in per_w]
            ax.errorbar(widths, mean, yerr=sd, marker="o", capsize=3, label=m)
        ax.set_title(name)
        ax.set_xlabel("width")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (no data, no fine-tuning)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = run(args.models.split(","), args.seeds)
    results["wall_seconds"] = time.perf_counter() - t0
    publish(results, args.out, "conversion", plot, summarise(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
