"""Self-generated calibration corpus: deterministic, resumable, readable as a calibration source."""
import json

import pytest

from replaceme_jax.data import load_calibration_texts
from replaceme_jax.data.self_generated import document_start_token, generate_corpus
from replaceme_jax.errors import ReplaceMeError

pytest.importorskip("transformers")
from tiny_models import random_tiny_llama, word_tokenizer  # noqa: E402

KW = dict(num_samples=5, max_new_tokens=6, batch_size=2, seed=7)


@pytest.fixture(scope="module")
def model_tok():
    return random_tiny_llama(vocab_size=40), word_tokenizer(37)


def test_corpus_is_sampled_deterministic_and_a_calibration_source(model_tok, tmp_path):
    model, tok = model_tok
    a = generate_corpus(tmp_path / "a.jsonl", model, tok, **KW)
    b = generate_corpus(tmp_path / "b.jsonl", model, tok, **KW)
    rows = [json.loads(line)["text"] for line in a.read_text().splitlines()]
    assert a.read_text() == b.read_text() and len(rows) == 5
    words = [len(r.split()) for r in rows]  # special tokens sampled are not written as text
    assert max(words) == 6 and min(words) >= 3  # the full budget: no EOS stop (</s> is in the vocabulary)
    assert len(set(rows)) == 5  # sampled (temperature 1), not one greedy text five times
    assert not (tmp_path / "a.jsonl.partial").exists()
    texts = load_calibration_texts(str(a), validation_fraction=0.0)
    assert sorted(texts) == sorted(rows)
    other = generate_corpus(tmp_path / "c.jsonl", model, tok, **{**KW, "seed": 8})
    assert other.read_text() != a.read_text()


def test_interrupted_corpus_resumes_to_the_same_file(model_tok, tmp_path):
    model, tok = model_tok
    whole = generate_corpus(tmp_path / "whole.jsonl", model, tok, **KW).read_text().splitlines()
    # An interrupted run: its header, its first batch and a line torn mid-write.
    target = tmp_path / "resumed.jsonl"
    generate_corpus(tmp_path / "probe.jsonl", model, tok, **{**KW, "num_samples": 2})
    header = {"settings": {"format": "replaceme-jax self-generated corpus v1", "num_samples": 5,
                           "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 7, "batch_size": 2,
                           "start_token": document_start_token(tok), "model_layers": 2, "vocab_size": 40}}
    partial = tmp_path / "resumed.jsonl.partial"
    partial.write_text(json.dumps(header) + "\n" + whole[0] + "\n" + whole[1] + "\n" + whole[2][:5])
    calls = []
    generate_corpus(target, model, tok, **KW, progress=lambda done, total: calls.append(done))
    assert target.read_text().splitlines() == whole
    assert calls == [4, 5]  # the first batch was not sampled again
    # Other settings in a leftover partial file: started over, same result as a fresh run.
    partial.write_text(json.dumps({"settings": {**header["settings"], "seed": 99}}) + "\n" + whole[0] + "\n")
    target.unlink()
    generate_corpus(target, model, tok, **KW)
    assert target.read_text().splitlines() == whole


def test_bad_arguments_name_the_fix(model_tok, tmp_path):
    model, tok = model_tok
    with pytest.raises(ReplaceMeError, match="temperature must be > 0"):
        generate_corpus(tmp_path / "x.jsonl", model, tok, **{**KW, "temperature": 0.0})
    with pytest.raises(ReplaceMeError, match="num_samples must be a positive integer"):
        generate_corpus(tmp_path / "x.jsonl", model, tok, **{**KW, "num_samples": 0})
    with pytest.raises(ReplaceMeError, match=r"\*\.jsonl"):
        generate_corpus(tmp_path / "x.txt", model, tok, **KW)
    (tmp_path / "done.jsonl").write_text('{"text": "w1"}\n')
    with pytest.raises(ReplaceMeError, match="already exists; fix: delete it"):
        generate_corpus(tmp_path / "done.jsonl", model, tok, **KW)
    assert (tmp_path / "done.jsonl").read_text() == '{"text": "w1"}\n'  # never overwritten


def test_document_start_token_prefers_the_pretraining_separator():
    tok = word_tokenizer(5)
    assert document_start_token(tok) == tok.bos_token_id  # no <|endoftext|>: BOS
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    assert document_start_token(tok) == tok.get_vocab()["<|endoftext|>"]


def test_self_source_is_generated_once_and_mixed(model_tok, tmp_path, monkeypatch):
    """``calibration.source=<file>+self``: the pipeline samples the model's own corpus once, under
    the data cache, sized for the run, and reads it as the mixture's share; a second run reuses it."""
    from replaceme_jax.data import self_generated
    from replaceme_jax.replaceme.pipeline import calibration_batches, resolve_self_source
    from replaceme_jax.settings import Settings
    model, tok = model_tok
    monkeypatch.setenv("REPLACEME_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(self_generated, "DEFAULT_PASSAGES", 8)  # one batch of 64 passages, not 1,152
    own = tmp_path / "own.txt"
    own.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 30}" for j in range(12)) for i in range(40)))
    cfg = Settings().replace(**{"calibration.source": f"{own}+self", "calibration.num_samples": 20,
                                "calibration.validation_samples": 2, "calibration.max_length": 16})
    resolved = resolve_self_source(cfg, model, tok)
    first, corpus = resolved.calibration.source.split("+")
    assert first == str(own) and corpus.startswith(str(tmp_path / "cache" / "self_generated"))
    assert len(open(corpus).read().splitlines()) == 64 and resolved.heal.source == ""
    assert calibration_batches(tok, resolved)  # 10 passages of each source, tokenised
    texts = load_calibration_texts(resolved.calibration.source, num_samples=20)
    assert sum(t in set(open(own).read().split("\n\n")) for t in texts) == 10
    # A second run finds the corpus and samples nothing.
    monkeypatch.setattr(self_generated, "generate_corpus", lambda *a, **k: pytest.fail("generated again"))
    assert resolve_self_source(cfg, model, tok) == resolved
    assert resolve_self_source(cfg.replace(**{"calibration.source": str(own)}), model, tok).calibration.source == str(own)
    # On a pod each host has its own cache: generating on some hosts only would hang the others.
    import jax
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ReplaceMeError, match="generate_calibration.py"):
        resolve_self_source(cfg, model, tok)
    # Without a model there is nothing to sample: the error says where the text comes from.
    with pytest.raises(ReplaceMeError, match="generate_calibration.py"):
        load_calibration_texts("self", num_samples=4)


def test_corpus_size_covers_both_parts():
    from replaceme_jax.data.self_generated import passages_needed
    assert passages_needed(512, 16, 0.1) == 1152  # the script's default corpus covers boolq+self at 1,024
    n = passages_needed(1024, 16, 0.1)
    assert n % 64 == 0 and n * 0.9 >= 1024 + 3 * 32  # three standard deviations of the hash split
    assert passages_needed(100, 300, 0.1) * 0.1 >= 300


def test_prompted_passages_continue_the_prompt_prefixes(model_tok, tmp_path):
    model, tok = model_tok
    prompts = [f"w{i} w{i + 1} w{i + 2} w{i + 3}" for i in range(1, 6)]
    out = generate_corpus(tmp_path / "p.jsonl", model, tok, **KW, prompts=prompts, prompt_tokens=2)
    rows = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(rows) == 5
    for i, row in enumerate(rows, start=1):
        words = row.split()
        assert words[:2] == [f"w{i}", f"w{i + 1}"]  # the prefix, cut to prompt_tokens, stays in the passage
        assert 2 + 3 <= len(words) <= 2 + 6       # then the sampled continuation
    again = generate_corpus(tmp_path / "q.jsonl", model, tok, **KW, prompts=prompts, prompt_tokens=2)
    assert again.read_text() == out.read_text()
    bare = generate_corpus(tmp_path / "bare.jsonl", model, tok, **KW)
    assert bare.read_text() != out.read_text()
    with pytest.raises(ReplaceMeError, match="5 passages need as many prompts, got 2"):
        generate_corpus(tmp_path / "x.jsonl", model, tok, **KW, prompts=prompts[:2])
    with pytest.raises(ReplaceMeError, match="prompt_tokens must be a positive integer"):
        generate_corpus(tmp_path / "x.jsonl", model, tok, **KW, prompts=prompts, prompt_tokens=0)
    with pytest.raises(ReplaceMeError, match="prompt 1 is empty"):
        generate_corpus(tmp_path / "x.jsonl", model, tok, **KW, prompts=[prompts[0], "", *prompts[2:]])
