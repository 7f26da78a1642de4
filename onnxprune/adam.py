"""Adam's update, shared by the refinements that tune weights by gradient (refine.py, tail.py)."""

from __future__ import annotations

import numpy as np


def adam_step(param: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, rate) -> None:
    """One Adam step (β = 0.9, 0.999) on ``param`` in place; ``m`` and ``v`` are its moment
    estimates, updated in place; ``step`` counts from 1; ``rate`` a scalar or an array like ``param``."""
    # two scratch arrays instead of one per operation: the tail steps hundreds of thousands of
    # weights hundreds of times, where fresh arrays cost as much as the arithmetic
    scratch = np.multiply(grad, 0.1)
    m *= 0.9
    m += scratch
    np.multiply(grad, 0.001, out=scratch)
    scratch *= grad
    v *= 0.999
    v += scratch
    denominator = np.divide(v, 1 - 0.999 ** step)
    np.sqrt(denominator, out=denominator)
    denominator += 1e-12
    np.divide(m, 1 - 0.9 ** step, out=scratch)
    scratch *= rate
    scratch /= denominator
    param -= scratch
