"""Atomic outputs: write to a temp path beside the target, then rename. Nothing half-written.

Temp names carry the owner's pid and host (``.<name>.tmp-<pid>-<host>-XXXX``), so a run killed
outright (SIGKILL, power loss) leaves debris the next run on the same path recognises and sweeps.
Outputs get the usual permissions of the process umask (``mkdtemp``/``mkstemp`` alone give 0700 /
0600). A filesystem error while writing (permissions, read-only mount, a full disk) becomes one
``OutputWriteError`` line naming the path and the fix, with nothing partial left.

On a multi-host run (``jax.process_count() > 1``) the output is expected on storage every host sees:
the output directory is built in one temp path shared by all processes (Orbax writes its shards
there from every host), process 0 writes the plain files (``atomic_write_*``, safetensors) and does
the final rename, and the processes meet at barriers around it.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from replaceme_jax import interrupts
from replaceme_jax.errors import ReplaceMeError


class OutputWriteError(ReplaceMeError, OSError):
    """A filesystem error while writing an output (still an OSError for callers that tolerate those)."""


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


# ----------------------------------------------------------------------------- permissions

@functools.lru_cache(maxsize=1)
def umask() -> int:
    """The process umask, read once. /proc avoids the set-and-restore dance, which races with threads
    creating files; elsewhere the dance runs once (first call, normally before any writer starts)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_dir(path) -> None:
    os.chmod(path, 0o777 & ~umask())


def _chmod_file(path) -> None:
    os.chmod(path, 0o666 & ~umask())


# ----------------------------------------------------------------------------- temp names, stale sweep

@functools.lru_cache(maxsize=1)
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname() or "host")[:64]


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}-{_host()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True
    return True


def sweep_stale_temps(parent: Path, name: str) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-<host>-*`` left in ``parent`` by dead processes of this host."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.tmp-(\d+)-([A-Za-z0-9._]+)-[A-Za-z0-9_]+$")
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or m.group(2) != _host() or _pid_alive(int(m.group(1))):
            continue
        p = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------- error mapping

_FIXES = {
    errno.EACCES: "choose a directory you can write to or fix its permissions",
    errno.EPERM: "choose a directory you can write to or fix its permissions",
    errno.EROFS: "the filesystem is mounted read-only: choose an output path on a writable disk",
    errno.ENOSPC: "free disk space or choose an output path on a disk with more room",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another output path",
}


def _fix_for(code) -> str:
    return _FIXES.get(code, "check the output path and its disk")


def _os_error_in(exc: BaseException):
    """The OSError (or safetensors' own I/O error) behind ``exc``, following causes; None if none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ReplaceMeError):
            return None
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _errno_of(exc) -> int | None:
    code = getattr(exc, "errno", None)
    if code is None:  # safetensors' messages carry the OS text, not the number
        text = str(exc).lower()
        for c, words in ((errno.ENOSPC, "no space"), (errno.EROFS, "read-only"),
                         (errno.EACCES, "permission denied"), (errno.EDQUOT, "quota")):
            if words in text:
                return c
    return code


def output_error(exc: BaseException, path, what: str = "output") -> OutputWriteError:
    """One line: what failed, where, and the fix."""
    code = _errno_of(exc)
    reason = (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).splitlines()[0]
    where = getattr(exc, "filename", None)
    detail = f" ({where})" if where and str(where) != str(path) else ""
    return OutputWriteError(code, f"cannot write {what} {path}: {reason}{detail}. Fix: {_fix_for(code)}")


# ----------------------------------------------------------------------------- preflight

def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def preflight_output_dir(path, *, overwrite: bool, needed_bytes: int | None = None, what: str = "output",
                         overwrite_hint: str = "overwrite=True (--overwrite)") -> Path:
    """Everything that can be known about writing ``path`` before a long run: refuse now, not at save.

    Checks an existing non-empty directory (unless ``overwrite``), a file in the way, that the
    nearest existing ancestor takes a new file (by writing and removing one: permission bits, ACLs
    and read-only mounts all show), and, with ``needed_bytes``, the free space (after sweeping temp
    outputs of dead runs for ``path``). Returns the absolute path.
    """
    path = Path(path).expanduser().absolute()
    _check_target(path, overwrite=overwrite, what=what, overwrite_hint=overwrite_hint)
    base = _nearest_existing(path.parent)
    if base == path.parent:  # debris of killed runs would count against the free space
        sweep_stale_temps(base, path.name)
    if not base.is_dir():
        raise ReplaceMeError(f"{what} path {path} cannot be created: {base} is a file, not a directory. "
                             "Fix: choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(path.name), dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ReplaceMeError(f"{what} path {path} is not writable: cannot create a file in {base} "
                             f"({e.strerror or e}). Fix: {_fix_for(e.errno)}") from e
    if needed_bytes:
        try:
            free = shutil.disk_usage(base).free
        except OSError:
            free = None
        if free is not None and free < needed_bytes:
            raise ReplaceMeError(
                f"{what} path {path} needs about {needed_bytes} bytes ({needed_bytes / 2**30:.2f} GiB) but "
                f"{base} has {free} bytes ({free / 2**30:.2f} GiB) free. Fix: free disk space or choose an "
                "output path on a disk with more room")
    return path


def _check_target(path: Path, *, overwrite: bool, what: str, overwrite_hint: str) -> None:
    if path.exists() and not path.is_dir():
        raise ReplaceMeError(f"{what} path {path} exists and is a file; choose a directory path")
    if _is_nonempty_dir(path) and not overwrite:
        raise ReplaceMeError(
            f"{what} directory {path} already holds files; refusing to overwrite it. "
            f"Pass {overwrite_hint} or choose another path.")


# ----------------------------------------------------------------------------- atomic directory

def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output",
                      overwrite_hint: str = "overwrite=True (--overwrite)"):
    """Yield a fresh temp directory; on success it replaces ``path`` in one rename.

    Refuses an existing non-empty ``path`` unless ``overwrite``. On any exception (a signal
    included) the temp directory is removed and ``path`` is left exactly as it was; an OSError
    inside the body becomes an ``OutputWriteError``. Temp directories of dead processes for the
    same ``path`` are swept first. Multi-host: every process gets the same temp directory (a fixed
    name; one left by an interrupted run is cleared first).
    """
    path = Path(path).expanduser().absolute()
    _check_target(path, overwrite=overwrite, what=what, overwrite_hint=overwrite_hint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReplaceMeError(f"cannot create parent directory of {path}: {e}. Fix: {_fix_for(e.errno)}") from e
    if process_count() > 1:
        yield from _shared_output_dir(path, what)
        return
    sweep_stale_temps(path.parent, path.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), dir=path.parent))
    except OSError as e:
        raise output_error(e, path, what) from e
    interrupts.register_temp(tmp)
    try:
        _chmod_dir(tmp)
        yield tmp
        _replace_dir(tmp, path)
        interrupts.unregister_temp(tmp, committed=path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        interrupts.unregister_temp(tmp)
        _raise_output_error_for(e, path, what)
        raise


def _shared_output_dir(path: Path, what: str):
    tmp = path.with_name(f".{path.name}.tmp-multihost")
    if is_primary():
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            _chmod_dir(tmp)
        except OSError as e:
            raise output_error(e, path, what) from e
        interrupts.register_temp(tmp)
    barrier(f"replaceme-open-{path.name}")
    try:
        yield tmp
        barrier(f"replaceme-written-{path.name}")
        if is_primary():
            _replace_dir(tmp, path)
            interrupts.unregister_temp(tmp, committed=path)
        barrier(f"replaceme-renamed-{path.name}")
    except BaseException as e:
        if is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
            interrupts.unregister_temp(tmp)
        _raise_output_error_for(e, path, what)
        raise


def _raise_output_error_for(e: BaseException, path: Path, what: str) -> None:
    """Re-raise an OSError inside a write (however wrapped) as the ``OutputWriteError`` naming
    ``path``; return for anything else (signals included), which the caller re-raises as is."""
    cause = _os_error_in(e) if isinstance(e, Exception) else None
    if cause is not None:
        raise output_error(cause, path, what) from e


# ----------------------------------------------------------------------------- atomic files

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file and a rename (process 0 only on a multi-host run)."""
    if not is_primary():
        return
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(path.parent, path.name)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), dir=path.parent)
        _test_pause(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _chmod_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, ReplaceMeError):
            raise output_error(e, path, "file") from e
        raise


_paused: list[Path] = []


def _test_pause(path: Path) -> None:
    """Test hook for tests/test_interrupts.py, inert unless ``REPLACEME_TEST_PAUSE_AT=save``: the first
    file written inside an output still being built (a checkpoint's config.json, after its tensors)
    waits ``REPLACEME_TEST_PAUSE_S`` seconds (default 60), announced on stderr, so a signal can be
    sent in the middle of a save."""
    if os.environ.get("REPLACEME_TEST_PAUSE_AT") != "save" or _paused or not interrupts.inside_temp(path):
        return
    _paused.append(path)
    import sys
    import time
    print(f"[test] paused in save before writing {path}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("REPLACEME_TEST_PAUSE_S", "60")))


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
