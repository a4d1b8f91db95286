"""The issue-20 study scripts run end to end on the real default model at toy sizes (slow: each is
a subprocess that loads SmolLM2 and compiles its passes), and write their tables."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config.calibration.num_samples=8", "--config.calibration.max_length=64",
         "--config.calibration.validation_samples=2", "--ppl_windows=1"]
pytestmark = pytest.mark.slow


def _study(script, out, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), f"--output_dir={out}", *SMALL, *args],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _finite_ppl(row):
    return all(math.isfinite(row[g]) and row[g] > 1 for g in ("wikipedia", "fiction"))


def test_calibration_study_sizes_sources_lengths(tmp_path):
    _study("study_calibration.py", tmp_path, "--cut=12-14", "--sizes=4,8", "--sources=hellaswag,chat",
           "--source_passages=4", "--max_lengths=32,64")
    rows = json.loads((tmp_path / "calibration.json").read_text())["rows"]
    assert [(r["study"], r.get("source"), r.get("max_length")) for r in rows] == [
        ("size", "hellaswag", 64), ("size", "hellaswag", 64), ("source", "hellaswag", 64), ("source", "chat", 64),
        ("max_length", "boolq", 32), ("max_length", "boolq", 64)]
    sizes = [r for r in rows if r["study"] == "size"]
    assert sizes[0]["tokens"] < sizes[1]["tokens"]  # nested sets: the chunks' sums add up
    assert all(_finite_ppl(r) for r in rows)
    table = (tmp_path / "calibration.md").read_text()
    assert table.count("\n| ") == len(rows) + 2  # header, dense, one line per row


def test_budget_study_single_proxy_confirmed(tmp_path):
    _study("study_budgets.py", tmp_path, "--budgets=4", "--confirm=2", "--proxy_top=2")
    report = json.loads((tmp_path / "budgets.json").read_text())
    rows = [r for r in report["rows"] if r["n"] == 4]
    assert len(rows) == 3 and all(sum(e - s for s, e in r["cuts"]) == 4 for r in rows)
    # the confirmed variant is never worse on validation than the single cut (the single cut is a candidate)
    assert rows[2]["validation_nll"] <= rows[0]["validation_nll"] + 1e-9
    assert all(_finite_ppl(r) for r in rows)
    assert {p["proxy"] for p in report["proxies"]} == {"stream", "relative", "angular"}


@pytest.mark.parametrize("start,anchor_steps", [("replaceme", 0), ("streamline", 0), ("replaceme", 3)])
def test_heal_study_rows_at_eval_steps(tmp_path, start, anchor_steps):
    _study("study_heal.py", tmp_path, "--cut=12-14", "--eval_at=0,2", "--config.heal.steps=2", f"--start={start}",
           "--streamline_steps=3", "--config.heal.num_samples=4", "--config.heal.max_length=64",
           "--config.heal.batch_size=2", f"--config.heal.anchor_steps={anchor_steps}")
    name = ("heal" if start == "replaceme" else f"heal_{start}") + ("_tuned" if anchor_steps else "")
    report = json.loads((tmp_path / f"{name}.json").read_text())
    assert [r["step"] for r in report["rows"]] == [0, 2] and report["stopped"] is None
    assert report["rows"][1]["tokens"] > 0 and all(_finite_ppl(r) for r in report["rows"])


def test_heal_study_from_pruned_model_reuses_tuned_anchors(tmp_path):
    """--pruned starts from the main job's saved model (no re-pruning); --state_dir keeps the tuned
    anchors, so a second run restores them and starts from the same step-0 model; a wrong cut is a clear error."""
    out = tmp_path / "main"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "prune.py"), f"--config={ROOT / 'configs/smollm2_135m.py'}",
                           f"--config.output_dir={out}", "--config.cuts=12-14", "--config.eval.perplexity_windows=0",
                           "--config.export_hf=False", *SMALL[:3]], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = ("--cut=12-14", "--eval_at=0,1", "--config.heal.steps=1", "--config.heal.anchor_steps=2",
            "--config.heal.num_samples=4", "--config.heal.max_length=64", "--config.heal.batch_size=2",
            f"--pruned={out}/orbax", f"--state_dir={tmp_path / 'state'}")
    rows, stamps = [], []
    for run in ("first", "second"):
        _study("study_heal.py", tmp_path / run, *args)
        stamps.append(sorted((str(f), f.stat().st_mtime_ns) for f in (tmp_path / "state").rglob("*") if f.is_file()))
        report = json.loads((tmp_path / run / "heal_tuned.json").read_text())
        assert report["pruned"] == f"{out}/orbax" and [r["step"] for r in report["rows"]] == [0, 1]
        rows.append(report["rows"][0])
    assert (tmp_path / "state" / "anchors.json").exists()
    assert stamps[0] and stamps[1] == stamps[0]  # the second run read the saved anchors and wrote nothing
    assert rows[1]["wikipedia"] == pytest.approx(rows[0]["wikipedia"], rel=1e-6)  # restored, not retrained
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "study_heal.py"), *SMALL, "--cut=12-15",
                           "--config.heal.steps=1", f"--pruned={out}/orbax", f"--output_dir={tmp_path / 'bad'}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "has 28 blocks" in proc.stderr


def test_anchor_study_rows_and_bad_runs(tmp_path):
    _study("study_anchor.py", tmp_path, "--cut=12-14", "--steps=3", "--runs=replaceme:token:1e-3,drop:mse:1e-3")
    report = json.loads((tmp_path / "anchor.json").read_text())
    assert [(r["start"], r["loss"], r["lr"]) for r in report["rows"]] == [
        ("replaceme", None, None), ("replaceme", "token", 1e-3), ("drop", "mse", 1e-3)]
    assert all(_finite_ppl(r) and math.isfinite(r["validation_nll"]) for r in report["rows"])
    assert (tmp_path / "anchor.md").read_text().count("**") == 2  # the validation best is marked
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "study_anchor.py"), "--runs=replaceme:l1:1e-3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "start:loss:lr" not in proc.stderr and "loss mse or token" in proc.stderr


def test_score_heldout_side_by_side(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "score_heldout.py"), "--models=smollm2-135m,smollm2-135m",
                           "--names=a,b", "--ppl_windows=2", "--ppl_window=64", "--compare_to=a", f"--output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "heldout.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["a", "b"] and all(r["blocks"] == 30 for r in rows)
    for g in ("wikipedia", "fiction"):  # the same model on the same windows: the same number
        assert rows[0][g]["num_tokens"] == 126 and rows[0][g]["ppl"] == rows[1][g]["ppl"] > 1
        assert rows[0][g]["window_tokens"] == [63, 63] and rows[0][g]["window_nll"] == rows[1][g]["window_nll"]
    paired = json.loads((tmp_path / "heldout.json").read_text())["paired"]
    assert list(paired) == ["b"] and all(paired["b"][g]["ci"] == [1.0, 1.0] for g in ("wikipedia", "fiction"))
    md = (tmp_path / "heldout.md").read_text()
    assert md.count("(1.000x)") == 4 and "| b | 1.0000 [1.0000, 1.0000] | 1.0000 [1.0000, 1.0000] |" in md
