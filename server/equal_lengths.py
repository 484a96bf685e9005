"""A sequence model without a mask: a batch runs as runs of requests of equal length.
Torch-free.

A text model's padding is covered by its attention mask (``ModelConfig.text``), as is a
model's that names its mask input (``ModelConfig.mask_input``), so their requests share a
batch padded to the longest. Any other model with a sequence (-1) axis has no mask the
server knows of: the zeros padded onto a shorter request are data to it (a mean
over time, a convolution's edge), and its answer would change with the requests it happened
to be batched with. Each request's lengths are its scheduler group (``length_key``,
``Request.group``), so the scheduler batches only requests of one length - as Triton's
dynamic batcher batches only requests of one shape - and a batch is the one engine call it
was planned as. (Before, a batch of K lengths ran as K calls planned as one: 7 of 8
requests of 8 lengths answered at ~70 ms for a 40 ms budget, every time.) A batch of
several lengths - none is formed now; kept for a caller that forms its own - runs as one
engine call per distinct length, the outputs (fixed shapes: ``ModelConfig`` refuses dynamic
outputs) back in the batch's order; the lane's latency model learns each call as what it was
(``timings``).

Example:
    >>> import numpy as np
    >>> class Mean:  # a model whose answer a zero padding would change
    ...     def run(self, feeds):
    ...         return {"y": feeds["x"].mean(axis=1)}
    >>> payloads = [{"x": np.ones((1, 2))}, {"x": np.ones((1, 3))}, {"x": np.ones((1, 2))}]
    >>> runs = equal_length_runs(payloads, {"x": (0,)})
    >>> [indices for indices, _ in runs.runs], runs.run(Mean())["y"].tolist()
    ([[0, 2], [1]], [1.0, 1.0, 1.0])
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.engines import EngineError
from server.apart import listed


@dataclass(frozen=True)
class EqualLengthRuns:
    """One batch's feeds as runs: ``runs[k]`` = (the indices of the batch's requests of one
    length, ascending; their inputs joined along the batch axis); ``parts[i]``: request
    ``i``'s own inputs (each (rows, ...)). ``timings``: (rows, seconds) of each call
    ``run`` made - what the latency model learns from, one call at a time (the whole
    batch's time as one call of all its rows taught every batch size of the tier to be
    slower: a 1-row request with a 2.5 ms budget refused on a 1 ms tier)."""

    runs: list[tuple[list[int], dict[str, np.ndarray]]]
    parts: list[dict[str, np.ndarray]]
    timings: list[tuple[int, float]] = field(default_factory=list)

    def run(
        self, engine, shapes: Mapping[str, Sequence[int]] | None = None
    ) -> dict[str, np.ndarray]:
        """The batch's outputs, one engine call per run, rows in the batch's order; only
        those model.yaml lists where ``shapes`` names them (``apart.listed``)."""
        rows = [len(next(iter(p.values()))) for p in self.parts]
        answers: list[dict[str, np.ndarray] | None] = [None] * len(self.parts)
        for indices, feeds in self.runs:
            t0 = time.perf_counter()
            out = listed(engine.run(feeds), shapes or {})
            n = sum(rows[i] for i in indices)
            self.timings.append((n, time.perf_counter() - t0))
            for k, v in out.items():
                if v.ndim == 0 or v.shape[0] != n:
                    raise EngineError(
                        f"output {k!r} has shape {list(v.shape)} for a batch of {n} rows (its "
                        "batch axis must follow the input's); rebuild the model"
                    )
            offset = 0
            for i in indices:
                answers[i] = {k: v[offset : offset + rows[i]] for k, v in out.items()}
                offset += rows[i]
        return {k: np.concatenate([a[k] for a in answers]) for k in answers[0]}


def length_key(
    payload: Mapping[str, np.ndarray], dynamic: Mapping[str, tuple[int, ...]]
) -> tuple[int, ...]:
    """A request's sequence lengths (``dynamic``: each input's sequence axes, per sample), in
    ``dynamic``'s order: requests with equal keys run as one call unpadded. The scheduler's
    ``Request.group`` of a mask-less sequence model, so that its batches have one key.

    Example:
        >>> length_key({"x": np.zeros((2, 7, 4))}, {"x": (0,)})
        (7,)
    """
    return tuple(payload[name].shape[1 + axis] for name, axes in dynamic.items() for axis in axes)


def equal_length_runs(
    payloads: Sequence[Mapping[str, np.ndarray]], dynamic: Mapping[str, tuple[int, ...]]
) -> EqualLengthRuns | None:
    """The runs of equal length of a batch of requests (``payloads``: each request's inputs;
    ``dynamic``: each input's sequence axes, per sample) - None where every request has the
    same lengths (one call, no padding)."""
    keys = [length_key(p, dynamic) for p in payloads]
    if len(set(keys)) <= 1:
        return None
    by_key: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    names = list(payloads[0])
    runs = []
    for indices in by_key.values():
        joined = {n: np.concatenate([payloads[i][n] for i in indices]) for n in names}
        runs.append((indices, joined))
    return EqualLengthRuns(runs, [dict(p) for p in payloads])
