"""The torch.export front end (issue 12): models torch.fx cannot trace - Hugging Face style
encoders, GPT-2's Conv1D - convert exactly, with heads and FFN widths elastic, at any batch
and sequence length. Hand-written modules reproduce each pattern, so transformers is not
needed here (bench/zoo.py runs the real BERT, DistilBERT, GPT-2 and all-MiniLM-L6-v2)."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import runtime
from runtime.build.export import exportable_attention
from runtime.inn.capture import capture
from runtime.inn.groups import ConversionError


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class Block(nn.Module):
    """A BERT layer: q/k/v/o projections, heads of ``dh`` channels, post-norms, GELU FFN."""

    def __init__(self, d: int, dh: int, ffn: int) -> None:
        super().__init__()
        self.dh = dh
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, h, mask):
        b, s, _ = h.shape

        def heads(t):
            return t.view(b, s, -1, self.dh).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)),
                                           attn_mask=mask)  # fmt: skip
        h = self.ln1(h + self.o(a.transpose(1, 2).reshape(b, s, -1)))
        return self.ln2(h + self.fc2(F.gelu(self.fc1(h))))


class TinyBert(nn.Module):
    """Token + position embeddings, a length check (control flow on a shape, which torch.fx
    cannot trace - nor transformers' mask helpers), an additive mask, two layers."""

    def __init__(self, vocab: int = 50, d: int = 16, dh: int = 4, ffn: int = 32) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(32, d)
        self.register_buffer("position_ids", torch.arange(32)[None], persistent=False)
        self.layers = nn.ModuleList([Block(d, dh, ffn) for _ in range(2)])

    def forward(self, input_ids, attention_mask):
        s = input_ids.shape[1]
        if s > self.pos.num_embeddings:
            raise ValueError("sequence longer than the position table")
        h = self.tok(input_ids) + self.pos(self.position_ids[:, :s])
        mask = (1.0 - attention_mask[:, None, None, :].float()) * -1e4
        for layer in self.layers:
            h = layer(h, mask)
        return h


def _text(b: int, s: int, pad_from: int | None = None):
    torch.manual_seed(b * 100 + s)
    ids = torch.randint(0, 50, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    if pad_from is not None:
        mask[0, pad_from:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    model = TinyBert().eval()
    ids, mask = _text(2, 8)
    with torch.no_grad():
        inn = runtime.convert(model, (ids,), example_kwargs={"attention_mask": mask})
    return model, inn


def test_fx_cannot_trace_it_but_export_captures_it():
    ids, mask = _text(2, 8)
    with pytest.raises(ConversionError, match=r"torch\.fx could not trace"):
        capture(TinyBert().eval(), (ids, mask), frontend="fx")
    gm = capture(TinyBert().eval(), (ids, mask), frontend="export")
    assert gm.meta["frontend"] == "export"
    names = {getattr(n.target, "__name__", "") for n in gm.graph.nodes}
    assert {"linear", "layer_norm", "embedding", "scaled_dot_product_attention"} <= names


@torch.no_grad()
def test_bert_style_encoder_converts_exactly_at_any_batch_and_length(bert):
    model, inn = bert
    assert inn.info["frontend"] == "export"
    # Heads (4 of 4 channels each) and the FFN width of each layer are the elastic groups;
    # the hidden size is tied to the output (and the LayerNorms): discrete.
    sizes = sorted((g.size, g.blocks) for g in inn.groups if not g.discrete)
    assert sizes == [(4, 1), (4, 1), (32, 1), (32, 1)]
    full = inn.sample(1.0)
    for b, s, pad in ((1, 5, None), (3, 11, 7), (2, 8, 3)):
        ids, mask = _text(b, s, pad)
        assert _rel_err(full(ids, mask), model(ids, mask)) <= 1e-5


@torch.no_grad()
def test_half_tier_halves_heads_and_ffn_and_round_trips(bert, tmp_path):
    _, inn = bert
    half = inn.sample(0.5)
    assert half.get_parameter("layers.0.fc1.weight").shape == (16, 16)
    assert half.get_parameter("layers.0.q.weight").shape == (8, 16)  # 2 heads of 4
    ids, mask = _text(3, 9, 4)
    y = half(ids, mask)
    assert y.shape == (3, 9, 16) and torch.isfinite(y).all()
    back = runtime.load(inn.save(tmp_path / "bert"))  # ATen mask ops stored by name
    torch.testing.assert_close(back.sample(0.5)(ids, mask), y, rtol=0, atol=0)


@torch.no_grad()
def test_half_tier_exports_to_onnx_with_dynamic_batch_and_length(bert, tmp_path):
    _, inn = bert
    half = inn.sample(0.5)
    ids, mask = _text(2, 8)
    path = tmp_path / "half.onnx"
    axes = {"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}, "y": {0: "b", 1: "s"}}
    with exportable_attention():
        torch.onnx.export(half, (ids, mask), str(path), input_names=["ids", "mask"],
                          output_names=["y"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)  # fmt: skip
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = _text(3, 13, 6)
    (got,) = sess.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})
    assert _rel_err(torch.from_numpy(got), half(ids, mask)) <= 1e-4


class Conv1D(nn.Module):
    """GPT-2's projection: the weight stored (in, out), applied with addmm on a 2-D view."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(out)


class GPT2Block(nn.Module):
    """c_attn -> split(q, k, v) -> heads -> causal attention -> c_proj; an MLP of Conv1Ds."""

    def __init__(self, d: int = 16, n_head: int = 4) -> None:
        super().__init__()
        self.d, self.n_head = d, n_head
        self.ln = nn.LayerNorm(d)
        self.c_attn, self.c_proj = Conv1D(d, 3 * d), Conv1D(d, d)
        self.c_fc, self.c_out = Conv1D(d, 4 * d), Conv1D(4 * d, d)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.c_attn(self.ln(x)).split(self.d, dim=2)
        q, k, v = (t.view(b, s, -1, self.d // self.n_head).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(a.transpose(1, 2).reshape(b, s, self.d))
        return x + self.c_out(F.gelu(self.c_fc(x), approximate="tanh"))


@torch.no_grad()
def test_gpt2_conv1d_and_qkv_split_convert_with_elastic_heads(tmp_path):
    torch.manual_seed(1)
    model = GPT2Block().eval()
    x = torch.randn(2, 6, 16)
    inn = runtime.convert(model, (x,), frontend="export")
    sizes = sorted(g.size for g in inn.groups if not g.discrete)
    assert sizes == [4, 64]  # heads (of 4 channels, q/k/v tied) and the MLP width
    x2 = torch.randn(3, 9, 16)
    assert _rel_err(inn.sample(1.0)(x2), model(x2)) <= 1e-5
    half = inn.sample(0.5)
    assert half(x2).shape == (3, 9, 16)
    back = runtime.load(inn.save(tmp_path / "gpt2"))
    torch.testing.assert_close(back.sample(0.5)(x2), half(x2), rtol=0, atol=0)


class CumsumChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.logcumsumexp(self.a(x), dim=-1))


def test_an_aten_op_without_a_rule_is_refused_by_name():
    with pytest.raises(ConversionError, match=r"logcumsumexp.*no rule"):
        runtime.convert(CumsumChannels().eval(), (torch.randn(2, 3, 4),), frontend="export")


class ScaledResidual(nn.Module):
    """torch.add(..., alpha=) / torch.sub(..., alpha=): aten.add with its alpha."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(8, 16)

    def forward(self, x):
        h = torch.add(self.a(x), self.c(x), alpha=0.25)
        return self.b(torch.relu(torch.sub(h, self.c(x), alpha=2.0)))


@torch.no_grad()
def test_add_and_sub_keep_their_alpha_on_the_export_path():
    # The lowering kept two arguments and dropped alpha: the full width was off by 0.35.
    torch.manual_seed(0)
    model, x = ScaledResidual().eval(), torch.randn(4, 8)
    inn = runtime.convert(model, (x,), frontend="export")
    torch.testing.assert_close(inn.sample(1.0)(x), model(x), atol=1e-5, rtol=1e-5)
    assert inn.sample(0.5)(x).shape == (4, 4)


def test_a_one_row_example_is_refused_with_the_fix():
    # torch.export keeps a size-1 batch static: the tiers would serve batches of one only.
    ids, mask = _text(1, 8)
    with pytest.raises(ConversionError, match=r"example input 0 has a batch of 1.*at least 2"):
        capture(TinyBert().eval(), (ids, mask), frontend="export")
    with pytest.raises(ConversionError, match=r"attention_mask has a batch of 1"):
        runtime.convert(TinyBert().eval(), _text(2, 8)[:1], example_kwargs={"attention_mask": mask})
    # fx cannot trace it, and the fallback names the example, not control flow.
    with pytest.raises(ConversionError, match=r"^example input 0 has a batch of 1"):
        capture(TinyBert().eval(), (ids, mask))
    # fx graphs are dynamic by construction: a one-row example is fine there.
    assert capture(nn.Sequential(nn.Linear(4, 3)), (torch.randn(1, 4),), frontend="fx")


def test_unknown_frontend_is_a_clear_error():
    with pytest.raises(ValueError, match="frontend must be"):
        runtime.convert(CumsumChannels().eval(), (torch.randn(2, 4),), frontend="jit")


@torch.no_grad()
def test_groups_are_named_by_module_and_discrete_keeps_one(bert):
    model, inn = bert
    names = sorted(g.name for g in inn.groups if not g.discrete)
    assert names == ["layers.0.fc1", "layers.0.q", "layers.1.fc1", "layers.1.q"]
    ids, mask = _text(2, 8)
    kept = runtime.convert(model, (ids,), example_kwargs={"attention_mask": mask},
                           discrete=["layers.0.fc1"])  # fmt: skip
    assert sorted(g.name for g in kept.groups if not g.discrete) == [
        "layers.0.q", "layers.1.fc1", "layers.1.q"]  # fmt: skip
