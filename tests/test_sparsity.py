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
from onnxprune.frontier import Frontier
from onnxprune.sparsity import (
    mask_2_4,
    mask_2_4_obs,
    obs_2_4,
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


def _sparse_weights(model: onnx.ModelProto, names: set[str]) -> dict[str, tuple[np.ndarray, int]]:
    """``[Cout, Cin·k]`` weights (and k) of the named Conv/Gemm nodes."""
    g = GraphView(model)
    out = {}
    for node in g.graph.node:
        name = node.name or node.output[0]
        if name in names:
            w = g.const(node.input[1])
            w2 = w.reshape(w.shape[0], -1) if node.op_type == "Conv" else (w if node.attribute else w.T)
            out[name] = (w2, int(np.prod(w.shape[2:])) if node.op_type == "Conv" else 1)
    return out


def _setup(model: onnx.ModelProto, n: int = 160):
    x = calib_for(model, n)
    cal = Calibration({model.graph.input[0].name: x})
    return x, cal, tensor_shapes(model, cal)


def test_both_frontiers_move_their_cut_layer_by_layer(monkeypatch):
    """The sparse model's frontier moves its cut with the dense one's: each layer's statistics run
    only the segment since the previous layer on both models, never the sparse prefix again."""
    monkeypatch.setattr(sparsity, "MAX_LAYER_ERROR", 1.0)
    made: list[Frontier] = []

    class Recording(Frontier):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.starts: list[int] = []
            made.append(self)

        def run(self, outputs, advance_to=None):
            self.starts.append(self.position)
            return super().run(outputs, advance_to)

    monkeypatch.setattr(sparsity, "Frontier", Recording)
    model = wide_cnn()
    x, cal, shapes = _setup(model)
    sparse, layers = sparsify_2_4(model, shapes, cal, np.arange(128), 32)
    index = {node.name or node.output[0]: i for i, node in enumerate(model.graph.node)}
    positions = [index[layer.node] for layer in layers if not layer.skipped]
    assert len(positions) == 3 and len(made) == 2
    for frontier in made:  # dense, then sparse
        assert frontier.starts == [0, *positions[:-1]], frontier.starts
        assert frontier.position == positions[-1]


def _obs_per_column(weight, hessian, kernel, bias_last=False, ridge=sparsity.RIDGE):
    """The OBS sweep as first written (every later column updated after each column): the reference
    for the lazy block updates."""
    cout, cols = weight.shape
    d = cols - 1 if bias_last else cols
    cin = d // kernel
    perm = np.arange(d).reshape(cin // 4, 4, kernel).transpose(0, 2, 1).reshape(-1)
    order = np.concatenate([perm, np.arange(d, cols)])
    h = hessian[np.ix_(order, order)].copy()
    h[np.arange(d), np.arange(d)] += ridge * float(np.mean(np.diag(hessian)[:d])) + 1e-12
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    w = weight[:, order].copy()
    keep = np.ones((cout, d), dtype=bool)
    diag = np.diag(u)
    for start in range(0, d, 4):
        run = slice(start, start + 4)
        score = w[:, run] ** 2 / diag[run][None, :] ** 2
        drop = np.argsort(score, axis=1)[:, :2]
        np.put_along_axis(keep[:, run], drop, False, axis=1)
        for j in range(start, start + 4):
            err = np.where(keep[:, j], 0.0, w[:, j]) / diag[j]
            w[:, j:] -= err[:, None] * u[j, j:][None, :]
    out, new = np.empty_like(keep), np.empty_like(w)
    out[:, perm] = keep
    new[:, order] = w
    new[:, :d][~out] = 0.0
    return out, new


@pytest.mark.parametrize("block,bias_last", [(128, True), (8, True), (12, False)])
def test_lazy_block_obs_matches_per_column_updates(monkeypatch, block, bias_last):
    monkeypatch.setattr(sparsity, "OBS_BLOCK", block)
    rng = np.random.default_rng(2)
    d, kernel = 32 * 9, 9  # 288 columns: three blocks of 128 (the last one short)
    x = rng.normal(size=(4000, d)) @ rng.normal(size=(d, d)) / 16
    aug = np.concatenate([x, np.ones((len(x), 1))], axis=1) if bias_last else x
    gram = aug.T @ aug
    w = rng.normal(size=(10, aug.shape[1]))
    ref_keep, ref_w = _obs_per_column(w, gram, kernel, bias_last)
    keep, new_w = obs_2_4(w, gram, kernel, bias_last)
    assert (keep == ref_keep).all()
    np.testing.assert_allclose(new_w, ref_w, rtol=1e-8, atol=1e-10 * np.abs(ref_w).max())
    assert (mask_2_4_obs(w, gram, kernel, bias_last) == keep).all()
    # with the mask given, the sweep only compensates: the same weights
    again = obs_2_4(w, gram, kernel, bias_last, keep=keep)
    assert (again[0] == keep).all() and np.allclose(again[1], new_w)


def test_refit_over_the_flop_budget_uses_the_obs_update(monkeypatch):
    monkeypatch.setattr(sparsity, "MAX_LAYER_ERROR", 1.0)
    monkeypatch.setattr(sparsity, "MAX_REFIT_FLOPS", 0)
    model = wide_cnn()
    x, cal, shapes = _setup(model)
    sparse, layers = sparsify_2_4(model, shapes, cal, np.arange(128), 32)
    names = {layer.node for layer in layers if not layer.skipped}
    assert len(names) == 3
    for layer in layers:
        if not layer.skipped:
            assert "OBS update, no exact refit" in layer.mask and np.isfinite(layer.error), layer
    for name, (w, kernel) in _sparse_weights(sparse, names).items():
        assert satisfies_2_4(w, kernel) and (w == 0).mean() >= 0.5 - 1e-9, name
    out = _outputs(sparse, x[128:])
    assert np.isfinite(out).all()


def test_layers_too_wide_for_gram_matrices_get_the_norm_mask_and_a_measured_error(monkeypatch):
    monkeypatch.setattr(sparsity, "MAX_LAYER_ERROR", 1.0)
    monkeypatch.setattr(sparsity, "MAX_GRAM_COLUMNS", 64)  # the 3×3 convs (289 columns) are too wide
    model = wide_cnn()
    x, cal, shapes = _setup(model)
    sparse, layers = sparsify_2_4(model, shapes, cal, np.arange(128), 32)
    names = {layer.node for layer in layers if not layer.skipped}
    masks = sorted(layer.mask for layer in layers if not layer.skipped)
    assert len(names) == 3 and masks[-2:] == ["wanda (no refit: 289 columns)"] * 2, masks
    assert all(np.isfinite(layer.error) and np.isfinite(layer.inherited) for layer in layers if not layer.skipped)
    for name, (w, kernel) in _sparse_weights(sparse, names).items():
        assert satisfies_2_4(w, kernel) and (w == 0).mean() >= 0.5 - 1e-9, name
    assert np.isfinite(_outputs(sparse, x[128:])).all()


def test_wide_path_error_is_the_layers_output_error(monkeypatch):
    """One Gemm (every sample's one row sampled): the measured error is the model's own."""
    monkeypatch.setattr(sparsity, "MAX_LAYER_ERROR", 1.0)
    monkeypatch.setattr(sparsity, "MAX_GRAM_COLUMNS", 8)
    b = Builder(in_shape=("N", 32))
    model = b.build(b.gemm("input", 32, 8))
    x, cal, shapes = _setup(model, 96)
    sparse, layers = sparsify_2_4(model, shapes, cal, np.arange(96), 32)
    assert layers[0].mask == "wanda (no refit: 33 columns)" and layers[0].inherited == 0.0
    dense_out, sparse_out = _outputs(model, x), _outputs(sparse, x)
    expected = np.linalg.norm(sparse_out - dense_out) / np.linalg.norm(dense_out)
    assert layers[0].error == pytest.approx(expected, rel=1e-4)
