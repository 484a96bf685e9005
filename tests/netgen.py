"""Randomly built networks for property tests: depths, widths, residuals, concat, depthwise."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, bn: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn)
        self.norm = nn.BatchNorm2d(c_out) if bn else nn.Identity()

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c: int, bn: bool) -> None:
        super().__init__()
        self.a = ConvBlock(c, c, bn)
        self.b = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.b(self.a(x)))


class Concat(nn.Module):
    def __init__(self, c_in: int, c1: int, c2: int) -> None:
        super().__init__()
        self.left = nn.Conv2d(c_in, c1, 1)
        self.right = nn.Conv2d(c_in, c2, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.left(x), torch.relu(self.right(x))], dim=1)


class Depthwise(nn.Module):
    def __init__(self, c: int, mult: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c * mult, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c * mult, c, 1)

    def forward(self, x):
        return self.pw(torch.relu(self.dw(x)))


class RandomCNN(nn.Module):
    def __init__(self, blocks: list[nn.Module], c_last: int, pooled: int, classes: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(pooled)
        self.head = nn.Linear(c_last * pooled * pooled, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.blocks(x)), 1))


def random_cnn(seed: int, in_channels: int = 2) -> tuple[nn.Module, torch.Tensor]:
    """A random CNN (eval mode, randomised BN statistics) and an input batch for it."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    bn = rng.random() < 0.5
    c = rng.choice([4, 6, 8, 12])
    blocks: list[nn.Module] = [ConvBlock(in_channels, c, bn)]
    after_cat = False
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["conv", "res", "cat", "dw"])
        if kind == "res" and after_cat:
            kind = "conv"  # a residual add of a concat is refused by design (see groups.py)
        after_cat = kind == "cat"
        if kind == "conv":
            c_new = rng.choice([4, 8, 10, 16])
            blocks.append(ConvBlock(c, c_new, bn))
            c = c_new
        elif kind == "res":
            blocks.append(Residual(c, bn))
        elif kind == "cat":
            c1, c2 = rng.choice([2, 4, 6]), rng.choice([4, 8])
            blocks.append(Concat(c, c1, c2))
            c = c1 + c2
        else:
            blocks.append(Depthwise(c, rng.choice([1, 2])))
    model = RandomCNN(blocks, c, rng.choice([1, 2]), classes=rng.choice([3, 5]))
    _randomise_norms(model)
    return model.eval(), torch.randn(rng.randint(1, 3), in_channels, 8, 8)


def random_mlp(seed: int, features: int = 12) -> tuple[nn.Module, torch.Tensor]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = features
    for _ in range(rng.randint(1, 4)):
        new = rng.choice([8, 16, 24, 33])
        layers += [nn.Linear(width, new), rng.choice([nn.ReLU(), nn.GELU(), nn.Tanh()])]
        if rng.random() < 0.3:
            layers.append(nn.LayerNorm(new))
        width = new
    layers.append(nn.Linear(width, rng.choice([2, 4])))
    return nn.Sequential(*layers).eval(), torch.randn(rng.randint(1, 4), features)


def _randomise_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


# -- raw parameters through shape ops (issue 12) -----------------------------------------------
# Each kind uses a (C,)-shaped parameter with a conv's C output channels. "refused" kinds
# cannot follow resampling (an op without a rule, a sum over the channels, a channel picked
# by position), so conversion must refuse them - never return a wrong model. A literal
# channel count in a view that keeps the channels is followed (a size field).
PARAM_KINDS = {
    "view": False, "reshape": False, "index": False, "unsqueeze": False, "broadcast3d": False,
    "expand_as": False, "bias_view": False, "mean": False, "spatial": False, "flinear": False,
    "layernorm2d": False, "early_view": False,
    "literal": False, "cumsum": True, "sum": True, "early_cumsum": True, "channel_index": True,
}  # fmt: skip


class ParamOp(nn.Module):
    """conv -> one use of a raw parameter of kind ``kind`` -> relu."""

    def __init__(self, c_in: int, c: int, kind: str, hw: int) -> None:
        super().__init__()
        self.kind, self.c = kind, c
        self.conv = nn.Conv2d(c_in, c, 3, padding=1)
        shape = {"broadcast3d": (c, 1, 1), "spatial": (1, 1, hw, hw), "flinear": (c, c)}
        self.p = nn.Parameter(torch.randn(shape.get(kind, (c,))) * 0.5 + 1.0)
        self.q = nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x):
        k, p = self.kind, self.p
        if k == "early_view":
            s = p.view(1, -1, 1, 1)  # used before the conv exists in the graph
        elif k == "early_cumsum":
            s = torch.cumsum(p, 0).view(1, -1, 1, 1)
        h = self.conv(x)
        if k == "view":
            h = h * p.view(1, -1, 1, 1)
        elif k == "reshape":
            h = h.mul(p.reshape(1, -1, 1, 1))
        elif k == "index":
            h = h * p[None, :, None, None]
        elif k == "unsqueeze":
            h = h * p.unsqueeze(-1).unsqueeze(-1)
        elif k == "broadcast3d":
            h = p * h
        elif k == "expand_as":
            h = h + p.view(1, -1, 1, 1).expand_as(h)
        elif k == "bias_view":
            h = h * p.view(1, -1, 1, 1) + self.q.view(1, -1, 1, 1)
        elif k == "mean":
            h = h * p.view(1, -1, 1, 1) * p.mean()
        elif k == "spatial":
            h = h + p
        elif k == "flinear":
            h = F.linear(h.permute(0, 2, 3, 1), p, self.q).permute(0, 3, 1, 2)
        elif k == "layernorm2d":
            h = F.layer_norm(torch.permute(h, (0, 2, 3, 1)), (self.c,), p, self.q)
            h = h.permute(0, 3, 1, 2)
        elif k in ("early_view", "early_cumsum"):
            h = h * s
        elif k == "literal":
            h = h * p.view(1, self.c, 1, 1)
        elif k == "cumsum":
            h = h * torch.cumsum(p, 0).view(1, -1, 1, 1)
        elif k == "sum":  # a sum over channels changes with their number
            h = h * p.view(1, -1, 1, 1) * p.sum()
        elif k == "channel_index":  # channel 0 is another channel once permuted
            h = h * p.view(1, -1, 1, 1) * p[0]
        return torch.relu(h)


def random_param_net(seed: int, in_channels: int = 2, hw: int = 6):
    """A random CNN whose blocks use raw parameters through view/reshape/expand/mul etc.

    Returns (model, input, refused): ``refused`` says whether a conversion must fail.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    blocks: list[nn.Module] = []
    c, refused = in_channels, False
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(sorted(PARAM_KINDS))
        c_new = rng.choice([4, 6, 8])
        blocks.append(ParamOp(c, c_new, kind, hw))
        refused |= PARAM_KINDS[kind]
        c = c_new
    model = RandomCNN(blocks, c, 1, classes=rng.choice([2, 3]))
    return model.eval(), torch.randn(rng.randint(1, 3), in_channels, hw, hw), refused


def tiny_cnn() -> nn.Module:
    """The build tests' model: 1x8x8 -> conv 16 (BN) -> conv 24 -> pool -> 10 logits."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(24, 10),
    ).eval()  # fmt: skip
