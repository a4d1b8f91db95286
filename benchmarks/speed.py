"""Stage-by-stage timing of our pipeline and of the PyTorch baseline on the same machine and data.

Both sides load the same Hugging Face float32 export of the model and calibrate on the same texts
with the same settings (passages, max_length, batch size, blocks per cut). Every run repeats every
stage, from loading on. Our first run starts from empty jit caches ("cold": it pays compilation);
the following ``repeats`` runs reuse the compiled executables ("warm"). Summaries are median and
min-max over the warm runs.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import shutil
import statistics as pystats
import time
from pathlib import Path

import numpy as np

from benchmarks import flops
from replaceme_jax.data.batching import segment_lengths
from replaceme_jax.settings import Settings
from replaceme_jax.models.modeling import ATTENTION_CHUNK

log = logging.getLogger(__name__)

# The stages that make up "end to end" (loading, data and saving are timed but not included).
OUR_E2E = ("statistics", "selection", "solve", "surgery")
TORCH_E2E = ("distances", "selection", "normal_equations", "solve", "surgery")


def paper_method(cfg):
    """``cfg`` (a ConfigDict) without the anchor kernel re-fit: the benchmarks time and score the
    paper's method, T alone, which is what the official code runs."""
    c = cfg.copy_and_resolve_references()
    if "refit" in c:
        c.refit.anchor = False
    return c


def summarize(values) -> dict:
    """Median and min-max of a list of seconds."""
    values = [float(v) for v in values]
    return {"median": pystats.median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine() -> dict:
    """What the numbers were measured on."""
    import jax
    import torch
    import transformers
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gb, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "load_average": list(os.getloadavg())}


def matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> dict:
    """FLOP/s of a jitted n x n x n matmul (median of ``repeats`` after one compiling call)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        seconds.append(time.perf_counter() - t0)
    return {"dtype": dtype, "n": n, "seconds": seconds, "flops_per_s": 2 * n ** 3 / pystats.median(seconds)}


def export_checkpoint(model_name: str, path: Path) -> Path:
    """Our model as a float32 Hugging Face directory (with tokenizer) that both sides load."""
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.checkpoints.hf import save_hf
    model, tokenizer = load_pretrained(model_name, param_dtype="float32")
    return save_hf(model, path, tokenizer=tokenizer, dtype="float32", overwrite=True)


def _timed(times: dict, name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    times[name] = time.perf_counter() - t0
    return out


@dataclasses.dataclass
class OurRuns:
    runs: list[dict]          # per run: cold flag, stage times, cuts
    result: object            # PruneResult of the last run
    model: object             # the dense model of the last run
    tokenizer: object
    batches: list

    def summary(self) -> dict:
        warm = [r["times"] for r in self.runs if not r["cold"]]
        out = {"warm": {k: summarize([t[k] for t in warm]) for k in warm[0]} if warm else {}}
        cold = [r["times"] for r in self.runs if r["cold"]]
        if cold:
            out["cold"] = cold[0]
            if warm:
                out["compile_s"] = {k: cold[0][k] - out["warm"][k]["median"] for k in (*OUR_E2E, "end_to_end")}
        return out


def run_ours(cfg, hf_dir: Path, *, repeats: int, workdir: Path, cold: bool = True) -> OurRuns:
    """Load, calibration data, prune (statistics, selection, solve, surgery), save; ``repeats`` warm runs
    after one cold run (jit caches cleared first) when ``cold``."""
    import jax
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.checkpoints.hf import save_hf
    from replaceme_jax.replaceme.pipeline import calibration_batches, prune
    runs, last = [], None
    for i in range(repeats + int(cold)):
        is_cold = cold and i == 0
        if is_cold:
            jax.clear_caches()
        times: dict[str, float] = {}
        model, tokenizer = _timed(times, "load", load_pretrained, str(hf_dir))
        batches = _timed(times, "data", calibration_batches, tokenizer, cfg.calibration)
        result = prune(model, batches, paper_method(cfg))
        times.update({k: result.times.get(k, 0.0) for k in OUR_E2E})
        out = workdir / f"ours-{cfg.solver}-{i}"
        _timed(times, "save", save_hf, result.model, out, tokenizer=tokenizer)
        shutil.rmtree(out, ignore_errors=True)
        times["end_to_end"] = sum(times[k] for k in OUR_E2E)
        runs.append({"cold": is_cold, "times": times, "cuts": [list(c) for c in result.cuts]})
        log.info("ours (%s) run %d%s: %s", cfg.solver, i, " (cold)" if is_cold else "",
                 ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))
        last = (result, model, tokenizer, batches)
    return OurRuns(runs, *last)


@dataclasses.dataclass
class TorchRuns:
    runs: list[dict]
    result: object            # torch_replaceme.BaselineResult of the last run
    shapes: list[tuple[int, int]]
    real_tokens: int

    def summary(self) -> dict:
        times = [r["times"] for r in self.runs]
        return {"warm": {k: summarize([t[k] for t in times]) for k in times[0]}}


def run_torch(cfg, hf_dir: Path, *, repeats: int, workdir: Path, include_pad: bool = True,
              threads: int | None = None) -> TorchRuns:
    """The baseline, stage by stage, ``repeats`` times."""
    import transformers
    from benchmarks import torch_replaceme as tr
    from replaceme_jax.data import load_calibration_texts
    cal = cfg.calibration
    runs, last = [], None
    for i in range(repeats):
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        model = tr.load_model(hf_dir, threads)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
        times["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = load_calibration_texts(cal.source, num_samples=cal.num_samples or None, seed=cal.seed,
                                       part="calibration", text_column=cal.text_column or None,
                                       messages_column=cal.messages_column or None, tokenizer=tokenizer,
                                       hf_config=cal.hf_config or None, hf_split=cal.hf_split)
        batches = tr.tokenize_batches(tokenizer, texts, cal.batch_size, cal.max_length)
        times["data"] = time.perf_counter() - t0
        timer = tr.Timer()
        result = tr.run(model, batches, int(cfg.num_blocks), include_pad=include_pad, timer=timer)
        times.update(timer.times)
        out = workdir / f"torch-{i}"
        _timed(times, "save", result.model.save_pretrained, str(out))
        shutil.rmtree(out, ignore_errors=True)
        times["end_to_end"] = sum(times[k] for k in TORCH_E2E)
        runs.append({"times": times, "cuts": [list(result.cut)]})
        log.info("PyTorch baseline run %d: %s", i, ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))
        last = (result, [b.shape for b in batches], int(sum(int(b.attention_mask.sum()) for b in batches)))
        del model, result
    return TorchRuns(runs, *last)


def statistics_requests(cfg, result, num_blocks: int) -> list:
    """The StatsRequest(s) prune() ran for ``cfg`` (for FLOP counting)."""
    from replaceme_jax.replaceme.statistics import statistics_request
    from replaceme_jax.replaceme.statistics import StatsRequest
    requests = []
    if not cfg.cuts or cfg.candidates == "all":
        requests.append(statistics_request(cfg, num_blocks))
    first = requests[0] if requests else None
    if first is None or any(tuple(c) not in first.cuts for c in result.cuts):
        requests.append(StatsRequest(cuts=tuple(tuple(c) for c in result.cuts)))
    return requests


def count_our_flops(config, cfg, result, batches) -> dict:
    """FLOPs of our statistics pass(es) on the padded batch shapes that ran, and on real tokens only."""
    shapes = [b.shape for b in batches]
    lengths = [(1, n) for b in batches for n in segment_lengths(b)]
    out = {"padded_tokens": sum(b * t for b, t in shapes), "real_tokens": sum(n for _, n in lengths),
           "shapes": [list(s) for s in sorted(set(shapes))], "passes": [],
           "padded": {"model": 0, "sums": 0, "total": 0}, "real": {"model": 0, "sums": 0, "total": 0}}
    num_blocks = config.num_hidden_layers
    for req in statistics_requests(cfg, result, num_blocks):
        depth, products = req.depth(num_blocks), len(req.anchors) + len(req.cuts)
        out["passes"].append({"depth": depth, "anchors": len(req.anchors), "cuts": len(req.cuts),
                              "distances": bool(req.max_distance_blocks), "accum_dtype": req.resolved_accum_dtype()})
        for key, sh, chunk in (("padded", shapes, ATTENTION_CHUNK), ("real", lengths, None)):
            part = flops.statistics_flops(config, sh, depth=depth, num_products=products, chunk=chunk)
            out[key] = {k: out[key][k] + part[k] for k in part}
    return out


def count_torch_flops(config, runs: TorchRuns) -> dict:
    """FLOPs of the baseline's two passes on its padded batch shapes."""
    return {"padded_tokens": sum(b * t for b, t in runs.shapes), "real_tokens": runs.real_tokens,
            "padded": flops.baseline_flops(config, runs.shapes)}


def quality(dense, tokenizer, batches, cfg, cut, *, ppl_windows: int, window: int, variants) -> list[dict]:
    """Held-out perplexity, and cosine loss 1 - cos(m T, l - y) over the calibration tokens of ``cut``,
    for the dense model, plain dropping (T = I) and each (name, config overrides) variant."""
    from replaceme_jax.eval.perplexity import HeldOutPerplexity
    from replaceme_jax.replaceme import solvers
    from replaceme_jax.replaceme.pipeline import prune
    from replaceme_jax.replaceme.statistics import gather_tokens
    from replaceme_jax.replaceme.surgery import apply_cuts
    from replaceme_jax.replaceme.token_buffer import TokenBuffer
    d = dense.config.hidden_size
    capacity = TokenBuffer.budget_from_bytes(int(cfg.cosine.token_budget_mb * 2**20), d)
    buffer = TokenBuffer(capacity, d, seed=cfg.seed)
    gather_tokens(dense, batches, cut, buffer, include_pad=cfg.calibration.include_pad)
    cosine_loss = lambda T: solvers.evaluate_loss(buffer, T, loss="cosine")  # noqa: E731
    heldout = HeldOutPerplexity(tokenizer, window=window, max_windows=ppl_windows)
    ppl = lambda m: heldout(m).ppl  # noqa: E731
    rows = [{"variant": "dense", "ppl": ppl(dense)},
            {"variant": "drop (no transform, T = I)", "ppl": ppl(apply_cuts(dense, [cut])),
             "cosine_loss": cosine_loss(np.eye(d, dtype=np.float32))}]
    for name, overrides in variants:
        c = Settings.from_config(paper_method(cfg)).replace(candidates="selected", **overrides)
        t0 = time.perf_counter()
        result = prune(dense, batches, c, cuts=[cut])
        seconds = time.perf_counter() - t0
        log.info("quality: %s solved in %.1fs", name, seconds)
        rows.append({"variant": name, "ppl": ppl(result.model), "seconds": seconds,
                     "relative_residual": result.residuals[0], "cosine_loss": cosine_loss(result.transforms[0]),
                     "settings": dict(overrides)})
    buffer.close()
    return rows


def paper_cosine_steps(num_tokens: int, batch_size: int = 1024, epochs: int = 10) -> int:
    """The official recipe's step count: ``epochs`` passes over the tokens in batches of 1024."""
    return epochs * math.ceil(num_tokens / batch_size)


def rates(flop_count: float, seconds: float, peak: float) -> dict:
    """Achieved FLOP/s and its fraction of ``peak``."""
    achieved = flop_count / seconds if seconds > 0 else float("nan")
    return {"flops": flop_count, "seconds": seconds, "flops_per_s": achieved, "fraction_of_peak": achieved / peak}


def as_jsonable(obj):
    """Numpy scalars to Python numbers, tuples to lists, keys to strings (for json.dump)."""
    if isinstance(obj, dict):
        return {str(k): as_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj
