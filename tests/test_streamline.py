"""The LLM-Streamline baseline: only the anchor block changes, and it learns the removed run's map."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from replaceme_jax.baselines.streamline import streamline
from replaceme_jax.data.batching import Batch
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme.surgery import apply_cuts, drop_blocks
from tiny_models import random_tiny_llama


def _batches(vocab, n=4, rows=4, t=24, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, vocab, size=(rows, t)).astype(np.int32)
        mask = np.ones((rows, t), np.int32)
        mask[0, t // 2:] = 0  # one row half padding: padded positions must not count
        out.append(Batch(input_ids=ids, attention_mask=mask, num_tokens=int(mask.sum()), num_sequences=rows))
    return out


def _stream(model, batch, depth):
    """Block outputs h_0 .. h_{depth-1} of ``model`` on ``batch`` (the model's own forward)."""
    mask = jnp.asarray(batch.attention_mask)
    cos, sin, biases = model.attention_inputs(mask)
    return [np.asarray(h, np.float64) for _, _, _, h in
            model.blocks(model.embed(jnp.asarray(batch.input_ids)), cos, sin, biases, depth=depth)]


def _rel_error(a, b, mask):
    w = (np.asarray(mask) > 0)[..., None]
    return float(np.sum(w * (a - b) ** 2) / np.sum(w * b ** 2))


def test_anchor_learns_the_removed_run_and_nothing_else_changes():
    model = random_tiny_llama(64, num_hidden_layers=6)
    before = jax.tree.map(np.asarray, nnx.state(model))
    batches, cut = _batches(64), (2, 5)
    result = streamline(model, batches, cut, steps=60, lr=5e-3)
    pruned, drop = result.model, apply_cuts(model, [cut])
    assert pruned.config.num_hidden_layers == 3
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model)))  # input untouched
    changed = {path[:3] for path, p in nnx.to_flat_state(nnx.state(pruned))
               if not np.array_equal(np.asarray(p.get_value()),
                                     np.asarray(dict(nnx.to_flat_state(nnx.state(drop)))[path].get_value()))}
    assert changed == {("model", "layers", 1)}  # the anchor only
    # The anchor's output in the pruned model against the dense model's output of the cut's last block.
    errors = {"streamline": [], "drop": []}
    for b in batches:
        target = _stream(model, b, 5)[4]
        errors["streamline"].append(_rel_error(_stream(pruned, b, 2)[1], target, b.attention_mask))
        errors["drop"].append(_rel_error(_stream(drop, b, 2)[1], target, b.attention_mask))
    assert np.mean(errors["streamline"]) < 0.5 * np.mean(errors["drop"])
    assert result.losses[-1] < result.losses[0]


def test_replacing_dropped_or_misshapen_parameters_is_an_error():
    model = random_tiny_llama(64, num_hidden_layers=4)
    kernel = ("model", "layers", 1, "mlp", "down_proj", "kernel")
    with pytest.raises(ReplaceMeError, match="not a kept parameter"):
        drop_blocks(model, [1], replaced={kernel: np.zeros((128, 64), np.float32)})
    with pytest.raises(ReplaceMeError, match="shape"):
        drop_blocks(model, [2], replaced={kernel: np.zeros((64, 64), np.float32)})
    with pytest.raises(ReplaceMeError, match="steps"):
        streamline(model, _batches(64, n=1), (1, 3), steps=0)
