"""JAX's persistent compilation cache for the scripts.

An XLA executable compiled once (the statistics pass, each of the scorer's row shapes, the decode
step) is written under ``$REPLACEME_JAX_CACHE/xla`` (default ``~/.cache/replaceme_jax/xla``) and read
back by the next run of any script instead of being compiled again: a resumed evaluation, a second
model of the same architecture in another process, the main job run twice. JAX keys each entry by
the program, the compiler flags and the jax/jaxlib versions, so a stale entry is never used.
``REPLACEME_JAX_XLA_CACHE=0`` turns it off. An entry left half-written by a killed run is not
trusted: JAX warns, compiles afresh and runs on; deleting the directory clears such entries.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from replaceme_jax.data.cache import cache_dir

MIN_COMPILE_SECONDS = 1.0  # programs that compile faster are not worth a file


def enable() -> Path | None:
    """Point JAX's persistent compilation cache at our cache directory; the path, or None when
    turned off or the directory cannot be created (then every run compiles, as without it)."""
    if os.environ.get("REPLACEME_JAX_XLA_CACHE", "1").strip().lower() in ("0", "false", "no", "off", ""):
        return None
    import jax

    path = cache_dir() / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(f"compilation cache off: cannot create {path} ({e}); set REPLACEME_JAX_CACHE to a "
                      "writable directory", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
