"""Token log-probabilities of many variable-length rows, in a few static shapes.

Both perplexity and the lm-evaluation-harness backend reduce to one question: for a row of
token ids, what log-probability does the model give each next token? Rows arrive with every
length, and ``jax.jit`` compiles once per input shape, so rows are right-padded to a small set
of bucket lengths (powers of two by default) and stacked into batches whose row count is fixed
per bucket (a shorter tail batch is padded to the next power of two). The number of compiled
shapes is therefore bounded by ``len(buckets) * log2(max_batch_size)`` whatever the workload.

Logits come out of ``CausalLM`` in float32 whatever the parameter dtype, and log-softmax is taken
in float32.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from replaceme_jax.errors import ReplaceMeError


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


@dataclasses.dataclass
class ScoredBatch:
    """Scores of one batch; row ``j`` of each array belongs to input row ``indices[j]``.

    ``next_logprob[j, t]`` is log p(row[t+1] | row[:t+1]) and ``next_greedy[j, t]`` whether
    row[t+1] is the argmax there, for t < len(row) - 1 (later entries are padding).
    ``last_logprob[j]`` is the full log-softmax [V] after the row's last token (only when asked).
    """
    indices: list[int]
    next_logprob: np.ndarray
    next_greedy: np.ndarray
    last_logprob: np.ndarray | None


# The graph definition is static: models of one architecture (same config, e.g. every pruned
# model with the same cuts) share compiled executables across scorers and calls.
@functools.partial(jax.jit, static_argnums=(0, 4))
def _score_rows(graphdef, state, ids, mask, with_last: bool):
    model = nnx.merge(graphdef, state)
    logits = model(ids, mask).astype(jnp.float32)             # [B, T, V]
    log_z = jax.nn.logsumexp(logits, axis=-1)                  # [B, T]
    targets = ids[:, 1:]
    picked = jnp.take_along_axis(logits[:, :-1], targets[..., None], axis=-1)[..., 0]
    next_logprob = picked - log_z[:, :-1]
    next_greedy = jnp.argmax(logits[:, :-1], axis=-1) == targets
    if not with_last:
        return next_logprob, next_greedy, None
    last = jnp.sum(mask, axis=-1) - 1
    rows = jnp.arange(ids.shape[0])
    last_logprob = logits[rows, last] - log_z[rows, last][:, None]
    return next_logprob, next_greedy, last_logprob


class TokenScorer:
    """Scores token rows with a ``CausalLM`` (a snapshot of its weights taken at construction).

    Args:
      model: the NNX ``CausalLM``.
      max_length: longest row accepted (callers truncate before scoring).
      max_batch_tokens: rows x bucket length per batch; bounds the [B, T, V] float32 logits.
      max_batch_size: cap on rows per batch.
      buckets: padded row lengths; default powers of two from 16 up to ``max_length``.
    """

    def __init__(self, model, *, max_length: int, max_batch_tokens: int = 4096,
                 max_batch_size: int = 64, buckets: Sequence[int] | None = None):
        if max_batch_tokens < 1 or max_batch_size < 1:
            raise ReplaceMeError(f"max_batch_tokens and max_batch_size must be positive, got "
                                 f"{max_batch_tokens} and {max_batch_size}")
        self.max_length = int(max_length)
        self.buckets = tuple(sorted(buckets)) if buckets else power_of_two_buckets(self.max_length)
        if self.buckets[-1] < self.max_length:
            raise ReplaceMeError(f"largest bucket {self.buckets[-1]} is shorter than max_length "
                                 f"{self.max_length}")
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = int(max_batch_size)
        self.shapes: set[tuple[int, int]] = set()  # (rows, length) batches run so far
        self._graphdef, self._state = nnx.split(model)

    def bucket_for(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise ReplaceMeError(f"a row of {length} tokens exceeds max_length {self.max_length}")

    def batch_size_for(self, bucket: int) -> int:
        return max(1, min(self.max_batch_size, self.max_batch_tokens // bucket))

    def score(self, rows: Sequence[Sequence[int]], *, with_last: bool = False,
              progress: str | None = None) -> Iterator[ScoredBatch]:
        """Yield :class:`ScoredBatch` es covering every row once (longest rows first)."""
        lengths = [len(r) for r in rows]
        if any(n < 1 for n in lengths):
            raise ReplaceMeError("cannot score an empty token row")
        by_bucket: dict[int, list[int]] = {}
        for i in sorted(range(len(rows)), key=lambda i: -lengths[i]):
            by_bucket.setdefault(self.bucket_for(lengths[i]), []).append(i)
        bar = None
        if progress is not None:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(rows), desc=progress, leave=False)
        for bucket in sorted(by_bucket, reverse=True):
            members, full = by_bucket[bucket], self.batch_size_for(bucket)
            for start in range(0, len(members), full):
                chunk = members[start:start + full]
                n_pad = full if len(chunk) == full else min(full, 1 << (len(chunk) - 1).bit_length())
                ids = np.zeros((n_pad, bucket), np.int32)
                mask = np.zeros((n_pad, bucket), np.int32)
                mask[:, 0] = 1  # padding rows hold one dummy token so no softmax row is empty
                for j, i in enumerate(chunk):
                    ids[j, :lengths[i]] = rows[i]
                    mask[j, :lengths[i]] = 1
                self.shapes.add(ids.shape)
                nlp, greedy, last = _score_rows(self._graphdef, self._state, jnp.asarray(ids),
                                                jnp.asarray(mask), with_last)
                k = len(chunk)
                yield ScoredBatch(chunk, np.asarray(nlp[:k]), np.asarray(greedy[:k]),
                                  None if last is None else np.asarray(last[:k]))
                if bar is not None:
                    bar.update(k)
        if bar is not None:
            bar.close()
