"""In-place arithmetic under torch.export: ``out += shortcut`` on a block's fresh output is
lowered out of place (as fx records it) and converts; a write that another node could see
(through a view) stays refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import runtime
from runtime.inn.groups import ConversionError


class Block(nn.Module):
    """torchvision's BasicBlock pattern: ``out += identity`` on the second conv's output."""

    def __init__(self, how: str = "iadd") -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, 8, 1)
        self.c1 = nn.Conv2d(8, 12, 3, padding=1)
        self.c2 = nn.Conv2d(12, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        out = self.c2(torch.relu(self.c1(x)))
        if self.how == "iadd":
            out += x
            out *= 0.5
        elif self.how == "unbound":  # add_ without rebinding; ``out`` is read again after it
            out.add_(x)
        else:  # a write into a view of out: reaches out through the alias
            out[:, :4] += x[:, :4]
        return self.head(torch.relu(out).mean((2, 3)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_in_place_residual_add_converts_under_both_frontends(frontend):
    torch.manual_seed(0)
    net, x = Block().eval(), torch.randn(2, 3, 8, 8)
    inn = runtime.convert(net, (x,), frontend=frontend)
    assert inn.info["frontend"] == frontend
    # c1's inside and the residual stream (stem, tied to c2 by the add) are elastic
    assert len([g for g in inn.groups if not g.discrete]) == 2
    with torch.no_grad():
        torch.testing.assert_close(inn.sample(1.0)(x), net(x), rtol=1e-5, atol=1e-5)
        assert inn.sample(0.5)(x).shape == (2, 2)


def test_add_in_place_without_rebinding_converts_under_export():
    # torch.export follows the tensor: relu(out) reads add_'s result, so lowering it out of
    # place keeps the shortcut (a graph where relu read the conv itself would keep add_)
    torch.manual_seed(0)
    net, x = Block("unbound").eval(), torch.randn(2, 3, 8, 8)
    inn = runtime.convert(net, (x,), frontend="export")
    with torch.no_grad():
        torch.testing.assert_close(inn.sample(1.0)(x), net(x), rtol=1e-5, atol=1e-5)


def test_add_in_place_into_a_view_stays_refused_under_export():
    torch.manual_seed(0)
    with pytest.raises(ConversionError, match=r"writes in place"):
        runtime.convert(Block("view").eval(), (torch.randn(2, 3, 8, 8),), frontend="export")
