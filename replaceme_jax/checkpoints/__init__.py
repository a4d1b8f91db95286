"""Checkpoint loading and saving: GGUF, Hugging Face safetensors, Orbax, and named defaults."""
from __future__ import annotations

import os

from replaceme_jax.checkpoints.registry import (ALIASES, REGISTRY, absolute_path, checkpoint_kind,
                                                resolve_default_path)


# Bumped whenever the GGUF conversion (weights or tokenizer) changes, so stale conversions are rebuilt.
_CONVERTER_VERSION = 2


def converted_default_dir(name: str, path: str):
    """Where the HF conversion of a registry model's GGUF lives (whether or not it exists yet)."""
    from replaceme_jax.data.cache import cache_dir
    st = os.stat(path)
    return cache_dir() / "models" / f"{name}-{st.st_size}-{int(st.st_mtime)}-c{_CONVERTER_VERSION}"


def _cached_default(name: str, path: str) -> str | None:
    """An HF directory converted once from a registry model's GGUF (parsing and dequantizing the
    GGUF takes far longer than reading safetensors). Bit-identical parameters; rebuilt when the
    source file changes; disabled with REPLACEME_JAX_NO_MODEL_CACHE=1."""
    if os.environ.get("REPLACEME_JAX_NO_MODEL_CACHE"):
        return None
    target = converted_default_dir(name, path)
    if (target / "config.json").exists():
        return str(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # One process converts; others (parallel test workers, several jobs) wait for it, then reuse.
        with open(target.with_name(target.name + ".lock"), "w") as lock:
            _lock_exclusive(lock)
            if not (target / "config.json").exists():
                from replaceme_jax.checkpoints.gguf import load_gguf
                from replaceme_jax.checkpoints.hf import save_hf
                model, tokenizer = load_gguf(path)
                save_hf(model, target, tokenizer=tokenizer, overwrite=True)
        return str(target)
    except OSError:  # read-only or full cache: fall back to the GGUF itself
        return None


def _lock_exclusive(fh) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still keeps the cache whole
        return
    fcntl.flock(fh, fcntl.LOCK_EX)


def _run_output_model(path: str) -> str:
    """A pruning run's output directory stands for the model it saved (its hf/, else its orbax/)."""
    if not os.path.isdir(path) or any(os.path.exists(os.path.join(path, f))
                                      for f in ("config.json", "replaceme_orbax.json")):
        return path
    for sub, marker in (("hf", "config.json"), ("orbax", "replaceme_orbax.json")):
        if os.path.exists(os.path.join(path, sub, marker)):
            return os.path.join(path, sub)
    return path


def resolve_checkpoint(name_or_path: str, *, convert: bool = True) -> tuple[str, str]:
    """(path, kind) of a registry name, a .gguf file, an HF directory, an Orbax checkpoint or a
    pruning run's output directory (its hf/ or orbax/); kind is 'gguf', 'hf' or 'orbax'.

    A registry model's GGUF stands for its cached HF conversion: made on first use when ``convert``,
    else used only if it already exists."""
    name_or_path = os.fspath(name_or_path)
    path = str(absolute_path(name_or_path)) if os.path.exists(name_or_path) else None
    if path is None and name_or_path.lower() in {**REGISTRY, **ALIASES}:
        path = resolve_default_path(name_or_path)
        name = os.path.basename(path).removesuffix(".gguf")
        if convert:
            path = _cached_default(name, path) or path
        elif (converted_default_dir(name, path) / "config.json").is_file():
            path = str(converted_default_dir(name, path))
    path = _run_output_model(path) if path else name_or_path
    return path, checkpoint_kind(path)


def load_pretrained(name_or_path: str, *, param_dtype: str | None = None, dtype: str | None = None,
                    place=None):
    """(CausalLM, tokenizer) from a registry name, a .gguf file, an HF directory, an Orbax checkpoint
    or a pruning run's output directory (its hf/ or orbax/)."""
    path, kind = resolve_checkpoint(name_or_path)
    if kind == "gguf":
        from replaceme_jax.checkpoints.gguf import load_gguf
        return load_gguf(path, param_dtype=param_dtype, dtype=dtype, place=place)
    if kind == "hf":
        from replaceme_jax.checkpoints.hf import load_hf
        return load_hf(path, param_dtype=param_dtype, dtype=dtype, place=place)
    from replaceme_jax.checkpoints.orbax_io import restore_orbax
    return restore_orbax(path, param_dtype=param_dtype, dtype=dtype, place=place)


def load_config(name_or_path: str, *, architecture: str | None = None, **overrides):
    """The ``ModelConfig`` of a checkpoint (as ``load_pretrained`` finds it), read without any weights,
    or of a published ``architecture`` (``checkpoints.architectures``) when one is named."""
    from replaceme_jax.checkpoints.architectures import PUBLISHED_ARCHITECTURES, published_config
    from replaceme_jax.errors import ReplaceMeError
    from replaceme_jax.models.config import ModelConfig
    if architecture:
        return published_config(architecture, **overrides)
    try:
        path, kind = resolve_checkpoint(name_or_path, convert=False)
    except ReplaceMeError as e:
        raise ReplaceMeError(f"{e} (to plan without the checkpoint's files, set --config.architecture to one "
                             f"of {sorted(PUBLISHED_ARCHITECTURES)})") from None
    if kind == "gguf":
        from replaceme_jax.checkpoints.gguf import read_config
        return read_config(path).replace(**overrides)
    return ModelConfig.from_hf_config(os.path.join(path, "config.json"), **overrides)  # HF and Orbax alike


__all__ = ["load_pretrained", "load_config", "resolve_checkpoint", "resolve_default_path", "checkpoint_kind",
           "REGISTRY"]
