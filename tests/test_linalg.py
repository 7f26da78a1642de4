"""Dense solves and inverses on numpy's LAPACK: exact where the matrix is definite, the
least-squares answer where it is not."""

import numpy as np

from onnxprune.linalg import solve_spd, spd_inverse


def _gram(n=40, d=12, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x.T @ x


def test_solve_spd_solves_a_ridged_gram_system():
    a = _gram() + 1e-3 * np.eye(12)
    b = np.random.default_rng(1).normal(size=(12, 5))
    x = solve_spd(a.copy(), b.copy())
    assert np.allclose(a @ x, b, atol=1e-9)


def test_solve_spd_falls_back_to_least_squares_on_a_singular_matrix():
    a = _gram()
    a[:, -1] = a[:, 0]  # two equal unknowns: singular
    a[-1, :] = a[0, :]
    b = a @ np.ones((12, 3))  # consistent: the least-squares solution fits it exactly
    x = solve_spd(a, b)
    assert np.isfinite(x).all()
    assert np.allclose(a @ x, b, atol=1e-6)
    assert np.allclose(x, np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-6)


def test_spd_inverse_is_the_symmetric_inverse():
    h = _gram() + 1e-2 * np.eye(12)
    inv = spd_inverse(h)
    assert np.array_equal(inv, inv.T)
    assert np.allclose(inv @ h, np.eye(12), atol=1e-9)


def test_spd_inverse_of_an_indefinite_matrix_is_the_pseudo_inverse():
    h = np.diag([2.0, 1.0, 0.0, -1.0])
    assert np.allclose(spd_inverse(h), np.linalg.pinv(h))
