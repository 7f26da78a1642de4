"""Channel-wise ops: activations, normalisation, and binary ops with a constant or a twin branch."""

from __future__ import annotations

import numpy as np

from ..graphview import attr, set_attr
from .base import FOLDED_DOMAIN, Activation, ChannelRule, Handler, handler_for, register, whole_runs


@register("Tanh", "Elu", "Selu",
          "Celu", "Softplus", "Softsign", "Mish", "Gelu", "Dropout", "Identity", "Cast", "Neg",
          "Abs", "Sqrt", "Exp", "Log", "Erf", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
          "ThresholdedRelu", "Shrink", "Sin", "Cos")
class Unary(Handler):
    """One activation in, the same channels out; extra inputs (Clip bounds, …) are scalars."""

    any_axis = True

    def rule(self, node, g):
        if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
            return None  # the mask output would need slicing too
        return ChannelRule(ties=[(node.input[0], node.output[0])])


@register("Relu", "LeakyRelu")
class Rectifier(Unary):
    """ReLU and leaky ReLU: piecewise linear, so gradients pass through them exactly."""

    def activation(self, node, g) -> Activation:
        if node.op_type == "Relu":
            return (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(z.dtype))
        alpha = float(attr(node, "alpha", 0.01))
        return (lambda z: np.where(z > 0, z, alpha * z), lambda z: np.where(z > 0, 1.0, alpha).astype(z.dtype))


@register("Sigmoid", "HardSigmoid", "HardSwish")
class Smooth(Unary):
    """Sigmoid, hard sigmoid and hard swish: the gates and activations of mobile networks."""

    def activation(self, node, g) -> Activation:
        if node.op_type == "Sigmoid":
            def sigmoid(z):  # in place on one fresh array: this runs on every refinement step
                t = np.clip(z, -60, 60)
                np.negative(t, out=t)
                np.exp(t, out=t)
                t += 1.0
                return np.reciprocal(t, out=t)

            def sigmoid_slope(z):  # the sigmoid once, not twice: this runs on every refinement step
                s = sigmoid(z)
                return s * (1 - s)
            return (sigmoid, sigmoid_slope)
        # HardSwish is z · hard_sigmoid(z) with alpha 1/6, beta 1/2
        alpha = np.float32(attr(node, "alpha", 0.2) if node.op_type == "HardSigmoid" else 1 / 6)
        beta = np.float32(attr(node, "beta", 0.5) if node.op_type == "HardSigmoid" else 0.5)

        def hard(z):  # in place on fresh arrays, float32 throughout: these run on every refinement step
            t = z * alpha
            t += beta
            return np.clip(t, 0, 1, out=t)

        def slope(z):
            t = z * alpha
            t += beta
            return ((t > 0) & (t < 1)) * alpha
        if node.op_type == "HardSigmoid":
            return (hard, slope)
        return _self_gated(hard, slope)


@register("Clip")
class ClipHandler(Unary):
    """Clip: min and max must be scalars (they are, in every exporter seen)."""

    def rule(self, node, g):
        return super().rule(node, g) if self._bounds(node, g) is not None else None

    def _bounds(self, node, g) -> tuple[float, float] | None:
        """(min, max), infinite where absent (attributes before opset 11, inputs after); None
        where a bound is not a constant scalar."""
        bounds = [attr(node, "min", -np.inf), attr(node, "max", np.inf)]
        for i in (1, 2):
            if i < len(node.input) and node.input[i]:
                value = g.input_const(node, i)
                if value is None or value.size != 1:
                    return None
                bounds[i - 1] = float(value)
        return float(bounds[0]), float(bounds[1])

    def activation(self, node, g) -> Activation | None:
        bounds = self._bounds(node, g)
        if bounds is None:
            return None
        lo, hi = bounds
        return (lambda z: np.clip(z, lo, hi), lambda z: ((z > lo) & (z < hi)).astype(z.dtype))


def _self_gated(f, df) -> Activation:
    """``z · f(z)`` and its derivative ``f(z) + z · f'(z)`` (swish, hard swish), formed in place
    in the fresh arrays ``f`` and ``df`` return."""

    def value(z):
        out = f(z)
        out *= z
        return out

    def slope(z):
        out = df(z)
        out *= z
        out += f(z)
        return out
    return value, slope


def _channel_axis_of_const(const_shape: tuple[int, ...], out_rank: int, axis: int) -> int | None:
    """Axis of a broadcast constant that lines up with the output's channel ``axis``, if it varies."""
    aligned = len(const_shape) - (out_rank - axis)
    if 0 <= aligned < len(const_shape) and const_shape[aligned] > 1:
        return aligned
    return None


def _slice_channel_const(node, index: int, keep: np.ndarray, g) -> None:
    value = g.input_const(node, index)
    rank = len(g.shape(node.output[0]) or ()) or 4
    if value is None:
        return
    aligned = _channel_axis_of_const(value.shape, rank, g.channel_axis(node.output[0]))
    if aligned is not None:
        g.set_const(node, index, np.take(value, keep, axis=aligned))


@register("Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow")
class Binary(Handler):
    """Element-wise n-ary op.

    Activation inputs with the output's channel count are tied to the output (two branches
    joined by Add are coupled); constants are sliced along the axis that lines up with the
    channels; an activation broadcast over channels (size 1 there) is left out of the tie.
    """

    any_axis = True

    def rule(self, node, g):
        out_shape, axis = g.shape(node.output[0]), g.channel_axis(node.output[0])
        if out_shape is None or len(out_shape) < 2 or axis >= len(out_shape):
            return None
        ties = []
        for i, name in enumerate(node.input):
            if not name:
                continue
            shape = g.shape(name)
            if shape is None:
                return None
            if g.is_const(name):
                aligned = _channel_axis_of_const(shape, len(out_shape), axis)
                if aligned is not None and shape[aligned] != out_shape[axis]:
                    return None
                continue
            if len(shape) != len(out_shape) or g.channel_axis(name) != axis:
                return None
            if shape[axis] == out_shape[axis]:
                ties.append((name, node.output[0]))
            elif shape[axis] != 1:
                return None
        if not ties:
            return None
        return ChannelRule(ties=ties)

    @property
    def joins_branches(self) -> bool:
        return self.op_type in ("Add", "Sum", "Sub", "Mean", "Max", "Min")

    @property
    def sums_branches(self) -> bool:
        return self.op_type in ("Add", "Sum")

    def prune_through(self, node, keep, g):
        for i, name in enumerate(node.input):
            if name and g.is_const(name):
                _slice_channel_const(node, i, keep, g)

    def scale_constant(self, node, factor, g):
        if self.op_type not in ("Mul", "Div") or len(node.input) != 2:
            return False
        index = next((i for i, name in enumerate(node.input) if g.is_const(name) and g.const(name).size == 1), None)
        if index is None or (self.op_type == "Div" and index == 0):
            return False
        value = g.const(node.input[index])
        g.set_const(node, index, value * factor if self.op_type == "Mul" else value / factor)
        return True

    def activation_input(self, node, g) -> str:
        """The tensor :meth:`activation` is a function of: the non-constant operand of an affine
        op, ``z`` of a self-gating ``Mul``."""
        affine = self._affine(node, g)
        if affine:
            return affine[0]
        gated = self._self_gated(node, g)
        return gated[0] if gated else node.input[0]

    def activation(self, node, g) -> Activation | None:
        affine = self._affine(node, g)
        if affine:
            _, scale, shift = affine
            return (lambda z: z * scale + shift, lambda z: np.full_like(z, scale))
        gated = self._self_gated(node, g)
        return _self_gated(*gated[1]) if gated else None

    def _affine(self, node, g):
        """``(z, a, b)`` where this op is ``a · z + b`` with scalar constants (hard swish as
        Paddle writes it: ``z · relu6(z + 3) / 6``)."""
        if self.op_type not in ("Add", "Sub", "Mul", "Div") or len(node.input) != 2:
            return None
        consts = [g.const(i) if g.is_const(i) else None for i in node.input]
        if sum(c is not None for c in consts) != 1:
            return None
        k = 1 - [c is not None for c in consts].index(True)  # the activation's operand
        c = consts[1 - k]
        if c.size != 1:
            return None
        c = np.float32(c.reshape(()))
        if self.op_type == "Add":
            return node.input[k], np.float32(1), c
        if self.op_type == "Sub":
            return (node.input[k], np.float32(1), -c) if k == 0 else (node.input[k], np.float32(-1), c)
        if self.op_type == "Mul":
            return node.input[k], c, np.float32(0)
        return (node.input[k], np.float32(1) / c, np.float32(0)) if k == 0 and c != 0 else None

    def _self_gated(self, node, g):
        """``(z, (f, f'))`` where this Mul multiplies ``z`` by ``f(z)``, ``f`` a chain of
        elementwise activations of ``z`` alone (read by nothing else)."""
        if self.op_type != "Mul" or len(node.input) != 2:
            return None
        for z, other in (node.input, node.input[::-1]):
            if z == other or len(g.consumers.get(other, [])) != 1 or other in g.graph_outputs:
                continue
            chain = activation_chain(g, other, z)
            if chain is not None:
                return z, chain[0]
        return None


def compose(outer: Activation, inner: Activation) -> Activation:
    """``outer(inner(z))`` and its derivative."""
    return (lambda z: outer[0](inner[0](z)), lambda z: outer[1](inner[0](z)) * inner[1](z))


def activation_chain(g, tensor: str, source: str | None = None) -> tuple[Activation, str, list] | None:
    """The elementwise activations that make ``tensor`` from another tensor, walked back while
    each is an activation whose output only the next one reads: ``(composed activation, its
    input, its nodes)``; with ``source``, only a chain that starts at ``source``. None where no
    activation makes ``tensor`` (or the chain does not reach ``source``)."""
    act, nodes, t = None, [], tensor
    while True:
        node = g.producer.get(t)
        step = handler_for(node).activation(node, g) if node is not None else None
        if step is None or (nodes and (len(g.consumers.get(t, [])) != 1 or t in g.graph_outputs)):
            break
        act = step if act is None else compose(act, step)
        nodes.append(node)
        t = handler_for(node).activation_input(node, g)
        if t == source:
            break
    if act is None or (source is not None and t != source):
        return None
    return act, t, nodes


@register("PRelu")
class PRelu(Binary):
    """PRelu: the slope is a constant broadcast like a binary op's."""

    joins_branches = False
    sums_branches = False


@register("BatchNormalization")
class BatchNorm(Handler):
    """Channel-wise; scale, B, mean and var are sliced with the channels that pass through."""

    def rule(self, node, g):
        if len([o for o in node.output if o]) > 1 or attr(node, "training_mode", 0):
            return None
        if any(g.input_const(node, i) is None for i in range(1, 5)):
            return None
        return ChannelRule(ties=[(node.input[0], node.output[0])])

    def channel_scales(self, node, g):
        return g.input_const(node, 1)

    def prune_through(self, node, keep, g):
        for i in range(1, 5):
            g.set_const(node, i, g.input_const(node, i)[keep])


@register("InstanceNormalization")
class InstanceNorm(Handler):
    """Channel-wise normalisation; scale and B are sliced."""

    def rule(self, node, g):
        if g.input_const(node, 1) is None or g.input_const(node, 2) is None:
            return None
        return ChannelRule(ties=[(node.input[0], node.output[0])])

    def prune_through(self, node, keep, g):
        for i in (1, 2):
            g.set_const(node, i, g.input_const(node, i)[keep])


@register("GroupNormalization")
class GroupNorm(Handler):
    """Normalisation over runs of consecutive channels, each run (group) by its own statistics:
    whole groups can go and the others normalise as before. ONNX's op (``num_groups``; scale and
    bias per group at opset 18, per channel from 21) and the same spelled out by an exporter,
    which onnxprune folds into one node of its own domain (inputs ``X, scale, bias, target``:
    scale and bias per group, the ``Reshape`` target ``[0, G, -1]``; fold.fold_group_norms). One
    group over every channel (a LayerNorm of the map) is a barrier."""

    def groups(self, node, g) -> int | None:
        """How many groups the node normalises now; None where its parameters are not constants."""
        scale, bias = g.input_const(node, 1), g.input_const(node, 2)
        if scale is None or bias is None or scale.size != bias.size:
            return None
        if node.domain == FOLDED_DOMAIN:
            target = g.input_const(node, 3)
            return int(scale.size) if target is not None and target.shape == (3,) and target[1] == scale.size else None
        return int(attr(node, "num_groups", 0)) or None

    def rule(self, node, g):
        groups, channels = self.groups(node, g), g.channels(node.input[0])
        if groups is None or channels is None or groups < 2 or channels % groups or \
                g.input_const(node, 1).size not in (groups, channels):
            return None
        return ChannelRule(ties=[(node.input[0], node.output[0])], whole_groups={node.output[0]: channels // groups})

    def prune_through(self, node, keep, g):
        groups = self.groups(node, g)
        kept = whole_runs(keep, g.channels(node.input[0]) // groups, "a group normalisation")
        per_group = g.input_const(node, 1).size == groups
        for i in (1, 2):
            g.set_const(node, i, g.input_const(node, i)[kept if per_group else keep])
        if node.domain == FOLDED_DOMAIN:
            target = g.input_const(node, 3).copy()
            target[1] = len(kept)
            g.set_const(node, 3, target)
        else:
            set_attr(node, "num_groups", len(kept))


@register("LayerNormalization", "LRN")
class ChannelNorm(Handler):
    """Normalisation over the channels (LayerNorm of channels-last blocks, the local
    response normalisation of AlexNet-era nets over neighbouring channels): a barrier
    to the channels it normalises, whose axis it keeps (so a channels-last ``MatMul`` after it
    still knows where its channels are)."""

    any_axis = True
    always_barrier = "normalises over the channels: removing some would change the statistics of the rest"
