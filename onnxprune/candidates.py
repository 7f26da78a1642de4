"""Which channel groups a run prunes, which layers it refits, and in what order it edits them."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .graph import ChannelGroup, Consumer, find_groups
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
            needs_data: bool) -> Analysis:
    """Channel groups of ``model`` (edited in place by later stages) and the prunable ones."""
    g = GraphView(model, shapes)
    groups = find_groups(g)
    candidates, skipped = choose_candidates(groups, g, prune_coupled, needs_data)
    return Analysis(g, groups, candidates, skipped)


def choose_candidates(groups: list[ChannelGroup], g: GraphView, prune_coupled: bool, needs_data: bool
                      ) -> tuple[list[ChannelGroup], list[tuple[str, str]]]:
    """The groups to prune, and (name, reason) of the groups with producers that are kept."""
    chosen, skipped = [], []
    for grp in groups:
        reason = grp.reason
        if not reason and grp.coupled and not prune_coupled:
            reason = "channels coupled across branches (residual join); block outputs keep their width"
        if not reason and needs_data and not any(sampleable(c, g) for c in grp.all_consumers):
            reason = "none of its consumers can be sampled (e.g. only ConvTranspose or a grouped Conv)"
        if reason:
            if grp.owner and grp.channels > 1 and grp.producers:
                skipped.append((grp.name, reason))
        else:
            chosen.append(grp)
    return chosen, skipped


def sampleable(c: Consumer, g: GraphView) -> bool:
    """Whether a consumer's regression problem can be sampled (and so it can be refit)."""
    h = handler_for(c.node)
    return isinstance(h, LinearHandler) and h.reconstructable(c.node, g)


def positions(model: onnx.ModelProto) -> dict[int, int]:
    """Each node's place in the (topologically sorted) node list, by node identity."""
    return {id(n): i for i, n in enumerate(model.graph.node)}


def downstream_layers(g: GraphView, todo: list[ChannelGroup], topo: dict[int, int]) -> list[Consumer]:
    """Sampleable layers after the first pruned channels that no pruned group refits: their
    inputs drift as the network is pruned, so they are refit to their original outputs too
    (the producers' kept filters, projection shortcuts, the classifier)."""
    refit_anyway = {id(c.node) for grp in todo for c in grp.all_consumers}
    first = min(topo[id(p)] for grp in todo for p in grp.producers)
    layers = []
    for node in g.graph.node:
        if topo[id(node)] <= first or id(node) in refit_anyway or not node.input:
            continue
        c = Consumer(node, node.input[0], 1)
        if sampleable(c, g) and handler_for(node).rule(node, g) is not None:
            layers.append(c)
    return layers


def first_edited(step: ChannelGroup | Consumer, g: GraphView, topo: dict[int, int]) -> int:
    """Position of the first node a pruning step edits: for a unit, any node that produces or
    reads a tensor of a group holding its channels; for a refit, the layer itself."""
    if isinstance(step, Consumer):
        return topo[id(step.node)]
    nodes = [n for grp in (step.sites or [step]) for t in grp.tensors
             for n in [g.producer.get(t), *g.consumers.get(t, [])] if n is not None]
    return min(topo[id(n)] for n in nodes)


def pruning_steps(analysis: Analysis, widths: dict[int, int], topo: dict[int, int], refit_downstream: bool
                  ) -> list[ChannelGroup | Consumer]:
    """The groups to cut (narrower than they are) and the layers to refit, front to back (by
    their first consumer)."""
    todo = [grp for grp in analysis.candidates if widths[grp.index] < grp.channels]
    steps: list[tuple[int, ChannelGroup | Consumer]] = [
        (min(topo[id(c.node)] for c in grp.all_consumers), grp) for grp in todo]
    if todo and refit_downstream:
        steps += [(topo[id(c.node)], c) for c in downstream_layers(analysis.g, todo, topo)]
    steps.sort(key=lambda step: step[0])
    return [step for _, step in steps]
