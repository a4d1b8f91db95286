"""Evaluate models the way the paper does: harness accuracies plus held-out perplexity.

:func:`evaluate_models` runs each model (a registry name / path, or an in-process model such as a
freshly pruned one) through our ``replaceme-jax`` backend on the offline tasks, task by task so
each gets its own timing, then scores held-out Wikipedia perplexity, and writes ``results.json``,
``report.md`` (the paper's table) and ``tasks.png`` when given an output directory.
"""
from __future__ import annotations

import time
import zlib
from collections.abc import Sequence

import numpy as np

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.eval.perplexity import DEFAULT_WINDOW, HeldOutPerplexity
from replaceme_jax.eval.tasks import TaskSpec, check_task_data, resolve_tasks, task_manager


def _model_entries(models) -> list[tuple]:
    """Normalise to (name, source) or (name, model, tokenizer) tuples with unique names."""
    if isinstance(models, dict):
        models = list(models.items())
    entries = []
    for entry in models:
        if isinstance(entry, str):
            entry = (entry.rstrip("/").split("/")[-1], entry)
        entry = tuple(entry)
        if len(entry) == 2 and isinstance(entry[1], tuple):
            entry = (entry[0], *entry[1])
        if len(entry) not in (2, 3):
            raise ReplaceMeError(f"a model entry must be (name, path) or (name, model, tokenizer), got {entry!r:.100}")
        entries.append(entry)
    if not entries:
        raise ReplaceMeError("no models to evaluate; give at least one registry name, path or (name, model, tokenizer)")
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ReplaceMeError(f"model names must be unique, got {names}; pass distinct names (--names)")
    return entries


def check_harness_installed() -> None:
    """ReplaceMeError unless lm-evaluation-harness (an optional dependency) can be imported; cheap,
    so a pipeline can call it before hours of work that end with tasks."""
    import importlib.util
    if importlib.util.find_spec("lm_eval") is None:
        raise ReplaceMeError(
            "lm-eval tasks need the optional package lm-evaluation-harness, which is not installed "
            "(scripts/run_prune.sh installs the base package only). Fix: pip install -e '.[eval]' "
            "(or pip install 'lm-eval>=0.4.8'), or run without tasks.")


def _check_tasks_available(specs: Sequence[TaskSpec], manager) -> None:
    """Fail before any model runs: missing offline data, or RACE without the hub."""
    for spec in specs:
        check_task_data(spec)
        if spec.offline:
            continue
        try:
            manager.load([spec.harness_name])
        except Exception as e:  # datasets raises assorted connection / not-found errors offline
            raise ReplaceMeError(
                f"task {spec.name!r} needs its data from the Hugging Face hub (EleutherAI/race), which "
                f"cannot be reached or is not cached ({type(e).__name__}); drop it from --tasks (the "
                "offline preset 'paper' leaves it out) or run with hub access") from e


def item_samples(spec: TaskSpec, manager, limit: int | None, seed: int) -> dict[str, list[int]]:
    """Documents to score per harness task: a seeded random subset of ``limit`` per task (per MMLU
    subject), or all. It depends only on the task, its size and the seed, so every model scores
    the same items, and a task's first N documents (often sorted or one-sided) are not favoured."""
    from lm_eval.tasks import get_task_dict

    def leaves(tree):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value)
            else:
                yield value

    out = {}
    for task in leaves(get_task_dict([spec.harness_name], manager)):
        name, n = task.config.task, len(task.eval_docs)
        if limit is None or limit >= n:
            out[name] = list(range(n))
        else:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            out[name] = sorted(int(i) for i in rng.choice(n, size=limit, replace=False))
    return out


def _item_scores(res: dict, spec: TaskSpec) -> dict:
    """Per-document values of the task's metric, keyed 'subtask:doc_id' (for paired intervals)."""
    ids, values = [], []
    for task, samples in sorted(res["samples"].items()):
        for sample in sorted(samples, key=lambda x: x["doc_id"]):
            if spec.filter is not None and sample.get("filter") != spec.filter:
                continue
            ids.append(f"{task}:{sample['doc_id']}")
            values.append(float(sample[spec.metric]))
    return {"ids": ids, spec.metric: values}


def _task_metrics(res: dict, spec: TaskSpec) -> dict:
    raw = res["results"][spec.harness_name]
    metrics = {k.split(",")[0]: float(v) for k, v in raw.items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float))
               and (spec.filter is None or k.split(",")[1] == spec.filter)}
    if spec.metric not in metrics:
        raise ReplaceMeError(f"task {spec.name}: the harness returned no {spec.metric!r} (got {sorted(metrics)})")
    metrics["n"] = int(sum(v["effective"] for v in res["n-samples"].values()))
    metrics["num_fewshot"] = int(max(res["n-shot"].values(), default=0))
    values = np.asarray(_item_scores(res, spec)[spec.metric])
    # Standard error of the mean over items (the harness's own stderr needs its bootstrap).
    metrics[f"{spec.metric}_stderr"] = (float(values.std(ddof=1) / np.sqrt(values.size))
                                        if values.size > 1 else float("nan"))
    return metrics


def check_finite_metrics(model: str, spec: TaskSpec, metrics: dict, items: dict | None = None) -> None:
    """ReplaceMeError when a task metric (or a per-item value of the task's metric) is NaN or inf:
    a broken model must fail the run, not end up as a number in a table."""
    bad = {k: v for k, v in metrics.items()
           if not k.endswith("_stderr") and isinstance(v, float) and not np.isfinite(v)}
    values = np.asarray((items or {}).get(spec.metric, []), np.float64)
    bad_items = int(np.sum(~np.isfinite(values)))
    if not bad and not bad_items:
        return
    shown = ", ".join(f"{k} = {v}" for k, v in bad.items()) or f"{spec.metric} per item"
    of_items = f" ({bad_items} of {values.size} items non-finite)" if bad_items else ""
    raise ReplaceMeError(
        f"model {model!r} on task {spec.name}: non-finite metric {shown}{of_items}. The model gives "
        "NaN/inf log-probabilities: non-finite weights or T (a diverged solve), or overflow in a "
        "float16/bfloat16 compute dtype. Nothing was written. Fix: evaluate with dtype float32 and "
        "reload the checkpoint (loading names any non-finite tensor).")


def evaluate_models(models, *, tasks: str | Sequence[str] = "paper", limit: int | None = None,
                    heldout_ppl: bool = True, ppl_windows: int | None = None,
                    ppl_window: int = DEFAULT_WINDOW, ppl_stride: int | None = None,
                    ppl_texts: Sequence[str] | None = None, dense: str | None = None,
                    batch_size: int = 64, max_batch_tokens: int = 4096, max_length: int | None = None,
                    seed: int = 1234, cache_dir=None, output_dir=None, overwrite: bool = False) -> dict:
    """Evaluate each model on ``tasks`` (+ held-out perplexity); return the JSON-able results.

    Args:
      models: list of ``(name, path_or_registry_name)`` / ``(name, model, tokenizer)`` tuples (or a
        dict name -> path / (model, tokenizer), or bare paths).
      tasks: presets ('paper', 'extra', 'all', 'paper_with_race', 'none') and/or task names,
        comma-separated.
      limit: score ``limit`` documents of each task (each MMLU subject), drawn at random with
        ``seed`` (the same documents for every model); None: every document.
      seed: seed of that draw.
      cache_dir: per-request result cache (``request_cache``); a rerun after an interruption
        scores only what is missing. None: no cache.
      heldout_ppl, ppl_windows, ppl_window, ppl_stride, ppl_texts: held-out perplexity settings
        (default corpus: the Wikipedia excerpt; ppl_windows=None scores every window).
      dense: name of the reference model for "% of dense" (default: the first model).
      output_dir: where to write results.json, report.md and tasks.png (atomically).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ReplaceMeError(f"limit must be a positive number of items per task (or None for all), got {limit!r}")
    if ppl_windows is not None and ppl_windows < 1:
        raise ReplaceMeError(f"ppl_windows must be at least 1 (or None for all windows), got {ppl_windows}; "
                             "to skip held-out perplexity pass heldout_ppl=False")
    entries = _model_entries(models)
    dense = dense or entries[0][0]
    if dense not in [e[0] for e in entries]:
        raise ReplaceMeError(f"dense reference {dense!r} is not among the model names {[e[0] for e in entries]}")
    if output_dir is not None and not overwrite:
        from pathlib import Path
        out = Path(output_dir)
        if out.is_dir() and any(out.iterdir()):
            raise ReplaceMeError(f"output directory {out} already holds files; pass overwrite=True "
                                 "(--overwrite) or choose another directory")
    specs = resolve_tasks(tasks)
    if not specs and not heldout_ppl:
        raise ReplaceMeError("nothing to evaluate: no tasks (tasks='none') and heldout_ppl=False")
    if specs:  # the harness (an optional dependency) is only needed for tasks
        check_harness_installed()
        manager = task_manager(specs)
        _check_tasks_available(specs, manager)
        samples = {spec.name: item_samples(spec, manager, limit, seed) for spec in specs}

    from replaceme_jax.models.modeling import num_parameters

    results = {"tasks": [s.name for s in specs], "limit": limit, "seed": seed, "dense": dense,
               "heldout": None, "models": {}}
    # One evaluator per tokenizer object (pruned models share the dense one); the tokenizer is
    # kept in the value so its id() cannot be reused by another tokenizer.
    heldout: dict[int, tuple] = {}
    for entry in entries:
        name, started = entry[0], time.perf_counter()
        if len(entry) == 2:
            from replaceme_jax.checkpoints import load_pretrained
            model, tokenizer = load_pretrained(str(entry[1]))
            source = str(entry[1])
        else:
            model, tokenizer = entry[1], entry[2]
            source = "in-process"
        record = {"source": source, "num_layers": model.config.num_hidden_layers,
                  "num_parameters": num_parameters(model), "tasks": {}, "items": {}, "seconds": {}}
        if specs:
            import lm_eval

            from replaceme_jax.eval.lm_eval_backend import ReplaceMeJaxLM
            lm = ReplaceMeJaxLM(model=model, tokenizer=tokenizer, batch_size=batch_size,
                                max_batch_tokens=max_batch_tokens, max_length=max_length,
                                cache_dir=None if cache_dir is None else str(cache_dir))
        for spec in specs:
            t0 = time.perf_counter()
            res = lm_eval.simple_evaluate(model=lm, tasks=[spec.harness_name], task_manager=manager,
                                          samples=samples[spec.name], bootstrap_iters=0,
                                          log_samples=True, verbosity="ERROR")
            record["tasks"][spec.name] = _task_metrics(res, spec)
            record["items"][spec.name] = _item_scores(res, spec)
            check_finite_metrics(name, spec, record["tasks"][spec.name], record["items"][spec.name])
            record["seconds"][spec.name] = round(time.perf_counter() - t0, 1)
        if heldout_ppl:
            t0 = time.perf_counter()
            if id(tokenizer) not in heldout:
                heldout[id(tokenizer)] = (tokenizer, HeldOutPerplexity(
                    tokenizer, ppl_texts, window=ppl_window, stride=ppl_stride, max_windows=ppl_windows))
            ppl = heldout[id(tokenizer)][1](model).to_dict()
            record["heldout_ppl"] = ppl
            record["seconds"]["heldout_ppl"] = round(time.perf_counter() - t0, 1)
            results["heldout"] = {k: ppl[k] for k in ("window", "stride", "num_windows", "num_tokens")}
        record["seconds"]["total"] = round(time.perf_counter() - started, 1)
        results["models"][name] = record
    if specs and len(entries) > 1:
        from replaceme_jax.eval.report import paired_intervals
        results["intervals"] = paired_intervals(results)
    if output_dir is not None:
        from replaceme_jax.eval.report import write_outputs
        write_outputs(results, output_dir, overwrite=overwrite)
    return results
