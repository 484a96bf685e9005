"""Accuracy, FLOPs and parameters of an INN across widths (``innfer report``, the demo).

Example:
    >>> rows = width_report(inn, widths=(1.0, 0.5), data=load("mnist5k"))  # doctest: +SKIP
    >>> print(format_report(rows))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from runtime.atomic import write_output
from runtime.inn.calibrate import scores
from runtime.inn.model import IntegralModel
from runtime.inn.modes import evaluating


class Dataset(Protocol):
    """What a report needs of a data set (``runtime.demo.data.Dataset`` has it)."""

    x_test: Tensor
    y_test: Tensor
    input_shape: tuple[int, ...]


DEFAULT_WIDTHS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


@dataclass(frozen=True)
class ReportRow:
    width: float
    flops: int
    params: int
    accuracy: float | None
    calibrated: bool = False  # a calibrated tier (runtime.inn.calibrate) serves this width
    # BatchNorm statistics re-estimated on training inputs for this report (the INN stores
    # none for these channel counts; the full width's resampled ones cost most accuracy)
    norms_reestimated: bool = False
    full_flops: int | None = None  # the full width's FLOPs: the FLOPs column's denominator


def width_report(
    inn: IntegralModel,
    widths: Sequence[float] = DEFAULT_WIDTHS,
    data: Dataset | None = None,
    method: str = "auto",
    multiple_of: int = 1,
    reestimate_norms: bool = True,
    example: tuple[torch.Tensor, ...] | None = None,
) -> list[ReportRow]:
    """One row per width: FLOPs at batch 1, parameter count, test accuracy if ``data``,
    and whether calibrated weights serve it (widths rounded as the tiers round them:
    ``multiple_of``). ``example``: the batch-1 inputs FLOPs are counted at, for a model of
    several inputs (default: zeros of ``data``'s or the INN's recorded input shape).

    Where the INN has BatchNorm layers and stores no statistics for a width's channel
    counts, they are re-estimated (this report only, the INN is not changed) on the first
    ``NORM_SAMPLES`` training inputs of ``data``, as ``innfer build`` samples its tiers
    (runtime/build/sampling.py): with the full width's statistics resampled, a width of the
    MNIST ResNet trained one epoch scored 10.5 % where the built tier scores 69.9 %."""
    if not widths:
        raise ValueError("widths is empty; give at least one width in (0, 1]")
    from runtime.inn.calibrate import NORM_SAMPLES, recompute_norm_stats, unnormed

    if example is None:
        shape = data.input_shape if data is not None else _input_shape(inn)
        # ids: integers. x_test: the Protocol's (x_train, for norm statistics, is optional)
        dtype = torch.as_tensor(data.x_test[:1]).dtype if data is not None else torch.float32
        example = (_as_weights(torch.zeros(1, *shape, dtype=dtype), _float_dtype(inn.state)),)
    x_norm = getattr(data, "x_train", None) if reestimate_norms else None
    if x_norm is not None:
        x_norm = _as_weights(torch.as_tensor(x_norm[:NORM_SAMPLES]), _float_dtype(inn.state))
    full_flops = None
    rows = []
    for w in widths:
        sizes = inn.sizes(w, multiple_of)
        net = inn.sample(sizes, method=method)
        reestimated = False
        if x_norm is not None and len(x_norm) >= 64 and unnormed(inn, net, sizes, method):
            reestimated = recompute_norm_stats(net, x_norm)
        flops = count_flops(net, example)
        if sizes == inn.sizes(1.0):
            full_flops = flops
        acc = evaluate(net, data.x_test, data.y_test) if data is not None else None
        params = sum(p.numel() for p in net.parameters())
        cal = inn.sizes_key(sizes) in inn.tiers
        rows.append(ReportRow(w, flops, params, acc, cal, reestimated))
    if full_flops is None:  # no row at the full width: the ratios are still to it
        full_flops = count_flops(inn.sample(1.0, method=method), example)
    return [replace(r, full_flops=full_flops) for r in rows]


def _input_shape(inn: IntegralModel) -> tuple[int, ...]:
    shape = inn.info.get("input_shape")
    if shape is None:
        raise ValueError("the INN does not record its input shape; pass an evaluation set")
    return tuple(shape)


def format_report(rows: Sequence[ReportRow]) -> str:
    # the FLOPs ratio is to the full width (not the first row: --widths 0.25 0.5 1.0 showed
    # the full width at 14.52)
    full = next((r.full_flops for r in rows if r.full_flops), None)
    if full is None:
        full = next((r.flops for r in rows if r.width == 1.0), max(r.flops for r in rows))
    # as wide as the largest count (11,176,842 params overflowed a fixed 9 and shifted the row)
    pw = max(9, *(len(f"{r.params:,}") for r in rows))
    fw = max(9, *(len(f"{r.flops / 1e6:.3f}") for r in rows))
    head = f"{'width':>6} {'MFLOPs':>{fw}} {'FLOPs':>6} {'params':>{pw}} {'accuracy':>9}"
    lines = [f"{head}  weights"]
    for r in rows:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.2%}"
        src = "calibrated" if r.calibrated else "sampled"
        if r.norms_reestimated and not r.calibrated:
            src = "sampled, norms re-estimated"
        share = r.flops / max(full, 1)
        lines.append(f"{r.width:>6.1%} {r.flops / 1e6:>{fw}.3f} {share:>6.2f} "
                     f"{r.params:>{pw},} {acc:>9}  {src}")  # fmt: skip
    return "\n".join(lines)


@dataclass(frozen=True)
class ServedTier:
    """A built tier as the server plans it: its record's width and accuracy (None where the
    build measured none) and profile.json's median latency at batch 1 and at the largest
    profiled batch."""

    name: str
    width: float
    accuracy: float | None
    p50_ms_1: float
    batch: int
    p50_ms_batch: float


def format_served(tiers: Sequence[ServedTier], where: str) -> str:
    """The served tiers' latency beside their accuracy, one line each, narrowest first (by
    latency, a noisy profile read as tiers out of order: w025, w050, w100, w075 - review
    helper-225). The accuracy is the build's, on model.yaml's evaluation set, and says so:
    beside a width table on other data (``--data``) it read as a second figure for the
    same tier (review helper-246).

    Example:
        >>> print(format_served([ServedTier("w100", 1.0, None, 0.6, 8, 0.65),
        ...                      ServedTier("w075", 0.75, None, 0.5, 8, 0.83)], "profile.json"))
        served tiers (profile.json):
            tier  width  accuracy    p50 b1    p50 b8
            w075  75.0%         -   0.500ms   0.830ms
            w100 100.0%         -   0.600ms   0.650ms
    """
    b = tiers[0].batch if tiers else 1
    head = f"{'tier':>8} {'width':>6} {'accuracy':>9} {'p50 b1':>9} {f'p50 b{b}':>9}"
    said = any(t.accuracy is not None for t in tiers)  # (no evaluation set: a column of "-")
    on = "; accuracy at build, on model.yaml's evaluation set" if said else ""
    lines = [f"served tiers ({where}){on}:", head]
    for t in sorted(tiers, key=lambda t: (t.width, t.name)):
        acc = "-" if t.accuracy is None else f"{t.accuracy:.2%}"
        lines.append(f"{t.name:>8} {t.width:>6.1%} {acc:>9} {t.p50_ms_1:>7.3f}ms "
                     f"{t.p50_ms_batch:>7.3f}ms")  # fmt: skip
    return "\n".join(lines)


def save_report(
    rows: Sequence[ReportRow],
    json_path: Path | None,
    png_path: Path | None,
    served: Sequence[ServedTier] = (),
    ylabel: str = "test accuracy",
    latency_source: str = "profile.json",
) -> None:
    """Write ``rows`` and ``served`` as JSON - ``{"widths": [row, ...], "served": [tier,
    ...]}``, ``served`` empty for a model not built, so a script reads one shape either way -
    and plot accuracy against width and FLOPs where there is one, beside the served tiers'
    latency against width where the model is built (``served``; its latencies from
    ``latency_source``: profile.json, or an auto-tiered model's frontier.json)."""
    if json_path is not None:
        doc = {"widths": [asdict(r) for r in rows], "served": [asdict(t) for t in served]}
        # whole or not at all: scripts read it (through a link, or to a pipe or device)
        write_output(json_path, json.dumps(doc, indent=1).encode())
    has_acc = any(r.accuracy is not None for r in rows)
    if png_path is None or not (has_acc or served):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (2 if has_acc else 0) + (1 if served else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6), squeeze=False)
    if served:
        _plot_served(axes[0][-1], served, latency_source)
    if not has_acc:
        fig.tight_layout()
        fig.savefig(png_path, dpi=110)
        plt.close(fig)  # pyplot keeps every figure open otherwise (a long process leaks)
        return
    ax = axes[0]
    cal = [r for r in rows if r.calibrated]
    for a, x in ((ax[0], lambda r: r.width), (ax[1], lambda r: r.flops / 1e6)):
        line = sorted(rows, key=x)  # joined along the axis, not in the order asked for
        # (--widths 0.25 1.0 0.5 drew a zig-zag: review helper-234)
        a.plot([x(r) for r in line], [r.accuracy for r in line], marker="o", label="INN")
        if cal:  # calibrated tiers carry their own weights: mark them apart
            a.scatter([x(r) for r in cal], [r.accuracy for r in cal], marker="*", s=140,
                      color="tab:red", zorder=3, label="calibrated tier")  # fmt: skip
        a.grid(alpha=0.3)
    ax[0].set_xlabel("width")
    ax[0].set_ylabel(ylabel)
    ax[1].set_xlabel("MFLOPs (batch 1)")
    if cal:
        ax[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _plot_served(ax, served: Sequence[ServedTier], source: str = "profile.json") -> None:
    """Median latency against width of the built tiers, at batch 1 and the largest batch."""
    tiers = sorted(served, key=lambda t: t.width)
    widths = [t.width for t in tiers]
    ax.plot(widths, [t.p50_ms_1 for t in tiers], marker="o", label="batch 1")
    ax.plot(widths, [t.p50_ms_batch for t in tiers], marker="s", label=f"batch {tiers[0].batch}")
    for t in tiers:
        ax.annotate(t.name, (t.width, t.p50_ms_batch), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)  # fmt: skip
    ax.set_xlabel("tier width")
    ax.set_ylabel(f"p50 latency (ms, {source})")  # (frontier.json's, auto-tiered: helper-269)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``(x, y)``, computed in eval mode; for a
    map per pixel (outputs (N, C, H, W), labels (N, H, W)) the share of pixels right.

    The model's previous train/eval mode is restored afterwards.

    Example:
        >>> from runtime.demo import data, zoo
        >>> ds = data.load("digits")
        >>> 0.0 <= evaluate(zoo.build("digits_mlp"), ds.x_test, ds.y_test) <= 1.0
        True
    """
    dtype = _float_dtype(dict(model.named_parameters()))
    with evaluating(model):
        correct = 0
        for i in range(0, len(x), batch_size):
            logits = scores(model(_as_weights(x[i : i + batch_size], dtype)))  # (B, C[, H, W])
            predicted, labels = logits.argmax(dim=1), y[i : i + batch_size]
            if predicted.shape != labels.shape:  # (they broadcast: a table, not a score)
                raise ValueError(
                    f"labels of shape {list(labels.shape[1:])} per sample, but the model "
                    f"predicts {list(predicted.shape[1:])} per sample: give one class index "
                    "per prediction"
                )
            correct += int((predicted == labels).sum().item())
    return correct / max(y[: len(x)].numel(), 1)


def _float_dtype(tensors) -> torch.dtype | None:
    """The dtype of a model's floating weights (a name -> tensor mapping), None if none."""
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), None)


def _as_weights(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Floating inputs in the weights' dtype: a float16 INN fed float32 data (the data sets
    load as float32) failed "Input type (float) and bias type (c10::Half) should be the
    same" in `innfer report`, of a model that builds and serves (review helper-244).
    Integer inputs (token ids) are left alone."""
    x = torch.as_tensor(x)
    return x.to(dtype) if dtype is not None and x.is_floating_point() else x


def count_flops(module, example: tuple) -> int:
    """Floating-point operations of one forward pass at batch 1 (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*example)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class WidthRow:
    """Test accuracy of one sampled width, with its size."""

    width: float
    method: str
    accuracy: float
    params: int


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def accuracy_by_width(
    inn: IntegralModel,
    data: Dataset,
    widths: Iterable[float] = (1.0, 0.75, 0.5, 0.4, 0.25),
    methods: Sequence[str] = ("auto", "point", "cell"),
) -> list[WidthRow]:
    """Sample ``inn`` at each width with each method and measure test accuracy."""
    rows = []
    for w in widths:
        for method in methods:
            net = inn.sample(w, method=method)
            acc = evaluate(net, data.x_test, data.y_test)
            rows.append(WidthRow(w, method, acc, param_count(net)))
    return rows


def format_table(rows: Sequence[WidthRow], reference: float | None = None) -> str:
    """A plain-text table: one line per width, one accuracy column per method."""
    methods = list(dict.fromkeys(r.method for r in rows))
    widths = list(dict.fromkeys(r.width for r in rows))
    by = {(r.width, r.method): r for r in rows}
    head = f"{'width':>6} {'params':>9} " + " ".join(f"{m + ' acc':>10}" for m in methods)
    if reference is not None:
        head += f" {'of full':>8}"
    lines = [head, "-" * len(head)]
    for w in widths:
        first = by[(w, methods[0])]
        line = f"{w:>6.0%} {first.params:>9,} " + " ".join(
            f"{by[(w, m)].accuracy:>10.2%}" for m in methods
        )
        if reference is not None:
            best = max(by[(w, m)].accuracy for m in methods)
            line += f" {best / reference:>8.1%}"
        lines.append(line)
    return "\n".join(lines)
