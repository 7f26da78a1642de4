"""The only module that edits the graph: removing a group's channels and finalising the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx

from .graph import ChannelGroup
from .graphview import GraphView
from .ops import handler_for


def prune_group(g: GraphView, group: ChannelGroup, keep: np.ndarray, width: int) -> None:
    """Keep only channels ``keep`` (of the ``width`` the group has now) in all its producers,
    throughs and consumers."""
    keep = np.asarray(keep, dtype=np.int64)
    for node in group.producers:
        handler_for(node).prune_output(node, keep, g)
    for node in group.throughs:
        handler_for(node).prune_through(node, keep, g)
    for c in group.consumers:
        handler_for(c.node).prune_input(c.node, keep, c.block, g)
    for t in group.tensors:
        shape, axis = g.shapes.get(t), g.channel_axis(t)
        if shape is not None and len(shape) >= 2:
            per_channel = shape[axis] // width if width else 1
            g.shapes[t] = (*shape[:axis], len(keep) * per_channel, *shape[axis + 1:])


@contextlib.contextmanager
def trial_edit(g: GraphView) -> Iterator[None]:
    """Edits made to ``g`` inside the block are undone when it ends: nodes (restored in place, so
    groups that refer to them stay valid), graph outputs, initializers and shapes. Edits must not
    add or remove nodes, nor drop initializers."""
    graph = g.graph
    nodes = [n.SerializeToString() for n in graph.node]
    outputs = [o.SerializeToString() for o in graph.output]
    initializers = {t.name for t in graph.initializer}
    shapes = dict(g.shapes)
    try:
        yield
    finally:
        if len(graph.node) != len(nodes):
            raise RuntimeError("a trial edit added or removed nodes")
        for proto, saved in [*zip(graph.node, nodes), *zip(graph.output, outputs)]:
            if proto.SerializeToString() != saved:
                proto.ParseFromString(saved)
        for t in [t for t in graph.initializer if t.name not in initializers]:
            graph.initializer.remove(t)
        g.shapes.clear()
        g.shapes.update(shapes)
        g.reindex()


def drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes none of whose outputs is used (e.g. the Shape arithmetic of a Slice whose
    bounds were rewritten as constants)."""
    graph = model.graph
    while True:
        used = _names_read(graph) | {o.name for o in graph.output}
        live = [n for n in graph.node if any(o in used for o in n.output if o)]
        if len(live) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(live)


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in [a.g] * a.HasField("g") + list(a.graphs):
                yield from _nodes(sub)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of ``graph`` or of its subgraphs."""
    return {name for node in _nodes(graph) for name in node.input}


def share_equal_initializers(model: onnx.ModelProto) -> int:
    """Let every node read one initializer of each set of byte-identical ones (the same type,
    dims and data), in the graph and its subgraphs: the copies :func:`~onnxprune.fold.constants_to_initializers`
    made of weights an exporter stored once (PyTorch shares equal tensors through ``Identity``)
    and that pruning left equal are stored once again. Initializers that are also graph inputs
    (overridable at run time) or hold their data elsewhere keep their own. Returns how many
    initializers were dropped."""
    graph = model.graph
    fed = {i.name for i in graph.input}
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for t in graph.initializer:
        if t.name in fed or t.data_location == onnx.TensorProto.EXTERNAL or not t.raw_data:
            continue
        alias[t.name] = first.setdefault((t.data_type, tuple(t.dims), t.raw_data), t.name)
    alias = {name: to for name, to in alias.items() if name != to}
    if not alias:
        return 0

    for node in _nodes(graph):
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
    before = len(graph.initializer)
    GraphView(model).drop_unused_initializers()
    return before - len(graph.initializer)


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop dead nodes, unused weights and stale shape annotations, store equal weights once,
    re-infer shapes."""
    drop_dead_nodes(model)
    GraphView(model).drop_unused_initializers()
    share_equal_initializers(model)
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model)
