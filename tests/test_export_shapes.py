"""Shape arithmetic a captured graph keeps (timm's "same" padding) exports to ONNX.

tf_mixnet_s converted through torch.export but never exported: its padding is computed from
the input's size with ``torch.sym_max``, which the TorchScript exporter's traced sizes (0-dim
tensors) fail ("expected int, got Tensor"). A hand-written module with the same arithmetic
stands in for timm here (bench/zoo.py runs the real one)."""

from __future__ import annotations

import math

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import runtime
from runtime.build.export import export_onnx, traceable_shape_arithmetic


class SamePadConv(nn.Module):
    """A stride-2 convolution padded as TensorFlow's "SAME" does, from the input's size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2)
        self.mid = nn.Conv2d(16, 16, 3, stride=2)
        self.head = nn.Linear(16, 5)

    @staticmethod
    def pad_same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
        h, w = x.size(-2), x.size(-1)
        ph = torch.sym_max((math.ceil(h / s) - 1) * s + k - h, 0)
        pw = torch.sym_max((math.ceil(w / s) - 1) * s + k - w, 0)
        return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])

    def forward(self, x):
        x = self.conv(self.pad_same(x, 3, 2)).relu()
        x = self.mid(self.pad_same(x, 3, 2)).relu()
        return self.head(x.mean((2, 3)))


def test_a_captured_same_padding_exports_and_matches_onnxruntime():
    torch.manual_seed(0)
    model = SamePadConv().eval()
    x = torch.randn(2, 3, 21, 21)  # odd: the two sides pad differently
    with torch.no_grad():
        inn = runtime.convert(model, (x,), progress=False)
        half = inn.sample(0.5)
        assert any(n.target is torch.sym_max for n in half.graph.nodes)  # what timm leaves
        data = export_onnx(half, [("x", (3, 21, 21), torch.float32)], ["y"])
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        for rows in (1, 3):  # the batch axis stays dynamic
            xb = torch.randn(rows, 3, 21, 21)
            got = session.run(None, {"x": xb.numpy()})[0]
            torch.testing.assert_close(torch.from_numpy(got), half(xb), rtol=1e-4, atol=1e-5)


def test_the_patch_is_undone_and_leaves_numbers_alone():
    before = torch.sym_max, torch.sym_min
    with traceable_shape_arithmetic():
        assert torch.sym_max(3, 5) == 5 and torch.sym_min(3, 5) == 3
        assert int(torch.sym_max(torch.tensor(7), 2)) == 7
    assert (torch.sym_max, torch.sym_min) == before
    with pytest.raises(RuntimeError), traceable_shape_arithmetic():
        raise RuntimeError("an export that fails")
    assert (torch.sym_max, torch.sym_min) == before


def test_a_dynamic_axis_with_shape_arithmetic_is_refused_not_folded():
    """The tracer folds the ``math.ceil`` beside the max to the example's size: with a
    dynamic width the ONNX graph padded every width as the example's 7 (max error 0.03 at
    21, silently). Refused with the way out instead."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 21, 21)
    with torch.no_grad():
        half = runtime.convert(SamePadConv().eval(), (x,), progress=False).sample(0.5)
    with pytest.raises(ValueError, match=r"inputs \['x'\] have a dynamic axis.*fixed shape"):
        export_onnx(half, [("x", (3, 21, -1), torch.float32)], ["y"])


class _VggHead(nn.Module):
    """VGG's tail: two halvings, then an adaptive pool to 7 x 7."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(4))
        self.pool = nn.AdaptiveAvgPool2d((7, 7))
        self.fc = nn.Linear(8 * 49, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_an_adaptive_pool_the_exporter_cannot_write_is_named_with_a_size_that_works():
    # VGG at 64 x 64 converted and sampled, then its build failed with the exporter's
    # "output size that are not factor of input size" and a TorchScript IR dump (review
    # helper-262): the layer, its sizes and an input size that works are said instead.
    module = torch.fx.symbolic_trace(_VggHead())
    with pytest.raises(ValueError, match=r"adaptive pool 'pool' maps \[16, 16\] to \[7, 7\].*"
                       r"an input of \[3, 84, 84\] gives maps that divide"):  # fmt: skip
        export_onnx(module, [("input", [3, 64, 64], torch.float32)], ["y"])
    data = export_onnx(module, [("input", [3, 84, 84], torch.float32)], ["y"])
    x = torch.randn(2, 3, 84, 84)
    got = ort.InferenceSession(data).run(None, {"input": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), module(x), atol=1e-5)
