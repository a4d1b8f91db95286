"""Batched generation with a KV cache: one jitted prefill per prompt bucket, jitted decode steps.

Prompts are left-padded to a shared length P, so every row's next token goes to the same cache
slot and a decode step is one static-shape call whatever the rows' lengths; RoPE positions count
real tokens only, so padding changes nothing. The cache holds P + max_new_tokens slots (rounded up),
and a decode step attends over all of them: its cost is flat in the number of tokens generated so far.
Stops: EOS ids, stop strings (checked on the host after each call), max_new_tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.inference.sampling import SamplingParams, sample
from replaceme_jax.models.modeling import KVCache

PROMPT_BUCKET = 64  # prompt lengths round up to a multiple of this (fewer compiled shapes)
CACHE_BUCKET = 32   # cache lengths too


@dataclasses.dataclass
class GenerationResult:
    text: str                 # decoded new tokens (special tokens skipped), cut before a stop string
    tokens: list[int]         # new token ids, up to and including an EOS
    finish_reason: str        # "eos", "stop" (a stop string) or "length"
    prompt_tokens: int


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(4,))
def _prefill(graphdef, state, ids, mask, cache, key, params: SamplingParams):
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(ids, mask, cache)
    return sample(logits, jax.random.fold_in(key, 0), params), cache


@functools.partial(jax.jit, static_argnums=(0, 8, 9), donate_argnums=(2,))
def _decode(graphdef, state, cache, tokens, positions, done, eos_ids, key_step, params: SamplingParams,
            n_steps: int):
    """``n_steps`` tokens per row after ``tokens``; rows already done emit -1."""
    model = nnx.merge(graphdef, state)
    key, step0 = key_step

    def body(i, carry):
        cache, tokens, positions, done, out = carry
        logits, cache = model.decode_step(jnp.maximum(tokens, 0), positions, cache)
        nxt = sample(logits, jax.random.fold_in(key, step0 + i), params)
        nxt = jnp.where(done, -1, nxt)
        done = done | jnp.isin(nxt, eos_ids)
        return cache, nxt, positions + 1, done, out.at[:, i].set(nxt)

    out = jnp.full((tokens.shape[0], n_steps), -1, jnp.int32)
    cache, tokens, positions, done, out = jax.lax.fori_loop(
        0, n_steps, body, (cache, tokens, positions, done, out))
    return cache, tokens, positions, done, out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def normalize_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ReplaceMeError(f"stop must be a string or a list of strings; got {stop!r}")
    return tuple(s for s in stop if s)


class Generator:
    """Generation from ``model`` (any ``CausalLM``, pruned or dense) with ``tokenizer``.

    Args:
      max_batch_size: rows per batch (prompts beyond it run in further batches).
      steps_per_call: decode steps per jitted call between host-side stop checks (1 when streaming).
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, steps_per_call: int = 8):
        if max_batch_size < 1 or steps_per_call < 1:
            raise ReplaceMeError(f"max_batch_size and steps_per_call must be >= 1; got {max_batch_size}, "
                                 f"{steps_per_call}")
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.max_batch_size, self.steps_per_call = int(max_batch_size), int(steps_per_call)

    # ------------------------------------------------------------------ inputs
    def encode(self, prompt, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt (ids pass through); ``chat`` applies the tokenizer's chat template."""
        if isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [int(t) for t in prompt]
        elif isinstance(prompt, str):
            if chat:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise ReplaceMeError("chat=True but the tokenizer has no chat template. Fix: drop "
                                         "--chat, or load a model whose tokenizer carries one.")
                prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                            tokenize=False, add_generation_prompt=True)
                # The template writes BOS itself where the model wants one.
                ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(prompt)["input_ids"]
        else:
            raise ReplaceMeError(f"a prompt must be a string or a list of token ids; got {type(prompt).__name__}")
        if not ids:
            raise ReplaceMeError("an empty prompt (no tokens) cannot be continued. Fix: give some text, "
                                 "or a tokenizer that adds BOS.")
        return ids

    def eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        eos = self.config.eos_token_id
        ids |= set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        return sorted(int(i) for i in ids)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence, *, max_new_tokens: int = 128,
                 sampling: SamplingParams = SamplingParams(), seed: int = 0, stop=None,
                 eos_token_ids: Sequence[int] | None = None, chat: bool = False,
                 stream: Callable[[str], None] | None = None) -> list[GenerationResult]:
        """Continue each prompt. ``eos_token_ids``: ids that end a row (default: tokenizer's and
        config's EOS; ``()`` = none, e.g. for benchmarks). ``stream``: called with each new piece of
        text (a single prompt only)."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ReplaceMeError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
        if not isinstance(sampling, SamplingParams):
            raise ReplaceMeError("sampling must be a SamplingParams(temperature=, top_k=, top_p=)")
        if stream is not None and len(prompts) != 1:
            raise ReplaceMeError(f"streaming needs a single prompt; got {len(prompts)}")
        stops = normalize_stop(stop)
        encoded = [self.encode(p, chat=chat) for p in prompts]
        limit = int(self.config.max_position_embeddings)
        for i, ids in enumerate(encoded):
            if len(ids) + max_new_tokens > limit:
                raise ReplaceMeError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that passes the "
                    f"model's context of {limit} tokens. Fix: shorten the prompt or lower max_new_tokens.")
        eos = list(self.eos_ids() if eos_token_ids is None else eos_token_ids)
        key = jax.random.key(seed)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: list[GenerationResult | None] = [None] * len(encoded)
        for start in range(0, len(order), self.max_batch_size):
            rows = order[start:start + self.max_batch_size]
            for i, r in zip(rows, self._batch([encoded[i] for i in rows], max_new_tokens, sampling, key,
                                              stops, eos, stream)):
                results[i] = r
        return results

    def _batch(self, prompts, max_new, sampling, key, stops, eos, stream):
        n = len(prompts)
        rows = 1 << (n - 1).bit_length()  # power-of-two row counts: few compiled shapes
        width = min(_round_up(max(len(p) for p in prompts), PROMPT_BUCKET),
                    int(self.config.max_position_embeddings))
        width = max(width, max(len(p) for p in prompts))
        steps = 1 if stream is not None else min(self.steps_per_call, max(1, max_new - 1))
        cache_len = _round_up(width + _round_up(max_new - 1, steps), CACHE_BUCKET)
        ids = np.zeros((rows, width), np.int32)
        mask = np.zeros((rows, width), np.int32)
        for j, p in enumerate(prompts):
            ids[j, width - len(p):], mask[j, width - len(p):] = p, 1
        mask[n:, -1] = 1  # filler rows hold one token so no row is empty
        cache = KVCache.empty(self.config, rows, cache_len)
        first, cache = _prefill(self.graphdef, self.state, jnp.asarray(ids), jnp.asarray(mask), cache,
                                key, sampling)
        eos_arr = jnp.asarray(eos if eos else [-2], jnp.int32)
        first_host = np.asarray(first)
        generated = [[int(first_host[j])] for j in range(n)]
        done = np.array([j >= n or int(first_host[j]) in eos for j in range(rows)])
        tokens, positions = first, jnp.asarray(mask.sum(1), jnp.int32)
        texts = [""] * n
        finished = [None] * n
        emitted = 0
        step = 1
        while True:
            for j in range(n):
                if finished[j] is None:
                    finished[j] = self._check(generated[j], texts, j, eos, stops, max_new)
            if stream is not None:
                emitted = self._stream(texts[0], generated[0], emitted, stream, finished[0])
            if all(f is not None for f in finished):
                break
            done = done | np.array([j >= n or finished[j] is not None for j in range(rows)])
            cache, tokens, positions, done_dev, out = _decode(
                self.graphdef, self.state, cache, tokens, positions, jnp.asarray(done), eos_arr,
                (key, jnp.asarray(step, jnp.int32)), sampling, steps)
            step += steps
            out = np.asarray(out)
            for j in range(n):
                if finished[j] is None:
                    generated[j].extend(int(t) for t in out[j] if t >= 0)
            done = np.array(done_dev)
        return [GenerationResult(texts[j], generated[j], finished[j], len(prompts[j])) for j in range(n)]

    def _check(self, tokens, texts, j, eos, stops, max_new):
        """Trim a row at its first EOS / stop string / budget; the finish reason, or None to go on."""
        reason = None
        for k, t in enumerate(tokens):
            if t in eos:
                del tokens[k + 1:]
                reason = "eos"
                break
        if len(tokens) >= max_new and reason is None:
            del tokens[max_new:]
            reason = "length"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        texts[j] = text
        return reason

    @staticmethod
    def _stream(text, tokens, emitted, stream, finished):
        # Hold back a trailing partial UTF-8 character (decoded as U+FFFD) until it completes.
        ready = len(text) if finished or not text.endswith("\ufffd") else len(text.rstrip("\ufffd"))
        if ready > emitted:
            stream(text[emitted:ready])
        return max(emitted, ready)
