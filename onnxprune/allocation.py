"""Per-group widths that meet the targets: one keep ratio for all groups, or widths from
measured sensitivity curves, rounded to a channel multiple."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from .budget import CostModel, Targets, round_width, uniform_widths
from .errors import TargetNotMetError
from .graph import ChannelGroup
from .sensitivity import GRID, allocate

log = logging.getLogger(__name__)

FINER_ROUNDINGS = (8, 1)  # what a default --round-to gives way to, in order, when a target needs it
# No group is cut to less than this fraction of the width one uniform keep ratio would give it:
# sensitivity curves measured on few images can make one layer look nearly free to cut, and
# a single layer cut 5-25x then breaks the whole model (the held-out check sees it, the curves do not).
MAX_SQUEEZE = 2.0
# A plan cutting some group more than this many times is warned about: the targets ask more of the
# prunable layers than a refit can make up for (most often because barriers hold much of the MACs).
DEEP_CUT = 4.0


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
    """Widths for targets over the candidate groups: from ``curves`` (sensitivity) where given,
    otherwise one keep ratio for all."""

    def __init__(self, cost: CostModel, candidates: list[ChannelGroup], curves: dict[int, list[float]] | None):
        self.cost, self.candidates, self.curves = cost, candidates, curves

    def widths(self, targets: Targets, round_to: int) -> dict[int, int]:
        """Widths meeting ``targets`` at ``round_to``, or :class:`TargetNotMetError`."""
        if self.curves is None:
            return uniform_widths(self.cost, self.candidates, targets, round_to)
        try:
            uniform = uniform_widths(self.cost, self.candidates, targets, round_to)
            floors = {u.index: math.ceil(uniform[u.index] / MAX_SQUEEZE) for u in self.candidates}
            return allocate(self.cost, self.candidates, self.curves, targets, round_to, floors=floors)
        except TargetNotMetError:  # the floors (or the rounding) put the targets out of reach
            return allocate(self.cost, self.candidates, self.curves, targets, round_to)

    def reachable(self, targets: Targets, round_to: int, relax: bool = False, curves: bool = True) -> bool:
        """Whether some plan meets ``targets``: every group at the narrowest width a plan gives it
        (``relax``: at the finest rounding :meth:`plan` may fall back to; ``curves``: whether the
        plan will come from sensitivity curves, which stop at their grid's narrowest ratio, where
        one uniform keep ratio goes down to a channel)."""
        finest = min((round_to, *FINER_ROUNDINGS)) if relax else round_to
        ratio = GRID[0] if curves else 0.0
        narrowest = {u.index: round_width(u.channels, ratio, finest, u.segments) for u in self.candidates}
        return not targets.shortfall(self.cost, narrowest)

    def plan(self, targets: Targets, round_to: int, relax: bool = False) -> Plan:
        """A plan meeting ``targets`` at ``round_to``. Where the rounding is what puts them out of
        reach, ``relax`` takes the first finer multiple that reaches them, with a warning;
        otherwise the error says which multiple would do."""
        try:
            return Plan(self.widths(targets, round_to), round_to)
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
