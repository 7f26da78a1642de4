"""Which channels of a layer's output anything reads.

A deployed graph often computes more than it uses: a multi-task head whose export keeps only some
of its last conv's channels (M-LSD's line detector slices 5 of its 16), a tensor a ``Slice``
halves and the other half of which nothing reads. The channels that reach no graph output are
*unread*; a selection that weighs a layer's error on them keeps input channels for outputs no
one sees. :func:`read_outputs` finds them from the channel rules of the op handlers, and
:func:`read_problem` restricts a consumer's selection problem to the outputs that are read.
"""

from __future__ import annotations

import numpy as np
import onnx

from .graphview import GraphView
from .ops import ChannelRule, LinearHandler, handler_for

# How far a tensor's readers are followed; past it every channel counts as read.
MAX_DEPTH = 64


def read_outputs(g: GraphView, tensor: str) -> np.ndarray | None:
    """A mask over ``tensor``'s channels: True where some graph output may depend on the channel,
    followed through the readers' channel rules (ties, slices, selections, joins). None where
    every channel is read, or the channel count is unknown. A reader without a rule, a layer
    that reads the channels, or a graph output reads them all."""
    channels = g.channels(tensor)
    if channels is None:
        return None
    mask = _read(g, tensor, channels, 0, {}, {o.name for o in g.graph.output})
    return None if mask.all() else mask


def _read(g: GraphView, tensor: str, channels: int, depth: int, memo: dict[str, np.ndarray],
          outputs: set[str]) -> np.ndarray:
    if tensor in memo:
        return memo[tensor]
    every = np.ones(channels, dtype=bool)
    memo[tensor] = every  # a cycle, or a tensor reached again, reads all
    if depth > MAX_DEPTH or tensor in outputs:
        return every
    mask = np.zeros(channels, dtype=bool)
    for node in g.consumers.get(tensor, []):
        rule = handler_for(node).rule(node, g)
        mask |= every if rule is None else _read_through(g, node, rule, tensor, channels, depth, memo, outputs)
        if mask.all():
            break
    memo[tensor] = mask
    return mask


def _read_through(g: GraphView, node: onnx.NodeProto, rule: ChannelRule, tensor: str, channels: int, depth: int,
                  memo: dict[str, np.ndarray], outputs: set[str]) -> np.ndarray:
    """The channels of ``tensor`` that one reader (``node``, its ``rule``) passes on to something
    read; all of them where the rule does not say how they reach the node's outputs."""
    every = np.ones(channels, dtype=bool)
    if tensor in rule.shape_only:
        return np.zeros(channels, dtype=bool)
    if tensor in rule.consumes or tensor in rule.blocks:
        return every  # a layer reads them all, or one channel spans several entries

    def read(out: str, size: int | None) -> np.ndarray | None:
        part = _read(g, out, size, depth + 1, memo, outputs) if size is not None else None
        return part if part is not None and len(part) == size else None

    mask = np.zeros(channels, dtype=bool)
    covered = False
    for a, b in rule.ties:
        other = b if a == tensor else a if b == tensor else None
        if other is not None and other != tensor and other in node.output:  # not a tie between two inputs
            part = read(other, channels)
            if part is None:
                return every
            mask |= part
            covered = True
    for source, outs, start in rule.slices:
        if source == tensor:
            at = start
            for out in outs:
                size = g.channels(out)
                part = read(out, size)
                if part is None or at + len(part) > channels:
                    return every
                mask[at:at + len(part)] |= part
                at += len(part)
            covered = True
    for source, out, indices in rule.selects:
        if source == tensor:
            part = read(out, len(indices))
            if part is None:
                return every
            mask[np.asarray(indices)[part]] = True
            covered = True
    for inputs, out in rule.joins:
        if tensor in inputs:
            sizes = [g.channels(t) for t in inputs]
            part = read(out, sum(sizes)) if None not in sizes else None
            if part is None:
                return every
            offsets = np.cumsum([0, *sizes])
            for i, t in enumerate(inputs):
                if t == tensor:
                    mask |= part[offsets[i]:offsets[i + 1]]
            covered = True
    return mask if covered else every


def read_problem(node: onnx.NodeProto, g: GraphView, stats) -> tuple:
    """A consumer's selection problem — its statistics, ``weight [Cout, D]`` and bias — over the
    outputs something reads (:func:`read_outputs`); over all of them where all are read."""
    h: LinearHandler = handler_for(node)  # type: ignore[assignment]
    weight, bias = h.weight_matrix(node, g), h.bias(node, g)
    read = read_outputs(g, node.output[0])
    if read is None or not read.any():
        return stats, weight, bias
    every = h.output_columns(node, g, np.arange(len(read)))
    if not len(every) == weight.shape[0] == stats.outputs:  # the problem is not over all its outputs: as it is
        return stats, weight, bias
    cols = h.output_columns(node, g, np.flatnonzero(read))
    return stats.with_outputs(cols), weight[cols], None if bias is None else bias[cols]
