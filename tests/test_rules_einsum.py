"""Attention written with ``torch.einsum`` (torchvision's MaxViT: ``einsum("B G H I D, B G H
J D -> B G H I J", q, k)``): the heads stay continuous like matmul's batch dims, a summed
index on continuous channels is refused, and what the rule does not follow is refused by
name. Before, einsum had no rule: every input dim was fixed, the heads included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import runtime
from runtime.inn.groups import ConversionError
from tests.test_rules import TimmAttentionBlock, _converts, _onnx_matches


class EinsumAttention(TimmAttentionBlock):
    """The timm block with q k^T and attn v as einsums (spaces and capitals, as MaxViT)."""

    def forward(self, x):
        x = self.embed(x)
        b, n, _ = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.einsum("B H I D, B H J D -> B H I J", q * self.head_dim**-0.5, k)
        a = torch.einsum("bhij,bhjd->bihd", a.softmax(dim=-1), v)  # tokens before heads
        x = x + self.proj(a.reshape(b, n, self.d))
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_einsum_attention_samples_heads(frontend, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    inn = _converts(EinsumAttention(fused=False), x, tmp_path, frontend=frontend)
    assert {g.name: g.size for g in inn.groups if not g.discrete}.get("qkv") == 4  # heads
    half = inn.sample(0.5)
    assert half.qkv.weight.shape == (3 * 2 * 8, 16)  # 2 heads of head_dim 8, for q, k and v
    assert half.proj.weight.shape == (16, 16)
    _onnx_matches(half, x)


class SumsChannels(nn.Module):
    """Two projections multiplied and summed over their channels: no quadrature scale."""

    def __init__(self, equation: str, out: int = 5) -> None:
        super().__init__()
        self.equation = equation
        self.a, self.b = nn.Linear(6, 16), nn.Linear(6, 16)
        self.head = nn.Linear(out, 3)

    def forward(self, x):
        return self.head(torch.einsum(self.equation, self.a(x), self.b(x)))


def test_an_einsum_summing_continuous_channels_is_refused():
    with pytest.raises(ConversionError, match=r"einsum 'bnc,bmc->bnm' sums over a channel"):
        runtime.convert(SumsChannels("bnc,bmc->bnm").eval(), (torch.randn(2, 5, 6),))


def test_an_einsum_with_an_ellipsis_is_refused_by_name():
    with pytest.raises(ConversionError, match=r"einsum '\.\.\.c,\.\.\.c->\.\.\.c'.*no rule"):
        runtime.convert(SumsChannels("...c,...c->...c", 16).eval(), (torch.randn(2, 5, 6),))


def test_an_elementwise_einsum_ties_the_channels_of_its_operands(tmp_path):
    """``bnc,bnc->bnc`` multiplies channel by channel: a's and b's channels are one group."""

    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(6, 16), nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.out(torch.einsum("bnc,bnc->bnc", self.a(x), self.b(x).sigmoid()))

    inn = _converts(Gate(), torch.randn(2, 5, 6), tmp_path)
    half = inn.sample(0.5)
    assert half.a.out_features == half.b.out_features == half.out.in_features == 8
