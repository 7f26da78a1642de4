"""Pruning a trained mobile face detector from GitHub: Ultra-Light-Fast-Generic-Face-Detector-1MB.

    git clone --depth 1 https://github.com/Linzaer/Ultra-Light-Fast-Generic-Face-Detector-1MB /tmp/ulfd
    python tools/bench_face.py --repo /tmp/ulfd [--models RFB-320 slim-320] [--speedups 1.2 1.5 2] [--latency]

The repository (MIT) carries its trained detectors as ONNX files exported by PyTorch at opset 9
(``models/onnx/version-RFB-320.onnx``, ``version-slim-320.onnx``: SSD-style heads on a
MobileNet-like backbone of depthwise convs, the RFB version with receptive-field blocks; 3×240×320
in, batch 1; ``scores`` ``[1, 4420, 2]`` after a Softmax and decoded ``boxes`` out), and the
photos its demo runs on (``imgs/*.jpg``: group photos, about 30 faces each at this size).

Data: the photos split by ``--seed`` into 16 for calibration and the rest for testing;
calibration samples are random crops (35–100 % of the area, mirrored half the time) of the 16,
test samples each test photo whole, mirrored, and in three random crops; all resized to 320×240,
RGB, ``(x − 127) / 128`` as the repository's ``detect_imgs_onnx.py`` prepares them. The score:
F1 of the pruned model's faces against the original model's own on the test samples (probability
above 0.7, NMS at IoU 0.3 as that script decodes them; a face matches at IoU ≥ 0.5). The photos
have no labels the detector was trained to; what the pruned model must keep is what the original
finds. Also printed: the report's held-out check (relative error of ``scores`` and the IoU of
the anchors it marks as faces, the region above 0.5) and the test samples' relative error of
``scores``. ``onnxprune.prune`` with its API defaults unless ``--prune-args`` says otherwise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

import onnxprune
from bench_ocr import box_iou, latency_cell, literal, outputs_of
from onnxprune.runtime import default_round_to

WIDTH, HEIGHT = 320, 240
CALIB_PHOTOS = 16
THRESHOLD, NMS = 0.7, 0.3  # detect_imgs_onnx.py's


def prepare(img: Image.Image) -> np.ndarray:
    """``[3, 240, 320]`` float32 as the repository's demo feeds the model."""
    rgb = np.asarray(img.convert("RGB").resize((WIDTH, HEIGHT), Image.BILINEAR), np.float32)
    return ((rgb - 127) / 128).transpose(2, 0, 1)


def crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop of 35–100 % of the photo's area, mirrored half the time."""
    w, h = img.size
    side = np.sqrt(rng.uniform(0.35, 1.0))
    cw, ch = int(w * side), int(h * side)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    part = img.crop((x0, y0, x0 + cw, y0 + ch))
    return part.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else part


def data(repo: Path, n_calib: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibration and test samples (module docs)."""
    photos = [Image.open(p) for p in sorted((repo / "imgs").glob("*.jpg"))]
    if len(photos) <= CALIB_PHOTOS:
        raise SystemExit(f"{repo / 'imgs'} holds {len(photos)} photos; the repository's demo has 24")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(photos))
    calib = [photos[i] for i in order[:CALIB_PHOTOS]]
    x = np.stack([prepare(crop(calib[i % CALIB_PHOTOS], rng)) for i in range(n_calib)])
    test = []
    for i in order[CALIB_PHOTOS:]:
        test += [prepare(photos[i]), prepare(photos[i].transpose(Image.FLIP_LEFT_RIGHT))]
        test += [prepare(crop(photos[i], rng)) for _ in range(3)]
    return x, np.stack(test)


def faces(scores: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """Per sample, the boxes of the faces found: probability above 0.7, greedy NMS at IoU 0.3."""
    found = []
    for sc, bx in zip(scores, boxes):
        keep = sc[:, 1] > THRESHOLD
        b, p = bx[keep], sc[keep, 1]
        order, kept = np.argsort(-p), []
        while order.size:
            kept.append(order[0])
            order = order[1:][box_iou(b[order[0]], b[order[1:]]) <= NMS]
        found.append(b[kept])
    return found


def f1(reference: list[np.ndarray], found: list[np.ndarray]) -> float:
    """F1 of ``found`` against ``reference``, each face matched once at IoU ≥ 0.5."""
    matched = total = 0
    for ref, got in zip(reference, found):
        total += len(ref) + len(got)
        free = list(got)
        for box in ref:
            if free:
                overlap = box_iou(box, np.array(free))
                if overlap.max() >= 0.5:
                    free.pop(int(overlap.argmax()))
                    matched += 1
    return 2 * matched / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True, help="a clone of the repository (module docs)")
    ap.add_argument("--models", nargs="+", default=["RFB-320", "slim-320"])
    ap.add_argument("--speedups", nargs="+", type=float, default=[1.2, 1.5, 2.0])
    ap.add_argument("--calib", type=int, default=128, help="calibration samples (crops of 16 photos; default 128)")
    ap.add_argument("--seed", type=int, default=0, help="data split, crops and pruning seed (default 0)")
    ap.add_argument("--latency", action="store_true",
                    help="also measure ORT CPU latency at batch 1 (the report's), with the CLI's rounding")
    ap.add_argument("--prune-args", default="", help="extra onnxprune.prune keyword arguments, k=v,k=v")
    args = ap.parse_args(argv)
    extra = {k: literal(v) for k, v in (kv.split("=", 1) for kv in args.prune_args.split(",") if kv)}
    if args.latency:
        extra = {"round_to": default_round_to("cpu"), "relax_round_to": True, **extra}
    calib, test = data(args.repo, args.calib, args.seed)
    print("| model | target | MACs speedup | faces (original) | F1 vs original % | held-out rel. error / IoU "
          "| test rel. error | prune s |" + (" latency ms (speedup) |" if args.latency else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.latency else ""))
    for name in args.models:
        path = str(args.repo / "models" / "onnx" / f"version-{name}.onnx")
        scores, boxes = outputs_of(path, test, every=True)
        reference = faces(scores, boxes)
        for speedup in args.speedups:
            start = time.perf_counter()
            result = onnxprune.prune(path, calib, speedup=speedup, seed=args.seed, progress=False,
                                     measure_latency=args.latency, **extra)
            took = time.perf_counter() - start
            pruned_scores, pruned_boxes = outputs_of(result.model, test, every=True)
            held = next(f for f in result.report.fidelity if f.name == "scores")
            iou = f"{held.marked_iou:.3f}" if held.marked_iou is not None else "–"
            test_rel = float(np.linalg.norm(pruned_scores - scores) / np.linalg.norm(scores))
            print(f"| {name} | {speedup:g}x | {result.report.totals.macs_speedup:.2f} | "
                  f"{sum(len(r) for r in reference)} | {100 * f1(reference, faces(pruned_scores, pruned_boxes)):.1f} | "
                  f"{held.relative_error:.3f} / {iou} | {test_rel:.3f} | {took:.0f} |"
                  + (f" {latency_cell(result.report)} |" if args.latency else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
