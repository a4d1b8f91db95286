"""ShortGPT (Men et al., 2024): remove the n blocks of lowest Block Influence.

Block Influence of block i is 1 - E[cos(x_i, x_{i+1})], the expectation over every real token of
the calibration data, where x_i is the hidden state entering block i and x_{i+1} the one leaving
it. A block that barely turns the residual stream is taken to matter little; the n least
influential blocks are dropped with no transform, wherever they sit (not necessarily contiguous).
"""
from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from replaceme_jax.errors import ReplaceMeError


@functools.partial(jax.jit, static_argnums=0)
def _influence_sums(graphdef, state, input_ids, attention_mask):
    model = nnx.merge(graphdef, state)
    cos, sin, biases = model.attention_inputs(attention_mask)
    weight = (attention_mask > 0).astype(jnp.float32)
    h = model.embed(input_ids)  # the block's input; ``out`` its output
    sums = []
    for *_, out in model.blocks(h, cos, sin, biases):
        a, b = h.astype(jnp.float32), out.astype(jnp.float32)
        norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
        cosine = jnp.sum(a * b, axis=-1) / jnp.maximum(norms, 1e-12)
        sums.append(jnp.sum((1.0 - cosine) * weight))
        h = out
    return jnp.stack(sums), jnp.sum(weight)


def block_influence(model, batches: Iterable) -> np.ndarray:
    """Block Influence [num_blocks] (float64): mean over real tokens of 1 - cos(block in, block out)."""
    graphdef, state = nnx.split(model)
    total, count = None, 0.0
    for batch in batches:
        s, c = _influence_sums(graphdef, state, jnp.asarray(batch.input_ids, jnp.int32),
                               jnp.asarray(batch.attention_mask, jnp.int32))
        s = np.asarray(s, np.float64)
        total = s if total is None else total + s
        count += float(c)
    if not count:
        raise ReplaceMeError("Block Influence needs calibration tokens; the batches hold none")
    return total / count


def shortgpt_blocks(influence: np.ndarray, n: int) -> list[int]:
    """Indices of the ``n`` least influential blocks, ascending (ties: the earlier block)."""
    influence = np.asarray(influence, np.float64)
    if not 1 <= n < influence.size:
        raise ReplaceMeError(f"cannot remove {n} of {influence.size} blocks: choose 1 <= n < {influence.size}")
    return sorted(int(i) for i in np.argsort(influence, kind="stable")[:n])
