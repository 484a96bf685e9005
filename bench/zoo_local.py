"""Architectures the compression literature benchmarks on that no installed zoo ships, written
here from their papers (random init) for bench/zoo.py's ``local/`` entries:

- ``cifar_resnet20``: He et al. 2016's CIFAR ResNet-20 (3 stages of 3 basic blocks, 16/32/64
  channels) with the option-A shortcut - identity, strided, zeros padded on for the new
  channels. The network most channel-pruning papers report on (with ResNet-56).
- ``espcn``: Shi et al. 2016's sub-pixel super-resolution net (5x5 64, 3x3 32, 3x3 3*r*r,
  pixel_shuffle(r)), r = 3.
- ``edsr_small``: an EDSR-baseline-like upsampler (Lim et al. 2017): head, 4 residual
  blocks of 32 channels, conv to 4x the channels + pixel_shuffle(2), tail.
- ``token_topk``: a patch-token classifier that keeps its k highest-scoring tokens
  (``scores.topk(k, dim=1)``, then a gather) before pooling, as token-pruning ViTs do.

Each takes a (N, 3, size, size) image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.models import BasicBlock


class _OptionA(BasicBlock):
    """A basic block whose shortcut pads zeros on for the new channels (option A)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__(c_in, c_out, stride)
        self.down = None  # (no projection)
        self.pad = (c_out - c_in) // 2 if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.pad is not None:  # (N, C, H, W) -> (N, C + 2p, H / 2, W / 2)
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(h + x)


class CifarResNet20(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        blocks, c = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(_OptionA(c, width, stride if i == 0 else 1))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.stem(x)))
        return self.fc(h.mean((2, 3)))


class ESPCN(nn.Module):
    def __init__(self, scale: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 64, 5, padding=2), nn.Tanh(), nn.Conv2d(64, 32, 3, padding=1), nn.Tanh(),
            nn.Conv2d(32, 3 * scale * scale, 3, padding=1),
        )  # fmt: skip
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.body(x))


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.b(F.relu(self.a(x)))  # EDSR's residual scaling


class EDSRSmall(nn.Module):
    def __init__(self, c: int = 32, blocks: int = 4) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(*[_Residual(c) for _ in range(blocks)])
        self.up = nn.Sequential(nn.Conv2d(c, 4 * c, 3, padding=1), nn.PixelShuffle(2))
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(self.up(h + self.body(h)))


class TokenTopK(nn.Module):
    """4x4 patches -> 64-channel tokens -> a score per token -> the top half -> MLP -> classes."""

    def __init__(self, classes: int = 10, dim: int = 64) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.score = nn.Linear(dim, 1)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        keep = t.shape[1] // 2
        idx = self.score(t).squeeze(-1).topk(keep, dim=1).indices  # (N, keep)
        t = torch.gather(t, 1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        return self.head((t + self.mlp(t)).mean(1))


LOCAL = {
    "local/cifar_resnet20": CifarResNet20,
    "local/espcn": ESPCN,
    "local/edsr_small": EDSRSmall,
    "local/token_topk": TokenTopK,
}
