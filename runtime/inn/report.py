"""Accuracy, FLOPs and parameters of an INN across widths (``innfer report``, the demo).

Example:
    >>> rows = width_report(inn, widths=(1.0, 0.5), data=load("mnist5k"))  # doctest: +SKIP
    >>> print(format_report(rows))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from runtime.inn.model import IntegralModel


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


def width_report(
    inn: IntegralModel,
    widths: Sequence[float] = DEFAULT_WIDTHS,
    data: Dataset | None = None,
    method: str = "auto",
    multiple_of: int = 1,
) -> list[ReportRow]:
    """One row per width: FLOPs at batch 1, parameter count, test accuracy if ``data``,
    and whether calibrated weights serve it (widths rounded as the tiers round them:
    ``multiple_of``)."""
    if not widths:
        raise ValueError("widths is empty; give at least one width in (0, 1]")
    rows = []
    for w in widths:
        sizes = inn.sizes(w, multiple_of)
        net = inn.sample(sizes, method=method)
        shape = data.input_shape if data is not None else _input_shape(inn)
        flops = count_flops(net, (torch.zeros(1, *shape),))
        acc = evaluate(net, data.x_test, data.y_test) if data is not None else None
        params = sum(p.numel() for p in net.parameters())
        rows.append(ReportRow(w, flops, params, acc, inn.sizes_key(sizes) in inn.tiers))
    return rows


def _input_shape(inn: IntegralModel) -> tuple[int, ...]:
    shape = inn.info.get("input_shape")
    if shape is None:
        raise ValueError("the INN does not record its input shape; pass an evaluation set")
    return tuple(shape)


def format_report(rows: Sequence[ReportRow]) -> str:
    full = rows[0]
    # as wide as the largest count (11,176,842 params overflowed a fixed 9 and shifted the row)
    pw = max(9, *(len(f"{r.params:,}") for r in rows))
    fw = max(9, *(len(f"{r.flops / 1e6:.3f}") for r in rows))
    head = f"{'width':>6} {'MFLOPs':>{fw}} {'FLOPs':>6} {'params':>{pw}} {'accuracy':>9}"
    lines = [f"{head}  weights"]
    for r in rows:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.2%}"
        src = "calibrated" if r.calibrated else "sampled"
        share = r.flops / max(full.flops, 1)
        lines.append(f"{r.width:>6.1%} {r.flops / 1e6:>{fw}.3f} {share:>6.2f} "
                     f"{r.params:>{pw},} {acc:>9}  {src}")  # fmt: skip
    return "\n".join(lines)


def save_report(rows: Sequence[ReportRow], json_path: Path | None, png_path: Path | None) -> None:
    if json_path is not None:
        json_path.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if png_path is None or all(r.accuracy is None for r in rows):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    cal = [r for r in rows if r.calibrated]
    for a, x in ((ax[0], lambda r: r.width), (ax[1], lambda r: r.flops / 1e6)):
        a.plot([x(r) for r in rows], [r.accuracy for r in rows], marker="o", label="INN")
        if cal:  # calibrated tiers carry their own weights: mark them apart
            a.scatter([x(r) for r in cal], [r.accuracy for r in cal], marker="*", s=140,
                      color="tab:red", zorder=3, label="calibrated tier")  # fmt: skip
        a.grid(alpha=0.3)
    ax[0].set_xlabel("width")
    ax[0].set_ylabel("test accuracy")
    ax[1].set_xlabel("MFLOPs (batch 1)")
    if cal:
        ax[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``(x, y)``, computed in eval mode.

    The model's previous train/eval mode is restored afterwards.

    Example:
        >>> from runtime.demo import data, zoo
        >>> ds = data.load("digits")
        >>> 0.0 <= evaluate(zoo.build("digits_mlp"), ds.x_test, ds.y_test) <= 1.0
        True
    """
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size])  # (B, num_classes)
            correct += int((logits.argmax(dim=1) == y[i : i + batch_size]).sum().item())
    finally:
        model.train(was_training)
    return correct / max(len(x), 1)


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
