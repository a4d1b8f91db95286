"""Tables and a chart from :func:`harness.evaluate_models` results, in the paper's format.

Paper table: one column per accuracy task with the metric the paper reports (WinoGrande and BoolQ
acc; OpenBookQA, PIQA and SciQ acc_norm; RACE acc when it ran), "Avg-acc" = their mean, "% of
dense" = Avg-acc relative to the dense model's, then LAMBADA acc and perplexity and held-out
perplexity beside it. A second table holds ARC-Easy/Challenge, HellaSwag and MMLU.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.eval.bootstrap import paired_means
from replaceme_jax.eval.tasks import AVG_ACC_TASKS, TASKS
from replaceme_jax.io_utils import atomic_output_dir, atomic_write_json

PAPER_COLUMNS = ("winogrande", "boolq", "openbookqa", "piqa", "sciq", "race")


def avg_acc(record: dict) -> float | None:
    """Mean of the paper's accuracy tasks present in one model's results (LAMBADA excluded)."""
    vals = [record["tasks"][t][TASKS[t].metric] for t in AVG_ACC_TASKS if t in record["tasks"]]
    return sum(vals) / len(vals) if vals else None


BOOTSTRAP_ITERS = 10_000
BOOTSTRAP_SEED = 0


def _paired_items(dense: dict, rec: dict, task: str, metric: str):
    """(dense values, model values) on the documents both scored, in the same order."""
    a, b = dense.get("items", {}).get(task), rec.get("items", {}).get(task)
    if not a or not b:
        return None
    index = {k: i for i, k in enumerate(b["ids"])}
    common = [(i, index[k]) for i, k in enumerate(a["ids"]) if k in index]
    if len(common) < 2:
        return None
    ia, ib = map(list, zip(*common))
    return np.asarray(a[metric], np.float64)[ia], np.asarray(b[metric], np.float64)[ib]


def paired_intervals(results: dict, *, iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED,
                     level: float = 0.95) -> dict:
    """Paired bootstrap intervals of each model against the dense one, from the per-item results.

    For every task the documents are resampled with replacement, the same draw for both models
    (paired), giving an interval for the difference of the task metric (model - dense). Avg-acc
    retention (100 * model Avg-acc / dense Avg-acc) resamples every Avg-acc task at once, each
    within itself. Percentile intervals; ``seed`` makes them reproducible from results.json.
    """
    dense = results["models"][results["dense"]]
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {}
    for name, rec in results["models"].items():
        if name == results["dense"]:
            continue
        rng = np.random.default_rng(seed)
        tasks, avg_d, avg_m, n_avg = {}, np.zeros(iters), np.zeros(iters), 0
        point_d = point_m = 0.0
        for task in results["tasks"]:
            metric = TASKS[task].metric
            pair = _paired_items(dense, rec, task, metric)
            if pair is None:
                continue
            a, b = pair
            boot_a, boot_b = paired_means(rng, (a, b), iters, chunk=500)  # bounded memory on 10k-item tasks
            diff = boot_b - boot_a
            tasks[task] = {"n": int(a.size), "diff": float(b.mean() - a.mean()),
                           "ci": [float(np.percentile(diff, lo_q)), float(np.percentile(diff, hi_q))]}
            if task in AVG_ACC_TASKS:
                avg_d, avg_m, n_avg = avg_d + boot_a, avg_m + boot_b, n_avg + 1
                point_d, point_m = point_d + a.mean(), point_m + b.mean()
        entry = {"tasks": tasks, "level": level, "iters": iters, "seed": seed}
        if n_avg:
            ratio = 100 * avg_m / np.where(avg_d > 0, avg_d, np.nan)
            entry["retention"] = {"value": 100 * point_m / point_d if point_d else float("nan"),
                                  "ci": [float(np.nanpercentile(ratio, lo_q)),
                                         float(np.nanpercentile(ratio, hi_q))],
                                  "tasks": n_avg}
        out[name] = entry
    return out


def non_finite_metrics(results: dict) -> list[str]:
    """'model / task: metric = value' for every NaN/inf task metric or held-out perplexity
    (standard errors excluded: one item has none)."""
    out = []
    for name, rec in results.get("models", {}).items():
        for task, metrics in rec.get("tasks", {}).items():
            out += [f"{name} / {task}: {k} = {v}" for k, v in metrics.items()
                    if not k.endswith("_stderr") and isinstance(v, float) and not math.isfinite(v)]
        ppl = (rec.get("heldout_ppl") or {}).get("ppl")
        if isinstance(ppl, float) and not math.isfinite(ppl):
            out.append(f"{name} / held-out: ppl = {ppl}")
    return out


def check_finite_results(results: dict) -> None:
    """ReplaceMeError listing the non-finite metrics of ``results``, if any."""
    bad = non_finite_metrics(results)
    if bad:
        raise ReplaceMeError(
            f"evaluation failed: {len(bad)} non-finite metric(s): {'; '.join(bad[:8])}"
            f"{' ...' if len(bad) > 8 else ''}. The model gives NaN/inf log-probabilities (non-finite "
            "weights or T, or float16/bfloat16 overflow); nothing was written. Fix: evaluate in "
            "float32 and reload the checkpoint (loading names any non-finite tensor).")


def _fmt(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return f"**{x}**"  # a broken value is shown, not hidden as "missing"
    return f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _metric_cell(task_record: dict, metric: str) -> str:
    """'0.612 ± 0.015': the metric and its standard error over items, when known."""
    se = task_record.get(f"{metric}_stderr")
    value = _fmt(task_record[metric])
    return value if se is None or math.isnan(se) else f"{value} ± {se:.3f}"


def paper_table(results: dict) -> str:
    run = results["tasks"]
    acc_cols = [t for t in PAPER_COLUMNS if t in run]
    header = ["Model", "Layers"] + [f"{TASKS[t].label} ({TASKS[t].metric})" for t in acc_cols]
    with_avg = any(t in run for t in AVG_ACC_TASKS)
    if with_avg:
        header += ["Avg-acc", "% of dense"]
    lambada = "lambada_openai" in run
    if lambada:
        header += ["LAMBADA acc", "LAMBADA ppl"]
    heldout = results.get("heldout") is not None
    if heldout:
        header += ["Held-out ppl"]
    dense_avg = avg_acc(results["models"][results["dense"]])
    rows = []
    for name, rec in results["models"].items():
        tasks = rec["tasks"]
        avg = avg_acc(rec)
        row = [name, str(rec["num_layers"])] + [_metric_cell(tasks[t], TASKS[t].metric) for t in acc_cols]
        if with_avg:
            row += [_fmt(avg), _fmt(100 * avg / dense_avg if dense_avg else None, 1)]
        if lambada:
            row += [_fmt(tasks["lambada_openai"]["acc"]), _fmt(tasks["lambada_openai"]["perplexity"], 2)]
        if heldout:
            row += [_fmt(rec["heldout_ppl"]["ppl"], 2)]
        rows.append(row)
    return _table(header, rows)


def extra_table(results: dict) -> str | None:
    # Every task the paper table does not show (the extra preset, GSM8K, ...), in the run's order.
    cols = [t for t in results["tasks"] if t not in PAPER_COLUMNS and t != "lambada_openai"]
    if not cols:
        return None
    header = ["Model"] + [f"{TASKS[t].label} ({TASKS[t].metric})" for t in cols]
    rows = [[name] + [_metric_cell(rec["tasks"][t], TASKS[t].metric) for t in cols]
            for name, rec in results["models"].items()]
    return _table(header, rows)


def interval_table(results: dict) -> str | None:
    """Model - dense per task and Avg-acc retention, each with its paired bootstrap interval."""
    intervals = results.get("intervals") or paired_intervals(results)
    if not intervals:
        return None
    cols = [t for t in results["tasks"] if any(t in e["tasks"] for e in intervals.values())]
    with_ret = any("retention" in e for e in intervals.values())
    header = ["Model"] + [f"Δ {TASKS[t].label}" for t in cols] + (["Avg-acc retention (%)"] if with_ret else [])
    rows = []
    for name, e in intervals.items():
        row = [name]
        for t in cols:
            d = e["tasks"].get(t)
            row.append("–" if d is None else f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]")
        if with_ret:
            r = e.get("retention")
            row.append("–" if r is None else f"{r['value']:.1f} [{r['ci'][0]:.1f}, {r['ci'][1]:.1f}]")
        rows.append(row)
    return _table(header, rows)


def notes(results: dict) -> list[str]:
    out = []
    run = results["tasks"]
    avg_tasks = [TASKS[t].label for t in AVG_ACC_TASKS if t in run]
    if avg_tasks:
        out.append(f"Avg-acc: mean over {', '.join(avg_tasks)} ({len(avg_tasks)} tasks; LAMBADA not included); "
                   f"% of dense relative to '{results['dense']}'.")
    if any(t in run for t in PAPER_COLUMNS) and "race" not in run:
        out.append("RACE is not in this run: its data (EleutherAI/race) is not available offline, so "
                   "Avg-acc covers one task fewer than the paper's.")
    first = next(iter(results["models"].values()))
    n = {t: first["tasks"][t]["n"] for t in run}
    if not run:
        pass
    elif results.get("limit"):
        out.append(f"Limit: {results['limit']} documents per task (per MMLU subject), drawn at random with "
                   f"seed {results.get('seed')}, the same for every model; items scored: "
                   + ", ".join(f"{TASKS[t].label} {n[t]}" for t in run) + ".")
    else:
        out.append("Full tasks; items scored: " + ", ".join(f"{TASKS[t].label} {n[t]}" for t in run) + ".")
    if run:
        shots = {TASKS[t].label: first["tasks"][t]["num_fewshot"] for t in run}
        few = [f"{k} {v}-shot" for k, v in shots.items() if v]
        out.append("0-shot" + (f" except {', '.join(few)}" if few else "") + ".")
    if run:
        out.append("± is the standard error over items. Δ: model minus dense on the same items, with a "
                   f"paired bootstrap {BOOTSTRAP_ITERS:,}-draw 95 % interval; an interval that contains 0 "
                   "shows no difference at this sample size.")
    if results.get("heldout"):
        h = results["heldout"]
        kind = "non-overlapping" if h["stride"] == h["window"] else f"stride {h['stride']}"
        out.append(f"Held-out ppl: Wikipedia excerpt, {h['num_windows']} {kind} windows of {h['window']} "
                   f"tokens ({h['num_tokens']} scored tokens).")
    return out


def timing_table(results: dict) -> str:
    keys = list(results["tasks"]) + (["heldout_ppl"] if results.get("heldout") else []) + ["total"]
    header = ["Model"] + [TASKS[k].label if k in TASKS else k for k in keys]
    rows = [[name] + [_fmt(rec["seconds"].get(k), 0) for k in keys] for name, rec in results["models"].items()]
    return _table(header, rows)


def format_report(results: dict) -> str:
    bad = non_finite_metrics(results)
    parts = ([f"**FAILED: {len(bad)} non-finite metric(s):** " + "; ".join(bad), ""] if bad else [])
    parts += ["## Paper tasks", "", paper_table(results), ""]
    extra = extra_table(results)
    if extra:
        parts += ["## Other tasks", "", extra, ""]
    diffs = interval_table(results) if len(results["models"]) > 1 and results["tasks"] else None
    if diffs:
        parts += ["## Against the dense model (95 % paired bootstrap intervals)", "", diffs, ""]
    parts += [f"- {line}" for line in notes(results)]
    parts += ["", "## Wall time (s)", "", timing_table(results), ""]
    return "\n".join(parts)


def bar_chart_png(results: dict) -> bytes:
    """Grouped bars per model: task metrics and Avg-acc (left), held-out perplexity (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = list(results["tasks"])
    labels = [f"{TASKS[t].label}\n{TASKS[t].metric}" for t in run]
    has_avg = any(t in run for t in AVG_ACC_TASKS)
    if has_avg:
        labels.append("Avg-acc")
    names = list(results["models"])
    heldout = results.get("heldout") is not None
    panels = [p for p, on in (("tasks", bool(run)), ("ppl", heldout)) if on]
    widths = [max(4.0, 1.1 * len(labels)) if p == "tasks" else 2.5 for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), 4.0), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    bar = 0.8 / len(names)
    for ax, panel in zip(axes[0], panels):
        for i, name in enumerate(names):
            rec = results["models"][name]
            offset = (i - (len(names) - 1) / 2) * bar
            label = f"{name} ({rec['num_layers']} blocks)"
            if panel == "tasks":
                vals = [rec["tasks"][t][TASKS[t].metric] for t in run]
                errs = [1.96 * rec["tasks"][t].get(f"{TASKS[t].metric}_stderr", float("nan")) for t in run]
                if has_avg:
                    vals.append(avg_acc(rec))
                    errs.append(float("nan"))
                errs = [0.0 if math.isnan(e) else e for e in errs]
                ax.bar([j + offset for j in range(len(vals))], vals, bar, label=label, yerr=errs,
                       capsize=2, error_kw={"elinewidth": 0.8})
            else:
                ax.bar([offset], [rec["heldout_ppl"]["ppl"]], bar, label=label)
        if panel == "tasks":
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_ylabel("accuracy")
            limit = f" ({results['limit']} random items per task; bars: 95 % CI)" if results.get("limit") else ""
            ax.set_title("lm-evaluation-harness" + limit, fontsize=9)
        else:
            ax.set_xticks([0], ["Wikipedia"], fontsize=8)
            ax.set_ylabel("held-out perplexity")
            ax.set_title("held-out perplexity", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(results: dict, output_dir, *, overwrite: bool = False) -> Path:
    """results.json, report.md and tasks.png, written into ``output_dir`` in one rename; a
    ReplaceMeError (and nothing written) when a metric is NaN or inf."""
    check_finite_results(results)
    with atomic_output_dir(output_dir, overwrite=overwrite, what="evaluation output") as tmp:
        atomic_write_json(tmp / "results.json", results)
        (tmp / "report.md").write_text(format_report(results), encoding="utf-8")
        (tmp / "tasks.png").write_bytes(bar_chart_png(results))
    return Path(output_dir)
