"""Ops that are the identity at inference: stochastic depth and drop-path calls.

``torchvision.ops.stochastic_depth`` (what ``torchvision.ops.StochasticDepth`` calls; torch.fx
keeps it as one call because torchvision wraps it) returns its input unless training. timm's
``DropPath`` traces to nothing in eval mode, but its functional ``drop_path`` may be wrapped
the same way. The tracer treats such a call as its input, and ``graphio`` stores it as such
(the node is dropped and its users read the input), so no non-torch name reaches a file.
"""

from __future__ import annotations

from torch import fx

# (module prefix, function name, position and keyword of the `training` flag, of `p`)
_KNOWN = {
    ("torchvision.ops", "stochastic_depth"): ((3, "training"), (1, "p")),
    ("timm.layers", "drop_path"): ((2, "training"), (1, "drop_prob")),
    ("timm.models.layers", "drop_path"): ((2, "training"), (1, "drop_prob")),
}


def identity_input(node: fx.Node) -> fx.Node | None:
    """The input ``node`` passes through unchanged at inference, or None if it is no such op.

    Only when the call is known *and* its ``training`` flag is the literal False (the model
    was traced in eval mode) or its drop probability is the literal 0.
    """
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    fn = node.target
    module, name = getattr(fn, "__module__", "") or "", getattr(fn, "__name__", "")
    for (prefix, known), ((t_pos, t_kw), (p_pos, p_kw)) in _KNOWN.items():
        if name == known and (module == prefix or module.startswith(prefix + ".")):
            training = _arg(node, t_pos, t_kw, True)
            p = _arg(node, p_pos, p_kw, None)
            if training is False or (isinstance(p, (int, float)) and p == 0):
                return node.args[0]
    return None


def _arg(node: fx.Node, pos: int, name: str, default):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)
