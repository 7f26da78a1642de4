"""Selection and reconstruction on synthetic problems whose answer is known."""

import numpy as np

from onnxprune.reconstruct import refit
from onnxprune import select
from onnxprune.select import (contribution_problem, l1_select, lasso_select, lasso_selections, random_select,
                              thinet_select)
from onnxprune.stats import LayerStats


def _problem(seed=0, n=4000, c=12, cout=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c))
    x[:, 3] = x[:, 0]                         # redundant: channel 3 repeats channel 0 ...
    x[:, 7] = 2.0 * x[:, 2]                   # ... and channel 7 is twice channel 2
    w = rng.normal(size=(cout, c))
    w[:, 3] = 0.5 * w[:, 0]                   # with filters that make their contributions collinear
    w[:, 7] = w[:, 2]
    w[:, 5] = 0.0                             # contributes nothing
    w[:, 9] *= 0.01                           # contributes almost nothing
    y = x @ w.T
    return x, y, w


def _stats(x, y):
    st = LayerStats(x.shape[1], y.shape[1])
    st.add(x, y, np.arange(len(x)) % 2)
    return st


def test_lasso_keeps_exactly_the_requested_count():
    x, y, w = _problem()
    st = _stats(x, y)
    xtx, xty, _, _ = st.total()
    gram, corr = contribution_problem(xtx[:-1, :-1], xty[:-1], w, 12)
    for keep in range(1, 13):
        assert len(lasso_select(gram, corr, keep)) == keep


def _random_problem(c=40, seed=3):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(3 * c, c)) * rng.uniform(0.1, 3, c)
    t = z @ (rng.normal(size=c) * (rng.random(c) < 0.6)) + rng.normal(size=3 * c)
    return z.T @ z, z.T @ t


def test_one_lasso_path_gives_what_a_path_per_keep_gives():
    gram, corr = _random_problem()
    keeps = [1, 4, 10, 20, 33, 39, 40]
    for keep, kept in zip(keeps, lasso_selections(gram, corr, keeps)):
        np.testing.assert_array_equal(kept, lasso_selections(gram, corr, [keep])[0])
        assert len(kept) == keep


def test_groups_wider_than_lars_allows_take_the_greedy_order(monkeypatch):
    gram, corr = _random_problem()
    monkeypatch.setattr(select, "LARS_MAX_CHANNELS", 16)
    keeps = [5, 20, 40]
    for keep, kept in zip(keeps, lasso_selections(gram, corr, keeps)):
        np.testing.assert_array_equal(kept, thinet_select(gram, keep))


def test_lasso_drops_redundant_and_useless_channels():
    x, y, w = _problem()
    st = _stats(x, y)
    xtx, xty, _, _ = st.total()
    gram, corr = contribution_problem(xtx[:-1, :-1], xty[:-1], w, 12)
    kept = set(lasso_select(gram, corr, 8))
    assert 5 not in kept and 9 not in kept
    assert len(kept & {0, 3}) == 1 and len(kept & {2, 7}) == 1  # one of each redundant pair goes
    # refitting the kept channels reproduces the output (all but channel 9's 1 % share)
    fit = refit(st, np.array(sorted(kept)), w[:, sorted(kept)], np.zeros(6), fit_bias=True)
    assert fit.error_after < 1e-3 < fit.error_before


def test_contribution_gram_matches_explicit_contributions():
    rng = np.random.default_rng(1)
    c, k, cout, n = 4, 3, 5, 200
    x = rng.normal(size=(n, c * k))
    w = rng.normal(size=(cout, c * k))
    t = rng.normal(size=(n, cout))
    gram, corr = contribution_problem(x.T @ x, x.T @ t, w, c)
    z = [x[:, i * k:(i + 1) * k] @ w[:, i * k:(i + 1) * k].T for i in range(c)]
    assert np.allclose(gram, [[np.sum(a * b) for b in z] for a in z])
    assert np.allclose(corr, [np.sum(a * t) for a in z])


def test_refit_never_worse_than_slicing_on_underdetermined_problems():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 100))  # fewer samples than unknowns
    w = rng.normal(size=(4, 100))
    y = x @ w.T + rng.normal(scale=0.5, size=(30, 4))
    st = _stats(x, y)
    fit = refit(st, np.arange(100), w, np.zeros(4), fit_bias=True)
    assert fit.ridge is None or fit.ridge >= 1e-3  # cross-validation refuses a near-exact fit


def test_l1_and_random():
    assert list(l1_select(np.array([3.0, 1.0, 2.0, 0.5]), 2)) == [0, 2]
    kept = random_select(10, 4, np.random.default_rng(0))
    assert len(set(kept)) == 4 and kept.max() < 10


def test_obs_removal_cost_is_the_exact_refit_error_increase():
    """Each greedy step's cost is what the least-squares refit without that channel really loses
    (k columns per channel, bias refit), and the order drops redundant and useless channels first."""
    from onnxprune.select import RefitProblem, expand_channels, obs_order

    rng = np.random.default_rng(3)
    c, k, cout, n = 6, 2, 4, 3000
    x = rng.normal(size=(n, c * k))
    x[:, 2:4] = x[:, 0:2] + 0.01 * rng.normal(size=(n, 2))  # channel 1 nearly repeats channel 0
    w = rng.normal(size=(cout, c * k))
    w[:, 8:10] = 0.0  # channel 4 contributes nothing
    y = x @ w.T + 0.3 + 0.05 * rng.normal(size=(n, cout))
    st = _stats(x, y)
    prob = RefitProblem(st, w, np.zeros(cout), c, ridge=0.0)
    xa = np.hstack([x, np.ones((n, 1))])

    def error(kept):
        cols = np.append(expand_channels(np.asarray(kept), k), c * k)
        sol = np.linalg.lstsq(xa[:, cols], y, rcond=None)[0]
        return float(np.square(y - xa[:, cols] @ sol).sum())

    base = error(range(c))
    costs = prob.costs()
    for ch in range(c):
        loss = (error([i for i in range(c) if i != ch]) - base) / prob.energy
        assert abs(costs[ch] - loss) <= 1e-6 * max(1.0, loss)
    prob.remove(3)
    after = prob.costs()
    assert after[3] == np.inf
    base3 = error([0, 1, 2, 4, 5])
    for ch in (0, 5):
        loss = (error([i for i in (0, 1, 2, 4, 5) if i != ch]) - base3) / prob.energy
        assert abs(after[ch] - loss) <= 1e-6 * max(1.0, loss)
    order = obs_order([(RefitProblem(st, w, np.zeros(cout), c, ridge=0.0), np.arange(c), np.arange(c))],
                      c, np.arange(c))
    assert set(order[:2]) == {4, 0} or set(order[:2]) == {4, 1}


def test_obs_removes_several_channels_at_once_exactly(monkeypatch):
    """Removing two channels in one update leaves the same problem as removing them one after the
    other; a unit wider than OBS_STEPS loses several of its cheapest channels per step, and a
    shorter order is a prefix of a longer one."""
    from onnxprune import select
    from onnxprune.select import RefitProblem, obs_order

    rng = np.random.default_rng(5)
    c, k, cout, n = 8, 2, 3, 2000
    x = rng.normal(size=(n, c * k))
    w = rng.normal(size=(cout, c * k))
    y = x @ w.T + 0.1 * rng.normal(size=(n, cout))
    st = _stats(x, y)
    together, apart = RefitProblem(st, w, np.zeros(cout), c, ridge=1e-3), RefitProblem(st, w, np.zeros(cout), c, ridge=1e-3)
    together.remove(np.array([2, 5]))
    apart.remove(2)
    apart.remove(5)
    np.testing.assert_allclose(together.costs(), apart.costs(), rtol=1e-8)
    np.testing.assert_allclose(together.w, apart.w, rtol=1e-8, atol=1e-12)
    monkeypatch.setattr(select, "OBS_STEPS", 3)  # 8 channels: 3 per step
    problem = lambda: [(RefitProblem(st, w, np.zeros(cout), c, ridge=1e-3), np.arange(c), np.arange(c))]  # noqa: E731
    full = obs_order(problem(), c, np.arange(c))
    first = RefitProblem(st, w, np.zeros(cout), c, ridge=1e-3).costs()
    assert sorted(full[:3]) == sorted(np.argsort(first)[:3])  # the cheapest three, then one update
    for count in (2, 4, 7):
        np.testing.assert_array_equal(obs_order(problem(), c, np.arange(c), count=count), full[:count])


def test_obs_on_a_few_removable_channels_solves_only_their_columns():
    """A unit that is a small share of its consumer's inputs (after a Concat) has only its
    channels' columns of H⁻¹ solved for: the same costs and weights as the full inverse, step
    after step (one channel and several at once, k = 1 and k > 1), the same order."""
    from onnxprune.select import RefitProblem, obs_order

    rng = np.random.default_rng(7)
    for c, k in ((12, 1), (10, 3)):
        cout, n = 4, 3000
        x = rng.normal(size=(n, c * k))
        x[:, k:2 * k] = x[:, :k] + 0.05 * rng.normal(size=(n, k))
        w = rng.normal(size=(cout, c * k))
        y = x @ w.T + 0.2 + 0.1 * rng.normal(size=(n, cout))
        st = _stats(x, y)
        mine = np.array([1, 4, 6, 0])  # under half the channels: the partial solve
        full = RefitProblem(st, w, np.zeros(cout), c, ridge=1e-3)
        part = RefitProblem(st, w, np.zeros(cout), c, ridge=1e-3, removable=mine)
        assert part.hinv0.shape[1] == len(mine) * k < full.hinv0.shape[1]
        for step in (np.array([4]), np.array([0, 6])):
            fc, pc = full.costs(), part.costs()
            np.testing.assert_allclose(pc[mine], fc[mine], rtol=1e-7, atol=1e-12)
            assert np.isinf(np.delete(pc, mine)).all()
            full.remove(step)
            part.remove(step)
            np.testing.assert_allclose(part.w, full.w, rtol=1e-7, atol=1e-10)
        order = lambda removable: obs_order(  # noqa: E731
            [(RefitProblem(st, w, np.zeros(cout), c, ridge=1e-3, removable=removable), np.arange(c), np.arange(c))],
            c, mine)
        np.testing.assert_array_equal(order(mine), order(None))
