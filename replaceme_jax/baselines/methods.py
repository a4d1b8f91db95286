"""ReplaceMe and its baselines behind one call, sharing data, statistics and selection code.

- ``replaceme``: cuts chosen by a selection rule (angular, residual, search), one transform per cut
  from a solver (lstsq, diag, orth_diag, or the token solvers cosine / cosine_accurate / mse).
- ``drop`` (UIDL without healing): the same cuts, removed with no transform.
- ``shortgpt``: the n blocks of lowest Block Influence, anywhere in the model.
- ``sleb``: greedy removal by calibration perplexity.

Everything takes an already gathered ``Statistics`` (see ``experiments.statistics_cache``), so a sweep runs the
statistics pass once per calibration setting instead of once per row.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from replaceme_jax.replaceme.search import CLOSED_FORM, search_scores
from replaceme_jax.baselines.shortgpt import block_influence, shortgpt_blocks
from replaceme_jax.baselines.sleb import SlebResult, sleb_order
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.modeling import CausalLM
from replaceme_jax.replaceme import selection as sel
from replaceme_jax.replaceme.cuts import Cut
from replaceme_jax.replaceme.statistics import Statistics
from replaceme_jax.replaceme.surgery import apply_cuts, drop_blocks
from replaceme_jax.settings import SOLVERS as SOLVER_NAMES
from replaceme_jax.settings import Settings

METHODS = ("replaceme", "drop", "shortgpt", "sleb")


@dataclasses.dataclass
class MethodResult:
    model: CausalLM                        # the pruned model
    method: str
    removed: list[int]                     # original block indices, ascending
    cuts: list[Cut]                        # contiguous runs of removed blocks
    transforms: list[np.ndarray | None]    # one per cut (None: plain drop)
    info: dict[str, Any]                   # residuals, selection scores, seconds, ...


def contiguous_runs(blocks) -> list[Cut]:
    """Ascending block indices -> [start, end) runs, e.g. [3, 4, 9] -> [(3, 5), (9, 10)]."""
    runs: list[Cut] = []
    for b in sorted(blocks):
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


def select_cuts(stats: Statistics, n: int, *, rule: str = "angular", alpha: float = 0.0,
                num_transforms: int = 1, merge_consecutive: bool = True, model=None, validation=None,
                search_solver: str = "lstsq", scores: dict[Cut, float] | None = None
                ) -> tuple[list[Cut], dict[Cut, float]]:
    """Cuts of ``n`` blocks chosen by ``rule`` from the gathered statistics, and the rule's scores
    (``scores`` given: the rule's scores computed earlier, e.g. a cached search)."""
    if scores is None and rule == "search":
        scores = search_scores(stats, n, alpha, model=model, validation=validation, solver=search_solver)
    elif scores is None:
        scores = sel.get_rule(rule)(stats, n, alpha=alpha)
    return sel.choose_cuts(scores, num_transforms, merge_consecutive), scores


def replaceme(model, batches, stats: Statistics, n: int, *, solver: str = "lstsq", alpha: float = 0.0,
              rule: str = "angular", num_transforms: int = 1, merge_consecutive: bool = True,
              validation=None, scores: dict[Cut, float] | None = None, cfg=None) -> MethodResult:
    """ReplaceMe with any solver: cuts from ``rule`` (or the cached ``scores``), then ``pipeline.prune``
    on them. ``cfg``: the run's settings for everything else (the token solvers' optimiser, the
    multi-cut mode); None: the defaults, with the pass's pad and accumulation settings and the paper's
    T alone (no anchor kernel re-fit). A ``cfg`` with ``refit.anchor`` needs ``validation``."""
    from replaceme_jax.replaceme.pipeline import prune
    if solver not in SOLVER_NAMES:
        raise ReplaceMeError(f"unknown solver {solver!r}; choose one of {SOLVER_NAMES}")
    t0 = time.perf_counter()
    search_solver = solver if solver in CLOSED_FORM else "lstsq"  # cosine starts from lstsq
    cuts, scores = select_cuts(stats, n, rule=rule, alpha=alpha, num_transforms=num_transforms,
                               merge_consecutive=merge_consecutive, model=model, validation=validation,
                               search_solver=search_solver, scores=scores)
    if cfg is None:
        settings = Settings.from_config({}).replace(**{"calibration.include_pad": stats.request.include_pad,
                                                        "accum_dtype": stats.request.accum_dtype,
                                                        "refit.anchor": False, "progress": False})
    else:
        settings = Settings.from_config(cfg)
    settings = settings.replace(solver=solver, alpha=alpha, num_blocks=n, num_transforms=num_transforms,
                                selection=rule, merge_consecutive=merge_consecutive, candidates="selected",
                                cuts="")
    result = prune(model, batches, settings, stats=stats, cuts=cuts, validation=validation)
    removed = sorted(i for s, e in cuts for i in range(s, e))
    return MethodResult(result.model, "replaceme", removed, list(cuts), result.transforms,
                        {"residuals": result.residuals, "scores": _scores_json(scores), "rule": rule,
                         "solver": solver, "seconds": time.perf_counter() - t0})


def drop(model, stats: Statistics, n: int, *, rule: str = "angular", num_transforms: int = 1,
         merge_consecutive: bool = True, validation=None, scores: dict[Cut, float] | None = None
         ) -> MethodResult:
    """UIDL without healing: the selection rule's cuts, removed with no transform."""
    t0 = time.perf_counter()
    cuts, scores = select_cuts(stats, n, rule=rule, num_transforms=num_transforms,
                               merge_consecutive=merge_consecutive, model=model, validation=validation,
                               search_solver="none", scores=scores)
    removed = sorted(i for s, e in cuts for i in range(s, e))
    return MethodResult(apply_cuts(model, cuts), "drop", removed, list(cuts), [None] * len(cuts),
                        {"scores": _scores_json(scores), "rule": rule, "seconds": time.perf_counter() - t0})


def shortgpt(model, n: int, *, influence: np.ndarray | None = None, batches=None) -> MethodResult:
    """ShortGPT from a precomputed Block Influence vector, or computed here from ``batches``."""
    t0 = time.perf_counter()
    if influence is None:
        if batches is None:
            raise ReplaceMeError("shortgpt needs calibration batches (or a precomputed influence=)")
        influence = block_influence(model, batches)
    removed = shortgpt_blocks(influence, n)
    cuts = contiguous_runs(removed)
    return MethodResult(drop_blocks(model, removed), "shortgpt", removed, cuts, [None] * len(cuts),
                        {"block_influence": [float(x) for x in influence],
                         "seconds": time.perf_counter() - t0})


def sleb(model, n: int, *, batches=None, order: SlebResult | None = None, max_candidates: int | None = None,
         prefilter=None, progress: bool = False) -> MethodResult:
    """SLEB for ``n`` blocks, reusing (and extending if needed) a cached greedy ``order``."""
    t0 = time.perf_counter()
    if order is None or len(order.order) < n:
        if batches is None:
            raise ReplaceMeError("sleb needs calibration batches to extend its greedy removal order")
        order = sleb_order(model, batches, n, max_candidates=max_candidates, prefilter=prefilter,
                           start=order, progress=progress)
    removed = order.blocks(n)
    cuts = contiguous_runs(removed)
    return MethodResult(drop_blocks(model, removed), "sleb", removed, cuts, [None] * len(cuts),
                        {"order": list(order.order), "losses": list(order.losses),
                         "seconds": time.perf_counter() - t0})


def _scores_json(scores: dict[Cut, float]) -> dict[str, float]:
    return {f"{s}-{e}": float(v) for (s, e), v in scores.items()}
