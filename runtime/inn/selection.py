"""Data-chosen sampling grids: which stored channels a calibrated tier of a transformer keeps.

The INN's uniform grid makes every sampled head or FFN channel out of its neighbours. On a
pretrained transformer, whose neighbouring channels are not alike even after the smoothing
permutation, that loses most of the function: all-MiniLM-L6-v2 at 50 % heads and FFN, data
free, keeps a mean cosine of 0.31 to the full model. Given calibration text, innfer puts the
tier's sample points on the stored nodes that the layer reading the group (the attention
output projection for heads, the FFN down-projection for FFN channels) can least do without.
A point on a node samples that node exactly - the cubic kernel is 1 there and 0 at every
other node - and the grid is stored with ``"unit"`` quadrature, so the input side is not
rescaled: the tier starts as the full network restricted to those channels, and
``runtime.inn.distill.refit_readouts`` then gives the readout the dropped channels' share.

Which nodes: greedy forward selection on the readout's least-squares reconstruction. For a
readout ``y = W x + b`` over the calibration tokens, with ``G`` the Gram matrix of ``[x, 1]``
and ``C = G [W, b]^T``, keeping the set ``S`` leaves the error of the best refit of ``y`` from
``x_S``; each step adds the entry (an FFN channel, or a head's block of inputs) that removes
most of what is left, given those already kept. Ranking channels by their mean contribution
``|W[:, c] x_c|`` does not see redundancy; this does - of two channels that carry the same
signal it keeps one. On all-MiniLM-L6-v2 (bench/transformers.py), refit only, the greedy
choice kept a mean cosine of 0.963 / 0.894 / 0.839 at (75, 75) / (50, 50) / (50, 25) % heads
and FFN, against 0.952 / 0.880 / 0.823 for the activation ranking.

Invariants: ``G`` is (k + 1, k + 1) float64 with the constant input last; an entry owns
``k / entries`` consecutive inputs of its readout (a head's 32, one FFN channel's 1); the
kept entries come back sorted, so the grid's points increase.

Example:
    >>> grams = readout_grams(inn, teacher, batches)  # doctest: +SKIP
    >>> keep = select_nodes(inn, teacher, grams, inn.sizes({"heads": 0.5, "ffn": 0.5}))
    ... # doctest: +SKIP
    >>> store_grids(inn, keep)  # later samples at those sizes use these nodes  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from runtime.inn.model import IntegralModel

# A candidate whose residual variance fell below this share of its own variance is (nearly)
# a combination of those already kept: it adds nothing and is not chosen while others do.
_COLLINEAR = 1e-9


def readers(inn: IntegralModel, groups: Collection[int]) -> list[str]:
    """Weights (in binding order) of the linear layers whose input side holds channels of
    any of ``groups`` (indices into ``inn.all_groups``)."""
    return [b.param for b in inn.bindings
            if b.reduce and inn.state[b.param].ndim == 2
            and any(s.group in groups for s in b.layout)]  # fmt: skip


def readout_weights(inn: IntegralModel) -> dict[str, str]:
    """Group name -> the weight of the one linear layer that reads the group (its input side
    is the group's channels): the layers a selection reconstructs and the refit solves."""
    out = {}
    for gi, g in enumerate(inn.all_groups):
        if g.discrete:
            continue
        reads = readers(inn, {gi})
        if len(reads) != 1:
            raise ValueError(
                f"group {g.name!r} is read by {reads or 'no layer'}; a data-chosen grid needs "
                "exactly one linear layer reading it (use the uniform grid for this model)"
            )
        out[g.name] = reads[0]
    return out


def linear_nodes(graph: fx.Graph) -> dict[str, fx.Node]:
    """Weight name -> the ``F.linear`` node using it (the sampled networks are flat graphs)."""
    return {n.args[1].target: n for n in graph.nodes
            if n.op == "call_function" and n.target is F.linear
            and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"}  # fmt: skip


@torch.no_grad()
def readout_grams(
    inn: IntegralModel, teacher: fx.GraphModule, batches: Sequence, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Per group, the (k + 1, k + 1) float64 Gram matrix of ``[x, 1]`` over the real tokens of
    ``batches`` (``TextBatch``es), ``x`` the input of the layer reading the group in the
    full-width ``teacher``. One pass of the teacher."""
    from runtime.inn.distill import with_taps

    reads = readout_weights(inn)
    linears = linear_nodes(teacher.graph)
    missing = sorted(set(reads.values()) - set(linears))
    if missing:
        raise ValueError(f"no linear layer of the teacher uses {missing}")
    tapped = with_taps(teacher, lambda g: tuple(linear_nodes(g)[w].args[0] for w in reads.values()))
    tapped.eval()
    grams: dict[str, torch.Tensor] = {}
    for b in tqdm(batches, desc="readout statistics", unit="batch", disable=not progress):
        _, xs = tapped(b.ids, b.mask)
        real = b.mask.bool()
        for g, x in zip(reads, xs, strict=True):
            xa = F.pad(x[real], (0, 1), value=1.0)  # (tokens, k + 1)
            # float32 products per batch (a few hundred tokens), float64 across batches
            part = (xa.T @ xa).double()
            grams[g] = grams[g] + part if g in grams else part
    return grams


def greedy_selection(gram: np.ndarray, weight: np.ndarray, entries: int, n: int) -> np.ndarray:
    """The ``n`` of ``entries`` entries (sorted indices) whose inputs best reconstruct the
    readout, chosen greedily (see the module doc).

    ``gram``: (k + 1, k + 1) Gram of ``[x, 1]``; ``weight``: (out, k + 1), the readout's
    weight with its bias as the last column. Entry ``e`` owns inputs
    ``[e * k / entries, (e + 1) * k / entries)``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(500, 4)); x[:, 1] = x[:, 0]  # input 1 repeats input 0
        >>> xa = np.hstack([x, np.ones((500, 1))])
        >>> w = np.array([[1.0, 1.0, 0.5, 0.0, 0.0]])  # y = x0 + x1 + 0.5 x2
        >>> greedy_selection(xa.T @ xa, w, 4, 2).tolist()  # one of the twins, then x2
        [0, 2]
    """
    k = gram.shape[0] - 1
    if gram.shape != (k + 1, k + 1) or weight.shape[1] != k + 1:
        raise ValueError(f"gram {gram.shape} and weight {weight.shape} do not fit together")
    if entries < 1 or k % entries:
        raise ValueError(f"{k} inputs do not split into {entries} entries")
    if not 0 < n <= entries:
        raise ValueError(f"cannot keep {n} of {entries} entries")
    inner = k // entries
    sel = _Residual(gram, gram @ weight.T)
    sel.take(np.array([k]))  # the bias' constant input is always there
    alive = np.ones(entries, dtype=bool)
    for _ in range(n):
        e = sel.best_scalar(alive) if inner == 1 else sel.best_block(alive, inner)
        alive[e] = False
        sel.take(np.arange(e * inner, (e + 1) * inner))
    return np.flatnonzero(~alive)


class _Residual:
    """What is left of the readout after the inputs taken so far, in Gram form.

    With ``V`` (r, k + 1) the Cholesky-like factor of what was taken (``gram - V.T @ V`` is
    the residual Gram) and ``W`` (r, out) the matching rows of the target's projection, the
    residual cross term is ``cross - V.T @ W``. It is never written out: a step keeps only
    each input's residual variance ``diag`` and ``norms`` (the squared norm of its residual
    cross row, which is all a scalar gain needs), so a step reads ``cross`` and ``V`` once
    and writes O(k) - rewriting the (k + 1, out) cross term every step took most of a
    768-of-1,536 selection. ``V`` and ``W`` are allocated once, as rows read contiguously."""

    def __init__(self, gram: np.ndarray, cross: np.ndarray):
        self.gram, self.cross = gram, cross
        self.diag = gram.diagonal().copy()
        self.norms = (cross**2).sum(1)
        self.floor = _COLLINEAR * np.maximum(gram.diagonal(), 1e-300)
        self.v = np.zeros((len(gram), len(gram)))
        self.w = np.zeros((len(gram), cross.shape[1]))
        self.r = 0

    def best_scalar(self, alive: np.ndarray) -> int:
        d, k = self.diag[: len(alive)], len(alive)
        explained = np.maximum(self.norms[:k], 0.0) / np.maximum(d, 1e-300)
        gain = np.where(d > self.floor[:k], explained, 0.0)
        gain[~alive] = -1.0
        return int(gain.argmax())

    def best_block(self, alive: np.ndarray, inner: int) -> int:
        best, choice = -1.0, -1
        for e in np.flatnonzero(alive):
            idx = np.arange(e * inner, (e + 1) * inner)
            block = self._residual_gram(idx)[idx]  # (inner, inner)
            c = self._residual_cross(idx)  # (inner, out)
            gain = float(np.sum(c * (np.linalg.pinv(block, hermitian=True) @ c)))
            if gain > best:
                best, choice = gain, int(e)
        return choice

    def _residual_gram(self, idx: np.ndarray) -> np.ndarray:
        """(k + 1, len(idx)): the residual Gram's columns ``idx``."""
        v = self.v[: self.r]
        return self.gram[:, idx] - v.T @ v[:, idx]

    def _residual_cross(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), out): the residual cross term's rows ``idx``."""
        return self.cross[idx] - self.v[: self.r, idx].T @ self.w[: self.r]

    def take(self, idx: np.ndarray) -> None:
        cols = self._residual_gram(idx)  # (k + 1, b)
        vals, vecs = np.linalg.eigh(cols[idx])  # the residual block, symmetric PSD
        keep = vals > _COLLINEAR * max(float(vals.max(initial=0.0)), 1e-300)
        if not keep.any():
            return  # nothing left in these inputs: taking them changes nothing
        inv_sqrt = vecs[:, keep] / np.sqrt(vals[keep])  # (b, b'): block^(-1/2) on its range
        v = cols @ inv_sqrt  # (k + 1, b'): the factor's new columns
        w = inv_sqrt.T @ self._residual_cross(idx)  # (b', out)
        # residual cross after this step: R - v @ w, with R @ w.T computed without R
        rw = self.cross @ w.T - self.v[: self.r].T @ (self.w[: self.r] @ w.T)  # (k + 1, b')
        self.norms -= 2 * (v * rw).sum(1) - ((v @ (w @ w.T)) * v).sum(1)
        self.diag -= (v * v).sum(1)
        b = v.shape[1]
        self.v[self.r : self.r + b] = v.T
        self.w[self.r : self.r + b] = w
        self.r += b


def select_nodes(
    inn: IntegralModel,
    teacher: fx.GraphModule,
    grams: Mapping[str, torch.Tensor],
    sizes: Mapping[str, int],
) -> dict[str, torch.Tensor]:
    """Per group resampled at ``sizes`` (continuous, one block, fewer channels than stored),
    the sorted node indices ``greedy_selection`` keeps; groups without a Gram are skipped."""
    reads = readout_weights(inn)
    linears = linear_nodes(teacher.graph)
    out = {}
    for g in inn.all_groups:
        n = sizes.get(g.name, g.size)
        if g.discrete or g.blocks != 1 or n >= g.size or g.name not in grams:
            continue
        lin = linears[reads[g.name]]
        w = teacher.get_parameter(lin.args[1].target).detach()  # (out, k)
        bias = lin.args[2] if len(lin.args) > 2 else None
        b = (teacher.get_parameter(bias.target).detach() if isinstance(bias, fx.Node)
             else torch.zeros(len(w)))  # fmt: skip
        wb = torch.cat([w, b.unsqueeze(1)], 1).double().numpy()  # (out, k + 1)
        keep = greedy_selection(grams[g.name].numpy(), wb, g.size, n)
        out[g.name] = torch.from_numpy(keep)
    return out


def store_grids(inn: IntegralModel, keep: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """Store, per group, the grid on the nodes ``keep`` (sorted indices) with unit quadrature:
    ``inn.sample`` at those counts then samples exactly those channels. Returns the grids."""
    grids = {}
    for name, idx in keep.items():
        m = inn.group(name).size
        points = ((idx.double() + 0.5) / m).tolist()  # node k sits at (k + 0.5) / m
        grids[f"{name}@{len(idx)}"] = {"points": points, "quadrature": "unit"}
    inn.info.setdefault("grids", {}).update(grids)
    return grids
