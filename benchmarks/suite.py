"""The whole benchmark as one function: ``run_suite(cfg, options) -> report`` (a JSON-able dict).

scripts/benchmark.py turns flags into ``SuiteOptions`` and writes the report; tests call it in-process
on a tiny model.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

from benchmarks import speed
from replaceme_jax.errors import ReplaceMeError

log = logging.getLogger(__name__)
KNOWN_SOLVERS = ("lstsq", "diag", "cosine", "cosine_accurate", "mse")


@dataclasses.dataclass(frozen=True)
class SuiteOptions:
    repeats: int = 3                       # warm runs per side
    solvers: tuple[str, ...] = ("lstsq", "cosine")
    baseline: bool = True                  # time the PyTorch baseline
    baseline_repeats: int | None = None    # its runs (None: ``repeats``)
    baseline_include_pad: bool = True      # the official code counts pad positions
    threads: int | None = None             # torch threads (None: all cores)
    speed: bool = True                     # peak, our runs, the baseline (False: memory table only)
    quality: bool = True                   # held-out ppl of lstsq / cosine / paper cosine on one cut
    ppl_windows: int = 8
    peak_n: int = 2048                     # size of the peak matmul
    memory: bool = False                   # peak RSS for 1x / 4x / 16x calibration data
    memory_base_samples: int = 64
    memory_multipliers: tuple[int, ...] = (1, 4, 16)
    workdir: str | None = None             # scratch (a temp dir inside it, removed at the end)
    command: str = ""

    @property
    def torch_repeats(self) -> int:
        return self.baseline_repeats or self.repeats


def quick_config(cfg):
    """The tiny setting of ``--quick``: 8 passages of <= 64 tokens, a short cosine run."""
    cfg.calibration.num_samples = 8
    cfg.calibration.max_length = 64
    cfg.calibration.batch_size = 4
    cfg.cosine.steps = 20
    cfg.cosine.batch_size = 256
    cfg.eval.window = 128
    return cfg


QUICK_OPTIONS = dict(repeats=1, peak_n=256, ppl_windows=1, memory_base_samples=4)


def _check(options: SuiteOptions):
    if not (options.speed or options.memory):
        raise ReplaceMeError("nothing to measure: enable the speed part, the memory part, or both")
    if options.repeats < 1:
        raise ReplaceMeError(f"repeats must be at least 1, got {options.repeats}")
    if options.baseline_repeats is not None and options.baseline_repeats < 1:
        raise ReplaceMeError(f"baseline_repeats must be at least 1, got {options.baseline_repeats}")
    unknown = [s for s in options.solvers if s not in KNOWN_SOLVERS]
    if unknown or not options.solvers:
        raise ReplaceMeError(f"unknown or no solvers {list(options.solvers)}; use some of {', '.join(KNOWN_SOLVERS)}")


def _settings(cfg, config, options: SuiteOptions) -> dict:
    """The settings that the tables' header states (``config``: the model's ModelConfig)."""
    from replaceme_jax.replaceme.statistics import StatsRequest
    return {"model": cfg.model, "source": cfg.calibration.source, "num_samples": cfg.calibration.num_samples,
            "max_length": cfg.calibration.max_length, "batch_size": cfg.calibration.batch_size,
            "num_blocks": int(cfg.num_blocks), "num_hidden_layers": config.num_hidden_layers,
            "selection": cfg.selection, "candidates": cfg.candidates, "dtype": cfg.dtype,
            "accum_dtype": StatsRequest(accum_dtype=cfg.accum_dtype).resolved_accum_dtype(),
            "include_pad": bool(cfg.calibration.include_pad), "baseline_include_pad": options.baseline_include_pad,
            "repeats": options.repeats, "baseline_repeats": options.torch_repeats,
            "solvers": list(options.solvers), "cosine": cfg.cosine.to_dict()}


def targets(report: dict) -> dict:
    """The issue's targets, each with the measured value and whether it is met."""
    out = {}
    sp = report.get("speedup", {})
    if "lstsq end to end vs PyTorch (warm)" in sp:
        v = sp["lstsq end to end vs PyTorch (warm)"]
        out["lstsq end to end >= 3x faster than PyTorch (warm)"] = {"value": f"{v:.2f}x", "target": ">= 3x",
                                                                    "met": v >= 3}
    if report.get("ours"):
        frac = next(iter(report["ours"].values()))["statistics_rate"]["fraction_of_peak"]
        out["statistics pass >= 50 % of matmul peak"] = {"value": f"{100 * frac:.0f} %", "target": ">= 50 %",
                                                          "met": frac >= 0.5}
    if "cosine / lstsq end to end (warm)" in sp:
        r = sp["cosine / lstsq end to end (warm)"]
        out["cosine end to end within 3x of lstsq"] = {"value": f"{r:.2f}x", "target": "<= 3x", "met": r <= 3}
    if report.get("memory"):
        last = report["memory"]["multipliers"][-1]
        for solver in dict.fromkeys(r["solver"] for r in report["memory"]["rows"]):
            worst = max(r["growth_vs_1x"] for r in report["memory"]["rows"] if r["solver"] == solver)
            out[f"{solver}: peak memory growth 1x -> {last}x < 10 %"] = {
                "value": f"{100 * worst:+.1f} %", "target": "< 10 %", "met": worst < 0.10}
    return out


def run_suite(cfg, options: SuiteOptions) -> dict:
    """Peak matmul, our pipeline per solver, the PyTorch baseline, quality (``speed``), memory: one report."""
    from replaceme_jax.checkpoints.hf import read_hf_config
    _check(options)
    cfg = cfg.copy_and_resolve_references()
    cfg.progress = False
    report = {"command": options.command, "machine": speed.machine()}
    with tempfile.TemporaryDirectory(dir=options.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        hf_dir = speed.export_checkpoint(cfg.model, tmp / "hf")
        report["export_s"] = time.perf_counter() - t0
        report["settings"] = _settings(cfg, read_hf_config(hf_dir), options)
        if options.speed:
            _speed(report, cfg, options, hf_dir, tmp)
        if options.memory:
            from benchmarks import memory
            report["memory"] = memory.measure(cfg, hf_dir, base_samples=options.memory_base_samples,
                                              multipliers=options.memory_multipliers, solvers=options.solvers)
    report["load_average_end"] = list(os.getloadavg())
    report["targets"] = targets(report)
    return speed.as_jsonable(report)


def _speed(report: dict, cfg, options: SuiteOptions, hf_dir: Path, tmp: Path) -> None:
    """Matmul peak, our runs per solver, the baseline's runs, ratios and quality, into ``report``."""
    report["peak"] = {dt: speed.matmul_peak(dt, options.peak_n) for dt in ("float32", "bfloat16")}
    peak = report["peak"].get(cfg.dtype, report["peak"]["float32"])["flops_per_s"]
    log.info("matmul peak: %s", ", ".join(f"{k} {v['flops_per_s'] / 1e9:.1f} GFLOP/s"
                                          for k, v in report["peak"].items()))
    report["ours"], speedup, reference = {}, {}, None
    for solver in options.solvers:
        c = cfg.copy_and_resolve_references()
        c.solver = solver
        runs = speed.run_ours(c, hf_dir, repeats=options.repeats, workdir=tmp)
        summary = runs.summary()
        counted = speed.count_our_flops(runs.model.config, c, runs.result, runs.batches)
        report["ours"][solver] = {
            "runs": runs.runs, "summary": summary, "cuts": runs.runs[-1]["cuts"], "flops": counted,
            "statistics_rate": speed.rates(counted["padded"]["total"],
                                           summary["warm"]["statistics"]["median"], peak)}
        if reference is None or solver == "lstsq":
            reference = runs
        del runs
    config = reference.model.config

    if options.baseline:
        truns = speed.run_torch(cfg, hf_dir, repeats=options.torch_repeats, workdir=tmp,
                                include_pad=options.baseline_include_pad, threads=options.threads)
        tsum = truns.summary()
        tflops = speed.count_torch_flops(config, truns)
        tsec = tsum["warm"]["distances"]["median"] + tsum["warm"]["normal_equations"]["median"]
        report["torch"] = {"runs": truns.runs, "summary": tsum, "cut": list(truns.result.cut),
                           "flops": tflops, "rate": speed.rates(tflops["padded"]["total"], tsec, peak)}
        for solver, entry in report["ours"].items():
            ours = entry["summary"]
            speedup[f"{solver} end to end vs PyTorch (warm)"] = (
                tsum["warm"]["end_to_end"]["median"] / ours["warm"]["end_to_end"]["median"])
            if "cold" in ours:
                speedup[f"{solver} end to end vs PyTorch (cold, incl. compilation)"] = (
                    tsum["warm"]["end_to_end"]["median"] / ours["cold"]["end_to_end"])
        first = next(iter(report["ours"].values()))
        speedup["FLOPs executed, PyTorch / ours (statistics)"] = (
            tflops["padded"]["total"] / first["flops"]["padded"]["total"])
        del truns
    if "lstsq" in report["ours"] and "cosine" in report["ours"]:
        speedup["cosine / lstsq end to end (warm)"] = (
            report["ours"]["cosine"]["summary"]["warm"]["end_to_end"]["median"]
            / report["ours"]["lstsq"]["summary"]["warm"]["end_to_end"]["median"])
    report["speedup"] = speedup

    if options.quality:
        cut = tuple(reference.result.cuts[0])
        tokens = int(sum(b.num_tokens for b in reference.batches))
        c = cfg.cosine
        variants = [("lstsq (ours)", {"solver": "lstsq"}),
                    (f"cosine (ours: init {c.init}, {c.steps} steps of {c.batch_size})", {"solver": "cosine"}),
                    ("cosine (paper recipe: identity init, Adam 1e-4, 10 epochs of 1024)",
                     {"solver": "cosine", "cosine.init": "identity", "cosine.lr": 1e-4,
                      "cosine.batch_size": 1024, "cosine.steps": speed.paper_cosine_steps(tokens)})]
        report["quality"] = speed.quality(reference.model, reference.tokenizer, reference.batches, cfg, cut,
                                          ppl_windows=options.ppl_windows, window=cfg.eval.window,
                                          variants=variants)
        report.update(quality_cut=list(cut), quality_windows=options.ppl_windows,
                      quality_window=cfg.eval.window)
