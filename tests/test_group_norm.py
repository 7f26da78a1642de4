"""Group normalisation: ONNX's op and PyTorch's spelled-out export (Reshape → InstanceNormalization
→ Reshape, then the affine Mul/Add) lose whole groups of channels."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from conftest import check_pruned, run
from graphs import Builder, calib_for

import onnxprune
from onnxprune.fold import fold_group_norms, unfold_group_norms
from onnxprune.graph import find_groups
from onnxprune.graphview import GraphView
from onnxprune.ops import FOLDED_DOMAIN, handler_for
from onnxprune.activations import tensor_shapes
from onnxprune.calib import Calibration
from onnxprune.summary import calibration_or_zeros, summarize

RNG = np.random.default_rng(0)
CHANNELS, GROUPS = 32, 8


def group_norm(b: Builder, x: str, channels: int, groups: int, spelling: str, epsilon: float = 1e-5) -> str:
    """``nn.GroupNorm(groups, channels)`` on ``x`` as an exporter writes it: "torchscript" (a
    ``[0, G, -1]`` target, the shape read back with ``Shape``), "dynamo" (the shape back as a
    constant: 6×6 maps, batch 1) or "op21" (ONNX's op, scale and bias per channel; at opset 18 they
    were per group, and onnx's checker now calls that version deprecated). The affine part has
    random per-channel weights."""
    gamma, beta = RNG.uniform(0.5, 1.5, channels), RNG.normal(0, 0.2, channels)
    if spelling == "op21":
        return b.node("GroupNormalization", [x, b.const(gamma.astype(np.float32)), b.const(beta.astype(np.float32))],
                      num_groups=groups, epsilon=epsilon)
    rows = b.node("Reshape", [x, b.const(np.array([0, groups, -1], np.int64))])
    normed = b.node("InstanceNormalization", [rows, b.const(np.ones(groups, np.float32)),
                                              b.const(np.zeros(groups, np.float32))], epsilon=epsilon)
    shape = b.node("Shape", [x]) if spelling == "torchscript" else b.const(np.array([1, channels, 6, 6], np.int64))
    back = b.node("Reshape", [normed, shape])
    return b.node("Add", [b.node("Mul", [back, b.const(gamma.astype(np.float32).reshape(-1, 1, 1))]),
                          b.const(beta.astype(np.float32).reshape(-1, 1, 1))])


def gn_net(spelling: str = "torchscript", groups: int = GROUPS, opset: int = 17) -> onnx.ModelProto:
    """conv → group norm → ReLU → conv → group norm → ReLU → conv on 6×6 maps (FCOS's head tower)."""
    b = Builder(in_shape=(1 if spelling == "dynamo" else "N", 3, 6, 6), opset=opset)
    x = b.node("Relu", [group_norm(b, b.conv("input", 3, CHANNELS), CHANNELS, groups, spelling)])
    x = b.node("Relu", [group_norm(b, b.conv(x, CHANNELS, CHANNELS), CHANNELS, groups, spelling)])
    return b.build(b.conv(x, CHANNELS, 4), out_shape=[1 if spelling == "dynamo" else "N", 4, 6, 6])


SPELLINGS = [("torchscript", 17), ("dynamo", 17), ("op21", 21)]


@pytest.mark.parametrize("spelling", ["torchscript", "dynamo"])
def test_a_spelled_out_group_norm_folds_into_one_node_and_back(spelling):
    model = gn_net(spelling)
    x = calib_for(model, 1 if spelling == "dynamo" else 4)
    work = copy.deepcopy(model)
    shapes = tensor_shapes(work, Calibration({"input": x}))
    assert fold_group_norms(work, shapes) == 2
    assert [n.op_type for n in work.graph.node if n.domain == FOLDED_DOMAIN] == ["GroupNormalization"] * 2
    assert not any(n.op_type in ("Reshape", "InstanceNormalization", "Shape") for n in work.graph.node)
    onnx.checker.check_model(work, full_check=True)
    np.testing.assert_allclose(run(work, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)
    assert unfold_group_norms(work) == 2
    assert not work.functions and all(o.domain != FOLDED_DOMAIN for o in work.opset_import)
    onnx.checker.check_model(work, full_check=True)
    np.testing.assert_allclose(run(work, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spelling,opset", SPELLINGS)
def test_group_norms_lose_whole_groups_of_channels(spelling, opset):
    model = gn_net(spelling, opset=opset)
    x = calib_for(model, 64)
    per_group = CHANNELS // GROUPS
    work = copy.deepcopy(model)
    shapes = tensor_shapes(work, Calibration({"input": x[:1]}))
    fold_group_norms(work, shapes)
    groups = [grp for grp in find_groups(GraphView(work, shapes)) if grp.channels == CHANNELS]
    assert len(groups) == 2 and all(grp.conv_group == per_group and not grp.blocked for grp in groups)
    result = onnxprune.prune(model, x, speedup=1.5, seed=0, round_to=1)
    pruned = result.model
    assert not pruned.functions and all(o.domain != FOLDED_DOMAIN for o in pruned.opset_import)
    assert max(o.version for o in pruned.opset_import) == opset
    g = GraphView(pruned)
    widths = [int(g.const(n.input[1]).shape[0]) for n in pruned.graph.node if n.op_type == "Conv"][:2]
    assert min(widths) < CHANNELS and all(w % per_group == 0 for w in widths)
    norms = [n for n in pruned.graph.node if n.op_type in ("InstanceNormalization", "GroupNormalization")]
    for norm, width in zip(norms, widths):  # each normalises the groups left, by their own statistics
        kept_groups = width // per_group
        if norm.op_type == "GroupNormalization":
            assert next(a.i for a in norm.attribute if a.name == "num_groups") == kept_groups
            assert g.const(norm.input[1]).size == width
        else:
            assert g.const(norm.input[1]).size == kept_groups
            assert g.const(g.producer[norm.input[0]].input[1]).tolist() == [0, kept_groups, -1]
    for sample in x[:8] if spelling == "dynamo" else [x]:  # declared batch 1
        check_pruned(pruned, model, sample.reshape(-1, *x.shape[1:]), 0.6)


def test_inspect_reads_a_spelled_out_group_norm_as_prunable():
    model = gn_net("torchscript")
    summary = summarize(model, calibration_or_zeros(model, None, None))
    assert summary.prunable_macs == summary.macs


@pytest.mark.parametrize("case", ["one group", "read elsewhere", "other target", "op21 one group"])
def test_group_norms_that_are_not_whole_groups_stay_barriers(case):
    groups = 1 if case.endswith("one group") else GROUPS
    model = gn_net("op21" if case.startswith("op21") else "torchscript", groups=groups,
                   opset=21 if case.startswith("op21") else 17)
    if case == "read elsewhere":  # the rows are also an output: the two Reshapes stay as they are
        rows = next(n for n in model.graph.node if n.op_type == "Reshape").output[0]
        model.graph.output.append(onnx.helper.make_tensor_value_info(rows, onnx.TensorProto.FLOAT, None))
    if case == "other target":  # [N, C/G... ] spelled another way is not recognised
        target = next(n for n in model.graph.node if n.op_type == "Reshape").input[1]
        init = next(t for t in model.graph.initializer if t.name == target)
        init.CopyFrom(onnx.numpy_helper.from_array(np.array([0, GROUPS, 4, -1], np.int64), target))
        model = onnx.shape_inference.infer_shapes(model)
    x = calib_for(model, 4)
    work = copy.deepcopy(model)
    shapes = tensor_shapes(work, Calibration({"input": x}))
    fold_group_norms(work, shapes)
    first = [grp for grp in find_groups(GraphView(work, shapes)) if grp.channels == CHANNELS][0]
    assert first.blocked


def test_onnx_group_norm_at_opset_18_keeps_its_scale_and_bias_per_group():
    """Opset 18's scale and bias are per group (21 made them per channel; onnx's checker now calls
    18's deprecated, so the handler is tried on the node directly)."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, CHANNELS, 6, 6])
    node = onnx.helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=GROUPS, epsilon=1e-5)
    inits = [onnx.numpy_helper.from_array(RNG.uniform(0.5, 1.5, GROUPS).astype(np.float32), "s"),
             onnx.numpy_helper.from_array(RNG.normal(0, 0.2, GROUPS).astype(np.float32), "b")]
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "gn18", [x], [x], inits),
                                   opset_imports=[onnx.helper.make_opsetid("", 18)])
    g = GraphView(model, {"x": (1, CHANNELS, 6, 6), "y": (1, CHANNELS, 6, 6)})
    handler = handler_for(node)
    assert handler.rule(node, g).whole_groups == {"y": CHANNELS // GROUPS}
    with pytest.raises(ValueError, match="whole groups of 4 channels"):
        handler.prune_through(node, np.r_[0:3], g)  # part of a group
    scale = g.const("s").copy()
    handler.prune_through(node, np.r_[4:8, 20:28], g)  # groups 1, 5 and 6
    np.testing.assert_array_equal(g.const(node.input[1]), scale[[1, 5, 6]])
    assert next(a.i for a in node.attribute if a.name == "num_groups") == 3
