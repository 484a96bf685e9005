"""Reading a call's arguments by position or keyword."""

from __future__ import annotations

from collections.abc import Iterable

from torch import fx


def arg(node: fx.Node, pos: int, name: str, default=None):
    """Argument ``pos`` (or keyword ``name``) of ``node``'s call."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def flat(args: Iterable) -> list:
    out = []
    for a in args:
        if isinstance(a, (tuple, list)):
            out.extend(flat(a))
        else:
            out.append(a)
    return out


def sizes(node: fx.Node) -> list:
    """The size arguments of ``x.view(*sizes)`` / ``x.view(sizes)`` / ``torch.reshape(x, s)``."""
    rest = list(node.args[1:]) or list(node.kwargs.get("shape", node.kwargs.get("size", ())))
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0])
    return rest
