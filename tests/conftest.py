import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def run(model: onnx.ModelProto, x: np.ndarray | dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs on ``x``: its first input's array, or a feed of every input."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, x if isinstance(x, dict) else {sess.get_inputs()[0].name: x})


def check_pruned(pruned: onnx.ModelProto, original: onnx.ModelProto, x: np.ndarray | dict[str, np.ndarray],
                 max_rel_err: float) -> float:
    """Full checker, ORT run, same output shapes and types, relative error of the floating-point
    outputs below ``max_rel_err``."""
    onnx.checker.check_model(pruned, full_check=True)
    ref, out = run(original, x), run(pruned, x)
    assert [(r.shape, r.dtype) for r in ref] == [(o.shape, o.dtype) for o in out]
    err = max(float(np.linalg.norm(o - r) / np.linalg.norm(r)) for r, o in zip(ref, out)
              if np.issubdtype(r.dtype, np.floating))
    assert err <= max_rel_err, err
    return err


@pytest.fixture(autouse=True)
def _cli_logging_restored():
    """``cli.main`` sets up the ``onnxprune`` logger (its handler, level, propagation): undo it
    after each test, so that one test's CLI run leaves no trace in the next."""
    logger = logging.getLogger("onnxprune")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def models_dir() -> Path:
    return MODELS
