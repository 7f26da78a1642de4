"""Joint refinement of residual branches: conv pairs and inverted residual blocks (onnxprune/refine.py)."""

import logging

import numpy as np
import onnx
import pytest
from conftest import check_pruned
from graphs import Builder, calib_for, resnext_block, tiny_csp, tiny_mobile, tiny_resnet

import onnxprune
from onnxprune.graph import Consumer
from onnxprune.graphview import node_name
from onnxprune.ops import Window, handler_for
from onnxprune.options import PruneOptions
from onnxprune.pipeline import Pruner
from onnxprune import sampling
from onnxprune.adam import adam_step
from onnxprune.refine import Middle, _Pair, refine_pair
from onnxprune.sampling import PairSamples


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
        s = sampler.pair_samples(g, conv1, c, None, None, 1 << 24, whole_values=1)  # sampled positions, not whole maps
        assert s.x.shape[1] == 9 and not s.inside.all() and np.all(np.diff(s.image) >= 0)
        h1, h2 = handler_for(conv1), handler_for(c.node)
        out = _predict(s, handler_for(relu).activation(relu, g), h1.weight_matrix(conv1, g), h1.bias(conv1, g),
                       h2.weight_matrix(c.node, g), h2.bias(c.node, g))
        # the sampler's target is the original Add output less the skip branch: the conv's own output
        assert np.abs(out - s.y).max() <= 1e-4 * np.abs(s.y).max()
    conv1, relu, c = pairs[0]
    few = sampler.pair_samples(g, conv1, c, None, None, 16 * s.x.shape[1] * s.x.shape[2], whole_values=1)
    assert 0 < len(few.y) <= 16 and len(np.unique(few.image)) == len(few.y)  # one position of every n-th image


def test_refinement_lowers_the_held_out_error_and_declines_when_it_cannot(blocks):
    sampler, g, pairs = blocks
    conv1, relu, c = pairs[0]
    s = sampler.pair_samples(g, conv1, c, None, None, 1 << 24, whole_values=1)
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


@pytest.mark.parametrize("name, max_rel_err", [("resnet_fmnist", 0.5), ("mobilenet_fmnist", 0.6)])
def test_pruning_a_shipped_residual_network_refines_its_blocks(caplog, models_dir, name, max_rel_err):
    """On trained weights the refinement is kept for some blocks — basic blocks, and inverted
    residual blocks (ReLU6 and hard swish, squeeze-excite) through their depthwise convs — and
    the model it gives is closer to the original on held-out images than the least-squares one."""
    model = str(models_dir / f"{name}.onnx")
    x = np.load(models_dir / "fmnist_calib.npy")[:256]
    with caplog.at_level(logging.INFO, logger="onnxprune"):
        refined = onnxprune.prune(model, x, speedup=2, measure_latency=False)
    assert "refined with" in caplog.text
    errors = [grp.refined_error for grp in refined.report.groups if grp.refined_error]
    assert len(errors) >= 2 and all(after < before for before, after in errors)
    assert "refined_error" in refined.report.to_json()
    plain = onnxprune.prune(model, x, speedup=2, measure_latency=False, refine=False)
    test = np.load(models_dir / "fmnist_test.npz")["x"][:500]
    original = onnx.load(model)
    err = check_pruned(refined.model, original, test, max_rel_err=max_rel_err)
    assert err < check_pruned(plain.model, original, test, max_rel_err=max_rel_err)


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


def _branches(model, x):
    """(sampler, graph, [(expand, act, dw, dw act, gate or None, project as a Consumer)]) for each
    inverted residual block of ``tiny_mobile``."""
    pruner = Pruner(model, x, PruneOptions(allocation="uniform", measure_latency=False))
    g = pruner.analysis.g
    found = []
    for dw in g.nodes_by_type("Conv"):
        if handler_for(dw).is_depthwise(dw, g):
            act_in = g.producer[dw.input[0]]
            expand = g.producer[handler_for(act_in).activation_input(act_in, g)]
            out = dw.output[0]
            dw_act = next(n for n in g.consumers[out] if n.op_type in ("Clip", "Mul"))
            after = g.consumers[dw_act.output[0]]
            gating = next((n for n in after if n.op_type == "Mul"), None)
            gate = next(i for i in gating.input if i != dw_act.output[0]) if gating else None
            project = g.consumers[(gating or dw_act).output[0]][0]
            found.append((expand, handler_for(act_in).activation(act_in, g), dw,
                          handler_for(dw_act).activation(dw_act, g), gate,
                          Consumer(project, project.input[0], 1)))
    return pruner.sampler, g, found


def _predict_branch(s, act, wm, bm, mact, w1, b1, w2, b2):
    a1 = act[0](s.x @ w1.T.astype(np.float32) + b1) * s.inside[:, :, None]
    am = mact[0](np.einsum("ntk,kt->nk", a1, wm) + bm)
    return (am if s.gate is None else am * s.gate) @ w2.T + b2


def test_inverted_residual_branches_are_sampled_through_the_depthwise_conv_and_gate():
    """Through the depthwise conv (taps at its kernel, padding masked), its activation and the
    squeeze-excite gate (hard swish written as x · HardSigmoid(x)), the expand conv's input
    patches give the project conv's output at the sampled positions; the refinement tunes
    all three convs and lowers the held-out error from perturbed weights."""
    model = tiny_mobile()
    sampler, g, branches = _branches(model, calib_for(model, 64))
    assert len(branches) == 2 and branches[0][4] is None and branches[1][4] is not None
    for expand, act, dw, mact, gate, c in branches:
        s = sampler.pair_samples(g, expand, c, None, None, 1 << 24, middle=dw, gate=gate, whole_values=1)
        assert s.x.shape[1] == 9 and not s.inside.all() and (s.gate is None) == (gate is None)
        he, hd, hp = handler_for(expand), handler_for(dw), handler_for(c.node)
        weights = [hd.weight_matrix(dw, g), hd.bias(dw, g), mact, he.weight_matrix(expand, g), he.bias(expand, g),
                   hp.weight_matrix(c.node, g), hp.bias(c.node, g)]
        out = _predict_branch(s, act, *weights)
        assert np.abs(out - s.y).max() <= 1e-4 * np.abs(s.y).max()
    expand, act, dw, mact, gate, c = branches[1]
    s = sampler.pair_samples(g, expand, c, None, None, 1 << 24, middle=dw, gate=gate, whole_values=1)
    wm, bm, _, w1, b1, w2, b2 = weights
    rng = np.random.default_rng(0)
    noisy = wm + rng.normal(0, 0.5 * np.abs(wm).mean(), wm.shape)
    done = refine_pair(s, act, None, w1, b1, w2, b2, Middle(noisy, bm, mact))
    assert done is not None and done.error_after < 0.7 * done.error_before and done.wm.shape == wm.shape
    assert np.linalg.norm(_predict_branch(s, act, done.wm, done.bm, mact, done.w1, done.b1, done.w2, done.b2) - s.y) < \
        np.linalg.norm(_predict_branch(s, act, noisy, bm, mact, w1, b1, w2, b2) - s.y)


def _as_sampled(s: PairSamples) -> PairSamples:
    """Whole-map samples written out as one sample per output position, each with its taps."""
    images, (outputs, taps) = len(s.image), s.tap_index.shape
    return PairSamples(s.x[:, s.tap_index].reshape(images * outputs, taps, -1), np.tile(s.inside, (images, 1)),
                       s.y.reshape(images * outputs, -1), s.offset.reshape(images * outputs, -1),
                       np.repeat(s.image, outputs), None if s.gate is None else np.repeat(s.gate, outputs, axis=0))


def test_whole_maps_give_the_loss_and_gradients_of_every_position_sampled(blocks):
    """Where the cap on samples is tight, whole maps hold each image once (the producer's output
    computed once per position, every consumer output gathered from it): loss and gradients
    equal those of the same positions written out as samples — through a stride-2 producer and
    the consumer's padding, and through a depthwise conv and a squeeze-excite gate — and the
    refinement works on them."""
    sampler, g, pairs = blocks
    for conv1, relu, c in pairs:
        s = sampler.pair_samples(g, conv1, c, None, None, 1 << 10, whole_values=1 << 24)
        assert s.tap_index is not None and s.x.shape[:2] == (len(s.image), handler_for(conv1).positions(conv1, g))
        assert not s.inside.all()
        h1, h2 = handler_for(conv1), handler_for(c.node)
        params = [np.asarray(p, np.float32) for p in (h1.weight_matrix(conv1, g), h1.bias(conv1, g),
                                                       h2.weight_matrix(c.node, g), h2.bias(c.node, g))]
        params[0] = params[0] * 0.7  # away from the optimum: non-zero gradients
        act = handler_for(relu).activation(relu, g)
        whole, sampled = (_Pair(x, slice(None), act, None) for x in (s, _as_sampled(s)))
        assert np.isclose(whole.loss(params)[0], sampled.loss(params)[0], rtol=1e-5)
        for a, b in zip(whole.loss(params, grad=True)[1], sampled.loss(params, grad=True)[1]):
            assert np.allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
    noisy = [params[0] / 0.7 + np.random.default_rng(0).normal(0, 0.5 * np.abs(params[0]).mean(), params[0].shape),
             *params[1:]]
    done = refine_pair(s, act, None, *noisy)
    assert done is not None and done.error_after < 0.7 * done.error_before
    model = tiny_mobile()
    sampler, g, branches = _branches(model, calib_for(model, 64))
    expand, act, dw, mact, gate, c = branches[1]
    s = sampler.pair_samples(g, expand, c, None, None, 1 << 10, middle=dw, gate=gate, whole_values=1 << 24)
    assert s.tap_index is not None and s.gate.shape == (len(s.image), 24)
    he, hd, hp = handler_for(expand), handler_for(dw), handler_for(c.node)
    params = [np.asarray(p, np.float32) for p in (he.weight_matrix(expand, g), he.bias(expand, g),
                                                   hp.weight_matrix(c.node, g), hp.bias(c.node, g),
                                                   hd.weight_matrix(dw, g), hd.bias(dw, g))]
    params[4] = params[4] * 0.7
    whole, sampled = (_Pair(x, slice(None), act, None, mact) for x in (s, _as_sampled(s)))
    assert np.isclose(whole.loss(params)[0], sampled.loss(params)[0], rtol=1e-5)
    for a, b in zip(whole.loss(params, grad=True)[1], sampled.loss(params, grad=True)[1]):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())


@pytest.mark.parametrize("in_shape, kernel, strides, dilations, pads", [
    ((9, 11), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
    ((12, 10), (5, 5), (2, 2), (1, 1), (2, 1, 2, 2)),  # TF "same" at stride 2: more padding after
    ((10, 10), (3, 3), (1, 2), (2, 2), (2, 2, 2, 2)),
    ((7, 6), (3, 5), (2, 1), (1, 1), (0, 2, 0, 2)),
    ((13,), (5,), (2,), (1,), (2, 2)),  # a 1-D conv
    ((4, 5, 6), (3, 3, 3), (1, 2, 1), (1, 1, 1), (1, 1, 1, 1, 1, 1)),  # 3-D
])
def test_a_depthwise_middle_read_as_shifted_views_gives_the_gathered_taps_loss_and_gradients(
        in_shape, kernel, strides, dilations, pads):
    """A depthwise middle on whole maps reads its taps as shifted views of the padded maps: loss
    and gradients equal those of the taps gathered by index, at strides, dilations, uneven
    padding and any number of spatial dims, with and without a squeeze-excite gate."""
    n_ax = len(kernel)
    out_shape = tuple((size + pads[a] + pads[a + n_ax] - dilations[a] * (kernel[a] - 1) - 1) // strides[a] + 1
                      for a, size in enumerate(in_shape))
    window = Window(in_shape, out_shape, kernel, strides, dilations, pads)
    outputs, hidden = int(np.prod(out_shape)), int(np.prod(in_shape))
    tap_index, inside = (a[0] for a in window.tap_positions(np.arange(outputs)[None]))
    rng = np.random.default_rng(0)
    rows, d, k, cout = 5, 4, 6, 3
    relu = (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(np.float32))
    for gate in (None, rng.uniform(0, 1, (rows, k)).astype(np.float32)):
        common = (rng.normal(size=(rows, hidden, d)).astype(np.float32), inside,
                  rng.normal(size=(rows, outputs, cout)).astype(np.float32), np.zeros((rows, outputs, cout), np.float32),
                  np.arange(rows), gate, tap_index)
        params = [rng.normal(size=s).astype(np.float32) for s in ((k, d), (k,), (cout, k), (cout,), (k, len(tap_index[0])), (k,))]
        shifted, gathered = (_Pair(PairSamples(*common, window=w), slice(None), relu, None, relu) for w in (window, None))
        assert shifted.views is not None and gathered.views is None
        assert np.isclose(shifted.loss(params)[0], gathered.loss(params)[0], rtol=1e-5)
        for a, b in zip(shifted.loss(params, grad=True)[1], gathered.loss(params, grad=True)[1]):
            assert np.allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_whole_maps_of_an_image_subset_where_every_image_does_not_fit(monkeypatch):
    """Where every position of every image does not fit in a branch's target budget, an evenly
    spread subset of the images has targets at every position: whole maps are built from those
    images alone, and through producer, activation and consumer they rebuild the consumer's output."""
    monkeypatch.setattr(sampling, "PAIR_TARGET_VALUES", 1 << 14)
    monkeypatch.setattr(sampling, "MIN_WHOLE_IMAGES", 8)
    model = tiny_resnet()
    sampler, g, pairs = _pairs(model, calib_for(model, 64))
    conv1, relu, c = pairs[0]
    rows = sampler.whole[c.node.output[0]]
    assert 8 <= len(rows) < len(sampler.indices) and rows[0] == 0 and rows[-1] == len(sampler.indices) - 1
    assert sampler.positions[c.node.output[0]].shape[1] < handler_for(c.node).positions(c.node, g)
    s = sampler.pair_samples(g, conv1, c, None, None, 1 << 10, whole_values=1 << 24)
    assert s.tap_index is not None and np.array_equal(s.image, rows)
    flat = _as_sampled(s)
    h1, h2 = handler_for(conv1), handler_for(c.node)
    out = _predict(flat, handler_for(relu).activation(relu, g), h1.weight_matrix(conv1, g), h1.bias(conv1, g),
                   h2.weight_matrix(c.node, g), h2.bias(c.node, g))
    assert np.abs(out - flat.y).max() <= 1e-4 * np.abs(flat.y).max()


def test_pruning_inverted_residual_blocks_refines_them(caplog):
    model = tiny_mobile()
    x = calib_for(model, 256)
    with caplog.at_level(logging.INFO, logger="onnxprune"):
        result = onnxprune.prune(model, x, speedup=1.5, measure_latency=False, allocation="uniform")
    check_pruned(result.model, model, x[:64], max_rel_err=0.5)
    assert any(grp.refined_error for grp in result.report.groups)


def _csp_pairs(model, x):
    """(sampler, graph, [(conv1, its SiLU, conv2 as a Consumer, conv2's SiLU)]) for each bottleneck of ``tiny_csp``."""
    pruner = Pruner(model, x, PruneOptions(allocation="uniform", measure_latency=False))
    g, found = pruner.analysis.g, []
    for name, target in pruner.sampler.targets.items():
        if target.activated:
            conv2 = g.producer[name]
            silu1, silu2 = g.producer[conv2.input[0]], g.producer[target.activated[0]]
            found.append((g.producer[silu1.input[0]], handler_for(silu1).activation(silu1, g),
                          Consumer(conv2, conv2.input[0], 1), handler_for(silu2).activation(silu2, g)))
    return pruner.sampler, g, found


def test_bottlenecks_joined_through_an_activation_are_sampled_and_refined():
    """``x + silu(conv(silu(conv(x))))`` (CSP / YOLO bottlenecks): the second conv reaches the
    residual Add through its SiLU, so its branch samples carry the original Add output less the
    skip path, which the two convs rebuild through both SiLUs; the refinement tunes them through
    the second SiLU and lowers the held-out error from perturbed weights."""
    model = tiny_csp()
    sampler, g, pairs = _csp_pairs(model, calib_for(model, 64))
    assert len(pairs) == 2 and all(sampler.targets[c.node.output[0]].residual_other is None for _, _, c, _ in pairs)
    for conv1, act, c, join_act in pairs:
        h1, h2 = handler_for(conv1), handler_for(c.node)
        weights = [h1.weight_matrix(conv1, g), h1.bias(conv1, g), h2.weight_matrix(c.node, g), h2.bias(c.node, g)]
        whole = _as_sampled(sampler.pair_samples(g, conv1, c, None, None, 1 << 24))  # every position: whole maps
        s = sampler.pair_samples(g, conv1, c, None, None, 1 << 24, whole_values=1)  # sampled positions
        for samples in (whole, s):
            out = join_act[0](_predict(samples, act, *weights))
            assert samples.x.shape[1] == 9 and np.abs(out - samples.y).max() <= 1e-4 * np.abs(samples.y).max()
            assert np.abs(samples.offset).max() > 0  # the skip path
    w1, b1, w2, b2 = weights
    noisy = w2 + np.random.default_rng(0).normal(0, 0.5 * np.abs(w2).mean(), w2.shape)
    done = refine_pair(s, act, None, w1, b1, noisy, b2, join_act=join_act)
    assert done is not None and done.error_after < 0.7 * done.error_before
    assert np.linalg.norm(join_act[0](_predict(s, act, done.w1, done.b1, done.w2, done.b2)) - s.y) < \
        np.linalg.norm(join_act[0](_predict(s, act, w1, b1, noisy, b2)) - s.y)


def test_pruning_bottlenecks_joined_through_an_activation_refines_them():
    model = tiny_csp()
    x = calib_for(model, 256)
    result = onnxprune.prune(model, x, speedup=1.5, measure_latency=False, allocation="uniform")
    check_pruned(result.model, model, x[:64], max_rel_err=0.5)
    assert sum(bool(grp.refined_error) for grp in result.report.groups) >= 1


def test_mobile_activations_give_value_and_derivative():
    """Sigmoid, HardSigmoid, HardSwish, and x · HardSigmoid(x) written as a Mul (its input is x);
    a Mul by a gate computed from something else is not an activation."""
    from onnxprune.graphview import GraphView
    b = Builder(in_shape=("N", 3, 4, 4), opset=14)
    sig = b.node("Sigmoid", ["input"])
    hsig = b.node("HardSigmoid", [sig], alpha=1 / 6, beta=0.5)
    hswish = b.node("HardSwish", [hsig])
    gated = b.node("Mul", [hswish, b.node("HardSigmoid", [hswish], alpha=1 / 6, beta=0.5)])
    other = b.node("Mul", [gated, b.node("Sigmoid", [hswish])])
    g = GraphView(b.build(other))
    z = np.linspace(-5, 5, 1001).astype(np.float32) + 1e-3
    refs = [lambda v: 1 / (1 + np.exp(-v)), lambda v: np.clip(v / 6 + 0.5, 0, 1),
            lambda v: v * np.clip(v / 6 + 0.5, 0, 1), lambda v: v * np.clip(v / 6 + 0.5, 0, 1)]
    nodes = [b.nodes[0], b.nodes[1], b.nodes[2], b.nodes[4]]
    for node, ref in zip(nodes, refs):
        f, df = handler_for(node).activation(node, g)
        numeric = (ref(z.astype(np.float64) + 1e-4) - ref(z.astype(np.float64) - 1e-4)) / 2e-4
        assert np.abs(f(z) - ref(z)).max() < 1e-5 and np.abs(df(z) - numeric).max() < 1e-3
        assert f(z).dtype == np.float32 and df(z).dtype == np.float32
    assert handler_for(nodes[3]).activation_input(nodes[3], g) == hswish
    assert handler_for(b.nodes[-1]).activation(b.nodes[-1], g) is None


def test_hard_swish_as_paddle_writes_it_is_one_activation_chain():
    """``x · relu6(x + 3) / 6`` (Paddle2ONNX's hard swish: Add, Clip, Mul, Div with scalar
    constants) walks back to ``x`` as one activation with its derivative."""
    from onnxprune.graphview import GraphView
    from onnxprune.ops import activation_chain
    b = Builder(in_shape=("N", 3, 4, 4))
    three, lo, hi, six = (b.const(np.array(v, np.float32)) for v in (3.0, 0.0, 6.0, 6.0))
    x = b.node("Relu", ["input"])
    gate = b.node("Clip", [b.node("Add", [x, three]), lo, hi])
    out = b.node("Div", [b.node("Mul", [x, gate]), six])
    g = GraphView(b.build(out))
    act, source, nodes = activation_chain(g, out)
    assert source == x and [n.op_type for n in nodes] == ["Div", "Mul"]
    z = np.linspace(-5, 5, 1001).astype(np.float32) + 1e-3
    ref = lambda v: v * np.clip(v + 3, 0, 6) / 6  # noqa: E731
    numeric = (ref(z.astype(np.float64) + 1e-4) - ref(z.astype(np.float64) - 1e-4)) / 2e-4
    assert np.abs(act[0](z) - ref(z)).max() < 1e-5 and np.abs(act[1](z) - numeric).max() < 1e-3
    assert activation_chain(g, x) is not None and activation_chain(g, "input") is None


def test_adam_step_is_adams_update_in_place():
    rng = np.random.default_rng(0)
    param = rng.standard_normal(50).astype(np.float32)
    rate = rng.uniform(0.001, 0.01, 50).astype(np.float32)
    m, v = np.zeros_like(param), np.zeros_like(param)
    ref, ref_m, ref_v = param.astype(np.float64), np.zeros(50), np.zeros(50)
    for step in range(1, 4):
        grad = rng.standard_normal(50).astype(np.float32)
        adam_step(param, grad, m, v, step, rate)
        ref_m = 0.9 * ref_m + 0.1 * grad
        ref_v = 0.999 * ref_v + 0.001 * grad.astype(np.float64) ** 2
        ref -= rate * (ref_m / (1 - 0.9 ** step)) / (np.sqrt(ref_v / (1 - 0.999 ** step)) + 1e-12)
    assert param.dtype == np.float32
    np.testing.assert_allclose(param, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m, ref_m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(v, ref_v, rtol=1e-5, atol=1e-9)


def resnext_model():
    """Stem, one ResNeXt block (16 wide, 4 conv groups of 4), GAP, Gemm."""
    b = Builder()
    x = resnext_block(b, b.node("Relu", [b.conv("input", 3, 8)]), 8, 16, 4)
    return b.build(b.gemm(b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1), 8, 5))


def _resnext_branch(model, x):
    """(sampler, graph, (first 1×1 conv, its ReLU, the grouped conv, its ReLU, the last 1×1 conv as a
    Consumer)) of the first ResNeXt block of ``model``."""
    pruner = Pruner(model, x, PruneOptions(allocation="uniform", measure_latency=False))
    g = pruner.analysis.g
    grouped = next(n for n in g.nodes_by_type("Conv") if handler_for(n).loses_whole_groups(n, g))
    act_in = g.producer[grouped.input[0]]
    act_out = g.consumers[grouped.output[0]][0]
    last = g.consumers[act_out.output[0]][0]
    return pruner.sampler, g, (g.producer[act_in.input[0]], handler_for(act_in).activation(act_in, g), grouped,
                               handler_for(act_out).activation(act_out, g), Consumer(last, last.input[0], 1))


def _predict_grouped(s, act, wm, bm, mact, w1, b1, w2, b2, per_group):
    """The consumer's output through a grouped middle, group by group (a reference written apart
    from refine.py's products)."""
    a1 = act[0](s.x @ w1.T.astype(np.float32) + b1) * s.inside[:, :, None]  # [n, taps, k]
    taps = a1.shape[1]
    zm = np.concatenate([np.einsum("nti,oit->no", a1[:, :, i:i + per_group],
                                   wm[i:i + per_group].reshape(per_group, per_group, taps))
                         for i in range(0, a1.shape[2], per_group)], axis=1)
    return mact[0](zm + bm) @ w2.T + b2


def test_resnext_branches_are_refined_through_the_grouped_conv():
    """Through a grouped conv that loses whole groups (ResNeXt, groups of 4): the first 1×1 conv's
    input patches give the last 1×1 conv's output at the sampled positions; whole maps give the
    same loss and gradients as those positions written out; the grouped filters' gradient is the
    loss's slope; the refinement tunes all three convs from perturbed grouped filters; and pruning
    refines the blocks."""
    model = resnext_model()
    x = calib_for(model, 64)
    sampler, g, (first, act, grouped, mact, c) = _resnext_branch(model, x)
    h1, hm, h2 = handler_for(first), handler_for(grouped), handler_for(c.node)
    per_group = hm.input_channels(grouped, g)
    assert per_group == 4
    s = sampler.pair_samples(g, first, c, None, None, 1 << 24, middle=grouped, whole_values=1)
    assert s.x.shape[1] == 9 and not s.inside.all()
    w1, b1, w2, b2 = h1.weight_matrix(first, g), h1.bias(first, g), h2.weight_matrix(c.node, g), h2.bias(c.node, g)
    wm, bm = hm.weight_matrix(grouped, g), hm.bias(grouped, g)
    out = _predict_grouped(s, act, wm, bm, mact, w1, b1, w2, b2, per_group)
    assert np.abs(out - s.y).max() <= 1e-4 * np.abs(s.y).max()
    whole_s = sampler.pair_samples(g, first, c, None, None, 1 << 10, middle=grouped, whole_values=1 << 24)
    assert whole_s.tap_index is not None
    params = [np.asarray(p, np.float32) for p in (w1, b1, w2, b2, wm * 0.7, bm)]
    whole, sampled = (_Pair(v, slice(None), act, None, mact, per_group=per_group) for v in (whole_s, _as_sampled(whole_s)))
    assert np.isclose(whole.loss(params)[0], sampled.loss(params)[0], rtol=1e-5)
    grads = whole.loss(params, grad=True)[1]
    for a, b in zip(grads, sampled.loss(params, grad=True)[1]):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
    for i, j in [(0, 0), (5, 17), (15, 35)]:  # the grouped filters' gradient against central differences
        step = 1e-2 * float(np.abs(params[4]).mean())
        up, down = [p.copy() for p in params], [p.copy() for p in params]
        up[4][i, j] += step
        down[4][i, j] -= step
        slope = (whole.loss(up)[0] - whole.loss(down)[0]) / (2 * step)
        assert np.isclose(grads[4][i, j], slope, rtol=0.05, atol=1e-3 * np.abs(grads[4]).max())
    noisy = wm + np.random.default_rng(0).normal(0, 0.5 * np.abs(wm).mean(), wm.shape)
    done = refine_pair(s, act, None, w1, b1, w2, b2, Middle(noisy, bm, mact, per_group))
    assert done is not None and done.error_after < 0.7 * done.error_before and done.wm.shape == wm.shape
    result = onnxprune.prune(model, x, speedup=1.3, measure_latency=False, allocation="uniform")
    check_pruned(result.model, model, x[:32], max_rel_err=0.5)
    assert any(grp.refined_error for grp in result.report.groups)


def separable_chain(seed: int = 0) -> onnx.ModelProto:
    """A plain chain of depthwise-separable blocks on 12×12 maps (depthwise 3×3, ReLU, pointwise
    1×1, ReLU; no residual Add), as MobileNetV1, YuNet and PP-LCNet have them, after a full 3×3 conv."""
    b = Builder(in_shape=("N", 3, 12, 12), seed=seed)
    x = b.node("Relu", [b.conv("input", 3, 16)])
    x = b.node("Relu", [b.conv(x, 16, 16)])  # a full conv: the conv after it is not refined with it
    for _ in range(3):
        x = b.node("Relu", [b.conv(b.node("Relu", [b.conv(x, 16, 16, group=16)]), 16, 16, k=1)])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.build(b.gemm(x, 16, 4))


def test_plain_depthwise_separable_blocks_are_refined_through_the_depthwise_conv():
    """Without a residual Add, a pointwise conv that reads a depthwise conv through its activation
    is refined with the conv before the depthwise one, through the depthwise filters (their
    sampled positions alone overfit: its targets are cached at more positions, as a residual
    branch's are); a conv that reads a full conv is not."""
    model = separable_chain()
    x = calib_for(model, 256)
    pruner = Pruner(model, x, PruneOptions(allocation="uniform", measure_latency=False))
    g = pruner.analysis.g
    convs = list(g.nodes_by_type("Conv"))
    reads = [sampling.reads_grouped_conv(g, c.input[0]) for c in convs]
    assert reads == [False, False] + [False, True] * 3  # the pointwise convs
    result = onnxprune.prune(model, x, speedup=1.5, measure_latency=False, allocation="uniform")
    check_pruned(result.model, model, x[:64], max_rel_err=0.5)
    by_name = {node_name(c): c for c in convs}
    refined = [by_name[grp.consumers[0]] for grp in result.report.groups if grp.refined_error]
    assert refined and all(sampling.reads_grouped_conv(g, c.input[0]) for c in refined)
