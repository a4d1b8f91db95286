"""Paired bootstrap: the same resampled indices for every array, in bounded-memory chunks."""
from __future__ import annotations

import numpy as np


def paired_means(rng: np.random.Generator, arrays, iters: int, chunk: int) -> list[np.ndarray]:
    """Per array, its mean over each of ``iters`` resamples (with replacement) of the shared index
    range; all arrays (same length) see the same draws, so differences between them are paired.
    ``chunk`` draws are made at a time (memory is chunk x length)."""
    arrays = [np.asarray(a) for a in arrays]
    size = arrays[0].size
    out = [np.empty(iters) for _ in arrays]
    for start in range(0, iters, chunk):
        idx = rng.integers(0, size, (min(chunk, iters - start), size))
        for a, o in zip(arrays, out):
            o[start:start + len(idx)] = a[idx].mean(axis=1)
    return out
