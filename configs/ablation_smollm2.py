"""Sweep settings for scripts/ablate.py on the embedded default, SmolLM2-135M-Instruct.

    python scripts/ablate.py --config=configs/ablation_smollm2.py              # the README table
    python scripts/ablate.py --config=configs/ablation_smollm2.py:selection    # selection study
    python scripts/ablate.py --config=configs/ablation_smollm2.py:small        # seconds-scale smoke run

Defaults come from ``replaceme_jax.experiments.sweep.sweep_config``. Sweep lists are
comma-separated strings (override e.g. --config.sweep.num_blocks=4,8). A sweep dimension only
multiplies the methods it applies to: solvers and alphas ReplaceMe, selection rules and numbers of
transforms ReplaceMe and drop; ShortGPT and SLEB get one row per number of blocks removed.
"""
from replaceme_jax.experiments.sweep import sweep_config
from replaceme_jax.errors import ReplaceMeError


def get_config(mode: str = "table"):
    c = sweep_config()
    c.output_dir = "runs/ablation_smollm2"
    # ReplaceMe selects by the residual rule (the package default), UIDL drop by angular distance.
    # Sized for a small CPU (the README table): 64 calibration passages of 256 tokens, perplexity on
    # 4 held-out windows of 1024 tokens, Avg-acc over PIQA and OpenBookQA (first 50 items each),
    # SLEB scoring 4 sequences for the 6 lowest-influence candidates per step.
    c.sweep.calibration_sizes = "64"
    c.sleb.num_sequences = 4
    c.sleb.max_candidates = 6
    c.eval.ppl_windows = 4
    c.eval.tasks = "piqa,openbookqa"
    c.eval.limit = 50
    if mode == "selection":
        # For n = 4..12: the cut chosen by angular, by residual, and the best of every cut on the
        # validation split (search), each evaluated on the held-out corpus.
        c.sweep.methods = "replaceme"
        c.sweep.solvers = "lstsq"
        c.sweep.selections = "angular,residual,search"
        c.sweep.drop_selections = ""
        c.sweep.num_blocks = "4,5,6,7,8,9,10,11,12"
        c.output_dir = "runs/selection_smollm2"
    elif mode == "small":
        # CI and notebooks: a few passages, one short window, no lm-eval tasks.
        c.pipeline.calibration.max_length = 64
        c.sweep.solvers = "lstsq,orth_diag"
        c.sweep.num_blocks = "2,4"
        c.sweep.calibration_sizes = "8"
        c.sleb.num_sequences = 4
        c.sleb.max_candidates = 3
        c.search.num_samples = 4
        c.eval.ppl_windows = 1
        c.eval.window = 128
        c.eval.tasks = ""
        c.output_dir = "runs/ablation_small"
    elif mode != "table":
        raise ReplaceMeError(f"unknown ablation config mode {mode!r}; use table, selection or small "
                             "(e.g. --config=configs/ablation_smollm2.py:small)")
    return c
