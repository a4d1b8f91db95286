"""Where a task's accuracy moved: its items split into groups, every model scored per group.

Reads the per-item results of ``scripts/evaluate.py`` (one or several results.json; models merged by
name) and splits the task's documents by a property of the document (``eval.item_groups``), e.g.
SciQ by whether the correct answer appears in the support paragraph::

    python scripts/task_groups.py --results=runs/eval_self2048_paper,runs/eval_heal100_paper \
        --task=sciq --reference=default

Nothing is rescored; every number comes from the saved per-item values.
"""
from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from replaceme_jax.cli import run_main  # noqa: E402
from replaceme_jax.errors import ReplaceMeError  # noqa: E402
from replaceme_jax.eval import item_groups  # noqa: E402
from replaceme_jax.io_utils import atomic_write_json  # noqa: E402

RESULTS = flags.DEFINE_list("results", [], "results.json files of scripts/evaluate.py, or their folders.")
TASK = flags.DEFINE_enum("task", "sciq", sorted(item_groups.GROUPERS), "Task whose items are split.")
REFERENCE = flags.DEFINE_string("reference", "dense", "Model the differences are taken against.")
OUT = flags.DEFINE_string("output", "", "Also write the rows as JSON to this file.")


def main(argv):
    del argv
    if not RESULTS.value:
        raise ReplaceMeError("--results is empty; fix: --results=runs/<evaluation>/results.json[,...]")
    rows = item_groups.group_table(item_groups.load_items(RESULTS.value, TASK.value), TASK.value, REFERENCE.value)
    print(item_groups.markdown(rows, TASK.value, REFERENCE.value))
    if OUT.value:
        atomic_write_json(OUT.value, {"task": TASK.value, "reference": REFERENCE.value, "rows": rows})
    return 0


if __name__ == "__main__":
    run_main(main)
