"""Small demo models for the offline data sets in :mod:`runtime.demo.data`.

Every model is plain ``torch.nn`` and traceable by ``torch.fx.symbolic_trace``: no
data-dependent control flow, no literal batch or channel sizes in reshapes (global pooling
is followed by ``torch.flatten(x, 1)``), so width conversion can rewrite the graph.
ReLUs are not in-place, so forward hooks that record conv/BN outputs (for example to
gather channel statistics) keep the pre-activation values.

Example:
    >>> import torch
    >>> from runtime.demo import zoo
    >>> model = zoo.build("digits_cnn")
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "DATASET_FOR",
    "MODELS",
    "BasicBlock",
    "DigitsCNN",
    "DigitsMLP",
    "Mnist1DCNN",
    "MnistResNet",
    "build",
]


def _conv_block(c_in: int, c_out: int, batchnorm: bool) -> list[nn.Module]:
    """conv3x3 (padding 1) [+ BatchNorm2d] + ReLU; the conv has no bias when BN follows it."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    return layers


class DigitsCNN(nn.Module):
    """CNN for 8x8 digits: conv 1->32->64 (max-pool 2) ->64, global average pool, linear.

    Example:
        >>> model = DigitsCNN(batchnorm=True)
        >>> model(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(self, batchnorm: bool = False, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_block(1, 32, batchnorm),  # (B, 32, 8, 8)
            *_conv_block(32, 64, batchnorm),  # (B, 64, 8, 8)
            nn.MaxPool2d(2),  # (B, 64, 4, 4)
            *_conv_block(64, 64, batchnorm),  # (B, 64, 4, 4)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)  # (B, 64, 1, 1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (B, 64, 4, 4)
        x = torch.flatten(self.pool(x), 1)  # (B, 64)
        return self.fc(x)  # (B, num_classes)


class DigitsMLP(nn.Module):
    """MLP for 8x8 digits: flatten 64 -> hidden[0] -> hidden[1] ... -> 10, ReLU between.

    Example:
        >>> model = DigitsMLP(hidden=(128, 64))
        >>> model(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(self, hidden: Sequence[int] = (256, 256), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(1)]  # (B, 64)
        width = 64
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]  # (B, h)
            width = h
        layers.append(nn.Linear(width, num_classes))  # (B, num_classes)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 1, 8, 8) -> (B, num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block: two conv3x3+BN, skip (identity or 1x1 conv+BN), add, ReLU.

    The skip is a projection whenever the stride or channel count changes, so the add
    always sees matching shapes.

    Example:
        >>> block = BasicBlock(32, 64, stride=2)
        >>> block(torch.zeros(1, 32, 28, 28)).shape
        torch.Size([1, 64, 14, 14])
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )
        else:
            self.shortcut = nn.Identity()
        # A separate ReLU module after the add (not reused from relu1) keeps one module per
        # graph node, which simplifies graph rewriting.
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))  # (B, c_out, H/s, W/s)
        out = self.bn2(self.conv2(out))  # (B, c_out, H/s, W/s)
        return self.relu2(out + self.shortcut(x))  # (B, c_out, H/s, W/s)


class MnistResNet(nn.Module):
    """Small ResNet for 28x28 MNIST: stem, a block at c0, a stride-2 block c0->c1, linear.

    With ``stem_pool`` (the default) a 2x2 max-pool follows the stem, so the blocks run at
    14x14 and 7x7: 4x fewer FLOPs, and a receptive field large enough that global average
    pooling still sees whole strokes. Without it (blocks at 28x28 and 14x14) training on
    mnist5k converged far slower here (about 95% after 4 epochs and 25 s, against 98% in
    under 20 s with the pool).

    Example:
        >>> model = MnistResNet(channels=(16, 32))
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, channels: Sequence[int] = (32, 64), num_classes: int = 10, stem_pool: bool = True
    ) -> None:
        super().__init__()
        c0, c1 = channels
        stem: list[nn.Module] = [
            nn.Conv2d(1, c0, 3, padding=1, bias=False),  # (B, c0, 28, 28)
            nn.BatchNorm2d(c0),
            nn.ReLU(),
        ]
        if stem_pool:
            stem.append(nn.MaxPool2d(2))  # (B, c0, 14, 14)
        self.stem = nn.Sequential(*stem)
        self.layer1 = BasicBlock(c0, c0)  # (B, c0, S, S) with S = 14 (stem_pool) or 28
        self.layer2 = BasicBlock(c0, c1, stride=2)  # (B, c1, S/2, S/2)
        self.pool = nn.AdaptiveAvgPool2d(1)  # (B, c1, 1, 1)
        self.fc = nn.Linear(c1, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, c0, S, S)
        x = self.layer1(x)  # (B, c0, S, S)
        x = self.layer2(x)  # (B, c1, S/2, S/2)
        x = torch.flatten(self.pool(x), 1)  # (B, c1)
        return self.fc(x)  # (B, num_classes)


class Mnist1DCNN(nn.Module):
    """1-D CNN for MNIST-1D (sequences of 40): three conv layers, global pool, linear.

    Example:
        >>> Mnist1DCNN()(torch.zeros(2, 1, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 64), num_classes: int = 10) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv1d(1, c0, 5, padding=2), nn.BatchNorm1d(c0), nn.ReLU(),  # (B, c0, 40)
            nn.Conv1d(c0, c1, 3, stride=2, padding=1), nn.BatchNorm1d(c1), nn.ReLU(),  # /20
            nn.Conv1d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm1d(c2), nn.ReLU(),  # /10
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool1d(1)  # (B, c2, 1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))  # (B, num_classes)


# Name -> constructor; the keys are the names build() accepts.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mnist1d_cnn": Mnist1DCNN,
    "digits_cnn": lambda **kw: DigitsCNN(batchnorm=False, **kw),
    "digits_cnn_bn": lambda **kw: DigitsCNN(batchnorm=True, **kw),
    "digits_mlp": DigitsMLP,
    "mnist_resnet": MnistResNet,
}

# Model name -> name of the runtime.demo.data data set it is built for.
DATASET_FOR: dict[str, str] = {
    "mnist1d_cnn": "mnist1d",
    "digits_cnn": "digits",
    "digits_cnn_bn": "digits",
    "digits_mlp": "digits",
    "mnist_resnet": "mnist5k",
}


def build(name: str, **kwargs: object) -> nn.Module:
    """Build zoo model ``name`` with fresh (global-RNG) weights; kwargs go to its constructor.

    Example:
        >>> build("mnist_resnet", channels=(16, 32)).fc.in_features
        32
    """
    try:
        ctor = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None
    return ctor(**kwargs)
