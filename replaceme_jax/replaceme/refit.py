"""Re-fitting each cut's anchor down-projection in closed form: training-free, no new parameters.

ReplaceMe folds T into the anchor's down-projection: the pruned anchor computes y + z (W T), with
z [d_ff] the MLP's hidden activation (act(gate) * up), W [d_ff, d] its down-projection, and T the
least-squares map from the MLP output m = z W to the target r = L_{e-1} - y. But W T is only one
point of the space the anchor can hold: any kernel K [d_ff, d] keeps the model's shape, and

    K = argmin ||Z K - R||² + α ||K - W T||²

fits r at least as well on the calibration tokens (α -> inf gives ReplaceMe's W T back; the ridge
pulls toward it, not toward zero). Its sums are ZᵀZ [d_ff, d_ff] and ZᵀR [d_ff, d]: one more pass,
over the chosen cuts only, to the cut's end. α is chosen from a grid by the relative residual on the
calibration source's validation passages (never the held-out text), and "inf" in the grid keeps W T
where the re-fit does not generalise.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.sharding import RESIDUAL, constrain
from replaceme_jax.replaceme.cuts import Cut, validate_cuts
from replaceme_jax.replaceme.solvers import NormalEquations, relative_residual
from replaceme_jax.replaceme.statistics import StatsRequest, _kahan_add, sum_batches

_HI = jax.lax.Precision.HIGHEST
WEIGHTINGS = ("none", "token")


def down_proj_kernel_path(block: int) -> tuple:
    """Parameter path of block ``block``'s down-projection kernel, what every re-fit here replaces."""
    return ("model", "layers", int(block), "mlp", "down_proj", "kernel")


def anchor_kernel_path(cut: Cut) -> tuple:
    """Parameter path (in the unpruned model) of the down-projection kernel a cut's fit replaces."""
    return down_proj_kernel_path(int(cut[0]) - 1)


def _kernel_sums(model, input_ids, attention_mask, block: int, depth: int, shift, include_pad: bool, acc, plan,
                 weighting: str = "none", target_model=None, shared: int = 0):
    """One batch's ZᵀZ, Zᵀ(R - shift), ||R - shift||², token count (traced inside jit) for the
    down-projection of ``model``'s ``block``: Z its MLP hidden activation, R = L - Y with Y the
    block's attention residual and L the target stream, the output of block ``depth - 1`` of
    ``target_model`` (None: ``model`` itself, continuing from this block's output). Blocks below
    ``shared`` are the same in both models and run once. ``shift`` [d]: the part of the block's
    output the kernel does not produce (its bias). ``weighting="token"`` weighs each token by
    1 / ||L_t||², its target's energy (the sums of a per-token relative error), so a few
    high-norm tokens do not dominate the fit."""
    mask = (attention_mask > 0).astype(jnp.float32)
    tokens = jnp.broadcast_to((mask.sum(-1, keepdims=True) > 0).astype(jnp.float32), mask.shape) if include_pad else mask
    cos, sin, biases = model.attention_inputs(attention_mask)

    def run(m, h, start, stop, bias):
        for k in range(start, stop):
            h = constrain(m.model.layers[k](h, cos, sin, bias[k]), plan, RESIDUAL)
        return h

    h = run(model, constrain(model.embed(input_ids), plan, RESIDUAL), 0, shared, biases)
    x = run(model, h, shared, block, biases)
    layer = model.model.layers[block]
    y = layer.attention_residual(x, cos, sin, biases[block])
    z = layer.mlp.hidden(layer.post_attention_layernorm(y))
    if target_model is None:
        target = run(model, constrain(y + layer.mlp.down_proj(z), plan, RESIDUAL), block + 1, depth, biases)
    else:  # its own biases: a pruned model's blocks may have other attention windows
        target_biases = target_model.attention_inputs(attention_mask)[2]
        target = run(target_model, h, shared, depth, target_biases)
    w = tokens.astype(acc)
    if weighting == "token":
        energy = jnp.sum(jnp.square(target.astype(acc)), -1)
        w = w / jnp.maximum(energy, jnp.finfo(acc).tiny)
    r = target.astype(acc) - y.astype(acc) - shift.astype(acc)
    zw = z.astype(acc) * w[..., None]
    # A leading axis of 1 lets a mesh split the d_ff x d_ff sum by rows like the statistics pass's sums.
    return {"mtm": jnp.einsum("btf,btg->fg", zw, z.astype(acc), precision=_HI)[None],
            "mtr": jnp.einsum("btf,btd->fd", zw, r, precision=_HI)[None],
            "rtr": jnp.sum(w[..., None] * r * r), "count": jnp.sum(tokens).astype(acc)}


@functools.lru_cache(maxsize=16)
def _compiled_step(graphdef, target_graphdef, block: int, depth: int, shared: int, include_pad: bool, acc: str,
                   plan=None, weighting: str = "none"):
    def step(states, sums, shift, input_ids, attention_mask):
        state, target_state = states
        target = None if target_graphdef is None else nnx.merge(target_graphdef, target_state)
        new = _kernel_sums(nnx.merge(graphdef, state), input_ids, attention_mask, block, depth, shift, include_pad,
                           jnp.dtype(acc), plan, weighting, target, shared)
        out = {}
        for k, x in new.items():
            if plan is not None:
                x = plan.constrain_accumulator(x)
            out[k], out[k + "/comp"] = _kahan_add(sums[k], sums[k + "/comp"], x)
        return out, out["count"] + 0
    return jax.jit(step, donate_argnums=(1,))


def gather_kernel_equations(model, batches: Iterable, cut: Cut, *, shift=None, include_pad: bool = False,
                            accum_dtype: str = "auto", plan=None, progress: bool = False,
                            weighting: str = "none") -> NormalEquations:
    """The normal equations of the anchor kernel's re-fit for ``cut`` over ``batches``:
    mtm = ZᵀZ [d_ff, d_ff], mtr = Zᵀ(R - shift) [d_ff, d], rtr = ||R - shift||², count = tokens.
    ``shift`` [d] (default 0): a bias the kernel's output is added to. ``plan`` as in ``gather_statistics``.
    ``weighting``: "none" (every token alike) or "token" (each token by 1 / ||L_t||²; rtr is then weighted)."""
    (cut,) = validate_cuts([cut], model.config.num_hidden_layers)
    if cut[0] < 1:
        raise ReplaceMeError(f"cut [{cut[0]}, {cut[1]}) has no anchor block to re-fit; a cut must start at block >= 1")
    return _gather(model, batches, cut[0] - 1, cut[1], what=f"cut {cut}", shift=shift, include_pad=include_pad,
                   accum_dtype=accum_dtype, plan=plan, progress=progress, weighting=weighting)


def gather_block_equations(model, batches: Iterable, block: int, target_model, target_block: int, *,
                           shared: int = 0, shift=None, include_pad: bool = False, accum_dtype: str = "auto",
                           plan=None, progress: bool = False, weighting: str = "none") -> NormalEquations:
    """The normal equations of re-fitting ``model``'s block ``block`` down-projection so that the
    block's output matches ``target_model``'s output of block ``target_block`` (a pruned model's
    block toward the dense stream at the depth it stands for). The first ``shared`` blocks must be
    the same in both models (they run once). Sums and arguments as in ``gather_kernel_equations``."""
    n, m = model.config.num_hidden_layers, target_model.config.num_hidden_layers
    if not (0 <= block < n and 0 <= target_block < m and 0 <= shared <= min(block, target_block + 1)):
        raise ReplaceMeError(f"block {block} of {n} toward block {target_block} of {m} with {shared} shared blocks: "
                             "out of range")
    return _gather(model, batches, block, target_block + 1, what=f"block {block}", target_model=target_model,
                   shared=shared, shift=shift, include_pad=include_pad, accum_dtype=accum_dtype, plan=plan,
                   progress=progress, weighting=weighting)


def _gather(model, batches, block: int, depth: int, *, what: str, target_model=None, shared: int = 0, shift=None,
            include_pad: bool = False, accum_dtype: str = "auto", plan=None, progress: bool = False,
            weighting: str = "none") -> NormalEquations:
    if weighting not in WEIGHTINGS:
        raise ReplaceMeError(f"refit.weighting={weighting!r}: use one of {WEIGHTINGS}")
    batches = list(batches)
    if not batches:
        raise ReplaceMeError("no batches to re-fit a kernel on: the calibration data is empty")
    acc = StatsRequest(accum_dtype=accum_dtype).resolved_accum_dtype()
    if plan is not None:
        model = plan.shard_model(model)
        target_model = None if target_model is None else plan.shard_model(target_model)
    graphdef, state = nnx.split(model)
    target_graphdef, target_state = (None, None) if target_model is None else nnx.split(target_model)
    d, f = model.config.hidden_size, model.config.intermediate_size
    shapes = {"mtm": (1, f, f), "mtr": (1, f, d), "rtr": (), "count": ()}
    step = _compiled_step(graphdef, target_graphdef, int(block), int(depth), int(shared), include_pad, acc, plan,
                          weighting)
    with jax.enable_x64(acc == "float64"):
        sums = {name: (jnp.zeros(shape, acc) if plan is None else plan.zeros(shape, acc, plan.accumulator_sharding(shape)))
                for k, shape in shapes.items() for name in (k, k + "/comp")}
        shift = jnp.zeros((d,), jnp.float32) if shift is None else jnp.asarray(shift, jnp.float32)
        total = sum_batches(step, (state, target_state), sums, batches, plan=plan,
                            desc=f"kernel re-fit sums for {what}", progress=progress, extra=(shift,))
    ne = NormalEquations(mtm=total["mtm"][0], mtr=total["mtr"][0], rtr=float(total["rtr"]),
                         count=int(round(float(total["count"]))))
    if not all(np.isfinite(np.asarray(x)).all() for x in (ne.mtm, ne.mtr, ne.rtr)):
        raise ReplaceMeError(f"non-finite values (NaN/inf) in the kernel re-fit sums for {what}: the model "
                             "overflowed on the calibration data; use dtype=float32 or accum_dtype=float64")
    if ne.count <= 0:
        raise ReplaceMeError("the kernel re-fit batches hold no tokens: the calibration data is empty or too short")
    return ne


def parse_grid(text: str) -> tuple[float, ...]:
    """'1e-5,1e-3,inf' -> (1e-5, 1e-3, inf): relative ridge strengths; inf keeps the prior kernel."""
    from replaceme_jax.settings import parse_ridge_grid
    values = parse_ridge_grid(text, "refit.alpha_grid", "1e-6,1e-4,1e-2,inf")
    if not values:
        raise ReplaceMeError(f"refit.alpha_grid={text!r}: give at least one value (inf keeps W T)")
    return values


@dataclasses.dataclass(frozen=True)
class KernelFit:
    """The chosen kernel [d_ff, d] (float64) and how it was chosen. ``alpha_relative``: α / (tr(ZᵀZ)/d_ff),
    inf when the prior (ReplaceMe's W T) was kept; ``grid``: (relative α, validation residual) per value;
    ``train_residual``/``validation_residual``: relative residuals of the chosen kernel, ``prior_*`` the prior's."""
    kernel: np.ndarray
    alpha_relative: float
    validation_residual: float
    prior_validation_residual: float
    train_residual: float
    prior_train_residual: float
    grid: tuple[tuple[float, float], ...]

    @property
    def kept_prior(self) -> bool:
        return math.isinf(self.alpha_relative)

    def summary(self) -> dict:
        return {"alpha_relative": None if self.kept_prior else self.alpha_relative, "kept_prior": self.kept_prior,
                "train_residual": self.train_residual, "prior_train_residual": self.prior_train_residual,
                "validation_residual": self.validation_residual,
                "prior_validation_residual": self.prior_validation_residual,
                "grid": [[None if math.isinf(g) else g, r] for g, r in self.grid]}


def fit_kernel(ne: NormalEquations, prior, validation: NormalEquations, grid: Sequence[float]) -> KernelFit:
    """argmin_K ||Z K - R||² + α ||K - prior||² for each relative α of ``grid`` (α = value x tr(ZᵀZ)/d_ff;
    inf: K = prior), the one with the lowest relative residual on ``validation``'s sums.

    One eigendecomposition of ZᵀZ serves the whole grid; α = 0 takes the minimum-norm solution on
    ZᵀZ's numerically non-zero spectrum (dead hidden units give exact zeros)."""
    mtm, mtr = np.asarray(ne.mtm, np.float64), np.asarray(ne.mtr, np.float64)
    prior = np.asarray(prior, np.float64)
    if prior.shape != mtr.shape:
        raise ReplaceMeError(f"the prior kernel is {list(prior.shape)}, the statistics need {list(mtr.shape)}")
    scale = float(np.trace(mtm)) / mtm.shape[0]
    if not scale > 0:
        raise ReplaceMeError("the anchor's MLP hidden activations are zero on every calibration token; "
                             "nothing to re-fit (check the checkpoint), or set refit.anchor=False")
    lam, q = np.linalg.eigh(mtm)
    lam = np.maximum(lam, 0.0)
    floor = lam.max() * mtm.shape[0] * np.finfo(np.float64).eps
    qc, qp = q.T @ mtr, q.T @ prior
    tried = []
    for g in grid:
        if math.isinf(g):
            kernel = prior
        else:
            a = g * scale
            denom = lam + a
            inv = np.where(denom > floor, 1.0 / np.where(denom > floor, denom, 1.0), 0.0)
            kernel = q @ (inv[:, None] * (qc + a * qp))
        tried.append((relative_residual(validation, kernel), g, kernel))
    best_res, best_g, best = min(tried, key=lambda t: (t[0], -t[1]))  # ties: the stronger ridge
    return KernelFit(kernel=best, alpha_relative=best_g, validation_residual=best_res,
                     prior_validation_residual=relative_residual(validation, prior),
                     train_residual=relative_residual(ne, best), prior_train_residual=relative_residual(ne, prior),
                     grid=tuple((g, r) for r, g, _ in tried))


def refit_anchor(model, batches, validation, cut: Cut, T, grid, *, include_pad: bool = False,
                 accum_dtype: str = "auto", plan=None, progress: bool = False, weighting: str = "none") -> KernelFit:
    """The re-fit kernel of ``cut``'s anchor in ``model`` (the model the cut's T was estimated on),
    with ReplaceMe's fold W T as the prior. A down-projection bias b stays folded as b T."""
    layer = model.model.layers[int(cut[0]) - 1].mlp.down_proj
    W = np.asarray(layer.kernel.get_value(), np.float64)
    T = np.asarray(T, np.float64)
    shift = None if getattr(layer, "bias", None) is None else np.asarray(layer.bias.get_value(), np.float64) @ T
    kw = dict(shift=shift, include_pad=include_pad, accum_dtype=accum_dtype, plan=plan, weighting=weighting)
    ne = gather_kernel_equations(model, batches, cut, progress=progress, **kw)
    val = gather_kernel_equations(model, validation, cut, **kw)
    return fit_kernel(ne, W @ T, val, grid)


def downstream_blocks(depth: int, cuts: Sequence[Cut], blocks: int) -> list[tuple[int, int]]:
    """(pruned index, dense index) of the blocks ``refit_downstream`` re-fits: the first ``blocks``
    blocks after each cut, in depth order, stopping at a removed block or another cut's anchor (its
    kernel carries that cut's fit)."""
    cuts = validate_cuts(cuts, depth)
    removed = {i for s, e in cuts for i in range(s, e)}
    anchors = {s - 1 for s, _ in cuts}
    kept = [i for i in range(depth) if i not in removed]
    out = []
    for _, e in sorted(cuts):
        for q in range(e, min(e + blocks, depth)):
            if q in removed or q in anchors:
                break
            out.append((kept.index(q), q))
    return out


@dataclasses.dataclass(frozen=True)
class BlockFit:
    """A down-projection re-fitted after a cut: the pruned model's ``block`` toward the dense
    stream after ``dense_block``, with the block's own kernel as the prior."""
    block: int
    dense_block: int
    fit: KernelFit

    def summary(self) -> dict:
        return {"block": self.block, "dense_block": self.dense_block, **self.fit.summary()}


def refit_downstream(dense, pruned, cuts: Sequence[Cut], batches, validation, blocks: int, grid, *,
                     include_pad: bool = False, accum_dtype: str = "auto", plan=None, progress: bool = False,
                     weighting: str = "none"):
    """Re-fit the down-projections of the first ``blocks`` blocks after each cut so that each
    block's output on the pruned stream matches the dense stream at the depth the block stands for:
    the error the cut leaves is corrected where it enters the rest of the model, still in closed
    form and with no new parameters. Blocks go in depth order, each fitted on the stream its
    predecessors' re-fits produce; the ridge pulls toward the block's own kernel ("inf" in ``grid``
    keeps it) and is chosen on ``validation``. Returns (the new pruned model, a BlockFit per block)."""
    from replaceme_jax.replaceme.surgery import replace_kernels
    cuts = validate_cuts(cuts, dense.config.num_hidden_layers)
    shared = min(s for s, _ in cuts) - 1  # the first anchor and everything after it may differ
    fits = []
    for block, dense_block in downstream_blocks(dense.config.num_hidden_layers, cuts, blocks):
        layer = pruned.model.layers[block].mlp.down_proj
        bias = getattr(layer, "bias", None)
        kw = dict(shared=shared, shift=None if bias is None else np.asarray(bias.get_value(), np.float64),
                  include_pad=include_pad, accum_dtype=accum_dtype, plan=plan, weighting=weighting)
        ne = gather_block_equations(pruned, batches, block, dense, dense_block, progress=progress, **kw)
        val = gather_block_equations(pruned, validation, block, dense, dense_block, **kw)
        fit = fit_kernel(ne, np.asarray(layer.kernel.get_value(), np.float64), val, grid)
        fits.append(BlockFit(block, dense_block, fit))
        if not fit.kept_prior:
            pruned = replace_kernels(pruned, {down_proj_kernel_path(block): fit.kernel})
    return pruned, fits
