"""Channels split unequally (timm MixNet's MixedConv2d: ``torch.split(x, [a, b], 1)``, each
part through its own conv, then ``cat``) and residuals into part of a wider tensor (ReXNet):
the split dim becomes a concatenation of groups, each resampled on its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import runtime
from runtime.inn.groups import ConversionError
from tests.test_rules import _converts, _onnx_matches


class MixConv(nn.Module):
    """split [4, 8] -> a 3x3 and a 5x5 conv -> cat -> conv (MixNet's mixed depthwise conv,
    with full convs here so that each part has its own weights to resample)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.p, self.q = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 8, 5, padding=2)
        self.b = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        u, v = torch.split(torch.relu(self.a(x)), [4, 8], 1)
        return self.b(torch.cat([self.p(u), self.q(v)], 1))


def test_unequal_split_makes_each_part_its_own_group(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    inn = _converts(MixConv(), x, tmp_path)
    sizes = {g.name: g.size for g in inn.groups if not g.discrete}
    assert sizes == {"a[0:4]": 4, "a[4:12]": 8, "p": 4, "q": 8}
    half = inn.sample(0.5)
    assert (half.a.out_channels, half.p.in_channels, half.q.in_channels) == (6, 2, 4)
    _onnx_matches(half, x)
    # each part resampled on its own: the split sizes follow the parts' counts
    narrow = inn.sample({"a[0:4]": 1, "a[4:12]": 8})
    assert (narrow.a.out_channels, narrow.p.in_channels, narrow.q.in_channels) == (9, 1, 8)
    assert narrow(x).shape == (2, 5, 8, 8)


class MixBlock(nn.Module):
    """MixNet's block: split -> depthwise convs -> cat -> SE gate -> conv -> + shortcut.
    The SE gate's and the shortcut's plain channels meet the concatenation and are cut
    into as many parts."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.p = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.q = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.se1, self.se2 = nn.Conv2d(12, 3, 1), nn.Conv2d(3, 12, 1)
        self.b, self.c = nn.Conv2d(12, 12, 1), nn.Conv2d(12, 5, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        u, v = torch.split(h, [4, 8], 1)
        y = torch.cat([self.p(u), self.q(v)], 1)
        y = y * torch.sigmoid(self.se2(torch.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        return self.c(self.b(y) + h)


def test_se_gate_and_shortcut_over_a_concatenation_convert(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    inn = _converts(MixBlock(), x, tmp_path)
    sizes = sorted(g.size for g in inn.groups if not g.discrete)
    assert sizes == [3, 4, 8]  # the SE's reduction, and the two parts everything else joins
    half = inn.sample(0.5)
    assert (half.se2.out_channels, half.b.out_channels) == (6, 6)
    _onnx_matches(half, x)


class CatThenSplit(nn.Module):
    """cat of 6 and 6 channels split [4, 8]: the cut falls inside the first part, which is
    cut again (the second part of the split holds channels of both convs)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
        self.p, self.q = nn.Conv2d(4, 2, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        u, v = torch.cat([self.a(x), self.b(x)], 1).split([4, 8], 1)
        return self.p(u) + self.q(v)


def test_split_across_the_parts_of_a_cat_converts(tmp_path):
    x = torch.randn(2, 3, 6, 6)
    inn = _converts(CatThenSplit(), x, tmp_path)
    assert sorted(g.size for g in inn.groups if not g.discrete) == [2, 4, 6]
    _onnx_matches(inn.sample(0.5), x)


class SplitInsideNormGroups(nn.Module):
    """GroupNorm(2) over 8 channels, then split [3, 5]: the cut falls inside a norm group,
    whose channels must stay in blocks of equal size."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        first, _ = self.gn(self.a(x)).split([3, 5], 1)
        return self.b(first)


def test_a_split_that_cuts_norm_groups_is_refused():
    with pytest.raises(ConversionError, match=r"split along channel dim 1 \(parts"):
        runtime.convert(SplitInsideNormGroups().eval(), (torch.randn(2, 3, 4, 4),))


@pytest.mark.slow
def test_timm_mixnet_converts():
    timm = pytest.importorskip("timm")
    from runtime.inn.compat import import_torchvision

    import_torchvision()
    model = timm.create_model("mixnet_s", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        inn = runtime.convert(model, (x,))
        y = model(x)
        err = (inn.sample(1.0)(x) - y).abs().max() / y.abs().max()
        assert err < 1e-4
        assert inn.sample(0.5)(x).shape == y.shape
