"""Calibration sources: .npy/.npz files, folders of them or of images, CalibrationDataReaders.

Everything becomes a :class:`Calibration`: a fixed number of samples that can be read back in
batches by index, checked against the model's inputs before any work starts.
"""

from __future__ import annotations

import enum
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import CalibrationError, OptionError

# Larger calibration values overflow float32 activations and the statistics built from them.
MAX_ABS_VALUE = 1e6
# the image files a folder is read for (PIL decodes them; AVIF needs Pillow 11.2 or newer, a GIF
# gives its first frame); other files beside them (labels, notes) are left alone
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".webp", ".avif", ".gif", ".tif", ".tiff",
                  ".jp2", ".tga", ".ppm", ".pgm"}
_ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                  onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
                  onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT8: np.uint8,
                  onnx.TensorProto.INT8: np.int8, onnx.TensorProto.BOOL: np.bool_}


class Layout(str, enum.Enum):
    NCHW = "nchw"
    NHWC = "nhwc"


class Color(str, enum.Enum):
    RGB = "rgb"
    BGR = "bgr"
    GRAY = "gray"
    RGBA = "rgba"
    BGRA = "bgra"

    @property
    def channels(self) -> int:
        return {"gray": 1, "rgb": 3, "bgr": 3}.get(self.value, 4)


class Fit(str, enum.Enum):
    """How an image reaches the model's height and width."""

    STRETCH = "stretch"  # resized to them, its aspect ratio lost
    CROP = "crop"  # scaled to cover them at 1 / crop fraction, the centre taken (ImageNet classifiers' evaluation)
    LETTERBOX = "letterbox"  # scaled to fit inside them, the rest grey (YOLO-style detectors' input)


# the grey a letterboxed image is padded with, on 8 bits (Ultralytics' letterbox)
LETTERBOX_GREY = 114


#: the channel counts an image folder can feed, and the colour each one is read as by default
_COLOR_OF_CHANNELS = {1: Color.GRAY, 3: Color.RGB, 4: Color.RGBA}


@dataclass(frozen=True)
class ImageOptions:
    """How a folder of images becomes model input: resize, [0,1] scale, mean/std, layout; and
    ``fixed``, the values of inputs the calibration data does not feed (an exposure, a Paddle
    detector's ``scale_factor``), the same in every sample: (input name, its values) pairs."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: Layout | None = None
    color: Color | None = None
    fit: Fit = Fit.STRETCH
    crop_fraction: float = 0.875  # Fit.CROP: the share of the scaled image's shorter side kept (224 of 256)
    fixed: tuple[tuple[str, tuple[float, ...]], ...] = ()


@dataclass(frozen=True)
class ModelInput:
    name: str
    dtype: type
    shape: tuple[int | None, ...]  # None for symbolic dims


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    """The graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    result = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tt.shape.dim)
        result.append(ModelInput(vi.name, _ONNX_TO_NUMPY.get(tt.elem_type, np.float32), dims))
    return result


class Calibration:
    """A fixed set of calibration samples, readable in batches by sample index."""

    def __init__(self, arrays: dict[str, np.ndarray], pairs: np.ndarray | None = None,
                 unbatched: frozenset[str] = frozenset(), available: int | None = None):
        self.arrays = arrays
        self.count = len(next(iter(arrays.values()))) if arrays else 0
        # the samples the source held: more than count where a random subset of them was drawn
        self.available = self.count if available is None else available
        self._pairs = pairs  # the two samples of each mixture, after the real samples (with_mixtures)
        # inputs the model takes one sample of without a batch axis (their samples are stacked on one)
        self.unbatched = unbatched

    def __len__(self) -> int:
        return self.count

    def take(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The feed dict for the samples at ``indices`` (in that order)."""
        idx = np.asarray(indices)
        return {k: np.ascontiguousarray(v[idx]) for k, v in self.arrays.items()}

    def batches(self, indices: Sequence[int], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(indices), batch_size):
            yield self.take(indices[start:start + batch_size])

    def with_mixtures(self, among: np.ndarray, count: int, seed: int) -> tuple["Calibration", np.ndarray]:
        """These samples followed by ``count`` mixtures of two samples of ``among`` each, and the
        mixtures' indices. A mixture is ``λ·a + (1 − λ)·b`` with λ uniform in
        [:data:`MIX_LOW`, 1 − :data:`MIX_LOW`] on every float input (other inputs take ``a``'s);
        it is computed when read, so a folder of images stays on disk."""
        rng = np.random.default_rng(seed + 2)
        pairs = rng.choice(np.asarray(among), size=(count, 2))
        lam = rng.uniform(MIX_LOW, 1.0 - MIX_LOW, size=count)
        arrays = {k: _Mixed(v, pairs, lam) for k, v in self.arrays.items()}
        return Calibration(arrays, pairs, self.unbatched, self.available), np.arange(self.count, self.count + count)

    def sources(self, indices: Sequence[int]) -> np.ndarray:
        """``[len(indices), 2]``: the real samples each sample is made of (a real one: itself twice)."""
        idx = np.asarray(indices)
        out = np.stack([idx, idx], axis=1)
        if self._pairs is not None:
            real = self.count - len(self._pairs)
            mixed = idx >= real
            out[mixed] = self._pairs[idx[mixed] - real]
        return out


# A mixture weighs each of its two samples at least this much: near 0 or 1 it would repeat one of them.
MIX_LOW = 0.2


class _Mixed:
    """Array-like: the rows of ``arr``, then the mixtures of the row ``pairs`` by weights ``lam``."""

    def __init__(self, arr, pairs: np.ndarray, lam: np.ndarray):
        self.arr, self.pairs, self.lam = arr, pairs, lam

    def __len__(self) -> int:
        return len(self.arr) + len(self.pairs)

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx))
        mixed = idx >= len(self.arr)
        k = idx[mixed] - len(self.arr)  # the mixtures asked for
        first = idx.copy()
        first[mixed] = self.pairs[k, 0]
        rows = np.array(self.arr[first])
        if k.size and np.issubdtype(rows.dtype, np.floating):
            lam = self.lam[k].reshape(-1, *[1] * (rows.ndim - 1)).astype(rows.dtype)
            rows[mixed] = lam * rows[mixed] + (1 - lam) * np.asarray(self.arr[self.pairs[k, 1]])
        return rows


# decoded images kept in memory, as their 8- or 16-bit pixels after resizing: a pruning run reads each
# calibration image a dozen times or more (passes, probes, blends of two), and decoding a large
# photo can cost more than the model's pass over it (docs/scale.md)
IMAGE_CACHE_BYTES = 1 << 29


class _LazyImages:
    """An array-like over image files: decoded and normalised only when indexed; the decoded
    pixels of the first images read are kept (up to :data:`IMAGE_CACHE_BYTES`)."""

    def __init__(self, paths: list[Path], opts: ImageOptions, dtype):
        self.paths, self.opts, self.dtype = paths, opts, dtype
        self._pixels: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx) -> np.ndarray:
        return np.stack([self._load(int(i)) for i in np.atleast_1d(idx)])

    def rows(self, idx: np.ndarray | None) -> "_LazyImages":
        """The images at ``idx`` alone (None: all; none decoded yet)."""
        return self if idx is None else _LazyImages([self.paths[i] for i in idx], self.opts, self.dtype)

    def _decoded(self, i: int) -> np.ndarray:
        """Image ``i``'s pixels ``[H, W]`` or ``[H, W, C]`` at the model's size: 8-bit, or 16-bit
        for 16-bit grey images."""
        pixels = self._pixels.get(i)
        if pixels is not None:
            return pixels
        from PIL import Image, UnidentifiedImageError

        o, path = self.opts, self.paths[i]
        try:
            with warnings.catch_warnings():
                # PIL warns of images past 89 M pixels and refuses them past 179 M (a "decompression
                # bomb": a small file that decodes to gigabytes); the refusal is the error below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    if im.mode in ("I", "F"):  # converting to 8 bits would clip them: saturated samples
                        kind = "32-bit integer" if im.mode == "I" else "floating-point"
                        raise CalibrationError(f"image '{path}' has {kind} pixels, whose scale an image folder "
                                               "cannot know; save the samples as the model takes them in a .npy file")
                    if im.mode.startswith("I;16"):  # 16-bit grey (depth, thermal, X-ray): kept at 16 bits
                        grey = Image.fromarray(np.asarray(im).astype(np.uint16))
                        pixels = _grey_as(np.asarray(_fitted(grey, o)), o.color.channels)
                    else:
                        im = im.convert({1: "L", 3: "RGB", 4: "RGBA"}[o.color.channels])
                        pixels = np.asarray(_fitted(im, o))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise CalibrationError(f"cannot read image '{path}' ({exc}); remove it from the folder") from None
        if self._cached_bytes + pixels.nbytes <= IMAGE_CACHE_BYTES:
            self._pixels[i] = pixels
            self._cached_bytes += pixels.nbytes
        return pixels

    def _load(self, i: int) -> np.ndarray:
        o = self.opts
        arr = self._decoded(i)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if o.color in (Color.BGR, Color.BGRA):
            arr = np.concatenate([arr[:, :, 2::-1], arr[:, :, 3:]], axis=2)
        if self.dtype == np.uint8:  # a model that takes the 8-bit pixels themselves (TF's image_tensor)
            arr = arr if arr.dtype == np.uint8 else (arr // 257).astype(np.uint8)
        else:  # [0, 1] at 8 or 16 bits, then the model's normalisation
            arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
            arr = (arr - np.asarray(o.mean, np.float32)) / np.asarray(o.std, np.float32)
        if o.layout is Layout.NCHW:
            arr = arr.transpose(2, 0, 1)
        return arr.astype(self.dtype, copy=False)  # np.stack in __getitem__ copies it once


def _fitted(im, opts: ImageOptions):
    """The PIL image ``im`` at ``opts.size``, as ``opts.fit`` says (bilinear resampling)."""
    from PIL import Image

    h, w = opts.size
    if opts.fit is Fit.STRETCH:
        return im.resize((w, h), Image.BILINEAR)
    if opts.fit is Fit.CROP:  # as torchvision's Resize(256) then CenterCrop(224) for a 224 model
        scale = max(h / im.height, w / im.width) / opts.crop_fraction
        sw, sh = max(w, round(im.width * scale)), max(h, round(im.height * scale))  # the scaled image's size
        left, top = (sw - w) // 2, (sh - h) // 2
        # only the crop is resampled, from its box in the image: the same pixels to a grey level, without
        # the whole scaled image (a strip or a small crop fraction would scale to hundreds of megabytes)
        kx, ky = im.width / sw, im.height / sh
        return im.resize((w, h), Image.BILINEAR, box=(left * kx, top * ky, (left + w) * kx, (top + h) * ky))
    scale = min(h / im.height, w / im.width)
    inner = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    grey = LETTERBOX_GREY * 257 if im.mode.startswith("I;16") else LETTERBOX_GREY
    canvas = Image.new(im.mode, (w, h), grey if im.mode in ("L", "I;16") else
                       (grey,) * 3 + ((255,) if im.mode == "RGBA" else ()))
    canvas.paste(inner, ((w - inner.width) // 2, (h - inner.height) // 2))
    return canvas


def _grey_as(grey: np.ndarray, channels: int) -> np.ndarray:
    """Grey pixels ``[H, W]`` as an image of ``channels`` (1, 3, or 4 with an opaque alpha), as
    PIL converts 8-bit grey."""
    if channels == 1:
        return grey
    planes = [grey] * 3 + ([np.full_like(grey, np.iinfo(grey.dtype).max)] if channels == 4 else [])
    return np.stack(planes, axis=-1)


def _image_options(inp: ModelInput, opts: ImageOptions) -> ImageOptions:
    """Fill unset image options from the model input's shape."""
    shape = (1, *inp.shape) if takes_one_image(inp) else inp.shape
    if len(shape) != 4:
        raise CalibrationError(f"input '{inp.name}' has rank {len(shape)}; image folders need a 4-D input")
    layout = opts.layout
    if layout is None:
        layout = (Layout.NHWC if shape[3] in _COLOR_OF_CHANNELS and shape[1] not in _COLOR_OF_CHANNELS
                  else Layout.NCHW)
    chans = shape[1] if layout is Layout.NCHW else shape[3]
    hw = (shape[2], shape[3]) if layout is Layout.NCHW else (shape[1], shape[2])
    size = opts.size or (hw if None not in hw else None)
    if size is None:
        raise CalibrationError(f"input '{inp.name}' has dynamic height/width; pass --size H W for the images")
    color = opts.color or (_COLOR_OF_CHANNELS.get(chans) if chans is not None else Color.RGB)
    if color is None or chans not in (None, color.channels):
        reads = f"--color {opts.color.value} reads {opts.color.channels}" if opts.color else \
            "an image folder feeds 1 (gray), 3 (RGB) or 4 (RGBA)"
        takes = f"{chans} channel{'s' * (chans != 1)}"
        raise CalibrationError(f"input '{inp.name}' {format_shape(inp.shape)} takes {takes} as {layout.value.upper()}, "
                               f"but {reads}; check --layout and --color, or give a .npy/.npz")
    for name, values in (("--mean", opts.mean), ("--std", opts.std)):
        if len(values) not in (1, color.channels):
            raise CalibrationError(f"{name} has {len(values)} values for {color.channels}-channel images; "
                                   f"give one, or one per channel")
    if np.issubdtype(inp.dtype, np.integer) or inp.dtype == np.bool_:
        if inp.dtype != np.uint8:
            raise CalibrationError(f"input '{inp.name}' takes {np.dtype(inp.dtype).name} values, which an image folder "
                                   "does not give (it feeds float or uint8 inputs); give a .npy/.npz")
        if tuple(opts.mean) != (0.0,) or tuple(opts.std) != (1.0,):
            raise CalibrationError(f"input '{inp.name}' takes uint8 pixels as they are, so --mean and --std "
                                   "(which scale float inputs) do not apply; leave them out")
    if not all(np.isfinite(opts.std)) or 0.0 in opts.std:
        raise CalibrationError(f"--std {' '.join(f'{v:g}' for v in opts.std)} has a zero or non-finite value; "
                               "give the scale the model was trained with")
    if opts.fit not in {f.value for f in Fit}:
        raise CalibrationError(f"unknown --fit '{opts.fit}'; choose one of {', '.join(f.value for f in Fit)}")
    if not 0.0 < opts.crop_fraction <= 1.0:
        raise CalibrationError(f"--crop-fraction must be in (0, 1] (got {opts.crop_fraction:g})")
    return ImageOptions(size=tuple(size), mean=opts.mean, std=opts.std, layout=layout, color=color, fit=Fit(opts.fit),
                        crop_fraction=opts.crop_fraction)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise CalibrationError(f"cannot read '{path}' as a .npy array ({exc}); save plain numeric arrays") from None
    except OSError as exc:
        raise CalibrationError(f"cannot read '{path}': {exc}") from None


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError) as exc:
        raise CalibrationError(f"cannot read '{path}' as a .npz archive ({exc}); save plain numeric arrays") from None


def _arrays_from_path(path: Path, inputs: list[ModelInput], opts: ImageOptions) -> dict[str, object]:
    if not path.exists():
        raise CalibrationError(f"calibration path '{path}' does not exist")
    if path.is_file():
        if path.suffix == ".npy":
            return _single(inputs, _load_npy(path), path)
        if path.suffix == ".npz":
            return _match_npz(_load_npz(path), inputs, path)
        if path.suffix.lower() == ".txt":
            return _image_arrays(_listed_images(path), inputs, opts)
        raise CalibrationError(f"'{path}' is not a .npy or .npz file, a .txt list of images or a folder of images")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    npys = [p for p in files if p.suffix in (".npy", ".npz")]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES] or ([] if npys else _images_below(path))
    if npys and len(inputs) == 1 and all(p.suffix == ".npy" for p in npys):
        return {inputs[0].name: _NpyFiles(npys, inputs[0], path)}
    if npys:
        parts = [_arrays_from_path(p, inputs, opts) for p in npys]
        merged = {}
        for name in parts[0]:
            chunks = [np.asarray(part[name]) for part in parts]
            if any(c.shape[1:] != chunks[0].shape[1:] for c in chunks):
                raise CalibrationError(f"files in '{path}' hold arrays of different shapes; make them equal")
            merged[name] = np.concatenate(chunks)
        return merged
    if images:
        return _image_arrays(images, inputs, opts)
    others = sorted({p.suffix.lower() for p in files if p.suffix})  # e.g. a phone's .heic photos
    found = f" (it holds {', '.join(others[:5])}{' …' if len(others) > 5 else ''} files)" if others else ""
    raise CalibrationError(f"calibration folder '{path}' holds no .npy/.npz files or images, nor do its subfolders hold "
                           f"images{found}; images are read from {', '.join(sorted(IMAGE_SUFFIXES))}")


def _image_arrays(images: list[Path], inputs: list[ModelInput], opts: ImageOptions) -> dict[str, object]:
    """The one input ``images`` feed, read lazily."""
    if len(inputs) != 1:
        others = ", ".join(f"{i.name} {format_shape(i.shape)}" for i in inputs)
        raise CalibrationError(f"an image folder feeds one input, but the model takes {len(inputs)} ({others}); "
                               "give the others a value with --fixed-input NAME=VALUE, or use .npz with one "
                               "array per input")
    return {inputs[0].name: _LazyImages(images, _image_options(inputs[0], opts), inputs[0].dtype)}


def _listed_images(path: Path) -> list[Path]:
    """The images a text file lists, one a line (a YOLO data set's ``val2017.txt``, an ImageNet
    ``val.txt`` of "path label" lines): the line, or its first field, as a path; relative ones
    from the list's folder, else from the working folder. Blank and ``#`` lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read the image list '{path}' ({exc}); give a UTF-8 text file of image "
                               "paths, one a line") from None
    images = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        named = Path(line) if Path(line).suffix.lower() in IMAGE_SUFFIXES else Path(line.split()[0])
        if named.suffix.lower() not in IMAGE_SUFFIXES:
            found, what = None, "is not an image"
        else:
            found, what = next((p for p in (path.parent / named, named) if p.is_file()), None), "does not exist"
        if found is None:
            raise CalibrationError(f"line {number} of '{path}' names '{named}', which {what}; a .txt calibration file "
                                   f"lists one image path a line ({', '.join(sorted(IMAGE_SUFFIXES))})")
        images.append(found)
    if not images:
        raise CalibrationError(f"the image list '{path}' names no images; list one image path a line")
    return images


def _images_below(path: Path) -> list[Path]:
    """The images in ``path``'s subfolders (a data set's class folders), in path order; hidden
    files and folders skipped, symbolic links to folders not followed."""
    found = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found += [Path(folder) / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(path).parts)


def _one_sample(shape: tuple[int, ...], inp: ModelInput) -> bool:
    """Whether an array of ``shape`` is one sample of ``inp`` stored without the batch axis (only
    when its shape fits exactly)."""
    return len(shape) == len(inp.shape) - 1 and all(w is None or h == w for h, w in zip(shape, inp.shape[1:]))


def _maybe_batch(arr: np.ndarray, inp: ModelInput) -> np.ndarray:
    """Add the batch axis to one sample stored without it."""
    return arr[None] if _one_sample(arr.shape, inp) else arr


def _single(inputs: list[ModelInput], arr: np.ndarray, path: Path) -> dict[str, np.ndarray]:
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise CalibrationError(f"the model has {len(inputs)} inputs ({names}); give a .npz with one array per input "
                               "name, or the others a value with --fixed-input NAME=VALUE")
    return {inputs[0].name: _maybe_batch(arr, inputs[0])}


def _match_npz(data: dict[str, np.ndarray], inputs: list[ModelInput], path: Path) -> dict[str, np.ndarray]:
    names = [i.name for i in inputs]
    if all(n in data for n in names):
        return {n: _maybe_batch(data[n], i) for n, i in zip(names, inputs)}
    if len(inputs) == 1 and len(data) == 1:
        return _single(inputs, next(iter(data.values())), path)
    if len(inputs) == 1 and "x" in data:
        return _single(inputs, data["x"], path)
    missing = [n for n in names if n not in data]
    raise CalibrationError(f"'{path}' has arrays {sorted(data)} but the model needs {missing}; name them after the inputs")


def _from_reader(reader, inputs: list[ModelInput]) -> dict[str, np.ndarray]:
    """Drain an ORT ``CalibrationDataReader`` (``get_next()``) or an iterable of feed dicts."""
    if hasattr(reader, "get_next"):
        def items():
            while (item := reader.get_next()) is not None:
                yield item
        it: Iterable = items()
    elif isinstance(reader, Iterable):
        it = reader
    else:
        raise CalibrationError(f"calibration object {type(reader).__name__} has no get_next() and is not iterable")
    chunks: dict[str, list[np.ndarray]] = {i.name: [] for i in inputs}
    for item in it:
        if not isinstance(item, dict):
            raise CalibrationError(f"the calibration reader returned {type(item).__name__}; it must return a dict of input name to array")
        for inp in inputs:
            if inp.name not in item:
                raise CalibrationError(f"the calibration reader gave no array for input '{inp.name}' (got {sorted(item)})")
            arr = np.asarray(item[inp.name])
            chunks[inp.name].append(_maybe_batch(arr, inp))
    if not chunks or not next(iter(chunks.values())):
        raise CalibrationError("the calibration reader returned no data")
    return {k: np.concatenate(v) for k, v in chunks.items()}


def _validate(arrays: dict[str, object], inputs: list[ModelInput]) -> dict[str, object]:
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise CalibrationError(f"calibration arrays have different sample counts {sorted(counts)}; make them equal")
    if counts.pop() == 0:
        raise CalibrationError("the calibration data holds no samples")
    out = {}
    for inp in inputs:
        arr = arrays[inp.name]
        if isinstance(arr, _LazyImages):
            out[inp.name] = arr
            continue
        arr = arr if isinstance(arr, (np.memmap, _Rows, _NpyFiles)) else np.asarray(arr)
        if not unbatched(arr, inp):  # else: samples of an input without a batch axis, stacked on one
            if arr.ndim != len(inp.shape):
                raise CalibrationError(f"calibration data for '{inp.name}' has shape {tuple(arr.shape)} (rank "
                                       f"{arr.ndim}); the model expects rank {len(inp.shape)} like {format_shape(inp.shape)}")
            for axis, (have, want) in enumerate(zip(arr.shape[1:], inp.shape[1:]), start=1):
                if want is not None and have != want:
                    raise CalibrationError(f"calibration data for '{inp.name}' has shape {tuple(arr.shape)}; "
                                           f"the model expects {format_shape(inp.shape)} (axis {axis} differs)")
        if arr.dtype != inp.dtype:
            both_float = np.issubdtype(arr.dtype, np.floating) and np.issubdtype(inp.dtype, np.floating)
            if not both_float:
                raise CalibrationError(f"calibration data for '{inp.name}' is {arr.dtype} but the model expects "
                                       f"{np.dtype(inp.dtype).name}; convert and normalise it first")
        finite, peak = _scan(arr)
        if not finite:
            raise CalibrationError(f"calibration data for '{inp.name}' contains NaN or Inf values; clean it first")
        if peak > MAX_ABS_VALUE:
            raise CalibrationError(f"calibration data for '{inp.name}' has values up to {peak:.3g}; normalise it "
                                   f"the way the model expects (|values| <= {MAX_ABS_VALUE:g})")
        out[inp.name] = arr
    return out


def check_varied(cal: Calibration) -> None:
    """Refuse calibration whose samples are all one sample repeated (in every input given as
    arrays): the refits learn from how the samples differ, and the held-out check would compare
    the one sample the model was fit on."""
    arrays = [a for a in cal.arrays.values() if isinstance(a, (np.ndarray, _Rows, _NpyFiles))]
    if len(cal) > 1 and arrays and len(arrays) == len(cal.arrays) and all(_all_alike(a) for a in arrays):
        raise CalibrationError(f"the {len(cal)} calibration samples are all the same sample; give varied images (the "
                               "refits learn from how the samples differ)")


def _all_alike(arr: np.ndarray, chunk_bytes: int = 1 << 26) -> bool:
    """Whether every sample of ``arr`` equals the first, compared a chunk of samples at a time
    (stops at the first that differs: at once, for real data)."""
    step = max(1, chunk_bytes // max(arr[:1].nbytes, 1))
    return all(np.array_equal(arr[start:start + step], np.broadcast_to(arr[:1], arr[start:start + step].shape))
               for start in range(1, len(arr), step))


def _scan(arr: np.ndarray, chunk_bytes: int = 1 << 26) -> tuple[bool, float]:
    """Whether a float array is free of NaN/Inf, and its largest |value| (0 for non-numbers),
    read in chunks of samples: no full-size temporary beside the data (nor a memmap read whole)."""
    if not arr.size or not np.issubdtype(arr.dtype, np.number):
        return True, 0.0
    floating = np.issubdtype(arr.dtype, np.floating)
    step = max(1, chunk_bytes // max(1, arr[:1].nbytes))
    peak = 0.0
    for start in range(0, len(arr), step):
        part = np.asarray(arr[start:start + step])
        if floating and not np.isfinite(part).all():
            return False, peak
        peak = max(peak, float(np.abs(part).max()) if part.size else 0.0)
    return True, peak


def unbatched(arr, inp: ModelInput) -> bool:
    """Whether ``arr`` holds samples of ``inp`` stacked on an axis the input does not have: one
    more axis than it, the rest its (static) shape (torchvision's detectors take ``[3, H, W]``)."""
    return len(arr.shape) == len(inp.shape) + 1 and tuple(arr.shape[1:]) == tuple(inp.shape)


def takes_one_image(inp: ModelInput) -> bool:
    """Whether an image folder feeds ``inp`` one image without a batch axis: a static ``[C, H, W]``."""
    return len(inp.shape) == 3 and None not in inp.shape


def format_shape(shape: tuple[int | None, ...]) -> str:
    """A shape as users read it: ``[?, 3, 224, 224]`` (? for a dynamic dim)."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class _Rows:
    """Array-like: the rows ``idx`` of an array, read when indexed (a memory-mapped file stays on disk)."""

    def __init__(self, arr, idx: np.ndarray):
        self.arr, self.idx = arr, idx
        self.shape, self.dtype, self.ndim = (len(idx), *arr.shape[1:]), arr.dtype, arr.ndim
        self.size = int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, idx) -> np.ndarray:
        return np.asarray(self.arr[self.idx[idx]])


class _NpyFiles:
    """Array-like over the samples of a folder's ``.npy`` files, in file order (each file one sample
    without the batch axis, or a batch of them): only their headers are read until samples are
    asked for, so that a folder of one file per image holding a data set is read only as far as
    it is drawn."""

    def __init__(self, paths: list[Path], inp: ModelInput, folder: Path):
        self.paths, counts, samples, dtypes = paths, [], set(), set()
        self.single = []  # per file: one sample stored without the batch axis
        for path in paths:
            arr = _load_npy(path)  # memory-mapped: its header alone is read
            one = _one_sample(arr.shape, inp)
            self.single.append(one)
            counts.append(1 if one else (arr.shape[0] if arr.ndim else 0))
            samples.add(arr.shape if one else arr.shape[1:])
            dtypes.add(arr.dtype)
            del arr
        if len(samples) != 1:
            raise CalibrationError(f"files in '{folder}' hold arrays of different shapes; make them equal")
        sample, self.dtype = samples.pop(), np.result_type(*dtypes)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shape = (int(self.starts[-1]), *sample)
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        rows = np.arange(len(self))[idx]
        return self.rows(rows) if np.ndim(rows) else self.rows(rows[None])[0]

    def rows(self, idx: np.ndarray | None) -> np.ndarray:
        """The samples at ``idx`` (None: all) in memory, each file opened once."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        files = np.searchsorted(self.starts, idx, side="right") - 1
        for f in np.unique(files):
            at = files == f
            arr = _load_npy(self.paths[f])
            out[at] = (arr[None] if self.single[f] else arr)[idx[at] - self.starts[f]]
        return out


def _drawn(arrays: dict[str, object], limit: int | None, seed: int) -> dict[str, object]:
    """At most ``limit`` samples of ``arrays`` (None: all), a random subset drawn with ``seed``:
    a data set's 50 000 validation images would make a run of hours for little more accuracy.
    Under a limit, a folder of ``.npy`` files is read into memory here, once, as far as it is
    drawn (a run reads its samples a dozen times); images and other arrays are read when indexed."""
    count = len(next(iter(arrays.values())))
    idx = None if limit is None or count <= limit else random_subset(np.arange(count), limit, seed)

    def drawn(arr):
        if isinstance(arr, _LazyImages) or (isinstance(arr, _NpyFiles) and limit is not None):
            return arr.rows(idx)
        return arr if idx is None else _Rows(arr, idx)

    return {k: drawn(v) for k, v in arrays.items()}


class _Cast:
    """Array-like that casts rows of a float array to the model's float type when read."""

    def __init__(self, arr, dtype):
        self.arr, self.dtype = arr, dtype

    def __len__(self):
        return len(self.arr)

    def __getitem__(self, idx):
        return np.asarray(self.arr[idx]).astype(self.dtype)


def load_calibration(source, model: onnx.ModelProto, image_options: ImageOptions | None = None,
                     limit: int | None = None, seed: int = 0) -> Calibration:
    """Build a :class:`Calibration` for ``model`` from a path, a dict of arrays, an array, or a
    reader: all its samples, or at most ``limit`` of them drawn at random with ``seed``."""
    inputs = model_inputs(model)
    opts = image_options or ImageOptions()
    if isinstance(source, Calibration):
        return source
    fixed = _fixed_samples(opts.fixed, inputs)
    fed = [i for i in inputs if i.name not in fixed]
    if isinstance(source, (str, Path)):
        arrays = _arrays_from_path(Path(source), fed, opts)
    elif isinstance(source, np.ndarray):
        arrays = _single(fed, source, Path("<array>"))
    elif isinstance(source, dict) and all(isinstance(v, np.ndarray) for v in source.values()):
        arrays = _match_npz({k: v for k, v in source.items() if k not in fixed}, fed, Path("<dict>"))
    else:
        arrays = _from_reader(source, fed)
    available = len(next(iter(arrays.values())))
    arrays = _drawn(arrays, limit, seed)
    count = len(next(iter(arrays.values())))
    arrays.update({name: np.broadcast_to(sample, (count, *sample.shape)) for name, sample in fixed.items()})
    arrays = _validate(arrays, inputs)
    stacked = frozenset(i.name for i in inputs if (takes_one_image(i) if isinstance(arrays[i.name], _LazyImages)
                                                    else unbatched(arrays[i.name], i)))
    arrays = {k: (_Cast(v, i.dtype) if not isinstance(v, _LazyImages) and v.dtype != i.dtype else v)
              for (k, v), i in zip(arrays.items(), inputs)}
    return Calibration(arrays, unbatched=stacked, available=available)


def _fixed_samples(fixed: Sequence[tuple[str, Sequence[float]]], inputs: list[ModelInput]) -> dict[str, np.ndarray]:
    """One sample of each input ``fixed`` gives values for: its shape less the batch axis, filled
    with one value or with as many as it holds."""
    by_name = {i.name: i for i in inputs}
    samples = {}
    for name, values in fixed:
        inp = by_name.get(name)
        if inp is None:
            raise CalibrationError(f"--fixed-input '{name}': the model has no such input (its inputs: "
                                   f"{', '.join(by_name)})")
        shape = inp.shape[1:]
        if None in shape:
            raise CalibrationError(f"--fixed-input '{name}': its shape {format_shape(inp.shape)} has dynamic dims "
                                   "past the batch axis; give its values in a .npz instead")
        size = math.prod(shape)
        if len(values) not in (1, size):
            raise CalibrationError(f"--fixed-input '{name}': {len(values)} values do not fill one sample of "
                                   f"{format_shape(inp.shape)} (give {'1' if size == 1 else f'1 or {size}'})")
        samples[name] = np.broadcast_to(np.asarray(values, dtype=inp.dtype), (size,)).reshape(shape)
    if samples and len(samples) == len(inputs):
        raise CalibrationError("--fixed-input gives every input a value: the calibration data must feed one")
    return samples


def parse_fixed_inputs(specs: Sequence[str]) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """``--fixed-input`` values, ``NAME=V`` or ``NAME=V1,V2,…``, as :attr:`ImageOptions.fixed`."""
    parsed = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        try:
            numbers = tuple(float(v) for v in values.split(","))
        except ValueError:
            numbers = ()
        if not sep or not name or not numbers:
            raise OptionError(f"--fixed-input '{spec}' is not NAME=VALUE or NAME=V1,V2,… (numbers)")
        parsed.append((name, numbers))
    return tuple(parsed)


def split_calibration(count: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices for fitting and for the held-out check, drawn at random (seeded)."""
    perm = np.random.default_rng(seed).permutation(count)
    n_hold = int(round(count * holdout)) if count > 1 else 0
    n_hold = min(n_hold, count - 1)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def random_subset(indices: np.ndarray, count: int, seed: int) -> np.ndarray:
    """At most ``count`` of ``indices``, drawn at random (data sorted by class must not bias
    them), in increasing order."""
    if len(indices) <= count:
        return indices
    return np.sort(np.random.default_rng(seed + 1).choice(indices, count, replace=False))


def parse_shapes(specs: Sequence[str], model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Input shapes from ``--shape`` values: ``1x3x224x224`` for a model with one input, or
    ``NAME:1x3x224x224`` per input. Every dim is a positive integer, one per axis of the input,
    and the model's static dims are kept as they are (:class:`OptionError` otherwise)."""
    inputs = {i.name: i for i in model_inputs(model)}
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, _, dims = spec.rpartition(":")  # input names may hold ':' (TensorFlow's "x:0")
        if not name:
            if len(inputs) != 1:
                raise OptionError(f"--shape {spec}: the model has {len(inputs)} inputs "
                                  f"({', '.join(inputs)}); name one, e.g. --shape NAME:{dims}")
            name = next(iter(inputs))
        if name not in inputs:
            raise OptionError(f"--shape {spec}: the model has no input '{name}' (inputs: {', '.join(inputs)})")
        if name in shapes:
            raise OptionError(f"--shape gives input '{name}' twice")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise OptionError(f"--shape {spec}: dims must be positive integers joined by 'x', e.g. 1x3x224x224")
        want = inputs[name].shape
        if want and len(want) != len(shape):
            raise OptionError(f"--shape {spec}: input '{name}' has rank {len(want)} ({format_shape(want)}), not {len(shape)}")
        for axis, (have, fixed) in enumerate(zip(shape, want)):
            if fixed is not None and have != fixed:
                raise OptionError(f"--shape {spec}: input '{name}' fixes axis {axis} to {fixed} ({format_shape(want)})")
        shapes[name] = shape
    return shapes


def zeros_calibration(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None = None,
                      size: int | None = None, unbatched: frozenset[str] = frozenset()) -> Calibration:
    """All-zeros input: at ``shapes[name]`` where given (as many samples as its batch dim), else
    one sample at the input's static dims, a dynamic one set to ``size`` (CalibrationError when
    ``size`` is None). Inputs ``unbatched`` take one sample without a batch axis: it is stacked on one."""
    shapes = shapes or {}
    arrays = {}
    for inp in model_inputs(model):
        if inp.name in shapes:
            arrays[inp.name] = np.zeros(shapes[inp.name], dtype=inp.dtype)
            continue
        if inp.name in unbatched:
            arrays[inp.name] = np.zeros((1, *inp.shape), dtype=inp.dtype)
            continue
        if size is None and any(d is None for d in inp.shape[1:]):
            raise CalibrationError(f"input '{inp.name}' has dynamic dims; pass --calib so shapes can be measured")
        arrays[inp.name] = np.zeros((1, *[size if d is None else d for d in inp.shape[1:]]), dtype=inp.dtype)
    return Calibration(arrays, unbatched=frozenset(n for n in unbatched if n not in shapes))


def dynamic_inputs(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None = None) -> list[str]:
    """The inputs with a dynamic dim besides the batch that ``shapes`` leaves unset."""
    return [i.name for i in model_inputs(model) if i.name not in (shapes or {}) and None in i.shape[1:]]


def synthetic_calibration(model: onnx.ModelProto, unbatched: frozenset[str] = frozenset()) -> Calibration:
    """One all-zeros sample, for data-free runs on models with static input shapes (``unbatched``:
    inputs without a batch axis)."""
    return zeros_calibration(model, unbatched=unbatched)
