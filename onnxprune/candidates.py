"""Which channel groups a run prunes, which layers it refits, and in what order it edits them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import onnx

from .errors import OptionError
from .graph import ChannelGroup, Consumer, find_groups, shared_weight, tied_layers
from .graphview import GraphView
from .ops import LinearHandler, handler_for


@dataclass
class Analysis:
    """A model's channel groups: all of them, those a run prunes, and why the others are kept."""

    g: GraphView
    groups: list[ChannelGroup]
    candidates: list[ChannelGroup]
    skipped: list[tuple[str, str]]  # (group name, reason)


def analyse(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], prune_coupled: bool,
            needs_data: bool, exclude: tuple[str, ...] = ()) -> Analysis:
    """Channel groups of ``model`` (edited in place by later stages) and the prunable ones."""
    g = GraphView(model, shapes)
    groups = find_groups(g)
    candidates, skipped = choose_candidates(groups, g, prune_coupled, needs_data, exclude=exclude)
    return Analysis(g, groups, candidates, skipped)


def choose_candidates(groups: list[ChannelGroup], g: GraphView, prune_coupled: bool, needs_data: bool, *,
                      exclude: tuple[str, ...] = ()) -> tuple[list[ChannelGroup], list[tuple[str, str]]]:
    """The groups to prune, and (name, reason) of the groups with producers that are kept.

    ``exclude``: fnmatch patterns (case-sensitive) of node, tensor or weight names; a group
    touching a match (its producers, the nodes its channels flow through, its consumers, its
    tensors, or theirs where its channels flow into a Concat or Split) keeps its full width.
    A pattern that matches no name in the graph is an :class:`OptionError`."""
    check_exclude(exclude, g)
    chosen, skipped = [], []
    for grp in groups:
        reason = grp.reason
        if not reason and exclude:
            pattern = excluded_by(grp, g, exclude)
            if pattern is not None:
                reason = f"excluded by --exclude {pattern}"
        if not reason and grp.coupled and not prune_coupled:
            reason = "channels coupled across branches (residual join); block outputs keep their width"
        if not reason and needs_data and not any(sampleable(c, g) for c in grp.all_consumers):
            reason = ("none of its consumers can be sampled (e.g. only ConvTranspose, a grouped Conv, or a conv over "
                      "windows folded into the batch axis)")
        if reason:
            if grp.owner and grp.channels > 1 and grp.producers:
                skipped.append((grp.name, reason))
        else:
            chosen.append(grp)
    return chosen, skipped


def _weight_names(name: str) -> tuple[str, ...]:
    """A weight's name, and the model's own where onnxprune renamed it (BatchNorm folding gives
    a Conv's weights fresh ``…__opN`` names)."""
    base = re.sub(r"(__op\d+)+$", "", name)
    return (name, base) if base and base != name else (name,)


def graph_names(g: GraphView) -> set[str]:
    """Every node, tensor and weight name of the (main) graph."""
    graph = g.graph
    names = {n.name for n in graph.node} | {t for n in graph.node for t in (*n.input, *n.output)}
    names |= {v.name for v in (*graph.input, *graph.output)}
    names |= {w for t in graph.initializer for w in _weight_names(t.name)}
    names.discard("")
    return names


def check_exclude(patterns: Sequence[str], g: GraphView) -> None:
    """One-line :class:`OptionError` for the first pattern that matches no name in the graph."""
    names = graph_names(g) if patterns else set()
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            raise OptionError(f"--exclude '{pattern}' matches no node or tensor name in the model (a "
                              "BatchNormalization folded into its Conv goes by the Conv's name)")


def _touched_names(grp: ChannelGroup, g: GraphView) -> Iterable[str]:
    """The names a group touches: its tensors, and the names and weights of its nodes, over
    every group that holds its channels."""
    for site in grp.sites or [grp]:
        yield from site.tensors
        for node in [*site.producers, *site.throughs, *(c.node for c in site.consumers)]:
            if node.name:
                yield node.name
            yield from (w for t in node.input if t in g.initializers for w in _weight_names(t))


def excluded_by(grp: ChannelGroup, g: GraphView, patterns: Sequence[str]) -> str | None:
    """The first of ``patterns`` matching a name the group touches, if any."""
    names = set(_touched_names(grp, g))
    return next((p for p in patterns if any(fnmatchcase(name, p) for name in names)), None)


def sampleable(c: Consumer, g: GraphView) -> bool:
    """Whether a consumer's regression problem can be sampled (and so it can be refit)."""
    h = handler_for(c.node)
    return isinstance(h, LinearHandler) and h.reconstructable(c.node, g)


def node_key(node: onnx.NodeProto) -> str:
    """A node's first output name: unique in a graph, and stable where Python's identity of a
    protobuf message is not (a node's wrapper object can change once nothing holds it)."""
    return next((o for o in node.output if o), node.name)


def positions(model: onnx.ModelProto) -> dict[str, int]:
    """Each node's place in the (topologically sorted) node list, by :func:`node_key`."""
    return {node_key(n): i for i, n in enumerate(model.graph.node)}


def downstream_layers(g: GraphView, todo: list[ChannelGroup], topo: dict[str, int]) -> list[Consumer]:
    """Sampleable layers after the first pruned channels that no pruned group refits: their
    inputs drift as the network is pruned, so they are refit to their original outputs too
    (the producers' kept filters, projection shortcuts, the classifier)."""
    refit_anyway = {id(c.node) for grp in todo for c in grp.all_consumers}
    first = min(topo[node_key(p)] for grp in todo for p in grp.producers)
    tied = {node_key(n) for nodes in tied_layers(g).values() for n in nodes}  # refit together (pruning_steps)
    layers = []
    for node in g.graph.node:
        if topo[node_key(node)] <= first or id(node) in refit_anyway or not node.input:
            continue
        c = Consumer(node, node.input[0], 1)
        if sampleable(c, g) and handler_for(node).rule(node, g) is not None and \
                (node_key(node) in tied or not shared_weight(node, g)):
            layers.append(c)
    return layers


def first_edited(step: ChannelGroup | Consumer, g: GraphView, topo: dict[str, int]) -> int:
    """Position of the first node a pruning step edits: for a unit, any node that produces or
    reads a tensor of a group holding its channels; for a refit, the layer itself."""
    if isinstance(step, Consumer):
        return topo[node_key(step.node)]
    nodes = [n for grp in (step.sites or [step]) for t in grp.tensors
             for n in [g.producer.get(t), *g.consumers.get(t, [])] if n is not None]
    return min(topo[node_key(n)] for n in nodes)


def pruning_steps(analysis: Analysis, widths: dict[int, int], topo: dict[str, int], refit_downstream: bool
                  ) -> list[ChannelGroup | Consumer]:
    """The groups to cut (narrower than they are) and the layers to refit, front to back (by
    their first consumer). A candidate without a width in ``widths`` keeps its own (an analysis
    made without the run's ``exclude`` lists the excluded groups among its candidates)."""
    todo = [grp for grp in analysis.candidates if widths.get(grp.index, grp.channels) < grp.channels]
    steps: list[tuple[int, ChannelGroup | Consumer]] = [
        (min(topo[node_key(c.node)] for c in grp.all_consumers), grp) for grp in todo]
    if todo and refit_downstream:
        others = {node_key(n) for nodes in tied_layers(analysis.g).values() for n in nodes[1:]}  # refit with the first
        steps += [(topo[node_key(c.node)], c) for c in downstream_layers(analysis.g, todo, topo)
                  if node_key(c.node) not in others]
    steps.sort(key=lambda step: step[0])
    return [step for _, step in steps]
