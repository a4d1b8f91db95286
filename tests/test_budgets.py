"""A budget of blocks split over several cuts: the exact k-best search against brute force, the
proxy against sums computed by hand, and the validation confirmation against independent NLLs."""
import itertools

import numpy as np
import pytest

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.eval.nll import mean_nll
from replaceme_jax.replaceme import solvers
from replaceme_jax.replaceme.budgets import best_combinations, budget_cuts, cut_costs
from replaceme_jax.replaceme.pipeline import prune
from replaceme_jax.replaceme.statistics import gather_statistics, statistics_request
from replaceme_jax.replaceme.surgery import apply_cuts
from replaceme_jax.settings import Settings
from tiny_models import tiny_model_and_batches

L, D, V = 7, 16, 50


def brute_force(costs, depth, blocks, max_cuts, min_blocks):
    """Every admissible combination, listed the slow way."""
    out = []
    for k in range(1, max_cuts + 1):
        for combo in itertools.combinations(sorted(costs), k):
            lengths = [e - s for s, e in combo]
            if sum(lengths) != blocks or (k > 1 and min(lengths) < min_blocks):
                continue
            if any(b[0] < a[1] + 1 for a, b in zip(combo, combo[1:])):  # overlapping, or no anchor between
                continue
            if combo[0][0] < 1 or combo[-1][1] > depth:
                continue
            out.append((sum(costs[c] for c in combo), combo))
    return sorted(out)


@pytest.mark.parametrize("depth,blocks", [(12, 5), (9, 6), (16, 8)])
def test_k_best_search_equals_brute_force(depth, blocks):
    rng = np.random.default_rng(depth)
    for max_cuts, min_blocks in itertools.product((1, 2, 3), (1, 2)):
        cuts = budget_cuts(depth, blocks, max_cuts, min_blocks)
        costs = {c: float(rng.random()) for c in cuts}
        want = brute_force(costs, depth, blocks, max_cuts, min_blocks)
        got = best_combinations(costs, depth, blocks, max_cuts, min_blocks, top=12)
        assert [c for _, c in got] == [c for _, c in want[:12]], (max_cuts, min_blocks)
        np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want[:12]], rtol=1e-12)
        assert all(sum(e - s for s, e in c) == blocks for _, c in got)


@pytest.fixture(scope="module")
def tiny():
    model, batches = tiny_model_and_batches(L, hidden=D, vocab=V, sequences=24, min_len=8, seed=1)
    return model, batches[:4], batches[4:]


def test_budget_prune_confirms_the_best_combination_on_validation(tiny):
    model, train, validation = tiny
    settings = Settings().replace(**{"budget.blocks": 3, "budget.max_cuts": 2, "budget.confirm": 3,
                                     "progress": False})
    request = statistics_request(settings, L)
    assert set(request.cuts) == set(budget_cuts(L, 3, 2, 1))
    stats = gather_statistics(model, train, request)
    result = prune(model, train, settings, validation=validation)

    # The proxy by hand: lstsq error energy per token over the stream energy after the cut.
    by_hand = {}
    for cut in request.cuts:
        ne = stats.normal_equations(cut)
        T = np.linalg.solve(ne.mtm, ne.mtr)
        err = ne.rtr - 2 * np.sum(T * ne.mtr) + np.sum(T * (ne.mtm @ T))
        by_hand[cut] = err / stats.stream_sq[cut[1]]
    np.testing.assert_allclose([by_hand[c] for c in request.cuts],
                               [cut_costs(stats, request.cuts, "stream")[c] for c in request.cuts], rtol=1e-5)

    candidates = result.budget
    top = [c for _, c in brute_force(by_hand, L, 3, 2, 1)[:3]]
    assert [c.cuts for c in candidates[:3]] == top
    single = min((c for c in request.cuts if c[1] - c[0] == 3), key=by_hand.get)
    assert (single,) in [c.cuts for c in candidates]  # the best single cut is always confirmed
    assert any(len(c.cuts) == 2 for c in candidates)
    for cand in candidates:
        np.testing.assert_allclose(cand.proxy, sum(by_hand[c] for c in cand.cuts), rtol=1e-5)
        Ts = [solvers.lstsq(stats.normal_equations(c)).T for c in cand.cuts]
        np.testing.assert_allclose(cand.validation_nll, mean_nll(apply_cuts(model, list(cand.cuts), Ts), validation),
                                   rtol=1e-5)
    best = min(candidates, key=lambda c: c.validation_nll)
    assert tuple(result.cuts) == best.cuts
    assert result.model.config.num_hidden_layers == L - 3
    assert sum(e - s for s, e in result.cuts) == 3


def test_one_cut_budget_is_the_residual_rule(tiny):
    model, train, _ = tiny
    budget = Settings().replace(**{"budget.blocks": 3, "budget.max_cuts": 1, "budget.confirm": 0,
                                   "budget.proxy": "relative", "progress": False, "refit.anchor": False})
    plain = Settings().replace(num_blocks=3, progress=False, **{"refit.anchor": False})
    assert prune(model, train, budget).cuts == prune(model, train, plain).cuts


def test_budget_settings_errors(tiny):
    model, train, _ = tiny
    with pytest.raises(ReplaceMeError, match="budget.confirm scores the top combinations on validation"):
        prune(model, train, Settings().replace(**{"budget.blocks": 3, "progress": False}))
    bad = [({"budget.blocks": 3, "cuts": "2-4"}, "both choose the cuts"),
           ({"budget.blocks": 3, "num_transforms": 2}, "set budget.max_cuts instead"),
           ({"budget.blocks": 3, "selection": "search"}, "selection=residual"),
           ({"budget.blocks": 3, "candidates": "selected"}, "candidates=all"),
           ({"budget.blocks": 3, "budget.proxy": "x"}, "budget.proxy"),
           ({"budget.blocks": 2, "budget.min_cut_blocks": 3}, "exceeds budget.blocks"),
           ({"budget.blocks": -1}, "budget.blocks")]
    for changes, message in bad:
        with pytest.raises(ReplaceMeError, match=message):
            Settings().replace(**changes)
    with pytest.raises(ReplaceMeError, match="budget.blocks=7 but the model has 7 blocks"):
        prune(model, train, Settings().replace(**{"budget.blocks": 7, "budget.confirm": 0, "progress": False}))
