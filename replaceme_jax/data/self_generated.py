"""Calibration text sampled from the model itself: a corpus for when no data fits, or to mix in.

Each passage is the model's own continuation of a document start (its ``<|endoftext|>`` separator,
else its BOS, else its EOS token), sampled at a temperature (1 = the model's own distribution, the
choice of data-free quantization work such as LLM-QAT). The text covers what the model writes
(prose, dialogue, code, lists) rather than one genre, so it is a source a mixture can take a share
of (``calibration.source=boolq+<file>``; docs/results.md measures what it does).

``calibration.source=self`` (alone or in a mixture, e.g. ``boolq+self``) asks the pipeline for such a
corpus of the model being pruned: ``cached_self_corpus`` writes it once per model (weights and compute
dtype) and size under the data cache (``$REPLACEME_JAX_CACHE/self_generated``) and reuses it after.

The corpus is a .jsonl file (``{"text": ...}`` per line), readable as any calibration source. It is
written batch by batch to ``<path>.partial`` (the first line records the settings) and renamed into
place when complete, so an interrupted run resumes where it stopped and never leaves a short file
under the final name. Batch ``b`` is sampled with the key ``seed + b * batch_size`` and does not
depend on the others, so a resumed corpus equals one written in one go.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.io_utils import atomic_write_text

FORMAT = "replaceme-jax self-generated corpus v1"
SELF_SOURCE = "self"    # the calibration-source name of the model's own text
DEFAULT_PASSAGES = 1152  # scripts/generate_calibration.py's default: 1,024 passages and a 10 % validation part


def document_start_token(tokenizer) -> int:
    """The token a document starts after: ``<|endoftext|>`` where the vocabulary has one (the
    pre-training separator of GPT-2-style, SmolLM and Qwen tokenizers), else BOS, else EOS."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ReplaceMeError("the tokenizer has no <|endoftext|>, BOS or EOS token to start a document from; "
                         "fix: pass start_token= (a token id) explicitly")


def generate_corpus(path, model, tokenizer, *, num_samples: int, max_new_tokens: int = 160,
                    temperature: float = 1.0, top_p: float = 1.0, seed: int = 1000, batch_size: int = 64,
                    start_token: int | None = None, prompts: Sequence[str] | None = None, prompt_tokens: int = 32,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Sample ``num_samples`` passages of ``max_new_tokens`` tokens from ``model`` into ``path`` (.jsonl).

    ``prompts``: texts to continue instead of a bare document start; passage ``i`` is the first
    ``prompt_tokens`` tokens of ``prompts[i]`` (after the document start) followed by the model's
    continuation, so the model writes on real topics and refers back to what the prefix named.

    Returns ``path``. A finished ``path`` is never overwritten (delete it to regenerate); a
    ``<path>.partial`` left by an interrupted call with the same settings is continued, one with
    other settings is started over."""
    from replaceme_jax.inference import Generator, SamplingParams
    for name, v in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ReplaceMeError(f"{name} must be a positive integer, got {v!r}")
    if not temperature > 0:
        raise ReplaceMeError(f"temperature must be > 0 to sample a corpus (greedy text repeats itself), got "
                             f"{temperature!r}; fix: 1.0 samples the model's own distribution")
    path = Path(path).expanduser()
    if path.suffix != ".jsonl":
        raise ReplaceMeError(f"the corpus is written as JSON lines; fix: name the output *.jsonl, got {path}")
    if path.exists():
        raise ReplaceMeError(f"{path} already exists; fix: delete it to regenerate, or use it as "
                             f"--config.calibration.source={path}")
    start = document_start_token(tokenizer) if start_token is None else int(start_token)
    prefixes = _prompt_prefixes(prompts, tokenizer, num_samples, prompt_tokens)
    settings = {"format": FORMAT, "num_samples": num_samples, "max_new_tokens": max_new_tokens,
                "temperature": float(temperature), "top_p": float(top_p), "seed": seed,
                "batch_size": batch_size, "start_token": start,
                "model_layers": int(model.config.num_hidden_layers), "vocab_size": int(model.config.vocab_size)}
    if prefixes is not None:
        settings["prompts_sha256"] = hashlib.sha256(json.dumps(prefixes).encode()).hexdigest()
        settings["prompt_tokens"] = prompt_tokens
    partial = path.with_name(path.name + ".partial")
    done = _resume(partial, settings)
    gen = Generator(model, tokenizer, max_batch_size=batch_size)
    sampling = SamplingParams(float(temperature), 0, float(top_p))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "a", encoding="utf-8") as f:
        if done == 0:
            f.write(json.dumps({"settings": settings}) + "\n")
        for first in range(done, num_samples, batch_size):
            rows = min(batch_size, num_samples - first)
            # No EOS stop: every passage gets the full budget, and the chat markers the model
            # writes between turns stay in the text (as they are in what it was tuned on).
            heads = [[start]] * rows if prefixes is None else [[start] + p for p in prefixes[first:first + rows]]
            results = gen.generate(heads, max_new_tokens=max_new_tokens, sampling=sampling,
                                   seed=seed + first, eos_token_ids=())
            texts = ([r.text for r in results] if prefixes is None else
                     [tokenizer.decode(h[1:] + r.tokens, skip_special_tokens=True) for h, r in zip(heads, results)])
            f.write("".join(json.dumps({"text": t}) + "\n" for t in texts))
            f.flush()
            os.fsync(f.fileno())
            if progress is not None:
                progress(first + rows, num_samples)
    lines = partial.read_text(encoding="utf-8").splitlines()[1:]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    partial.unlink()
    return path


def _prompt_prefixes(prompts, tokenizer, num_samples: int, prompt_tokens: int) -> list[list[int]] | None:
    """The first ``prompt_tokens`` token ids of each of the first ``num_samples`` prompts (None: no prompts)."""
    if prompts is None:
        return None
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 1:
        raise ReplaceMeError(f"prompt_tokens must be a positive integer, got {prompt_tokens!r}")
    if isinstance(prompts, str) or len(prompts) < num_samples:
        n = 1 if isinstance(prompts, str) else len(prompts)
        raise ReplaceMeError(f"{num_samples} passages need as many prompts, got {n}; fix: pass a list of at "
                             f"least {num_samples} texts or lower num_samples")
    prefixes = []
    for i, text in enumerate(prompts[:num_samples]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:prompt_tokens] if isinstance(text, str) else []
        if not ids:
            raise ReplaceMeError(f"prompt {i} is empty or not a string; fix: pass non-empty texts")
        prefixes.append([int(t) for t in ids])
    return prefixes


def _resume(partial: Path, settings: dict) -> int:
    """Rows already written to ``partial`` with these settings (whole batches only); 0 starts over."""
    if not partial.is_file():
        return 0
    lines = partial.read_text(encoding="utf-8").split("\n")
    try:
        header = json.loads(lines[0])["settings"]
    except (ValueError, KeyError, TypeError, IndexError):
        header = None
    if header != settings:
        partial.unlink()
        return 0
    rows = []
    for line in lines[1:]:
        try:
            rows.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            break  # a line cut by the interruption, and everything after it
    keep = (len(rows) // settings["batch_size"]) * settings["batch_size"]
    with open(partial, "w", encoding="utf-8") as f:  # drop a torn tail so appends line up with batches
        f.write(lines[0] + "\n" + "".join(json.dumps({"text": t}) + "\n" for t in rows[:keep]))
    return keep


def passages_needed(calibration: int, validation: int, validation_fraction: float, batch_size: int = 64) -> int:
    """Corpus size whose calibration and validation parts hold ``calibration`` and ``validation``
    passages: each text's part is a hash draw, so three standard deviations are added; at least
    ``DEFAULT_PASSAGES``, in whole batches."""
    need = DEFAULT_PASSAGES
    for k, share in ((calibration, 1.0 - validation_fraction), (validation, validation_fraction)):
        if k > 0 and share > 0:
            need = max(need, math.ceil((k + 3 * math.sqrt(k) + 1) / share))
    return -(-need // batch_size) * batch_size


def cached_self_corpus(model, tokenizer, num_samples: int, *,
                       progress: Callable[[int, int], None] | None = None) -> Path:
    """The model's own corpus of ``num_samples`` passages (``generate_corpus``'s sampling defaults),
    written on first use under the data cache, keyed by the model's weights and compute dtype, and
    reused after; an interrupted generation resumes from its ``.partial`` file."""
    from replaceme_jax.data.cache import cache_dir
    from replaceme_jax.eval.request_cache import model_fingerprint

    name = f"{model_fingerprint(model)[:20]}_{model.config.dtype}_n{num_samples}.jsonl"
    path = cache_dir() / "self_generated" / name
    if "+" in str(path):  # it goes into a mixture string, where '+' separates sources
        raise ReplaceMeError(f"the data cache path {path.parent} contains '+', which separates the sources of a "
                             "mixture; fix: set REPLACEME_JAX_CACHE to a directory without '+'")
    if path.is_file():
        return path
    return generate_corpus(path, model, tokenizer, num_samples=num_samples, progress=progress)
