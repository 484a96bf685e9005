"""Importing torchvision's model definitions on a CPU-only torch.

torchvision's PyPI wheel for a given torch may be built against CUDA; with a CPU-only torch
its import fails with ``operator torchvision::nms does not exist`` before any model is
defined. The model definitions are pure Python: declaring the two operator schemas that
its import registers kernels for is enough to import them (calling ``nms`` itself would
still fail, and conversion never does).

Hugging Face transformers imports torchvision where it is installed, so call this before
importing transformers (``AutoModel.from_pretrained`` otherwise fails with "Could not import
module 'BertModel'"). It cannot be done for you by ``import runtime`` (which must not import
torch: the server imports it) nor by ``runtime.convert`` (the model is loaded before).

Example:
    >>> tv = import_torchvision()  # doctest: +SKIP
    >>> net = tv.models.resnet18(weights=None)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# The schemas torchvision's C++ extension would define (torchvision/csrc/ops/nms.cpp).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None


def import_torchvision() -> ModuleType:
    """``import torchvision``, declaring its missing operator schemas first if needed.
    Raises ImportError when torchvision is not installed."""
    global _library
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    if _library is None:
        _library = torch.library.Library("torchvision", "DEF")  # kept alive: owns the defs
        for schema in _SCHEMAS.values():
            _library.define(schema)
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import left half-initialised modules behind
    return importlib.import_module("torchvision")
