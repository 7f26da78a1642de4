"""Channel selection criteria: which input channels of a group to keep.

Each criterion returns the sorted indices of the channels to keep.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from .linalg import solve_spd, spd_inverse


class Method(str, enum.Enum):
    """Channel selection methods."""

    LASSO = "lasso"
    THINET = "thinet"
    L1 = "l1"
    SLIM = "slim"
    RANDOM = "random"
    STRIPE = "stripe"  # stripe-wise (Meng et al. 2020): kernel positions of each filter, see stripe.py
    OBS = "obs"  # greedy removal with the exact refit cost (RefitProblem)
    AUTO = "auto"  # the default: resolved per model by :meth:`for_network`

    @property
    def needs_data(self) -> bool:
        return self in (Method.LASSO, Method.THINET, Method.STRIPE, Method.OBS, Method.AUTO)

    @staticmethod
    def for_network(has_depthwise: bool, has_residual_joins: bool, widest_refit: int) -> "Method":
        """What ``auto`` selects with. ``obs`` (ranking channels by what the whole refit loses
        without them) where the network has depthwise convolutions — in inverted-residual blocks
        few, correlated channels feed each refit: ~1 point more kept at 2× on the shipped mobile
        model — and on plain chains without residual joins whose refits are all narrower than
        :data:`AUTO_OBS_MAX_COLUMNS` (0.19 points more at 2× on the VGG-style model). ``lasso``
        on residual networks without depthwise convolutions, where ``obs`` found selections with
        lower layer error but lost more accuracy in every seed, and on wide plain chains, where
        ``obs``'s greedy removal costs O(D²) per channel (VGG-16 at 224²: 2.2× the time).
        Measured: docs/benchmarks.md."""
        if has_depthwise:
            return Method.OBS
        if not has_residual_joins and widest_refit < AUTO_OBS_MAX_COLUMNS:
            return Method.OBS
        return Method.LASSO


def expand_channels(keep: np.ndarray, block: int) -> np.ndarray:
    """Column indices of channels ``keep`` when each channel spans ``block`` consecutive columns."""
    return (np.asarray(keep)[:, None] * block + np.arange(block)[None, :]).ravel()


def normalized_contribution(stats, weight: np.ndarray, bias: np.ndarray | None,
                            channels: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`contribution_problem` of one consumer from its statistics, with the target being
    its output minus bias, divided by the target's energy so several consumers weigh alike."""
    d = stats.dim
    b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    k = weight.shape[1] // channels
    if stats.samples_kept and k > 1 and 3 * 8 * d * d > GRAM_BUDGET:  # XᵀX too big to form: from the samples
        n = int(stats.n.sum())
        energy = max(stats.yy.sum() - 2 * b @ stats.y_sum() + n * b @ b, 1e-30)
        gram, corr = sampled_contribution_problem(stats, weight, b, channels)
        return gram / energy, corr / energy
    xtx, xty, yy, n = stats.total()
    energy = max(yy.sum() - 2 * b @ xty[d] + n * b @ b, 1e-30)
    gram, corr = contribution_problem(xtx[:d, :d], xty[:d] - np.outer(xtx[:d, d], b), weight, channels)
    return gram / energy, corr / energy


def add_unit_contribution(gram: np.ndarray, corr: np.ndarray, consumer_gram: np.ndarray, consumer_corr: np.ndarray,
                          unit_channels: np.ndarray, unit_positions: np.ndarray, other_positions: np.ndarray) -> None:
    """Adds one consumer's contribution problem (over all the channels it reads) to a unit's
    (``gram``, ``corr``, over the unit's channels), in place. The unit's channel
    ``unit_channels[i]`` sits at ``unit_positions[i]`` among the consumer's; where it also reads
    other groups' channels (after a Concat, at ``other_positions``), those stay fixed: the target
    of the unit's channels is the output minus the others' contributions."""
    gram[np.ix_(unit_channels, unit_channels)] += consumer_gram[np.ix_(unit_positions, unit_positions)]
    corr[unit_channels] += (consumer_corr[unit_positions]
                            - consumer_gram[np.ix_(unit_positions, other_positions)].sum(axis=1))


GRAM_BUDGET = 1 << 30  # bytes: above this, per-channel contributions are summed from the kept samples


def sampled_contribution_problem(stats, weight: np.ndarray, bias: np.ndarray, channels: int,
                                 budget: int = 1 << 28) -> tuple[np.ndarray, np.ndarray]:
    """:func:`contribution_problem` from kept samples: the contributions ``Z_c`` are formed for
    a few samples at a time (``budget`` bytes), never ``XᵀX [D, D]`` (5 GB for VGG-16's first
    classifier layer, D = 512·7·7). Products in float32, sums over chunks in float64."""
    cout = weight.shape[0]
    k = weight.shape[1] // channels
    w = np.ascontiguousarray(weight.reshape(cout, channels, k).transpose(1, 2, 0), dtype=np.float32)  # [C, k, Cout]
    gram, corr = np.zeros((channels, channels)), np.zeros(channels)
    step = max(1, budget // (4 * channels * cout))
    for start in range(0, stats.filled, step):
        x = stats.x[start:start + step, :-1].reshape(-1, channels, k).transpose(1, 0, 2)  # [C, r, k]
        t = (stats.y[start:start + step] - bias).astype(np.float32)  # [r, Cout]
        z = np.matmul(x, w)  # [C, r, Cout]
        flat = z.reshape(channels, -1)
        gram += flat @ flat.T
        corr += flat @ t.reshape(-1)
    return gram, corr


def contribution_problem(xtx: np.ndarray, xt_target: np.ndarray, weight: np.ndarray,
                         channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrix and correlations of the per-channel contributions ``Z_c = X_c W_cᵀ``.

    ``xtx`` is ``XᵀX [D, D]`` of the input patches, ``xt_target`` is ``XᵀT [D, Cout]`` with T
    the target (output minus bias), ``weight`` is ``[Cout, D]`` with ``D = channels·k``.
    Returns ``G[c, d] = <Z_c, Z_d>`` and ``b[c] = <Z_c, T>`` without forming any ``Z_c``.
    """
    k = weight.shape[1] // channels
    m = weight.T @ weight  # [D, D]
    gram = (xtx * m).reshape(channels, k, channels, k).sum(axis=(1, 3))
    corr = (weight.T * xt_target).reshape(channels, k, -1).sum(axis=(1, 2))
    return gram, corr


def per_segment(select: Callable[[np.ndarray, int], np.ndarray], channels: int, segments: int,
                keep: int) -> np.ndarray:
    """Keep ``keep`` channels, equally many in each of ``segments`` equal runs (the groups of a
    grouped conv). ``select(run, n)`` returns the positions within ``run`` of the ``n`` it keeps."""
    if segments <= 1:
        return np.sort(select(np.arange(channels), keep))
    per_run = max(1, int(round(keep / segments)))
    runs = np.arange(channels).reshape(segments, channels // segments)
    return np.sort(np.concatenate([run[select(run, per_run)] for run in runs]))


LARS_MAX_CHANNELS = 1024
"""Wider groups (VGG-16's 4096-wide classifier) are chosen by :func:`thinet_order` on the same
contribution Gram: sklearn's LARS costs O(C³) with a Python step per variable (about 5 minutes
for one path at C = 4096, and more where variables drop out), the greedy removal O(C²)."""


def lasso_select(gram: np.ndarray, corr: np.ndarray, keep: int) -> np.ndarray:
    """Channels kept by LASSO: ``min ‖T − Σ β_c Z_c‖² + λ‖β‖₁`` with λ raised until ``keep`` remain.

    The whole λ path is followed exactly (LARS-lasso on the Gram matrix, warm by construction);
    the first point with at least ``keep`` non-zero β gives the selection, topped up or cut by |β|.
    """
    return lasso_selections(gram, corr, [keep])[0]


def lasso_selections(gram: np.ndarray, corr: np.ndarray, keeps: Sequence[int]) -> list[np.ndarray]:
    """:func:`lasso_select` for several ``keeps`` from one LARS path: the path is the same for
    every ``keep``, and each selection reads the prefix a path of its own length would have had.
    Groups wider than :data:`LARS_MAX_CHANNELS` use the greedy removal order instead."""
    from sklearn.linear_model import lars_path_gram

    c = len(corr)
    if c > LARS_MAX_CHANNELS:
        order = thinet_order(gram)
        return [np.arange(c) if k >= c else np.sort(order[c - k:]) for k in keeps]
    iters = {k: max(k * 4, 50) for k in keeps if k < c}
    if not iters:
        return [np.arange(c) for _ in keeps]
    scale = np.trace(gram) / c or 1.0
    g = gram / scale
    b = corr / scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, coefs = lars_path_gram(Xy=b, Gram=g, n_samples=1, method="lasso",
                                     max_iter=max(iters.values()), eps=1e-12)
    nnz = (np.abs(coefs) > 0).sum(axis=0)
    chosen = []
    for keep in keeps:
        if keep >= c:
            chosen.append(np.arange(c))
            continue
        own = nnz[:iters[keep] + 1]  # the columns a path stopped at max_iter = iters[keep] has
        hit = np.flatnonzero(own >= keep)
        beta = coefs[:, hit[0]] if len(hit) else coefs[:, len(own) - 1]
        # rank by |β|, breaking ties (zeros) by each channel's own contribution energy
        order = np.lexsort((-np.diag(g), -np.abs(beta)))
        chosen.append(np.sort(order[:keep]))
    return chosen


def thinet_order(gram: np.ndarray) -> np.ndarray:
    """ThiNet's greedy removal order (Luo et al. 2017): position i holds the channel removed
    i-th, each time the one whose removal keeps the summed contribution of the removed channels
    smallest. With ``G`` the Gram matrix of per-channel contributions, the removed set ``R``
    costs ``‖Σ_{c∈R} Z_c‖² = 1ᵀ G_RR 1``; adding ``c`` raises it by ``G_cc + 2 Σ_{d∈R} G_cd``,
    kept up to date incrementally (O(C²) in all)."""
    c = len(gram)
    removed = np.zeros(c, dtype=bool)
    cross = np.zeros(c)  # Σ_{d∈R} G[:, d]
    diag = np.diag(gram)
    order = np.empty(c, dtype=int)
    for i in range(c):
        cost = np.where(removed, np.inf, diag + 2 * cross)
        pick = int(np.argmin(cost))
        removed[pick] = True
        order[i] = pick
        cross += gram[pick]  # a row: the Gram matrix is symmetric, rows are contiguous
    return order


def thinet_select(gram: np.ndarray, keep: int) -> np.ndarray:
    """ThiNet: the ``keep`` channels removed last by :func:`thinet_order`."""
    return np.sort(thinet_order(gram)[len(gram) - keep:])


def l1_select(filter_norms: np.ndarray, keep: int) -> np.ndarray:
    """Channels whose producing filters have the largest L1 norm (Li et al. 2017)."""
    order = np.argsort(-filter_norms, kind="stable")
    return np.sort(order[:keep])


def slim_select(bn_scales: np.ndarray, keep: int) -> np.ndarray:
    """Network Slimming (Liu et al. 2017): channels with the largest |γ| of their BatchNorm."""
    return l1_select(np.abs(bn_scales), keep)


def random_select(channels: int, keep: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random subset of channels: the baseline every criterion must beat."""
    return np.sort(rng.choice(channels, size=keep, replace=False))


OBS_MAX_COLUMNS = 8192  # wider inputs (VGG-16's first classifier layer) are chosen by LASSO: H⁻¹ would not fit
# ``auto`` uses obs on a plain chain only if its widest refit is narrower: the greedy removal's
# downdates cost O(D·k²) per removed channel and grow with the channels already removed
AUTO_OBS_MAX_COLUMNS = 2048
# Greedy removal steps at most per order: a unit of more channels than this loses them this
# many-th at a time (the cheapest of each step together, with one exact update), since each
# update reads the consumer's whole D×Cout weights (a 3072-channel MLP of a ConvNeXt: 2150
# single removals took 15 ms each). Units up to this wide lose one channel per step.
OBS_STEPS = 256


# A refit problem whose removable channels are at most this share of its input channels (a
# DenseNet layer's 32 of up to 1024, an Inception branch) solves for those channels' columns of
# H⁻¹ instead of inverting H: one LU solve instead of a Cholesky check and a full inverse.
PARTIAL_INVERSE_SHARE = 0.5


class RefitProblem:
    """One consumer's least-squares refit over its input channels, for greedy removal with the
    exact cost (optimal brain surgeon on the refit, not on the loss): with ``H = [X 1]ᵀ[X 1]``
    (ridged towards the current weights) and the optimal weights ``W*``, removing channel ``c``'s
    columns ``B`` raises the squared error by ``W*_Bᵀ (H⁻¹_BB)⁻¹ W*_B`` and moves the other
    weights by ``−H⁻¹_:B (H⁻¹_BB)⁻¹ W*_B``.

    ``H⁻¹`` itself is never rewritten: each removal's downdate ``H⁻¹_:B (H⁻¹_BB)⁻¹ H⁻¹_B:`` is
    kept as ``v vᵀ`` (k columns of ``V``), the channels' diagonal blocks are downdated as they
    go, and a column block of the current ``H⁻¹`` is ``H⁻¹₀[:, B] − V V[B]ᵀ`` — O(D·k·removed)
    per removal instead of a pass over the whole D² matrix. The costs need each channel's
    ``W*_c W*_cᵀ`` (k×k) and ``W*_c·W₀_c``, which are updated with the weights (two D×Cout×k
    products per removal) instead of being formed again from the D×Cout weights.

    ``removable``: the only channels that may go (None: all). Where they are at most
    :data:`PARTIAL_INVERSE_SHARE` of the channels, only their columns of ``H⁻¹₀`` are solved for
    and only their costs kept (the others' read inf)."""

    def __init__(self, stats, weight: np.ndarray, bias: np.ndarray | None, channels: int, ridge: float,
                 removals: int | None = None, removable: np.ndarray | None = None):
        xtx, xty, yy, n = stats.total()
        d = weight.shape[1]
        self.k = k = d // channels
        self.channels = channels
        b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
        h = xtx.astype(np.float64, copy=True)
        diag = np.diag(h)[:d]
        self.r = ridge * (float(diag.mean()) if diag.size and diag.mean() > 0 else 1.0)
        h[np.arange(d), np.arange(d)] += self.r
        rhs = xty.astype(np.float64, copy=True)
        rhs[:d] += self.r * weight.T
        partial = removable is not None and len(removable) <= PARTIAL_INVERSE_SHARE * channels
        # the channels whose costs are kept, and the position of each channel among them
        self.tracked = np.sort(np.asarray(removable, dtype=np.int64)) if partial else np.arange(channels)
        self.slot = np.full(channels, -1, dtype=np.int64)
        self.slot[self.tracked] = np.arange(len(self.tracked))
        self.rows = expand_channels(self.tracked, k) if partial else slice(0, d)  # their columns of H
        tracked_columns = slice(None) if partial else self.rows  # theirs among hinv0's columns
        if partial:
            unit = np.zeros((d + 1, len(self.tracked) * k))
            unit[self.rows, np.arange(unit.shape[1])] = 1.0
            solved = solve_spd(h, np.hstack([rhs, unit]))
            self.w, self.hinv0 = solved[:, :rhs.shape[1]], solved[:, rhs.shape[1]:]  # H⁻¹₀[:, tracked columns]
        else:
            self.hinv0 = spd_inverse(h)
            self.w = self.hinv0 @ rhs  # [D+1, Cout]
        del h
        self.w0 = weight.T.astype(np.float64)
        self.energy = max(float(yy.sum() - 2 * b @ xty[d] + n * b @ b), 1e-30)
        tracked = len(self.tracked)
        self.removed = np.zeros(tracked, dtype=bool)
        self.blocks = self.hinv0[self.rows, tracked_columns].reshape(
            tracked, k, tracked, k)[np.arange(tracked), :, np.arange(tracked), :]
        wb = self.w[self.rows].reshape(tracked, k, -1)
        self.gram = wb @ wb.transpose(0, 2, 1)  # [tracked, k, k]: W*_c W*_cᵀ
        self.cross = np.einsum("cko,cko->c", wb, self.w0[self.rows].reshape(tracked, k, -1))  # W*_c·W₀_c
        self.v = np.zeros((d + 1, k * (tracked if removals is None else removals)))
        self.rank = 0

    def costs(self) -> np.ndarray:
        """Relative error each remaining channel's removal adds (inf for removed and untracked ones)."""
        k = self.k
        blocks = self.blocks.copy()
        blocks[self.removed] = np.eye(k)
        inverse = 1.0 / blocks if k == 1 else np.linalg.inv(blocks)  # a 1×1 conv or Gemm: no LAPACK call
        cost = np.einsum("ckl,clk->c", inverse, self.gram)  # Σ_o W*_cᵀ B_c⁻¹ W*_c
        # the ridge's pull on a removed channel is not error: take its penalty terms out
        # (‖W*_c − W₀_c‖² − ‖W₀_c‖² = ‖W*_c‖² − 2 W*_c·W₀_c)
        cost += self.r * (np.trace(self.gram, axis1=1, axis2=2) - 2 * self.cross)
        cost = np.maximum(cost, 0.0) / self.energy
        cost[self.removed] = np.inf
        if len(self.tracked) == self.channels:
            return cost
        full = np.full(self.channels, np.inf)
        full[self.tracked] = cost
        return full

    def remove(self, channels: int | np.ndarray) -> None:
        """Removes one tracked channel, or several together (``B`` then all their columns), exactly."""
        channels = np.atleast_1d(np.asarray(channels, dtype=np.int64))
        k = self.k
        cols = expand_channels(channels, k)
        slots = self.slot[channels]
        v = self.v[:, :self.rank]
        hb = self.hinv0[:, expand_channels(slots, k)] - v @ v[cols].T  # the current H⁻¹[:, B]
        m = 1.0 / hb[cols] if len(cols) == 1 else np.linalg.inv(hb[cols])
        u = m @ self.w[cols]  # the weights move by −hb u
        c = len(self.tracked)
        hc = hb[self.rows].reshape(c, k, len(cols))
        a = (self.w[self.rows] @ u.T).reshape(c, k, len(cols)) @ hc.transpose(0, 2, 1)  # W*_c (hb_c u)ᵀ
        self.gram += hc @ (u @ u.T) @ hc.transpose(0, 2, 1) - a - a.transpose(0, 2, 1)
        self.cross -= np.einsum("cjl,cjl->c", hc, (self.w0[self.rows] @ u.T).reshape(c, k, len(cols)))
        self.w -= hb @ u
        self.w[cols] = 0.0
        self.gram[slots], self.cross[slots] = 0.0, 0.0
        try:
            if len(cols) == 1 and m[0, 0] > 0:  # one column: no LAPACK call
                new = hb * np.sqrt(m[0, 0])
            else:
                new = hb @ np.linalg.cholesky((m + m.T) / 2)  # v vᵀ = H⁻¹_:B (H⁻¹_BB)⁻¹ H⁻¹_B:
        except np.linalg.LinAlgError:
            evals, evecs = np.linalg.eigh((m + m.T) / 2)
            new = hb @ (evecs * np.sqrt(np.maximum(evals, 0.0)))
        while self.rank + len(cols) > self.v.shape[1]:
            self.v = np.hstack([self.v, np.zeros((self.v.shape[0], max(self.v.shape[1], len(cols))))])
        self.v[:, self.rank:self.rank + len(cols)] = new
        self.rank += len(cols)
        nb = new[self.rows].reshape(c, k, len(cols))
        self.blocks -= np.einsum("cij,clj->cil", nb, nb)
        self.removed[slots] = True


def obs_order(problems: list[tuple[RefitProblem, np.ndarray, np.ndarray]], channels: int,
              removable: np.ndarray, count: int | None = None) -> np.ndarray:
    """Greedy removal order of ``count`` (default: all) of the ``removable`` channels (of
    ``channels``): each time the one whose removal adds the least summed relative refit error
    over ``problems`` — (problem, the unit channels it sees, their positions among its input
    channels) — then every problem is updated exactly. Of more than :data:`OBS_STEPS` removable
    channels, each step takes the ``ceil(removable / OBS_STEPS)`` cheapest together; the step
    depends on the removable channels only, so a shorter order is a prefix of a longer one."""
    removable = np.asarray(removable)
    left = np.zeros(channels, dtype=bool)
    left[removable] = True
    step = -(-len(removable) // OBS_STEPS)
    total = len(removable) if count is None else count
    order: list[int] = []
    while len(order) < total:
        cost = np.zeros(channels)
        for prob, at, mine in problems:
            cost[at] += prob.costs()[mine]
        cost[~left] = np.inf
        picks = np.argsort(cost, kind="stable")[:min(step, total - len(order))] if step > 1 else [int(np.argmin(cost))]
        order.extend(int(p) for p in picks)
        left[picks] = False
        for prob, at, mine in problems:
            hits = [int(mine[np.flatnonzero(at == p)[0]]) for p in picks if (at == p).any()]
            if hits:
                prob.remove(np.array(hits))
    return np.asarray(order, dtype=int)
