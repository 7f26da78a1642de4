"""Shape values tracked element by element: which dims of which tensors each entry is made of.

Exporters compute shapes at run time: ``torch.chunk(x, 2, 1)`` becomes ``Shape → Gather(1) → Div →
Slice`` bounds, TF-style "same" padding becomes ``Shape → Gather(2) → … → Concat → Pad``, and
``x.view(x.size(0), -1)`` becomes ``Shape → Gather(0) → Unsqueeze → Concat → Reshape``. Each entry of
such a small integer tensor is an :class:`Element`: its static value (when known), the tensor dims it
is computed from, and whether it *is* one dim or one entry of an initializer.

A ``Shape`` is a barrier only when its *channel* entry reaches a node that cannot take a changed
channel count (:meth:`Handler.reads_channel_count`). Channel counts are static (set by weights) and
may be folded into constants (Slice bounds, Split sizes); dynamic batch and spatial dims are never
folded — an expression reading them stays an expression.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import onnx

from ..graphview import GraphView, attr
from .base import ChannelRule, Handler, handler_for, register

Dim = tuple[str, int]  # (tensor, axis)

_MAX_ELEMENTS = 256  # larger tensors are data, not shapes
_MAX_TRACKED = 4000  # tensors one ShapeValues evaluates at most (a bound on pathological graphs)


@dataclass(frozen=True)
class Element:
    """One entry of a shape-like tensor.

    value: its value at the analysed shapes (None when unknown).
    dims: the tensor dims it is computed from (none for a constant).
    exact: the dim it equals, when it is a plain copy of one.
    origin: ``(initializer, flat index)`` when it is a plain copy of an initializer's entry.
    """

    value: int | float | bool | None
    dims: frozenset[Dim] = frozenset()
    exact: Dim | None = None
    origin: tuple[str, int] | None = None

    @property
    def constant(self) -> bool:
        return not self.dims and self.value is not None


def _array(items: list[Element], shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


def _derived(value, *parts: Element) -> Element:
    return Element(value, frozenset().union(*(p.dims for p in parts)))


def _int_div(a, b):
    if isinstance(a, int) and isinstance(b, int):
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q  # ONNX integer Div truncates toward zero
    return a / b


_BINARY = {
    "Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": _int_div, "Pow": operator.pow,
    "Equal": operator.eq, "Less": operator.lt, "Greater": operator.gt, "LessOrEqual": operator.le,
    "GreaterOrEqual": operator.ge, "And": operator.and_, "Or": operator.or_,
}
_VARIADIC = {"Max": max, "Min": min, "Sum": lambda *a: sum(a)}
_UNARY = {"Neg": operator.neg, "Abs": abs, "Not": operator.not_, "Ceil": lambda v: float(math.ceil(v)),
          "Floor": lambda v: float(math.floor(v)), "Sqrt": math.sqrt, "Reciprocal": lambda v: 1 / v}
_MOVES = ("Identity", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Expand")
TRACKED = frozenset(["Shape", "Size", "Cast", "Where", "Mod", "Clip", "ConstantOfShape", "Range", "ReduceProd",
                     "ReduceSum", "ReduceMax", "ReduceMin", *_MOVES, *_BINARY, *_VARIADIC, *_UNARY])


def _apply(fn, elements: list[Element]) -> Element:
    values = [e.value for e in elements]
    value = None
    if all(v is not None for v in values):
        try:
            value = fn(*values)
        except (ArithmeticError, ValueError, TypeError):
            value = None
    return _derived(value, *elements)


# Ops that only move a tensor's entries, given their parameters: :func:`move`.
MOVE_OPS = ("Identity", "Gather", "Transpose", "Squeeze", "Unsqueeze", "Reshape")


def move(node: onnx.NodeProto, data: np.ndarray, param) -> np.ndarray:
    """What one of :data:`MOVE_OPS` makes of ``data`` (shape entries, or a map's element indices),
    ``param`` its parameter input or attribute: ``Gather`` indices, a ``Reshape`` target, ``Squeeze``
    / ``Unsqueeze`` axes (None: a ``Squeeze`` of every unit axis)."""
    op = node.op_type
    if op == "Identity":
        return data
    if op == "Gather":
        return np.take(data, np.asarray(param).astype(np.int64), axis=attr(node, "axis", 0))
    if op == "Transpose":
        return np.transpose(data, attr(node, "perm"))
    if op == "Squeeze":
        return np.squeeze(data, axis=None if param is None else tuple(int(a) for a in param))
    if op == "Unsqueeze":
        out, rank = data, data.ndim + len(param)
        for a in sorted(int(a) % rank for a in param):
            out = np.expand_dims(out, a)
        return out
    target = [int(t) for t in param]
    if not attr(node, "allowzero", 0):
        target = [data.shape[i] if t == 0 else t for i, t in enumerate(target)]
    return data.reshape(target)


class ShapeValues:
    """Element-wise values of the small integer tensors of one graph (memoised per instance)."""

    def __init__(self, g: GraphView):
        self.g = g
        self._memo: dict[str, np.ndarray | None] = {}

    def of(self, name: str) -> np.ndarray | None:
        """An object array of :class:`Element` for ``name``, or None when it cannot be tracked."""
        if not name:
            return None
        if name not in self._memo:
            self._memo[name] = None  # a cycle reads as unknown
            if len(self._memo) > _MAX_TRACKED:
                return None
            try:
                result = self._evaluate(name)
                if isinstance(result, Element):  # NumPy hands back a lone entry for a scalar result
                    result = _array([result], ())
                self._memo[name] = result
            except (ValueError, IndexError, TypeError, KeyError, ArithmeticError):
                self._memo[name] = None
        return self._memo[name]

    def known(self, name: str) -> np.ndarray | None:
        """The values of ``name`` when they are constants (no dim at all), else None."""
        elems = self.of(name)
        if elems is None or not all(e.constant for e in elems.flat):
            return None
        return _values(elems)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, name: str) -> np.ndarray | None:
        g = self.g
        if g.is_const(name):
            arr = g.const(name)
            if arr.size > _MAX_ELEMENTS:
                return None
            return _array([Element(v.item(), origin=(name, i)) for i, v in enumerate(arr.reshape(-1))], arr.shape)
        node = g.producer.get(name)
        if node is None or node.op_type not in TRACKED or node.domain not in ("", "ai.onnx"):
            return None
        known_shape = g.shape(name)
        if known_shape is not None and (len(known_shape) > 2 or int(np.prod(known_shape)) > _MAX_ELEMENTS):
            return None  # an activation, not a shape
        op = node.op_type
        if op == "Shape":
            return self._shape(node)
        if op == "Size":
            shape = g.shape(node.input[0])
            if shape is None:
                return None
            dims = frozenset((node.input[0], a) for a in range(len(shape)))
            return _array([Element(int(np.prod(shape)), dims)], ())
        if op == "ConstantOfShape":
            shape = self.known(node.input[0])
            if shape is None or int(np.prod(shape)) > _MAX_ELEMENTS:
                return None
            fill = attr(node, "value")
            value = numpy_value(fill) if fill is not None else 0.0
            return _array([Element(value)] * int(np.prod(shape)), tuple(int(s) for s in shape))
        if op == "Range":
            args = [self.known(i) for i in node.input[:3]]
            if any(a is None for a in args):
                return None
            values = np.arange(args[0].item(), args[1].item(), args[2].item())
            return None if values.size > _MAX_ELEMENTS else _array([Element(v.item()) for v in values], values.shape)
        args = [self.of(i) if i else None for i in node.input]
        if op in _BINARY or op in _VARIADIC or op == "Mod":
            if any(a is None for a in args):
                return None
            fn = _VARIADIC.get(op) or _BINARY.get(op) or _mod(attr(node, "fmod", 0))
            return np.asarray(np.frompyfunc(lambda *e: _apply(fn, list(e)), len(args), 1)(*args), dtype=object)
        if op in _UNARY:
            return None if args[0] is None else _map(args[0], lambda e: _apply(_UNARY[op], [e]))
        if op == "Cast":
            return None if args[0] is None else _map(args[0], lambda e: _cast(e, attr(node, "to")))
        if op == "Clip":
            return self._clip(node, args)
        if op == "Where":
            if any(a is None for a in args[:3]):
                return None

            def pick(c: Element, a: Element, b: Element) -> Element:
                chosen = a if c.value else b
                if c.value is None:
                    return _derived(None, c, a, b)
                return chosen if c.constant else _derived(chosen.value, c, chosen)

            return np.asarray(np.frompyfunc(pick, 3, 1)(*args[:3]), dtype=object)
        if op.startswith("Reduce"):
            return self._reduce(node, args)
        return self._move(node, args)

    def _clip(self, node: onnx.NodeProto, args: list) -> np.ndarray | None:
        bounds = []
        for i, name in ((1, "min"), (2, "max")):
            if len(node.input) > i and node.input[i]:
                if args[i] is None or args[i].size != 1:
                    return None
                bounds.append(args[i].reshape(-1)[0])
            else:
                value = attr(node, name)
                bounds.append(None if value is None else Element(value))
        if args[0] is None:
            return None
        low, high = bounds

        def clip(e: Element) -> Element:
            parts = [e] + [b for b in bounds if b is not None]
            return _apply(lambda v, *_: min(max(v, low.value) if low else v, high.value) if high else
                          (max(v, low.value) if low else v), parts)

        return _map(args[0], clip)

    def _shape(self, node: onnx.NodeProto) -> np.ndarray | None:
        x = node.input[0]
        tracked = self.of(x)
        if tracked is not None:  # a shape-like tensor's own size is fixed: constants
            axes = list(range(tracked.ndim))[attr(node, "start", 0):attr(node, "end", tracked.ndim)]
            return _array([Element(int(tracked.shape[a])) for a in axes], (len(axes),))
        shape = self.g.shape(x)
        if shape is None:
            return None
        axes = list(range(len(shape)))[attr(node, "start", 0):attr(node, "end", len(shape))]
        return _array([Element(int(shape[a]), frozenset([(x, a)]), exact=(x, a)) for a in axes], (len(axes),))

    def _reduce(self, node: onnx.NodeProto, args: list) -> np.ndarray | None:
        data = args[0]
        if data is None:
            return None
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.known(node.input[1])
            if axes is None:
                return None
        axes = tuple(range(data.ndim)) if axes is None or len(axes) == 0 else tuple(int(a) % data.ndim for a in axes)
        fn = {"ReduceProd": math.prod, "ReduceSum": sum, "ReduceMax": max, "ReduceMin": min}[node.op_type]
        moved = np.moveaxis(data, axes, tuple(range(-len(axes), 0)))
        lead = moved.shape[:data.ndim - len(axes)]
        flat = moved.reshape(*lead, -1)
        items = [_apply(lambda *v: fn(v), list(row)) for row in flat.reshape(-1, flat.shape[-1])]
        out = _array(items, lead)
        if attr(node, "keepdims", 1):
            out = np.expand_dims(out, axes)
        return out

    def _move(self, node: onnx.NodeProto, args: list) -> np.ndarray | None:
        """Ops that only move entries: the entries keep what they are."""
        op, data = node.op_type, args[0]
        if data is None:
            return None
        if op in MOVE_OPS:
            param = attr(node, "axes")  # Squeeze / Unsqueeze before opset 13; else an input, if any
            if param is None and len(node.input) > 1 and node.input[1]:  # indices, target, axes
                param = self.known(node.input[1])
                if param is None:
                    return None
            return move(node, data, param)
        if op == "Concat":
            if any(a is None for a in args):
                return None
            return np.concatenate([np.atleast_1d(a) for a in args], axis=attr(node, "axis", 0))
        if op == "Expand":
            shape = self.known(node.input[1])
            if shape is None:
                return None
            out_shape = np.broadcast_shapes(data.shape, tuple(int(s) for s in shape))
            return None if int(np.prod(out_shape)) > _MAX_ELEMENTS else np.broadcast_to(data, out_shape).copy()
        if op == "Slice":
            return self._slice(node, data)
        return None

    def _slice(self, node: onnx.NodeProto, data: np.ndarray) -> np.ndarray | None:
        if len(node.input) >= 3:
            starts, ends = self.known(node.input[1]), self.known(node.input[2])
            axes = self.known(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            steps = self.known(node.input[4]) if len(node.input) > 4 and node.input[4] else None
            if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None) or \
                    (len(node.input) > 4 and node.input[4] and steps is None):
                return None
        else:
            starts, ends, axes, steps = attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
        starts, ends = np.atleast_1d(starts), np.atleast_1d(ends)
        axes = range(len(starts)) if axes is None else np.atleast_1d(axes)
        steps = np.ones(len(starts), dtype=np.int64) if steps is None else np.atleast_1d(steps)
        index = [slice(None)] * data.ndim
        for a, s, e, st in zip(axes, starts, ends, steps):
            index[int(a) % data.ndim] = slice(int(s), int(e), int(st))
        return data[tuple(index)]


def numpy_value(tensor: onnx.TensorProto) -> int | float | bool:
    """The single value of a one-element tensor attribute (ConstantOfShape's fill)."""
    return onnx.numpy_helper.to_array(tensor).reshape(-1)[0].item()


def _values(elems: np.ndarray) -> np.ndarray:
    values = [e.value for e in elems.flat]
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.array(values, dtype=bool).reshape(elems.shape)
    kind = np.int64 if all(isinstance(v, int) for v in values) else np.float64
    return np.array(values, dtype=kind).reshape(elems.shape)


def _map(elems: np.ndarray, fn) -> np.ndarray:
    return _array([fn(e) for e in elems.flat], elems.shape)


def _mod(fmod: int):
    return math.fmod if fmod else operator.mod


def _cast(e: Element, to: int) -> Element:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(to)
    if e.value is None:
        return e
    if dtype.kind in "iu":
        value = int(e.value)  # truncation, as ONNX casts
    elif dtype.kind == "b":
        value = bool(e.value)
    else:
        value = float(e.value)
    keeps = isinstance(e.value, int) and dtype.kind in "iu"
    return Element(value, e.dims, e.exact if keeps else None, e.origin if keeps else None)


# ---------------------------------------------------------------------- channel dims
def is_channel_dim(g: GraphView, dim: Dim) -> bool:
    """Whether ``dim`` is the channel axis of a tensor of rank ≥ 2."""
    tensor, axis = dim
    shape = g.shape(tensor)
    return axis == g.channel_axis(tensor) and shape is not None and len(shape) >= 2


def reads_channels(g: GraphView, e: Element) -> bool:
    """Whether an element is computed from some tensor's channel count."""
    return any(is_channel_dim(g, d) for d in e.dims)


def fold_channel_ints(g: GraphView, name: str) -> np.ndarray | None:
    """The value of an integer tensor computed from constants and channel counts only, or None
    (an entry reading a batch or spatial dim is dynamic and never folded)."""
    elems = ShapeValues(g).of(name)
    if elems is None or any(e.value is None or not all(is_channel_dim(g, d) for d in e.dims) for e in elems.flat):
        return None
    return _values(elems)


def axes_of(g: GraphView, node: onnx.NodeProto, index: int = 1) -> list[int] | None:
    """A node's ``axes``: the attribute (older opsets) or the constant input at ``index`` (newer
    ones); None when absent or computed from something unknown."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > index and node.input[index]:
        axes = ShapeValues(g).known(node.input[index])
    return None if axes is None else [int(a) for a in np.atleast_1d(axes)]


def constant_elements(values) -> np.ndarray:
    """Elements of constant values (an attribute's pads, for instance)."""
    values = np.asarray(values)
    return _array([Element(v.item()) for v in values.reshape(-1)], values.shape)


def entry_reader(g: GraphView, e: Element, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The node whose input holds the initializer entry ``e`` was copied from, when that entry can
    be rewritten for ``node`` alone: ``node`` reads it directly, or its only reader does."""
    if e.origin is None or not g.is_const(e.origin[0]):
        return None
    name = e.origin[0]
    if name in node.input:
        return node
    readers = g.consumers.get(name, [])
    return readers[0] if len(readers) == 1 else None


def set_entry(g: GraphView, e: Element, value: int, node: onnx.NodeProto) -> None:
    """Rewrite the initializer entry ``e`` was copied from, for ``node`` (see :func:`entry_reader`);
    the reader gets a fresh initializer, so other readers keep the old value."""
    reader = entry_reader(g, e, node)
    if reader is None:
        raise ValueError("a constant channel entry has no single reader to rewrite")
    name, index = e.origin
    array = g.const(name).copy()
    array.reshape(-1)[index] = value
    g.set_const(reader, list(reader.input).index(name), array)


def channel_count_flows_safely(g: GraphView, shape_node: onnx.NodeProto) -> bool:
    """Whether the channel entry of ``Shape(x)`` reaches only nodes that take a changed channel
    count (a dim entry that never reaches anything, or only batch and spatial entries, is safe)."""
    channel = (shape_node.input[0], g.channel_axis(shape_node.input[0]))
    values = ShapeValues(g)
    todo, seen = [shape_node.output[0]], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        elems = values.of(name)
        if elems is None:
            return False  # lost track: cannot prove where the channel count goes
        if not any(channel in e.dims for e in elems.flat):
            continue
        if name in g.graph_outputs:
            return False
        for user in g.consumers.get(name, []):
            if _carries_value(user, name):
                todo.extend(o for o in user.output if o)
            elif not handler_for(user).reads_channel_count(user, name, g):
                return False
    return True


def _carries_value(node: onnx.NodeProto, name: str) -> bool:
    """Whether ``node`` computes a tracked value from ``name`` (not a shape it applies to data)."""
    if node.op_type not in TRACKED or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in ("Reshape", "Expand", "Slice", "ConstantOfShape"):
        return node.input[0] == name and node.op_type != "ConstantOfShape"
    return True


@register("Shape", "Size")
class Shape(Handler):
    """Reads a tensor's size only: not a barrier unless its channel entry reaches a node that
    cannot take a changed channel count."""

    any_axis = True

    def rule(self, node, g):
        if not channel_count_flows_safely(g, node):
            return None
        return ChannelRule(shape_only=[node.input[0]])
