"""The causal split of the attention core against the plain softmax attention it replaces."""
import jax.numpy as jnp
import numpy as np
import pytest

from replaceme_jax.models import modeling
from replaceme_jax.models.modeling import _attend, attention_bias, causal_attention


def _mask(kind: str, b: int, t: int) -> np.ndarray:
    mask = np.ones((b, t), np.int32)
    if kind == "right":
        mask[0, t // 3:] = 0
        mask[1] = 0  # an empty row
    elif kind == "left":  # queries before the first real token see no key at all
        mask[0, :t * 2 // 3] = 0
        mask[1, :7] = 0
    elif kind == "packed":
        mask[0, :40], mask[0, 40:t - 9], mask[0, t - 9:] = 1, 2, 0
        mask[1, :t // 2 + 3], mask[1, t // 2 + 3:] = 1, 3
    return mask


@pytest.mark.parametrize("kind", ["full", "right", "left", "packed", "window"])
@pytest.mark.parametrize("t", [256, 300])
def test_causal_split_equals_plain_attention(kind, t):
    assert t >= 2 * modeling.ATTENTION_CHUNK  # the chunked path runs
    rng = np.random.default_rng(t)
    b, kv, g, d = 2, 2, 3, 16
    q = jnp.asarray(rng.standard_normal((b, kv, g, t, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, kv, t, d)), jnp.float32) for _ in range(2))
    bias = attention_bias(jnp.asarray(_mask("full" if kind == "window" else kind, b, t)),
                          window=48 if kind == "window" else None)
    want = np.asarray(_attend(q, k, v, bias))
    got = np.asarray(causal_attention(q, k, v, bias))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    if kind == "left":  # the blind queries really took the all-values branch
        assert np.asarray(jnp.max(bias[0, :t // 2, :t // 2], -1) < 0).any()


def test_short_or_odd_rows_take_the_plain_path():
    rng = np.random.default_rng(0)
    for t in (2 * modeling.ATTENTION_CHUNK - 2, modeling.ATTENTION_CHUNK + 1):
        q = jnp.asarray(rng.standard_normal((1, 1, 2, t, 8)), jnp.float32)
        k = v = jnp.asarray(rng.standard_normal((1, 1, t, 8)), jnp.float32)
        bias = attention_bias(jnp.ones((1, t), jnp.int32))
        np.testing.assert_array_equal(np.asarray(causal_attention(q, k, v, bias)),
                                      np.asarray(_attend(q, k, v, bias)))


@pytest.mark.parametrize("t", [256, 300])
def test_span_bias_reads_only_the_keys_packed_items_can_see(t):
    """Rows packed with items of at most n tokens: each query chunk reading only its last
    n + chunk - 1 keys gives plain attention's result; a shorter span would not."""
    rng = np.random.default_rng(t)
    b, kv, g, d, n = 2, 2, 3, 16, 50
    q = jnp.asarray(rng.standard_normal((b, kv, g, t, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, kv, t, d)), jnp.float32) for _ in range(2))
    segments = np.stack([1 + np.arange(t) // n, 1 + (np.arange(t) + 17) // n]).astype(np.int32)
    segments[1, -5:] = 0  # right padding
    bias = attention_bias(jnp.asarray(segments))
    want = np.asarray(_attend(q, k, v, bias))
    span = n + modeling.ATTENTION_CHUNK - 1
    got = np.asarray(causal_attention(q, k, v, modeling.SpanBias(bias, span)))
    np.testing.assert_allclose(got[1, :, :, :-5], want[1, :, :, :-5], atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=1e-5)
    short = np.asarray(causal_attention(q, k, v, modeling.SpanBias(bias, modeling.ATTENTION_CHUNK)))
    assert np.abs(short - want).max() > 1e-2
