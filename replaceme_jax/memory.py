"""Memory model of the statistics pass: bytes per device of parameters, accumulators, activations.

The pass holds, per device:
  parameters     every parameter's shard (shapes x shardings of the plan), resident for the run;
  accumulators   the running sums (MᵀM per anchor, Mᵀ(L-Y) per cut, ...) and their Kahan
                 compensations, split by rows over all devices (``sharding.ACCUMULATOR``);
  partial sums   when the batch is split: one batch's d x d sums, whole on every device, before
                 XLA reduce-scatters them into the accumulators (XLA:CPU all-reduces into a second
                 whole copy); when it is not, each device computes only its own rows;
  activations    the live tensors of one step: the residual stream (h, Y, M) of the block being run,
                 the anchors still waiting for their cut's end (Y_a and M_a in the accumulator dtype;
                 at most n+1 at a time for cuts of n blocks), one block's attention (q, k, v, scores
                 float32, probabilities) or MLP (gate, up, product), and the attention bias / RoPE
                 tables;
  gathered       fsdp only: one block's weights all-gathered for its matmuls;
  upcast         XLA:CPU only: it multiplies bf16/f16 in float32 and keeps a float32 copy of every
                 weight the pass multiplies by (an artefact of the CPU backend, absent on GPU/TPU).

A step first runs the blocks (activations, gathered weights, upcasts live), then reduces the sums
(partial sums live), so its temporaries are the larger of the two. Everything is computed from
shapes (``jax.eval_shape`` of the pass and of the model) and the sharding rules' arithmetic, so
``dry_run`` plans a 70B model on a pod slice from a laptop, without weights or devices.
``xla_memory`` reads XLA's own numbers (``compiled.memory_analysis()``) for comparison: parameters,
sums and batch match XLA's argument sizes to the byte; for Llama-3-8B-shaped steps on 8 simulated
CPU devices the whole step is within 4 % of XLA's total; the activation term alone is an estimate
(within about 30 % where it dominates, on small models). The GPU/TPU terms (two gathered blocks,
two float32 softmax buffers, a true reduce-scatter) are the design's expectations, not yet measured.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax.models import sharding as sh
from replaceme_jax.models.config import ModelConfig
from replaceme_jax.models.modeling import abstract_model, layer_windows

@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """Bytes per device of one statistics pass (every device holds the same amount)."""
    mesh: tuple[int, int]
    rules: str
    backend: str
    batch_shape: tuple[int, int]
    accum_dtype: str
    parameters: int       # all parameters' shards, resident for the whole run
    step_parameters: int  # the part the pass reads (not the LM head or final norm)
    accumulators: int
    partial_sums: int
    activations: int
    gathered: int
    upcast: int
    batch: int

    @property
    def temporaries(self) -> int:
        """The larger of the two phases of a step: running the blocks, then reducing the sums."""
        return max(self.activations + self.gathered + self.upcast, self.partial_sums)

    @property
    def peak(self) -> int:
        return self.parameters + self.accumulators + self.batch + self.temporaries

    @property
    def step(self) -> int:
        """What XLA accounts for the compiled step: its arguments plus its temporaries."""
        return self.peak - (self.parameters - self.step_parameters)

    @classmethod
    def from_dict(cls, entry: dict) -> "MemoryModel":
        """Inverse of ``to_dict`` (e.g. a run report's ``memory.per_device``)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items() if k in fields}
        return cls(**values)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(temporaries=self.temporaries, peak=self.peak, step=self.step)
        return out

    def format(self) -> str:
        d, m = self.mesh
        b, t = self.batch_shape
        rows = [("parameters", self.parameters), ("accumulators (sums + Kahan)", self.accumulators),
                ("partial sums of a batch", self.partial_sums), ("activations", self.activations),
                ("gathered weights (fsdp)", self.gathered), ("float32 weight copies (XLA:CPU)", self.upcast),
                ("batch", self.batch), ("peak", self.peak)]
        lines = [f"memory per device: mesh {d}x{m} ({self.rules}), {self.backend}, batch {b}x{t}, "
                 f"sums in {self.accum_dtype}"]
        lines += [f"  {name:<32s} {format_bytes(v):>10s}" for name, v in rows if v or name == "peak"]
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.2f} {unit}"


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize


def _shard_bytes(shape, dtype, logical, rules, axis_sizes) -> int:
    spec = sh.logical_to_spec(logical, shape, rules, axis_sizes)
    return _nbytes(sh.shard_shape(shape, spec, axis_sizes), dtype)


def _split(dim: int, logical: str, rules, axis_sizes) -> int:
    """Size of one device's share of a dimension of logical axis ``logical``."""
    spec = sh.logical_to_spec((logical,), (dim,), rules, axis_sizes)
    return sh.shard_shape((dim,), spec, axis_sizes)[0]


def statistics_memory(config: ModelConfig, request, batch_shape: Sequence[int], *,
                      mesh_shape: Sequence[int] = (1, 1), rules: str = "fsdp",
                      backend: str | None = None) -> MemoryModel:
    """The memory model of ``gather_statistics(model, batches of batch_shape, request, plan)``.

    ``mesh_shape`` = (data, model) and ``rules`` as in ``sharding.ShardingPlan``; ``backend``
    defaults to JAX's (it decides "auto" accumulation and the XLA:CPU terms).
    """
    from replaceme_jax.checkpoints.keymap import param_items
    from replaceme_jax.replaceme.statistics import sum_shapes

    backend = backend or jax.default_backend()
    cpu = backend == "cpu"
    rule_table = sh.rule_set(rules)
    sizes = dict(zip(sh.MESH_AXES, (int(x) for x in mesh_shape)))
    b, t = (int(x) for x in batch_shape)
    c = config
    acc_name = request.accum_dtype
    if acc_name == "auto":
        acc_name = "float32" if backend == "tpu" else "float64"
    request = dataclasses.replace(request, accum_dtype=acc_name)
    depth = request.depth(c.num_hidden_layers)
    ci, ai = jnp.dtype(c.dtype).itemsize, jnp.dtype(acc_name).itemsize
    pi = jnp.dtype(c.param_dtype).itemsize
    upcasts = cpu and pi < 4  # XLA:CPU multiplies bf16/f16 in float32

    model = abstract_model(config)
    parameters = step_parameters = block_elements = block_shard_elements = 0
    for path, var in param_items(model):
        shard = _shard_bytes(var.shape, var.dtype, sh.param_logical_axes(path), rule_table, sizes)
        parameters += shard
        in_step = path[0] == "model" and path[1] != "norm" and (path[1] != "layers" or path[2] < depth)
        step_parameters += shard if in_step else 0
        if path[1:3] == ("layers", 0) and path[-1] == "kernel":
            block_elements += int(np.prod(var.shape))
            block_shard_elements += shard // pi

    with jax.enable_x64(acc_name == "float64"):
        sums = sum_shapes(model, request, depth, (b, t))
    accumulators = partial_sums = 0
    for sds in sums.values():
        logical = sh.ACCUMULATOR if len(sds.shape) == 3 else (None,) * len(sds.shape)
        accumulators += 2 * _shard_bytes(sds.shape, sds.dtype, logical, rule_table, sizes)
        partial_sums += _nbytes(sds.shape, sds.dtype) if len(sds.shape) == 3 else 0
    # With the batch split, every device first sums its own tokens into whole d x d partials, then
    # XLA reduce-scatters them (XLA:CPU all-reduces into a second whole copy, then slices).
    # Unsplit, each device computes just its own rows and no whole partial exists.
    bl = _split(b, "activation_batch", rule_table, sizes)
    n_dev = sizes["data"] * sizes["model"]
    partial_sums = (0 if bl == b else partial_sums * 2 if cpu else partial_sums + partial_sums // n_dev)

    # One device's share of a step's tensors while it runs the blocks.
    tokens, d, hd = bl * t, c.hidden_size, c.head_dim
    heads = max(_split(c.num_attention_heads * hd, "activation_heads", rule_table, sizes) // hd, 1)
    kv = max(_split(c.num_key_value_heads * hd, "activation_heads", rule_table, sizes) // hd, 1)
    ff = _split(c.intermediate_size, "activation_mlp", rule_table, sizes)
    residual = 3 * tokens * d * ci                                  # h, Y, M of the running block
    max_cut = max([e - s for s, e in request.cuts], default=-1)
    live_anchors = min(len(request.anchors), max_cut + 1)           # cuts of n blocks: n + 1 anchors
    anchors = (live_anchors * 2 * tokens * d * ci                   # Y_a, M_a waiting for their cut
               + (2 * tokens * d * ai if request.cuts else 0))     # converted operands of one sum
    # Softmax over [B, H, T, T]: XLA:CPU keeps about three float32 buffers (scores, scaled + biased,
    # exponentials) besides the probabilities; fused GPU/TPU kernels keep two.
    softmax_f32 = 3 if cpu else 2
    attention = (tokens * (heads + 2 * kv) * hd * ci                # q, k, v
                 + bl * heads * t * t * (softmax_f32 * 4 + ci)     # scores ... probabilities
                 + tokens * heads * hd * ci)                        # output before o_proj
    mlp = tokens * d * ci + 3 * tokens * ff * ci                    # input, gate, up, product
    tables = len(set(layer_windows(config))) * bl * t * t * 4 + 2 * tokens * hd * 4  # bias, cos, sin
    activations = residual + anchors + max(attention, mlp) + tables

    # XLA:CPU converts each bf16 weight shard to float32 up front, and under fsdp all-gathers every
    # block's weights up front too (in float32 when converted). GPU/TPU schedulers gather one block
    # ahead of the one running: two blocks' weights at a time, in the parameter dtype.
    upcast = block_shard_elements * 4 * depth if upcasts else 0
    gathered = 0
    if rules == "fsdp" and sizes["model"] > 1:
        gathered = block_elements * (4 if upcasts else pi) * depth if cpu else 2 * block_elements * pi
    batch = 2 * _shard_bytes((b, t), jnp.int32, sh.BATCH, rule_table, sizes)
    return MemoryModel(mesh=(sizes["data"], sizes["model"]), rules=rules, backend=backend,
                       batch_shape=(b, t), accum_dtype=acc_name, parameters=parameters,
                       step_parameters=step_parameters, accumulators=accumulators,
                       partial_sums=partial_sums, activations=activations, gathered=gathered,
                       upcast=upcast, batch=batch)


def xla_memory(compiled) -> dict:
    """XLA's own accounting of a compiled step, bytes per device (None fields where unavailable)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def compile_statistics_step(config: ModelConfig, request, batch_shape: Sequence[int], plan):
    """The pass's jitted step for ``plan`` compiled from shapes alone (no weights are allocated):
    XLA's own plan of the step, for ``xla_memory``. Needs the plan's devices, unlike the model."""
    from flax import nnx

    from replaceme_jax.replaceme.statistics import _compiled_step, sum_shapes
    acc_name = request.resolved_accum_dtype()
    request = dataclasses.replace(request, accum_dtype=acc_name)
    depth = request.depth(config.num_hidden_layers)
    model = abstract_model(config)
    graphdef, state = nnx.split(model)
    flat = [(path, var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=plan.place(path, var))))
            for path, var in nnx.to_flat_state(state)]
    state = nnx.from_flat_state(flat)
    ids = jax.ShapeDtypeStruct(tuple(batch_shape), jnp.int32, sharding=plan.sharding(sh.BATCH, batch_shape))
    with jax.enable_x64(acc_name == "float64"):
        acc = {}
        for k, sds in sum_shapes(model, request, depth, batch_shape).items():
            for name in (k, k + "/comp"):
                acc[name] = jax.ShapeDtypeStruct(sds.shape, sds.dtype,
                                                 sharding=plan.accumulator_sharding(sds.shape))
        step = _compiled_step(graphdef, request, depth, plan)
        return step.lower(state, acc, ids, ids).compile()


def device_peak_bytes() -> int | None:
    """Largest ``peak_bytes_in_use`` over local devices (GPU/TPU runtimes report it; CPU does not)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def run_requests(cfg, depth: int) -> list:
    """The statistics passes a run config makes, as requests: the candidate pass (distances, and
    every cut's normal equations with candidates=all), then, when the chosen cuts were not among
    the candidates, a pass for them (modelled as ``num_transforms`` cuts of ``num_blocks`` blocks
    ending at the last block of the ``depth``-block model, the deepest and so the largest such pass)."""
    from replaceme_jax.replaceme.statistics import statistics_request
    from replaceme_jax.replaceme.statistics import StatsRequest
    first = statistics_request(cfg, depth)
    n, k = int(cfg.num_blocks), max(int(cfg.num_transforms), 1)
    cuts = []
    for i in range(k):
        end = depth - i * (n + 1)
        if end - n >= 1:
            cuts.append((end - n, end))
    if cfg.candidates == "all" or not cuts:
        return [first]
    return [first, StatsRequest(cuts=tuple(cuts), include_pad=first.include_pad, accum_dtype=first.accum_dtype)]


def refit_memory(config: ModelConfig, request, batch_shape: Sequence[int], **kw) -> MemoryModel:
    """The anchor kernel re-fit's pass (``replaceme/refit.py``) for one cut of ``request``: the blocks
    to the cut's end like a one-cut statistics pass, with d_ff x d_ff and d_ff x d sums instead
    (split by rows over every device like the pass's d x d sums)."""
    base = statistics_memory(config, dataclasses.replace(request, cuts=request.cuts[:1], max_distance_blocks=0),
                             batch_shape, **kw)
    sizes = dict(zip(sh.MESH_AXES, (int(x) for x in kw.get("mesh_shape", (1, 1)))))
    rule_table = sh.rule_set(kw.get("rules", "fsdp"))
    f, d = config.intermediate_size, config.hidden_size
    acc = jnp.dtype(base.accum_dtype)
    shapes = [(1, f, f), (1, f, d)]
    accumulators = sum(2 * _shard_bytes(s, acc, sh.ACCUMULATOR, rule_table, sizes) for s in shapes)
    return dataclasses.replace(base, accumulators=accumulators, partial_sums=sum(_nbytes(s, acc) for s in shapes))


def run_memory(cfg, config: ModelConfig, batch_shape: Sequence[int], backend: str | None = None) -> MemoryModel:
    """The memory model of a run config's largest pass (statistics, and the anchor kernel re-fit's)."""
    kw = dict(mesh_shape=_mesh_shape(cfg), rules=cfg.mesh.get("rules", "fsdp"), backend=backend)
    requests = run_requests(cfg, config.num_hidden_layers)
    models = [statistics_memory(config, request, batch_shape, **kw) for request in requests]
    refit = cfg.get("refit", {})
    # refit.downstream's passes hold the same sums; their one extra [b, t, d] stream (the dense target)
    # is not counted, small beside the d_ff activations the anchor's pass model already holds
    if (refit.get("anchor", False) or refit.get("downstream", 0)) and requests[-1].cuts:
        models.append(refit_memory(config, requests[-1], batch_shape, **kw))
    return max(models, key=lambda m: m.peak)


def run_memory_report(cfg, config: ModelConfig, batches) -> dict:
    """The report's "memory" entry: bytes per device of the run's largest statistics pass at its
    largest batch shape (see ``MemoryModel``), and the runtime's own peak where the backend has one."""
    shape = max((tuple(np.shape(b.input_ids)) for b in batches), key=lambda s: s[0] * s[1])
    return {"per_device": run_memory(cfg, config, shape).to_dict(), "runtime_peak_bytes": device_peak_bytes()}


def _mesh_shape(cfg) -> tuple[int, int]:
    data, model = int(cfg.mesh.data), int(cfg.mesh.model)
    if -1 in (data, model):  # "all remaining devices": those of this machine (or of the job)
        n = jax.device_count()
        data, model = (n // model, model) if data == -1 else (data, n // data)
    return data, model


def dry_run(cfg, backend: str | None = None) -> MemoryModel:
    """Memory per device of a run config's largest statistics pass, from shapes alone (no weights;
    devices are only counted, for a -1 mesh axis). ``backend`` ("gpu", "tpu", "cpu"; default: this
    machine's) is the one to plan for."""
    from replaceme_jax.checkpoints import load_config
    config = load_config(cfg.model, architecture=cfg.get("architecture") or None,
                         param_dtype=cfg.param_dtype, dtype=cfg.dtype)
    cal = cfg.calibration
    return run_memory(cfg, config, (int(cal.batch_size), int(cal.max_length)), backend=backend)


__all__ = ["MemoryModel", "statistics_memory", "compile_statistics_step", "xla_memory", "device_peak_bytes",
           "dry_run", "run_memory", "refit_memory", "run_requests", "run_memory_report", "format_bytes"]
