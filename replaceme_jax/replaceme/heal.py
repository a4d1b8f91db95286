"""Optional healing: a short distillation of the pruned model toward the dense model (``heal.*``).

The student is the pruned model with low-rank adapters W + (α/r)·A B on chosen projections of
chosen blocks (by default the blocks next to each cut: the anchor that holds T and the first block
after the cut). The loss is KL(dense ‖ pruned) of the next-token distributions at every real token of
calibration-source text; only A and B train (Optax AdamW, one jitted step). At the end every A B is
folded into its W, so the healed model has exactly the pruned model's parameters and shapes.

Resumable: the adapters, the optimiser state and the step are written with Orbax every
``heal.checkpoint_every`` steps (and on Ctrl-C) to ``<dir>``; a re-run with the same settings
continues from the last saved step. The batch order is fixed by ``heal.seed``, so a resumed run
is the same run.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme.cuts import Cut

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def pruned_neighbours(cuts: Sequence[Cut], depth: int) -> list[int]:
    """Pruned-model indices of the blocks next to each cut (given in the dense model's indices):
    the anchor s - 1 and the first kept block after the cut."""
    out, offset = set(), 0
    for s, e in sorted(cuts):
        anchor = s - 1 - offset
        out.add(anchor)
        offset += e - s
        if e < depth:
            out.add(e - offset)
    return sorted(out)


def target_blocks(spec: str, cuts: Sequence[Cut], dense_depth: int, pruned_depth: int) -> list[int]:
    """``adjacent`` | ``all`` | comma list of pruned-model block indices."""
    if spec == "adjacent":
        return pruned_neighbours(cuts, dense_depth)
    if spec == "all":
        return list(range(pruned_depth))
    try:
        blocks = sorted({int(p) for p in spec.split(",") if p.strip()})
    except ValueError:
        raise ReplaceMeError(f"heal.blocks={spec!r}: use adjacent, all or pruned-model block indices, e.g. 10,11") from None
    bad = [b for b in blocks if not 0 <= b < pruned_depth]
    if bad or not blocks:
        raise ReplaceMeError(f"heal.blocks={spec!r}: the pruned model has blocks 0..{pruned_depth - 1}")
    return blocks


def target_modules(spec: str) -> list[str]:
    names = PROJECTIONS if spec == "all" else [p.strip() for p in spec.split(",") if p.strip()]
    bad = [n for n in names if n not in PROJECTIONS]
    if bad or not names:
        raise ReplaceMeError(f"heal.modules={spec!r}: use all or a comma list of {', '.join(PROJECTIONS)}")
    return list(names)


def _projection(model, block: int, name: str):
    return getattr(getattr(model.model.layers[block], _PARENT[name]), name)


def init_adapters(model, blocks, modules, rank: int, seed: int) -> dict[str, dict[str, jax.Array]]:
    """{"<block>.<proj>": {"A": [in, r] small random, "B": [r, out] zeros}}: the student starts as the
    pruned model exactly."""
    key = jax.random.PRNGKey(seed)
    out = {}
    for b in blocks:
        for name in modules:
            d_in, d_out = _projection(model, b, name).kernel.get_value().shape
            key, sub = jax.random.split(key)
            out[f"{b}.{name}"] = {"A": jax.random.normal(sub, (d_in, rank), jnp.float32) / np.sqrt(d_in),
                                  "B": jnp.zeros((rank, d_out), jnp.float32)}
    return out


def adapted_state(state, adapters, scale: float):
    """``state`` (of ``nnx.split``) with every adapter's (α/r)·A B added to its kernel: a pure pytree
    edit, so it works inside the differentiated step and leaves the original Variables alone."""
    paths = {("model", "layers", int(key.split(".")[0]), _PARENT[key.split(".")[1]], key.split(".")[1], "kernel"): key
             for key in adapters}
    flat = []
    for path, var in nnx.to_flat_state(state):
        if path in paths:
            ab, w = adapters[paths[path]], var.get_value()
            var = var.replace((w.astype(jnp.float32) + scale * (ab["A"] @ ab["B"])).astype(w.dtype))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def distillation_loss(teacher_logits, student_logits, attention_mask):
    """Mean KL(teacher ‖ student) over real tokens (every real token predicts the next one)."""
    valid = (attention_mask > 0).astype(jnp.float32)
    log_t = jax.nn.log_softmax(teacher_logits, axis=-1)
    log_s = jax.nn.log_softmax(student_logits, axis=-1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    return jnp.sum(kl * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def adamw_warmup_cosine(lr: float, warmup: int, steps: int):
    """AdamW with linear warmup, cosine decay to lr/10 and global-norm clipping at 1 (healing and the
    LLM-Streamline baseline)."""
    import optax
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(min(warmup, steps - 1), 0), steps, end_value=lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))


def _make_step(student_graph, teacher_graph, tx, scale):
    def step(adapters, opt_state, student_state, teacher_state, ids, mask):
        import optax
        teacher = nnx.merge(teacher_graph, teacher_state)
        target = jax.lax.stop_gradient(teacher(ids, mask))

        def loss_fn(a):
            student = nnx.merge(student_graph, adapted_state(student_state, a, scale))
            return distillation_loss(target, student(ids, mask), mask)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss
    return jax.jit(step, donate_argnums=(0, 1))


@dataclasses.dataclass
class HealResult:
    model: object                 # the healed model (adapters folded in)
    steps: int                    # steps done in all (including those of an earlier, resumed run)
    tokens: int                   # real tokens seen in all
    losses: list[tuple[int, float]]
    seconds: float                # wall time of this call
    resumed_from: int             # step the call started at (0: fresh)
    blocks: list[int]
    modules: list[str]


def heal(student, teacher, batches, settings, *, cuts: Sequence[Cut], directory=None, progress: bool = False,
         on_step=None) -> HealResult:
    """Distil ``student`` (pruned) toward ``teacher`` (dense) on ``batches``; ``settings``: the run's
    Settings (``heal`` section). ``directory``: where the resumable state lives (None: not saved).
    ``on_step(step, model_fn)``: called after each step (``model_fn()`` builds the healed model so far),
    e.g. to score held-out perplexity during a study."""
    import optax  # noqa: F401  (fail here, not inside jit, if the optimiser library is missing)
    h = settings.heal
    batches = list(batches)
    if not batches:
        raise ReplaceMeError("healing got no batches: the heal text is empty or too short")
    dense_depth, depth = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    blocks = target_blocks(h.blocks, cuts, dense_depth, depth)
    modules = target_modules(h.modules)
    scale = h.lora_alpha / h.rank
    tx = adamw_warmup_cosine(h.lr, h.warmup, h.steps)
    adapters = init_adapters(student, blocks, modules, h.rank, h.seed)
    opt_state = tx.init(adapters)
    start, losses = 0, []
    store = _Store(directory, _fingerprint(settings, cuts, student, blocks, modules)) if directory else None
    if store is not None and (saved := store.restore(adapters, opt_state)) is not None:
        adapters, opt_state, start, losses = saved
    s_graph, s_state = nnx.split(student)
    t_graph, t_state = nnx.split(teacher)
    step_fn = _make_step(s_graph, t_graph, tx, scale)
    order = batch_order(len(batches), h.steps, h.seed)
    tokens_per = [int(np.sum(np.asarray(b.attention_mask) > 0)) for b in batches]
    t0 = time.perf_counter()
    bar = None
    if progress and start < h.steps:
        from tqdm.auto import tqdm
        bar = tqdm(total=h.steps, initial=start, desc="healing", unit="step")
    step = start
    try:
        for step in range(start, h.steps):
            b = batches[order[step]]
            adapters, opt_state, loss = step_fn(adapters, opt_state, s_state, t_state,
                                                jnp.asarray(b.input_ids, jnp.int32), jnp.asarray(b.attention_mask, jnp.int32))
            losses.append((step + 1, float(loss)))
            if not np.isfinite(losses[-1][1]):
                raise ReplaceMeError(f"healing diverged at step {step + 1} (loss {losses[-1][1]}); lower heal.lr "
                                     f"(now {h.lr})")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{losses[-1][1]:.4f}")
            if store is not None and ((step + 1) % h.checkpoint_every == 0 or step + 1 == h.steps):
                store.save(step + 1, adapters, opt_state, losses)
            if on_step is not None:
                on_step(step + 1, lambda a=adapters: fold(student, a, scale))
    except KeyboardInterrupt:
        if store is not None and losses and losses[-1][0] > store.last_step:
            store.save(losses[-1][0], adapters, opt_state, losses)
            print(f"[replaceme] healing interrupted: state of step {losses[-1][0]} saved in {directory}; "
                  "re-run to continue", file=sys.stderr, flush=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    done = losses[-1][0] if losses else start
    tokens = sum(tokens_per[order[i]] for i in range(done))
    return HealResult(model=fold(student, adapters, scale), steps=done, tokens=tokens, losses=losses,
                      seconds=time.perf_counter() - t0, resumed_from=start, blocks=blocks, modules=modules)


def fold(student, adapters, scale: float):
    """A new model: the student with each adapter's (α/r)·A B added to its kernel; no new parameters."""
    graph, state = nnx.split(student)
    return nnx.merge(graph, adapted_state(state, adapters, scale))


def batch_order(num_batches: int, steps: int, seed: int) -> np.ndarray:
    """Batch index of each step: a fresh permutation per pass over the batches, fixed by the seed."""
    rng = np.random.default_rng(seed)
    passes = -(-steps // num_batches)
    return np.concatenate([rng.permutation(num_batches) for _ in range(max(passes, 1))])[:steps]


def _fingerprint(settings, cuts, student, blocks, modules) -> dict:
    h = settings.heal.to_dict()
    h.pop("checkpoint_every", None)  # how often state is saved does not change the run
    return {"heal": h, "cuts": [list(c) for c in sorted(cuts)],
            "blocks": blocks, "modules": modules, "depth": student.config.num_hidden_layers,
            "hidden_size": student.config.hidden_size, **settings.pruning_dict()}


class _Store:
    """Orbax state of a healing run plus a JSON of its settings, so another run's state is never mixed in."""

    def __init__(self, directory, fingerprint: dict):
        import orbax.checkpoint as ocp
        self.dir = Path(directory).absolute()
        self.fingerprint = fingerprint
        meta = self.dir / "heal_run.json"
        if meta.exists():
            saved = json.loads(meta.read_text())
            if saved != json.loads(json.dumps(fingerprint)):
                changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != json.loads(
                    json.dumps(fingerprint)).get(k))
                raise ReplaceMeError(f"{self.dir} holds a healing run with other settings ({', '.join(changed)} "
                                     "differ); delete that directory to start over, or heal into another one")
        self.dir.mkdir(parents=True, exist_ok=True)
        from replaceme_jax.io_utils import atomic_write_json
        atomic_write_json(meta, fingerprint)
        self.manager = ocp.CheckpointManager(self.dir / "state", options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True))
        self.last_step = self.manager.latest_step() or 0

    def restore(self, adapters, opt_state):
        import orbax.checkpoint as ocp
        step = self.manager.latest_step()
        if step is None:
            return None
        target = {"adapters": adapters, "opt_state": opt_state}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), losses=ocp.args.JsonRestore()))
        losses = [tuple(x) for x in restored["losses"]["losses"]]
        return restored["state"]["adapters"], restored["state"]["opt_state"], int(step), losses

    def save(self, step: int, adapters, opt_state, losses) -> None:
        import orbax.checkpoint as ocp
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"adapters": adapters, "opt_state": opt_state}),
            losses=ocp.args.JsonSave({"losses": [list(x) for x in losses]})), force=True)
        self.manager.wait_until_finished()
        self.last_step = step
