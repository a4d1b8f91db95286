"""Surgery: fold each T into its anchor's down-projection and drop the cut blocks (``apply_cuts``),
or drop any set of blocks with no transform (``drop_blocks``, for ShortGPT and SLEB).

Pure functions on the ``nnx.split`` state: the input model is left untouched, and the pruned model
shares every unchanged array with it (JAX arrays are immutable), so no copy of the weights is made.
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.config import ModelConfig
from replaceme_jax.models.modeling import CausalLM, abstract_split
from replaceme_jax.replaceme.cuts import Cut, validate_cuts

_HI = jax.lax.Precision.HIGHEST


def fold_transform(kernel: jax.Array, T, *, replace: bool = False) -> jax.Array:
    """down_proj kernel [d_ff, d] @ T [d, d], computed in float32 at full precision, cast back
    (``replace``: T is the new kernel itself, only cast and placed like ``kernel``).

    Runs where the kernel lives and keeps its sharding, so a sharded model stays sharded (T, a
    host array, is replicated to the kernel's devices).
    """
    kernel = jnp.asarray(kernel)
    # On one device the output stays uncommitted like the other parameters: a committed array at a
    # cut-dependent position would make every jitted pass over the pruned model recompile per cut.
    sharding = kernel.sharding if len(kernel.sharding.device_set) > 1 else None
    return _fold_fn(sharding, replace)(kernel, np.asarray(T, np.float32))


@functools.lru_cache(maxsize=16)
def _fold_fn(sharding, replace: bool = False):
    """One jitted fold per output sharding (a sweep folds hundreds of transforms)."""
    if replace:
        fold = lambda k, new: new.astype(k.dtype)  # noqa: E731
    else:
        fold = lambda k, t: jnp.matmul(k.astype(jnp.float32), t, precision=_HI).astype(k.dtype)  # noqa: E731
    return jax.jit(fold) if sharding is None else jax.jit(fold, out_shardings=sharding)


def apply_cuts(model: CausalLM, cuts: Sequence[Cut], transforms: Sequence | None = None,
               kernels: Sequence | None = None) -> CausalLM:
    """New model with blocks of each cut removed and T folded into block start-1's down_proj.

    ``cuts`` use the model's own block indices; ``transforms[i]`` is the d x d T of cut i, or None to
    drop the blocks with no transform (the UIDL baseline). ``kernels[i]`` (optional, [d_ff, d]): a
    re-fitted down_proj kernel for cut i's anchor, used instead of W T (a bias is still folded as b T).
    """
    config = model.config
    cuts = list(validate_cuts(cuts, config.num_hidden_layers))
    transforms = list(transforms) if transforms is not None else [None] * len(cuts)
    kernels = list(kernels) if kernels is not None else [None] * len(cuts)
    if len(transforms) != len(cuts) or len(kernels) != len(cuts):
        raise ReplaceMeError(f"{len(cuts)} cuts but {len(transforms)} transforms and {len(kernels)} kernels")
    dropped = sorted({i for s, e in cuts for i in range(s, e)})
    if len(dropped) != sum(e - s for s, e in cuts):
        raise ReplaceMeError(f"cuts overlap: {cuts}")
    for s, _ in cuts:
        if s - 1 in dropped:
            raise ReplaceMeError(f"the anchor block {s - 1} of cut starting at {s} is itself removed; "
                                 "merge touching cuts into one")
    d = config.hidden_size
    values = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    folded = {}
    for (s, _), T, K in zip(cuts, transforms, kernels):
        if T is None:
            if K is not None:
                raise ReplaceMeError(f"cut starting at {s} has a re-fitted kernel but no transform")
            continue
        if np.shape(T) != (d, d):
            raise ReplaceMeError(f"transform for cut starting at {s} has shape {np.shape(T)}, expected {(d, d)}")
        prefix = ("model", "layers", s - 1, "mlp", "down_proj")
        old = values[prefix + ("kernel",)]
        if K is None:
            folded[prefix + ("kernel",)] = fold_transform(old, T)
        elif np.shape(K) != tuple(old.shape):
            raise ReplaceMeError(f"re-fitted kernel for cut starting at {s} has shape {np.shape(K)}, "
                                 f"expected {tuple(old.shape)}")
        else:  # placed like the kernel it replaces (see fold_transform)
            folded[prefix + ("kernel",)] = fold_transform(old, np.asarray(K, np.float32), replace=True)
        if prefix + ("bias",) in values:  # (xW + b) T = x (W T) + b T
            folded[prefix + ("bias",)] = fold_transform(values[prefix + ("bias",)][None, :], T)[0]
    return _rebuild(model, dropped, folded)


def drop_blocks(model: CausalLM, indices: Iterable[int], replaced: dict | None = None) -> CausalLM:
    """New model without the blocks ``indices``, contiguous or not, and no transform (ShortGPT, SLEB).

    Unlike ``apply_cuts`` no anchor block is needed, so block 0 and touching blocks may go too.
    ``replaced``: new arrays for kept parameters, by their path in ``model`` (e.g. ``("model",
    "layers", 11, "mlp", "down_proj", "kernel")``), same shapes (a baseline that retrains a block).
    """
    num_blocks = model.config.num_hidden_layers
    dropped = sorted({int(i) for i in indices})
    bad = [i for i in dropped if not 0 <= i < num_blocks]
    if bad:
        raise ReplaceMeError(f"cannot drop blocks {bad}: the model has blocks 0..{num_blocks - 1}")
    if len(dropped) >= num_blocks:
        raise ReplaceMeError(f"dropping {len(dropped)} of {num_blocks} blocks leaves none; drop fewer")
    replaced = dict(replaced or {})
    old = dict(nnx.to_flat_state(nnx.state(model))) if replaced else {}  # SLEB calls this per candidate
    for path, value in replaced.items():
        if path not in old or (path[:2] == ("model", "layers") and path[2] in dropped):
            raise ReplaceMeError(f"cannot replace {'.'.join(map(str, path))}: not a kept parameter of the model")
        if tuple(np.shape(value)) != tuple(old[path].get_value().shape):
            raise ReplaceMeError(f"replacement for {'.'.join(map(str, path))} has shape {np.shape(value)}, "
                                 f"the parameter {old[path].get_value().shape}")
    return _rebuild(model, dropped, replaced)


def _rebuild(model: CausalLM, dropped: Sequence[int], replaced: dict) -> CausalLM:
    """The one rebuild behind both surgeries: a model of the shrunk config whose block i is the old
    block kept[i], each Variable re-pointing at the old array (no copy) or at ``replaced[old path]``."""
    kept = [i for i in range(model.config.num_hidden_layers) if i not in set(dropped)]
    old = dict(nnx.to_flat_state(nnx.state(model)))
    graphdef, paths = _skeleton(model.config.without_layers(dropped))
    flat = []
    for path in paths:
        src = path[:2] + (kept[path[2]],) + path[3:] if path[:2] == ("model", "layers") else path
        var = old[src]
        flat.append((path, var.replace(replaced[src] if src in replaced else var.get_value())))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@functools.lru_cache(maxsize=16)
def _skeleton(config: ModelConfig):
    """(graphdef, parameter paths) of a pruned shape; a sweep or SLEB rebuilds the same shape often."""
    graphdef, state = abstract_split(config)
    return graphdef, tuple(path for path, _ in nnx.to_flat_state(state))


def replace_kernels(model: CausalLM, kernels: dict) -> CausalLM:
    """New model with the arrays at ``kernels``' parameter paths replaced (same shapes), each cast
    and placed like the one it replaces; every other array is shared with ``model``."""
    old = dict(nnx.to_flat_state(nnx.state(model)))
    missing = [p for p in kernels if p not in old]
    if missing:
        raise ReplaceMeError(f"cannot replace {'.'.join(map(str, missing[0]))}: not a parameter of the model")
    placed = {p: fold_transform(old[p].get_value(), np.asarray(k, np.float32), replace=True) for p, k in kernels.items()}
    return drop_blocks(model, (), placed)
