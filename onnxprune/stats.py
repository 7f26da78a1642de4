"""Streaming sufficient statistics of one layer's regression problem.

For a linear layer with sampled input patches ``X [n, D]`` and targets ``Y [n, Cout]`` we keep
``XᵀX``, ``XᵀY`` and ``ΣY²`` (with a constant column for the bias), in two folds split by
image, so memory is bounded by ``D² + D·Cout`` however many images are used, and ridge
strength can be chosen on held-out samples.

Where fewer samples than unknowns are drawn (``rows ≤ D + 1``: a ``Gemm`` after ``Flatten``
gets one sample per image, a wide 3×3 conv on a small feature map few), the samples themselves
are kept instead (``n·(D+1)`` floats rather than ``2·(D+1)²``): the refits then solve in sample
space (see :mod:`onnxprune.reconstruct`), so neither memory nor time grows with ``D²``/``D³``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


SAME_VALUE = 1e-4  # relative spread below which an input's positions in one image hold one value


@dataclass
class LayerStats:
    """``XᵀX``, ``XᵀY``, ``ΣY²`` and counts for fold 0 and fold 1 (last row/col: the constant 1).

    With ``rows`` (the number of samples that will be added) at most ``dim + 1``, the samples are
    kept instead of ``XᵀX``/``XᵀY`` (``x``, ``y``, ``fold``; ``xtx`` and ``xty`` stay None).
    """

    dim: int
    outputs: int
    rows: int | None = None
    xtx: np.ndarray | None = field(init=False, default=None)
    xty: np.ndarray | None = field(init=False, default=None)
    yy: np.ndarray = field(init=False)
    n: np.ndarray = field(init=False)
    x: np.ndarray | None = field(init=False, default=None)  # [rows, D+1] float32, last column 1
    y: np.ndarray | None = field(init=False, default=None)  # [rows, Cout] float32
    fold: np.ndarray | None = field(init=False, default=None)  # [rows] 0 or 1
    filled: int = field(init=False, default=0)
    images: int = field(init=False, default=0)  # images the rows came from (rows per image given to add)
    _within: np.ndarray | None = field(init=False, default=None)  # inputs differing inside some image
    _across: np.ndarray | None = field(init=False, default=None)  # inputs differing between images
    _first: np.ndarray | None = field(init=False, default=None)  # the first row seen

    def __post_init__(self):
        d = self.dim + 1
        if self.rows is not None and self.rows <= d:
            self.x = np.empty((self.rows, d), np.float32)
            self.y = np.empty((self.rows, self.outputs), np.float32)
            self.fold = np.empty(self.rows, np.int8)
        else:
            self.xtx = np.zeros((2, d, d))
            self.xty = np.zeros((2, d, self.outputs))
        self.yy = np.zeros((2, self.outputs))
        self.n = np.zeros(2, dtype=np.int64)

    def with_outputs(self, cols: np.ndarray) -> "LayerStats":
        """The same problem for the targets ``cols`` only (a layer whose own outputs were cut)."""
        sub = copy.copy(self)
        sub.outputs = len(cols)
        if self.samples_kept:
            sub.y = self.y[:, cols]
        else:
            sub.xty = self.xty[:, :, cols]
        sub.yy = self.yy[:, cols]
        return sub

    def frozen(self, columns: np.ndarray, weight: np.ndarray) -> "LayerStats":
        """The problem of the input ``columns`` alone, the other columns' contributions (their
        weights in ``weight [Cout, D]``) taken out of the targets: a refit of ``columns`` with
        the rest held fixed (a unit's channels after a Concat, the other inputs kept)."""
        columns = np.asarray(columns)
        others = np.setdiff1d(np.arange(self.dim), columns)
        keep = np.append(columns, self.dim)  # and the constant column
        w_other = weight[:, others].astype(np.float64).T  # [O, Cout]
        sub = LayerStats(len(columns), self.outputs, self.filled if self.samples_kept else None)
        sub.images = self.images
        if self._within is not None:
            sub._within, sub._across, sub._first = self._within[columns], self._across[columns], self._first[columns]
        if self.samples_kept:
            x = self.x[:self.filled]
            y = self.y[:self.filled] - (x[:, others].astype(np.float64) @ w_other).astype(np.float32)
            sub.add(x[:, columns], y, self.fold[:self.filled])  # kept again only where still too few
            return sub
        for f in (0, 1):
            xtx, xty = self.xtx[f], self.xty[f]
            spread = xtx[np.ix_(others, others)] @ w_other  # XₒᵀXₒ Wₒᵀ
            sub.xtx[f] = xtx[np.ix_(keep, keep)]
            sub.xty[f] = xty[keep] - xtx[np.ix_(keep, others)] @ w_other
            sub.yy[f] = self.yy[f] - 2 * np.einsum("io,io->o", w_other, xty[others]) + np.einsum("io,io->o", w_other, spread)
        sub.n = self.n.copy()
        return sub

    def fold_part(self, fold: int, per_image: int) -> "LayerStats":
        """The kept samples of ``fold`` alone, as a problem of their own, split again into two
        folds by image (``per_image`` consecutive rows per image, as the sampler adds them)."""
        rows = np.flatnonzero(self.fold[:self.filled] == fold)
        sub = LayerStats(self.dim, self.outputs, len(rows))
        again = ((np.arange(len(rows)) // max(per_image, 1)) % 2).astype(np.int8)
        sub._keep(self.x[rows, :-1], self.y[rows], again)
        return sub

    @property
    def samples_kept(self) -> bool:
        return self.x is not None

    def finite(self) -> bool:
        """Whether every statistic is a finite number (activations that overflow make them NaN or
        Inf). Of ``XᵀX`` only the diagonal is read: by Cauchy–Schwarz its other entries and ``XᵀY``
        are finite where the diagonal and ``ΣY²`` are (a wide layer's ``XᵀX`` holds tens of
        millions of entries)."""
        if self.samples_kept:
            arrays = (self.x[:self.filled], self.y[:self.filled])
        else:
            arrays = (np.diagonal(self.xtx, axis1=1, axis2=2),)
        return all(bool(np.isfinite(a).all()) for a in (*arrays, self.yy))

    def add(self, x: np.ndarray, y: np.ndarray, fold: np.ndarray, per_image: int = 0) -> None:
        """Accumulate rows ``x [n, D]``, ``y [n, Cout]``, each row in fold 0 or 1; with
        ``per_image``, the rows are that many consecutive positions of each image."""
        if per_image:
            self._note_images(x, per_image)
        if self.samples_kept:
            self._keep(x, y, fold)
            return
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
            with np.errstate(over="ignore", invalid="ignore"):  # overflowing activations: see finite()
                self.xtx[f] += xf.T @ xf
                self.xty[f] += xf.T @ yf
            self.yy[f] += np.einsum("ij,ij->j", yf, yf, dtype=np.float64)
            self.n[f] += rows.sum()

    def _note_images(self, x: np.ndarray, per_image: int) -> None:
        images = x.reshape(-1, per_image, x.shape[1])
        self.images += len(images)
        if per_image < 2:
            return
        if self._first is None:
            self._first = images[0, 0].copy()
            self._within = np.zeros(x.shape[1], bool)
            self._across = np.zeros(x.shape[1], bool)
        high, low = images.max(1), images.min(1)
        # a broadcast value is equal at every position up to the rounding of the op that spread it
        self._within |= (high - low > SAME_VALUE * np.maximum(np.abs(high), np.abs(low))).any(0)
        self._across |= (images[:, 0] != self._first).any(0)

    @property
    def per_image_constant(self) -> np.ndarray | None:
        """Inputs that hold one value per image (a pooled map broadcast back, as DeepLab's image
        pooling): an image's rows never differ while images do; None until rows per image are known."""
        return None if self._within is None else ~self._within & self._across

    def samples_per_unknown(self, cols: np.ndarray, fit_bias: bool = True) -> float:
        """Samples per unknown of a refit on the input columns ``cols``: the rows over all its
        unknowns, or the images over the unknowns of inputs that hold one value per image,
        whichever is fewer (those weights see one sample per image however many positions do)."""
        extra = int(fit_bias)
        spu = float(self.n.sum()) / max(len(cols) + extra, 1)
        if self.per_image_constant is not None:
            constant = int(self.per_image_constant[np.asarray(cols, dtype=np.int64)].sum())
            if constant:
                spu = min(spu, self.images / (constant + extra))
        return spu

    def _keep(self, x: np.ndarray, y: np.ndarray, fold: np.ndarray) -> None:
        start, stop = self.filled, self.filled + x.shape[0]
        if stop > len(self.x):
            raise ValueError(f"more samples ({stop}) than the {len(self.x)} announced")
        self.x[start:stop, :-1] = x
        self.x[start:stop, -1] = 1.0
        self.y[start:stop] = y
        self.fold[start:stop] = fold
        self.filled = stop
        yf = self.y[start:stop]
        for f in (0, 1):
            rows = fold == f
            if rows.any():
                self.yy[f] += np.einsum("ij,ij->j", yf[rows], yf[rows], dtype=np.float64)
                self.n[f] += rows.sum()

    def samples(self, cols: np.ndarray | None = None, fold: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The kept samples (float64) of ``fold`` (None: both): ``[X 1][:, cols]`` and ``Y``."""
        rows = np.arange(self.filled) if fold is None else np.flatnonzero(self.fold[:self.filled] == fold)
        x = self.x[rows] if cols is None else self.x[np.ix_(rows, np.asarray(cols))]
        return x.astype(np.float64), self.y[rows].astype(np.float64)

    def total(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(XᵀX, XᵀY, ΣY², n) over both folds (formed from the samples where they are kept)."""
        if self.samples_kept:
            x, y = self.samples()
            return x.T @ x, x.T @ y, self.yy.sum(0), int(self.n.sum())
        return self.xtx.sum(0), self.xty.sum(0), self.yy.sum(0), int(self.n.sum())

    def y_sum(self) -> np.ndarray:
        """``ΣY`` over both folds (the constant column's row of ``XᵀY``)."""
        if self.samples_kept:
            return self.y[:self.filled].sum(0, dtype=np.float64)
        return self.xty[0][self.dim] + self.xty[1][self.dim]

    def error(self, w_aug: np.ndarray, fold: int | None = None) -> float:
        """Sum of squared residuals of ``Y ≈ [X 1] w_aug`` (w_aug ``[D+1, Cout]``)."""
        if self.samples_kept:
            rows = np.flatnonzero(np.any(w_aug != 0, axis=1))
            return self.error_of(rows, w_aug[rows], fold)
        xtx, xty, yy, _ = self.total() if fold is None else (self.xtx[fold], self.xty[fold], self.yy[fold], 0)
        return float(np.einsum("ij,ij->", w_aug, xtx @ w_aug) - 2 * np.einsum("ij,ij->", w_aug, xty) + yy.sum())

    def error_of(self, rows: np.ndarray, w: np.ndarray, fold: int | None = None) -> float:
        """:meth:`error` of the weights ``w [len(rows), Cout]`` on the rows ``rows`` of ``[X 1]`` (zero elsewhere)."""
        return self.error_on(rows, fold)(w)

    def error_on(self, rows: np.ndarray, fold: int | None = None) -> Callable[[np.ndarray], float]:
        """:meth:`error_of` on ``rows`` and ``fold`` as a function of the weights, the sub-problem
        taken out once (several candidate weights are then scored for one copy)."""
        if self.samples_kept:
            x, y = self.samples(rows, fold)
            return lambda w: float(np.square(y - x @ w).sum())
        sub = np.ix_(rows, rows)  # only the rows weighed: (D/len(rows))² less work than the whole XᵀX
        if fold is None:
            xtx, xty, yy = self.xtx[0][sub] + self.xtx[1][sub], self.xty[0][rows] + self.xty[1][rows], self.yy.sum(0)
        else:
            xtx, xty, yy = self.xtx[fold][sub], self.xty[fold][rows], self.yy[fold]
        return lambda w: float(np.einsum("ij,ij->", w, xtx @ w) - 2 * np.einsum("ij,ij->", w, xty) + yy.sum())

    def energy(self, fold: int | None = None) -> float:
        """Sum of squared targets (the error of predicting zero)."""
        return float(self.yy.sum() if fold is None else self.yy[fold].sum())


def pooled(parts: list[LayerStats]) -> LayerStats:
    """One problem from several with the same unknowns and targets: the samples of layers that
    share one weight, each run on a map of its own (a detector head at every pyramid level), so
    that one refit serves them all. Each sample keeps its fold; one problem is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    kept = sum(p.filled for p in parts) if all(p.samples_kept for p in parts) else None
    out = LayerStats(first.dim, first.outputs, kept if kept is not None and kept <= first.dim + 1 else None)
    for p in parts:
        if p.samples_kept:
            out.add(p.x[:p.filled, :-1], p.y[:p.filled], p.fold[:p.filled])
        else:
            out.xtx += p.xtx
            out.xty += p.xty
            out.yy += p.yy
            out.n += p.n
        out.images += p.images
        if p._within is not None:
            if out._within is None:
                out._first, out._within, out._across = p._first.copy(), p._within.copy(), p._across.copy()
            else:
                out._within |= p._within
                out._across |= p._across | (p._first != out._first)
    return out
