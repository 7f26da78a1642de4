"""Measured sensitivity: how much each group's consumers lose, after the least-squares refit,
when it keeps fewer channels (the curves :mod:`onnxprune.allocation` allocates widths over)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from scipy.interpolate import PchipInterpolator

from .activations import fitting_batch
from .budget import graph_macs, round_width
from .calib import random_subset
from .candidates import Analysis, first_edited, node_key, positions, sampleable
from .frontier import Frontier
from .group_pruner import GroupPruner, KnownStats, Site, channel_statistics, unit_sites
from .options import PruneOptions
from .progress import QUIET, Progress
from .rewrite import trial_edit
from .sampling import Sampler, image_fold
from .verify import checked_tensors, comparable, squared_sums
from .graph import ChannelGroup
from .liveness import read_problem
from .reconstruct import ESTIMATE_RIDGE, held_out_error
from .select import add_unit_contribution, expand_channels, lasso_selections, normalized_contribution

# called with (unit, its sampled consumers, their statistics, its curve, the curve's LASSO
# selections by channels kept) once a curve is known
OnCurve = Callable[[ChannelGroup, list, list, list[float], dict[int, np.ndarray]], None]

GRID = tuple(i / 10 for i in range(1, 11))
# Where curves are measured; the other grid points are interpolated (shape-preserving). A refit's
# cost grows with the cube of its width, so the wide points dominate: these cost 0.4 of the grid's.
MEASURED = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
EVERY_WIDTH = 32  # groups up to this wide are measured at every grid point


# A consumer after a Concat is refit whole for a unit's curve, as the pruning will, where the other
# inputs are at most this many times the unit's channels (a CSP block's halves, an SPP's pools);
# for a narrow unit of a wide layer (a DenseNet layer's 32 of up to 1024 inputs, an Inception
# branch) the unit's columns are refit alone with the others held: a whole-layer solve at every
# width made GoogLeNet's sensitivity stage 3.3x slower.
FULL_REFIT_OTHERS = 3


def error_curve(unit: ChannelGroup, consumers, stats, weights, biases, channels: int,
                ratios=GRID, measured=MEASURED, conv_group: int = 1, sites: list[Site] | None = None,
                selections: dict[int, np.ndarray] | None = None) -> list[float]:
    """Mean relative error of the unit's consumers when keeping each ratio of channels (LASSO
    selection, then least squares), on images the refit did not see, from the original model's
    statistics: measured at the widths ``measured`` gives, interpolated between them.
    ``conv_group``: the channels go in whole aligned runs of this many (:attr:`ChannelGroup.conv_group`).
    ``sites``: per consumer, where the unit's channels sit among those it reads (a consumer after
    a Concat reads other groups' channels too: the whole layer is refit where they are at most
    :data:`FULL_REFIT_OTHERS` times the unit's, as the pruning will; past that, they are held
    fixed and the unit's columns refit alone, a solve over its columns, not the layer's); None: it
    reads the unit's alone. ``selections``, where given, receives the LASSO selection at each
    measured width (channels kept -> which), the one :class:`GroupPruner` makes on the same problem."""
    whole = np.arange(channels)
    places = [(site.width, site.unit_channels, site.unit_positions, site.other_positions) if site is not None
              else (channels, whole, whole, whole[:0]) for site in (sites or [None] * len(stats))]
    gram, corr = np.zeros((channels, channels)), np.zeros(channels)
    # per consumer: the statistics refit, their weights, the channels refit when the unit keeps
    # ``keep`` (positions among the refit's channels), columns per channel, and the refit's
    # energy over the consumer's
    problems = []
    for st, w, b, (width, mine, at, other) in zip(stats, weights, biases, places):
        gr, co = normalized_contribution(st, w, b, width)
        add_unit_contribution(gram, corr, gr, co, mine, at, other)
        k = w.shape[1] // width
        if len(other) > FULL_REFIT_OTHERS * len(at):
            order = np.argsort(at)
            cols = expand_channels(at[order], k)
            alone = st.frozen(cols, w)
            problems.append((alone, w[:, cols], functools.partial(_kept_of, mine[order]), k,
                             alone.energy() / max(st.energy(), 1e-30)))
        elif len(other) or width != channels or not np.array_equal(at, mine):  # after a Concat / Split
            problems.append((st, w, functools.partial(_kept_with_others, mine, at, other), k, 1.0))
        else:  # the unit's own consumer
            problems.append((st, w, None, k, 1.0))
    size = conv_group  # whole conv groups go: the LASSO weighs their channels' summed contributions
    items = channels // size
    if size > 1:
        gram, corr = gram.reshape(items, size, items, size).sum(axis=(1, 3)), corr.reshape(items, size).sum(axis=1)
    points = ratios if channels <= EVERY_WIDTH else measured  # narrow groups: every point is cheap
    kept_items = sorted({max(1, int(round(r * items))) for r in points})
    keeps = [n * size for n in kept_items]
    errors = []
    for chosen in lasso_selections(gram, corr, kept_items):
        keep = expand_channels(chosen, size)
        if selections is not None:
            selections[len(keep)] = keep
        errs = []
        for (st, w, kept_of, k, share), b in zip(problems, biases):
            cols = expand_channels(keep if kept_of is None else kept_of(keep), k)
            errs.append(share * held_out_error(st, cols, w[:, cols], b, b is not None))
        errors.append(float(np.mean(errs)))
    if len(keeps) == 1:
        return errors * len(ratios)
    curve = PchipInterpolator(keeps, errors)([max(1, int(round(r * channels))) for r in ratios])
    return [float(v) for v in curve]


def _kept_of(channel_at: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Positions of the kept unit channels ``keep`` where ``channel_at`` names each position's."""
    return np.flatnonzero(np.isin(channel_at, keep))


def _kept_with_others(mine: np.ndarray, at: np.ndarray, other: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """A layer's kept input channels when a unit whose channel ``mine[i]`` sits at ``at[i]`` keeps
    ``keep`` and the other inputs (at ``other``) stay."""
    return np.sort(np.concatenate([at[np.isin(mine, keep)], other]))


# Where the output probes scale the curves: half width, and the deeper cuts the floor still allows
# (a cut's output error does not follow its layer error in step as the cut deepens)
PROBES = (0.3, 0.5)
# Images the probes run on: 64 at 3 x 224 x 224 input values or fewer, fewer for larger inputs so a
# probe's cost stays that of 64 such images (at least 8: 8 at 640 x 640). A large input's dense
# output (a detector's map) gives many values per image to measure the error on. The outputs the
# probes compare are held to as many values: a recogniser's CTC scores over thousands of characters
# at every time step (PP-OCRv6: 3 M per line) cost more to compute and compare than its layers.
# Their cost is also held to that of 64 ResNet-50 images at 224² (4.1 G MACs each) where the outputs
# compared still hold PROBE_MIN_OUTPUT_VALUES: a full-resolution image-to-image model (PairLIE,
# 26 G MACs an image and every pixel an output) needs a few images, a classifier's 1 000 logits an
# image need all 64 whatever its cost (VGG-16 at 224²). All of a run's probes together are held to
# PROBE_RUNS such probes (about ResNet-50's units at two widths) where the outputs allow: a full-resolution
# enhancer with a hundred groups (AGLLNet: 113 at 18.7 G MACs an image) probes on the fewest images.
PROBE_IMAGES = 64
PROBE_INPUT_VALUES = PROBE_IMAGES * 3 * 224 * 224
PROBE_OUTPUT_VALUES = PROBE_INPUT_VALUES
PROBE_MACS = PROBE_IMAGES * 4_100_000_000
PROBE_MIN_OUTPUT_VALUES = PROBE_IMAGES * 1000
MIN_PROBE_IMAGES = 8
PROBE_RUNS = 64


def probe_images(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], macs: int = 0, probes: int = 0) -> int:
    """How many images the output probes run on, by the size of one sample's inputs and of the
    outputs they compare (:func:`~onnxprune.verify.checked_tensors`), and by ``macs``, one
    sample's MACs, and ``probes``, how many probes the run makes, where those outputs are large
    enough for fewer images."""
    consts = {init.name for init in model.graph.initializer}
    values = sum(int(np.prod(shapes[i.name][1:])) for i in model.graph.input
                 if i.name not in consts and len(shapes.get(i.name, ())) > 1)
    compared = sum(int(np.prod(shapes[name][1:])) for name in checked_tensors(model) if len(shapes.get(name, ())) > 1)
    affordable = PROBE_MACS * min(1, PROBE_RUNS / max(probes, 1)) // max(macs, 1)
    by_cost = max(int(affordable), -(-PROBE_MIN_OUTPUT_VALUES // max(compared, 1)))
    return int(np.clip(min(PROBE_INPUT_VALUES // max(values, 1), PROBE_OUTPUT_VALUES // max(compared, 1), by_cost),
                       MIN_PROBE_IMAGES, PROBE_IMAGES))


STATS_BUDGET = 1 << 29  # bytes of statistics one pass of measure_curves may gather


def _stats_bytes(c, sampler, g) -> int:
    """What :meth:`Sampler.stats` will hold for consumer ``c``: ``XᵀX`` and ``XᵀY`` of two
    folds, or the samples where fewer than the unknowns are drawn."""
    from .ops import handler_for

    d, cout = handler_for(c.node).weight_matrix(c.node, g).shape[::-1]
    rows = len(sampler.indices) * sampler.counts[c.node.output[0]]
    if rows <= d + 1 and sampler.keep_samples:
        return 4 * rows * (d + 1 + cout)
    return 16 * (d + 1) * (d + 1 + cout)


@dataclass
class CurveRecord:
    """Curves measured so far in one run, by what a group is (:func:`group_key`): a second session
    on the same model and data (the residual rule's) measures only the groups the first did not
    have. ``layer``: the consumers' error curves; ``scaled``: the same put on the output's scale."""

    layer: dict[tuple, list[float]] = field(default_factory=dict)
    scaled: dict[tuple, list[float]] = field(default_factory=dict)


def group_key(unit: ChannelGroup) -> tuple:
    """What makes two analyses' groups the same for their curves: the tensors holding the
    channels, their number and conv groups, and the nodes reading them (after a Concat too)."""
    return (tuple(unit.tensors), unit.channels, unit.conv_group, tuple(_key(c) for c in unit.all_consumers))


def measure_curves(units: list[ChannelGroup], sampler, g, chunk: int = 8,
                   frontier: Frontier | None = None, on_curve: OnCurve | None = None,
                   measured: tuple[float, ...] = MEASURED,
                   known: dict[int, list[float]] | None = None) -> dict[int, list[float]]:
    """Error curves of every unit, from the model before any pruning: one pass over the data per
    ``chunk`` consumers (fewer where their statistics would exceed :data:`STATS_BUDGET`); each
    unit's curve is computed as soon as its consumers' statistics are in, which are then dropped.
    A unit's consumers are those of every group holding its channels (after a Concat too, where
    several units share one consumer: its statistics are gathered once).

    With ``frontier`` (over the sampler's images, on ``g``'s model) each pass runs only the
    segment from the previous one; ``on_curve(unit, consumers, stats, curve, selections)`` is called while a
    unit's statistics are still held (the model must be as it was when it returns). ``measured``:
    the ratios measured on groups wider than :data:`EVERY_WIDTH` (the rest interpolated);
    ``known``: curves by unit index measured before, taken as they are."""
    known = known or {}
    atoms = {grp.index: grp.atoms for u in units for grp in u.sites}
    placed = {u.index: [(c, site) for site in unit_sites(u, atoms, g) for c in site.sampled]
              for u in units if u.index not in known}
    jobs = [(u, [c for c, _ in placed.get(u.index, [])]) for u in units]
    flat = list({_key(c): c for _, cs in jobs for c in cs}.values())
    parts, part, held = [], [], 0
    for c in flat:
        size = _stats_bytes(c, sampler, g)
        if part and (len(part) == chunk or held + size > STATS_BUDGET):
            parts.append(part)
            part, held = [], 0
        part.append(c)
        held += size
    parts += [part] if part else []
    stats, curves, waiting = {}, {}, [(u, cs) for u, cs in jobs if cs]
    topo = positions(g.model)
    # a pass may move the cut up to the first consumer a later pass reads for
    starts = [min(topo[node_key(c.node)] for c in part) for part in parts]
    limits = list(np.minimum.accumulate(starts[::-1])[::-1][1:]) + [len(g.graph.node)]
    for part, limit in zip(parts, limits):
        runs = functools.partial(frontier.run, advance_to=int(limit)) if frontier else None
        for c, st in zip(part, sampler.stats(g, part, runs=runs)):
            stats[_key(c)] = st
        done = [all(_key(c) in stats for c in cs) for _, cs in waiting]
        ready = [job for job, ok in zip(waiting, done) if ok]
        waiting = [job for job, ok in zip(waiting, done) if not ok]
        for u, cs in ready:
            held_stats = [stats[_key(c)] for c in cs]
            chosen: dict[int, np.ndarray] = {}
            problems = [read_problem(c.node, g, st) for c, st in zip(cs, held_stats)]
            curves[u.index] = error_curve(u, cs, [p[0] for p in problems], [p[1] for p in problems],
                                          [p[2] for p in problems], u.channels,
                                          measured=measured, conv_group=u.conv_group,
                                          sites=[site for _, site in placed[u.index]], selections=chosen)
            if on_curve:
                on_curve(u, cs, held_stats, curves[u.index], chosen)
        needed = {_key(c) for _, cs in waiting for c in cs}
        stats = {k: v for k, v in stats.items() if k in needed}
    curves = {**known, **curves}
    curves = {u.index: curves[u.index] for u in units if u.index in curves}  # in the units' order
    if curves:
        neutral = list(np.mean([v for v in curves.values()], axis=0))
        for u in units:
            curves.setdefault(u.index, neutral)
    return curves


def _key(c) -> tuple[str, str]:
    """A consumer's statistics are the same whichever group lists it: by node and tensor read."""
    return node_key(c.node), c.tensor


def output_scaled_curves(analysis: Analysis, sampler: Sampler, shapes: dict[str, tuple[int, ...]],
                         opts: PruneOptions, bn_scales: dict[str, np.ndarray], progress: Progress = QUIET,
                         probes: tuple[float, ...] = PROBES, images: int | None = None,
                         record: CurveRecord | None = None) -> dict[int, list[float]]:
    """Error curves of the candidate groups put on one scale: each unit's curve is scaled so
    that, at each of the ``probes`` (fractions of its width), it equals the relative error of
    the *model output* measured with that unit alone pruned to it (on ``images`` of the sampler's
    images; None: :func:`probe_images`), the scale interpolated linearly between them and held
    beyond. A layer error deep in the net and one near the input then weigh by what they do to the
    output, and a deep cut's cost is measured, not extrapolated from a milder one.

    Each probe reuses the statistics its curve was measured from, edits the model in place
    (undone at once) and runs only the part of the model after the unit on carried activations,
    so a probe costs a fraction of one forward pass over ``images`` images. ``record``: curves
    measured before in this run are taken from it, not measured again; new ones are added."""
    g = analysis.g
    model = g.model
    solo = replace(opts, refit_downstream=False, refine=False, progress=False)
    at = sorted({min(range(len(GRID)), key=lambda i: abs(GRID[i] - p)) for p in probes})
    names = checked_tensors(model)
    batch = fitting_batch(shapes, opts.batch_size)
    topo = positions(model)
    units = sorted(analysis.candidates, key=lambda u: first_edited(u, g, topo))
    record = record if record is not None else CurveRecord()
    keys = {u.index: group_key(u) for u in units}
    known = {u.index: record.layer[keys[u.index]] for u in units if keys[u.index] in record.layer}
    bar = progress.bar(iter(units), "sensitivity", total=len(units) - len(known)) if progress.show else None
    factors: dict[int, dict[int, float]] = {}  # unit -> grid index -> output error / curve there
    edits = {u.index: first_edited(u, g, topo) for u in units}
    # units still to be probed: the carried activations may not pass a node one of them edits
    # (a unit after a Concat is probed when the layers after the Concat have been sampled, which
    # can be after units further on)
    sampled = {u.index for u in units if u.index not in known and any(sampleable(c, g) for c in u.all_consumers)}
    unprobed = set(sampled)
    probe_idx = random_subset(sampler.indices, images or probe_images(model, shapes, graph_macs(g), len(sampled) * len(at)),
                              opts.seed)
    # the inputs of sums over channels that a probe's cut rescales: the probes edit the model only
    # for a moment, so one run before them serves them all
    summed = [c.tensor for u in units for grp in u.sites or [u] for c in channel_statistics(grp, g)]
    summed_values = sampler.values(g, summed) if summed else {}
    with Frontier(model, sampler.calib, sampler.indices, batch, provider=sampler.provider) as data, \
            Frontier(model, sampler.calib, probe_idx, batch, provider=sampler.provider) as outs:
        reference = list(outs.run(names))
        has_fold_1 = bool((image_fold(probe_idx) == 1).any())

        def scale(unit: ChannelGroup, consumers: list, stats: list, curve: list[float],
                  selections: dict[int, np.ndarray]) -> None:
            if bar is not None:
                bar.update()
            unprobed.discard(unit.index)
            list(outs.run([], advance_to=min([edits[unit.index], *(edits[i] for i in unprobed)])))
            unseen = _unseen(consumers, stats, sampler) if has_fold_1 else None
            if unseen is not None:
                stats = unseen
            fold = 1 if unseen is not None else None  # the probe images the output is measured on
            held = KnownStats(sampler, {id(c.node): st for c, st in zip(consumers, stats)}, summed_values)
            known_keeps = selections if unseen is None else None  # the curve's problem is the probes'

            orders: dict[tuple, np.ndarray] = {}  # the milder probe keeps what the deeper one removed last
            for j in at:
                width = round_width(unit.channels, GRID[j], 1, unit.conv_group)
                if width >= unit.channels or curve[j] <= 0:
                    continue
                with trial_edit(g):
                    GroupPruner(g, analysis.groups, solo, held, bn_scales, ridge=ESTIMATE_RIDGE,
                                removal_orders=orders, lasso_keeps=known_keeps).prune_unit(unit, width, tidy=False)
                    err = _output_error(reference, list(outs.run(names)), names, fold)
                if err is not None:
                    factors.setdefault(unit.index, {})[j] = err / curve[j]

        # the probes' widths are measured, not interpolated: the scale divides by the curve there
        measured = tuple(sorted({*MEASURED, *(GRID[j] for j in at)}))
        curves = measure_curves(units, sampler, g, frontier=data, on_curve=scale, measured=measured, known=known)
    if bar is not None:
        bar.close()
    scaled = {}
    for i, curve in curves.items():
        probed = factors.get(i)
        if i in known:
            scaled[i] = record.scaled[keys[i]]
        elif not probed:
            scaled[i] = curve
        else:
            scale_at = np.interp(GRID, [GRID[j] for j in probed], list(probed.values()))
            scaled[i] = [float(v * f) for v, f in zip(curve, scale_at)]
    for i in sampled:  # measured, not the neutral curve of a unit no consumer of which was sampled
        record.layer[keys[i]], record.scaled[keys[i]] = curves[i], scaled[i]
    return scaled


def _unseen(consumers: list, stats: list, sampler: Sampler) -> list | None:
    """The statistics a unit's probes refit from where one of its consumers has more unknowns than
    samples (its samples are kept: a classifier after ``Flatten``, one sample per image): such a
    refit reproduces the images it was fit on, so a probe measured on them reads the cut as
    nearly free. Those consumers keep fold 0's samples only, and the probe measures the output on
    fold 1's images. None where no consumer needs it (or fold 0 has no samples)."""
    if not any(st.samples_kept for st in stats):
        return None
    parts = [st.fold_part(0, sampler.counts[c.node.output[0]]) if st.samples_kept else st
             for c, st in zip(consumers, stats)]
    return parts if all(st.n.sum() > 0 for st in parts) else None


def _output_error(reference: list, pruned: list, names: list[str], fold: int | None) -> float | None:
    """The largest relative error over the outputs ``names`` that can be compared
    (:func:`~onnxprune.verify.comparable`: the held-out check's rule) between two batched runs
    over the same images; with ``fold``, on that fold's images only where an output has one row
    per image (a scalar or sequence-first output is compared whole). None: no output compares."""
    errors = []
    for name in names:
        err = ref = 0.0
        for (idx, r), (_, p) in zip(reference, pruned):
            a, b = r[name], p[name]
            if not comparable(a, b):
                break
            if fold is not None and a.ndim and a.shape[0] == len(idx):
                rows = image_fold(idx) == fold
                a, b = a[rows], b[rows]
            part_err, part_ref = squared_sums(a, b)
            err, ref = err + part_err, ref + part_ref
        else:
            errors.append(err ** 0.5 / max(ref ** 0.5, 1e-30))
    return max(errors) if errors else None
