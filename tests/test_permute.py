"""Smoothing permutation: a real tour improvement, deterministic, a true permutation."""

from __future__ import annotations

import torch

from runtime.inn.permute import smoothing_order, total_variation


def _shuffled_curve(m: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, m).unsqueeze(1)
    curve = torch.cat([torch.sin(6 * t + k) for k in range(d)], dim=1)  # smooth in t
    perm = torch.randperm(m, generator=g)
    return curve[perm], curve


def test_recovers_a_smooth_order_from_a_shuffle():
    shuffled, curve = _shuffled_curve(200, 6, seed=1)
    order = smoothing_order(shuffled)
    assert sorted(order.tolist()) == list(range(200))
    tv = total_variation(shuffled, order)
    assert tv <= total_variation(curve) * 1.02  # the true smooth order, within 2 %
    assert tv < total_variation(shuffled) / 10


def test_deterministic_for_a_seed():
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(smoothing_order(x, seed=5), smoothing_order(x, seed=5))


def test_never_worse_than_identity_on_random_features():
    for seed in range(5):
        x = torch.randn(48, 30, generator=torch.Generator().manual_seed(seed))
        assert total_variation(x, smoothing_order(x)) < total_variation(x)


def test_tiny_groups():
    assert smoothing_order(torch.zeros(1, 3)).tolist() == [0]
    assert sorted(smoothing_order(torch.randn(3, 2)).tolist()) == [0, 1, 2]
