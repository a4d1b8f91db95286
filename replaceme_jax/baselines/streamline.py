"""LLM-Streamline (Chen et al., 2024) as a baseline: the removed blocks' work learned by one block.

For a cut [s, e) the blocks s..e-1 are removed, as in ReplaceMe and plain dropping, and the anchor
block a = s-1 becomes the paper's "lightweight network": a transformer layer that replaces blocks
a..e-1, so from the anchor's input h_{a-1} it should produce the last removed block's output
h_{e-1}. It starts from the anchor's own weights and is trained with Optax AdamW on the mean squared
error to the dense model's h_{e-1} over the calibration tokens (relative to the target's energy,
so the loss reads like the relative residual). Everything else is unchanged: the pruned model has
the same blocks and parameter count as ReplaceMe's on that cut and differs only in the anchor's
weights. (The paper adds a separate layer in place of the removed ones; retraining the anchor
keeps the pruned shape, and its checkpoint, a plain model of the family.)
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme.cuts import Cut, validate_cuts
from replaceme_jax.replaceme.heal import adamw_warmup_cosine, batch_order
from replaceme_jax.replaceme.surgery import drop_blocks


@dataclasses.dataclass
class StreamlineResult:
    model: object              # the pruned model, anchor retrained
    cut: Cut
    losses: list[float]        # relative MSE of each step's batch, before its update
    seconds: float


def layer_pairs(model, batches, cut: Cut) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """(h_{a-1}, h_{e-1}, attention mask) per batch from the dense model: the anchor's input and the
    target it is trained toward (h_{-1} is the embeddings)."""
    (s, e), = validate_cuts([cut], model.config.num_hidden_layers)
    graph, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask):
        m = nnx.merge(graph, state)
        cos, sin, biases = m.attention_inputs(mask)
        h = x = m.embed(ids)
        for k, _, _, h in m.blocks(h, cos, sin, biases, depth=e):
            if k == s - 2:
                x = h
        return x.astype(jnp.float32), h.astype(jnp.float32)

    pairs = []
    for b in batches:
        mask = jnp.asarray(b.attention_mask, jnp.int32)
        pairs.append((*run(state, jnp.asarray(b.input_ids, jnp.int32), mask), mask))
    return pairs


def streamline(model, batches, cut: Cut, *, steps: int = 200, lr: float = 1e-2, warmup: int = 10,
               seed: int = 0) -> StreamlineResult:
    """Remove ``cut`` from ``model`` and train the anchor block to stand in for the removed run.
    ``lr`` 1e-2: the best of 1e-4 .. 1e-2 on SmolLM2's [12, 20) (docs/results.md, healing section)."""
    import optax
    if steps < 1 or not lr > 0:
        raise ReplaceMeError(f"streamline needs steps >= 1 and lr > 0 (got steps={steps}, lr={lr})")
    batches = list(batches)
    if not batches:
        raise ReplaceMeError("streamline got no calibration batches: the calibration text is empty or too short")
    (s, e), = validate_cuts([cut], model.config.num_hidden_layers)
    a = s - 1
    t0 = time.perf_counter()
    pairs = layer_pairs(model, batches, (s, e))
    graph, init = nnx.split(model.model.layers[a])
    dtypes = jax.tree.map(lambda v: v.dtype, init)
    params = jax.tree.map(lambda v: v.astype(jnp.float32), init)  # trained in float32, cast back at the end
    tx = adamw_warmup_cosine(lr, warmup, steps)
    opt_state = tx.init(params)
    inputs = model.attention_inputs  # reads only the config: RoPE tables and masks from the batch

    def loss_fn(p, x, target, mask):
        cos, sin, biases = inputs(mask)
        out = nnx.merge(graph, p)(x, cos, sin, biases[a])
        w = (mask > 0)[..., None].astype(jnp.float32)
        return jnp.sum(w * jnp.square(out - target)) / jnp.maximum(jnp.sum(w * jnp.square(target)), 1e-30)

    @jax.jit
    def step(p, opt_state, x, target, mask):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, target, mask)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    losses = []
    for i in batch_order(len(pairs), steps, seed):
        params, opt_state, loss = step(params, opt_state, *pairs[i])
        losses.append(float(loss))
        if not np.isfinite(losses[-1]):
            raise ReplaceMeError(f"streamline diverged at step {len(losses)} (loss {losses[-1]}); lower its lr "
                                 f"(now {lr})")
    trained = jax.tree.map(lambda v, d: v.astype(d), params, dtypes)
    replaced = {("model", "layers", a, *path): v.get_value() for path, v in nnx.to_flat_state(trained)}
    pruned = drop_blocks(model, range(s, e), replaced=replaced)
    return StreamlineResult(model=pruned, cut=(s, e), losses=losses, seconds=time.perf_counter() - t0)
