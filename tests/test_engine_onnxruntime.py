"""The ONNX Runtime backend: a cached engine runs the kernels full optimisation picks."""

from __future__ import annotations

import platform

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.engines import BuildOptions, EngineError, get_backend
from runtime.engines.onnxruntime import ENGINE_FILE, cpu_isa


def _conv_model(path) -> None:
    """input [N, 8, 16, 16] -> Conv 3x3 (16) -> Relu -> Conv 3x3 (16) -> output."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["output"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 16, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


@pytest.fixture
def engine_dir(tmp_path):
    _conv_model(tmp_path / "model.onnx")
    backend = get_backend("onnxruntime")
    files = backend.build(tmp_path / "model.onnx", tmp_path / "engine", BuildOptions())
    assert files == [ENGINE_FILE]
    return backend, tmp_path


def test_cached_engine_matches_a_plain_session(engine_dir):
    import onnxruntime as ort

    backend, root = engine_dir
    engine = backend.load(root / "engine", BuildOptions())
    x = np.random.default_rng(1).standard_normal((3, 8, 16, 16)).astype(np.float32)
    plain = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
    want = plain.run(None, {"input": x})[0]
    got = engine.run({"input": x})["output"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert engine.inputs[0].shape == (-1, 8, 16, 16)


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or cpu_isa() in ("generic", "sse4_1", "avx"),
    reason="ONNX Runtime's NCHWc layout pass runs on x86 CPUs with AVX2 or newer only",
)
def test_cached_engine_keeps_the_layout_optimisation(engine_dir):
    # Saved at ORT_ENABLE_EXTENDED (the level before) the convolutions stayed plain NCHW and the
    # engine ran 1.5-2.5x slower than a plain session on a ResNet.
    # ReorderOutput is the node the layout pass adds to turn NCHWc blocks back into NCHW; the
    # domain name alone is no evidence (ORT lists it among the opsets at every level).
    _, root = engine_dir
    assert b"ReorderOutput" in (root / "engine" / ENGINE_FILE).read_bytes()


def test_device_names_the_instruction_set():
    # The layout is CPU-specific, so the cache key (which hashes device()) must say which CPU.
    device = get_backend("onnxruntime").device()
    assert device == f"cpu-{platform.machine()}-{cpu_isa()}"


def test_a_corrupted_engine_is_an_engine_error(engine_dir):
    backend, root = engine_dir
    (root / "engine" / ENGINE_FILE).write_bytes(b"not a flatbuffer")
    with pytest.raises(EngineError, match="cannot load"):
        backend.load(root / "engine", BuildOptions())


def test_a_failed_run_raises_without_writing_to_stderr(tmp_path, capfd):
    """Observability review 29: each failed batch also printed ONNX Runtime's own error on
    the process's stderr (not JSON, colour codes, no throttle) beside the server's record."""
    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["output"])],
        "gather",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "model.onnx")
    backend = get_backend("onnxruntime")
    backend.build(tmp_path / "model.onnx", tmp_path / "engine", BuildOptions())
    engine = backend.load(tmp_path / "engine", BuildOptions())
    capfd.readouterr()
    with pytest.raises(Exception, match="idx=100"):
        engine.run({"ids": np.array([100], np.int64)})
    assert capfd.readouterr().err == ""
