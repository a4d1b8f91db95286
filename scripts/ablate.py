"""Sweep ReplaceMe and its baselines (UIDL drop, ShortGPT, SLEB, LinearPatch-style orth_diag).

    python scripts/ablate.py --config=configs/ablation_smollm2.py
    python scripts/ablate.py --config=configs/ablation_smollm2.py:selection
    python scripts/ablate.py --config=configs/ablation_smollm2.py --config.sweep.num_blocks=4,8 \\
        --config.sweep.solvers=lstsq,diag --config.eval.limit=50 --config.output_dir=runs/my_sweep

Each finished row is saved at once; rerunning the same command resumes an interrupted sweep (and
adds rows when the sweep lists grow). Outputs in --config.output_dir: results.csv, results.md,
selection.md (when the search rule ran), plots.png, rows/*.json, cache/ (statistics, Block
Influence, SLEB order, search scores).
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from replaceme_jax.cli import run_main
from replaceme_jax.errors import ReplaceMeError

CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config (configs/ablation_smollm2.py[:mode]).",
                                         lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}; pass settings as --config.<field>=...")
    import datasets

    from replaceme_jax.experiments.sweep import load_rows, run_sweep
    from replaceme_jax.experiments.tables import results_markdown, selection_markdown
    datasets.disable_progress_bars()
    from replaceme_jax.settings import Settings
    cfg = CONFIG.value
    Settings.from_config(cfg.pipeline)  # the shared pipeline settings, checked before the sweep starts
    run_sweep(cfg)
    rows = load_rows(cfg.output_dir, cfg)
    print(results_markdown(rows, cfg))
    study = selection_markdown(rows)
    if study:
        print(study)
    print(f"outputs: {cfg.output_dir} (results.csv, results.md, plots.png, rows/, cache/)")
    return 0


if __name__ == "__main__":
    run_main(main)
