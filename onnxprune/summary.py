"""What a model costs and what could be pruned: the ``inspect``, ``gate`` and ``bench`` subcommands."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from .activations import batch_size_for, fitting_batch, tensor_shapes
from .budget import count_params, graph_macs
from .calib import Calibration, ImageOptions, load_calibration, synthetic_calibration
from .candidates import choose_candidates
from .fold import constants_to_initializers, fold_batchnorm
from .graph import find_groups
from .graphview import GraphView
from .io import check_opset, load_model, model_bytes
from .latency import Latency, latency_ms, measure
from .ops import handler_for
from .report import LayerRow, Totals
from .verify import OutputFidelity, compare


@dataclass
class ModelSummary:
    """Cost of a model at the calibration input shape, and its prunable channel groups."""

    macs: int
    params: int
    size_bytes: int
    groups: list[tuple[str, int, str]] = field(default_factory=list)  # (name, channels, "" or why not)
    barriers: dict[str, int] = field(default_factory=dict)  # op type -> count of nodes without a handler

    def text(self) -> str:
        prunable = [g for g in self.groups if not g[2]]
        lines = [f"MACs    {self.macs / 1e6:12.2f} M (one sample)",
                 f"params  {self.params / 1e6:12.3f} M",
                 f"size    {self.size_bytes / 1e6:12.2f} MB",
                 f"channel groups: {len(self.groups)} with producers, {len(prunable)} prunable"]
        for name, channels, reason in self.groups:
            lines.append(f"  {'prunable' if not reason else 'kept    '} {channels:6d} ch  {name[:60]}"
                         + (f"  ({reason})" if reason else ""))
        if self.barriers:
            lines.append("barrier ops (channels never pruned through): "
                         + ", ".join(f"{op} ×{n}" for op, n in sorted(self.barriers.items())))
        return "\n".join(lines)


def calibration_or_zeros(model: onnx.ModelProto, calib, image_options: ImageOptions | None) -> Calibration:
    """The user's calibration data, or one all-zeros sample when the input shape is static."""
    return load_calibration(calib, model, image_options) if calib is not None else synthetic_calibration(model)


def summarize(model: onnx.ModelProto, cal: Calibration) -> ModelSummary:
    """MACs, params, size and channel groups of ``model`` (BN folded for the analysis, as pruning does)."""
    work = copy.deepcopy(model)
    constants_to_initializers(work)
    fold_batchnorm(work, {})
    g = GraphView(work, tensor_shapes(work, cal))
    groups = find_groups(g)
    macs = graph_macs(g)
    candidates, skipped = choose_candidates(groups, g, prune_coupled=False, needs_data=False)
    rows = [(grp.name, grp.channels, "") for grp in candidates if grp.producers and grp.owner]
    rows += [(name, next(x.channels for x in groups if x.name == name), reason) for name, reason in skipped]
    barriers = Counter(n.op_type for n in work.graph.node if n.input and handler_for(n).rule(n, g) is None
                       and handler_for(n).macs(n, g) == 0 and len(g.shape(n.input[0]) or ()) >= 3)
    return ModelSummary(macs, count_params(GraphView(model)), model_bytes(model), rows, dict(barriers))


def model_macs(model: onnx.ModelProto, cal: Calibration) -> int:
    """MACs of one sample through ``model`` at the calibration input shape."""
    return graph_macs(GraphView(model, tensor_shapes(model, cal)))


def cost_table(original: onnx.ModelProto, reference: onnx.ModelProto, pruned: onnx.ModelProto, cal: Calibration,
               latency_feed: dict[str, np.ndarray] | None, provider: str) -> tuple[list[LayerRow], Totals]:
    """Per-layer channels and MACs of ``reference`` (the original, BN folded) and ``pruned``, and
    the totals: MACs, params, size, and — given a feed — measured latency of original vs pruned."""
    gb = GraphView(reference, tensor_shapes(reference, cal))
    ga = GraphView(pruned, tensor_shapes(pruned, cal))
    after_nodes = {n.output[0]: n for n in pruned.graph.node if n.output}
    rows = []
    for node in reference.graph.node:
        macs = handler_for(node).macs(node, gb)
        other = after_nodes.get(node.output[0]) if node.output else None
        if not macs or other is None:
            continue
        rows.append(LayerRow(node.name or node.output[0], node.op_type,
                             (gb.channels(node.input[0]) or 0, ga.channels(other.input[0]) or 0),
                             (gb.channels(node.output[0]) or 0, ga.channels(other.output[0]) or 0),
                             (macs, handler_for(other).macs(other, ga))))
    latency = tuple(latency_ms([original, pruned], latency_feed, provider)) if latency_feed is not None else None
    totals = Totals(macs=(sum(r.macs[0] for r in rows), sum(r.macs[1] for r in rows)),
                    params=(count_params(GraphView(original)), count_params(GraphView(pruned))),
                    size_bytes=(model_bytes(original), model_bytes(pruned)), latency_ms=latency)
    return rows, totals


def fidelity(reference: onnx.ModelProto, model: onnx.ModelProto, cal: Calibration) -> list[OutputFidelity]:
    """Compare ``model`` with ``reference`` on every calibration sample."""
    shapes = tensor_shapes(reference, cal)
    return compare(reference, model, cal, np.arange(len(cal)), fitting_batch(shapes, 32))


def bench(models: list[onnx.ModelProto], cal: Calibration, provider: str, batches: list[int],
          repeats: int) -> dict[int, list[Latency]]:
    """Latency of each model at each batch size (runs alternating across models in blocks)."""
    return {b: measure(models, cal.take([i % len(cal) for i in range(batch_size_for(models[0], b))]),
                       provider, repeats) for b in batches}


def load_checked(path) -> onnx.ModelProto:
    model = load_model(path)
    check_opset(model)
    return model
