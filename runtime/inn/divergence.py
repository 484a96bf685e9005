"""A training loss that became NaN or infinite: stop before the weights are saved.

One non-finite loss steps every weight to NaN (AdamW divides by the gradient's running
norm); a run that goes on saves an INN, a tier or a checkpoint that answers NaN at every
width, and reports success. Every optimisation loop here (calibration, random-width
training, distillation) checks each step's loss with ``check_loss``.

Example:
    >>> check_loss(0.25, step=0, what="calibrate w050")
    >>> check_loss(float("nan"), 7, "w050")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    Diverged: w050: the loss became nan at step 8 - the weights diverged, and none ...
"""

from __future__ import annotations

import math


class Diverged(ValueError):
    """A loss went NaN or infinite; nothing of the run was saved."""


def check_loss(value: float, step: int, what: str) -> None:
    """Raise ``Diverged`` where ``value`` (the loss of step ``step``, from 0) is not
    finite, naming ``what`` ran and how to go on."""
    if not math.isfinite(value):
        raise Diverged(
            f"{what}: the loss became {value} at step {step + 1} - the weights diverged, "
            "and none from this step on were saved. Lower the learning rate (--lr) and run "
            "again"
        )
