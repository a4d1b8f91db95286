"""Benchmark ReplaceMe: our pipeline stage by stage against a PyTorch baseline, FLOPs, peak memory.

    python scripts/benchmark.py --output_dir=runs/benchmark                 # full: the settings of issue 6
    python scripts/benchmark.py --quick --output_dir=/tmp/bench              # tiny setting, a smoke run
    python scripts/benchmark.py --memory --output_dir=runs/benchmark --overwrite
    python scripts/benchmark.py --config.calibration.num_samples=64 --repeats=5 --output_dir=...

In one process, on the same machine, checkpoint (a float32 Hugging Face export of --config.model),
texts and settings it measures (1) the machine's matmul peak (jitted n x n matmul, float32 and
bfloat16), (2) our pipeline for each of --solvers (one cold run with empty jit caches, then --repeats
warm runs of load, calibration data, statistics, selection, solve, surgery, save), (3) the PyTorch
baseline of benchmarks/torch_replaceme.py, --repeats times, (4) held-out quality of lstsq, cosine and
the paper's cosine recipe on one cut, and (5) with --memory, peak RSS for 1x/4x/16x calibration data,
each in a fresh process. Writes results.json and results.md (Markdown tables) into --output_dir.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks/ package lives next to replaceme_jax/

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from replaceme_jax.cli import run_main  # noqa: E402
from replaceme_jax.errors import ReplaceMeError  # noqa: E402

CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "smollm2_135m.py"),
                                         "Pipeline settings (configs/*.py), as for scripts/prune.py.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Directory for results.json and results.md.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace an existing non-empty --output_dir.")
_QUICK = flags.DEFINE_boolean("quick", False, "Tiny setting: 8 passages of <= 64 tokens, 1 warm run, 256x256 "
                              "peak matmul, 1 perplexity window, 4 passages at 1x for --memory.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Warm runs per side (tables show their median and min-max).")
_SOLVERS = flags.DEFINE_list("solvers", ["lstsq", "cosine"], "Our solvers to time end to end.")
_BASELINE = flags.DEFINE_boolean("baseline", True, "Time the PyTorch baseline.")
_BASELINE_REPEATS = flags.DEFINE_integer("baseline_repeats", None, "Runs of the baseline (default: --repeats).")
_BASELINE_PAD = flags.DEFINE_boolean("baseline_include_pad", True,
                                     "The baseline counts pad positions in its sums (as the official code).")
_THREADS = flags.DEFINE_integer("threads", None, "Torch threads (default: all cores).")
_SPEED = flags.DEFINE_boolean("speed", True, "Time ours and the baseline (--nospeed --memory: the memory "
                              "table alone).")
_QUALITY = flags.DEFINE_boolean("quality", True, "Held-out perplexity of lstsq / cosine / paper cosine.")
_PPL_WINDOWS = flags.DEFINE_integer("ppl_windows", 8, "Held-out perplexity windows for --quality.")
_PEAK_N = flags.DEFINE_integer("peak_n", 2048, "Size of the peak matmul.")
_MEMORY = flags.DEFINE_boolean("memory", False, "Also run the memory benchmark (a fresh process per row).")
_MEM_BASE = flags.DEFINE_integer("memory_base_samples", 64, "Calibration passages at 1x for --memory.")
_MEM_MULT = flags.DEFINE_list("memory_multipliers", ["1", "4", "16"], "Calibration multiples for --memory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the scratch directory goes (default: the system temp).")
flags.mark_flags_as_required(["output_dir"])


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}; use --flags (see --help)")
    from benchmarks import suite, tables
    from replaceme_jax.io_utils import atomic_output_dir, atomic_write_json, atomic_write_text
    output = Path(_OUTPUT.value)
    if output.exists() and any(output.iterdir()) and not _OVERWRITE.value:
        raise ReplaceMeError(f"{output} is not empty; pass --overwrite or choose another --output_dir")
    try:
        multipliers = tuple(int(m) for m in _MEM_MULT.value)
    except ValueError as e:
        raise ReplaceMeError(f"--memory_multipliers must be integers, got {_MEM_MULT.value}") from e
    options = dict(speed=_SPEED.value, repeats=_REPEATS.value, solvers=tuple(_SOLVERS.value),
                   baseline=_BASELINE.value, baseline_repeats=_BASELINE_REPEATS.value,
                   baseline_include_pad=_BASELINE_PAD.value, threads=_THREADS.value,
                   quality=_QUALITY.value, ppl_windows=_PPL_WINDOWS.value, peak_n=_PEAK_N.value, memory=_MEMORY.value,
                   memory_base_samples=_MEM_BASE.value, memory_multipliers=multipliers,
                   workdir=_WORKDIR.value, command=" ".join(["python", "scripts/benchmark.py", *sys.argv[1:]]))
    cfg = CONFIG.value.copy_and_resolve_references()
    if _QUICK.value:
        cfg = suite.quick_config(cfg)
        options.update(suite.QUICK_OPTIONS)
    report = suite.run_suite(cfg, suite.SuiteOptions(**options))
    text = tables.markdown(report)
    with atomic_output_dir(output, overwrite=_OVERWRITE.value, what="benchmark results") as out:
        atomic_write_json(out / "results.json", report)
        atomic_write_text(out / "results.md", text)
    print(text)
    print(f"wrote {output / 'results.json'} and {output / 'results.md'}")
    return 0


if __name__ == "__main__":
    run_main(main)
