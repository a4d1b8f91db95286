"""Small random-weight Llama models (norm weights near 1, small kernels) and a word-level tokenizer."""
import jax
import numpy as np
import transformers

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


def word_tokenizer(num_words: int = 30) -> transformers.PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over <unk>, <s>, </s>, w0 .. w{num_words-1} (ids 0, 1, 2, 3 ..)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(num_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")
