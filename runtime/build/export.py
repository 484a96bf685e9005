"""Sampled tier -> ONNX (TorchScript exporter, dynamic batch axis), checked by onnx.checker.

The TorchScript exporter (``dynamo=False``) is used on purpose: torch 2.13's default
exporter needs onnxscript and is much slower for these small graphs.

Example:
    >>> spec = [("input", (1, 28, 28), torch.float32)]
    >>> data = export_onnx(inn.sample(0.5), spec, ["logits"])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence

import onnx
import torch
from torch import nn

OPSET = 17


def export_onnx(
    module: nn.Module,
    inputs: Sequence[tuple[str, Sequence[int], torch.dtype]],
    output_names: Sequence[str],
    opset: int = OPSET,
) -> bytes:
    """Export ``module`` with a dynamic batch axis on every input and output.

    ``inputs``: (name, per-sample shape, dtype) for each model input, in call order.
    Returns the serialized ONNX model after ``onnx.checker.check_model`` passes.
    """
    example = tuple(torch.zeros((2, *shape), dtype=dtype) for _, shape, dtype in inputs)
    names = [name for name, _, _ in inputs]
    dynamic = {n: {0: "batch"} for n in [*names, *output_names]}
    buf = io.BytesIO()
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings(), exportable_attention():
        warnings.simplefilter("ignore")  # exporter deprecation chatter, not actionable here
        torch.onnx.export(
            module,
            example,
            buf,
            input_names=names,
            output_names=list(output_names),
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


@contextlib.contextmanager
def exportable_attention() -> Iterator[None]:
    """``nn.MultiheadAttention`` without its inference fast path: in eval mode under no_grad
    it calls ``aten::_native_multi_head_attention``, which no ONNX opset has; the plain path
    (linear, matmul, softmax) computes the same values and exports."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
