"""Protobuf's wire format, read just enough to take a message's large bytes fields out of it
without copying them, and to bound how many fields it holds before protobuf parses it.

A ModelInferRequest's ``raw_input_contents`` (field 7) hold the tensors: 600 KB for one
3x224x224 image. Parsed the usual way they are copied twice before numpy sees them - into
the parsed message, and again into a new ``bytes`` object at every read of
``request.raw_input_contents[i]``. ``split_field`` walks the message's top-level fields
(tag varint, then a varint, 8 or 4 bytes, or a length and that many bytes), keeps every
other field as it was, and hands back the chosen field's values as memoryviews of the bytes
gRPC received: the arrays are built on those, and only the small rest is parsed.

The same walk counts fields against a ``Bound``: protobuf's parse costs time and memory per
field (4 MiB of 2 M empty ``inputs`` took 0.46 s and 176 MiB; 300 k ``parameters`` entries
in one input 1.2 s), and it runs on the event loop, for every client. A message with more
fields than any valid request holds is refused (``TooManyFields``) without being parsed.

Example:
    >>> from server.proto_gen import grpc_service_pb2 as pb
    >>> req = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"abcd"])
    >>> rest, raw = split_field(req.SerializeToString(), RAW_INPUT_CONTENTS)
    >>> pb.ModelInferRequest.FromString(rest).model_name, [bytes(v) for v in raw]
    ('m', [b'abcd'])
    >>> split_field(b"\\x2a\\x00" * 10, RAW_INPUT_CONTENTS, Bound(4))  # 10 empty inputs
    Traceback (most recent call last):
    ...
    server.wire.TooManyFields: more than 4 top-level fields; at most 4 are accepted
"""

from __future__ import annotations

from dataclasses import dataclass

RAW_INPUT_CONTENTS = 7  # ModelInferRequest.raw_input_contents (grpc_service.proto)
_LENGTH_DELIMITED = 2


class TooManyFields(ValueError):
    """A message holds more fields than its ``Bound`` allows; the text says which bound and
    how to stay within it."""


class _TooLong(Exception):
    """A nested message's packed field is longer than its ``Bound`` allows."""


class _Malformed(Exception):
    """Not well formed at the walked level: left to protobuf, which names the error."""


@dataclass(frozen=True)
class Bound:
    """How many fields a message may hold: ``fields`` of its own (every occurrence counts,
    as protobuf parses each), and ``nested_fields`` in all the messages held by its
    length-delimited fields numbered in ``nested`` together (walked too; their own nested
    messages and map entries count as one field each). ``what``, ``nested_what`` and ``fix``
    word the error."""

    fields: int
    what: str = "top-level fields"
    nested: frozenset[int] = frozenset()
    nested_fields: int = 0
    nested_what: str = "fields in nested messages"
    fix: str = ""
    # The fields of the message each nested one holds in its field ``deep`` (a tensor's
    # contents: one field per BYTES string or unpacked number), counted apart.
    deep: int | None = None
    deep_fields: int = 0
    deep_what: str = "fields in nested contents"
    # The field ``packed`` of each nested message (a tensor's shape: packed varints, one
    # field however many dims) may be at most ``packed_bytes`` long: 4 MB of dims was one
    # field to the count and 32 MB to protobuf's parse, on the loop (review 156).
    packed: int | None = None
    packed_bytes: int = 0
    packed_what: str = "packed field"

    def refuse(self, count: int, what: str) -> TooManyFields:
        fix = f": {self.fix}" if self.fix and what != self.deep_what else ""  # (it says its own)
        return TooManyFields(f"more than {count} {what}; at most {count} are accepted{fix}")


def split_field(
    data: bytes, number: int | None, bound: Bound | int = 1 << 20
) -> tuple[bytes, list[memoryview]] | None:
    """``data`` (a serialized message) without its length-delimited fields ``number``, and
    those fields' values in order, as views of ``data`` (``number`` None: nothing taken out,
    the fields only counted). None when ``data`` is not well formed at a walked level (a
    truncated varint or field, a group or unknown wire type): the caller parses it whole and
    lets protobuf name the error. Raises ``TooManyFields`` past ``bound`` (an int: top-level
    fields only), having walked no more than the bound: this runs before the request is
    parsed - before authentication where that is off, and in Python on the event loop."""
    if not isinstance(bound, Bound):
        bound = Bound(bound)
    view = memoryview(data)
    kept: list[memoryview] = []
    found: list[memoryview] = []
    end, i, start, fields, inner, deep = len(data), 0, 0, 0, 0, 0
    try:
        while i < end:
            fields += 1
            if fields > bound.fields:
                raise bound.refuse(bound.fields, bound.what)
            field_start = i
            key, i = _varint(data, i)
            body, i = _skip(data, key & 7, i, end)
            if body < 0:
                continue
            if key >> 3 in bound.nested:
                n, d = _count(
                    data, body, i, bound.nested_fields - inner, bound.deep,
                    bound.deep_fields - deep, bound.packed, bound.packed_bytes,
                )  # fmt: skip
                inner, deep = inner + n, deep + d
                if inner > bound.nested_fields:
                    raise bound.refuse(bound.nested_fields, bound.nested_what)
                if deep > bound.deep_fields:
                    raise bound.refuse(bound.deep_fields, bound.deep_what)
            if key >> 3 == number:
                kept.append(view[start:field_start])
                found.append(view[body:i])
                start = i
    except (IndexError, _Malformed):  # a varint runs past the end, a field is cut short
        return None
    except _TooLong:
        raise TooManyFields(
            f"a {bound.packed_what} of more than {bound.packed_bytes} bytes; at most "
            f"{bound.packed_bytes} are accepted"
        ) from None
    if not found:
        return data, found
    kept.append(view[start:])
    return b"".join(kept), found


def leading_strings(data: bytes, last: int, fields: int = 16) -> dict[int, str]:
    """The length-delimited top-level fields numbered up to ``last`` that open ``data``,
    decoded as UTF-8 (invalid bytes replaced; the last occurrence of a number wins, as
    protobuf's parse), walking no further than ``fields`` fields or the first numbered past
    ``last`` - where protobuf libraries put them, since they write fields in number order.
    What a request that cannot be parsed still says about itself (a ModelInferRequest's
    model name, version and id: fields 1 to 3), for its error answer.

    Example:
        >>> leading_strings(b"\\x0a\\x01m\\x1a\\x02r7\\x22\\x00", last=3)
        {1: 'm', 3: 'r7'}
    """
    out: dict[int, str] = {}
    i, end = 0, len(data)
    try:
        for _ in range(fields):
            if i >= end:
                break
            key, i = _varint(data, i)
            if key >> 3 > last:
                break
            body, i = _skip(data, key & 7, i, end)
            if body >= 0:
                out[key >> 3] = bytes(data[body:i]).decode(errors="replace")
    except (IndexError, _Malformed):
        pass
    return out


def _count(
    data: bytes, i: int, end: int, most: int, deep: int | None = None, deep_most: int = 0,
    packed: int | None = None, packed_most: int = 0,
) -> tuple[int, int]:  # fmt: skip
    """The fields of the message ``data[i:end]``, counted no further than ``most + 1``, and
    those of the messages in its length-delimited fields ``deep`` (no further than
    ``deep_most + 1``); ``_TooLong`` where its length-delimited field ``packed`` holds more
    than ``packed_most`` bytes."""
    n = d = 0
    while i < end and n <= most and d <= deep_most:
        n += 1
        key, i = _varint(data, i)
        body, i = _skip(data, key & 7, i, end)
        if body < 0:
            continue
        if key >> 3 == deep:
            d += _count(data, body, i, deep_most - d)[0]
        elif key >> 3 == packed and i - body > packed_most:
            raise _TooLong
    return n, d


def _skip(data: bytes, wire_type: int, i: int, end: int) -> tuple[int, int]:
    """Past the value of a field of ``wire_type`` starting at ``data[i]``: (where a
    length-delimited value's bytes start, else -1; the index after the value)."""
    body = -1
    if wire_type == 0:
        _, i = _varint(data, i)
    elif wire_type == _LENGTH_DELIMITED:
        length, body = _varint(data, i)
        i = body + length
    elif wire_type == 1:
        i += 8
    elif wire_type == 5:
        i += 4
    else:  # 3 / 4: groups, which these messages never hold; 6 / 7: invalid
        raise _Malformed
    if i > end:
        raise _Malformed
    return body, i


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """The base-128 varint at ``data[i]`` and the index after it (IndexError past the end)."""
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise IndexError("varint longer than 10 bytes")
