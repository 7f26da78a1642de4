"""Refining a pruned producer and its consumer together, through the activation between them.

Layer-wise least squares refits the consumer of a pruned group (its outputs from the kept
channels) and the producer's kept filters (their own outputs), each on its own. Where the two are
convolutions joined only by an elementwise activation and the consumer's output joins a residual
branch (the caller decides: ``GroupPruner``), both are then refined jointly: Adam steps over
slices of the samples, on the error of the consumer's output (after the activation that follows
it, where one does), through the activation between them, on the positions the refit sampled
(each with the producer's input patches at every tap of the consumer's kernel). Four fifths of
the calibration images fit, the last fifth decides: the weights with the lowest held-out error
are kept, and only when they beat the least-squares ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from .ops import Activation
from .sampling import PairSamples

STEPS = 100
CHECK_EVERY = 25  # steps between held-out checks
MAX_VALUES = 1 << 24  # producer input values a pair's samples hold (64 MiB of float32)
LEARNING_RATE = 0.03  # Adam's step, relative to each parameter's mean magnitude
BATCHES = 16  # each step takes the next of this many slices of the fit samples (of MIN_BATCH at least)
MIN_BATCH = 256
MIN_GAIN = 0.01  # held-out relative error must fall by this fraction for the refined weights to be kept


@dataclass
class Refined:
    """A pair's refined weights (``[k, D]``, ``[k]``, ``[Cout, k·taps]``, ``[Cout]``) and its
    held-out relative error before and after."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    error_before: float
    error_after: float


class _Pair:
    """Loss and gradients of ``w2 · act(w1 · x + b1) + b2`` against ``y`` on some samples."""

    def __init__(self, s: PairSamples, rows: slice, act: Activation, out_act: Activation | None):
        self.x, self.inside, self.y = s.x[rows], s.inside[rows].astype(np.float32), s.y[rows]
        self.offset = s.offset[rows]
        self.act, self.out_act = act, out_act
        goal = self.y if out_act is None else out_act[0](self.y + self.offset)
        self.energy = max(float((goal.astype(np.float64) ** 2).sum()), 1e-30)

    def batches(self, count: int) -> list["_Pair"]:
        """``count`` consecutive slices of the samples (views, no copies), each with its share of
        the energy so that their losses average to the whole's."""
        parts = []
        for rows in np.array_split(np.arange(len(self.y)), count):
            part = copy.copy(self)
            sl = slice(int(rows[0]), int(rows[-1]) + 1)
            part.x, part.inside, part.y, part.offset = self.x[sl], self.inside[sl], self.y[sl], self.offset[sl]
            part.energy = self.energy * len(rows) / len(self.y)
            parts.append(part)
        return parts

    def loss(self, params: list[np.ndarray], grad: bool = False):
        w1, b1, w2, b2 = params
        n, taps, _ = self.x.shape
        z1 = (self.x.reshape(n * taps, -1) @ w1.T + b1).reshape(n, taps, -1)
        a1 = self.act[0](z1) * self.inside[:, :, None]
        cols = a1.transpose(0, 2, 1).reshape(n, -1)  # channel-major, as the consumer's patch columns
        z2 = cols @ w2.T + b2
        if self.out_act is None:
            r = z2 - self.y
        else:
            r = self.out_act[0](z2 + self.offset) - self.out_act[0](self.y + self.offset)
        if not grad:
            return float((r.astype(np.float64) ** 2).sum()) / self.energy, None
        dr = (2.0 / self.energy) * r
        if self.out_act is not None:
            dr = dr * self.out_act[1](z2 + self.offset)
        g_w2, g_b2 = dr.T @ cols, dr.sum(axis=0)
        da1 = (dr @ w2).reshape(n, -1, taps).transpose(0, 2, 1)
        dz1 = da1 * self.act[1](z1) * self.inside[:, :, None]
        g_w1 = dz1.reshape(-1, dz1.shape[2]).T @ self.x.reshape(-1, self.x.shape[2])
        return None, [g_w1, dz1.sum(axis=(0, 1)), g_w2, g_b2]


def refine_pair(samples: PairSamples, act: Activation, out_act: Activation | None, w1: np.ndarray,
                b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None) -> Refined | None:
    """Producer and consumer weights refined together (see the module docstring); None where the
    samples are too few to hold any out or the refined weights do not beat the given ones."""
    # the last fifth of the images is held out (slices of the samples, in image order: no copies)
    cut = int(np.searchsorted(samples.image, samples.image[int(len(samples.image) * 0.8)]))
    if cut < 16 or len(samples.image) - cut < 16:
        return None
    fit = _Pair(samples, slice(0, cut), act, out_act)
    check = _Pair(samples, slice(cut, None), act, out_act)
    initial = [np.asarray(p, np.float32) for p in
               (w1, np.zeros(len(w1)) if b1 is None else b1, w2, np.zeros(len(w2)) if b2 is None else b2)]
    # one flat vector for Adam (few large array operations per step); params are views into it
    theta = np.concatenate([p.ravel() for p in initial])
    bounds = np.cumsum([0] + [p.size for p in initial])
    params = [theta[a:b].reshape(p.shape) for a, b, p in zip(bounds[:-1], bounds[1:], initial)]
    scale = np.concatenate([np.full(p.size, LEARNING_RATE * (float(np.abs(p).mean()) + 1e-8), np.float32)
                            for p in initial])
    start, _ = check.loss(params)
    best, best_theta = start, theta.copy()
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    batches = fit.batches(max(1, min(BATCHES, len(fit.y) // MIN_BATCH)))
    for t in range(1, STEPS + 1):
        _, grads = batches[t % len(batches)].loss(params, grad=True)
        grad = np.concatenate([gr.ravel() for gr in grads]).astype(np.float32)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        theta -= scale * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-12)
        if t % CHECK_EVERY == 0:
            now, _ = check.loss(params)
            if now < best:
                best, best_theta = now, theta.copy()
    best_params = [best_theta[a:b].reshape(p.shape) for a, b, p in zip(bounds[:-1], bounds[1:], initial)]
    if best > start * (1 - MIN_GAIN):
        return None
    return Refined(*best_params, error_before=start, error_after=best)
