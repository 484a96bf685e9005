"""Smoothing permutation: order a group's channels so its weights vary smoothly.

Resampling a continuous dimension interpolates between neighbouring channels, which only
makes sense when neighbours are alike. Channel order in a trained network is arbitrary, so
before conversion each group's channels are reordered to minimise the total variation
``sum_k |f[k+1] - f[k]|_1`` of the stacked channel features - a shortest Hamiltonian path
under the L1 distance.

Algorithm (deterministic for a seed):
  1. the full distance matrix, vectorised: L1 where affordable, else Euclidean (one matmul);
  2. nearest-neighbour tours from a few start channels (the two most remote ones plus seeded
     random ones); keep the shortest;
  3. 2-opt on the open path, vectorised: each pass scores every segment reversal at once as an
     (m, m) gain matrix and applies the best one, until no reversal shortens the path;
  4. Or-opt style moves are subsumed well enough by 2-opt at these sizes (measured in bench/).

An open path is handled as a cycle through a dummy node at distance 0 from every channel.

Example:
    >>> import torch
    >>> f = torch.tensor([[0.0], [3.0], [1.0], [2.0]])
    >>> smoothing_order(f).tolist() in ([0, 2, 3, 1], [1, 3, 2, 0])
    True
"""

from __future__ import annotations

import numpy as np
import torch


def total_variation(features: torch.Tensor, order: torch.Tensor | None = None) -> float:
    """L1 total variation of ``features`` (m, d) along its first dim, in ``order`` if given."""
    f = features if order is None else features[order]
    return float((f[1:] - f[:-1]).abs().sum())


def smoothing_order(features: torch.Tensor, seed: int = 0, starts: int = 4) -> torch.Tensor:
    """A permutation of the rows of ``features`` (m, d) with small total variation.

    Returns a LongTensor of length m. The same features and seed give the same order.
    """
    m = features.shape[0]
    if m <= 2:
        return torch.arange(m)
    dist = distance_matrix(features)  # (m, m)
    best = None
    for start in _start_nodes(dist, seed, starts):
        path = _nearest_neighbour(dist, start)
        length = _path_length(dist, path)
        if best is None or length < best[0]:
            best = (length, path)
    path = _two_opt(dist, best[1])
    return torch.from_numpy(path.astype(np.int64))


def distance_matrix(features: torch.Tensor) -> np.ndarray:
    """(m, m) distances between rows: L1 (the total-variation metric) when affordable.

    An exact L1 matrix costs O(m^2 d) without a matrix-multiply kernel (about 2.5 s for a
    512-channel pair of 3x3 convs here); above ``_L1_BUDGET`` element-ops the Euclidean
    distance (one matmul) stands in for it - it orders channels nearly as well (bench/).
    """
    f = features.detach().to(torch.float32)
    m, d = f.shape
    if m * m * d <= _L1_BUDGET:
        return torch.cdist(f, f, p=1).to(torch.float64).numpy()
    sq = (f * f).sum(1)
    gram = f @ f.T
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).sqrt().to(torch.float64).numpy()


_L1_BUDGET = 2.5e8


def _start_nodes(dist: np.ndarray, seed: int, count: int) -> list[int]:
    far = int(dist.sum(1).argmax())  # an extreme channel is a natural path end
    starts = [far, int(dist[far].argmax())]
    rng = np.random.default_rng(seed)
    extra = rng.choice(dist.shape[0], size=min(count, dist.shape[0]), replace=False)
    for s in extra.tolist():
        if s not in starts and len(starts) < count:
            starts.append(int(s))
    return starts


def _nearest_neighbour(dist: np.ndarray, start: int) -> np.ndarray:
    m = dist.shape[0]
    path = np.empty(m, dtype=np.int64)
    visited = np.zeros(m, dtype=bool)
    cur = start
    for i in range(m):
        path[i] = cur
        visited[cur] = True
        if i + 1 < m:
            row = np.where(visited, np.inf, dist[cur])
            cur = int(row.argmin())
    return path


def _path_length(dist: np.ndarray, path: np.ndarray) -> float:
    return float(dist[path[:-1], path[1:]].sum())


def _two_opt(dist: np.ndarray, path: np.ndarray, max_passes: int = 100_000) -> np.ndarray:
    m = dist.shape[0]
    # Append the dummy node m (distance 0 to all) so the open path becomes a cycle that
    # starts at the dummy: tour = [m, p0, ..., p_{m-1}] and wraps back to m.
    d = np.zeros((m + 1, m + 1))
    d[:m, :m] = dist
    tour = np.concatenate([[m], path])
    idx = np.arange(1, m + 1)
    upper = np.triu(np.ones((m, m), dtype=bool), k=1)
    for _ in range(max_passes):
        prev = tour[idx - 1]  # node before position i
        cur = tour[idx]  # node at position i
        nxt = tour[(idx + 1) % (m + 1)]  # node after position j
        # Reversing tour[i..j] replaces edges (prev_i, cur_i), (cur_j, nxt_j) by
        # (prev_i, cur_j), (cur_i, nxt_j).
        gain = (
            d[prev[:, None], cur[None, :]]
            + d[cur[:, None], nxt[None, :]]
            - d[prev, cur][:, None]
            - d[cur, nxt][None, :]
        )  # (m, m), row = i, col = j
        gain = np.where(upper, gain, 0.0)
        flat = int(gain.argmin())
        i, j = divmod(flat, m)
        if gain[i, j] >= -1e-12 * max(1.0, float(d.max())):
            break
        tour[i + 1 : j + 2] = tour[i + 1 : j + 2][::-1].copy()
    return tour[1:]
