"""Tiny random-weight models and a word-level tokenizer, shared by the tests.

Two kinds of builder:

* ours only: ``random_model`` (any ``ModelConfig``), ``random_tiny_llama`` (a 2-block Llama) and
  ``save_tiny_checkpoint`` (a saved model with SmolLM2's tokenizer);
* a transformers reference and ours from its ``save_pretrained`` directory: ``FAMILIES`` (one
  small transformers config per supported family), ``randomize``, ``saved_reference`` and ``reference_pair``, with
  ``padded_batch`` (rows full, right- and left-padded) for comparing logits.

Both use one recipe (norm scales in [0.5, 1.5), other weights ``scale`` x N(0, 1)) so logits are
O(1), far from init. torch is imported only by the transformers builders, so test files that use
our models alone do not need it.
"""
import jax
import numpy as np
import transformers

from replaceme_jax.checkpoints.keymap import abstract_model, param_items
from replaceme_jax.models.config import ModelConfig

# One small size for every family of FAMILIES (3 blocks, GQA 4:2, width 32).
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# transformers configs of every supported family and the features that set them apart.
FAMILIES = {
    "llama-untied": lambda: transformers.LlamaConfig(**SMALL, rope_theta=50000.0),
    "llama-bias": lambda: transformers.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True),
    "llama3-rope-tied": lambda: transformers.LlamaConfig(**SMALL, rope_scaling=LLAMA3_ROPE,
                                                         tie_word_embeddings=True),
    "mistral-window": lambda: transformers.MistralConfig(**SMALL, sliding_window=4),
    "qwen2-tied": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16, rope_theta=1e6),
}


def random_model(config: ModelConfig, seed: int = 0, scale: float = 0.15):
    """A CausalLM of ``config`` with deterministic O(1)-logit random weights (shapes only first:
    JAX's eager random init is slow)."""
    model = abstract_model(config)
    rng = np.random.RandomState(seed)
    for path, var in param_items(model):
        shape = var.shape
        value = (0.5 + rng.rand(*shape)) if "norm" in str(path) else scale * rng.randn(*shape)
        var.set_value(jax.numpy.asarray(value, var.dtype))
    return model


def random_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A 2-block, width-64 Llama with deterministic random weights; ``overrides`` change config fields."""
    fields = dict(model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return random_model(ModelConfig(**{**fields, **overrides}), seed)


def randomize(torch_model, seed: int = 0):
    """The same recipe on a transformers model, in place: weights far from init so logits are O(1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def saved_reference(name, hf_config, tmp_path_factory):
    """(random transformers model of ``hf_config``, its save_pretrained directory)."""
    import torch

    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    randomize(ref)
    path = tmp_path_factory.mktemp(name) / "hf"
    ref.save_pretrained(path)
    return ref, path


def reference_pair(name, hf_config, tmp_path_factory):
    """(name, random transformers model, our model loaded from its save_pretrained directory)."""
    from replaceme_jax.checkpoints.hf import load_hf

    ref, path = saved_reference(name, hf_config, tmp_path_factory)
    return name, ref, load_hf(path)[0]


def padded_batch(vocab, t=12):
    """(ids, 0/1 mask) [3, t]; rows: full, right-padded, left-padded."""
    ids = np.random.RandomState(0).randint(0, vocab, (3, t))
    mask = np.ones((3, t), np.int32)
    mask[1, t - 4:] = 0
    mask[2, :5] = 0
    return ids, mask


def word_tokenizer(num_words: int = 30) -> transformers.PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over <unk>, <s>, </s>, w0 .. w{num_words-1} (ids 0, 1, 2, 3 ..)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(num_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def tiny_model_and_batches(num_blocks: int, *, hidden: int = 16, vocab: int = 64, sequences: int = 10,
                           min_len: int = 5, seed: int = 0):
    """(a small default-init CausalLM, static-shape batches of 4 x 24 of random token sequences):
    the selection, budget and baseline tests' shared setup."""
    from flax import nnx
    from replaceme_jax.data import make_batches
    from replaceme_jax.models.modeling import CausalLM
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=num_blocks,
                      num_attention_heads=2, num_key_value_heads=1)
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, vocab, size=int(k)) for k in rng.integers(min_len, 24, size=sequences)]
    return CausalLM(cfg, rngs=nnx.Rngs(seed)), make_batches(seqs, batch_size=4, max_length=24, buckets=(24,))


def save_tiny_checkpoint(path, num_hidden_layers, **config):
    """A random model with SmolLM2's tokenizer saved as a Hugging Face directory, for the scripts and
    the pipeline, which load a model by path and calibrate on real text through its tokenizer.
    Width 32, GQA 4:2, tied head unless ``config`` says otherwise."""
    import gguf
    from flax import nnx

    from replaceme_jax.checkpoints.gguf import tokenizer_from_gguf
    from replaceme_jax.checkpoints.hf import save_hf
    from replaceme_jax.checkpoints.registry import resolve_default_path
    from replaceme_jax.models.modeling import CausalLM
    tok = tokenizer_from_gguf(gguf.GGUFReader(resolve_default_path("smollm2-135m")))
    config = ModelConfig(vocab_size=len(tok), num_hidden_layers=num_hidden_layers, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **{**dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True), **config})
    return save_hf(CausalLM(config, rngs=nnx.Rngs(0)), path, tokenizer=tok)
