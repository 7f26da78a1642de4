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

Big layers: where the ``(D+1)²`` Gram matrices would pass :data:`MAX_GRAM_COLUMNS` columns they are
not built: the mask is ``|w|·‖x‖`` from per-column norms, nothing is refit, and the layer's added
error is measured in a second pass over the same batches and positions. Where the Gram matrices fit
but the exact per-channel refit (``Cout`` solves of size ``D/2``) would pass :data:`MAX_REFIT_FLOPS`,
each mask is compensated by SparseGPT's own OBS update of the later columns instead. The report's
``mask`` says which path a layer took.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .activations import DEFAULT_BATCH
from .calib import Calibration
from .frontier import Frontier
from .graph import shared_weight
from .graphview import GraphView, node_name
from .ops import LinearHandler, handler_for

MIN_CHANNELS = 16  # narrower layers gain nothing from sparse kernels (and lose the most accuracy)
POSITIONS_PER_IMAGE = 16  # patches sampled per image for each layer's statistics
RIDGE = 1e-4  # relative to the mean diagonal of XᵀX: keeps rank-poor solves stable
SHRINK = 1.0  # times columns / samples: the ridge towards the dense weights (see shrinkage)
# A layer whose 2:4 form adds more than this (relative, on top of the error its inputs already carry)
# to its outputs stays dense: narrow 1×1 convs of mobile networks cannot be compensated well enough,
# and such errors compound through depth.
MAX_LAYER_ERROR = 0.15
# Above this many columns (D+1) a layer's Gram matrices (8 B·(D+1)² each, 0.5 GB at 8192) are not
# built: |w|·‖x‖ mask from per-column norms, no refit, its error measured in a second pass.
MAX_GRAM_COLUMNS = 8192
# Above this many flops (Cout·(D/2)³/3) the exact per-channel refit of the kept weights is not run:
# each mask is compensated by the OBS update of the later columns instead (SparseGPT's own).
MAX_REFIT_FLOPS = 1e11
OBS_BLOCK = 128  # columns per lazy block of the OBS sweep (a multiple of 4): one matmul per block


@dataclass
class SparseLayer:
    """One layer's outcome: made 2:4 sparse (``skipped`` empty) or left dense, and why."""

    node: str
    op_type: str
    in_channels: int
    skipped: str = ""
    error: float | None = None  # relative output error the 2:4 form adds on the sparse model's inputs
    inherited: float | None = None  # relative output error of the refit dense layer on those inputs
    mask: str = ""  # which mask won: "obs" or "wanda", with the path in brackets on big layers


@dataclass
class PatchMoments:
    """Second moments of a layer's input patches (augmented with a ones column for the bias):
    ``hessian = X_sᵀX_s`` on the model sparsified so far and ``cross = X_sᵀX_d`` with the dense
    model's patches at the same images and positions (the very array ``hessian`` where both sides
    are the dense model's), with the dense weights ``weights`` (``[Cout, D+1]``, bias last) and
    their output energy ``‖X_d w_dense‖²``."""

    hessian: np.ndarray
    cross: np.ndarray
    weights: np.ndarray
    energy: float
    samples: int

    def relative_error(self, new_w: np.ndarray) -> float:
        """‖X_d w_dense − X_s w_new‖ / ‖X_d w_dense‖ over all output channels (``[Cout, D+1]``
        weights with the bias last)."""
        err = (self.energy - 2 * float(np.sum((new_w @ self.cross) * self.weights))
               + float(np.sum((new_w @ self.hessian) * new_w)))
        return float(np.sqrt(max(err, 0.0) / max(self.energy, 1e-30)))


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


# The ridge's scale, ``ridge × mean diagonal`` of the inputs' Gram matrix, is also that of
# reconstruct.py (``_ridge_scale``); that one is private there and falls back to 1 where the
# diagonal's mean is 0 (here: a 1e-12 floor), so it is not shared.
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


def obs_2_4(weight: np.ndarray, hessian: np.ndarray, kernel: int, bias_last: bool = False,
            ridge: float = RIDGE, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """SparseGPT's OBS sweep for 2:4: ``weight`` (``[Cout, D]``, or ``[Cout, D+1]`` with the bias
    column last under ``bias_last``, never pruned) is pruned a run of 4 input channels at a time in
    the order of the Cholesky factor of ``H⁻¹``; in each run the 2 with the least ``w²/[H⁻¹]_jj``
    (the optimal-brain-surgeon cost) go — or those ``keep`` (``[Cout, D]``) drops, where given —
    and the columns not yet processed absorb the error. Updates are lazy: per column inside blocks
    of :data:`OBS_BLOCK` columns, one matmul per block for the columns after it.

    Returns (the kept mask ``[Cout, D]``, the updated weights ``[Cout, cols]`` with the dropped ones
    0), or None where the ridged ``H`` is not positive definite."""
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
        return None
    wt = np.ascontiguousarray(weight[:, order].T)  # [cols, Cout]: a column of w is a row here
    kept = np.ascontiguousarray(keep[:, perm].T) if keep is not None else np.ones((d, cout), dtype=bool)
    diag = np.diag(u)
    block = max(4, OBS_BLOCK - OBS_BLOCK % 4)
    for b0 in range(0, d, block):
        b1 = min(b0 + block, d)
        err = np.zeros((b1 - b0, cout))
        for start in range(b0, b1, 4):
            run = slice(start, start + 4)
            if keep is None:
                score = wt[run] ** 2 / diag[run][:, None] ** 2
                drop = np.argsort(score, axis=0)[:2]
                np.put_along_axis(kept[run], drop, False, axis=0)
            for j in range(start, start + 4):
                e = np.where(kept[j], 0.0, wt[j]) / diag[j]
                wt[j:b1] -= u[j, j:b1][:, None] * e[None, :]
                err[j - b0] = e
        if b1 < cols:
            wt[b1:] -= u[b0:b1, b1:].T @ err
    out_keep = np.empty((cout, d), dtype=bool)
    out_keep[:, perm] = kept.T
    new = np.empty_like(wt.T)
    new[:, order] = wt.T
    new[:, :d][~out_keep] = 0.0
    return out_keep, new


def mask_2_4_obs(weight: np.ndarray, hessian: np.ndarray, kernel: int, bias_last: bool = False,
                 ridge: float = RIDGE) -> np.ndarray:
    """The kept mask of :func:`obs_2_4` (``|w|·‖x‖`` where ``H`` is not positive definite)."""
    d = weight.shape[1] - 1 if bias_last else weight.shape[1]
    result = obs_2_4(weight, hessian, kernel, bias_last, ridge)
    if result is None:
        return mask_2_4(weight[:, :d], np.sqrt(np.maximum(np.diag(hessian)[:d], 0)), kernel)
    return result[0]


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


def _why_dense(node: onnx.NodeProto, handler: LinearHandler, g: GraphView) -> str:
    """Why a layer stays dense before any statistics ('' when it may go sparse)."""
    if not handler.semi_structured:
        return f"no 2:4 sparse kernels for {node.op_type}"
    if not handler.reconstructable(node, g):
        return "grouped or depthwise conv, or unknown shapes"
    if shared_weight(node, g):  # masked and refit node by node, each would get a copy of its own
        return "its weight is shared with other nodes"
    cin = handler.input_channels(node, g)
    if cin % 4:
        return f"{cin} input channels are not a multiple of 4"
    if cin < MIN_CHANNELS:
        return f"{cin} input channels: too narrow to gain"
    if handler.spatial and handler.positions(node, g) == 1:
        return "a conv on a 1×1 map (squeeze-excite): too little compute to gain"
    return ""


def _sparsify_layer(node: onnx.NodeProto, handler: LinearHandler, stats: PatchMoments, g: GraphView,
                    layer: SparseLayer, masks: str = "both", refit_dense: bool = True,
                    max_error: float | None = None) -> None:
    """Mask and refit one layer in place, or leave it dense (saying why, and refit to the dense
    outputs on its present inputs) when its 2:4 form adds too much error."""
    dense = stats.weights
    d, with_bias = dense.shape[1] - 1, handler.has_bias
    w, bias = dense[:, :d], dense[:, d]
    kernel = d // layer.in_channels
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
    layer.inherited = stats.relative_error(best)
    flops = w.shape[0] * (d // 2 + with_bias) ** 3 / 3  # Cout Cholesky solves of the kept columns
    exact = flops <= MAX_REFIT_FLOPS
    hessian = stats.hessian[:cols, :cols]
    candidates = []  # (name, kept mask, OBS-updated weights [Cout, cols] or None)
    if masks in ("both", "wanda"):
        candidates.append(("wanda", mask_2_4(w, np.sqrt(np.maximum(np.diag(stats.hessian)[:d], 0)), kernel), None))
    if masks in ("both", "obs"):
        swept = obs_2_4(best[:, :cols], hessian, kernel, with_bias, ridge)
        if swept is None:
            candidates.append(("obs", mask_2_4(w, np.sqrt(np.maximum(np.diag(stats.hessian)[:d], 0)), kernel), None))
        else:
            candidates.append(("obs", *swept))
    tried = []
    for name, keep, swept_w in candidates:
        if exact:
            new_w, new_b = refit_kept(w, bias, stats.hessian, keep, with_bias, stats.cross, ridge)
        else:  # SparseGPT's compensation: the OBS update of the later columns for this mask
            if swept_w is None:
                again = obs_2_4(best[:, :cols], hessian, kernel, with_bias, ridge, keep=keep)
                swept_w = again[1] if again is not None else best[:, :cols]  # masked below
            new_w, new_b = swept_w[:, :d].copy(), (swept_w[:, d] if with_bias else np.zeros_like(bias))
            name = f"{name} (OBS update, no exact refit: {flops:.1e} flops)"
        new_w[~keep] = 0.0
        tried.append((stats.relative_error(np.concatenate([new_w, new_b[:, None]], axis=1)), name, new_w, new_b))
    total, layer.mask, new_w, new_b = min(tried, key=lambda t: t[0])
    layer.error = float(np.sqrt(max(total ** 2 - layer.inherited ** 2, 0.0)))
    bound = MAX_LAYER_ERROR if max_error is None else max_error
    if layer.error > bound:
        layer.skipped = f"2:4 would put its outputs off by {layer.error:.2f} more (above {bound:.2f})"
        layer.mask = ""
        if not refit_dense or layer.inherited >= stats.relative_error(dense):
            return
        new_w, new_b = best[:, :d], best[:, d]
    handler.set_linear(node, new_w.astype(np.float32), new_b.astype(np.float32) if with_bias else None, g)


def _paired(inp: str, dense: Frontier, sparse: Frontier | None, advance_to: int | None = None
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``inp``'s values batch by batch from the dense and the sparsified model (``sparse`` None:
    the dense model's on both sides). Both runs are taken to their end, so that both frontiers'
    cuts move to ``advance_to``."""
    runs = dense.run([inp], advance_to=advance_to)
    if sparse is None:
        for _, xd in runs:
            yield xd[inp], xd[inp]
        return
    other = sparse.run([inp], advance_to=advance_to)
    for _, xd in runs:
        _, xs = next(other)
        yield xd[inp], xs[inp]
    for _ in other:  # runs past the last batch: the step that moves the sparse frontier's cut
        raise RuntimeError("the dense and sparse frontiers batch the samples differently")


def _augmented(patches: np.ndarray) -> np.ndarray:
    """``[X 1]`` in float64."""
    out = np.empty((patches.shape[0], patches.shape[1] + 1))
    out[:, :-1] = patches
    out[:, -1] = 1.0
    return out


def _draw(node: onnx.NodeProto, handler: LinearHandler, g: GraphView, images: int,
          rng: np.random.Generator) -> np.ndarray:
    per = handler.positions(node, g)
    return rng.integers(0, per, size=(images, min(per, POSITIONS_PER_IMAGE)))


def _layer_stats(node: onnx.NodeProto, handler: LinearHandler, g: GraphView, dense: Frontier,
                 sparse: Frontier | None, position: int, rng: np.random.Generator,
                 weights: np.ndarray) -> PatchMoments:
    """Statistics of one layer's input patches from the dense and the sparsified model, over the
    same images and positions (``sparse`` None: the dense model's on both sides), with the dense
    output energy of ``weights`` (``[Cout, D+1]``, bias last). Both frontiers' cuts move to
    ``position``."""
    cols = weights.shape[1]
    h = np.zeros((cols, cols))
    c = h if sparse is None else np.zeros((cols, cols))
    energy, n = 0.0, 0
    for xd, xs in _paired(node.input[0], dense, sparse, position):
        pos = _draw(node, handler, g, xd.shape[0], rng)
        pd = _augmented(handler.sample_patches(node, g, xd, pos))
        ps = pd if sparse is None else _augmented(handler.sample_patches(node, g, xs, pos))
        n += len(ps)
        h += ps.T @ ps
        if c is not h:
            c += ps.T @ pd
        energy += float(np.sum(np.square(pd @ weights.T)))
    return PatchMoments(h, c, weights, energy, n)


def _sparsify_wide(node: onnx.NodeProto, handler: LinearHandler, g: GraphView, dense: Frontier,
                   sparse: Frontier | None, position: int, rng: np.random.Generator, layer: SparseLayer,
                   w: np.ndarray, bias: np.ndarray, max_error: float | None = None) -> None:
    """A layer too wide for Gram matrices (above :data:`MAX_GRAM_COLUMNS`): the ``|w|·‖x‖`` mask
    from per-column norms of its sparse-fed inputs, no refit; its errors measured in a second pass
    over the same batches and positions (the first moved both cuts to the layer: the second only
    reads carried values). Left as it is where the 2:4 form adds too much error. ``inherited`` is
    here the error of the dense weights unrefit; ``masks`` does not apply (OBS needs ``H⁻¹``)."""
    inp, d = node.input[0], w.shape[1]
    kernel = d // layer.in_channels
    sq, draws = np.zeros(d), []
    for xd, xs in _paired(inp, dense, sparse, position):
        pos = _draw(node, handler, g, xd.shape[0], rng)
        draws.append(pos)
        ps = handler.sample_patches(node, g, xs, pos).astype(np.float64)
        sq += np.einsum("ij,ij->j", ps, ps)
    keep = mask_2_4(w, np.sqrt(sq), kernel)
    new_w = np.where(keep, w, 0.0)
    energy = inherited = total = 0.0
    pending = iter(draws)
    for xd, xs in _paired(inp, dense, sparse):
        pos = next(pending)
        pd = handler.sample_patches(node, g, xd, pos).astype(np.float64)
        ps = pd if sparse is None else handler.sample_patches(node, g, xs, pos).astype(np.float64)
        yd = pd @ w.T + bias
        ys = yd if sparse is None else ps @ w.T + bias
        energy += float(np.sum(np.square(yd)))
        inherited += float(np.sum(np.square(yd - ys)))
        total += float(np.sum(np.square(yd - (ps @ new_w.T + bias))))
    energy = max(energy, 1e-30)
    layer.inherited = float(np.sqrt(inherited / energy))
    layer.error = float(np.sqrt(max(total - inherited, 0.0) / energy))
    layer.mask = f"wanda (no refit: {d + 1} columns)"
    bound = MAX_LAYER_ERROR if max_error is None else max_error
    if layer.error > bound:
        layer.skipped = (f"2:4 would put its outputs off by {layer.error:.2f} more (above {bound:.2f}); "
                         f"not refit: {d + 1} columns")
        layer.mask = ""
        return
    handler.set_linear(node, new_w.astype(np.float32), bias.astype(np.float32) if handler.has_bias else None, g)


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
              if isinstance(handler_for(node), LinearHandler)
              and g.input_const(node, 1) is not None]
    results = [SparseLayer(node_name(node), node.op_type, h.input_channels(node, g), _why_dense(node, h, g))
               for _, node, h in layers]
    rng = np.random.default_rng(seed)
    todo = [(i, node, h, layer) for (i, node, h), layer in zip(layers, results) if not layer.skipped]
    if todo:
        bs = batch or DEFAULT_BATCH
        with Frontier(source, calib, indices, bs, provider=provider) as dense, \
                Frontier(model, calib, indices, bs, provider=provider) as carried:
            for position, node, handler, layer in todo:
                w = handler.weight_matrix(node, g)
                b = handler.bias(node, g)
                bias = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
                sparse = carried if sequential else None
                if w.shape[1] + 1 > MAX_GRAM_COLUMNS:
                    _sparsify_wide(node, handler, g, dense, sparse, position, rng, layer, w, bias, max_error)
                    continue
                weights = np.concatenate([w, bias[:, None]], axis=1)
                del w
                stats = _layer_stats(node, handler, g, dense, sparse, position, rng, weights)
                _sparsify_layer(node, handler, stats, g, layer, masks, refit_dense and sequential, max_error)
                del stats
    g.drop_unused_initializers()
    return model, results
