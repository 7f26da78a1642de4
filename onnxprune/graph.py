"""Channel-dependency analysis: which tensors' channel axes are coupled, and through which ops.

The graph is split into *channel groups*. A group is one list of channels shared by several
tensors: the outputs of its producers (Conv, Gemm), everything the channels flow through
(BN, activations, pooling, residual Add, Flatten…) and the inputs its consumers reduce over.

Every channel is an *atom* owned by the group whose layers produce it. A group made by a Concat
holds the atoms of its parts; a Split or Slice output holds a range of its input's atoms, a
channel Gather's output the atoms at its indices. Pruning
an owner's atoms removes them from every group that holds them (its *sites*). A group read or
produced by a grouped Conv is cut into ``segments`` equal runs that keep equally many channels,
or, where the conv loses whole groups, loses its channels in whole aligned runs (``conv_group``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from .graphview import GraphView, node_name
from .ops import ChannelRule, LinearHandler, handler_for

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Blocked:
    """Why a group's channels cannot be followed: at a node (``op_type``, ``node`` its name or
    first output) or, with both empty, a cause of the graph itself (its inputs and outputs, an
    unknown channel count). ``str`` reads as the report prints it."""

    op_type: str
    node: str
    why: str

    @classmethod
    def at(cls, node: onnx.NodeProto, why: str) -> "Blocked":
        return cls(node.op_type, node_name(node), why)

    @classmethod
    def graph(cls, why: str) -> "Blocked":
        return cls("", "", why)

    def __str__(self) -> str:
        return f"{self.op_type} '{self.node}' {self.why}" if self.op_type else self.why


def node_label(node: onnx.NodeProto) -> str:
    """How reports name a node: ``<Op> '<name>'``."""
    return f"{node.op_type} '{node_name(node)}'"


@dataclass
class Consumer:
    """A node that reduces over the group's channels, reading them from ``tensor``."""

    node: onnx.NodeProto
    tensor: str
    block: int  # entries of the tensor's axis 1 per channel


@dataclass
class ChannelGroup:
    """One list of coupled channels and every node that must change when one is pruned."""

    index: int
    channels: int
    tensors: list[str]
    producers: list[onnx.NodeProto] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    throughs: list[onnx.NodeProto] = field(default_factory=list)
    blocked: list[Blocked] = field(default_factory=list)
    atoms: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    owner: bool = False  # its atoms are its own (it has producers), not another group's
    derived_from: str = ""  # 'Concat …' / 'Split …' when its atoms come from other groups
    sites: list["ChannelGroup"] = field(default_factory=list)  # groups holding its atoms (owners)
    segments: int = 1  # equal runs of channels that must keep equally many each (grouped Conv)
    conv_group: int = 1  # channels go in whole aligned runs of this many (the groups of a grouped Conv)
    # inputs of element-wise ops on several maps that hold fewer values than the op's output: one
    # value per channel spread over the map (a gate, a conditioning branch's scale or shift)
    broadcast: set[str] = field(default_factory=set)
    # the zero channels a Pad adds on the channel axis (it holds no tensor: they sit in the group the
    # Pad writes, made by the layers summed onto the Pad there)
    padding: onnx.NodeProto | None = None

    @property
    def name(self) -> str:
        names = "+".join(node_name(p) for p in self.producers)
        if self.padding is not None:
            return f"{names} (the channels {node_label(self.padding)} adds)" if names else \
                f"the channels {node_label(self.padding)} adds"
        return names or self.tensors[0]

    @property
    def granule(self) -> int:
        """The group's widths are multiples of this: its conv groups (equal runs or whole ones)."""
        return math.lcm(self.segments, self.conv_group)

    @property
    def coupled(self) -> bool:
        """True when branches from several producers are summed (a residual join), in the group
        itself or where its channels flow on: a group a Concat or Pad makes that is also summed
        with a layer's output joins what they bring in with that layer's (a residual join across
        them). The zero channels a Pad adds are joined with nothing there.

        A gate multiplied onto its trunk (squeeze-excite) also ties producers together but is
        not a residual join, nor is a per-channel shift added over the map (a conditioning
        branch's, as in FiLM), nor a sum of two maps that come from the same producer
        (``y·(1 + scale) + shift`` written as ``y·scale + shift + y``): such groups are pruned by
        default.
        """
        if self.padding is not None:
            return any(site._sums_maps(derived=False) for site in self.sites)
        return any(site._sums_maps(derived=site is not self) for site in self.sites or [self])

    def _sums_maps(self, derived: bool) -> bool:
        """Whether a join in this group sums maps of different producers; with ``derived`` (the
        group is made by a Concat or Pad), the channels brought in count as one more map."""
        if len(self.producers) < (1 if derived else 2):
            return False
        made_by = {o: n for n in [*self.producers, *self.throughs] for o in n.output if o}
        producers = {id(p) for p in self.producers}
        maps_in = set(self.tensors) - self.broadcast
        sources: dict[str, frozenset[int]] = {}

        def sources_of(t: str) -> frozenset[int]:  # the producers whose maps reach t (not via spreads)
            if t not in sources:
                sources[t] = frozenset()  # a cycle guard; graphs are acyclic
                node = made_by.get(t)
                if node is None:
                    found = frozenset()
                elif id(node) in producers:
                    found = frozenset({id(node)})
                else:
                    found = frozenset().union(*(sources_of(i) for i in node.input if i in maps_in))
                sources[t] = found
            return sources[t]

        for n in self.throughs:
            if handler_for(n).joins_branches:
                maps = {sources_of(i) for i in n.input if i in maps_in}
                if len(maps) > 1:
                    return True
        return False

    @property
    def all_consumers(self) -> list[Consumer]:
        return [c for site in (self.sites or [self]) for c in site.consumers]

    @property
    def prunable(self) -> bool:
        return not self.reason

    @property
    def reason(self) -> str:
        """Why the group's own channels cannot be pruned ('' when they can)."""
        if not self.owner:
            return f"channels come from other groups ({self.derived_from})" if self.derived_from else \
                "no layer produces these channels"
        for site in self.sites or [self]:
            if site.blocked:
                where = "" if site is self else f" (where they flow into '{site.tensors[0]}')"
                # the nodes first: the graph's own inputs and outputs must not crowd a real barrier out
                causes = sorted(set(site.blocked), key=lambda b: (not b.op_type, b))
                return "; ".join(str(b) for b in causes[:3]) + where
        for site in self.sites:
            if (site.segments > 1 or site.conv_group > 1) and site is not self:
                return f"a grouped Conv reads them after {site.derived_from}"
        if not self.producers:
            return "no layer produces these channels"
        if self.segments > 1 and self.channels < 2 * self.segments:
            return f"a grouped Conv has one channel per group here ({self.segments} groups)"
        if not self.all_consumers:
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


def _activations(node: onnx.NodeProto, g: GraphView) -> list[str]:
    return [t for t in node.input if t and not g.is_const(t) and len(g.shape(t) or ()) >= 2]


def assign_channel_axes(g: GraphView) -> None:
    """Find which axis holds each tensor's channels (``g.channel_axes``; axis 1 unless said).

    Layers fix their axis (1, or the last for a channels-last ``MatMul``) on what they produce;
    ``any_axis`` ops (activations, element-wise ops, reductions, Transpose) carry the axis of their
    main input forward. Tensors that no layer reaches (the model input of a channels-last graph)
    take it back from their readers.
    """
    axes: dict[str, int] = {}
    nodes = list(g.graph.node)
    for node in nodes:
        handler = handler_for(node)
        ins = _activations(node, g)
        axis = None
        if not handler.any_axis:
            axis = handler.layer_axis(node, g)
        elif ins and ins[0] in axes:
            axis = handler.output_axis(node, g, axes[ins[0]])
        if axis is not None:
            axes.update((o, axis) for o in node.output if o)
    for node in reversed(nodes):
        handler = handler_for(node)
        ins = _activations(node, g)
        out = node.output[0] if node.output else ""
        if not handler.any_axis:
            axis = handler.layer_axis(node, g)
            axes.update((t, axis) for t in ins if t not in axes)
        elif ins and ins[0] not in axes and out in axes:
            axis = handler.input_axis(node, g, axes[out])
            if axis is not None:
                axes.update((t, axis) for t in ins if t not in axes)
    g.channel_axes = {t: a for t, a in axes.items() if a != 1}


def _spread(g: GraphView, t: str, out: str) -> bool:
    """Whether ``t``, an input of an element-wise op, holds fewer values than its output ``out`` (known shapes)."""
    a, b = g.shape(t) if t else None, g.shape(out)
    return a is not None and b is not None and len(a) == len(b) and int(np.prod(a)) < int(np.prod(b))


def _rule(node: onnx.NodeProto, g: GraphView) -> ChannelRule | None:
    handler = handler_for(node)
    if not handler.any_axis and any(g.channel_axis(t) != handler.layer_axis(node, g) for t in _activations(node, g)):
        return None  # channels held on one axis reach an op that reads them on another
    try:
        return handler.rule(node, g)
    except (ValueError, IndexError, KeyError, TypeError) as exc:  # odd attributes: stay safe
        log.debug("treating %s '%s' as a barrier: %s", node.op_type, node.name, exc)
        return None


def shared_weight(node: onnx.NodeProto, g: GraphView) -> str:
    """The name of a weight of the layer ``node`` (a constant input of two or more dims) that other
    nodes read too ('' where none): a detector head run at every pyramid level with one set of
    weights (torchvision's FCOS and RetinaNet, YOLO-FastestV2)."""
    if not isinstance(handler_for(node), LinearHandler):
        return ""
    return next((i for i in node.input if i and g.is_const(i) and len(g.shape(i) or ()) >= 2 and
                 len(g.consumers.get(i, [])) > 1), "")


def tied_layers(g: GraphView) -> dict[str, list[onnx.NodeProto]]:
    """Layers that share one weight, by its name, where every node reading it is such a layer of
    one op type reading it at the same input: their input channels are the same channels, and so
    are their outputs', so they are pruned alike and refit together (one weight stays shared)."""
    tied: dict[str, list[onnx.NodeProto]] = {}
    for node in g.graph.node:
        name = shared_weight(node, g)
        if name and name not in tied:
            readers = g.consumers[name]
            slots = {(r.op_type, r.domain, tuple(i for i, t in enumerate(r.input) if t == name)) for r in readers}
            if len(slots) == 1 and all(isinstance(handler_for(r), LinearHandler) for r in readers):
                tied[name] = list(readers)
    return tied


def _link_spaces(g: GraphView, spaces: _Spaces) -> tuple[list, dict[str, list[Blocked]]]:
    """Apply every node's rule: tie tensors, and record barriers."""
    blocked: dict[str, list[Blocked]] = {}
    rules = []

    def block(t: str, why: Blocked) -> None:
        spaces.add(t)
        blocked.setdefault(t, []).append(why)

    tied = tied_layers(g)
    for node in g.graph.node:
        shared = shared_weight(node, g)
        rule = None if shared and shared not in tied else _rule(node, g)
        rules.append((node, rule))
        acts = [t for t in list(node.input) + list(node.output) if t and not g.is_const(t)]
        if rule is None:
            why = f"shares its weight '{shared}' with {len(g.consumers[shared]) - 1} other node(s) that read it " \
                "otherwise" if shared else "is a barrier"
            for t in acts:
                block(t, Blocked.at(node, why))
            continue
        covered = set(rule.produces) | set(rule.consumes) | set(rule.shape_only)
        for a, b in rule.ties:
            spaces.add(a)
            spaces.block[b] = spaces.block.get(a, 1) * rule.blocks.get(b, 1)
            spaces.union(a, b)
            covered |= {a, b}
        for ins, out in rule.joins:
            covered |= set(ins) | {out}
        for inp, outs, _ in rule.slices:
            covered |= {inp} | set(outs)
        for inp, out, _ in rule.selects:
            covered |= {inp, out}
        for inp, out, _, _ in rule.pads:
            covered |= {inp, out}
        for t in covered:
            spaces.add(t)
        for t in acts:
            if t not in covered:
                block(t, Blocked.at(node, f"mixes channels of '{t}'"))
    for layers in tied.values():  # one weight reads and writes the same channels at every level
        inputs = [acts[0] for acts in (_activations(n, g) for n in layers) if acts]
        for tensors in (inputs, [n.output[0] for n in layers]):
            for t in tensors:
                spaces.add(t)
                spaces.union(tensors[0], t)
    for t in g.graph_inputs:
        block(t, Blocked.graph("model input"))
    for t in g.graph_outputs:
        block(t, Blocked.graph("model output"))
    return rules, blocked


def find_groups(g: GraphView) -> list[ChannelGroup]:
    """Split the graph's channel axes into groups, in graph order of their first tensor."""
    assign_channel_axes(g)
    spaces = _Spaces()
    rules, blocked = _link_spaces(g, spaces)
    groups: dict[str | tuple[str, int], ChannelGroup] = {}  # by root tensor name (a Pad's zero channels: a tuple)

    def group_of(t: str) -> ChannelGroup:
        root = spaces.find(t)
        if root not in groups:
            groups[root] = ChannelGroup(index=len(groups), channels=0, tensors=[])
        return groups[root]

    for t in spaces.parent:
        grp = group_of(t)
        grp.tensors.append(t)
        grp.blocked.extend(blocked.get(t, []))
        ch = g.channels(t)
        if ch is not None and spaces.block[t] == 1:
            if grp.channels and grp.channels != ch:
                grp.blocked.append(Blocked.graph(f"channel counts disagree at '{t}'"))
            grp.channels = ch
    derived: dict[int, tuple[onnx.NodeProto, list[tuple[ChannelGroup, np.ndarray]]]] = {}
    paddings: list[tuple[ChannelGroup, ChannelGroup]] = []  # (a Pad's zero channels, the group it writes)
    for node, rule in rules:
        if rule is None:
            continue
        for t in rule.produces:
            grp = group_of(t)
            grp.producers.append(node)
            if spaces.block[t] != 1:
                grp.blocked.append(Blocked.at(node, f"produces '{t}' in blocks"))
        for t in rule.consumes:
            group_of(t).consumers.append(Consumer(node, t, spaces.block[t]))
        seen = set()
        for a, _ in rule.ties:
            grp = group_of(a)
            if id(grp) not in seen:
                grp.throughs.append(node)
                seen.add(id(grp))
                if len(_activations(node, g)) > 1:  # a join or a product of maps
                    grp.broadcast.update(i for i in node.input if _spread(g, i, node.output[0]))
        for ins, out in rule.joins:
            parts = [(group_of(i), np.arange(g.channels(i) or 0)) for i in ins]
            _define(derived, group_of(out), node, parts, spaces, ins + [out])
        for t, count in rule.segments.items():
            grp = group_of(t)
            grp.segments = math.lcm(grp.segments, count)
        for t, count in rule.whole_groups.items():
            grp = group_of(t)
            grp.conv_group = math.lcm(grp.conv_group, count)
        for inp, outs, start in rule.slices:
            group_of(inp).throughs.append(node)
            offset = start
            for o in outs:
                size = g.channels(o) or 0
                part = [(group_of(inp), np.arange(offset, offset + size))]
                _define(derived, group_of(o), node, part, spaces, [inp, o])
                offset += size
        for inp, out, indices in rule.selects:
            group_of(inp).throughs.append(node)
            part = [(group_of(inp), np.asarray(indices, np.int64))]
            _define(derived, group_of(out), node, part, spaces, [inp, out])
        for inp, out, before, after in rule.pads:
            widened = group_of(out)
            widened.throughs.append(node)  # it rewrites its amounts when the zero channels go
            zeros = ChannelGroup(index=len(groups), channels=before + after, tensors=[], padding=node)
            groups[("padding", len(groups))] = zeros  # no tensor is its own (a tuple is no tensor name)
            paddings.append((zeros, widened))
            part = [(zeros, np.arange(before)), (group_of(inp), np.arange(g.channels(inp) or 0)),
                    (zeros, np.arange(before, before + after))]
            _define(derived, widened, node, part, spaces, [inp, out])
    for zeros, widened in paddings:  # what a Pad adds is made by the layers summed onto it
        zeros.producers = list(widened.producers)
    result = sorted(groups.values(), key=lambda grp: grp.index)
    _assign_atoms(result, derived)
    for grp in result:
        if grp.channels == 0 and not grp.blocked:
            grp.blocked.append(Blocked.graph("channel count unknown"))
        elif grp.channels % grp.segments:
            grp.blocked.append(Blocked.graph(f"{grp.channels} channels do not split into {grp.segments} conv groups"))
        elif grp.channels % grp.conv_group:
            grp.blocked.append(Blocked.graph(
                f"{grp.channels} channels do not split into conv groups of {grp.conv_group}"))
        elif grp.segments > 1 and grp.conv_group > 1:
            grp.blocked.append(Blocked.graph("one grouped Conv keeps its groups whole, another cuts inside them"))
    return result


def _define(derived, grp: ChannelGroup, node: onnx.NodeProto, parts, spaces: _Spaces, tensors: list[str]) -> None:
    """Record that ``grp``'s channels are ``parts`` (group, the channels of it taken) of other groups, as
    ``node`` joins, slices or selects them."""
    if any(spaces.block.get(t, 1) != 1 for t in tensors):
        grp.blocked.append(Blocked.at(node, "joins flattened tensors"))
    if grp.index in derived:
        # the channels stay as the first definition has them; those of the second definition's
        # parts (a conv's channels a Slice adds onto a Concat's) must stay too, or the two differ
        why = Blocked.at(node, f"redefines channels already defined by {node_label(derived[grp.index][0])}")
        for part in {part.index: part for part, _ in parts if part is not grp}.values():
            part.blocked.append(why)
        grp.blocked.append(why)
        return
    derived[grp.index] = (node, parts)


def _assign_atoms(groups: list[ChannelGroup], derived) -> None:
    """Give each group its atoms: fresh ones for owners, the parts' for Concat/Split outputs."""
    counter = [0]
    done: dict[int, np.ndarray] = {}

    def atoms(grp: ChannelGroup, depth: int = 0) -> np.ndarray:
        if grp.index in done:
            return done[grp.index]
        if grp.index in derived and depth < 10_000:
            node, parts = derived[grp.index]
            grp.derived_from = node_label(node)
            pieces = []
            fits = True
            for part, taken in parts:
                a = atoms(part, depth + 1)
                if part is grp:
                    pieces.append(a)
                    continue
                inside = taken[(taken >= 0) & (taken < len(a))]
                fits = fits and len(inside) == len(taken)
                pieces.append(a[inside])
            result = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
            if len(result) != grp.channels or not fits:
                grp.blocked.append(Blocked.at(node, "has channel counts that do not add up"))
        else:
            result = np.arange(counter[0], counter[0] + grp.channels, dtype=np.int64)
            counter[0] += grp.channels
            grp.owner = True
        done[grp.index] = result
        grp.atoms = result
        return result

    for grp in groups:
        atoms(grp)
    owner_of = np.empty(counter[0], dtype=np.int64)
    for grp in groups:
        if grp.owner:
            owner_of[grp.atoms] = grp.index
    for grp in groups:
        if grp.tensors:  # a Pad's zero channels sit only in the group it writes
            for owner in dict.fromkeys(owner_of[grp.atoms].tolist()):
                groups[owner].sites.append(grp)
