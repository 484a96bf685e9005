"""Calibration with <= 1,000 samples: calibrated INN vs pruning + fine-tuning vs from scratch.

Tasks hard enough to tell the methods apart: MNIST-1D with ``mnist1d_cnn`` and MNIST-5k with
``mnist_resnet``, at 50 % and 25 % width. Per seed the full model is trained on its whole
train split (``runtime.training.train_model``); after that every method may use only the
first 1,000 train samples (``--n-calib``) and a wall-clock budget (``--seconds``, 30 s):

  inn_calibrated    convert (smoothing permutation, norms kept: fold_norms=False), then ONE
                    ``runtime.calibrate.calibrate`` call for both widths (one shared sandwich
                    fine-tuning distilled from the full model, per-width grid tuning and norm
                    re-estimation). Inputs only, no labels. The budget covers both widths.
  inn_uncalibrated  the default conversion (norms folded) sampled without data: reference.
  l1_prune          L1-norm filter pruning to the width, no fine-tuning: reference.
  l1_finetune       L1-norm filter pruning, then fine-tuning on the same 1,000 samples for the
                    same budget *per width*: KL to the full model's logits + cross-entropy on
                    the labels, AdamW lr 1e-3 (cosine decay over the budget), BatchNorm in
                    train mode while fine-tuning.
  scratch           the same-width network (channels rounded as the INN sampling rounds them)
                    trained from scratch on the same 1,000 labelled samples for the same budget
                    per width: Adam at the model's default lr and batch size, cosine decay over
                    the budget, cross-entropy.
  full              the full model (trained on all 4,000 train samples): the ceiling.

The baselines get the budget per width (2x the INN's in total); the INN gets it once. Goal:
"INN calibration beats both baselines at every width, and within 1 point of the full model
at 50 %" (means over seeds). The issue asked for five seeds; the default is 3 so the whole
run stays near 20 minutes on the 2-core dev machine (``--seeds 5`` runs all five). Prints
mean and spread (population std) over seeds, writes bench/results/calibration.json and
calibration.png.

    python bench/calibration.py [--seeds 5] [--seconds 30] [--models mnist1d_cnn,...]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bench.conversion import l1_scores, selection
from runtime import zoo
from runtime.calibrate import calibrate
from runtime.conversion import convert
from runtime.training import TRAIN_DEFAULTS, evaluate, seed_everything, train_model

MODELS = ("mnist1d_cnn", "mnist_resnet")
WIDTHS = (0.5, 0.25)
METHODS = ("inn_calibrated", "inn_uncalibrated", "l1_prune", "l1_finetune", "scratch")
# The zoo constructors' default channel counts (what train_model builds).
CHANNELS = {"mnist1d_cnn": (32, 64, 64), "mnist_resnet": (32, 64)}
OUT = Path(__file__).parent / "results"


def scaled(channels, width: float) -> tuple[int, ...]:
    """Channel counts at ``width``, rounded as ``IntegralModel.sizes`` rounds them."""
    return tuple(max(1, round(width * c)) for c in channels)


def l1_prune(plain, width: float) -> nn.Module:
    """L1-norm filter pruning of ``plain`` (unpermuted, norms kept) to ``width``."""
    index = {g.name: i for i, g in enumerate(plain.all_groups)}
    return plain.resample(
        plain.sizes(width),
        lambda g, n: selection(l1_scores(plain, index[g.name]).topk(n).indices, g.size),
        quadrature=False,
    )


def timed_fit(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    teacher: torch.Tensor | None,
    seconds: float,
    lr: float,
    batch_size: int,
    seed: int,
    opt_cls=torch.optim.AdamW,
) -> tuple[float, int]:
    """Train ``net`` for ``seconds`` of wall clock, learning rate cosine-decayed over the time.

    Loss: cross-entropy on ``y``, plus KL to ``teacher`` logits when given. Full batches
    only (BatchNorm in train mode). Returns (seconds used, steps) and leaves ``net`` in eval.
    """
    for p in net.parameters():
        p.requires_grad_(True)
    opt = opt_cls(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    soft = None if teacher is None else teacher.softmax(-1)
    net.train()
    steps = 0
    start = time.perf_counter()
    done = False
    while not done:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                done = True
                break
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * elapsed / seconds))
            idx = perm[i : i + batch_size]
            out = net(x[idx])  # (B, classes)
            loss = F.cross_entropy(out, y[idx])
            if soft is not None:
                loss = loss + F.kl_div(out.log_softmax(-1), soft[idx], reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    used = time.perf_counter() - start
    net.eval()
    return used, steps


def run_seed(name: str, seed: int, widths, seconds: float, n_calib: int) -> dict:
    t0 = time.perf_counter()
    model, data = train_model(name, seed=seed)
    train_s = time.perf_counter() - t0
    xt, yt = data.x_test, data.y_test
    ex = (data.x_test[:2],)
    xc, yc = data.x_train[:n_calib], data.y_train[:n_calib]
    with torch.no_grad():
        teacher = model(xc)  # (n_calib, classes), eval mode
    acc: dict[str, list[float]] = {m: [] for m in METHODS}
    secs: dict[str, list[float]] = {m: [] for m in METHODS}
    steps: dict[str, list[int]] = {"l1_finetune": [], "scratch": []}
    # Process CPU seconds (both threads) next to the wall-clock budgets: other work on the
    # machine shows up as a CPU/wall ratio well under the thread count.
    cpu: dict = {"l1_finetune": [], "scratch": []}

    t, c = time.perf_counter(), time.process_time()
    inn = convert(model, ex, fold_norms=False, seed=seed)
    tuned = calibrate(inn, xc, list(widths), seconds=seconds, seed=seed, progress=False)
    cal_s = time.perf_counter() - t  # conversion + calibration, shared by every width
    cpu["inn_calibrated"] = time.process_time() - c
    folded = convert(model, ex, seed=seed)
    plain = convert(model, ex, permute=False, fold_norms=False)
    cfg = TRAIN_DEFAULTS[name]
    for w in widths:
        acc["inn_calibrated"].append(evaluate(tuned.sample(w), xt, yt))
        secs["inn_calibrated"].append(cal_s)
        acc["inn_uncalibrated"].append(evaluate(folded.sample(w), xt, yt))
        secs["inn_uncalibrated"].append(0.0)

        pruned = l1_prune(plain, w)
        acc["l1_prune"].append(evaluate(pruned, xt, yt))
        secs["l1_prune"].append(0.0)
        c = time.process_time()
        used, n = timed_fit(pruned, xc, yc, teacher, seconds, lr=1e-3, batch_size=64, seed=seed)
        cpu["l1_finetune"].append(time.process_time() - c)
        acc["l1_finetune"].append(evaluate(pruned, xt, yt))
        secs["l1_finetune"].append(used)
        steps["l1_finetune"].append(n)

        seed_everything(seed)
        net = zoo.build(name, channels=scaled(CHANNELS[name], w))
        c = time.process_time()
        used, n = timed_fit(net, xc, yc, None, seconds, lr=cfg.lr, batch_size=cfg.batch_size,
                            seed=seed, opt_cls=torch.optim.Adam)  # fmt: skip
        cpu["scratch"].append(time.process_time() - c)
        acc["scratch"].append(evaluate(net, xt, yt))
        secs["scratch"].append(used)
        steps["scratch"].append(n)
    return {
        "seed": seed,
        "full": evaluate(model, xt, yt),
        "accuracy": acc,
        "seconds": secs,
        "steps": steps,
        "cpu_seconds": cpu,
        "train_full_seconds": train_s,
    }


def run(models, seeds: int, widths, seconds: float, n_calib: int) -> dict:
    results: dict = {
        "widths": list(widths),
        "methods": list(METHODS),
        "seconds_budget": seconds,
        "n_calib": n_calib,
        "seeds": seeds,
        "seeds_requested_by_issue": 5,
        "models": {},
    }
    for name in models:
        results["models"][name] = [
            run_seed(name, seed, widths, seconds, n_calib) for seed in tqdm(range(seeds), desc=name)
        ]
    return results


def _ms(values) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values)


def _flat(v) -> list[float]:
    return list(v) if isinstance(v, list) else [v]


def goal_check(results: dict) -> dict[str, dict]:
    """Per model: does inn_calibrated beat l1_finetune and scratch at every width (means), and
    is it within 1 point of the full model at 50 %?"""
    out = {}
    widths = results["widths"]
    for name, runs in results["models"].items():
        mean = {
            m: [statistics.mean(r["accuracy"][m][i] for r in runs) for i in range(len(widths))]
            for m in results["methods"]
        }
        full = statistics.mean(r["full"] for r in runs)
        beats = all(
            mean["inn_calibrated"][i] > max(mean["l1_finetune"][i], mean["scratch"][i])
            for i in range(len(widths))
        )
        gap = full - mean["inn_calibrated"][widths.index(0.5)] if 0.5 in widths else None
        out[name] = {
            "beats_baselines_every_width": beats,
            "gap_to_full_at_50": gap,
            "within_1pt_at_50": gap is not None and gap <= 0.01,
            "pass": beats and gap is not None and gap <= 0.01,
        }
    return out


def summarise(results: dict) -> str:
    lines = [
        f"{results['seeds']} seeds (the issue asked for {results['seeds_requested_by_issue']}; "
        f"default 3 keeps the run near 20 min; --seeds 5), {results['n_calib']} calibration "
        f"samples, budget {results['seconds_budget']:.0f} s per method "
        f"(INN: once for all widths; baselines: per width)"
    ]
    widths = results["widths"]
    for name, runs in results["models"].items():
        full, full_sd = _ms([r["full"] for r in runs])
        tr, _ = _ms([r["train_full_seconds"] for r in runs])
        lines.append(f"\n{name}: full accuracy {full:.2%} (± {full_sd:.2%}), "
                     f"trained in {tr:.0f} s, {len(runs)} seeds")  # fmt: skip
        lines.append(f"{'method':<18}" + "".join(f"{w:>16.0%}" for w in widths)
                     + f"{'seconds used':>22}")  # fmt: skip
        for m in results["methods"]:
            cells = []
            for i in range(len(widths)):
                v = [r["accuracy"][m][i] for r in runs]
                cells.append(f"{statistics.mean(v):>9.1%} ±{statistics.pstdev(v):>4.1%}")
            if m == "inn_calibrated":
                t = f"{_ms([r['seconds'][m][0] for r in runs])[0]:.1f} (all widths)"
            else:
                t = " / ".join(
                    f"{_ms([r['seconds'][m][i] for r in runs])[0]:.1f}" for i in range(len(widths))
                )
            lines.append(f"{m:<18}" + "".join(f"{c:>16}" for c in cells) + f"{t:>22}")
        steps = {
            m: " / ".join(
                f"{_ms([r['steps'][m][i] for r in runs])[0]:.0f}" for i in range(len(widths))
            )
            for m in ("l1_finetune", "scratch")
        }
        ratio = {
            m: _ms([sum(_flat(r["cpu_seconds"][m])) / sum(_flat(r["seconds"][m][:1] if
                    m == "inn_calibrated" else r["seconds"][m])) for r in runs])[0]
            for m in ("inn_calibrated", "l1_finetune", "scratch")
        }  # fmt: skip
        lines.append(
            f"  steps in budget: l1_finetune {steps['l1_finetune']}, scratch {steps['scratch']}"
            f"; CPU/wall (2 threads, lower = other work): "
            + ", ".join(f"{m} {v:.2f}" for m, v in ratio.items())
        )
    lines.append("\ngoal: INN calibration beats both baselines at every width, and within "
                 "1 point of the full model at 50 %")  # fmt: skip
    for name, g in results["goal"].items():
        gap = g["gap_to_full_at_50"]
        lines.append(
            f"  {name:<14} beats baselines: {'yes' if g['beats_baselines_every_width'] else 'NO'}"
            f"; gap to full at 50 %: {gap * 100:+.1f} pt"
            f" -> {'PASS' if g['pass'] else 'FAIL'}"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 3.8), squeeze=False)
    widths = results["widths"]
    for ax, name in zip(axes[0], names, strict=True):
        runs = results["models"][name]
        for m in results["methods"]:
            per_w = [[r["accuracy"][m][i] for r in runs] for i in range(len(widths))]
            style = "--" if m in ("inn_uncalibrated", "l1_prune") else "-"
            ax.errorbar(widths, [statistics.mean(v) for v in per_w],
                        yerr=[statistics.pstdev(v) for v in per_w], marker="o", capsize=3,
                        linestyle=style, label=m)  # fmt: skip
        full, sd = _ms([r["full"] for r in runs])
        ax.errorbar([1.0], [full], yerr=[sd], marker="*", markersize=10, color="k",
                    capsize=3, label="full")  # fmt: skip
        ax.set_title(f"{name} ({results['n_calib']} samples, {results['seconds_budget']:.0f} s)")
        ax.set_xlabel("width")
        ax.set_xticks([*widths, 1.0])
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="the issue asked for 5 (default 3)")
    p.add_argument("--seconds", type=float, default=30.0, help="time budget per method")
    p.add_argument("--n-calib", type=int, default=1000, help="first N train samples")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--widths", default=",".join(str(w) for w in WIDTHS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.n_calib > 1000:
        p.error("--n-calib must be <= 1000")
    torch.set_num_threads(args.threads)
    widths = [float(w) for w in args.widths.split(",")]
    t0 = time.perf_counter()
    results = run(args.models.split(","), args.seeds, widths, args.seconds, args.n_calib)
    results["goal"] = goal_check(results)
    results["wall_seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "calibration.png")
    print(summarise(results))
    print(f"\nwrote {args.out / 'calibration.json'} and calibration.png "
          f"({results['wall_seconds']:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
