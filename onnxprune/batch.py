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
from onnx import helper, numpy_helper

from .activations import ORT_ERRORS, run_batches
from .calib import Calibration
from .graphview import inputs_of

FREED_BATCH = "onnxprune_batch"  # the symbolic batch dim free_batch declares
_SUFFIX = "_onnxprune_batch"  # names of what free_batch adds for one node


def free_batch(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Declare a symbolic batch dim, in place, on the graph inputs and outputs that declare batch
    1, and free the named nodes whose constant shapes write that 1 where their input's first dim
    is 1 (``shapes``: every tensor's at one sample): a Reshape's target copies the dim from its
    input (ONNX's 0; -1 where ``allowzero`` makes 0 a size and no other entry is -1), a Resize's
    ``sizes`` read it from its input's shape (the nodes that read it are added, and their
    outputs' shapes to ``shapes``). Returns the freed nodes' names, for :func:`declare_batch_as`."""
    for dim in _batch_dims(model):
        if dim.HasField("dim_value") and dim.dim_value == 1:
            dim.Clear()
            dim.dim_param = FREED_BATCH
    inits = {t.name: t for t in model.graph.initializer}
    freed, nodes = [], []  # the node list with what Resizes add (repeated fields are rebuilt once)
    for node in model.graph.node:
        nodes.append(node)
        index = {"Reshape": 1, "Resize": 3}.get(node.op_type)
        target = inits.get(node.input[index]) if index is not None and len(node.input) > index else None
        if target is None or not node.name or shapes.get(node.input[0], ())[:1] != (1,):
            continue
        value = numpy_helper.to_array(target)
        if value.ndim != 1 or len(value) < 2 or value[0] != 1:
            continue
        if node.op_type == "Resize":
            if any(a.name == "axes" for a in node.attribute):  # sizes of some axes only
                continue
            added, added_shapes = _read_batch(model, node, value)
            nodes[-1:-1] = added
            shapes.update(added_shapes)
        elif not next((a.i for a in node.attribute if a.name == "allowzero"), 0):
            _set_target(model, node, value, 0)
        elif not (value[1:] == -1).any() and not (value[1:] == 0).any():  # allowzero: 0 is a size
            _set_target(model, node, value, -1)
        else:
            continue
        freed.append(node.name)
    if len(nodes) > len(model.graph.node):
        _set_nodes(model, nodes)
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
    names, added = set(freed), set()
    for node in model.graph.node:
        if node.name not in names:
            continue
        targets = {t.name: t for t in model.graph.initializer}
        if node.op_type == "Reshape" and node.input[1] in targets:
            value = numpy_helper.to_array(targets[node.input[1]])
            if value.ndim == 1 and len(value) and value[0] in (0, -1):
                _set_target(model, node, value, 1)
        elif node.op_type == "Resize":
            added |= _write_batch(model, node)
    if added:
        gone = [i for n in model.graph.node if n.name in added for i in n.input]
        _set_nodes(model, [n for n in model.graph.node if n.name not in added])
        _drop_unread(model, gone)


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


def _set_target(model: onnx.ModelProto, node: onnx.NodeProto, value: np.ndarray, first: int) -> None:
    """Give the Reshape ``node`` a target initializer of its own: ``value`` with ``first`` first."""
    value = value.copy()
    value[0] = first
    old = node.input[1]
    node.input[1] = _add_initializer(model, value, old[:-len(_SUFFIX)] if old.endswith(_SUFFIX) else old + _SUFFIX)
    _drop_unread(model, [old])


def _read_batch(model: onnx.ModelProto, node: onnx.NodeProto, sizes: np.ndarray
                ) -> tuple[list[onnx.NodeProto], dict[str, tuple[int, ...]]]:
    """The Resize ``node``'s constant ``sizes`` (batch 1 first) made ``Concat(Shape(x)[0:1], rest)``
    (the channel entry stays a constant pruning can rewrite): the nodes to insert before it, and
    the shapes of the tensors they add."""
    base = node.name + _SUFFIX
    first, old = f"{base}_first", node.input[3]
    index = _add_initializer(model, np.array([0], dtype=np.int64), f"{base}_index")
    rest = _add_initializer(model, sizes[1:].copy(), f"{base}_rest")
    added = [helper.make_node("Shape", [node.input[0]], [f"{base}_shape"], name=f"{base}_shape"),
             helper.make_node("Gather", [f"{base}_shape", index], [first], name=f"{base}_gather", axis=0),
             helper.make_node("Concat", [first, rest], [f"{base}_sizes"], name=f"{base}_sizes", axis=0)]
    node.input[3] = f"{base}_sizes"
    _drop_unread(model, [old])
    return added, {f"{base}_shape": (len(sizes),), first: (1,), f"{base}_sizes": (len(sizes),)}


def _write_batch(model: onnx.ModelProto, node: onnx.NodeProto) -> set[str]:
    """Undo :func:`_read_batch` on the Resize ``node``: constant sizes again, with the rest as
    they are now (a pruned channel count included); returns the names of the nodes it had added
    (for the caller to remove)."""
    base = node.name + _SUFFIX
    concat = next((n for n in model.graph.node if n.name == f"{base}_sizes"), None)
    targets = {t.name: t for t in model.graph.initializer}
    if concat is None or concat.output[0] != node.input[3] or concat.input[1] not in targets:
        return set()
    rest = numpy_helper.to_array(targets[concat.input[1]])
    node.input[3] = _add_initializer(model, np.concatenate([np.array([1], dtype=rest.dtype), rest]), f"{node.name}_sizes")
    return {f"{base}_shape", f"{base}_gather", f"{base}_sizes"}


def _set_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """Make ``nodes`` (copied first: they may be the graph's own) the graph's node list."""
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes):
        copy.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(copies)


def _add_initializer(model: onnx.ModelProto, value: np.ndarray, name: str) -> str:
    """Add ``value`` as an initializer named ``name`` (or ``name`` and a number, where taken)."""
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    unique, i = name, 0
    while unique in taken:
        i += 1
        unique = f"{name}{i}"
    model.graph.initializer.append(numpy_helper.from_array(value, unique))
    return unique


def _drop_unread(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Remove the initializers among ``names`` that no node reads and no graph output names."""
    read = {i for n in model.graph.node for i in inputs_of(n)} | {o.name for o in model.graph.output}
    gone = set(names) - read
    # by index, from the end: neither a copy of the other (large) initializers nor a value compare
    for i in reversed([i for i, t in enumerate(model.graph.initializer) if t.name in gone]):
        del model.graph.initializer[i]
