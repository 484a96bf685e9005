"""innfer's INN library: convert, sample, train and export elastic-width networks.

Importing ``runtime`` does not import torch; ``runtime.engines`` (used by the server) never
does. The torch-based API is loaded on first use:

    >>> import runtime
    >>> inn = runtime.convert(model, example_inputs)  # doctest: +SKIP
    >>> small = inn.sample(0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "convert": ("runtime.inn.conversion", "convert"),
    "IntegralModel": ("runtime.inn.model", "IntegralModel"),
    "load": ("runtime.inn.model", "load"),
    "ModelFileError": ("runtime.inn.model", "ModelFileError"),
    "ConversionError": ("runtime.inn.groups", "ConversionError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
