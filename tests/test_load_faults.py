"""Fail fast on broken numbers: non-finite weights at load (HF, Orbax, GGUF, sharded), relative
checkpoint paths, non-finite T from every solver, non-finite evaluation metrics."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from replaceme_jax.checkpoints import load_pretrained
from replaceme_jax.checkpoints.finite import check_finite, non_finite_parameters
from replaceme_jax.checkpoints.hf import load_hf, save_hf
from replaceme_jax.checkpoints.keymap import param_items
from replaceme_jax.checkpoints.orbax_io import restore_orbax, save_orbax
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme import solvers
from replaceme_jax.replaceme.solvers import NormalEquations
from tiny_models import random_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
BAD_HF = "model.layers.1.mlp.down_proj.weight"
BAD_NNX = ("model", "layers", 1, "mlp", "down_proj", "kernel")


@pytest.fixture(scope="module")
def model():
    return random_tiny_llama(vocab_size=40)


def _poison(model, path=BAD_NNX, nans=12, infs=0):
    """Set ``nans`` NaN and ``infs`` -inf entries in one parameter; returns its old value."""
    var = dict(param_items(model))[path]
    flat = np.asarray(var[...]).copy().reshape(-1)
    flat[:nans] = np.nan
    flat[nans:nans + infs] = -np.inf
    old = var[...]
    var.set_value(jax.numpy.asarray(flat.reshape(old.shape)))
    return old


@pytest.fixture()
def poisoned(model):
    old = _poison(model, nans=12, infs=3)
    yield model
    dict(param_items(model))[BAD_NNX].set_value(old)


# ----------------------------------------------------------------------------- load-time checks
def test_clean_model_passes(model):
    assert non_finite_parameters(model) == []
    check_finite(model, "x")


def test_hf_checkpoint_with_nan_names_the_tensor(model, tmp_path):
    path = save_hf(model, tmp_path / "hf")
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    tensors[BAD_HF] = tensors[BAD_HF].copy()
    tensors[BAD_HF].reshape(-1)[[3, 7, 11]] = np.nan
    tensors["model.norm.weight"] = tensors["model.norm.weight"].copy()
    tensors["model.norm.weight"][0] = np.inf
    save_file(tensors, str(weights), metadata={"format": "pt"})
    for load in (load_hf, load_pretrained):
        with pytest.raises(ReplaceMeError) as e:
            load(str(path))
        msg = str(e.value)
        assert msg.startswith(f"checkpoint {path} holds non-finite values in {BAD_HF} (3 NaN, 0 inf); "
                              "the file is corrupt"), msg
    tensors[BAD_HF] = np.zeros_like(tensors[BAD_HF])  # the next bad tensor is named next
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ReplaceMeError, match=r"holds non-finite values in model\.norm\.weight "
                       r"\(0 NaN, 1 inf\)"):
        load_hf(path)


def test_hf_value_that_overflows_float16_is_named(model, tmp_path):
    path = save_hf(model, tmp_path / "hf")
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    tensors[BAD_HF] = tensors[BAD_HF].copy()
    tensors[BAD_HF][0, :2] = 1e6
    save_file(tensors, str(weights), metadata={"format": "pt"})
    load_hf(path, param_dtype="bfloat16")  # finite in bfloat16
    with pytest.raises(ReplaceMeError, match=rf"{BAD_HF} overflows float16 \(0 NaN, 2 inf after conversion\)"):
        load_hf(path, param_dtype="float16")


def test_orbax_checkpoint_with_nan_names_the_nnx_path(poisoned, tmp_path):
    path = save_orbax(poisoned, tmp_path / "ckpt")
    with pytest.raises(ReplaceMeError, match=r"holds non-finite values in "
                       r"model\.layers\.1\.mlp\.down_proj\.kernel \(12 NaN, 3 inf\)"):
        restore_orbax(path)


def test_gguf_with_nan_names_hf_and_gguf_tensor(tmp_path):
    gguf = pytest.importorskip("gguf")
    d, ff, vocab, heads, kv, head_dim = 32, 48, 20, 4, 2, 8
    rng = np.random.RandomState(0)
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for key, value in (("add_block_count", 1), ("add_embedding_length", d),
                       ("add_feed_forward_length", ff), ("add_head_count", heads),
                       ("add_head_count_kv", kv), ("add_context_length", 64),
                       ("add_vocab_size", vocab)):
        getattr(w, key)(value)
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,),
              "blk.0.attn_norm.weight": (d,), "blk.0.ffn_norm.weight": (d,),
              "blk.0.attn_q.weight": (heads * head_dim, d), "blk.0.attn_k.weight": (kv * head_dim, d),
              "blk.0.attn_v.weight": (kv * head_dim, d), "blk.0.attn_output.weight": (d, heads * head_dim),
              "blk.0.ffn_gate.weight": (ff, d), "blk.0.ffn_up.weight": (ff, d),
              "blk.0.ffn_down.weight": (d, ff)}
    for name, shape in shapes.items():
        arr = rng.randn(*shape).astype(np.float32) * 0.1
        if name == "blk.0.ffn_down.weight":
            arr[0, :5] = np.nan
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ReplaceMeError, match=r"model\.layers\.0\.mlp\.down_proj\.weight "
                       r"\(blk\.0\.ffn_down\.weight in the file\) \(5 NaN, 0 inf\)"):
        load_pretrained(str(tmp_path / "tiny.gguf"))


def test_sharded_parameters_are_checked_on_device(tmp_path, model):
    """Parameters on 4 simulated devices, sharded and replicated: the load (host), the device check
    (the numpy path on CPU and the jitted path accelerators take) and a sharded Orbax restore name
    the tensors, with counts that do not multiply over replicas."""
    old = _poison(model, nans=7)
    try:
        save_hf(model, tmp_path / "bad_hf")
    finally:
        dict(param_items(model))[BAD_NNX].set_value(old)
    save_hf(model, tmp_path / "hf")
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from replaceme_jax.checkpoints import finite
        from replaceme_jax.checkpoints.hf import load_hf
        from replaceme_jax.checkpoints.keymap import param_items
        from replaceme_jax.checkpoints.orbax_io import restore_orbax, save_orbax
        from replaceme_jax.errors import ReplaceMeError
        assert jax.device_count() == 4
        mesh = Mesh(jax.devices(), ("x",))
        def place(path, a):
            return NamedSharding(mesh, P(None, "x") if a.ndim == 2 and a.shape[1] % 4 == 0 else P())
        try:
            load_hf({str(tmp_path / "bad_hf")!r}, place=place)
        except ReplaceMeError as e:
            print("LOAD:", e)
        model, _ = load_hf({str(tmp_path / "hf")!r}, place=place)
        params = dict(param_items(model))
        kernel, norm = params[{BAD_NNX!r}], params[("model", "norm", "weight")]
        for var, n in ((kernel, 5), (norm, 2)):
            x = var[...]
            var.set_value(jnp.where(jnp.arange(x.size).reshape(x.shape) < n, jnp.nan, x))
            assert var[...].sharding == x.sharding
        assert len(kernel[...].addressable_shards) == 4 and norm[...].sharding.is_fully_replicated
        print("CPU:", finite.non_finite_parameters(model))
        finite._on_cpu = lambda x: False
        print("JIT:", finite.non_finite_parameters(model))
        save_orbax(model, {str(tmp_path / "orbax")!r})
        try:
            restore_orbax({str(tmp_path / "orbax")!r}, place=place)
        except ReplaceMeError as e:
            print("ORBAX:", e)
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert f"non-finite values in {BAD_HF} (7 NaN, 0 inf)" in lines["LOAD"], proc.stdout
    want = str([(BAD_HF, 5, 0), ("model.norm.weight", 2, 0)])
    assert lines["CPU"] == want and lines["JIT"] == want, proc.stdout
    assert ("non-finite values in model.layers.1.mlp.down_proj.kernel (5 NaN, 0 inf), "
            "model.norm.weight (2 NaN, 0 inf)") in lines["ORBAX"], proc.stdout


# ----------------------------------------------------------------------------- relative paths
def test_relative_orbax_and_hf_paths(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = save_orbax(model, Path("runs") / "m" / "orbax")
    assert saved.is_absolute() and saved == tmp_path / "runs" / "m" / "orbax"
    save_hf(model, "runs/m/hf")
    assert (tmp_path / "runs" / "m" / "hf" / "config.json").is_file()
    want = {p: np.asarray(v[...]) for p, v in param_items(model)}
    for path in ("runs/m/orbax", "./runs/m/../m/orbax", "runs/m", "runs/m/hf"):
        loaded, _ = load_pretrained(path)
        for p, v in param_items(loaded):
            np.testing.assert_array_equal(np.asarray(v[...]), want[p], err_msg=f"{path}: {p}")
    restore_orbax("runs/m/orbax")


# ----------------------------------------------------------------------------- solvers
def _equations(d=4, seed=0):
    rng = np.random.RandomState(seed)
    m = rng.randn(64, d)
    return NormalEquations.from_arrays(m, m @ rng.randn(d, d))


@pytest.mark.parametrize("solver", ["lstsq", "diag"])
def test_inf_statistics_are_an_error(solver):
    ne = _equations()
    bad = NormalEquations(mtm=ne.mtm.copy(), mtr=ne.mtr, rtr=ne.rtr, count=ne.count)
    bad.mtm[1, 1] = np.inf
    with pytest.raises(ReplaceMeError, match="NaN/inf.*overflowed"):
        solvers.get_solver(solver)(bad)


def test_diag_non_finite_transform_from_finite_statistics():
    ne = _equations()
    mtm, mtr = ne.mtm.copy(), ne.mtr.copy()
    mtm[2, 2], mtr[2, 2] = 1e-300, 1e300  # finite, but the ratio overflows float64
    with pytest.raises(ReplaceMeError, match=r"diag solver produced a non-finite T \(0 NaN, 1 inf of "
                       r"16 entries\); nothing was exported.*float16/bfloat16"):
        solvers.diag(NormalEquations(mtm=mtm, mtr=mtr, rtr=ne.rtr, count=ne.count))


def test_lstsq_float32_non_finite_transform_from_finite_statistics():
    ne = _equations()
    big = 3e38  # finite in float32; symmetrising (a + aᵀ) overflows to inf
    mtm = np.full((4, 4), big, np.float32)
    with pytest.raises(ReplaceMeError, match=r"lstsq solver produced a non-finite T.*float32.*"
                       r"precision='float64'"):
        solvers.lstsq(NormalEquations(mtm=mtm, mtr=ne.mtr.astype(np.float32), rtr=ne.rtr, count=ne.count),
                      precision="float32")


def test_check_transform_names_the_cut():
    with pytest.raises(ReplaceMeError, match=r"cosine solver for cut \[4, 9\) produced a non-finite T "
                       r"\(1 NaN, 0 inf of 4 entries\).*lower lr"):
        solvers.check_transform(np.array([[1.0, np.nan], [0.0, 1.0]]), "cosine", "diverged; lower lr",
                                cut=(4, 9))
    np.testing.assert_array_equal(solvers.check_transform(np.eye(2), "lstsq", "-"), np.eye(2))


def _buffer(d=8, n=256, scale=1.0, seed=0):
    from replaceme_jax.replaceme.token_buffer import TokenBuffer
    rng = np.random.RandomState(seed)
    buf = TokenBuffer(n, d)
    m = rng.randn(n, d).astype(np.float32) * scale
    y = rng.randn(n, d).astype(np.float32)
    buf.add(m, y, y + m @ rng.randn(d, d).astype(np.float32))
    return buf


def test_cosine_diverging_optimizer_is_an_error():
    with pytest.raises(ReplaceMeError, match=r"cosine solver diverged.*lr 1e\+30.*lower lr"):
        solvers.cosine(_buffer(), loss="mse", optimizer="sgd", lr=1e30, steps=20, batch_size=32,
                       log_every=10)


def test_cosine_non_finite_activations_are_an_error():
    buf = _buffer(scale=1e30)  # m T overflows float32 in the loss
    with pytest.raises(ReplaceMeError, match="cosine solver"):
        solvers.cosine(buf, loss="mse", steps=10, batch_size=32, log_every=10)


# ----------------------------------------------------------------------------- evaluation metrics
def test_non_finite_task_metric_is_an_error():
    from replaceme_jax.eval.harness import check_finite_metrics
    from replaceme_jax.eval.tasks import TASKS
    spec = TASKS["lambada_openai"]
    check_finite_metrics("m", spec, {"acc": 0.5, "perplexity": 12.0, "acc_stderr": float("nan")},
                         {"ids": ["a"], "acc": [1.0]})
    with pytest.raises(ReplaceMeError, match=r"model 'pruned' on task lambada_openai: non-finite "
                       r"metric perplexity = nan.*float32"):
        check_finite_metrics("pruned", spec, {"acc": 0.0, "perplexity": float("nan")})
    with pytest.raises(ReplaceMeError, match=r"2 of 3 items non-finite"):
        check_finite_metrics("pruned", spec, {"acc": 0.5}, {"acc": [1.0, float("nan"), float("inf")]})


def test_report_marks_and_refuses_non_finite_results(tmp_path):
    from replaceme_jax.eval import report
    rec = {"num_layers": 2, "tasks": {"lambada_openai": {"acc": 0.1, "perplexity": float("inf"), "n": 3,
                                                         "num_fewshot": 0}},
           "heldout_ppl": {"ppl": float("nan")}, "seconds": {"total": 1.0}}
    results = {"tasks": ["lambada_openai"], "limit": 3, "seed": 0, "dense": "m",
               "heldout": {"window": 8, "stride": 8, "num_windows": 1, "num_tokens": 8},
               "models": {"m": rec}}
    assert report.non_finite_metrics(results) == ["m / lambada_openai: perplexity = inf",
                                                  "m / held-out: ppl = nan"]
    text = report.format_report(results)
    assert text.startswith("**FAILED: 2 non-finite metric(s):**") and "**inf**" in text and "**nan**" in text
    with pytest.raises(ReplaceMeError, match="evaluation failed: 2 non-finite metric"):
        report.write_outputs(results, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    json.dumps(results)  # unchanged, still serialisable


def test_missing_harness_is_a_clear_error(monkeypatch):
    import importlib.util

    from replaceme_jax.eval import harness
    if importlib.util.find_spec("lm_eval"):
        harness.check_harness_installed()  # installed: no error
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ReplaceMeError, match=r"lm-evaluation-harness, which is not installed.*\.\[eval\]"):
        harness.evaluate_models([("m", "unused-path")], tasks="boolq")


def test_orbax_restore_into_float16_that_overflows_says_so(model, tmp_path):
    var = dict(param_items(model))[BAD_NNX]
    old = var[...]
    var.set_value(old.at[0, 0].set(1e6))
    try:
        path = save_orbax(model, tmp_path / "ckpt")
    finally:
        var.set_value(old)
    restore_orbax(path)
    with pytest.raises(ReplaceMeError, match=r"down_proj\.kernel \(0 NaN, 1 inf\).*float32 values overflow "
                       r"the requested param_dtype float16"):
        restore_orbax(path, param_dtype="float16")
