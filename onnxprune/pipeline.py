"""The pruning pipeline, stage by stage.

    pruner = Pruner(model, calib, options)   # load + fold, calibration split, shapes, groups, targets
    plan   = pruner.allocate()               # widths per group: sensitivity curves, --latency search
    pruned = pruner.prune(plan)              # group by group, front to back (carried activations)
    pruned = pruner.sparsify(pruned)         # --sparsity 2:4 only: masks and refits from calibration data
    final  = pruner.quantize(pruned)         # --quantize int8 only: ORT static QDQ, fit samples
    check  = pruner.verify(final.model)      # held-out fidelity (and --max-drop: give width back)
    report = pruner.report(...)              # per-layer table, totals, measured latency, phases

:meth:`Pruner.run` is that list; :func:`prune` is the one-call API. Each stage's wall time is
in the report (``phases``); stages longer than a moment show a progress bar on a terminal.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import onnx

from .activations import batch_size_for, fitting_batch, static_batch, tensor_shapes, with_batch_one
from .allocation import DEEP_CUT, Allocator, Plan, deepest_cut
from .batch import (batches_like_singles, check_batch_axis, declare_batch_as, free_batch, inputs_without_batch_axis,
                    layer_outputs, with_batch_axis, without_batch_axis)
from .budget import Targets, build_cost_model, relaxed_targets
from .calib import (ImageOptions, check_varied, load_calibration, random_subset, split_calibration,
                    synthetic_calibration)
from .candidates import analyse, downstream_layers, positions, sampleable
from .errors import NothingToPrune, OptionError, TargetNotMetError
from .fold import (constants_to_initializers, flush_subnormal_weights, fold_batchnorm, fold_channel_means,
                   fold_channel_shuffles, fold_group_norms, fold_pads, subnormal_weights, unfold_group_norms)
from .graph import ChannelGroup
from .graphview import GraphView
from .group_pruner import prune_to
from .io import check_not_quantized, load_model, model_bytes, upgraded
from .latency import measure
from .latency_search import LatencySearch
from .ops import handler_for
from .options import PruneOptions, PruneResult
from .progress import Progress
from .prunable import prunability
from .quantize import quantize_int8, scheme
from .sparsity import SparseLayer, sparsify_2_4
from .report import GroupResult, ModelForm, Quantization, Report
from .sampling import Sampler
from .select import Method
from .sensitivity import CurveRecord, output_scaled_curves
from .summary import cost_table, model_macs
from .tail import TailResult, refine_tail
from .verify import OutputFidelity, compare, guard_loss

log = logging.getLogger(__name__)


def _has_depthwise(g: GraphView) -> bool:
    return any(handler_for(node).is_depthwise(node, g) for node in g.nodes_by_type("Conv"))


def _widest_refit(g: GraphView, groups: list[ChannelGroup]) -> int:
    """Input columns of the widest layer that pruning a group would refit (0: none)."""
    return max((handler_for(c.node).weight_matrix(c.node, g).shape[1]
                for grp in groups if grp.prunable for c in grp.consumers if sampleable(c, g)), default=0)


@dataclass
class Pruned:
    """A pruned model and what each of its groups went through."""

    model: onnx.ModelProto  # the final model: quantized under --quantize
    groups: list[GroupResult]
    tail: TailResult | None = None  # the tail refinement (onnxprune.tail), where the model has a tail
    float_model: onnx.ModelProto | None = None  # under --quantize, the pruned model before quantization


class Pruner:
    """One pruning session over a model and its calibration data; each stage is a method."""

    def __init__(self, model: onnx.ModelProto | str | os.PathLike, calib=None, options: PruneOptions | None = None,
                 image_options: ImageOptions | None = None):
        self.start = time.perf_counter()
        self.sparse_layers: list[SparseLayer] = []  # set by sparsify (--sparsity 2:4)
        # per layer problem, the ridge the first pruning cross-validated (re-prunes to a missed MACs
        # target reuse it; the --max-drop back-off, at other widths, cross-validates afresh)
        self.ridges: dict[tuple[str, int], float] = {}
        self.freed: list[str] = []  # nodes whose constant shapes write batch 1, freed while the passes run (_free_batch)
        self.measured_curves = CurveRecord()  # shared with a second session, which measures only groups new to it
        self.opts = opts = (options or PruneOptions()).validate()
        # what this session was given, for a second one (_with_residual_joined)
        self.asked, self.model_source, self.calib_source, self.image_options = opts, model, calib, image_options
        self.data_free = calib is None  # the one all-zeros sample only fixes the shapes
        self.progress = Progress(opts.progress)
        with self.progress.phase("load"):
            self.original = load_model(model) if not isinstance(model, onnx.ModelProto) else upgraded(model)
            check_not_quantized(self.original)
            self._flush_subnormals()
            self.work = copy.deepcopy(self.original)
            constants_to_initializers(self.work)
            self.bn_scales: dict[str, np.ndarray] = {}
            self.folded = fold_batchnorm(self.work, self.bn_scales)
            fold_pads(self.work)
            self.cal, self.fit_idx, self.hold_idx, self.mixtures = self._calibration(calib, image_options)
            self._settle_batch()
        if opts.method is Method.STRIPE:  # kernel positions of filters, not channels: its own pipeline
            return
        with self.progress.phase("analyse"):
            self.analysis = analyse(self.work, self.shapes, bool(opts.prune_coupled), opts.needs_data,
                                    exclude=opts.exclude)
            if not any(grp.producers for grp in self.analysis.groups):
                raise NothingToPrune("the model has no layer whose channels can be pruned (Conv, Gemm, MatMul…): "
                                     "nothing to prune, nothing written")
            self.cost = build_cost_model(self.analysis.g, self.analysis.groups)
            if opts.method is Method.AUTO:
                g = self.analysis.g
                self.opts = opts = replace(opts, method=Method.for_network(
                    _has_depthwise(g), bool(self.residual_joined), _widest_refit(g, self.analysis.groups)))
                log.info("method: %s", opts.method.value)
            if opts.prune_coupled is None:
                self.opts = opts = replace(opts, prune_coupled=self._residual_needed())
                if opts.prune_coupled:
                    self.analysis = analyse(self.work, self.shapes, True, opts.needs_data, exclude=opts.exclude)
                    self.cost = build_cost_model(self.analysis.g, self.analysis.groups)
        with self.progress.phase("targets"):
            self.sampler = self._sampler(self.fit_idx, pairs=opts.refine) if opts.needs_data and self.candidates else None

    def _flush_subnormals(self) -> None:
        """Subnormal weights to zero in this run's copy of the original (a given model or file is
        not touched), so the pruned model has none, and its measured speedup is the pruning's,
        not the flushing's: the latency baseline, and the reference every check compares with, is
        the original with them zeroed (their share of any output is below float32's resolution)."""
        counts = subnormal_weights(self.original)
        if counts:
            self.original = copy.deepcopy(self.original)
            flush_subnormal_weights(self.original)
            worst = max(counts, key=counts.get)
            log.warning("the model holds %d subnormal weights (nonzero, below the smallest normal float, 1.2e-38 in "
                        "float32; %d of them in '%s'): CPUs compute with them many times slower, so the pruned "
                        "model has them as zeros and its latency is measured against the original with them zeroed "
                        "too (zeroing them alone speeds the original up: `onnxprune bench` compares the two files)",
                        sum(counts.values()), counts[worst], worst)

    def _settle_batch(self) -> None:
        """How the passes feed samples: inputs without a batch axis get one (:meth:`run` takes it
        away); a dynamic batch that does not batch like single samples runs one at a time; a
        declared batch of 1 is freed where the graph batches (:meth:`_free_batch`). Also measures
        the tensor shapes at one sample."""
        if self.cal.unbatched:
            log.info("inputs without a batch axis: %s (samples fed one at a time)", ", ".join(sorted(self.cal.unbatched)))
            self.original = with_batch_axis(self.original, self.cal.unbatched)
            self.work = with_batch_axis(self.work, self.cal.unbatched)
        self.shapes = tensor_shapes(self.work, self.cal)
        fold_group_norms(self.work, self.shapes)  # spelled out again in every model handed back
        fold_channel_means(self.work, self.shapes)
        fold_channel_shuffles(self.work, self.shapes)  # at the measured shapes; the maps it makes keep theirs
        if self.opts.needs_data:
            check_batch_axis(self.work, self.shapes)
        dynamic = static_batch(self.work) is None and len(self.cal) >= 2  # one sample tells nothing
        if dynamic and not batches_like_singles(self.work, self.cal, layer_outputs(self.work), self.shapes):
            log.warning("the model runs one sample at a time (its batch dim is declared dynamic, but "
                        "inside a batch of 2 fails, is folded away or mixes the samples): every pass runs "
                        "one image, and the pruned model declares batch 1")
            self.original, self.work = with_batch_one(self.original), with_batch_one(self.work)
        elif static_batch(self.work) == 1 and self.opts.method is not Method.STRIPE:
            self._free_batch()

    def _free_batch(self) -> None:
        """Let the working model run many samples per pass where it declares batch 1 (exporters'
        default) but computes each sample alone: the calibration passes, probes and refits then
        run batched instead of one image at a time. The pruned model declares batch 1 again
        (:meth:`prune`); the original, timed and checked against, stays as declared."""
        self.freed = free_batch(self.work, self.shapes)
        if batches_like_singles(self.work, self.cal):
            log.info("the model declares batch 1 but runs batched: calibration passes run batched")
        else:
            declare_batch_as(self.work, self.original, self.freed)
            self.freed = []

    @property
    def candidates(self) -> list[ChannelGroup]:
        """The channel groups this run prunes."""
        return self.analysis.candidates

    @property
    def residual_joined(self) -> list[ChannelGroup]:
        """Prunable groups whose channels residual joins couple across branches."""
        return [grp for grp in self.analysis.groups if grp.owner and grp.coupled and grp.prunable]

    def _residual_needed(self) -> bool:
        """Whether residual-joined groups must shrink too for the size targets to be reachable (the
        default, ``prune_coupled=None``): they keep their width wherever the targets allow it."""
        joined, opts = self.residual_joined, self.opts
        with_curves = opts.allocation != "uniform" and opts.needs_data
        if not joined or Allocator(self.cost, self.candidates, None).reachable(
                opts.targets, opts.round_to, opts.relax_round_to, curves=with_curves):
            return False
        log.warning("%s cannot be reached with the %d residual-joined groups at full width: pruning them too "
                    "(--no-prune-residual keeps them)", self.opts.targets.asked(), len(joined))
        return True

    def run(self) -> PruneResult:
        """Every stage, in order."""
        if self.opts.method is Method.STRIPE:
            from .stripe import prune_stripes

            result = prune_stripes(self.original, self.work, self.shapes, self.cal, self.fit_idx, self.hold_idx,
                                   self.opts, self.folded, self.start)
            unfold_group_norms(result.model)
        else:
            plan = self.allocate()
            if self._residual_instead(plan):
                return self._with_residual_joined(plan).run()
            pruned, fidelity, reached = self.prune_verified(plan)
            result = PruneResult(pruned.model, self.report(pruned, fidelity, reached))
        without_batch_axis(result.model, self.cal.unbatched)
        return result

    def _residual_instead(self, plan: Plan) -> bool:
        """Whether the residual-joined groups, kept at full width by default (``prune_coupled``
        left unset), should shrink too because ``plan`` cuts some group more than
        :data:`DEEP_CUT` times: spread over the block outputs the cut then costs less on the
        residual models measured (docs/benchmarks.md). Not under ``--latency``, whose search
        measures its own plans."""
        return (self.asked.prune_coupled is None and not self.opts.prune_coupled and bool(self.residual_joined)
                and self.opts.latency is None and self._deep_cut(plan) is not None)

    def _deep_cut(self, plan: Plan) -> tuple[ChannelGroup, float] | None:
        """The group ``plan`` cuts most and by how many times, where that is more than :data:`DEEP_CUT`."""
        cut = deepest_cut(plan, self.candidates)
        return cut if cut is not None and cut[1] > DEEP_CUT else None

    def _with_residual_joined(self, plan: Plan) -> "Pruner":
        """A new session on the same inputs that prunes the residual-joined groups too, its time
        counted from this one's start; it takes the curves of the groups both share from this one."""
        grp, factor = self._deep_cut(plan)  # type: ignore[misc]
        log.warning("%s cuts '%s' %.1fx with the %d residual-joined groups at full width: pruning them too "
                    "(--no-prune-residual keeps them)", self.asked.targets.asked(), grp.name, factor,
                    len(self.residual_joined))
        session = Pruner(self.model_source, self.calib_source, replace(self.asked, prune_coupled=True),
                         self.image_options)
        session.start, session.measured_curves = self.start, self.measured_curves
        session.progress.seconds = {"first plan": sum(self.progress.seconds.values()), **session.progress.seconds}
        return session

    # ------------------------------------------------------------------ stages
    def _calibration(self, calib, image_options):
        """The calibration samples, the fit and held-out indices, and how many of the fit ones are
        blends (:meth:`Calibration.with_mixtures`)."""
        opts = self.opts
        if calib is None:
            if opts.quantize:
                raise OptionError(f"--quantize {opts.quantize} needs calibration data for its activation ranges: "
                                  "pass --calib")
            if opts.sparsity:
                raise OptionError(f"--sparsity {opts.sparsity} needs calibration data to choose and refit the kept "
                                  "weights: pass --calib")
            if opts.needs_data or opts.max_drop is not None:
                raise OptionError(f"method '{opts.method.value}'{' with reconstruction' if opts.reconstruct else ''} "
                                  "needs calibration data: pass --calib, or use --method l1 --no-reconstruct")
            return synthetic_calibration(self.original, inputs_without_batch_axis(self.original)), np.arange(1), \
                np.arange(0), 0
        cal = load_calibration(calib, self.original, image_options, opts.calib_samples, opts.seed)
        if cal.available > len(cal):
            log.warning("calibration: %d of the %d samples given, drawn at random (--calib-samples N to change; "
                        "0 uses all)", len(cal), cal.available)
        if opts.needs_data:
            check_varied(cal)
        self.calib_source = cal  # read once, also for a second session
        fit_idx, hold_idx = split_calibration(len(cal), opts.holdout if opts.needs_data else min(opts.holdout, 0.99),
                                              opts.seed)
        if opts.needs_data and len(fit_idx) < 2:
            raise OptionError(f"only {len(fit_idx)} calibration sample(s) left after the hold-out; give more data")
        mixtures = int(round(opts.mixtures * len(fit_idx))) if opts.needs_data else 0
        if mixtures:  # the refits see more input directions; the held-out check stays on real samples
            cal, mixed_idx = cal.with_mixtures(fit_idx, mixtures, opts.seed)
            fit_idx = np.concatenate([fit_idx, mixed_idx])
        return cal, fit_idx, hold_idx, mixtures

    def _sampler(self, indices: np.ndarray, pairs: bool = False) -> Sampler:
        """Original-model targets of every layer the run may refit, on ``indices`` (``pairs``: and
        of the residual branches it may refine, at more positions)."""
        g, opts = self.analysis.g, self.opts
        consumers = [c for grp in self.candidates for c in grp.all_consumers if sampleable(c, g)]
        if opts.reconstruct and opts.refit_downstream:
            consumers += downstream_layers(g, self.candidates, positions(self.work))
        return Sampler(self.work, g, self.cal, indices=indices, consumers=consumers,
                       samples_per_image=opts.samples_per_image, seed=opts.seed, residual=opts.residual_target,
                       batch=fitting_batch(self.shapes, opts.batch_size), provider=opts.calibration_provider,
                       pairs=pairs and opts.reconstruct)

    def allocate(self) -> Plan:
        """Widths per group meeting the targets (and, with ``--latency``, the measured goal)."""
        opts, curves = self.opts, None
        if opts.allocation != "uniform" and self.sampler:
            with self.progress.phase("sensitivity"):
                # a bounded random subset: the curves rank layers, their cost grows with images
                subset = random_subset(self.fit_idx, opts.sensitivity_images, opts.seed)
                sampler = self.sampler if len(subset) == len(self.fit_idx) else self._sampler(subset)
                curves = output_scaled_curves(self.analysis, sampler, self.shapes, opts, self.bn_scales,
                                              self.progress, record=self.measured_curves)
        self.allocator = Allocator(self.cost, self.candidates, curves, search=opts.allocation != "greedy")
        try:
            plan = self.allocator.plan(opts.targets, opts.round_to, relax=opts.relax_round_to)
            if opts.latency is not None:
                with self.progress.phase("latency search"):
                    search = LatencySearch(self.original, self.cal, opts, self.cost, self.allocator,
                                           self.architecture, self.progress)
                    search.time_layers(self.analysis)
                    plan = search.meet_with_rounding(plan)
        except TargetNotMetError as exc:
            joined = len(self.residual_joined)
            if opts.prune_coupled or not joined:
                raise
            raise TargetNotMetError(f"{exc}; {joined} residual-joined groups keep their width: --prune-residual "
                                    f"lets them shrink too") from None
        self._warn_deep_cut(plan)
        return plan

    def _warn_deep_cut(self, plan: Plan) -> None:
        """One warning where ``plan`` cuts a group more than :data:`DEEP_CUT` times, naming the
        barriers that hold the MACs pruning cannot reach when they are what forces it."""
        cut = self._deep_cut(plan)
        if cut is None or self._residual_instead(plan):
            return
        grp, factor = cut
        reach = prunability(self.analysis.g, self.analysis.groups)
        held = ""
        if reach.fraction < 0.8 and reach.barriers:
            names = ", ".join(f"{b.op_type} '{b.node}'" for b in reach.barriers[:2] if b.op_type) or reach.barriers[0].why
            held = f"; {1 - reach.fraction:.0%} of the MACs are out of pruning's reach (behind {names})"
        kept = len(self.residual_joined) if not self.opts.prune_coupled else 0
        # by default the residual-joined groups shrink instead (_residual_instead); kept at full
        # width by --no-prune-residual, they are offered
        wider = f", or --prune-residual (the {kept} residual-joined groups keep their width)" if kept else ""
        log.warning("%s cuts '%s' from %d to %d channels (%.1fx)%s: expect a large accuracy loss; a milder target "
                    "or more prunable layers (onnxprune inspect lists the barriers) keep more%s",
                    self.opts.targets.asked(), grp.name, grp.channels, plan.widths[grp.index], factor, held, wider)

    def prune(self, plan: Plan, options: PruneOptions | None = None, keep: dict[int, np.ndarray] | None = None,
              reuse_ridges: bool = True) -> Pruned:
        """A pruned copy of the model at ``plan``'s widths (``keep``: channels imposed on some groups;
        ``reuse_ridges``: the refits take the ridges an earlier pruning of this session chose)."""
        opts = options.validate() if options is not None else self.opts
        if opts.method is Method.AUTO:  # options made by a caller: the method this model resolved to
            opts = replace(opts, method=self.opts.method)
        progress = self.progress if options is None else Progress(False)
        model, groups = prune_to(self.work, self.shapes, plan.widths, opts, self.sampler, self.bn_scales, keep,
                                 progress, self.ridges if options is None and reuse_ridges else None)
        tail = None
        if opts.refine_tail and opts.reconstruct and self.sampler:
            with progress.phase("tail"):
                tail = refine_tail(model, self.work, self.cal, self.fit_idx, self.hold_idx, opts.seed,
                                   fitting_batch(self.shapes, opts.batch_size), opts.calibration_provider)
            if tail is not None:
                log.info("tail: %d layers tuned together, held-out error %.4f -> %.4f%s", tail.layers,
                         tail.error_before, tail.error_after, "" if tail.kept else " (not kept)")
        unfold_group_norms(model)
        declare_batch_as(model, self.original, self.freed)  # the working model's batch may have been freed
        return Pruned(model, groups, tail)

    def architecture(self, plan: Plan) -> onnx.ModelProto:
        """The pruned architecture ``plan`` describes, without data (weights do not matter)."""
        return self.prune(plan, replace(self.opts, method=Method.L1, reconstruct=False, progress=False)).model

    def prune_to_targets(self, plan: Plan, tries: int = 3) -> Pruned:
        """:meth:`prune`, then check the MACs reached on the pruned model itself: where a Split's
        parts kept unequal shares of a unit's channels the estimate can miss, and the MACs target
        is raised by the miss and the model pruned again (only with widths that differ)."""
        asked = targets = self.opts.targets
        for attempt in range(tries):
            with self.progress.phase("pruning"):
                pruned = self.prune(plan)
            reached = self.cost.total / max(model_macs(pruned.model, self.cal), 1)
            if reached >= asked.speedup * (1 - 1e-9) or attempt == tries - 1:
                break
            log.info("MACs reached %.3fx < %.3fx: raising the target", reached, asked.speedup)
            raised = self._raised(plan, targets, asked.speedup / reached)
            if raised is None:
                break
            plan, targets = raised
        return pruned

    def _raised(self, plan: Plan, targets: Targets, factor: float, steps: int = 40) -> tuple[Plan, Targets] | None:
        """A plan for ``targets`` raised by ``factor`` (and more, in small steps, until its widths
        differ from ``plan``'s: the same widths would give the same model); None where none does."""
        speedup = targets.speedup * factor
        for _ in range(steps):
            raised = replace(targets, speedup=speedup)
            try:
                widths = self.allocator.widths(raised, plan.round_to)
            except TargetNotMetError:
                return None
            if widths != plan.widths:
                return Plan(widths, plan.round_to), raised
            speedup *= 1.005
        return None

    def sparsify(self, pruned: Pruned) -> Pruned:
        """``pruned`` with 2:4-sparse Conv/Gemm/MatMul weights under ``--sparsity 2:4`` (unchanged
        without it), each layer refit to its dense outputs on the fit samples."""
        if not self.opts.sparsity:
            return pruned
        with self.progress.phase("sparsity"):
            shapes = tensor_shapes(pruned.model, self.cal)
            model, layers = sparsify_2_4(pruned.model, shapes, self.cal, self.fit_idx,
                                         fitting_batch(shapes, self.opts.batch_size), self.opts.calibration_provider,
                                         self.opts.seed)
        self.sparse_layers = layers
        return Pruned(model, pruned.groups, pruned.tail, float_model=pruned.float_model)

    def quantize(self, pruned: Pruned) -> Pruned:
        """``pruned`` quantized as ``--quantize`` asks (unchanged without it): ORT static QDQ
        quantization whose activation ranges are calibrated on the fit samples only, the held-out
        ones staying for :meth:`verify`. The float model is kept as ``float_model``."""
        if not self.opts.quantize:
            return pruned
        with self.progress.phase("quantize"):
            model = quantize_int8(pruned.model, self.cal, self.fit_idx, self.opts.calibrate_method,
                                  self.opts.batch_size, self.opts.provider)
        return Pruned(model, pruned.groups, pruned.tail, float_model=pruned.model)

    def verify(self, model: onnx.ModelProto) -> list[OutputFidelity]:
        """Fidelity of ``model`` to the original on the held-out samples (the fit ones if none);
        none for a data-free run, whose one all-zeros sample only fixes the shapes."""
        if self.data_free:
            return []
        with self.progress.phase("verify"):
            check_idx = self.hold_idx if len(self.hold_idx) else self.fit_idx
            return compare(self.original, model, self.cal, check_idx, fitting_batch(self.shapes, self.opts.batch_size),
                           self.opts.calibration_provider)

    def prune_verified(self, plan: Plan, tries: int = 4) -> tuple[Pruned, list[OutputFidelity], bool]:
        """Prune to ``plan`` (and quantize, under ``--quantize``); under ``--max-drop``, give width
        back (all targets relaxed together, by bisection) until the final model's held-out loss
        holds. Returns the model, its fidelity and whether the targets were met."""
        pruned = self.quantize(self.sparsify(self.prune_to_targets(plan)))
        self.analysis.g.forget_arrays()  # the analysis' weight arrays: re-read if a later stage needs them
        fidelity = self.verify(pruned.model)
        limit = self.opts.max_drop
        if limit is None or guard_loss(fidelity) <= limit:
            return pruned, fidelity, True
        log.warning("held-out loss %.4f exceeds --max-drop %g: giving width back", guard_loss(fidelity), limit)
        best, lo, hi = None, 0.0, 1.0
        for _ in range(tries):
            t = (lo + hi) / 2
            targets = relaxed_targets(self.opts.targets, self.cost, t)
            with self.progress.phase("pruning"):
                trial = self.prune(Plan(self.allocator.widths(targets, plan.round_to), plan.round_to),
                                   reuse_ridges=False)
            trial = self.quantize(self.sparsify(trial))
            fid = self.verify(trial.model)
            if guard_loss(fid) <= limit:
                best, lo = (trial, fid), t
            else:
                hi = t
        if best is None:
            raise TargetNotMetError(f"--max-drop {limit:g} cannot be met even with mild pruning (held-out loss "
                                    f"{guard_loss(fid):.4f} at {relaxed_targets(self.opts.targets, self.cost, hi).speedup:.2f}x "
                                    "fewer MACs); raise --max-drop or give more calibration data")
        return (*best, False)

    def report(self, pruned: Pruned, fidelity: list[OutputFidelity], reached: bool) -> Report:
        """The run's report: per-layer table, totals, measured latency, fidelity, phase times.
        Totals and fidelity are the final model's; under ``--quantize`` the float and quantized
        pruned models are also given side by side."""
        opts = self.opts
        quantization = None
        float_fidelity = self.verify(pruned.float_model) if pruned.float_model is not None else None
        with self.progress.phase("report"):
            feed = self.cal.take([0] * batch_size_for(self.original, opts.latency_batch)) \
                if opts.measure_latency else None
            if pruned.float_model is None:
                layers, totals = cost_table(self.original, self.work, pruned.model, self.cal, feed, opts.provider,
                                            self.shapes)
            else:  # layers, MACs and params from the float graph (its weights are plain initializers)
                layers, totals = cost_table(self.original, self.work, pruned.float_model, self.cal, None,
                                            opts.provider, self.shapes)
                # the three timed together, in alternating blocks, so that load affects them alike
                timed = measure([self.original, pruned.float_model, pruned.model], feed, opts.provider) \
                    if feed is not None else None
                ms = [t.ms for t in timed] if timed else [None] * 3
                float_bytes = totals.size_bytes[1]
                totals = replace(totals, size_bytes=(totals.size_bytes[0], model_bytes(pruned.model)),
                                 latency_ms=(ms[0], ms[2]) if timed else None,
                                 latency_busy=timed[0].busy if timed else None)
                quantization = Quantization(
                    opts.quantize, scheme(opts.provider), opts.calibrate_method, int(len(self.fit_idx)),
                    ModelForm(float_bytes, ms[1], float_fidelity), ModelForm(totals.size_bytes[1], ms[2], fidelity))
        report = Report(
            method=opts.method.value, reconstruct=opts.reconstruct, target_speedup=opts.speedup or 1.0, totals=totals,
            groups=pruned.groups, layers=layers, skipped=self.analysis.skipped, fidelity=fidelity,
            calibration={"fit": int(len(self.fit_idx)), "mixtures": self.mixtures,  # fit: blends included
                         "holdout": int(len(self.hold_idx)), "given": not self.data_free,
                         "available": int(self.cal.available),  # samples in --calib: more where a subset was drawn
                         "samples_per_image": opts.samples_per_image},
            bn_folded=self.folded, targets_met=reached, provider=opts.provider, latency_batch=opts.latency_batch,
            targets={k: v for k, v in opts.targets.__dict__.items() if v is not None}
            | ({"latency": opts.latency} if opts.latency is not None else {}),
            phases=dict(self.progress.seconds), quantization=quantization, tail=pruned.tail,
            sparsity=[asdict(layer) for layer in self.sparse_layers] if self.opts.sparsity else None)
        report.seconds = time.perf_counter() - self.start
        return report


def prune(model: onnx.ModelProto | str | os.PathLike, calib=None, *, image_options: ImageOptions | None = None,
          **options) -> PruneResult:
    """Prune ``model`` to meet its targets (default: 2× fewer MACs), keeping its outputs by reconstruction.

    ``calib`` is a path (.npy, .npz, a folder of them or of images), an array, a dict of arrays,
    an ONNX Runtime ``CalibrationDataReader`` or an iterable of feed dicts. ``options`` are the
    fields of :class:`PruneOptions` (``speedup``, ``params``, ``size_mb``, ``latency``, ``method``,
    ``reconstruct``, ``max_drop``, ``seed`` …).
    """
    try:
        opts = PruneOptions(**options)
    except TypeError as exc:
        raise OptionError(f"unknown option: {exc}") from None
    return Pruner(model, calib, opts, image_options).run()
