"""Atomic outputs: one host, and the multi-host protocol with the process index simulated."""
from __future__ import annotations

import pytest

from replaceme_jax import io_utils
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.io_utils import atomic_output_dir, atomic_write_json


def test_output_dir_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        atomic_write_json(tmp / "report.json", {"ok": 1})
    assert (out / "report.json").read_text().strip().endswith("}")
    with pytest.raises(ReplaceMeError, match="refusing to overwrite.*--overwrite"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temp or old directories left


@pytest.fixture
def two_processes(monkeypatch):
    """Pretend to be one of two processes; records the barriers passed."""
    state = {"index": 0, "barriers": []}
    monkeypatch.setattr(io_utils, "process_count", lambda: 2)
    monkeypatch.setattr(io_utils, "is_primary", lambda: state["index"] == 0)
    monkeypatch.setattr(io_utils, "barrier", lambda name: state["barriers"].append(name))
    return state


def test_multihost_shared_temp_dir_and_primary_writes(tmp_path, two_processes):
    out = tmp_path / "pruned"
    stale = tmp_path / ".pruned.tmp-multihost"
    stale.mkdir()
    (stale / "leftover").write_text("from an interrupted run")
    with atomic_output_dir(out) as tmp:
        assert tmp == stale and not (tmp / "leftover").exists()  # cleared, same name on every host
        atomic_write_json(tmp / "report.json", {"a": 1})
    assert (out / "report.json").exists() and not stale.exists()
    assert two_processes["barriers"] == ["replaceme-open-pruned", "replaceme-written-pruned",
                                         "replaceme-renamed-pruned"]

    # Process 1: joins the same temp dir, writes no plain files, does not rename.
    two_processes["index"], two_processes["barriers"] = 1, []
    other = tmp_path / "other"
    (tmp_path / ".other.tmp-multihost").mkdir()  # what process 0 created before the first barrier
    with atomic_output_dir(other) as tmp:
        atomic_write_json(tmp / "report.json", {"a": 1})
        assert list(tmp.iterdir()) == []
    assert not other.exists() and len(two_processes["barriers"]) == 3
