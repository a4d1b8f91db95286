"""Orbax checkpoints of an NNX model: parameters, the config and the tokenizer in one directory.

Layout::

    <path>/params/               Orbax (OCDBT) checkpoint of the parameter tree
    <path>/config.json           the ModelConfig as a Hugging Face config
    <path>/tokenizer*.json ...   tokenizer files (when a tokenizer was given)
    <path>/replaceme_orbax.json  marker: format version, param/compute dtypes, user metadata

Orbax makes ``params/`` atomic on its own (it writes a temp directory and renames it once
finalised); the whole checkpoint is additionally built inside ``io_utils.atomic_output_dir``, so
``<path>`` appears only when params, config, tokenizer and marker are all written.
Arrays are written and read by Orbax per shard, never gathered on one host, so the same code serves
sharded and multi-host models.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx

from replaceme_jax.checkpoints.finite import check_finite
from replaceme_jax.checkpoints.hf import load_tokenizer, read_hf_config
from replaceme_jax.models.modeling import abstract_model
from replaceme_jax.checkpoints.registry import absolute_path
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.io_utils import atomic_output_dir, atomic_write_json, is_primary
from replaceme_jax.models.modeling import CausalLM

MARKER_NAME = "replaceme_orbax.json"  # registry.checkpoint_kind recognises a checkpoint by it
PARAMS_DIR = "params"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


def save_orbax(model: CausalLM, path, *, tokenizer=None, overwrite: bool = False,
               metadata: dict | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) as an Orbax checkpoint directory; atomic.

    ``metadata`` is any JSON-serialisable dict kept in the marker file (``read_orbax_metadata``).
    """
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise ReplaceMeError(f"Orbax checkpoint metadata must be JSON-serialisable: {e}. "
                             "Fix: pass plain dicts, lists, strings and numbers.") from e
    path = absolute_path(path)  # Orbax misreads relative paths
    config = model.config
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with atomic_output_dir(path, overwrite=overwrite, what="Orbax checkpoint") as tmp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, params)
            checkpointer.wait_until_finished()
        atomic_write_json(tmp / CONFIG_NAME, config.to_hf_config())
        if tokenizer is not None and is_primary():
            tokenizer.save_pretrained(str(tmp))
        # The marker goes last: a directory with it is a complete checkpoint.
        atomic_write_json(tmp / MARKER_NAME, {
            "format_version": FORMAT_VERSION,
            "param_dtype": config.param_dtype,
            "dtype": config.dtype,
            "metadata": metadata or {},
        })
    return path


def _checkpoint_dir(path) -> Path:
    root = absolute_path(path)  # Orbax misreads relative paths ("holds no readable Orbax metadata")
    if not root.is_dir():
        raise ReplaceMeError(f"Orbax checkpoint directory {root} does not exist. Fix: check the path "
                             "(a directory written by save_orbax).")
    marker = root / MARKER_NAME
    if not marker.is_file():
        raise ReplaceMeError(f"{marker} is missing, so {root} is not a complete checkpoint of this "
                             "project. Fix: point at a directory written by save_orbax.")
    return root


def read_orbax_metadata(path) -> dict[str, Any]:
    """The marker of a checkpoint: {"format_version", "param_dtype", "dtype", "metadata"}."""
    marker = _checkpoint_dir(path) / MARKER_NAME
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReplaceMeError(f"cannot parse {marker}: {e}. Fix: restore the file, or re-save the "
                             "checkpoint with save_orbax.") from e
    if info.get("format_version") != FORMAT_VERSION:
        raise ReplaceMeError(f"{marker} has format_version {info.get('format_version')!r}; this "
                             f"version reads {FORMAT_VERSION}. Fix: re-save the checkpoint with save_orbax.")
    return info


def restore_orbax(path, *, param_dtype: str | None = None, dtype: str | None = None,
                  place: Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None = None):
    """Orbax checkpoint directory -> (CausalLM, tokenizer or None).

    The model is rebuilt from config.json as an abstract model and Orbax restores straight into
    its shapes and dtypes (so ``param_dtype`` converts on read). ``place(nnx_path, abstract_array)``
    returns the sharding of each parameter (default: the first device); each host reads only the
    shards it owns.
    """
    root = _checkpoint_dir(path)
    info = read_orbax_metadata(root)
    config = read_hf_config(root, param_dtype=param_dtype or info["param_dtype"],
                            dtype=dtype or info["dtype"])
    model = abstract_model(config)
    params = nnx.state(model, nnx.Param)
    if place is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        place = lambda _path, _abstract: device  # noqa: E731
    target = jax.tree_util.tree_map_with_path(
        lambda kp, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place(_nnx_path(kp), x)),
        nnx.to_pure_dict(params))
    params_dir = root / PARAMS_DIR
    if not params_dir.is_dir():
        raise ReplaceMeError(f"the parameter directory {params_dir} is missing. Fix: copy the whole "
                             "checkpoint directory, or re-save it with save_orbax.")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(params_dir).item_metadata
            if stored is None:
                raise ReplaceMeError(f"{params_dir} holds no readable Orbax metadata. Fix: copy the "
                                     "whole checkpoint directory, or re-save it with save_orbax.")
            _check_against_config(stored, target, root)
            restored = checkpointer.restore(params_dir, target)
    except ReplaceMeError:
        raise
    except Exception as e:  # Orbax raises assorted errors on missing or damaged files
        raise ReplaceMeError(f"cannot restore the parameters in {params_dir}: {e}. Fix: the "
                             "checkpoint is incomplete or damaged; re-save it with save_orbax.") from e
    nnx.replace_by_pure_dict(params, restored)
    nnx.update(model, params)
    try:
        check_finite(model, root, hf_names=False)  # the checkpoint's own names are the NNX paths
    except ReplaceMeError as e:
        if config.param_dtype == info["param_dtype"]:
            raise
        raise ReplaceMeError(f"{e} Or its {info['param_dtype']} values overflow the requested "
                             f"param_dtype {config.param_dtype}: restore it without param_dtype.") from None
    return model, load_tokenizer(root)


def _nnx_path(key_path) -> tuple:
    return tuple(k.key for k in key_path)


def _shapes(tree) -> dict[str, tuple]:
    return {".".join(str(k) for k in _nnx_path(kp)): tuple(leaf.shape)
            for kp, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_against_config(stored_tree, target, root: Path) -> None:
    """Report every missing, unexpected or mis-shaped parameter at once (Orbax stops at the first)."""
    stored, wanted = _shapes(stored_tree), _shapes(target)
    problems = [f"missing parameter {k} (config implies shape {v})" for k, v in wanted.items()
                if k not in stored]
    problems += [f"unexpected parameter {k} (shape {v})" for k, v in stored.items() if k not in wanted]
    problems += [f"{k}: stored shape {stored[k]} but the config implies {v}" for k, v in wanted.items()
                 if k in stored and stored[k] != v]
    if problems:
        raise ReplaceMeError(
            f"Orbax checkpoint {root} does not match its {CONFIG_NAME} ({len(problems)} problem(s)):\n  - "
            + "\n  - ".join(problems[:20]) + ("\n  - ..." if len(problems) > 20 else "")
            + "\nFix: restore the config.json saved with these parameters, or re-save with save_orbax.")


__all__ = ["save_orbax", "restore_orbax", "read_orbax_metadata", "MARKER_NAME"]
