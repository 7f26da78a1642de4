"""Export a zoo of CNN architectures (random weights) to ONNX for testing the pruner's graph analysis.

    python tools/build_zoo.py --out /tmp/zoo
    python tools/build_zoo.py --out /tmp/zoo --only resnet18 yolov8n --opsets 17

Writes ``OUT/<name>_op<opset>.onnx`` for every selected model and opset, then for each file
runs ``onnx.checker.check_model(full_check=True)``, one onnxruntime inference and a comparison
with the PyTorch output, and prints a table: name, opset, parameters, file size, node count,
export time, max |onnx - torch| and the set of ONNX op types in the graph.

The architectures are written here in plain PyTorch (no torchvision), one small ``nn.Module``
per block type, and listed in ``ZOO`` (name -> spec):

    resnet18, resnet50      torchvision layouts and widths (BasicBlock / Bottleneck, 1000 classes)
    vgg16_bn                true widths, 4096-wide classifier (~138 M parameters, ~530 MB file)
    mobilenet_v2            inverted residuals, depthwise convs, ReLU6 (-> Clip)
    mobilenet_v3_small      SE blocks (GAP -> Conv -> ReLU -> Conv -> HardSigmoid -> Mul), hard-swish
    efficientnet_b0         MBConv with SE (SiLU / Sigmoid gate), depthwise convs
    densenet_small          pre-activation dense blocks (BN-ReLU-Conv), chained channel Concats,
                            transitions (BN-ReLU-1x1 conv-AvgPool); growth 16, blocks (4, 6, 8)
    unet_small              encoder double-convs + MaxPool, ConvTranspose upsampling, Concat skips,
                            one output channel per class; base width 16
    yolov8n                 Conv(Conv2d+BN+SiLU), C2f (chunk -> bottlenecks -> Concat), SPPF,
                            nearest-Upsample + Concat neck, 3-scale head with separate box / class
                            branches, six raw outputs (box_p3, cls_p3, box_p4, cls_p4, box_p5, cls_p5);
                            C2f halves with chunk (-> Shape/Gather/Div/Slice in ONNX)
    yolov8n_split           the same net, C2f halves with split((c, c), 1) (-> one Split node)

Export patterns of real exporters (small nets, 224 px):

    effnet_tf_same          MBConv net (expand, 3x3 / 5x5 depthwise at stride 1 and 2, SE with SiLU /
                            Sigmoid gate, projection, residuals) whose kxk convs pad TF-'same' at run
                            time as efficientnet_pytorch / timm ``pad_same`` do: Shape -> Gather ->
                            Cast -> Div -> Ceil -> Sub -> Mul -> Add -> Add -> Sub -> Clip -> Div ->
                            Cast -> Cast -> Sub -> Unsqueeze -> Concat -> Cast -> Concat(ConstantOfShape)
                            -> Reshape -> Slice -> Transpose -> Reshape -> Cast -> Pad -> Conv;
                            dynamic H/W (checked at 225 x 191, odd sizes pad asymmetrically)
    view_classifier         five convs + max-pool to 64x7x7, ``x.view(x.size(0), -1)`` -> 2-layer MLP:
                            Shape -> Gather(0) -> Unsqueeze -> Concat(.., [-1]) -> Reshape -> Gemm
    view_const_classifier   the same with ``x.reshape(-1, C*H*W)``: Reshape to constant [-1, 3136]
    paddle_se               SE-ResNet basic blocks with paddle2onnx-style SE: GlobalAveragePool ->
                            Reshape to constant [-1, C] (or [0, C]) -> Gemm, MatMul + Add, or
                            Reshape [-1, C, 1, 1] -> 1x1 Conv -> ReLU -> .. -> HardSigmoid -> Mul;
                            head GlobalAveragePool -> Reshape [-1, C] -> Gemm
    tf2onnx_nhwc            built with onnx.helper (no TensorFlow): NHWC input [N, H, W, 3], each conv
                            Transpose(0,3,1,2) -> Conv -> Transpose(0,2,3,1), NHWC per-channel Add /
                            Mul constants of shape [C], Relu, Relu6 as Clip(x, min, max), residual
                            Adds, depthwise convs, SAME_UPPER stride-2 convs, ReduceMean(axes 1, 2)
                            -> MatMul -> Add; dynamic N / H / W
Real deployments beyond plain CNNs:

    convnext_small          ConvNeXt as torchvision / timm write it (depths (1, 1, 2, 1), widths (32, 64,
                            128, 256), 224 px): 4x4/4 stem conv + channels-last LayerNorm (Transpose ->
                            LayerNormalization -> Transpose; decomposed ReduceMean / Sub / Pow / Sqrt /
                            Div below opset 17), blocks 7x7 depthwise conv -> NHWC -> LayerNorm ->
                            Linear(C, 4C) (MatMul) -> GELU (Erf) -> Linear(4C, C) -> layer-scale Mul ->
                            NCHW -> residual Add, downsampling LayerNorm -> 2x2/2 conv, GAP -> LayerNorm
                            -> Gemm
    crnn_ocr                CRNN text recogniser: grey input [N, 1, 32, W] (W dynamic, 100 at export,
                            checked at 160 too), VGG-style conv / BN / ReLU backbone with 2x2 then (2, 1)
                            max-pools and a 2x2 valid conv to height 1 -> Squeeze -> Transpose to
                            [T, N, C] -> 2-layer bidirectional LSTM (hidden 64; two ONNX LSTM nodes with
                            Shape -> ConstantOfShape initial states) -> MatMul + Add per time step:
                            output [T, N, 37] (T = W/4 - 1, dynamic)
    dbnet_small             DBNet text detector (PaddleOCR / MMOCR layout): ResNet basic-block backbone
                            (widths 32..256, two blocks a stage, 1/4 .. 1/32), DB-FPN (1x1 laterals to
                            96, nearest x2 Resize + Add top-down, 3x3 smoothing to 24, Resize x8 / x4 /
                            x2 -> Concat), head Conv3x3-BN-ReLU -> ConvTranspose 2x2/2 ->
                            BatchNormalization (not folded) -> ReLU -> ConvTranspose 2x2/2 -> Sigmoid:
                            [N, 1, H, W] probability map; 640 px, dynamic H/W (checked at 480 x 640)
    vit_tiny                small vision transformer (64 px, 8x8 patch conv, 4 pre-norm blocks of width
                            96 with nn.MultiheadAttention and a GELU MLP): token rows as the exporters
                            write them ([T, N, C] MatMuls, a [T*N, C] Gemm; opset >= 14 for attention)

    (mobilenet_v3_small covers nn.Hardswish / nn.Hardsigmoid: HardSwish ops at opset >= 14,
     HardSigmoid + Mul at 11 / 13; HardSigmoid at every opset. Build it with --opsets 11 13 17 18.)

Export: legacy TorchScript exporter (``dynamo=False``), eval mode, constant folding on (so a
BatchNorm that directly follows a Conv is folded into it; pre-activation BNs, as in DenseNet,
stay as BatchNormalization nodes), input named ``input``, dynamic batch axis, and dynamic
height / width for the fully convolutional nets (unet_small, yolov8n, dbnet_small) and for those
whose trunk is (effnet_tf_same, tf2onnx_nhwc; their class outputs have a dynamic batch only);
crnn_ocr has a dynamic width only (``Spec.input_axes`` / ``output_axes``: output axes time, batch;
``Spec.channels`` = 1, ``Spec.hw`` = 32 x 100). paddle_se is patched after export
(``patch_paddle_zero``: some [-1, C] targets become [0, C]); tf2onnx_nhwc is written by
``write_tf2onnx_nhwc`` from its torch module, which is its reference.

Weights are random but deterministic (seed 0). BatchNorm and LayerNorm affine parameters (and
ConvNeXt's layer scales, uniform in [0.2, 1]) are randomised and the running statistics are set by
one training-mode forward pass on random data, so that the folded weights are non-trivial and
activations stay at a sane scale in deep nets.

Verification runs onnxruntime on a batch of 2 (the export traces batch 1), and for the fully
convolutional nets on a non-square input, so that the dynamic axes are exercised too
(effnet_tf_same, tf2onnx_nhwc, crnn_ocr and dbnet_small at two sizes). tf2onnx_nhwc has no
BatchNorm; its kernels are scaled so that each conv output has unit std on random data
(``TF2ONNXNet.calibrate``).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SEED = 0


# --------------------------------------------------------------------------------------------
# Shared blocks
# --------------------------------------------------------------------------------------------

def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` (the MobileNet / EfficientNet rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Module):
    """Conv2d -> BatchNorm2d -> optional activation; 'same' padding for odd kernels."""

    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1,
                 act: Callable[[], nn.Module] | None = nn.ReLU, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 -> 3x3, identity or 1x1-strided projection shortcut."""
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = ConvBNAct(cin, width, 3, stride)
        self.conv2 = ConvBNAct(width, cout, 3, 1, act=None)
        self.downsample = (ConvBNAct(cin, cout, 1, stride, act=None)
                           if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + self.downsample(x))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (strided) -> 1x1 (x4), projection shortcut when needed."""
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = ConvBNAct(cin, width, 1)
        self.conv2 = ConvBNAct(width, width, 3, stride)
        self.conv3 = ConvBNAct(width, cout, 1, act=None)
        self.downsample = (ConvBNAct(cin, cout, 1, stride, act=None)
                           if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + self.downsample(x))


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.stem = ConvBNAct(3, 64, 7, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.maxpool(self.stem(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18() -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2])


def resnet50() -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 6, 3])


# --------------------------------------------------------------------------------------------
# VGG
# --------------------------------------------------------------------------------------------

class VGG(nn.Module):
    """VGG with BatchNorm (convs keep their bias, as in torchvision); 'M' is a 2x2 max-pool."""

    def __init__(self, cfg: list, num_classes: int = 1000):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(ConvBNAct(cin, v, 3, bias=True))
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(cin * 7 * 7, 4096), nn.ReLU(), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(),
            nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg16_bn() -> nn.Module:
    return VGG([64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                512, 512, 512, "M", 512, 512, 512, "M"])


# --------------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------------

class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [ConvBNAct(cin, hidden, 1, act=nn.ReLU6)]
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   ConvBNAct(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetV2(nn.Module):
    CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]  # (expand t, channels c, repeats n, stride s)

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, cin = [ConvBNAct(3, 32, 3, 2, act=nn.ReLU6)], 32
        for t, c, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(ConvBNAct(cin, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------------------------
# MobileNetV3-small
# --------------------------------------------------------------------------------------------

class SqueezeExcite(nn.Module):
    """GAP -> 1x1 conv -> act -> 1x1 conv -> gate -> channel-wise Mul with the input."""

    def __init__(self, channels: int, squeeze: int, act: Callable[[], nn.Module] = nn.ReLU,
                 gate: Callable[[], nn.Module] = nn.Hardsigmoid):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class MobileNetV3Block(nn.Module):
    """Optional 1x1 expand -> kxk depthwise -> optional SE -> 1x1 linear projection (+ residual)."""

    def __init__(self, cin: int, k: int, hidden: int, cout: int, use_se: bool, act: str, stride: int):
        super().__init__()
        act_layer = nn.Hardswish if act == "HS" else nn.ReLU
        layers = [] if hidden == cin else [ConvBNAct(cin, hidden, 1, act=act_layer)]
        layers.append(ConvBNAct(hidden, hidden, k, stride, groups=hidden, act=act_layer))
        if use_se:
            layers.append(SqueezeExcite(hidden, make_divisible(hidden // 4)))
        layers.append(ConvBNAct(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetV3Small(nn.Module):
    CFG = [  # (in, kernel, expanded, out, SE, activation, stride) as in torchvision
        (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2),
        (24, 3, 88, 24, False, "RE", 1), (24, 5, 96, 40, True, "HS", 2),
        (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1),
        (48, 5, 288, 96, True, "HS", 2), (96, 5, 576, 96, True, "HS", 1),
        (96, 5, 576, 96, True, "HS", 1)]

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers = [ConvBNAct(3, 16, 3, 2, act=nn.Hardswish)]
        layers += [MobileNetV3Block(*cfg) for cfg in self.CFG]
        layers.append(ConvBNAct(96, 576, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(1024, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------------------------
# EfficientNet-B0
# --------------------------------------------------------------------------------------------

class MBConv(nn.Module):
    """EfficientNet MBConv: 1x1 expand (SiLU) -> kxk depthwise (SiLU) -> SE (SiLU / Sigmoid)
    -> 1x1 linear projection (+ residual; stochastic depth is a no-op in eval)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [ConvBNAct(cin, hidden, 1, act=nn.SiLU)]
        layers += [ConvBNAct(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
                   SqueezeExcite(hidden, max(1, cin // 4), act=nn.SiLU, gate=nn.Sigmoid),
                   ConvBNAct(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class EfficientNetB0(nn.Module):
    CFG = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
           (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]  # (expand, k, stride, out, repeats)

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, cin = [ConvBNAct(3, 32, 3, 2, act=nn.SiLU)], 32
        for e, k, s, c, n in self.CFG:
            for i in range(n):
                layers.append(MBConv(cin, c, k, s if i == 0 else 1, e))
                cin = c
        layers.append(ConvBNAct(cin, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------------------------
# DenseNet (small)
# --------------------------------------------------------------------------------------------

class DenseLayer(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1 conv (bn_size*growth) -> BN-ReLU-3x3 conv (growth)."""

    def __init__(self, cin: int, growth: int, bn_size: int = 4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    """Each layer sees everything so far; its output is appended with a channel Concat (a chain)."""

    def __init__(self, cin: int, n: int, growth: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class Transition(nn.Module):
    """BN-ReLU-1x1 conv (compression) -> 2x2 average pool."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)

    def forward(self, x):
        return self.pool(self.conv(F.relu(self.norm(x))))


class DenseNet(nn.Module):
    def __init__(self, blocks=(4, 6, 8), growth: int = 16, init: int = 32, num_classes: int = 1000):
        super().__init__()
        layers, c = [ConvBNAct(3, init, 7, 2), nn.MaxPool2d(3, 2, 1)], init
        for i, n in enumerate(blocks):
            layers.append(DenseBlock(c, n, growth))
            c += n * growth
            if i != len(blocks) - 1:
                layers.append(Transition(c, c // 2))
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------------------------
# U-Net (small)
# --------------------------------------------------------------------------------------------

class DoubleConv(nn.Module):
    """(3x3 conv -> BN -> ReLU) x 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(ConvBNAct(cin, cout, 3), ConvBNAct(cout, cout, 3))

    def forward(self, x):
        return self.block(x)


class UpBlock(nn.Module):
    """2x2 stride-2 ConvTranspose (halves channels) -> Concat with the skip -> DoubleConv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, 2)
        self.conv = DoubleConv(cin // 2 + cout, cout)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.up(x)], 1))


class UNet(nn.Module):
    def __init__(self, base: int = 16, depth: int = 4, num_classes: int = 3):
        super().__init__()
        widths = [base * 2 ** i for i in range(depth + 1)]
        self.inc = DoubleConv(3, widths[0])
        self.down = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.ModuleList(UpBlock(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(self.pool(skips[-1])))
        x = skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        return self.head(x)


# --------------------------------------------------------------------------------------------
# YOLOv8n (ultralytics layout, n scale: depth 0.33, width 0.25)
# --------------------------------------------------------------------------------------------

class YoloConv(nn.Module):
    """Ultralytics ``Conv``: Conv2d (no bias) -> BN -> SiLU."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1):
        super().__init__()
        self.block = ConvBNAct(cin, cout, k, s, act=nn.SiLU)

    def forward(self, x):
        return self.block(x)


class YoloBottleneck(nn.Module):
    """3x3 Conv -> 3x3 Conv, optional residual add."""

    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1 = YoloConv(c, c, 3)
        self.cv2 = YoloConv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """1x1 Conv -> two halves -> each bottleneck appends to the list -> Concat -> 1x1 Conv.

    ``split=False`` halves with ``chunk(2, 1)`` as ultralytics' ``forward`` does; the legacy exporter
    turns that into Shape -> Gather -> Add -> Div -> Mul -> Slice (x2), even for static channels.
    ``split=True`` uses ``split((c, c), 1)`` (ultralytics' ``forward_split``) -> a single Split node.
    """

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False, split: bool = False):
        super().__init__()
        self.c = cout // 2
        self.split = split
        self.cv1 = YoloConv(cin, 2 * self.c, 1)
        self.cv2 = YoloConv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(YoloBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = self.cv1(x)
        y = list(y.split((self.c, self.c), 1) if self.split else y.chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """1x1 Conv -> three chained 5x5 stride-1 MaxPools -> Concat of all four -> 1x1 Conv."""

    def __init__(self, cin: int, cout: int, k: int = 5):
        super().__init__()
        c = cin // 2
        self.cv1 = YoloConv(cin, c, 1)
        self.cv2 = YoloConv(4 * c, cout, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DetectHead(nn.Module):
    """Per scale: box branch (Conv, Conv, 1x1 Conv2d -> 4*reg_max) and class branch
    (Conv, Conv, 1x1 Conv2d -> nc). Returns the raw maps (box_p3, cls_p3, box_p4, ...)."""

    def __init__(self, chs: tuple[int, ...], nc: int = 80, reg_max: int = 16):
        super().__init__()
        c2 = max(16, chs[0] // 4, reg_max * 4)
        c3 = max(chs[0], min(nc, 100))
        self.box = nn.ModuleList(nn.Sequential(YoloConv(c, c2, 3), YoloConv(c2, c2, 3),
                                               nn.Conv2d(c2, 4 * reg_max, 1)) for c in chs)
        self.cls = nn.ModuleList(nn.Sequential(YoloConv(c, c3, 3), YoloConv(c3, c3, 3),
                                               nn.Conv2d(c3, nc, 1)) for c in chs)

    def forward(self, feats):
        out = []
        for f, box, cls in zip(feats, self.box, self.cls):
            out += [box(f), cls(f)]
        return tuple(out)


class YOLOv8(nn.Module):
    def __init__(self, nc: int = 80, split: bool = False):
        super().__init__()
        c2f = functools.partial(C2f, split=split)
        # backbone
        self.b0 = YoloConv(3, 16, 3, 2)          # P1/2
        self.b1 = YoloConv(16, 32, 3, 2)         # P2/4
        self.b2 = c2f(32, 32, 1, True)
        self.b3 = YoloConv(32, 64, 3, 2)         # P3/8
        self.b4 = c2f(64, 64, 2, True)
        self.b5 = YoloConv(64, 128, 3, 2)        # P4/16
        self.b6 = c2f(128, 128, 2, True)
        self.b7 = YoloConv(128, 256, 3, 2)       # P5/32
        self.b8 = c2f(256, 256, 1, True)
        self.b9 = SPPF(256, 256, 5)
        # neck
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n12 = c2f(256 + 128, 128, 1)
        self.n15 = c2f(128 + 64, 64, 1)          # P3 out
        self.n16 = YoloConv(64, 64, 3, 2)
        self.n18 = c2f(64 + 128, 128, 1)         # P4 out
        self.n19 = YoloConv(128, 128, 3, 2)
        self.n21 = c2f(128 + 256, 256, 1)        # P5 out
        self.detect = DetectHead((64, 128, 256), nc)

    def forward(self, x):
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        h4 = self.n12(torch.cat([self.up(p5), p4], 1))
        o3 = self.n15(torch.cat([self.up(h4), p3], 1))
        o4 = self.n18(torch.cat([self.n16(o3), h4], 1))
        o5 = self.n21(torch.cat([self.n19(o4), p5], 1))
        return self.detect((o3, o4, o5))


# --------------------------------------------------------------------------------------------
# EfficientNet-style with TensorFlow "same" padding computed at run time (efficientnet_pytorch /
# timm ports of TF checkpoints)
# --------------------------------------------------------------------------------------------

def get_same_padding(x, k: int, s: int, d: int):
    """Total TF-'same' padding of one spatial dim: ``max((ceil(x / s) - 1) * s + (k - 1) * d + 1 - x, 0)``.

    timm's ``get_same_padding``: plain ints in eager mode, tensor arithmetic when the size is a
    traced tensor, so the export keeps the computation (a ``math.ceil`` / ``max`` on a traced size,
    as efficientnet_pytorch writes it, bakes ``ceil(x / s)`` in as a constant of the trace size).
    """
    if isinstance(x, torch.Tensor):
        return torch.clamp(((x / s).ceil() - 1) * s + (k - 1) * d + 1 - x, min=0)
    return max((math.ceil(x / s) - 1) * s + (k - 1) * d + 1 - x, 0)


def pad_same(x: torch.Tensor, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int] = (1, 1)):
    """timm's ``pad_same`` / efficientnet_pytorch's ``Conv2dDynamicSamePadding`` padding: the odd
    pixel goes to the bottom / right, computed from the input size at run time."""
    ih, iw = x.size()[-2:]
    ph = get_same_padding(ih, k[0], s[0], d[0])
    pw = get_same_padding(iw, k[1], s[1], d[1])
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class Conv2dSame(nn.Conv2d):
    """Conv2d with run-time TF 'same' padding (exported: Shape -> Gather -> Cast -> Div -> Ceil ->
    Sub -> Mul -> Add -> Sub -> Clip -> Div ... -> Unsqueeze -> Concat -> ... -> Pad -> Conv)."""

    def __init__(self, cin: int, cout: int, k: int, s: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(cin, cout, k, s, 0, groups=groups, bias=bias)

    def forward(self, x):
        return self._conv_forward(pad_same(x, self.kernel_size, self.stride, self.dilation),
                                  self.weight, self.bias)


class ConvBNActSame(nn.Module):
    """ConvBNAct whose kxk convs (k > 1) pad at run time; 1x1 convs need none (efficientnet_pytorch
    traces its zero-padding branch away for them)."""

    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1,
                 act: Callable[[], nn.Module] | None = nn.SiLU):
        super().__init__()
        self.conv = (Conv2dSame(cin, cout, k, s, groups) if k > 1
                     else nn.Conv2d(cin, cout, 1, s, 0, groups=groups, bias=False))
        self.bn = nn.BatchNorm2d(cout)
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class MBConvSame(nn.Module):
    """MBConv with 'same'-padded depthwise conv: 1x1 expand (SiLU) -> kxk depthwise (SiLU) ->
    SE (SiLU / Sigmoid gate) -> 1x1 projection (+ residual when stride 1 and cin == cout)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [ConvBNActSame(cin, hidden, 1)]
        layers += [ConvBNActSame(hidden, hidden, k, stride, groups=hidden),
                   SqueezeExcite(hidden, max(1, cin // 4), act=nn.SiLU, gate=nn.Sigmoid),
                   ConvBNActSame(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class EffNetTFSame(nn.Module):
    CFG = [(1, 3, 1, 16), (4, 3, 2, 24), (4, 3, 1, 24), (4, 5, 2, 40), (4, 3, 1, 40),
           (4, 3, 2, 80)]  # (expand, k, stride, out)

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, cin = [ConvBNActSame(3, 32, 3, 2)], 32
        for e, k, s, c in self.CFG:
            layers.append(MBConvSame(cin, c, k, s, e))
            cin = c
        layers.append(ConvBNActSame(cin, 320, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(320, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------------------------
# Plain CNN with a view / reshape head (LeNet / AlexNet / VGG-era classifiers)
# --------------------------------------------------------------------------------------------

class ViewClassifier(nn.Module):
    """Five 3x3 convs and a max-pool down to 64 x 7 x 7 at 224 px, then a 2-layer MLP.

    ``const=False``: ``x.view(x.size(0), -1)`` -> Shape -> Gather(0) -> Unsqueeze -> Concat with
    [-1] -> Reshape. ``const=True``: ``x.reshape(-1, C * H * W)`` -> Reshape to a constant [-1, 3136].
    """

    def __init__(self, num_classes: int = 1000, const: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            ConvBNAct(3, 16, 3, 2), ConvBNAct(16, 32, 3, 2), nn.MaxPool2d(2, 2),
            ConvBNAct(32, 64, 3, 2), ConvBNAct(64, 64, 3), ConvBNAct(64, 64, 3, 2))
        self.flat = 64 * 7 * 7
        self.const = const
        self.classifier = nn.Sequential(nn.Linear(self.flat, 256), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(256, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = x.reshape(-1, self.flat) if self.const else x.view(x.size(0), -1)
        return self.classifier(x)


# --------------------------------------------------------------------------------------------
# PaddlePaddle-style squeeze-excite: constant reshape targets that spell out the channel count
# --------------------------------------------------------------------------------------------

class PaddleSE(nn.Module):
    """GAP -> Reshape to constant [-1, C] -> FC -> ReLU -> FC -> HardSigmoid -> Mul, as paddle2onnx
    writes SE-ResNet-vd / PP-style blocks (reshape targets are hard-coded Python ints, so they
    export as constants). Forms of the FCs:

    ``gemm``    nn.Linear -> Gemm; Reshape to constant [-1, C, 1, 1], then HardSigmoid
    ``matmul``  ``x @ W.T + b`` -> MatMul + Add (paddle's matmul_v2 + elementwise_add), HardSigmoid
                on [N, C], then Reshape to [-1, C, 1, 1]; the first target is rewritten to [0, C]
                after export (``patch_paddle_zero``)
    ``conv``    Reshape [-1, C] -> Reshape [-1, C, 1, 1] -> 1x1 Conv -> ReLU -> 1x1 Conv -> HardSigmoid
    """

    def __init__(self, c: int, form: str, reduction: int = 4):
        super().__init__()
        self.c, self.form = c, form
        r = make_divisible(c // reduction)
        if form == "conv":
            self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)
        else:
            self.fc1, self.fc2 = nn.Linear(c, r), nn.Linear(r, c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        s = self.pool(x).view(-1, self.c)
        if self.form == "conv":
            s = self.gate(self.fc2(F.relu(self.fc1(s.view(-1, self.c, 1, 1)))))
        elif self.form == "matmul":        # gate on [N, C], then Reshape
            s = F.relu(s @ self.fc1.weight.t() + self.fc1.bias)
            s = self.gate(s @ self.fc2.weight.t() + self.fc2.bias).view(-1, self.c, 1, 1)
        else:                              # Reshape, then gate
            s = self.gate(self.fc2(F.relu(self.fc1(s))).view(-1, self.c, 1, 1))
        return x * s


class PaddleSEBlock(nn.Module):
    """SE-ResNet basic block: 3x3 -> 3x3 -> SE -> + shortcut (1x1 projection when needed) -> ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, form: str):
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 3, stride)
        self.conv2 = ConvBNAct(cout, cout, 3, act=None)
        self.se = PaddleSE(cout, form)
        self.short = (ConvBNAct(cin, cout, 1, stride, act=None)
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.se(self.conv2(self.conv1(x))) + self.short(x))


class PaddleSENet(nn.Module):
    CFG = [(32, 2, "gemm"), (32, 1, "matmul"), (64, 2, "conv"), (64, 1, "gemm"),
           (128, 2, "matmul")]  # (out, stride, SE form)

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, cin = [ConvBNAct(3, 24, 3, 2), nn.MaxPool2d(3, 2, 1)], 24
        for c, s, form in self.CFG:
            layers.append(PaddleSEBlock(cin, c, s, form))
            cin = c
        self.features = nn.Sequential(*layers)
        self.c = cin
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).view(-1, self.c))


def _const_value(g, name: str):
    """(node or initializer holding constant ``name``, its numpy value), or (None, None)."""
    from onnx import numpy_helper

    for t in g.initializer:
        if t.name == name:
            return t, numpy_helper.to_array(t)
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return n, numpy_helper.to_array(n.attribute[0].t)
    return None, None


def patch_paddle_zero(model) -> None:
    """Rewrite the 2-D constant targets [-1, C] of the ``matmul`` SE reshapes to [0, C] (0 copies the
    batch dim), the other spelling paddle2onnx emits; the torch output is unchanged."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    for node in g.node:
        if node.op_type != "Reshape" or "/se/" not in node.name:
            continue
        holder, value = _const_value(g, node.input[1])
        if value is None or value.shape != (2,) or value[0] != -1:
            continue
        # only the matmul-form blocks: their Reshape feeds a MatMul
        if not any(n.op_type == "MatMul" and node.output[0] in n.input for n in g.node):
            continue
        name = node.input[1] + "_zero"
        g.initializer.append(numpy_helper.from_array(np.array([0, value[1]], np.int64), name))
        old, node.input[1] = node.input[1], name
        if isinstance(holder, onnx.NodeProto) and not any(old in n.input for n in g.node):
            g.node.remove(holder)
    onnx.checker.check_model(model)


# --------------------------------------------------------------------------------------------
# tf2onnx-style channels-last graph (written with onnx.helper; the nn.Module is the reference)
# --------------------------------------------------------------------------------------------

class TF2ONNXNet(nn.Module):
    """NHWC network in the shape tf2onnx converts Keras models to: every conv is
    Transpose(0,3,1,2) -> Conv -> Transpose(0,2,3,1); bias / scale / activations / residual adds
    run on NHWC tensors with per-channel [C] constants; ReLU6 is Clip(x, 0, 6) with min / max
    inputs; head ReduceMean over axes [1, 2] -> MatMul [C, classes] -> Add. The stride-2 3x3
    convs use ``auto_pad=SAME_UPPER``, as tf2onnx writes SAME padding for unknown input sizes.

    Layers (name, cin, cout, k, stride, group, post-ops); ``res`` adds the tensor saved by ``save``.
    """

    LAYERS = [
        ("stem", 3, 16, 3, 2, 1, ("bias", "relu")),
        ("conv1", 16, 32, 3, 1, 1, ("scale", "bias", "relu6", "save")),
        ("dw1", 32, 32, 3, 1, 32, ("bias", "relu6")),
        ("pw1", 32, 32, 1, 1, 1, ("scale", "bias", "res", "relu")),
        ("conv2", 32, 64, 3, 2, 1, ("bias", "relu", "save")),
        ("dw2", 64, 64, 3, 1, 64, ("scale", "bias", "relu6")),
        ("pw2", 64, 64, 1, 1, 1, ("bias", "res", "relu6")),
        ("conv3", 64, 96, 3, 2, 1, ("mul_bias", "relu")),
    ]

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.convs = nn.ModuleDict()
        self.scale = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        for name, cin, cout, k, s, g, post in self.LAYERS:
            self.convs[name] = nn.Conv2d(cin, cout, k, s, 0, groups=g, bias=False)
            if "scale" in post or "mul_bias" in post:
                self.scale[name] = nn.Parameter(torch.empty(cout).uniform_(0.5, 1.5))
            self.bias[name] = nn.Parameter(torch.empty(cout).normal_(0.0, 0.05))
        self.fc = nn.Linear(self.LAYERS[-1][2], num_classes)
        self.layer_spec = {spec[0]: spec for spec in self.LAYERS}

    def layer(self, name: str, x: torch.Tensor, saved: torch.Tensor | None):
        """One conv and its NHWC post-ops; returns (output, tensor saved for a later residual)."""
        _, _, _, k, _, _, post = self.layer_spec[name]
        conv = self.convs[name]
        y = x.permute(0, 3, 1, 2)
        y = conv(pad_same(y, conv.kernel_size, conv.stride) if k > 1 else y)
        x = y.permute(0, 2, 3, 1)
        for op in post:
            if op == "scale":
                x = x * self.scale[name]
            elif op == "bias":
                x = x + self.bias[name]
            elif op == "mul_bias":            # a folded BN written as Add then Mul
                x = (x + self.bias[name]) * self.scale[name]
            elif op == "relu":
                x = F.relu(x)
            elif op == "relu6":
                x = torch.clamp(x, 0.0, 6.0)
            elif op == "save":
                saved = x
            elif op == "res":
                x = x + saved
        return x, saved

    def forward(self, x):                     # x: N, H, W, C
        saved = None
        for name, *_ in self.LAYERS:
            x, saved = self.layer(name, x, saved)
        return self.fc(x.mean((1, 2)))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Data-dependent init (no BatchNorm here): scale each kernel so its conv output has unit std."""
        saved = None
        for name, *_ in self.LAYERS:
            conv = self.convs[name]
            y = conv(pad_same(x.permute(0, 3, 1, 2), conv.kernel_size, conv.stride))
            conv.weight /= y.std()
            x, saved = self.layer(name, x, saved)


def write_tf2onnx_nhwc(model: TF2ONNXNet, opset: int, path: Path) -> None:
    """Write ``model`` as tf2onnx would (NHWC input [N, H, W, 3], dynamic N / H / W)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{name}:0"], name=name, **attrs))
        return f"{name}:0"

    f32 = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    relu6_min = const("relu6/min", np.array(0.0, np.float32))
    relu6_max = const("relu6/max", np.array(6.0, np.float32))
    x, saved = "input", None
    for name, cin, cout, k, s, g, post in model.LAYERS:
        p = f"model/{name}"
        conv = model.convs[name]
        t = node("Transpose", [x], f"{p}/Conv2D__nchw", perm=[0, 3, 1, 2])
        pads = {"auto_pad": "SAME_UPPER"} if s > 1 else {"pads": [k // 2] * 4}
        t = node("Conv", [t, const(f"{p}/kernel", f32(conv.weight))], f"{p}/Conv2D",
                 kernel_shape=[k, k], strides=[s, s], dilations=[1, 1], group=g, **pads)
        x = node("Transpose", [t], f"{p}/Conv2D__nhwc", perm=[0, 2, 3, 1])
        for op in post:
            if op == "scale":
                x = node("Mul", [x, const(f"{p}/scale", f32(model.scale[name]))], f"{p}/mul")
            elif op == "bias":
                x = node("Add", [x, const(f"{p}/bias", f32(model.bias[name]))], f"{p}/BiasAdd")
            elif op == "mul_bias":
                x = node("Add", [x, const(f"{p}/bias", f32(model.bias[name]))], f"{p}/BiasAdd")
                x = node("Mul", [x, const(f"{p}/scale", f32(model.scale[name]))], f"{p}/mul")
            elif op == "relu":
                x = node("Relu", [x], f"{p}/Relu")
            elif op == "relu6":
                x = node("Clip", [x, relu6_min, relu6_max], f"{p}/Relu6")
            elif op == "save":
                saved = x
            elif op == "res":
                x = node("Add", [x, saved], f"{p}/add")
    axes = [1, 2]
    if opset >= 18:
        x = node("ReduceMean", [x, const("model/gap/axes", np.array(axes, np.int64))],
                 "model/gap/Mean", keepdims=0)
    else:
        x = node("ReduceMean", [x], "model/gap/Mean", axes=axes, keepdims=0)
    x = node("MatMul", [x, const("model/fc/kernel", f32(model.fc.weight.t()))], "model/fc/MatMul")
    nodes.append(helper.make_node("Add", [x, const("model/fc/bias", f32(model.fc.bias))], ["output"],
                                  name="model/fc/BiasAdd"))
    graph = helper.make_graph(
        nodes, "tf2onnx",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", model.fc.out_features])],
        inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                          producer_name="tf2onnx", producer_version="1.16.1")
    m.ir_version = 8                          # what tf2onnx 1.16 writes for opsets 11..18
    onnx.save(m, str(path))

# --------------------------------------------------------------------------------------------
# ConvNeXt (small widths; torchvision / timm block layout)
# --------------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map, written channels-last as torchvision does:
    permute to NHWC -> LayerNorm(C) -> permute back (Transpose -> LayerNormalization -> Transpose)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> NHWC -> LayerNorm -> Linear(C, 4C) -> GELU -> Linear(4C, C)
    -> layer-scale gamma (timm: multiplied channels-last) -> NCHW -> residual add."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # trained ConvNeXts end with layer scales well away from their 1e-6 init
        self.gamma = nn.Parameter(torch.empty(dim).uniform_(0.2, 1.0))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, depths=(1, 1, 2, 1), widths=(32, 64, 128, 256), num_classes: int = 1000):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, widths[0], 4, 4), LayerNorm2d(widths[0], eps=1e-6))]
        for i, (n, c) in enumerate(zip(depths, widths)):
            if i > 0:                         # downsampling layer: LayerNorm -> 2x2 stride-2 conv
                layers.append(nn.Sequential(LayerNorm2d(widths[i - 1], eps=1e-6),
                                            nn.Conv2d(widths[i - 1], c, 2, 2)))
            layers.append(nn.Sequential(*(ConvNeXtBlock(c) for _ in range(n))))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = LayerNorm2d(widths[-1], eps=1e-6)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.norm(self.pool(self.features(x))), 1))


# --------------------------------------------------------------------------------------------
# CRNN text recogniser (Shi et al. layout, half widths)
# --------------------------------------------------------------------------------------------

class CRNN(nn.Module):
    """Grey 1 x 32 x W line image -> VGG-style conv/BN/ReLU/MaxPool backbone (2x2 pools, then
    (2, 1) pools that keep the width, then a 2x2 valid conv) to 1 x (W/4 - 1) -> squeeze the height
    -> [T, N, C] -> 2-layer bidirectional LSTM (hidden 64) -> Linear per time step -> [T, N, 37]
    (CTC logits; 36 symbols + blank). Width is dynamic."""

    CFG = [(32, False, "M"), (64, False, "M"), (128, True, None), (128, False, "H"),
           (256, True, None), (256, False, "H")]  # (width, BatchNorm, pool after: 2x2 / (2, 1))

    def __init__(self, cin: int = 1, num_classes: int = 37, hidden: int = 64):
        super().__init__()
        layers, c = [], cin
        for width, bn, pool in self.CFG:
            layers += [nn.Conv2d(c, width, 3, 1, 1, bias=not bn)]
            layers += [nn.BatchNorm2d(width), nn.ReLU()] if bn else [nn.ReLU()]
            if pool == "M":
                layers.append(nn.MaxPool2d(2, 2))
            elif pool == "H":
                layers.append(nn.MaxPool2d((2, 1), (2, 1)))
            c = width
        layers += [nn.Conv2d(c, c, 2, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        self.cnn = nn.Sequential(*layers)
        self.rnn = nn.LSTM(c, hidden, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, num_classes)

    def forward(self, x):
        f = self.cnn(x).squeeze(2).permute(2, 0, 1)   # N, C, 1, T -> T, N, C
        y, _ = self.rnn(f)
        return self.fc(y)


# --------------------------------------------------------------------------------------------
# DBNet text detector (small ResNet backbone, DB-FPN, DB head as in PaddleOCR / MMOCR)
# --------------------------------------------------------------------------------------------

class DBFPN(nn.Module):
    """1x1 laterals to ``inner`` -> top-down nearest x2 Upsample + Add -> 3x3 smoothing convs to
    inner/4 -> Upsample each to 1/4 (x8, x4, x2) -> Concat (inner channels at 1/4)."""

    def __init__(self, chs: tuple[int, ...], inner: int = 96):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, inner, 1, bias=False) for c in chs)
        self.smooth = nn.ModuleList(nn.Conv2d(inner, inner // 4, 3, 1, 1, bias=False) for _ in chs)
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")
        self.up = nn.ModuleList(nn.Upsample(scale_factor=2 ** i, mode="nearest") if i else nn.Identity()
                                for i in range(len(chs)))

    def forward(self, feats):
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + self.up2(lat[i + 1])
        outs = [up(conv(f)) for up, conv, f in zip(self.up, self.smooth, lat)]
        return torch.cat(outs[::-1], 1)


class DBHead(nn.Module):
    """Conv3x3-BN-ReLU -> ConvTranspose 2x2/2 -> BN-ReLU -> ConvTranspose 2x2/2 -> Sigmoid."""

    def __init__(self, cin: int):
        super().__init__()
        c = cin // 4
        self.conv = ConvBNAct(cin, c, 3)
        self.up1 = nn.ConvTranspose2d(c, c, 2, 2)
        self.bn = nn.BatchNorm2d(c)
        self.up2 = nn.ConvTranspose2d(c, 1, 2, 2)

    def forward(self, x):
        x = F.relu(self.bn(self.up1(self.conv(x))))
        return torch.sigmoid(self.up2(x))


class DBNet(nn.Module):
    """ResNet-ish backbone (stem 3x3/2 + 3x3 + MaxPool, BasicBlocks, stages at 1/4 .. 1/32)
    -> DBFPN -> DBHead: a 1-channel text probability map at input resolution."""

    def __init__(self, widths=(32, 64, 128, 256), blocks=(2, 2, 2, 2), inner: int = 96):
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, 32, 3, 2), ConvBNAct(32, 32, 3), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 32
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stages.append(nn.Sequential(*(BasicBlock(cin if j == 0 else w, w, 2 if (i and not j) else 1)
                                          for j in range(n))))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.neck = DBFPN(widths, inner)
        self.head = DBHead(inner)

    def forward(self, x):
        x, feats = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return self.head(self.neck(feats))

# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

class ViTBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm -> nn.MultiheadAttention (tokens as rows: the legacy
    exporter writes [T, N, C] MatMuls and a [T*N, C] Gemm) -> residual, LayerNorm -> Linear(C, 4C)
    -> GELU -> Linear(4C, C) (MatMuls on [N, T, C]) -> residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViTTiny(nn.Module):
    """A small vision transformer: 8x8 patch conv, learned positions, 4 blocks of width 96, mean of
    the tokens -> LayerNorm -> Linear(1000)."""

    def __init__(self, dim: int = 96, depth: int = 4, heads: int = 4, size: int = 64, patch: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.1)
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 1000)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(tokens)).mean(1))


@dataclass(frozen=True)
class Spec:
    build: Callable[[], nn.Module]
    size: int                        # export input height = width
    fully_conv: bool = False         # dynamic H/W as well as batch
    outputs: tuple[str, ...] = ("output",)
    verify_hw: tuple[int, int] | None = field(default=None)  # ORT check size (default: size x size)
    spatial_out: bool | None = None  # outputs have dynamic H/W too (default: fully_conv)
    nhwc: bool = False               # input is N, H, W, 3
    write: Callable[[nn.Module, int, Path], None] | None = None  # onnx.helper writer, not torch export
    patch: Callable[[object], None] | None = None  # rewrites the exported ModelProto in place
    also_hw: tuple[tuple[int, int], ...] = ()      # further ORT check sizes (dynamic H/W)
    channels: int = 3                # input channels (1 for grey text lines)
    hw: tuple[int, int] | None = None  # export input (height, width) if not size x size
    input_axes: tuple[tuple[int, str], ...] | None = None   # dynamic input axes (default: above)
    output_axes: tuple[tuple[int, str], ...] | None = None  # dynamic axes of every output

    def example(self, n: int, h: int | None = None, w: int | None = None) -> tuple[int, ...]:
        h0, w0 = self.hw or (self.size, self.size)
        h, w = h or h0, w or w0
        return (n, h, w, self.channels) if self.nhwc else (n, self.channels, h, w)


YOLO_OUTPUTS = ("box_p3", "cls_p3", "box_p4", "cls_p4", "box_p5", "cls_p5")

ZOO: dict[str, Spec] = {
    "resnet18": Spec(resnet18, 224),
    "resnet50": Spec(resnet50, 224),
    "vgg16_bn": Spec(vgg16_bn, 224),
    "mobilenet_v2": Spec(MobileNetV2, 224),
    "mobilenet_v3_small": Spec(MobileNetV3Small, 224),
    "efficientnet_b0": Spec(EfficientNetB0, 224),
    "densenet_small": Spec(DenseNet, 224),
    "unet_small": Spec(UNet, 256, True, verify_hw=(192, 320)),
    "yolov8n": Spec(YOLOv8, 320, True, YOLO_OUTPUTS, verify_hw=(256, 384)),
    "yolov8n_split": Spec(functools.partial(YOLOv8, split=True), 320, True, YOLO_OUTPUTS,
                          verify_hw=(256, 384)),
    "effnet_tf_same": Spec(EffNetTFSame, 224, True, spatial_out=False, verify_hw=(225, 191),
                           also_hw=((224, 224),)),
    "view_classifier": Spec(ViewClassifier, 224),
    "view_const_classifier": Spec(functools.partial(ViewClassifier, const=True), 224),
    "paddle_se": Spec(PaddleSENet, 224, patch=patch_paddle_zero),
    "tf2onnx_nhwc": Spec(TF2ONNXNet, 224, True, spatial_out=False, nhwc=True,
                         write=write_tf2onnx_nhwc, verify_hw=(193, 256), also_hw=((224, 224),)),
    "convnext_small": Spec(ConvNeXt, 224),
    "crnn_ocr": Spec(CRNN, 32, channels=1, hw=(32, 100), input_axes=((0, "batch"), (3, "width")),
                     output_axes=((0, "time"), (1, "batch")), verify_hw=(32, 160),
                     also_hw=((32, 100),)),
    "dbnet_small": Spec(DBNet, 640, True, verify_hw=(480, 640), also_hw=((640, 640),)),
    "vit_tiny": Spec(ViTTiny, 64),
}


# --------------------------------------------------------------------------------------------
# Build, export, verify
# --------------------------------------------------------------------------------------------

def build(name: str) -> nn.Module:
    """Construct ``name`` with deterministic random weights and calibrated BN statistics, in eval mode."""
    spec = ZOO[name]
    torch.manual_seed(SEED)
    model = spec.build()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.normal_(m.bias, 0.0, 0.05)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features))
                nn.init.normal_(m.bias, 0.0, 0.05)
            elif isinstance(m, nn.LayerNorm):  # non-trivial affine, as for BatchNorm below
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
        for m in bns:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.1)
            m.reset_running_stats()
            m.momentum = None                  # cumulative average: one pass sets batch stats
        if bns:                                # calibrate running statistics on random data
            model.train()
            model(torch.randn(spec.example(2)))
        if hasattr(model, "calibrate"):        # no BatchNorm: data-dependent weight scale
            model.calibrate(torch.randn(spec.example(2)))
    return model.eval()


def export_dynamo(model: nn.Module, name: str, path: Path) -> None:
    """PyTorch's newer exporter (``dynamo=True``, the default from PyTorch 2.9; needs onnxscript):
    opset 18+ as it chooses, its own graph optimiser, weights as external data; batch dynamic."""
    spec = ZOO[name]
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(model, (torch.randn(spec.example(2)),), str(path), dynamo=True, input_names=["input"],
                      output_names=list(spec.outputs), dynamic_shapes=({0: batch},))


def export(model: nn.Module, name: str, opset: int, path: Path) -> None:
    spec = ZOO[name]
    if spec.write is not None:
        spec.write(model, opset, path)
        return
    x = torch.randn(spec.example(1))
    axes = {0: "batch", 2: "height", 3: "width"} if spec.fully_conv else {0: "batch"}
    spatial_out = spec.fully_conv if spec.spatial_out is None else spec.spatial_out
    dynamic = {"input": dict(spec.input_axes) if spec.input_axes is not None else axes}
    for o in spec.outputs:
        if spec.output_axes is not None:
            dynamic[o] = {i: f"{o}_{a}" if a != "batch" else a for i, a in spec.output_axes}
        else:
            dynamic[o] = {0: "batch", 2: f"{o}_height", 3: f"{o}_width"} if spatial_out else {0: "batch"}
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                      input_names=["input"], output_names=list(spec.outputs),
                      dynamic_axes=dynamic, do_constant_folding=True)
    if spec.patch is not None:
        import onnx

        proto = onnx.load(str(path))
        spec.patch(proto)
        onnx.save(proto, str(path))


def verify(model: nn.Module, name: str, path: Path) -> tuple[float, float]:
    """check_model(full_check) + ORT runs on a batch of 2 (at ``verify_hw`` and each ``also_hw``)
    compared with the torch module; returns (max abs diff, max |ref|)."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    spec = ZOO[name]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    diff = scale = 0.0
    for h, w in (spec.verify_hw or spec.hw or (spec.size, spec.size),) + spec.also_hw:
        x = np.random.default_rng(SEED + 1).standard_normal(spec.example(2, h, w)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x))
        ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        got = sess.run(None, {"input": x})
        assert len(got) == len(ref), (len(got), len(ref))
        for g, r in zip(got, ref):
            assert g.shape == r.shape, (g.shape, r.shape)
        diff = max(diff, *(float(np.abs(g - r).max()) for g, r in zip(got, ref)))
        scale = max(scale, *(float(np.abs(r).max()) for r in ref))
    return diff, scale


def op_types(path: Path) -> Counter:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                   for n in g.node)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument("--only", nargs="+", choices=list(ZOO), metavar="NAME",
                    help=f"subset of: {', '.join(ZOO)}")
    ap.add_argument("--opsets", nargs="+", type=int, default=[11, 17])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--dynamo", action="store_true",
                    help="export with torch.onnx.export(dynamo=True) instead (classifiers: models with "
                         "fixed spatial size), written as NAME_dynamo.onnx; --opsets is ignored")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    t_total = time.perf_counter()
    rows, failures, seen_warnings = [], [], {}
    for name in args.only or list(ZOO):
        model = build(name)
        params = sum(p.numel() for p in model.parameters())
        for opset in ["dynamo"] if args.dynamo else args.opsets:
            path = args.out / (f"{name}_dynamo.onnx" if args.dynamo else f"{name}_op{opset}.onnx")
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if args.dynamo:
                        export_dynamo(model, name, path)
                    else:
                        export(model, name, opset, path)
                t_exp = time.perf_counter() - t0
                diff, scale = verify(model, name, path)
            except Exception as e:  # keep going; report at the end
                failures.append((name, opset, f"{type(e).__name__}: {e}"))
                print(f"FAILED {name} opset {opset}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            for w in caught:
                seen_warnings.setdefault(str(w.message).splitlines()[0], []).append(f"{name}_op{opset}")
            ops = op_types(path)
            rows.append((name, opset, params, path.stat().st_size / 2**20, sum(ops.values()),
                         t_exp, diff, scale, ops))
            print(f"  done {name} op{opset} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr,
                  flush=True)

    head = (f"{'name':<21} {'opset':>5} {'params':>12} {'MB':>8} {'nodes':>6} {'export s':>8} "
            f"{'max diff':>9} {'max |ref|':>9}  op types")
    print(head)
    print("-" * len(head))
    for name, opset, params, mb, nodes, t_exp, diff, scale, ops in rows:
        print(f"{name:<21} {opset:>5} {params:>12,} {mb:>8.1f} {nodes:>6} {t_exp:>8.1f} "
              f"{diff:>9.2e} {scale:>9.2e}  {', '.join(sorted(ops))}")
    print(f"\ntotal {time.perf_counter() - t_total:.1f} s, {len(rows)} models written to {args.out}")
    for msg, where in seen_warnings.items():
        print(f"export warning ({len(where)}x: {where[0]}{', ...' if len(where) > 1 else ''}): {msg}")
    for name, opset, err in failures:
        print(f"FAILED {name} opset {opset}: {err}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
