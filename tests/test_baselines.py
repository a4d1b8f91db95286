"""Baselines against independent float64 / brute-force references, then each one on SmolLM2.

Small random Llama models check the pieces (plain-drop surgery, NLL, Block Influence, SLEB,
the search rule, LinearPatch's Procrustes x scale, the statistics cache); the embedded default
checks that each baseline removes the right number of blocks, runs, and exports a checkpoint
that transformers reloads with the same logits.
"""
import numpy as np
import pytest
from flax import nnx

from replaceme_jax.baselines import methods as mth
from replaceme_jax.baselines.shortgpt import block_influence, shortgpt_blocks
from replaceme_jax.baselines.sleb import sleb_order
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.eval.nll import mean_nll
from replaceme_jax.experiments.statistics_cache import cached_statistics, load_statistics, restrict
from replaceme_jax.replaceme import selection, solvers
from replaceme_jax.replaceme.cuts import candidate_cuts
from replaceme_jax.replaceme.pipeline import prune
from replaceme_jax.replaceme.search import search_scores
from replaceme_jax.replaceme.solvers import orth_diag
from replaceme_jax.replaceme.statistics import StatsRequest, gather_statistics
from replaceme_jax.replaceme.surgery import apply_cuts, drop_blocks
from replaceme_jax.settings import Settings
from tiny_models import tiny_model_and_batches

L, D, V = 7, 16, 64


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_batches(L, hidden=D, vocab=V)


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask)


def reference_nll(model, batches) -> float:
    """float64 numpy log-softmax over the model's plain logits, real targets only."""
    total, count = 0.0, 0
    for b in batches:
        logits = np.asarray(_logits(model, b.input_ids, b.attention_mask), np.float64)[:, :-1]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, b.input_ids[:, 1:, None], axis=-1)[..., 0]
        valid = (b.attention_mask[:, 1:] * b.attention_mask[:, :-1]).astype(bool)
        total -= picked[valid].sum()
        count += valid.sum()
    return total / count


def test_drop_blocks_equals_skipping_them(tiny):
    model, batches = tiny
    removed = [0, 3, 4, 6]  # block 0 and touching blocks: no anchor needed for a plain drop
    pruned = drop_blocks(model, removed)
    assert pruned.config.num_hidden_layers == L - 4
    b = batches[0]
    cos, sin, biases = model.attention_inputs(b.attention_mask)
    h = model.embed(b.input_ids)
    for k, layer in enumerate(model.model.layers):
        if k not in removed:
            h = layer(h, cos, sin, biases[k])
    want = np.asarray(model.head(h))
    got = np.asarray(pruned(b.input_ids, b.attention_mask))
    real = b.attention_mask.astype(bool)
    assert np.abs(got - want)[real].max() <= 1e-5
    # Contiguous drops agree with the pipeline's own surgery.
    np.testing.assert_allclose(np.asarray(drop_blocks(model, [2, 3])(b.input_ids, b.attention_mask)),
                               np.asarray(apply_cuts(model, [(2, 4)])(b.input_ids, b.attention_mask)), atol=1e-6)
    with pytest.raises(ReplaceMeError, match="cannot drop blocks"):
        drop_blocks(model, [L])
    with pytest.raises(ReplaceMeError, match="leaves none"):
        drop_blocks(model, range(L))


def test_mean_nll_matches_numpy(tiny):
    model, batches = tiny
    assert mean_nll(model, batches) == pytest.approx(reference_nll(model, batches), rel=1e-5)


def test_block_influence_matches_numpy(tiny):
    model, batches = tiny
    sums, count = np.zeros(L), 0
    for b in batches:
        _, inter = model(b.input_ids, b.attention_mask, return_intermediates=True)
        outs = np.asarray(inter.block_output, np.float64)
        ins = np.concatenate([np.asarray(model.embed(b.input_ids), np.float64)[None], outs[:-1]])
        cos = (ins * outs).sum(-1) / (np.linalg.norm(ins, axis=-1) * np.linalg.norm(outs, axis=-1))
        mask = b.attention_mask.astype(bool)
        sums += (1 - cos)[:, mask].sum(-1)
        count += mask.sum()
    bi = block_influence(model, batches)
    np.testing.assert_allclose(bi, sums / count, rtol=1e-4, atol=1e-6)
    chosen = shortgpt_blocks(bi, 3)
    assert chosen == sorted(np.argsort(sums / count)[:3].tolist())
    with pytest.raises(ReplaceMeError, match="cannot remove"):
        shortgpt_blocks(bi, L)


def test_sleb_is_greedy_by_calibration_loss(tiny):
    model, batches = tiny
    result = sleb_order(model, batches, 2)
    first = min(range(L), key=lambda i: reference_nll(drop_blocks(model, [i]), batches))
    assert result.order[0] == first
    second = min((i for i in range(L) if i != first),
                 key=lambda i: reference_nll(drop_blocks(model, [first, i]), batches))
    assert result.order[1] == second and result.evaluations == L + L - 1
    assert result.losses[1] == pytest.approx(reference_nll(drop_blocks(model, [first, second]), batches), rel=1e-5)
    # Extending a cached run recomputes nothing it already has; a bounded run tries fewer models.
    longer = sleb_order(model, batches, 3, start=result)
    assert longer.order[:2] == result.order and longer.evaluations == L - 2
    influence = np.arange(L, dtype=float)
    bounded = sleb_order(model, batches, 2, max_candidates=2, prefilter=influence)
    assert bounded.evaluations == 4 and set(bounded.order) <= {0, 1, 2}
    with pytest.raises(ReplaceMeError, match="prefilter"):
        sleb_order(model, batches, 2, max_candidates=2)


def test_orth_diag_is_procrustes_then_scale():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((400, D)) * rng.uniform(0.5, 3, D)
    q0, _ = np.linalg.qr(rng.standard_normal((D, D)))
    s0 = rng.uniform(0.5, 2, D)
    # Exact data: the solver recovers T = Q0 diag(s0) when MᵀM ∝ I (whitened M).
    w = np.linalg.cholesky(np.linalg.inv(m.T @ m / 400))
    mw = m @ w
    exact = solvers.NormalEquations.from_arrays(mw, mw @ q0 * s0)
    T = orth_diag(exact).T
    np.testing.assert_allclose(T, q0 * s0, atol=1e-8)
    # Noisy data: Q is orthogonal and maximises tr(Qᵀ MᵀR); s is the per-channel optimum given Q.
    r = m @ q0 * s0 + 0.3 * rng.standard_normal((400, D))
    ne = solvers.NormalEquations.from_arrays(m, r)
    res = orth_diag(ne, alpha=0.0)
    s = np.linalg.norm(res.T, axis=0)
    q = res.T / s
    np.testing.assert_allclose(q.T @ q, np.eye(D), atol=1e-10)
    u, _, vt = np.linalg.svd(m.T @ r)
    np.testing.assert_allclose(q, u @ vt, atol=1e-8)
    p = m @ q
    np.testing.assert_allclose(s, (p * r).sum(0) / (p * p).sum(0), rtol=1e-8)
    assert res.final_loss == pytest.approx(np.sum((m @ res.T - r) ** 2) / np.sum(r * r), rel=1e-8)
    # Between lstsq (any matrix) and the identity in fit.
    assert solvers.lstsq(ne).final_loss <= res.final_loss < solvers.relative_residual(ne, np.eye(D))
    assert solvers.get_solver("orth_diag") is orth_diag


def test_search_rule_scores_every_cut_by_validation_loss(tiny):
    model, batches = tiny
    n = 2
    stats = gather_statistics(model, batches, StatsRequest(max_distance_blocks=L - 1, cuts=candidate_cuts(L, n)))
    validation = batches[:1]
    scores = selection.get_rule("search")(stats, n, 0.0, model=model, validation=validation)
    assert sorted(scores) == list(candidate_cuts(L, n))
    for cut in [(1, 3), (4, 6)]:
        T = solvers.lstsq(stats.normal_equations(cut)).T
        assert scores[cut] == pytest.approx(reference_nll(apply_cuts(model, [cut], [T]), validation), rel=1e-5)
    drops = search_scores(stats, n, model=model, validation=validation, solver="none")
    assert drops[(2, 4)] == pytest.approx(reference_nll(apply_cuts(model, [(2, 4)]), validation), rel=1e-5)
    with pytest.raises(ReplaceMeError, match="needs model"):
        selection.get_rule("search")(stats, n, alpha=0.0)
    with pytest.raises(ReplaceMeError, match="closed form"):
        search_scores(stats, n, model=model, validation=validation, solver="cosine")


def test_methods_remove_the_right_blocks(tiny):
    model, batches = tiny
    stats = gather_statistics(model, batches, StatsRequest(max_distance_blocks=L - 1, cuts=candidate_cuts(L, 2)))
    for solver in ("lstsq", "diag", "orth_diag"):
        r = mth.replaceme(model, batches, stats, 2, solver=solver, rule="residual")
        best = min(selection.residual_scores(stats, 2), key=selection.residual_scores(stats, 2).get)
        assert r.cuts == [best] and r.removed == list(range(*best))
        assert r.model.config.num_hidden_layers == L - 2
        want = solvers.get_solver(solver)(stats.normal_equations(best)).T
        np.testing.assert_allclose(r.transforms[0], want)
    d = mth.drop(model, stats, 2, rule="angular", num_transforms=2)
    assert len(d.removed) == 4 and d.model.config.num_hidden_layers == L - 4
    s = mth.shortgpt(model, 3, batches=batches)
    assert len(s.removed) == 3 and s.model.config.num_hidden_layers == L - 3
    assert mth.contiguous_runs([0, 1, 4, 6, 7]) == [(0, 2), (4, 5), (6, 8)]


def test_statistics_cache_roundtrip(tiny, tmp_path):
    model, batches = tiny
    key = {"data": "tiny"}
    got = cached_statistics(tmp_path, key, [2, 3], model, batches)
    full = gather_statistics(model, batches, StatsRequest(max_distance_blocks=L - 1,
                                                         cuts=candidate_cuts(L, 2) + candidate_cuts(L, 3)))
    for n in (2, 3):
        want = restrict(full, candidate_cuts(L, n))
        assert got[n].request.cuts == candidate_cuts(L, n)
        for cut in candidate_cuts(L, n):
            a, b = got[n].normal_equations(cut), want.normal_equations(cut)
            np.testing.assert_array_equal(a.mtm, b.mtm)
            np.testing.assert_array_equal(a.mtr, b.mtr)
        np.testing.assert_array_equal(got[n].distances, full.distances)
    # Second call: loaded from disk, no model needed.
    again = cached_statistics(tmp_path, key, [3], None, None)
    np.testing.assert_array_equal(again[3].cross, got[3].cross)
    assert len(list(tmp_path.glob("stats-*-n*.npz"))) == 2
    assert load_statistics(next(tmp_path.glob("stats-*-n2.npz"))).num_tokens == full.num_tokens


# -- the embedded default ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_pruned(smollm2):
    """Each baseline on SmolLM2 with 8 calibration passages of 64 tokens (n = 2 blocks)."""
    from replaceme_jax.replaceme.config import default_config
    from replaceme_jax.replaceme.pipeline import calibration_batches
    model, tokenizer = smollm2
    cal = default_config().calibration
    cal.num_samples, cal.max_length = 8, 64
    batches = calibration_batches(tokenizer, cal)
    n = 2
    stats = gather_statistics(model, batches, StatsRequest(max_distance_blocks=29, cuts=candidate_cuts(30, n)))
    influence = block_influence(model, batches)
    return model, tokenizer, batches, {
        "drop": mth.drop(model, stats, n),
        "orth_diag": mth.replaceme(model, batches, stats, n, solver="orth_diag"),
        "shortgpt": mth.shortgpt(model, n, influence=influence),
        "sleb": mth.sleb(model, n, batches=batches[:1], max_candidates=3, prefilter=influence),
    }


@pytest.mark.slow  # four 28-block models compiled and exported: minutes on two CPU cores
@pytest.mark.parametrize("method", ["drop", "orth_diag", "shortgpt", "sleb"])
def test_baseline_on_smollm2_exports_to_transformers(smollm2_pruned, method, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from replaceme_jax.checkpoints.hf import load_hf, save_hf
    from replaceme_jax.checkpoints.keymap import hf_state_dict
    model, tokenizer, batches, results = smollm2_pruned
    r = results[method]
    assert len(r.removed) == 2 and r.model.config.num_hidden_layers == 28
    assert mean_nll(r.model, batches) < 2 * mean_nll(model, batches)  # damaged, not destroyed
    save_hf(r.model, tmp_path / "hf", tokenizer=tokenizer)
    back, _ = load_hf(tmp_path / "hf")
    for (n1, a), (n2, b) in zip(hf_state_dict(r.model), hf_state_dict(back)):
        assert n1 == n2 and np.array_equal(a, b), n1
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 28
    ids = np.random.default_rng(0).integers(0, 49152, (2, 16)).astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(r.model(ids))
    # The tensors are identical, so logits differ by float32 arithmetic only. SmolLM2's residual
    # stream reaches ~2e4 (massive activations): two correct float32 implementations differ by
    # ~1e-5 of the logit scale (measured 0.6e-3 on logits of ~40 with the last blocks dropped).
    err = np.abs(ours - ref).max()
    assert err <= 2e-5 * np.abs(ref).max(), (err, np.abs(ref).max())
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_prune_chooses_the_ridge_on_validation_sums(tiny):
    """alpha_grid: one lstsq per grid value on the training sums, the T whose residual on the
    validation batches' own sums is lowest (gathered independently here), toward 0 or I."""
    model, batches = tiny
    train, validation = batches[:2], batches[2:]
    cut = (2, 4)
    request = StatsRequest(cuts=(cut,))
    ne = gather_statistics(model, train, request).normal_equations(cut)
    val_ne = gather_statistics(model, validation, request).normal_equations(cut)
    grid = (0.0, 1e-2, 1.0, 100.0)
    for toward in ("zero", "identity"):
        settings = Settings().replace(num_blocks=2, ridge_target=toward, alpha_grid="0,1e-2,1,100",
                                      candidates="selected", progress=False)
        result = prune(model, train, settings, cuts=[cut], validation=validation)
        scale = np.trace(ne.mtm) / D
        by_hand = [solvers.relative_residual(val_ne, solvers.lstsq(ne, alpha=g * scale, toward=toward).T)
                   for g in grid]
        info = result.solves[0].info
        assert info["toward"] == toward and info["alpha_relative"] == grid[int(np.argmin(by_hand))]
        np.testing.assert_allclose([r for _, r in info["alpha_grid"]], by_hand, rtol=1e-6)
    with pytest.raises(ReplaceMeError, match="alpha_grid chooses the ridge on validation batches"):
        prune(model, train, settings, cuts=[cut])
    with pytest.raises(ReplaceMeError, match="alpha_grid chooses a closed-form solver's ridge"):
        Settings().replace(solver="cosine", alpha_grid="0,1")
    with pytest.raises(ReplaceMeError, match="ridge_target='identity' applies to lstsq"):
        Settings().replace(solver="diag", ridge_target="identity")
