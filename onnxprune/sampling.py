"""Seeded sampling of layer inputs and targets: the regression problems of one channel group.

Targets come from the original model (cached once, at fixed positions per image); inputs come
from the model pruned so far. Memory is bounded by the samples kept (images × positions ×
channels per layer), never by whole activation maps.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .activations import run_batches
from .calib import Calibration
from .errors import ModelError
from .graph import Consumer
from .graphview import GraphView, node_name
from .ops import LinearHandler, Window, activation_chain, handler_for
from .stats import LayerStats

# computes tensors over the sampler's images, in batches: (sample indices, {name: array})
Runs = Callable[[list[str]], Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]]

# Spatial positions per image are raised, where the feature map has them, until a layer has this
# many samples per unknown of its full input: wide layers on large maps (a recogniser's 480-channel
# convs) otherwise refit from a few samples per unknown while most of their positions go unused.
# Counted before pruning, so a refit at half width sees about twice as many (docs/benchmarks.md).
MIN_SAMPLES_PER_UNKNOWN = 25

# A layer with very many unknowns (PAN's 7×7 conv over 576 channels: 28 224) cannot hold ``XᵀX``:
# where its two folds would take more than MAX_GRAM_BYTES, it draws at most as many positions as
# fit MAX_SAMPLE_BYTES of samples, which are then kept instead (fewer than its unknowns; the refit
# solves in sample space and its ridge is cross-validated, see onnxprune/stats.py).
MAX_GRAM_BYTES = 1 << 31
MAX_SAMPLE_BYTES = 1 << 29


def affordable_positions(count: int, images: int, unknowns: int, outputs: int) -> int:
    """``count`` positions per image, or fewer where the layer's statistics would not fit in
    memory (:data:`MAX_GRAM_BYTES`, :data:`MAX_SAMPLE_BYTES`)."""
    if 16 * unknowns * (unknowns + outputs) <= MAX_GRAM_BYTES:
        return count
    return max(1, min(count, MAX_SAMPLE_BYTES // (4 * max(images, 1) * (unknowns + outputs))))


# A consumer whose output joins a residual Add may be refined with its producer (onnxprune/refine.py),
# whose unknowns are shared by every output position: its targets are cached at more positions per
# image than its own refit samples, up to this many values. Ten positions per image were too few
# for an inverted residual block's branch (docs/benchmarks.md).
PAIR_TARGET_VALUES = 1 << 22
# Where every position of every image does not fit in those values, a branch also holds every
# position of an evenly spread subset of the images, when that holds this many images at least: a
# refinement step over whole maps computes each producer output once (refine.py), so under the same
# cap on input values they give it several times the samples that sampled positions do.
MIN_WHOLE_IMAGES = 64


def image_fold(indices) -> np.ndarray:
    """Which of the statistics' two folds each image (by calibration index) falls in: 0 or 1."""
    return np.asarray(indices) % 2


@dataclass
class Target:
    """Where a consumer's target comes from.

    ``residual_other``: when the consumer's output goes straight into an Add with another branch,
    its target is the original Add output minus the *pruned* model's other branch
    (He et al.'s ``Y2 + Y1 − Y1'``), so the layer also absorbs the error on the skip path.
    """

    source: str  # tensor of the original model giving the target
    residual_other: str | None
    # (activation output, Add output, other input) where the output reaches a residual Add through
    # activations (activated_join): the refinement's target, not the refit's
    activated: tuple[str, str, str] | None = None


def _join_partner(g: GraphView, branch: str, shape_of: str) -> tuple[str, str] | None:
    """(the Add's output, its other input) where ``branch`` is read by one residual Add alone
    whose other input is a computed tensor shaped like ``shape_of``."""
    users = g.consumers.get(branch, [])
    if branch in g.graph_outputs or len(users) != 1 or not handler_for(users[0]).sums_branches:
        return None
    join = users[0]
    others = [i for i in join.input if i and i != branch]
    if len(join.input) != 2 or len(others) != 1 or g.is_const(others[0]):
        return None
    if g.shape(others[0]) != g.shape(shape_of) or join.output[0] in g.graph_outputs:
        return None
    return join.output[0], others[0]


def _residual_partner(g: GraphView, node: onnx.NodeProto) -> tuple[str, str] | None:
    return _join_partner(g, node.output[0], node.output[0])


# how many elementwise ops deep a consumer's output is followed to a residual Add (hard swish as
# exporters write it takes four: Add, Clip, Mul, Div)
_MAX_JOIN_DEPTH = 6


def reads_grouped_conv(g: GraphView, tensor: str) -> bool:
    """Whether ``tensor`` is a depthwise conv's output, or a grouped conv's that passes whole groups
    (channels in, the same channels out), through elementwise activations alone: what a
    depthwise-separable block's pointwise conv reads. Such a consumer's branch — producer, grouped
    conv, consumer — is refined together (:mod:`onnxprune.refine`) in plain chains as well as in
    residual blocks."""
    chain = activation_chain(g, tensor)
    node = g.producer.get(chain[1] if chain else tensor)
    if node is None:
        return False
    handler = handler_for(node)
    return handler.is_depthwise(node, g) or handler.loses_whole_groups(node, g)


def activated_join(g: GraphView, node: onnx.NodeProto) -> tuple[str, str, str] | None:
    """Where ``node``'s output reaches a residual Add through elementwise activations alone (conv
    → SiLU → Add, as the bottlenecks of CSP / YOLO backbones have it): (the activation chain's
    output, the Add's output, its other input); else None."""
    out = node.output[0]
    if out in g.graph_outputs:
        return None
    frontier, seen = [out], {out}
    for _ in range(_MAX_JOIN_DEPTH):
        nxt = []
        for t in frontier:
            for user in g.consumers.get(t, []):
                if handler_for(user).activation(user, g) is None:
                    continue
                for made in user.output:
                    if not made or made in seen:
                        continue
                    seen.add(made)
                    nxt.append(made)
                    partner = _join_partner(g, made, out)
                    chain = activation_chain(g, made, out) if partner else None
                    if chain is not None:
                        return made, partner[0], partner[1]
        frontier = nxt
    return None


@dataclass
class PairSamples:
    """Samples of a producer and the consumer reading it, for refining the two together
    (:mod:`onnxprune.refine`): at each sampled consumer output, the producer's input patch at
    every kernel tap of the consumer (or, through a depthwise conv between them, of that conv).

    *Whole maps* (``tap_index`` given) hold each image once instead: the producer's input patch
    at every position of its output map (``[n images, H, D]``), every consumer output position
    (``P``) of the image, and which of the H positions each of its taps reads. The producer's
    output at a position is then computed once, not once per consumer output reading it (a 3×3
    consumer reads each nine times): on small maps the same memory holds several times the
    samples."""

    x: np.ndarray  # [n, taps, D] producer input patches, float32 (whole maps: [n, H, D])
    inside: np.ndarray  # [n, taps] False where the tap falls in the consumer's padding (whole maps: [P, taps])
    # [n, Cout] the consumer's targets (as its own refit has them); where the consumer reaches its residual
    # Add through activations (Target.activated), those activations' targets: the original Add output − offset
    # (whole maps: [n, P, Cout])
    y: np.ndarray
    offset: np.ndarray  # like y: what is added to the consumer's output after it (a residual branch), or 0
    image: np.ndarray  # [n] calibration row of each sample (whole maps: image), increasing (a held-out split by image)
    gate: np.ndarray | None = None  # [n, k] a per-image channel gate (squeeze-excite) before the consumer
    tap_index: np.ndarray | None = None  # whole maps: [P, taps] the position of x each tap reads
    # whole maps through a middle conv: its sliding window (the same taps, read as shifted views of the maps)
    window: Window | None = None


class Sampler:
    """Caches original-model targets for a set of consumers and builds their :class:`LayerStats`."""

    def __init__(self, original: onnx.ModelProto, g: GraphView, calib: Calibration,
                 indices: Sequence[int], consumers: list[Consumer], samples_per_image: int,
                 seed: int, residual: bool = True, batch: int | None = None, keep_samples: bool = True,
                 provider: str = "cpu", pairs: bool = False):
        self.calib, self.indices, self.batch, self.provider = calib, np.asarray(indices), batch, provider
        self.keep_samples = keep_samples  # False: always XᵀX (callers that read it directly)
        self.row = np.full(len(calib), -1)
        self.row[self.indices] = np.arange(len(self.indices))
        self.targets: dict[str, Target] = {}
        self.positions: dict[str, np.ndarray] = {}  # [images, positions] sampled per consumer (by output)
        self.counts: dict[str, int] = {}  # how many of those (the first) the consumer's own refit reads
        # branches whose targets are cached at every position, in order, of some images: those rows
        self.whole: dict[str, np.ndarray] = {}
        in_cache: dict[str, int] = {}  # … where they are all the images: the cache's column of the first
        self.layers: dict[str, tuple[onnx.NodeProto, LinearHandler]] = {}  # output name -> (layer, handler)
        self.capped: set[str] = set()  # layers whose positions memory limits (affordable_positions)
        self.g = g
        images = len(self.indices)
        for c in consumers:
            name = c.node.output[0]
            if name in self.targets:
                continue
            partner = _residual_partner(g, c.node) if residual else None
            activated = activated_join(g, c.node) if residual and pairs and not partner else None
            self.targets[name] = Target(partner[0] if partner else name,
                                        partner[1] if partner else None, activated)
            handler = handler_for(c.node)
            self.layers[name] = (c.node, handler)
            per_image = handler.positions(c.node, g)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            # enough positions for a well-posed refit where the feature map has them
            outputs, unknowns = handler.weight_matrix(c.node, g).shape  # type: ignore[attr-defined]
            unknowns += 1
            wanted = max(samples_per_image, -(-MIN_SAMPLES_PER_UNKNOWN * unknowns // max(images, 1)))
            drawn = min(wanted, per_image) if per_image > 1 else 1
            count = affordable_positions(drawn, images, unknowns, outputs)
            if count < drawn:  # more images would not give it more samples
                self.capped.add(name)
            self.positions[name] = (np.tile(np.arange(per_image), (len(calib), 1)) if per_image <= count
                                    else rng.integers(0, per_image, size=(len(calib), count)))
            self.counts[name] = self.positions[name].shape[1]
            if not pairs or not (partner or activated or reads_grouped_conv(g, c.tensor)):
                continue
            if per_image <= count:
                in_cache[name] = 0
            else:  # the branch's refinement (pair_samples) reads more
                room = PAIR_TARGET_VALUES // max(images * outputs, 1)
                extra = min(per_image, room) - count
                subset = PAIR_TARGET_VALUES // max(per_image * outputs, 1)
                if room >= count + per_image:  # every position, in order: whole maps (PairSamples)
                    in_cache[name] = count
                    self.positions[name] = np.concatenate(
                        [self.positions[name], np.tile(np.arange(per_image), (len(calib), 1))], axis=1)
                    continue
                if extra > 0:
                    self.positions[name] = np.concatenate(
                        [self.positions[name], rng.integers(0, per_image, size=(len(calib), extra))], axis=1)
                if subset >= MIN_WHOLE_IMAGES:  # whole maps of some images, as well
                    self.whole[name] = np.unique(np.linspace(0, images - 1, min(subset, images)).astype(np.int64))
        self.whole.update({name: np.arange(images) for name in in_cache})
        cached = self._cache_targets(original, in_cache)
        self.cache, self.joined = cached["cache"], cached["joined"]
        self.whole_cache, self.whole_joined = cached["whole cache"], cached["whole joined"]

    def _cache_targets(self, original: onnx.ModelProto, in_cache: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
        """Original-model values by kind, then by consumer output name: at each consumer's positions,
        its target (``cache``) and, where it reaches a residual Add through activations, that Add's
        output (``joined``); both at every position of the images in :attr:`whole` (``whole cache``,
        ``whole joined``; views into the first two for those in ``in_cache``: from that column)."""
        wanted = [(name, t.source, "cache") for name, t in self.targets.items()]
        wanted += [(name, t.activated[1], "joined") for name, t in self.targets.items() if t.activated]
        wanted += [(name, source, "whole " + kind) for name, source, kind in wanted
                   if name in self.whole and name not in in_cache]
        kinds = ("cache", "joined", "whole cache", "whole joined")
        into: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in kinds}
        for idx, values in run_batches(original, sorted({w[1] for w in wanted}), self.calib, self.indices, self.batch,
                                       self.provider):
            rows = self.row[idx]
            for name, source, kind in wanted:
                node, handler = self.layers[name]
                cache = into[kind]
                if kind.startswith("whole"):
                    mine = np.isin(rows, self.whole[name])
                    if not mine.any():
                        continue
                    pos = np.tile(np.arange(handler.positions(node, self.g)), (int(mine.sum()), 1))
                    value, slots = values[source][mine], np.searchsorted(self.whole[name], rows[mine])
                    length = len(self.whole[name])
                else:
                    pos, value, slots, length = self.positions[name][idx], values[source], rows, len(self.indices)
                y = handler.sample_outputs(node, self.g, value, pos).reshape(len(pos), pos.shape[1], -1)
                if name not in cache:
                    cache[name] = np.empty((length, pos.shape[1], y.shape[2]), np.float32)
                cache[name][slots] = y
        for name, column in in_cache.items():
            node, handler = self.layers[name]
            positions = handler.positions(node, self.g)
            for kind in ("cache", "joined"):
                if name in into[kind]:
                    into["whole " + kind][name] = into[kind][name][:, column:column + positions]
        return into

    def pair_samples(self, pruned: GraphView, producer: onnx.NodeProto, consumer: Consumer,
                     target_columns: np.ndarray | None, runs: Runs | None, max_values: int,
                     middle: onnx.NodeProto | None = None, gate: str | None = None,
                     whole_values: int | None = None, buffer: np.ndarray | None = None) -> PairSamples | None:
        """:class:`PairSamples` for ``producer`` → (elementwise ops) → ``consumer`` on the pruned
        model, at the positions sampled for the consumer (its refit's, then those a residual
        branch's targets are also cached at: ``pairs``), keeping at most ``max_values`` input
        values (fewer positions per image where the patches are large), or whole maps of as many
        images as ``whole_values`` hold where that gives at least as many distinct samples; None where the
        consumer has no map from outputs to input positions (not a 2-D conv).

        With a depthwise conv ``middle`` between them (→ ``middle`` → elementwise ops, times the
        per-image channel ``gate`` where given → ``consumer``), the consumer must read each
        output position at that position alone (a 1×1 conv) and the taps are ``middle``'s.

        Where the consumer reaches its residual Add through activations (``Target.activated``),
        the targets are those of the activations' output (the caches have them with ``pairs``).

        The patches are written into ``buffer`` (float32) where it is large enough: the samples
        then last until the caller's next use of it (tens of MB, whose fresh pages cost more
        time than filling them)."""
        name = consumer.node.output[0]
        prod: LinearHandler = handler_for(producer)  # type: ignore[assignment]
        cons: LinearHandler = handler_for(consumer.node)  # type: ignore[assignment]
        probe = cons.input_positions(consumer.node, pruned, self.positions[name][:1])
        if probe is None:
            return None
        if middle is not None:
            if probe[0].shape[-1] != 1 or not np.array_equal(probe[0][..., 0], self.positions[name][:1]):
                return None  # the consumer is not pointwise: its taps would mix the middle's positions
            tapped: LinearHandler = handler_for(middle)  # type: ignore[assignment]
            probe = tapped.input_positions(middle, pruned, self.positions[name][:1, :1])
            if probe is None:
                return None
        else:
            tapped = cons
        taps = probe[0].shape[-1]
        width = prod.weight_matrix(producer, pruned).shape[1]
        images = len(self.indices)
        columns = self.positions[name].shape[1]
        positions = max(max_values // max(taps * width, 1), 1)  # sample positions the cap allows in all
        keep = max(1, min(columns, positions // max(images, 1)))
        outputs, hidden = cons.positions(consumer.node, pruned), prod.positions(producer, pruned)
        # whole maps (at most ``whole_values``, by default ``max_values``): as many images as that
        # holds, where it gives at least as many distinct samples as sampled positions and a producer
        # output is read by more than one tap (a 1×1 consumer gains nothing from them)
        available = self.whole.get(name, np.zeros(0, np.int64))  # images whose every position has targets
        denser = hidden < taps * outputs
        whole_images = min(len(available), (whole_values or max_values) // max(hidden * width, 1)) if denser else 0
        # sampled positions are drawn with replacement: an image has at most ``outputs`` distinct ones
        whole = whole_images * outputs >= min(positions, min(keep, outputs) * images) and whole_images >= 2
        # more images than the cap allows: that many images, evenly spread (every n-th image would
        # leave up to half of the positions the cap allows unused)
        picked = np.zeros(images, bool)
        if whole:
            picked[available[np.linspace(0, len(available) - 1, whole_images).astype(np.int64)]] = True
            tap_index, tap_inside = tapped.input_positions(middle or consumer.node, pruned,  # type: ignore[misc]
                                                           np.arange(outputs)[None])
            tap_index, tap_inside = tap_index.reshape(outputs, taps), tap_inside.reshape(outputs, taps)
        else:  # spread over the columns: some may be positions in order
            picked[np.linspace(0, images - 1, min(positions, images)).astype(np.int64)] = True
            cols = np.linspace(0, columns - 1, keep).astype(np.int64)
        target = self.targets[name]
        other = target.residual_other or (target.activated[2] if target.activated else None)
        needed = [producer.input[0]] + ([other] if other else []) + ([gate] if gate else [])
        if whole:
            goal = self.whole_joined[name] if target.activated else self.whole_cache[name]
        else:
            goal = self.joined[name] if target.activated else self.cache[name]
        out_cols = cons.output_columns(consumer.node, pruned, target_columns) if target_columns is not None else None
        insides, ys, offsets, rows, gates = [], [], [], [], []
        # the patches are the bulk (tens of MB): written into one array, not concatenated from batches
        shape = (int(picked.sum()) * (1 if whole else keep), hidden if whole else taps, width)
        fits = buffer is not None and buffer.dtype == np.float32 and buffer.size >= np.prod(shape)
        x_all, filled = buffer.ravel()[:np.prod(shape)].reshape(shape) if fits else np.empty(shape, np.float32), 0
        batches = self._batches(pruned, needed, runs)
        for idx, values in batches:
            chosen = picked[self.row[idx]]
            if not chosen.any():
                continue
            idx, values = idx[chosen], {k: v[chosen] for k, v in values.items()}
            if whole:
                pos = np.tile(np.arange(outputs), (len(idx), 1))
                x = prod.sample_patches(producer, pruned, values[producer.input[0]],
                                        np.tile(np.arange(hidden), (len(idx), 1)))
                y = goal[np.searchsorted(available, self.row[idx])].reshape(-1, goal.shape[2])
            else:
                pos = self.positions[name][idx][:, cols]
                flat, inside = tapped.input_positions(middle or consumer.node, pruned, pos)  # type: ignore[misc]
                x = prod.sample_patches(producer, pruned, values[producer.input[0]], flat.reshape(len(idx), -1))
                insides.append(inside.reshape(-1, taps))
                y = goal[self.row[idx]][:, cols].reshape(-1, goal.shape[2])
            if out_cols is not None:
                y = y[:, out_cols]
            # as in stats(): a skip branch sharing pruned output channels already has the kept ones only
            offset = cons.sample_outputs(consumer.node, pruned, values[other], pos) if other else np.zeros_like(y)
            y = y - offset
            shape = (len(idx), outputs, -1) if whole else (len(y), -1)
            offsets.append(offset.reshape(shape).astype(np.float32, copy=False))
            x = x.reshape(-1, hidden if whole else taps, x.shape[1])
            x_all[filled:filled + len(x)] = x
            filled += len(x)
            ys.append(y.reshape(shape).astype(np.float32, copy=False))
            rows.append(self.row[idx] if whole else np.repeat(self.row[idx], keep))
            if gate:
                gated = values[gate].reshape(len(idx), -1)
                gates.append((gated if whole else np.repeat(gated, keep, axis=0)).astype(np.float32))
        if not filled:
            return None
        return PairSamples(x_all[:filled], tap_inside if whole else np.concatenate(insides), np.concatenate(ys),
                           np.concatenate(offsets), np.concatenate(rows), np.concatenate(gates) if gates else None,
                           tap_index if whole else None, tapped.window(middle, pruned) if whole and middle else None)

    def _batches(self, pruned: GraphView, names: list[str], runs: Runs | None):
        """``names`` on the pruned model over this sampler's images, batch by batch: from ``runs``
        where given, else by running the model from its inputs."""
        return runs(names) if runs else run_batches(pruned.model, names, self.calib, self.indices, self.batch,
                                                    self.provider)

    def values(self, pruned: GraphView, names: list[str], runs: Runs | None = None) -> dict[str, np.ndarray]:
        """``names`` on the pruned model over this sampler's images, in its image order
        (``runs`` as for :meth:`stats`)."""
        batches = self._batches(pruned, names, runs)
        parts = [(self.row[idx], values) for idx, values in batches]
        order = np.argsort(np.concatenate([rows for rows, _ in parts]), kind="stable")
        return {name: np.concatenate([values[name] for _, values in parts])[order] for name in names}

    def stats(self, pruned: GraphView, consumers: list[Consumer],
              target_columns: dict[str, np.ndarray] | None = None, runs: Runs | None = None) -> list[LayerStats]:
        """Sufficient statistics of each consumer's regression problem on the pruned model.

        ``target_columns`` restricts a consumer's targets to the output channels it still has.
        ``runs`` computes the tensors asked for over this sampler's images (by default a run of
        the pruned model from its inputs; a :class:`~onnxprune.frontier.Frontier` runs only the
        segment from its cut).
        """
        needed = [c.tensor for c in consumers]
        needed += [self.targets[c.node.output[0]].residual_other for c in consumers
                   if self.targets[c.node.output[0]].residual_other]
        result: list[LayerStats | None] = [None] * len(consumers)
        batches = self._batches(pruned, needed, runs)
        for idx, values in batches:
            for i, c in enumerate(consumers):
                name = c.node.output[0]
                handler: LinearHandler = handler_for(c.node)  # type: ignore[assignment]
                count = self.counts[name]
                pos = self.positions[name][idx, :count]
                x = handler.sample_patches(c.node, pruned, values[c.tensor], pos)
                y = self.cache[name][self.row[idx], :count].reshape(-1, self.cache[name].shape[2])
                cols = (target_columns or {}).get(name)
                if cols is not None:
                    y = y[:, handler.output_columns(c.node, pruned, cols)]
                other = self.targets[name].residual_other
                if other:
                    y = y - handler.sample_outputs(c.node, pruned, values[other], pos)
                if result[i] is None:
                    rows = len(self.indices) * count
                    result[i] = LayerStats(x.shape[1], y.shape[1], rows if self.keep_samples else None)
                fold = np.repeat(image_fold(idx), pos.shape[1])
                result[i].add(x, y, fold, per_image=pos.shape[1])
        for c, st in zip(consumers, result):
            if st is not None and not st.finite():
                raise ModelError(f"the model's activations overflow on the calibration data (NaN or Inf reach "
                                 f"'{node_name(c.node)}'); check its weights and how the inputs are normalised")
        return result  # type: ignore[return-value]
