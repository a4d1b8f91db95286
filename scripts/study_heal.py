"""What each minute of healing buys: held-out perplexity against healing tokens and wall time.

    python scripts/study_heal.py --cut=12-20 --config.heal.steps=200 --eval_at=0,25,50,100,200
    python scripts/study_heal.py --cut=12-20 --start=drop      # the paper's UIDL + healing baseline
    python scripts/study_heal.py --cut=12-20 --start=streamline   # LLM-Streamline (lr 1e-2) + healing
    python scripts/study_heal.py --cut=12-20 --config.heal.anchor_steps=200   # ReplaceMe + anchor tuning + LoRA
    python scripts/study_heal.py --cut=12-20 --pruned=runs/main/orbax --state_dir=runs/main.heal ...   # no re-pruning

Prunes one cut (ReplaceMe lstsq; ``--start=drop``: the same blocks removed with no transform;
``--start=streamline``: LLM-Streamline, the anchor block retrained to stand in for the cut), then runs
the healing stage (``heal.*`` settings of the config): anchor tuning if ``heal.anchor_steps`` (the
anchor retrained toward the dense stream like LLM-Streamline's, but from the pruned model's own
anchor: after ReplaceMe, the block holding T), then LoRA distillation, scoring the model at the steps
of ``--eval_at`` on two held-out genres never used for calibration or healing (the Wikipedia excerpt
and LAMBADA-OpenAI fiction). Healing stops at the last ``--eval_at`` step, or earlier after
``--max_minutes`` of healing time (evaluation excluded), keeping the rows reached. Writes heal.json
(heal_drop.json, heal_tuned.json, ...) and .md.

``--pruned`` starts from a model the main job already pruned at ``--cut`` with the same config (its
``orbax/`` or ``hf/``, saved before any healing) instead of pruning again, and ``--state_dir`` keeps the
tuned anchors there (a main job's ``<output_dir>.heal``, copied, holds them under the same fingerprint),
so several healing variants share one pruning and one anchor tuning.
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
                                         "Pipeline config (model, calibration, heal.*).")
CUT = flags.DEFINE_string("cut", "12-20", "Cut start-end (end exclusive).")
START = flags.DEFINE_enum("start", "replaceme", ["replaceme", "drop", "streamline"],
                          "What is healed: the lstsq model, the plain drop, or LLM-Streamline (anchor block retrained).")
STREAMLINE_STEPS = flags.DEFINE_integer("streamline_steps", 200, "--start=streamline: AdamW steps on the anchor block.")
STREAMLINE_LR = flags.DEFINE_float("streamline_lr", 1e-2, "--start=streamline: peak learning rate.")
EVAL_AT = flags.DEFINE_string("eval_at", "0,25,50,100,200", "Healing steps at which held-out perplexity is scored.")
WINDOWS = flags.DEFINE_integer("ppl_windows", 4, "Perplexity windows of 1024 tokens per genre.")
PRUNED = flags.DEFINE_string("pruned", "", "Start from this pruned model (the main job's orbax/ or hf/ at --cut, "
                              "not healed) instead of pruning; only with --start=replaceme.")
STATE_DIR = flags.DEFINE_string("state_dir", "", "Keep (and reuse) the tuned anchors here; empty: not kept.")
MAX_MINUTES = flags.DEFINE_float("max_minutes", 60.0, "Stop healing after this much healing time.")
OUT = flags.DEFINE_string("output_dir", "runs/heal", "Where heal.json and heal.md go.")


class _OutOfTime(Exception):
    pass


class _Done(Exception):
    pass


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}")
    from replaceme_jax.baselines.streamline import streamline
    from replaceme_jax.replaceme.anchor_tuning import tune_or_restore
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.eval.perplexity import held_out_genres
    from replaceme_jax.io_utils import atomic_write_json, atomic_write_text
    from replaceme_jax.replaceme.cuts import parse_cuts
    from replaceme_jax.replaceme.heal import heal
    from replaceme_jax.replaceme.pipeline import calibration_batches, healing_batches, prune, resolve_self_source
    from replaceme_jax.replaceme.surgery import apply_cuts
    from replaceme_jax.settings import Settings

    cfg = Settings.from_config(CONFIG.value).replace(progress=False)
    if not cfg.heal.steps:
        raise ReplaceMeError("heal.steps is 0: give --config.heal.steps=200 (or more)")
    try:
        eval_at = sorted({int(s) for s in EVAL_AT.value.split(",") if s.strip()})
    except ValueError:
        raise ReplaceMeError(f"--eval_at={EVAL_AT.value!r}: give step numbers, e.g. 0,50,100") from None
    if PRUNED.value and START.value != "replaceme":
        raise ReplaceMeError(f"--pruned starts from a ReplaceMe model; drop --start={START.value} or --pruned")
    model, tok = load_pretrained(cfg.model, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
    (cut,) = parse_cuts(CUT.value, model.config.num_hidden_layers)
    cfg = resolve_self_source(cfg, model, tok)
    prepare_s = time.perf_counter()
    if PRUNED.value:
        student = load_pretrained(PRUNED.value, param_dtype=cfg.param_dtype, dtype=cfg.dtype)[0]
        want = model.config.num_hidden_layers - (cut[1] - cut[0])
        if student.config.num_hidden_layers != want:
            raise ReplaceMeError(f"--pruned={PRUNED.value} has {student.config.num_hidden_layers} blocks, but cut "
                                 f"[{cut[0]}, {cut[1]}) of {cfg.model} leaves {want}; fix: give the cut it was pruned at")
    elif START.value == "drop":
        student = apply_cuts(model, [cut])
    elif START.value == "streamline":
        student = streamline(model, calibration_batches(tok, cfg), cut, steps=STREAMLINE_STEPS.value,
                             lr=STREAMLINE_LR.value, seed=cfg.calibration.seed).model
    else:
        student = prune(model, calibration_batches(tok, cfg), cfg, cuts=[cut], validation=calibration_batches(
            tok, cfg, part="validation", num_samples=cfg.calibration.validation_samples)).model
    if cfg.heal.anchor_steps:  # the healing stage's first part: the anchor retrained toward the dense stream
        student = tune_or_restore(model, student, calibration_batches(tok, cfg), [cut], cfg,
                                  directory=STATE_DIR.value or None)[0]
    prepare_s = time.perf_counter() - prepare_s  # pruning (and any anchor training), before LoRA healing
    h = cfg.heal
    heal_batches = healing_batches(tok, cfg)
    genres = held_out_genres(tok, max_windows=WINDOWS.value)
    score = lambda m: {g: e(m).ppl for g, e in genres.items()}  # noqa: E731
    dense = score(model)
    tokens_per = {id(b): int((b.attention_mask > 0).sum()) for b in heal_batches}
    mean_tokens = sum(tokens_per.values()) / len(tokens_per)
    rows = [{"step": 0, "tokens": 0, "heal_s": 0.0, **score(student)}]
    print(rows[-1], flush=True)
    clock = {"heal": 0.0, "since": time.perf_counter()}

    def on_step(step, healed):
        clock["heal"] += time.perf_counter() - clock["since"]
        if step in eval_at:
            rows.append({"step": step, "tokens": int(step * mean_tokens), "heal_s": round(clock["heal"], 1),
                         **score(healed())})
            print(rows[-1], flush=True)
        if step >= max(eval_at):
            raise _Done  # no later row to score: stop healing here
        if clock["heal"] > 60 * MAX_MINUTES.value:
            raise _OutOfTime
        clock["since"] = time.perf_counter()

    stopped = None
    try:
        heal(student, model, heal_batches, cfg, cuts=[cut], on_step=on_step)
    except _Done:
        pass
    except _OutOfTime:
        stopped = f"stopped after {MAX_MINUTES.value:g} minutes of healing"
    tuned = (f" + anchor tuning ({h.anchor_steps} steps, lr {h.anchor_lr}, {h.anchor_loss} loss)"
             if h.anchor_steps else "")
    lines = [f"healing {START.value}{tuned} at cut [{cut[0]}, {cut[1]}) of {cfg.model}: LoRA rank {h.rank} on blocks "
             f"{h.blocks} ({h.modules}), lr {h.lr}, {h.batch_size} x {h.max_length}-token packed rows per step "
             f"(~{mean_tokens:.0f} tokens) from {h.source or cfg.calibration.source}; {WINDOWS.value} windows x 1024 tokens per "
             f"genre; pruning took {prepare_s:.0f} s" + (f" (from {PRUNED.value})" if PRUNED.value else "")
             + (f"; {stopped}" if stopped else ""), "",
             "| step | healing tokens | healing s | Wikipedia ppl (x dense) | fiction ppl (x dense) |", "|---|---|---|---|---|",
             f"| dense | | | {dense['wikipedia']:.2f} (1.00x) | {dense['fiction']:.2f} (1.00x) |"]
    for r in rows:
        cells = [f"{r[g]:.2f} ({r[g] / dense[g]:.2f}x)" for g in genres]
        lines.append(f"| {r['step']} | {r['tokens']} | {r['heal_s']} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(OUT.value, exist_ok=True)
    name = ("heal" if START.value == "replaceme" else f"heal_{START.value}") + ("_tuned" if h.anchor_steps else "")
    atomic_write_json(os.path.join(OUT.value, f"{name}.json"), {"dense": dense, "rows": rows, "cut": list(cut),
                                                                 "heal": h.to_dict(), "stopped": stopped,
                                                                 "pruned": PRUNED.value or None, "prepare_s": prepare_s})
    atomic_write_text(os.path.join(OUT.value, f"{name}.md"), text + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
