"""Pruning groups one at a time, front to back: sample, select, rewrite, refit.

:func:`prune_to` cuts a copy of the analysed model to given widths. Each step's regression
problems are sampled on the model pruned so far, from carried activations
(:class:`~onnxprune.frontier.Frontier`), so the whole pruning costs about one forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from dataclasses import dataclass

import numpy as np
import onnx

from .activations import DEFAULT_BATCH
from .candidates import analyse, first_edited, node_key, positions, pruning_steps, sampleable
from .errors import OptionError
from .frontier import Frontier
from .graph import ChannelGroup, Consumer, tied_layers
from .graphview import GraphView, node_name
from .liveness import read_problem
from .ops import Activation, LinearHandler, activation_chain, handler_for
from .options import PruneOptions
from .progress import QUIET, Progress
from .reconstruct import ESTIMATE_RIDGE, refit
from .refine import MAX_VALUES, WHOLE_MAX_VALUES, Middle, refine_pair
from .report import GroupResult
from .rewrite import finalize, prune_group
from .sampling import Runs, Sampler, reads_grouped_conv
from .select import (OBS_MAX_COLUMNS, Method, RefitProblem, add_unit_contribution, expand_channels, l1_select, lasso_select,
                     normalized_contribution, obs_order, per_segment, random_select, slim_select, thinet_select)
from .stats import pooled

log = logging.getLogger(__name__)


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


def _contribution_problem(sites: list["Site"], g: GraphView, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrix and correlations of the unit's channel contributions, summed over every
    consumer of every site (each normalised by its target energy so all weigh alike).

    Where a consumer also reads other groups' channels (after a Concat), those stay fixed: the
    target of the unit's channels is the output minus the others' contributions.
    """
    gram, corr = np.zeros((channels, channels)), np.zeros(channels)
    for site in sites:
        for c, st in zip(site.sampled, site.stats):
            gr, co = normalized_contribution(*read_problem(c.node, g, st), site.width)
            add_unit_contribution(gram, corr, gr, co, site.unit_channels, site.unit_positions, site.other_positions)
    return gram, corr


def _select(grp: ChannelGroup, keep_n: int, opts: PruneOptions, g: GraphView, sites: list["Site"], rng,
            bn_scales: dict[str, np.ndarray], orders: dict[tuple, np.ndarray] | None = None,
            lasso_keeps: dict[int, np.ndarray] | None = None) -> np.ndarray:
    method = opts.method
    assert method is not Method.AUTO, "Method.AUTO is resolved per model by the Pruner"
    scales = _bn_scales(grp, g, bn_scales) if method is Method.SLIM else None
    if method is Method.SLIM and scales is None:
        if opts.slim_fallback == "error":
            raise OptionError(f"--method slim needs BatchNorm γ, but group '{grp.name}' has no BatchNorm "
                              "(folded away by the exporter?); pass --slim-fallback l1 or use --method l1")
        method = Method.L1
    # what is chosen: channels, or whole conv groups (their channels' scores summed)
    size = grp.conv_group
    items = grp.channels // size
    summed = (lambda v: v.reshape(items, size).sum(axis=1)) if size > 1 else (lambda v: v)  # noqa: E731
    if method is Method.SLIM:
        scales = summed(np.abs(scales))
        choose = lambda run, n: slim_select(scales[run], n)  # noqa: E731
    elif method is Method.RANDOM:
        choose = lambda run, n: random_select(len(run), n, rng)  # noqa: E731
    elif method is Method.L1:
        norms = summed(_filter_norms(grp, g))
        choose = lambda run, n: l1_select(norms[run], n)  # noqa: E731
    elif method is Method.OBS and _obs_fits(sites, g, size):
        choose = lambda run, n: _obs_keep(sites, g, items, size, run, n, orders)  # noqa: E731
    elif method is not Method.THINET and grp.segments == 1 and lasso_keeps and keep_n in lasso_keeps:
        problem: list = []  # built only where a site would be left empty, once

        def lasso_choose(run: np.ndarray, n: int) -> np.ndarray:
            if not problem:
                problem.extend(_contribution_problem(sites, g, grp.channels))
            gram, corr = problem
            return lasso_select(gram[np.ix_(run, run)], corr[run], n)

        return _no_empty_site(lasso_keeps[keep_n], sites, lasso_choose)  # the same path was followed already
    else:
        gram, corr = _contribution_problem(sites, g, grp.channels)
        if size > 1:
            gram, corr = gram.reshape(items, size, items, size).sum(axis=(1, 3)), summed(corr)
        if method is Method.THINET:
            choose = lambda run, n: thinet_select(gram[np.ix_(run, run)], n)  # noqa: E731
        else:
            choose = lambda run, n: lasso_select(gram[np.ix_(run, run)], corr[run], n)  # noqa: E731
    if size > 1:  # whole conv groups, as many as come nearest keep_n channels
        return expand_channels(per_segment(choose, items, 1, max(1, int(round(keep_n / size)))), size)
    keep = per_segment(choose, grp.channels, grp.segments, keep_n)  # equal per group of a grouped Conv
    return _no_empty_site(keep, sites, choose) if grp.segments == 1 else keep


def _no_empty_site(keep: np.ndarray, sites: list["Site"], choose) -> np.ndarray:
    """``keep`` where every site that holds only the unit's channels keeps one at least — a Split
    part or a Concat input with no channels left is no tensor a layer can read or write (Res2Net's
    parts) — each such site's best channel taking the place of the least of the kept channels
    that are not the last of their site. ``choose(run, n)``: positions within ``run`` of its
    ``n`` best channels."""
    alone = [np.sort(site.unit_channels) for site in sites
             if len(site.unit_channels) and not len(site.other_positions)]
    kept = set(keep.tolist())
    empty = [run for run in alone if not kept.intersection(run.tolist())]
    if not empty:
        return keep
    for run in empty:
        kept.add(int(run[choose(run, 1)[0]]))
        counts = [len(kept.intersection(r.tolist())) for r in alone]
        spare = np.array(sorted(k for k in kept if all(c > 1 for r, c in zip(alone, counts) if k in r)),
                         dtype=np.int64)
        if len(spare) > 1:
            kept.discard(int(np.setdiff1d(spare, spare[choose(spare, len(spare) - 1)])[0]))
        elif len(spare):
            kept.discard(int(spare[0]))
    return np.array(sorted(kept), dtype=np.int64)


def _obs_fits(sites: list["Site"], g: GraphView, size: int = 1) -> bool:
    """Whether :func:`_obs_keep` can choose items of ``size`` channels for these sites: each
    consumer's input narrow enough for its inverse Gram, and each item whole columns of it."""
    return any(site.sampled for site in sites) and all(
        handler_for(c.node).weight_matrix(c.node, g).shape[1] < OBS_MAX_COLUMNS  # type: ignore[attr-defined]
        for site in sites for c in site.sampled) and all(
        site.width % size == 0 and _aligned(site.unit_positions, size) and _aligned(site.unit_channels, size)
        for site in sites)


def _aligned(channels: np.ndarray, size: int) -> bool:
    """Whether ``channels`` are whole aligned runs of ``size`` (any list, for ``size`` 1)."""
    if size == 1:
        return True
    runs = channels.reshape(-1, size) if len(channels) % size == 0 else None
    return runs is not None and not (runs[:, 0] % size).any() and bool((runs == runs[:, :1] + np.arange(size)).all())


def _obs_keep(sites: list["Site"], g: GraphView, items: int, size: int, run: np.ndarray, n: int,
              orders: dict[tuple, np.ndarray] | None = None) -> np.ndarray:
    """Positions within ``run`` of the ``n`` items (of ``items``: channels, or whole conv groups of
    ``size`` channels, each one block of columns of every consumer) :func:`obs_order` keeps.
    ``orders``: removal orders found before for the same problems, by ``run``; the greedy order
    is the same however far it goes, so a shorter one is a prefix of a longer one."""
    count = len(run) - n
    known = orders.get(tuple(run)) if orders is not None else None
    if known is not None and len(known) >= count:
        return np.flatnonzero(~np.isin(run, known[:count]))
    problems = []
    for site in sites:
        for c, st in zip(site.sampled, site.stats):
            mine = site.unit_positions[::size] // size
            prob = RefitProblem(*read_problem(c.node, g, st), site.width // size, ESTIMATE_RIDGE,
                                removals=len(run) - n, removable=mine)
            problems.append((prob, site.unit_channels[::size] // size, mine))
    removed = obs_order(problems, items, run, count=count)
    if orders is not None:
        orders[tuple(run)] = removed
    return np.flatnonzero(~np.isin(run, removed))


def _given_keep(grp: ChannelGroup, keep_n: int, channels) -> np.ndarray:
    """Channels a caller chose to keep for ``grp`` (see :func:`prune_to`), sorted and checked."""
    keep = np.unique(np.asarray(channels, dtype=np.int64))
    if len(keep) != len(channels) or len(keep) != keep_n or keep[0] < 0 or keep[-1] >= grp.channels:
        raise ValueError(f"{grp.name}: keep needs {keep_n} distinct channels of {grp.channels}, got {list(channels)}")
    return keep


class KnownStats:
    """A sampler whose statistics for some consumers (by node), and the values of some tensors
    (by name), were measured already, on the model as it is now; any other request goes to
    ``sampler``."""

    def __init__(self, sampler: Sampler, known: dict[int, object], values: dict[str, np.ndarray] | None = None):
        self.sampler, self.known, self.known_values = sampler, known, values or {}

    def stats(self, g: GraphView, consumers: list[Consumer], target_columns=None, runs: Runs | None = None) -> list:
        if all(id(c.node) in self.known for c in consumers):
            return [self.known[id(c.node)] for c in consumers]
        return self.sampler.stats(g, consumers, target_columns)

    def values(self, g: GraphView, names: list[str], runs: Runs | None = None) -> dict[str, np.ndarray]:
        if all(name in self.known_values for name in names):
            return {name: self.known_values[name] for name in names}
        return self.sampler.values(g, names, runs)

    def __getattr__(self, name: str):
        return getattr(self.sampler, name)


@dataclass
class Site:
    """One group holding a unit's channels, as it is just before the unit is pruned."""

    group: ChannelGroup
    width: int  # channels the group has now
    unit_positions: np.ndarray  # where the unit's channels sit among them
    unit_channels: np.ndarray  # which of the unit's channels sit there
    other_positions: np.ndarray
    sampled: list[Consumer]  # consumers whose regression problems are sampled and refit
    stats: list | None = None


def channel_statistics(grp: ChannelGroup, g: GraphView) -> list[Consumer]:
    """The group's consumers that sum its channels without weights (a global response norm's),
    which :meth:`GroupPruner.prune_unit` rescales after a cut."""
    return [c for c in grp.consumers if handler_for(c.node).channel_statistic(c.node, g)]


def _rescale_statistic(c: Consumer, before: np.ndarray, keep: np.ndarray, g: GraphView) -> None:
    """Rescale a sum over channels (a channel statistic ``c``) that now sums only the channels
    ``keep`` of those it summed (``before``: its input then, one value per channel and image) by
    the least-squares factor that brings it back to the sum over all of them on those images."""
    per_image = before.reshape(len(before), -1).astype(np.float64)
    whole, kept = per_image.sum(axis=1), per_image[:, keep].sum(axis=1)
    energy = float(kept @ kept)
    if energy > 0 and np.isfinite(energy):
        handler_for(c.node).rescale(c.node, float(whole @ kept) / energy, g)


def unit_sites(unit: ChannelGroup, current: dict[int, np.ndarray], g: GraphView) -> list[Site]:
    """Where ``unit``'s channels sit now: each group holding them (its own, and those after a
    Concat or Split), with ``current`` the atoms each group holds (group index -> atoms)."""
    sites = []
    channel_of = {int(a): i for i, a in enumerate(unit.atoms)}
    for grp in unit.sites:
        now = current[grp.index]
        mine = np.isin(now, unit.atoms)
        unit_channels = np.array([channel_of[int(a)] for a in now[mine]], dtype=np.int64)
        sites.append(Site(grp, len(now), np.flatnonzero(mine), unit_channels, np.flatnonzero(~mine),
                          [c for c in grp.consumers if sampleable(c, g)]))
    return sites


def _refit_keys(unit: ChannelGroup, g: GraphView) -> set[tuple]:
    """The layers :meth:`GroupPruner.prune_unit` refits for ``unit`` (by node key)."""
    return {node_key(c.node) for grp in unit.sites for c in grp.consumers if sampleable(c, g)}


IDENTITY: Activation = (lambda z: z, np.ones_like)
_POOLS = ("GlobalAveragePool", "ReduceMean")  # what may read a branch tensor to compute its gate


def _is_channel_gate(g: GraphView, name: str, other: str) -> bool:
    """Whether ``name`` scales ``other`` per sample and channel only (squeeze-excite's gate:
    ``[N, C, 1, 1]`` against ``[N, C, H, W]``)."""
    gate, full = g.shape(name), g.shape(other)
    return (name != other and not g.is_const(name) and gate is not None and full is not None and
            len(gate) == len(full) == 4 and gate[1] == full[1] and gate[2:] == (1, 1) and full[2:] != (1, 1))


@dataclass
class Branch:
    """A residual branch :mod:`onnxprune.refine` tunes: ``producer`` → ``act`` → ``consumer``,
    or, in an inverted residual block, ``producer`` → ``act`` → depthwise ``middle`` (or, in a
    ResNeXt / RegNet block, a grouped conv losing whole groups) →
    ``middle_act`` (→ × ``gate``, held fixed) → ``consumer``; then ``join_act`` (where the
    consumer reaches the residual Add through an activation) and ``out_act`` after the Add."""

    producer: onnx.NodeProto
    act: Activation
    consumer: Consumer
    out_act: Activation | None
    middle: onnx.NodeProto | None = None
    middle_act: Activation | None = None
    gate: str | None = None
    join_act: Activation | None = None


class GroupPruner:
    """Prunes units (groups owning channels) one at a time: select, rewrite, refit."""

    def __init__(self, g: GraphView, groups: list[ChannelGroup], opts: PruneOptions, sampler: Sampler | None,
                 bn_scales: dict[str, np.ndarray], keep: dict[int, np.ndarray] | None = None,
                 ridge: float | None = None, ridges: dict[tuple[str, int], float] | None = None,
                 removal_orders: dict[tuple, np.ndarray] | None = None,
                 lasso_keeps: dict[int, np.ndarray] | None = None):
        self.g, self.opts, self.sampler, self.bn_scales = g, opts, sampler, bn_scales
        # OBS removal orders of a unit's problems as they are now (probes of one unit at several
        # widths share them; the model must not change between its prunings)
        self.removal_orders = removal_orders
        # LASSO selections on a unit's problems as they are now, by channels kept (its sensitivity
        # curve followed the path already): taken instead of following it again
        self.lasso_keeps = lasso_keeps
        self.ridge = ridge  # the refits' ridge; None: chosen per layer by cross-validation
        # ridges cross-validation chose per layer problem (output name, unknowns) in an earlier
        # pruning of the same model at nearly the same widths: used as they are, filled where missing.
        # The number of unknowns is in the key because a layer refit by two units, or at other
        # widths, is another problem whose ridge may differ.
        self.ridges = {} if ridges is None else ridges
        self.keep = keep or {}  # unit index -> channels to keep, overriding the selection method
        self.rng = np.random.default_rng(opts.seed)
        self.current = {grp.index: grp.atoms.copy() for grp in groups}  # atoms each group holds now
        # unit index -> layers whose refit waits for a later unit (defer_shared_refits); empty: none waits
        self.deferred: dict[int, set[tuple]] = {}
        self.kept_outputs: dict[str, np.ndarray] = {}  # producer output -> original channels still there
        # one array for every branch's samples (refined one at a time): fresh pages of tens of MB per
        # branch cost more time than filling them
        self.pair_buffer = np.empty(max(MAX_VALUES, WHOLE_MAX_VALUES), np.float32) if opts.refine else None
        # layers sharing one weight (a head at every pyramid level): each of them -> all of them, the
        # first first, whose constants the others read (one refit on all their samples; shared again
        # after a cut)
        self.ties = {node_key(n): nodes for nodes in tied_layers(g).values() for n in nodes}

    def defer_shared_refits(self, steps: list[ChannelGroup | Consumer], topo: dict[str, int]) -> None:
        """Refit a layer that several units feed (after a Concat: a DenseNet layer reads every
        earlier layer of its block, a CSP block's last conv both halves) once, when the last of
        them is pruned, instead of after each: the earlier ones only drop its columns (their
        selections read its statistics all the same). A refit is deferred only past steps that
        sample nothing after that layer, so no statistics ever see its output unrefit.
        ``steps``: :func:`pruning_steps`, in order; ``topo``: node positions."""
        refits = [_refit_keys(step, self.g) if isinstance(step, ChannelGroup) else set() for step in steps]
        reach = [max((topo[key] for key in keys), default=-1) if isinstance(step, ChannelGroup)
                 else topo[node_key(step.node)] for step, keys in zip(steps, refits)]
        self.deferred = {}
        for a, step in enumerate(steps):
            for key in refits[a]:
                b = next((j for j in range(a + 1, len(steps)) if key in refits[j]), None)
                if b is not None and max(reach[a + 1:b], default=-1) < topo[key]:
                    self.deferred.setdefault(step.index, set()).add(key)

    def prune_unit(self, unit: ChannelGroup, keep_n: int, runs: Runs | None = None, tidy: bool = True) -> GroupResult:
        g, opts = self.g, self.opts
        sites = unit_sites(unit, self.current, g)
        later = self.deferred.get(unit.index, set())  # layers a unit still to be pruned refits
        # sums over the channels without weights (a global response norm's), by site
        statistics = [channel_statistics(site.group, g) for site in sites]
        if self.sampler:
            for site in sites:
                site.stats = self.sampler.stats(g, site.sampled, self.kept_outputs, runs) if site.sampled else []
            # their inputs before the cut: what the sums over the channels kept are rescaled to
            summed = self.sampler.values(g, [c.tensor for cs in statistics for c in cs], runs) \
                if any(statistics) else {}
        if unit.index in self.keep:
            keep = _given_keep(unit, keep_n, self.keep[unit.index])
        else:
            keep = _select(unit, keep_n, opts, g, sites, self.rng, self.bn_scales, self.removal_orders,
                           self.lasso_keeps)
        removed = np.setdiff1d(unit.atoms, unit.atoms[keep])
        res = GroupResult(unit.name, unit.channels, len(keep),
                          [node_name(c.node) for c in unit.all_consumers])
        befores, afters = [], []
        # every site is cut before any refit: a layer may read one site and write another (the
        # conv summed onto a Concat or Pad of the unit's channels)
        site_keeps, ks = [], []
        for site in sites:
            now = self.current[site.group.index]
            site_keeps.append(np.flatnonzero(~np.isin(now, removed)))
            ks.append([handler_for(c.node).weight_matrix(c.node, g).shape[1] // site.width  # type: ignore[attr-defined]
                       for c in site.sampled] if opts.reconstruct and site.stats else [])
        written = {node_key(p): site_keep for site, site_keep in zip(sites, site_keeps) for p in site.group.producers}
        for site, site_keep, site_statistics in zip(sites, site_keeps, statistics):
            prune_group(g, site.group, site_keep, site.width)
            self.current[site.group.index] = self.current[site.group.index][site_keep]
            for node in site.group.producers:  # the original channels each layer still writes
                self.kept_outputs[node.output[0]] = np.flatnonzero(
                    np.isin(site.group.atoms, self.current[site.group.index]))
            self._share_tied(site.group.producers + [c.node for c in site.group.consumers])
            for c in site_statistics if self.sampler and opts.reconstruct else []:
                _rescale_statistic(c, summed[c.tensor], site_keep, g)
        for site, site_keep, site_ks in zip(sites, site_keeps, ks):
            tied: dict[tuple, list] = {}  # the first of some tied layers -> each one's (consumer, problem)
            for c, st, k in zip(site.sampled, site.stats or [], site_ks):
                if node_key(c.node) in later:
                    continue
                if node_key(c.node) in written:  # it also writes a site (a block inside a residual join)
                    cols = handler_for(c.node).output_columns(c.node, g, written[node_key(c.node)])  # type: ignore[attr-defined]
                    st = st.with_outputs(cols)
                if node_key(c.node) in self.ties:
                    tied.setdefault(node_key(self.ties[node_key(c.node)][0]), []).append((c, st, k))
                    continue
                fit = self._refit(c, st, expand_channels(site_keep, k), res)
                befores.append(fit.error_before)
                afters.append(fit.error_after)
            for members in tied.values():  # one refit on every level's samples, one weight again
                c, _, k = members[0]
                fit = self._refit(c, pooled([st for _, st, _ in members]), expand_channels(site_keep, k), res)
                for other, _, _ in members[1:]:
                    g.share_consts(other.node, c.node, equal_only=False)
                befores.append(fit.error_before)
                afters.append(fit.error_after)
        tied_unit = any(node_key(n) in self.ties for site in sites
                        for n in site.group.producers + [c.node for c in site.group.consumers])
        if opts.refine and opts.reconstruct and self.sampler and befores and not later and not tied_unit:
            res.refined_error = self._refine(unit, sites, runs)
        if befores:
            res.error_before_refit, res.error_after_refit = float(np.mean(befores)), float(np.mean(afters))
        if tidy:
            g.drop_unused_initializers()
        log.info("%s: %d -> %d channels", unit.name, unit.channels, len(keep))
        return res

    def _share_tied(self, nodes: list[onnx.NodeProto]) -> None:
        """Let each of ``nodes`` that is tied to other layers read the constants of the first of
        them where their values are equal again (sliced alike, or refit together)."""
        for node in nodes:
            first = self.ties.get(node_key(node), [node])[0]
            if node_key(first) != node_key(node):
                self.g.share_consts(node, first)

    def _branch(self, unit: ChannelGroup, sites: list[Site]) -> Branch | None:
        """The residual branch through the unit's channels that :mod:`onnxprune.refine` can tune
        (see :class:`Branch`), found from the one refit consumer whose output joins a residual
        ``Add`` back to a producer of the unit, each tensor on the way read by the branch alone
        (and, before a gate, by the pooling that computes it); else None."""
        g = self.g
        if len(sites) != 1:
            return None
        targets = self.sampler.targets
        joined = [c for c in sites[0].sampled
                  if targets[c.node.output[0]].residual_other or targets[c.node.output[0]].activated]
        if not joined and len(sites[0].sampled) == 1 and reads_grouped_conv(g, sites[0].sampled[0].tensor):
            # a depthwise-separable block in a plain chain: refined through its depthwise conv
            # (sampled positions alone overfit: the sampler caches more targets for it, as for a residual branch)
            joined = list(sites[0].sampled)
        if len(joined) != 1:
            return None  # a plain conv chain: the next group's refit makes up for the pair (measured: no gain)
        c = joined[0]
        inner: list[onnx.NodeProto] = [c.node]  # the branch's nodes, from the consumer back
        checked = 1  # inner[checked:] must be read by the branch alone (the consumer's output goes to the Add)
        join_act, activated = None, targets[c.node.output[0]].activated
        if activated:  # consumer → activations → Add: those are the branch's too, and the Add reads the last
            join_act, source = self._activation_into(activated[0], inner)
            if source != c.node.output[0]:
                return None
            checked = 0
            inner.append(g.consumers[activated[0]][0])
        t, gate, gated = c.tensor, None, None
        gating = g.producer.get(t)
        if gating is not None and gating.op_type == "Mul" and handler_for(gating).activation(gating, g) is None:
            gate = next((i for i in gating.input if _is_channel_gate(g, i, t)), None)
            if gate is None:
                return None
            inner.append(gating)
            t = gated = next(i for i in gating.input if i != gate)
        middle, middle_act = None, None
        act, t = self._activation_into(t, inner)
        node = g.producer.get(t)
        hn = handler_for(node) if node is not None else None
        if hn is not None and (hn.is_depthwise(node, g) or hn.loses_whole_groups(node, g)):  # channels pass through
            middle, middle_act = node, act
            inner.append(node)
            act, t = self._activation_into(node.input[0], inner)
        elif gate is not None:
            return None  # a gate needs the depthwise conv's per-channel outputs to act on
        producer = g.producer.get(t)
        if producer is None or all(node_key(producer) != node_key(p) for p in unit.producers) or \
                node_key(producer) == node_key(c.node):
            return None
        hp = handler_for(producer)
        # the producer must be sampled at its own output positions (what input_positions maps): a 2-D conv
        if not isinstance(hp, LinearHandler) or not hp.reconstructable(producer, g) or \
                hp.input_positions(producer, g, np.zeros((1, 1), np.int64)) is None:
            return None
        inner.append(producer)
        keys = {node_key(n) for n in inner}
        for n in inner[checked:]:
            if activated and n.output[0] == activated[1]:
                continue  # the Add itself
            for out in n.output:
                readers = [r for r in g.consumers.get(out, []) if node_key(r) not in keys]
                if out in g.graph_outputs or any(out != gated or r.op_type not in _POOLS for r in readers):
                    return None
        return Branch(producer, act, c, self._output_activation(c), middle, middle_act, gate, join_act)

    def _activation_into(self, t: str, inner: list[onnx.NodeProto]) -> tuple[Activation, str]:
        """(activation, its input) for tensor ``t``: the chain of elementwise activations making it
        (their nodes, and those computing a self-gating Mul's gate, added to ``inner``), or the
        identity where none does."""
        g = self.g
        chain = activation_chain(g, t)
        if chain is None:
            return IDENTITY, t
        act, src, nodes = chain
        for node in nodes:
            inner.append(node)
            own = handler_for(node).activation_input(node, g)
            for i in node.input:
                gate = activation_chain(g, i, own) if i and i != own and not g.is_const(i) else None
                inner.extend(gate[2] if gate else [])
        return act, src

    def _output_activation(self, c: Consumer):
        """The activation applied to ``c``'s output (after the residual Add its target includes),
        when one op alone reads it; else None."""
        g, out = self.g, c.node.output[0]
        target = self.sampler.targets[out]
        if target.residual_other:
            out = g.consumers[out][0].output[0]
        elif target.activated:
            out = target.activated[1]
        users = g.consumers.get(out, [])
        return handler_for(users[0]).activation(users[0], g) if len(users) == 1 and out not in g.graph_outputs else None

    def _refine(self, unit: ChannelGroup, sites: list[Site], runs: Runs | None) -> tuple[float, float] | None:
        """Refine the unit's residual branch (:mod:`onnxprune.refine`) where it has one; the
        held-out error before and after, where refined."""
        branch = self._branch(unit, sites)
        if branch is None:
            return None
        g, producer, c = self.g, branch.producer, branch.consumer
        samples = self.sampler.pair_samples(g, producer, c, self.kept_outputs.get(c.node.output[0]), runs,
                                            MAX_VALUES, middle=branch.middle, gate=branch.gate,
                                            whole_values=WHOLE_MAX_VALUES, buffer=self.pair_buffer)
        if samples is None:
            return None
        hp: LinearHandler = handler_for(producer)  # type: ignore[assignment]
        hc: LinearHandler = handler_for(c.node)  # type: ignore[assignment]
        hm: LinearHandler | None = handler_for(branch.middle) if branch.middle is not None else None  # type: ignore[assignment]
        middle = Middle(hm.weight_matrix(branch.middle, g), hm.bias(branch.middle, g), branch.middle_act,
                        hm.input_channels(branch.middle, g)) if hm else None
        done = refine_pair(samples, branch.act, branch.out_act, hp.weight_matrix(producer, g), hp.bias(producer, g),
                           hc.weight_matrix(c.node, g), hc.bias(c.node, g), middle, branch.join_act)
        if done is None:
            return None
        hp.set_linear(producer, done.w1, done.b1, g)
        hc.set_linear(c.node, done.w2, done.b2, g)
        if hm:
            hm.set_linear(branch.middle, done.wm, done.bm, g)
        log.info("%s: refined with %s, held-out error %.4f -> %.4f", node_name(c.node), node_name(producer),
                 done.error_before, done.error_after)
        return done.error_before, done.error_after

    def _ridge_for(self, c: Consumer, unknowns: int) -> float | None:
        return self.ridge if self.ridge is not None else self.ridges.get((c.node.output[0], unknowns))

    def _remember(self, c: Consumer, unknowns: int, fit) -> None:
        if self.ridge is None and fit.ridge is not None:
            self.ridges.setdefault((c.node.output[0], unknowns), fit.ridge)

    def refit_layer(self, c: Consumer, runs: Runs | None = None) -> float:
        """Refit a layer whose input channels were not pruned but whose inputs drifted (and the
        layers that share its weight, on all their samples: ``c`` is the first of them)."""
        copies = [c] + [Consumer(n, n.input[0], 1) for n in self.ties.get(node_key(c.node), [])
                        if node_key(n) != node_key(c.node)]
        st = pooled(self.sampler.stats(self.g, copies, self.kept_outputs, runs))
        h: LinearHandler = handler_for(c.node)  # type: ignore[assignment]
        fit = refit(st, np.arange(st.dim), h.weight_matrix(c.node, self.g), h.bias(c.node, self.g), h.has_bias,
                    self._ridge_for(c, st.dim))
        if fit.ridge is not None:
            h.set_linear(c.node, fit.weight, fit.bias, self.g)
            for other in copies[1:]:
                self.g.share_consts(other.node, c.node, equal_only=False)
        self._remember(c, st.dim, fit)
        self.g.drop_unused_initializers()
        return fit.error_after

    def _refit(self, c, st, cols: np.ndarray, res: GroupResult):
        h: LinearHandler = handler_for(c.node)  # type: ignore[assignment]
        fit = refit(st, cols, h.weight_matrix(c.node, self.g), h.bias(c.node, self.g), h.has_bias,
                    self._ridge_for(c, len(cols)))
        if fit.ridge is None:
            res.refit_skipped.append(node_name(c.node))
        else:
            h.set_linear(c.node, fit.weight, fit.bias, self.g)
        self._remember(c, len(cols), fit)
        if c.node.output[0] not in self.sampler.capped:  # what more images would help: not a memory cap
            res.samples_per_unknown = min(res.samples_per_unknown or np.inf, st.samples_per_unknown(cols))
        res.residual_target |= bool(self.sampler.targets[c.node.output[0]].residual_other)
        return fit


def prune_to(work: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], widths: dict[int, int], opts: PruneOptions,
             sampler: Sampler | None, bn_scales: dict[str, np.ndarray], keep: dict[int, np.ndarray] | None = None,
             progress: Progress = QUIET, ridges: dict[tuple[str, int], float] | None = None
             ) -> tuple[onnx.ModelProto, list[GroupResult]]:
    """A pruned copy of ``work``: each candidate group cut to ``widths``, front to back, and the
    layers after it refit (with ``opts.refit_downstream``). ``sampler`` gives the regression
    problems (None: no data, no refit). ``keep`` gives, for some groups (by index), the channels
    to keep instead of those the method selects (for experiments comparing selection criteria,
    e.g. tools/bench_single_layer.py)."""
    model = copy.deepcopy(work)
    analysis = analyse(model, shapes, opts.prune_coupled, opts.needs_data, exclude=opts.exclude)
    g, topo = analysis.g, positions(model)
    sampler = sampler if opts.needs_data else None
    steps = pruning_steps(analysis, widths, topo, opts.reconstruct and opts.refit_downstream and sampler is not None)
    pruner = GroupPruner(g, analysis.groups, opts, sampler, bn_scales, keep, ridges=ridges)
    pruner.defer_shared_refits(steps, topo)
    # the frontier's cut may move up to the first node that this or a later step edits
    limits = np.minimum.accumulate([first_edited(step, g, topo) for step in steps][::-1])[::-1]
    results = []
    carried = Frontier(model, sampler.calib, sampler.indices, sampler.batch or DEFAULT_BATCH,
                       provider=sampler.provider) if sampler else contextlib.nullcontext()
    with carried as frontier:
        for step, limit in zip(progress.bar(steps, "pruning", "step"), limits):
            runs = functools.partial(frontier.run, advance_to=int(limit)) if frontier else None
            if isinstance(step, ChannelGroup):
                results.append(pruner.prune_unit(step, widths[step.index], runs))
            else:
                pruner.refit_layer(step, runs)
    pruned = finalize(model)
    try:
        onnx.checker.check_model(pruned, full_check=True)
    except onnx.checker.ValidationError as exc:  # a bug, never the user's fault
        raise RuntimeError(f"the pruned model fails the ONNX checker: {exc}") from exc
    return pruned, results
