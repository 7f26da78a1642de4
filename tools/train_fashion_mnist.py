#!/usr/bin/env python3
"""Train the small Fashion-MNIST CNNs shipped with onnxprune and export them to ONNX.

This script produces the reference models used by onnxprune's examples and tests:

* ``vgg_fmnist.onnx``    - VGG-style plain CNN (7 conv layers, BN folded into Conv
  by the exporter), 2 fully connected layers.
* ``resnet_fmnist.onnx`` - ResNet-20-style (CIFAR-style) residual network with
  option-B (1x1 conv + BN) projection shortcuts; exported with its
  ``BatchNormalization`` nodes kept as separate nodes.
* ``mobilenet_fmnist.onnx`` - MobileNetV2/V3-style network: inverted-residual blocks
  (expand 1x1, depthwise 3x3, squeeze-excite with a Hardsigmoid gate, linear project 1x1),
  ReLU6 then Hardswish activations, BN folded into Conv by the exporter.
* ``shufflenet_fmnist.onnx`` (with ``--only shufflenet`` only; not shipped) - ShuffleNetV2-style
  network with torchvision's blocks and channel shuffle (``x.size()``, exported as run-time shape
  arithmetic), for measuring pruning through channel shuffles (docs/benchmarks.md).
* ``vgg_gn_fmnist.onnx`` (with ``--only vgg_gn`` only; not shipped) - the VGG-style network with
  GroupNorm (8 groups) in place of BatchNorm, which the exporter spells out as
  ``Reshape → InstanceNormalization → Reshape → Mul → Add``, for measuring pruning through group
  norms (docs/benchmarks.md).
* ``convnextv2_fmnist.onnx`` (with ``--only convnextv2`` only; not shipped) - ConvNeXt V2-style
  network (depthwise 7×7, LayerNorm, an MLP of channels-last ``Linear`` layers with GELU and a
  global response norm, residual joins), exported at opset 17 as timm's ConvNeXt V2 is (its
  LayerNorms as ``LayerNormalization``), for measuring pruning through the global response norm's
  mean over channels (docs/benchmarks.md).
* ``fmnist_calib.npy``   - 512 normalised training images (seeded random choice),
  float32 ``[512, 1, 28, 28]``, for calibration / activation statistics.
* ``fmnist_calib_2k.npz`` - 2048 normalised training images (another seeded choice),
  float32 ``input [2048, 1, 28, 28]``, compressed: reconstruction is data-limited at 512 images.
* ``fmnist_test.npz``    - the first 2000 test images (``x``: float32 normalised
  ``[2000, 1, 28, 28]``, ``y``: int64 labels) for accuracy checks.

Data: the raw IDX files of Fashion-MNIST (Debian package ``dataset-fashion-mnist``
installs them in ``/usr/share/datasets/fashion-mnist``), read with gzip + numpy.

Input normalisation: pixels scaled to [0, 1], then ``(x - 0.2860) / 0.3530``.
Model input is named ``input`` (``[N, 1, 28, 28]``, dynamic batch), output ``logits``
(``[N, 10]``).

Training: SGD (momentum 0.9, nesterov, weight decay 5e-4), batch 128, cosine LR
schedule with one warm-up epoch, augmentation = random crop with 2-pixel zero
padding + random horizontal flip. All seeds fixed; CPU only.

Example::

    python tools/train_fashion_mnist.py --out-dir models
    python tools/train_fashion_mnist.py --only resnet --epochs 12
    python tools/train_fashion_mnist.py --only mobilenet --epochs 15 --no-data-files
    python tools/train_fashion_mnist.py --only shufflenet --out-dir /tmp/shf --no-data-files
    python tools/train_fashion_mnist.py --only vgg_gn --out-dir /tmp/gn --no-data-files
    python tools/train_fashion_mnist.py --only convnextv2 --out-dir /tmp/cnx --no-data-files
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN = 0.2860
STD = 0.3530
NUM_CLASSES = 10


# --------------------------------------------------------------------------- data
def read_idx(path: str) -> np.ndarray:
    """Read a (gzipped) IDX file into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero1, zero2, dtype_code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: unsupported IDX header {data[:4]!r}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(dims)


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (x, y): x float32 normalised [N,1,28,28], y int64 [N]."""
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    x = normalise(x)
    return x, y.astype(np.int64)


def normalise(x_uint8: np.ndarray) -> np.ndarray:
    x = x_uint8.astype(np.float32) / 255.0
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return x.reshape(-1, 1, 28, 28).astype(np.float32)


def augment(x: np.ndarray, rng: np.random.Generator, pad: int = 2) -> np.ndarray:
    """Random crop with zero padding (in raw-pixel space) + random horizontal flip.

    ``x`` is normalised, so the padding value is the normalised value of a black pixel.
    """
    n, c, h, w = x.shape
    pad_val = np.float32((0.0 - MEAN) / STD)
    xp = np.full((n, c, h + 2 * pad, w + 2 * pad), pad_val, dtype=np.float32)
    xp[:, :, pad:pad + h, pad:pad + w] = x
    dy = rng.integers(0, 2 * pad + 1, size=n)
    dx = rng.integers(0, 2 * pad + 1, size=n)
    flip = rng.random(n) < 0.5
    ar_h = np.arange(h)
    ar_w = np.arange(w)
    rows = dy[:, None] + ar_h[None, :]                       # [n, h]
    cols = dx[:, None] + ar_w[None, :]                       # [n, w]
    cols = np.where(flip[:, None], cols[:, ::-1], cols)      # flip = reversed columns
    idx_n = np.arange(n)[:, None, None]
    out = xp[:, 0][idx_n, rows[:, :, None], cols[:, None, :]]  # [n, h, w]
    return np.ascontiguousarray(out[:, None], dtype=np.float32)


# --------------------------------------------------------------------------- models
def conv_bn_relu(cin: int, cout: int, groups: int = 0) -> list[nn.Module]:
    """3×3 conv, BatchNorm (or GroupNorm of ``groups`` groups), ReLU."""
    norm = nn.GroupNorm(groups, cout) if groups else nn.BatchNorm2d(cout)
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm, nn.ReLU(inplace=True)]


class VGGFMnist(nn.Module):
    """VGG-style: [32,32,M,64,64,M,128,128,128,M] -> FC 1152->256 -> FC 256->10."""

    def __init__(self, num_classes: int = NUM_CLASSES, groups: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        layers += conv_bn_relu(1, 32, groups) + conv_bn_relu(32, 32, groups) + [nn.MaxPool2d(2)]
        layers += conv_bn_relu(32, 64, groups) + conv_bn_relu(64, 64, groups) + [nn.MaxPool2d(2)]
        layers += conv_bn_relu(64, 128, groups) + conv_bn_relu(128, 128, groups) + conv_bn_relu(128, 128, groups) + \
            [nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)  # 28 -> 14 -> 7 -> 3
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(128 * 3 * 3, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            # option B: 1x1 conv + BN projection
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetFMnist(nn.Module):
    """ResNet-20 (CIFAR-style, 3x3 BasicBlocks of 16/32/64 channels)."""

    def __init__(self, num_classes: int = NUM_CLASSES, blocks_per_stage: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        stages = []
        cin = 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages  # 28 -> 28 -> 14 -> 7
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class SqueezeExcite(nn.Module):
    """GAP -> 1x1 conv -> ReLU -> 1x1 conv -> Hardsigmoid gate, multiplied onto the input."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: expand 1x1 -> depthwise 3x3 -> squeeze-excite -> project 1x1 (linear).

    Every conv is followed by BN (folded into the conv at export); the residual add is used
    when stride is 1 and the channel count is unchanged.
    """

    def __init__(self, cin: int, hidden: int, cout: int, stride: int, hswish: bool):
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU6
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden,
                                                 bias=False), nn.BatchNorm2d(hidden), act())
        self.se = SqueezeExcite(hidden, max(8, hidden // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return x + out if self.residual else out


class MobileNetFMnist(nn.Module):
    """MobileNetV2/V3-style: stem, 7 inverted-residual blocks with squeeze-excite, 1x1 head conv."""

    # (expanded width, output width, stride, hardswish): ReLU6 at 28x28 and 14x14, hardswish at 7x7
    BLOCKS = [(32, 16, 1, False),   # 28x28, residual
              (64, 24, 2, False),   # -> 14x14
              (72, 24, 1, False),   # residual
              (96, 40, 2, True),    # -> 7x7
              (160, 40, 1, True),   # residual
              (192, 64, 1, True),
              (256, 64, 1, True)]   # residual

    def __init__(self, num_classes: int = NUM_CLASSES, head: int = 96):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True))
        blocks, cin = [], 16
        for hidden, cout, stride, hswish in self.BLOCKS:
            blocks.append(InvertedResidual(cin, hidden, cout, stride, hswish))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(head, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.flatten(self.pool(x)))


def channel_shuffle(x, groups: int):
    """torchvision's: its sizes read with ``x.size()``, which the exporter computes at run time."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    return torch.transpose(x, 1, 2).contiguous().view(batch, -1, height, width)


class ShuffleBlock(nn.Module):
    """torchvision's ShuffleNetV2 block: stride 2 runs both branches on the whole input, stride 1
    passes one half through and runs the other; the two halves are then shuffled."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        half = cout // 2
        self.stride = stride
        if stride == 2:
            self.branch1 = nn.Sequential(nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                         nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half),
                                         nn.ReLU(inplace=True))
        inner = cin if stride == 2 else half
        self.branch2 = nn.Sequential(nn.Conv2d(inner, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                                     nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
                                     nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetFMnist(nn.Module):
    """ShuffleNetV2-style (torchvision's blocks and channel shuffle): stem, 28 → 14 → 7 in two
    stages of 3 and 4 blocks, 1×1 head conv. Trained on request only (``--only shufflenet``): not
    among the shipped models."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths=(48, 96), repeats=(3, 4), head: int = 192):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        blocks, cin = [], 24
        for width, repeat in zip(widths, repeats):
            blocks += [ShuffleBlock(cin, width, 2)] + [ShuffleBlock(width, width, 1) for _ in range(repeat - 1)]
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU(inplace=True))
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


MODELS = {"vgg": ("vgg_fmnist", VGGFMnist), "resnet": ("resnet_fmnist", ResNetFMnist),
          "mobilenet": ("mobilenet_fmnist", MobileNetFMnist)}
class VGGGroupNormFMnist(VGGFMnist):
    """The VGG-style network with GroupNorm of 8 groups after each conv. Trained on request only
    (``--only vgg_gn``): not among the shipped models."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__(num_classes, groups=8)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt V2's GRN on channels-last maps, as timm writes it: each channel's spatial L2 norm
    divided by the mean of those norms over the channels scales the channel (weight and bias
    start at zero: the identity)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        gx = x.norm(p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias, self.weight, x * nx)


class ConvNeXtV2Block(nn.Module):
    """Depthwise 7×7 → LayerNorm → Linear (4×) → GELU → GRN → Linear, added to the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(self.grn(self.act(self.fc1(y))))
        return x + y.permute(0, 3, 1, 2)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (through channels-last, as timm's)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtV2FMnist(nn.Module):
    """ConvNeXt V2-style: a 2×2 stride-2 stem to 14², two blocks of 32 channels, a 2×2 stride-2
    downsampling to 7², two blocks of 64, pooled, LayerNorm, classifier. Trained on request only
    (``--only convnextv2``): not among the shipped models."""

    OPSET = 17  # LayerNormalization, as timm's ConvNeXt V2 exports

    def __init__(self, num_classes: int = NUM_CLASSES, dims=(32, 64), depths=(2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, dims[0], 2, stride=2), LayerNorm2d(dims[0], eps=1e-6))
        self.stage1 = nn.Sequential(*[ConvNeXtV2Block(dims[0]) for _ in range(depths[0])])
        self.down = nn.Sequential(LayerNorm2d(dims[0], eps=1e-6), nn.Conv2d(dims[0], dims[1], 2, stride=2))
        self.stage2 = nn.Sequential(*[ConvNeXtV2Block(dims[1]) for _ in range(depths[1])])
        self.norm = nn.LayerNorm(dims[1], eps=1e-6)
        self.fc = nn.Linear(dims[1], num_classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(self.norm(x.mean((2, 3))))


EXTRA_MODELS = {"shufflenet": ("shufflenet_fmnist", ShuffleNetFMnist),  # --only trains these; not shipped
                "vgg_gn": ("vgg_gn_fmnist", VGGGroupNormFMnist),
                "convnextv2": ("convnextv2_fmnist", ConvNeXtV2FMnist)}


# --------------------------------------------------------------------------- training
def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(torch.from_numpy(x[i:i + batch]))
        correct += int((logits.argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


def train(model: nn.Module, xtr, ytr, xte, yte, *, epochs: int, lr: float, batch: int,
          seed: int, max_minutes: float | None, tag: str) -> dict:
    rng = np.random.default_rng(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = len(xtr) // batch  # drop last partial batch
    total = epochs * steps_per_epoch
    warm = steps_per_epoch  # 1 epoch linear warm-up

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * lr * (1.0 + np.cos(np.pi * t))

    # channels_last is ~1.3-1.8x faster for these small convs on CPU (oneDNN)
    model.to(memory_format=torch.channels_last)
    t0 = time.time()
    step = 0
    hist = []
    for ep in range(epochs):
        model.train()
        xa = augment(xtr, rng)
        perm = rng.permutation(len(xtr))
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * batch:(b + 1) * batch]
            xb = torch.from_numpy(xa[idx]).contiguous(memory_format=torch.channels_last)
            yb = torch.from_numpy(ytr[idx])
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            if b % 100 == 0:
                print(f"[{tag}] ep {ep + 1}/{epochs} step {b}/{steps_per_epoch} "
                      f"loss {loss_sum / seen:.4f} lr {lr_at(step):.4f} "
                      f"t {time.time() - t0:.0f}s", flush=True)
        acc = evaluate(model, xte, yte)
        el = time.time() - t0
        hist.append((ep + 1, loss_sum / seen, correct / seen, acc, el))
        print(f"[{tag}] epoch {ep + 1}/{epochs} train_loss {loss_sum / seen:.4f} "
              f"train_acc {correct / seen:.4f} test_acc {acc:.4f} elapsed {el:.0f}s", flush=True)
        if max_minutes is not None and el > max_minutes * 60 and ep + 1 < epochs:
            print(f"[{tag}] WARNING: time cap {max_minutes} min reached, stopping early "
                  f"(LR schedule not finished)", flush=True)
            break
    model.to(memory_format=torch.contiguous_format)
    return {"epochs_run": len(hist), "train_seconds": time.time() - t0, "history": hist}


# --------------------------------------------------------------------------- export
def export_onnx(model: nn.Module, path: str, keep_bn: bool) -> None:
    import onnx

    model.eval()
    dummy = torch.zeros(2, 1, 28, 28)
    kwargs = dict(
        input_names=["input"],
        output_names=["logits"],
        opset_version=getattr(model, "OPSET", 13),
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )
    if keep_bn:
        # PRESERVE keeps BatchNormalization nodes; the model is in eval mode so they
        # are exported in inference form (running mean/var). Constant folding off so
        # the exporter does not fuse them into Conv.
        kwargs.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    else:
        kwargs.update(training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True)
    try:
        torch.onnx.export(model, (dummy,), path, dynamo=False, **kwargs)
    except TypeError:  # very old torch without the `dynamo` argument
        torch.onnx.export(model, (dummy,), path, **kwargs)
    m = onnx.load(path)
    _inline_identity_initializers(m)
    # give the graph a readable name and doc string
    m.graph.name = os.path.splitext(os.path.basename(path))[0]
    m.doc_string = ("Fashion-MNIST classifier trained by onnxprune tools/train_fashion_mnist.py; "
                    f"input [N,1,28,28] normalised (x/255 - {MEAN}) / {STD}")
    onnx.save(m, path)
    onnx.checker.check_model(onnx.load(path), full_check=True)


def _inline_identity_initializers(m) -> None:
    """Replace ``Identity(initializer)`` nodes by a private copy of the initializer.

    The TorchScript exporter de-duplicates initializers with identical contents and
    re-creates the duplicates with Identity nodes.  In the ResNet this happens for the
    bias of ``bn2`` and of the projection-shortcut BN of a downsampling block: both
    feed the same Add, so they receive identical gradients and stay bit-identical.
    Keeping the graph free of such Identity nodes makes it plain Conv/BN/Relu/Add/...
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in m.graph.initializer}
    keep = []
    for n in m.graph.node:
        if n.op_type == "Identity" and n.input[0] in inits:
            arr = numpy_helper.to_array(inits[n.input[0]]).copy()
            m.graph.initializer.append(numpy_helper.from_array(arr, n.output[0]))
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)


def verify_onnx(model: nn.Module, path: str, xte: np.ndarray, yte: np.ndarray) -> dict:
    import onnx
    import onnxruntime as ort

    m = onnx.load(path)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    model.eval()
    max_diff = 0.0
    correct = 0
    for i in range(0, len(xte), 500):
        xb = xte[i:i + 500]
        (onnx_out,) = sess.run(["logits"], {"input": xb})
        with torch.no_grad():
            pt_out = model(torch.from_numpy(xb)).numpy()
        max_diff = max(max_diff, float(np.abs(onnx_out - pt_out).max()))
        correct += int((onnx_out.argmax(1) == yte[i:i + 500]).sum())
    # odd batch sizes to exercise the dynamic batch axis
    for bs in (1, 3, 7):
        (o,) = sess.run(["logits"], {"input": xte[:bs]})
        assert o.shape == (bs, NUM_CLASSES), o.shape
    return {
        "ops": ops,
        "max_abs_diff": max_diff,
        "onnx_test_acc": correct / len(xte),
        "size_bytes": os.path.getsize(path),
        "n_params": sum(p.numel() for p in model.parameters()),
    }


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per model (default: 10)")
    p.add_argument("--out-dir", default="models")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--only", choices=sorted({**MODELS, **EXTRA_MODELS}), default=None, help="train only one model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="per-model wall-time cap; stops after the epoch that crosses it")
    p.add_argument("--train-subset", type=int, default=None,
                   help="use only the first N training images (for quick smoke runs)")
    p.add_argument("--no-data-files", action="store_true",
                   help="do not (re)write fmnist_calib.npy / fmnist_calib_2k.npz / fmnist_test.npz")
    p.add_argument("--data-only", action="store_true", help="only (re)write the data files, train nothing")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    set_seeds(args.seed)

    xtr, ytr = load_split(args.data_dir, "train")
    xte, yte = load_split(args.data_dir, "test")
    print(f"train {xtr.shape} test {xte.shape} torch {torch.__version__} threads {torch.get_num_threads()}",
          flush=True)

    if not args.no_data_files:
        calib_rng = np.random.default_rng(12345)
        calib_idx = np.sort(calib_rng.choice(len(xtr), size=512, replace=False))
        np.save(os.path.join(args.out_dir, "fmnist_calib.npy"), xtr[calib_idx].astype(np.float32))
        calib_2k = np.sort(np.random.default_rng(54321).choice(len(xtr), size=2048, replace=False))
        np.savez_compressed(os.path.join(args.out_dir, "fmnist_calib_2k.npz"), input=xtr[calib_2k].astype(np.float32))
        np.savez_compressed(os.path.join(args.out_dir, "fmnist_test.npz"),
                            x=xte[:2000].astype(np.float32), y=yte[:2000].astype(np.int64))
        print("wrote fmnist_calib.npy, fmnist_calib_2k.npz and fmnist_test.npz", flush=True)
    if args.data_only:
        return 0

    if args.train_subset:
        xtr, ytr = xtr[:args.train_subset], ytr[:args.train_subset]

    results = {}
    for key in ([args.only] if args.only else list(MODELS)):
        name, cls = {**MODELS, **EXTRA_MODELS}[key]
        set_seeds(args.seed)
        model = cls()
        epochs = args.epochs if args.epochs is not None else 10
        info = train(model, xtr, ytr, xte, yte, epochs=epochs, lr=args.lr, batch=args.batch_size,
                     seed=args.seed, max_minutes=args.max_minutes, tag=name)
        path = os.path.join(args.out_dir, f"{name}.onnx")
        export_onnx(model, path, keep_bn=(key == "resnet"))
        v = verify_onnx(model, path, xte, yte)
        info.update(v)
        results[name] = info
        print(f"[{name}] exported {path} ({v['size_bytes'] / 1e6:.2f} MB, {v['n_params']} params) "
              f"ops {v['ops']} max|onnx-torch| {v['max_abs_diff']:.2e} "
              f"onnxruntime test acc (10k) {v['onnx_test_acc']:.4f} "
              f"train time {info['train_seconds'] / 60:.1f} min", flush=True)
        if v["max_abs_diff"] >= 1e-4:
            print(f"[{name}] WARNING: ONNX/PyTorch mismatch {v['max_abs_diff']:.2e} >= 1e-4", flush=True)

    print("SUMMARY", flush=True)
    for name, info in results.items():
        print(f"  {name}: onnx_test_acc={info['onnx_test_acc']:.4f} epochs={info['epochs_run']} "
              f"train_min={info['train_seconds'] / 60:.1f} size={info['size_bytes']} "
              f"max_abs_diff={info['max_abs_diff']:.2e} ops={info['ops']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
