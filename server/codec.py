"""Open Inference Protocol tensors <-> numpy, with the checks that turn bad input into
clear INVALID_ARGUMENT messages. Protobuf messages in, numpy out; no grpc here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.repository.config import DYNAMIC, TensorConfig
from server.errors import InvalidArgument
from server.limits import RequestLimits, clip
from server.shared_memory import PARAMETERS as SHARED_PARAMETERS
from server.shared_memory import Lease, SharedMemory, Slice, requested_slice

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
    request,
    specs: Sequence[TensorConfig],
    max_batch: int,
    limits: RequestLimits = DEFAULT,
    max_length: int = 0,
    raw: Sequence | None = None,
    length_is: str = "the longest profiled length",
    shared: SharedMemory | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Validate ``request.inputs`` against the model's ``specs``; return arrays and rows.
    ``length_is``: what ``max_length`` is, as a refusal says it. ``raw``: the request's
    raw_input_contents when they are not in ``request`` itself
    (views of the received bytes, server/wire.py); the arrays are built on them uncopied.
    ``shared``: the server's shared-memory regions, where an input may name one (its
    parameters ``shared_memory_*``; None refuses them); raw_input_contents then hold the
    other inputs only, in order, as Triton reads them.

    Checks, each with its own message: counts against ``limits`` first (O(1)), then names
    (missing, unknown, duplicate - one pass), datatype, shape (rank, per-sample dims, batch
    in [1, max_batch], equal batch across inputs; a dynamic (-1) dim in [1, max_length] and
    equal across inputs), raw byte length or typed element count.
    Work is linear in the request's size; client strings in messages are clipped.

    Example:
        >>> from server.proto_gen import grpc_service_pb2 as pb
        >>> spec = TensorConfig(name="x", dtype="float32", shape=(2,))
        >>> req = pb.ModelInferRequest(raw_input_contents=[bytes(8)])
        >>> _ = req.inputs.add(name="x", datatype="FP32", shape=[1, 2])
        >>> arrays, rows = decode_inputs(req, [spec], max_batch=8)
        >>> arrays["x"].shape, rows
        ((1, 2), 1)
    """
    n = len(request.inputs)
    by_name = {s.name: s for s in specs}  # in the model's order, as the messages list them
    if n > limits.max_inputs:
        raise InvalidArgument(
            f"{n} inputs given; at most {limits.max_inputs} are accepted (limits.max_inputs) "
            f"(the model's inputs are {list(by_name)})"
        )
    seen: set[str] = set()
    slices: dict[str, Slice] = {}
    for t in request.inputs:
        if len(t.name) > limits.max_name_bytes:
            raise InvalidArgument(
                f"input name {clip(t.name)} is longer than this server's limits.max_name_bytes "
                f"({limits.max_name_bytes} bytes)"
            )
        if t.name in seen:
            raise InvalidArgument(f"input {clip(t.name)} is given more than once")
        if t.name not in by_name:
            raise InvalidArgument(
                f"unknown input {clip(t.name)}; the model's inputs are {list(by_name)}"
            )
        seen.add(t.name)
        if t.parameters and (at := _input_slice(t, shared)) is not None:
            slices[t.name] = at
    missing = [name for name in by_name if name not in seen]
    if missing:
        raise InvalidArgument(f"missing input {missing[0]!r}; expected inputs {list(by_name)}")
    raw = request.raw_input_contents if raw is None else raw
    if raw and len(raw) != n - len(slices):
        inside = f" ({len(slices)} more in shared memory)" if slices else ""
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {n - len(slices)} inputs{inside}; "
            f"give one per input, in order, or none"
        )
    arrays, rows, length = {}, None, None
    next_raw = 0
    for t in request.inputs:
        spec = by_name[t.name]
        batch, seq = check_shape(t, spec, max_batch, max_length, length_is)
        if rows is not None and batch != rows:
            raise InvalidArgument(f"inputs disagree on the batch size ({rows} vs {batch})")
        if seq is not None and length is not None and seq != length:
            raise InvalidArgument(f"inputs disagree on the sequence length ({length} vs {seq})")
        rows, length = batch, seq if seq is not None else length
        if t.name in slices:  # sized before it is copied out
            at, where = slices[t.name], f"bytes in shared memory region {slices[t.name].region!r}"
            count = math.prod(int(d) for d in t.shape)
            _check_size(t.name, count, np.dtype(spec.dtype), at.byte_size, where)
            data = shared.read(at, f"input {t.name!r}")
        else:
            data, where = (raw[next_raw] if raw else None), "raw bytes"
            next_raw += 1
        arrays[t.name] = _array(t, spec, data, where)
    return arrays, int(rows or 0)


def _input_slice(t, shared: SharedMemory | None) -> Slice | None:
    """The shared-memory slice input ``t`` names (tritonclient's ``set_shared_memory``), or
    None. Refused where ``shared`` is None (read as missing values - "0 values in contents"
    - or, beside raw bytes, silently ignored) and beside values in the request itself."""
    at = requested_slice(t.parameters, f"input {t.name!r}")
    if at is None:
        return None
    if shared is None:
        raise InvalidArgument(
            f"input {t.name!r}: shared memory is not supported here: send the tensor in "
            "the request, in raw_input_contents"
        )
    given = [f.name for f, _ in t.contents.ListFields()]
    if given:  # as Triton: which would the client mean?
        raise InvalidArgument(
            f"input {t.name!r} names shared memory region {clip(at.region)} and has values "
            f"in contents.{given[0]}; send one or the other"
        )
    return at


def _expected(spec: TensorConfig) -> str:
    """The shape ``spec`` accepts, as an error message writes it (built only on errors)."""
    return f"[-1, {', '.join(map(str, spec.shape))}]" if spec.shape else "[-1]"


def check_shape(
    t,
    spec: TensorConfig,
    max_batch: int,
    max_length: int,
    length_is: str = "the longest profiled length",
) -> tuple[int, int | None]:
    """The batch size and sequence length (None: no dynamic axis) of input ``t`` after
    checking datatype and shape against ``spec``."""
    want = oip_datatype(spec.dtype)
    if t.datatype != want:
        raise InvalidArgument(f"input {t.name!r}: datatype {clip(t.datatype)}, expected {want}")
    if len(t.shape) != len(spec.shape) + 1:  # before reading the dims: there may be millions
        raise InvalidArgument(
            f"input {t.name!r}: {len(t.shape)} dims given, expected {_expected(spec)}"
        )
    shape = [int(d) for d in t.shape]
    fixed = [(d, s) for d, s in zip(shape[1:], spec.shape, strict=True) if s != DYNAMIC]
    if any(d != s for d, s in fixed):
        raise InvalidArgument(f"input {t.name!r}: shape {shape} does not match {_expected(spec)}")
    seq = None
    for axis in spec.dynamic:
        seq = shape[1 + axis]
        if seq < 1:  # "outside [1, N] ...; send shorter sequences" was the wrong advice
            raise InvalidArgument(
                f"input {t.name!r}: sequence length {seq} (shape {shape}); send at least 1 "
                "position per row"
            )
        if seq > max_length:
            raise InvalidArgument(
                f"input {t.name!r}: sequence length {seq} is outside [1, {max_length}] "
                f"({length_is}); send shorter sequences"
            )
    batch = shape[0]
    if not 1 <= batch <= max_batch:
        raise InvalidArgument(
            f"input {t.name!r}: batch {batch} is outside [1, {max_batch}] (max_batch)"
        )
    return batch, seq


def decode_text(
    request,
    name: str,
    max_batch: int,
    max_bytes: int,
    limits: RequestLimits = DEFAULT,
    raw: Sequence | None = None,
    shared: SharedMemory | None = None,
) -> list[str]:
    """The strings of BYTES input ``name`` (shape [rows] or [rows, 1]): the only input of
    a text request. Each must be UTF-8 and at most ``max_bytes`` long (the tokenizer
    truncates at the model's max_length tokens; the byte limit bounds its work). ``raw``,
    ``shared``: as for ``decode_inputs`` (in shared memory, the strings lie as in raw
    bytes: each a 4-byte length and its bytes).

    Example:
        >>> from server.proto_gen import grpc_service_pb2 as pb
        >>> req = pb.ModelInferRequest()
        >>> t = req.inputs.add(name="text", datatype="BYTES", shape=[2, 1])
        >>> t.contents.bytes_contents.extend([b"hello", "h\u00e9".encode()])
        >>> decode_text(req, "text", max_batch=8, max_bytes=100)
        ['hello', 'hé']
    """
    if len(request.inputs) != 1 or request.inputs[0].name != name:
        given = ", ".join(sorted(clip(t.name) for t in request.inputs[: limits.max_inputs]))
        raise InvalidArgument(f"a text request has one input, {name!r}; got {given or 'none'}")
    t = request.inputs[0]
    at = _input_slice(t, shared) if t.parameters else None
    if t.datatype != "BYTES":
        raise InvalidArgument(f"input {name!r}: datatype {clip(t.datatype)}, expected BYTES")
    if not 1 <= len(t.shape) <= 2 or (len(t.shape) == 2 and t.shape[1] != 1):
        raise InvalidArgument(
            f"input {name!r}: shape {list(t.shape)[:4]}, expected [-1, 1] (one string per row)"
        )
    rows = int(t.shape[0])
    if not 1 <= rows <= max_batch:
        raise InvalidArgument(
            f"input {name!r}: batch {rows} is outside [1, {max_batch}] (max_batch)"
        )
    raw = request.raw_input_contents if raw is None else raw
    if raw and at is not None:
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for 0 inputs (1 in shared memory); "
            "give one per input, in order, or none"
        )
    if at is not None:
        if at.byte_size > rows * (4 + max_bytes):  # sized before it is copied out
            raise InvalidArgument(
                f"input {name!r}: shared_memory_byte_size {at.byte_size} is more than {rows} "
                f"strings of at most {max_bytes} bytes take (each a 4-byte length and its "
                "bytes)"
            )
        raw = [shared.read(at, f"input {name!r}")]
    if raw and len(raw) != 1:
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for 1 input; give one per input, "
            "in order, or none"
        )
    typed = t.contents.bytes_contents
    # Every contents field that holds values: numbers beside the strings were ignored, and
    # numbers alone read as "0 strings".
    given = [f.name for f, _ in t.contents.ListFields()]
    if raw and given:
        raise InvalidArgument(
            f"input {name!r} has both contents.{given[0]} and raw_input_contents; "
            "send one or the other"
        )
    elsewhere = [g for g in given if g != "bytes_contents"]
    if elsewhere and typed:
        raise InvalidArgument(
            f"input {name!r} has values in contents.{elsewhere[0]} beside its strings in "
            "contents.bytes_contents; send the strings only"
        )
    items = _length_prefixed(raw[0], name, rows) if raw else list(typed[: rows + 1])
    if len(items) != rows:
        given = (
            len(typed) if not raw else f"{len(items)} or more" if len(items) > rows else len(items)
        )
        hint = f" (values came in contents.{elsewhere[0]}: send BYTES strings in " \
            "contents.bytes_contents)" if elsewhere else ""  # fmt: skip
        strings = "string" if given == 1 else "strings"
        raise InvalidArgument(
            f"input {name!r}: {given} {strings} for {rows} row{'' if rows == 1 else 's'}{hint}"
        )
    texts = []
    for i, b in enumerate(items):
        if len(b) > max_bytes:
            raise InvalidArgument(
                f"input {name!r}[{i}]: {len(b)} bytes, more than {max_bytes} per text; "
                "split the text (the model reads at most its max_length tokens anyway)"
            )
        try:
            texts.append(str(b, "utf-8"))  # bytes, or a view of the received bytes
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"input {name!r}[{i}] is not UTF-8: {exc.reason}") from None
    return texts


def _length_prefixed(data: bytes, name: str, rows: int) -> list[bytes]:
    """OIP's raw BYTES layout: each element a 4-byte little-endian length, then its bytes.
    Stops after ``rows + 1`` elements: more is an error either way."""
    out, i = [], 0
    while i < len(data) and len(out) <= rows:
        if i + 4 > len(data):
            raise InvalidArgument(f"input {name!r}: raw BYTES end inside a length prefix")
        n = int.from_bytes(data[i : i + 4], "little")
        if i + 4 + n > len(data):
            raise InvalidArgument(f"input {name!r}: raw BYTES element {len(out)} runs past the end")
        out.append(data[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def _array(t, spec: TensorConfig, data: bytes | None, where: str = "raw bytes") -> np.ndarray:
    """Input ``t`` as an array of ``spec``'s dtype, from its raw bytes (``data``: in the
    request, or copied from shared memory - ``where`` says which) or typed contents."""
    shape = [int(d) for d in t.shape]
    count = math.prod(shape)
    np_dtype = np.dtype(spec.dtype)
    field = DATATYPES[t.datatype][1]
    typed = len(getattr(t.contents, field)) if field else 0
    # Every contents field that holds values, the datatype's own or not (an FP32 input's
    # values sent in int_contents were dropped beside raw bytes, or read as "0 values").
    given = [f.name for f, _ in t.contents.ListFields()]
    if data is not None:
        if given:  # Triton refuses this too: which one would the client mean?
            raise InvalidArgument(
                f"input {t.name!r} has both contents.{given[0]} and raw_input_contents; "
                "send one or the other"
            )
        _check_size(t.name, count, np_dtype, len(data), where)
        if np_dtype == np.bool_:
            _check_bools(t.name, data)
        return np.frombuffer(data, dtype=np_dtype).reshape(shape)
    if field is None:  # OIP has no typed field for it: "0 values in contents.raw" said nothing
        raise InvalidArgument(
            f"input {t.name!r}: {t.datatype} has no typed contents field; send its values "
            "in raw_input_contents (little-endian, one entry per input)"
        )
    elsewhere = [g for g in given if g != field]
    if typed == count and elsewhere:  # which would the client mean? (and parsed for nothing)
        raise InvalidArgument(
            f"input {t.name!r} has values in contents.{elsewhere[0]} beside its "
            f"{t.datatype} values in contents.{field}; send them in contents.{field} only"
        )
    if typed != count:
        hint = f" (values came in contents.{elsewhere[0]}: send {t.datatype} values in " \
            f"contents.{field})" if elsewhere else ""  # fmt: skip
        raise InvalidArgument(
            f"input {t.name!r}: {typed} values in contents.{field}, "
            f"expected {count} for shape {shape}{hint}"
        )
    values = getattr(t.contents, field)
    if np_dtype.kind in "iu" and np_dtype.itemsize < 4:  # carried in 32-bit fields
        wide = np.asarray(values, dtype=np.int64)
        _check_range(t.name, t.datatype, wide, np.iinfo(np_dtype))
        return wide.astype(np_dtype).reshape(shape)
    return np.asarray(values, dtype=np_dtype).reshape(shape)


def _check_size(name: str, count: int, dtype: np.dtype, size: int, where: str) -> None:
    """``size`` bytes must be exactly input ``name``'s ``count`` values of ``dtype``."""
    if size != count * dtype.itemsize:
        raise InvalidArgument(
            f"input {name!r}: {size} {where}, expected {count * dtype.itemsize} "
            f"({count} x {dtype.name})"
        )


def _check_bools(name: str, data) -> None:
    """Raw BOOL bytes must each be 0 or 1: another byte is no bool numpy or an engine
    defines (ONNX Runtime read b"\\x02" as 2 in the arithmetic after it)."""
    view = np.frombuffer(data, dtype=np.uint8)
    bad = view > 1
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgument(
            f"input {name!r}: raw BOOL byte {int(view[i])} (element {i}); each must be 0 "
            "(false) or 1 (true)"
        )


def _check_range(name: str, datatype: str, values: np.ndarray, info: np.iinfo) -> None:
    """Typed contents of a narrow integer type arrive in 32-bit fields: each must fit."""
    bad = (values < info.min) | (values > info.max)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgument(
            f"input {name!r}: value {int(values[i])} (element {i}) is out of range for "
            f"{datatype} [{info.min}, {info.max}]"
        )


def check_ids(arrays: dict[str, np.ndarray], rows: dict[str, int | list]) -> None:
    """Each integer input that indexes an embedding table (``rows``: input -> the table's
    rows, or a list of them per column of its last dim, None for a column no table reads
    directly; from the build's record) must hold ids in [0, rows): one past the table fails
    in the engine - and with it every request batched beside it (INTERNAL) - and a negative
    one reads a row from the end, which the torch model refused.

    Example:
        >>> check_ids({"item": np.array([[3, 7]])}, {"item": 10})
        >>> check_ids({"item": np.array([[3, 12]])}, {"item": 10})
        Traceback (most recent call last):
        ...
        server.errors.InvalidArgument: input 'item': id 12 at [0, 1] is outside ...
        >>> check_ids({"f": np.array([[3, 12]])}, {"f": [20, 10]})
        Traceback (most recent call last):
        ...
        server.errors.InvalidArgument: input 'f': id 12 at [0, 1] (column 1) is outside ...
    """
    for name, n in rows.items():
        ids = arrays.get(name)
        if ids is None:
            continue
        if isinstance(n, int):
            at = _outside(ids, n)
        elif ids.ndim and ids.shape[-1] == len(n):  # (decode checked the shape: always)
            at = _outside_columns(ids, n)
        else:
            at = None
        if at is not None:
            bound = n if isinstance(n, int) else n[at[-1]]
            col = "" if isinstance(n, int) else f" (column {at[-1]})"
            raise InvalidArgument(
                f"input {name!r}: id {int(ids[at])} at {list(at)}{col} is outside [0, "
                f"{bound}) (the rows of the embedding table it indexes); send ids in "
                f"[0, {bound}){' in that column' if col else ''}"
            )


def _outside(ids: np.ndarray, n: int) -> tuple[int, ...] | None:
    """The index of the first id outside [0, n), or None."""
    bad = (ids < 0) | (ids >= n)
    return tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else None


def _outside_columns(ids: np.ndarray, rows: list) -> tuple[int, ...] | None:
    """As ``_outside`` with a bound per column of the last dim; None columns unchecked."""
    checked = np.array([r is not None for r in rows])
    top = np.array([r if r is not None else 0 for r in rows], dtype=np.int64)
    bad = ((ids < 0) | (ids >= top)) & checked
    return tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else None


def check_token_inputs(
    ids: np.ndarray, mask: np.ndarray, vocab_size: int, ids_name: str, mask_name: str
) -> None:
    """Token ids a client sent itself must be ids of the model's tokenizer, and each mask
    row 1 for its tokens, then 0 for its padding (at least one token): an id past the
    embedding table fails inside the engine (and with it every request batched beside it),
    a negative one silently reads another row, and a left-padded or empty row is embedded
    wrongly without a word. (Padding is zeroed first: ``zero_padding``.)

    Example:
        >>> check_token_inputs(np.array([[101, 7592, 102]]), np.ones((1, 3)), 30522, "i", "m")
        >>> check_token_inputs(np.array([[101, 40000]]), np.ones((1, 2)), 30522, "i", "m")
        Traceback (most recent call last):
        ...
        server.errors.InvalidArgument: input 'i': token id 40000 at [0, 1] is outside ...
    """
    check_mask(mask, mask_name)
    if (at := _outside(ids, vocab_size)) is not None:
        raise InvalidArgument(
            f"input {ids_name!r}: token id {int(ids[at])} at {list(at)} is outside "
            f"[0, {vocab_size}) (the model tokenizer's ids)"
        )


def zero_padding(arrays: dict[str, np.ndarray], specs, mask_name: str) -> dict:
    """``arrays`` with every integer (rows, tokens) input 0 where the mask ``mask_name`` is
    0: an id there is padding the model masks out, so any value (a sentinel pad id such as
    -100) runs as 0 - it was refused, or failed in the engine, only where a shorter row's
    padding fell inside the longest row's columns, rows of one length being served (review
    helper-238, helper-242). A copy of an input only where it changes.

    Example:
        >>> from types import SimpleNamespace as Spec
        >>> out = zero_padding({"ids": np.array([[5, -100]]), "m": np.array([[1, 0]])},
        ...                    [Spec(name="ids", dtype="int64")], "m")
        >>> out["ids"]
        array([[5, 0]])
    """
    padding = arrays[mask_name] == 0  # (rows, tokens)
    out = dict(arrays)
    for t in specs:
        a = arrays.get(t.name)
        if t.name == mask_name or a is None or a.shape != padding.shape:
            continue
        if np.dtype(t.dtype).kind in "iu" and np.any(a[padding] != 0):
            out[t.name] = np.where(padding, 0, a)
    return out


def check_mask(mask: np.ndarray, mask_name: str) -> None:
    """An attention mask a client sent: 0 / 1 only, each row 1 for its tokens then 0 for its
    padding, with at least one token (InvalidArgument naming the first row that is not).

    Example:
        >>> check_mask(np.array([[1, 1, 0]]), "m")
        >>> check_mask(np.array([[0, 1, 1]]), "m")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        server.errors.InvalidArgument: input 'm': row 0 is left-padded, has gaps or ...
    """
    if mask.dtype == np.bool_:
        mask = mask.view(np.int8)
    odd = (mask != 0) & (mask != 1)
    if odd.any():
        at = tuple(int(i) for i in np.argwhere(odd)[0])
        raise InvalidArgument(
            f"input {mask_name!r}: value {mask[at]} at {list(at)}; an attention mask holds 0 "
            "(padding) or 1 (a token)"
        )
    # Each row ones then zeros: a left-padded row was embedded wrongly (the positions of its
    # tokens shift; cosine 0.79 to the right-padded row's), an all-zero row as a zero vector.
    bad = mask[:, 0] != 1
    if mask.shape[1] > 1:
        bad |= (np.diff(mask, axis=1) > 0).any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InvalidArgument(
            f"input {mask_name!r}: row {row} is left-padded, has gaps or has no token; send "
            "right-padded rows 1 ... 1 0 ... 0 (each row's tokens first, then its padding)"
        )


@dataclass(frozen=True)
class Requested:
    """An output a request asked for; ``classes`` > 0: Triton's classification extension
    (``InferRequestedOutput(name, class_count=k)``), the top ``classes`` of each row as
    BYTES ``"value:index"`` strings, best first, instead of the tensor; ``shared``: the
    shared-memory slice the tensor is written to instead of the answer."""

    spec: TensorConfig
    classes: int = 0
    shared: Slice | None = None

    @property
    def name(self) -> str:
        return self.spec.name


# Output parameters understood: ``classification`` (above), ``binary_data`` (tritonclient's
# HTTP flag; over gRPC outputs are always raw) and the shared-memory extension's. Any other
# is refused rather than silently ignored.
_OUTPUT_PARAMETERS = ("classification", "binary_data", *SHARED_PARAMETERS)


def requested_outputs(
    request, specs: Sequence[TensorConfig], limits: RequestLimits = DEFAULT
) -> list[Requested]:
    """The outputs the client asked for (all when it named none). Unknown or repeated names
    are errors: a repeated name would be computed once and encoded many times.

    Example:
        >>> from server.proto_gen import grpc_service_pb2 as pb
        >>> req = pb.ModelInferRequest()
        >>> _ = req.outputs.add(name="y")
        >>> y = TensorConfig(name="y", dtype="float32", shape=(2,))
        >>> [s.name for s in requested_outputs(req, [y])]
        ['y']
    """
    if not request.outputs:
        return [Requested(s) for s in specs]
    by_name = {s.name: s for s in specs}
    if len(request.outputs) > min(limits.max_outputs, len(specs)):
        # Within max_outputs the names are few enough to read: say which is unknown (the
        # count alone hid it), else that the count is past any the model has.
        unknown = [o.name for o in request.outputs[: limits.max_outputs] if o.name not in by_name]
        which = f"; unknown: {', '.join(clip(n) for n in unknown[:4])}" if unknown else ""
        raise InvalidArgument(
            f"{len(request.outputs)} outputs requested; the model has {len(specs)} "
            f"({sorted(s.name for s in specs)}), each may be requested once{which}"
        )
    out, seen = [], set()
    for o in request.outputs:
        if o.name not in by_name:
            raise InvalidArgument(
                f"unknown output {clip(o.name)}; the model's outputs are {sorted(by_name)}"
            )
        if o.name in seen:
            raise InvalidArgument(f"output {o.name!r} is requested more than once")
        seen.add(o.name)
        spec = by_name[o.name]
        classes = _classes(o, spec)
        shared = requested_slice(o.parameters, f"output {o.name!r}") if o.parameters else None
        if shared is not None and classes:  # its size is not known before it is made
            raise InvalidArgument(
                f"output {o.name!r} asks for both shared_memory_region and classification; "
                "ask for the classes in the answer, or for the tensor in shared memory"
            )
        out.append(Requested(spec, classes, shared))
    return out


def _classes(o, spec: TensorConfig) -> int:
    """The classification count ``o`` asks for (0: the tensor), checked against ``spec``."""
    for key in o.parameters:
        if key not in _OUTPUT_PARAMETERS:
            raise InvalidArgument(
                f"output {o.name!r}: parameter {clip(key)} is not supported (innfer takes "
                f"{', '.join(_OUTPUT_PARAMETERS)})"
            )
    if "classification" not in o.parameters:
        return 0
    p = o.parameters["classification"]
    k = p.int64_param if p.WhichOneof("parameter_choice") == "int64_param" else None
    if k is None or k < 1:
        raise InvalidArgument(
            f"output {o.name!r}: classification must be a positive int64 (the class count)"
        )
    if len(spec.shape) != 1:
        raise InvalidArgument(
            f"output {o.name!r} has shape {list(spec.shape)} per row; classification needs "
            "one axis of class scores"
        )
    if not np.issubdtype(np.dtype(spec.dtype), np.number):  # BOOL: Triton's refusal too
        raise InvalidArgument(  # (it read "has shape [4] per row", a shape that is fine)
            f"output {o.name!r} is {oip_datatype(spec.dtype)}; classification needs numeric "
            "class scores"
        )
    return min(k, spec.shape[0])  # as Triton: at most every class


def row_bytes(w: Requested) -> int:
    """Upper bound of the bytes one row of ``w`` takes in an answer (a classification
    string: its length prefix, a "%f" value up to 48 characters, ":" and an index; none
    for a tensor written to shared memory)."""
    return 0 if w.shared is not None else _answer_row_bytes(w.spec, w.classes)


# Per request on the hot path: 6.6 us uncached. Keyed without the shared-memory slice:
# requests naming ever other offsets would push every other model's entries out.
@functools.lru_cache(maxsize=1024)
def _answer_row_bytes(spec: TensorConfig, classes: int) -> int:
    if classes:
        return classes * (4 + 48 + 1 + 20)
    return tensor_row_bytes(spec)


def tensor_row_bytes(spec: TensorConfig) -> int:
    """The bytes one row of output ``spec`` takes as a tensor (its dims are fixed)."""
    return math.prod(spec.shape) * np.dtype(spec.dtype).itemsize


def encode_outputs(
    response,
    arrays: dict[str, np.ndarray],
    wanted: Sequence[Requested],
    leases: dict[str, Lease] | None = None,
) -> None:
    """Append outputs to ``response`` as raw_output_contents (what Triton does); an output
    with a lease in ``leases`` (by name) is written to its shared-memory slice instead, and
    its raw entry left empty - one entry per output, as Triton, so a client's index of the
    later outputs holds."""
    for w in wanted:
        a = np.ascontiguousarray(arrays[w.name], dtype=w.spec.dtype)
        t = response.outputs.add()
        t.name = w.name
        if w.shared is not None:
            lease = leases[w.name]
            lease.region.write(lease.slice, memoryview(a.reshape(-1)).cast("B"))
            t.datatype = oip_datatype(w.spec.dtype)
            t.shape.extend(a.shape)
            response.raw_output_contents.append(b"")
            continue
        if w.classes:
            a = top_classes(a, w.classes)
            t.datatype = "BYTES"
            t.shape.extend(a.shape)
            response.raw_output_contents.append(bytes_tensor(a))
            continue
        t.datatype = oip_datatype(w.spec.dtype)
        t.shape.extend(a.shape)
        response.raw_output_contents.append(a.tobytes())


def top_classes(scores: np.ndarray, k: int) -> np.ndarray:
    """(rows, classes) scores -> (rows, k) strings ``"value:index"``, highest first (Triton's
    classification format; ties keep the lower index first).

    Example:
        >>> top_classes(np.array([[0.1, 0.7, 0.2]], np.float32), 2).tolist()
        [['0.700000:1', '0.200000:2']]
    """
    # Negated as float64: an unsigned score wraps around under "-", and INT32_MIN has no
    # int32 negation.
    order = np.argsort(-scores.astype(np.float64), axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    # The score as its own type prints it, as Triton's std::to_string: "3:2" for an INT64
    # output, not "3.000000:2"
    show = (lambda v: f"{int(v)}") if scores.dtype.kind in "iub" else (lambda v: f"{v:f}")
    return np.array(
        [
            [f"{show(v)}:{i}" for v, i in zip(vs, idx, strict=True)]
            for vs, idx in zip(top, order, strict=True)
        ]
    )


def bytes_tensor(strings: np.ndarray) -> bytes:
    """OIP's raw BYTES layout: each element as a 4-byte little-endian length and its UTF-8."""
    parts = []
    for s in strings.reshape(-1):
        b = str(s).encode()
        parts += [len(b).to_bytes(4, "little"), b]
    return b"".join(parts)
