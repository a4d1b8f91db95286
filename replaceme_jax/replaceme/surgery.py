"""Surgery: fold each T into its anchor's down-projection and drop the cut blocks.

A pure function on the ``nnx.split`` state: the input model is left untouched, and the pruned model
shares every unchanged array with it (JAX arrays are immutable), so no copy of the weights is made.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.modeling import CausalLM
from replaceme_jax.replaceme.cuts import Cut, validate_cuts

_HI = jax.lax.Precision.HIGHEST


def fold_transform(kernel: jax.Array, T) -> jax.Array:
    """down_proj kernel [d_ff, d] @ T [d, d], computed in float32 at full precision, cast back.

    Runs where the kernel lives and keeps its sharding, so a sharded model stays sharded (T, a
    host array, is replicated to the kernel's devices).
    """
    kernel = jnp.asarray(kernel)
    # On one device the output stays uncommitted like the other parameters: a committed array at a
    # cut-dependent position would make every jitted pass over the pruned model recompile per cut.
    sharding = kernel.sharding if len(kernel.sharding.device_set) > 1 else None
    return _fold_fn(sharding)(kernel, np.asarray(T, np.float32))


@functools.lru_cache(maxsize=16)
def _fold_fn(sharding):
    """One jitted fold per output sharding (a sweep folds hundreds of transforms)."""
    fold = lambda k, t: jnp.matmul(k.astype(jnp.float32), t, precision=_HI).astype(k.dtype)  # noqa: E731
    return jax.jit(fold) if sharding is None else jax.jit(fold, out_shardings=sharding)


def apply_cuts(model: CausalLM, cuts: Sequence[Cut], transforms: Sequence | None = None) -> CausalLM:
    """New model with blocks of each cut removed and T folded into block start-1's down_proj.

    ``cuts`` use the model's own block indices; ``transforms[i]`` is the d x d T of cut i, or None to
    drop the blocks with no transform (the UIDL baseline).
    """
    config = model.config
    cuts = list(validate_cuts(cuts, config.num_hidden_layers))
    transforms = list(transforms) if transforms is not None else [None] * len(cuts)
    if len(transforms) != len(cuts):
        raise ReplaceMeError(f"{len(cuts)} cuts but {len(transforms)} transforms")
    dropped = sorted({i for s, e in cuts for i in range(s, e)})
    if len(dropped) != sum(e - s for s, e in cuts):
        raise ReplaceMeError(f"cuts overlap: {cuts}")
    for s, _ in cuts:
        if s - 1 in dropped:
            raise ReplaceMeError(f"the anchor block {s - 1} of cut starting at {s} is itself removed; "
                                 "merge touching cuts into one")
    d = config.hidden_size
    _, state = nnx.split(model)
    values = {path: var.get_value() for path, var in nnx.to_flat_state(state)}
    for (s, _), T in zip(cuts, transforms):
        if T is None:
            continue
        if np.shape(T) != (d, d):
            raise ReplaceMeError(f"transform for cut starting at {s} has shape {np.shape(T)}, expected {(d, d)}")
        prefix = ("model", "layers", s - 1, "mlp", "down_proj")
        values[prefix + ("kernel",)] = fold_transform(values[prefix + ("kernel",)], T)
        if prefix + ("bias",) in values:  # (xW + b) T = x (W T) + b T
            values[prefix + ("bias",)] = fold_transform(values[prefix + ("bias",)][None, :], T)[0]
    kept = [i for i in range(config.num_hidden_layers) if i not in set(dropped)]
    new_config = config.without_layers(dropped)
    graphdef, abstract_state = _abstract_model(new_config)
    new_state = jax.tree.map(lambda x: x, abstract_state)  # fresh Variables; the cached ones stay abstract
    for path, var in nnx.to_flat_state(new_state):
        old = path
        if path[:2] == ("model", "layers"):
            old = path[:2] + (kept[path[2]],) + path[3:]
        var.set_value(values[old])
    return nnx.merge(graphdef, new_state)


@functools.lru_cache(maxsize=8)
def _abstract_model(config):
    """(graphdef, shape-only state) of a model of ``config``: tracing the initialisers costs about a
    second, and a sweep or benchmark prunes to the same shape many times."""
    return nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))
