"""The anchor kernel re-fit: its sums against transformers' own activations (hooks, float64 numpy),
its solve against float64 numpy, and its place in the pipeline."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from replaceme_jax.data import make_batches
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme.config import default_config
from replaceme_jax.replaceme.pipeline import prune
from replaceme_jax.replaceme.refit import (anchor_kernel_path, down_proj_kernel_path, fit_kernel,
                                           gather_kernel_equations, parse_grid)
from replaceme_jax.replaceme.solvers import NormalEquations, relative_residual
from replaceme_jax.replaceme.surgery import apply_cuts
from replaceme_jax.settings import Settings
from tiny_models import FAMILIES, reference_pair, tiny_model_and_batches


def _reference_sums(ref, sequences, anchor: int, end: int, shift, weighting="none"):
    """ZᵀZ, Zᵀ(R - shift), ||R - shift||², N from transformers' forward: z is the input of the anchor's
    down_proj, y the input of its post-attention norm, L the output of block end-1 (one sequence at a time,
    no padding, so nothing of ours is involved). ``weighting="token"``: each token weighs 1 / ||L_t||²."""
    import torch
    got = {}
    layer = ref.model.layers[anchor]
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("z", a[0])),
             layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: got.__setitem__("y", a[0]))]
    G, C, R, N = 0.0, 0.0, 0.0, 0
    try:
        with torch.no_grad():
            for seq in sequences:
                out = ref(torch.tensor(np.asarray(seq)[None]), output_hidden_states=True)
                z = got["z"][0].double().numpy()
                target = out.hidden_states[end][0].double().numpy()
                r = target - got["y"][0].double().numpy() - shift
                w = 1.0 / np.sum(target ** 2, -1) if weighting == "token" else np.ones(len(seq))
                G, C = G + z.T @ (w[:, None] * z), C + z.T @ (w[:, None] * r)
                R, N = R + float(np.sum(w[:, None] * r * r)), N + len(seq)
    finally:
        for h in hooks:
            h.remove()
    return G, C, R, N


@pytest.mark.parametrize("family", ["llama-untied", "llama-bias", "mistral-window", "qwen2-tied", "qwen3"])
def test_kernel_sums_match_transformers(family, tmp_path_factory):
    _, ref, ours = reference_pair(family, FAMILIES[family](), tmp_path_factory)
    rng = np.random.default_rng(0)
    vocab, d = ours.config.vocab_size, ours.config.hidden_size
    seqs = [rng.integers(0, vocab, size=int(n)) for n in (9, 14, 5, 12, 7)]
    shift = rng.normal(size=d) * 0.1
    for pack, weighting in ((False, "none"), (True, "none"), (False, "token"), (True, "token")):
        # padded rows and packed rows (per-segment attention and RoPE), tokens alike or by 1 / ||L_t||²
        batches = make_batches(seqs, batch_size=2, max_length=16, buckets=(16,), pack=pack)
        ne = gather_kernel_equations(ours, batches, (1, 2), shift=shift, weighting=weighting)
        G, C, R, N = _reference_sums(ref, seqs, anchor=0, end=2, shift=shift, weighting=weighting)
        assert ne.count == N == sum(map(len, seqs))
        for got, want in ((ne.mtm, G), (ne.mtr, C)):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
        assert ne.rtr == pytest.approx(R, rel=2e-4)


def _problem(rng, n=400, f=12, d=5, dead=()):
    z = rng.normal(size=(n, f))
    z[:, list(dead)] = 0.0  # dead hidden units: an exactly singular ZᵀZ
    k_true = rng.normal(size=(f, d))
    r = z @ k_true + 0.3 * rng.normal(size=(n, d))
    return z, r


def test_fit_kernel_is_the_float64_ridge_toward_the_prior():
    rng = np.random.default_rng(1)
    z, r = _problem(rng)
    zv, rv = _problem(np.random.default_rng(2))
    ne, val = NormalEquations.from_arrays(z, r), NormalEquations.from_arrays(zv, rv)
    prior = rng.normal(size=(12, 5))
    grid = (1e-3, 1e-1, 10.0, math.inf)
    fit = fit_kernel(ne, prior, val, grid)
    scale = np.trace(z.T @ z) / 12
    kernels = {g: np.linalg.solve(z.T @ z + g * scale * np.eye(12), z.T @ r + g * scale * prior) for g in grid[:-1]}
    kernels[math.inf] = prior
    residual = {g: np.sum((zv @ k - rv) ** 2) / np.sum(rv ** 2) for g, k in kernels.items()}
    best = min(residual, key=residual.get)
    assert fit.alpha_relative == best and not fit.kept_prior
    np.testing.assert_allclose(fit.kernel, kernels[best], rtol=1e-9, atol=1e-12)
    assert dict(fit.grid) == pytest.approx(residual, rel=1e-9)
    assert fit.validation_residual == pytest.approx(residual[best], rel=1e-9)
    assert fit.prior_validation_residual == pytest.approx(residual[math.inf], rel=1e-9)
    assert fit.train_residual < fit.prior_train_residual


def test_fit_kernel_keeps_the_prior_when_it_validates_better():
    rng = np.random.default_rng(3)
    z, r = _problem(rng, n=30, f=12)  # few tokens: the free fit overfits
    zv, _ = _problem(np.random.default_rng(4), n=200, f=12)
    prior = rng.normal(size=(12, 5))
    rv = zv @ prior  # the validation text is explained exactly by the prior
    fit = fit_kernel(NormalEquations.from_arrays(z, r), prior, NormalEquations.from_arrays(zv, rv), (0.0, 1e-2, math.inf))
    assert fit.kept_prior and fit.alpha_relative == math.inf and np.array_equal(fit.kernel, prior)
    assert fit.summary()["alpha_relative"] is None and fit.summary()["grid"][-1][0] is None


def test_fit_kernel_without_ridge_on_dead_units_is_the_minimum_norm_solution():
    rng = np.random.default_rng(5)
    z, r = _problem(rng, dead=(2, 7))
    ne = NormalEquations.from_arrays(z, r)
    fit = fit_kernel(ne, np.ones((12, 5)), ne, (0.0,))
    want = np.linalg.lstsq(z, r, rcond=None)[0]  # minimum norm: zero rows for the dead units
    assert np.isfinite(fit.kernel).all()
    np.testing.assert_allclose(fit.kernel, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("text,match", [("", "at least one"), ("1e-3,x", "'x' is not a number"), ("-1", ">= 0")])
def test_bad_grid_names_the_setting(text, match):
    with pytest.raises(ReplaceMeError, match=match) as info:
        Settings.from_config(default_config()).replace(**{"refit.anchor": True, "refit.alpha_grid": text})
    assert "refit.alpha_grid" in str(info.value)
    assert parse_grid("1e-6, inf") == (1e-6, math.inf)


def test_bad_weighting_names_the_setting_and_the_choices():
    with pytest.raises(ReplaceMeError, match=r"refit.weighting='norm'.*choose one of none, token"):
        Settings.from_config(default_config()).replace(**{"refit.weighting": "norm"})


@pytest.fixture(scope="module")
def tiny():
    model, batches = tiny_model_and_batches(6, hidden=16, sequences=40)
    _, validation = tiny_model_and_batches(6, hidden=16, sequences=12, seed=1)
    return model, batches, validation


def _cfg(**changes):
    c = default_config()
    c.cuts, c.num_blocks, c.progress = "2-4", 2, False
    for k, v in changes.items():
        parent, leaf = k.split(".") if "." in k else (None, k)
        setattr(getattr(c, parent) if parent else c, leaf, v)
    return c


def test_prune_with_refit_replaces_only_the_anchor_kernel(tiny):
    model, batches, validation = tiny
    plain = prune(model, batches, _cfg(**{"refit.anchor": False}))  # the paper's W T alone
    refit = prune(model, batches, _cfg(**{"refit.anchor": True, "refit.alpha_grid": "1e-6,1e-3,inf"}),
                  validation=validation)
    assert plain.refits is None and len(refit.refits) == 1
    fit = refit.refits[0]
    np.testing.assert_allclose(refit.transforms[0], plain.transforms[0])  # T itself is unchanged
    got = dict(nnx.to_flat_state(nnx.state(refit.model)))
    want = dict(nnx.to_flat_state(nnx.state(plain.model)))
    path = anchor_kernel_path((2, 4))
    for p, var in got.items():
        if p == path:
            np.testing.assert_allclose(np.asarray(var.get_value()), fit.kernel.astype(np.float32), rtol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(want[p].get_value()))
    assert fit.train_residual <= fit.prior_train_residual + 1e-12
    # the prior is ReplaceMe's own fold: its calibration residual is T's
    assert fit.prior_train_residual == pytest.approx(plain.residuals[0], rel=1e-6)
    # "inf" alone keeps W T: the same model as without the re-fit
    kept = prune(model, batches, _cfg(**{"refit.anchor": True, "refit.alpha_grid": "inf"}), validation=validation)
    assert kept.refits[0].kept_prior
    np.testing.assert_allclose(np.asarray(dict(nnx.to_flat_state(nnx.state(kept.model)))[path].get_value()),
                               np.asarray(want[path].get_value()), rtol=1e-6, atol=1e-7)


def test_refit_is_the_default_and_needs_validation_batches(tiny):
    model, batches, _ = tiny
    assert Settings().refit.anchor and default_config().refit.anchor
    with pytest.raises(ReplaceMeError, match="refit.anchor.*validation"):
        prune(model, batches, _cfg())


def test_refit_kernel_of_wrong_shape_is_refused(tiny):
    model, _, _ = tiny
    with pytest.raises(ReplaceMeError, match="re-fitted kernel .* shape"):
        apply_cuts(model, [(2, 4)], [np.eye(16)], [np.zeros((3, 16))])
    with pytest.raises(ReplaceMeError, match="no transform"):
        apply_cuts(model, [(2, 4)], [None], [np.zeros((32, 16))])


def test_refit_lowers_the_tiny_models_validation_residual(tiny):
    """On held-apart tokens the chosen kernel is never worse than W T (the grid holds inf)."""
    model, batches, validation = tiny
    out = prune(model, batches, _cfg(**{"refit.anchor": True}), validation=validation)
    fit = out.refits[0]
    assert fit.validation_residual <= fit.prior_validation_residual
    T = out.transforms[0]
    W = np.asarray(model.model.layers[1].mlp.down_proj.kernel.get_value(), np.float64)
    val = gather_kernel_equations(model, validation, (2, 4))
    assert relative_residual(val, W @ T) == pytest.approx(fit.prior_validation_residual, rel=1e-6)
    assert jnp.isfinite(jnp.asarray(fit.kernel)).all()


# ---- refit.downstream: blocks after a cut re-fitted toward the dense stream ----

def _reference_block_sums(dense_ref, pruned_ref, sequences, block: int, dense_block: int, shift):
    """ZᵀZ, Zᵀ(R - shift), ||R - shift||², N from two transformers forwards: z and y from the pruned
    model's block ``block`` (hooks), the target from the dense model's block ``dense_block`` output."""
    import torch
    got = {}
    layer = pruned_ref.model.layers[block]

    def keep_output(m, a, out):
        got["target"] = out[0] if isinstance(out, tuple) else out
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("z", a[0])),
             layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: got.__setitem__("y", a[0])),
             dense_ref.model.layers[dense_block].register_forward_hook(keep_output)]
    G, C, R, N = 0.0, 0.0, 0.0, 0
    try:
        with torch.no_grad():
            for seq in sequences:
                ids = torch.tensor(np.asarray(seq)[None])
                pruned_ref(ids, use_cache=False)
                dense_ref(ids, use_cache=False)
                z = got["z"][0].double().numpy()
                r = got["target"][0].double().numpy() - got["y"][0].double().numpy() - shift
                G, C, R, N = G + z.T @ z, C + z.T @ r, R + float(np.sum(r * r)), N + len(seq)
    finally:
        for h in hooks:
            h.remove()
    return G, C, R, N


@pytest.mark.parametrize("family", ["llama-bias", "mistral-window", "qwen3"])
def test_block_sums_match_transformers(family, tmp_path_factory):
    """Block 1 of the dense model with block 1 dropped (dense block 2) toward dense block 2's output."""
    import copy

    import torch
    from replaceme_jax.replaceme.refit import gather_block_equations
    from replaceme_jax.replaceme.surgery import drop_blocks
    _, ref, ours = reference_pair(family, FAMILIES[family](), tmp_path_factory)
    pruned_ref = copy.deepcopy(ref)
    pruned_ref.model.layers = torch.nn.ModuleList([pruned_ref.model.layers[0], pruned_ref.model.layers[2]])
    pruned_ref.config.num_hidden_layers = 2
    pruned = drop_blocks(ours, [1])
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, ours.config.vocab_size, size=int(n)) for n in (9, 14, 5, 12, 7)]
    down = pruned.model.layers[1].mlp.down_proj
    shift = (np.asarray(down.bias.get_value(), np.float64) if getattr(down, "bias", None) is not None
             else np.zeros(ours.config.hidden_size))
    G, C, R, N = _reference_block_sums(ref, pruned_ref, seqs, block=1, dense_block=2, shift=shift)
    for pack in (False, True):
        batches = make_batches(seqs, batch_size=2, max_length=16, buckets=(16,), pack=pack)
        ne = gather_block_equations(pruned, batches, 1, ours, 2, shift=shift)
        assert ne.count == N == sum(map(len, seqs))
        for got, want in ((ne.mtm, G), (ne.mtr, C)):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
        assert ne.rtr == pytest.approx(R, rel=2e-4)


def test_shared_blocks_run_once_with_the_same_sums(tiny):
    from replaceme_jax.replaceme.refit import gather_block_equations
    model, batches, _ = tiny
    pruned = apply_cuts(model, [(2, 4)], [np.eye(16)])
    a = gather_block_equations(pruned, batches, 2, model, 4, shared=0)
    b = gather_block_equations(pruned, batches, 2, model, 4, shared=1)
    np.testing.assert_allclose(a.mtm, b.mtm, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.mtr, b.mtr, rtol=1e-6, atol=1e-9)
    with pytest.raises(ReplaceMeError, match="out of range"):
        gather_block_equations(pruned, batches, 2, model, 4, shared=3)


def test_downstream_blocks_stop_at_removed_blocks_anchors_and_the_end():
    from replaceme_jax.replaceme.refit import downstream_blocks
    # depth 10, cuts [2, 4) and [6, 8): kept blocks 0 1 4 5 8 9; block 5 is the second cut's anchor
    assert downstream_blocks(10, [(6, 8), (2, 4)], 3) == [(2, 4), (4, 8), (5, 9)]
    assert downstream_blocks(10, [(2, 4)], 2) == [(2, 4), (3, 5)]
    assert downstream_blocks(10, [(2, 10)], 2) == []
    assert downstream_blocks(10, [(2, 4)], 0) == []


def test_prune_with_downstream_refit_changes_only_those_kernels(tiny):
    model, batches, validation = tiny
    base = prune(model, batches, _cfg(**{"refit.alpha_grid": "1e-6,1e-3,inf"}), validation=validation)
    out = prune(model, batches, _cfg(**{"refit.alpha_grid": "1e-6,1e-3,inf", "refit.downstream": 2}),
                validation=validation)
    assert base.downstream is None
    assert [(f.block, f.dense_block) for f in out.downstream] == [(2, 4), (3, 5)]
    got = dict(nnx.to_flat_state(nnx.state(out.model)))
    want = dict(nnx.to_flat_state(nnx.state(base.model)))
    changed = {down_proj_kernel_path(f.block): f for f in out.downstream}
    for p, var in got.items():
        if p in changed and not changed[p].fit.kept_prior:
            np.testing.assert_allclose(np.asarray(var.get_value()), changed[p].fit.kernel.astype(np.float32), rtol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(want[p].get_value()))
    for f in out.downstream:
        assert f.fit.validation_residual <= f.fit.prior_validation_residual
        assert f.fit.train_residual <= f.fit.prior_train_residual + 1e-12
    assert any(not f.fit.kept_prior for f in out.downstream)  # the tiny model gains from it
    # the first block's prior residual is measured on the stream the cut leaves
    from replaceme_jax.replaceme.refit import gather_block_equations
    val = gather_block_equations(base.model, validation, 2, model, 4)
    assert relative_residual(val, np.asarray(base.model.model.layers[2].mlp.down_proj.kernel.get_value(),
                                             np.float64)) == pytest.approx(out.downstream[0].fit.prior_validation_residual, rel=1e-6)


def test_bad_downstream_names_the_setting():
    with pytest.raises(ReplaceMeError, match=r"refit.downstream=-1 must be at least 0"):
        Settings.from_config(default_config()).replace(**{"refit.downstream": -1})
