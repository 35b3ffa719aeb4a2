"""Rewrites of an exported ONNX graph (pure functions over onnx protos): constant weights whose
QuantizeLinear the exporter left in float become int8 initializers, and float MatMuls over
integer-valued operands become MatMulInteger."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _consumers(graph, name):
    return [n for n in graph.node if name in n.input]


def fold_constant_quantize(model: onnx.ModelProto) -> int:
    """QuantizeLinear(float initializer, scale, zero) -> an int8 / uint8 initializer of its codes
    (computed here with ONNX's round-half-to-even, as onnxruntime would); returns how many."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        if node is not None and node.op_type == "Cast":  # a zero point cast to int8 / uint8
            v = value(node.input[0])
            to = next(a.i for a in node.attribute if a.name == "to")
            return None if v is None else v.astype(helper.tensor_dtype_to_np_dtype(to))
        return None

    folded = 0
    for node in list(g.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        x, scale, zero = value(node.input[0]), value(node.input[1]), value(node.input[2])
        if scale is None or zero is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * x.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[axis] = -1
        info = np.iinfo(zero.dtype)
        q = np.clip(np.rint(x / scale.reshape(shape)) + zero.reshape(shape).astype(np.int32), info.min, info.max)
        g.initializer.append(numpy_helper.from_array(q.astype(zero.dtype), node.output[0]))
        g.node.remove(node)
        folded += 1
    prune(g)
    return folded


def prune(g) -> None:
    """Drop nodes and initializers nothing reads (repeatedly: a removed node frees its inputs)."""
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        for n in dead:
            g.node.remove(n)
        if not dead:
            break
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for init in list(g.initializer):
        if init.name not in used:
            g.initializer.remove(init)


def to_matmul_integer(model: onnx.ModelProto, weight_names: set[str]) -> int:
    """MatMul(A, Cast(W)) with W an int8 initializer in `weight_names` and A integer-valued floats
    in [-127, 127] -> Cast(MatMulInteger(Cast(A, int8), W), float)."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    count = 0
    for node in list(g.node):
        if node.op_type != "MatMul":
            continue
        cast = producers.get(node.input[1])
        if cast is None or cast.op_type != "Cast" or cast.input[0] not in weight_names:
            continue
        a8 = node.output[0] + "_a_int8"
        acc = node.output[0] + "_int32"
        new = [helper.make_node("Cast", [node.input[0]], [a8], to=onnx.TensorProto.INT8),
               helper.make_node("MatMulInteger", [a8, cast.input[0]], [acc]),
               helper.make_node("Cast", [acc], [node.output[0]], to=onnx.TensorProto.FLOAT)]
        idx = list(g.node).index(node)
        g.node.remove(node)
        for k, n in enumerate(new):
            g.node.insert(idx + k, n)
        if not [n for n in g.node if cast.output[0] in n.input]:
            g.node.remove(cast)
        count += 1
    return count
