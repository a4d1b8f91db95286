"""Meshes, sharding rules, sharded statistics / loading / saving, and the memory model.

The multi-device checks run tests/sharding_check.py in a subprocess with 8 simulated CPU devices
(JAX fixes its device count when it first initialises, and this session has one device).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from replaceme_jax import memory
from replaceme_jax.checkpoints import load_config
from replaceme_jax.checkpoints.architectures import published_config
from replaceme_jax.checkpoints.keymap import param_items
from replaceme_jax.models.modeling import abstract_model
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models import sharding as sh
from replaceme_jax.models.config import ModelConfig
from replaceme_jax.replaceme.statistics import StatsRequest

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # the bound on sharded vs single-device results (relative)


def run_script(args, timeout=900):
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def run_check(tmp_path, *parts):
    out = tmp_path / "check.json"
    run_script(["tests/sharding_check.py", str(out), *parts])
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- rules (one device)
SIZES = {"data": 4, "model": 2}


def test_rules_map_logical_axes_maxtext_style():
    fsdp, tensor = sh.rule_set("fsdp"), sh.rule_set("tensor")
    spec = lambda logical, shape, rules: sh.logical_to_spec(logical, shape, rules, SIZES)  # noqa: E731
    assert spec(("vocab", "embed"), (256, 64), fsdp) == P(None, "model")
    assert spec(("vocab", "embed"), (256, 64), tensor) == P("model")
    assert spec(("embed", "mlp"), (64, 128), tensor) == P(None, "model")
    assert spec(("mlp", "embed"), (128, 64), fsdp) == P(None, "model")
    assert spec(("norm",), (64,), fsdp) == P()
    assert spec(sh.BATCH, (8, 16), fsdp) == P(("data", "model"))
    assert spec(sh.BATCH, (8, 16), tensor) == P("data")
    assert spec(sh.ACCUMULATOR, (3, 64, 64), tensor) == P(None, ("data", "model"))
    # Dimensions the mesh does not divide fall back to the longest dividing prefix of mesh axes.
    assert spec(sh.BATCH, (4, 16), fsdp) == P("data")
    assert spec(sh.BATCH, (3, 16), fsdp) == P()
    assert spec(("heads",), (9 * 64,), tensor) == P("model")
    assert spec(("kv_heads",), (3,), tensor) == P()
    # A mesh axis shards at most one dimension.
    both = (("embed", ("model",)), ("mlp", ("model",)))
    assert spec(("embed", "mlp"), (64, 128), both) == P("model")
    assert sh.shard_shape((8, 64, 64), P(None, ("data", "model")), SIZES) == (8, 8, 64)


@pytest.mark.parametrize("family", [
    dict(model_type="llama", tie_word_embeddings=True),
    dict(model_type="qwen2", attention_bias=True),
    dict(model_type="qwen3", qk_norm=True),
    dict(model_type="llama", attention_bias=True, o_proj_bias=True, mlp_bias=True),
])
def test_every_parameter_of_the_family_has_logical_axes(family):
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **family)
    for path, var in param_items(abstract_model(config)):
        assert len(sh.param_logical_axes(path)) == len(var.shape), path
    with pytest.raises(ReplaceMeError, match="no sharding rule"):
        sh.param_logical_axes(("model", "mystery", "kernel"))


def test_mesh_and_plan_errors_name_the_fix():
    import jax
    n = jax.device_count()
    assert dict(sh.make_mesh(1, 1).shape) == {"data": 1, "model": 1}
    assert dict(sh.make_mesh(-1, 1).shape) == {"data": n, "model": 1}
    with pytest.raises(ReplaceMeError, match="needs .* devices"):
        sh.make_mesh(n + 1, 1)
    with pytest.raises(ReplaceMeError, match="both be -1"):
        sh.make_mesh(-1, -1)
    with pytest.raises(ReplaceMeError, match="positive"):
        sh.make_mesh(0, 1)
    from replaceme_jax.replaceme.config import default_config
    cfg = default_config()
    assert sh.plan_from_config(cfg) is None  # the default: one device, no plan
    cfg.mesh.rules = "zigzag"
    with pytest.raises(ReplaceMeError, match="mesh.rules"):
        sh.plan_from_config(cfg)


# ----------------------------------------------------------------------------- memory model and configs
# Parameter counts published on the models' Hugging Face pages (exact counts of their safetensors).
PUBLISHED_PARAMETERS = {
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Meta-Llama-3-8B-Instruct": 8_030_261_248,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "meta-llama/Meta-Llama-3-70B": 70_553_706_496,
}
CONFIGS = {"llama3_8b": ("meta-llama/Meta-Llama-3-8B", 8),
           "llama3_8b_instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", 8),
           "llama31_8b": ("meta-llama/Llama-3.1-8B", 8), "llama2_7b": ("meta-llama/Llama-2-7b-hf", 8),
           "qwen25_7b": ("Qwen/Qwen2.5-7B", 8), "qwen3_8b": ("Qwen/Qwen3-8B", 8),
           "llama3_70b": ("meta-llama/Meta-Llama-3-70B", 20)}


def _load_config(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _parameter_count(config: ModelConfig) -> int:
    """From the architecture's arithmetic, independently of the model code."""
    c, hd = config, config.head_dim
    attention = c.hidden_size * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    if c.attention_bias:
        attention += hd * (c.num_attention_heads + 2 * c.num_key_value_heads)
    block = attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size + (2 * hd if c.qk_norm else 0)
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.vocab_size * c.hidden_size + c.num_hidden_layers * block + c.hidden_size + head


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_carry_the_paper_settings_and_real_architectures(name):
    cfg = _load_config(name)
    architecture, blocks = CONFIGS[name]
    assert cfg.architecture == architecture and cfg.num_blocks == blocks
    cal = cfg.calibration
    assert (cal.num_samples, cal.max_length, cal.batch_size) == (8000, 1024, 8)
    assert cfg.mesh.rules in sh.RULE_SETS and cfg.param_dtype == "bfloat16"
    config = load_config(cfg.model, architecture=cfg.architecture, param_dtype=cfg.param_dtype,
                         dtype=cfg.dtype)  # no checkpoint here: the published architecture
    assert _parameter_count(config) == PUBLISHED_PARAMETERS[architecture]


def test_memory_model_parameters_and_sums_per_device():
    config = published_config("meta-llama/Meta-Llama-3-8B", param_dtype="bfloat16", dtype="bfloat16")
    request = StatsRequest(cuts=((1, 2), (2, 3)), accum_dtype="float64")
    m = memory.statistics_memory(config, request, (8, 1024), mesh_shape=(1, 8), rules="tensor", backend="gpu")
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size  # replicated
    total = PUBLISHED_PARAMETERS["meta-llama/Meta-Llama-3-8B"]
    assert m.parameters == (total - norms) * 2 // 8 + norms * 2
    d = config.hidden_size
    # MᵀM for anchors 0 and 1 and Mᵀ(L - Y) for two cuts, split by rows over 8 devices; ‖L - Y‖² per
    # cut and ‖h_k‖² for k = 0 .. 3 (the deepest cut ends at 3; float64) and the token and sequence
    # counts (float32) replicated; all twice (Kahan).
    assert m.accumulators == 2 * (4 * d * d * 8 // 8 + 2 * 8 + 4 * 8 + 2 * 4)
    assert m.partial_sums == 0  # tensor rules with data=1 keep the batch whole: no whole partials
    assert m.upcast == 0 and m.gathered == 0  # GPU, tensor parallel
    fsdp = memory.statistics_memory(config, request, (8, 1024), mesh_shape=(1, 8), rules="fsdp", backend="gpu")
    assert fsdp.partial_sums == 4 * d * d * 8 + 4 * d * d * 8 // 8
    assert fsdp.activations < m.activations  # one sequence per device instead of eight
    text = fsdp.format()
    assert "gathered weights" in text and "peak" in text and memory.format_bytes(fsdp.peak) in text


def test_dry_run_prints_the_memory_of_a_config_without_its_weights():
    out = run_script(["scripts/prune.py", "--config=configs/llama2_7b.py", "--dry_run", "--dry_run_backend=tpu",
                      "--config.mesh.data=2", "--config.mesh.model=4"], timeout=600).stdout
    assert "memory per device: mesh 2x4 (fsdp), tpu, batch 8x1024, sums in float32" in out
    # 6.74e9 bf16 parameters; every matrix split over the model axis (4), the norms replicated.
    norms = 65 * 4096
    assert f"parameters {memory.format_bytes((6_738_415_616 - norms) * 2 / 4 + norms * 2):>10s}".split() == \
        next(line for line in out.splitlines() if "parameters" in line).split()
    assert "gathered weights (fsdp)" in out and "peak" in out


# ----------------------------------------------------------------------------- 8 simulated devices
@pytest.fixture(scope="module")
def check(tmp_path_factory):
    return run_check(tmp_path_factory.mktemp("sharding"), "equality=4x2/fsdp,2x4/tensor", "prune=4x2/fsdp",
                     "load", "orbax")


def _assert_equal_to_single_device(results):
    for r in results:
        label = f"{r['mesh'][0]}x{r['mesh'][1]} {r['rules']}"
        for name, rel in r["rel"].items():
            assert rel <= TOL, (label, name, rel)
        assert r["tokens_equal"], label
        assert all(r["param_specs"].values()), (label, r["param_specs"])
        assert r["every_param_planned"] and r["folded_kernel_keeps_sharding"], label
        assert all(r["activation_specs"].values()), (label, r["activation_specs_seen"])
        assert r["accumulator_rows_split"] and r["batch_spec_ok"], label


def test_sharded_statistics_transform_and_pruned_logits_equal_one_device(check):
    assert [tuple(r["mesh"]) for r in check["equality"]] == [(4, 2), (2, 4)]
    _assert_equal_to_single_device(check["equality"])


def test_prune_runs_on_the_configured_mesh(check):
    assert check["prune"]["rel_T"] <= TOL and check["prune"]["rel_kernel"] <= TOL
    assert check["prune"]["rel_downstream"] <= TOL
    assert check["prune"]["pruned_on_plan"] and check["prune"]["blocks"] == 2


def test_checkpoint_loads_into_a_4x2_mesh_with_each_device_holding_its_share(check):
    for r in check["load"]:
        held = r["device_bytes"]
        assert len(held) == 8 and r["values_equal"] and r["all_planned"], r["rules"]
        assert set(held.values()) == {r["share"]}, r  # every device exactly its share, no stray copies
        # The model axis (2) splits every matrix; only the small norm vectors are replicated.
        assert r["share"] <= r["total"] / 2 + r["total"] * 0.01, r


def test_orbax_saves_a_sharded_model_and_restores_it_onto_another_mesh(check):
    assert check["orbax"] == {"values_equal": True, "restored_on_plan_b": True}


@pytest.mark.slow
def test_other_meshes_equal_one_device(tmp_path):
    results = run_check(tmp_path, "equality=8x1/fsdp,1x8/tensor,1x8/fsdp,4x2/tensor")["equality"]
    assert [tuple(r["mesh"]) for r in results] == [(8, 1), (1, 8), (1, 8), (4, 2)]
    _assert_equal_to_single_device(results)


@pytest.mark.slow
def test_smoke_benchmark_8b_shaped_memory_model_matches_xla(tmp_path):
    """Real Llama-3-8B dimensions, random bf16 weights, 2 blocks, on 8 simulated devices: the pass
    runs, and the memory model is within 10 % of XLA's accounting of the compiled step."""
    common = ["scripts/bench_stats_pass.py", "--cpu_devices=8", "--blocks=2", "--batch=8", "--peak_size=512"]
    out = tmp_path / "run.json"
    run_script([*common, "--mesh=1x8", "--rules=tensor", "--length=32", "--steps=1", f"--json={out}"])
    result = json.loads(out.read_text())
    assert result["finite"] and result["tokens"] == 8 * 32
    ratios = {"1x8 tensor": result["model_over_xla"]}
    for mesh, rules in (("2x4", "tensor"), ("1x8", "fsdp"), ("8x1", "fsdp")):
        run_script([*common, f"--mesh={mesh}", f"--rules={rules}", "--length=64", "--compile_only",
                    f"--json={out}"])
        ratios[f"{mesh} {rules}"] = json.loads(out.read_text())["model_over_xla"]
    print("memory model / XLA:", ratios)
    assert all(abs(r - 1) <= 0.10 for r in ratios.values()), ratios
