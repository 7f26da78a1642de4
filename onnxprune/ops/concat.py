"""Concat and Split on the channel axis: channels are joined or cut into consecutive ranges."""

from __future__ import annotations

import numpy as np

from ..graphview import attr, set_attr
from .base import ChannelRule, Handler, register


def _is_channel_axis(axis: int, rank: int) -> bool:
    return rank >= 2 and axis % rank == 1


@register("Concat")
class Concat(Handler):
    """Concatenation along channels: the output's channels are the inputs' channels, in order."""

    def rule(self, node, g):
        shape = g.shape(node.output[0])
        if shape is None or not _is_channel_axis(attr(node, "axis", 0), len(shape)):
            return None
        if any(g.is_const(i) or g.shape(i) is None for i in node.input if i):
            return None
        return ChannelRule(joins=[([i for i in node.input if i], node.output[0])])


@register("Split")
class Split(Handler):
    """Split along channels into consecutive ranges; the sizes are rewritten when channels go."""

    def _sizes(self, node, g) -> np.ndarray | None:
        if len(node.input) > 1 and node.input[1]:
            return g.input_const(node, 1)
        sizes = attr(node, "split")
        if sizes is not None:
            return np.asarray(sizes, dtype=np.int64)
        return np.asarray([g.channels(o) for o in node.output], dtype=np.int64)

    def rule(self, node, g):
        shape = g.shape(node.input[0])
        if shape is None or not _is_channel_axis(attr(node, "axis", 0), len(shape)):
            return None
        sizes = self._sizes(node, g)
        if sizes is None or any(g.channels(o) is None for o in node.output):
            return None
        return ChannelRule(slices=[(node.input[0], list(node.output))])

    def prune_through(self, node, keep, g):
        sizes = self._sizes(node, g)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        new = np.array([int(((keep >= lo) & (keep < hi)).sum()) for lo, hi in zip(bounds[:-1], bounds[1:])],
                       dtype=np.int64)
        if len(node.input) > 1 and node.input[1]:
            g.set_const(node, 1, new)
        elif g.model.opset_import and _opset(g) >= 13:
            g.set_const(node, 1, new)
        else:
            set_attr(node, "split", [int(v) for v in new])
        if attr(node, "num_outputs") is not None:
            node.attribute.remove(next(a for a in node.attribute if a.name == "num_outputs"))


def _opset(g) -> int:
    return next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 13)
