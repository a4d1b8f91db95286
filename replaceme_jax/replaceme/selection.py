"""Which blocks to cut: rules that score candidate cuts, and greedy non-overlapping choice.

- ``angular`` (the paper's and official code's rule): mean angular distance arccos(cos)/π between a
  cut's input h_s and output h_e on each sequence's last real token; smaller is better.
- ``residual``: relative residual ‖M T − (L − Y)‖² / ‖L − Y‖² of the cut's own least-squares
  transform, computed from the gathered sums alone; smaller is better.
Both come from the same single statistics pass. A rule is a function (stats, n, alpha) -> {cut: score}.
- ``search`` (``replaceme.search``): the validation NLL of the model pruned at every cut (the yardstick).
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme.cuts import Cut, candidate_cuts
from replaceme_jax.replaceme.search import search_scores
from replaceme_jax.replaceme.statistics import Statistics

logger = logging.getLogger(__name__)


def angular_scores(stats: Statistics, n: int, alpha: float = 0.0) -> dict[Cut, float]:
    if stats.distances is None or stats.distances.shape[0] < n:
        raise ReplaceMeError(f"angular selection needs distances over {n} blocks; gather them with "
                             f"max_distance_blocks >= {n}")
    return {cut: float(stats.distances[n - 1, cut[0]]) for cut in candidate_cuts(stats.num_blocks, n)}


def residual_scores(stats: Statistics, n: int, alpha: float = 0.0, *, cuts=None) -> dict[Cut, float]:
    """``cuts``: the cuts of n blocks to score (default: every candidate)."""
    from replaceme_jax.replaceme.solvers import lstsq
    cuts = candidate_cuts(stats.num_blocks, n) if cuts is None else tuple(cuts)
    missing = [c for c in cuts if c not in stats.request.cuts]
    if missing:
        raise ReplaceMeError(f"residual selection needs normal equations for every candidate cut of {n} "
                             f"blocks; {len(missing)} missing (e.g. {missing[0]}). Gather them in the pass.")
    scores, rank_deficient = {}, []
    solver_log = logging.getLogger("replaceme_jax.replaceme.solvers")
    level = solver_log.level
    solver_log.setLevel(logging.ERROR)  # one summary below instead of a warning per candidate
    try:
        for cut in cuts:
            ne = stats.normal_equations(cut)
            result = lstsq(ne, alpha=alpha)
            scores[cut] = float(result.final_loss)  # lstsq reports the relative residual of its T
            if result.info["method"] != "cholesky":
                rank_deficient.append(cut)
    finally:
        solver_log.setLevel(level)
    if rank_deficient:
        d = stats.normal_equations(cuts[0]).d
        logger.warning(
            "residual selection: MᵀM is singular for %d of %d candidate cuts (%d calibration tokens, "
            "hidden size %d); with too few tokens every cut's transform fits the calibration set "
            "nearly perfectly and the residual no longer ranks cuts. Use many more calibration tokens "
            "than the hidden size, a ridge alpha, or selection='angular'.",
            len(rank_deficient), len(cuts), stats.num_tokens, d)
    return scores


# Every selection rule, by the name ``settings.selection`` uses. A rule is (stats, n, alpha) -> {cut: score},
# lower is better; those in MODEL_RULES also take model= and validation= (batches of the calibration
# source's validation split), which the pipeline passes.
SELECTION_RULES: dict[str, Callable[..., dict[Cut, float]]] = {
    "angular": angular_scores,
    "residual": residual_scores,
    "search": search_scores,
}
MODEL_RULES = frozenset({"search"})


def get_rule(name: str):
    if name not in SELECTION_RULES:
        raise ReplaceMeError(f"unknown selection rule {name!r}; known: {sorted(SELECTION_RULES)}")
    return SELECTION_RULES[name]


def choose_cuts(scores: dict[Cut, float], num_transforms: int = 1, merge_consecutive: bool = True
                ) -> list[Cut]:
    """Greedy: best-scoring cuts that keep every anchor block alive (the official ``num_A``).

    Two cuts must be separated by at least one kept block (the later cut's anchor), except that with
    ``merge_consecutive`` touching cuts are accepted and merged into one longer cut.
    """
    if num_transforms < 1:
        raise ReplaceMeError(f"num_transforms must be >= 1, got {num_transforms}")
    chosen: list[Cut] = []
    for cut in sorted(scores, key=lambda c: (scores[c], c)):
        if not np.isfinite(scores[cut]):
            continue
        s, e = cut
        ok = all(e < s2 or e2 < s or (merge_consecutive and (e == s2 or e2 == s)) for s2, e2 in chosen)
        if ok:
            chosen.append(cut)
        if len(chosen) == num_transforms:
            break
    if len(chosen) < num_transforms:
        raise ReplaceMeError(f"only {len(chosen)} non-overlapping cuts fit for num_transforms={num_transforms}; "
                             "use fewer transforms or fewer blocks per cut")
    return merge_touching(sorted(chosen)) if merge_consecutive else sorted(chosen)


def merge_touching(cuts: list[Cut]) -> list[Cut]:
    out: list[Cut] = []
    for s, e in sorted(cuts):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out
