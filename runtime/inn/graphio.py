"""Architecture as JSON: an fx graph plus the constructor arguments of its leaf modules.

A converted model is stored without pickle: the traced graph (nodes, targets, arguments) and,
for every leaf module, its ``torch.nn`` class name and constructor keyword arguments. Loading
rebuilds a ``torch.fx.GraphModule`` from that description - only ``torch.nn`` classes, the
tensor operations of ``torch`` and ``torch.nn.functional``, ``operator``'s and ``math``'s
arithmetic, ATen ops (``torch.ops.aten``), public ``torch.Tensor`` methods and public
attributes (``getattr(x, "shape")``) can be named, so loading never runs code from the file.
The file is not checksummed (only the weights are): an edited ``inn.json`` must not reach
``torch.load``/``torch.save``, ``operator.attrgetter`` or a dunder attribute (``__class__``
-> ``__globals__`` -> ``exec``) - each is refused with a SpecError.

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    >>> spec = to_spec(gm)
    >>> rebuilt = from_spec(spec, gm.state_dict())
    >>> x = torch.randn(2, 4)
    >>> torch.equal(rebuilt(x), gm(x))
    True
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from runtime.inn.identities import identity_input

SPEC_VERSION = 1

_NAMESPACES = {"torch": torch, "torch.nn.functional": F, "operator": operator, "math": math}
_SKIP_KWARGS = {"device", "dtype"}
_OPS = {"placeholder", "get_attr", "call_function", "call_method", "call_module", "output"}
# torch's tensor operations: its C++ ops (torch._C._VariableFunctions) and torch.functional's.
# Everything else torch defines at its top level is refused: serialisation (load, save),
# global state (set_default_dtype, set_num_threads, use_deterministic_algorithms, seeds),
# compile, cond - a tampered inn.json must not reach them through a sampled model's call.
_TORCH_OPS = frozenset(n for n in dir(torch._C._VariableFunctions) if not n.startswith("_"))
_F_MODULES = {"torch.nn.functional", "torch._C._nn"}
# Callables that call or reach anything given a name, or touch files.
_REFUSED = {
    "operator.attrgetter", "operator.methodcaller", "operator.call", "operator.itemgetter",
    "torch.from_file", "torch.ops.aten.from_file",
}  # fmt: skip
# Private names a traced graph holds: fx turns ``assert`` into torch._assert.
_ALSO_ALLOWED = {"torch._assert"}


class SpecError(ValueError):
    """The architecture description is malformed or names something not allowed."""


def _allowed(prefix: str, attr: str, obj: Any) -> bool:
    """Whether ``prefix.attr`` (``obj``) may be named in an architecture description."""
    name = f"{prefix}.{attr}"
    if name in _ALSO_ALLOWED:
        return True
    if name in _REFUSED or attr.startswith("_") or not callable(obj) or isinstance(obj, type):
        return False
    module = getattr(obj, "__module__", None)
    if prefix == "torch":
        # sym_*: symbolic-size arithmetic (sym_int, sym_max, sym_sqrt ...) export graphs hold
        return attr in _TORCH_OPS or module == "torch.functional" or attr.startswith("sym_")
    if prefix == "torch.nn.functional":
        return module in _F_MODULES or attr in _TORCH_OPS
    return True  # operator, math: arithmetic (the few that reach further are _REFUSED)


def _function_names() -> dict[int, str]:
    table: dict[int, str] = {}
    for prefix, ns in _NAMESPACES.items():
        for attr in dir(ns):
            obj = getattr(ns, attr, None)
            if _allowed(prefix, attr, obj):
                table.setdefault(id(obj), f"{prefix}.{attr}")
    table[id(getattr)] = "builtins.getattr"
    return table


_FUNCTIONS: dict[int, str] | None = None


def _table() -> dict[int, str]:
    """id of every function that may be named -> the name a save gives it (built once)."""
    global _FUNCTIONS
    if _FUNCTIONS is None:
        _FUNCTIONS = _function_names()
    return _FUNCTIONS


def _function_name(fn: Any) -> str:
    if isinstance(fn, torch._ops.OpOverload) and fn.namespace == "aten":
        # ATen ops a torch.export graph keeps (mask and position building): stored by name.
        return f"torch.ops.aten.{fn.__name__}"
    name = _table().get(id(fn))
    if name is None:
        raise SpecError(
            f"cannot store a call to {fn!r}: only tensor operations of torch and "
            f"torch.nn.functional, operator's and math's functions (and inference identities "
            f"such as stochastic depth) can be stored"
        )
    return name


def _resolve_function(name: str) -> Any:
    if name == "builtins.getattr":
        return getattr
    if name in _REFUSED:
        raise SpecError(f"{name!r} cannot be named in an architecture description")
    if name.startswith("torch.ops.aten."):
        packet, _, overload = name.removeprefix("torch.ops.aten.").partition(".")
        try:
            return getattr(getattr(torch.ops.aten, packet), overload)
        except (AttributeError, RuntimeError) as exc:
            raise SpecError(f"unknown ATen op {name!r} in the architecture description") from exc
    prefix, _, attr = name.rpartition(".")
    ns = _NAMESPACES.get(prefix)
    fn = getattr(ns, attr, None) if ns is not None else None
    # An alias of an allowed function also resolves: saves before the allow-list named
    # functions by the first of their names dir() gave (operator.__or__ for operator.or_,
    # torch.nn.functional._threshold for threshold).
    if fn is None or not (
        _allowed(prefix, attr, fn) or _table().get(id(fn)) not in (None, "builtins.getattr")
    ):
        raise SpecError(
            f"unknown function {name!r} in the architecture description (only tensor "
            f"operations of torch and torch.nn.functional, operator and math can be named)"
        )
    return fn


def _check_node(entry: dict[str, Any], args: tuple, spec: dict[str, Any]) -> None:
    """Refuse a node that could reach beyond tensor operations (see the module doc)."""
    op, target, name = entry["op"], entry["target"], entry.get("name")
    if op not in _OPS:
        raise SpecError(f"node {name!r}: unknown op {op!r}")
    if op == "call_method" and not (
        isinstance(target, str) and not target.startswith("_") and hasattr(torch.Tensor, target)
    ):
        raise SpecError(f"node {name!r}: {target!r} is not a public torch.Tensor method")
    if (
        op == "call_function"
        and target == "builtins.getattr"
        and not (len(args) == 2 and isinstance(args[1], str) and not args[1].startswith("_"))
    ):
        raise SpecError(f"node {name!r}: getattr of {args[1:]!r}: only public attributes")
    if op == "get_attr" and target not in spec["attrs"]:
        raise SpecError(f"node {name!r}: get_attr {target!r} is not a stored attribute")
    if op == "call_module" and target not in spec["modules"]:
        raise SpecError(f"node {name!r}: call_module {target!r} is not a stored module")


def _check_path(path: str) -> None:
    if not all(part and not part.startswith("__") for part in path.split(".")):
        raise SpecError(f"module or attribute path {path!r} is not allowed")


def _attention_kwargs(m: nn.MultiheadAttention) -> dict[str, Any]:
    return {
        "embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": m.dropout,
        "bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None,
        "add_zero_attn": m.add_zero_attn, "kdim": m.kdim, "vdim": m.vdim,
        "batch_first": m.batch_first,
    }  # fmt: skip


def _recurrent_kwargs(m: nn.RNNBase) -> dict[str, Any]:
    """nn.LSTM / GRU / RNN: their constructors take ``*args, **kwargs``."""
    kwargs = {
        "input_size": m.input_size, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
        "bias": m.bias, "batch_first": m.batch_first, "dropout": m.dropout,
        "bidirectional": m.bidirectional,
    }  # fmt: skip
    if isinstance(m, nn.LSTM):
        kwargs["proj_size"] = m.proj_size
    if isinstance(m, nn.RNN):
        kwargs["nonlinearity"] = m.nonlinearity
    return kwargs


# Modules whose constructor arguments are not all attributes of the same name (Hardtanh's
# deprecated min_value / max_value aliases are none).
_KWARG_READERS = {
    nn.MultiheadAttention: _attention_kwargs,
    nn.LSTM: _recurrent_kwargs,
    nn.GRU: _recurrent_kwargs,
    nn.RNN: _recurrent_kwargs,
    nn.Hardtanh: lambda m: {"min_val": m.min_val, "max_val": m.max_val},
}


def module_kwargs(mod: nn.Module) -> dict[str, Any]:
    """Constructor kwargs of a ``torch.nn`` leaf module, read back from its attributes."""
    reader = _KWARG_READERS.get(type(mod))
    if reader is not None:
        return {k: _encode(v) for k, v in reader(mod).items()}
    kwargs: dict[str, Any] = {}
    for pname, param in inspect.signature(type(mod).__init__).parameters.items():
        if pname in ("self", *_SKIP_KWARGS) or pname.startswith("_"):
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if pname == "bias":
            kwargs[pname] = getattr(mod, "bias", None) is not None
        elif hasattr(mod, pname):
            kwargs[pname] = _encode(getattr(mod, pname))
        else:
            raise SpecError(f"cannot read constructor argument {pname!r} of {type(mod).__name__}")
    return kwargs


def build_module(type_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Construct ``torch.nn.<type_name>(**kwargs)``; only classes of torch.nn are allowed."""
    cls = getattr(nn, type_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SpecError(f"unknown module type {type_name!r}: only torch.nn classes are allowed")
    try:
        return cls(**{k: _decode(v) for k, v in kwargs.items()})
    except TypeError as exc:
        raise SpecError(f"cannot build {type_name}({kwargs}): {exc}") from exc


def to_spec(gm: fx.GraphModule) -> dict[str, Any]:
    """Describe ``gm`` as JSON-ready data: modules, free parameters/buffers and graph nodes."""
    modules: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    nodes: list[dict[str, Any]] = []
    alias: dict[str, str] = {}  # an inference identity's name -> the node it passes on
    for node in gm.graph.nodes:
        passed = identity_input(node)
        if passed is not None:  # stochastic depth / drop path in eval mode: not stored
            alias[node.name] = alias.get(passed.name, passed.name)
            continue
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if type(mod).__module__.split(".")[0] != "torch":
                raise SpecError(f"node {node.name!r}: module {type(mod).__name__} is not torch.nn")
            modules[node.target] = {"type": type(mod).__name__, "kwargs": module_kwargs(mod)}
            entry["target"] = node.target
        elif node.op == "call_function":
            entry["target"] = _function_name(node.target)
        elif node.op == "get_attr":
            value = _get_attr(gm, node.target)
            is_param = isinstance(value, nn.Parameter)
            attrs[node.target] = {"shape": list(value.shape), "parameter": is_param}
            if value.dtype != torch.float32:  # index tables (timm LeViT's bias indices)
                attrs[node.target]["dtype"] = str(value.dtype).removeprefix("torch.")
            entry["target"] = node.target
        else:
            entry["target"] = node.target
        entry["args"] = _encode(node.args, alias)
        entry["kwargs"] = _encode(node.kwargs, alias)
        nodes.append(entry)
    return {"version": SPEC_VERSION, "modules": modules, "attrs": attrs, "nodes": nodes}


def from_spec(
    spec: dict[str, Any], state: dict[str, torch.Tensor], strict: bool = True
) -> fx.GraphModule:
    """Rebuild the GraphModule described by ``spec`` and load ``state`` into it."""
    if spec.get("version") != SPEC_VERSION:
        raise SpecError(f"architecture version {spec.get('version')!r}, expected {SPEC_VERSION}")
    root = nn.Module()
    for path in [*spec["modules"], *spec["attrs"]]:
        _check_path(path)
    for path, m in spec["modules"].items():
        _set_path(root, path, build_module(m["type"], m["kwargs"]))
    for path, a in spec["attrs"].items():
        dtype = getattr(torch, a.get("dtype", "float32"), None)
        if not isinstance(dtype, torch.dtype):
            raise SpecError(f"unknown dtype {a.get('dtype')!r} of {path!r}")
        t = torch.zeros(a["shape"], dtype=dtype)
        _set_path(root, path, nn.Parameter(t) if a["parameter"] else t, buffer=not a["parameter"])
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in spec["nodes"]:
        op, target = entry["op"], entry["target"]
        if op == "call_function":
            target = _resolve_function(target)
        args = _decode(entry["args"], env)
        kwargs = _decode(entry["kwargs"], env)
        _check_node(entry, tuple(args), spec)
        node = graph.create_node(op, target, tuple(args), kwargs, name=entry["name"])
        env[entry["name"]] = node
    _match_dtypes(root, spec["modules"], state)
    gm = fx.GraphModule(root, graph)
    missing, unexpected = gm.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise SpecError(f"weights do not match the architecture: missing {missing}, "
                        f"unexpected {unexpected}")  # fmt: skip
    return gm.eval()


def _match_dtypes(root: nn.Module, modules: dict[str, Any], state: dict) -> None:
    """Cast each leaf module to the floating dtype its stored weights have: modules are
    built in torch's default (float32), so a float64 or bfloat16 model came back as a mix
    (its free parameters keep their dtype) and failed, or silently became float32."""
    for path in modules:
        dtypes = {
            t.dtype for k, t in state.items()
            if k.rpartition(".")[0] == path and t.is_floating_point()
        }  # fmt: skip
        if len(dtypes) == 1 and (dtype := dtypes.pop()) != torch.get_default_dtype():
            root.get_submodule(path).to(dtype)


def _get_attr(gm: nn.Module, path: str) -> Any:
    obj: Any = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(root: nn.Module, path: str, value: Any, buffer: bool = False) -> None:
    *parents, leaf = path.split(".")
    mod = root
    for part in parents:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if buffer:
        mod.register_buffer(leaf, value)
    else:
        setattr(mod, leaf, value)


def _encode(value: Any, alias: dict[str, str] | None = None) -> Any:
    if isinstance(value, fx.Node):
        return {"node": (alias or {}).get(value.name, value.name)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, alias) for v in value]}
    if isinstance(value, list):
        return [_encode(v, alias) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v, alias) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(v, alias) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.device):  # ATen factory calls of exported graphs
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SpecError(f"cannot store argument {value!r} of type {type(value).__name__}")


def _decode(value: Any, env: dict[str, fx.Node] | None = None) -> Any:
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    if "node" in value:
        if env is None or value["node"] not in env:
            raise SpecError(f"node {value['node']!r} is used before it is defined")
        return env[value["node"]]
    if "tuple" in value:
        return tuple(_decode(v, env) for v in value["tuple"])
    if "dict" in value:
        return {k: _decode(v, env) for k, v in value["dict"].items()}
    if "slice" in value:
        return slice(*(_decode(v, env) for v in value["slice"]))
    if "dtype" in value:
        dtype = getattr(torch, value["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise SpecError(f"unknown dtype {value['dtype']!r}")
        return dtype
    if "ellipsis" in value:
        return Ellipsis
    if "device" in value:
        return torch.device(value["device"])
    if "layout" in value:
        layout = getattr(torch, value["layout"], None)
        if not isinstance(layout, torch.layout):
            raise SpecError(f"unknown layout {value['layout']!r}")
        return layout
    raise SpecError(f"cannot read argument {value!r}")
