"""Channel selection criteria: which input channels of a group to keep.

Each criterion returns the sorted indices of the channels to keep.
"""

from __future__ import annotations

import enum
import warnings

import numpy as np


class Method(str, enum.Enum):
    """Channel selection methods."""

    LASSO = "lasso"
    L1 = "l1"
    RANDOM = "random"

    @property
    def needs_data(self) -> bool:
        return self is Method.LASSO


def contribution_problem(xtx: np.ndarray, xt_target: np.ndarray, weight: np.ndarray,
                         channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrix and correlations of the per-channel contributions ``Z_c = X_c W_cᵀ``.

    ``xtx`` is ``XᵀX [D, D]`` of the input patches, ``xt_target`` is ``XᵀT [D, Cout]`` with T
    the target (output minus bias), ``weight`` is ``[Cout, D]`` with ``D = channels·k``.
    Returns ``G[c, d] = <Z_c, Z_d>`` and ``b[c] = <Z_c, T>`` without forming any ``Z_c``.
    """
    k = weight.shape[1] // channels
    m = weight.T @ weight  # [D, D]
    gram = (xtx * m).reshape(channels, k, channels, k).sum(axis=(1, 3))
    corr = (weight.T * xt_target).reshape(channels, k, -1).sum(axis=(1, 2))
    return gram, corr


def lasso_select(gram: np.ndarray, corr: np.ndarray, keep: int) -> np.ndarray:
    """Channels kept by LASSO: ``min ‖T − Σ β_c Z_c‖² + λ‖β‖₁`` with λ raised until ``keep`` remain.

    The whole λ path is followed exactly (LARS-lasso on the Gram matrix, warm by construction);
    the first point with at least ``keep`` non-zero β gives the selection, topped up or cut by |β|.
    """
    from sklearn.linear_model import lars_path_gram

    c = len(corr)
    if keep >= c:
        return np.arange(c)
    scale = np.trace(gram) / c or 1.0
    g = gram / scale
    b = corr / scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, coefs = lars_path_gram(Xy=b, Gram=g, n_samples=1, method="lasso",
                                     max_iter=max(keep * 4, 50), eps=1e-12)
    nnz = (np.abs(coefs) > 0).sum(axis=0)
    hit = np.flatnonzero(nnz >= keep)
    beta = coefs[:, hit[0]] if len(hit) else coefs[:, -1]
    # rank by |β|, breaking ties (zeros) by each channel's own contribution energy
    order = np.lexsort((-np.diag(g), -np.abs(beta)))
    return np.sort(order[:keep])


def l1_select(filter_norms: np.ndarray, keep: int) -> np.ndarray:
    """Channels whose producing filters have the largest L1 norm (Li et al. 2017)."""
    order = np.argsort(-filter_norms, kind="stable")
    return np.sort(order[:keep])


def random_select(channels: int, keep: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random subset of channels: the baseline every criterion must beat."""
    return np.sort(rng.choice(channels, size=keep, replace=False))
