"""The sweep runner: rows, caching, resuming, tables and plots.

The end-to-end sweep runs a small random Llama with SmolLM2's tokenizer (real calibration and
held-out text, seconds of compute); resuming is checked by making every method fail on re-run.
"""
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from replaceme_jax.experiments import sweep as runner
from replaceme_jax.experiments import tables
from replaceme_jax.baselines import methods as mth
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.config import ModelConfig
from replaceme_jax.models.modeling import CausalLM

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(out, **sweep):
    cfg = runner.sweep_config()
    cfg.pipeline.calibration.num_samples = 8
    cfg.pipeline.calibration.max_length = 32
    cfg.sweep.methods = "replaceme,drop,shortgpt,sleb"
    cfg.sweep.solvers = "lstsq,orth_diag"
    cfg.sweep.selections, cfg.sweep.drop_selections = "angular", ""  # drop follows ReplaceMe's rules
    cfg.sweep.num_blocks = "1,2"
    cfg.sweep.calibration_sizes = "8"
    cfg.sleb.num_sequences = 4
    cfg.eval.ppl_windows, cfg.eval.window, cfg.eval.tasks = 1, 64, ""
    cfg.output_dir = str(out)
    cfg.progress = False
    for k, v in sweep.items():
        cfg.sweep[k] = v
    return cfg


def test_sweep_rows_apply_each_setting_to_its_methods(tmp_path):
    cfg = small_cfg(tmp_path, selections="angular,residual", alphas="0,1", num_transforms="1,2")
    rows = runner.sweep_rows(cfg)
    by = lambda m: [r for r in rows if r.method == m]  # noqa: E731
    # replaceme: 2 solvers x 2 rules x 2 alphas x 2 sizes x 2 transform counts; drop: no solver/alpha.
    assert len(by("replaceme")) == 2 * 2 * 2 * 2 * 2 and len(by("drop")) == 2 * 2 * 2
    # shortgpt / sleb: one row per total removed (n x transforms = 1, 2, 4).
    assert sorted(r.removed for r in by("shortgpt")) == [1, 2, 4] == sorted(r.removed for r in by("sleb"))
    assert len({r.id for r in rows}) == len(rows)
    for bad, match in [({"methods": "replaceme,magic"}, "unknown methods"), ({"solvers": "svd"}, "unknown solvers"),
                       ({"selections": "random"}, "unknown selection"), ({"num_blocks": "4,x"}, "cannot read"),
                       ({"alphas": ""}, "empty sweep list")]:
        with pytest.raises(ReplaceMeError, match=match):
            runner.sweep_rows(small_cfg(tmp_path, **bad))


@pytest.fixture(scope="module")
def tiny_with_tokenizer(smollm2_gguf_path):
    import gguf

    from replaceme_jax.checkpoints.gguf import tokenizer_from_gguf
    tokenizer = tokenizer_from_gguf(gguf.GGUFReader(smollm2_gguf_path))
    cfg = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                      num_attention_heads=2, num_key_value_heads=1)
    return CausalLM(cfg, rngs=nnx.Rngs(0)), tokenizer


def test_sweep_runs_caches_and_resumes(tiny_with_tokenizer, tmp_path, monkeypatch):
    model, tokenizer = tiny_with_tokenizer
    cfg = small_cfg(tmp_path / "sweep")
    rows = runner.run_sweep(cfg, model, tokenizer, log=lambda _: None)
    out = Path(cfg.output_dir)
    expected = {r.id for r in runner.sweep_rows(cfg)} | {"dense"}
    assert {p.stem for p in (out / "rows").glob("*.json")} == expected and len(rows) == len(expected)
    for r in rows:
        assert r["num_blocks"] == 5 - r["removed"] and len(r.get("removed_blocks", [])) == r["removed"]
        assert np.isfinite(r["heldout_ppl"]["ppl"])
    # One statistics file per n, the Block Influence and the SLEB order: gathered once each.
    assert len(list((out / "cache").glob("stats-*-n*.npz"))) == 2
    assert len(list((out / "cache").glob("influence-*.json"))) == 1
    sleb = json.loads(next((out / "cache").glob("sleb-*.json")).read_text())["value"]
    assert len(sleb["order"]) == 2
    by_id = {r["id"]: r for r in rows}
    assert by_id["sleb_r1_cal8"]["removed_blocks"] == [sleb["order"][0]]
    # Tables: one CSV line per row; % of dense and x dense from the dense row.
    table = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(table) == len(expected)
    dense_ppl = by_id["dense"]["heldout_ppl"]["ppl"]
    for line in table:
        assert float(line["ppl_x_dense"]) == pytest.approx(float(line["heldout_ppl"]) / dense_ppl)
    assert "ReplaceMe orth_diag" in (out / "results.md").read_text()
    assert (out / "plots.png").read_bytes()[:4] == b"\x89PNG"

    # Re-run: nothing is recomputed (every method would fail), the same rows come back.
    def boom(*a, **k):
        raise AssertionError("a finished row was recomputed")
    for name in ("replaceme", "drop", "shortgpt", "sleb"):
        monkeypatch.setattr(mth, name, boom)
    again = runner.run_sweep(cfg, model, tokenizer, log=lambda _: None)
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    monkeypatch.undo()

    # A grown sweep runs only the new rows, reusing the cached statistics; the search rule's
    # rows add the selection study table.
    grown = small_cfg(tmp_path / "sweep", solvers="lstsq,orth_diag,diag", selections="angular,search")
    stat_files = {p: p.stat().st_mtime_ns for p in (out / "cache").glob("stats-*.npz")}
    rows = runner.run_sweep(grown, model, tokenizer, log=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").glob("stats-*.npz")} == stat_files
    assert (out / "rows" / "replaceme_diag_angular_n2_T1_a0_r2_cal8.json").exists()
    search = {r["id"]: r for r in rows if r.get("selection") == "search"}
    assert len(search) == 2 * 3 + 2  # replaceme x 3 solvers and drop, for n = 1, 2
    best = search["replaceme_lstsq_search_n2_T1_a0_r2_cal8"]
    scores = best["selection_scores"]
    assert best["cuts"] == [[int(x) for x in min(scores, key=scores.get).split("-")]]
    # One search per (n, solver it searches with): lstsq, orth_diag, diag, none (drop).
    assert len(list((out / "cache").glob("search-*.json"))) == 2 * 4
    assert "| angular |" in (out / "selection.md").read_text()

    # Other fixed settings: refused, unless overwrite drops the old rows.
    changed = small_cfg(tmp_path / "sweep")
    changed.eval.window = 32
    with pytest.raises(ReplaceMeError, match="other fixed settings"):
        runner.run_sweep(changed, model, tokenizer)
    changed.overwrite = True
    changed.sweep.methods = "shortgpt"
    changed.sweep.num_blocks = "1"
    rows = runner.run_sweep(changed, model, tokenizer, log=lambda _: None)
    assert [r["method"] for r in rows] == ["dense", "shortgpt"]


def test_selection_table_measures_distance_from_search():
    def row(sel, cut, ppl, acc):
        return {"method": "replaceme", "solver": "lstsq", "selection": sel, "blocks_per_cut": 4, "num_transforms": 1,
                "alpha": 0.0, "calibration_size": 64, "removed": 4, "num_blocks": 26, "cuts": [cut],
                "removed_blocks": list(range(*cut)), "heldout_ppl": {"ppl": ppl}, "avg_acc": acc}
    rows = [{"method": "dense", "removed": 0, "num_blocks": 30, "heldout_ppl": {"ppl": 10.0}, "avg_acc": 0.5},
            row("angular", (20, 24), 30.0, 0.40), row("residual", (18, 22), 25.0, 0.44),
            row("search", (17, 21), 24.0, 0.45)]
    text = tables.selection_markdown(rows)
    lines = [line for line in text.splitlines() if line.startswith("| ReplaceMe")]
    assert len(lines) == 2
    assert "| angular | 20-23 | 17-20 | 30.00 | 24.00 | +6.00 | 0.400 | 0.450 | -0.050 |" in lines[0]
    assert "+1.00" in lines[1] and "-0.010" in lines[1]
    md = tables.results_markdown(rows)
    assert "| 4 | ReplaceMe lstsq (angular) | 20 21 22 23 | 30.00 | 3.00 | 0.400 | 80.0 |" in md
    assert tables.plot_png(rows)[:4] == b"\x89PNG"


def test_script_reports_bad_settings_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/ablate.py"), f"--config={ROOT / 'configs/ablation_smollm2.py'}:small",
         "--config.sweep.methods=replaceme,magic", f"--config.output_dir={tmp_path / 'x'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown methods ['magic']")


def test_sweep_saves_each_pruned_model(tiny_with_tokenizer, tmp_path):
    """save_models=True: each row's pruned model is a Hugging Face checkpoint that loads back with
    the row's depth and the same weights (for lm-eval or scripts/evaluate.py)."""
    from replaceme_jax.checkpoints import load_pretrained
    model, tokenizer = tiny_with_tokenizer
    cfg = small_cfg(tmp_path / "sweep", methods="drop,sleb", num_blocks="2")
    cfg.save_models = True
    rows = runner.run_sweep(cfg, model, tokenizer, log=lambda _: None)
    pruned = [r for r in rows if r["method"] != "dense"]
    assert len(pruned) == 2
    for r in pruned:
        loaded, _ = load_pretrained(str(tmp_path / "sweep" / "models" / r["id"] / "hf"))
        assert loaded.config.num_hidden_layers == 5 - 2
        kept = [k for k in range(5) if k not in r["removed_blocks"]]
        want = np.asarray(model.model.layers[kept[-1]].mlp.down_proj.kernel[...])
        assert np.array_equal(np.asarray(loaded.model.layers[2].mlp.down_proj.kernel[...]), want)
