"""Cost model (MACs, params) and the choice of how many channels each group keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import TargetNotMetError
from .graph import ChannelGroup
from .graphview import GraphView
from .ops import handler_for


@dataclass
class CostEntry:
    """One MAC-bearing node: its MACs at full width and the groups whose widths scale them."""

    node: str
    op_type: str
    macs: int
    groups: tuple[int, ...]


@dataclass
class CostModel:
    """MACs of the graph as a function of the kept width of each group."""

    entries: list[CostEntry]
    channels: dict[int, int]
    composition: dict[int, list[tuple[int, int]]]  # group -> (owner group, channels of it held)

    @property
    def total(self) -> int:
        return sum(e.macs for e in self.entries)

    def fraction(self, group: int, widths: dict[int, int]) -> float:
        """Share of ``group``'s channels left when each owner keeps ``widths[owner]``."""
        kept = sum(n * widths.get(o, self.channels[o]) / self.channels[o] for o, n in self.composition[group])
        return kept / self.channels[group]

    def macs(self, widths: dict[int, int]) -> float:
        total = 0.0
        for e in self.entries:
            f = 1.0
            for gi in e.groups:
                f *= self.fraction(gi, widths)
            total += e.macs * f
        return total


def build_cost_model(g: GraphView, groups: list[ChannelGroup]) -> CostModel:
    """MACs per node (one sample, at the calibration input shape) and the groups scaling each."""
    where = {t: grp.index for grp in groups for t in grp.tensors}
    entries = []
    for node in g.graph.node:
        handler = handler_for(node)
        macs = handler.macs(node, g)
        if not macs:
            continue
        rule = handler.rule(node, g)
        tensors = rule.cost_tensors() if rule else []
        gis = tuple(dict.fromkeys(where[t] for t in tensors if t in where))
        entries.append(CostEntry(node.name or node.output[0], node.op_type, macs, gis))
    owner_of = {int(a): grp.index for grp in groups if grp.owner for a in grp.atoms}
    composition = {}
    for grp in groups:
        counts: dict[int, int] = {}
        for a in grp.atoms:
            counts[owner_of[int(a)]] = counts.get(owner_of[int(a)], 0) + 1
        composition[grp.index] = list(counts.items()) or [(grp.index, max(grp.channels, 1))]
    return CostModel(entries, {grp.index: max(grp.channels, 1) for grp in groups}, composition)


def count_params(g: GraphView) -> int:
    """Number of float parameters held in initializers."""
    return int(sum(np.prod(t.dims) for t in g.graph.initializer if t.data_type in (1, 10, 11, 16)))


def round_width(channels: int, ratio: float, multiple: int, segments: int = 1) -> int:
    """Kept channels for ``ratio``, rounded up to a multiple of ``multiple`` and of ``segments``
    (the groups of a grouped conv, which keep equally many each); never 0, never > C."""
    kept = max(1, int(round(channels * ratio)))
    step = math.lcm(multiple, segments)
    if step > 1 and channels > step:
        kept = max(step, int(math.ceil(kept / step) * step))
    elif segments > 1:
        kept = max(segments, int(math.ceil(kept / segments) * segments))
    return min(kept, channels)


def uniform_widths(cost: CostModel, candidates: list[ChannelGroup], speedup: float,
                   round_to: int = 1) -> dict[int, int]:
    """One keep ratio for every candidate group: the largest whose MACs speedup is ≥ ``speedup``."""
    total = cost.total

    def widths(r: float) -> dict[int, int]:
        return {grp.index: round_width(grp.channels, r, round_to, grp.segments) for grp in candidates}

    def reached(r: float) -> float:
        return total / max(cost.macs(widths(r)), 1e-9)

    if speedup <= 1.0:
        return widths(1.0)
    lowest = reached(0.0)
    if lowest < speedup:
        raise TargetNotMetError(
            f"--speedup {speedup:g} cannot be reached: pruning every prunable group to the minimum "
            f"gives {lowest:.2f}x; lower the target or allow more groups to be pruned")
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if reached(mid) >= speedup:
            lo = mid
        else:
            hi = mid
    return widths(lo)
