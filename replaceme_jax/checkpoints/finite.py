"""A cheap check that every parameter of a model on devices is finite (no NaN, no inf).

Used after an Orbax restore (whose arrays go straight from disk to their devices) and available
for any in-memory model (e.g. a pruned one before it is exported). Safetensors and GGUF loads are
checked on the host instead, tensor by tensor, in ``keymap.build_model``.

On accelerators one jitted reduction per parameter runs where the parameter lives (sharded arrays
are reduced shard by shard, with one scalar all-reduced per tensor), so nothing but one boolean
per tensor reaches the host; on CPU devices the shards are read in place. No tensor is gathered.
Only when a tensor is bad are its NaN and inf counted, to name it in the error.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax.checkpoints.keymap import nnx_to_hf, param_items
from replaceme_jax.errors import ReplaceMeError


@jax.jit
def _all_finite(x):
    return jnp.isfinite(x).all()


@jax.jit
def _bad_counts(x):
    return jnp.isnan(x).sum(), jnp.isinf(x).sum()


def _scalar(x) -> np.ndarray:
    """Host value of a replicated scalar (on a pod only this process's copy is read)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def _on_cpu(x) -> bool:
    """A single-process array on CPU devices: its shards can be read in place."""
    return (isinstance(x, jax.Array) and x.is_fully_addressable
            and all(d.platform == "cpu" for d in x.sharding.device_set))


def _host_shards(x):
    """One copy of each distinct shard (replicas skipped), as zero-copy numpy views (CPU only)."""
    return [np.asarray(shard.data) for shard in x.addressable_shards if shard.replica_id == 0]


def non_finite_parameters(model, *, hf_names: bool = True) -> list[tuple[str, int, int]]:
    """(name, NaN count, inf count) of each parameter that holds a non-finite value, in parameter
    order; names are Hugging Face tensor names (``hf_names``) or dotted NNX paths.

    On CPU devices the shards are read in place with numpy (device memory is host memory, and
    nothing needs compiling: ~0.15 s for 135M parameters); elsewhere one jitted reduction per
    tensor runs on its devices and only a boolean per tensor comes back. Counts are over this
    process's shards (replicated values counted once)."""
    items = [(path, var[...]) for path, var in param_items(model)]
    items = [(path, x) for path, x in items
             if jnp.issubdtype(x.dtype, jnp.inexact)]
    # Dispatched asynchronously for accelerators, read together below.
    flags = [all(np.isfinite(s).all() for s in _host_shards(x)) if _on_cpu(x) else _all_finite(x)
             for _, x in items]
    bad = []
    for (path, x), ok in zip(items, flags):
        if bool(_scalar(ok)):
            continue
        if _on_cpu(x):
            shards = _host_shards(x)
            nans, infs = sum(int(np.isnan(s).sum()) for s in shards), sum(int(np.isinf(s).sum()) for s in shards)
        else:
            nans, infs = _bad_counts(x)
        name = nnx_to_hf(path)[0] if hf_names else ".".join(str(p) for p in path)
        bad.append((name, int(_scalar(nans)), int(_scalar(infs))))
    return bad


def check_finite(model, source, *, hf_names: bool = True, file_names: dict[str, str] | None = None) -> None:
    """ReplaceMeError naming the tensor(s) of checkpoint ``source`` that hold NaN or inf.

    ``file_names`` maps a Hugging Face name to the file's own tensor name (GGUF), shown beside it.
    """
    bad = non_finite_parameters(model, hf_names=hf_names)
    if not bad:
        return
    file_names = file_names or {}

    def label(name):
        own = file_names.get(name)
        return f"{name} ({own} in the file)" if own and own != name else name

    shown = ", ".join(f"{label(name)} ({nans} NaN, {infs} inf)" for name, nans, infs in bad[:5])
    more = f" and {len(bad) - 5} more tensor(s)" if len(bad) > 5 else ""
    raise ReplaceMeError(
        f"checkpoint {source} holds non-finite values in {shown}{more}; the file is corrupt or was "
        "saved after a diverged run. Fix: re-download or re-export the checkpoint (for a pruned "
        "model, re-run the pruning job; a non-finite T comes from overflowing statistics or a "
        "diverged cosine solver).")


__all__ = ["check_finite", "non_finite_parameters"]
