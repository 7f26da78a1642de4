"""Refining a pruned producer and its consumer together, through what lies between them.

Layer-wise least squares refits the consumer of a pruned group (its outputs from the kept
channels) and the producer's kept filters (their own outputs), each on its own. Where the two are
convolutions joined only by an elementwise activation, or — in an inverted residual block — by
activation, depthwise conv, activation (and a squeeze-excite gate, taken from the pruned model
and held fixed), and the consumer's output joins a residual branch, directly or through an
activation (conv → SiLU → Add in CSP / YOLO bottlenecks; the caller decides: ``GroupPruner``),
all of them are then refined jointly: Adam steps over slices of the samples, on the error of the
residual sum (after the activation that follows it, where one does),
on sampled output positions (each with the producer's input patches at every tap of the
consumer's kernel, or of the depthwise conv's). Four fifths of the calibration images fit, the
last fifth decides: the weights with the lowest held-out error are kept, and only when they beat
the least-squares ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from .ops import Activation
from .sampling import PairSamples

STEPS = 100
CHECK_EVERY = 25  # steps between held-out checks
MAX_VALUES = 1 << 23  # producer input values a branch's samples hold (32 MiB of float32)
LEARNING_RATE = 0.03  # Adam's step, relative to each parameter's mean magnitude
BATCHES = 16  # each step takes the next of at least this many slices of the fit samples
MIN_BATCH = 256  # samples a slice holds at least …
MAX_BATCH = 1024  # … and at most (more slices where there are many samples: a step's cost stays bounded)
MAX_CHECK = 8192  # held-out samples the checks read at most
# samples one array operation covers: temporaries this small are reused by the allocator, larger
# ones are mapped and unmapped again on every step (page faults; docs/benchmarks.md)
CHUNK = 512
MIN_GAIN = 0.01  # held-out relative error must fall by this fraction for the refined weights to be kept


@dataclass
class Middle:
    """A depthwise conv between the producer and the consumer (an inverted residual block's
    3×3): its per-channel filters ``[C, taps]`` over the producer's activations, its bias and the
    activation after it (a squeeze-excite gate, where there is one, comes with the samples)."""

    weight: np.ndarray
    bias: np.ndarray | None
    act: Activation


@dataclass
class Refined:
    """A branch's refined weights (``[k, D]``, ``[k]``, ``[Cout, k·taps]`` or ``[Cout, k]`` after a
    middle, ``[Cout]``; the middle's ``[k, taps]``, ``[k]`` where there is one) and its held-out
    relative error before and after."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    error_before: float
    error_after: float
    wm: np.ndarray | None = None
    bm: np.ndarray | None = None


class _Pair:
    """Loss and gradients of ``w2 · act(w1 · x + b1) + b2`` against ``y`` on some samples; with a
    middle, ``w2 · (gate · act_m(Σ_taps wm · act(w1 · x + b1) + bm)) + b2``; with a join
    activation, that activation of either."""

    def __init__(self, s: PairSamples, rows: slice, act: Activation, out_act: Activation | None,
                 middle_act: Activation | None = None, join_act: Activation | None = None):
        self.x, self.inside, self.y = s.x[rows], s.inside[rows].astype(np.float32), s.y[rows]
        self.offset = s.offset[rows]
        self.gate = None if s.gate is None else s.gate[rows]
        self.act, self.out_act, self.middle_act, self.join_act = act, out_act, middle_act, join_act
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
            part.gate = None if self.gate is None else self.gate[sl]
            part.energy = self.energy * len(rows) / len(self.y)
            parts.append(part)
        return parts

    def loss(self, params: list[np.ndarray], grad: bool = False):
        """Relative squared error on these samples, and (``grad``) its gradients with respect
        to ``params``: ``[w1, b1, w2, b2]``, then ``wm, bm`` where there is a middle."""
        if len(self.y) <= CHUNK:
            return self._loss(params, grad)
        total, grads = 0.0, None
        for part in self.batches(-(-len(self.y) // CHUNK)):
            share = len(part.y) / len(self.y)
            value, g = part._loss(params, grad)
            if grad:
                grads = [share * a for a in g] if grads is None else [acc + share * a for acc, a in zip(grads, g)]
            else:
                total += share * value
        return (None, grads) if grad else (total, None)

    def _loss(self, params: list[np.ndarray], grad: bool):
        w1, b1, w2, b2 = params[:4]
        n, taps, _ = self.x.shape
        z1 = (self.x.reshape(n * taps, -1) @ w1.T).reshape(n, taps, -1)
        z1 += b1
        a1 = self.act[0](z1)
        if a1 is z1:  # the identity: z1 is still needed
            a1 = a1.copy()
        a1 *= self.inside[:, :, None]
        if self.middle_act is None:
            cols = a1.transpose(0, 2, 1).reshape(n, -1)  # channel-major, as the consumer's patch columns
        else:
            wm, bm = params[4:]
            zm = np.einsum("ntk,kt->nk", a1, wm)
            zm += bm
            am = self.middle_act[0](zm)
            cols = am if self.gate is None else am * self.gate
        z2 = cols @ w2.T + b2
        joined = z2 if self.join_act is None else self.join_act[0](z2)
        if self.out_act is None:
            r = joined - self.y
        else:
            r = self.out_act[0](joined + self.offset) - self.out_act[0](self.y + self.offset)
        if not grad:
            return float((r.astype(np.float64) ** 2).sum()) / self.energy, None
        dr = (2.0 / self.energy) * r
        if self.out_act is not None:
            dr = dr * self.out_act[1](joined + self.offset)
        if self.join_act is not None:
            dr = dr * self.join_act[1](z2)
        g_w2, g_b2 = dr.T @ cols, dr.sum(axis=0)
        dcols = dr @ w2
        if self.middle_act is None:
            grad_a1 = [dcols.reshape(n, -1, taps).transpose(0, 2, 1)]
            extra = []
        else:
            dzm = (dcols if self.gate is None else dcols * self.gate) * self.middle_act[1](zm)
            grad_a1 = [dzm[:, None, :], wm.T]  # the gradient reaching a1 is their product
            extra = [np.einsum("nk,ntk->kt", dzm, a1), dzm.sum(axis=0)]
        dz1 = self.act[1](z1)  # a fresh array: the gradient's factors are multiplied into it in place
        for factor in grad_a1:
            dz1 *= factor
        dz1 *= self.inside[:, :, None]
        g_w1 = dz1.reshape(-1, dz1.shape[2]).T @ self.x.reshape(-1, self.x.shape[2])
        return None, [g_w1, dz1.sum(axis=(0, 1)), g_w2, g_b2, *extra]


def refine_pair(samples: PairSamples, act: Activation, out_act: Activation | None, w1: np.ndarray,
                b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None,
                middle: Middle | None = None, join_act: Activation | None = None) -> Refined | None:
    """Producer, consumer (and ``middle``, where given) weights refined together (see the module
    docstring); ``join_act`` is the activation between the consumer and its residual Add, where
    there is one (the samples' targets are then its output's). None where the samples are too few
    to hold any out or the refined weights do not beat the given ones."""
    # the last fifth of the images is held out (slices of the samples, in image order: no copies)
    cut = int(np.searchsorted(samples.image, samples.image[int(len(samples.image) * 0.8)]))
    if cut < 16 or len(samples.image) - cut < 16:
        return None
    middle_act = middle.act if middle else None
    fit = _Pair(samples, slice(0, cut), act, out_act, middle_act, join_act)
    # the check reads every n-th held-out sample, at most MAX_CHECK (it runs every CHECK_EVERY steps)
    check = _Pair(samples, slice(cut, None, -(-(len(samples.image) - cut) // MAX_CHECK)), act, out_act, middle_act,
                  join_act)
    given = [w1, b1, w2, b2] + ([middle.weight, middle.bias] if middle else [])
    initial = [np.asarray(p if p is not None else np.zeros(len(given[i - 1])), np.float32)
               for i, p in enumerate(given)]
    # one flat vector for Adam (few large array operations per step); params are views into it
    theta = np.concatenate([p.ravel() for p in initial])
    bounds = np.cumsum([0] + [p.size for p in initial])
    params = [theta[a:b].reshape(p.shape) for a, b, p in zip(bounds[:-1], bounds[1:], initial)]
    scale = np.concatenate([np.full(p.size, LEARNING_RATE * (float(np.abs(p).mean()) + 1e-8), np.float32)
                            for p in initial])
    start, _ = check.loss(params)
    best, best_theta = start, theta.copy()
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    batches = fit.batches(max(1, min(max(BATCHES, -(-len(fit.y) // MAX_BATCH)), len(fit.y) // MIN_BATCH)))
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
    return Refined(*best_params[:4], error_before=start, error_after=best, wm=best_params[4] if middle else None,
                   bm=best_params[5] if middle else None)
