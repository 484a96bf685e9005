"""A gather by one integer tensor index: Swin's and MaxViT's relative position bias,
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

    def __init__(self, d: int = 32, heads: int = 4, w: int = 3) -> None:
        super().__init__()
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
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        a = ((q @ k.transpose(-2, -1)) * self.head_dim**-0.5 + bias).softmax(-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, n, self.d))
        return self.head(x.mean(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_relative_position_bias_table_follows_the_heads(frontend, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 5)
    inn = _converts(RelPosAttention(), x, tmp_path, frontend=frontend)
    assert {g.name: g.size for g in inn.groups if not g.discrete}.get("qkv") == 4  # heads
    half = inn.sample(0.5)
    assert half.qkv.weight.shape == (3 * 2 * 8, 16)  # 2 heads of head_dim 8
    assert half.table.shape == (25, 2)  # the table resampled along its heads
    _onnx_matches(half, x)


class GatherChannels(nn.Module):
    """Picks channels by a tensor of positions: which ones changes with the width."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(3, 2)
        self.register_buffer("pick", torch.tensor([0, 3, 5]))

    def forward(self, x):
        return self.b(self.a(x)[:, self.pick])


def test_gathering_along_a_channel_dim_is_refused():
    with pytest.raises(ConversionError, match=r"gathers along channel dim 1.*'a'"):
        runtime.convert(GatherChannels().eval(), (torch.randn(2, 5),))


class MaskChannels(GatherChannels):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.tensor([1, 0, 0, 1, 0, 1, 0, 0]).bool())

    def forward(self, x):
        return self.b(self.a(x)[:, self.mask])


def test_a_boolean_mask_on_channels_is_still_refused():
    with pytest.raises(ConversionError, match=r"advanced indexing with a mask"):
        runtime.convert(MaskChannels().eval(), (torch.randn(2, 5),))
