"""io_utils under faults: preflight refusals, permissions from the umask, stale temp sweeping and
filesystem errors turned into one-line errors with nothing partial left."""
from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest

from replaceme_jax import io_utils
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.io_utils import (OutputWriteError, atomic_output_dir, atomic_write_bytes,
                                    preflight_output_dir)


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ----------------------------------------------------------------------------- preflight

def test_preflight_refuses_existing_output_naming_the_setting(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")
    with pytest.raises(ReplaceMeError, match=r"already holds files.*--config\.overwrite=True"):
        preflight_output_dir(out, overwrite=False, overwrite_hint="--config.overwrite=True")
    with pytest.raises(ReplaceMeError, match=r"--overwrite"):  # the default hint, for plain flags
        preflight_output_dir(out, overwrite=False)
    assert preflight_output_dir(out, overwrite=True) == out
    (tmp_path / "empty").mkdir()
    assert preflight_output_dir(tmp_path / "empty", overwrite=False) == tmp_path / "empty"
    assert _listing(tmp_path) == ["empty", "run", "run/report.json"]  # the probe file is gone


def test_preflight_file_in_the_way_and_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ReplaceMeError, match=r"afile exists and is a file"):
        preflight_output_dir(tmp_path / "afile", overwrite=True)
    with pytest.raises(ReplaceMeError, match=r"afile is a file, not a directory"):
        preflight_output_dir(tmp_path / "afile" / "deeper" / "out", overwrite=False)
    monkeypatch.chdir(tmp_path)
    got = preflight_output_dir("new/out", overwrite=False)
    assert got.is_absolute() and got == tmp_path / "new" / "out"
    assert not (tmp_path / "new").exists()  # preflight creates nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_preflight_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ReplaceMeError, match=r"not writable.*ro.*Fix:"):
            preflight_output_dir(ro / "sub" / "out", overwrite=False)
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("code,fix", [(errno.EACCES, "permissions"), (errno.EROFS, "read-only")])
def test_preflight_unwritable_parent_is_found_by_writing(tmp_path, monkeypatch, code, fix):
    def refuse(*a, **k):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(io_utils.tempfile, "mkstemp", refuse)
    with pytest.raises(ReplaceMeError, match=rf"not writable: cannot create a file in {tmp_path}.*{fix}") as e:
        preflight_output_dir(tmp_path / "out", overwrite=False)
    assert "\n" not in str(e.value)


def test_preflight_free_space(tmp_path, monkeypatch):
    monkeypatch.setattr(io_utils.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(ReplaceMeError, match=r"needs about 5000 bytes.*has 1000 bytes.*free.*Fix:"):
        preflight_output_dir(tmp_path / "out", overwrite=False, needed_bytes=5000, what="run output")
    assert preflight_output_dir(tmp_path / "out", overwrite=False, needed_bytes=999) == tmp_path / "out"
    assert preflight_output_dir(tmp_path / "out", overwrite=False, needed_bytes=None) == tmp_path / "out"


# ----------------------------------------------------------------------------- permissions

@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    io_utils.umask.cache_clear()
    yield
    os.umask(old)
    io_utils.umask.cache_clear()


def test_outputs_follow_the_umask(tmp_path, umask_027):
    assert io_utils.umask() == 0o027
    with atomic_output_dir(tmp_path / "run") as tmp:
        atomic_write_bytes(tmp / "a.bin", b"x")
        with atomic_output_dir(tmp / "nested") as inner:  # e.g. a checkpoint inside the run output
            (inner / "b.txt").write_text("y")
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "run" / "nested").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "run" / "a.bin").stat().st_mode) == 0o640
    atomic_write_bytes(tmp_path / "top.bin", b"z")
    assert stat.S_IMODE((tmp_path / "top.bin").stat().st_mode) == 0o640


# ----------------------------------------------------------------------------- stale temps

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_dead_processes_are_swept(tmp_path):
    host = io_utils._host()
    dead = tmp_path / f".run.tmp-{_dead_pid()}-{host}-abc123_x"
    dead.mkdir()
    (dead / "half.bin").write_bytes(b"x")
    dead_file = tmp_path / f".run.tmp-{_dead_pid()}-{host}-zz9"
    dead_file.write_bytes(b"x")
    alive = tmp_path / f".run.tmp-{os.getppid()}-{host}-keep1"     # its owner still runs
    alive.mkdir()
    other_host = tmp_path / f".run.tmp-{_dead_pid()}-elsewhere.example-keep2"
    other_host.mkdir()
    other_name = tmp_path / f".runs.tmp-{_dead_pid()}-{host}-keep3"  # another output's temp
    other_name.mkdir()
    with atomic_output_dir(tmp_path / "run") as tmp:
        assert tmp.name.startswith(f".run.tmp-{os.getpid()}-{host}-")
        (tmp / "ok").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["run", alive.name, other_host.name, other_name.name])


# ----------------------------------------------------------------------------- filesystem errors

@pytest.mark.parametrize("code,fix", [(errno.ENOSPC, "free disk space"), (errno.EROFS, "read-only"),
                                      (errno.EACCES, "permissions")])
def test_os_errors_in_the_body_become_one_line(tmp_path, code, fix):
    with pytest.raises(OutputWriteError, match=rf"cannot write run output {tmp_path / 'run'}.*Fix: .*{fix}") as e:
        with atomic_output_dir(tmp_path / "run", what="run output") as tmp:
            (tmp / "part.bin").write_bytes(b"x")
            raise OSError(code, os.strerror(code), str(tmp / "part.bin"))
    assert "\n" not in str(e.value) and isinstance(e.value, OSError) and e.value.errno == code
    assert list(tmp_path.iterdir()) == []


def test_a_real_full_disk_is_reported(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(OutputWriteError, match=r"No space left.*Fix: free disk space"):
        with atomic_output_dir(tmp_path / "run") as tmp:
            (tmp / "a").write_text("x")
            with open("/dev/full", "wb") as f:
                f.write(b"x" * 100_000)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_errors_are_mapped(tmp_path):
    from safetensors.numpy import save_file
    with pytest.raises(OutputWriteError, match=r"cannot write Hugging Face checkpoint .*hf"):
        with atomic_output_dir(tmp_path / "hf", what="Hugging Face checkpoint") as tmp:
            save_file({"w": np.zeros(3, np.float32)}, str(tmp / "missing" / "model.safetensors"))
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_errors_and_callers_that_tolerate_os_errors(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(io_utils.os, "replace", full)
    with pytest.raises(OSError) as e:  # still an OSError: caches that warn and go on keep working
        atomic_write_bytes(tmp_path / "c.json", b"{}")
    assert isinstance(e.value, ReplaceMeError) and "c.json" in str(e.value) and "free disk space" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(KeyError):
        with atomic_output_dir(tmp_path / "run"):
            raise KeyError("x")
    with pytest.raises(ReplaceMeError, match="mine"):
        with atomic_output_dir(tmp_path / "run"):
            raise ReplaceMeError("mine")
    assert list(tmp_path.iterdir()) == []


def test_host_name_is_safe_in_temp_names():
    assert "-" not in io_utils._host() and io_utils._host()
    assert socket.gethostname()
