"""A batch that failed whole, run again request by request. Torch-free.

An engine error fails a batch, but most such errors are not every request's: one request's
input the engine cannot take, or a batch too large for the memory left (a GPU's, or a CPU
arena's). Failing every request beside it for that answers good requests with an error. So
the engine runs each request of the failed batch again, alone, on the same thread and the
same slot: the ones that run alone are answered, only the ones that fail alone fail. A
batch of one is not run again (its error is its request's).

Each request's rows are its own slice of the batch's feeds (padded as in the batch: a
sequence model's mask covers the padding, so a row's output is the one it gets in any
batch).

Example:
    >>> import numpy as np
    >>> class Picky:  # fails any batch holding a negative row
    ...     def run(self, feeds):
    ...         if (feeds["x"] < 0).any():
    ...             raise ValueError("negative input")
    ...         return {"y": feeds["x"] * 2}
    >>> feeds = {"x": np.array([[1.0], [-1.0], [3.0]])}
    >>> apart = run_apart(Picky(), feeds, [1, 1, 1], ValueError("negative input"))
    >>> [e is None for e in apart.errors], apart.outputs[2]["y"].tolist()
    ([True, False, True], [[6.0]])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.engines import EngineError


@dataclass
class Apart:
    """What running a failed batch's requests one by one gave, in the batch's order: each
    request's outputs (None where it failed alone or was skipped), error (None where it
    ran or was skipped) and engine seconds alone (0 where skipped)."""

    error: BaseException  # the whole batch's
    outputs: list[dict[str, np.ndarray] | None]
    errors: list[BaseException | None]
    seconds: list[float]

    @property
    def answered(self) -> int:
        return sum(o is not None for o in self.outputs)


def listed(
    outputs: dict[str, np.ndarray], shapes: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """``outputs`` less those model.yaml does not list (``shapes``' names; all where it
    names none): an output the ONNX graph has beside them (a constant, a debug tensor) is
    never answered, and its shape must not fail the batch - a constant of 3 values failed
    every batch but those of exactly 3 rows (review 188).

    Example:
        >>> sorted(listed({"y": np.zeros((2, 4)), "ver": np.zeros(3)}, {"y": [4]}))
        ['y']
    """
    if not shapes or len(outputs) <= len(shapes):  # (the usual case: no copy)
        return outputs
    return {k: v for k, v in outputs.items() if k in shapes}


def output_problem(
    outputs: Mapping[str, np.ndarray], rows: int, shapes: Mapping[str, Sequence[int]]
) -> str | None:
    """What is wrong with an engine's ``outputs`` for ``rows`` input rows, or None: each
    must have one row per input row (a graph with its batch fixed at 1 mixed requests) and,
    for the outputs model.yaml lists (``shapes``: per-row shape, -1 where it varies), that
    shape. An engine returning another shape for some inputs was served as OK - and to the
    requests batched beside them, their rows cut from the wrong shape (review helper-153).
    Every output model.yaml lists must be there: one missing was counted served, then the
    answer's encoding failed INTERNAL (review 161).

    Example:
        >>> output_problem({"y": np.zeros((2, 5))}, 2, {"y": [4]})
        "output 'y' has shape [2, 5], model.yaml says [rows, 4]"
        >>> output_problem({}, 2, {"y": [4]})
        "no output 'y' from the engine, which model.yaml lists; rebuild the model"
    """
    if missing := [k for k in shapes if k not in outputs]:
        return (f"no output {missing[0]!r} from the engine, which model.yaml lists; rebuild "
                "the model")  # fmt: skip
    for k, v in outputs.items():
        if v.ndim == 0 or v.shape[0] != rows:
            return (f"output {k!r} has shape {list(v.shape)} for a batch of {rows} rows (its "
                    "batch axis must follow the input's); rebuild the model")  # fmt: skip
        want = shapes.get(k)
        if want is not None and (
            v.ndim != 1 + len(want)
            or any(w != -1 and w != n for w, n in zip(want, v.shape[1:], strict=False))
        ):
            said = ", ".join(map(str, ["rows", *want]))
            return f"output {k!r} has shape {list(v.shape)}, model.yaml says [{said}]"
    return None


def nonfinite(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[int]:
    """The indices of the requests (``rows``: each one's row count, in the batch's order)
    whose rows of ``outputs`` hold a NaN or an infinity. They are served as the engine gave
    them - the model's answer - but counted: a tier that overflows (fp16, a calibration gone
    wrong) otherwise answered OK with nothing any operator could see. ~1.5 us per output
    when every value is finite.

    Example:
        >>> nonfinite({"y": np.array([[1.0], [np.nan], [2.0]])}, [2, 1])
        [0]
    """
    floats = [v for v in outputs.values() if v.dtype.kind in "fc"]
    if all(np.isfinite(v).all() for v in floats):
        return []
    bad, offset = [], 0
    for i, n in enumerate(rows):
        if not all(np.isfinite(v[offset : offset + n]).all() for v in floats):
            bad.append(i)
        offset += n
    return bad


def run_apart(
    engine,
    feeds: dict[str, np.ndarray] | Sequence[dict[str, np.ndarray]],
    rows: Sequence[int],
    error: BaseException,
    wanted: Callable[[int], bool] = lambda i: True,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Apart:
    """Run each request's slice of ``feeds`` (``rows[i]`` rows each, in order) alone on
    ``engine`` (or, ``feeds`` a list, each request's own feeds: a batch that ran as runs of
    equal length, ``server.equal_lengths``); ``error`` is what the whole batch raised.
    ``wanted(i)``: whether request
    ``i`` still waits for an answer (a cancelled one is skipped). An output without one row
    per input row, or not of model.yaml's shape (``shapes``, ``output_problem``), fails its
    request (EngineError), as a batch's would."""
    outputs: list[dict[str, np.ndarray] | None] = []
    errors: list[BaseException | None] = []
    seconds: list[float] = []
    offset = 0
    for i, n in enumerate(rows):
        part = (
            feeds[i]
            if isinstance(feeds, Sequence)
            else {k: v[offset : offset + n] for k, v in feeds.items()}
        )
        offset += n
        out, exc, t0 = None, None, time.perf_counter()
        if wanted(i):
            try:
                out = listed(engine.run(part), shapes or {})
                if (problem := output_problem(out, n, shapes or {})) is not None:
                    raise EngineError(f"{problem} (run alone)")
            except Exception as e:  # this request's own error, whatever the engine raised
                out, exc = None, e
        outputs.append(out)
        errors.append(exc)
        seconds.append(time.perf_counter() - t0)
    return Apart(error, outputs, errors, seconds)
