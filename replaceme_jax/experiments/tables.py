"""Tables and plots of a sweep's finished rows: results.csv, results.md, selection.md, plots.png."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

from replaceme_jax.baselines import methods as mth
from replaceme_jax.io_utils import atomic_write_bytes, atomic_write_text

LABELS = {"drop": "UIDL drop", "shortgpt": "ShortGPT", "sleb": "SLEB"}


def read_rows(output_dir) -> list[dict]:
    """Every finished row under ``<output_dir>/rows``, dense first."""
    rows_dir = Path(output_dir) / "rows"
    rows = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))] if rows_dir.exists() else []
    return sort_rows(rows)


def sort_rows(rows: list[dict]) -> list[dict]:
    """By blocks removed, then method (dense first), then label."""
    order = {m: i for i, m in enumerate(("dense", *mth.METHODS))}
    return sorted(rows, key=lambda r: (r["removed"], order[r["method"]], label(r, rows)))


def _varying(rows: list[dict], field: str, methods=("replaceme", "drop")) -> bool:
    return len({r.get(field) for r in rows if r["method"] in methods}) > 1


def label(row: dict, rows: list[dict]) -> str:
    """Line / table name of a row's method; settings that vary across the sweep are appended."""
    if row["method"] == "dense":
        return "dense"
    name = f"ReplaceMe {row['solver']}" if row["method"] == "replaceme" else LABELS[row["method"]]
    extra = []
    if row["method"] in ("replaceme", "drop"):
        if _varying(rows, "selection"):
            extra.append(row["selection"])
        if _varying(rows, "num_transforms"):
            extra.append(f"{row['num_transforms']} cuts")
        if row["method"] == "replaceme" and _varying(rows, "alpha", ("replaceme",)):
            extra.append(f"α={row['alpha']:g}")
    if len({r.get("calibration_size") for r in rows if r["method"] != "dense"}) > 1:
        extra.append(f"cal {row['calibration_size']}")
    return name + (f" ({', '.join(extra)})" if extra else "")


def _fmt(x, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table_records(rows: list[dict]) -> list[dict]:
    dense = next((r for r in rows if r["method"] == "dense"), None)
    out = []
    for r in rows:
        ppl = r["heldout_ppl"]["ppl"]
        acc = r.get("avg_acc")
        rec = {"label": label(r, rows), "method": r["method"], "solver": r.get("solver"),
               "selection": r.get("selection"), "blocks_per_cut": r.get("blocks_per_cut"),
               "num_transforms": r.get("num_transforms"), "alpha": r.get("alpha"),
               "calibration_size": r.get("calibration_size"), "removed": r["removed"],
               "num_blocks": r["num_blocks"], "removed_blocks": " ".join(map(str, r.get("removed_blocks", []))),
               "heldout_ppl": ppl, "ppl_x_dense": ppl / dense["heldout_ppl"]["ppl"] if dense else None,
               "avg_acc": acc,
               "avg_acc_pct_dense": 100 * acc / dense["avg_acc"] if dense and acc is not None and dense.get("avg_acc")
               else None}
        for task, metrics in sorted((r.get("tasks") or {}).items()):
            from replaceme_jax.eval.tasks import TASKS
            rec[f"{task}_{TASKS[task].metric}"] = metrics[TASKS[task].metric]
        rec["prune_seconds"], rec["eval_seconds"] = r.get("prune_seconds"), r.get("eval_seconds")
        out.append(rec)
    return out


def results_csv(rows: list[dict]) -> str:
    import csv
    records = table_records(rows)
    fields = list(dict.fromkeys(k for rec in records for k in rec))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def settings_note(cfg) -> str:
    p, e = cfg.pipeline, cfg.eval
    tasks = f"tasks `{e.tasks}`, first {e.limit} items per task" if e.tasks and e.limit else (
        f"tasks `{e.tasks}` (all items)" if e.tasks else "no lm-eval tasks")
    windows = f"{e.ppl_windows} windows" if e.ppl_windows else "all windows"
    return (f"Model `{p.model}`; calibration `{p.calibration.source}` passages x {p.calibration.max_length} tokens; "
            f"held-out Wikipedia perplexity on {windows} of {e.window} tokens; {tasks}; Avg-acc = mean accuracy "
            f"of the paper's tasks present (LAMBADA excluded). SLEB scores {cfg.sleb.num_sequences or 'all'} "
            f"calibration sequences per candidate.")


def results_markdown(rows: list[dict], cfg=None) -> str:
    records = table_records(rows)
    header = ["Removed", "Method", "Blocks removed", "Held-out ppl", "× dense", "Avg-acc", "% of dense"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for rec in records:
        lines.append("| " + " | ".join([
            str(rec["removed"]), rec["label"], rec["removed_blocks"] or "–", _fmt(rec["heldout_ppl"], ".2f"),
            _fmt(rec["ppl_x_dense"], ".2f"), _fmt(rec["avg_acc"], ".3f"),
            _fmt(rec["avg_acc_pct_dense"], ".1f")]) + " |")
    note = f"\n\n{settings_note(cfg)}\n" if cfg is not None else "\n"
    return "\n".join(lines) + note


def selection_markdown(rows: list[dict]) -> str | None:
    """How far the angular and residual rules land from the search rule's best cut."""
    search = {_study_key(r): r for r in rows if r.get("selection") == "search"}
    if not search:
        return None
    header = ["Method", "n", "Rule", "Cut", "Best cut (search)", "Held-out ppl", "Best ppl", "Δ ppl",
              "Avg-acc", "Best Avg-acc", "Δ Avg-acc"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        best = search.get(_study_key(r)) if r.get("selection") in ("angular", "residual") else None
        if best is None:
            continue
        acc, best_acc = r.get("avg_acc"), best.get("avg_acc")
        d_acc = acc - best_acc if acc is not None and best_acc is not None else None
        lines.append("| " + " | ".join([
            label({**r, "selection": None}, [r]), str(r["blocks_per_cut"]), r["selection"], _cuts(r), _cuts(best),
            _fmt(r["heldout_ppl"]["ppl"], ".2f"), _fmt(best["heldout_ppl"]["ppl"], ".2f"),
            _fmt(r["heldout_ppl"]["ppl"] - best["heldout_ppl"]["ppl"], "+.2f"),
            _fmt(acc, ".3f"), _fmt(best_acc, ".3f"), _fmt(d_acc, "+.3f")]) + " |")
    return "\n".join(lines) + "\n"


def _study_key(r: dict):
    return (r["method"], r.get("solver"), r.get("blocks_per_cut"), r.get("num_transforms"), r.get("alpha"),
            r.get("calibration_size"))


def _cuts(r: dict) -> str:
    # First and last removed block, inclusive, as the "Blocks removed" column lists them.
    return ",".join(f"{s}-{e - 1}" for s, e in r.get("cuts", []))


def plot_png(rows: list[dict]) -> bytes | None:
    """Held-out perplexity and Avg-acc retained vs blocks removed, one line per method."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    pruned = [r for r in rows if r["method"] != "dense"]
    if dense is None or not pruned:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with_acc = dense.get("avg_acc") is not None
    fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(12 if with_acc else 6, 4.5), squeeze=False)
    lines: dict[str, list[dict]] = {}
    for r in pruned:
        lines.setdefault(label(r, rows), []).append(r)
    for name, members in lines.items():
        members = sorted(members, key=lambda r: r["removed"])
        x = [0] + [r["removed"] for r in members]
        axes[0][0].plot(x, [dense["heldout_ppl"]["ppl"]] + [r["heldout_ppl"]["ppl"] for r in members],
                        marker="o", label=name)
        if with_acc:
            axes[0][1].plot(x, [100.0] + [100 * r["avg_acc"] / dense["avg_acc"] for r in members],
                            marker="o", label=name)
    axes[0][0].set_yscale("log")
    axes[0][0].set_xlabel("blocks removed")
    axes[0][0].set_ylabel("held-out perplexity (log)")
    axes[0][0].legend(fontsize=8)
    if with_acc:
        axes[0][1].set_xlabel("blocks removed")
        axes[0][1].set_ylabel("Avg-acc, % of dense")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(output_dir, rows: list[dict], cfg=None) -> None:
    out = Path(output_dir)
    atomic_write_text(out / "results.csv", results_csv(rows))
    atomic_write_text(out / "results.md", results_markdown(rows, cfg))
    study = selection_markdown(rows)
    if study is not None:
        atomic_write_text(out / "selection.md", study)
    if cfg is None or cfg.plots:
        png = plot_png(rows)
        if png is not None:
            atomic_write_bytes(out / "plots.png", png)
