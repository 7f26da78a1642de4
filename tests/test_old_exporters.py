"""Models from old exporters (the ONNX Model Zoo's classics are opset 7-10, IR version 3 with every
weight also a graph input): converted to opset 11 on load and pruned like any other."""

import numpy as np
import onnx
import pytest
from conftest import check_pruned
from graphs import Builder, calib_for
from hostile import old_unconvertible
from onnx import helper

import onnxprune
from onnxprune import cli
from onnxprune.errors import ModelError
from onnxprune.io import MIN_OPSET, default_opset, load_model, upgraded


def _head(b: Builder, x: str, c: int) -> onnx.ModelProto:
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.build(b.gemm(flat, c, 10), out_shape=["N", 10])


def lrn_net() -> onnx.ModelProto:
    """AlexNet / GoogLeNet (Caffe2 exports, opset 9): ReLU → LRN across channels → MaxPool."""
    b = Builder(in_shape=("N", 3, 16, 16), opset=9)
    x = b.node("LRN", [b.node("Relu", [b.conv("input", 3, 16)])], size=5, alpha=1e-4, beta=0.75, bias=1.0)
    x = b.node("Relu", [b.conv(b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), 16, 24)])
    return _head(b, b.node("Relu", [b.conv(x, 24, 24)]), 24)


def image_scaler_net() -> onnx.ModelProto:
    """Tiny-YOLOv2 (opset 8): the experimental ImageScaler on the input, BatchNormalization with its
    opset-7 ``spatial`` attribute, LeakyRelu."""
    b = Builder(in_shape=("N", 3, 16, 16), opset=8)
    x = b.node("ImageScaler", ["input"], bias=[-0.5, 0.0, 0.5], scale=0.5)
    x = b.node("LeakyRelu", [b.bn(b.conv(x, 3, 16, bias=False), 16)], alpha=0.1)
    next(n for n in b.nodes if n.op_type == "BatchNormalization").attribute.append(
        helper.make_attribute("spatial", 1))
    x = b.node("LeakyRelu", [b.conv(x, 16, 24)], alpha=0.1)
    return _head(b, b.node("LeakyRelu", [b.conv(x, 24, 24)], alpha=0.1), 24)


def upsample_net() -> onnx.ModelProto:
    """YOLOv3-style (opset 9): an Upsample by scales, joined to an earlier map by Concat."""
    b = Builder(in_shape=("N", 3, 16, 16), opset=9)
    early = b.node("Relu", [b.conv("input", 3, 16)])
    x = b.node("Relu", [b.conv(b.node("MaxPool", [early], kernel_shape=[2, 2], strides=[2, 2]), 16, 24)])
    x = b.node("Upsample", [b.node("Relu", [b.conv(x, 24, 16, k=1)]), b.const(np.array([1, 1, 2, 2], np.float32))],
               mode="nearest")
    return _head(b, b.node("Relu", [b.conv(b.node("Concat", [x, early], axis=1), 32, 24)]), 24)


def deeplab_upsample_net() -> onnx.ModelProto:
    """DeepLabV3 through tf2onnx at opset 9: the logits upsampled by a bilinear ``Upsample`` (a
    scale of 2), and a map upsampled nearest by 1.5, whose output positions change with the
    coordinate rule."""
    b = Builder(in_shape=("N", 3, 16, 16), opset=9)
    x = b.node("Relu", [b.conv(b.node("Relu", [b.conv("input", 3, 16, stride=2)]), 16, 16)])
    x = b.node("Upsample", [x, b.const(np.array([1, 1, 1.5, 1.5], np.float32))], mode="nearest")
    logits = b.conv(b.node("Relu", [b.conv(x, 16, 16)]), 16, 5, k=1, pad=0)
    return b.build(b.node("Upsample", [logits, b.const(np.array([1, 1, 2, 2], np.float32))], mode="linear"))


def resize_net(opset: int) -> onnx.ModelProto:
    """A U-Net-style skip (opset 10: ``Resize`` by scales, no roi; opset 7: ``Upsample`` with its
    scales as an attribute) joined by Concat."""
    b = Builder(in_shape=("N", 3, 16, 16), opset=opset)
    early = b.node("Relu", [b.conv("input", 3, 16)])
    x = b.node("Relu", [b.conv(b.node("MaxPool", [early], kernel_shape=[2, 2], strides=[2, 2]), 16, 16)])
    if opset >= 10:
        x = b.node("Resize", [x, b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    else:
        x = b.node("Upsample", [x], mode="nearest", scales=[1.0, 1.0, 2.0, 2.0])
    return _head(b, b.node("Relu", [b.conv(b.node("Concat", [x, early], axis=1), 32, 24)]), 24)


def weights_as_inputs_net() -> onnx.ModelProto:
    """ResNet from the zoo (opset 7, IR version 3: every initializer also a graph input): a
    residual Sum of three and an inference-mode Dropout."""
    b = Builder(in_shape=("N", 3, 16, 16), opset=7)
    x = b.node("Relu", [b.conv("input", 3, 16)])
    branch = b.conv(b.node("Relu", [b.conv(x, 16, 16)]), 16, 16)
    x = b.node("Dropout", [b.node("Relu", [b.node("Sum", [x, branch, b.conv(x, 16, 16, k=1)])])], ratio=0.5)
    model = _head(b, b.node("Relu", [b.conv(x, 16, 24)]), 24)
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    return model


OLD = {"lrn": lrn_net, "image_scaler": image_scaler_net, "upsample": upsample_net, "upsample_linear": deeplab_upsample_net,
       "resize_opset10": lambda: resize_net(10), "upsample_opset7": lambda: resize_net(7),
       "weights_as_inputs": weights_as_inputs_net}


@pytest.mark.parametrize("name", list(OLD))
def test_old_models_are_converted_and_pruned(name, caplog):
    model = OLD[name]()
    given = model.SerializeToString()
    x = calib_for(model, 64)
    result = onnxprune.prune(model, x, speedup=1.3, measure_latency=False)
    # weights that are also graph inputs are said to be made constants: ORT runs the model faster
    # for that alone, which the latency reported leaves out
    as_inputs = {i.name for i in model.graph.input} & {t.name for t in model.graph.initializer}
    assert ("weights as graph inputs" in caplog.text) == bool(as_inputs)
    assert model.SerializeToString() == given  # the caller's model is left as it was
    pruned = result.model
    assert default_opset(pruned) == MIN_OPSET and pruned.ir_version >= 4
    assert [i.name for i in pruned.graph.input] == ["input"]  # weights are constants, not inputs
    assert "ImageScaler" not in {n.op_type for n in pruned.graph.node}
    assert result.report.totals.macs_speedup > 1.25
    check_pruned(pruned, model, calib_for(model, 16, seed=5), 0.5)  # against the old model, run as it is


def test_inspect_names_why_lrn_is_a_barrier(tmp_path, capsys):
    path = tmp_path / "lrn.onnx"
    onnx.save(lrn_net(), path)
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "LRN 'lrn" in out and "normalises over the channels" in out and "no handler for LRN" not in out


def test_conversion_keeps_the_outputs():
    """The converted model (before any pruning) computes what the old one does."""
    from conftest import run

    for build in OLD.values():
        model = build()
        x = calib_for(model, 4)
        for old, new in zip(run(model, x), run(upgraded(model), x)):
            np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-6)


def test_cli_says_the_model_was_converted(tmp_path, capsys):
    path, out = tmp_path / "tiny_yolo.onnx", tmp_path / "pruned.onnx"
    model = image_scaler_net()
    onnx.save(model, path)
    np.save(tmp_path / "calib.npy", calib_for(model, 64))
    code = cli.main([str(path), "--speedup", "1.3", "--calib", str(tmp_path / "calib.npy"), "-o", str(out),
                     "--no-latency"])
    assert code == 0
    assert "opset 8: converted to opset 11" in capsys.readouterr().err
    assert default_opset(onnx.load(out)) == MIN_OPSET and default_opset(load_model(path)) == MIN_OPSET
    assert onnx.load(path).SerializeToString() == model.SerializeToString()  # the input file untouched


def test_a_model_the_converter_cannot_take_is_refused_in_one_line(tmp_path):
    path = tmp_path / "old.onnx"
    onnx.save(old_unconvertible(), path)
    with pytest.raises(ModelError, match=r"opset 8; converting it to opset 11 \(onnx.version_converter\) failed"):
        load_model(path)
