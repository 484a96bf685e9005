"""Sampled tier -> ONNX (TorchScript exporter, dynamic batch axis), checked by onnx.checker.

The TorchScript exporter (``dynamo=False``) is used on purpose: torch 2.13's default
exporter needs onnxscript and is much slower for these small graphs.

Example:
    >>> spec = [("input", (1, 28, 28), torch.float32)]
    >>> data = export_onnx(inn.sample(0.5), spec, ["logits"])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from safetensors.torch import save as save_safetensors
from torch import nn

from runtime.atomic import write_bytes
from runtime.engines.torch import MODULE_SPEC, MODULE_WEIGHTS, spec_digest
from runtime.inn import graphio
from runtime.repository.config import ModelConfig
from runtime.repository.records import Rows, merge_rows

OPSET = 17
# One ONNX file holds at most 2 GiB (protobuf's limit); larger models need their weights in
# external data files, which innfer's tiers, hashes and engine builds do not handle yet.
MAX_ONNX_BYTES = 2**31 - 2**24  # 16 MiB left for the graph itself
INTEGER_DTYPES = ("int64", "int32", "uint8")  # model.yaml dtypes an id may arrive in


def export_onnx(
    module: nn.Module,
    inputs: Sequence[tuple[str, Sequence[int], torch.dtype]],
    output_names: Sequence[str],
    opset: int = OPSET,
) -> bytes:
    """Export ``module`` with a dynamic batch axis on every input and output, and a dynamic
    ``sequence`` axis wherever an input's per-sample shape has -1.

    ``inputs``: (name, per-sample shape, dtype) for each model input, in call order.
    Returns the serialized ONNX model after ``onnx.checker.check_model`` passes.
    """
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    if weights > MAX_ONNX_BYTES:
        raise ValueError(
            f"this tier's weights take {weights / 2**30:.2f} GiB, over the 2 GiB one ONNX file "
            "holds; innfer does not write ONNX external data yet: serve narrower tiers "
            "(a smaller width in model.yaml) or a smaller model"
        )
    # Example sizes that no fixed dim is likely to equal, so the tracer cannot confuse a
    # dynamic axis with a constant one (2 rows, 7 tokens).
    example = tuple(
        torch.zeros((2, *(7 if d == -1 else d for d in shape)), dtype=dtype)
        for _, shape, dtype in inputs
    )
    names = [name for name, _, _ in inputs]
    _check_shape_arithmetic(module, inputs)
    _check_attention_lengths(module, inputs)
    _check_pool_windows(module, inputs)
    dynamic = {n: {0: "batch"} for n in [*names, *output_names]}
    for name, shape, _ in inputs:
        dynamic[name].update({1 + i: "sequence" for i, d in enumerate(shape) if d == -1})
    buf = io.BytesIO()
    module = module.eval()
    with (
        torch.no_grad(),
        warnings.catch_warnings(),
        exportable_attention(),
        traceable_shape_arithmetic(),
    ):
        warnings.simplefilter("ignore")  # exporter deprecation chatter, not actionable here
        try:
            torch.onnx.export(
                module,
                example,
                buf,
                input_names=names,
                output_names=list(output_names),
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except torch.onnx.errors.OnnxExporterError as exc:
            if (why := _adaptive_pool_misfit(module, example, inputs)) is not None:
                raise ValueError(why) from exc
            raise
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


def check_io(module: nn.Module, inputs: list, config: ModelConfig) -> None:
    """Run ``module`` once on model.yaml's inputs (a batch of 2) and compare what it returns
    with model.yaml's outputs; a mismatch is a ValueError naming the fields to correct (the
    exporter's own error was torch's, e.g. "mat1 and mat2 shapes cannot be multiplied")."""
    _check_input_order(module, [name for name, _, _ in inputs])
    said = ", ".join(f"{name}: {dt} {list(shape)}" for name, shape, dt in inputs)
    said = said.replace("torch.", "")
    example = tuple(
        torch.zeros((2, *(7 if d == -1 else d for d in shape)), dtype=dtype)
        for _, shape, dtype in inputs
    )
    try:
        with torch.no_grad():
            out = module.eval()(*example)
    except Exception as exc:  # torch's own message says what the layer wanted
        weights = {p.dtype for p in module.parameters() if p.is_floating_point()}
        if weights and not weights & {torch.float32, torch.float16}:  # model.yaml cannot say
            dtype = min(str(d).removeprefix("torch.") for d in weights)
            raise ValueError(  # float64: "do dtypes match?" was a dead end (review 154)
                f"the model's weights are {dtype}, and innfer "
                "serves float32 or float16 inputs: convert the model in float32 "
                "(model.float() before runtime.convert) and save that INN"
            ) from None
        raise ValueError(
            f"the model does not run on model.yaml's inputs ({said} per row): {exc}; "
            f"do inputs[].shape and dtype match the model? (or was it captured with a "
            f"batch-1 example that fixed the batch? capture it with batch >= 2)"
        ) from None
    if isinstance(out, Mapping):  # its "shape" was [] - advice no shape could follow
        raise ValueError(
            f"the model returns a dict (keys {', '.join(map(repr, out))}); return a tuple of "
            "tensors instead (wrap it: forward returns tuple(out[k] for k in names)), in the "
            "order of model.yaml's outputs"
        )
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if len(outs) != len(config.outputs):
        raise ValueError(
            f"the model returns {len(outs)} output(s), model.yaml's outputs list "
            f"{len(config.outputs)}: list one entry per output, in order"
        )
    for i, (spec, got) in enumerate(zip(config.outputs, outs, strict=True)):
        if not isinstance(got, torch.Tensor):  # (None: "returns [] per row", dtype "")
            raise ValueError(
                f"model.yaml outputs[{i}] {spec.name!r}: the model returns "
                f"{type(got).__name__} there, not a tensor; return tensors only, one per "
                "model.yaml output"
            )
        shape = list(got.shape)[1:]
        fits = len(shape) == len(spec.shape) and all(
            w in (-1, g) for w, g in zip(spec.shape, shape, strict=True)
        )
        if not fits:
            raise ValueError(
                f"model.yaml outputs[{i}] {spec.name!r} has shape {list(spec.shape)} per row; "
                f"the model returns {shape} per row (for model.yaml's inputs): correct "
                f"outputs[{i}].shape"
            )
        dtype = str(getattr(got, "dtype", "")).removeprefix("torch.")
        if dtype != spec.dtype:  # else every answer is cast: float logits as int64 zeros
            raise ValueError(
                f"model.yaml outputs[{i}] {spec.name!r} is {spec.dtype}; the model returns "
                f"{dtype}: correct outputs[{i}].dtype"
            )


def _check_input_order(module: nn.Module, names: list[str]) -> None:
    """model.yaml's inputs bind to the model's arguments by position; where one is named as
    another argument of the model, the order is wrong and every answer would be computed
    on swapped inputs (``forward(query, doc)`` with inputs listed doc, query)."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return
    args = [str(n.target) for n in graph.nodes if n.op == "placeholder"]
    for i, name in enumerate(names):
        if i < len(args) and name != args[i] and name in args:
            raise ValueError(
                f"model.yaml inputs[{i}] is {name!r}, but the model takes {name!r} as "
                f"argument {args.index(name)} of ({', '.join(args)}): list the inputs in "
                "the order of the model's arguments (they bind by position)"
            )


def write_tier_files(d: Path, module: nn.Module, config: ModelConfig) -> bytes:
    """Export ``module`` to ``d/model.onnx`` and save it for the torch backend beside it
    (architecture JSON + safetensors): the files every backend builds an engine from.
    Returns the ONNX bytes.

    Each file is written whole (``runtime.atomic``), the module files first and the ONNX
    last, module.json recording the sha256 of the ONNX and of the weights: a reader that
    sees the new model.onnx sees its module files too, and the torch backend refuses
    module files of another export (a server loading the tier mid-write, an interrupted
    build) rather than caching them under this ONNX's key.

    Example:
        >>> data = write_tier_files(Path("repo/mnist/tiers/w050"), module, config)  # doctest: +SKIP
    """
    dtypes = [getattr(torch, t.dtype) for t in config.inputs]
    inputs = [(t.name, t.shape, dt) for t, dt in zip(config.inputs, dtypes, strict=True)]
    check_io(module, inputs, config)
    data = export_onnx(module, inputs, [t.name for t in config.outputs])
    weights = save_safetensors({k: v.contiguous() for k, v in module.state_dict().items()})
    meta = {
        "architecture": graphio.to_spec(module),
        "inputs": [[t.name, t.dtype, [-1, *t.shape]] for t in config.inputs],
        "outputs": [[t.name, t.dtype, [-1, *t.shape]] for t in config.outputs],
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    meta["spec_sha256"] = spec_digest(meta)
    d.mkdir(parents=True, exist_ok=True)
    # (written through a temporary file: the mode a plain open gives, not save_file's 0o600)
    write_bytes(d / MODULE_WEIGHTS, weights)
    write_bytes(d / MODULE_SPEC, json.dumps(meta).encode())
    write_bytes(d / "model.onnx", data)  # last: see above
    return data


def embedding_rows(data: bytes, config: ModelConfig) -> dict[str, Rows] | None:
    """Rows of the embedding table each integer input of ``config`` indexes in the ONNX
    ``data``: the smallest initializer a Gather reads along axis 0 at that graph input; or,
    for an input whose columns index tables of their own (``ids[:, k]``: a Gather of one
    constant column along the last axis, then the table's), a list over its last dim with
    None for a column no table reads directly. An id outside [0, rows) fails the engine's
    whole batch (ONNX Runtime: "indices element out of data bounds"); a negative one
    silently reads a row from the end, where torch refused it. The server refuses both with
    INVALID_ARGUMENT from this record. None: no integer input indexes a table (or the bytes
    do not parse).

    Example:
        >>> data = Path("repo/rec/tiers/w100/model.onnx").read_bytes()  # doctest: +SKIP
        >>> embedding_rows(data, config)  # doctest: +SKIP
        {'item_ids': 50000, 'fields': [20, 50000]}
    """
    ints = {t.name: t for t in config.inputs if t.dtype in INTEGER_DTYPES}
    if not ints:
        return None
    try:
        graph = onnx.load_from_string(data).graph
    except Exception:  # a file the backend reads but onnx does not: nothing is checked
        return None
    tables = {t.name: int(t.dims[0]) for t in graph.initializer if len(t.dims) >= 1}
    columns = _column_reads(graph, ints)  # tensor -> (input, column) it holds
    rows: dict[str, Rows] = {}
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or _axis(node) != 0:
            continue
        table, ids = node.input[0], node.input[1]
        if table not in tables:
            continue
        if ids in ints:
            bound: Rows = tables[table]
        elif ids in columns:
            name, k = columns[ids]
            bound = [None] * ints[name].shape[-1]
            bound[k] = tables[table]
            ids = name
        else:
            continue
        rows[ids] = merge_rows(rows[ids], bound) if ids in rows else bound
    return rows or None


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _column_reads(graph, ints: Mapping) -> dict[str, tuple[str, int]]:
    """Tensors that are one column of an integer input's last dim, fixed in size: output
    name -> (input, column), from ``Gather(input, k, axis=last)`` with a constant scalar
    ``k`` (what torch exports for ``ids[:, k]``)."""
    scalars = {t.name: t for t in graph.initializer if len(t.dims) == 0}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and len(value.dims) == 0:
                scalars[node.output[0]] = value
    found = {}
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in ints:
            continue
        spec, k = ints[node.input[0]], scalars.get(node.input[1])
        width = spec.shape[-1] if spec.shape else -1
        if k is None or width <= 0 or _axis(node) not in (len(spec.shape), -1):
            continue  # another axis, a computed index or a dynamic last dim: not a column
        col = int(numpy_helper.to_array(k)) % width
        found[node.output[0]] = (node.input[0], col)
    return found


@contextlib.contextmanager
def exportable_attention() -> Iterator[None]:
    """``nn.MultiheadAttention`` without its inference fast path: in eval mode under no_grad
    it calls ``aten::_native_multi_head_attention``, which no ONNX opset has; the plain path
    (linear, matmul, softmax) computes the same values and exports."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def traceable_shape_arithmetic() -> Iterator[None]:
    """``torch.sym_max`` / ``torch.sym_min`` that also take the tracer's tensors.

    A graph captured by torch.export keeps shape arithmetic on input sizes as calls, e.g.
    timm's "same" padding ``max((ceil(H / s) - 1) * s + (k - 1) * d + 1 - H, 0)`` as
    ``torch.sym_max``. Under the TorchScript exporter sizes are traced tensors, which
    ``sym_max`` refuses ("expected int, got Tensor": tf_mixnet_s converted but never
    exported). Inside this block such a call on a tensor is ``torch.maximum`` /
    ``torch.minimum``, recorded in the ONNX graph, so a dynamic dim stays dynamic; on plain
    numbers it is the original. The generated code of an ``fx.GraphModule`` looks
    ``torch.sym_max`` up when it runs, so patching the attribute reaches it.

    Only for inputs whose sizes are fixed but for the batch (``_check_shape_arithmetic``):
    the ``math.ceil`` beside such a max is folded to the example's value by the tracer, so a
    dynamic sequence axis would export, silently, the padding of the example's length.
    """

    def tensor_aware(original, tensor_op):
        def op(a, b):
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                return tensor_op(torch.as_tensor(a), torch.as_tensor(b))
            return original(a, b)

        return op

    before = torch.sym_max, torch.sym_min
    torch.sym_max = tensor_aware(before[0], torch.maximum)
    torch.sym_min = tensor_aware(before[1], torch.minimum)
    try:
        yield
    finally:
        torch.sym_max, torch.sym_min = before


_SHAPE_OPS = (torch.sym_max, torch.sym_min, math.ceil, math.floor)


def _check_attention_lengths(module: nn.Module, inputs) -> None:
    """Refuse ``nn.MultiheadAttention`` where an input has a dynamic axis besides the batch:
    its plain path (``exportable_attention``) reshapes by the sequence length as a Python
    number, which the exporter writes into the graph - every other length failed in ONNX
    Runtime ("Reshape ... requested shape {7,4,8}") at the build, saying nothing of the
    cause (review 198). A fixed length exports and runs at every batch."""
    dynamic = [name for name, shape, _ in inputs if -1 in tuple(shape)]
    mha = next((n for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)), None)
    if dynamic and mha is not None:
        raise ValueError(
            f"{mha} is an nn.MultiheadAttention, whose ONNX export fixes the sequence length at "
            f"the example's; inputs {dynamic} have a dynamic axis (-1 in model.yaml): give them "
            "a fixed shape, or write the attention from nn.Linear and "
            "F.scaled_dot_product_attention (as Hugging Face and timm models do)"
        )


# Pools whose window (kernel size, stride) the exporter writes into the graph as numbers.
_POOLS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
          F.lp_pool1d, F.lp_pool2d)  # fmt: skip


_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)  # fmt: skip


def _adaptive_pool_misfit(module: nn.Module, example: tuple, inputs) -> str | None:
    """Why the exporter refused an adaptive pool, where that was its refusal: the legacy
    exporter writes one only where its output size divides its input map (VGG's 7 x 7 from a
    64 x 64 image's 2 x 2 map failed with a TorchScript IR dump; review helper-262). Names the
    first such layer, its sizes, and an image size checked to work where one of a few tried
    does; None where none misfits."""
    seen = _adaptive_maps(module, example)
    if seen is None:  # the export's own error says more than this probe's would
        return None
    misfit = next(((n, s, o) for n, s, o in seen if not _divides(s, o)), None)
    if misfit is None:
        return None
    name, size, out = misfit
    hint = ""
    image = next((i for i, (_, shape, _) in enumerate(inputs) if len(shape) > len(size)), None)
    if image is not None and len(example) == len(inputs):
        shape = list(inputs[image][1])
        dims = shape[-len(size) :]
        # Candidates from the map's scale (input / map), checked by running them and the
        # scale read again from each run: floor-halving pools make it inexact (a 40 x 40
        # image's 1 x 1 map read as 40x, and 280 still failed; review helper-270).
        at, maps = dims, size
        for _ in range(6):
            tried = [_next_size(d, m, o) for d, m, o in zip(at, maps, out, strict=True)]
            probe = list(example)
            probe[image] = torch.zeros(
                (1, *shape[: -len(size)], *tried), dtype=example[image].dtype
            )
            ran = _adaptive_maps(module, tuple(probe))
            if ran is None:
                break
            if all(_divides(m, o) for _, m, o in ran):
                hint = f"; an input of {[*shape[: -len(size)], *tried]} gives maps that divide"
                break
            at, maps = tried, next((m for n, m, _ in ran if n == name), maps)
    return (
        f"adaptive pool {name!r} maps {list(size)} to {list(out)}, and the ONNX exporter "
        f"writes one only where the output size divides the input map: change model.yaml's "
        f"input shape{hint}, or pool to a size that divides it"
    )


def _next_size(d: int, m: int, o: int | None) -> int:
    """An input size ``d`` whose map ``m`` is not a multiple of ``o``: the size, at the scale
    d / m, of the next multiple of ``o`` above the map (``d`` where it divides already)."""
    if o is None or m % o == 0:
        return d
    return max(math.ceil(o * (m // o + 1) * d / max(m, 1)), d)


def _divides(size: tuple, out: tuple) -> bool:
    return all(o is None or s % o == 0 for s, o in zip(size, out, strict=True))


def _adaptive_maps(module: nn.Module, example: tuple) -> list[tuple[str, tuple, tuple]] | None:
    """(name, input map, output size) of each adaptive pool as ``module`` runs ``example``;
    None where it does not run."""
    seen: list[tuple[str, tuple, tuple]] = []
    hooks = []
    for name, sub in module.named_modules():
        if isinstance(sub, _ADAPTIVE_POOLS):

            def hook(mod, args, _out, name=name) -> None:
                n = int(type(mod).__name__[-2])  # AdaptiveAvgPool2d: 2 spatial dims
                seen.append((name, tuple(args[0].shape[-n:]), _pair(mod.output_size, n)))

            hooks.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(*example)
    except Exception:
        return None
    finally:
        for h in hooks:
            h.remove()
    return seen


def _pair(size, n: int) -> tuple:
    """An adaptive pool's ``output_size`` as one entry per spatial dim (None: as the input)."""
    return tuple(size) if isinstance(size, tuple | list) else (size,) * n


def _check_pool_windows(module: nn.Module, inputs) -> None:
    """Refuse a pool whose window is computed from the input's size (a global pool written
    ``F.max_pool1d(x, x.size(2))``) where an input has a dynamic axis besides the batch: the
    exporter fixes the window at the example's length, and every other length failed in
    ONNX Runtime far from the cause, or pooled part of the sequence with no error (review
    helper-230)."""
    dynamic = [name for name, shape, _ in inputs if -1 in tuple(shape)]
    if not dynamic:
        return
    for sub in module.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for n in sub.graph.nodes:
            if n.op == "call_function" and n.target in _POOLS:
                window = [*n.args[1:3], n.kwargs.get("kernel_size"), n.kwargs.get("stride")]
                if any(isinstance(a, torch.fx.Node) for a in window):
                    raise ValueError(
                        f"node {n.name!r} ({n.target.__name__}) takes its window from the "
                        f"input's size, which the ONNX exporter fixes at the example's; inputs "
                        f"{dynamic} have a dynamic axis (-1 in model.yaml): pool the whole "
                        "length as a reduction (x.amax(dim=-1), x.mean(dim=-1)) or with "
                        "F.adaptive_max_pool1d(x, 1), or give the inputs a fixed shape"
                    )


def _check_shape_arithmetic(module: nn.Module, inputs) -> None:
    """Refuse, with the way out, to export arithmetic on input sizes (a captured graph's
    ``torch.sym_max`` / ``math.ceil``) where an input has a dynamic axis besides the batch:
    the exporter would fold it to the example's sizes, and the ONNX graph would compute
    another length's padding without an error."""
    dynamic = [name for name, shape, _ in inputs if -1 in tuple(shape)]
    if not dynamic:
        return
    for sub in module.modules():
        if isinstance(sub, torch.fx.GraphModule) and any(
            n.op == "call_function" and n.target in _SHAPE_OPS for n in sub.graph.nodes
        ):
            raise ValueError(
                f"this tier computes sizes from its input's (torch.sym_max / math.ceil in "
                f'the captured graph: e.g. "same" padding), which the ONNX exporter fixes at '
                f"the example's size; inputs {dynamic} have a dynamic axis (-1 in model.yaml) "
                f"that would then get the wrong sizes: give them a fixed shape"
            )
