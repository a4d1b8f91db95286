"""Perplexity against a direct transformers (PyTorch) computation on the same windows."""
import math

import numpy as np
import pytest
import torch
import transformers

from replaceme_jax.checkpoints.hf import save_hf
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.eval.perplexity import corpus_windows, paired_ratio, perplexity, tokenize_corpus
from tiny_models import random_tiny_llama


def test_non_overlapping_windows():
    assert corpus_windows(10, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert corpus_windows(8, 4, stride=4) == [(0, 4, 1), (4, 8, 5)]


def test_sliding_windows_score_every_token_once_with_context():
    n, window, stride = 103, 16, 5
    spans = corpus_windows(n, window, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, n))  # every token but the first, exactly once, in order
    assert all(end - begin <= window and first > begin for begin, end, first in spans)
    # After the first window each token sees at least window - stride tokens of context.
    assert all(first - begin >= window - stride for begin, _, first in spans[1:])


@pytest.mark.parametrize("kw,match", [
    (dict(window=1), "at least 2 tokens"),
    (dict(window=8, stride=0), "stride"),
    (dict(window=8, stride=9), "stride"),
])
def test_window_errors(kw, match):
    with pytest.raises(ReplaceMeError, match=match):
        corpus_windows(100, **kw)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    model = random_tiny_llama(256, max_position_embeddings=512, tie_word_embeddings=False,
                              bos_token_id=None, eos_token_id=None)
    path = save_hf(model, tmp_path_factory.mktemp("ppl") / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, ref


def _reference_ppl(torch_model, ids, window, stride=None):
    """The Hugging Face perplexity recipe, written out independently of corpus_windows."""
    stride = stride or window
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        chunk = torch.tensor(ids[begin:end])[None]
        with torch.no_grad():
            logp = torch.log_softmax(torch_model(chunk).logits[0].double(), -1)
        for pos in range(max(prev_end, begin + 1), end):  # predict token pos from chunk[:pos-begin]
            total -= float(logp[pos - begin - 1, ids[pos]])
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return math.exp(total / count), count


@pytest.mark.parametrize("stride", [None, 24])
def test_matches_transformers_on_the_same_windows(tiny_pair, stride):
    model, ref = tiny_pair
    ids = np.random.RandomState(1).randint(0, 256, 300)
    want, count = _reference_ppl(ref, ids.tolist(), 64, stride)
    got = perplexity(model, ids, window=64, stride=stride, batch_size=3)
    assert got.num_tokens == count
    assert abs(got.ppl / want - 1) < 1e-4, (got.ppl, want)
    # Batching and the padded last window do not change the result.
    two = perplexity(model, ids, window=64, stride=stride, batch_size=2)
    assert abs(two.ppl / got.ppl - 1) < 1e-5


def test_max_windows_and_result_fields(tiny_pair):
    model, ref = tiny_pair
    ids = np.random.RandomState(2).randint(0, 256, 500)
    got = perplexity(model, ids, window=64, max_windows=2, batch_size=3)
    want, count = _reference_ppl(ref, ids[:128].tolist(), 64)
    assert (got.num_windows, got.num_tokens, got.window, got.stride, got.corpus_tokens) == (2, count, 64, 64, 500)
    assert abs(got.ppl / want - 1) < 1e-4
    assert got.to_dict()["ppl"] == got.ppl and math.isclose(math.log(got.ppl), got.nll)


def test_window_values_add_up_to_the_reference(tiny_pair):
    """Per-window NLLs: each window's equals the transformers recipe on that window alone."""
    model, ref = tiny_pair
    ids = np.random.RandomState(3).randint(0, 256, 200)
    got = perplexity(model, ids, window=64, batch_size=2)
    assert len(got.window_nll) == got.num_windows == 4 and sum(got.window_tokens) == got.num_tokens
    for k, (nll, n) in enumerate(zip(got.window_nll, got.window_tokens)):
        want, count = _reference_ppl(ref, ids[64 * k:64 * (k + 1)].tolist(), 64)
        assert count == n and abs(nll / n - math.log(want)) < 1e-4
    assert abs(sum(got.window_nll) / got.num_tokens - got.nll) < 1e-9


def test_paired_ratio_against_a_float64_bootstrap_written_out():
    rng = np.random.RandomState(0)
    tokens = [1023] * 30
    a = {"window_nll": list(rng.uniform(2000, 4000, 30)), "window_tokens": tokens, "window": 1024, "stride": 1024,
         "num_windows": 30}
    b = {**a, "window_nll": [x + rng.normal(30, 40) for x in a["window_nll"]]}
    got = paired_ratio(a, b, iters=2000, seed=5)
    want = math.exp((sum(b["window_nll"]) - sum(a["window_nll"])) / sum(tokens))
    assert abs(got["ratio"] - want) < 1e-12 and got["windows"] == 30
    rng = np.random.default_rng(5)  # the same draws (in chunks of 1,000 windows), each ratio written out
    draws = np.concatenate([rng.integers(0, 30, (1000, 30)), rng.integers(0, 30, (1000, 30))])
    ratios = sorted(math.exp(sum(b["window_nll"][i] - a["window_nll"][i] for i in d) / (1023 * 30)) for d in draws)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    assert got["ci"][0] < want < got["ci"][1]
    assert abs(got["ci"][0] - lo) < 1e-9 and abs(got["ci"][1] - hi) < 1e-9
    same = paired_ratio(a, a, iters=100)
    assert same["ratio"] == 1.0 and same["ci"] == [1.0, 1.0]
    with pytest.raises(ReplaceMeError, match="same windows"):
        paired_ratio(a, {**b, "num_windows": 31}, iters=10)
    with pytest.raises(ReplaceMeError, match="same windows"):
        paired_ratio({**a, "window_nll": []}, b, iters=10)


def test_bad_inputs(tiny_pair):
    model, _ = tiny_pair
    ids = np.arange(50) % 256
    with pytest.raises(ReplaceMeError, match="max_windows"):
        perplexity(model, ids, max_windows=0)
    with pytest.raises(ReplaceMeError, match="batch_size"):
        perplexity(model, ids, batch_size=0)
    with pytest.raises(ReplaceMeError, match=r"\[0, 256\)"):
        perplexity(model, np.array([1, 2, 300]))
    with pytest.raises(ReplaceMeError, match="1-D"):
        perplexity(model, ids.reshape(5, 10))
    with pytest.raises(ReplaceMeError, match="at least 2"):
        perplexity(model, np.array([3]))

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 256 for c in text]

    with pytest.raises(ReplaceMeError, match="empty"):
        perplexity(model, Tok(), ["  ", ""])
    with pytest.raises(ReplaceMeError, match="texts were given together with token ids"):
        perplexity(model, ids, ["some text"])
    # A tokenizer with explicit texts: joined with the separator, tokenised once.
    texts = ["first text here", "second one"]
    assert perplexity(model, Tok(), texts, window=8).corpus_tokens == len(tokenize_corpus(Tok(), texts))


@pytest.mark.slow
def test_smollm2_heldout_matches_transformers(smollm2, tmp_path):
    """Default corpus (held-out Wikipedia), real SmolLM2: within 0.1 % of transformers."""
    from replaceme_jax.data.corpora import heldout_wikipedia_texts

    model, tokenizer = smollm2
    got = perplexity(model, tokenizer, window=512, max_windows=4, batch_size=2)
    path = save_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = tokenize_corpus(tokenizer, heldout_wikipedia_texts())
    want, count = _reference_ppl(ref, ids[:4 * 512].tolist(), 512)
    assert got.num_tokens == count and got.corpus_tokens == len(ids)
    assert abs(got.ppl / want - 1) < 1e-3, (got.ppl, want)
    print(f"SmolLM2 held-out ppl (4 x 512 tokens): ours {got.ppl:.4f}, transformers {want:.4f}")


def test_non_finite_perplexity_is_an_error_not_a_nan_report():
    from flax import nnx
    model = random_tiny_llama(vocab_size=64)
    state = nnx.state(model, nnx.Param)
    down = state["model"]["layers"][0]["mlp"]["down_proj"]["kernel"]
    down.value = down.value.at[0, 0].set(np.nan)
    nnx.update(model, state)
    ids = np.arange(40, dtype=np.int32) % 64
    with pytest.raises(ReplaceMeError, match=r"perplexity is not finite: 2 of 2 windows"):
        perplexity(model, ids, window=20)
