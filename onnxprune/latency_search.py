"""``--latency``: search the widths whose *measured* latency speedup reaches the goal.

Widths are allocated on per-layer latency predicted from timings of each prunable layer alone
(:mod:`onnxprune.latency_cost`), or on MACs where those cannot predict the goal; each trial
architecture is measured against the original, and the prediction raised or bisected until the
measurement holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx

from .activations import batch_size_for
from .allocation import FINER_ROUNDINGS, Allocator, Plan
from .budget import CostModel, Targets
from .calib import Calibration
from .candidates import Analysis
from .errors import TargetNotMetError
from .graphview import node_name
from .latency import busy_note, is_busy, latency_ms, measure, speedup
from .latency_cost import layer_latency
from .options import PruneOptions
from .progress import QUIET, Progress

log = logging.getLogger(__name__)

LATENCY_MARGIN = 1.05  # the search asks a little more than --latency: timings of one run vary

# the architecture (weights do not matter) that a plan describes
Architecture = Callable[[Plan], onnx.ModelProto]


class LatencySearch:
    """Finds the least-pruned plan whose measured latency speedup reaches ``opts.latency``."""

    def __init__(self, original: onnx.ModelProto, cal: Calibration, opts: PruneOptions, cost: CostModel,
                 allocator: Allocator, architecture: Architecture, progress: Progress = QUIET):
        self.original, self.cal, self.opts, self.cost = original, cal, opts, cost
        self.allocator, self.architecture, self.progress = allocator, architecture, progress
        self.feed = cal.take([0] * batch_size_for(original, opts.latency_batch))
        self.warned_busy = False

    def time_layers(self, analysis: Analysis) -> None:
        """Time every prunable layer alone, so that widths can be allocated on predicted latency."""
        tensors = {t for grp in analysis.candidates for t in grp.tensors}
        prunable = {node_name(n): (n.input[0] in tensors, n.output[0] in tensors)
                    for n in analysis.g.graph.node if n.input}
        whole = latency_ms([self.original], self.feed, self.opts.provider)[0]
        self.cost.latency = layer_latency(analysis.g, self.cost, prunable, next(iter(self.feed.values())).shape[0],
                                          self.opts.provider, whole)

    def measured_speedup(self, plan: Plan) -> float:
        """Measured latency speedup of the architecture ``plan`` describes (a warning, the first
        time one is measured on a busy machine: the search's choice then rests on it)."""
        before, after = measure([self.original, self.architecture(plan)], self.feed, self.opts.provider)
        if is_busy(before.busy) and not self.warned_busy:
            self.warned_busy = True
            log.warning("the latency search measured a trial %.2fx: %s; its choice of widths rests on such "
                        "measurements", speedup(before, after), busy_note(before.busy))
        return speedup(before, after)

    def _targets(self, knob: float, timed: bool) -> Targets:
        """The targets for one step of the search: the user's, plus ``knob`` as a predicted-latency
        speedup (per-layer timings) or, without those, as a MACs speedup."""
        base = self.opts.targets
        if timed:
            return Targets(base.speedup, base.params, base.size_mb, latency=knob)
        return Targets(max(base.speedup, knob), base.params, base.size_mb)

    def _fewer_macs(self, widths: dict[int, int]) -> float:
        return self.cost.total / max(self.cost.macs(widths), 1e-9)

    def meet(self, plan: Plan, tries: int = 10) -> Plan:
        """The least-pruned plan (at ``plan.round_to``) whose measured latency speedup reaches
        ``--latency``: raise the predicted target until the measurement holds, then bisect between
        the last miss and the first hit. Where no architecture clears the safety margin, the
        fastest one that reached ``--latency`` itself, twice, is taken (on tiny models, per-run
        overhead caps the speedup near the goal)."""
        goal, round_to = self.opts.latency, plan.round_to
        timed = self.cost.latency is not None
        miss, hit, measured, trial = 1.0, None, 0.0, plan
        near: tuple[float, Plan] | None = None  # the fastest trial that measured >= goal
        knob = goal
        for _ in self.progress.bar(range(tries), "latency search", "try"):
            try:
                trial = Plan(self.allocator.widths(self._targets(knob, timed), round_to), round_to)
            except TargetNotMetError:
                if hit is None and not timed and knob / miss > 1.02:
                    knob = (knob + miss) / 2  # past the most pruning the widths allow: step back
                    continue
                if hit is not None or not timed:
                    break
                log.info("the per-layer timings predict less than %.2fx: searching on MACs instead", knob)
                timed, knob = False, goal
                continue
            measured = self.measured_speedup(trial)
            if measured >= goal * LATENCY_MARGIN:  # a hit is measured twice: one lucky run must not decide
                measured = min(measured, self.measured_speedup(trial))
            log.info("target %.2fx (MACs %.2fx fewer): measured latency speedup %.2fx", knob,
                     self._fewer_macs(trial.widths), measured)
            if measured >= goal * LATENCY_MARGIN:
                hit = (knob, trial)
            else:
                miss = knob
                if measured >= goal and (near is None or measured > near[0]):
                    near = (measured, trial)
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
                                    f"architecture tried ({self._fewer_macs(trial.widths):.2f}x fewer MACs) measured "
                                    f"{measured:.2f}x at batch {self.opts.latency_batch}; small models are dominated "
                                    "by per-run overhead, try a larger --latency-batch"
                                    + (f" (or a smaller --round-to than {round_to}, which limits how far narrow "
                                       "layers can be cut)" if round_to > 1 else ""))
        return hit[1]

    def meet_with_rounding(self, plan: Plan) -> Plan:
        """:meth:`meet`; where the rounding is the CLI's default rather than the user's
        (``relax_round_to``), finer multiples (8, then none) are tried before giving up: on small
        models at batch 1, 16-wide layers cannot be cut far enough under multiples of 16."""
        finer = [r for r in FINER_ROUNDINGS if r < plan.round_to] if self.opts.relax_round_to else []
        for round_to in finer:
            try:
                return self.meet(plan)
            except TargetNotMetError as exc:
                log.warning("%s; trying kept channels rounded to multiples of %d", exc, round_to)
            plan = self.allocator.plan(self.opts.targets, round_to)
        return self.meet(plan)
