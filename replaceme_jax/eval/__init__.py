"""Evaluation: perplexity, an lm-evaluation-harness backend, offline task YAMLs, reports.

- ``perplexity.perplexity(model, tokenizer_or_ids, ...)``: windowed perplexity (held-out default);
  ``perplexity.HeldOutPerplexity(tokenizer, ...)(model)``: one corpus, tokenised once, for many models.
- ``lm_eval_backend.ReplaceMeJaxLM``: the harness backend, registered as ``replaceme-jax``.
- ``tasks``: offline task YAMLs (``rmj_*``), presets and a ``TaskManager`` helper.
- ``harness.evaluate_models``: several models x tasks + perplexity -> JSON, Markdown, PNG.

Modules that import lm-eval (backend, tasks' manager, harness) are imported on use, so
perplexity alone does not pay for the harness import.
"""
from replaceme_jax.eval.perplexity import (HeldOutPerplexity, PerplexityResult, corpus_windows, perplexity,
                                          tokenize_corpus)

__all__ = ["HeldOutPerplexity", "PerplexityResult", "corpus_windows", "perplexity", "tokenize_corpus"]
