"""Atomic outputs: write to a temp path beside the target, then rename. Nothing half-written.

On a multi-host run (``jax.process_count() > 1``) the output is expected on storage every host sees:
the output directory is built in one temp path shared by all processes (Orbax writes its shards
there from every host), process 0 writes the plain files (``atomic_write_*``, safetensors) and does
the final rename, and the processes meet at barriers around it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from replaceme_jax.errors import ReplaceMeError


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def process_count() -> int:
    import jax
    return jax.process_count()


def is_primary() -> bool:
    """True on the process that writes files (process 0; always true on one host)."""
    import jax
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes wait here (a no-op on one host)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output"):
    """Yield a fresh temp directory; on success it replaces ``path`` in one rename.

    Refuses an existing non-empty ``path`` unless ``overwrite``. On any exception the temp
    directory is removed and ``path`` is left exactly as it was. Multi-host: every process gets the
    same temp directory (a fixed name; one left by an interrupted run is cleared first).
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ReplaceMeError(f"{what} path {path} exists and is a file; choose a directory path")
    if _is_nonempty_dir(path) and not overwrite:
        raise ReplaceMeError(
            f"{what} directory {path} already holds files; refusing to overwrite it. "
            "Pass overwrite=True (--overwrite) or choose another path.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReplaceMeError(f"cannot create parent directory of {path}: {e}") from e
    if process_count() > 1:
        yield from _shared_output_dir(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shared_output_dir(path: Path):
    tmp = path.with_name(f".{path.name}.tmp-multihost")
    if is_primary():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(f"replaceme-open-{path.name}")
    try:
        yield tmp
        barrier(f"replaceme-written-{path.name}")
        if is_primary():
            _replace_dir(tmp, path)
        barrier(f"replaceme-renamed-{path.name}")
    except BaseException:
        if is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file and a rename (process 0 only on a multi-host run)."""
    if not is_primary():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
