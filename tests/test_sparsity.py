"""Issue 18: --sparsity 2:4 after pruning — every sparse weight keeps at most 2 of each run of 4
input channels, the kept weights are refit on calibration data, and bad combinations are one line."""

import numpy as np
import onnx
import pytest
from conftest import check_pruned
from graphs import Builder, calib_for

import onnxprune
from onnxprune import sparsity
from onnxprune.activations import tensor_shapes
from onnxprune.calib import Calibration
from onnxprune.cli import main
from onnxprune.errors import OptionError
from onnxprune.graphview import GraphView
from onnxprune.sparsity import (
    mask_2_4,
    mask_2_4_obs,
    refit_kept,
    satisfies_2_4,
    sparsify_2_4,
)


def wide_cnn() -> onnx.ModelProto:
    """conv(3→32) → ReLU → conv(32→32) → ReLU → conv(32→32) → ReLU → GAP → Gemm(32→10)."""
    b = Builder()
    x = b.node("Relu", [b.conv("input", 3, 32)])
    x = b.node("Relu", [b.conv(x, 32, 32)])
    x = b.node("Relu", [b.conv(x, 32, 32)])
    return b.build(b.gemm(b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1), 32, 10))


def test_layers_too_far_from_dense_stay_dense_with_the_reason():
    model = wide_cnn()
    result = onnxprune.prune(model, calib_for(model, 128), speedup=1.3, sparsity="2:4", measure_latency=False)
    reasons = [layer["skipped"] for layer in result.report.sparsity]
    assert all(r == "" or "input channels" in r or "would put its outputs off by" in r for r in reasons), reasons
    assert any("would put its outputs off by" in r for r in reasons)  # random convs lose much to 2:4


def test_pruned_and_sparse_model_keeps_2_of_4_and_runs(monkeypatch):
    monkeypatch.setattr(sparsity, "MAX_LAYER_ERROR", 1.0)  # every eligible layer goes sparse
    model = wide_cnn()
    x = calib_for(model, 128)
    result = onnxprune.prune(model, x, speedup=1.3, round_to=4, sparsity="2:4", measure_latency=False)
    layers = {layer["node"]: layer for layer in result.report.sparsity}
    sparse = [name for name, layer in layers.items() if not layer["skipped"]]
    assert len(sparse) >= 2 and "3 input channels" in next(lay["skipped"] for lay in layers.values()
                                                           if lay["skipped"])
    g = GraphView(result.model)
    for node in g.graph.node:
        name = node.name or node.output[0]
        if name in sparse:
            w = g.const(node.input[1])
            w2 = w.reshape(w.shape[0], -1) if node.op_type == "Conv" else (w if node.attribute else w.T)
            kernel = int(np.prod(w.shape[2:])) if node.op_type == "Conv" else 1
            assert satisfies_2_4(w2, kernel), name
            assert (w2 == 0).mean() >= 0.5 - 1e-9
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)


def test_refit_recovers_more_than_masking_alone():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 32)) @ rng.normal(size=(32, 32))  # correlated inputs
    w, bias = rng.normal(size=(8, 32)), rng.normal(size=8)
    aug = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    gram = aug.T @ aug
    keep = mask_2_4(w, np.sqrt(np.diag(gram)[:-1]), 1)
    assert satisfies_2_4(np.where(keep, w, 0.0), 1) and keep.sum() == w.size // 2
    dense = x @ w.T + bias
    masked = x @ np.where(keep, w, 0.0).T + bias
    new_w, new_b = refit_kept(w, bias, gram, keep, True)
    refit = x @ np.where(keep, new_w, 0.0).T + new_b
    assert np.linalg.norm(refit - dense) < 0.7 * np.linalg.norm(masked - dense)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_sequential_refit_makes_up_for_earlier_layers(monkeypatch):
    """Each layer fit on the inputs of the model sparsified so far (towards the dense outputs)
    ends closer to the dense model than layers each fit on the dense model's own inputs."""
    monkeypatch.setattr(sparsity, "MAX_LAYER_ERROR", 1.0)
    model = wide_cnn()
    x = calib_for(model, 160)
    cal = Calibration({model.graph.input[0].name: x})
    shapes = tensor_shapes(model, cal)
    fit, held = np.arange(128), x[128:]
    dense = _outputs(model, held)
    errors = {}
    for sequential in (False, True):
        sparse, layers = sparsify_2_4(model, shapes, cal, fit, 32, sequential=sequential)
        assert sum(not layer.skipped for layer in layers) == 3  # the 3-channel stem stays dense
        errors[sequential] = np.linalg.norm(_outputs(sparse, held) - dense) / np.linalg.norm(dense)
    assert errors[True] < 0.9 * errors[False], errors


def test_obs_mask_keeps_2_of_4_at_every_kernel_position():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 8 * 9)) @ rng.normal(size=(72, 72)) / 8
    aug = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    w = rng.normal(size=(6, 73))
    keep = mask_2_4_obs(w, aug.T @ aug, 9, bias_last=True)
    assert keep.shape == (6, 72) and satisfies_2_4(np.where(keep, 1.0, 0.0), 9) and keep.sum() == 6 * 36


@pytest.mark.parametrize("options,message", [
    ({"sparsity": "1:4"}, "2:4"),
    ({"sparsity": "2:4", "method": "stripe"}, "stripe"),
])
def test_bad_sparsity_options_are_option_errors(options, message):
    model = wide_cnn()
    with pytest.raises(OptionError, match=message):
        onnxprune.prune(model, calib_for(model, 8), measure_latency=False, **options)


def test_sparsity_needs_calibration_data_one_line(tmp_path, capsys):
    onnx.save(wide_cnn(), tmp_path / "m.onnx")
    code = main([str(tmp_path / "m.onnx"), "--sparsity", "2:4", "--method", "l1", "--no-reconstruct",
                 "-o", str(tmp_path / "p.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--calib" in err[0], err
    assert not (tmp_path / "p.onnx").exists()
