"""One jitted pass over calibration batches -> an immutable ``Statistics`` of sums.

Per block k the model gives Y_k (attention residual), M_k (MLP output before the residual add) and
L_k = Y_k + M_k. For a cut [s, e) with anchor a = s - 1 the least-squares transform needs only the
d x d sums MᵀM (per anchor) and Mᵀ(L_{e-1} - Y_a) plus ‖L_{e-1} - Y_a‖² (per cut); the angular
distance between block outputs h_s and h_{s+n} on each sequence's last real token drives the
paper's selection rule. Everything is a running sum, so memory is flat in the number of tokens and
sharding over the batch is a reduction. Sums are float64 by default (float32 with Kahan compensation across batches on TPU; ``accum_dtype``).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import threading
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from replaceme_jax.data.batching import MAX_SEGMENTS
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme.cuts import Cut, candidate_cuts, validate_cuts
from replaceme_jax.models.sharding import RESIDUAL, constrain, to_host

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class StatsRequest:
    """What one pass gathers: distances for n = 1..max_distance_blocks, normal equations for ``cuts``."""
    max_distance_blocks: int = 0
    cuts: tuple[Cut, ...] = ()
    include_pad: bool = False  # True reproduces the official code, which counts pad tokens
    # Dtype of the d x d sums. float64 makes T match a float64 solve to ~1e-7 (CPU/GPU); float32 with
    # Kahan compensation across batches is the fast choice on TPU. "auto": float64 except on TPU.
    accum_dtype: str = "auto"

    def resolved_accum_dtype(self) -> str:
        if self.accum_dtype == "auto":
            return "float32" if jax.default_backend() == "tpu" else "float64"
        if self.accum_dtype not in ("float32", "float64"):
            raise ReplaceMeError(f"accum_dtype={self.accum_dtype!r}: use 'auto', 'float32' or 'float64'")
        return self.accum_dtype

    def depth(self, num_blocks: int) -> int:
        """Number of blocks the pass must run (it never runs the LM head)."""
        deepest = max([e for _, e in self.cuts], default=0)
        return num_blocks if self.max_distance_blocks else deepest

    @property
    def anchors(self) -> tuple[int, ...]:
        return tuple(sorted({s - 1 for s, _ in self.cuts}))


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Sums gathered by one pass (host numpy, float64 where it matters)."""
    num_blocks: int
    request: StatsRequest
    num_sequences: int
    num_tokens: int
    distance_sum: np.ndarray | None  # [max_n, num_blocks]: sum over sequences, entry (n-1, s)
    gram: np.ndarray                 # [num_anchors, d, d]  MᵀM
    cross: np.ndarray                # [num_cuts, d, d]     Mᵀ(L - Y)
    target_sq: np.ndarray            # [num_cuts]           ‖L - Y‖²
    # [depth + 1]: ‖h_k‖² summed over the weighted tokens, h_0 the embeddings (the residual stream's
    # energy after each block: the scale a cut's error is measured against when cuts are combined)
    stream_sq: np.ndarray | None = None

    @property
    def distances(self) -> np.ndarray | None:
        """Mean angular distance [max_n, num_blocks]; NaN where the cut would pass the last block."""
        if self.distance_sum is None:
            return None
        out = self.distance_sum / max(self.num_sequences, 1)
        n = np.arange(1, out.shape[0] + 1)[:, None]
        s = np.arange(out.shape[1])[None, :]
        return np.where(s + n <= self.num_blocks, out, np.nan)

    def normal_equations(self, cut: Cut):
        from replaceme_jax.replaceme.solvers import NormalEquations
        cut = (int(cut[0]), int(cut[1]))
        if cut not in self.request.cuts:
            raise ReplaceMeError(f"no normal equations were gathered for cut {cut}; gathered: {self.request.cuts}")
        c = self.request.cuts.index(cut)
        a = self.request.anchors.index(cut[0] - 1)
        return NormalEquations(mtm=self.gram[a], mtr=self.cross[c], rtr=float(self.target_sq[c]),
                               count=int(self.num_tokens))

    def stream_energy(self, block: int) -> float:
        """Mean ‖h_block‖² per token (h_0: the embeddings; h_k: the output of block k - 1)."""
        if self.stream_sq is None or block >= len(self.stream_sq):
            raise ReplaceMeError(f"these statistics hold no stream energy for block output {block}; gather "
                                 "them again (statistics saved before the budget selection lack it)")
        return float(self.stream_sq[block]) / max(self.num_tokens, 1)

    def check_finite(self):
        for name in ("gram", "cross", "target_sq", "distance_sum", "stream_sq"):
            arr = getattr(self, name)
            if arr is not None and arr.size and not np.isfinite(arr).all():
                raise ReplaceMeError(
                    f"non-finite values (NaN/inf) in the gathered statistics ({name}). The model overflowed "
                    "on the calibration data: use dtype=float32, check the checkpoint, or shorten max_length.")


def add_statistics(a: Statistics, b: Statistics) -> Statistics:
    """The statistics of both passes' tokens together (every field is a sum): passes over disjoint
    batches, e.g. growing calibration sets or several hosts' shares, combine without re-running."""
    if a.request != b.request or a.num_blocks != b.num_blocks:
        raise ReplaceMeError("cannot add statistics of different requests or models; gather them with one request")
    both = lambda x, y: None if x is None else x + y  # noqa: E731
    return dataclasses.replace(
        a, num_sequences=a.num_sequences + b.num_sequences, num_tokens=a.num_tokens + b.num_tokens,
        distance_sum=both(a.distance_sum, b.distance_sum), gram=a.gram + b.gram, cross=a.cross + b.cross,
        target_sq=a.target_sq + b.target_sq, stream_sq=both(a.stream_sq, b.stream_sq))


def _kahan_add(total, comp, x):
    """Compensated summation: keeps float32 running sums accurate over thousands of batches."""
    y = x - comp
    t = total + y
    return t, (t - total) - y


def _last_tokens(h, last_idx):
    """h [B, T, d], last_idx [B, S] -> [B, S, d]."""
    return jnp.take_along_axis(h, last_idx[..., None], axis=1)


def _segment_ends(attention_mask):
    """(index of each sequence's last real token [B, S], slot holds a sequence [B, S]) for
    S = MAX_SEGMENTS slots per row: right or left padding, packed rows alike."""
    seg_ids = jnp.arange(1, MAX_SEGMENTS + 1, dtype=attention_mask.dtype)
    t_idx = jnp.arange(attention_mask.shape[-1])
    hit = attention_mask[:, None, :] == seg_ids[None, :, None]  # [B, S, T]
    last = jnp.max(jnp.where(hit, t_idx, -1), axis=-1)
    return jnp.maximum(last, 0), (last >= 0).astype(jnp.float32)


def _batch_sums(model, input_ids, attention_mask, request: StatsRequest, depth: int, plan=None):
    """Sums for one batch (traced inside jit); ``plan`` pins the residual stream's sharding."""
    acc = jnp.dtype(request.resolved_accum_dtype())
    mask = (attention_mask > 0).astype(jnp.float32)
    row_valid = (mask.sum(-1) > 0).astype(jnp.float32)
    # Token weights: real tokens only, or every position of a row holding a sequence.
    w = (row_valid[:, None] * jnp.ones_like(mask)) if request.include_pad else mask
    cos, sin, biases = model.attention_inputs(attention_mask)
    h = constrain(model.embed(input_ids), plan, RESIDUAL)
    d = h.shape[-1]
    last_idx, seq_valid = _segment_ends(attention_mask)
    lasts = [_last_tokens(h, last_idx).astype(jnp.float32)]
    energy = lambda x: jnp.sum(w * jnp.sum(jnp.square(x.astype(jnp.float32)), -1))  # noqa: E731
    stream = [energy(h)]
    anchors, cuts = request.anchors, request.cuts
    keep = {}
    cross, target_sq = [None] * len(cuts), [None] * len(cuts)
    pin = lambda x: constrain(x, plan, RESIDUAL)  # noqa: E731
    for k, y, m, h in model.blocks(h, cos, sin, biases, depth=depth, residual=pin):
        if k in anchors:
            keep[k] = (y.astype(acc), m.astype(acc) * w[..., None].astype(acc))
        for c, (s, e) in enumerate(cuts):
            if e - 1 == k:
                y_a, mw_a = keep[s - 1]
                r = h.astype(acc) - y_a
                cross[c] = jnp.einsum("btd,bte->de", mw_a, r, precision=_HI)
                target_sq[c] = jnp.sum(w[..., None].astype(acc) * r * r)
        stream.append(energy(h))
        if request.max_distance_blocks:
            lasts.append(_last_tokens(h, last_idx).astype(jnp.float32))
    out = {
        "stream_sq": jnp.stack(stream).astype(acc),
        "gram": (jnp.stack([jnp.einsum("btd,bte->de", keep[a][1], keep[a][1], precision=_HI) for a in anchors])
                 if anchors else jnp.zeros((0, d, d), acc)),
        "cross": jnp.stack(cross) if cuts else jnp.zeros((0, d, d), acc),
        "target_sq": jnp.stack(target_sq) if cuts else jnp.zeros((0,), acc),
        "tokens": jnp.sum(w),
        "sequences": jnp.sum(seq_valid),
    }
    if request.max_distance_blocks:
        u = jnp.stack(lasts)  # [depth + 1, B, S, d]: h_0 (embeddings) .. h_depth
        u = u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
        rows = []
        for n in range(1, request.max_distance_blocks + 1):
            cosine = jnp.clip(jnp.sum(u[:-n] * u[n:], axis=-1), -1.0, 1.0)  # [depth + 1 - n, B, S]
            dist = (jnp.arccos(cosine) / jnp.pi * seq_valid).sum((-2, -1))
            rows.append(jnp.pad(dist, (0, depth - dist.shape[0]))[:depth])
        out["distance_sum"] = jnp.stack(rows)
    return out


@functools.lru_cache(maxsize=32)
def _compiled_step(graphdef, request: StatsRequest, depth: int, plan=None):
    def step(state, acc, input_ids, attention_mask):
        model = nnx.merge(graphdef, state)
        sums = _batch_sums(model, input_ids, attention_mask, request, depth, plan)
        new = {}
        for k, x in sums.items():
            if plan is not None:  # each device keeps its rows of a d x d sum: XLA reduce-scatters into them
                x = plan.constrain_accumulator(x)
            new[k], new[k + "/comp"] = _kahan_add(acc[k], acc[k + "/comp"], x)
        # A scalar of this step's own (not donated to the next step) to wait on: see _InFlight.
        return new, new["sequences"] + 0
    return jax.jit(step, donate_argnums=(1,))


def sum_shapes(model, request: StatsRequest, depth: int, batch_shape) -> dict:
    """{name: ShapeDtypeStruct} of one batch's sums, by tracing the pass abstractly (no compute)."""
    graphdef, state = nnx.split(model)
    ids = jax.ShapeDtypeStruct(tuple(batch_shape), jnp.int32)
    return jax.eval_shape(lambda st, i, m: _batch_sums(nnx.merge(graphdef, st), i, m, request, depth),
                          state, ids, ids)


def _zeros_like_sums(model, request: StatsRequest, depth: int, batch, plan=None):
    shapes = sum_shapes(model, request, depth, np.shape(batch.input_ids))
    acc = {}
    for k, sds in shapes.items():
        for name in (k, k + "/comp"):
            acc[name] = (jnp.zeros(sds.shape, sds.dtype) if plan is None else
                         plan.zeros(sds.shape, sds.dtype, plan.accumulator_sharding(sds.shape)))
    return acc


def gather_statistics(model, batches: Iterable, request: StatsRequest, *, progress: bool = False,
                      plan=None) -> Statistics:
    """Run the pass over ``batches`` (objects with ``input_ids``/``attention_mask`` [B, T]).

    ``plan`` (a ``models.sharding.ShardingPlan``) runs it SPMD on a mesh: parameters on their
    shardings, batches split over the batch axes, sums split by rows; None is one device.
    """
    num_blocks = model.config.num_hidden_layers
    request = dataclasses.replace(request, cuts=validate_cuts(request.cuts, num_blocks))
    if request.max_distance_blocks >= num_blocks:
        raise ReplaceMeError(f"cannot measure distances over {request.max_distance_blocks} blocks of a "
                             f"{num_blocks}-block model; use fewer blocks")
    if not request.cuts and not request.max_distance_blocks:
        raise ReplaceMeError("empty statistics request: ask for distances or at least one cut")
    batches = list(batches)
    if not batches:
        raise ReplaceMeError("no calibration batches: the calibration data is empty or too short")
    depth = request.depth(num_blocks)
    if plan is not None:
        model = plan.shard_model(model)  # no copy when the parameters are already placed
    graphdef, state = nnx.split(model)
    step = _compiled_step(graphdef, request, depth, plan)
    # x64 is switched on only around this pass (and only for the float64 sums): the model's own
    # dtypes are explicit, so its computation is unchanged.
    with jax.enable_x64(request.resolved_accum_dtype() == "float64"):
        total = sum_batches(step, state, _zeros_like_sums(model, request, depth, batches[0], plan), batches,
                            plan=plan, desc="statistics pass", progress=progress)
    if total["sequences"] <= 0:
        raise ReplaceMeError("calibration batches hold no tokens: the calibration data is empty or too short")
    stats = Statistics(
        num_blocks=num_blocks, request=request,
        num_sequences=int(round(total["sequences"])), num_tokens=int(round(total["tokens"])),
        distance_sum=total.get("distance_sum"), gram=total["gram"], cross=total["cross"],
        target_sq=total["target_sq"], stream_sq=total["stream_sq"])
    stats.check_finite()
    return stats


def sum_batches(step, state, acc: dict, batches, *, plan=None, desc: str, progress: bool = False,
                extra=()) -> dict:
    """Run a jitted ``step(state, acc, *extra, ids, mask) -> (acc, done)`` over ``batches`` with ``acc``'s
    Kahan-compensated sums (each name beside its ``name/comp``), and return the totals as float64 host
    arrays with the last compensation folded in. Call inside ``jax.enable_x64`` for float64 sums."""
    put = jnp.asarray if plan is None else plan.put_batch
    with _InFlight(len(batches), desc, progress) as flight:
        for batch in batches:
            acc, done = step(state, acc, *extra, put(np.asarray(batch.input_ids, np.int32)),
                             put(np.asarray(batch.attention_mask, np.int32)))
            flight.push(done)
        flight.drain()
        return {k: to_host(v).astype(np.float64) - to_host(acc[k + "/comp"]).astype(np.float64)
                for k, v in acc.items() if not k.endswith("/comp")}


def statistics_request(cfg, depth: int) -> StatsRequest:
    """What the one pass over a ``depth``-block model gathers for these settings."""
    from replaceme_jax.settings import Settings, check_against_model
    cfg = Settings.from_config(cfg)
    check_against_model(cfg, depth)
    if cfg.candidates != "all":
        cuts = ()
    elif cfg.budget.blocks:
        from replaceme_jax.replaceme.budgets import budget_cuts
        b = cfg.budget
        cuts = budget_cuts(depth, b.blocks, b.max_cuts, b.min_cut_blocks)
    else:
        cuts = candidate_cuts(depth, cfg.num_blocks)
    return StatsRequest(max_distance_blocks=depth - 1, cuts=cuts,
                        include_pad=cfg.calibration.include_pad, accum_dtype=cfg.accum_dtype)


@functools.lru_cache(maxsize=32)
def _compiled_token_step(graphdef, cut: Cut):
    def step(state, input_ids, attention_mask):
        model = nnx.merge(graphdef, state)
        cos, sin, biases = model.attention_inputs(attention_mask)
        s, e = cut
        for k, y, m, h in model.blocks(model.embed(input_ids), cos, sin, biases, depth=e):
            if k == s - 1:
                y_a, m_a = y, m
        return m_a.astype(jnp.float32), y_a.astype(jnp.float32), h.astype(jnp.float32)
    return jax.jit(step)


def gather_tokens(model, batches: Iterable, cut: Cut, buffer, *, include_pad: bool = False,
                  progress: bool = False, plan=None):
    """Stream (M_a, Y_a, L_{e-1}) rows of real tokens for ``cut`` into a bounded ``TokenBuffer``.

    Only the cosine-type solvers need tokens; the buffer keeps a uniform sample within its budget.
    ``plan`` as in ``gather_statistics``.
    """
    (cut,) = validate_cuts([cut], model.config.num_hidden_layers)
    if plan is not None:
        model = plan.shard_model(model)
    graphdef, state = nnx.split(model)
    step = _compiled_token_step(graphdef, cut)
    batches = list(batches)
    put = jnp.asarray if plan is None else plan.put_batch

    def consume(item):  # in dispatch order, so the buffer's sample does not depend on timing
        outs, mask = item
        m, y, l = (to_host(a)[:len(mask)] for a in outs)
        if include_pad:
            mask = np.broadcast_to(mask.any(-1, keepdims=True), mask.shape)
        buffer.add(m[mask], y[mask], l[mask])

    with _InFlight(len(batches), f"tokens for cut {cut}", progress, consume=consume) as flight:
        for batch in batches:
            mask = np.asarray(batch.attention_mask) > 0
            flight.push((step(state, put(batch.input_ids), put(batch.attention_mask)), mask))
        flight.drain()
    return buffer


class _InFlight:
    """Bounds the jitted steps queued ahead of the host and counts only FINISHED batches.

    JAX dispatches asynchronously: a loop that never waits queues every batch at once, so the
    progress bar runs ahead of the work and an interrupt takes effect only after the whole queue
    (or not cleanly at all). Waiting for step i-1 right after dispatching step i keeps one step
    queued behind the running one (no idle device between steps) and an interrupt within about one
    step. ``consume`` (default: wait) takes each finished item in order.
    """

    def __init__(self, total: int, desc: str, progress: bool, *, ahead: int = 1, consume=None):
        self.ahead, self.consume = ahead, consume or jax.block_until_ready
        self.pending: collections.deque = collections.deque()
        self.bar = None
        self._stop = threading.Event()
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="batch")
            # The first step includes XLA compilation (tens of seconds on a small CPU): redraw the
            # bar's elapsed time meanwhile, so a long stretch is never silent.
            threading.Thread(target=self._heartbeat, daemon=True).start()

    def _heartbeat(self, every_s: float = 10.0) -> None:
        while not self._stop.wait(every_s):
            with contextlib.suppress(Exception):  # a closed stream must not kill the run
                self.bar.refresh()

    def __enter__(self):
        return self

    def push(self, item) -> None:
        self.pending.append(item)
        while len(self.pending) > self.ahead:
            self._finish_one()

    def drain(self) -> None:
        while self.pending:
            self._finish_one()

    def _finish_one(self) -> None:
        self.consume(self.pending.popleft())
        if self.bar is not None:
            self.bar.update(1)

    def __exit__(self, *exc):
        self.pending.clear()
        self._stop.set()
        if self.bar is not None:
            self.bar.close()
        return False
