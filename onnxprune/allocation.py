"""Per-group widths that meet the targets: one keep ratio for all groups, or widths from
measured sensitivity curves (the least summed squared error a search finds), rounded to a
channel multiple."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from .budget import CostModel, Targets, WidthCosts, round_width, uniform_widths
from .errors import TargetNotMetError
from .graph import ChannelGroup
from .sensitivity import GRID

log = logging.getLogger(__name__)

FINER_ROUNDINGS = (8, 1)  # what a default --round-to gives way to, in order, when a target needs it
# a rounded plan that cuts this many times the MACs speedup asked for is reported: the narrowest
# groups' cuts at the rounding (a 24-channel stream 24 -> 16) can reach far past a mild target
OVERSHOOT = 1.2
# No group is cut to less than this fraction of the width one uniform keep ratio would give it:
# sensitivity curves measured on few images can make one layer look nearly free to cut, and
# a single layer cut 5-25x then breaks the whole model (the held-out check sees it, the curves do not).
MAX_SQUEEZE = 2.0
# A plan cutting some group more than this many times is warned about: the targets ask more of the
# prunable layers than a refit can make up for (most often because barriers hold much of the MACs).
DEEP_CUT = 4.0
# The width search (allocate): bisection steps on the targets' price, sweeps of the priced
# descent, plans the exchange search starts from, and exchanges it makes at most from each
PRICE_STEPS = 14
PRICED_SWEEPS = 30
SEARCH_STARTS = 3
MAX_EXCHANGES = 50


@dataclass(frozen=True)
class Plan:
    """Kept channels per candidate group (by group index), rounded to multiples of ``round_to``."""

    widths: dict[int, int]
    round_to: int


def deepest_cut(plan: Plan, candidates: list[ChannelGroup]) -> tuple[ChannelGroup, float] | None:
    """The candidate group ``plan`` cuts by the largest factor (channels / kept), and that factor."""
    cuts = [(grp, grp.channels / plan.widths[grp.index]) for grp in candidates
            if plan.widths.get(grp.index, grp.channels) < grp.channels]
    return max(cuts, key=lambda cut: cut[1], default=None)


class Allocator:
    """Widths for targets over the candidate groups: from ``curves`` (sensitivity) where given —
    searched, or by the greedy descent alone (``search=False``) — otherwise one keep ratio for all."""

    def __init__(self, cost: CostModel, candidates: list[ChannelGroup], curves: dict[int, list[float]] | None,
                 search: bool = True):
        self.cost, self.candidates, self.curves, self.search = cost, candidates, curves, search

    def widths(self, targets: Targets, round_to: int) -> dict[int, int]:
        """Widths meeting ``targets`` at ``round_to``, or :class:`TargetNotMetError`."""
        if self.curves is None:
            return uniform_widths(self.cost, self.candidates, targets, round_to)
        try:
            uniform = uniform_widths(self.cost, self.candidates, targets, round_to)
            floors = {u.index: math.ceil(uniform[u.index] / MAX_SQUEEZE) for u in self.candidates}
            return allocate(self.cost, self.candidates, self.curves, targets, round_to, floors=floors,
                            search=self.search)
        except TargetNotMetError:  # the floors (or the rounding) put the targets out of reach
            return allocate(self.cost, self.candidates, self.curves, targets, round_to, search=self.search)

    def reachable(self, targets: Targets, round_to: int, relax: bool = False, curves: bool = True) -> bool:
        """Whether some plan meets ``targets``: every group at the narrowest width a plan gives it
        (``relax``: at the finest rounding :meth:`plan` may fall back to; ``curves``: whether the
        plan will come from sensitivity curves, which stop at their grid's narrowest ratio, where
        one uniform keep ratio goes down to a channel)."""
        finest = min((round_to, *FINER_ROUNDINGS)) if relax else round_to
        ratio = GRID[0] if curves else 0.0
        narrowest = {u.index: round_width(u.channels, ratio, finest, u.granule) for u in self.candidates}
        return not targets.shortfall(self.cost, narrowest)

    def plan(self, targets: Targets, round_to: int, relax: bool = False) -> Plan:
        """A plan meeting ``targets`` at ``round_to``. Where the rounding is what puts them out of
        reach, ``relax`` takes the first finer multiple that reaches them, with a warning;
        otherwise the error says which multiple would do."""
        try:
            plan = Plan(self.widths(targets, round_to), round_to)
            reached = self.cost.total / max(self.cost.macs(plan.widths), 1.0)
            only_macs = targets.params is None and targets.size_mb is None and targets.latency is None
            if round_to > 1 and only_macs and targets.speedup > 1 and reached > targets.speedup * OVERSHOOT:
                log.warning("%s: with kept channels rounded to multiples of %d the plan cuts MACs %.2fx "
                            "(--round-to 1 keeps closer to the target)", targets.asked(), round_to, reached)
            return plan
        except TargetNotMetError as exc:
            for finer in (r for r in FINER_ROUNDINGS if r < round_to):
                try:
                    widths = self.widths(targets, finer)
                except TargetNotMetError:
                    continue
                if not relax:
                    how = f"rounded to multiples of {finer}" if finer > 1 else "not rounded"
                    raise TargetNotMetError(f"{exc}; with kept channels {how} it can be reached: "
                                            f"try --round-to {finer}") from None
                log.warning("%s cannot be reached with kept channels rounded to multiples of %d: rounding to "
                            "multiples of %d instead", targets.asked(), round_to, finer)
                return Plan(widths, finer)
            raise


def allocate(cost: CostModel, units: list[ChannelGroup], curves: dict[int, list[float]], targets: Targets,
             round_to: int = 1, ratios=GRID, floors: dict[int, int] | None = None, search: bool = True
             ) -> dict[int, int]:
    """Widths meeting ``targets`` with the least summed squared error, each unit's error its curve
    at the widest grid ratio that rounds to its width (never below its width in ``floors``): the
    best plan of :class:`_WidthSearch` (``search=False``: its greedy descent's).

    Squared, because the curves are output errors of one group pruned alone, and the output
    errors of groups pruned together add in quadrature (independent perturbations of the output:
    the relative output error of a whole plan is close to the root of the summed squares of its
    groups' errors, and far below their sum; docs/benchmarks.md). The least summed square is
    then the least expected output error of the plan."""
    return _WidthSearch(cost, units, curves, targets, round_to, ratios, floors or {}).best(search)


class _WidthSearch:
    """Plans as one option index per unit (0: full width; each next option fewer channels).

    The greedy descent — from full width, the step down that costs the least error per unit of
    shortfall removed, then widening while the targets hold — is optimal only where the curves
    are convex in the cost; rounding merges grid steps and a MACs cost couples neighbouring
    groups, so it can stop far from the best plan. Two more searches start where it cannot look:
    the plans that minimise error + price × cost (coordinate descent, the price bisected to the
    targets), made to meet them by the same descent; and exchanges from the best plans so far —
    one unit widened, the others cut again by the descent — while the summed error falls. The
    plan with the least error wins; the greedy one is among those compared.
    """

    def __init__(self, cost: CostModel, units: list[ChannelGroup], curves: dict[int, list[float]],
                 targets: Targets, round_to: int, ratios, floors: dict[int, int]):
        self.cost, self.units, self.targets = cost, units, targets
        options = [self._options(u, curves.get(u.index), round_to, ratios, floors.get(u.index, 0)) for u in units]
        self.count = np.array([len(o) for o in options])
        deepest = int(self.count.max(initial=1))
        # padded with each unit's narrowest option, so a table lookup never runs off the end
        self.width = np.array([[o[min(k, len(o) - 1)][0] for k in range(deepest)] for o in options],
                              np.float64).reshape(len(units), deepest)
        # each option's curve value squared: the objective is the summed square (see allocate)
        self.error = np.square(np.array([[o[min(k, len(o) - 1)][1] for k in range(deepest)] for o in options],
                                        np.float64).reshape(len(units), deepest))
        self.curved = np.array([curves.get(u.index) is not None for u in units], bool)
        self.costs = WidthCosts(cost, [u.index for u in units])
        self.rows = np.arange(len(units))

    @staticmethod
    def _options(u: ChannelGroup, curve: list[float] | None, round_to: int, ratios, floor: int
                 ) -> list[tuple[int, float]]:
        """(width, error) of each distinct rounded width down to the floor, widest first (full
        width always among them: a floor is never above it)."""
        options: dict[int, float] = {}
        for j in range(len(ratios) - 1, -1, -1):
            width = round_width(u.channels, ratios[j], round_to, u.granule)
            if width >= floor and width not in options:
                options[width] = curve[j] if curve else 0.0
        return list(options.items())

    def widths(self, plan: np.ndarray) -> dict[int, int]:
        return {u.index: int(w) for u, w in zip(self.units, self.width[self.rows, plan])}

    def summed_error(self, plan: np.ndarray) -> float:
        return float(self.error[self.rows, plan].sum())

    def _shortfalls(self, plans: np.ndarray) -> np.ndarray:
        return self.targets.shortfalls(self.costs, self.width[self.rows, plans])

    def _load(self, plans: np.ndarray) -> np.ndarray:
        return sum(self.targets.usage(self.cost, self.costs, self.width[self.rows, plans]))

    def descend(self, plan: np.ndarray, held: int = -1) -> np.ndarray:
        """``plan`` cut greedily until the targets hold (``held``: a unit left as it is), then
        widened while they still do; where no cut is left, the plan as far as it got."""
        plan, short = plan.copy(), self._shortfalls(plan[None])[0]
        while short > 0:
            movable = np.flatnonzero((plan + 1 < self.count) & (self.rows != held))
            trials = np.repeat(plan[None], len(movable), 0)
            trials[np.arange(len(movable)), movable] += 1
            gained = short - self._shortfalls(trials)
            lost = np.where(self.curved[movable],
                            self.error[movable, plan[movable] + 1] - self.error[movable, plan[movable]], 1.0)
            score = np.where(gained > 0, lost / np.maximum(gained, 1e-300), np.inf)
            if not movable.size or not np.isfinite(score.min()):
                return plan
            best = int(np.argmin(score))
            plan, short = trials[best], short - gained[best]
        while True:  # the last cut may overshoot: widen where it saves the most error
            wider = np.flatnonzero(plan > 0)
            trials = np.repeat(plan[None], len(wider), 0)
            trials[np.arange(len(wider)), wider] -= 1
            fits = self._shortfalls(trials) == 0
            if not fits.any():
                return plan
            saved = self.error[wider, plan[wider]] - self.error[wider, plan[wider] - 1]
            plan = trials[int(np.argmax(np.where(fits, saved, -np.inf)))]

    def priced(self, price: float) -> np.ndarray:
        """The plan minimising summed error + ``price`` × the targets' summed usage, by
        coordinate descent from full width."""
        plan = np.zeros(len(self.units), int)
        for _ in range(PRICED_SWEEPS):
            changed = False
            for i in range(len(self.units)):
                trials = np.repeat(plan[None], self.count[i], 0)
                trials[:, i] = np.arange(self.count[i])
                best = int(np.argmin(self.error[i, :self.count[i]] + price * self._load(trials)))
                changed |= best != plan[i]
                plan[i] = best
            if not changed:
                break
        return plan

    def priced_plans(self) -> list[np.ndarray]:
        """The distinct priced plans met on the way to the lowest price whose plan meets the targets."""
        seen: dict[bytes, np.ndarray] = {}

        def meets(price: float) -> bool:
            plan = self.priced(price)
            seen.setdefault(plan.tobytes(), plan)
            return not self._shortfalls(plan[None])[0]

        scale = max(float(self.error.max()), 1e-12)  # prices in units of the errors: any curve scale
        price = 1e-4 * scale
        while not meets(price):
            price *= 2
            if price > 1e6 * scale:
                return list(seen.values())
        low, high = price / 2, price
        for _ in range(PRICE_STEPS):
            mid = math.sqrt(low * high)
            low, high = (low, mid) if meets(mid) else (mid, high)
        return list(seen.values())

    def exchange(self, plan: np.ndarray) -> np.ndarray:
        """``plan`` improved by exchanges (one unit widened to any wider option, the rest cut
        again by :meth:`descend`) while the summed error falls."""
        for _ in range(MAX_EXCHANGES):
            best, best_error = None, self.summed_error(plan)
            for i in range(len(self.units)):
                for k in range(plan[i]):
                    trial = plan.copy()
                    trial[i] = k
                    trial = self.descend(trial, held=i)
                    error = self.summed_error(trial)
                    if error < best_error - 1e-12 and not self._shortfalls(trial[None])[0]:
                        best, best_error = trial, error
            if best is None:
                return plan
            plan = best
        return plan

    def best(self, search: bool = True) -> dict[int, int]:
        """The plan with the least summed error the searches find (``search=False``: the greedy
        descent's; :class:`TargetNotMetError` where not even that one meets the targets)."""
        greedy = self.descend(np.zeros(len(self.units), int))
        if self._shortfalls(greedy[None])[0]:
            raise TargetNotMetError(f"{self.targets.asked()} cannot be reached with per-layer widths "
                                    f"(reached {self.targets.describe(self.cost, self.widths(greedy))}); "
                                    "lower the target")
        if not search:
            return self.widths(greedy)
        starts = {greedy.tobytes(): greedy}
        for plan in self.priced_plans():
            plan = self.descend(plan)
            if not self._shortfalls(plan[None])[0]:
                starts.setdefault(plan.tobytes(), plan)
        starts = sorted(starts.values(), key=self.summed_error)[:SEARCH_STARTS]
        return self.widths(min((self.exchange(plan) for plan in starts), key=self.summed_error))
