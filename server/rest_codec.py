"""The Open Inference Protocol's REST bodies <-> the gRPC messages the data plane serves.

KServe v2's HTTP/JSON inference request and response, with Triton's binary tensor
extension (what ``tritonclient.http`` and ``perf_analyzer -i http`` send): the JSON header
comes first, ``Inference-Header-Content-Length`` bytes long, then each binary input's bytes
in input order (``parameters.binary_data_size``); an output asked for with
``parameters.binary_data`` (or every output, with the request's ``binary_data_output``)
comes back after the response's JSON the same way. A request becomes a
``ModelInferRequest`` with every tensor as raw bytes, so the REST front end validates,
admits and schedules exactly as gRPC does; only the JSON's own shape is checked here.
No HTTP library here: bodies in, bodies out.

Example:
    >>> body = b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}'
    >>> parsed = parse_infer(body, None)
    >>> parsed.request.inputs[0].shape, bytes(parsed.raw[0]).hex()
    ([1, 2], '0000803f00000040')
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import orjson
from google.protobuf.descriptor import FieldDescriptor

from server.errors import InvalidArgument
from server.limits import RequestLimits, clip
from server.proto_gen import grpc_service_pb2 as pb

HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor extension
# Statistics' messages written even at zero, as Triton's HTTP front end writes them.
DURATIONS = frozenset({
    "inference_stats", "success", "fail", "queue", "compute_input", "compute_infer",
    "compute_output", "cache_hit", "cache_miss",
})  # fmt: skip
# The extension's own parameters: read here, never passed on as the request's.
BINARY_SIZE = "binary_data_size"  # an input's (and a binary output's) bytes in the body
BINARY_OUTPUT = "binary_data"  # an output's: send it as binary data
BINARY_OUTPUTS = "binary_data_output"  # the request's: every output's default
SHARED_REGION = "shared_memory_region"  # an input or output in a registered region

# Every OIP datatype a JSON body may name, as numpy reads its values (FP16 too: JSON
# numbers); the data plane refuses a datatype its model's input does not take.
NUMPY_OF = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip


@dataclass
class ParsedInfer:
    """An inference request's REST body as the data plane takes it: ``request`` without
    tensor contents, ``raw`` its tensors' bytes (one per input not in shared memory, in
    order: ``DataPlane.infer``'s ``raw``), and ``binary`` which outputs go back as binary
    data (by name; ``binary_default`` for an output the request does not list)."""

    request: pb.ModelInferRequest
    raw: list[memoryview]
    decoded_bytes: int = 0  # bytes of ``raw`` made from JSON values (not views of the body)
    binary: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False
    shared_outputs: set[str] = field(default_factory=set)
    # The body's own "model_name" / "model_version" (KServe's REST clients send them; the
    # route names the model): checked against the route by the caller; None where absent.
    model_name: str | None = None
    model_version: str | None = None


def parse_infer(
    body: bytes,
    header_length: int | None,
    limits: RequestLimits | None = None,
    check: Callable[[pb.ModelInferRequest.InferInputTensor], None] | None = None,
) -> ParsedInfer:
    """``body`` (JSON, or JSON then binary tensors where ``header_length`` - the
    ``Inference-Header-Content-Length`` header - is given) as a ``ParsedInfer``;
    InvalidArgument saying what is wrong where it is not a request OIP describes. The
    counts ``limits`` bounds (inputs, outputs, parameters) are checked before any of them
    is read: a body of 60,000 inputs held the event loop 14.6 s - every client's, gRPC's
    too - before the data plane counted them (review helper-256). ``check`` (the model's
    ``DataPlane.input_check``) judges each input's name, datatype and shape before its JSON
    values are decoded: a shape the model refuses is never read value by value."""
    limits = limits or RequestLimits()
    view = memoryview(body)
    if header_length is None:
        header_length = len(body)
    elif not 0 <= header_length <= len(body):
        raise InvalidArgument(
            f"{HEADER_LENGTH} is {header_length}, but the body has {len(body)} bytes: it must "
            "give the length of the JSON part that begins the body"
        )
    # Lists and objects counted before the parse builds them: 8 M empty lists gzip to 24 KB
    # and took the event loop 9 s (the parse, the flattening, numpy) and 830 MiB (review
    # helper-260). A nested tensor of 64 x 3 x 224 x 224 has ~43,000.
    containers = body.count(b"[", 0, header_length) + body.count(b"{", 0, header_length)
    if containers > MAX_CONTAINERS:
        raise InvalidArgument(
            f"the request's JSON has {containers:,} lists and objects; at most "
            f"{MAX_CONTAINERS:,} are read: send each input's data as one flat list (row-major), "
            "or as binary data"
        )
    doc = _json(view[:header_length])
    binary = view[header_length:]
    if isinstance(doc, dict):  # (not an object: said below)
        doc = _unnulled(doc, OPTIONAL_REQUEST_FIELDS)
    check_fields(doc, "the request", {"id", "parameters", "inputs", "outputs", *NAMING_FIELDS})
    _check_counts(doc, limits)
    request = pb.ModelInferRequest()
    if "id" in doc:
        request.id = _string(doc["id"], "id")
    params = dict(_mapping(doc.get("parameters", {}), "parameters"))
    binary_default = _flag(params.pop(BINARY_OUTPUTS, False), f"parameters.{BINARY_OUTPUTS}")
    _parameters(request.parameters, params, "parameters")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument(
            'the request has no inputs: give "inputs": [{"name", "shape", "datatype", "data"}, ...]'
        )
    raw, used, decoded = [], 0, 0
    for i, entry in enumerate(inputs):
        where = f"inputs[{i}]"
        entry = _unnulled(_mapping(entry, where), ("parameters",))
        check_fields(entry, where, {"name", "shape", "datatype", "parameters", "data"})
        t = request.inputs.add()
        t.name = _string(entry.get("name"), f"{where}.name")
        where = f"input {clip(t.name)}"
        t.datatype = _string(entry.get("datatype"), f"{where}: datatype")
        t.shape.extend(_shape(entry.get("shape"), where))
        params = dict(_mapping(entry.get("parameters", {}), f"{where}: parameters"))
        size = params.pop(BINARY_SIZE, None)
        _parameters(t.parameters, params, f"{where}: parameters")
        if SHARED_REGION in params and (size is not None or "data" in entry):
            # (it read "raw_input_contents has 1 entries for 0 inputs", gRPC's words for a
            # field a REST client never sends: review helper-227)
            given = "data" if "data" in entry else f"parameters.{BINARY_SIZE}"
            raise InvalidArgument(
                f"{where} has both {given} and parameters.{SHARED_REGION}; send its values "
                "in one place: the body or the region"
            )
        if size is not None:
            if "data" in entry:
                raise InvalidArgument(
                    f"{where} has both data and parameters.{BINARY_SIZE}; send one or the other"
                )
            size = _count(size, f"{where}: parameters.{BINARY_SIZE}")
            if used + size > len(binary):
                raise InvalidArgument(
                    f"{where}: parameters.{BINARY_SIZE} is {size}, but only "
                    f"{len(binary) - used} bytes of binary data are left after the JSON "
                    f"({HEADER_LENGTH} {header_length})"
                )
            raw.append(binary[used : used + size])
            used += size
        elif "data" in entry:
            if check is not None:
                check(t)
            raw.append(memoryview(_tensor_bytes(entry["data"], t, where)))
            decoded += len(raw[-1])
        elif SHARED_REGION not in params:
            raise InvalidArgument(
                f'{where} has no data: give "data" (a list of values), parameters.'
                f"{BINARY_SIZE} with the bytes after the JSON, or parameters.{SHARED_REGION}"
            )
    if used != len(binary):
        raise InvalidArgument(
            f"{len(binary) - used} bytes of binary data after the JSON belong to no input: "
            f"the inputs' parameters.{BINARY_SIZE} add up to {used}"
        )
    parsed = ParsedInfer(request, raw, decoded, binary_default=binary_default)
    for key in NAMING_FIELDS:
        if key in doc:
            setattr(parsed, key, _string(doc[key], key))
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument('"outputs" must be a list of {"name", "parameters"}')
    for i, entry in enumerate(outputs):
        where = f"outputs[{i}]"
        entry = _unnulled(_mapping(entry, where), ("parameters",))
        check_fields(entry, where, {"name", "parameters"})
        o = request.outputs.add()
        o.name = _string(entry.get("name"), f"{where}.name")
        where = f"output {clip(o.name)}"
        params = dict(_mapping(entry.get("parameters", {}), f"{where}: parameters"))
        wanted = params.pop(BINARY_OUTPUT, binary_default)
        parsed.binary[o.name] = _flag(wanted, f"{where}: parameters.{BINARY_OUTPUT}")
        _parameters(o.parameters, params, f"{where}: parameters")
        if SHARED_REGION in params:
            parsed.shared_outputs.add(o.name)
    return parsed


def _check_counts(doc: dict, limits: RequestLimits) -> None:
    """The request's inputs, outputs and parameters (its own and each tensor's) within
    ``limits``, counted before any is read - as gRPC's are (``server.codec``)."""
    _within(doc.get("inputs"), limits.max_inputs, "inputs", "max_inputs")
    _within(doc.get("outputs"), limits.max_outputs, "outputs", "max_outputs")
    _within(doc.get("parameters"), limits.max_parameters, "request parameters", "max_parameters")
    for key in ("inputs", "outputs"):  # (each list within its bound by now)
        entries = doc.get(key)
        for i, e in enumerate(entries if isinstance(entries, list) else ()):
            if isinstance(e, dict):
                what = f"{key}[{i}] parameters"
                _within(e.get("parameters"), limits.max_parameters, what, "max_parameters")


def _within(given, most: int, what: str, setting: str) -> None:
    """INVALID_ARGUMENT where ``given`` (a list or an object) has more than ``most`` items."""
    if isinstance(given, list | dict) and len(given) > most:
        raise InvalidArgument(
            f"{len(given):,} {what} given; at most {most} are accepted (limits.{setting} in "
            "the server config)"
        )


def answer_body(resp: pb.ModelInferResponse, parsed: ParsedInfer) -> tuple[bytes, int | None]:
    """``resp`` as a REST body, and the length of its JSON part where binary outputs follow
    it (the ``Inference-Header-Content-Length`` to send; None: the body is JSON alone)."""
    doc: dict = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id:
        doc["id"] = resp.id
    if resp.parameters:
        doc["parameters"] = {k: parameter_value(v) for k, v in resp.parameters.items()}
    outputs, tail = [], []
    for t, data in zip(resp.outputs, resp.raw_output_contents, strict=True):
        entry = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if t.name in parsed.shared_outputs:  # written to the client's region: nothing here
            pass  # (no parameters either, as Triton: its C++ client reads an output's
            # parameters as binary_data_size and failed on the region's)
        elif parsed.binary.get(t.name, parsed.binary_default):
            entry["parameters"] = {BINARY_SIZE: len(data)}
            tail.append(data)
        else:
            entry["data"] = _values(t.datatype, data)
        outputs.append(entry)
    doc["outputs"] = outputs
    head = orjson.dumps(doc)  # (no NaN reaches it: _values writes those as strings)
    if not tail:
        return head, None
    return b"".join((head, *tail)), len(head)


def message_dict(message, filled: frozenset[str] = frozenset()) -> dict:
    """A protobuf message as the REST API's JSON writes it: field names as in the proto,
    64-bit integers as numbers (protobuf's JSON mapping makes them strings, which
    Triton's HTTP clients do not read), enums by name; a field without presence at its
    default is written too (``"count": 0``, ``"max_batch_size": 0``: perf_analyzer reads
    them as members), an unset message or oneof member is left out - a message named in
    ``filled`` is written at its defaults too (the statistics' durations: Triton writes
    ``{"count": 0, "ns": 0}``).

    Example:
        >>> message_dict(pb.ModelMetadataResponse(name="m", versions=["1"]))
        {'name': 'm', 'versions': ['1'], 'platform': '', 'inputs': [], 'outputs': []}
    """
    out = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            item = fd.message_type.fields_by_name["value"]
            out[fd.name] = {k: _field(item, v, filled) for k, v in value.items()}
        elif fd.is_repeated:
            out[fd.name] = [_field(fd, v, filled) for v in value]
        elif fd.has_presence and not message.HasField(fd.name) and fd.name not in filled:
            continue  # an unset message, oneof member or optional scalar
        else:
            out[fd.name] = _field(fd, value, filled)
    return out


def _field(fd, value, filled: frozenset[str] = frozenset()):
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return message_dict(value, filled)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.values_by_number[value].name
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("utf-8", "replace")
    return value


def loads(data: bytes | memoryview):
    """``data`` parsed as JSON (a view of the body is read in place: orjson takes one, and
    a body of megabytes is not copied first): by orjson (a float-heavy body parses ~12x
    faster: 21 against 260 us for the MLP's 784 inputs), else by the standard library,
    which takes what strict JSON refuses - NaN and Infinity literals, lone surrogates,
    numbers past a double - and reads them as before orjson (the checks after refuse them
    with their own reasons). One difference stays: an integer past 64 bits orjson reads as
    a float (2**64 -> 1.8e19), so it is refused as "not a whole number" where it is a shape
    or a size, and a parameter of that size is read as a double."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(bytes(data))


def _json(data: memoryview):
    try:
        doc = loads(data)
    except (ValueError, RecursionError) as exc:  # (JSONDecodeError, UnicodeDecodeError and
        # Python's 4,300-digit integer limit are ValueErrors)
        raise InvalidArgument(
            f"the request body is not JSON ({reason(exc)}); send the OIP inference request as "
            f"JSON, and binary tensors after it only with {HEADER_LENGTH}"
        ) from None
    return _mapping(doc, "the request")


def reason(exc: Exception) -> str:
    """Why a body did not parse as JSON, said shortly (RecursionError's text is Python's)."""
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _mapping(value, where: str) -> Mapping:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be a JSON object, not {_kind(value)}")
    return value


# A request's optional fields: JSON null reads as absent there, as KServe's server reads it
# (kserve's InferRequest.to_rest() writes "parameters": null and "outputs": null unset).
OPTIONAL_REQUEST_FIELDS = ("id", "parameters", "outputs", "model_name", "model_version")
# Fields KServe's REST clients add to every request (kserve.InferRequest.to_rest): the
# route names the model, and these must agree with it - refused as unknown, every inference
# of kserve's InferenceRESTClient failed with 400 (review helper-307).
NAMING_FIELDS = ("model_name", "model_version")


def _unnulled(doc: Mapping, optional) -> Mapping:
    """``doc`` without its ``optional`` keys whose value is JSON null."""
    if not any(doc.get(k, 0) is None for k in optional):
        return doc
    return {k: v for k, v in doc.items() if not (v is None and k in optional)}


def check_fields(doc: Mapping, where: str, known: set[str]) -> None:
    """A field OIP does not define is refused: a misspelt "datatype" or "parameters" was
    otherwise ignored (and the request served without what it asked)."""
    for key in doc:
        if key not in known:
            raise InvalidArgument(
                f"{where} has an unknown field {clip(str(key))}; OIP's are {sorted(known)}"
            )


def _string(value, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{where} must be a string, not {_kind(value)}")
    return value


def _flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where} must be true or false, not {_kind(value)}")
    return value


def _count(value, where: str) -> int:
    """A whole number in [0, 2**63): what an int64 shape dimension or size holds."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        # a number as given, anything else by its kind ("not 'True'" read as a value)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        said = clip(str(value)) if number else _kind(value)
        raise InvalidArgument(f"{where} must be a whole number in [0, 2**63), not {said}")
    return value


# Dimensions a shape may have: numpy's limit, so no tensor has more. Checked before any
# product of them: 30,000 dims of 2**62 took the event loop 2.9 s to multiply (quadratic
# in their number; every client waited, gRPC's too), then failed as a 500 formatting the
# product (review helper-249).
MAX_DIMS = 64
# Lists and objects a request's JSON may hold (``parse_infer``).
MAX_CONTAINERS = 2**17


def _shape(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise InvalidArgument(f"{where}: shape must be a list of dimensions, e.g. [1, 3]")
    if len(value) > MAX_DIMS:
        raise InvalidArgument(
            f"{where}: shape has {len(value):,} dims; a tensor has at most {MAX_DIMS}: give "
            "the input's shape as the model's metadata says it"
        )
    return [_count(d, f"{where}: shape") for d in value]


INT64 = (-(2**63), 2**63 - 1)
NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
# ... and read back from requests (protobuf's JSON names for them)
NONFINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _nonfinite(data):
    """``data`` (a number, or lists of them nested) with NONFINITE_IN's names as floats;
    without recursion, as ``_flat``: a body nested ~500 deep raised RecursionError, a 500
    with a traceback logged per request (review helper-242)."""
    if not isinstance(data, list):
        return NONFINITE_IN[data] if type(data) is str else data
    root: list = []
    stack = [(data, root)]
    while stack:
        src, dst = stack.pop()
        for v in src:
            if isinstance(v, list):
                dst.append([])
                stack.append((v, dst[-1]))
            else:
                dst.append(NONFINITE_IN[v] if type(v) is str else v)
    return root


def _parameters(out, params: Mapping, where: str) -> None:
    """JSON scalars as ``InferParameter``s: true/false as bool_param (before int: a JSON
    boolean is a Python int too), whole numbers as int64_param (those in [2**63, 2**64) as
    uint64_param, as gRPC carries them: a client's own 64-bit hash or seed was refused on
    REST alone - review helper-282), other numbers as double_param, strings as
    string_param."""
    for key, value in params.items():
        p = out[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int) and INT64[0] <= value <= INT64[1]:
            p.int64_param = value
        elif isinstance(value, int) and INT64[1] < value < 2**64:
            p.uint64_param = value
        elif isinstance(value, float) and math.isfinite(value):
            p.double_param = value
        elif isinstance(value, str):
            p.string_param = value
        else:
            raise InvalidArgument(
                f"{where}: {clip(str(key))} must be a string, a finite number or a boolean, "
                f"not {_kind(value)}"
            )


def _tensor_bytes(data, t: pb.ModelInferRequest.InferInputTensor, where: str) -> bytes:
    """JSON ``data`` (flat or nested, row-major) as the little-endian bytes of ``t``'s
    datatype; BYTES as OIP's length-prefixed strings."""
    count = math.prod(t.shape)
    if t.datatype == "BYTES":
        values = _flat(data, where, count, t)
        if not all(isinstance(v, str) for v in values):
            raise InvalidArgument(f"{where}: BYTES data must be strings")
        _check_count(len(values), count, t, where)
        parts = []
        for v in values:
            b = v.encode()
            parts += [len(b).to_bytes(4, "little"), b]
        return b"".join(parts)
    dtype = NUMPY_OF.get(t.datatype)
    if dtype is None:
        raise InvalidArgument(
            f"{where}: datatype {clip(t.datatype)} cannot be sent as JSON data; use one of "
            f"{sorted([*NUMPY_OF, 'BYTES'])}, or send its bytes as binary data"
        )
    target = np.dtype(dtype)
    kinds = "b" if target.kind == "b" else ("iu" if target.kind in "iu" else "iuf")
    # Numbers only, checked on the flat values before numpy sees them: strings made numpy
    # build a fixed-width array of count x longest string x 4 bytes - 1.5 GB for one
    # 500 KB body, on the event loop, before any in-flight accounting (review helper-233).
    flat = _flat(data, where, count, t)
    given = set(map(type, flat))
    wanted = {"b": "true/false", "iu": "whole numbers"}.get(
        kinds, 'numbers (or "NaN", "Infinity", "-Infinity")'
    )
    if (
        str in given
        and kinds == "iuf"
        and {v for v in flat if type(v) is str} <= NONFINITE_IN.keys()
    ):
        # "NaN", "Infinity", "-Infinity": how answers write them (JSON has no literal for
        # them), so an answer's data can be sent back (review helper-235)
        data = _nonfinite(data)
        flat = _flat(data, where, count, t)
        given = set(map(type, flat))
    if not given <= {int, float, bool} or (bool in given and kinds != "b"):
        raise InvalidArgument(f"{where}: {t.datatype} data must be {wanted}")
    try:
        values = np.asarray(data)  # numbers: 8 bytes a value at most
    except ValueError as exc:  # ragged nesting, or deeper than numpy's MAX_DIMS
        deep = "maximum number of dimension" in str(exc)
        why = f"deeper than {MAX_DIMS} levels" if deep else "unevenly"
        raise InvalidArgument(f"{where}: data is nested {why}; give a flat list") from None
    _check_count(values.size, count, t, where)
    if values.dtype.kind not in kinds:
        if kinds == "iu" and _past_64_bits(flat):  # (it said "must be whole numbers" of
            raise _out_of_range(where, t.datatype, target)  # whole ones: review helper-227)
        raise InvalidArgument(f"{where}: {t.datatype} data must be {wanted}")
    if target.kind in "iu" and values.size:
        info = np.iinfo(target)
        if values.min() < info.min or values.max() > info.max:
            raise _out_of_range(where, t.datatype, target)
    with np.errstate(over="ignore", invalid="ignore"):  # (below: refused, said in the 400)
        # (numpy's RuntimeWarning went to stderr, whose lines are JSON; review helper-240)
        out = np.ascontiguousarray(values, dtype=target.newbyteorder("<"))
    if target.kind == "f" and _made_infinite(values, out):
        # 1e39 as FP32 was served as inf, every output NaN, with 200 (review helper-227);
        # a NaN or infinity the client sent (the parser takes them) is its own
        raise InvalidArgument(
            f"{where}: a value is outside {t.datatype}'s range (about "
            f"+-{float(np.finfo(target).max):.4g}); scale it, or send {t.datatype} that holds it"
        )
    return out.tobytes()


def _made_infinite(values: np.ndarray, out: np.ndarray) -> bool:
    """Whether casting ``values`` to ``out``'s float type made a finite value infinite."""
    lost = ~np.isfinite(out)
    if not lost.any():
        return False
    return values.dtype.kind != "f" or bool((lost & np.isfinite(values)).any())


def _out_of_range(where: str, datatype: str, target: np.dtype) -> InvalidArgument:
    info = np.iinfo(target)
    return InvalidArgument(
        f"{where}: a value is outside {datatype}'s range [{info.min}, {info.max}]"
    )


def _past_64_bits(flat: list) -> bool:
    """Whether JSON integers (``flat``, the data's values) made numpy's array a float or
    object one only because one of them fits no 64-bit integer (its dtype for [-1, 2**64 -
    1] is float64, for [2**70] object): every value a whole number, one at least 2**63 in
    size."""
    whole = all(
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and math.isfinite(v) and v.is_integer())
        for v in flat
    )
    return whole and any(abs(v) >= 2**63 for v in flat)


def _flat(data, where: str, count: int, t) -> list:
    """``data``'s values, flat, in order; past ``count`` (the shape's) INVALID_ARGUMENT at
    once: 10 million values for a shape of 64 took the event loop 9 s (review
    helper-256)."""
    if not isinstance(data, list):
        raise InvalidArgument(f"{where}: data must be a list of values, not {_kind(data)}")
    out: list = []
    stack = [iter(data)]
    while stack:  # (iterative: the JSON parser bounds the nesting, this adds no recursion)
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
            if len(out) > count:
                _check_count(len(out), count, t, where, more=True)
        else:
            stack.pop()
    return out


def _check_count(given: int, count: int, t, where: str, more: bool = False) -> None:
    """``more``: ``given`` is where the count stopped, not all there are."""
    if given != count:
        # (MAX_DIMS dims of up to 2**63 - 1: a product of up to ~1,200 digits)
        want = f"{count:,}" if count < 2**63 else "more than 2**63"
        raise InvalidArgument(
            f"{where}: {'more than ' * more}{given - more:,} values in data, expected {want} "
            f"for shape {clip(str(list(t.shape)), 120)}"
        )


def _values(datatype: str, data: bytes) -> list:
    """An output's raw bytes as the flat list JSON carries."""
    if datatype == "BYTES":
        out, i = [], 0
        while i < len(data):
            n = int.from_bytes(data[i : i + 4], "little")
            out.append(bytes(data[i + 4 : i + 4 + n]).decode("utf-8", "replace"))
            i += 4 + n
        return out
    dtype = np.dtype(NUMPY_OF[datatype]).newbyteorder("<")
    values = np.frombuffer(data, dtype=dtype)
    if dtype.kind == "f" and not np.isfinite(values).all():
        # JSON has no NaN or infinity (json.dumps wrote bare NaN, which strict parsers
        # refuse): written as protobuf's JSON mapping writes them, as strings
        return [v if math.isfinite(v) else NONFINITE[str(v)] for v in values.tolist()]
    return values.tolist()


def parameter_value(p):
    """An ``InferParameter``'s (or a log setting's) value, whichever kind it holds."""
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")  # fmt: skip
