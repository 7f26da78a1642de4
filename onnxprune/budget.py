"""Cost model (MACs, params, bytes), the targets on it, and uniform per-group widths."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import TargetNotMetError
from .graph import ChannelGroup
from .graphview import GraphView, node_name
from .io import model_bytes
from .latency_cost import LatencyCost
from .ops import handler_for


@dataclass
class CostEntry:
    """One MAC-bearing node: its MACs and weights at full width and the groups scaling them."""

    node: str
    op_type: str
    macs: int
    groups: tuple[int, ...]
    params: int = 0  # float parameters of the node's weight and bias
    bytes: int = 0


@dataclass
class CostModel:
    """MACs, params and bytes of the graph as a function of the kept width of each group.

    MACs and a layer's weights scale with the product of its groups' kept fractions; parameters
    outside MAC-bearing layers (un-folded BatchNorm, PRelu slopes …) are counted as fixed, so the
    params and bytes figures are estimates for choosing widths (the report measures the result).
    """

    entries: list[CostEntry]
    channels: dict[int, int]
    composition: dict[int, list[tuple[int, int]]]  # group -> (owner group, channels of it held)
    total_params: int = 0
    total_bytes: int = 0
    latency: LatencyCost | None = None  # per-layer measured latency, for --latency


    @property
    def total(self) -> int:
        return sum(e.macs for e in self.entries)

    def factor(self, entry: int, widths: dict[int, int]) -> float:
        """Kept fraction of the MACs (and weights) of ``entries[entry]``."""
        return self._factor(self.entries[entry], widths)

    def _factor(self, e: CostEntry, widths: dict[int, int]) -> float:
        f = 1.0
        for gi in e.groups:
            f *= self.fraction(gi, widths)
        return f

    def fraction(self, group: int, widths: dict[int, int]) -> float:
        """Share of ``group``'s channels left when each owner keeps ``widths[owner]``."""
        kept = sum(n * widths.get(o, self.channels[o]) / self.channels[o] for o, n in self.composition[group])
        return kept / self.channels[group]

    def macs(self, widths: dict[int, int]) -> float:
        return sum(e.macs * self._factor(e, widths) for e in self.entries)

    def params(self, widths: dict[int, int]) -> float:
        return self.total_params - sum(e.params * (1 - self._factor(e, widths)) for e in self.entries)

    def bytes(self, widths: dict[int, int]) -> float:
        return self.total_bytes - sum(e.bytes * (1 - self._factor(e, widths)) for e in self.entries)

    def latency_ms(self, widths: dict[int, int]) -> float:
        """Predicted latency from the per-layer timings (:mod:`onnxprune.latency_cost`)."""
        if self.latency is None:
            raise ValueError("no per-layer latency measured for this cost model")
        return self.latency.predict(self.factor, widths)


class WidthCosts:
    """:class:`CostModel`'s figures for many width choices at once, for the allocation's search:
    each row of a ``[rows, len(units)]`` array holds the kept channels of ``units`` (group
    indices; every other group at full width)."""

    def __init__(self, cost: CostModel, units: list[int]):
        self.cost = cost
        groups = {g: i for i, g in enumerate(sorted(cost.channels))}
        unit_at = {u: i for i, u in enumerate(units)}
        # a group's kept fraction is linear in its owners' widths: fixed share + widths @ share
        self._share = np.zeros((len(units), len(groups)))
        self._fixed = np.zeros(len(groups))
        for g, parts in cost.composition.items():
            for owner, n in parts:
                if owner in unit_at:
                    self._share[unit_at[owner], groups[g]] += n / cost.channels[owner] / cost.channels[g]
                else:
                    self._fixed[groups[g]] += n / cost.channels[g]
        # an entry's kept fraction is the product of its groups': exp of a sum of logs
        self._uses = np.zeros((len(groups), len(cost.entries)))
        for j, e in enumerate(cost.entries):
            for gi in e.groups:
                self._uses[groups[gi], j] += 1
        self._macs = np.array([e.macs for e in cost.entries], np.float64)
        self._params = np.array([e.params for e in cost.entries], np.float64)
        self._bytes = np.array([e.bytes for e in cost.entries], np.float64)

    def factors(self, widths: np.ndarray) -> np.ndarray:
        """Kept fraction of each entry's MACs and weights, ``[rows, entries]``."""
        fractions = self._fixed + np.asarray(widths, np.float64) @ self._share
        return np.exp(np.log(np.maximum(fractions, 1e-300)) @ self._uses)

    def macs(self, widths: np.ndarray) -> np.ndarray:
        return self.factors(widths) @ self._macs

    def params(self, widths: np.ndarray) -> np.ndarray:
        return self.cost.total_params - (1 - self.factors(widths)) @ self._params

    def bytes(self, widths: np.ndarray) -> np.ndarray:
        return self.cost.total_bytes - (1 - self.factors(widths)) @ self._bytes

    def latency_ms(self, widths: np.ndarray) -> np.ndarray:
        if self.cost.latency is None:
            raise ValueError("no per-layer latency measured for this cost model")
        return self.cost.latency.predict_rows(self.factors(widths))


@dataclass(frozen=True)
class Targets:
    """What the user asked for; every given target must hold."""

    speedup: float = 1.0  # original MACs / pruned MACs at least this
    params: float | None = None  # pruned params / original params at most this
    size_mb: float | None = None  # pruned file size at most this (10^6 bytes)
    latency: float | None = None  # predicted latency speedup at least this (needs cost.latency)

    def usage(self, cost: CostModel, figures: CostModel | WidthCosts, widths) -> list:
        """Each given target's figure over its limit (above 1: missed), read from ``figures`` at
        ``widths``: ``cost`` itself at one widths dict (floats), or :class:`WidthCosts` at rows of
        widths (arrays)."""
        usage = [figures.macs(widths) * self.speedup / max(cost.total, 1)]
        if self.params is not None:
            usage.append(figures.params(widths) / max(self.params * cost.total_params, 1e-9))
        if self.size_mb is not None:
            usage.append(figures.bytes(widths) / (self.size_mb * 1e6))
        if self.latency is not None:
            usage.append(figures.latency_ms(widths) * self.latency / max(cost.latency_ms({}), 1e-12))
        return usage

    def shortfall(self, cost: CostModel, widths: dict[int, int]) -> float:
        """0 when every target holds; otherwise the summed relative excess over the limits."""
        total = sum(max(u - 1, 0.0) for u in self.usage(cost, cost, widths))
        return total if total > 1e-12 else 0.0

    def shortfalls(self, costs: WidthCosts, widths: np.ndarray) -> np.ndarray:
        """:meth:`shortfall` of each row of ``widths`` (:class:`WidthCosts`)."""
        total = sum(np.maximum(u - 1, 0.0) for u in self.usage(costs.cost, costs, widths))
        return np.where(total > 1e-12, total, 0.0)

    def describe(self, cost: CostModel, widths: dict[int, int]) -> str:
        """The reached figures for the given targets, e.g. for a "cannot be reached" message."""
        parts = [f"MACs {cost.total / max(cost.macs(widths), 1e-9):.2f}x fewer"]
        if self.params is not None:
            parts.append(f"params {cost.params(widths) / max(cost.total_params, 1):.1%} kept")
        if self.size_mb is not None:
            parts.append(f"size {cost.bytes(widths) / 1e6:.2f} MB")
        if self.latency is not None:
            parts.append(f"predicted latency {cost.latency_ms({}) / max(cost.latency_ms(widths), 1e-12):.2f}x lower")
        return ", ".join(parts)

    def asked(self) -> str:
        parts = [f"--speedup {self.speedup:g}"] if self.speedup > 1 else []
        if self.params is not None:
            parts.append(f"--params {self.params:g}")
        if self.size_mb is not None:
            parts.append(f"--size-mb {self.size_mb:g}")
        if self.latency is not None:
            parts.append(f"predicted latency {self.latency:.2f}x lower")
        return " ".join(parts) or "no target"


FLOAT_TYPES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
               onnx.TensorProto.BFLOAT16: 2}


def _weights(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[int, int]:
    """Float parameters and bytes held by the initializers a node reads."""
    count = nbytes = 0
    for name in node.input:
        t = inits.get(name)
        if t is not None and t.data_type in FLOAT_TYPES:
            n = int(np.prod(t.dims))
            count, nbytes = count + n, nbytes + n * FLOAT_TYPES[t.data_type]
    return count, nbytes


def build_cost_model(g: GraphView, groups: list[ChannelGroup]) -> CostModel:
    """MACs and weights per node (one sample, at the calibration input shape), the groups scaling each."""
    where = {t: grp.index for grp in groups for t in grp.tensors}
    inits = {t.name: t for t in g.graph.initializer}
    entries = []
    for node in g.graph.node:
        handler = handler_for(node)
        macs = handler.macs(node, g)
        if not macs:
            continue
        rule = handler.rule(node, g)
        tensors = rule.cost_tensors() if rule else []
        # one factor per tensor, not per group: a conv that reads and writes one group (the block
        # inside a residual join, as MediaPipe's) keeps the square of its share
        gis = tuple(where[t] for t in dict.fromkeys(tensors) if t in where)
        entries.append(CostEntry(node_name(node), node.op_type, macs, gis, *_weights(node, inits)))
    owner_of = {int(a): grp.index for grp in groups if grp.owner for a in grp.atoms}
    composition = {}
    for grp in groups:
        counts: dict[int, int] = {}
        for a in grp.atoms:
            counts[owner_of[int(a)]] = counts.get(owner_of[int(a)], 0) + 1
        composition[grp.index] = list(counts.items()) or [(grp.index, max(grp.channels, 1))]
    return CostModel(entries, {grp.index: max(grp.channels, 1) for grp in groups}, composition,
                     count_params(g), model_bytes(g.model))


def count_params(g: GraphView) -> int:
    """Number of float parameters: in initializers and in ``Constant`` nodes (the package's one
    count, for the report, ``inspect`` and ``gate``). PaddlePaddle and constant-folded exports
    keep their weights in ``Constant`` nodes; pruning turns those into initializers first, so
    counting both keeps the original's and the pruned model's figures comparable."""
    count = sum(int(np.prod(t.dims)) for t in g.graph.initializer if t.data_type in FLOAT_TYPES)
    return count + sum(_constant_floats(n) for n in g.graph.node
                       if n.op_type == "Constant" and n.domain in ("", "ai.onnx"))


def _constant_floats(node: onnx.NodeProto) -> int:
    """Float values a ``Constant`` node holds (0 for integer constants such as shapes)."""
    for a in node.attribute:
        if a.name == "value" and a.t.data_type in FLOAT_TYPES:
            return int(np.prod(a.t.dims))
        if a.name == "sparse_value" and a.sparse_tensor.values.data_type in FLOAT_TYPES:
            return int(np.prod(a.sparse_tensor.values.dims))
        if a.name == "value_float":
            return 1
        if a.name == "value_floats":
            return len(a.floats)
    return 0


def round_width(channels: int, ratio: float, multiple: int, granule: int = 1) -> int:
    """Kept channels for ``ratio``, rounded up to a multiple of ``multiple`` and of ``granule``
    (:attr:`ChannelGroup.granule`: its conv groups); never 0, never > C. A group
    no wider than ``multiple`` is rounded to the largest halving of it below its width (16
    channels under ``--round-to 16``: 8 or 16, not 6)."""
    kept = max(1, int(round(channels * ratio)))
    while multiple > 1 and channels <= multiple:
        multiple //= 2
    step = math.lcm(multiple, granule)
    if step > 1 and channels > step:
        kept = max(step, int(math.ceil(kept / step) * step))
    elif granule > 1:
        kept = max(granule, int(math.ceil(kept / granule) * granule))
    return min(kept, channels)


def uniform_widths(cost: CostModel, candidates: list[ChannelGroup], targets: Targets,
                   round_to: int = 1) -> dict[int, int]:
    """One keep ratio for every candidate group: the largest that meets every target."""

    def widths(r: float) -> dict[int, int]:
        return {grp.index: round_width(grp.channels, r, round_to, grp.granule) for grp in candidates}

    if not targets.shortfall(cost, widths(1.0)):
        return widths(1.0)
    if targets.shortfall(cost, widths(0.0)):
        raise TargetNotMetError(
            f"{targets.asked()} cannot be reached: pruning every prunable group to the minimum gives "
            f"{targets.describe(cost, widths(0.0))}; lower the target or allow more groups to be pruned")
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if targets.shortfall(cost, widths(mid)):
            hi = mid
        else:
            lo = mid
    return widths(lo)


def relaxed_targets(targets: Targets, cost: CostModel, t: float) -> Targets:
    """``targets`` moved a fraction ``1 - t`` of the way back towards no pruning at all."""
    size = None if targets.size_mb is None else cost.total_bytes / 1e6 + t * (targets.size_mb - cost.total_bytes / 1e6)
    return Targets(1 + t * (targets.speedup - 1), None if targets.params is None else 1 - t * (1 - targets.params),
                   size)


def graph_macs(g: GraphView) -> int:
    """MACs of one sample through the graph (the shapes ``g`` holds): the package's one MACs count."""
    return sum(handler_for(n).macs(n, g) for n in g.graph.node)
