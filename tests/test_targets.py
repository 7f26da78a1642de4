"""Targets (MACs, params, size, latency), the accuracy guard, and the inspect / gate / bench commands."""

import json

import numpy as np
import onnx
import pytest
from conftest import check_pruned
from graphs import calib_for, mobilenet_v2, resnet50, tiny_resnet, tiny_vgg, vgg16

import onnxprune
from onnxprune.budget import count_params
from onnxprune.cli import main
from onnxprune.errors import OptionError, TargetNotMetError
from onnxprune.graphview import GraphView
from onnxprune.summary import calibration_or_zeros, summarize


@pytest.mark.parametrize("build,gmacs,mparams", [
    (resnet50, 4.1, 25.6),  # He et al. 2016; torchvision
    (mobilenet_v2, 0.300, 3.5),  # Sandler et al. 2018
    (vgg16, 15.5, 138.4),  # Simonyan & Zisserman 2015; torchvision
])
def test_cost_model_agrees_with_published_figures(build, gmacs, mparams):
    model = build()
    s = summarize(model, calibration_or_zeros(model, None, None))
    assert s.macs / 1e9 == pytest.approx(gmacs, rel=0.02)
    assert s.params / 1e6 == pytest.approx(mparams, rel=0.02)


@pytest.fixture(scope="module")
def vgg():
    model = tiny_vgg()
    return model, calib_for(model, 96)


def _params(model: onnx.ModelProto) -> int:
    return count_params(GraphView(model))


def test_params_target_holds(vgg):
    model, x = vgg
    result = onnxprune.prune(model, x, params=0.5, measure_latency=False)
    assert _params(result.model) <= 0.5 * _params(model)
    assert result.report.totals.params[1] == _params(result.model)
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)


def test_size_target_holds_together_with_speedup(vgg):
    model, x = vgg
    limit = 0.6 * model.ByteSize() / 1e6
    result = onnxprune.prune(model, x, size_mb=limit, speedup=1.3, measure_latency=False)
    assert result.model.ByteSize() / 1e6 <= limit
    assert result.report.totals.macs_speedup >= 1.3
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)


def test_unreachable_targets_say_how_close_they_got(vgg):
    model, x = vgg
    with pytest.raises(TargetNotMetError, match="cannot be reached.*MACs"):
        onnxprune.prune(model, x, params=0.001, measure_latency=False)
    with pytest.raises(TargetNotMetError, match="--latency 1000 on cpu cannot be reached"):
        onnxprune.prune(model, x, latency=1000, measure_latency=False)


def test_missing_provider_is_a_clear_option_error(vgg):
    model, x = vgg
    with pytest.raises(OptionError, match="not available"):
        onnxprune.prune(model, x, latency=1.2, provider="tensorrt")


def test_max_drop_gives_width_back(vgg):
    model, x = vgg
    unguarded = onnxprune.prune(model, x, speedup=3, measure_latency=False)
    loss = 1 - unguarded.report.fidelity[0].top1_agreement
    assert loss > 0
    result = onnxprune.prune(model, x, speedup=3, max_drop=0.8 * loss, measure_latency=False)
    assert not result.report.targets_met
    assert 1 < result.report.totals.macs_speedup < 3
    assert 1 - result.report.fidelity[0].top1_agreement <= 0.8 * loss
    check_pruned(result.model, model, x[:16], max_rel_err=1.0)


def test_max_drop_met_first_time_keeps_the_target(vgg):
    model, x = vgg
    result = onnxprune.prune(model, x, speedup=1.2, max_drop=0.99, measure_latency=False)
    assert result.report.targets_met and result.report.totals.macs_speedup >= 1.2


@pytest.fixture
def files(tmp_path):
    model = tiny_resnet()
    x = calib_for(model, 64)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x)
    assert main([str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "-o", str(tmp_path / "p.onnx"),
                 "--speedup", "1.5", "--round-to", "1", "--no-latency", "-q"]) == 0
    check_pruned(onnx.load(tmp_path / "p.onnx"), model, x[:16], max_rel_err=1.0)
    return tmp_path


def test_inspect_prints_costs_groups_and_barriers(files, capsys):
    assert main(["inspect", str(files / "m.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["macs"] > 0 and info["params"] == _params(onnx.load(files / "m.onnx"))
    reasons = [g[2] for g in info["groups"]]
    assert "" in reasons and any("residual" in r for r in reasons)


def test_gate_passes_and_fails_with_one_line_reason(files, capsys):
    pruned, ref, calib = str(files / "p.onnx"), str(files / "m.onnx"), str(files / "x.npy")
    size = (files / "p.onnx").stat().st_size / 1e6
    assert main(["gate", pruned, "--max-size-mb", str(size * 1.01), "--reference", ref, "--calib", calib,
                 "--min-agreement", "0.0", "--max-error", "10"]) == 0
    capsys.readouterr()
    assert main(["gate", pruned, "--max-size-mb", str(size * 0.5), "--max-macs", "1000", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxprune: gate failed: size MB")
    assert main(["gate", pruned, "--min-agreement", "0.9"]) == 2  # needs --reference


def test_bench_reports_every_model_and_batch(files, capsys):
    assert main(["bench", str(files / "m.onnx"), str(files / "p.onnx"), "--batch", "1", "4", "--repeats", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 2 * 2 and lines[0].split()[:2] == ["model", "batch"]
