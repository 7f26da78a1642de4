"""Refining a pruned producer and its consumer together, through what lies between them.

Layer-wise least squares refits the consumer of a pruned group (its outputs from the kept
channels) and the producer's kept filters (their own outputs), each on its own. Where the two are
convolutions joined only by an elementwise activation, or — in an inverted residual block — by
activation, depthwise conv, activation (and a squeeze-excite gate, taken from the pruned model
and held fixed), or — in a ResNeXt / RegNet block — by activation, a grouped conv that passes
whole groups, activation, and the consumer's output joins a residual branch, directly or through an
activation (conv → SiLU → Add in CSP / YOLO bottlenecks), or — in a plain chain's
depthwise-separable block — the two are joined through a depthwise or whole-group conv (the
caller decides: ``GroupPruner``), all of them are then refined jointly: Adam steps over slices of
the samples, on the error of the residual sum (after the activation that follows it, where one
does; in a plain chain, of the consumer's own output), on sampled output positions
(each with the producer's input patches at every tap of the consumer's kernel, or of the
middle conv's) or on whole maps (each image's producer patches at every position, the taps
gathered from them: :class:`~onnxprune.sampling.PairSamples`). Four fifths of the calibration
images fit, the last fifth decides: the weights with the lowest held-out error are kept, and only
when they beat the least-squares ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from .adam import adam_step
from .ops import Activation, Window
from .sampling import PairSamples

STEPS = 200  # held-out gains level off here (docs/benchmarks.md, "Prune time and refinement steps")
CHECK_EVERY = 25  # steps between held-out checks
MAX_VALUES = 1 << 23  # producer input values a branch's samples hold (32 MiB of float32) …
# … or its whole maps (PairSamples): a step over them computes each producer output once, not once
# per consumer tap, so the same step cost covers several times the samples (64 MiB)
WHOLE_MAX_VALUES = 1 << 24
LEARNING_RATE = 0.03  # Adam's step, relative to each parameter's mean magnitude
BATCHES = 16  # each step takes the next of at least this many slices of the fit samples
MIN_BATCH = 256  # samples a slice holds at least …
MAX_BATCH = 1024  # … and at most (more slices where there are many samples: a step's cost stays bounded)
WHOLE_MAX_BATCH = 4096  # … or, on whole maps, where a sample costs less (the producer is computed once per position);
# a slice holds whole images, and fewer of them (2 048 samples: 2–3 images of a 28² map) lost accuracy
# on small calibration sets
MAX_CHECK = 8192  # held-out samples the checks read at most
# samples one array operation covers: temporaries this small are reused by the allocator, larger
# ones are mapped and unmapped again on every step (page faults; docs/benchmarks.md)
CHUNK = 512
WHOLE_CHUNK = 2048  # on whole maps (their largest temporaries hold a sample's taps once, not its patches)
MIN_GAIN = 0.01  # held-out relative error must fall by this fraction for the refined weights to be kept
# values of one tap's view that the depthwise gradient loop covers at a time: a few images' maps, which
# stay in cache over the taps (gathering every tap's patches instead wrote and read taps × the map)
WINDOW_VALUES = 1 << 17


@dataclass
class Middle:
    """A depthwise conv between the producer and the consumer (an inverted residual block's
    3×3), or a grouped conv that passes whole groups (a ResNeXt / RegNet block's): its filters
    ``[C, per_group · taps]`` over the producer's activations (channel-major within a group), its
    bias and the activation after it (a squeeze-excite gate, where there is one, comes with the
    samples)."""

    weight: np.ndarray
    bias: np.ndarray | None
    act: Activation
    per_group: int = 1  # channels each conv group reads and writes (1: depthwise)


def _by_group(a: np.ndarray, per_group: int) -> np.ndarray:
    """Tap-major samples ``[n, taps, C]`` as ``[groups, n, taps · per_group]`` (contiguous)."""
    n, taps, c = a.shape
    return np.ascontiguousarray(a.reshape(n, taps, c // per_group, per_group).transpose(2, 0, 1, 3)).reshape(
        c // per_group, n, taps * per_group)


def _group_filters(wm: np.ndarray, per_group: int, taps: int) -> np.ndarray:
    """A grouped middle's ``[C, per_group · taps]`` (input channel-major) as ``[groups, taps ·
    per_group, per_group]``: each group's filters as a matrix from its tap-major inputs to its outputs."""
    groups = len(wm) // per_group
    return np.ascontiguousarray(wm.reshape(groups, per_group, per_group, taps).transpose(0, 3, 2, 1)).reshape(
        groups, taps * per_group, per_group)


def _windows(maps: np.ndarray, window: Window) -> np.ndarray:
    """Padded channels-last ``maps`` ``[rows, *padded, k]`` as a read-only view ``[rows, *out_shape,
    *kernel, k]``: the window each output position reads (no copy; the window's taps must stay
    inside the padded map, as :meth:`~onnxprune.ops.Window.tap_views` checks)."""
    s, axes = maps.strides, len(window.kernel)
    return np.lib.stride_tricks.as_strided(
        maps, (maps.shape[0], *window.out_shape, *window.kernel, maps.shape[-1]),
        (s[0], *(s[1 + a] * window.strides[a] for a in range(axes)),
         *(s[1 + a] * window.dilations[a] for a in range(axes)), s[-1]), writeable=False)


def _subscripts(window: Window) -> tuple[str, str]:
    """einsum letters of a window view's output axes and kernel axes."""
    axes = len(window.kernel)
    return "abcdefgh"[:axes], "stuvwxyz"[:axes]


def _window_sum(maps: np.ndarray, weights: np.ndarray, window: Window) -> np.ndarray:
    """A depthwise conv of padded channels-last ``maps`` ``[rows, *padded, k]`` by tap-major
    ``weights`` ``[taps, k]``: ``[rows, *out_shape, k]``."""
    out, taps = _subscripts(window)
    return np.einsum(f"r{out}{taps}k,{taps}k->r{out}k", _windows(maps, window),
                     weights.reshape(*window.kernel, -1))


def _window_grads(maps: np.ndarray, d: np.ndarray, weights: np.ndarray, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """For :func:`_window_sum`'s output gradient ``d``: its weights' gradient ``[k, taps]`` and
    the gradient reaching the padded maps (like ``maps``), added back through each tap's view
    a few images at a time, so that the map stays in cache over the taps."""
    out, taps = _subscripts(window)
    g_w = np.einsum(f"r{out}{taps}k,r{out}k->k{taps}", _windows(maps, window), d).reshape(d.shape[-1], -1)
    rows, views = maps.shape[0], window.tap_views()
    reached = np.zeros_like(maps)
    step = max(1, WINDOW_VALUES // max(d[0].size, 1))
    scratch = np.empty((min(step, rows), *d.shape[1:]), np.float32)
    for r in range(0, rows, step):
        part, tmp = d[r:r + step], scratch[:min(step, rows - r)]
        for view, w in zip(views, weights):
            np.multiply(part, w, out=tmp)
            reached[(slice(r, r + step), *view)] += tmp
    return g_w, reached


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
    activation, that activation of either. Its rows are samples or, on whole maps (the samples'
    ``tap_index``), images."""

    def __init__(self, s: PairSamples, rows: slice, act: Activation, out_act: Activation | None,
                 middle_act: Activation | None = None, join_act: Activation | None = None, per_group: int = 1):
        self.per_group = per_group
        self.x, self.y, self.offset = s.x[rows], s.y[rows], s.offset[rows]
        self.gate = None if s.gate is None else s.gate[rows]
        self.tap_index = s.tap_index
        # a depthwise middle on whole maps reads its taps as shifted views of the padded maps
        self.window = s.window if middle_act is not None and per_group == 1 else None
        self.views = None if self.window is None or int(np.prod(self.window.in_shape)) != s.x.shape[1] \
            else self.window.tap_views()
        if s.tap_index is None:
            self.inside = s.inside[rows].astype(np.float32)
        elif self.views is None:
            outputs, taps = s.tap_index.shape
            hidden = s.x.shape[1]
            # a tap in the padding reads a spare zero row past the map's positions (no mask to apply)
            self.read_index = np.where(s.inside, s.tap_index, hidden)
            # the gradient at a map position gathers what each tap read from it: the (output, tap)
            # pair reading it there, flattened, or a spare zero past them (no output's tap reads it)
            self.back_index = np.full((taps, 1, hidden), outputs * taps)  # [tap, (image), position]
            out, tap = np.nonzero(s.inside)
            self.back_index[tap, 0, s.tap_index[out, tap]] = out * taps + tap
            self.back_spare = self.back_index == outputs * taps
            self._indices_by_rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # by rows; shared by the slices
        self.act, self.out_act, self.middle_act, self.join_act = act, out_act, middle_act, join_act
        # what the output activation makes of the targets: fixed, so formed once
        self.goal = self.y if out_act is None else out_act[0](self.y + self.offset)
        self.energy = max(float((self.goal.astype(np.float64) ** 2).sum()), 1e-30)

    def _flat_indices(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Whole maps of ``rows`` images: where each (output, tap) reads in the flat maps, and,
        per tap and position, where its gradient comes from in the flat (output, tap) rows — the
        same on every step, so formed once per slice size."""
        if rows not in self._indices_by_rows:
            outputs, taps = self.tap_index.shape
            read = self.read_index + (np.arange(rows) * (self.x.shape[1] + 1))[:, None, None]
            back = np.where(self.back_spare, rows * outputs * taps,
                            self.back_index + (np.arange(rows) * (outputs * taps))[None, :, None])
            self._indices_by_rows[rows] = (read, back)
        return self._indices_by_rows[rows]

    @property
    def samples(self) -> int:
        """Consumer output positions these rows hold."""
        return len(self.y) * (1 if self.tap_index is None else len(self.tap_index))

    def batches(self, count: int) -> list["_Pair"]:
        """``count`` consecutive slices of the rows (views, no copies), each with its share of
        the energy so that their losses average to the whole's."""
        parts = []
        for rows in np.array_split(np.arange(len(self.y)), min(count, len(self.y))):
            part = copy.copy(self)
            sl = slice(int(rows[0]), int(rows[-1]) + 1)
            part.x, part.y, part.offset, part.goal = self.x[sl], self.y[sl], self.offset[sl], self.goal[sl]
            if self.tap_index is None:
                part.inside = self.inside[sl]
            part.gate = None if self.gate is None else self.gate[sl]
            part.energy = self.energy * len(rows) / len(self.y)
            parts.append(part)
        return parts

    def loss(self, params: list[np.ndarray], grad: bool = False):
        """Relative squared error on these samples, and (``grad``) its gradients with respect
        to ``params``: ``[w1, b1, w2, b2]``, then ``wm, bm`` where there is a middle."""
        chunk = CHUNK if self.tap_index is None else WHOLE_CHUNK
        if self.samples <= chunk or len(self.y) == 1:
            return self._loss(params, grad)
        total, grads = 0.0, None
        for part in self.batches(-(-self.samples // chunk)):
            share = len(part.y) / len(self.y)
            value, g = part._loss(params, grad)
            if grad:
                grads = [share * a for a in g] if grads is None else [acc + share * a for acc, a in zip(grads, g)]
            else:
                total += share * value
        return (None, grads) if grad else (total, None)

    def _loss(self, params: list[np.ndarray], grad: bool):
        w1, b1, w2, b2 = params[:4]
        rows, hidden, _ = self.x.shape
        k = len(w1)
        whole = self.tap_index is not None
        if whole:  # each image holds its map, with a spare zero row: gather every output position's taps
            outputs, taps = self.tap_index.shape
            n = rows * outputs
            z1 = (self.x.reshape(rows * hidden, -1) @ w1.T).reshape(rows, hidden, -1)
            z1 += b1
            if self.views is not None:
                maps = np.zeros((rows, *self.window.padded, k), np.float32)
                maps[(slice(None), *self.window.interior)] = self.act[0](z1).reshape(rows, *self.window.in_shape, k)
            else:
                a1 = np.empty((rows, hidden + 1, k), np.float32)
                a1[:, :hidden] = self.act[0](z1)
                a1[:, hidden] = 0
                # np.take on flat rows: several times faster than fancy indexing along an inner axis
                a1 = np.take(a1.reshape(-1, k), self._flat_indices(rows)[0], axis=0).reshape(n, taps, k)
            gate = None if self.gate is None else np.repeat(self.gate, outputs, axis=0)
        else:  # each sample holds its taps
            n, taps = rows, hidden
            z1 = (self.x.reshape(rows * hidden, -1) @ w1.T).reshape(rows, hidden, -1)
            z1 += b1
            a1 = self.act[0](z1)
            if a1 is z1:  # the identity: z1 is still needed
                a1 = a1.copy()
            a1 *= self.inside[:, :, None]
            gate = self.gate
        goal, offset = self.goal.reshape(n, -1), self.offset.reshape(n, -1)
        # gathered taps are tap-major: the consumer's weights are reordered to them instead (smaller)
        tap_major = whole and self.middle_act is None
        if tap_major:
            w2 = w2.reshape(len(w2), k, taps).transpose(0, 2, 1).reshape(len(w2), -1)
            cols = a1.reshape(n, -1)
        elif self.middle_act is None:
            cols = a1.transpose(0, 2, 1).reshape(n, -1)  # channel-major, as the consumer's patch columns
        else:
            wm, bm = params[4:]
            if self.per_group == 1:
                # tap-major like a1's taps: contiguous over channels, einsum and broadcasting run several times faster
                wm_taps = np.ascontiguousarray(wm.T)
                if self.views is not None:
                    zm = _window_sum(maps, wm_taps, self.window).reshape(n, k)
                else:
                    zm = np.einsum("ntk,tk->nk", a1, wm_taps)
            else:  # one product per conv group: [groups, n, taps · per_group] @ [groups, taps · per_group, per_group]
                a1_groups, wm_groups = _by_group(a1, self.per_group), _group_filters(wm, self.per_group, taps)
                zm = np.ascontiguousarray(np.matmul(a1_groups, wm_groups).transpose(1, 0, 2)).reshape(n, k)
            zm += bm
            am = self.middle_act[0](zm)
            cols = am if gate is None else am * gate
        z2 = cols @ w2.T + b2
        joined = z2 if self.join_act is None else self.join_act[0](z2)
        if self.out_act is None:
            r = joined - goal
        else:
            joined += offset  # joined is z2 only without a join activation, and z2 is not read again then
            r = self.out_act[0](joined) - goal
        if not grad:
            return float((r.astype(np.float64) ** 2).sum()) / self.energy, None
        dr = (2.0 / self.energy) * r
        if self.out_act is not None:
            dr *= self.out_act[1](joined)
        if self.join_act is not None:
            dr *= self.join_act[1](z2)
        g_w2, g_b2 = dr.T @ cols, dr.sum(axis=0)
        if tap_major:
            g_w2 = g_w2.reshape(len(w2), taps, k).transpose(0, 2, 1).reshape(len(w2), -1)
        if self.middle_act is None:
            extra = []
        else:
            dzm = (dr @ w2 if gate is None else (dr @ w2) * gate) * self.middle_act[1](zm)
            if self.views is not None:
                g_wm, reached_maps = _window_grads(maps, dzm.reshape(rows, *self.window.out_shape, k), wm_taps,
                                                   self.window)
                extra = [g_wm, dzm.sum(axis=0)]
            elif self.per_group == 1:
                extra = [np.einsum("nk,ntk->kt", dzm, a1), dzm.sum(axis=0)]
            else:
                groups, per = k // self.per_group, self.per_group
                dzm_groups = np.ascontiguousarray(dzm.reshape(n, groups, per).transpose(1, 0, 2))  # [groups, n, per]
                g_wm = np.matmul(a1_groups.transpose(0, 2, 1), dzm_groups)  # [groups, taps · per, per]
                g_wm = g_wm.reshape(groups, taps, per, per).transpose(0, 3, 2, 1).reshape(k, per * taps)
                extra = [g_wm, dzm.sum(axis=0)]
                # what reaches each tap's activations, tap-major as a1: [n, taps, k]
                reached_a1 = np.matmul(dzm_groups, wm_groups.transpose(0, 2, 1)).reshape(
                    groups, n, taps, per).transpose(1, 2, 0, 3).reshape(n, taps, k)
        dz1 = self.act[1](z1)  # a fresh array: the gradient reaching a1 is multiplied into it in place
        if self.views is not None:
            dz1.reshape(rows, *self.window.in_shape, k)[...] *= reached_maps[(slice(None), *self.window.interior)]
        elif whole:  # each tap's gradient back to the map position it read, from a buffer with a spare zero
            flat = np.empty((n * taps + 1, k), np.float32)
            flat[-1] = 0
            reached = flat[:-1].reshape(n, taps, k)
            if tap_major:
                np.matmul(dr, w2, out=reached.reshape(n, taps * k))
            elif self.per_group == 1:
                np.multiply(dzm[:, None, :], wm_taps, out=reached)
            else:
                reached[...] = reached_a1
            # tap by tap (a reduction over the taps axis of one large gather is several times slower)
            index = self._flat_indices(rows)[1]
            reaching = np.take(flat, index[0], axis=0)
            for tap in range(1, taps):
                reaching += np.take(flat, index[tap], axis=0)
            dz1 *= reaching
        else:
            if self.middle_act is None:
                dz1 *= (dr @ w2).reshape(n, -1, taps).transpose(0, 2, 1)
            elif self.per_group == 1:
                dz1 *= dzm[:, None, :]
                dz1 *= wm_taps
            else:
                dz1 *= reached_a1
            dz1 *= self.inside[:, :, None]
        g_w1 = dz1.reshape(-1, k).T @ self.x.reshape(-1, self.x.shape[2])
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
    per_row = 1 if samples.tap_index is None else len(samples.tap_index)  # samples a row holds
    if min(cut, len(samples.image) - cut) * per_row < 16 or cut == 0 or cut == len(samples.image):
        return None
    middle_act = middle.act if middle else None
    per_group = middle.per_group if middle else 1
    fit = _Pair(samples, slice(0, cut), act, out_act, middle_act, join_act, per_group)
    # the check reads every n-th held-out row, at most MAX_CHECK samples (it runs every CHECK_EVERY steps)
    check = _Pair(samples, slice(cut, None, -(-(len(samples.image) - cut) * per_row // MAX_CHECK)), act, out_act,
                  middle_act, join_act, per_group)
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
    limit = MAX_BATCH if samples.tap_index is None else WHOLE_MAX_BATCH
    batches = fit.batches(max(1, min(max(BATCHES, -(-fit.samples // limit)), fit.samples // MIN_BATCH)))
    for t in range(1, STEPS + 1):
        _, grads = batches[t % len(batches)].loss(params, grad=True)
        grad = np.concatenate([gr.ravel() for gr in grads]).astype(np.float32)
        adam_step(theta, grad, m, v, t, scale)
        if t % CHECK_EVERY == 0:
            now, _ = check.loss(params)
            if now < best:
                best, best_theta = now, theta.copy()
    best_params = [best_theta[a:b].reshape(p.shape) for a, b, p in zip(bounds[:-1], bounds[1:], initial)]
    if best > start * (1 - MIN_GAIN):
        return None
    return Refined(*best_params[:4], error_before=start, error_after=best, wm=best_params[4] if middle else None,
                   bm=best_params[5] if middle else None)
