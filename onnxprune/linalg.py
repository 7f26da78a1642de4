"""Symmetric positive definite solves and inverses, on numpy's LAPACK.

numpy's and scipy's wheels each bundle their own OpenBLAS, each with a thread pool whose threads
keep spinning for a while after a call. The pruner alternates numpy's matrix products (statistics,
refinement) with these solves; on scipy's library each solve then waited for numpy's spinning
threads, several times longer than the solve itself (docs/benchmarks.md, "Prune time and
refinement steps"). Keeping every dense solve on numpy's library keeps one thread pool.
"""

from __future__ import annotations

import numpy as np


def solve_spd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a⁻¹ b`` for a symmetric positive definite ``a`` (a ridged Gram matrix); the least-squares
    solution where ``a`` is singular."""
    try:
        x = np.linalg.solve(a, b)
        if np.isfinite(x).all():
            return x
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(a, b, rcond=None)[0]


def spd_inverse(h: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix, exactly symmetric; the pseudo-inverse where
    it is not definite (its Cholesky factorisation fails)."""
    try:
        np.linalg.cholesky(h)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(h)
    inverse = np.linalg.inv(h)
    inverse += inverse.T
    inverse *= 0.5
    return inverse
