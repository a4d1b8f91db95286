"""The ``search`` selection rule: try every cut, keep the one with the lowest validation loss.

For each candidate cut of n blocks the rule solves the cut's transform from the gathered normal
equations (or uses none, for plain dropping), folds it in, and scores the pruned model's mean
next-token NLL on a validation split of the calibration source (never the held-out corpus). It is
the yardstick the cheap rules (``angular``, ``residual``) are measured against.

Cost: L - n pruned-model forward passes over the validation batches (SmolLM2, n = 8: 22 passes of
a 22-block model, about 16x a dense pass), plus the closed-form solves (one d x d solve each),
against zero extra passes for ``angular`` and ``residual``. The statistics pass must hold the
normal equations of every candidate cut (``candidates="all"``), as ``residual`` needs too.
"""
from __future__ import annotations

from typing import Callable

from replaceme_jax.eval.nll import mean_nll
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme import solvers
from replaceme_jax.replaceme.cuts import Cut, candidate_cuts
from replaceme_jax.replaceme.statistics import Statistics
from replaceme_jax.replaceme.surgery import apply_cuts
from replaceme_jax.settings import CLOSED_FORM_SOLVERS

CLOSED_FORM = CLOSED_FORM_SOLVERS


def transform_solver(name: str) -> Callable | None:
    """Closed-form solver (ne, alpha) -> SolveResult for ``name``; None for "none" (plain drop)."""
    if name == "none":
        return None
    if name not in CLOSED_FORM:
        raise ReplaceMeError(f"the search rule solves each candidate in closed form; solver {name!r} is not "
                             f"one of {CLOSED_FORM} or 'none' (for cosine, search with its lstsq init)")
    return solvers.get_solver(name)


def search_scores(stats: Statistics, n: int, alpha: float = 0.0, *, model=None, validation=None,
                  solver: str = "lstsq", progress: bool = False) -> dict[Cut, float]:
    """{cut: validation NLL of the model pruned at that cut} for every cut of ``n`` blocks."""
    if model is None or validation is None:
        raise ReplaceMeError(
            "the 'search' selection rule prunes and scores the model at every cut, so it needs model= and "
            "validation= (batches of the calibration source's validation part); run it through "
            "prune.py (selection='search') or call replaceme_jax.replaceme.search.search_scores directly")
    validation = list(validation)
    if not validation:
        raise ReplaceMeError("the search rule got no validation batches; use a larger validation split")
    solve = transform_solver(solver)
    cuts = candidate_cuts(stats.num_blocks, n)
    if solve is not None:
        missing = [c for c in cuts if c not in stats.request.cuts]
        if missing:
            raise ReplaceMeError(f"search needs normal equations for every cut of {n} blocks; {len(missing)} "
                                 f"missing (e.g. {missing[0]}). Gather them with candidates='all'.")
    iterator = cuts
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(cuts, desc=f"search over cuts of {n} blocks", unit="cut")
    scores = {}
    for cut in iterator:
        T = None if solve is None else solve(stats.normal_equations(cut), alpha=alpha).T
        scores[cut] = mean_nll(apply_cuts(model, [cut], [T]), validation)
    return scores
