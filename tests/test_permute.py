"""Smoothing permutation: a real tour improvement, deterministic, a true permutation."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import runtime.inn.permute as permute
from runtime.inn.permute import (
    EXACT_MAX,
    exact_order,
    scalable_order,
    smoothing_order,
    total_variation,
)


def _shuffled_curve(m: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, m).unsqueeze(1)
    curve = torch.cat([torch.sin(6 * t + k) for k in range(d)], dim=1)  # smooth in t
    perm = torch.randperm(m, generator=g)
    return curve[perm], curve


def _noisy_curve(m: int, d: int, seed: int) -> torch.Tensor:
    """A low-rank smooth structure plus noise, shuffled (bench/permutation.py's kind)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(m, 1, generator=g)
    code = torch.sin(torch.pi * t * torch.arange(1, 9).float())
    return code @ torch.randn(8, d, generator=g) + 0.5 * torch.randn(m, d, generator=g)


def _is_permutation(order: torch.Tensor, m: int) -> bool:
    return order.dtype == torch.int64 and sorted(order.tolist()) == list(range(m))


def test_recovers_a_smooth_order_from_a_shuffle():
    shuffled, curve = _shuffled_curve(200, 6, seed=1)
    order = smoothing_order(shuffled)
    assert _is_permutation(order, 200)
    tv = total_variation(shuffled, order)
    assert tv <= total_variation(curve) * 1.02  # the true smooth order, within 2 %
    assert tv < total_variation(shuffled) / 10


def test_scalable_path_recovers_a_smooth_order_too():
    shuffled, curve = _shuffled_curve(300, 6, seed=2)
    order = scalable_order(shuffled)
    assert _is_permutation(order, 300)
    assert total_variation(shuffled, order) <= total_variation(curve) * 1.02


def test_scalable_path_within_2_percent_of_the_exact_path():
    for seed in range(2):
        x = _noisy_curve(160, 400, seed)
        exact = total_variation(x, exact_order(x, seed=seed))
        scalable = total_variation(x, scalable_order(x, seed=seed, rank=64))
        assert scalable <= exact * 1.02


def test_deterministic_for_a_seed():
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(smoothing_order(x, seed=5), smoothing_order(x, seed=5))
    y = _noisy_curve(150, 300, seed=3)
    assert torch.equal(scalable_order(y, seed=5, rank=32), scalable_order(y, seed=5, rank=32))


def test_never_worse_than_identity_on_random_features():
    for seed in range(5):
        x = torch.randn(48, 30, generator=torch.Generator().manual_seed(seed))
        assert total_variation(x, smoothing_order(x)) < total_variation(x)
        assert total_variation(x, scalable_order(x, seed=seed)) < total_variation(x)


def test_tiny_groups():
    assert smoothing_order(torch.zeros(1, 3)).tolist() == [0]
    assert sorted(smoothing_order(torch.randn(3, 2)).tolist()) == [0, 1, 2]
    for m in range(1, 8):
        x = torch.randn(m, 4, generator=torch.Generator().manual_seed(m))
        assert _is_permutation(scalable_order(x), m)


def test_identical_channels():
    order = scalable_order(torch.ones(40, 5))
    assert _is_permutation(order, 40)
    assert total_variation(torch.ones(40, 5), order) == 0.0


def test_reduced_features_keep_distances_of_low_rank_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 6, generator=g) @ torch.randn(6, 500, generator=g)  # rank 6
    r = permute.reduced_features(x, rank=16, seed=0)
    assert r.shape == (100, 16)
    assert torch.allclose(torch.cdist(r, r), torch.cdist(x, x), rtol=1e-3, atol=0.1)


def test_wide_groups_take_the_scalable_path(monkeypatch):
    """Above EXACT_MAX channels the O(m^3) exact path is never entered (no timing asserted:
    the group below takes well under a second on the scalable path)."""

    def refuse(*args, **kwargs):
        raise AssertionError("exact path taken above EXACT_MAX")

    monkeypatch.setattr(permute, "exact_order", refuse)
    monkeypatch.setattr(permute, "_two_opt", refuse)
    m = 4 * EXACT_MAX
    x = _noisy_curve(m, 64, seed=0)
    order = smoothing_order(x)
    assert _is_permutation(order, m)
    assert total_variation(x, order) < 0.5 * total_variation(x)


def _best_two_opt_gain(dist: np.ndarray, path: list[int]) -> float:
    """The largest decrease in path length any 2-opt move on the open ``path`` makes:
    reversing path[i..j] replaces the edges into i and out of j (where they exist)."""
    m, best = len(path), 0.0
    for i in range(m):
        for j in range(i + 1, m):
            a, b = path[i], path[j]
            before = after = 0.0
            if i > 0:
                before += dist[path[i - 1], a]
                after += dist[path[i - 1], b]
            if j < m - 1:
                before += dist[b, path[j + 1]]
                after += dist[a, path[j + 1]]
            best = max(best, before - after)
    return best


@settings(max_examples=25, deadline=None)
@given(m=st.integers(4, 40), d=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_the_exact_order_leaves_no_improving_two_opt_move(m, d, seed):
    # The exact path's 2-opt pass could be removed (nearest-neighbour tours returned as
    # they were) and every test still passed: each only compared against the identity.
    x = torch.randn(m, d, generator=torch.Generator().manual_seed(seed))
    order = exact_order(x)
    assert _is_permutation(order, m)
    f = x.double().numpy()
    dist = np.abs(f[:, None, :] - f[None, :, :]).sum(-1)  # (m, m) L1, the TV metric
    tv = total_variation(x, order)
    assert _best_two_opt_gain(dist, order.tolist()) <= 1e-5 * max(1.0, tv)
    nearest = permute._best_nearest_neighbour(permute.distance_matrix(x), 0, 4)
    assert tv <= total_variation(x, torch.from_numpy(nearest)) + 1e-5 * max(1.0, tv)
