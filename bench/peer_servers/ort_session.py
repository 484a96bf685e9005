"""The ONNX Runtime session both peer servers run: the ONNX file innfer's full tier was built
from, with innfer's engine settings (1 intra-op and 1 inter-op thread, sequential execution,
full graph optimisation), so that every server does the same work per request.

Imported by the peer servers inside their own virtual environments: numpy and onnxruntime
only, nothing from the project.
"""

from __future__ import annotations

import onnxruntime as ort


def session(onnx_path: str, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])


def signature(sess: ort.InferenceSession) -> tuple[list[tuple[str, list]], list[tuple[str, list]]]:
    """(name, shape without the batch axis) of each input and output; every tensor must be
    float32 and every dimension after the first fixed (the bench models' are)."""

    def spec(args) -> list[tuple[str, list]]:
        out = []
        for a in args:
            if a.type != "tensor(float)":
                raise ValueError(f"{a.name}: float32 only, got {a.type}")
            if any(not isinstance(d, int) for d in a.shape[1:]):
                raise ValueError(f"{a.name}: only the batch axis may be dynamic, got {a.shape}")
            out.append((a.name, list(a.shape[1:])))
        return out

    return spec(sess.get_inputs()), spec(sess.get_outputs())
