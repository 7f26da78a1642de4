"""Time and peak memory of pruning a 224×224 ResNet-50-shaped graph (random weights).

    python tools/bench_scale.py --images 256 --speedup 2

Prints the machine, wall time, peak resident memory and the pruning report.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from graphs import resnet50  # noqa: E402

import onnxprune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--method", default="lasso")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    model = resnet50(args.size)
    x = np.random.default_rng(0).normal(size=(args.images, 3, args.size, args.size)).astype(np.float32)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = onnxprune.prune(model, x, speedup=args.speedup, method=args.method, progress=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(result.report.table(max_rows=10))
    print(f"images {args.images} at {args.size}x{args.size}: pruning took {wall:.0f} s, peak RSS {peak:.0f} MiB "
          f"(model + calibration data before pruning: {rss0:.0f} MiB)")


if __name__ == "__main__":
    main()
