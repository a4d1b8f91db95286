"""Hugging Face tensor names <-> NNX parameter paths, and building a model tensor by tensor.

Every loader (safetensors, GGUF, Orbax) reduces to a stream of ``(hf_name, array)`` pairs; every
exporter to the reverse. Linear weights are transposed (HF ``[out, in]`` vs NNX ``kernel [in, out]``);
nothing else changes.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.config import ModelConfig
from replaceme_jax.models.modeling import CausalLM, abstract_model
from replaceme_jax.models.sharding import put, to_host

# (regex on the HF name, NNX path template, transpose?)
_RULES = [
    (r"model\.embed_tokens\.weight", "model.embed_tokens.embedding", False),
    (r"model\.norm\.weight", "model.norm.weight", False),
    (r"lm_head\.weight", "lm_head.kernel", True),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
     r"model.layers.\1.\2.weight", False),
    (r"model\.layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight",
     r"model.layers.\1.self_attn.\2.weight", False),
    (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight",
     r"model.layers.\1.\2.\3.kernel", True),
    (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.bias",
     r"model.layers.\1.\2.\3.bias", False),
]
_COMPILED = [(re.compile(p + r"$"), t, tr) for p, t, tr in _RULES]
# Buffers some checkpoints carry that are recomputed here.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def hf_to_nnx(name: str) -> tuple[tuple, bool] | None:
    """HF tensor name -> (NNX path, transpose?) or None if the name is not a model parameter."""
    for pattern, template, transpose in _COMPILED:
        m = pattern.match(name)
        if m:
            path = tuple(int(p) if p.isdigit() else p for p in m.expand(template).split("."))
            return path, transpose
    return None


def nnx_to_hf(path: tuple) -> tuple[str, bool]:
    """NNX path -> (HF tensor name, transpose?)."""
    dotted = ".".join(str(p) for p in path)
    if dotted == "model.embed_tokens.embedding":
        return "model.embed_tokens.weight", False
    if dotted.endswith(".kernel"):
        return dotted[: -len("kernel")] + "weight", True
    return dotted, False


def param_items(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Variable]]:
    """(path, Param variable) for every parameter, in a stable order."""
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            yield tuple(path), var


def hf_state_dict(model: CausalLM, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (HF name, numpy array) pairs from a model, one tensor at a time.

    Sharded parameters are gathered to every host (``to_host``), so on a pod each process sees the
    full tensor and the caller decides which process writes it.
    """
    for path, var in param_items(model):
        name, transpose = nnx_to_hf(path)
        arr = to_host(var[...])
        if transpose:
            arr = arr.T
        if dtype is not None:
            arr = arr.astype(dtype)
        yield name, np.ascontiguousarray(arr)


def _check_finite_tensor(arr: np.ndarray, name: str, source: str, file_names, converted_to) -> None:
    if not np.issubdtype(arr.dtype, np.inexact) and "float" not in str(arr.dtype):
        return
    if np.isfinite(arr).all():
        return
    own = (file_names or {}).get(name)
    label = f"{name} ({own} in the file)" if own and own != name else name
    counts = f"{int(np.isnan(arr).sum())} NaN, {int(np.isinf(arr).sum())} inf"
    if converted_to:  # finite in the file, but not in the parameter dtype
        raise ReplaceMeError(
            f"checkpoint {source}: {label} overflows {jnp.dtype(converted_to).name} ({counts} after "
            f"conversion). Fix: load with param_dtype float32 or bfloat16.")
    raise ReplaceMeError(
        f"checkpoint {source} holds non-finite values in {label} ({counts}); the file is corrupt "
        "or was saved after a diverged run. Fix: re-download or re-export the checkpoint (for a "
        "pruned model, re-run the pruning job).")


def build_model(
    config: ModelConfig,
    tensors: Iterable[tuple[str, Callable[[], np.ndarray] | np.ndarray, tuple, str]],
    source: str,
    place: Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None = None,
    file_names: dict[str, str] | None = None,
) -> CausalLM:
    """Fill an abstract model from ``(hf_name, loader_or_array, hf_shape, dtype_str)`` records.

    Shapes and names are checked for *all* tensors before any is read, and every problem is
    reported in one error. Tensors are then materialised one at a time (``loader()``), converted
    to the parameter dtype and put on devices with ``place(path, ShapeDtypeStruct) -> Sharding``
    (default: the default device), so peak host memory is one tensor above the model. With a
    sharding, each process builds only the shards its own devices hold (``sharding.put``), so a
    multi-host load does not broadcast whole tensors between hosts.

    Each tensor is checked for NaN/inf on the host while it is there anyway (about 0.1 s for 135M
    parameters, nothing to compile): the first bad one is a ReplaceMeError naming it (its HF name,
    and ``file_names[hf_name]``, the file's own name, when that differs).
    """
    model = abstract_model(config)
    expected = {path: var for path, var in param_items(model)}
    plan, problems, seen = [], [], set()
    for name, loader, shape, dtype in tensors:
        if _IGNORED.match(name):
            continue
        mapped = hf_to_nnx(name)
        if mapped is None:
            problems.append(f"unexpected tensor {name!r} (shape {tuple(shape)})")
            continue
        path, transpose = mapped
        if path[0] == "lm_head" and config.tie_word_embeddings:
            continue  # tied head: the embedding is the head
        var = expected.get(path)
        if var is None:
            problems.append(f"unexpected tensor {name!r}: no such parameter for this config")
            continue
        want = tuple(var.shape)
        got = tuple(shape)[::-1] if transpose else tuple(shape)
        if got != want:
            hf_want = want[::-1] if transpose else want
            problems.append(f"{name}: shape {tuple(shape)} but the config implies {hf_want}")
        if dtype not in ("F32", "F16", "BF16", "F64", "float32", "float16", "bfloat16", "float64"):
            problems.append(f"{name}: unsupported dtype {dtype}")
        seen.add(path)
        plan.append((path, var, loader, transpose))
    missing = [".".join(map(str, p)) for p in expected if p not in seen]
    if missing:
        shown = ", ".join(nnx_to_hf(tuple(int(x) if x.isdigit() else x for x in m.split(".")))[0]
                          for m in missing[:8])
        problems.append(f"{len(missing)} missing tensor(s): {shown}{' ...' if len(missing) > 8 else ''}")
    if problems:
        raise ReplaceMeError(
            f"checkpoint {source} does not match its config ({len(problems)} problem(s)):\n  - "
            + "\n  - ".join(problems)
            + "\nFix: point at a checkpoint whose config.json matches its weights.")
    for path, var, loader, transpose in plan:
        arr = loader() if callable(loader) else loader
        arr = np.asarray(arr)
        name = nnx_to_hf(path)[0]
        _check_finite_tensor(arr, name, source, file_names, "")
        if transpose:
            arr = arr.T
        with np.errstate(over="ignore"):  # an overflow is named just below
            arr = arr.astype(var.dtype)
        _check_finite_tensor(arr, name, source, file_names, var.dtype)
        sharding = place(path, jax.ShapeDtypeStruct(arr.shape, arr.dtype)) if place else None
        var.set_value(put(arr, sharding) if sharding is not None else jnp.asarray(arr))
    return model
