"""What a model costs and what could be pruned: the ``inspect``, ``gate`` and ``bench`` subcommands."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .activations import (ORT_ERRORS, batch_size_for, fitting_batch, padded_feed, session, static_batch,
                          tensor_shapes)
from .batch import inputs_without_batch_axis, with_batch_axis
from .budget import count_params, graph_macs
from .calib import (Calibration, ImageOptions, dynamic_inputs, load_calibration, model_inputs,
                    zeros_calibration)
from .candidates import choose_candidates
from .fold import (constants_to_initializers, fold_batchnorm, fold_channel_means, fold_channel_shuffles, fold_group_norms,
                   fold_pads, subnormal_weights)
from .errors import CalibrationError, ModelError, OptionError
from .graph import find_groups
from .graphview import GraphView, node_name
from .io import load_model, model_bytes
from .latency import Latency, OpTimes, measure, op_times
from .ops import handler_for
from .prunable import Barrier, prunability
from .quantize import dequantized
from .report import LayerRow, Totals
from .runtime import import_ort
from .verify import OutputFidelity, compare

log = logging.getLogger(__name__)


@dataclass
class ModelSummary:
    """Cost of a model at one input shape, its prunable channel groups and MACs, and its barriers."""

    macs: int
    params: int
    size_bytes: int
    groups: list[tuple[str, int, str]] = field(default_factory=list)  # (name, channels, "" or why not)
    inputs: dict[str, list[int]] = field(default_factory=dict)  # the input shapes the figures are at
    prunable_macs: int = 0  # of Conv/Gemm/MatMul layers a default run can narrow (see prunable.py)
    residual_macs: int = 0  # further MACs --prune-residual reaches
    barriers: list[Barrier] = field(default_factory=list)  # most locked MACs first
    subnormal_weights: int = 0  # nonzero weights below float's smallest normal (slow on CPUs; pruning zeroes them)

    @property
    def prunable_fraction(self) -> float:
        return self.prunable_macs / self.macs if self.macs else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"prunable_fraction": self.prunable_fraction}

    def text(self, max_barriers: int = 20) -> str:
        prunable = [g for g in self.groups if not g[2]]
        shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in self.inputs.items())
        lines = [f"input   {shapes}",
                 f"MACs    {self.macs / 1e6:12.2f} M (one sample)",
                 f"params  {self.params / 1e6:12.3f} M",
                 f"size    {self.size_bytes / 1e6:12.2f} MB",
                 *([f"subnormal weights: {self.subnormal_weights} (nonzero, below the smallest normal float: many "
                    "times slower on CPUs; the pruned model has them as zeros)"] if self.subnormal_weights else []),
                 f"prunable MACs: {100 * self.prunable_fraction:.1f} % of Conv/Gemm/MatMul MACs "
                 f"({self.prunable_macs / 1e6:.2f} M)"
                 + (f"; residual joins keep {100 * self.residual_macs / self.macs:.1f} % more "
                    "(--prune-residual)" if self.residual_macs else ""),
                 f"channel groups: {len(self.groups)} with producers, {len(prunable)} prunable"]
        for name, channels, reason in self.groups:
            lines.append(f"  {'prunable' if not reason else 'kept    '} {channels:6d} ch  {name[:60]}"
                         + (f"  ({reason})" if reason else ""))
        locking = [b for b in self.barriers if b.locked_macs]
        if locking:
            lines.append("barriers, by the MACs of the kept layers next to them:")
        shown = locking[:max_barriers]
        for b in shown:
            what = f"{b.op_type} '{b.node}': {b.why}" if b.op_type else b.why
            lines.append(f"  {b.locked_macs / 1e6:10.2f} M {100 * b.locked_macs / max(self.macs, 1):5.1f} %  {what}")
        if len(locking) > len(shown):
            lines.append(f"  … {len(locking) - len(shown)} more (see --json)")
        idle = Counter(b.op_type or "other" for b in self.barriers if not b.locked_macs)
        if idle:
            lines.append(f"{'other ' if locking else ''}barriers (locking no MACs): "
                         + ", ".join(f"{op} ×{n}" for op, n in sorted(idle.items())))
        return "\n".join(lines)


# Dynamic input dims without --shape or --calib: the usual image size first, then the smallest
# that runs (a model with fixed-size reshapes or strides may run at only some sizes).
DEFAULT_SIZES = (224, 32, 64, 128, 256, 320, 384, 512, 640, 1024)


def calibration_or_zeros(model: onnx.ModelProto, calib, image_options: ImageOptions | None,
                         shapes: dict[str, tuple[int, ...]] | None = None) -> Calibration:
    """The user's calibration data, or all-zeros input: at ``shapes`` (``--shape``) where given,
    else the model's static shape with batch 1 and each other dynamic dim at the first of
    :data:`DEFAULT_SIZES` the model runs at."""
    if calib is not None:
        if shapes:
            raise OptionError("--shape is for runs without --calib: the calibration data fixes the input shapes")
        return load_calibration(calib, model, image_options)
    dynamic = dynamic_inputs(model, shapes)
    if not dynamic:
        return zeros_calibration(model, shapes, unbatched=inputs_without_batch_axis(model))
    try:
        sess = session(model)
    except ORT_ERRORS as exc:
        raise ModelError(f"ONNX Runtime cannot load the model ({' '.join(str(exc).split())[:300]}); check that "
                         "it runs in ONNX Runtime (custom ops, training-mode nodes)") from None
    quiet = import_ort().RunOptions()
    quiet.log_severity_level = 4  # a size that does not run is expected here: no ORT error log
    last = ""
    for size in DEFAULT_SIZES:
        cal = zeros_calibration(model, shapes, size)
        try:
            sess.run(None, padded_feed(cal, np.arange(1), static_batch(model)), quiet)
        except ORT_ERRORS as exc:
            last = " ".join(str(exc).split())[:200]
            continue
        used = ", ".join(f"{n}:{'x'.join(map(str, cal.arrays[n].shape))}" for n in dynamic)
        log.warning("dynamic input dims: measuring at --shape %s (choose the shape with --shape)", used)
        return cal
    raise CalibrationError(f"input '{dynamic[0]}' has dynamic dims and the model runs at none of the sizes "
                           f"{', '.join(map(str, DEFAULT_SIZES))} ({last}); pass --shape NAME:1x3xHxW or --calib")


def runnable(model: onnx.ModelProto, cal: Calibration) -> onnx.ModelProto:
    """``model`` as it runs on ``cal``: inputs that take one sample without a batch axis (their
    samples stacked on one in ``cal``) get a batch axis of 1 (:func:`with_batch_axis`). A model
    that has it already (the pipeline's) is returned as it is, so callers need not know."""
    if not cal.unbatched:
        return model
    sample = cal.take([0])
    missing = frozenset(i.name for i in model_inputs(model)
                        if i.name in cal.unbatched and len(i.shape) == sample[i.name].ndim - 1)
    return with_batch_axis(model, missing) if missing else model


def summarize(model: onnx.ModelProto, cal: Calibration) -> ModelSummary:
    """MACs, params, size, channel groups, prunable MACs and barriers of ``model`` (BN, zero pads
    and channel shuffles folded for the analysis, as pruning does); a QDQ model as the float graph
    it computes, at its own size. An input without a batch axis is listed as the model declares it."""
    size = model_bytes(model)
    declared = {i.name: list(i.shape) for i in model_inputs(model) if i.name in cal.unbatched}
    model = runnable(dequantized(model), cal)
    work = copy.deepcopy(model)
    constants_to_initializers(work)
    fold_batchnorm(work, {})
    fold_pads(work)
    shapes = tensor_shapes(work, cal)
    fold_group_norms(work, shapes)
    fold_channel_means(work, shapes)
    fold_channel_shuffles(work, shapes)
    g = GraphView(work, shapes)
    groups = find_groups(g)
    candidates, skipped = choose_candidates(groups, g, prune_coupled=False, needs_data=False)
    rows = [(grp.name, grp.channels, "") for grp in candidates if grp.producers and grp.owner]
    rows += [(name, next(x.channels for x in groups if x.name == name), reason) for name, reason in skipped]
    reach = prunability(g, groups)
    inputs = {i.name: declared.get(i.name) or list(shapes.get(i.name, ())) for i in model_inputs(model)}
    return ModelSummary(reach.total_macs, count_params(GraphView(model)), size, rows, inputs,
                        reach.prunable_macs, reach.residual_macs, reach.barriers, sum(subnormal_weights(work).values()))


def model_macs(model: onnx.ModelProto, cal: Calibration) -> int:
    """MACs of one sample through ``model`` at the calibration input shape (QDQ: of its float graph)."""
    model = runnable(dequantized(model), cal)
    return graph_macs(GraphView(model, tensor_shapes(model, cal)))


def _layer_channels(g: GraphView, node: onnx.NodeProto, tensor: str) -> int:
    """Channels of a layer's input or output, on the axis the layer reads them from."""
    shape = g.shape(tensor)
    axis = handler_for(node).layer_axis(node, g)
    return int(shape[axis]) if shape is not None and axis < len(shape) else 0


def cost_table(original: onnx.ModelProto, reference: onnx.ModelProto, pruned: onnx.ModelProto, cal: Calibration,
               latency_feed: dict[str, np.ndarray] | None, provider: str,
               reference_shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[list[LayerRow], Totals]:
    """Per-layer channels and MACs of ``reference`` (the original, BN folded) and ``pruned``, and
    the totals: MACs, params, size, and — given a feed — measured latency of original vs pruned.
    ``reference_shapes``: the reference's tensor shapes where already known (else measured)."""
    gb = GraphView(reference, reference_shapes or tensor_shapes(reference, cal))
    ga = GraphView(pruned, tensor_shapes(pruned, cal))
    after_nodes = {n.output[0]: n for n in pruned.graph.node if n.output}
    rows = []
    for node in reference.graph.node:
        macs = handler_for(node).macs(node, gb)
        other = after_nodes.get(node.output[0]) if node.output else None
        if not macs or other is None:
            continue
        rows.append(LayerRow(node_name(node), node.op_type,
                             (_layer_channels(gb, node, node.input[0]), _layer_channels(ga, other, other.input[0])),
                             (_layer_channels(gb, node, node.output[0]), _layer_channels(ga, other, other.output[0])),
                             (macs, handler_for(other).macs(other, ga)),
                             (handler_for(node).conv_groups(node, gb), handler_for(other).conv_groups(other, ga))))
    timed = measure([original, pruned], latency_feed, provider) if latency_feed is not None else None
    totals = Totals(macs=(sum(r.macs[0] for r in rows), sum(r.macs[1] for r in rows)),
                    params=(count_params(GraphView(original)), count_params(GraphView(pruned))),
                    size_bytes=(model_bytes(original), model_bytes(pruned)),
                    latency_ms=(timed[0].ms, timed[1].ms) if timed else None,
                    latency_busy=timed[0].busy if timed else None)
    return rows, totals


def fidelity(reference: onnx.ModelProto, model: onnx.ModelProto, cal: Calibration) -> list[OutputFidelity]:
    """Compare ``model`` with ``reference`` on every calibration sample."""
    reference, model = runnable(reference, cal), runnable(model, cal)
    shapes = tensor_shapes(reference, cal)
    return compare(reference, model, cal, np.arange(len(cal)), fitting_batch(shapes, 32))


def bench(models: list[onnx.ModelProto], cal: Calibration, provider: str, batches: list[int],
          repeats: int) -> dict[int, list[Latency]]:
    """Latency of each model at each batch size it runs (alternating across models in blocks),
    keyed by that size: a model with a static batch runs its own whatever size was asked."""
    return {size: measure(runs, feed, provider, repeats) for size, runs, feed in _bench_feeds(models, cal, batches)}


def bench_ops(models: list[onnx.ModelProto], cal: Calibration, provider: str,
              batches: list[int]) -> dict[int, list[OpTimes]]:
    """Where each model's run time goes, by op type (ORT's profiler; the models taking turns), at
    each batch size it runs, keyed as :func:`bench`'s results."""
    return {size: op_times(runs, feed, provider) for size, runs, feed in _bench_feeds(models, cal, batches)}


def _bench_feeds(models: list[onnx.ModelProto], cal: Calibration, batches: list[int]):
    """(batch size, the models as they run it, its feed) for each batch size the models run."""
    models = [runnable(m, cal) for m in models]  # an input without a batch axis runs one sample
    for size in dict.fromkeys(batch_size_for(models[0], b) for b in batches):
        yield size, models, cal.take([i % len(cal) for i in range(size)])


def grouped_convs_cut_inside(layers: list[LayerRow]) -> list[str]:
    """The grouped convs whose channels ``layers`` (the report's rows) show cut inside their conv
    groups: their channels changed and their group count did not. ONNX Runtime runs a conv with
    fewer channels per group slower than the whole one (docs/latency.md); one that lost whole
    groups (or a depthwise conv, whose groups are its channels) changed its group count."""
    return [row.node for row in layers if row.groups[0] > 1 and row.groups[0] == row.groups[1]
            and (row.in_channels[0] != row.in_channels[1] or row.out_channels[0] != row.out_channels[1])]


def load_checked(path) -> onnx.ModelProto:
    """A model for inspect, gate and bench: checked as for pruning, quantized graphs allowed
    (``--quantize`` writes them; these commands run models and prune none)."""
    return load_model(path, allow_quantized=True)
