"""Per-op rules of the group analysis, one concept per module.

A rule is ``rule(tracer, node)``: it labels ``node``'s dims from its inputs' (see
``runtime.inn.tracer``), ties dims that must hold the same channels, binds parameters and
records dims it cannot follow as ``fixed``. ``lookup`` finds the rule for a node; a node
without one has every input dim fixed (refused at the end if any of them is continuous).

Modules: ``layers`` (torch.nn layers), ``functional`` (F.linear / F.layer_norm /
F.batch_norm with the model's own parameters), ``elementwise`` (unary ops, broadcasting
binary ops, concat, reductions), ``shapes`` (view/reshape/expand/permute/transpose),
``indexing`` (getitem, split/chunk/unbind, GLU), ``attention`` (matmul of two activations,
scaled_dot_product_attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import fx, nn

if TYPE_CHECKING:
    from runtime.inn.tracer import Tracer

Rule = Callable[["Tracer", fx.Node], None]

_FUNCTIONS: dict[int, Rule] = {}
_METHODS: dict[str, Rule] = {}
_MODULES: list[tuple[type, Rule]] = []
_SPECIAL: list[tuple[Callable[[fx.Node], bool], Rule]] = []


def register(
    *, functions=(), methods=(), modules=(), when: Callable[[fx.Node], bool] | None = None
):
    """Decorator: ``rule`` handles these functions, method names, module classes, or any
    node for which ``when(node)`` is true."""

    def deco(rule: Rule) -> Rule:
        for f in functions:
            _FUNCTIONS[id(f)] = rule
        for m in methods:
            _METHODS[m] = rule
        for cls in modules:
            _MODULES.append((cls, rule))
        if when is not None:
            _SPECIAL.append((when, rule))
        return rule

    return deco


def lookup(node: fx.Node, module: nn.Module | None) -> Rule | None:
    if node.op == "call_module":
        return next((r for cls, r in _MODULES if isinstance(module, cls)), None)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op == "call_function":
        rule = _FUNCTIONS.get(id(node.target))
        if rule is not None:
            return rule
        return next((r for when, r in _SPECIAL if when(node)), None)
    return None


from runtime.inn.rules import (  # noqa: E402  (the modules register their rules on import)
    attention,
    elementwise,
    functional,
    indexing,
    layers,
    shapes,
)

__all__ = ["Rule", "attention", "elementwise", "functional", "indexing", "layers", "lookup",
           "register", "shapes"]  # fmt: skip
