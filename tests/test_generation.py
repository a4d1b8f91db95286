"""KV-cache decoding and sampling: cached steps vs full forwards, greedy tokens vs transformers."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.inference import Generator, SamplingParams
from replaceme_jax.inference.sampling import sample
from replaceme_jax.models.modeling import KVCache

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tiny_models import FAMILIES, random_tiny_llama, reference_pair, word_tokenizer  # noqa: E402


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, torch model, our model loaded from its save_pretrained directory)."""
    return reference_pair(request.param, FAMILIES[request.param](), tmp_path_factory)


def test_cached_steps_equal_full_forward(family):
    """Prefill of left-padded prompts, then decode steps: each step's logits equal a full forward over
    the same prefix (random weights, every family: GQA, window, biases, q/k norms, llama3 rope).

    Everything is jitted (eager calls of a tiny model are slow on a CPU): the prefill and decode step
    through nnx.split/merge, and the full forwards as one call over every (step, row) prefix,
    right-padded to one width: a causal model's logits at a row's last real token do not see the
    padding after it, and its positions start at 0 as for the prefix alone."""
    _, _, model = family
    rng = np.random.RandomState(1)
    vocab, lengths, steps, width = model.config.vocab_size, [9, 5, 7], 6, 9
    prompts = [rng.randint(3, vocab, n) for n in lengths]
    extra = rng.randint(3, vocab, (3, steps))
    ids, mask = np.zeros((3, width), np.int32), np.zeros((3, width), np.int32)
    for j, p in enumerate(prompts):
        ids[j, width - len(p):], mask[j, width - len(p):] = p, 1

    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda st, i, m, c: nnx.merge(graphdef, st).prefill(i, m, c))
    decode_step = jax.jit(lambda st, t, pos, c: nnx.merge(graphdef, st).decode_step(t, pos, c))
    forward = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))

    # Full forwards: row (s, j) is prompt j plus the first s extra tokens, right-padded.
    prefixes = [np.concatenate([p, extra[j, :s]]) for s in range(steps + 1) for j, p in enumerate(prompts)]
    full_ids = np.zeros((len(prefixes), max(lengths) + steps), np.int32)
    full_mask = np.zeros_like(full_ids)
    for r, seq in enumerate(prefixes):
        full_ids[r, :len(seq)], full_mask[r, :len(seq)] = seq, 1
    full_logits = np.asarray(forward(state, jnp.asarray(full_ids), jnp.asarray(full_mask)))
    full = full_logits[np.arange(len(prefixes)), [len(seq) - 1 for seq in prefixes]].reshape(steps + 1, 3, -1)

    cache = KVCache.empty(model.config, 3, width + steps + 3)
    logits, cache = prefill(state, jnp.asarray(ids), jnp.asarray(mask), cache)
    positions = jnp.asarray(lengths, jnp.int32)
    for s in range(steps + 1):
        for j in range(len(prompts)):
            np.testing.assert_allclose(np.asarray(logits[j]), full[s, j], atol=1e-4, rtol=0, err_msg=f"step {s}")
        if s < steps:
            logits, cache = decode_step(state, jnp.asarray(extra[:, s]), positions + s, cache)


def test_greedy_tokens_equal_transformers_generate(family):
    name, ref, model = family
    gen = Generator(model, word_tokenizer(90), steps_per_call=4)
    rng = np.random.RandomState(2)
    prompts = [rng.randint(3, model.config.vocab_size, n).tolist() for n in (6, 11, 3)]
    ours = gen.generate(prompts, max_new_tokens=20, eos_token_ids=())
    for p, r in zip(prompts, ours):
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(p):].tolist()
        assert r.tokens == theirs, name
        assert r.finish_reason == "length" and r.prompt_tokens == len(p)


def test_real_smollm2_greedy_equals_transformers(smollm2):
    from replaceme_jax.checkpoints import _cached_default
    from replaceme_jax.checkpoints.registry import resolve_default_path
    model, tok = smollm2
    src = resolve_default_path("smollm2-135m")
    hf_dir = _cached_default(os.path.basename(src).removesuffix(".gguf"), src)
    if hf_dir is None:
        pytest.skip("no converted cache directory for the transformers reference")
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]
    # 32 new tokens per prompt (96 greedy tokens compared exactly): the transformers reference runs
    # one prompt at a time on the CPU, so every extra token costs about 0.1 s per prompt.
    ours = Generator(model, tok).generate(prompts, max_new_tokens=32, eos_token_ids=())
    for p, r in zip(prompts, ours):
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            theirs = ref.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert r.tokens == theirs, p


@pytest.fixture(scope="module")
def tiny():
    return Generator(random_tiny_llama(vocab_size=40), word_tokenizer(37), steps_per_call=3)


def test_stops_eos_and_stop_strings(tiny):
    free = tiny.generate(["w1 w2 w3"], max_new_tokens=12, eos_token_ids=())[0]
    assert len(free.tokens) == 12 and free.finish_reason == "length"
    # The row's own third token as EOS: generation ends there, EOS kept in tokens, not in text.
    eos = free.tokens[2]
    first = free.tokens.index(eos)
    r = tiny.generate(["w1 w2 w3"], max_new_tokens=12, eos_token_ids=[eos])[0]
    assert r.tokens == free.tokens[:first + 1] and r.finish_reason == "eos"
    words = free.text.split()
    stop = words[3] if len(words) > 3 else words[-1]
    s = tiny.generate(["w1 w2 w3"], max_new_tokens=12, eos_token_ids=(), stop=[stop])[0]
    assert s.finish_reason == "stop" and stop not in s.text and free.text.startswith(s.text)


def test_batch_rows_do_not_affect_each_other(tiny):
    prompts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11", "w3 w3"]
    batched = tiny.generate(prompts, max_new_tokens=9, eos_token_ids=())
    for p, b in zip(prompts, batched):
        assert tiny.generate([p], max_new_tokens=9, eos_token_ids=())[0].tokens == b.tokens


def test_sampling_is_reproducible_and_respects_top_k_top_p(tiny):
    params = SamplingParams(temperature=1.5)
    a = tiny.generate(["w1 w2"] * 3, max_new_tokens=10, sampling=params, seed=7, eos_token_ids=())
    b = tiny.generate(["w1 w2"] * 3, max_new_tokens=10, sampling=params, seed=7, eos_token_ids=())
    c = tiny.generate(["w1 w2"] * 3, max_new_tokens=10, sampling=params, seed=8, eos_token_ids=())
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]
    greedy = tiny.generate(["w1 w2"], max_new_tokens=10, eos_token_ids=())[0].tokens
    for p in (SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=2.0, top_p=1e-6)):
        assert tiny.generate(["w1 w2"], max_new_tokens=10, sampling=p, seed=3, eos_token_ids=())[0].tokens == greedy


def test_sample_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.vmap(lambda k, p: sample(logits, k, p)[0], in_axes=(0, None))
    k2 = np.bincount(np.asarray(draw(keys, SamplingParams(temperature=1.0, top_k=2))), minlength=4) / 4000
    assert k2[2:].sum() == 0 and abs(k2[0] - 0.5 / 0.8) < 0.03
    p = np.bincount(np.asarray(draw(keys, SamplingParams(temperature=1.0, top_p=0.7))), minlength=4) / 4000
    assert p[2:].sum() == 0 and abs(p[0] - 0.5 / 0.8) < 0.03  # 0.5 + 0.3 reaches 0.7
    full = np.bincount(np.asarray(draw(keys, SamplingParams(temperature=1.0))), minlength=4) / 4000
    np.testing.assert_allclose(full, [0.5, 0.3, 0.15, 0.05], atol=0.03)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=5000), "passes the model's context of 2048 tokens.*Fix"),
    (dict(stop=3), "stop must be a string or a list of strings"),
    (dict(stop=["ok", 5]), "stop must be a string or a list of strings"),
])
def test_bad_generation_arguments(tiny, kwargs, match):
    with pytest.raises(ReplaceMeError, match=match):
        tiny.generate(["w1 w2"], **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=5), "no effect with greedy decoding.*Fix"),
    (dict(temperature=1.0, top_p=0.0), "top_p must be in"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(temperature=1.0, top_k=-2), "top_k must be"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ReplaceMeError, match=match):
        SamplingParams(**kwargs)


def test_chat_without_template_and_empty_prompt(tiny):
    with pytest.raises(ReplaceMeError, match="no chat template"):
        tiny.generate(["w1"], chat=True)
    with pytest.raises(ReplaceMeError, match="empty prompt"):
        tiny.generate([[]])


def test_cache_bytes_match_the_shape_model(tiny):
    config = tiny.config
    cache = KVCache.empty(config, 4, 96)
    assert sum(x.nbytes for x in cache.k + cache.v) == KVCache.nbytes(config, 4, 96)
    assert len(cache.k) == config.num_hidden_layers and cache.k[0].shape == (4, config.num_key_value_heads, 96, config.head_dim)
