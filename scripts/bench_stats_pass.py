"""Benchmark the statistics pass on a model of real shape with random weights.

Builds a model with the dimensions of a published architecture (default Llama-3-8B) but only a few
blocks, initialised randomly straight into its shardings (each device generates its own shard),
runs the pass on random tokens and prints: the memory model next to XLA's own accounting of the
compiled step (and the runtime's peak where the backend reports one), tokens/s, and model FLOP
utilisation against a matmul peak measured on the same device.

    # the paper's batch and length on all local accelerators, 4 blocks of Llama-3-8B in bf16
    python scripts/bench_stats_pass.py --blocks=4 --batch=8 --length=1024 --mesh=-1x1
    # tensor parallel over 8 GPUs
    python scripts/bench_stats_pass.py --mesh=1x8 --rules=tensor
    # CPU smoke run on 8 simulated devices
    python scripts/bench_stats_pass.py --cpu_devices=8 --mesh=1x8 --rules=tensor --blocks=2 \
        --length=64 --steps=1 --peak_size=1024

``--json`` writes every number to a file (the tests read it).
"""
from __future__ import annotations

import os
import sys
import time
import types

from absl import flags

ARCH = flags.DEFINE_string("architecture", "meta-llama/Meta-Llama-3-8B",
                           "Published architecture (replaceme_jax.checkpoints.architectures).")
BLOCKS = flags.DEFINE_integer("blocks", 4, "Blocks to keep (the pass's cost is linear in them).")
BATCH = flags.DEFINE_integer("batch", 8, "Sequences per batch (the paper: 8).")
LENGTH = flags.DEFINE_integer("length", 1024, "Tokens per sequence (the paper: 1024).")
STEPS = flags.DEFINE_integer("steps", 5, "Timed batches (after one untimed batch that compiles).")
CUT_BLOCKS = flags.DEFINE_integer("cut_blocks", 2, "n of the candidate cuts whose normal equations "
                                  "are gathered (every cut of n blocks, as candidates=all).")
MESH = flags.DEFINE_string("mesh", "-1x1", "data x model mesh; -1 = all remaining devices.")
RULES = flags.DEFINE_enum("rules", "fsdp", ["fsdp", "tensor"], "Sharding rule set.")
DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and compute dtype.")
ACCUM = flags.DEFINE_enum("accum_dtype", "auto", ["auto", "float32", "float64"], "Dtype of the sums.")
PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.0, "Per-device peak (TFLOP/s) for MFU; 0: measure "
                                 "a square matmul of --peak_size in --dtype.")
PEAK_SIZE = flags.DEFINE_integer("peak_size", 8192, "Matrix size of the peak measurement.")
CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Simulate this many CPU devices (0: real devices).")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (run the "
                                "same command on every host of a multi-host job).")
JSON_OUT = flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Only compare the memory model with XLA's "
                                 "accounting of the compiled step (no weights are allocated).")


def _parse_mesh(text: str) -> tuple[int, int]:
    from replaceme_jax.errors import ReplaceMeError
    try:
        data, model = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ReplaceMeError(f"--mesh={text!r}: write it as DATAxMODEL, e.g. 1x8 or -1x1") from None
    return data, model


def random_model(config, plan, seed: int = 0):
    """A CausalLM of ``config`` with random weights, each shard written on the host for its own
    device: memory never exceeds one shard above the model's share (a jitted initialiser needs
    several times the model in temporaries). Kernel and embedding shards repeat a pool of 2^20
    uniform values (standard deviation 0.02) from a random offset, which costs a copy instead of
    billions of draws and leaves the pass's cost unchanged; norm weights are 1, biases 0."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from replaceme_jax.models.modeling import abstract_model
    graphdef, abstract = nnx.split(abstract_model(config))
    rng = np.random.default_rng(seed)
    pool = (rng.random(1 << 20, dtype=np.float32) * 2 - 1) * 0.02 * np.sqrt(3.0)
    pools = {}

    def shard_fn(path, shape, dtype):
        def fill(index):
            shard = [len(range(*sl.indices(dim))) for sl, dim in zip(index, shape)]
            if path[-1] in ("weight", "bias"):
                return np.full(shard, 1 if path[-1] == "weight" else 0, dtype)
            values = pools.setdefault(dtype, pool.astype(dtype))
            return np.resize(np.roll(values, int(rng.integers(values.size))), shard)
        return fill

    flat = []
    for path, var in nnx.to_flat_state(abstract):
        shape, dtype = tuple(var.shape), np.dtype(jnp.dtype(var.dtype))
        value = jax.make_array_from_callback(shape, plan.place(path, var), shard_fn(path, shape, dtype))
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def pass_flops_per_token(config, request, length: int) -> float:
    """Matmul FLOPs per token of the pass: the blocks it runs (attention over the full T x T, as
    computed), plus the d x d sums (one per anchor and one per cut)."""
    c = config
    depth = request.depth(c.num_hidden_layers)
    hd = c.head_dim
    weights = (c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * hd
               + c.num_attention_heads * hd * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
    attention = 4 * length * c.num_attention_heads * hd
    sums = 2 * c.hidden_size ** 2 * (len(request.anchors) + len(request.cuts))
    return depth * (2 * weights + attention) + sums


def measure_peak_tflops(size: int, dtype: str) -> float:
    """Best of five square matmuls on the first device, TFLOP/s."""
    import jax
    import jax.numpy as jnp
    a = jax.device_put(jnp.ones((size, size), dtype), jax.devices()[0])
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e12


def main(argv) -> int:
    from replaceme_jax.errors import ReplaceMeError
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}")
    import jax
    import numpy as np

    if DISTRIBUTED.value:
        jax.distributed.initialize()
    from replaceme_jax import memory
    from replaceme_jax.models import sharding as sh
    from replaceme_jax.replaceme.cuts import candidate_cuts
    from replaceme_jax.replaceme.statistics import StatsRequest, gather_statistics

    data, model_axis = _parse_mesh(MESH.value)
    plan = sh.ShardingPlan(sh.make_mesh(data, model_axis), RULES.value)
    from replaceme_jax.checkpoints.architectures import published_config
    config = published_config(ARCH.value, param_dtype=DTYPE.value, dtype=DTYPE.value)
    if not 2 <= BLOCKS.value <= config.num_hidden_layers:
        raise ReplaceMeError(f"--blocks={BLOCKS.value}: choose 2..{config.num_hidden_layers}")
    config = config.replace(num_hidden_layers=BLOCKS.value)
    n = min(CUT_BLOCKS.value, BLOCKS.value - 1)
    request = StatsRequest(max_distance_blocks=BLOCKS.value - 1, cuts=candidate_cuts(BLOCKS.value, n),
                           accum_dtype=ACCUM.value)
    shape = (BATCH.value, LENGTH.value)
    mesh_shape = tuple(plan.mesh.shape.values())

    predicted = memory.statistics_memory(config, request, shape, mesh_shape=mesh_shape, rules=RULES.value)
    print(predicted.format())
    compiled = memory.compile_statistics_step(config, request, shape, plan)
    xla = memory.xla_memory(compiled)
    print("XLA's accounting of the step per device: " + ", ".join(
        f"{k} {memory.format_bytes(v)}" for k, v in xla.items()))
    ratio = predicted.step / xla["total"] if xla else float("nan")
    print(f"model / XLA (step: arguments + temporaries): {ratio:.3f}")
    results = {"backend": jax.default_backend(), "devices": plan.num_devices, "mesh": list(mesh_shape),
               "rules": RULES.value, "architecture": ARCH.value, "blocks": config.num_hidden_layers,
               "batch": list(shape), "dtype": DTYPE.value, "memory_model": predicted.to_dict(),
               "xla_memory": xla, "model_over_xla": ratio}
    if COMPILE_ONLY.value:
        _write(results)
        return 0

    t0 = time.perf_counter()
    model = random_model(config, plan)
    jax.block_until_ready(jax.tree.leaves(model))
    init_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)

    def batch():  # what the pass reads of a data.Batch (importing replaceme_jax.data needs its text deps)
        ids = rng.integers(0, config.vocab_size, shape, dtype=np.int32)
        return types.SimpleNamespace(input_ids=ids, attention_mask=np.ones(shape, np.int32))

    t0 = time.perf_counter()
    gather_statistics(model, [batch()], request, plan=plan)  # compiles
    compile_s = time.perf_counter() - t0
    batches = [batch() for _ in range(STEPS.value)]
    t0 = time.perf_counter()
    stats = gather_statistics(model, batches, request, plan=plan)
    run_s = time.perf_counter() - t0
    tokens = stats.num_tokens
    flops = pass_flops_per_token(config, request, LENGTH.value) * tokens
    peak = PEAK_TFLOPS.value or measure_peak_tflops(PEAK_SIZE.value, DTYPE.value)
    achieved = flops / run_s / 1e12
    mfu = achieved / (peak * plan.num_devices)
    device = jax.devices()[0]
    runtime_peak = memory.device_peak_bytes()
    print(f"devices: {plan.num_devices} x {device.device_kind} ({jax.default_backend()}), mesh "
          f"{mesh_shape[0]}x{mesh_shape[1]} {RULES.value}; {config.num_hidden_layers} blocks of {ARCH.value} in "
          f"{DTYPE.value}, sums in {predicted.accum_dtype}")
    print(f"init {init_s:.1f}s, first batch (compile) {compile_s:.1f}s, {STEPS.value} batches {run_s:.2f}s "
          "(including the final transfer of the sums to the host)")
    print(f"{tokens / run_s:,.0f} tokens/s, {achieved:.2f} TFLOP/s, peak {peak:.2f} TFLOP/s per device "
          f"({'given' if PEAK_TFLOPS.value else 'measured'}), MFU {100 * mfu:.1f}%")
    if runtime_peak is not None:
        print(f"runtime peak bytes in use (largest device): {memory.format_bytes(runtime_peak)}; "
              f"model peak {memory.format_bytes(predicted.peak)}")
    results.update(
        device_kind=device.device_kind, runtime_peak_bytes=runtime_peak, init_s=init_s, compile_s=compile_s,
        run_s=run_s, tokens=tokens, tokens_per_s=tokens / run_s, tflops=achieved, peak_tflops_per_device=peak,
        mfu=mfu, finite=bool(np.isfinite(stats.gram).all() and np.isfinite(stats.cross).all()))
    _write(results)
    return 0


def _write(results: dict) -> None:
    if JSON_OUT.value:
        from replaceme_jax.io_utils import atomic_write_json
        atomic_write_json(JSON_OUT.value, results)


if __name__ == "__main__":
    # Simulated CPU devices must be requested before JAX initialises its backend.
    for arg in sys.argv[1:]:
        if arg.startswith("--cpu_devices=") and int(arg.split("=", 1)[1]) > 0:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       f" --xla_force_host_platform_device_count={arg.split('=', 1)[1]}")
            os.environ["JAX_PLATFORMS"] = "cpu"
    from replaceme_jax.cli import run_main
    run_main(main)
