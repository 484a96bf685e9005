"""convert(on_unsupported="keep"): channels an op cannot resample are kept at their size
(as discrete=[...] on the layers that make them) and the rest converts - ShuffleNetV2's
``chunk`` of a shuffled stream, written here by hand (torchvision is not a test
dependency)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import runtime
from runtime.inn.groups import ConversionError


def _shuffle(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class Unit(nn.Module):
    """ShuffleNetV2's stride-1 unit: half the stream passes, the other half goes through a
    1x1 -> depthwise 3x3 -> 1x1 branch (``mid`` channels inside), then a shuffle."""

    def __init__(self, c: int, mid: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(c // 2, mid, 1), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1, groups=mid),
            nn.Conv2d(mid, c // 2, 1), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return _shuffle(torch.cat([a, self.branch(b)], 1))


class Down(nn.Module):
    """The stride-2 unit: both branches see the whole input; no chunk."""

    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.left = nn.Conv2d(cin, c // 2, 1)
        self.right = nn.Sequential(nn.Conv2d(cin, 8, 1), nn.ReLU(), nn.Conv2d(8, c // 2, 1))

    def forward(self, x):
        return _shuffle(torch.cat([self.left(x), self.right(x)], 1))


class TinyShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = Down(8, 16)
        self.units = nn.Sequential(Unit(16, 12), Unit(16, 12))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.units(self.down(torch.relu(self.stem(x))))
        return self.head(h.mean((2, 3)))


def _net():
    torch.manual_seed(0)
    return TinyShuffleNet().eval(), torch.randn(2, 3, 8, 8)


def test_default_refuses_the_chunk_and_names_the_way_out():
    net, x = _net()
    with pytest.raises(ConversionError, match=r"node 'chunk'.*on_unsupported='keep'") as info:
        runtime.convert(net, (x,))
    assert info.value.keep == "down.left"  # the layer whose channels would lift it


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_keep_converts_the_rest_exactly_and_says_what_it_kept(frontend, tmp_path):
    net, x = _net()
    with pytest.warns(UserWarning, match=r"kept 1 channel group.*'down.left' \(node 'chunk"):
        inn = runtime.convert(net, (x,), on_unsupported="keep", frontend=frontend)
    assert list(inn.info["kept"]) == ["down.left"]
    elastic = {g.name for g in inn.groups if not g.discrete}
    # the stream (down.left, tied to down.right's output and every unit's) stays whole;
    # the stem and every branch's inside stay elastic
    assert elastic == {"stem", "down.right.0", "units.0.branch.0", "units.1.branch.0"}
    with torch.no_grad():
        want = net(x)
        torch.testing.assert_close(inn.sample(1.0)(x), want, rtol=1e-5, atol=1e-5)
        half = inn.sample(0.5)
        assert half(x).shape == want.shape
        # 12 -> 6: the branch shrank; its last conv makes the stream's half: kept at 8
        weights = dict(half.named_parameters())
        assert weights["units.0.branch.0.weight"].shape[0] == 6
        assert weights["units.0.branch.3.weight"].shape[0] == 8
    back = runtime.load(inn.save(tmp_path / "inn"))
    assert back.info["kept"] == inn.info["kept"]


def test_keep_does_not_lift_a_refusal_that_no_fixed_channels_cure():
    class Stored(nn.Module):  # a module innfer cannot rebuild: refused however it is kept
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

        def forward(self, x):
            return self.enc(x)

    with pytest.raises(ConversionError, match=r"cannot store it"):
        runtime.convert(Stored().eval(), (torch.randn(2, 3, 8),), on_unsupported="keep")


def test_on_unsupported_is_checked():
    net, x = _net()
    with pytest.raises(ValueError, match=r"on_unsupported must be 'refuse' or 'keep'"):
        runtime.convert(net, (x,), on_unsupported="fix")


def test_inspect_lists_what_was_kept(tmp_path, capsys):
    from innfer import cli

    net, x = _net()
    with pytest.warns(UserWarning):
        inn = runtime.convert(net, (x,), on_unsupported="keep")
    d = inn.save(tmp_path / "inn")
    assert cli.main(["inspect", str(d)]) == 0
    assert "kept at full size: down.left (node 'chunk'" in capsys.readouterr().out


def test_keep_lifts_every_refusal_of_one_analysis_at_once(monkeypatch):
    # One analysis per refusal: 40 such blocks took 5 s where naming them took 1.2 s
    # (review helper-245). Independent refusals are all kept after the first analysis.
    import runtime.inn.conversion as conversion

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return x + self.b(h * torch.sigmoid(torch.logsumexp(h, 1, keepdim=True)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 1), *[Block() for _ in range(6)])
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))

    net = Net().eval()
    calls = []
    real = conversion.analyse
    monkeypatch.setattr(conversion, "analyse", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.warns(UserWarning, match="kept 6 channel group"):
        inn = runtime.convert(net, (torch.randn(2, 3, 8, 8),), on_unsupported="keep")
    assert sorted(inn.info["kept"]) == [f"body.{i}.a" for i in range(1, 7)]
    assert [g.name for g in inn.groups if not g.discrete] == ["body.0"]  # the stream
    assert len(calls) == 2
