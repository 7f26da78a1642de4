"""Pruning trained mobile face detectors from GitHub: Ultra-Light-Fast-Generic-Face-Detector-1MB,
SCRFD and YuNet (and YOLO-FastestV2, a COCO object detector, on the same photos).

    git clone --depth 1 https://github.com/Linzaer/Ultra-Light-Fast-Generic-Face-Detector-1MB /tmp/ulfd
    git clone --depth 1 https://github.com/hpc203/scrfd-opencv /tmp/scrfd    # for the SCRFD models
    git clone --depth 1 https://github.com/ShiqiYu/libfacedetection.train /tmp/lfd    # for YuNet
    git clone --depth 1 https://github.com/hpc203/yolo-fastestv2-opencv /tmp/yfv2    # for YOLO-FastestV2
    git clone --depth 1 https://github.com/hpc203/yolov8-face-landmarks-opencv-dnn /tmp/y8f    # YOLOv8-lite
    python tools/bench_face.py --repo /tmp/ulfd [--scrfd /tmp/scrfd] [--lfd /tmp/lfd] [--yolo /tmp/yfv2]
                               [--yolo8 /tmp/y8f]
                               [--models RFB-320 slim-320 scrfd_500m_kps yunet_n_320 yolo-fastestv2 yolov8-lite-t]
                               [--speedups 1.2 1.5 2] [--latency]

The repository (MIT) carries its trained detectors as ONNX files exported by PyTorch at opset 9
(``models/onnx/version-RFB-320.onnx``, ``version-slim-320.onnx``: SSD-style heads on a
MobileNet-like backbone of depthwise convs, the RFB version with receptive-field blocks; 3×240×320
in, batch 1; ``scores`` ``[1, 4420, 2]`` after a Softmax and decoded ``boxes`` out), and the
photos its demo runs on (``imgs/*.jpg``: group photos, about 30 faces each at this size). The
second repository (no license stated; InsightFace releases its pretrained SCRFD models for
non-commercial research, which a benchmark is) carries InsightFace's SCRFD detectors with keypoints
(``weights/scrfd_500m_kps.onnx``, ``scrfd_2.5g_kps.onnx``: 3×640×640 in, sigmoid scores, box
distances and keypoints at strides 8 / 16 / 32 out), scored on the same photos. The third
(Apache-2.0) trains YuNet, the face detector OpenCV's ``FaceDetectorYN`` runs, and carries it as
ONNX files exported by PyTorch at opset 11 (``onnx/yunet_n_320_320.onnx``, ``yunet_n_640_640.onnx``:
depthwise-separable convs, anchor-free heads with sigmoid class and object scores, box offsets and
log sizes, keypoints at strides 8 / 16 / 32). The fourth (no license stated) carries
YOLO-FastestV2 trained on COCO (``model.onnx``: a ShuffleNetV2 backbone, 3×352×352 in at batch 1,
one ``[605, 95]`` output joining per anchor row the sigmoid box offsets, the sigmoid objectness of
three anchors and the Softmax over 80 classes, at strides 16 and 32); on these photos it finds
people, ties, chairs. The fifth (no license stated; trained by derronqi/yolov8-face) carries a
YOLOv8-lite face detector with keypoints (``weights/yolov8-lite-t.onnx``: 3×640×640 in, per stride
8 / 16 / 32 one ``[1, 80, H, W]`` output joining 64 box-distance logits, one face logit and 15
keypoint values).

Data: the photos split by ``--seed`` into 16 for calibration and the rest for testing;
calibration samples are random crops (35–100 % of the area, mirrored half the time) of the 16,
test samples each test photo whole, mirrored, and in three random crops; all resized to the
model's input, RGB, ``(x − 127) / 128`` as the repository's ``detect_imgs_onnx.py`` prepares them
(SCRFD: ``(x − 127.5) / 128``, as hpc203's ``main.py``; YuNet: BGR, 0–255, as the repository's
``tools/compare_inference.py``). The score: F1 of the pruned model's faces against the original
model's own on the test samples (probability above 0.7, NMS at IoU 0.3 as that script decodes
them; SCRFD: above 0.5, NMS at 0.4, boxes from the anchor centres and the distances times the
stride; YuNet: class × object score above 0.5, NMS at 0.5; YOLO-FastestV2: objectness and class
probability each above 0.3, NMS at 0.4 over all classes, as the repository's ``main.py`` decodes
them, BGR, ``x / 255``; YOLOv8-lite: the face logit's sigmoid above 0.45, the box sides' expected
distance over 16 bins, NMS at 0.5, as that repository's ``main.py``, RGB, ``x / 255``; a face or
object matches at IoU ≥ 0.5). The
photos have no labels the detectors were trained to; what the pruned model must keep is what the
original finds. Also printed: the report's held-out check (the largest relative error over the
outputs and the smallest IoU of the anchors a score map marks as faces, the region above 0.5),
what the CLI's safety net makes of it (the output it fails on, exit 1) and the test samples'
largest relative error over the outputs. ``onnxprune.prune`` with its API defaults unless
``--prune-args`` says otherwise.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import onnxprune
from onnxprune.verify import poor_fidelity
from bench_ocr import add_prune_options, box_iou, largest_relative_error, latency_cell, outputs_of, prune_kwargs

CALIB_PHOTOS = 16


@dataclass(frozen=True)
class Detector:
    """Where a model lives, what it reads and how its faces are decoded."""

    repo: str  # "ulfd", "scrfd", "lfd", "yolo" or "yolo8": which clone holds it
    file: str
    size: tuple[int, int]  # width, height
    mean: float  # what the demo subtracts from the 0–255 pixels …
    faces: Callable[[list[np.ndarray]], list[np.ndarray]]  # the outputs -> per sample, face boxes
    std: float = 128.0  # … and divides them by
    bgr: bool = False  # channels in OpenCV's order


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


def yunet_faces(outputs: list[np.ndarray], size: int = 320) -> list[np.ndarray]:
    """YuNet's class and object scores, box offsets and log sizes at strides 8 / 16 / 32 (one
    point per position): class × object score above 0.5, NMS at IoU 0.5, as the repository's
    ``tools/compare_inference.py`` decodes them."""
    found = []
    for k in range(len(outputs[0])):
        boxes, scores = [], []
        for i, stride in enumerate((8, 16, 32)):
            score, reg = (outputs[i][k] * outputs[3 + i][k])[:, 0], outputs[6 + i][k]
            n = size // stride
            ys, xs = np.mgrid[:n, :n]
            centres = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32) * stride
            keep = score > 0.5
            middle, half = reg[keep, :2] * stride + centres[keep], np.exp(reg[keep, 2:]) * stride / 2
            boxes.append(np.concatenate([middle - half, middle + half], 1))
            scores.append(score[keep])
        found.append(nms(np.concatenate(boxes), np.concatenate(scores), 0.5))
    return found


YOLO_ANCHORS = np.array([[[12.64, 19.39], [37.88, 51.48], [55.71, 138.31]],  # the repository's main.py
                         [[126.91, 78.23], [131.57, 214.55], [279.92, 258.87]]], np.float32)


def yolo_fastest_objects(outputs: list[np.ndarray], size: int = 352) -> list[np.ndarray]:
    """YOLO-FastestV2's rows (one per position, strides 16 then 32; per row four box offsets of
    each of three anchors, their objectness, then 80 class probabilities) of each image: objectness
    and class probability above 0.3, NMS at IoU 0.4 over all classes, as the repository's ``main.py``
    decodes them."""
    rows = outputs[0].reshape(-1, sum((size // s) ** 2 for s in (16, 32)), outputs[0].shape[-1])
    found = []
    for image in rows:
        boxes, scores, start = [], [], 0
        for level, stride in enumerate((16, 32)):
            n = size // stride
            part, start = image[start:start + n * n], start + n * n
            ys, xs = np.mgrid[:n, :n]
            grid = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
            classes = part[:, 15:]
            for a in range(3):
                objectness, best = part[:, 12 + a], classes.max(1)
                keep = (objectness > 0.3) & (best > 0.3)
                middle = (part[keep, 4 * a:4 * a + 2] * 2 - 0.5 + grid[keep]) * stride
                half = (part[keep, 4 * a + 2:4 * a + 4] * 2) ** 2 * YOLO_ANCHORS[level, a] / 2
                boxes.append(np.concatenate([middle - half, middle + half], 1))
                scores.append(objectness[keep] * best[keep])
        found.append(nms(np.concatenate(boxes), np.concatenate(scores), 0.4))
    return found


def yolov8_faces(outputs: list[np.ndarray], size: int = 640) -> list[np.ndarray]:
    """YOLOv8-lite's ``[N, 80, H, W]`` per stride (64 box-distance logits: 16 bins per side, the face
    logit, 15 keypoint values): the face logit's sigmoid above 0.45, each side the expected
    distance over its bins times the stride from the cell's centre, NMS at IoU 0.5, as the
    repository's ``main.py`` decodes them."""
    found = []
    for k in range(len(outputs[0])):
        boxes, scores = [], []
        for level in outputs:
            rows, cols = level.shape[2:]
            stride = size // rows
            pred = level[k].reshape(level.shape[1], -1).T
            score = 1 / (1 + np.exp(-pred[:, 64]))
            keep = score > 0.45
            bins = pred[keep, :64].reshape(-1, 4, 16)
            prob = np.exp(bins - bins.max(-1, keepdims=True))
            distance = (prob / prob.sum(-1, keepdims=True) * np.arange(16)).sum(-1)
            ys, xs = np.mgrid[:rows, :cols]
            centre = np.stack([xs.ravel(), ys.ravel()], 1)[keep] + 0.5
            boxes.append(np.concatenate([centre - distance[:, :2], centre + distance[:, 2:]], 1) * stride)
            scores.append(score[keep])
        found.append(nms(np.concatenate(boxes), np.concatenate(scores), 0.5))
    return found


DETECTORS = {
    "RFB-320": Detector("ulfd", "models/onnx/version-RFB-320.onnx", (320, 240), 127.0, ssd_faces),
    "slim-320": Detector("ulfd", "models/onnx/version-slim-320.onnx", (320, 240), 127.0, ssd_faces),
    "scrfd_500m_kps": Detector("scrfd", "weights/scrfd_500m_kps.onnx", (640, 640), 127.5, scrfd_faces),
    "scrfd_2.5g_kps": Detector("scrfd", "weights/scrfd_2.5g_kps.onnx", (640, 640), 127.5, scrfd_faces),
    "yunet_n_320": Detector("lfd", "onnx/yunet_n_320_320.onnx", (320, 320), 0.0, yunet_faces, std=1.0, bgr=True),
    "yunet_n_640": Detector("lfd", "onnx/yunet_n_640_640.onnx", (640, 640), 0.0,
                            lambda outputs: yunet_faces(outputs, 640), std=1.0, bgr=True),
    "yolo-fastestv2": Detector("yolo", "model.onnx", (352, 352), 0.0, yolo_fastest_objects, std=255.0, bgr=True),
    "yolov8-lite-t": Detector("yolo8", "weights/yolov8-lite-t.onnx", (640, 640), 0.0, yolov8_faces, std=255.0),
}


def prepare(img: Image.Image, det: Detector) -> np.ndarray:
    """``[3, H, W]`` float32 as the repositories' demos feed the models."""
    rgb = np.asarray(img.convert("RGB").resize(det.size, Image.BILINEAR), np.float32)
    return ((rgb[:, :, ::-1] if det.bgr else rgb) - det.mean).transpose(2, 0, 1) / det.std


def crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop of 35–100 % of the photo's area, mirrored half the time."""
    w, h = img.size
    side = np.sqrt(rng.uniform(0.35, 1.0))
    cw, ch = int(w * side), int(h * side)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    part = img.crop((x0, y0, x0 + cw, y0 + ch))
    return part.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else part


def data(repo: Path, n_calib: int, seed: int, det: Detector) -> tuple[np.ndarray, np.ndarray]:
    """Calibration and test samples (module docs)."""
    photos = [Image.open(p) for p in sorted((repo / "imgs").glob("*.jpg"))]
    if len(photos) <= CALIB_PHOTOS:
        raise SystemExit(f"{repo / 'imgs'} holds {len(photos)} photos; the repository's demo has 24")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(photos))
    calib = [photos[i] for i in order[:CALIB_PHOTOS]]
    x = np.stack([prepare(crop(calib[i % CALIB_PHOTOS], rng), det) for i in range(n_calib)])
    test = []
    for i in order[CALIB_PHOTOS:]:
        test += [prepare(photos[i], det), prepare(photos[i].transpose(Image.FLIP_LEFT_RIGHT), det)]
        test += [prepare(crop(photos[i], rng), det) for _ in range(3)]
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


def _verdict(held: list) -> str:
    """What the CLI's safety net makes of the held-out check: the output it fails on (exit 1), or "passes"."""
    why = poor_fidelity(held)
    if not why:
        return "passes"
    failing = re.search(r"'([^']*)'", why)
    return f"exit 1 ({failing[1] if failing else why})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True, help="a clone of Ultra-Light's repository (module docs)")
    ap.add_argument("--scrfd", type=Path, help="a clone of hpc203/scrfd-opencv, for the SCRFD models")
    ap.add_argument("--lfd", type=Path, help="a clone of ShiqiYu/libfacedetection.train, for the YuNet models")
    ap.add_argument("--yolo", type=Path, help="a clone of hpc203/yolo-fastestv2-opencv, for YOLO-FastestV2")
    ap.add_argument("--yolo8", type=Path, help="a clone of hpc203/yolov8-face-landmarks-opencv-dnn, for YOLOv8-lite")
    ap.add_argument("--models", nargs="+", default=["RFB-320", "slim-320"], choices=list(DETECTORS))
    ap.add_argument("--speedups", nargs="+", type=float, default=[1.2, 1.5, 2.0])
    ap.add_argument("--calib", type=int, default=128, help="calibration samples (crops of 16 photos; default 128)")
    ap.add_argument("--seed", type=int, default=0, help="data split, crops and pruning seed (default 0)")
    add_prune_options(ap)
    args = ap.parse_args(argv)
    extra = prune_kwargs(args)
    print("| model | target | MACs speedup | faces (original) | F1 vs original % | held-out rel. error / IoU "
          "| safety net | test rel. error | prune s |" + (" latency ms (speedup) |" if args.latency else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if args.latency else ""))
    for name in args.models:
        det = DETECTORS[name]
        clone = {"ulfd": args.repo, "scrfd": args.scrfd, "lfd": args.lfd, "yolo": args.yolo,
                 "yolo8": args.yolo8}[det.repo]
        if clone is None:
            source = {"scrfd": "hpc203/scrfd-opencv", "lfd": "ShiqiYu/libfacedetection.train",
                      "yolo": "hpc203/yolo-fastestv2-opencv",
                      "yolo8": "hpc203/yolov8-face-landmarks-opencv-dnn"}[det.repo]
            raise SystemExit(f"{name} needs --{det.repo} (a clone of {source})")
        path = str(clone / det.file)
        calib, test = data(args.repo, args.calib, args.seed, det)
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
                  f"{max(f.relative_error for f in held):.3f} / {iou} | {_verdict(held)} | {test_rel:.3f} | "
                  f"{took:.0f} |"
                  + (f" {latency_cell(result.report)} |" if args.latency else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
