"""Graph clean-ups done before analysis: constants (nodes and what is computed from them alone)
to initializers, subnormal weights to zero, BN folded into Conv, zero padding into the Conv
that reads it, channel shuffles as channel Gathers, spelled-out group norms as one node (spelled
out again before a model is handed back), means over channels of per-channel norms as a sum and
a scale."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graphview import GraphView, attr, set_attr
from .ops import FOLDED_DOMAIN, handler_for
from .ops.spatial import norms_channel_axis
from .ops.shapes import MOVE_OPS, ShapeValues, is_channel_dim, move
from .rewrite import drop_dead_nodes


# ops never evaluated ahead of time: random, quantization (the model would stop reading as
# quantized), control flow, ops whose output size is read from an input (a hostile file could ask
# for any amount of memory; folded, they would only make the file larger), and the ones handled
# by name below
_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
               "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "If", "Loop", "Scan",
               "ConstantOfShape", "Expand", "Tile", "Range", "OneHot", "EyeLike", "Resize", "Upsample", "Pad",
               "Constant", "Identity"}


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn ``Constant`` nodes, ``Identity`` copies of initializers (PyTorch's exporter shares
    equal weights that way), and nodes computed from constants alone (a bias ``Reshape``-d to
    ``[1, C, 1, 1]`` by Paddle's exporter, a ``Cast`` or ``Unsqueeze`` of a weight) into
    initializers, so every weight is seen the same way; each copy becomes a weight of its own,
    free to be sliced for its own layer."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    fed = {i.name for i in graph.input}  # an initializer that is also an input can be overridden at run time
    inits = {t.name: t for t in graph.initializer}
    keep, moved = [], 0
    for node in graph.node:
        values = None
        if node.domain in ("", "ai.onnx") and node.output and not outputs.intersection(node.output):
            if node.op_type == "Constant":
                value = _constant_value(node)
                values = None if value is None else [value]
            elif node.op_type == "Identity" and node.input and node.input[0] in inits:
                values = [numpy_helper.to_array(inits[node.input[0]])]
            elif node.op_type not in _NOT_FOLDED and node.input and \
                    all(i in inits and i not in fed or not i for i in node.input):
                values = _evaluate(node, [inits[i] for i in node.input if i], model.opset_import)
        if values is not None:
            for name, value in zip(node.output, values):
                if name:
                    inits[name] = numpy_helper.from_array(np.asarray(value), name)
                    graph.initializer.append(inits[name])
            moved += 1
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return moved


def subnormal_weights(model: onnx.ModelProto) -> dict[str, int]:
    """How many weights (float32 and float64 initializers and ``Constant`` values) are subnormal —
    nonzero but below the format's smallest normal number, 1.2e-38 in float32 — per tensor, where
    any. Training with weight decay can leave them by the hundred thousand, and x86 CPUs compute
    each product with one in microcode, many times slower: a layer holding them runs as if it had
    tens of times its MACs (ORT does not flush them unless asked). float16 ones are left out: they
    are ordinary values at float16's precision (its smallest normal is 6.1e-5, so a model converted
    to half precision holds them by the thousand), they become normal float32 values where a CPU
    kernel widens them, and GPUs compute with them at full speed."""
    counts = {tensor.name: int(_subnormal(numpy_helper.to_array(tensor)).sum()) for tensor in _float_weights(model)}
    return {name: count for name, count in counts.items() if count}


def flush_subnormal_weights(model: onnx.ModelProto) -> dict[str, int]:
    """Set the :func:`subnormal_weights` to zero, in place; how many per tensor. What they add to
    an output is below float32's resolution of any normal value it is added to."""
    flushed = {}
    for tensor in _float_weights(model):
        value = numpy_helper.to_array(tensor)
        subnormal = _subnormal(value)
        if subnormal.any():
            tensor.CopyFrom(numpy_helper.from_array(np.where(subnormal, np.zeros((), value.dtype), value), tensor.name))
            flushed[tensor.name] = int(subnormal.sum())
    return flushed


def _float_weights(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The float32 and float64 initializers and ``Constant`` values held in the file (not external
    data)."""
    tensors = list(model.graph.initializer) + [a.t for node in model.graph.node
                                               if node.op_type == "Constant" and node.domain in ("", "ai.onnx")
                                               for a in node.attribute if a.name == "value"]
    return [t for t in tensors if t.data_location != onnx.TensorProto.EXTERNAL and
            t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)]


def _subnormal(value: np.ndarray) -> np.ndarray:
    """Where ``value`` is nonzero and below its dtype's smallest normal number."""
    return (value != 0) & (np.abs(value) < np.finfo(value.dtype).tiny)


def _evaluate(node: onnx.NodeProto, inputs: list[onnx.TensorProto], opsets) -> list[np.ndarray] | None:
    """The outputs of ``node`` on constant ``inputs``, or None where it cannot or should not be
    folded (an op the reference runtime lacks, or a result larger than what it is made of: an
    attention-bias table gathered by constant indices, folded, would make the pruned model larger
    than the original)."""
    from onnx.reference import ReferenceEvaluator

    graph = onnx.helper.make_graph([node], "fold", [], [onnx.ValueInfoProto(name=o) for o in node.output if o],
                                   initializer=inputs)
    try:
        values = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=opsets)).run(None, {})
    except Exception:  # noqa: BLE001 - any failure just leaves the node computed at run time
        return None
    size_in = sum(int(np.prod(t.dims)) for t in inputs)
    if any(not isinstance(v, np.ndarray) for v in values) or \
            sum(v.size for v in values) > size_in:
        return None
    return values


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


def fold_pads(model: onnx.ModelProto) -> int:
    """Fold every zero, constant-mode ``Pad`` of spatial axes into the ``Conv``\\ s that alone read
    it (PyTorch's exports of TF "same" padding with its amounts known ahead of run time, Keras'
    ``ZeroPadding2D`` before a strided conv): the conv pads itself, so a depthwise-separable block
    reads as conv → activation → conv, the shape the refinement walks, and the model runs one op
    less. Amounts computed at run time fold where the sizes they are computed from are declared
    static (timm's ``pad_same`` exported at a fixed size); from a dynamic size they stay. Returns
    how many were folded."""
    if not any(n.op_type == "Pad" for n in model.graph.node):
        return 0
    shapes, static = _declared_shapes(model)
    g = GraphView(model, shapes)
    values = ShapeValues(g)
    folded = 0
    for pad in g.nodes_by_type("Pad"):
        out = pad.output[0] if pad.output else ""
        readers = g.consumers.get(out, [])
        if not readers or out in g.graph_outputs or pad.domain not in ("", "ai.onnx") or \
                attr(pad, "mode", b"constant") not in (b"constant", "constant"):
            continue
        convs_read_it = all(r.op_type == "Conv" and r.domain in ("", "ai.onnx") and r.input[0] == out and
                            out not in r.input[1:] and attr(r, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
                            for r in readers)
        amounts = _spatial_pads(pad, g, values, static) if convs_read_it else None
        if amounts is None:
            continue
        own = [list(attr(conv, "pads", [0] * len(amounts))) for conv in readers]
        if any(len(p) != len(amounts) for p in own):
            continue
        for conv, p in zip(readers, own):
            set_attr(conv, "pads", [int(a + b) for a, b in zip(p, amounts)])
            conv.input[0] = pad.input[0]
        folded += 1
    if folded:  # the Pads and what computed their amounts go, unless a subgraph still reads them
        drop_dead_nodes(model)
        GraphView(model).drop_unused_initializers()
    return folded


def _declared_shapes(model: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...]], set[tuple[str, int]]]:
    """The tensor shapes ONNX's shape inference finds from the declared inputs (a dim it cannot fix
    read as 1) and the dims among them that are fixed for every input the model accepts. A batch
    axis never counts as fixed: a declared batch of 1 may be freed later."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - where inference fails, only constant amounts fold
        return {}, set()
    shapes, static = {}, set()
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        t = info.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        shapes[info.name] = tuple(d or 1 for d in dims)
        static.update((info.name, a) for a, d in enumerate(dims) if d and a > 0)
    return shapes, static


def _spatial_pads(pad: onnx.NodeProto, g: GraphView, values: ShapeValues,
                  static: set[tuple[str, int]]) -> list[int] | None:
    """``pad``'s amounts on the spatial axes, begins then ends, as a conv's ``pads`` lists them,
    where it pads nothing but them, by non-negative amounts fixed ahead of run time (constants,
    or computed from ``static`` dims alone), with zeros; else None."""
    value = pad.input[2] if len(pad.input) > 2 and pad.input[2] else None
    if value is not None and (not g.is_const(value) or np.any(g.const(value) != 0)) or \
            float(attr(pad, "value", 0.0)) != 0.0:  # opset 11 on: an input; before: an attribute
        return None
    # where shape inference failed, the amounts (every axis' begin and end) give the rank
    given = values.of(pad.input[1]) if len(pad.input) > 1 and pad.input[1] else attr(pad, "pads")
    rank = None if g.shape(pad.input[0]) or given is None else len(given) // 2
    found = handler_for(pad).amounts(pad, g, values, rank)
    if found is None:
        return None
    entries, axes = found
    if not all(e.value is not None and e.dims <= static for e in entries):
        return None
    known = [int(e.value) for e in entries]
    half = len(known) // 2
    if half < 3 or axes != list(range(half)) or min(known) < 0 or any(known[i] or known[i + half] for i in (0, 1)):
        return None
    return known[2:half] + known[half + 2:]


SHUFFLE_MAX_VALUES = 1 << 22  # the map a shuffle is run on, as element indices, holds at most this many


def fold_channel_shuffles(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Rewrite every channel shuffle as one ``Gather`` of channels per map it makes, which the
    channel analysis follows (the shuffle's ``Reshape`` to more axes would stop it). A shuffle is a
    region of layout ops (``Reshape``, ``Transpose``, ``Gather``, ``Squeeze``, ``Unsqueeze``) from a
    ``[N, C, H, W]`` map to maps ``[N, C', H, W]`` that each hold some of its channels, each at most
    once, at the same positions: ShuffleNetV2's ``view → transpose → view`` (torchvision,
    YOLOv8-lite's backbone) or its halves taken by ``Gather`` (the original release,
    YOLO-FastestV2). The region is run on the map's element indices at ``shapes`` (measured), so
    any spelling folds and nothing else does. Its parameters are constants, except a ``Reshape``
    target computed at run time whose every entry is a constant, a copy of a dim (``x.size(0)``)
    or computed from channel counts alone (``x.size(1) // 2``): such a target follows the batch
    and the positions, and the channels it moves are the same at every size. A pooling op whose
    window is one element only subsamples, and is read as a strided slice: LPRNet's ``MaxPool3d``,
    exported as ``Transpose → MaxPool`` (kernel 1, stride 2 along the channels) ``→ Transpose``,
    picks every second channel. Returns how many maps were rewritten."""
    g = GraphView(model, shapes)
    starts = [n.input[0] for n in g.nodes_by_type("Reshape")]
    starts += [n.input[0] for n in g.nodes_by_type("Transpose")
               if any(r.domain in ("", "ai.onnx") and handler_for(r).subsample_strides(r)
                      for r in g.consumers.get(n.output[0], []))]
    if not starts:
        return 0
    values = ShapeValues(g)
    rewrites: list[tuple[str, str, np.ndarray]] = []  # (map made, map it selects from, channels)
    for start in dict.fromkeys(t for t in starts if t):
        shape = g.shape(start)
        if shape is None or len(shape) != 4 or g.is_const(start) or int(np.prod(shape)) > SHUFFLE_MAX_VALUES:
            continue
        found = _shuffle_region(g, values, start, shape)
        rewrites += [(end, start, channels) for end, channels in (found or {}).items()]
    for end, start, channels in rewrites:
        node = g.producer[end]
        node.op_type, node.domain = "Gather", ""
        del node.input[:], node.attribute[:]
        node.input.extend([start, ""])
        node.attribute.append(onnx.helper.make_attribute("axis", 1))
        g.set_const(node, 1, channels)
    if rewrites:  # the shuffles' other ops go (their shape arithmetic too), unless something else reads them
        drop_dead_nodes(model)
        GraphView(model).drop_unused_initializers()
    return len(rewrites)


def _shuffle_region(g: GraphView, values: ShapeValues, start: str,
                    shape: tuple[int, ...]) -> dict[str, np.ndarray] | None:
    """The maps a shuffle makes from ``start`` (read only through ops that move entries with
    parameters :func:`_layout_params` knows, to maps ``[N, C', H, W]`` that something else reads),
    each with the channels of ``start`` it holds; None where ``start`` is not read that way."""
    n, c, h, w = shape
    maps = {start: np.arange(n * c * h * w, dtype=np.int64).reshape(shape)}
    positions = np.arange(h * w, dtype=np.int64).reshape(1, 1, h, w)
    samples = np.arange(n, dtype=np.int64).reshape(n, 1, 1, 1) * c * h * w

    def selected(out: np.ndarray) -> np.ndarray | None:
        """The channels of ``start`` a map holds, each once, at their positions; else None."""
        if out.ndim != 4 or out.shape[0] != n or out.shape[2:] != (h, w):
            return None
        channels = out[0, :, 0, 0] // (h * w)
        same = len(np.unique(channels)) == len(channels) and \
            np.array_equal(out, samples + channels.reshape(1, -1, 1, 1) * h * w + positions)
        return channels if same else None

    ends: dict[str, np.ndarray] = {}
    stack, inside = [start], set()
    while stack:
        tensor = stack.pop()
        for node in g.consumers.get(tensor, []):
            readable = node.input[0] == tensor and node.domain in ("", "ai.onnx") and id(node) not in inside
            strides = handler_for(node).subsample_strides(node) if readable else None
            param = _layout_params(node, g, values) if readable and node.op_type in MOVE_OPS else None
            if param is None and strides is None:
                if tensor != start:
                    return None  # a shuffle's inner tensor read by something else
                continue
            inside.add(id(node))
            try:
                out = move(node, maps[tensor], param[0]) if param is not None else \
                    maps[tensor][(Ellipsis, *(slice(None, None, s) for s in strides))]
            except (ValueError, IndexError, TypeError):  # parameters that do not fit the map: no shuffle
                return None
            if strides is not None and g.shape(node.output[0]) not in (None, out.shape):
                return None
            name = node.output[0]
            maps[name] = out
            channels = selected(out)
            if channels is not None:
                ends[name] = channels
            else:  # inside the region (a map of the end's shape that is not a selection, too)
                if name in g.graph_outputs:
                    return None
                stack.append(name)
    if not ends or any(t in g.graph_outputs or not g.consumers.get(t) for t in ends):
        return None
    # a map unchanged has nothing to rewrite
    found = {name: channels for name, channels in ends.items() if not np.array_equal(channels, np.arange(c))}
    return found or None


def _layout_params(node: onnx.NodeProto, g: GraphView, values: ShapeValues) -> tuple | None:
    """A layout op's parameter as :func:`~onnxprune.ops.shapes.move` takes it (a ``Reshape``
    target, ``Gather`` indices, ``Squeeze`` / ``Unsqueeze`` axes, None where it has none), in a
    1-tuple, where the graph fixes it (see :func:`fold_channel_shuffles`); else None."""
    rest = [i for i in node.input[1:] if i]
    if node.op_type == "Reshape" and rest and not g.is_const(rest[0]):
        entries = values.of(rest[0])
        if entries is None or entries.ndim != 1 or not all(
                e.value is not None and (e.constant or e.exact is not None or all(is_channel_dim(g, d) for d in e.dims))
                for e in entries.flat):
            return None
        return (np.array([int(e.value) for e in entries.flat], dtype=np.int64),)
    if any(not g.is_const(i) for i in rest) or (not rest and node.op_type in ("Reshape", "Gather")):
        return None
    if rest:
        return (np.asarray(g.const(rest[0])),)
    return (attr(node, "axes") if node.op_type in ("Squeeze", "Unsqueeze") else None,)


GROUP_NORM = "GroupNormalization"  # the folded node's op type, in FOLDED_DOMAIN


def fold_group_norms(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Rewrite every group normalisation spelled out as ``Reshape`` to ``[N, G, -1]`` →
    ``InstanceNormalization`` over the G rows → ``Reshape`` back to the input's shape (read with
    ``Shape`` or written as a constant) — PyTorch's ``nn.GroupNorm`` before opset 21, from either
    exporter, its affine ``Mul``/``Add`` following as per-channel constants — as one node,
    ``GroupNormalization`` of onnxprune's domain, defined by a model-local function holding the
    same three ops: ONNX Runtime runs it as it ran them, and the channel analysis reads one op that
    passes whole groups of channels (the two ``Reshape``\\ s would stop it). :func:`unfold_group_norms`
    spells it out again. ``shapes``: measured. Returns how many were folded."""
    g = GraphView(model, shapes)
    folds = []
    for norm in g.nodes_by_type("InstanceNormalization"):
        split = g.producer.get(norm.input[0])
        readers = g.consumers.get(norm.output[0], [])
        back = readers[0] if len(readers) == 1 else None
        if split is None or back is None or split.op_type != "Reshape" or back.op_type != "Reshape" or \
                any(n.domain not in ("", "ai.onnx") for n in (split, norm, back)) or attr(split, "allowzero", 0) or \
                len(g.consumers.get(split.output[0], [])) != 1 or \
                {split.output[0], norm.output[0]} & g.graph_outputs or back.input[0] != norm.output[0]:
            continue
        x, shape = split.input[0], g.shape(split.input[0])
        target, scale = g.input_const(split, 1), g.input_const(norm, 1)
        if shape is None or len(shape) < 3 or target is None or scale is None or target.shape != (3,) or \
                scale.size < 1 or shape[1] % scale.size or target[1] != scale.size or target[0] not in (0, shape[0]) or \
                target[2] not in (-1, int(np.prod(shape[1:])) // scale.size) or not _reads_shape_of(back, x, shape, g):
            continue
        folds.append((split, norm, back))
    if not folds:
        return 0
    drop = set()
    for split, norm, back in folds:
        name = norm.name or norm.output[0]
        target = f"{name}/groups"
        while target in g.initializers or target in g.producer:
            target += "_"
        groups = numpy_helper.from_array(np.array([0, g.input_const(split, 1)[1], -1], np.int64), target)
        model.graph.initializer.append(groups)
        folded = onnx.helper.make_node(GROUP_NORM, [split.input[0], norm.input[1], norm.input[2], groups.name],
                                       [back.output[0]], name=name, domain=FOLDED_DOMAIN,
                                       epsilon=float(attr(norm, "epsilon", 1e-5)))
        back.CopyFrom(folded)
        drop.update((id(split), id(norm)))
    nodes = [n for n in model.graph.node if id(n) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    version = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if not any(o.domain == FOLDED_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(FOLDED_DOMAIN, 1))
    if not any(f.domain == FOLDED_DOMAIN and f.name == GROUP_NORM for f in model.functions):
        epsilon = onnx.AttributeProto(name="epsilon", ref_attr_name="epsilon", type=onnx.AttributeProto.FLOAT)
        model.functions.append(onnx.helper.make_function(
            FOLDED_DOMAIN, GROUP_NORM, ["X", "scale", "bias", "target"], ["Y"],
            _group_norm_nodes("X", "scale", "bias", "target", "Y", epsilon, ""),
            [onnx.helper.make_opsetid("", version)], ["epsilon"]))
    drop_dead_nodes(model)  # the Shape that read the input's shape, unless something else reads it
    GraphView(model).drop_unused_initializers()
    return len(folds)


def unfold_group_norms(model: onnx.ModelProto) -> int:
    """Spell every node :func:`fold_group_norms` made out again as ``Reshape → InstanceNormalization
    → Reshape`` (the second reads the input's shape), in place, and drop onnxprune's function and
    domain from the model. Returns how many were spelled out."""
    nodes, count = [], 0
    taken = {t for n in model.graph.node for t in [*n.input, *n.output]} | {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.domain != FOLDED_DOMAIN or node.op_type != GROUP_NORM:
            nodes.append(node)
            continue
        epsilon = onnx.helper.make_attribute("epsilon", float(attr(node, "epsilon", 1e-5)))
        prefix = f"{node.name or node.output[0]}/"
        while any(f"{prefix}{t}" in taken for t in ("rows", "normalised", "shape")):  # a file's own names
            prefix += "_"
        nodes += _group_norm_nodes(*node.input[:4], node.output[0], epsilon, prefix)
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    kept = [f for f in model.functions if f.domain != FOLDED_DOMAIN]
    del model.functions[:]
    model.functions.extend(kept)
    opsets = [o for o in model.opset_import if o.domain != FOLDED_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return count


def _group_norm_nodes(x: str, scale: str, bias: str, target: str, y: str, epsilon: onnx.AttributeProto,
                      prefix: str) -> list[onnx.NodeProto]:
    """The ops of a group normalisation of ``x`` into ``y`` (``target``: ``[0, G, -1]``; ``scale``
    and ``bias``: per group); their own tensors and nodes named with ``prefix``."""
    rows, normed, shape = f"{prefix}rows", f"{prefix}normalised", f"{prefix}shape"
    norm = onnx.helper.make_node("InstanceNormalization", [rows, scale, bias], [normed], name=f"{prefix}InstanceNormalization")
    norm.attribute.append(epsilon)
    return [onnx.helper.make_node("Reshape", [x, target], [rows], name=f"{prefix}Reshape"), norm,
            onnx.helper.make_node("Shape", [x], [shape], name=f"{prefix}Shape"),
            onnx.helper.make_node("Reshape", [normed, shape], [y], name=f"{prefix}Reshape_back")]


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def fold_channel_means(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Write every mean over the channels of per-channel norms (:func:`norms_channel_axis`) as
    their sum times 1/C (``ReduceSum`` → ``Mul``): a pruned channel then leaves the sum as a zero
    channel would, and the pruner refits the scale so that the sum over the channels kept stands
    in for the sum over all of them; a mean of the channels kept would need a factor no constant
    holds. The same values to rounding. Models holding weights of another floating-point precision
    than float32 are left as they are. ``shapes``: measured (the new sum's is added). Returns how
    many were rewritten."""
    floats = {t.data_type for t in model.graph.initializer if t.data_type in _FLOAT_TYPES}
    if floats - {onnx.TensorProto.FLOAT}:  # the scale is written as float32: not among other precisions
        return 0
    g = GraphView(model, shapes)
    means = [(n, axis) for n in g.nodes_by_type("ReduceMean") if (axis := norms_channel_axis(n, g)) is not None]
    if not means:
        return 0
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    rewritten = {}
    for node, axis in means:
        name = node.name or node.output[0]
        summed, scale, axes = f"{name}/sum", f"{name}/scale", f"{name}/axes"
        while any(t in g.initializers or t in g.producer for t in (summed, scale, axes)):
            summed, scale, axes = summed + "_", scale + "_", axes + "_"
        channels = shapes[node.input[0]][axis]
        model.graph.initializer.append(numpy_helper.from_array(np.array(1.0 / channels, np.float32), scale))
        if opset >= 13:  # ReduceSum takes its axes as an input from opset 13
            model.graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axes))
            reduce = onnx.helper.make_node("ReduceSum", [node.input[0], axes], [summed], name=f"{name}/ReduceSum")
        else:
            reduce = onnx.helper.make_node("ReduceSum", [node.input[0]], [summed], name=f"{name}/ReduceSum",
                                           axes=[axis])
        rewritten[id(node)] = [reduce, onnx.helper.make_node("Mul", [summed, scale], [node.output[0]], name=name)]
        shapes[summed] = shapes[node.output[0]]
    nodes = [m for n in model.graph.node for m in rewritten.get(id(n), [n])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    GraphView(model).drop_unused_initializers()  # a ReduceMean's own axes input (opset 18)
    return len(means)


def _reads_shape_of(back: onnx.NodeProto, x: str, shape: tuple[int, ...], g: GraphView) -> bool:
    """Whether the ``Reshape`` ``back`` restores ``x``'s shape: it reads ``Shape(x)`` whole, or a
    constant equal to ``x``'s (measured) shape."""
    source = g.producer.get(back.input[1])
    if source is not None and source.op_type == "Shape" and source.domain in ("", "ai.onnx"):
        return source.input[0] == x and attr(source, "start", 0) == 0 and attr(source, "end", None) is None
    value = g.input_const(back, 1)
    return value is not None and tuple(int(v) for v in value) == tuple(shape) and not attr(back, "allowzero", 0)
