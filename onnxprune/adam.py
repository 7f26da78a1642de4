"""Adam's update, shared by the refinements that tune weights by gradient (refine.py, tail.py)."""

from __future__ import annotations

import numpy as np


def adam_step(param: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, rate) -> None:
    """One Adam step (β = 0.9, 0.999) on ``param`` in place; ``m`` and ``v`` are its moment
    estimates, updated in place; ``step`` counts from 1; ``rate`` a scalar or an array like ``param``."""
    m *= 0.9
    m += 0.1 * grad
    v *= 0.999
    v += 0.001 * grad * grad
    param -= rate * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-12)
