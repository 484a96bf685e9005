"""An ONNX graph pass: compute in float16, keep float32 inputs and outputs. No torch.

TensorRT 11 removed the FP16 builder flag (every network is strongly typed), so an fp16
engine needs an fp16 graph; the pass is plain ONNX and usable by any backend. Needs the
``onnx`` package, imported when the pass runs.
"""

from __future__ import annotations

import numpy as np

# The largest finite float16; weights beyond it are clipped rather than becoming inf.
FP16_MAX = 65504.0
# The smallest magnitude a nonzero constant keeps (onnxconverter-common's min_positive_val):
# an epsilon of 1e-9 or 1e-12 - a mean pooling's or a normalisation's guard against
# dividing by zero - became 0 in fp16, and an all-padding row came out NaN (review 175).
_FP16_MIN_POSITIVE = 1e-7
# What this pass makes of a graph, in TensorRT's engine key: bump it when that changes.
# (2: tiny constants kept nonzero)
PASS_VERSION = 2
# (op type, input index) slots that ONNX requires to be float32 whatever the data type.
_FLOAT32_ONLY_INPUTS = {("Resize", 2), ("Upsample", 1)}
# Ops whose float type constraint has no float16 (Range: float, double, int16/32/64): a
# float one computes in float32 between two Casts (an fp16 Range was an invalid graph:
# "Type 'tensor(float16)' of input parameter ... of operator (Range) ... is invalid").
_NO_FLOAT16_OPS = {"Range"}


def convert_to_fp16(model):
    """A copy of the ONNX ``model`` computing in float16, with float32 inputs and outputs.

    Float32 initializers and Constant/ConstantOfShape values become float16, Cast/dtype
    attributes naming float32 name float16, and Cast nodes convert the float32 graph inputs
    on entry and the outputs on exit, so callers feed and get the same dtypes as before.
    Slots ONNX requires to be float32 (Resize scales) stay float32. Needs ``onnx``.
    Raises ValueError for graphs with control-flow subgraphs (If/Loop/Scan).

    Example:
        >>> half = convert_to_fp16(onnx.load("model.onnx"))  # doctest: +SKIP
    """
    import onnx
    from onnx import AttributeProto, TensorProto, helper, numpy_helper

    float32, float16 = TensorProto.FLOAT, TensorProto.FLOAT16
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    wrapped = _float_nodes_without_float16(model)  # indices in graph.node

    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                raise ValueError(
                    f"node {node.name or node.op_type!r} has a subgraph; fp16 conversion "
                    "supports graphs without control flow only"
                )

    keep32 = {
        name
        for node in graph.node
        for index, name in enumerate(node.input)
        if (node.op_type, index) in _FLOAT32_ONLY_INPUTS
    }
    used = {vi.name for vi in (*graph.input, *graph.output, *graph.value_info)}
    used.update(i.name for i in graph.initializer)
    for node in graph.node:
        used.update(node.input)
        used.update(node.output)

    def fresh(base: str) -> str:
        name, n = f"{base}_fp16", 1
        while name in used:
            name, n = f"{base}_fp16_{n}", n + 1
        used.add(name)
        return name

    def half(array: np.ndarray) -> np.ndarray:
        # Clip first: values beyond fp16's range would become inf, tiny ones 0.
        a = np.clip(array, -FP16_MAX, FP16_MAX)
        tiny = (a != 0) & (np.abs(a) < _FP16_MIN_POSITIVE)
        if tiny.any():
            a = np.where(tiny, np.copysign(_FP16_MIN_POSITIVE, a), a)
        return a.astype(np.float16)

    initializers = {i.name for i in graph.initializer}
    for init in graph.initializer:
        if init.data_type == float32 and init.name not in keep32:
            init.CopyFrom(numpy_helper.from_array(half(numpy_helper.to_array(init)), init.name))

    for node in graph.node:
        if any(o in keep32 for o in node.output):
            continue
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR and attr.t.data_type == float32:
                attr.t.CopyFrom(numpy_helper.from_array(half(numpy_helper.to_array(attr.t))))
            elif attr.name in ("to", "dtype") and attr.type == AttributeProto.INT and attr.i == 1:
                attr.i = float16  # 1 == TensorProto.FLOAT
        if node.op_type == "Constant":
            for attr in list(node.attribute):
                if attr.name in ("value_float", "value_floats"):
                    value = attr.f if attr.name == "value_float" else list(attr.floats)
                    node.attribute.remove(attr)
                    node.attribute.append(
                        helper.make_attribute(
                            "value", numpy_helper.from_array(half(np.array(value, np.float32)))
                        )
                    )

    def elem_type(vi) -> int:
        return vi.type.tensor_type.elem_type

    # Inputs: x (float32, fed by the caller) -> Cast -> x_fp16 (used by the graph).
    head, renamed = [], {}
    for vi in graph.input:
        if elem_type(vi) != float32 or vi.name in keep32:
            continue
        if vi.name in initializers:  # an old-style input that is really a weight
            vi.type.tensor_type.elem_type = float16
            continue
        renamed[vi.name] = fresh(vi.name)
        head.append(helper.make_node("Cast", [vi.name], [renamed[vi.name]], to=float16))
    for node in graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]

    # Outputs: the graph now makes y_fp16; a final Cast gives the caller float32 y. A weight
    # that is also an output (a constant head) is fp16 now: renamed too, and cast the same.
    # A graph input passed through stays the caller's float32 (the graph uses its cast).
    fed = {vi.name for vi in graph.input} - initializers
    tail, renamed = [], {}
    for vi in graph.output:
        if elem_type(vi) != float32 or vi.name in fed or vi.name in keep32:
            continue
        renamed[vi.name] = fresh(vi.name)
        tail.append(helper.make_node("Cast", [renamed[vi.name]], [vi.name], to=float32))
    for node in graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
    for item in (*graph.initializer, *graph.input):  # (an old-style input naming a weight)
        if item.name in renamed:
            item.name = renamed[item.name]

    for vi in graph.value_info:
        if vi.name in renamed:
            vi.name = renamed[vi.name]
        if elem_type(vi) == float32 and vi.name not in keep32:
            vi.type.tensor_type.elem_type = float16

    body = []
    for i, node in enumerate(graph.node):
        if i not in wrapped:
            body.append(node)
            continue
        # in float32: its inputs cast up on entry, its output back down to float16
        for k, name in enumerate(node.input):
            if name:
                up = fresh(f"{name}_as32")
                body.append(helper.make_node("Cast", [name], [up], to=float32))
                node.input[k] = up
        result = node.output[0]
        node.output[0] = fresh(f"{result}_as32")
        body.append(node)
        body.append(helper.make_node("Cast", [node.output[0]], [result], to=float16))
    nodes = [*head, *body, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _float_nodes_without_float16(model) -> set[int]:
    """Indices of ``model``'s nodes of an op without float16 (``_NO_FLOAT16_OPS``) whose
    output is float32 (ONNX shape inference: an int64 Range - positions - stays as it is;
    one it cannot type is left too)."""
    import onnx
    from onnx import TensorProto

    if not any(n.op_type in _NO_FLOAT16_OPS for n in model.graph.node):
        return set()
    try:
        typed = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # (inference is best effort: an untyped graph keeps its nodes)
        return set()
    floats = {
        vi.name
        for vi in (*typed.value_info, *typed.output)
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    return {
        i
        for i, n in enumerate(model.graph.node)
        if n.op_type in _NO_FLOAT16_OPS and n.output and n.output[0] in floats
    }
