"""Evaluation throughput: our harness backend vs the harness's own Hugging Face backend.

Both read the same exported checkpoint (float32) and score the same seeded random items of each
task in one process, one after the other; the table gives items per CPU-second (user + system
time of the process, so a busy machine distorts it less than wall time), the ratio, the largest
per-request log-likelihood difference and both accuracies, then what scoring every item of the
offline task set would cost at the measured rates.

First, without timing anything, a position table: the positions each backend feeds the model for
the same requests (the HF backend: one row per distinct input, its logits cache sharing identical
inputs, e.g. one-token answers of one context; ours: each distinct prefix once, from the scorer's
own layout) and the FLOPs that follow (blocks at every position fed, the LM head at every position
for HF and at the scored ones for ours; attention scores and padding not counted in the first
ratio). ``--positions_only`` stops there (seconds: only tokenisation runs).

    python scripts/bench_eval.py --items=100 --output_dir=runs/bench_eval
    python scripts/bench_eval.py --items=100 --positions_only
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time

from absl import flags

from replaceme_jax.cli import run_main
from replaceme_jax.errors import ReplaceMeError

DEFAULT_TASKS = "winogrande,boolq,openbookqa,piqa,sciq,lambada_openai,arc_easy,arc_challenge,hellaswag"
_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Registry name or checkpoint path.")
_TASKS = flags.DEFINE_string("tasks", DEFAULT_TASKS, "Comma-separated task names (see scripts/evaluate.py).")
_ITEMS = flags.DEFINE_integer("items", 100, "Random items per task (the same for both backends).")
_SEED = flags.DEFINE_integer("seed", 1234, "Seed of the item draw.")
_HF_BATCH = flags.DEFINE_list("hf_batch_sizes", ["1", "16"], "Batch sizes of the HF backend, each run and "
                              "compared (1 is the harness's default, 16 a tuned setting).")
_HF_SOFTMAX = flags.DEFINE_enum("hf_softmax_dtype", "float32", ["float32", "float64"],
                                "Log-softmax dtype of the HF backend (float64 is slower and more exact).")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 2048, "Context window of both backends.")
_WARM = flags.DEFINE_boolean("warm", True, "Also time ours a second time per task (compiled shapes reused): the "
                             "rate a long evaluation approaches, where compilation is amortised.")
_POSITIONS_ONLY = flags.DEFINE_boolean("positions_only", False, "Print the position and FLOP table only "
                                       "(no backend is timed).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Optional directory for bench_eval.json.")


class _Recorder:
    """Stands in for our backend's scorer: keeps the (context, continuation) pairs a task sends."""

    def __init__(self):
        self.pairs = []

    def score_pairs(self, pairs, progress=None, on_done=None):
        import numpy as np
        self.pairs += list(pairs)
        return np.zeros(len(pairs)), np.zeros(len(pairs), bool)


def _position_rows(lm, specs, manager, model_config, sample_sets) -> list[dict]:
    """Per task: positions the HF backend and ours feed for the same requests, and their FLOPs."""
    from replaceme_jax.models.modeling import parameter_count

    block = 2 * model_config.num_hidden_layers * parameter_count(model_config)[1]
    head = 2 * model_config.vocab_size * model_config.hidden_size
    scorer, rows = lm.scorer, []

    def flops(r) -> dict:  # HF's FLOPs over ours, without and with our padding
        return {"flop_ratio": r["hf_positions"] * (block + head) / (r["fed"] * block + r["scored"] * head),
                "flop_ratio_padded": r["hf_positions"] * (block + head) / (r["run"] * block + r["scored"] * head)}
    try:
        for spec in specs:
            lm.scorer = recorder = _Recorder()
            _run(lm, spec, manager, sample_sets[spec.name])
            pairs = recorder.pairs
            hf = sum(len(x) for x in {tuple(c) + tuple(k[:-1]) for c, k in pairs})
            ours = scorer.layout(pairs)
            row = {"task": spec.name, "requests": len(pairs), "hf_positions": hf, **ours}
            rows.append({**row, **flops(row)})
    finally:
        lm.scorer = scorer
    keys = ("requests", "hf_positions", "fed", "run", "scored")
    total = {"task": "all", **{k: sum(r[k] for r in rows) for k in keys}}
    return rows + [{**total, **flops(total)}]


def _position_table(rows) -> str:
    lines = ["| task | requests | HF positions | ours fed | ours run (padding incl.) | ours scored "
             "| HF / ours FLOPs | with our padding |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bold = "**" if r["task"] == "all" else ""
        lines.append(f"| {bold}{r['task']}{bold} | {r['requests']:,} | {r['hf_positions']:,} | {r['fed']:,} "
                     f"| {r['run']:,} | {r['scored']:,} | {bold}{r['flop_ratio']:.2f}x{bold} "
                     f"| {r['flop_ratio_padded']:.2f}x |")
    return "\n".join(lines)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _run(lm, spec, manager, samples):
    import lm_eval

    wall, cpu = time.perf_counter(), _cpu_seconds()
    res = lm_eval.simple_evaluate(model=lm, tasks=[spec.harness_name], task_manager=manager,
                                  samples=samples, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    return res, time.perf_counter() - wall, _cpu_seconds() - cpu


def _loglikelihoods(res) -> dict:
    out = {}
    for task, samples in res["samples"].items():
        for s in samples:
            out[(task, s["doc_id"])] = [float(r[0][0]) for r in s["resps"]]
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}; pass everything as --flags")
    if _ITEMS.value < 1:
        raise ReplaceMeError(f"--items must be at least 1, got {_ITEMS.value}")
    import datasets
    from lm_eval.models.huggingface import HFLM

    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.checkpoints.hf import save_hf
    from replaceme_jax.eval.harness import _task_metrics, item_samples
    from replaceme_jax.eval.lm_eval_backend import ReplaceMeJaxLM
    from replaceme_jax.eval.tasks import resolve_tasks, task_manager

    datasets.disable_progress_bars()
    specs = resolve_tasks(_TASKS.value)
    manager = task_manager(specs)
    import jax
    jax.config.update("jax_enable_compilation_cache", False)  # "cold" means compiled in this run
    model, tokenizer = load_pretrained(_MODEL.value)
    hf_batches = [int(b) for b in _HF_BATCH.value]
    if not hf_batches or min(hf_batches) < 1:
        raise ReplaceMeError(f"--hf_batch_sizes must be positive integers, got {_HF_BATCH.value}")
    rows, totals = [], {"ours": [0, 0.0], "warm": [0, 0.0], **{b: [0, 0.0] for b in hf_batches}}
    sample_sets = {spec.name: item_samples(spec, manager, _ITEMS.value, _SEED.value) for spec in specs}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_hf(model, os.path.join(tmp, "hf"), tokenizer=tokenizer, dtype="float32")
        model, tokenizer = load_pretrained(str(path))
        ours = ReplaceMeJaxLM(model=model, tokenizer=tokenizer, max_length=_MAX_LENGTH.value)
        positions = _position_rows(ours, specs, manager, model.config, sample_sets)
        print(_position_table(positions), flush=True)
        if _POSITIONS_ONLY.value:
            _save({"positions": positions, "cpu": _cpu_name(), "cores": os.cpu_count()})
            return 0
        hf = {b: HFLM(pretrained=str(path), dtype="float32", softmax_dtype=_HF_SOFTMAX.value,
                      max_length=_MAX_LENGTH.value, batch_size=b, device="cpu") for b in hf_batches}
        full_cost = 0.0
        for spec in specs:
            samples = sample_sets[spec.name]
            n = sum(len(v) for v in samples.values())
            res_o, wall_o, cpu_o = _run(ours, spec, manager, samples)
            ll_o, m_o = _loglikelihoods(res_o), _task_metrics(res_o, spec)[spec.metric]
            cpu_w = _run(ours, spec, manager, samples)[2] if _WARM.value else cpu_o
            everything = sum(len(v) for v in item_samples(spec, manager, None, 0).values())
            full_cost += everything / (n / cpu_w)
            row = {"task": spec.name, "items": n, "all_items": everything, "ours_items_per_cpu_s": n / cpu_o,
                   "ours_warm_items_per_cpu_s": n / cpu_w, "ours_wall_s": wall_o, "ours_cpu_s": cpu_o,
                   "ours_warm_cpu_s": cpu_w, "metric": spec.metric, "ours_metric": m_o, "hf": {}}
            totals["ours"][0] += n
            totals["ours"][1] += cpu_o
            totals["warm"][0] += n
            totals["warm"][1] += cpu_w
            for b, lm in hf.items():
                res_h, wall_h, cpu_h = _run(lm, spec, manager, samples)
                ll_h = _loglikelihoods(res_h)
                diff = max(abs(x - y) for k in ll_o for x, y in zip(ll_o[k], ll_h[k]))
                row["hf"][b] = {"items_per_cpu_s": n / cpu_h, "ratio": cpu_h / cpu_o, "warm_ratio": cpu_h / cpu_w,
                                "wall_s": wall_h,
                                "cpu_s": cpu_h, "max_abs_ll_diff": diff,
                                "metric": _task_metrics(res_h, spec)[spec.metric]}
                totals[b][0] += n
                totals[b][1] += cpu_h
            rows.append(row)
            print(f"[bench_eval] {spec.name}: {n} items, ours {cpu_o:.0f} CPU-s, "
                  + ", ".join(f"HF batch {b} {r['cpu_s']:.0f} CPU-s" for b, r in row["hf"].items()), flush=True)
    hf_cols = "".join(f" HF b{b} items/CPU-s | ours / HF b{b} (cold, warm) |" for b in hf_batches)
    header = (f"| task | items | ours items/CPU-s (cold, warm) |{hf_cols} max abs Δ loglik | metric ours / HF |\n"
              f"|---|---|---|{'---|---|' * len(hf_batches)}---|---|")
    lines = [header]
    for r in rows:
        cells = "".join(f" {h['items_per_cpu_s']:.2f} | {h['ratio']:.2f}x, {h['warm_ratio']:.2f}x |"
                        for h in r["hf"].values())
        diff = max(h["max_abs_ll_diff"] for h in r["hf"].values())
        metrics = " / ".join(f"{h['metric']:.3f}" for h in r["hf"].values())
        lines.append(f"| {r['task']} | {r['items']} | {r['ours_items_per_cpu_s']:.2f}, "
                     f"{r['ours_warm_items_per_cpu_s']:.2f} |{cells} {diff:.1e} | {r['ours_metric']:.3f} / {metrics} |")
    rate = {k: v[0] / v[1] for k, v in totals.items()}
    cells = "".join(f" {rate[b]:.2f} | **{rate['ours'] / rate[b]:.2f}x, {rate['warm'] / rate[b]:.2f}x** |"
                    for b in hf_batches)
    lines.append(f"| **all** | {totals['ours'][0]} | {rate['ours']:.2f}, {rate['warm']:.2f} |{cells} | |")
    print("\n".join(lines))
    print(f"Every item of these tasks ({sum(r['all_items'] for r in rows):,}) at the {'warm ' if _WARM.value else ''}"
          f"rates measured here: ours {full_cost / 3600:.2f} CPU-hours per model.")
    print(f"Model {_MODEL.value} (float32, exported once, read by both); HF backend log-softmax "
          f"{_HF_SOFTMAX.value}, batch sizes {', '.join(map(str, hf_batches))}; {_ITEMS.value} items per task, "
          f"seed {_SEED.value}; {_cpu_name()}, {os.cpu_count()} cores.")
    _save({"positions": positions, "rows": rows, "full_cpu_hours_ours": full_cost / 3600,
           "cpu": _cpu_name(), "cores": os.cpu_count()})
    return 0


def _save(result: dict) -> None:
    if _OUTPUT.value:
        os.makedirs(_OUTPUT.value, exist_ok=True)
        out = os.path.join(_OUTPUT.value, "bench_eval.json")
        with open(out + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(out + ".tmp", out)


if __name__ == "__main__":
    run_main(main)
