"""Uniform vs sensitivity allocation (searched, and by its greedy descent alone) on the shipped
models: test accuracy at the same MACs target.

    python tools/bench_allocation.py [--speedups 2 3] [--calib models/fmnist_calib.npy]

Prints a markdown table (accuracy on the Fashion-MNIST test set, MACs reached, pruning time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fmnist import ROOT, accuracy, print_header, test_set  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune.options import ALLOCATIONS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vgg_fmnist", "resnet_fmnist"])
    ap.add_argument("--speedups", nargs="+", type=float, default=[2.0, 3.0])
    ap.add_argument("--calib", default=str(ROOT / "models" / "fmnist_calib.npy"))
    args = ap.parse_args()
    x, y, source = test_set()
    print_header(source, f"calibration {args.calib}",
                 ["model", "target", "allocation", "MACs speedup", "top-1 %", "drop", "time s"])
    for name in args.models:
        path = ROOT / "models" / f"{name}.onnx"
        base = accuracy(path.read_bytes(), x, y)
        for speedup in args.speedups:
            for allocation in ALLOCATIONS:
                start = time.perf_counter()
                result = onnxprune.prune(str(path), args.calib, speedup=speedup, allocation=allocation,
                                         measure_latency=False, progress=False)
                took = time.perf_counter() - start
                acc = accuracy(result.model.SerializeToString(), x, y)
                print(f"| {name} | {speedup:g}x | {allocation} | {result.report.totals.macs_speedup:.2f} | "
                      f"{acc:.2f} | {acc - base:+.2f} | {took:.1f} |", flush=True)


if __name__ == "__main__":
    main()
