"""Prune every model of the architecture zoo (tools/build_zoo.py) and check the results.

    python tools/build_zoo.py --out /tmp/zoo
    python tools/bench_zoo.py /tmp/zoo --speedups 1.5 2 --images 16

For each model and speedup: prunes with the default method on random calibration images,
checks the result (full checker, ONNX Runtime at the calibration size and, for models with
dynamic spatial dims, a second size; output shapes unchanged) and prints a markdown table of
achieved MACs speedup, pruned groups, barriers and time.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxprune
from onnxprune.calib import model_inputs


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _input(model: onnx.ModelProto, n: int, size: int | None, seed: int) -> np.ndarray:
    shape = [d if d is not None else size for d in model_inputs(model)[0].shape[1:]]
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def check(path: Path, speedup: float, images: int, method: str) -> str:
    model = onnx.load(path)
    dims = model_inputs(model)[0].shape
    dynamic = any(d is None for d in dims[2:])
    size = 256 if "unet" in path.name else 320 if "yolo" in path.name else 224
    x = _input(model, images, size, 0)
    start = time.perf_counter()
    result = onnxprune.prune(model, x, speedup=speedup, method=method, measure_latency=False, progress=False)
    took = time.perf_counter() - start
    onnx.checker.check_model(result.model, full_check=True)
    sizes = [size] + ([size + 64] if dynamic else [])
    for s in sizes:
        probe = _input(model, 2, s, 1)
        ref, out = _run(model, probe), _run(result.model, probe)
        assert [r.shape for r in ref] == [o.shape for o in out], (path.name, s)
    t = result.report.totals
    err = max(f.relative_error for f in result.report.fidelity)
    return (f"| {path.stem} | {speedup:g}x | {t.macs_speedup:.2f} | {len(result.report.groups)} | "
            f"{len(result.report.skipped)} | {err:.3f} | {'x'.join(map(str, sizes))} | {took:.0f} |")


def identity(args) -> None:
    """Keeping every channel must reproduce the outputs (BN folding is the only change)."""
    print("| model | max abs diff | max |output| |")
    print("|---|---|---|")
    for path in sorted(args.zoo.glob("*.onnx")):
        if args.only and not any(o in path.name for o in args.only):
            continue
        model = onnx.load(path)
        size = 256 if "unet" in path.name else 320 if "yolo" in path.name else 224
        x = _input(model, 2, size, 0)
        result = onnxprune.prune(model, x, speedup=1.0, measure_latency=False, progress=False, holdout=0.0)
        ref, out = _run(model, x), _run(result.model, x)
        diff = max(float(np.abs(r - o).max()) for r, o in zip(ref, out))
        print(f"| {path.stem} | {diff:.2e} | {max(float(np.abs(r).max()) for r in ref):.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--identity", action="store_true",
                    help="instead: prune with every channel kept and report the max output difference")
    args = ap.parse_args()
    if args.identity:
        identity(args)
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.images} random calibration images\n")
    print("| model | target | MACs speedup | pruned groups | groups left | rel. output error | sizes run | time s |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(args.zoo.glob("*.onnx")):
        if args.only and not any(o in path.name for o in args.only):
            continue
        for speedup in args.speedups:
            try:
                print(check(path, speedup, args.images, args.method), flush=True)
            except Exception as exc:  # report and go on: this is a survey
                print(f"| {path.stem} | {speedup:g}x | FAILED: {type(exc).__name__}: {str(exc)[:120]} |||||", flush=True)


if __name__ == "__main__":
    main()
