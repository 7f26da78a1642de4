"""Reading and writing model files: checks on the way in, atomic writes on the way out."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from math import prod
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError

from .errors import ModelError, OutputError

log = logging.getLogger(__name__)

MIN_OPSET = 11  # older models are converted to it on load (upgraded)
# IR version from which an initializer need not also be a graph input
INITIALIZERS_APART_IR = 4
# A model whose protobuf is larger than this must keep its weights in an external file.
PROTOBUF_LIMIT = 2**31 - 1
# Refuse inputs whose declared static dims make one sample larger than this.
MAX_SAMPLE_BYTES = 1 << 32


def _location(tensor: onnx.TensorProto) -> dict[str, str]:
    """The external-data entries of a tensor (location, offset, length …) as a dict."""
    return {e.key: e.value for e in tensor.external_data}


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    return (t for t in onnx.external_data_helper._get_all_tensors(model)
            if t.data_location == onnx.TensorProto.EXTERNAL)


def _check_external_paths(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data locations that escape the model's folder (``..``, absolute paths,
    symlinks leading out), that are missing, or whose byte range runs past the file's end."""
    base = base_dir.resolve()
    for tensor in _external_tensors(model):
        entries = _location(tensor)
        location = entries.get("location", "")
        target = (base / location).resolve()
        if not location or os.path.isabs(location) or base not in target.parents:
            raise ModelError(
                f"tensor '{tensor.name}' stores its data at '{location}', outside the model's "
                "folder; move the data file next to the model"
            )
        if not target.is_file():
            raise ModelError(
                f"external data file '{location}' of tensor '{tensor.name}' is missing; "
                "keep it next to the model"
            )
        try:
            offset, length = int(entries.get("offset", 0)), int(entries.get("length", -1))
        except ValueError:
            raise ModelError(f"tensor '{tensor.name}' has a malformed external-data offset/length; "
                             "re-export the model") from None
        size = target.stat().st_size
        if offset < 0 or offset > size or offset + max(length, 0) > size:
            raise ModelError(
                f"tensor '{tensor.name}' reads bytes {offset}..{offset + max(length, 0)} of '{location}', "
                f"which has only {size}; the data file is truncated or belongs to another model"
            )


def _stored_elements(tensor: onnx.TensorProto) -> int | None:
    """How many elements a tensor's data holds (None: strings or an unknown type)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data) // itemsize if len(tensor.raw_data) % itemsize == 0 else -1
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    per_element = 2 if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
    return len(getattr(tensor, field)) // per_element


def check_tensor_data(model: onnx.ModelProto) -> None:
    """Refuse tensors whose data does not match their declared dims and type (the checker
    refuses too little data, not too much)."""
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        stored = _stored_elements(tensor)
        if stored is not None and stored != prod(tensor.dims):
            raise ModelError(f"tensor '{tensor.name}' declares dims {list(tensor.dims)} ({prod(tensor.dims)} "
                             f"elements) but holds data for {stored}; the file is corrupt, re-export the model")


def check_input_sizes(model: onnx.ModelProto) -> None:
    """Refuse graph inputs whose static dims describe an absurdly large sample."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim[1:] if d.HasField("dim_value")]
        if any(d < 0 for d in dims) or 4 * prod(dims) > MAX_SAMPLE_BYTES:
            raise ModelError(
                f"input '{vi.name}' declares a sample of shape {dims} (over {MAX_SAMPLE_BYTES >> 30} GiB); "
                "fix the input's dims or export it with dynamic dims"
            )


def load_model(path: str | os.PathLike, *, allow_quantized: bool = False) -> onnx.ModelProto:
    """Load an ONNX model (with its external data) and check that onnxprune can work on it;
    quantized graphs only with ``allow_quantized`` (inspect, gate, bench: they prune nothing).

    Every check that needs no tensor data runs before any tensor data is read.
    """
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
    check_opset(model)
    if not allow_quantized:
        check_not_quantized(model)
    check_input_sizes(model)
    _check_external_paths(model, path.parent)
    try:  # by path: works for models over 2 GB, and reads no tensor data
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelError(f"'{path}' fails the ONNX checker: {first}") from None
    onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    check_tensor_data(model)
    return upgraded(model)


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul"}


def check_not_quantized(model: onnx.ModelProto) -> None:
    """Refuse quantized graphs: their weights cannot be refit in float."""
    found = sorted({n.op_type for n in model.graph.node} & QUANTIZED_OPS)
    if found:
        raise ModelError(f"the model is quantized ({', '.join(found)}); prune the float model first, "
                         "then quantize the pruned model (--quantize int8 does both in one run)")


def default_opset(model: onnx.ModelProto) -> int | None:
    """The model's default-domain (``ai.onnx``) opset, None where it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def check_opset(model: onnx.ModelProto) -> int:
    """Return the default-domain opset, refusing a model that imports none."""
    version = default_opset(model)
    if version is None:
        raise ModelError(f"the model imports no default ONNX opset; re-export it with opset >= {MIN_OPSET}")
    return version


def upgraded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` in the form the pipeline works on: an opset older than :data:`MIN_OPSET` (ONNX
    Model Zoo classics are opset 7-10) converted to it by ``onnx.version_converter`` (the
    experimental ``ImageScaler`` written as ``Mul`` and ``Add`` first: the converter has no schema
    for it), and weights that an old exporter also listed as graph inputs (IR version 3 requires
    it) made plain initializers — constants ORT can fold, which the pruned weights' new shapes
    need. The model itself where nothing changes, else a new one; one line refuses a conversion
    that fails."""
    version = check_opset(model)
    inits = {t.name for t in model.graph.initializer}
    weights_as_inputs = any(i.name in inits for i in model.graph.input)
    if version >= MIN_OPSET and not weights_as_inputs and model.ir_version >= INITIALIZERS_APART_IR:
        return model
    model = copy.deepcopy(model)
    if weights_as_inputs:
        log.warning("the model lists its weights as graph inputs too (an old exporter's form), where ONNX Runtime "
                    "can neither fold nor fuse them: the pruned model holds them as constants only, and latency "
                    "here is measured with the original in that form too, so a speedup shown is pruning's alone "
                    "(the file as given can run several times slower in ONNX Runtime: docs/latency.md)")
    kept = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.ir_version = max(model.ir_version, INITIALIZERS_APART_IR)
    if version < MIN_OPSET:
        from onnx import version_converter

        _standard_image_scalers(model.graph)
        try:
            model = version_converter.convert_version(model, MIN_OPSET)
            _asymmetric_resizes(model.graph)
            onnx.checker.check_model(model)
        except Exception as exc:  # noqa: BLE001 - the converter raises many kinds; one line for the user
            raise ModelError(f"the model uses opset {version}; converting it to opset {MIN_OPSET} (onnx.version_converter) "
                             f"failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); re-export it with "
                             f"opset >= {MIN_OPSET}") from None
        log.warning("the model uses opset %d: converted to opset %d (onnx.version_converter); the pruned model is "
                    "written at opset %d", version, MIN_OPSET, MIN_OPSET)
    return model


def _asymmetric_resizes(graph: onnx.GraphProto) -> None:
    """Give each ``Resize`` of a converted graph the coordinate rule its source had, in place:
    ``Upsample`` and ``Resize``-10 map output pixel ``x`` to ``x / scale`` (and take the pixel
    below for nearest), while the converter leaves opset 11's defaults (half-pixel centres,
    rounding): a bilinear upsample would shift by half a pixel, a nearest one pick other pixels."""
    for node in graph.node:
        if node.op_type == "Resize" and node.domain in ("", "ai.onnx"):
            names = {a.name for a in node.attribute}
            if "coordinate_transformation_mode" not in names:
                node.attribute.append(onnx.helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
            if "nearest_mode" not in names:
                node.attribute.append(onnx.helper.make_attribute("nearest_mode", "floor"))
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                _asymmetric_resizes(sub)


def _standard_image_scalers(graph: onnx.GraphProto) -> None:
    """Rewrite the experimental ``ImageScaler`` (``y = scale·x + bias[c]``, opsets before 10) as
    ``Mul`` and ``Add`` on constants, in place."""
    nodes = []
    for node in graph.node:
        if node.op_type != "ImageScaler" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        scale_name, bias_name, scaled = (f"{node.output[0]}_imagescaler_{part}" for part in ("scale", "bias", "scaled"))
        graph.initializer.extend([
            onnx.numpy_helper.from_array(np.asarray(attrs.get("scale", 1.0), dtype=np.float32), scale_name),
            onnx.numpy_helper.from_array(np.asarray(attrs.get("bias", [0.0]), dtype=np.float32).reshape(-1, 1, 1),
                                         bias_name)])
        nodes.append(onnx.helper.make_node("Mul", [node.input[0], scale_name], [scaled], name=f"{node.name}_scale"))
        nodes.append(onnx.helper.make_node("Add", [scaled, bias_name], list(node.output), name=f"{node.name}_bias"))
    if len(nodes) > len(graph.node):
        del graph.node[:]
        graph.node.extend(nodes)


def _default_mode() -> int:
    """File mode a plain ``open()`` would give (mkstemp makes files private)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's serialized size; over 2 GB (where ``ByteSize`` fails) the tensor data plus the rest."""
    try:
        return model.ByteSize()
    except EncodeError:
        return sum(len(t.raw_data) for t in onnx.external_data_helper._get_all_tensors(model)) + (1 << 20)


def too_large(model: onnx.ModelProto) -> bool:
    """Whether the model exceeds protobuf's 2 GB limit and needs external data."""
    return model_bytes(model) > PROTOBUF_LIMIT


def _data_name(path: Path) -> str:
    """Name of the external data file written beside a large output model."""
    return f"{path.name}.data"


def _files_of(model_path: Path) -> set[Path]:
    """A model file and the external data files it refers to (resolved)."""
    files = {model_path.resolve()}
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # not readable as a model: only the file itself is protected
        return files
    return files | {(model_path.parent / _location(t).get("location", "")).resolve()
                    for t in _external_tensors(model)}


def check_output(path: str | os.PathLike, *, force: bool = False,
                 protected: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an output path that would overwrite an input (a model in ``protected`` or its
    external data), an existing file without ``force``, a folder, or that lies in a missing folder."""
    path = Path(path)
    mine = {path.resolve(), (path.parent / _data_name(path)).resolve()}
    for other in protected:
        if Path(other).is_file() and mine & _files_of(Path(other)):
            raise OutputError(f"refusing to overwrite the input model '{other}' or its data; choose another -o path")
    if path.is_dir():
        raise OutputError(f"output '{path}' is a folder; pass a file path to -o")
    if path.exists() and not force:
        raise OutputError(f"output '{path}' already exists; pass --force to overwrite it")
    check_folder(path)
    return path


def check_folder(path: str | os.PathLike) -> Path:
    """The folder ``path`` is to be written in, refusing one that does not exist; returns it."""
    folder = Path(path).parent if str(Path(path).parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"folder '{folder}' for '{Path(path).name}' does not exist; create it first")
    return folder


def _tmp_file(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(tmp)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


@contextmanager
def external_data(model: onnx.ModelProto, data_path: Path, location: str,
                  threshold: int = 1024) -> Iterator[onnx.ModelProto]:
    """Move the raw data of every tensor over ``threshold`` bytes to ``data_path`` (referred to
    as ``location``) for the duration of the block, so the proto stays under 2 GB; the tensors
    get their data back afterwards. Nothing is copied as a whole: one tensor at a time."""
    moved: list[tuple[onnx.TensorProto, int, int]] = []
    try:
        with open(data_path, "wb") as fh:
            for tensor in onnx.external_data_helper._get_all_tensors(model):
                if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.raw_data) <= threshold:
                    continue
                offset = -fh.tell() % 4096 + fh.tell()  # page-aligned, so runtimes can map it
                fh.seek(offset)
                raw = tensor.raw_data
                fh.write(raw)
                moved.append((tensor, offset, len(raw)))
                onnx.external_data_helper.set_external_data(tensor, location, offset, len(raw))
                tensor.data_location = onnx.TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
                del raw
            fh.flush()
            os.fsync(fh.fileno())
        yield model
    finally:
        if moved:
            with open(data_path, "rb") as fh:
                for tensor, offset, length in moved:
                    fh.seek(offset)
                    del tensor.external_data[:]
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    tensor.raw_data = fh.read(length)


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False,
                      protected: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write ``model`` to ``path`` via temporary files in the same folder, then rename.

    The rules of :func:`check_output` apply. Models too large for one protobuf get an external
    data file ``<name>.data`` beside them. On any failure or interrupt no new file is left.
    """
    path = check_output(path, force=force, protected=protected)
    folder = check_folder(path)
    data_path = folder / _data_name(path)
    large = too_large(model)
    if large and data_path.exists() and not force:
        raise OutputError(f"output data file '{data_path}' already exists; pass --force to overwrite it")
    made: list[Path] = []
    try:
        made.append(_tmp_file(folder, path.name))
        if large:
            made.append(_tmp_file(folder, data_path.name))
            with external_data(model, made[1], data_path.name) as small:
                _fsync_write(made[0], small.SerializeToString())
            os.chmod(made[1], _default_mode())
        else:
            _fsync_write(made[0], model.SerializeToString())
        os.chmod(made[0], _default_mode())
        if large:
            os.replace(made.pop(), data_path)
        os.replace(made[0], path)
    except BaseException:
        for leftover in made:
            leftover.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a text file via a temporary file in the same folder, then rename."""
    path = Path(path)
    folder = check_folder(path)
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


# Initializers this large are handed to ONNX Runtime as arrays (``add_external_initializers``)
# instead of going through the serialised model: serialising VGG-16's weights for each of a
# pruning run's sessions, and ORT parsing them back, cost more than the runs themselves.
HANDED_BYTES = 1 << 20
HANDED = "onnxprune:handed"  # external-data location of a stub whose data a session is handed
_HANDED_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


def _is_stub(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` is a stub of :func:`add_initializers` (its array handed to the session)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and _location(tensor).get("location") == HANDED


def _handed(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` goes to a session as an array rather than inside the model."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type not in _HANDED_TYPES:
        return False
    return prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize >= HANDED_BYTES


def add_initializers(graph: onnx.GraphProto, tensors: Iterable[onnx.TensorProto]) -> None:
    """Append ``tensors`` to ``graph`` for a session: small ones copied, large ones as stubs
    that :func:`inference_session` fills from the model they came from (``source``)."""
    for tensor in tensors:
        if not _handed(tensor):
            graph.initializer.append(tensor)
            continue
        stub = graph.initializer.add()
        stub.name, stub.data_type, stub.data_location = tensor.name, tensor.data_type, onnx.TensorProto.EXTERNAL
        stub.dims.extend(tensor.dims)
        entry = stub.external_data.add()
        entry.key, entry.value = "location", HANDED


def copy_fields(src, dst, skip: tuple[str, ...] = ()) -> None:
    """Copy the set fields of protobuf message ``src`` into ``dst``, except those in ``skip``."""
    for desc, value in src.ListFields():
        if desc.name in skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(dst, desc.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # a message
            getattr(dst, desc.name).CopyFrom(value)
        else:
            setattr(dst, desc.name, value)


def _light(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its large initializers as stubs (see :func:`add_initializers`)."""
    light = onnx.ModelProto()
    copy_fields(model, light, skip=("graph",))
    copy_fields(model.graph, light.graph, skip=("initializer",))
    add_initializers(light.graph, model.graph.initializer)
    return light


def inference_session(model: onnx.ModelProto, options, providers: list[str], source: onnx.ModelProto | None = None,
                      hand: bool = False):
    """An ONNX Runtime session for ``model`` of any size, left as it was. With ``hand``, large
    float initializers go to ORT as arrays, never serialised (for the many short-lived sessions of
    a calibration pass), and stubs made by :func:`add_initializers` are filled from ``source``;
    without it everything goes in the model, as a user's runtime would load it (latency timing).
    Over 2 GB the model goes from a temporary copy with external data."""
    from .runtime import import_ort

    ort = import_ort()
    stubs = [t.name for t in model.graph.initializer if _is_stub(t)]
    if stubs and (not hand or source is None):
        raise ValueError(f"{len(stubs)} initializers of this model are stubs (e.g. {stubs[0]!r}) whose arrays "
                         "are handed to sessions: pass hand=True and the model they came from as source")
    arrays = []
    if hand:
        own = {t.name: t for t in model.graph.initializer if _handed(t)}
        if own:
            model = _light(model)
        names = list(own) + stubs
        if names:
            wanted = set(stubs)
            given = {t.name: t for t in source.graph.initializer if t.name in wanted} if stubs else {}
            missing = wanted - given.keys()
            if missing:
                raise ValueError(f"the source model has no initializer {sorted(missing)[0]!r} for a handed stub")
            tensors = {**own, **given}
            arrays = [ort.OrtValue.ortvalue_from_numpy(onnx.numpy_helper.to_array(tensors[n])) for n in names]
            options.add_external_initializers(names, arrays)
    try:  # one serialisation: a size check first would cost as much again, per session
        data = model.SerializeToString()
    except (EncodeError, ValueError):  # over protobuf's 2 GB
        data = None
    if data is not None and len(data) <= PROTOBUF_LIMIT:
        sess = ort.InferenceSession(data, options, providers=providers)
    else:
        del data
        with tempfile.TemporaryDirectory(prefix="onnxprune-") as tmp:
            onnx_path, data_path = Path(tmp) / "model.onnx", Path(tmp) / "model.onnx.data"
            with external_data(model, data_path, data_path.name) as small:
                onnx_path.write_bytes(small.SerializeToString())
            sess = ort.InferenceSession(str(onnx_path), options, providers=providers)
    sess.handed_arrays = arrays  # ORT reads them while the session lives
    return sess
