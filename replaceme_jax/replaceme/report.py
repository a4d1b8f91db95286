"""What a run reports: held-out perplexities, the JSON report and its text summary, tables (CSV)
and heat maps (PNG). Writing them with the pruned model is ``replaceme.save``."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from replaceme_jax.models.modeling import num_parameters


def heldout_perplexities(dense, result, tokenizer, cfg, *, unhealed=None) -> dict:
    """Held-out Wikipedia perplexity of dense, pruned and (optionally) plain-dropped models;
    ``unhealed``: the pruned model before the healing stage, when ``result.model`` is healed."""
    from replaceme_jax.eval.perplexity import HeldOutPerplexity
    from replaceme_jax.replaceme.surgery import apply_cuts
    ppl = HeldOutPerplexity(tokenizer, window=cfg.eval.window, max_windows=cfg.eval.perplexity_windows)
    label = (lambda name: f"perplexity, {name}") if cfg.progress else (lambda name: None)
    out = {"dense": ppl(dense, label("dense")).to_dict(), "pruned": ppl(result.model, label("pruned")).to_dict()}
    if unhealed is not None:
        out["unhealed"] = ppl(unhealed, label("pruned before healing")).to_dict()
    if cfg.eval.compare_drop:
        out["drop"] = ppl(apply_cuts(dense, result.cuts), label("drop")).to_dict()
    return out


def build_report(cfg, dense, result, batches, evaluation: dict, times: dict) -> dict:
    stats = result.stats
    per_cut = []
    for i, cut in enumerate(result.cuts):
        entry = {"cut": list(cut), "anchor_block": cut[0] - 1, "removed_blocks": list(range(*cut)),
                 "relative_residual": result.residuals[i],
                 "final_loss": getattr(result.solves[i], "final_loss", None),
                 "loss_history": [[int(s), float(v)] for s, v in getattr(result.solves[i], "loss_history", ())]}
        n = cut[1] - cut[0]
        if stats is not None and stats.distances is not None and n <= stats.distances.shape[0]:
            entry["angular_distance"] = float(stats.distances[n - 1, cut[0]])
        if result.refits and result.refits[i] is not None:
            entry["anchor_refit"] = result.refits[i].summary()
        per_cut.append(entry)
    report = {
        "model": cfg.model,
        "blocks": {"dense": dense.config.num_hidden_layers, "pruned": result.model.config.num_hidden_layers},
        "parameters": {"dense": num_parameters(dense), "pruned": num_parameters(result.model)},
        "selection": cfg.selection if not cfg.cuts else "user",
        "solver": cfg.solver, "alpha": cfg.alpha,
        "cuts": per_cut,
        "calibration": {"source": cfg.calibration.source, "sequences": sum(b.num_sequences for b in batches),
                        "tokens": int(sum(b.num_tokens for b in batches)),
                        "batch_shapes": sorted({tuple(b.input_ids.shape) for b in batches}),
                        "layout": cfg.calibration.layout, "passages": cfg.calibration.num_samples,
                        "include_pad": cfg.calibration.include_pad,
                        # The share of the source's texts held out (never calibrated on) for validation.
                        "validation_fraction": cfg.calibration.validation_fraction},
        "scores": {rule: {f"{s}-{e}": v for (s, e), v in sc.items()} for rule, sc in result.scores.items()},
        "budget": (None if result.budget is None else
                   {"blocks": cfg.budget.blocks, "max_cuts": cfg.budget.max_cuts, "proxy": cfg.budget.proxy,
                    "candidates": [c.to_dict() for c in result.budget]}),
        "downstream_refit": None if result.downstream is None else [f.summary() for f in result.downstream],
        "heldout_perplexity": evaluation,
        "times_s": {k: round(v, 2) for k, v in times.items()},
        "config": cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg),
    }
    return report


def distances_csv(distances: np.ndarray) -> str:
    """Rows n = 1..max_n, columns start block s: mean angular distance between h_s and h_{s+n}."""
    buf = io.StringIO()
    buf.write("n," + ",".join(f"s{s}" for s in range(distances.shape[1])) + "\n")
    for i, row in enumerate(distances):
        buf.write(f"{i + 1}," + ",".join("" if np.isnan(v) else f"{v:.6f}" for v in row) + "\n")
    return buf.getvalue()


def scores_csv(scores: dict) -> str:
    rules = sorted(scores)
    cuts = sorted({c for sc in scores.values() for c in sc})
    lines = ["start,end," + ",".join(rules)]
    for c in cuts:
        lines.append(f"{c[0]},{c[1]}," + ",".join(f"{scores[r].get(c, float('nan')):.6f}" for r in rules))
    return "\n".join(lines) + "\n"


def plot_distances(distances: np.ndarray, path: Path, cuts=()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 6))
    im = ax.imshow(np.ma.masked_invalid(distances), aspect="auto", cmap="viridis", origin="lower",
                   extent=(-0.5, distances.shape[1] - 0.5, 0.5, distances.shape[0] + 0.5))
    for s, e in cuts:
        ax.plot([s], [e - s], "r*", markersize=12)
    ax.set_xlabel("start block s")
    ax.set_ylabel("blocks removed n")
    ax.set_title("angular distance between h_s and h_{s+n} (last token)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(scores: dict, path: Path, cuts=()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rules = sorted(scores)
    fig, axes = plt.subplots(1, len(rules), figsize=(5 * len(rules), 4), squeeze=False)
    for ax, rule in zip(axes[0], rules):
        items = sorted(scores[rule].items())
        ax.bar([s for (s, _), _ in items], [v for _, v in items], color="tab:blue")
        for s, e in cuts:
            if (s, e) in scores[rule]:
                ax.bar([s], [scores[rule][(s, e)]], color="tab:red")
        ax.set_xlabel("start block of the cut")
        ax.set_title(f"{rule} score (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(report: dict) -> str:
    """The human-readable summary the prune script prints."""
    lines = [f"ReplaceMe on {report['model']}: {report['blocks']['dense']} -> {report['blocks']['pruned']} blocks, "
             f"{report['parameters']['dense'] / 1e6:.1f}M -> {report['parameters']['pruned'] / 1e6:.1f}M parameters"]
    cal = report["calibration"]
    held_out = cal.get("validation_fraction")
    if cal.get("layout") == "stream":  # the rows are pieces of one stream, not passages
        what = f"{cal.get('passages') or 'all'} passages joined into {cal['sequences']} rows"
    elif cal.get("layout") == "mixed":
        what = (f"{cal.get('passages') or 'all'} passages, the first half as sequences and the rest joined "
                f"({cal['sequences']} rows)")
    else:
        what = f"{cal['sequences']} sequences"
    lines.append(f"calibration: {what}, {cal['tokens']} tokens from {cal['source']} "
                 f"(pads {'included' if cal['include_pad'] else 'excluded'}"
                 + (f"; {held_out:.0%} of its texts held out for validation)" if held_out else ")"))
    lines.append(f"selection: {report['selection']}, solver: {report['solver']} (alpha={report['alpha']})")
    budget = report.get("budget")
    if budget:
        lines.append(f"budget: {budget['blocks']} blocks over up to {budget['max_cuts']} cuts; combinations "
                     f"considered ({budget['proxy']} proxy, validation NLL):")
        for c in budget["candidates"]:
            nll = "" if c["validation_nll"] is None else f"   {c['validation_nll']:.4f}"
            lines.append(f"  {' + '.join(c['cuts']):<16} {c['proxy']:.5f}{nll}")
    for c in report["cuts"]:
        extra = f", angular distance {c['angular_distance']:.4f}" if "angular_distance" in c else ""
        lines.append(f"  cut blocks [{c['cut'][0]}, {c['cut'][1]}) -> T folded into block {c['anchor_block']}"
                     f"; relative residual {c['relative_residual']:.4f}{extra}")
        r = c.get("anchor_refit")
        if r:
            how = ("kept W T (no ridge value generalised better)" if r["kept_prior"]
                   else f"re-fitted kernel, ridge {r['alpha_relative']:g} x tr/d_ff")
            lines.append(f"    anchor down_proj: {how}; validation residual {r['prior_validation_residual']:.4f} "
                         f"(W T) -> {r['validation_residual']:.4f}")
    for r in report.get("downstream_refit") or ():
        how = "kept its kernel" if r["kept_prior"] else f"re-fitted, ridge {r['alpha_relative']:g} x tr/d_ff"
        lines.append(f"  block {r['block']} (dense {r['dense_block']}) down_proj toward the dense stream: {how}; "
                     f"validation residual {r['prior_validation_residual']:.4f} -> {r['validation_residual']:.4f}")
    ppl = report.get("heldout_perplexity") or {}
    if ppl:
        d = ppl["dense"]
        lines.append(f"held-out Wikipedia perplexity ({d['num_windows']} windows x {d['window']} tokens, "
                     f"{d['num_tokens']} scored tokens):")
        for name in ("dense", "pruned", "unhealed", "drop"):
            if name in ppl:
                ratio = ppl[name]["ppl"] / d["ppl"]
                label = {"drop": "drop (no transform)", "pruned": "pruned" + (" + healed" if "unhealed" in ppl else ""),
                         "unhealed": "pruned, not healed"}.get(name, name)
                lines.append(f"  {label:<20} {ppl[name]['ppl']:10.3f}   ({ratio:.2f}x dense)")
    heal = report.get("heal")
    if heal:
        lines.append(f"healing: {heal['steps']} steps, {heal['tokens']} tokens, final KL {heal['final_kl']:.4f} "
                     f"(blocks {heal['blocks']}, {heal['seconds']:.0f} s)")
    times = report.get("times_s", {})
    if times:
        lines.append("times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    return "\n".join(lines)
