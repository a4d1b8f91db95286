"""Held-out perplexity of saved models on the studies' two genres, side by side.

    python scripts/score_heldout.py --models=smollm2-135m,runs/main_head/hf,runs/main_stream/hf \
        --names=dense,passages,stream --ppl_windows=64 --output_dir=runs/heldout_layout

Every model is scored on the same windows of the Wikipedia excerpt (the report's corpus) and of
LAMBADA-OpenAI passages (fiction), or of the ``--genres`` chosen (``science``: SciQ's support
paragraphs), none used for calibration, selection or healing; the first model is the reference of
the "x dense" ratios. ``--compare_to=NAME`` adds every other model's perplexity over NAME's with a paired
bootstrap interval over the windows (each window's NLL is kept). Writes heldout.json and heldout.md.
"""
from __future__ import annotations

import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from replaceme_jax.cli import run_main  # noqa: E402
from replaceme_jax.errors import ReplaceMeError  # noqa: E402

MODELS = flags.DEFINE_list("models", None, "Registry names or checkpoint paths (hf/ or orbax/); the first is the reference.")
NAMES = flags.DEFINE_list("names", None, "Display names, one per model (default: the model strings).")
WINDOWS = flags.DEFINE_integer("ppl_windows", 16, "Windows per genre (default 16; 0: every window of both corpora).")
WINDOW = flags.DEFINE_integer("ppl_window", 1024, "Tokens per window.")
GENRES = flags.DEFINE_list("genres", ["wikipedia", "fiction"], "Held-out genres: wikipedia, fiction (LAMBADA "
                           "passages), science (SciQ support paragraphs).")
COMPARE = flags.DEFINE_string("compare_to", None, "A name from --names: every other model's perplexity over its, "
                               "window by window, with a paired bootstrap 95 % interval (10,000 draws).")
OUT = flags.DEFINE_string("output_dir", None, "Where heldout.json and heldout.md go (optional).")


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}")
    models = MODELS.value or []
    if not models:
        raise ReplaceMeError("--models is empty; fix: --models=smollm2-135m,runs/<job>/hf")
    names = NAMES.value or models
    if len(names) != len(models):
        raise ReplaceMeError(f"--names has {len(names)} entries for {len(models)} models; fix: one name per model")
    if WINDOWS.value < 0 or WINDOW.value < 2:
        raise ReplaceMeError("--ppl_windows must be >= 0 (0: all) and --ppl_window >= 2")
    from replaceme_jax.eval.perplexity import GENRES as KNOWN
    unknown = [g for g in GENRES.value if g not in KNOWN]
    if unknown or not GENRES.value:
        raise ReplaceMeError(f"--genres: unknown or empty {unknown or GENRES.value}; fix: a comma-separated "
                             f"subset of {','.join(KNOWN)}")
    if COMPARE.value is not None and COMPARE.value not in names:
        raise ReplaceMeError(f"--compare_to={COMPARE.value!r} is not one of --names ({', '.join(names)}); fix: "
                             "name one of the models scored")
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.eval.perplexity import held_out_genres, paired_ratio
    from replaceme_jax.io_utils import atomic_write_json, atomic_write_text

    genres, rows = None, []
    for name, path in zip(names, models):
        t0 = time.perf_counter()
        model, tok = load_pretrained(path)
        if genres is None:  # one tokenisation of the corpora; every model shares the first's tokenizer
            genres = held_out_genres(tok, max_windows=WINDOWS.value or None, window=WINDOW.value,
                                     genres=GENRES.value)
        results = {g: scorer(model, progress=f"{name}, {g}") for g, scorer in genres.items()}
        rows.append({"name": name, "model": path, "blocks": model.config.num_hidden_layers,
                     "seconds": round(time.perf_counter() - t0, 1),
                     **{g: r.to_dict() for g, r in results.items()}})
    ref = rows[0]
    first = ref[next(iter(genres))]
    header = [f"Held-out perplexity ({first['num_windows']} windows x {first['window']} tokens per genre; "
              f"x: against {ref['name']})", "",
              "| model | blocks | " + " | ".join(f"{g} ppl (x {ref['name']})" for g in genres) + " | s |",
              "|---|---|" + "---|" * len(genres) + "---|"]
    lines = [f"| {r['name']} | {r['blocks']} | "
             + " | ".join(f"{r[g]['ppl']:.3f} ({r[g]['ppl'] / ref[g]['ppl']:.3f}x)" for g in genres)
             + f" | {r['seconds']} |" for r in rows]
    paired = {}
    if COMPARE.value is not None:
        base = rows[names.index(COMPARE.value)]
        paired = {r["name"]: {g: paired_ratio(base[g], r[g]) for g in genres} for r in rows if r is not base}
        lines += ["", f"Perplexity over {COMPARE.value}'s on the same windows (paired bootstrap 95 %, windows resampled):",
                  "", "| model | " + " | ".join(genres) + " |", "|---|" + "---|" * len(genres)]
        lines += [f"| {n} | " + " | ".join(f"{p[g]['ratio']:.4f} [{p[g]['ci'][0]:.4f}, {p[g]['ci'][1]:.4f}]"
                                            for g in genres) + " |" for n, p in paired.items()]
    text = "\n".join(header + lines)
    print(text)
    if OUT.value:
        os.makedirs(OUT.value, exist_ok=True)
        atomic_write_json(os.path.join(OUT.value, "heldout.json"),
                          {"rows": rows, **({"paired_with": COMPARE.value, "paired": paired} if paired else {})})
        atomic_write_text(os.path.join(OUT.value, "heldout.md"), text + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
