"""scripts/convert_checkpoint.py end to end, run as a user would (subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import transformers

from replaceme_jax.checkpoints import load_pretrained
from replaceme_jax.checkpoints.hf import load_hf, save_hf
from replaceme_jax.checkpoints.keymap import abstract_model, param_items
from replaceme_jax.models.config import ModelConfig
from tiny_models import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_checkpoint.py"


def _start(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc):
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf = json.loads(transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, architectures=["LlamaForCausalLM"]).to_json_string())
    model = abstract_model(ModelConfig.from_hf_config(hf))
    rng = np.random.RandomState(0)
    for _, var in param_items(model):
        var.set_value(jax.numpy.asarray(rng.randn(*var.shape), var.dtype))
    return save_hf(model, tmp_path_factory.mktemp("src") / "hf", tokenizer=word_tokenizer())


def _params(model):
    return {p: np.asarray(v[...]) for p, v in param_items(model)}


def test_hf_to_orbax_and_to_hf_bfloat16(hf_dir, tmp_path):
    source, _ = load_hf(hf_dir)
    to_orbax = _start(f"--input={hf_dir}", f"--output={tmp_path / 'orbax'}", "--format=orbax")
    to_hf16 = _start(f"--input={hf_dir}", f"--output={tmp_path / 'hf16'}", "--format=hf",
                     "--dtype=bfloat16")

    rc, out, err = _finish(to_orbax)
    assert rc == 0, err
    summary = out.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith(f"wrote orbax checkpoint {tmp_path / 'orbax'}")
    assert "llama, 2 blocks" in summary[0] and "tokenizer included" in summary[0]
    # load_pretrained (what --input goes through) recognises the Orbax output.
    restored, tokenizer = load_pretrained(str(tmp_path / "orbax"))
    for k, v in _params(source).items():
        np.testing.assert_array_equal(_params(restored)[k], v)
    assert tokenizer.encode("w3 w4 w9") == [6, 7, 12]

    rc, out, err = _finish(to_hf16)
    assert rc == 0, err
    assert "bfloat16" in out
    converted, tokenizer = load_hf(tmp_path / "hf16", param_dtype="bfloat16")
    for k, v in _params(source).items():
        np.testing.assert_array_equal(_params(converted)[k], v.astype(ml_dtypes.bfloat16))
    assert tokenizer.encode("w3 w4 w9") == [6, 7, 12]


def test_bad_input_and_existing_output_exit_1_with_one_line(hf_dir, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    runs = {
        "missing input": _start(f"--input={tmp_path / 'nope'}", f"--output={tmp_path / 'o1'}"),
        "unknown name": _start("--input=not-a-model", f"--output={tmp_path / 'o2'}"),
        "occupied output": _start(f"--input={hf_dir}", f"--output={occupied}", "--format=orbax"),
    }
    expected = {"missing input": str(tmp_path / "nope"), "unknown name": "not-a-model",
                "occupied output": "--overwrite"}
    for case, proc in runs.items():
        rc, out, err = _finish(proc)
        assert rc == 1, (case, err)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected[case] in errors[0], (case, err)
        assert "Traceback" not in err, case
    assert [p.name for p in tmp_path.iterdir()] == ["occupied"]
    assert (occupied / "keep.txt").read_text() == "x"


@pytest.mark.slow
def test_default_model_to_hf_runs_in_transformers(smollm2, tmp_path):
    """The embedded GGUF, converted by the script, gives transformers the same logits as ours."""
    model, tokenizer = smollm2
    rc, out, err = _finish(_start("--input=smollm2-135m", f"--output={tmp_path / 'hf'}"))
    assert rc == 0, err
    assert "llama, 30 blocks, d=576" in out
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = ["The capital of France is", "ReplaceMe prunes transformer blocks without training."]
    for text in texts:
        assert hf_tok.encode(text) == tokenizer.encode(text)
    batch = tokenizer(texts, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    import torch

    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          position_ids=torch.tensor(positions)).logits.numpy()
    ours = np.asarray(model(ids, mask))
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-3
