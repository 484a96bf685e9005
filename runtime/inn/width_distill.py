"""Random-width distillation of a converted transformer on unlabelled text.

The INN's premise, on text: instead of tuning one stored network per tier
(``runtime.inn.distill.calibrate_text``), train the continuous weights themselves so that
every width sampled from them is good, then sample the tiers. Each step runs one batch of
sentences at several widths - the full width, the smallest (``smallest``) and ``k`` random
widths in between, drawn per kind (heads, FFN channels) from a few levels - through
``TrainableINN`` (differentiable resampling of the node values), and every width is
distilled from the frozen source model with ``distill.distil_loss`` (pooled-embedding
cosine plus every LayerNorm's output). The gradients of all widths accumulate before one
AdamW step. The full width is trained towards the source model too, so it stays that model
as closely as the others allow.

The tiers are then the INN's plain samples on its uniform grid (no stored per-tier weights),
so widths never trained explicitly are served as well as the ones that were.

Example:
    >>> inn2, log = distil_widths(inn, ids, mask, {"heads": 0.5, "ffn": 0.25}, seconds=900)
    ... # doctest: +SKIP
    >>> small = inn2.sample({"heads": 0.5, "ffn": 0.5})  # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import torch

from runtime.inn.distill import (
    adamw,
    batch_order,
    budgeted_steps,
    check_text,
    distil_loss,
    embedding_tables,
    hidden_power,
    length_batches,
    teacher_targets,
    with_hidden_states,
)
from runtime.inn.model import IntegralModel
from runtime.inn.train import TrainableINN

# random_sizes: fractions per kind a random width is drawn from (the smallest and 1 included).
LEVELS = 5


def random_sizes(
    inn: IntegralModel,
    smallest: float | Mapping[str, float],
    rng: random.Random,
    levels: int = LEVELS,
    multiple_of: int = 8,
) -> dict[str, int]:
    """Counts per group for one random width: per kind (heads, FFN), a fraction drawn from
    ``levels`` evenly spaced ones between the smallest's (``smallest``: one fraction, or one
    per kind) and 1, every group of that kind at it. A few levels, not any count per group:
    each distinct set of counts costs building its network's architecture and resampling
    matrices (not timed apart), and ``TrainableINN`` caches the ones it has seen.

    Example:
        >>> random_sizes(inn, {"heads": 0.5, "ffn": 0.25}, random.Random(0))  # doctest: +SKIP
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    kinds = sorted({inn.kind(g) for g in inn.groups})
    low = smallest if isinstance(smallest, Mapping) else dict.fromkeys(kinds, smallest)
    width = {}
    for kind in kinds:
        lo = float(low.get(kind, 1.0))
        grid = [lo + (1.0 - lo) * i / max(levels - 1, 1) for i in range(levels)]
        width[kind] = rng.choice(grid)
    return inn.sizes(width, multiple_of)


def distil_widths(
    inn: IntegralModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    smallest: float | Mapping[str, float],
    seconds: float,
    *,
    k: int = 2,
    levels: int = LEVELS,
    multiple_of: int = 8,
    batch_size: int = 32,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    hidden_weight: float = 1.0,
    seed: int = 0,
    max_steps: int | None = None,
    progress: bool = True,
) -> tuple[IntegralModel, dict]:
    """Train ``inn``'s node values at random widths for ``seconds`` (or ``max_steps``) on
    the sentences ``ids``/``mask`` (N, T); see the module doc. ``smallest``: one fraction or
    fractions per kind, the least width trained; ``levels``: see ``random_sizes``. Returns
    a new IntegralModel (``inn`` is unchanged; per-tier grids and weights and the measured
    sensitivity it stored are not carried over: the node values they were chosen for
    change) and a log: steps, seconds, first and last loss (summed over the widths of a
    step)."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    ids, mask = check_text(ids, mask)
    # The uniform grid is what is trained: grids and weights that calibrate_text stored were
    # chosen for the node values this changes.
    inn = inn.copy()
    inn.info.pop("grids", None)
    inn.info.pop("text_calibration", None)
    # Measured on the old node values too: a shaped width is measured again by
    # `innfer calibrate --text` before the build samples it (it refuses one without).
    inn.info.pop("sensitivity", None)
    inn.tiers.clear()
    batches = length_batches(ids, mask, batch_size)
    teacher = inn.sample(1.0, calibrated=False)
    targets = teacher_targets(teacher, batches, progress)
    power = hidden_power(batches, targets)
    low, full = inn.sizes(smallest, multiple_of), inn.sizes(1.0)
    model = TrainableINN(inn, wrap=with_hidden_states).train()
    frozen = embedding_tables(teacher)  # not resampled; the text covers little of the vocabulary
    for name, p in model.named_nodes():
        p.requires_grad_(name not in frozen)
    opt = adamw([p for p in model.nodes if p.requires_grad], lr=lr, weight_decay=weight_decay)
    rng, order = random.Random(seed), batch_order(len(batches), seed)

    def step() -> float:
        i = next(order)
        b, target = batches[i], targets[i]
        randoms = [random_sizes(inn, smallest, rng, levels, multiple_of) for _ in range(k)]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for sizes in (full, low, *randoms):
            output, hidden = model((b.ids, b.mask), sizes)
            loss = distil_loss(output, hidden, b, target, power, hidden_weight)
            loss.backward()  # the widths' gradients accumulate into one step
            total += float(loss.detach())
        opt.step()
        return total

    run = budgeted_steps(step, opt, lr, seconds, max_steps, "random widths", progress)
    trained = model.to_inn()
    log = {"steps": run.steps, "seconds": run.seconds, "widths_per_step": 2 + k,
           "first_loss": run.first_loss, "last_loss": run.last_loss, "lr": lr, "seed": seed,
           "sentences": len(ids)}  # fmt: skip
    trained.info["random_width_distillation"] = log
    return trained, log
