"""Ops that act on spatial axes only: pooling, padding, resizing, spatial reductions, Flatten."""

from __future__ import annotations

import numpy as np

from ..graphview import attr
from .base import ChannelRule, Handler, register


def _tie(node) -> ChannelRule:
    return ChannelRule(ties=[(node.input[0], node.output[0])])


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
          "MaxRoiPool")
class Pool(Handler):
    """Pooling keeps channels (MaxPool's optional indices output makes it a barrier)."""

    def rule(self, node, g):
        if len(node.output) > 1 and node.output[1]:
            return None
        return _tie(node)


@register("Pad")
class Pad(Handler):
    """Pad keeps channels as long as it pads no channels."""

    def rule(self, node, g):
        pads = g.input_const(node, 1) if len(node.input) > 1 else None
        if pads is None:
            pads = attr(node, "pads")
        if pads is None:
            return None
        pads = np.asarray(pads)
        axes = g.input_const(node, 3) if len(node.input) > 3 and node.input[3] else None
        rank = len(pads) // 2
        if axes is not None:
            ndim = len(g.shape(node.input[0]) or ())
            axes = [int(a) % ndim for a in axes] if ndim else list(axes)
            if 1 in axes and (pads[axes.index(1)] or pads[axes.index(1) + rank]):
                return None
        elif rank > 1 and (pads[1] or pads[1 + rank]):
            return None
        return _tie(node)


@register("Resize", "Upsample")
class Resize(Handler):
    """Resizing keeps channels when the channel scale is 1; an explicit ``sizes`` is rewritten."""

    def _scales_sizes(self, node, g):
        if node.op_type == "Upsample":
            return g.input_const(node, 1), None
        return g.input_const(node, 2), g.input_const(node, 3)

    def rule(self, node, g):
        scales, sizes = self._scales_sizes(node, g)
        if scales is not None and scales.size > 1:
            return _tie(node) if scales[1] == 1 else None
        if sizes is not None and sizes.size > 1 and (len(node.input) < 4 or attr(node, "axes") is None):
            return _tie(node)
        return None

    def prune_through(self, node, keep, g):
        scales, sizes = self._scales_sizes(node, g)
        if (scales is None or scales.size <= 1) and sizes is not None:
            new = sizes.copy()
            new[1] = len(keep)
            g.set_const(node, 3, new)


@register("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceProd")
class Reduce(Handler):
    """A reduction over spatial axes keeps channels (kept at axis 1)."""

    def rule(self, node, g):
        shape = g.shape(node.input[0])
        if shape is None:
            return None
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = g.input_const(node, 1)
            if axes is None:
                return None
        if axes is None:
            return None  # reduces every axis
        axes = {int(a) % len(shape) for a in axes}
        if 1 in axes or (0 in axes and not attr(node, "keepdims", 1)):
            return None
        return _tie(node)


@register("Flatten")
class Flatten(Handler):
    """``[N, C, H, W] -> [N, C·H·W]``: each channel becomes a block of H·W columns."""

    def rule(self, node, g):
        shape = g.shape(node.input[0])
        if attr(node, "axis", 1) != 1 or shape is None:
            return None
        return ChannelRule(ties=[(node.input[0], node.output[0])],
                           blocks={node.output[0]: int(np.prod(shape[2:]))})
