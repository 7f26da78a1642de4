"""``--quantize int8``: ONNX Runtime's static quantization of a pruned model, in QDQ format.

ORT's pre-processing (``quant_pre_process``: ONNX shape inference, basic graph optimisation), then
``quantize_static`` with QuantizeLinear/DequantizeLinear pairs:

- weights int8, symmetric, per output channel;
- activations int8, symmetric (zero point 0): what TensorRT's explicit-precision mode requires,
  and ORT's CPU kernels run it too;
- biases left in float (``QuantizeBias: False``), TensorRT's convention (it folds the bias in
  float). ORT's CPU provider still fuses DQ → Conv → Q into its int8 kernels with a float bias:
  on vgg_fmnist pruned 2x, int32 and float biases measured the same latency and accuracy;
- activation ranges calibrated on the samples given (the pipeline passes the fit part of the
  calibration data; the held-out part stays for verification) by min/max, entropy or percentile.

ORT's quantizer works on files: everything happens in a temporary folder that is always removed.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Sequence
from io import StringIO
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .activations import copy_fields, fitting_batch, padded_feed, static_batch, tensor_shapes
from .calib import Calibration
from .errors import ModelError, OptionError
from .io import QUANTIZED_OPS, too_large
from .runtime import CALIBRATE_METHODS

# What the report states about the format: fixed, only the calibration method is the user's.
SCHEME = {"format": "QDQ", "weights": "int8 symmetric per-channel", "activations": "int8 symmetric",
          "bias": "float"}


class _Reader:
    """ORT's ``CalibrationDataReader`` over ``calib[indices]`` in batches (padded to a static
    batch size); ``set_range`` lets ORT collect a few batches at a time (see ``CalibStridedMinMax``)."""

    def __init__(self, calib: Calibration, indices: np.ndarray, batch: int, static: int | None):
        self.calib, self.static = calib, static
        self.chunks = [indices[i:i + batch] for i in range(0, len(indices), batch)]
        self.start, self.end = 0, len(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.chunks))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= self.end:
            return None
        self.start += 1
        return padded_feed(self.calib, self.chunks[self.start - 1], self.static)


def _is_quantized(model: onnx.ModelProto) -> bool:
    """Whether ``model`` already holds quantization ops (QDQ pairs, QLinear*, *Integer)."""
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


def dequantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float view of a QDQ model, for counting its MACs and params (``inspect``, ``gate``):
    DequantizeLinear of constant weights becomes a float initializer, QuantizeLinear →
    DequantizeLinear pairs on activations are bypassed. A float model is returned as it is;
    other quantized ops (QLinearConv, ConvInteger…) are refused, their costs are not counted."""
    if not _is_quantized(model):
        return model
    other = sorted({n.op_type for n in model.graph.node} & (QUANTIZED_OPS - {"QuantizeLinear", "DequantizeLinear"}))
    if other:
        raise ModelError(f"MACs and params of quantized ops ({', '.join(other)}) are not counted; quantize in "
                         "QDQ format (QuantizeLinear/DequantizeLinear pairs) to inspect or gate them")
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    rename: dict[str, str] = {}
    weights: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if n.op_type == "DequantizeLinear" and all(i in inits for i in n.input if i):
            weights.append(numpy_helper.from_array(_dequantize(n, inits), n.output[0]))
            continue
        src = producer.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if src is not None and src.op_type == "QuantizeLinear":
            rename[n.output[0]] = src.input[0]
            continue
        nodes.append(n)

    def resolve(name: str) -> str:  # through chains of bypassed pairs
        while name in rename:
            name = rename[name]
        return name

    nodes = [copy.deepcopy(n) for n in nodes]  # the model itself is left as it was
    for n in nodes:
        n.input[:] = [resolve(name) for name in n.input]
    outputs = {o.name for o in g.output}
    nodes += [helper.make_node("Identity", [resolve(o)], [o]) for o in outputs if o in rename]
    read = {i for n in nodes for i in n.input} | outputs
    nodes = [n for n in nodes if n.op_type != "QuantizeLinear" or any(o in read for o in n.output)]
    read = {i for n in nodes for i in n.input} | outputs
    view = onnx.ModelProto()
    copy_fields(model, view, skip=("graph",))
    copy_fields(g, view.graph, skip=("node", "initializer", "value_info"))
    view.graph.node.extend(nodes)
    view.graph.initializer.extend(t for t in [*g.initializer, *weights] if t.name in read)
    return view


def _dequantize(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The float values of DequantizeLinear ``node`` over constant inputs (per-tensor or per-axis)."""
    q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) \
        if len(node.input) > 2 and node.input[2] else np.zeros_like(scale)
    if scale.ndim == 1 and q.ndim > 1:  # per-axis
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def quantize_int8(model: onnx.ModelProto, calib: Calibration, indices: Sequence[int], method: str = "minmax",
                  batch: int = 32) -> onnx.ModelProto:
    """An int8 QDQ copy of float ``model``, its activation ranges calibrated on ``calib[indices]``
    only (by ``method``: minmax, entropy or percentile). ``model`` is left as it was."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise OptionError(f"unknown --calibrate-method '{method}'; choose one of {', '.join(CALIBRATE_METHODS)}")
    if _is_quantized(model):
        raise OptionError("--quantize int8: the model is already quantized; pass the float model")
    indices = np.asarray(indices)
    if len(indices) == 0:
        raise OptionError("--quantize int8 needs calibration samples to set activation ranges; pass --calib")
    static = static_batch(model)
    # ORT's calibrator keeps every tensor of the batches it has collected: one batch at a time
    # (the stride below), sized so that all of a batch's activations stay within the budget
    bs = static or fitting_batch(tensor_shapes(model, calib), batch)
    reader = _Reader(calib, indices, bs, static)
    large = too_large(model)
    with tempfile.TemporaryDirectory(prefix="onnxprune-quantize-") as tmp:
        src, pre, out = (str(Path(tmp) / f) for f in ("float.onnx", "pre.onnx", "int8.onnx"))
        onnx.save_model(model, src, save_as_external_data=large, location="float.onnx.data")
        # no symbolic shape inference: it needs sympy (not a dependency of onnxruntime), and ONNX's
        # own inference types every tensor of a CNN (same quantized graphs on the shipped models)
        quant_pre_process(src, pre, skip_symbolic_shape=True, save_as_external_data=large,
                          all_tensors_to_one_file=True, external_data_location="pre.onnx.data")
        try:  # ORT's histogram calibrators print their progress: not onto onnxprune's stdout (the report)
            with contextlib.redirect_stdout(StringIO()):
                quantize_static(pre, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                calibrate_method=methods[method], use_external_data_format=large,
                                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                               "QuantizeBias": False, "CalibStridedMinMax": 1})
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"ONNX Runtime's quantizer failed on the pruned model ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:300]}); rerun without --quantize") from None
        return onnx.load(out)  # with its external data, before the folder goes
