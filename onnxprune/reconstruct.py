"""Least-squares refit of a layer's weights from its kept input channels.

The ridge strength is chosen by two-fold cross-validation on the sampled statistics, with the
unchanged (sliced) weights as a candidate too, so an under-determined refit (few samples, many
unknowns) can never make a layer worse on held-out samples than not refitting it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .stats import LayerStats

RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class Refit:
    """The refit weights ``[Cout, D_kept]`` and bias, with the errors that chose them."""

    weight: np.ndarray
    bias: np.ndarray | None
    ridge: float | None  # None: the sliced weights were kept
    error_before: float  # relative error of the sliced weights on all samples
    error_after: float


def _solve(xtx: np.ndarray, xty: np.ndarray, ridge: float, n_x: int) -> np.ndarray:
    a = xtx.copy()
    diag = np.diag(a)[:n_x]
    lam = ridge * (diag.mean() if diag.size and diag.mean() > 0 else 1.0)
    a[np.arange(n_x), np.arange(n_x)] += lam
    try:
        return scipy.linalg.solve(a, xty, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgWarning, ValueError):
        return np.linalg.lstsq(a, xty, rcond=None)[0]


def refit(stats: LayerStats, cols: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
          fit_bias: bool) -> Refit:
    """Refit ``Y ≈ X[:, cols] Wᵀ + b`` given the sliced current ``weight [Cout, len(cols)]``."""
    d = stats.dim
    idx = np.concatenate([cols, [d]]) if fit_bias else np.asarray(cols)
    n_x = len(cols)
    sub = lambda m: m[np.ix_(idx, idx)]  # noqa: E731
    b0 = np.zeros(weight.shape[0]) if bias is None else bias
    start = np.vstack([weight.T, b0[None, :]]) if fit_bias else weight.T

    def full(w_sub: np.ndarray) -> np.ndarray:
        w = np.zeros((d + 1, weight.shape[0]))
        w[idx] = w_sub
        if not fit_bias and bias is not None:
            w[d] = bias
        return w

    energy = max(stats.energy(), 1e-30)
    before = stats.error(full(start)) / energy
    best_err, best_ridge = sum(stats.error(full(start), f) for f in (0, 1)), None
    if stats.n.min() > 0:
        for ridge in RIDGES:
            err = 0.0
            for f in (0, 1):
                w = _solve(sub(stats.xtx[1 - f]), stats.xty[1 - f][idx], ridge, n_x)
                err += stats.error(full(w), f)
            if err < best_err:
                best_err, best_ridge = err, ridge
    if best_ridge is None:
        return Refit(weight, bias, None, before, before)
    xtx, xty, _, _ = stats.total()
    w = _solve(sub(xtx), xty[idx], best_ridge, n_x)
    after = stats.error(full(w)) / energy
    new_bias = w[n_x] if fit_bias else bias
    return Refit(w[:n_x].T, new_bias, best_ridge, before, after)
