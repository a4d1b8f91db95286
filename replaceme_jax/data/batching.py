"""Tokenisation and static-shape batches.

A jitted forward pass recompiles for every new input shape. Sequences are therefore grouped
by length and padded to the smallest of a few bucket lengths (half-octaves up to max_length),
and every batch has exactly ``batch_size`` rows (the last batch is filled with all-padding rows,
mask 0). The number of distinct shapes is at most the number of buckets, whatever the data.

With ``pack=True`` several sequences share a row (best-fit decreasing): the mask then numbers
them 1, 2, ... and the model keeps them apart (``modeling.attention_bias``, per-segment RoPE
positions), so a statistics pass computes exactly what it would on padded rows, on far fewer
positions. Only passes that treat every real token alike (not the official pad-counting mode)
should be fed packed batches.
"""
from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from replaceme_jax.errors import ReplaceMeError

MIN_TOKENS = 2  # a sequence needs a next-token target to say anything about the model
MAX_SEGMENTS = 16  # sequences per packed row: consumers reserve this many last-token slots per row
TEXT_SEPARATOR = "\n\n"  # joins texts into one stream: held-out corpora and the stream calibration layout
_SMALLEST_DEFAULT_BUCKET = 64


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
    """``input_ids`` / ``attention_mask``: int32 [B, T]; mask 0 = padding, k > 0 = token of the
    row's k-th sequence (1 everywhere when rows are not packed)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    num_tokens: int  # real (unmasked) tokens
    num_sequences: int  # sequences held (one per non-empty row unless packed)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


def tokenize_texts(texts, tokenizer, max_length: int, add_bos: bool = True) -> list[np.ndarray]:
    """Token ids (int32) per text, truncated to ``max_length``; empty results are skipped.

    Texts are encoded without the tokenizer's own special tokens; BOS is then prepended when
    ``add_bos`` and the text does not already start with it (a chat-rendered text usually
    does), so BOS is never doubled whatever the tokenizer's defaults.
    """
    texts = _nonempty_texts(texts, tokenizer, max_length, "tokenize_texts")
    if not texts:
        return []
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = []
    for ids in encoded:
        if not ids:
            continue
        if bos is not None and ids[0] != bos:
            ids = [bos, *ids]
        out.append(np.asarray(ids[:max_length], dtype=np.int32))
    return out


def encode_stream(tokenizer, texts, separator: str = TEXT_SEPARATOR) -> np.ndarray:
    """Token ids (int32) of the texts joined by ``separator``, without special tokens."""
    return np.asarray(tokenizer.encode(separator.join(texts), add_special_tokens=False), np.int32)


def stream_token_rows(texts, tokenizer, max_length: int, add_bos: bool = False,
                      separator: str = TEXT_SEPARATOR) -> list[np.ndarray]:
    """Texts joined by ``separator`` into one token stream, cut into rows of ``max_length`` tokens.

    The layout of held-out perplexity windows (``eval.perplexity``) and of pre-training: every row is
    full, so calibration covers every position up to ``max_length`` instead of each passage's own
    short span. With ``add_bos`` each row starts with BOS (one stream token fewer per row). A last
    piece shorter than ``MIN_TOKENS`` is dropped.
    """
    texts = _nonempty_texts(texts, tokenizer, max_length, "stream_token_rows")
    if not texts:
        return []
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    stream = encode_stream(tokenizer, texts, separator)
    step = max_length - (bos is not None)
    if step < 1:
        raise ReplaceMeError(f"max_length={max_length} leaves no room after BOS; fix: max_length >= 2")
    rows = [stream[i:i + step] for i in range(0, stream.size, step)]
    if bos is not None:
        rows = [np.concatenate([np.asarray([bos], np.int32), r]) for r in rows]
    return [r for r in rows if r.size >= MIN_TOKENS]


def default_buckets(max_length: int, longest: int | None = None) -> tuple[int, ...]:
    """Lengths p and 1.5 p for powers of two p from 64 (or the next power of two >= ``longest`` if
    that is smaller) below ``max_length``, then ``max_length`` itself.

    Half-octave steps waste less padding than powers of two alone for one more compiled shape per
    octave: with ``make_batches``' filling, 256 BoolQ passages <= 512 tokens (33,392 tokens) run as
    41,984 positions instead of 51,712 (powers of two, one partly empty batch per bucket)."""
    _check_positive_int(max_length, "max_length")
    lo = _SMALLEST_DEFAULT_BUCKET
    if longest is not None and longest < lo:
        lo = max(MIN_TOKENS, 1 << (int(longest) - 1).bit_length())
    buckets, b = [], lo
    while b < max_length:
        buckets.append(b)
        if b >= 16 and b * 3 // 2 < max_length:
            buckets.append(b * 3 // 2)
        b *= 2
    return (*buckets, max_length)


def make_batches(token_lists, *, batch_size: int, max_length: int, buckets=None, pad_id: int = 0,
                 padding_side: str = "right", pack: bool = False, shrink_last: bool = True) -> list[Batch]:
    """Static-shape padded batches, longest first.

    Sequences longer than ``max_length`` are truncated; sequences shorter than 2 tokens are
    dropped. Sequences are ordered longest first (ties in input order, so the output is
    deterministic) and cut into batches of ``batch_size``; each batch is padded to the smallest
    bucket that holds its longest sequence. ``buckets`` (lengths <= max_length) always gets
    ``max_length`` added. ``pack``: rows of up to ``max_length`` tokens hold up to
    ``MAX_SEGMENTS`` sequences each (right padding only).

    Only the last batch can be partly empty; ``shrink_last`` cuts its rows to the next power of
    two that holds them (at most ``batch_size``), so it does not compute empty rows, and there are
    at most ``log2(batch_size)`` more shapes than buckets (in practice one; powers of two keep the
    shapes shared across calibration sizes). A sharded pass pads such a batch back to a
    multiple of its batch ways (``ShardingPlan.put_batch``).
    """
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(max_length, "max_length")
    if padding_side not in ("right", "left"):
        raise ReplaceMeError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
        raise ReplaceMeError(f"pad_id must be a non-negative token id, got {pad_id!r}")

    seqs = [np.asarray(s, dtype=np.int32).reshape(-1)[:max_length] for s in token_lists]
    seqs = [s for s in seqs if s.size >= MIN_TOKENS]
    if not seqs:
        raise ReplaceMeError(
            f"calibration data too short: no sequence has at least {MIN_TOKENS} tokens after "
            f"tokenisation (max_length={max_length}); fix: use longer texts or a larger max_length")
    longest = max(s.size for s in seqs)
    bucket_lengths = _resolve_buckets(buckets, max_length, longest)

    # Longest first (memory limits show at once); filling every batch before choosing its length
    # leaves one partly empty batch instead of one per bucket.
    ordered = sorted(seqs, key=lambda s: -s.size)  # stable: ties keep input order
    if pack:
        if padding_side != "right":
            raise ReplaceMeError("packed batches are right-padded; fix: pack=False for left padding")
        rows = _pack_rows(ordered, max_length)
    else:
        rows = [[s] for s in ordered]
    batches = []
    for start in range(0, len(rows), batch_size):
        group = rows[start:start + batch_size]
        longest_row = max(sum(s.size for s in row) for row in group)
        length = next(b for b in bucket_lengths if b >= longest_row)
        rows_here = min(batch_size, 1 << (len(group) - 1).bit_length()) if shrink_last else batch_size
        batches.append(_pad(group, rows_here, length, pad_id, padding_side))
    return batches


def _pack_rows(ordered, capacity: int) -> list[list[np.ndarray]]:
    """Best-fit decreasing: each sequence (longest first) goes to the open row it fills best.

    Rows come back fullest first. Deterministic: ties go to the row opened first."""
    rows: list[list[np.ndarray]] = []
    free: list[tuple[int, int]] = []  # (room left, row index) of rows that can take a sequence
    for seq in ordered:
        i = bisect.bisect_left(free, (seq.size, -1))
        if i == len(free):
            rows.append([seq])
            room, r = capacity - seq.size, len(rows) - 1
        else:
            room, r = free.pop(i)
            rows[r].append(seq)
            room -= seq.size
        if room >= MIN_TOKENS and len(rows[r]) < MAX_SEGMENTS:
            bisect.insort(free, (room, r))
    used = [sum(s.size for s in row) for row in rows]
    return [rows[i] for i in sorted(range(len(rows)), key=lambda i: -used[i])]


def count_shapes(batches) -> int:
    """Number of distinct (B, T) shapes, i.e. how many times a jitted pass compiles."""
    return len({tuple(b.input_ids.shape) for b in batches})


def _resolve_buckets(buckets, max_length: int, longest: int) -> tuple[int, ...]:
    if buckets is None:
        return default_buckets(max_length, longest)
    try:
        lengths = sorted({int(b) for b in buckets})
    except (TypeError, ValueError) as e:
        raise ReplaceMeError(f"buckets must be a list of positive lengths, got {buckets!r}") from e
    if any(b < 1 or b > max_length for b in lengths):
        raise ReplaceMeError(f"bucket lengths must lie in [1, max_length={max_length}], got {lengths}; "
                             "fix: drop the out-of-range lengths")
    if not lengths or lengths[-1] != max_length:
        lengths.append(max_length)
    return tuple(lengths)


def _pad(rows, batch_size, length, pad_id, padding_side) -> Batch:
    """``rows``: per row, the sequences it holds (one unless packed), numbered 1, 2, ... in the mask."""
    ids = np.full((batch_size, length), pad_id, dtype=np.int32)
    mask = np.zeros((batch_size, length), dtype=np.int32)
    for r, row in enumerate(rows):
        used = sum(s.size for s in row)
        col = 0 if padding_side == "right" else length - used
        for k, s in enumerate(row, start=1):
            ids[r, col:col + s.size] = s
            mask[r, col:col + s.size] = k
            col += s.size
    return Batch(input_ids=ids, attention_mask=mask, num_tokens=int((mask > 0).sum()),
                 num_sequences=sum(len(row) for row in rows))


def sequences(batch) -> list[np.ndarray]:
    """The token ids of every sequence in ``batch`` (packed or not), row by row."""
    out = []
    for ids, mask in zip(np.asarray(batch.input_ids), np.asarray(batch.attention_mask)):
        out.extend(ids[mask == k] for k in range(1, int(mask.max(initial=0)) + 1))
    return [s for s in out if s.size]


def segment_lengths(batch) -> list[int]:
    """Length of every sequence in ``batch`` (packed or not), row by row."""
    return [s.size for s in sequences(batch)]


def _nonempty_texts(texts, tokenizer, max_length: int, caller: str) -> list[str]:
    """The non-blank strings of ``texts``, after checking the arguments every tokenising entry point takes."""
    if tokenizer is None:
        raise ReplaceMeError(f"{caller} needs a tokenizer; fix: pass the model's tokenizer")
    _check_positive_int(max_length, "max_length")
    if isinstance(texts, str):
        raise ReplaceMeError(f"{caller} takes a list of texts, got a single string; fix: wrap it in a list")
    return [t for t in texts if isinstance(t, str) and t.strip()]


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ReplaceMeError(f"{name} must be a positive integer, got {value!r}")
