"""``innfer report``: accuracy, FLOPs and parameters of an INN across widths.

Example:
    >>> rows = width_report(inn, widths=(1.0, 0.5), data=load("mnist5k"))  # doctest: +SKIP
    >>> print(format_report(rows))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .build import count_flops
from .data import Dataset
from .model import IntegralModel
from .training import evaluate

DEFAULT_WIDTHS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


@dataclass(frozen=True)
class ReportRow:
    width: float
    flops: int
    params: int
    accuracy: float | None


def width_report(
    inn: IntegralModel,
    widths: Sequence[float] = DEFAULT_WIDTHS,
    data: Dataset | None = None,
    method: str = "auto",
) -> list[ReportRow]:
    """One row per width: FLOPs at batch 1, parameter count, test accuracy if ``data``."""
    if not widths:
        raise ValueError("widths is empty; give at least one width in (0, 1]")
    rows = []
    for w in widths:
        net = inn.sample(w, method=method)
        shape = data.input_shape if data is not None else _input_shape(inn)
        flops = count_flops(net, (torch.zeros(1, *shape),))
        acc = evaluate(net, data.x_test, data.y_test) if data is not None else None
        rows.append(ReportRow(w, flops, sum(p.numel() for p in net.parameters()), acc))
    return rows


def _input_shape(inn: IntegralModel) -> tuple[int, ...]:
    shape = inn.info.get("input_shape")
    if shape is None:
        raise ValueError("the INN does not record its input shape; pass an evaluation set")
    return tuple(shape)


def format_report(rows: Sequence[ReportRow]) -> str:
    full = rows[0]
    lines = [f"{'width':>6} {'MFLOPs':>9} {'FLOPs':>6} {'params':>9} {'accuracy':>9}"]
    for r in rows:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.2%}"
        lines.append(f"{r.width:>6.1%} {r.flops / 1e6:>9.3f} {r.flops / max(full.flops, 1):>6.2f} "
                     f"{r.params:>9,} {acc:>9}")  # fmt: skip
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
    ax[0].plot([r.width for r in rows], [r.accuracy for r in rows], marker="o")
    ax[0].set_xlabel("width")
    ax[0].set_ylabel("test accuracy")
    ax[1].plot([r.flops / 1e6 for r in rows], [r.accuracy for r in rows], marker="o")
    ax[1].set_xlabel("MFLOPs (batch 1)")
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
