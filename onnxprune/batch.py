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

from .activations import ORT_ERRORS, run_batches, static_batch
from .calib import Calibration, format_shape, model_inputs
from .errors import ModelError
from .graphview import GraphView
from .ops import LinearHandler, handler_for

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


COMPARED_BYTES = 1 << 27  # bytes per sample of the tensors one comparison run fetches


def batches_like_singles(model: onnx.ModelProto, calib: Calibration, names: Sequence[str] = (),
                         shapes: dict[str, tuple[int, ...]] | None = None) -> bool:
    """Whether ``model`` run on two samples together gives the tensors ``names`` (default: the
    graph outputs) as the two run one at a time (to float rounding): stacked on the batch axis —
    the axis one sample gives 1 and two give 2, the first where there are several (axis 1 of a
    time-major ``[T, N, C]``) — or the same for both where an output does not depend on the batch.
    A graph can hold the batch inside where its declared batch does not show it (a Reshape to
    ``[8, 64]`` dropping it, a Gather of fixed positions, ``x.view(1, -1)`` under a dynamic
    batch): it then fails at batch 2, folds the batch away, or mixes samples. With ``shapes`` (one
    sample's), the tensors are fetched a part of about ``COMPARED_BYTES`` per sample at a time."""
    if len(calib) < 2:
        return False
    names = list(names) or [o.name for o in model.graph.output]
    parts, size = [[]], 0
    for name in names:
        nbytes = 4 * int(np.prod((shapes or {}).get(name, ())))
        if parts[-1] and size + nbytes > COMPARED_BYTES:
            parts, size = parts + [[]], 0
        parts[-1].append(name)
        size += nbytes
    for part in parts:
        try:
            ((_, two),) = run_batches(model, part, calib, [0, 1], 2)
            ones = [values for _, values in run_batches(model, part, calib, [0, 1], 1)]
        except ORT_ERRORS:
            return False
        if not all(_stacks(two[name], [one[name] for one in ones]) for name in part):
            return False
    return True


def check_batch_axis(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise :class:`ModelError` unless some conv runs one row of its batch axis (ONNX's N) per
    sample fed, given the :func:`tensor_shapes` of one feed: the passes take a layer's rows as the
    samples. An input without a batch axis (``[3, H, W]``: torchvision's detectors) feeds its
    first axis as samples while the convs run batch 1; a graph that folds frames into the batch
    runs several rows per sample in every conv. Convs that run windows folded into the batch
    where others do not (EfficientViT's attention) are not sampled (``ops.batch_first``) and keep
    their channels; the rest of the model is pruned."""
    fed = static_batch(model) or 1
    convs = [node for node in model.graph.node if _reads_patches(node)]
    rows = [(shapes.get(node.input[0]) or (fed,))[0] for node in convs]  # axis 0 is ONNX's N
    if convs and fed not in rows:
        node, first = convs[0], model_inputs(model)[0]
        raise ModelError(
            f"Conv '{node.name or node.output[0]}' runs {rows[0]} rows on its batch axis for {fed} sample(s) fed "
            f"along the first axis of input '{first.name}' {format_shape(first.shape)}: onnxprune feeds samples along "
            "the batch axis the layers run on; for an input that takes one sample without a batch axis, give the "
            f"samples stacked on a new first axis (e.g. [N, {', '.join(str(d) for d in first.shape)}]), else export "
            "the model with a batch axis its convs keep")


def inputs_without_batch_axis(model: onnx.ModelProto) -> frozenset[str]:
    """Inputs of static shape whose values reach a conv (axis 0 is ONNX's N) that has one more axis
    than they do: the model takes one sample without a batch axis and adds it inside (torchvision's
    detectors take ``[3, H, W]``). Read from the graph (ONNX shape inference), for runs without
    calibration data, which otherwise tell it (:func:`~onnxprune.calib.unbatched`)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference fails on some valid graphs; then none is known
        return frozenset()
    graph = inferred.graph
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*graph.value_info, *graph.input]
             if vi.type.tensor_type.HasField("shape")}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = set()
    for inp in model_inputs(model):
        if None in inp.shape:
            continue
        seen, frontier = {inp.name}, [inp.name]
        while frontier:
            node = next((n for t in frontier for n in readers.get(t, []) if _reads_patches(n)), None)
            if node is not None:
                if ranks.get(node.input[0]) == len(inp.shape) + 1:
                    found.add(inp.name)
                break
            frontier = [o for t in frontier for n in readers.get(t, []) for o in n.output if o and o not in seen]
            seen.update(frontier)
    return frozenset(found)


def _reads_patches(node: onnx.NodeProto) -> bool:
    handler = handler_for(node)
    return isinstance(handler, LinearHandler) and handler.spatial


def layer_outputs(model: onnx.ModelProto) -> list[str]:
    """The outputs of the layers the passes sample and refit (Conv, Gemm, MatMul, …): a graph
    output may reduce over the batch by design (a batch mean); these must not."""
    return [n.output[0] for n in model.graph.node if n.output and isinstance(handler_for(n), LinearHandler)]


def _stacks(both: np.ndarray, singles: list[np.ndarray]) -> bool:
    """Whether ``both`` is ``singles`` stacked on their batch axis, equal to each of them, or —
    where the batch is merged into another axis (``[T·N, C]`` token rows) — their values in
    another order."""
    first = singles[0]
    if any(one.shape != first.shape or one.dtype != both.dtype for one in singles):
        return False
    if both.shape == first.shape:
        return all(_close(both, one) for one in singles)
    axes = [a for a in range(first.ndim) if first.shape[a] == 1 and both.shape == first.shape[:a] + (2,) + first.shape[a + 1:]]
    if axes:
        return _close(both, np.concatenate(singles, axis=axes[0]))
    # sorting moves each value by at most the largest difference: rounding stays rounding
    return both.size == 2 * first.size and _close(np.sort(both, axis=None), np.sort(np.concatenate(singles, axis=None)))


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype.kind != "f":
        return np.array_equal(a, b)
    finite = np.isfinite(b)  # an overflowing model is stopped later, by the check that names the layer
    scale = float(np.abs(b[finite]).max()) if finite.any() else 0.0
    return bool(np.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1e-30), equal_nan=True))


_UNBATCHED = "_onnxprune_unbatched"  # the name an input without a batch axis takes inside, while pruned


def with_batch_axis(model: onnx.ModelProto, names: frozenset[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs ``names``, declared without a batch axis (``[3, H, W]``),
    take one of size 1 that a ``Squeeze`` removes at once: every pass then feeds samples as for a
    model exported at batch 1. Undone by :func:`without_batch_axis`."""
    batched = onnx.ModelProto()
    batched.CopyFrom(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    squeezes = []
    for vi in batched.graph.input:
        if vi.name not in names:
            continue
        inner = vi.name + _UNBATCHED
        _rename_reads(batched.graph, vi.name, inner)
        dims = [onnx.TensorShapeProto.Dimension(dim_value=1), *vi.type.tensor_type.shape.dim]
        del vi.type.tensor_type.shape.dim[:]
        vi.type.tensor_type.shape.dim.extend(dims)
        if opset >= 13:  # axes became an input
            axes = inner + "_axes"
            batched.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), axes))
            squeezes.append(onnx.helper.make_node("Squeeze", [vi.name, axes], [inner], name=inner))
        else:
            squeezes.append(onnx.helper.make_node("Squeeze", [vi.name], [inner], name=inner, axes=[0]))
    _set_nodes(batched, [*squeezes, *batched.graph.node])
    return batched


def without_batch_axis(model: onnx.ModelProto, names: frozenset[str]) -> None:
    """Undo :func:`with_batch_axis`, in place, on a model derived from the batched one."""
    for vi in model.graph.input:
        if vi.name not in names:
            continue
        inner = vi.name + _UNBATCHED
        for i in reversed([i for i, n in enumerate(model.graph.node) if n.name == inner]):
            del model.graph.node[i]
        _rename_reads(model.graph, inner, vi.name)
        dims = list(vi.type.tensor_type.shape.dim)[1:]
        del vi.type.tensor_type.shape.dim[:]
        vi.type.tensor_type.shape.dim.extend(dims)
    if names:
        GraphView(model).drop_unused_initializers()


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every node of ``graph`` and of its subgraphs (If/Loop bodies) read ``new`` for ``old``."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _rename_reads(sub, old, new)


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
