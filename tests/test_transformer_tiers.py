"""Tiers of transformers named by kind (issue 13): whole attention heads and the FFN width,
each a fraction, on the BERT and GPT-2 patterns of tests/test_capture.py; ``multiple_of``
counts channels (heads x head_dim), not heads; every tier exports with dynamic batch and
sequence axes through the build's exporter and runs in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_capture import GPT2Block, TinyBert, _text

import runtime
from runtime.build.export import export_onnx


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    model = TinyBert(d=32, dh=4, ffn=64).eval()  # 8 heads of 4 channels, FFN 64
    ids, mask = _text(2, 8)
    with torch.no_grad():
        return model, runtime.convert(model, (ids, mask))


def test_heads_groups_know_their_head_dim_and_kind(bert):
    _, inn = bert
    kinds = sorted((inn.kind(g), inn.unit(g), g.size) for g in inn.groups)
    assert kinds == [("ffn", 1, 64), ("ffn", 1, 64), ("heads", 4, 8), ("heads", 4, 8)]


def test_kind_fractions_resample_heads_and_ffn_apart(bert):
    _, inn = bert
    sizes = inn.sizes({"heads": 0.5, "ffn": 0.25})
    by_kind = {(inn.kind(inn.group(n)), n) for n in sizes}
    for kind, name in by_kind:
        assert sizes[name] == (4 if kind == "heads" else 16)
    # Heads only: the FFN keeps its width.
    only_heads = inn.sizes({"heads": 0.25})
    assert sorted(only_heads.values()) == [2, 2, 64, 64]
    with pytest.raises(ValueError, match="either kinds"):
        inn.sizes({"heads": 0.5, "layers.0.fc1": 8})
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        inn.sizes({"ffn": 0.0})


def test_multiple_of_counts_channels_of_heads_not_heads(bert):
    _, inn = bert
    # 8 heads of 4 channels at 3/8: 3 heads = 12 channels; multiple_of 8 channels means an
    # even number of heads (2 heads = 8 channels), so 3 rounds to 4 heads (16 channels).
    sizes = inn.sizes({"heads": 3 / 8}, multiple_of=8)
    heads = [n for name, n in sizes.items() if inn.kind(inn.group(name)) == "heads"]
    assert heads == [4, 4]
    # With multiple_of 1, the plain rounding: 3 heads.
    assert inn.sizes({"heads": 3 / 8}, multiple_of=1)[next(iter(
        n for n in sizes if inn.kind(inn.group(n)) == "heads"))] == 3  # fmt: skip


@torch.no_grad()
@pytest.mark.parametrize("width", [1.0, {"heads": 0.5, "ffn": 0.5}, {"heads": 0.25, "ffn": 0.75}])
def test_every_bert_tier_exports_with_dynamic_batch_and_length(bert, width):
    model, inn = bert
    module = inn.sample(width)
    spec = [("input_ids", (-1,), torch.int64), ("attention_mask", (-1,), torch.int64)]
    sess = ort.InferenceSession(export_onnx(module, spec, ["hidden"]),
                                providers=["CPUExecutionProvider"])  # fmt: skip
    for b, s, pad in ((1, 3, None), (4, 17, 9), (2, 30, 5)):
        ids, mask = _text(b, s, pad)
        (got,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        want = module(ids, mask).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        if width == 1.0:  # the full tier is the source model
            np.testing.assert_allclose(got, model(ids, mask).numpy(), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_gpt2_heads_and_mlp_are_kinds_and_tiers_export_at_any_length():
    torch.manual_seed(1)
    model = GPT2Block(d=32, n_head=8).eval()
    inn = runtime.convert(model, (torch.randn(2, 6, 32),), frontend="export")
    kinds = sorted((inn.kind(g), inn.unit(g), g.size) for g in inn.groups)
    assert kinds == [("ffn", 1, 128), ("heads", 4, 8)]
    module = inn.sample({"heads": 0.5, "ffn": 0.5})
    sess = ort.InferenceSession(export_onnx(module, [("x", (-1, 32), torch.float32)], ["y"]),
                                providers=["CPUExecutionProvider"])  # fmt: skip
    for b, s in ((1, 4), (3, 11)):
        x = torch.randn(b, s, 32)
        (got,) = sess.run(None, {"x": x.numpy()})
        np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-4, atol=1e-4)
