"""Joint refinement of a residual branch's conv pair (onnxprune/refine.py)."""

import logging

import numpy as np
import onnx
import pytest
from conftest import check_pruned
from graphs import Builder, calib_for, tiny_resnet

import onnxprune
from onnxprune.graph import Consumer
from onnxprune.ops import handler_for
from onnxprune.options import PruneOptions
from onnxprune.pipeline import Pruner
from onnxprune.refine import refine_pair


def _pairs(model, x):
    """(sampler, graph, [(conv1, relu, conv2 as a Consumer)]) for each basic block of ``model``."""
    pruner = Pruner(model, x, PruneOptions(allocation="uniform", measure_latency=False))
    g = pruner.analysis.g
    pairs = []
    for relu in g.nodes_by_type("Relu"):
        conv1, users = g.producer.get(relu.input[0]), g.consumers.get(relu.output[0], [])
        if conv1 is not None and conv1.op_type == "Conv" and len(users) == 1 and users[0].op_type == "Conv":
            conv2 = users[0]
            if pruner.sampler.targets.get(conv2.output[0]) and pruner.sampler.targets[conv2.output[0]].residual_other:
                pairs.append((conv1, relu, Consumer(conv2, relu.output[0], 1)))
    return pruner.sampler, g, pairs


def _predict(samples, act, w1, b1, w2, b2):
    z1 = samples.x @ w1.T.astype(np.float32) + b1
    a1 = act[0](z1) * samples.inside[:, :, None]
    return a1.transpose(0, 2, 1).reshape(len(a1), -1) @ w2.T + b2


@pytest.fixture(scope="module")
def blocks():
    model = tiny_resnet()
    return _pairs(model, calib_for(model, 64))


def test_pair_samples_rebuild_the_consumer_output_through_padding_and_stride(blocks):
    """On the unpruned model, the producer's patches at each consumer tap, through the producer,
    the activation and the consumer, give the consumer's output at the sampled positions: the
    second block's first conv has stride 2, and positions on the border read padding."""
    sampler, g, pairs = blocks
    assert len(pairs) == 2
    for conv1, relu, c in pairs:
        s = sampler.pair_samples(g, conv1, c, None, None, 1 << 24)
        assert s.x.shape[1] == 9 and not s.inside.all() and np.all(np.diff(s.image) >= 0)
        h1, h2 = handler_for(conv1), handler_for(c.node)
        out = _predict(s, handler_for(relu).activation(relu, g), h1.weight_matrix(conv1, g), h1.bias(conv1, g),
                       h2.weight_matrix(c.node, g), h2.bias(c.node, g))
        # the sampler's target is the original Add output less the skip branch: the conv's own output
        assert np.abs(out - s.y).max() <= 1e-4 * np.abs(s.y).max()
    conv1, relu, c = pairs[0]
    few = sampler.pair_samples(g, conv1, c, None, None, 16 * s.x.shape[1] * s.x.shape[2])
    assert 0 < len(few.y) <= 16 and len(np.unique(few.image)) == len(few.y)  # one position of every n-th image


def test_refinement_lowers_the_held_out_error_and_declines_when_it_cannot(blocks):
    sampler, g, pairs = blocks
    conv1, relu, c = pairs[0]
    s = sampler.pair_samples(g, conv1, c, None, None, 1 << 24)
    act = handler_for(relu).activation(relu, g)
    h1, h2 = handler_for(conv1), handler_for(c.node)
    w1, b1, w2, b2 = h1.weight_matrix(conv1, g), h1.bias(conv1, g), h2.weight_matrix(c.node, g), h2.bias(c.node, g)
    assert refine_pair(s, act, None, w1, b1, w2, b2) is None  # exact already: nothing to gain
    noisy = w1 + np.random.default_rng(0).normal(0, 0.5 * np.abs(w1).mean(), w1.shape)
    done = refine_pair(s, act, None, noisy, b1, w2, b2)
    assert done is not None and done.error_after < 0.7 * done.error_before
    fit = _predict(s, act, done.w1, done.b1, done.w2, done.b2)
    before = _predict(s, act, noisy, b1, w2, b2)
    assert np.linalg.norm(fit - s.y) < np.linalg.norm(before - s.y)


def test_pruning_the_shipped_residual_network_refines_its_blocks(caplog, models_dir):
    """On trained weights the refinement is kept for some blocks, and the model it gives is no
    further from the original on held-out images than the least-squares one."""
    model = str(models_dir / "resnet_fmnist.onnx")
    x = np.load(models_dir / "fmnist_calib.npy")[:256]
    with caplog.at_level(logging.INFO, logger="onnxprune"):
        refined = onnxprune.prune(model, x, speedup=2, measure_latency=False)
    assert "refined with" in caplog.text
    errors = [grp.refined_error for grp in refined.report.groups if grp.refined_error]
    assert errors and all(after < before for before, after in errors)
    assert "refined_error" in refined.report.to_json()
    plain = onnxprune.prune(model, x, speedup=2, measure_latency=False, refine=False)
    test = np.load(models_dir / "fmnist_test.npz")["x"][:500]
    original = onnx.load(model)
    err = check_pruned(refined.model, original, test, max_rel_err=0.5)
    assert err < check_pruned(plain.model, original, test, max_rel_err=0.5)


def test_activation_handlers_give_value_and_derivative():
    """ReLU6 as an opset-11 Clip (bounds as inputs), an opset-6 Clip (attributes), LeakyReLU; a
    Clip whose bound is computed at run time gives none."""
    from onnx import helper

    from onnxprune.graphview import GraphView
    b = Builder(in_shape=("N", 3, 4, 4))
    lo, hi = b.const(np.array(0.0, np.float32)), b.const(np.array(6.0, np.float32))
    six = b.node("Clip", ["input", lo, hi])
    leaky = b.node("LeakyRelu", [six], alpha=0.1)
    dyn = b.node("Clip", [leaky, b.node("ReduceMin", [leaky], keepdims=0)])
    g = GraphView(b.build(dyn))
    z = np.array([-1.0, 0.5, 7.0], np.float32)
    f, df = handler_for(b.nodes[0]).activation(b.nodes[0], g)
    assert f(z).tolist() == [0.0, 0.5, 6.0] and df(z).tolist() == [0.0, 1.0, 0.0]
    f, df = handler_for(b.nodes[1]).activation(b.nodes[1], g)
    assert np.allclose(f(z), [-0.1, 0.5, 7.0]) and np.allclose(df(z), [0.1, 1.0, 1.0])
    assert handler_for(b.nodes[-1]).activation(b.nodes[-1], g) is None
    old = helper.make_node("Clip", ["x"], ["y"], min=0.0, max=6.0)
    f, df = handler_for(old).activation(old, g)
    assert f(z).tolist() == [0.0, 0.5, 6.0]
