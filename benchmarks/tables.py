"""The benchmark report (a JSON-able dict) rendered as Markdown tables."""
from __future__ import annotations

_OUR_ROWS = (("load", "load (HF safetensors, float32)"), ("data", "calibration data (read + tokenise + batch)"),
             ("statistics", "statistics pass (distances + normal equations)"), ("selection", "cut selection"),
             ("solve", "solve T"), ("surgery", "surgery"), ("save", "save (HF safetensors)"),
             ("end_to_end", "**end to end** (statistics + selection + solve + surgery)"))


def _cell(s: dict | None) -> str:
    if not s:
        return "–"
    if s["n"] == 1:
        return f"{s['median']:.2f}"
    return f"{s['median']:.2f} [{s['min']:.2f}–{s['max']:.2f}]"


def _g(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def _stage_table(report: dict) -> list[str]:
    solvers = list(report["ours"])
    head = ["stage (seconds, warm: median [min–max])", *[f"ours, {s}" for s in solvers]]
    has_torch = "torch" in report
    if has_torch:
        head.append("PyTorch baseline (lstsq)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    tw = report["torch"]["summary"]["warm"] if has_torch else {}
    for key, label in _OUR_ROWS:
        row = [label, *[_cell(report["ours"][s]["summary"]["warm"].get(key)) for s in solvers]]
        if has_torch:
            if key == "statistics":
                row.append(f"{_cell(tw['distances'])} (distance pass) + {_cell(tw['normal_equations'])} "
                           "(normal-equation pass)")
            else:
                row.append(_cell(tw.get(key)))
        lines.append("| " + " | ".join(row) + " |")
    cold = ["end to end, **cold** (first run: empty jit caches, compiles every shape)"]
    compile_row = ["of which compilation (cold − warm median)"]
    for s in solvers:
        summary = report["ours"][s]["summary"]
        cold.append(f"{summary['cold']['end_to_end']:.2f}" if "cold" in summary else "–")
        compile_row.append(f"{summary['compile_s']['end_to_end']:.2f}" if "compile_s" in summary else "–")
    if has_torch:
        cold.append("(no compilation)")
        compile_row.append("–")
    lines += ["| " + " | ".join(cold) + " |", "| " + " | ".join(compile_row) + " |"]
    return lines


def _flops_table(report: dict) -> list[str]:
    lines = ["| pass | tokens run (real) | GFLOP executed | of which | seconds | GFLOP/s | % of matmul peak |",
             "|---|---|---|---|---|---|---|"]
    for solver, entry in report["ours"].items():
        f, r = entry["flops"], entry["statistics_rate"]
        lines.append(
            f"| ours ({solver}): statistics pass, {len(f['passes'])} pass(es), depth "
            f"{', '.join(str(p['depth']) for p in f['passes'])} blocks, no LM head | {f['padded_tokens']:,} "
            f"({f['real_tokens']:,}) | {_g(f['padded']['total'])} | model {_g(f['padded']['model'])}, "
            f"d×d sums {_g(f['padded']['sums'])} ({', '.join(p['accum_dtype'] for p in f['passes'])}) | "
            f"{r['seconds']:.2f} | {r['flops_per_s'] / 1e9:,.1f} | {100 * r['fraction_of_peak']:.0f} % |")
        break  # the statistics pass is the same for every solver
    if "torch" in report:
        f, r = report["torch"]["flops"], report["torch"]["rate"]
        lines.append(
            f"| PyTorch: distance + normal-equation passes, all blocks + LM head, twice | "
            f"{f['padded_tokens']:,} ({f['real_tokens']:,}) per pass | {_g(f['padded']['total'])} | model "
            f"{_g(f['padded']['model'])}, float64 host sums {_g(f['padded']['sums'])} | {r['seconds']:.2f} | "
            f"{r['flops_per_s'] / 1e9:,.1f} | {100 * r['fraction_of_peak']:.0f} % |")
    for dtype, p in report["peak"].items():
        lines.append(f"| matmul peak ({dtype}, jitted {p['n']}×{p['n']}) | | | | | "
                     f"{p['flops_per_s'] / 1e9:,.1f} | 100 % |")
    return lines


def _quality_table(rows) -> list[str]:
    lines = ["| variant | held-out ppl | calibration cosine loss | relative residual | seconds |",
             "|---|---|---|---|---|"]
    for r in rows:
        loss = r.get("cosine_loss")
        res = r.get("relative_residual")
        sec = r.get("seconds")
        lines.append(f"| {r['variant']} | {r['ppl']:.3f} | {'–' if loss is None else f'{loss:.5f}'} | "
                     f"{'–' if res is None else f'{res:.4f}'} | {'–' if sec is None else f'{sec:.1f}'} |")
    return lines


def _memory_table(memory: dict) -> list[str]:
    lines = ["| solver | × calibration | passages | real tokens | peak RSS after load (MiB) | growth of the "
             "pipeline's own peak vs 1× | peak RSS of the process (MiB) | token buffer (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in memory["rows"]:
        buf = row.get("token_buffer_mib")
        lines.append(f"| {row['solver']} | {row['multiplier']}× | {row['num_samples']} | {row['real_tokens']:,} | "
                     f"{row['pipeline_peak_mib']:.0f} | {100 * row['growth_vs_1x']:+.1f} % | "
                     f"{row['process_peak_mib']:.0f} | {'–' if buf is None else f'{buf:.0f}'} |")
    return lines


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    out = [f"# ReplaceMe benchmark: {s['model']}", "",
           f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; JAX {m['jax']} ({m['jax_backend']}), "
           f"torch {m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}; load average "
           f"at start {m['load_average'][0]:.2f}, at end {report.get('load_average_end', [float('nan')])[0]:.2f}.",
           "",
           f"Settings: {s['num_samples']} calibration passages of ≤ {s['max_length']} tokens "
           f"({s['source']}), batch {s['batch_size']}, {s['num_blocks']} blocks removed of "
           f"{s['num_hidden_layers']}; ours: selection {s['selection']}, candidates {s['candidates']}, "
           f"dtype {s['dtype']}, sums {s['accum_dtype']}, pads {'counted' if s['include_pad'] else 'excluded'}; "
           f"baseline: angular selection, pads {'counted' if s['baseline_include_pad'] else 'excluded'} "
           f"(official); ours: {s['repeats']} warm run(s) per solver, baseline: "
           f"{s.get('baseline_repeats', s['repeats'])} run(s).", "",
           f"Command: `{report['command']}`"]
    if report.get("ours"):
        out += ["", "## Time per stage", ""]
        out += _stage_table(report)
        out += ["", "## FLOPs and matmul efficiency", "",
                "Matmul FLOPs only, on the shapes that run (pads included; real tokens in parentheses). "
                "Attention counts the score entries computed: the full T×T matrix for PyTorch, the causal query "
                "chunks for ours (`flops.attention_pairs`).", ""]
        out += _flops_table(report)
    if report.get("speedup"):
        out += ["", "## Ratios", ""]
        for k, v in report["speedup"].items():
            out.append(f"- {k}: {v:.2f}×")
    if report.get("quality"):
        out += ["", "## Quality on the same cut "
                f"({report['quality_cut'][0]}–{report['quality_cut'][1]}), held-out Wikipedia "
                f"({report['quality_windows']} windows of {report['quality_window']} tokens)", ""]
        out += _quality_table(report["quality"])
    if report.get("memory"):
        mem = report["memory"]
        out += ["", f"## Peak memory vs calibration size (base {mem['base_samples']} passages of ≤ "
                f"{mem['max_length']} tokens; each row a fresh process)", ""]
        out += _memory_table(mem)
    if report.get("targets"):
        out += ["", "## Targets", ""]
        for name, t in report["targets"].items():
            out.append(f"- {name}: {t['value']} (target {t['target']}) — {'met' if t['met'] else 'NOT met'}")
    return "\n".join(out) + "\n"
