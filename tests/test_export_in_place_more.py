"""torch.export's in-place activations and dropouts, embeddings kept whole, and batch
statistics refused (review helper-245): each converted under fx and was refused, or
ignored, under torch.export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import runtime
from runtime.inn.groups import ConversionError

_IN_PLACE = {
    "dropout": lambda: nn.Dropout(0.2, inplace=True),
    "dropout2d": lambda: nn.Dropout2d(0.2, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "selu": lambda: nn.SELU(inplace=True),
    "celu": lambda: nn.CELU(inplace=True),
    "hardsigmoid": lambda: nn.Hardsigmoid(inplace=True),
    "mish": lambda: nn.Mish(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
}


@pytest.mark.parametrize("name", sorted(_IN_PLACE))
def test_in_place_activations_and_dropouts_convert_under_export(name):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _IN_PLACE[name](), nn.Conv2d(8, 2, 1))
    x = torch.randn(2, 3, 6, 6)
    inn = runtime.convert(net.eval(), (x,), frontend="export")
    assert [g.name for g in inn.groups if not g.discrete] == ["0"]
    with torch.no_grad():
        torch.testing.assert_close(inn.sample(1.0)(x), net(x), rtol=1e-5, atol=1e-5)


def test_functional_batch_norm_on_batch_statistics_is_refused_on_activations_only():
    class BatchStats(nn.Module):
        def __init__(self, on_weight: bool) -> None:
            super().__init__()
            self.on_weight = on_weight
            self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            if self.on_weight:  # timm's StdConv: the kernel standardised, a weight
                w = self.conv.weight
                w = F.batch_norm(w.reshape(1, 8, -1), None, None, training=True, eps=1e-6)
                return self.head(F.conv2d(x, w.reshape_as(self.conv.weight)))
            h = F.batch_norm(self.conv(x), None, None, training=True)
            return self.head(h)

    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ConversionError, match=r"F.batch_norm with training=True"):
        runtime.convert(BatchStats(False).eval(), (x,))
    runtime.convert(BatchStats(True).eval(), (x,))  # converts


class _LengthChecked(nn.Module):
    """fx cannot trace it (a branch on the length): captured by torch.export; an op without
    a rule (logsumexp) acts on the embedding's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)
        self.pos = nn.Parameter(torch.randn(32, 16) * 0.02)

    def forward(self, ids):
        h = self.emb(ids)
        if ids.shape[1] > 4:
            h = h + self.pos[: ids.shape[1]]
        h = h - torch.logsumexp(h, -1, keepdim=True)
        return self.head((h + self.fc2(F.gelu(self.fc1(h)))).mean(1))


@pytest.mark.parametrize("how", [{"discrete": ["emb"]}, {"on_unsupported": "keep"}])
def test_an_embedding_is_kept_whole_under_export_as_under_fx(how):
    # Its output channels are the table's dim 1: discrete=["emb"] pinned dim 0 and nothing
    # else, and "keep" had no layer to name (review helper-245)
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 8))
    with pytest.raises(ConversionError, match=r"discrete=\['emb'\]"):
        runtime.convert(_LengthChecked().eval(), (ids,))
    with pytest.warns() if "on_unsupported" in how else _nothing():
        inn = runtime.convert(_LengthChecked().eval(), (ids,), **how)
    assert inn.info["frontend"] == "export"
    assert [g.name for g in inn.groups if not g.discrete] == ["fc1"]


def _nothing():
    import contextlib

    return contextlib.nullcontext()
