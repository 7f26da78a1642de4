"""Ops that act on spatial axes only: pooling, padding, resizing, spatial reductions, Flatten."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..graphview import GraphView, attr, set_attr
from .base import ChannelRule, Handler, batch_one_constant, handler_for, register
from .layout import channel_entry_rule, rewrite_channel_entry
from .shapes import ShapeValues, axes_of, constant_elements, reads_channels


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

    def subsample_strides(self, node):
        """A ``MaxPool`` / ``AveragePool`` whose window is one element — kernel 1 on every axis, no
        padding, dilation, ceil mode or indices output — only subsamples the axes it pools (read as
        a strided slice by :func:`~onnxprune.fold.fold_channel_shuffles`)."""
        if node.op_type not in ("MaxPool", "AveragePool") or (len(node.output) > 1 and node.output[1]):
            return None
        kernel = list(attr(node, "kernel_shape", []))
        if not kernel or any(k != 1 for k in kernel) or any(attr(node, "pads", [])) or attr(node, "ceil_mode", 0) or \
                any(d != 1 for d in attr(node, "dilations", [])) or \
                attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            return None
        strides = [int(v) for v in attr(node, "strides", [1] * len(kernel))]
        return strides if len(strides) == len(kernel) and min(strides) >= 1 else None


@register("Pad")
class Pad(Handler):
    """Pad keeps channels as long as it provably pads no channels: the pads may be computed at run
    time (TF-style "same" padding) as long as the channel entries are constant zeros."""

    @staticmethod
    def amounts(node, g, values: ShapeValues | None = None, rank: int | None = None
                ) -> tuple[list, list[int]] | None:
        """The pad amounts as shape entries (every axis' begin, then every end) and the axes they
        pad, or None where they cannot be tracked. ``rank``: the input's, where its shape is not
        known to ``g``."""
        values = values or ShapeValues(g)
        rank = len(g.shape(node.input[0]) or ()) if rank is None else rank
        if len(node.input) > 1 and node.input[1]:
            pads = values.of(node.input[1])
        else:
            value = attr(node, "pads")
            pads = None if value is None else constant_elements(value)
        if pads is None or rank < 2 or pads.ndim != 1:
            return None
        pads = list(pads)
        half = len(pads) // 2
        axes = list(range(half))
        if len(node.input) > 3 and node.input[3]:
            known = values.known(node.input[3])
            if known is None:
                return None
            axes = [int(a) % rank for a in known]
        if len(axes) != half:
            return None
        return pads, axes

    def rule(self, node, g):
        found = self.amounts(node, g)
        if found is None:
            return None
        pads, axes = found
        half = len(pads) // 2
        for i, axis in enumerate(axes):
            for entry in (pads[i], pads[i + half]):
                if reads_channels(g, entry):
                    return None
        widened = self._channel_pads(node, g)
        if widened is not None:
            return ChannelRule(pads=[(node.input[0], node.output[0], *widened)])
        if any(axis == 1 and not (entry.constant and entry.value == 0)
               for i, axis in enumerate(axes) for entry in (pads[i], pads[i + half])):
            return None
        return _tie(node)

    def _constant_pads(self, node, g) -> np.ndarray | None:
        """The pads as written in the node (every axis' begin, then every end), where they are an
        attribute or a constant input and no ``axes`` input picks the axes."""
        if len(node.input) > 3 and node.input[3]:
            return None
        if len(node.input) > 1 and node.input[1]:
            value = g.input_const(node, 1)
        else:
            value = attr(node, "pads")
        return None if value is None else np.asarray(value, dtype=np.int64).reshape(-1)

    def _channel_pads(self, node, g) -> tuple[int, int] | None:
        """(before, after): the zero channels a constant-mode Pad adds on the channel axis (axis 1),
        where its amounts are constants; None where it pads no channels, pads a value other
        than 0, or crops."""
        pads, rank = self._constant_pads(node, g), len(g.shape(node.input[0]) or ())
        if pads is None or rank < 2 or len(pads) != 2 * rank:
            return None
        before, after = int(pads[1]), int(pads[1 + rank])
        if before < 0 or after < 0 or before + after == 0:
            return None
        mode = attr(node, "mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            return None
        if len(node.input) > 2 and node.input[2]:
            value = g.input_const(node, 2)
            if value is None or np.any(value != 0):
                return None
        elif attr(node, "value", 0.0) != 0.0:
            return None
        return before, after

    def prune_through(self, node, keep, g):
        """A Pad that adds zero channels (a through of the group it writes): ``keep`` counts the
        output's channels, of which those it adds are kept as many as ``keep`` keeps."""
        widened = self._channel_pads(node, g)
        if widened is None:
            return
        before, after = widened
        width = g.channels(node.output[0])
        pads = self._constant_pads(node, g).copy()
        rank = len(pads) // 2
        pads[1], pads[1 + rank] = int((keep < before).sum()), int((keep >= width - after).sum())
        if len(node.input) > 1 and node.input[1]:
            g.set_const(node, 1, pads)
        else:
            set_attr(node, "pads", [int(v) for v in pads])


_FREED = "_onnxprune_batch"  # names of what Resize.free_batch adds for one node


@register("Resize", "Upsample")
class Resize(Handler):
    """Resizing keeps channels when the channel scale is 1 or the channel size is the count itself
    (a constant, rewritten when channels go, or ``x.size(1)`` computed at run time)."""

    def _inputs(self, node) -> tuple[str, str]:
        if node.op_type == "Upsample":
            return (node.input[1] if len(node.input) > 1 else ""), ""
        return tuple(node.input[i] if len(node.input) > i else "" for i in (2, 3))

    def _entries(self, node, g):
        """(scales, sizes) as entry lists (None when absent), or None when untrackable."""
        values = ShapeValues(g)
        found = []
        for name in self._inputs(node):
            elems = values.of(name) if name else None
            if name and (elems is None or elems.ndim != 1):
                return None
            found.append(None if elems is None or elems.size == 0 else list(elems))
        return found

    def rule(self, node, g):
        rank = len(g.shape(node.input[0]) or ())
        entries = self._entries(node, g)
        if entries is None or rank < 2 or attr(node, "axes") is not None:
            return None
        scales, sizes = entries
        ties = [(node.input[0], node.output[0])]
        for kind, found in (("scales", scales), ("sizes", sizes)):
            if found is None:
                continue
            if len(found) != rank or any(reads_channels(g, e) for i, e in enumerate(found) if i != 1):
                return None
            if kind == "scales" and not (found[1].constant and found[1].value == 1):
                return None
            if kind == "sizes":
                ok, extra = channel_entry_rule(g, found[1], node.input[0], node)
                if not ok:
                    return None
                ties += extra
        return None if scales is None and sizes is None else ChannelRule(ties=ties)

    def reads_channel_count(self, node, name, g):
        return name in self._inputs(node) and name != node.input[0] and self.rule(node, g) is not None

    def prune_through(self, node, keep, g):
        _, sizes = self._entries(node, g)
        if sizes is not None:
            rewrite_channel_entry(g, sizes[1], len(keep), node)

    def free_batch(self, node, g):
        """Constant ``sizes`` writing batch 1 first (a folded ``F.interpolate(x, size=...)``) become
        ``Concat(Shape(x)[0:1], rest)``: the channel entry stays a constant pruning can rewrite."""
        sizes = batch_one_constant(node, g, 3) if node.op_type == "Resize" else None
        if sizes is None or attr(node, "axes") is not None:
            return None
        base = node.name + _FREED
        shape = helper.make_node("Shape", [node.input[0]], [f"{base}_shape"], name=f"{base}_shape")
        first = helper.make_node("Gather", [shape.output[0], ""], [f"{base}_first"], name=f"{base}_gather", axis=0)
        joined = helper.make_node("Concat", [first.output[0], ""], [f"{base}_sizes"], name=f"{base}_sizes", axis=0)
        g.set_const(first, 1, np.zeros(1, np.int64))
        g.set_const(joined, 1, sizes[1:])
        node.input[3] = joined.output[0]
        g.shapes.update({shape.output[0]: (len(sizes),), first.output[0]: (1,), joined.output[0]: (len(sizes),)})
        return [shape, first, joined]

    def declare_batch(self, node, g):
        base = node.name + _FREED
        joined = g.producer.get(node.input[3]) if len(node.input) > 3 else None
        rest = g.input_const(joined, 1) if joined is not None and joined.name == f"{base}_sizes" else None
        if rest is None:
            return []
        node.input[3] = ""  # a fresh name, not one derived from what free_batch added
        g.set_const(node, 3, np.concatenate([np.ones(1, rest.dtype), rest]))
        return [f"{base}_shape", f"{base}_gather", f"{base}_sizes"]


CHANNEL_NORMS = ("ReduceL2", "ReduceL1")  # per-channel norms whose channel mean pruning may rescale


def norms_channel_axis(node: onnx.NodeProto, g: GraphView) -> int | None:
    """The axis a ``ReduceMean`` / ``ReduceSum`` ``node`` reduces where it reduces, keeping it, the
    one axis besides the batch that a per-channel norm (``ReduceL2`` / ``ReduceL1`` keeping its
    axes) leaves: a statistic over the channels of one value per channel and image, as ConvNeXt
    V2's global response norm takes the mean of its channels' spatial norms; else None."""
    if node.op_type not in ("ReduceMean", "ReduceSum") or node.domain not in ("", "ai.onnx") or \
            not attr(node, "keepdims", 1) or not node.input or node.output[0] in g.graph_outputs:
        return None
    norm, shape, axes = g.producer.get(node.input[0]), g.shape(node.input[0]), axes_of(g, node)
    if norm is None or norm.op_type not in CHANNEL_NORMS or norm.domain not in ("", "ai.onnx") or \
            not attr(norm, "keepdims", 1) or shape is None or len(shape) < 2 or axes is None or len(axes) != 1:
        return None
    axis = axes[0] % len(shape)
    if axis == 0 or shape[axis] < 2 or any(size != 1 for a, size in enumerate(shape) if a not in (0, axis)):
        return None
    return axis


@register("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceProd")
class Reduce(Handler):
    """A reduction over batch or spatial axes keeps channels (on a lower axis without keepdims); a
    sum over the channels of per-channel norms (:func:`norms_channel_axis`, as
    :func:`onnxprune.fold.fold_channel_means` writes a global response norm's mean) reads them as a
    layer would, without weights: a channel pruned leaves the sum as a zero would, and the pruner
    rescales it (:meth:`rescale`)."""

    any_axis = True

    def channel_statistic(self, node, g):
        return node.op_type == "ReduceSum" and norms_channel_axis(node, g) == g.channel_axis(node.input[0])

    def rescale(self, node, factor, g):
        """Multiply the sum by ``factor`` through the scalar constant that alone reads it (the
        ``Mul`` :func:`~onnxprune.fold.fold_channel_means` writes); False where none does."""
        readers = g.consumers.get(node.output[0], [])
        return len(readers) == 1 and node.output[0] not in g.graph_outputs and \
            handler_for(readers[0]).scale_constant(readers[0], factor, g)

    def prune_input(self, node, keep, block, g):
        pass  # the sum runs over the channels kept

    def _axes(self, node, g) -> set[int] | None:
        shape, axes = g.shape(node.input[0]), axes_of(g, node)
        if shape is None or not axes:
            return None  # reduces every axis (or axes unknown)
        return {a % len(shape) for a in axes}

    def rule(self, node, g):
        if self.channel_statistic(node, g):
            return ChannelRule(consumes=[node.input[0]], scales=[])
        axes = self._axes(node, g)
        if axes is None or g.channel_axis(node.input[0]) in axes:
            return None
        return _tie(node)

    def output_axis(self, node, g, axis):
        axes = self._axes(node, g)
        if axes is not None and axes == {axis} and attr(node, "keepdims", 1):
            return axis  # one value over the channels, where they were (broadcast onto them again)
        if axes is None or axis in axes:
            return None
        return axis if attr(node, "keepdims", 1) else axis - sum(1 for a in axes if a < axis)

    def input_axis(self, node, g, axis):
        axes = self._axes(node, g)
        if axes is None or attr(node, "keepdims", 1):
            return axis
        rank = len(g.shape(node.input[0]))
        kept = [a for a in range(rank) if a not in axes]
        return kept[axis] if axis < len(kept) else None


@register("Flatten")
class Flatten(Handler):
    """``[N, C, H, W] -> [N, C·H·W]``: each channel becomes a block of H·W columns."""

    def rule(self, node, g):
        shape = g.shape(node.input[0])
        if attr(node, "axis", 1) != 1 or shape is None:
            return None
        return ChannelRule(ties=[(node.input[0], node.output[0])],
                           blocks={node.output[0]: int(np.prod(shape[2:]))})
