"""Anchor tuning on one cut: start, loss and learning rate, chosen on validation NLL.

    python scripts/study_anchor.py --cut=12-20 --runs=replaceme:mse:1e-3,replaceme:mse:1e-2,replaceme:token:1e-2,drop:mse:1e-2

Each run is ``start:loss:lr``. ``start``: ``replaceme`` (the anchor begins as ReplaceMe's block with T
folded in: the ``heal.anchor_steps`` stage) or ``drop`` (the anchor begins as the dense block after plain
dropping: the LLM-Streamline baseline). ``loss``: ``mse`` or ``token`` (``replaceme/anchor_tuning.py``).
Every run trains ``--steps`` AdamW steps on the calibration batches and is scored by mean NLL on the
calibration source's validation part (what a user may choose by) and by perplexity on two held-out
genres never used for calibration or selection (the Wikipedia excerpt and LAMBADA-OpenAI fiction).
The ReplaceMe model without training is the first row. Writes anchor.json and anchor.md after every row.
"""
from __future__ import annotations

import os
import sys
import time

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from replaceme_jax.cli import run_main  # noqa: E402
from replaceme_jax.errors import ReplaceMeError  # noqa: E402

CONFIG = config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "configs", "smollm2_135m.py"),
                                         "Pipeline config (model, calibration).")
CUT = flags.DEFINE_string("cut", "12-20", "Cut start-end (end exclusive).")
RUNS = flags.DEFINE_string("runs", "replaceme:mse:1e-2,replaceme:token:1e-2,drop:mse:1e-2",
                           "Comma list of start:loss:lr (start replaceme|drop, loss mse|token).")
STEPS = flags.DEFINE_integer("steps", 200, "AdamW steps per run.")
WINDOWS = flags.DEFINE_integer("ppl_windows", 4, "Perplexity windows of 1024 tokens per genre.")
OUT = flags.DEFINE_string("output_dir", "runs/anchor", "Where anchor.json and anchor.md go.")


def parse_runs(text: str) -> list[tuple[str, str, float]]:
    from replaceme_jax.replaceme.anchor_tuning import LOSSES
    runs = []
    for spec in (p.strip() for p in text.split(",") if p.strip()):
        parts = spec.split(":")
        try:
            start, loss, lr = parts[0], parts[1], float(parts[2])
        except (IndexError, ValueError):
            raise ReplaceMeError(f"--runs: {spec!r} is not start:loss:lr, e.g. replaceme:token:1e-2") from None
        if start not in ("replaceme", "drop") or loss not in LOSSES or len(parts) != 3 or not lr > 0:
            raise ReplaceMeError(f"--runs: {spec!r}: start is replaceme or drop, loss {' or '.join(LOSSES)}, lr > 0")
        runs.append((start, loss, lr))
    if not runs:
        raise ReplaceMeError("--runs is empty: give start:loss:lr, e.g. replaceme:token:1e-2")
    return runs


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}")
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.eval.nll import mean_nll
    from replaceme_jax.eval.perplexity import held_out_genres
    from replaceme_jax.io_utils import atomic_write_json, atomic_write_text
    from replaceme_jax.replaceme.anchor_tuning import tune_anchors
    from replaceme_jax.replaceme.cuts import parse_cuts
    from replaceme_jax.replaceme.pipeline import calibration_batches, prune
    from replaceme_jax.replaceme.surgery import apply_cuts
    from replaceme_jax.settings import Settings

    cfg = Settings.from_config(CONFIG.value).replace(progress=False)
    runs = parse_runs(RUNS.value)
    if STEPS.value < 1:
        raise ReplaceMeError(f"--steps={STEPS.value}: give at least 1")
    model, tok = load_pretrained(cfg.model, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
    (cut,) = parse_cuts(CUT.value, model.config.num_hidden_layers)
    batches = calibration_batches(tok, cfg)
    validation = calibration_batches(tok, cfg, part="validation", num_samples=cfg.calibration.validation_samples)
    genres = held_out_genres(tok, max_windows=WINDOWS.value)
    dense = {g: e(model).ppl for g, e in genres.items()}
    t0 = time.perf_counter()
    starts = {"replaceme": prune(model, batches, cfg, cuts=[cut], validation=validation).model}
    replaceme_s = time.perf_counter() - t0
    starts["drop"] = apply_cuts(model, [cut])
    rows = []

    def add(row, pruned):
        row.update({"validation_nll": mean_nll(pruned, validation), **{g: e(pruned).ppl for g, e in genres.items()}})
        rows.append(row)
        print(row, flush=True)
        write()

    def write():
        lines = [f"anchor tuning at cut [{cut[0]}, {cut[1]}) of {cfg.model}: {STEPS.value} AdamW steps on "
                 f"{cfg.calibration.num_samples} {cfg.calibration.source} passages; validation NLL on "
                 f"{cfg.calibration.validation_samples} held-out calibration-source passages; {WINDOWS.value} "
                 "windows x 1024 tokens per genre", "",
                 "| start | loss | lr | validation NLL | Wikipedia ppl (x dense) | fiction ppl (x dense) | s |",
                 "|---|---|---|---|---|---|---|",
                 f"| dense | | | | {dense['wikipedia']:.2f} (1.00x) | {dense['fiction']:.2f} (1.00x) | |"]
        best = min((r for r in rows if r["lr"] is not None), key=lambda r: r["validation_nll"], default=None)
        for r in rows:
            cells = [f"{r[g]:.2f} ({r[g] / dense[g]:.2f}x)" for g in genres]
            nll = f"**{r['validation_nll']:.4f}**" if r is best else f"{r['validation_nll']:.4f}"
            lr = "no training" if r["lr"] is None else f"{r['lr']:g}"
            lines.append(f"| {r['start']} | {r['loss'] or ''} | {lr} | {nll} | {cells[0]} | {cells[1]} | {r['seconds']:.0f} |")
        text = "\n".join(lines)
        os.makedirs(OUT.value, exist_ok=True)
        atomic_write_json(os.path.join(OUT.value, "anchor.json"), {"cut": list(cut), "dense": dense, "rows": rows,
                                                                   "steps": STEPS.value})
        atomic_write_text(os.path.join(OUT.value, "anchor.md"), text + "\n")
        return text

    add({"start": "replaceme", "loss": None, "lr": None, "seconds": replaceme_s}, starts["replaceme"])
    for start, loss, lr in runs:
        tuned = tune_anchors(model, starts[start], batches, [cut], steps=STEPS.value, lr=lr, loss=loss,
                             warmup=cfg.heal.warmup, seed=cfg.heal.seed)  # as the heal.anchor_* stage runs
        add({"start": start, "loss": loss, "lr": lr, "seconds": tuned.seconds + (replaceme_s if start == "replaceme" else 0),
             "first_loss": tuned.losses[cut][0], "last_loss": tuned.losses[cut][-1]}, tuned.model)
    print(write())
    return 0


if __name__ == "__main__":
    run_main(main)
