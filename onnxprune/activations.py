"""Running models in ONNX Runtime: probe sessions that expose inner tensors, batched passes."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .calib import Calibration, model_inputs
from .errors import ModelError
from .graphview import inputs_of
from .io import add_initializers, copy_fields, inference_session
from .latency import require_provider
from .runtime import import_ort

ort = import_ort()

log = logging.getLogger(__name__)
DEFAULT_BATCH = 32


def session(model: onnx.ModelProto, threads: int = 0, provider: str = "cpu",
            source: onnx.ModelProto | None = None) -> ort.InferenceSession:
    """An ORT session for ``model`` with all graph optimisations, on the CPU or (``provider``
    "cuda" or "tensorrt") on CUDA with the CPU as fallback: calibration passes run one segment
    once, where building a TensorRT engine per segment would cost more than it saves.

    Its threads do not spin between runs: numpy's BLAS works on the activations in between, and
    spinning ORT threads took the cores from it (pruning resnet_fmnist on 2 shared cores: 71–110 s
    wall, 37–58 s CPU without spinning; 133–204 s, 71–113 s with)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # ORT's own error lines would repeat what its exception says (we report that)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    chain = ["CPUExecutionProvider"] if provider == "cpu" else [require_provider("cuda"), "CPUExecutionProvider"]
    return inference_session(model, opts, chain, source, hand=True)


# What ONNX Runtime raises when it cannot load or run a model (none derives from a common base).
ORT_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, name) for name in (
    "Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException", "InvalidProtobuf",
    "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail"))


def probe_model(model: onnx.ModelProto, outputs: Iterable[str]) -> onnx.ModelProto:
    """A model whose outputs are ``outputs``, holding only the nodes and initializers they need
    (copied part by part: a big model is never copied whole), without stale value_info."""
    names = list(dict.fromkeys(outputs))
    producer = {o: n for n in model.graph.node for o in n.output}
    needed, stack = set(), list(names)
    live = set()
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        node = producer.get(t)
        if node is not None and id(node) not in live:
            live.add(id(node))
            stack.extend(inputs_of(node))  # with the outer-scope tensors its subgraphs capture
    probe = onnx.ModelProto()
    copy_fields(model, probe, skip=("graph",))
    graph = probe.graph
    copy_fields(model.graph, graph, skip=("node", "initializer", "output", "value_info"))
    nodes = [n for n in model.graph.node if id(n) in live]
    graph.node.extend(nodes)
    declared = {o.name: o for o in model.graph.output}
    for name in names:
        vi = onnx.ValueInfoProto()
        if name in declared:
            vi.CopyFrom(declared[name])
        else:
            vi.name = name
        graph.output.append(vi)
    used = {i for n in nodes for i in inputs_of(n)} | set(names)
    add_initializers(graph, (t for t in model.graph.initializer if t.name in used))
    return probe


def static_batch(model: onnx.ModelProto) -> int | None:
    """The model's fixed batch size, or None when the batch dim is dynamic."""
    static = [inp.shape[0] for inp in model_inputs(model) if inp.shape and inp.shape[0] is not None]
    return static[0] if static else None


def batch_size_for(model: onnx.ModelProto, wanted: int = DEFAULT_BATCH) -> int:
    """The batch size a model accepts: its static batch dim, or ``wanted`` when dynamic."""
    return static_batch(model) or wanted


def padded_feed(calib: Calibration, idx: np.ndarray, static: int | None) -> dict[str, np.ndarray]:
    """The samples ``idx``; with a static batch size, the last batch padded to it."""
    feed = calib.take(idx)
    if static and len(idx) != static:
        feed = {k: np.concatenate([v, np.repeat(v[-1:], static - len(idx), axis=0)]) for k, v in feed.items()}
    return feed


def run_batches(model: onnx.ModelProto, outputs: Sequence[str], calib: Calibration,
                indices: Sequence[int], batch: int | None = None, provider: str = "cpu"
                ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Run ``model`` over ``calib[indices]`` in batches, yielding (sample indices, {output: array})."""
    # no value_info: shapes may be stale while pruning is under way; the probe is dropped once
    # ORT holds its own copy of it (no third copy of the weights while the batches run)
    sess = session(probe_model(model, outputs), provider=provider, source=model)
    names = list(dict.fromkeys(outputs))
    static = static_batch(model)
    bs = static or batch or DEFAULT_BATCH
    indices = np.asarray(indices)
    for start in range(0, len(indices), bs):
        idx = indices[start:start + bs]
        values = sess.run(names, padded_feed(calib, idx, static))
        if static and len(idx) < static:  # drop the padding: from batch-first tensors only
            values = [v[:len(idx)] if v.ndim and v.shape[0] == static else v for v in values]
        yield idx, dict(zip(names, values))


ACTIVATION_BUDGET = 1 << 30  # bytes of activations one ORT batch may hold


def fitting_batch(shapes: dict[str, tuple[int, ...]], wanted: int) -> int:
    """The largest batch (≤ ``wanted``) whose activations, summed over every tensor, fit the budget."""
    per_sample = sum(4 * int(np.prod(s[1:])) for s in shapes.values() if len(s) > 1)
    return max(1, min(wanted, ACTIVATION_BUDGET // max(per_sample, 1)))


def runs_batched(model: onnx.ModelProto, calib: Calibration, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether a model whose inputs declare a dynamic batch really runs two samples in one pass,
    given its :func:`tensor_shapes` (one sample). Some exports hard-code batch 1 inside
    (``x.view(1, -1)``): at batch 2 they fail, or fold the batch away (1 row for 2 samples)."""
    if static_batch(model) is not None or len(calib) < 2:
        return True
    names = [o.name for o in model.graph.output]
    try:
        ((_, two),) = run_batches(model, names, calib, [0, 1], 2)
    except ORT_ERRORS:
        return False
    return all(not (shapes.get(n) or ())[:1] == (1,) or (two[n].ndim and two[n].shape[0] == 2) for n in names)


def with_batch_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs declare batch 1, so every pass runs one sample."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in model_inputs(fixed):
        vi = next(v for v in fixed.graph.input if v.name == inp.name)
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = 1
    return fixed


def _batch_dims(model: onnx.ModelProto) -> list[onnx.TensorShapeProto.Dimension]:
    """The first dim of every declared graph input (not initializers) and output."""
    inits = {t.name for t in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in inits] + list(model.graph.output)
    return [v.type.tensor_type.shape.dim[0] for v in values
            if v.type.HasField("tensor_type") and len(v.type.tensor_type.shape.dim)]


FREED_BATCH = "onnxprune_batch"  # the symbolic batch dim free_batch declares


def free_batch(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Declare a symbolic batch dim, in place, on the graph inputs and outputs that declare batch
    1, and let each named Reshape whose constant target writes that 1 first (exporters fold
    ``x.view(x.size(0), -1)`` to ``[1, -1]`` at a static batch) copy the dim from its input
    instead (ONNX's 0; -1 where ``allowzero`` makes 0 a size and no other entry is -1), which is
    the same at batch 1. Returns those Reshapes' names, for
    :func:`declare_batch_as` to write their 1 back. ``shapes``: every tensor's at one sample."""
    for dim in _batch_dims(model):
        if dim.HasField("dim_value") and dim.dim_value == 1:
            dim.Clear()
            dim.dim_param = FREED_BATCH
    inits = {t.name: t for t in model.graph.initializer}
    freed = []
    for node in model.graph.node:
        target = inits.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
        if target is None or not node.name or shapes.get(node.input[0], ())[:1] != (1,):
            continue
        value = numpy_helper.to_array(target)
        if value.ndim != 1 or len(value) < 2 or value[0] != 1:
            continue
        if not next((a.i for a in node.attribute if a.name == "allowzero"), 0):
            _set_first(model, node, value, 0)
        elif not (value[1:] == -1).any() and not (value[1:] == 0).any():  # allowzero: 0 is a size
            _set_first(model, node, value, -1)
        else:
            continue
        freed.append(node.name)
    return freed


def _set_first(model: onnx.ModelProto, node: onnx.NodeProto, value: np.ndarray, first: int) -> None:
    """Give the Reshape ``node`` a target initializer of its own: ``value`` with ``first`` first
    (others reading the old one keep it; unread, it goes). Freeing names it ``<old>_batch``,
    writing the 1 back takes the old name again where it is free."""
    value = value.copy()
    value[0] = first
    old = node.input[1]
    names = {t.name for t in model.graph.initializer}
    readers = sum(i == old for n in model.graph.node for i in inputs_of(n))
    if readers == 1 and old not in {o.name for o in model.graph.output}:
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == old))
        names.discard(old)
    base = old[:-len("_batch")] if old.endswith("_batch") else f"{old}_batch"
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}{i}"
    model.graph.initializer.append(numpy_helper.from_array(value, name))
    node.input[1] = name


def declare_batch_as(model: onnx.ModelProto, like: onnx.ModelProto, reshapes: Sequence[str] = ()) -> None:
    """Undo :func:`free_batch`, in place, on a model derived from the freed one: its graph inputs
    and outputs get the first dim ``like`` declares for the same names, and the ``reshapes`` it
    returned write their 1 again."""
    inits = {t.name for t in like.graph.initializer}
    declared = {v.name: v.type.tensor_type.shape.dim[0]
                for v in [*(v for v in like.graph.input if v.name not in inits), *like.graph.output]
                if v.type.HasField("tensor_type") and len(v.type.tensor_type.shape.dim)}
    for v in [*model.graph.input, *model.graph.output]:
        dims = v.type.tensor_type.shape.dim if v.type.HasField("tensor_type") else []
        if v.name in declared and len(dims) and dims[0].dim_param == FREED_BATCH:
            dims[0].CopyFrom(declared[v.name])
    if reshapes:
        targets = {t.name: t for t in model.graph.initializer}
        names = set(reshapes)
        for node in model.graph.node:
            if node.op_type == "Reshape" and node.name in names and node.input[1] in targets:
                value = numpy_helper.to_array(targets[node.input[1]])
                if value.ndim == 1 and len(value) and value[0] in (0, -1):
                    _set_first(model, node, value, 1)


def batches_like_singles(model: onnx.ModelProto, calib: Calibration) -> bool:
    """Whether ``model`` run on two samples together gives every output as the two run one at a
    time (rows stacked on the first dim, to float rounding). A graph exported at batch 1 can hold
    the 1 inside (``x.view(1, -1)``, a Reshape to ``[1, C, H·W]``): it then fails at batch 2, folds
    the batch away, or mixes the samples."""
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


def tensor_shapes(model: onnx.ModelProto, calib: Calibration) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor for one calibration sample (batch dim as run), found by running it."""
    names = [o for n in model.graph.node for o in n.output if o]
    inputs = {i.name for i in model_inputs(model)}
    try:  # the first run of the user's model on the user's data: its failures are theirs
        _, values = next(run_batches(model, names, calib, [0], 1))
    except ORT_ERRORS as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ModelError(f"ONNX Runtime cannot run the model on the calibration data ({reason}); check that the "
                         "model runs in ONNX Runtime (custom ops, training-mode nodes) and the data fits its inputs"
                         ) from None
    shapes = {n: tuple(int(d) for d in v.shape) for n, v in values.items()}
    feed = calib.take([0])
    shapes.update({n: tuple(v.shape) for n, v in feed.items() if n in inputs})
    return shapes
