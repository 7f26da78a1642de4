"""Tiny ONNX graphs built in code for the tests (random weights, seeded)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    """A minimal graph builder: adds nodes and random initializers, returns a ModelProto."""

    def __init__(self, in_shape=("N", 3, 8, 8), seed: int = 0, opset: int = 13, name: str = "input",
                 random: bool = True):
        self.rng = np.random.default_rng(seed)
        self.random = random  # False: zero weights (big graphs whose costs alone are tested)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.input = helper.make_tensor_value_info(name, TensorProto.FLOAT, list(in_shape))
        self.opset = opset
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, value: np.ndarray, prefix: str = "c") -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        name = self._name(op.lower())
        outs = [f"{name}_out{i}" if i else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             bias: bool = True, pad: int | None = None) -> str:
        w = self._weights((2.0 / (cin // group * k * k)) ** 0.5, (cout, cin // group, k, k))
        ins = [x, self.const(w, "w")]
        if bias:
            ins.append(self.const(self._weights(0.1, (cout,)), "b"))
        p = k // 2 if pad is None else pad
        return self.node("Conv", ins, kernel_shape=[k, k], pads=[p] * 4, strides=[stride] * 2, group=group)

    def _weights(self, std: float, shape: tuple[int, ...]) -> np.ndarray:
        if not self.random:
            return np.zeros(shape, np.float32)
        return self.rng.normal(0, std, shape).astype(np.float32)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.normal(0, 0.1, c), r.normal(0, 0.1, c), r.uniform(0.5, 1.5, c)]
        return self.node("BatchNormalization", [x] + [self.const(p.astype(np.float32), "bn") for p in params])

    def gemm(self, x: str, k: int, n: int) -> str:
        w = self._weights((1.0 / k) ** 0.5, (n, k))
        b = self._weights(0.1, (n,))
        return self.node("Gemm", [x, self.const(w, "fc"), self.const(b, "fcb")], transB=1)

    def build(self, *outputs: str, out_shape: list | None = None) -> onnx.ModelProto:
        """The model; ``out_shape`` declares the outputs' shape where inference cannot find it."""
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, out_shape) for o in outputs]
        graph = helper.make_graph(self.nodes, "test", [self.input], outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model = onnx.shape_inference.infer_shapes(model)
        known = [v for v in model.graph.value_info if v.type.tensor_type.HasField("shape")]
        del model.graph.value_info[:]
        model.graph.value_info.extend(known)  # computed Split sizes leave the rank unknown
        onnx.checker.check_model(model, full_check=True)
        return model


def tiny_vgg(seed: int = 0) -> onnx.ModelProto:
    """conv-relu-conv-BN-relu-pool-conv-relu-flatten-gemm, on 3×8×8 inputs."""
    b = Builder(seed=seed)
    x = b.node("Relu", [b.conv("input", 3, 8)])
    x = b.node("Relu", [b.bn(b.conv(x, 8, 16, bias=False), 16)])
    x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Relu", [b.conv(x, 16, 16)])
    x = b.node("Flatten", [x], axis=1)
    return b.build(b.gemm(x, 16 * 16, 10))


def tiny_resnet(seed: int = 0) -> onnx.ModelProto:
    """Stem conv, two basic blocks (the second with stride 2 and a 1×1 projection), GAP, Gemm."""
    b = Builder(seed=seed)
    x = b.node("Relu", [b.conv("input", 3, 8)])
    for cin, cout, stride in ((8, 8, 1), (8, 16, 2)):
        y = b.node("Relu", [b.conv(x, cin, 12, stride=stride)])
        y = b.conv(y, 12, cout)
        skip = x if stride == 1 and cin == cout else b.conv(x, cin, cout, k=1, stride=stride, pad=0)
        x = b.node("Relu", [b.node("Add", [y, skip])])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.build(b.gemm(x, 16, 10))


def tiny_mobile(seed: int = 0) -> onnx.ModelProto:
    """Two inverted residual blocks on 8×8 maps (expand 1×1, depthwise 3×3, project 1×1, Add):
    the first with ReLU6 as Clip, the second with hard swish written as ``x · HardSigmoid(x)``
    and a squeeze-excite gate before its project conv."""
    b = Builder(in_shape=("N", 3, 8, 8), seed=seed)
    lo, hi = b.const(np.array(0.0, np.float32)), b.const(np.array(6.0, np.float32))

    def relu6(x):
        return b.node("Clip", [x, lo, hi])

    def hswish(x):
        return b.node("Mul", [x, b.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])

    x = relu6(b.conv("input", 3, 8))
    y = relu6(b.conv(relu6(b.conv(x, 8, 24, k=1)), 24, 24, group=24))
    x = b.node("Add", [b.conv(y, 24, 8, k=1), x])
    y = hswish(b.conv(hswish(b.conv(x, 8, 24, k=1)), 24, 24, group=24))
    se = b.node("Relu", [b.conv(b.node("GlobalAveragePool", [y]), 24, 8, k=1)])
    gate = b.node("HardSigmoid", [b.conv(se, 8, 24, k=1)], alpha=1 / 6, beta=0.5)
    x = b.node("Add", [b.conv(b.node("Mul", [y, gate]), 24, 8, k=1), x])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.build(b.gemm(x, 8, 4))


def tiny_csp(seed: int = 0) -> onnx.ModelProto:
    """Two CSP / YOLO bottlenecks on 8×8 maps, each conv followed by SiLU written as
    ``x · Sigmoid(x)`` and the second one's activation added to the block input
    (``x + silu(conv(silu(conv(x))))``, as YOLOv5/v8 and YOLOX export them)."""
    b = Builder(in_shape=("N", 3, 8, 8), seed=seed)

    def silu(x):
        return b.node("Mul", [x, b.node("Sigmoid", [x])])

    x = silu(b.conv("input", 3, 8))
    for _ in range(2):
        x = b.node("Add", [silu(b.conv(silu(b.conv(x, 8, 16, k=1)), 16, 8)), x])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.build(b.gemm(x, 8, 4))


def calib_for(model: onnx.ModelProto, n: int = 64, seed: int = 1) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    return np.random.default_rng(seed).normal(0, 1, (n, *dims)).astype(np.float32)


def resnet50(size: int = 224, classes: int = 1000, seed: int = 0,
             blocks: tuple[int, ...] = (3, 4, 6, 3)) -> onnx.ModelProto:
    """A ResNet-50-shaped graph (bottlenecks [3, 4, 6, 3], BN kept separate), random weights;
    other ``blocks`` per stage give other depths (ResNet-101: [3, 4, 23, 3])."""
    b = Builder(in_shape=("N", 3, size, size), seed=seed)

    def conv_bn(x, cin, cout, k, stride=1, gamma=1.0):
        y = b.bn(b.conv(x, cin, cout, k=k, stride=stride, bias=False), cout)
        bn = b.nodes[-1]
        scale = next(t for t in b.inits if t.name == bn.input[1])
        scale.CopyFrom(numpy_helper.from_array(np.full(cout, gamma, np.float32), scale.name))
        return y

    x = b.node("Relu", [conv_bn("input", 3, 64, 7, 2)])
    x = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks)):
        for i in range(count):
            stride = 2 if i == 0 and stage > 0 else 1
            y = b.node("Relu", [conv_bn(x, cin, width, 1)])
            y = b.node("Relu", [conv_bn(y, width, width, 3, stride)])
            y = conv_bn(y, width, width * 4, 1, gamma=0.2)
            skip = conv_bn(x, cin, width * 4, 1, stride) if i == 0 else x
            x = b.node("Relu", [b.node("Add", [y, skip])])
            cin = width * 4
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.build(b.gemm(x, cin, classes))


def resnext_block(b: Builder, x: str, c: int, mid: int, groups: int, expand: int = 1) -> str:
    """1×1 conv → grouped 3×3 conv → 1×1 conv (ReLUs between), added to the input (ResNeXt);
    ``expand``: the grouped conv writes that many times the channels it reads."""
    y = b.node("Relu", [b.conv(x, c, mid, k=1, pad=0)])
    y = b.node("Relu", [b.conv(y, mid, mid * expand, group=groups)])
    return b.node("Relu", [b.node("Add", [b.conv(y, mid * expand, c, k=1, pad=0), x])])


def chunk2(b: Builder, x: str) -> tuple[str, str]:
    """``torch.chunk(x, 2, 1)`` as the legacy exporter writes it: Slices whose bounds come from
    ``Shape → Gather(1) → Add(1) → Div(2) → Mul``."""
    c = b.node("Gather", [b.node("Shape", [x]), b.const(np.array([1], np.int64))], axis=0)
    half = b.node("Div", [b.node("Add", [c, b.const(np.array([1], np.int64))]), b.const(np.array([2], np.int64))])
    end0 = b.node("Mul", [half, b.const(np.array([1], np.int64))])
    end1 = b.node("Mul", [half, b.const(np.array([2], np.int64))])
    axes = b.const(np.array([1], np.int64))
    return (b.node("Slice", [x, b.const(np.array([0], np.int64)), end0, axes]),
            b.node("Slice", [x, end0, end1, axes]))


BLOCKS = ("conv", "conv_bn", "residual", "concat", "split", "depthwise", "pool", "se", "hardswish", "grouped",
          "chunk")


def random_cnn(blocks: list[str], widths: list[int], head: str = "gap", seed: int = 0) -> onnx.ModelProto:
    """A CNN stacked from ``blocks`` (names from BLOCKS) with the given widths, on 3×16×16 input."""
    b = Builder(in_shape=("N", 3, 16, 16), seed=seed)
    x, c, size = b.node("Relu", [b.conv("input", 3, 8)]), 8, 16
    for kind, w in zip(blocks, widths):
        if kind == "conv":
            x, c = b.node("Relu", [b.conv(x, c, w)]), w
        elif kind == "conv_bn":
            x, c = b.node("Relu", [b.bn(b.conv(x, c, w, bias=False), w)]), w
        elif kind == "residual":
            y = b.node("Relu", [b.conv(x, c, w)])
            x = b.node("Relu", [b.node("Add", [b.conv(y, w, c), x])])
        elif kind == "concat":
            y = b.node("Relu", [b.conv(x, c, w)])
            x, c = b.node("Concat", [x, y], axis=1), c + w
        elif kind == "split" and c >= 2:
            first = c // 2
            s0, s1 = b.node("Split", [x, b.const(np.array([first, c - first], np.int64))], n_out=2, axis=1)
            y = b.node("Relu", [b.conv(s1, c - first, w)])
            x, c = b.node("Concat", [s0, y], axis=1), first + w
        elif kind == "depthwise":
            x = b.node("Relu", [b.conv(b.node("Relu", [b.conv(x, c, w, k=1, pad=0)]), w, w, group=w)])
            c = w
        elif kind == "pool" and size >= 4:
            x, size = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), size // 2
        elif kind == "se":
            s = b.node("GlobalAveragePool", [x])
            s = b.node("Sigmoid", [b.conv(b.node("Relu", [b.conv(s, c, max(c // 4, 1), k=1, pad=0)]),
                                          max(c // 4, 1), c, k=1, pad=0)])
            x = b.node("Mul", [x, s])
        elif kind == "grouped":
            x = resnext_block(b, x, c, 2 * w, 2)
        elif kind == "chunk" and c >= 2:
            s0, s1 = chunk2(b, x)
            y = b.node("Relu", [b.conv(s1, c // 2, w)])
            x, c = b.node("Concat", [s0, s1, y], axis=1), c + w
        elif kind == "hardswish":
            x = b.node("HardSwish", [b.conv(x, c, w)]) if b.opset >= 14 else b.node("Relu", [b.conv(x, c, w)])
            c = w
    if head == "gap":
        x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
        return b.build(b.gemm(x, c, 5))
    if head == "flatten":
        return b.build(b.gemm(b.node("Flatten", [x], axis=1), c * size * size, 5))
    return b.build(b.conv(x, c, 2, k=1, pad=0))  # a dense-prediction head


def vgg16(size: int = 224, classes: int = 1000, random: bool = False, seed: int = 0) -> onnx.ModelProto:
    """VGG-16 (configuration D, no BN): zero weights for cost-model checks, or seeded random
    weights with ``random`` (tools/bench_scale.py)."""
    b = Builder(in_shape=("N", 3, size, size), random=random, seed=seed)
    x, cin = "input", 3
    for width, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        for _ in range(convs):
            x, cin = b.node("Relu", [b.conv(x, cin, width)]), width
        x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        size //= 2
    x = b.node("Flatten", [x], axis=1)
    x = b.node("Relu", [b.gemm(x, cin * size * size, 4096)])
    x = b.node("Relu", [b.gemm(x, 4096, 4096)])
    return b.build(b.gemm(x, 4096, classes))


def mobilenet_v2(size: int = 224, classes: int = 1000) -> onnx.ModelProto:
    """MobileNetV2 (width 1.0): inverted residuals with depthwise convs and Clip(0, 6), BN folded."""
    b = Builder(in_shape=("N", 3, size, size), random=False)
    lo, hi = b.const(np.array(0.0, np.float32)), b.const(np.array(6.0, np.float32))

    def relu6(x):
        return b.node("Clip", [x, lo, hi])

    x, cin = relu6(b.conv("input", 3, 32, stride=2)), 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            stride, hidden = (s if i == 0 else 1), cin * t
            y = relu6(b.conv(x, cin, hidden, k=1)) if t != 1 else x
            y = relu6(b.conv(y, hidden, hidden, stride=stride, group=hidden))
            y = b.conv(y, hidden, c, k=1)
            x, cin = (b.node("Add", [y, x]) if stride == 1 and cin == c else y), c
    x = relu6(b.conv(x, cin, 1280, k=1))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.build(b.gemm(x, 1280, classes))
