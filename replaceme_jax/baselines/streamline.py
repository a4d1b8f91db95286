"""LLM-Streamline (Chen et al., 2024) as a baseline: the removed blocks' work learned by one block.

For a cut [s, e) the blocks s..e-1 are removed, as in ReplaceMe and plain dropping, and the anchor
block a = s-1 becomes the paper's "lightweight network": a transformer layer that replaces blocks
a..e-1, so from the anchor's input h_{a-1} it should produce the last removed block's output
h_{e-1}. It starts from the anchor's own (dense) weights and is trained with Optax AdamW on the mean
squared error to the dense model's h_{e-1} over the calibration tokens: ``anchor_tuning`` started
from the plainly dropped model. The pruned model has the same blocks and parameter count as
ReplaceMe's on that cut and differs only in the anchor's weights. (The paper adds a separate layer
in place of the removed ones; retraining the anchor keeps the pruned shape, and its checkpoint, a
plain model of the family.)
"""
from __future__ import annotations

import dataclasses

from replaceme_jax.replaceme.anchor_tuning import tune_anchors
from replaceme_jax.replaceme.cuts import Cut, validate_cuts
from replaceme_jax.replaceme.surgery import drop_blocks


@dataclasses.dataclass
class StreamlineResult:
    model: object              # the pruned model, anchor retrained
    cut: Cut
    losses: list[float]        # each step's batch loss, before its update
    seconds: float


def streamline(model, batches, cut: Cut, *, steps: int = 200, lr: float = 1e-2, warmup: int = 10,
               seed: int = 0, loss: str = "mse") -> StreamlineResult:
    """Remove ``cut`` from ``model`` and train the anchor block to stand in for the removed run.
    ``lr`` 1e-2: the best of 1e-4 .. 1e-2 on SmolLM2's [12, 20) (docs/results.md, healing section)."""
    (s, e), = validate_cuts([cut], model.config.num_hidden_layers)
    tuned = tune_anchors(model, drop_blocks(model, range(s, e)), batches, [(s, e)], steps=steps, lr=lr,
                         warmup=warmup, seed=seed, loss=loss)
    return StreamlineResult(model=tuned.model, cut=(s, e), losses=tuned.losses[(s, e)], seconds=tuned.seconds)
