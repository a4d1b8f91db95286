"""The ReplaceMe method end to end, top to bottom:

config -> load checkpoint -> calibration batches -> gather statistics -> select cuts -> solve T
-> surgery -> save -> evaluate.

``prune`` is the method itself (model in, pruned model out, no I/O); ``run`` adds loading, saving,
evaluation and the report, and is what ``scripts/prune.py`` calls.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import contextmanager
from typing import Any, Sequence

import numpy as np

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.memory import run_memory_report
from replaceme_jax.models.modeling import CausalLM
from replaceme_jax.models.sharding import plan_from_config
from replaceme_jax.replaceme import selection as sel
from replaceme_jax.replaceme.cuts import Cut, candidate_cuts, parse_cuts, validate_cuts
from replaceme_jax.replaceme.statistics import (Statistics, StatsRequest, gather_statistics, gather_tokens,
                                                statistics_request)
from replaceme_jax.replaceme.surgery import apply_cuts
from replaceme_jax.settings import CLOSED_FORM_SOLVERS, Settings, check_against_model


class Timer:
    """Wall-clock seconds per named stage; with ``log``, a line when a described stage starts and ends,
    so a long run is never silent (the loops inside a stage draw their own progress bars)."""

    def __init__(self, log: bool = False):
        self.times: dict[str, float] = {}
        self.log = log

    @contextmanager
    def __call__(self, name: str, what: str | None = None):
        t0 = time.perf_counter()
        if self.log and what:
            print(f"[replaceme] {what} ...", file=sys.stderr, flush=True)
        yield
        dt = time.perf_counter() - t0
        self.times[name] = self.times.get(name, 0.0) + dt
        if self.log and what:
            print(f"[replaceme] {what}: done in {dt:.1f} s", file=sys.stderr, flush=True)


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
    budget: list[Any] | None = None  # budget.blocks: the combinations considered (budgets.Candidate)
    refits: list[Any] | None = None  # refit.anchor: refit.KernelFit per cut (the anchor kernel used instead of W T)
    downstream: list[Any] | None = None  # refit.downstream: refit.BlockFit per re-fitted block after the cuts


def calibration_batches(tokenizer, cal, *, part: str = "calibration", num_samples=...):
    """Calibration texts -> static-shape batches (``cal``: the ``calibration`` settings or config block;
    ``num_samples`` overrides its passage count, e.g. for the validation part)."""
    from replaceme_jax.data import load_calibration_texts
    if not isinstance(cal, Settings):
        cal = Settings.from_config({"calibration": cal.to_dict() if hasattr(cal, "to_dict") else dict(cal)})
    texts = load_calibration_texts(
        cal.calibration.source, num_samples=cal.calibration.num_samples if num_samples is ... else num_samples,
        seed=cal.calibration.seed, part=part, validation_fraction=cal.calibration.validation_fraction,
        text_column=cal.calibration.text_column or None, messages_column=cal.calibration.messages_column or None,
        tokenizer=tokenizer, hf_config=cal.calibration.hf_config or None, hf_split=cal.calibration.hf_split)
    return batches_from_texts(texts, tokenizer, cal)


def resolve_self_source(cfg: Settings, model, tokenizer, timer=None) -> Settings:
    """``cfg`` with each ``self`` part of the calibration source (and of the healing text, which
    defaults to it) replaced by a corpus the model writes itself, sized for every use of it and
    generated on first use (``data.self_generated.cached_self_corpus``)."""
    from replaceme_jax.data.calibration import source_parts
    from replaceme_jax.data.self_generated import SELF_SOURCE, cached_self_corpus, passages_needed
    c, h = cfg.calibration, cfg.heal
    uses = [(c.source, c.num_samples, c.validation_samples)]
    if h.steps:
        uses.append((h.source or c.source, h.num_samples, 0))
    used, cal, val = False, 0, 0
    for source, n, v in uses:
        parts = source_parts(source)
        if SELF_SOURCE not in parts:
            continue
        if n is None:
            raise ReplaceMeError("calibration source 'self' needs a passage count; fix: set "
                                 "calibration.num_samples (None, every passage, gives no size to generate)")
        # A mixture's share is at most the ceiling of an even split.
        used, cal, val = True, max(cal, -(-n // len(parts))), max(val, -(-v // len(parts)))
    if not used:
        return cfg
    import jax
    if jax.process_count() > 1:  # each host's cache could differ, and generation is a collective step
        raise ReplaceMeError("calibration source 'self' is generated on one host only; fix: write the corpus once "
                             "with scripts/generate_calibration.py, put it on storage every host reads, and pass "
                             "its path (e.g. calibration.source=boolq+/shared/self.jsonl)")
    n = passages_needed(cal, val, c.validation_fraction)
    timer = timer or Timer()
    with timer("self_generated", f"the model's own text ({n} passages; generated once, then cached)"):
        def progress(done, total):
            if cfg.progress:
                print(f"[replaceme]   {done}/{total} passages", file=sys.stderr, flush=True)
        path = str(cached_self_corpus(model, tokenizer, n, progress=progress))

    def resolve(source):
        return "+".join(path if p == SELF_SOURCE else p for p in source_parts(source)) if source else source
    return cfg.replace(**{"calibration.source": resolve(c.source), "heal.source": resolve(h.source)})


def healing_batches(tokenizer, cfg: Settings):
    """The LoRA healing stage's batches: ``heal.num_samples`` passages of ``heal.source`` (default: the
    calibration source's training part), ``heal.max_length`` tokens, ``heal.batch_size`` rows."""
    h = cfg.heal
    return calibration_batches(tokenizer, cfg.replace(**{
        "calibration.source": h.source or cfg.calibration.source, "calibration.num_samples": h.num_samples,
        "calibration.max_length": h.max_length, "calibration.batch_size": h.batch_size}))


def batches_from_texts(texts, tokenizer, cal):
    """Texts -> the static-shape batches of the ``calibration`` settings (layout, length, batch size, packing)."""
    from replaceme_jax.data import make_batches, stream_token_rows, tokenize_texts
    c = cal.calibration
    bos = cal.resolved_add_bos(tokenizer)
    texts = list(texts)
    # The first n passages are their own sequences, the rest one stream cut into full rows; mixed
    # gives both sequence starts (what short task items see) and long positions.
    n = {"passages": len(texts), "stream": 0, "mixed": len(texts) // 2}[c.layout]
    tokens = (tokenize_texts(texts[:n], tokenizer, c.max_length, add_bos=bos)
              + stream_token_rows(texts[n:], tokenizer, c.max_length, add_bos=bos))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Packing needs every real token weighted alike: the official pad-counting mode keeps one per row.
    pack = c.packing and not c.include_pad
    return make_batches(tokens, batch_size=c.batch_size, max_length=c.max_length, pad_id=int(pad),
                        pack=pack)


def solve_cut(model, batches, cut: Cut, ne, cfg, *, validation_ne=None):
    """T for one cut: closed form from the normal equations, or Optax on streamed tokens.

    ``validation_ne``: the cut's sums on validation text, from which ``cfg.alpha_grid`` picks the ridge."""
    import functools

    from replaceme_jax.replaceme import solvers
    cfg = Settings.from_config(cfg)
    name = cfg.solver
    if name in CLOSED_FORM_SOLVERS:
        solve = solvers.get_solver(name)
        if name == "lstsq":
            solve = functools.partial(solve, toward=cfg.ridge_target)
        if cfg.alpha_grid:
            if validation_ne is None:
                raise ReplaceMeError("alpha_grid needs the cut's normal equations on validation text "
                                     "(prune(..., validation=batches); pipeline.run builds them)")
            return solvers.choose_alpha(solve, ne, validation_ne, cfg.alpha_values())
        return solve(ne, alpha=cfg.alpha)
    from replaceme_jax.replaceme.token_buffer import TokenBuffer
    d = model.config.hidden_size
    c = cfg.cosine
    init = (solvers.lstsq(ne, alpha=cfg.alpha, toward=cfg.ridge_target).T if c.init == "lstsq"
            else np.eye(d, dtype=np.float32))
    capacity = TokenBuffer.budget_from_bytes(int(c.token_budget_mb * 2**20), d)
    with TokenBuffer(capacity, d, seed=cfg.seed, path=c.buffer_dir or None) as buffer:
        gather_tokens(model, batches, cut, buffer, include_pad=cfg.calibration.include_pad,
                      progress=cfg.progress, plan=plan_from_config(cfg))
        return solvers.cosine(buffer, d=d, init=init, loss=name, optimizer=c.optimizer,
                              lr=c.lr, steps=c.steps, batch_size=c.batch_size, l1=c.l1, l2=c.l2,
                              seed=cfg.seed)


def prune(model: CausalLM, batches, cfg, *, stats: Statistics | None = None,
          cuts: Sequence[Cut] | None = None, validation=None, timer: Timer | None = None) -> PruneResult:
    """Select cuts, estimate a transform per cut, and fold them in. No files are touched.

    The one ReplaceMe driver: the main job, the baselines' ``replaceme``, the ablation sweep, the
    quality study and the benchmarks all call it. ``cfg``: ``Settings`` (or a config, validated
    here). ``stats``: a pass already gathered on this model and these batches (e.g. cached by an
    ablation sweep); it is used instead of a new pass. ``cuts``: cuts chosen already (e.g. from
    cached selection scores); selection is then skipped and ``cfg.cuts`` ignored. ``validation``:
    batches of the calibration source's validation part, for the ``search`` rule.
    """
    from replaceme_jax.replaceme import solvers
    cfg = Settings.from_config(cfg)
    timer = Timer() if timer is None else timer
    batches = list(batches)
    plan = plan_from_config(cfg)  # None: one device; else the mesh of cfg.mesh, weights placed on it
    if plan is not None:
        model = plan.shard_model(model)
    depth = model.config.num_hidden_layers
    n = cfg.budget.blocks or cfg.num_blocks  # the single-cut score tables are for the whole budget
    check_against_model(cfg, depth)
    budgeted = bool(cfg.budget.blocks) and cuts is None
    chosen = list(validate_cuts(cuts, depth)) if cuts is not None else None
    user_cuts = parse_cuts(cfg.cuts, depth) if cfg.cuts and chosen is None else None
    rule = sel.get_rule(cfg.selection) if user_cuts is None and chosen is None else None  # fail before the pass
    if budgeted and cfg.budget.confirm and validation is None:
        raise ReplaceMeError("budget.confirm scores the top combinations on validation batches; pass validation= "
                             "(pipeline.run builds them from the calibration source) or set budget.confirm=0")
    if rule is not None and cfg.selection in sel.MODEL_RULES and validation is None:
        raise ReplaceMeError(f"selection={cfg.selection!r} scores pruned models on validation batches; pass "
                             "validation= (pipeline.run builds them from the calibration source)")
    if cfg.alpha_grid and validation is None:
        raise ReplaceMeError("alpha_grid chooses the ridge on validation batches; pass validation= "
                             "(pipeline.run builds them from the calibration source)")
    if (cfg.refit.anchor or cfg.refit.downstream) and validation is None:
        raise ReplaceMeError("refit.anchor and refit.downstream choose their ridge on validation batches; pass "
                             "validation= (pipeline.run builds them from the calibration source) or set "
                             "refit.anchor=False and refit.downstream=0")
    scores: dict[str, dict[Cut, float]] = {}
    if chosen is not None:
        cuts = chosen
    elif stats is None and (user_cuts is None or cfg.candidates == "all"):
        request = statistics_request(cfg, depth)
        with timer("statistics", f"statistics pass over {len(batches)} batches ({len(request.cuts)} candidate cuts)"):
            stats = gather_statistics(model, batches, request, progress=cfg.progress, plan=plan)
    if stats is not None and chosen is None:
        with timer("selection", f"scoring cuts of {n} blocks ({cfg.selection if user_cuts is None else 'user cuts'})"):
            scores["angular"] = sel.angular_scores(stats, n)
            if all(c in stats.request.cuts for c in candidate_cuts(depth, n)):
                scores["residual"] = sel.residual_scores(stats, n, alpha=cfg.alpha)
            if user_cuts is None and cfg.selection not in scores:
                extra = {}
                if cfg.selection in sel.MODEL_RULES:
                    extra = dict(model=model, validation=validation, progress=cfg.progress,
                                 solver=cfg.solver if cfg.solver in CLOSED_FORM_SOLVERS else "lstsq")
                scores[cfg.selection] = rule(stats, n, alpha=cfg.alpha, **extra)
    considered = None
    if budgeted:
        from replaceme_jax.replaceme.budgets import choose_budget
        with timer("selection", f"splitting {cfg.budget.blocks} blocks over up to {cfg.budget.max_cuts} cuts"):
            cuts, considered = choose_budget(stats, cfg, model=model, validation=validation,
                                             solver=cfg.solver if cfg.solver in CLOSED_FORM_SOLVERS else "lstsq")
    elif chosen is None:
        with timer("selection"):
            cuts = user_cuts or sel.choose_cuts(scores[cfg.selection], cfg.num_transforms, cfg.merge_consecutive)

    transforms, solves, residuals, kernels, refits = [], [], [], [], []

    def solve(on_model, cut, st):
        ne = st.normal_equations(cut)
        val_ne = None
        if cfg.alpha_grid:  # the cut's sums on the validation text, for choosing the ridge
            with timer("statistics", f"validation statistics for cut [{cut[0]}, {cut[1]})"):
                val_ne = gather_statistics(on_model, validation, StatsRequest(
                    cuts=(cut,), include_pad=cfg.calibration.include_pad, accum_dtype=cfg.accum_dtype),
                    plan=plan).normal_equations(cut)
        with timer("solve", f"solving T for cut [{cut[0]}, {cut[1]}) ({cfg.solver})"):
            try:
                result = solve_cut(on_model, batches, cut, ne, cfg, validation_ne=val_ne)
            except ReplaceMeError as e:
                raise ReplaceMeError(f"cut [{cut[0]}, {cut[1]}) ({cfg.solver}): {e}") from None
        transforms.append(np.asarray(result.T))
        solves.append(result)
        residuals.append(float(solvers.relative_residual(ne, result.T)))
        fit = None
        if cfg.refit.anchor:
            from replaceme_jax.replaceme.refit import parse_grid, refit_anchor
            with timer("refit", f"re-fitting the anchor kernel of cut [{cut[0]}, {cut[1]})"):
                fit = refit_anchor(on_model, batches, validation, cut, result.T, parse_grid(cfg.refit.alpha_grid),
                                   include_pad=cfg.calibration.include_pad, accum_dtype=cfg.accum_dtype,
                                   plan=plan, progress=cfg.progress, weighting=cfg.refit.weighting)
        refits.append(fit)
        kernels.append(None if fit is None else fit.kernel)

    def cut_statistics(on_model, cuts_needed):
        with timer("statistics", f"statistics pass for cuts {list(cuts_needed)}"):
            return gather_statistics(on_model, batches, StatsRequest(
                cuts=tuple(cuts_needed), include_pad=cfg.calibration.include_pad, accum_dtype=cfg.accum_dtype),
                plan=plan, progress=cfg.progress)

    if cfg.multi_cut_mode == "one_pass" or len(cuts) == 1:
        have_all = stats is not None and all(c in stats.request.cuts for c in cuts)
        stats_cuts = stats if have_all else cut_statistics(model, cuts)
        for cut in cuts:
            solve(model, cut, stats_cuts)
        with timer("surgery"):
            pruned = apply_cuts(model, cuts, transforms, kernels)
    else:
        # Official cosine behaviour: each later cut is calibrated on the model already pruned.
        pruned, offset = model, 0
        for s, e in sorted(cuts):
            cut = (s - offset, e - offset)
            solve(pruned, cut, cut_statistics(pruned, [cut]))
            with timer("surgery"):
                pruned = apply_cuts(pruned, [cut], [transforms[-1]], [kernels[-1]])
            offset += e - s
    downstream = None
    if cfg.refit.downstream:
        from replaceme_jax.replaceme.refit import parse_grid, refit_downstream
        with timer("refit", f"re-fitting up to {cfg.refit.downstream} blocks after each cut toward the dense stream"):
            pruned, downstream = refit_downstream(
                model, pruned, cuts, batches, validation, cfg.refit.downstream, parse_grid(cfg.refit.alpha_grid),
                include_pad=cfg.calibration.include_pad, accum_dtype=cfg.accum_dtype, plan=plan,
                progress=cfg.progress, weighting=cfg.refit.weighting)
    return PruneResult(model=pruned, cuts=list(cuts), transforms=transforms, stats=stats, scores=scores,
                       solves=solves, residuals=residuals, times=timer.times, budget=considered,
                       refits=refits if cfg.refit.anchor else None, downstream=downstream)


def heal_directory(cfg: Settings) -> str:
    """Where the healing stage keeps its resumable state: beside the output, which is written whole."""
    return cfg.output_dir.rstrip("/") + ".heal"


def estimated_output_bytes(cfg: Settings) -> int | None:
    """Bytes the run's outputs need on disk (checkpoints of the pruned model, from its architecture
    alone; None when it cannot be known before loading, e.g. for an Orbax input)."""
    import jax.numpy as jnp

    from replaceme_jax.checkpoints import load_config
    from replaceme_jax.models.modeling import parameter_count
    try:
        config = load_config(cfg.model, architecture=cfg.architecture or None,
                             param_dtype=cfg.param_dtype, dtype=cfg.dtype)
    except ReplaceMeError:
        return None
    total, per_block = parameter_count(config)
    kept = total - per_block * min(cfg.blocks_removed, config.num_hidden_layers - 1)
    copies = int(cfg.save_orbax) + int(cfg.export_hf)
    return kept * jnp.dtype(cfg.param_dtype).itemsize * copies + (64 << 20)  # + tokenizer, tables, plots


def preflight(cfg: Settings) -> None:
    """Everything that can fail about the output before the (long) run starts."""
    from replaceme_jax.io_utils import preflight_output_dir
    preflight_output_dir(cfg.output_dir, overwrite=cfg.overwrite, needed_bytes=estimated_output_bytes(cfg),
                         what="run output", overwrite_hint="--config.overwrite=True")
    if cfg.evaluate:
        from replaceme_jax.eval.harness import check_harness_installed
        check_harness_installed()


def run(cfg) -> tuple[PruneResult, dict]:
    """Validate, load, calibrate, prune, evaluate and save; returns the result and the JSON report."""
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.replaceme import report as rep
    from replaceme_jax.replaceme.save import save_run, write_report_json
    cfg = Settings.from_config(cfg)  # every setting checked before anything is loaded
    preflight(cfg)
    timer = Timer(log=cfg.progress)
    if cfg.distributed:
        import jax
        jax.distributed.initialize()
    plan = plan_from_config(cfg)
    with timer("load", f"loading {cfg.model}"):  # each parameter is read straight into its sharding
        model, tokenizer = load_pretrained(cfg.model, param_dtype=cfg.param_dtype, dtype=cfg.dtype,
                                           place=plan.place if plan is not None else None)
    check_against_model(cfg, model.config.num_hidden_layers)
    cfg = resolve_self_source(cfg, model, tokenizer, timer)
    with timer("calibration_data", f"calibration data ({cfg.calibration.source})"):
        batches = calibration_batches(tokenizer, cfg)
        validation = None
        if ((cfg.selection == "search" and not cfg.cuts) or cfg.alpha_grid or cfg.refit.anchor or cfg.refit.downstream
                or (cfg.budget.blocks and cfg.budget.confirm)):
            validation = calibration_batches(tokenizer, cfg, part="validation",
                                             num_samples=cfg.calibration.validation_samples)
    result = prune(model, batches, cfg, validation=validation, timer=timer)
    from replaceme_jax.checkpoints.finite import non_finite_parameters
    bad = non_finite_parameters(result.model)
    if bad:  # never export a broken model with exit 0
        name, nan, inf = bad[0]
        raise ReplaceMeError(f"the pruned model holds non-finite values in {name} ({nan} NaN, {inf} inf) and "
                             f"{len(bad) - 1} more tensors; nothing was saved. The dense model loaded finite, so "
                             f"the folded transforms of cuts {result.cuts} ({cfg.solver}) are the likely cause: "
                             "try accum_dtype=float64, dtype=float32 or a ridge alpha")

    unhealed, healed, anchors = None, None, None
    if cfg.heal.anchor_steps:
        from replaceme_jax.replaceme.anchor_tuning import tune_or_restore
        from replaceme_jax.eval.nll import mean_nll
        with timer("heal", f"anchor tuning ({cfg.heal.anchor_steps} steps; state in {heal_directory(cfg)})"):
            tuned_model, anchors = tune_or_restore(model, result.model, batches, result.cuts, cfg,
                                                   directory=heal_directory(cfg))
            if validation is None:
                validation = calibration_batches(tokenizer, cfg, part="validation",
                                                 num_samples=cfg.calibration.validation_samples)
            # Kept only if it generalises: with little calibration text and a high lr the block overfits.
            anchor_nll = {"before": mean_nll(result.model, validation), "after": mean_nll(tuned_model, validation)}
        if anchor_nll["after"] < anchor_nll["before"]:
            unhealed = result.model
            result = dataclasses.replace(result, model=tuned_model)
        else:
            print(f"[replaceme] warning: anchor tuning raised the validation NLL ({anchor_nll['before']:.4f} -> "
                  f"{anchor_nll['after']:.4f}); the untuned anchors are kept. Give more calibration text "
                  "(calibration.num_samples) or a lower heal.anchor_lr", file=sys.stderr, flush=True)
    if cfg.heal.steps:
        from replaceme_jax.replaceme.heal import heal
        with timer("calibration_data", f"healing text ({cfg.heal.num_samples} passages of "
                                       f"{cfg.heal.source or cfg.calibration.source})"):
            heal_batches = healing_batches(tokenizer, cfg)
        with timer("heal", f"healing ({cfg.heal.steps} steps; state in {heal_directory(cfg)})"):
            healed = heal(result.model, model, heal_batches, cfg, cuts=result.cuts, directory=heal_directory(cfg),
                          progress=cfg.progress)
        unhealed = result.model if unhealed is None else unhealed
        result = dataclasses.replace(result, model=healed.model)
    if unhealed is not None and (bad := non_finite_parameters(result.model)):
        raise ReplaceMeError(f"healing left non-finite values in {bad[0][0]}; nothing was saved. Lower heal.lr "
                             "(LoRA) or heal.anchor_lr (anchor tuning)")

    evaluation = {}
    if cfg.eval.perplexity_windows:
        with timer("evaluate", "held-out perplexity (dense, pruned" + (", drop)" if cfg.eval.compare_drop else ")")):
            evaluation = rep.heldout_perplexities(model, result, tokenizer, cfg, unhealed=unhealed)
    report = rep.build_report(cfg, model, result, batches, evaluation, timer.times)
    if cfg.heal.anchor_steps:
        report["anchor_tuning"] = {"steps": cfg.heal.anchor_steps, "lr": cfg.heal.anchor_lr, "loss": cfg.heal.anchor_loss,
                                   "restored": anchors is None, "kept": anchor_nll["after"] < anchor_nll["before"],
                                   "validation_nll": anchor_nll,
                                   "seconds": round(anchors.seconds, 1) if anchors is not None else None,
                                   "final_loss": ({f"{s}-{e}": v[-1] for (s, e), v in anchors.losses.items()}
                                                  if anchors is not None else None)}
    if healed is not None:
        report["heal"] = {"steps": healed.steps, "tokens": healed.tokens, "resumed_from": healed.resumed_from,
                          "blocks": healed.blocks, "modules": healed.modules, "seconds": round(healed.seconds, 1),
                          "final_kl": healed.losses[-1][1] if healed.losses else None,
                          "losses": [[s, v] for s, v in healed.losses]}
    report["memory"] = run_memory_report(cfg, model.config, batches)
    with timer("save", f"saving to {cfg.output_dir}"):
        save_run(cfg, result, tokenizer, report)
    report["times_s"] = {k: round(v, 2) for k, v in timer.times.items()}
    if cfg.evaluate:
        from replaceme_jax.eval.harness import evaluate_models  # lm-eval tasks, optional
        with timer("tasks", f"lm-eval tasks {cfg.evaluate}"):
            report["tasks"] = evaluate_models(
                [("dense", model, tokenizer), ("pruned", result.model, tokenizer)],
                tasks=cfg.evaluate, limit=cfg.eval.limit or None, heldout_ppl=False,
                output_dir=f"{cfg.output_dir}/eval", overwrite=cfg.overwrite)
    write_report_json(cfg.output_dir, report)
    return result, report
