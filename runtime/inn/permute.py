"""Smoothing permutation: order a group's channels so its weights vary smoothly.

Resampling a continuous dimension interpolates between neighbouring channels, which only
makes sense when neighbours are alike. Channel order in a trained network is arbitrary, so
before conversion each group's channels are reordered to minimise the total variation
``sum_k |f[k+1] - f[k]|_1`` of the stacked channel features - a shortest Hamiltonian path
under the L1 distance.

Two paths, both deterministic for a seed (bench/permutation.py measures them):

exact (m <= ``EXACT_MAX`` = 256 channels; the original algorithm)
  1. the full distance matrix, vectorised: L1 where affordable, else Euclidean (one matmul);
  2. nearest-neighbour tours from a few start channels (the two most remote ones plus seeded
     random ones); keep the shortest;
  3. 2-opt on the open path, vectorised: each pass scores every segment reversal at once as an
     (m, m) gain matrix and applies the best one, until no reversal shortens the path.
  Each pass is O(m^2) and a path needs O(m) passes: O(m^3) - 0.7 s at 512 channels, 30 s
  and more at 2,048.

scalable (m > ``EXACT_MAX``)
  1. the same distance matrix while m^2 d <= ``_DENSE_BUDGET`` (a few seconds of matmul);
     above it the features are first reduced to their top ``RANK`` principal components (a
     seeded randomized range finder, O(m d RANK)) and Euclidean distances in that space
     stand for the full ones (about 0.5 % more total variation on bench/'s 2,048-channel
     pair than the full distances);
  2. from each nearest-neighbour tour of step 2 above, a local search restricted to each
     channel's ``NEIGHBOURS`` nearest channels, with don't-look bits: 2-opt (reverse a
     segment) and Or-opt (move a run of 1-3 channels elsewhere, either way round), first
     improvement, until no candidate move shortens the path; keep the shortest result.
     A move costs O(its segment) and a channel examines O(NEIGHBOURS) moves, so the search
     is close to linear in m: the O(m^2) distance matrix dominates (1-3 s at 4,096).
  At 512-1,024 channels its total variation matches the exact path's (bench/).

An open path is handled as a cycle through a dummy node at distance 0 from every channel.

Example:
    >>> import torch
    >>> f = torch.tensor([[0.0], [3.0], [1.0], [2.0]])
    >>> smoothing_order(f).tolist() in ([0, 2, 3, 1], [1, 3, 2, 0])
    True
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

EXACT_MAX = 256  # largest group ordered by the exact (full 2-opt) path
RANK = 128  # principal components kept by the scalable path
NEIGHBOURS = 10  # candidate neighbours per channel in the scalable local search


def total_variation(features: torch.Tensor, order: torch.Tensor | None = None) -> float:
    """L1 total variation of ``features`` (m, d) along its first dim, in ``order`` if given."""
    f = features if order is None else features[order]
    return float((f[1:] - f[:-1]).abs().sum())


def smoothing_order(features: torch.Tensor, seed: int = 0, starts: int = 4) -> torch.Tensor:
    """A permutation of the rows of ``features`` (m, d) with small total variation.

    Returns a LongTensor of length m. The same features and seed give the same order.
    Groups of up to ``EXACT_MAX`` channels take the exact path, larger ones the scalable one.
    """
    if features.shape[0] <= EXACT_MAX:
        return exact_order(features, seed, starts)
    return scalable_order(features, seed, starts)


def exact_order(features: torch.Tensor, seed: int = 0, starts: int = 4) -> torch.Tensor:
    """The exact path: full distance matrix, nearest-neighbour tours, full 2-opt (O(m^3))."""
    m = features.shape[0]
    if m <= 2:
        return torch.arange(m)
    dist = distance_matrix(features)  # (m, m)
    path = _two_opt(dist, _best_nearest_neighbour(dist, seed, starts))
    return torch.from_numpy(path.astype(np.int64))


def scalable_order(
    features: torch.Tensor,
    seed: int = 0,
    starts: int = 4,
    rank: int = RANK,
    neighbours: int = NEIGHBOURS,
) -> torch.Tensor:
    """The scalable path: distances (of ``rank`` principal components when m^2 d exceeds
    ``_DENSE_BUDGET``), then a neighbour-list local search from each of ``starts``
    nearest-neighbour tours; the shortest result wins."""
    m = features.shape[0]
    if m <= 2:
        return torch.arange(m)
    d = features.shape[1]
    if m * m * d <= _DENSE_BUDGET:
        dist = distance_matrix(features)
    else:
        dist = _euclidean(reduced_features(features, rank, seed))
    cands = _Candidates(dist, neighbours)
    best = None
    for start in _start_nodes(dist, seed, starts):
        path = _local_search(cands, _nearest_neighbour(dist, start))
        length = _path_length(dist, path)
        if best is None or length < best[0]:
            best = (length, path)
    return torch.from_numpy(best[1].astype(np.int64))


def distance_matrix(features: torch.Tensor) -> np.ndarray:
    """(m, m) distances between rows: L1 (the total-variation metric) when affordable.

    An exact L1 matrix costs O(m^2 d) without a matrix-multiply kernel (about 2.5 s for a
    512-channel pair of 3x3 convs here, 0.25 s at 2.5e8 element-ops); above ``_L1_BUDGET``
    element-ops the Euclidean distance (one matmul) stands in for it - it orders channels
    nearly as well (within 0.2 % total variation on bench/'s synthetic pairs).
    """
    f = features.detach().to(torch.float32)
    m, d = f.shape
    if m * m * d <= _L1_BUDGET:
        return torch.cdist(f, f, p=1).to(torch.float64).numpy()
    return _euclidean(f)


_L1_BUDGET = 6e7  # was 2.5e8: a 256 x 3,329 group (12 of them in resnet50) took 0.25 s
# m^2 d above which the scalable path reduces the features first: the exact Gram matrix
# then costs seconds (2.8 s at 4,096 x 9,216 here), and 4,096 x 29,185 (vgg11's fc pair) ~10 s
_DENSE_BUDGET = 1.6e11


def _euclidean(f: torch.Tensor) -> np.ndarray:
    f = f.to(torch.float32)
    sq = (f * f).sum(1)
    gram = f @ f.T
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).sqrt().to(torch.float64).numpy()


def reduced_features(
    features: torch.Tensor, rank: int = RANK, seed: int = 0, power: int = 1
) -> torch.Tensor:
    """(m, min(d, rank)): ``features`` projected on their top ``rank`` principal axes.

    A randomized range finder (``power`` power iterations, seeded) costs O(m d rank) instead
    of the O(m^2 d) of a full Gram matrix; distances between the returned rows approximate
    the Euclidean distances between the original rows, minus the least-variance directions.
    Centring (which leaves distances unchanged) is applied implicitly, without a copy.
    """
    f = features.detach().to(torch.float32)
    m, d = f.shape
    if d <= rank:
        return f
    mu = f.mean(0)
    width = min(rank + 10, m, d)
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(d, width, generator=g)
    q = torch.linalg.qr(f @ omega - mu @ omega).Q  # (m, width), of the centred f
    for _ in range(power):
        z = f.T @ q - torch.outer(mu, q.sum(0))  # centred f.T @ q
        q = torch.linalg.qr(f @ z - mu @ z).Q
    bt = f.T @ q - torch.outer(mu, q.sum(0))  # (d, width): centred f ~= q @ bt.T
    evals, u = torch.linalg.eigh(bt.T @ bt)  # bt.T @ bt = u diag(s^2) u.T, ascending
    k = min(rank, width)
    top = evals.flip(0)[:k].clamp_min(0).sqrt()
    return q @ (u.flip(1)[:, :k] * top)  # coordinates along the top k principal axes


def _best_nearest_neighbour(dist: np.ndarray, seed: int, starts: int) -> np.ndarray:
    best = None
    for start in _start_nodes(dist, seed, starts):
        path = _nearest_neighbour(dist, start)
        length = _path_length(dist, path)
        if best is None or length < best[0]:
            best = (length, path)
    return best[1]


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


class _Candidates:
    """What the local search reads: distances as Python floats and nearest-neighbour lists.

    Node m is the dummy (distance 0 to every channel); it leads every channel's list, so any
    channel may become a path end. ``rows[u][v]`` reads a float32 matrix through memoryviews
    (no per-element Python objects are kept: an (m, m) matrix of them would not fit).
    """

    def __init__(self, dist: np.ndarray, neighbours: int):
        m = dist.shape[0]
        self.n = m + 1
        self.dummy = m
        padded = np.zeros((m + 1, m + 1), dtype=np.float32)
        padded[:m, :m] = dist
        self._padded = padded
        self.rows = [memoryview(row) for row in padded]
        k = max(1, min(neighbours, m - 1))
        masked = padded[:m, :m].copy()
        np.fill_diagonal(masked, np.inf)
        near_d, near = torch.topk(torch.from_numpy(masked), k, dim=1, largest=False)
        near_d, near = near_d.numpy(), near.numpy()
        near = np.take_along_axis(near, np.lexsort((near, near_d), axis=1), axis=1)
        self.near = [[m, *row] for row in near.tolist()] + [[]]
        # Improvements below eps (relative to a typical nearest-neighbour distance) are
        # rounding, not progress.
        self.eps = 1e-7 * max(float(np.mean(near_d[:, 0])), 1e-30)


def _local_search(cands: _Candidates, path: np.ndarray) -> np.ndarray:
    """2-opt + Or-opt on candidate neighbour lists with don't-look bits (see the module doc)."""
    return _Tour(cands, path).optimise()


class _Tour:
    """The open path as a cycle [dummy, p0, ..., p_{m-1}] in Python lists (fast scalar access).

    ``tour[k]`` is the node at position k, ``pos[v]`` the position of node v; every move is
    expressed as 2-opt exchanges, each reversing the shorter side of the cycle.
    """

    def __init__(self, cands: _Candidates, path: np.ndarray):
        self.c = cands
        self.n = cands.n
        self.tour = [cands.dummy, *path.tolist()]
        self.pos = [0] * self.n
        for i, v in enumerate(self.tour):
            self.pos[v] = i

    def succ(self, v: int) -> int:
        p = self.pos[v] + 1
        return self.tour[p if p < self.n else 0]

    def pred(self, v: int) -> int:
        return self.tour[self.pos[v] - 1]

    def optimise(self) -> np.ndarray:
        dummy = self.c.dummy
        queue = deque(self.tour[1:])
        queued = [True] * self.n
        queued[dummy] = False
        while queue:
            a = queue.popleft()
            queued[a] = False
            touched = self._two_opt_move(a) or self._or_move(a)
            if touched:
                for v in (a, *touched):
                    if not queued[v] and v != dummy:
                        queued[v] = True
                        queue.append(v)
        i = self.pos[dummy]
        return np.array(self.tour[i + 1 :] + self.tour[:i], dtype=np.int64)

    def _two_opt_move(self, a: int) -> tuple[int, ...]:
        """Apply the first improving reversal that gives ``a`` a near neighbour."""
        rows, eps, tour, pos, n = self.c.rows, self.c.eps, self.tour, self.pos, self.n
        row_a = rows[a]
        for forward in (True, False):
            # b follows a, e follows c, in the direction scanned
            b = tour[(pos[a] + 1) % n] if forward else tour[pos[a] - 1]
            d_ab = row_a[b]
            for c in self.c.near[a]:
                g1 = d_ab - row_a[c]
                if g1 <= eps:
                    break
                e = tour[(pos[c] + 1) % n] if forward else tour[pos[c] - 1]
                if c == b or e == a:
                    continue
                if g1 + rows[c][e] - rows[b][e] > eps:
                    self._exchange(a, b, c, e)  # edges (a,b), (c,e) -> (a,c), (b,e)
                    return (b, c, e)
        return ()

    def _or_move(self, a: int) -> tuple[int, ...]:
        """Move the run of 1-3 nodes that starts at ``a`` between two other adjacent nodes."""
        rows, eps, tour, pos, n = self.c.rows, self.c.eps, self.tour, self.pos, self.n
        near, dummy = self.c.near, self.c.dummy
        if a == dummy:
            return ()
        for length in (1, 2, 3):
            for step in (1, -1) if length > 1 else (1,):
                pa = pos[a]
                seg = [tour[(pa + step * k) % n] for k in range(length)]
                s1, s2 = a, seg[-1]
                p = tour[(pa - step) % n]
                nx = tour[(pa + step * length) % n]
                if dummy in seg or p == nx or nx in seg:
                    continue
                removal = rows[p][s1] + rows[s2][nx] - rows[p][nx]
                if removal <= eps:
                    continue
                blocked = (*seg, p, nx)
                for end, other in ((s1, s2), (s2, s1)) if length > 1 else ((s1, s1),):
                    row_end, row_other = rows[end], rows[other]
                    for c in near[end]:
                        g = removal - row_end[c]
                        if g <= eps:
                            break
                        if c in blocked:
                            continue
                        row_c = rows[c]
                        pc = pos[c]
                        for e in (tour[(pc + 1) % n], tour[pc - 1]):
                            if e in blocked:
                                continue
                            if g - row_other[e] + row_c[e] > eps:
                                self._move_run(p, s1, s2, nx, c, e, end)
                                return (p, nx, c, e, s1, s2)
        return ()

    def _move_run(self, p: int, s1: int, s2: int, nx: int, c: int, e: int, end: int) -> None:
        """p s1..s2 nx ... c e  ->  p nx ... c end..other e, as two or three exchanges."""
        # Orient so that p -> s1 is forward; (x, y) is the edge (c, e) in that orientation.
        step = self.succ if self.succ(p) == s1 else self.pred
        x, y = (c, e) if step(c) == e else (e, c)
        self._exchange(p, s1, x, y)  # -> p x ... s1 y  (s1..x reversed)
        self._exchange(p, x, nx, s2)  # -> p nx ... x s2..s1 y
        if s1 != s2 and (end == s2) != (x == c):  # the run must face the other way round
            self._exchange(x, s2, s1, y)  # -> x s1..s2 y

    def _exchange(self, u1: int, v1: int, u2: int, v2: int) -> None:
        """Replace tour edges (u1, v1), (u2, v2) by (u1, u2), (v1, v2) (a 2-opt move)."""
        if self.succ(u1) == v1:
            self._reverse(self.pos[v1], self.pos[u2])
        else:
            self._reverse(self.pos[u1], self.pos[v2])

    def _reverse(self, i: int, j: int) -> None:
        """Reverse the cycle from position i forward to position j (or, equivalently for the
        edges, the complementary side when that is shorter)."""
        n, tour, pos = self.n, self.tour, self.pos
        length = (j - i) % n + 1
        if 2 * length > n:
            i, j, length = (j + 1) % n, (i - 1) % n, n - length
        if length < 2:
            return
        if i <= j:
            tour[i : j + 1] = tour[i : j + 1][::-1]
            for k in range(i, j + 1):
                pos[tour[k]] = k
            return
        for _ in range(length // 2):
            u, v = tour[i], tour[j]
            tour[i], tour[j] = v, u
            pos[v], pos[u] = i, j
            i = i + 1 if i + 1 < n else 0
            j = j - 1 if j > 0 else n - 1
