"""One cut or several for the same number of removed blocks (the ``budget`` settings).

    python scripts/study_budgets.py                              # n = 4, 6, 8, 10, up to 2 cuts
    python scripts/study_budgets.py --budgets=8 --max_cuts=3 --ppl_windows=8

One statistics pass gathers the normal equations of every cut any budget can use. For each budget
n it prunes (a) the single cut of n blocks the residual rule picks, (b) the best split by the proxy
alone (``budget.confirm=0``) and (c) the split confirmed by validation NLL (``budget.confirm``; the
best single cut is always among the confirmed), all with lstsq, and scores each on two held-out
genres never used for selection or fitting (the Wikipedia excerpt and LAMBADA-OpenAI fiction).

It also measures the proxies: for each n the union of the top combinations of each proxy
(``stream``, ``relative``, summed ``angular`` distances) is scored by validation NLL, and the
Spearman rank correlation of each proxy with that NLL is reported. Writes budgets.json and budgets.md.
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
BUDGETS = flags.DEFINE_string("budgets", "4,6,8,10", "Comma list of total blocks removed.")
MAX_CUTS = flags.DEFINE_integer("max_cuts", 2, "Most cuts a split may use.")
CONFIRM = flags.DEFINE_integer("confirm", 4, "Top combinations confirmed by validation NLL.")
PROXY_TOP = flags.DEFINE_integer("proxy_top", 8, "Top combinations per proxy scored for the rank correlation (0: skip).")
WINDOWS = flags.DEFINE_integer("ppl_windows", 8, "Perplexity windows of 1024 tokens per genre.")
OUT = flags.DEFINE_string("output_dir", "runs/budgets", "Where budgets.json and budgets.md go.")


def _spearman(x, y) -> float:
    import numpy as np
    rx, ry = (np.argsort(np.argsort(v)).astype(float) for v in (x, y))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 2 else float("nan")


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}")
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.eval.nll import mean_nll
    from replaceme_jax.eval.perplexity import held_out_genres
    from replaceme_jax.io_utils import atomic_write_json, atomic_write_text
    from replaceme_jax.replaceme import solvers
    from replaceme_jax.replaceme.budgets import best_combinations, budget_cuts, cut_costs
    from replaceme_jax.replaceme.pipeline import calibration_batches, prune
    from replaceme_jax.replaceme.statistics import StatsRequest, gather_statistics
    from replaceme_jax.replaceme.surgery import apply_cuts
    from replaceme_jax.settings import Settings

    try:
        budgets = [int(b) for b in BUDGETS.value.split(",") if b.strip()]
    except ValueError:
        raise ReplaceMeError(f"--budgets={BUDGETS.value!r}: give block counts, e.g. 4,6,8,10") from None
    base = Settings.from_config(CONFIG.value).replace(progress=False)
    split = {n: base.replace(**{"budget.blocks": n, "budget.max_cuts": MAX_CUTS.value,
                                "budget.confirm": CONFIRM.value}) for n in budgets}  # checked before loading
    model, tok = load_pretrained(base.model, param_dtype=base.param_dtype, dtype=base.dtype)
    depth = model.config.num_hidden_layers
    for n in budgets:
        if not 2 <= n <= depth - 2:
            raise ReplaceMeError(f"--budgets: {n} blocks cannot be split in a {depth}-block model")
    batches = calibration_batches(tok, base)
    validation = calibration_batches(tok, base, part="validation", num_samples=base.calibration.validation_samples)
    cuts = sorted({c for n in budgets for c in budget_cuts(depth, n, MAX_CUTS.value, 1)})
    t0 = time.perf_counter()
    stats = gather_statistics(model, batches, StatsRequest(
        max_distance_blocks=depth - 1, cuts=tuple(cuts), include_pad=base.calibration.include_pad,
        accum_dtype=base.accum_dtype))
    stats_s = time.perf_counter() - t0
    print(f"statistics pass: {len(cuts)} cuts, {stats.num_tokens} tokens, {stats_s:.0f} s", flush=True)
    genres = held_out_genres(tok, max_windows=WINDOWS.value)
    score = lambda m: {g: e(m).ppl for g, e in genres.items()}  # noqa: E731
    dense = score(model)
    rows, proxies = [{"n": 0, "variant": "dense", "cuts": [], **dense}], []
    val_nll: dict = {}

    def confirm(combo):
        if combo not in val_nll:
            Ts = [solvers.lstsq(stats.normal_equations(c), alpha=base.alpha).T for c in combo]
            val_nll[combo] = mean_nll(apply_cuts(model, list(combo), Ts), validation)
        return val_nll[combo]

    def write():  # after every row, so a stopped study keeps what it measured
        lines = [f"{base.model}, {base.calibration.num_samples} {base.calibration.source} calibration passages, lstsq; "
                 f"{WINDOWS.value} windows x 1024 tokens per genre; validation NLL on "
                 f"{base.calibration.validation_samples} held-out calibration-source passages", "",
                 "| blocks | variant | cuts | validation NLL | Wikipedia ppl (x dense) | fiction ppl (x dense) |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            cells = [f"{r[g]:.2f} ({r[g] / dense[g]:.2f}x)" for g in genres]
            cuts_text = " + ".join(f"[{s}, {e})" for s, e in r["cuts"]) or "-"
            nll = f"{r['validation_nll']:.4f}" if "validation_nll" in r else ""
            lines.append(f"| {r['n'] or ''} | {r['variant']} | {cuts_text} | {nll} | {cells[0]} | {cells[1]} |")
        if proxies:
            lines += ["", "Proxies against validation NLL (the union of each proxy's top combinations):", "",
                      "| blocks | proxy | combinations | Spearman | its top 1 | top-1 NLL | best NLL |", "|---|---|---|---|---|---|---|"]
            for p in proxies:
                top1 = " + ".join(f"[{s}, {e})" for s, e in p["top1"])
                lines.append(f"| {p['n']} | {p['proxy']} | {p['combinations']} | {p['spearman']:.2f} | {top1} | "
                             f"{p['top1_validation_nll']:.4f} | {p['best_validation_nll']:.4f} |")
        text = "\n".join(lines)
        os.makedirs(OUT.value, exist_ok=True)
        atomic_write_json(os.path.join(OUT.value, "budgets.json"), {"rows": rows, "proxies": proxies, "stats_s": stats_s,
                                                                    "num_cuts": len(cuts)})
        atomic_write_text(os.path.join(OUT.value, "budgets.md"), text + "\n")
        return text

    for n in budgets:
        variants = [("single cut (residual rule)", base.replace(num_blocks=n), None),
                    (f"<= {MAX_CUTS.value} cuts, proxy only", split[n].replace(**{"budget.confirm": 0}), None),
                    (f"<= {MAX_CUTS.value} cuts, top {CONFIRM.value} confirmed on validation", split[n], validation)]
        for name, cfg, val in variants:
            t = time.perf_counter()
            result = prune(model, batches, cfg, stats=stats, validation=val)
            combo = tuple(result.cuts)
            rows.append({"n": n, "variant": name, "cuts": [list(c) for c in combo], "select_s":
                         round(time.perf_counter() - t, 1), "validation_nll": confirm(combo), **score(result.model)})
            print(rows[-1], flush=True)
            write()
        if PROXY_TOP.value:
            ranked = {}
            for proxy, selection in (("stream", "residual"), ("relative", "residual"), ("angular", "angular")):
                costs = cut_costs(stats, budget_cuts(depth, n, MAX_CUTS.value, 1), proxy if proxy != "angular" else
                                  "stream", selection=selection, alpha=base.alpha)
                ranked[proxy] = (costs, best_combinations(costs, depth, n, MAX_CUTS.value, 1, PROXY_TOP.value))
            union = sorted({combo for _, top in ranked.values() for _, combo in top})
            nll = [confirm(c) for c in union]
            best_combo = union[min(range(len(union)), key=nll.__getitem__)]
            for proxy, (costs, top) in ranked.items():
                values = [sum(costs[c] for c in combo) for combo in union]
                proxies.append({"n": n, "proxy": proxy, "combinations": len(union),
                                "spearman": _spearman(values, nll), "top1": [list(c) for c in top[0][1]],
                                "top1_is_best": top[0][1] == best_combo,
                                "top1_validation_nll": confirm(top[0][1]), "best_validation_nll": min(nll)})
                print(proxies[-1], flush=True)
                write()

    print(write())
    return 0


if __name__ == "__main__":
    run_main(main)
