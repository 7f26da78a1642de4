"""Ops that change a tensor's layout but keep its channels: Reshape, Expand, Squeeze, Unsqueeze,
Transpose.

A ``Reshape`` keeps the channel axis when the output's axis 0 is the input's batch and axis 1 holds
the input's channels, each as ``block`` consecutive entries (``block`` > 1 only for a flatten to
``[N, C·H·W]``, which the following ``Gemm``/``MatMul`` reads like ``Flatten``'s output). Its target
may be a constant or computed at run time (``x.view(x.size(0), -1)``); a constant channel entry is
rewritten when channels go, a run-time one (``-1``, a copy ``0`` or ``x.size(1)``) follows by itself.
"""

from __future__ import annotations

import numpy as np

from ..graphview import attr
from .base import ChannelRule, Handler, batch_one_constant, register
from .shapes import (
    Element,
    ShapeValues,
    axes_of,
    entry_reader,
    is_channel_dim,
    reads_channels,
    set_entry,
)


def channel_entry_rule(g, entry: Element, data: str, node) -> tuple[bool, list[tuple[str, str]]]:
    """Whether a size entry of ``node`` that must equal ``data``'s channel count stays right when
    channels go, and the ties that keep it right: a constant is rewritten; ``t.size(1)`` ties ``t``
    to ``data``."""
    if entry.constant and entry.value == g.channels(data):
        return entry_reader(g, entry, node) is not None, []
    if entry.exact is not None and is_channel_dim(g, entry.exact):
        return True, [] if entry.exact[0] == data else [(entry.exact[0], data)]
    return False, []


def rewrite_channel_entry(g, entry: Element, channels: int, node) -> None:
    """Write a new channel count into a constant entry of ``node`` (run-time entries follow by themselves)."""
    if entry.constant:
        set_entry(g, entry, channels, node)


@register("Reshape")
class Reshape(Handler):
    """Reshape that keeps batch and channel axes (flatten, ``(N, C) ↔ (N, C, 1, 1)``, merging
    spatial axes); anything that moves channels to another axis is a barrier."""

    def _layout(self, node, g) -> tuple[int, list[Element]] | None:
        data, out = node.input[0], node.output[0]
        ins, outs = g.shape(data), g.shape(out)
        if ins is None or outs is None or len(ins) < 2 or len(outs) < 2 or g.is_const(data):
            return None
        target = ShapeValues(g).of(node.input[1])
        if target is None or target.ndim != 1 or len(target) != len(outs):
            return None
        rest = int(np.prod(ins[2:]))
        if outs[0] != ins[0] or outs[1] % ins[1]:
            return None
        block = outs[1] // ins[1]
        if rest % block or int(np.prod(outs[2:])) != rest // block or (block > 1 and len(outs) != 2):
            return None
        return block, list(target)

    def rule(self, node, g):
        layout = self._layout(node, g)
        if layout is None:
            return None
        block, entries = layout
        data, out = node.input[0], node.output[0]
        ties = [(data, out)]
        copies = not attr(node, "allowzero", 0)
        for i, e in enumerate(entries):
            if i != 1:
                if reads_channels(g, e):
                    return None
                continue
            if e.constant and (e.value == -1 or (e.value == 0 and copies and block == 1)):
                continue
            if e.constant:
                if entry_reader(g, e, node) is None or e.value != g.channels(data) * block:
                    return None
                continue
            ok, extra = channel_entry_rule(g, e, data, node) if block == 1 else (False, [])
            if not ok:
                return None
            ties += extra
        return ChannelRule(ties=ties, blocks={out: block} if block > 1 else {})

    def reads_channel_count(self, node, name, g):
        return name == node.input[1] and name != node.input[0] and self.rule(node, g) is not None

    def prune_through(self, node, keep, g):
        block, entries = self._layout(node, g)
        entry = entries[1]
        if entry.constant and entry.value not in (-1, 0):
            rewrite_channel_entry(g, entry, len(keep) * block, node)

    def free_batch(self, node, g):
        """A constant target writing batch 1 first (the dynamo exporter's folded ``[1, -1]``, a
        channel shuffle's ``[1, 2, 24, 20, 20]``) copies the dim instead: ONNX's 0, or -1 where
        ``allowzero`` makes 0 a size and no other entry is -1 or 0."""
        target = batch_one_constant(node, g, 1)
        if target is None:
            return None
        if not attr(node, "allowzero", 0):
            first = 0
        elif not (target[1:] == -1).any() and not (target[1:] == 0).any():
            first = -1
        else:
            return None
        g.set_const(node, 1, np.concatenate([np.array([first], target.dtype), target[1:]]))
        return []

    def declare_batch(self, node, g):
        target = g.input_const(node, 1)
        if target is not None and target.ndim == 1 and len(target) and target[0] in (0, -1):
            g.set_const(node, 1, np.concatenate([np.ones(1, target.dtype), target[1:]]))
        return []


@register("Expand")
class Expand(Handler):
    """Broadcast over batch or spatial axes; the target's channel entry is 1, the count itself
    (rewritten), or ``t.size(1)`` (ties ``t``)."""

    def _entries(self, node, g) -> tuple[int, list[Element]] | None:
        data, out = node.input[0], node.output[0]
        ds, os_ = g.shape(data), g.shape(out)
        if ds is None or os_ is None or len(os_) < 2 or len(ds) != len(os_) or ds[1] != os_[1] or g.is_const(data):
            return None
        shape = ShapeValues(g).of(node.input[1])
        if shape is None or shape.ndim != 1:
            return None
        return len(shape) - (len(os_) - 1), list(shape)

    def rule(self, node, g):
        found = self._entries(node, g)
        if found is None:
            return None
        pos, entries = found
        ties = [(node.input[0], node.output[0])]
        for i, e in enumerate(entries):
            if i != pos:
                if reads_channels(g, e):
                    return None
            elif not (e.constant and e.value == 1):
                ok, extra = channel_entry_rule(g, e, node.input[0], node)
                if not ok:
                    return None
                ties += extra
        return ChannelRule(ties=ties)

    def reads_channel_count(self, node, name, g):
        return name == node.input[1] and name != node.input[0] and self.rule(node, g) is not None

    def prune_through(self, node, keep, g):
        pos, entries = self._entries(node, g)
        if entries[pos].constant and entries[pos].value != 1:
            rewrite_channel_entry(g, entries[pos], len(keep), node)


@register("Squeeze", "Unsqueeze")
class SqueezeUnsqueeze(Handler):
    """Removing or adding size-1 axes after the channel axis keeps channels on axis 1."""

    def rule(self, node, g):
        ins, outs = g.shape(node.input[0]), g.shape(node.output[0])
        if ins is None or outs is None or len(ins) < 2 or len(outs) < 2 or g.is_const(node.input[0]):
            return None
        if ins[:2] != outs[:2]:
            return None
        axes = axes_of(g, node)
        if axes is None:
            return None
        rank = len(outs) if node.op_type == "Unsqueeze" else len(ins)
        if any(a % rank < 2 for a in axes):
            return None
        return ChannelRule(ties=[(node.input[0], node.output[0])])


@register("Transpose")
class Transpose(Handler):
    """Moves the channel axis (channels-last graphs: tf2onnx wraps each Conv in two Transposes)."""

    any_axis = True

    def _perm(self, node, g) -> list[int] | None:
        shape = g.shape(node.input[0])
        if shape is None:
            return None
        return list(attr(node, "perm", list(range(len(shape)))[::-1]))

    def rule(self, node, g):
        if self._perm(node, g) is None or g.is_const(node.input[0]):
            return None
        return ChannelRule(ties=[(node.input[0], node.output[0])])

    def output_axis(self, node, g, axis):
        perm = self._perm(node, g)
        return None if perm is None or axis not in perm else perm.index(axis)

    def input_axis(self, node, g, axis):
        perm = self._perm(node, g)
        return None if perm is None or axis >= len(perm) else perm[axis]
