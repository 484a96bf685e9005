"""Rules for ops that only move or regroup dims: view/reshape/flatten/unsqueeze/squeeze,
expand, permute/transpose, and roll/flip, which move entries along dims (Swin's shifted
windows: ``torch.roll`` over the spatial dims; along a channel dim they are fixed).

A reshape is split into runs of dims whose sizes multiply to the same number (size-1 dims
ignored). One dim -> one dim carries its layout; several -> one is a flatten (the first dim's
channels, each spanning the rest, channel-major); one -> several un-flattens when every
segment's span divides evenly, or splits channels into ``(parts..., heads, head_dim...)``
(attention's ``reshape(B, N, 3, H, D)``, channel shuffle's ``view(B, g, C/g, ...)``): the
channels become blocks of ``head_dim`` entries - a *structured* group whose elements are
heads (``Tracer.refine``), one group for every part (q/k/v heads are tied). Heads are the
continuous dim; head_dim and the parts keep their sizes. Anything else - a merge with
channels not first, a split no layout describes - fixes the dims involved (refused if
continuous).

A channel dim's size given as a literal int would not follow resampling. The heads size of
a split, a dim that carries one input channel dim unchanged (``gamma.view(1, C, 1, 1)``,
GPT-2's ``x.view(-1, C)``; torch.export graphs state every size as a literal), and a channel
size in a reshape that flattens or splits dims and gives no -1 (patch embedding's
``reshape(B, C, H*W)``, attention's merge ``reshape(B, N, C)``), become size fields of the
node, rewritten when sampling; anywhere else (a merge with -1: ``view(-1, C*H*W)``) a literal
fixes the dim (use -1 or ``x.size(d)``). A size computed from channel counts alone (CoaT's
``C // heads`` with C read off the block's input, not the tensor split) is a number of the
width that need not be the count of the dim it sizes: it becomes a size field too.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

import torch
from torch import fx

from runtime.inn.layout import Layout, Segment, SizeField, node_key
from runtime.inn.rules import register
from runtime.inn.rules._args import arg, flat, sizes

if TYPE_CHECKING:
    from runtime.inn.tracer import Labels, Tracer


def reshape_runs(src: tuple, dst: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of ``src`` dims with runs of ``dst`` dims of equal product (size-1 dims are
    skipped). None when the sizes do not line up (zero-size dims)."""
    a = [d for d, n in enumerate(src) if n != 1]
    b = [d for d, n in enumerate(dst) if n != 1]
    runs, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        ra, rb = [a[i]], [b[j]]
        pa, pb = src[a[i]], dst[b[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                ra.append(a[i])
                pa *= src[a[i]]
                i += 1
            elif pb < pa and j < len(b):
                rb.append(b[j])
                pb *= dst[b[j]]
                j += 1
            else:
                return None
        runs.append((ra, rb))
    return runs if i == len(a) and j == len(b) else None


def reshape_to(tr: Tracer, node: fx.Node, x: fx.Node, size_args: list | None) -> None:
    """Label ``node`` = ``x`` reshaped to ``node``'s shape; ``size_args`` are the literal
    sizes given (None when they come from another tensor, as in ``reshape_as``)."""
    src, dst = tr.shape(x), tr.shape(node)
    labels, srcs = tr.labels.get(x, {}), tr.sources.get(x, {})
    out: Labels = {}
    out_src = {}
    runs = reshape_runs(src, dst)
    what = f"reshape {src} -> {dst}"
    if runs is None:
        tr.fixed(node, f"{what} is not a regrouping of dims", labels.values())
        return
    # A literal channel size is rewritten when sampling only in a reshape that regroups dims
    # and states every size - or whose one -1 stands for dims of no channels (LeViT's
    # ``reshape(B, -1, heads * head_dim)``: the -1 then absorbs no channel count) - or for
    # the heads of a split. A -1 over channels would absorb a mismatch.
    minus = [d for d, a in enumerate(size_args or ()) if type(a) is int and a == -1]
    free = len(minus) == 1 and not any(
        tr.uf.continuous(seg.group)
        for ra, rb in runs
        if minus[0] in rb
        for d in ra
        for seg in labels.get(d, ())
    )
    stated = size_args is not None and (not minus or free)
    rewrite = (
        set(range(len(dst))) - set(minus)
        if stated and any(len(ra) > 1 or len(rb) > 1 for ra, rb in runs)
        else set()
    )
    for ra, rb in runs:
        lays = [labels[d] for d in ra if d in labels]
        if not lays:
            continue
        first = labels.get(ra[0])
        if len(ra) == 1 and len(rb) == 1:
            out[rb[0]] = first
            rewrite.add(rb[0])  # the same channels: a literal size is their sampled count
            if ra[0] in srcs:
                out_src[rb[0]] = srcs[ra[0]]
        elif len(rb) == 1:  # a flatten: channel-major only when channels come first
            if first is not None:
                inner = math.prod(src[d] for d in ra[1:])
                out[rb[0]] = tuple(Segment(s.group, s.inner * inner, s.per_block) for s in first)
            rest = [labels[d] for d in ra[1:] if d in labels]
            tr.fixed(node, f"{what} merges a channel dim after another dim", rest)
        elif len(ra) == 1 and all(s.inner % math.prod(dst[d] for d in rb[1:]) == 0 for s in first):
            tail = math.prod(dst[d] for d in rb[1:])  # un-flatten: (C*H*W) -> (C, H, W)
            out[rb[0]] = tuple(Segment(s.group, s.inner // tail, s.per_block) for s in first)
        else:
            head = split_heads(tr, node, first, dst, rb, size_args) if len(ra) == 1 else None
            if head is None:
                tr.fixed(
                    node,
                    f"{what} splits a channel dim into several in a way no rule describes "
                    f"(heads must be one dim, head_dim and the parts literal sizes)",
                    lays,
                )
            else:
                out[head[0]] = head[1]
                rewrite.add(head[0])
    fields = []
    if size_args is not None and len(size_args) != len(dst):  # x.view(shape): one computed size
        for d in out:
            tr.after_walk(lambda d=d: _computed_size(tr, node, d, size_args[0], what, whole=True))
    elif size_args is not None:
        for d, lay in out.items():
            given = size_args[d]
            if isinstance(given, fx.Node):
                stated = d in rewrite
                tr.after_walk(
                    lambda d=d, given=given, stated=stated: _computed_size(
                        tr, node, d, given, what, rewrite=stated
                    )
                )
            elif isinstance(given, int) and given != -1:
                if d in rewrite:  # stated: the sampled count replaces it
                    fields.append(_size_field(node, d, lay))
                    continue
                tr.fixed(
                    node,
                    f"{what} gives channel dim {d} the literal size {given}, which would not "
                    f"follow resampling; use torch.flatten(x, {d}) or -1 for sizes",
                    [lay],
                )
        for d, given in enumerate(size_args):
            if d not in out and isinstance(given, fx.Node):  # a dim of no channels
                tr.after_walk(lambda d=d, given=given: _computed_size(tr, node, d, given, what))
    if fields:
        tr.size_fields.setdefault(node_key(node.name), []).extend(fields)
    tr.labels[node] = out
    tr.sources[node] = out_src


def _computed_size(
    tr: Tracer, node: fx.Node, d: int, size: fx.Node, what: str, rewrite=False, whole=False
) -> None:
    """After the walk (``Tracer.after_walk``): output dim ``d`` of reshape ``node`` got the
    computed ``size`` (``B, N, C = x.shape`` ... ``reshape(B, N, C)``; ``whole``: the
    shape of every dim as one value, ``x.view(y.shape)``). It follows the channels of ``d``
    only if it reads the size of a dim that holds them. A size made of channel counts alone
    (``_size_reads``) is replaced by the sampled count of ``d``, whatever ``d`` holds.
    Otherwise a dim of fixed size (discrete, or no channels at all: batch, sequence) keeps
    the computed size, and stays dynamic; for continuous channels, where the reshape states
    every size (``rewrite``) the sampled count replaces it, elsewhere (a -1 among the
    sizes, a whole shape) the dim is fixed."""
    lay = tr.labels[node].get(d)
    read = _shape_read(size, whole)
    if read is not None and lay is not None:
        t, k, rank = read[0], d if whole else read[1], len(tr.shape(read[0]))
        inside = isinstance(k, int) and -rank <= k < rank
        if inside and _same(tr, tr.labels.get(t, {}).get(k % rank), lay):
            return
    reads = None if whole else _size_reads(tr, size)
    if reads and all(_varies(tr, r) for r in reads):
        # CoaT's ``qkv(x).reshape(B, N, 3, h, C // h)`` with C read off the block's input:
        # a number of the width alone, which need not be the count of the channels it is
        # given for (here a head_dim that stays 8 while C halves). The sampled model must
        # reshape to what its tensor holds: that count, at every width (a literal of the
        # full width's size where ``d`` is discrete).
        lay = lay if lay is not None else tr.layout_of(node, d)
        tr.size_fields.setdefault(node_key(node.name), []).append(_size_field(node, d, lay))
        return
    if not _varies(tr, lay):
        # A dim of fixed size (batch, sequence; stays dynamic). A size mixing channel counts
        # with others (``b * c // c``) is left as it is: what it comes to at another width
        # is unknown here, and the half-width run (``conversion._check_narrow``) refuses
        # one that goes wrong, naming the node.
        return
    if rewrite:
        tr.size_fields.setdefault(node_key(node.name), []).append(_size_field(node, d, lay))
        return
    tr.fixed(
        node,
        f"{what} gives channel dim {d} the computed size {size.name!r}, which need not "
        f"follow resampling; use torch.flatten(x, {d}), -1 or x.size({d}) of these channels",
        [lay],
    )


# Python arithmetic on numbers through which a size is computed from others (``C // h``).
_NUMBER_OPS = frozenset({operator.floordiv, operator.mul, operator.add, operator.sub,
                         operator.mod, operator.neg})  # fmt: skip


def _size_reads(tr: Tracer, size: object) -> list[Layout | None] | None:
    """The layouts of the tensor dims whose sizes ``size`` is computed from, through Python
    arithmetic (``x.shape[-1] // 8``: one read); None for a dim no rule labelled. None in
    all when it depends on anything else (a model input, a call without a rule): unknown."""
    if not isinstance(size, fx.Node):
        return [] if isinstance(size, int) else None
    read = _shape_read(size)
    if read is not None:
        t, k = read
        rank = len(tr.shape(t))
        if not isinstance(k, int) or not -rank <= k < rank:
            return None
        return [tr.labels.get(t, {}).get(k % rank)]
    if size.op == "call_method" and size.target == "numel" and tr.shape(size.args[0]):
        labels = tr.labels.get(size.args[0], {})
        return [labels.get(k) for k in range(len(tr.shape(size.args[0])))]
    if size.op != "call_function" or size.target not in _NUMBER_OPS or size.kwargs:
        return None
    if size.meta.get("tensor_meta") is not None:  # a tensor op, not a number
        return None
    out: list[Layout | None] = []
    for a in size.args:
        sub = _size_reads(tr, a)
        if sub is None:
            return None
        out.extend(sub)
    return out


def _varies(tr: Tracer, lay: Layout | None) -> bool:
    """Whether a dim of layout ``lay`` changes size with the width (holds continuous
    channels)."""
    return lay is not None and any(tr.uf.continuous(s.group) for s in lay)


def _shape_read(size: object, whole: bool = False) -> tuple[fx.Node, int | None] | None:
    """(tensor, dim) when ``size`` is ``t.shape[dim]``, ``t.size(dim)`` or ``t.size()[dim]``
    (``whole``: (tensor, None) when it is ``t.shape`` or ``t.size()``); else None."""
    if not isinstance(size, fx.Node):
        return None
    if size.op == "call_method" and size.target == "size":
        dim = arg(size, 1, "dim", None)
        if (dim is None) == whole and isinstance(size.args[0], fx.Node):
            return size.args[0], dim
        return None
    if size.op == "call_function" and size.target is getattr and size.args[1] == "shape":
        return (size.args[0], None) if whole else None
    if not whole and size.op == "call_function" and size.target is operator.getitem:
        of, dim = size.args
        shape = _shape_read(of, whole=True)
        if shape is not None and isinstance(dim, int):
            return shape[0], dim
    return None


def _same(tr: Tracer, a: Layout | None, b: Layout) -> bool:
    """Whether layouts ``a`` and ``b`` hold the same channels (so the same count)."""
    if a is None or len(a) != len(b):
        return False
    find = tr.uf.find
    return all((find(x.group), x.inner, x.per_block) == (find(y.group), y.inner, y.per_block)
               for x, y in zip(a, b, strict=True))  # fmt: skip


def _size_field(node: fx.Node, d: int, lay: Layout) -> SizeField:
    """The size field rewriting output dim ``d``'s literal size in ``node``'s call."""
    if "shape" in node.kwargs or "size" in node.kwargs:
        return SizeField("shape" if "shape" in node.kwargs else "size", lay, d)
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return SizeField("1", lay, d)  # x.view((B, N, C)) / torch.reshape(x, (B, N, C))
    return SizeField(str(1 + d), lay, None)  # x.view(B, N, C)


def split_heads(
    tr: Tracer, node: fx.Node, lay: Layout, dst: tuple, rb: list[int], size_args: list | None
) -> tuple[int, Layout] | None:
    """Channels (layout ``lay``) reshaped to the dims ``rb`` = (parts..., heads,
    head_dim...): every part must be whole heads of one group, each head ``head_dim``
    consecutive channel entries. The parts' head groups are tied (refined where one group
    spans several parts or heads span several of its channels, ``Tracer.refine``). Returns
    (the heads dim, its layout), or None when no reading fits.

    Part and head_dim sizes must be literal ints (or -1): they stay as they are, so a size
    computed from the channel count would go wrong. The heads size may be a literal (then
    rewritten when sampling) or -1; a computed one only when no size is -1 (then the
    element count forces it right).
    """
    if size_args is None or len(size_args) != len(dst):
        return None
    uf = tr.uf
    for j in (len(rb) - 2, len(rb) - 1):  # (3, H, D) / (g, C/g): heads next to last, or last
        heads, inner = dst[rb[j]], math.prod(dst[d] for d in rb[j + 1 :])
        others = [size_args[d] for d in rb if d != rb[j]]
        if not all(type(a) is int for a in others):
            continue
        given = size_args[rb[j]]
        if type(given) is not int and any(type(a) is int and a == -1 for a in size_args):
            continue
        block, pos, plan = heads * inner, 0, {}
        for s in lay:
            r = uf.find(s.group)
            span = uf.size[r] * s.inner
            if s.per_block or pos % block or span % block or inner % s.inner:
                plan = None
                break
            qf = (span // block, inner // s.inner)  # parts it spans, channels per head
            if plan.setdefault(r, qf) != qf or (qf != (1, 1) and uf.blocks[r] > 1):
                plan = None
                break
            pos += span
        if not plan:
            continue
        where = f"node {node.name!r} (heads of a channel split)"
        groups = [tr.refine(r, q, f) for r, (q, f) in plan.items()]
        for g in groups[1:]:
            uf.union(groups[0], g, where)
        return rb[j], (Segment(groups[0]),)
    return None


@register(methods=("view", "reshape"), functions=(torch.reshape,))
def reshape(tr: Tracer, node: fx.Node) -> None:
    if any(isinstance(a, torch.dtype) for a in node.args[1:]):  # x.view(dtype)
        tr.fixed_inputs(node, "view as another dtype")
        return
    reshape_to(tr, node, node.args[0], sizes(node))


@register(methods=("reshape_as", "view_as", "unsqueeze", "squeeze"),
          functions=(torch.unsqueeze, torch.squeeze))  # fmt: skip
def reshape_from_tensor(tr: Tracer, node: fx.Node) -> None:
    reshape_to(tr, node, node.args[0], None)


def flatten_dims(tr: Tracer, node: fx.Node, x: fx.Node, start: int, end: int) -> None:
    reshape_to(tr, node, x, None)


@register(methods=("flatten",), functions=(torch.flatten,))
def flatten(tr: Tracer, node: fx.Node) -> None:
    reshape_to(tr, node, node.args[0], None)


@register(methods=("expand", "expand_as"))
def expand(tr: Tracer, node: fx.Node) -> None:
    """Leading dims are added; size-1 dims broadcast (they carry nothing); the rest carry."""
    x = node.args[0]
    src, dst = tr.shape(x), tr.shape(node)
    given = sizes(node) if node.target == "expand" else None
    offset = len(dst) - len(src)
    out: Labels = {}
    for d, lay in tr.labels.get(x, {}).items():
        if src[d] == dst[d + offset]:
            out[d + offset] = lay
            size = given[d + offset] if given and d + offset < len(given) else None
            if isinstance(size, int) and size != -1:
                tr.fixed(
                    node,
                    f"expand gives channel dim {d + offset} the literal size {size}; use -1",
                    [lay],
                )
    tr.labels[node] = out
    tr.sources[node] = {
        d + offset: s for d, s in tr.sources.get(x, {}).items() if src[d] == dst[d + offset]
    }


@register(methods=("transpose", "permute", "t", "movedim", "swapaxes", "swapdims"),
          functions=(torch.transpose, torch.permute, torch.t, torch.movedim, torch.swapaxes,
                     torch.swapdims))  # fmt: skip
def transpose(tr: Tracer, node: fx.Node) -> None:
    x = node.args[0]
    rank = len(tr.shape(x))
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name == "permute":
        order = [d % rank for d in flat(node.args[1:] or [node.kwargs.get("dims")])]
    elif name == "movedim":
        moved = dict(
            zip(
                [int(d) % rank for d in flat([arg(node, 2, "destination")])],
                [int(d) % rank for d in flat([arg(node, 1, "source")])],
                strict=True,
            )
        )
        rest = iter(d for d in range(rank) if d not in moved.values())
        order = [moved[i] if i in moved else next(rest) for i in range(rank)]
    else:
        a, b = (0, 1) if name == "t" else (int(arg(node, 1, "dim0")), int(arg(node, 2, "dim1")))
        order = list(range(rank))
        if rank > 1 or name != "t":
            order[a % rank], order[b % rank] = order[b % rank], order[a % rank]
    labels, srcs_ = tr.labels.get(x, {}), tr.sources.get(x, {})
    tr.labels[node] = {new: labels[old] for new, old in enumerate(order) if old in labels}
    tr.sources[node] = {new: srcs_[old] for new, old in enumerate(order) if old in srcs_}


@register(methods=("roll", "flip"), functions=(torch.roll, torch.flip))
def roll(tr: Tracer, node: fx.Node) -> None:
    """Entries move along the rolled (flipped) dims; every dim keeps its layout. On a channel
    dim the move is by position - which channel lands where changes with the width - so that
    dim is fixed. ``roll`` without dims flattens first: every dim is then involved."""
    x = node.args[0]
    rank = len(tr.shape(x))
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dims = arg(node, 2, "dims") if name == "roll" else arg(node, 1, "dims")
    moved = range(rank) if dims is None else [int(d) % rank for d in flat([dims])]
    labels = tr.labels.get(x, {})
    tr.fixed(node, f"{name} along a channel dim", [labels[d] for d in moved if d in labels])
    tr.copy(node, x)


@register(functions=(torch.pixel_shuffle,), modules=(torch.nn.PixelShuffle,))
def pixel_shuffle(tr: Tracer, node: fx.Node) -> None:
    """``F.pixel_shuffle(x, r)``: (*, C * r * r, H, W) -> (*, C, H * r, W * r), output
    channel c made of input channels c * r * r ... c * r * r + r * r - 1 (a super-resolution
    upsampler, EDSR / ESPCN: it was refused, "no rule"). So each output channel spans r * r
    consecutive input channels: the input's group is refined into one of C channels, each of
    ``inner`` r * r (as attention heads are), and the conv before it is resampled by whole
    output channels. A layout that does not split so (a run not a multiple of r * r) is
    fixed, as are channels in the spatial dims."""
    x, r = _shuffled(tr, node, "upscale_factor")
    rank = len(tr.shape(x))
    labels = tr.labels.get(x, {})
    if rank != 4:  # (ONNX's DepthToSpace is 4-D: no tier of it would export)
        tr.fixed(node, f"pixel_shuffle of a {rank}-D input (ONNX exports 4-D ones)",
                 labels.values())  # fmt: skip
        tr.labels[node] = {}
        return
    lay = labels.get(1)
    out: Labels = {}
    if lay is not None:
        step, uf = r * r, tr.uf
        for s in lay:  # an inner of 1: refined (which rewrites ``lay`` in place)
            root = uf.find(s.group)
            # A group in blocks (a grouped conv's output, a GroupNorm's input) is not
            # refined: the new group would lose them, and the permutation and resampling
            # cross the blocks - a wrong tier that exported and served (review helper-239).
            if (
                s.inner == 1
                and not s.per_block
                and uf.size[root] % step == 0
                and uf.blocks[root] == 1
            ):
                tr.refine(s.group, 1, step)
        lay = tr.labels[x][1]
        if all(s.inner % step == 0 for s in lay):
            out[1] = tuple(Segment(s.group, s.inner // step, s.per_block) for s in lay)
        else:  # (the output's channels a fixed group of their own: tied later, refused)
            what = (f"pixel_shuffle by {r} of channels in runs of other than {step}, or in the "
                    "blocks of a grouped conv or GroupNorm")  # fmt: skip
            out[1] = (Segment(uf.new(tr.shape(node)[1], f"{node.name}:1", anchored=False)),)
            tr.fixed(node, what, [lay, out[1]])
    _keep_leading(tr, node, x, out)


@register(functions=(torch.pixel_unshuffle,), modules=(torch.nn.PixelUnshuffle,))
def pixel_unshuffle(tr: Tracer, node: fx.Node) -> None:
    """``F.pixel_unshuffle(x, r)``: (*, C, H * r, W * r) -> (*, C * r * r, H, W), each
    input channel spread over r * r consecutive output channels (channel-major, as a
    flatten of (C, r * r))."""
    x, r = _shuffled(tr, node, "downscale_factor")
    rank = len(tr.shape(x))
    if rank != 4:  # (as pixel_shuffle: SpaceToDepth is 4-D; review helper-242)
        tr.fixed(node, f"pixel_unshuffle of a {rank}-D input (ONNX exports 4-D ones)",
                 tr.labels.get(x, {}).values())  # fmt: skip
        tr.labels[node] = {}
        return
    lay = tr.labels.get(x, {}).get(rank - 3)
    out: Labels = {}
    if lay is not None:
        out[rank - 3] = tuple(Segment(s.group, s.inner * r * r, s.per_block) for s in lay)
    _keep_leading(tr, node, x, out)


def _shuffled(tr: Tracer, node: fx.Node, factor: str) -> tuple[fx.Node, int]:
    """(x, r) of a pixel (un)shuffle call or module."""
    if node.op == "call_module":
        return node.args[0], int(getattr(tr.modules[node.target], factor))
    return node.args[0], int(arg(node, 1, factor))


def _keep_leading(tr: Tracer, node: fx.Node, x: fx.Node, out: Labels) -> None:
    """Label ``node`` with ``out`` (its channel dim, -3) and x's leading dims (batch, ...);
    channels in the last two dims, which the shuffle moves between, are fixed."""
    rank = len(tr.shape(x))
    labels = tr.labels.get(x, {})
    for d, lay in labels.items():
        if d < rank - 3:
            out[d] = lay
        elif d > rank - 3:
            tr.fixed(node, f"pixel shuffle of dim {d}, which holds channels", [lay])
    tr.labels[node] = out
