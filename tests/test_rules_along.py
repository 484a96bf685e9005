"""Ops along one dim - topk, sort / argsort, cumsum, argmax / argmin - over a dim
that holds no channels (tokens, time): they had no rule, so a model using them on elastic
activations was refused although no channel moved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import runtime
from runtime.inn.groups import ConversionError
from tests.test_rules import _converts, _onnx_matches


class OverTokens(nn.Module):
    """(N, T, 4) -> (N, T, 16) elastic -> each op over the tokens (dim 1) -> (N, 3)."""

    def __init__(self, along: int = 1) -> None:
        super().__init__()
        self.along = along
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        d = self.along
        top = h.topk(2, dim=d).values.mean(d)  # a token-pruning score's top-k
        ordered = torch.sort(h, dim=d)[0].mean(d)
        rank = h.argsort(dim=d).float().mean(d)
        running = h.cumsum(d).mean(d)
        first = h.argmax(d).float() + torch.argmin(h, dim=d, keepdim=True).float().squeeze(d)
        return self.b(top + ordered + rank + running + first)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_ops_along_the_tokens_keep_the_channels_elastic(frontend, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    inn = _converts(OverTokens(), x, tmp_path, frontend=frontend)
    assert [(g.name, g.size) for g in inn.groups if not g.discrete] == [("a", 16)]


@pytest.mark.parametrize("op", ["topk", "sort", "cumsum", "argmax"])
def test_an_op_along_the_channels_is_refused_naming_it(op):
    class AlongChannels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 16), nn.Linear(2, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))  # (N, 16)
            if op == "topk":
                return self.b(h.topk(2, dim=1).values)
            if op == "sort":
                return self.b(h.sort(dim=1).values[:, :2])
            if op == "cumsum":
                return self.b(h.cumsum(1)[:, -2:])
            return self.b(torch.stack([h.argmax(1), h.argmin(1)], 1).float())

    with pytest.raises(ConversionError, match=rf"{op} along channel dim 1"):
        runtime.convert(AlongChannels().eval(), (torch.randn(2, 4),))


@pytest.mark.parametrize("op", ["cumsum", "sort", "topk"])
def test_a_parameter_through_such_an_op_before_its_layer_is_refused(op):
    # A raw parameter's dim is tied to channels only by a later op: the result's dim must
    # carry that tie back, or the channels it meets were fixed without a word (a cumsum
    # over a layer scale converted with the conv's channels silently discrete).
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
            self.gamma = nn.Parameter(torch.rand(8 if op != "topk" else 16))

        def forward(self, x):
            if op == "cumsum":
                s = self.gamma.cumsum(0)
            elif op == "sort":
                s = self.gamma.sort().values
            else:
                s = self.gamma.topk(8).values
            return self.b(self.a(x) * s.view(1, -1, 1, 1))

    with pytest.raises(ConversionError, match=rf"{op} along channel dim 0"):
        runtime.convert(Scaled().eval(), (torch.randn(2, 3, 4, 4),))


class ResidualArgmax(nn.Module):
    """The token dim labelled first (a residual add's broadcast), then argmax over it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.f, self.b = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):  # (N, T, 4)
        h = torch.relu(self.a(x))
        h = h + self.f(h)
        return self.b(h.mean(1) + 0.01 * h.argmax(1).float())


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_argmax_over_a_labelled_token_dim_drops_that_dim(frontend, tmp_path):
    # Without keepdim the reduced dim's layout was kept and then moved onto the next dim,
    # the channels': refused ("ties 16 channels to one of 5"), or at 16 tokens converted
    # with no elastic width at all (review helper-239).
    for tokens in (5, 16):
        inn = _converts(ResidualArgmax(), torch.randn(2, tokens, 4), tmp_path, frontend=frontend)
        assert [(g.name, g.size) for g in inn.groups if not g.discrete] == [("a", 16)]


def test_ops_no_tier_would_export_are_refused_at_conversion():
    # cumprod has no ONNX op at opset 17, sort(stable=True) does not export: converted,
    # every `innfer build` of them failed (review helper-239).
    class Along(nn.Module):
        def __init__(self, op: str) -> None:
            super().__init__()
            self.op = op
            self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = torch.cumprod(h, 1) if self.op == "cumprod" else h.sort(dim=1, stable=True)[0]
            return self.b(h.mean(1))

    with pytest.raises(ConversionError, match=r"no rule for 'cumprod'"):
        runtime.convert(Along("cumprod").eval(), (torch.randn(2, 5, 4),), frontend="fx")
    with pytest.raises(ConversionError, match=r"sort\(stable=True\) does not export"):
        runtime.convert(Along("sort").eval(), (torch.randn(2, 5, 4),), frontend="fx")


def test_token_pruning_keeps_the_top_tokens_with_the_channels_elastic(tmp_path):
    # scores.topk(k, dim=1) then t.gather(1, idx[..., None].expand(-1, -1, C)): the gather
    # had no rule and the token-pruning classifier was refused (review helper-239).
    from bench.zoo_local import TokenTopK

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    inn = _converts(TokenTopK(dim=16), x, tmp_path, frontend="fx")
    sizes = {g.name: g.size for g in inn.groups if not g.discrete}
    assert sizes["patch"] == 16 and sizes["mlp.0"] == 32, sizes
    _onnx_matches(inn.sample(0.5), x)
    # torch.export fixes t.shape[-1] at the example's 16: refused, saying so, not wrong
    with pytest.raises(ConversionError, match=r"'gather_\d+' .* A size there does not follow"):
        runtime.convert(TokenTopK(dim=16).eval(), (x,), frontend="export")


@pytest.mark.parametrize("how", ["channels", "part"])
def test_a_gather_that_moves_or_cuts_channels_is_refused(how):
    class Gathers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 16), nn.Linear(16 if how == "channels" else 8, 3)

        def forward(self, x):  # (N, T, 4)
            h = torch.relu(self.a(x))  # (N, T, 16)
            if how == "channels":  # the channels reordered
                idx = torch.arange(15, -1, -1).expand(h.shape[0], h.shape[1], -1)
                return self.b(h.gather(2, idx).mean(1))
            idx = torch.zeros(h.shape[0], h.shape[1], 8, dtype=torch.long)  # 8 of 16 channels
            return self.b(h.gather(1, idx).mean(1))

    what = "gather along channel dim 2" if how == "channels" else "index spans part of dim 2"
    with pytest.raises(ConversionError, match=what):
        runtime.convert(Gathers().eval(), (torch.randn(2, 5, 4),))
