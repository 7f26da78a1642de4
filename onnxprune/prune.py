"""The pruning pipeline: analyse, budget, then select + rewrite + refit group by group, verify."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import onnx

from .activations import DEFAULT_BATCH, batch_size_for, fitting_batch, run_batches, tensor_shapes
from .budget import CostModel, Targets, build_cost_model, count_params, uniform_widths
from .calib import Calibration, ImageOptions, load_calibration
from .errors import NothingToPrune, OptionError, TargetNotMetError
from .fold import constants_to_initializers, fold_batchnorm
from .graph import ChannelGroup, Consumer, find_groups
from .frontier import Frontier
from .graphview import GraphView
from .io import check_not_quantized, check_opset, load_model, model_bytes
from .ops import LinearHandler, handler_for
from .reconstruct import refit
from .report import GroupResult, LayerRow, Report, Totals
from .rewrite import finalize, prune_group, trial_edit
from .sampling import Runs, Sampler
from .sensitivity import GRID, allocate, measure_curves
from .summary import model_macs
from .select import (Method, expand_channels, l1_select, lasso_select, normalized_contribution, per_segment,
                     random_select, slim_select, thinet_select)
from .latency import PROVIDERS, latency_ms
from .latency_cost import layer_latency
from .verify import OutputFidelity, compare

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """The pruned model and the report of how it was made."""

    model: onnx.ModelProto
    report: Report


@dataclass(frozen=True)
class PruneOptions:
    """Every setting of a pruning run, validated together (the CLI maps flags onto these)."""

    speedup: float | None = None  # MACs ratio; 2 when no target at all is given
    params: float | None = None  # fraction of parameters kept at most
    size_mb: float | None = None  # pruned model size at most (10^6 bytes)
    latency: float | None = None  # measured latency speedup at least, on ``provider``
    provider: str = "cpu"
    latency_batch: int = 1  # batch size of latency measurements
    max_drop: float | None = None  # accuracy guard on held-out data (see :func:`_guard_loss`)
    method: Method = Method.LASSO
    reconstruct: bool = True
    holdout: float = 0.2
    samples_per_image: int = 10
    seed: int = 0
    round_to: int = 1  # the CLI defaults to its provider's block: 16 on cpu, 8 on GPUs (see --round-to)
    relax_round_to: bool = False  # round_to is a default, not the user's: finer multiples where a target needs them
    prune_coupled: bool = False
    residual_target: bool = True
    batch_size: int = 32
    allocation: str = "sensitivity"  # uniform | sensitivity (needs calibration data; else uniform)
    sensitivity_images: int = 256  # fit images the sensitivity curves are measured on (a random subset)
    refit_downstream: bool = True  # also refit unpruned layers whose inputs changed
    slim_fallback: str = "error"  # what --method slim does when a group has no BatchNorm: error | l1
    measure_latency: bool = True
    progress: bool | None = None  # None: only when stderr is a terminal

    def validate(self) -> "PruneOptions":
        method = self.method
        if not isinstance(method, Method):
            try:
                method = Method(method)
            except ValueError:
                raise OptionError(f"unknown method '{self.method}'; choose one of "
                                  f"{', '.join(m.value for m in Method)}") from None
        speedup = self.speedup
        if speedup is None:
            speedup = 1.0 if any(t is not None for t in (self.params, self.size_mb, self.latency)) else 2.0
        checks = [
            (speedup >= 1.0, f"--speedup must be >= 1 (got {speedup})"),
            (self.params is None or 0.0 < self.params <= 1.0, f"--params must be in (0, 1] (got {self.params})"),
            (self.size_mb is None or self.size_mb > 0, f"--size-mb must be > 0 (got {self.size_mb})"),
            (self.latency is None or self.latency >= 1.0, f"--latency must be >= 1 (got {self.latency})"),
            (self.provider in PROVIDERS, f"--provider must be one of {', '.join(PROVIDERS)} (got {self.provider})"),
            (self.latency_batch >= 1, f"--latency-batch must be >= 1 (got {self.latency_batch})"),
            (self.max_drop is None or 0.0 <= self.max_drop < 1.0, f"--max-drop must be in [0, 1) (got {self.max_drop})"),
            (0.0 <= self.holdout < 1.0, f"--holdout must be in [0, 1) (got {self.holdout})"),
            (self.samples_per_image >= 1, f"--samples-per-image must be >= 1 (got {self.samples_per_image})"),
            (self.round_to >= 1, f"--round-to must be >= 1 (got {self.round_to})"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            (self.sensitivity_images >= 2, f"--sensitivity-images must be >= 2 (got {self.sensitivity_images})"),
            (self.allocation in ("uniform", "sensitivity"),
             f"--allocation must be uniform or sensitivity (got {self.allocation})"),
            (self.slim_fallback in ("error", "l1"), f"--slim-fallback must be error or l1 (got {self.slim_fallback})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise OptionError(msg)
        return PruneOptions(**{**self.__dict__, "method": method, "speedup": speedup})

    @property
    def targets(self) -> Targets:
        return Targets(self.speedup or 1.0, self.params, self.size_mb)

    @property
    def needs_data(self) -> bool:
        return self.method.needs_data or self.reconstruct


def _split(count: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(count)
    n_hold = int(round(count * holdout)) if count > 1 else 0
    n_hold = min(n_hold, count - 1)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def _subset(indices: np.ndarray, count: int, seed: int) -> np.ndarray:
    """At most ``count`` of ``indices``, drawn at random (data sorted by class must not bias
    them), in increasing order."""
    if len(indices) <= count:
        return indices
    return np.sort(np.random.default_rng(seed + 1).choice(indices, count, replace=False))


def _synthetic_calibration(model: onnx.ModelProto) -> Calibration:
    """One all-zeros sample, for data-free runs on models with static input shapes."""
    from .calib import model_inputs

    arrays = {}
    for inp in model_inputs(model):
        if any(d is None for d in inp.shape[1:]):
            raise OptionError(f"input '{inp.name}' has dynamic dims; pass --calib so shapes can be measured")
        arrays[inp.name] = np.zeros((1, *[d for d in inp.shape[1:]]), dtype=inp.dtype)
    return Calibration(arrays)


def _candidates(groups: list[ChannelGroup], g: GraphView, opts: PruneOptions
                ) -> tuple[list[ChannelGroup], list[tuple[str, str]]]:
    chosen, skipped = [], []
    for grp in groups:
        reason = grp.reason
        if not reason and grp.coupled and not opts.prune_coupled:
            reason = "channels coupled across branches (residual join); block outputs keep their width"
        if not reason and opts.needs_data and not any(_sampleable(c, g) for c in grp.all_consumers):
            reason = "none of its consumers can be sampled (e.g. only ConvTranspose or a grouped Conv)"
        if reason:
            if grp.owner and grp.channels > 1 and grp.producers:
                skipped.append((grp.name, reason))
        else:
            chosen.append(grp)
    return chosen, skipped


def _sampleable(c: Consumer, g: GraphView) -> bool:
    """Whether a consumer's regression problem can be sampled (and so it can be refit)."""
    h = handler_for(c.node)
    return isinstance(h, LinearHandler) and h.reconstructable(c.node, g)


def _downstream_layers(g: GraphView, todo: list[ChannelGroup], topo: dict[int, int]) -> list[Consumer]:
    """Sampleable layers after the first pruned channels that no pruned group refits: their
    inputs drift as the network is pruned, so they are refit to their original outputs too
    (the producers' kept filters, projection shortcuts, the classifier)."""
    refit_anyway = {id(c.node) for grp in todo for c in grp.all_consumers}
    first = min(topo[id(p)] for grp in todo for p in grp.producers)
    layers = []
    for node in g.graph.node:
        if topo[id(node)] <= first or id(node) in refit_anyway or not node.input:
            continue
        c = Consumer(node, node.input[0], 1)
        if _sampleable(c, g) and handler_for(node).rule(node, g) is not None:
            layers.append(c)
    return layers


def _first_edited(step: "ChannelGroup | Consumer", g: GraphView, topo: dict[int, int]) -> int:
    """Position of the first node a pruning step edits: for a unit, any node that produces or
    reads a tensor of a group holding its channels; for a refit, the layer itself."""
    if isinstance(step, Consumer):
        return topo[id(step.node)]
    nodes = [n for grp in (step.sites or [step]) for t in grp.tensors
             for n in [g.producer.get(t), *g.consumers.get(t, [])] if n is not None]
    return min(topo[id(n)] for n in nodes)


def _filter_norms(grp: ChannelGroup, g: GraphView) -> np.ndarray:
    return sum(handler_for(node).filter_norms(node, g) for node in grp.producers)


def _bn_scales(grp: ChannelGroup, g: GraphView, folded: dict[str, np.ndarray]) -> np.ndarray | None:
    """Summed |γ| of the BatchNorms on the group's channels (folded or still in the graph)."""
    total, found = np.zeros(grp.channels), False
    for node in grp.producers:
        if node.output[0] in folded:
            total += np.abs(folded[node.output[0]])
            found = True
    for node in grp.throughs:
        scales = handler_for(node).channel_scales(node, g)
        if scales is not None:
            total += np.abs(scales)
            found = True
    return total if found else None


def _contribution_problem(sites: list["_Site"], g: GraphView, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrix and correlations of the unit's channel contributions, summed over every
    consumer of every site (each normalised by its target energy so all weigh alike).

    Where a consumer also reads other groups' channels (after a Concat), those stay fixed: the
    target of the unit's channels is the output minus the others' contributions.
    """
    gram, corr = np.zeros((channels, channels)), np.zeros(channels)
    for site in sites:
        at = site.unit_channels
        for c, st in zip(site.sampled, site.stats):
            h: LinearHandler = handler_for(c.node)  # type: ignore[assignment]
            gr, co = normalized_contribution(st, h.weight_matrix(c.node, g), h.bias(c.node, g), site.width)
            mine, other = site.unit_positions, site.other_positions
            gram[np.ix_(at, at)] += gr[np.ix_(mine, mine)]
            corr[at] += co[mine] - gr[np.ix_(mine, other)].sum(axis=1)
    return gram, corr


def _select(grp: ChannelGroup, keep_n: int, opts: PruneOptions, g: GraphView, sites: list["_Site"], rng,
            bn_scales: dict[str, np.ndarray]) -> np.ndarray:
    method = opts.method
    scales = _bn_scales(grp, g, bn_scales) if method is Method.SLIM else None
    if method is Method.SLIM and scales is None:
        if opts.slim_fallback == "error":
            raise OptionError(f"--method slim needs BatchNorm γ, but group '{grp.name}' has no BatchNorm "
                              "(folded away by the exporter?); pass --slim-fallback l1 or use --method l1")
        method = Method.L1
    if method is Method.SLIM:
        choose = lambda run, n: slim_select(scales[run], n)  # noqa: E731
    elif method is Method.RANDOM:
        choose = lambda run, n: random_select(len(run), n, rng)  # noqa: E731
    elif method is Method.L1:
        norms = _filter_norms(grp, g)
        choose = lambda run, n: l1_select(norms[run], n)  # noqa: E731
    else:
        gram, corr = _contribution_problem(sites, g, grp.channels)
        if method is Method.THINET:
            choose = lambda run, n: thinet_select(gram[np.ix_(run, run)], n)  # noqa: E731
        else:
            choose = lambda run, n: lasso_select(gram[np.ix_(run, run)], corr[run], n)  # noqa: E731
    return per_segment(choose, grp.channels, grp.segments, keep_n)  # equal per group of a grouped Conv


def _given_keep(grp: ChannelGroup, keep_n: int, channels) -> np.ndarray:
    """Channels a caller chose to keep for ``grp`` (see :meth:`_Run.prune_to`), sorted and checked."""
    keep = np.unique(np.asarray(channels, dtype=np.int64))
    if len(keep) != len(channels) or len(keep) != keep_n or keep[0] < 0 or keep[-1] >= grp.channels:
        raise ValueError(f"{grp.name}: keep needs {keep_n} distinct channels of {grp.channels}, got {list(channels)}")
    return keep


def _progress(items, enabled: bool | None, desc: str):
    show = sys.stderr.isatty() if enabled is None else enabled
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="group", file=sys.stderr, leave=False)


def prune(model: onnx.ModelProto | str | os.PathLike, calib=None, *, image_options: ImageOptions | None = None,
          **options) -> PruneResult:
    """Prune ``model`` to meet its targets (default: 2× fewer MACs), keeping its outputs by reconstruction.

    ``calib`` is a path (.npy, .npz, a folder of them or of images), an array, a dict of arrays,
    an ONNX Runtime ``CalibrationDataReader`` or an iterable of feed dicts. ``options`` are the
    fields of :class:`PruneOptions` (``speedup``, ``params``, ``size_mb``, ``latency``, ``method``,
    ``reconstruct``, ``max_drop``, ``seed`` …).
    """
    start = time.perf_counter()
    try:
        opts = PruneOptions(**options).validate()
    except TypeError as exc:
        raise OptionError(f"unknown option: {exc}") from None
    original = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    check_opset(original)
    check_not_quantized(original)
    work = copy.deepcopy(original)
    constants_to_initializers(work)
    bn_scales: dict[str, np.ndarray] = {}
    folded = fold_batchnorm(work, bn_scales)
    if calib is None:
        if opts.needs_data or opts.max_drop is not None:
            raise OptionError(f"method '{opts.method.value}'{' with reconstruction' if opts.reconstruct else ''} "
                              "needs calibration data: pass --calib, or use --method l1 --no-reconstruct")
        cal = _synthetic_calibration(original)
        fit_idx, hold_idx = np.arange(1), np.arange(0)
    else:
        cal = load_calibration(calib, original, image_options)
        fit_idx, hold_idx = _split(len(cal), opts.holdout if opts.needs_data else min(opts.holdout, 0.99), opts.seed)
        if opts.needs_data and len(fit_idx) < 2:
            raise OptionError(f"only {len(fit_idx)} calibration sample(s) left after the hold-out; give more data")
    shapes = tensor_shapes(work, cal)
    if opts.method is Method.STRIPE:  # kernel positions of filters, not channels: its own pipeline
        from .stripe import prune_stripes

        return prune_stripes(original, work, shapes, cal, fit_idx, hold_idx, opts, folded, start)
    run = _Run(original, work, shapes, cal, fit_idx, hold_idx, opts, bn_scales)
    widths = run.widths(opts.targets, relax=opts.relax_round_to)
    if opts.latency is not None:
        widths = run.meet_latency_rounding(widths)
    pruned, results, fidelity, reached = run.guarded(widths)
    report = _report(original, work, pruned, cal, fit_idx, opts, results, run.skipped, folded, fidelity)
    report.targets_met = reached
    report.seconds = time.perf_counter() - start
    return PruneResult(pruned, report)


def _guard_loss(fidelity: list[OutputFidelity]) -> float:
    """What ``--max-drop`` bounds: the worst output's top-1 disagreement for class scores,
    otherwise its relative error."""
    return max((1 - f.top1_agreement if f.top1_agreement is not None else f.relative_error) for f in fidelity)


def _relaxed(targets: Targets, cost: CostModel, t: float) -> Targets:
    """``targets`` moved a fraction ``1 - t`` of the way back towards no pruning at all."""
    size = None if targets.size_mb is None else cost.total_bytes / 1e6 + t * (targets.size_mb - cost.total_bytes / 1e6)
    return Targets(1 + t * (targets.speedup - 1), None if targets.params is None else 1 - t * (1 - targets.params),
                   size)


FINER_ROUNDINGS = (8, 1)  # what a default --round-to gives way to, in order, when a target needs it
LATENCY_MARGIN = 1.05  # the search asks a little more than --latency: timings of one run vary


class _Run:
    """One pruning run: the analysed graph, its cost model and sampler, and ways to prune it to
    given widths (as often as the latency search and the accuracy guard need)."""

    def __init__(self, original, work, shapes, cal, fit_idx, hold_idx, opts: PruneOptions, bn_scales):
        self.original, self.work, self.shapes, self.cal = original, work, shapes, cal
        self.fit_idx, self.hold_idx, self.opts, self.bn_scales = fit_idx, hold_idx, opts, bn_scales
        g, groups, self.candidates, self.skipped = self._analyse(work)
        self.g, self.groups = g, groups
        if not any(grp.producers for grp in groups):
            raise NothingToPrune("the model has no layer whose channels can be pruned (Conv, Gemm, MatMul…): "
                                 "nothing to prune, nothing written")
        self.cost = build_cost_model(g, groups)
        self.sampler = None
        if opts.needs_data and self.candidates:
            topo = {id(n): i for i, n in enumerate(work.graph.node)}
            consumers = [c for grp in self.candidates for c in grp.all_consumers if _sampleable(c, g)]
            if opts.reconstruct and opts.refit_downstream:
                consumers += _downstream_layers(g, self.candidates, topo)
            sampler = functools.partial(Sampler, work, g, cal, consumers=consumers,
                                        samples_per_image=opts.samples_per_image, seed=opts.seed,
                                        residual=opts.residual_target, batch=fitting_batch(shapes, opts.batch_size))
            self.sampler = sampler(indices=fit_idx)
        if opts.latency is not None:
            self.measure_layer_latency(g)
        self.curves = None
        if opts.allocation == "sensitivity" and self.sampler:
            # a bounded random subset: the curves rank layers, and their cost (one probe pruning
            # per group) would otherwise grow with groups x images
            subset = _subset(fit_idx, opts.sensitivity_images, opts.seed)
            probe = self.sampler if len(subset) == len(fit_idx) else sampler(indices=subset)
            self.curves = self._sensitivity(probe)

    def _sensitivity(self, sampler: Sampler, probe: float = 0.5, images: int = 64) -> dict[int, list[float]]:
        """Layer error curves put on one scale: each unit's curve is scaled so that, at ``probe``
        of its width, it equals the relative error of the *model output* measured with that unit
        alone pruned (on a few fit images). A layer error deep in the net and one near the input
        then weigh by what they do to the output.

        Each probe reuses the statistics its curve was measured from, edits the model in place
        (undone at once) and runs only the part of the model after the unit (carried activations),
        so a probe costs a fraction of one forward pass over ``images`` images."""
        g, opts = self.g, self.opts
        solo = replace(opts, refit_downstream=False, progress=False)
        at = min(range(len(GRID)), key=lambda i: abs(GRID[i] - probe))
        names = [o.name for o in self.original.graph.output]
        batch = fitting_batch(self.shapes, opts.batch_size)
        topo = {id(n): i for i, n in enumerate(self.work.graph.node)}
        units = sorted(self.candidates, key=lambda u: _first_edited(u, g, topo))
        factors: dict[int, float] = {}
        with Frontier(self.work, self.cal, sampler.indices, batch) as data, \
                Frontier(self.work, self.cal, _subset(sampler.indices, images, opts.seed), batch) as outs:
            reference = _concat(outs.run(names), names)

            def scale(unit: ChannelGroup, consumers: list[Consumer], stats: list, curve: list[float]) -> None:
                width = max(1, int(round(GRID[at] * unit.channels)))
                if width >= unit.channels or curve[at] <= 0:
                    return
                list(outs.run([], advance_to=_first_edited(unit, g, topo)))
                known = _KnownStats(sampler, {id(c.node): st for c, st in zip(consumers, stats)})
                with trial_edit(g):
                    _Pruner(g, self.groups, solo, known, self.bn_scales).prune_unit(unit, width, tidy=False)
                    pruned = _concat(outs.run(names), names)
                err = max(float(np.linalg.norm(p - r) / max(np.linalg.norm(r), 1e-30)) for p, r in zip(pruned, reference))
                factors[unit.index] = err / curve[at]

            curves = measure_curves(units, sampler, g, _sampleable, frontier=data, on_curve=scale)
        return {i: curve if i not in factors else [v * factors[i] for v in curve] for i, curve in curves.items()}

    def _analyse(self, model: onnx.ModelProto):
        g = GraphView(model, self.shapes)
        groups = find_groups(g)
        candidates, skipped = _candidates(groups, g, self.opts)
        return g, groups, candidates, skipped

    def widths(self, targets: Targets, round_to: int | None = None, relax: bool = False) -> dict[int, int]:
        """Per-group widths meeting ``targets`` at ``round_to`` (default: ``--round-to``). Where
        the rounding is what puts them out of reach, ``relax`` takes the first finer multiple
        that reaches them (and keeps it for the rest of the run), with a warning; otherwise the
        error says which multiple would do."""
        round_to = self.opts.round_to if round_to is None else round_to
        try:
            return self._allocate(targets, round_to)
        except TargetNotMetError as exc:
            for finer in (r for r in FINER_ROUNDINGS if r < round_to):
                try:
                    widths = self._allocate(targets, finer)
                except TargetNotMetError:
                    continue
                if not relax:
                    how = f"rounded to multiples of {finer}" if finer > 1 else "not rounded"
                    raise TargetNotMetError(f"{exc}; with kept channels {how} it can be reached: "
                                            f"try --round-to {finer}") from None
                log.warning("%s cannot be reached with kept channels rounded to multiples of %d: rounding to "
                            "multiples of %d instead", targets.asked(), round_to, finer)
                self.opts = replace(self.opts, round_to=finer)
                return widths
            raise

    def _allocate(self, targets: Targets, round_to: int) -> dict[int, int]:
        if self.curves is not None:
            return allocate(self.cost, self.candidates, self.curves, targets, round_to)
        return uniform_widths(self.cost, self.candidates, targets, round_to)

    def prune_to(self, widths: dict[int, int], opts: PruneOptions | None = None,
                 keep: dict[int, np.ndarray] | None = None, sampler: Sampler | None = None
                 ) -> tuple[onnx.ModelProto, list[GroupResult]]:
        """A pruned copy of the model: each candidate group cut to ``widths``, front to back.

        ``keep`` gives, for some groups (by index), the channels to keep instead of those the
        method selects (for experiments comparing selection criteria, e.g. tools/bench_single_layer.py).
        """
        opts = opts or self.opts
        work = copy.deepcopy(self.work)
        g, groups, candidates, _ = self._analyse(work)
        topo = {id(n): i for i, n in enumerate(work.graph.node)}
        todo = [grp for grp in candidates if widths[grp.index] < grp.channels]
        steps = [(min(topo[id(c.node)] for c in grp.all_consumers), grp) for grp in todo]
        if todo and opts.reconstruct and opts.refit_downstream and opts.needs_data:
            steps += [(topo[id(c.node)], c) for c in _downstream_layers(g, todo, topo)]
        steps.sort(key=lambda step: step[0])
        sampler = (sampler or self.sampler) if opts.needs_data else None
        pruner = _Pruner(g, groups, opts, sampler, self.bn_scales, keep)
        # the frontier's cut may move up to the first node that this or a later step edits
        limits = list(np.minimum.accumulate([_first_edited(step, g, topo) for _, step in steps][::-1])[::-1])
        results = []
        with contextlib.ExitStack() as stack:
            frontier = stack.enter_context(Frontier(work, self.cal, sampler.indices, sampler.batch or DEFAULT_BATCH)
                                           ) if sampler else None
            for (_, step), limit in zip(_progress(steps, opts.progress, "pruning"), limits):
                runs = functools.partial(frontier.run, advance_to=int(limit)) if frontier else None
                if isinstance(step, ChannelGroup):
                    results.append(pruner.prune_unit(step, widths[step.index], runs))
                else:
                    pruner.refit_layer(step, runs)
        pruned = finalize(work)
        try:
            onnx.checker.check_model(pruned, full_check=True)
        except onnx.checker.ValidationError as exc:  # a bug, never the user's fault
            raise RuntimeError(f"the pruned model fails the ONNX checker: {exc}") from exc
        return pruned, results

    def prune_to_targets(self, widths: dict[int, int], tries: int = 3) -> tuple[onnx.ModelProto, list[GroupResult]]:
        """:meth:`prune_to`, then check the MACs reached on the pruned model itself: where a
        Split's parts kept unequal shares of a unit's channels, the estimate can miss, and the
        MACs target is raised by the miss and the model pruned again."""
        targets = self.opts.targets
        for attempt in range(tries):
            pruned, results = self.prune_to(widths)
            reached = self.cost.total / max(model_macs(pruned, self.cal), 1)
            if reached >= targets.speedup * (1 - 1e-9) or attempt == tries - 1:
                break
            log.info("MACs reached %.3fx < %.3fx: raising the target", reached, targets.speedup)
            targets = Targets(targets.speedup ** 2 / reached, targets.params, targets.size_mb)
            widths = self.widths(targets)
        return pruned, results

    def _latency_feed(self) -> dict[str, np.ndarray]:
        return self.cal.take([0] * batch_size_for(self.original, self.opts.latency_batch))

    def measured_speedup(self, widths: dict[int, int]) -> float:
        """Measured latency speedup of the architecture ``widths`` describes (weights do not matter)."""
        shape_only = PruneOptions(**{**self.opts.__dict__, "method": Method.L1, "reconstruct": False,
                                     "progress": False})
        arch, _ = self.prune_to(widths, shape_only)
        before, after = latency_ms([self.original, arch], self._latency_feed(), self.opts.provider)
        return before / after

    def _latency_targets(self, knob: float) -> Targets:
        """The targets for one step of the latency search: the user's, plus ``knob`` as a
        predicted-latency speedup (per-layer timings) or, without those, as a MACs speedup."""
        base = self.opts.targets
        if self.cost.latency is not None:
            return Targets(base.speedup, base.params, base.size_mb, latency=knob)
        return Targets(max(base.speedup, knob), base.params, base.size_mb)

    def meet_latency(self, widths: dict[int, int], tries: int = 10) -> dict[int, int]:
        """The least-pruned widths whose measured latency speedup reaches ``--latency``: raise the
        predicted target until the measurement holds, then bisect between the last miss and the first hit.
        Where no architecture clears the safety margin, the fastest one that reached ``--latency``
        itself, twice, is taken (on tiny models, per-run overhead caps the speedup near the goal)."""
        goal = self.opts.latency
        miss, hit, measured, trial_widths = 1.0, None, 0.0, widths
        near: tuple[float, dict[int, int]] | None = None  # the fastest trial that measured >= goal
        knob = goal
        for _ in range(tries):
            try:
                trial_widths = self.widths(self._latency_targets(knob))
            except TargetNotMetError:
                if hit is None and self.cost.latency is None and knob / miss > 1.02:
                    knob = (knob + miss) / 2  # past the most pruning the widths allow: step back
                    continue
                if hit is not None or self.cost.latency is None:
                    break
                log.info("the per-layer timings predict less than %.2fx: searching on MACs instead", knob)
                self.cost.latency, knob = None, goal
                continue
            measured = self.measured_speedup(trial_widths)
            if measured >= goal * LATENCY_MARGIN:  # a hit is measured twice: one lucky run must not decide
                measured = min(measured, self.measured_speedup(trial_widths))
            log.info("target %.2fx (MACs %.2fx fewer): measured latency speedup %.2fx", knob,
                     self.cost.total / max(self.cost.macs(trial_widths), 1e-9), measured)
            if measured >= goal * LATENCY_MARGIN:
                hit = (knob, trial_widths)
            else:
                miss = knob
                if measured >= goal and (near is None or measured > near[0]):
                    near = (measured, trial_widths)
            if hit is None:
                knob *= max(goal / max(measured, 1e-3), 1.1)
            elif hit[0] / miss < 1.05:
                break
            else:
                knob = (miss + hit[0]) / 2
        if hit is None and near is not None and self.measured_speedup(near[1]) >= goal:
            log.info("no architecture cleared the %.0f %% margin; taking one that measured %.2fx twice",
                     100 * (LATENCY_MARGIN - 1), goal)
            return near[1]
        if hit is None:
            raise TargetNotMetError(f"--latency {goal:g} on {self.opts.provider} cannot be reached: the last "
                                    f"architecture tried ({self.cost.total / max(self.cost.macs(trial_widths), 1e-9):.2f}x "
                                    f"fewer MACs) measured {measured:.2f}x at batch {self.opts.latency_batch}; small "
                                    "models are dominated by per-run overhead, try a larger --latency-batch"
                                    + (f" (or a smaller --round-to than {self.opts.round_to}, which limits how far "
                                       "narrow layers can be cut)" if self.opts.round_to > 1 else ""))
        return hit[1]

    def meet_latency_rounding(self, widths: dict[int, int]) -> dict[int, int]:
        """:meth:`meet_latency`; where the rounding is the CLI's default rather than the user's
        (``relax_round_to``), finer multiples (8, then none) are tried before giving up: on small
        models at batch 1, 16-wide layers cannot be cut far enough under multiples of 16."""
        finer = [r for r in FINER_ROUNDINGS if r < self.opts.round_to] if self.opts.relax_round_to else []
        for round_to in finer:
            try:
                return self.meet_latency(widths)
            except TargetNotMetError as exc:
                log.warning("%s; trying kept channels rounded to multiples of %d", exc, round_to)
            self.opts = replace(self.opts, round_to=round_to)
            widths = self.widths(self.opts.targets)
        return self.meet_latency(widths)

    def measure_layer_latency(self, g: GraphView) -> None:
        """Time every prunable layer alone (:mod:`onnxprune.latency_cost`) for the latency search."""
        tensors = {t for grp in self.candidates for t in grp.tensors}
        prunable = {n.name or n.output[0]: (n.input[0] in tensors, n.output[0] in tensors)
                    for n in g.graph.node if n.input}
        feed = self._latency_feed()
        whole = latency_ms([self.original], feed, self.opts.provider)[0]
        self.cost.latency = layer_latency(g, self.cost, prunable, next(iter(feed.values())).shape[0],
                                          self.opts.provider, whole)

    def fidelity(self, pruned: onnx.ModelProto) -> list[OutputFidelity]:
        check_idx = self.hold_idx if len(self.hold_idx) else self.fit_idx
        return compare(self.original, pruned, self.cal, check_idx, fitting_batch(self.shapes, self.opts.batch_size))

    def guarded(self, widths: dict[int, int], tries: int = 4):
        """Prune to ``widths``; under ``--max-drop``, give width back (all targets relaxed
        together, by bisection) until the held-out loss holds. Returns the model, its group
        results, its fidelity and whether the targets were met."""
        pruned, results = self.prune_to_targets(widths)
        fidelity = self.fidelity(pruned)
        limit = self.opts.max_drop
        if limit is None or _guard_loss(fidelity) <= limit:
            return pruned, results, fidelity, True
        log.warning("held-out loss %.4f exceeds --max-drop %g: giving width back", _guard_loss(fidelity), limit)
        best, lo, hi = None, 0.0, 1.0
        for _ in range(tries):
            t = (lo + hi) / 2
            trial = self.prune_to(self.widths(_relaxed(self.opts.targets, self.cost, t)))
            fid = self.fidelity(trial[0])
            if _guard_loss(fid) <= limit:
                best, lo = (*trial, fid), t
            else:
                hi = t
        if best is None:
            raise TargetNotMetError(f"--max-drop {limit:g} cannot be met even with mild pruning (held-out loss "
                                    f"{_guard_loss(fid):.4f} at {_relaxed(self.opts.targets, self.cost, hi).speedup:.2f}x "
                                    "fewer MACs); raise --max-drop or give more calibration data")
        return (*best, False)


def _concat(batches, names: list[str]) -> list[np.ndarray]:
    """The arrays ``names`` of batched runs, each joined over the batches."""
    return [np.concatenate(parts) for parts in zip(*[[out[n] for n in names] for _, out in batches])]


class _KnownStats:
    """A sampler whose statistics for some consumers (by node) were measured already, on the
    model as it is now; any other request goes to ``sampler``."""

    def __init__(self, sampler: Sampler, known: dict[int, object]):
        self.sampler, self.known = sampler, known

    def stats(self, g: GraphView, consumers: list[Consumer], target_columns=None, runs: Runs | None = None) -> list:
        if all(id(c.node) in self.known for c in consumers):
            return [self.known[id(c.node)] for c in consumers]
        return self.sampler.stats(g, consumers, target_columns)

    def __getattr__(self, name: str):
        return getattr(self.sampler, name)


@dataclass
class _Site:
    """One group holding a unit's channels, as it is just before the unit is pruned."""

    group: ChannelGroup
    width: int  # channels the group has now
    unit_positions: np.ndarray  # where the unit's channels sit among them
    unit_channels: np.ndarray  # which of the unit's channels sit there
    other_positions: np.ndarray
    sampled: list[Consumer]  # consumers whose regression problems are sampled and refit
    stats: list | None = None


class _Pruner:
    """Prunes units (groups owning channels) one at a time: select, rewrite, refit."""

    def __init__(self, g: GraphView, groups: list[ChannelGroup], opts: PruneOptions, sampler: Sampler | None,
                 bn_scales: dict[str, np.ndarray], keep: dict[int, np.ndarray] | None = None):
        self.g, self.opts, self.sampler, self.bn_scales = g, opts, sampler, bn_scales
        self.keep = keep or {}  # unit index -> channels to keep, overriding the selection method
        self.rng = np.random.default_rng(opts.seed)
        self.current = {grp.index: grp.atoms.copy() for grp in groups}  # atoms each group holds now
        self.kept_outputs: dict[str, np.ndarray] = {}  # producer output -> original channels still there

    def _sites(self, unit: ChannelGroup) -> list[_Site]:
        sites = []
        for grp in unit.sites:
            now = self.current[grp.index]
            mine = np.isin(now, unit.atoms)
            channel_of = {int(a): i for i, a in enumerate(unit.atoms)}
            unit_channels = np.array([channel_of[int(a)] for a in now[mine]], dtype=np.int64)
            sites.append(_Site(grp, len(now), np.flatnonzero(mine), unit_channels, np.flatnonzero(~mine),
                               [c for c in grp.consumers if _sampleable(c, self.g)]))
        return sites

    def prune_unit(self, unit: ChannelGroup, keep_n: int, runs: Runs | None = None, tidy: bool = True) -> GroupResult:
        g, opts = self.g, self.opts
        sites = self._sites(unit)
        if self.sampler:
            for site in sites:
                site.stats = self.sampler.stats(g, site.sampled, self.kept_outputs, runs) if site.sampled else []
        if unit.index in self.keep:
            keep = _given_keep(unit, keep_n, self.keep[unit.index])
        else:
            keep = _select(unit, keep_n, opts, g, sites, self.rng, self.bn_scales)
        removed = np.setdiff1d(unit.atoms, unit.atoms[keep])
        res = GroupResult(unit.name, unit.channels, len(keep),
                          [c.node.name or c.node.output[0] for c in unit.all_consumers])
        befores, afters = [], []
        for site in sites:
            now = self.current[site.group.index]
            site_keep = np.flatnonzero(~np.isin(now, removed))
            ks = [handler_for(c.node).weight_matrix(c.node, g).shape[1] // site.width  # type: ignore[attr-defined]
                  for c in site.sampled] if opts.reconstruct and site.stats else []
            prune_group(g, site.group, site_keep, site.width)
            self.current[site.group.index] = now[site_keep]
            for c, st, k in zip(site.sampled, site.stats or [], ks):
                fit = self._refit(c, st, expand_channels(site_keep, k), res)
                befores.append(fit.error_before)
                afters.append(fit.error_after)
        for node in unit.producers:
            self.kept_outputs[node.output[0]] = keep
        if befores:
            res.error_before_refit, res.error_after_refit = float(np.mean(befores)), float(np.mean(afters))
        if tidy:
            g.drop_unused_initializers()
        log.info("%s: %d -> %d channels", unit.name, unit.channels, len(keep))
        return res

    def refit_layer(self, c: Consumer, runs: Runs | None = None) -> float:
        """Refit a layer whose input channels were not pruned but whose inputs drifted."""
        st = self.sampler.stats(self.g, [c], self.kept_outputs, runs)[0]
        h: LinearHandler = handler_for(c.node)  # type: ignore[assignment]
        fit = refit(st, np.arange(st.dim), h.weight_matrix(c.node, self.g), h.bias(c.node, self.g), h.has_bias)
        if fit.ridge is not None:
            h.set_linear(c.node, fit.weight, fit.bias, self.g)
        self.g.drop_unused_initializers()
        return fit.error_after

    def _refit(self, c, st, cols: np.ndarray, res: GroupResult):
        h: LinearHandler = handler_for(c.node)  # type: ignore[assignment]
        fit = refit(st, cols, h.weight_matrix(c.node, self.g), h.bias(c.node, self.g), h.has_bias)
        if fit.ridge is None:
            res.refit_skipped.append(c.node.name or c.node.output[0])
        else:
            h.set_linear(c.node, fit.weight, fit.bias, self.g)
        res.samples_per_unknown = min(res.samples_per_unknown or np.inf, st.n.sum() / (len(cols) + 1))
        res.residual_target |= bool(self.sampler.targets[c.node.output[0]].residual_other)
        return fit


def _layer_rows(before: onnx.ModelProto, after: onnx.ModelProto, cal: Calibration
                ) -> tuple[list[LayerRow], dict[str, tuple[int, ...]]]:
    """Per-layer channels and MACs before/after, and the tensor shapes of ``before``."""
    gb = GraphView(before, tensor_shapes(before, cal))
    ga = GraphView(after, tensor_shapes(after, cal))
    after_nodes = {n.output[0]: n for n in after.graph.node if n.output}
    rows = []
    for node in before.graph.node:
        macs = handler_for(node).macs(node, gb)
        other = after_nodes.get(node.output[0]) if node.output else None
        if not macs or other is None:
            continue
        rows.append(LayerRow(node.name or node.output[0], node.op_type,
                             (gb.channels(node.input[0]) or 0, ga.channels(other.input[0]) or 0),
                             (gb.channels(node.output[0]) or 0, ga.channels(other.output[0]) or 0),
                             (macs, handler_for(other).macs(other, ga))))
    return rows, gb.shapes


def _report(original, reference, pruned, cal, fit_idx, opts, results, skipped, folded, fidelity) -> Report:
    rows, _ = _layer_rows(reference, pruned, cal)
    lat = None
    if opts.measure_latency:
        feed = cal.take([0] * batch_size_for(original, opts.latency_batch))
        lat = tuple(latency_ms([original, pruned], feed, opts.provider))
    totals = Totals(macs=(sum(r.macs[0] for r in rows), sum(r.macs[1] for r in rows)),
                    params=(count_params(GraphView(original)), count_params(GraphView(pruned))),
                    size_bytes=(model_bytes(original), model_bytes(pruned)), latency_ms=lat)
    return Report(method=opts.method.value, reconstruct=opts.reconstruct, target_speedup=opts.speedup or 1.0,
                  totals=totals, groups=results, layers=rows, skipped=skipped, fidelity=fidelity,
                  calibration={"fit": int(len(fit_idx)), "holdout": int(len(cal)) - int(len(fit_idx)),
                               "samples_per_image": opts.samples_per_image},
                  bn_folded=folded, targets={k: v for k, v in opts.targets.__dict__.items() if v is not None}
                  | ({"latency": opts.latency} if opts.latency is not None else {}),
                  provider=opts.provider, latency_batch=opts.latency_batch)
