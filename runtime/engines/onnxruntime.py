"""ONNX Runtime backend: the embedded CPU default.

Building runs ORT's graph optimiser once (constant folding, Conv+Add+Relu fusion, layout
transforms) and saves the optimised model as the engine, so loading a cached engine skips
the optimisation pass: that is where the cold-start saving comes from.

Example:
    >>> backend = OnnxRuntimeBackend()
    >>> opts = BuildOptions(threads=2)
    >>> files = backend.build(Path("t/model.onnx"), Path("engines/k"), opts)  # doctest: +SKIP
    >>> engine = backend.load(Path("engines/k"), opts)  # doctest: +SKIP
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from .base import Backend, BuildOptions, Engine, EngineError, TensorSpec

ENGINE_FILE = "model.ort.onnx"

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class OnnxRuntimeEngine(Engine):
    """One ORT InferenceSession; ``run`` is thread-safe (ORT sessions are)."""

    backend = "onnxruntime"

    def __init__(self, session) -> None:
        self.session = session
        self.inputs = [_spec(a) for a in session.get_inputs()]
        self.outputs = [_spec(a) for a in session.get_outputs()]
        self._names = [o.name for o in self.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self._names, feeds)
        return dict(zip(self._names, results, strict=True))


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def available(self) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return True

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def device(self) -> str:
        return f"cpu-{platform.machine()}"

    def build(self, onnx_path: Path, out_dir: Path, options: BuildOptions) -> list[str]:
        import onnxruntime as ort

        _check_precision(options)
        out_dir.mkdir(parents=True, exist_ok=True)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(out_dir / ENGINE_FILE)
        so.intra_op_num_threads = options.threads
        try:
            ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception hierarchy
            raise EngineError(f"ONNX Runtime cannot build {onnx_path}: {exc}") from exc
        return [ENGINE_FILE]

    def load(self, out_dir: Path, options: BuildOptions) -> OnnxRuntimeEngine:
        import onnxruntime as ort

        path = out_dir / ENGINE_FILE
        if not path.is_file():
            raise EngineError(f"{path} does not exist")
        so = ort.SessionOptions()
        # The file is already optimised; running the optimiser again costs start-up time.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EngineError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        return OnnxRuntimeEngine(session)


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)


def _check_precision(options: BuildOptions) -> None:
    if options.precision != "fp32":
        raise ValueError(
            f"the onnxruntime CPU backend builds fp32 engines only, got precision "
            f"{options.precision!r}; use precision: fp32 or backend tensorrt for fp16"
        )
