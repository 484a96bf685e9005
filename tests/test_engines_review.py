"""Review fixes in the engines and the build around them: the channel search times a sequence
model at a profiled length, TensorRT < 10 networks are explicit batch, the torch engine
returns each output in its declared dtype and runs with ``BuildOptions.threads`` on CPU, and
auto-tier widths whose candidate names would collide are refused.

TensorRT cannot run here: its test uses the FAKE ``tensorrt`` module of
tests/test_engine_tensorrt.py (``install_trt``), which records what the backend asks of it.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from test_engine_tensorrt import _mlp_onnx, fake_cuda, install_trt  # noqa: F401 (fixtures)
from test_engine_torch_cuda import _net, _save_tier, _x
from torch import nn

import runtime
from runtime.build import channels
from runtime.build.pipeline import add_model, source_hash
from runtime.engines import BuildOptions, get_backend
from runtime.engines.base import TensorSpec
from runtime.engines.tensorrt import TensorRTBackend
from runtime.engines.torch import TorchBackend, TorchEngine
from runtime.repository.config import ConfigError, ModelConfig

# --- channel search: a sequence model is timed at a length it is profiled (and served) at ---

TEXT_CONFIG = {
    "inputs": [
        {"name": "input_ids", "dtype": "int64", "shape": [-1]},
        {"name": "attention_mask", "dtype": "int64", "shape": [-1]},
    ],
    "outputs": [{"name": "embedding", "dtype": "float32", "shape": [16]}],
    "tiers": [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}],
    "lengths": [4, 8],  # TensorRT's profile: 1..8, tuned for 8; never 16
    "max_batch": 4,
    "multiple_of": 1,
    "channel_search": {"multiples": [16], "repeats": 3},
}


def _text_inn():
    from textmodel import TinyEmbedder

    torch.manual_seed(0)
    example = (torch.randint(0, 20, (2, 7)), torch.ones(2, 7, dtype=torch.long))
    return runtime.convert(TinyEmbedder().eval(), example)


def test_channel_search_times_a_sequence_model_at_its_tuned_profiled_length(monkeypatch):
    config = ModelConfig.from_dict(TEXT_CONFIG, source="model.yaml")
    assert config.sequence_profile == (1, 8, 8)
    timed = []
    real = channels.time_candidates

    def spy(engines, feeds, repeats, on_round=None):
        timed.append({k: v.shape for k, v in feeds.items()})
        return real(engines, feeds, repeats, on_round)

    monkeypatch.setattr(channels, "time_candidates", spy)
    result = channels.search_channels(
        _text_inn(), config, 0.5, get_backend("onnxruntime"), BuildOptions(max_batch=4),
        progress=False,
    )  # fmt: skip
    assert len(result.candidates) > 1  # something was timed
    # Length 16 (the old fixed length) lies outside the profile a TensorRT engine is built for.
    assert timed == [{"input_ids": (4, 8), "attention_mask": (4, 8)}]
    assert result.context["length"] == 8  # recorded in tier.json's channel_search entry


def test_channel_search_candidates_share_the_models_timing_cache(tmp_path):
    # Each candidate built into a directory of its own, so TensorRT's timing cache (kept in
    # the engine directory's parent) started empty for every one and was deleted with the
    # search: every candidate timed every kernel again. A backend that keeps such a file
    # (ONNX Runtime, recording what each build found there):
    ort = get_backend("onnxruntime")
    seen: list[int] = []

    class Timed(type(ort)):
        def build(self, onnx_path, out_dir, options):
            cache = out_dir.parent / "timing-gpu-trt10.cache"
            before = cache.read_text().splitlines() if cache.is_file() else []
            seen.append(len(before))
            cache.write_text("\n".join([*before, out_dir.parent.name + out_dir.name]))
            return super().build(onnx_path, out_dir, options)

    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "timing-gpu-trt10.cache").write_text("from an earlier build")
    config = ModelConfig.from_dict(TEXT_CONFIG, source="model.yaml")
    result = channels.search_channels(
        _text_inn(), config, 0.5, Timed(), BuildOptions(max_batch=4), progress=False,
        cache_dir=engines,
    )  # fmt: skip
    n = len(result.candidates)
    assert n > 1 and seen == list(range(1, n + 1))  # each build saw the ones before it
    kept = (engines / "timing-gpu-trt10.cache").read_text().splitlines()
    assert kept[0] == "from an earlier build" and len(kept) == n + 1  # given back


def test_the_search_length_enters_the_source_hash_only_for_sequence_models(tmp_path):
    add_model(tmp_path, "text", _text_inn(), TEXT_CONFIG)
    ort = get_backend("onnxruntime")
    hashes = set()
    for lengths in ([4, 8], [4, 16]):  # timed at 8, then at 16: the search must re-run
        config = ModelConfig.from_dict({**TEXT_CONFIG, "lengths": lengths})
        hashes.add(source_hash(tmp_path / "text", config, config.tier("w050"), ort))
    assert len(hashes) == 2
    fixed = ModelConfig.from_dict(
        {
            "inputs": [{"name": "x", "shape": [4]}],
            "outputs": [{"name": "y", "shape": [2]}],
            "tiers": [{"name": "w050", "width": 0.5}],
            "channel_search": {"multiples": [8]},
        }
    )
    # No length for fixed shapes: their source hashes from before the fix still match.
    assert "length" not in channels.search_context(fixed, ort)


# --- TensorRT 10: the network is created strongly typed (FAKE tensorrt) ------------------
# (Older TensorRT is refused: test_engine_tensorrt.test_tensorrt_older_than_10_is_unavailable...)


def test_network_is_strongly_typed_on_tensorrt_10(
    tmp_path,
    install_trt,  # noqa: F811 (the fixture imported above)
):
    trt = install_trt(strongly_typed=True, version="10.13.0.35")
    trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH = 0  # present, deprecated and ignored
    _mlp_onnx(tmp_path / "model.onnx")
    options = BuildOptions(max_batch=8, opt_batch=4)
    TensorRTBackend().build(tmp_path / "model.onnx", tmp_path / "engines" / "k", options)
    (network,) = trt.record.networks
    assert network.flags == 1 << 1  # STRONGLY_TYPED only


# --- torch engine: outputs in their declared dtypes; BuildOptions.threads on CPU ------------


class _LabelsAndMask(nn.Module):
    def forward(self, x):  # (B, 4) -> labels (B,), mask (B, 4), scores (B, 4), half (B, 4)
        return x.argmax(1), x > 0, x * 2, x + 1


_SPECS_OUT = [
    TensorSpec("label", "int64", (-1,)),
    TensorSpec("positive", "bool", (-1, 4)),
    TensorSpec("scores", "float32", (-1, 4)),
    TensorSpec("shifted", "float16", (-1, 4)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_torch_engine_returns_each_output_in_its_declared_dtype(dtype):
    engine = TorchEngine(
        _LabelsAndMask().eval(), "cpu", dtype, [TensorSpec("x", "float32", (-1, 4))], _SPECS_OUT
    )
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    out = engine.run({"x": x})
    assert {k: v.dtype.name for k, v in out.items()} == {
        "label": "int64",
        "positive": "bool",
        "scores": "float32",  # fp16 compute comes back as the declared float32
        "shifted": "float16",
    }
    np.testing.assert_array_equal(out["label"], x.argmax(1))
    np.testing.assert_array_equal(out["positive"], x > 0)
    np.testing.assert_allclose(out["scores"], x * 2, rtol=1e-3)


@pytest.fixture
def torch_threads():
    """Restore torch's process-wide intra-op threads after the test."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_torch_engine_on_cpu_runs_with_the_build_options_threads(tmp_path, torch_threads, caplog):
    want = 1 if torch_threads != 1 else 2
    net = _net()
    _save_tier(tmp_path / "tier", net)
    with caplog.at_level(logging.INFO, logger="innfer.engines.torch"):
        engine = TorchBackend().load(tmp_path / "tier", BuildOptions(max_batch=4, threads=want))
    assert torch.get_num_threads() == want
    assert f"{torch_threads} -> {want}" in caplog.text  # process-wide: the change is logged
    x = _x(2, 0)
    with torch.no_grad():
        np.testing.assert_allclose(
            engine.run({"input": x})["logits"], net(torch.from_numpy(x)).numpy(), rtol=1e-5
        )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="innfer.engines.torch"):
        TorchBackend().load(tmp_path / "tier", BuildOptions(max_batch=4, threads=want))
    assert "intra-op threads" not in caplog.text  # no change, nothing logged


# --- auto_tiers: widths whose candidate names (w<percent>) would collide are refused ---------


def test_auto_tier_widths_that_round_to_one_percent_are_refused():
    base = {
        "inputs": [{"name": "x", "shape": [8]}],
        "outputs": [{"name": "y", "shape": [10]}],
        "tiers": [{"name": "w100", "width": 1.0}],
    }
    with pytest.raises(ConfigError, match=r"auto_tiers\.widths.*\[0\.254, 0\.246\].*w025"):
        ModelConfig.from_dict(
            {**base, "auto_tiers": {"widths": [1.0, 0.254, 0.246]}}, source="model.yaml"
        )
    # A percent apart after rounding: both are measured, as w026 and w025.
    ModelConfig.from_dict({**base, "auto_tiers": {"widths": [1.0, 0.256, 0.246]}})
    ModelConfig.from_dict({**base, "auto_tiers": {}})  # the default widths are distinct
