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

from replaceme_jax.eval.tasks import AVG_ACC_TASKS, PRESETS, TASKS
from replaceme_jax.io_utils import atomic_output_dir, atomic_write_json

PAPER_COLUMNS = ("winogrande", "boolq", "openbookqa", "piqa", "sciq", "race")
EXTRA_COLUMNS = PRESETS["extra"]


def avg_acc(record: dict) -> float | None:
    """Mean of the paper's accuracy tasks present in one model's results (LAMBADA excluded)."""
    vals = [record["tasks"][t][TASKS[t].metric] for t in AVG_ACC_TASKS if t in record["tasks"]]
    return sum(vals) / len(vals) if vals else None


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


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
        row = [name, str(rec["num_layers"])] + [_fmt(tasks[t][TASKS[t].metric]) for t in acc_cols]
        if with_avg:
            row += [_fmt(avg), _fmt(100 * avg / dense_avg if dense_avg else None, 1)]
        if lambada:
            row += [_fmt(tasks["lambada_openai"]["acc"]), _fmt(tasks["lambada_openai"]["perplexity"], 2)]
        if heldout:
            row += [_fmt(rec["heldout_ppl"]["ppl"], 2)]
        rows.append(row)
    return _table(header, rows)


def extra_table(results: dict) -> str | None:
    cols = [t for t in EXTRA_COLUMNS if t in results["tasks"]]
    if not cols:
        return None
    header = ["Model"] + [f"{TASKS[t].label} ({TASKS[t].metric})" for t in cols]
    rows = [[name] + [_fmt(rec["tasks"][t][TASKS[t].metric]) for t in cols]
            for name, rec in results["models"].items()]
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
        out.append(f"Limit: first {results['limit']} documents per task (per MMLU subject); items scored: "
                   + ", ".join(f"{TASKS[t].label} {n[t]}" for t in run) + ".")
    else:
        out.append("Full tasks; items scored: " + ", ".join(f"{TASKS[t].label} {n[t]}" for t in run) + ".")
    if run:
        shots = {TASKS[t].label: first["tasks"][t]["num_fewshot"] for t in run}
        few = [f"{k} {v}-shot" for k, v in shots.items() if v]
        out.append("0-shot" + (f" except {', '.join(few)}" if few else "") + ".")
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
    parts = ["## Paper tasks", "", paper_table(results), ""]
    extra = extra_table(results)
    if extra:
        parts += ["## Other tasks", "", extra, ""]
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
                if has_avg:
                    vals.append(avg_acc(rec))
                ax.bar([j + offset for j in range(len(vals))], vals, bar, label=label)
            else:
                ax.bar([offset], [rec["heldout_ppl"]["ppl"]], bar, label=label)
        if panel == "tasks":
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_ylabel("accuracy")
            limit = f" (first {results['limit']} items per task)" if results.get("limit") else ""
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
    """results.json, report.md and tasks.png, written into ``output_dir`` in one rename."""
    with atomic_output_dir(output_dir, overwrite=overwrite, what="evaluation output") as tmp:
        atomic_write_json(tmp / "results.json", results)
        (tmp / "report.md").write_text(format_report(results), encoding="utf-8")
        (tmp / "tasks.png").write_bytes(bar_chart_png(results))
    return Path(output_dir)
