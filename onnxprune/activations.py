"""Running models in ONNX Runtime: probe sessions that expose inner tensors, batched passes."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx

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
