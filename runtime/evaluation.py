"""Accuracy of an IntegralModel across widths: the table behind the demo and the benchmark.

Example:
    >>> rows = accuracy_by_width(inn, data, widths=(1.0, 0.5))  # doctest: +SKIP
    >>> print(format_table(rows))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from .data import Dataset
from .model import IntegralModel
from .training import evaluate


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
