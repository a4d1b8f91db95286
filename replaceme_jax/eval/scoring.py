"""Log-likelihoods of continuations, packed so that compute goes to the tokens that are scored.

Perplexity, ``loglikelihood`` and ``loglikelihood_rolling`` all ask: given a context, what
log-probability does the model give each token of a continuation? :class:`TokenScorer` answers it
for many (context, continuation) pairs at once, spending little on what is not needed:

* **Shared contexts run once.** Pairs with the same context form one *item*: the context followed
  by every continuation (without its last token, which is only predicted). Each continuation
  attends to the context and to itself, never to a sibling, and its RoPE positions continue after
  the context, so every score equals the one of its own row ``context + continuation``. A
  multiple-choice question with four answers runs its context once, not four times.
* **Several items per row.** Items are packed best-fit into rows of a few widths (powers of two),
  kept apart by the same segment mask the calibration rows use; a small item fills the room a long
  one leaves. Padding is a small fraction of the positions, and the number of compiled shapes is
  bounded by ``len(buckets) * log2(max_batch_size)`` whatever the workload.
* **The LM head only where a token is scored.** The blocks run over whole rows; the final norm,
  the vocabulary projection and the log-softmax run on the scored positions only (gathered into a
  power-of-two bucket), which on a 49k vocabulary is a fifth of a small model's FLOPs per token.

Logits come out in float32 whatever the parameter dtype; per-request sums are float64.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.modeling import layer_windows, rope_cos_sin

_MASK_VALUE = float(np.finfo(np.float32).min)
MIN_SCORED_BUCKET = 64  # smallest padded count of scored positions per batch
# Narrowest default row: short items are packed together, so narrow rows would only add
# compiled shapes (each a full compilation of the model) without saving positions.
MIN_ROW_WIDTH = 256


def power_of_two_buckets(max_length: int, min_bucket: int = 16) -> tuple[int, ...]:
    """min_bucket, 2*min_bucket, ... up to max_length (always included as the last bucket)."""
    if max_length < 2:
        raise ReplaceMeError(f"max_length must be at least 2 tokens, got {max_length}")
    out, b = [], min(min_bucket, max_length)
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(max_length)
    return tuple(out)


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def tree_attention_bias(segments, branches, positions, window: int | None = None):
    """Additive bias [B, T, T] for packed items with branches.

    A query sees earlier keys of its own segment (item) that are either shared context
    (branch 0) or on its own branch; ``window`` limits the RoPE distance as a sliding window does.
    Padding (segment 0) sees nothing; its outputs are never read.
    """
    t = segments.shape[-1]
    idx = jnp.arange(t)
    allowed = idx[None, :] <= idx[:, None]
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    br_q, br_k = branches[:, :, None], branches[:, None, :]
    allowed = allowed[None] & (seg_k == seg_q) & (seg_k > 0) & ((br_k == 0) | (br_k == br_q))
    if window is not None:
        allowed = allowed & (positions[:, :, None] - positions[:, None, :] < window)
    return jnp.where(allowed, 0.0, _MASK_VALUE).astype(jnp.float32)


# The graph definition is static: models of one architecture (e.g. every pruned model with the
# same cuts) share compiled executables across scorers and calls.
@functools.partial(jax.jit, static_argnums=0)
def _hidden_states(graphdef, state, ids, segments, branches, positions):
    """Last block's output [B, T, d] of packed rows (before the final norm)."""
    model = nnx.merge(graphdef, state)
    cos, sin = rope_cos_sin(model.config, positions)
    windows = layer_windows(model.config)
    biases = {w: tree_attention_bias(segments, branches, positions, w) for w in set(windows)}
    h = model.embed(ids)
    for *_, h in model.blocks(h, cos, sin, [biases[w] for w in windows]):
        pass
    return h


@functools.partial(jax.jit, static_argnums=0)
def _scored_logprobs(graphdef, state, hidden, flat_index, targets):
    """log p(target) and whether it is the argmax, at flat positions of ``hidden`` [B, T, d]."""
    model = nnx.merge(graphdef, state)
    h = hidden.reshape(-1, hidden.shape[-1])[flat_index]
    logits = model.head(h)                                       # [P, V] float32
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


@dataclasses.dataclass
class _Item:
    """One context and the continuations that share it, laid out as model input."""
    tokens: list[int]
    positions: list[int]
    branches: list[int]
    score_at: list[int]   # offsets (within the item) whose output predicts ...
    targets: list[int]    # ... these tokens,
    owners: list[int]     # ... which belong to these pairs.


def _build_items(pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                 max_width: int) -> tuple[list[_Item], list[tuple[int, int]]]:
    """Items of the distinct pairs, and (duplicate, original) pair indices of the repeated ones."""
    by_context: dict[tuple[int, ...], dict[tuple[int, ...], int]] = {}
    duplicates = []
    for k, (ctx, cont) in enumerate(pairs):
        conts = by_context.setdefault(tuple(ctx), {})
        first = conts.setdefault(tuple(cont), k)
        if first != k:
            duplicates.append((k, first))
    items = []
    for ctx, conts in by_context.items():
        n, item, fed_branches = len(ctx), None, 0
        for cont, owner in conts.items():
            extra = len(cont) - 1  # the last token is only predicted, never fed
            if item is None or len(item.tokens) + extra > max_width:
                item, fed_branches = _Item(list(ctx), list(range(n)), [0] * n, [], [], []), 0
                items.append(item)
            if extra:
                fed_branches += 1
            start = len(item.tokens)
            item.tokens += cont[:-1]
            item.positions += range(n, n + extra)
            item.branches += [fed_branches] * extra
            item.score_at += [n - 1, *range(start, start + extra)]
            item.targets += cont
            item.owners += [owner] * len(cont)
    return items, duplicates


@dataclasses.dataclass
class _Row:
    width: int
    used: int = 0
    items: list[_Item] = dataclasses.field(default_factory=list)


class TokenScorer:
    """Scores continuations with a ``CausalLM`` (a snapshot of its weights taken at construction).

    Args:
      model: the NNX ``CausalLM``.
      max_length: longest model input (context + continuation minus one token) accepted; callers
        truncate before scoring.
      max_batch_tokens: rows x row width per forward pass (bounds activation memory).
      max_batch_size: cap on rows per forward pass.
      buckets: row widths; default powers of two from ``MIN_ROW_WIDTH`` up to ``max_length``.
    """

    def __init__(self, model, *, max_length: int, max_batch_tokens: int = 4096,
                 max_batch_size: int = 64, buckets: Sequence[int] | None = None):
        if max_batch_tokens < 1 or max_batch_size < 1:
            raise ReplaceMeError(f"max_batch_tokens and max_batch_size must be positive, got "
                                 f"{max_batch_tokens} and {max_batch_size}")
        self.max_length = int(max_length)
        self.buckets = (tuple(sorted(buckets)) if buckets
                        else power_of_two_buckets(self.max_length, MIN_ROW_WIDTH))
        if self.buckets[-1] < self.max_length:
            raise ReplaceMeError(f"largest bucket {self.buckets[-1]} is shorter than max_length "
                                 f"{self.max_length}")
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = int(max_batch_size)
        self.shapes: set[tuple[int, int]] = set()  # (rows, width) batches run so far
        self.positions_run = 0     # row positions computed (padding included) ...
        self.tokens_fed = 0        # ... of which real tokens
        self._graphdef, self._state = nnx.split(model)

    def bucket_for(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise ReplaceMeError(f"a row of {length} tokens exceeds max_length {self.max_length}")

    def batch_size_for(self, bucket: int) -> int:
        return max(1, min(self.max_batch_size, self.max_batch_tokens // bucket))

    # ------------------------------------------------------------------ packing
    def _pack(self, items: list[_Item]) -> list[_Row]:
        """Best fit, longest first: each item goes to the open row it fills most tightly."""
        rows: list[_Row] = []
        free: list[tuple[int, int]] = []  # (room left, row index), sorted
        for item in sorted(items, key=lambda it: -len(it.tokens)):
            n = len(item.tokens)
            at = bisect.bisect_left(free, (n, -1))
            if at < len(free):
                room, r = free.pop(at)
            else:
                r = len(rows)
                rows.append(_Row(self.bucket_for(n)))
                room = rows[r].width
            rows[r].items.append(item)
            rows[r].used += n
            if room - n > 0:
                bisect.insort(free, (room - n, r))
        return rows

    def _batches(self, rows: list[_Row]) -> Iterator[list[_Row]]:
        by_width: dict[int, list[_Row]] = {}
        for row in rows:
            by_width.setdefault(row.width, []).append(row)
        for width in sorted(by_width, reverse=True):  # the largest activations first
            members, full = by_width[width], self.batch_size_for(width)
            for start in range(0, len(members), full):
                yield members[start:start + full]

    def _run(self, batch: list[_Row]):
        width, full = batch[0].width, self.batch_size_for(batch[0].width)
        n_rows = full if len(batch) == full else min(full, _pow2_at_least(len(batch)))
        ids = np.zeros((n_rows, width), np.int32)
        seg = np.zeros((n_rows, width), np.int32)
        branch = np.zeros((n_rows, width), np.int32)
        pos = np.zeros((n_rows, width), np.int32)
        flat, targets, owners = [], [], []
        for r, row in enumerate(batch):
            at = 0
            for s, item in enumerate(row.items, start=1):
                n = len(item.tokens)
                ids[r, at:at + n] = item.tokens
                seg[r, at:at + n] = s
                branch[r, at:at + n] = item.branches
                pos[r, at:at + n] = item.positions
                flat += [r * width + at + o for o in item.score_at]
                targets += item.targets
                owners += item.owners
                at += n
            self.tokens_fed += at
        self.shapes.add(ids.shape)
        self.positions_run += ids.size
        hidden = _hidden_states(self._graphdef, self._state, jnp.asarray(ids), jnp.asarray(seg),
                                jnp.asarray(branch), jnp.asarray(pos))
        p = _pow2_at_least(len(flat), MIN_SCORED_BUCKET)
        flat_a = np.zeros(p, np.int32)
        flat_a[:len(flat)] = flat
        tgt_a = np.zeros(p, np.int32)
        tgt_a[:len(targets)] = targets
        logprob, greedy = _scored_logprobs(self._graphdef, self._state, hidden, jnp.asarray(flat_a),
                                           jnp.asarray(tgt_a))
        k = len(flat)
        return np.asarray(owners, np.int64), np.asarray(logprob)[:k], np.asarray(greedy)[:k]

    # ------------------------------------------------------------------ public
    def score_pairs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                    progress: str | None = None, on_done=None) -> tuple[np.ndarray, np.ndarray]:
        """(log p(continuation | context) in float64, continuation is greedy) per pair.

        Every context and continuation must be non-empty and ``len(context) + len(continuation)
        - 1 <= max_length``. ``on_done(indices, logprobs, greedy)`` is called as soon as pairs
        are complete (e.g. to cache them), batch by batch.
        """
        for ctx, cont in pairs:
            if len(ctx) < 1 or len(cont) < 1:
                raise ReplaceMeError("cannot score an empty context or continuation")
            if len(ctx) + len(cont) - 1 > self.max_length:
                raise ReplaceMeError(f"a model input of {len(ctx) + len(cont) - 1} tokens exceeds "
                                     f"max_length {self.max_length}; truncate the context first")
        logprob = np.zeros(len(pairs), np.float64)
        greedy = np.ones(len(pairs), bool)
        if not pairs:
            return logprob, greedy
        items, duplicates = _build_items(pairs, self.buckets[-1])
        remaining = np.zeros(len(pairs), np.int64)
        for item in items:
            np.add.at(remaining, np.asarray(item.owners, np.int64), 1)
        bar = None
        if progress is not None:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(pairs), desc=progress, leave=False)
        for batch in self._batches(self._pack(items)):
            owners, lp, gr = self._run(batch)
            np.add.at(logprob, owners, lp.astype(np.float64))
            np.logical_and.at(greedy, owners, gr)
            np.add.at(remaining, owners, -1)
            done = np.unique(owners[remaining[owners] == 0])
            if on_done is not None and done.size:
                on_done(done, logprob[done], greedy[done])
            if bar is not None:
                bar.update(int(done.size))
        for dup, first in duplicates:
            logprob[dup], greedy[dup] = logprob[first], greedy[first]
        if on_done is not None and duplicates:
            dups = np.asarray([d for d, _ in duplicates])
            on_done(dups, logprob[dups], greedy[dups])
        if bar is not None:
            bar.close()
        return logprob, greedy
