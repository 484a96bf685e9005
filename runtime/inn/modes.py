"""Train/eval mode, set for a while and given back module by module.

``model.train(was_training)`` gives back the top module's flag and sets every submodule to
it: a wrapper in train mode (nn.Module's default) around a model in eval mode came back with
that model's BatchNorm layers in train mode, normalising by batch statistics from then on
(torchvision's LR-ASPP: outputs off by 2.2 on a 0.2 scale).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; afterwards each module has its own mode back.

    Example:
        >>> wrapper = nn.Sequential(nn.BatchNorm1d(4).eval())  # the wrapper: train mode
        >>> with evaluating(wrapper):
        ...     pass
        >>> wrapper.training, wrapper[0].training
        (True, False)
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
