"""Architecture as JSON: an fx graph plus the constructor arguments of its leaf modules.

A converted model is stored without pickle: the traced graph (nodes, targets, arguments) and,
for every leaf module, its ``torch.nn`` class name and constructor keyword arguments. Loading
rebuilds a ``torch.fx.GraphModule`` from that description - only ``torch.nn`` classes and
functions of ``torch``, ``torch.nn.functional``, ``operator``, ``math`` and ATen ops
(``torch.ops.aten``) can be named, so
loading never runs code from the file.

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


class SpecError(ValueError):
    """The architecture description is malformed or names something not allowed."""


def _function_names() -> dict[int, str]:
    table: dict[int, str] = {}
    for prefix, ns in _NAMESPACES.items():
        for attr in dir(ns):
            obj = getattr(ns, attr, None)
            if callable(obj) and not isinstance(obj, type):
                table.setdefault(id(obj), f"{prefix}.{attr}")
    table[id(getattr)] = "builtins.getattr"
    return table


_FUNCTIONS: dict[int, str] | None = None


def _function_name(fn: Any) -> str:
    global _FUNCTIONS
    if isinstance(fn, torch._ops.OpOverload) and fn.namespace == "aten":
        # ATen ops a torch.export graph keeps (mask and position building): stored by name.
        return f"torch.ops.aten.{fn.__name__}"
    if _FUNCTIONS is None:
        _FUNCTIONS = _function_names()
    name = _FUNCTIONS.get(id(fn))
    if name is None:
        raise SpecError(
            f"cannot store a call to {fn!r}: only functions of torch, torch.nn.functional, "
            f"operator and math (and inference identities such as stochastic depth) can be "
            f"stored"
        )
    return name


def _resolve_function(name: str) -> Any:
    if name == "builtins.getattr":
        return getattr
    if name.startswith("torch.ops.aten."):
        packet, _, overload = name.removeprefix("torch.ops.aten.").partition(".")
        try:
            return getattr(getattr(torch.ops.aten, packet), overload)
        except (AttributeError, RuntimeError) as exc:
            raise SpecError(f"unknown ATen op {name!r} in the architecture description") from exc
    prefix, _, attr = name.rpartition(".")
    ns = _NAMESPACES.get(prefix)
    fn = getattr(ns, attr, None) if ns is not None else None
    if fn is None or not callable(fn):
        raise SpecError(f"unknown function {name!r} in the architecture description")
    return fn


def _attention_kwargs(m: nn.MultiheadAttention) -> dict[str, Any]:
    return {
        "embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": m.dropout,
        "bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None,
        "add_zero_attn": m.add_zero_attn, "kdim": m.kdim, "vdim": m.vdim,
        "batch_first": m.batch_first,
    }  # fmt: skip


# Modules whose constructor arguments are not all attributes of the same name.
_KWARG_READERS = {nn.MultiheadAttention: _attention_kwargs}


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
        node = graph.create_node(op, target, tuple(args), kwargs, name=entry["name"])
        env[entry["name"]] = node
    gm = fx.GraphModule(root, graph)
    missing, unexpected = gm.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise SpecError(f"weights do not match the architecture: missing {missing}, "
                        f"unexpected {unexpected}")  # fmt: skip
    return gm.eval()


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
