"""ONNX Runtime backend: the embedded CPU default.

Building runs ORT's whole graph optimiser once (``ORT_ENABLE_ALL``: constant folding,
Conv+Add+Relu fusion, and the layout pass that rewrites convolutions to NCHWc blocked
kernels) and saves the result in ORT's own format; loading reads that file with the
optimiser off. So a cached engine starts without the optimisation pass and runs exactly
the kernels a plain ``InferenceSession`` at full optimisation would.

The layout pass makes the saved graph specific to the CPU's vector width (NCHWc blocks of
8 floats with AVX2, 16 with AVX-512): ``device()`` names the instruction set, so the cache
key differs between such machines and a replica on another CPU builds its own engine.

Why not ``ORT_ENABLE_EXTENDED``: it was the level here before, and it leaves the layout
pass out; on a ResNet that cost 1.5x at batch 1 and 2.5x at batch 8 for the smallest tier.

Example:
    >>> backend = OnnxRuntimeBackend()
    >>> opts = BuildOptions(threads=2)
    >>> files = backend.build(Path("t/model.onnx"), Path("engines/k"), opts)  # doctest: +SKIP
    >>> engine = backend.load(Path("engines/k"), opts)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import platform
import shutil
from pathlib import Path

import numpy as np

from runtime.priority import run_lowered

from .base import Backend, BuildOptions, Engine, EngineError, TensorSpec, VolumeFull, interrupted

ENGINE_FILE = "model.ort"  # ORT format (flatbuffer), optimised at ORT_ENABLE_ALL
# Instruction-set features that change which kernels and layouts the optimiser picks, most
# specific first: the first one this CPU has names the device in the cache key.
_ISA_TAGS = ("amx_tile", "avx512_vnni", "avx512f", "avx_vnni", "avx2", "avx", "sse4_1")

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
        session = self.session
        if session is None:
            raise EngineError("the engine was closed (its model was unloaded or replaced)")
        results = session.run(self._names, feeds)
        return dict(zip(self._names, results, strict=True))

    def close(self) -> None:
        """Let the session go: ORT has no explicit release, its memory and threads go with
        the last reference, and a caller that still holds this engine (a benchmark, a
        closure) no longer holds the session too. A run after it raises EngineError."""
        self.session = None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    shape_profiled = False  # the saved ORT graph runs any batch and length

    def available(self) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            interrupted(exc)
            return False
        return True

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def device(self) -> str:
        return f"cpu-{platform.machine()}-{cpu_isa()}"

    def build(self, onnx_path: Path, out_dir: Path, options: BuildOptions) -> list[str]:
        import onnxruntime as ort

        _check_precision(options)
        out_dir.mkdir(parents=True, exist_ok=True)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(out_dir / ENGINE_FILE)
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.intra_op_num_threads = options.threads
        so.log_severity_level = 3  # the "hardware specific" warning is why device() has the ISA
        try:
            ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception hierarchy
            # ORT's "Failed to save ORT format model" does not say why: a full volume is the
            # usual one (and a rebuild, the advice a load adds, cannot help with it).
            room = _free_bytes(out_dir)
            said = f"ONNX Runtime cannot build {onnx_path}: {exc}"
            if room is not None and room < onnx_path.stat().st_size:
                # (the cache's folder, not this build's own, which goes with the failure)
                raise VolumeFull(
                    f"{said}; the volume holding {out_dir.parent} has {room} bytes free: free "
                    "space or grow it"
                ) from exc
            raise EngineError(said) from exc
        return [ENGINE_FILE]

    def load(self, out_dir: Path, options: BuildOptions) -> OnnxRuntimeEngine:
        import onnxruntime as ort

        path = out_dir / ENGINE_FILE
        if not path.is_file():
            raise EngineError(f"{path} does not exist")
        so = ort.SessionOptions()
        # The file is already optimised; running the optimiser again costs start-up time.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.add_session_config_entry("session.load_model_format", "ORT")
        so.intra_op_num_threads = options.threads
        # model.yaml's spin: idle intra-op threads spin (ORT's default) or sleep.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin else "0")
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # A failed run raises, and the server logs that (throttled, as JSON); ORT's own copy
        # on stderr is neither, and is written for every failed batch.
        so.log_severity_level = 4
        # The session makes its pool threads (threads - 1 of them) now, at the priority of
        # the thread that makes it: a lowered one where the server lowers its engines.
        lowered = options.pool_nice if options.threads > 1 else 0
        try:
            session = run_lowered(
                lambda: ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]),
                lowered,
                "ort-load",
            )
        except Exception as exc:
            raise EngineError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        return OnnxRuntimeEngine(session)


@functools.cache  # the CPU does not change under a running process; device() is per tier
def cpu_isa() -> str:
    """The most specific vector instruction set of this CPU in ``_ISA_TAGS`` ("generic"
    where /proc/cpuinfo is missing or names none, e.g. on arm64 - NCHWc is x86-only).

    Example:
        >>> cpu_isa()  # doctest: +SKIP
        'avx2'
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "generic"
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    return next((tag for tag in _ISA_TAGS if tag in flags), "generic")


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)


def _check_precision(options: BuildOptions) -> None:
    if options.precision != "fp32":
        raise ValueError(
            f"the onnxruntime CPU backend builds fp32 engines only, got precision "
            f"{options.precision!r}; use precision: fp32 or backend tensorrt for fp16"
        )


def _free_bytes(path: Path) -> int | None:
    """Bytes free to this process on ``path``'s volume; None where it cannot be told."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
