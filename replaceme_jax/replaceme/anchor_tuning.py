"""Anchor tuning: retrain the block before each cut to stand in for the removed run (``heal.anchor_steps``).

For a cut [s, e) the anchor a = s - 1 reads the dense stream h_{a-1} and, in the dense model, the run
a..e-1 turns it into h_{e-1}. ReplaceMe fits a linear map on the anchor's MLP output in closed form;
this stage goes one step further and trains all of the anchor's parameters (attention, MLP, norms)
with Optax AdamW so that, from h_{a-1}, the block itself produces the dense h_{e-1}. Only that one
block runs forward and backward (its input and target come from one dense pass), so it costs a small
fraction of distillation through the whole model. It starts from the pruned model's anchor: after
ReplaceMe that is the block with T folded in, so training begins at the closed-form solution; after
plain dropping it is the dense block, which is the LLM-Streamline baseline (``baselines.streamline``).
The result has exactly the pruned model's blocks and shapes.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme.cuts import Cut, validate_cuts
from replaceme_jax.replaceme.heal import adamw_warmup_cosine, batch_order

LOSSES = ("mse", "token")


@dataclasses.dataclass
class AnchorTuning:
    model: object                        # the pruned model with its anchors retrained
    cuts: list[Cut]                      # in the dense model's block indices
    losses: dict[Cut, list[float]]       # per cut: each step's batch loss, before its update
    seconds: float


def stream_pairs(model, batches, cuts: Sequence[Cut]):
    """Per batch: ({cut: (h_{s-2}, h_{e-1})}, attention mask) from one dense pass, float32 (h_{-1}
    is the embeddings): each anchor's input and the target it is trained toward."""
    cuts = list(validate_cuts(cuts, model.config.num_hidden_layers))
    depth = max(e for _, e in cuts)
    graph, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask):
        m = nnx.merge(graph, state)
        cos, sin, biases = m.attention_inputs(mask)
        h = m.embed(ids)
        seen = {-1: h}
        for k, _, _, h in m.blocks(h, cos, sin, biases, depth=depth):
            seen[k] = h
        return {c: (seen[c[0] - 2].astype(jnp.float32), seen[c[1] - 1].astype(jnp.float32)) for c in cuts}

    out = []
    for b in batches:
        mask = jnp.asarray(b.attention_mask, jnp.int32)
        out.append((run(state, jnp.asarray(b.input_ids, jnp.int32), mask), mask))
    return out


def tune_anchors(dense, pruned, batches, cuts: Sequence[Cut], *, steps: int, lr: float, warmup: int = 10,
                 seed: int = 0, loss: str = "mse") -> AnchorTuning:
    """Retrain the anchor of every cut of ``pruned`` (``dense`` with ``cuts`` removed, by any method)
    toward ``dense``'s stream on ``batches``. ``loss``: ``mse``, the squared error relative to the
    target's energy over all tokens (the LLM-Streamline paper's objective), or ``token``, each token's
    error relative to its own target's energy, averaged (every token weighs the same, as after the
    next block's RMSNorm, instead of a few high-norm tokens dominating)."""
    import optax
    if loss not in LOSSES:
        raise ReplaceMeError(f"anchor tuning loss={loss!r}: use {' or '.join(LOSSES)}")
    if steps < 1 or not lr > 0:
        raise ReplaceMeError(f"anchor tuning needs steps >= 1 and lr > 0 (got steps={steps}, lr={lr})")
    batches = list(batches)
    if not batches:
        raise ReplaceMeError("anchor tuning got no calibration batches: the calibration text is empty or too short")
    cuts = sorted(validate_cuts(cuts, dense.config.num_hidden_layers))
    removed = sum(e - s for s, e in cuts)
    if pruned.config.num_hidden_layers != dense.config.num_hidden_layers - removed:
        raise ReplaceMeError(f"the pruned model has {pruned.config.num_hidden_layers} blocks; {dense.config.num_hidden_layers}"
                             f" minus the cuts {cuts} leaves {dense.config.num_hidden_layers - removed}")
    t0 = time.perf_counter()
    pairs = stream_pairs(dense, batches, cuts)
    inputs = dense.attention_inputs  # reads only the config: RoPE tables and masks from the batch
    tx = adamw_warmup_cosine(lr, warmup, steps)
    order = batch_order(len(pairs), steps, seed)
    replaced, losses, offset = {}, {}, 0
    for s, e in cuts:
        a_dense, a_pruned = s - 1, s - 1 - offset  # the bias is the dense block's (sliding windows)
        offset += e - s
        graph, init = nnx.split(pruned.model.layers[a_pruned])
        dtypes = jax.tree.map(lambda v: v.dtype, init)
        params = jax.tree.map(lambda v: v.astype(jnp.float32), init)  # trained in float32, cast back at the end

        def objective(p, x, target, mask, graph=graph, a=a_dense):
            cos, sin, biases = inputs(mask)
            out = nnx.merge(graph, p)(x, cos, sin, biases[a])
            w = (mask > 0).astype(jnp.float32)
            err, energy = jnp.sum(jnp.square(out - target), -1), jnp.sum(jnp.square(target), -1)
            if loss == "token":
                return jnp.sum(w * err / jnp.maximum(energy, 1e-30)) / jnp.maximum(jnp.sum(w), 1.0)
            return jnp.sum(w * err) / jnp.maximum(jnp.sum(w * energy), 1e-30)

        @jax.jit
        def step(p, opt_state, x, target, mask, objective=objective):
            value, grads = jax.value_and_grad(objective)(p, x, target, mask)
            updates, opt_state = tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, value

        opt_state = tx.init(params)
        losses[(s, e)] = []
        for i in order:
            (x, target), mask = pairs[i][0][(s, e)], pairs[i][1]
            params, opt_state, value = step(params, opt_state, x, target, mask)
            losses[(s, e)].append(float(value))
            if not np.isfinite(losses[(s, e)][-1]):
                raise ReplaceMeError(f"anchor tuning of cut [{s}, {e}) diverged at step {len(losses[(s, e)])} "
                                     f"(loss {losses[(s, e)][-1]}); lower its lr (now {lr})")
        trained = jax.tree.map(lambda v, d: v.astype(d), params, dtypes)
        replaced.update({("model", "layers", a_pruned, *path): v.get_value() for path, v in nnx.to_flat_state(trained)})
    from replaceme_jax.replaceme.surgery import drop_blocks
    return AnchorTuning(model=drop_blocks(pruned, [], replaced=replaced), cuts=cuts, losses=losses,
                        seconds=time.perf_counter() - t0)


def anchor_fingerprint(settings, cuts, dense) -> dict:
    """What decides the tuned anchors: a saved result is reused only under the same fingerprint."""
    h = settings.heal
    return {"anchor": {"steps": h.anchor_steps, "lr": h.anchor_lr, "loss": h.anchor_loss, "warmup": h.warmup,
                       "seed": h.seed}, "cuts": [list(c) for c in sorted(cuts)],
            "depth": dense.config.num_hidden_layers, **settings.pruning_dict()}


def tune_or_restore(dense, pruned, batches, cuts, settings, directory=None):
    """``tune_anchors`` with the run's ``heal.anchor_*`` settings; the tuned anchors are kept with Orbax
    in ``<directory>/anchors`` so a re-run after an interruption (e.g. during the LoRA stage that
    follows) reuses them instead of training again. Returns (model, AnchorTuning or None if restored)."""
    import json
    from pathlib import Path

    import orbax.checkpoint as ocp

    from replaceme_jax.io_utils import atomic_write_json
    from replaceme_jax.replaceme.surgery import drop_blocks
    h = settings.heal
    fingerprint = json.loads(json.dumps(anchor_fingerprint(settings, cuts, dense)))
    where = Path(directory).absolute() / "anchors" if directory else None
    meta = where.with_suffix(".json") if where else None
    anchors = sorted({s - 1 - sum(e2 - s2 for s2, e2 in cuts if e2 <= s) for s, _ in cuts})
    if where is not None and meta.exists() and (where / "state").exists():
        if json.loads(meta.read_text()) != fingerprint:
            raise ReplaceMeError(f"{where} holds anchors tuned with other settings; delete {where.parent} to start "
                                 "over, or write the run elsewhere")
        abstract = {str(a): jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(pruned.model.layers[a]).to_pure_dict())
                    for a in anchors}
        saved = ocp.StandardCheckpointer().restore(where / "state", abstract)
        replaced = {("model", "layers", int(a), *path): v for a in saved
                    for path, v in nnx.to_flat_state(nnx.State(saved[a]))}
        return drop_blocks(pruned, [], replaced=replaced), None
    tuned = tune_anchors(dense, pruned, batches, cuts, steps=h.anchor_steps, lr=h.anchor_lr, warmup=h.warmup,
                         seed=h.seed, loss=h.anchor_loss)
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
        state = {str(a): nnx.state(tuned.model.model.layers[a]).to_pure_dict() for a in anchors}
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(where / "state", state, force=True)  # Orbax writes a temporary directory, then renames
        checkpointer.wait_until_finished()
        atomic_write_json(meta, fingerprint)  # last: only a complete state is ever reused
    return tuned.model, tuned
