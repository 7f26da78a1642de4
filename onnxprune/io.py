"""Reading and writing model files: checks on the way in, atomic writes on the way out."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelError, OutputError

MIN_OPSET = 11
# A model whose protobuf is larger than this must keep its weights in an external file.
PROTOBUF_LIMIT = 2**31 - 1


def _check_external_paths(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data locations that escape the model's folder."""
    base = base_dir.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if os.path.isabs(location) or base not in target.parents:
            raise ModelError(
                f"tensor '{tensor.name}' stores its data at '{location}', outside the model's "
                "folder; move the data file next to the model"
            )
        if not target.is_file():
            raise ModelError(
                f"external data file '{location}' of tensor '{tensor.name}' is missing; "
                "keep it next to the model"
            )


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model (with its external data) and check that onnxprune can work on it."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file '{path}' does not exist")
    if not path.is_file():
        raise ModelError(f"'{path}' is not a file; pass the path of an .onnx model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"'{path}' is not a valid ONNX model ({type(exc).__name__}); "
                         "re-export it or check the download is complete") from None
    if not model.graph.node:
        raise ModelError(f"'{path}' holds no graph nodes; is it an ONNX model?")
    _check_external_paths(model, path.parent)
    onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    check_opset(model)
    check_not_quantized(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelError(f"'{path}' fails the ONNX checker: {first}") from None
    return model


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul"}


def check_not_quantized(model: onnx.ModelProto) -> None:
    """Refuse quantized graphs: their weights cannot be refit in float."""
    found = sorted({n.op_type for n in model.graph.node} & QUANTIZED_OPS)
    if found:
        raise ModelError(f"the model is quantized ({', '.join(found)}); prune the float model first, "
                         "then quantize the pruned model")


def check_opset(model: onnx.ModelProto) -> int:
    """Return the default-domain opset, refusing ones older than MIN_OPSET."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        raise ModelError("the model imports no default ONNX opset; re-export it with opset >= 11")
    if version < MIN_OPSET:
        raise ModelError(
            f"the model uses opset {version}; onnxprune needs opset {MIN_OPSET} or newer — "
            "re-export it or convert it with onnx.version_converter"
        )
    return version


def _default_mode() -> int:
    """File mode a plain ``open()`` would give (mkstemp makes files private)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False,
                      protected: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write ``model`` to ``path`` via a temporary file in the same folder, then rename.

    Refuses to overwrite any path in ``protected`` (the input model) and, unless ``force``,
    any existing file. Models too large for one protobuf get an external data file beside them.
    """
    path = Path(path)
    for other in protected:
        if path.exists() and Path(other).exists() and path.resolve() == Path(other).resolve():
            raise OutputError(f"refusing to overwrite the input model '{path}'; choose another -o path")
    if path.exists() and not force:
        raise OutputError(f"output '{path}' already exists; pass --force to overwrite it")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder '{folder}' does not exist; create it first")
    large = model.ByteSize() > PROTOBUF_LIMIT
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    data_name = f"{path.name}.data"
    tmp_data = folder / f".{data_name}.tmp"
    try:
        if large:
            onnx.save_model(model, tmp_name, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=1024)
            # the .onnx refers to the data file by name: rewrite the location before renaming.
            saved = onnx.load(tmp_name, load_external_data=False)
            for tensor in onnx.external_data_helper._get_all_tensors(saved):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            with open(tmp_name, "wb") as fh:
                fh.write(saved.SerializeToString())
            os.replace(tmp_data, folder / data_name)
        else:
            with open(tmp_name, "wb") as fh:
                fh.write(model.SerializeToString())
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp_name, _default_mode())
        os.replace(tmp_name, path)
    except BaseException:
        for leftover in (Path(tmp_name), tmp_data):
            if leftover.exists():
                leftover.unlink()
        raise
    return path


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a text file via a temporary file in the same folder, then rename."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"folder '{folder}' for '{path.name}' does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
