"""Flax NNX decoder family: Llama 1/2/3/3.1, Mistral-style, Qwen2/2.5 and Qwen3.

Attribute names follow Hugging Face (``model.layers[i].self_attn.q_proj``, ``mlp.down_proj``), so a
checkpoint maps onto this tree by key renaming plus a transpose of linear weights (HF keeps
``[out, in]``, ``nnx.Linear`` keeps ``kernel`` as ``[in, out]``). RoPE uses HF's rotate-half layout
and q is not pre-scaled, so import and export are transpose-only.

Besides logits, the forward can return what ReplaceMe needs per block k, without hooks:
``Y_k = x + Attn(norm(x))`` (the attention residual), ``M_k = MLP(norm(Y_k))`` (before the residual
add) and ``L_k = Y_k + M_k`` (the block output).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from replaceme_jax.models.config import ModelConfig

_MASK_VALUE = float(np.finfo(np.float32).min)
ATTENTION_CHUNK = 64  # query rows per block of the causal attention (see causal_attention)


def _dtype(name: str):
    return jnp.dtype(name)


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies (float32, length head_dim/2), with linear or llama3 scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    rs = config.rope_scaling_dict or {}
    kind = config.rope_type
    if kind == "linear":
        inv_freq = inv_freq / float(rs["factor"])
    elif kind == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_len = float(rs["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_cos_sin(config: ModelConfig, positions: jax.Array):
    """cos/sin tables [B, T, head_dim] for integer positions [B, T] (float32)."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
    """x: [B, T, H, D]; cos/sin: [B, T, D]."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + _rotate_half(x) * sin


# ----------------------------------------------------------------------------- layers
class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        # Normalise in float32, cast back, then scale: HF's order of operations.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


def _linear(din, dout, bias, config: ModelConfig, rngs: nnx.Rngs):
    return nnx.Linear(din, dout, use_bias=bias, dtype=_dtype(config.dtype),
                      param_dtype=_dtype(config.param_dtype), rngs=rngs,
                      kernel_init=nnx.initializers.normal(0.02))


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        self.q_proj = _linear(c.hidden_size, self.num_heads * self.head_dim, c.attention_bias, c, rngs)
        self.k_proj = _linear(c.hidden_size, self.num_kv_heads * self.head_dim, c.attention_bias, c, rngs)
        self.v_proj = _linear(c.hidden_size, self.num_kv_heads * self.head_dim, c.attention_bias, c, rngs)
        self.o_proj = _linear(self.num_heads * self.head_dim, c.hidden_size, c.o_proj_bias, c, rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps, param_dtype=_dtype(c.param_dtype))
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps, param_dtype=_dtype(c.param_dtype))
        self.qk_norm = c.qk_norm

    def qkv(self, x, cos, sin):
        """q [b, kv, g, t, d] and k, v [b, kv, t, d] after the q/k norms and RoPE."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA without materialising repeated k/v: group the query heads per kv head. Heads go
        # first so both contractions are plain batched matmuls; contracting the [b, t, heads, d]
        # layout directly makes XLA:CPU transpose inside the dots (benchmarks/README.md).
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim).transpose(0, 2, 3, 1, 4)
        return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def output(self, out):
        """o_proj of the attention output [b, kv, g, t, d] -> [b, t, hidden]."""
        b, t = out.shape[0], out.shape[3]
        return self.o_proj(out.transpose(0, 3, 1, 2, 4).reshape(b, t, self.num_heads * self.head_dim))

    def __call__(self, x, cos, sin, bias):
        q, k, v = self.qkv(x, cos, sin)
        return self.output(causal_attention(q, k, v, bias))


def _attend(q, k, v, bias):
    """Softmax attention: q [b, kv, g, t, d], k/v [b, kv, s, d], bias [b, t, s] -> [b, kv, g, t, d]."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1]) + bias[:, None, None, :, :]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v)


@dataclasses.dataclass(frozen=True)
class SpanBias:
    """A causal attention bias [b, t, t] whose visible keys all lie within the last ``span`` keys
    up to the end of each query's chunk, so ``causal_attention`` reads only those. Rows packed with
    independent items of at most n tokens qualify with ``span >= n + chunk - 1`` (a query's item
    starts at most n - 1 tokens before it). ``span`` is static (a Python int)."""
    bias: jax.Array
    span: int


def causal_attention(q, k, v, bias, chunk: int | None = None):
    """``_attend`` for a causal ``bias`` (as ``attention_bias`` makes), skipping the all-masked
    blocks of the score matrix: queries in chunks of ``chunk`` (default ``ATTENTION_CHUNK``), each
    against the keys up to its end (with a ``SpanBias``, only its last ``span`` of them). With c
    chunks a row runs (c + 1) / 2c of the attention FLOPs (9/16 at 512 tokens); rows shorter than
    two chunks run whole. Same results."""
    chunk = chunk or ATTENTION_CHUNK
    span = None
    if isinstance(bias, SpanBias):
        bias, span = bias.bias, bias.span
    t = q.shape[3]
    if t < 2 * chunk or k.shape[2] != t:
        return _attend(q, k, v, bias)
    starts = [0 if span is None else max(0, i + chunk - span) for i in range(0, t, chunk)]
    out = jnp.concatenate([_attend(q[:, :, :, i:i + chunk], k[:, :, lo:i + chunk], v[:, :, lo:i + chunk],
                                   bias[:, i:i + chunk, lo:i + chunk])
                           for lo, i in zip(starts, range(0, t, chunk))], axis=3)
    # A query that sees no key at all (left padding) gets the mean of every value, as a full row of
    # equal masked scores gives; by causality no chunk's cut-off keys were visible to anyone else.
    blind = jnp.max(bias, axis=-1) < 0  # [b, t]
    mean_v = jnp.mean(v.astype(jnp.float32), axis=2).astype(v.dtype)[:, :, None, None, :]
    return jnp.where(blind[:, None, None, :, None], mean_v, out)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, c, rngs)
        self.up_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, c, rngs)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size, c.mlp_bias, c, rngs)

    def hidden(self, x):
        """The down-projection's input (act(gate) * up, [..., d_ff]): what a kernel re-fit regresses on."""
        return jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)

    def __call__(self, x):
        return self.down_proj(self.hidden(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        pd = _dtype(config.param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=pd)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=pd)
        self.mlp = MLP(config, rngs=rngs)

    def attention_residual(self, x, cos, sin, bias):
        """Y = x + attention(x): the stream the MLP reads and adds to."""
        return x + self.self_attn(self.input_layernorm(x), cos, sin, bias)

    def parts(self, x, cos, sin, bias):
        """(Y, M): attention residual and MLP output before its residual add; block output = Y + M."""
        y = self.attention_residual(x, cos, sin, bias)
        return y, self.mlp(self.post_attention_layernorm(y))

    def __call__(self, x, cos, sin, bias):
        y, m = self.parts(x, cos, sin, bias)
        return y + m

    def cached(self, x, cos, sin, bias, k_cache, v_cache, slot, *, over_cache: bool):
        """Block output for ``x`` [b, t, d] whose keys/values are written to slots [slot, slot + t)
        of this block's caches ``k_cache``/``v_cache`` [b, kv, S, d]. ``over_cache``: attend over the
        whole cache (decode; ``bias`` [b, t, S]); else over the t fresh keys only (prefill from an
        empty cache; ``bias`` [b, t, t]). -> (output, k_cache, v_cache)."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), cos, sin)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, slot, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, slot, 0))
        out = _attend(q, k_cache, v_cache, bias) if over_cache else causal_attention(q, k, v, bias)
        y = x + self.self_attn.output(out)
        return y + self.mlp(self.post_attention_layernorm(y)), k_cache, v_cache


class DecoderModel(nnx.Module):
    """HF's ``model.`` prefix: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size,
                                      dtype=_dtype(config.dtype),
                                      param_dtype=_dtype(config.param_dtype), rngs=rngs,
                                      embedding_init=nnx.initializers.normal(0.02))
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                            param_dtype=_dtype(config.param_dtype))


@dataclasses.dataclass
class Intermediates:
    """Per-block quantities, each stacked as [num_blocks, B, T, d]."""
    attn_residual: jax.Array   # Y_k
    mlp_output: jax.Array      # M_k (before the residual add)
    block_output: jax.Array    # L_k = Y_k + M_k


jax.tree_util.register_dataclass(
    Intermediates, data_fields=["attn_residual", "mlp_output", "block_output"], meta_fields=[])


@dataclasses.dataclass
class KVCache:
    """Keys and values of every block for a batch of rows, preallocated to a static length S.

    k, v: one [B, kv_heads, S, head_dim] array per block (a tuple over layers: one stacked
    [layers, ...] buffer would be copied whole by every block's update inside the decode loop, 45x
    slower at batch 16); positions [B, S]: the RoPE position of each slot's key, -1 for an empty or
    padding slot; length: slots written so far, the same for every row (prompts are left-padded to
    one length, so each decode step writes one slot of every row)."""
    k: tuple
    v: tuple
    positions: jax.Array
    length: jax.Array  # int32 scalar

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or _dtype(config.dtype)
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        layers = range(config.num_hidden_layers)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers),
                   jnp.full((batch, max_len), -1, jnp.int32), jnp.zeros((), jnp.int32))

    @staticmethod
    def nbytes(config: ModelConfig, batch: int, max_len: int, dtype=None) -> int:
        """Bytes of k and v (the shape model: 2 x layers x B x kv_heads x S x head_dim x itemsize)."""
        itemsize = jnp.dtype(dtype or _dtype(config.dtype)).itemsize
        return (2 * config.num_hidden_layers * batch * config.num_key_value_heads * max_len
                * config.head_dim * itemsize)

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]


# Logical axes of the cache arrays (see models/sharding.py).
KV_CACHE_AXES = ("activation_batch", "activation_kv_heads", "cache_length", "head_dim")

jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "positions", "length"], meta_fields=[])


def cache_bias(key_positions: jax.Array, query_positions: jax.Array, window: int | None = None) -> jax.Array:
    """Additive bias [B, t, S] of queries at ``query_positions`` [B, t] over cache slots whose keys sit
    at ``key_positions`` [B, S] (-1: empty): causal by position, optional sliding window."""
    kp, qp = key_positions[:, None, :], query_positions[:, :, None]
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed = allowed & (qp - kp < window)
    return jnp.where(allowed, 0.0, _MASK_VALUE).astype(jnp.float32)


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions counted over real tokens, restarting at 0 where a packed segment starts.

    ``attention_mask``: 0 = padding, k > 0 = token of segment k (an HF 0/1 mask is one segment per
    row). Left padding therefore does not shift RoPE phases, and each sequence packed into a row
    sees the positions it would have alone. Padding keeps the position of the last real token.
    """
    real = attention_mask > 0
    count = jnp.cumsum(real.astype(jnp.int32), axis=-1)  # real tokens up to and including t
    t = attention_mask.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t), attention_mask.shape)
    # Segment of the previous real token (0 before the first one): a segment starts where it changes.
    last_real = jax.lax.cummax(jnp.where(real, idx, -1), axis=attention_mask.ndim - 1)
    prev = jnp.concatenate([jnp.full_like(last_real[..., :1], -1), last_real[..., :-1]], axis=-1)
    prev_seg = jnp.where(prev >= 0, jnp.take_along_axis(attention_mask, jnp.maximum(prev, 0), axis=-1), 0)
    starts = real & (attention_mask != prev_seg)
    before = jax.lax.cummax(jnp.where(starts, count - 1, 0), axis=attention_mask.ndim - 1)
    return jnp.where(real, count - 1 - before, jnp.maximum(count - 1, 0))


def attention_bias(attention_mask: jax.Array, window: int | None = None) -> jax.Array:
    """Additive bias [B, T, T]: causal, pad keys masked, packed segments kept apart, optional
    sliding window. ``attention_mask`` as in ``default_positions``."""
    t = attention_mask.shape[-1]
    q_idx, k_idx = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    seg_q, seg_k = attention_mask[:, :, None], attention_mask[:, None, :]
    # A real query sees its own segment only; a pad query's output is never used.
    allowed = allowed[None] & (seg_k > 0) & ((seg_k == seg_q) | (seg_q == 0))
    return jnp.where(allowed, 0.0, _MASK_VALUE).astype(jnp.float32)


def layer_windows(config: ModelConfig) -> list[int | None]:
    """Sliding-window size per block (None = full attention), from HF's config fields."""
    extra = config.extra_dict
    window = extra.get("sliding_window")
    types = extra.get("layer_types")
    if types is not None:
        return [window if ty == "sliding_attention" and window else None for ty in types]
    if config.model_type == "mistral" and window:
        return [int(window)] * config.num_hidden_layers
    if extra.get("use_sliding_window") and window:
        first = int(extra.get("max_window_layers", config.num_hidden_layers))
        return [int(window) if i >= first else None for i in range(config.num_hidden_layers)]
    return [None] * config.num_hidden_layers


class CausalLM(nnx.Module):
    """Decoder + LM head (tied or untied)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.model = DecoderModel(config, rngs=rngs)
        self.lm_head = (None if config.tie_word_embeddings else
                        _linear(config.hidden_size, config.vocab_size, False, config, rngs))

    # -- pieces, usable on their own (the statistics pass runs only the blocks it needs) --
    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def attention_inputs(self, attention_mask, positions=None):
        """(cos, sin, biases per block) for a batch; positions default to ``default_positions``."""
        if positions is None:
            positions = default_positions(attention_mask)
        cos, sin = rope_cos_sin(self.config, positions)
        windows = layer_windows(self.config)
        cache = {w: attention_bias(attention_mask, w) for w in set(windows)}
        return cos, sin, [cache[w] for w in windows]

    def blocks(self, h, cos, sin, biases, *, depth: int | None = None, residual=None):
        """The block loop every full-sequence pass runs: from embeddings ``h`` yield ``(k, Y_k, M_k,
        L_k)`` for blocks k < ``depth`` (default: all). ``biases[k]`` is block k's attention bias;
        ``residual`` (e.g. a sharding constraint) is applied to each block output before the next
        block reads it. Statistics, token gathering, Block Influence and scoring consume it."""
        depth = len(self.model.layers) if depth is None else depth
        for k in range(depth):
            y, m = self.model.layers[k].parts(h, cos, sin, biases[k])
            h = y + m if residual is None else residual(y + m)
            yield k, y, m, h

    def head(self, h):
        """Final norm + LM head -> float32 logits."""
        h = self.model.norm(h)
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None, *,
                 return_intermediates: bool = False):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        cos, sin, biases = self.attention_inputs(attention_mask, positions)
        h = self.embed(input_ids)
        ys, ms, ls = [], [], []
        for _, y, m, h in self.blocks(h, cos, sin, biases):
            if return_intermediates:
                ys.append(y), ms.append(m), ls.append(h)
        logits = self.head(h)
        if not return_intermediates:
            return logits
        return logits, Intermediates(jnp.stack(ys), jnp.stack(ms), jnp.stack(ls))


    # -- cached decoding (inference/decoding.py jits these) --
    def prefill(self, input_ids, attention_mask, cache: KVCache, plan=None):
        """Run left-padded prompts [B, P] into an empty ``cache`` (slots [0, P)).
        -> (float32 logits of each row's last token [B, V], cache)."""
        positions = default_positions(attention_mask)
        cos, sin, biases = self.attention_inputs(attention_mask, positions)
        h = self.embed(input_ids)
        k_all, v_all = list(cache.k), list(cache.v)
        for i, (layer, bias) in enumerate(zip(self.model.layers, biases)):
            h, k_all[i], v_all[i] = layer.cached(h, cos, sin, bias, k_all[i], v_all[i], 0, over_cache=False)
        key_pos = jax.lax.dynamic_update_slice(
            cache.positions, jnp.where(attention_mask > 0, positions, -1).astype(jnp.int32), (0, 0))
        cache = KVCache(_constrain_cache(k_all, plan), _constrain_cache(v_all, plan), key_pos,
                        jnp.asarray(input_ids.shape[1], jnp.int32))
        return self.head(h[:, -1]), cache

    def decode_step(self, tokens, positions, cache: KVCache, plan=None):
        """One new token per row (``tokens``, ``positions`` [B]) written at slot ``cache.length``,
        attending over the whole cache. -> (float32 logits [B, V], cache)."""
        slot = cache.length
        key_pos = jax.lax.dynamic_update_slice(cache.positions, positions[:, None].astype(jnp.int32), (0, slot))
        cos, sin = rope_cos_sin(self.config, positions[:, None])
        windows = layer_windows(self.config)
        biases = {w: cache_bias(key_pos, positions[:, None], w) for w in set(windows)}
        h = self.embed(tokens[:, None])
        k_all, v_all = list(cache.k), list(cache.v)
        for i, (layer, w) in enumerate(zip(self.model.layers, windows)):
            h, k_all[i], v_all[i] = layer.cached(h, cos, sin, biases[w], k_all[i], v_all[i], slot, over_cache=True)
        cache = KVCache(_constrain_cache(k_all, plan), _constrain_cache(v_all, plan), key_pos, slot + 1)
        return self.head(h[:, 0]), cache


def _constrain_cache(arrays, plan):
    return tuple(arrays) if plan is None else tuple(plan.constrain(x, KV_CACHE_AXES) for x in arrays)


@functools.lru_cache(maxsize=16)
def abstract_split(config: ModelConfig):
    """(graphdef, shapes-only state) of a ``CausalLM`` of ``config``, traced once per config.

    Tracing the initialisers costs about a second, and surgery, loading and the memory model build
    the same shapes many times (SLEB drops hundreds of block sets). Shared: never mutate the state;
    ``abstract_model`` gives a model of one's own to fill."""
    return nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))


def abstract_model(config: ModelConfig) -> CausalLM:
    """A model of ``config`` whose parameters are ShapeDtypeStructs (no memory), with Variables of
    its own, so a loader may fill them in place."""
    graphdef, state = abstract_split(config)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def parameter_count(config: ModelConfig) -> tuple[int, int]:
    """(parameters of a model of ``config``, parameters of one block), from shapes alone."""
    _, state = abstract_split(config)
    leaves = [(path, var) for path, var in nnx.to_flat_state(state) if isinstance(var, nnx.Param)]
    total = sum(int(np.prod(var.shape)) for _, var in leaves)
    block = sum(int(np.prod(var.shape)) for path, var in leaves if path[1:3] == ("layers", 0))
    return total, block


def num_parameters(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
