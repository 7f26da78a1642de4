"""Kept samples (fewer samples than unknowns) give the same statistics, refits and channel
contributions as XᵀX, without forming it."""

import numpy as np
import pytest

from onnxprune import reconstruct
from onnxprune.reconstruct import held_out_error, refit
from onnxprune.select import normalized_contribution, sampled_contribution_problem
from onnxprune.sensitivity import error_curve
from onnxprune.stats import LayerStats, pooled


def _both(n=60, channels=10, k=9, cout=7, seed=0):
    rng = np.random.default_rng(seed)
    d = channels * k
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(cout, d)).astype(np.float32)
    y = (x @ w.T + rng.normal(scale=0.3, size=(n, cout)) + 0.5).astype(np.float32)
    fold = rng.integers(0, 2, n)
    gram, kept = LayerStats(d, cout), LayerStats(d, cout, rows=n)
    for part in np.array_split(np.arange(n), 3):  # in batches, as the sampler adds them
        gram.add(x[part], y[part], fold[part])
        kept.add(x[part], y[part], fold[part])
    return gram, kept, w


def test_samples_are_kept_only_when_fewer_than_the_unknowns():
    assert LayerStats(90, 3, rows=91).samples_kept
    assert not LayerStats(90, 3, rows=92).samples_kept
    assert not LayerStats(90, 3).samples_kept
    with pytest.raises(ValueError, match="announced"):
        LayerStats(4, 1, rows=2).add(np.zeros((3, 4)), np.zeros((3, 1)), np.zeros(3))


def test_kept_samples_give_the_same_totals_and_errors():
    gram, kept, w = _both()
    for a, b in zip(gram.total(), kept.total()):  # float32 sums in another order: error ∝ largest term
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())
    w_aug = np.vstack([w.T, np.full((1, w.shape[0]), 0.5)]).astype(np.float64)
    for fold in (None, 0, 1):
        assert kept.error(w_aug, fold) == pytest.approx(gram.error(w_aug, fold), rel=1e-4)
    np.testing.assert_allclose(kept.y_sum(), gram.total()[1][-1], rtol=1e-5)


def test_one_folds_samples_split_again_by_image():
    _, kept, _ = _both(n=60)
    part = kept.fold_part(0, per_image=3)
    x, y = kept.samples(fold=0)
    px, py = part.samples()
    np.testing.assert_array_equal(px, x)
    np.testing.assert_array_equal(py, y)
    assert part.n.sum() == len(x) and part.samples_kept
    # three consecutive rows (one image) share a fold; the images alternate between the two
    np.testing.assert_array_equal(part.fold[:part.filled], (np.arange(len(x)) // 3) % 2)


@pytest.mark.parametrize("block", [None, 200])  # sample-space update (keep=10) whole, or two outputs at a time
@pytest.mark.parametrize("fit_bias", [True, False])
@pytest.mark.parametrize("keep", [3, 10])  # 27 + 1 unknowns (fewer than samples), 90 + 1 (more)
def test_sample_space_refit_matches_the_gram_refit(fit_bias, keep, block, monkeypatch):
    if block:
        monkeypatch.setattr(reconstruct, "UPDATE_BLOCK_VALUES", block)
    gram, kept, w = _both()
    cols = np.arange(keep * 9)
    bias = np.full(w.shape[0], 0.2)
    a, b = refit(gram, cols, w[:, cols], bias, fit_bias), refit(kept, cols, w[:, cols], bias, fit_bias)
    assert a.ridge == b.ridge
    assert b.error_before == pytest.approx(a.error_before, rel=1e-4)
    assert b.error_after == pytest.approx(a.error_after, rel=1e-3)
    np.testing.assert_allclose(b.weight, a.weight, rtol=1e-3, atol=1e-3 * np.abs(a.weight).max())
    assert held_out_error(kept, cols, w[:, cols], bias, fit_bias) == pytest.approx(
        held_out_error(gram, cols, w[:, cols], bias, fit_bias), rel=1e-3)


def test_sampled_contributions_match_the_gram_form():
    gram, kept, w = _both(n=40, channels=6, k=49, cout=5)
    bias = np.linspace(-0.5, 0.5, 5)
    g1, c1 = normalized_contribution(gram, w, bias, 6)
    d = kept.dim
    n = int(kept.n.sum())
    energy = kept.yy.sum() - 2 * bias @ kept.y_sum() + n * bias @ bias
    g2, c2 = sampled_contribution_problem(kept, w, bias, 6, budget=6 * 5 * 4 * 7)  # 7 samples at a time
    np.testing.assert_allclose(g2 / energy, g1, rtol=1e-4, atol=1e-6 * np.abs(g1).max())
    np.testing.assert_allclose(c2 / energy, c1, rtol=1e-4, atol=1e-6 * np.abs(c1).max())
    assert d == 6 * 49


def test_error_curves_agree():
    gram, kept, w = _both(n=50, channels=8, k=9, cout=6, seed=3)
    bias = np.zeros(6)
    a = error_curve(None, [None], [gram], [w], [bias], 8)
    b = error_curve(None, [None], [kept], [w], [bias], 8)
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6)


def test_finite_tells_overflowing_statistics_in_both_forms():
    gram, kept, _ = _both()
    assert gram.finite() and kept.finite()
    x = np.full((4, gram.dim), 1e30, np.float32)  # finite, but its squares overflow float32
    y = np.zeros((4, gram.outputs), np.float32)
    gram.add(x, y, np.array([0, 1, 0, 1]))
    assert not gram.finite()
    fresh = LayerStats(kept.dim, kept.outputs, rows=4)
    fresh.add(x * np.inf, y, np.array([0, 1, 0, 1]))
    assert not fresh.finite()


@pytest.mark.parametrize("kept_samples", [False, True])
def test_frozen_statistics_refit_some_columns_with_the_rest_held(kept_samples):
    """``frozen(columns, weight)`` is the problem of those columns alone, the other columns'
    contributions taken out of the targets: its error of any weights equals the full problem's
    with the other columns at their weights."""
    rng = np.random.default_rng(2)
    n, d, cout = 10 if kept_samples else 400, 10, 3
    x, w = rng.normal(size=(n, d)), rng.normal(size=(cout, d))
    y = x @ w.T + 0.2 + 0.1 * rng.normal(size=(n, cout))
    st = LayerStats(d, cout, n if kept_samples else None)
    st.add(x.astype(np.float32), y.astype(np.float32), (np.arange(n) % 2).astype(np.int8))
    cols = np.array([1, 4, 5, 8])
    alone = st.frozen(cols, w)
    assert alone.dim == 4 and st.samples_kept == kept_samples
    trial = np.vstack([rng.normal(size=(4, cout)), rng.normal(size=(1, cout))])  # the columns' weights, bias
    full = np.zeros((d + 1, cout))
    full[np.setdiff1d(np.arange(d), cols)] = w[:, np.setdiff1d(np.arange(d), cols)].T
    full[cols], full[d] = trial[:4], trial[4]
    for fold in (0, 1):
        assert alone.error(trial, fold) == pytest.approx(st.error(full, fold), rel=1e-4)


def test_output_error_sums_large_outputs_in_blocks(monkeypatch):
    """The squared sums of an output's error (the probes', the held-out check's) over a dense
    output (a segmentation map: 10⁷ values per batch) go a block of rows at a time in float64;
    they equal the whole-array sums, scalars and empty selections included."""
    from onnxprune import verify

    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 3, 5, 5)).astype(np.float32)
    b = a + rng.normal(scale=0.1, size=a.shape).astype(np.float32)
    whole = (float(((b.astype(np.float64) - a) ** 2).sum()), float((a.astype(np.float64) ** 2).sum()))
    monkeypatch.setattr(verify, "SUM_BLOCK", 160)  # two rows of 75 values per block
    np.testing.assert_allclose(verify.squared_sums(a, b), whole, rtol=1e-12)
    assert verify.squared_sums(a[:0], b[:0]) == (0.0, 0.0)
    assert verify.squared_sums(np.float32(2.0), np.float32(3.0)) == (1.0, 4.0)


def test_inputs_with_one_value_per_image_are_counted_by_images(monkeypatch):
    """DeepLab's image pooling: a pooled vector broadcast back over the map gives a refit's input
    columns that hold one value per image (up to the resize's rounding). Their weights see one
    sample per image however many positions are drawn, so the refit counts images for them and
    cross-validates its ridge: with positions counted, it took the smallest ridge and the
    projection's pooled weights grew eightfold (the output's relative error 0.14 → 2.3)."""
    rng = np.random.default_rng(0)
    images, per = 30, 40
    varying = rng.normal(size=(images * per, 4))
    pooled = np.repeat(rng.normal(size=(images, 20)), per, axis=0) * (1 + 1e-7 * rng.normal(size=(images * per, 20)))
    x = np.hstack([varying, pooled, np.zeros((images * per, 1))]).astype(np.float32)  # last: a dead input
    y = (x @ rng.normal(size=(25, 3)) + rng.normal(scale=0.1, size=(images * per, 3))).astype(np.float32)
    fold = np.repeat(np.arange(images) % 2, per)
    st = LayerStats(25, 3)
    for part in np.array_split(np.arange(images), 3):
        rows = (part[:, None] * per + np.arange(per)).ravel()
        st.add(x[rows], y[rows], fold[rows], per_image=per)
    assert st.images == images
    assert st.per_image_constant.tolist() == [False] * 4 + [True] * 20 + [False]
    assert st.samples_per_unknown(np.arange(4)) == pytest.approx(images * per / 5)
    assert st.samples_per_unknown(np.arange(25)) == pytest.approx(images / 21)
    assert st.samples_per_unknown(np.arange(25), fit_bias=False) == pytest.approx(images / 20)
    frozen = st.frozen(np.arange(4, 25), np.zeros((3, 25)))
    assert frozen.images == images and frozen.per_image_constant.sum() == 20
    # with all positions counted (1 200 rows for 26 unknowns) the refit would skip cross-validation
    searched = []
    descend = reconstruct._descend
    monkeypatch.setattr(reconstruct, "_descend", lambda *a: searched.append(1) or descend(*a))
    refit(st, np.arange(4), np.zeros((3, 4)), np.zeros(3), True)
    assert not searched
    refit(st, np.arange(25), np.zeros((3, 25)), np.zeros(3), True)
    assert searched


def test_pooled_problems_are_the_problem_of_all_their_samples():
    rng = np.random.default_rng(3)
    x, y, fold = rng.normal(size=(80, 12)).astype(np.float32), rng.normal(size=(80, 3)).astype(np.float32), \
        rng.integers(0, 2, 80)
    whole = LayerStats(12, 3)
    whole.add(x, y, fold)
    halves = [LayerStats(12, 3), LayerStats(12, 3, rows=5)]  # one as XᵀX, one keeping its few samples
    halves[0].add(x[:75], y[:75], fold[:75])
    halves[1].add(x[75:], y[75:], fold[75:])
    together = pooled(halves)
    assert not together.samples_kept and pooled([whole]) is whole
    for a, b in zip(together.total(), whole.total()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(together.n, whole.n)
    parts = [LayerStats(12, 3, rows=4), LayerStats(12, 3, rows=4)]
    for i, part in enumerate(parts):
        part.add(x[4 * i:4 * i + 4], y[4 * i:4 * i + 4], fold[4 * i:4 * i + 4])
    few = pooled(parts)  # 8 samples for 13 unknowns: kept, in order
    assert few.samples_kept and few.filled == 8
    np.testing.assert_array_equal(few.x[:, :-1], x[:8])
