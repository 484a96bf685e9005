"""A training loss that became NaN or infinite: stop before the weights are saved.

One non-finite loss steps every weight to NaN (AdamW divides by the gradient's running
norm); a run that goes on saves an INN, a tier or a checkpoint that answers NaN at every
width, and reports success. Every optimisation loop here (calibration, random-width
training, distillation) checks each step's loss with ``check_loss``, and the weights with
``check_weights`` before they are kept: the last step's update has no later loss to show it
(one step at ``--lr 1e12`` saved a tier answering -inf, exit 0).

Example:
    >>> check_loss(0.25, step=0, what="calibrate w050")
    >>> check_loss(float("nan"), 7, "w050")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    Diverged: w050: the loss became nan at step 8 - the weights diverged, and none ...
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class Diverged(ValueError):
    """A loss went NaN or infinite; nothing of the run was saved."""


def check_loss(value: float, step: int, what: str) -> None:
    """Raise ``Diverged`` where ``value`` (the loss of step ``step``, from 0) is not
    finite, naming ``what`` ran and how to go on."""
    if not math.isfinite(value) and step == 0:  # before any update: not the learning rate
        raise Diverged(
            f"{what}: the loss was {value} at the first step, before any weight was updated "
            "- the data (inputs, labels, or the teacher's outputs on them) or the model's own "
            "output hold NaN or infinite values. Check them; nothing was saved"
        )
    if not math.isfinite(value):
        raise Diverged(
            f"{what}: the loss became {value} at step {step + 1} - the weights diverged, "
            "and none from this step on were saved. Lower the learning rate (--lr) and run "
            "again"
        )


def check_weights(params: Iterable, what: str) -> None:
    """Raise ``Diverged`` where any of ``params`` (tensors) holds a NaN or an infinity:
    what the last step's update did, which no later loss reads.

    Example:
        >>> import torch
        >>> check_weights([torch.ones(3)], "calibrate w050")
    """
    import torch

    with torch.no_grad():
        if all(bool(torch.isfinite(p).all()) for p in params):
            return
    raise Diverged(
        f"{what}: the last update made the weights (or the network's outputs) NaN or "
        "infinite - the weights diverged, and none were saved. Lower the learning rate "
        "(--lr) and run again"
    )
