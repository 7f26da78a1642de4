"""2:4 semi-structured sparsity of the pruned model's Conv/Gemm/MatMul weights, chosen and
compensated with calibration statistics (not by magnitude alone).

TensorRT's sparse kernels need, for every output channel and kernel position, at most two non-zero
weights in each run of four consecutive input channels. Layers go sparse front to back, as in
SparseGPT: each layer's input statistics come from the model *as sparsified so far* (carried with a
:class:`~onnxprune.frontier.Frontier`, one segment per layer), while its target stays the dense
pruned model's outputs on the same images and positions, so every layer also makes up for the error
its predecessors left: ``min ‖X_dense w_dense − X_sparse,K w_K‖²`` over the kept columns ``K``,
solved exactly per output channel from ``X_sᵀX_s`` and ``X_sᵀX_d``.

Which 2 of each run of 4 are kept: both SparseGPT's OBS choice (columns taken a run at a time in the
inverse-Hessian order, each run pruned where ``w²/[H⁻¹]_jj`` is least, the later columns updated to
make up for it) and the first-order ``|w|·‖x‖`` score are refit, and the one closer to the dense
outputs wins.

Left dense, with the reason: layers whose input channels are not a multiple of 4 or fewer than
:data:`MIN_CHANNELS`, grouped/depthwise convs, convs on 1×1 maps, and layers whose 2:4 form *adds*
more than :data:`MAX_LAYER_ERROR` (relative to the dense outputs) to the error the layer already
has from its sparse predecessors. A layer left dense is still refit to the dense outputs on its
(sparse-fed) inputs, so the compensation goes on past it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .activations import DEFAULT_BATCH
from .calib import Calibration
from .frontier import Frontier
from .graphview import GraphView
from .ops import LinearHandler, handler_for

MIN_CHANNELS = 16  # narrower layers gain nothing from sparse kernels (and lose the most accuracy)
POSITIONS_PER_IMAGE = 16  # patches sampled per image for each layer's statistics
RIDGE = 1e-4  # relative to the mean diagonal of XᵀX: keeps rank-poor solves stable
SHRINK = 1.0  # times columns / samples: the ridge towards the dense weights (see shrinkage)
# A layer whose 2:4 form adds more than this (relative, on top of the error its inputs already carry)
# to its outputs stays dense: narrow 1×1 convs of mobile networks cannot be compensated well enough,
# and such errors compound through depth.
MAX_LAYER_ERROR = 0.15


@dataclass
class SparseLayer:
    """One layer's outcome: made 2:4 sparse (``skipped`` empty) or left dense, and why."""

    node: str
    op_type: str
    in_channels: int
    skipped: str = ""
    error: float | None = None  # relative output error the 2:4 form adds on the sparse model's inputs
    inherited: float | None = None  # relative output error of the refit dense layer on those inputs
    mask: str = ""  # which mask won: "obs" or "wanda"


@dataclass
class LayerStats:
    """Second moments of a layer's input patches (augmented with a ones column for the bias):
    ``hessian = X_sᵀX_s`` on the model sparsified so far, ``cross = X_sᵀX_d`` with the dense model's
    patches at the same images and positions, and ``dense = X_dᵀX_d``."""

    hessian: np.ndarray
    cross: np.ndarray
    dense: np.ndarray
    samples: int

    def relative_error(self, dense_w: np.ndarray, new_w: np.ndarray) -> float:
        """‖X_d w_dense − X_s w_new‖ / ‖X_d w_dense‖ over all output channels (``[Cout, D+1]``
        weights with the bias last)."""
        energy = float(np.sum((dense_w @ self.dense) * dense_w))
        err = energy - 2 * float(np.sum((new_w @ self.cross) * dense_w)) + float(np.sum((new_w @ self.hessian) * new_w))
        return float(np.sqrt(max(err, 0.0) / max(energy, 1e-30)))


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


def _ridge(gram: np.ndarray, d: int, ridge: float) -> float:
    return ridge * float(np.mean(np.diag(gram)[:d])) + 1e-12


def _ridged(gram: np.ndarray, d: int, ridge: float = RIDGE) -> np.ndarray:
    a = gram.copy()
    a[np.arange(d), np.arange(d)] += _ridge(gram, d, ridge)
    return a


def shrinkage(columns: int, samples: int) -> float:
    """The ridge (relative to the mean diagonal of ``XᵀX``) pulling a refit towards the dense
    weights: stronger where the samples hardly outnumber the columns (a Gemm sees one row per
    image), where an unshrunk fit would learn the calibration set's noise."""
    return max(RIDGE, SHRINK * columns / max(samples, 1))


def mask_2_4_obs(weight: np.ndarray, hessian: np.ndarray, kernel: int, bias_last: bool = False,
                 ridge: float = RIDGE) -> np.ndarray:
    """SparseGPT's 2:4 choice: ``weight`` (``[Cout, D]``, or ``[Cout, D+1]`` with the bias column
    last under ``bias_last``, never pruned) is pruned a run of 4 input channels at a time in the order of the Cholesky factor
    of ``H⁻¹``; in each run the 2 with the least ``w²/[H⁻¹]_jj`` (the optimal-brain-surgeon cost)
    go, and the columns not yet processed absorb the error."""
    cout, cols = weight.shape
    d = cols - 1 if bias_last else cols
    cin = d // kernel
    # columns regrouped so that each run of 4 channels (at one kernel position) is contiguous
    perm = np.arange(d).reshape(cin // 4, 4, kernel).transpose(0, 2, 1).reshape(-1)
    order = np.concatenate([perm, np.arange(d, cols)])
    h = _ridged(hessian[np.ix_(order, order)], d, ridge)
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H⁻¹ = UᵀU
    except np.linalg.LinAlgError:
        return mask_2_4(weight[:, :d], np.sqrt(np.maximum(np.diag(hessian)[:d], 0)), kernel)
    w = weight[:, order].copy()
    keep = np.ones((cout, d), dtype=bool)
    diag = np.diag(u)
    for start in range(0, d, 4):
        run = slice(start, start + 4)
        score = w[:, run] ** 2 / diag[run][None, :] ** 2
        drop = np.argsort(score, axis=1)[:, :2]
        np.put_along_axis(keep[:, run], drop, False, axis=1)
        for j in range(start, start + 4):
            err = np.where(keep[:, j], 0.0, w[:, j]) / diag[j]
            w[:, j:] -= err[:, None] * u[j, j:][None, :]
    out = np.empty_like(keep)
    out[:, perm] = keep
    return out


def refit_kept(weight: np.ndarray, bias: np.ndarray, gram: np.ndarray, keep: np.ndarray, with_bias: bool,
               cross: np.ndarray | None = None, ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel: the kept weights (and the bias, ``with_bias``) that best reproduce the
    dense outputs. ``gram`` is ``XᵀX`` of the (augmented) inputs the layer will see; ``cross``
    (``XᵀX_dense``, by default ``gram``) pairs them with the inputs the dense outputs came from.
    ``ridge`` (relative to the mean diagonal) pulls the kept weights towards their dense values."""
    d = weight.shape[1]
    dense = np.concatenate([weight, bias[:, None]], axis=1)  # [Cout, D+1] on [X 1]
    a_full = _ridged(gram, d, ridge)
    target = (gram if cross is None else cross) @ dense.T  # [D+1, Cout]: Xᵀ(X_dense w_dense)
    target[:d] += _ridge(gram, d, ridge) * weight.T
    new = np.zeros_like(dense)
    for o in range(weight.shape[0]):
        cols = np.flatnonzero(np.append(keep[o], with_bias))
        try:
            new[o, cols] = np.linalg.solve(a_full[np.ix_(cols, cols)], target[cols, o])
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


def _sparsify_layer(node: onnx.NodeProto, handler: LinearHandler, stats: LayerStats, g: GraphView,
                    layer: SparseLayer, masks: str = "both", refit_dense: bool = True,
                    max_error: float | None = None) -> None:
    """Mask and refit one layer in place, or leave it dense (saying why, and refit to the dense
    outputs on its present inputs) when its 2:4 form adds too much error."""
    w = handler.weight_matrix(node, g)
    kernel = w.shape[1] // layer.in_channels
    b = handler.bias(node, g)
    bias = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
    d, with_bias = w.shape[1], handler.has_bias
    dense = np.concatenate([w, bias[:, None]], axis=1)
    cols = d + 1 if with_bias else d
    # the best dense weights on the present inputs: the floor that no 2:4 form goes under
    ridge = shrinkage(d, stats.samples)
    best = np.zeros_like(dense)
    rhs = (stats.cross @ dense.T)[:cols]
    rhs[:d] += _ridge(stats.hessian, d, ridge) * w.T
    try:
        best[:, :cols] = np.linalg.solve(_ridged(stats.hessian[:cols, :cols], d, ridge), rhs).T
    except np.linalg.LinAlgError:
        best = dense.copy()
    layer.inherited = stats.relative_error(dense, best)
    candidates = []
    if masks in ("both", "wanda"):
        candidates.append(("wanda", mask_2_4(w, np.sqrt(np.maximum(np.diag(stats.hessian)[:d], 0)), kernel)))
    if masks in ("both", "obs"):
        candidates.append(("obs", mask_2_4_obs(best[:, :cols], stats.hessian[:cols, :cols], kernel, with_bias, ridge)))
    tried = []
    for name, keep in candidates:
        new_w, new_b = refit_kept(w, bias, stats.hessian, keep, with_bias, stats.cross, ridge)
        new_w[~keep] = 0.0
        tried.append((stats.relative_error(dense, np.concatenate([new_w, new_b[:, None]], axis=1)), name, new_w, new_b))
    total, layer.mask, new_w, new_b = min(tried, key=lambda t: t[0])
    layer.error = float(np.sqrt(max(total ** 2 - layer.inherited ** 2, 0.0)))
    bound = MAX_LAYER_ERROR if max_error is None else max_error
    if layer.error > bound:
        layer.skipped = f"2:4 would put its outputs off by {layer.error:.2f} more (above {bound:.2f})"
        layer.mask = ""
        if not refit_dense or layer.inherited >= stats.relative_error(dense, dense):
            return
        new_w, new_b = best[:, :d], best[:, d]
    handler.set_linear(node, new_w.astype(np.float32), new_b.astype(np.float32) if with_bias else None, g)


def _layer_stats(node: onnx.NodeProto, handler: LinearHandler, g: GraphView, dense: Frontier,
                 sparse: Frontier | None, position: int, rng: np.random.Generator) -> LayerStats:
    """Statistics of one layer's input patches from the dense and the sparsified model, over the
    same images and positions (``sparse`` None: the dense model's on both sides)."""
    inp = node.input[0]
    runs = dense.run([inp], advance_to=position)
    pairs = zip(runs, sparse.run([inp], advance_to=position)) if sparse is not None else ((r, r) for r in runs)
    per = handler.positions(node, g)
    h = c = dd = 0.0
    n = 0
    for (_, xd), (_, xs) in pairs:
        pos = rng.integers(0, per, size=(xd[inp].shape[0], min(per, POSITIONS_PER_IMAGE)))
        pd = handler.sample_patches(node, g, xd[inp], pos).astype(np.float64)
        pd = np.concatenate([pd, np.ones((len(pd), 1))], axis=1)
        if sparse is None:
            ps = pd
        else:
            ps = handler.sample_patches(node, g, xs[inp], pos).astype(np.float64)
            ps = np.concatenate([ps, np.ones((len(ps), 1))], axis=1)
        n += len(ps)
        h = h + ps.T @ ps
        c = c + ps.T @ pd
        dd = dd + (pd.T @ pd if sparse is not None else 0.0)
    return LayerStats(h, c, dd if sparse is not None else h, n)


def sparsify_2_4(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], calib: Calibration,
                 indices: Sequence[int], batch: int | None = None, provider: str = "cpu", seed: int = 0,
                 sequential: bool = True, masks: str = "both", refit_dense: bool = True,
                 max_error: float | None = None) -> tuple[onnx.ModelProto, list[SparseLayer]]:
    """A copy of ``model`` whose eligible Conv/Gemm/MatMul weights are 2:4 sparse, each layer refit
    to the dense model's outputs on the calibration samples ``indices``. ``sequential``: each
    layer's inputs are those of the model sparsified so far (else the dense model's); ``masks``:
    "both" (the better of the two per layer), "obs" or "wanda"; ``refit_dense``: layers left dense
    are refit too (only with ``sequential``, where their inputs change); ``max_error``: the bound
    on the error a layer's 2:4 form may add (default :data:`MAX_LAYER_ERROR`)."""
    source, model = model, onnx.ModelProto()
    model.CopyFrom(source)
    g = GraphView(model, shapes)
    layers = [(i, node, handler_for(node)) for i, node in enumerate(g.graph.node)
              if node.op_type in ("Conv", "Gemm", "MatMul") and isinstance(handler_for(node), LinearHandler)
              and g.input_const(node, 1) is not None]
    results = [SparseLayer(node.name or node.output[0], node.op_type, _in_channels(node, g), _why_dense(node, h, g))
               for _, node, h in layers]
    rng = np.random.default_rng(seed)
    todo = [(i, node, h, layer) for (i, node, h), layer in zip(layers, results) if not layer.skipped]
    if todo:
        bs = batch or DEFAULT_BATCH
        with Frontier(source, calib, indices, bs, provider=provider) as dense, \
                Frontier(model, calib, indices, bs, provider=provider) as carried:
            for position, node, handler, layer in todo:
                stats = _layer_stats(node, handler, g, dense, carried if sequential else None, position, rng)
                _sparsify_layer(node, handler, stats, g, layer, masks, refit_dense and sequential, max_error)
    g.drop_unused_initializers()
    return model, results
