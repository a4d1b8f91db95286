"""Small random-weight Llama models for the evaluation tests (norm weights near 1, small kernels)."""
import jax
import numpy as np

from replaceme_jax.checkpoints.keymap import abstract_model, param_items
from replaceme_jax.models.config import ModelConfig


def random_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A 2-block, width-64 Llama with deterministic random weights; ``overrides`` change config fields."""
    fields = dict(model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = abstract_model(ModelConfig(**{**fields, **overrides}))
    rng = np.random.RandomState(seed)
    for path, var in param_items(model):
        shape = var.value.shape
        value = (0.5 + rng.rand(*shape)) if "norm" in str(path) else 0.15 * rng.randn(*shape)
        var.value = jax.numpy.asarray(value, np.float32)
    return model
