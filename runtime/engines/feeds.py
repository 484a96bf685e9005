"""Input checking shared by engines: feeds against an engine's input specs. No torch.

An engine that copies raw bytes to a device (TensorRT) must never guess: a wrong dtype is
refused, not cast, and each dynamic axis is bounded by what the engine was built for.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .base import EngineError, TensorSpec


def check_feeds(
    specs: list[TensorSpec], feeds: Mapping[str, np.ndarray], max_shapes: Mapping[str, tuple]
) -> list[np.ndarray]:
    """Validate ``feeds`` against ``specs``; return C-contiguous arrays in ``specs`` order.

    ``max_shapes[name]`` bounds each dynamic (-1) axis; axis 0 is the batch. Raises
    EngineError naming the tensor on a missing/unknown name, a dtype mismatch (no silent
    casts), a wrong rank or fixed dim, or a dynamic dim outside 1..max.

    Example:
        >>> spec = TensorSpec("x", "float32", (-1, 4))
        >>> feeds = {"x": np.zeros((2, 4), np.float32)}
        >>> [a.shape for a in check_feeds([spec], feeds, {"x": (8, 4)})]
        [(2, 4)]
    """
    missing = [s.name for s in specs if s.name not in feeds]
    unknown = sorted(set(feeds) - {s.name for s in specs})
    if missing or unknown:
        raise EngineError(
            f"feeds do not match the engine's inputs {[s.name for s in specs]}: "
            f"missing {missing}, unknown {unknown}"
        )
    arrays = []
    for spec in specs:
        array = feeds[spec.name]
        if not isinstance(array, np.ndarray):
            array = np.asarray(array)
        if array.dtype != np.dtype(spec.dtype):
            raise EngineError(
                f"input {spec.name!r}: expected dtype {spec.dtype}, got {array.dtype} "
                f"(cast it explicitly, e.g. x.astype(np.{spec.dtype}))"
            )
        if array.ndim != len(spec.shape):
            raise EngineError(
                f"input {spec.name!r}: expected {len(spec.shape)} dims {spec.shape}, "
                f"got shape {array.shape}"
            )
        limit = max_shapes[spec.name]
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if want == -1:
                if axis == 0 and got > limit[0]:
                    raise EngineError(
                        f"input {spec.name!r}: batch size {got} exceeds this engine's "
                        f"max_batch {limit[0]}; split the batch or rebuild with a larger one"
                    )
                if not 1 <= got <= limit[axis]:
                    raise EngineError(
                        f"input {spec.name!r}: axis {axis} is {got}, must be 1..{limit[axis]}"
                    )
            elif got != want:
                raise EngineError(
                    f"input {spec.name!r}: expected shape {spec.shape}, got {array.shape}"
                )
        arrays.append(np.ascontiguousarray(array))
    return arrays
