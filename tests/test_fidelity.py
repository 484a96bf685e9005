"""runtime.inn.fidelity: how close a text embedder's tiers stay to its full width."""

from __future__ import annotations

import pytest
import torch

from runtime.inn.fidelity import retrieval_agreement


def _points() -> torch.Tensor:
    """12 unit vectors on a circle with widening gaps (no ties): each one's nearest
    neighbours are the ones beside it."""
    gaps = 1 + 0.1 * torch.arange(12, dtype=torch.float64)
    angle = torch.cumsum(gaps, 0) * (2 * torch.pi / (gaps.sum() + 1))
    return torch.stack([angle.cos(), angle.sin()], dim=1)  # (12, 2)


def test_retrieval_agreement_counts_neighbours_that_change():
    full = _points()
    assert retrieval_agreement(full, 5 * full, k=2) == (1.0, 1.0)  # lengths do not matter
    moved = full.clone()
    moved[0] = full[6]  # point 0 now sits on point 6: the neighbours around both change
    top1, top2 = retrieval_agreement(full, moved, k=2)
    assert 0.5 < top1 < 1 and 0.5 < top2 < 1
    # every point sent 5 places on: neighbourhoods broken up
    scrambled = full[(torch.arange(12) * 5) % 12]
    top1, top2 = retrieval_agreement(full, scrambled, k=2)
    assert top1 < 0.2 and top2 < 0.2


def test_retrieval_agreement_needs_more_sentences_than_neighbours():
    with pytest.raises(ValueError, match="needs more than 10 sentences"):
        retrieval_agreement(torch.randn(10, 4), torch.randn(10, 4))
