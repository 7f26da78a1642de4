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


@pytest.mark.parametrize("op,attrs", [("Softmax", {"axis": 1}), ("LRN", {"size": 3})])
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
    assert {"Reshape", "Expand", "Squeeze", "Unsqueeze", "Shape"} <= ops


def concat_split_model():
    """conv a, conv b -> Concat -> conv c ; conv d -> Split(4, 4) -> two convs -> Add."""
    b = Builder()
    xa = b.node("Relu", [b.conv("input", 3, 6)])
    xb = b.node("Relu", [b.conv("input", 3, 4)])
    cat = b.node("Concat", [xa, xb], axis=1)
    xc = b.node("Relu", [b.conv(cat, 10, 8)])
    s0, s1 = b.node("Split", [xc, b.const(np.array([5, 3], np.int64))], n_out=2, axis=1)
    y0 = b.conv(s0, 5, 4)
    y1 = b.conv(s1, 3, 4)
    return b.build(b.node("Add", [y0, y1]))


def test_concat_parts_are_pruned_through_the_concat():
    g, groups = analyse(concat_split_model())
    owners = [grp for grp in groups if grp.owner and grp.prunable]
    assert sorted(grp.channels for grp in owners) == [4, 6, 8]
    six = next(grp for grp in owners if grp.channels == 6)
    assert len(six.sites) == 2  # its own tensors and the Concat output
    cat = next(s for s in six.sites if s is not six)
    assert cat.derived_from.startswith("Concat") and len(cat.atoms) == 10
    eight = next(grp for grp in owners if grp.channels == 8)
    assert len(eight.sites) == 3  # conv output and both Split outputs


def test_concat_split_prune_to_valid_models():
    import onnxprune
    from conftest import check_pruned
    from graphs import calib_for

    model = concat_split_model()
    x = calib_for(model, 150)
    for method in ("lasso", "l1"):
        result = onnxprune.prune(model, x, speedup=1.6, method=method, allocation="uniform", measure_latency=False)
        assert result.report.totals.macs_speedup >= 1.6
        assert len(result.report.groups) == 3
        check_pruned(result.model, model, x[:30], max_rel_err=1.0)


def test_conv_transpose_is_pruned_as_producer_and_consumer():
    import onnxprune
    from conftest import check_pruned
    from graphs import calib_for

    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8, stride=2)])
    w = b.const(b.rng.normal(0, 0.3, (8, 6, 2, 2)).astype(np.float32))
    up = b.node("Relu", [b.node("ConvTranspose", [x, w, b.const(np.zeros(6, np.float32))],
                                 kernel_shape=[2, 2], strides=[2, 2])])
    model = b.build(b.conv(b.node("Concat", [up, "input"], axis=1), 9, 2))
    g, groups = analyse(model)
    assert sorted(grp.channels for grp in groups if grp.owner and grp.prunable) == [6, 8]
    x = calib_for(model, 60)
    result = onnxprune.prune(model, x, speedup=1.5, measure_latency=False)
    check_pruned(result.model, model, x[:10], max_rel_err=1.0)


def test_squeeze_excite_gate_shares_the_trunk_channels_and_is_pruned_by_default():
    import onnxprune
    from conftest import check_pruned
    from graphs import calib_for, random_cnn

    model = random_cnn(["depthwise", "se", "conv"], [8, 8, 6], head="gap")
    g, groups = analyse(model)
    trunk = next(grp for grp in groups if any(n.op_type == "Mul" for n in grp.throughs))
    assert len(trunk.producers) == 2 and not trunk.coupled and trunk.prunable
    x = calib_for(model, 80)
    result = onnxprune.prune(model, x, speedup=1.5, measure_latency=False)
    assert any(grp.name == trunk.name for grp in result.report.groups)
    check_pruned(result.model, model, x[:10], max_rel_err=1.0)
