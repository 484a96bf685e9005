"""Interpolation, resampling matrices and quadrature."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from runtime.inn.continuous import (
    cell_centres,
    interpolation_matrix,
    keys_kernel,
    quadrature_scale,
    resample_matrix,
)


def test_keys_kernel_interpolates_nodes():
    s = torch.tensor([0.0, 1.0, -1.0, 2.0, -2.0, 2.5], dtype=torch.float64)
    assert keys_kernel(s).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("method", ["point", "cell"])
@pytest.mark.parametrize("m", [1, 2, 7, 64])
def test_identity_at_stored_size(method, m):
    assert torch.equal(resample_matrix(m, m, method), torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("method", ["point", "cell"])
def test_rows_are_partitions_of_unity(method):
    a = resample_matrix(37, 11, method)
    torch.testing.assert_close(a.sum(1), torch.ones(11, dtype=torch.float64))


def _smooth(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(3 * x) + x**2


def test_point_sampling_converges_for_a_smooth_function():
    # Sample a smooth f stored at m nodes onto a fixed grid of n points: the error must fall
    # as m grows (cubic convolution is third-order accurate away from the clamped ends).
    n = 10
    target = _smooth(cell_centres(n))
    errors = []
    for m in (16, 32, 64, 128):
        nodes = _smooth(cell_centres(m))
        approx = resample_matrix(m, n, "point") @ nodes
        errors.append(float((approx - target)[2:-2].abs().max()))
    assert all(b < a for a, b in itertools.pairwise(errors))
    assert errors[-1] < errors[0] / 50


def test_cell_average_matches_the_integral_of_a_smooth_function():
    n, m = 8, 256
    edges = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    exact = []
    for lo, hi in itertools.pairwise(edges):
        # antiderivative of sin(3x) + x^2
        F = lambda t: -math.cos(3 * t) / 3 + t**3 / 3  # noqa: E731
        exact.append((F(float(hi)) - F(float(lo))) / float(hi - lo))
    approx = resample_matrix(m, n, "cell") @ _smooth(cell_centres(m))
    inner = slice(1, -1)  # the clamped boundary costs accuracy in the first/last cell
    torch.testing.assert_close(
        approx[inner], torch.tensor(exact, dtype=torch.float64)[inner], atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("method", ["point", "cell"])
def test_quadrature_preserves_row_integrals(method):
    # A row w sampled on m nodes: sum_k w_k (its integral times m). Resampled to n nodes and
    # scaled by m/n, the sum must stay (close to) the same for a smooth row.
    m = 96
    w = _smooth(cell_centres(m))
    for n in (24, 48, 80):
        resampled = resample_matrix(m, n, method) @ w * quadrature_scale(m, n)
        assert float(resampled.sum()) == pytest.approx(float(w.sum()), rel=2e-3)


def test_interpolation_rows_sum_to_one_even_at_the_edges():
    pts = torch.tensor([0.0, 0.01, 0.5, 0.99, 1.0], dtype=torch.float64)
    torch.testing.assert_close(interpolation_matrix(5, pts).sum(1), torch.ones(5).double())


@pytest.mark.parametrize(
    ("m", "n", "method", "match"),
    [(0, 1, "point", "stored size"), (4, 0, "cell", "sampled size"), (4, 2, "spline", "method")],
)
def test_bad_arguments(m, n, method, match):
    with pytest.raises(ValueError, match=match):
        resample_matrix(m, n, method)


def test_auto_picks_point_when_half_or_more_is_kept_else_cell():
    assert torch.equal(resample_matrix(16, 8, "auto"), resample_matrix(16, 8, "point"))
    assert torch.equal(resample_matrix(16, 12, "auto"), resample_matrix(16, 12, "point"))
    assert torch.equal(resample_matrix(16, 7, "auto"), resample_matrix(16, 7, "cell"))
