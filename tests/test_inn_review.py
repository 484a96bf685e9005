"""Defects a review of runtime/inn found, each pinned by a test that fails without its fix
(one section per finding of the review, numbered as it numbered them)."""

from __future__ import annotations

import operator
import types
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from netgen import tiny_cnn
from textmodel import TinyEmbedder
from torch import fx, nn

import runtime.inn.calibrate as calibrate_module
from runtime import convert
from runtime.build.export import export_onnx
from runtime.inn.calibrate import calibrate, recompute_norm_stats
from runtime.inn.capture import capture, lower
from runtime.inn.distill import calibrate_text
from runtime.inn.groups import ConversionError
from runtime.inn.model import IntegralModel, load

aten = torch.ops.aten


def _randomise_norms(model: nn.Module) -> None:
    """Statistics and affine parameters far from a fresh norm's, so that a fold shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


class CheckedCNN(nn.Module):
    """A CNN with a shape check (torch.fx cannot trace it; torch.export can): 2d and 1d convs,
    one without a bias, a grouped and a depthwise one (a channel multiplier of 2), a norm
    after each kind, an in-place ReLU, max and adaptive pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.check = True  # False: the same network, traceable by torch.fx
        self.c1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.bn2 = nn.Conv2d(16, 24, 3, padding=1, groups=4), nn.BatchNorm2d(24)
        self.c3 = nn.Conv2d(24, 32, 1)
        self.dw, self.bn3 = nn.Conv1d(32, 64, 3, groups=32), nn.BatchNorm1d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):  # (B, 1, 8, 8)
        if self.check and x.shape[-1] != 8:
            raise ValueError("expects 8x8 inputs")
        h = F.relu(self.bn1(self.c1(x)), inplace=True)  # (B, 16, 8, 8)
        h = F.max_pool2d(torch.relu(self.bn2(self.c2(h))), 2)  # (B, 24, 4, 4)
        h = self.dw(self.c3(h).flatten(2))  # (B, 64, 14)
        return self.fc(F.adaptive_avg_pool1d(self.bn3(h), 1).flatten(1))  # (B, 10)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    net = CheckedCNN().eval()
    _randomise_norms(net)
    return net, torch.randn(6, 1, 8, 8)


def _traceable(net: CheckedCNN) -> CheckedCNN:
    twin = CheckedCNN().eval()
    twin.load_state_dict(net.state_dict())
    twin.check = False
    return twin


def _batch_norms(module: fx.GraphModule) -> int:
    return sum(n.target is F.batch_norm for n in module.graph.nodes) + sum(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()
    )


def _shape(inn: IntegralModel) -> list:
    return [(g.name, g.size, g.blocks) for g in inn.groups]


# -- 2: a CNN captured by torch.export ----------------------------------------------------------
def test_export_captured_cnn_is_elastic_and_samples_as_its_fx_conversion(cnn):
    net, x = cnn
    source = {k: v.clone() for k, v in net.state_dict().items()}
    inn = convert(net, (x[:2],))  # auto: fx cannot trace it, torch.export captures it
    ref = convert(_traceable(net), (x[:2],), frontend="fx")
    assert inn.info["frontend"] == "export" and ref.info["frontend"] == "fx"
    # the same groups as torch.fx's module rules find: every conv's width, the grouped
    # conv's blocks, the depthwise conv following its input
    assert _shape(inn) == _shape(ref) == [("c1", 16, 4), ("c2", 24, 4), ("c3", 32, 1)]
    assert inn.info["folded_norms"] and _batch_norms(inn.sample(1.0)) == 0
    with torch.no_grad():
        torch.testing.assert_close(inn.sample(1.0)(x), net(x), rtol=1e-4, atol=1e-5)
        for w in (0.5, 0.25):
            torch.testing.assert_close(inn.sample(w)(x), ref.sample(w)(x), rtol=1e-4, atol=1e-5)
    half = sum(p.numel() for p in inn.sample(0.5).parameters())
    assert half < 0.5 * sum(p.numel() for p in inn.sample(1.0).parameters())
    # the fold replaced the source's tensors, it did not write into them
    assert all(torch.equal(source[k], v) for k, v in net.state_dict().items())


def test_export_captured_cnn_keeps_its_norms_when_asked_and_says_so(cnn):
    net, x = cnn
    inn = convert(net, (x[:2],), frontend="export", fold_norms=False)
    ref = convert(_traceable(net), (x[:2],), frontend="fx", fold_norms=False)
    assert not inn.info["folded_norms"] and _batch_norms(inn.sample(0.5)) == 3
    with torch.no_grad():
        torch.testing.assert_close(inn.sample(0.5)(x), ref.sample(0.5)(x), rtol=1e-4, atol=1e-5)


def test_export_captured_cnn_tier_round_trips_and_runs_in_onnx_runtime(cnn, tmp_path):
    net, x = cnn
    inn = convert(net, (x[:2],), frontend="export")
    half = load(inn.save(tmp_path / "inn")).sample(0.5)
    onnx = export_onnx(half, [("x", (1, 8, 8), torch.float32)], ["y"])
    (y,) = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )
    with torch.no_grad():
        np.testing.assert_allclose(y, inn.sample(0.5)(x).numpy(), rtol=1e-4, atol=1e-5)


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.e = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.c(x)
        h.relu_()  # on a new tensor nothing else reads: lowered out of place
        F.hardtanh_(h[:, :2], 0.0, 0.5)  # result unused; it changes h through the view
        return self.e(h)


def test_in_place_activations_lower_only_where_nothing_else_sees_the_difference():
    torch.manual_seed(0)
    net, x = InPlace().eval(), torch.randn(2, 3, 4, 4)
    gm = capture(net, (x,), frontend="export")
    kept = [n.target for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
    assert kept == [aten.hardtanh_.default]  # relu_ became torch.relu; the view's op stays
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x))


def test_a_conversion_without_elastic_width_warns():
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="no elastic width"):
        inn = convert(nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval(), (x,))
    assert inn.groups == []
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no elastic width")
        convert(mlp, (x,))  # an elastic hidden width: nothing to say


# -- 4: aten.slice with a negative dim ----------------------------------------------------------
class SliceLast(nn.Module):
    def forward(self, x):  # (B, T, 8) -> (B, T, 2)
        return aten.slice.Tensor(x, -1, 0, 2) * 2


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_lowering_slices_a_negative_dim_from_the_end(frontend):
    """An exported graph knows each tensor's rank; an fx graph does not (sliced from the end)."""
    x = torch.randn(3, 5, 8)
    if frontend == "export":
        gm = torch.export.export(SliceLast(), (x,), strict=False).module()
    else:
        gm = fx.symbolic_trace(SliceLast())
    torch.testing.assert_close(lower(gm)(x), x[..., :2] * 2)


class SliceSteps(nn.Module):
    """Keeps the first two steps (dim -2, not a channel dim) of a hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):  # (B, T, 8) -> (B, 2, 3)
        return self.b(torch.relu(aten.slice.Tensor(self.a(x), -2, 0, 2)))


def test_export_conversion_with_a_negative_slice_dim_is_exact():
    torch.manual_seed(0)
    net, x = SliceSteps().eval(), torch.randn(3, 5, 8)
    inn = convert(net, (x,), frontend="export")
    assert _shape(inn) == [("a", 16, 1)]
    with torch.no_grad():
        torch.testing.assert_close(inn.sample(1.0)(x), net(x))
        assert inn.sample(0.5)(x).shape == (3, 2, 3)


def test_a_negative_dim_slice_of_continuous_channels_cuts_them():
    class SliceChannels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(8, 3)

        def forward(self, x):  # the first 8 of a's 16 channels: picked by position
            return self.b(aten.slice.Tensor(torch.relu(self.a(x)), -1, 0, 8))

    # Refused until channel slices cut their groups (a's 16 into [0:8] and [8:16]); the
    # slice on dim -1 must still be seen as the channel dim 2, and its stop follow the width.
    model, x = SliceChannels().eval(), torch.randn(3, 5, 8)
    inn = convert(model, (x,), frontend="export")
    assert sorted(g.size for g in inn.groups if not g.discrete) == [8, 8]
    half = inn.sample(0.5)
    with torch.no_grad():
        torch.testing.assert_close(inn.sample(1.0)(x), model(x))
        assert half(x).shape == (3, 5, 3)
    stops = [n.args[1][-1].stop for n in half.graph.nodes if n.target is operator.getitem]
    assert stops == [4]


# -- 5: softmax over continuous channels ---------------------------------------------------------
class HiddenSoftmax(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b, self.softmax = nn.Linear(4, 64), nn.Linear(64, 3), nn.Softmax(dim=-1)

    def forward(self, x):  # (B, 4)
        h = self.a(x)  # (B, 64): a continuous group
        if self.kind == "function":
            h = torch.softmax(h, dim=-1)
        elif self.kind == "log":
            h = F.log_softmax(h, 1)
        elif self.kind == "method":
            h = h.softmax(-1)
        else:
            h = self.softmax(h)
        return self.b(h)


@pytest.mark.parametrize(
    ("kind", "frontend"),
    [("function", "fx"), ("log", "fx"), ("method", "fx"), ("module", "fx"),
     ("function", "export"), ("log", "export")],
)  # fmt: skip
def test_softmax_over_continuous_channels_is_refused(kind, frontend):
    """Its normaliser sums the channels: at width n of m every output was scaled by m / n."""
    with pytest.raises(ConversionError, match="softmax over a channel dim"):
        convert(HiddenSoftmax(kind).eval(), (torch.randn(2, 4),), frontend=frontend)


def test_softmax_over_classes_or_fixed_channels_still_converts():
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    classes = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3), nn.Softmax(-1))
    inn = convert(classes.eval(), (x,))
    assert _shape(inn) == [("0", 32, 1)]  # the hidden width stays elastic
    net = HiddenSoftmax("function").eval()
    with pytest.warns(UserWarning, match="no elastic width"):
        fixed = convert(net, (x,), discrete=["a"])
    with torch.no_grad():
        torch.testing.assert_close(inn.sample(1.0)(x), classes(x))
        torch.testing.assert_close(fixed.sample(0.5)(x), net(x))


# -- 6: calibrate(max_steps=...) bounded by steps alone ------------------------------------------
def test_calibrate_with_max_steps_repeats_exactly_however_slow_the_machine(monkeypatch):
    """A clock that jumps 10 s per reading (a loaded machine): the time budget is spent at
    once, yet with max_steps both phases run their steps and the tier is the same."""
    torch.manual_seed(0)
    x = torch.randn(128, 1, 8, 8)
    inn = convert(tiny_cnn(), (x[:2],), fold_norms=False)

    def run():
        return calibrate(inn, x, [0.5], seconds=30, max_steps=9, seed=0, progress=False)

    a = run()
    clock = iter(range(0, 10**6, 10))
    monkeypatch.setattr(calibrate_module, "time",
                        types.SimpleNamespace(perf_counter=lambda: float(next(clock))))  # fmt: skip
    b = run()
    key = inn.sizes_key(inn.sizes(0.5))
    assert a.info["grids"] and a.info["grids"] == b.info["grids"]
    assert a.info["grids"] != convert(tiny_cnn(), (x[:2],), fold_norms=False).info.get("grids")
    for name, t in a.tiers[key].items():
        assert torch.equal(b.tiers[key][name], t), name
    untuned = inn.sample(0.5, calibrated=False).state_dict()
    assert not torch.equal(a.tiers[key]["0.weight"], untuned["0.weight"])  # steps ran


# -- 7: set_tier with some groups named -------------------------------------------------------
def test_set_tier_with_partial_sizes_is_what_sample_returns():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 3)).eval()  # fmt: skip
    x = torch.randn(4, 8)
    inn = convert(net, (x,))
    sizes = {"0": 8}  # group "2" keeps its 16 channels
    tuned = inn.sample(sizes)
    with torch.no_grad():
        for p in tuned.parameters():
            p.zero_()  # recognisable "calibrated" weights
    key = inn.set_tier(sizes, tuned.state_dict())
    assert key == inn.sizes_key(inn.sizes(sizes)) == "0=8,2=16"
    assert inn.calibrated(inn.sizes(sizes))
    with torch.no_grad():
        assert (inn.sample(sizes)(x) == 0).all()


# -- 8: text calibration of readouts without a bias --------------------------------------------
@pytest.mark.parametrize("grid", ["uniform", "selected"])
def test_text_calibration_refits_readouts_without_a_bias(grid):
    torch.manual_seed(0)
    model = TinyEmbedder().eval()
    for block in model.encoder.layers:  # readouts without a bias, as in Llama-style blocks
        block.o, block.fc2 = nn.Linear(16, 16, bias=False), nn.Linear(32, 16, bias=False)
    gen = torch.Generator().manual_seed(1)
    ids, mask = torch.randint(5, 26, (64, 7), generator=gen), torch.ones(64, 7, dtype=torch.long)
    inn = convert(model, (ids[:2], mask[:2]))
    half = {"heads": 0.5, "ffn": 0.5}
    tuned = calibrate_text(inn, ids, mask, [half], seconds=60, max_steps=0, grid=grid,
                           progress=False)  # fmt: skip
    sizes = inn.sizes(half, multiple_of=8)
    with torch.no_grad():
        ref = model(ids, mask)
        cos = [float(F.cosine_similarity(m(ids, mask), ref, dim=-1).mean())
               for m in (inn.sample(sizes), tuned.sample(sizes))]  # fmt: skip
    assert tuned.calibrated(sizes) and cos[1] > cos[0], cos


# -- 9: nn.MultiheadAttention with kdim / vdim ---------------------------------------------------
class CrossAttention(nn.Module):
    """Queries of 16 channels attend to a memory of 8 (kdim = vdim = 8); an elastic MLP after."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.m = nn.Linear(4, 16), nn.Linear(4, 8)
        self.att = nn.MultiheadAttention(16, 4, kdim=8, vdim=8, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 2)

    def forward(self, x, mem):  # (B, S, 4), (B, T, 4)
        mem = self.m(mem)
        a, _ = self.att(self.q(x), mem, mem)
        return self.fc2(torch.relu(self.fc1(a)))


def test_cross_attention_with_its_own_key_width_converts_exactly():
    torch.manual_seed(0)
    net, x, mem = CrossAttention().eval(), torch.randn(2, 5, 4), torch.randn(2, 7, 4)
    inn = convert(net, (x, mem))
    assert _shape(inn) == [("fc1", 32, 1)]  # query and memory widths pinned, the MLP elastic
    with torch.no_grad():
        torch.testing.assert_close(inn.sample(1.0)(x, mem), net(x, mem))
        assert inn.sample(0.5)(x, mem).shape == (2, 5, 2)


# -- 10: recompute_norm_stats leaves the caller's momentum --------------------------------------
def test_recompute_norm_stats_restores_each_norms_momentum():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.BatchNorm2d(4, momentum=None)
    ).eval()  # a cumulative one stays so
    before = net[1].running_mean.clone()
    assert recompute_norm_stats(net, torch.randn(128, 1, 8, 8))
    assert not torch.equal(net[1].running_mean, before)  # the statistics were recomputed
    assert net[1].momentum == 0.3 and net[2].momentum is None
    assert not net.training


# -- transposed convs and instance norms captured by torch.export ----------------------------
class CheckedGenerator(nn.Module):
    """An image-to-image block (CycleGAN / pix2pix-like) with a shape check torch.fx cannot
    trace: conv, InstanceNorm, a transposed conv upsampling, a functional transposed conv
    reading the model's own weight."""

    def __init__(self) -> None:
        super().__init__()
        self.check = True  # False: the same network, traceable by torch.fx
        self.down, self.n1 = nn.Conv2d(3, 16, 3, 2, 1), nn.InstanceNorm2d(16, affine=True)
        self.up = nn.ConvTranspose2d(16, 12, 4, 2, 1)
        self.n2 = nn.InstanceNorm2d(12, affine=True)
        self.out = nn.ConvTranspose2d(12, 3, 3, 1, 1)

    def forward(self, x):  # (B, 3, 8, 8)
        if self.check and x.shape[-1] % 4:
            raise ValueError("expects sides divisible by 4")
        h = torch.relu(self.n1(self.down(x)))  # (B, 16, 4, 4)
        h = torch.relu(self.n2(self.up(h)))  # (B, 12, 8, 8)
        return F.conv_transpose2d(h, self.out.weight, self.out.bias, padding=1)  # (B, 3, 8, 8)


def test_export_captured_transposed_convs_and_instance_norms_are_elastic():
    # Under torch.export they reached the tracer as ATen calls with no rule: refused
    # "no rule for 'instance_norm.default'", then 'conv_transpose2d.input', though the
    # README lists both layers (review helper-284).
    torch.manual_seed(0)
    net, x = CheckedGenerator().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for m in (net.n1, net.n2):
            m.weight.uniform_(0.5, 2.0)
            m.bias.uniform_(-0.5, 0.5)
    twin = CheckedGenerator().eval()
    twin.load_state_dict(net.state_dict())
    twin.check = False
    inn = convert(net, (x,))
    ref = convert(twin, (x,), frontend="fx")
    assert inn.info["frontend"] == "export" and ref.info["frontend"] == "fx"
    assert _shape(inn) == _shape(ref) == [("down", 16, 1), ("up", 12, 1)]
    with torch.no_grad():
        torch.testing.assert_close(inn.sample(1.0)(x), net(x), rtol=1e-4, atol=1e-5)
        half = inn.sample(0.5)
        torch.testing.assert_close(half(x), ref.sample(0.5)(x), rtol=1e-4, atol=1e-5)
    onnx = export_onnx(half, [("x", (3, 8, 8), torch.float32)], ["y"])
    (y,) = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )
    with torch.no_grad():
        np.testing.assert_allclose(y, half(x).numpy(), rtol=1e-4, atol=1e-5)


def test_discrete_on_an_export_captured_transposed_conv_keeps_its_output_channels_only():
    # Its weight is (in, out, ...): pinning dim 0, as for any other layer, kept the layer
    # before it whole instead.
    torch.manual_seed(0)
    net, x = CheckedGenerator().eval(), torch.randn(2, 3, 8, 8)
    inn = convert(net, (x,), discrete=["up"])
    assert inn.info["frontend"] == "export" and _shape(inn) == [("down", 16, 1)]
    with torch.no_grad():
        half = inn.sample(0.5)
        assert (half.get_parameter("up.weight").shape[:2]) == (8, 12)
