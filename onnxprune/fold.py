"""Graph clean-ups done before analysis: Constant nodes to initializers, BN folded into Conv."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graphview import GraphView, attr


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn ``Constant`` nodes, and ``Identity`` copies of initializers (PyTorch's exporter shares
    equal weights that way), into initializers so every weight is seen the same way; each copy
    becomes a weight of its own, free to be sliced for its own layer."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    inits = {t.name: t for t in graph.initializer}
    keep, moved = [], 0
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and node.output and node.output[0] not in outputs:
            value = None
            if node.op_type == "Constant":
                value = _constant_value(node)
            elif node.op_type == "Identity" and node.input and node.input[0] in inits:
                value = numpy_helper.to_array(inits[node.input[0]])
            if value is not None:
                inits[node.output[0]] = numpy_helper.from_array(value, node.output[0])
                graph.initializer.append(inits[node.output[0]])
                moved += 1
                continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return moved


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def fold_batchnorm(model: onnx.ModelProto, scales: dict[str, np.ndarray] | None = None) -> int:
    """Fold every inference-mode BatchNormalization that directly follows a Conv into it.

    Returns how many were folded. The Conv gains a bias if it had none. When ``scales`` is
    given, each folded BN's γ is recorded there under the Conv's new output name.
    """
    g = GraphView(model)
    folded, drop = 0, set()
    for bn in list(g.nodes_by_type("BatchNormalization")):
        conv = g.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(g.consumers[bn.input[0]]) != 1:
            continue
        if bn.input[0] in g.graph_outputs or len([o for o in bn.output if o]) != 1 or attr(bn, "training_mode", 0):
            continue  # training mode normalises with batch statistics: nothing to fold
        params = [g.input_const(bn, i) for i in range(1, 5)]
        w, b = g.input_const(conv, 1), g.input_const(conv, 2)
        if w is None or any(p is None for p in params) or (len(conv.input) > 2 and conv.input[2] and b is None):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
        bias = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        g.set_const(conv, 1, (w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype))
        g.set_const(conv, 2, ((bias - mean) * scale + beta).astype(w.dtype))
        conv.output[0] = bn.output[0]
        if scales is not None:
            scales[bn.output[0]] = params[0].astype(np.float64)
        drop.add(id(bn))
        folded += 1
    if folded:
        nodes = [n for n in model.graph.node if id(n) not in drop]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        GraphView(model).drop_unused_initializers()
    return folded
