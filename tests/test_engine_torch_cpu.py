"""The torch engine on a CPU behaves as the ONNX Runtime one (review helper-139): inputs are
checked (it cast float64 silently and answered a wrong shape), a closed engine refuses to
run (it ran on, holding its weights), its device names the CPU's instruction set (a profile
timed on another CPU was trusted), and it runs at its own thread count in whatever thread
runs it (the count was per thread: a load on one executor thread did not reach the engine
thread)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.engines import EngineError
from runtime.engines.base import TensorSpec
from runtime.engines.onnxruntime import cpu_isa
from runtime.engines.torch import TorchBackend, TorchEngine


def _engine(threads: int | None = None) -> TorchEngine:
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3).eval()
    return TorchEngine(module, "cpu", torch.float32, [TensorSpec("x", "float32", (-1, 4))],
                       [TensorSpec("y", "float32", (-1, 3))], threads=threads)  # fmt: skip


def test_inputs_are_checked_as_onnx_runtime_checks_them():
    engine = _engine()
    x = np.ones((2, 4), np.float32)
    assert engine.run({"x": x})["y"].shape == (2, 3)
    assert engine.run({"x": np.ones((9, 4), np.float32)})["y"].shape == (9, 3)  # any batch
    for bad, why in [({"x": x.astype(np.float64)}, "expected dtype float32"),
                     ({"x": np.ones((2, 5), np.float32)}, "expected shape"),
                     ({"x": np.ones(4, np.float32)}, "expected 2 dims"),
                     ({}, r"missing \['x'\]"),
                     ({"x": x, "z": x}, r"unknown \['z'\]")]:  # fmt: skip
        with pytest.raises(EngineError, match=why):
            engine.run(bad)


def test_a_closed_engine_refuses_to_run():
    engine = _engine()
    engine.close()
    assert engine.module is None
    with pytest.raises(EngineError, match="closed"):
        engine.run({"x": np.ones((1, 4), np.float32)})


def test_the_cpu_device_names_the_instruction_set():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the device is the GPU's name")
    assert TorchBackend().device().endswith(f"-{cpu_isa()}")


def test_the_engine_runs_at_its_threads_in_the_thread_that_runs_it():
    engine, seen = _engine(threads=1), []

    def run():
        torch.set_num_threads(2)  # another engine's load, in this thread, earlier
        engine.run({"x": np.ones((1, 4), np.float32)})
        seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    t = threading.Thread(target=run)
    t.start()
    t.join()
    torch.set_num_threads(before)
    assert seen == [1]


def test_fp16_on_a_cpu_torch_backend_builds_fp32(tmp_path, caplog):
    # torch computes fp16 on a CPU 2.4x slower than fp32 (and less exactly): a CUDA-less
    # host of `backends: [torch, ...]` built it silently (review helper-139).
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine builds fp16 on the GPU")
    from runtime.repository import Repository
    from runtime.repository.config import ModelConfig

    config = ModelConfig.from_dict({
        "inputs": [{"name": "x", "shape": [4]}], "outputs": [{"name": "y", "shape": [3]}],
        "tiers": [{"name": "w100", "width": 1.0}], "precision": "fp16",
        "backends": ["torch", "onnxruntime"],
    })  # fmt: skip
    with caplog.at_level("WARNING"):
        options = Repository(tmp_path).build_options(config, TorchBackend())
    assert options.precision == "fp32" and "building fp32" in caplog.text


def test_a_torch_build_runs_the_tiers_onnx_in_onnx_runtime_too(tmp_path):
    # A torch engine is the sampled module itself: its validation never ran the ONNX that a
    # host without torch (or backends falling back to onnxruntime) serves (review helper-139).
    from onnx import TensorProto, helper, numpy_helper

    from runtime.build.pipeline import BuildError, check_exported_onnx
    from runtime.repository.config import ModelConfig

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3).eval()

    def write(weight: np.ndarray) -> Path:
        w = numpy_helper.from_array(weight.astype(np.float32), "w")
        b = numpy_helper.from_array(module.bias.detach().numpy(), "b")
        graph = helper.make_graph(
            [helper.make_node("Gemm", ["input", "w", "b"], ["y"], transB=1)], "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w, b],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.onnx"
        path.write_bytes(model.SerializeToString())
        return path

    config = ModelConfig.from_dict({
        "inputs": [{"name": "input", "shape": [4]}], "outputs": [{"name": "y", "shape": [3]}],
        "tiers": [{"name": "w100", "width": 1.0}], "max_batch": 4,
    })  # fmt: skip
    weight = module.weight.detach().numpy()
    assert check_exported_onnx(write(weight), module, config, "w100") < 1e-5
    with pytest.raises(BuildError, match=r"tier w100 \(its ONNX, in ONNX Runtime\): engine output"):
        check_exported_onnx(write(weight * 2), module, config, "w100")
