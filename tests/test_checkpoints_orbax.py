"""Orbax checkpoints: bit-identical round trip, config and tokenizer kept, atomic and refusing."""
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import transformers

from replaceme_jax.checkpoints import orbax_io
from replaceme_jax.checkpoints.keymap import param_items
from replaceme_jax.checkpoints.orbax_io import read_orbax_metadata, restore_orbax, save_orbax
from replaceme_jax.checkpoints.registry import checkpoint_kind
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.config import ModelConfig
from tiny_models import random_model, word_tokenizer

# Not tiny_models.SMALL on purpose: a Qwen3 (q/k norms, head_dim 16) whose vocabulary of 40 holds
# word_tokenizer()'s ids, and whose intermediate size (48) the shape-mismatch test's message names.
SMALL = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _config(**overrides) -> ModelConfig:
    # As save_pretrained writes it (with "architectures").
    hf = json.loads(transformers.Qwen3Config(**SMALL, architectures=["Qwen3ForCausalLM"]).to_json_string())
    return ModelConfig.from_hf_config(hf, **overrides)


def _model(config: ModelConfig, seed=0):
    return random_model(config, seed)


def _params(model):
    return {p: np.asarray(v[...]) for p, v in param_items(model)}


def _assert_bit_identical(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(pa[k].view(np.uint8), pb[k].view(np.uint8), err_msg=str(k))


@pytest.fixture(scope="module")
def model():
    return _model(_config())


@pytest.fixture()
def checkpoint(model, tmp_path):
    return save_orbax(model, tmp_path / "ckpt", metadata={"cut": [4, 8], "note": "test"})


def test_round_trip_is_bit_identical(model, tmp_path):
    tokenizer = word_tokenizer()
    path = save_orbax(model, tmp_path / "ckpt", tokenizer=tokenizer, metadata={"cut": [4, 8]})
    assert checkpoint_kind(str(path)) == "orbax"
    restored, restored_tok = restore_orbax(path)
    _assert_bit_identical(model, restored)
    assert restored.config == model.config
    assert restored_tok.encode("w1 w5 w29") == tokenizer.encode("w1 w5 w29")
    meta = read_orbax_metadata(path)
    assert meta["metadata"] == {"cut": [4, 8]} and meta["param_dtype"] == "float32"


def test_bfloat16_model_round_trip(tmp_path):
    bf16 = _model(_config(param_dtype="bfloat16", dtype="bfloat16"), seed=1)
    path = save_orbax(bf16, tmp_path / "bf16")
    restored, tokenizer = restore_orbax(path)
    assert tokenizer is None
    assert restored.config == bf16.config and restored.config.param_dtype == "bfloat16"
    _assert_bit_identical(bf16, restored)


def test_param_dtype_override_converts_on_restore(model, checkpoint):
    restored, _ = restore_orbax(checkpoint, param_dtype="bfloat16")
    assert restored.config.param_dtype == "bfloat16"
    for (path, a), (_, b) in zip(param_items(model), param_items(restored)):
        np.testing.assert_array_equal(np.asarray(b[...]),
                                      np.asarray(a[...]).astype(ml_dtypes.bfloat16), err_msg=str(path))


def test_place_chooses_each_sharding(model, checkpoint):
    device = jax.devices()[0]
    seen = []

    def place(path, abstract):
        seen.append((path, abstract.shape))
        return jax.sharding.SingleDeviceSharding(device)

    restored, _ = restore_orbax(checkpoint, place=place)
    assert sorted(seen) == sorted((p, v.shape) for p, v in param_items(model))
    assert all(v[...].sharding == jax.sharding.SingleDeviceSharding(device)
               for _, v in param_items(restored))


def test_refuses_to_overwrite(model, checkpoint):
    with pytest.raises(ReplaceMeError, match="overwrite") as e:
        save_orbax(model, checkpoint)
    assert str(checkpoint) in str(e.value)
    other = _model(_config(), seed=5)
    save_orbax(other, checkpoint, overwrite=True)
    _assert_bit_identical(other, restore_orbax(checkpoint)[0])


class _FailingTokenizer:
    """Fails after the parameters are written: the checkpoint must not appear."""

    def save_pretrained(self, path):
        raise OSError("disk full (injected)")


def test_failed_write_leaves_nothing(model, tmp_path):
    with pytest.raises(OSError, match="injected"):
        save_orbax(model, tmp_path / "ckpt", tokenizer=_FailingTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(model, checkpoint):
    with pytest.raises(OSError, match="injected"):
        save_orbax(_model(_config(), seed=7), checkpoint, overwrite=True, tokenizer=_FailingTokenizer())
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]
    _assert_bit_identical(model, restore_orbax(checkpoint)[0])


def test_metadata_must_be_json(model, tmp_path):
    with pytest.raises(ReplaceMeError, match="JSON"):
        save_orbax(model, tmp_path / "ckpt", metadata={"array": np.zeros(2)})
    assert not (tmp_path / "ckpt").exists()


# ----------------------------------------------------------------------------- restore errors
def _error(path, **kw) -> str:
    with pytest.raises(ReplaceMeError) as e:
        restore_orbax(path, **kw)
    return str(e.value)


def test_error_missing_directory(tmp_path):
    msg = _error(tmp_path / "nope")
    assert str(tmp_path / "nope") in msg and "does not exist" in msg and "Fix" in msg


def test_error_not_an_orbax_checkpoint(checkpoint):
    (checkpoint / orbax_io.MARKER_NAME).unlink()
    msg = _error(checkpoint)
    assert str(checkpoint / orbax_io.MARKER_NAME) in msg and "save_orbax" in msg and "Fix" in msg


def test_error_config_does_not_match_params(checkpoint):
    config_path = checkpoint / "config.json"
    hf = json.loads(config_path.read_text())
    hf["intermediate_size"], hf["num_hidden_layers"] = 40, 4
    config_path.write_text(json.dumps(hf))
    msg = _error(checkpoint)
    assert str(checkpoint) in msg and "Fix" in msg
    # every problem listed: 3 layers x 3 MLP kernels mis-shaped + the 11 parameters of the new layer
    assert "(20 problem(s))" in msg
    assert "model.layers.2.mlp.down_proj.kernel: stored shape (48, 32)" in msg
    assert "missing parameter model.layers.3.self_attn.q_norm.weight" in msg


def test_error_unknown_architecture(checkpoint):
    config_path = checkpoint / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": "gpt2"}))
    msg = _error(checkpoint)
    assert str(config_path) in msg and "'gpt2'" in msg and "Fix" in msg


def test_error_missing_params(checkpoint):
    shutil.rmtree(checkpoint / orbax_io.PARAMS_DIR)
    msg = _error(checkpoint)
    assert str(checkpoint / orbax_io.PARAMS_DIR) in msg and "Fix" in msg


def test_error_damaged_params(checkpoint):
    for f in (checkpoint / orbax_io.PARAMS_DIR).rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data files
            f.write_bytes(f.read_bytes()[:10])
    msg = _error(checkpoint)
    assert str(checkpoint / orbax_io.PARAMS_DIR) in msg and "Fix" in msg


def test_error_bad_marker(checkpoint):
    (checkpoint / orbax_io.MARKER_NAME).write_text("{")
    msg = _error(checkpoint)
    assert str(checkpoint / orbax_io.MARKER_NAME) in msg and "Fix" in msg
