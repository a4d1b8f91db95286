"""GGUF (llama.cpp) -> NNX model and tokenizer.

Quantized tensors are dequantized to float32 with the ``gguf`` package (pure numpy); those float32
weights are the dense baseline. llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for
the llama architecture (interleaved RoPE); we undo it to get HF's rotate-half layout. qwen2/qwen3
GGUFs are written unpermuted. The tokenizer is rebuilt in ``gguf_tokenizer``.
"""
from __future__ import annotations

import os
import re

import numpy as np

from replaceme_jax.checkpoints.gguf_tokenizer import tokenizer_from_gguf
from replaceme_jax.checkpoints.keymap import build_model
from replaceme_jax.checkpoints.registry import absolute_path
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.config import ModelConfig

_SUPPORTED = ("llama", "qwen2", "qwen3")

# GGUF tensor name -> HF tensor name.
_NAME_RULES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.(weight|bias)", r"model.layers.\1.mlp.gate_proj.\2"),
    (r"blk\.(\d+)\.ffn_up\.(weight|bias)", r"model.layers.\1.mlp.up_proj.\2"),
    (r"blk\.(\d+)\.ffn_down\.(weight|bias)", r"model.layers.\1.mlp.down_proj.\2"),
]
_NAME_RULES = [(re.compile(p + "$"), t) for p, t in _NAME_RULES]


def _gguf_to_hf_name(name: str) -> str | None:
    for pattern, template in _NAME_RULES:
        m = pattern.match(name)
        if m:
            return m.expand(template)
    return None


def _open(path: str):
    import gguf

    if not os.path.exists(path):
        raise ReplaceMeError(f"GGUF file not found: {path}. Fix: check the path, or use a registry "
                             "name such as 'smollm2-135m'.")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on a damaged file
        raise ReplaceMeError(f"cannot read GGUF file {path}: {e}. Fix: re-download or re-convert it.") from e


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, path: str = "<gguf>") -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _SUPPORTED:
        raise ReplaceMeError(
            f"GGUF file {path} has architecture {arch!r}; supported: {list(_SUPPORTED)}. "
            "Fix: use a Llama/Mistral/Qwen2/Qwen3 checkpoint.")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    heads = int(g("attention.head_count"))
    d_model = int(g("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    hf = {
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": d_model,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", g("rope.dimension_count", d_model // heads))),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if arch == "llama" and "blk.0.attn_q.bias" in names:
        hf["attention_bias"] = True
    scaling_type = g("rope.scaling.type")
    if scaling_type == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    return ModelConfig.from_hf_config(hf)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's interleaving permutation of q/k rows (works for weights and biases)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(path: str) -> ModelConfig:
    """The architecture in a GGUF's header (no tensor is read)."""
    return config_from_gguf(_open(path), path)


def _tensor_loader(tensor, hf_name: str, config: ModelConfig):
    import gguf

    def load():
        arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        arr = arr.reshape(tuple(int(x) for x in tensor.shape[::-1]))
        if config.model_type == "llama":
            if ".q_proj." in hf_name:
                arr = _unpermute(arr, config.num_attention_heads)
            elif ".k_proj." in hf_name:
                arr = _unpermute(arr, config.num_key_value_heads)
        return arr
    return load


def load_gguf(path: str, *, param_dtype: str | None = None, dtype: str | None = None, place=None):
    """GGUF file -> (CausalLM, tokenizer). Tensors are dequantized one at a time."""
    path = str(absolute_path(path))
    reader = _open(path)
    config = config_from_gguf(reader, path)
    overrides = {k: v for k, v in (("param_dtype", param_dtype), ("dtype", dtype)) if v}
    if overrides:
        config = config.replace(**overrides)
    records, unknown, file_names = [], [], {}
    for t in reader.tensors:
        hf_name = _gguf_to_hf_name(t.name)
        if hf_name is None:
            if t.name.startswith("rope_freqs"):  # llama3 rope factors; recomputed from config
                continue
            unknown.append(t.name)
            continue
        file_names[hf_name] = t.name
        records.append((hf_name, _tensor_loader(t, hf_name, config),
                        tuple(int(x) for x in t.shape[::-1]), "float32"))
    if unknown:
        raise ReplaceMeError(f"GGUF file {path} has tensors this loader does not know: {unknown[:5]}. "
                             "Fix: use a plain Llama/Qwen decoder GGUF.")
    model = build_model(config, records, path, place=place, file_names=file_names)  # checks finiteness
    return model, tokenizer_from_gguf(reader, path)
