"""Freeing a declared batch of 1 while a model is pruned, and declaring it again afterwards.

Exporters declare batch 1 unless told otherwise (torch's TorchScript and dynamo exporters both),
and every calibration pass, probe and refit then runs one image at a time. Most such graphs
compute each sample alone: declared a symbolic batch, they run many images per pass. The
dynamo exporter also folds the batch into constants — ``x.view(x.size(0), -1)`` becomes a Reshape
to ``[1, -1]``, ``F.interpolate(x, size=...)`` a Resize to ``[1, C, H, W]`` — so those are freed
too, in ways that are the same at batch 1. Whether the freed graph really batches is checked by
running two samples together and one at a time (:func:`batches_like_singles`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from .activations import ORT_ERRORS, run_batches
from .calib import Calibration
from .graphview import GraphView
from .ops import handler_for

FREED_BATCH = "onnxprune_batch"  # the symbolic batch dim free_batch declares


def free_batch(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Declare a symbolic batch dim, in place, on the graph inputs and outputs that declare batch
    1, and free the named nodes whose constant shapes write that 1 where their input's first dim
    is 1 (``shapes``: every tensor's at one sample; each op's handler says how: ``free_batch``).
    The shapes of the tensors added are added to ``shapes``. Returns the freed nodes' names, for
    :func:`declare_batch_as`."""
    for dim in _batch_dims(model):
        if dim.HasField("dim_value") and dim.dim_value == 1:
            dim.Clear()
            dim.dim_param = FREED_BATCH
    g = GraphView(model, shapes)
    freed, nodes = [], []  # the node list with what handlers add (the repeated field is rebuilt once)
    for node in model.graph.node:
        nodes.append(node)
        added = handler_for(node).free_batch(node, g) if node.name else None
        if added is None:
            continue
        nodes[-1:-1] = added
        freed.append(node.name)
    if len(nodes) > len(model.graph.node):
        _set_nodes(model, nodes)
    if freed:
        g.drop_unused_initializers()
    shapes.update(g.shapes)
    return freed


def declare_batch_as(model: onnx.ModelProto, like: onnx.ModelProto, freed: Sequence[str] = ()) -> None:
    """Undo :func:`free_batch`, in place, on a model derived from the freed one: its graph inputs
    and outputs get the first dim ``like`` declares for the same names, and the ``freed`` nodes it
    returned write their 1 again (a channel count pruning rewrote meanwhile stays rewritten)."""
    inits = {t.name for t in like.graph.initializer}
    declared = {v.name: v.type.tensor_type.shape.dim[0]
                for v in [*(v for v in like.graph.input if v.name not in inits), *like.graph.output]
                if v.type.HasField("tensor_type") and len(v.type.tensor_type.shape.dim)}
    for v in [*model.graph.input, *model.graph.output]:
        dims = v.type.tensor_type.shape.dim if v.type.HasField("tensor_type") else []
        if v.name in declared and len(dims) and dims[0].dim_param == FREED_BATCH:
            dims[0].CopyFrom(declared[v.name])
    if not freed:
        return
    g, names, added = GraphView(model), set(freed), set()
    for node in model.graph.node:
        if node.name in names:
            added.update(handler_for(node).declare_batch(node, g))
    for i in reversed([i for i, n in enumerate(model.graph.node) if n.name in added]):
        del model.graph.node[i]
    g.drop_unused_initializers()


def batches_like_singles(model: onnx.ModelProto, calib: Calibration) -> bool:
    """Whether ``model`` run on two samples together gives every output as the two run one at a
    time (rows stacked on the first dim, to float rounding). A graph exported at batch 1 can hold
    the 1 inside where :func:`free_batch` does not reach (a Reshape to ``[8, 64]`` dropping it, a
    Gather of fixed positions): it then fails at batch 2, folds the batch away, or mixes samples."""
    if len(calib) < 2:
        return False
    names = [o.name for o in model.graph.output]
    try:
        ((_, two),) = run_batches(model, names, calib, [0, 1], 2)
        ones = [values for _, values in run_batches(model, names, calib, [0, 1], 1)]
    except ORT_ERRORS:
        return False
    for name in names:
        single = np.concatenate([one[name] for one in ones]) if all(one[name].ndim for one in ones) else None
        both = two[name]
        if single is None or both.shape != single.shape or both.dtype != single.dtype:
            return False
        if both.dtype.kind == "f":
            scale = float(np.abs(single).max()) if single.size else 0.0
            if not np.allclose(both, single, rtol=1e-3, atol=1e-4 * max(scale, 1e-30)):
                return False
        elif not np.array_equal(both, single):
            return False
    return True


def _batch_dims(model: onnx.ModelProto) -> list[onnx.TensorShapeProto.Dimension]:
    """The first dim of every declared graph input (not initializers) and output."""
    inits = {t.name for t in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in inits] + list(model.graph.output)
    return [v.type.tensor_type.shape.dim[0] for v in values
            if v.type.HasField("tensor_type") and len(v.type.tensor_type.shape.dim)]


def _set_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """Make ``nodes`` (copied first: they may be the graph's own) the graph's node list."""
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes):
        copy.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(copies)
