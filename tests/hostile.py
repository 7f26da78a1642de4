"""Bad and hostile inputs, built in code: models onnxprune must refuse (or treat as barriers)."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import Builder, tiny_vgg
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits=(), opset: int = 13, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "hostile", inputs, outputs, list(inits))
    imports = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    return helper.make_model(graph, opset_imports=imports)


def _x(shape=("N", 3, 8, 8), name: str = "input", dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _y(name: str = "y", dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """A 4-D output of unknown size (the checker wants a shape on every output)."""
    return helper.make_tensor_value_info(name, dtype, [f"{name}_{i}" for i in range(4)])


def _w(name: str, shape, seed: int = 0) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).normal(0, 0.3, shape).astype(np.float32), name)


def old_unconvertible() -> onnx.ModelProto:
    """Opset 8 with an experimental op (ScaledTanh) that onnx.version_converter has no schema for."""
    b = Builder(opset=8)
    y = b.node("ScaledTanh", [b.conv("input", 3, 4)], alpha=1.0, beta=1.0)
    return _model(b.nodes, [b.input], [_y(y)], inits=b.inits, opset=8)


def no_default_opset() -> onnx.ModelProto:
    node = helper.make_node("Foo", ["input"], ["y"], domain="com.example")
    model = _model([node], [_x()], [_y()], extra_opsets=[("com.example", 1)])
    del model.opset_import[0]
    return model


def qdq() -> onnx.ModelProto:
    """QuantizeLinear → DequantizeLinear → Conv: a QDQ-quantized graph."""
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(128), "z"),
             _w("w", (4, 3, 3, 3))]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("Conv", ["dq", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    return _model(nodes, [_x()], [_y()], inits)


def qlinear_conv() -> onnx.ModelProto:
    """A QLinearConv between QuantizeLinear and DequantizeLinear."""
    scalars = {"xs": np.float32(0.1), "xz": np.uint8(128), "ws": np.float32(0.05), "wz": np.uint8(128),
               "ys": np.float32(0.2), "yz": np.uint8(128)}
    inits = [numpy_helper.from_array(v, k) for k, v in scalars.items()]
    inits.append(numpy_helper.from_array(np.full((4, 3, 3, 3), 130, np.uint8), "w"))
    nodes = [helper.make_node("QuantizeLinear", ["input", "xs", "xz"], ["q"]),
             helper.make_node("QLinearConv", ["q", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["qc"]),
             helper.make_node("DequantizeLinear", ["qc", "ys", "yz"], ["y"])]
    return _model(nodes, [_x()], [_y()], inits)


def conv_integer() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.uint8), "w")]
    nodes = [helper.make_node("ConvInteger", ["input", "w"], ["y"])]
    return _model(nodes, [_x(dtype=TensorProto.UINT8)], [_y(dtype=TensorProto.INT32)], inits)


def dangling_input() -> onnx.ModelProto:
    """A node reading a tensor nothing produces: fails the checker."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"]), helper.make_node("Add", ["c", "ghost"], ["y"])]
    return _model(nodes, [_x()], [_y()], [_w("w", (4, 3, 3, 3))])


def huge_initializer() -> onnx.ModelProto:
    """A weight declaring 10^6 × 10^6 floats (4 TB) and holding no data."""
    model = tiny_vgg()
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    del t.dims[:]
    t.dims.extend([10**6, 10**6])
    return model


def short_initializer() -> onnx.ModelProto:
    """A weight whose declared dims need more bytes than it holds."""
    model = tiny_vgg()
    model.graph.initializer[0].dims[0] *= 1000
    return model


def long_initializer() -> onnx.ModelProto:
    """A weight holding more data than its declared dims (the checker lets this through)."""
    model = tiny_vgg()
    model.graph.initializer[2].dims[1] = 1
    return model


def typed_initializer() -> onnx.ModelProto:
    """A weight stored as float_data with one value too many."""
    model = tiny_vgg()
    t = model.graph.initializer[0]
    values = np.frombuffer(t.raw_data, np.float32)
    t.ClearField("raw_data")
    t.float_data.extend([*values.tolist(), 0.0])
    return model


def huge_input() -> onnx.ModelProto:
    """A graph input with a gigantic static dim."""
    model = tiny_vgg()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 10**9
    return model


def two_inputs() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["input", "other"], ["s"]), helper.make_node("Conv", ["s", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"])]
    inits = [_w("w", (4, 3, 3, 3)), _w("w2", (2, 4, 1, 1))]
    return _model(nodes, [_x(), _x(name="other")], [_y()], inits)


def unknown_custom_op() -> onnx.ModelProto:
    """A custom-domain op ONNX Runtime has no kernel for, between two convs."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"]),
             helper.make_node("Mystery", ["c"], ["m"], domain="com.example"),
             helper.make_node("Conv", ["m", "w2"], ["y"])]
    inits = [_w("w", (4, 3, 3, 3)), _w("w2", (2, 4, 1, 1))]
    return _model(nodes, [_x()], [_y()], inits, extra_opsets=[("com.example", 1)])


def bad_weight_rank() -> onnx.ModelProto:
    """A Conv whose weight has rank 3 for a 4-D input: passes the checker, fails at run time."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    return _model(nodes, [_x()], [_y()], [_w("w", (4, 3, 3)), _w("w2", (2, 4, 1, 1))])


def no_conv() -> onnx.ModelProto:
    """Only element-wise ops: nothing to prune."""
    nodes = [helper.make_node("Relu", ["input"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])]
    return _model(nodes, [_x()], [_y()])


def single_conv() -> onnx.ModelProto:
    """One Conv straight to the output: its channels are the model's output, nothing to prune."""
    return _model([helper.make_node("Conv", ["input", "w"], ["y"])], [_x()], [_y()], [_w("w", (4, 3, 3, 3))])


def overflowing_activations() -> onnx.ModelProto:
    """A valid model whose first two convs' weights are scaled by 1e25: its activations overflow
    float32 (or their squares do) on ordinary inputs."""
    model = tiny_vgg()
    inits = {i.name: i for i in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "Conv"][:2]:
        w = inits[node.input[1]]
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1e25), w.name))
    return model


def _finish(b: Builder, output: str, extra_opsets=()) -> onnx.ModelProto:
    """The builder's graph with a 4-D ``output`` (where shape inference cannot tell its shape)."""
    return _model(b.nodes, [b.input], [_y(output)], b.inits, b.opset, extra_opsets)


def _trunk(b: Builder) -> str:
    """conv-relu-conv-relu: the first conv's channels are prunable whatever follows."""
    return b.node("Relu", [b.conv(b.node("Relu", [b.conv("input", 3, 8)]), 8, 8)])


def with_if() -> onnx.ModelProto:
    """A trunk, then an If whose branches read the trunk's output (one through a Conv with an
    outer-scope weight): that tensor is a barrier, the trunk's first conv is still pruned."""
    b = Builder()
    x = _trunk(b)
    cond = b.node("Greater", [b.node("ReduceMean", [x], keepdims=0), b.const(np.float32(0.0))])
    w = b.const(b.rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "wif")
    then = helper.make_graph([helper.make_node("Conv", [x, w], ["t_out"])], "then", [], [_y("t_out")])
    other = helper.make_graph([helper.make_node("Conv", [x, w], ["e_c"]), helper.make_node("Neg", ["e_c"], ["e_out"])],
                              "else", [], [_y("e_out")])
    return b.build(b.node("If", [cond], then_branch=then, else_branch=other))


def with_loop() -> onnx.ModelProto:
    """A trunk, then a Loop adding the trunk's output to a carried value twice."""
    b = Builder()
    x = _trunk(b)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", x], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _y("v_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _y("v_out")])
    trips, keep_going = b.const(np.int64(2)), b.const(np.bool_(True))
    return _finish(b, b.node("Loop", [trips, keep_going, x], body=body))


def with_microsoft_op() -> onnx.ModelProto:
    """A trunk, then com.microsoft's Gelu (ONNX Runtime runs it; onnxprune treats it as a barrier)."""
    b = Builder()
    x = _trunk(b)
    b.nodes.append(helper.make_node("Gelu", [x], ["gelu_out"], domain="com.microsoft", name="gelu"))
    return _finish(b, "gelu_out", [("com.microsoft", 1)])


def training_bn(outputs: int = 3) -> onnx.ModelProto:
    """A BatchNormalization in training mode (batch statistics, running stats as extra outputs)
    after a conv: never folded, a barrier. With one output ONNX Runtime refuses to run it."""
    b = Builder(opset=15)
    x = b.node("Relu", [b.conv("input", 3, 8)])
    y = b.bn(b.conv(x, 8, 8, bias=False), 8)
    bn = b.nodes[-1]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    bn.output.extend([f"{bn.name}_stat{i}" for i in range(1, outputs)])
    return _finish(b, b.conv(b.node("Relu", [y]), 8, 4))


BARRIER_MODELS = {"if": with_if, "loop": with_loop, "microsoft_op": with_microsoft_op, "training_bn": training_bn}
