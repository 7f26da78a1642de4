"""The handler interface and the op-type registry.

A handler tells, for one ONNX op type, how channel axes pass through a node (its
:class:`ChannelRule`) and how to slice the node's parameters when channels are removed.
An op type without a handler is a *barrier*: channels are never pruned through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graphview import GraphView

# an elementwise function and its derivative (as a function of the input), for refining the
# layers on either side of it together (onnxprune/refine.py)
Activation = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]

_REGISTRY: dict[str, "Handler"] = {}

# the domain of the ops onnxprune writes into its working copy of a model and spells out again
# before handing a model back (fold.fold_group_norms); handled as the standard op of the same name
FOLDED_DOMAIN = "onnxprune"


@dataclass
class ChannelRule:
    """How the channel axes (axis 1) of a node's tensors relate.

    ties: pairs of tensors whose channel axes are the same channels, index for index.
    produces: outputs whose channels this node creates (their count is set by its weights).
    consumes: inputs whose channels this node reduces over with its weights.
    blocks: tensors where one channel spans several consecutive entries of axis 1
        (a flattened ``C×H×W`` tensor has ``H·W`` per channel).
    scales: tensors whose channel fraction scales this node's MACs (default: consumes + produces).
    joins: (inputs, output) pairs where the output's channels are the inputs' channels in order
        (Concat on the channel axis).
    slices: (input, outputs, start) triples where the outputs are consecutive ranges of the
        input's channels, the first beginning at channel ``start`` (Split, Slice on the channel axis).
    selects: (input, output, indices) triples where the output's channels are the input's at
        ``indices``, each at most once (Gather on the channel axis: a channel shuffle's halves).
    pads: (input, output, before, after) where the output's channels are ``before`` new zero
        channels, the input's, then ``after`` new zero channels (Pad on the channel axis, as
        MediaPipe's blocks widen their shortcut before a residual Add).
    segments: tensors whose channels fall into this many equal consecutive runs that must keep
        equally many channels each (the groups of a grouped Conv cut inside its groups).
    whole_groups: tensors whose channels go only in whole aligned runs of this many (the conv
        groups of a grouped Conv that loses whole groups).
    shape_only: inputs of which the node reads only the shape (Shape); they are not barriers.
    """

    ties: list[tuple[str, str]] = field(default_factory=list)
    produces: list[str] = field(default_factory=list)
    consumes: list[str] = field(default_factory=list)
    blocks: dict[str, int] = field(default_factory=dict)
    scales: list[str] | None = None
    joins: list[tuple[list[str], str]] = field(default_factory=list)
    slices: list[tuple[str, list[str], int]] = field(default_factory=list)
    selects: list[tuple[str, str, np.ndarray]] = field(default_factory=list)
    pads: list[tuple[str, str, int, int]] = field(default_factory=list)
    segments: dict[str, int] = field(default_factory=dict)
    whole_groups: dict[str, int] = field(default_factory=dict)
    shape_only: list[str] = field(default_factory=list)

    def cost_tensors(self) -> list[str]:
        return self.scales if self.scales is not None else self.consumes + self.produces


class Handler:
    """Base handler: a barrier (no rule). Subclasses describe how channels pass through."""

    op_type = ""
    any_axis = False  # works on channels held on any axis (``g.channel_axis``), not only axis 1
    always_barrier = ""  # why every node of this type is a barrier (reports say it instead of a generic line)
    joins_branches = False  # an element-wise join of several branches (residual Add, Max, ...)
    sums_branches = False  # ... whose output is the sum of its inputs (Add, Sum)

    def rule(self, node: onnx.NodeProto, g: GraphView) -> ChannelRule | None:
        """The node's channel rule, or None when the node must be a barrier."""
        return None

    def layer_axis(self, node: onnx.NodeProto, g: GraphView) -> int:
        """The axis a layer (not ``any_axis``) reads its input channels from and writes its
        output channels to: 1, or the last axis for a ``MatMul`` over channels-last tensors."""
        return 1

    def output_axis(self, node: onnx.NodeProto, g: GraphView, axis: int) -> int | None:
        """The channel axis of the outputs when the main input holds channels on ``axis``
        (``any_axis`` handlers only; None when the channels do not survive)."""
        return axis

    def input_axis(self, node: onnx.NodeProto, g: GraphView, axis: int) -> int | None:
        """The inverse of :meth:`output_axis`: the input's channel axis for an output's ``axis``."""
        return axis

    def reads_channel_count(self, node: onnx.NodeProto, name: str, g: GraphView) -> bool:
        """Whether the node still means the same when the channel count that ``name`` is computed
        from changes: it folds the count to a constant it rewrites (Slice bounds, Split sizes), or
        the count lands where the node keeps channels (a Reshape target's channel entry)."""
        return False

    def prune_output(self, node: onnx.NodeProto, keep: np.ndarray, g: GraphView) -> None:
        """Remove output channels not in ``keep`` (the node is a producer)."""
        raise NotImplementedError(f"{node.op_type} does not produce channels")

    def prune_input(self, node: onnx.NodeProto, keep: np.ndarray, block: int, g: GraphView) -> None:
        """Remove input channels not in ``keep`` (the node is a consumer)."""
        raise NotImplementedError(f"{node.op_type} does not consume channels")

    def prune_through(self, node: onnx.NodeProto, keep: np.ndarray, g: GraphView) -> None:
        """Slice the node's per-channel parameters (the node passes channels through)."""

    def macs(self, node: onnx.NodeProto, g: GraphView) -> int:
        """Multiply-accumulates of one sample through this node at the known shapes."""
        return 0

    def channel_scales(self, node: onnx.NodeProto, g: GraphView) -> np.ndarray | None:
        """Per-channel scale factors (BatchNorm γ) of a node the channels pass through, if any."""
        return None

    def subsample_strides(self, node: onnx.NodeProto) -> list[int] | None:
        """The strides, per axis it acts on, where the node only subsamples its input (a pool with a
        one-element window): None for a node that computes anything."""
        return None

    def activation(self, node: onnx.NodeProto, g: GraphView) -> Activation | None:
        """The elementwise function the node applies and its derivative, where gradients may pass
        through it (:mod:`onnxprune.refine`); None otherwise."""
        return None

    def is_depthwise(self, node: onnx.NodeProto, g: GraphView) -> bool:
        """Whether the node filters each channel on its own over a spatial kernel (depthwise conv)."""
        return False

    def conv_groups(self, node: onnx.NodeProto, g: GraphView) -> int:
        """The groups the node's channels are computed in (a conv's ``group``; 1 for other ops)."""
        return 1

    def loses_whole_groups(self, node: onnx.NodeProto, g: GraphView) -> bool:
        """Whether the node is a grouped conv (not depthwise) that pruning removes whole conv groups
        of: it passes each group's channels through, as a depthwise conv passes each channel."""
        return False

    def activation_input(self, node: onnx.NodeProto, g: GraphView) -> str:
        """The tensor :meth:`activation` is a function of."""
        return node.input[0]

    def filter_norms(self, node: onnx.NodeProto, g: GraphView) -> np.ndarray:
        """L1 norm of the weights producing each output channel (producers only)."""
        raise NotImplementedError(f"{node.op_type} does not produce channels")

    def channel_statistic(self, node: onnx.NodeProto, g: GraphView) -> bool:
        """Whether the node, a consumer of its input's channels, computes one value over them without
        weights (a sum of per-channel norms), which the pruner rescales after a cut (:meth:`rescale`)."""
        return False

    def rescale(self, node: onnx.NodeProto, factor: float, g: GraphView) -> bool:
        """Multiply the node's output by ``factor`` (:meth:`channel_statistic` nodes); False where it cannot."""
        return False

    def scale_constant(self, node: onnx.NodeProto, factor: float, g: GraphView) -> bool:
        """Multiply the node's output by ``factor`` through its scalar constant (a ``Mul`` or ``Div``
        by one); False where it has none."""
        return False

    def free_batch(self, node: onnx.NodeProto, g: GraphView) -> list[onnx.NodeProto] | None:
        """Where a constant input of the node writes a batch of 1 (an export at batch 1 folds the
        batch into shapes: :func:`batch_one_constant`), make the node take the batch from its
        tensors instead, the same at batch 1. Returns the nodes to insert before it (``[]`` for
        none), or None where the node holds no such 1. Undone by :meth:`declare_batch`."""
        return None

    def declare_batch(self, node: onnx.NodeProto, g: GraphView) -> list[str]:
        """Undo :meth:`free_batch` on the node: its constant writes 1 again (an entry pruning
        rewrote meanwhile stays rewritten). Returns the names of the nodes ``free_batch`` added,
        for the caller to remove."""
        return []


def whole_runs(keep: np.ndarray, per_run: int, what: str) -> np.ndarray:
    """The runs ``keep`` holds (channel ``i`` is in run ``i // per_run``), checked to be whole
    aligned runs of ``per_run`` channels (the groups of a grouped conv or of a group norm); an
    error naming ``what`` otherwise."""
    runs = np.asarray(keep).reshape(-1, per_run) if len(keep) % per_run == 0 else None
    if runs is None or (runs[:, 0] % per_run).any() or (np.diff(runs, axis=1) != 1).any():
        raise ValueError(f"{what} keeps whole groups of {per_run} channels (got {np.asarray(keep).tolist()})")
    return runs[:, 0] // per_run


def batch_one_constant(node: onnx.NodeProto, g: GraphView, index: int) -> np.ndarray | None:
    """The node's constant shape input ``index`` where it writes a batch of 1 first and the node's
    data input runs at batch 1 (``g.shapes``); None otherwise."""
    value = g.input_const(node, index)
    if value is None or value.ndim != 1 or len(value) < 2 or value[0] != 1 or \
            (g.shape(node.input[0]) or ())[:1] != (1,):
        return None
    return value


@dataclass(frozen=True)
class Window:
    """A convolution's sliding window: the input and output map dims, and per axis the kernel,
    stride, dilation and the padding before and after the map (ONNX's ``pads`` order: begins,
    then ends)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]

    @property
    def padded(self) -> tuple[int, ...]:
        """The input map's dims with its padding."""
        n = len(self.kernel)
        return tuple(size + self.pads[a] + self.pads[a + n] for a, size in enumerate(self.in_shape))

    @property
    def interior(self) -> tuple[slice, ...]:
        """Where the input map lies in the padded one."""
        return tuple(slice(self.pads[a], self.pads[a] + size) for a, size in enumerate(self.in_shape))

    def tap_views(self) -> list[tuple[slice, ...]] | None:
        """Per kernel tap (row-major, the weight's order): the slices of the padded map it reads
        at every output position, in the output's order; None where the outputs reach past the
        padded map (pads that do not cover the last window)."""
        reach = [(out - 1) * s for out, s in zip(self.out_shape, self.strides)]
        spans = [(k - 1) * d for k, d in zip(self.kernel, self.dilations)]
        if any(r + span >= size for r, span, size in zip(reach, spans, self.padded)):
            return None
        per_axis = [[slice(i * d, i * d + r + 1, s) for i in range(k)]
                    for k, d, r, s in zip(self.kernel, self.dilations, reach, self.strides)]
        views = [()]
        for axis in per_axis:
            views = [v + (sl,) for v in views for sl in axis]
        return views

    def tap_positions(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For output positions ``pos`` (flat over ``out_shape``): the flat input position each
        kernel tap reads, clipped into the map, and whether it lies inside it (False: padding);
        both ``[*pos.shape, taps]``, taps in the weight's (row-major) order."""
        out_coords = np.unravel_index(pos, self.out_shape)
        flat = np.zeros((*pos.shape, 1), np.int64)
        inside = np.ones((*pos.shape, 1), bool)
        for axis, size in enumerate(self.in_shape):
            coord = (out_coords[axis] * self.strides[axis] - self.pads[axis])[..., None] + \
                np.arange(self.kernel[axis]) * self.dilations[axis]
            inside = (inside[..., :, None] & ((coord >= 0) & (coord < size))[..., None, :]).reshape(*pos.shape, -1)
            flat = (flat[..., :, None] * size + np.clip(coord, 0, size - 1)[..., None, :]).reshape(*pos.shape, -1)
        return flat, inside


def batch_first(g: GraphView, shape: tuple[int, ...] | None) -> bool:
    """Whether a tensor of ``shape`` (measured on one sample) holds the batch on axis 0: its axis 0
    is the model inputs' batch. Rows of tokens or time steps (``[T·N, C]`` after an attention
    reshape, ``[T, N, C]`` sequences) are not, nor are a conv's windows folded into its batch axis
    (``[N·windows, C, h, w]``: EfficientViT's attention): sampling them as images would mix samples."""
    batches = {s[0] for s in (g.shape(i) for i in g.graph_inputs) if s}
    return shape is None or not batches or shape[0] in batches


class LinearHandler(Handler):
    """A handler for a layer that is a linear map of input patches: Conv, Gemm, MatMul.

    Such a layer can be *reconstructed*: its output at one position is ``W @ patch + b`` with
    ``W`` of shape ``[Cout, Cin·k]`` (channel-major columns) and ``patch`` the ``Cin·k`` input
    values it reads there.
    """

    has_bias = True
    spatial = False  # reads patches of a feature map (Conv): one position per sample means a 1×1 map
    semi_structured = True  # 2:4 sparse kernels exist for it (--sparsity 2:4)

    def weight_matrix(self, node: onnx.NodeProto, g: GraphView) -> np.ndarray:
        """The layer's weight as ``[Cout, Cin·k]`` (channel-major columns)."""
        raise NotImplementedError

    def input_channels(self, node: onnx.NodeProto, g: GraphView) -> int:
        """Input channels each output reads, from the weight's shape (a grouped conv's per-group
        count; a Gemm/MatMul's K, where after a Flatten every column counts)."""
        raise NotImplementedError

    def bias(self, node: onnx.NodeProto, g: GraphView) -> np.ndarray | None:
        raise NotImplementedError

    def set_linear(self, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None,
                   g: GraphView) -> None:
        """Write a new ``[Cout, Cin·k]`` weight (and bias) back in the op's own layout."""
        raise NotImplementedError

    def filter_norms(self, node, g):
        return np.abs(self.weight_matrix(node, g)).sum(axis=1)

    def reconstructable(self, node: onnx.NodeProto, g: GraphView) -> bool:
        """Whether patches can be sampled for this node (its shapes are known and supported)."""
        return True

    def positions(self, node: onnx.NodeProto, g: GraphView) -> int:
        """Output positions per sample (H·W of the output, or 1)."""
        raise NotImplementedError

    def input_positions(self, node: onnx.NodeProto, g: GraphView, pos: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray] | None:
        """For output positions ``pos`` ``[B, P]``: the flat input positions each kernel tap reads,
        ``[B, P, taps]`` (in the order of the patch columns), and whether each lies inside the input
        (False: padding). None where the op has no such map (not a 2-D conv)."""
        return None

    def window(self, node: onnx.NodeProto, g: GraphView) -> Window | None:
        """The sliding window of :meth:`input_positions` (None where it has none)."""
        return None

    def sample_patches(self, node: onnx.NodeProto, g: GraphView, x: np.ndarray,
                       pos: np.ndarray) -> np.ndarray:
        """Input patches ``[B·P, Cin·k]`` read by the outputs at flat positions ``pos [B, P]``."""
        raise NotImplementedError

    def output_columns(self, node: onnx.NodeProto, g: GraphView, channels: np.ndarray) -> np.ndarray:
        """The rows of :meth:`weight_matrix` (columns of the sampled targets) of output ``channels``."""
        return np.asarray(channels)

    def sample_outputs(self, node: onnx.NodeProto, g: GraphView, y: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Values ``[B·P, Cout]`` at flat positions ``pos [B, P]`` of a tensor laid out like this
        layer's output (its own, or that of the residual Add it feeds)."""
        return sample_outputs(y, pos)


def sample_outputs(y: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Values ``[B·P, C]`` of an NC… tensor at flat spatial positions ``pos [B, P]``."""
    flat = y.reshape(y.shape[0], y.shape[1], -1)
    picked = np.take_along_axis(flat, pos[:, None, :], axis=2)  # [B, C, P]
    return picked.transpose(0, 2, 1).reshape(-1, y.shape[1])


def register(*op_types: str):
    """Class decorator registering a handler for op types; a second registration is an error."""

    def wrap(cls):
        for op in op_types:
            if op in _REGISTRY:
                raise RuntimeError(f"a handler for {op} is already registered")
            inst = cls()
            inst.op_type = op
            _REGISTRY[op] = inst
        return cls

    return wrap


_BARRIER = Handler()


def handler_for(node: onnx.NodeProto) -> Handler:
    """The handler for a node's op type; the barrier handler for unknown ops and other domains."""
    if node.domain not in ("", "ai.onnx", FOLDED_DOMAIN):
        return _BARRIER
    return _REGISTRY.get(node.op_type, _BARRIER)


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)
