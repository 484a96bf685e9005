"""Channel search at build time (runtime/build/channels.py): off by default, measured and
recorded in tier.json when on, reused on rebuild, and the choice rule on its own."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from netgen import tiny_cnn

import runtime
from runtime.build import channels
from runtime.build.channels import Candidate, candidate_sizes, choose
from runtime.build.pipeline import add_model, build_model, source_hash
from runtime.engines import get_backend
from runtime.repository import Repository
from runtime.repository.config import ConfigError, ModelConfig
from server.model_runtime import tier_infos

CONFIG = {
    "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 8, 8]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
    "tiers": [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}],
    "max_batch": 4,
    "threads": 1,
}
# At width 0.5 the groups (16, 24 channels) round to {8, 12} (multiple_of 1, the baseline),
# {8, 16} (8) and {16, 16} (16): three distinct candidates.
SEARCH = {"multiples": [8, 16], "repeats": 3}


_net = tiny_cnn


def _inn():
    return runtime.convert(_net(), (torch.randn(1, 1, 8, 8),))


def _tier_json(root, model: str, tier: str = "w050") -> dict:
    return json.loads((root / model / "tiers" / tier / "tier.json").read_text())


def _onnx_channels(path) -> list[int]:
    """Output channels of each Conv in graph order (their weights are initializers)."""
    graph = onnx.load(str(path)).graph
    dims = {init.name: list(init.dims) for init in graph.initializer}
    return [dims[n.input[1]][0] for n in graph.node if n.op_type == "Conv"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A repository whose tiers were searched with real timing and measured accuracy."""
    root = tmp_path_factory.mktemp("searched")
    config = {**CONFIG, "channel_search": SEARCH, "evaluation": {"dataset": "digits", "limit": 32}}
    add_model(root, "tiny", _inn(), config)
    report = build_model(Repository(root), "tiny", progress=False, repeats=3)
    return root, report


def test_off_by_default_tier_json_is_as_before(tmp_path):
    inn = _inn()
    add_model(tmp_path, "plain", inn, {**CONFIG, "multiple_of": 8})
    build_model(Repository(tmp_path), "plain", progress=False, profile=False)
    record = _tier_json(tmp_path, "plain")
    assert "channel_search" not in record
    assert record["sizes"] == inn.sizes(0.5, 8)
    config = ModelConfig.from_dict({**CONFIG, "multiple_of": 8})
    tier = config.tier("w050")
    # Without a search the backend is not part of what the tier depends on.
    plain = source_hash(tmp_path / "plain", config, tier)
    assert plain == source_hash(tmp_path / "plain", config, tier, get_backend("onnxruntime"))


def test_search_records_timed_candidates_and_exports_the_choice(searched):
    root, report = searched
    record = _tier_json(root, "tiny")
    search = record["channel_search"]
    cands = search["candidates"]
    sizes = [json.dumps(c["sizes"], sort_keys=True) for c in cands]
    assert len(cands) >= 2 and len(set(sizes)) == len(sizes)
    assert all(c["latency_ms"] > 0 and 0 <= c["accuracy"] <= 1 and c["flops"] > 0 for c in cands)
    assert cands[0]["multiples"] == [1] and search["baseline"] == 0
    assert search["rule"] == channels.RULE and search["backend"] == "onnxruntime"
    chosen = cands[search["chosen"]]["sizes"]
    assert record["sizes"] == chosen
    onnx_path = root / "tiny" / "tiers" / "w050" / "model.onnx"
    assert _onnx_channels(onnx_path) == [chosen["0"], chosen["3"]]
    # w100 has one rounding only: recorded, nothing timed.
    full = _tier_json(root, "tiny", "w100")["channel_search"]
    assert len(full["candidates"]) == 1 and full["candidates"][0]["latency_ms"] is None
    # Validation and profiling ran on the chosen tiers, and the serving side reads them.
    assert all(t.max_abs_err < 1e-4 and t.accuracy is not None for t in report.tiers)
    served = Repository(root).load("tiny")
    assert {t.name for t in tier_infos(served)} == {"w100", "w050"}


def test_a_non_baseline_choice_is_what_the_build_exports_and_validates(tmp_path, monkeypatch):
    # Timing made up so that the last candidate ({16, 16}) is clearly the fastest.
    monkeypatch.setattr(
        channels, "time_candidates", lambda engines, *a, **k: [10.0] * (len(engines) - 1) + [5.0]
    )
    inn = _inn()
    add_model(tmp_path, "fast", inn, {**CONFIG, "channel_search": SEARCH})
    report = build_model(Repository(tmp_path), "fast", progress=False, profile=False)
    search = _tier_json(tmp_path, "fast")["channel_search"]
    assert search["chosen"] == len(search["candidates"]) - 1 == 2
    assert search["evaluation"] is None  # FLOPs proxy: flops / full flops
    assert search["candidates"][2]["accuracy"] > search["candidates"][0]["accuracy"]
    onnx_path = tmp_path / "fast" / "tiers" / "w050" / "model.onnx"
    assert _onnx_channels(onnx_path) == [16, 16] != list(inn.sizes(0.5).values())
    assert all(t.max_abs_err < 1e-4 for t in report.tiers)


def test_rebuild_reuses_the_recorded_choice(searched, monkeypatch):
    root, _ = searched

    def no_timing(*args, **kwargs):
        raise AssertionError("a rebuild with unchanged inputs must not search again")

    monkeypatch.setattr(channels, "time_candidates", no_timing)
    before = _tier_json(root, "tiny")
    again = build_model(Repository(root), "tiny", progress=False, profile=False)
    assert not any(t.exported for t in again.tiers)
    # Without its ONNX the tier is exported again - at the recorded choice, still untimed.
    (root / "tiny" / "tiers" / "w050" / "model.onnx").unlink()
    again = build_model(Repository(root), "tiny", progress=False, profile=False)
    assert [t.exported for t in again.tiers] == [False, True]
    after = _tier_json(root, "tiny")
    assert after["channel_search"] == before["channel_search"]
    assert after["onnx_sha256"] == before["onnx_sha256"]


def test_changed_search_settings_change_the_source_hash(tmp_path):
    add_model(tmp_path, "m", _inn(), CONFIG)
    ort = get_backend("onnxruntime")
    hashes = set()
    for search in (None, SEARCH, {**SEARCH, "repeats": 5}, {**SEARCH, "multiples": [32]}):
        config = ModelConfig.from_dict({**CONFIG, "channel_search": search})
        hashes.add(source_hash(tmp_path / "m", config, config.tier("w050"), ort))
    assert len(hashes) == 4


def _cand(acc: float, ms: float, m: int = 8) -> Candidate:
    return Candidate((m,), {"g": m}, flops=1, accuracy=acc, latency_ms=ms)


@pytest.mark.parametrize(
    ("cands", "want", "why"),
    [
        ([_cand(0.90, 10), _cand(0.90, 8)], 1, "as accurate and 20 % faster"),
        ([_cand(0.90, 10), _cand(0.896, 8)], 1, "0.4 point less: within the tolerance"),
        ([_cand(0.90, 10), _cand(0.89, 5)], 0, "1 point less: outside, however fast"),
        ([_cand(0.90, 10), _cand(0.90, 9.8)], 0, "2 % faster: within timing noise"),
        ([_cand(0.50, 10), _cand(0.70, 12)], 0, "better per ms but 20 % slower"),
        ([_cand(0.90, 10), _cand(0.92, 10.5)], 0, "more accurate, not enough per ms"),
        ([_cand(0.90, 10), _cand(0.90, 8), _cand(0.91, 7)], 2, "the best of several"),
        ([_cand(0.90, 10)], 0, "a lone baseline"),
    ],
)
def test_choose(cands, want, why):
    assert choose(cands) == want, why


def test_candidates_are_distinct_baseline_first():
    inn = _inn()
    cands = candidate_sizes(inn, 0.5, 1, (8, 16, 32))
    # 32 exceeds both groups, which then keep their unrounded counts: the baseline's.
    assert [c.multiples for c in cands] == [(1, 32), (8,), (16,)]
    assert [c.sizes for c in cands] == [inn.sizes(0.5, m) for m in (1, 8, 16)]


def test_a_calibrated_baseline_faces_only_calibrated_counts_without_evaluation():
    inn = _inn()
    sizes = inn.sizes(0.5)
    inn.set_tier(sizes, inn.sample(sizes).state_dict())
    assert [c.sizes for c in candidate_sizes(inn, 0.5, 1, (8, 16))] == [sizes]
    # An evaluation set measures what calibration bought: every rounding competes.
    assert len(candidate_sizes(inn, 0.5, 1, (8, 16), measured=True)) == 3


@pytest.mark.parametrize(
    ("search", "match"),
    [
        ({"multiples": [0]}, r"channel_search\.multiples\[0\]: got 0, expected an integer in"),
        ({"multiples": []}, r"channel_search\.multiples: got \[\], expected a non-empty list"),
        ({"multiples": [8, 8]}, r"channel_search\.multiples: got \[8\], expected no repeated"),
        ({"multipels": [8]}, r"channel_search\.multipels: .*did you mean 'multiples'"),
        ({"batch": 64}, r"channel_search\.batch: got 64, expected a batch size <= max_batch"),
        ({"repeats": 1}, r"channel_search\.repeats: got 1, expected an integer in \[3, 1000\]"),
        (True, r"channel_search: got True, expected a mapping"),
    ],
)
def test_bad_channel_search_config(tmp_path, search, match):
    path = tmp_path / "model.yaml"
    path.write_text(json.dumps({**CONFIG, "channel_search": search}))
    with pytest.raises(ConfigError, match=match) as err:
        ModelConfig.load(path)
    assert str(path) in str(err.value)
