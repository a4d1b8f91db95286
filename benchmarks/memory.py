"""Peak resident memory of the pipeline against the amount of calibration data.

Each configuration runs in a fresh Python process (``python -m benchmarks.memory '<json>'``), so no
allocation of one run survives into the next. The child loads the model and the calibration batches,
resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5), runs ``prune`` (statistics,
selection, solve, surgery) and reports the new high-water mark ``VmHWM``: the peak of the pipeline
itself, model and runtime included, without the transient peak of checkpoint loading (reported
separately as the process's ``ru_maxrss``).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(spec: dict) -> dict:
    """One configuration, in this process: load, batch, reset the peak, prune, read the peak."""
    import ml_collections

    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.replaceme.pipeline import calibration_batches, prune
    cfg = ml_collections.ConfigDict(spec["config"])
    model, tokenizer = load_pretrained(spec["model"])
    batches = calibration_batches(tokenizer, cfg.calibration)
    gc.collect()
    reset = _reset_peak()
    before = _status_kib("VmRSS")
    from benchmarks.speed import paper_method
    result = prune(model, batches, paper_method(cfg))
    peak = _status_kib("VmHWM")
    d = model.config.hidden_size
    buffer_tokens = (result.solves[0].info or {}).get("tokens") if cfg.solver != "lstsq" else None
    return {"solver": cfg.solver, "num_samples": cfg.calibration.num_samples,
            "real_tokens": int(sum(b.num_tokens for b in batches)),
            "padded_tokens": int(sum(b.input_ids.size for b in batches)),
            "rss_before_mib": before / 1024, "pipeline_peak_mib": peak / 1024, "peak_reset": reset,
            "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "token_buffer_mib": None if buffer_tokens is None else buffer_tokens * 3 * d * 4 / 2**20,
            "token_budget_mib": float(cfg.cosine.token_budget_mb) if cfg.solver != "lstsq" else None,
            "cuts": [list(c) for c in result.cuts], "times": result.times}


def run_child(spec: dict, timeout: float | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory benchmark child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(cfg, model: str, *, base_samples: int, multipliers=(1, 4, 16), solvers=("lstsq", "cosine"),
            timeout: float | None = None) -> dict:
    """Rows (solver x multiplier) of peak memory, each from a fresh process, with growth vs 1x."""
    rows = []
    for solver in solvers:
        first = None
        for k in multipliers:
            c = cfg.copy_and_resolve_references()
            c.solver = solver
            c.calibration.num_samples = base_samples * k
            c.progress = False
            row = run_child({"model": str(model), "config": c.to_dict()}, timeout=timeout)
            row["multiplier"] = k
            first = first or row
            row["growth_vs_1x"] = row["pipeline_peak_mib"] / first["pipeline_peak_mib"] - 1
            log.info("memory: %s %dx: pipeline peak %.0f MiB (%+.1f%% vs 1x)", solver, k,
                     row["pipeline_peak_mib"], 100 * row["growth_vs_1x"])
            rows.append(row)
    return {"base_samples": base_samples, "max_length": cfg.calibration.max_length,
            "multipliers": list(multipliers), "rows": rows}


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
