"""Rules for indexing (``x[:, 0]``, ``x[..., None]``) and splitting (split/chunk/unbind, and
GLU, which splits its input in two halves and gates one by the other).

Indexing keeps a dim it takes whole (``:``) and drops one it indexes with an int; an int or
a partial slice on a channel dim picks channels by position, which resampling would change,
so that dim is fixed. One integer tensor index (a gather: Swin's and MaxViT's
``bias_table[position_index]``, (positions, heads) -> (N * N, heads)) replaces its dim by the
index's dims and keeps the others, so the table's heads follow the heads it is added to.
Splitting a channel dim into equal parts that are copies of one group
(q/k/v, GLU's halves) refines that group; a split into listed sizes (MixNet's unequal parts)
cuts its groups at the parts' boundaries, each part then its own groups; any other split of
a channel dim is fixed. The other dims of every piece keep their layouts.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from runtime.inn.layout import Layout, Segment, SizeField, node_key
from runtime.inn.rules import register
from runtime.inn.rules._args import arg
from runtime.inn.tracer import segment_entries

if TYPE_CHECKING:
    from runtime.inn.tracer import Labels, Tracer


@register(functions=(operator.getitem,))
def getitem(tr: Tracer, node: fx.Node) -> None:
    x, index = node.args[0], node.args[1]
    if x in tr.items:  # an element of split/chunk/unbind
        if isinstance(index, int):
            tr.labels[node] = dict(tr.items[x][index])
        else:
            tr.fixed_inputs(node, "a slice of a tuple of tensors")
        return
    if not tr.shape(x):
        if tr.shape(node):  # an element of what an op without a rule returned
            tr.opaque(node, "an element of the result of an op without a rule")
        return  # x.shape[0] and the like: not a tensor
    tupled = isinstance(index, tuple)
    index = index if tupled else (index,)
    rank = len(tr.shape(x))
    labels, sources = tr.labels.get(x, {}), tr.sources.get(x, {})
    consumed = sum(1 for e in index if e is not None and e is not Ellipsis)
    entries = []  # (index entry, its position in the index as written)
    for pos, e in enumerate(index):
        entries.extend([(slice(None), pos)] * (rank - consumed) if e is Ellipsis else [(e, pos)])
    out: Labels = {}
    out_src = {}
    d_in = d_out = 0
    shape = tr.shape(x)
    for e, pos in entries:
        if e is None:
            d_out += 1
        elif isinstance(e, slice) and d_in in labels and not _whole(e, shape[d_in]):
            part = _sliced_channels(tr, node, x, d_in, e, pos if tupled else None)
            if part is None:
                tr.fixed(node, f"indexes channel dim {d_in} with {e!r}", [labels[d_in]])
            else:
                out[d_out] = part
            d_in, d_out = d_in + 1, d_out + 1
        elif isinstance(e, int) or (isinstance(e, slice) and not _whole(e, shape[d_in])):
            if d_in in labels:
                tr.fixed(node, f"indexes channel dim {d_in} with {e!r}", [labels[d_in]])
            d_in += 1
            d_out += isinstance(e, slice)
        elif isinstance(e, slice):
            if d_in in labels:
                out[d_out] = labels[d_in]
            if d_in in sources:
                out_src[d_out] = sources[d_in]
            d_in, d_out = d_in + 1, d_out + 1
        elif _gather_index(tr, e, index):
            if d_in in labels:
                tr.fixed(node, f"gathers along channel dim {d_in}", [labels[d_in]])
            picked = tr.labels.get(e, {}) if isinstance(e, fx.Node) else {}
            out.update({d_out + k: lay for k, lay in picked.items()})
            d_in, d_out = d_in + 1, d_out + len(_index_shape(tr, e))
        else:  # a boolean mask, or several tensor / list indices
            tr.fixed_inputs(node, "advanced indexing with a mask or several tensors or lists")
            return
    for k in range(d_in, rank):  # dims after the index are untouched
        if k in labels:
            out[d_out + k - d_in] = labels[k]
        if k in sources:
            out_src[d_out + k - d_in] = sources[k]
    tr.labels[node] = {d: tr.expand(lay) for d, lay in out.items()}  # a cut since read
    tr.sources[node] = out_src


@register(functions=(torch.select,), methods=("select",))
def select(tr: Tracer, node: fx.Node) -> None:
    """``x.select(dim, i)`` is ``x[:, ..., i]`` with ``dim`` slices before the int: the
    getitem rule's int index (the dim dropped, fixed if it holds channels). What the export
    front end makes of ``qkv[0]`` (Swin's q, k, v)."""
    x = node.args[0]
    dim, i = arg(node, 1, "dim"), arg(node, 2, "index")
    rank = len(tr.shape(x))
    if not isinstance(dim, int) or not isinstance(i, int) or not rank:
        tr.fixed_inputs(node, "select with a computed dim or index")
        tr.opaque(node, "select with a computed dim or index")
        return
    d = dim % rank
    labels, sources = tr.labels.get(x, {}), tr.sources.get(x, {})
    if d in labels:
        tr.fixed(node, f"selects one entry of channel dim {d}", [labels[d]])
    tr.labels[node] = {k - (k > d): lay for k, lay in labels.items() if k != d}
    tr.sources[node] = {k - (k > d): src for k, src in sources.items() if k != d}


def _gather_index(tr: Tracer, e: object, index: tuple) -> bool:
    """Whether ``e`` is the one integer tensor (or list of ints) in ``index``: the gather
    whose result puts the index's dims where ``e``'s dim was (several would broadcast
    together and may move to the front; a boolean mask has a data-dependent length)."""
    tensors = [i for i in index if isinstance(i, (fx.Node, list))]
    if tensors != [e]:
        return False
    if isinstance(e, list):
        return all(isinstance(i, int) and not isinstance(i, bool) for i in e)
    meta = e.meta.get("tensor_meta")
    dtype = getattr(meta, "dtype", None)
    return dtype is not None and not dtype.is_floating_point and dtype != torch.bool


def _index_shape(tr: Tracer, e: object) -> tuple[int, ...]:
    return (len(e),) if isinstance(e, list) else tr.shape(e)


def _sliced_channels(tr: Tracer, node: fx.Node, x: fx.Node, dim: int, e: slice, pos):
    """The layout of ``x[..., a:b]`` over channels (ReXNet's ``x[:, 0:C] + shortcut`` and
    ``x[:, C:]``, cat again): ``x``'s dim is cut at ``a`` and ``b`` (``Tracer.cut``), so the
    slice takes whole groups; its literal bounds become size fields (``slot``), the sampled
    count of the groups before each bound. None (the dim is fixed) for a step, a bound that
    is not a literal int, or a cut that cannot be made (inside a conv/norm block)."""
    size = tr.shape(x)[dim]
    literal = all(b is None or type(b) is int for b in (e.start, e.stop))
    if e.step not in (None, 1) or not literal:
        return None
    start, stop, _ = e.indices(size)
    if start >= stop:
        return None
    lay = tr.cut(tr.labels[x][dim], [start, stop])
    if lay is None:
        return None
    before, part, _ = _pieces(tr, lay, [start, stop])
    fields = tr.size_fields.setdefault(node_key(node.name), [])
    if start > 0:
        fields.append(SizeField("1", before, pos, slot=0))
    if stop < size:
        fields.append(SizeField("1", before + part, pos, slot=1))
    return part


def _pieces(tr: Tracer, lay: Layout, bounds: list[int]) -> list[Layout]:
    """``lay``'s segments in the ``len(bounds) + 1`` pieces between entry offsets
    ``bounds`` (ascending), for a layout ``Tracer.cut`` has cut there: every bound falls
    between two segments."""
    pieces: list[Layout] = [() for _ in range(len(bounds) + 1)]
    start = 0
    for s in lay:
        pieces[sum(start >= b for b in bounds)] += (s,)
        start += segment_entries(tr.uf, s)
    return pieces


def _whole(e: slice, size: int) -> bool:
    """Whether slice ``e`` keeps every entry of a dim of ``size``, and so of any narrower
    one: ``[:]``, ``[0:]``, or ``[:n]`` with a literal ``n >= size`` (GhostNet's
    ``cat([primary, cheap])[:, :out_chs]`` where the two make exactly ``out_chs``).

    Example:
        >>> _whole(slice(None, 16), 16), _whole(slice(0, None, 1), 8), _whole(slice(None, 15), 16)
        (True, True, False)
    """
    start_ok = e.start in (None, 0)
    step_ok = e.step in (None, 1)
    stop_ok = e.stop is None or (type(e.stop) is int and e.stop >= size)
    return start_ok and step_ok and stop_ok


@register(functions=(torch.split, torch.chunk, torch.unbind),
          methods=("split", "chunk", "unbind"))  # fmt: skip
def split(tr: Tracer, node: fx.Node) -> None:
    x = node.args[0]
    rank = len(tr.shape(x))
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dim = arg(node, 1, "dim", 0) if name == "unbind" else arg(node, 2, "dim", 0)
    dim %= rank
    labels = tr.labels.get(x, {})
    meta = node.meta.get("tensor_meta")
    count = len(meta) if isinstance(meta, (tuple, list)) else 0
    parts = _equal_parts(tr, node, name, labels.get(dim), count) if dim in labels else None
    sections = _sections(tr, node, labels, dim, count) if dim in labels and parts is None else None
    if dim in labels and parts is None and sections is None:
        tr.fixed(node, f"{name} along channel dim {dim} (parts that are not whole copies of "
                       f"one group, nor sizes that follow groups)", [labels[dim]])  # fmt: skip
    keep = {d: lay for d, lay in tr.labels.get(x, {}).items() if d != dim}
    if name == "unbind":
        keep = {d - (d > dim): lay for d, lay in keep.items()}
    tr.items[node] = [dict(keep) for _ in range(count)]
    for i, item in enumerate(tr.items[node]):
        if parts is not None:
            item[dim] = parts
        elif sections is not None:
            item[dim] = sections[i]


def _equal_parts(tr: Tracer, node: fx.Node, name: str, lay, count: int):
    """The layout of each part when ``lay`` splits into ``count`` equal parts that are copies
    of one group (q/k/v from one projection, GPT-2's ``c_attn(x).split(E, dim=2)``): the
    group is refined into ``count`` copies (``Tracer.refine``), so each part is resampled
    alike. A literal split size becomes a size field of the node. None when the parts are
    unequal or straddle groups differently."""
    if name == "unbind" or count < 2:
        return None
    field, size = _size_arg(node, name)
    if isinstance(size, (list, tuple)) and len(set(size)) != 1:
        return None
    # Whole equal parts only: split(5) of 12 channels is 5, 5, 2 and chunk(12, 5) is four
    # parts of 3 - neither divides the group into as many copies at another width. Only
    # split(size) with size x count == channels, and chunk(count), are equal everywhere.
    total = tr.shape(node.args[0])[arg(node, 2, "dim", 0) % len(tr.shape(node.args[0]))]
    if name == "split" and isinstance(size, int) and size * count != total:
        return None
    if name == "chunk" and size != count:
        return None
    part = copies(tr, lay, count)
    if part is None:
        return None
    if name == "split":
        index = None if isinstance(size, int) else list(range(count))
        fields = [SizeField(field, part, i) for i in index] if index else [SizeField(field, part)]
        tr.size_fields[node_key(node.name)] = fields
    return part


def _sections(tr: Tracer, node: fx.Node, labels, dim: int, count: int) -> list | None:
    """The layout of each part of ``split(x, [a, b, c], dim)`` over channels (MixNet's mixed
    convs: each part through its own conv, then ``cat``): x's dim is cut at the parts'
    boundaries (``Tracer.cut``), each part its own groups, resampled independently; the
    literal sizes become size fields, so the sampled split follows the parts' counts. None
    for an int split size (its parts are equal, or a remainder no width keeps) or a cut
    that cannot be made."""
    field, size = _size_arg(node, "split")
    if not isinstance(size, (list, tuple)) or len(size) != count or count < 2:
        return None
    if not all(isinstance(n, int) for n in size):
        return None
    bounds = [sum(size[:i]) for i in range(1, count)]
    lay = tr.cut(labels[dim], bounds)
    if lay is None:
        return None
    parts = _pieces(tr, lay, bounds)
    if any(not p for p in parts):
        return None  # an empty part (size 0)
    tr.size_fields[node_key(node.name)] = [SizeField(field, p, i) for i, p in enumerate(parts)]
    return parts


def _size_arg(node: fx.Node, name: str) -> tuple[str, object]:
    """A split's sizes or a chunk's count, and the field that holds it: positional ("1"), or
    the keyword the call used - ``torch.split``'s ``split_size_or_sections``, the method
    ``Tensor.split``'s ``split_size``, ``chunks``. ("1", None) when the call gives none
    (keyword ``split_size`` was read as "no size" and its field written as "1": an
    IndexError at sampling)."""
    if len(node.args) > 1:
        return "1", node.args[1]
    keys = ("chunks",) if name == "chunk" else ("split_size_or_sections", "split_size")
    for key in keys:
        if key in node.kwargs:
            return key, node.kwargs[key]
    return "1", None


def copies(tr: Tracer, lay: Layout, count: int) -> Layout | None:
    """The layout of each of ``count`` equal parts of a dim of layout ``lay``, made copies
    of one group so that every part is resampled alike: plain channels are refined into
    ``count`` copies (``Tracer.refine``); a dim already made of ``count`` copies (q/k/v)
    keeps them. None for any other layout."""
    uf = tr.uf
    # Only plain channels (inner 1): an interleaved layout (after a channel shuffle) would
    # split cleanly here but cannot be regrouped by the next shuffle - refuse it here, where
    # the message names the op a user can change.
    plain = len(lay) == 1 and lay[0].inner == 1 and not lay[0].per_block
    if plain and uf.blocks[uf.find(lay[0].group)] == 1:
        if uf.size[uf.find(lay[0].group)] % count:
            return None
        h = tr.refine(lay[0].group, count, 1)
        return (Segment(h, lay[0].inner),)
    if len(lay) == count and len(set(lay)) == 1:  # already refined (qkv)
        return (lay[0],)
    return None


@register(functions=(F.glu,), modules=(nn.GLU,))
def glu(tr: Tracer, node: fx.Node) -> None:
    """``F.glu(x, dim)`` / ``nn.GLU(dim)``: x's ``dim`` splits into halves a, b and the
    output is ``a * sigmoid(b)``, channel i of a gated by channel i of b. Over channels, the
    two halves are made copies of one group (``copies``, as ``chunk(2)``) so both are
    resampled alike and stay paired; the output's dim is one copy. Halves that cannot be
    copies (a concat, a flatten, a grouped conv's blocks) fix the dim; over a dim of no
    channels (a GLU over time) every layout is kept."""
    x = node.args[0]
    module = node.op == "call_module"
    dim = tr.modules[node.target].dim if module else arg(node, 1, "dim", -1)
    dim %= len(tr.shape(x))
    labels = tr.labels.get(x, {})
    out = {d: lay for d, lay in labels.items() if d != dim}
    if dim in labels:
        half = copies(tr, labels[dim], 2)
        if half is None:
            tr.fixed(node, f"glu along channel dim {dim} (halves that cannot be copies of "
                           "one group)", [labels[dim]])  # fmt: skip
        else:
            out[dim] = half
    tr.labels[node] = out


def _writes_in_place(node: fx.Node) -> bool:
    """An ATen op that mutates an input (torch.export's ``add_``, ``copy_``)."""
    schema = getattr(node.target, "_schema", None)
    return isinstance(node.target, torch._ops.OpOverload) and bool(schema and schema.is_mutable)


@register(when=_writes_in_place)
def in_place_write(tr: Tracer, node: fx.Node) -> None:
    """torch.export keeps an in-place write into a view (``x[:, 0:C] += y``: ``slice``,
    ``add_``, ``copy_`` back into ``x``): the write reaches ``x`` through the alias, which
    the group analysis does not follow. Fixed, with the way out in the message."""
    refuse_in_place(tr, node)


def refuse_in_place(tr: Tracer, node: fx.Node) -> None:
    """Fix every input of ``node``, a write in place into a view, and say how to avoid it."""
    what = (f"{_target(node)} writes in place into its input, a view of another tensor "
            "(`x[:, :C] += y`) or one other nodes read too, which innfer cannot follow (nor "
            "does the ONNX export keep it): write it out of place (`y = torch.relu(x)`; for a "
            "slice, `x = torch.cat([x[:, :C] + y, x[:, C:]], 1)`)")  # fmt: skip
    tr.fixed_inputs(node, what)
    tr.opaque(node, what)


def into_a_view(node: fx.Node) -> bool:
    """An in-place method (``add_``) on an indexed view of a tensor (``y[:, 0:8].add_(s)``):
    the write reaches ``y`` through the alias."""
    x = node.args[0] if node.args else None
    in_place = node.op == "call_method" and node.target.endswith("_")
    return in_place and isinstance(x, fx.Node) and x.target is operator.getitem


def _target(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


@register(methods=("size", "dim", "numel"))
def metadata(tr: Tracer, node: fx.Node) -> None:
    """``x.shape``, ``x.size(1)``: read at run time, so they follow resampling - as sizes.
    A channel count in arithmetic on tensors (``h * h.size(1) ** -0.5``) changes the values
    with the width: fixed (``_size_in_arithmetic``)."""
    if node.target in ("size", "numel"):
        tr.after_walk(lambda: _size_in_arithmetic(tr, node))


# Ops that compute with a number rather than take it as a size.
_ARITHMETIC = frozenset({operator.mul, operator.truediv, operator.floordiv, operator.add,
                         operator.sub, operator.pow, operator.mod, torch.mul, torch.div,
                         torch.true_divide, torch.add, torch.sub, torch.pow,
                         torch.rsub})  # fmt: skip
_ARITHMETIC_METHODS = frozenset({"mul", "div", "true_divide", "add", "sub", "pow", "rsub",
                                 "mul_", "div_", "add_", "sub_", "pow_"})  # fmt: skip


def _size_in_arithmetic(tr: Tracer, node: fx.Node) -> None:
    """After the walk: where the sizes ``node`` reads (``x.size(d)``, ``x.size()[d]``,
    ``x.numel()``) reach arithmetic on a tensor through plain Python numbers, the dims read
    must end discrete - a continuous one's count differs at every width, so would the
    values (at half width ``h * h.size(1) ** -0.5`` came out 1.41x the full width's)."""
    x = node.args[0]
    if not isinstance(x, fx.Node) or not tr.shape(x):
        return
    rank = len(tr.shape(x))
    dim = arg(node, 1, "dim", None) if node.op == "call_method" else None
    if node.target == "numel":
        reads = [(node, range(rank))]
    elif isinstance(dim, int):
        reads = [(node, [dim % rank])]
    else:  # x.size(): the dims its items read
        reads = [(u, [u.args[1] % rank]) for u in node.users
                 if u.op == "call_function" and u.target is operator.getitem
                 and isinstance(u.args[1], int)]  # fmt: skip
    labels = tr.labels.get(x, {})
    for start, dims in reads:
        use = _arithmetic_use(start)
        lays = [labels[d] for d in dims if d in labels]
        if use is not None and lays:
            tr.fixed(use, f"{use.name!r} computes with {node.name!r}, a count of channels "
                     "(its value changes with the width, and with it every value computed; "
                     "write the full width's number)", lays)  # fmt: skip


def _arithmetic_use(start: fx.Node) -> fx.Node | None:
    """The first tensor arithmetic ``start``'s value reaches through Python numbers (nodes
    that hold no tensor), or None: used only as a size, or not at all."""
    seen, stack = {start}, [start]
    while stack:
        for u in stack.pop().users:
            if u in seen:
                continue
            seen.add(u)
            if u.meta.get("tensor_meta") is None and u.op != "output":  # a number: follow
                stack.append(u)
            elif (u.op == "call_function" and u.target in _ARITHMETIC) or (
                u.op == "call_method" and u.target in _ARITHMETIC_METHODS
            ):
                return u
    return None


# Attributes that describe a tensor rather than hold its values: read at run time, so they
# follow resampling (``B, N, C = x.shape``).
METADATA_ATTRIBUTES = frozenset({
    "shape", "dtype", "device", "ndim", "layout", "is_cuda", "is_cpu", "is_meta", "is_mps",
    "is_xpu", "is_sparse", "is_quantized", "is_nested", "is_leaf", "requires_grad",
    "itemsize", "nbytes",
})  # fmt: skip


@register(functions=(getattr,))
def attribute(tr: Tracer, node: fx.Node) -> None:
    """``getattr(x, name)`` as fx records ``x.shape``, ``x.T``, ``x.data``: metadata follows
    resampling; ``T`` (all dims reversed; a 2-D transpose) and ``mT`` (the last two swapped)
    move the dims' layouts; ``data`` is the tensor itself. Any other attribute has no rule:
    its input's dims are fixed and its result's are opaque (an attribute that returns a
    tensor - ``x.real``, ``x.grad`` - must not pass for one that keeps the channels)."""
    x, name = node.args[0], node.args[1]
    if x in tr.items and name in ("values", "indices"):  # of max / min over a dim
        tr.labels[node] = dict(tr.items[x][0 if name == "values" else 1])
        return
    if name == "shape":  # its items as sizes; in arithmetic, see metadata
        tr.after_walk(lambda: _size_in_arithmetic(tr, node))
    if name in METADATA_ATTRIBUTES:
        return
    if isinstance(x, fx.Node) and tr.shape(x) and name in ("T", "mT", "data"):
        rank = len(tr.shape(x))
        order = list(range(rank))
        if name == "T":
            order.reverse()
        elif name == "mT" and rank >= 2:
            order[-2], order[-1] = order[-1], order[-2]
        labels, srcs = tr.labels.get(x, {}), tr.sources.get(x, {})
        tr.labels[node] = {new: labels[old] for new, old in enumerate(order) if old in labels}
        tr.sources[node] = {new: srcs[old] for new, old in enumerate(order) if old in srcs}
        return
    what = f"innfer has no rule for the attribute {name!r}"
    tr.fixed_inputs(node, what)
    tr.opaque(node, what)
