"""Concat, Split, Slice and Gather on the channel axis: channels are joined, cut into consecutive
ranges or selected.

Split sizes and Slice bounds may be constants or computed from the channel count (``Shape``
arithmetic, see :mod:`.shapes`); either way they are rewritten as constants when channels go.
"""

from __future__ import annotations

import numpy as np

from ..graphview import attr, set_attr
from ..io import default_opset
from .base import ChannelRule, Handler, register
from .shapes import fold_channel_ints


def _is_channel_axis(axis: int, tensor: str, g) -> bool:
    rank = len(g.shape(tensor) or ())
    return rank >= 2 and axis % rank == g.channel_axis(tensor)


@register("Concat")
class Concat(Handler):
    """Concatenation along channels: the output's channels are the inputs' channels, in order."""

    any_axis = True

    def rule(self, node, g):
        out = node.output[0]
        if g.shape(out) is None or not _is_channel_axis(attr(node, "axis", 0), out, g):
            return None
        if any(g.is_const(i) or g.shape(i) is None or g.channel_axis(i) != g.channel_axis(out)
               for i in node.input if i):
            return None
        return ChannelRule(joins=[([i for i in node.input if i], node.output[0])])


@register("Split")
class Split(Handler):
    """Split along channels into consecutive ranges; the sizes are rewritten when channels go."""

    def _sizes(self, node, g) -> np.ndarray | None:
        if len(node.input) > 1 and node.input[1]:
            return fold_channel_ints(g, node.input[1])
        sizes = attr(node, "split")
        if sizes is not None:
            return np.asarray(sizes, dtype=np.int64)
        return np.asarray([g.channels(o) for o in node.output], dtype=np.int64)

    any_axis = True

    def rule(self, node, g):
        if g.shape(node.input[0]) is None or not _is_channel_axis(attr(node, "axis", 0), node.input[0], g):
            return None
        sizes = self._sizes(node, g)
        if sizes is None or any(g.channels(o) is None for o in node.output):
            return None
        return ChannelRule(slices=[(node.input[0], list(node.output), 0)])

    def reads_channel_count(self, node, name, g):
        return name == node.input[1] and name != node.input[0] and self.rule(node, g) is not None

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


@register("Slice")
class Slice(Handler):
    """Slice (opset 10+ inputs): on the channel axis, with step 1 and bounds that are constant
    (or folded from the channel count), the output is one consecutive range of the input's
    channels and the bounds are rewritten when channels go; on other axes channels pass through.
    Anything else on the channel axis is a barrier."""

    def _axes(self, node, g) -> list[int] | None:
        rank = len(g.shape(node.input[0]) or ())
        if rank < 2 or len(node.input) < 3:
            return None
        if len(node.input) > 3 and node.input[3]:
            axes = g.input_const(node, 3)
        else:
            bounds = g.shape(node.input[1])
            axes = np.arange(bounds[0]) if bounds is not None and len(bounds) == 1 else None
        return None if axes is None else [int(a) % rank for a in np.atleast_1d(axes)]

    any_axis = True

    def _channel_range(self, node, g, axes: list[int]) -> tuple[int, int] | None:
        """``[start, end)`` of the channels kept, or None unless step 1 and folded bounds."""
        i = axes.index(g.channel_axis(node.input[0]))
        if len(node.input) > 4 and node.input[4]:
            steps = g.input_const(node, 4)
            if steps is None or int(np.atleast_1d(steps)[i]) != 1:
                return None
        starts, ends = fold_channel_ints(g, node.input[1]), fold_channel_ints(g, node.input[2])
        channels = g.channels(node.input[0])
        if starts is None or ends is None or channels is None:
            return None

        def clamp(v: int) -> int:
            return min(max(v + channels if v < 0 else v, 0), channels)

        start, end = clamp(int(np.atleast_1d(starts)[i])), clamp(int(np.atleast_1d(ends)[i]))
        return start, max(start, end)

    def rule(self, node, g):
        axes = self._axes(node, g)
        if axes is None:
            return None
        if g.channel_axis(node.input[0]) not in axes:
            return ChannelRule(ties=[(node.input[0], node.output[0])])
        span = self._channel_range(node, g, axes)
        return None if span is None else ChannelRule(slices=[(node.input[0], [node.output[0]], span[0])])

    def reads_channel_count(self, node, name, g):
        axes = self._axes(node, g)
        return (axes == [g.channel_axis(node.input[0])] and name in node.input[1:3] and name not in (node.input[0], *node.input[3:])
                and self._channel_range(node, g, axes) is not None)

    def prune_through(self, node, keep, g):
        axes = self._axes(node, g)
        axis = g.channel_axis(node.input[0])
        if axes is None or axis not in axes:
            return
        start, end = self._channel_range(node, g, axes)
        new_start = int((keep < start).sum())
        new_end = new_start + int(((keep >= start) & (keep < end)).sum())
        for index, value in ((1, new_start), (2, new_end)):
            bounds = np.array(np.atleast_1d(fold_channel_ints(g, node.input[index])))
            bounds[axes.index(axis)] = value
            g.set_const(node, index, bounds)


@register("Gather")
class Gather(Handler):
    """Gather on the channel axis with constant indices, each channel at most once (a channel
    shuffle's halves, as :func:`~onnxprune.fold.fold_channel_shuffles` writes them): the output's
    channels are the input's at those indices, which are rewritten when channels go. Anything
    else is a barrier."""

    any_axis = True

    def output_axis(self, node, g, axis):
        rank = len(g.shape(node.input[0]) or ())
        return axis if rank >= 2 and attr(node, "axis", 0) % rank == axis else None  # else not followed

    def input_axis(self, node, g, axis):
        return self.output_axis(node, g, axis)

    def _indices(self, node, g) -> np.ndarray | None:
        data = node.input[0]
        channels = g.channels(data)
        if len(node.input) < 2 or g.is_const(data) or channels is None or g.shape(data) is None \
                or not _is_channel_axis(attr(node, "axis", 0), data, g):
            return None
        indices = g.input_const(node, 1)
        if indices is None or indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            return None
        indices = np.where(indices < 0, indices + channels, indices).astype(np.int64)
        if ((indices < 0) | (indices >= channels)).any() or len(np.unique(indices)) != len(indices):
            return None
        return indices

    def rule(self, node, g):
        indices = self._indices(node, g)
        if indices is None or g.channels(node.output[0]) != len(indices):
            return None
        return ChannelRule(selects=[(node.input[0], node.output[0], indices)])

    def prune_through(self, node, keep, g):
        indices = self._indices(node, g)
        position = np.full(g.channels(node.input[0]), -1, dtype=np.int64)
        position[keep] = np.arange(len(keep))
        moved = position[indices]
        g.set_const(node, 1, moved[moved >= 0])


def _opset(g) -> int:
    return default_opset(g.model) or 13
