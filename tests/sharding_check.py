"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices (JAX must see them
before it initialises, and the test session has already imported it). Writes its measurements as
JSON to argv[1]; the assertions live in the test file.

Parts (argv[2:]):
  equality=DxM/rules,...  statistics, T and pruned logits on each mesh against one device, and the
            shardings of parameters, inputs, sums and activations (e.g. equality=4x2/fsdp,1x8/tensor);
  prune=DxM/rules  pipeline.prune with cfg.mesh set against prune on one device;
  load      a Hugging Face checkpoint loaded into a 4x2 mesh: bytes each device holds;
  orbax     a sharded model saved with Orbax and restored onto another mesh.
"""
import json
import os
import sys
import tempfile
import tracemalloc

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from replaceme_jax.checkpoints.keymap import param_items  # noqa: E402
from replaceme_jax.data.batching import Batch  # noqa: E402
from replaceme_jax.models import sharding as sh  # noqa: E402
from replaceme_jax.models.config import ModelConfig  # noqa: E402
from replaceme_jax.models.modeling import CausalLM  # noqa: E402
from replaceme_jax.replaceme import solvers  # noqa: E402
from replaceme_jax.replaceme.statistics import StatsRequest, gather_statistics  # noqa: E402
from replaceme_jax.replaceme.surgery import apply_cuts  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

# Every parameter kind the rules know: q/k/v/o and MLP biases, q/k norms, an untied head.
CONFIG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                     o_proj_bias=True, mlp_bias=True, qk_norm=True, tie_word_embeddings=False)
# A config that round-trips through config.json, for the checkpoint parts.
SAVED_CONFIG = ModelConfig(model_type="qwen3", vocab_size=1024, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           qk_norm=True, tie_word_embeddings=False)
REQUEST = StatsRequest(max_distance_blocks=2, cuts=((1, 3), (2, 3)))  # two anchors, two cuts
CUT = (1, 3)
# What the rules must give on each mesh (the trailing None of a spec is dropped).
EXPECTED_PARAMS = {
    "fsdp": {"model.embed_tokens.embedding": P(None, "model"), "lm_head.kernel": P("model"),
             "model.layers.0.self_attn.q_proj.kernel": P("model"),
             "model.layers.0.self_attn.o_proj.kernel": P(None, "model"),
             "model.layers.0.mlp.down_proj.kernel": P(None, "model"),
             "model.layers.0.mlp.down_proj.bias": P("model"),
             "model.layers.0.self_attn.q_norm.weight": P(), "model.norm.weight": P()},
    "tensor": {"model.embed_tokens.embedding": P("model"), "lm_head.kernel": P(None, "model"),
               "model.layers.0.self_attn.q_proj.kernel": P(None, "model"),
               "model.layers.0.self_attn.k_proj.bias": P("model"),
               "model.layers.0.self_attn.o_proj.kernel": P("model"),
               "model.layers.0.mlp.up_proj.kernel": P(None, "model"),
               "model.layers.0.mlp.down_proj.kernel": P("model"),
               "model.layers.0.self_attn.q_norm.weight": P(), "model.norm.weight": P()},
}
BATCH_AXES = {"fsdp": ("data", "model"), "tensor": ("data",)}


def _batches():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(2):
        ids = rng.integers(0, CONFIG.vocab_size, (8, 16)).astype(np.int32)
        mask = np.ones((8, 16), np.int32)
        mask[3, 9:] = 0   # right padding
        mask[6, :5] = 0   # left padding
        mask[7] = 0       # an empty row (the batch filler)
        out.append(Batch(ids, mask, int(mask.sum()), int((mask.sum(-1) > 0).sum())))
    # A shrunk last batch (make_batches' shrink_last): 2 rows, which put_batch pads to the batch ways.
    ids = rng.integers(0, CONFIG.vocab_size, (2, 16)).astype(np.int32)
    mask = np.ones((2, 16), np.int32)
    mask[1, 11:] = 0
    out.append(Batch(ids, mask, int(mask.sum()), 2))
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = ~np.isnan(b)
    return float(np.linalg.norm((a - b)[keep]) / np.linalg.norm(b[keep]))


def _equivalent(sharding, mesh, spec, ndim):
    return bool(sharding.is_equivalent_to(NamedSharding(mesh, spec), ndim))


def _activation_shardings(model, plan, ids, mask):
    """Shardings XLA gives the residual stream, Y, M, the query projection and the MLP hidden units
    inside a block (read at compile time by inspect_array_sharding)."""
    seen = {}

    def record(name):
        return lambda s: seen.__setitem__(name, s)

    graphdef, state = nnx.split(model)

    @jax.jit
    def probe(state, ids, mask):
        m = nnx.merge(graphdef, state)
        cos, sin, biases = m.attention_inputs(mask)
        h = sh.constrain(m.embed(ids), plan, sh.RESIDUAL)
        layer = m.model.layers[0]
        q = layer.self_attn.q_proj(layer.input_layernorm(h))
        y, mo = layer.parts(h, cos, sin, biases[0])
        hidden = layer.mlp.gate_proj(layer.post_attention_layernorm(y))
        for name, x in (("h", h), ("Y", y), ("M", mo), ("q", q), ("mlp_hidden", hidden)):
            jax.debug.inspect_array_sharding(x, callback=record(name))
        return y + mo

    probe(state, ids, mask)
    return seen


def equality(meshes: str):
    model = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    batches = _batches()
    ids, mask = batches[0].input_ids, batches[0].attention_mask
    ref = gather_statistics(model, batches, REQUEST)
    ref_T = solvers.lstsq(ref.normal_equations(CUT)).T
    ref_logits = np.asarray(apply_cuts(model, [CUT], [ref_T])(jnp.asarray(ids), jnp.asarray(mask)))
    results = []
    for item in meshes.split(","):
        shape, rules = item.split("/")
        data, model_axis = (int(x) for x in shape.split("x"))
        plan = sh.ShardingPlan(sh.make_mesh(data, model_axis), rules)
        sharded = plan.shard_model(model)
        stats = gather_statistics(sharded, batches, REQUEST, plan=plan)
        T = solvers.lstsq(stats.normal_equations(CUT)).T
        pruned = apply_cuts(sharded, [CUT], [T])
        logits = np.asarray(jax.jit(lambda m, i, k: m(i, k))(pruned, plan.put_batch(ids), plan.put_batch(mask)))
        params = {".".join(map(str, p)): v.get_value() for p, v in param_items(sharded)}
        pruned_params = {".".join(map(str, p)): v.get_value() for p, v in param_items(pruned)}
        folded = "model.layers.0.mlp.down_proj.kernel"
        acts = _activation_shardings(sharded, plan, plan.put_batch(ids), plan.put_batch(mask))
        batch_axes = BATCH_AXES[rules]
        expected_acts = {"h": P(batch_axes), "Y": P(batch_axes), "M": P(batch_axes),
                         "q": P(batch_axes, None, "model" if rules == "tensor" else None),
                         "mlp_hidden": P(batch_axes, None, "model" if rules == "tensor" else None)}
        acc_sharding = plan.accumulator_sharding((2, 64, 64))
        results.append({
            "mesh": [data, model_axis], "rules": rules,
            "rel": {"distances": _rel(stats.distances, ref.distances), "gram": _rel(stats.gram, ref.gram),
                    "cross": _rel(stats.cross, ref.cross), "target_sq": _rel(stats.target_sq, ref.target_sq),
                    "T": _rel(T, ref_T), "logits": _rel(logits, ref_logits)},
            "tokens_equal": stats.num_tokens == ref.num_tokens and stats.num_sequences == ref.num_sequences,
            "param_specs": {name: _equivalent(params[name].sharding, plan.mesh, spec, params[name].ndim)
                            for name, spec in EXPECTED_PARAMS[rules].items()},
            "every_param_planned": all(v.sharding == plan.place(tuple(k.split(".")), v)
                                       for k, v in params.items()),
            "folded_kernel_keeps_sharding": pruned_params[folded].sharding == params[folded].sharding,
            "activation_specs": {name: _equivalent(acts[name], plan.mesh, spec, 3)
                                 for name, spec in expected_acts.items()},
            "activation_specs_seen": {name: str(s) for name, s in acts.items()},
            "accumulator_spec": str(acc_sharding.spec),
            "accumulator_rows_split": acc_sharding.shard_shape((2, 64, 64)) == (2, 8, 8 * 8),
            "batch_spec_ok": _equivalent(plan.put_batch(ids).sharding, plan.mesh, P(batch_axes), 2),
        })
    return results


def prune(mesh: str):
    from replaceme_jax.replaceme.config import default_config
    from replaceme_jax.replaceme.pipeline import prune as run_prune
    shape, rules = mesh.split("/")
    model = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    cfg = default_config()
    cfg.cuts, cfg.num_blocks, cfg.candidates, cfg.progress = "1-2", 1, "selected", False
    cfg.refit.alpha_grid = "1e-3"  # always the re-fitted kernels, so the mesh's sums are what is compared
    cfg.refit.downstream = 1       # block 2 after the cut, toward the dense stream: a pass over two models
    single = run_prune(model, _batches(), cfg, validation=_batches())
    cfg.mesh.data, cfg.mesh.model = (int(x) for x in shape.split("x"))
    cfg.mesh.rules = rules
    sharded = run_prune(model, _batches(), cfg, validation=_batches())
    plan = sh.plan_from_config(cfg)
    return {"rel_T": _rel(sharded.transforms[0], single.transforms[0]),
            "rel_kernel": _rel(sharded.refits[0].kernel, single.refits[0].kernel),
            "rel_downstream": _rel(sharded.downstream[0].fit.kernel, single.downstream[0].fit.kernel),
            "pruned_on_plan": all(v.get_value().sharding == plan.place(p, v.get_value())
                                  for p, v in param_items(sharded.model)),
            "blocks": sharded.model.config.num_hidden_layers}


def _device_bytes():
    out = {}
    for arr in jax.live_arrays():
        for shard in arr.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


def load():
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.checkpoints.hf import save_hf
    from replaceme_jax import memory
    config = SAVED_CONFIG
    tmp = tempfile.mkdtemp()
    source = CausalLM(config, rngs=nnx.Rngs(1))
    path = save_hf(source, os.path.join(tmp, "hf"))
    reference = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in param_items(source)}
    largest = max(a.nbytes for a in reference.values())
    total = sum(a.nbytes for a in reference.values())
    del source
    out = []
    for rules in ("fsdp", "tensor"):
        plan = sh.ShardingPlan(sh.make_mesh(4, 2), rules)
        before = _device_bytes()
        tracemalloc.start()
        model, _ = load_pretrained(str(path), place=plan.place)
        _, host_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        after = _device_bytes()
        held = {d: after.get(d, 0) - before.get(d, 0) for d in after}
        share = memory.statistics_memory(config, REQUEST, (8, 16), mesh_shape=(4, 2), rules=rules).parameters
        values = {".".join(map(str, p)): v.get_value() for p, v in param_items(model)}
        out.append({
            "rules": rules, "device_bytes": held, "share": share, "total": total, "largest_tensor": largest,
            "host_peak": host_peak,
            "values_equal": all(np.array_equal(np.asarray(values[k]), reference[k]) for k in reference),
            "all_planned": all(v.sharding == plan.place(tuple(k.split(".")), v) for k, v in values.items()),
        })
        del model, values
    return out


def orbax():
    from replaceme_jax.checkpoints.orbax_io import restore_orbax, save_orbax
    tmp = tempfile.mkdtemp()
    plan_a = sh.ShardingPlan(sh.make_mesh(4, 2), "fsdp")
    plan_b = sh.ShardingPlan(sh.make_mesh(2, 4), "tensor")
    model = plan_a.shard_model(CausalLM(SAVED_CONFIG, rngs=nnx.Rngs(2)))
    save_orbax(model, os.path.join(tmp, "ckpt"))
    restored, _ = restore_orbax(os.path.join(tmp, "ckpt"), place=plan_b.place)
    a = {".".join(map(str, p)): v.get_value() for p, v in param_items(model)}
    b = {".".join(map(str, p)): v.get_value() for p, v in param_items(restored)}
    return {"values_equal": all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a),
            "restored_on_plan_b": all(v.sharding == plan_b.place(tuple(k.split(".")), v) for k, v in b.items())}


def main():
    out_path, parts = sys.argv[1], sys.argv[2:]
    assert jax.device_count() == 8, jax.devices()
    results = {}
    for part in parts:
        name, _, arg = part.partition("=")
        results[name] = globals()[name](*([arg] if arg else []))
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
