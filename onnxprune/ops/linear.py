"""Gemm and MatMul with a constant weight: fully-connected layers on ``[N, K]`` inputs, and
``MatMul`` on channels-last ``[N, …, K]`` inputs (a ``Linear`` applied at every position: the
MLP of ConvNeXt-style blocks, pointwise layers of channels-last exports)."""

from __future__ import annotations

import numpy as np

from ..graphview import attr, set_attr
from ..select import expand_channels
from .base import ChannelRule, LinearHandler, batch_first, register


class _FullyConnected(LinearHandler):
    """Shared logic: weight stored ``[K, N]`` (or ``[N, K]`` when transposed)."""

    def _transposed(self, node) -> bool:
        return False

    def _activation_ok(self, node, g) -> bool:
        shape = g.shape(node.input[0])
        return shape is None or (len(shape) == 2 and batch_first(g, shape))

    def rule(self, node, g):
        if g.input_const(node, 1) is None or g.is_const(node.input[0]) or not self._activation_ok(node, g):
            return None
        return ChannelRule(produces=[node.output[0]], consumes=[node.input[0]])

    def _w_kn(self, node, g) -> np.ndarray:
        w = g.input_const(node, 1)
        return w.T if self._transposed(node) else w

    def _store_kn(self, node, w_kn, g) -> None:
        g.set_const(node, 1, w_kn.T if self._transposed(node) else w_kn)

    def prune_output(self, node, keep, g):
        self._store_kn(node, self._w_kn(node, g)[:, keep], g)

    def prune_input(self, node, keep, block, g):
        self._store_kn(node, self._w_kn(node, g)[expand_channels(keep, block)], g)

    def macs(self, node, g):
        w, shape = g.input_const(node, 1), g.shape(node.input[0])
        if w is None:
            return 0
        # one sample's rows: every position of a batch-first input, every row of another
        rows = self.positions(node, g) if batch_first(g, shape) else int(np.prod(shape[:-1]))
        return int(np.prod(w.shape)) * rows

    def reconstructable(self, node, g):
        shape = g.shape(node.input[0])
        return shape is not None and batch_first(g, shape)

    def weight_matrix(self, node, g):
        return self._w_kn(node, g).T.astype(np.float64)

    def input_channels(self, node, g):
        return int(self._w_kn(node, g).shape[-2])

    def positions(self, node, g):
        return 1

    def sample_patches(self, node, g, x, pos):
        return x.reshape(x.shape[0], -1)


@register("MatMul")
class MatMul(_FullyConnected):
    """``[N, …, K] @ W[K, M]``: channels on the last axis in and out (axis 1 for 2-D inputs);
    it has no bias of its own (a following Add holds it)."""

    has_bias = False

    def _activation_ok(self, node, g):
        w, shape = g.input_const(node, 1), g.shape(node.input[0])
        return w is not None and w.ndim == 2 and batch_first(g, shape)

    def layer_axis(self, node, g):
        shape = g.shape(node.input[0])
        return len(shape) - 1 if shape is not None and len(shape) > 2 else 1

    def positions(self, node, g):
        shape = g.shape(node.input[0])
        return int(np.prod(shape[1:-1])) if shape is not None and len(shape) > 2 else 1

    def sample_patches(self, node, g, x, pos):
        if x.ndim == 2:
            return x
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        return np.take_along_axis(flat, pos[:, :, None], axis=1).reshape(-1, x.shape[-1])

    def sample_outputs(self, node, g, y, pos):
        return self.sample_patches(node, g, y, pos)

    def bias(self, node, g):
        return None

    def set_linear(self, node, weight, bias, g):
        self._store_kn(node, weight.T.astype(g.input_const(node, 1).dtype), g)


@register("Gemm")
class Gemm(_FullyConnected):
    """``alpha · A @ B + beta · C``, with ``transB`` honoured (``transA`` makes it a barrier)."""

    def _transposed(self, node) -> bool:
        return bool(attr(node, "transB", 0))

    def rule(self, node, g):
        return None if attr(node, "transA", 0) else super().rule(node, g)

    def _bias_vector(self, node, g) -> np.ndarray | None:
        c = g.input_const(node, 2)
        if c is None:
            return None
        n = self._w_kn(node, g).shape[1]
        return np.broadcast_to(c.reshape(-1) if c.size > 1 else c.reshape(1), (n,)).copy()

    def prune_output(self, node, keep, g):
        super().prune_output(node, keep, g)
        c = g.input_const(node, 2)
        if c is not None and c.size > 1:
            g.set_const(node, 2, c.reshape(-1)[keep].reshape((1, -1) if c.ndim == 2 else (-1,)))

    def weight_matrix(self, node, g):
        w = super().weight_matrix(node, g)
        alpha = float(attr(node, "alpha", 1.0))
        if alpha != 1.0:  # in place: VGG-16's first classifier layer is 0.8 GB in float64
            w *= alpha
        return w

    def bias(self, node, g):
        c = self._bias_vector(node, g)
        return None if c is None else c.astype(np.float64) * float(attr(node, "beta", 1.0))

    def set_linear(self, node, weight, bias, g):
        dtype = g.input_const(node, 1).dtype
        self._store_kn(node, weight.T.astype(dtype), g)
        set_attr(node, "alpha", 1.0)
        if bias is not None:
            g.set_const(node, 2, bias.astype(dtype))
            set_attr(node, "beta", 1.0)
