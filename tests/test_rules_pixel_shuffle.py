"""Pixel (un)shuffle over elastic channels: a super-resolution upsampler (EDSR / ESPCN,
conv -> pixel_shuffle) had no rule and was refused; each output channel is now resampled
with its r * r sub-pixel channels together."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import runtime
from runtime.inn.groups import ConversionError
from tests.test_rules import _converts, _onnx_matches


class Upsampler(nn.Module):
    """head -> residual body -> conv to 4x the channels -> pixel_shuffle(2) -> tail (RGB)."""

    def __init__(self, how: str = "module") -> None:
        super().__init__()
        self.how = how
        self.head = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.up = nn.Conv2d(16, 16 * 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.tail = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.head(x))
        h = h + self.body(h)
        u = self.up(h)
        return self.tail(self.shuffle(u) if self.how == "module" else F.pixel_shuffle(u, 2))


class Nearest(nn.Module):
    """Upsampler with its up conv's 4 sub-pixel rows of each channel equal: the same as
    a conv of 16 rows and a nearest-neighbour upsampling."""

    def __init__(self, shuffled: Upsampler) -> None:
        super().__init__()
        self.head, self.body, self.tail = shuffled.head, shuffled.body, shuffled.tail
        self.up = nn.Conv2d(16, 16, 3, padding=1)
        with torch.no_grad():
            self.up.weight.copy_(shuffled.up.weight[::4])
            self.up.bias.copy_(shuffled.up.bias[::4])

    def forward(self, x):
        h = torch.relu(self.head(x))
        h = h + self.body(h)
        return self.tail(F.interpolate(self.up(h), scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("how", ["module", "function"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_an_upsampler_converts_with_its_channels_elastic(how, frontend, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    inn = _converts(Upsampler(how), x, tmp_path, frontend=frontend)
    assert {g.name: g.size for g in inn.groups if not g.discrete}.keys() >= {"head"}
    assert sorted(g.size for g in inn.groups if not g.discrete) == [16, 16]  # up: 16 of 4
    _onnx_matches(inn.sample(0.5), x)


def test_each_channel_is_resampled_with_its_sub_pixels_together():
    # With each channel's 4 sub-pixel rows equal, the shuffle is a nearest upsampling of 16
    # channels: at any width both INNs must agree. Resampled as 64 channels of their own,
    # the sub-pixels of neighbouring channels would blend.
    torch.manual_seed(0)
    shuffled = Upsampler()
    with torch.no_grad():
        shuffled.up.weight.copy_(shuffled.up.weight[::4].repeat_interleave(4, 0))
        shuffled.up.bias.copy_(shuffled.up.bias[::4].repeat_interleave(4, 0))
    x = torch.randn(2, 3, 8, 8)
    a = runtime.convert(shuffled.eval(), (x,), permute=False)
    b = runtime.convert(Nearest(shuffled).eval(), (x,), permute=False)
    with torch.no_grad():
        for width in (1.0, 0.75, 0.5):
            torch.testing.assert_close(a.sample(width)(x), b.sample(width)(x))


class Unshuffled(nn.Module):
    """pixel_unshuffle(2) -> conv (a space-to-depth stem), then pixel_shuffle(2) back."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(32, 32, 1)
        self.c = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = self.b(F.pixel_unshuffle(h, 2))
        return self.c(F.pixel_shuffle(h, 2))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_pixel_unshuffle_spreads_each_channel_over_its_sub_pixels(frontend, tmp_path):
    x = torch.randn(2, 3, 8, 8)
    inn = _converts(Unshuffled(), x, tmp_path, frontend=frontend)
    assert sorted(g.size for g in inn.groups if not g.discrete) == [8, 8]
    _onnx_matches(inn.sample(0.5), x)


def test_a_shuffle_of_runs_it_cannot_split_is_refused_by_name():
    class Odd(nn.Module):  # 6 channels shuffled by 2: runs of 4 do not divide them
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(2, 3, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = torch.cat([h, h[:, :2]], 1)  # 8 channels: 6 of a's, 2 again
            return self.b(F.pixel_shuffle(h, 2))

    with pytest.raises(ConversionError, match=r"pixel_shuffle by 2 of channels in runs"):
        runtime.convert(Odd().eval(), (torch.randn(2, 3, 4, 4),))


def test_a_shuffle_of_a_grouped_convs_blocks_is_refused_not_resampled_across_them():
    # The refined group lost the grouped conv's blocks: permuting and resampling crossed
    # them, and width 0.75 gave a wrong tier (a +-33 % checkerboard) that exported and
    # served; 0.3 crashed, "out_channels must be divisible by groups" (review helper-239).
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head, self.up = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 64, 1, groups=8)
            self.tail = nn.Conv2d(16, 3, 1)

        def forward(self, x):
            return self.tail(F.pixel_shuffle(self.up(torch.relu(self.head(x))), 2))

    with pytest.raises(ConversionError, match=r"in the blocks of a grouped conv or GroupNorm"):
        runtime.convert(Grouped().eval(), (torch.randn(2, 3, 4, 4),), permute=False)


def test_a_shuffle_of_a_5d_input_is_refused():
    class Five(nn.Module):  # ONNX's DepthToSpace is 4-D: no tier of it would export
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(2, 3, 1)

        def forward(self, x):  # (N, 1, C, H, W): torch shuffles dim -3 into the last two
            return self.b(F.pixel_shuffle(self.a(x).unsqueeze(1), 2).squeeze(1))

    with pytest.raises(ConversionError, match=r"pixel_shuffle of a 5-D input"):
        runtime.convert(Five().eval(), (torch.randn(2, 3, 4, 4),))

    class FiveUn(nn.Module):  # and unshuffle (it converted, then no tier exported)
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(32, 3, 1)

        def forward(self, x):
            return self.b(F.pixel_unshuffle(self.a(x).unsqueeze(1), 2).squeeze(1))

    with pytest.raises(ConversionError, match=r"pixel_unshuffle of a 5-D input"):
        runtime.convert(FiveUn().eval(), (torch.randn(2, 3, 4, 4),))
