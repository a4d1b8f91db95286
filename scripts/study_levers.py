"""Which lever moves quality on one cut: the transform's estimator, its ridge, a cosine warm start,
the anchor kernel re-fit.

    python scripts/study_levers.py                       # the main job's settings and cut
    python scripts/study_levers.py --cut=12-20 --ppl_windows=8
    python scripts/study_levers.py --cut=12-20 --only='W T,re-fit'    # a subset of the variants

The cut is chosen once by the main job's rule (or given with --cut); every variant prunes the same
cut from the same calibration pass (the anchor kernel re-fit adds its own pass over the cut) and is
scored on two held-out genres never used for selection or fitting: the Wikipedia excerpt (the report's corpus) and LAMBADA-OpenAI passages (fiction). The
ridge of the alpha_grid variants is chosen by the residual on the calibration source's validation
split (``calibration.validation_samples`` passages), as is the kernel re-fit's ridge toward W T (its
"chosen α" column; inf: W T kept). Writes levers.json and levers.md.
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
                                         "Pipeline config (model, calibration, num_blocks).")
CUT = flags.DEFINE_string("cut", "", "Cut start-end (end exclusive); empty: the config's selection rule picks it.")
WINDOWS = flags.DEFINE_integer("ppl_windows", 8, "Perplexity windows of 1024 tokens per genre.")
OUT = flags.DEFINE_string("output_dir", "runs/levers", "Where levers.json and levers.md go.")
ONLY = flags.DEFINE_list("only", [], "Run only the variants whose name contains one of these texts (e.g. "
                         "'W T,re-fit'); dense and drop are always scored.")
GRID = "0,1e-4,1e-3,1e-2,1e-1,1"
T_ALONE = {"refit.anchor": False}  # the paper's W T, whatever the config's default
VARIANTS = [  # (name, settings overrides)
    ("lstsq, W T", T_ALONE),
    ("ridge -> 0, alpha on validation", {**T_ALONE, "alpha_grid": GRID}),
    ("ridge -> I, alpha on validation", {**T_ALONE, "alpha_grid": GRID, "ridge_target": "identity"}),
    ("cosine, warm start from lstsq", {**T_ALONE, "solver": "cosine", "cosine.init": "lstsq"}),
    ("cosine_accurate, warm start from lstsq", {**T_ALONE, "solver": "cosine_accurate", "cosine.init": "lstsq"}),
    ("lstsq + anchor kernel re-fit, alpha on validation", {"refit.anchor": True}),
    ("ridge -> I + anchor kernel re-fit", {"alpha_grid": GRID, "ridge_target": "identity", "refit.anchor": True}),
    ("token-weighted anchor kernel re-fit (lstsq T)", {"refit.anchor": True, "refit.weighting": "token"}),
]


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}")
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.eval.perplexity import held_out_genres
    from replaceme_jax.io_utils import atomic_write_json, atomic_write_text
    from replaceme_jax.replaceme import selection as sel
    from replaceme_jax.replaceme.cuts import parse_cut_syntax, parse_cuts
    from replaceme_jax.replaceme.pipeline import calibration_batches, prune
    from replaceme_jax.replaceme.statistics import gather_statistics, statistics_request
    from replaceme_jax.replaceme.surgery import apply_cuts
    from replaceme_jax.settings import Settings

    cfg = Settings.from_config(CONFIG.value).replace(progress=False)
    variants = [(n, o) for n, o in VARIANTS if not ONLY.value or any(part in n for part in ONLY.value)]
    if not variants:
        raise ReplaceMeError(f"--only={','.join(ONLY.value)!r} matches no variant; names: {[n for n, _ in VARIANTS]}")
    for _, overrides in variants:  # every variant's settings are checked before the model loads
        cfg.replace(**overrides)
    if CUT.value:
        parse_cut_syntax(CUT.value)
    model, tok = load_pretrained(cfg.model, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
    depth = model.config.num_hidden_layers
    batches = calibration_batches(tok, cfg)
    validation = calibration_batches(tok, cfg, part="validation", num_samples=cfg.calibration.validation_samples)
    t0 = time.perf_counter()
    if CUT.value:
        (cut,) = parse_cuts(CUT.value, depth)
        stats = None
    else:
        stats = gather_statistics(model, batches, statistics_request(cfg, depth))
        (cut,) = sel.choose_cuts(sel.get_rule(cfg.selection)(stats, cfg.num_blocks, alpha=cfg.alpha), 1)
    stats_s = time.perf_counter() - t0
    genres = held_out_genres(tok, max_windows=WINDOWS.value)
    score = lambda m: {g: e(m).ppl for g, e in genres.items()}  # noqa: E731
    dense = score(model)
    rows = [{"variant": "dense", **dense}, {"variant": "drop (T = I)", **score(apply_cuts(model, [cut]))}]
    for name, overrides in variants:
        t = time.perf_counter()
        result = prune(model, batches, cfg.replace(**overrides), stats=stats, cuts=[cut], validation=validation)
        info = result.solves[0].info
        alpha = info.get("alpha_relative")
        if result.refits:  # the re-fit's own ridge (toward W T); inf: W T kept
            alpha = result.refits[0].alpha_relative
        rows.append({"variant": name, "solve_s": round(time.perf_counter() - t, 1),
                     "relative_residual": result.refits[0].train_residual if result.refits else result.residuals[0],
                     "alpha_relative": alpha,
                     "refit": result.refits[0].summary() if result.refits else None,
                     **score(result.model)})
    lines = [f"cut [{cut[0]}, {cut[1]}) of {cfg.model} ({cfg.calibration.num_samples} {cfg.calibration.source} "
             f"passages; {WINDOWS.value} windows x 1024 tokens per genre)", "",
             "| variant | Wikipedia ppl (x dense) | fiction ppl (x dense) | rel. residual (calibration) | chosen α | solve s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[g]:.2f} ({r[g] / dense[g]:.2f}x)" for g in genres]
        res = "" if r.get("relative_residual") is None else f"{r['relative_residual']:.4f}"
        a = "" if r.get("alpha_relative") is None else f"{r['alpha_relative']:g}"
        lines.append(f"| {r['variant']} | {cells[0]} | {cells[1]} | {res} | {a} | {r.get('solve_s', '')} |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(OUT.value, exist_ok=True)
    atomic_write_json(os.path.join(OUT.value, "levers.json"), {"cut": list(cut), "rows": rows, "stats_s": stats_s})
    atomic_write_text(os.path.join(OUT.value, "levers.md"), text + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
