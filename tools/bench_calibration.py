"""How much calibration data pruning needs: test accuracy of each shipped model at each speedup
with 128, 512 and 2048 calibration images (CLI defaults otherwise, no fine-tuning).

    python tools/bench_calibration.py [--sizes 128 512 2048] [--speedups 1.5 2] [--seeds 0] [--methods lasso obs]
                                      [--no-refine] [--refine-tail] [--mixtures R] [--cli-rounding] [--allocation greedy]

The images are the first N of ``models/fmnist_calib_2k.npz`` (2048 seeded training images).
Prints a markdown table: accuracy, drop from the original, held-out top-1 agreement, the thinnest
refit's samples per unknown and the pruning time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fmnist import ROOT, accuracy, print_header, test_set

import onnxprune
from onnxprune.options import ALLOCATIONS
from onnxprune.runtime import default_round_to


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vgg_fmnist", "resnet_fmnist", "mobilenet_fmnist"])
    ap.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[128, 512, 2048])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--methods", nargs="+", default=["lasso"], help="channel selection methods to compare")
    ap.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                    help="refine residual branches' convs together (default on; --no-refine to compare)")
    ap.add_argument("--refine-tail", action=argparse.BooleanOptionalAction, default=False,
                    help="tune the last layers of a plain chain together (the package's --refine-tail; default off)")
    ap.add_argument("--mixtures", type=float, default=1.0,
                    help="blends of two fit images added per fit image (default 1; 0 to compare)")
    ap.add_argument("--cli-rounding", action="store_true",
                    help="widths rounded as the CLI rounds them on CPU (multiples of 16, finer where a target needs it)")
    ap.add_argument("--allocation", default="sensitivity", choices=list(ALLOCATIONS),
                    help="how widths are chosen (default: the search over sensitivity curves; greedy to compare)")
    args = ap.parse_args()
    x, y, source = test_set()
    pool = np.load(ROOT / "models" / "fmnist_calib_2k.npz")["input"]
    print_header(source, "calibration: the first N images of models/fmnist_calib_2k.npz",
                 ["model", "method", "target", "images", "seed", "top-1 %", "drop", "held-out agreement",
                  "samples/unknown (thinnest refit)", "time s"])
    rounding = {"round_to": default_round_to("cpu"), "relax_round_to": True} if args.cli_rounding else {}
    for name in args.models:
        path = ROOT / "models" / f"{name}.onnx"
        base = accuracy(path.read_bytes(), x, y)
        for speedup in args.speedups:
            for size in args.sizes:
                for method, seed in [(m, s) for m in args.methods for s in args.seeds]:
                    start = time.perf_counter()
                    result = onnxprune.prune(str(path), np.ascontiguousarray(pool[:size]), speedup=speedup,
                                             seed=seed, method=method, refine=args.refine, refine_tail=args.refine_tail,
                                             mixtures=args.mixtures,
                                             allocation=args.allocation,
                                             measure_latency=False, progress=False, **rounding)
                    took = time.perf_counter() - start
                    acc = accuracy(result.model.SerializeToString(), x, y)
                    agree = result.report.fidelity[0].top1_agreement
                    thin = result.report.thinnest_refit()
                    spu = f"{thin.samples_per_unknown:.2f}" if thin else "-"
                    print(f"| {name} | {method} | {speedup:g}x | {size} | {seed} | {acc:.2f} | {acc - base:+.2f} | "
                          f"{agree:.3f} | {spu} | {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
