"""Rules for the products of attention: ``q @ k.transpose(-2, -1)``, ``attn @ v`` and
``F.scaled_dot_product_attention``.

Heads come from a channel split (``rules.shapes.split_heads``): the heads dim is a batch dim
of these products, tied across operands like a broadcast dim, and stays continuous. A
contracted dim (the head_dim of ``q @ k^T``, the keys of ``attn @ v``) must not carry
continuous channels: a sum over channels of a product of two activations has no quadrature
scale, and the default softmax scale 1/sqrt(head_dim) would change with the width.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx

from runtime.inn.rules import register
from runtime.inn.rules._args import arg

if TYPE_CHECKING:
    from runtime.inn.tracer import Labels, Tracer


def _tie_batch(tr: Tracer, node: fx.Node, operands: list, rank: int, labels: Labels) -> None:
    """Tie the leading (batch) dims of ``operands`` with ``node``'s, right-aligned before
    their last two dims; a broadcast size-1 dim ties nothing."""
    out = tr.shape(node)
    for a in operands:
        shape = tr.shape(a)
        offset = (rank - 2) - (len(shape) - 2)
        for d in range(len(shape) - 2):
            od = d + offset
            if shape[d] == 1 or shape[d] != out[od]:
                continue
            lay = tr.layout_of(a, d)
            where = f"node {node.name!r}"
            labels[od] = tr.unify(labels[od], lay, where) if od in labels else lay


def _refuse(tr: Tracer, node: fx.Node, what: str) -> None:
    tr.fixed_inputs(node, what)
    tr.opaque(node, what)


@register(functions=(operator.matmul, torch.matmul, torch.bmm), methods=("matmul", "bmm"))
def matmul(tr: Tracer, node: fx.Node) -> None:
    a, b = node.args[0], node.args[1]
    sa, sb, rank = tr.shape(a), tr.shape(b), len(tr.shape(node))
    if len(sa) < 2 or len(sb) < 2 or not rank:
        _refuse(tr, node, "matmul with a vector operand has no rule")
        return
    la, lb = tr.labels.get(a, {}), tr.labels.get(b, {})
    summed = [lay for lay in (la.get(len(sa) - 1), lb.get(len(sb) - 2)) if lay is not None]
    weight = any(isinstance(t, fx.Node) and t.op == "get_attr" for t in (a, b))
    tr.fixed(node, "matmul of an activation with a parameter (a hand-written layer) has no "
             "rule: use nn.Linear or F.linear, which resample it" if weight else
             "matmul sums over a channel dim of two activations", summed)  # fmt: skip
    labels: Labels = {}
    _tie_batch(tr, node, [a, b], rank, labels)
    if len(sa) - 2 in la:
        labels[rank - 2] = la[len(sa) - 2]
    if len(sb) - 1 in lb:
        labels[rank - 1] = lb[len(sb) - 1]
    tr.labels[node] = labels


@register(functions=(F.scaled_dot_product_attention,))
def scaled_dot_product_attention(tr: Tracer, node: fx.Node) -> None:
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    mask = arg(node, 3, "attn_mask")
    ranks = {len(tr.shape(t)) for t in (q, k, v)}
    if len(ranks) != 1 or min(ranks) < 2 or node.kwargs.get("enable_gqa", False):
        _refuse(tr, node, "scaled_dot_product_attention with these operands has no rule")
        return
    rank = ranks.pop()
    lq, lk, lv = (tr.labels.get(t, {}) for t in (q, k, v))
    summed = [lay for lay in (lq.get(rank - 1), lk.get(rank - 1), lk.get(rank - 2),
                              lv.get(rank - 2)) if lay is not None]  # fmt: skip
    tr.fixed(node, "attention over a channel dim (head_dim or keys)", summed)
    if isinstance(mask, fx.Node):
        tr.fixed(node, "an attention mask on channels", tr.labels.get(mask, {}).values())
    labels: Labels = {}
    _tie_batch(tr, node, [q, k, v], rank, labels)
    if rank - 2 in lq:
        labels[rank - 2] = lq[rank - 2]
    if rank - 1 in lv:
        labels[rank - 1] = lv[rank - 1]
    tr.labels[node] = labels
