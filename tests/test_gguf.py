"""The embedded default loaded from its GGUF by us vs transformers' own GGUF loader (fp32)."""
import os

import numpy as np
import pytest

from replaceme_jax.checkpoints import load_pretrained
from replaceme_jax.checkpoints.gguf import load_gguf
from replaceme_jax.errors import ReplaceMeError

PROMPTS = [
    "The capital of France is",
    "Hello, my name is John and I like to",
    "In 2024 there were 365 days, and 12 months; the sum is 377.",
    "def fibonacci(n):\n    return",
    "Ünïcödé — quotes “like this” and emoji 🙂 work too.",
]


@pytest.fixture(scope="module")
def reference(smollm2_gguf_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.split(smollm2_gguf_path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(d, gguf_file=f)


def test_tokenizer_ids_match_transformers(smollm2, reference):
    _, ours = smollm2
    _, theirs = reference
    for text in PROMPTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)
    assert ours.eos_token_id == 2 and ours.bos_token_id == 1


def test_logits_and_greedy_tokens_match_transformers(smollm2, reference):
    import jax.numpy as jnp
    import torch
    model, tok = smollm2
    ref_model, _ = reference
    enc = tok(PROMPTS, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(pos)).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-3
    assert (ours.argmax(-1)[real] == ref.argmax(-1)[real]).all()


def test_config_facts(smollm2):
    c = smollm2[0].config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert c.rope_theta == 1e5 and c.tie_word_embeddings and c.vocab_size == 49152
    assert abs(c.rms_norm_eps - 1e-5) < 1e-9


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ReplaceMeError, match="not found.*Fix"):
        load_gguf(str(tmp_path / "nope.gguf"))


def test_unknown_name():
    with pytest.raises(ReplaceMeError, match="unknown model name|checkpoint not found"):
        load_pretrained("no-such-model")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(ReplaceMeError, match="cannot read GGUF file .*bad.gguf"):
        load_gguf(str(bad))


def test_unsupported_gguf_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ReplaceMeError, match="architecture 'gpt2'.*supported"):
        load_gguf(str(path))
