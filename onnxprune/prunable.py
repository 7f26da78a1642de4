"""How much of a model's MACs channel pruning can reach, and what keeps the rest (``inspect``).

A MAC-bearing layer (Conv, ConvTranspose, Gemm, MatMul) is *prunable* when one of the channel
groups scaling its MACs — its output channels, or the input channels it reduces over, the cost
model's groups — holds channels of a group a default run prunes (the rule of
:func:`~onnxprune.candidates.choose_candidates`: residual joins keep their width). Its MACs then
count whole, though only one side of it may shrink: the figure says how much of the compute
pruning can reach, not how much it removes.

A *barrier* is a node whose channels cannot be followed (an op without a handler, or one whose
handler refuses its attributes, e.g. ``Pad`` on the channel axis), as recorded in the groups'
``blocked`` lists by :func:`~onnxprune.graph.find_groups`. It *locks* the MACs of the kept layers one of
whose groups it blocks; a layer with a barrier on each side counts under both, so the locked
figures may add up to more than the kept MACs. The model's own inputs and outputs, which must
keep their channels, are not listed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx

from .budget import build_cost_model
from .candidates import choose_candidates
from .graph import Blocked, ChannelGroup
from .graphview import GraphView, node_name
from .ops import handler_for, registered_ops

INHERENT = {"model input", "model output"}  # channels that must stay: not a barrier one could remove


@dataclass
class Barrier:
    """A node (or, with no ``op_type``, a graph-level cause) keeping channel groups unpruned."""

    op_type: str
    node: str
    why: str
    locked_macs: int  # MACs of the kept layers one of whose channel groups it blocks


@dataclass
class Prunability:
    """MACs of the MAC-bearing layers, the prunable part, and what keeps the rest."""

    total_macs: int
    prunable_macs: int
    residual_macs: int  # kept only by the residual-join rule: prunable with --prune-residual
    barriers: list[Barrier]  # most locked MACs first

    @property
    def fraction(self) -> float:
        return self.prunable_macs / self.total_macs if self.total_macs else 0.0


def prunability(g: GraphView, groups: list[ChannelGroup]) -> Prunability:
    """Prunable MACs of the graph ``g`` (with its shapes) and its barriers, by locked MACs."""
    cost = build_cost_model(g, groups)
    by_index = {grp.index: grp for grp in groups}
    default = {grp.index for grp in choose_candidates(groups, g, prune_coupled=False, needs_data=False)[0]}
    coupled = {grp.index for grp in choose_candidates(groups, g, prune_coupled=True, needs_data=False)[0]}
    causes = _Causes(g)
    locked: dict[tuple[str, str], int] = defaultdict(int)
    for grp in groups:  # every barrier next to a layer's channels, those locking nothing too
        if grp.producers or grp.consumers:
            for s in _blocks(grp):
                causes.add(s)
    prunable = residual = 0
    for e in cost.entries:
        owners = {o for gi in e.groups for o, _ in cost.composition[gi]}
        if owners & default:
            prunable += e.macs
            continue
        if owners & coupled:
            residual += e.macs
        keys = {causes.add(s) for o in owners for s in _blocks(by_index[o])}
        if not e.groups:  # no channel rule: the layer is a barrier itself
            keys.add(causes.add(Blocked(e.op_type, e.node, "is a barrier")))
        for key in keys - {None}:
            locked[key] += e.macs
    barriers = [Barrier(op, name if op else "", causes.why(op, name), locked.get((op, name), 0))
                for op, name in causes.keys]
    barriers.sort(key=lambda b: (-b.locked_macs, b.op_type, b.node))
    return Prunability(cost.total, prunable, residual, barriers)


def _blocks(grp: ChannelGroup) -> list[Blocked]:
    """Why ``grp``'s channels are blocked, over every group holding them."""
    return [b for site in (grp.sites or [grp]) for b in site.blocked]


class _Causes:
    """The barriers behind the groups' :class:`~onnxprune.graph.Blocked` records, keyed by
    (op type, node name), or ("", why) for a graph-level cause."""

    def __init__(self, g: GraphView):
        self.nodes = {(n.op_type, node_name(n)): n for n in g.graph.node if n.output}
        self.keys: dict[tuple[str, str], None] = {}  # in order of discovery
        self.whys: dict[tuple[str, str], dict[str, None]] = defaultdict(dict)
        self.handled = set(registered_ops())

    def add(self, b: Blocked) -> tuple[str, str] | None:
        """Record the cause ``b``; its key, or None for the model's own inputs and outputs (and
        for a node the graph does not hold)."""
        if not b.op_type:
            if b.why in INHERENT:
                return None
            key = ("", b.why)
            self.keys.setdefault(key)
            return key
        node = self.nodes.get((b.op_type, b.node))
        if node is None:
            return None
        key = (b.op_type, b.node)
        self.keys.setdefault(key)
        self.whys[key].setdefault(self._why(node, b.why))
        return key

    def _why(self, node: onnx.NodeProto, rest: str) -> str:
        if rest != "is a barrier":
            return rest
        if node.domain not in ("", "ai.onnx"):
            return f"no handler for custom domain '{node.domain}'"
        if node.op_type not in self.handled:
            return f"no handler for {node.op_type}"
        return handler_for(node).always_barrier or "channels are not followed through it with these attributes or inputs"

    def why(self, op: str, name: str) -> str:
        return "; ".join(self.whys[(op, name)]) if op else name
