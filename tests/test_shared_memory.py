"""Triton's system shared-memory extension (server/shared_memory.py): the registry on its
own (objects in a temporary folder), the codec's reading of inputs and writing of outputs,
and the real server through the stock tritonclient and its own shared-memory helpers
(POSIX objects in /dev/shm, as a user's client makes them)."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from runtime.repository.config import TensorConfig
from server import codec
from server.config import ServerConfig
from server.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from server.proto_gen import grpc_service_pb2 as pb
from server.shared_memory import SharedMemory, Slice, requested_slice

HAS_DEV_SHM = os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)


def _object(root: Path, name: str, data: bytes) -> None:
    (root / name).write_bytes(data)


def _params(region="r", size=None, offset=None, **other):
    t = pb.ModelInferRequest.InferInputTensor(name="x")
    if region is not None:
        t.parameters["shared_memory_region"].string_param = region
    if size is not None:
        t.parameters["shared_memory_byte_size"].int64_param = size
    if offset is not None:
        t.parameters["shared_memory_offset"].int64_param = offset
    for k, v in other.items():
        t.parameters[k].string_param = v
    return t.parameters


# -- a request's parameters ------------------------------------------------------------------
def test_a_slice_is_read_from_the_parameters_and_each_malformed_one_says_what_is_wrong():
    assert requested_slice(_params(size=64, offset=8), "input 'x'") == Slice("r", 8, 64)
    assert requested_slice(_params(region=None), "input 'x'") is None
    cases = [
        (_params(region=None, size=64), "shared_memory_byte_size without shared_memory_region"),
        (_params(region="", size=64), "shared_memory_region is empty"),
        (_params(size=None), "without shared_memory_byte_size"),
        (_params(size=0), "the size must be positive"),
        (_params(size=8, offset=-1), "the offset at least 0"),
        (_params(size=8, shared_memory_offset="4"), "shared_memory_offset must be an int64"),
    ]
    for params, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            requested_slice(params, "input 'x'")


def test_the_in_flight_cap_counts_the_bytes_inputs_name_in_shared_memory(tmp_path):
    _object(tmp_path, "obj", bytes(256))
    shm = SharedMemory(max_regions=4, root=str(tmp_path))
    req = pb.ModelInferRequest()
    for name, region, size in (("a", "r", 100), ("c", "r", 28), ("d", "r", 2**62),
                               ("e", "none", 64)):  # fmt: skip
        t = req.inputs.add(name=name)
        t.parameters["shared_memory_region"].string_param = region
        t.parameters["shared_memory_byte_size"].int64_param = size
    req.inputs.add(name="b")  # in the message: counted by its size there
    assert shm.input_bytes(req) == 0  # no region registered: nothing is copied
    shm.register("r", "/obj", 0, 200)
    # a claimed 2**62 counts as its region's 200 (it was refused as a 4e12 MiB request,
    # not for its size - review 204); a region not registered counts nothing
    assert shm.input_bytes(req) == 100 + 28 + 200
    # ... and at most its declared tensor's bytes: one row of 8 FP32 claiming 200 bytes is
    # refused at the decode for its size; counted as 200, a large claim was refused as a
    # request over the cap ("send fewer rows") or as load (review helper-275)
    t = req.inputs.add(name="f", datatype="FP32", shape=[1, 8])
    t.parameters["shared_memory_region"].string_param = "r"
    t.parameters["shared_memory_byte_size"].int64_param = 200
    u = req.inputs.add(name="g", datatype="BYTES", shape=[1])  # no fixed size: its claim
    u.parameters["shared_memory_region"].string_param = "r"
    u.parameters["shared_memory_byte_size"].int64_param = 50
    assert shm.input_bytes(req) == 100 + 28 + 200 + 32 + 50
    shm.close()


# -- the registry ----------------------------------------------------------------------------
def test_a_region_maps_its_slice_of_the_object_at_any_offset(tmp_path):
    data = bytes(i % 251 for i in range(3 * 4096))
    _object(tmp_path, "obj", data)
    shm = SharedMemory(max_regions=4, root=str(tmp_path))
    shm.register("r", "/obj", offset=4100, byte_size=5000)  # not page-aligned
    assert shm.read(Slice("r", 0, 16), "input 'x'") == data[4100:4116]
    assert shm.read(Slice("r", 4990, 10), "input 'x'") == data[9090:9100]
    os.truncate(tmp_path / "obj", 4100 + 100)  # a client shrinks it: a mapped read was
    with pytest.raises(InvalidArgument, match=r"ends 6 bytes short .* was truncated"):  # SIGBUS
        shm.read(Slice("r", 90, 16), "input 'x'")
    with pytest.raises(InvalidArgument, match=r"runs past the end of region 'r' \(5000 bytes\)"):
        shm.read(Slice("r", 4990, 11), "input 'x'")
    [status] = shm.status("r")
    assert (status.name, status.key, status.offset, status.byte_size) == ("r", "/obj", 4100, 5000)
    shm.close()


def test_registration_refuses_what_is_not_a_shared_memory_object_of_its_own(tmp_path):
    _object(tmp_path, "obj", bytes(64))
    _object(tmp_path, "sem.lock", bytes(32))
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "obj", tmp_path / "link")
    shm = SharedMemory(max_regions=4, root=str(tmp_path))
    cases = [
        ("/none", 0, 8, "no shared memory object '/none'"),
        ("/../obj", 0, 8, "is not a shared memory object's name"),
        ("/a/obj", 0, 8, "is not a shared memory object's name"),
        ("/", 0, 8, "is not a shared memory object's name"),
        ("/sem.lock", 0, 8, "is not a shared memory object's name"),  # a POSIX semaphore
        ("/link", 0, 8, "cannot be opened"),  # O_NOFOLLOW: a link is not followed
        ("/dir", 0, 8, "cannot be opened|not a regular file"),
        ("/obj", 60, 8, r"runs past the end of shared memory object '/obj' \(64 bytes\)"),
        ("/obj", 0, 0, "the size must be positive"),
    ]
    for key, offset, size, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            shm.register("r", key, offset, size)
    assert shm.status("") == []
    with pytest.raises(NotFound, match="no shared memory region 'r'"):
        shm.status("r")


def test_names_are_unique_and_the_count_is_capped(tmp_path):
    _object(tmp_path, "obj", bytes(64))
    shm = SharedMemory(max_regions=2, root=str(tmp_path))
    shm.register("a", "/obj", 0, 64)
    with pytest.raises(AlreadyExists, match="'a' is registered already"):
        shm.register("a", "/obj", 0, 32)
    shm.register("b", "/obj", 32, 32)
    with pytest.raises(ResourceExhausted, match=r"limits\.max_shared_memory_regions"):
        shm.register("c", "/obj", 0, 8)
    shm.unregister("nothing")  # an unknown name is no error (as Triton)
    lease = shm.lease(Slice("a", 0, 8), "output 'y'", needs=8)
    shm.unregister("a")  # still written to by a request: it counts until released
    with pytest.raises(ResourceExhausted, match="1 unregistered ones still written to"):
        shm.register("c", "/obj", 0, 8)
    shm.release([lease])
    shm.register("c", "/obj", 0, 8)
    assert [r.name for r in shm.status("")] == ["b", "c"]
    shm.unregister("")
    assert shm.status("") == []


def test_a_malformed_registration_at_the_limit_is_invalid_not_full(tmp_path, monkeypatch):
    # At the region limit a malformed call was told RESOURCE_EXHAUSTED, which clients retry
    # for ever; a server out of file descriptors told the client its object could not be
    # opened, INVALID_ARGUMENT, for the server's own limit (review helper-218).
    _object(tmp_path, "obj", bytes(64))
    shm = SharedMemory(max_regions=1, root=str(tmp_path))
    shm.register("a", "/obj", 0, 64)
    with pytest.raises(InvalidArgument, match="the size must be positive"):
        shm.register("b", "/obj", 0, 0)
    with pytest.raises(InvalidArgument):
        shm.register("b", "/a/b", 0, 8)  # a path, not a shared memory object's name
    shm.unregister("")

    def no_descriptors(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", no_descriptors)
    with pytest.raises(ResourceExhausted, match="out of file descriptors"):
        shm.register("b", "/obj", 0, 8)


def test_an_answer_that_finds_dev_shm_full_is_resource_exhausted(tmp_path, monkeypatch):
    # A full /dev/shm (the client truncated its object, the write grows it back) was INTERNAL,
    # counted as the engine's failure (review helper-218).
    _object(tmp_path, "obj", bytes(64))
    shm = SharedMemory(max_regions=1, root=str(tmp_path))
    shm.register("a", "/obj", 0, 64)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(ResourceExhausted, match="No space left on device"):
        shm._regions["a"].write(Slice("a", 0, 8), memoryview(bytes(8)))
    shm.unregister("")


def test_an_unregister_waits_for_the_requests_holding_the_region(tmp_path):
    _object(tmp_path, "obj", bytes(64))
    shm = SharedMemory(max_regions=4, root=str(tmp_path))
    shm.register("out", "/obj", 0, 64)
    lease = shm.lease(Slice("out", 16, 8), "output 'y'", needs=8)
    shm.unregister("out")
    assert shm.status("") == []  # the name is free at once ...
    shm.register("out", "/obj", 0, 8)  # ... and may be registered again
    lease.region.write(lease.slice, memoryview(b"answered"))  # the old mapping still works
    assert (tmp_path / "obj").read_bytes()[16:24] == b"answered"
    shm.release([lease])
    with pytest.raises(OSError):  # its descriptor closed with its last lease
        os.fstat(lease.region._fd)
    with pytest.raises(InvalidArgument, match="cannot hold the result"):
        shm.lease(Slice("out", 0, 8), "output 'y'", needs=9)
    shm.close()


def test_a_server_with_shared_memory_off_says_so(tmp_path):
    _object(tmp_path, "obj", bytes(64))
    shm = SharedMemory(max_regions=4, root=str(tmp_path), enabled=False)
    for call in (
        lambda: shm.register("r", "/obj", 0, 64),
        lambda: shm.read(Slice("r", 0, 8), "input 'x'"),
    ):
        with pytest.raises(InvalidArgument, match="system_shared_memory: false"):
            call()
    # Nothing is registered: a client's clean-up (status, unregister all) answers so - it
    # failed INVALID_ARGUMENT against the Kubernetes deploys (review 208), as CUDA's did
    # for perf_analyzer.
    assert shm.status("") == []
    shm.unregister("")
    with pytest.raises(NotFound, match="shared memory is off on this server"):
        shm.status("r")


def test_shared_memory_is_on_by_default_only_where_the_port_is_local_or_guarded(tmp_path):
    # Left on for a server any host reaches without a token, a remote client could read and
    # overwrite this host's /dev/shm objects through a model (review 204).
    def config(**kw) -> ServerConfig:
        return ServerConfig.from_dict({"repository": str(tmp_path), **kw})

    token = {"auth": {"bearer_token": "t" * 32}}
    assert config().shared_memory_on  # 127.0.0.1
    assert not config(host="0.0.0.0").shared_memory_on
    assert config(host="0.0.0.0", **token).shared_memory_on
    assert not config(system_shared_memory=False).shared_memory_on
    with pytest.raises(Exception, match=r"system_shared_memory.*any client that reaches"):
        config(host="0.0.0.0", system_shared_memory=True)
    assert config(host="0.0.0.0", system_shared_memory=True, **token).shared_memory_on


# -- the codec -------------------------------------------------------------------------------
def test_inputs_in_shared_memory_and_in_the_message_are_read_in_order(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[7, 8], [9, 10]], dtype=np.int64)
    _object(tmp_path, "obj", bytes(12) + a.tobytes())
    shm = SharedMemory(max_regions=4, root=str(tmp_path))
    shm.register("r", "/obj", 12, a.nbytes)
    specs = [TensorConfig(name="a", dtype="float32", shape=(3,)),
             TensorConfig(name="b", dtype="int64", shape=(2,))]  # fmt: skip
    req = pb.ModelInferRequest()
    t = req.inputs.add(name="a", datatype="FP32", shape=[2, 3])
    t.parameters["shared_memory_region"].string_param = "r"
    t.parameters["shared_memory_byte_size"].int64_param = a.nbytes
    req.inputs.add(name="b", datatype="INT64", shape=[2, 2])
    req.raw_input_contents.append(b.tobytes())  # the one input in the message: entry 0
    arrays, rows = codec.decode_inputs(req, specs, max_batch=4, shared=shm)
    assert rows == 2
    np.testing.assert_array_equal(arrays["a"], a)
    np.testing.assert_array_equal(arrays["b"], b)
    req.raw_input_contents.append(b.tobytes())
    with pytest.raises(InvalidArgument, match=r"2 entries for 1 inputs \(1 more in shared"):
        codec.decode_inputs(req, specs, max_batch=4, shared=shm)
    del req.raw_input_contents[1]
    t.parameters["shared_memory_byte_size"].int64_param = a.nbytes - 4
    with pytest.raises(InvalidArgument, match="20 bytes in shared memory region 'r', expected 24"):
        codec.decode_inputs(req, specs, max_batch=4, shared=shm)
    t.parameters["shared_memory_byte_size"].int64_param = a.nbytes
    t.contents.fp32_contents.extend(a.reshape(-1))
    with pytest.raises(InvalidArgument, match=r"and has values in contents\.fp32_contents"):
        codec.decode_inputs(req, specs, max_batch=4, shared=shm)
    with pytest.raises(InvalidArgument, match="shared memory is not supported here"):
        codec.decode_inputs(req, specs, max_batch=4)  # a caller without regions
    shm.close()


def test_text_in_shared_memory_is_read_as_raw_bytes_strings(tmp_path):
    strings = np.array(["héllo", "", "a b"], dtype=object)
    data = codec.bytes_tensor(strings)
    _object(tmp_path, "obj", data)
    shm = SharedMemory(max_regions=4, root=str(tmp_path))
    shm.register("r", "/obj", 0, len(data))
    req = pb.ModelInferRequest()
    t = req.inputs.add(name="text", datatype="BYTES", shape=[3, 1])
    t.parameters["shared_memory_region"].string_param = "r"
    t.parameters["shared_memory_byte_size"].int64_param = len(data)
    assert codec.decode_text(req, "text", 8, 100, shared=shm) == ["héllo", "", "a b"]
    with pytest.raises(InvalidArgument, match="more than 3 strings of at most 2 bytes take"):
        codec.decode_text(req, "text", 8, 2, shared=shm)
    shm.close()


def test_an_output_in_shared_memory_is_written_there_and_keeps_its_place_in_the_answer(
    tmp_path,
):
    _object(tmp_path, "obj", bytes(64))
    shm = SharedMemory(max_regions=4, root=str(tmp_path))
    shm.register("out", "/obj", 0, 64)
    specs = [TensorConfig(name="y", dtype="float32", shape=(2,)),
             TensorConfig(name="z", dtype="int64", shape=(1,))]  # fmt: skip
    req = pb.ModelInferRequest()
    o = req.outputs.add(name="y")
    o.parameters["shared_memory_region"].string_param = "out"
    o.parameters["shared_memory_byte_size"].int64_param = 16
    o.parameters["shared_memory_offset"].int64_param = 8
    req.outputs.add(name="z")
    wanted = codec.requested_outputs(req, specs)
    assert [codec.row_bytes(w) for w in wanted] == [0, 8]  # y is not in the answer's bytes
    y = np.array([[1.5, 2.5], [3.5, 4.5]], np.float32)
    z = np.array([[7], [9]], np.int64)
    leases = {"y": shm.lease(wanted[0].shared, "output 'y'", needs=y.nbytes)}
    resp = pb.ModelInferResponse()
    codec.encode_outputs(resp, {"y": y, "z": z}, wanted, leases)
    shm.release(leases.values())
    assert (tmp_path / "obj").read_bytes()[8:24] == y.tobytes()
    assert [(t.name, list(t.shape)) for t in resp.outputs] == [("y", [2, 2]), ("z", [2, 1])]
    assert list(resp.raw_output_contents) == [b"", z.tobytes()]  # one entry per output
    o.parameters["classification"].int64_param = 1
    with pytest.raises(InvalidArgument, match="both shared_memory_region and classification"):
        codec.requested_outputs(req, specs)
    shm.close()


def test_a_request_naming_an_unknown_output_region_leaves_no_other_region_held(tmp_path):
    # The first output's region was leased, the second's NotFound escaped the release
    # (only InvalidArgument was caught) and the caller's dict stayed empty: the region was
    # held for good - never closed after an unregister, and counted against the limit
    # (review 205: three such requests filled max_shared_memory_regions 2).
    from types import SimpleNamespace

    from server.dataplane import DataPlane

    _object(tmp_path, "obj", bytes(64))
    shm = SharedMemory(max_regions=4, root=str(tmp_path))
    shm.register("out", "/obj", 0, 64)
    specs = [TensorConfig(name="y", dtype="float32", shape=(2,)),
             TensorConfig(name="z", dtype="float32", shape=(2,))]  # fmt: skip
    req = pb.ModelInferRequest()
    for name, region in (("y", "out"), ("z", "nosuch")):
        o = req.outputs.add(name=name)
        o.parameters["shared_memory_region"].string_param = region
        o.parameters["shared_memory_byte_size"].int64_param = 8
    wanted = codec.requested_outputs(req, specs)
    leases: dict = {}
    with pytest.raises(NotFound, match="'nosuch'"):
        DataPlane._lease_outputs(SimpleNamespace(shared_memory=shm), wanted, 1, leases)
    shm.release(leases.values())  # what the data plane's finally does with what was taken
    shm.unregister("out")
    assert shm._leaving == 0  # closed: nothing held it
    shm.register("again", "/obj", 0, 64)
    shm.close()


# -- the server, through tritonclient ----------------------------------------------------------
needs_shm = pytest.mark.skipif(not HAS_DEV_SHM, reason="no writable /dev/shm on this machine")


@pytest.fixture
def regions():
    """tritonclient's own shared-memory helpers; every region made is destroyed after."""
    import tritonclient.utils.shared_memory as shm

    made = []

    def make(size: int):
        key = f"/innfer-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key.lstrip("/"), key, size)
        made.append(handle)
        return key, handle

    yield shm, make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


@needs_shm
def test_a_tritonclient_request_through_shared_memory_is_answered_as_one_in_the_message(
    client, regions
):
    import tritonclient.grpc as tc

    shm, make = regions
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    in_key, in_handle = make(x.nbytes)
    out_key, out_handle = make(2 * 10 * 4)
    shm.set_shared_memory_region(in_handle, [x])
    client.register_system_shared_memory("in", in_key, x.nbytes)
    client.register_system_shared_memory("out", out_key, 80)
    try:
        status = client.get_system_shared_memory_status(as_json=True)["regions"]
        assert {r["name"]: r["key"] for r in status.values()} == {"in": in_key, "out": out_key}
        assert "system_shared_memory" in client.get_server_metadata().extensions

        def infer(shared: bool):
            inp = tc.InferInput("input", list(x.shape), "FP32")
            out = tc.InferRequestedOutput("logits")
            if shared:
                inp.set_shared_memory("in", x.nbytes)
                out.set_shared_memory("out", 80)
            else:
                inp.set_data_from_numpy(x)
            params = {"tier": "w100"}
            return client.infer("tiny", [inp], outputs=[out], parameters=params)

        expected = infer(shared=False).as_numpy("logits")
        result = infer(shared=True)
        assert result.get_output("logits").shape == [2, 10]
        got = shm.get_contents_as_numpy(out_handle, np.float32, [2, 10])
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    finally:
        client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    # No CUDA region is ever registered: none listed, and unregistering them all succeeds
    # (perf_analyzer's clean-up does both kinds), as a Triton without any answers.
    assert client.get_cuda_shared_memory_status(as_json=True).get("regions", {}) == {}
    client.unregister_cuda_shared_memory()


@needs_shm
def test_bad_shared_memory_requests_are_refused_before_they_run(client, regions):
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    _, make = regions
    key, _ = make(256)
    client.register_system_shared_memory("r", key, 256)
    try:
        with pytest.raises(InferenceServerException, match="registered already") as e:
            client.register_system_shared_memory("r", key, 256)
        assert e.value.status() == "StatusCode.ALREADY_EXISTS"
        with pytest.raises(InferenceServerException, match="no shared memory object") as e:
            client.register_system_shared_memory("q", "/innfer-test-missing", 64)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"

        def infer(input_region: str, input_size: int, output_size: int):
            inp = tc.InferInput("input", [1, 1, 8, 8], "FP32")
            inp.set_shared_memory(input_region, input_size)
            out = tc.InferRequestedOutput("logits")
            out.set_shared_memory("r", output_size, offset=0)
            return client.infer("tiny", [inp], outputs=[out])

        for args, code, message in [
            (("nope", 256, 40), "NOT_FOUND", "no shared memory region 'nope' is registered"),
            (
                ("r", 128, 40),
                "INVALID_ARGUMENT",
                "128 bytes in shared memory region 'r', expected 256",
            ),
            (
                ("r", 256, 39),
                "INVALID_ARGUMENT",
                "shared_memory_byte_size 39 cannot hold the result .40 bytes",
            ),
        ]:  # (NOT_FOUND for a region none registered, as Triton)
            with pytest.raises(InferenceServerException, match=message) as e:
                infer(*args)
            assert e.value.status() == f"StatusCode.{code}"
        infer("r", 256, 40)  # the input and its answer in one region: fine
    finally:
        client.unregister_system_shared_memory("r")
    assert client.is_server_live()


@needs_shm
def test_a_server_with_shared_memory_off_refuses_it_and_does_not_advertise_it(model_repository):
    import tritonclient.grpc as tc
    from serverutil import ServerThread
    from tritonclient.utils import InferenceServerException

    s = ServerThread({"repository": str(model_repository), "system_shared_memory": False})
    s.start()
    c = tc.InferenceServerClient(s.address)
    try:
        assert "system_shared_memory" not in c.get_server_metadata().extensions
        with pytest.raises(InferenceServerException, match="system_shared_memory: false") as e:
            c.register_system_shared_memory("r", "/anything", 64)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        c.close()
        s.stop()


def test_grpc_status_of_an_existing_region_is_already_exists():
    from server.service import status_of

    assert status_of(AlreadyExists("x")) == grpc.StatusCode.ALREADY_EXISTS


@needs_shm
def test_the_readme_example_runs_as_written(server, capsys):
    # README "System shared memory": the model and address replaced by the test server's
    # ("wide" takes mnist's input shape and answers 10 logits too).
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## System shared memory") :]
    code = section[section.index("```python\n") + 10 : section.index("```\n", 20)]
    code = code.replace("127.0.0.1:8001", server.address).replace('"mnist"', '"wide"')
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() in {f"[{i}]" for i in range(10)}
    assert server.server.plane.shared_memory.status("") == []  # it unregistered them all
