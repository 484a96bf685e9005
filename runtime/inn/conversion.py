"""nn.Module -> IntegralModel: trace, find the groups, smooth each group's channel order.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3)).eval()
    >>> inn = convert(net, (torch.randn(1, 1, 8, 8),))
    >>> x = torch.randn(2, 1, 8, 8)
    >>> torch.allclose(inn.sample(1.0)(x), net(x), atol=1e-6)
    True
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import (
    fuse_conv_bn_eval,
    fuse_conv_bn_weights,
    fuse_linear_bn_eval,
    fuse_linear_bn_weights,
)
from tqdm.auto import tqdm

from runtime.inn import graphio
from runtime.inn.capture import Frontend, capture, drop_default_checks, left_out
from runtime.inn.groups import Analysis, ConversionError, GroupInfo, analyse
from runtime.inn.model import IntegralModel
from runtime.inn.modes import evaluating
from runtime.inn.permute import smoothing_order


@torch.no_grad()
def convert(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor,
    *,
    example_kwargs: dict | None = None,
    frontend: Frontend = "auto",
    discrete: Iterable[str] = (),
    on_unsupported: Literal["refuse", "keep"] = "refuse",
    permute: bool = True,
    fold_norms: bool = True,
    seed: int = 0,
    progress: bool | None = None,
) -> IntegralModel:
    """Convert a trained ``model`` into an IntegralModel.

    ``example_inputs``: a tensor or tuple of tensors the model accepts (shapes are traced);
    ``example_kwargs``: keyword inputs (``attention_mask`` of a transformers model).
    ``frontend``: how the graph is captured (``runtime.inn.capture``): ``fx`` (torch.fx,
    keeps ``torch.nn`` modules), ``export`` (torch.export, for models fx cannot trace such as
    Hugging Face transformers) or ``auto`` (fx, then export; export when kwargs are given).
    The converted model takes the inputs positionally, keyword inputs after the positional
    ones in the order the model's ``forward`` names them.
    ``discrete``: names of modules whose output channels must keep their size.
    ``on_unsupported``: what to do where an op innfer cannot resample acts on elastic
    channels (ShuffleNetV2's ``chunk`` of a shuffled stream). ``"refuse"`` raises
    ``ConversionError`` naming the node; ``"keep"`` keeps those channels at their size - as
    ``discrete=[...]`` on the layers that make them - and converts the rest, with a warning
    naming each group kept and why (``inn.info["kept"]``, module -> reason). Pruning tools
    do the same (they leave such layers unpruned). Refusals that fixing channels cannot
    lift (an op that cannot be stored, a size that does not follow the width) still raise.
    ``permute``: reorder each group's channels for smoothness (the function is unchanged).
    ``fold_norms``: fold each BatchNorm into the conv/linear before it (inference statistics).
    Resampling then merges whole affine channels; without data this keeps far more accuracy
    than resampling the conv and the norm statistics apart (measured in bench/conversion.py).
    Pass ``False`` to keep the norms, e.g. to re-estimate their statistics per width.
    ``progress``: a bar over the groups being permuted (the long part on a large model);
    None: shown when stderr is a terminal (tqdm's ``disable=None``).
    The model's input channels and its outputs are always discrete, and so is a group no
    layer reads that a max or min picks among (``logits.max(1)``'s classes). Raises
    ``ConversionError``
    naming the node when the model contains an op innfer cannot resample.
    """
    _check_arguments(model, example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    # Our own copies, and a fresh copy for every run: a model that writes its input in place
    # (``x.sub_(mean)``) changed the caller's tensors, and each later run - the reference,
    # the shape pass, the full-width check - saw other values, refused as "the captured
    # graph does not compute what the model does" (review helper-244).
    example_inputs, example_kwargs = _fresh(tuple(example_inputs)), _fresh(example_kwargs)
    if isinstance(discrete, str):  # one name: as a set it was its characters (review 185)
        discrete = (discrete,)
    if on_unsupported not in ("refuse", "keep"):
        raise ValueError(f"on_unsupported must be 'refuse' or 'keep', not {on_unsupported!r}")
    # module -> why its channels were kept (filled only with on_unsupported="keep")
    kept: dict[str, str] | None = {} if on_unsupported == "keep" else None
    model = _unwrapped(model)
    if isinstance(model, torch.jit.ScriptModule):  # it got advice about control flow
        raise ConversionError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script / trace): pass "
            "the original nn.Module - conversion reads its Python modules and parameters"
        )
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        raise ConversionError(  # it failed deep in the channel ordering (Tensor.item())
            f"{type(model).__name__} has weights on the 'meta' device (shapes, no values): "
            "load its weights first (model.to_empty(device='cpu'), then load_state_dict)"
        )
    with evaluating(model):  # afterwards every module has its own mode back
        _check_batch_norms(model)
        reference = _check_runs(model, _fresh(example_inputs), _fresh(example_kwargs))
        source = _weights_baked(model)  # (``model`` gets its modes back below)
        # Fold first: fuse() traces with fx, and tracing twice can go wrong (timm's LeViT
        # caches a tensor computed in its first traced forward: the second trace sees a
        # proxy of the first). A model fx cannot trace is captured unfolded by torch.export.
        folded = (_fold_norms(source, tuple(example_inputs))
                  if fold_norms and frontend != "export" else None)  # fmt: skip
        gm = capture(folded or source, tuple(example_inputs), example_kwargs, frontend)
        try:
            gm, analysis, did_fold = _analysed(gm, folded, fold_norms, example_inputs,
                                               example_kwargs, discrete, kept)  # fmt: skip
        except ConversionError as exc:
            if "fx_failed" in gm.meta:
                exc.args = (f"{exc} (captured by torch.export: torch.fx could not trace the "
                            f"model: {gm.meta['fx_failed']})",)  # fmt: skip
            # fx keeps a function it was told not to trace (torch.fx.wrap: torchvision's
            # shifted_window_attention) as one call no rule knows; torch.export sees
            # through it. Under "auto" that model is captured again by export.
            leaf = _wrapped_call(gm)
            if frontend != "auto" or gm.meta["frontend"] != "fx" or leaf is None:
                raise
            try:
                gm = capture(source, tuple(example_inputs), example_kwargs, "export")
                if kept is not None:
                    kept.clear()  # what the fx graph needed kept says nothing of this one
                gm, analysis, did_fold = _analysed(gm, None, fold_norms, example_inputs,
                                                   example_kwargs, discrete, kept)  # fmt: skip
            except ConversionError as again:
                raise ConversionError(f"{exc} (torch.fx kept {leaf!r} as one call; captured "
                                      f"by torch.export instead: {again})") from None  # fmt: skip
        captured_by = gm.meta["frontend"]
        inputs = _placeholder_inputs(gm, example_inputs, example_kwargs)
        try:
            spec = graphio.to_spec(gm)
        except graphio.SpecError as exc:  # a leaf innfer cannot rebuild: an internal error
            raise ConversionError(f"{type(model).__name__}: cannot store the captured "
                                  f"graph ({exc})") from exc  # fmt: skip
        state = {k: v.detach().clone() for k, v in _graph_tensors(gm).items()}
    if permute:
        groups = [g for g in analysis.groups if not g.discrete and g.blocks == 1]
        quiet = None if progress is None else not progress  # None: tqdm asks isatty()
        for g in tqdm(groups, desc="permuting", disable=quiet):
            gi = analysis.groups.index(g)
            order = smoothing_order(channel_features(state, analysis, gi), seed=seed)
            apply_order(state, analysis, gi, order)
    if not any(not g.discrete for g in analysis.groups):
        warnings.warn(
            f"{type(model).__name__} converted with no elastic width: every channel group is "
            f"discrete (tied to the model's inputs or outputs, or to ops that keep their "
            f"size), so sample() returns the full model at every width",
            stacklevel=3,  # past torch.no_grad's wrapper: the caller's line
        )
    info = {"source": type(model).__name__, "permuted": permute, "folded_norms": did_fold,
            "frontend": captured_by,
            "seed": seed}  # fmt: skip
    if kept:
        info["kept"] = dict(kept)
        warnings.warn(
            f"{type(model).__name__}: kept {len(kept)} channel group(s) at full size, where "
            "ops innfer cannot resample act on them (on_unsupported='keep'): "
            + "; ".join(f"{m!r} ({why})" for m, why in kept.items()),
            stacklevel=3,  # past torch.no_grad's wrapper: the caller's line
        )
    shape = _sample_shape(example_inputs, example_kwargs)
    if shape is not None:  # what `innfer report` counts FLOPs at without an evaluation set
        info["input_shape"] = shape
    inn = IntegralModel(spec, state, analysis.groups, analysis.bindings, analysis.size_fields, info)
    _check_faithful(inn, _fresh(inputs), reference, type(model).__name__)
    _check_narrow(inn, _fresh(inputs), type(model).__name__)
    return inn


def _check_narrow(inn: IntegralModel, inputs: tuple, name: str) -> None:
    """Run ``inn`` sampled at half width once on the examples: a size the analysis took as
    fixed that changes with the width (one computed from a channel count and other sizes,
    which ``rules.shapes`` leaves as it is) converted without a word and failed at ``innfer
    build``, a RuntimeError deep in the generated forward. Now the conversion is refused,
    naming the node."""
    if all(g.discrete for g in inn.groups):
        return
    seen: list[fx.Node] = []

    class Watch(fx.Interpreter):
        def run_node(self, n: fx.Node):
            seen.append(n)
            return super().run_node(n)

    module = inn.sample(0.5)
    try:
        with torch.no_grad():
            Watch(module).run(*inputs)
    except Exception as exc:
        n = seen[-1] if seen else None
        where = f"node {n.name!r} ({n.op} {_target_name(n)})" if n is not None else "it"
        sources = _size_sources(n) if n is not None else []
        read = f" reads sizes from {', '.join(map(repr, sources))} and" if sources else ""
        raise ConversionError(
            f"{name} converts, but sampled at half width {where}{read} fails: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}. A size there does not "
            "follow the width: compute it from the tensor the node works on, or keep the "
            "channels it reads fixed with discrete=[...] (the layers that make them)"
        ) from exc


def _target_name(n: fx.Node) -> str:
    return getattr(n.target, "__name__", str(n.target))


# Ops through which a size read from a tensor's shape reaches another op's arguments.
_SIZE_OPS = {"getitem", "getattr", "size", "floordiv", "mul", "add", "sub", "truediv", "int"}


def _size_sources(node: fx.Node) -> list[str]:
    """The tensors whose shape ``node``'s non-tensor arguments are computed from (a
    reshape's sizes read off another tensor), by node name."""
    found: list[str] = []
    todo = [a for a in node.all_input_nodes if a is not (node.args[0] if node.args else None)]
    while todo:
        a = todo.pop()
        if _target_name(a) in _SIZE_OPS:
            todo.extend(a.all_input_nodes)
        elif a.op != "get_attr" and a.name not in found:
            found.append(a.name)
    return found


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``nn.DataParallel`` / ``DistributedDataParallel`` (``.module``) and
    ``torch.compile``'s wrapper (``._orig_mod``), said in a warning: common ways a trained
    model is held, refused as "control flow" (their forward takes ``*inputs``, which neither
    capture reads; review helper-262). Its weights are the same tensors."""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            inner = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            inner = model._orig_mod
        else:
            return model
        warnings.warn(
            f"converting the {type(inner).__name__} inside {type(model).__name__} (the "
            "wrapper is not part of the model)",
            stacklevel=3,
        )
        model = inner


def _check_arguments(model: Any, example_inputs: Any) -> None:
    """ConversionError for the usual mistakes, said as such: a state_dict, a class or a
    path instead of a module, no example inputs (they surfaced as AttributeError "'dict'
    object has no attribute 'parameters'" and the like: review 170)."""
    if isinstance(model, Mapping):
        raise ConversionError(
            "convert() takes the model, not its state_dict: build the module, then load it "
            "(model = MyNet(); model.load_state_dict(state_dict)) and pass the module"
        )
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise ConversionError(
            f"convert() takes a model instance, not the class {model.__name__}: pass "
            f"{model.__name__}(...) with its weights loaded"
        )
    if not isinstance(model, nn.Module):
        raise ConversionError(
            f"convert() takes a torch.nn.Module, not {type(model).__name__} (a checkpoint "
            "path? load it first: torch.load, then the module's load_state_dict)"
        )
    if not isinstance(example_inputs, (torch.Tensor, tuple, list)):
        raise ConversionError(
            f"example_inputs must be a tensor or a tuple of tensors the model takes (a batch "
            f"of at least 2 rows, e.g. (torch.randn(2, 3, 224, 224),)), not "
            f"{type(example_inputs).__name__}"
        )


def _sample_shape(args: tuple, kwargs: dict | None) -> list[int] | None:
    """One sample's shape (no batch dim) of a model with a single floating-point input (an
    image, a feature vector); None for token ids or several inputs, whose shapes a FLOPs
    count could not feed from one zero tensor.

    Example:
        >>> _sample_shape((torch.zeros(2, 3, 8, 8),), None)
        [3, 8, 8]
        >>> _sample_shape((torch.zeros(2, 16, dtype=torch.long),), None) is None
        True
    """
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    return list(x.shape[1:]) if x.is_floating_point() and x.dim() >= 1 else None


def _graph_tensors(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors the graph uses: its modules' state and every ``get_attr`` target -
    non-persistent buffers included (transformers' ``position_ids``), unused ones left out
    (an exported BatchNorm's ``num_batches_tracked``)."""
    read = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    tensors = dict([*gm.named_parameters(), *gm.named_buffers()])
    out = {k: v for k, v in gm.state_dict().items() if gm.meta["frontend"] == "fx" or k in read}
    return out | {k: tensors[k] for k in read if k in tensors}


def _weights_baked(model: nn.Module) -> nn.Module:
    """``model``, or a copy whose reparametrized weights (``weight_norm``,
    ``spectral_norm``, any ``torch.nn.utils.parametrize``) are plain tensors again - their
    values at inference. Conversion reads and permutes parameters by name: the generated
    ``weight`` of a ParametrizedLinear is none (``KeyError: 'b.weight'``)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    def hooked(m: nn.Module) -> list:
        return [
            h for h in m._forward_pre_hooks.values() if isinstance(h, WeightNorm | SpectralNorm)
        ]

    if not any(parametrize.is_parametrized(m) or hooked(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for m in list(model.modules()):
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
        for hook in hooked(m):
            if isinstance(hook, WeightNorm):
                torch.nn.utils.remove_weight_norm(m, hook.name)
            else:
                torch.nn.utils.remove_spectral_norm(m, hook.name)
    return model


def _fresh(values):
    """A copy of ``values`` (a tuple or dict of example inputs, or None) whose tensors are
    clones: what a run may write in place."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, values)


def _check_batch_norms(model: nn.Module) -> None:
    """A BatchNorm without running statistics normalises every batch by its own statistics,
    in eval mode too: a served row's answer would depend on the rows batched with it, and
    the ONNX export of its dynamic batch failed at ``innfer build`` with an internal
    AssertionError (review helper-244). Refused here, with what to use instead."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            raise ConversionError(
                f"{name or type(model).__name__} ({type(m).__name__}) has no running "
                "statistics (track_running_stats=False): it normalises each batch by its "
                "own, so an answer would depend on the requests batched with it. Train it "
                "with track_running_stats=True, or use GroupNorm / LayerNorm / InstanceNorm"
            )


def _check_runs(model: nn.Module, args: tuple, kwargs: dict | None):
    """Run ``model`` once on the examples: one it cannot run on (a wrong width, a missing
    input) failed deep in tracing, its reason last in a chain of torch.fx errors
    ("ShapeProp error for: node=%_0 ...")). Returns what it returned."""
    try:
        with torch.no_grad():
            return model(*args, **(kwargs or {}))
    except Exception as exc:
        shapes = ", ".join(str(list(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__
                           for a in (*args, *(kwargs or {}).values()))  # fmt: skip
        raise ConversionError(
            f"{type(model).__name__} does not run on the example inputs ({shapes}): "
            f"{type(exc).__name__}: {str(exc)[:300]}; give inputs the model accepts"
        ) from exc


FAITHFUL_REL_ERR = 1e-3  # folded norms and reordered sums differ by ~1e-6
# ... in float32; in a lower precision this many of its rounding steps (machine epsilons):
# a float16 ResNet-18's folded, reordered sums differ from its own by 1.3e-3, a bfloat16
# one's by 1.2e-2 - rounding, which was refused as a lost in-place write (review 154).
FAITHFUL_EPS = 4


def _analysed(gm, folded, fold_norms: bool, example_inputs, example_kwargs, discrete, kept):
    """The group analysis of a captured graph, and whether its norms are folded: what was
    folded, not what was asked - an exported graph is folded here (fuse() needs fx), a model
    fuse() could not fold keeps its norms. ``kept``: see ``_analysis``."""
    did_fold = folded is not None
    if fold_norms and gm.meta["frontend"] == "export":
        did_fold = fold_graph_norms(gm)
    inputs = _placeholder_inputs(gm, example_inputs, example_kwargs)
    return gm, _analysis(gm, inputs, discrete, kept), did_fold


def _analysis(gm, inputs: tuple, discrete: Iterable[str], kept: dict[str, str] | None):
    """``analyse``; with ``kept`` (a dict, on_unsupported="keep"), the refusals that name
    the module whose channels would lift them add those modules to ``discrete`` and ``kept``
    (their reasons) and analyse again - as a user following the messages would, so every
    analysis is an ordinary one. Ends: each round keeps at least one more module."""
    discrete = set(discrete)
    while True:
        try:
            return analyse(gm, _fresh(inputs), discrete)
        except ConversionError as exc:
            new = {m: why for m, why in exc.keeps.items() if m not in discrete}
            if kept is None or not new:
                raise
            kept.update(new)
            discrete.update(new)


def _wrapped_call(gm) -> str | None:
    """The name of a function outside torch that the fx graph calls as one node (a
    ``torch.fx.wrap``-ed leaf), or None."""
    for node in gm.graph.nodes:
        module = getattr(node.target, "__module__", None) or ""
        if node.op == "call_function" and module.split(".")[0] not in _TRACED_MODULES:
            return getattr(node.target, "__qualname__", str(node.target))
    return None


_TRACED_MODULES = {"torch", "_operator", "operator", "builtins", "math", "runtime"}


def _check_faithful(inn: IntegralModel, inputs: tuple, reference, name: str) -> None:
    """The converted model at full width must compute what ``model`` did on the examples.
    A graph capture can drop a write: torch.fx records ``z += y`` on a view ``z =
    x[:, :8]`` as ``z + y``, a copy, so ``x`` is used unchanged afterwards (ReXNet's
    in-place residual). Once a slice of channels converted, that became a wrong model at
    every width; now it is refused. Compared only where both give the same tensors."""
    from torch.utils._pytree import tree_leaves

    want = [t for t in tree_leaves(reference) if isinstance(t, torch.Tensor)]
    with torch.no_grad():
        got = [t for t in tree_leaves(inn.sample(1.0)(*inputs)) if isinstance(t, torch.Tensor)]
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want, strict=True)):
        return
    for a, b in zip(got, want, strict=True):
        differs = _differs(a, b)
        if differs is not None:
            raise ConversionError(
                f"{name}: the captured graph does not compute what the model does ({differs} "
                f"at full width). The usual cause, an in-place write into a "
                f"view (`z = x[:, :C]; z += y`), is lost by torch.fx, which records it as a "
                f"copy: write it out of place, `x = torch.cat([x[:, :C] + y, x[:, C:]], 1)`"
            )


# Share of a bool / integer output's entries that may differ at full width: a threshold or
# an argmax that rounding (folded norms, reordered sums) tips at a near-tie.
FAITHFUL_FLIPS = 0.01


def _differs(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """How output ``a`` (converted, full width) differs from ``b`` (the model's) beyond
    rounding, in words; None when it does not. Floats: the same inf / NaN entries, then the
    relative error over the finite ones; bools and integers: the share of entries that
    differ. (Outputs holding any inf, and every bool or integer output, were skipped: a
    -inf class mask or a thresholded decision hid a lost write - review helper-244.)"""
    if not b.is_floating_point():
        flips = int((a != b).sum())
        return (
            f"{flips} of {b.numel()} entries differ" if flips > FAITHFUL_FLIPS * b.numel() else None
        )
    tolerance = max(FAITHFUL_REL_ERR, FAITHFUL_EPS * torch.finfo(b.dtype).eps)
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    same_nan = torch.equal(torch.isnan(a), torch.isnan(b))
    if not same_nan or not torch.equal(a[torch.isinf(b)], b[torch.isinf(b)]):
        return "other inf / NaN entries"
    if not finite.any():
        return None
    a, b = a[finite], b[finite]
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    return f"relative error {err:.2g}" if err > tolerance else None


def _placeholder_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict | None) -> tuple:
    """The example inputs in the graph's placeholder order (kwargs matched by name); inputs
    not given are replaced by their defaults in the graph."""
    kwargs, rest, out = dict(kwargs or {}), list(args), []
    for node in gm.graph.find_nodes(op="placeholder"):
        if node.target in kwargs:
            out.append(kwargs.pop(node.target))
        elif rest:
            out.append(rest.pop(0))
        elif node.args:  # an optional argument left out (timm's ``is_causal=False``)
            node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
            gm.graph.erase_node(node)  # baked in: the served graph takes tensors only
        else:
            raise ConversionError(f"no example value for the model input {node.target!r}")
    gm.recompile()
    return tuple(out)


def _fold_norms(model: nn.Module, example_inputs: tuple) -> nn.Module | None:
    """A copy of ``model`` (eval mode) with Conv->BatchNorm pairs folded into one conv, or
    None when torch.fx cannot trace it (norms then stay as they are). Traced as ``capture``
    traces it: arguments after the examples at their defaults."""
    try:
        traced = torch.fx.symbolic_trace(model, concrete_args=left_out(model, example_inputs))
        drop_default_checks(traced)
        return _fold_module_norms(copy.deepcopy(traced))
    except Exception:  # fx cannot trace it (torch.export will) or a pair cannot be folded
        return None


# The layer -> norm pairs folded, by exact type (a subclass may compute otherwise).
_FOLDS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d,
          nn.Linear: nn.BatchNorm1d}  # fmt: skip


def _fold_module_norms(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Fold, in ``gm`` (a copy: its modules are replaced), each inference-mode BatchNorm
    module whose input is a conv's (or linear's) only use into that layer - pair by pair.
    A pair whose layer or norm is shared (called twice, or its tensors also read by the
    graph) is left as it is: folded, every use of the one module would compute with the
    last norm folded in. One shared layer used to leave every norm of the model unfolded,
    which cost 20-45 points of accuracy at 0.75-0.375 width (review helper-284)."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    uses = Counter(n.target for n in graph.nodes if n.op == "call_module")
    uses.update(n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr")
    for bn in list(graph.nodes):
        x = bn.args[0] if bn.op == "call_module" and bn.args else None
        if not (isinstance(x, fx.Node) and x.op == "call_module" and len(x.users) == 1):
            continue
        layer, norm = modules[x.target], modules[bn.target]
        if type(norm) is not _FOLDS.get(type(layer)) or not norm.track_running_stats:
            continue
        if uses[x.target] > 1 or uses[bn.target] > 1:
            continue
        if isinstance(layer, nn.Linear):
            folded = fuse_linear_bn_eval(layer, norm)
        else:
            folded = fuse_conv_bn_eval(layer, norm)
        parent, _, leaf = x.target.rpartition(".")
        setattr(gm.get_submodule(parent), leaf, folded)
        bn.replace_all_uses_with(x)
        graph.erase_node(bn)
    graph.lint()
    gm.recompile()
    return gm


_CONVS = (F.conv1d, F.conv2d, F.conv3d)


def fold_graph_norms(gm: torch.fx.GraphModule) -> bool:
    """``fuse()``'s fold on a captured graph, where norms are ``F.batch_norm`` calls (the
    torch.export path): an inference-mode norm whose input is a conv's (or a linear's, on
    (B, C) rows) only use is folded into that layer's weight and bias, both of them
    parameters read by that layer alone. The tensors are replaced, never written in place
    (they are the source model's). True: the pass ran (whether or not a pair matched)."""
    graph = gm.graph
    for bn in list(graph.find_nodes(op="call_function", target=F.batch_norm)):
        x, mean, var, w, b, training, _, eps = (*bn.args, *(None,) * 8)[:8]
        if training or not isinstance(x, torch.fx.Node) or len(x.users) != 1:
            continue
        linear = x.target is F.linear and getattr(x.meta.get("val"), "ndim", 0) == 2
        if not (x.op == "call_function" and (x.target in _CONVS or linear)):
            continue
        lw, lb = x.args[1], x.args[2] if len(x.args) > 2 else x.kwargs.get("bias")
        if not all(_own_attr(n) for n in (lw, mean, var)):
            continue
        if not all(n is None or _own_attr(n) for n in (lb, w, b)):
            continue
        lw_t, lb_t, mean_t, var_t, w_t, b_t = (
            None if n is None else _get_attr(gm, n.target) for n in (lw, lb, mean, var, w, b)
        )
        if linear:  # fuse_linear_bn_weights wants the norm's affine parameters
            w_t = torch.ones_like(mean_t) if w_t is None else w_t
            b_t = torch.zeros_like(mean_t) if b_t is None else b_t
            fw, fb = fuse_linear_bn_weights(lw_t, lb_t, mean_t, var_t, eps, w_t, b_t)
        else:
            fw, fb = fuse_conv_bn_weights(lw_t, lb_t, mean_t, var_t, eps, w_t, b_t)
        _set_attr(gm, lw.target, fw)
        if lb is None:  # a layer without a bias gets one, read by a new node
            lb_name = _free_name(gm, lw.target.rpartition(".")[0], "bias")
            _set_attr(gm, lb_name, fb)
            with graph.inserting_before(x):
                lb = graph.get_attr(lb_name)
            x.args = (*x.args[:2], lb, *x.args[3:])
            x.kwargs = {k: v for k, v in x.kwargs.items() if k != "bias"}
        else:
            _set_attr(gm, lb.target, fb)
        bn.replace_all_uses_with(x)
        graph.erase_node(bn)
    graph.eliminate_dead_code()
    gm.recompile()
    return True


def _own_attr(node: object) -> bool:
    """A ``get_attr`` node that is the only reader of its tensor, read by one node."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr" or len(node.users) != 1:
        return False
    graph = node.graph
    return sum(1 for n in graph.find_nodes(op="get_attr") if n.target == node.target) == 1


def _get_attr(gm: torch.fx.GraphModule, path: str) -> torch.Tensor:
    owner, _, leaf = path.rpartition(".")
    return getattr(gm.get_submodule(owner), leaf)


def _set_attr(gm: torch.fx.GraphModule, path: str, value: torch.Tensor) -> None:
    owner, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(owner), leaf, nn.Parameter(value.detach()))


def _free_name(gm: torch.fx.GraphModule, owner: str, leaf: str) -> str:
    mod = gm.get_submodule(owner)
    name, i = leaf, 0
    while hasattr(mod, name):
        i += 1
        name = f"{leaf}_{i}"
    return f"{owner}.{name}" if owner else name


def _runs(analysis: Analysis, gi: int):
    """Yield (binding, offset, inner) for every run of group ``gi`` along a bound dim."""
    groups = analysis.groups
    for b in analysis.bindings:
        offset = 0
        for s in b.layout:
            g: GroupInfo = groups[s.group]
            n = g.size // g.blocks if s.per_block else g.size
            if s.group == gi:
                yield b, offset, s.inner
            offset += n * s.inner


def channel_features(state: dict, analysis: Analysis, gi: int) -> torch.Tensor:
    """(m, d): every tensor slice group ``gi`` binds, one row per channel, each normalised."""
    m = analysis.groups[gi].size
    rows = []
    for b, offset, inner in _runs(analysis, gi):
        x = state[b.param].movedim(b.dim, 0)[offset : offset + m * inner]
        x = x.reshape(m, -1).to(torch.float64)
        x = x - x.mean()  # distances are unchanged; their float32 arithmetic is better off
        sd = float(x.std()) if x.numel() > 1 else 0.0
        if not sd > 1e-9 * (1.0 + float(x.abs().max())):
            # A constant tensor (a fresh norm weight of ones, a layer scale) says nothing
            # about the order; divided by its ~0 spread it swamped every other feature.
            continue
        rows.append(x / sd)  # each tensor weighs alike, whatever its scale
    return torch.cat(rows, dim=1) if rows else torch.zeros(m, 1, dtype=torch.float64)


def apply_order(state: dict, analysis: Analysis, gi: int, order: torch.Tensor) -> None:
    """Permute group ``gi``'s channels to ``order`` in every tensor that binds it (in place)."""
    m = len(order)
    for b, offset, inner in _runs(analysis, gi):
        t = state[b.param].movedim(b.dim, 0)  # a view: writing into it writes the tensor
        run = t[offset : offset + m * inner].reshape(m, inner, *t.shape[1:])
        run.copy_(run[order].clone())
