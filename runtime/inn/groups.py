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
    to them, and every group no layer reads (sums over) that a max or min picks among (a
    class dim returned as ``logits.max(1)``: resampled, classes would merge; a mean over
    channels does not depend on their count and stays elastic);
  * every dim of a raw parameter is bound to a group from the start and followed through
    shape ops, so a parameter tied to channels is always resampled with them;
  * an op the rules do not know, or a rule that cannot follow a dim, fixes that dim: if it
    ends continuous, conversion fails naming the node - never a silently wrong model.

Where things live: ``layout`` (the data), ``unionfind``, ``tracer`` (the walk and the final
check), ``rules/`` (one module per family of ops). Adding an architecture (attention heads,
say) means adding rules there, not a rewrite.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from runtime.inn.layout import (
    Analysis,
    Binding,
    ConversionError,
    GroupInfo,
    Layout,
    Segment,
    SizeField,
    node_key,
)
from runtime.inn.tracer import Tracer

__all__ = ["Analysis", "Binding", "ConversionError", "GroupInfo", "Layout", "Segment",
           "SizeField", "analyse", "node_key", "trace"]  # fmt: skip


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
        >>> import torch
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
    return Tracer(gm, discrete).run()
