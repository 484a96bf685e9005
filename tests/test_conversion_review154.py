"""torch.nn layers a converted model is rebuilt from (runtime.inn.graphio): constructor
arguments read back where they are not attributes of the same name, and a clear refusal
for a layer that cannot be stored (review helper-154)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from netgen import tiny_cnn
from torch import nn

import runtime
from runtime.inn.layout import ConversionError


class Clipped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.f, self.o = nn.Linear(8, 16), nn.Hardtanh(-2.0, 2.0), nn.Linear(16, 3)

    def forward(self, x):
        return self.o(self.f(self.a(x) * 3))


class Recurrent(nn.Module):
    def __init__(self, cls, **kwargs):
        super().__init__()
        self.r, self.o = cls(8, 16, batch_first=True, **kwargs), nn.Linear(16, 3)

    def forward(self, x):
        return self.o(self.r(x)[0][:, -1])


def _round_trip(model, x, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a recurrent model has no elastic width: said
        inn = runtime.convert(model.eval(), (x,))
    loaded = runtime.load(inn.save(tmp_path / "inn"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.sample(1.0)(x), model(x))
    return loaded


def test_hardtanh_with_its_own_bounds_converts_and_stays_elastic(tmp_path):
    # "cannot read constructor argument 'min_value'" (a deprecated alias): an internal
    # SpecError, with discrete=[...] no way out either.
    x = torch.randn(4, 8)
    inn = _round_trip(Clipped(), x, tmp_path)
    assert inn.sample(1.0).f.min_val == -2.0 and inn.sample(1.0).f.max_val == 2.0
    assert inn.sample(0.5).a.out_features == 8


@pytest.mark.parametrize(
    "cls, kwargs",
    [(nn.LSTM, {"num_layers": 2}), (nn.GRU, {"bidirectional": False}),
     (nn.RNN, {"nonlinearity": "relu"}), (nn.LSTM, {"proj_size": 4})],
)  # fmt: skip
def test_recurrent_layers_are_kept_as_they_are(cls, kwargs, tmp_path):
    # "cannot build LSTM({})": their constructors take *args, **kwargs, so nothing was read
    x = torch.randn(4, 5, 8)
    model = Recurrent(cls, **kwargs)
    if kwargs.get("proj_size"):
        model.o = nn.Linear(4, 3)
    rebuilt = _round_trip(model, x, tmp_path).sample(1.0).r
    assert {k: getattr(rebuilt, k) for k in kwargs} == kwargs


@pytest.mark.parametrize("discrete", [(), ["emb"]])
def test_a_layer_that_cannot_be_stored_is_refused_without_a_dead_end(discrete):
    # TransformerEncoder's constructor takes a layer: the advice was discrete=['emb'], which
    # then failed with an internal SpecError (not a ConversionError).
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(6, 32)
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.enc, self.head = nn.TransformerEncoder(layer, 2), nn.Linear(32, 3)

        def forward(self, x):
            return self.head(self.enc(self.emb(x)).mean(1))

    with pytest.raises(ConversionError, match="cannot store it") as caught:
        runtime.convert(Encoder().eval(), (torch.randn(2, 5, 6),), discrete=discrete)
    assert "discrete=" not in str(caught.value)


class Between(nn.Module):
    """``f`` between two linear layers: on their elastic channels."""

    def __init__(self, f):
        super().__init__()
        self.a, self.o = nn.Linear(8, 16), nn.Linear(16, 3)
        self.f = f if isinstance(f, nn.Module) else None
        self._f = f

    def forward(self, x):
        h = self.a(x)
        return self.o(self.f(h) if self.f is not None else self._f(h))


# Each acts on every channel alone (or against scalars / tensors of x's own layout): they
# were refused, "no rule", though the README's activations suggested they convert.
PER_CHANNEL = {
    "clamp": lambda h: h.clamp(0, 6),
    "hard-swish by hand": lambda h: h * (h + 3).clamp(0, 6) / 6,
    "torch.clamp_min": lambda h: torch.clamp_min(h, 0.1),
    "where(x > 0)": lambda h: torch.where(h > 0, h, 0.1 * h),
    "square": torch.square,
    "log1p": lambda h: torch.log1p(h.abs()),
    "sin, cos": lambda h: h.sin() + torch.cos(h),
    "log, log2": lambda h: torch.log(h.abs() + 1) + (h.abs() + 1).log2(),
    "hardshrink, softshrink": lambda h: F.hardshrink(h) + F.softshrink(h),
    "sign": torch.sign,
    "reciprocal": lambda h: (h.abs() + 1).reciprocal(),
    "nan_to_num": torch.nan_to_num,
    "selu, celu, logsigmoid, softsign": lambda h: F.softsign(F.logsigmoid(F.celu(F.selu(h)))),
    "nn.Softsign": nn.Softsign(),
    "nn.LogSigmoid": nn.LogSigmoid(),
    "nn.Tanhshrink": nn.Tanhshrink(),
}


# Per channel too, and still refused: no tier of them would export to ONNX (opset 17).
NOT_EXPORTED = {"F.threshold": lambda h: F.threshold(h, 0.1, 0.0), "nn.RMSNorm": nn.RMSNorm(16),
                "expm1": torch.expm1, "x.expm1()": lambda h: h.expm1()}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NOT_EXPORTED))
def test_per_channel_ops_onnx_cannot_export_are_refused_at_conversion(name):
    with pytest.raises(ConversionError, match="no rule"):
        runtime.convert(Between(NOT_EXPORTED[name]).eval(), (torch.randn(4, 8),))


@pytest.mark.parametrize("name", sorted(PER_CHANNEL))
def test_per_channel_ops_convert_stay_elastic_and_export(name, tmp_path):
    from tests.test_rules import _converts, _onnx_matches

    x = torch.randn(4, 8)
    inn = _converts(Between(PER_CHANNEL[name]), x, tmp_path)
    assert any(not g.discrete for g in inn.groups)
    half = inn.sample(0.5)
    assert half.a.out_features == 8
    _onnx_matches(half, x)


@pytest.mark.parametrize(
    "var, elastic",
    [(lambda h: h.var(1, keepdim=True), False),
     (lambda h: torch.std(h, 1, True, True) ** 2, False),
     (lambda h: h.var(1, keepdim=True, correction=2), False),
     (lambda h: h.var(1, keepdim=True, unbiased=False), True),
     (lambda h: torch.var(h, 1, keepdim=True, correction=0), True)],
)  # fmt: skip
def test_a_variance_over_channels_with_bessels_correction_is_refused(var, elastic):
    # Its n / (n - 1) changes with the width (+33 % at 4 channels, 2 % at 64), though the
    # rule said a var "does not depend on how many there are" (review helper-154).
    def normed(h):
        return (h - h.mean(1, keepdim=True)) / (var(h) + 1e-5).sqrt()

    x = torch.randn(4, 8)
    if elastic:
        inn = runtime.convert(Between(normed).eval(), (x,))
        assert any(not g.discrete for g in inn.groups)
    else:
        with pytest.raises(ConversionError, match=r"Bessel's correction.*unbiased=False"):
            runtime.convert(Between(normed).eval(), (x,))


def test_where_of_a_condition_alone_is_refused_with_a_way_out():
    # torch.where(cond) returns indices: registered with the three-operand where, it crashed
    # the broadcast rule (IndexError), and discrete=[...] no longer helped (review 155).
    def zeroed(h):
        return h.index_fill(1, torch.where(h[0] > 0)[0], 0.0)

    x = torch.randn(4, 8)
    with pytest.raises(ConversionError, match="no rule for where"):
        runtime.convert(Between(zeroed).eval(), (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no elastic width left: said
        runtime.convert(Between(zeroed).eval(), (x,), discrete=["a"])


def test_a_mask_per_channel_is_sampled_not_interpolated():
    # A bool buffer tied to the channels was interpolated and cast back: any nonzero
    # neighbour turned a masked-off channel on (11 of 16 kept at full width, 8 of 8 at half;
    # review 155). Each sampled channel takes the mask of the channel it weighs most.
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
            self.register_buffer("mask", (torch.arange(16) < 8).reshape(1, 16, 1, 1))

        def forward(self, x):
            return self.o(torch.where(self.mask, self.a(x), 0.0))

    inn = runtime.convert(Masked().eval(), (torch.randn(2, 3, 8, 8),), permute=False)
    half = inn.sample(0.5)
    assert half.mask.dtype == torch.bool
    assert half.mask.flatten().tolist() == [True] * 4 + [False] * 4


@pytest.mark.parametrize(
    "model, example, said",
    [
        (lambda: tiny_cnn().state_dict(), True, r"not its state_dict: build the module"),
        (lambda: type(tiny_cnn()), True, r"a model instance, not the class"),
        (lambda: "model.pt", True, r"takes a torch.nn.Module, not str \(a checkpoint path"),
        (tiny_cnn, False, r"example_inputs must be a tensor or a tuple of tensors"),
    ],
    ids=["state_dict", "class", "path", "no example"],
)
def test_the_usual_mistakes_in_a_convert_call_are_said_as_such(model, example, said):
    # They surfaced as AttributeError "'collections.OrderedDict' object has no attribute
    # 'parameters'", TypeError "Module.parameters() missing 1 required positional
    # argument" and "'NoneType' object is not iterable" (review 170).
    with pytest.raises(ConversionError, match=said):
        runtime.convert(model(), (torch.randn(2, 1, 8, 8),) if example else None)
