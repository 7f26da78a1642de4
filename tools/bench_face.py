"""Pruning trained mobile face detectors from GitHub: Ultra-Light-Fast-Generic-Face-Detector-1MB and SCRFD.

    git clone --depth 1 https://github.com/Linzaer/Ultra-Light-Fast-Generic-Face-Detector-1MB /tmp/ulfd
    git clone --depth 1 https://github.com/hpc203/scrfd-opencv /tmp/scrfd    # for the SCRFD models
    python tools/bench_face.py --repo /tmp/ulfd [--scrfd /tmp/scrfd] [--models RFB-320 slim-320 scrfd_500m_kps]
                               [--speedups 1.2 1.5 2] [--latency]

The repository (MIT) carries its trained detectors as ONNX files exported by PyTorch at opset 9
(``models/onnx/version-RFB-320.onnx``, ``version-slim-320.onnx``: SSD-style heads on a
MobileNet-like backbone of depthwise convs, the RFB version with receptive-field blocks; 3×240×320
in, batch 1; ``scores`` ``[1, 4420, 2]`` after a Softmax and decoded ``boxes`` out), and the
photos its demo runs on (``imgs/*.jpg``: group photos, about 30 faces each at this size). The
second repository (no license stated; InsightFace releases its pretrained SCRFD models for
non-commercial research, which a benchmark is) carries InsightFace's SCRFD detectors with keypoints
(``weights/scrfd_500m_kps.onnx``, ``scrfd_2.5g_kps.onnx``: 3×640×640 in, sigmoid scores, box
distances and keypoints at strides 8 / 16 / 32 out), scored on the same photos.

Data: the photos split by ``--seed`` into 16 for calibration and the rest for testing;
calibration samples are random crops (35–100 % of the area, mirrored half the time) of the 16,
test samples each test photo whole, mirrored, and in three random crops; all resized to the
model's input, RGB, ``(x − 127) / 128`` as the repository's ``detect_imgs_onnx.py`` prepares them
(SCRFD: ``(x − 127.5) / 128``, as hpc203's ``main.py``). The score: F1 of the pruned model's faces
against the original model's own on the test samples (probability above 0.7, NMS at IoU 0.3 as
that script decodes them; SCRFD: above 0.5, NMS at 0.4, boxes from the anchor centres and the
distances times the stride; a face matches at IoU ≥ 0.5). The photos have no labels the
detectors were trained to; what the pruned model must keep is what the original finds. Also
printed: the report's held-out check (the largest relative error over the outputs and the
smallest IoU of the anchors a score map marks as faces, the region above 0.5) and the test
samples' largest relative error over the outputs. ``onnxprune.prune`` with its API defaults
unless ``--prune-args`` says otherwise.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import onnxprune
from bench_ocr import add_prune_options, box_iou, largest_relative_error, latency_cell, outputs_of, prune_kwargs

CALIB_PHOTOS = 16


@dataclass(frozen=True)
class Detector:
    """Where a model lives, what it reads and how its faces are decoded."""

    repo: str  # "ulfd" or "scrfd": which clone holds it
    file: str
    size: tuple[int, int]  # width, height
    mean: float
    faces: Callable[[list[np.ndarray]], list[np.ndarray]]  # the outputs -> per sample, face boxes


def nms(boxes: np.ndarray, scores: np.ndarray, overlap: float) -> np.ndarray:
    """Greedy NMS: the boxes kept, best first."""
    order, kept = np.argsort(-scores), []
    while order.size:
        kept.append(order[0])
        order = order[1:][box_iou(boxes[order[0]], boxes[order[1:]]) <= overlap]
    return boxes[kept]


def ssd_faces(outputs: list[np.ndarray]) -> list[np.ndarray]:
    """Ultra-Light's decoded ``scores`` and ``boxes``: probability above 0.7, NMS at IoU 0.3."""
    scores, boxes = outputs
    return [nms(bx[sc[:, 1] > 0.7], sc[sc[:, 1] > 0.7, 1], 0.3) for sc, bx in zip(scores, boxes)]


def scrfd_faces(outputs: list[np.ndarray], size: int = 640) -> list[np.ndarray]:
    """SCRFD's scores and box distances at strides 8 / 16 / 32 (two anchors per position):
    probability above 0.5, NMS at IoU 0.4."""
    found = []
    for k in range(len(outputs[0])):
        boxes, scores = [], []
        for i, stride in enumerate((8, 16, 32)):
            score, dist = outputs[i][k][:, 0], outputs[3 + i][k] * stride
            n = size // stride
            ys, xs = np.mgrid[:n, :n]
            centres = np.repeat(np.stack([xs.ravel(), ys.ravel()], 1) * stride, 2, axis=0).astype(np.float32)
            keep = score > 0.5
            boxes.append(np.concatenate([centres[keep] - dist[keep, :2], centres[keep] + dist[keep, 2:]], 1))
            scores.append(score[keep])
        found.append(nms(np.concatenate(boxes), np.concatenate(scores), 0.4))
    return found


DETECTORS = {
    "RFB-320": Detector("ulfd", "models/onnx/version-RFB-320.onnx", (320, 240), 127.0, ssd_faces),
    "slim-320": Detector("ulfd", "models/onnx/version-slim-320.onnx", (320, 240), 127.0, ssd_faces),
    "scrfd_500m_kps": Detector("scrfd", "weights/scrfd_500m_kps.onnx", (640, 640), 127.5, scrfd_faces),
    "scrfd_2.5g_kps": Detector("scrfd", "weights/scrfd_2.5g_kps.onnx", (640, 640), 127.5, scrfd_faces),
}


def prepare(img: Image.Image, size: tuple[int, int], mean: float) -> np.ndarray:
    """``[3, H, W]`` float32 as the repositories' demos feed the models."""
    rgb = np.asarray(img.convert("RGB").resize(size, Image.BILINEAR), np.float32)
    return ((rgb - mean) / 128).transpose(2, 0, 1)


def crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop of 35–100 % of the photo's area, mirrored half the time."""
    w, h = img.size
    side = np.sqrt(rng.uniform(0.35, 1.0))
    cw, ch = int(w * side), int(h * side)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    part = img.crop((x0, y0, x0 + cw, y0 + ch))
    return part.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else part


def data(repo: Path, n_calib: int, seed: int, size: tuple[int, int], mean: float) -> tuple[np.ndarray, np.ndarray]:
    """Calibration and test samples (module docs)."""
    photos = [Image.open(p) for p in sorted((repo / "imgs").glob("*.jpg"))]
    if len(photos) <= CALIB_PHOTOS:
        raise SystemExit(f"{repo / 'imgs'} holds {len(photos)} photos; the repository's demo has 24")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(photos))
    calib = [photos[i] for i in order[:CALIB_PHOTOS]]
    x = np.stack([prepare(crop(calib[i % CALIB_PHOTOS], rng), size, mean) for i in range(n_calib)])
    test = []
    for i in order[CALIB_PHOTOS:]:
        test += [prepare(photos[i], size, mean), prepare(photos[i].transpose(Image.FLIP_LEFT_RIGHT), size, mean)]
        test += [prepare(crop(photos[i], rng), size, mean) for _ in range(3)]
    return x, np.stack(test)


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
    ap.add_argument("--repo", type=Path, required=True, help="a clone of Ultra-Light's repository (module docs)")
    ap.add_argument("--scrfd", type=Path, help="a clone of hpc203/scrfd-opencv, for the SCRFD models")
    ap.add_argument("--models", nargs="+", default=["RFB-320", "slim-320"], choices=list(DETECTORS))
    ap.add_argument("--speedups", nargs="+", type=float, default=[1.2, 1.5, 2.0])
    ap.add_argument("--calib", type=int, default=128, help="calibration samples (crops of 16 photos; default 128)")
    ap.add_argument("--seed", type=int, default=0, help="data split, crops and pruning seed (default 0)")
    add_prune_options(ap)
    args = ap.parse_args(argv)
    extra = prune_kwargs(args)
    print("| model | target | MACs speedup | faces (original) | F1 vs original % | held-out rel. error / IoU "
          "| test rel. error | prune s |" + (" latency ms (speedup) |" if args.latency else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.latency else ""))
    for name in args.models:
        det = DETECTORS[name]
        clone = args.scrfd if det.repo == "scrfd" else args.repo
        if clone is None:
            raise SystemExit(f"{name} needs --scrfd (a clone of hpc203/scrfd-opencv)")
        path = str(clone / det.file)
        calib, test = data(args.repo, args.calib, args.seed, det.size, det.mean)
        original = outputs_of(path, test, every=True)
        reference = det.faces(original)
        for speedup in args.speedups:
            start = time.perf_counter()
            result = onnxprune.prune(path, calib, speedup=speedup, seed=args.seed, progress=False,
                                     measure_latency=args.latency, **extra)
            took = time.perf_counter() - start
            outputs = outputs_of(result.model, test, every=True)
            held = result.report.fidelity
            ious = [f.marked_iou for f in held if f.marked_iou is not None]
            iou = f"{min(ious):.3f}" if ious else "–"
            test_rel = largest_relative_error(outputs, original)
            print(f"| {name} | {speedup:g}x | {result.report.totals.macs_speedup:.2f} | "
                  f"{sum(len(r) for r in reference)} | {100 * f1(reference, det.faces(outputs)):.1f} | "
                  f"{max(f.relative_error for f in held):.3f} / {iou} | {test_rel:.3f} | {took:.0f} |"
                  + (f" {latency_cell(result.report)} |" if args.latency else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
