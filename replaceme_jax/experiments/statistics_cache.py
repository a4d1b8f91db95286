"""Statistics on disk, so a sweep runs the statistics pass once per calibration setting.

One pass gathers distances and the normal equations of every candidate cut for all the cut sizes
a sweep still lacks; it is then split into one ``.npz`` per (calibration setting, n), named by a
digest of the setting, written atomically. Later rows (and re-runs) load those files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.io_utils import atomic_write_bytes, atomic_write_json
from replaceme_jax.replaceme.cuts import Cut, candidate_cuts
from replaceme_jax.replaceme.statistics import Statistics, StatsRequest, gather_statistics


def digest(key: dict) -> str:
    """Short stable name of a JSON-able setting."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def restrict(stats: Statistics, cuts: Sequence[Cut]) -> Statistics:
    """The same statistics holding only the normal equations of ``cuts`` (distances kept whole)."""
    cuts = tuple((int(s), int(e)) for s, e in cuts)
    missing = [c for c in cuts if c not in stats.request.cuts]
    if missing:
        raise ReplaceMeError(f"cannot restrict statistics to cuts they lack, e.g. {missing[0]}")
    request = dataclasses.replace(stats.request, cuts=cuts)
    anchors = [stats.request.anchors.index(a) for a in request.anchors]
    rows = [stats.request.cuts.index(c) for c in cuts]
    return dataclasses.replace(stats, request=request, gram=stats.gram[anchors], cross=stats.cross[rows],
                               target_sq=stats.target_sq[rows])


def save_statistics(stats: Statistics, path) -> None:
    meta = {"num_blocks": stats.num_blocks, "num_sequences": stats.num_sequences,
            "num_tokens": stats.num_tokens, "max_distance_blocks": stats.request.max_distance_blocks,
            "cuts": [list(c) for c in stats.request.cuts], "include_pad": stats.request.include_pad,
            "accum_dtype": stats.request.accum_dtype}
    arrays = {"gram": stats.gram, "cross": stats.cross, "target_sq": stats.target_sq}
    for name in ("distance_sum", "stream_sq"):
        if getattr(stats, name) is not None:
            arrays[name] = getattr(stats, name)
    buf = io.BytesIO()
    np.savez(buf, meta=np.asarray(json.dumps(meta)), **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_statistics(path) -> Statistics:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        request = StatsRequest(max_distance_blocks=meta["max_distance_blocks"],
                               cuts=tuple(tuple(c) for c in meta["cuts"]), include_pad=meta["include_pad"],
                               accum_dtype=meta["accum_dtype"])
        return Statistics(num_blocks=meta["num_blocks"], request=request, num_sequences=meta["num_sequences"],
                          num_tokens=meta["num_tokens"],
                          distance_sum=z["distance_sum"] if "distance_sum" in z.files else None,
                          gram=z["gram"], cross=z["cross"], target_sq=z["target_sq"],
                          stream_sq=z["stream_sq"] if "stream_sq" in z.files else None)


def cached_statistics(cache_dir, key: dict, sizes: Sequence[int], model, batches, *, include_pad: bool = False,
                      accum_dtype: str = "auto", progress: bool = False) -> dict[int, Statistics]:
    """{n: statistics with distances and every candidate cut of n blocks} for each n in ``sizes``.

    ``key`` names the calibration setting (model, data, lengths, ...): equal keys share files.
    Missing sizes are gathered together in a single pass over ``batches``.
    """
    cache_dir = Path(cache_dir)
    name = digest(key)
    path = {n: cache_dir / f"stats-{name}-n{n}.npz" for n in sizes}
    missing = sorted(n for n in set(sizes) if not path[n].exists())
    if missing:
        num_blocks = model.config.num_hidden_layers
        cuts = tuple(c for n in missing for c in candidate_cuts(num_blocks, n))
        stats = gather_statistics(model, batches, StatsRequest(
            max_distance_blocks=num_blocks - 1, cuts=cuts, include_pad=include_pad, accum_dtype=accum_dtype),
            progress=progress)
        atomic_write_json(cache_dir / f"stats-{name}.json", key)
        for n in missing:
            save_statistics(restrict(stats, candidate_cuts(num_blocks, n)), path[n])
    return {n: load_statistics(path[n]) for n in sizes}
