"""Solvers for T and the reservoir token buffer, against float64 numpy references."""
import logging
import os
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme.solvers import (
    SOLVERS, NormalEquations, SolveResult, choose_alpha, cosine, diag, evaluate_loss, get_solver, lstsq,
    orth_diag, relative_residual)
from replaceme_jax.replaceme.token_buffer import TokenBuffer

D = 48          # one width for the closed-form tests, so the jitted solve compiles once
N = 2000


def rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def np_lstsq(m, r):
    return np.linalg.lstsq(np.asarray(m, np.float64), np.asarray(r, np.float64), rcond=None)[0]


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


def well_conditioned(rng, n=N, d=D):
    return rng.standard_normal((n, d)) @ (np.eye(d) + 0.2 * rng.standard_normal((d, d)) / np.sqrt(d))


def column_scaled(rng, n=N, d=D):
    """Activation-like: correlated features of scales spanning 1e-3..1e3 (massive features), cond ~ 1e6."""
    return well_conditioned(rng, n, d) * np.logspace(-3, 3, d)[rng.permutation(d)]


def rotated(rng, cond, n=N, d=D):
    """Singular values log-spaced over [1/cond, 1] in random bases: ill-conditioning no scaling removes."""
    u, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (u * np.logspace(0, -np.log10(cond), d)) @ v.T


def with_noise(rng, clean, level):
    return clean + level * np.std(clean) * rng.standard_normal(clean.shape)


# ------------------------------------------------------------------ closed-form solvers

def test_lstsq_recovers_exact_transform(rng):
    m = well_conditioned(rng)
    t_star = rng.standard_normal((D, D))
    result = lstsq(NormalEquations.from_arrays(m, m @ t_star))
    assert isinstance(result, SolveResult) and result.T.shape == (D, D)
    assert result.info["method"] == "cholesky" and result.info["rank"] == D
    assert rel(result.T, t_star) <= 1e-6
    assert abs(result.final_loss) < 1e-10


@pytest.mark.parametrize("kind", ["column_scaled", "rotated_1e5"])
def test_lstsq_matches_numpy_on_ill_conditioned_data(rng, kind):
    m = column_scaled(rng) if kind == "column_scaled" else rotated(rng, 1e5)
    m = m.astype(np.float32)   # activations arrive as float32
    cond = np.linalg.cond(m.astype(np.float64))
    assert cond > (1e5 if kind == "column_scaled" else 5e4)
    r = with_noise(rng, m @ rng.standard_normal((D, D)), 1e-2).astype(np.float32)
    result = lstsq(NormalEquations.from_arrays(m, r))
    assert result.info["method"] == "cholesky"
    assert rel(result.T, np_lstsq(m, r)) <= 1e-5


def test_lstsq_accepts_float32_jax_statistics_and_float32_path(rng):
    m = well_conditioned(rng).astype(np.float32)
    r = with_noise(rng, m @ rng.standard_normal((D, D)), 0.1).astype(np.float32)
    ref = np_lstsq(m, r)
    ne = NormalEquations.from_arrays(m, r)
    ne32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), ne)
    assert rel(lstsq(ne32).T, ref) <= 1e-5          # float64 solve of float32 sums
    fast = lstsq(ne32, precision="float32")
    assert fast.info["precision"] == "float32" and rel(fast.T, ref) <= 1e-4


def test_lstsq_does_not_leak_x64(rng):
    m = well_conditioned(rng)
    lstsq(NormalEquations.from_arrays(m, m))
    assert not jax.config.jax_enable_x64
    assert jnp.asarray(1.0).dtype == jnp.float32


def test_ridge_matches_float64_normal_equations(rng):
    m = rotated(rng, 1e4)
    r = with_noise(rng, m @ rng.standard_normal((D, D)), 0.1)
    ne = NormalEquations.from_arrays(m, r)
    for alpha in (1e-6, 1e-2, 10.0):
        expected = np.linalg.solve(m.T @ m + alpha * np.eye(D), m.T @ r)
        result = lstsq(ne, alpha=alpha)
        assert result.info["alpha"] == alpha
        assert rel(result.T, expected) <= 1e-8


def test_ridge_toward_identity_matches_float64_and_shrinks_to_plain_drop(rng):
    m = rotated(rng, 1e4)
    r = with_noise(rng, m @ rng.standard_normal((D, D)), 0.1)
    ne = NormalEquations.from_arrays(m, r)
    for alpha in (1e-6, 1e-2, 10.0):
        # argmin ||m T - r||² + α ||T - I||²  <=>  (mᵀm + αI) T = mᵀr + αI
        expected = np.linalg.solve(m.T @ m + alpha * np.eye(D), m.T @ r + alpha * np.eye(D))
        for precision, tol in (("float64", 1e-8), ("float32", 2e-2)):
            result = lstsq(ne, alpha=alpha, toward="identity", precision=precision)
            assert result.info["toward"] == "identity" and rel(result.T, expected) <= tol, (alpha, precision)
    huge = 1e6 * np.trace(m.T @ m) / D
    assert rel(lstsq(ne, alpha=huge, toward="identity").T, np.eye(D)) < 1e-4   # -> T = I: plain drop
    assert np.linalg.norm(lstsq(ne, alpha=huge).T) < 1e-4 * np.sqrt(D)          # -> T = 0
    with pytest.raises(ReplaceMeError, match="unknown ridge target 'one'"):
        lstsq(ne, alpha=1.0, toward="one")


def test_choose_alpha_picks_the_lowest_validation_residual(rng):
    d = D
    t_star = rng.standard_normal((d, d))
    m_train, m_val = well_conditioned(rng, 3 * d), well_conditioned(rng, N)  # few tokens: ridge helps
    train = NormalEquations.from_arrays(m_train, with_noise(rng, m_train @ t_star, 2.0))
    val = NormalEquations.from_arrays(m_val, with_noise(rng, m_val @ t_star, 2.0))
    grid = [0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    scale = np.trace(m_train.T @ m_train) / d
    by_hand = [float(relative_residual(val, lstsq(train, alpha=g * scale).T)) for g in grid]
    chosen = choose_alpha(lstsq, train, val, grid)
    best = int(np.argmin(by_hand))
    assert chosen.info["alpha_relative"] == grid[best] and chosen.info["alpha"] == pytest.approx(grid[best] * scale)
    assert [g for g, _ in chosen.info["alpha_grid"]] == grid
    np.testing.assert_allclose([v for _, v in chosen.info["alpha_grid"]], by_hand, rtol=1e-9)
    assert grid[best] > 0  # noisy targets and few tokens: some shrinkage beats none on held-apart data
    with pytest.raises(ReplaceMeError, match="alpha grid must hold values >= 0"):
        choose_alpha(lstsq, train, val, [-1.0])


def test_diag_matches_per_feature_least_squares(rng):
    m = well_conditioned(rng)
    r = with_noise(rng, m * rng.uniform(0.5, 2.0, D), 0.3)
    ne = NormalEquations.from_arrays(m, r)
    for alpha in (0.0, 5.0):
        result = diag(ne, alpha=alpha)
        # Independent reference: ridge regression of each target column on its own feature,
        # as an augmented least-squares problem.
        expected = [np_lstsq(np.concatenate([m[:, [j]], [[np.sqrt(alpha)]]]),
                             np.concatenate([r[:, [j]], [[0.0]]]))[0, 0] for j in range(D)]
        assert np.count_nonzero(result.T - np.diag(np.diagonal(result.T))) == 0
        np.testing.assert_allclose(np.diagonal(result.T), expected, rtol=1e-10)


def test_singular_gram_falls_back_to_pseudo_inverse(rng, caplog):
    m = well_conditioned(rng)
    m[:, 7] = m[:, 3]          # duplicate feature
    m[:, 11] = 0.0             # dead feature
    r = with_noise(rng, m @ rng.standard_normal((D, D)), 0.1)
    with caplog.at_level(logging.WARNING, logger="replaceme_jax.replaceme.solvers"):
        result = lstsq(NormalEquations.from_arrays(m, r))
    assert np.all(np.isfinite(result.T))
    assert result.info["method"] == "eigh_pinv" and result.info["rank"] == D - 2
    assert any("rank 46 of 48" in rec.getMessage() for rec in caplog.records)
    # The minimum-norm solution, as numpy's SVD-based lstsq gives it.
    assert rel(result.T, np_lstsq(m, r)) <= 1e-8
    assert np.all(result.T[11] == 0.0)


def test_relative_residual_equals_explicit_residual(rng):
    m = column_scaled(rng)
    r = with_noise(rng, m @ rng.standard_normal((D, D)), 0.5)
    ne = NormalEquations.from_arrays(m, r)
    for t in (rng.standard_normal((D, D)), lstsq(ne).T):
        explicit = np.sum((m @ t - r) ** 2) / np.sum(r ** 2)
        assert relative_residual(ne, t) == pytest.approx(explicit, rel=1e-9)
    assert lstsq(ne).final_loss == pytest.approx(relative_residual(ne, lstsq(ne).T))


def test_normal_equations_is_a_pytree_that_adds(rng):
    m, r = rng.standard_normal((200, 8)), rng.standard_normal((200, 8))
    whole = NormalEquations.from_arrays(m, r)
    parts = NormalEquations.from_arrays(m[:50], r[:50]) + NormalEquations.from_arrays(m[50:], r[50:])
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(parts)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert len(jax.tree.leaves(whole)) == 4 and whole.d == 8 and parts.count == 200
    doubled = jax.jit(lambda ne: ne + ne)(jax.tree.map(jnp.asarray, whole))
    assert isinstance(doubled, NormalEquations)
    np.testing.assert_allclose(doubled.mtm, 2 * whole.mtm, rtol=1e-5)


def test_bad_statistics_raise_clear_errors(rng):
    m = rng.standard_normal((20, 4))
    ne = NormalEquations.from_arrays(m, m)
    bad = NormalEquations(mtm=np.full((4, 4), np.nan), mtr=ne.mtr, rtr=ne.rtr, count=20)
    with pytest.raises(ReplaceMeError, match="NaN"):
        lstsq(bad)
    with pytest.raises(ReplaceMeError, match="count is 0"):
        lstsq(NormalEquations(ne.mtm, ne.mtr, ne.rtr, 0))
    with pytest.raises(ReplaceMeError, match="mtr must match"):
        diag(NormalEquations(ne.mtm, ne.mtr[:3], ne.rtr, 20))
    with pytest.raises(ReplaceMeError, match="alpha"):
        lstsq(ne, alpha=-1.0)
    with pytest.raises(ReplaceMeError, match="precision"):
        lstsq(ne, precision="float16")
    with pytest.raises(ReplaceMeError, match=r"T must be \[4, 4\]"):
        relative_residual(ne, np.eye(3))


def test_registry_and_unknown_solver():
    assert get_solver("lstsq") is lstsq and get_solver("diag") is diag and get_solver("cosine") is cosine
    assert get_solver("orth_diag") is orth_diag
    # One explicit registry: no import adds or removes a solver.
    assert set(SOLVERS) == {"lstsq", "diag", "orth_diag", "cosine"}
    with pytest.raises(ReplaceMeError, match="known solvers: lstsq, diag, orth_diag, cosine"):
        get_solver("qr")


# ------------------------------------------------------------------ gradient solver

DC = 24   # width for the gradient-solver tests (small: every step is a real optimiser step)


@pytest.fixture(scope="module")
def token_data():
    """Two token populations with different maps: 30% have targets 10x larger (r = 10 m A1), the
    rest r = m A2. Least squares is dominated by the large targets, while the cosine loss weighs
    every token equally, so the cosine optimum lies elsewhere."""
    g = np.random.default_rng(7)
    n = 4096
    m = well_conditioned(g, n, DC).astype(np.float32)
    y = g.standard_normal((n, DC)).astype(np.float32)
    a1, a2 = (np.eye(DC) + 0.3 * g.standard_normal((DC, DC)) for _ in range(2))
    large = g.random(n) < 0.3
    r = with_noise(g, np.where(large[:, None], 10 * (m @ a1), m @ a2), 0.05)
    l = (y + r).astype(np.float32)
    buffer = TokenBuffer(n, DC, seed=0)
    buffer.add(m, y, l)
    return m, y, l, buffer


def test_cosine_improves_on_lstsq_cosine_loss(token_data):
    m, y, l, buffer = token_data
    t_ls = lstsq(NormalEquations.from_arrays(m, l - y)).T
    ls_loss = evaluate_loss(buffer, t_ls, loss="cosine")
    # Independent float64 evaluation of the objective.
    pred = m.astype(np.float64) @ t_ls
    target = (l - y).astype(np.float64)
    cos = np.sum(pred * target, 1) / (np.linalg.norm(pred, axis=1) * np.linalg.norm(target, axis=1))
    assert ls_loss == pytest.approx(1 - cos.mean(), rel=1e-4)
    result = cosine(buffer, d=DC, init=t_ls, lr=3e-3, steps=100, batch_size=256, log_every=25)
    assert result.info["initial_loss"] == pytest.approx(ls_loss, rel=1e-6)
    assert [s for s, _ in result.loss_history] == [25, 50, 75, 100]
    assert result.T.dtype == np.float32 and result.T.shape == (DC, DC)
    assert result.final_loss < 0.9 * ls_loss
    assert result.final_loss == pytest.approx(evaluate_loss(buffer, result.T, loss="cosine"))


@pytest.mark.parametrize("loss", ["cosine_accurate", "mse"])
def test_other_losses_decrease(token_data, loss):
    _, _, _, buffer = token_data
    result = cosine(buffer, loss=loss, lr=1e-2, steps=100, batch_size=256, log_every=25)
    assert result.final_loss < 0.8 * result.info["initial_loss"]
    assert result.loss_history[-1][1] < result.loss_history[0][1]


def test_penalties_shrink_transform(token_data):
    _, _, _, buffer = token_data
    common = dict(lr=1e-2, steps=100, batch_size=256, log_every=100, seed=3)
    plain = cosine(buffer, **common).T
    with_l1 = cosine(buffer, l1=1e-2, **common)
    with_l2 = cosine(buffer, l2=1e-2, **common)
    assert np.abs(with_l1.T).sum() < 0.9 * np.abs(plain).sum()
    assert np.linalg.norm(with_l2.T) < 0.9 * np.linalg.norm(plain)
    # The reported objective includes the penalty.
    data_only = evaluate_loss(buffer, with_l2.T)
    penalty = 1e-2 * np.sum(with_l2.T.astype(np.float64) ** 2)
    assert with_l2.final_loss == pytest.approx(data_only + penalty, rel=1e-5)


def test_cosine_is_deterministic_and_validates(token_data):
    _, _, _, buffer = token_data
    a = cosine(buffer, optimizer="sgd", lr=1e-2, steps=20, batch_size=64, log_every=10, seed=5)
    b = cosine(buffer, optimizer="sgd", lr=1e-2, steps=20, batch_size=64, log_every=10, seed=5)
    np.testing.assert_array_equal(a.T, b.T)
    with pytest.raises(ReplaceMeError, match="unknown loss"):
        cosine(buffer, loss="l1")
    with pytest.raises(ReplaceMeError, match="unknown optimizer"):
        cosine(buffer, optimizer="lion")
    with pytest.raises(ReplaceMeError, match="width"):
        cosine(buffer, d=DC + 1)
    with pytest.raises(ReplaceMeError, match="init must be"):
        cosine(buffer, init=np.eye(DC + 1))
    with pytest.raises(ReplaceMeError, match="empty"):
        cosine(TokenBuffer(10, DC))


# ------------------------------------------------------------------ token buffer

def stream(n, d=4, start=0):
    """Rows whose every entry is the row's stream index, so kept rows identify themselves."""
    index = np.arange(start, start + n, dtype=np.float32)[:, None].repeat(d, 1)
    return index, index + 0.25, index + 0.5


def fill(buffer, n, chunk):
    for begin in range(0, n, chunk):
        buffer.add(*stream(min(chunk, n - begin), buffer.d, begin))


def test_reservoir_is_uniform_and_consistent():
    n, capacity = 40_000, 2_000
    buffer = TokenBuffer(capacity, 4, seed=0)
    fill(buffer, n, 3_000)
    m, y, l = buffer.arrays()
    assert len(buffer) == capacity and buffer.tokens_seen == n and m.shape == (capacity, 4)
    kept = m[:, 0].astype(np.int64)
    assert len(np.unique(kept)) == capacity                      # a sample without replacement
    np.testing.assert_array_equal(y[:, 0], m[:, 0] + 0.25)       # m, y, l rows stay together
    np.testing.assert_array_equal(l[:, 3], m[:, 3] + 0.5)
    # Mean index of a uniform sample: (n-1)/2 with sd n/sqrt(12 capacity) (finite-population corrected).
    sd = n / np.sqrt(12 * capacity) * np.sqrt(1 - capacity / n)
    assert abs(kept.mean() - (n - 1) / 2) < 4 * sd
    counts = np.bincount(kept * 10 // n, minlength=10)            # each tenth of the stream ~ capacity/10
    assert np.all(np.abs(counts - capacity / 10) < 5 * np.sqrt(capacity / 10))


def test_reservoir_determinism():
    def run(seed, chunk):
        buffer = TokenBuffer(500, 4, seed=seed)
        fill(buffer, 5_000, chunk)
        return np.sort(buffer.arrays()[0][:, 0])
    np.testing.assert_array_equal(run(3, 700), run(3, 700))
    np.testing.assert_array_equal(run(3, 700), run(3, 123))      # chunking does not change the sample
    assert not np.array_equal(run(3, 700), run(4, 700))


def test_buffer_below_capacity_keeps_everything_and_samples_uniformly():
    buffer = TokenBuffer(100, 4)
    buffer.add(*stream(30))
    assert len(buffer) == 30 and buffer.nbytes == 3 * 100 * 4 * 4
    m, y, l = buffer.sample(6000, np.random.default_rng(0))
    assert m.shape == (6000, 4) and np.array_equal(y, m + 0.25)
    counts = np.bincount(m[:, 0].astype(int), minlength=30)
    assert counts.min() > 120 and counts.max() < 280            # ~200 each


def test_memmap_buffer_writes_under_path_with_bounded_ram(tmp_path):
    d, capacity, chunk = 64, 20_000, 1_000
    rows_bytes = chunk * d * 4

    def peak_traced(path):
        tracemalloc.start()
        try:
            buffer = TokenBuffer(capacity, d, path=path)
            for begin in range(0, 3 * capacity, chunk):
                buffer.add(*stream(chunk, d, begin))
            return buffer, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    mapped, mapped_peak = peak_traced(tmp_path / "buf")
    in_ram, ram_peak = peak_traced(None)
    assert mapped.nbytes == 3 * capacity * d * 4 == in_ram.nbytes
    assert ram_peak >= mapped.nbytes                               # the measurement sees the RAM stores
    assert mapped_peak < 12 * rows_bytes < mapped.nbytes / 4       # memmap: only per-chunk temporaries
    files = sorted(os.listdir(mapped.directory))
    assert files == ["l.npy", "m.npy", "y.npy"] and str(tmp_path / "buf") in mapped.directory
    m, _, _ = mapped.arrays()
    assert isinstance(m, np.memmap) and len(mapped) == capacity
    on_disk = np.load(os.path.join(mapped.directory, "m.npy"), mmap_mode="r")
    np.testing.assert_array_equal(on_disk[:5], m[:5])
    batch = mapped.sample(8, np.random.default_rng(0))[0]
    assert type(batch) is np.ndarray and batch.shape == (8, d)
    assert np.isfinite(evaluate_loss(mapped, np.eye(d), loss="mse"))    # solvers read memmap buffers
    directory = mapped.directory
    mapped.close()
    assert not os.path.exists(directory)
    with pytest.raises(ReplaceMeError, match="closed"):
        mapped.arrays()


def test_buffer_errors_and_budget():
    for capacity in (0, -5, 2.5):
        with pytest.raises(ReplaceMeError, match="capacity"):
            TokenBuffer(capacity, 8)
    buffer = TokenBuffer(10, 8)
    with pytest.raises(ReplaceMeError, match=r"shape \[n, 8\]"):
        buffer.add(np.zeros((3, 7)), np.zeros((3, 8)), np.zeros((3, 8)))
    with pytest.raises(ReplaceMeError, match="same tokens"):
        buffer.add(np.zeros((3, 8)), np.zeros((2, 8)), np.zeros((3, 8)))
    with pytest.raises(ReplaceMeError, match="empty"):
        buffer.sample(4, np.random.default_rng(0))
    assert TokenBuffer.budget_from_bytes(1 << 20, 576) == (1 << 20) // (3 * 576 * 4)
    assert TokenBuffer.budget_from_bytes(1 << 20, 576, dtype=np.float16) == (1 << 20) // (3 * 576 * 2)
    with pytest.raises(ReplaceMeError, match="raise the budget"):
        TokenBuffer.budget_from_bytes(100, 576)
