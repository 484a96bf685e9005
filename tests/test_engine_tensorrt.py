"""The TensorRT backend.

Option checks, feed validation, the fp16 ONNX conversion and "no tensorrt here" behaviour
run everywhere. TensorRT and CUDA cannot be installed or run on these machines, so the build
logic (strongly typed network, fp16 converter choice, timing cache) and the engine's buffer
handling (pinned host staging, one synchronisation per run) are also tested everywhere
against FAKES of ``tensorrt`` and ``cuda.bindings.runtime`` written from their documented
Python APIs: they check what the backend asks of TensorRT/CUDA, not what TensorRT does.
``gpu`` tests need an NVIDIA GPU: the CUDA plumbing ones need cuda-python only (a stub
stands in for TensorRT), the build/run ones need TensorRT too and skip without.
"""

from __future__ import annotations

import ctypes
import enum
import json
import logging
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from runtime.engines import tensorrt as trt_module
from runtime.engines.base import BackendUnavailable, BuildOptions, EngineError, TensorSpec
from runtime.engines.feeds import check_feeds
from runtime.engines.fp16 import convert_to_fp16
from runtime.engines.tensorrt import (
    PLAN_FILE,
    TensorRTBackend,
    TensorRTEngine,
    timing_cache_name,
)

ROOT = Path(__file__).resolve().parents[1]
IN_F, OUT_F = 16, 8


def _mlp_onnx(path: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write y = relu(x @ w + b), x: (batch, 16) float32 with a dynamic batch; return w, b."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((IN_F, OUT_F)) * 0.25).astype(np.float32)
    b = (rng.standard_normal(OUT_F) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN_F])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT_F])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    # Opset 17 / IR 8: old enough for every TensorRT 10/11 ONNX parser.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return w, b


def _reference(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(x.astype(np.float64) @ w + b, 0.0).astype(np.float32)


def _inputs(batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, IN_F)).astype(np.float32)


# --- everywhere: no TensorRT needed -------------------------------------------------------


def test_import_needs_neither_tensorrt_nor_torch():
    # A fresh interpreter in which `import tensorrt` fails, as on a machine without it.
    code = (
        "import sys\n"
        "sys.modules['tensorrt'] = None\n"
        "import runtime.engines.tensorrt as m\n"
        "from runtime.engines.base import BackendUnavailable\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert m.TensorRTBackend().available() is False\n"
        "try:\n"
        "    m.TensorRTBackend().version()\n"
        "except BackendUnavailable:\n"
        "    print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_available_is_false_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    assert TensorRTBackend().available() is False


def test_available_here_is_false_and_does_not_raise():
    backend = TensorRTBackend()
    if _tensorrt_installed() and backend.available():
        pytest.skip("this machine has TensorRT and a GPU")
    assert backend.available() is False


def _tensorrt_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def test_version_without_tensorrt_is_backend_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        TensorRTBackend().version()


@pytest.mark.parametrize("precision", ["int3", "int8", "bf16", "FP16", ""])
def test_build_rejects_unknown_precision_before_tensorrt(tmp_path, monkeypatch, precision):
    # Neither TensorRT nor the ONNX file is needed to reject the options.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ValueError, match="precision"):
        TensorRTBackend().build(
            tmp_path / "absent.onnx", tmp_path / "out", BuildOptions(precision=precision)
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("max_batch", "opt_batch", "extra"),
    [(0, 1, {}), (4, 5, {}), (4, 0, {}), (4, 2, {"workspace_mib": 0})],
)
def test_build_rejects_bad_options(tmp_path, monkeypatch, max_batch, opt_batch, extra):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    options = BuildOptions(max_batch=max_batch, opt_batch=opt_batch, extra=extra)
    with pytest.raises(ValueError):
        TensorRTBackend().build(tmp_path / "absent.onnx", tmp_path / "out", options)


def test_build_missing_onnx_is_engine_error(tmp_path):
    with pytest.raises(EngineError, match=r"absent\.onnx"):
        TensorRTBackend().build(tmp_path / "absent.onnx", tmp_path / "out", BuildOptions())


def test_load_missing_plan_is_engine_error_naming_the_file(tmp_path):
    with pytest.raises(EngineError, match=PLAN_FILE):
        TensorRTBackend().load(tmp_path / "nothing-here", BuildOptions())


SPEC = TensorSpec("x", "float32", (-1, IN_F))
MAX = {"x": (8, IN_F)}


def test_check_feeds_accepts_batches_up_to_max():
    for batch in (1, 3, 8):
        (array,) = check_feeds([SPEC], {"x": _inputs(batch)}, MAX)
        assert array.shape == (batch, IN_F)
        assert array.flags.c_contiguous


def test_check_feeds_makes_views_contiguous():
    wide = np.zeros((4, IN_F * 2), np.float32)
    (array,) = check_feeds([SPEC], {"x": wide[:, ::2]}, MAX)
    assert array.flags.c_contiguous and array.shape == (4, IN_F)


def test_check_feeds_float64_is_not_cast_silently():
    with pytest.raises(EngineError) as err:
        check_feeds([SPEC], {"x": _inputs(2).astype(np.float64)}, MAX)
    message = str(err.value)
    assert "'x'" in message and "float32" in message and "float64" in message


def test_check_feeds_batch_over_max():
    with pytest.raises(EngineError, match=r"batch size 9 exceeds .*max_batch 8"):
        check_feeds([SPEC], {"x": _inputs(9)}, MAX)


@pytest.mark.parametrize(
    ("feeds", "pattern"),
    [
        ({}, r"missing \['x'\]"),
        ({"x": _inputs(2), "extra": _inputs(2)}, r"unknown \['extra'\]"),
        ({"x": np.zeros((0, IN_F), np.float32)}, "axis 0 is 0"),
        ({"x": np.zeros((2, IN_F + 1), np.float32)}, "expected shape"),
        ({"x": np.zeros((2, 1, IN_F), np.float32)}, "expected 2 dims"),
        ({"x": np.zeros((2, IN_F), np.int64)}, "expected dtype float32, got int64"),
    ],
)
def test_check_feeds_rejects(feeds, pattern):
    with pytest.raises(EngineError, match=pattern):
        check_feeds([SPEC], feeds, MAX)


# --- everywhere: the fp16 conversion TensorRT >= 11 builds use -----------------------------


def test_convert_to_fp16_keeps_float32_io_and_matches_reference(tmp_path):
    import onnx
    from onnx import TensorProto
    from onnx.reference import ReferenceEvaluator

    w, b = _mlp_onnx(tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    half = convert_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)  # types line up everywhere
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [TensorProto.FLOAT]
    assert {i.data_type for i in half.graph.initializer} == {TensorProto.FLOAT16}
    # The original is untouched.
    assert {i.data_type for i in model.graph.initializer} == {TensorProto.FLOAT}

    x = _inputs(5)
    (y,) = ReferenceEvaluator(half).run(None, {"x": x})
    assert y.dtype == np.float32 and y.shape == (5, OUT_F)
    np.testing.assert_allclose(y, _reference(x, w, b), atol=2e-2)


def test_convert_to_fp16_leaves_resize_scales_float32_and_converts_constants():
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["k"], value_float=0.5),
            helper.make_node("Mul", ["x", "k"], ["xk"]),
            helper.make_node("Resize", ["xk", "", "scales"], ["y"], mode="nearest"),
        ],
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
        initializer=[scales],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    half = convert_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    kept = {i.name: i.data_type for i in half.graph.initializer}
    assert kept == {"scales": TensorProto.FLOAT}
    x = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)
    (y,) = ReferenceEvaluator(half).run(None, {"x": x})
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, np.repeat(np.repeat(x * 0.5, 2, axis=2), 2, axis=3))


def test_convert_to_fp16_keeps_a_tiny_epsilon_nonzero():
    # x / (sum(x) + 1e-9): the guard became 0 in fp16 and an all-zero row (a text tier's
    # all-padding row) came out NaN; onnxconverter-common clamps to 1e-7 (review 175).
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["eps"], value_float=1e-9),
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),  # per row
            helper.make_node("Add", ["s", "eps"], ["d"]),
            helper.make_node("Div", ["x", "d"], ["y"]),
        ],
        "guarded",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    half = convert_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    x = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    session = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, [[0.25, 0.5, 0.25], [0.0, 0.0, 0.0]], atol=1e-3)


def test_an_fp16_tensorrt_key_names_the_converter_that_makes_its_graph(
    monkeypatch, install_trt, fake_cuda
):
    # onnxconverter-common of any version or the built-in pass made the graph of an fp16
    # plan, none of them in its key: two images on a shared volume built different engines
    # under one key, the first writer's served by both (review 175).
    import importlib.metadata

    from runtime.engines import fp16
    from runtime.repository.cache import engine_key

    install_trt()

    def key(precision="fp16"):
        return engine_key("ab" * 32, TensorRTBackend(), BuildOptions(precision=precision))[0]

    def installed(version):
        def read(name):
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version

        monkeypatch.setattr(importlib.metadata, "version", read)

    installed("1.16.0")
    first = key()
    installed("1.14.0")
    assert key() != first
    installed(None)
    builtin = key()
    monkeypatch.setattr(trt_module, "FP16_PASS", fp16.PASS_VERSION + 1)
    assert key() != builtin
    # the clamp the converter is called with is in the key: engines cached from the old
    # +-1e4 one are not reused (review helper-231)
    fields = engine_key("ab" * 32, TensorRTBackend(), BuildOptions(precision="fp16"))[1]
    assert fields["fp16_converter"]["max_finite_val"] == 65504.0
    assert (
        key("fp32") == key("fp32")
        and "fp16_converter" not in engine_key("ab" * 32, TensorRTBackend(), BuildOptions())[1]
    )


def test_a_tensorrt_key_names_the_devices_capability_sms_and_cuda_runtime(install_trt, fake_cuda):
    # A plan is tuned to its device and built under one CUDA runtime: a MIG slice bears its
    # GPU's name with fewer SMs, and the cu12 and cu13 builds of one TensorRT release share
    # its version - each served the other's engine under one key (session 70's list).
    from runtime.repository.cache import engine_key

    install_trt()

    def key():
        return engine_key("ab" * 32, TensorRTBackend(), BuildOptions())

    first, fields = key()
    assert {k: fields[k] for k in ("compute_capability", "sm_count", "cuda_runtime")} == {
        "compute_capability": "9.0", "sm_count": 132, "cuda_runtime": 12080}  # fmt: skip
    seen = {first}
    for change in ({"sm_count": 14}, {"runtime_version": 13000}, {"capability": (10, 0)}):
        for attr, value in change.items():
            setattr(fake_cuda, attr, value)
        seen.add(key()[0])
    assert len(seen) == 4  # each change is another engine


def test_convert_to_fp16_computes_a_float_range_in_float32_and_leaves_an_int_one():
    # Range has no float16: a float Range (positions as floats, from the input's length)
    # became an invalid graph, "Type 'tensor(float16)' of input parameter ... of operator
    # (Range) ... is invalid"; an int64 one (token positions) must stay int64.
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    consts = [numpy_helper.from_array(np.array(v, t), n) for n, v, t in (
        ("one", 1, np.int64), ("zero", 0.0, np.float32), ("step", 1.0, np.float32),
        ("izero", 0, np.int64), ("istep", 1, np.int64))]  # fmt: skip
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
        helper.make_node("Range", ["izero", "n", "istep"], ["positions"]),  # int64
        helper.make_node("Cast", ["positions"], ["pf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("Range", ["zero", "nf", "step"], ["r"]),  # float
        helper.make_node("Add", ["r", "pf"], ["r2"]),
        helper.make_node("Mul", ["x", "r2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "ranges", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t"])], consts,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    half = convert_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    x = np.ones((2, 4), np.float32)
    (y,) = ReferenceEvaluator(half).run(None, {"x": x})
    np.testing.assert_allclose(y, np.tile([0.0, 2.0, 4.0, 6.0], (2, 1)))


def test_convert_to_fp16_rejects_control_flow():
    import onnx  # noqa: F401 - the dev extra: fail, not skip
    from onnx import TensorProto, helper

    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        "cf",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(ValueError, match="subgraph"):
        convert_to_fp16(helper.make_model(graph))


# --- gpu, cuda-python only: the CUDA plumbing with a stub in place of TensorRT --------------


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        cudart = pytest.importorskip("cuda.cudart")  # GPU machines only
    return cudart


class _StubTRT:
    """The few ``tensorrt`` names TensorRTEngine uses (dtypes are numpy names here)."""

    __version__ = "10.13.0.35"  # load() refuses a TensorRT older than 10

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    @staticmethod
    def nptype(dtype):
        return np.dtype(dtype).type


class _StubEngine:
    """An 'engine' computing y = x for x: (batch<=8, 16) float32, on the GPU; with
    ``longest``, x: (batch<=8, length<=longest) float32, a sequence model's shape."""

    num_io_tensors = 2
    num_optimization_profiles = 4  # a plan built for up to 4 instances

    def __init__(self, cudart, longest: int | None = None) -> None:
        self.cudart = cudart
        self.shape = (-1, IN_F) if longest is None else (-1, -1)
        self.profile = [(1, IN_F), (4, IN_F), (8, IN_F)]
        if longest is not None:
            self.profile = [(1, 1), (4, longest // 2), (8, longest)]

    def get_tensor_name(self, i):
        return ("x", "y")[i]

    def is_shape_inference_io(self, name):
        return False

    def get_tensor_dtype(self, name):
        return "float32"

    def get_tensor_shape(self, name):
        return self.shape

    def get_tensor_mode(self, name):
        return _StubTRT.TensorIOMode.INPUT if name == "x" else _StubTRT.TensorIOMode.OUTPUT

    def get_tensor_profile_shape(self, name, profile):
        return self.profile

    def create_execution_context(self):
        return _StubContext(self.cudart)


class _StubContext:
    def __init__(self, cudart) -> None:
        self.cudart, self.shape, self.addresses = cudart, None, {}
        self.profile = 0  # a new context's

    def set_optimization_profile_async(self, index, stream) -> bool:
        assert isinstance(stream, int)
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shape

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream):
        assert isinstance(stream, int)
        nbytes = int(np.prod(self.shape)) * 4
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        (err,) = self.cudart.cudaMemcpyAsync(
            self.addresses["y"], self.addresses["x"], nbytes, kind, stream
        )
        return err == self.cudart.cudaError_t.cudaSuccess


@pytest.mark.gpu
def test_device_name_from_cuda_python():
    _cudart()
    name = TensorRTBackend().device()
    assert isinstance(name, str) and name and "\0" not in name


@pytest.mark.gpu
def test_engine_buffers_and_copies_with_stub(monkeypatch):
    from runtime.engines import tensorrt as module

    cudart = _cudart()
    monkeypatch.setitem(sys.modules, "tensorrt", _StubTRT)
    engine = TensorRTEngine(_StubEngine(cudart), module._Cuda(cudart), max_batch=6)
    assert engine.inputs == [TensorSpec("x", "float32", (-1, IN_F))]
    assert engine.outputs == [TensorSpec("y", "float32", (-1, IN_F))]
    assert engine.max_batch == 6  # the smaller of the options' 6 and the plan's 8
    for batch in (1, 4, 6):
        x = _inputs(batch, seed=batch)
        np.testing.assert_array_equal(engine.run({"x": x})["y"], x)
    with pytest.raises(EngineError, match="batch size 7"):
        engine.run({"x": _inputs(7)})
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(EngineError, match="closed"):
        engine.run({"x": _inputs(1)})


# --- everywhere: FAKES of tensorrt and cuda-python (neither can run on these machines) -----
#
# The fakes follow the documented Python APIs (tensorrt.Builder / IBuilderConfig /
# ITimingCache, cuda.bindings.runtime's "(error, *values)" returns). "Device" memory is host
# memory here, so copies really move bytes and the engine's results can be checked.

FAKE_GPU = "NVIDIA Fake H100 80GB HBM3"
FAKE_TRT_VERSION = "10.13.0.35"


class _FakeStream:
    """cudaStream_t stand-in: int() gives the handle, as the real one does."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __int__(self) -> int:
        return self.handle


class _FakeCudart(types.ModuleType):
    """FAKE ``cuda.bindings.runtime``: records allocations, copies and synchronisations."""

    class cudaError_t(enum.IntEnum):  # cuda-python's names
        cudaSuccess = 0
        cudaErrorInvalidValue = 1

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToHost = 0
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    cudaHostAllocDefault = 0

    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self.keep: dict[int, ctypes.Array] = {}  # never freed: a bug reads stale, not garbage
        self.device: dict[int, int] = {}  # live device allocations: address -> bytes
        self.pinned: dict[int, int] = {}  # live page-locked host allocations
        self.copies: list[tuple] = []  # (kind, dst, src, nbytes, stream handle)
        # Copies wait on their stream until it is synchronised, as a GPU's do: a read of a
        # pinned output before the synchronisation sees the previous contents.
        self.pending: dict[int, list[tuple[int, int, int]]] = {}
        self.syncs = 0
        self.streams: set[int] = set()
        self.capability, self.sm_count, self.runtime_version = (9, 0), 132, 12080  # an H100
        # Tests set these to make a call fail: fail_copy(kind, dst) -> bool for
        # cudaMemcpyAsync (nothing is queued then), fail_sync for cudaStreamSynchronize.
        self.fail_copy = None
        self.fail_sync = False

    def _ok(self, *values):
        return (self.cudaError_t.cudaSuccess, *values)

    def _alloc(self, table: dict[int, int], nbytes: int):
        buf = ctypes.create_string_buffer(nbytes)
        address = ctypes.addressof(buf)
        self.keep[address] = buf
        table[address] = nbytes
        return self._ok(address)

    def _free(self, table: dict[int, int], ptr: int):
        if table.pop(int(ptr), None) is None:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        return self._ok()

    def cudaMalloc(self, nbytes):
        return self._alloc(self.device, nbytes)

    def cudaFree(self, ptr):
        return self._free(self.device, ptr)

    def cudaHostAlloc(self, nbytes, flags):
        assert flags == self.cudaHostAllocDefault
        return self._alloc(self.pinned, nbytes)

    def cudaFreeHost(self, ptr):
        return self._free(self.pinned, ptr)

    cudaStreamNonBlocking = 1

    def cudaStreamCreateWithFlags(self, flags):
        assert flags == self.cudaStreamNonBlocking  # no implicit sync with stream 0
        stream = _FakeStream(1000 + len(self.streams))
        self.streams.add(int(stream))
        return self._ok(stream)

    def cudaStreamDestroy(self, stream):
        self.streams.discard(int(stream))
        return self._ok()

    def cudaStreamSynchronize(self, stream):
        if self.fail_sync:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        self.syncs += 1
        for dst, src, nbytes in self.pending.pop(int(stream), []):  # in stream order
            ctypes.memmove(dst, src, nbytes)
        return self._ok()

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        if self.fail_copy is not None and self.fail_copy(kind, int(dst)):
            return (self.cudaError_t.cudaErrorInvalidValue,)
        self.pending.setdefault(int(stream), []).append((int(dst), int(src), nbytes))
        self.copies.append((kind, int(dst), int(src), nbytes, int(stream)))
        return self._ok()

    def cudaGetDeviceCount(self):
        return self._ok(1)

    def cudaGetDevice(self):
        return self._ok(0)

    def cudaGetDeviceProperties(self, index):
        return self._ok(
            types.SimpleNamespace(name=FAKE_GPU.encode() + b"\0\0\0", major=self.capability[0],
                                  minor=self.capability[1], multiProcessorCount=self.sm_count)
        )  # fmt: skip

    def cudaRuntimeGetVersion(self):
        return self._ok(self.runtime_version)

    def cudaGetErrorString(self, err):
        return self._ok(b"fake error")


@pytest.fixture
def fake_cuda(monkeypatch):
    """The FAKE cuda-python, importable as ``cuda.bindings.runtime``."""
    rt = _FakeCudart()
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = rt
    package = types.ModuleType("cuda")
    package.bindings = bindings
    monkeypatch.setitem(sys.modules, "cuda", package)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    return rt


class _FakeTimingCache:
    """ITimingCache: a set of entries made on ``device``; serialize() is JSON, combine() a
    union. TensorRT refuses a cache of another device's properties unless told to ignore
    the mismatch (set_timing_cache / combine return False)."""

    def __init__(self, entries=(), device: str = FAKE_GPU) -> None:
        self.entries = set(entries)
        self.device = device

    @classmethod
    def parse(cls, data: bytes) -> _FakeTimingCache:
        if not data:
            return cls()
        doc = json.loads(bytes(data).decode())
        return cls(doc["entries"], doc.get("device", FAKE_GPU))

    def serialize(self) -> bytes:
        return json.dumps({"entries": sorted(self.entries), "device": self.device}).encode()

    def combine(self, other: _FakeTimingCache, ignore_mismatch: bool) -> bool:
        if other.device != self.device and not ignore_mismatch:
            return False
        self.entries |= other.entries
        return True


class _FakeConfig:
    """IBuilderConfig: records flags, and the timing cache handed to it."""

    def __init__(self) -> None:
        self.set_flags: set[str] = set()
        self.cleared_flags: set[str] = set()
        self.loaded: list[bytes] = []  # every create_timing_cache(data) call's data
        self.cache: _FakeTimingCache | None = None
        self.profiles: list[_FakeProfile] = []

    def set_memory_pool_limit(self, pool, nbytes) -> None:
        assert pool == "WORKSPACE" and nbytes > 0

    def set_flag(self, flag) -> None:
        self.set_flags.add(flag)

    def clear_flag(self, flag) -> None:
        self.cleared_flags.add(flag)

    def add_optimization_profile(self, profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data) -> _FakeTimingCache:
        self.loaded.append(bytes(data))
        return _FakeTimingCache.parse(data)  # ValueError for garbage, like a corrupt file

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        if cache.device != FAKE_GPU and not ignore_mismatch:
            return False
        self.cache = cache
        return True


class _FakeNetwork:
    """INetworkDefinition: its inputs are the parsed ONNX graph's, named dims read as -1."""

    def __init__(self, flags: int) -> None:
        self.flags, self.parsed = flags, None

    def _inputs(self) -> list:
        import onnx

        graph = onnx.load_from_string(self.parsed).graph
        weights = {i.name for i in graph.initializer}
        return [
            types.SimpleNamespace(
                name=i.name,
                shape=tuple(
                    d.dim_value if d.HasField("dim_value") else -1
                    for d in i.type.tensor_type.shape.dim
                ),
                is_shape_tensor=False,
            )
            for i in graph.input
            if i.name not in weights
        ]

    @property
    def num_inputs(self) -> int:
        return len(self._inputs())

    def get_input(self, i):
        return self._inputs()[i]


class _FakeProfile:
    """IOptimizationProfile: records set_shape(name, min, opt, max)."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, lo, opt, hi) -> None:
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), (lo, opt, hi)
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


def _fake_trt(*, strongly_typed: bool = True, fp16_flag: bool = True, version=FAKE_TRT_VERSION):
    """A FAKE ``tensorrt`` module; ``.record`` keeps its networks and configs.

    strongly_typed + fp16_flag: TensorRT 10.12+ (weak typing deprecated); strongly_typed
    alone: 11.x (FP16 flag removed); neither: a TensorRT that drops the flag it ignores.
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.record = types.SimpleNamespace(networks=[], configs=[], during_build=None)

    class Severity(enum.IntEnum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        def __init__(self) -> None:
            pass

    ILogger.Severity = Severity
    trt.ILogger = ILogger
    # Real values: EXPLICIT_BATCH = 0 (deprecated), STRONGLY_TYPED = 1.
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(
        **({"STRONGLY_TYPED": 1} if strongly_typed else {})
    )
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", **({"FP16": "FP16"} if fp16_flag else {}))
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class Builder:
        def __init__(self, logger) -> None:
            assert isinstance(logger, ILogger)

        def create_network(self, flags: int) -> _FakeNetwork:
            trt.record.networks.append(_FakeNetwork(flags))
            return trt.record.networks[-1]

        def create_builder_config(self) -> _FakeConfig:
            trt.record.configs.append(_FakeConfig())
            return trt.record.configs[-1]

        def create_optimization_profile(self) -> _FakeProfile:
            return _FakeProfile()

        def build_serialized_network(self, network, config) -> bytes:
            if trt.record.during_build is not None:
                trt.record.during_build()
            # One new timing per distinct network: what a real build adds to the cache.
            config.cache.entries.add(f"tactic-{len(network.parsed)}-{network.flags}")
            return b"FAKE PLAN"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger) -> None:
            self.network = network

        def parse(self, data, path) -> bool:
            self.network.parsed = bytes(data)
            return True

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


@pytest.fixture
def install_trt(monkeypatch, fake_cuda):
    """Install a FAKE tensorrt (and the fake cuda-python); returns it."""

    def install(**kwargs):
        trt = _fake_trt(**kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        # The logger is a process-wide singleton bound to the tensorrt module it was made with.
        monkeypatch.setattr(trt_module, "_logger", None)
        return trt

    return install


def _parsed_model(network):
    import onnx

    return onnx.load_from_string(network.parsed)


@pytest.mark.parametrize("fp16_flag", [True, False], ids=["trt10.12+", "trt11"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_is_strongly_typed_and_never_sets_fp16_flag(
    tmp_path, install_trt, precision, fp16_flag
):
    from onnx import TensorProto

    trt = install_trt(strongly_typed=True, fp16_flag=fp16_flag)
    _mlp_onnx(tmp_path / "model.onnx")
    options = BuildOptions(precision=precision, max_batch=8, opt_batch=4)
    files = TensorRTBackend().build(tmp_path / "model.onnx", tmp_path / "engines" / "k", options)
    assert files == [PLAN_FILE]
    assert (tmp_path / "engines" / "k" / PLAN_FILE).read_bytes() == b"FAKE PLAN"
    (network,), (config,) = trt.record.networks, trt.record.configs
    assert network.flags == 1 << 1  # 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert "FP16" not in config.set_flags
    model = _parsed_model(network)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT]
    weights = {i.data_type for i in model.graph.initializer}
    if precision == "fp16":  # the precision is in the graph: fp16 weights, fp32 I/O
        assert weights == {TensorProto.FLOAT16}
        assert config.cleared_flags == set()
    else:  # fp32: the ONNX file as it is, TF32 off
        assert network.parsed == (tmp_path / "model.onnx").read_bytes()
        assert config.cleared_flags == {"TF32"}


def test_build_where_tensorrt_has_no_strongly_typed_flag_left_stays_strongly_typed(
    tmp_path, install_trt
):
    # 11.x ignores STRONGLY_TYPED (every network is); a release without the flag gets no
    # flags, and fp16 is still put into the graph - never the weakly typed FP16 flag.
    from onnx import TensorProto

    trt = install_trt(strongly_typed=False, fp16_flag=True, version="12.0.0")
    _mlp_onnx(tmp_path / "model.onnx")
    options = BuildOptions(precision="fp16", max_batch=8, opt_batch=4)
    TensorRTBackend().build(tmp_path / "model.onnx", tmp_path / "engines" / "k", options)
    (network,), (config,) = trt.record.networks, trt.record.configs
    assert network.flags == 0
    assert config.set_flags == set()
    model = _parsed_model(network)
    assert {i.data_type for i in model.graph.initializer} == {TensorProto.FLOAT16}


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0.1", "unknown"])
def test_tensorrt_older_than_10_is_unavailable_and_says_to_upgrade(tmp_path, install_trt, version):
    # TensorRT 8.6 gives only the first execution context an optimisation profile (several
    # contexts: instances > 1), and onnx-tensorrt 8.x turns int64 inputs into int32, so
    # text tiers failed; the backend claimed to support it (review 125).
    trt = install_trt(strongly_typed=False, version=version)
    backend = TensorRTBackend()
    reason = backend.unavailable_reason()
    assert reason is not None and backend.available() is False
    assert f"TensorRT {version} found; innfer needs TensorRT 10 or newer" in reason
    assert "pip install 'tensorrt>=10'" in reason
    _mlp_onnx(tmp_path / "model.onnx")
    with pytest.raises(BackendUnavailable, match=r"needs TensorRT 10 or newer"):
        TensorRTBackend().build(tmp_path / "model.onnx", tmp_path / "engines" / "k", BuildOptions())
    assert trt.record.networks == [] and not (tmp_path / "engines").exists()
    (tmp_path / PLAN_FILE).write_bytes(b"plan")
    with pytest.raises(BackendUnavailable, match=r"needs TensorRT 10 or newer"):
        TensorRTBackend().load(tmp_path, BuildOptions())


@pytest.mark.parametrize("version", ["10.0.1.6", "10.13.0.35", "11.0.0"])
def test_tensorrt_10_and_newer_is_available(install_trt, version):
    install_trt(version=version)
    assert TensorRTBackend().unavailable_reason() is None


def _fake_onnxconverter(monkeypatch):
    """A FAKE onnxconverter_common package whose converter records its calls."""
    calls = []

    def convert_float_to_float16(model, **kwargs):
        calls.append(kwargs)
        half = convert_to_fp16(model)
        half.producer_name = "fake-onnxconverter-common"
        return half

    float16 = types.ModuleType("onnxconverter_common.float16")
    float16.convert_float_to_float16 = convert_float_to_float16
    package = types.ModuleType("onnxconverter_common")
    package.float16 = float16
    monkeypatch.setitem(sys.modules, "onnxconverter_common", package)
    monkeypatch.setitem(sys.modules, "onnxconverter_common.float16", float16)
    return calls


def test_fp16_build_uses_onnxconverter_common_when_installed(
    tmp_path, install_trt, monkeypatch, caplog
):
    trt = install_trt()
    calls = _fake_onnxconverter(monkeypatch)
    _mlp_onnx(tmp_path / "model.onnx")
    options = BuildOptions(precision="fp16", max_batch=8, opt_batch=4)
    with caplog.at_level(logging.INFO, logger="innfer.engines.tensorrt"):
        TensorRTBackend().build(tmp_path / "model.onnx", tmp_path / "engines" / "k", options)
    # fp16's own range, not the converter's default +-1e4 (review helper-231)
    assert calls == [{"keep_io_types": True, "max_finite_val": 65504.0, "min_positive_val": 1e-7}]
    assert _parsed_model(trt.record.networks[0]).producer_name == "fake-onnxconverter-common"
    assert "with onnxconverter-common" in caplog.text


def test_fp16_build_falls_back_to_the_builtin_pass(tmp_path, install_trt, monkeypatch, caplog):
    from onnx import TensorProto

    trt = install_trt()
    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)  # not installed
    _mlp_onnx(tmp_path / "model.onnx")
    options = BuildOptions(precision="fp16", max_batch=8, opt_batch=4)
    with caplog.at_level(logging.INFO, logger="innfer.engines.tensorrt"):
        TensorRTBackend().build(tmp_path / "model.onnx", tmp_path / "engines" / "k", options)
    model = _parsed_model(trt.record.networks[0])
    assert {i.data_type for i in model.graph.initializer} == {TensorProto.FLOAT16}
    assert "with the built-in pass" in caplog.text


def test_fp16_conversion_with_the_real_onnxconverter_common(tmp_path):
    # Runs where the optional dependency is installed (pip install innfer[gpu]).
    import onnx
    import onnxconverter_common  # noqa: F401 - the dev extra: fail, not skip
    from onnx import TensorProto
    from onnx.reference import ReferenceEvaluator

    w, b = _mlp_onnx(tmp_path / "m.onnx")
    half = onnx.load_from_string(trt_module._fp16_model_bytes(tmp_path / "m.onnx"))
    onnx.checker.check_model(half, full_check=True)
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [TensorProto.FLOAT]
    assert TensorProto.FLOAT16 in {i.data_type for i in half.graph.initializer}
    x = _inputs(5)
    (y,) = ReferenceEvaluator(half).run(None, {"x": x})
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, _reference(x, w, b), atol=2e-2)


def test_a_graph_already_computing_in_fp16_is_converted_by_the_builtin_pass(tmp_path, caplog):
    # onnxconverter-common refuses any graph with fp16 in it ("already converted to float16":
    # x.half() inside, fp16 I/O), and the build failed with advice about Range, where the
    # built-in pass converts it (review helper-268). The real converter, where installed.
    import onnx
    import onnxconverter_common  # noqa: F401 - the dev extra: fail, not skip
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    w = numpy_helper.from_array(np.full((4, 3), 0.5, np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
         helper.make_node("MatMul", ["xh", "w"], ["yh"]),
         helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], [w],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "m.onnx"))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="innfer.engines.tensorrt"):
        half = onnx.load_from_string(trt_module._fp16_model_bytes(tmp_path / "m.onnx"))
    assert "it refused it: " in caplog.text and "built-in pass" in caplog.text
    onnx.checker.check_model(half, full_check=True)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(ReferenceEvaluator(half).run(None, {"x": x})[0], 2.0)


def test_fp16_conversion_says_once_what_it_clamped_instead_of_a_warning_each(tmp_path, caplog):
    # onnxconverter-common warned "the float32 number 9.99e-13 will be truncated to 1e-07"
    # once per constant (and "-10000.0 will be truncated to -10000.0"): three UserWarnings on
    # every text tier's build, for a harmless LayerNorm epsilon. Now one INFO line.
    import warnings

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    eps = numpy_helper.from_array(np.array([1e-12], np.float32), "eps")
    same = numpy_helper.from_array(np.array([-10000.0], np.float32), "same")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "eps"], ["h"]),
            helper.make_node("Add", ["h", "same"], ["y"]),
        ],
        "eps",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [eps, same],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "eps.onnx")
    with (
        warnings.catch_warnings(record=True) as caught,
        caplog.at_level(logging.INFO, logger="innfer.engines.tensorrt"),
    ):
        warnings.simplefilter("always")
        half = onnx.load_from_string(trt_module._fp16_model_bytes(tmp_path / "eps.onnx"))
    assert not [w for w in caught if "truncated" in str(w.message)], [
        str(w.message) for w in caught
    ]
    clamped = [r.getMessage() for r in caplog.records if "clamped" in r.getMessage()]
    assert len(clamped) == 1 and "1 constant(s)" in clamped[0] and "1e-12 -> 1e-07" in clamped[0]
    assert TensorProto.FLOAT16 in {i.data_type for i in half.graph.initializer}


def test_timing_cache_name_is_a_safe_file_name_per_device_and_version():
    assert timing_cache_name("NVIDIA H100 80GB HBM3", "10.13.0.35") == (
        "timing-nvidia-h100-80gb-hbm3-trt10.13.0.35.cache"
    )
    assert timing_cache_name("../../etc/passwd", "11.0") == "timing-etc-passwd-trt11.0.cache"
    assert timing_cache_name("", "") == "timing-unknown-trtunknown.cache"
    assert timing_cache_name("NVIDIA A100", "10.13") != timing_cache_name("NVIDIA H100", "10.13")


def test_timing_cache_is_per_device_and_version_and_reused(tmp_path, install_trt):
    _mlp_onnx(tmp_path / "model.onnx")
    engines = tmp_path / "engines"
    trt = install_trt()
    backend = TensorRTBackend()
    backend.build(tmp_path / "model.onnx", engines / "a", BuildOptions(precision="fp32"))
    cache = engines / timing_cache_name(FAKE_GPU, FAKE_TRT_VERSION)
    assert sorted(p.name for p in engines.glob("timing-*")) == [cache.name]
    assert "nvidia-fake-h100-80gb-hbm3" in cache.name and "trt10.13.0.35" in cache.name
    first = cache.read_bytes()
    assert len(_FakeTimingCache.parse(first).entries) == 1

    # A second build on this device and version starts from the saved timings.
    backend.build(tmp_path / "model.onnx", engines / "b", BuildOptions(precision="fp32"))
    assert trt.record.configs[1].loaded[0] == first
    assert (  # (the same layers: the same entries, kept)
        _FakeTimingCache.parse(cache.read_bytes()).entries == _FakeTimingCache.parse(first).entries
    )
    # An fp16 build's timings are its own (TF32 is on there, off in fp32 builds: NVIDIA's
    # guide says a cache is specific to such flags - review helper-268)
    backend.build(tmp_path / "model.onnx", engines / "h", BuildOptions(precision="fp16"))
    assert trt.record.configs[2].loaded == [b""]
    half = engines / timing_cache_name(FAKE_GPU, FAKE_TRT_VERSION, "fp16")
    assert half.is_file() and half.name.endswith("-fp16.cache")

    # Another TensorRT version gets its own file and leaves this one alone.
    before = cache.read_bytes()
    trt12 = install_trt(version="10.14.1")
    backend.build(tmp_path / "model.onnx", engines / "c", BuildOptions(precision="fp32"))
    assert trt12.record.configs[0].loaded == [b""]  # started empty
    assert (engines / timing_cache_name(FAKE_GPU, "10.14.1")).is_file()
    assert cache.read_bytes() == before
    assert not list(engines.glob(".*tmp"))  # atomic writes leave no temporaries


def test_timing_cache_merges_what_another_build_saved_meanwhile(tmp_path, install_trt):
    _mlp_onnx(tmp_path / "model.onnx")
    engines = tmp_path / "engines"
    engines.mkdir()
    cache = engines / timing_cache_name(FAKE_GPU, FAKE_TRT_VERSION)
    trt = install_trt()
    # Another process saves its timings while this build runs.
    trt.record.during_build = lambda: cache.write_bytes(
        _FakeTimingCache({"other-process"}).serialize()
    )
    TensorRTBackend().build(tmp_path / "model.onnx", engines / "a", BuildOptions())
    entries = _FakeTimingCache.parse(cache.read_bytes()).entries
    assert "other-process" in entries and len(entries) == 2


def test_two_builds_saving_their_timings_at_once_both_keep_them(tmp_path):
    # (TensorRT stand-ins: no GPU here.) Each save read the file, merged and renamed: two
    # replicas finishing together both read it before either's rename, and the first's
    # timings were lost. Serialising is where a save spends its time between the two.
    class Slow(_FakeTimingCache):
        def serialize(self) -> bytes:
            time.sleep(0.3)
            return super().serialize()

    path = tmp_path / timing_cache_name(FAKE_GPU, FAKE_TRT_VERSION)
    save = trt_module.TensorRTBackend._save_timing_cache
    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(save, _FakeConfig(), Slow({f"build-{i}"}), path) for i in (1, 2)]:
            f.result()
    assert _FakeTimingCache.parse(path.read_bytes()).entries == {"build-1", "build-2"}


def test_a_timing_cache_of_another_device_is_neither_used_nor_merged(tmp_path, install_trt, caplog):
    # Same file name (the same GPU model and TensorRT version), other device properties:
    # TensorRT warns that combining such caches "may lead to functional/performance bugs".
    _mlp_onnx(tmp_path / "model.onnx")
    engines = tmp_path / "engines"
    engines.mkdir()
    cache = engines / timing_cache_name(FAKE_GPU, FAKE_TRT_VERSION)
    cache.write_bytes(_FakeTimingCache({"elsewhere"}, device="another").serialize())
    trt = install_trt()
    with caplog.at_level(logging.INFO, logger="innfer.engines.tensorrt"):
        TensorRTBackend().build(tmp_path / "model.onnx", engines / "a", BuildOptions())
    assert "made on another device/version" in caplog.text
    assert trt.record.configs[0].cache.entries.isdisjoint({"elsewhere"})  # started afresh
    saved = _FakeTimingCache.parse(cache.read_bytes())
    assert "elsewhere" not in saved.entries and saved.device == FAKE_GPU  # replaced, not merged
    assert "other device/version" in caplog.text  # (the merge said why it dropped theirs)


def test_unreadable_timing_cache_is_replaced(tmp_path, install_trt, caplog):
    _mlp_onnx(tmp_path / "model.onnx")
    engines = tmp_path / "engines"
    engines.mkdir()
    cache = engines / timing_cache_name(FAKE_GPU, FAKE_TRT_VERSION)
    cache.write_bytes(b"\x00not a timing cache")
    install_trt()
    with caplog.at_level(logging.WARNING, logger="innfer.engines.tensorrt"):
        TensorRTBackend().build(tmp_path / "model.onnx", engines / "a", BuildOptions())
    assert "unreadable timing cache" in caplog.text
    assert len(_FakeTimingCache.parse(cache.read_bytes()).entries) == 1


def test_engine_stages_through_pinned_host_buffers(monkeypatch, fake_cuda):
    # FAKE CUDA (host memory standing in for the GPU) and the stub engine computing y = x.
    rt = fake_cuda
    monkeypatch.setitem(sys.modules, "tensorrt", _StubTRT)
    engine = TensorRTEngine(_StubEngine(rt), trt_module._Cuda(rt), max_batch=6)
    nbytes = 6 * IN_F * 4  # max_batch rows of 16 float32, per tensor
    assert sorted(rt.pinned.values()) == [nbytes, nbytes]  # one pinned buffer for x, one for y
    assert sorted(rt.device.values()) == [nbytes, nbytes]
    kinds = rt.cudaMemcpyKind
    first = None
    for batch in (1, 4, 6):
        x = _inputs(batch, seed=batch)
        copies, syncs = len(rt.copies), rt.syncs
        y = engine.run({"x": x})["y"]
        np.testing.assert_array_equal(y, x)
        first = y if first is None else first
        assert rt.syncs == syncs + 1  # one synchronisation per run
        h2d, d2d, d2h = rt.copies[copies:]
        assert h2d[0] == kinds.cudaMemcpyHostToDevice and h2d[2] in rt.pinned
        assert d2d[0] == kinds.cudaMemcpyDeviceToDevice  # the stub engine's "compute"
        assert d2h[0] == kinds.cudaMemcpyDeviceToHost and d2h[1] in rt.pinned
        assert h2d[3] == d2h[3] == batch * IN_F * 4  # only the actual batch moves
        assert {c[4] for c in (h2d, d2d, d2h)} == rt.streams  # all on the engine's stream
    # Results are copies: the next runs overwrote the staging buffers, not the first result.
    np.testing.assert_array_equal(first, _inputs(1, seed=1))
    engine.close()
    assert rt.pinned == {} and rt.device == {} and rt.streams == set()
    engine.close()  # idempotent
    with pytest.raises(EngineError, match="closed"):
        engine.run({"x": _inputs(1)})


def _token_onnx(path: Path, vocab: int = 30, dim: int = 4) -> None:
    """A sequence model: ids, mask (batch, length) int64 -> (batch, dim) masked mean of an
    embedding table, dynamic batch and length as exported for a text tier."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).standard_normal((vocab, dim)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["h"]),  # (B, T, dim)
            helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),  # (B, T, 1)
            helper.make_node("Mul", ["h", "m3"], ["hm"]),
            helper.make_node("ReduceSum", ["hm", "one"], ["y"], keepdims=0),
        ],
        "tokens",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "length"]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "length"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([2], np.int64), "axis"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def test_profile_covers_the_batch_axis_of_a_fixed_shape_model(tmp_path, install_trt):
    trt = install_trt()
    _mlp_onnx(tmp_path / "model.onnx")
    options = BuildOptions(max_batch=8, opt_batch=4)
    TensorRTBackend().build(tmp_path / "model.onnx", tmp_path / "engines" / "k", options)
    ((profile,),) = [c.profiles for c in trt.record.configs]
    assert profile.shapes == {"x": ((1, IN_F), (4, IN_F), (8, IN_F))}


def test_profile_covers_the_sequence_axis_of_a_token_model(tmp_path, install_trt):
    # Token ids and mask (batch, length): both axes dynamic, both inputs the same range,
    # since the server pads a batch's inputs to one length.
    trt = install_trt()
    _token_onnx(tmp_path / "model.onnx")
    options = BuildOptions(max_batch=16, opt_batch=4, sequence=(1, 64, 256))
    assert TensorRTBackend().build(
        tmp_path / "model.onnx", tmp_path / "engines" / "k", options
    ) == [PLAN_FILE]
    ((profile,),) = [c.profiles for c in trt.record.configs]
    expected = ((1, 1), (4, 64), (16, 256))
    assert profile.shapes == {"ids": expected, "mask": expected}


def test_a_plan_has_one_profile_per_instance_and_each_context_takes_its_own(
    tmp_path, install_trt, monkeypatch, fake_cuda
):
    # TensorRT: "If the engine supports dynamic shapes, each execution context in concurrent
    # use must use a separate optimization profile" (NvInferRuntime.h, IExecutionContext).
    # Every context was left on profile 0 and run at once (review 175).
    from runtime.engines import tensorrt as module
    from runtime.repository.cache import engine_key

    trt = install_trt()
    _mlp_onnx(tmp_path / "model.onnx")
    options = BuildOptions(max_batch=8, opt_batch=4, instances=3)
    TensorRTBackend().build(tmp_path / "model.onnx", tmp_path / "engines" / "k", options)
    (profiles,) = [c.profiles for c in trt.record.configs]
    assert [p.shapes for p in profiles] == [{"x": ((1, IN_F), (4, IN_F), (8, IN_F))}] * 3
    key = lambda n: engine_key("ab" * 32, TensorRTBackend(), BuildOptions(instances=n))[1]  # noqa: E731
    assert "profiles" not in key(1) and key(3)["profiles"] == 3  # another plan: another key

    contexts = []
    plan = _StubEngine(fake_cuda)
    make = plan.create_execution_context
    plan.create_execution_context = lambda: contexts.append(make()) or contexts[-1]
    stub = types.SimpleNamespace(**vars(_StubTRT))
    stub.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda d: plan)
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    monkeypatch.setattr(module, "_trt_logger", lambda trt: None)
    (tmp_path / PLAN_FILE).write_bytes(b"plan")
    engine = TensorRTBackend().load(tmp_path, options)
    assert [c.profile for c in contexts] == [0, 1, 2] and engine.concurrent_runs == 3
    engine.close()


def test_more_instances_than_the_plan_has_profiles_run_as_many_as_it_has(
    monkeypatch, fake_cuda, caplog
):
    monkeypatch.setitem(sys.modules, "tensorrt", _StubTRT)
    plan = _StubEngine(fake_cuda)
    plan.num_optimization_profiles = 2
    with caplog.at_level(logging.WARNING, logger="innfer.engines.tensorrt"):
        engine = TensorRTEngine(plan, trt_module._Cuda(fake_cuda), max_batch=4, contexts=3)
    assert engine.concurrent_runs == 2
    assert "3 contexts asked for, but the plan has 2 optimisation profile(s)" in caplog.text
    engine.close()


def test_token_model_without_a_sequence_profile_is_refused_with_the_fix(tmp_path, install_trt):
    install_trt()
    _token_onnx(tmp_path / "model.onnx")
    with pytest.raises(EngineError, match=r"'ids'.*\(-1, -1\).*sequence profile"):
        TensorRTBackend().build(tmp_path / "model.onnx", tmp_path / "out", BuildOptions())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sequence", [(0, 4, 8), (1, 9, 8), (4, 2, 8), (1, 2), (1.0, 2, 3)])
def test_build_rejects_a_bad_sequence_profile_before_tensorrt(tmp_path, monkeypatch, sequence):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ValueError, match="sequence must be"):
        TensorRTBackend().build(
            tmp_path / "m.onnx", tmp_path / "out", BuildOptions(sequence=sequence)
        )


def test_engine_runs_any_length_up_to_the_plan_and_refuses_longer(monkeypatch, fake_cuda):
    # The stub plan: x (batch <= 8, length <= 32); buffers hold the longest batch once.
    rt = fake_cuda
    monkeypatch.setitem(sys.modules, "tensorrt", _StubTRT)
    engine = TensorRTEngine(_StubEngine(rt, longest=32), trt_module._Cuda(rt), max_batch=4)
    assert engine.inputs == [TensorSpec("x", "float32", (-1, -1))]
    assert sorted(rt.device.values()) == [4 * 32 * 4] * 2  # max_batch 4 rows of 32 floats
    for shape in ((1, 1), (3, 7), (4, 32), (2, 5)):
        x = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(engine.run({"x": x})["y"], x)
    with pytest.raises(EngineError, match=r"axis 1 is 33, must be 1\.\.32"):
        engine.run({"x": np.zeros((2, 33), np.float32)})
    engine.close()


def test_backend_available_with_fake_tensorrt_and_cuda(install_trt):
    install_trt()
    backend = TensorRTBackend()
    assert backend.available() is True
    assert backend.device() == FAKE_GPU
    assert backend.version() == FAKE_TRT_VERSION


def test_a_model_whose_backend_is_unavailable_is_told_what_is_missing(
    tmp_path, monkeypatch, install_trt, fake_cuda
):
    # It said "none of the backends ['tensorrt'] is available on this machine" alone: not
    # whether tensorrt, cuda-python or a GPU was missing (review helper-107).
    from runtime.repository import Repository, RepositoryError
    from runtime.repository.config import ModelConfig

    config = ModelConfig.from_dict({
        "inputs": [{"name": "x", "shape": [4]}], "outputs": [{"name": "y", "shape": [2]}],
        "tiers": [{"name": "w100", "width": 1.0}], "backends": ["tensorrt"],
    }, source="m/model.yaml")  # fmt: skip
    repo = Repository(tmp_path)
    install_trt()
    monkeypatch.setattr(
        fake_cuda, "cudaGetDeviceCount", lambda: (fake_cuda.cudaError_t.cudaSuccess, 0)
    )
    with pytest.raises(RepositoryError, match=r"\(tensorrt: no CUDA device on this machine; the "):
        repo.choose_backend(config)
    cuda = ("cuda", "cuda.bindings", "cuda.bindings.runtime")
    for missing, says in (
        (cuda, "pip install cuda-python"),
        (("tensorrt",), "pip install tensorrt"),
    ):
        for module in missing:
            monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError
        with pytest.raises(RepositoryError, match=f"tensorrt: .*{says}"):
            repo.choose_backend(config)


# --- gpu + TensorRT: real builds ----------------------------------------------------------


@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("tensorrt")  # GPU machines only (the gpu extra, not dev)

    backend = TensorRTBackend()
    if not backend.available():
        pytest.skip("tensorrt is installed but no CUDA device is usable")
    return backend


@pytest.fixture(scope="module")
def built(backend, tmp_path_factory):
    """An fp32 engine (max_batch 8) for the MLP, built once for this module."""
    root = tmp_path_factory.mktemp("trt")
    w, b = _mlp_onnx(root / "model.onnx")
    options = BuildOptions(precision="fp32", max_batch=8, opt_batch=4)
    files = backend.build(root / "model.onnx", root / "engines" / "fp32", options)
    return root, w, b, options, files


@pytest.mark.gpu
def test_fp32_build_writes_plan_and_timing_cache(backend, built):
    root, _, _, _, files = built
    assert files == [PLAN_FILE]
    assert (root / "engines" / "fp32" / PLAN_FILE).stat().st_size > 0
    name = timing_cache_name(backend.device(), backend.version())
    assert (root / "engines" / name).stat().st_size > 0


@pytest.mark.gpu
def test_fp32_engine_matches_numpy(backend, built):
    root, w, b, options, _ = built
    with backend.load(root / "engines" / "fp32", options) as engine:
        assert engine.backend == "tensorrt"
        assert engine.inputs == [TensorSpec("x", "float32", (-1, IN_F))]
        assert engine.outputs == [TensorSpec("y", "float32", (-1, OUT_F))]
        for batch in (1, 3, 8):
            x = _inputs(batch, seed=batch)
            y = engine.run({"x": x})["y"]
            assert y.dtype == np.float32 and y.shape == (batch, OUT_F)
            np.testing.assert_allclose(y, _reference(x, w, b), atol=1e-4)


@pytest.mark.gpu
def test_fp16_engine_matches_numpy(backend, built):
    root, w, b, _, _ = built
    options = BuildOptions(precision="fp16", max_batch=8, opt_batch=4)
    # A second build on this machine (fp16: a timing cache of its own, beside fp32's).
    assert backend.build(root / "model.onnx", root / "engines" / "fp16", options) == [PLAN_FILE]
    with backend.load(root / "engines" / "fp16", options) as engine:
        assert engine.inputs == [TensorSpec("x", "float32", (-1, IN_F))]  # I/O stays fp32
        x = _inputs(8)
        y = engine.run({"x": x})["y"]
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, _reference(x, w, b), atol=2e-2)


@pytest.mark.gpu
def test_run_rejects_batch_over_max_and_float64(backend, built):
    root, _, _, options, _ = built
    with backend.load(root / "engines" / "fp32", options) as engine:
        with pytest.raises(EngineError, match="max_batch 8"):
            engine.run({"x": _inputs(9)})
        with pytest.raises(EngineError, match="float64"):
            engine.run({"x": _inputs(2).astype(np.float64)})
        assert engine.run({"x": _inputs(2)})["y"].shape == (2, OUT_F)  # still usable


@pytest.mark.gpu
def test_run_is_thread_safe(backend, built):
    root, w, b, options, _ = built
    errors = []
    with backend.load(root / "engines" / "fp32", options) as engine:

        def worker(seed):
            try:
                for i in range(20):
                    x = _inputs(1 + (seed + i) % 8, seed=seed * 100 + i)
                    np.testing.assert_allclose(
                        engine.run({"x": x})["y"], _reference(x, w, b), atol=1e-4
                    )
            except Exception as exc:  # surfaced below: pytest does not see thread errors
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


@pytest.mark.gpu
def test_corrupt_plan_is_engine_error(backend, built, tmp_path):
    _, _, _, options, _ = built
    (tmp_path / PLAN_FILE).write_bytes(b"not a TensorRT plan" * 100)
    with pytest.raises(EngineError, match=PLAN_FILE):
        backend.load(tmp_path, options)


@pytest.mark.gpu
def test_unparseable_onnx_is_engine_error(backend, tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(EngineError, match=r"bad\.onnx"):
        backend.build(tmp_path / "bad.onnx", tmp_path / "out", BuildOptions())


def test_fp16_conversion_of_a_text_tier_is_a_valid_graph(tmp_path, caplog):
    # onnxconverter-common 1.15-1.16 keep Cast(to=float) nodes but declare their outputs
    # fp16 (its issue 320); a text tier casts its attention mask, so the graph handed to a
    # strongly typed TensorRT network mixed fp32 and fp16 operands. The converter's graph is
    # checked and, where invalid, the built-in pass builds it. (Real converter, real text
    # tier, ONNX Runtime as the judge: no GPU needed.)
    import onnx
    import onnxconverter_common  # noqa: F401 - the dev extra: fail, not skip
    import onnxruntime as ort
    import torch
    from onnx import TensorProto
    from textmodel import TinyEmbedder

    from runtime.build.export import export_onnx

    torch.manual_seed(0)
    specs = [("input_ids", (-1,), torch.int64), ("attention_mask", (-1,), torch.int64)]
    path = tmp_path / "model.onnx"
    path.write_bytes(export_onnx(TinyEmbedder().eval(), specs, ["embedding"]))
    with caplog.at_level(logging.INFO, logger="innfer.engines.tensorrt"):
        data = trt_module._fp16_model_bytes(path)
    half = onnx.load_from_string(data)
    onnx.checker.check_model(half, full_check=True)
    assert TensorProto.FLOAT16 in {i.data_type for i in half.graph.initializer}
    ids = np.array([[5, 9, 3, 0], [7, 2, 0, 0]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}
    (want,) = ort.InferenceSession(str(path)).run(None, feeds)
    (got,) = ort.InferenceSession(data).run(None, feeds)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=5e-3)


@pytest.mark.gpu
def test_a_token_engine_runs_every_length_of_its_profile_like_onnx_runtime(backend, tmp_path):
    # Variable-length text tiers were checked only against the FAKE tensorrt: int64 ids and
    # mask over a (batch, length) optimisation profile, on a real build.
    import onnxruntime as ort

    _token_onnx(tmp_path / "model.onnx")
    options = BuildOptions(precision="fp32", max_batch=4, opt_batch=2, sequence=(1, 8, 16))
    backend.build(tmp_path / "model.onnx", tmp_path / "engines" / "tok", options)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    with backend.load(tmp_path / "engines" / "tok", options) as engine:
        for batch, length in ((1, 1), (3, 8), (4, 16)):
            ids = rng.integers(0, 30, (batch, length), dtype=np.int64)
            mask = np.ones((batch, length), np.int64)
            mask[0, length // 2 + 1 :] = 0  # one padded row
            want = session.run(None, {"ids": ids, "mask": mask})[0]
            got = engine.run({"ids": ids, "mask": mask})["y"]
            np.testing.assert_allclose(got, want, atol=1e-4)
        with pytest.raises(EngineError):
            engine.run({"ids": np.zeros((1, 17), np.int64), "mask": np.ones((1, 17), np.int64)})


class _MeetingContext(_StubContext):
    """A stub context whose execution waits for ``barrier``: two batches meet there only if
    they run at once (each on a context of its own)."""

    barrier: threading.Barrier

    def execute_async_v3(self, stream):
        self.barrier.wait()
        return super().execute_async_v3(stream)


class _MeetingEngine(_StubEngine):
    def create_execution_context(self):
        return _MeetingContext(self.cudart)


class _TwoInputContext(_StubContext):
    """The stub context for inputs x and b (y = x); ``reject`` makes set_input_shape refuse
    b at that batch size, ``fail_execute`` makes execute_async_v3 return False."""

    reject: int | None = None
    fail_execute = False

    def set_input_shape(self, name, shape):
        if name == "b" and shape[0] == self.reject:
            return False
        return super().set_input_shape(name, shape)

    def execute_async_v3(self, stream):
        return False if self.fail_execute else super().execute_async_v3(stream)


class _TwoInputEngine(_StubEngine):
    num_io_tensors = 3

    def get_tensor_name(self, i):
        return ("x", "b", "y")[i]

    def get_tensor_mode(self, name):
        return _StubTRT.TensorIOMode.OUTPUT if name == "y" else _StubTRT.TensorIOMode.INPUT

    def create_execution_context(self):
        self.context = _TwoInputContext(self.cudart)
        return self.context


class _WatchedFree(list):
    """An engine's free list that notes, as each slot comes back, the copies still queued
    on its stream (the FAKE cudart's ``pending``: not yet done)."""

    def __init__(self, items, rt) -> None:
        super().__init__(items)
        self.rt, self.queued_on_return = rt, []

    def append(self, slot) -> None:
        self.queued_on_return.append(list(self.rt.pending.get(int(slot.stream), [])))
        super().append(slot)


@pytest.mark.parametrize(
    "failure", ["second input's shape", "second input's copy", "copy to the host", "execution"]
)
def test_a_run_failing_part_way_drains_its_stream_before_the_context_is_reused(
    monkeypatch, fake_cuda, failure
):
    # Only a failed execute_async_v3 synchronised: where the second input's shape was
    # rejected or a copy failed, the first input's host-to-device copy could still be
    # reading the pinned staging buffer when the context went back to the free list, and
    # the next run rewrote that buffer under the DMA (review 125).
    rt = fake_cuda
    monkeypatch.setitem(sys.modules, "tensorrt", _StubTRT)
    stub = _TwoInputEngine(rt)
    engine = TensorRTEngine(stub, trt_module._Cuda(rt), max_batch=4)
    engine._free = _WatchedFree(engine._free, rt)
    (slot,) = engine._slots
    kinds = rt.cudaMemcpyKind
    if failure == "second input's shape":
        stub.context.reject, expected = 3, r"rejected shape \(3, 16\) for 'b'"
    elif failure == "second input's copy":
        rt.fail_copy = lambda kind, dst: dst == slot.buffers["b"]
        expected = r"cudaMemcpyAsync \(host to device\) failed"
    elif failure == "copy to the host":
        rt.fail_copy = lambda kind, dst: kind == kinds.cudaMemcpyDeviceToHost
        expected = r"cudaMemcpyAsync \(device to host\) failed"
    else:
        stub.context.fail_execute, expected = True, "TensorRT execution failed"
    x = _inputs(3, seed=3)
    with pytest.raises(EngineError, match=expected):
        engine.run({"x": x, "b": x})
    assert rt.copies and rt.copies[0][0] == kinds.cudaMemcpyHostToDevice  # x's was queued
    assert engine._free.queued_on_return == [[]]  # ... and done before the slot was free
    assert engine._free == [slot]
    # The context serves the next batch.
    stub.context.reject, stub.context.fail_execute, rt.fail_copy = None, False, None
    x = _inputs(2, seed=4)
    np.testing.assert_array_equal(engine.run({"x": x, "b": x})["y"], x)
    engine.close()


def test_a_failing_synchronisation_after_a_failed_run_is_logged_not_raised(
    monkeypatch, fake_cuda, caplog
):
    rt = fake_cuda
    monkeypatch.setitem(sys.modules, "tensorrt", _StubTRT)
    stub = _TwoInputEngine(rt)
    engine = TensorRTEngine(stub, trt_module._Cuda(rt), max_batch=4)
    stub.context.reject, rt.fail_sync = 2, True
    x = _inputs(2, seed=0)
    with (
        caplog.at_level(logging.WARNING, logger="innfer.engines.tensorrt"),
        pytest.raises(EngineError, match="rejected shape"),  # the run's error, not the sync's
    ):
        engine.run({"x": x, "b": x})
    assert "synchronising after a failed run" in caplog.text
    assert "cudaStreamSynchronize failed" in caplog.text
    rt.fail_sync = False
    engine.close()


def test_contexts_run_batches_of_one_tier_at_once_each_on_its_own_stream(monkeypatch, fake_cuda):
    # instances 2 on TensorRT was planned as 1 (one context behind a lock): a second batch
    # of the tier waited for the first. Two contexts, two streams, two sets of buffers.
    rt = fake_cuda
    monkeypatch.setitem(sys.modules, "tensorrt", _StubTRT)
    _MeetingContext.barrier = threading.Barrier(2, timeout=5)
    engine = TensorRTEngine(_MeetingEngine(rt), trt_module._Cuda(rt), max_batch=4, contexts=2)
    assert engine.concurrent_runs == 2
    assert len(rt.streams) == 2 and len(rt.device) == len(rt.pinned) == 4  # x, y per context
    xs = [_inputs(b, seed=b) for b in (2, 3)]
    with ThreadPoolExecutor(2) as pool:
        ys = list(pool.map(lambda x: engine.run({"x": x})["y"], xs))
    for x, y in zip(xs, ys, strict=True):
        np.testing.assert_array_equal(y, x)  # each its own result, through its own buffers
    used = {c[4] for c in rt.copies}
    assert used == rt.streams
    engine.close()
    assert rt.pinned == {} and rt.device == {} and rt.streams == set()


def test_close_waits_for_running_batches_and_refuses_waiting_ones(monkeypatch, fake_cuda):
    rt = fake_cuda
    monkeypatch.setitem(sys.modules, "tensorrt", _StubTRT)
    _MeetingContext.barrier = threading.Barrier(2, timeout=5)
    engine = TensorRTEngine(_MeetingEngine(rt), trt_module._Cuda(rt), max_batch=4)
    x = _inputs(2, seed=0)
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(engine.run, {"x": x})  # holds the one context at the barrier
        while _MeetingContext.barrier.n_waiting < 1:
            time.sleep(0.001)
        waiting = pool.submit(engine.run, {"x": x})  # no free context: waits
        closing = pool.submit(engine.close)
        time.sleep(0.05)
        assert not closing.done()  # the running batch still uses the buffers
        assert rt.device  # nothing freed under it
        _MeetingContext.barrier.wait()  # let the running batch finish
        np.testing.assert_array_equal(running.result(5)["y"], x)
        closing.result(5)
        with pytest.raises(EngineError, match="closed"):
            waiting.result(5)
    assert rt.device == {} and rt.pinned == {}


def test_load_makes_a_context_per_instance(tmp_path, monkeypatch, fake_cuda):
    from runtime.engines import tensorrt as module

    trt = types.SimpleNamespace(**vars(_StubTRT))
    trt.Runtime = lambda logger: types.SimpleNamespace(
        deserialize_cuda_engine=lambda data: _StubEngine(fake_cuda)
    )
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(module, "_trt_logger", lambda trt: None)
    (tmp_path / PLAN_FILE).write_bytes(b"plan")
    engine = TensorRTBackend().load(tmp_path, BuildOptions(max_batch=4, instances=3))
    assert engine.concurrent_runs == 3 and len(fake_cuda.streams) == 3
    engine.close()


def test_close_leaves_a_hung_batch_its_context_and_frees_it_when_it_ends(
    monkeypatch, fake_cuda, caplog
):
    # close() waited for a running batch without end: a hung engine hung the model's
    # unload with it (review helper-111). Freeing its memory under it would crash instead.
    rt = fake_cuda
    monkeypatch.setitem(sys.modules, "tensorrt", _StubTRT)
    _MeetingContext.barrier = threading.Barrier(2, timeout=5)
    engine = TensorRTEngine(_MeetingEngine(rt), trt_module._Cuda(rt), max_batch=4, contexts=2)
    x = _inputs(1, seed=0)
    with ThreadPoolExecutor(1) as pool:
        hung = pool.submit(engine.run, {"x": x})
        while _MeetingContext.barrier.n_waiting < 1:
            time.sleep(0.001)
        with caplog.at_level(logging.WARNING, logger="innfer.engines.tensorrt"):
            engine.close(timeout_s=0.05)
        assert "1 batch(es) still running" in caplog.text
        assert len(rt.device) == 2 and len(rt.streams) == 1  # the idle context went; not its
        _MeetingContext.barrier.wait()  # the engine comes back
        np.testing.assert_array_equal(hung.result(5)["y"], x)
    assert rt.device == {} and rt.pinned == {} and rt.streams == set()


class _NotMonotoneContext(_StubContext):
    """The stub context whose output is larger at a smaller batch than at the largest (no
    real model's shape, but nothing in TensorRT rules it out)."""

    def get_tensor_shape(self, name):
        if name == "y" and self.shape[0] < 6:
            return (2 * self.shape[0], *self.shape[1:])
        return self.shape


class _NotMonotoneEngine(_StubEngine):
    def create_execution_context(self):
        return _NotMonotoneContext(self.cudart)


def test_an_output_larger_than_its_buffers_is_refused_before_the_run(monkeypatch, fake_cuda):
    # Buffers are sized at the inputs' largest shapes; an output not monotone in them was
    # copied past both the device and the pinned buffer, unchecked (review helper-231).
    rt = fake_cuda
    monkeypatch.setitem(sys.modules, "tensorrt", _StubTRT)
    engine = TensorRTEngine(_NotMonotoneEngine(rt), trt_module._Cuda(rt), max_batch=6)
    with pytest.raises(EngineError, match=r"output 'y' of shape \(8, 16\) is larger than its "
                       r"buffers \(\(6, 16\)"):  # fmt: skip
        engine.run({"x": _inputs(4, seed=0)})
    assert engine.run({"x": _inputs(6, seed=0)})["y"].shape == (6, IN_F)  # and runs on
