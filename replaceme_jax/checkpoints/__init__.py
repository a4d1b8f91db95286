"""Checkpoint loading and saving: GGUF, Hugging Face safetensors, Orbax, and named defaults."""
from __future__ import annotations

import os

from replaceme_jax.checkpoints.registry import REGISTRY, checkpoint_kind, resolve_default_path


def load_pretrained(name_or_path: str, *, param_dtype: str | None = None, dtype: str | None = None,
                    place=None):
    """(CausalLM, tokenizer) from a registry name, a .gguf file, an HF directory or an Orbax checkpoint."""
    path = name_or_path if os.path.exists(name_or_path) else None
    if path is None and name_or_path.lower() in {**REGISTRY, "default": 0, "smollm2-135m-instruct": 0}:
        path = resolve_default_path(name_or_path)
    kind = checkpoint_kind(path or name_or_path)
    if kind == "gguf":
        from replaceme_jax.checkpoints.gguf import load_gguf
        return load_gguf(path, param_dtype=param_dtype, dtype=dtype, place=place)
    if kind == "hf":
        from replaceme_jax.checkpoints.hf import load_hf
        return load_hf(path, param_dtype=param_dtype, dtype=dtype, place=place)
    from replaceme_jax.checkpoints.orbax_io import restore_orbax
    return restore_orbax(path, param_dtype=param_dtype, dtype=dtype, place=place)


__all__ = ["load_pretrained", "resolve_default_path", "checkpoint_kind", "REGISTRY"]
