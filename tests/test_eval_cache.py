"""Resumable evaluation: the per-request cache survives processes, torn lines and parallel writers."""
import multiprocessing
import os

import jax.numpy as jnp
import pytest

from replaceme_jax.eval.request_cache import RequestCache, model_fingerprint, request_key
from tiny_models import random_tiny_llama, word_tokenizer

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from replaceme_jax.eval.lm_eval_backend import ReplaceMeJaxLM  # noqa: E402

REQUESTS = [(" ".join(f"w{(i * 7 + j) % 30}" for j in range(3 + i % 9)), f" w{i % 30} w{(i + 3) % 30}")
            for i in range(24)]


def _ll(args):
    return [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=0) for a in args]


def test_interrupted_evaluation_resumes_without_rescoring(tmp_path):
    model, tok = random_tiny_llama(40), word_tokenizer()
    first = ReplaceMeJaxLM(model=model, tokenizer=tok, max_length=64, cache_dir=str(tmp_path))
    done = first.loglikelihood(_ll(REQUESTS[:10]))  # the run that was "interrupted" after 10
    again = ReplaceMeJaxLM(model=model, tokenizer=tok, max_length=64, cache_dir=str(tmp_path))
    full = again.loglikelihood(_ll(REQUESTS))
    assert again.cache_hits == 10
    assert full[:10] == done
    fresh = ReplaceMeJaxLM(model=model, tokenizer=tok, max_length=64)
    ref = fresh.loglikelihood(_ll(REQUESTS))
    assert 0 < again.scorer.tokens_fed < fresh.scorer.tokens_fed  # only the 14 new ones ran
    assert [g for _, g in full] == [g for _, g in ref]
    assert max(abs(a - b) for (a, _), (b, _) in zip(full, ref)) < 1e-5
    third = ReplaceMeJaxLM(model=model, tokenizer=tok, max_length=64, cache_dir=str(tmp_path))
    assert third.loglikelihood(_ll(REQUESTS)) == full and third.scorer.tokens_fed == 0


def test_fingerprint_changes_with_any_weight():
    a, b = random_tiny_llama(40), random_tiny_llama(40)
    assert model_fingerprint(a) == model_fingerprint(b)
    layer = b.model.layers[1].mlp.down_proj
    layer.kernel.value = layer.kernel.value.at[0, 0].add(jnp.float32(1e-6))
    assert model_fingerprint(a) != model_fingerprint(b)


def test_torn_lines_are_skipped(tmp_path):
    cache = RequestCache(tmp_path, "m")
    cache.put(["a", "b"], [-1.5, -2.25], [True, False])
    with open(cache._file, "a") as f:
        f.write('{"k": "c", "ll": -3.')   # a writer killed mid-line
    reread = RequestCache(tmp_path, "m")
    assert len(reread) == 2 and reread.get("a") == (-1.5, True) and reread.get("c") is None
    reread.put(["c"], [-3.0], [True])
    assert RequestCache(tmp_path, "m").get("c") == (-3.0, True)


def _writer(root, start):
    cache = RequestCache(root, "m")
    for i in range(start, start + 200):
        cache.put([request_key([i], [i + 1])], [float(-i)], [i % 2 == 0])


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 1000 * k)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    cache = RequestCache(tmp_path, "m")
    assert len(cache) == 600
    assert cache.get(request_key([2003], [2004])) == (-2003.0, False)
    assert len(os.listdir(cache.dir)) >= 3  # one file per writer process
