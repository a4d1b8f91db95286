"""Hugging Face checkpoint directories (config.json + safetensors) <-> NNX models.

Loading reads the safetensors headers first (names, shapes, dtypes; no data), lets
``keymap.build_model`` check every tensor against the config at once, then reads tensors one at a
time, so host memory peaks at the model plus one tensor. Saving writes shard by shard (at most
``max_shard_bytes`` of host copies at a time) into a temp directory that is renamed into place only
when everything, config and tokenizer included, has been written.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from replaceme_jax.checkpoints.keymap import build_model, hf_state_dict, param_items
from replaceme_jax.checkpoints.registry import absolute_path
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.io_utils import atomic_output_dir, atomic_write_json, is_primary
from replaceme_jax.models.config import ModelConfig
from replaceme_jax.models.modeling import CausalLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# Any of these means the directory carries a tokenizer AutoTokenizer can read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Hugging Face's own default shard size for save_pretrained ("5GB").
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_EXPORT_DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- loading
def _checkpoint_dir(path) -> Path:
    root = absolute_path(path)
    if not root.exists():
        raise ReplaceMeError(f"Hugging Face checkpoint directory {root} does not exist. Fix: check the "
                             "path (a directory holding config.json and model.safetensors).")
    if not root.is_dir():
        raise ReplaceMeError(f"{root} is a file, not a Hugging Face checkpoint directory. Fix: pass the "
                             "directory that holds config.json and the .safetensors weights.")
    return root


def read_hf_config(path, *, param_dtype: str | None = None, dtype: str | None = None) -> ModelConfig:
    """ModelConfig from ``<path>/config.json``; errors name the file and the fix."""
    root = _checkpoint_dir(path)
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise ReplaceMeError(f"{config_path} is missing. Fix: a Hugging Face checkpoint needs its "
                             "config.json next to the weights (save it with model.save_pretrained).")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReplaceMeError(f"cannot parse {config_path}: {e}. Fix: restore a valid config.json.") from e
    overrides = {k: v for k, v in (("param_dtype", param_dtype), ("dtype", dtype)) if v}
    try:
        return ModelConfig.from_hf_config(hf, **overrides)
    except KeyError as e:
        raise ReplaceMeError(f"{config_path} lacks the field {e}. Fix: use the config.json that was "
                             "saved with the model.") from e
    except ReplaceMeError as e:
        raise ReplaceMeError(f"{config_path}: {e}. Fix: use a Llama, Mistral, Qwen2 or Qwen3 "
                             "checkpoint, or correct the config.") from e


def _weight_files(root: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """(safetensors files, tensor name -> file from the shard index, or None for a single file)."""
    index_path, single = root / INDEX_NAME, root / WEIGHTS_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ReplaceMeError(f"cannot read the shard index {index_path}: {e}. Fix: restore the "
                                 "index file, or re-save the model with save_pretrained.") from e
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise ReplaceMeError(f"{index_path} lists shard file(s) that are not in {root}: "
                                 f"{', '.join(missing)}. Fix: copy the missing shard(s) into the directory.")
        return [root / f for f in files], {name: root / f for name, f in weight_map.items()}
    if single.is_file():
        return [single], None
    found = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".safetensors", ".pt"))
    hint = (f" (found {', '.join(found)}; re-save them as safetensors with "
            "model.save_pretrained(dir, safe_serialization=True))") if found else ""
    raise ReplaceMeError(f"no weights in {root}: expected {WEIGHTS_NAME} or {INDEX_NAME}{hint}. "
                         "Fix: point at a directory written by save_pretrained.")


def _open_safetensors(path: Path, stack: contextlib.ExitStack):
    try:
        return stack.enter_context(safe_open(str(path), framework="numpy"))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on damage
        raise ReplaceMeError(f"cannot read {path}: {e}. The file is truncated or corrupt. "
                             "Fix: re-download or re-save it.") from e


def _loader(handle, name: str, path: Path):
    def load() -> np.ndarray:
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise ReplaceMeError(f"cannot read tensor {name!r} from {path}: {e}. "
                                 "Fix: re-download or re-save the file.") from e
    return load


def load_tokenizer(path):
    """``AutoTokenizer`` of a directory when it has tokenizer files, else None."""
    root = Path(path)
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # heavy import, only when there is a tokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root))
    except Exception as e:  # transformers raises assorted errors on broken tokenizer files
        raise ReplaceMeError(f"cannot load the tokenizer in {root}: {e}. Fix: restore the tokenizer "
                             "files (tokenizer.json, tokenizer_config.json) or remove them.") from e


def load_hf(path, *, param_dtype: str | None = None, dtype: str | None = None, place=None):
    """Hugging Face directory -> (CausalLM, tokenizer or None).

    ``param_dtype``/``dtype`` override the config's (default float32); ``place`` is forwarded to
    ``keymap.build_model``. Tensors are streamed one at a time from (possibly sharded) safetensors.
    """
    root = _checkpoint_dir(path)
    config = read_hf_config(root, param_dtype=param_dtype, dtype=dtype)
    files, weight_map = _weight_files(root)
    with contextlib.ExitStack() as stack:
        handles = {file: _open_safetensors(file, stack) for file in files}
        held = {file: set(handle.keys()) for file, handle in handles.items()}
        if weight_map is None:
            weight_map = {name: files[0] for name in sorted(held[files[0]])}
        records, absent = [], []
        for name, file in weight_map.items():
            handle = handles[file]
            if name not in held[file]:
                absent.append(f"{name} (in {file.name})")
                continue
            # get_slice reads only the header: shape and dtype without touching the data.
            info = handle.get_slice(name)
            records.append((name, _loader(handle, name, file), tuple(info.get_shape()), info.get_dtype()))
        if absent:
            raise ReplaceMeError(f"{root / INDEX_NAME} names tensors its shards do not hold: "
                                 f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}. "
                                 "Fix: re-save the model so index and shards agree.")
        model = build_model(config, records, str(root), place=place)  # checks every tensor is finite
    return model, load_tokenizer(root)


# ----------------------------------------------------------------------------- saving
def _shard_sizes(model: CausalLM, itemsize: int, max_shard_bytes: int) -> list[int]:
    """Tensors per shard, greedily in parameter order (a tensor larger than the cap gets its own)."""
    counts, size = [], 0
    for _, var in param_items(model):
        nbytes = int(np.prod(var.shape)) * itemsize
        if not counts or (size + nbytes > max_shard_bytes and size > 0):
            counts.append(0)
            size = 0
        counts[-1] += 1
        size += nbytes
    return counts


def _generation_config(config: ModelConfig) -> dict | None:
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    fields = {k: v for k, v in (("bos_token_id", config.bos_token_id), ("eos_token_id", eos),
                                ("pad_token_id", config.pad_token_id)) if v is not None}
    return fields or None


def save_hf(model: CausalLM, path, *, tokenizer=None, overwrite: bool = False,
            dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """NNX model -> Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    Writes config.json, model.safetensors (or ``model-0000i-of-0000n.safetensors`` shards plus
    model.safetensors.index.json above ``max_shard_bytes``), generation_config.json when the config
    has special token ids, and the tokenizer's files. ``dtype`` is the tensor dtype on disk (default:
    the model's param_dtype). Atomic: the directory appears complete or not at all.
    """
    path = absolute_path(path)
    dtype = dtype or model.config.param_dtype
    if dtype not in _EXPORT_DTYPES:
        raise ReplaceMeError(f"export dtype {dtype!r} is not one of {_EXPORT_DTYPES}")
    if max_shard_bytes <= 0:
        raise ReplaceMeError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    np_dtype = np.dtype(jnp.dtype(dtype))  # bfloat16 is ml_dtypes' type, which safetensors writes
    counts = _shard_sizes(model, np_dtype.itemsize, max_shard_bytes)
    n = len(counts)
    names = ([WEIGHTS_NAME] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    with atomic_output_dir(path, overwrite=overwrite, what="Hugging Face checkpoint") as tmp:
        tensors = hf_state_dict(model, dtype=np_dtype)
        weight_map, total = {}, 0
        for filename, count in zip(names, counts):
            shard = dict(next(tensors) for _ in range(count))
            if is_primary():  # every process gathers (collectives), process 0 writes
                save_file(shard, str(tmp / filename), metadata={"format": "pt"})
            for name, arr in shard.items():
                weight_map[name] = filename
                total += arr.nbytes
            del shard
        if n > 1:
            atomic_write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(weight_map.items()))})
        atomic_write_json(tmp / CONFIG_NAME, model.config.to_hf_config(torch_dtype=dtype))
        generation = _generation_config(model.config)
        if generation is not None:
            atomic_write_json(tmp / GENERATION_CONFIG_NAME, generation)
        if tokenizer is not None and is_primary():
            tokenizer.save_pretrained(str(tmp))
    return path


__all__ = ["load_hf", "save_hf", "read_hf_config", "load_tokenizer", "DEFAULT_MAX_SHARD_BYTES",
           "CONFIG_NAME", "WEIGHTS_NAME", "INDEX_NAME"]
