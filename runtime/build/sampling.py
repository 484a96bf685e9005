"""A tier's network as the build samples it: the INN at the tier's channel counts, with
BatchNorm statistics of its own.

An INN stores BatchNorm running statistics only for the channel counts it was trained or
calibrated at; any other counts get the full width's statistics resampled, which on a
BatchNorm model can cost most of the accuracy (the demo MNIST ResNet at width 0.35 rounded
to multiples of 8: 11.4 % with resampled statistics, 96.0 % with statistics re-estimated on
512 training inputs; at 0.75 rounded to 16: 16.7 % vs 96.2 %). Where the model names an
evaluation dataset, the build re-estimates them on that dataset's first ``NORM_SAMPLES``
training inputs (never its test inputs, which score the tier); without one it warns.
The frontier re-estimates its candidates the same way (runtime/build/frontier.py).

Example:
    >>> x = norm_inputs(config)  # doctest: +SKIP
    >>> module, reestimated = sample_tier(inn, config, 0.35, x)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from runtime.hashing import sha256_file
from runtime.inn.calibrate import NORM_SAMPLES, recompute_norm_stats, unnormed
from runtime.inn.model import IntegralModel
from runtime.repository.config import ModelConfig

log = logging.getLogger("innfer.build")


# Rows per batch the statistics are averaged over (recompute_norm_stats' default).
NORM_BATCH = 64


def dataset_ref(config: ModelConfig) -> str:
    """What ``runtime.demo.data.load`` loads for model.yaml's ``evaluation.dataset``: a
    bundled set's name, or your ``.npz`` file's path - relative to the model's directory
    (where model.yaml was read from)."""
    name = config.evaluation.dataset
    if name.endswith(".npz") and not Path(name).is_absolute():
        return str(Path(config.source).parent / name)
    return name


def dataset_digest(config: ModelConfig) -> str:
    """The evaluation data set as a tier's records name it: a bundled set by name, a file
    also by its content (a file rewritten is measured again)."""
    ref = dataset_ref(config)
    if not ref.endswith(".npz"):
        return ref
    path = Path(ref)
    return f"{config.evaluation.dataset} (sha256 " + (
        f"{sha256_file(path)[:16]})" if path.is_file() else "missing)"
    )


def norm_source(config: ModelConfig) -> list | None:
    """What re-estimated statistics depend on (part of a tier's source hash), or None
    where the model names no evaluation dataset (none, or held-out text)."""
    if config.evaluation is None or config.evaluation.dataset is None:
        return None
    return [dataset_digest(config), NORM_SAMPLES]


def norm_inputs(config: ModelConfig) -> torch.Tensor | None:
    """(NORM_SAMPLES, ...) training inputs of the model's evaluation dataset, or None."""
    if norm_source(config) is None:
        return None
    return _training_inputs(dataset_ref(config), dataset_digest(config), config.inputs[0].dtype)


@functools.cache  # one load per dataset and process: every tier and candidate uses it
def _training_inputs(dataset: str, digest: str, dtype: str) -> torch.Tensor:
    """(digest: a file rewritten.) In the model's input dtype: the data sets load as
    float32, and an id model's embedding or a float16 model's first layer failed on them
    once an evaluation set was named (review helper-248)."""
    from runtime.demo.data import load as load_data

    x = load_data(dataset).x_train[:NORM_SAMPLES]
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    return x.to(getattr(torch, dtype))


@torch.no_grad()
def sample_tier(
    inn: IntegralModel,
    config: ModelConfig,
    width: float | Mapping[str, int],
    x: torch.Tensor | None,
) -> tuple[nn.Module, bool]:
    """(the tier's network, whether its BatchNorm statistics were re-estimated on ``x``):
    ``inn`` sampled at ``width`` with the model's method and rounding; statistics
    re-estimated where the INN stores none for these counts and ``x`` is given."""
    module = inn.sample(width, config.method, config.multiple_of)
    sizes = inn.sizes(width, config.multiple_of)
    if x is None or not unnormed(inn, module, sizes, config.method):
        return module, False
    if len(x) < NORM_BATCH:  # said as the user's data set, not "one batch of 64" (helper-296)
        raise ValueError(
            f"{config.source}: evaluation.dataset {config.evaluation.dataset} holds "
            f"{len(x)} training inputs; a smaller tier's BatchNorm statistics are "
            f"re-estimated on at least {NORM_BATCH} of them (up to {NORM_SAMPLES}): add "
            "training samples to it, or store each tier's statistics with `innfer calibrate`"
        )
    recompute_norm_stats(module, x, batch_size=NORM_BATCH)
    return module, True
