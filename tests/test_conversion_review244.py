"""Review helper-244's conversion findings: each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import runtime
from runtime.inn.groups import ConversionError


class Classifier(nn.Module):
    """conv -> pool -> fc over 10 classes, returned as the best class's logit."""

    def __init__(self, reduce: str) -> None:
        super().__init__()
        self.reduce = reduce
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        logits = self.fc(torch.relu(self.a(x)).mean((2, 3)))
        return logits.max(1).values if self.reduce == "max" else logits.amax(1)


@pytest.mark.parametrize("reduce", ["max", "amax"])
def test_a_class_dim_reduced_before_the_output_stays_whole(reduce):
    # It reached no output, so nothing pinned it: sample(0.5) had 5 of the 10 classes.
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    inn = runtime.convert(Classifier(reduce).eval(), (x,))
    assert [g.name for g in inn.groups if not g.discrete] == ["a"]
    assert inn.sample(0.5).state_dict()["fc.weight"].shape == (10, 8)


class LostWrite(nn.Module):
    """ReXNet's in-place residual into a view, which torch.fx records as a copy; the
    output masked with -inf, or thresholded into decisions."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(16, 10)
        self.register_buffer("allowed", torch.tensor([True] * 8 + [False] * 2))

    def forward(self, x):
        h = torch.relu(self.a(x))
        z = h[:, :8]
        z += self.b(h)
        logits = self.fc(h.mean((2, 3)))
        if self.out == "masked":
            return torch.where(self.allowed, logits, float("-inf"))
        return torch.sigmoid(logits) > 0.5


@pytest.mark.parametrize(
    ("out", "said"), [("masked", "relative error"), ("bool", "entries differ")]
)
def test_a_lost_write_is_refused_behind_a_mask_or_a_threshold(out, said):
    # The full-width check skipped any output holding an inf, and every bool output.
    torch.manual_seed(0)
    with pytest.raises(ConversionError, match=rf"does not compute what the model does.*{said}"):
        runtime.convert(LostWrite(out).eval(), (torch.randn(64, 3, 8, 8),))


def test_a_masked_output_that_is_right_converts():
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = nn.Linear(4, 8), nn.Linear(8, 5)
            self.register_buffer("allowed", torch.tensor([True, True, False, True, False]))

        def forward(self, x):
            logits = self.fc(torch.relu(self.a(x)))
            return torch.where(self.allowed, logits, float("-inf")), logits.argmax(-1) >= 0

    inn = runtime.convert(Masked().eval(), (torch.randn(8, 4),))
    assert [g.name for g in inn.groups if not g.discrete] == ["a"]


class NormalisesInPlace(nn.Module):
    """A preprocessing wrapper: ``x.sub_(mean).div_(std)`` on its input."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1))
        self.a, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x):
        x.sub_(self.mean).div_(self.std)
        return self.fc(torch.relu(self.a(x)).mean((2, 3)))


def test_a_model_writing_its_input_converts_and_leaves_the_callers_tensor_alone():
    # Every run saw the values the one before had written: refused as a lost write, and
    # the caller's example came back changed.
    torch.manual_seed(0)
    net, x = NormalisesInPlace().eval(), torch.rand(2, 3, 8, 8)
    before = x.clone()
    inn = runtime.convert(net, (x,))
    assert torch.equal(x, before)
    y = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(inn.sample(1.0)(y.clone()), net(y.clone()))


def test_a_batch_norm_without_running_statistics_is_refused_at_conversion():
    # It converted, and `innfer build` failed with an internal AssertionError in the export.
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False),
                        nn.ReLU(), nn.Conv2d(8, 2, 1))  # fmt: skip
    with pytest.raises(ConversionError, match=r"1 \(BatchNorm2d\) has no running statistics"):
        runtime.convert(net.eval(), (torch.randn(2, 3, 8, 8),))


def test_the_width_report_of_a_float16_inn_feeds_it_float16():
    # Data sets load as float32: the report failed "Input type (float) and bias type
    # (c10::Half) should be the same" on a model that builds and serves.
    from types import SimpleNamespace

    from runtime.inn.report import width_report

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 4, 3))
    net = net.half().eval()
    inn = runtime.convert(net, (torch.randn(2, 1, 4, 6, dtype=torch.float16),))
    data = SimpleNamespace(x_test=torch.rand(20, 1, 4, 6), y_test=torch.randint(0, 3, (20,)),
                           input_shape=(1, 4, 6))  # fmt: skip
    rows = width_report(inn, [1.0, 0.5], data=data)
    assert [r.width for r in rows] == [1.0, 0.5] and all(0 <= r.accuracy <= 1 for r in rows)
    assert width_report(inn, [0.5])[0].flops > 0  # zeros at the recorded input shape


_PER_ENTRY = {
    "clamp": lambda h: h.clamp(0, 6),
    "clamp_min": lambda h: h.clamp(min=0),
    "where": lambda h: torch.where(h > 0, h, 0.1 * h),
    "maximum": lambda h: torch.maximum(h, torch.zeros_like(h)),
    "square": torch.square,
    "abs": torch.abs,
    "exp": lambda h: torch.exp(-h.abs()),
    "sin": torch.sin,
    "elu": torch.nn.functional.elu,
    "log1p": lambda h: torch.log1p(h.abs()),
    "reciprocal": lambda h: torch.reciprocal(h.abs() + 1),
    "amax": lambda h: h - h.amax(-1, keepdim=True),
    "max_dim": lambda h: h - h.max(-1, keepdim=True).values,
    "var": lambda h: h / (h.var(-1, keepdim=True, unbiased=False) + 1),
    # and these, that review helper-245 found still missing
    "relu6": torch.nn.functional.relu6,
    "clip": lambda h: torch.clip(h, -1, 1),
    "celu": torch.nn.functional.celu,
    "hardshrink": torch.nn.functional.hardshrink,
    "softshrink": torch.nn.functional.softshrink,
    "max_other": lambda h: torch.max(h, torch.zeros_like(h)),
    "min_other": lambda h: torch.min(h, torch.ones_like(h)),
}


class _Block(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 2)

    def forward(self, x):
        return self.b(self.op(self.a(x)))


@pytest.mark.parametrize("name", sorted(_PER_ENTRY))
def test_per_entry_ops_convert_under_torch_export_as_under_fx(name):
    # A model fx cannot trace falls back to torch.export, whose ATen ops had no lowering:
    # "no rule for 'clamp.default'" for a block fx converted.
    torch.manual_seed(0)
    net, x = _Block(_PER_ENTRY[name]).eval(), torch.randn(2, 3, 4)
    inn = runtime.convert(net, (x,), frontend="export")
    assert [g.name for g in inn.groups if not g.discrete] == ["a"]
    with torch.no_grad():
        torch.testing.assert_close(inn.sample(1.0)(x), net(x), rtol=1e-5, atol=1e-5)
        assert inn.sample(0.5)(x).shape == (2, 3, 2)


def test_a_refusal_of_the_export_fallback_says_why_fx_was_not_used():
    class LengthSliced(nn.Module):  # fx cannot slice by a Proxy's length
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.fc1, self.out = nn.Linear(5, 16), nn.Linear(16, 32), nn.Linear(32, 3)
            self.register_buffer("pos", torch.randn(1, 32, 16))

        def forward(self, x):
            h = self.inp(x) + self.pos[:, : x.shape[1]]
            return self.out(torch.logcumsumexp(self.fc1(h), -1).mean(1))

    with pytest.raises(ConversionError, match=r"no rule for 'logcumsumexp.*captured by "
                       r"torch.export: torch.fx could not trace the model: slice"):  # fmt: skip
        runtime.convert(LengthSliced().eval(), (torch.randn(2, 7, 5),))


def test_a_group_norm_splitting_a_grouped_convs_channels_otherwise_is_named_as_such():
    class Odd(nn.Module):  # conv of 3 groups, then GroupNorm(5): it was "a grouped Conv"
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 15, 3, padding=1)
            self.b = nn.Conv2d(15, 15, 3, padding=1, groups=3)
            self.gn, self.fc = nn.GroupNorm(5, 15), nn.Linear(15, 4)

        def forward(self, x):
            return self.fc(self.gn(self.b(torch.relu(self.a(x)))).mean((2, 3)))

    with pytest.raises(ConversionError, match=r"a GroupNorm with 5 groups reads channels that "
                       r"a grouped conv or group norm with 3 groups"):  # fmt: skip
        runtime.convert(Odd().eval(), (torch.randn(2, 3, 8, 8),))


def test_a_mean_over_channels_no_layer_reads_keeps_them_elastic():
    # Only a max / min picks among them: a per-pixel map h.mean(1) does not depend on their
    # count, and _pin_unread pinned it too (review helper-245)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU())

    class MeanMap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = net

        def forward(self, x):
            return self.body(x).mean(1)

    inn = runtime.convert(MeanMap().eval(), (torch.randn(2, 3, 8, 8),))
    assert sorted(g.name for g in inn.groups if not g.discrete) == ["body.0", "body.2"]
