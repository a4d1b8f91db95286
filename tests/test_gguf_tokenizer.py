"""GGUF tokenizers of each pre-tokenizer kind vs the tokenizer they came from and vs transformers.

Each case trains a small BPE tokenizer shaped like one family's tokenizer.json (its split, normalizer,
merge rule), writes its vocabulary, merges and special ids into a GGUF with gguf's own writer, and
checks that our rebuilt tokenizer gives the original's ids, transformers' GGUF loader's ids, and that
the hf/ export reloads to the same ids, on a battery of code, punctuation, digits, whitespace and
non-Latin text.
"""
import json
import os
import unicodedata

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from replaceme_jax.checkpoints import gguf_tokenizer as gt  # noqa: E402
from replaceme_jax.errors import ReplaceMeError  # noqa: E402

BATTERY = [
    "The capital of France is Paris. It's 2,140,526 people (2024); they'll say I'd've known.",
    "def parse(n):\n    return {'user_id': n/2, \"ok\": [1, 22, 333, 4444]}  # (n/s_id)\n",
    "if (x != y && z >= 10) { printf(\"%d\\n\", x); }\r\n\tend;",
    "Hello   world\n\n\n  trailing spaces   \n\tTabs\t\tand  double  spaces",
    "3.14159 + 2.71828 = 5.85987; 1e-5, 0x1F, 1_000_000, 12345678901234567890",
    "Привет, мир! Ünïcödé — «quotes» and “curly” ones… ¿Qué tal? Ça va.",
    "价格是 123 元。東京タワーは高い。한국어 텍스트도 있다. مرحبا بالعالم",
    "emoji 🙂🚀 and symbols ©®™ ∑∫√ ← → ✓",
    "I'M SHOUTING, He'S QUIETER; 'quoted' words' ends",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "",
    " leading space",
    "a<think>b</think>c",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
USER_DEFINED = ["<think>", "</think>"]


def _corpus():
    from replaceme_jax.data.calibration import load_calibration_texts
    texts = load_calibration_texts("boolq", num_samples=600)
    return texts + BATTERY[:9] * 10


def _byte_level_reference(kind: str) -> Tokenizer:
    """A trained tokenizer shaped like the family's tokenizer.json."""
    ignore_merges = kind == "llama-bpe"
    tk = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if kind == "qwen2":
        tk.normalizer = normalizers.NFC()
    split = {"qwen2": gt.QWEN2_SPLIT, "llama-bpe": gt.LLAMA3_SPLIT}.get(kind)
    if split:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif kind == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tk.train_from_iterator(_corpus(), trainer)
    tk.add_tokens(USER_DEFINED)
    return tk


def _write_gguf(path, arch: str, tokens, types, *, model: str, pre: str | None, merges=None, scores=None,
                bos=None, eos=None, add_bos=None, template=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e4)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if template:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# (pre name, architecture, reference kind, llama.cpp's default add_bos)
BYTE_LEVEL_CASES = [("qwen2", "qwen2", "qwen2", False), ("llama-bpe", "llama", "llama-bpe", True),
                    ("smollm", "llama", "smollm", False), ("gpt-2", "llama", "gpt2", False)]


def _byte_level_gguf(tmp_path, pre, arch, kind, *, add_bos=None, name="t.gguf"):
    ref = _byte_level_reference(kind)
    model = json.loads(ref.to_str())["model"]
    tokens = [None] * (max(model["vocab"].values()) + 1)
    for t, i in model["vocab"].items():
        tokens[i] = t
    tokens += USER_DEFINED
    types = [3 if t in SPECIALS else 4 if t in USER_DEFINED else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    bos = tokens.index("<|begin_of_text|>") if kind == "llama-bpe" else tokens.index("<|endoftext|>")
    path = _write_gguf(tmp_path / name, arch, tokens, types, model="gpt2", pre=pre, merges=merges,
                       bos=bos, eos=tokens.index("<|im_end|>"), add_bos=add_bos, template=TEMPLATE)
    return ref, path


def _ours(path):
    return gt.tokenizer_from_gguf(gguf.GGUFReader(str(path)), str(path))


def _transformers(path):
    pytest.importorskip("torch")  # transformers' GGUF config path imports it
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("pre,arch,kind,default_bos", BYTE_LEVEL_CASES)
def test_byte_level_ids_match_source_and_transformers(tmp_path, pre, arch, kind, default_bos):
    ref, path = _byte_level_gguf(tmp_path, pre, arch, kind, add_bos=False)
    ours, theirs = _ours(path), _transformers(path)
    for text in BATTERY:
        ids = ours(text)["input_ids"]
        assert ids == ref.encode(text).ids, (pre, text)
        assert ids == theirs(text)["input_ids"], (pre, text)
        assert ours.decode(ids) == text
    # Control tokens stay whole and are special; user-defined ones stay whole and are text.
    im_start = ours.convert_tokens_to_ids("<|im_start|>")
    assert ours("<|im_start|>")["input_ids"] == [im_start] and im_start in ours.all_special_ids
    think = ours.convert_tokens_to_ids("<think>")
    assert ours("<think>")["input_ids"] == [think] and think not in ours.all_special_ids
    assert ours.eos_token == theirs.eos_token == "<|im_end|>"
    assert set(ours.all_special_tokens) >= set(SPECIALS)
    chat = [{"role": "user", "content": "Hi (n/s_id) 123"}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)


@pytest.mark.parametrize("pre,arch,kind,default_bos", BYTE_LEVEL_CASES)
def test_bos_flag_and_llama_cpp_default(tmp_path, pre, arch, kind, default_bos):
    for flag in (True, False, None):
        ref, path = _byte_level_gguf(tmp_path, pre, arch, kind, add_bos=flag, name=f"t{flag}.gguf")
        ours = _ours(path)
        want = default_bos if flag is None else flag
        ids = ours("some text")["input_ids"]
        assert (ids[0] == ours.bos_token_id) == want, (pre, flag)
        assert ids[int(want):] == ref.encode("some text").ids


def test_qwen2_normalizes_to_nfc(tmp_path):
    ref, path = _byte_level_gguf(tmp_path, "qwen2", "qwen2", "qwen2", add_bos=False)
    ours = _ours(path)
    decomposed = unicodedata.normalize("NFD", "Ünïcödé café naïve")
    assert decomposed != unicodedata.normalize("NFC", decomposed)
    assert ours(decomposed)["input_ids"] == ref.encode(decomposed).ids == ours(
        unicodedata.normalize("NFC", decomposed))["input_ids"]


def test_qwen2_split_differs_from_gpt2_split(tmp_path):
    """The failure the issue reported: the GPT-2 split on a Qwen2 vocabulary gives other ids."""
    _, qwen = _byte_level_gguf(tmp_path, "qwen2", "qwen2", "qwen2", add_bos=False, name="q.gguf")
    right = _ours(qwen)
    wrong = _ours(qwen).backend_tokenizer
    wrong.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = _corpus()[:100] + BATTERY
    differ = sum(wrong.encode(t).ids != right(t)["input_ids"] for t in texts)
    assert differ >= 10, differ


def test_unknown_pre_tokenizer_is_an_error(tmp_path):
    _, path = _byte_level_gguf(tmp_path, "no-such-pre", "llama", "gpt2", add_bos=False)
    with pytest.raises(ReplaceMeError, match="pre-tokenizer 'no-such-pre'.*Fix"):
        _ours(path)


@pytest.mark.parametrize("pre", ["default", None])
def test_unrecorded_pre_tokenizer_warns_and_names_the_fallback(tmp_path, pre):
    ref, path = _byte_level_gguf(tmp_path, pre, "llama", "gpt2", add_bos=False)
    with pytest.warns(UserWarning, match="GPT-2 pattern"):
        ours = _ours(path)
    theirs = _transformers(path)
    for text in BATTERY:
        assert ours(text)["input_ids"] == ref.encode(text).ids == theirs(text)["input_ids"]


def test_every_table_entry_builds(tmp_path):
    """Every name in the table yields a working tokenizer (the regexes compile, the pieces fit)."""
    _, path = _byte_level_gguf(tmp_path, "gpt-2", "llama", "gpt2", add_bos=False)
    reader = gguf.GGUFReader(str(path))
    for name, spec in gt.PRE_TOKENIZERS.items():
        tok = gt._byte_level(gt._Metadata(reader), spec)
        assert tok.decode(tok(BATTERY[1])["input_ids"]) == BATTERY[1], name


# SentencePiece ("llama" model: Llama 2, Mistral, TinyLlama): pieces with scores, byte fallback.
def _sentencepiece_gguf(tmp_path, *, add_bos=None):
    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                  show_progress=False)
    tk.train_from_iterator([t for t in _corpus() if t.isascii()], trainer)
    model = json.loads(tk.to_str())["model"]
    tokens = [None] * len(model["vocab"])
    for t, i in model["vocab"].items():
        tokens[i] = t
    # SentencePiece scores: a piece made by an earlier merge scores higher.
    rank = {("".join(m) if isinstance(m, list) else m.replace(" ", "")): r for r, m in enumerate(model["merges"])}
    scores = [0.0 if t in ("<unk>", "<s>", "</s>") or t in byte_tokens else float(-rank.get(t, len(rank)))
              for t in tokens]
    types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t in byte_tokens else 1 for t in tokens]
    path = _write_gguf(tmp_path / "spm.gguf", "llama", tokens, types, model="llama", pre="default",
                       scores=scores, bos=1, eos=2, add_bos=add_bos)
    return tk, path


def test_sentencepiece_ids_match_source_and_transformers(tmp_path):
    ref, path = _sentencepiece_gguf(tmp_path)
    ours, theirs = _ours(path), _transformers(path)
    for text in BATTERY:
        ids = ours(text)["input_ids"]
        assert ids == theirs(text)["input_ids"], text
        assert ids[0] == ours.bos_token_id == 1  # llama.cpp and transformers add BOS by default here
        assert ids[1:] == ref.encode(text).ids, text
    assert ours.eos_token == "</s>" and ours.unk_token == "<unk>"


def test_exported_tokenizer_reloads_with_the_same_ids(tmp_path):
    from replaceme_jax.checkpoints.hf import load_tokenizer, save_hf
    from tiny_models import random_tiny_llama
    cases = [_byte_level_gguf(tmp_path, pre, arch, kind, add_bos=True, name=f"{pre}.gguf")[1]
             for pre, arch, kind, _ in BYTE_LEVEL_CASES] + [_sentencepiece_gguf(tmp_path)[1]]
    model = random_tiny_llama(vocab_size=64)
    for path in cases:
        ours = _ours(path)
        out = tmp_path / f"hf-{path.stem}"
        save_hf(model, out, tokenizer=ours)
        back = load_tokenizer(out)
        for text in BATTERY:
            assert back(text)["input_ids"] == ours(text)["input_ids"], (path.name, text)
        assert back.chat_template == ours.chat_template
        assert (back.bos_token, back.eos_token) == (ours.bos_token, ours.eos_token)
        assert os.path.exists(out / "tokenizer.json")
