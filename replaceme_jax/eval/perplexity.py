"""Perplexity of a model on a token stream: non-overlapping or sliding windows, jitted and batched.

The corpus is tokenised once (texts joined by a separator, no special tokens) and cut into
windows of ``window`` tokens. With ``stride=None`` (or ``stride == window``) windows do not
overlap and each scores its own tokens after the first, which has no context. With
``stride < window`` windows slide: each new window scores only the tokens the previous ones did
not reach, with up to ``window - stride`` tokens of extra context (the Hugging Face recipe), so
every token after the first is scored exactly once. Scores of all windows are summed in float64.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from replaceme_jax.data.batching import TEXT_SEPARATOR, encode_stream
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.eval.bootstrap import paired_means
from replaceme_jax.eval.scoring import TokenScorer

DEFAULT_WINDOW = 1024
DEFAULT_SEPARATOR = TEXT_SEPARATOR


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    ppl: float           # exp(nll)
    nll: float           # mean negative log-likelihood per scored token, in nats
    num_tokens: int      # scored tokens
    num_windows: int
    window: int
    stride: int
    corpus_tokens: int   # tokens in the whole stream (before any window limit)
    # Per window, in order: summed negative log-likelihood (nats) and scored tokens, so two models
    # scored on the same windows can be compared window by window (``paired_ratio``).
    window_nll: tuple[float, ...] = ()
    window_tokens: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["window_nll"], d["window_tokens"] = list(self.window_nll), list(self.window_tokens)
        return d


def paired_ratio(reference, other, *, iters: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """``other``'s perplexity over ``reference``'s on the same windows, with a paired bootstrap interval.

    Both are ``PerplexityResult`` or their ``to_dict()``. Windows are resampled with replacement, the
    same draw for both models; each draw's ratio is exp((NLL_other - NLL_ref) / tokens) over the drawn
    windows. Percentile interval; ``seed`` makes it reproducible from the saved per-window values."""
    def fields(r):
        r = r.to_dict() if hasattr(r, "to_dict") else r
        return (np.asarray(r.get("window_nll", ()), np.float64), np.asarray(r.get("window_tokens", ()), np.float64),
                (r.get("window"), r.get("stride"), r.get("num_windows")))
    a, n, shape_a = fields(reference)
    b, m, shape_b = fields(other)
    if a.size < 2 or a.size != b.size or shape_a != shape_b or not np.array_equal(n, m):
        raise ReplaceMeError(
            "paired_ratio needs two results scored on the same windows (same corpus, window, stride and count) "
            f"with per-window values; got {a.size} and {b.size} windows of {shape_a} and {shape_b}. Fix: score "
            "both models in one score_heldout.py run, or with the same --ppl_windows / --ppl_window")
    # Ratio of sums over the drawn windows = ratio of their means (the same count of windows).
    boot_a, boot_b, boot_n = paired_means(np.random.default_rng(seed), (a, b, n), iters, chunk=1000)
    ratios = np.exp((boot_b - boot_a) / boot_n)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {"ratio": float(np.exp((b.sum() - a.sum()) / n.sum())), "windows": int(a.size),
            "ci": [float(np.percentile(ratios, lo)), float(np.percentile(ratios, hi))],
            "level": level, "iters": iters, "seed": seed}


def corpus_windows(num_tokens: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window over a stream of ``num_tokens`` tokens.

    Window ``[begin, end)`` scores tokens ``first_scored .. end-1``, each predicted from the
    window's tokens before it.
    """
    stride = window if stride is None else stride
    if window < 2:
        raise ReplaceMeError(f"perplexity window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ReplaceMeError(f"perplexity stride must be in [1, window={window}], got {stride}")
    if num_tokens < 2:
        raise ReplaceMeError(f"the corpus has {num_tokens} token(s); perplexity needs at least 2")
    out, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + window, num_tokens)
        first = max(prev_end, begin + 1)
        if end > first:
            out.append((begin, end, first))
        prev_end = end
        if end == num_tokens:
            return out
        begin += stride


def tokenize_corpus(tokenizer, texts: Sequence[str], separator: str = DEFAULT_SEPARATOR) -> np.ndarray:
    """Token ids of the texts joined by ``separator``, without special tokens."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not any(t.strip() for t in texts):
        raise ReplaceMeError("the perplexity corpus is empty; give at least one non-empty text")
    return encode_stream(tokenizer, texts, separator)


def perplexity(model, tokenizer_or_token_ids, texts: Sequence[str] | None = None, *,
               window: int = DEFAULT_WINDOW, stride: int | None = None, batch_size: int = 4,
               max_windows: int | None = None, separator: str = DEFAULT_SEPARATOR,
               progress: str | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on a corpus.

    Args:
      model: a ``CausalLM`` (dense, pruned, or loaded from HF / GGUF / Orbax).
      tokenizer_or_token_ids: a tokenizer (then ``texts`` are tokenised; default texts: the
        held-out Wikipedia corpus of ``replaceme_jax.data.corpora``), or a 1-D sequence of ids.
      window: tokens per window (capped at the stream length).
      stride: None for non-overlapping windows, else the sliding step (1..window).
      batch_size: windows per forward pass.
      max_windows: score only the first this-many windows (None: all).
      progress: a label to draw a progress bar of finished batches under (None: no bar).
    """
    if max_windows is not None and max_windows < 1:
        raise ReplaceMeError(f"max_windows must be at least 1 (or None for all), got {max_windows}")
    if batch_size < 1:
        raise ReplaceMeError(f"batch_size must be at least 1, got {batch_size}")
    if hasattr(tokenizer_or_token_ids, "encode"):
        if texts is None:
            from replaceme_jax.data.corpora import heldout_wikipedia_texts
            texts = heldout_wikipedia_texts()
        ids = tokenize_corpus(tokenizer_or_token_ids, texts, separator)
    else:
        if texts is not None:
            raise ReplaceMeError("texts were given together with token ids; pass a tokenizer to "
                                 "tokenise texts, or the token ids alone")
        ids = np.asarray(tokenizer_or_token_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ReplaceMeError(f"token ids must be a 1-D integer sequence, got shape {ids.shape} "
                                 f"dtype {ids.dtype}")
        ids = ids.astype(np.int32)
    vocab = model.config.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ReplaceMeError(f"token ids must lie in [0, {vocab}) for this model; got range "
                             f"[{ids.min()}, {ids.max()}]. Fix: use the model's own tokenizer")
    if ids.size >= 2 and window > ids.size:  # a corpus shorter than one window is one window
        window = int(ids.size)
        stride = None if stride is None else min(stride, window)
    spans = corpus_windows(int(ids.size), window, stride)
    if max_windows is not None:
        spans = spans[:max_windows]
    scorer = TokenScorer(model, max_length=window, max_batch_tokens=batch_size * window,
                         max_batch_size=batch_size, buckets=(window,))
    logprob, _ = scorer.score_pairs([(ids[b:first], ids[first:e]) for b, e, first in spans], progress=progress)
    total = -float(np.sum(logprob))
    count = sum(e - first for _, e, first in spans)
    nll = total / count
    if not math.isfinite(nll):  # a report line "nan (nanx dense)" with exit 0 hides a broken model
        bad = int(np.sum(~np.isfinite(logprob)))
        raise ReplaceMeError(f"perplexity is not finite: {bad} of {len(spans)} windows scored NaN/inf log-likelihoods; "
                             "the model's weights or a folded transform are broken (check them with "
                             "replaceme_jax.checkpoints.finite.non_finite_parameters), or float16 overflowed: "
                             "use dtype=float32")
    return PerplexityResult(ppl=math.exp(nll), nll=nll, num_tokens=count, num_windows=len(spans),
                            window=window, stride=window if stride is None else stride,
                            corpus_tokens=int(ids.size), window_nll=tuple(float(-x) for x in logprob),
                            window_tokens=tuple(int(e - first) for _, e, first in spans))


class HeldOutPerplexity:
    """Perplexity of any number of models on one held-out corpus, tokenised once.

    The one evaluator behind the main job's report, the ablation sweep, the quality study, the
    benchmarks and ``scripts/evaluate.py``; pruned models share the dense model's tokenizer, so
    they are scored on exactly the same token windows. ``texts``: default the held-out Wikipedia
    corpus (``data.corpora.heldout_wikipedia_texts``); the other arguments as in ``perplexity``.
    """

    def __init__(self, tokenizer, texts: Sequence[str] | None = None, *, window: int = DEFAULT_WINDOW,
                 stride: int | None = None, max_windows: int | None = None, batch_size: int = 4,
                 separator: str = DEFAULT_SEPARATOR):
        if texts is None:
            from replaceme_jax.data.corpora import heldout_wikipedia_texts
            texts = heldout_wikipedia_texts()
        self.token_ids = tokenize_corpus(tokenizer, texts, separator)
        self.window, self.stride, self.max_windows, self.batch_size = window, stride, max_windows, batch_size

    def __call__(self, model, progress: str | None = None) -> PerplexityResult:
        return perplexity(model, self.token_ids, window=self.window, stride=self.stride,
                          batch_size=self.batch_size, max_windows=self.max_windows, progress=progress)


GENRES = ("wikipedia", "fiction", "science")  # held-out genres, the studies' default two first


def held_out_genres(tokenizer, max_windows: int | None = None, window: int = DEFAULT_WINDOW,
                    genres=GENRES[:2]) -> dict:
    """Held-out genres never used for calibration, selection or healing, each a
    ``HeldOutPerplexity`` by name: the Wikipedia excerpt and LAMBADA-OpenAI fiction (the studies'
    two), and SciQ's science support paragraphs on request."""
    from replaceme_jax.data.corpora import heldout_fiction_texts, heldout_science_texts, heldout_wikipedia_texts
    unknown = [g for g in genres if g not in GENRES]
    if unknown or not genres:
        raise ReplaceMeError(f"unknown held-out genre(s) {unknown or list(genres)}; fix: choose from "
                             f"{', '.join(GENRES)}")
    texts = {"wikipedia": heldout_wikipedia_texts, "fiction": heldout_fiction_texts, "science": heldout_science_texts}
    return {g: HeldOutPerplexity(tokenizer, texts[g](), window=window, max_windows=max_windows) for g in genres}
