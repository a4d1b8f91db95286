"""Calibration text, held-out corpora and static-shape batching."""
from replaceme_jax.data.batching import (MAX_SEGMENTS, Batch, count_shapes, default_buckets, make_batches,
                                         segment_lengths, stream_token_rows, tokenize_texts)
from replaceme_jax.data.calibration import load_calibration_texts, normalize_messages, render_chat
from replaceme_jax.data.corpora import heldout_titles, heldout_wikipedia_articles, heldout_wikipedia_texts

__all__ = [
    "MAX_SEGMENTS", "Batch", "count_shapes", "default_buckets", "make_batches", "segment_lengths",
    "stream_token_rows", "tokenize_texts",
    "load_calibration_texts", "normalize_messages", "render_chat",
    "heldout_titles", "heldout_wikipedia_articles", "heldout_wikipedia_texts",
]
