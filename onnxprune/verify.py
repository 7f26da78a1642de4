"""Pruned vs original on held-out samples: relative output error and top-1 agreement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .activations import run_batches
from .calib import Calibration


@dataclass
class OutputFidelity:
    """How close one output of the pruned model stays to the original's."""

    name: str
    relative_error: float  # ‖y' − y‖ / ‖y‖ over all held-out samples
    max_abs_diff: float
    top1_agreement: float | None  # for outputs that look like class scores [N, K]


def compare(original: onnx.ModelProto, pruned: onnx.ModelProto, calib: Calibration,
            indices: Sequence[int], batch: int | None = None, provider: str = "cpu") -> list[OutputFidelity]:
    """Run both models on ``calib[indices]`` and compare every graph output."""
    names = [o.name for o in original.graph.output]
    acc = {n: [0.0, 0.0, 0.0, 0, 0] for n in names}  # err², ref², maxdiff, agree, count
    runs = zip(run_batches(original, names, calib, indices, batch, provider),
               run_batches(pruned, names, calib, indices, batch, provider))
    for (_, ref), (_, out) in runs:
        for n in names:
            a, b = ref[n].astype(np.float64), out[n].astype(np.float64)
            s = acc[n]
            s[0] += float(((b - a) ** 2).sum())
            s[1] += float((a ** 2).sum())
            s[2] = max(s[2], float(np.abs(b - a).max()) if a.size else 0.0)
            if a.ndim == 2 and a.shape[1] > 1:
                s[3] += int((a.argmax(1) == b.argmax(1)).sum())
                s[4] += a.shape[0]
    return [OutputFidelity(n, (s[0] / s[1]) ** 0.5 if s[1] > 0 else float(s[0] > 0), s[2],
                           s[3] / s[4] if s[4] else None) for n, s in acc.items()]


def guard_loss(fidelity: list[OutputFidelity]) -> float:
    """What ``--max-drop`` bounds: the worst output's top-1 disagreement for class scores,
    otherwise its relative error."""
    return max((1 - f.top1_agreement if f.top1_agreement is not None else f.relative_error) for f in fidelity)
