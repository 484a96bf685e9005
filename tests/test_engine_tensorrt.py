"""The TensorRT backend.

Option checks, feed validation, the fp16 ONNX conversion and "no tensorrt here" behaviour
run everywhere. ``gpu`` tests need an NVIDIA GPU: the CUDA plumbing ones need cuda-python
only (a stub stands in for TensorRT), the build/run ones need TensorRT too and skip without.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from runtime.engines.base import BackendUnavailable, BuildOptions, EngineError, TensorSpec
from runtime.engines.feeds import check_feeds
from runtime.engines.fp16 import convert_to_fp16
from runtime.engines.tensorrt import PLAN_FILE, TIMING_CACHE_FILE, TensorRTBackend, TensorRTEngine

ROOT = Path(__file__).resolve().parents[1]
IN_F, OUT_F = 16, 8


def _mlp_onnx(path: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write y = relu(x @ w + b), x: (batch, 16) float32 with a dynamic batch; return w, b."""
    onnx = pytest.importorskip("onnx")
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
    onnx = pytest.importorskip("onnx")
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
    onnx = pytest.importorskip("onnx")
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


def test_convert_to_fp16_rejects_control_flow():
    pytest.importorskip("onnx")
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
        cudart = pytest.importorskip("cuda.cudart")
    return cudart


class _StubTRT:
    """The few ``tensorrt`` names TensorRTEngine uses (dtypes are numpy names here)."""

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    @staticmethod
    def nptype(dtype):
        return np.dtype(dtype).type


class _StubEngine:
    """An 'engine' computing y = x for x: (batch<=8, 16) float32, on the GPU."""

    num_io_tensors = 2

    def __init__(self, cudart) -> None:
        self.cudart = cudart

    def get_tensor_name(self, i):
        return ("x", "y")[i]

    def is_shape_inference_io(self, name):
        return False

    def get_tensor_dtype(self, name):
        return "float32"

    def get_tensor_shape(self, name):
        return (-1, IN_F)

    def get_tensor_mode(self, name):
        return _StubTRT.TensorIOMode.INPUT if name == "x" else _StubTRT.TensorIOMode.OUTPUT

    def get_tensor_profile_shape(self, name, profile):
        return [(1, IN_F), (4, IN_F), (8, IN_F)]

    def create_execution_context(self):
        return _StubContext(self.cudart)


class _StubContext:
    def __init__(self, cudart) -> None:
        self.cudart, self.shape, self.addresses = cudart, None, {}

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


# --- gpu + TensorRT: real builds ----------------------------------------------------------


@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("tensorrt")
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
def test_fp32_build_writes_plan_and_timing_cache(built):
    root, _, _, _, files = built
    assert files == [PLAN_FILE]
    assert (root / "engines" / "fp32" / PLAN_FILE).stat().st_size > 0
    assert (root / "engines" / TIMING_CACHE_FILE).stat().st_size > 0


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
    # A second build on this machine: the timing cache from the fp32 build is reused.
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
