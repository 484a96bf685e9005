"""Swin's patterns: a relative position bias gathered by index, q/k/v picked by index,
shifted windows rolled over the spatial dims.

A gather by one integer tensor index: Swin's and MaxViT's relative position bias,
``table[index]`` - a (positions, heads) parameter read at a buffer of position indices,
then added to the attention logits of every head. The gathered dim is replaced by the
index's dims and the heads dim passes through, so the table's heads follow the attention's
heads. Before, any tensor index fixed every dim: the bias pinned the heads, and Swin and
MaxViT converted with none of their heads elastic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import runtime
from runtime.inn.groups import ConversionError
from tests.test_rules import _converts, _onnx_matches


class RelPosAttention(nn.Module):
    """Window attention over N = w * w tokens with a learned bias per (relative offset,
    head), as in Swin: qkv -> heads -> q k^T + table[index] -> softmax -> @ v -> proj."""

    def __init__(self, biased: bool = True, indexed: bool = False, w: int = 3) -> None:
        super().__init__()
        d, heads = 32, 4
        self.biased, self.indexed = biased, indexed
        self.heads, self.head_dim, self.d, self.n = heads, d // heads, d, w * w
        self.embed = nn.Linear(5, d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.table = nn.Parameter(torch.randn((2 * w - 1) ** 2, heads))
        ys, xs = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
        self.register_buffer("index", (rel[..., 0] * (2 * w - 1) + rel[..., 1]).flatten())
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # (B, N, 5)
        x = self.embed(x)
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # Swin's q, k, v: qkv[0], qkv[1], qkv[2] (torch.export makes them aten.select)
        q, k, v = (qkv[0], qkv[1], qkv[2]) if self.indexed else qkv.unbind(0)
        logits = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        if self.biased:
            logits = logits + self.table[self.index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        x = x + self.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, self.d))
        return self.head(x.mean(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize(("biased", "indexed"), [(True, False), (False, True)])
def test_attention_heads_stay_elastic(frontend, biased, indexed, tmp_path):
    # biased: the table was gathered by a tensor index, which fixed every dim - the heads;
    # indexed: through torch.export, select had no rule ("innfer has no rule for 'select'")
    torch.manual_seed(0)
    x = torch.randn(2, 9, 5)
    model = RelPosAttention(biased=biased, indexed=indexed)
    inn = _converts(model, x, tmp_path, frontend=frontend)
    assert {g.name: g.size for g in inn.groups if not g.discrete}.get("qkv") == 4  # heads
    half = inn.sample(0.5)
    assert half.qkv.weight.shape == (3 * 2 * 8, 16)  # 2 heads of head_dim 8
    if biased:
        assert half.table.shape == (25, 2)  # the table resampled along its heads
    _onnx_matches(half, x)


class IndexChannels(nn.Module):
    """Picks channels by a tensor: which ones changes with the width."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(3, 2)
        self.register_buffer("index", index)

    def forward(self, x):
        return self.b(self.a(x)[:, self.index])


@pytest.mark.parametrize(
    ("index", "match"),
    [
        (torch.tensor([0, 3, 5]), r"gathers along channel dim 1.*'a'"),
        (torch.tensor([1, 0, 0, 1, 0, 1, 0, 0]).bool(), r"advanced indexing with a mask"),
    ],
)
def test_picking_channels_by_a_tensor_is_refused(index, match):
    with pytest.raises(ConversionError, match=match):
        runtime.convert(IndexChannels(index).eval(), (torch.randn(2, 5),))


def _keeps_conv_channels(model: nn.Module, tmp_path, **kw):
    """Convert ``model`` (conv ``a`` of 8 channels -> ... -> conv ``b``) on a 2x3x6x6 input:
    exact at full width, ``a``'s channels the one elastic group, the 0.5 tier's ONNX
    matching. Returns the INN."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    inn = _converts(model, x, tmp_path, **kw)
    assert [(g.name, g.size) for g in inn.groups if not g.discrete] == [("a", 8)]
    _onnx_matches(inn.sample(0.5), x)
    return inn


class ShiftedWindows(nn.Module):
    """conv -> roll over H and W (Swin's shifted windows) -> flip W -> conv."""

    def __init__(self, dims=(2, 3)) -> None:
        super().__init__()
        self.dims = dims
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = torch.roll(self.a(x), shifts=(-1, -1), dims=self.dims).flip(-1)
        return self.b(h)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_rolling_the_spatial_dims_keeps_the_channels(frontend, tmp_path):
    # roll and flip had no rule: the channels they carried were fixed (refused)
    _keeps_conv_channels(ShiftedWindows(), tmp_path, frontend=frontend)


def test_rolling_the_channels_is_refused():
    with pytest.raises(ConversionError, match=r"roll along a channel dim"):
        runtime.convert(ShiftedWindows(dims=(1, 2)).eval(), (torch.randn(2, 3, 6, 6),))


class NewMask(nn.Module):
    """A mask made with ``x.new_zeros`` (Swin's shifted-window mask) and a ``zeros_like``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.a(x)
        mask = h.new_zeros((h.shape[-2], h.shape[-1])) + 0.5
        return self.b(h * mask + torch.zeros_like(h))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_new_tensor_borrows_only_dtype_and_device(frontend, tmp_path):
    # new_zeros and zeros_like had no rule: the channels of the tensor they were called on
    # were fixed ("innfer has no rule for 'new_zeros'")
    _keeps_conv_channels(NewMask(), tmp_path, frontend=frontend)


class PlainTensorAttribute(nn.Module):
    """A window weight kept as a plain tensor attribute, not a buffer: torch.export lifts it
    as a constant (``lifted_tensor_0``), as it does Swin's shifted-window mask."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)
        self.window = torch.linspace(0.5, 1.5, 36).reshape(6, 6)

    def forward(self, x):
        return self.b(self.a(x) * self.window)


def test_a_lifted_constant_is_kept_with_the_weights(tmp_path):
    # sampling failed with KeyError: the constant was in no state the INN stored
    _keeps_conv_channels(PlainTensorAttribute(), tmp_path, frontend="export")


def _window_shift(x: torch.Tensor) -> torch.Tensor:
    """torchvision's shifted_window_attention is wrapped like this: fx keeps one call."""
    return torch.roll(x, shifts=(1, 1), dims=(2, 3)) * 0.5


torch.fx.wrap("_window_shift")


class WrappedShift(ShiftedWindows):
    def forward(self, x):
        return self.b(_window_shift(self.a(x)))


def test_a_function_fx_keeps_whole_is_captured_by_export_instead(tmp_path):
    # torchvision's swin_t was refused at its wrapped shifted_window_attention unless the
    # user knew to pass frontend="export"; "auto" now retries with torch.export
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ConversionError, match=r"no rule for '_window_shift'"):
        runtime.convert(WrappedShift().eval(), (x,), frontend="fx")
    assert _keeps_conv_channels(WrappedShift(), tmp_path).info["frontend"] == "export"


class LeViTBiasedAttention(nn.Module):
    """LeViT's attention: a per-head bias gathered as ``biases[:, idxs]`` (heads first), and
    the heads merged by ``reshape(B, -1, heads * head_dim)`` - a literal channel size beside a
    -1 that stands for the tokens."""

    def __init__(self, d: int = 16, heads: int = 4, dh: int = 8, n: int = 9) -> None:
        super().__init__()
        self.heads, self.dh = heads, dh
        self.qkv = nn.Linear(d, 3 * heads * dh)
        self.proj, self.head = nn.Linear(heads * dh, d), nn.Linear(d, 3)
        self.biases = nn.Parameter(torch.randn(heads, n))
        self.register_buffer("idxs", torch.arange(n * n).remainder(n).reshape(n, n))

    def forward(self, x):  # (B, N, d)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).split([self.dh] * 3, dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        a = (q @ k * self.dh**-0.5 + self.biases[:, self.idxs]).softmax(-1)
        return self.head(self.proj((a @ v).transpose(1, 2).reshape(b, -1, self.heads * self.dh)))


def test_levit_heads_merged_beside_a_minus_one_follow_the_width(tmp_path):
    # with the bias gathered per head, the heads became elastic and the merge's literal 32
    # was refused ("would not follow resampling"): timm's levit_128s stopped converting
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)
    inn = _converts(LeViTBiasedAttention(), x, tmp_path)
    half = inn.sample(0.5)
    assert half.biases.shape == (2, 9) and half.proj.in_features == 16
    _onnx_matches(half, x)


class ShiftedWindowMask(nn.Module):
    """Swin's attention mask: ``new_zeros`` sized from the image, filled region by region
    in place, then added to every position - through torch.export, with only the batch
    dynamic, a constant (computed once: the ONNX exporter loses in-place writes into views,
    so swin_t's ONNX tiers were 2.4 % off their torch modules)."""

    def __init__(self, late_write: bool = False) -> None:
        super().__init__()
        self.late_write = late_write
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.a(x)
        mask = h.new_zeros((h.shape[-2], h.shape[-1]))
        mask[:2, :] = 1.0
        mask[2:, 3:] = 2.0
        y = h + mask
        if self.late_write:  # written after a reader: folding would show it the new value
            mask[:, :1] = 5.0
            y = y * mask
        return self.b(y)


@pytest.mark.parametrize("late_write", [False, True])
def test_a_mask_written_in_place_exports_what_torch_computes(late_write, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    inn = _converts(ShiftedWindowMask(late_write), x, tmp_path, frontend="export")
    assert [(g.name, g.size) for g in inn.groups if not g.discrete] == [("a", 8)]
    if late_write:  # not folded: the exporter's loss is what the engine check refuses
        return
    _onnx_matches(inn.sample(0.5), x)
    _onnx_matches(inn.sample(1.0), x)
