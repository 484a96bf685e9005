"""server/wire.py: raw_input_contents taken out of a serialized ModelInferRequest uncopied."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from server.proto_gen import grpc_service_pb2 as pb
from server.wire import RAW_INPUT_CONTENTS, split_field

names = st.text(max_size=12)


@st.composite
def requests(draw) -> pb.ModelInferRequest:
    """Requests with every kind of top-level field: strings, a map of parameters of each
    value type, inputs and outputs, and raw contents of any length (0 to 300 bytes, so the
    length varints take one or two bytes)."""
    req = pb.ModelInferRequest(model_name=draw(names), model_version=draw(names), id=draw(names))
    for key in draw(st.lists(names, max_size=3, unique=True)):
        p = req.parameters[key]
        kind = draw(st.sampled_from(["bool", "int", "double", "string"]))
        if kind == "bool":
            p.bool_param = draw(st.booleans())
        elif kind == "int":
            p.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif kind == "double":
            p.double_param = draw(st.floats(allow_nan=False))
        else:
            p.string_param = draw(names)
    for name in draw(st.lists(names, max_size=3)):
        req.inputs.add(name=name, datatype="FP32", shape=draw(st.lists(st.integers(-1, 9))))
    for name in draw(st.lists(names, max_size=2)):
        req.outputs.add(name=name)
    req.raw_input_contents.extend(draw(st.lists(st.binary(max_size=300), max_size=4)))
    return req


@settings(max_examples=300, deadline=None)
@given(requests())
def test_the_rest_parses_to_the_request_without_its_raw_contents(req):
    data = req.SerializeToString()
    rest, raw = split_field(data, RAW_INPUT_CONTENTS)
    assert [bytes(v) for v in raw] == list(req.raw_input_contents)
    assert all(v.obj is data for v in raw)  # views of the received bytes: no copy
    want = pb.ModelInferRequest()
    want.CopyFrom(req)
    del want.raw_input_contents[:]
    assert pb.ModelInferRequest.FromString(rest) == want


def test_a_request_without_raw_contents_is_returned_as_it_came():
    data = pb.ModelInferRequest(model_name="m").SerializeToString()
    rest, raw = split_field(data, RAW_INPUT_CONTENTS)
    assert rest is data and raw == []


@pytest.mark.parametrize(
    "cut",
    [
        lambda d: d[:-1],  # the last raw field runs past the end
        lambda d: d + b"\x80",  # a key varint never ends
        lambda d: d + b"\x3b",  # field 7 as a group (wire type 3): never in these messages
        lambda d: d + b"\x3a\xff\xff\xff\xff\x0f",  # a 4 GB length
    ],
)
def test_malformed_bytes_are_left_to_protobuf_to_refuse(cut):
    req = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"abcd"])
    data = cut(req.SerializeToString())
    assert split_field(data, RAW_INPUT_CONTENTS) is None
    with pytest.raises(DecodeError):  # parsed whole, protobuf refuses it: INVALID_ARGUMENT
        pb.ModelInferRequest.FromString(data)


@pytest.mark.parametrize("body", [b"\x78\x00", b"\x3a\x00"])  # empty unknown / raw fields
def test_a_message_of_more_fields_than_allowed_is_left_to_protobuf(body):
    # The splitter runs before any handler (before authentication), in Python: 2 M empty
    # fields took seconds, and 2 M empty tensors ~1 GiB of views. Past the bound it stops at
    # once and the caller parses with protobuf (whose limits then refuse the request).
    data = body * 2**21
    assert split_field(data, RAW_INPUT_CONTENTS, max_fields=300) is None
    req = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"ab", b"cd"])
    rest, raw = split_field(req.SerializeToString(), RAW_INPUT_CONTENTS, max_fields=3)
    assert pb.ModelInferRequest.FromString(rest).model_name == "m"
    assert [bytes(v) for v in raw] == [b"ab", b"cd"]
    assert split_field(req.SerializeToString(), RAW_INPUT_CONTENTS, max_fields=2) is None
