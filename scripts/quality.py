"""Quality of ReplaceMe vs plain dropping under both selection rules (one statistics pass).

    python scripts/quality.py --config=configs/smollm2_135m.py --output_dir=runs/quality

Held-out Wikipedia perplexity of the dense model, of plain dropping (UIDL without healing), and of
each solver, for the cut each selection rule picks. Writes quality.json and quality.md.
"""
from __future__ import annotations

import time

from absl import flags
from ml_collections import config_flags

from replaceme_jax.cli import run_main
from replaceme_jax.errors import ReplaceMeError

CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_135m.py", "Run config.")
SOLVERS = flags.DEFINE_list("solvers", ["lstsq", "cosine"], "Solvers to compare.")
RULES = flags.DEFINE_list("rules", ["angular", "residual"], "Selection rules to compare.")
OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/quality", "Where quality.json/.md go.")


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}")
    import jax

    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.eval.perplexity import HeldOutPerplexity
    from replaceme_jax.io_utils import atomic_write_json, atomic_write_text
    from replaceme_jax.replaceme import selection as sel
    from replaceme_jax.replaceme.pipeline import calibration_batches, prune
    from replaceme_jax.replaceme.statistics import statistics_request
    from replaceme_jax.replaceme.statistics import gather_statistics
    from replaceme_jax.replaceme.surgery import apply_cuts

    from replaceme_jax.settings import Settings
    cfg = Settings.from_config(CONFIG.value)  # checked before the model loads
    model, tok = load_pretrained(cfg.model, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
    batches = calibration_batches(tok, cfg)
    t0 = time.perf_counter()
    stats = gather_statistics(model, batches, statistics_request(cfg, model.config.num_hidden_layers),
                              progress=True)
    stats_s = time.perf_counter() - t0
    ppl = HeldOutPerplexity(tok, window=cfg.eval.window, max_windows=cfg.eval.perplexity_windows)
    dense = ppl(model)
    rows = [{"rule": "-", "cut": "-", "method": "dense", "ppl": dense.ppl, "relative_residual": None}]
    n = cfg.num_blocks
    for rule in RULES.value:
        scores = sel.get_rule(rule)(stats, n, alpha=cfg.alpha)
        (cut,) = sel.choose_cuts(scores, 1)
        label = f"[{cut[0]}, {cut[1]})"
        rows.append({"rule": rule, "cut": label, "method": "drop", "ppl": ppl(apply_cuts(model, [cut])).ppl,
                     "relative_residual": 1.0})
        for solver in SOLVERS.value:
            t = time.perf_counter()
            # T alone: this study compares the estimators of T (the kernel re-fit: study_levers.py)
            result = prune(model, batches, cfg.replace(solver=solver, progress=False, **{"refit.anchor": False}),
                           stats=stats, cuts=[cut])
            rows.append({"rule": rule, "cut": label, "method": solver, "ppl": ppl(result.model).ppl,
                         "relative_residual": result.residuals[0],
                         "solve_s": round(time.perf_counter() - t, 1)})
            jax.clear_caches()
    lines = ["| selection | cut | method | held-out ppl | x dense | rel. residual |", "|---|---|---|---|---|---|"]
    for r in rows:
        res = "" if r["relative_residual"] is None else f"{r['relative_residual']:.3f}"
        lines.append(f"| {r['rule']} | {r['cut']} | {r['method']} | {r['ppl']:.2f} | {r['ppl'] / dense.ppl:.2f} | {res} |")
    md = "\n".join(lines) + (f"\n\n{stats.num_sequences} calibration sequences, {stats.num_tokens} tokens; "
                             f"{dense.num_windows} held-out windows x {dense.window} tokens "
                             f"({dense.num_tokens} scored); statistics pass {stats_s:.0f} s on {jax.devices()[0].platform}.\n")
    from pathlib import Path
    Path(OUTPUT_DIR.value).mkdir(parents=True, exist_ok=True)
    atomic_write_json(f"{OUTPUT_DIR.value}/quality.json", {"rows": rows, "config": cfg.to_dict()})
    atomic_write_text(f"{OUTPUT_DIR.value}/quality.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    run_main(main)
