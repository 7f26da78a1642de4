"""Per-layer latency cost for ``--latency``: every Conv / Gemm / MatMul timed alone on the
execution provider at a few widths, so that width allocation weighs what a layer's channels
really cost in time (small feature maps and narrow layers are dominated by per-node overhead,
and their MACs overstate what pruning them saves).

The model's predicted latency at given widths is ``rest + Σ_layer L_layer(f)``, where ``f`` is
the layer's kept fraction of MACs (as in :class:`onnxprune.budget.CostModel`) and ``L_layer``
interpolates the layer's timings at ``FRACTIONS`` of its prunable channel dimensions; ``rest``
is the measured whole-model latency minus the layers' full-width sum (element-wise ops,
pooling, per-run overhead), held fixed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graphview import GraphView, attr, node_name
from .latency import measure
from .ops.conv import reads_as_many_as_it_writes

log = logging.getLogger(__name__)

FRACTIONS = (1.0, 0.75, 0.5, 0.25)
LAYER_SECONDS = 0.08  # timed per layer variant: a few hundred variants for a ResNet-50


@dataclass
class LayerLatency:
    """Timings of one layer (``entry``: index in ``CostModel.entries``) against its MACs fraction."""

    entry: int
    factors: np.ndarray  # ascending kept fractions of the layer's MACs
    ms: np.ndarray

    def at(self, factor: float) -> float:
        return float(np.interp(factor, self.factors, self.ms))


@dataclass
class LatencyCost:
    """Predicted latency (ms) as a function of per-group widths; see the module docstring."""

    layers: list[LayerLatency]
    rest_ms: float
    measured_ms: float  # the whole original model, for the record

    def predict(self, factor_of, widths: dict[int, int]) -> float:
        """``factor_of(entry_index, widths)``: the kept MACs fraction of that layer."""
        return self.rest_ms + sum(layer.at(factor_of(layer.entry, widths)) for layer in self.layers)

    def predict_rows(self, factors: np.ndarray) -> np.ndarray:
        """:meth:`predict` for each row of ``factors`` (``[rows, entries]``: each entry's kept
        fraction of MACs)."""
        total = np.full(len(factors), self.rest_ms)
        for layer in self.layers:
            total += np.interp(factors[:, layer.entry], layer.factors, layer.ms)
        return total


def _layer_channels(node: onnx.NodeProto, weight: np.ndarray) -> tuple[int, int] | None:
    """(input, output) channels of a layer :func:`single_layer_model` can rebuild, else None."""
    if node.op_type == "Conv":
        return weight.shape[1] * attr(node, "group", 1), weight.shape[0]
    if node.op_type in ("Gemm", "MatMul") and weight.ndim == 2:
        return (weight.shape[1], weight.shape[0]) if attr(node, "transB", 0) else weight.shape
    return None


def single_layer_model(node: onnx.NodeProto, weight: np.ndarray, in_shape: tuple[int, ...], cin: int, cout: int
                  ) -> tuple[onnx.ModelProto, np.ndarray] | None:
    """A one-node model computing ``node`` with ``cin`` input and ``cout`` output channels."""
    shape = list(in_shape)
    if node.op_type == "Conv":
        group = attr(node, "group", 1)
        if group > 1:
            per_group = weight.shape[1]  # 1: depthwise
            if not reads_as_many_as_it_writes(weight, group):
                return None  # cut inside its groups: keep it simple, time it at full width only
            cin = cout = max(per_group, min(cin, cout) // per_group * per_group)  # whole groups go
            group = cin // per_group
        w = np.zeros((cout, cin // group, *weight.shape[2:]), np.float32)
        shape[1] = cin
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "group"}
        inputs = ["x", "w"]
        extra_attrs = {"group": group} if group > 1 else {}
        out = helper.make_node("Conv", inputs, ["y"], **attrs, **extra_attrs)
    elif _layer_channels(node, weight) is not None:  # Gemm, MatMul
        trans_b = node.op_type == "Gemm" and attr(node, "transB", 0)
        w = np.zeros((cout, cin) if trans_b else (cin, cout), np.float32)
        shape[-1] = cin
        out = helper.make_node("Gemm", ["x", "w"], ["y"], transB=int(bool(trans_b)))
        shape = [int(np.prod(shape[:-1])), cin]
    else:
        return None
    graph = helper.make_graph([out], "layer", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                             [f"d{i}" for i in range(len(shape))])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model, np.random.default_rng(0).normal(size=shape).astype(np.float32)


def _timed(model: onnx.ModelProto, x: np.ndarray, provider: str) -> float:
    return measure([model], {"x": x}, provider, repeats=5, seconds=LAYER_SECONDS)[0].ms


def _overhead_ms(provider: str) -> float:
    """Per-run cost of a session that does nothing, subtracted from each layer's timing."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "nothing",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return _timed(model, np.zeros(1, np.float32), provider)


def layer_latency(g: GraphView, cost, prunable: dict[str, tuple[bool, bool]], batch: int, provider: str,
                  whole_ms: float) -> LatencyCost:
    """Time each MAC-bearing layer alone at ``FRACTIONS`` of its prunable channel dimensions.

    ``prunable`` maps a node name to whether its input and its output channels can shrink;
    ``whole_ms`` is the measured latency of the whole model at ``batch``."""
    nodes = {node_name(n): n for n in g.graph.node}
    overhead = _overhead_ms(provider)
    layers = []
    for index, entry in enumerate(cost.entries):
        node = nodes.get(entry.node)
        in_shape = g.shape(node.input[0]) if node is not None else None
        weight = g.input_const(node, 1) if node is not None and len(node.input) > 1 else None
        if node is None or in_shape is None or weight is None or not entry.groups:
            continue
        channels = _layer_channels(node, weight)
        if channels is None:  # timed with the rest of the model (e.g. ConvTranspose)
            continue
        in_shape, (cin, cout) = (batch, *in_shape[1:]), channels
        shrink_in, shrink_out = prunable.get(entry.node, (True, True))
        factors, times = [], []
        for r in FRACTIONS:
            ci = max(1, round(cin * r)) if shrink_in else cin
            co = max(1, round(cout * r)) if shrink_out else cout
            built = single_layer_model(node, weight, in_shape, ci, co)
            if built is None or (r < 1 and ci == cin and co == cout):
                break
            factors.append(ci * co / (cin * cout))
            times.append(max(_timed(*built, provider) - overhead, 0.0))
        if len(factors) >= 2:
            order = np.argsort(factors)
            # timing noise can make a narrower variant look slower: never predict that
            ms = np.maximum.accumulate(np.asarray(times)[order])
            layers.append(LayerLatency(index, np.asarray(factors)[order], ms))
    full = sum(layer.ms[-1] for layer in layers)
    log.info("layer latencies: %d layers timed, %.2f ms of %.2f ms for the whole model", len(layers), full, whole_ms)
    return LatencyCost(layers, max(whole_ms - full, 0.0), whole_ms)
