"""Tail refinement: the model's last layers tuned together on its output.

Layer-wise least squares fits each layer to its own original output; the branch refinement
(:mod:`onnxprune.refine`) tunes a residual branch on the branch's sum. Neither reaches the model's
output: on a plain chain — VGG-style convs, then the classifier — each refit can make up for what
the layers before it lost only by a linear map of the channels they kept, and the channels carry
the rest of the loss forward. The *tail* is the chain of layers that ends at the model's only
output and that only the output depends on: walked back from the output through convolutions,
fully connected layers, elementwise activations, pooling and flattening, as long as every tensor
on the way is read by the tail alone, over at most :data:`MAX_LAYERS` weighted layers. Where it
holds two or more, their weights are tuned together by Adam (its step decaying on a cosine) on
the relative squared error of the output against the original model's (before a final Softmax),
on the fit samples and fresh blends of the fit images. A fifth of the real fit images is set
aside; fresh blends of those check every few steps (the images themselves were fit by the
layer-wise refits, which would be favoured on them): the weights with the lowest error there
are kept, and only when they beat the layer-wise ones by :data:`MIN_GAIN` and the held-out images
do not contradict them (:data:`CONFIRM_SLACK`). The check and the held-out images judge what the
model outputs: after its final Softmax, where it has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .activations import run_batches, tensor_shapes
from .adam import adam_step
from .calib import Calibration
from .graph import shared_weight
from .graphview import GraphView, attr
from .ops import handler_for
from .ops.base import LinearHandler
from .ops.elementwise import activation_chain

MAX_LAYERS = 5  # weighted layers a tail holds at most, counted from the output
MAX_VALUES = 1 << 24  # input (and output) values the tail's samples hold (64 MiB of float32)
MAX_MACS = 1 << 29  # the tail's multiply-adds per step (forward) at most: a step's cost stays bounded
STEPS = 400
CHECK_EVERY = 25
# samples a step reads: 32 fit the held-out images about as well at half the cost, but gained
# two thirds of the accuracy (docs/benchmarks.md, "Making the tail cheaper")
BATCH = 64
# Adam's first step, relative to the mean magnitude of each layer's weights (its bias takes the
# same), decaying to 0 on a cosine over the steps: the last steps settle instead of wandering
LEARNING_RATE = 0.015
CHECK_SHARE = 0.2  # of the real fit images
MIN_GAIN = 0.01
MIN_CHECK = 8  # check images needed at least
# held-out error the tuned weights may add and be kept: the held-out fifth is too few images to
# confirm a gain of a few per cent, but enough to catch a large loss where blends misled the
# check (docs/benchmarks.md, "Tuning the tail end to end")
CONFIRM_SLACK = 0.05
BLENDS = 3  # fresh blends of the fit images per fit image, for the tuning to read
CHECK_BLENDS = 4  # fresh blends of the check images per check image: what the check reads


class _Layer:
    """One op of the tail: ``forward`` keeps what ``backward`` needs; ``backward`` takes the
    gradient of the output and returns that of the input (and sets ``grads`` where weighted)."""

    params: list[np.ndarray] = []
    grads: list[np.ndarray] = []

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        raise NotImplementedError


class _Linear(_Layer):
    """A Conv (one group, 2-D) or fully connected layer. A conv reads and writes channels last
    (``[N, positions, channels]``) and holds its weights as ``[Cout, taps · Cin]``, tap-major, so
    that its patches are one gather of whole channel rows and its output needs no transpose; the
    patches' input positions come from its handler."""

    def __init__(self, node: onnx.NodeProto, g: GraphView):
        self.node, self.g, self.h = node, g, handler_for(node)
        w = self.h.weight_matrix(node, g).astype(np.float32)  # [Cout, Cin · taps], channel-major
        b = self.h.bias(node, g)
        self.spatial = node.op_type == "Conv"
        self.out_shape = g.shape(node.output[0])
        self.positions = int(np.prod(self.out_shape[2:]))  # output positions per sample (1: fully connected)
        if self.spatial:
            self.cin = g.shape(node.input[0])[1]
            w = np.ascontiguousarray(w.reshape(len(w), self.cin, -1).transpose(0, 2, 1).reshape(len(w), -1))
        self.params = [w, np.zeros(w.shape[0], np.float32) if b is None else b.astype(np.float32)]
        self.has_bias = b is not None or node.op_type != "MatMul"

    def macs(self) -> int:
        w = self.params[0]
        return int(w.size * self.positions)

    def taps(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``[P · taps]``: the flat input position each output position reads at each tap, from
        the handler, padding reading ``size`` (a zero slot after the input's positions); and
        ``[size · taps]``: the output position that reads each input position at each tap, or
        ``P`` (a zero slot after the output's) where none does — the transposed conv's patches."""
        if not hasattr(self, "_taps"):
            positions = self.positions
            flat, inside = self.h.input_positions(self.node, self.g, np.arange(positions)[None, :])
            taps = np.where(inside[0], flat[0], size)  # [P, taps]
            readers = np.full((size + 1, taps.shape[1]), positions)
            readers[taps, np.arange(taps.shape[1])] = np.arange(positions)[:, None]  # one tap reads a position once
            self._taps = taps.ravel(), readers[:size].ravel()
        return self._taps

    def forward(self, x):
        if not self.spatial:
            self.cols = x
            return x @ self.params[0].T + self.params[1]
        b, size, _ = x.shape
        self.x_shape = x.shape
        # the patches [B · P, taps · Cin]: one gather of channel rows
        self.cols = np.take(_with_zero_slot(x), self.taps(size)[0], axis=1).reshape(b * self.positions, -1)
        y = self.cols @ self.params[0].T
        y += self.params[1]
        return y.reshape(b, self.positions, -1)

    def backward(self, dy, need_dx=True):
        w = self.params[0]
        rows = dy.reshape(-1, w.shape[0])  # [B · P, Cout], as the patches
        self.grads = [rows.T @ self.cols, rows.sum(0) if self.has_bias else np.zeros_like(self.params[1])]
        if not need_dx:
            return None
        if not self.spatial:
            return dy @ w
        # the transposed conv: dy's patches at the readers of each input position, times the
        # weights tap by tap ([taps · Cout, Cin])
        b, size, cin = self.x_shape
        cols = np.take(_with_zero_slot(dy), self.taps(size)[1], axis=1).reshape(b * size, -1)
        by_tap = w.reshape(len(w), -1, cin).transpose(1, 0, 2).reshape(-1, cin)
        return (cols @ by_tap).reshape(self.x_shape)

    def store(self) -> None:
        w = self.params[0]
        if self.spatial:  # back to the handler's channel-major [Cout, Cin · taps]
            w = w.reshape(len(w), -1, self.cin).transpose(0, 2, 1).reshape(len(w), -1)
        self.h.set_linear(self.node, w.astype(np.float64),
                          self.params[1].astype(np.float64) if self.has_bias else None, self.g)


class _Activation(_Layer):
    def __init__(self, act):
        self.f, self.df = act

    def forward(self, x):
        self.z = x
        return self.f(x)

    def backward(self, dy, need_dx=True):
        return dy * self.df(self.z)


class _Pool(_Layer):
    """Max or average pooling over non-overlapping windows (kernel = stride, no padding), or
    global average pooling, channels last."""

    def __init__(self, node: onnx.NodeProto, shape: tuple[int, ...]):
        self.max = node.op_type == "MaxPool"
        self.kernel = None if node.op_type == "GlobalAveragePool" else tuple(attr(node, "kernel_shape"))
        self.hw = shape[2:]

    def forward(self, x):
        self.x_shape = x.shape
        if self.kernel is None:
            return x.mean(axis=1, keepdims=True)
        (kh, kw), (h, w), (b, _, c) = self.kernel, self.hw, x.shape
        oh, ow = h // kh, w // kw
        blocks = x.reshape(b, h, w, c)[:, :oh * kh, :ow * kw].reshape(b, oh, kh, ow, kw, c)
        if not self.max:
            return blocks.mean(axis=(2, 4)).reshape(b, oh * ow, c)
        y = blocks.max(axis=(2, 4))
        hit = (blocks == y[:, :, None, :, None]).astype(x.dtype)
        self.share = hit / hit.sum(axis=(2, 4), keepdims=True)  # ties split the gradient
        return y.reshape(b, oh * ow, c)

    def backward(self, dy, need_dx=True):
        b, size, c = self.x_shape
        if self.kernel is None:
            return np.broadcast_to(dy / size, self.x_shape).copy()
        (kh, kw), (h, w) = self.kernel, self.hw
        oh, ow = h // kh, w // kw
        share = self.share if self.max else 1.0 / (kh * kw)
        blocks = share * dy.reshape(b, oh, 1, ow, 1, c)
        dx = np.zeros((b, h, w, c), dy.dtype)
        dx[:, :oh * kh, :ow * kw] = np.broadcast_to(blocks, (b, oh, kh, ow, kw, c)).reshape(b, oh * kh, ow * kw, c)
        return dx.reshape(self.x_shape)


class _Flatten(_Layer):
    """Flatten to ``[N, features]`` in the model's (channels first) order."""

    def forward(self, x):
        self.x_shape = x.shape
        return x.transpose(0, 2, 1).reshape(len(x), -1) if x.ndim == 3 else x

    def backward(self, dy, need_dx=True):
        if len(self.x_shape) == 2:
            return dy
        b, size, c = self.x_shape
        return dy.reshape(b, c, size).transpose(0, 2, 1)


class _Shift(_Layer):
    """Adds a constant (a bias as its own op; none: Identity, inference Dropout)."""

    def __init__(self, shift: np.ndarray | None = None, shape: tuple[int, ...] | None = None):
        if shift is not None and shape is not None and len(shape) == 4:  # to channels last
            shift = _channels_last(np.broadcast_to(shift, (1, *shape[1:])))
        self.shift = None if shift is None else shift.astype(np.float32)

    def forward(self, x):
        return x if self.shift is None else x + self.shift

    def backward(self, dy, need_dx=True):
        return dy


def _with_zero_slot(x: np.ndarray) -> np.ndarray:
    """``[B, n, C]`` with a row of zeros after its ``n`` positions."""
    out = np.empty((x.shape[0], x.shape[1] + 1, x.shape[2]), x.dtype)
    out[:, :-1], out[:, -1] = x, 0
    return out


def _channels_last(x: np.ndarray) -> np.ndarray:
    """``[N, C, H, W]`` as the tail holds it: ``[N, H · W, C]``; other ranks as they are."""
    return np.ascontiguousarray(x.reshape(*x.shape[:2], -1).transpose(0, 2, 1)) if x.ndim == 4 else x


def _pool(node: onnx.NodeProto, g: GraphView) -> _Pool | None:
    shape = g.shape(node.input[0])
    if shape is None or len(shape) != 4 or (len(node.output) > 1 and node.output[1]):
        return None
    if node.op_type == "GlobalAveragePool":
        return _Pool(node, shape)
    kernel = attr(node, "kernel_shape")
    plain = (kernel is not None and len(kernel) == 2 and list(attr(node, "strides", [1, 1])) == list(kernel)
             and not any(attr(node, "pads", [0, 0, 0, 0]))
             and attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
             and not attr(node, "ceil_mode", 0) and all(d == 1 for d in attr(node, "dilations", [1, 1])))
    return _Pool(node, shape) if plain else None


def _layer(node: onnx.NodeProto, g: GraphView) -> _Layer | None:
    """The tail layer of ``node``, or None where the tail cannot pass it."""
    h = handler_for(node)
    if isinstance(h, LinearHandler):
        if shared_weight(node, g):  # tuned here, it would part from the other nodes' weight
            return None
        shape = g.shape(node.input[0])
        if node.op_type == "Conv":
            ok = attr(node, "group", 1) == 1 and shape is not None and len(shape) == 4 and h.reconstructable(node, g)
        else:  # fully connected on [N, K]
            ok = (shape is not None and len(shape) == 2 and h.reconstructable(node, g)
                  and g.input_const(node, 1) is not None and not attr(node, "transA", 0))
        return _Linear(node, g) if ok and g.shape(node.output[0]) is not None else None
    if node.op_type in ("MaxPool", "AveragePool", "GlobalAveragePool"):
        return _pool(node, g)
    if node.op_type in ("Add", "Sub") and len(node.input) == 2 and g.is_const(node.input[1]) and \
            g.shape(node.output[0]) == g.shape(node.input[0]):  # a constant bias (Paddle's MatMul + Add)
        return _Shift(g.const(node.input[1]) * (1 if node.op_type == "Add" else -1), g.shape(node.output[0]))
    if node.op_type in ("Identity", "Dropout") and len([o for o in node.output if o]) == 1:
        return _Shift()
    shape, out = g.shape(node.input[0]), g.shape(node.output[0])
    if node.op_type in ("Flatten", "Reshape") and shape is not None and out is not None and \
            len(out) == 2 and out == (shape[0], int(np.prod(shape[1:]))) and attr(node, "axis", 1) == 1:
        return _Flatten()
    return None


@dataclass
class Tail:
    """The tail of a model: its input tensor, the tensor whose error is tuned (the output, or
    a final Softmax's input), its layers in order, that final Softmax (or LogSoftmax), and the
    shape of the tensor tuned."""

    input: str
    output: str
    layers: list[_Layer]
    final: onnx.NodeProto | None = None
    out_shape: tuple[int, ...] = ()

    def model_output(self, logits: np.ndarray) -> np.ndarray:
        """What the model outputs for the tail's output ``logits``: the final Softmax applied."""
        if self.final is None:
            return logits
        axis = -1 if logits.ndim == 2 else attr(self.final, "axis", -1)  # find_tail admits -1 and 1
        shifted = logits - logits.max(axis=axis, keepdims=True)
        if self.final.op_type == "LogSoftmax":
            return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        e = np.exp(shifted)
        return e / e.sum(axis=axis, keepdims=True)

    @property
    def weighted(self) -> list[_Linear]:
        return [layer for layer in self.layers if isinstance(layer, _Linear)]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The tail's output for its input ``x``, both as the model holds them (channels first)."""
        x = _channels_last(x)
        for layer in self.layers:
            x = layer.forward(x)
        return x if x.ndim == 2 else np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(len(x), *self.out_shape[1:])

    def backward(self, dy: np.ndarray) -> None:
        """Sets each weighted layer's ``grads`` from the gradient ``dy`` of the last output."""
        dy = _channels_last(dy)
        first = self.layers.index(self.weighted[0])
        for i in range(len(self.layers) - 1, first - 1, -1):
            dy = self.layers[i].backward(dy, need_dx=i > first)


def find_tail(g: GraphView, samples: int) -> Tail | None:
    """The tail of ``g``'s model (:mod:`module docs <onnxprune.tail>`), whose input and output
    for ``samples`` samples each fit :data:`MAX_VALUES`; None where it holds fewer than two
    weighted layers or the model has more than one output."""
    if len(g.graph.output) != 1:
        return None
    t = g.graph.output[0].name
    while t in g.producer and g.producer[t].op_type == "Identity":  # Paddle2ONNX ends with one
        t = g.producer[t].input[0]
    last = g.producer.get(t)
    final = None
    if last is not None and last.op_type in ("Softmax", "LogSoftmax") and attr(last, "axis", -1) in (-1, 1):
        t, final = last.input[0], last
    out_shape = g.shape(t)
    if out_shape is None or int(np.prod(out_shape[1:])) * samples > MAX_VALUES:
        return None  # the targets must fit as the inputs do
    output, layers, outs, nodes, macs = t, [], [], set(), 0

    def inside(node: onnx.NodeProto) -> bool:
        # a tail node, a Shape (it reads no values, and the tail keeps shapes), or a node whose
        # outputs only such nodes read: the gate of x · σ(x), or of x · relu6(x + 3) / 6
        return id(node) in nodes or node.op_type == "Shape" or all(
            o not in g.graph_outputs and g.consumers.get(o) and all(inside(c) for c in g.consumers[o])
            for o in node.output if o)

    while t in g.producer and t not in g.graph_inputs:
        if t != output and not all(inside(c) for c in g.consumers.get(t, [])):
            break  # something outside the tail reads it
        node = g.producer[t]
        chain = activation_chain(g, t)
        if chain is not None:
            act, source, chain_nodes = chain
            layers.append(_Activation(act))
            outs.append(t)
            nodes.update(id(n) for n in chain_nodes)
            t = source
            continue
        layer = _layer(node, g)
        if layer is None:
            break
        if isinstance(layer, _Linear):
            per_sample = int(np.prod(g.shape(node.input[0])[1:]))
            if (len([x for x in layers if isinstance(x, _Linear)]) == MAX_LAYERS or per_sample * samples > MAX_VALUES
                    or macs + layer.macs() * BATCH > MAX_MACS):
                break
            macs += layer.macs() * BATCH
        layers.append(layer)
        outs.append(t)
        nodes.add(id(node))
        t = node.input[0]
    while layers and not isinstance(layers[-1], _Linear):  # the tail starts at a weighted layer
        layers.pop()
        t = outs.pop()
    tail = Tail(t, output, layers[::-1], final, out_shape)
    return tail if len(tail.weighted) >= 2 else None


@dataclass
class TailResult:
    """What the tail refinement did: weighted layers tuned, the held-out images' relative squared
    output error with the layer-wise weights and with the tuned ones, and whether those were kept."""

    layers: int
    error_before: float
    error_after: float
    kept: bool


def _error(tail: Tail, x: np.ndarray, y: np.ndarray, chunk: int = BATCH) -> float:
    """Relative squared error of what the model outputs (after a final Softmax: a smaller error of
    its input can be a larger one of the class scores) on inputs ``x``, for tail outputs ``y``."""
    # in chunks of a step's size: a conv's patches for 256 samples are tens of MB, fresh memory
    # from the system at every check, which cost more than the products themselves
    num = den = 0.0
    for i in range(0, len(x), chunk):
        target = tail.model_output(y[i:i + chunk])
        num += float(np.square(tail.model_output(tail.forward(x[i:i + chunk])) - target).sum())
        den += float(np.square(target).sum())
    return num / max(den, 1e-30)


def tune_tail(tail: Tail, x: np.ndarray, y: np.ndarray, check: np.ndarray, seed: int,
              confirm: tuple[np.ndarray, np.ndarray]) -> TailResult:
    """Adam on the tail's weights (in place) from inputs ``x`` to the original outputs ``y``; the
    samples ``check`` (indices into them) only check, choosing the step. The weights end as the
    best checked ones where those beat the starting ones there by :data:`MIN_GAIN` and are not
    worse by more than :data:`CONFIRM_SLACK` on the inputs and outputs ``confirm``, else as they
    began. The result's errors are on ``confirm``."""
    rng = np.random.default_rng(seed + 5)
    fit = np.setdiff1d(np.arange(len(x)), check)
    xc, yc = x[check], y[check]
    flat, rate = _flatten_params(tail.weighted)
    start = flat.copy()
    moment, second = np.zeros_like(flat), np.zeros_like(flat)
    grad = np.empty_like(flat)
    before = best = _error(tail, xc, yc)
    best_params = start
    for step in range(1, STEPS + 1):
        sel = rng.choice(fit, min(BATCH, len(fit)), replace=False)
        target = y[sel]
        tail.backward((tail.forward(x[sel]) - target) * np.float32(2.0 / max(float(np.square(target).sum()), 1e-30)))
        np.concatenate([g.ravel() for layer in tail.weighted for g in layer.grads], out=grad)
        decay = np.float32(0.5 * (1 + np.cos(np.pi * (step - 1) / STEPS)))
        adam_step(flat, grad, moment, second, step, rate * decay)
        if step % CHECK_EVERY == 0:
            err = _error(tail, xc, yc)
            if err < best:
                best, best_params = err, flat.copy()
    flat[...] = start
    confirmed_before = _error(tail, *confirm)
    kept, confirmed = False, confirmed_before
    if best < before * (1 - MIN_GAIN):
        flat[...] = best_params
        confirmed = _error(tail, *confirm)
        kept = confirmed <= confirmed_before * (1 + CONFIRM_SLACK)
    if not kept:
        flat[...] = start
    return TailResult(len(tail.weighted), confirmed_before, confirmed if kept else confirmed_before, kept)


def _flatten_params(layers: list[_Linear]) -> tuple[np.ndarray, np.ndarray]:
    """All of ``layers``' weights and biases as one vector, their ``params`` rebound to views of
    it (one Adam step per step instead of one per array), and Adam's first step for each entry:
    :data:`LEARNING_RATE` times the mean magnitude of its layer's weights."""
    params = [p for layer in layers for p in layer.params]
    flat = np.concatenate([p.ravel() for p in params])
    rate = np.empty_like(flat)
    offset = 0
    for layer in layers:
        scale = LEARNING_RATE * (float(np.abs(layer.params[0]).mean()) or 1.0)
        views = []
        for p in layer.params:
            views.append(flat[offset:offset + p.size].reshape(p.shape))
            rate[offset:offset + p.size] = scale
            offset += p.size
        layer.params = views
    return flat, rate


def refine_tail(pruned: onnx.ModelProto, original: onnx.ModelProto, cal: Calibration, fit_idx: np.ndarray,
                hold_idx: np.ndarray, seed: int, batch: int, provider: str = "cpu") -> TailResult | None:
    """Find the pruned model's tail and tune it (:func:`tune_tail`) on the fit samples ``fit_idx``
    of ``cal`` and fresh blends of them, confirmed on the held-out samples ``hold_idx``, writing
    the tuned weights into ``pruned``; None where it has no tail to tune or too few images to
    check or confirm it."""
    real = fit_idx[(cal.sources(fit_idx) == fit_idx[:, None]).all(axis=1)]
    n_check = int(round(len(real) * CHECK_SHARE))
    if n_check < MIN_CHECK or len(hold_idx) < MIN_CHECK:
        return None
    check_images = np.random.default_rng(seed + 4).choice(real, n_check, replace=False)
    fit_real = np.setdiff1d(real, check_images)
    # the fit: the fit samples that hold no check image (a blend of one would tell it what the
    # check holds) and fresh blends; the check: fresh blends of the check images, points that
    # neither the layer-wise refits (which fit the check images themselves, and would be favoured
    # on them) nor the tuning have seen
    fresh, fresh_idx = cal.with_mixtures(fit_real, BLENDS * len(fit_real), seed + 6)
    checks, check_idx = cal.with_mixtures(check_images, CHECK_BLENDS * n_check, seed + 7)
    parts = [(cal, fit_idx[~np.isin(cal.sources(fit_idx), check_images).any(axis=1)]),
             (fresh, fresh_idx), (checks, check_idx)]
    g = GraphView(pruned, tensor_shapes(pruned, cal))
    tail = find_tail(g, sum(len(idx) for _, idx in parts))
    if tail is None:
        return None
    x = np.concatenate([_gather(pruned, tail.input, c, idx, batch, provider) for c, idx in parts])
    y = np.concatenate([_gather(original, tail.output, c, idx, batch, provider) for c, idx in parts])
    # blends are not images: the one choice they make, the held-out images confirm
    confirm = (_gather(pruned, tail.input, cal, hold_idx, batch, provider),
               _gather(original, tail.output, cal, hold_idx, batch, provider))
    result = tune_tail(tail, x, y, np.arange(len(x) - len(check_idx), len(x)), seed, confirm)
    if result.kept:
        for layer in tail.weighted:
            layer.store()
        g.drop_unused_initializers()
    return result


def _gather(model: onnx.ModelProto, name: str, cal: Calibration, idx: np.ndarray, batch: int,
            provider: str) -> np.ndarray:
    """``model``'s tensor ``name`` on the samples ``idx``, in their order."""
    return np.concatenate([values[name].astype(np.float32, copy=False)
                           for _, values in run_batches(model, [name], cal, idx, batch, provider)])
