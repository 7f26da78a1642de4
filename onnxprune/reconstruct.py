"""Least-squares refit of a layer's weights from its kept input channels.

The ridge pulls the solution towards the layer's current (sliced) weights rather than towards
zero: with few samples per unknown the refit then moves only as far from the trained weights as
the data supports. Its strength is chosen by two-fold cross-validation on the sampled statistics,
with the unchanged weights as a candidate too, so an under-determined refit can never make a layer
worse on held-out samples than not refitting it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .linalg import solve_spd
from .stats import LayerStats

RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
ESTIMATE_RIDGE = 1e-3  # the ridge of refits that only estimate an error (no cross-validation)
assert ESTIMATE_RIDGE in RIDGES  # the cross-validated search starts from it
WELL_DETERMINED = 20  # samples per unknown above which the smallest ridge is used without cross-validation
UPDATE_BLOCK_VALUES = 1 << 23  # float64 values of a sample-space refit's update formed at once (64 MiB)


@dataclass
class Refit:
    """The refit weights ``[Cout, D_kept]`` and bias, with the errors that chose them."""

    weight: np.ndarray
    bias: np.ndarray | None
    ridge: float | None  # None: the sliced weights were kept
    error_before: float  # relative error of the sliced weights on all samples
    error_after: float


def _ridge_scale(a: np.ndarray, n_x: int) -> float:
    diag = np.diag(a)[:n_x]
    return float(diag.mean()) if diag.size and diag.mean() > 0 else 1.0


def _solve(a: np.ndarray, b: np.ndarray, ridge: float, n_x: int, prior: np.ndarray) -> np.ndarray:
    """``argmin ‖Y − XW‖² + r‖W − prior‖²`` over the first ``n_x`` unknowns (not the bias).
    ``a`` and ``b`` are overwritten (callers pass arrays made for the call: a Gram matrix of
    VGG-16's classifier is 5 GB)."""
    r = ridge * _ridge_scale(a, n_x)
    a[np.arange(n_x), np.arange(n_x)] += r
    b[:n_x] += r * prior[:n_x]
    return solve_spd(a, b)


# Sample space: with fewer samples (n) than unknowns (p) the same solutions come from the n×n
# kernel ``X Xᵀ`` instead of the p×p ``XᵀX`` (``(XᵀX + rI)⁻¹Xᵀ = Xᵀ(XXᵀ + rI)⁻¹``); an unpenalised
# bias is solved for by centring. Where p ≤ n the p×p system is formed from the samples.

def _sample_scale(x: np.ndarray, n_x: int) -> float:
    """:func:`_ridge_scale` of ``xᵀx`` without forming it."""
    diag = np.einsum("ij,ij->j", x[:, :n_x], x[:, :n_x])
    return float(diag.mean()) if diag.size and diag.mean() > 0 else 1.0


def _solve_samples(x: np.ndarray, y: np.ndarray, ridge: float, n_x: int, prior: np.ndarray) -> np.ndarray:
    """:func:`_solve` from the samples ``x [n, p]`` (the unknowns' columns of ``[X 1]``), ``y [n, Cout]``."""
    n, p = x.shape
    if p <= n:
        return _solve(x.T @ x, x.T @ y, ridge, n_x, prior)
    r = ridge * _sample_scale(x, n_x)
    resid = y - x @ prior
    xs, rs = x[:, :n_x], resid
    if p > n_x:  # the last column is the constant 1 of the unpenalised bias: centre
        x_mean, r_mean = xs.mean(0), resid.mean(0)
        xs, rs = xs - x_mean, resid - r_mean
    k = xs @ xs.T
    k[np.arange(n), np.arange(n)] += r
    alpha = solve_spd(k, rs)  # [n, Cout]: the update is xsᵀ α
    w = prior.astype(np.float64, copy=True)
    # added a block of outputs at a time: xsᵀ α whole is as large as the weights, one more
    # weight-sized float64 array at the pipeline's peak on a wide classifier layer (docs/scale.md)
    step = max(1, UPDATE_BLOCK_VALUES // max(n_x, 1))
    for start in range(0, w.shape[1], step):
        w[:n_x, start:start + step] += xs.T @ alpha[:, start:start + step]
    if p > n_x:
        w[n_x] += r_mean - (xs @ x_mean) @ alpha  # x̄ᵀ(xsᵀ α) without forming xsᵀ α
    return w


def _fit(stats: LayerStats, idx: np.ndarray, fold: int | None, ridge: float, n_x: int,
         prior: np.ndarray) -> np.ndarray:
    """The ridge solution on the unknowns ``idx``, fit on ``fold`` (None: both folds)."""
    if stats.samples_kept:
        return _solve_samples(*stats.samples(idx, fold), ridge, n_x, prior)
    if fold is None:
        xtx, xty = stats.xtx[0][np.ix_(idx, idx)], stats.xty[0][idx] + stats.xty[1][idx]
        xtx += stats.xtx[1][np.ix_(idx, idx)]
    else:
        xtx, xty = stats.xtx[fold][np.ix_(idx, idx)], stats.xty[fold][idx]
    return _solve(xtx, xty, ridge, n_x, prior)


def _layout(d: int, cols: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, fit_bias: bool):
    """The unknowns' rows in ``[X 1]`` (``idx``), their start values, and ``rows_of`` mapping a
    solution on them to the rows of ``[X 1]`` it weighs and their weights (the layer's fixed bias
    included where it is not refit)."""
    idx = np.concatenate([cols, [d]]) if fit_bias else np.asarray(cols)
    b0 = np.zeros(weight.shape[0]) if bias is None else bias
    start = np.vstack([weight.T, b0[None, :]]) if fit_bias else weight.T

    def rows_of(w_sub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not fit_bias and bias is not None:
            return np.concatenate([idx, [d]]), np.vstack([w_sub, bias[None, :]])
        return idx, w_sub

    return idx, start, rows_of


def held_out_error(stats: LayerStats, cols: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                   fit_bias: bool, ridge: float = ESTIMATE_RIDGE) -> float:
    """Relative error of the refit on images it was not fit on (two folds, one ridge strength):
    an honest figure even where samples per unknown are few, for one solve per fold. With every
    input kept (``cols`` all of them), the weights' own error, unrefit: the statistics come from
    the model those weights were trained in, so a refit would return them."""
    idx, start, rows_of = _layout(stats.dim, cols, weight, bias, fit_bias)
    if stats.n.min() == 0 or len(cols) == stats.dim:
        return stats.error_of(*rows_of(start)) / max(stats.energy(), 1e-30)
    err = sum(stats.error_of(*rows_of(_fit(stats, idx, 1 - f, ridge, len(cols), start)), f) for f in (0, 1))
    return err / max(stats.energy(), 1e-30)


def _descend(cost: Callable[[float], float], values: tuple[float, ...], first: int) -> tuple[float, float]:
    """(least cost, its value) of ``values``, walking from ``values[first]`` towards lower cost
    until it rises: the cross-validated error is unimodal in the ridge strength, and each value
    costs a factorisation per fold."""
    seen = {first: cost(values[first])}
    for step in (1, -1):
        i = first
        while 0 <= i + step < len(values):
            seen[i + step] = cost(values[i + step])
            if seen[i + step] >= seen[i]:
                break
            i += step
        if i != first:  # it went down this way: the other way only goes up
            break
    best = min(seen, key=seen.get)
    return seen[best], values[best]


def refit(stats: LayerStats, cols: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
          fit_bias: bool, ridge: float | None = None) -> Refit:
    """Refit ``Y ≈ X[:, cols] Wᵀ + b`` given the sliced current ``weight [Cout, len(cols)]``.

    With many samples per unknown the smallest ridge is used; otherwise the ridge (or keeping
    the sliced weights) is chosen by two-fold cross-validation over images. A given ``ridge``
    is used as it is (one solve: for estimates, e.g. the sensitivity probes).
    """
    idx, start, rows_of = _layout(stats.dim, cols, weight, bias, fit_bias)
    n_x = len(cols)
    energy = max(stats.energy(), 1e-30)
    before = stats.error_of(*rows_of(start)) / energy
    if ridge is not None:
        best_ridge = ridge
    elif stats.samples_per_unknown(cols, fit_bias) >= WELL_DETERMINED:
        best_ridge = RIDGES[0]
    else:
        rows = rows_of(start)[0]
        errors = [stats.error_on(rows, f) for f in (0, 1)]
        best_err, best_ridge = sum(error(rows_of(start)[1]) for error in errors), None
        if stats.n.min() > 0:
            def cv_error(strength: float) -> float:
                return sum(error(rows_of(_fit(stats, idx, 1 - f, strength, n_x, start))[1])
                           for f, error in enumerate(errors))

            cv_err, cv_ridge = _descend(cv_error, RIDGES, RIDGES.index(ESTIMATE_RIDGE))
            if cv_err < best_err:
                best_ridge = cv_ridge
        if best_ridge is None:
            return Refit(weight, bias, None, before, before)
    w = _fit(stats, idx, None, best_ridge, n_x, start)
    after = stats.error_of(*rows_of(w)) / energy
    if after > before:  # numerical trouble: never make a layer worse in-sample
        return Refit(weight, bias, None, before, before)
    new_bias = w[n_x] if fit_bias else bias
    return Refit(w[:n_x].T, new_bias, best_ridge, before, after)
