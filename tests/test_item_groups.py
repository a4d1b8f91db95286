"""Item groups of a task (eval.item_groups, scripts/task_groups.py): the documents the groups are
built from are the ones the task's YAML scores, and the per-group numbers follow from the items."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from replaceme_jax.errors import ReplaceMeError  # noqa: E402
from replaceme_jax.eval import item_groups  # noqa: E402
from replaceme_jax.eval.tasks import TASKS, TASKS_DIR  # noqa: E402
from replaceme_jax.eval.tasks.data import load_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("task", sorted(item_groups.GROUPERS))
def test_groups_read_the_split_the_task_scores(task):
    cfg = load_yaml(TASKS_DIR / f"{TASKS[task].harness_name}.yaml", resolve_func=False)
    scored = cfg.get("test_split") or cfg.get("validation_split")
    assert item_groups.GROUPERS[task][0] == cfg["dataset_kwargs"]["splits"][scored]


def _results(path, task, models):
    metric = TASKS[task].metric
    payload = {"models": {name: {"items": {task: {"ids": [f"rmj_{task}:{i}" for i in ids], metric: vals}}}
                          for name, (ids, vals) in models.items()}}
    path.write_text(json.dumps(payload))
    return path


def test_sciq_groups_locate_a_difference(tmp_path):
    docs = load_split(item_groups.GROUPERS["sciq"][0], "sciq")
    ids = list(range(300))
    inside = np.array([d["support"].strip() != "" and d["correct_answer"].lower() in d["support"].lower()
                       for d in (docs[i] for i in ids)])
    assert 0 < inside.sum() < len(ids)
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 2, len(ids)).astype(float)
    other = np.where(inside, 1.0 - ref, ref)  # differs from the reference on in-support items only
    a = _results(tmp_path / "a.json", "sciq", {"ref": (ids, ref.tolist())})
    b = _results(tmp_path / "b.json", "sciq", {"ref": (ids, ref.tolist()), "other": (ids, other.tolist())})
    rows = item_groups.group_table(item_groups.load_items([a, b], "sciq"), "sciq", "ref", iters=300)
    by = {(r["group"], r["model"]): r for r in rows}
    assert by[("all", "other")]["items"] == len(ids)
    assert sum(by[(g, m)]["items"] for g, m in by if g != "all" and m == "ref") == len(ids)
    hit = by[("answer in the support", "other")]
    assert hit["items"] == inside.sum()
    assert hit["mean"] == pytest.approx(1.0 - ref[inside].mean())
    assert hit["minus_reference"] == pytest.approx(1.0 - 2 * ref[inside].mean())
    assert hit["interval"][0] <= hit["minus_reference"] <= hit["interval"][1]
    for group in ("answer not in the support", "no support paragraph"):
        if (group, "other") in by:
            assert by[(group, "other")]["minus_reference"] == 0.0
            assert by[(group, "other")]["interval"] == [0.0, 0.0]
    assert by[("all", "ref")]["interval"] == [0.0, 0.0]


def test_lambada_groups_see_the_target_word_in_the_context():
    group = item_groups.GROUPERS["lambada_openai"][1]
    assert group({"text": "Anna met Tom. Later she waved at Tom."}) == "target word earlier in the passage"
    assert group({"text": "Anna met Tom. Later she waved at Tomas."}) == "target word new"


def test_bad_inputs_name_the_fix(tmp_path):
    a = _results(tmp_path / "a.json", "sciq", {"m": ([0, 1, 2], [1.0, 0.0, 1.0])})
    b = _results(tmp_path / "b.json", "sciq", {"m": ([0, 1, 2], [1.0, 1.0, 1.0])})
    with pytest.raises(ReplaceMeError, match="distinct names"):
        item_groups.load_items([a, b], "sciq")
    with pytest.raises(ReplaceMeError, match="does not exist"):
        item_groups.load_items([tmp_path / "none.json"], "sciq")
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(ReplaceMeError, match="is not a results.json of scripts/evaluate.py"):
        item_groups.load_items([tmp_path / "other.json"], "sciq")
    with pytest.raises(ReplaceMeError, match="no per-item piqa results"):
        item_groups.load_items([a], "piqa")
    with pytest.raises(ReplaceMeError, match="reference model 'dense'"):
        item_groups.group_table(item_groups.load_items([a], "sciq"), "sciq", "dense")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "task_groups.py"), f"--results={b}",
                           "--reference=nobody"], capture_output=True, text=True)
    assert proc.returncode == 1 and "error: reference model 'nobody'" in proc.stderr
    assert "Traceback" not in proc.stderr
