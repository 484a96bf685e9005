"""Open Inference Protocol tensors <-> numpy, with the checks that turn bad input into
clear INVALID_ARGUMENT messages. Protobuf messages in, numpy out; no grpc here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from runtime.repository.config import TensorConfig
from server.errors import InvalidArgument
from server.limits import RequestLimits, clip

DEFAULT = RequestLimits()

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
    request, specs: Sequence[TensorConfig], max_batch: int, limits: RequestLimits = DEFAULT
) -> tuple[dict[str, np.ndarray], int]:
    """Validate ``request.inputs`` against the model's ``specs``; return arrays and rows.

    Checks, each with its own message: counts against ``limits`` first (O(1)), then names
    (missing, unknown, duplicate - one pass), datatype, shape (rank, per-sample dims, batch
    in [1, max_batch], equal batch across inputs), raw byte length or typed element count.
    Work is linear in the request's size; client strings in messages are clipped.

    Example:
        >>> from server.proto_gen import grpc_service_pb2 as pb
        >>> spec = TensorConfig("x", "float32", (2,))
        >>> req = pb.ModelInferRequest(raw_input_contents=[bytes(8)])
        >>> _ = req.inputs.add(name="x", datatype="FP32", shape=[1, 2])
        >>> arrays, rows = decode_inputs(req, [spec], max_batch=8)
        >>> arrays["x"].shape, rows
        ((1, 2), 1)
    """
    n = len(request.inputs)
    if n > limits.max_inputs:
        raise InvalidArgument(
            f"{n} inputs given; at most {limits.max_inputs} are accepted "
            f"(the model's inputs are {sorted(s.name for s in specs)})"
        )
    by_name = {s.name: s for s in specs}
    seen: set[str] = set()
    for t in request.inputs:
        if len(t.name) > limits.max_name_bytes:
            raise InvalidArgument(f"input name {clip(t.name)} is longer than allowed")
        if t.name in seen:
            raise InvalidArgument(f"input {clip(t.name)} is given more than once")
        if t.name not in by_name:
            raise InvalidArgument(
                f"unknown input {clip(t.name)}; the model's inputs are {sorted(by_name)}"
            )
        seen.add(t.name)
    missing = sorted(set(by_name) - seen)
    if missing:
        raise InvalidArgument(f"missing input {missing[0]!r}; expected inputs {sorted(by_name)}")
    raw = request.raw_input_contents
    if raw and len(raw) != n:
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {n} inputs; "
            f"give one per input, in order, or none"
        )
    arrays, rows = {}, None
    for i, t in enumerate(request.inputs):
        spec = by_name[t.name]
        batch = _check_shape(t, spec, max_batch)
        if rows is not None and batch != rows:
            raise InvalidArgument(f"inputs disagree on the batch size ({rows} vs {batch})")
        rows = batch
        arrays[t.name] = _array(t, spec, raw[i] if raw else None)
    return arrays, int(rows or 0)


def _check_shape(t, spec: TensorConfig, max_batch: int) -> int:
    """The batch size of input ``t`` after checking datatype and shape against ``spec``."""
    want = oip_datatype(spec.dtype)
    if t.datatype != want:
        raise InvalidArgument(f"input {t.name!r}: datatype {t.datatype[:32]}, expected {want}")
    expected = f"[-1, {', '.join(map(str, spec.shape))}]" if spec.shape else "[-1]"
    if len(t.shape) != len(spec.shape) + 1:  # before reading the dims: there may be millions
        raise InvalidArgument(f"input {t.name!r}: {len(t.shape)} dims given, expected {expected}")
    shape = [int(d) for d in t.shape]
    if tuple(shape[1:]) != spec.shape:
        raise InvalidArgument(f"input {t.name!r}: shape {shape} does not match {expected}")
    batch = shape[0]
    if not 1 <= batch <= max_batch:
        raise InvalidArgument(
            f"input {t.name!r}: batch {batch} is outside [1, {max_batch}] (max_batch)"
        )
    return batch


def _array(t, spec: TensorConfig, data: bytes | None) -> np.ndarray:
    """Input ``t`` as an array of ``spec``'s dtype, from its raw bytes or typed contents."""
    shape = [int(d) for d in t.shape]
    count = math.prod(shape)
    np_dtype = np.dtype(spec.dtype)
    field = DATATYPES[t.datatype][1]
    typed = len(getattr(t.contents, field)) if field else 0
    if data is not None:
        if typed:  # Triton refuses this too: which one would the client mean?
            raise InvalidArgument(
                f"input {t.name!r} has both contents.{field} and raw_input_contents; "
                "send one or the other"
            )
        want_bytes = count * np_dtype.itemsize
        if len(data) != want_bytes:
            raise InvalidArgument(
                f"input {t.name!r}: {len(data)} raw bytes, expected {want_bytes} "
                f"({count} x {np_dtype.name})"
            )
        return np.frombuffer(data, dtype=np_dtype).reshape(shape)
    if typed != count:
        raise InvalidArgument(
            f"input {t.name!r}: {typed} values in contents.{field or 'raw'}, "
            f"expected {count} for shape {shape}"
        )
    return np.asarray(getattr(t.contents, field), dtype=np_dtype).reshape(shape)


def requested_outputs(
    request, specs: Sequence[TensorConfig], limits: RequestLimits = DEFAULT
) -> list[TensorConfig]:
    """The outputs the client asked for (all when it named none). Unknown or repeated names
    are errors: a repeated name would be computed once and encoded many times.

    Example:
        >>> from server.proto_gen import grpc_service_pb2 as pb
        >>> req = pb.ModelInferRequest()
        >>> _ = req.outputs.add(name="y")
        >>> [s.name for s in requested_outputs(req, [TensorConfig("y", "float32", (2,))])]
        ['y']
    """
    if not request.outputs:
        return list(specs)
    if len(request.outputs) > min(limits.max_outputs, len(specs)):
        raise InvalidArgument(
            f"{len(request.outputs)} outputs requested; the model has {len(specs)} "
            f"({sorted(s.name for s in specs)}), each may be requested once"
        )
    by_name = {s.name: s for s in specs}
    out, seen = [], set()
    for o in request.outputs:
        if o.name not in by_name:
            raise InvalidArgument(
                f"unknown output {clip(o.name)}; the model's outputs are {sorted(by_name)}"
            )
        if o.name in seen:
            raise InvalidArgument(f"output {o.name!r} is requested more than once")
        seen.add(o.name)
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
