"""server/wire.py: raw_input_contents taken out of a serialized ModelInferRequest uncopied."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from server.limits import RequestLimits
from server.proto_gen import grpc_service_pb2 as pb
from server.service import request_bounds
from server.wire import RAW_INPUT_CONTENTS, Bound, TooManyFields, split_field

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
def test_a_message_of_more_fields_than_allowed_is_refused(body):
    # The splitter runs before any handler (before authentication), in Python: 2 M empty
    # fields took seconds, and 2 M empty tensors ~1 GiB of views. Past the bound it stops at
    # once. It used to return None there, and the caller then parsed the whole message with
    # protobuf - the very cost the bound is for (2 M empty inputs: 0.46 s, 176 MiB) - so past
    # the bound it now raises, and the caller refuses the request unparsed (INVALID_ARGUMENT
    # saying how many fields are accepted).
    data = body * 2**21
    with pytest.raises(TooManyFields, match="more than 300 top-level fields; at most 300"):
        split_field(data, RAW_INPUT_CONTENTS, 300)
    req = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"ab", b"cd"])
    rest, raw = split_field(req.SerializeToString(), RAW_INPUT_CONTENTS, 3)
    assert pb.ModelInferRequest.FromString(rest).model_name == "m"
    assert [bytes(v) for v in raw] == [b"ab", b"cd"]
    with pytest.raises(TooManyFields):
        split_field(req.SerializeToString(), RAW_INPUT_CONTENTS, 2)


NESTED = Bound(10, nested=frozenset({5, 6}), nested_fields=20, nested_what="nested fields")


def test_fields_inside_inputs_and_outputs_count_against_the_nested_bound():
    req = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"ab"])
    t = req.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    for i in range(16):
        t.parameters[f"p{i}"].bool_param = True  # name, datatype, shape + 16 entries: 19
    rest, raw = split_field(req.SerializeToString(), RAW_INPUT_CONTENTS, NESTED)
    assert pb.ModelInferRequest.FromString(rest).inputs[0] == t and len(raw) == 1
    assert split_field(req.SerializeToString(), None, NESTED)[1] == []  # counted only
    o = req.outputs.add(name="y")  # one more input field and one of an output: 21
    o.parameters["binary_data"].bool_param = True
    for number in (RAW_INPUT_CONTENTS, None):
        with pytest.raises(TooManyFields, match="more than 20 nested fields; at most 20"):
            split_field(req.SerializeToString(), number, NESTED)


def test_the_servers_bounds_refuse_300k_parameters_of_one_input_and_pass_valid_requests():
    infer, other = request_bounds(RequestLimits())
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="BYTES", shape=[1])
    data = req.SerializeToString()
    entry = pb.ModelInferRequest(inputs=[{"parameters": {"k": {"bool_param": True}}}])
    one = entry.SerializeToString()[2:]  # the input's one map entry, without its own header
    body = one * 300_000  # 3.4 MiB of parameters in one input: 1.2 s to parse
    data += b"\x2a" + _varint(len(body)) + body
    with pytest.raises(TooManyFields, match="more than 1088 fields in its inputs and outputs"):
        split_field(data, RAW_INPUT_CONTENTS, infer)
    full = pb.ModelInferRequest(model_name="m", id="r")
    for i in range(64):  # the largest valid request: every limit at its maximum
        full.parameters[f"p{i}"].int64_param = i
        t = full.inputs.add(name=f"x{i}", datatype="FP32", shape=[1, 2])
        o = full.outputs.add(name=f"y{i}")
        o.parameters["binary_data"].bool_param = True
        o.parameters["classification"].int64_param = 1
        t.parameters[f"q{i}"].bool_param = True
        full.raw_input_contents.append(bytes(8))
    rest, raw = split_field(full.SerializeToString(), RAW_INPUT_CONTENTS, infer)
    assert len(raw) == 64 and len(pb.ModelInferRequest.FromString(rest).inputs) == 64
    load = pb.RepositoryModelLoadRequest(model_name="m")
    for i in range(79):  # its name and 79 parameters: 80 top-level fields
        load.parameters[f"p{i}"].bool_param = True
    assert split_field(load.SerializeToString(), None, other) is not None
    load.parameters["one-more"].bool_param = True
    with pytest.raises(TooManyFields, match="more than 80 top-level fields"):
        split_field(load.SerializeToString(), None, other)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_values_sent_one_by_one_in_contents_are_counted_before_the_parse():
    # The walk counted a tensor's contents as one field: an FP32 input's 784 values beside
    # 1.9 M empty bytes_contents (3.6 MiB) took 45 ms and 60 MiB to parse, and decoded as
    # valid (review helper-136). Each value sent one by one counts now.
    infer, _ = request_bounds(RequestLimits())
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="text", datatype="BYTES", shape=[4095, 1])
    t.contents.bytes_contents.extend([b"a sentence"] * 4095)
    t2 = req.inputs.add(name="x", datatype="FP32", shape=[2, 784])
    t2.contents.fp32_contents.extend([0.5] * 1568)  # packed: one field, 4,096 in all
    rest, _ = split_field(req.SerializeToString(), RAW_INPUT_CONTENTS, infer)
    assert pb.ModelInferRequest.FromString(rest) == req
    t.contents.bytes_contents.append(b"")
    with pytest.raises(TooManyFields, match="more than 4096 values sent one by one"):
        split_field(req.SerializeToString(), RAW_INPUT_CONTENTS, infer)
    small, _ = request_bounds(RequestLimits(max_contents_values=100))
    with pytest.raises(TooManyFields, match=r"limits\.max_contents_values"):
        split_field(req.SerializeToString(), None, small)


def test_values_beside_the_datatypes_own_contents_are_refused():
    from runtime.repository.config import TensorConfig
    from server.codec import decode_inputs
    from server.errors import InvalidArgument

    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    t.contents.fp32_contents.extend([1.0, 2.0])
    spec = TensorConfig(name="x", dtype="float32", shape=(2,))
    assert decode_inputs(req, [spec], max_batch=8)[0]["x"].tolist() == [[1.0, 2.0]]
    t.contents.bytes_contents.append(b"")
    with pytest.raises(InvalidArgument, match=r"values in contents.bytes_contents beside"):
        decode_inputs(req, [spec], max_batch=8)
