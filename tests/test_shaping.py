"""Shaped widths: per-layer counts from measured sensitivity (runtime.inn.shaping), the
measurement on text (runtime.inn.sensitivity) and what calibration and sampling make of it.

The converted tiny BERT of conftest (2 layers, 4 heads of 8, FFN 64) stands in for MiniLM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_distill import _text

from runtime.inn.distill import calibrate_text, length_batches, pooled, readouts, refit_readouts
from runtime.inn.model import load
from runtime.inn.selection import readout_grams, readout_weights, select_nodes, store_grids
from runtime.inn.sensitivity import measure_sensitivity, refit_from_gram
from runtime.inn.shaping import Curve, allocate

HALF = {"heads": 0.5, "ffn": 0.5}
SHAPED_HALF = {**HALF, "shaped": True}


# -- allocation (pure) ---------------------------------------------------------------------
def test_the_group_whose_loss_rises_steepest_keeps_the_most_and_the_total_is_kept():
    full = {"a": 64, "b": 64, "c": 64}
    uniform = {"a": 32, "b": 32, "c": 32}
    steps = {g: 8 for g in full}
    curves = {"a": [[16, 0.30], [32, 0.10], [48, 0.02]],
              "b": [[16, 0.03], [32, 0.01], [48, 0.002]],
              "c": [[16, 0.06], [32, 0.02], [48, 0.005]]}  # fmt: skip
    got = allocate(full, uniform, steps, curves)
    assert sum(got.values()) == sum(uniform.values())
    assert got["a"] > got["c"] > got["b"], got
    assert all(n % 8 == 0 and 8 <= n <= 64 for n in got.values()), got


def test_equal_curves_give_the_uniform_counts():
    full, uniform, steps = {"a": 12, "b": 12}, {"a": 6, "b": 6}, {"a": 1, "b": 1}
    curve = [[3, 0.2], [6, 0.05], [9, 0.01]]
    assert allocate(full, uniform, steps, {"a": curve, "b": curve}) == uniform


def test_every_group_keeps_at_least_one_step():
    full, uniform, steps = {"a": 16, "b": 16}, {"a": 8, "b": 8}, {"a": 8, "b": 8}
    got = allocate(full, uniform, steps, {"a": [[8, 1.0]], "b": [[8, 0.0]]})
    assert got == {"a": 8, "b": 8}  # b costs nothing to narrow, but cannot go below 8


def test_a_curve_is_non_increasing_in_width_and_ends_at_its_narrowest_point():
    c = Curve(12, [[3, 0.1], [6, 0.2], [9, 0.05]])  # noise: 3 measured better than 6
    assert c(12) == 0.0 and c(9) == pytest.approx(0.05)
    assert c(3) >= c(6) == pytest.approx(0.2)  # the narrower width costs at least as much
    assert c.floor == 3
    with pytest.raises(ValueError, match="below the narrowest measured"):
        c(2)


def test_no_group_goes_below_its_narrowest_measured_count():
    full, uniform, steps = {"a": 16, "b": 16}, {"a": 8, "b": 8}, {"a": 2, "b": 2}
    curves = {"a": [[8, 0.5], [12, 0.2]], "b": [[6, 0.0], [10, 0.0]]}  # b looks free
    assert allocate(full, uniform, steps, curves) == {"a": 10, "b": 6}
    # floors adding up to more than the total: nothing to shape within what was measured
    assert allocate(full, {"a": 4, "b": 4}, steps, curves) == {"a": 4, "b": 4}
    # a group without measured points (every fraction rounded to its full size) stays full
    assert allocate(full, uniform, steps, {"a": [[4, 0.1]], "b": []}) == uniform  # 4 + 16 > 16
    got = allocate(full, {"a": 12, "b": 12}, steps, {"a": [[4, 0.1]], "b": []})
    assert got == {"a": 8, "b": 16}


def test_a_group_without_a_curve_is_refused():
    with pytest.raises(ValueError, match=r"no sensitivity measured for groups \['b'\]"):
        allocate({"a": 4, "b": 4}, {"a": 2, "b": 2}, {"a": 1, "b": 1}, {"a": [[2, 0.1]]})


# -- sampling a shaped width ---------------------------------------------------------------
def _with_curves(inn, steep: str):
    """A copy of ``inn`` with made-up curves: group ``steep`` loses 10x more than the rest."""
    out = inn.copy()
    out.info["sensitivity"] = {"groups": {
        g.name: [[max(1, g.size // 4), 0.2], [g.size // 2, 0.05]] if g.name == steep
        else [[max(1, g.size // 4), 0.02], [g.size // 2, 0.005]]
        for g in inn.groups
    }}  # fmt: skip
    return out


def test_a_shaped_width_keeps_each_kinds_total_and_favours_the_sensitive_group(tiny_bert):
    _, inn = tiny_bert
    heads = [g.name for g in inn.groups if inn.kind(g) == "heads"]
    shaped_inn = _with_curves(inn, steep=heads[0])
    uniform = inn.sizes(HALF, multiple_of=8)
    shaped = shaped_inn.sizes(SHAPED_HALF, multiple_of=8)
    for kind in ("heads", "ffn"):
        names = [g.name for g in inn.groups if inn.kind(g) == kind]
        assert sum(shaped[n] for n in names) == sum(uniform[n] for n in names)
    assert shaped[heads[0]] > uniform[heads[0]]
    assert shaped != uniform
    module = shaped_inn.sample(shaped)  # runs at those counts
    ids, mask = _text(3, 0)
    assert module(ids, mask).shape == (3, 32)


def test_a_shaped_width_without_measured_sensitivity_says_how_to_get_it(tiny_bert):
    _, inn = tiny_bert
    with pytest.raises(ValueError, match="innfer calibrate MODEL_DIR --text FILE"):
        inn.sizes(SHAPED_HALF, multiple_of=8)
    with pytest.raises(ValueError, match="'shaped' must be true or false"):
        inn.sizes({**HALF, "shaped": "yes"}, multiple_of=8)


def test_the_curves_survive_save_and_load(tiny_bert, tmp_path):
    _, inn = tiny_bert
    heads = [g.name for g in inn.groups if inn.kind(g) == "heads"]
    shaped_inn = _with_curves(inn, steep=heads[1])
    shaped_inn.save(tmp_path / "m")
    again = load(tmp_path / "m")
    assert again.sizes(SHAPED_HALF, 8) == shaped_inn.sizes(SHAPED_HALF, 8)


# -- measurement on text -------------------------------------------------------------------
def _probe_setup(inn):
    teacher = inn.sample(1.0, calibrated=False)
    ids, mask = _text(192, 3)
    batches = length_batches(ids, mask, 32)
    return teacher, readout_grams(inn, teacher, batches[:3]), batches[3:]


def test_a_layer_whose_ffn_barely_reaches_the_output_measures_cheapest_and_gives_first(
    tiny_bert,
):
    _, inn = tiny_bert
    ffns = [g.name for g in inn.groups if inn.kind(g) == "ffn"]
    quiet = inn.copy()
    # The first layer's FFN down-projection scaled to ~0: narrowing that FFN changes nothing.
    quiet.state[readout_weights(inn)[ffns[0]]].mul_(1e-4)
    teacher, grams, score = _probe_setup(quiet)
    curves = measure_sensitivity(quiet, teacher, grams, score, multiple_of=8)

    groups = curves["groups"]
    assert set(groups) == {g.name for g in inn.groups}
    assert all(len(points) == 3 for points in groups.values())  # 1/4, 1/2, 3/4 of each
    loss = {g: dict((n, v) for n, v in pts) for g, pts in groups.items()}
    half = inn.sizes(0.5, 8)
    assert loss[ffns[0]][half[ffns[0]]] < 0.1 * loss[ffns[1]][half[ffns[1]]], loss
    assert curves["sentences"] == 96

    quiet.info["sensitivity"] = curves
    shaped = quiet.sizes({"ffn": 0.5, "shaped": True}, 8)
    assert shaped[ffns[0]] < half[ffns[0]] and shaped[ffns[1]] > half[ffns[1]], shaped


def test_probes_run_from_the_teachers_states_and_score_as_whole_runs_do(tiny_bert, monkeypatch):
    # Each probe ran the whole network from the tokens, though it is the teacher's up to its
    # group's layer (MiniLM: 36 probes, ~2 minutes of `innfer calibrate` for shaped widths).
    import runtime.inn.sensitivity as sensitivity

    _, inn = tiny_bert
    teacher, grams, score = _probe_setup(inn)
    losses: list[tuple[float, float]] = []
    read: dict[str, set[str]] = {}  # per probe (its group's first changed weight): weights run
    real_loss = sensitivity._loss

    def whole(student, target) -> float:
        cos = [F.cosine_similarity(pooled(student(b.ids, b.mask), b.mask), t, dim=-1)
               for b, t in zip(score, target, strict=True)]  # fmt: skip
        return float((1 - torch.cat(cos)).mean())

    def both(student, score, target, kept, changed):
        got = real_loss(student, score, target, kept, changed)
        losses.append((got, whole(student, target)))
        _, run = sensitivity.resume_plan(student.graph, changed, set(kept[0]))
        read[min(changed)] = {str(n.target) for n in run if n.op == "get_attr"}
        return got

    monkeypatch.setattr(sensitivity, "_loss", both)
    curves = measure_sensitivity(inn, teacher, grams, score, multiple_of=8)
    assert len(curves["groups"]) == len(inn.groups) and len(losses) == 3 * len(inn.groups)
    for got, want in losses:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    # the second layer's probes run nothing of the first layer; its FFN's, not its heads
    heads, ffn = "m.layers.1.k.bias", "m.layers.1.fc1.bias"  # each group's first by name
    assert not any(w.startswith("m.layers.0.") for w in read[heads] | read[ffn])
    assert "m.layers.1.q.weight" in read[heads] and "m.layers.1.q.weight" not in read[ffn]
    assert any(w.startswith("m.layers.0.") for w in read["m.layers.0.k.bias"])


@pytest.mark.parametrize("kind", ["heads", "ffn"])
def test_the_refit_from_the_gram_is_the_refit_by_forward_passes(tiny_bert, kind):
    _, inn = tiny_bert
    teacher, grams, score = _probe_setup(inn)
    g = next(g for g in inn.groups if inn.kind(g) == kind)
    sizes = {**inn.sizes(1.0), g.name: inn.sizes(0.5, 8)[g.name]}
    probe = inn.copy()
    keep = select_nodes(inn, teacher, grams, sizes)[g.name]
    store_grids(probe, {g.name: keep})
    by_passes, by_gram = (probe.sample(sizes, calibrated=False) for _ in range(2))
    ids, mask = _text(192, 3)
    fit = length_batches(ids, mask, 32)[:3]  # the Grams' sentences
    refit_readouts(by_passes, teacher, readouts(inn, sizes), fit)
    refit_from_gram(by_gram, teacher, grams[g.name], readout_weights(inn)[g.name], keep, g.size)
    b = score[0]
    with torch.no_grad():
        before = probe.sample(sizes, calibrated=False)(b.ids, b.mask)
        want, got = by_passes(b.ids, b.mask), by_gram(b.ids, b.mask)
    assert not torch.allclose(before, want, atol=1e-4)  # the refit changed something
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)


def test_calibrating_a_shaped_width_measures_the_curves_and_tunes_those_counts(tiny_bert):
    _, inn = tiny_bert
    ids, mask = _text(256, 1)
    tuned = calibrate_text(inn, ids, mask, [SHAPED_HALF, HALF], seconds=60, max_steps=3,
                           batch_size=32, progress=False)  # fmt: skip
    assert "sensitivity" not in inn.info  # the input is left as it was
    assert set(tuned.info["sensitivity"]["groups"]) == {g.name for g in inn.groups}
    shaped = tuned.sizes(SHAPED_HALF, 8)
    uniform = tuned.sizes(HALF, 8)
    keys = set(tuned.info["text_calibration"])
    assert {tuned.sizes_key(shaped), tuned.sizes_key(uniform)} <= keys
    assert tuned.calibrated(shaped)
    with torch.no_grad():
        tuned.sample(shaped)(ids[:2], mask[:2])


def test_the_minilm_demo_shapes_its_smaller_tiers_only_when_it_calibrates():
    from runtime.demo.minilm_demo import model_config, tiers
    from runtime.repository.config import ModelConfig

    shaped = [t["width"] for t in tiers(True)]
    assert shaped[0] == 1.0 and all(w["shaped"] is True for w in shaped[1:])
    assert all(w == 1.0 or "shaped" not in w for w in (t["width"] for t in tiers(False)))
    cfg = ModelConfig.from_dict({"name": "minilm", **model_config()}, source="model.yaml")
    assert cfg.tiers[2].width == {"heads": 0.5, "ffn": 0.5, "shaped": True}
