"""Next-token choice from logits: greedy, temperature, top-k, top-p, with an explicit PRNG key."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from replaceme_jax.errors import ReplaceMeError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy (top_k / top_p must then stay off); top_k 0 = off; top_p 1 = off."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not (isinstance(t, (int, float)) and t >= 0 and t == t):
            raise ReplaceMeError(f"temperature must be a number >= 0 (0 = greedy); got {t!r}")
        if not (isinstance(k, int) and k >= 0):
            raise ReplaceMeError(f"top_k must be an integer >= 0 (0 = off); got {k!r}")
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise ReplaceMeError(f"top_p must be in (0, 1] (1 = off); got {p!r}")
        if t == 0 and (k or p < 1):
            raise ReplaceMeError(f"top_k={k} / top_p={p} have no effect with greedy decoding "
                                 "(temperature=0). Fix: set temperature > 0, or drop top_k/top_p.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """Token ids [B] from float32 logits [B, V]. Same key and logits -> same tokens."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / params.temperature
    if params.top_k:
        kth = jax.lax.top_k(logits, min(params.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if params.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = jnp.cumsum(probs, axis=-1) - probs >= params.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
