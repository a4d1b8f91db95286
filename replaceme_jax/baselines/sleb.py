"""SLEB (Song et al., 2024): greedy block removal by calibration perplexity.

Each step tries removing every remaining block (on top of those already removed), scores each
candidate model by its mean next-token NLL on a few calibration sequences, and removes the block
whose loss is lowest. The removal order is greedy, so the first k blocks of an n-block run are the
k-block answer: one run serves every smaller n, and a cached run can be extended.

Cost: removing n of L blocks scores sum_{k<n} min(L - k, max_candidates) pruned models, each a
forward pass over ``num_sequences`` calibration sequences (n = 8 on SmolLM2's 30 blocks: 212
passes with every candidate). Bound it with fewer sequences or ``max_candidates``, which keeps
only the candidates ranked best by ``prefilter`` (e.g. ShortGPT's Block Influence) at each step.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from replaceme_jax.eval.nll import mean_nll
from replaceme_jax.replaceme.surgery import drop_blocks
from replaceme_jax.errors import ReplaceMeError


@dataclasses.dataclass(frozen=True)
class SlebResult:
    order: tuple[int, ...]      # original block indices in removal order
    losses: tuple[float, ...]   # calibration NLL after each removal
    evaluations: int            # candidate models scored by this call

    def blocks(self, n: int) -> list[int]:
        """The blocks SLEB removes for a budget of ``n`` (ascending)."""
        if n > len(self.order):
            raise ReplaceMeError(f"this SLEB run removed {len(self.order)} blocks; rerun it for n={n}")
        return sorted(self.order[:n])


def sleb_order(model, batches, n: int, *, max_candidates: int | None = None,
               prefilter: Sequence[float] | None = None, start: SlebResult | None = None,
               progress: bool = False) -> SlebResult:
    """Greedy SLEB removal of ``n`` blocks of ``model`` scored on ``batches``.

    ``start`` continues an earlier run (its steps are kept, not recomputed; a longer run is
    returned whole, since its prefix is the answer for ``n``).
    """
    num_blocks = model.config.num_hidden_layers
    if not 1 <= n < num_blocks:
        raise ReplaceMeError(f"cannot remove {n} of {num_blocks} blocks: choose 1 <= n < {num_blocks}")
    if max_candidates is not None:
        if max_candidates < 1:
            raise ReplaceMeError(f"max_candidates must be positive (or None for all), got {max_candidates}")
        if prefilter is None or len(prefilter) != num_blocks:
            raise ReplaceMeError("max_candidates needs a prefilter score per block (lower is tried first), "
                                 "e.g. ShortGPT's block_influence")
    batches = list(batches)
    order = list(start.order) if start is not None else []
    losses = list(start.losses) if start is not None else []
    evaluations = 0
    steps = range(len(order), n)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="SLEB removal", unit="block")
    for _ in steps:
        remaining = [i for i in range(num_blocks) if i not in order]
        if max_candidates is not None:
            remaining = sorted(remaining, key=lambda i: (prefilter[i], i))[:max_candidates]
        scored = [(mean_nll(drop_blocks(model, order + [i]), batches), i) for i in remaining]
        evaluations += len(scored)
        loss, best = min(scored)
        order.append(best)
        losses.append(float(loss))
    return SlebResult(order=tuple(order), losses=tuple(losses), evaluations=evaluations)

