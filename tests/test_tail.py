"""The tail refinement: the model's last layers tuned together on its output (onnxprune.tail)."""

import numpy as np
import onnx
import pytest
from conftest import check_pruned, run
from graphs import Builder, calib_for, tiny_resnet, tiny_vgg

import onnxprune
from onnxprune.activations import tensor_shapes
from onnxprune.calib import Calibration
from onnxprune.graphview import GraphView
from onnxprune.tail import find_tail, tune_tail


def _chain() -> tuple[onnx.ModelProto, str]:
    """Every kind of tail layer: strided and padded convs, ReLU, max and average pooling, hard
    swish as exporters write it, global pooling, Flatten, two Gemms and a final Softmax."""
    b = Builder(in_shape=("N", 3, 12, 12), seed=3)
    x = b.node("Relu", [b.conv("input", 3, 6, stride=2)])
    x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.conv(x, 6, 8, k=3, pad=1)
    x = b.node("Mul", [x, b.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])
    x = b.node("AveragePool", [x], kernel_shape=[3, 3], strides=[3, 3])
    x = b.node("Flatten", [x], axis=1)
    x = b.node("Relu", [b.gemm(x, 8, 12)])
    logits = b.gemm(x, 12, 5)
    return b.build(b.node("Softmax", [logits], axis=1)), logits


def _tail(model: onnx.ModelProto, x: np.ndarray, samples: int = 16):
    return find_tail(GraphView(model, tensor_shapes(model, Calibration({"input": x}))), samples)


def _run_to(model: onnx.ModelProto, tensor: str, x: np.ndarray) -> np.ndarray:
    """``model``'s tensor ``tensor`` on ``x`` (ONNX Runtime)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=tensor))
    return run(probe, x)[1]


def test_the_tail_computes_the_model_output_before_its_softmax():
    model, logits = _chain()
    x = calib_for(model, 16)
    tail = _tail(model, x)
    assert tail.input == "input" and tail.output == logits and len(tail.weighted) == 4
    np.testing.assert_allclose(tail.forward(x), _run_to(model, logits, x), rtol=1e-4, atol=1e-5)


def test_the_tail_checks_what_the_model_outputs_after_its_softmax():
    # a smaller error of the logits can be a larger one of the class scores: the check and the
    # held-out veto judge the scores
    model, _ = _chain()
    x = calib_for(model, 16)
    tail = _tail(model, x)
    assert tail.final is not None and tail.final.op_type == "Softmax"
    np.testing.assert_allclose(tail.model_output(tail.forward(x)), run(model, x)[0], rtol=1e-4, atol=1e-6)


def test_the_tail_holds_a_constant_bias_and_global_pooling_as_the_model_does():
    # the tail holds activations channels last: a per-channel constant added to a conv's output
    # and a global average must be laid out as the model's channels-first tensors are
    b = Builder(in_shape=("N", 3, 6, 6), seed=5)
    x = b.conv("input", 3, 4, k=3, pad=1)
    x = b.node("Add", [x, b.const(np.random.default_rng(0).normal(size=(1, 4, 1, 1)).astype(np.float32))])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [b.node("Relu", [x])])], axis=1)
    logits = b.gemm(b.node("Relu", [b.gemm(x, 4, 6)]), 6, 3)
    model = b.build(logits)
    x = calib_for(model, 8)
    tail = _tail(model, x)
    assert tail is not None and tail.input == "input" and len(tail.weighted) == 3
    np.testing.assert_allclose(tail.forward(x), run(model, x)[0], rtol=1e-4, atol=1e-5)


def test_tail_gradients_match_finite_differences():
    model, _ = _chain()
    x = calib_for(model, 4).astype(np.float64)
    tail = _tail(model, x.astype(np.float32))
    for layer in tail.weighted:
        layer.params = [p.astype(np.float64) for p in layer.params]
    weights = np.random.default_rng(0).normal(size=tail.forward(x).shape)

    def loss() -> float:
        return float((tail.forward(x) * weights).sum())

    loss()
    tail.backward(weights)
    rng = np.random.default_rng(1)
    for layer in tail.weighted:
        for p, grad in zip(layer.params, layer.grads):
            for flat in rng.choice(p.size, 4, replace=False):
                i = np.unravel_index(flat, p.shape)
                keep = p[i]
                p[i] = keep + 1e-6
                up = loss()
                p[i] = keep - 1e-6
                down = loss()
                p[i] = keep
                assert (up - down) / 2e-6 == pytest.approx(grad[i], rel=1e-4, abs=1e-7)


def test_the_tail_stops_where_a_tensor_is_read_outside_it():
    model = tiny_vgg()
    tail = _tail(model, calib_for(model, 8))
    assert [layer.node.op_type for layer in tail.weighted] == ["Conv", "Gemm"]  # not through the BN
    assert GraphView(model).producer[tail.input].op_type == "MaxPool"
    resnet = tiny_resnet()
    assert _tail(resnet, calib_for(resnet, 8)) is None  # only the classifier after the last Add


def test_tuning_keeps_the_weights_where_it_cannot_beat_them():
    model, _ = _chain()
    x = calib_for(model, 40)
    tail = _tail(model, x, 40)
    y = tail.forward(x)  # the tail's own outputs: nothing to gain
    before = [p.copy() for layer in tail.weighted for p in layer.params]
    result = tune_tail(tail, x, y, np.arange(32, 40), seed=0, confirm=(x[32:], y[32:]))
    assert not result.kept and result.error_before == result.error_after
    for p, q in zip(before, [p for layer in tail.weighted for p in layer.params]):
        np.testing.assert_array_equal(p, q)


def _perturbed_tail():
    """The test chain's tail, its inputs on 200 samples and its outputs, then its weights perturbed."""
    model, _ = _chain()
    x = calib_for(model, 200)
    tail = _tail(model, x, 200)
    y = tail.forward(x)
    rng = np.random.default_rng(2)
    for layer in tail.weighted:
        layer.params[0] += rng.normal(0, 0.3 * np.abs(layer.params[0]).mean(), layer.params[0].shape).astype(np.float32)
    return tail, x, y


def test_tuning_lowers_the_check_error_of_a_perturbed_tail():
    tail, x, y = _perturbed_tail()
    result = tune_tail(tail, x, y, np.arange(160, 200), seed=0, confirm=(x[160:], y[160:]))
    assert result.kept and result.error_after < 0.8 * result.error_before


def test_pruning_a_plain_chain_with_refine_tail_tunes_its_tail(models_dir):
    x = np.load(models_dir / "fmnist_calib.npy")[:96]
    original = onnx.load(str(models_dir / "vgg_fmnist.onnx"))
    result = onnxprune.prune(original, x, speedup=2.0, measure_latency=False, refine_tail=True)
    tail = result.report.tail
    assert tail is not None and tail.layers == 4
    assert tail.error_after <= tail.error_before
    check_pruned(result.model, original, x, 0.5)
    assert ("layers tuned together" in result.report.table()) == tail.kept


def test_a_paddle_style_head_is_a_tail():
    """Paddle2ONNX's classifier: the pooled map flattened by a Reshape whose shape a Shape reads
    from it, MatMul then Add of the bias, Softmax, Identity."""
    b = Builder(in_shape=("N", 3, 8, 8), seed=4)
    x = b.node("Relu", [b.conv("input", 3, 8)])
    x = b.conv(x, 8, 12, k=1, pad=0)
    pooled = b.node("GlobalAveragePool", [x])
    batch = b.node("Slice", [b.node("Shape", [pooled]), b.const(np.array([0])), b.const(np.array([1]))])
    flat = b.node("Reshape", [pooled, b.node("Concat", [batch, b.const(np.array([-1]))], axis=0)])
    w = b.const(np.random.default_rng(0).normal(0, 0.3, (12, 5)).astype(np.float32))
    logits = b.node("Add", [b.node("MatMul", [flat, w]), b.const(np.full(5, 0.1, np.float32))])
    model = b.build(b.node("Identity", [b.node("Softmax", [logits], axis=-1)]), out_shape=["N", 5])
    x = calib_for(model, 8)
    tail = _tail(model, x)
    assert tail.output == logits and [layer.node.op_type for layer in tail.weighted] == ["Conv", "Conv", "MatMul"]
    np.testing.assert_allclose(tail.forward(x), _run_to(model, logits, x), rtol=1e-4, atol=1e-5)


def test_no_tail_for_several_outputs_or_targets_too_large_to_hold():
    model, _ = _chain()
    x = calib_for(model, 4)
    assert _tail(model, x, samples=(1 << 24) // 5 + 1) is None  # five outputs a sample
    two = onnx.ModelProto()
    two.CopyFrom(model)
    two.graph.output.append(onnx.ValueInfoProto(name=two.graph.node[0].output[0]))
    assert _tail(two, x) is None


def test_tuning_that_the_held_out_images_do_not_confirm_is_undone():
    tail, x, y = _perturbed_tail()
    start = [p.copy() for layer in tail.weighted for p in layer.params]
    # held-out targets that the perturbed weights already match: tuning towards y cannot help there
    held = x[:20]
    result = tune_tail(tail, x, y, np.arange(160, 200), seed=0, confirm=(held, tail.forward(held)))
    assert not result.kept and result.error_before == result.error_after == 0
    for p, q in zip(start, [p for layer in tail.weighted for p in layer.params]):
        np.testing.assert_array_equal(p, q)
