"""Evaluate one or several models on the offline lm-evaluation-harness tasks + held-out perplexity.

Writes results.json, report.md (the paper's table: per-task metrics, Avg-acc, % of dense, LAMBADA
acc and ppl, held-out ppl; plus ARC/HellaSwag/MMLU) and tasks.png into --output_dir.

    python scripts/evaluate.py --models=smollm2-135m --tasks=paper --limit=100 --output_dir=runs/eval
    python scripts/evaluate.py --models=smollm2-135m,runs/prune/hf --names=dense,pruned \\
        --tasks=all --ppl_windows=64 --output_dir=runs/eval_pruned

Every scored request is kept in a cache on disk (--cache_dir) keyed by the model's weights and the
request's tokens: an interrupted run, rerun with the same flags, scores only what is missing, and a
full table can be built over several runs.

Models are registry names or paths (Hugging Face directory, .gguf file, Orbax checkpoint).
Tasks: presets paper (WinoGrande 5-shot; BoolQ, OpenBookQA, PIQA, SciQ, LAMBADA 0-shot), extra
(ARC-e, ARC-c, HellaSwag, MMLU), all, generative (GSM8K 5-shot, greedy KV-cache decoding), paper_with_race (RACE needs the Hugging Face hub), none
(held-out perplexity only), or a comma list of task names.
"""
from __future__ import annotations

from absl import flags

from replaceme_jax.cli import run_main
from replaceme_jax.errors import ReplaceMeError

_MODELS = flags.DEFINE_list("models", None, "Registry names or checkpoint paths, comma-separated.")
_NAMES = flags.DEFINE_list("names", None, "Display names, one per model (default: last path component).")
_DENSE = flags.DEFINE_string("dense", None, "Name of the reference model for '% of dense' (default: first).")
_TASKS = flags.DEFINE_string("tasks", "paper", "Preset (paper, extra, all, generative, paper_with_race, none) "
                             "or task list.")
_LIMIT = flags.DEFINE_integer("limit", None, "Score N documents of each task, drawn at random with --seed "
                               "(the same for every model; default: all).")
_SEED = flags.DEFINE_integer("seed", 1234, "Seed of the --limit draw.")
_CACHE = flags.DEFINE_string("cache_dir", None, "Per-request result cache, so an interrupted run resumes "
                             "(default: <REPLACEME_JAX_CACHE or ~/.cache/replaceme_jax>/eval_requests; "
                             "'' for none).")
_HELDOUT = flags.DEFINE_boolean("heldout_ppl", True, "Also score held-out Wikipedia perplexity.")
_PPL_WINDOWS = flags.DEFINE_integer("ppl_windows", None, "Held-out perplexity: number of windows (default: all).")
_PPL_WINDOW = flags.DEFINE_integer("ppl_window", 1024, "Held-out perplexity: tokens per window.")
_PPL_STRIDE = flags.DEFINE_integer("ppl_stride", None, "Held-out perplexity: sliding stride (default: non-overlapping).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Most rows per forward pass.")
_BATCH_TOKENS = flags.DEFINE_integer("max_batch_tokens", 4096, "Most rows x padded length per forward pass.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Context window in tokens (default: the model's).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Directory for results.json, report.md, tasks.png.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace an existing non-empty --output_dir.")
flags.mark_flags_as_required(["models", "output_dir"])


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}; pass everything as --flags")
    models = _MODELS.value
    names = _NAMES.value or [m.rstrip("/").split("/")[-1] for m in models]
    if len(names) != len(models):
        raise ReplaceMeError(f"--names has {len(names)} entries for {len(models)} --models; give one name per model")
    import datasets

    from replaceme_jax.eval.harness import evaluate_models
    from replaceme_jax.eval.report import format_report

    from replaceme_jax.data.cache import cache_dir

    datasets.disable_progress_bars()
    cache = cache_dir() / "eval_requests" if _CACHE.value is None else (_CACHE.value or None)
    results = evaluate_models(
        list(zip(names, models)), tasks=_TASKS.value, limit=_LIMIT.value, heldout_ppl=_HELDOUT.value,
        ppl_windows=_PPL_WINDOWS.value, ppl_window=_PPL_WINDOW.value, ppl_stride=_PPL_STRIDE.value,
        dense=_DENSE.value, batch_size=_BATCH.value, max_batch_tokens=_BATCH_TOKENS.value,
        max_length=_MAX_LENGTH.value, seed=_SEED.value, cache_dir=cache, output_dir=_OUTPUT.value,
        overwrite=_OVERWRITE.value)
    print(format_report(results))
    print(f"outputs: {_OUTPUT.value} (results.json, report.md, tasks.png)")
    return 0


if __name__ == "__main__":
    run_main(main)
