"""Shape, and the integer arithmetic on it that only reads channel counts (folded to constants).

Exporters spell ``torch.chunk(x, 2, 1)`` as ``Shape → Gather(1) → Add → Div → Mul → Slice``: the
slice bounds are computed from the channel count. Channel counts are static (set by weights), so
such a bound is folded to a constant, and the Slice (or Split) reading it writes constants when
its channels are pruned. Only the channel dim is ever folded: dynamic batch and spatial dims stay
dynamic, and an expression reading them is not folded (its Slice stays a barrier).
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graphview import GraphView, attr
from .base import ChannelRule, Handler, handler_for, register

_ARITH = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}
_INT_OPS = ("Gather", "Add", "Sub", "Mul", "Div", "Cast", "Identity", "Unsqueeze", "Squeeze", "Concat")
_MAX_DEPTH = 32


def fold_channel_ints(g: GraphView, name: str, depth: int = 0) -> np.ndarray | None:
    """The value of an integer tensor computed from constants and channel counts, or None."""
    if not name or depth > _MAX_DEPTH:
        return None
    if g.is_const(name):
        return np.asarray(g.const(name))
    node = g.producer.get(name)
    if node is None or node.op_type not in _INT_OPS:
        return None
    if node.op_type == "Gather":
        return _gather(g, node, depth)
    args = [fold_channel_ints(g, i, depth + 1) for i in node.input if i]
    if any(a is None for a in args):
        return None
    return _apply(node, args)


def _apply(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray | None:
    op = node.op_type
    if op in _ARITH:
        return _ARITH[op](args[0], args[1])
    if op == "Div":
        a, b = args
        if a.dtype.kind not in "iu" or b.dtype.kind not in "iu":
            return a / b
        return a // b if (a >= 0).all() and (b > 0).all() else None  # ONNX truncates; agree on ≥ 0
    if op == "Cast":
        return args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attr(node, "to")))
    if op == "Identity":
        return args[0]
    if op == "Concat":
        return np.concatenate([np.atleast_1d(a) for a in args], axis=attr(node, "axis", 0))
    axes = attr(node, "axes", args[1] if len(args) > 1 else None)
    if op == "Unsqueeze":
        return None if axes is None else np.expand_dims(args[0], tuple(int(a) for a in np.atleast_1d(axes)))
    return np.squeeze(args[0], axis=None if axes is None else tuple(int(a) for a in np.atleast_1d(axes)))


def _gather(g: GraphView, node: onnx.NodeProto, depth: int) -> np.ndarray | None:
    """Gather from a constant, or from ``Shape(x)`` where only ``x``'s channel dim is taken."""
    idx = fold_channel_ints(g, node.input[1], depth + 1)
    if idx is None or attr(node, "axis", 0) != 0:
        return None
    source = g.producer.get(node.input[0])
    if source is None or source.op_type != "Shape":
        data = fold_channel_ints(g, node.input[0], depth + 1)
        return None if data is None else np.take(data, idx, axis=0)
    shape = g.shape(source.input[0])
    if shape is None:
        return None
    dims = np.arange(len(shape))[attr(source, "start", 0):attr(source, "end", len(shape))]
    if idx.size == 0 or (idx >= len(dims)).any() or (idx < -len(dims)).any():
        return None
    if (dims[idx] != 1).any():
        return None  # a batch or spatial dim: dynamic, never folded
    return np.full(idx.shape, shape[1], dtype=np.int64)


def folded_uses_only(g: GraphView, name: str, depth: int = 0) -> bool:
    """Whether every use of ``name`` ends in bounds that a Slice or Split folds to constants."""
    if name in g.graph_outputs or depth > _MAX_DEPTH:
        return False
    for user in g.consumers.get(name, []):
        if user.op_type in _INT_OPS and not (user.op_type == "Gather" and user.input[0] != name):
            if not all(folded_uses_only(g, o, depth + 1) for o in user.output if o):
                return False
        elif not handler_for(user).folds_bound(user, name, g):
            return False
    return True


@register("Shape")
class Shape(Handler):
    """Reads a tensor's size only: not a barrier when every use of it is folded into the channel
    bounds of a Slice or the sizes of a Split (which are rewritten as constants when pruned)."""

    def rule(self, node, g):
        if not folded_uses_only(g, node.output[0]):
            return None
        return ChannelRule(shape_only=[node.input[0]])
