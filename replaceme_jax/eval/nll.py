"""Mean next-token negative log-likelihood of a model on static-shape batches.

The score that SLEB's greedy removal and the ``search`` selection rule minimise. Batches come from
``pipeline.calibration_batches`` (a handful of shapes), and the jitted step is keyed on the graph
definition, so every pruned model with the same number of blocks reuses one compilation.
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
def _nll_sums(graphdef, state, input_ids, attention_mask):
    model = nnx.merge(graphdef, state)
    logits = model(input_ids, attention_mask)[:, :-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, input_ids[:, 1:, None], axis=-1)[..., 0]
    # A target counts when it and its context token are real tokens of the same sequence (right or
    # left padding, packed rows).
    valid = ((attention_mask[:, 1:] > 0) & (attention_mask[:, 1:] == attention_mask[:, :-1])).astype(jnp.float32)
    return jnp.sum((log_z - picked) * valid), jnp.sum(valid)


def mean_nll(model, batches: Iterable) -> float:
    """Mean NLL per predicted token (nats) over ``batches``; exp() of it is the perplexity."""
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0.0
    for batch in batches:
        s, c = _nll_sums(graphdef, state, jnp.asarray(batch.input_ids, jnp.int32),
                         jnp.asarray(batch.attention_mask, jnp.int32))
        total += float(s)
        count += float(c)
    if count == 0:
        raise ReplaceMeError("no token to score: the batches hold no sequence of 2+ tokens; "
                             "use more or longer texts")
    return total / count


def subset_batches(batches, num_sequences: int | None):
    """Batches of exactly the first ``num_sequences`` sequences of ``batches`` (all batches when None),
    packed if the input was."""
    from replaceme_jax.data.batching import make_batches, sequences
    batches = list(batches)
    if num_sequences is None:
        return batches
    if num_sequences < 1:
        raise ReplaceMeError(f"num_sequences must be positive (or None for all), got {num_sequences}")
    seqs = []
    for batch in batches:
        if len(seqs) >= num_sequences:
            break
        seqs.extend(sequences(batch))
    if not seqs:
        raise ReplaceMeError("no calibration sequences to score: the batches are empty")
    packed = any(int(np.max(b.attention_mask)) > 1 for b in batches)
    return make_batches(seqs[:num_sequences], batch_size=batches[0].shape[0],
                        max_length=max(b.shape[1] for b in batches), pack=packed)
