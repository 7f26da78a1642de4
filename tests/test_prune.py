"""The pipeline end to end on tiny graphs: validity, exactness, the target, reconstruction."""

import numpy as np
import pytest
from conftest import check_pruned, run
from graphs import Builder, calib_for, tiny_resnet, tiny_vgg

import onnxprune
from onnxprune.errors import OptionError, TargetNotMetError
from onnxprune.options import PruneOptions


@pytest.mark.parametrize("build", [tiny_vgg, tiny_resnet])
def test_keeping_every_channel_reproduces_outputs(build):
    model = build()
    x = calib_for(model, 40)
    result = onnxprune.prune(model, x, speedup=1.0, measure_latency=False)
    check_pruned(result.model, model, x, max_rel_err=1e-5)
    assert np.abs(run(result.model, x)[0] - run(model, x)[0]).max() <= 1e-4


@pytest.mark.parametrize("build", [tiny_vgg, tiny_resnet])
@pytest.mark.parametrize("speedup", [1.5, 2.0, 3.0])
def test_speedup_target_is_met_and_model_is_valid(build, speedup):
    model = build()
    x = calib_for(model, 120)
    result = onnxprune.prune(model, x, speedup=speedup, measure_latency=False)
    achieved = result.report.totals.macs_speedup
    assert speedup <= achieved <= speedup * 1.3
    check_pruned(result.model, model, x, max_rel_err=0.6)


@pytest.mark.parametrize("build", [tiny_vgg, tiny_resnet])
def test_reconstruction_beats_plain_slicing(build):
    model = build()
    x = calib_for(model, 800)
    held = calib_for(model, 100, seed=7)
    errs = {}
    for rec in (True, False):
        result = onnxprune.prune(model, x, speedup=2.0, method="l1", reconstruct=rec, measure_latency=False)
        errs[rec] = check_pruned(result.model, model, held, max_rel_err=10)
    assert errs[True] < 0.8 * errs[False]


def test_reconstruction_lowers_each_layer_error():
    model = tiny_vgg()
    result = onnxprune.prune(model, calib_for(model, 200), speedup=2.0, measure_latency=False)
    for grp in result.report.groups:
        assert grp.error_after_refit <= grp.error_before_refit + 1e-9


def test_residual_target_is_used_for_branch_final_convs():
    model = tiny_resnet()
    result = onnxprune.prune(model, calib_for(model, 100), speedup=2.0, measure_latency=False)
    assert result.report.groups and all(grp.residual_target for grp in result.report.groups)


def test_same_seed_same_bytes():
    model = tiny_resnet()
    x = calib_for(model, 80)
    a = onnxprune.prune(model, x, speedup=2.0, seed=3, measure_latency=False).model.SerializeToString()
    b = onnxprune.prune(model, x, speedup=2.0, seed=3, measure_latency=False).model.SerializeToString()
    assert a == b


def test_dynamic_batch_and_spatial_dims_stay_dynamic():
    b = Builder(in_shape=("N", 3, "H", "W"))
    x = b.node("Relu", [b.conv("input", 3, 8)])
    x = b.node("Relu", [b.conv(x, 8, 8)])
    model = b.build(b.conv(x, 8, 4))
    xs = calib_for(onnxprune_static(model), 60)
    result = onnxprune.prune(model, xs, speedup=1.5, measure_latency=False)
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["N", "", "H", "W"]
    big = np.random.default_rng(0).normal(size=(2, 3, 13, 17)).astype(np.float32)
    assert run(result.model, big)[0].shape == (2, 4, 13, 17)


def onnxprune_static(model):
    m = type(model)()
    m.CopyFrom(model)
    for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim[2:], (8, 8)):
        d.dim_value = v
    return m


def test_unreachable_speedup_is_a_target_error():
    model = tiny_resnet()
    with pytest.raises(TargetNotMetError, match="cannot be reached"):
        onnxprune.prune(model, calib_for(model, 40), speedup=50.0, measure_latency=False)


def test_data_free_l1_runs_without_calibration():
    model = tiny_vgg()
    result = onnxprune.prune(model, None, speedup=2.0, method="l1", reconstruct=False, measure_latency=False)
    check_pruned(result.model, model, calib_for(model, 8), max_rel_err=10)


@pytest.mark.parametrize("opts,msg", [({"method": "magic"}, "unknown method"), ({"speedup": 0.5}, "speedup"),
                                      ({"holdout": 1.0}, "holdout"), ({"bogus": 1}, "unknown option")])
def test_bad_options_are_rejected_up_front(opts, msg):
    with pytest.raises(OptionError, match=msg):
        onnxprune.prune(tiny_vgg(), calib_for(tiny_vgg(), 8), **opts)


def test_reconstruction_needs_data():
    with pytest.raises(OptionError, match="calibration data"):
        onnxprune.prune(tiny_vgg(), None, speedup=2.0)


def test_coupled_residual_channels_can_be_pruned_together():
    model = tiny_resnet()
    x = calib_for(model, 200)
    # one keep ratio for all: the sensitivity allocation may leave the coupled groups whole
    result = onnxprune.prune(model, x, speedup=2.0, prune_coupled=True, allocation="uniform", measure_latency=False)
    coupled = [grp for grp in result.report.groups if "+" in grp.name]
    assert coupled and all(grp.channels_after < grp.channels_before for grp in coupled)
    check_pruned(result.model, model, calib_for(model, 40, seed=5), max_rel_err=0.5)


@pytest.mark.parametrize("build", [tiny_vgg, tiny_resnet])
def test_sensitivity_allocation_meets_the_target(build):
    model = build()
    x = calib_for(model, 150)
    result = onnxprune.prune(model, x, speedup=1.8, allocation="sensitivity", measure_latency=False)
    assert result.report.totals.macs_speedup >= 1.8
    check_pruned(result.model, model, x[:20], max_rel_err=1.0)


def test_sensitivity_curves_are_the_output_error_at_each_probe_width():
    """At each probe width, a group's scaled curve is the model's output error with that group
    alone pruned there (its consumers refit), not a milder cut's scale carried over."""
    from dataclasses import replace

    from onnxprune.allocation import Plan
    from onnxprune.pipeline import Pruner
    from onnxprune.sensitivity import GRID, PROBES

    model = tiny_vgg()
    x = calib_for(model, 40)  # at most 64 fit samples with their mixtures: the probes run on all of them
    pruner = Pruner(model, x, PruneOptions(speedup=1.5, measure_latency=False))
    pruner.allocate()
    fit = pruner.cal.take(pruner.fit_idx)["input"]
    reference = run(model, fit)[0]
    solo = replace(pruner.opts, refit_downstream=False, refine=False)
    # the last conv feeds Flatten → Gemm with more unknowns than images, whose cross-validated
    # refit differs from the probes' fixed-ridge one: the first two groups are compared
    for grp in pruner.candidates[:2]:
        errors = []
        for ratio in PROBES:
            widths = {u.index: u.channels for u in pruner.candidates} | {grp.index: round(ratio * grp.channels)}
            pruned = pruner.prune(Plan(widths, 1), solo).model
            check_pruned(pruned, model, fit, max_rel_err=1.0)
            out = run(pruned, fit)[0]
            errors.append(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        curve = pruner.allocator.curves[grp.index]
        np.testing.assert_allclose([curve[GRID.index(r)] for r in PROBES], errors, rtol=0.02)


def test_a_group_feeding_more_unknowns_than_images_is_not_read_as_free():
    """tiny_vgg's last conv feeds Flatten → Gemm (257 unknowns per output, 38 fit images): a probe
    measured on the images that Gemm's refit reproduces would read a cut there as nearly free. Each
    group's scaled curve at half width is near the output error on images the pruning never saw."""
    from dataclasses import replace

    from onnxprune.allocation import Plan
    from onnxprune.pipeline import Pruner
    from onnxprune.sensitivity import GRID

    model = tiny_vgg()
    pruner = Pruner(model, calib_for(model, 48), PruneOptions(speedup=1.5, measure_latency=False))
    pruner.allocate()
    fresh = calib_for(model, 200, seed=7)
    reference = run(model, fresh)[0]
    solo = replace(pruner.opts, refit_downstream=False, refine=False)
    for grp in pruner.candidates:
        widths = {u.index: u.channels for u in pruner.candidates} | {grp.index: grp.channels // 2}
        pruned = pruner.prune(Plan(widths, 1), solo).model
        check_pruned(pruned, model, fresh, max_rel_err=1.0)
        unseen = np.linalg.norm(run(pruned, fresh)[0] - reference) / np.linalg.norm(reference)
        assert 0.5 * unseen < pruner.allocator.curves[grp.index][GRID.index(0.5)] < 2 * unseen


def test_allocate_prefers_the_group_that_loses_least():
    from onnxprune.budget import CostEntry, CostModel, Targets
    from onnxprune.graph import ChannelGroup
    from onnxprune.allocation import allocate
    from onnxprune.sensitivity import GRID

    cost = CostModel([CostEntry("a", "Conv", 100, (0,)), CostEntry("b", "Conv", 100, (1,))],
                     {0: 10, 1: 10}, {0: [(0, 10)], 1: [(1, 10)]})
    units = [ChannelGroup(0, 10, ["a"]), ChannelGroup(1, 10, ["b"])]
    curves = {0: [1.0 - r for r in GRID], 1: [10 * (1.0 - r) for r in GRID]}  # b is 10x more sensitive
    widths = allocate(cost, units, curves, Targets(speedup=1.5))
    assert widths[0] < widths[1]
    assert 200 / cost.macs(widths) >= 1.5


def test_allocation_search_finds_what_the_greedy_descent_misses():
    """A curve with one costly first step and free steps after it: the greedy descent, which
    only looks one step ahead, cuts the other group all the way; the search cuts this one."""
    from onnxprune.allocation import allocate
    from onnxprune.budget import CostEntry, CostModel, Targets
    from onnxprune.graph import ChannelGroup
    from onnxprune.sensitivity import GRID

    cost = CostModel([CostEntry("a", "Conv", 100, (0,)), CostEntry("b", "Conv", 100, (1,))],
                     {0: 10, 1: 10}, {0: [(0, 10)], 1: [(1, 10)]})
    units = [ChannelGroup(0, 10, ["a"]), ChannelGroup(1, 10, ["b"])]
    curves = {0: [0.5 if r < 1 else 0.0 for r in GRID], 1: [1.0 - r for r in GRID]}
    targets = Targets(speedup=2)

    def summed(widths):  # the allocation's objective: summed squared error
        return sum(curves[i][GRID.index(round(widths[i] / 10, 1))] ** 2 for i in widths)

    greedy = allocate(cost, units, curves, targets, search=False)
    searched = allocate(cost, units, curves, targets)
    assert greedy == {0: 9, 1: 1}  # 0.25 + 0.81
    assert searched == {0: 1, 1: 9}  # 0.25 + 0.01
    assert summed(searched) < summed(greedy)
    assert all(200 / cost.macs(w) >= 2 - 1e-9 for w in (greedy, searched))


def test_allocation_spreads_cuts_whose_errors_add_in_quadrature():
    """Two groups alike, error linear in the channels removed: one deep cut and two half cuts have
    the same summed error, but output errors of groups pruned together add in quadrature, so the
    two half cuts (0.25 + 0.25 against 0.81 + 0.01 squared) are the plan."""
    from onnxprune.allocation import allocate
    from onnxprune.budget import CostEntry, CostModel, Targets
    from onnxprune.graph import ChannelGroup
    from onnxprune.sensitivity import GRID

    cost = CostModel([CostEntry("a", "Conv", 100, (0,)), CostEntry("b", "Conv", 100, (1,))],
                     {0: 10, 1: 10}, {0: [(0, 10)], 1: [(1, 10)]})
    units = [ChannelGroup(0, 10, ["a"]), ChannelGroup(1, 10, ["b"])]
    curves = {i: [1.0 - r for r in GRID] for i in (0, 1)}
    for search in (False, True):
        assert allocate(cost, units, curves, Targets(speedup=2), search=search) == {0: 5, 1: 5}


def test_round_to_keeps_multiples():
    from graphs import random_cnn

    model = random_cnn(["conv", "conv"], [32, 32, 2, 2, 2], head="gap")
    x = calib_for(model, 60)
    result = onnxprune.prune(model, x, speedup=1.5, round_to=8, measure_latency=False)
    assert result.report.groups
    assert all(grp.channels_after % 8 == 0 for grp in result.report.groups if grp.channels_before > 8)
    check_pruned(result.model, model, x[:10], max_rel_err=1.0)


def test_round_width_halves_the_multiple_for_narrow_groups():
    from onnxprune.budget import round_width
    from onnxprune.latency import default_round_to

    assert default_round_to("cpu") == 16 and default_round_to("cuda") == default_round_to("tensorrt") == 8
    assert round_width(64, 0.3, 16) == 32  # 19 rounded up to 32
    assert round_width(16, 0.4, 16) == 8  # a 16-wide group keeps 8 or 16, never 6
    assert round_width(12, 0.4, 16) == 8
    assert round_width(48, 0.5, 16, granule=3) == 24  # lcm(16, 3) = 48 is the whole group: conv groups only
    assert round_width(5, 0.4, 16) == 4  # multiple 16 -> 8 -> 4


def test_target_lost_to_rounding_says_so():
    """A target only rounding to --round-to makes unreachable names the rounding as the cause."""
    model = tiny_vgg()
    x = calib_for(model, 64)
    with pytest.raises(TargetNotMetError, match="with kept channels not rounded it can be reached: try --round-to 1"):
        onnxprune.prune(model, x, speedup=8, round_to=8, allocation="uniform", measure_latency=False)
    result = onnxprune.prune(model, x, speedup=8, round_to=1, allocation="uniform", measure_latency=False)
    assert result.report.totals.macs_speedup >= 8
    check_pruned(result.model, model, x[:10], max_rel_err=2.0)


def test_a_rounded_plan_far_past_a_mild_target_says_so(caplog):
    """Rounding to 16 channels can only cut a narrow net in large steps: asked 1.05x, the plan
    cuts far more, and a warning names the rounding and --round-to 1; unrounded, it keeps close."""
    model = tiny_vgg()
    x = calib_for(model, 64)
    with caplog.at_level("WARNING", logger="onnxprune"):
        rounded = onnxprune.prune(model, x, speedup=1.05, round_to=16, allocation="uniform", measure_latency=False)
    assert rounded.report.totals.macs_speedup > 1.05 * 1.2
    assert any("rounded to multiples of 16 the plan cuts MACs" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="onnxprune"):
        exact = onnxprune.prune(model, x, speedup=1.05, round_to=1, allocation="uniform", measure_latency=False)
    assert exact.report.totals.macs_speedup < 1.05 * 1.2
    assert not any("the plan cuts MACs" in r.getMessage() for r in caplog.records)
    check_pruned(rounded.model, model, x[:10], max_rel_err=2.0)
    check_pruned(exact.model, model, x[:10], max_rel_err=2.0)


def test_no_group_is_cut_below_half_its_uniform_width():
    """A curve that makes one group look free (few calibration images) does not let the allocation
    cut it 10x: it keeps at least half the width one uniform ratio would give it."""
    from onnxprune.allocation import MAX_SQUEEZE, Allocator
    from onnxprune.budget import CostEntry, CostModel, Targets, uniform_widths
    from onnxprune.graph import ChannelGroup
    from onnxprune.allocation import allocate
    from onnxprune.sensitivity import GRID

    cost = CostModel([CostEntry("a", "Conv", 100, (0,)), CostEntry("b", "Conv", 100, (1,))],
                     {0: 10, 1: 10}, {0: [(0, 10)], 1: [(1, 10)]})
    units = [ChannelGroup(0, 10, ["a"]), ChannelGroup(1, 10, ["b"])]
    curves = {0: [0.0 for _ in GRID], 1: [10 * (1.0 - r) for r in GRID]}  # a looks free to cut
    targets = Targets(speedup=1.9)
    uniform = uniform_widths(cost, units, targets)
    assert allocate(cost, units, curves, targets)[0] < uniform[0] / MAX_SQUEEZE  # unbounded: a is cut deep
    widths = Allocator(cost, units, curves).widths(targets, 1)
    assert widths[0] >= uniform[0] / MAX_SQUEEZE and widths[0] < widths[1]
    assert 200 / cost.macs(widths) >= 1.9


def test_held_out_check_leaves_out_integer_and_data_sized_outputs():
    """A detector with its NMS built in returns indices (integers) and boxes whose count depends on
    the data: they cannot be compared element by element, so verification leaves them out instead
    of failing, and judges the outputs it can compare."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.calib import load_calibration
    from onnxprune.verify import compare, guard_loss

    def model(keep: int):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
        outs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4]),
                helper.make_tensor_value_info("kept", TensorProto.FLOAT, ["N", None]),
                helper.make_tensor_value_info("index", TensorProto.INT64, ["N", 1])]
        starts, ends, axes = (numpy_helper.from_array(np.array([v], np.int64), n)
                              for v, n in ((0, "s"), (keep, "e"), (1, "a")))
        nodes = [helper.make_node("Identity", ["x"], ["scores"]),
                 helper.make_node("Slice", ["x", "s", "e", "a"], ["kept"]),
                 helper.make_node("ArgMax", ["x"], ["index"], axis=1)]
        return helper.make_model(helper.make_graph(nodes, "m", [x], outs, [starts, ends, axes]),
                                 opset_imports=[helper.make_opsetid("", 13)])

    data = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    cal = load_calibration(data, model(3))
    fidelity = compare(model(3), model(2), cal, np.arange(6))
    assert [f.name for f in fidelity] == ["scores"] and fidelity[0].relative_error == 0.0
    assert guard_loss([]) == 0.0


def test_output_probes_run_on_fewer_images_where_inputs_or_outputs_are_large():
    """64 probe images up to 3 x 224 x 224 input values per sample, fewer above (a 640 x 640
    detector: 8), never fewer than 8; and as many values in the outputs they compare (a CTC
    recogniser's scores over 6 625 characters at 40 steps: 36 images; over 18 710 at 160: 8); and
    the MACs of 64 ResNet-50 images where the outputs compared hold 64 000 values without them,
    all of a run's probes together those of 64 such probes."""
    from onnxprune.sensitivity import probe_images

    model = tiny_vgg()
    name, out = model.graph.input[0].name, model.graph.output[0].name
    assert [probe_images(model, {name: shape}) for shape in
            ((1, 1, 28, 28), (1, 3, 224, 224), (1, 3, 416, 416), (1, 3, 640, 640), (1, 3, 2048, 2048))] == [64, 64, 18, 8, 8]
    assert [probe_images(model, {name: (1, 3, 48, 320), out: shape}) for shape in
            ((1, 10), (1, 40, 6625), (1, 160, 18710))] == [64, 36, 8]
    # and by cost, where the outputs are large enough: a 26 G-MAC image enhancer whose every pixel is
    # an output (PairLIE at 240 x 320) runs 10; a 15.5 G-MAC classifier's 1 000 logits still need 64
    enhancer = {name: (1, 3, 240, 320), out: (1, 3, 240, 320)}
    assert [probe_images(model, enhancer, macs) for macs in (0, 4_100_000_000, 26_000_000_000)] == [41, 41, 10]
    assert probe_images(model, {name: (1, 3, 224, 224), out: (1, 1000)}, 15_500_000_000) == 64
    # and all probes together by the cost of 64: an enhancer with over a hundred groups (AGLLNet at
    # 256 x 256, 18.7 G MACs, 226 probes) runs the fewest, a classifier still all 64
    agllnet = {name: (1, 3, 256, 256), out: (1, 256, 256, 10)}
    assert [probe_images(model, agllnet, 18_700_000_000, probes) for probes in (1, 64, 226)] == [14, 14, 8]
    assert probe_images(model, {name: (1, 3, 224, 224), out: (1, 1000)}, 15_500_000_000, 300) == 64


def test_probability_maps_are_judged_by_the_regions_they_mark():
    """A Sigmoid output (a text detector's probability map, a mask) is judged by the IoU of the
    elements above 0.5 in the pruned and original maps, not by its relative error, which counts
    every edge that moves: a map whose region grows a little passes the safety net however large
    that error, one that loses most of it does not. Layout ops after the Sigmoid keep it a map."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.calib import load_calibration
    from onnxprune.verify import (MIN_MARKED, MIN_SPARSE_MARKS, POOR_MARKED_IOU, POOR_RELATIVE_ERROR, compare,
                                  guard_loss, poor_fidelity, probability_outputs)

    def model(shift: float):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                for n in ("prob", "moved", "mixed", "raw", "fixed")]
        inits = [numpy_helper.from_array(np.array(shift, np.float32), "shift"),
                 numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
                 numpy_helper.from_array(np.full((1, 1, 8, 8), 0.5, np.float32), "half")]
        nodes = [helper.make_node("Add", ["x", "shift"], ["z"]),
                 helper.make_node("Sigmoid", ["z"], ["prob"]),
                 helper.make_node("Transpose", ["prob"], ["t"], perm=[0, 1, 3, 2]),
                 helper.make_node("Reshape", ["t", "shape"], ["moved"]),
                 helper.make_node("Concat", ["prob", "z"], ["mixed"], axis=1),
                 helper.make_node("Relu", ["z"], ["raw"]),
                 helper.make_node("Concat", ["half", "half"], ["fixed"], axis=1)]  # constants only
        return helper.make_model(helper.make_graph(nodes, "m", [x], outs, inits),
                                 opset_imports=[helper.make_opsetid("", 13)])

    assert probability_outputs(model(0.0)) == {"prob": None, "moved": None}
    data = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    cal = load_calibration(data, model(0.0))

    def judged(shift: float, base: float = 0.0):
        fid = {f.name: f for f in compare(model(base), model(base + shift), cal, np.arange(16))}
        return fid["prob"], fid["moved"]

    grown, moved = judged(1.0)  # every marked element stays marked, and the region grows
    expected = np.count_nonzero(data > 0) / np.count_nonzero(data > -1.0)
    assert grown.marked_iou == pytest.approx(expected) and moved.marked_iou == pytest.approx(expected)
    assert grown.top1_agreement is None and grown.relative_error > POOR_RELATIVE_ERROR
    assert grown.marked_iou >= POOR_MARKED_IOU and poor_fidelity([grown]) == ""
    assert guard_loss([grown]) == pytest.approx(1 - expected)
    lost, _ = judged(-2.0)  # most of the region is gone
    assert lost.marked_iou < POOR_MARKED_IOU and "IoU" in poor_fidelity([lost])
    # the original marks nothing: judged by the relative error of its logits (the Sigmoid's input),
    # not of its near-zero probabilities, which fall by 40 % where the logits move by 0.5 of ~10
    none, _ = judged(-0.5, base=-10.0)
    expected = 0.5 / np.sqrt(np.mean((data.astype(np.float64) - 10) ** 2))
    assert none.marked_iou is None and none.logit_error == pytest.approx(expected, rel=0.01)
    assert none.relative_error > POOR_RELATIVE_ERROR > none.logit_error
    assert guard_loss([none]) == none.logit_error and poor_fidelity([none]) == ""
    few, _ = judged(3.0, base=-2.5)  # it marks a few elements (< MIN_MARKED): too few for an IoU alone
    assert np.count_nonzero(data > 2.5) < MIN_MARKED and few.marked_iou is None
    assert few.logit_error > POOR_RELATIVE_ERROR and guard_loss([few]) == few.logit_error
    assert "IoU 0.00 over the" in poor_fidelity([few])  # hundreds of elements marked that the original does not
    # a few marks (MIN_SPARSE_MARKS or more, fewer than MIN_MARKED) on a strongly negative background, all
    # lost while the background holds: the logits' error is the background's, the IoU's upper
    # confidence bound shows the loss
    def sparse(spikes: int):
        rng = np.random.default_rng(1)
        z = (rng.normal(size=(16, 1, 8, 8)) * 0.5 - 10.0).astype(np.float32)
        z.flat[rng.choice(z.size, spikes, replace=False)] = 1.0
        return load_calibration(z, model(0.0))

    def judged_sparse(shift: float, spikes: int):
        return {f.name: f for f in compare(model(0.0), model(shift), sparse(spikes), np.arange(16))}["prob"]

    gone = judged_sparse(-1.5, 20)
    assert MIN_SPARSE_MARKS <= 20 < MIN_MARKED
    assert gone.marked_iou is None and gone.sparse_iou == 0.0 and gone.sparse_marks == 20
    assert gone.logit_error < POOR_RELATIVE_ERROR and "the original's few marks" in poor_fidelity([gone])
    kept = judged_sparse(-0.3, 20)  # the same few marks, all kept
    assert kept.sparse_iou == 1.0 and poor_fidelity([kept]) == ""
    single = judged_sparse(-1.5, MIN_SPARSE_MARKS - 1)  # fewer: one object, which one borderline score decides
    assert single.sparse_iou == 0.0 and poor_fidelity([single]) == ""


def test_softmax_score_maps_are_judged_by_the_regions_their_classes_win():
    """A Softmax over the classes of a map with positions besides them (an SSD-style detector's
    ``[N, anchors, classes]`` scores, a recogniser's per-step characters) is a probability map too:
    judged by the IoU of the elements above 0.5, less the class that wins most of them (the
    background), which would make any two maps agree. A classifier's ``[N, K]`` keeps its top-1
    agreement; before opset 13 a Softmax over a middle axis normalises the axes after it as well,
    and is left to its relative error."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.calib import load_calibration
    from onnxprune.verify import MIN_MARKED, POOR_MARKED_IOU, compare, guard_loss, poor_fidelity, probability_outputs

    def model(shift: float, opset: int = 13):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 2])
        outs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 64, 2]),
                helper.make_tensor_value_info("classes", TensorProto.FLOAT, ["N", 2]),
                helper.make_tensor_value_info("middle", TensorProto.FLOAT, ["N", 64, 2])]
        inits = [numpy_helper.from_array(np.array([0.0, shift], np.float32), "shift"),
                 numpy_helper.from_array(np.array([0, 1], np.int64), "axes")]
        nodes = [helper.make_node("Add", ["x", "shift"], ["z"]),
                 helper.make_node("Softmax", ["z"], ["s"], axis=-1 if opset >= 13 else 2),
                 helper.make_node("Identity", ["s"], ["scores"]),  # as exporters leave it
                 helper.make_node("ReduceMean", ["z"], ["pooled"], axes=[1], keepdims=0),
                 helper.make_node("Softmax", ["pooled"], ["classes"], axis=1),
                 helper.make_node("Softmax", ["z"], ["middle"], axis=1)]
        return helper.make_model(helper.make_graph(nodes, "m", [x], outs, inits),
                                 opset_imports=[helper.make_opsetid("", opset)])

    assert probability_outputs(model(0.0)) == {"scores": 2, "classes": 1, "middle": 1}
    assert probability_outputs(model(0.0, opset=11)) == {"scores": 2, "classes": 1}
    rng = np.random.default_rng(0)
    data = rng.normal(size=(16, 64, 2)).astype(np.float32)
    data[..., 0] += 1.0  # the background wins most positions
    cal = load_calibration(data, model(0.0))
    fid = {f.name: f for f in compare(model(0.0), model(0.5), cal, np.arange(16))}
    margin = data[..., 1] - data[..., 0]  # class 1 wins where its logit is larger
    expected = np.count_nonzero(margin > 0) / np.count_nonzero(margin > -0.5)
    assert np.count_nonzero(margin > 0) >= MIN_MARKED
    assert fid["scores"].marked_iou == pytest.approx(expected) and fid["scores"].top1_agreement is None
    assert guard_loss([fid["scores"]]) == pytest.approx(1 - expected)
    assert fid["classes"].marked_iou is None and fid["classes"].top1_agreement is not None
    lost = {f.name: f for f in compare(model(0.0), model(-1.5), cal, np.arange(16))}["scores"]
    assert lost.marked_iou < POOR_MARKED_IOU and "IoU" in poor_fidelity([lost])
    old = {f.name: f for f in compare(model(0.0, 11), model(0.5, 11), cal, np.arange(16))}
    assert old["middle"].marked_iou is None and old["scores"].marked_iou == pytest.approx(expected)


def test_rows_that_are_not_samples_are_not_class_scores():
    """A detector exported at batch 1 that writes ``[anchors, 4 + 1 + classes]`` (YOLO-FastestV2)
    has a 2-D output whose rows are anchors, not samples: top-1 agreement across its rows would
    call a good model broken. Only an output with one row per sample is judged as class scores."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.calib import load_calibration
    from onnxprune.verify import compare, poor_fidelity

    def model(shift: float):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
        out = helper.make_tensor_value_info("rows", TensorProto.FLOAT, [64, 3])
        inits = [numpy_helper.from_array(np.array([0.0, shift, 0.0], np.float32).reshape(1, 3, 1, 1), "shift"),
                 numpy_helper.from_array(np.array([64, 3], np.int64), "shape")]
        nodes = [helper.make_node("Add", ["x", "shift"], ["z"]),
                 helper.make_node("Transpose", ["z"], ["t"], perm=[0, 2, 3, 1]),
                 helper.make_node("Reshape", ["t", "shape"], ["rows"])]
        return helper.make_model(helper.make_graph(nodes, "m", [x], [out], inits),
                                 opset_imports=[helper.make_opsetid("", 13)])

    data = np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32) * 10
    cal = load_calibration(data, model(0.0))
    (rows,) = compare(model(0.0), model(1.0), cal, np.arange(8))
    assert rows.top1_agreement is None and rows.relative_error < 0.3 and poor_fidelity([rows]) == ""


def test_anchor_scores_without_a_batch_axis_are_a_probability_map():
    """A plate detector (RetinaFace-style, exported at batch 1) writes ``conf [anchors, 2]``, a
    Softmax over background and plate: its rows are anchors, so it is judged as a probability map
    by the region its plate class marks, not by a relative error that the certain background keeps
    near zero while every plate is lost."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.calib import load_calibration
    from onnxprune.verify import POOR_RELATIVE_ERROR, compare, poor_fidelity

    def model(shift: float):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 32, 32])
        out = helper.make_tensor_value_info("conf", TensorProto.FLOAT, [1024, 2])
        inits = [numpy_helper.from_array(np.array([0.0, shift], np.float32).reshape(1, 2, 1, 1), "shift"),
                 numpy_helper.from_array(np.array([1024, 2], np.int64), "shape")]
        nodes = [helper.make_node("Add", ["x", "shift"], ["z"]),
                 helper.make_node("Transpose", ["z"], ["t"], perm=[0, 2, 3, 1]),
                 helper.make_node("Reshape", ["t", "shape"], ["rows"]),
                 helper.make_node("Softmax", ["rows"], ["conf"], axis=1)]
        return helper.make_model(helper.make_graph(nodes, "m", [x], [out], inits),
                                 opset_imports=[helper.make_opsetid("", 13)])

    data = np.random.default_rng(0).normal(size=(16, 2, 32, 32)).astype(np.float32)
    data[:, 0] += 3.0  # the background wins almost every anchor
    cal = load_calibration(data, model(0.0))
    (kept,) = compare(model(0.0), model(0.1), cal, np.arange(16))
    (lost,) = compare(model(0.0), model(-4.0), cal, np.arange(16))
    assert kept.marked_iou > 0.8 and kept.top1_agreement is None and poor_fidelity([kept]) == ""
    assert lost.relative_error < POOR_RELATIVE_ERROR and lost.marked_iou < 0.1 and "IoU" in poor_fidelity([lost])


def test_an_output_a_concat_joins_is_judged_part_by_part():
    """A YOLO-style export joins box coordinates (in pixels), objectness and class scores into one
    output. Its relative error as a whole is the boxes' and stays small while every score is lost
    (YOLO-FastestV2 pruned 1.5× passed that way, finding a fifth of the original's objects): each
    part a Concat joins (through layout ops, nested joins split in turn) is checked on its own, and
    a constant part (anchors) is left out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.calib import load_calibration
    from onnxprune.verify import MAX_PARTS, POOR_RELATIVE_ERROR, checked_parts, compare, poor_fidelity

    rng = np.random.default_rng(0)
    w_box, w_score = rng.normal(size=(4, 3, 1, 1)), rng.normal(size=(2, 3, 1, 1))

    def model(score_bias: float):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
        out = helper.make_tensor_value_info("det", TensorProto.FLOAT, [64, 8])
        inits = [numpy_helper.from_array(w_box.astype(np.float32), "w_box"),
                 numpy_helper.from_array(w_score.astype(np.float32), "w_score"),
                 numpy_helper.from_array(np.full(2, score_bias, np.float32), "b_score"),
                 numpy_helper.from_array(np.array(100.0, np.float32), "stride"),
                 numpy_helper.from_array(np.array([64, 8], np.int64), "rows")]
        anchors = numpy_helper.from_array(np.full((1, 1, 8, 8), 50.0, np.float32))
        nodes = [helper.make_node("Conv", ["x", "w_box"], ["box_conv"]),
                 helper.make_node("Mul", ["box_conv", "stride"], ["boxes"]),
                 helper.make_node("Conv", ["x", "w_score", "b_score"], ["score_conv"]),
                 helper.make_node("Sigmoid", ["score_conv"], ["scores"]),
                 helper.make_node("Constant", [], ["anchors"], value=anchors),
                 helper.make_node("Concat", ["scores", "anchors"], ["scored"], axis=1),
                 helper.make_node("Concat", ["boxes", "scored", "anchors"], ["joined"], axis=1),
                 helper.make_node("Transpose", ["joined"], ["t"], perm=[0, 2, 3, 1]),
                 helper.make_node("Reshape", ["t", "rows"], ["det"])]
        return helper.make_model(helper.make_graph(nodes, "yolo", [x], [out], inits),
                                 opset_imports=[helper.make_opsetid("", 13)])

    original, lost = model(0.0), model(-8.0)  # every score near 0: no object left
    onnx.checker.check_model(original, full_check=True)
    assert checked_parts(original) == {"boxes": "det", "scores": "det"}
    data = rng.normal(size=(16, 3, 8, 8)).astype(np.float32)
    cal = load_calibration(data, original)
    fid = {f.name: f for f in compare(original, lost, cal, np.arange(16))}
    assert set(fid) == {"boxes", "scores"} and all(f.part_of == "det" and not f.graph_output for f in fid.values())
    assert fid["boxes"].relative_error == 0.0 and fid["scores"].marked_iou == 0.0

    whole_a, whole_b = (np.stack([run(m, data[i:i + 1])[0] for i in range(16)]).astype(np.float64)
                        for m in (original, lost))
    whole_error = np.linalg.norm(whole_b - whole_a) / np.linalg.norm(whole_a)
    assert whole_error < 0.05 * POOR_RELATIVE_ERROR  # the output as a whole looks fine
    assert poor_fidelity(list(fid.values())).startswith("part 'scores' of output 'det' marks a region")
    many = onnx.ModelProto()  # joined from more parts than a report should list: checked whole
    many.CopyFrom(original)
    relus = [helper.make_node("Relu", ["boxes"], [f"r{i}"]) for i in range(MAX_PARTS + 1)]
    many.graph.node.extend(relus + [helper.make_node("Concat", [f"r{i}" for i in range(MAX_PARTS + 1)], ["wide"],
                                                     axis=1)])
    many.graph.output.extend([helper.make_tensor_value_info("wide", TensorProto.FLOAT, None)])
    assert checked_parts(many) == {"boxes": "det", "scores": "det", "wide": ""}


def test_a_two_stage_detectors_box_head_on_picked_proposals_is_not_compared():
    """Faster R-CNN's box head runs on the proposals its first NMS kept: the pruned model keeps
    other proposals, so the head's rows are not the original's and are not compared. The check
    measures what its values come from: the proposals' box conv and score map, and the backbone
    map the proposals' features are gathered from."""
    import onnx
    from onnx import TensorProto, helper

    from onnxprune.verify import checked_tensors

    b = Builder(in_shape=(1, 3, 16, 16), opset=13)
    x = b.node("Relu", [b.conv("input", 3, 16)])
    feats = b.conv(x, 16, 8, k=1, pad=0)  # the map the head reads rows of
    box_conv, cls_conv = b.conv(x, 16, 4, k=1, pad=0), b.conv(x, 16, 1, k=1, pad=0)
    boxes = b.node("Transpose", [b.node("Reshape", [box_conv, b.const(np.array([1, 4, -1]))])], perm=[0, 2, 1])
    scores = b.node("Reshape", [b.node("Sigmoid", [cls_conv]), b.const(np.array([1, 1, -1]))])
    limits = [b.const(np.array([10])), b.const(np.array([0.5], np.float32)), b.const(np.array([0.0], np.float32))]
    kept = b.node("Gather", [b.node("NonMaxSuppression", [boxes, scores, *limits]), b.const(np.array(2))], axis=1)
    rows = b.node("Gather", [b.node("Reshape", [b.node("Transpose", [feats], perm=[0, 2, 3, 1]),
                                                 b.const(np.array([-1, 8]))]), kept], axis=0)
    head = b.gemm(rows, 8, 3)  # a box head on the kept rows
    model = helper.make_model(helper.make_graph(b.nodes, "two_stage", [b.input],
                                                [helper.make_tensor_value_info(head, TensorProto.FLOAT, [None, 3])],
                                                b.inits), opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    score_map = next(n.output[0] for n in b.nodes if n.op_type == "Sigmoid")
    assert checked_tensors(model) == [feats, box_conv, score_map]


def test_layers_with_many_unknowns_sample_more_positions_per_image():
    """Few images: each conv samples every position its map has (64 and 16 here), up to
    MIN_SAMPLES_PER_UNKNOWN per unknown; many images: the default 10 are enough."""
    from onnxprune.pipeline import Pruner
    from onnxprune.sampling import MIN_SAMPLES_PER_UNKNOWN

    model = tiny_vgg()
    counts = {}
    for images in (20, 40 * MIN_SAMPLES_PER_UNKNOWN):  # fit images alone: no mixtures
        sampler = Pruner(model, calib_for(model, images), PruneOptions(speedup=1.5, mixtures=0, progress=False)).sampler
        counts[images] = sorted(pos.shape[1] for pos in sampler.positions.values())
    assert counts[20] == [1, 16, 64]  # the Gemm after Flatten sees one row per image
    assert counts[40 * MIN_SAMPLES_PER_UNKNOWN] == [1, 10, 10]


def test_a_layer_too_wide_for_its_gram_matrix_keeps_fewer_samples(monkeypatch):
    """A layer whose ``XᵀX`` would not fit in memory (PAN's 7×7 conv over 576 channels: 28 224
    unknowns, 13 GB of statistics, killed for memory) draws only the positions whose samples fit
    the budget and keeps them instead; the model still prunes and runs. The budgets are shrunk here
    so that a tiny graph's 3×3 conv over 16 channels stands for it."""
    import onnxprune.sampling as sampling
    from onnxprune.pipeline import Pruner

    monkeypatch.setattr(sampling, "MAX_GRAM_BYTES", 16 * 145 * 150)  # the 3×3 conv: 145 unknowns, 8 outputs
    monkeypatch.setattr(sampling, "MAX_SAMPLE_BYTES", 4 * 40 * 153 * 3)  # three positions of 40 images
    assert sampling.affordable_positions(64, 40, 145, 8) == 3
    assert sampling.affordable_positions(64, 40, 20, 8) == 64  # a narrow layer keeps its count
    b = Builder(in_shape=("N", 3, 8, 8))
    x = b.node("Relu", [b.conv("input", 3, 16)])
    model = b.build(b.conv(x, 16, 8))
    data = calib_for(model, 50)
    pruner = Pruner(model, data, PruneOptions(speedup=1.5, mixtures=0, holdout=0.2, progress=False,
                                              measure_latency=False))
    wide = next(node.output[0] for node in model.graph.node if node.op_type == "Conv" and node.input[0] == x)
    assert pruner.sampler.counts[wide] == 3 and pruner.sampler.capped == {wide}
    result = pruner.run()
    check_pruned(result.model, model, data[:20], max_rel_err=1.0)
    # its thin refit is the memory's doing, not the data's: no "more images" warning counts it
    assert result.report.groups[0].samples_per_unknown is None


def test_mixtures_join_the_fit_samples_and_never_the_held_out_ones():
    """--mixtures R: R blends per fit sample are fit on; the held-out check reads real samples only."""
    from onnxprune.pipeline import Pruner

    model = tiny_vgg()
    x = calib_for(model, 40)
    pruner = Pruner(model, x, PruneOptions(speedup=1.5, mixtures=1.0, measure_latency=False))
    assert len(pruner.cal) == 72 and pruner.hold_idx.max() < 40 and (pruner.fit_idx >= 40).sum() == 32
    result = pruner.run()
    assert result.report.calibration["fit"] == 64 and result.report.calibration["mixtures"] == 32
    assert result.report.calibration["holdout"] == 8
    check_pruned(result.model, model, x, max_rel_err=0.5)
    with pytest.raises(OptionError, match="--mixtures must be >= 0"):
        onnxprune.prune(model, x, mixtures=-1, measure_latency=False)


def test_a_detector_with_its_nms_built_in_is_measured_on_its_head_layers():
    """A detector whose outputs are its built-in NMS's indices and a thresholded NonZero (integers,
    as many as the data keeps), or a segmentation net that outputs its arg-max class map: the
    probes and the held-out check measure the outputs of the last layers their values come from
    (the box conv; not the backbone conv whose shape the decoding reads), or the Sigmoid's score
    map the selection reads (judged as a probability map), instead of nothing, and the report
    names them as such."""
    import onnx
    from onnx import TensorProto, helper

    from onnxprune.verify import checked_tensors

    b = Builder(in_shape=("N", 3, 16, 16), opset=13)
    x = b.node("Relu", [b.conv("input", 3, 16)])
    x = b.node("Relu", [b.conv(x, 16, 32, stride=2)])
    x = b.node("Relu", [b.conv(x, 32, 32)])
    box_conv, cls_conv = b.conv(x, 32, 4, k=1, pad=0), b.conv(x, 32, 3, k=1, pad=0)
    boxes = b.node("Transpose", [b.node("Reshape", [box_conv, b.const(np.array([0, 4, -1]))])], perm=[0, 2, 1])
    boxes = b.node("Mul", [boxes, b.node("Cast", [b.node("Shape", [x])], to=TensorProto.FLOAT)])  # scaled by a shape
    scores = b.node("Reshape", [b.node("Sigmoid", [cls_conv]), b.const(np.array([0, 3, -1]))])
    limits = [b.const(np.array([10])), b.const(np.array([0.5], np.float32)), b.const(np.array([0.3], np.float32))]
    picked = b.node("NonMaxSuppression", [boxes, scores, *limits])
    confident = b.node("NonZero", [b.node("Greater", [scores, b.const(np.array(0.9, np.float32))])])
    classes = b.node("ArgMax", [scores], axis=1, keepdims=0)
    outputs = [helper.make_tensor_value_info(picked, TensorProto.INT64, [None, 3]),
               helper.make_tensor_value_info(confident, TensorProto.INT64, [3, None])]
    model = helper.make_model(helper.make_graph(b.nodes, "det", [b.input], outputs, b.inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    score_map = next(n.output[0] for n in b.nodes if n.op_type == "Sigmoid")
    assert checked_tensors(model) == [box_conv, score_map]
    segmenter = onnx.ModelProto()
    segmenter.CopyFrom(model)
    del segmenter.graph.output[:]
    segmenter.graph.output.extend([helper.make_tensor_value_info(classes, TensorProto.INT64, ["N", None])])
    assert checked_tensors(segmenter) == [score_map]

    x = np.random.default_rng(0).normal(size=(64, 3, 16, 16)).astype(np.float32)
    result = onnxprune.prune(model, x, speedup=1.3, measure_latency=False)
    assert [(f.name, f.graph_output) for f in result.report.fidelity] == [(box_conv, False), (score_map, False)]
    assert result.report.fidelity[1].logit_error is not None  # judged as a Sigmoid's map
    assert f"layer output '{box_conv}' (before the post-processing)" in result.report.table()
    assert result.report.totals.macs_speedup >= 1.3 * 0.97
    onnx.checker.check_model(result.model, full_check=True)
    # what the report measured, checked here too: both models with the head layers' outputs as outputs
    exposed = []
    for m in (model, result.model):
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        del m2.graph.output[:]
        m2.graph.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, [None] * 4) for t in (box_conv, score_map)])
        exposed.append(m2)
    check_pruned(exposed[1], exposed[0], x[:16], max_rel_err=1.0)
