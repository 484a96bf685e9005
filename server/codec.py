"""Open Inference Protocol tensors <-> numpy, with the checks that turn bad input into
clear INVALID_ARGUMENT messages. Protobuf messages in, numpy out; no grpc here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from runtime.repository.config import TensorConfig
from server.errors import InvalidArgument

# OIP datatype <-> numpy dtype, and the typed-contents field that carries each.
DATATYPES = {
    "BOOL": ("bool", "bool_contents"),
    "UINT8": ("uint8", "uint_contents"),
    "INT32": ("int32", "int_contents"),
    "INT64": ("int64", "int64_contents"),
    "FP16": ("float16", None),  # only raw: no typed field holds 16-bit floats
    "FP32": ("float32", "fp32_contents"),
    "FP64": ("float64", "fp64_contents"),
}
OIP_OF = {np_name: oip for oip, (np_name, _) in DATATYPES.items()}


def oip_datatype(dtype: str) -> str:
    return OIP_OF[dtype]


def decode_inputs(
    request, specs: Sequence[TensorConfig], max_batch: int
) -> tuple[dict[str, np.ndarray], int]:
    """Validate ``request.inputs`` against the model's ``specs``; return arrays and rows.

    Checks, each with its own message: names (missing, unknown, duplicate), datatype,
    shape (rank, per-sample dims, batch in [1, max_batch], equal batch across inputs),
    raw byte length or typed element count.
    """
    by_name = {s.name: s for s in specs}
    given = [t.name for t in request.inputs]
    dup = sorted({n for n in given if given.count(n) > 1})
    if dup:
        raise InvalidArgument(f"input {dup[0]!r} is given more than once")
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        raise InvalidArgument(
            f"unknown input {unknown[0]!r}; the model's inputs are {sorted(by_name)}"
        )
    missing = sorted(set(by_name) - set(given))
    if missing:
        raise InvalidArgument(f"missing input {missing[0]!r}; expected inputs {sorted(by_name)}")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            f"give one per input, in order, or none"
        )
    arrays, rows = {}, None
    for i, t in enumerate(request.inputs):
        spec = by_name[t.name]
        want = oip_datatype(spec.dtype)
        if t.datatype != want:
            raise InvalidArgument(f"input {t.name!r}: datatype {t.datatype}, expected {want}")
        shape = [int(d) for d in t.shape]
        expected = f"[-1, {', '.join(map(str, spec.shape))}]" if spec.shape else "[-1]"
        if len(shape) != len(spec.shape) + 1 or tuple(shape[1:]) != spec.shape:
            raise InvalidArgument(f"input {t.name!r}: shape {shape} does not match {expected}")
        batch = shape[0]
        if not 1 <= batch <= max_batch:
            raise InvalidArgument(
                f"input {t.name!r}: batch {batch} is outside [1, {max_batch}] (max_batch)"
            )
        if rows is not None and batch != rows:
            raise InvalidArgument(f"inputs disagree on the batch size ({rows} vs {batch})")
        rows = batch
        count = math.prod(shape)
        np_dtype = np.dtype(spec.dtype)
        if raw:
            data = raw[i]
            if len(data) != count * np_dtype.itemsize:
                want_bytes = count * np_dtype.itemsize
                raise InvalidArgument(
                    f"input {t.name!r}: {len(data)} raw bytes, expected {want_bytes} "
                    f"({count} x {np_dtype.name})"
                )
            arr = np.frombuffer(data, dtype=np_dtype).reshape(shape)
        else:
            field = DATATYPES[t.datatype][1]
            values = getattr(t.contents, field) if field else ()
            if len(values) != count:
                raise InvalidArgument(
                    f"input {t.name!r}: {len(values)} values in contents.{field or 'raw'}, "
                    f"expected {count} for shape {shape}"
                )
            arr = np.asarray(values, dtype=np_dtype).reshape(shape)
        arrays[t.name] = arr
    return arrays, int(rows or 0)


def requested_outputs(request, specs: Sequence[TensorConfig]) -> list[TensorConfig]:
    """The outputs the client asked for (all when it named none); unknown names are errors."""
    if not request.outputs:
        return list(specs)
    by_name = {s.name: s for s in specs}
    out = []
    for o in request.outputs:
        if o.name not in by_name:
            raise InvalidArgument(
                f"unknown output {o.name!r}; the model's outputs are {sorted(by_name)}"
            )
        out.append(by_name[o.name])
    return out


def encode_outputs(response, arrays: dict[str, np.ndarray], specs: Sequence[TensorConfig]) -> None:
    """Append outputs to ``response`` as raw_output_contents (what Triton does)."""
    for s in specs:
        a = np.ascontiguousarray(arrays[s.name], dtype=s.dtype)
        t = response.outputs.add()
        t.name = s.name
        t.datatype = oip_datatype(s.dtype)
        t.shape.extend(a.shape)
        response.raw_output_contents.append(a.tobytes())
