"""Rules for elementwise ops (unary, broadcasting binary, softmax), concat and reductions."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from runtime.inn.groups import ConversionError
from runtime.inn.identities import identity_input
from runtime.inn.layout import Segment, SizeField, node_key
from runtime.inn.rules import register
from runtime.inn.rules._args import arg
from runtime.inn.rules.indexing import into_a_view, refuse_in_place

if TYPE_CHECKING:
    from runtime.inn.tracer import Labels, Tracer

SAME_LAYOUT_FUNCTIONS = (
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.leaky_relu, F.elu, F.hardswish, F.hardsigmoid, F.mish, F.dropout, torch.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.softplus, F.hardtanh, torch.neg,
    torch.abs, torch.exp, torch.sqrt, torch.rsqrt, torch.erf, operator.neg,
    # Each channel on its own as well (review 154: refused, "no rule"):
    torch.square, torch.log, torch.log1p, torch.log2, torch.sin, torch.cos,
    torch.sign, torch.reciprocal, torch.nan_to_num, F.selu, torch.selu, F.celu,
    torch.celu, F.logsigmoid, F.softsign, F.tanhshrink, F.hardshrink, F.softshrink,
)  # fmt: skip
# Pools, by the number of trailing dims their window slides over (1d: the last, 2d: the
# last two, ...); the dims before them (batch, channels) are kept.
POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
    F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}  # fmt: skip
SAME_LAYOUT_METHODS = (
    "relu", "sigmoid", "tanh", "contiguous", "clone", "float", "half", "to", "neg", "abs",
    "exp", "detach", "type_as", "sqrt", "rsqrt", "erf", "relu_", "sigmoid_", "square", "log",
    "log1p", "log2", "sin", "cos", "sign", "reciprocal", "nan_to_num",
)  # fmt: skip
_KEEPS_SOURCES = {"contiguous", "clone", "float", "half", "to", "detach", "type_as"}
BINARY_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    operator.pow, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
    torch.pow,
    # Bounds, comparisons and selections: scalars or tensors broadcast against x
    # (``x.clamp(0, 6)``, ``torch.where(x > 0, x, 0.1 * x)``).
    torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, torch.gt, torch.lt,
    torch.ge, torch.le, torch.eq, torch.ne, operator.gt, operator.lt, operator.ge, operator.le,
    operator.eq, operator.ne,
)  # fmt: skip
BINARY_METHODS = (
    "add", "sub", "mul", "div", "add_", "mul_", "maximum", "minimum", "pow", "clamp", "clip",
    "clamp_min", "clamp_max", "gt", "lt", "ge", "le", "eq", "ne",
)  # fmt: skip


@register(functions=SAME_LAYOUT_FUNCTIONS, methods=SAME_LAYOUT_METHODS)
def same_layout(tr: Tracer, node: fx.Node) -> None:
    tr.copy(node, node.args[0], sources=node.target in _KEEPS_SOURCES)


def slid_over(tr: Tracer, node: fx.Node, x: fx.Node, spatial: int, what: str) -> Labels:
    """The labels of ``x``'s dims that a window sliding over its last ``spatial`` dims (a
    pool, a conv's kernel) keeps: the leading ones (batch, channels). A window mixes
    neighbouring entries of the dims it slides over (and pooling or a stride changes their
    size), so channels there - a pool over features, ECA's conv along the channels - are
    fixed. The output's dims there are sized by those fixed channels: each gets a group of
    its own that must end discrete too, so that tying it to elastic channels later (ECA's
    ``x * attention``) refuses ``node`` - unlabelled, it was a fresh discrete group, and the
    tie silently froze the model's channels (review helper-284)."""
    first = len(tr.shape(x)) - spatial
    labels = tr.labels.get(x, {})
    kept, out = {}, tr.shape(node)
    for d, lay in labels.items():
        if d < first:
            kept[d] = lay
            continue
        why = f"{what} slides a window over dim {d}, which holds channels"
        tr.fixed(node, why, [lay])
        # (only where channels that may follow the width are slid over: a spatial dim's
        # discrete labels stay the output's none, as padding reads any label as channels -
        # timm's tf_mixnet_s was refused)
        if d < len(out) and out[d] > 1 and any(tr.uf.continuous(s.group) for s in lay):
            made = (Segment(tr.uf.new(out[d], f"{node.name}:{d}", anchored=False)),)
            tr.fixed(node, why, [made])
            kept[d] = made
    return kept


@register(methods=("new_zeros", "new_ones", "new_full", "new_empty"))
def new_tensor(tr: Tracer, node: fx.Node) -> None:
    """``x.new_zeros(sizes)`` (Swin's shifted-window mask): x lends its dtype and device
    only, so its channels are not read; the new tensor's dims are the sizes given - fixed
    where they meet channels (a literal size would not follow the width): refused there,
    not silently frozen as a dim no rule labelled is (review helper-284)."""
    tr.opaque(node, f"x.{node.target}(sizes) makes a tensor of the sizes given")


@register(functions=(torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like))
def like(tr: Tracer, node: fx.Node) -> None:
    """``torch.zeros_like(x)``: x's shape, so x's layouts (its values are not read)."""
    tr.copy(node, node.args[0], sources=False)


@register(functions=(F.pad,))
def pad(tr: Tracer, node: fx.Node) -> None:
    """``F.pad(x, pad)`` pads x's last ``len(pad) // 2`` dims (TF "same" padding before a
    conv: timm's Conv2dSame, tf_ models). The dims before keep their layouts; one padded by
    0 on both sides is kept as it is.

    A channel dim padded with a constant (the CIFAR ResNets' "option A" shortcut,
    ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))``, was refused) is
    a concatenation of three parts: a new continuous group of ``left`` constant channels,
    x's channels, a new group of ``right`` constant ones. Every channel of a new group holds
    the same value, so permuting and resampling it change nothing, and the amounts follow
    the sampled groups (size fields). Any other pad of a channel dim (reflect, replicate,
    circular, a computed or negative amount) would gain entries no group holds: fixed."""
    where = "1" if len(node.args) > 1 else "pad"
    padded(tr, node, arg(node, 1, "pad"), _constant_pad(node), node_key(node.name), where)


# The nn pads (ZeroPadNd subclasses ConstantPadNd): a module of them was refused, "no
# rule" - pix2pix / CycleGAN generators' ReflectionPad2d - unless captured by torch.export
# (review helper-239).
_CONSTANT_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_OTHER_PADS = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
               nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d,
               nn.CircularPad3d)  # fmt: skip


@register(modules=_CONSTANT_PADS + _OTHER_PADS)
def pad_module(tr: Tracer, node: fx.Node) -> None:
    """``nn.ZeroPad2d(...)(x)`` and the other nn pads: as ``F.pad`` with their padding."""
    mod = tr.modules[node.target]
    constant = isinstance(mod, _CONSTANT_PADS)
    padded(tr, node, list(mod.padding), constant, str(node.target), "padding")


def padded(tr: Tracer, node: fx.Node, amounts, constant: bool, key: str, where: str) -> None:
    """Label the pad ``node`` of its first argument by ``amounts`` (F.pad's order: the last
    dim first), a ``constant`` pad or not; size fields under ``key`` at argument ``where``.
    The new groups of a padded channel dim are discrete where x's channels there all are
    (``discrete=[...]`` on the layer before: padded, they were refused; review helper-239)."""
    x = node.args[0]
    rank = len(tr.shape(x))
    labels: Labels = {}
    fields = []
    for d, lay in tr.labels.get(x, {}).items():
        k = rank - 1 - d  # F.pad lists the last dim first: (left, right, top, bottom, ...)
        sides = list(amounts[2 * k : 2 * k + 2]) if 2 * k < len(amounts) else [0, 0]
        if all(type(p) is int and p == 0 for p in sides):
            labels[d] = lay
        elif constant and all(type(p) is int and p >= 0 for p in sides):
            discrete = all(tr.uf.discrete[tr.uf.find(s.group)] for s in lay)
            left, right = (
                (Segment(tr.uf.new(p, f"{node.name}:{side}", discrete=discrete)),) if p else ()
                for p, side in zip(sides, ("before", "after"), strict=True)
            )
            labels[d] = left + lay + right
            fields += [SizeField(where, part, 2 * k + i) for i, part in enumerate((left, right))
                       if part]  # fmt: skip
        else:
            tr.fixed(node, f"pad of dim {d}, which holds channels", [lay])
    if fields:
        tr.size_fields[key] = fields
    tr.labels[node] = labels


def _constant_pad(node: fx.Node) -> bool:
    """Whether ``F.pad`` call ``node`` pads with a literal constant (the default mode)."""
    mode, value = arg(node, 2, "mode", "constant"), arg(node, 3, "value", None)
    return mode == "constant" and (value is None or type(value) in (int, float, bool))


def pool(tr: Tracer, node: fx.Node, x: fx.Node, spatial: int) -> None:
    """A pool over ``x``'s last ``spatial`` dims (``slid_over``); with ``return_indices``
    the result is a (values, indices) pair of one layout."""
    kept = slid_over(tr, node, x, spatial, "pooling")
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):  # not one TensorMetadata
        tr.items[node] = [dict(kept) for _ in meta]
    else:
        tr.labels[node] = kept


@register(functions=tuple(POOL_FUNCTIONS))
def pool_function(tr: Tracer, node: fx.Node) -> None:
    pool(tr, node, node.args[0], POOL_FUNCTIONS[node.target])


@register(functions=(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax),
          methods=("softmax", "log_softmax"))  # fmt: skip
def softmax(tr: Tracer, node: fx.Node) -> None:
    """Elementwise but for its normaliser, a sum over ``dim``: over continuous channels that
    sum grows with the width (every output scaled by m / n), so that dim is fixed. Over any
    other dim (attention's keys, a classifier's classes) it keeps every layout."""
    x = node.args[0]
    softmax_dim(tr, node, x, arg(node, 1, "dim", None))


def softmax_dim(tr: Tracer, node: fx.Node, x: fx.Node, dim: int | None) -> None:
    """The softmax rule for input ``x`` and ``dim`` (None: torch's legacy implicit dim)."""
    rank = len(tr.shape(x))
    if dim is None:  # torch.nn.functional._get_softmax_dim
        dim = 0 if rank in (0, 1, 3) else 1
    lay = tr.labels.get(x, {}).get(dim % rank) if rank else None
    if lay is not None:
        tr.fixed(node, "softmax over a channel dim (its normaliser sums the channels)", [lay])
    tr.copy(node, x, sources=False)


@register(functions=(F.interpolate,))
def interpolate(tr: Tracer, node: fx.Node) -> None:
    """Resizes the dims after batch and channels (``slid_over``): the channels are kept."""
    x = node.args[0]
    tr.labels[node] = slid_over(tr, node, x, len(tr.shape(x)) - 2, "interpolation")


@register(functions=(F.normalize,))
def normalize(tr: Tracer, node: fx.Node) -> None:
    """x / ||x|| along ``dim`` (default 1): over continuous channels the norm grows with the
    width (every output scaled by about sqrt(n / m)), so that dim is fixed, as softmax's.
    Over any other dim (an embedder's output features) every layout is kept."""
    x = node.args[0]
    rank = len(tr.shape(x))
    dim = arg(node, 2, "dim", 1)
    lay = tr.labels.get(x, {}).get(dim % rank) if rank else None
    if lay is not None:
        tr.fixed(node, "normalize over a channel dim (its norm sums the channels)", [lay])
    tr.copy(node, x, sources=False)


@register(when=lambda node: identity_input(node) is not None)
def inference_identity(tr: Tracer, node: fx.Node) -> None:
    """Stochastic depth / drop path in eval mode: the input itself."""
    tr.copy(node, identity_input(node))


@register(functions=BINARY_FUNCTIONS, methods=BINARY_METHODS)
def broadcast(tr: Tracer, node: fx.Node) -> None:
    """Every operand dim that is not broadcast (same size as the output's, > 1) is tied to
    the output dim - including dims nothing labelled yet, which are fixed sizes."""
    if into_a_view(node):  # y[:, 0:8].add_(s): the ONNX export loses the write into y
        refuse_in_place(tr, node)
        return
    out_shape = tr.shape(node)
    rank = len(out_shape)
    labels: Labels = {}
    for a in [*node.args, *node.kwargs.values()]:
        shape = tr.shape(a)
        if not shape:
            continue
        offset = rank - len(shape)
        for dim, size in enumerate(shape):
            od = dim + offset
            if size == 1 or size != out_shape[od]:
                continue  # a broadcast size-1 dim ties nothing
            lay = tr.layout_of(a, dim)
            where = f"node {node.name!r}"
            labels[od] = tr.unify(labels[od], lay, where) if od in labels else lay
    tr.labels[node] = labels


@register(functions=(torch.where,), methods=("where",))
def select(tr: Tracer, node: fx.Node) -> None:
    """``torch.where(cond, a, b)`` (``a.where(cond, b)``): three operands, broadcast. Its
    one-argument form, ``torch.where(cond)``, returns indices: no rule, as before it had
    one (it crashed the broadcast rule, ``discrete=[...]`` no way out: review 155).
    (Not expm1 among the per-channel ops: no ONNX export at opset 17.)"""
    if len(node.args) + len(node.kwargs) == 3:
        broadcast(tr, node)
        return
    what = "innfer has no rule for where(condition), which returns indices"
    tr.fixed_inputs(node, what)
    tr.opaque(node, what)


@register(functions=(torch.cat, torch.concat))
def concat(tr: Tracer, node: fx.Node) -> None:
    """Each part keeps its own sub-interval of the concatenated dim; the other dims of every
    part are tied. The parts are a list of tensors or one tuple-valued node
    (``torch.cat(x.chunk(3, 1), 1)``), whose elements the split rule labelled."""
    rank = len(tr.shape(node))
    dim = arg(node, 1, "dim", 0) % rank
    layout = ()
    labels: Labels = {}
    for part_labels, shape in _labelled_parts(tr, node, arg(node, 0, "tensors"), dim):
        layout += part_labels[dim]
        for d, size in enumerate(shape):
            if d != dim and size > 1:
                lay = part_labels[d]
                labels[d] = tr.unify(labels[d], lay, f"node {node.name!r}") if d in labels else lay
    labels[dim] = layout
    tr.labels[node] = labels


def _labelled_parts(tr: Tracer, node: fx.Node, parts, dim: int):
    """(labels, shape) of each part, every dim that matters labelled: the concatenated one,
    and each of size > 1 (a dim nothing labelled becomes a fresh discrete group, kept on the
    part so that its other uses see the same group)."""
    if isinstance(parts, fx.Node) and parts in tr.items:
        shapes = [tuple(m.shape) for m in parts.meta["tensor_meta"]]
        pairs = list(zip(tr.items[parts], shapes, strict=True))
        for i, (item, shape) in enumerate(pairs):
            for d, size in enumerate(shape):
                if (d == dim or size > 1) and d not in item:
                    item[d] = tr.fresh_layout(size, f"{parts.name}[{i}]:{d}")
        return pairs
    if isinstance(parts, fx.Node):
        raise ConversionError(
            f"node {node.name!r}: torch.cat of {parts.name!r}, which is neither a list of "
            f"tensors nor a split/chunk/unbind; pass the tensors as a list"
        )
    for part in parts:
        for d, size in enumerate(tr.shape(part)):
            if d == dim or size > 1:
                tr.layout_of(part, d)
    return [(tr.labels[part], tr.shape(part)) for part in parts]


_REDUCTIONS = {torch.mean: "mean", torch.amax: "amax", torch.amin: "amin", torch.sum: "sum",
               torch.var: "var", torch.std: "std", torch.max: "max", torch.min: "min"}  # fmt: skip


@register(functions=(torch.max, torch.min), methods=("max", "min"))
def max_min(tr: Tracer, node: fx.Node) -> None:
    """``torch.max`` / ``min`` in their three forms (a text CNN's global max over time,
    ``h.max(dim=2).values``, had no rule: review helper-230): of two tensors, elementwise,
    as ``maximum``; of every element, a reduction, as ``amax``; over one dim, the pair
    (values, indices) - values as ``amax`` over it, indices the positions along it, which
    over a channel dim change with the width: used there, that dim is fixed."""
    other = arg(node, 1, "other", None)
    if isinstance(other, fx.Node) and tr.shape(other):
        broadcast(tr, node)
        return
    dim = arg(node, 1, "dim", None)
    reduction(tr, node)
    if dim is None:  # every element: one tensor, labelled by ``reduction``
        return
    values = tr.labels.pop(node, {})
    tr.items[node] = [values, dict(values)]
    rank = len(tr.shape(node.args[0]))
    lay = tr.labels.get(node.args[0], {}).get(dim % rank)
    if lay is not None and _indices_used(node):
        kind = node.target if isinstance(node.target, str) else node.target.__name__
        tr.fixed(node, f"the indices of a {kind} over a channel dim (channel positions, "
                 "which change with the width)", [lay])  # fmt: skip


# Ops along one dim: the default dim (-1 where torch has one; cumsum needs it given).
# (Not cumprod: no ONNX op at opset 17, so no tier of it would build - review helper-239.)
_ALONG = {torch.topk: -1, torch.sort: -1, torch.argsort: -1, torch.cumsum: None,
          torch.argmax: None, torch.argmin: None}  # fmt: skip
_ALONG_METHODS = ("topk", "sort", "argsort", "cumsum", "argmax", "argmin")
# Where each takes its dim: (position after the input, keyword).
_DIM_AT = {"topk": 2, "sort": 1, "argsort": 1, "cumsum": 1, "argmax": 1, "argmin": 1}


@register(functions=tuple(_ALONG), methods=_ALONG_METHODS)
def along(tr: Tracer, node: fx.Node) -> None:
    """``topk``, ``sort`` / ``argsort``, ``cumsum`` / ``cumprod``, ``argmax`` / ``argmin``
    along one dim (token pruning's ``scores.topk(k, dim=1)`` over the tokens, a running sum
    over time: refused, "no rule", though no channel moved). Every other dim keeps its
    layout. Along a channel dim the result depends on which channels there are - an order,
    a position, a sum growing with the width - so that dim is fixed. topk's dim becomes k
    entries and argmax's is reduced (every dim when none is given: a flat index)."""
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("sort", "argsort") and node.kwargs.get("stable"):
        # (exporting it fails - "Sort, Out parameter is not supported" - so no tier would
        # build; torch.export's graph has it as sort.stable, which has no rule either)
        raise ConversionError(f"node {node.name!r}: {name}(stable=True) does not export to "
                              "ONNX; drop stable=True (ties then come in any order)")  # fmt: skip
    x = node.args[0]
    rank = len(tr.shape(x))
    default = _ALONG.get(getattr(torch, name, None))
    dim = arg(node, _DIM_AT[name], "dim", default)
    labels = tr.labels.get(x, {})
    if dim is None:  # argmax / argmin of every element: one flat index
        tr.fixed(node, f"{name} of every element (a flat index over channels)", labels.values())
        tr.labels[node] = {}
        return
    dim %= rank
    kept = {d: lay for d, lay in labels.items() if d != dim}
    reduced = name in ("argmax", "argmin") and not arg(node, 2, "keepdim", False)
    if dim in labels:
        what = "a sum over channels" if name.startswith("cum") else "channel positions"
        what = f"{name} along channel dim {dim} ({what}, which change with the width)"
        tr.fixed(node, what, [labels[dim]])
        # The result's dim keeps x's group (the same count: sort, cumsum) or a fixed one
        # of its own (topk's k): tied to channels later - a raw parameter's dim before its
        # layer - it refuses the node instead of fixing those channels silently.
        if name == "topk":
            k = tuple(node.meta["tensor_meta"][0].shape)[dim]  # (values, indices)
            if k > 1:
                kept[dim] = (Segment(tr.uf.new(k, f"{node.name}:{dim}", anchored=False)),)
                tr.fixed(node, what, [kept[dim]])
        elif not reduced:  # (a reduced dim is gone: its layout was the next dim's, helper-239)
            kept[dim] = labels[dim]
    if reduced:
        kept = {d - (d > dim): lay for d, lay in kept.items()}
    if name in ("topk", "sort"):  # (values, indices), one layout
        tr.items[node] = [kept, dict(kept)]
    else:
        tr.labels[node] = kept


@register(functions=(torch.gather,), methods=("gather",))
def gather(tr: Tracer, node: fx.Node) -> None:
    """``torch.gather(x, dim, index)``: out[..., j, ...] = x[..., index[..., j, ...], ...]
    along ``dim`` (token pruning keeps its top-k tokens with ``t.gather(1,
    idx[..., None].expand(-1, -1, t.shape[-1]))``: refused, "no rule"). Along a channel dim
    the positions change with the width: fixed. Every other dim of the result is x's (the
    index's too, where it has one), where the index spans all of it - an index broadcast
    along the channels, its size read from x; one of a literal size is refused by the run
    at half width - and no channels where it spans part of it."""
    x, dim, index = node.args[0], arg(node, 1, "dim"), arg(node, 2, "index")
    rank = len(tr.shape(x))
    dim %= rank
    xl = tr.labels.get(x, {})
    il = tr.labels.get(index, {}) if isinstance(index, fx.Node) else {}
    what = f"gather along channel dim {dim} (channel positions, which change with the width)"
    tr.fixed(node, what, [lay for lay in (xl.get(dim), il.get(dim)) if lay is not None])
    out: Labels = {}
    for d in set(xl) | set(il):
        if d == dim:
            continue
        a, b = xl.get(d), il.get(d)
        if a is not None and tr.shape(index)[d] == tr.shape(x)[d]:
            out[d] = a if b is None else tr.unify(a, b, f"node {node.name!r}")
        else:  # part of x's channels there, or channels in the index alone
            tr.fixed(node, f"gather whose index spans part of dim {d}, which holds channels",
                     [lay for lay in (a, b) if lay is not None])  # fmt: skip
    tr.labels[node] = out


def _indices_used(node: fx.Node) -> bool:
    """Whether the (values, indices) pair ``node`` returns has its indices read."""
    for user in node.users:
        if user.op != "call_function":
            return True  # passed on whole: either may be read
        if user.target is operator.getitem and user.args[1] in (0, "values"):
            continue
        if user.target is getattr and user.args[1] == "values":
            continue
        return True
    return False


@register(functions=tuple(f for f in _REDUCTIONS if f not in (torch.max, torch.min)),
          methods=("mean", "amax", "amin", "sum", "var", "std"))  # fmt: skip
def reduction(tr: Tracer, node: fx.Node) -> None:
    """A mean (amax, a population var, ...) over channels does not depend on how many there
    are; a sum does, and so does a var or std with Bessel's correction (``var(x, 1)``, the
    default: n / (n - 1), +33 % at 4 channels), so those over a channel dim are fixed."""
    x = node.args[0]
    kind = _REDUCTIONS.get(node.target, node.target)
    rank = len(tr.shape(x))
    dims = arg(node, 1, "dim", None)
    corrected = False
    if kind in ("var", "std"):
        # (dim, unbiased, keepdim), correction= a keyword; var(x, False) is var(x, unbiased)
        unbiased = dims if isinstance(dims, bool) else arg(node, 2, "unbiased", True)
        dims = None if isinstance(dims, bool) else dims
        keepdim = arg(node, 3, "keepdim", False)
        correction = node.kwargs.get("correction", 1 if unbiased else 0)
        corrected = correction is None or correction != 0
    else:
        keepdim = arg(node, 2, "keepdim", False)
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):  # every dim
        dims = tuple(range(rank))
    dims = {d % rank for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    labels: Labels = {}
    for dim, lay in tr.labels.get(x, {}).items():
        if dim in dims:
            if kind in ("amax", "amin", "max", "min"):  # a pick among the channels: kept
                tr.picked.extend(s.group for s in lay)  # whole where no layer reads them
            if kind == "sum":
                tr.fixed(node, "sum over a channel dim (use mean)", [lay])
            elif corrected:
                tr.fixed(node, f"{kind} with Bessel's correction over a channel dim (its n / "
                         f"(n - 1) changes with the width: use unbiased=False)", [lay])  # fmt: skip
            elif kind in ("mean", "var", "std"):
                tr.averaged(node, kind, lay)
            continue
        labels[dim if keepdim else dim - sum(d < dim for d in dims)] = lay
    tr.labels[node] = labels
