"""The benchmark compares like with like: the PyTorch baseline computes the same T, distances and
pruned model as our pipeline on the same data, the FLOP counts match the models' parameter shapes,
and the whole suite runs (tiny random model) and renders its tables. Timings are not checked."""
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from benchmarks import flops, memory, suite, tables
from benchmarks import torch_replaceme as tr
from replaceme_jax.checkpoints.hf import save_hf
from replaceme_jax.data import make_batches
from replaceme_jax.models.config import ModelConfig
from replaceme_jax.models.modeling import CausalLM
from replaceme_jax.replaceme import solvers
from replaceme_jax.replaceme.config import default_config
from replaceme_jax.replaceme.statistics import StatsRequest, gather_statistics
from replaceme_jax.replaceme.surgery import apply_cuts
from tiny_models import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-5, tie_word_embeddings=True)


def _random_sequences(vocab, count, seed=0, lo=5, hi=60):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(lo, hi))).astype(np.int32) for _ in range(count)]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A random 6-block Llama: our model and its Hugging Face export (transformers loads it)."""
    model = CausalLM(ModelConfig(vocab_size=256, num_hidden_layers=6, **TINY), rngs=nnx.Rngs(0))
    return model, save_hf(model, tmp_path_factory.mktemp("tiny") / "hf")


def test_baseline_matches_ours_on_same_data(tiny_pair):
    """Baseline (official mechanics) and our pass give the same T and distances on the same tokens,
    padded differently (longest-in-batch vs buckets), pads excluded on both sides."""
    model, path = tiny_pair
    torch_model = tr.load_model(path, threads=1)
    seqs = _random_sequences(256, 24)
    n, cut = 2, (2, 4)
    ours = gather_statistics(model, make_batches(seqs, batch_size=4, max_length=64),
                             StatsRequest(max_distance_blocks=n, cuts=(cut,)))
    batches = tr.official_batches(seqs, 4, pad_id=0)
    mtm, mtr, rows = tr.normal_equations(torch_model, batches, cut, include_pad=False)
    assert rows == ours.num_tokens == sum(len(s) for s in seqs)
    T_theirs = tr.solve(mtm, mtr)
    T_ours = np.asarray(solvers.lstsq(ours.normal_equations(cut)).T)
    assert np.linalg.norm(T_ours - T_theirs) / np.linalg.norm(T_theirs) < 1e-5
    # Equal batch sizes: the baseline's mean of batch means is our mean over sequences. Its last
    # entry compares against transformers' final-normed hidden state, ours against the raw one.
    distances = tr.angular_distances(torch_model, batches, n)
    np.testing.assert_allclose(distances[:-1], ours.distances[n - 1, :6 - n], atol=1e-6)
    s = 1 + int(np.argmin(ours.distances[n - 1, 1:6 - n]))
    assert tr.select_cut(distances[:-1], n) == (s, s + n)
    # Pads counted (the official default) changes the sums: the flag is not a no-op.
    assert tr.normal_equations(torch_model, batches, cut, include_pad=True)[2] > rows


def test_baseline_surgery_matches_ours(tiny_pair):
    """The baseline's pruned transformers model computes what our apply_cuts model computes."""
    model, path = tiny_pair
    fresh = tr.load_model(path, threads=1)
    cut = (2, 5)
    T = np.random.default_rng(1).normal(size=(32, 32)) / 6 + np.eye(32)
    tr.apply_cut(fresh, cut, T)
    ids = np.asarray(_random_sequences(256, 1, seed=3, lo=20, hi=21)[0])[None]
    with torch.inference_mode():
        want = fresh(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    got = np.asarray(apply_cuts(model, [cut], [T])(jnp.asarray(ids)))
    assert fresh.config.num_hidden_layers == 3
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_flop_counts_follow_parameter_shapes():
    """Per token, a block's matmul FLOPs are 2 x its weight-matrix entries plus attention's 4·T·h·hd."""
    config = ModelConfig(vocab_size=100, num_hidden_layers=2, head_dim=16, **{**TINY, "hidden_size": 48})
    model = CausalLM(config, rngs=nnx.Rngs(0))
    block = model.model.layers[0]
    weights = sum(int(np.prod(lin.kernel.shape)) for lin in (
        block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.self_attn.o_proj,
        block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj))
    t = 37
    assert flops.block_flops_per_token(config, t) == 2 * weights + 4 * t * 4 * 16
    assert flops.head_flops_per_token(config) == 2 * 48 * 100
    shapes = [(2, 8), (3, 16)]
    counted = flops.baseline_flops(config, shapes)
    assert counted["model"] == 2 * sum(b * t * (2 * flops.block_flops_per_token(config, t) + 2 * 48 * 100)
                                       for b, t in shapes)
    assert counted["sums"] == 64 * 2 * 2 * 48 * 48
    ours = flops.statistics_flops(config, shapes, depth=1, num_products=3)
    blocks = sum(b * t * flops.block_flops_per_token(config, t) for b, t in shapes)
    assert ours["total"] == blocks + 64 * 3 * 2 * 48 ** 2
    # Our chunked causal attention (models.modeling.causal_attention) computes fewer score entries.
    assert flops.attention_pairs(512, 64) == 512 * 512 * 9 // 16
    assert flops.attention_pairs(130, 64) == 64 * 64 + 64 * 128 + 2 * 130
    assert flops.attention_pairs(100, 64) == flops.attention_pairs(100) == 100 * 100
    chunked = flops.statistics_flops(config, [(2, 128)], depth=1, num_products=0, chunk=64)
    full = flops.statistics_flops(config, [(2, 128)], depth=1, num_products=0)
    assert full["total"] - chunked["total"] == 2 * 4 * 4 * 16 * (128 * 128 - 64 * 64 - 64 * 128)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random 5-block model with SmolLM2's tokenizer, as a Hugging Face directory."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tinyck") / "hf", 5, **TINY)


def _tiny_cfg(path):
    cfg = suite.quick_config(default_config())
    cfg.model = str(path)
    cfg.num_blocks = 2
    cfg.cosine.steps = 4
    cfg.eval.window = 32
    return cfg


def test_suite_runs_and_renders(tiny_checkpoint, tmp_path):
    options = suite.SuiteOptions(repeats=1, solvers=("lstsq", "cosine"), peak_n=64, ppl_windows=1,
                                 threads=1, workdir=str(tmp_path), command="test")
    report = suite.run_suite(_tiny_cfg(tiny_checkpoint), options)
    json.dumps(report)  # JSON-able
    for solver in ("lstsq", "cosine"):
        entry = report["ours"][solver]
        assert [r["cold"] for r in entry["runs"]] == [True, False]
        warm = entry["summary"]["warm"]
        assert warm["end_to_end"]["median"] == pytest.approx(
            sum(warm[k]["median"] for k in ("statistics", "selection", "solve", "surgery")))
        assert entry["flops"]["padded_tokens"] >= entry["flops"]["real_tokens"] > 0
        assert entry["flops"]["passes"][0]["depth"] == 5
    # Same texts on both sides: the same number of real tokens.
    assert report["torch"]["flops"]["real_tokens"] == report["ours"]["lstsq"]["flops"]["real_tokens"]
    assert {r["variant"].split(" ")[0] for r in report["quality"]} == {"dense", "drop", "lstsq", "cosine"}
    assert "statistics pass >= 50 % of matmul peak" in report["targets"]
    text = tables.markdown(report)
    assert "| **end to end**" in text and "PyTorch baseline" in text and "matmul peak (float32" in text


def test_memory_child_reports_peak_and_buffer(tiny_checkpoint):
    cfg = _tiny_cfg(tiny_checkpoint)
    cfg.solver, cfg.cosine.token_budget_mb = "cosine", 1
    row = memory.child({"model": str(tiny_checkpoint), "config": cfg.to_dict()})
    assert row["pipeline_peak_mib"] >= row["rss_before_mib"] > 0
    assert 0 < row["token_buffer_mib"] <= row["token_budget_mib"] == 1


@pytest.mark.slow
def test_benchmark_script_memory_table(tiny_checkpoint, tmp_path):
    """The command line, memory part alone: one fresh process per row, flat for lstsq."""
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--quick", f"--config.model={tiny_checkpoint}",
         "--config.num_blocks=2", "--nospeed", "--memory", "--memory_multipliers=1,4", "--solvers=lstsq",
         f"--output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert [r["multiplier"] for r in report["memory"]["rows"]] == [1, 4]
    assert report["memory"]["rows"][1]["real_tokens"] > report["memory"]["rows"][0]["real_tokens"]
    assert "ours" not in report and "lstsq: peak memory growth 1x -> 4x < 10 %" in report["targets"]
    assert (out / "results.md").read_text().startswith("# ReplaceMe benchmark")


@pytest.mark.slow
def test_baseline_matches_ours_on_smollm2(smollm2, tmp_path):
    """Real weights: the baseline's T equals ours on the same BoolQ passages (pads excluded)."""
    from replaceme_jax.data import load_calibration_texts, tokenize_texts
    model, tok = smollm2
    path = save_hf(model, tmp_path / "hf", tokenizer=tok)
    seqs = tokenize_texts(load_calibration_texts("boolq", num_samples=24, seed=3), tok, 160, add_bos=False)
    cut = (20, 28)
    ours = gather_statistics(model, make_batches(seqs, batch_size=6, max_length=160, pad_id=tok.pad_token_id),
                             StatsRequest(cuts=(cut,)))
    theirs = tr.run(tr.load_model(path), tr.official_batches(seqs, 6, tok.pad_token_id), 8, cut=cut,
                    include_pad=False)
    T_ours = np.asarray(solvers.lstsq(ours.normal_equations(cut)).T)
    assert np.linalg.norm(T_ours - theirs.T) / np.linalg.norm(theirs.T) < 1e-4
