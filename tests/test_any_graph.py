"""Issue 3 "any CNN graph": grouped convs, Slice on channels, the torch.chunk export, and the ops
that must stay barriers (Reshape, Transpose, custom domains)."""

import numpy as np
import onnx
import pytest
from conftest import check_pruned, run
from graphs import Builder, calib_for, chunk2, resnext_block
from onnx import TensorProto, helper, numpy_helper
from test_graph import analyse

import onnxprune
from onnxprune.activations import tensor_shapes
from onnxprune.arch import architecture
from onnxprune.calib import load_calibration
from onnxprune.graph import find_groups
from onnxprune.graphview import GraphView
from onnxprune.ops.shapes import fold_channel_ints
from onnxprune.rewrite import prune_group
from onnxprune.summary import grouped_convs_cut_inside


def analyse_at(model: onnx.ModelProto, shape=(1, 3, 8, 8)):
    """:func:`analyse` for models with dynamic spatial dims."""
    g = GraphView(model, tensor_shapes(model, load_calibration(np.zeros(shape, np.float32), model)))
    return g, find_groups(g)


def head(b: Builder, x: str, c: int) -> onnx.ModelProto:
    return b.build(b.gemm(b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1), c, 5))


def resnext(groups: int = 4, expand: int = 1) -> onnx.ModelProto:
    """Stem, two ResNeXt blocks (16 wide, ``groups`` conv groups; ``expand``: their grouped convs
    write that many times the channels they read), GAP, Gemm."""
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    x = resnext_block(b, resnext_block(b, x, 8, 16, groups, expand), 8, 16, groups, expand)
    return head(b, x, 8)


def grouped_conv_groups(groups):
    return [grp for grp in groups if grp.segments > 1 and grp.owner]


def grouped_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node
            if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]


def group_count(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "group")


def assert_equal_groups(model: onnx.ModelProto) -> None:
    """Every grouped conv's channels still split evenly into its groups."""
    g = GraphView(model)
    for node in g.nodes_by_type("Conv"):
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        w = g.const(node.input[1])
        assert w.shape[0] % group == 0


# ---------------------------------------------------------------- grouped conv
def test_grouped_conv_reading_as_many_channels_as_it_writes_loses_whole_groups():
    g, groups = analyse(resnext())
    whole = [grp for grp in groups if grp.owner and grp.conv_group > 1]
    assert len(whole) == 2 and all(grp.conv_group == 4 and grp.channels == 16 and grp.segments == 1 for grp in whole)
    for grp in whole:  # the 1×1 conv's output and the grouped conv's are one list of channels
        assert grp.prunable and [n.op_type for n in grp.producers] == ["Conv"]
        assert [group_count(n) for n in grp.throughs if n.op_type == "Conv"] == [4]
        assert [(c.node.op_type, group_count(c.node)) for c in grp.consumers] == [("Conv", 1)]


def test_grouped_conv_groups_are_cut_into_equal_segments():
    g, groups = analyse(resnext(expand=2))
    segmented = grouped_conv_groups(groups)
    assert sorted(grp.channels for grp in segmented) == [16, 16, 32, 32]
    assert all(grp.segments == 4 and grp.conv_group == 1 and grp.prunable for grp in segmented)
    into = [grp for grp in segmented if any(group_count(c.node) == 4 for c in grp.consumers
                                             if any(a.name == "group" for a in c.node.attribute))]
    assert len(into) == 2  # the 1×1 convs' outputs, read by the grouped convs
    out = [grp for grp in segmented if grp not in into]
    assert all(group_count(grp.producers[0]) == 4 for grp in out)


@pytest.mark.parametrize("method,reconstruct", [("l1", False), ("random", False), ("lasso", True), ("thinet", True),
                                                ("obs", True)])
def test_resnext_prunes_whole_conv_groups(method, reconstruct):
    model = resnext()
    x = calib_for(model, 80)
    result = onnxprune.prune(model, x, speedup=1.5, method=method, reconstruct=reconstruct, measure_latency=False)
    assert result.report.totals.macs_speedup >= 1.5
    for res in result.report.groups:
        assert res.channels_after % 4 == 0, (res.name, res.channels_after)
    g = GraphView(result.model)
    convs = grouped_convs(result.model)
    # every group keeps its 4 input and 4 output channels; some groups are gone
    assert all(g.const(n.input[1]).shape[1] == 4 and g.const(n.input[1]).shape[0] == 4 * group_count(n) for n in convs)
    assert sum(group_count(n) for n in convs) < 8
    assert grouped_convs_cut_inside(result.report.layers) == []
    # the architecture export says how many groups each grouped conv kept
    exported = {layer["node"]: layer for layer in architecture(result.report)["layers"] if "groups" in layer}
    pruned = {n.name: n for n in result.model.graph.node}
    assert {name: (layer["original_groups"], layer["groups"]) for name, layer in exported.items()} == \
        {n.name: (4, group_count(pruned[n.name])) for n in grouped_convs(model)}
    table = result.report.table()  # and so does the summary, on the grouped convs' rows
    assert all(f"groups 4->{group_count(pruned[n.name])}" in table
               for n in grouped_convs(model) if group_count(pruned[n.name]) < 4)
    check_pruned(result.model, model, x[:10], max_rel_err=1.0 if reconstruct else 10.0)
    if reconstruct:  # the 1×1 conv after the grouped conv reads the whole groups: it is refit
        assert not any("sampled" in why for _, why in result.report.skipped)


@pytest.mark.parametrize("method,reconstruct", [("l1", False), ("random", False), ("lasso", True), ("thinet", True)])
def test_widening_grouped_convs_are_pruned_keeping_groups_equal(method, reconstruct):
    """A grouped conv that writes twice the channels it reads is cut inside its groups, equally."""
    model = resnext(expand=2)
    x = calib_for(model, 80)
    result = onnxprune.prune(model, x, speedup=1.3, method=method, reconstruct=reconstruct, measure_latency=False)
    assert result.report.totals.macs_speedup >= 1.3
    for res in result.report.groups:
        assert res.channels_after % 4 == 0, (res.name, res.channels_after)
    assert_equal_groups(result.model)
    assert all(group_count(n) == 4 for n in grouped_convs(result.model))
    check_pruned(result.model, model, x[:10], max_rel_err=1.0 if reconstruct else 10.0)
    if method == "lasso":  # the 1×1 convs feeding a grouped conv have no sampleable consumer
        assert any("sampled" in why for _, why in result.report.skipped)


@pytest.mark.parametrize("method", ["obs", "lasso", "l1"])
def test_whole_conv_groups_are_chosen_by_what_they_contribute(method):
    model = resnext()
    x = calib_for(model, 80)
    convs = grouped_convs(model)
    inits = {t.name: t for t in model.graph.initializer}
    reader = {i: n for n in model.graph.node for i in n.input}
    producer = {n.output[0]: n for n in model.graph.node}
    # the 1×1 conv after the first grouped conv (past its ReLU) reads nothing of its third group:
    # that group goes
    after_conv = reader[reader[convs[0].output[0]].output[0]]
    w = numpy_helper.to_array(inits[after_conv.input[1]]).copy()
    w[:, 8:12] = 0
    inits[after_conv.input[1]].CopyFrom(numpy_helper.from_array(w, after_conv.input[1]))
    if method == "l1":  # l1 reads the producer's filters (the 1×1 conv before, past its ReLU): the third's weakest
        before_conv = producer[producer[convs[0].input[0]].input[0]]
        w1 = numpy_helper.to_array(inits[before_conv.input[1]]).copy()
        w1[8:12] *= 0.01
        inits[before_conv.input[1]].CopyFrom(numpy_helper.from_array(w1, before_conv.input[1]))
    before = numpy_helper.to_array(inits[convs[0].input[1]])
    result = onnxprune.prune(model, x, speedup=1.3, method=method, measure_latency=False, allocation="uniform",
                             reconstruct=method != "l1", refine=False)  # refined, the kept filters would move
    check_pruned(result.model, model, x[:10], max_rel_err=1.0 if method != "l1" else 10.0)
    conv = grouped_convs(result.model)[0]
    after = GraphView(result.model).const(conv.input[1])
    n = group_count(conv)
    kept = [i for i in range(4)
            if any(np.array_equal(before[4 * i:4 * i + 4], after[4 * j:4 * j + 4]) for j in range(n))]
    assert 1 < n < 4 and len(kept) == n and 2 not in kept


def test_chained_grouped_convs_lose_groups_of_both():
    """Groups of 4 then of 2 channels on one list of channels: runs of 4 go, whole groups of both."""
    b = Builder()
    x = b.node("Relu", [b.conv(b.node("Relu", [b.conv("input", 3, 8)]), 8, 16, k=1, pad=0)])
    x = b.node("Relu", [b.conv(b.node("Relu", [b.conv(x, 16, 16, group=4)]), 16, 16, group=8)])
    model = head(b, b.node("Relu", [b.conv(x, 16, 8, k=1, pad=0)]), 8)
    g, groups = analyse(model)
    assert [grp.conv_group for grp in groups if grp.owner and grp.channels == 16] == [4]
    x_cal = calib_for(model, 80)
    result = onnxprune.prune(model, x_cal, speedup=1.5, measure_latency=False)
    check_pruned(result.model, model, x_cal[:10], max_rel_err=1.0)
    fours, twos = grouped_convs(model)
    pruned = {n.name: n for n in result.model.graph.node}
    kept = GraphView(result.model).const(pruned[fours.name].input[1]).shape[0]
    assert kept < 16 and kept % 4 == 0
    assert (group_count(pruned[fours.name]), group_count(pruned[twos.name])) == (kept // 4, kept // 2)


def test_grouped_convs_cut_inside_their_groups_are_named():
    model = resnext(expand=2)
    x = calib_for(model, 80)
    result = onnxprune.prune(model, x, speedup=1.3, method="l1", reconstruct=False, measure_latency=False)
    check_pruned(result.model, model, x[:10], max_rel_err=10.0)
    grouped = [n.name for n in grouped_convs(result.model)]
    cut = grouped_convs_cut_inside(result.report.layers)
    assert cut and set(cut) <= set(grouped)
    rows = {row.node: row for row in result.report.layers}
    assert all(rows[name].in_channels[1] < rows[name].in_channels[0]
               or rows[name].out_channels[1] < rows[name].out_channels[0] for name in cut)
    untouched = onnxprune.prune(model, x, speedup=1.3, method="l1", reconstruct=False, measure_latency=False,
                                exclude=tuple(grouped))
    check_pruned(untouched.model, model, x[:10], max_rel_err=10.0)
    assert grouped_convs_cut_inside(untouched.report.layers) == []


def test_grouped_conv_keeps_the_channels_of_each_group():
    model = resnext(expand=2)
    g, groups = analyse(model)
    grp = grouped_conv_groups(groups)[0]  # first 1×1 conv's output, into the grouped conv
    conv = next(c.node for c in grp.consumers)
    before = g.const(conv.input[1]).copy()  # [32, 4, 3, 3]
    keep = np.array([0, 3, 5, 6, 8, 9, 13, 15])  # two of each four
    prune_group(g, grp, keep, grp.channels)
    after = g.const(conv.input[1])
    assert after.shape == (32, 2, 3, 3)
    np.testing.assert_array_equal(after[:8], before[:8][:, [0, 3]])
    np.testing.assert_array_equal(after[24:], before[24:][:, [1, 3]])
    with pytest.raises(ValueError, match="equally many"):
        prune_group(g, grp, np.array([0, 1, 2, 3, 4, 5]), 8)  # four from the first group, two from the second


def test_grouped_conv_loses_whole_groups_only():
    model = resnext()
    g, groups = analyse(model)
    grp = next(grp for grp in groups if grp.owner and grp.conv_group == 4)
    conv = next(n for n in grp.throughs if n.op_type == "Conv")
    before = g.const(conv.input[1]).copy()  # [16, 4, 3, 3]
    prune_group(g, grp, np.array([4, 5, 6, 7, 12, 13, 14, 15]), grp.channels)  # the second and fourth groups
    np.testing.assert_array_equal(g.const(conv.input[1]), before[[4, 5, 6, 7, 12, 13, 14, 15]])
    assert group_count(conv) == 2
    with pytest.raises(ValueError, match="whole groups"):
        prune_group(g, grp, np.array([1, 2, 3, 4]), 8)  # not aligned to the groups


def test_uneven_selection_is_balanced_per_group():
    from onnxprune.select import per_segment

    scores = np.array([9, 8, 7, 6, 1, 2, 3, 4], float)
    keep = per_segment(lambda run, n: np.argsort(-scores[run])[:n], 8, 2, 4)
    assert keep.tolist() == [0, 1, 6, 7]


def test_channel_multiplier_conv_input_is_not_prunable_but_output_is():
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 4)])
    y = b.node("Relu", [b.conv(x, 4, 8, group=4)])  # two filters per input channel
    model = b.build(b.conv(y, 8, 2, k=1, pad=0))
    g, groups = analyse(model)
    four = next(grp for grp in groups if grp.owner and grp.channels == 4)
    assert "one channel per group" in four.reason
    eight = next(grp for grp in groups if grp.owner and grp.channels == 8)
    assert eight.prunable and eight.segments == 4


def test_grouped_conv_after_concat_blocks_the_parts():
    b = Builder()
    xa = b.conv("input", 3, 4)
    xb = b.conv("input", 3, 4)
    y = b.conv(b.node("Concat", [xa, xb], axis=1), 8, 8, group=2)
    model = b.build(b.conv(y, 8, 2, k=1, pad=0))
    g, groups = analyse(model)
    parts = [grp for grp in groups if grp.owner and grp.channels == 4]
    assert len(parts) == 2 and all("grouped Conv reads them after Concat" in grp.reason for grp in parts)


def concat_residual(b: Builder) -> str:
    """M-LSD's decoder: ``Add(Relu(conv(cat)), cat)`` with ``cat = Concat(a, b)``: a residual join
    across a Concat."""
    xa = b.node("Relu", [b.conv("input", 3, 4)])
    xb = b.node("Relu", [b.conv("input", 3, 4)])
    cat = b.node("Concat", [xa, xb], axis=1)
    return b.node("Add", [b.node("Relu", [b.conv(cat, 8, 8)]), cat])


def test_a_concat_added_to_a_layers_output_is_a_residual_join_of_its_parts():
    """The parts keep their width by default, as residual joins do, and are pruned with
    ``prune_coupled``: the conv summed onto the Concat loses the same output channels."""
    b = Builder()
    model = b.build(b.conv(concat_residual(b), 8, 2, k=1, pad=0))
    g, groups = analyse(model)
    parts = [grp for grp in groups if grp.owner and grp.channels == 4]
    assert len(parts) == 2 and all(grp.prunable and grp.coupled for grp in parts)
    x = calib_for(model, n=64)
    result = onnxprune.prune(model, x, speedup=1.5, prune_coupled=True, measure_latency=False)
    widths = {r.name: r.channels_after for r in result.report.groups}
    assert min(widths.values()) < 4
    check_pruned(result.model, model, x, 0.6)


# ---------------------------------------------------------------- Slice
def slice_model(start: int, end: int, axis: int = 1, step: int | None = None) -> onnx.ModelProto:
    """conv 3→8, Slice, conv on the slice (+ a conv on the whole tensor, so both are consumed)."""
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    ins = [x, b.const(np.array([start], np.int64)), b.const(np.array([end], np.int64)),
           b.const(np.array([axis], np.int64))]
    if step is not None:
        ins.append(b.const(np.array([step], np.int64)))
    s = b.node("Slice", ins)
    cin = len(range(8)[start:end:step or 1]) if axis == 1 else 8
    return b.build(b.node("Add", [b.conv(s, cin, 4, k=1, pad=0), b.conv(x, 8, 4, k=1, pad=0)]) if axis == 1
                   else b.conv(s, 8, 4, k=1, pad=0))


@pytest.mark.parametrize("start,end", [(2, 7), (3, 2 ** 62), (-5, -1), (0, 8)])
def test_channel_slice_is_a_range_of_its_input(start, end):
    model = slice_model(start, end)
    g, groups = analyse(model)
    owner = next(grp for grp in groups if grp.owner and grp.channels == 8)
    assert owner.prunable and len(owner.sites) == 2
    part = next(s for s in owner.sites if s is not owner)
    lo = start % 8 if start < 0 else start
    assert part.derived_from.startswith("Slice") and part.atoms.tolist() == owner.atoms[lo:lo + part.channels].tolist()
    x = calib_for(model, 60)
    for method in ("lasso", "l1"):
        result = onnxprune.prune(model, x, speedup=1.4, method=method, measure_latency=False)
        assert [r.name for r in result.report.groups] == [owner.name]
        check_pruned(result.model, model, x[:10], max_rel_err=1.0)


def test_slice_bounds_are_rewritten_for_the_kept_channels():
    model = slice_model(2, 7)
    g, groups = analyse(model)
    owner = next(grp for grp in groups if grp.owner and grp.channels == 8)
    prune_group(g, owner, np.array([0, 1, 3, 4, 7]), 8)
    node = next(g.nodes_by_type("Slice"))
    assert (g.input_const(node, 1).tolist(), g.input_const(node, 2).tolist()) == ([2], [4])  # old 3 and 4


def test_slice_on_a_spatial_axis_passes_channels():
    g, groups = analyse(slice_model(1, 6, axis=2))
    grp = next(grp for grp in groups if grp.owner and grp.channels == 8)
    assert grp.prunable and any(n.op_type == "Slice" for n in grp.throughs)


def test_stepped_channel_slice_is_a_barrier():
    g, groups = analyse(slice_model(0, 8, step=2))
    grp = next(grp for grp in groups if grp.owner and grp.channels == 8)
    assert not grp.prunable and "Slice" in grp.reason


def test_channel_slice_with_spatial_bounds_is_a_barrier():
    """Bounds read from a spatial dim are dynamic: never folded, the Slice stays a barrier."""
    b = Builder(in_shape=("N", 3, "H", "W"))
    x = b.node("Relu", [b.conv("input", 3, 8)])
    h = b.node("Gather", [b.node("Shape", [x]), b.const(np.array([2], np.int64))], axis=0)
    s = b.node("Slice", [x, b.const(np.array([0], np.int64)), h, b.const(np.array([1], np.int64))])
    model = b.build(b.node("ReduceMean", [s], axes=[1]))
    g, groups = analyse_at(model)
    assert fold_channel_ints(g, h) is None
    grp = next(grp for grp in groups if grp.owner and grp.channels == 8)
    assert not grp.prunable


# ---------------------------------------------------------------- torch.chunk export
def chunk_model(opset: int = 13) -> onnx.ModelProto:
    """YOLOv8 C2f: conv → chunk(2) → conv on the second half → Concat(both halves, conv) → conv."""
    b = Builder(in_shape=("N", 3, "H", "W"), opset=opset)
    x = b.node("Relu", [b.conv("input", 3, 8)])
    s0, s1 = chunk2(b, x)
    y = b.node("Relu", [b.conv(s1, 4, 4)])
    return b.build(b.conv(b.node("Concat", [s0, s1, y], axis=1), 12, 3, k=1, pad=0))


def test_chunk_bounds_fold_to_constants_from_the_channel_count():
    model = chunk_model()
    g, groups = analyse_at(model)
    slices = list(g.nodes_by_type("Slice"))
    assert [fold_channel_ints(g, n.input[2]).tolist() for n in slices] == [[4], [8]]
    owner = next(grp for grp in groups if grp.owner and grp.channels == 8)
    assert owner.prunable, owner.reason
    assert sorted(s.derived_from.split()[0] for s in owner.sites if s is not owner) == ["Concat", "Slice", "Slice"]


@pytest.mark.parametrize("opset", [11, 17])
def test_chunk_prunes_and_keeps_dynamic_spatial_dims(opset):
    model = chunk_model(opset)
    x = np.random.default_rng(0).normal(0, 1, (60, 3, 8, 8)).astype(np.float32)
    result = onnxprune.prune(model, x, speedup=1.5, measure_latency=False)
    assert any(r.channels_before == 8 for r in result.report.groups)
    assert not any(n.op_type == "Shape" for n in result.model.graph.node)  # dead Shape arithmetic dropped
    check_pruned(result.model, model, x[:10], max_rel_err=1.0)
    other = np.random.default_rng(1).normal(0, 1, (2, 3, 12, 10)).astype(np.float32)
    assert run(result.model, other)[0].shape == run(model, other)[0].shape == (2, 3, 12, 10)


def test_split_with_sizes_computed_from_shape_is_folded():
    b = Builder(in_shape=("N", 3, "H", "W"))
    x = b.node("Relu", [b.conv("input", 3, 8)])
    c = b.node("Gather", [b.node("Shape", [x]), b.const(np.array([1], np.int64))], axis=0)
    half = b.node("Div", [c, b.const(np.array([2], np.int64))])
    s0, s1 = b.node("Split", [x, b.node("Concat", [half, half], axis=0)], n_out=2, axis=1)
    model = b.build(b.node("Add", [b.conv(s0, 4, 4), b.conv(s1, 4, 4)]), out_shape=["N", 4, "H", "W"])
    g, groups = analyse_at(model)
    owner = next(grp for grp in groups if grp.owner and grp.channels == 8)
    assert owner.prunable, owner.reason
    x = np.random.default_rng(0).normal(0, 1, (60, 3, 8, 8)).astype(np.float32)
    result = onnxprune.prune(model, x, speedup=1.3, measure_latency=False)
    assert result.report.groups
    check_pruned(result.model, model, x[:10], max_rel_err=1.0)


# ---------------------------------------------------------------- barriers
@pytest.mark.parametrize("target", [[0, 4, 2, 64], [0, 16, 32], [0, 64, 8]])
def test_reshape_that_is_not_a_flatten_is_a_barrier(target):
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    y = b.node("Reshape", [x, b.const(np.array(target, np.int64))])
    model = b.build(b.node("Relu", [y]), b.conv(x, 8, 2, k=1, pad=0))
    g, groups = analyse(model)
    grp = next(grp for grp in groups if grp.owner and grp.channels == 8)
    assert not grp.prunable and "Reshape" in grp.reason and "barrier" in grp.reason


@pytest.mark.parametrize("reader", ["Softmax", "Conv"])
def test_transpose_into_an_op_that_cannot_take_channels_last_is_a_barrier(reader):
    """Channels moved to axis 3 reach an op without a handler, or a Conv (which reads axis 1)."""
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    t = b.node("Transpose", [x], perm=[0, 2, 3, 1])
    y = b.node("Softmax", [t], axis=-1) if reader == "Softmax" else b.conv(t, 8, 4)
    model = b.build(b.conv(b.node("Relu", [y]), 8 if reader == "Softmax" else 4, 2, k=1, pad=0),
                    b.conv(x, 8, 2, k=1, pad=0))
    g, groups = analyse(model)
    grp = next(grp for grp in groups if grp.owner and grp.channels == 8 and "conv3_out" in grp.tensors)
    assert not grp.prunable and reader in grp.reason


def test_custom_domain_op_blocks_its_channels():
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    y = b.node("Relu", [x])
    b.nodes[-1].domain = "com.example"
    out = b.conv(y, 8, 2, k=1, pad=0)
    graph = helper.make_graph(b.nodes, "custom", [b.input], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    shapes = {t: (1, 8, 8, 8) for n in b.nodes for t in n.output}
    shapes.update({"input": (1, 3, 8, 8), out: (1, 2, 8, 8)})
    groups = find_groups(GraphView(model, shapes))
    grp = next(grp for grp in groups if grp.owner and grp.channels == 8)
    assert not grp.prunable and "barrier" in grp.reason


def test_outputs_of_any_layout_and_type_prune():
    """Beside the class scores: a scalar, a sequence-first output (batch on axis 1), class indices
    and a boolean mask. The sensitivity probes measure the floating-point outputs whatever their
    layout and leave out the others, as the held-out check does."""
    from graphs import tiny_vgg

    model = tiny_vgg()
    scores = model.graph.output[0].name
    model.graph.initializer.append(helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]))
    model.graph.node.extend([helper.make_node("ReduceMean", [scores], ["score"], keepdims=0),
                             helper.make_node("Transpose", [scores], ["by_class"], perm=[1, 0]),
                             helper.make_node("ArgMax", [scores], ["label"], axis=1, keepdims=0),
                             helper.make_node("Greater", [scores, "zero"], ["positive"])])
    model.graph.output.extend([helper.make_tensor_value_info("score", TensorProto.FLOAT, []),
                               helper.make_tensor_value_info("by_class", TensorProto.FLOAT, [10, None]),
                               helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                               helper.make_tensor_value_info("positive", TensorProto.BOOL, [None, 10])])
    onnx.checker.check_model(model, full_check=True)
    result = onnxprune.prune(model, calib_for(model, 48), speedup=1.5, measure_latency=False)
    assert result.report.totals.macs_speedup >= 1.5
    check_pruned(result.model, model, calib_for(model, 20, seed=5), max_rel_err=1.0)


def dense_block(seed: int = 0) -> onnx.ModelProto:
    """A DenseNet-style block: each layer reads the Concat of the stem and every layer before it."""
    b = Builder(in_shape=("N", 3, 8, 8), seed=seed)
    feats = [b.node("Relu", [b.conv("input", 3, 8)])]
    for _ in range(3):
        x = feats[0] if len(feats) == 1 else b.node("Concat", feats, axis=1)
        feats.append(b.node("Relu", [b.conv(x, 8 + 4 * (len(feats) - 1), 4)]))
    x = b.node("Relu", [b.conv(b.node("Concat", feats, axis=1), 20, 6, k=1, pad=0)])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    return b.build(b.gemm(x, 6, 5))


def test_a_layer_fed_by_several_units_is_refit_once_when_the_last_is_pruned(monkeypatch):
    """In a dense block every layer reads every earlier unit: each unit refit them all, so a
    layer was refit once per unit before it. Now the earlier units only drop its columns and the
    last refits it; the pruned model is as close to the original as with every refit."""
    from onnxprune.group_pruner import GroupPruner

    model = dense_block()
    x = calib_for(model, 120)
    refits = []
    real_refit = GroupPruner._refit
    monkeypatch.setattr(GroupPruner, "_refit", lambda self, c, *a: refits.append(c.node.name) or real_refit(self, c, *a))
    opts = dict(speedup=1.6, allocation="uniform", measure_latency=False, refine=False)
    deferred = onnxprune.prune(model, x, **opts)
    once = list(refits)
    refits.clear()
    monkeypatch.setattr(GroupPruner, "defer_shared_refits", lambda self, steps, topo: None)
    every = onnxprune.prune(model, x, **opts)
    assert len(set(once)) == len(once) < len(refits) and set(once) == set(refits)  # each layer refit once
    errors = [check_pruned(result.model, model, x[:32], max_rel_err=1.0) for result in (deferred, every)]
    assert abs(errors[0] - errors[1]) <= 0.05 * errors[1], errors


def test_image_pooling_branch_prunes():
    """DeepLabV3's ASPP head: the map's global average, through a 1×1 conv, resized back over the
    map and concatenated with a 1×1 branch before the projection, whose pooled inputs hold one
    value per image (their refits count images: tests/test_stats.py). The pruned model is checked."""
    b = Builder(in_shape=("N", 3, 8, 8))
    x = b.node("Relu", [b.conv(b.node("Relu", [b.conv("input", 3, 16)]), 16, 16)])
    pooled = b.node("Relu", [b.conv(b.node("GlobalAveragePool", [x]), 16, 8, k=1, pad=0)])
    spread = b.node("Resize", [pooled, b.const(np.zeros(0, np.float32)), b.const(np.array([1, 1, 8, 8], np.float32))],
                    mode="linear")
    branch = b.node("Relu", [b.conv(x, 16, 8, k=1, pad=0)])
    head = b.node("Relu", [b.conv(b.node("Concat", [spread, branch], axis=1), 16, 12, k=1, pad=0)])
    model = b.build(b.conv(head, 12, 5, k=1, pad=0))
    result = onnxprune.prune(model, calib_for(model, 40), speedup=1.3, measure_latency=False, seed=0)
    assert result.report.totals.macs_speedup >= 1.3 * 0.97
    check_pruned(result.model, model, calib_for(model, 8, seed=3), max_rel_err=0.5)


def test_conditioning_scale_and_shift_do_not_make_a_residual_join():
    """CSRNet's modulation: a conv's map times a per-channel scale plus a per-channel shift, both
    ``Gemm``s of a condition branch, plus the map again (``y·(1 + s) + t``). The shift is spread
    over the map and both maps summed come from the same conv: its channels and the two Gemms'
    rows are pruned together by default, not kept as a residual join."""
    b = Builder(in_shape=("N", 3, 8, 8))
    x = b.node("Relu", [b.conv("input", 3, 16)])
    cond = b.node("Relu", [b.gemm(b.node("Flatten", [b.node("GlobalAveragePool", ["input"])], axis=1), 3, 8)])
    shape = b.const(np.array([-1, 16, 1, 1], np.int64))
    scale, shift = (b.node("Reshape", [b.gemm(cond, 8, 16), shape]) for _ in range(2))
    y = b.conv(x, 16, 16)
    y = b.node("Add", [b.node("Add", [b.node("Mul", [y, scale]), shift]), y])
    model = b.build(b.conv(b.node("Relu", [y]), 16, 4))
    g, groups = analyse_at(model, (2, 3, 8, 8))
    film = next(grp for grp in groups if len(grp.producers) == 3)
    assert {p.op_type for p in film.producers} == {"Conv", "Gemm"}
    assert not film.coupled and film.prunable, film.reason
    xs = calib_for(model, 48)
    result = onnxprune.prune(model, xs, speedup=1.3, measure_latency=False, seed=0)
    assert any(g.name == film.name and g.channels_after < 16 for g in result.report.groups)
    check_pruned(result.model, model, calib_for(model, 8, seed=3), max_rel_err=0.5)
