"""Shaped widths: a tier's channels per kind spread over the layers by measured sensitivity.

A uniform tier cuts every layer alike: ``{"heads": 0.5, "ffn": 0.5}`` keeps 6 of 12 heads in
every layer of all-MiniLM-L6-v2. Layers are not alike. Narrowed one at a time on calibration
text (``runtime.inn.sensitivity``), its last layer's heads cost 5.4 points of embedding
cosine at half width and every other group 0.3-1.2. A shaped tier, ``{"heads": 0.5,
"ffn": 0.5, "shaped": True}``, keeps exactly the uniform tier's total per kind - so the same
parameters and nearly the same FLOPs (a head costs the same in every layer; so does an FFN
channel) - and spreads it where the loss is smallest.

The rule (``allocate``): per kind, start every group at its full size and remove one step
(the uniform rounding's quantum, ``IntegralModel.step``) at a time from the group whose
measured loss rises least per channel removed, until the kind's total is the uniform
tier's. A group's loss curve is its measured points plus ``(full size, 0)``, interpolated
linearly and made non-increasing in width (noise must not make a narrower group look
better); no group goes below its narrowest measured point (a first version extrapolated
below it and cut a MiniLM FFN to 8 channels of 1,536). Losses are assumed to add across
groups: the measurement narrows one group at a time.

No torch here: ``IntegralModel.sizes`` calls ``allocate`` with the curves stored in the INN
(``info["sensitivity"]``), so the build, calibration and the server sample the same counts.

Example:
    >>> curves = {"a": [[1, 0.9], [2, 0.5]], "b": [[1, 0.1], [2, 0.01]]}
    >>> allocate({"a": 4, "b": 4}, {"a": 2, "b": 2}, {"a": 1, "b": 1}, curves)
    {'a': 3, 'b': 1}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# The key of a kinds width that asks for a shaped tier: {"heads": 0.5, "ffn": 0.5, "shaped": True}.
SHAPED = "shaped"


def unshaped(width):
    """``width`` without a true ``shaped`` flag: its uniform counterpart, with the same totals
    per kind (the same object where it is not shaped).

    Example:
        >>> unshaped({"heads": 0.5, "shaped": True})
        {'heads': 0.5}
    """
    if isinstance(width, Mapping) and width.get(SHAPED) is True:
        return {k: v for k, v in width.items() if k != SHAPED}
    return width


class Curve:
    """One group's loss as a function of its channel count (see the module doc), defined
    from its narrowest measured count (``floor``) to its full size."""

    def __init__(self, size: int, points: Sequence[Sequence[float]]) -> None:
        pts = sorted({int(n): float(v) for n, v in points if 0 < int(n) < size}.items())
        self.counts = np.array([n for n, _ in pts] + [size], dtype=float)
        losses = np.array([v for _, v in pts] + [0.0])
        # Non-increasing in width: the loss at n is at least the loss at any wider count.
        self.losses = np.maximum.accumulate(losses[::-1])[::-1]
        self.floor = int(self.counts[0])

    def __call__(self, n: float) -> float:
        if n < self.floor:
            raise ValueError(f"{n} channels is below the narrowest measured, {self.floor}")
        return float(np.interp(n, self.counts, self.losses))


def allocate(
    full: Mapping[str, int],
    uniform: Mapping[str, int],
    steps: Mapping[str, int],
    curves: Mapping[str, Sequence[Sequence[float]]],
) -> dict[str, int]:
    """Counts per group keeping ``sum(uniform)`` in total, removed greedily where the loss
    rises least per channel (module doc). No group goes below its narrowest measured count
    (nothing says what narrower costs) or one step; where those floors add up to more than
    the total, the uniform counts are returned. No step takes the total below
    ``sum(uniform)``: where groups of different steps cannot meet it exactly, the counts
    end just above it. ``full``, ``uniform``, ``steps``: per group
    (one kind's groups); ``curves``: per group, measured ``[count, loss]`` points.

    Example:
        >>> allocate({"a": 8, "b": 8}, {"a": 4, "b": 4}, {"a": 2, "b": 2},
        ...          {"a": [[2, 0.6], [4, 0.2]], "b": [[2, 0.02], [4, 0.01]]})
        {'a': 6, 'b': 2}
    """
    missing = sorted(set(full) - set(curves))
    if missing:
        raise ValueError(f"no sensitivity measured for groups {missing}")
    fns = {g: Curve(full[g], curves[g]) for g in full}
    floors = {g: max(fns[g].floor, steps[g]) for g in full}
    budget = sum(uniform.values())
    if sum(min(floors[g], full[g]) for g in full) > budget:
        return dict(uniform)
    counts = dict(full)
    while sum(counts.values()) > budget:
        best, best_cost, over = None, np.inf, False
        for g in full:  # in the given order: ties go to the first group
            n, q = counts[g], steps[g]
            narrower = n - q if n % q == 0 else n - n % q  # back onto the step's multiples
            if narrower < floors[g]:
                continue
            if sum(counts.values()) - (n - narrower) < budget:
                over = True  # groups of other steps: never below the uniform total
                continue
            cost = (fns[g](narrower) - fns[g](n)) / (n - narrower)
            if cost < best_cost:
                best, best_cost = g, cost
        if best is None:
            # Every step left goes below a floor (uniform) or below the total: the steps
            # cannot meet it exactly, so these counts hold a little more.
            return counts if over else dict(uniform)
        n, q = counts[best], steps[best]
        counts[best] = n - q if n % q == 0 else n - n % q
    return counts
