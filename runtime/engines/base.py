"""The engine interface every backend implements, and what a built engine records.

An engine runs one sampled tier of a model: named float/int numpy arrays in, named arrays
out, batch on axis 0. Backends (one file each) build an engine from ONNX bytes into a cache
directory and load it back from there; loading never imports torch (except the torch
backend, the reference and fallback, which needs it by nature).

Example:
    >>> from runtime.engines import get_backend
    >>> backend = get_backend("onnxruntime")
    >>> opts = BuildOptions(max_batch=8, threads=2)
    >>> files = backend.build(Path("tier/model.onnx"), Path("engines/k"), opts)  # doctest: +SKIP
    >>> engine = backend.load(Path("engines/k"), opts)  # doctest: +SKIP
    >>> out = engine.run({"input": x})  # doctest: +SKIP
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class EngineError(RuntimeError):
    """An engine cannot be built or loaded (the message says which file and why)."""


class VolumeFull(EngineError, OSError):
    """An engine cannot be written: its volume is full (``errno`` ENOSPC). An OSError as
    well, as a full disk's own write error is: the engine cache then builds it in its spare
    where it has one (ONNX Runtime's save failed as an EngineError alone, and a server with
    a spare failed the load; review helper-254). Made from its message alone; ``str`` is it.

    Example:
        >>> e = VolumeFull("the volume holding /m/engines has 0 bytes free: free space")
        >>> e.errno == errno.ENOSPC, str(e)[:18]
        (True, 'the volume holding')
    """

    def __init__(self, message: str) -> None:
        # (RuntimeError's init comes first in the order: OSError's fields set here, or
        # errno and strerror were None and str() the tuple; review helper-259)
        OSError.__init__(self, errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BackendUnavailable(EngineError):
    """The backend's library or device is not present on this machine."""


@dataclass(frozen=True)
class TensorSpec:
    """A named input or output: dtype (numpy name) and shape, -1 for the batch axis."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BuildOptions:
    """What an engine is built for; part of the cache key.

    ``precision``: "fp32" or "fp16" (fp16 only where the backend supports it).
    ``max_batch``: the batch profile's upper end (TensorRT optimisation profile).
    ``opt_batch``: the batch TensorRT tunes for. ``threads``: CPU intra-op threads (ORT).
    ``sequence``: (shortest, tuned-for, longest) length of a sequence model's dynamic
    per-sample axis, e.g. ``(1, 64, 256)`` for token ids of shape (batch, length); None for
    a model with fixed per-sample shapes. TensorRT needs it for its optimisation profile;
    ONNX Runtime and torch run any length and ignore it.

    Example:
        >>> BuildOptions(max_batch=16, opt_batch=4, sequence=(1, 64, 256)).sequence
        (1, 64, 256)
    """

    precision: str = "fp32"
    max_batch: int = 8
    opt_batch: int = 4
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    sequence: tuple[int, int, int] | None = None
    spin: bool = True  # ORT's idle intra-op threads spin (a load-time option: not in the key)
    # Batches one engine runs at once where a backend keeps state per run (model.yaml's
    # instances): TensorRT's execution contexts. A load-time option for ONNX Runtime; a
    # TensorRT plan holds one optimisation profile per context (in its key where > 1).
    instances: int = 1
    # Nice levels the threads an engine makes at load start below the loading thread: ONNX
    # Runtime's intra-op pool (threads >= 2), so that the whole engine, not only the thread
    # that calls it, yields to request handling (the server's engine_nice; Linux only). 0
    # leaves them as they are; GPU backends ignore it. A load-time option: not in the key.
    pool_nice: int = 0


class Engine(ABC):
    """A loaded, runnable engine for one tier."""

    backend: str = ""
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # True: the engine runs a few fixed shapes fastest (a torch CUDA engine replays one
    # captured graph per shape), so the server pads a sequence model's batch to its lane's
    # length - a profiled length - rather than to its longest request.
    prefers_fixed_lengths: bool = False
    # Batches one engine runs at once: None, any number (an ONNX Runtime session is
    # thread-safe); 1 where ``run`` holds a lock (torch's one module); TensorRT's, its
    # execution contexts (BuildOptions.instances). The server plans no more instances than
    # this: a second batch of the same tier would wait for the first while its plan counted
    # it running.
    concurrent_runs: int | None = None
    # True: the first run of each new input shape is slow (a torch CUDA engine captures a
    # graph for it: tens of ms with every other CUDA run held off). The server then runs
    # every batch size, at each lane's length, once at load - untimed - so that no request
    # waits behind a capture and the timing at load does not count one.
    slow_first_shapes: bool = False

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; arrays are batch-first and match ``inputs`` in name and dtype."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory / sessions (optional)."""


class Backend(ABC):
    """Builds engines from ONNX and loads them from a cache directory."""

    name: str = ""
    # How this backend makes an engine (optimisation level, saved format, passes): part of
    # the cache key. Bump it when that changes, or engines built the old way are reused -
    # the library's version and the device need not change with it.
    recipe: int = 1
    # True: an engine is built for the batch (and sequence) range in BuildOptions - TensorRT's
    # optimisation profile - so that range is part of its cache key. False: the engine runs
    # any shape (ONNX Runtime, torch), and a new max_batch or `lengths` rebuilds nothing.
    shape_profiled: bool = True

    @abstractmethod
    def available(self) -> bool:
        """Whether this machine can build and run engines of this backend."""

    def unavailable_reason(self) -> str | None:
        """Why this machine cannot run the backend (what is missing and how to get it), or
        None where it can. Backends with more than one thing to miss say which."""
        return None if self.available() else f"the {self.name} backend is not installed"

    @abstractmethod
    def version(self) -> str:
        """The backend library's version (part of the cache key)."""

    @abstractmethod
    def device(self) -> str:
        """The device engines run on, e.g. 'cpu' or 'NVIDIA H100 80GB HBM3' (cache key)."""

    def key_fields(self, options: BuildOptions) -> dict[str, Any]:
        """What else an engine built with ``options`` depends on (cache key fields; none by
        default): e.g. which fp16 converter a TensorRT fp16 build goes through."""
        return {}

    @abstractmethod
    def build(self, onnx_path: Path, out_dir: Path, options: BuildOptions) -> list[str]:
        """Build an engine from ``onnx_path`` into ``out_dir``; return the files written."""

    @abstractmethod
    def load(self, out_dir: Path, options: BuildOptions) -> Engine:
        """Load an engine built by ``build``; raise EngineError if it cannot be used."""


def interrupted(exc: ImportError) -> None:
    """Raise the KeyboardInterrupt behind ``exc``, if one is: a Ctrl-C while a compiled
    extension loads comes out of its import as an ImportError (pybind11), and the backend
    was said "not installed" - exit status 2 and a wrong fix - instead of interrupted.

    Example (a KeyboardInterrupt is caught here: doctest lets one through to its runner):
        >>> try:
        ...     try:
        ...         raise KeyboardInterrupt
        ...     except KeyboardInterrupt:
        ...         raise ImportError("initialization failed")
        ... except ImportError as exc:
        ...     try:
        ...         interrupted(exc)
        ...     except KeyboardInterrupt:
        ...         print("interrupted")
        interrupted
    """
    chain, seen = exc, set()
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
