"""Measured latency of pruned models next to their MACs speedup, at batch 1 and a large batch.

    python tools/bench_latency.py [--speedups 1.5 2 3] [--batches 1 32] [--models vgg_fmnist resnet_fmnist]
    python tools/bench_latency.py --models /tmp/zoo/resnet50_op17.onnx --images 16 --speedups 2

Prunes each model with the default method (shipped models: on models/fmnist_calib.npy; other
paths: on random images of the model's input shape, 224² where dynamic, so their weights and
accuracy are meaningless but their shapes and latency are real), then times original and pruned
model on the ONNX Runtime provider in one process, in alternating blocks of runs, the 10th percentile of
each (the runs nothing interrupted; their ratio is the speedup, as onnxprune's report takes it).
Prints the machine and a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from onnxprune.calib import model_inputs
from onnxprune.latency import default_round_to, measure, physical_cores
from onnxprune.latency import speedup as measured_speedup

from bench_fmnist import ROOT, print_header


def calibration(model: onnx.ModelProto, name: str, images: int) -> np.ndarray:
    """The shipped calibration images for shipped models, random ones of the input shape otherwise."""
    if (ROOT / "models" / f"{name}.onnx").exists():
        return np.load(ROOT / "models" / "fmnist_calib.npy")[:images]
    shape = [d if d is not None else 224 for d in model_inputs(model)[0].shape[1:]]
    return np.random.default_rng(0).normal(size=(images, *shape)).astype(np.float32)


def batch_of(x: np.ndarray, batch: int) -> np.ndarray:
    return x[np.arange(batch) % len(x)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vgg_fmnist", "resnet_fmnist"],
                    help="shipped model names or paths to .onnx files")
    ap.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--round-to", type=int, default=None,
                    help="channel multiple (default: the CLI's for --provider, 16 on cpu)")
    ap.add_argument("--images", type=int, default=512, help="calibration images")
    ap.add_argument("--provider", default="cpu")
    args = ap.parse_args()
    relax = args.round_to is None  # as the CLI: a default rounding gives way where a target needs it
    args.round_to = args.round_to or default_round_to(args.provider)
    columns = ["model", "target", "MACs speedup"]
    for b in args.batches:
        columns += [f"batch {b}: ms before → after", f"batch {b}: measured speedup"]
    print_header("latency only", f"provider {args.provider}, {physical_cores()} ORT threads, "
                 f"round-to {args.round_to}, blocks of runs alternating original/pruned, 10th percentiles", columns + ["prune s"])
    for spec in args.models:
        path = Path(spec) if spec.endswith(".onnx") else ROOT / "models" / f"{spec}.onnx"
        model = onnx.load(path)
        x = calibration(model, path.stem, args.images)
        name = model_inputs(model)[0].name
        for speedup in args.speedups:
            start = time.perf_counter()
            result = onnxprune.prune(model, x, speedup=speedup, round_to=args.round_to, relax_round_to=relax,
                                     measure_latency=False,
                                     progress=False)
            took = time.perf_counter() - start
            cells = [path.stem, f"{speedup:g}x", f"{result.report.totals.macs_speedup:.2f}"]
            for b in args.batches:
                before, after = measure([model, result.model], {name: batch_of(x, b)}, args.provider)
                cells += [f"{before.ms:.2f} → {after.ms:.2f}", f"{measured_speedup(before, after):.2f}"]
            print("| " + " | ".join(cells + [f"{took:.0f}"]) + " |", flush=True)


if __name__ == "__main__":
    main()
