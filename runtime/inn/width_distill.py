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

import math
import random
import time
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from runtime.inn.distill import (
    batch_order,
    check_text,
    distil_loss,
    embedding_tables,
    hidden_power,
    length_batches,
    teacher_targets,
    warmup_cosine,
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
    each distinct set of counts costs building its network's architecture (seconds on
    all-MiniLM-L6-v2), and ``TrainableINN`` caches the ones it has seen.

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
    a new IntegralModel (``inn`` is unchanged; per-tier grids and weights it stored are not
    carried over: the node values they were chosen for change) and a log: steps, seconds,
    first and last loss (summed over the widths of a step)."""
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
    opt = torch.optim.AdamW([p for p in model.nodes if p.requires_grad], lr=lr,
                            weight_decay=weight_decay)  # fmt: skip
    rng, order = random.Random(seed), batch_order(len(batches), seed)
    losses: list[float] = []
    bar = tqdm(total=max_steps or round(seconds), desc="random widths", disable=not progress,
               unit="step" if max_steps else "s", leave=False)  # fmt: skip
    start = time.perf_counter()
    while max_steps is None or len(losses) < max_steps:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        done = len(losses) / max_steps if max_steps else elapsed / seconds
        for group in opt.param_groups:
            group["lr"] = lr * warmup_cosine(done)
        i = next(order)
        b, target = batches[i], targets[i]
        randoms = [random_sizes(inn, smallest, rng, levels, multiple_of) for _ in range(k)]
        widths = [full, low, *randoms]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for sizes in widths:
            output, hidden = model((b.ids, b.mask), sizes)
            loss = distil_loss(output, hidden, b, target, power, hidden_weight)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        losses.append(total)
        bar.update(1 if max_steps else round(time.perf_counter() - start) - bar.n)
        bar.set_postfix(loss=f"{total:.4f}", refresh=False)
    bar.close()
    trained = model.to_inn()
    tail = losses[-max(1, len(losses) // 20) :] or [math.nan]
    log = {"steps": len(losses), "seconds": time.perf_counter() - start, "widths_per_step":
           2 + k, "first_loss": losses[0] if losses else math.nan,
           "last_loss": sum(tail) / len(tail), "lr": lr, "seed": seed,
           "sentences": len(ids)}  # fmt: skip
    trained.info["random_width_distillation"] = log
    return trained, log
