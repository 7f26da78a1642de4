"""``--quantize int8``: ONNX Runtime's static quantization of a pruned model, in QDQ format.

ORT's pre-processing (``quant_pre_process``: ONNX shape inference, basic graph optimisation), then
``quantize_static`` with QuantizeLinear/DequantizeLinear pairs:

- weights int8, symmetric, per output channel;
- activations by execution provider (:func:`scheme`, the one rule): uint8 asymmetric for ``cpu``,
  int8 symmetric (zero point 0) for ``cuda``/``tensorrt``;
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

from .activations import fitting_batch, padded_feed, static_batch, tensor_shapes
from .calib import Calibration
from .errors import ModelError, OptionError
from .io import QUANTIZED_OPS, copy_fields, default_opset, too_large
from .runtime import CALIBRATE_METHODS


def scheme(provider: str) -> dict[str, str]:
    """The quantization scheme for ``--provider``, as the report states it (the calibration
    method is the user's choice, the rest follows from the provider).

    Activations: TensorRT's explicit-precision mode needs symmetric int8 (zero point 0), so
    ``cuda``/``tensorrt`` get that. ORT's CPU provider wants uint8 asymmetric activations (its
    default, U8S8): with symmetric int8 ones it fused only 10 of 21 convs of resnet_fmnist and 23
    of 37 of mobilenet_fmnist into int8 kernels (the rest ran DQ → float Conv → Q, slower than
    float) and mobilenet lost 0.40–0.55 top-1 points; with uint8 every conv was fused
    (docs/benchmarks.md). Weights stay int8 symmetric per channel on both, without ORT's
    ``reduce_range`` (7-bit weights, for U8S8 on CPUs without VNNI; see the same page)."""
    activations = "uint8 asymmetric" if provider == "cpu" else "int8 symmetric"
    return {"format": "QDQ", "weights": "int8 symmetric per-channel", "activations": activations, "bias": "float"}


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
    DequantizeLinear pairs on activations are bypassed (a Relu where the pair clamps at 0, see
    :func:`_clamps_at_zero`). A float model is returned as it is;
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
            if _clamps_at_zero(src, inits):  # the quantizer may have dropped a Relu into it
                nodes.append(helper.make_node("Relu", [src.input[0]], [n.output[0]], name=f"{n.name}_relu"))
            else:
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


def _clamps_at_zero(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """Whether QuantizeLinear ``node`` maps 0 to its lowest value (uint8 zero point 0, int8 -128):
    its pair with DequantizeLinear is a Relu besides a rounding. With asymmetric activations ORT's
    quantizer removes a Relu (or a Clip from 0) whose output it quantizes that way, so the float
    view puts the Relu back (a Clip's upper bound is not restored)."""
    if len(node.input) < 3 or not node.input[2]:  # no zero point: uint8 0, the lowest value
        return True
    if node.input[2] not in inits:
        return False
    z = numpy_helper.to_array(inits[node.input[2]])
    return z.size == 1 and np.issubdtype(z.dtype, np.integer) and int(z.reshape(-1)[0]) == np.iinfo(z.dtype).min


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


PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis (per-channel weights) arrived in opset 13


def _per_channel_ready(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` at opset 13 or newer: ORT's quantizer writes per-channel ``DequantizeLinear``
    with an ``axis`` whatever the opset, which an older model cannot hold (ORT then refuses to
    load it; Paddle2ONNX and older exporters write opset 11)."""
    opset = default_opset(model) or PER_CHANNEL_OPSET
    if opset >= PER_CHANNEL_OPSET:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, PER_CHANNEL_OPSET)
    except Exception as exc:  # noqa: BLE001 - the converter raises many kinds; one line for the user
        raise ModelError(f"--quantize int8 needs opset {PER_CHANNEL_OPSET} or newer for per-channel weights, and "
                         f"converting this opset-{opset} model failed ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); convert it first or rerun without --quantize") from None


def quantize_int8(model: onnx.ModelProto, calib: Calibration, indices: Sequence[int], method: str = "minmax",
                  batch: int = 32, provider: str = "cpu", reduce_range: bool = False) -> onnx.ModelProto:
    """An int8 QDQ copy of float ``model``, its activation ranges calibrated on ``calib[indices]``
    only (by ``method``: minmax, entropy or percentile), activations typed as :func:`scheme`
    says for ``provider``. ``reduce_range`` (7-bit weights) is only for measuring it
    (tools/bench_quantize.py). ``model`` is left as it was."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise OptionError(f"unknown --calibrate-method '{method}'; choose one of {', '.join(CALIBRATE_METHODS)}")
    if _is_quantized(model):
        raise OptionError("--quantize int8: the model is already quantized; pass the float model")
    symmetric = scheme(provider)["activations"] == "int8 symmetric"
    indices = np.asarray(indices)
    if len(indices) == 0:
        raise OptionError("--quantize int8 needs calibration samples to set activation ranges; pass --calib")
    model = _per_channel_ready(model)
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
                                reduce_range=reduce_range,
                                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=methods[method],
                                use_external_data_format=large,
                                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                               "QuantizeBias": False, "CalibStridedMinMax": 1})
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"ONNX Runtime's quantizer failed on the pruned model ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:300]}); rerun without --quantize") from None
        return onnx.load(out)  # with its external data, before the folder goes
