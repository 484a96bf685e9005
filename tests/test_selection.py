"""runtime.inn.selection: which stored channels a calibrated transformer tier keeps.

The greedy choice is checked on hand-made readouts whose best subsets are known, and on the
hand-written BERT of test_capture (bench/transformers.py runs all-MiniLM-L6-v2)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_distill import HALF, _cosine, _held_out, _text

import runtime
from runtime.inn.distill import calibrate_text, length_batches
from runtime.inn.model import load
from runtime.inn.selection import (
    greedy_selection,
    readout_grams,
    readout_weights,
    select_nodes,
    store_grids,
)
from runtime.inn.train import TrainableINN


def _readout(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Gram of [x, 1], [w, 0]) for a bias-free readout y = x w^T."""
    xa = np.hstack([x, np.ones((len(x), 1))])
    return xa.T @ xa, np.hstack([w, np.zeros((len(w), 1))])


def _error(x: np.ndarray, y: np.ndarray, keep, inner: int = 1) -> float:
    """Squared error of the best refit of y from the kept entries' inputs and a bias."""
    cols = [c for e in keep for c in range(e * inner, (e + 1) * inner)]
    xa = np.hstack([x[:, cols], np.ones((len(x), 1))])
    beta, *_ = np.linalg.lstsq(xa, y, rcond=None)
    return float(((xa @ beta - y) ** 2).sum())


def test_of_two_twin_channels_it_keeps_one_where_magnitude_keeps_both():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 6))
    x[:, 1] = x[:, 0]  # channel 1 carries exactly channel 0's signal
    w = rng.normal(size=(8, 6)) * np.array([3.0, 3.0, 1.0, 1.0, 0.5, 0.5])
    gram, wb = _readout(x, w)
    keep = greedy_selection(gram, wb, entries=6, n=3)
    magnitude = np.argsort(-(np.abs(x).mean(0) * np.linalg.norm(w, axis=0)))[:3]
    assert {0, 1} <= set(magnitude.tolist())  # the activation ranking keeps both twins
    assert len({0, 1} & set(keep.tolist())) == 1
    y = x @ w.T
    assert _error(x, y, keep) < 0.5 * _error(x, y, sorted(magnitude))


@pytest.mark.parametrize("inner", [1, 3])
def test_the_first_choice_is_the_best_single_entry(inner):
    rng = np.random.default_rng(inner)
    entries = 7
    x = rng.normal(size=(500, entries * inner)) @ rng.normal(size=(entries * inner,) * 2)
    w = rng.normal(size=(4, entries * inner))
    gram, wb = _readout(x, w)
    y = x @ w.T
    best = min(range(entries), key=lambda e: _error(x, y, [e], inner))
    assert greedy_selection(gram, wb, entries, 1).tolist() == [best]
    # and each greedy step leaves less error than any other way to add one entry
    keep = greedy_selection(gram, wb, entries, 3).tolist()
    pairs = [p for p in itertools.combinations(range(entries), 3) if set(keep) > set(p[:2])]
    assert all(_error(x, y, keep, inner) <= _error(x, y, p, inner) + 1e-6 for p in pairs)


def test_a_dead_channel_is_taken_last():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4))
    x[:, 2] = 0.0  # never active: a zero column of the Gram matrix
    gram, wb = _readout(x, rng.normal(size=(3, 4)))
    assert 2 not in greedy_selection(gram, wb, 4, 3).tolist()
    assert greedy_selection(gram, wb, 4, 4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("gram", "weight", "entries", "n", "match"),
    [
        (np.eye(5), np.ones((2, 4)), 4, 2, "do not fit together"),
        (np.eye(5), np.ones((2, 5)), 3, 1, "do not split into 3 entries"),
        (np.eye(5), np.ones((2, 5)), 4, 5, "cannot keep 5 of 4"),
        (np.eye(5), np.ones((2, 5)), 4, 0, "cannot keep 0 of 4"),
    ],
)
def test_bad_arguments_are_clear_errors(gram, weight, entries, n, match):
    with pytest.raises(ValueError, match=match):
        greedy_selection(gram, weight, entries, n)


def _nodes(inn, teacher, sizes):
    ids, mask = _text(256, 1)
    grams = readout_grams(inn, teacher, length_batches(ids, mask, 32))
    return select_nodes(inn, teacher, grams, sizes)


def test_a_grid_on_chosen_nodes_samples_exactly_those_channels(tiny_bert, tmp_path):
    _, inn = tiny_bert
    inn = inn.copy()
    teacher = inn.sample(1.0)
    sizes = inn.sizes(HALF, multiple_of=4)
    keep = _nodes(inn, teacher, sizes)
    assert set(keep) == set(readout_weights(inn)) == {g.name for g in inn.groups}
    assert all(len(k) == sizes[g] and (k.diff() > 0).all() for g, k in keep.items())
    store_grids(inn, keep)

    def pick(g, n):
        a = torch.zeros(n, g.size, dtype=torch.float64)
        a[torch.arange(n), keep[g.name]] = 1.0
        return a

    pruned = inn.resample(sizes, pick, quadrature=False)  # the channels, unscaled
    ids, mask = _text(16, 5)
    expected = pruned(ids, mask)
    torch.testing.assert_close(inn.sample(sizes, calibrated=False)(ids, mask), expected)
    inn.save(tmp_path)
    torch.testing.assert_close(load(tmp_path).sample(sizes)(ids, mask), expected)
    trainable = TrainableINN(inn).sampled_state(sizes)  # training samples the same network
    for name, t in pruned.state_dict().items():
        torch.testing.assert_close(trainable[name], t, rtol=1e-5, atol=1e-6)
    other = inn.sizes(0.75, 4)  # other counts keep the uniform grid
    assert all(inn.grid(g, n) is None for g, n in other.items())


def test_a_grid_with_the_wrong_number_of_points_is_a_clear_error(tiny_bert):
    _, inn = tiny_bert
    inn = inn.copy()
    g = inn.groups[0]
    inn.info["grids"] = {f"{g.name}@2": {"points": [0.5], "quadrature": "unit"}}
    with pytest.raises(ValueError, match=rf"{g.name}@2 must hold 2 points.*recalibrate"):
        inn.sample({g.name: 2})


def test_calibrating_from_chosen_nodes_starts_closer_than_the_uniform_grid(tiny_bert):
    model, inn = tiny_bert
    ids, mask = _text(256, 1)
    held_ids, held_mask, reference = _held_out(model)
    sizes = inn.sizes(HALF, multiple_of=8)
    # max_steps=0: the readout refit alone, so the start is what differs
    runs = {grid: calibrate_text(inn, ids, mask, [HALF], seconds=60, grid=grid, max_steps=0,
                                 batch_size=32, progress=False)
            for grid in ("selected", "uniform")}  # fmt: skip
    cos = {g: _cosine(t.sample(sizes), held_ids, held_mask, reference) for g, t in runs.items()}
    assert cos["selected"] > cos["uniform"], cos
    stored = runs["selected"].info["grids"]
    assert set(stored) == {f"{g}@{n}" for g, n in sizes.items()}
    assert all(v["quadrature"] == "unit" for v in stored.values())
    assert "grids" not in runs["uniform"].info and "grids" not in inn.info
    key = runtime.IntegralModel.sizes_key(sizes)
    assert runs["selected"].info["text_calibration"][key]["grid"] == "selected"
    with pytest.raises(ValueError, match="grid must be one of"):
        calibrate_text(inn, ids, mask, [HALF], seconds=1, grid="best", progress=False)
