"""Folding T into the anchor's down_proj == running the explicit map L <- Y_a + M_a T."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.config import ModelConfig
from replaceme_jax.models.modeling import CausalLM
from replaceme_jax.replaceme.surgery import apply_cuts


def explicit_forward(model, ids, mask, cuts, transforms):
    """Original model with the blocks of each cut skipped and M_a T used at each anchor (float32)."""
    cos, sin, biases = model.attention_inputs(mask)
    h = model.embed(ids)
    skipped = {i for s, e in cuts for i in range(s, e)}
    anchors = {s - 1: T for (s, _), T in zip(cuts, transforms)}
    for k, layer in enumerate(model.model.layers):
        if k in skipped:
            continue
        y, m = layer.parts(h, cos, sin, biases[k])
        h = y + (m @ jnp.asarray(anchors[k], jnp.float32) if k in anchors else m)
    return model.head(h)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_folding_equals_explicit_map(family):
    cfg = ModelConfig(model_type=family, vocab_size=80, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=9, num_attention_heads=4, num_key_value_heads=2,
                      attention_bias=family == "qwen2", qk_norm=family == "qwen3",
                      extra=json.dumps({"layer_types": ["full_attention"] * 9}) if family != "llama" else "{}")
    model = CausalLM(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    cuts = [(2, 4), (6, 8)]
    transforms = [np.eye(32) + 0.1 * rng.standard_normal((32, 32)) for _ in cuts]
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    pruned = apply_cuts(model, cuts, transforms)
    assert pruned.config.num_hidden_layers == 5 and len(pruned.model.layers) == 5
    if family != "llama":
        assert len(pruned.config.extra_dict["layer_types"]) == 5
    ids = jnp.asarray(rng.integers(0, 80, (3, 11)))
    mask = jnp.asarray(np.array([[1] * 11, [1] * 7 + [0] * 4, [0] * 3 + [1] * 8]))
    got = np.asarray(pruned(ids, mask))
    want = np.asarray(explicit_forward(model, ids, mask, cuts, transforms))
    real = np.asarray(mask, bool)
    assert np.abs(got - want)[real].max() <= 1e-5
    # The input model is never modified.
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_drop_without_transform_and_bad_cuts():
    cfg = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=1)
    model = CausalLM(cfg)
    dropped = apply_cuts(model, [(3, 5)])
    assert dropped.config.num_hidden_layers == 4
    np.testing.assert_array_equal(np.asarray(dropped.model.layers[3].mlp.down_proj.kernel[...]),
                                  np.asarray(model.model.layers[5].mlp.down_proj.kernel[...]))
    with pytest.raises(ReplaceMeError, match="overlap"):
        apply_cuts(model, [(1, 3), (2, 4)])
    with pytest.raises(ReplaceMeError, match="anchor block"):
        apply_cuts(model, [(1, 3), (3, 5)])
    with pytest.raises(ReplaceMeError, match="invalid cut"):
        apply_cuts(model, [(0, 2)])
    with pytest.raises(ReplaceMeError, match="expected"):
        apply_cuts(model, [(1, 3)], [np.eye(8)])


def test_cut_ending_at_last_block_is_supported():
    """L_{e-1} is taken before the final norm, so a cut may end at the last block."""
    cfg = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=1)
    model = CausalLM(cfg, rngs=nnx.Rngs(5))
    T = np.eye(16) + 0.05 * np.random.default_rng(1).standard_normal((16, 16))
    pruned = apply_cuts(model, [(3, 6)], [T])
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 40, (2, 9)))
    mask = jnp.ones_like(ids)
    want = explicit_forward(model, ids, mask, [(3, 6)], [T])
    assert np.abs(np.asarray(pruned(ids, mask)) - np.asarray(want)).max() <= 1e-5


def test_pruned_models_of_one_shape_share_compilations():
    """Folding T at different anchors must not give the pruned models different jit signatures
    (the search rule and SLEB score dozens of them: one compilation, not one per cut)."""
    from replaceme_jax.eval import nll
    from replaceme_jax.data import make_batches
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2)
    model = CausalLM(cfg)
    batches = make_batches([np.arange(1, 30)] * 4, batch_size=2, max_length=32)
    nll.mean_nll(apply_cuts(model, [(1, 3)], [np.eye(32, dtype=np.float32)]), batches)
    before = nll._nll_sums._cache_size()
    for cut, T in (((2, 4), np.eye(32, dtype=np.float32)), ((4, 6), 2 * np.eye(32, dtype=np.float32)), ((3, 5), None)):
        nll.mean_nll(apply_cuts(model, [cut], [T]), batches)
    assert nll._nll_sums._cache_size() == before
