"""Engines: one file per backend behind one small interface (``base``). Never imports torch.

Example:
    >>> from runtime.engines import get_backend
    >>> get_backend("onnxruntime").name
    'onnxruntime'
"""

from __future__ import annotations

from .base import Backend, BackendUnavailable, BuildOptions, Engine, EngineError, TensorSpec

BACKENDS = ("onnxruntime", "tensorrt", "torch")

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailable",
    "BuildOptions",
    "Engine",
    "EngineError",
    "TensorSpec",
    "get_backend",
]


def get_backend(name: str) -> Backend:
    """The backend called ``name``; its library is imported only when it is used."""
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend()
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend()
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend()
    if name == "fake":  # tests and docs only: not in BACKENDS, so no config offers it
        from .fake import FakeBackend

        return FakeBackend()
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
