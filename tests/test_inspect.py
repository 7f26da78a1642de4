"""``inspect``: the share of MACs pruning can reach, the barriers locking the rest, input shapes
without --calib (--shape, default sizes); parameters held in Constant nodes."""

import json

import numpy as np
import onnx
import pytest
from conftest import MODELS, check_pruned, run
from graphs import Builder, calib_for, tiny_vgg
from onnx import helper

import onnxprune
from onnxprune.budget import count_params
from onnxprune.cli import main
from onnxprune.fold import constants_to_initializers
from onnxprune.graphview import GraphView
from onnxprune.summary import calibration_or_zeros, summarize


def summary_of(model: onnx.ModelProto):
    return summarize(model, calibration_or_zeros(model, None, None))


def conv_macs(cin: int, cout: int, k: int, hw: int) -> int:
    return cin * cout * k * k * hw


def chain() -> onnx.ModelProto:
    b = Builder(in_shape=(1, 3, 8, 8))
    x = b.node("Relu", [b.conv("input", 3, 8)])
    x = b.node("Relu", [b.conv(x, 8, 8)])
    return b.build(b.conv(x, 8, 4))


def test_plain_chain_is_fully_prunable():
    """Every layer has a prunable side (the last one its inputs): 100 %, no barrier."""
    s = summary_of(chain())
    assert s.macs == conv_macs(3, 8, 3, 64) + conv_macs(8, 8, 3, 64) + conv_macs(8, 4, 3, 64)
    assert s.prunable_macs == s.macs and s.prunable_fraction == 1.0
    assert s.residual_macs == 0 and s.barriers == []
    assert "prunable MACs: 100.0 % of Conv/Gemm/MatMul MACs" in s.text()


def test_single_layer_keeps_everything_and_names_no_barrier():
    """Its channels are the model's input and output: nothing prunable, nothing to blame."""
    b = Builder(in_shape=(1, 3, 8, 8))
    s = summary_of(b.build(b.conv("input", 3, 8)))
    assert s.macs > 0 and s.prunable_macs == 0 and s.barriers == []


def test_pad_on_channels_is_a_barrier_locking_the_layer_before_it():
    b = Builder(in_shape=(1, 3, 8, 8))
    x = b.conv("input", 3, 8)
    # 2 more channels of ones (zeros would be followed: the channels they pad stay prunable)
    x = b.node("Pad", [x, b.const(np.array([0, 0, 0, 0, 0, 2, 0, 0], np.int64)), b.const(np.float32(1.0))])
    pad = b.nodes[-1].name
    x = b.node("Relu", [b.conv(x, 10, 8)])
    s = summary_of(b.build(b.conv(x, 8, 4)))
    locked = conv_macs(3, 8, 3, 64)  # the first conv: model input on one side, the Pad on the other
    assert s.prunable_macs == s.macs - locked
    top = s.barriers[0]
    assert (top.op_type, top.node, top.locked_macs) == ("Pad", pad, locked)
    assert top.why == "channels are not followed through it with these attributes or inputs"
    assert f"Pad '{pad}': " in s.text() and "barriers, by the MACs" in s.text()


def test_custom_domain_op_locks_the_layer_after_it(tmp_path, capsys):
    """com.microsoft's Gelu (ONNX Runtime runs it) has no handler: the last conv reads its
    output and writes the model's, so it is kept, and the Gelu is named for it."""
    b = Builder(in_shape=(1, 3, 8, 8))
    x = b.conv(b.node("Relu", [b.conv("input", 3, 8)]), 8, 8)
    b.nodes.append(helper.make_node("Gelu", [x], ["gelu_out"], domain="com.microsoft", name="gelu"))
    y = b.conv("gelu_out", 8, 4)
    out = helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, ["n", 4, "h", "w"])
    graph = helper.make_graph(b.nodes, "g", [b.input], [out], b.inits)
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    locked = conv_macs(8, 4, 3, 64)
    assert info["prunable_macs"] == info["macs"] - locked
    assert info["prunable_fraction"] == pytest.approx(1 - locked / info["macs"])
    assert info["barriers"] == [{"op_type": "Gelu", "node": "gelu", "why": "no handler for custom domain "
                                 "'com.microsoft'", "locked_macs": locked}]


def dynamic_model(head_k: int | None = None) -> onnx.ModelProto:
    """Conv, GAP, Gemm on inputs of any size; with ``head_k``, Flatten into a Gemm of that many
    inputs instead, so that only one input size runs."""
    b = Builder(in_shape=("N", 3, "H", "W"))
    x = b.node("Relu", [b.conv("input", 3, 4)])
    if head_k is None:
        x = b.node("GlobalAveragePool", [x])
        k = 4
    else:
        k = head_k
    return b.build(b.gemm(b.node("Flatten", [x], axis=1), k, 10))


def inspect_json(tmp_path, capsys, model, *args: str) -> dict:
    onnx.save(model, tmp_path / "d.onnx")
    assert main(["inspect", str(tmp_path / "d.onnx"), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_dynamic_dims_without_calib_use_224_or_the_given_shape(tmp_path, capsys):
    model = dynamic_model()
    info = inspect_json(tmp_path, capsys, model)
    assert info["inputs"] == {"input": [1, 3, 224, 224]} and info["prunable_fraction"] == 1.0
    assert info["macs"] == conv_macs(3, 4, 3, 224 * 224) + 40
    info = inspect_json(tmp_path, capsys, model, "--shape", "1x3x16x12")
    assert info["inputs"] == {"input": [1, 3, 16, 12]} and info["macs"] == conv_macs(3, 4, 3, 16 * 12) + 40
    info = inspect_json(tmp_path, capsys, model, "--shape", "input:2x3x8x8")
    assert info["inputs"] == {"input": [1, 3, 8, 8]}  # the figures are per sample
    gmacs = (conv_macs(3, 4, 3, 16 * 16) + 40) / 1e9
    for limit, code in ((gmacs * 1.01, 0), (gmacs * 0.99, 1)):  # gate measures at --shape too
        assert main(["gate", str(tmp_path / "d.onnx"), "--max-macs", str(limit), "--shape", "1x3x16x16", "-q"]) == code


def test_dynamic_dims_take_the_smallest_size_that_runs(tmp_path, capsys):
    info = inspect_json(tmp_path, capsys, dynamic_model(head_k=4 * 64 * 64))  # runs at 64×64 only
    assert info["inputs"] == {"input": [1, 3, 64, 64]}


@pytest.mark.parametrize("shape,message", [
    (["1x3x8"], "rank 4"), (["1x4x8x8"], "fixes axis 1 to 3"), (["x:1x3x8x8"], "no input 'x'"),
    (["1xax8x8"], "positive integers"), (["1x3x0x8"], "positive integers"), (["1x3x8x8", "input:1x3x8x8"], "twice")])
def test_bad_shape_is_a_one_line_error(tmp_path, capfd, shape, message):
    onnx.save(dynamic_model(), tmp_path / "d.onnx")
    args = [a for s in shape for a in ("--shape", s)]
    assert main(["inspect", str(tmp_path / "d.onnx"), *args]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxprune: error: --shape") and message in err[0]


def test_shape_with_calib_and_a_model_running_at_no_size_are_one_line_errors(tmp_path, capfd):
    onnx.save(dynamic_model(head_k=4 * 7 * 7), tmp_path / "d.onnx")  # 7×7 is no default size
    assert main(["inspect", str(tmp_path / "d.onnx")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs at none of the sizes" in err[0] and "--shape" in err[0]
    assert main(["inspect", str(tmp_path / "d.onnx"), "--shape", "1x3x7x7"]) == 0
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 7, 7), np.float32))
    capfd.readouterr()
    assert main(["inspect", str(tmp_path / "d.onnx"), "--shape", "1x3x7x7", "--calib", str(tmp_path / "x.npy")]) == 2
    assert "--shape is for runs without --calib" in capfd.readouterr().err


def test_shipped_models_report_their_prunable_macs(capsys):
    vgg = summary_of(onnx.load(MODELS / "vgg_fmnist.onnx"))
    assert vgg.prunable_fraction == 1.0 and vgg.barriers == []
    resnet = summary_of(onnx.load(MODELS / "resnet_fmnist.onnx"))
    # the stem, the 1×1 shortcuts and the classifier touch only block outputs (residual joins)
    assert 0.95 < resnet.prunable_fraction < 1.0
    assert resnet.prunable_macs + resnet.residual_macs == resnet.macs and resnet.barriers == []
    assert main(["inspect", str(MODELS / "resnet_fmnist.onnx")]) == 0
    out = capsys.readouterr().out
    assert f"prunable MACs: {100 * resnet.prunable_fraction:.1f} % of Conv/Gemm/MatMul MACs" in out
    assert "(--prune-residual)" in out


# ---------------------------------------------------------------- weights in Constant nodes

def as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every initializer held in a ``Constant`` node, as PaddlePaddle exports."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}")
              for t in out.graph.initializer]
    nodes = consts + list(out.graph.node)
    del out.graph.node[:], out.graph.initializer[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out, full_check=True)
    return out


def test_params_in_constant_nodes_are_counted_and_pruned(tmp_path, capsys):
    original = tiny_vgg()
    paddle = as_constants(original)
    params = count_params(GraphView(original))
    assert params > 0 and count_params(GraphView(paddle)) == params
    folded = onnx.ModelProto()
    folded.CopyFrom(paddle)
    constants_to_initializers(folded)
    assert count_params(GraphView(folded)) == params  # the same before and after the load-time fold
    assert summary_of(paddle).params == params

    x = calib_for(paddle, 60)
    kept = onnxprune.prune(paddle, x, speedup=1.0, measure_latency=False)
    check_pruned(kept.model, paddle, x, max_rel_err=1e-5)
    assert np.abs(run(kept.model, x)[0] - run(paddle, x)[0]).max() <= 1e-4
    assert kept.report.totals.params[0] == params

    result = onnxprune.prune(paddle, x, speedup=2.0, measure_latency=False)
    check_pruned(result.model, paddle, x, max_rel_err=0.6)
    before, after = result.report.totals.params
    assert before == params and 0 < after < before
    assert f"({after / before:.1%})" in result.report.table()

    onnx.save(paddle, tmp_path / "p.onnx")
    assert main(["gate", str(tmp_path / "p.onnx"), "--max-params", str(params / 1e6 * 0.99), "-q"]) == 1
    assert main(["gate", str(tmp_path / "p.onnx"), "--max-params", str(params / 1e6 * 1.01), "-q"]) == 0
    capsys.readouterr()
