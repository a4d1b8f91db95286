"""Where a task's accuracy moved: its scored items split by a property of the document.

For example SciQ by whether the correct answer appears in the support paragraph (the question is
then answered by finding it in the context) or not (then by what the model knows), or LAMBADA by
whether the target word occurs earlier in the passage. Works on the per-item results that
``scripts/evaluate.py`` saves, so nothing is rescored and every number is reproducible from
results.json; differences get the report's paired bootstrap (same draws for every model).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.eval.bootstrap import paired_means
from replaceme_jax.eval.report import BOOTSTRAP_ITERS, BOOTSTRAP_SEED
from replaceme_jax.eval.tasks import TASKS
from replaceme_jax.eval.tasks.data import load_split


def _sciq_group(doc: dict) -> str:
    support = doc["support"].strip()
    if not support:
        return "no support paragraph"
    return ("answer in the support" if doc["correct_answer"].strip().lower() in support.lower()
            else "answer not in the support")


def _lambada_group(doc: dict) -> str:
    context, _, target = doc["text"].rpartition(" ")
    word = re.sub(r"\W+", "", target).lower()
    seen = word and re.search(rf"\b{re.escape(word)}\b", context.lower())
    return "target word earlier in the passage" if seen else "target word new"


# task -> (the split its YAML scores, document -> group name); tests check the split against the YAML
GROUPERS = {
    "sciq": ({"arrow": "sciq/none/validation"}, _sciq_group),
    "lambada_openai": ({"requests": "lambada/bpb_0shot", "schema": "lambada"}, _lambada_group),
}


def _doc_index(item_id: str) -> int:
    return int(item_id.rsplit(":", 1)[1])


def load_items(paths, task: str) -> dict[str, dict[str, float]]:
    """model name -> {item id: metric value} from results.json files (or their folders); a name
    seen in two files must agree on the items both scored."""
    metric = TASKS[task].metric
    models: dict[str, dict[str, float]] = {}
    for path in paths:
        path = os.path.join(path, "results.json") if os.path.isdir(path) else path
        if not os.path.exists(path):
            raise ReplaceMeError(f"{path} does not exist; fix: pass the results.json (or its folder) "
                                 f"that scripts/evaluate.py wrote")
        try:
            with open(path) as f:
                results = json.load(f)
            records = results["models"].items()
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ReplaceMeError(f"{path} is not a results.json of scripts/evaluate.py (no per-model "
                                 f"results in it); fix: pass the file that scripts/evaluate.py wrote") from None
        for name, rec in records:
            items = rec.get("items", {}).get(task)
            if not items:
                continue
            values = dict(zip(items["ids"], map(float, items[metric])))
            known = models.setdefault(name, {})
            clash = [k for k, v in values.items() if k in known and known[k] != v]
            if clash:
                raise ReplaceMeError(f"model {name!r} has other {task} results in {path} than in an "
                                     f"earlier file (e.g. {clash[0]}); fix: give the models distinct names")
            known.update(values)
    if not models:
        raise ReplaceMeError(f"no per-item {task} results in {list(paths)}; fix: run scripts/evaluate.py "
                             f"with {task} among --tasks")
    return models


def group_table(models: dict[str, dict[str, float]], task: str, reference: str, *,
                iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED, docs=None) -> list[dict]:
    """One row per (group, model), the group "all" first: items, mean metric, and the paired 95 %
    interval of its difference from ``reference`` on the items every model scored."""
    if task not in GROUPERS:
        raise ReplaceMeError(f"no item groups are defined for {task!r}; choose one of {sorted(GROUPERS)}")
    if reference not in models:
        raise ReplaceMeError(f"reference model {reference!r} is not among {sorted(models)}; fix: name one of them")
    source, grouper = GROUPERS[task]
    docs = load_split(source, task) if docs is None else docs
    common = sorted(set.intersection(*(set(v) for v in models.values())), key=_doc_index)
    if not common:
        raise ReplaceMeError(f"the models share no {task} items; fix: evaluate them with the same --limit and --seed")
    groups = np.array([grouper(docs[_doc_index(k)]) for k in common])
    names = list(models)
    values = np.array([[models[n][k] for k in common] for n in names])
    rows = []
    for group in ["all", *sorted(set(groups))]:
        keep = np.ones(len(common), bool) if group == "all" else groups == group
        boots = paired_means(np.random.default_rng(seed), list(values[:, keep]), iters, chunk=500)
        ref = names.index(reference)
        for i, name in enumerate(names):
            diff = boots[i] - boots[ref]
            rows.append({"group": group, "items": int(keep.sum()), "model": name,
                         "mean": float(values[i, keep].mean()),
                         "minus_reference": float(values[i, keep].mean() - values[ref, keep].mean()),
                         "interval": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))]})
    return rows


def markdown(rows: list[dict], task: str, reference: str) -> str:
    lines = [f"{task}: {TASKS[task].metric} per item group; paired 95 % interval of the difference "
             f"from {reference!r}", "",
             "| group | items | model | mean | minus reference [95 %] |", "|---|---|---|---|---|"]
    for r in rows:
        diff = ("" if r["model"] == reference else
                f"{r['minus_reference']:+.3f} [{r['interval'][0]:+.3f}, {r['interval'][1]:+.3f}]")
        lines.append(f"| {r['group']} | {r['items']} | {r['model']} | {r['mean']:.3f} | {diff} |")
    return "\n".join(lines)
