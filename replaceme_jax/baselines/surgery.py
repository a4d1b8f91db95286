"""Dropping any set of blocks, contiguous or not, with no transform (ShortGPT, SLEB).

``replaceme.surgery.apply_cuts`` needs an anchor block before every cut because it folds a
transform there; a plain drop needs none, so block 0 and touching blocks may go too. SLEB drops
hundreds of candidate sets, so the skeleton (graph definition and parameter paths) of each pruned
shape is built once and cached; a drop then only re-points arrays.
"""
from __future__ import annotations

import functools
from typing import Iterable

from flax import nnx

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.config import ModelConfig
from replaceme_jax.models.modeling import CausalLM


@functools.lru_cache(maxsize=16)
def _skeleton(config: ModelConfig):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))
    return graphdef, tuple(path for path, _ in nnx.to_flat_state(state))


def drop_blocks(model: CausalLM, indices: Iterable[int]) -> CausalLM:
    """New model without the blocks ``indices``; its arrays are those of ``model`` (no copy)."""
    num_blocks = model.config.num_hidden_layers
    dropped = sorted({int(i) for i in indices})
    bad = [i for i in dropped if not 0 <= i < num_blocks]
    if bad:
        raise ReplaceMeError(f"cannot drop blocks {bad}: the model has blocks 0..{num_blocks - 1}")
    if len(dropped) >= num_blocks:
        raise ReplaceMeError(f"dropping {len(dropped)} of {num_blocks} blocks leaves none; drop fewer")
    kept = [i for i in range(num_blocks) if i not in set(dropped)]
    old = dict(nnx.to_flat_state(nnx.state(model)))
    graphdef, paths = _skeleton(model.config.without_layers(dropped))
    flat = []
    for path in paths:
        src = path[:2] + (kept[path[2]],) + path[3:] if path[:2] == ("model", "layers") else path
        var = old[src]
        flat.append((path, var.replace(var.get_value())))  # a new Variable over the same array
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
