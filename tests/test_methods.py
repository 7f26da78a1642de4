"""ThiNet, Network Slimming, and the architecture export."""

import numpy as np
import pytest
from conftest import check_pruned
from graphs import Builder, calib_for, random_cnn, tiny_resnet, tiny_vgg

import onnxprune
from onnxprune.allocation import Plan
from onnxprune.arch import architecture, exporter_name
from onnxprune.errors import OptionError
from onnxprune.select import contribution_problem, thinet_select
from onnxprune.stats import LayerStats


def test_thinet_removes_the_least_contributing_channels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 8))
    w = rng.normal(size=(5, 8))
    w[:, 2] = 0.0           # channel 2 contributes nothing
    w[:, 6] *= 0.01         # channel 6 contributes almost nothing
    w[:, 4] *= 0.1          # channel 4 little
    st = LayerStats(8, 5)
    st.add(x, x @ w.T, np.arange(3000) % 2)
    xtx, xty, _, _ = st.total()
    gram, _ = contribution_problem(xtx[:-1, :-1], xty[:-1], w, 8)
    assert set(thinet_select(gram, 5)) == {0, 1, 3, 5, 7}


@pytest.mark.parametrize("method", ["thinet", "slim", "lasso", "obs", "l1", "random"])
@pytest.mark.parametrize("build", [tiny_vgg, tiny_resnet])
def test_every_method_gives_a_valid_model(method, build):
    model = build()
    x = calib_for(model, 100)
    kwargs = {"slim_fallback": "l1"} if method == "slim" else {}
    result = onnxprune.prune(model, x, speedup=1.8, method=method, measure_latency=False, **kwargs)
    assert result.report.totals.macs_speedup >= 1.8
    check_pruned(result.model, model, x[:20], max_rel_err=2.0)


@pytest.mark.parametrize("blocks,widths,chosen", [
    (["conv", "depthwise", "conv"], [8, 16, 8], "obs"), (["depthwise", "residual", "conv"], [8, 16, 8], "obs"),
    (["conv", "conv", "conv"], [8, 16, 8], "obs"), (["conv", "residual", "conv"], [8, 16, 8], "lasso"),
    (["conv", "conv", "conv"], [8, 240, 8], "lasso")])  # 240 x 3x3 = 2160 input columns: a wide plain chain
def test_default_method_is_lasso_on_residual_and_wide_networks_and_obs_elsewhere(blocks, widths, chosen):
    model = random_cnn(blocks, widths)
    x = calib_for(model, 60)
    result = onnxprune.prune(model, x, speedup=1.5, measure_latency=False)
    assert result.report.method == chosen
    assert result.report.totals.macs_speedup >= 1.5
    check_pruned(result.model, model, x[:20], max_rel_err=2.0)
    explicit = onnxprune.prune(model, x, speedup=1.5, method=chosen, measure_latency=False)
    assert explicit.model.SerializeToString() == result.model.SerializeToString()


def test_slim_uses_bn_gamma_and_refuses_without_bn():
    b = Builder()
    x = b.node("Relu", [b.bn(b.conv("input", 3, 6, bias=False), 6)])
    model = b.build(b.conv(x, 6, 4))
    gamma = next(t for t in model.graph.initializer if t.name == model.graph.node[1].input[1])
    gamma.CopyFrom(onnxprune_tensor(np.array([0.1, 5, 0.2, 4, 3, 0.3], np.float32), gamma.name))
    result = onnxprune.prune(model, calib_for(model, 40), speedup=1.9, method="slim", reconstruct=False,
                             measure_latency=False)
    assert result.report.groups[0].channels_after == 3
    w = [t for t in result.model.graph.initializer if len(t.dims) == 4]
    assert sorted(int(t.dims[0]) for t in w) == [3, 4]
    check_pruned(result.model, model, calib_for(model, 10), max_rel_err=2.0)
    with pytest.raises(OptionError, match="slim-fallback"):
        onnxprune.prune(tiny_vgg(), calib_for(tiny_vgg(), 40), speedup=1.5, method="slim", measure_latency=False)


def onnxprune_tensor(arr, name):
    from onnx import numpy_helper

    return numpy_helper.from_array(arr, name)


def test_architecture_export_lists_pruned_widths():
    model = tiny_vgg()
    result = onnxprune.prune(model, calib_for(model, 80), speedup=2.0, measure_latency=False)
    arch = architecture(result.report)
    convs = [layer for layer in arch["layers"] if layer["op_type"] == "Conv"]
    assert any(layer["out_channels"] < layer["original_out_channels"] for layer in convs)
    assert exporter_name("/layer1/layer1.0/conv1/Conv") == "conv1"
    assert exporter_name("features_0") == "features_0"


def _run_for(model, x, **options):
    """onnxprune's internal pruning run, set up the way prune() sets it up (for the ``keep`` hook)."""

    from onnxprune import PruneOptions, Pruner

    return Pruner(model, x, PruneOptions(measure_latency=False, allocation="uniform", **options))


@pytest.mark.parametrize("reconstruct", [False, True])
def test_prune_to_keeps_the_channels_it_is_given(reconstruct):
    from onnx import numpy_helper

    model = tiny_vgg()
    run = _run_for(model, calib_for(model, 60), method="l1", reconstruct=reconstruct)
    first = run.candidates[0]
    assert first.producers[0].op_type == "Conv" and first.channels == 8
    widths = {g.index: g.channels for g in run.candidates} | {first.index: 4}
    result = run.prune(Plan(widths, 1), keep={first.index: np.array([6, 1, 5, 3])})
    pruned, results = result.model, result.groups
    assert results[0].channels_after == 4
    w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in run.work.graph.initializer}
    conv = next(n for n in pruned.graph.node if n.output[0] == first.producers[0].output[0])
    np.testing.assert_array_equal(w[conv.input[1]], before[first.producers[0].input[1]][[1, 3, 5, 6]])
    check_pruned(pruned, model, calib_for(model, 10), max_rel_err=2.0)
    with pytest.raises(ValueError, match="4 distinct channels"):
        run.prune(Plan(widths, 1), keep={first.index: np.array([1, 1, 2, 3])})
