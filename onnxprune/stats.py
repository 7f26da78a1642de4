"""Streaming sufficient statistics of one layer's regression problem.

For a linear layer with sampled input patches ``X [n, D]`` and targets ``Y [n, Cout]`` we keep
``XᵀX``, ``XᵀY`` and ``ΣY²`` (with a constant column for the bias), in two folds split by
image, so memory is bounded by ``D² + D·Cout`` however many images are used, and ridge
strength can be chosen on held-out samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LayerStats:
    """``XᵀX``, ``XᵀY``, ``ΣY²`` and counts for fold 0 and fold 1 (last row/col: the constant 1)."""

    dim: int
    outputs: int
    xtx: np.ndarray = field(init=False)
    xty: np.ndarray = field(init=False)
    yy: np.ndarray = field(init=False)
    n: np.ndarray = field(init=False)

    def __post_init__(self):
        d = self.dim + 1
        self.xtx = np.zeros((2, d, d))
        self.xty = np.zeros((2, d, self.outputs))
        self.yy = np.zeros((2, self.outputs))
        self.n = np.zeros(2, dtype=np.int64)

    def add(self, x: np.ndarray, y: np.ndarray, fold: np.ndarray) -> None:
        """Accumulate rows ``x [n, D]``, ``y [n, Cout]``, each row in fold 0 or 1."""
        # products of one batch in float32 (fast BLAS), accumulated across batches in float64
        xa = np.empty((x.shape[0], self.dim + 1), np.float32)
        xa[:, :-1] = x
        xa[:, -1] = 1.0
        y = y.astype(np.float32)
        for f in (0, 1):
            rows = fold == f
            if not rows.any():
                continue
            xf, yf = xa[rows], y[rows]
            self.xtx[f] += xf.T @ xf
            self.xty[f] += xf.T @ yf
            self.yy[f] += np.einsum("ij,ij->j", yf, yf, dtype=np.float64)
            self.n[f] += rows.sum()

    def total(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(XᵀX, XᵀY, ΣY², n) over both folds."""
        return self.xtx.sum(0), self.xty.sum(0), self.yy.sum(0), int(self.n.sum())

    def error(self, w_aug: np.ndarray, fold: int | None = None) -> float:
        """Sum of squared residuals of ``Y ≈ [X 1] w_aug`` (w_aug ``[D+1, Cout]``)."""
        xtx, xty, yy, _ = self.total() if fold is None else (self.xtx[fold], self.xty[fold], self.yy[fold], 0)
        return float(np.einsum("ij,ij->", w_aug, xtx @ w_aug) - 2 * np.einsum("ij,ij->", w_aug, xty) + yy.sum())

    def energy(self, fold: int | None = None) -> float:
        """Sum of squared targets (the error of predicting zero)."""
        return float(self.yy.sum() if fold is None else self.yy[fold].sum())
