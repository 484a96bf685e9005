"""Plain supervised training of the zoo models, used by the demo and the benchmarks.

Everything is deterministic for a given seed on a given machine and thread count: model
initialisation comes from the seeded global RNG, batch order from a private
``torch.Generator``. Thread count is left to the caller (``torch.set_num_threads``).

Example:
    >>> from runtime import training
    >>> model, ds = training.train_model("digits_mlp", seed=0)
    >>> training.evaluate(model, ds.x_test, ds.y_test) > 0.95
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from runtime import data as data_mod
from runtime import zoo
from runtime.data import Dataset

__all__ = [
    "TRAIN_DEFAULTS",
    "TrainDefaults",
    "evaluate",
    "seed_everything",
    "train_classifier",
    "train_model",
]


@dataclass(frozen=True)
class TrainDefaults:
    """Default hyper-parameters that ``train_model`` uses for one zoo model."""

    epochs: int
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"


# Chosen by measurement on the 2-core dev machine: each digits model trains in a few
# seconds, mnist_resnet well under 30-40 s.
TRAIN_DEFAULTS: dict[str, TrainDefaults] = {
    "mnist1d_cnn": TrainDefaults(epochs=30, lr=3e-3, batch_size=64),
    "digits_cnn": TrainDefaults(epochs=40, lr=2e-3, batch_size=32),
    "digits_cnn_bn": TrainDefaults(epochs=10, lr=3e-3),
    "digits_mlp": TrainDefaults(epochs=30, lr=1e-3, batch_size=32),
    "mnist_resnet": TrainDefaults(epochs=8, lr=3e-3),
}


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs.

    Example:
        >>> seed_everything(0); a = torch.rand(1)
        >>> seed_everything(0); bool((torch.rand(1) == a).all())
        True
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_classifier(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = False,
    lr_schedule: str = "constant",
) -> nn.Module:
    """Train ``model`` in place on ``data``'s train split with Adam and cross-entropy.

    Batches are reshuffled every epoch by a ``torch.Generator`` seeded with ``seed``, so
    the run does not depend on (or disturb) the global RNG. ``lr_schedule`` is
    ``"constant"`` or ``"cosine"`` (decay from ``lr`` to 0 over all steps, per step).
    Returns the same model, in eval mode.

    Example:
        >>> ds = data_mod.load("digits")
        >>> model = train_classifier(zoo.build("digits_mlp"), ds, epochs=1)
        >>> model.training
        False
    """
    x, y = data.x_train, data.y_train  # (N, C, H, W), (N,)
    n = len(x)
    n_batches = -(-n // batch_size)
    # A trailing batch of one sample makes BatchNorm fail in train mode; drop it.
    if n_batches > 1 and n % batch_size == 1:
        n_batches -= 1
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', not {lr_schedule!r}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    # Cosine decay matters for BatchNorm nets trained this briefly: at a constant rate the
    # eval-mode test accuracy of mnist_resnet swung by several points from epoch to epoch.
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * n_batches, 1))
        if lr_schedule == "cosine"
        else None
    )
    loss_fn = nn.CrossEntropyLoss()

    bar = None
    if progress:
        # Imported lazily: tqdm is only needed for interactive runs.
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * n_batches, desc=f"train {data.name}", unit="batch")

    model.train()
    running = None
    try:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)  # (N,)
            for b in range(n_batches):
                idx = perm[b * batch_size : (b + 1) * batch_size]  # (B,)
                logits = model(x[idx])  # (B, num_classes)
                loss = loss_fn(logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                if bar is not None:
                    # Exponential moving average: per-batch losses are too noisy to read.
                    value = loss.item()
                    running = value if running is None else 0.95 * running + 0.05 * value
                    bar.set_postfix(epoch=epoch + 1, loss=f"{running:.4f}", refresh=False)
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``(x, y)``, computed in eval mode.

    The model's previous train/eval mode is restored afterwards.

    Example:
        >>> ds = data_mod.load("digits")
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


def train_model(
    name: str, seed: int, epochs: int | None = None, progress: bool = False
) -> tuple[nn.Module, Dataset]:
    """Build zoo model ``name`` with seeded weights and train it on its data set.

    ``epochs`` overrides the per-model default in ``TRAIN_DEFAULTS``. Returns the model
    in eval mode and the data set it was trained on.

    Example:
        >>> model, ds = train_model("digits_cnn", seed=0)
        >>> ds.name, model.training
        ('digits', False)
    """
    if name not in TRAIN_DEFAULTS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(TRAIN_DEFAULTS)}")
    cfg = TRAIN_DEFAULTS[name]
    ds = data_mod.load(zoo.DATASET_FOR[name])
    seed_everything(seed)  # makes the weight initialisation below reproducible
    model = zoo.build(name)
    train_classifier(
        model,
        ds,
        epochs=cfg.epochs if epochs is None else epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=seed,
        weight_decay=cfg.weight_decay,
        progress=progress,
        lr_schedule=cfg.lr_schedule,
    )
    return model, ds
