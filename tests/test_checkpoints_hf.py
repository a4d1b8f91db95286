"""Hugging Face safetensors import/export, checked against transformers' own PyTorch models.

Small random configs of every supported family are built with transformers' config classes, so
``load_hf`` doubles as the module parity test: our logits must equal transformers' on a batch with
right and left padding.
"""
import json

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from replaceme_jax.checkpoints import hf as hf_io
from replaceme_jax.checkpoints.hf import load_hf, save_hf
from replaceme_jax.checkpoints.keymap import param_items
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.config import ModelConfig
from tiny_models import (FAMILIES, SMALL, padded_batch, random_model, randomize, saved_reference,
                         word_tokenizer)

ATOL = 1e-4


def _torch_logits(torch_model, ids, mask):
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        out = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def _max_err(ours, ref, mask):
    real = mask.astype(bool)
    return float(np.abs(np.asarray(ours)[real] - ref[real]).max())


def _params(model):
    return {p: np.asarray(v[...]) for p, v in param_items(model)}


def _assert_bit_identical(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(pa[k].view(np.uint8), pb[k].view(np.uint8), err_msg=str(k))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, torch model, its save_pretrained directory)."""
    model, path = saved_reference(request.param, FAMILIES[request.param](), tmp_path_factory)
    return request.param, model, path


def test_load_hf_matches_transformers(family):
    name, torch_model, path = family
    model, tokenizer = load_hf(path)
    assert tokenizer is None
    ids, mask = padded_batch(model.config.vocab_size)
    ref = _torch_logits(torch_model, ids, mask)
    assert np.abs(ref).max() > 1.0  # a meaningful comparison, not near-zero logits
    assert _max_err(model(ids, mask), ref, mask) <= ATOL, name


def test_save_hf_loads_in_transformers_and_back(family, tmp_path):
    name, torch_model, path = family
    model, _ = load_hf(path)
    out = save_hf(model, tmp_path / "export")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    reloaded_torch = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager").eval()
    ids, mask = padded_batch(model.config.vocab_size)
    ours = model(ids, mask)
    assert _max_err(ours, _torch_logits(reloaded_torch, ids, mask), mask) <= ATOL, name
    reloaded, _ = load_hf(out)
    _assert_bit_identical(model, reloaded)
    assert reloaded.config == model.config


@pytest.fixture()
def small_model():
    hf = json.loads(transformers.LlamaConfig(**SMALL).to_json_string())  # what save_pretrained writes
    return random_model(ModelConfig.from_hf_config(hf))


def test_sharded_export_round_trip(small_model, tmp_path):
    model = small_model
    out = save_hf(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / hf_io.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / hf_io.WEIGHTS_NAME).exists()
    assert all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in _params(model).values())
    _assert_bit_identical(model, load_hf(out)[0])
    reloaded_torch = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ids, mask = padded_batch(model.config.vocab_size)
    assert _max_err(model(ids, mask), _torch_logits(reloaded_torch.eval(), ids, mask), mask) <= ATOL


@pytest.mark.parametrize("family_name", ["qwen2-tied", "qwen3"])
def test_fewer_layers_export_is_accepted_by_transformers(family_name, tmp_path):
    hf_config = json.loads(FAMILIES[family_name]().to_json_string())  # what save_pretrained writes
    pruned = ModelConfig.from_hf_config(hf_config).without_layers([1])
    model = random_model(pruned, seed=3)
    out = save_hf(model, tmp_path / "pruned")
    reloaded_torch = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager").eval()
    assert reloaded_torch.config.num_hidden_layers == 2
    layer_types = getattr(reloaded_torch.config, "layer_types", None)
    if "layer_types" in hf_config:
        assert layer_types is not None and len(layer_types) == 2
    ids, mask = padded_batch(pruned.vocab_size)
    assert _max_err(model(ids, mask), _torch_logits(reloaded_torch, ids, mask), mask) <= ATOL


def test_bfloat16_round_trip(tmp_path):
    config = transformers.Qwen3Config(**SMALL, head_dim=16)
    torch_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize(torch_model, seed=2)
    torch_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="numpy") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"

    # BF16 on disk -> float32 parameters: an exact upcast of transformers' own tensors.
    f32, _ = load_hf(tmp_path / "bf16")
    torch_q = torch_model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(f32.model.layers[0].self_attn.q_proj.kernel[...]), torch_q.T)

    bf16, _ = load_hf(tmp_path / "bf16", param_dtype="bfloat16")
    kernel = np.asarray(bf16.model.layers[0].self_attn.q_proj.kernel[...])
    assert kernel.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(kernel.astype(np.float32), torch_q.T)

    out = save_hf(bf16, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    _assert_bit_identical(bf16, load_hf(out, param_dtype="bfloat16")[0])

    # transformers reads our bf16 file; computed in float32 on both sides, logits agree.
    reloaded_torch = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32).eval()
    ids, mask = padded_batch(config.vocab_size)
    assert _max_err(bf16(ids, mask), _torch_logits(reloaded_torch, ids, mask), mask) <= ATOL


# ----------------------------------------------------------------------------- saving safety
def test_save_refuses_nonempty_dir_unless_overwrite(small_model, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(ReplaceMeError, match="overwrite") as e:
        save_hf(small_model, target)
    assert str(target) in str(e.value)
    assert (target / "keep.txt").read_text() == "user data"
    save_hf(small_model, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()


def test_failed_write_leaves_nothing_behind(small_model, tmp_path, monkeypatch):
    calls, real_save_file = [], hf_io.save_file

    def failing_save_file(tensors, filename, metadata=None):
        """The second shard write fails, after the first shard is on disk."""
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf_io, "save_file", failing_save_file)
    with pytest.raises(OSError, match="injected"):
        save_hf(small_model, tmp_path / "out", max_shard_bytes=20_000)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # no target, no temp directory

    # Overwriting an existing checkpoint that then fails keeps the old one intact.
    monkeypatch.undo()
    good = save_hf(small_model, tmp_path / "out")
    before = sorted(p.name for p in good.iterdir())
    calls.clear()
    monkeypatch.setattr(hf_io, "save_file", failing_save_file)
    with pytest.raises(OSError, match="injected"):
        save_hf(small_model, good, overwrite=True, max_shard_bytes=20_000)
    assert sorted(p.name for p in good.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ----------------------------------------------------------------------------- loading errors
@pytest.fixture()
def hf_dir(small_model, tmp_path):
    return save_hf(small_model, tmp_path / "ckpt")


def _error(path, **kw) -> str:
    with pytest.raises(ReplaceMeError) as e:
        load_hf(path, **kw)
    return str(e.value)


def test_error_missing_directory(tmp_path):
    msg = _error(tmp_path / "nope")
    assert str(tmp_path / "nope") in msg and "does not exist" in msg and "Fix" in msg


def test_error_path_is_a_file(hf_dir):
    msg = _error(hf_dir / "model.safetensors")
    assert str(hf_dir / "model.safetensors") in msg and "directory" in msg and "Fix" in msg


def test_error_missing_config(hf_dir):
    (hf_dir / "config.json").unlink()
    msg = _error(hf_dir)
    assert str(hf_dir / "config.json") in msg and "missing" in msg and "Fix" in msg


def test_error_unparsable_config(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    msg = _error(hf_dir)
    assert str(hf_dir / "config.json") in msg and "Fix" in msg


def test_error_missing_weights(hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    msg = _error(hf_dir)
    assert str(hf_dir) in msg and "model.safetensors" in msg
    assert "pytorch_model.bin" in msg and "safe_serialization=True" in msg


def test_error_unknown_architecture(hf_dir):
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4).to_dict()
    (hf_dir / "config.json").write_text(json.dumps(gpt2))
    msg = _error(hf_dir)
    assert str(hf_dir / "config.json") in msg and "'gpt2'" in msg
    assert "qwen3" in msg and "Fix" in msg


def test_error_truncated_safetensors(hf_dir):
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    msg = _error(hf_dir)
    assert str(weights) in msg and "truncated or corrupt" in msg and "Fix" in msg
    assert "\n" not in msg


def test_error_corrupt_header(hf_dir):
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header}" + b"\x00" * 64)
    msg = _error(hf_dir)
    assert str(weights) in msg and "truncated or corrupt" in msg


def test_error_wrong_shapes_are_all_listed(hf_dir, small_model):
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 48  # every MLP projection now mismatches
    (hf_dir / "config.json").write_text(json.dumps(config))
    msg = _error(hf_dir)
    assert str(hf_dir) in msg and "Fix" in msg
    layers = small_model.config.num_hidden_layers
    for i in range(layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{i}.mlp.{proj}.weight" in msg
    assert f"({3 * layers} problem(s))" in msg


def test_error_index_points_at_missing_shard(small_model, tmp_path):
    out = save_hf(small_model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / hf_io.INDEX_NAME).read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (out / gone).unlink()
    msg = _error(out)
    assert str(out / hf_io.INDEX_NAME) in msg and gone in msg and "Fix" in msg


def test_error_index_names_tensor_missing_from_shard(small_model, tmp_path):
    out = save_hf(small_model, tmp_path / "sharded", max_shard_bytes=20_000)
    index_path = out / hf_io.INDEX_NAME
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    msg = _error(out)
    assert str(index_path) in msg and "model.layers.0.mlp.extra.weight" in msg and "Fix" in msg


def test_load_copies_tokenizer(hf_dir, tmp_path):
    tokenizer = word_tokenizer(20)
    out = save_hf(load_hf(hf_dir)[0], tmp_path / "with_tok", tokenizer=tokenizer)
    _, loaded = load_hf(out)
    text = "w1 w2 w3 w7"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.eos_token == "</s>"


def test_place_is_forwarded(hf_dir):
    seen = []
    device = jax.devices()[0]

    def place(path, sds):
        seen.append(path)
        return jax.sharding.SingleDeviceSharding(device)

    model, _ = load_hf(hf_dir, place=place)
    assert sorted(seen) == sorted(p for p, _ in param_items(model))
    assert all(v[...].sharding == jax.sharding.SingleDeviceSharding(device) for _, v in param_items(model))
