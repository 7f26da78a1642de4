"""Least-squares refit of a layer's weights from its kept input channels.

The ridge pulls the solution towards the layer's current (sliced) weights rather than towards
zero: with few samples per unknown the refit then moves only as far from the trained weights as
the data supports. Its strength is chosen by two-fold cross-validation on the sampled statistics,
with the unchanged weights as a candidate too, so an under-determined refit can never make a layer
worse on held-out samples than not refitting it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .stats import LayerStats

RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
WELL_DETERMINED = 20  # samples per unknown above which the smallest ridge is used without cross-validation


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
    """``argmin ‖Y − XW‖² + r‖W − prior‖²`` over the first ``n_x`` unknowns (not the bias)."""
    a, b = a.copy(), b.copy()
    r = ridge * _ridge_scale(a, n_x)
    a[np.arange(n_x), np.arange(n_x)] += r
    b[:n_x] += r * prior[:n_x]
    try:
        return scipy.linalg.solve(a, b, assume_a="pos", check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return np.linalg.lstsq(a, b, rcond=None)[0]


def _ridge_path(a: np.ndarray, b: np.ndarray, ridges: tuple[float, ...], n_x: int,
                prior: np.ndarray) -> list[np.ndarray]:
    """Solutions for several ridge strengths from one eigendecomposition (ridge on every unknown)."""
    lam, vec = np.linalg.eigh(a)
    scale = _ridge_scale(a, n_x)
    return [vec @ ((vec.T @ (b + r * scale * prior)) / (lam + r * scale)[:, None]) for r in ridges]


def _layout(d: int, cols: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, fit_bias: bool):
    """The unknowns' rows in ``[X 1]`` (``idx``), their start values, and ``full`` mapping a
    solution on them to the ``[D+1, Cout]`` weights of the whole layer."""
    idx = np.concatenate([cols, [d]]) if fit_bias else np.asarray(cols)
    b0 = np.zeros(weight.shape[0]) if bias is None else bias
    start = np.vstack([weight.T, b0[None, :]]) if fit_bias else weight.T

    def full(w_sub: np.ndarray) -> np.ndarray:
        w = np.zeros((d + 1, weight.shape[0]))
        w[idx] = w_sub
        if not fit_bias and bias is not None:
            w[d] = bias
        return w

    return idx, start, full


def held_out_error(stats: LayerStats, cols: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                   fit_bias: bool, ridge: float = 1e-3) -> float:
    """Relative error of the refit on images it was not fit on (two folds, one ridge strength):
    an honest figure even where samples per unknown are few, for one solve per fold."""
    idx, start, full = _layout(stats.dim, cols, weight, bias, fit_bias)
    if stats.n.min() == 0:
        return stats.error(full(start)) / max(stats.energy(), 1e-30)
    err = sum(stats.error(full(_solve(stats.xtx[1 - f][np.ix_(idx, idx)], stats.xty[1 - f][idx], ridge,
                                      len(cols), start)), f) for f in (0, 1))
    return err / max(stats.energy(), 1e-30)


def refit(stats: LayerStats, cols: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
          fit_bias: bool) -> Refit:
    """Refit ``Y ≈ X[:, cols] Wᵀ + b`` given the sliced current ``weight [Cout, len(cols)]``.

    With many samples per unknown the smallest ridge is used; otherwise the ridge (or keeping
    the sliced weights) is chosen by two-fold cross-validation over images.
    """
    d = stats.dim
    idx, start, full = _layout(d, cols, weight, bias, fit_bias)
    n_x = len(cols)
    energy = max(stats.energy(), 1e-30)
    xtx, xty, _, n = stats.total()
    before = stats.error(full(start)) / energy
    if n >= WELL_DETERMINED * len(idx):
        best_ridge = RIDGES[0]
    else:
        best_err, best_ridge = sum(stats.error(full(start), f) for f in (0, 1)), None
        if stats.n.min() > 0:
            errs = np.zeros(len(RIDGES))
            for f in (0, 1):
                a, b = stats.xtx[1 - f][np.ix_(idx, idx)], stats.xty[1 - f][idx]
                for i, w in enumerate(_ridge_path(a, b, RIDGES, n_x, start)):
                    errs[i] += stats.error(full(w), f)
            if errs.min() < best_err:
                best_ridge = RIDGES[int(errs.argmin())]
        if best_ridge is None:
            return Refit(weight, bias, None, before, before)
    w = _solve(xtx[np.ix_(idx, idx)], xty[idx], best_ridge, n_x, start)
    after = stats.error(full(w)) / energy
    if after > before:  # numerical trouble: never make a layer worse in-sample
        return Refit(weight, bias, None, before, before)
    new_bias = w[n_x] if fit_bias else bias
    return Refit(w[:n_x].T, new_bias, best_ridge, before, after)
