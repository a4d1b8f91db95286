"""The ReplaceMe method end to end, top to bottom:

config -> load checkpoint -> calibration batches -> gather statistics -> select cuts -> solve T
-> surgery -> save -> evaluate.

``prune`` is the method itself (model in, pruned model out, no I/O); ``run`` adds loading, saving,
evaluation and the report, and is what ``scripts/prune.py`` calls.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from typing import Any

import numpy as np

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.memory import run_memory_report
from replaceme_jax.models.modeling import CausalLM, num_parameters
from replaceme_jax.models.sharding import plan_from_config
from replaceme_jax.replaceme import selection as sel
from replaceme_jax.replaceme.statistics import (Cut, Statistics, StatsRequest, candidate_cuts,
                                                gather_statistics, gather_tokens)
from replaceme_jax.replaceme.surgery import apply_cuts

TOKEN_SOLVERS = {"cosine": "cosine", "cosine_accurate": "cosine_accurate", "mse": "mse"}
CLOSED_FORM_SOLVERS = ("lstsq", "diag")


class Timer:
    """Wall-clock seconds per named stage."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


@dataclasses.dataclass
class PruneResult:
    model: CausalLM                  # the pruned model
    cuts: list[Cut]                  # in the original model's block indices
    transforms: list[np.ndarray | None]
    stats: Statistics | None         # the single pass over the original model
    scores: dict[str, dict[Cut, float]]
    solves: list[Any]                # SolveResult per cut
    residuals: list[float]           # relative residual of each T on its cut's calibration tokens
    times: dict[str, float]


def calibration_batches(tokenizer, cal, *, part: str = "calibration"):
    """Calibration texts -> static-shape batches (``cal`` is the ``calibration`` config block)."""
    from replaceme_jax.data import load_calibration_texts, make_batches, tokenize_texts
    texts = load_calibration_texts(
        cal.source, num_samples=cal.num_samples or None, seed=cal.seed, part=part,
        text_column=cal.text_column or None, messages_column=cal.messages_column or None,
        tokenizer=tokenizer, hf_config=cal.hf_config or None, hf_split=cal.hf_split)
    add_bos = cal.add_bos
    if add_bos == "auto":  # follow the tokenizer: SmolLM2's does not prepend BOS, Llama's does
        probe = tokenizer("a")["input_ids"]
        add_bos = bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    tokens = tokenize_texts(texts, tokenizer, cal.max_length, add_bos=bool(add_bos))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Packing needs every real token weighted alike: the official pad-counting mode keeps one per row.
    pack = bool(cal.get("packing", True)) and not cal.include_pad
    return make_batches(tokens, batch_size=cal.batch_size, max_length=cal.max_length, pad_id=int(pad),
                        pack=pack)


def _multi_cut_mode(cfg) -> str:
    mode = cfg.multi_cut
    if mode == "auto":
        return "sequential" if cfg.solver in TOKEN_SOLVERS else "one_pass"
    if mode not in ("one_pass", "sequential"):
        raise ReplaceMeError(f"multi_cut={mode!r}: use one_pass, sequential or auto")
    return mode


def _check_solver(name: str):
    if name not in TOKEN_SOLVERS and name not in CLOSED_FORM_SOLVERS:
        raise ReplaceMeError(f"unknown solver {name!r}; choose one of "
                             f"{sorted([*CLOSED_FORM_SOLVERS, *TOKEN_SOLVERS])}")


def solve_cut(model, batches, cut: Cut, ne, cfg):
    """T for one cut: closed form from the normal equations, or Optax on streamed tokens."""
    from replaceme_jax.replaceme import solvers
    name = cfg.solver
    _check_solver(name)
    if name in CLOSED_FORM_SOLVERS:
        return solvers.get_solver(name)(ne, alpha=cfg.alpha)
    from replaceme_jax.replaceme.token_buffer import TokenBuffer
    d = model.config.hidden_size
    c = cfg.cosine
    init = solvers.lstsq(ne, alpha=cfg.alpha).T if c.init == "lstsq" else np.eye(d, dtype=np.float32)
    capacity = TokenBuffer.budget_from_bytes(int(c.token_budget_mb * 2**20), d)
    with TokenBuffer(capacity, d, seed=cfg.seed, path=c.buffer_dir or None) as buffer:
        gather_tokens(model, batches, cut, buffer, include_pad=cfg.calibration.include_pad,
                      progress=cfg.progress, plan=plan_from_config(cfg))
        return solvers.cosine(buffer, d=d, init=init, loss=TOKEN_SOLVERS[name], optimizer=c.optimizer,
                              lr=c.lr, steps=c.steps, batch_size=c.batch_size, l1=c.l1, l2=c.l2,
                              seed=cfg.seed)


def statistics_request(cfg, num_blocks: int) -> StatsRequest:
    n = int(cfg.num_blocks)
    if n >= num_blocks or n < 1:
        raise ReplaceMeError(f"num_blocks={n} but the model has {num_blocks} blocks: choose "
                             f"1 <= num_blocks <= {num_blocks - 2} (a cut needs an anchor block before it)")
    if cfg.candidates not in ("all", "selected"):
        raise ReplaceMeError(f"candidates={cfg.candidates!r}: use 'all' or 'selected'")
    cuts = candidate_cuts(num_blocks, n) if cfg.candidates == "all" else ()
    return StatsRequest(max_distance_blocks=num_blocks - 1, cuts=cuts,
                        include_pad=cfg.calibration.include_pad, accum_dtype=cfg.accum_dtype)


def prune(model: CausalLM, batches, cfg, *, stats: Statistics | None = None) -> PruneResult:
    """Select cuts, estimate a transform per cut, and fold them in. No files are touched.

    ``stats``: a pass already gathered on this model and these batches (e.g. cached by an ablation
    sweep); it is used instead of a new pass.
    """
    from replaceme_jax.replaceme import solvers
    _check_solver(cfg.solver)
    timer = Timer()
    plan = plan_from_config(cfg)  # None: one device; else the mesh of cfg.mesh, weights placed on it
    if plan is not None:
        model = plan.shard_model(model)
    num_blocks = model.config.num_hidden_layers
    user_cuts = sel.parse_cuts(cfg.cuts, num_blocks) if cfg.cuts else None
    rule = sel.get_rule(cfg.selection) if user_cuts is None else None  # fail before the pass
    scores: dict[str, dict[Cut, float]] = {}
    if stats is None and (user_cuts is None or cfg.candidates == "all"):
        request = statistics_request(cfg, num_blocks)
        with timer("statistics"):
            stats = gather_statistics(model, batches, request, progress=cfg.progress, plan=plan)
    if stats is not None:
        with timer("selection"):
            scores["angular"] = sel.angular_scores(stats, int(cfg.num_blocks))
            if all(c in stats.request.cuts for c in candidate_cuts(num_blocks, int(cfg.num_blocks))):
                scores["residual"] = sel.residual_scores(stats, int(cfg.num_blocks), alpha=cfg.alpha)
            if user_cuts is None:
                if cfg.selection not in scores:
                    scores[cfg.selection] = rule(stats, int(cfg.num_blocks), alpha=cfg.alpha)
    with timer("selection"):
        cuts = user_cuts or sel.choose_cuts(scores[cfg.selection], cfg.num_transforms, cfg.merge_consecutive)

    transforms, solves, residuals = [], [], []

    def solve(on_model, cut, st):
        ne = st.normal_equations(cut)
        with timer("solve"):
            result = solve_cut(on_model, batches, cut, ne, cfg)
        transforms.append(np.asarray(result.T))
        solves.append(result)
        residuals.append(float(solvers.relative_residual(ne, result.T)))

    def cut_statistics(on_model, cuts_needed):
        with timer("statistics"):
            return gather_statistics(on_model, batches, StatsRequest(
                cuts=tuple(cuts_needed), include_pad=cfg.calibration.include_pad, accum_dtype=cfg.accum_dtype),
                plan=plan)

    if _multi_cut_mode(cfg) == "one_pass" or len(cuts) == 1:
        have_all = stats is not None and all(c in stats.request.cuts for c in cuts)
        stats_cuts = stats if have_all else cut_statistics(model, cuts)
        for cut in cuts:
            solve(model, cut, stats_cuts)
        with timer("surgery"):
            pruned = apply_cuts(model, cuts, transforms)
    else:
        # Official cosine behaviour: each later cut is calibrated on the model already pruned.
        pruned, offset = model, 0
        for s, e in sorted(cuts):
            cut = (s - offset, e - offset)
            solve(pruned, cut, cut_statistics(pruned, [cut]))
            with timer("surgery"):
                pruned = apply_cuts(pruned, [cut], [transforms[-1]])
            offset += e - s
    return PruneResult(model=pruned, cuts=list(cuts), transforms=transforms, stats=stats, scores=scores,
                       solves=solves, residuals=residuals, times=timer.times)


def run(cfg) -> tuple[PruneResult, dict]:
    """Load, calibrate, prune, evaluate and save; returns the result and the JSON report."""
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.replaceme import report as rep
    timer = Timer()
    if cfg.get("distributed", False):
        import jax
        jax.distributed.initialize()
    plan = plan_from_config(cfg)
    with timer("load"):  # each parameter is read straight into its sharding
        model, tokenizer = load_pretrained(cfg.model, param_dtype=cfg.param_dtype, dtype=cfg.dtype,
                                           place=plan.place if plan is not None else None)
    with timer("calibration_data"):
        batches = calibration_batches(tokenizer, cfg.calibration)
    result = prune(model, batches, cfg)
    timer.times.update(result.times)

    evaluation = {}
    if cfg.eval.perplexity_windows:
        with timer("evaluate"):
            evaluation = rep.heldout_perplexities(model, result, tokenizer, cfg)
    report = rep.build_report(cfg, model, result, batches, evaluation, timer.times)
    report["memory"] = run_memory_report(cfg, model.config, batches)
    with timer("save"):
        rep.save_run(cfg, result, tokenizer, report)
    report["times_s"] = {k: round(v, 2) for k, v in timer.times.items()}
    if cfg.evaluate:
        from replaceme_jax.eval.harness import evaluate_models  # lm-eval tasks, optional
        report["tasks"] = evaluate_models(
            [("dense", model, tokenizer), ("pruned", result.model, tokenizer)],
            tasks=cfg.evaluate, limit=cfg.eval.limit or None, heldout_ppl=False,
            output_dir=f"{cfg.output_dir}/eval", overwrite=cfg.overwrite)
    rep.write_report_json(cfg.output_dir, report)
    return result, report


def parameter_counts(dense: CausalLM, pruned: CausalLM) -> dict:
    return {"dense": num_parameters(dense), "pruned": num_parameters(pruned)}
