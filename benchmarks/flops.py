"""Matmul FLOP counts of what each side of the benchmark actually executes.

Only matrix products are counted (2 FLOPs per multiply-add); norms, softmax, RoPE and elementwise
work are left out, which is the usual convention and makes "fraction of matmul peak" meaningful.
Attention is counted over the score entries that are computed: PyTorch's SDPA with a padding mask
computes the full T x T matrix (causality is a mask, not skipped work); ours computes queries in
chunks, each against the keys up to its end (``models.modeling.causal_attention``, ``chunk``).
Counts are over the shapes that run, pads included: ``real`` variants count real tokens only (full
causal matrices), for the work a pad-free implementation would need.
"""
from __future__ import annotations

from typing import Iterable


def block_flops_per_token(config, seq_len: int) -> int:
    """One decoder block, one token of a length-``seq_len`` row: projections, MLP, QK^T and PV."""
    d, f = config.hidden_size, config.intermediate_size
    h, kv = config.num_attention_heads, config.num_key_value_heads
    hd = config.head_dim or d // h
    projections = d * h * hd + 2 * d * kv * hd + h * hd * d
    mlp = 3 * d * f
    attention = 2 * seq_len * h * hd  # scores and weighted values, each seq_len x head_dim per head
    return 2 * (projections + mlp + attention)


def head_flops_per_token(config) -> int:
    """The LM head (tied or not): d x vocab."""
    return 2 * config.hidden_size * config.vocab_size


def gram_flops_per_token(config) -> int:
    """One d x d product XᵀY of a token's rows (MᵀM or Mᵀ(L - Y))."""
    return 2 * config.hidden_size ** 2


def attention_pairs(seq_len: int, chunk: int | None = None) -> int:
    """(query, key) score entries computed for one row: all T x T, or with causal chunks of
    ``chunk`` queries (rows of at least two chunks) the keys up to each chunk's end."""
    if not chunk or seq_len < 2 * chunk:
        return seq_len * seq_len
    return sum((min(i + chunk, seq_len) - i) * min(i + chunk, seq_len) for i in range(0, seq_len, chunk))


def forward_flops(config, shapes: Iterable[tuple[int, int]], *, depth: int, lm_head: bool,
                  chunk: int | None = None) -> int:
    """``depth`` blocks (plus the LM head if ``lm_head``) over batches of the given (B, T) shapes;
    ``chunk`` as in ``attention_pairs``."""
    h = config.num_attention_heads
    hd = config.head_dim or config.hidden_size // h
    total = 0
    for b, t in shapes:
        per_token = depth * block_flops_per_token(config, t) + (head_flops_per_token(config) if lm_head else 0)
        skipped = t * t - attention_pairs(t, chunk)  # 2 products (QK^T, PV) x 2 FLOPs x heads x head_dim each
        total += b * t * per_token - b * depth * 4 * h * hd * skipped
    return total


def statistics_flops(config, shapes, *, depth: int, num_products: int, chunk: int | None = None) -> dict:
    """Our statistics pass: ``depth`` blocks and ``num_products`` d x d sums per token, no LM head."""
    tokens = sum(b * t for b, t in shapes)
    model = forward_flops(config, shapes, depth=depth, lm_head=False, chunk=chunk)
    sums = tokens * num_products * gram_flops_per_token(config)
    return {"model": model, "sums": sums, "total": model + sums}


def baseline_flops(config, shapes, *, num_passes: int = 2, host_products: int = 2) -> dict:
    """The PyTorch baseline: ``num_passes`` full forwards (all blocks + LM head) and, in the
    normal-equation pass, ``host_products`` float64 d x d products per token on the host."""
    tokens = sum(b * t for b, t in shapes)
    model = num_passes * forward_flops(config, shapes, depth=config.num_hidden_layers, lm_head=True)
    sums = tokens * host_products * gram_flops_per_token(config)
    return {"model": model, "sums": sums, "total": model + sums}
