"""Groups of tied channel dimensions, found by tracing a model with torch.fx.

Every tensor dimension that carries channels gets a *layout*: the concatenation of one or more
segments, each naming a group (a union-find set) and how many consecutive entries each of its
channels spans (``inner``, e.g. the H*W features a channel becomes after ``flatten``). Layer
rules tie the dims that must keep the same channels - a conv's output channels, its bias, the
next norm's parameters and the next layer's input channels; every operand of a residual add;
the parts of a concat keep their own groups. The union of those ties is a group: one
continuous dimension that is resampled as one.

Invariants:
  * a group's channels are resampled together, so the sampled network stays well formed;
  * the model inputs and outputs are *discrete* (never resampled), and so is every group tied
    to them;
  * an op the rules do not know, applied to a tensor with a continuous dimension, is an
    error naming the node - never a silently wrong model.

Adding an architecture (attention heads, say) means adding rules here, not a rewrite.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp


class ConversionError(ValueError):
    """A model cannot be converted; the message names the node and what to change."""


@dataclass(frozen=True)
class Segment:
    """A run of a dimension that carries one group's channels.

    ``inner``: consecutive entries per channel (channel-major). ``per_block``: the run holds one
    block's channels (a grouped conv's input dim: ``size // blocks`` channels).
    """

    group: int
    inner: int = 1
    per_block: bool = False


Layout = tuple[Segment, ...]


@dataclass(frozen=True)
class Binding:
    """Dimension ``dim`` of parameter/buffer ``param`` carries ``layout``.

    ``reduce`` marks an input (summed-over) dimension: it gets the quadrature scale m/n.
    """

    param: str
    dim: int
    layout: Layout
    reduce: bool = False


@dataclass(frozen=True)
class SizeField:
    """Constructor argument ``kwarg`` of a module equals the sampled size of ``layout``.

    ``index`` selects an element when the argument is a tuple (LayerNorm's normalized_shape).
    """

    kwarg: str
    layout: Layout
    index: int | None = None


@dataclass
class GroupInfo:
    """One group: ``size`` stored channels, ``blocks`` equal blocks resampled independently."""

    name: str
    size: int
    blocks: int = 1
    discrete: bool = False
    members: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Analysis:
    """What the tracer found: groups, which tensors carry them, and size-bearing kwargs."""

    groups: list[GroupInfo]
    bindings: list[Binding]
    size_fields: dict[str, list[SizeField]]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.origin: list[str] = []
        self.discrete: list[bool] = []
        self.anchored: list[bool] = []
        self.blocks: list[int] = []

    def new(self, size: int, origin: str, *, discrete=False, anchored=True) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.origin.append(origin)
        self.discrete.append(discrete)
        self.anchored.append(anchored)
        self.blocks.append(1)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise ConversionError(
                f"{where}: ties a dimension of {self.size[ra]} channels to one of "
                f"{self.size[rb]} (groups from {self.origin[ra]!r} and {self.origin[rb]!r})"
            )
        ba, bb = self.blocks[ra], self.blocks[rb]
        if ba > 1 and bb > 1 and ba != bb:
            raise ConversionError(f"{where}: ties grouped convs with {ba} and {bb} groups")
        keep, drop = (ra, rb) if ra < rb else (rb, ra)  # the earliest origin names the group
        self.parent[drop] = keep
        self.discrete[keep] |= self.discrete[drop]
        self.anchored[keep] |= self.anchored[drop]
        self.blocks[keep] = max(ba, bb)
        return keep

    def continuous(self, g: int) -> bool:
        r = self.find(g)
        return self.anchored[r] and not self.discrete[r]


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules that keep every dimension's channels where they are.
_SAME_LAYOUT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
_SAME_LAYOUT_FUNCTIONS: set[Callable] = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.leaky_relu, F.elu, F.hardswish, F.hardsigmoid, F.mish, F.dropout, torch.dropout,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.softmax, F.log_softmax, torch.softmax,
    torch.neg, torch.abs, torch.exp, operator.neg,
}  # fmt: skip
_SAME_LAYOUT_METHODS = {
    "relu", "sigmoid", "tanh", "contiguous", "clone", "float", "half", "to", "neg", "abs",
    "exp", "softmax", "detach", "type_as",
}  # fmt: skip
_BINARY = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}  # fmt: skip
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_", "maximum", "minimum"}
_REDUCTIONS = {torch.mean: "mean", torch.amax: "amax", torch.sum: "sum"}
_REDUCTION_METHODS = {"mean", "amax", "sum"}
_NON_TENSOR_METHODS = {"size", "dim", "numel"}


class _Tracer:
    """Walks the graph once, assigning a layout to every channel-carrying dim."""

    def __init__(self, gm: fx.GraphModule, discrete_modules: set[str]) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.uf = _UnionFind()
        self.labels: dict[fx.Node, dict[int, Layout]] = {}
        self.bindings: list[Binding] = []
        self.size_fields: dict[str, list[SizeField]] = {}
        self.discrete_modules = discrete_modules

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def shape(node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()

    def layout_of(self, node: fx.Node, dim: int) -> Layout:
        """The layout of ``node``'s dim; a dim nothing labelled is a fresh discrete group."""
        dim = dim % len(self.shape(node))
        labels = self.labels.setdefault(node, {})
        if dim not in labels:
            g = self.uf.new(self.shape(node)[dim], f"{node.name}:{dim}", discrete=True)
            labels[dim] = (Segment(g),)
        return labels[dim]

    def layout_size(self, layout: Layout) -> int:
        total = 0
        for s in layout:
            n = self.uf.size[self.uf.find(s.group)]
            total += (n // self.uf.blocks[self.uf.find(s.group)] if s.per_block else n) * s.inner
        return total

    def unify(self, a: Layout, b: Layout, where: str) -> Layout:
        if len(a) != len(b) or any(x.inner != y.inner for x, y in zip(a, b, strict=False)):
            raise ConversionError(
                f"{where}: combines tensors whose channels are split differently "
                f"(e.g. a residual add of a concat); this is not supported"
            )
        for x, y in zip(a, b, strict=True):
            self.uf.union(x.group, y.group, where)
        return a

    def has_continuous(self, node: fx.Node) -> bool:
        return any(
            self.uf.continuous(s.group) for lay in self.labels.get(node, {}).values() for s in lay
        )

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if self.shape(a)]

    def bind(self, module: str, pname: str, dim: int, layout: Layout, reduce=False) -> None:
        name = f"{module}.{pname}" if module else pname
        self.bindings.append(Binding(name, dim, layout, reduce))

    def new_group(self, size: int, origin: str) -> Layout:
        g = self.uf.new(size, origin, discrete=origin in self.discrete_modules)
        return (Segment(g),)

    def unsupported(self, node: fx.Node, what: str) -> ConversionError:
        return ConversionError(
            f"cannot convert node {node.name!r} ({node.op} {what}): it acts on a continuous "
            f"channel dimension and innfer has no rule for it. Rewrite it with supported ops, "
            f"or keep its channels fixed with discrete=[...] on the layers that produce them."
        )

    # -- the walk --------------------------------------------------------------------------
    def run(self) -> Analysis:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue  # inputs get discrete groups lazily through layout_of
            if node.op == "get_attr":
                self.visit_get_attr(node)
            elif node.op == "call_module":
                self.visit_module(node)
            elif node.op in ("call_function", "call_method"):
                self.visit_function(node)
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    for lay in self.labels.get(arg, {}).values():
                        for s in lay:
                            self.uf.discrete[self.uf.find(s.group)] = True
        return self.analysis()

    def visit_get_attr(self, node: fx.Node) -> None:
        # A raw parameter used in an op: each dim may become tied to channels by that op.
        # Until tied to a layer ("anchored"), such a group stays discrete.
        labels = {}
        for dim, size in enumerate(self.shape(node)):
            if size > 1:
                g = self.uf.new(size, f"{node.target}:{dim}", anchored=False)
                labels[dim] = (Segment(g),)
                self.bindings.append(Binding(str(node.target), dim, labels[dim]))
        self.labels[node] = labels

    def visit_module(self, node: fx.Node) -> None:
        mod = self.modules[node.target]
        name = str(node.target)
        x = node.args[0] if node.args else None
        if isinstance(mod, _CONV):
            self.visit_conv(node, mod, name, x)
        elif isinstance(mod, nn.Linear):
            rank = len(self.shape(x))
            l_in = self.layout_of(x, -1)
            self.bind(name, "weight", 1, l_in, reduce=True)
            out = self.new_group(mod.out_features, name)
            self.bind(name, "weight", 0, out)
            if mod.bias is not None:
                self.bind(name, "bias", 0, out)
            self.size_fields[name] = [
                SizeField("in_features", l_in),
                SizeField("out_features", out),
            ]
            self.labels[node] = {**self.labels.get(x, {}), rank - 1: out}
        elif isinstance(mod, _NORM):
            lay = self.layout_of(x, 1)
            for p in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, p, None) is not None:
                    self.bind(name, p, 0, lay)
            self.size_fields[name] = [SizeField("num_features", lay)]
            self.labels[node] = dict(self.labels.get(x, {}))
        elif isinstance(mod, nn.LayerNorm):
            rank = len(self.shape(x))
            if len(mod.normalized_shape) != 1:
                raise self.unsupported(node, "LayerNorm over more than the last dimension")
            lay = self.layout_of(x, -1)
            for p in ("weight", "bias"):
                if getattr(mod, p, None) is not None:
                    self.bind(name, p, 0, lay)
            self.size_fields[name] = [SizeField("normalized_shape", lay, index=0)]
            self.labels[node] = {**self.labels.get(x, {}), rank - 1: lay}
        elif isinstance(mod, nn.Flatten):
            self.flatten(node, x, mod.start_dim, mod.end_dim)
        elif isinstance(mod, _SAME_LAYOUT_MODULES):
            self.labels[node] = dict(self.labels.get(x, {}))
        elif any(self.has_continuous(a) for a in self.tensor_inputs(node)):
            raise self.unsupported(node, f"module {type(mod).__name__} at {name!r}")

    def visit_conv(self, node: fx.Node, mod: nn.Module, name: str, x: fx.Node) -> None:
        g, c_in, c_out = mod.groups, mod.in_channels, mod.out_channels
        l_in = self.layout_of(x, 1)
        fields = [SizeField("in_channels", l_in)]
        if g == 1:
            self.bind(name, "weight", 1, l_in, reduce=True)
            out = self.new_group(c_out, name)
        elif g == c_in:
            # Depthwise: output channel c*mult+j reads input channel c only, so the output dim
            # is the input's layout with each channel spanning `mult` entries. No sum over
            # channels, so no quadrature scale.
            mult = c_out // c_in
            out = tuple(Segment(s.group, s.inner * mult, s.per_block) for s in l_in)
            fields.append(SizeField("groups", l_in))
        else:
            if len(l_in) != 1 or l_in[0].inner != 1:
                raise self.unsupported(node, f"grouped Conv ({g} groups) after a concat/flatten")
            root = self.uf.find(l_in[0].group)
            self.set_blocks(root, g, node)
            self.bind(name, "weight", 1, (Segment(l_in[0].group, 1, per_block=True),), True)
            out = self.new_group(c_out, name)
            self.set_blocks(self.uf.find(out[0].group), g, node)
        self.bind(name, "weight", 0, out)
        if mod.bias is not None:
            self.bind(name, "bias", 0, out)
        fields.append(SizeField("out_channels", out))
        self.size_fields[name] = fields
        self.labels[node] = {**self.labels.get(x, {}), 1: out}

    def set_blocks(self, root: int, blocks: int, node: fx.Node) -> None:
        have = self.uf.blocks[root]
        if have > 1 and have != blocks:
            raise self.unsupported(node, f"grouped Conv with {blocks} groups after {have}")
        self.uf.blocks[root] = blocks

    def visit_function(self, node: fx.Node) -> None:
        t = node.target
        x = node.args[0] if node.args else None
        is_method = node.op == "call_method"
        if (is_method and t in _NON_TENSOR_METHODS) or not self.shape(node):
            if any(self.has_continuous(a) for a in self.tensor_inputs(node)) and (
                t is operator.getitem or t in (torch.split, torch.chunk, "split", "chunk")
            ):
                raise self.unsupported(node, str(t))
            return
        if (t in _BINARY) or (is_method and t in _BINARY_METHODS):
            self.broadcast(node)
        elif t in _SAME_LAYOUT_FUNCTIONS or (is_method and t in _SAME_LAYOUT_METHODS):
            self.labels[node] = dict(self.labels.get(x, {}))
        elif t is torch.flatten or (is_method and t == "flatten"):
            start = _arg(node, 1, "start_dim", 0)
            end = _arg(node, 2, "end_dim", -1)
            self.flatten(node, x, start, end)
        elif t in (torch.cat, torch.concat):
            self.concat(node)
        elif t in _REDUCTIONS or (is_method and t in _REDUCTION_METHODS):
            self.reduction(node, x, _REDUCTIONS.get(t, t))
        elif t in (torch.reshape,) or (is_method and t in ("view", "reshape")):
            self.reshape(node, x)
        elif t in (torch.transpose,) or (is_method and t in ("transpose", "permute")):
            self.transpose(node, x, t)
        elif any(self.has_continuous(a) for a in self.tensor_inputs(node)):
            raise self.unsupported(node, getattr(t, "__name__", str(t)))

    def broadcast(self, node: fx.Node) -> None:
        out_shape = self.shape(node)
        rank = len(out_shape)
        labels: dict[int, Layout] = {}
        for arg in node.args:
            if not isinstance(arg, fx.Node) or not self.shape(arg):
                continue
            shape = self.shape(arg)
            offset = rank - len(shape)
            for dim, lay in self.labels.get(arg, {}).items():
                if shape[dim] != out_shape[dim + offset]:
                    continue  # a broadcast size-1 dim ties nothing
                out_dim = dim + offset
                labels[out_dim] = (
                    self.unify(labels[out_dim], lay, f"node {node.name!r}")
                    if out_dim in labels
                    else lay
                )
        self.labels[node] = labels

    def flatten(self, node: fx.Node, x: fx.Node, start: int, end: int) -> None:
        shape = self.shape(x)
        rank = len(shape)
        start, end = start % rank, end % rank
        labels: dict[int, Layout] = {}
        for dim, lay in self.labels.get(x, {}).items():
            if dim < start:
                labels[dim] = lay
            elif dim > end:
                labels[dim - (end - start)] = lay
            elif dim == start:
                inner = math.prod(shape[start + 1 : end + 1])
                labels[start] = tuple(Segment(s.group, s.inner * inner, s.per_block) for s in lay)
            elif self.has_layout_continuous(lay):
                raise self.unsupported(
                    node, "flatten that interleaves a continuous channel dim (channels not first)"
                )
        self.labels[node] = labels

    def has_layout_continuous(self, lay: Layout) -> bool:
        return any(self.uf.continuous(s.group) for s in lay)

    def concat(self, node: fx.Node) -> None:
        parts = node.args[0] if node.args else node.kwargs["tensors"]
        dim = _arg(node, 1, "dim", 0) % len(self.shape(node))
        layout: Layout = ()
        labels: dict[int, Layout] = {}
        for part in parts:
            layout += self.layout_of(part, dim)
            for d, lay in self.labels.get(part, {}).items():
                if d != dim:
                    labels[d] = self.unify(labels[d], lay, node.name) if d in labels else lay
        labels[dim] = layout
        self.labels[node] = labels

    def reduction(self, node: fx.Node, x: fx.Node, kind: str) -> None:
        rank = len(self.shape(x))
        dims = _arg(node, 1, "dim", None)
        keepdim = _arg(node, 2, "keepdim", False)
        if dims is None:
            dims = tuple(range(rank))
        dims = {d % rank for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        labels: dict[int, Layout] = {}
        for dim, lay in self.labels.get(x, {}).items():
            if dim in dims:
                if kind == "sum" and self.has_layout_continuous(lay):
                    raise self.unsupported(node, "sum over a continuous channel dim")
                continue
            labels[dim if keepdim else dim - sum(d < dim for d in dims)] = lay
        self.labels[node] = labels

    def reshape(self, node: fx.Node, x: fx.Node) -> None:
        src, dst = self.shape(x), self.shape(node)
        labels = self.labels.get(x, {})
        if not any(self.has_layout_continuous(lay) for lay in labels.values()):
            return
        # Supported: dims [start, end] merged into one (a flatten), sizes given as -1 or
        # computed from x.size(); a literal channel count would not survive resampling.
        start = next((i for i in range(min(len(src), len(dst))) if src[i] != dst[i]), None)
        if start is None:
            self.labels[node] = dict(labels)
            return
        end = start + len(src) - len(dst)
        literal = [a for a in _flat_args(node.args[1:]) if isinstance(a, int) and a > 1]
        if (
            end <= start
            or math.prod(src[start : end + 1]) != dst[start]
            or src[end + 1 :] != dst[start + 1 :]
            or dst[start] in literal
        ):
            raise self.unsupported(
                node, f"reshape {src} -> {dst}; use torch.flatten(x, {start}) or -1 for sizes"
            )
        self.flatten(node, x, start, end)

    def transpose(self, node: fx.Node, x: fx.Node, t: object) -> None:
        rank = len(self.shape(x))
        if t == "permute":
            order = _flat_args(node.args[1:])
        else:
            a, b = (int(node.args[1]) % rank, int(node.args[2]) % rank)
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
        source = {new: old % rank for new, old in enumerate(order)}
        labels = self.labels.get(x, {})
        self.labels[node] = {new: labels[old] for new, old in source.items() if old in labels}

    # -- result ----------------------------------------------------------------------------
    def analysis(self) -> Analysis:
        uf = self.uf
        layouts = [b.layout for b in self.bindings]
        layouts += [f.layout for fs in self.size_fields.values() for f in fs]
        roots = sorted({uf.find(s.group) for lay in layouts for s in lay})
        names: dict[int, str] = {}
        groups: list[GroupInfo] = []
        for r in roots:
            name = uf.origin[r]
            while name in names.values():
                name += "'"
            names[r] = name
            groups.append(GroupInfo(name, uf.size[r], uf.blocks[r], not uf.continuous(r)))
        by_name = {g.name: g for g in groups}
        index = {r: i for i, r in enumerate(roots)}

        def canon(lay: Layout) -> Layout:
            return tuple(Segment(index[uf.find(s.group)], s.inner, s.per_block) for s in lay)

        bindings = [Binding(b.param, b.dim, canon(b.layout), b.reduce) for b in self.bindings]
        for b in bindings:
            for s in b.layout:
                by_name[groups[s.group].name].members.append((b.param, b.dim))
        size_fields = {
            m: [SizeField(f.kwarg, canon(f.layout), f.index) for f in fs]
            for m, fs in self.size_fields.items()
        }
        return Analysis(groups, bindings, size_fields)


def _arg(node: fx.Node, pos: int, name: str, default):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _flat_args(args: Iterable) -> list:
    out = []
    for a in args:
        if isinstance(a, (tuple, list)):
            out.extend(_flat_args(a))
        else:
            out.append(a)
    return out


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with an error that says what to do when tracing fails."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        raise ConversionError(
            f"torch.fx could not trace {type(model).__name__}: {exc}. Models must be traceable "
            f"(no data-dependent control flow); see torch.fx's documentation on limitations."
        ) from exc


def analyse(gm: fx.GraphModule, example_inputs: tuple, discrete: Iterable[str] = ()) -> Analysis:
    """Find the groups of ``gm``; ``discrete`` names modules whose output channels stay fixed.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> a = analyse(trace(net), (torch.randn(1, 4),))
        >>> [(g.name, g.size, g.discrete) for g in a.groups if not g.discrete]
        [('0', 8, False)]
    """
    discrete = set(discrete)
    modules = dict(gm.named_modules())
    unknown = sorted(d for d in discrete if d not in modules)
    if unknown:
        raise ValueError(f"discrete names unknown modules {unknown}; known: {sorted(modules)}")
    ShapeProp(gm).propagate(*example_inputs)
    return _Tracer(gm, discrete).run()
