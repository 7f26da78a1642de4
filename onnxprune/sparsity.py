"""2:4 semi-structured sparsity of the pruned model's Conv/Gemm/MatMul weights, chosen and
compensated with calibration statistics (not by magnitude alone).

TensorRT's sparse kernels need, for every output channel and kernel position, at most two non-zero
weights in each run of four consecutive input channels. For each such run the two weights kept are
those whose removal costs least on the calibration inputs (``|w|·‖x‖``, the first-order OBS/Wanda
score), and then every output channel's kept weights (and bias) are refit by least squares to the
dense layer's outputs: ``min ‖X w_dense − X_K w_K‖²`` over the kept columns ``K``, from the Gram
matrix ``XᵀX`` of the layer's input patches — the compensation SparseGPT makes, solved exactly.
Layers whose input channels are not a multiple of 4 or fewer than :data:`MIN_CHANNELS`, convs on
1×1 maps, and layers whose refit 2:4 form stays further than :data:`MAX_LAYER_ERROR` from their dense
outputs are left dense and listed with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .activations import run_batches
from .calib import Calibration
from .graphview import GraphView
from .ops import LinearHandler, handler_for

MIN_CHANNELS = 16  # narrower layers gain nothing from sparse kernels (and lose the most accuracy)
POSITIONS_PER_IMAGE = 16  # patches sampled per image for each layer's Gram matrix
RIDGE = 1e-4  # relative to the mean diagonal of XᵀX: keeps rank-poor solves stable
# A layer whose 2:4 form, even refit, is further than this from its dense outputs stays dense: such
# errors compound through depth (narrow 1×1 convs of mobile networks reach 0.15–0.3 each, and
# mobilenet_fmnist lost 13 points with all of them sparse).
MAX_LAYER_ERROR = 0.10


@dataclass
class SparseLayer:
    """One layer's outcome: made 2:4 sparse (``skipped`` empty) or left dense, and why."""

    node: str
    op_type: str
    in_channels: int
    skipped: str = ""
    error: float | None = None  # relative output error of the sparse layer on its own inputs


def satisfies_2_4(weight: np.ndarray, kernel: int) -> bool:
    """Whether a ``[Cout, Cin·k]`` (channel-major) weight has at most 2 non-zeros per run of 4 input
    channels at every output channel and kernel position."""
    cout, cols = weight.shape
    cin = cols // kernel
    runs = (weight.reshape(cout, cin // 4, 4, kernel) != 0).sum(axis=2)
    return bool((runs <= 2).all())


def mask_2_4(weight: np.ndarray, col_norm: np.ndarray, kernel: int) -> np.ndarray:
    """Keep the 2 of every 4 input channels (per output channel and kernel position) with the
    largest ``|w|·‖x‖``."""
    cout, cols = weight.shape
    score = (np.abs(weight) * col_norm[None, :]).reshape(cout, cols // kernel // 4, 4, kernel)
    order = np.argsort(score, axis=2)  # ascending: the last two are kept
    keep = np.zeros_like(score, dtype=bool)
    np.put_along_axis(keep, order[:, :, 2:, :], True, axis=2)
    return keep.reshape(cout, cols)


def refit_kept(weight: np.ndarray, bias: np.ndarray, gram: np.ndarray, keep: np.ndarray, with_bias: bool
           ) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel: the kept weights (and the bias, ``with_bias``) that best reproduce the
    dense outputs."""
    d = weight.shape[1]
    dense = np.concatenate([weight, bias[:, None]], axis=1)  # [Cout, D+1] on [X 1]
    ridge = RIDGE * float(np.mean(np.diag(gram)[:d])) + 1e-12
    target = gram @ dense.T  # [D+1, Cout]: Xᵀ(X w_dense)
    new = np.zeros_like(dense)
    for o in range(weight.shape[0]):
        kept = np.flatnonzero(keep[o])
        cols = np.append(kept, d) if with_bias else kept
        a = gram[np.ix_(cols, cols)].copy()
        a[np.arange(len(kept)), np.arange(len(kept))] += ridge
        try:
            new[o, cols] = np.linalg.solve(a, target[cols, o])
        except np.linalg.LinAlgError:
            new[o, cols] = dense[o, cols]
    return new[:, :d], new[:, d]


def _in_channels(node: onnx.NodeProto, g: GraphView) -> int:
    """Input channels of a layer (a Gemm/MatMul's K: after Flatten, every column counts)."""
    shape = g.shape(node.input[0]) or (0, 0)
    return int(shape[1] if node.op_type == "Conv" else shape[-1])


def _why_dense(node: onnx.NodeProto, handler: LinearHandler, g: GraphView) -> str:
    """Why a layer stays dense before any statistics ('' when it may go sparse)."""
    if not handler.reconstructable(node, g):
        return "grouped or depthwise conv, or unknown shapes"
    cin = _in_channels(node, g)
    if cin % 4:
        return f"{cin} input channels are not a multiple of 4"
    if cin < MIN_CHANNELS:
        return f"{cin} input channels: too narrow to gain"
    if node.op_type == "Conv" and handler.positions(node, g) == 1:
        return "a conv on a 1×1 map (squeeze-excite): too little compute to gain"
    return ""


def _sparsify_layer(node: onnx.NodeProto, handler: LinearHandler, gram: np.ndarray, g: GraphView,
                    layer: SparseLayer) -> None:
    """Mask and refit one layer in place, or leave it dense (saying why) when the refit stays too far off."""
    w = handler.weight_matrix(node, g)
    kernel = w.shape[1] // layer.in_channels
    b = handler.bias(node, g)
    bias = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
    keep = mask_2_4(w, np.sqrt(np.maximum(np.diag(gram)[:-1], 0)), kernel)
    new_w, new_b = refit_kept(w, bias, gram, keep, handler.has_bias)
    new_w[~keep] = 0.0
    dense = np.concatenate([w, bias[:, None]], axis=1)
    diff = np.concatenate([new_w, new_b[:, None]], axis=1) - dense
    energy = float(np.einsum("ij,jk,ik->", dense, gram, dense))
    layer.error = float(np.sqrt(max(np.einsum("ij,jk,ik->", diff, gram, diff), 0) / max(energy, 1e-30)))
    if layer.error > MAX_LAYER_ERROR:
        layer.skipped = f"2:4 would put its outputs off by {layer.error:.2f} (above {MAX_LAYER_ERROR:.2f})"
    else:
        handler.set_linear(node, new_w.astype(np.float32), new_b.astype(np.float32) if handler.has_bias else None, g)


def sparsify_2_4(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], calib: Calibration,
                 indices: Sequence[int], batch: int | None = None, provider: str = "cpu", seed: int = 0
                 ) -> tuple[onnx.ModelProto, list[SparseLayer]]:
    """A copy of ``model`` whose eligible Conv/Gemm/MatMul weights are 2:4 sparse, each layer refit
    to its dense outputs on the calibration samples ``indices`` (the inputs of the dense model)."""
    source, model = model, onnx.ModelProto()
    model.CopyFrom(source)
    g = GraphView(model, shapes)
    layers = [(node, handler_for(node)) for node in g.graph.node
              if node.op_type in ("Conv", "Gemm", "MatMul") and isinstance(handler_for(node), LinearHandler)
              and g.input_const(node, 1) is not None]
    results = [SparseLayer(node.name or node.output[0], node.op_type, _in_channels(node, g), _why_dense(node, h, g))
               for node, h in layers]
    todo = [(node, h) for (node, h), layer in zip(layers, results) if not layer.skipped]
    grams: dict[str, np.ndarray] = {}  # by the layer's output name
    rng = np.random.default_rng(seed)
    inputs = list(dict.fromkeys(node.input[0] for node, _ in todo))
    if todo:
        for _, acts in run_batches(model, inputs, calib, indices, batch, provider):
            for node, handler in todo:
                x = acts[node.input[0]]
                per = handler.positions(node, g)
                pos = rng.integers(0, per, size=(x.shape[0], min(per, POSITIONS_PER_IMAGE)))
                patches = handler.sample_patches(node, g, x, pos).astype(np.float64)
                aug = np.concatenate([patches, np.ones((len(patches), 1))], axis=1)
                grams[node.output[0]] = grams.get(node.output[0], 0.0) + aug.T @ aug
    for (node, handler), layer in zip(layers, results):
        if not layer.skipped:
            _sparsify_layer(node, handler, grams[node.output[0]], g, layer)
    g.drop_unused_initializers()
    return model, results
