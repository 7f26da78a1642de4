"""Stripe-wise pruning (--method stripe): selection, refit, the emitted graph and its MACs."""

import numpy as np
import onnx
import pytest
from conftest import check_pruned, run
from graphs import Builder, calib_for, tiny_resnet, tiny_vgg
from onnx import helper, numpy_helper

import onnxprune
import onnxprune.stripe as stripe
from onnxprune.calib import Calibration
from onnxprune.errors import OptionError
from onnxprune.select import Method
from onnxprune.stats import LayerStats
from onnxprune.summary import model_macs


def _patches(rng, n, cin, p):
    return rng.normal(size=(n, cin * p))


def test_selection_drops_zero_and_redundant_stripes():
    rng = np.random.default_rng(0)
    cin, cout, k = 4, 6, 3
    p = k * k
    w = rng.normal(size=(cout, cin, k, k))
    w4 = w.reshape(cout, cin, p)
    w4[:, :, [0, 2]] = 0.0         # positions 0 and 2: exactly zero in every filter
    w4[:, :, 8] *= 1e-3            # position 8: negligible
    w4[1, :, 4] = 0.0              # filter 1 also drops its centre
    x = _patches(rng, 4000, cin, p)
    y = x @ w.reshape(cout, -1).T
    st = LayerStats(cin * p, cout)
    st.add(x, y, np.arange(len(x)) % 2)
    xtx, xty, _, _ = st.total()
    gram, corr = stripe.stripe_problem(xtx[:-1, :-1], xty[:-1], w)
    informative = np.ones((cout, p), bool)
    informative[:, [0, 2, 8]] = False
    informative[1, 4] = False
    kept = stripe.select_stripes(gram, corr, int(informative.sum()))
    assert (kept == informative).all()
    # the refit of the kept stripes reproduces the output (the dropped ones carried ~nothing)
    new_w, new_b, before, after = stripe.refit_stripes(st, w, None, kept)
    assert after <= before < 1e-4
    assert (new_w.reshape(cout, cin, p)[~kept[:, None, :].repeat(cin, 1)] == 0).all()


def test_selection_drops_a_redundant_stripe_and_the_refit_absorbs_it():
    rng = np.random.default_rng(1)
    cin, cout, p = 3, 4, 4
    x = _patches(rng, 3000, cin, p)
    x.reshape(-1, cin, p)[:, :, 3] = x.reshape(-1, cin, p)[:, :, 1]  # position 3 duplicates position 1
    w = rng.normal(size=(cout, cin, 2, 2))
    w.reshape(cout, cin, p)[:, :, 3] = 0.5 * w.reshape(cout, cin, p)[:, :, 1]  # so z_3 = z_1 / 2: redundant
    y = x @ w.reshape(cout, -1).T
    st = LayerStats(cin * p, cout)
    st.add(x, y, np.arange(len(x)) % 2)
    xtx, xty, _, _ = st.total()
    kept = stripe.select_stripes(*stripe.stripe_problem(xtx[:-1, :-1], xty[:-1], w), 3 * cout)
    assert (kept == np.array([True, True, True, False])).all()  # the smaller duplicate goes
    _, _, _, after = stripe.refit_stripes(st, w, None, kept)
    assert after < 1e-6


@pytest.mark.parametrize("geometry", [((3, 3), (2, 2), (1, 1), [1, 1, 1, 1], (9, 10)),
                                      ((5, 3), (1, 2), (2, 1), [2, 0, 1, 3], (11, 8)),
                                      ((3, 3), (1, 1), (1, 1), [0, 0, 0, 0], (7, 7))])
def test_stripe_form_equals_the_dense_conv(geometry):
    kernel, strides, dil, pads, hw = geometry
    rng = np.random.default_rng(2)
    kept = rng.random((6, kernel[0] * kernel[1])) < 0.5
    kept[0] = False  # a filter left with its bias alone
    w = rng.normal(size=(6, 4, *kernel)).astype(np.float32)
    w.reshape(6, 4, -1)[~kept[:, None, :].repeat(4, 1)] = 0
    b = rng.normal(size=6).astype(np.float32)
    geo = stripe._ConvGeometry(kernel, pads, list(strides), list(dil))
    nodes, inits = stripe.stripe_nodes("x", "y", w, b, kept, geo, "s")
    sparse = stripe.layer_model((2, 4, *hw), nodes, inits, "x", "y", 13)
    onnx.checker.check_model(sparse, full_check=True)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(kernel), strides=list(strides),
                            dilations=list(dil), pads=pads)
    dense = stripe.layer_model((2, 4, *hw), [conv], [numpy_helper.from_array(w, "w"),
                                                      numpy_helper.from_array(b, "b")], "x", "y", 13)
    x = rng.normal(size=(2, 4, *hw)).astype(np.float32)
    np.testing.assert_allclose(run(sparse, x)[0], run(dense, x)[0], atol=1e-5)


@pytest.mark.parametrize("build", [tiny_vgg, tiny_resnet])
def test_stripe_method_end_to_end(build):
    model = build()
    x = calib_for(model, 100)
    result = onnxprune.prune(model, x, speedup=1.3, method="stripe", measure_latency=False)
    check_pruned(result.model, model, x[:20], max_rel_err=0.5)
    rep = result.report
    assert rep.method == "stripe" and rep.stripe["stripe_macs_speedup"] >= 1.3
    layers = rep.stripe["layers"]
    assert layers and all(r["emitted"] for r in layers)  # not measured: every layer in stripe form
    # the MACs reported are the emitted graph's
    macs = model_macs(result.model, Calibration({"input": x[:1]}))
    assert rep.totals.macs[1] == macs == sum(r.macs[1] for r in rep.layers) == rep.stripe["stripe_macs"]
    assert rep.totals.macs_speedup >= 1.3
    assert sum(n.op_type == "Slice" for n in result.model.graph.node) > 0
    for r in layers:  # per layer: kept stripes × Cin × Hout·Wout
        assert r["macs_stripes"] * r["stripes"][0] == r["macs_dense"] * r["stripes"][1]


def test_dense_form_keeps_macs_and_outputs():
    model = tiny_resnet()
    x = calib_for(model, 100)
    sparse = onnxprune.prune(model, x, speedup=1.5, method="stripe", measure_latency=False)
    original = stripe.prune_stripes
    try:
        stripe.prune_stripes = lambda *a, **k: original(*a, **k, emit_mode="dense")
        dense = onnxprune.prune(model, x, speedup=1.5, method="stripe", measure_latency=False)
    finally:
        stripe.prune_stripes = original
    np.testing.assert_allclose(run(dense.model, x[:10])[0], run(sparse.model, x[:10])[0], atol=1e-4)
    assert dense.report.totals.macs[1] == dense.report.totals.macs[0]  # honest: dense convs cost dense MACs
    assert len(dense.report.stripe["kept_dense"]) == len(dense.report.stripe["layers"])
    assert "Conv/dense" in {r.op_type for r in dense.report.layers}


def test_measured_choice_is_reported():
    model = tiny_vgg()
    x = calib_for(model, 60)
    result = onnxprune.prune(model, x, speedup=1.3, method="stripe")
    check_pruned(result.model, model, x[:10], max_rel_err=0.6)
    for r in result.report.stripe["layers"]:
        dense_ms, stripe_ms = r["latency_ms"]
        assert r["emitted"] == (stripe_ms < dense_ms)
        assert r["emitted"] or "slower" in r["kept_dense_reason"]


def test_stripe_options_and_limits():
    assert Method("stripe") is Method.STRIPE and Method.STRIPE.needs_data
    model = tiny_vgg()
    x = calib_for(model, 40)
    with pytest.raises(OptionError, match="not supported with --method stripe"):
        onnxprune.prune(model, x, speedup=1.3, method="stripe", params=0.5, measure_latency=False)
    with pytest.raises(OptionError, match="calibration"):
        onnxprune.prune(model, None, speedup=1.3, method="stripe", measure_latency=False)
    b = Builder()
    only_1x1 = b.build(b.conv("input", 3, 4, k=1, pad=0))
    with pytest.raises(onnxprune.errors.NothingToPrune):
        onnxprune.prune(only_1x1, calib_for(only_1x1, 20), method="stripe", measure_latency=False)


def test_batched_cg_refit_matches_the_exact_refit():
    """Large layers are refit by batched conjugate gradients: on a problem the exact per-pattern
    refit solves, it must reach (nearly) the same error and never make a filter worse."""
    rng = np.random.default_rng(3)
    cin, cout, p = 6, 10, 9
    x = _patches(rng, 5000, cin, p)
    w = rng.normal(size=(cout, cin, 3, 3))
    y = x @ w.reshape(cout, -1).T + 0.1 * rng.normal(size=(len(x), cout))
    st = LayerStats(cin * p, cout)
    st.add(x, y, np.arange(len(x)) % 2)
    kept = rng.random((cout, p)) < 0.5
    kept[:, 4] = True
    exact = stripe.refit_stripes(st, w, None, kept)
    cg = stripe.refit_stripes_cg(st, w, None, kept)
    assert cg[3] <= cg[2]
    assert cg[3] == pytest.approx(exact[3], rel=0.02)
    dropped = ~np.repeat(kept[:, None, :], cin, 1)
    assert (cg[0].reshape(cout, cin, p)[dropped] == 0).all()
