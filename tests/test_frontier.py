"""The frontier of a real INN (runtime/build/frontier.py): `innfer build` of a model with
auto_tiers measures uniform and sensitivity-shaped candidates, stores them with the model,
and reads them back on a rebuild. Auto-tiering's choice and swap: tests/test_auto_tiers.py."""

from __future__ import annotations

import numpy as np
import pytest
from test_build import CONFIG as BUILD_CONFIG
from test_build import build_tiny

from runtime.build.frontier import candidate_sizes
from runtime.build.pipeline import build_model
from runtime.inn.model import load
from runtime.repository import FRONTIER_DIR, FRONTIER_FILE, Frontier, Repository, sha256_file

CONFIG = {**BUILD_CONFIG, "auto_tiers": {"widths": [1.0, 0.75, 0.5, 0.25]}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("repo"), CONFIG, repeats=3)


def test_build_measures_the_frontier(built):
    root, report = built
    f = report.frontier
    assert f == Frontier.read(root / "tiny" / FRONTIER_DIR / FRONTIER_FILE)
    names = [c.name for c in f.candidates]
    assert names[:4] == ["w100", "w075", "w050", "w025"]
    assert any(c.shaped for c in f.candidates) and all(n[0] in "ws" for n in names)
    assert f.accuracy_source.startswith("evaluation digits (64 samples)")
    assert set(f.sensitivity) == {g.name for g in load(root / "tiny").groups}
    for c in f.candidates:
        assert 0 <= c.accuracy <= 1 and set(c.latency) == {"1", "2", "4"}
        onnx_path = root / "tiny" / FRONTIER_DIR / c.name / "model.onnx"
        assert sha256_file(onnx_path) == c.onnx_sha256
    assert f.pareto() and not all(c.pareto for c in f.candidates)  # something is beaten
    w = {c.name: c for c in f.candidates}
    assert w["w100"].flops > w["w050"].flops > w["w025"].flops


def test_shaped_candidates_keep_the_uniform_channel_total_and_differ_from_it(built):
    root, _ = built
    inn = load(root / "tiny")
    config = Repository(root).config("tiny")
    groups = [g.name for g in inn.groups]
    sensitivity = {g: 10.0**i for i, g in enumerate(groups)}  # later groups matter more
    out = candidate_sizes(inn, config, sensitivity)
    _, uniform, _ = out["w050"]
    _, shaped, is_shaped = out["s050"]
    assert is_shaped and shaped != uniform
    assert abs(sum(shaped.values()) - sum(uniform.values())) <= len(groups)  # rounding
    assert shaped[groups[-1]] > uniform[groups[-1]] and shaped[groups[0]] < uniform[groups[0]]
    assert not any(n.startswith("s") for n in candidate_sizes(inn, config, {}))


def test_rebuild_reads_the_frontier_back(built):
    root, report = built
    again = build_model(Repository(root), "tiny", progress=False, repeats=3)
    assert again.frontier.measured_at == report.frontier.measured_at  # not measured again
    assert np.isclose(again.frontier.candidates[0].accuracy, report.frontier.candidates[0].accuracy)
