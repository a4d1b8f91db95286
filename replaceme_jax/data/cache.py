"""A small JSON cache for derived data (extracted corpora) that is slow to rebuild.

Entries live under ``$REPLACEME_JAX_CACHE`` (default ``~/.cache/replaceme_jax``), are written
atomically, and carry a stamp (extraction version + source file identity): a stale, foreign
or corrupt entry is rebuilt rather than trusted.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable

from replaceme_jax.io_utils import atomic_write_json


def cache_dir() -> Path:
    return Path(os.environ.get("REPLACEME_JAX_CACHE") or Path.home() / ".cache" / "replaceme_jax")


def source_stamp(version: str, source: Path) -> dict:
    """What a cache entry derived from ``source`` depends on."""
    return {"version": version, "source": source.name, "source_bytes": source.stat().st_size}


def cached_json(name: str, stamp: dict, build: Callable[[], object], *, use_cache: bool = True):
    """``build()``, or its cached JSON value when the cache entry ``name`` has the same stamp."""
    if not use_cache:
        return build()
    path = cache_dir() / f"{name}.json"
    if path.is_file():
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
            if blob.get("stamp") == stamp:
                return blob["value"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # unreadable or foreign entry: rebuild and overwrite it
    value = build()
    try:
        atomic_write_json(path, {"stamp": stamp, "value": value})
    except OSError as e:
        warnings.warn(f"could not write cache entry {path} ({e}); set REPLACEME_JAX_CACHE to a "
                      "writable directory to avoid rebuilding it every time")
    return value
