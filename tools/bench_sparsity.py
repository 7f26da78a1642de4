"""Accuracy of the shipped models pruned 2x, then made 2:4 sparse (``--sparsity 2:4``), no fine-tuning.

    python tools/bench_sparsity.py [--speedup 2] [--models vgg_fmnist resnet_fmnist mobilenet_fmnist] [--both]
                                   [--max-layer-error 0.15]

``--both`` adds a column with ``--sparsity 2:4 --quantize int8`` together; ``--max-layer-error``
overrides :data:`onnxprune.sparsity.MAX_LAYER_ERROR` (the error a layer's 2:4 form may add) to
trade sparse MACs against accuracy.

Same calibration file, seed and widths (multiples of 4) for both rows of a model (the sparse run
prunes the same way, then sparsifies). Prints a markdown table: top-1 of the original, pruned, pruned + 2:4, the
difference, how many Conv/Gemm/MatMul layers went sparse (and their share of the MACs) and the
sparsity stage's wall time (the others stay dense, with the
reason in the JSON report). Speed is not measured: 2:4 kernels need TensorRT on an Ampere+ GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fmnist import ROOT, accuracy, print_header, test_set

import onnxprune
from onnxprune import sparsity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vgg_fmnist", "resnet_fmnist", "mobilenet_fmnist"])
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--calib", default=str(ROOT / "models" / "fmnist_calib.npy"))
    ap.add_argument("--both", action="store_true", help="also prune + 2:4 + int8 (cpu scheme)")
    ap.add_argument("--max-layer-error", type=float, default=None,
                    help=f"bound on the error a layer's 2:4 form adds (default {sparsity.MAX_LAYER_ERROR})")
    args = ap.parse_args()
    if args.max_layer_error is not None:
        sparsity.MAX_LAYER_ERROR = args.max_layer_error
    x, y, source = test_set()
    print_header(source, f"calibration {args.calib}, --speedup {args.speedup:g}",
                 ["model", "original", "pruned", "pruned + 2:4", "2:4 − pruned", "sparse layers",
                  "share of MACs in sparse layers", "2:4 stage s"] + (["+ 2:4 + int8", "both − pruned"] if args.both else []))
    for name in args.models:
        path = str(ROOT / "models" / f"{name}.onnx")
        base = accuracy(Path(path).read_bytes(), x, y)
        pruned = onnxprune.prune(path, args.calib, speedup=args.speedup, round_to=4, measure_latency=False,
                                 progress=False)
        sparse = onnxprune.prune(path, args.calib, speedup=args.speedup, round_to=4, sparsity="2:4",
                                 measure_latency=False, progress=False)
        a, b = accuracy(pruned.model.SerializeToString(), x, y), accuracy(sparse.model.SerializeToString(), x, y)
        layers = sparse.report.sparsity
        sparse_nodes = {layer["node"] for layer in layers if not layer["skipped"]}
        macs = {row.node: row.macs[1] for row in sparse.report.layers}
        share = sum(macs.get(n, 0) for n in sparse_nodes) / max(sum(macs.values()), 1)
        row = (f"| {name} | {base:.2f} | {a:.2f} | {b:.2f} | {b - a:+.2f} | {len(sparse_nodes)} of {len(layers)} | "
               f"{share:.0%} | {sparse.report.phases.get('sparsity', float('nan')):.1f} |")
        if args.both:
            both = onnxprune.prune(path, args.calib, speedup=args.speedup, round_to=4, sparsity="2:4", quantize="int8",
                                   measure_latency=False, progress=False)
            c = accuracy(both.model.SerializeToString(), x, y)
            row += f" {c:.2f} | {c - a:+.2f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
