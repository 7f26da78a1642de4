"""ONNX Runtime: the one place onnxprune imports it, the execution providers and quantization settings it names.

onnxprune depends on no ONNX Runtime build of its own: ``pip install "onnxprune[cpu]"`` brings
``onnxruntime``, ``pip install "onnxprune[gpu]"`` brings ``onnxruntime-gpu``. Both install the same
``onnxruntime`` module and break each other when both are there, so exactly one must be chosen.
Without one, :func:`import_ort` raises a one-line error naming the two installs (the CLI prints it
as ``onnxprune: error: …`` and exits 2). This module itself imports without ONNX Runtime.
"""

from __future__ import annotations

from types import ModuleType

from .errors import PruneError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
# --quantize formats and ORT's static-quantization calibration methods (onnxprune/quantize.py),
# named here so that the CLI can offer them before ONNX Runtime is imported
QUANTIZE_FORMATS = ("int8",)
CALIBRATE_METHODS = ("minmax", "entropy", "percentile")

INSTALL = 'pip install "onnxprune[cpu]" (CPU) or pip install "onnxprune[gpu]" (CUDA / TensorRT), not both'


class MissingRuntimeError(ImportError, PruneError):
    """No usable ONNX Runtime: an ImportError to library users, a one-line error (exit 2) in the CLI."""

    exit_code = 2


def import_ort() -> ModuleType:
    """The ``onnxruntime`` module, or :class:`MissingRuntimeError` naming the two installs."""
    try:
        import onnxruntime
    except ImportError as exc:
        if exc.name == "onnxruntime":  # not installed at all
            raise MissingRuntimeError(f"ONNX Runtime is not installed; install one build: {INSTALL}") from None
        detail = " ".join(str(exc).split())  # one line
        raise MissingRuntimeError(f"ONNX Runtime cannot be imported ({detail}); reinstall one build: "
                                  f"{INSTALL}") from None
    if not hasattr(onnxruntime, "InferenceSession"):  # an empty shell: one build uninstalled over the other
        raise MissingRuntimeError(f"the installed ONNX Runtime is incomplete (onnxruntime and onnxruntime-gpu "
                                  f"installed over each other?); uninstall both, then {INSTALL}")
    return onnxruntime


def default_round_to(provider: str) -> int:
    """The channel multiple pruned widths are rounded to unless the user says otherwise: 16 on
    CPU (ORT's NCHWc kernels block channels by 16 on AVX-512 and 8 on AVX2; other counts get
    layout reorders around the conv; measured on ResNet-50: 21 reorder nodes at exact widths,
    3 at multiples of 8, 1 at 16), 8 on GPUs (Tensor Core tiles)."""
    return 16 if provider == "cpu" else 8
