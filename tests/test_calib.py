"""Calibration sources and their validation: every bad input is a one-line CalibrationError."""

import re
from dataclasses import replace

import numpy as np
import pytest
from graphs import calib_for, tiny_vgg

from onnxprune.calib import Color, ImageOptions, check_varied, load_calibration
from onnxprune.errors import CalibrationError

MODEL = tiny_vgg()


def test_npy_npz_and_folder_of_npy(tmp_path):
    x = calib_for(MODEL, 10)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", input=x)
    assert len(load_calibration(tmp_path / "a.npy", MODEL)) == 10
    assert len(load_calibration(tmp_path / "b.npz", MODEL)) == 10
    assert len(load_calibration(tmp_path, MODEL)) == 20  # the folder: both files


def test_at_most_limit_samples_drawn_at_random_from_files_and_image_folders(tmp_path):
    """A source holding more than ``limit`` samples gives a random subset of that many, seeded,
    read from the file when asked (a memory-mapped .npy stays on disk); under it, all."""
    from PIL import Image

    x = calib_for(MODEL, 40)
    np.save(tmp_path / "a.npy", x)
    cal = load_calibration(tmp_path / "a.npy", MODEL, limit=10, seed=3)
    rows = cal.take(np.arange(len(cal)))["input"]
    chosen = [int(np.flatnonzero((x == r).all(axis=(1, 2, 3)))[0]) for r in rows]
    assert len(cal) == 10 and cal.available == 40 and chosen == sorted(set(chosen))  # distinct, in file order
    assert np.array_equal(cal.take([4, 2])["input"], x[[chosen[4], chosen[2]]])
    assert np.array_equal(load_calibration(tmp_path / "a.npy", MODEL, limit=10, seed=3).take([0, 9])["input"],
                          rows[[0, 9]])  # the same seed draws the same subset
    assert chosen != [int(np.flatnonzero((x == r).all(axis=(1, 2, 3)))[0]) for r in
                      load_calibration(tmp_path / "a.npy", MODEL, limit=10, seed=4).take(np.arange(10))["input"]]
    whole = load_calibration(tmp_path / "a.npy", MODEL, limit=40)
    assert len(whole) == whole.available == 40 and np.array_equal(whole.take([39])["input"], x[[39]])
    (tmp_path / "pics").mkdir()
    for i in range(12):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(tmp_path / "pics" / f"{i:02d}.png")
    cal = load_calibration(tmp_path / "pics", MODEL, limit=5, seed=0)
    values = [round(float(v) * 255) // 10 for v in cal.take(np.arange(len(cal)))["input"][:, 0, 0, 0]]
    assert len(cal) == 5 and cal.available == 12 and values == sorted(set(values)) and max(values) <= 11
    x[:] = x[0]
    np.save(tmp_path / "same.npy", x)
    with pytest.raises(CalibrationError, match="all the same sample"):  # the drawn subset is checked as well
        check_varied(load_calibration(tmp_path / "same.npy", MODEL, limit=10))


def test_a_folder_of_npy_files_is_read_as_far_as_it_is_drawn(tmp_path, monkeypatch):
    """A folder of one .npy per sample (and batches among them, of another float type): every file's
    header is read, then only the files a drawn subset needs, each once; all of them without a limit."""
    import onnxprune.calib as calib

    x = calib_for(MODEL, 30)
    for i in range(24):
        np.save(tmp_path / f"s{i:02d}.npy", x[i])
    np.save(tmp_path / "t_batch.npy", x[24:].astype(np.float64))
    opened = []
    load = calib._load_npy
    monkeypatch.setattr(calib, "_load_npy", lambda path: opened.append(path.name) or load(path))
    cal = load_calibration(tmp_path, MODEL, limit=8, seed=1)
    assert len(cal) == 8 and cal.available == 30 and len(opened) == 25 + len(set(opened[25:])) <= 25 + 8
    rows = cal.take(np.arange(8))["input"]
    chosen = [int(np.flatnonzero(np.isclose(x, r).all(axis=(1, 2, 3)))[0]) for r in rows]
    assert chosen == sorted(set(chosen)) and rows.dtype == np.float32
    whole = load_calibration(tmp_path, MODEL)
    assert len(whole) == 30 and np.allclose(whole.take(np.arange(30))["input"], x)
    np.save(tmp_path / "u_other.npy", calib_for(MODEL, 2)[:, :, :4])
    with pytest.raises(CalibrationError, match="hold arrays of different shapes"):
        load_calibration(tmp_path, MODEL)


def test_a_folder_of_more_npy_files_than_open_files_allowed(tmp_path):
    """Each file is closed once read: 200 files load under a limit of 64 open files (every file
    was held open, memory-mapped, until the run ended: 'Too many open files' past ~20 000)."""
    import resource
    import subprocess
    import sys

    import onnx

    x = calib_for(MODEL, 200)
    (tmp_path / "d").mkdir()
    for i in range(200):
        np.save(tmp_path / "d" / f"{i:03d}.npy", x[i])
    onnx.save(MODEL, tmp_path / "m.onnx")
    code = ("import sys, numpy as np, onnx; from onnxprune.calib import load_calibration; "
            "cal = load_calibration(sys.argv[1], onnx.load(sys.argv[2])); "
            "print(len(cal), float(np.abs(cal.take([199])['input'] - np.load(sys.argv[3])).max()))")
    np.save(tmp_path / "last.npy", x[199:])
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d"), str(tmp_path / "m.onnx"),
                          str(tmp_path / "last.npy")], capture_output=True, text=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["200", "0.0"]


def test_single_sample_files_get_a_batch_axis(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", calib_for(MODEL, 1)[0])
    assert len(load_calibration(tmp_path, MODEL)) == 3


def test_calibration_data_reader_protocol_and_iterables():
    x = calib_for(MODEL, 6)

    class Reader:
        def __init__(self):
            self.items = iter([{"input": x[i:i + 2]} for i in range(0, 6, 2)])

        def get_next(self):
            return next(self.items, None)

    assert len(load_calibration(Reader(), MODEL)) == 6
    assert len(load_calibration(({"input": x[i]} for i in range(6)), MODEL)) == 6


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    cal = load_calibration(tmp_path, MODEL, ImageOptions(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    batch = cal.take([0, 1])["input"]
    assert batch.shape == (2, 3, 8, 8) and batch.dtype == np.float32
    assert -2.01 <= batch.min() and batch.max() <= 2.01


def test_images_fit_the_model_stretched_centre_cropped_or_letterboxed(tmp_path):
    """A 16 × 32 image of three vertical bands (10 | 100 | 250) at the model's 8 × 8: stretched, all
    three bands; cropped (shorter side to 8 / 0.5 = 16, the centre 8), the middle band alone;
    letterboxed (scaled to 4 × 8), grey rows above and below, the three bands between."""
    from PIL import Image

    from onnxprune.calib import Fit

    img = np.zeros((16, 32, 3), np.uint8)
    img[:, :8], img[:, 8:24], img[:, 24:] = 10, 100, 250
    (tmp_path / "i").mkdir()
    Image.fromarray(img).save(tmp_path / "i" / "a.png")

    def pixels(fit, fraction=0.5):
        cal = load_calibration(tmp_path / "i", MODEL, ImageOptions(fit=fit, crop_fraction=fraction))
        return np.rint(cal.take([0])["input"][0, 0] * 255).astype(int)

    stretched = pixels(Fit.STRETCH)
    assert stretched[:, 0].tolist() == [10] * 8 and stretched[:, 3].tolist() == [100] * 8 and stretched[0, 7] == 250
    cropped = pixels(Fit.CROP)
    assert (cropped == 100).all()
    boxed = pixels(Fit.LETTERBOX)
    assert (boxed[[0, 1, 6, 7]] == 114).all() and boxed[2:6, 0].tolist() == [10] * 4 and boxed[3, 7] == 250
    assert boxed[3, 3] == 100
    with pytest.raises(CalibrationError, match=r"--crop-fraction must be in \(0, 1\] \(got 1.5\)"):
        pixels(Fit.CROP, 1.5)
    with pytest.raises(CalibrationError, match="unknown --fit 'squash'; choose one of stretch, crop, letterbox"):
        pixels("squash")
    assert (pixels("crop") == cropped).all()  # the API may name it
    import onnx

    from onnxprune.cli import main

    onnx.save(MODEL, tmp_path / "m.onnx")  # the CLI passes both on (to the same check)
    assert main([str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "i"), "--fit", "crop", "--crop-fraction", "1.5",
                 "-o", str(tmp_path / "p.onnx")]) == 2
    assert not (tmp_path / "p.onnx").exists()


def test_a_text_list_of_images(tmp_path, monkeypatch):
    """A data set's list file: YOLO's ``./images/x.jpg`` lines (from the list's folder), ImageNet's
    "path label" lines, a path with a space; others from the working folder; bad lines named."""
    from PIL import Image

    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for name, value in (("images/a.jpg", 10), ("images/b c.png", 20), ("images/d.png", 30)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / "data" / name)
    Image.fromarray(np.full((8, 8, 3), 40, np.uint8)).save(tmp_path / "elsewhere" / "e.png")
    listing = tmp_path / "data" / "val.txt"
    listing.write_text("# calibration\n./images/a.jpg\nimages/b c.png\n\nimages/d.png 7\nelsewhere/e.png\n")
    monkeypatch.chdir(tmp_path)
    cal = load_calibration(listing, MODEL)
    assert [round(float(v) * 255) for v in cal.take(np.arange(len(cal)))["input"][:, 0, 0, 0]] == [10, 20, 30, 40]
    for text, msg in (("images/missing.png\n", r"line 1 of '.*val.txt' names 'images/missing.png', which does not exist"),
                      ("images/a.jpg\nlabels.csv\n", r"line 2 .* names 'labels.csv', which is not an image"),
                      ("# nothing\n", "names no images")):
        listing.write_text(text)
        with pytest.raises(CalibrationError, match=msg):
            load_calibration(listing, MODEL)
    listing.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CalibrationError, match="cannot read the image list"):
        load_calibration(listing, MODEL)


def test_image_folder_reads_the_formats_phones_and_browsers_save(tmp_path):
    """.jfif / .jpe (JPEGs a browser saves), .gif (its first frame), .avif (phones; Pillow >= 11.2),
    .jp2 and .tga are read, not passed over as 'holds no images'."""
    from PIL import Image, features

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    formats = {"jfif": "JPEG", "jpe": "JPEG", "gif": "GIF", "jp2": "JPEG2000", "tga": "TGA"}
    if features.check("avif"):
        formats["avif"] = "AVIF"
    for ext, fmt in formats.items():
        img.save(tmp_path / f"a.{ext}", format=fmt)
    cal = load_calibration(tmp_path, MODEL)
    assert len(cal) == len(formats) and cal.take(np.arange(len(cal)))["input"].shape == (len(formats), 3, 8, 8)


def test_image_folder_decodes_each_image_once_within_its_memory_budget(tmp_path, monkeypatch):
    """Decoded pixels are kept, so repeated reads (passes, blends) decode each image once; past the
    budget the other images are decoded at every read; the values are the same either way."""
    from PIL import Image

    from onnxprune import calib

    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    opts = ImageOptions(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), color=Color.BGR)
    cal = load_calibration(tmp_path, MODEL, opts)
    first = cal.take([0, 1, 2, 3])["input"]
    mixed, idx = cal.with_mixtures(np.arange(4), 6, seed=0)
    for _ in range(3):
        assert np.array_equal(cal.take([3, 1, 0, 2])["input"], first[[3, 1, 0, 2]])
        mixed.take(idx)
    assert len(opened) == 4
    monkeypatch.setattr(calib, "IMAGE_CACHE_BYTES", 2 * 8 * 8 * 3)  # two images' pixels at 8×8
    opened.clear()
    cal = load_calibration(tmp_path, MODEL, opts)
    for _ in range(3):
        assert np.array_equal(cal.take([0, 1, 2, 3])["input"], first)
    assert len(opened) == 2 + 3 * 2


def test_sixteen_bit_grey_images_keep_their_depth_and_wider_pixels_are_refused(tmp_path):
    """16-bit grey images (depth, thermal, X-ray) read to [0, 1] by 65535, as 8-bit ones by 255 —
    converting them to 8 bits clipped every value above 255; 32-bit integer and floating-point
    images, whose scale a folder cannot tell, are refused in one line."""
    from PIL import Image

    grey = np.random.default_rng(0).integers(0, 65536, (8, 8)).astype(np.uint16)
    (tmp_path / "a").mkdir()
    for i in range(3):
        Image.fromarray(grey).save(tmp_path / "a" / f"{i}.png")
    cal = load_calibration(tmp_path / "a", MODEL, ImageOptions(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    got = cal.take([0, 2])["input"]  # 8×8 to the model's 8×8: no resampling
    want = (grey.astype(np.float32) / 65535 - 0.5) / 0.25
    assert np.allclose(got, np.broadcast_to(want, got.shape), atol=1e-6)
    for name, pixels in (("f", np.random.default_rng(1).random((8, 8), np.float32)),
                         ("i", np.arange(64, dtype=np.int32).reshape(8, 8) * 100000)):
        (tmp_path / name).mkdir()
        Image.fromarray(pixels).save(tmp_path / name / "0.tif")
        with pytest.raises(CalibrationError, match="pixels, whose scale an image folder cannot know; save the samples"):
            load_calibration(tmp_path / name, MODEL).take([0])


def test_an_image_folder_of_class_subfolders(tmp_path):
    """A data set's class folders (``val/<class>/*.jpg``): their images, in path order, hidden
    folders and files skipped; a folder whose own files are images keeps to them, as before; a
    folder of files no image reader takes (a phone's .heic photos) says what it holds."""
    from PIL import Image

    for folder, value in (("b_class", 10), ("a_class", 20), ("a_class/deeper", 30), (".thumbs", 40)):
        (tmp_path / "data" / folder).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / "data" / folder / "x.png")
    (tmp_path / "data" / "__MACOSX" / "a_class").mkdir(parents=True)  # what a zip made on macOS holds
    (tmp_path / "data" / "__MACOSX" / "a_class" / "._x.png").write_bytes(b"AppleDouble")
    (tmp_path / "data" / "labels.txt").write_text("a_class\nb_class\n")
    cal = load_calibration(tmp_path / "data", MODEL)
    assert [round(float(v) * 255) for v in cal.take(np.arange(len(cal)))["input"][:, 0, 0, 0]] == [30, 20, 10]
    Image.fromarray(np.full((8, 8, 3), 60, np.uint8)).save(tmp_path / "data" / "top.png")
    assert len(load_calibration(tmp_path / "data", MODEL)) == 1
    (tmp_path / "phone").mkdir()
    (tmp_path / "phone" / "IMG_0001.HEIC").write_bytes(b"not read")
    (tmp_path / "phone" / "notes.txt").write_text("")
    with pytest.raises(CalibrationError, match=r"nor do its subfolders hold images \(it holds \.heic, \.txt files\); "
                                               r"images are read from \.avif, \.bmp, \.gif"):
        load_calibration(tmp_path / "phone", MODEL)


def test_an_image_folder_feeds_a_uint8_input_its_pixels(tmp_path):
    """A model that takes 8-bit pixels (TF's ``image_tensor``, NHWC uint8) gets the decoded pixels
    themselves — scaled to [0, 1] and cast back, they were all 0 — and refuses --mean/--std; an
    image folder refuses other integer inputs."""
    from onnx import TensorProto
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / "imgs" / f"{i}.png")
    model = _image_input_model([1, 8, 8, 3], TensorProto.UINT8)
    got = load_calibration(tmp_path / "imgs", model).take([0, 1])["image"]
    assert got.dtype == np.uint8 and np.array_equal(got, pixels)
    bgr = load_calibration(tmp_path / "imgs", model, ImageOptions(color=Color.BGR)).take([1])["image"]
    assert np.array_equal(bgr[0], pixels[1][:, :, ::-1])
    with pytest.raises(CalibrationError, match="takes uint8 pixels as they are, so --mean and --std"):
        load_calibration(tmp_path / "imgs", model, ImageOptions(std=(0.5,)))
    with pytest.raises(CalibrationError, match="takes int32 values, which an image folder does not give"):
        load_calibration(tmp_path / "imgs", _image_input_model([1, 8, 8, 3], TensorProto.INT32))


def _image_input_model(shape, dtype=None):
    """A graph that only declares an image input of ``shape`` (what the loaders read)."""
    from onnx import TensorProto, helper

    dtype = TensorProto.FLOAT if dtype is None else dtype
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["out"])], "g",
                              [helper.make_tensor_value_info("image", dtype, shape)],
                              [helper.make_tensor_value_info("out", dtype, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_image_folder_for_a_four_channel_channels_last_input(tmp_path):
    """An input ``[1, 8, 8, 4]`` (M-LSD's RGB and a channel of ones, exported by tf2onnx): read as
    channels-last RGBA, opaque images giving an alpha of one; ``--color bgra`` swaps the colours,
    a mean and std per channel scale them (here to 0–255 and the alpha left at one). Channel
    counts an image cannot give, a colour of another count, and a mean or std of the wrong length
    are one-line errors."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "0.png")
    model = _image_input_model([1, 8, 8, 4])
    scale = ImageOptions(std=(1 / 255, 1 / 255, 1 / 255, 1.0))
    rgba = load_calibration(tmp_path, model, scale).take([0])["image"]
    assert rgba.shape == (1, 8, 8, 4)
    np.testing.assert_allclose(rgba[0, :, :, :3], pixels, atol=1e-3)
    np.testing.assert_array_equal(rgba[0, :, :, 3], 1.0)
    bgra = load_calibration(tmp_path, model, replace(scale, color=Color.BGRA)).take([0])["image"]
    np.testing.assert_array_equal(bgra[..., :3], rgba[..., 2::-1])
    np.testing.assert_array_equal(bgra[..., 3], rgba[..., 3])
    bad = [(_image_input_model([1, 8, 8, 2]), ImageOptions(), "[1, 8, 8, 2] takes 8 channels as NCHW, but an image folder feeds"),
           (model, ImageOptions(color=Color.RGB), "takes 4 channels as NHWC, but --color rgb reads 3"),
           (model, ImageOptions(std=(0.5, 0.5)), "--std has 2 values for 4-channel images"),
           (model, ImageOptions(std=(0.0,)), "--std 0 has a zero or non-finite value")]
    for bad_model, opts, message in bad:
        with pytest.raises(CalibrationError, match=re.escape(message)):
            load_calibration(tmp_path, bad_model, opts)


def test_image_folder_and_stacked_arrays_for_an_input_without_a_batch_axis(tmp_path):
    """An input declared ``[3, 8, 8]`` (one image, no batch axis): an image folder or an array of
    images stacked on a new axis are its samples, and the calibration says which inputs lack the
    axis (the pruner adds it while it prunes)."""
    from onnx import TensorProto, helper
    from PIL import Image

    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    for source in (tmp_path, rng.normal(size=(4, 3, 8, 8)).astype(np.float32)):
        cal = load_calibration(source, model)
        assert len(cal) == 4 and cal.unbatched == {"input"} and cal.take([0, 1])["input"].shape == (2, 3, 8, 8)
    assert load_calibration(rng.normal(size=(4, 3, 8, 8)).astype(np.float32), MODEL).unbatched == frozenset()


@pytest.mark.parametrize("make,msg", [
    (lambda p: np.save(p / "x.npy", np.zeros((4, 3, 9, 8), np.float32)), "axis 2 differs"),
    (lambda p: np.save(p / "x.npy", np.zeros((4, 8, 8), np.float32)), "rank"),
    (lambda p: np.save(p / "x.npy", np.zeros((4, 3, 8, 8), np.uint8)), "uint8"),
    (lambda p: np.save(p / "x.npy", np.full((4, 3, 8, 8), np.nan, np.float32)), "NaN"),
    (lambda p: np.save(p / "x.npy", np.zeros((0, 3, 8, 8), np.float32)), "no samples"),
    (lambda p: np.save(p / "x.npy", np.array([{"a": 1}], dtype=object)), "cannot read"),
    (lambda p: (p / "x.npy").write_bytes(b"not a numpy file"), "cannot read"),
    (lambda p: np.savez(p / "x.npz", other=np.zeros((4, 3, 8, 8), np.float32), more=np.zeros(3)), "name them"),
    (lambda p: (p / "x.txt").write_text("hello"), "names 'hello', which is not an image"),
    (lambda p: (p / "x.csv").write_text("1,2"), "not a .npy or .npz file, a .txt list of images"),
])
def test_bad_calibration_files(tmp_path, make, msg):
    make(tmp_path)
    target = next(tmp_path.iterdir())
    with pytest.raises(CalibrationError, match=msg) as info:
        load_calibration(target, MODEL)
    assert "\n" not in str(info.value)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(CalibrationError, match="holds no"):
        load_calibration(tmp_path, MODEL)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(tmp_path / "nope", MODEL)


def test_float64_is_accepted_and_cast():
    cal = load_calibration(calib_for(MODEL, 4).astype(np.float64), MODEL)
    assert cal.take([0])["input"].dtype == np.float32


def test_mixtures_blend_two_fit_samples_and_leave_the_rest_alone(tmp_path):
    from PIL import Image

    from onnxprune.calib import MIX_LOW, Calibration

    x = calib_for(MODEL, 6)
    ids = np.arange(6, dtype=np.int64)[:, None]
    cal, mixed = Calibration({"input": x, "ids": ids}).with_mixtures(np.array([1, 3, 4]), 5, seed=0)
    assert len(cal) == 11 and list(mixed) == [6, 7, 8, 9, 10]
    assert np.array_equal(cal.take([0, 5, 2])["input"], x[[0, 5, 2]])  # real samples as they were
    arr = cal.arrays["input"]
    for k, row in enumerate(cal.take(mixed)["input"]):
        a, b = arr.pairs[k]
        lam = arr.lam[k]
        assert {a, b} <= {1, 3, 4} and MIX_LOW <= lam <= 1 - MIX_LOW  # drawn from the fit samples only
        assert np.allclose(row, lam * x[a] + (1 - lam) * x[b], atol=1e-6)
    assert np.array_equal(cal.take(mixed)["ids"][:, 0], arr.pairs[:, 0])  # integer inputs are not blended

    for i in range(3):  # a folder of images: mixtures read the files when asked
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    images, mixed = load_calibration(tmp_path, MODEL).with_mixtures(np.arange(3), 2, seed=1)
    blend = images.take(mixed)["input"]
    assert blend.shape == (2, 3, 8, 8) and np.allclose(blend, blend[:, :1, :1, :1])  # a flat grey between two


def _image_and_gain_model():
    """An image input and a ``gain [1]`` input scaling its features (an exposure, say)."""
    import onnx
    from graphs import Builder

    b = Builder(in_shape=(1, 3, 8, 8))
    x = b.node("Relu", [b.conv("input", 3, 16)])
    x = b.node("Mul", [x, "gain"])
    y = b.conv(b.node("Relu", [b.conv(x, 16, 16)]), 16, 3)
    gain = onnx.helper.make_tensor_value_info("gain", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph(b.nodes, "g", [b.input, gain],
                                   [onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [1, 3, 8, 8])], b.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_fixed_inputs_fill_what_the_images_do_not_feed(tmp_path):
    """``--fixed-input gain=0.5``: an image folder feeds the image input and every sample takes
    gain 0.5; the pruned model is checked on images with that gain. Without it the error names the
    other input and the option; a wrong name, a count that does not fill a sample, or a malformed
    value is one line each."""
    import onnx
    from conftest import check_pruned
    from PIL import Image

    from onnxprune.calib import parse_fixed_inputs
    from onnxprune.cli import main
    from onnxprune.errors import OptionError

    model = _image_and_gain_model()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(images / f"{i}.png")
    cal = load_calibration(images, model, ImageOptions(fixed=parse_fixed_inputs(["gain=0.5"])))
    assert len(cal) == 60 and cal.take([0, 1])["gain"].tolist() == [0.5, 0.5]
    out = tmp_path / "out.onnx"
    assert main([str(src), "--speedup", "1.5", "--calib", str(images), "--fixed-input", "gain=0.5", "-o", str(out),
                 "-q", "--no-latency"]) == 0
    x = cal.take(np.arange(8))["input"]
    feeds = [{"input": x[i:i + 1], "gain": np.array([0.5], np.float32)} for i in range(8)]
    for feed in feeds:
        check_pruned(onnx.load(out), model, feed, max_rel_err=0.5)
    for fixed, msg in [((), "--fixed-input NAME=VALUE"), ((("gane", (1.0,)),), "no such input"),
                       ((("gain", (1.0, 2.0)),), "do not fill one sample")]:
        with pytest.raises(CalibrationError, match=msg) as info:
            load_calibration(images, model, ImageOptions(fixed=fixed))
        assert "\n" not in str(info.value)
    with pytest.raises(OptionError, match="is not NAME=VALUE"):
        parse_fixed_inputs(["gain"])


def test_the_cli_prunes_from_a_drawn_subset_and_says_so(tmp_path, capsys):
    """--calib-samples N: a run on a file of more samples uses N of them, says so on stderr and in
    the report; 0 uses all, without the note."""
    import json

    import onnx
    from conftest import check_pruned

    from onnxprune.cli import main

    src, out, report = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save(MODEL, src)
    x = calib_for(MODEL, 90)
    np.save(tmp_path / "x.npy", x)
    args = [str(src), "--calib", str(tmp_path / "x.npy"), "-o", str(out), "--no-latency", "--report", str(report),
            "--force", "--round-to", "1", "--speedup", "1.3", "--max-drop", "0.5"]
    assert main([*args, "--calib-samples", "60"]) == 0
    assert "calibration: 60 of the 90 samples given, drawn at random (--calib-samples N" in capsys.readouterr().err
    cal = json.loads(report.read_text())["calibration"]
    assert cal["available"] == 90 and cal["fit"] - cal["mixtures"] + cal["holdout"] == 60
    check_pruned(onnx.load(out), MODEL, x[:16], max_rel_err=0.5)
    assert main([*args, "--calib-samples", "0"]) == 0
    assert "drawn at random" not in capsys.readouterr().err
    cal = json.loads(report.read_text())["calibration"]
    assert cal["available"] == 90 and cal["fit"] - cal["mixtures"] + cal["holdout"] == 90
    check_pruned(onnx.load(out), MODEL, x[:16], max_rel_err=0.5)
    assert main([*args, "--calib-samples", "1"]) == 2
    assert "--calib-samples must be >= 2, or 0 for all" in capsys.readouterr().err
