"""Stripe-wise pruning (Meng et al. 2020, "Pruning Filter in Filter"), from calibration data.

A filter ``Cin×K×K`` of a Conv is ``K·K`` *stripes* of length ``Cin``, one per kernel position.
For every ``K×K`` Conv (group 1, ``K·K > 1``) this module

1. **selects** the stripes to keep: a LASSO over the stripes' contributions
   ``z_{o,p} = X_p W[o,:,p]`` to the layer's original output, one ``K·K``-dimensional problem per
   filter ``o`` on the Gram matrix ``G_{pq} = W[o,:,p]ᵀ XᵀX_{p,q} W[o,:,q]`` of the sampled
   patches. The λ is shared by all filters of the layer (the layer objective is the sum of the
   filters' objectives), so stripes are ranked layer-wide by the λ at which they enter their
   filter's LASSO path, and exactly the layer's budget is kept;
2. **refits** each filter's kept stripes by least squares (the ridge and cross-validation of
   :mod:`onnxprune.reconstruct`), batched over the filters sharing one set of kept positions;
3. **emits** a graph that skips the dropped stripes: the input is padded once, then for each
   kernel position that some filter keeps, a strided ``Slice`` (the input shifted by that
   position) feeds a ``1×1`` Conv producing only the filters that keep it; the per-position
   outputs are concatenated (plus one zero channel), and ``m`` ``Gather``\\s (``m`` = most stripes
   any filter keeps) pick each filter's j-th stripe output, a ``Sum`` adds them and an ``Add``
   puts the bias back. Its MACs are exactly ``kept stripes × Cin × Hout·Wout``.

   Where that form measures slower on the ONNX Runtime provider than the dense conv (tiny
   feature maps, where per-node overhead dominates), the dense conv is kept, with the refit
   weights and the dropped stripes zeroed (same outputs, dense MACs); the report lists those
   layers and the two latencies.

The budget: every eligible layer keeps the same fraction of its stripes, the one that brings the
model's MACs down by ``--speedup`` if every layer were emitted in stripe form ("stripe MACs").
The report gives both the stripe MACs and the true MACs of the written graph.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from threadpoolctl import threadpool_limits

from .activations import batch_size_for, fitting_batch
from .budget import count_params, graph_macs
from .errors import NothingToPrune, OptionError, TargetNotMetError
from .graph import Consumer, shared_weight
from .graphview import GraphView, attr, node_name
from .io import default_opset, model_bytes
from .latency import measure
from .ops import LinearHandler, handler_for
from .ops.conv import conv_pads
from .reconstruct import refit
from .options import PruneResult
from .report import GroupResult, LayerRow, Report, Totals
from .rewrite import finalize
from .sampling import Sampler
from .stats import LayerStats
from .summary import model_macs
from .verify import compare

log = logging.getLogger(__name__)

INT64_MAX = np.iinfo(np.int64).max


# ---------------------------------------------------------------------------------------------
# selection


def stripe_problem(xtx: np.ndarray, xt_target: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-filter Gram matrices ``[Cout, P, P]`` and correlations ``[Cout, P]`` of the stripes'
    contributions ``z_{o,p} = X_p W[o,:,p]`` (``P = K·K`` kernel positions).

    ``xtx`` is ``XᵀX [D, D]`` of the input patches (column ``c·P + p``), ``xt_target`` is
    ``XᵀT [D, Cout]`` with T the target (output minus bias), ``weight`` is ``[Cout, Cin, kh, kw]``.
    """
    cout, cin = weight.shape[:2]
    p = int(np.prod(weight.shape[2:]))
    w = weight.reshape(cout, cin, p).astype(np.float64)
    x4 = xtx.reshape(cin, p, cin, p)
    gram = np.einsum("ocp,cpdq,odq->opq", w, x4, w, optimize=True)
    corr = np.einsum("ocp,cpo->op", w, xt_target.reshape(cin, p, cout))
    return gram, corr


LAMBDA_STEPS = 40  # λ grid of the batched LASSO path, geometric over four decades
CD_SWEEPS = 8  # coordinate-descent sweeps per λ (warm-started; P = K·K unknowns per filter)


def entry_strengths(gram: np.ndarray, corr: np.ndarray) -> np.ndarray:
    """``[Cout, P]``: the λ at which each stripe enters its filter's LASSO path
    (``min ½βᵀGβ − bᵀβ + λ‖β‖₁``, G and b of :func:`stripe_problem`), −1 where it never does.
    One scale for the whole layer, so the values compare across filters (a shared λ).

    All filters are solved at once: coordinate descent, vectorised over the filters, down a
    geometric λ grid with warm starts. A stripe entering between two grid points gets a value
    between them, higher the larger its contribution there, so ties are rare."""
    cout, p = corr.shape
    scale = float(np.einsum("opp->", gram)) / max(cout * p, 1) or 1.0
    g, b = gram / scale, corr / scale
    diag = np.maximum(np.einsum("opp->op", g), 1e-12)
    top = float(np.abs(b).max()) if b.size else 0.0
    entry = np.full((cout, p), -1.0)
    if top <= 0:
        return entry
    lambdas = top * np.geomspace(1.0, 1e-4, LAMBDA_STEPS)
    beta = np.zeros((cout, p))
    previous = top * 1.0001
    for lam in lambdas:
        for _ in range(CD_SWEEPS):
            for q in range(p):
                r = b[:, q] - np.einsum("op,op->o", g[:, q, :], beta) + diag[:, q] * beta[:, q]
                beta[:, q] = np.sign(r) * np.maximum(np.abs(r) - lam, 0.0) / diag[:, q]
        size = np.abs(beta) * np.sqrt(diag)
        new = (beta != 0) & (entry < 0)
        if new.any():
            share = size[new] / (size[new].max() * 1.0001)
            entry[new] = lam + (previous - lam) * share
        previous = lam
    return entry


def select_stripes(gram: np.ndarray, corr: np.ndarray, keep: int) -> np.ndarray:
    """Boolean mask ``[Cout, P]`` of the ``keep`` stripes kept: the first to enter the layer's
    LASSO path (shared λ), ties (never entering) broken by each stripe's own contribution energy."""
    cout, p = corr.shape
    entry = entry_strengths(gram, corr).ravel()
    energy = np.einsum("opp->op", gram).ravel()
    order = np.lexsort((-energy, -entry))
    mask = np.zeros(cout * p, dtype=bool)
    mask[order[:max(0, min(keep, cout * p))]] = True
    return mask.reshape(cout, p)


# ---------------------------------------------------------------------------------------------
# refit


def _output_stats(st: LayerStats, outs: np.ndarray) -> LayerStats:
    """``st`` restricted to the outputs ``outs`` (shares ``XᵀX``)."""
    sub = LayerStats.__new__(LayerStats)
    sub.dim, sub.outputs = st.dim, len(outs)
    sub.xtx, sub.xty, sub.yy, sub.n = st.xtx, st.xty[:, :, outs], st.yy[:, outs], st.n
    return sub


EXACT_REFIT_FLOPS = 2e10  # above this (Σ over kept-position patterns of unknowns³), refit by batched CG
CG_RIDGES = (1e-2, 1e-1)  # relative to the mean diagonal of XᵀX, towards the sliced weights
CG_ITERATIONS = 30


def refit_stripes(st: LayerStats, weight: np.ndarray, bias: np.ndarray | None, kept: np.ndarray,
                  reconstruct: bool = True) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Least-squares refit of each filter on the columns of its kept positions.

    Small layers: exactly, with the ridge chosen as in :func:`onnxprune.reconstruct.refit`, one
    solve per set of kept positions shared by some filters. Large layers (hundreds of patterns of
    thousands of unknowns would take hours): :func:`refit_stripes_cg`, all filters at once.

    Returns the new weight ``[Cout, Cin, kh, kw]`` (dropped stripes zero), bias, and the layer's
    relative error before (kept stripes as they were) and after the refit.
    """
    cout, cin = weight.shape[:2]
    p = kept.shape[1]
    patterns, inverse = np.unique(kept, axis=0, return_inverse=True)
    if reconstruct and float(((patterns.sum(1) * cin + 1.0) ** 3).sum()) > EXACT_REFIT_FLOPS:
        return refit_stripes_cg(st, weight, bias, kept)
    w2 = weight.reshape(cout, cin * p).astype(np.float64)
    b = np.zeros(cout) if bias is None else bias.astype(np.float64)
    new_w, new_b = np.zeros_like(w2), b.copy()
    err_before = err_after = 0.0
    for i, pattern in enumerate(patterns):
        outs = np.flatnonzero(inverse.ravel() == i)
        cols = (np.arange(cin)[:, None] * p + np.flatnonzero(pattern)[None, :]).ravel()
        sub = _output_stats(st, outs)
        if reconstruct:
            fit = refit(sub, cols, w2[np.ix_(outs, cols)], b[outs], True)
            new_w[np.ix_(outs, cols)] = fit.weight
            new_b[outs] = fit.bias
            energy = sub.energy()
            err_before += fit.error_before * energy
            err_after += fit.error_after * energy
        else:
            new_w[np.ix_(outs, cols)] = w2[np.ix_(outs, cols)]
    total = max(st.energy(), 1e-30)
    out_b = new_b if (bias is not None or reconstruct) else None
    return new_w.reshape(weight.shape), out_b, err_before / total, err_after / total


def _masked_cg(xtx: np.ndarray, xty: np.ndarray, mask: np.ndarray, start: np.ndarray, ridge: np.ndarray
               ) -> np.ndarray:
    """Every column's ``argmin ‖T − [X 1] w‖² + Σ ridge·(w − start)²`` with w zero off ``mask``,
    by Jacobi-preconditioned conjugate gradients from ``start``, one ``XᵀX · W`` product per step."""
    rhs = (xty + ridge * start) * mask

    def apply(w: np.ndarray) -> np.ndarray:
        return (xtx @ w + ridge * w) * mask

    precond = np.where(mask, 1.0 / np.maximum(np.diag(xtx)[:, None] + ridge, 1e-12), 0.0)
    w = start.copy()
    res = rhs - apply(w)
    z = precond * res
    direction = z.copy()
    rz = np.einsum("io,io->o", res, z)
    for _ in range(CG_ITERATIONS):
        a_dir = apply(direction)
        step = rz / np.maximum(np.einsum("io,io->o", direction, a_dir), 1e-300)
        w += step * direction
        res -= step * a_dir
        z = precond * res
        rz_new = np.einsum("io,io->o", res, z)
        direction = z + (rz_new / np.maximum(rz, 1e-300)) * direction
        rz = rz_new
    return w


def refit_stripes_cg(st: LayerStats, weight: np.ndarray, bias: np.ndarray | None,
                     kept: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """:func:`refit_stripes` for large layers: every filter's masked ridge problem (towards the
    sliced weights, bias free) solved for all filters at once by :func:`_masked_cg`. Each filter
    takes the ridge strength — or keeps its sliced weights — that two-fold cross-validation over
    images prefers: these layers have thousands of unknowns per filter and often fewer samples."""
    cout, cin = weight.shape[:2]
    p = kept.shape[1]
    d = cin * p
    mask = np.zeros((d + 1, cout), dtype=bool)
    mask[:d] = np.repeat(kept.T[None, :, :], cin, axis=0).reshape(d, cout)  # column c·P + q
    mask[d] = True
    start = np.zeros((d + 1, cout))
    start[:d] = weight.reshape(cout, d).T
    start[d] = 0.0 if bias is None else bias
    start *= mask
    xtx, xty, yy, _ = st.total()
    scale = float(np.mean(np.diag(xtx)[:d]) or 1.0)

    def ridge(r: float) -> np.ndarray:
        out = np.full((d + 1, 1), r * scale)
        out[d] = 0.0
        return out

    def errors(w: np.ndarray, fold: int | None = None) -> np.ndarray:
        a, b, t = (xtx, xty, yy) if fold is None else (st.xtx[fold], st.xty[fold], st.yy[fold])
        return np.einsum("io,io->o", w, a @ w) - 2 * np.einsum("io,io->o", w, b) + t

    if st.n.min() > 0:
        held_out = np.stack([sum(errors(start, f) for f in (0, 1))] +
                            [sum(errors(_masked_cg(st.xtx[1 - f], st.xty[1 - f], mask, start, ridge(r)), f)
                                 for f in (0, 1)) for r in CG_RIDGES])
        choice = held_out.argmin(0)  # 0: keep the sliced weights, i: CG_RIDGES[i - 1]
    else:
        choice = np.full(cout, len(CG_RIDGES))
    w = start.copy()
    for i, r in enumerate(CG_RIDGES, start=1):
        if (choice == i).any():
            cols = choice == i
            w[:, cols] = _masked_cg(xtx, xty[:, cols], mask[:, cols], start[:, cols], ridge(r))
    before, after = errors(start), errors(w)
    worse = after > before
    w[:, worse] = start[:, worse]
    after = np.minimum(after, before)
    total = max(st.energy(), 1e-30)
    return (w[:d].T.reshape(weight.shape), w[d], float(before.sum() / total), float(after.sum() / total))


# ---------------------------------------------------------------------------------------------
# emission


@dataclass
class _ConvGeometry:
    kernel: tuple[int, int]
    pads: list[int]  # begin_h, begin_w, end_h, end_w
    strides: list[int]
    dilations: list[int]


def _geometry(node: onnx.NodeProto, g: GraphView) -> _ConvGeometry:
    w = g.input_const(node, 1)
    kernel = tuple(int(k) for k in w.shape[2:])
    return _ConvGeometry(kernel, conv_pads(node, g.shape(node.input[0])[2:], kernel),
                         list(attr(node, "strides", [1, 1])), list(attr(node, "dilations", [1, 1])))


def stripe_nodes(x: str, out: str, weight: np.ndarray, bias: np.ndarray | None, kept: np.ndarray,
                 geo: _ConvGeometry, prefix: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers computing ``Conv(x, weight, bias)`` from the kept stripes only
    (input ``x``, output ``out``). See the module docstring for the form."""
    cout, cin, kh, kw = weight.shape
    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        full = f"{prefix}/const/{name}"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), full))
        return full

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        full = f"{prefix}/{name}"
        nodes.append(helper.make_node(op, inputs, [full], name=full, **attrs))
        return full

    pt, pl, pb, pr = geo.pads
    xp = x
    if any(geo.pads):
        xp = node("Pad", [x, const("pads", np.array([0, 0, pt, pl, 0, 0, pb, pr], np.int64))], "pad")
    (sy, sx), (dy, dx) = geo.strides, geo.dilations
    slot_of = np.full(kept.shape, -1, np.int64)  # channel of the concatenated outputs holding (o, p)
    parts, offset = [], 0
    for p in np.flatnonzero(kept.any(axis=0)):
        ky, kx = divmod(int(p), kw)
        ends = [-(kh - 1 - ky) * dy or INT64_MAX, -(kw - 1 - kx) * dx or INT64_MAX]
        xs = node("Slice", [xp, const(f"p{p}_starts", np.array([ky * dy, kx * dx], np.int64)),
                            const(f"p{p}_ends", np.array(ends, np.int64)),
                            const(f"p{p}_axes", np.array([2, 3], np.int64)),
                            const(f"p{p}_steps", np.array([sy, sx], np.int64))], f"p{p}_slice")
        filters = np.flatnonzero(kept[:, p])
        w_p = weight[filters, :, ky, kx][:, :, None, None].astype(weight.dtype)
        parts.append(node("Conv", [xs, const(f"p{p}_w", w_p)], f"p{p}_conv", kernel_shape=[1, 1]))
        slot_of[filters, p] = offset + np.arange(len(filters))
        offset += len(filters)
    counts = kept.sum(axis=1)
    m = int(counts.max())
    cat = node("Concat", parts, "concat", axis=1) if len(parts) > 1 else parts[0]
    zero = offset
    if (counts < m).any():  # a zero channel for the filters with fewer stripes
        cat = node("Pad", [cat, const("zero_channel", np.array([0, 0, 0, 0, 0, 1, 0, 0], np.int64))],
                   "zero_channel")
    index = np.full((cout, m), zero, np.int64)
    for o in range(cout):
        slots = slot_of[o][slot_of[o] >= 0]
        index[o, :len(slots)] = slots
    picks = [node("Gather", [cat, const(f"slot{j}", index[:, j])], f"slot{j}", axis=1) for j in range(m)]
    total = node("Sum", picks, "sum") if len(picks) > 1 else picks[0]
    if bias is not None and np.any(bias):
        nodes.append(helper.make_node("Add", [total, const("bias", bias.reshape(1, cout, 1, 1).astype(weight.dtype))],
                                      [out], name=f"{prefix}/bias"))
    else:
        nodes.append(helper.make_node("Identity", [total], [out], name=f"{prefix}/out"))
    return nodes, inits


def emit(model: onnx.ModelProto, node_output: str, kept: np.ndarray, geo: _ConvGeometry) -> None:
    """Replace the Conv producing ``node_output`` (weights already refit, dropped stripes zero)
    by its stripe form, in place."""
    g = GraphView(model)
    node = g.producer[node_output]
    weight, bias = g.input_const(node, 1), g.input_const(node, 2)
    nodes, inits = stripe_nodes(node.input[0], node_output, weight, bias, kept, geo,
                                f"{node.name or node_output}/stripes")
    at = list(model.graph.node).index(node)
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(rest[:at] + nodes + rest[at + 1:])
    model.graph.initializer.extend(inits)


def layer_model(x_shape: tuple[int, ...], nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
                 x: str, out: str, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [None] * len(x_shape))], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 13))])


def layer_latency(node: onnx.NodeProto, g: GraphView, kept: np.ndarray, geo: _ConvGeometry, batch: int,
                  provider: str, opset: int) -> tuple[float, float]:
    """Median ms of the layer alone, dense conv vs stripe form, runs interleaved."""
    shape = (batch, *g.shape(node.input[0])[1:])
    weight, bias = g.input_const(node, 1), g.input_const(node, 2)
    inits = [numpy_helper.from_array(weight, "w")] + ([numpy_helper.from_array(bias, "b")] if bias is not None else [])
    dense_node = onnx.NodeProto()
    dense_node.CopyFrom(node)
    del dense_node.input[:]
    dense_node.input.extend(["x", "w"] + (["b"] if bias is not None else []))
    del dense_node.output[:]
    dense_node.output.append("y")
    dense = layer_model(shape, [dense_node], inits, "x", "y", opset)
    nodes, s_inits = stripe_nodes("x", "y", weight, bias, kept, geo, "s")
    sparse = layer_model(shape, nodes, s_inits, "x", "y", opset)
    feed = {"x": np.random.default_rng(0).normal(size=shape).astype(np.float32)}
    lat = measure([dense, sparse], feed, provider, repeats=30, warmup=5)
    return lat[0].ms, lat[1].ms


# ---------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class StripeLayer:
    """One stripe-pruned Conv."""

    node: str
    kernel: tuple[int, int]
    in_channels: int
    out_channels: int
    stripes: tuple[int, int]  # (before, after)
    macs_dense: int
    macs_stripes: int  # kept stripes × Cin × Hout·Wout: the MACs of the stripe form
    emitted: bool = False  # written in stripe form (else dense, dropped stripes zeroed)
    latency_ms: tuple[float, float] | None = None  # measured alone: (dense, stripe form)
    kept_dense_reason: str = ""
    error_before_refit: float | None = None
    error_after_refit: float | None = None
    positions_used: int = 0  # kernel positions some filter keeps
    filters_empty: int = 0  # filters with no stripe left (bias only)


def eligible(node: onnx.NodeProto, g: GraphView) -> bool:
    """A group-1 2-D Conv with constant weights of its own (not shared with other nodes: each would
    lose other stripes) and a kernel of more than one position."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or attr(node, "group", 1) != 1 or \
            shared_weight(node, g):
        return False
    w = g.input_const(node, 1)
    if w is None or w.ndim != 4 or w.shape[2] * w.shape[3] <= 1:
        return False
    if len(node.input) > 2 and node.input[2] and g.input_const(node, 2) is None:
        return False
    return handler_for(node).reconstructable(node, g) and len(g.shape(node.input[0]) or ()) == 4


def _sampleable(node: onnx.NodeProto, g: GraphView) -> bool:
    h = handler_for(node)
    return (isinstance(h, LinearHandler) and h.reconstructable(node, g) and bool(node.input)
            and h.rule(node, g) is not None and not shared_weight(node, g))


def _check_options(opts) -> None:
    unsupported = [(opts.params is not None, "--params"), (opts.size_mb is not None, "--size-mb"),
                   (opts.latency is not None, "--latency"), (opts.max_drop is not None, "--max-drop"),
                   (opts.prune_coupled, "--prune-residual")]
    for bad, flag in unsupported:
        if bad:
            raise OptionError(f"{flag} is not supported with --method stripe (only --speedup, a MACs target "
                              "counted on the kept stripes)")


def keep_fraction(total_macs: int, stripe_macs: int, speedup: float) -> float:
    """The fraction of every eligible layer's stripes to keep for ``total / pruned ≥ speedup``."""
    drop = total_macs * (1 - 1 / speedup) / max(stripe_macs, 1)
    if drop >= 1:
        raise TargetNotMetError(f"--speedup {speedup:g} cannot be reached by stripe pruning: K×K convs are "
                                f"{stripe_macs / max(total_macs, 1):.1%} of the MACs, so at most "
                                f"{total_macs / max(total_macs - stripe_macs, 1):.2f}x")
    return 1 - drop


def prune_stripes(original: onnx.ModelProto, work: onnx.ModelProto, shapes, cal, fit_idx, hold_idx, opts,
                  folded: int, start: float, emit_mode: str | None = None):
    """The ``--method stripe`` pipeline (see the module docstring); returns a ``PruneResult``.

    ``emit_mode``: "auto" (stripe form where it measures faster than the dense conv; the default
    when ``opts.measure_latency``), "stripes" (always, where possible; the default otherwise),
    "dense" (never: dense convs with the dropped stripes zeroed).
    """
    _check_options(opts)
    emit_mode = emit_mode or ("auto" if opts.measure_latency else "stripes")
    g = GraphView(work, shapes)
    layers = [n for n in work.graph.node if eligible(n, g)]
    if not layers:
        raise NothingToPrune("the model has no K×K Conv (group 1) whose stripes can be pruned: nothing written")
    total = graph_macs(g)
    stripe_total = sum(handler_for(n).macs(n, g) for n in layers)
    frac = keep_fraction(total, stripe_total, opts.speedup)
    topo = {id(n): i for i, n in enumerate(work.graph.node)}
    first = min(topo[id(n)] for n in layers)
    layer_ids = {id(n) for n in layers}
    steps = [n for n in work.graph.node if id(n) in layer_ids or (
        opts.reconstruct and opts.refit_downstream and topo[id(n)] > first and _sampleable(n, g))]
    sampler = Sampler(work, g, cal, fit_idx, [Consumer(n, n.input[0], 1) for n in steps], opts.samples_per_image,
                      opts.seed, residual=opts.residual_target, batch=fitting_batch(shapes, opts.batch_size),
                      keep_samples=False)
    geometry = {n.output[0]: _geometry(n, g) for n in layers}  # before any weight changes
    results: list[StripeLayer] = []
    masks: dict[str, np.ndarray] = {}
    for node in steps:
        st = sampler.stats(g, [Consumer(node, node.input[0], 1)])[0]
        h: LinearHandler = handler_for(node)  # type: ignore[assignment]
        if id(node) not in layer_ids:  # input drifted: refit to the original output
            fit = refit(st, np.arange(st.dim), h.weight_matrix(node, g), h.bias(node, g), h.has_bias)
            if fit.ridge is not None:
                h.set_linear(node, fit.weight, fit.bias, g)
            continue
        weight, bias = g.input_const(node, 1), g.input_const(node, 2)
        cout, cin, kh, kw = weight.shape
        xtx, xty, _, _ = st.total()
        d = st.dim
        b = np.zeros(cout) if bias is None else bias.astype(np.float64)
        keep = int(np.floor(frac * cout * kh * kw + 1e-9))
        # many small solves: one BLAS thread each is far faster than threads fighting over cores
        with threadpool_limits(limits=1, user_api="blas"):
            gram, corr = stripe_problem(xtx[:d, :d], xty[:d] - np.outer(xtx[:d, d], b), weight)
            kept = select_stripes(gram, corr, keep)
            new_w, new_b, before, after = refit_stripes(st, weight, bias, kept, opts.reconstruct)
        g.set_const(node, 1, new_w.astype(weight.dtype))
        if new_b is not None:
            g.set_const(node, 2, new_b.astype(weight.dtype))
        macs = handler_for(node).macs(node, g)
        res = StripeLayer(node_name(node), (kh, kw), cin, cout, (cout * kh * kw, int(kept.sum())),
                          macs, macs * int(kept.sum()) // (cout * kh * kw),
                          error_before_refit=before if opts.reconstruct else None,
                          error_after_refit=after if opts.reconstruct else None,
                          positions_used=int(kept.any(axis=0).sum()), filters_empty=int((~kept.any(axis=1)).sum()))
        results.append(res)
        masks[node.output[0]] = kept
        log.info("%s: %d -> %d stripes, refit error %.4f -> %.4f", res.node, *res.stripes, before, after)
        g.drop_unused_initializers()
    # emission
    pruned = copy.deepcopy(work)
    opset = default_opset(work) or 13
    batch = batch_size_for(original, opts.latency_batch)
    for res, node in zip(results, layers):
        kept = masks[node.output[0]]
        if not kept.any():
            res.kept_dense_reason = "no stripe kept (the output is the bias)"
        elif emit_mode == "dense":
            res.kept_dense_reason = "dense form requested"
        elif emit_mode == "auto":
            res.latency_ms = layer_latency(node, g, kept, geometry[node.output[0]], batch, opts.provider, opset)
            if res.latency_ms[1] >= res.latency_ms[0]:
                res.kept_dense_reason = (f"stripe form measured slower on ORT {opts.provider} "
                                         f"({res.latency_ms[1]:.3f} ms vs {res.latency_ms[0]:.3f} ms dense, "
                                         f"batch {batch})")
        if not res.kept_dense_reason:
            emit(pruned, node.output[0], kept, geometry[node.output[0]])
            res.emitted = True
    pruned = finalize(pruned)
    try:
        onnx.checker.check_model(pruned, full_check=True)
    except onnx.checker.ValidationError as exc:  # a bug, never the user's fault
        raise RuntimeError(f"the stripe-pruned model fails the ONNX checker: {exc}") from exc
    report = _report(original, work, pruned, cal, fit_idx, hold_idx, opts, results, folded, frac, shapes)
    report.seconds = time.perf_counter() - start
    return PruneResult(pruned, report)


def _report(original, work, pruned, cal, fit_idx, hold_idx, opts, results: list[StripeLayer], folded, frac,
            shapes) -> Report:
    macs_before = model_macs(work, cal)
    macs_after = model_macs(pruned, cal)
    by_name = {r.node: r for r in results}
    rows = []
    gw = GraphView(work, shapes)
    for node in work.graph.node:
        macs = handler_for(node).macs(node, gw)
        if not macs:
            continue
        r = by_name.get(node_name(node))
        after = macs if r is None else (r.macs_stripes if r.emitted else r.macs_dense)
        ch_in, ch_out = gw.channels(node.input[0]) or 0, gw.channels(node.output[0]) or 0
        rows.append(LayerRow(node_name(node), node.op_type if r is None else
                             ("Conv/stripes" if r.emitted else "Conv/dense"), (ch_in, ch_in), (ch_out, ch_out),
                             (macs, after)))
    timed = None
    if opts.measure_latency:
        feed = cal.take([0] * batch_size_for(original, opts.latency_batch))
        timed = measure([original, pruned], feed, opts.provider)
    totals = Totals(macs=(macs_before, macs_after), params=(count_params(GraphView(original)),
                                                           count_params(GraphView(pruned))),
                    size_bytes=(model_bytes(original), model_bytes(pruned)),
                    latency_ms=(timed[0].ms, timed[1].ms) if timed else None,
                    latency_busy=timed[0].busy if timed else None)
    check_idx = hold_idx if len(hold_idx) else fit_idx
    fidelity = compare(original, pruned, cal, check_idx, fitting_batch(shapes, opts.batch_size))
    groups = [GroupResult(r.node, r.stripes[0], r.stripes[1], [r.node], r.error_before_refit, r.error_after_refit)
              for r in results]
    stripe_macs = macs_before - sum(r.macs_dense - r.macs_stripes for r in results)
    stripe = {"keep_fraction": frac, "stripe_macs": stripe_macs, "stripe_macs_speedup": macs_before / max(stripe_macs, 1),
              "layers": [asdict(r) for r in results],
              "kept_dense": [{"node": r.node, "reason": r.kept_dense_reason} for r in results if not r.emitted]}
    return Report(method=opts.method.value, reconstruct=opts.reconstruct, target_speedup=opts.speedup,
                  totals=totals, groups=groups, layers=rows, skipped=[], fidelity=fidelity,
                  calibration={"fit": int(len(fit_idx)), "holdout": int(len(hold_idx)), "available": int(cal.available),
                               "samples_per_image": opts.samples_per_image},
                  bn_folded=folded, targets={"speedup": opts.speedup}, provider=opts.provider,
                  latency_batch=opts.latency_batch, stripe=stripe)
