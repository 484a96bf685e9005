"""Protobuf's wire format, read just enough to take a message's large bytes fields out of it
without copying them.

A ModelInferRequest's ``raw_input_contents`` (field 7) hold the tensors: 600 KB for one
3x224x224 image. Parsed the usual way they are copied twice before numpy sees them - into
the parsed message, and again into a new ``bytes`` object at every read of
``request.raw_input_contents[i]``. ``split_field`` walks the message's top-level fields
(tag varint, then a varint, 8 or 4 bytes, or a length and that many bytes), keeps every
other field as it was, and hands back the chosen field's values as memoryviews of the bytes
gRPC received: the arrays are built on those, and only the small rest is parsed.

Example:
    >>> from server.proto_gen import grpc_service_pb2 as pb
    >>> req = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"abcd"])
    >>> rest, raw = split_field(req.SerializeToString(), RAW_INPUT_CONTENTS)
    >>> pb.ModelInferRequest.FromString(rest).model_name, [bytes(v) for v in raw]
    ('m', [b'abcd'])
"""

from __future__ import annotations

RAW_INPUT_CONTENTS = 7  # ModelInferRequest.raw_input_contents (grpc_service.proto)
_LENGTH_DELIMITED = 2


def split_field(
    data: bytes, number: int, max_fields: int = 1 << 20
) -> tuple[bytes, list[memoryview]] | None:
    """``data`` (a serialized message) without its length-delimited fields ``number``, and
    those fields' values in order, as views of ``data``. None when ``data`` is not well
    formed at the top level (a truncated varint or field, a group or unknown wire type) or
    has more than ``max_fields`` top-level fields: the caller parses it whole and lets
    protobuf name the error, or its own count checks refuse it. (This loop runs before any
    handler - before authentication - and in Python: without the bound, 4 MiB of empty
    fields held the event loop ~2 s, and 2 M empty tensors cost ~1 GiB of views.)"""
    view = memoryview(data)
    kept: list[memoryview] = []
    found: list[memoryview] = []
    end, i, start, fields = len(data), 0, 0, 0
    try:
        while i < end:
            fields += 1
            if fields > max_fields:
                return None
            field_start = i
            key, i = _varint(data, i)
            wire_type = key & 7
            if wire_type == 0:
                _, i = _varint(data, i)
            elif wire_type == _LENGTH_DELIMITED:
                length, i = _varint(data, i)
                body, i = i, i + length
            elif wire_type == 1:
                i += 8
            elif wire_type == 5:
                i += 4
            else:  # 3 / 4: groups, which these messages never hold; 6 / 7: invalid
                return None
            if i > end:
                return None
            if key >> 3 == number and wire_type == _LENGTH_DELIMITED:
                kept.append(view[start:field_start])
                found.append(view[body:i])
                start = i
    except IndexError:  # a varint runs past the end
        return None
    if not found:
        return data, found
    kept.append(view[start:])
    return b"".join(kept), found


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
