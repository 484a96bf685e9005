"""Rules for functional layers that use the model's own parameters: ``F.linear``,
``F.conv1d/2d/3d`` and ``F.conv_transpose1d/2d/3d`` (every conv of a CNN captured by
torch.export), ``F.layer_norm`` (timm / torchvision ``LayerNorm2d``: permute -> layer_norm ->
permute), ``F.batch_norm`` (timm ``BatchNormAct2d``, and every BatchNorm captured by
torch.export), ``F.instance_norm`` and ``F.group_norm`` (timm's ``GroupNorm`` /
``GroupNorm1``: resnet50_gn, PoolFormer).

The parameters reach the call as ``get_attr`` nodes (possibly through shape ops), whose dims
already carry bound groups; the rule ties those dims to the input's channels. A literal
``normalized_shape`` becomes a size field of the node, rewritten when sampling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import fx

from runtime.inn.layout import ConversionError, Layout, Segment, SizeField, node_key
from runtime.inn.rules import register
from runtime.inn.rules._args import arg
from runtime.inn.rules.layers import conv_kept, norm_groups, pointwise, set_blocks

if TYPE_CHECKING:
    from runtime.inn.tracer import Tracer


@register(functions=(F.layer_norm,))
def layer_norm(tr: Tracer, node: fx.Node) -> None:
    x = node.args[0]
    rank = len(tr.shape(x))
    shape = arg(node, 1, "normalized_shape")
    where = "1" if len(node.args) > 1 else "normalized_shape"
    items = list(shape) if isinstance(shape, (tuple, list)) else [shape]
    k = len(items)
    params = [p for p in (arg(node, 2, "weight"), arg(node, 3, "bias")) if p is not None]
    fields = []
    for i in range(k):
        lay = tr.layout_of(x, rank - k + i)
        for p in params:
            if isinstance(p, fx.Node) and tr.shape(p)[i] > 1:
                tr.unify(tr.layout_of(p, i), lay, f"node {node.name!r}")
        if isinstance(items[i], int):  # a literal size; a node (x.shape[-1]) follows anyway
            index = i if isinstance(shape, (tuple, list)) else None
            fields.append(SizeField(where, lay, index))
        tr.averaged(node, "layer norm", lay)
    if fields:
        tr.size_fields[node_key(node.name)] = fields
    tr.copy(node, x, sources=False)


@register(functions=(F.batch_norm,))
def batch_norm(tr: Tracer, node: fx.Node) -> None:
    x = node.args[0]
    if arg(node, 5, "training", False) and _reads_an_input(x):
        # batch statistics at inference: a served row's answer would depend on the rows
        # batched with it, and a dynamic batch does not export (review helper-245; the
        # module form is refused in conversion._check_batch_norms). On a weight (timm's
        # StdConv: F.batch_norm of the kernel) it is a plain standardisation: allowed.
        raise ConversionError(
            f"node {node.name!r} (F.batch_norm with training=True) normalises each batch by "
            "its own statistics at inference, so an answer would depend on the requests "
            "batched with it: pass running statistics and training=False, or use "
            "F.group_norm / F.layer_norm / F.instance_norm"
        )
    lay = tr.layout_of(x, 1)
    names = ("running_mean", "running_var", "weight", "bias")
    for pos, name in enumerate(names, start=1):
        p = arg(node, pos, name)
        if isinstance(p, fx.Node) and tr.shape(p) and tr.shape(p)[0] > 1:
            tr.unify(tr.layout_of(p, 0), lay, f"node {node.name!r}")
    tr.copy(node, x, sources=False)


@register(functions=(F.instance_norm,))
def instance_norm(tr: Tracer, node: fx.Node) -> None:
    """``F.instance_norm(x, running_mean, running_var, weight, bias, ...)`` (every
    InstanceNorm captured by torch.export): per channel, as the module rule - each channel
    normalised by its own statistics, the parameters tied to the channels."""
    x = node.args[0]
    lay = tr.layout_of(x, 1)
    for pos, name in enumerate(("running_mean", "running_var", "weight", "bias"), start=1):
        p = arg(node, pos, name)
        if isinstance(p, fx.Node) and tr.shape(p) and tr.shape(p)[0] > 1:
            tr.unify(tr.layout_of(p, 0), lay, f"node {node.name!r}")
    tr.copy(node, x, sources=False)


@register(functions=(F.group_norm,))
def group_norm(tr: Tracer, node: fx.Node) -> None:
    """``F.group_norm(x, num_groups, weight, bias)``: as ``nn.GroupNorm`` (layers.group_norm),
    its channels resampled within each group, the parameters tied to them."""
    x = node.args[0]
    lay = tr.layout_of(x, 1)
    norm_groups(tr, node, lay, arg(node, 1, "num_groups"))
    for pos, name in ((2, "weight"), (3, "bias")):
        p = arg(node, pos, name)
        if isinstance(p, fx.Node) and tr.shape(p) and tr.shape(p)[0] > 1:
            tr.unify(tr.layout_of(p, 0), lay, f"node {node.name!r}")
    tr.copy(node, x, sources=False)


def _reads_an_input(node) -> bool:
    """Whether ``node``'s value depends on a model input (an activation, not a weight)."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        todo.extend(n.all_input_nodes)
    return False


def _summed_into(tr: Tracer, node: fx.Node, x, w: fx.Node, what: str, dims=(1, 0)):
    """W's dim ``dims[0]`` sums over the input channels ``x`` (a layout): it gets the
    quadrature scale, so it must be a parameter's own dim (else the channels are fixed); W's
    dim ``dims[1]`` is a layer output (a continuous group), returned as the output's layout.
    (1, 0): a linear's or conv's (out, in, ...) weight; (0, 1): a transposed conv's."""
    summed, made = dims
    if tr.shape(w)[summed] > 1:
        tr.unify(tr.layout_of(w, summed), x, f"node {node.name!r}")
        source = tr.sources.get(w, {}).get(summed)
        if source is not None:
            tr.mark_reduce(source, node)
        else:
            tr.fixed(node, f"{what} with a computed weight (not a parameter)", [x])
    out = tr.layout_of(w, made)
    for s in out:
        tr.uf.anchor(s.group)
    return out


@register(functions=(F.linear,))
def linear(tr: Tracer, node: fx.Node) -> None:
    """y = x W^T + b: W's dim 1 sums over x's last dim (it gets the quadrature scale, so it
    must be a parameter's own dim); W's dim 0 is a layer output (a continuous group)."""
    x, w, b = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
    rank = len(tr.shape(x))
    l_in = tr.layout_of(x, -1)
    out = _summed_into(tr, node, x=l_in, w=w, what="F.linear")
    if isinstance(b, fx.Node) and tr.shape(b) and tr.shape(b)[0] > 1:
        tr.unify(tr.layout_of(b, 0), out, f"node {node.name!r}")
    tr.labels[node] = {**tr.labels.get(x, {}), rank - 1: out}


@register(functions=(F.conv1d, F.conv2d, F.conv3d))
def conv(tr: Tracer, node: fx.Node) -> None:
    """The conv module rule (``rules.layers.conv``) on a call with the weight as an argument:
    ``groups=1`` sums over the input channels (W's dim 1, the quadrature side) and W's dim 0
    is a layer output; depthwise (``groups`` = input channels) keeps the input's layout, each
    channel spanning ``C_out / C_in`` outputs, and ``groups`` becomes a size field. Other
    grouped convs resample each of their ``groups`` blocks alike (``_grouped``)."""
    x, w, b = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
    groups = arg(node, 6, "groups", 1)
    where = f"node {node.name!r}"
    kernel = tr.shape(w)[2:]
    spatial = len(kernel)
    cdim = len(tr.shape(x)) - spatial - 1  # 1, or 0 for an unbatched input
    c_in = tr.shape(x)[cdim]
    l_in = tr.layout_of(x, cdim)
    if groups == 1:
        out = _summed_into(tr, node, x=l_in, w=w, what="a conv")
    elif groups == c_in:
        mult = tr.shape(w)[0] // c_in
        spread = tuple(Segment(s.group, s.inner * mult, s.per_block) for s in l_in)
        out = tr.unify(tr.layout_of(w, 0), spread, where)
        key = "6" if len(node.args) > 6 else "groups"
        tr.size_fields[node_key(node.name)] = [SizeField(key, l_in)]
    else:
        out = _grouped(tr, node, w, groups, l_in)
    if isinstance(b, fx.Node) and tr.shape(b) and tr.shape(b)[0] > 1:
        tr.unify(tr.layout_of(b, 0), out, where)
    same = pointwise(kernel, arg(node, 3, "stride", 1), arg(node, 4, "padding", 0))
    tr.labels[node] = {**conv_kept(tr, node, x, spatial, same), cdim: out}


@register(functions=(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d))
def conv_transpose(tr: Tracer, node: fx.Node) -> None:
    """The transposed conv module rule (``rules.layers.conv_transpose``) on a call with the
    weight as an argument (every one torch.export captures): W is (C_in, C_out, *kernel),
    dim 0 sums over the input channels (the quadrature side), dim 1 is a layer output.
    Grouped ones have no rule: their channels must stay discrete."""
    x, w, b = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
    groups = arg(node, 6, "groups", 1)
    kernel = tr.shape(w)[2:]
    spatial = len(kernel)
    cdim = len(tr.shape(x)) - spatial - 1  # 1, or 0 for an unbatched input
    if groups != 1:
        what = f"a grouped transposed conv ({groups} groups) has no rule"
        tr.fixed_inputs(node, what)
        tr.opaque(node, what)
        return
    l_in = tr.layout_of(x, cdim)
    out = _summed_into(tr, node, x=l_in, w=w, what="a transposed conv", dims=(0, 1))
    source = tr.sources.get(w, {}).get(1)
    if source is not None:  # its output channels: its name, what discrete=[owner] keeps
        tr.output_dim[source[0]] = 1  # (pinned there by Tracer.visit_get_attr)
    if isinstance(b, fx.Node) and tr.shape(b) and tr.shape(b)[0] > 1:
        tr.unify(tr.layout_of(b, 0), out, f"node {node.name!r}")
    extra = arg(node, 5, "output_padding", 0)
    extra = (extra,) if isinstance(extra, int) else tuple(extra)
    same = pointwise(kernel, arg(node, 3, "stride", 1), arg(node, 4, "padding", 0))
    tr.labels[node] = {**conv_kept(tr, node, x, spatial, same and not any(extra)), cdim: out}


def _grouped(tr: Tracer, node: fx.Node, w: fx.Node, groups: int, l_in: Layout) -> Layout:
    """A conv of ``groups`` blocks: as the module rule, W's dim 1 is one block of the input's
    channels and both sides get ``groups`` blocks. Where W's dim 1 cannot be re-declared so
    (a weight read twice or computed, an input after a concat) both sides are pinned discrete:
    exact, but not elastic there."""
    block = (Segment(l_in[0].group, 1, per_block=True),)
    plain = len(l_in) == 1 and l_in[0].inner == 1 and tr.shape(w)[1] > 1
    if plain and tr.rebind(w, 1, block, reduce=True):
        set_blocks(tr, tr.uf.find(l_in[0].group), groups, node)
        out = tr.layout_of(w, 0)
        for s in out:
            tr.uf.anchor(s.group)
        set_blocks(tr, tr.uf.find(out[0].group), groups, node)
        return out
    out = tr.layout_of(w, 0)
    for s in (*l_in, *out):
        tr.uf.pin(s.group)
    return out


@register(functions=(F.embedding,))
def embedding(tr: Tracer, node: fx.Node) -> None:
    """out[..., d] = W[idx, d]: the table's dim 1 is the output's channels (a layer output);
    its rows (the vocabulary) are indexed, never resampled."""
    idx, w = node.args[0], arg(node, 1, "weight")
    if tr.sources.get(w, {}).get(1) is None:
        tr.fixed(node, "F.embedding with a computed table (not a parameter)", [tr.layout_of(w, 1)])
    out = tr.layout_of(w, 1)
    for s in out:
        tr.uf.anchor(s.group)
    source = tr.sources.get(w, {}).get(1)
    if source is not None:  # (torch.export's embeddings: review helper-245)
        tr.output_dim[source[0]] = 1
        if source[0].rpartition(".")[0] in tr.discrete_modules:
            for s in out:  # discrete=["emb"] keeps the table's width, as under fx
                tr.uf.pin(s.group)
    rank = len(tr.shape(node))
    tr.labels[node] = {**tr.labels.get(idx, {}), rank - 1: out}
