"""A small index over an ONNX graph: producers, consumers, constants, static shapes.

Every pass reads the graph through this view; parameter edits go through
:meth:`GraphView.set_const`, which writes a fresh initializer so shared weights are never
changed behind another node's back.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper


class GraphView:
    """Index of one ``onnx.ModelProto`` graph (the model is edited in place)."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None):
        self.model = model
        self.graph = model.graph
        self.shapes: dict[str, tuple[int, ...]] = dict(shapes or {})
        self.channel_axes: dict[str, int] = {}  # tensors whose channels are not on axis 1 (set by analysis)
        self._arrays: dict[str, np.ndarray] = {}
        self._counter = 0
        self.reindex()

    # ------------------------------------------------------------------ indexing
    def reindex(self) -> None:
        """Rebuild producer/consumer maps after nodes were added or removed."""
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in inputs_of(node):
                self.consumers[inp].append(node)
        self.graph_inputs = {i.name for i in self.graph.input} - set(self.initializers)
        self.graph_outputs = {o.name for o in self.graph.output}

    def is_const(self, name: str) -> bool:
        return name in self.initializers

    def const(self, name: str) -> np.ndarray:
        """The value of an initializer, as a read-only NumPy array."""
        if name not in self._arrays:
            arr = numpy_helper.to_array(self.initializers[name])
            arr.setflags(write=False)
            self._arrays[name] = arr
        return self._arrays[name]

    def forget_arrays(self) -> None:
        """Drop the arrays :meth:`const` keeps (a big model's weights); they are read again on demand."""
        self._arrays = {}

    def input_const(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        """The constant value of ``node.input[index]``, or None if absent or not constant."""
        if index < len(node.input) and node.input[index] and self.is_const(node.input[index]):
            return self.const(node.input[index])
        return None

    def set_const(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Give ``node.input[index]`` a new constant value (a fresh initializer, never shared)."""
        old = node.input[index] if index < len(node.input) else ""
        dtype = self.const(old).dtype if old and self.is_const(old) else value.dtype
        self._counter += 1
        base = old or f"{node.name or node.op_type}_in{index}"
        name = f"{base}__op{self._counter}"
        while name in self.initializers or name in self.producer:
            self._counter += 1
            name = f"{base}__op{self._counter}"
        tensor = numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype, copy=False)), name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name
        self.consumers[name].append(node)
        if old:
            self.consumers[old] = [n for n in self.consumers[old] if n is not node]

    def share_consts(self, node: onnx.NodeProto, source: onnx.NodeProto, equal_only: bool = True) -> None:
        """Let ``node`` read ``source``'s constant inputs (layers that share a weight: refit together
        on ``source``), or with ``equal_only`` only where the two hold equal values at the same
        input (each sliced alike)."""
        for i, name in enumerate(source.input[:len(node.input)]):
            old = node.input[i]
            if old == name or not (name and old and self.is_const(name) and self.is_const(old)):
                continue
            a, b = self.const(name), self.const(old)
            if not equal_only or a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b):
                node.input[i] = name
                self.consumers[name].append(node)
                self.consumers[old] = [n for n in self.consumers[old] if n is not node]

    def drop_unused_initializers(self) -> None:
        """Remove initializers that no node reads any more."""
        used = {i for n in self.graph.node for i in inputs_of(n)} | self.graph_outputs
        # deleted in place: clearing the field and adding the kept ones back would copy every
        # kept tensor, and protobuf (upb) frees no message memory before the whole model goes
        # (one more copy of the weights per call, i.e. per pruned group)
        _delete_where(self.graph.initializer, lambda t: t.name not in used)
        _delete_where(self.graph.input, lambda i: i.name not in used and i.name in self.initializers)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self._arrays = {k: v for k, v in self._arrays.items() if k in self.initializers}

    # ------------------------------------------------------------------ shapes
    def shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.shapes:
            return self.shapes[name]
        if self.is_const(name):
            return tuple(self.initializers[name].dims)
        return None

    def channel_axis(self, name: str) -> int:
        """The axis that holds a tensor's channels: 1 unless analysis found a channels-last layout."""
        return self.channel_axes.get(name, 1)

    def channels(self, name: str) -> int | None:
        """Size of the channel axis of a tensor, when known."""
        shape, axis = self.shape(name), self.channel_axis(name)
        return shape[axis] if shape is not None and len(shape) >= 2 and axis < len(shape) else None

    def nodes_by_type(self, *op_types: str) -> Iterable[onnx.NodeProto]:
        return (n for n in self.graph.node if n.op_type in op_types)


def _delete_where(field, drop) -> None:
    """Delete the elements of a repeated protobuf field for which ``drop`` holds, keeping the order."""
    for i in reversed([i for i, item in enumerate(field) if drop(item)]):
        del field[i]


def subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """Names read by the nodes of ``node``'s subgraphs (If/Loop/Scan bodies), at any depth:
    outer-scope tensors a body captures are inputs of the node too."""
    names = []
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for inner in sub.node:
                names += [i for i in inner.input if i] + subgraph_reads(inner)
    return names


def inputs_of(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, then the outer-scope tensors its subgraphs read (no empty names, no repeats)."""
    return list(dict.fromkeys(i for i in [*node.input, *subgraph_reads(node)] if i))


def node_name(node: onnx.NodeProto) -> str:
    """How reports name a node: its name, or its first output where the exporter left it unnamed."""
    return node.name or node.output[0]


def attr(node: onnx.NodeProto, name: str, default=None):
    """An attribute of ``node`` as a Python value, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Set (or add) an attribute of ``node``."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))
