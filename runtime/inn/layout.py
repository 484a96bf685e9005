"""The data a group analysis produces: layouts, bindings, size fields, groups.

A *layout* describes what one tensor dimension carries: the concatenation of segments, each
naming a group (a union-find set of tied channel dims) and how many consecutive entries each
of its channels spans (``inner``, e.g. the H*W features a channel becomes after ``flatten``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConversionError(ValueError):
    """A model cannot be converted; the message names the node and what to change.

    ``keep``: the module whose output channels, kept at their size (``discrete=[keep]``),
    would lift this refusal - set where the refusal is an op that cannot follow continuous
    channels, None for every other error. ``reason``: that op and why, in a few words.
    ``keeps``: every such layer of the analysis's refusals (module -> reason), this one's
    first."""

    def __init__(
        self, message: str, *, keep: str | None = None, reason: str = "",
        keeps: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.keep = keep
        self.reason = reason
        self.keeps = keeps if keeps is not None else ({keep: reason} if keep else {})


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
    Fields of a graph node's call arguments (``F.layer_norm``'s normalized_shape) are kept
    under the key ``node_key(name)``; their ``kwarg`` is the argument's position ("1") or
    keyword name. ``slot`` sets a bound of a slice there (0 start, 1 stop): ``x[:, 0:27]``
    over channels cut into groups, whose bounds follow the sampled groups before them.
    """

    kwarg: str
    layout: Layout
    index: int | None = None
    slot: int | None = None


NODE_PREFIX = "node:"  # module paths never contain ":" (nn.Module attribute names)


def node_key(name: str) -> str:
    """The ``size_fields`` key of graph node ``name``'s call arguments."""
    return f"{NODE_PREFIX}{name}"


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
