"""How far end-to-end tuning gets a pruned plain chain: onnxprune's result, then its layers from
``--first`` on tuned in PyTorch on the original model's logits (no labels), on the same images.

    python tools/bench_distill.py [--model vgg_fmnist] [--seeds 0 1 2 3] [--steps 400] [--lr 0.015] [--first 4]

The model is pruned as the CLI does (`round_to=16`, relaxed; the tail refinement off), from the
first ``--images`` images of ``models/fmnist_calib_2k.npz``; the pruned chain (Conv / Relu /
MaxPool / Flatten / Gemm only) is rebuilt in PyTorch and its weighted layers from ``--first`` on are tuned by Adam (each layer's rate
``--lr`` times its weights' mean magnitude, decaying on a cosine) on the squared error of the
logits against the original's, half of each batch fresh blends of two images. Prints the test
accuracy drop (10 000 Fashion-MNIST test images where installed) and the relative squared logit
error on 1 024 images neither step has seen (images 512–1535 of the file), before and after.
A probe for docs/benchmarks.md, not a method of the package: needs the ``bench`` extra (torch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import helper, numpy_helper

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from bench_fmnist import ROOT, test_set  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune.runtime import default_round_to  # noqa: E402


def chain_to_torch(model: onnx.ModelProto) -> nn.Sequential:
    """A plain Conv/Relu/MaxPool/Flatten/Gemm chain as a torch module, weights copied."""
    init = {i.name: torch.tensor(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    layers: list[nn.Module] = []
    for node in model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if node.op_type == "Conv":
            w = init[node.input[1]]
            conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride=a.get("strides", [1])[0],
                             padding=a.get("pads", [0])[0])
            conv.weight.data[:], conv.bias.data[:] = w, init[node.input[2]]
            layers.append(conv)
        elif node.op_type == "Relu":
            layers.append(nn.ReLU())
        elif node.op_type == "MaxPool":
            layers.append(nn.MaxPool2d(a["kernel_shape"][0], a["strides"][0]))
        elif node.op_type == "Flatten":
            layers.append(nn.Flatten())
        elif node.op_type == "Gemm":
            w = init[node.input[1]] if a.get("transB", 0) else init[node.input[1]].T
            fc = nn.Linear(w.shape[1], w.shape[0])
            fc.weight.data[:], fc.bias.data[:] = w, init[node.input[2]]
            layers.append(fc)
        else:
            raise SystemExit(f"{node.op_type} is not in the plain chains this probe rebuilds")
    return nn.Sequential(*layers)


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([net(x[i:i + 2000]).argmax(1) for i in range(0, len(x), 2000)])
    return float((pred == y).float().mean()) * 100


def relative_error(net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x) - target).pow(2).sum() / target.pow(2).sum())


def tune(net: nn.Sequential, teacher: nn.Module, images: torch.Tensor, args, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    weighted = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))][args.first:]
    opt = torch.optim.Adam([{"params": list(m.parameters()), "lr": args.lr * m.weight.abs().mean().item()}
                            for m in weighted])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    for _ in range(args.steps):
        batch = images[torch.randint(0, len(images), (args.batch,), generator=gen)]
        other = images[torch.randint(0, len(images), (args.batch,), generator=gen)]
        lam = torch.rand(args.batch, 1, 1, 1, generator=gen) * 0.6 + 0.2
        blend = (torch.rand(args.batch, generator=gen) < 0.5)[:, None, None, None]
        batch = torch.where(blend, lam * batch + (1 - lam) * other, batch)
        with torch.no_grad():
            target = teacher(batch)
        loss = (net(batch) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vgg_fmnist")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.015, help="Adam's rate per layer, times its weights' mean magnitude")
    ap.add_argument("--first", type=int, default=0, help="weighted layers before this one stay as pruned")
    args = ap.parse_args()
    torch.manual_seed(0)
    x_test, y_test, _ = test_set()
    xt, yt = torch.tensor(x_test), torch.tensor(y_test)
    pool = np.ascontiguousarray(np.load(ROOT / "models" / "fmnist_calib_2k.npz")["input"])
    path = ROOT / "models" / f"{args.model}.onnx"
    teacher = chain_to_torch(onnx.load(str(path))).eval()
    unseen = torch.tensor(pool[512:1536])
    with torch.no_grad():
        unseen_target = teacher(unseen)
    base = accuracy(teacher, xt, yt)
    images = torch.tensor(pool[:args.images])
    print(f"{args.model} {args.speedup}x, {args.images} images, layers from {args.first}, {args.steps} steps of "
          f"{args.batch}, rate {args.lr}; original {base:.2f} %")
    drops = []
    for seed in args.seeds:
        result = onnxprune.prune(str(path), pool[:args.images], speedup=args.speedup, seed=seed, refine_tail=False,
                                 measure_latency=False, progress=False, round_to=default_round_to("cpu"),
                                 relax_round_to=True)
        net = chain_to_torch(result.model)
        before = (accuracy(net, xt, yt) - base, relative_error(net, unseen, unseen_target))
        tune(net, teacher, images, args, seed)
        after = (accuracy(net, xt, yt) - base, relative_error(net, unseen, unseen_target))
        drops.append((before[0], after[0]))
        print(f"seed {seed}: drop {before[0]:+.2f} -> {after[0]:+.2f}, unseen error {before[1]:.4f} -> {after[1]:.4f}",
              flush=True)
    mean = np.mean(drops, axis=0)
    print(f"mean drop {mean[0]:+.3f} -> {mean[1]:+.3f}")


if __name__ == "__main__":
    main()
