"""Fast calibration of an INN on a small data set: minutes, not hours.

Three steps, each usable alone:
  * ``finetune``: a short sandwich run (runtime.train) on the calibration set, every width
    distilled from the *original* full model's outputs, so the full width keeps its function
    while the small widths recover;
  * ``tune_grid``: for one target width, learn each group's sampling points (kept ordered
    in (0, 1) by a softmax-of-gaps parameterisation) with everything else frozen; the grid is
    stored with the INN under "<group>@<count>" and used whenever that count is sampled;
  * ``reestimate_norms``: recompute BatchNorm statistics for exactly one set of channel
    counts from a few batches (other widths keep theirs).

Example:
    >>> report = calibrate(inn, x_calib, widths=[0.5, 0.25], seconds=60)  # doctest: +SKIP
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .continuous import interpolation_matrix
from .model import IntegralModel
from .train import TrainableINN, sandwich_step

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _check_calibration(x: torch.Tensor, batch_size: int) -> None:
    if len(x) < batch_size:
        raise ValueError(
            f"the calibration set has {len(x)} samples, fewer than one batch ({batch_size}); "
            f"give more samples or a smaller batch size"
        )


def _batches(x: torch.Tensor, batch_size: int, rng: torch.Generator):
    while True:
        perm = torch.randperm(len(x), generator=rng)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


@torch.no_grad()
def reestimate_norms(
    inn: IntegralModel, width, x: torch.Tensor, batch_size: int = 64, max_batches: int = 20
) -> str | None:
    """Recompute BatchNorm statistics for ``width``; returns the sizes key, None if the
    model has no norm layers (e.g. converted with fold_norms=True)."""
    _check_calibration(x, batch_size)
    sizes = inn.sizes(width)
    key = IntegralModel.sizes_key(sizes)
    inn.info.setdefault("norm_stats", {}).pop(key, None)  # start from the resampled stats
    module = inn.sample(sizes)
    norms = [m for m in module.modules() if isinstance(m, _NORMS)]
    if not norms:
        return None
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
        m.train()
    for i in range(0, min(len(x), batch_size * max_batches) - batch_size + 1, batch_size):
        module(x[i : i + batch_size])
    stats = {
        name: buf.tolist()
        for name, buf in module.named_buffers()
        if name.rsplit(".", 1)[-1] in ("running_mean", "running_var")
    }
    inn.info["norm_stats"][key] = stats
    return key


def _grid_points(z: torch.Tensor) -> torch.Tensor:
    gaps = z.softmax(0)  # (n + 1,) positive, sum 1
    return gaps.cumsum(0)[:-1]  # (n,) strictly increasing in (0, 1)


def _uniform_logits(n: int) -> torch.Tensor:
    gaps = torch.full((n + 1,), 1.0 / n, dtype=torch.float64)
    gaps[0] = gaps[-1] = 0.5 / n
    return gaps.log()


def tune_grid(
    inn: IntegralModel,
    width,
    x: torch.Tensor,
    teacher: torch.Tensor,
    steps: int = 100,
    lr: float = 0.05,
    batch_size: int = 64,
    seconds: float | None = None,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Learn the sampling points of every group resampled at ``width`` (KD from ``teacher``
    logits, everything else frozen) and store them with ``inn``. Returns the grids."""
    _check_calibration(x, batch_size)
    sizes = inn.sizes(width)
    targets = {
        gi: g for gi, g in enumerate(inn.all_groups)
        if not g.discrete and g.blocks == 1 and sizes.get(g.name, g.size) < g.size
    }  # fmt: skip
    if not targets:
        return {}
    logits = {gi: nn.Parameter(_uniform_logits(sizes[g.name])) for gi, g in targets.items()}
    opt = torch.optim.Adam(logits.values(), lr=lr)
    skeleton = inn.skeleton(sizes)
    skeleton.train()  # batch statistics: the grid must not fit stale running stats
    buffer_names = [n for n, _ in skeleton.named_buffers()]
    frozen = {k: v.detach() for k, v in inn.state.items()}
    others = {
        gi: inn.matrix(g, sizes[g.name], "point")
        for gi, g in enumerate(inn.all_groups)
        if gi not in targets and not g.discrete and sizes.get(g.name, g.size) != g.size
    }
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(x, batch_size, gen)
    start = time.perf_counter()
    for _ in range(steps):
        if seconds is not None and time.perf_counter() - start > seconds:
            break
        idx = next(batches)
        mats = dict(others)
        for gi, g in targets.items():
            mats[gi] = interpolation_matrix(g.size, _grid_points(logits[gi]))
        state = inn.resampled_state(frozen, mats, differentiable=True)
        for name in buffer_names:  # statistics are not learned here (and BN refuses grads)
            state[name] = state[name].detach()
        out = functional_call(skeleton, state, (x[idx],))
        loss = F.kl_div(out.log_softmax(-1), teacher[idx].softmax(-1), reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    grids = {}
    for gi, g in targets.items():
        pts = _grid_points(logits[gi].detach()).tolist()
        grids[f"{g.name}@{sizes[g.name]}"] = pts
    inn.info.setdefault("grids", {}).update(grids)
    return grids


def finetune(
    inn: IntegralModel,
    x: torch.Tensor,
    teacher: torch.Tensor,
    widths: Sequence[float],
    seconds: float,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> IntegralModel:
    """Sandwich fine-tuning on the calibration set, every width distilled from ``teacher``."""
    _check_calibration(x, batch_size)
    model = TrainableINN(inn).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(x, batch_size, gen)
    lo = min(widths)
    start = time.perf_counter()
    bar = tqdm(total=round(seconds), desc="finetune", unit="s", disable=not progress)
    while time.perf_counter() - start < seconds:
        idx = next(batches)
        ws = [1.0, *widths, rng.uniform(lo, 1.0)]
        sandwich_step(model, opt, x[idx], None, ws, teacher_logits=teacher[idx])
        bar.n = min(round(time.perf_counter() - start), round(seconds))
        bar.refresh()
    bar.close()
    return model.to_inn()


def calibrate(
    inn: IntegralModel,
    x: torch.Tensor,
    widths: Sequence[float],
    seconds: float = 60.0,
    finetune_share: float = 0.7,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> IntegralModel:
    """Fine-tune (share of the time), tune each width's grid, re-estimate its norms.

    ``x``: the calibration inputs (labels are not needed: the full model teaches).
    Returns a new IntegralModel; the input ``inn`` is left as it was.
    """
    if not widths:
        raise ValueError("widths is empty; give at least one width in (0, 1)")
    for w in widths:
        if not 0 < w <= 1:
            raise ValueError(f"width must be in (0, 1], got {w}")
    _check_calibration(x, batch_size)
    with torch.no_grad():
        teacher = torch.cat([inn.sample(1.0)(x[i : i + 256]) for i in range(0, len(x), 256)])
    start = time.perf_counter()
    tuned = finetune(inn, x, teacher, widths, seconds * finetune_share, batch_size=batch_size,
                     seed=seed, progress=progress)  # fmt: skip
    left = max(seconds - (time.perf_counter() - start), 0.0)
    for w in tqdm(widths, desc="grid+norms", disable=not progress):
        tune_grid(tuned, w, x, teacher, steps=1000, seconds=left / len(widths) * 0.9,
                  batch_size=batch_size, seed=seed)  # fmt: skip
        reestimate_norms(tuned, w, x, batch_size)
    reestimate_norms(tuned, 1.0, x, batch_size)
    return tuned
