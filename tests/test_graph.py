"""Channel-group analysis and the op handlers, on tiny graphs built in code."""

import numpy as np
import pytest
from graphs import Builder, tiny_resnet, tiny_vgg

from onnxprune.activations import tensor_shapes
from onnxprune.calib import load_calibration
from onnxprune.graph import find_groups
from onnxprune.graphview import GraphView
from onnxprune.ops import handler_for, registered_ops


def analyse(model):
    cal = load_calibration(np.zeros((1, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]),
                                    np.float32), model)
    g = GraphView(model, tensor_shapes(model, cal))
    return g, find_groups(g)


def by_producer(groups, op_prefix):
    return [grp for grp in groups if grp.producers and grp.producers[0].name.startswith(op_prefix)]


def test_vgg_groups_follow_channels_through_bn_relu_pool_flatten():
    g, groups = analyse(tiny_vgg())
    prunable = [grp for grp in groups if grp.prunable]
    assert [grp.channels for grp in prunable] == [8, 16, 16]
    last = prunable[-1]
    assert [c.node.op_type for c in last.consumers] == ["Gemm"]
    assert last.consumers[0].block == 16  # 4×4 spatial positions per channel after Flatten
    ops = {n.op_type for n in prunable[1].throughs}
    assert {"BatchNormalization", "Relu", "MaxPool"} <= ops


def test_model_input_and_output_are_never_prunable():
    g, groups = analyse(tiny_vgg())
    for grp in groups:
        if "input" in grp.tensors or any(t in g.graph_outputs for t in grp.tensors):
            assert not grp.prunable


def test_residual_add_couples_branches():
    g, groups = analyse(tiny_resnet())
    coupled = [grp for grp in groups if grp.coupled]
    assert coupled, "the Add joins should couple the stem/conv2/projection outputs"
    assert all(any(n.op_type == "Add" for n in grp.throughs) for grp in coupled)
    inner = [grp for grp in groups if grp.prunable and not grp.coupled]
    assert [grp.channels for grp in inner] == [12, 12]


def test_depthwise_conv_ties_input_and_output():
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    x = b.node("Relu", [b.conv(x, 8, 8, group=8)])
    model = b.build(b.conv(x, 8, 4, k=1, pad=0))
    g, groups = analyse(model)
    grp = next(grp for grp in groups if grp.prunable)
    assert grp.channels == 8 and len(grp.producers) == 1
    assert any(n.op_type == "Conv" for n in grp.throughs)  # the depthwise conv passes channels


@pytest.mark.parametrize("op,attrs", [("Transpose", {"perm": [0, 2, 3, 1]}), ("Softmax", {"axis": 1}),
                                      ("LRN", {"size": 3})])
def test_unknown_or_mixing_ops_are_barriers(op, attrs):
    b = Builder()
    x = b.node(op, [b.node("Relu", [b.conv("input", 3, 8)])], **attrs)
    model = b.build(x)
    g, groups = analyse(model)
    grp = next(grp for grp in groups if grp.producers)
    assert not grp.prunable and "barrier" in grp.reason


def test_custom_domain_op_is_a_barrier():
    b = Builder()
    x = b.conv("input", 3, 8)
    node = b.nodes
    y = b.node("Relu", [x])
    node[-1].domain = "com.example"
    assert handler_for(node[-1]).rule(node[-1], None) is None
    assert y


def test_grouped_conv_is_a_barrier_for_now():
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    model = b.build(b.conv(x, 8, 8, group=2))
    g, groups = analyse(model)
    assert not any(grp.prunable for grp in groups)


def test_binary_with_channel_constant_ties_and_slices():
    b = Builder()
    x = b.conv("input", 3, 8)
    x = b.node("Mul", [x, b.const(np.arange(8, dtype=np.float32).reshape(1, 8, 1, 1))])
    x = b.node("Add", [x, b.const(np.float32(1.0))])
    model = b.build(b.conv(x, 8, 4))
    g, groups = analyse(model)
    grp = next(grp for grp in groups if grp.prunable)
    assert {n.op_type for n in grp.throughs} == {"Mul", "Add"}


def test_spatial_broadcast_activation_is_not_tied():
    b = Builder()
    x = b.conv("input", 3, 8)
    att = b.node("Sigmoid", [b.conv("input", 3, 1)])  # a [N,1,H,W] spatial attention map
    x = b.node("Mul", [x, att])
    model = b.build(b.conv(x, 8, 4))
    g, groups = analyse(model)
    grp = next(grp for grp in groups if grp.prunable)
    assert grp.channels == 8


def test_registry_covers_the_issue_ops():
    ops = set(registered_ops())
    assert {"Conv", "Gemm", "MatMul", "BatchNormalization", "Relu", "Clip", "HardSwish", "Add", "Mul",
            "MaxPool", "GlobalAveragePool", "Flatten", "Resize", "Pad", "ReduceMean"} <= ops
    assert "Transpose" not in ops and "Reshape" not in ops
