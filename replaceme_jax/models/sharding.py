"""Device mesh and MaxText-style logical-axis sharding rules for the decoder family.

Every array of the model and of the statistics pass carries *logical* axis names: an up-projection
kernel is ``("embed", "mlp")``, the residual stream ``("activation_batch", "activation_length",
"activation_embed")``, a d x d running sum ``("accum_stack", "accum_rows", "accum_cols")``. A rule
set maps each logical name to mesh axes of a 2-D mesh ``("data", "model")``; jit and XLA's SPMD
partitioner do the rest (no hand-written collectives). Two rule sets:

  fsdp    parameters split along d_model ("embed") over the model axis, batches over every device:
          XLA all-gathers a block's weights where they are used (ZeRO-3). Works for any head count.
  tensor  Megatron-style tensor parallelism: attention heads, MLP units and vocabulary over the model
          axis, batches over the data axis; activations inside a block are split by head / unit.

The data axis is plain data parallelism in both (parameters replicated along it), so it can span
hosts or slices with slow links. The d x d accumulators are split by rows over all devices: each
device holds 1/N of every sum and XLA reduce-scatters the per-batch partial sums into it.

A dimension the mapped mesh axes do not divide falls back to the longest prefix of them that does
(ultimately replicated), so every model runs on every mesh, only less evenly. The default 1 x 1
mesh is a single device.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from replaceme_jax.errors import ReplaceMeError

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "model")
Rules = tuple[tuple[str, tuple[str, ...]], ...]

# Logical axes of the activations and sums the pipeline constrains (names as in MaxText).
BATCH = ("activation_batch", "activation_length")                       # input_ids / mask [B, T]
RESIDUAL = ("activation_batch", "activation_length", "activation_embed")  # h, Y, M [B, T, d]
ACCUMULATOR = ("accum_stack", "accum_rows", "accum_cols")              # MᵀM, Mᵀ(L-Y) [n, d, d]

_SHARED = (
    ("norm", ()), ("head_dim", ()),
    ("activation_length", ()), ("activation_embed", ()),
    ("accum_stack", ()), ("accum_rows", ("data", "model")), ("accum_cols", ()),
    ("cache_length", ()),
)
RULE_SETS: dict[str, Rules] = {
    "fsdp": (
        ("vocab", ()), ("embed", ("model",)), ("heads", ()), ("kv_heads", ()), ("mlp", ()),
        ("activation_batch", ("data", "model")), ("activation_heads", ()), ("activation_mlp", ()),
        ("activation_kv_heads", ()),
        *_SHARED),
    "tensor": (
        ("vocab", ("model",)), ("embed", ()), ("heads", ("model",)), ("kv_heads", ("model",)),
        ("mlp", ("model",)),
        ("activation_batch", ("data",)), ("activation_heads", ("model",)), ("activation_mlp", ("model",)),
        ("activation_kv_heads", ("model",)),
        *_SHARED),
}

# Logical axes of every parameter, keyed by (module attribute, leaf) of its NNX path. A bias follows
# its kernel's output axis.
_PARAM_AXES = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q_proj", "kernel"): ("embed", "heads"), ("q_proj", "bias"): ("heads",),
    ("k_proj", "kernel"): ("embed", "kv_heads"), ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "kernel"): ("embed", "kv_heads"), ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "kernel"): ("heads", "embed"), ("o_proj", "bias"): ("embed",),
    ("gate_proj", "kernel"): ("embed", "mlp"), ("gate_proj", "bias"): ("mlp",),
    ("up_proj", "kernel"): ("embed", "mlp"), ("up_proj", "bias"): ("mlp",),
    ("down_proj", "kernel"): ("mlp", "embed"), ("down_proj", "bias"): ("embed",),
    ("input_layernorm", "weight"): ("norm",),
    ("post_attention_layernorm", "weight"): ("norm",),
    ("norm", "weight"): ("norm",),
    ("q_norm", "weight"): ("head_dim",), ("k_norm", "weight"): ("head_dim",),
}


def param_logical_axes(path: Sequence) -> tuple[str, ...]:
    """Logical axes of the parameter at NNX ``path`` (e.g. ``('model','layers',3,'mlp','up_proj','kernel')``)."""
    key = tuple(str(p) for p in path[-2:])
    if key not in _PARAM_AXES:
        raise ReplaceMeError(f"no sharding rule for parameter {'.'.join(map(str, path))}; "
                             "add its logical axes to replaceme_jax/models/sharding.py:_PARAM_AXES")
    return _PARAM_AXES[key]


def rule_set(name: str) -> Rules:
    if name not in RULE_SETS:
        raise ReplaceMeError(f"mesh.rules={name!r}: use one of {sorted(RULE_SETS)}")
    return RULE_SETS[name]


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], rules: Rules,
                    axis_sizes: Mapping[str, int]) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` with ``logical`` axes under ``rules``.

    Pure arithmetic on mesh axis sizes (no devices), so a dry run can plan a pod slice from a laptop.
    Each dimension takes the longest prefix of its mesh axes whose size product divides it; a mesh
    axis already used by an earlier dimension is skipped (an axis can shard only one dimension).
    """
    if len(logical) != len(shape):
        raise ReplaceMeError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape):
        axes = [a for a in (table.get(name, ()) if name else ()) if a not in used and axis_sizes.get(a, 1) > 1]
        while axes and dim % math.prod(axis_sizes[a] for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def shard_shape(shape: Sequence[int], spec: PartitionSpec, axis_sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Shape of one device's shard (every shard has it: specs only ever split evenly)."""
    out = []
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(dim // math.prod(axis_sizes[a] for a in axes))
    return tuple(out)


def make_mesh(data: int = 1, model: int = 1, *, devices=None) -> jax.sharding.Mesh:
    """A ``("data", "model")`` mesh; -1 for one axis means "all remaining devices".

    Uses the first data*model devices (all of them on several hosts, where every process must take
    part). Axes are ``Auto``: XLA propagates shardings from the annotated inputs and constraints.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, model = int(data), int(model)
    if data == -1 and model == -1:
        raise ReplaceMeError("mesh.data and mesh.model cannot both be -1; fix one of them (e.g. mesh.model=1)")
    if data == -1:
        data = n // model if model > 0 else 0
    if model == -1:
        model = n // data if data > 0 else 0
    if data < 1 or model < 1:
        raise ReplaceMeError(f"mesh {data}x{model} is invalid: mesh.data and mesh.model must be positive "
                             f"(or -1 for all remaining of the {n} devices)")
    if data * model > n:
        raise ReplaceMeError(f"mesh {data}x{model} needs {data * model} devices but only {n} are visible; "
                             f"fix: choose mesh.data * mesh.model <= {n}")
    if jax.process_count() > 1 and data * model != n:
        raise ReplaceMeError(f"on {jax.process_count()} hosts the mesh must use all {n} devices, not "
                             f"{data}x{model}; fix: e.g. mesh.data=-1")
    return jax.make_mesh((data, model), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=devices[:data * model])


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A mesh plus a rule set: the one object that says where every array of a run lives."""
    mesh: jax.sharding.Mesh
    rules_name: str = "fsdp"

    @property
    def rules(self) -> Rules:
        return rule_set(self.rules_name)

    @property
    def axis_sizes(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def spec(self, logical: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        return logical_to_spec(logical, shape, self.rules, self.axis_sizes)

    def sharding(self, logical: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape))

    # -- parameters
    def place(self, path: Sequence, abstract) -> NamedSharding:
        """The ``place(nnx_path, ShapeDtypeStruct) -> Sharding`` hook of the checkpoint loaders."""
        return self.sharding(param_logical_axes(path), abstract.shape)

    def shard_model(self, model):
        """``model`` with every parameter on its sharding (no copy for parameters already there)."""
        graphdef, state = nnx.split(model)
        flat = list(nnx.to_flat_state(state))
        params = [(i, path, var.get_value()) for i, (path, var) in enumerate(flat) if isinstance(var, nnx.Param)]
        placed = put([v for _, _, v in params], [self.place(path, v) for _, path, v in params])
        for (i, _, _), value in zip(params, placed):
            flat[i] = (flat[i][0], flat[i][1].replace(value))
        return nnx.merge(graphdef, nnx.from_flat_state(flat))

    # -- activations, batches, sums
    def constrain(self, x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(logical, x.shape))

    @property
    def batch_ways(self) -> int:
        """How many ways the batch axes split a batch's rows."""
        return math.prod(self.axis_sizes[a] for a in dict(self.rules)["activation_batch"])

    def put_batch(self, array) -> jax.Array:
        """A host [B, T] array (the same on every host) as a global array split over the batch axes.

        Rows are padded with zeros (empty rows: mask 0) up to a multiple of ``batch_ways``, so a
        short last batch still splits evenly; consumers slice results back to B rows."""
        array = np.asarray(array)
        rows, ways = array.shape[0], self.batch_ways
        if rows % ways:
            if rows > ways:  # a short last batch is expected; a batch size that does not split is not
                _warn_padded_rows(rows, ways, tuple(dict(self.rules)["activation_batch"]))
            pad = np.zeros((-rows % ways, *array.shape[1:]), array.dtype)
            array = np.concatenate([array, pad])
        return put(array, self.sharding(BATCH, array.shape))

    def accumulator_sharding(self, shape: Sequence[int]) -> NamedSharding:
        """[n, d, d] sums split by rows over all devices; vectors and scalars replicated."""
        logical = ACCUMULATOR if len(shape) == 3 else (None,) * len(shape)
        return self.sharding(logical, shape)

    def constrain_accumulator(self, x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.accumulator_sharding(x.shape))

    @staticmethod
    def zeros(shape: Sequence[int], dtype, sharding: jax.sharding.Sharding) -> jax.Array:
        """Zeros built shard by shard on their devices (never whole on one, nothing to compile)."""
        def shard(index):
            return np.zeros([len(range(*sl.indices(dim))) for sl, dim in zip(index, shape)], dtype)
        return jax.make_array_from_callback(tuple(shape), sharding, shard)


@functools.lru_cache(maxsize=None)
def _warn_padded_rows(rows: int, ways: int, axes) -> None:  # once per shape, not once per batch
    logger.warning("batches of %d rows are padded to %d to split %d ways over mesh axes %s; use a "
                   "batch size that is a multiple of %d", rows, -(-rows // ways) * ways, ways, axes, ways)


def constrain(x: jax.Array, plan: ShardingPlan | None, logical: Sequence[str | None]) -> jax.Array:
    """``plan.constrain`` or the identity when there is no plan (single device)."""
    return x if plan is None else plan.constrain(x, logical)


def put(values, shardings):
    """Arrays (one, or a list) on their shardings, each process building only its own shards.

    Host arrays, and jax.Arrays this process holds whole, go through ``make_array_from_callback``:
    no compiled reshard, and unlike ``jax.device_put`` onto a multi-host sharding no cross-host
    equality check (an all-gather of the whole value). Arrays already in place are returned as they
    are; arrays spread over several hosts are resharded by ``jax.device_put``.
    """
    single = not isinstance(values, (list, tuple))
    values, shardings = ([values], [shardings]) if single else (list(values), list(shardings))
    out = []
    for value, sharding in zip(values, shardings):
        if isinstance(value, jax.Array) and (value.sharding == sharding or not value.is_fully_addressable):
            out.append(value if value.sharding == sharding else jax.device_put(value, sharding))
            continue
        host = np.asarray(value)
        out.append(jax.make_array_from_callback(host.shape, sharding, lambda index, h=host: h[index]))
    return out[0] if single else out


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host, sharded) array as one numpy array on every host."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:  # every host already has all of it
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def plan_from_config(cfg) -> ShardingPlan | None:
    """The plan of a run config (``cfg.mesh.{data,model,rules}``); None for the default 1 x 1 mesh."""
    mesh = cfg.mesh
    data, model = int(mesh.data), int(mesh.model)
    rules = mesh.get("rules", "fsdp")
    rule_set(rules)
    if data == 1 and model == 1:
        return None
    return _plan(data, model, rules)


@functools.lru_cache(maxsize=8)
def _plan(data: int, model: int, rules: str) -> ShardingPlan:
    # One plan per setting, so every jit cache keyed on it hits across calls of a run.
    return ShardingPlan(make_mesh(data, model), rules)



__all__ = ["MESH_AXES", "RULE_SETS", "BATCH", "RESIDUAL", "ACCUMULATOR", "ShardingPlan", "make_mesh",
           "plan_from_config", "param_logical_axes", "logical_to_spec", "shard_shape", "constrain", "put",
           "to_host"]
