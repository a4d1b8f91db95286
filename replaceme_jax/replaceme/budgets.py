"""A budget of blocks split over several cuts, chosen from the one statistics pass.

Instead of one cut of n blocks, remove n blocks as up to k disjoint cuts (e.g. 5 + 3 or 4 + 4 for
n = 8), each with its own transform. Every combination is scored by a proxy computed from the
gathered sums alone, the sum of one cost per cut:

- ``stream`` (default): the cut's least-squares error energy ‖M T − (L − Y)‖² divided by the residual
  stream's energy ‖h_e‖² where the error enters (a noise-to-signal ratio). The final RMSNorm
  divides the stream by its norm, so an error of a given size matters less where the stream is
  large; ratios of independent errors add.
- ``relative``: the residual rule's score ‖M T − (L − Y)‖² / ‖L − Y‖², summed.
- with ``selection="angular"``, the cuts' angular distances, summed.

A k-best dynamic programme over (block, blocks left, cuts left) finds the best combinations
exactly without listing them all. The top ``budget.confirm`` of them, and the best single cut, are
then confirmed by the validation NLL of the pruned model (the ``search`` rule's split of the
calibration source, never the held-out corpus), transforms folded from the same sums.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme.cuts import Cut, candidate_cuts
from replaceme_jax.replaceme.statistics import Statistics

PROXIES = ("stream", "relative")
Combo = tuple[Cut, ...]


def cut_lengths(blocks: int, max_cuts: int, min_blocks: int) -> tuple[int, ...]:
    """Lengths a cut of a combination can have: the whole budget, or a part that leaves room for
    at least one more cut of ``min_blocks``."""
    lengths = {blocks}
    if max_cuts >= 2:
        lengths.update(range(min_blocks, blocks - min_blocks + 1))
    return tuple(sorted(lengths))


def budget_cuts(depth: int, blocks: int, max_cuts: int, min_blocks: int) -> tuple[Cut, ...]:
    """Every cut any combination can use: the normal equations the statistics pass must gather."""
    return tuple(c for n in cut_lengths(blocks, max_cuts, min_blocks) if n < depth
                 for c in candidate_cuts(depth, n))


def best_combinations(costs: dict[Cut, float], depth: int, blocks: int, max_cuts: int, min_blocks: int,
                      top: int) -> list[tuple[float, Combo]]:
    """The ``top`` combinations of at most ``max_cuts`` disjoint cuts (each of >= ``min_blocks``
    blocks, an anchor block kept before each) whose lengths add up to ``blocks``, by the sum of
    their ``costs``; ascending, ties by the cuts. Exact: a k-best dynamic programme."""
    lengths = cut_lengths(blocks, max_cuts, min_blocks)

    @functools.lru_cache(maxsize=None)
    def best(pos: int, left: int, cuts_left: int) -> tuple[tuple[float, Combo], ...]:
        # Best completions using cuts that start at block >= pos.
        if left == 0:
            return ((0.0, ()),)
        if cuts_left == 0 or pos + left > depth:
            return ()
        options = list(best(pos + 1, left, cuts_left))  # block pos is kept
        for n in lengths:
            cut = (pos, pos + n)
            if n > left or cut not in costs:
                continue
            # The next cut starts after at least one kept block (its anchor).
            options += [(costs[cut] + score, (cut,) + rest) for score, rest in best(pos + n + 1, left - n,
                                                                                     cuts_left - 1)]
        return tuple(heapq.nsmallest(top, options))

    return list(best(1, blocks, max_cuts))


def cut_costs(stats: Statistics, cuts, proxy: str, *, selection: str = "residual", alpha: float = 0.0
              ) -> dict[Cut, float]:
    """{cut: its share of a combination's score}; lower is better."""
    from replaceme_jax.replaceme import selection as sel
    if selection == "angular":
        dist = stats.distances
        n_max = max(e - s for s, e in cuts)
        if dist is None or dist.shape[0] < n_max:
            raise ReplaceMeError(f"angular budget selection needs distances over {n_max} blocks")
        return {(s, e): float(dist[e - s - 1, s]) for s, e in cuts}
    if selection != "residual":
        raise ReplaceMeError(f"budget.blocks combines cheap per-cut scores; selection={selection!r} is not one "
                             "(use residual or angular: the top combinations are confirmed on validation text)")
    if proxy not in PROXIES:
        raise ReplaceMeError(f"budget.proxy={proxy!r}: use one of {PROXIES}")
    by_length: dict[int, list[Cut]] = {}
    for s, e in cuts:
        by_length.setdefault(e - s, []).append((s, e))
    costs = {}
    for n, group in by_length.items():
        relative = sel.residual_scores(stats, n, alpha=alpha, cuts=group)
        for cut, r in relative.items():
            if proxy == "relative":
                costs[cut] = r
            else:
                ne = stats.normal_equations(cut)
                costs[cut] = r * ne.rtr / ne.count / stats.stream_energy(cut[1])
    return costs


@dataclasses.dataclass(frozen=True)
class Candidate:
    cuts: Combo
    proxy: float
    validation_nll: float | None = None

    def to_dict(self) -> dict:
        return {"cuts": [f"{s}-{e}" for s, e in self.cuts], "proxy": self.proxy,
                "validation_nll": self.validation_nll}


def choose_budget(stats: Statistics, cfg, *, model=None, validation=None, solver: str = "lstsq"
                  ) -> tuple[list[Cut], list[Candidate]]:
    """The cuts that spend ``cfg.budget.blocks`` best, and the candidates considered (proxy order;
    with ``budget.confirm`` > 0 each confirmed one carries its validation NLL)."""
    from replaceme_jax.eval.nll import mean_nll
    from replaceme_jax.replaceme.search import transform_solver
    from replaceme_jax.replaceme.surgery import apply_cuts
    b, depth = cfg.budget, stats.num_blocks
    cuts = budget_cuts(depth, b.blocks, b.max_cuts, b.min_cut_blocks)
    missing = [c for c in cuts if c not in stats.request.cuts]
    if missing:
        raise ReplaceMeError(f"budget selection needs normal equations for {len(missing)} more cuts (e.g. "
                             f"{missing[0]}); gather them with candidates='all'")
    costs = cut_costs(stats, cuts, b.proxy, selection=cfg.selection, alpha=cfg.alpha)
    ranked = best_combinations(costs, depth, b.blocks, b.max_cuts, b.min_cut_blocks, max(b.confirm, 1))
    single = best_combinations(costs, depth, b.blocks, 1, b.min_cut_blocks, 1)
    for entry in single:  # the best single cut is always a candidate, so splitting must earn its place
        if entry not in ranked:
            ranked.append(entry)
    if not ranked:
        raise ReplaceMeError(f"no combination of at most {b.max_cuts} cuts removes {b.blocks} of {depth} blocks; "
                             "lower budget.blocks or budget.min_cut_blocks")
    candidates = [Candidate(cuts=combo, proxy=score) for score, combo in ranked]
    if b.confirm == 0 or len(candidates) == 1:
        return list(candidates[0].cuts), candidates
    if model is None or validation is None:
        raise ReplaceMeError("budget.confirm scores the top combinations on validation batches; pass model= "
                             "and validation= (pipeline.run builds them), or set budget.confirm=0")
    validation = list(validation)
    if not validation:
        raise ReplaceMeError("budget confirmation got no validation batches; use a larger validation split")
    solve = transform_solver(solver)
    scored = []
    for cand in candidates:
        transforms = [None if solve is None else solve(stats.normal_equations(c), alpha=cfg.alpha).T
                      for c in cand.cuts]
        nll = mean_nll(apply_cuts(model, list(cand.cuts), transforms), validation)
        scored.append(dataclasses.replace(cand, validation_nll=nll))
    best = min(scored, key=lambda c: (c.validation_nll, c.proxy))
    return list(best.cuts), scored
