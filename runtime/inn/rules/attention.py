"""Rules for the products of attention: ``q @ k.transpose(-2, -1)``, ``attn @ v``,
``F.scaled_dot_product_attention`` and the same products written with ``torch.einsum``
(MaxViT: ``einsum("B G H I D, B G H J D -> B G H I J", q, k)``).

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


# Ops that reorder or retype a tensor's values without computing new ones: a parameter
# passed through them (``self.w.t()``) is still the parameter.
_REORDERS = {"t", "transpose", "permute", "contiguous", "float", "half", "to", "T", "mT",
             torch.t, torch.transpose, torch.permute}  # fmt: skip


def _a_parameter(t) -> bool:
    """Whether operand ``t`` is a module's parameter, reordered or retyped at most: ``h @
    self.w.t()`` was "a product of two activations", sending its writer looking in the
    wrong place (review helper-230)."""
    while isinstance(t, fx.Node) and t.op in ("call_method", "call_function") and t.args:
        op = t.args[1] if t.target is getattr else t.target  # (getattr: the attribute)
        if op not in _REORDERS:
            return False
        t = t.args[0]
    return isinstance(t, fx.Node) and t.op == "get_attr"


def _divided_heads(*operands) -> str:
    """A hint where an operand was reshaped with a size divided from another
    (``reshape(B, N, 3, h, C // h)``, older timm ViTs): that head_dim is computed from the
    channel count, so the reshape reads its last dim as the channels and the attention's
    q @ k then sums over them - refused as "two activations" with no word of the cause
    (review helper-230). Looked for a few ops back (permute, unbind, getitem, scaling)."""
    seen, todo = set(), [o for o in operands if isinstance(o, fx.Node)]
    for _ in range(12):
        if not todo:
            break
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.target in ("reshape", "view", torch.reshape) and any(
            isinstance(a, fx.Node) and a.target is operator.floordiv for a in n.args[1:]
        ):
            return (" (a reshape before it takes a size divided from the channel count, such "
                    "as head_dim = C // num_heads: innfer resamples whole heads, so give "
                    "head_dim as a literal, or -1)")  # fmt: skip
        todo.extend(a for a in n.args if isinstance(a, fx.Node))
    return ""


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
    weight = any(_a_parameter(t) for t in (a, b))
    tr.fixed(node, "matmul of an activation with a parameter (a hand-written layer) has no "
             "rule: use nn.Linear or F.linear, which resample it" if weight else
             f"matmul sums over a channel dim of two activations{_divided_heads(a, b)}",
             summed)  # fmt: skip
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


@register(functions=(torch.einsum,))
def einsum(tr: Tracer, node: fx.Node) -> None:
    """An index that reaches the output ties every operand dim it names (a broadcast size-1
    dim ties nothing), like matmul's batch dims; an index summed away must not carry
    continuous channels, like matmul's contracted dim. Equations with an ellipsis, an
    implicit output or an index repeated within one operand (a diagonal) have no rule."""
    equation = node.args[0]
    ops = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
        else node.args[1:]  # fmt: skip
    terms = _einsum_terms(equation, [len(tr.shape(o)) for o in ops])
    if terms is None:
        _refuse(tr, node, f"einsum {equation!r} (an ellipsis, an implicit output or a "
                          "repeated index) has no rule")  # fmt: skip
        return
    inputs, out = terms
    summed = [tr.labels.get(o, {}).get(d) for o, term in zip(ops, inputs, strict=True)
              for d, c in enumerate(term) if c not in out]  # fmt: skip
    weight = any(_a_parameter(o) for o in ops)
    tr.fixed(node, "einsum of an activation with a parameter (a hand-written layer) has no "
             "rule: use nn.Linear or F.linear, which resample it" if weight else
             f"einsum {equation!r} sums over a channel dim", [s for s in summed if s])  # fmt: skip
    shape, labels = tr.shape(node), {}
    for od, c in enumerate(out):
        for o, term in zip(ops, inputs, strict=True):
            if c not in term:
                continue
            d = term.index(c)
            if tr.shape(o)[d] == 1 and shape[od] != 1:  # broadcast
                continue
            lay = tr.layout_of(o, d)
            where = f"node {node.name!r}"
            labels[od] = tr.unify(labels[od], lay, where) if od in labels else lay
    tr.labels[node] = labels


def _einsum_terms(equation: object, ranks: list[int]) -> tuple[list[str], str] | None:
    """("bhid,bhjd", "bhij") from "b h i d, b h j d -> b h i j": each operand's indices and
    the output's, spaces dropped; None for what ``einsum`` has no rule for, or indices that
    do not match the operands' ranks.

    Example:
        >>> _einsum_terms("B H I D, B H J D -> B H I J", [4, 4])
        (['BHID', 'BHJD'], 'BHIJ')
        >>> _einsum_terms("...ij,...jk->...ik", [3, 3]) is None
        True
    """
    if not isinstance(equation, str) or "->" not in equation:
        return None
    left, out = equation.replace(" ", "").split("->")
    inputs = left.split(",")
    if len(inputs) != len(ranks) or not all(t.isalpha() for t in (*inputs, out) if t):
        return None
    if any(len(t) != r or len(set(t)) != len(t) for t, r in zip(inputs, ranks, strict=True)):
        return None
    if len(set(out)) != len(out) or not set(out) <= set("".join(inputs)):
        return None
    return inputs, out
