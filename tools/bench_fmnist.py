"""Accuracy of the shipped Fashion-MNIST models after pruning, per method and speedup (no fine-tuning).

    python tools/bench_fmnist.py [--speedups 1.5 2 3] [--models vgg_fmnist resnet_fmnist mobilenet_fmnist]

Evaluates on the full 10k Fashion-MNIST test set when Debian's dataset-fashion-mnist is
installed, otherwise on the 2000 test images shipped in models/fmnist_test.npz. Prints a
markdown table (accuracy, achieved MACs speedup, measured CPU latency speedup, pruning time).
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxprune

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
CONFIGS = [("lasso", True), ("thinet", True), ("l1", True), ("l1", False), ("random", False)]


def test_set() -> tuple[np.ndarray, np.ndarray, str]:
    images, labels = DATA / "t10k-images-idx3-ubyte.gz", DATA / "t10k-labels-idx1-ubyte.gz"
    if images.exists() and labels.exists():
        with gzip.open(images) as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
        with gzip.open(labels) as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
        return ((x.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32), y, "Fashion-MNIST test set (10000)"
    z = np.load(ROOT / "models" / "fmnist_test.npz")
    return z["x"], z["y"], f"models/fmnist_test.npz ({len(z['y'])})"


def accuracy(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    hits = 0
    for i in range(0, len(x), 500):
        hits += int((sess.run(None, {name: x[i:i + 500]})[0].argmax(1) == y[i:i + 500]).sum())
    return 100.0 * hits / len(x)


def print_header(source: str, details: str, columns: list[str]) -> None:
    """The machine and data a benchmark ran on, then a markdown table header."""
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; onnxruntime {ort.__version__}; "
          f"evaluated on {source}; {details}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vgg_fmnist", "resnet_fmnist", "mobilenet_fmnist"])
    ap.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    ap.add_argument("--calib", default=str(ROOT / "models" / "fmnist_calib.npy"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--allocation", choices=["uniform", "sensitivity"], default="uniform",
                    help="per-layer widths (tools/bench_allocation.py compares the two)")
    ap.add_argument("--plot", help="also write accuracy vs MACs speedup as a PNG here (needs matplotlib)")
    args = ap.parse_args()
    points: list[tuple[str, str, float, float]] = []  # (model, method label, MACs speedup, top-1)
    x, y, source = test_set()
    print_header(source, f"calibration {args.calib}; allocation {args.allocation}",
                 ["model", "method", "reconstruct", "target", "MACs speedup", "latency speedup", "top-1 %", "drop",
                  "time s"])
    for name in args.models:
        path = ROOT / "models" / f"{name}.onnx"
        base = accuracy(path.read_bytes(), x, y)
        print(f"| {name} | original | | | 1.00 | 1.00 | {base:.2f} | | |")
        points += [(name, f"{m}{'' if r else ' (no refit)'}", 1.0, base) for m, r in CONFIGS]
        for speedup in args.speedups:
            for method, rec in CONFIGS:
                start = time.perf_counter()
                result = onnxprune.prune(str(path), args.calib, speedup=speedup, method=method,
                                         reconstruct=rec, seed=args.seed, allocation=args.allocation,
                                         progress=False)
                took = time.perf_counter() - start
                acc = accuracy(result.model.SerializeToString(), x, y)
                t = result.report.totals
                print(f"| {name} | {method} | {'yes' if rec else 'no'} | {speedup:g}x | {t.macs_speedup:.2f} | "
                      f"{t.latency_speedup:.2f} | {acc:.2f} | {acc - base:+.2f} | {took:.1f} |", flush=True)
                points.append((name, f"{method}{'' if rec else ' (no refit)'}", t.macs_speedup, acc))
    if args.plot:
        plot(points, args.plot)


def plot(points: list[tuple[str, str, float, float]], path: str) -> None:
    """One panel per model: top-1 accuracy against MACs speedup, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(p[0] for p in points))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for label in dict.fromkeys(p[1] for p in points if p[0] == model):
            xs, ys = zip(*sorted((p[2], p[3]) for p in points if p[0] == model and p[1] == label))
            ax.plot(xs, ys, marker="o", label=label, linestyle="--" if "no refit" in label else "-")
        ax.set(title=f"{model} (no fine-tuning)", xlabel="MACs speedup", ylabel="Fashion-MNIST top-1 %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
