"""Issue 15: the patterns real exporters emit — shape arithmetic, run-time "same" padding,
``view(x.size(0), -1)``, constant Reshape targets that write the channel count, Expand, Squeeze —
pass channels through; the variants that would change meaning stay barriers."""

import copy

import numpy as np
import onnx
import pytest
from conftest import check_pruned, run
from graphs import Builder, calib_for, tiny_vgg
from test_any_graph import analyse_at, head

import onnxprune
from onnxprune.errors import TargetNotMetError
from onnxprune.activations import tensor_shapes
from onnxprune.calib import load_calibration
from onnxprune.fold import (constants_to_initializers, flush_subnormal_weights, fold_channel_means, fold_channel_shuffles,
                            fold_pads, subnormal_weights)
from onnxprune.graph import find_groups
from onnxprune.graphview import GraphView
from onnxprune.ops import handler_for
from onnxprune.summary import calibration_or_zeros, summarize
from onnxprune.group_pruner import GroupPruner
from onnxprune.ops.shapes import ShapeValues
from onnxprune.options import PruneOptions
from onnxprune.rewrite import finalize, share_equal_initializers

RNG = np.random.default_rng(0)


def i64(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def dim(b: Builder, x: str, axis: int) -> str:
    """``x.size(axis)`` as a 1-element int64 tensor (Shape → Gather → Unsqueeze, as torch exports)."""
    scalar = b.node("Gather", [b.node("Shape", [x]), b.const(np.array(axis, np.int64))], axis=0)
    if b.opset < 13:
        return b.node("Unsqueeze", [scalar], axes=[0])
    return b.node("Unsqueeze", [scalar, b.const(i64(0))])


def same_pad_amount(b: Builder, x: str, axis: int, k: int, s: int, clip: bool = False) -> str:
    """TF "same": ``max((ceil(i / s) - 1) * s + k - i, 0)`` computed from the run-time size."""
    size = b.node("Cast", [dim(b, x, axis)], to=onnx.TensorProto.FLOAT)
    steps = b.node("Ceil", [b.node("Div", [size, b.const(np.array([s], np.float32))])])
    total = b.node("Sub", [b.node("Add", [b.node("Mul", [b.node("Sub", [steps, b.const(np.array([1], np.float32))]),
                                                         b.const(np.array([s], np.float32))]),
                                          b.const(np.array([k], np.float32))]), size])
    if clip:  # as torch exports max(…, 0) at opset ≥ 11
        total = b.node("Clip", [total, b.const(np.array(0, np.float32))])
    else:
        total = b.node("Max", [total, b.const(np.array([0], np.float32))])
    return b.node("Cast", [total, ], to=onnx.TensorProto.INT64)


def same_pad(b: Builder, x: str, k: int, s: int, torch_style: bool) -> str:
    """Pad ``x`` at run time; ``torch_style`` reorders ``F.pad``'s list as torch's exporter does
    (ConstantOfShape, Reshape(-1, 2), reversed Slice, Transpose, Reshape(-1))."""
    th, tw = (same_pad_amount(b, x, axis, k, s, clip=torch_style and b.opset >= 11) for axis in (2, 3))
    two = b.const(i64(2))
    top, left = b.node("Div", [th, two]), b.node("Div", [tw, two])
    bottom, right = b.node("Sub", [th, top]), b.node("Sub", [tw, left])
    if not torch_style:
        zeros = b.const(i64(0, 0))
        pads = b.node("Concat", [zeros, top, left, zeros, bottom, right], axis=0)
    else:
        pads = torch_pads(b, top, left, bottom, right)
    return b.node("Pad", [x, pads])


def torch_pads(b: Builder, top: str, left: str, bottom: str, right: str) -> str:
    """ONNX pads from ``F.pad``'s list as torch's exporter reorders it (ConstantOfShape,
    Reshape(-1, 2), reversed Slice, Transpose, Reshape(-1))."""
    fpad = b.node("Concat", [left, right, top, bottom], axis=0)  # F.pad order: last dim first
    missing = b.node("Sub", [b.const(i64(8)), b.node("Shape", [fpad])])  # 2 · rank − len(pads)
    extra = b.node("ConstantOfShape", [missing], value=onnx.numpy_helper.from_array(i64(0)))
    pairs = b.node("Reshape", [b.node("Concat", [fpad, extra], axis=0), b.const(i64(-1, 2))])
    flipped = b.node("Slice", [pairs, b.const(i64(-1)), b.const(i64(-(2 ** 62))), b.const(i64(0)),
                               b.const(i64(-1))])
    return b.node("Reshape", [b.node("Transpose", [flipped], perm=[1, 0]), b.const(i64(-1))])


def head(b: Builder, x: str, c: int, classes: int = 5) -> onnx.ModelProto:
    return b.build(b.gemm(b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1), c, classes))


def mbconv_same(torch_style: bool = False, opset: int = 13, in_shape=("N", 3, "H", "W")) -> onnx.ModelProto:
    """conv → ReLU → run-time same pad → depthwise 3×3 stride 2 → ReLU → 1×1 → GAP → Gemm."""
    b = Builder(in_shape=in_shape, opset=opset)
    x = b.node("Relu", [b.conv("input", 3, 16)])
    x = b.node("Relu", [b.conv(same_pad(b, x, 3, 2, torch_style), 16, 16, stride=2, group=16, pad=0)])
    return head(b, b.node("Relu", [b.conv(x, 16, 12, k=1, pad=0)]), 12)


def keep_all_but_one(model: onnx.ModelProto, x: np.ndarray, drop: bool) -> onnx.ModelProto:
    """Every prunable group keeps all its channels (or all but its last per conv group), rewritten
    where they flow (Split/Slice/Concat sites too), without reconstruction."""
    model = copy.deepcopy(model)
    g, _ = analyse_at(model, x.shape)
    g = GraphView(model, g.shapes)
    groups = find_groups(g)
    units = [grp for grp in groups if grp.prunable and grp.owner and not grp.coupled]
    keep = {}
    for grp in units:
        n = grp.channels // grp.segments
        keep[grp.index] = np.concatenate([np.arange(s * n, (s + 1) * n - int(drop)) for s in range(grp.segments)])
    pruner = GroupPruner(g, groups, PruneOptions(), None, {}, keep=keep)
    for grp in units:
        pruner.prune_unit(grp, len(keep[grp.index]))
    return finalize(model)


def assert_passes_through(model: onnx.ModelProto, channels: int, sizes=((2, 3, 16, 16), (3, 3, 20, 14))) -> None:
    """The group of ``channels`` channels is prunable; keeping every channel is exact; dropping one
    per group runs at two input sizes with the original output shapes."""
    x = RNG.normal(0, 1, sizes[0]).astype(np.float32)
    g, groups = analyse_at(model, x.shape)
    owner = [grp for grp in groups if grp.owner and grp.channels == channels]
    assert owner and all(grp.prunable for grp in owner), [grp.reason for grp in owner]
    same = keep_all_but_one(model, x, drop=False)
    onnx.checker.check_model(same, full_check=True)
    for size in sizes:
        xs = RNG.normal(0, 1, size).astype(np.float32)
        assert all(np.array_equal(a, b) for a, b in zip(run(model, xs), run(same, xs)))
    fewer = keep_all_but_one(model, x, drop=True)
    onnx.checker.check_model(fewer, full_check=True)
    for size in sizes:
        xs = RNG.normal(0, 1, size).astype(np.float32)
        assert [o.shape for o in run(fewer, xs)] == [o.shape for o in run(model, xs)]


def assert_prunes(model: onnx.ModelProto, speedup: float = 1.5, size=(3, 16, 16)) -> None:
    x = RNG.normal(0, 1, (64, *size)).astype(np.float32)
    result = onnxprune.prune(model, x, speedup=speedup, measure_latency=False)
    assert result.report.totals.macs_speedup >= speedup * 0.97, result.report.totals.macs_speedup
    check_pruned(result.model, model, x[:8], max_rel_err=1.0)


# ---------------------------------------------------------------- shape values
def test_shape_values_know_which_dims_each_entry_reads():
    b = Builder(in_shape=("N", 3, "H", "W"))
    x = b.conv("input", 3, 8)
    pads_name = None
    out = same_pad(b, x, 3, 2, torch_style=True)
    pads_name = b.nodes[-1].input[1]
    model = b.build(b.conv(out, 8, 4, pad=0))
    g, _ = analyse_at(model, (1, 3, 15, 16))
    entries = list(ShapeValues(g).of(pads_name))
    assert [e.value for e in entries] == [0, 0, 1, 0, 0, 0, 1, 1]
    assert all(e.constant for e in (entries[0], entries[1], entries[4], entries[5]))
    assert {d[1] for e in entries[2:4] + entries[6:] for d in e.dims} <= {2, 3}


# ---------------------------------------------------------------- run-time "same" padding
@pytest.mark.parametrize("torch_style", [False, True])
@pytest.mark.parametrize("opset", [11, 13, 18])
def test_runtime_same_padding_passes_channels(torch_style, opset):
    assert_passes_through(mbconv_same(torch_style, opset), 16)


def test_runtime_same_padding_prunes():
    assert_prunes(mbconv_same(torch_style=True))


def test_pad_with_runtime_channel_pads_stays_a_barrier():
    """Pads whose channel entries come from a spatial size would pad channels: a barrier."""
    b = Builder(in_shape=("N", 3, "H", "W"))
    x = b.node("Relu", [b.conv("input", 3, 8)])
    h = b.node("Div", [dim(b, x, 2), b.const(i64(8))])
    zero = b.const(i64(0))
    pads = b.node("Concat", [zero, h, zero, zero, zero, zero, zero, zero], axis=0)
    model = b.build(b.conv(b.node("Pad", [x, pads]), 9, 4, pad=0), out_shape=["N", 4, "H", "W"])
    g, groups = analyse_at(model, (1, 3, 8, 8))
    grp = next(grp for grp in groups if grp.owner and grp.channels == 8)
    assert not grp.prunable and "Pad" in grp.reason


def test_a_zero_channel_before_a_conv_leaves_the_channels_it_pads_prunable():
    """The added channel is zeros no layer makes (not pruned); the conv's own channels are."""
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    model = b.build(b.conv(b.node("Pad", [x, b.const(i64(0, 1, 0, 0, 0, 0, 0, 0))]), 9, 4))
    g, groups = analyse_at(model, (1, 3, 8, 8))
    grp = next(grp for grp in groups if grp.owner and grp.channels == 8)
    zero = next(grp for grp in groups if grp.padding is not None)
    assert grp.prunable and not zero.prunable and "no layer produces" in zero.reason
    x = calib_for(model, n=32)
    result = onnxprune.prune(model, x, speedup=1.3, measure_latency=False)
    assert [(r.channels_before, r.channels_after < 8) for r in result.report.groups] == [(8, True)]
    check_pruned(result.model, model, x, 0.5)


def test_a_non_zero_channel_pad_stays_a_barrier():
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    pad = b.node("Pad", [x, b.const(i64(0, 1, 0, 0, 0, 0, 0, 0)), b.const(np.float32(1.0))])
    g, groups = analyse_at(b.build(b.conv(pad, 9, 4)), (1, 3, 8, 8))
    grp = next(grp for grp in groups if grp.owner and grp.channels == 8)
    assert not grp.prunable and "Pad" in grp.reason


# ---------------------------------------------------------------- Reshape
def view_head(target: str) -> onnx.ModelProto:
    """conv → ReLU → conv → ReLU → Reshape (flatten) → Gemm; ``target`` picks how it is spelled."""
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    x = b.node("Relu", [b.conv(x, 8, 6, stride=2)])  # [N, 6, 4, 4]
    if target == "view_size0":  # x.view(x.size(0), -1)
        shape = b.node("Concat", [dim(b, x, 0), b.const(i64(-1))], axis=0)
    elif target == "constant":  # x.reshape(-1, 96)
        shape = b.const(i64(-1, 96))
    elif target == "size0_and_count":  # x.view(x.size(0), 96)
        shape = b.node("Concat", [dim(b, x, 0), b.const(i64(96))], axis=0)
    else:  # x.view(x.size(0), x.size(1), -1) then a flatten
        shape = b.node("Concat", [dim(b, x, 0), dim(b, x, 1), b.const(i64(-1))], axis=0)
        x = b.node("Reshape", [x, shape])
        shape = b.const(i64(0, -1))
    return b.build(b.gemm(b.node("Reshape", [x, shape]), 96, 5))


@pytest.mark.parametrize("target", ["view_size0", "constant", "size0_and_count", "size0_size1"])
def test_reshape_that_flattens_passes_channels(target):
    model = view_head(target)
    assert_passes_through(model, 6, sizes=((2, 3, 8, 8), (5, 3, 8, 8)))
    assert_prunes(model, size=(3, 8, 8))


def test_shape_whose_channel_entry_reaches_a_reshape_target_elsewhere_stays_a_barrier():
    """``x.view(N, 2, C // 2, -1)`` (a channel shuffle) moves channels: a barrier."""
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    half = b.node("Div", [dim(b, x, 1), b.const(i64(2))])
    shape = b.node("Concat", [dim(b, x, 0), b.const(i64(2)), half, b.const(i64(-1))], axis=0)
    y = b.node("Reshape", [b.node("Reshape", [x, shape]), b.const(i64(0, 8, 8, 8))])
    model = b.build(b.conv(y, 8, 4))
    g, groups = analyse_at(model, (1, 3, 8, 8))
    grp = next(grp for grp in groups if grp.owner and grp.channels == 8)
    assert not grp.prunable


def paddle_se(c: int = 8) -> onnx.ModelProto:
    """Squeeze-excite as PaddlePaddle writes it: constant Reshape targets hold the channel count."""
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, c)])
    s = b.node("Reshape", [b.node("GlobalAveragePool", [x]), b.const(i64(-1, c))])
    s = b.node("Relu", [b.gemm(s, c, c // 2)])
    s = b.node("HardSigmoid", [b.gemm(s, c // 2, c)], alpha=0.2, beta=0.5)
    gate = b.node("Reshape", [s, b.const(i64(-1, c, 1, 1))])
    x = b.node("Mul", [x, gate])
    return head(b, b.node("Relu", [b.conv(x, c, 6)]), 6)


def test_paddle_squeeze_excite_constant_targets_are_rewritten():
    model = paddle_se()
    assert_passes_through(model, 8, sizes=((2, 3, 8, 8), (4, 3, 8, 8)))
    assert_prunes(model, size=(3, 8, 8))


def reshaped_bias(b: Builder, c: int) -> str:
    """A conv bias as PaddlePaddle's older exporter writes it: a ``Constant`` node ``Reshape``-d
    to ``[1, C, 1, 1]`` at run time, then added."""
    bias = b.node("Constant", [], value=onnx.numpy_helper.from_array(RNG.normal(0, 0.1, c).astype(np.float32)))
    return b.node("Reshape", [bias, b.const(i64(1, c, 1, 1))])


def paddle_se_conv(c: int = 8) -> onnx.ModelProto:
    """Squeeze-excite made of 1×1 convs whose biases are computed from constants at run time
    (PaddleOCR's text-direction classifier, ch_ppocr_mobile_v2.0_cls)."""
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, c)])
    s = b.node("GlobalAveragePool", [x])
    s = b.node("Relu", [b.node("Add", [b.conv(s, c, c // 2, k=1, bias=False), reshaped_bias(b, c // 2)])])
    s = b.node("Add", [b.conv(s, c // 2, c, k=1, bias=False), reshaped_bias(b, c)])
    x = b.node("Mul", [x, b.node("HardSigmoid", [s], alpha=0.2, beta=0.5)])
    return head(b, b.node("Relu", [b.conv(x, c, 6)]), 6)


def test_biases_computed_from_constants_become_weights():
    model = paddle_se_conv()
    folded = copy.deepcopy(model)
    assert constants_to_initializers(folded) == 4  # two Constant nodes, two Reshapes of them
    assert_passes_through(folded, 8, sizes=((2, 3, 8, 8), (4, 3, 8, 8)))
    assert_passes_through(folded, 4, sizes=((2, 3, 8, 8), (4, 3, 8, 8)))
    assert_prunes(model, size=(3, 8, 8))  # the pipeline folds them itself


def test_constant_folding_keeps_what_must_stay_computed():
    b = Builder()
    w = b.node("Cast", [b.const(np.ones((4, 3, 1, 1), np.float64))], to=onnx.TensorProto.FLOAT)
    y = b.node("Conv", ["input", w])
    big = b.node("Expand", [b.const(np.zeros((1, 1, 1, 1), np.float32)), b.const(i64(1, 4, 256, 256))])
    scale = b.node("DequantizeLinear", [b.const(np.array([3], np.int8)), b.const(np.array(0.5, np.float32))])
    y = b.node("Mul", [b.node("Add", [b.node("GlobalAveragePool", [y]), big]), scale])
    model = b.build(y, out_shape=["N", 4, 256, 256])
    folded = copy.deepcopy(model)
    constants_to_initializers(folded)
    ops = [n.op_type for n in folded.graph.node]
    assert "Cast" not in ops  # a weight cast at run time is a weight
    assert "Expand" in ops  # its size is read from an input: left computed, the file stays small
    assert "DequantizeLinear" in ops  # quantized models must keep reading as quantized
    x = RNG.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    assert np.array_equal(run(model, x)[0], run(folded, x)[0])
    hostile = onnx.helper.make_model(onnx.helper.make_graph(  # 10¹² floats asked for: never evaluated
        [onnx.helper.make_node("ConstantOfShape", ["shape"], ["huge"])], "g", [],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(i64(1 << 20, 1 << 20), "shape")]))
    assert constants_to_initializers(hostile) == 0 and len(hostile.graph.node) == 1
    # an attention-bias table gathered by constant indices (EfficientViT-M): folded, it would hold
    # more values than the table and indices it is made of, and the pruned file would grow
    b = Builder(in_shape=("N", 2, 3, 3))
    table = b.node("Gather", [b.const(RNG.normal(0, 1, (2, 3)).astype(np.float32)),
                              b.const(RNG.integers(0, 3, (3, 3)))], axis=1)
    biased = b.build(b.node("Add", ["input", table]))
    constants_to_initializers(biased)
    assert [n.op_type for n in biased.graph.node] == ["Gather", "Add"]


def test_weights_an_exporter_stored_once_are_stored_once_after_pruning():
    """PyTorch's exporter stores equal tensors once and reads the copies through ``Identity``: at
    load each copy becomes a weight of its own (to be cut for its own layer); copies that pruning
    leaves equal are stored once again, so the pruned file holds no more than the original."""
    b = Builder()
    scale = b.const(RNG.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32))
    trunk = b.node("Mul", [b.node("Relu", [b.conv("input", 3, 8)]), scale])
    hidden = b.node("Relu", [b.conv(trunk, 8, 16)])
    branch = b.node("Mul", [b.conv(hidden, 16, 8), b.node("Identity", [scale])])
    model = head(b, b.node("Add", [trunk, branch]), 8)
    x = RNG.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)
    result = onnxprune.prune(model, x, speedup=1.3, measure_latency=False)
    check_pruned(result.model, model, x[:8], max_rel_err=1.0)
    muls = [n for n in result.model.graph.node if n.op_type == "Mul"]
    assert len(muls) == 2 and muls[0].input[1] == muls[1].input[1]
    inits = {t.name for t in result.model.graph.initializer}
    assert len(inits) == len(result.model.graph.initializer) and muls[0].input[1] in inits
    # a graph input of the same value may be fed another at run time: it keeps its own
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "a"], ["y"]), onnx.helper.make_node("Add", ["y", "b"], ["z"]),
         onnx.helper.make_node("Add", ["z", "c"], ["out"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
         onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [2])],
        [onnx.numpy_helper.from_array(np.ones(2, np.float32), name) for name in "abc"])
    shared = onnx.helper.make_model(graph)
    assert share_equal_initializers(shared) == 1
    assert [list(n.input) for n in shared.graph.node] == [["x", "a"], ["y", "a"], ["z", "c"]]
    assert sorted(t.name for t in shared.graph.initializer) == ["a", "c"]


# ---------------------------------------------------------------- Resize, Expand, Squeeze
def test_resize_with_sizes_computed_from_the_input_shape():
    """``F.interpolate(x, size=(2h, 2w))``: sizes = [N, C, 2H, 2W] computed from ``Shape(x)``."""
    b = Builder(in_shape=("N", 3, "H", "W"))
    x = b.node("Relu", [b.conv("input", 3, 8)])
    nc = b.node("Slice", [b.node("Shape", [x]), b.const(i64(0)), b.const(i64(2))])
    hw = b.node("Mul", [b.node("Slice", [b.node("Shape", [x]), b.const(i64(2)), b.const(i64(4))]), b.const(i64(2))])
    sizes = b.node("Concat", [nc, hw], axis=0)
    y = b.node("Resize", [x, "", "", sizes], mode="nearest")
    model = b.build(b.conv(y, 8, 4), out_shape=["N", 4, "H2", "W2"])
    assert_passes_through(model, 8, sizes=((1, 3, 8, 8), (2, 3, 6, 10)))


def test_expand_of_a_gate_to_the_trunk_shape():
    b = Builder(in_shape=("N", 3, "H", "W"))
    x = b.node("Relu", [b.conv("input", 3, 8)])
    gate = b.node("Sigmoid", [b.conv(b.node("GlobalAveragePool", [x]), 8, 8, k=1, pad=0)])
    y = b.node("Mul", [x, b.node("Expand", [gate, b.node("Shape", [x])])])
    model = b.build(b.conv(y, 8, 4), out_shape=["N", 4, "H", "W"])
    assert_passes_through(model, 8, sizes=((1, 3, 8, 8), (2, 3, 6, 10)))


def test_squeeze_after_pooling_into_matmul():
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    s = b.node("Squeeze", [b.node("GlobalAveragePool", [x]), b.const(i64(2, 3))])
    w = b.const(RNG.normal(0, 0.3, (8, 5)).astype(np.float32))
    model = b.build(b.node("MatMul", [s, w]))
    assert_passes_through(model, 8, sizes=((2, 3, 8, 8), (3, 3, 8, 8)))


# ---------------------------------------------------------------- channels-last (tf2onnx)
def tf2onnx_nhwc(residual: bool, opset: int = 13, concat: bool = False) -> onnx.ModelProto:
    """NHWC input; each Conv wrapped as ``Transpose(0,3,1,2) → Conv → Transpose(0,2,3,1)``; NHWC
    bias Add, scale Mul, ReLU6 as Clip with min/max inputs, a residual Add, ReduceMean over H, W
    and a MatMul head."""
    b = Builder(in_shape=("N", "H", "W", 3), opset=opset)

    def conv_nhwc(x: str, cin: int, cout: int) -> str:
        y = b.conv(b.node("Transpose", [x], perm=[0, 3, 1, 2]), cin, cout, bias=False)
        y = b.node("Transpose", [y], perm=[0, 2, 3, 1])
        y = b.node("Add", [y, b.const(RNG.normal(0, 0.1, cout).astype(np.float32))])
        y = b.node("Mul", [y, b.const(RNG.uniform(0.5, 1.5, cout).astype(np.float32))])
        return b.node("Clip", [y, b.const(np.array(0, np.float32)), b.const(np.array(6, np.float32))])

    x = b.node("Sub", ["input", b.const(np.array([0.1, 0.2, 0.3], np.float32))])
    x = conv_nhwc(x, 3, 8)
    y = conv_nhwc(conv_nhwc(x, 8, 12), 12, 8)
    if residual:
        y = b.node("Add", [x, y])
    width = 8
    if concat:  # an inception-style join on the NHWC channel axis
        y, width = b.node("Concat", [y, conv_nhwc(x, 8, 6)], axis=3), 14
    pooled = b.node("ReduceMean", [b.node("Relu", [y])], axes=[1, 2], keepdims=0)
    logits = b.node("MatMul", [pooled, b.const(RNG.normal(0, 0.3, (width, 5)).astype(np.float32))])
    return b.build(b.node("Add", [logits, b.const(np.zeros(5, np.float32))]))


@pytest.mark.parametrize("residual", [False, True])
def test_channels_last_graph_passes_channels_through_transposes(residual):
    model = tf2onnx_nhwc(residual)
    x = RNG.normal(0, 1, (2, 8, 8, 3)).astype(np.float32)
    g, groups = analyse_at(model, x.shape)
    assert g.channel_axes  # some tensors hold channels on axis 3
    prunable = sorted(grp.channels for grp in groups if grp.owner and grp.prunable and not grp.coupled)
    assert prunable == ([12] if residual else [8, 8, 12]), [(grp.channels, grp.reason) for grp in groups]
    assert_passes_through(model, 12, sizes=((2, 8, 8, 3), (3, 10, 6, 3)))


def test_channels_last_input_is_kept_as_the_model_input():
    """The NHWC input reaches its first conv through a Transpose only: its channels are on axis 3,
    so its group is kept as the model input, not as a disagreement of 8 against 3 channels."""
    model = tf2onnx_nhwc(residual=False)
    g, groups = analyse_at(model, (2, 8, 8, 3))
    assert g.channel_axis("input") == 3
    first = next(grp for grp in groups if "input" in grp.tensors)
    assert first.channels == 3 and first.reason == "model input", first.reason


def test_channels_last_graph_prunes():
    assert_prunes(tf2onnx_nhwc(residual=False), size=(8, 8, 3))


def test_channels_last_concat_joins_on_axis_3():
    model = tf2onnx_nhwc(residual=False, concat=True)
    assert_passes_through(model, 6, sizes=((2, 8, 8, 3), (3, 10, 6, 3)))
    assert_prunes(model, size=(8, 8, 3))


# ---------------------------------------------------------------- more ops as handlers
def mobile_ops(opset: int) -> onnx.ModelProto:
    """HardSwish, x·sigmoid(x), Clip with min/max inputs, Mul/Div by scalars, Identity, Dropout,
    Resize with scales, Split into equal halves (``num_outputs`` at opset 18), ReduceMean with axes
    as attribute (≤ 17) or input (18)."""
    b = Builder(opset=opset)
    f32 = lambda v: b.const(np.array(v, np.float32))
    x = b.conv("input", 3, 16)
    x = b.node("HardSwish", [x]) if opset >= 14 else b.node("Mul", [x, b.node("HardSigmoid", [x])])
    x = b.node("Mul", [x, b.node("Sigmoid", [x])])
    x = b.node("Clip", [b.node("Div", [b.node("Mul", [x, f32(2.0)]), f32(2.0)]), f32(0.0), f32(6.0)])
    x = b.node("Dropout", [b.node("Identity", [x])])
    roi = f32(np.zeros(0)) if opset < 13 else ""
    x = b.node("Resize", [x, roi, f32([1, 1, 2, 2])], mode="nearest")
    if opset >= 18:
        halves = b.node("Split", [x], n_out=2, axis=1, num_outputs=2)
    else:
        halves = b.node("Split", [x], n_out=2, axis=1, **({"split": [8, 8]} if opset < 13 else {}))
    x = b.node("Add", [b.conv(halves[0], 8, 8), b.conv(halves[1], 8, 8)])
    if opset >= 18:
        pooled = b.node("ReduceMean", [x, b.const(i64(2, 3))], keepdims=1)
    else:
        pooled = b.node("ReduceMean", [x], axes=[2, 3], keepdims=1)
    return b.build(b.gemm(b.node("Flatten", [pooled], axis=1), 8, 5))


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
def test_mobile_ops_pass_channels(opset):
    assert_passes_through(mobile_ops(opset), 16, sizes=((2, 3, 8, 8), (3, 3, 8, 8)))


def test_layer_that_reads_and_writes_a_residual_group_refits_its_kept_outputs():
    """x → depthwise → 1×1 → Add(x, ·): with --prune-residual the 1×1 conv both consumes and produces
    the joined group; its refit targets only the outputs it keeps."""
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 16)])
    y = b.conv(b.node("Relu", [b.conv(x, 16, 16, group=16)]), 16, 16, k=1, pad=0)
    model = head(b, b.node("Relu", [b.node("Add", [x, y])]), 16)
    data = RNG.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)
    result = onnxprune.prune(model, data, speedup=1.5, prune_coupled=True, measure_latency=False)
    assert result.report.totals.macs_speedup >= 1.45
    check_pruned(result.model, model, data[:8], max_rel_err=1.0)


def test_residual_groups_shrink_only_where_the_target_needs_them(caplog):
    """By default residual-joined groups keep their width while the target is reachable without
    them; past that they are pruned too, with a warning; ``--no-prune-residual`` forbids it."""
    from onnxprune.errors import TargetNotMetError

    model = tf2onnx_nhwc(True)
    data = RNG.normal(0, 1, (64, 16, 16, 3)).astype(np.float32)
    joined = [g.name for g in onnxprune.prune(model, data, speedup=8.0, prune_coupled=True,
                                               measure_latency=False).report.groups if "+" in g.name]
    reachable = onnxprune.prune(model, data, speedup=2.0, measure_latency=False)
    assert joined and not any(g.name in joined for g in reachable.report.groups)
    with caplog.at_level("WARNING"):
        needed = onnxprune.prune(model, data, speedup=8.0, measure_latency=False)
    assert "residual-joined groups at full width: pruning them too" in caplog.text
    assert needed.report.totals.macs_speedup >= 8.0
    assert any(g.name in joined and g.channels_after < g.channels_before for g in needed.report.groups)
    check_pruned(needed.model, model, data[:8], max_rel_err=10)
    with pytest.raises(TargetNotMetError, match="--prune-residual lets them shrink too"):
        onnxprune.prune(model, data, speedup=8.0, prune_coupled=False, measure_latency=False)


def test_reachability_uses_the_floor_of_the_allocation_in_use():
    """Sensitivity curves stop at their grid's narrowest ratio, one uniform keep ratio goes down
    to a channel: some targets only the latter reaches (they decide whether residual-joined groups
    must shrink too)."""
    from onnxprune.allocation import Allocator
    from onnxprune.budget import Targets
    from onnxprune.options import PruneOptions
    from onnxprune.pipeline import Pruner

    model = tiny_vgg()
    pruner = Pruner(model, calib_for(model, 16), PruneOptions(measure_latency=False, progress=False))
    allocator = Allocator(pruner.cost, pruner.candidates, None)
    between = [s for s in np.linspace(1.5, 100, 200)
               if allocator.reachable(Targets(s), 1, curves=False) and not allocator.reachable(Targets(s), 1)]
    assert between


# ---------------------------------------------------------------- channels-last MLPs (ConvNeXt)
def convnext_block_net(opset: int = 17, share_scale: bool = False, grn: bool = False) -> onnx.ModelProto:
    """Stem conv, then a ConvNeXt block as torchvision exports it: depthwise 7×7 conv →
    Transpose(0,2,3,1) → LayerNormalization over C → MatMul (C→4C) + bias → GELU (Div/Erf/Add/Mul/Mul)
    → MatMul (4C→C) + bias → layer scale → Transpose back → residual Add; GAP and a Gemm head.
    ``share_scale``: the layer scale is an ``Identity`` of another initializer, as PyTorch's exporter
    writes weights equal to another one. ``grn``: ConvNeXt V2's global response norm after the GELU
    (as timm exports it: each channel's spatial ``ReduceL2`` divided by their ``ReduceMean`` over the
    channels, ``x + γ·(x·n) + β``)."""
    b = Builder(in_shape=("N", 3, "H", "W"), opset=opset)
    f32 = lambda v: b.const(np.array(v, np.float32))
    c, hidden = 8, 32
    x = b.conv("input", 3, c, k=2, stride=2, pad=0)
    y = b.conv(x, c, c, k=7, group=c)
    y = b.node("Transpose", [y], perm=[0, 2, 3, 1])
    y = b.node("LayerNormalization", [y, f32(RNG.uniform(0.5, 1.5, c)), f32(RNG.normal(0, 0.1, c))], axis=-1)
    y = b.node("MatMul", [y, f32(RNG.normal(0, c ** -0.5, (c, hidden)))])
    y = b.node("Add", [y, f32(RNG.normal(0, 0.1, hidden))])
    gelu = b.node("Add", [b.node("Erf", [b.node("Div", [y, f32(1.4142135)])]), f32(1.0)])
    y = b.node("Mul", [b.node("Mul", [y, gelu]), f32(0.5)])
    if grn:
        def reduce(op: str, t: str, axes: list[int]) -> str:  # axes an input from opset 18
            if opset >= 18:
                return b.node(op, [t, b.const(i64(*axes))], keepdims=1)
            return b.node(op, [t], axes=axes, keepdims=1)
        norms = reduce("ReduceL2", y, [1, 2])
        mean = reduce("ReduceMean", norms, [-1])
        scaled = b.node("Mul", [y, b.node("Div", [norms, b.node("Add", [mean, f32(1e-6)])])])
        affine = b.node("Add", [b.node("Mul", [scaled, f32(RNG.normal(0, 0.5, hidden))]), f32(RNG.normal(0, 0.1, hidden))])
        y = b.node("Add", [y, affine])
    y = b.node("MatMul", [y, f32(RNG.normal(0, hidden ** -0.5, (hidden, c)))])
    y = b.node("Add", [y, f32(RNG.normal(0, 0.1, c))])
    scale = f32(RNG.uniform(0.5, 1.5, c))
    if share_scale:
        scale = b.node("Identity", [scale])
    y = b.node("Transpose", [b.node("Mul", [y, scale])], perm=[0, 3, 1, 2])
    x = b.node("Add", [x, y])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.build(b.gemm(x, c, 5))


@pytest.mark.parametrize("opset", [17, 18])
def test_channels_last_mlp_hidden_channels_are_prunable(opset):
    model = convnext_block_net(opset)
    x = RNG.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    g, groups = analyse_at(model, x.shape)
    prunable = sorted(grp.channels for grp in groups if grp.owner and grp.prunable)
    assert prunable == [32], [(grp.channels, grp.reason) for grp in groups]  # the MLP's hidden width only
    assert_passes_through(model, 32, sizes=((2, 3, 16, 16), (3, 3, 20, 12)))


def test_channels_last_mlp_prunes_with_refit_and_counts_macs_per_position():
    model = convnext_block_net(share_scale=True)
    x = RNG.normal(0, 1, (96, 3, 16, 16)).astype(np.float32)
    refit = onnxprune.prune(model, x, speedup=1.3, measure_latency=False, allocation="uniform")
    plain = onnxprune.prune(model, x, speedup=1.3, measure_latency=False, allocation="uniform", reconstruct=False)
    layers = {row.node: row for row in refit.report.layers if row.op_type == "MatMul"}
    assert len(layers) == 2
    for row in layers.values():  # an 8×8 map: 64 positions per sample, channels read on the last axis
        assert row.macs[0] == 64 * 8 * 32 and sorted((row.in_channels[0], row.out_channels[0])) == [8, 32]
    assert refit.report.totals.macs_speedup >= 1.3 * 0.97
    err = check_pruned(refit.model, model, x[:16], max_rel_err=1.0)
    assert err < check_pruned(plain.model, model, x[:16], max_rel_err=10.0)


@pytest.mark.parametrize("opset", [17, 18])
def test_a_global_response_norm_leaves_the_mlp_prunable(opset):
    model = convnext_block_net(opset, grn=True)
    x = RNG.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    work = copy.deepcopy(model)
    shapes = tensor_shapes(work, load_calibration(x, work))
    assert fold_channel_means(work, shapes) == 1  # the mean over the channels as a sum and a scale
    assert not any(n.op_type == "ReduceMean" for n in work.graph.node)
    onnx.checker.check_model(work, full_check=True)
    np.testing.assert_allclose(run(work, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)
    groups = find_groups(GraphView(work, shapes))
    assert sorted(grp.channels for grp in groups if grp.owner and grp.prunable) == [32], \
        [(grp.channels, grp.reason) for grp in groups]
    # before the fold the mean holds the MLP's width, as a LayerNorm would
    assert not any(grp.prunable for grp in analyse_at(model, x.shape)[1] if grp.owner)


def test_a_global_response_norm_is_rescaled_after_the_cut(monkeypatch):
    model = convnext_block_net(grn=True)
    x = RNG.normal(0, 1, (96, 3, 16, 16)).astype(np.float32)
    rescaled = onnxprune.prune(model, x, speedup=1.3, measure_latency=False, allocation="uniform")
    scale = [n for n in rescaled.model.graph.node if n.op_type == "Mul" and n.input[0].endswith("/sum")]
    assert len(scale) == 1 and rescaled.report.totals.macs_speedup >= 1.3 * 0.97
    value = onnx.numpy_helper.to_array(next(t for t in rescaled.model.graph.initializer if t.name == scale[0].input[1]))
    assert value.size == 1 and value.item() > 1 / 32  # the sum over the channels kept, scaled up to the whole's
    monkeypatch.setattr("onnxprune.group_pruner._rescale_statistic", lambda *args: None)
    summed = onnxprune.prune(model, x, speedup=1.3, measure_latency=False, allocation="uniform")
    err = check_pruned(rescaled.model, model, x[:32], max_rel_err=1.0)
    assert err < check_pruned(summed.model, model, x[:32], max_rel_err=10.0)


def grn_conv_net(opset: int, spelling: str) -> onnx.ModelProto:
    """conv → ReLU → a global response norm on NCHW maps (the norms' mean over the channels as a
    ``ReduceMean``, or as ``ReduceSum`` then ``Div`` by the channel count) → conv; GAP and a Gemm."""
    b = Builder(opset=opset)
    f32 = lambda v: b.const(np.array(v, np.float32))
    x = b.node("Relu", [b.conv("input", 3, 16)])
    norms = b.node("ReduceL2", [x], axes=[2, 3], keepdims=1)
    if spelling == "mean":
        mean = b.node("ReduceMean", [norms], axes=[1], keepdims=1)
    else:
        summed = b.node("ReduceSum", [norms, b.const(i64(1))] if opset >= 13 else [norms], keepdims=1,
                        **({} if opset >= 13 else {"axes": [1]}))
        mean = b.node("Div", [summed, f32(16.0)])
    gamma = f32(RNG.normal(0, 0.5, (1, 16, 1, 1)))
    y = b.node("Add", [x, b.node("Mul", [b.node("Mul", [x, b.node("Div", [norms, b.node("Add", [mean, f32(1e-6)])])]),
                                         gamma])])
    return head(b, b.node("Relu", [b.conv(y, 16, 8)]), 8)


@pytest.mark.parametrize("opset,spelling", [(11, "mean"), (13, "mean"), (13, "sum")])
def test_a_global_response_norm_on_nchw_maps_at_older_opsets(opset, spelling):
    model = grn_conv_net(opset, spelling)
    x = RNG.normal(0, 1, (96, 3, 8, 8)).astype(np.float32)
    work = copy.deepcopy(model)
    shapes = tensor_shapes(work, load_calibration(x[:2], work))
    assert fold_channel_means(work, shapes) == (spelling == "mean")
    onnx.checker.check_model(work, full_check=True)
    np.testing.assert_allclose(run(work, x[:4])[0], run(model, x[:4])[0], rtol=1e-5, atol=1e-5)
    result = onnxprune.prune(model, x, speedup=1.3, measure_latency=False, allocation="uniform")
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)
    # the scale the sum is multiplied (or divided) by moved from 1/16 (16) towards the channels kept
    sums = {n.output[0] for n in result.model.graph.node if n.op_type == "ReduceSum"}
    scale = next(n for n in result.model.graph.node if n.input and n.input[0] in sums)
    value = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == scale.input[1])).item()
    assert (value > 1 / 16) if scale.op_type == "Mul" else (value < 16)


def test_layer_norm_is_a_barrier_that_says_why():
    g, groups = analyse_at(convnext_block_net(), (2, 3, 16, 16))
    residual = [grp for grp in groups if grp.owner and grp.channels == 8]
    assert residual and not any(grp.prunable for grp in residual)
    assert any(b.op_type == "LayerNormalization" for grp in residual for b in grp.blocked)


def crnn_head(recurrent: bool) -> onnx.ModelProto:
    """Conv → ReLU → mean over H → Transpose to a ``[T, N, C]`` sequence (T = 8) → an LSTM
    (hidden 6, bidirectional) or straight to a per-step MatMul."""
    b = Builder(in_shape=("N", 3, 4, 8))
    x = b.node("Relu", [b.conv("input", 3, 8)])
    seq = b.node("Transpose", [b.node("ReduceMean", [x], axes=[2], keepdims=0)], perm=[2, 0, 1])
    width = 8
    if recurrent:
        w = b.const(RNG.normal(0, 0.3, (2, 24, 8)).astype(np.float32))
        r = b.const(RNG.normal(0, 0.3, (2, 24, 6)).astype(np.float32))
        y = b.node("LSTM", [seq, w, r], hidden_size=6, direction="bidirectional")  # [T, 2, N, 6]
        seq, width = b.node("Reshape", [b.node("Transpose", [y], perm=[0, 2, 1, 3]), b.const(i64(0, 0, 12))]), 12
    return b.build(b.node("MatMul", [seq, b.const(RNG.normal(0, 0.3, (width, 5)).astype(np.float32))]))


def test_sequence_first_matmul_is_a_barrier_and_counts_every_step():
    """A ``[T, N, K]`` input (a CRNN's sequence after permute(2, 0, 1)): its axis 0 is not the
    batch, so a refit would sample time steps as images; the MatMul stays a barrier, and its MACs
    are those of all T steps."""
    g, groups = analyse_at(crnn_head(recurrent=False), (1, 3, 4, 8))
    assert not any(grp.prunable for grp in groups if grp.owner and grp.channels == 8)
    matmul = next(n for n in g.graph.node if n.op_type == "MatMul")
    assert handler_for(matmul).macs(matmul, g) == 8 * 8 * 5


def test_recurrent_layer_is_a_barrier_whose_macs_count():
    model = crnn_head(recurrent=True)
    g, groups = analyse_at(model, (1, 3, 4, 8))
    lstm = next(n for n in g.graph.node if n.op_type == "LSTM")
    assert handler_for(lstm).macs(lstm, g) == 8 * (2 * 24 * 8 + 2 * 24 * 6)  # T steps × (W + R)
    assert not any(grp.prunable for grp in groups if grp.owner and grp.channels == 8)
    summary = summarize(model, calibration_or_zeros(model, None, None))
    assert summary.macs == handler_for(lstm).macs(lstm, g) + sum(
        handler_for(n).macs(n, g) for n in g.graph.node if n.op_type in ("Conv", "MatMul"))
    why = {b.why for b in summary.barriers if b.op_type == "LSTM"}
    assert why == {"a recurrent layer: its input channels are not pruned"}


# ---------------------------------------------------------------- learned 2× upsampling (ConvTranspose)
def deconv_head(k: int = 2, stride: int = 2) -> onnx.ModelProto:
    """conv → ReLU → ConvTranspose (kernel ``k``, stride ``stride``) with bias → ReLU → conv: the
    head of a DBNet-style detector or a U-Net decoder step."""
    b = Builder(in_shape=("N", 3, "H", "W"))
    x = b.node("Relu", [b.conv("input", 3, 16)])
    w = b.const(RNG.normal(0, (2.0 / (16 * k * k)) ** 0.5, (16, 12, k, k)).astype(np.float32))
    bias = b.const(RNG.normal(0, 0.1, 12).astype(np.float32))
    x = b.node("Relu", [b.node("ConvTranspose", [x, w, bias], kernel_shape=[k, k], strides=[stride, stride])])
    return b.build(b.conv(x, 12, 2))


def test_tiled_conv_transpose_is_refit_like_a_pixel_layer():
    """A 2×2 stride-2 ConvTranspose writes each output pixel from one input pixel: the group it
    reads is pruned with its weights refit (better than sliced), and so is the group it writes."""
    model = deconv_head()
    x = RNG.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)
    g, groups = analyse_at(model, (1, 3, 8, 8))
    deconv = next(n for n in g.graph.node if n.op_type == "ConvTranspose")
    h = handler_for(deconv)
    assert h.reconstructable(deconv, g)
    # the pixel-layer view reproduces the op: outputs sampled at every input pixel
    xin = RNG.normal(0, 1, (2, 16, 8, 8)).astype(np.float32)
    import onnxruntime as ort
    single = onnx.helper.make_model(onnx.helper.make_graph(
        [deconv], "d", [onnx.helper.make_tensor_value_info(deconv.input[0], onnx.TensorProto.FLOAT, [2, 16, 8, 8])],
        [onnx.helper.make_tensor_value_info(deconv.output[0], onnx.TensorProto.FLOAT, None)],
        [t for t in model.graph.initializer if t.name in deconv.input]), opset_imports=model.opset_import)
    y = ort.InferenceSession(single.SerializeToString()).run(None, {deconv.input[0]: xin})[0]
    pos = np.tile(np.arange(64), (2, 1))
    patches, targets = h.sample_patches(deconv, g, xin, pos), h.sample_outputs(deconv, g, y, pos)
    assert np.allclose(patches @ h.weight_matrix(deconv, g).T + h.bias(deconv, g), targets, atol=1e-4)
    refit = onnxprune.prune(model, x, speedup=1.4, measure_latency=False, allocation="uniform")
    plain = onnxprune.prune(model, x, speedup=1.4, measure_latency=False, allocation="uniform", reconstruct=False)
    pruned = {grp.name: grp for grp in refit.report.groups}
    assert len(pruned) == 2 and all(grp.channels_after < grp.channels_before for grp in pruned.values())
    err = check_pruned(refit.model, model, x[:16], max_rel_err=1.0)
    assert err < check_pruned(plain.model, model, x[:16], max_rel_err=10.0)
    check_pruned(refit.model, model, RNG.normal(0, 1, (2, 3, 12, 10)).astype(np.float32), max_rel_err=1.0)


def test_overlapping_conv_transpose_is_sliced_not_refit():
    model = deconv_head(k=4, stride=2)
    g, _ = analyse_at(model, (1, 3, 8, 8))
    deconv = next(n for n in g.graph.node if n.op_type == "ConvTranspose")
    assert not handler_for(deconv).reconstructable(deconv, g)


def test_layers_on_token_rows_are_neither_pruned_nor_refit():
    """Attention exports read tokens as rows: ``[T, N, C]`` (time-major) or ``[T·N, C]``. Axis 0 is
    not the batch there, so such a MatMul/Gemm is never sampled as if its rows were images — not as a
    consumer, nor as a layer downstream of a pruned group — and its MACs count every row."""
    b = Builder(in_shape=("N", 3, 4, 4))
    x = b.node("Relu", [b.conv("input", 3, 8)])
    x = b.node("Relu", [b.conv(x, 8, 8)])
    tokens = b.node("Transpose", [b.node("Reshape", [x, b.const(i64(0, 8, 16))])], perm=[2, 0, 1])  # [16, N, 8]
    w = b.const(RNG.normal(0, 0.3, (8, 6)).astype(np.float32))
    rows = b.node("Reshape", [b.node("MatMul", [tokens, w]), b.const(i64(-1, 6))])  # [16·N, 6]
    model = b.build(b.gemm(rows, 6, 5))
    x = RNG.normal(0, 1, (48, 3, 4, 4)).astype(np.float32)
    g, _ = analyse_at(model, (1, 3, 4, 4))
    for node in g.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            h = handler_for(node)
            assert not h.reconstructable(node, g) and h.rule(node, g) is None
            assert h.macs(node, g) == 16 * int(np.prod(g.input_const(node, 1).shape))
    result = onnxprune.prune(model, x, speedup=1.2, measure_latency=False)
    assert [grp.channels_after < grp.channels_before for grp in result.report.groups] == [True]
    check_pruned(result.model, model, x[:8], max_rel_err=1.0)


def test_model_that_only_runs_batch_one_is_pruned_one_sample_at_a_time(caplog):
    """``x.view(1, -1)`` exported with a dynamic batch: batch 2 fails inside the graph. Every pass
    then runs one sample and the pruned model declares batch 1 (what it could ever run)."""
    b = Builder(in_shape=("N", 3, 8, 8))
    x = b.node("Relu", [b.conv("input", 3, 8)])
    x = b.node("Relu", [b.conv(x, 8, 8)])
    x = b.node("Reshape", [x, b.const(i64(1, -1))])
    model = b.build(b.gemm(x, 512, 5), out_shape=[1, 5])
    x = RNG.normal(0, 1, (40, 3, 8, 8)).astype(np.float32)
    with caplog.at_level("WARNING", logger="onnxprune"):
        result = onnxprune.prune(model, x, speedup=1.3, measure_latency=False)
    assert "runs one sample at a time" in caplog.text
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # the caller's model is untouched
    assert result.report.totals.macs_speedup >= 1.3 * 0.97
    check_pruned(result.model, model, x[:1], max_rel_err=1.0)


def static_batch_one_classifier(flatten: tuple[int, ...] = (-1, 512), allowzero: int = 0) -> onnx.ModelProto:
    """A conv classifier exported at batch 1 (torch's default): input and output declare 1 and
    value_info says 1 all through; ``flatten``: its Reshape's constant target (the dynamo exporter
    folds ``x.view(x.size(0), -1)`` to ``(1, 512)``, with ``allowzero``)."""
    b = Builder(in_shape=(1, 3, 8, 8), opset=14)
    x = b.node("Relu", [b.conv("input", 3, 8)])
    x = b.node("Relu", [b.conv(x, 8, 8)])
    x = b.node("Reshape", [x, b.const(i64(*flatten))], allowzero=allowzero)
    return b.build(b.gemm(x, 512, 5))


@pytest.mark.parametrize("flatten,allowzero", [((-1, 512), 0), ((1, 512), 0), ((1, -1), 0), ((1, 512), 1)])
def test_model_declaring_batch_one_is_pruned_with_batched_passes_and_keeps_its_declaration(monkeypatch, flatten,
                                                                                          allowzero):
    """Exporters declare batch 1 unless told otherwise; every pass (statistics, probes, refits)
    then ran one image. A graph that computes each sample alone runs them batched (a Reshape
    target writing the batch's 1 copies it from its input meanwhile), and the pruned model
    declares batch 1 and writes its Reshape's 1 as the original does."""
    from onnxprune import frontier as frontier_module
    from onnxprune.pipeline import Pruner

    model = static_batch_one_classifier(flatten, allowzero)
    assert model.graph.value_info and model.graph.output[0].type.tensor_type.shape.dim[0].dim_value == 1
    x = RNG.normal(0, 1, (40, 3, 8, 8)).astype(np.float32)
    fed = []
    real_session = frontier_module.session

    def recording_session(*args, **kwargs):
        sess = real_session(*args, **kwargs)
        run_ = sess.run
        sess.run = lambda names, feed, *rest: fed.append(len(next(iter(feed.values())))) or run_(names, feed, *rest)
        return sess

    monkeypatch.setattr(frontier_module, "session", recording_session)
    pruner = Pruner(model, x, PruneOptions(speedup=1.3, measure_latency=False))
    assert [d.dim_param for d in (pruner.work.graph.input[0].type.tensor_type.shape.dim[0],
                                  pruner.work.graph.output[0].type.tensor_type.shape.dim[0])] == ["onnxprune_batch"] * 2
    assert pruner.freed == ([] if flatten[0] == -1 else [model.graph.node[-2].name])
    result = pruner.run()
    assert max(fed) > 1  # carried activations run several images per pass
    for value in (result.model.graph.input[0], result.model.graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_value == 1
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # the caller's model is untouched
    (reshape,) = [n for n in result.model.graph.node if n.op_type == "Reshape"]
    target = next(t for t in result.model.graph.initializer if t.name == reshape.input[1])
    assert onnx.numpy_helper.to_array(target)[0] == flatten[0]  # the channel count may have been rewritten
    assert len({t.name for t in result.model.graph.initializer}) == len(result.model.graph.initializer)
    assert result.report.totals.macs_speedup >= 1.3 * 0.97
    check_pruned(result.model, model, x[:1], max_rel_err=1.0)


def test_resize_to_constant_sizes_at_batch_one_runs_batched_and_keeps_its_sizes(monkeypatch):
    """The dynamo exporter folds ``F.interpolate(x, size=...)`` to a Resize with constant sizes
    ``[1, C, H, W]`` (a segmentation head, two of them here): the sizes read the batch from the
    input's shape while the passes run, and the pruned model has constant sizes again, a channel
    entry pruned where its channels were."""
    from onnxprune.pipeline import Pruner

    b = Builder(in_shape=(1, 3, 8, 8), opset=18)
    x = b.node("Relu", [b.conv("input", 3, 8)])
    x = b.node("Relu", [b.conv(x, 8, 8)])
    x = b.node("Resize", [x, "", "", b.const(i64(1, 8, 16, 16))], mode="linear")
    model = b.build(b.node("Resize", [b.conv(x, 8, 4), "", "", b.const(i64(1, 4, 20, 20))], mode="linear"))
    x = RNG.normal(0, 1, (40, 3, 8, 8)).astype(np.float32)
    pruner = Pruner(model, x, PruneOptions(speedup=1.3, measure_latency=False))
    resizes = [n.name for n in pruner.work.graph.node if n.op_type == "Resize"]
    assert pruner.freed == resizes and len(resizes) == 2
    assert pruner.work.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    result = pruner.run()
    assert result.report.totals.macs_speedup >= 1.3 * 0.97
    graph = result.model.graph
    assert [n.op_type for n in graph.node].count("Concat") == 0 and not any("onnxprune" in t.name for t in graph.initializer)
    resize, last = [n for n in graph.node if n.op_type == "Resize"]
    sizes = onnx.numpy_helper.to_array(next(t for t in graph.initializer if t.name == resize.input[3]))
    kept = [grp.channels_after for grp in result.report.groups if grp.channels_before == 8]
    assert list(sizes) == [1, sizes[1], 16, 16] and sizes[1] in kept and sizes[1] < 8
    assert list(onnx.numpy_helper.to_array(next(t for t in graph.initializer if t.name == last.input[3]))) == [1, 4, 20, 20]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    check_pruned(result.model, model, x[:1], max_rel_err=1.0)


def test_model_declaring_batch_one_that_folds_it_away_runs_one_sample_at_a_time():
    """A Reshape to ``[8, 64]`` drops the batch dim (one sample's channels as rows): two samples
    cannot pass, so the passes stay at one image and the pruned model is as declared."""
    from onnxprune.pipeline import Pruner

    b = Builder(in_shape=(1, 3, 8, 8))
    x = b.node("Relu", [b.conv("input", 3, 8)])
    x = b.node("Relu", [b.conv(x, 8, 8)])
    x = b.node("Reshape", [b.node("Reshape", [x, b.const(i64(8, 64))]), b.const(i64(1, 8, 8, 8))])
    model = b.build(b.conv(x, 8, 4))
    x = RNG.normal(0, 1, (40, 3, 8, 8)).astype(np.float32)
    pruner = Pruner(model, x, PruneOptions(speedup=1.2, measure_latency=False))
    assert pruner.work.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert pruner.freed == []
    result = pruner.run()
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    check_pruned(result.model, model, x[:1], max_rel_err=1.0)


def test_batches_like_singles_finds_a_graph_that_mixes_samples():
    """A Reshape to ``[-1, 64]`` stacks one sample's channels as rows, a Softmax runs over them,
    and a Reshape back restores the shape: at batch 2 the shapes come out right but the
    samples' values mix."""
    from onnxprune.batch import batches_like_singles, free_batch
    from onnxprune.calib import Calibration

    def graph(mixing: bool):
        b = Builder(in_shape=(1, 3, 8, 8))
        x = b.node("Relu", [b.conv("input", 3, 8)])
        if mixing:
            x = b.node("Softmax", [b.node("Reshape", [x, b.const(i64(-1, 64))])], axis=0)
        return b.build(b.node("Reshape", [x, b.const(i64(-1, 8, 8, 8))]))

    cal = Calibration({"input": RNG.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)})
    for mixing in (False, True):
        model = graph(mixing)
        free_batch(model, {})
        assert batches_like_singles(model, cal) is not mixing


def test_latency_search_times_the_layers_it_can_rebuild_and_leaves_conv_transpose_to_the_rest(monkeypatch):
    """--latency on a detector-style head: the ConvTranspose is timed with the rest of the model
    (it was an internal error: its weight is [Cin, Cout, k, k])."""
    from onnxprune.latency_search import LatencySearch

    calls = []

    def predicted(self, plan):
        timed = {self.cost.entries[layer.entry].node for layer in self.cost.latency.layers}
        assert timed and not any("convtranspose" in name for name in timed), timed
        calls.append(plan)
        return self.cost.latency_ms({}) / self.cost.latency_ms(plan.widths)

    monkeypatch.setattr(LatencySearch, "measured_speedup", predicted)
    model = deconv_head()
    x = RNG.normal(0, 1, (48, 3, 16, 16)).astype(np.float32)
    try:
        result = onnxprune.prune(model, x, latency=1.2, allocation="uniform", measure_latency=False)
    except TargetNotMetError:  # sub-millisecond layers: on a busy machine their timings may put 1.2x out of reach
        assert calls
        return
    check_pruned(result.model, model, x[:8], max_rel_err=1.0)


def conv3d_clip_model() -> onnx.ModelProto:
    """A video-style network: two 3-D convs (3×3×3, the second strided in space) on ``[N, 3, 4, 6, 6]``
    clips, global pooling and a classifier."""
    b = Builder(in_shape=("N", 3, 4, 6, 6))

    def conv3d(x, cin, cout, **attrs):
        w = b.const(RNG.normal(0, (2.0 / (cin * 27)) ** 0.5, (cout, cin, 3, 3, 3)).astype(np.float32), "w")
        return b.node("Relu", [b.node("Conv", [x, w, b.const(RNG.normal(0, 0.1, cout).astype(np.float32), "b")],
                                      kernel_shape=[3, 3, 3], **attrs)])

    x = conv3d("input", 3, 16, pads=[1] * 6)
    x = conv3d(x, 16, 16, pads=[1, 1, 1, 1, 0, 1], strides=[1, 2, 2])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    return b.build(b.gemm(x, 16, 5))


def test_3d_convs_are_sampled_and_refit():
    """A conv over three spatial dims (video, volumes) is a linear layer of its 3-D patches like a
    2-D one: its sampled patches reproduce the op, and pruning refits it."""
    model = conv3d_clip_model()
    x = RNG.normal(0, 1, (48, 3, 4, 6, 6)).astype(np.float32)
    g, _ = analyse_at(model, (1, 3, 4, 6, 6))
    second = [n for n in g.graph.node if n.op_type == "Conv"][1]
    h = handler_for(second)
    assert h.reconstructable(second, g)
    xin = RNG.normal(0, 1, (2, 16, 4, 6, 6)).astype(np.float32)
    import onnxruntime as ort
    single = onnx.helper.make_model(onnx.helper.make_graph(
        [second], "c", [onnx.helper.make_tensor_value_info(second.input[0], onnx.TensorProto.FLOAT, [2, 16, 4, 6, 6])],
        [onnx.helper.make_tensor_value_info(second.output[0], onnx.TensorProto.FLOAT, None)],
        [t for t in model.graph.initializer if t.name in second.input]), opset_imports=model.opset_import)
    y = ort.InferenceSession(single.SerializeToString()).run(None, {second.input[0]: xin})[0]
    pos = RNG.integers(0, int(np.prod(y.shape[2:])), (2, 9))
    patches = h.sample_patches(second, g, xin, pos)
    assert np.allclose(patches @ h.weight_matrix(second, g).T + h.bias(second, g), h.sample_outputs(second, g, y, pos),
                       atol=1e-4)
    flat, inside = h.input_positions(second, g, pos)
    assert flat.shape == inside.shape == (2, 9, 27) and not inside.all()  # the padded border is read
    refit = onnxprune.prune(model, x, speedup=1.5, measure_latency=False, allocation="uniform")
    plain = onnxprune.prune(model, x, speedup=1.5, measure_latency=False, allocation="uniform", reconstruct=False)
    assert refit.report.totals.macs_speedup >= 1.5 * 0.97
    err = check_pruned(refit.model, model, x[:16], max_rel_err=1.0)
    assert err < check_pruned(plain.model, model, x[:16], max_rel_err=10.0)


def unbatched_input_model() -> onnx.ModelProto:
    """A model that takes one image without a batch axis (``[3, 8, 8]``, as torchvision's
    detectors export) and adds it inside."""
    b = Builder(in_shape=(3, 8, 8))
    x = b.node("Unsqueeze", ["input", b.const(i64(0))])
    x = b.node("Relu", [b.conv(x, 3, 8)])
    x = b.node("Relu", [b.conv(x, 8, 8)])
    return b.build(b.gemm(b.node("Flatten", [b.node("GlobalAveragePool", [x])]), 8, 4))


def test_input_without_a_batch_axis_gets_one_while_pruned(tmp_path, capsys):
    """Samples are fed along a batch axis. Images stacked on a new axis for an input that has none
    (``[3, 8, 8]``, as torchvision's detectors take) are fed one at a time through an axis added
    while the model is pruned: the written model declares the input as the original did, with no
    trace of the axis. One image alone would feed its channels as samples: a one-line error (exit 2,
    nothing written). A data-free run needs no samples and prunes too."""
    from onnxprune.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(unbatched_input_model(), src)
    np.save(tmp_path / "one.npy", RNG.normal(0, 1, (3, 8, 8)).astype(np.float32))
    assert main([str(src), "--speedup", "1.3", "--calib", str(tmp_path / "one.npy"), "-o", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "batch axis" in lines[0] and "'input'" in lines[0], lines
    assert not out.exists()
    x = RNG.normal(0, 1, (40, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "stacked.npy", x)
    assert main([str(src), "--speedup", "1.3", "--calib", str(tmp_path / "stacked.npy"), "--no-latency", "--max-drop", "0.99",
                 "-o", str(out)]) == 0
    pruned = onnx.load(out)
    assert [d.dim_value for d in pruned.graph.input[0].type.tensor_type.shape.dim] == [3, 8, 8]
    assert not any("onnxprune" in n.name for n in pruned.graph.node) and \
        not any("onnxprune" in t.name for t in pruned.graph.initializer)
    assert min(t.dims[0] for t in pruned.graph.initializer if len(t.dims) == 4) < 8
    check_pruned(pruned, unbatched_input_model(), x[0], max_rel_err=1.0)
    assert main([str(src), "--speedup", "1.3", "--method", "l1", "--no-reconstruct", "--no-latency", "-o", str(out),
                 "--force"]) == 0
    assert "not checked against the original: no calibration data" in capsys.readouterr().out
    check_pruned(onnx.load(out), unbatched_input_model(), x[0], max_rel_err=2.0)


def windowed_conv_model() -> onnx.ModelProto:
    """Convs on the batch-first map around one that runs on 2 × 2 windows folded into the batch axis
    (``[N·4, 8, 4, 4]``, as EfficientViT's attention partitions its map), GAP, Gemm."""
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 16)])
    x = b.node("Relu", [b.conv(x, 16, 8)])
    x = b.node("Transpose", [b.node("Reshape", [x, b.const(i64(-1, 8, 2, 4, 2, 4))])], perm=[0, 2, 4, 1, 3, 5])
    x = b.node("Relu", [b.conv(b.node("Reshape", [x, b.const(i64(-1, 8, 4, 4))]), 8, 8)])
    x = b.node("Transpose", [b.node("Reshape", [x, b.const(i64(-1, 2, 2, 8, 4, 4))])], perm=[0, 3, 1, 4, 2, 5])
    x = b.node("Relu", [b.conv(b.node("Reshape", [x, b.const(i64(-1, 8, 8, 8))]), 8, 16)])
    return b.build(b.gemm(b.node("Flatten", [b.node("GlobalAveragePool", [x])]), 16, 4))


def test_a_conv_over_windows_folded_into_the_batch_is_kept_and_the_rest_pruned(tmp_path):
    """A conv that runs several rows of its batch axis per sample (windows of the map folded into
    it) cannot be sampled as images: it keeps its channels and is not refit, its MACs count every
    window, and the convs around it are pruned and refit. Before, the whole model was refused
    ("runs 4 rows on its batch axis for 1 sample(s)"); a model whose every conv runs so still is."""
    model = windowed_conv_model()
    g, _ = analyse_at(model)
    windowed = [n for n in g.graph.node if n.op_type == "Conv"][2]
    assert g.shape(windowed.input[0])[0] == 4 and not handler_for(windowed).reconstructable(windowed, g)
    assert handler_for(windowed).macs(windowed, g) == 8 * 8 * 9 * 16 * 4
    x = RNG.normal(0, 1, (96, 3, 8, 8)).astype(np.float32)
    result = onnxprune.prune(model, x, speedup=1.3, measure_latency=False)
    weights = {t.name: t.dims for t in result.model.graph.initializer}
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert list(weights[convs[2].input[1]]) == [8, 8, 3, 3]
    assert weights[convs[0].input[1]][0] < 16 or weights[convs[3].input[1]][0] < 16
    assert result.report.totals.macs_speedup >= 1.3 * 0.97
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)


def test_inspect_bench_and_gate_run_a_model_without_a_batch_axis(tmp_path, capsys):
    """``inspect``, ``bench`` and ``gate`` on a model whose input has no batch axis, with its samples
    stacked on a new axis or with no data (the axis read from the graph): the input is listed as
    declared, and the model runs one sample at batch 1. Before, ``bench`` with data stopped in an
    internal error (rank 4 fed to a rank-3 input), and without data listed the channels as a batch
    of 3 (its samples/s three times too high)."""
    from onnxprune.batch import inputs_without_batch_axis
    from onnxprune.cli import main

    src = tmp_path / "m.onnx"
    model = unbatched_input_model()
    onnx.save(model, src)
    assert inputs_without_batch_axis(model) == {"input"} and not inputs_without_batch_axis(tiny_vgg())
    from onnxprune.calib import load_calibration
    from onnxprune.summary import runnable

    once = runnable(model, load_calibration(RNG.normal(0, 1, (2, 3, 8, 8)).astype(np.float32), model))
    assert runnable(once, load_calibration(np.zeros((2, 3, 8, 8), np.float32), model)) is once  # has the axis
    np.save(tmp_path / "stacked.npy", RNG.normal(0, 1, (4, 3, 8, 8)).astype(np.float32))
    for data in ([], ["--calib", str(tmp_path / "stacked.npy")]):
        assert main(["inspect", str(src), *data]) == 0
        assert "input   input 3x8x8" in capsys.readouterr().out
        assert main(["bench", str(src), str(src), "--batch", "1", "8", "--repeats", "3", *data]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
        assert len(rows) == 2 and all(row[1] == "1" for row in rows), rows
        assert main(["gate", str(src), "--reference", str(src), "--max-macs", "1", "--min-speedup", "0.5", *data]) == 0


@pytest.mark.parametrize("compared_bytes", [1 << 27, 1])  # all layers in one comparison run, or one each
def test_dynamic_batch_model_that_mixes_samples_is_pruned_one_sample_at_a_time(caplog, monkeypatch, compared_bytes):
    """A model declaring a dynamic batch whose graph mixes the samples of a batch (a Softmax over
    one sample's channels stacked as rows: at batch 2 the shapes come out right): its statistics
    would mix images, so every pass runs one sample, as for a model that fails at batch 2. A
    time-major output (``[T, N, C]``: the batch on axis 1) batches as it should."""
    from onnxprune import batch
    from onnxprune.batch import batches_like_singles
    from onnxprune.calib import Calibration

    monkeypatch.setattr(batch, "COMPARED_BYTES", compared_bytes)
    b = Builder(in_shape=("N", 3, 8, 8))
    x = b.node("Relu", [b.conv("input", 3, 8)])
    x = b.node("Relu", [b.conv(x, 8, 8)])
    x = b.node("Softmax", [b.node("Reshape", [x, b.const(i64(-1, 64))])], axis=0)
    x = b.node("Reshape", [x, b.const(i64(-1, 512))])
    model = b.build(b.gemm(x, 512, 5))
    x = RNG.normal(0, 1, (40, 3, 8, 8)).astype(np.float32)
    with caplog.at_level("WARNING", logger="onnxprune"):
        result = onnxprune.prune(model, x, speedup=1.3, measure_latency=False)
    assert "mixes the samples" in caplog.text
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    check_pruned(result.model, model, x[:1], max_rel_err=1.0)

    b = Builder(in_shape=("N", 3, 8, 8))
    x = b.node("ReduceMean", [b.node("Relu", [b.conv("input", 3, 8)])], axes=[2], keepdims=0)  # [N, 8, W]
    model = b.build(b.node("Transpose", [x], perm=[2, 0, 1]))  # [W, N, 8]
    assert batches_like_singles(model, Calibration({"input": RNG.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)}))


def _with_subnormal_weights(model: onnx.ModelProto, share: float = 0.5) -> tuple[onnx.ModelProto, str]:
    """``model`` with ``share`` of its second conv's weights subnormal (as weight decay leaves
    them); and that weight's name."""
    model = copy.deepcopy(model)
    conv = [n for n in model.graph.node if n.op_type == "Conv"][1]
    init = next(t for t in model.graph.initializer if t.name == conv.input[1])
    w = onnx.numpy_helper.to_array(init).copy()
    tiny = RNG.random(w.shape) < share
    w[tiny] = np.sign(w[tiny]) * 1e-40
    init.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), init.name))
    return model, init.name


def test_subnormal_weights_are_counted_and_flushed_in_initializers_and_constants():
    b = Builder(in_shape=("N", 2))
    w = b.const(np.array([[1e-40, -1e-39, 0.0], [np.finfo(np.float32).tiny, 1.0, -2e-45]], np.float32), "w")
    h = b.const(np.array([3e-8, 1e-3, 0.0], np.float16), "h")  # below float16's smallest normal (6.1e-5), left
    k = b.const(np.array([0, 1], np.int64), "k")
    c = b.node("Constant", [], value=onnx.numpy_helper.from_array(np.array([1e-41, 5.0], np.float32), "cv"))
    y = b.node("Add", [b.node("MatMul", ["input", w]), b.node("Cast", [b.node("Mul", [h, h])], to=1)])
    model = b.build(y, b.node("Add", [c, b.node("Cast", [k], to=1)]))
    before = copy.deepcopy(model)
    assert subnormal_weights(model) == {w: 3, "cv": 1}
    assert model == before  # counting leaves the model as it is
    assert flush_subnormal_weights(model) == {w: 3, "cv": 1}
    assert subnormal_weights(model) == {}
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert values[w].tolist() == [[0.0, 0.0, 0.0], [np.finfo(np.float32).tiny, 1.0, 0.0]]
    assert values[h].tolist() == [np.float16(3e-8), np.float16(1e-3), 0.0] and values[k].tolist() == [0, 1]
    onnx.checker.check_model(model, full_check=True)


def test_subnormal_weights_are_zero_in_the_pruned_model_and_the_given_one_is_untouched(caplog):
    model, name = _with_subnormal_weights(tiny_vgg())
    given = copy.deepcopy(model)
    x = calib_for(model)
    with caplog.at_level("WARNING"):
        result = onnxprune.prune(model, x, speedup=1.3, seed=0)
    assert model == given
    assert subnormal_weights(model)[name] > 100 and subnormal_weights(result.model) == {}
    assert f"subnormal weights (nonzero, below the smallest normal float, 1.2e-38 in float32; " \
           f"{subnormal_weights(model)[name]} of them in '{name}')" in caplog.text
    check_pruned(result.model, model, x, 0.5)  # against the model as given, subnormal weights and all
    summary = summarize(model, calibration_or_zeros(model, None, None))  # as inspect reads it
    assert model == given
    assert summary.subnormal_weights == subnormal_weights(model)[name]
    assert f"subnormal weights: {summary.subnormal_weights} (" in summary.text()


def shared_head(decoder: bool = False) -> onnx.ModelProto:
    """Two pyramid levels (8×8 and 4×4 maps from their own convs) and one head conv run on both
    with the same weights, as torchvision's FCOS and RetinaNet export their heads; with
    ``decoder``, a ``ConvTranspose`` reads that weight too (tied encoder and decoder weights)."""
    b = Builder(in_shape=("N", 3, 8, 8))
    x = b.node("Relu", [b.conv("input", 3, 16)])
    levels = [b.node("Relu", [b.conv(x, 16, 16, stride=stride)]) for stride in (1, 2)]
    w, bias = b.const(RNG.normal(0, 0.3, (8, 16, 3, 3)).astype(np.float32)), b.const(np.zeros(8, np.float32))
    heads = [b.node("Relu", [b.node("Conv", [level, w, bias], kernel_shape=[3, 3], pads=[1] * 4)]) for level in levels]
    outs = [b.conv(h, 8, 2, k=1, pad=0) for h in heads]
    if decoder:
        outs.append(b.node("ConvTranspose", [heads[0], w], kernel_shape=[3, 3], pads=[1] * 4))
    return b.build(*outs)


def _weight_readers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv" and sum(n.input[1] in m.input for m in model.graph.node) > 1]


@pytest.mark.parametrize("method", ["auto", "l1"])
def test_layers_sharing_a_weight_are_pruned_alike_refit_together_and_keep_one_weight(method):
    model = shared_head()
    shared = _weight_readers(model)
    assert len(shared) == 2
    _, groups = analyse_at(model)
    for side in ([c.input[0] for c in shared], [c.output[0] for c in shared]):  # both levels: one group
        group = next(grp for grp in groups if side[0] in grp.tensors)
        assert side[1] in group.tensors and not group.blocked
    x = calib_for(model)
    result = onnxprune.prune(model, x, speedup=1.5, seed=0, round_to=1, method=method)
    heads = [n for n in result.model.graph.node if n.name in {c.name for c in shared}]
    g = GraphView(result.model)
    assert len({n.input[1] for n in heads}) == 1 and len({n.input[2] for n in heads}) == 1  # one weight, one bias
    assert g.const(heads[0].input[1]).shape[1] < 16 or g.const(heads[0].input[1]).shape[0] < 8  # and it was cut
    check_pruned(result.model, model, x, 0.5 if method == "auto" else 0.8)  # l1: sliced, not refit


def test_layers_sharing_a_weight_are_refit_together_where_only_their_inputs_drift():
    model = shared_head()
    heads = _weight_readers(model)
    x = calib_for(model)
    result = onnxprune.prune(model, x, speedup=1.15, seed=0, round_to=1, exclude=[heads[0].input[0], heads[0].output[0]])
    # only the stem is cut: the heads' inputs drift
    g, pruned = GraphView(result.model), [n for n in result.model.graph.node if n.name in {h.name for h in heads}]
    assert g.const(pruned[0].input[1]).shape == (8, 16, 3, 3)  # not cut
    assert len({n.input[1] for n in pruned}) == 1 and len({n.input[2] for n in pruned}) == 1
    assert not np.array_equal(g.const(pruned[0].input[1]), GraphView(model).const(heads[0].input[1]))  # refit
    check_pruned(result.model, model, x, 0.5)


def test_stripe_pruning_leaves_a_shared_weight_whole_and_shared():
    model = shared_head()
    heads = _weight_readers(model)
    x = calib_for(model)
    result = onnxprune.prune(model, x, speedup=1.2, seed=0, method="stripe")
    pruned = [n for n in result.model.graph.node if n.name in {h.name for h in heads}]
    assert len({n.input[1] for n in pruned}) == 1
    np.testing.assert_array_equal(GraphView(result.model).const(pruned[0].input[1]),
                                  GraphView(model).const(heads[0].input[1]))
    check_pruned(result.model, model, x, 0.5)


def test_2_4_sparsity_leaves_a_shared_weight_dense_and_shared():
    model = shared_head()
    heads = _weight_readers(model)
    x = calib_for(model, 128)
    result = onnxprune.prune(model, x, speedup=1.1, seed=0, round_to=1, sparsity="2:4", measure_latency=False,
                             exclude=[heads[0].input[0]])  # 16 input channels: wide enough to go sparse
    pruned = [n for n in result.model.graph.node if n.name in {h.name for h in heads}]
    assert len({n.input[1] for n in pruned}) == 1
    assert {layer["skipped"] for layer in result.report.sparsity if layer["node"] in {h.name for h in heads}} == \
        {"its weight is shared with other nodes"}
    check_pruned(result.model, model, x, 0.5)


def test_a_weight_also_read_by_another_kind_of_layer_keeps_its_channels():
    model = shared_head(decoder=True)
    _, groups = analyse_at(model)
    head = _weight_readers(model)[0]
    assert any("shares its weight" in str(b) and "that read it otherwise" in str(b)
               for b in next(grp.blocked for grp in groups if head.output[0] in grp.tensors))
    x = calib_for(model)
    result = onnxprune.prune(model, x, speedup=1.1, seed=0, round_to=1)
    assert sum(head.input[1] in n.input[1:2] for n in result.model.graph.node) == 3  # untouched, still shared
    check_pruned(result.model, model, x, 0.5)


def test_a_half_precision_model_keeps_its_float16_weights_small_ones_included(caplog):
    model = copy.deepcopy(tiny_vgg())
    for init in model.graph.initializer:
        w = onnx.numpy_helper.to_array(init).astype(np.float16)
        w.flat[::7] = np.float16(3e-6)  # below float16's smallest normal: a value like any other here
        init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    del model.graph.value_info[:]
    x = calib_for(model).astype(np.float16)
    with caplog.at_level("WARNING"):
        result = onnxprune.prune(model, x, speedup=1.3, seed=0)
    assert "subnormal" not in caplog.text
    weights = [onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer]
    assert {w.dtype for w in weights if w.dtype.kind == "f"} == {np.dtype(np.float16)}
    assert sum(int((w == np.float16(3e-6)).sum()) for w in weights) > 0
    check_pruned(result.model, model, x, 0.5)


def mbconv_static_pad(pads: str, opset: int = 13, mode: str = "constant", value: float = 0.0,
                      reader: str = "Conv") -> onnx.ModelProto:
    """A depthwise-separable block whose TF "same" padding is a ``Pad`` with amounts known ahead
    of run time (12×12 maps, stride 2: 0 before, 1 after): ``pads`` "const" (an initializer, as
    Keras' ``ZeroPadding2D``), "torch" (computed from constants, as the export of
    EfficientNet-Lite's static same padding has it) or "attr" (opset 10's attribute)."""
    b = Builder(in_shape=("N", 3, 12, 12), opset=opset)
    x = b.node("Clip", [b.conv("input", 3, 16), b.const(np.float32(0)), b.const(np.float32(6))]) \
        if opset >= 11 else b.node("Relu", [b.conv("input", 3, 16)])
    amounts = i64(0, 0, 0, 0, 0, 0, 1, 1)
    if pads == "attr":
        padded = b.node("Pad", [x], pads=list(amounts), mode=mode, value=value)
    else:
        given = b.const(amounts) if pads == "const" else \
            torch_pads(b, b.const(i64(0)), b.const(i64(0)), b.const(i64(1)), b.const(i64(1)))
        padded = b.node("Pad", [x, given, b.const(np.float32(value))], mode=mode)
    if reader == "Conv":
        x = b.node("Relu", [b.conv(padded, 16, 16, stride=2, group=16, pad=0)])
    else:
        x = b.node("MaxPool", [padded], kernel_shape=[3, 3], strides=[2, 2])
    return head(b, b.node("Relu", [b.conv(x, 16, 12, k=1, pad=0)]), 12)


@pytest.mark.parametrize("pads,opset", [("const", 13), ("torch", 13), ("attr", 10), ("run-time, fixed size", 13)])
def test_zero_padding_known_ahead_folds_into_the_conv_and_the_block_is_refined(pads, opset):
    """A zero ``Pad`` before a depthwise conv, its amounts known ahead of run time (constants, or
    computed from a size the model declares fixed), becomes the conv's own padding (same
    outputs); the pointwise conv then reads the depthwise conv through its activation alone, so
    the block is refined through it, and the pruned model has no Pad."""
    if pads.startswith("run-time"):
        model = mbconv_same(torch_style=True, in_shape=("N", 3, 12, 12))
    else:
        model = mbconv_static_pad(pads, opset)
    x = calib_for(model, 128)
    folded = copy.deepcopy(model)
    constants_to_initializers(folded)
    assert fold_pads(folded) == 1
    onnx.checker.check_model(folded, full_check=True)
    assert not any(n.op_type in ("Pad", "ConstantOfShape", "Shape") for n in folded.graph.node)
    assert np.allclose(run(folded, x[:8])[0], run(model, x[:8])[0], atol=1e-5)
    result = onnxprune.prune(model, x, speedup=1.4, measure_latency=False, allocation="uniform")
    check_pruned(result.model, model, x[:64], max_rel_err=0.5)
    assert not any(n.op_type == "Pad" for n in result.model.graph.node)
    assert any(grp.refined_error for grp in result.report.groups)


@pytest.mark.parametrize("kind", ["reflect", "value", "maxpool", "run-time"])
def test_pads_that_are_not_a_convs_zero_padding_stay(kind):
    """Reflection, a non-zero value, a pooling reader (it pads with −∞ itself) and amounts computed
    from a dynamic size keep their ``Pad``."""
    if kind == "run-time":
        model = mbconv_same(torch_style=True)
    else:
        model = mbconv_static_pad("const", mode="reflect" if kind == "reflect" else "constant",
                                  value=1.0 if kind == "value" else 0.0,
                                  reader="MaxPool" if kind == "maxpool" else "Conv")
    work = copy.deepcopy(model)
    constants_to_initializers(work)
    assert fold_pads(work) == 0
    assert sum(n.op_type == "Pad" for n in work.graph.node) == 1


def test_a_pad_a_subgraph_also_reads_is_not_folded():
    """A Pad that an ``If`` branch reads besides the conv is a reader other than a conv: it stays,
    and the model keeps every name its branch reads."""
    b = Builder(in_shape=("N", 3, 12, 12))
    x = b.node("Relu", [b.conv("input", 3, 8)])
    padded = b.node("Pad", [x, b.const(i64(0, 0, 1, 1, 0, 0, 1, 1))])
    y = b.node("Relu", [b.conv(padded, 8, 8, group=8, pad=0)])
    branch = onnx.helper.make_graph(
        [onnx.helper.make_node("ReduceMax", [padded], ["side_max"], keepdims=0)], "side", [],
        [onnx.helper.make_tensor_value_info("side_max", onnx.TensorProto.FLOAT, [])])
    side = b.node("If", [b.const(np.array(True))], then_branch=branch, else_branch=branch)
    model = head(b, y, 8)
    model.graph.output.append(onnx.helper.make_tensor_value_info(side, onnx.TensorProto.FLOAT, []))
    x_in = calib_for(model, 4)
    work = copy.deepcopy(model)
    constants_to_initializers(work)
    assert fold_pads(work) == 0
    onnx.checker.check_model(work, full_check=True)
    assert [n.op_type for n in work.graph.node].count("Pad") == 1
    assert all(np.allclose(a, c, atol=1e-5) for a, c in zip(run(work, x_in), run(model, x_in)))


def shufflenet_v2(style: str) -> onnx.ModelProto:
    """A ShuffleNetV2 stem, a stride-2 block and two stride-1 blocks whose input is shuffled and
    halved: torchvision's ``view → transpose → view`` then ``chunk`` (a ``Split``; its targets
    constant, or computed from ``x.size()`` as torch exports them), or the original release's ``reshape(N·C/2, 2, H·W) → permute(1, 0, 2) → reshape(2, N, C/2, H, W)`` and ``x[0]``,
    ``x[1]`` (``Gather``s on axis 0, batch 1: YOLO-FastestV2's export)."""
    batch = 1 if style == "original" else "N"
    b = Builder(in_shape=(batch, 3, 16, 16))
    x = b.node("Relu", [b.conv("input", 3, 16, stride=2)])  # 16 × 8 × 8
    proj = b.node("Relu", [b.conv(b.conv(x, 16, 16, stride=2, group=16), 16, 8, k=1, pad=0)])
    main = b.node("Relu", [b.conv(x, 16, 8, k=1, pad=0)])
    main = b.node("Relu", [b.conv(b.conv(main, 8, 8, stride=2, group=8), 8, 8, k=1, pad=0)])
    y = b.node("Concat", [proj, main], axis=1)  # 16 × 4 × 4
    for _ in range(2):
        if style.startswith("torchvision"):
            if style == "torchvision":
                grouped, flat = b.const(i64(-1, 2, 8, 4, 4)), b.const(i64(-1, 16, 4, 4))
            else:  # batchsize, num_channels, height, width = x.size(), as torch exports it
                shape = b.node("Shape", [y])
                n, c, h, w = (b.node("Unsqueeze", [b.node("Gather", [shape, b.const(np.array(i))], axis=0),
                                                   b.const(i64(0))]) for i in range(4))
                half = b.node("Div", [c, b.const(i64(2))])
                grouped = b.node("Concat", [n, b.const(i64(2)), half, h, w], axis=0)
                flat = b.node("Concat", [n, b.const(i64(-1)), h, w], axis=0)
            t = b.node("Transpose", [b.node("Reshape", [y, grouped])], perm=[0, 2, 1, 3, 4])
            kept, branch = b.node("Split", [b.node("Reshape", [t, flat]), b.const(i64(8, 8))], n_out=2, axis=1)
        else:
            t = b.node("Transpose", [b.node("Reshape", [y, b.const(i64(8, 2, 16))])], perm=[1, 0, 2])
            t = b.node("Reshape", [t, b.const(i64(2, -1, 8, 4, 4))])
            kept, branch = (b.node("Gather", [t, b.const(np.array(k))], axis=0) for k in (0, 1))
        m = b.node("Relu", [b.conv(branch, 8, 8, k=1, pad=0)])
        m = b.node("Relu", [b.conv(b.conv(m, 8, 8, group=8), 8, 8, k=1, pad=0)])
        y = b.node("Concat", [kept, m], axis=1)
    return head(b, y, 16)


@pytest.mark.parametrize("style", ["torchvision", "torchvision, sizes at run time", "original"])
def test_channel_shuffles_become_channel_gathers_and_the_trunk_is_pruned(style):
    """A channel shuffle (layout ops that only reorder or pick a map's channels) is rewritten as
    one ``Gather`` of channels per map it makes (same outputs), which the analysis follows: the
    blocks' trunk channels, which the shuffle's ``Reshape`` to five axes stopped, are pruned too,
    and the pruned model's Gathers pick the kept channels."""
    model = shufflenet_v2(style)
    x = calib_for(model, 96)
    folded = copy.deepcopy(model)
    constants_to_initializers(folded)
    assert fold_channel_shuffles(folded, analyse_at(folded, (1, 3, 16, 16))[0].shapes) == (4 if style == "original" else 2)
    onnx.checker.check_model(folded, full_check=True)
    assert not any(n.op_type in ("Reshape", "Transpose", "Shape") for n in folded.graph.node)
    assert np.array_equal(run(folded, x[:1])[0], run(model, x[:1])[0])
    prunable_before = sum(grp.prunable for grp in analyse_at(model, (1, 3, 16, 16))[1])
    result = onnxprune.prune(model, x, speedup=1.5, measure_latency=False, allocation="uniform")
    check_pruned(result.model, model, x[:1] if style == "original" else x[:32], max_rel_err=0.5)
    picked = [numpy_len(result.model, n.input[1]) for n in result.model.graph.node if n.op_type == "Gather"]
    assert len(picked) == (4 if style == "original" else 2) and sum(picked) < 32  # 32 before: trunk channels went
    assert sum(grp.channels_after < grp.channels_before for grp in result.report.groups) > prunable_before


def test_a_pool_with_a_one_element_window_along_the_channels_becomes_a_channel_gather():
    """LPRNet's ``MaxPool3d`` over ``[N, C, H, W]``, exported as ``Transpose → MaxPool`` (kernel 1,
    stride 2 along the last axis, the channels) ``→ Transpose``, keeps every second channel: it is
    rewritten as a ``Gather`` of channels 0, 2, 4, … (same outputs), which the analysis follows, so
    the conv before it is pruned; a spatial stride (kernel 1, stride 2 over H and W) is left alone."""
    b = Builder(in_shape=("N", 3, 8, 8))
    x = b.node("Relu", [b.conv("input", 3, 16)])
    t = b.node("Transpose", [x], perm=[0, 2, 3, 1])  # [N, H, W, C]
    picked = b.node("Transpose", [b.node("MaxPool", [t], kernel_shape=[1, 1], strides=[1, 2])], perm=[0, 3, 1, 2])
    spatial = b.node("MaxPool", [b.node("Relu", [b.conv(picked, 8, 8)])], kernel_shape=[1, 1], strides=[2, 2])
    model = b.build(b.conv(spatial, 8, 4))
    folded = copy.deepcopy(model)
    constants_to_initializers(folded)
    assert fold_channel_shuffles(folded, analyse_at(folded, (1, 3, 8, 8))[0].shapes) == 1
    onnx.checker.check_model(folded, full_check=True)
    gather = next(n for n in folded.graph.node if n.op_type == "Gather")
    assert gather.input[0] == x and onnx.numpy_helper.to_array(
        next(t for t in folded.graph.initializer if t.name == gather.input[1])).tolist() == list(range(0, 16, 2))
    assert [n.op_type for n in folded.graph.node].count("MaxPool") == 1  # the spatial one stays
    data = calib_for(model, 96)
    assert np.array_equal(run(folded, data[:4])[0], run(model, data[:4])[0])
    assert not analyse_at(model, (1, 3, 8, 8))[1][0].prunable
    result = onnxprune.prune(model, data, speedup=1.4, measure_latency=False, allocation="uniform")
    assert result.report.groups[0].channels_after < 16  # the conv before the pool
    check_pruned(result.model, model, data[:32], max_rel_err=0.5)


def numpy_len(model: onnx.ModelProto, name: str) -> int:
    return next(len(onnx.numpy_helper.to_array(t)) for t in model.graph.initializer if t.name == name)


def test_layout_ops_that_are_not_a_channel_shuffle_stay():
    """A pixel shuffle (channels into positions), a flatten before a classifier, and a shuffle
    whose inner tensor is read elsewhere are not channel selections: nothing is rewritten."""
    b = Builder(in_shape=(1, 3, 8, 8))
    x = b.node("Relu", [b.conv("input", 3, 16)])
    t = b.node("Transpose", [b.node("Reshape", [x, b.const(i64(1, 4, 2, 2, 8, 8))])], perm=[0, 1, 4, 2, 5, 3])
    up = b.node("Relu", [b.conv(b.node("Reshape", [t, b.const(i64(1, 4, 16, 16))]), 4, 8)])
    inner = b.node("Reshape", [up, b.const(i64(1, 2, 4, 16, 16))])
    shuffled = b.node("Reshape", [b.node("Transpose", [inner], perm=[0, 2, 1, 3, 4]), b.const(i64(1, 8, 16, 16))])
    flat = b.node("Reshape", [b.node("Relu", [b.conv(shuffled, 8, 4, stride=4)]), b.const(i64(1, 64))])
    model = b.build(b.gemm(flat, 64, 5))
    model.graph.output.append(onnx.helper.make_tensor_value_info(inner, onnx.TensorProto.FLOAT, None))
    work = copy.deepcopy(model)
    constants_to_initializers(work)
    assert fold_channel_shuffles(work, analyse_at(work)[0].shapes) == 0
    assert [n.op_type for n in work.graph.node] == [n.op_type for n in model.graph.node]


# ---------------------------------------------------------------- channel padding (MediaPipe)
def blaze(pad_value: float = 0.0, mode: str = "constant") -> onnx.ModelProto:
    """MediaPipe's BlazeFace blocks as tflite2onnx writes them: depthwise 3×3, pointwise conv to
    more channels, and a shortcut widened by a ``Pad`` of zeros on the channel axis before the
    residual ``Add`` (after a MaxPool where the block strides); two heads read the last blocks."""
    b = Builder(in_shape=("N", 3, 16, 16))
    x, c = b.node("Relu", [b.conv("input", 3, 8)]), 8
    heads = []
    for cout, stride in ((12, 1), (16, 2), (16, 1), (24, 2)):
        y = b.conv(b.conv(x, c, c, group=c, stride=stride), c, cout, k=1, pad=0)
        s = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]) if stride == 2 else x
        if cout != c:
            pads = b.const(i64(0, 0, 0, 0, 0, cout - c, 0, 0), "pads")
            s = b.node("Pad", [s, pads] + ([b.const(np.float32(pad_value), "v")] if pad_value else []), mode=mode)
        x, c = b.node("Relu", [b.node("Add", [y, s])]), cout
        if cout == 16 and stride == 1 or cout == 24:
            heads.append(b.conv(x, c, 6, k=1, pad=0))
    return b.build(*heads)


def test_a_pad_of_zero_channels_joins_its_input_with_channels_of_its_own():
    g, groups = analyse_at(blaze(), (1, 3, 16, 16))
    added = sorted((grp for grp in groups if grp.padding is not None), key=lambda grp: grp.index)
    assert [grp.channels for grp in added] == [4, 4, 8]
    assert all(grp.prunable for grp in added)
    # the widened channels are summed with the block's conv alone; the last block's are read by a
    # head and nothing else, while the earlier ones flow on into later residual joins
    assert [grp.coupled for grp in added] == [True, True, False]
    assert "Pad 'pad" in added[0].name and added[0].producers
    stem = next(grp for grp in groups if grp.owner and grp.channels == 8 and grp.padding is None)
    assert stem.prunable and stem.coupled  # its channels are summed after each Pad


@pytest.mark.parametrize("prune_coupled, speedup", [(False, 1.01), (True, 1.25)])
def test_blocks_widened_by_channel_padding_are_pruned(prune_coupled, speedup):
    """Without ``prune_coupled`` only the last block's added channels (joined with nothing) go."""
    model = blaze()
    x = calib_for(model, n=96)
    result = onnxprune.prune(model, x, speedup=speedup, prune_coupled=prune_coupled, measure_latency=False)
    cut = {r.name: (r.channels_before, r.channels_after) for r in result.report.groups}
    assert any("adds" in name and after < before for name, (before, after) in cut.items())
    assert prune_coupled or all("adds" in name for name in cut)
    pads = [numpy_helper_pads(result.model, n) for n in result.model.graph.node if n.op_type == "Pad"]
    assert len(pads) == 3 and min(p[5] for p in pads) < max((4, 4, 8))
    check_pruned(result.model, model, x, 0.5)


def numpy_helper_pads(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[1]))


@pytest.mark.parametrize("pad_value, mode", [(1.0, "constant"), (0.0, "reflect"), (0.0, "edge")])
def test_channel_padding_other_than_zeros_stays_a_barrier(pad_value, mode):
    g, groups = analyse_at(blaze(pad_value, mode), (1, 3, 16, 16))
    assert not any(grp.padding is not None for grp in groups)
    assert any("Pad 'pad" in grp.reason for grp in groups if grp.owner)


def test_zero_channels_padded_before_and_after_are_rewritten_on_both_sides():
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    widened = b.node("Pad", [x, b.const(i64(0, 2, 0, 0, 0, 1, 0, 0), "pads")])
    y = b.node("Relu", [b.node("Add", [b.conv(x, 8, 11), widened])])
    model = b.build(b.conv(y, 11, 4))
    x_cal = calib_for(model, n=64)
    result = onnxprune.prune(model, x_cal, speedup=1.3, prune_coupled=True, allocation="uniform",
                             round_to=1, measure_latency=False)
    pad = next(n for n in result.model.graph.node if n.op_type == "Pad")
    before, after = numpy_helper_pads(result.model, pad)[[1, 5]]
    cut = {r.channels_before: r.channels_after for r in result.report.groups}
    assert cut[3] == before + after < 3 and cut[8] < 8
    check_pruned(result.model, model, x_cal, 0.5)


def partial_residual_chain() -> onnx.ModelProto:
    """ReXNet's blocks: a conv's first channels get the block's input added, the rest are new
    (``out[:, :c] += x``, exported as two ``Slice``s, an ``Add`` and a ``Concat``), block after
    block, so one block's joined output is the next block's sum."""
    b = Builder()
    x, width = b.node("Relu", [b.conv("input", 3, 8)]), 8
    for wider in (12, 16):
        y = b.conv(b.node("Relu", [b.conv(x, width, 2 * width, k=1)]), 2 * width, wider, k=1)
        head = b.node("Slice", [y, b.const(i64(0)), b.const(i64(width)), b.const(i64(1))])
        rest = b.node("Slice", [y, b.const(i64(width)), b.const(i64(wider)), b.const(i64(1))])
        x, width = b.node("Concat", [b.node("Add", [head, x]), rest], axis=1), wider
    return b.build(b.conv(b.node("Relu", [x]), width, 4))


def test_a_conv_whose_channels_are_added_to_a_joined_tensor_keeps_them():
    """The second block's conv writes channels summed onto the first block's ``Concat``: one
    tensor defined twice, by the ``Concat`` and by the ``Slice``, is a barrier for both sides —
    cutting the conv alone left the ``Add``'s inputs of different widths."""
    model = partial_residual_chain()
    g, groups = analyse_at(model, (1, 3, 8, 8))
    last_conv = [n for n in model.graph.node if n.op_type == "Slice"][-1].input[0]
    sliced = next(grp for grp in groups if last_conv in grp.tensors)
    assert not sliced.prunable and "redefines channels" in sliced.reason
    x = calib_for(model, n=64)
    result = onnxprune.prune(model, x, speedup=1.2, prune_coupled=True, round_to=1, measure_latency=False)
    check_pruned(result.model, model, x, 0.5)



def res2net_first_block(faint: float = 1e-3) -> onnx.ModelProto:
    """Res2Net's first bottleneck of a stage: a 1x1 conv's output split in four, three parts
    through 3x3 convs, the last one pooled, all joined again for a 1x1 conv. The conv's filters
    that write the last part are ``faint``, so a selection by filter norm takes that part first."""
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 8)])
    wide = b.conv(x, 8, 16, k=1)
    weight = next(t for t in b.inits if t.name == b.nodes[-1].input[1])
    w = onnx.numpy_helper.to_array(weight).copy()
    w[12:] *= faint
    weight.CopyFrom(onnx.numpy_helper.from_array(w, weight.name))
    parts = b.node("Split", [b.node("Relu", [wide]), b.const(i64(4, 4, 4, 4))], n_out=4, axis=1)
    outs = [b.node("Relu", [b.conv(part, 4, 4)]) for part in parts[:3]]
    pooled = b.node("AveragePool", [parts[3]], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    joined = b.node("Concat", [*outs, pooled], axis=1)
    return b.build(b.conv(b.node("Relu", [b.conv(joined, 16, 16, k=1)]), 16, 4))


def test_a_split_part_keeps_a_channel_where_the_selection_would_take_them_all():
    """Cutting the split conv to half by filter norm takes the faint last part whole: that part
    keeps its best channel instead of the least of the others, and the model stays valid."""
    model = res2net_first_block()
    x = calib_for(model, n=64)
    result = onnxprune.prune(model, x, speedup=1.6, method="l1", allocation="uniform", round_to=1,
                             measure_latency=False)
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    sizes = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == split.input[1]))
    assert sizes.sum() < 16 and sizes.min() >= 1
    check_pruned(result.model, model, x, 0.5)
