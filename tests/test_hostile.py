"""A corpus of bad and hostile inputs, each run through the CLI: one line on stderr naming the
problem, the documented exit code, no file written, the inputs untouched.

Each case builds its files in a fresh folder and returns the CLI arguments (the output goes to
``out.onnx`` in that folder unless the case says otherwise).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hostile
import numpy as np
import onnx
import pytest
from conftest import ROOT
from graphs import calib_for, tiny_vgg

from onnxprune import cli, io

VGG = tiny_vgg()
Build = Callable[[Path], list[str]]


def _save(model: onnx.ModelProto, folder: Path, name: str = "m.onnx", **kw) -> Path:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving with external data edits the model
    onnx.save_model(copy, folder / name, **kw)  # no checks: the model may be broken on purpose
    return folder / name


def _calib(folder: Path, data=None, name: str = "c.npy") -> Path:
    path = folder / name
    if isinstance(data, dict):
        np.savez(path, **data)
    else:
        np.save(path, calib_for(VGG, 10) if data is None else data, allow_pickle=True)
    return path


def model_case(make: Callable[[Path], Path], *extra: str, calib: bool = True) -> Build:
    """A case whose model file ``make`` writes; calibration data fits tiny_vgg."""
    def build(tmp: Path) -> list[str]:
        args = [str(make(tmp))]
        return args + (["--calib", str(_calib(tmp))] if calib else []) + list(extra)
    return build


def proto_case(make_model: Callable[[], onnx.ModelProto], *extra: str, calib: bool = True) -> Build:
    return model_case(lambda tmp: _save(make_model(), tmp), *extra, calib=calib)


def bytes_case(content: bytes) -> Build:
    def write(tmp: Path) -> Path:
        (tmp / "m.onnx").write_bytes(content)
        return tmp / "m.onnx"
    return model_case(write)


def calib_case(make: Callable[[Path], Path], *extra: str) -> Build:
    """A case with a good model and the calibration path ``make`` writes."""
    return lambda tmp: [str(_save(VGG, tmp)), "--calib", str(make(tmp)), *extra]


def external_case(edit: Callable[[onnx.TensorProto, Path], None]) -> Build:
    """tiny_vgg saved with external data in ``inner/``, then every tensor's entries edited."""
    def make(tmp: Path) -> Path:
        inner = tmp / "inner"
        inner.mkdir()
        _save(VGG, inner, save_as_external_data=True, location="w.bin", size_threshold=0)
        model = onnx.load(inner / "m.onnx", load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                edit(t, tmp)
        return _save(model, inner)
    return model_case(make)


def _set(key: str, value: str) -> Callable[[onnx.TensorProto, Path], None]:
    def edit(t: onnx.TensorProto, tmp: Path) -> None:
        entry = next((e for e in t.external_data if e.key == key), None) or t.external_data.add()
        entry.key, entry.value = key, value
    return edit


def _outside(tmp: Path) -> None:
    (tmp / "w.bin").write_bytes((tmp / "inner" / "w.bin").read_bytes())


def _escape_up(t: onnx.TensorProto, tmp: Path) -> None:
    _outside(tmp)
    _set("location", "../w.bin")(t, tmp)


def _escape_absolute(t: onnx.TensorProto, tmp: Path) -> None:
    _outside(tmp)
    _set("location", str(tmp / "w.bin"))(t, tmp)


def _escape_symlink(t: onnx.TensorProto, tmp: Path) -> None:
    _outside(tmp)
    link = tmp / "inner" / "link.bin"
    if not link.is_symlink():
        link.symlink_to(tmp / "w.bin")
    _set("location", "link.bin")(t, tmp)


def _write_output(tmp: Path) -> list[str]:
    (tmp / "out.onnx").write_bytes(b"keep me")
    return [str(_save(VGG, tmp)), "--calib", str(_calib(tmp))]


def _output_is_input(tmp: Path) -> list[str]:
    model = _save(VGG, tmp)
    return [str(model), "--calib", str(_calib(tmp)), "-o", str(model), "--force"]


def _output_links_to_input(tmp: Path) -> list[str]:
    model = _save(VGG, tmp)
    (tmp / "link.onnx").symlink_to(model)
    return [str(model), "--calib", str(_calib(tmp)), "-o", str(tmp / "link.onnx"), "--force"]


def _output_is_input_data(tmp: Path) -> list[str]:
    """-o b.onnx where the input model keeps its weights in b.onnx.data."""
    model = _save(VGG, tmp, save_as_external_data=True, location="b.onnx.data", size_threshold=0)
    return [str(model), "--calib", str(_calib(tmp)), "-o", str(tmp / "b.onnx"), "--force"]


def _output_folder(tmp: Path) -> list[str]:
    (tmp / "out.onnx").mkdir()
    return [str(_save(VGG, tmp)), "--calib", str(_calib(tmp)), "--force"]


def _bad_image_folder(tmp: Path) -> Path:
    (tmp / "imgs").mkdir()
    for i in range(5):
        (tmp / "imgs" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp / "imgs"


def _bomb_image_folder(tmp: Path) -> Path:
    """A small PNG that decodes to 400 M pixels, beside good images."""
    from PIL import Image

    (tmp / "imgs").mkdir()
    Image.new("1", (20000, 20000)).save(tmp / "imgs" / "0.png")
    for i in range(1, 5):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(tmp / "imgs" / f"{i}.png")
    return tmp / "imgs"


def _float_image_folder(tmp: Path) -> Path:
    """Floating-point TIFFs: converting them to 8 bits would clip them to a few grey levels."""
    from PIL import Image

    (tmp / "imgs").mkdir()
    for i in range(5):
        Image.fromarray(np.random.default_rng(i).random((12, 12), np.float32)).save(tmp / "imgs" / f"{i}.tif")
    return tmp / "imgs"


def _mixed_folder(tmp: Path) -> Path:
    (tmp / "cal").mkdir()
    np.save(tmp / "cal" / "a.npy", calib_for(VGG, 4))
    np.save(tmp / "cal" / "b.npy", np.zeros((4, 3, 9, 9), np.float32))
    return tmp / "cal"


def _huge_npy_header(tmp: Path) -> Path:
    """A .npy whose header declares 10^12 samples but holds a few bytes."""
    path = tmp / "c.npy"
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False,
                                                   "shape": (10**12, 3, 8, 8)})
        fh.write(b"\0" * 64)
    return path


def _not_numpy(tmp: Path) -> Path:
    (tmp / "c.npy").write_bytes(b"hello")
    return tmp / "c.npy"


def _empty_folder(tmp: Path) -> Path:
    (tmp / "cal").mkdir()
    return tmp / "cal"


def _text(tmp: Path) -> Path:
    (tmp / "c.txt").write_text("1 2 3")
    return tmp / "c.txt"


def _with_values(value: float) -> np.ndarray:
    x = calib_for(VGG, 10)
    x[3, 1, 2, 2] = value
    return x


ERROR, NOTHING = "onnxprune: error: ", "onnxprune: "
C = lambda data, name="c.npy": calib_case(lambda tmp: _calib(tmp, data, name))  # noqa: E731

# (id, build, exit code, pattern the one stderr line must match after its prefix)
CASES: list[tuple[str, Build, int, str]] = [
    # --- the model file
    ("missing_file", lambda tmp: [str(tmp / "nope.onnx")], 2, "does not exist"),
    ("folder", lambda tmp: [str(tmp)], 2, "is not a file"),
    ("empty_file", bytes_case(b""), 2, "holds no graph nodes|not a valid ONNX"),
    ("garbage", bytes_case(b"\x08\x07garbage\xff\xff\xff"), 2, "not a valid ONNX"),
    ("truncated", bytes_case(VGG.SerializeToString()[:700]), 2, "not a valid ONNX|fails the ONNX checker"),
    ("json_text", bytes_case(b'{"graph": {"node": []}}\n'), 2, "not a valid ONNX|holds no graph nodes"),
    ("npy_as_model", model_case(lambda tmp: _calib(tmp, name="m.npy")), 2, "not a valid ONNX|holds no graph"),
    ("opset_8_unconvertible", proto_case(hostile.old_unconvertible), 2,
     r"opset 8; converting it to opset 11 \(onnx.version_converter\) failed .*re-export it with opset >= 11"),
    ("no_default_opset", proto_case(hostile.no_default_opset), 2, "imports no default ONNX opset"),
    ("qdq", proto_case(hostile.qdq), 2, "quantized .*prune the float model first"),
    ("qlinearconv", proto_case(hostile.qlinear_conv), 2, "quantized .*QLinearConv"),
    ("conv_integer", proto_case(hostile.conv_integer), 2, "quantized .*ConvInteger"),
    ("dangling_input", proto_case(hostile.dangling_input), 2, "fails the ONNX checker"),
    ("huge_initializer", proto_case(hostile.huge_initializer), 2, "fails the ONNX checker"),
    ("short_initializer", proto_case(hostile.short_initializer), 2, "fails the ONNX checker.*too small"),
    ("long_initializer", proto_case(hostile.long_initializer), 2, r"declares dims \[16, 1, 3, 3\] .* holds data for"),
    ("typed_initializer", proto_case(hostile.typed_initializer), 2, "holds data for 217"),
    ("huge_input_dim", proto_case(hostile.huge_input), 2, "input 'input' declares a sample"),
    ("huge_input_dim_no_calib", proto_case(hostile.huge_input, "--method", "l1", "--no-reconstruct", calib=False),
     2, "input 'input' declares a sample"),
    ("two_inputs_one_array", proto_case(hostile.two_inputs), 2, "2 inputs .*one array per input"),
    ("unknown_custom_op", proto_case(hostile.unknown_custom_op), 2, "ONNX Runtime cannot run the model"),
    ("training_bn_one_output", proto_case(lambda: hostile.training_bn(outputs=1)), 2,
     "ONNX Runtime cannot run the model.*Training_mode"),
    ("conv_weight_rank", proto_case(hostile.bad_weight_rank), 2, "ONNX Runtime cannot run|fails the ONNX checker"),
    ("activations_overflow", proto_case(hostile.overflowing_activations), 2,
     "activations overflow on the calibration data .*check its weights"),
    # --- external data
    ("external_dotdot", external_case(_escape_up), 2, "outside the model's folder"),
    ("external_absolute", external_case(_escape_absolute), 2, "outside the model's folder"),
    ("external_symlink", external_case(_escape_symlink), 2, "outside the model's folder"),
    ("external_missing", external_case(_set("location", "gone.bin")), 2, "'gone.bin' .* is missing"),
    ("external_past_end", external_case(_set("offset", "100000")), 2, "truncated"),
    ("external_bad_offset", external_case(_set("offset", "ten")), 2, "malformed external-data"),
    # --- calibration data
    ("calib_missing", lambda tmp: [str(_save(VGG, tmp)), "--calib", str(tmp / "nope.npy")], 2, "does not exist"),
    ("calib_wrong_name", C({"image": calib_for(VGG, 10), "mask": np.zeros(10)}, "c.npz"), 2, "name them after"),
    ("calib_rank", C(np.zeros((10, 8, 8), np.float32)), 2, "rank 3.*expects rank 4"),
    ("calib_shape", C(np.zeros((10, 4, 8, 8), np.float32)), 2, r"axis 1 differs"),
    ("calib_uint8", C(np.zeros((10, 3, 8, 8), np.uint8)), 2, "uint8 but the model expects float32"),
    ("calib_strings", C(np.full((10, 3, 8, 8), "a")), 2, "<U1 but the model expects float32"),
    ("calib_complex", C(np.zeros((10, 3, 8, 8), np.complex64)), 2, "complex64 but the model expects"),
    ("calib_nan", C(_with_values(np.nan)), 2, "NaN or Inf"),
    ("calib_inf", C(_with_values(np.inf)), 2, "NaN or Inf"),
    ("calib_huge_values", C(_with_values(1e30)), 2, "values up to 1e\\+30; normalise"),
    ("calib_all_alike", C(np.repeat(calib_for(VGG, 1), 8, axis=0)), 2, "8 calibration samples are all the same sample; give varied"),
    ("calib_one_sample", C(calib_for(VGG, 1)), 2, "only 1 calibration sample"),
    ("calib_no_samples", C(np.zeros((0, 3, 8, 8), np.float32)), 2, "no samples"),
    ("calib_pickle", C(np.array([{"a": 1}], dtype=object)), 2, "cannot read .* as a .npy"),
    ("calib_pickle_npz", C({"input": np.array([{"a": 1}], dtype=object)}, "c.npz"), 2, "cannot read .* .npz"),
    ("calib_huge_header", calib_case(_huge_npy_header), 2, "cannot read"),
    ("calib_not_numpy", calib_case(_not_numpy), 2, "cannot read"),
    ("calib_text_file", calib_case(_text), 2, "names '1', which is not an image; a .txt calibration file lists"),
    ("calib_empty_folder", calib_case(_empty_folder), 2, "holds no .npy/.npz files or images"),
    ("calib_mixed_folder", calib_case(_mixed_folder), 2, "different shapes"),
    ("calib_broken_image", calib_case(_bad_image_folder), 2, "cannot read image"),
    ("calib_decompression_bomb", calib_case(_bomb_image_folder), 2, "cannot read image .*decompression bomb"),
    ("calib_float_images", calib_case(_float_image_folder), 2, "floating-point pixels, whose scale"),
    # --- the output
    ("output_exists", _write_output, 2, "already exists; pass --force"),
    ("output_is_input", _output_is_input, 2, "refusing to overwrite the input model"),
    ("output_links_to_input", _output_links_to_input, 2, "refusing to overwrite the input model"),
    ("output_is_input_data", _output_is_input_data, 2, "refusing to overwrite the input model"),
    ("output_is_folder", _output_folder, 2, "is a folder"),
    ("output_folder_missing", lambda tmp: [str(_save(VGG, tmp)), "--calib", str(_calib(tmp)), "-o",
                                           str(tmp / "no" / "out.onnx")], 2, "does not exist; create it"),
    ("report_folder_missing", lambda tmp: [str(_save(VGG, tmp)), "--calib", str(_calib(tmp)), "--report",
                                           str(tmp / "no" / "r.json")], 2, "does not exist; create it"),
    ("bad_speedup", lambda tmp: [str(_save(VGG, tmp)), "--calib", str(_calib(tmp)), "--speedup", "0.5"], 2,
     "--speedup must be >= 1"),
    # --- nothing to prune: exit 0, one line, nothing written
    ("no_conv", proto_case(hostile.no_conv), 0, "nothing to prune"),
    # --- a conv feeding the output only: no group can be pruned, so no target can be met
    ("single_conv", proto_case(hostile.single_conv), 1, "cannot be reached"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file and link under ``folder`` with a hash of its content."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def run_cli(argv: list[str], tmp: Path, capfd) -> tuple[int, list[str]]:
    """Run the CLI in-process with ``-o out.onnx`` unless given, without latency timing (what
    these tests check does not depend on it); (exit code, stderr lines)."""
    if "-o" not in argv:
        argv = [*argv, "-o", str(tmp / "out.onnx")]
    if argv and argv[0] not in cli.COMMANDS and "--no-latency" not in argv:
        argv = [*argv, "--no-latency"]
    capfd.readouterr()
    code = cli.main(argv)
    return code, capfd.readouterr().err.splitlines()


@pytest.mark.parametrize("build,code,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(build: Build, code: int, pattern: str, tmp_path: Path, capfd):
    argv = build(tmp_path)
    before = _snapshot(tmp_path)
    got, err = run_cli(argv, tmp_path, capfd)
    assert len(err) == 1, err
    prefix = ERROR if code else NOTHING
    assert err[0].startswith(prefix) and not (code == 0 and err[0].startswith(ERROR)), err[0]
    assert __import__("re").search(pattern, err[0][len(prefix):]), err[0]
    assert got == code, err[0]
    assert _snapshot(tmp_path) == before  # nothing written, nothing changed


def test_corpus_size():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(hostile.BARRIER_MODELS))
def test_barrier_graphs_still_prune(name: str, tmp_path: Path, capfd):
    """Control flow, training-mode BN and custom-domain ops are barriers: the rest is pruned."""
    model = hostile.BARRIER_MODELS[name]()
    argv = [str(_save(model, tmp_path)), "--calib", str(_calib(tmp_path)), "--speedup", "1.3", "-q",
            "--max-drop", "0.99"]  # random weights, two held-out images: fidelity is not what is tested
    code, err = run_cli(argv, tmp_path, capfd)
    assert code == 0, err
    pruned = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(pruned, full_check=True)
    widths = {t.name: t.dims[0] for t in pruned.graph.initializer if len(t.dims) == 4}
    assert min(widths.values()) < 8  # the trunk's first conv lost channels
    import onnxruntime as ort

    # training-mode BN normalises over the batch: its samples mix, so the passes ran (and the
    # pruned model declares) one sample at a time
    batch = pruned.graph.input[0].type.tensor_type.shape.dim[0]
    assert (batch.dim_value == 1) == (name == "training_bn")
    x = calib_for(VGG, 1 if batch.dim_value == 1 else 2)
    sess = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (model, pruned)]
    ref, out = (s.run(None, {"input": x})[0] for s in sess)
    assert ref.shape == out.shape and np.isfinite(out).all()


def test_interrupt_while_writing_leaves_nothing(tmp_path: Path, monkeypatch):
    """Ctrl-C (or a full disk) in the middle of a write: no output and no temporary file."""
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_model_atomic(VGG, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_while_writing_a_large_model_leaves_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1000)  # tiny_vgg counts as "over 2 GB"
    calls = []

    def fail_second(path, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("disk full")
        os.rename(path, target)

    monkeypatch.setattr(io.os, "replace", fail_second)
    with pytest.raises(OSError):
        io.save_model_atomic(VGG, tmp_path / "out.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx.data"]  # renamed first: the .onnx never came


def test_large_model_path_round_trips(tmp_path: Path, monkeypatch):
    """The external-data write used for models over 2 GB (forced here by a lower limit)."""
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1000)
    model = onnx.ModelProto()
    model.CopyFrom(VGG)
    io.save_model_atomic(model, tmp_path / "out.onnx")
    assert model == VGG  # the caller's model keeps its data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    loaded = io.load_model(tmp_path / "out.onnx")
    assert [onnx.numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer] == \
        [onnx.numpy_helper.to_array(t).tobytes() for t in VGG.graph.initializer]


@pytest.mark.parametrize("sig,code,line", [(signal.SIGINT, 130, "onnxprune: interrupted; nothing was written"),
                                           (signal.SIGTERM, 143, "onnxprune: terminated; nothing was written")])
def test_signal_midway_leaves_no_file(tmp_path: Path, sig, code, line):
    """A real Ctrl-C, or a ``kill`` / ``timeout`` / container stop (SIGTERM), while pruning: its
    exit code, one line, no output, input unchanged, no temporary folder left. The signal is sent
    once the run logs its first pruning step (``-v``), so it lands mid-run on any machine."""
    model, calib = _save(VGG, tmp_path), _calib(tmp_path, calib_for(VGG, 20000))
    before = _snapshot(tmp_path)
    temp = tmp_path.parent / f"{tmp_path.name}-tmp"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "onnxprune", str(model), "--calib", str(calib), "-o",
                             str(tmp_path / "out.onnx"), "-v", "--no-latency", "--max-drop", "0.99"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(temp)})
    first = proc.stderr.readline()  # the first log line: pruning is under way
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert proc.returncode == code, first + err
    assert err.strip().splitlines()[-1] == line
    assert _snapshot(tmp_path) == before
    assert [p.name for p in temp.iterdir() if p.name.startswith("onnxprune")] == []  # ORT keeps its own .ses there


def test_real_process_prints_one_line(tmp_path: Path):
    """Out of process too (logging, warnings, ORT's own output): exactly one line on stderr."""
    model = _save(hostile.unknown_custom_op(), tmp_path)
    proc = subprocess.run([sys.executable, "-m", "onnxprune", str(model), "--calib", str(_calib(tmp_path))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(ERROR), proc.stderr
