"""The tokenizer a GGUF file describes, rebuilt as a transformers fast tokenizer.

A GGUF stores the vocabulary, the merges, the token types and the special ids, but not how text is
split before BPE: ``tokenizer.ggml.pre`` only *names* a pre-tokenizer that llama.cpp compiles in.
Splitting with the wrong one gives ids the model never saw (Qwen2 with the GPT-2 split: 2.7 % more
tokens on prose, "(n" as two tokens), so each name maps to the split of the model's own
``tokenizer.json``; the names and groups follow llama.cpp (``llama-vocab.cpp``) and transformers' GGUF
loader. A name not in the table is an error: guessing would be silent corruption.

Byte-level BPE (``tokenizer.ggml.model = "gpt2"``) is built here from ``tokenizers`` parts; the
SentencePiece path (``"llama"``: Llama 2, Mistral, TinyLlama) uses transformers' ``LlamaTokenizer``
with merges recovered from the scores, as transformers does.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from replaceme_jax.errors import ReplaceMeError

# The split patterns, as written in each family's tokenizer.json (Oniguruma syntax).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTION
               + r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTION
               + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """How one family splits text before byte-level BPE."""
    split: str = GPT2_SPLIT
    digits: bool = False         # every digit on its own first (StarCoder, SmolLM)
    nfc: bool = False            # NFC-normalize first (Qwen2's tokenizer.json)
    ignore_merges: bool = False  # a word found whole in the vocabulary is one token (Llama 3, Tekken)
    add_bos: bool = False        # llama.cpp's default when the file carries no add_bos flag


def _table() -> dict[str, PreTokenizer]:
    groups = [
        (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
         PreTokenizer(LLAMA3_SPLIT, ignore_merges=True, add_bos=True)),
        (("dbrx", "smaug-bpe", "jina-v5-nano"), PreTokenizer(LLAMA3_SPLIT)),
        (("qwen2", "deepseek-r1-qwen"), PreTokenizer(QWEN2_SPLIT, nfc=True)),
        (("kormo", "megrez", "f2llmv2", "stablelm2", "hunyuan"), PreTokenizer(QWEN2_SPLIT)),
        (("qwen35",), PreTokenizer(QWEN35_SPLIT, nfc=True)),
        (("tekken",), PreTokenizer(TEKKEN_SPLIT, ignore_merges=True, add_bos=True)),
        (("gpt-4o", "llama4", "minimax-m2", "kanana2", "talkie"), PreTokenizer(GPT4O_SPLIT)),
        (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
         PreTokenizer(digits=True)),
        (("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4",
          "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "jina-v1-en", "jina-v2-code", "roberta-bpe",
          "a.x-4.0", "mellum", "gigachat"), PreTokenizer()),
    ]
    return {name: spec for names, spec in groups for name in names}


PRE_TOKENIZERS = _table()
# No pre-tokenizer recorded: the GPT-2 split, as transformers' loader does (llama.cpp warns too).
_UNRECORDED = ("default", None)


def pre_tokenizer_for(pre: str | None, path: str = "<gguf>") -> PreTokenizer:
    """The split for a ``tokenizer.ggml.pre`` value; an unknown value is an error naming the fix."""
    if pre in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[pre]
    if pre in _UNRECORDED:
        warnings.warn(f"GGUF file {path} records no pre-tokenizer (tokenizer.ggml.pre={pre!r}); splitting "
                      "text with the GPT-2 pattern, as transformers does. If the model came with its own "
                      "tokenizer.json, load its Hugging Face directory instead for exact ids.", stacklevel=3)
        return PreTokenizer()
    raise ReplaceMeError(
        f"GGUF file {path} names pre-tokenizer {pre!r}, which this loader does not know "
        f"(known: {', '.join(sorted(PRE_TOKENIZERS))}). Fix: load the model's Hugging Face directory "
        "(its tokenizer.json has the exact split), or convert it with a tokenizer that names a known type.")


def tokenizer_from_gguf(reader, path: str = "<gguf>"):
    """A ``PreTrainedTokenizerFast`` with the ids, special tokens, BOS/EOS flags and chat template of
    the GGUF's tokenizer."""
    meta = _Metadata(reader)
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = _byte_level(meta, pre_tokenizer_for(meta.get("tokenizer.ggml.pre"), path))
    elif kind == "llama":
        tokenizer = _sentencepiece(meta)
    else:
        raise ReplaceMeError(f"GGUF file {path} has a {kind!r} tokenizer; only byte-level BPE ('gpt2') and "
                             "SentencePiece BPE ('llama') are rebuilt here. Fix: load the model's Hugging "
                             "Face directory, which carries its tokenizer.json.")
    template = meta.get("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer


class _Metadata:
    """``tokenizer.*`` fields of a GGUF reader, read once."""

    def __init__(self, reader):
        self._reader = reader

    def get(self, key, default=None):
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def tokens(self) -> list[str]:
        return list(self.get("tokenizer.ggml.tokens"))

    def types(self, n: int) -> list[int]:
        return list(self.get("tokenizer.ggml.token_type", [1] * n))

    def special(self, tokens: list[str], key: str) -> str | None:
        i = self.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


# llama.cpp token types.
_CONTROL, _USER_DEFINED = 3, 4


def _byte_level(meta: _Metadata, spec: PreTokenizer):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    # A few converters store added tokens in raw UTF-8; the BPE model needs them in the byte alphabet.
    tokens = [t if set(t) <= alphabet else _byte_spelling(t) for t in meta.tokens()]
    types = meta.types(len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                              ignore_merges=spec.ignore_merges))
    if spec.nfc:
        tk.normalizer = normalizers.NFC()
    if spec.split == GPT2_SPLIT:  # ByteLevel's own regex is GPT-2's
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        steps = [pre_tokenizers.Split(Regex(spec.split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if spec.digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tk.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a converter mislabel (transformers skips it too).
    control = [AddedToken(t, special=True, normalized=False)
               for t, raw, ty in zip(tokens, meta.tokens(), types) if ty == _CONTROL and t == raw]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=meta.special(tokens, "bos"), eos_token=meta.special(tokens, "eos"),
        unk_token=meta.special(tokens, "unknown"),
        pad_token=meta.special(tokens, "padding") or meta.special(tokens, "eos"),
        clean_up_tokenization_spaces=False)
    _add_added_tokens(tokenizer, control, tokens, types)
    _add_bos_eos(tokenizer, meta, default_bos=spec.add_bos)
    return tokenizer


def _byte_spelling(token: str) -> str:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return "".join(table[b] for b in token.encode("utf-8"))


def _sentencepiece(meta: _Metadata):
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    tokens = meta.tokens()
    types = meta.types(len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges") is not None:
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    else:  # SentencePiece files carry scores, not merges
        scores = meta.get("tokenizer.ggml.scores")
        merges = generate_merges(vocab, dict(zip(tokens, scores)) if scores is not None else None)
    tokenizer = LlamaTokenizer(
        vocab=vocab, merges=merges, unk_token=meta.special(tokens, "unknown") or "<unk>",
        bos_token=meta.special(tokens, "bos") or "<s>", eos_token=meta.special(tokens, "eos") or "</s>",
        add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    _add_added_tokens(tokenizer, control, tokens, types)
    pad = meta.special(tokens, "padding")
    tokenizer.pad_token = pad if pad is not None else tokenizer.eos_token
    _add_bos_eos(tokenizer, meta, default_bos=True)
    return tokenizer


def _add_added_tokens(tokenizer, control, tokens, types) -> None:
    """Control tokens stay whole and are special; user-defined ones (e.g. ``<think>``) stay whole and
    are text, as llama.cpp matches both before splitting."""
    from tokenizers import AddedToken

    if control:
        tokenizer.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, ty in zip(tokens, types) if ty == _USER_DEFINED])


def _add_bos_eos(tokenizer, meta: _Metadata, *, default_bos: bool) -> None:
    """llama.cpp's add_bos/add_eos flags as a post-processor (HF fast tokenizers add them only there)."""
    from tokenizers import processors

    bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and tokenizer.bos_token_id is not None
    eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and tokenizer.eos_token_id is not None

    def template(piece: str, type_id: int) -> str:
        parts = ([f"{tokenizer.bos_token}:{type_id}"] if bos else []) + [f"{piece}:{type_id}"]
        return " ".join(parts + ([f"{tokenizer.eos_token}:{type_id}"] if eos else []))

    special = ([(tokenizer.bos_token, tokenizer.bos_token_id)] if bos else []) + (
        [(tokenizer.eos_token, tokenizer.eos_token_id)] if eos and tokenizer.eos_token != tokenizer.bos_token else [])
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template("$A", 0), pair=f"{template('$A', 0)} {template('$B', 1)}", special_tokens=special)
