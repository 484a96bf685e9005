"""runtime.inn.width_distill: random-width distillation of a converted transformer, on the
hand-written tiny BERT of conftest's ``tiny_bert`` (bench/transformers_random_width.py runs
all-MiniLM-L6-v2)."""

from __future__ import annotations

import random

import pytest
import torch
from test_distill import HALF, _cosine, _half_tier_setup, _held_out, _text

from runtime.build.pipeline import _data_free_transformer_tier
from runtime.inn.distill import with_hidden_states
from runtime.inn.train import TrainableINN
from runtime.inn.width_distill import distil_widths, random_sizes


def test_a_text_model_trains_through_several_inputs_and_taps(tiny_bert):
    model, inn = tiny_bert
    ids, mask, reference = _held_out(model)
    trainable = TrainableINN(inn, wrap=with_hidden_states).eval()
    with torch.no_grad():
        out, hidden = trainable((ids, mask), 1.0)  # the full width is the source model
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert len(hidden) > 0 and hidden[0].shape[:2] == ids.shape


def test_random_sizes_are_levels_between_the_smallest_and_the_full_width(tiny_bert):
    _, inn = tiny_bert
    rng = random.Random(0)
    drawn = [random_sizes(inn, HALF, rng, levels=3) for _ in range(100)]
    low, full = inn.sizes(HALF, 8), inn.sizes(1.0)
    for g in inn.groups:
        counts = {d[g.name] for d in drawn}
        assert min(counts) == low[g.name] and max(counts) == full[g.name]
        assert len(counts) <= 3  # a few levels: the architectures are cached
    kinds = {inn.kind(g) for g in inn.groups}
    for d in drawn:  # every group of a kind at the same fraction
        for kind in kinds:
            assert len({d[g.name] / g.size for g in inn.groups if inn.kind(g) == kind}) == 1
    with pytest.raises(ValueError, match="levels must be >= 1"):
        random_sizes(inn, HALF, rng, levels=0)


def test_random_width_distillation_improves_the_small_widths_and_keeps_the_full(tiny_bert):
    model, inn = tiny_bert
    ids, mask, held_ids, held_mask, reference, sizes, before = _half_tier_setup(model, inn)
    inn = inn.copy()  # (the fixture's is shared)
    inn.info["sensitivity"] = {"groups": {}}  # measured on the nodes training changes
    trained, log = distil_widths(inn, ids, mask, HALF, seconds=600, max_steps=40, lr=1e-3,
                                 progress=False)  # fmt: skip
    assert "sensitivity" not in trained.info and "sensitivity" in inn.info
    after = _cosine(trained.sample(sizes), held_ids, held_mask, reference)
    assert log["steps"] == 40 and log["widths_per_step"] == 4
    assert 1 - after <= (1 - before) / 2, (before, after)
    assert _cosine(trained.sample(1.0), held_ids, held_mask, reference) > 0.99
    assert _cosine(inn.sample(sizes), held_ids, held_mask, reference) == pytest.approx(before)
    assert trained.info["random_width_distillation"]["steps"] == 40 and not trained.tiers


def test_bad_arguments_are_refused(tiny_bert):
    _, inn = tiny_bert
    ids, mask = _text(8, 1)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        distil_widths(inn, ids, mask, HALF, seconds=0)
    with pytest.raises(ValueError, match="k must be >= 0"):
        distil_widths(inn, ids, mask, HALF, seconds=1, k=-1)


def test_the_build_warning_spares_trained_and_calibrated_tiers(tiny_bert):
    _, inn = tiny_bert
    sizes = inn.sizes(HALF, multiple_of=8)
    assert _data_free_transformer_tier(inn, sizes)
    assert not _data_free_transformer_tier(inn, inn.sizes(1.0))
    trained = inn.copy()
    trained.info["trained"] = True  # what distil_widths' to_inn records
    assert not _data_free_transformer_tier(trained, sizes)
    calibrated = inn.copy()
    calibrated.set_tier(sizes, inn.sample(sizes).state_dict())
    assert not _data_free_transformer_tier(calibrated, sizes)
