"""Log-likelihoods of continuations, packed so that compute goes to the tokens that are scored.

Perplexity, ``loglikelihood`` and ``loglikelihood_rolling`` all ask: given a context, what
log-probability does the model give each token of a continuation? :class:`TokenScorer` answers it
for many (context, continuation) pairs at once, spending little on what is not needed:

* **Shared prefixes run once.** A pair's model input is its context followed by its continuation
  without the last token (which is only predicted). Inputs that share a prefix form one *item*, a
  prefix tree laid out depth first: each distinct prefix is fed once, each token attends to its
  ancestors only, and its RoPE position is its depth, so every score equals the one of its own row
  ``context + continuation``. A multiple-choice question runs its context once, not once per
  answer; WinoGrande's two options share their few-shot examples and sentence start; PIQA's two
  solutions share the words they begin with.
* **Several items per row.** Items are packed best-fit, longest first, into rows kept apart by
  the tree mask; the row width comes from a ladder of multiples of the attention chunk (1.33-1.5x
  apart), picked per workload by a cost model (positions run, padding included, plus the keys each
  query reads), so 150-token items do not sit in 256-token rows. A query chunk of a wide row
  reads only the keys its batch's longest item can span (``modeling.SpanBias``), not every key
  before it. The number of compiled shapes is bounded by ``len(buckets)² * log2(max_batch_size)``
  whatever the workload (row width x key span x rows).
* **The LM head only where a token is scored.** The blocks run over whole rows; the final norm,
  the vocabulary projection and the log-softmax run on the scored positions only, in steps of
  ``HEAD_CHUNK`` rows, which on a 49k vocabulary is a fifth of a small model's FLOPs per token.

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
from replaceme_jax.models.modeling import ATTENTION_CHUNK, SpanBias, layer_windows, parameter_count, rope_cos_sin

_MASK_VALUE = float(np.finfo(np.float32).min)
MIN_SCORED_BUCKET = 64  # smallest padded count of scored positions per batch
# Scored positions per step of the LM head: bounds the [P, vocab] logits; 128 rows of a 49k
# vocabulary (25 MB) ran the head 1.2-1.4x faster than 256 on this CPU (cache-resident passes).
HEAD_CHUNK = 128
# Attention FLOPs run this much slower than the projections on CPU: SmolLM2's blocks took 1.30 ms
# per position in 128-token rows and 1.43 ms in 512-token rows (2 cores), 160 more keys per query.
ATTENTION_SLOWDOWN = 2.0
# A request joins its lexicographic neighbours' item when they share at least this fraction of its
# input: sharing a few tokens (a title, "Question:") would merge unrelated requests into long
# items, whose wide rows make every query read more keys than the shared tokens save.
MIN_SHARED_FRACTION = 0.25


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def row_widths(max_length: int, chunk: int = ATTENTION_CHUNK) -> tuple[int, ...]:
    """Row widths chunk x {2, 3, 4, 6, 8, 12, ...} below ``max_length``, then ``max_length``: steps
    of 1.5x and 1.33x, so a row is never much wider than what it holds."""
    if max_length < 2:
        raise ReplaceMeError(f"max_length must be at least 2 tokens, got {max_length}")
    out, k = [], 2
    while chunk * k < max_length:
        out.append(chunk * k)
        k = k * 3 // 2 if k & (k - 1) == 0 else k * 4 // 3
    return (*out, max_length)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def tree_attention_bias(ends, positions, window: int | None = None):
    """Additive bias [B, T, T] for rows of packed prefix-tree items. Items are laid out depth
    first, so a key is an ancestor of a query (or the query itself) exactly when the query lies
    between the key and the key's subtree end (``ends``); ``window`` limits the RoPE distance as a
    sliding window does. Padding has subtree end -1: no query sees it, and its own outputs are
    never read."""
    t = ends.shape[-1]
    qi, ki = jnp.arange(t)[None, :, None], jnp.arange(t)[None, None, :]
    allowed = (ki <= qi) & (qi <= ends[:, None, :])
    if window is not None:
        allowed = allowed & (positions[:, :, None] - positions[:, None, :] < window)
    return jnp.where(allowed, 0.0, _MASK_VALUE).astype(jnp.float32)


# The graph definition is static: models of one architecture (e.g. every pruned model with the
# same cuts) share compiled executables across scorers and calls.
@functools.partial(jax.jit, static_argnums=(0, 5))
def _hidden_states(graphdef, state, ids, ends, positions, span):
    """Last block's output [B, T, d] of packed rows (before the final norm). ``span``: keys a
    query chunk reads at most (None: all up to its end), see ``modeling.SpanBias``."""
    model = nnx.merge(graphdef, state)
    cos, sin = rope_cos_sin(model.config, positions)
    windows = layer_windows(model.config)
    biases = {w: tree_attention_bias(ends, positions, w) for w in set(windows)}
    if span is not None:
        biases = {w: SpanBias(b, span) for w, b in biases.items()}
    h = model.embed(ids)
    for *_, h in model.blocks(h, cos, sin, [biases[w] for w in windows]):
        pass
    return h


@functools.partial(jax.jit, static_argnums=0)
def _scored_logprobs(graphdef, state, hidden, targets):
    """log p(target) and whether it is the argmax, for hidden states [P, d] (before the final
    norm); P > HEAD_CHUNK runs in steps of HEAD_CHUNK rows so the logits stay small."""
    model = nnx.merge(graphdef, state)

    def step(args):
        h, t = args
        logits = model.head(h)                                   # [rows, V] float32
        picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        # One max pass serves the log-sum-exp and the greedy test (an argmax pass over the
        # vocabulary cost a fifth of the head). A target tied exactly with an earlier token for
        # the maximum counts as greedy here, where an argmax would pick the earlier token.
        top = jnp.max(logits, axis=-1)
        logz = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
        return picked - logz, picked >= top

    p, d = hidden.shape
    if p <= HEAD_CHUNK:
        return step((hidden, targets))
    logprob, greedy = jax.lax.map(step, (hidden.reshape(-1, HEAD_CHUNK, d), targets.reshape(-1, HEAD_CHUNK)))
    return logprob.reshape(p), greedy.reshape(p)


def _head_rows(n: int) -> int:
    """Padded count of scored positions: a power of two up to HEAD_CHUNK, then whole steps."""
    if n <= HEAD_CHUNK:
        return _pow2_at_least(n, MIN_SCORED_BUCKET)
    return -(-n // HEAD_CHUNK) * HEAD_CHUNK


@dataclasses.dataclass
class _Item:
    """Model inputs that share prefixes, laid out as one prefix tree in depth-first order: each
    token once per distinct prefix, at its depth as RoPE position, seeing its ancestors."""
    tokens: list[int]
    positions: list[int]
    ends: list[int]       # offset of the last token of each token's subtree
    score_at: list[int]   # offsets whose output predicts ...
    targets: list[int]    # ... these tokens,
    owners: list[int]     # ... which belong to these pairs.


def _item(members: list[int], inputs: dict[int, tuple[int, ...]], pairs) -> _Item:
    """The prefix tree of ``members``' inputs, which are sorted: each input adds the tokens after
    its longest common prefix with the one before, and closes the subtrees it leaves."""
    item = _Item([], [], [], [], [], [])
    path: list[int] = []  # offsets of the current input's tokens, by depth
    prev: tuple[int, ...] = ()
    for k in members:
        ctx, cont = pairs[k]
        seq = inputs[k]
        keep = _lcp(prev, seq)
        for offset in path[keep:]:
            item.ends[offset] = len(item.tokens) - 1
        path = path[:keep] + list(range(len(item.tokens), len(item.tokens) + len(seq) - keep))
        item.tokens += seq[keep:]
        item.positions += range(keep, len(seq))
        item.ends += [-1] * (len(seq) - keep)
        # The output at input index i predicts continuation token i - len(ctx) + 1.
        item.score_at += path[len(ctx) - 1:]
        item.targets += [int(t) for t in cont]
        item.owners += [k] * len(cont)
        prev = seq
    for offset in path:
        item.ends[offset] = len(item.tokens) - 1
    return item


def _build_items(pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                 max_width: int) -> tuple[list[_Item], list[tuple[int, int]]]:
    """Items of the distinct pairs, and (duplicate, original) pair indices of the repeated ones.

    A pair's model input is its context plus its continuation without the last token. Inputs are
    sorted, so inputs with a common prefix are neighbours, and a run of neighbours becomes one
    prefix-tree item: a multiple-choice context runs once for all its answers, and so do the
    few-shot examples and sentence start that WinoGrande's two options share, or the words two
    PIQA solutions begin with. An input joins the run when it shares with the one before it its
    whole context or at least ``MIN_SHARED_FRACTION`` of its input, and the item fits ``max_width``."""
    seen: dict[tuple, int] = {}
    duplicates, distinct = [], []
    for k, (ctx, cont) in enumerate(pairs):
        first = seen.setdefault((tuple(ctx), tuple(cont)), k)
        if first != k:
            duplicates.append((k, first))
        else:
            distinct.append(k)
    inputs = {k: tuple(pairs[k][0]) + tuple(pairs[k][1][:-1]) for k in distinct}
    distinct.sort(key=inputs.__getitem__)
    items, run, size = [], [], 0
    for k in distinct:
        seq = inputs[k]
        if run:
            common = _lcp(inputs[run[-1]], seq)
            enough = max(1, min(len(pairs[k][0]), MIN_SHARED_FRACTION * len(seq)))
            if common >= enough and size + len(seq) - common <= max_width:
                run.append(k)
                size += len(seq) - common
                continue
            items.append(_item(run, inputs, pairs))
        run, size = [k], len(seq)
    if run:
        items.append(_item(run, inputs, pairs))
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
      buckets: row widths; default ``row_widths(max_length)`` (multiples of the attention chunk,
        1.33-1.5x apart).
    """

    def __init__(self, model, *, max_length: int, max_batch_tokens: int = 4096,
                 max_batch_size: int = 64, buckets: Sequence[int] | None = None):
        if max_batch_tokens < 1 or max_batch_size < 1:
            raise ReplaceMeError(f"max_batch_tokens and max_batch_size must be positive, got "
                                 f"{max_batch_tokens} and {max_batch_size}")
        self.max_length = int(max_length)
        self.buckets = tuple(sorted(buckets)) if buckets else row_widths(self.max_length)
        if self.buckets[-1] < self.max_length:
            raise ReplaceMeError(f"largest bucket {self.buckets[-1]} is shorter than max_length "
                                 f"{self.max_length}")
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = int(max_batch_size)
        self.shapes: set[tuple[int, int, int | None]] = set()  # (rows, width, key span) run so far
        self.positions_run = 0     # row positions computed (padding included) ...
        self.tokens_fed = 0        # ... of which real tokens
        c = model.config
        # Cost of one attention key per query, relative to a position's block matmuls: its FLOPs
        # (q.k and p.v over all heads) over the block's, times how much slower the small batched
        # attention matmuls run than the projections (ATTENTION_SLOWDOWN).
        self.key_cost = (ATTENTION_SLOWDOWN * 4 * c.num_attention_heads * c.head_dim
                         / (2 * parameter_count(c)[1]))
        self._graphdef, self._state = nnx.split(model)

    def bucket_for(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise ReplaceMeError(f"a row of {length} tokens exceeds max_length {self.max_length}")

    def batch_size_for(self, bucket: int) -> int:
        return max(1, min(self.max_batch_size, self.max_batch_tokens // bucket))

    @staticmethod
    def _rows_run(rows: int, full: int) -> int:
        """Rows a batch of ``rows`` runs as: a full batch, or a power of two (bounded shapes)."""
        return full if rows == full else min(full, _pow2_at_least(rows))

    # ------------------------------------------------------------------ packing
    def _fill(self, items: list[_Item], floor: int) -> list[_Row]:
        """Best fit, longest first, into rows at least ``floor`` wide: each item goes to the open
        row it fills most tightly, or opens a row of the narrowest width that holds it."""
        rows: list[_Row] = []
        free: list[tuple[int, int]] = []  # (room left, row index), sorted
        for item in items:
            n = len(item.tokens)
            at = bisect.bisect_left(free, (n, -1))
            if at < len(free):
                room, r = free.pop(at)
            else:
                r = len(rows)
                rows.append(_Row(self.bucket_for(max(n, floor))))
                room = rows[r].width
            rows[r].items.append(item)
            rows[r].used += n
            if room - n > 0:
                bisect.insort(free, (room - n, r))
        return rows

    def span_for(self, batch: list[_Row]) -> int | None:
        """Keys a query chunk of ``batch`` must read (``modeling.SpanBias``): its longest item plus
        a chunk, rounded up to a bucket so few shapes compile; None when that is the whole row."""
        need = max(len(item.tokens) for row in batch for item in row.items) + ATTENTION_CHUNK - 1
        width = batch[0].width
        span = next((b for b in self.buckets if b >= need), width)
        return span if span < width else None

    @staticmethod
    def keys_per_query(width: int, span: int | None) -> float:
        """Mean keys a query reads in a row of ``width`` (see ``modeling.causal_attention``)."""
        c = ATTENTION_CHUNK
        if width < 2 * c:
            return float(width)
        span = span or width
        return sum(min(c, width - i) * (min(width, i + c) - max(0, i + c - span))
                   for i in range(0, width, c)) / width

    def cost(self, rows: list[_Row]) -> float:
        """Modelled cost of running ``rows``, in position-equivalents: every position run (the
        padding rows of a last, partial batch included) plus its attention keys."""
        total = 0.0
        for batch in self._batches(rows):
            width = batch[0].width
            run = self._rows_run(len(batch), self.batch_size_for(width))
            total += run * width * (1 + self.key_cost * self.keys_per_query(width, self.span_for(batch)))
        return total

    def _pack(self, items: list[_Item]) -> list[_Row]:
        """Rows for ``items``, at the narrowest row width that minimises ``cost``: wide rows waste
        little room but each query reads more keys; narrow rows the reverse (WinoGrande's 150-token
        items fill a 256-token row to 59 %, a 768-token row to 98 %)."""
        items = sorted(items, key=lambda it: -len(it.tokens))
        best = None
        for floor in self.buckets:
            if best is not None and floor > self.max_batch_tokens:  # one row per batch already
                break
            rows = self._fill(items, floor)
            cost = self.cost(rows)
            if best is None or cost < best[0]:
                best = (cost, rows)
        return best[1]

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
        n_rows = self._rows_run(len(batch), full)
        ids = np.zeros((n_rows, width), np.int32)
        ends = np.full((n_rows, width), -1, np.int32)
        pos = np.zeros((n_rows, width), np.int32)
        flat, targets, owners = [], [], []
        for r, row in enumerate(batch):
            at = 0
            for item in row.items:
                n = len(item.tokens)
                ids[r, at:at + n] = item.tokens
                ends[r, at:at + n] = np.asarray(item.ends) + at
                pos[r, at:at + n] = item.positions
                flat += [r * width + at + o for o in item.score_at]
                targets += item.targets
                owners += item.owners
                at += n
            self.tokens_fed += at
        self.positions_run += ids.size
        span = self.span_for(batch)
        self.shapes.add((*ids.shape, span))
        hidden = _hidden_states(self._graphdef, self._state, jnp.asarray(ids), jnp.asarray(ends),
                                jnp.asarray(pos), span)
        # Gather the scored positions on the host (a view on CPU), so the head's compiled shapes
        # depend on their count only, not on the batch layout.
        hidden = np.asarray(hidden)
        k = len(flat)
        p = _head_rows(k)
        scored = np.zeros((p, hidden.shape[-1]), hidden.dtype)
        scored[:k] = hidden.reshape(-1, hidden.shape[-1])[np.asarray(flat, np.int64)]
        tgt_a = np.zeros(p, np.int32)
        tgt_a[:k] = targets
        logprob, greedy = _scored_logprobs(self._graphdef, self._state, jnp.asarray(scored), jnp.asarray(tgt_a))
        return np.asarray(owners, np.int64), np.asarray(logprob)[:k], np.asarray(greedy)[:k]

    # ------------------------------------------------------------------ public
    def layout(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, int]:
        """What ``score_pairs(pairs)`` would run, without running it: ``fed``, the tokens fed
        (each distinct prefix once); ``run``, the row positions computed (row padding and a last
        batch's padding rows included); ``scored``, the positions the LM head reads."""
        items, _ = _build_items(pairs, self.buckets[-1]) if pairs else ([], [])
        run = sum(self._rows_run(len(b), self.batch_size_for(b[0].width)) * b[0].width
                  for b in self._batches(self._pack(items)))
        return {"fed": sum(len(it.tokens) for it in items), "run": run,
                "scored": sum(len(it.targets) for it in items)}

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
