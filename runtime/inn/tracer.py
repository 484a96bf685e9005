"""The graph walk: every channel-carrying dim gets a layout; rules (``runtime.inn.rules``)
tie dims, bind parameters and record what must stay fixed.

Safety by construction:
  * every dim of a raw parameter (``get_attr``) gets a group and a binding at once; shape ops
    carry that group along, so whatever op later ties it to a layer's channels binds the
    parameter (it is then resampled and permuted with them);
  * a rule that cannot follow a dim (an op without a rule, a reshape that splits channels, a
    literal channel count, a constant index) does not guess: it records *fixed* - the dim's
    groups must end discrete. After the walk, any fixed group that ended continuous is an
    error naming the node, the op and what to change. A parameter tied to a layer only
    later in the graph is therefore caught as well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from itertools import pairwise

import torch.nn.functional as F
from torch import fx

from runtime.inn.layout import (
    Analysis,
    Binding,
    ConversionError,
    GroupInfo,
    Layout,
    Segment,
    SizeField,
)
from runtime.inn.unionfind import UnionFind

Labels = dict[int, Layout]
Source = tuple[str, int]  # (parameter name, dim) a tensor dim is an unchanged view of


class Tracer:
    """Walks the graph once, assigning a layout to every channel-carrying dim."""

    def __init__(self, gm: fx.GraphModule, discrete_modules: set[str]) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.uf = UnionFind()
        self.labels: dict[fx.Node, Labels] = {}
        self.items: dict[fx.Node, list[Labels]] = {}  # tuple-valued nodes (split, chunk)
        self.sources: dict[fx.Node, dict[int, Source]] = {}
        self.bindings: list[Binding] = []
        self._bound: dict[Source, int] = {}
        self.size_fields: dict[str, list[SizeField]] = {}
        self.discrete_modules = discrete_modules
        self._fixed: list[tuple[fx.Node, str, tuple[int, ...]]] = []
        # Dims a node averages over (a LayerNorm's, a mean's) that hold several groups: see
        # ``averaged``. Same records as ``_fixed``; checked with them at the end.
        self._averaged: list[tuple[fx.Node, str, tuple[int, ...]]] = []
        # Who sums over each parameter dim bound with ``reduce`` (a call node, or the name of
        # the module whose rule bound it): any other reader pins the dim (``_pin_mixed_uses``).
        self._summed: dict[Source, set[fx.Node | str]] = {}
        self._after_walk: list[Callable[[], None]] = []  # see ``after_walk``
        self._split: dict[int, list[int]] = {}  # a group cut into parts (``split_group``)
        self.picked: list[int] = []  # groups a max / min over channels picks among
        # parameter -> the dim holding its layer's output channels, where not 0 (said by the
        # rule that reads it: F.embedding's table, 1) - what discrete=[owner] keeps
        self.output_dim: dict[str, int] = {}

    # -- helpers for rules -----------------------------------------------------------------
    @staticmethod
    def shape(node: object) -> tuple[int, ...]:
        if not isinstance(node, fx.Node):
            return ()
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()

    def layout_of(self, node: fx.Node, dim: int) -> Layout:
        """The layout of ``node``'s dim; a dim nothing labelled is a fresh discrete group."""
        dim = dim % len(self.shape(node))
        labels = self.labels.setdefault(node, {})
        if dim not in labels:
            labels[dim] = self.fresh_layout(self.shape(node)[dim], f"{node.name}:{dim}")
        return labels[dim]

    def fresh_layout(self, size: int, name: str) -> Layout:
        """A new discrete group of ``size`` channels (a dim no rule has labelled)."""
        return (Segment(self.uf.new(size, name, discrete=True)),)

    def unify(self, a: Layout, b: Layout, where: str) -> Layout:
        """Tie two dims that must hold the same channels.

        Dims split into different segments (``cat([cls, tokens]) + pos_table``) cannot share
        a resampling; that is fine while none of their groups is continuous - they are then
        pinned discrete for good. A continuous one is an error.
        """
        # Pairwise only where each pair holds as many entries: two pads of different sides
        # (or cats of different parts) added met here, and the union raised "ties 2
        # channels to one of 1" where _align below cuts them to pair (review helper-239).
        if len(a) == len(b) and all(
            x.inner == y.inner and segment_entries(self.uf, x) == segment_entries(self.uf, y)
            for x, y in zip(a, b, strict=True)
        ):
            for x, y in zip(a, b, strict=True):
                self.uf.union(x.group, y.group, where)
            return a
        coarse = self._coarsen(a, b) or self._coarsen(b, a)
        if coarse is not None:
            return coarse
        if any(self.uf.continuous(s.group) for s in a + b):
            aligned = self._align(a, b)
            pairs = [] if aligned is None else list(zip(*aligned, strict=True))
            size = self.uf.size
            # (pieces of other sizes - x[:, 1:] - x[:, :-1] - cannot be tied; any other
            # refusal of the union, grouped convs' blocks, is said as it is)
            if pairs and all(size[self.uf.find(x.group)] == size[self.uf.find(y.group)]
                             for x, y in pairs):  # fmt: skip
                for x, y in pairs:
                    self.uf.union(x.group, y.group, where)
                return aligned[0]
            raise self._split_apart(where, a + b)
        for s in a + b:
            self.uf.pin(s.group)
        return a

    def _split_apart(self, where: str, segments: Layout) -> ConversionError:
        """The refusal of a tie between continuous channels sliced or split differently
        (``x[:, 1:] - x[:, :-1]``, a residual add of a concat), naming the layer that
        ``discrete=[...]`` keeps whole to lift it (and so ``on_unsupported="keep"``); it was
        "ties a dimension of 12 channels to one of 1", with no way out (review helper-284)."""
        live = [s for s in segments if self.uf.continuous(s.group)]
        origin = self.uf.origin[self.uf.find(live[0].group)]
        producer = _producer(origin, self.modules, self.output_dim)  # (a cut part's: its layer)
        what = "combines channels sliced or split differently (x[:, 1:] - x[:, :-1], a "
        what += "residual add of a concat), which cannot follow the width together"
        if producer is None:
            return ConversionError(f"{where}: {what}; rewrite it with supported ops")
        return ConversionError(
            f"{where}: {what}; keep them fixed with discrete=[{producer!r}] "
            "(convert(..., on_unsupported='keep') keeps every such group at its size)",
            keep=producer, reason=f"{where}: {what}", keeps={producer: f"{where}: {what}"},
        )  # fmt: skip

    def _align(self, a: Layout, b: Layout) -> tuple[Layout, Layout] | None:
        """``a`` and ``b`` cut at each other's segment boundaries (``cut``), so that they
        pair segment by segment: the add of a concatenation of groups (MixNet's mixed convs,
        a ``cat``) and a plain one (the shortcut, an SE gate) splits the plain group into as
        many parts. None where the dims differ in size or a cut cannot be made."""
        if _entries(self.uf, a) != _entries(self.uf, b):
            return None
        a2 = self.cut(a, _bounds(self.uf, b))
        b2 = None if a2 is None else self.cut(self.expand(b), _bounds(self.uf, a2))
        if b2 is None:
            return None
        a2 = self.expand(a2)
        if len(a2) != len(b2) or any(x.inner != y.inner for x, y in zip(a2, b2, strict=True)):
            return None
        return a2, b2

    def _coarsen(self, single: Layout, multi: Layout) -> Layout | None:
        """Tie a plain dim (one group, ``inner`` i) to a structured one (``n`` copies of one
        group, each channel spanning j = k*i entries: heads of a head-dim k, q/k/v parts) by
        refining the plain group into ``n`` copies of blocks of k (``refine``) - coarser
        resampling is always valid. An output projection read as a raw parameter
        (``F.linear(heads_merged, W)``) meets the heads this way. None if the shapes differ."""
        if len(single) != 1 or single[0].per_block or any(s.per_block for s in multi):
            return None
        uf = self.uf
        g, i = uf.find(single[0].group), single[0].inner
        h, j = uf.find(multi[0].group), multi[0].inner
        same = all(uf.find(s.group) == h and s.inner == j for s in multi)
        if not same or g == h or j % i or uf.blocks[g] != 1 or (len(multi) == 1 and j == i):
            return None
        if uf.size[g] * i != len(multi) * uf.size[h] * j:
            return None
        refined = self.refine(g, len(multi), j // i)
        self.uf.union(refined, h, "coarsen")
        return multi

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if self.shape(a) or a in self.items]

    def bind(self, param: str, dim: int, layout: Layout, reduce=False) -> None:
        """``param``'s ``dim`` carries ``layout``; a dim bound twice is tied, never doubled."""
        key = (param, dim)
        if key in self._bound:
            i = self._bound[key]
            old = self.bindings[i]
            self.unify(old.layout, layout, f"parameter {param!r} dim {dim}")
            self.bindings[i] = Binding(param, dim, old.layout, old.reduce or reduce)
            return
        self._bound[key] = len(self.bindings)
        self.bindings.append(Binding(param, dim, layout, reduce))

    def rebind(self, node: fx.Node, dim: int, layout: Layout, reduce: bool) -> bool:
        """Re-declare what dim ``dim`` of raw parameter ``node`` carries: ``layout`` instead of
        the fresh group ``visit_get_attr`` gave it (a grouped conv's weight, whose dim 1 is one
        block of the input's channels - a group of another size, so it cannot be tied).
        Only while nothing else can have seen that group: a ``get_attr`` read by one node,
        its dim not tied yet. False (nothing changed) otherwise."""
        source = self.sources.get(node, {}).get(dim)
        if node.op != "get_attr" or source is None or len(node.users) != 1:
            return False
        if len([n for n in self.gm.graph.find_nodes(op="get_attr") if n.target == node.target]) > 1:
            return False  # another read of the tensor holds the old group
        i = self._bound[source]
        old = self.bindings[i].layout
        g = old[0].group
        if len(old) != 1 or self.uf.find(g) != g or self.uf.anchored[g] or self.uf.discrete[g]:
            return False
        self.bindings[i] = Binding(source[0], source[1], layout, reduce)
        if reduce:
            self._summed.setdefault(source, set()).update(node.users)
        self.labels[node][dim] = layout
        self.uf.pin(g)  # orphaned: nothing refers to it any more
        return True

    def bound(self, param: str, dim: int) -> Layout | None:
        i = self._bound.get((param, dim))
        return None if i is None else self.bindings[i].layout

    def mark_reduce(self, source: Source, by: fx.Node) -> None:
        """The parameter dim ``source`` is summed over by node ``by`` (a functional layer):
        give it the quadrature."""
        i = self._bound[source]
        b = self.bindings[i]
        self.bindings[i] = Binding(b.param, b.dim, b.layout, True)
        self._summed.setdefault(source, set()).add(by)

    def module_binding(self, module: str, pname: str, dim: int, layout: Layout, reduce=False):
        param = f"{module}.{pname}" if module else pname
        self.bind(param, dim, layout, reduce)
        if reduce:
            self._summed.setdefault((param, dim), set()).add(module)

    def new_group(self, size: int, origin: str) -> Layout:
        g = self.uf.new(size, origin, discrete=origin in self.discrete_modules)
        return (Segment(g),)

    def copy(self, node: fx.Node, x: object, sources: bool = True) -> None:
        """``node`` keeps every dim of ``x`` as it is (an elementwise op on one tensor)."""
        if isinstance(x, fx.Node):
            self.labels[node] = dict(self.labels.get(x, {}))
            if sources and x in self.sources:
                self.sources[node] = dict(self.sources[x])

    def refine(self, g: int, parts: int, inner: int) -> int:
        """Re-declare group ``g`` (``parts * n * inner`` channels) as ``parts`` copies of one
        new group of ``n`` channels, each spanning ``inner`` of ``g``'s channels - attention
        heads of ``inner`` channels, ``parts`` for q/k/v. Every layout stored so far that
        holds ``g`` is rewritten in place (the same entries, in the same order), so the
        parameters bound to ``g`` follow; the old group is orphaned and pinned."""
        uf = self.uf
        root = uf.find(g)
        if parts == 1 and inner == 1:
            return root
        h = uf.new(uf.size[root] // (parts * inner), uf.origin[root],
                   discrete=uf.discrete[root], anchored=uf.anchored[root])  # fmt: skip

        def sub(lay: Layout) -> Layout:
            out: list[Segment] = []
            for s in lay:
                if uf.find(s.group) != root:
                    out.append(s)
                elif s.per_block:  # callers refine only groups without conv blocks
                    raise AssertionError("refine: a per-block segment")
                else:
                    out.extend([Segment(h, s.inner * inner)] * parts)
            return tuple(out)

        self._rewrite(root, sub, [h])
        return h

    def _rewrite(self, root: int, sub: Callable[[Layout], Layout], new: list[int]) -> None:
        """Replace group ``root`` by ``new`` everywhere a layout is stored (``sub`` rewrites
        one layout): labels, tuple items, bindings, size fields; a fixed record of ``root``
        now holds every one of ``new``. The old group is orphaned and pinned."""
        uf = self.uf
        every = [*self.labels.values(), *(i for its in self.items.values() for i in its)]
        for labels in every:
            for d, lay in labels.items():
                labels[d] = sub(lay)
        self.bindings = [Binding(b.param, b.dim, sub(b.layout), b.reduce) for b in self.bindings]
        for fs in self.size_fields.values():
            fs[:] = [replace(f, layout=sub(f.layout)) for f in fs]
        self._fixed, self._averaged = (
            [(n, w, tuple(y for x in gs for y in (new if uf.find(x) == root else [x])))
             for n, w, gs in records]
            for records in (self._fixed, self._averaged)
        )  # fmt: skip
        uf.pin(root)  # nothing refers to it any more; were anything to, it stays fixed

    def cut(self, lay: Layout, at: list[int]) -> Layout | None:
        """``lay`` with a segment boundary at each entry offset in ``at``: a group that an
        offset falls inside is split into consecutive groups (``split_group``), everywhere
        it is stored. A dim that a split/add cuts unequally (MixNet's ``torch.split(x,
        [a, b, c], 1)``) is then a concatenation of groups resampled independently, as the
        parts of a ``cat`` are. None where a cut cannot be made: inside a channel (``inner``
        entries), or inside a group with conv/norm blocks (their block size would break)."""
        cuts: dict[int, set[int]] = {}
        start = 0
        for s in lay:
            root, n = self.uf.find(s.group), segment_entries(self.uf, s)
            inside = [o - start for o in at if start < o < start + n]
            if inside:
                if s.per_block or self.uf.blocks[root] != 1 or any(o % s.inner for o in inside):
                    return None
                cuts.setdefault(root, set()).update(o // s.inner for o in inside)
            start += n
        for root, offsets in cuts.items():
            self.split_group(root, sorted(offsets))
        return self.expand(lay)

    def split_group(self, root: int, offsets: list[int]) -> list[int]:
        """Re-declare group ``root`` as consecutive new groups cut at channel ``offsets``;
        every stored layout that holds it is rewritten (``_rewrite``), so its parameters
        follow, each part resampled on its own."""
        uf = self.uf
        bounds = [0, *offsets, uf.size[root]]
        keep = {"discrete": uf.discrete[root], "anchored": uf.anchored[root]}
        parts = [
            uf.new(hi - lo, f"{uf.origin[root]}[{lo}:{hi}]", **keep) for lo, hi in pairwise(bounds)
        ]
        self._split[root] = parts
        self._rewrite(root, self.expand, parts)
        return parts

    def expand(self, lay: Layout) -> Layout:
        """``lay`` with every group split so far (``split_group``) replaced by its parts."""
        out: list[Segment] = []
        for s in lay:
            parts = self._split.get(self.uf.find(s.group))
            if parts is None:
                out.append(s)
            else:
                out.extend(self.expand(tuple(Segment(p, s.inner) for p in parts)))
        return tuple(out)

    def after_walk(self, decide: Callable[[], None]) -> None:
        """Call ``decide`` once the whole graph is walked (before the final check): for a
        rule whose answer depends on ties made later in the graph - whether a computed size
        reads the size of the channels it is given for, whether those end continuous. It
        reads layouts from ``labels`` (kept current by ``refine``) and may call ``fixed``
        or add size fields."""
        self._after_walk.append(decide)

    def fixed(self, node: fx.Node, what: str, layouts) -> None:
        """The groups of ``layouts`` must end discrete, or ``node`` is refused with ``what``."""
        groups = tuple(s.group for lay in layouts for s in lay)
        if groups:
            self._fixed.append((node, what, groups))

    def averaged(self, node: fx.Node, op: str, lay: Layout) -> None:
        """``node`` averages over the channels of ``lay`` (a LayerNorm's statistics, a
        mean): where they come from several groups (a concat), each group weighs in by its
        share of the channels, which sampling keeps only if every group keeps its ratio.
        Rounding does not (48 + 16 channels at a quarter with multiple_of 16: 16 + 16, and
        a LayerNorm's output moved by 6x its size), and a discrete group beside a
        continuous one never does. So the groups must end one group or all discrete, or
        ``node`` is refused, naming ``op`` (e.g. "layer norm"). Recorded even for one
        group: a slice found later may cut it into parts sampled apart."""
        what = (f"{op} over channels of several groups sampled apart (joined by a concat or "
                "cut by a slice): each one's share of the statistics would change with the "
                "width")  # fmt: skip
        self._averaged.append((node, what, tuple(s.group for s in lay)))

    def fixed_inputs(self, node: fx.Node, what: str) -> None:
        """``node`` has no rule: every dim of every input must end discrete."""
        for a in node.all_input_nodes:
            self.fixed(node, what, self.labels.get(a, {}).values())
            for item in self.items.get(a, []):
                self.fixed(node, what, item.values())

    def opaque(self, node: fx.Node, what: str) -> None:
        """``node``'s output dims come from an op without a rule: their sizes are fixed, so
        tying one to continuous channels later refuses ``node`` (rather than silently fixing
        those channels or leaving a size that does not follow them)."""
        labels: Labels = {}
        for dim, size in enumerate(self.shape(node)):
            if size > 1:
                g = self.uf.new(size, f"{node.name}:{dim}", anchored=False)
                labels[dim] = (Segment(g),)
                self.fixed(node, what, [labels[dim]])
        self.labels[node] = labels

    # -- the walk --------------------------------------------------------------------------
    def run(self) -> Analysis:
        from runtime.inn.rules import lookup  # the rules register themselves on import

        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue  # inputs get discrete groups lazily through layout_of
            if node.op == "get_attr":
                self.visit_get_attr(node)
            elif node.op == "output":
                # A returned tuple-valued node (``return y.chunk(2, -1)``) holds its layouts in
                # ``items``: its elements are outputs too.
                for arg in node.all_input_nodes:
                    every = [self.labels.get(arg, {}), *self.items.get(arg, [])]
                    for lay in (lay for labels in every for lay in labels.values()):
                        for s in lay:
                            self.uf.pin(s.group)
            else:
                module = self.modules.get(node.target) if node.op == "call_module" else None
                rule = lookup(node, module)
                if rule is not None:
                    rule(self, node)
                elif module is not None and (why := _not_stored(module)):
                    # Not even kept as it is: an INN rebuilds each layer from its constructor
                    # arguments (discrete=[...] was advised, and then failed on that).
                    raise ConversionError(
                        f"cannot convert node {node.name!r} (call_module {node.target}): "
                        f"innfer has no rule for module {type(module).__name__} and cannot "
                        f"store it ({why}); rebuild it from layers it can (nn.Linear, "
                        "nn.MultiheadAttention, nn.LayerNorm, ...)"
                    )
                else:
                    self.fixed_inputs(node, _no_rule(node, module))
                    self.opaque(node, _no_rule(node, module))
        self._pin_mixed_uses()
        for decide in self._after_walk:
            decide()
        self.check()
        # after the check: a group only an op without a rule reads is refused there, with
        # the advice, rather than pinned here without a word
        self._pin_unread()
        return self.analysis()

    def _pin_mixed_uses(self) -> None:
        """The quadrature scale of a summed (``reduce``) dim is applied to the stored tensor,
        so every reader of the parameter sees it. Where a parameter is also read other than
        by a layer summing over that dim - a table tied as embedding and output head,
        ``F.linear(F.embedding(ids, W), W)``: the embedding's channels must not be scaled -
        that dim's groups are pinned: exact at every width, not elastic there."""
        for b in self.bindings:
            if b.reduce and self._readers(b.param) - self._summed.get((b.param, b.dim), set()):
                for s in b.layout:
                    self.uf.pin(s.group)

    def _pin_unread(self) -> None:
        """A group no layer reads (no binding sums over it) whose channels a max or min
        picks among: a classifier's classes returned as their best score (``logits.max(1)``,
        ``amax``). Resampled, it would merge classes - a 10-class head sampled to 5 - so it
        is pinned, as a returned dim is (review helper-244: only dims that reached an output
        were). A mean over such channels stays elastic: it does not depend on their count
        (review helper-245: a per-pixel map ``h.mean(1)`` was pinned too)."""
        uf = self.uf
        read = {uf.find(s.group) for b in self.bindings if b.reduce for s in b.layout}
        for g in self.picked:
            if uf.find(g) not in read:
                uf.pin(g)

    def _readers(self, param: str) -> set[fx.Node | str]:
        """What reads ``param``'s values: the modules owning it (by name) and the nodes that
        use a ``get_attr`` of it, through views of it (nodes that keep its dims, ``sources``);
        reading its shape does not count."""
        from runtime.inn.rules.indexing import METADATA_ATTRIBUTES

        out: set[fx.Node | str] = {
            n.target for n in self.gm.graph.find_nodes(op="call_module")
            if param.startswith(f"{n.target}.")
        }  # fmt: skip
        todo = [n for n in self.gm.graph.find_nodes(op="get_attr") if n.target == param]
        seen = set(todo)
        while todo:
            for user in todo.pop().users:
                if user in seen:
                    continue
                seen.add(user)
                if any(p == param for p, _ in self.sources.get(user, {}).values()):
                    todo.append(user)  # a view of the parameter: its users read it
                elif not _reads_metadata(user, METADATA_ATTRIBUTES):
                    out.add(user)
        return out

    def visit_get_attr(self, node: fx.Node) -> None:
        # A raw parameter: each dim gets a group bound to it now, so whichever op ties the
        # dim to a layer's channels (through any shape ops) binds the parameter. Until then
        # ("anchored") the group stays discrete.
        labels: Labels = {}
        sources: dict[int, Source] = {}
        target = str(node.target)
        owner = target.rpartition(".")[0]
        # discrete=[module] keeps its output channels: dim 0 of its parameters, 1 of a
        # transposed conv's weight (dim 0 is its input's: pinned, the layer before would
        # be kept too); a rule that knows another - F.embedding's table: 1 - pins that one
        kept = 1 if any(u.target in _CONV_T and u.args[1:2] == (node,) for u in node.users) else 0
        for dim, size in enumerate(self.shape(node)):
            if size > 1:
                lay = self.bound(target, dim)
                if lay is None:
                    fixed = dim == kept and owner in self.discrete_modules
                    g = self.uf.new(size, f"{target}:{dim}", discrete=fixed, anchored=False)
                    lay = (Segment(g),)
                    self.bind(target, dim, lay)
                labels[dim] = lay
                sources[dim] = (target, dim)
        self.labels[node] = labels
        self.sources[node] = sources

    def check(self) -> None:
        """Refuse the first node (in graph order) that needs a continuous group fixed. The
        error also holds, in ``keeps``, the layer that would lift each such refusal (module
        -> reason): ``on_unsupported="keep"`` keeps them all in one more analysis, not one
        per refusal (review helper-245: 40 blocks took 5 s against 1.2 s)."""
        refused = []
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        records = [*self._fixed, *((n, w, gs) for n, w, gs in self._averaged
                                   if len({self.uf.find(g) for g in gs}) > 1)]  # fmt: skip
        for node, what, groups in sorted(records, key=lambda r: order.get(r[0], len(order))):
            # every continuous group of the record (an average over a concat may hold two:
            # naming one left the next conversion to refuse the other)
            roots = dict.fromkeys(self.uf.find(g) for g in groups if self.uf.continuous(g))
            origins = [self.uf.origin[r] for r in roots]
            producers = list(dict.fromkeys(_producer(o, self.modules, self.output_dim)
                                           for o in origins))  # fmt: skip
            if origins:
                refused.append((node, what, origins, producers))
        if not refused:
            return
        keeps: dict[str, str] = {}  # each layer once, by its first refusal, in graph order
        for n, w, _, ps in refused:
            for p in ps:
                if p is not None:
                    keeps.setdefault(p, f"node {n.name!r}: {w}")
        node, what, origins, producers = refused[0]
        producer = None if None in producers else ", ".join(map(repr, producers))
        hint = (
            f"keep its channels fixed with discrete=[{producer}]"
            if producer
            else "keep its channels fixed with discrete=[...] on the layers that produce them"
        )
        which = f"group {origins[0]!r}" if len(origins) == 1 else (
            "groups " + ", ".join(map(repr, origins)))  # fmt: skip
        raise ConversionError(
            f"cannot convert node {node.name!r} ({node.op} {_target_name(node)}): {what}; "
            f"it acts on the continuous channels of {which}. Rewrite it with "
            f"supported ops, or {hint}"
            + (" (convert(..., on_unsupported='keep') keeps every such group at its size)."
               if producer else "."),
            keep=producers[0],
            reason=f"node {node.name!r}: {what}",
            keeps=keeps,
        )  # fmt: skip

    # -- result ----------------------------------------------------------------------------
    def analysis(self) -> Analysis:
        uf = self.uf
        layouts = [b.layout for b in self.bindings]
        layouts += [f.layout for fs in self.size_fields.values() for f in fs]
        roots = sorted({uf.find(s.group) for lay in layouts for s in lay})
        names: set[str] = set()
        groups: list[GroupInfo] = []
        for r in roots:
            name = _group_name(uf.origin[r], self.output_dim)
            while name in names:
                name += "'"
            names.add(name)
            groups.append(GroupInfo(name, uf.size[r], uf.blocks[r], not uf.continuous(r)))
        index = {r: i for i, r in enumerate(roots)}

        def canon(lay: Layout) -> Layout:
            return tuple(Segment(index[uf.find(s.group)], s.inner, s.per_block) for s in lay)

        bindings = [Binding(b.param, b.dim, canon(b.layout), b.reduce) for b in self.bindings]
        for b in bindings:
            for s in b.layout:
                groups[s.group].members.append((b.param, b.dim))
        size_fields = {
            m: [replace(f, layout=canon(f.layout)) for f in fs]
            for m, fs in self.size_fields.items()
        }
        return Analysis(groups, bindings, size_fields)


def segment_entries(uf: UnionFind, s: Segment) -> int:
    """How many entries of its dim segment ``s`` spans."""
    root = uf.find(s.group)
    return uf.size[root] * s.inner // (uf.blocks[root] if s.per_block else 1)


def _entries(uf: UnionFind, lay: Layout) -> int:
    return sum(segment_entries(uf, s) for s in lay)


def _bounds(uf: UnionFind, lay: Layout) -> list[int]:
    """The entry offsets where ``lay``'s segments meet (its inner boundaries)."""
    out, start = [], 0
    for s in lay[:-1]:
        start += segment_entries(uf, s)
        out.append(start)
    return out


_CONV_T = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def _group_name(origin: str, output_dim: dict[str, int]) -> str:
    """A group born at a raw parameter's output dim is named by its module, as a module
    rule names it: ``layers.0.fc1.weight:0`` -> ``layers.0.fc1`` (torch.export graphs and
    functional layers hold parameters, not modules); the output dim is 0 unless a rule said
    otherwise in ``output_dim`` (a transposed conv's ``up.weight:1``)."""
    param, _, dim = origin.rpartition(":")
    for suffix in (".weight", ".in_proj_weight"):
        if param.endswith(suffix) and dim == str(output_dim.get(param, 0)):
            return param.removesuffix(suffix)
    return origin


def _reads_metadata(node: fx.Node, attributes: frozenset[str]) -> bool:
    """``x.shape``, ``x.size(1)``, ``x.dtype``: reads no values."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    return node.op == "call_function" and node.target is getattr and node.args[1] in attributes


def _producer(origin: str, modules: dict, output_dim: dict[str, int]) -> str | None:
    """The module ``discrete=[...]`` names to keep a group of this origin whole: the module
    itself (fx graphs), or the owner of a parameter whose output dim began it (torch.export
    graphs, "conv.weight:0", "emb.weight:1": dim 0 unless a rule said otherwise in
    ``output_dim``). None for any other origin (an op's output, another dim). A part of a
    group a slice cut (``a[0:48]``) is its layer's: keep lifted nothing before, and the
    refusal repeated (review helper-302)."""
    origin = origin.partition("[")[0]
    if origin in modules:
        return origin
    param, _, dim = origin.rpartition(":")
    owner = param.rpartition(".")[0]
    if not owner or owner not in modules:
        return None
    return owner if dim == str(output_dim.get(param, 0)) else None


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _not_stored(module) -> str | None:
    """Why ``module`` cannot be written into an INN's architecture (``graphio``), or None."""
    from runtime.inn.graphio import SpecError, module_kwargs

    try:
        module_kwargs(module)
    except SpecError as exc:
        return str(exc)
    return None


def _no_rule(node: fx.Node, module: object) -> str:
    what = f"module {type(module).__name__}" if module is not None else repr(_target_name(node))
    return f"innfer has no rule for {what}"
