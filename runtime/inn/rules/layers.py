"""Rules for torch.nn layers: conv (and transposed), linear, norms (batch, instance, group,
layer), embedding, flatten, multi-head attention, PReLU, upsampling, and layers that keep
every dim."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx, nn

from runtime.inn.layout import ConversionError, Layout, Segment, SizeField
from runtime.inn.rules import register
from runtime.inn.rules.elementwise import pool, slid_over, softmax_dim
from runtime.inn.rules.shapes import flatten_dims

if TYPE_CHECKING:
    from runtime.inn.tracer import Tracer

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Per-channel norms: each channel is normalised by statistics of its own (a batch's, or one
# sample's for instance norm), so a channel's output does not depend on the others.
_NORM = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)  # fmt: skip
# Modules that keep every dimension's channels where they are.
SAME_LAYOUT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Softplus, nn.Hardtanh, nn.SELU, nn.CELU,
    nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
)  # fmt: skip
# Not here, though per channel: nn.Threshold (ONNX export: "non-zero threshold"
# unsupported) and nn.RMSNorm (no ONNX op before opset 23) - converted, no tier would build.
# Pools, by the number of trailing dims they slide over (``elementwise.slid_over``).
POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
    nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}  # fmt: skip


def _module(tr: Tracer, node: fx.Node) -> tuple[nn.Module, str, fx.Node]:
    return tr.modules[node.target], str(node.target), node.args[0]


@register(modules=_CONV)
def conv(tr: Tracer, node: fx.Node) -> None:
    mod, name, x = _module(tr, node)
    g, c_in, c_out = mod.groups, mod.in_channels, mod.out_channels
    spatial = len(mod.kernel_size)
    cdim = len(tr.shape(x)) - spatial - 1  # 1, or 0 for an unbatched input
    l_in = tr.layout_of(x, cdim)
    fields = [SizeField("in_channels", l_in)]
    if g == 1:
        tr.module_binding(name, "weight", 1, l_in, reduce=True)
        out = tr.new_group(c_out, name)
    elif g == c_in:
        # Depthwise: output channel c*mult+j reads input channel c only, so the output dim
        # is the input's layout with each channel spanning `mult` entries. No sum over
        # channels, so no quadrature scale.
        mult = c_out // c_in
        out = tuple(Segment(s.group, s.inner * mult, s.per_block) for s in l_in)
        fields.append(SizeField("groups", l_in))
    else:
        if len(l_in) != 1 or l_in[0].inner != 1:
            raise ConversionError(
                f"cannot convert node {node.name!r} (call_module Conv at {name!r}): grouped "
                f"Conv ({g} groups) after a concat/flatten has no rule"
            )
        set_blocks(tr, tr.uf.find(l_in[0].group), g, node)
        tr.module_binding(name, "weight", 1, (Segment(l_in[0].group, 1, per_block=True),), True)
        out = tr.new_group(c_out, name)
        set_blocks(tr, tr.uf.find(out[0].group), g, node)
    tr.module_binding(name, "weight", 0, out)
    if mod.bias is not None:
        tr.module_binding(name, "bias", 0, out)
    fields.append(SizeField("out_channels", out))
    tr.size_fields[name] = fields
    same = pointwise(mod.kernel_size, mod.stride, mod.padding)
    tr.labels[node] = {**conv_kept(tr, node, x, spatial, same), cdim: out}


@register(modules=_CONV_T)
def conv_transpose(tr: Tracer, node: fx.Node) -> None:
    """A transposed conv's weight is (in_channels, out_channels / groups, *kernel): the
    input's channels are dim 0 (summed over: the quadrature scale), the output's dim 1.
    Grouped ones have no rule: their channels must stay discrete."""
    mod, name, x = _module(tr, node)
    spatial = len(mod.kernel_size)
    cdim = len(tr.shape(x)) - spatial - 1  # 1, or 0 for an unbatched input
    if mod.groups != 1:
        what = f"a grouped ConvTranspose ({mod.groups} groups) has no rule"
        tr.fixed_inputs(node, what)
        tr.opaque(node, what)
        return
    l_in = tr.layout_of(x, cdim)
    out = _dense(tr, name, mod, l_in, (0, 1), mod.out_channels, ("in_channels", "out_channels"))
    same = pointwise(mod.kernel_size, mod.stride, mod.padding) and not any(mod.output_padding)
    tr.labels[node] = {**conv_kept(tr, node, x, spatial, same), cdim: out}


def pointwise(kernel, stride, padding) -> bool:
    """A 1x1 conv with stride 1 and no padding (``"same"``/``"valid"`` pad nothing then):
    each position maps to itself. ``stride`` / ``padding``: an int or one per dim."""

    def each(v) -> tuple:
        return (v,) if isinstance(v, int) else tuple(v)

    ones = all(k == 1 for k in kernel) and all(s == 1 for s in each(stride))
    return ones and (isinstance(padding, str) or all(p == 0 for p in each(padding)))


def conv_kept(tr: Tracer, node: fx.Node, x: fx.Node, spatial: int, same: bool):
    """The labels of ``x``'s dims a conv's output keeps besides its channels: the batch dim,
    and the spatial dims only for a pointwise conv (a token-mixing ``Conv1d(N, N', 1)`` over
    features keeps them, ``same``); a kernel that slides over channels fixes them
    (``slid_over``)."""
    if same:
        return dict(tr.labels.get(x, {}))
    return slid_over(tr, node, x, spatial, "a conv kernel")


def set_blocks(
    tr: Tracer, root: int, blocks: int, node: fx.Node, what: str = "a grouped Conv"
) -> None:
    """Channels of group ``root`` read or made by a conv of ``blocks`` groups are resampled
    within each block. Two grouped convs with other block counts on the same channels have
    no common blocks: those channels must end discrete (``discrete=[...]`` on the layer
    making them lets the model through; before, it was refused whatever it was given)."""
    have = tr.uf.blocks[root]
    if have > 1 and have != blocks:
        tr.fixed(
            node,
            f"{what} with {blocks} groups reads channels that a grouped conv or group norm "
            f"with {have} groups already splits (each is resampled within its groups, which "
            "must be the same for both)",
            [(Segment(root),)],
        )
        return
    tr.uf.blocks[root] = blocks


@register(modules=(nn.Linear,))
def linear(tr: Tracer, node: fx.Node) -> None:
    mod, name, x = _module(tr, node)
    rank = len(tr.shape(x))
    l_in = tr.layout_of(x, -1)
    out = _dense(tr, name, mod, l_in, (1, 0), mod.out_features, ("in_features", "out_features"))
    tr.labels[node] = {**tr.labels.get(x, {}), rank - 1: out}


def _dense(tr: Tracer, name: str, mod, l_in, dims: tuple[int, int], size: int, fields) -> Layout:
    """Bind a layer whose weight sums the input's channels ``l_in`` along ``dims[0]`` (the
    quadrature scale) and makes ``size`` new channels along ``dims[1]`` (and its bias):
    Linear's weight is (out, in), ConvTranspose's (in, out, ...). Returns the new layout."""
    tr.module_binding(name, "weight", dims[0], l_in, reduce=True)
    out = tr.new_group(size, name)
    tr.module_binding(name, "weight", dims[1], out)
    if mod.bias is not None:
        tr.module_binding(name, "bias", 0, out)
    tr.size_fields[name] = [SizeField(fields[0], l_in), SizeField(fields[1], out)]
    return out


@register(modules=_NORM)
def batch_norm(tr: Tracer, node: fx.Node) -> None:
    mod, name, x = _module(tr, node)
    lay = tr.layout_of(x, 1)
    for p in ("weight", "bias", "running_mean", "running_var"):
        if getattr(mod, p, None) is not None:
            tr.module_binding(name, p, 0, lay)
    tr.size_fields[name] = [SizeField("num_features", lay)]
    tr.copy(node, x, sources=False)


@register(modules=(nn.GroupNorm,))
def group_norm(tr: Tracer, node: fx.Node) -> None:
    """Normalises each of ``num_groups`` runs of consecutive channels together: the channels
    are resampled within each run (a grouped conv's blocks, ``set_blocks``), so every run
    keeps its share of the width and its statistics stay those of its own channels."""
    mod, name, x = _module(tr, node)
    lay = tr.layout_of(x, 1)
    norm_groups(tr, node, lay, mod.num_groups)
    for p in ("weight", "bias"):
        if getattr(mod, p, None) is not None:
            tr.module_binding(name, p, 0, lay)
    tr.size_fields[name] = [SizeField("num_channels", lay)]
    tr.copy(node, x, sources=False)


def norm_groups(tr: Tracer, node: fx.Node, lay, groups) -> None:
    """A group norm's ``groups`` runs of consecutive channels in ``lay`` become blocks its
    channels are resampled within (``set_blocks``); runs a concat or flatten joined, or a
    count computed at run time, keep the channels fixed."""
    if not isinstance(groups, int):
        tr.fixed(node, "group_norm with a computed num_groups", [lay])
    elif groups > 1 and (len(lay) != 1 or lay[0].inner != 1):
        tr.fixed(node, f"group norm ({groups} groups) over channels a concat or flatten "
                 "joined", [lay])  # fmt: skip
    elif groups > 1:  # (review helper-244: a GroupNorm was called "a grouped Conv")
        set_blocks(tr, tr.uf.find(lay[0].group), groups, node, "a GroupNorm")
    else:
        tr.averaged(node, "group norm (1 group)", lay)


@register(modules=(nn.PReLU,))
def prelu(tr: Tracer, node: fx.Node) -> None:
    """One slope per channel (dim 1; dim 0 of an unbatched 1-d input), or one for all."""
    mod, name, x = _module(tr, node)
    if mod.num_parameters > 1:
        lay = tr.layout_of(x, 1 if len(tr.shape(x)) > 1 else 0)
        tr.module_binding(name, "weight", 0, lay)
        tr.size_fields[name] = [SizeField("num_parameters", lay)]
    tr.copy(node, x, sources=False)


@register(modules=(nn.Upsample,))
def upsample_module(tr: Tracer, node: fx.Node) -> None:
    x = node.args[0]
    tr.labels[node] = slid_over(tr, node, x, len(tr.shape(x)) - 2, "upsampling")


@register(modules=(nn.LayerNorm,))
def layer_norm(tr: Tracer, node: fx.Node) -> None:
    mod, name, x = _module(tr, node)
    rank = len(tr.shape(x))
    k = len(mod.normalized_shape)
    fields = []
    for i in range(k):
        lay = tr.layout_of(x, rank - k + i)
        for p in ("weight", "bias"):
            if getattr(mod, p, None) is not None:
                tr.module_binding(name, p, i, lay)
        fields.append(SizeField("normalized_shape", lay, index=i))
        tr.averaged(node, "layer norm", lay)
    tr.size_fields[name] = fields
    tr.copy(node, x, sources=False)


@register(modules=(nn.Flatten,))
def flatten_module(tr: Tracer, node: fx.Node) -> None:
    mod, _, x = _module(tr, node)
    flatten_dims(tr, node, x, mod.start_dim, mod.end_dim)


@register(modules=SAME_LAYOUT_MODULES)
def same_layout_module(tr: Tracer, node: fx.Node) -> None:
    tr.copy(node, node.args[0], sources=False)


@register(modules=tuple(POOL_MODULES))
def pool_module(tr: Tracer, node: fx.Node) -> None:
    mod, _, x = _module(tr, node)
    pool(tr, node, x, next(n for cls, n in POOL_MODULES.items() if isinstance(mod, cls)))


@register(modules=(nn.Softmax, nn.LogSoftmax))
def softmax_module(tr: Tracer, node: fx.Node) -> None:
    mod, _, x = _module(tr, node)
    softmax_dim(tr, node, x, mod.dim)


@register(modules=(nn.Embedding,))
def embedding(tr: Tracer, node: fx.Node) -> None:
    """A lookup table: its dim 1 is the output's channels; the vocabulary stays fixed."""
    mod, name, idx = _module(tr, node)
    out = tr.new_group(mod.embedding_dim, name)
    tr.module_binding(name, "weight", 1, out)
    tr.size_fields[name] = [SizeField("embedding_dim", out)]
    rank = len(tr.shape(node))
    tr.labels[node] = {**tr.labels.get(idx, {}), rank - 1: out}


@register(modules=(nn.MultiheadAttention,))
def multihead_attention(tr: Tracer, node: fx.Node) -> None:
    """torch's fused attention block: query, key, value and output share ``embed_dim``, split
    into heads inside the module. That width is tied across all four and pinned discrete (an
    exact conversion, never a refusal): the module's heads cannot be resampled from outside.
    The blocks around it (MLP hidden widths) stay elastic - torchvision's ViT converts so.
    With ``kdim`` / ``vdim`` other than ``embed_dim`` (cross-attention on a memory of another
    width) key and value are projected by their own weights: their channels are not the
    query's, so each input keeps its own width, pinned discrete as well."""
    mod, name, q = _module(tr, node)
    k = node.args[1] if len(node.args) > 1 else node.kwargs.get("key", q)
    v = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", k)
    lay = tr.layout_of(q, -1)
    if mod._qkv_same_embed_dim:
        for other in (k, v):
            if other is not q and isinstance(other, fx.Node):
                tr.unify(tr.layout_of(other, -1), lay, f"node {node.name!r}")
        tr.module_binding(name, "in_proj_weight", 1, lay)
    else:
        for pname, t in (("q_proj_weight", q), ("k_proj_weight", k), ("v_proj_weight", v)):
            if isinstance(t, fx.Node):
                lt = tr.layout_of(t, -1)
                tr.module_binding(name, pname, 1, lt)
                for s in lt:
                    tr.uf.pin(s.group)
    tr.module_binding(f"{name}.out_proj", "weight", 0, lay)
    if mod.out_proj.bias is not None:
        tr.module_binding(f"{name}.out_proj", "bias", 0, lay)
    for s in lay:  # pinned, not refused: this rule knows the width cannot follow
        tr.uf.pin(s.group)
    out = {**tr.labels.get(q, {}), len(tr.shape(q)) - 1: lay}
    tr.items[node] = [out, {}]
