"""Conv: a producer and consumer of channels (group 1 or grouped), or a channel-wise op (depthwise)."""

from __future__ import annotations

import math

import numpy as np
import onnx

from ..graphview import attr, set_attr
from .base import ChannelRule, Handler, LinearHandler, Window, batch_first, register, whole_runs


def conv_pads(node: onnx.NodeProto, in_hw: tuple[int, ...], kernel: tuple[int, ...]) -> list[int]:
    """Begin and end pads (ONNX order) for a conv, resolving ``auto_pad``."""
    n = len(kernel)
    strides = attr(node, "strides", [1] * n)
    dil = attr(node, "dilations", [1] * n)
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(in_hw, kernel, strides, dil):
            out = math.ceil(size / s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * n)
    return list(attr(node, "pads", [0] * (2 * n)))


def live_taps(node: onnx.NodeProto, in_hw: tuple[int, ...], out_hw: tuple[int, ...], kernel: tuple[int, ...]) -> int:
    """Kernel taps that read the input, not only padding, at some output position. A conv dilated
    past its map (DeepLab's ASPP at a small input) has taps that only ever read padding; ONNX
    Runtime's CPU kernels skip them, so they cost no time (a 3×3 conv at dilation 12 on a 10×10
    map ran in 0.55 ms against 9.65 ms at dilation 1)."""
    n = len(kernel)
    strides, dil = attr(node, "strides", [1] * n), attr(node, "dilations", [1] * n)
    pads = conv_pads(node, in_hw, kernel)
    taps = 1
    for axis, (size, out, k) in enumerate(zip(in_hw, out_hw, kernel)):
        first = -pads[axis]  # input row the first output's first tap reads
        last = (out - 1) * strides[axis] - pads[axis]  # the last output's
        taps *= sum(1 for i in range(k) if first + i * dil[axis] < size and last + i * dil[axis] >= 0)
    return taps


def reads_as_many_as_it_writes(weight: np.ndarray, group: int) -> bool:
    """Whether each conv group of a conv with ``weight`` ``[Cout, Cin / group, k…]`` reads as many
    channels as it writes: such a conv loses whole groups (depthwise: groups of one)."""
    return weight.shape[0] == weight.shape[1] * group


@register("Conv")
class Conv(LinearHandler):
    """Conv: consumes its input channels, produces its output channels.

    Depthwise conv (one filter per channel) ties input and output channels. A grouped conv with
    as many output as input channels per group (ResNeXt, RegNet) ties them too, in whole conv
    groups (``whole_groups``): a group goes with its input and output channels, so the conv keeps its
    per-group widths and loses ``group`` — ONNX Runtime runs a conv with fewer channels per group
    slower than the whole one (docs/latency.md), one with fewer groups faster. Other grouped convs
    keep their groups equal: input and output channels are cut into ``group`` runs that lose
    equally many channels each (``segments``), so ``group`` stays valid. A grouped conv's weight
    is block-diagonal, so it is sliced, never sampled or refit.
    """

    spatial = True

    def _weight(self, node, g):
        return g.input_const(node, 1)

    def is_depthwise(self, node, g) -> bool:
        w = self._weight(node, g)
        group = attr(node, "group", 1)
        return w is not None and group > 1 and w.shape[1] == 1 and w.shape[0] == group

    def is_grouped(self, node, g) -> bool:
        """Whether it is a grouped conv that is not depthwise: pruning removes whole conv groups of
        it, or cuts each of them equally; it is sliced, never sampled or refit."""
        return attr(node, "group", 1) > 1 and not self.is_depthwise(node, g)

    def conv_groups(self, node, g) -> int:
        return attr(node, "group", 1)

    def loses_whole_groups(self, node, g) -> bool:
        """Whether pruning removes whole conv groups of this grouped conv (not depthwise)."""
        w = self._weight(node, g)
        return self.is_grouped(node, g) and w is not None and reads_as_many_as_it_writes(w, attr(node, "group", 1))

    def rule(self, node, g):
        w = self._weight(node, g)
        if w is None:
            return None
        group = attr(node, "group", 1)
        if group == 1:
            return ChannelRule(produces=[node.output[0]], consumes=[node.input[0]])
        if self.is_depthwise(node, g):
            return ChannelRule(ties=[(node.input[0], node.output[0])], scales=[node.output[0]])
        if self.loses_whole_groups(node, g):
            return ChannelRule(ties=[(node.input[0], node.output[0])], scales=[node.output[0]],
                               whole_groups={node.output[0]: int(w.shape[1])})
        return ChannelRule(produces=[node.output[0]], consumes=[node.input[0]],
                           segments={node.input[0]: group, node.output[0]: group})

    def _keep_filters(self, node, keep, g) -> None:
        g.set_const(node, 1, g.input_const(node, 1)[keep])
        bias = g.input_const(node, 2)
        if bias is not None:
            g.set_const(node, 2, bias[keep])

    def prune_output(self, node, keep, g):
        _check_equal_groups(keep, g.input_const(node, 1).shape[0], attr(node, "group", 1))
        self._keep_filters(node, keep, g)

    def prune_input(self, node, keep, block, g):
        w = g.input_const(node, 1)
        group = attr(node, "group", 1)
        if group == 1:
            g.set_const(node, 1, w[:, keep])
            return
        per_in, per_out = w.shape[1], w.shape[0] // group
        local = _check_equal_groups(keep, per_in * group, group)  # [group, kept per group]
        g.set_const(node, 1, np.concatenate(
            [w[i * per_out:(i + 1) * per_out][:, local[i] - i * per_in] for i in range(group)]))

    def prune_through(self, node, keep, g):
        per_group = int(g.input_const(node, 1).shape[1])  # 1 for depthwise
        whole_runs(keep, per_group, "a grouped conv")
        self._keep_filters(node, keep, g)
        set_attr(node, "group", int(len(keep)) // per_group)

    def macs(self, node, g):
        """Multiply-adds of the taps that read the input somewhere (:func:`live_taps`)."""
        w = self._weight(node, g)
        out, inp = g.shape(node.output[0]), g.shape(node.input[0])
        if w is None or out is None:
            return 0
        kernel = tuple(int(k) for k in w.shape[2:])
        spatial = [inp[2:], out[2:]] if inp is not None else []
        known = spatial and all(isinstance(v, int) and v > 0 for dims in spatial for v in dims)
        taps = live_taps(node, *spatial, kernel) if known else int(np.prod(kernel))
        maps = 1 if batch_first(g, out) else int(out[0])  # windows folded into the batch axis: each a map
        return int(w.shape[0] * w.shape[1]) * taps * int(np.prod(out[2:])) * maps

    # ---- linear-layer view (group 1 only) ----
    def reconstructable(self, node, g):
        shape, out = g.shape(node.input[0]), g.shape(node.output[0])
        return attr(node, "group", 1) == 1 and shape is not None and out is not None and len(shape) >= 3 and \
            batch_first(g, shape)

    def weight_matrix(self, node, g):
        w = self._weight(node, g)
        return w.reshape(w.shape[0], -1).astype(np.float64)

    def input_channels(self, node, g):
        return int(self._weight(node, g).shape[1])

    def bias(self, node, g):
        return g.input_const(node, 2)

    def set_linear(self, node, weight, bias, g):
        w = self._weight(node, g)
        cin = weight.shape[1] // int(np.prod(w.shape[2:]))
        g.set_const(node, 1, weight.reshape(w.shape[0], cin, *w.shape[2:]).astype(w.dtype))
        if bias is not None:
            g.set_const(node, 2, bias.astype(w.dtype))

    def positions(self, node, g):
        return int(np.prod(g.shape(node.output[0])[2:]))

    def window(self, node, g):
        w, in_shape, out_shape = self._weight(node, g), g.shape(node.input[0]), g.shape(node.output[0])
        if w is None or in_shape is None or out_shape is None or len(in_shape) < 3 or \
                (self.is_grouped(node, g) and not self.loses_whole_groups(node, g)):
            return None
        return _window(node, tuple(in_shape[2:]), tuple(out_shape[2:]), tuple(w.shape[2:]))

    def input_positions(self, node, g, pos):
        window = self.window(node, g)
        if window is None:
            return None
        flat, inside = window.tap_positions(pos)
        return flat.reshape(*pos.shape, -1), inside.reshape(*pos.shape, -1)

    def sample_patches(self, node, g, x, pos):
        w = self._weight(node, g)
        flat, inside = _window(node, x.shape[2:], tuple(g.shape(node.output[0])[2:]), tuple(w.shape[2:])).tap_positions(pos)
        rows = x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)  # channels last
        if flat.shape[1] * flat.shape[2] >= rows.shape[1]:
            # reading each position several times: one contiguous copy makes each read one row
            rows = np.ascontiguousarray(rows)
        b = np.arange(x.shape[0])[:, None, None]
        patches = rows[b, flat]  # B, P, taps, C
        if not inside.all():
            patches[~inside] = 0  # taps on the padding
        return patches.transpose(0, 1, 3, 2).reshape(pos.shape[0] * pos.shape[1], -1)


def _window(node: onnx.NodeProto, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
            kernel: tuple[int, ...]) -> Window:
    """The conv's sliding window over maps of ``in_shape`` (any number of spatial dims)."""
    n = len(kernel)
    return Window(tuple(int(v) for v in in_shape), tuple(int(v) for v in out_shape), tuple(int(k) for k in kernel),
                  tuple(attr(node, "strides", [1] * n)), tuple(attr(node, "dilations", [1] * n)),
                  tuple(conv_pads(node, in_shape, kernel)))


def _check_equal_groups(keep: np.ndarray, channels: int, group: int) -> np.ndarray:
    """``keep`` as ``[group, kept per group]``; an error unless every group keeps equally many."""
    keep = np.asarray(keep)
    per_group = np.bincount(keep // (channels // group), minlength=group)
    if len(per_group) != group or (per_group != per_group[0]).any():
        raise ValueError(f"a grouped conv must keep equally many channels per group (got {per_group.tolist()})")
    return keep.reshape(group, -1)


@register("ConvTranspose")
class ConvTranspose(LinearHandler):
    """Transposed conv (group 1): weight is ``[Cin, Cout, k…]``; consumes and produces channels.

    A *tiled* one (2-D, kernel equal to stride, no padding, dilation or output padding: the usual
    learned 2× upsampling of decoders and detector heads) writes each output pixel from one input
    pixel, so it is a linear layer of single input pixels with ``Cout·kh·kw`` outputs (one per
    output channel and place in the tile) and is reconstructed like a 1×1 conv; its bias, shared
    by a channel's whole tile, is kept as it is. Other transposed convs are not reconstructed (an
    output pixel sums several input pixels); their weights are sliced.
    """

    has_bias = False  # one bias per output channel cannot follow a refit per place in its tile
    semi_structured = False

    def conv_groups(self, node, g) -> int:
        return attr(node, "group", 1)

    def _tile(self, node, g) -> tuple[int, int] | None:
        w = g.input_const(node, 1)
        if w is None or w.ndim != 4 or attr(node, "group", 1) != 1:
            return None
        kernel = tuple(w.shape[2:])
        if tuple(attr(node, "strides", [1, 1])) != kernel or list(attr(node, "dilations", [1, 1])) != [1, 1]:
            return None
        if any(attr(node, "pads", [0] * 4)) or any(attr(node, "output_padding", [0, 0])):
            return None
        auto = attr(node, "auto_pad", b"NOTSET")
        if (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET", "VALID"):
            return None
        if attr(node, "output_shape") is not None:
            return None
        return int(kernel[0]), int(kernel[1])

    def reconstructable(self, node, g):
        shape = g.shape(node.input[0])
        return (self._tile(node, g) is not None and shape is not None and len(shape) == 4
                and g.shape(node.output[0]) is not None and batch_first(g, shape))

    def weight_matrix(self, node, g):
        w = g.input_const(node, 1)  # [Cin, Cout, kh, kw] -> [(Cout, kh, kw), Cin]
        return w.transpose(1, 2, 3, 0).reshape(-1, w.shape[0]).astype(np.float64)

    def input_channels(self, node, g):
        return int(g.input_const(node, 1).shape[0])

    def bias(self, node, g):
        b = g.input_const(node, 2)
        if b is None:
            return None
        w = g.input_const(node, 1)
        return np.repeat(b.astype(np.float64), int(np.prod(w.shape[2:])))

    def set_linear(self, node, weight, bias, g):
        w = g.input_const(node, 1)
        cin, cout, kh, kw = w.shape
        g.set_const(node, 1, weight.reshape(cout, kh, kw, cin).transpose(3, 0, 1, 2).astype(w.dtype))

    def output_columns(self, node, g, channels):
        w = g.input_const(node, 1)
        k = int(np.prod(w.shape[2:]))
        return (np.asarray(channels)[:, None] * k + np.arange(k)[None, :]).ravel()

    def positions(self, node, g):
        return int(np.prod(g.shape(node.input[0])[2:]))

    def sample_patches(self, node, g, x, pos):
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        return np.take_along_axis(flat, pos[:, None, :], axis=2).transpose(0, 2, 1).reshape(-1, x.shape[1])

    def sample_outputs(self, node, g, y, pos):
        kh, kw = self._tile(node, g)
        b, c, h, w = y.shape
        tiles = y.reshape(b, c, h // kh, kh, w // kw, kw).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, c * kh * kw)
        return np.take_along_axis(tiles, pos[:, :, None], axis=1).reshape(-1, c * kh * kw)

    def rule(self, node, g):
        if g.input_const(node, 1) is None or attr(node, "group", 1) != 1:
            return None
        if attr(node, "output_shape") is not None and len(attr(node, "output_shape")) > 2:
            return None  # an explicit output_shape may spell out the channels
        return ChannelRule(produces=[node.output[0]], consumes=[node.input[0]])

    def prune_output(self, node, keep, g):
        g.set_const(node, 1, g.input_const(node, 1)[:, keep])
        bias = g.input_const(node, 2)
        if bias is not None:
            g.set_const(node, 2, bias[keep])

    def prune_input(self, node, keep, block, g):
        g.set_const(node, 1, g.input_const(node, 1)[keep])

    def filter_norms(self, node, g):
        w = g.input_const(node, 1)
        return np.abs(w).sum(axis=tuple(i for i in range(w.ndim) if i != 1))

    def macs(self, node, g):
        w = g.input_const(node, 1)
        inp = g.shape(node.input[0])
        if w is None or inp is None:
            return 0
        return int(np.prod(w.shape)) * int(np.prod(inp[2:]))
