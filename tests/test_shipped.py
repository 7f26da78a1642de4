"""The CLI end to end on the shipped Fashion-MNIST models: target, validity, accuracy kept."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import MODELS, check_pruned, run

from onnxprune.cli import main

CALIB = MODELS / "fmnist_calib.npy"


def accuracy(model, test) -> float:
    return 100.0 * float((run(model, test["x"])[0].argmax(1) == test["y"]).mean())


@pytest.fixture(scope="module")
def test_set():
    z = np.load(MODELS / "fmnist_test.npz")
    return {"x": z["x"], "y": z["y"]}


# Measured drops on the 10k test set at 2x (README): VGG 0.7-0.8, ResNet 1.4-1.6, MobileNet 2.4 points
# (3.25 on the 2000 shipped images, models/README.md); the bounds below are for the 2000 shipped test images.
@pytest.mark.parametrize("name,max_drop", [("vgg_fmnist", 1.5), ("resnet_fmnist", 2.0), ("mobilenet_fmnist", 4.0)])
def test_cli_prunes_shipped_model_keeping_accuracy(tmp_path, name, max_drop, test_set):
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    src = MODELS / f"{name}.onnx"
    before = src.read_bytes()
    code = main([str(src), "--speedup", "2", "--calib", str(CALIB), "-o", str(out), "--report", str(report),
                 "-q", "--no-latency"])
    assert code == 0
    assert src.read_bytes() == before  # the input is untouched
    data = json.loads(report.read_text())
    assert 2.0 <= data["totals"]["macs_speedup"] <= 2.3
    original, pruned = onnx.load(src), onnx.load(out)
    check_pruned(pruned, original, test_set["x"][:200], max_rel_err=0.5)
    drop = accuracy(original, test_set) - accuracy(pruned, test_set)
    assert drop <= max_drop, drop
    assert data["fidelity"][0]["top1_agreement"] >= 0.9
    assert all(g["channels_after"] % 8 == 0 for g in data["groups"])  # the CLI's --round-to 16 default on CPU (8 for 16-wide groups)


def test_magnitude_pruning_without_reconstruction_is_clearly_worse(tmp_path, test_set):
    """... so much worse that the default safety net flags it (exit 1, the model still written)."""
    src = MODELS / "vgg_fmnist.onnx"
    accs = {}
    for flags, code in ((["--method", "lasso"], 0), (["--method", "l1", "--no-reconstruct"], 1)):
        out = tmp_path / f"{flags[1]}.onnx"
        assert main([str(src), "--speedup", "2", "--calib", str(CALIB), "-o", str(out), "-q", "--no-latency",
                     *flags]) == code
        accs[flags[1]] = accuracy(onnx.load(out), test_set)
    assert accs["lasso"] >= accs["l1"] + 5


@pytest.mark.parametrize("setup,args,msg", [
    (lambda p: None, ["--calib", "{tmp}/missing.npy"], "does not exist"),
    (lambda p: np.save(p / "bad.npy", np.zeros((4, 1, 32, 32), np.float32)), ["--calib", "{tmp}/bad.npy"], "axis 2"),
    (lambda p: np.save(p / "bad.npy", np.zeros((4, 1, 28, 28), np.int64)), ["--calib", "{tmp}/bad.npy"], "int64"),
    (lambda p: np.save(p / "bad.npy", np.full((4, 1, 28, 28), np.inf, np.float32)), ["--calib", "{tmp}/bad.npy"], "NaN"),
    (lambda p: (p / "empty").mkdir(), ["--calib", "{tmp}/empty"], "holds no"),
    (lambda p: None, ["--calib", str(CALIB), "--speedup", "0.3"], "speedup"),
    (lambda p: None, [], "calibration data"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, setup, args, msg):
    setup(tmp_path)
    out = tmp_path / "out.onnx"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "onnxprune", str(MODELS / "vgg_fmnist.onnx"), "-o", str(out), *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and lines[0].startswith("onnxprune: error:")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_refuses_to_overwrite(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"precious")
    code = main([str(MODELS / "vgg_fmnist.onnx"), "--calib", str(CALIB), "-o", str(out), "-q"])
    assert code == 2 and out.read_bytes() == b"precious"


def _save(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


def test_no_prunable_layer_exits_0_and_writes_nothing(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    src = _save(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    out = tmp_path / "out.onnx"
    assert main([str(src), "-o", str(out), "--method", "l1", "--no-reconstruct", "-q"]) == 0
    assert not out.exists()


def test_quantized_model_is_refused_with_advice(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    src = _save(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    proc = subprocess.run([sys.executable, "-m", "onnxprune", str(src), "--calib", str(CALIB)], capture_output=True, text=True)
    assert proc.returncode == 2 and "prune the float model first" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_export_arch_and_image_folder(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    x = np.load(CALIB)[:40, 0]
    for i, img in enumerate(x):
        Image.fromarray(((img * 0.353 + 0.286).clip(0, 1) * 255).astype(np.uint8)).save(images / f"{i}.png")
    out, arch = tmp_path / "p.onnx", tmp_path / "arch.json"
    code = main([str(MODELS / "vgg_fmnist.onnx"), "--calib", str(images), "--mean", "0.286", "--std", "0.353",
                 "--speedup", "1.5", "-o", str(out), "--export-arch", str(arch), "-q", "--no-latency"])
    assert code == 0
    layers = json.loads(arch.read_text())["layers"]
    assert any(layer["out_channels"] < layer["original_out_channels"] for layer in layers)
    check_pruned(onnx.load(out), onnx.load(MODELS / "vgg_fmnist.onnx"), np.load(CALIB)[:50], max_rel_err=0.5)
