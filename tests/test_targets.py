"""Targets (MACs, params, size, latency), the accuracy guard, and the inspect / gate / bench commands."""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime
from onnx import helper
import pytest
from conftest import check_pruned
from graphs import Builder, calib_for, mobilenet_v2, resnet50, tiny_resnet, tiny_vgg, vgg16

import onnxprune
from onnxprune.budget import count_params
from onnxprune.latency_search import LatencySearch
from onnxprune.cli import main
from onnxprune.errors import OptionError, TargetNotMetError
from onnxprune.graphview import GraphView
from onnxprune.summary import calibration_or_zeros, summarize


@pytest.mark.parametrize("build,gmacs,mparams", [
    (resnet50, 4.1, 25.6),  # He et al. 2016; torchvision
    (mobilenet_v2, 0.300, 3.5),  # Sandler et al. 2018
    (vgg16, 15.5, 138.4),  # Simonyan & Zisserman 2015; torchvision
])
def test_cost_model_agrees_with_published_figures(build, gmacs, mparams):
    model = build()
    s = summarize(model, calibration_or_zeros(model, None, None))
    assert s.macs / 1e9 == pytest.approx(gmacs, rel=0.02)
    assert s.params / 1e6 == pytest.approx(mparams, rel=0.02)


@pytest.mark.parametrize("hw,dilation,pad,auto_pad,taps", [
    (10, 1, 1, None, 9), (10, 12, 12, None, 1), (32, 24, 24, None, 9), (32, 36, 36, None, 1),
    (1, 1, 1, None, 1), (1, 1, 0, "SAME_UPPER", 1), (4, 1, 0, "SAME_UPPER", 9),
])
def test_conv_macs_count_the_taps_that_read_the_input(hw, dilation, pad, auto_pad, taps):
    """A tap that only ever reads padding (a conv dilated past its map, as DeepLab's ASPP is at
    small inputs; a 3x3 conv on a 1x1 map) is not counted: ORT's CPU kernels skip it."""
    attrs = {"auto_pad": auto_pad} if auto_pad else {"pads": [pad] * 4}
    b = Builder(in_shape=("N", 8, hw, hw), seed=0)
    node = helper.make_node("Conv", ["input", b.const(np.ones((4, 8, 3, 3), np.float32))], ["y"],
                            kernel_shape=[3, 3], dilations=[dilation] * 2, **attrs)
    b.nodes.append(node)
    model = b.build("y")
    s = summarize(model, calibration_or_zeros(model, None, None))
    assert s.macs == 4 * 8 * taps * hw * hw


def test_a_check_on_outputs_that_ignore_the_input_says_it_cannot_tell(tmp_path, capsys, models_dir):
    """Calibration samples nearly alike (one image, noise of 10⁻⁶ added): the relative error reads
    small whatever the pruning did, and the run warns in one line that the check cannot tell. Real,
    varied images: no such warning. (Samples all exactly alike are refused before any work.)"""
    from onnxprune.verify import UNINFORMATIVE_VARIATION

    path = models_dir / "vgg_fmnist.onnx"
    model, pool = onnx.load(path), np.load(models_dir / "fmnist_calib.npy")
    alike = pool[:1] + np.random.default_rng(0).normal(0, 1e-6, (160, *pool.shape[1:])).astype(np.float32)
    for x, warned in ((alike, True), (pool[:160], False)):
        np.save(tmp_path / "x.npy", x)
        assert main([str(path), "--calib", str(tmp_path / "x.npy"), "-o", str(tmp_path / "p.onnx"),
                     "--speedup", "1.3", "--no-latency", "--force", "--mixtures", "0"]) == 0
        pruned = onnx.load(tmp_path / "p.onnx")
        if warned:  # right on the one image it saw, far off on others: what the check could not tell
            check_pruned(pruned, model, x[:8], max_rel_err=0.05)
            with pytest.raises(AssertionError):  # ten times the bound that holds on the image it saw
                check_pruned(pruned, model, pool[-8:], max_rel_err=0.5)
        else:
            check_pruned(pruned, model, pool[-8:], max_rel_err=0.5)
        lines = [line for line in capsys.readouterr().err.splitlines() if "nearly the same for every" in line]
        assert len(lines) == int(warned), lines
        if warned:
            assert lines[0].startswith("onnxprune: warning: output 'logits'") and "calibration samples differ" in lines[0]
    result = onnxprune.prune(model, pool[:160], speedup=1.3, measure_latency=False)
    assert result.report.fidelity[0].variation > 100 * UNINFORMATIVE_VARIATION


@pytest.fixture(scope="module")
def vgg():
    model = tiny_vgg()
    return model, calib_for(model, 96)


def _params(model: onnx.ModelProto) -> int:
    return count_params(GraphView(model))


def test_params_target_holds(vgg):
    model, x = vgg
    result = onnxprune.prune(model, x, params=0.5, measure_latency=False)
    assert _params(result.model) <= 0.5 * _params(model)
    assert result.report.totals.params[1] == _params(result.model)
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)


def test_size_target_holds_together_with_speedup(vgg):
    model, x = vgg
    limit = 0.6 * model.ByteSize() / 1e6
    result = onnxprune.prune(model, x, size_mb=limit, speedup=1.3, measure_latency=False)
    assert result.model.ByteSize() / 1e6 <= limit
    assert result.report.totals.macs_speedup >= 1.3
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)


def test_unreachable_targets_say_how_close_they_got(vgg):
    model, x = vgg
    with pytest.raises(TargetNotMetError, match="cannot be reached.*MACs"):
        onnxprune.prune(model, x, params=0.001, measure_latency=False)
    with pytest.raises(TargetNotMetError, match="--latency 1000 on cpu cannot be reached"):
        onnxprune.prune(model, x, latency=1000, measure_latency=False)


def test_a_target_that_cuts_a_layer_deep_is_warned_about_naming_the_barrier(caplog):
    """Most MACs sit in a layer a custom op locks: --speedup 1.06 can only be met by cutting the
    prunable group 16 -> 2 channels, and the warning says so, naming the barrier."""
    b = Builder(in_shape=("N", 3, 8, 8))
    x = b.conv(b.node("Relu", [b.conv("input", 3, 16)]), 16, 16)
    b.nodes.append(helper.make_node("Gelu", [x], ["gelu_out"], domain="com.microsoft", name="gelu"))
    y = b.conv("gelu_out", 16, 256)
    out = helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, ["N", 256, 8, 8])
    graph = helper.make_graph(b.nodes, "g", [b.input], [out], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("com.microsoft", 1)])
    x = calib_for(model, 64)
    with caplog.at_level("WARNING", logger="onnxprune"):
        result = onnxprune.prune(model, x, speedup=1.06, measure_latency=False)
    assert result.report.totals.macs_speedup >= 1.06
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)
    warned = [r.getMessage() for r in caplog.records if "expect a large accuracy loss" in r.getMessage()]
    assert len(warned) == 1 and "--speedup 1.06 cuts" in warned[0] and "to 2 channels (8.0x)" in warned[0]
    assert "of the MACs are out of pruning's reach (behind Gelu 'gelu')" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="onnxprune"):
        onnxprune.prune(model, x, speedup=1.01, measure_latency=False)
    assert "expect a large accuracy loss" not in caplog.text


def test_a_deep_cut_forced_by_kept_block_outputs_prunes_them_too(caplog):
    """With the residual-joined groups at full width, --speedup 2.6 can only be met by cutting a
    block's inner channels 12 -> 2: by default the block outputs then shrink too (said in one
    warning); with --no-prune-residual they keep their width and the deep-cut warning offers
    --prune-residual; with --prune-residual neither is said."""
    model = tiny_resnet()
    x = calib_for(model, 64)
    with caplog.at_level("WARNING", logger="onnxprune"):
        result = onnxprune.prune(model, x, speedup=2.6, measure_latency=False)
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)
    assert result.report.totals.macs_speedup >= 2.6
    spread = [r.getMessage() for r in caplog.records if "residual-joined groups at full width: pruning them too" in r.getMessage()]
    assert len(spread) == 1 and "--speedup 2.6 cuts" in spread[0] and "(--no-prune-residual keeps them)" in spread[0]
    assert "--prune-residual (" not in caplog.text
    assert "first plan" in result.report.phases
    once = onnxprune.prune(model, ({"input": x[i:i + 1]} for i in range(len(x))), speedup=2.6, measure_latency=False)
    assert once.report.phases.get("first plan")  # a one-shot feed, read once for both sessions
    check_pruned(once.model, model, x[:16], max_rel_err=1.0)
    kept_whole = onnxprune.prune(model, x, speedup=2.6, prune_coupled=True, measure_latency=False)
    check_pruned(kept_whole.model, model, x[:16], max_rel_err=1.0)
    assert [(g.name, g.channels_after) for g in result.report.groups] == \
        [(g.name, g.channels_after) for g in kept_whole.report.groups]  # the same plan as asked for outright
    caplog.clear()
    with caplog.at_level("WARNING", logger="onnxprune"):
        result = onnxprune.prune(model, x, speedup=2.6, prune_coupled=False, measure_latency=False)
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)
    warned = [r.getMessage() for r in caplog.records if "expect a large accuracy loss" in r.getMessage()]
    assert len(warned) == 1 and "or --prune-residual (the 2 residual-joined groups keep their width)" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="onnxprune"):
        result = onnxprune.prune(model, x, speedup=2.6, prune_coupled=True, measure_latency=False)
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)
    assert "--prune-residual (" not in caplog.text and "pruning them too" not in caplog.text


def test_the_second_session_measures_only_the_groups_new_to_it(monkeypatch):
    """The residual rule's second session takes the curves of the groups both sessions have from
    the first: it measures the residual-joined groups alone, and every curve equals what a session
    measuring all of them afresh finds."""
    from onnxprune import sensitivity
    from onnxprune.options import PruneOptions
    from onnxprune.pipeline import Pruner

    model = tiny_resnet()
    x = calib_for(model, 64)
    measured = []
    error_curve = sensitivity.error_curve
    monkeypatch.setattr(sensitivity, "error_curve", lambda unit, *a, **k: measured.append(unit.name) or
                        error_curve(unit, *a, **k))
    options = PruneOptions(speedup=2.6, measure_latency=False)
    first = Pruner(model, x, options)
    assert first._residual_instead(first.allocate())
    inner = sorted(measured)
    second = first._with_residual_joined(first.allocator.plan(options.targets, options.round_to))
    measured.clear()
    shared = second.allocate()
    joined = sorted(grp.name for grp in second.residual_joined)
    assert sorted(measured) == joined and not set(joined) & set(inner)
    fresh = Pruner(model, x, PruneOptions(speedup=2.6, measure_latency=False, prune_coupled=True))
    measured.clear()
    plan = fresh.allocate()
    assert sorted(measured) == sorted(inner + joined)
    assert second.allocator.curves == fresh.allocator.curves and shared.widths == plan.widths
    check_pruned(second.prune(shared).model, model, x[:16], max_rel_err=1.0)


def test_a_unit_ready_before_an_earlier_one_does_not_move_the_probes_past_it(monkeypatch):
    """Stem → A → B → C, Concat(A, C) → D: A's and C's curves both need D, so with one consumer
    sampled per pass C is ready (and probed) before B. The probes' carried activations must not
    move past B's conv then: B's probe runs from before it, and the curves are those of passes
    taking all consumers at once."""
    import functools

    from onnxprune import sensitivity
    from onnxprune.options import PruneOptions
    from onnxprune.pipeline import Pruner

    b = Builder(in_shape=("N", 3, 8, 8), seed=3)
    stem = b.node("Relu", [b.conv("input", 3, 8)])
    a = b.node("Relu", [b.conv(stem, 8, 8)])
    c = b.node("Relu", [b.conv(b.node("Relu", [b.conv(a, 8, 8)]), 8, 8)])
    d = b.node("Relu", [b.conv(b.node("Concat", [a, c], axis=1), 16, 8)])
    model = b.build(b.gemm(b.node("Flatten", [b.node("GlobalAveragePool", [d])], axis=1), 8, 4))
    x = calib_for(model, 32)
    options = PruneOptions(speedup=1.3, measure_latency=False)
    together = Pruner(model, x, options)
    together.allocate()
    probed = []
    measure, error_curve = sensitivity.measure_curves, sensitivity.error_curve
    monkeypatch.setattr(sensitivity, "measure_curves", functools.partial(measure, chunk=1))
    monkeypatch.setattr(sensitivity, "error_curve", lambda unit, *a, **k: probed.append(unit.name) or
                        error_curve(unit, *a, **k))
    apart = Pruner(model, x, options)
    apart.allocate()
    order = [grp.name for grp in sorted(apart.candidates, key=lambda grp: int(grp.name.replace("conv", "")))]
    assert probed != order[:len(probed)]  # one is ready before an earlier one
    assert apart.allocator.curves.keys() == together.allocator.curves.keys()
    for index, curve in together.allocator.curves.items():
        np.testing.assert_allclose(apart.allocator.curves[index], curve, rtol=1e-6, atol=1e-9)


def _probe_calls(monkeypatch, module, function: str, method, memo: str):
    """Calls of ``module.function`` (their ``count`` argument, None where not given) over one
    allocation of tiny_vgg by ``method`` with the probes sharing ``memo`` as usual, then over one
    with ``GroupPruner`` given no ``memo``; and the two allocations' curves."""
    from onnxprune import sensitivity
    from onnxprune.options import PruneOptions
    from onnxprune.pipeline import Pruner

    model = tiny_vgg()
    x = calib_for(model, 64)
    calls = []
    wrapped = getattr(module, function)
    monkeypatch.setattr(module, function, lambda *a, **k: calls.append(k.get("count")) or wrapped(*a, **k))
    options = PruneOptions(speedup=1.5, method=method, measure_latency=False)
    shared = Pruner(model, x, options)
    shared.allocate()
    once = list(calls)
    calls.clear()
    pruner = sensitivity.GroupPruner
    monkeypatch.setattr(sensitivity, "GroupPruner", lambda *a, **k: pruner(*a, **{**k, memo: None}))
    apart = Pruner(model, x, options)
    apart.allocate()
    return once, calls, shared.allocator.curves, apart.allocator.curves


def test_a_groups_two_probes_share_one_obs_removal_order(monkeypatch):
    """The probes at 0.3 and at half a group's width choose channels by one OBS removal order (the
    milder probe keeps what the deeper one removed last): the same curves as two orders, one
    order per group."""
    from onnxprune import group_pruner
    from onnxprune.select import Method

    once, apart, shared_curves, apart_curves = _probe_calls(monkeypatch, group_pruner, "obs_order", Method.OBS,
                                                            "removal_orders")
    assert len(apart) == 2 * len(once) and apart[::2] == once  # each group: the deeper probe first
    assert shared_curves == apart_curves


def test_probes_take_the_lasso_selections_their_curve_made(monkeypatch):
    """A group's probes keep the channels its curve's LASSO path chose at the probe widths instead
    of following the same path again: the same curves as selections made anew, fewer paths."""
    from onnxprune import select
    from onnxprune.select import Method

    once, apart, shared_curves, apart_curves = _probe_calls(monkeypatch, select, "lasso_selections", Method.LASSO,
                                                            "lasso_keeps")
    # two probes a group, each its own path; the group feeding the Flatten -> Gemm is probed on
    # the statistics of half its images (not its curve's problem) and follows its own either way
    assert len(apart) == 2 * len(apart_curves) and len(once) == 2
    assert shared_curves == apart_curves


def _two_branch_concat(quiet: float) -> onnx.ModelProto:
    """Stem conv, two 12-channel branches joined by a Concat, a conv reading all 24, GAP, Gemm; the
    conv's weights on the second branch's channels scaled by ``quiet``."""
    b = Builder(in_shape=("N", 3, 8, 8), seed=2)
    x = b.node("Relu", [b.conv("input", 3, 8)])
    left, right = b.node("Relu", [b.conv(x, 8, 12, k=1, pad=0)]), b.node("Relu", [b.conv(x, 8, 12)])
    y = b.conv(b.node("Concat", [left, right], axis=1), 24, 16)
    x = b.node("Flatten", [b.node("GlobalAveragePool", [b.node("Relu", [y])])], axis=1)
    model = b.build(b.gemm(x, 16, 10))
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[0].startswith("concat"))
    w = next(t for t in model.graph.initializer if t.name == conv.input[1])
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[:, 12:] *= quiet
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    return model


@pytest.mark.parametrize("whole_refit", [True, False])
def test_groups_feeding_a_concat_get_measured_curves(monkeypatch, whole_refit):
    """Each branch before a Concat gets its own curve, from the conv after the Concat (whose
    statistics are gathered once for both), refit whole or with the other branch's weights held
    (``whole_refit``): the branch that conv barely reads costs little to cut, and the allocation
    cuts it rather than the other."""
    from onnxprune import sensitivity
    from onnxprune.options import PruneOptions
    from onnxprune.pipeline import Pruner

    if not whole_refit:
        monkeypatch.setattr(sensitivity, "FULL_REFIT_OTHERS", 0)

    model = _two_branch_concat(quiet=0.02)
    x = calib_for(model, 64)
    gathered = []
    stats = sensitivity.Sampler.stats
    monkeypatch.setattr(sensitivity.Sampler, "stats", lambda self, g, consumers, *a, **k: gathered.extend(
        c.node.name for c in consumers) or stats(self, g, consumers, *a, **k))
    session = Pruner(model, x, PruneOptions(speedup=1.3, measure_latency=False))
    plan = session.allocate()
    branches = [grp for grp in session.candidates if grp.channels == 12]
    assert len(branches) == 2 and all(not grp.consumers and len(grp.sites) == 2 for grp in branches)
    # the left branch is the 1x1 conv
    kernel = {grp.index: next(list(a.ints) for a in grp.producers[0].attribute if a.name == "kernel_shape")
              for grp in branches}
    loud, quiet = sorted(branches, key=lambda grp: kernel[grp.index] != [1, 1])
    curves = session.allocator.curves
    assert curves[quiet.index][4] < 0.2 * curves[loud.index][4]  # half width: the branch barely read is cheap
    assert curves[loud.index] != curves[quiet.index] and curves[loud.index][4] > 0
    assert len(gathered) == len(set(gathered))  # the conv after the Concat: one set of statistics
    assert plan.widths[quiet.index] < plan.widths[loud.index]
    result = onnxprune.prune(model, x, speedup=1.3, measure_latency=False)
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)


@pytest.mark.parametrize("kind", ["conv", "depthwise", "grouped", "gemm"])
def test_single_layer_models_for_latency_timing_run(kind):
    """The one-node models timed for --latency compute the layer at the narrowed widths."""
    from onnx import helper

    from onnxprune.latency_cost import single_layer_model
    if kind == "gemm":
        node, weight, shape = helper.make_node("Gemm", ["a", "b"], ["c"], transB=1), np.zeros((10, 32)), (1, 32)
    else:
        group = {"depthwise": 16, "grouped": 4}.get(kind, 1)  # grouped: 4 per group, it loses whole groups
        node = helper.make_node("Conv", ["a", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2],
                                group=group)
        weight, shape = np.zeros((16, 16 // group, 3, 3)), (1, 16, 12, 12)
    model, x = single_layer_model(node, weight, shape, 8, 8 if kind != "gemm" else 10)
    onnx.checker.check_model(model, full_check=True)
    out = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert out.shape == ((1, 10) if kind == "gemm" else (1, 8, 6, 6))
    if kind == "grouped":  # two whole groups of four
        conv = model.graph.node[0]
        assert [a.i for a in conv.attribute if a.name == "group"] == [2] and model.graph.initializer[0].dims[1] == 4


def test_latency_cost_interpolates_layer_timings():
    from onnxprune.latency_cost import LatencyCost, LayerLatency
    cost = LatencyCost([LayerLatency(0, np.array([0.25, 0.5, 1.0]), np.array([1.0, 1.5, 3.0])),
                        LayerLatency(1, np.array([0.5, 1.0]), np.array([2.0, 2.0]))], rest_ms=0.5, measured_ms=5.5)
    factors = {0: 0.75, 1: 0.5}
    assert cost.predict(lambda e, w: factors[e], {}) == pytest.approx(0.5 + 2.25 + 2.0)


def test_latency_search_runs_on_per_layer_timings(vgg, monkeypatch):
    """--latency times each prunable layer alone and searches on the latency those timings
    predict. (Each layer's timing is replaced by its weight count and the whole-model measurement
    by the prediction here, so that the test does not depend on the machine's timing noise: on a
    busy machine the real per-layer timings can predict too little to search on.)"""
    import onnxprune.latency_cost as latency_cost
    import onnxprune.latency_search as latency_search

    def weight_count_ms(model, x, provider):
        return 1e-4 * sum(int(np.prod(t.dims)) for t in model.graph.initializer)

    monkeypatch.setattr(latency_cost, "_timed", weight_count_ms)
    monkeypatch.setattr(latency_search, "latency_ms", lambda models, feed, provider: [0.0] * len(models))
    predicted = []

    def measured(self, plan):
        assert self.cost.latency is not None and len(self.cost.latency.layers) >= 3
        predicted.append(self.cost.latency_ms({}) / self.cost.latency_ms(plan.widths))
        return predicted[-1]

    monkeypatch.setattr(LatencySearch, "measured_speedup", measured)
    model, x = vgg
    result = onnxprune.prune(model, x, latency=1.3, latency_batch=32, allocation="uniform", measure_latency=False)
    assert predicted and max(predicted) >= 1.3 * 1.05
    assert result.report.totals.macs_speedup > 1.0
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)


def test_a_default_rounding_gives_way_to_a_target_that_needs_finer_widths(vgg):
    model, x = vgg  # 8- and 16-wide groups: multiples of 16 (or 8) keep at least 4 and 8 of them
    with pytest.raises(TargetNotMetError, match="try --round-to 1"):
        onnxprune.prune(model, x, speedup=6, round_to=16, measure_latency=False)
    result = onnxprune.prune(model, x, speedup=6, round_to=16, relax_round_to=True, measure_latency=False)
    assert result.report.totals.macs_speedup >= 6
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)


def test_latency_search_falls_back_to_finer_rounding_only_when_rounding_is_a_default(vgg, monkeypatch):
    """A default --round-to that keeps the goal out of reach gives way to finer multiples; one the
    user chose does not. (Measurements are replaced: the goal is only "measured" without rounding.)"""
    roundings = []

    def measured(self, plan):
        roundings.append(plan.round_to)
        return self.cost.total / self.cost.macs(plan.widths) if plan.round_to == 1 else 1.0

    monkeypatch.setattr(LatencySearch, "measured_speedup", measured)
    model, x = vgg
    result = onnxprune.prune(model, x, latency=1.3, round_to=16, relax_round_to=True, allocation="uniform",
                             measure_latency=False)
    assert roundings[0] == 16 and 8 in roundings and roundings[-1] == 1
    assert result.report.totals.macs_speedup >= 1.3
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)
    roundings.clear()
    with pytest.raises(TargetNotMetError, match="smaller --round-to than 16"):
        onnxprune.prune(model, x, latency=1.3, round_to=16, allocation="uniform", measure_latency=False)
    assert set(roundings) == {16}


def test_missing_provider_is_a_clear_option_error(vgg):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorRT")
    model, x = vgg
    with pytest.raises(OptionError, match="not available"):
        onnxprune.prune(model, x, latency=1.2, provider="tensorrt")


def test_max_drop_gives_width_back(vgg):
    model, x = vgg
    unguarded = onnxprune.prune(model, x, speedup=3, measure_latency=False)
    loss = 1 - unguarded.report.fidelity[0].top1_agreement
    assert loss > 0
    result = onnxprune.prune(model, x, speedup=3, max_drop=0.8 * loss, measure_latency=False)
    assert not result.report.targets_met
    assert 1 < result.report.totals.macs_speedup < 3
    assert 1 - result.report.fidelity[0].top1_agreement <= 0.8 * loss
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)


def test_max_drop_met_first_time_keeps_the_target(vgg):
    model, x = vgg
    result = onnxprune.prune(model, x, speedup=1.2, max_drop=0.99, measure_latency=False)
    assert result.report.targets_met and result.report.totals.macs_speedup >= 1.2


def test_poor_held_out_fidelity_exits_1_with_one_line_and_the_model_written(tmp_path, capsys):
    """The default safety net: a broken result is not handed on as a success; --max-drop replaces it."""
    model = tiny_vgg()
    x = calib_for(model, 80)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x)
    args = [str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "-o", str(tmp_path / "p.onnx"), "--speedup",
            "4", "--method", "random", "--no-reconstruct", "--allocation", "uniform", "--no-latency", "-q", "--force"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "looks broken" in err[0] and "held-out" in err[0] and "--max-drop" in err[0], err
    check_pruned(onnx.load(tmp_path / "p.onnx"), model, x[:16], max_rel_err=10.0)
    assert main(args + ["--max-drop", "0.99"]) == 0
    assert "looks broken" not in capsys.readouterr().err


def test_a_held_out_check_too_small_to_vouch_says_so(tmp_path, capsys, models_dir):
    """Six held-out images cannot show that a pruned model keeps 90 % of its predictions, however
    well it does on them: the run succeeds and warns in one line what would make the check count."""
    path = models_dir / "vgg_fmnist.onnx"
    model, pool = onnx.load(path), np.load(models_dir / "fmnist_calib.npy")
    for images, warned in ((30, True), (160, False)):
        x = pool[:images]
        np.save(tmp_path / "x.npy", x)
        assert main([str(path), "--calib", str(tmp_path / "x.npy"), "-o", str(tmp_path / "p.onnx"),
                     "--speedup", "1.3", "--no-latency", "--force"]) == 0
        check_pruned(onnx.load(tmp_path / "p.onnx"), model, pool[-8:], max_rel_err=0.5)
        lines = [line for line in capsys.readouterr().err.splitlines() if "held-out check ran on only" in line]
        assert len(lines) == int(warned), lines
        if warned:
            assert "only 6 samples" in lines[0] and "125 calibration images" in lines[0]


@pytest.fixture
def files(tmp_path):
    model = tiny_resnet()
    x = calib_for(model, 64)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x)
    assert main([str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "-o", str(tmp_path / "p.onnx"),
                 "--speedup", "1.5", "--round-to", "1", "--no-latency", "-q"]) == 0
    check_pruned(onnx.load(tmp_path / "p.onnx"), model, x[:16], max_rel_err=1.0)
    return tmp_path


def test_inspect_prints_costs_groups_and_barriers(files, capsys):
    assert main(["inspect", str(files / "m.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["macs"] > 0 and info["params"] == _params(onnx.load(files / "m.onnx"))
    reasons = [g[2] for g in info["groups"]]
    assert "" in reasons and any("residual" in r for r in reasons)


def test_gate_passes_and_fails_with_one_line_reason(files, capsys):
    pruned, ref, calib = str(files / "p.onnx"), str(files / "m.onnx"), str(files / "x.npy")
    size = (files / "p.onnx").stat().st_size / 1e6
    assert main(["gate", pruned, "--max-size-mb", str(size * 1.01), "--reference", ref, "--calib", calib,
                 "--min-agreement", "0.0", "--max-error", "10"]) == 0
    capsys.readouterr()
    assert main(["gate", pruned, "--max-size-mb", str(size * 0.5), "--max-macs", "1000", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxprune: gate failed: size MB")
    assert main(["gate", pruned, "--min-agreement", "0.9"]) == 2  # needs --reference


def test_gate_bounds_the_iou_of_a_probability_maps_marked_region(files, tmp_path, capsys):
    """--min-iou judges a Sigmoid output by the regions it marks above 0.5; a model without one
    is an option error naming what to use instead."""
    def sigmoid_map(shift: float) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])
        y = helper.make_tensor_value_info("prob", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])
        shift_init = onnx.numpy_helper.from_array(np.array(shift, np.float32), "shift")
        nodes = [helper.make_node("Add", ["x", "shift"], ["z"]), helper.make_node("Sigmoid", ["z"], ["prob"])]
        return helper.make_model(helper.make_graph(nodes, "m", [x], [y], [shift_init]),
                                 opset_imports=[helper.make_opsetid("", 13)])

    data = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "maps.npy", data)
    onnx.save(sigmoid_map(0.0), tmp_path / "ref.onnx")
    onnx.save(sigmoid_map(1.0), tmp_path / "grown.onnx")
    iou = np.count_nonzero(data > 0) / np.count_nonzero(data > -1.0)
    gate = ["gate", str(tmp_path / "grown.onnx"), "--reference", str(tmp_path / "ref.onnx"),
            "--calib", str(tmp_path / "maps.npy"), "--min-iou"]
    assert main(gate + [str(iou - 0.01)]) == 0
    assert f"PASS marked-region IoU: {iou:.4g}" in capsys.readouterr().out
    assert main(gate + [str(iou + 0.01), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "marked-region IoU" in err[0]
    assert main(["gate", str(files / "p.onnx"), "--reference", str(files / "m.onnx"), "--calib",
                 str(files / "x.npy"), "--min-iou", "0.5"]) == 2
    assert "--min-iou needs a probability map" in capsys.readouterr().err


def test_bench_reports_every_model_and_batch(files, capsys, tmp_path):
    assert main(["bench", str(files / "m.onnx"), str(files / "p.onnx"), "--batch", "1", "4", "--repeats", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 2 * 2 and lines[0].split()[:2] == ["model", "batch"]
    # a model exported at batch 1 runs one sample whatever --batch asks: one row per model, batch 1
    fixed = onnx.load(files / "m.onnx")
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(fixed, tmp_path / "fixed.onnx")
    assert main(["bench", str(tmp_path / "fixed.onnx"), "--batch", "1", "4", "--repeats", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].split()[1] == "1"


def test_bench_by_op_shows_where_each_model_spends_its_run(files, capsys, monkeypatch, tmp_path):
    """--by-op: each op type's kernel time per run for every model, from ORT's profiler, with the
    speedup against the first; the profiler's file goes to a temporary folder that is removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert main(["bench", str(files / "m.onnx"), str(files / "p.onnx"), "--batch", "1", "--repeats", "3",
                 "--by-op"]) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("time by op type at batch 1"))
    rows = {line.split()[0]: line.split()[-3:] for line in out[start + 2:] if line.strip()}
    assert "Conv" in rows and "whole" in rows
    original, pruned, speedup = rows["Conv"]
    assert float(original) > 0 and float(pruned) > 0 and speedup.endswith("x")
    assert not list((tmp_path / "tmp").iterdir())  # nothing of the profiler left behind


def test_op_times_add_up_to_the_run():
    from onnxprune.latency import op_times

    model = tiny_resnet()
    [times] = op_times([model], {model.graph.input[0].name: calib_for(model, 2)})
    assert times.runs >= 3 and "Conv" in times.by_op
    assert all(0 < ms <= times.run_ms for ms in times.by_op.values()) and times.between_ms >= 0


def test_op_times_are_those_of_runs_nothing_interrupted():
    """Each op type's time is taken per run, then the compared percentile over the runs: one
    interrupted run (its Conv three times as long) moves neither the Conv row nor the run."""
    from onnxprune.latency import _op_times

    events, timed = [], []
    for k in range(10):
        start = 1000 * k
        conv = 300 if k == 4 else 100
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": conv + 60})
        events.append({"cat": "Node", "name": "c_kernel_time", "ts": start + 10, "dur": conv, "args": {"op_name": "Conv"}})
        events.append({"cat": "Node", "name": "r_kernel_time", "ts": start + 20 + conv, "dur": 40,
                       "args": {"op_name": "Relu"}})
        timed.append(k > 0)  # the first run is a warm-up
    times = _op_times(events, timed)
    assert times.runs == 9
    assert times.by_op == {"Conv": pytest.approx(0.1), "Relu": pytest.approx(0.04)}
    assert times.run_ms == pytest.approx(0.16) and times.between_ms == pytest.approx(0.02)


def test_sensitivity_curves_use_a_bounded_random_subset(monkeypatch):
    """Curves and probe prunings run on --sensitivity-images fit images; the refits on all."""
    from onnxprune import pipeline

    seen = []

    class Recording(pipeline.Sampler):
        def __init__(self, *args, indices, **kwargs):
            seen.append(np.asarray(indices))
            super().__init__(*args, indices=indices, **kwargs)

    monkeypatch.setattr(pipeline, "Sampler", Recording)
    model = tiny_vgg()
    x = calib_for(model, 60)
    result = onnxprune.prune(model, x, speedup=1.5, sensitivity_images=20, measure_latency=False)
    check_pruned(result.model, model, x[:10], max_rel_err=1.0)
    assert [len(i) for i in seen] == [96, 20]  # 60 images, 12 held out, 48 fit and their 48 mixtures
    assert set(seen[1]) <= set(seen[0]) and list(seen[1]) == sorted(seen[1])
    assert list(seen[1]) != list(seen[0][:20])  # random, not the first ones (data sorted by class)
    with pytest.raises(OptionError, match="--sensitivity-images must be >= 2"):
        onnxprune.prune(model, x, sensitivity_images=1, measure_latency=False)


def test_width_costs_agree_with_the_cost_model_row_by_row():
    """The allocation's batched figures (WidthCosts) are the cost model's, for every target,
    on a network whose Concat groups are made of several owners."""
    from onnxprune.budget import Targets, WidthCosts
    from onnxprune.latency_cost import LatencyCost, LayerLatency
    from onnxprune.options import PruneOptions
    from onnxprune.pipeline import Pruner

    from graphs import random_cnn

    model = random_cnn(["conv", "concat", "residual", "concat", "conv"], [16, 8, 8, 8, 16], head="gap")
    pruner = Pruner(model, calib_for(model, 4), PruneOptions(allocation="uniform", prune_coupled=True,
                                                           measure_latency=False))
    cost, units = pruner.cost, pruner.candidates
    assert any(len(parts) > 1 for parts in cost.composition.values())
    cost.latency = LatencyCost([LayerLatency(j, np.array([0.25, 0.5, 1.0]), np.array([0.2, 0.3, 1.0 + j]))
                                for j in range(len(cost.entries))], rest_ms=0.5, measured_ms=9.0)
    targets = Targets(speedup=1.7, params=0.6, size_mb=cost.total_bytes / 2e6, latency=1.5)
    rng = np.random.default_rng(0)
    rows = np.array([[rng.integers(1, u.channels + 1) for u in units] for _ in range(20)] + [[u.channels for u in units]])
    costs = WidthCosts(cost, [u.index for u in units])
    shortfalls = targets.shortfalls(costs, rows)
    for row, short in zip(rows, shortfalls):
        widths = {u.index: int(w) for u, w in zip(units, row)}
        np.testing.assert_allclose(costs.macs(row[None])[0], cost.macs(widths), rtol=1e-9)
        np.testing.assert_allclose(costs.params(row[None])[0], cost.params(widths), rtol=1e-9)
        np.testing.assert_allclose(costs.bytes(row[None])[0], cost.bytes(widths), rtol=1e-9)
        np.testing.assert_allclose(costs.latency_ms(row[None])[0], cost.latency_ms(widths), rtol=1e-9)
        np.testing.assert_allclose(short, targets.shortfall(cost, widths), rtol=1e-9, atol=1e-12)
    assert shortfalls[-1] > 0 and (shortfalls[:-1] > 0).any()


def test_a_missed_macs_target_is_pruned_again_aiming_past_the_miss(monkeypatch):
    """Where the pruned model reaches fewer MACs than its plan (a Split's parts keeping unequal
    shares), the plan is raised by the miss and pruned once more."""
    import onnxprune.pipeline as pipeline

    miss = 1.03  # the model's MACs read this much higher than they are, at every pruning
    counted = pipeline.model_macs
    monkeypatch.setattr(pipeline, "model_macs", lambda model, cal: counted(model, cal) * miss)
    prunings = []
    prune = pipeline.Pruner.prune
    monkeypatch.setattr(pipeline.Pruner, "prune", lambda self, *a, **k: prunings.append(1) or prune(self, *a, **k))
    model = tiny_vgg()
    x = calib_for(model, n=32)
    result = onnxprune.prune(model, x, speedup=1.5, round_to=1, measure_latency=False)
    before, after = result.report.totals.macs
    assert len(prunings) == 2 and before / (after * miss) >= 1.5
    check_pruned(result.model, model, x, 0.5)


def test_the_cost_model_predicts_a_conv_that_reads_and_writes_one_residual_group():
    """MediaPipe's blocks: a depthwise conv and a pointwise conv inside a residual join read and
    write the same channels, so the pointwise conv keeps the square of their share: the plan's
    predicted MACs are those of the pruned model."""
    from onnxprune.allocation import Plan
    from onnxprune.options import PruneOptions
    from onnxprune.pipeline import Pruner
    from onnxprune.summary import model_macs

    b = Builder(in_shape=("N", 3, 16, 16))
    x = b.node("Relu", [b.conv("input", 3, 16)])
    for _ in range(3):  # x + conv1x1(dw(x)): both convs read and write the stream
        x = b.node("Relu", [b.node("Add", [b.conv(b.conv(x, 16, 16, group=16), 16, 16, k=1, pad=0), x])])
    model = b.build(b.conv(x, 16, 4, k=1, pad=0))
    x_cal = calib_for(model, 16)
    pruner = Pruner(model, x_cal, PruneOptions(prune_coupled=True, reconstruct=False, method="l1",
                                               measure_latency=False))
    stream = next(u for u in pruner.candidates if u.channels == 16)
    plan = Plan({stream.index: 8}, 1)
    predicted = pruner.cost.macs(plan.widths)
    pruned = pruner.prune(plan).model
    assert model_macs(pruned, pruner.cal) == pytest.approx(predicted, rel=1e-6)
    check_pruned(pruned, model, x_cal, 2.0)


def test_cpu_seconds_read_the_cpus_this_process_may_run_on(tmp_path):
    from onnxprune.latency import CpuSeconds, busy_share, cpu_seconds

    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    other = max(mine) + 1
    tick = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice, in ticks
    lines = ["cpu  999 999 999 999 999 999 999 999 0 0"]
    lines += [f"cpu{c} 100 0 20 300 50 5 5 20 7 0" for c in mine]
    lines += [f"cpu{other} 9999 0 0 0 0 0 0 0 0 0", "intr 12345", "ctxt 678"]
    (tmp_path / "stat").write_text("\n".join(lines) + "\n")
    now = cpu_seconds(str(tmp_path / "stat"))
    assert now.busy == pytest.approx(len(mine) * 150 / tick)  # idle and iowait are not busy; steal is
    assert now.total == pytest.approx(len(mine) * 500 / tick)  # guest time is inside user already
    assert cpu_seconds(str(tmp_path / "missing")) is None
    # others' share: the busy time this process did not spend, of all the time the CPUs had
    assert busy_share(CpuSeconds(10, 100, 2), CpuSeconds(16, 120, 5)) == pytest.approx(3 / 20)
    assert busy_share(CpuSeconds(10, 100, 2), CpuSeconds(14, 120, 6)) == 0.0
    assert busy_share(None, CpuSeconds(14, 120, 6)) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_latency_measured_beside_busy_processes_says_so(files):
    """Other processes spinning on every CPU while two models are timed: the measurement reports
    the share of the CPUs they took, above the line past which it is called unreliable."""
    from onnxprune.latency import BUSY_SHARE, measure

    model = onnx.load(files / "m.onnx")
    feed = {model.graph.input[0].name: np.load(files / "x.npy")[:1]}
    spin = "import time\nend = time.time() + 60\nwhile time.time() < end: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.3)
        timed = measure([model, onnx.load(files / "p.onnx")], feed, seconds=0.3)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert timed[0].busy is not None and timed[0].busy > BUSY_SHARE
    assert timed[0].busy == timed[1].busy


def test_a_latency_measured_on_a_busy_machine_is_called_unreliable(files, capsys, monkeypatch, tmp_path):
    """Where other processes took the CPUs while the models were timed, the report's latency line,
    the slower-than-the-original warning, bench and gate's --min-speedup say the figure is
    unreliable and how to re-measure, instead of blaming the model; the measurement was repeated."""
    from onnxprune import latency, summary

    calls = []
    monkeypatch.setattr(latency, "busy_share", lambda before, after: calls.append(1) or 0.45)
    monkeypatch.setattr(latency, "MIN_TIMED_SECONDS", 0.05)
    out = tmp_path / "busy.onnx"
    assert main([str(files / "m.onnx"), "--calib", str(files / "x.npy"), "-o", str(out), "--speedup", "1.5",
                 "--round-to", "1", "--report", str(tmp_path / "r.json")]) == 0
    check_pruned(onnx.load(out), onnx.load(files / "m.onnx"), np.load(files / "x.npy")[:16], max_rel_err=1.0)
    captured = capsys.readouterr()
    [line] = [ln for ln in captured.out.splitlines() if ln.startswith("latency")]
    assert "unreliable: other processes took 45% of the CPUs meanwhile" in line and "onnxprune bench" in line
    assert len(calls) == 2  # measured again, as busy
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["latency_busy"] == pytest.approx(0.45)
    assert main(["bench", str(files / "m.onnx"), str(out), "--repeats", "3"]) == 0
    assert "batch 1: unreliable: other processes took 45%" in capsys.readouterr().err
    assert main(["gate", str(out), "--reference", str(files / "m.onnx"), "--calib", str(files / "x.npy"),
                 "--min-speedup", "0.01"]) == 0
    assert "latency speedup unreliable: other processes took 45%" in capsys.readouterr().err
    # a busy machine's slow reading is not blamed on the model's widths
    monkeypatch.setattr(summary, "measure", lambda models, feed, provider: [
        latency.Latency(1.0, 1.0, 1.0, 3, 0.45), latency.Latency(2.0, 2.0, 2.0, 3, 0.45)])
    assert main([str(files / "m.onnx"), "--calib", str(files / "x.npy"), "-o", str(out), "--speedup", "1.5",
                 "--round-to", "1", "--force"]) == 0
    check_pruned(onnx.load(out), onnx.load(files / "m.onnx"), np.load(files / "x.npy")[:16], max_rel_err=1.0)
    [warning] = [ln for ln in capsys.readouterr().err.splitlines() if "slower than the original" in ln]
    assert "measured 0.50x" in warning and "unreliable: other processes took 45%" in warning
    assert "channel blocks" not in warning


def test_the_latency_search_warns_once_that_it_measured_on_a_busy_machine(vgg, monkeypatch, caplog):
    """--latency decides on its measurements: measured beside busy processes, it says so once."""
    import onnxprune.latency_cost as latency_cost
    from onnxprune import latency

    monkeypatch.setattr(latency, "busy_share", lambda before, after: 0.45)
    monkeypatch.setattr(latency, "MIN_TIMED_SECONDS", 0.05)
    # per-layer timings from weight counts: the trials' measurements are what is tested
    monkeypatch.setattr(latency_cost, "_timed", lambda model, x, provider: 1e-4 * sum(
        int(np.prod(t.dims)) for t in model.graph.initializer))
    model, x = vgg
    with caplog.at_level("WARNING", logger="onnxprune"):
        try:
            result = onnxprune.prune(model, x, latency=1.2, allocation="uniform",
                                     measure_latency=False)
            check_pruned(result.model, model, x[:16], max_rel_err=1.0)
        except TargetNotMetError:
            pass  # timing on a busy machine: the warning is what is checked
    busy = [r.getMessage() for r in caplog.records if "latency search measured a trial" in r.getMessage()]
    assert len(busy) == 1 and "unreliable: other processes took 45% of the CPUs" in busy[0]


def test_models_are_compared_on_their_runs_nothing_interrupted():
    """The speedup is the ratio of the 10th percentiles: interruptions that raise one model's
    median (and not its fastest runs) leave it where it is; measure() gives all three figures."""
    from onnxprune.latency import Latency, measure, speedup

    quiet = speedup(Latency(10.4, 11.0, 10.0, 40), Latency(5.2, 5.5, 5.0, 40))
    interrupted = speedup(Latency(10.4, 11.0, 10.0, 40), Latency(9.8, 14.0, 5.0, 40))
    assert quiet == interrupted == pytest.approx(2.0)
    model = tiny_resnet()
    [timed] = measure([model], {model.graph.input[0].name: calib_for(model, 1)}, seconds=0.05)
    assert 0 < timed.ms <= timed.median_ms <= timed.p90_ms and timed.runs >= 30
