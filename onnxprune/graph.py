"""Channel-dependency analysis: which tensors' channel axes are coupled, and through which ops.

The graph is split into *channel groups*. A group is one set of channels shared by several
tensors: the outputs of its producers (Conv, Gemm), everything the channels flow through
(BN, activations, pooling, residual Add, Flatten…) and the inputs its consumers reduce over.
Pruning a channel of a group removes it from every member at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx

from .graphview import GraphView
from .ops import ChannelRule, handler_for

log = logging.getLogger(__name__)


@dataclass
class Consumer:
    """A node that reduces over the group's channels, reading them from ``tensor``."""

    node: onnx.NodeProto
    tensor: str
    block: int  # entries of the tensor's axis 1 per channel


@dataclass
class ChannelGroup:
    """One set of coupled channels and every node that must change when it is pruned."""

    index: int
    channels: int
    tensors: list[str]
    producers: list[onnx.NodeProto] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    throughs: list[onnx.NodeProto] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        names = [p.name or p.output[0] for p in self.producers]
        return "+".join(names) if names else self.tensors[0]

    @property
    def coupled(self) -> bool:
        """True when several producers feed the same channels (e.g. a residual join)."""
        return len(self.producers) > 1

    @property
    def prunable(self) -> bool:
        return not self.reason

    @property
    def reason(self) -> str:
        """Why the group cannot be pruned ('' when it can)."""
        if self.blocked:
            return "; ".join(sorted(set(self.blocked))[:3])
        if not self.producers:
            return "no layer produces these channels"
        if not self.consumers:
            return "no layer consumes these channels"
        if self.channels < 2:
            return "a single channel"
        return ""


class _Spaces:
    """Union-find over tensor names, with each tensor's block size relative to its channels."""

    def __init__(self):
        self.parent: dict[str, str] = {}
        self.block: dict[str, int] = {}

    def add(self, t: str) -> None:
        if t not in self.parent:
            self.parent[t] = t
            self.block.setdefault(t, 1)

    def find(self, t: str) -> str:
        self.add(t)
        while self.parent[t] != t:
            self.parent[t] = self.parent[self.parent[t]]
            t = self.parent[t]
        return t

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _rule(node: onnx.NodeProto, g: GraphView) -> ChannelRule | None:
    try:
        return handler_for(node).rule(node, g)
    except (ValueError, IndexError, KeyError, TypeError) as exc:  # odd attributes: stay safe
        log.debug("treating %s '%s' as a barrier: %s", node.op_type, node.name, exc)
        return None


def find_groups(g: GraphView) -> list[ChannelGroup]:
    """Split the graph's channel axes into groups, in graph order of their first tensor."""
    spaces = _Spaces()
    blocked: dict[str, list[str]] = {}
    rules: list[tuple[onnx.NodeProto, ChannelRule | None]] = []

    def block(t: str, why: str) -> None:
        spaces.add(t)
        blocked.setdefault(t, []).append(why)

    for node in g.graph.node:
        rule = _rule(node, g)
        rules.append((node, rule))
        acts = [t for t in list(node.input) + list(node.output) if t and not g.is_const(t)]
        label = f"{node.op_type} '{node.name or node.output[0]}'"
        if rule is None:
            for t in acts:
                block(t, f"{label} is a barrier")
            continue
        covered = set(rule.produces) | set(rule.consumes)
        for a, b in rule.ties:
            spaces.add(a)
            spaces.block[b] = spaces.block.get(a, 1) * rule.blocks.get(b, 1)
            spaces.union(a, b)
            covered |= {a, b}
        for t in covered:
            spaces.add(t)
        for t in acts:
            if t not in covered:
                block(t, f"{label} mixes channels of '{t}'")
    for t in g.graph_inputs:
        block(t, "model input")
    for t in g.graph_outputs:
        block(t, "model output")

    groups: dict[str, ChannelGroup] = {}
    order: list[str] = []

    def group_of(t: str) -> ChannelGroup:
        root = spaces.find(t)
        if root not in groups:
            groups[root] = ChannelGroup(index=len(order), channels=0, tensors=[])
            order.append(root)
        return groups[root]

    for t in spaces.parent:
        grp = group_of(t)
        grp.tensors.append(t)
        grp.blocked.extend(blocked.get(t, []))
        ch = g.channels(t)
        if ch is not None and spaces.block[t] == 1:
            if grp.channels and grp.channels != ch:
                grp.blocked.append(f"channel counts disagree at '{t}'")
            grp.channels = ch
    for node, rule in rules:
        if rule is None:
            continue
        for t in rule.produces:
            grp = group_of(t)
            grp.producers.append(node)
            if spaces.block[t] != 1:
                grp.blocked.append(f"'{t}' is produced in blocks")
        for t in rule.consumes:
            group_of(t).consumers.append(Consumer(node, t, spaces.block[t]))
        seen = set()
        for a, _ in rule.ties:
            grp = group_of(a)
            if id(grp) not in seen:
                grp.throughs.append(node)
                seen.add(id(grp))
    result = [groups[r] for r in order]
    for i, grp in enumerate(result):
        grp.index = i
        if grp.channels == 0 and not grp.blocked:
            grp.blocked.append("channel count unknown")
    return result


def cost_spaces(g: GraphView, groups: list[ChannelGroup]) -> dict[str, int]:
    """Map each tensor name to the index of its group."""
    return {t: grp.index for grp in groups for t in grp.tensors}
