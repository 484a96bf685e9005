"""Shared fixtures; GPU tests skip cleanly where no GPU is present."""

from __future__ import annotations

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none present here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
