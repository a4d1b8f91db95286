"""Estimating the linear transform T that stands in for a cut of transformer blocks.

For a cut [s, e) with anchor block a = s-1, every calibration token gives
  m: the MLP output of block a (before its residual add),  y: the attention residual of block a,
  l: the output of block e-1,                               r = l - y (the target).
The pruned model computes y + m T where the full model computed l, so T should map m to r.

Closed-form solvers (``lstsq``, ``diag``, ``orth_diag``) need only the sums in ``NormalEquations``; the gradient
solver (``cosine``) trains T on token rows drawn from a ``TokenBuffer``. All return a ``SolveResult``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import operator
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme.token_buffer import TokenBuffer

logger = logging.getLogger(__name__)

_HIGHEST = lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NormalEquations:
    """Sufficient statistics of min_T ||M T - R||_F over ``count`` tokens.

    Leaves may be numpy or JAX arrays (float32 or float64): ``mtm`` = MᵀM [k, k],
    ``mtr`` = MᵀR [k, d], ``rtr`` = ||R||²_F (scalar), ``count`` = number of tokens N.
    Records of disjoint token sets add up with ``+``. The T solvers have k = d (M: the MLP output);
    the kernel re-fit (``refit.py``) has k = d_ff (M: the down-projection's input).
    """
    mtm: Any
    mtr: Any
    rtr: Any
    count: Any

    @classmethod
    def from_arrays(cls, m, r) -> "NormalEquations":
        """Statistics of token rows m [N, k], r [N, d], summed in float64 numpy (reference / small inputs)."""
        m = np.asarray(m, np.float64)
        r = np.asarray(r, np.float64)
        if m.ndim != 2 or r.ndim != 2 or m.shape[0] != r.shape[0]:
            raise ReplaceMeError(f"m and r must be [N, k] and [N, d] with the same N, got {list(m.shape)} "
                                 f"and {list(r.shape)}")
        return cls(mtm=m.T @ m, mtr=m.T @ r, rtr=np.float64(np.sum(r * r)), count=m.shape[0])

    def __add__(self, other: "NormalEquations") -> "NormalEquations":
        return jax.tree.map(operator.add, self, other)

    @property
    def d(self) -> int:
        return int(np.shape(self.mtm)[0])


@dataclasses.dataclass(frozen=True)
class SolveResult:
    """T [d, d] as a host numpy array (float64 from closed-form solvers, float32 from ``cosine``);
    ``loss_history``: (step, loss) pairs, empty for closed-form solvers; ``final_loss``: the solver's
    objective at T (``info['loss']`` names it); ``info``: method details and diagnostics."""
    T: np.ndarray
    loss_history: tuple[tuple[int, float], ...]
    final_loss: float
    info: dict


def _check_statistics(ne: NormalEquations, square: bool = True) -> int:
    """Validate shapes and count without moving data; return k (d for the T solvers, which need
    ``square`` statistics: MᵀR [d, d])."""
    if not isinstance(ne, NormalEquations):
        raise ReplaceMeError(f"expected a NormalEquations record, got {type(ne).__name__}")
    shape = tuple(np.shape(ne.mtm))
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
        raise ReplaceMeError(f"NormalEquations.mtm must be a square [d, d] matrix, got shape {list(shape)}")
    cross = tuple(np.shape(ne.mtr))
    if (cross != shape) if square else (len(cross) != 2 or cross[0] != shape[0]):
        want = f"match mtm's shape {list(shape)}" if square else f"be [{shape[0]}, d] like mtm's rows"
        raise ReplaceMeError(f"NormalEquations.mtr must {want}, got {list(cross)}")
    if np.size(ne.rtr) != 1:
        raise ReplaceMeError(f"NormalEquations.rtr must be a scalar, got shape {list(np.shape(ne.rtr))}")
    if not int(ne.count) > 0:
        raise ReplaceMeError("NormalEquations.count is 0: no calibration tokens reached the statistics; "
                             "check the calibration data and the padding mask")
    return shape[0]


def _host_statistics(ne: NormalEquations, square: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """(MᵀM, MᵀR, ||R||²) as validated, finite float64 numpy values."""
    _check_statistics(ne, square)
    mtm, mtr = np.asarray(ne.mtm, np.float64), np.asarray(ne.mtr, np.float64)
    rtr = float(np.asarray(ne.rtr, np.float64))
    if not (np.all(np.isfinite(mtm)) and np.all(np.isfinite(mtr)) and np.isfinite(rtr)):
        raise ReplaceMeError("NormalEquations hold NaN/inf: the activations overflowed; "
                             "accumulate the statistics in float32 or float64, not float16/bfloat16")
    return mtm, mtr, rtr


def check_transform(T, solver: str, cause: str, *, cut=None) -> np.ndarray:
    """T as a host array, or a ReplaceMeError naming the solver (and the cut, when given), how many
    entries are NaN/inf, and ``cause``: the likely reason and its fix. No non-finite T leaves a solver."""
    T = np.asarray(T)
    finite = np.isfinite(T)
    if finite.all():
        return T
    where = f" for cut [{cut[0]}, {cut[1]})" if cut is not None else ""
    raise ReplaceMeError(
        f"{solver} solver{where} produced a non-finite T ({int(np.isnan(T).sum())} NaN, "
        f"{int(np.isinf(T).sum())} inf of {T.size} entries); nothing was exported. Likely cause: {cause}")


_OVERFLOW_CAUSE = ("the statistics are finite but too large or too ill-conditioned to solve in {precision} "
                   "(largest |MᵀM| entry {scale:.3g}): activations overflowing in float16/bfloat16 "
                   "(compute dtype), or a corrupt/diverged model. Fix: solve with precision='float64', "
                   "run the model in float32, or add a ridge alpha.")


def _scale(x) -> float:
    x = np.abs(np.asarray(x, np.float64))
    x = x[np.isfinite(x)]
    return float(x.max()) if x.size else float("nan")


RIDGE_TARGETS = ("zero", "identity")


def _check_alpha(alpha) -> float:
    alpha = float(alpha)
    if not alpha >= 0.0:
        raise ReplaceMeError(f"ridge alpha must be >= 0, got {alpha}")
    return alpha


@jax.jit
def _solve_gram(gram, cross, alpha):
    """X = (gram + alpha I)⁻¹ cross by Cholesky, or the eigh pseudo-inverse when the Gram is
    numerically singular. Returns (X, used_cholesky, numerical_rank).

    Jacobi equilibration (unit diagonal) makes the rank test relative per feature and removes the
    ill-conditioning that comes from features of very different scale (massive activations).
    """
    d = gram.shape[0]
    gram = 0.5 * (gram + gram.T) + alpha * jnp.eye(d, dtype=gram.dtype)
    diagonal = jnp.diagonal(gram)
    alive = diagonal > 0
    scale = jnp.where(alive, lax.rsqrt(jnp.where(alive, diagonal, 1.0)), 1.0)
    a = gram * scale[:, None] * scale[None, :]
    b = cross * scale[:, None]
    # Pivots or eigenvalues below this (relative to the unit diagonal) are rounding noise.
    cutoff = d * jnp.finfo(gram.dtype).eps
    chol = jnp.linalg.cholesky(a)
    use_cholesky = jnp.all(jnp.isfinite(chol)) & (jnp.min(jnp.square(jnp.diagonal(chol))) > cutoff)

    def by_cholesky():
        return jax.scipy.linalg.cho_solve((chol, True), b), jnp.int32(d)

    def by_eigh():
        w, q = jnp.linalg.eigh(a)
        keep = w > cutoff * jnp.max(w)
        inverse = jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)
        x = jnp.matmul(q, inverse[:, None] * jnp.matmul(q.T, b, precision=_HIGHEST), precision=_HIGHEST)
        return x, jnp.sum(keep, dtype=jnp.int32)

    x, rank = lax.cond(use_cholesky, by_cholesky, by_eigh)
    # A feature that is zero on every token maps to nothing: its row of T is exactly 0.
    return jnp.where(alive[:, None], x * scale[:, None], 0.0), use_cholesky, rank


def lstsq(ne: NormalEquations, alpha: float = 0.0, *, toward: str = "zero", precision: str = "float64"
          ) -> SolveResult:
    """Ridge least squares T = (MᵀM + αI)⁻¹ MᵀR from the sums (α is absolute, on the summed Gram).

    ``toward="identity"`` shrinks T toward I instead of 0: min ||M T - R||² + α ||T - I||², so
    T = (MᵀM + αI)⁻¹ (MᵀR + αI). T = I is plain dropping (the anchor block's output passes on
    unchanged), so a large α falls back to the drop baseline rather than to a dead anchor MLP.

    ``precision="float64"`` (default) solves in float64 inside a scoped ``jax.enable_x64`` (the
    rest of the program stays float32): least squares through the normal equations squares the
    condition number, and activations reach cond(M) ~ 1e6. ``"float32"`` keeps the solve in float32
    on the default device for very large d; it is accurate only for well-conditioned M.
    If Cholesky fails or hits a pivot at rounding level, the minimum-norm eigh pseudo-inverse
    solution is used instead and a warning names the numerical rank.
    """
    start = time.perf_counter()
    d = _check_statistics(ne)
    alpha = _check_alpha(alpha)
    if toward not in RIDGE_TARGETS:
        raise ReplaceMeError(f"unknown ridge target {toward!r}; use one of {RIDGE_TARGETS}")
    if precision == "float64":
        mtm, mtr, _ = _host_statistics(ne)
        if toward == "identity":
            mtr = mtr + alpha * np.eye(d)
        with jax.enable_x64(True):
            x, used_cholesky, rank = _solve_gram(jnp.asarray(mtm), jnp.asarray(mtr), jnp.float64(alpha))
            # Leave x64 mode with host values only, so no float64 device array escapes.
            T, used_cholesky, rank = np.asarray(x), bool(used_cholesky), int(rank)
    elif precision == "float32":
        mtm, mtr = jnp.asarray(ne.mtm, jnp.float32), jnp.asarray(ne.mtr, jnp.float32)
        if toward == "identity":
            mtr = mtr + jnp.float32(alpha) * jnp.eye(d, dtype=jnp.float32)
        if not bool(jnp.isfinite(mtm).all() & jnp.isfinite(mtr).all()):
            raise ReplaceMeError("NormalEquations hold NaN/inf: the activations overflowed; "
                                 "accumulate the statistics in float32 or float64, not float16/bfloat16")
        x, used_cholesky, rank = _solve_gram(mtm, mtr, jnp.float32(alpha))
        T, used_cholesky, rank = np.asarray(x), bool(used_cholesky), int(rank)
    else:
        raise ReplaceMeError(f"unknown lstsq precision {precision!r}; use 'float64' or 'float32'")
    T = check_transform(T, "lstsq", _OVERFLOW_CAUSE.format(precision=precision, scale=_scale(ne.mtm)))
    if not used_cholesky:
        logger.warning(
            "lstsq: MᵀM + %gI is singular or not positive definite in %s (numerical rank %d of %d; "
            "duplicate, constant-zero or collinear features); using the minimum-norm eigh "
            "pseudo-inverse solution. A small ridge alpha gives a unique solution.",
            alpha, precision, rank, d)
    info = {"solver": "lstsq", "method": "cholesky" if used_cholesky else "eigh_pinv", "rank": rank,
            "alpha": alpha, "toward": toward, "precision": precision, "tokens": int(ne.count), "loss": "relative_residual",
            "seconds": time.perf_counter() - start}
    return SolveResult(T=T, loss_history=(), final_loss=relative_residual(ne, T), info=info)


def diag(ne: NormalEquations, alpha: float = 0.0) -> SolveResult:
    """Diagonal T minimising ||M T - R||²: t_j = (MᵀR)_jj / ((MᵀM)_jj + α), in float64.

    A feature that is zero on every calibration token (zero denominator) gets t_j = 0, the
    minimum-norm choice, with a warning.
    """
    start = time.perf_counter()
    alpha = _check_alpha(alpha)
    mtm, mtr, _ = _host_statistics(ne)
    denominator = np.diagonal(mtm) + alpha
    dead = denominator <= 0
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, by name
        t = np.where(dead, 0.0, np.diagonal(mtr) / np.where(dead, 1.0, denominator))
    if dead.any():
        logger.warning("diag: %d of %d features are zero on all calibration tokens; their scale is set to 0",
                       int(dead.sum()), t.size)
    T = check_transform(np.diag(t), "diag", (
        "a feature's MᵀM diagonal is tiny next to its MᵀR entry (largest |MᵀR| "
        f"{_scale(np.diagonal(mtr)):.3g}, smallest non-zero MᵀM diagonal "
        f"{float(np.min(denominator[~dead], initial=np.inf)):.3g}): overflowing or underflowing "
        "statistics (float16/bfloat16 activations) or a corrupt model. Fix: run the model in "
        "float32, or add a ridge alpha."))
    info = {"solver": "diag", "alpha": alpha, "dead_features": int(dead.sum()), "tokens": int(ne.count),
            "loss": "relative_residual", "seconds": time.perf_counter() - start}
    return SolveResult(T=T, loss_history=(), final_loss=relative_residual(ne, T), info=info)


# ----------------------------------------------------------------------------- orth_diag
# LinearPatch-style T = Q diag(s), Q orthogonal: d(d-1)/2 + d degrees of freedom instead of lstsq's
# d², so it cannot absorb calibration noise the way a full matrix can; it sits between ``diag``
# (scale only) and ``lstsq`` (any matrix). Both factors come in closed form from the same sums:
# Q solves the orthogonal Procrustes problem min_Q ||M Q - R|| (||M Q|| does not depend on an
# orthogonal Q, so Q maximises tr(Qᵀ MᵀR): Q = U Vᵀ from the SVD MᵀR = U Σ Vᵀ); s is then the
# per-channel least squares fit of R by P = M Q: s_j = (Qᵀ MᵀR)_jj / ((Qᵀ MᵀM Q)_jj + α).

def orth_diag(ne: NormalEquations, alpha: float = 0.0) -> SolveResult:
    """T = Q diag(s): Procrustes rotation of the cross term, then a ridge per-channel scale (float64)."""
    start = time.perf_counter()
    alpha = _check_alpha(alpha)
    mtm, mtr, _ = _host_statistics(ne)
    u, sigma, vt = np.linalg.svd(mtr)
    q = u @ vt
    numerator = np.sum(q * mtr, axis=0)                  # diag(Qᵀ MᵀR)
    denominator = np.sum(q * (mtm @ q), axis=0) + alpha  # diag(Qᵀ MᵀM Q) + α
    dead = denominator <= 0
    s = np.where(dead, 0.0, numerator / np.where(dead, 1.0, denominator))
    T = q * s[None, :]
    info = {"solver": "orth_diag", "alpha": alpha, "tokens": int(ne.count), "loss": "relative_residual",
            "procrustes_fit": float(sigma.sum()), "scale_range": [float(s.min()), float(s.max())],
            "seconds": time.perf_counter() - start}
    return SolveResult(T=T, loss_history=(), final_loss=relative_residual(ne, T), info=info)


def relative_residual(ne: NormalEquations, T) -> float:
    """||M T - R||²_F / ||R||²_F from the sums alone, in float64:
    (tr(Tᵀ MᵀM T) - 2 tr(Tᵀ MᵀR) + ||R||²) / ||R||². T [k, d] like MᵀR (a d x d T, or a kernel)."""
    mtm, mtr, rtr = _host_statistics(ne, square=False)
    T = np.asarray(T, np.float64)
    if T.shape != mtr.shape:
        raise ReplaceMeError(f"T must be {list(mtr.shape)} to match the statistics, got {list(T.shape)}")
    if not rtr > 0:
        raise ReplaceMeError("the target R = L - Y is zero on all calibration tokens, so the relative "
                             "residual is undefined; check the cut and the statistics")
    quadratic = np.sum(T * (mtm @ T))
    cross = np.sum(T * mtr)
    return float((quadratic - 2.0 * cross + rtr) / rtr)


# ----------------------------------------------------------------------------------------------
# Gradient solver. Defaults follow the official ReplaceMe cosine recipe (mts-ai/ReplaceMe,
# `adam_method`): Adam, lr 1e-4, batches of 1024 tokens, T initialised to the identity,
# loss 1 - mean cos(M T, L - Y) (the "accurate" variant compares Y + M T with L). The official
# code runs 10 epochs over all calibration tokens; here the step count is explicit (default 300,
# the run config's cosine.steps);
# steps = 10 * len(buffer) // batch_size matches the recipe.

LOSSES = ("cosine", "cosine_accurate", "mse")
OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd}

_TINY = 1e-30   # clamps squared norms so zero rows give a finite loss and gradient


def _token_losses(T, m, y, l, loss: str):
    """Per-token loss [B]: 1 - cos for the cosine losses, squared error for mse."""
    prediction = jnp.matmul(m, T, precision=_HIGHEST)
    if loss == "mse":
        return jnp.sum(jnp.square(prediction - (l - y)), axis=-1)
    a, b = (prediction, l - y) if loss == "cosine" else (y + prediction, l)
    dot = jnp.sum(a * b, axis=-1)
    inverse_norms = lax.rsqrt(jnp.maximum(jnp.sum(a * a, axis=-1), _TINY)) * \
        lax.rsqrt(jnp.maximum(jnp.sum(b * b, axis=-1), _TINY))
    return 1.0 - dot * inverse_norms


def _penalty(T, l1: float, l2: float):
    return l1 * jnp.sum(jnp.abs(T)) + l2 * jnp.sum(jnp.square(T))


@functools.lru_cache(maxsize=None)
def _chunk_runner(loss: str, optimizer: str):
    """A jitted ``run(T, state, m, y, l, lr, l1, l2)`` taking one optimiser step per leading-axis
    slice of (m, y, l) [K, B, d] inside lax.scan, so K steps cost one dispatch. lr, l1 and l2 are
    traced arguments, so one compilation serves every value. (The optimiser state of adam, adamw
    and sgd does not depend on lr, so ``OPTIMIZERS[optimizer](lr).init`` builds it outside.)"""

    def objective(T, m, y, l, l1, l2):
        return jnp.mean(_token_losses(T, m, y, l, loss)) + _penalty(T, l1, l2)

    @jax.jit
    def run(T, state, m, y, l, lr, l1, l2):
        tx = OPTIMIZERS[optimizer](lr)

        def step(carry, batch):
            T, state = carry
            value, grad = jax.value_and_grad(objective)(T, *batch, l1, l2)
            updates, state = tx.update(grad, state, T)
            return (optax.apply_updates(T, updates), state), value

        (T, state), values = lax.scan(step, (T, state), (m, y, l))
        return T, state, values

    return run


@functools.partial(jax.jit, static_argnames="loss")
def _masked_loss_sum(T, m, y, l, valid, loss: str):
    losses = _token_losses(T, m, y, l, loss)
    return jnp.sum(jnp.where(jnp.arange(m.shape[0]) < valid, losses, 0.0))


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ReplaceMeError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def evaluate_loss(source: TokenBuffer, T, *, loss: str = "cosine", l1: float = 0.0, l2: float = 0.0,
                  chunk_tokens: int = 8192) -> float:
    """The ``cosine`` solver's objective at T over every token held by ``source`` (not a sample):
    mean per-token loss (see ``cosine``) plus l1·Σ|T| + l2·ΣT²."""
    _check_loss(loss)
    if len(source) == 0:
        raise ReplaceMeError("the token buffer is empty; add calibration tokens before evaluating")
    T = jnp.asarray(T, jnp.float32)
    m, y, l = source.arrays()
    n = len(m)
    chunk = min(int(chunk_tokens), n)
    parts = []
    for begin in range(0, n, chunk):
        rows = [np.asarray(a[begin:begin + chunk], np.float32) for a in (m, y, l)]
        valid = rows[0].shape[0]
        if valid < chunk:   # pad the tail so every chunk has one shape (one compilation)
            rows = [np.pad(a, ((0, chunk - valid), (0, 0))) for a in rows]
        parts.append(_masked_loss_sum(T, *rows, valid, loss))
    total = sum(float(p) for p in parts)
    return total / n + float(_penalty(T, l1, l2))


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(k for k in range(1, min(n, limit) + 1) if n % k == 0)


def cosine(source: TokenBuffer, *, d: int | None = None, init="identity", loss: str = "cosine",
           optimizer: str = "adam", lr: float = 1e-4, steps: int = 300, batch_size: int = 1024,
           l1: float = 0.0, l2: float = 0.0, seed: int = 0, log_every: int = 50,
           chunk_bytes: int = 128 << 20) -> SolveResult:
    """Train T by minibatch gradient descent on token rows from ``source``.

    Losses (per batch of tokens, averaged): ``"cosine"``: 1 - cos(m T, l - y);
    ``"cosine_accurate"``: 1 - cos(y + m T, l); ``"mse"``: ||m T - (l - y)||². Plus
    l1·Σ|T| + l2·ΣT². ``init`` is ``"identity"`` or a [d, d] array (e.g. the lstsq T).
    ``optimizer`` is one of adam, adamw, sgd (Optax, learning rate ``lr``).

    Batches are drawn uniformly with replacement by a numpy generator seeded with ``seed``; up to
    ``chunk_bytes`` of batches are moved to the device at once and run by one jitted ``lax.scan``.
    ``loss_history`` holds (step, mean batch objective over the last ``log_every`` steps);
    ``final_loss`` and ``info['initial_loss']`` are the objective over all buffered tokens.
    """
    start = time.perf_counter()
    _check_loss(loss)
    if optimizer not in OPTIMIZERS:
        raise ReplaceMeError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    width = source.d
    if d is not None and d != width:
        raise ReplaceMeError(f"cosine solver: d={d} but the token buffer holds rows of width {width}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ReplaceMeError(f"cosine solver: {name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ReplaceMeError(f"cosine solver: lr must be > 0, got {lr}")
    if not (l1 >= 0 and l2 >= 0):
        raise ReplaceMeError(f"cosine solver: l1 and l2 must be >= 0, got l1={l1}, l2={l2}")
    if len(source) == 0:
        raise ReplaceMeError("the token buffer is empty; add calibration tokens before solving")
    if isinstance(init, str):
        if init != "identity":
            raise ReplaceMeError(f"cosine solver: init must be 'identity' or a [d, d] array, got {init!r}")
        T = jnp.eye(width, dtype=jnp.float32)
    else:
        T = jnp.asarray(init, jnp.float32)
        if T.shape != (width, width):
            raise ReplaceMeError(f"cosine solver: init must be [{width}, {width}], got {list(T.shape)}")

    run = _chunk_runner(loss, optimizer)
    state = OPTIMIZERS[optimizer](lr).init(T)
    hyper = (jnp.float32(lr), jnp.float32(l1), jnp.float32(l2))
    initial_loss = evaluate_loss(source, T, loss=loss, l1=l1, l2=l2)
    if not np.isfinite(initial_loss):
        raise ReplaceMeError(
            f"cosine solver: the objective at the initial T is {initial_loss}: the token buffer holds "
            "NaN/inf activations (overflow in float16/bfloat16, or a corrupt model) or the init T is "
            "not finite. Fix: run the model in float32 and check the checkpoint.")
    rng = np.random.default_rng(seed)
    max_chunk_steps = max(1, int(chunk_bytes) // (int(batch_size) * 3 * width * 4))
    history = []
    done = 0
    while done < steps:
        window = min(int(log_every), int(steps) - done)
        # Chunks tile each log window exactly, so at most two chunk shapes are ever compiled.
        k = _largest_divisor_at_most(window, max_chunk_steps)
        values = []
        for _ in range(window // k):
            m, y, l = (np.asarray(a, np.float32).reshape(k, batch_size, width)
                       for a in source.sample(k * batch_size, rng))
            T, state, chunk_values = run(T, state, m, y, l, *hyper)
            values.append(chunk_values)
        done += window
        window_loss = float(jnp.mean(jnp.concatenate(values)))
        if not np.isfinite(window_loss):
            raise ReplaceMeError(
                f"cosine solver diverged: loss {window_loss} at step {done} of {steps} ({optimizer}, "
                f"lr {lr:g}); nothing was exported. Fix: lower lr (e.g. {lr / 10:g}), or start from "
                "init='lstsq'.")
        history.append((done, window_loss))
        logger.info("cosine solver (%s): step %d/%d, loss %.6g", loss, done, steps, window_loss)

    T = check_transform(T, "cosine", (
        f"the {optimizer} optimizer diverged (lr {lr:g}). Fix: lower lr (e.g. {lr / 10:g}), or start "
        "from init='lstsq'."))
    final_loss = evaluate_loss(source, T, loss=loss, l1=l1, l2=l2)
    info = {"solver": "cosine", "loss": loss, "optimizer": optimizer, "lr": float(lr), "steps": int(steps),
            "batch_size": int(batch_size), "l1": float(l1), "l2": float(l2), "seed": int(seed),
            "tokens": len(source), "initial_loss": initial_loss, "seconds": time.perf_counter() - start}
    return SolveResult(T=T, loss_history=tuple(history), final_loss=final_loss, info=info)


def choose_alpha(solve: Callable[..., SolveResult], ne: NormalEquations, validation: NormalEquations,
                 grid) -> SolveResult:
    """The solve over a grid of ridge strengths whose T has the lowest relative residual on the
    ``validation`` sums (the same cut, gathered on held-apart calibration text).

    Each grid value is relative: α = value x tr(MᵀM)/d, the mean squared feature norm of the
    training sums, so one grid fits any model and token count. ``solve(ne, alpha=...)``."""
    d = _check_statistics(ne)
    grid = [float(g) for g in grid]
    if not grid or min(grid) < 0:
        raise ReplaceMeError(f"the alpha grid must hold values >= 0, got {grid}")
    scale = float(np.trace(np.asarray(ne.mtm, np.float64))) / d
    tried = []
    for g in grid:
        result = solve(ne, alpha=g * scale)
        tried.append((relative_residual(validation, result.T), g, result))
    best_residual, best_g, best = min(tried, key=lambda t: (t[0], t[1]))
    info = dict(best.info, alpha_relative=best_g, validation_residual=best_residual,
                alpha_grid=[[g, r] for r, g, _ in tried], validation_tokens=int(validation.count))
    return dataclasses.replace(best, info=info)


# Every estimator of T, by the name ``settings.solver`` uses (cosine_accurate and mse are cosine's
# other losses). The closed-form ones take (NormalEquations, alpha); cosine takes a TokenBuffer.
SOLVERS: dict[str, Callable[..., SolveResult]] = {"lstsq": lstsq, "diag": diag, "orth_diag": orth_diag,
                                                  "cosine": cosine}


def get_solver(name: str) -> Callable[..., SolveResult]:
    """The solver registered under ``name`` (lstsq, diag, orth_diag, cosine)."""
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ReplaceMeError(f"unknown solver {name!r}; known solvers: {', '.join(SOLVERS)}") from None
