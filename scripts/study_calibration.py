"""How much calibration text, from where, and how long: quality of one cut's lstsq transform.

    python scripts/study_calibration.py --cut=12-20               # sizes 64..4096 of boolq, then sources, lengths
    python scripts/study_calibration.py --sizes=64,256,1024 --sources=boolq,hellaswag,mix,chat --max_lengths=64,128,512

Sizes: nested sets (the first k passages of one seeded draw); the pass runs once over the largest
set in chunks and the sums of the chunks are added (``statistics.add_statistics``), so every size
costs no more than the largest. Sources (at ``--source_passages`` passages): ``boolq``, ``hellaswag``,
``mix`` (alternating), ``chat`` (boolq passages rendered as a user turn with the tokenizer's chat
template, as the paper calibrates on chat data). Lengths: ``calibration.max_length`` at
``--source_passages`` boolq passages. Every model is scored on two held-out genres never used for
calibration (the Wikipedia excerpt and LAMBADA-OpenAI fiction). Writes calibration.json and .md.
"""
from __future__ import annotations

import os
import sys
import time

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from replaceme_jax.cli import run_main  # noqa: E402
from replaceme_jax.errors import ReplaceMeError  # noqa: E402

CONFIG = config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "configs", "smollm2_135m.py"),
                                         "Pipeline config (model, calibration).")
CUT = flags.DEFINE_string("cut", "12-20", "Cut start-end (end exclusive).")
SIZES = flags.DEFINE_string("sizes", "64,128,256,512,1024,2048,4096", "Passage counts (nested sets) of the first source.")
SOURCES = flags.DEFINE_string("sources", "boolq,hellaswag,mix,chat", "Sources compared at --source_passages.")
SOURCE_PASSAGES = flags.DEFINE_integer("source_passages", 256, "Passages per source and per length.")
LENGTHS = flags.DEFINE_string("max_lengths", "64,128,256,512", "calibration.max_length values compared.")
WINDOWS = flags.DEFINE_integer("ppl_windows", 4, "Perplexity windows of 1024 tokens per genre.")
OUT = flags.DEFINE_string("output_dir", "runs/calibration", "Where calibration.json and calibration.md go.")


def _ints(flag) -> list[int]:
    try:
        return [int(x) for x in flag.value.split(",") if x.strip()]
    except ValueError:
        raise ReplaceMeError(f"--{flag.name}={flag.value!r}: give integers, comma-separated") from None


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}")
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.data import load_calibration_texts
    from replaceme_jax.eval.perplexity import held_out_genres
    from replaceme_jax.io_utils import atomic_write_json, atomic_write_text
    from replaceme_jax.replaceme import solvers
    from replaceme_jax.replaceme.cuts import parse_cuts
    from replaceme_jax.replaceme.pipeline import batches_from_texts
    from replaceme_jax.replaceme.statistics import StatsRequest, add_statistics, gather_statistics
    from replaceme_jax.replaceme.surgery import apply_cuts
    from replaceme_jax.settings import Settings

    cfg = Settings.from_config(CONFIG.value).replace(progress=False)
    sizes, lengths = sorted(set(_ints(SIZES))), sorted(set(_ints(LENGTHS)))
    sources = [s.strip() for s in SOURCES.value.split(",") if s.strip()]
    bad = [s for s in sources if s not in ("boolq", "hellaswag", "mix", "chat")]
    if bad or not sizes or sizes[0] < 1:
        raise ReplaceMeError(f"--sources: use boolq, hellaswag, mix, chat (got {bad}); --sizes: positive counts")
    model, tok = load_pretrained(cfg.model, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
    (cut,) = parse_cuts(CUT.value, model.config.num_hidden_layers)
    request = StatsRequest(cuts=(cut,), include_pad=cfg.calibration.include_pad, accum_dtype=cfg.accum_dtype)
    genres = held_out_genres(tok, max_windows=WINDOWS.value)
    score = lambda m: {g: e(m).ppl for g, e in genres.items()}  # noqa: E731
    dense = score(model)
    seed = cfg.calibration.seed

    def texts(source, n):
        if source in ("boolq", "hellaswag"):
            return load_calibration_texts(source, num_samples=n, seed=seed)
        if source == "mix":
            a, b = (load_calibration_texts(s, num_samples=n // 2 + 1, seed=seed) for s in ("boolq", "hellaswag"))
            return [t for pair in zip(a, b) for t in pair][:n]
        return [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False)
                for t in load_calibration_texts("boolq", num_samples=n, seed=seed)]

    rows = []

    def write():  # after every row, so a stopped study keeps what it measured
        lines = [f"cut [{cut[0]}, {cut[1]}) of {cfg.model}, lstsq; {WINDOWS.value} windows x 1024 tokens per genre",
                 "", "| study | source | passages | tokens | max length | rel. residual | Wikipedia ppl (x dense) "
                 "| fiction ppl (x dense) | pass s |", "|---|---|---|---|---|---|---|---|---|",
                 f"| dense | | | | | | {dense['wikipedia']:.2f} | {dense['fiction']:.2f} | |"]
        for r in rows:
            cells = [f"{r[g]:.2f} ({r[g] / dense[g]:.2f}x)" for g in genres]
            lines.append(f"| {r['study']} | {r['source']} | {r['passages']} | {r['tokens']} | {r['max_length']} | "
                         f"{r['relative_residual']:.4f} | {cells[0]} | {cells[1]} | {r['pass_s']} |")
        os.makedirs(OUT.value, exist_ok=True)
        atomic_write_json(os.path.join(OUT.value, "calibration.json"), {"cut": list(cut), "dense": dense, "rows": rows})
        atomic_write_text(os.path.join(OUT.value, "calibration.md"), "\n".join(lines) + "\n")
        return "\n".join(lines)

    def evaluate(stats, seconds, **labels):
        T = solvers.lstsq(stats.normal_equations(cut), alpha=cfg.alpha).T
        rows.append({**labels, "tokens": stats.num_tokens, "pass_s": round(seconds, 1),
                     "relative_residual": float(solvers.relative_residual(stats.normal_equations(cut), T)),
                     **score(apply_cuts(model, [cut], [T]))})
        print(rows[-1], flush=True)
        write()

    # 1. Sizes: one pass over the largest set, in chunks, summed.
    first = sources[0] if sources else "boolq"
    pool, total, elapsed, prev = texts(first, sizes[-1]), None, 0.0, 0
    for n in sizes:
        t = time.perf_counter()
        part = gather_statistics(model, batches_from_texts(pool[prev:n], tok, cfg), request)
        total = part if total is None else add_statistics(total, part)
        elapsed += time.perf_counter() - t
        prev = n
        evaluate(total, elapsed, study="size", source=first, passages=min(n, len(pool)),
                 max_length=cfg.calibration.max_length)
    # 2. Sources, 3. lengths (one pass each).
    n = SOURCE_PASSAGES.value
    for source in sources:
        t = time.perf_counter()
        stats = gather_statistics(model, batches_from_texts(texts(source, n), tok, cfg), request)
        evaluate(stats, time.perf_counter() - t, study="source", source=source, passages=n,
                 max_length=cfg.calibration.max_length)
    for length in lengths:
        c = cfg.replace(**{"calibration.max_length": length})
        t = time.perf_counter()
        stats = gather_statistics(model, batches_from_texts(texts("boolq", n), tok, c), request)
        evaluate(stats, time.perf_counter() - t, study="max_length", source="boolq", passages=n, max_length=length)

    print(write())
    return 0


if __name__ == "__main__":
    run_main(main)
