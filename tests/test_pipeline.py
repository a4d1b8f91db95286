"""End to end on the embedded default: SmolLM2 30 -> 22 blocks, exported, reloaded by transformers."""
import json

import numpy as np
import pytest

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme.config import default_config
from replaceme_jax.replaceme.pipeline import calibration_batches, prune, run


def small_config(tmp_path, **overrides):
    c = default_config()
    c.calibration.num_samples = 16
    c.calibration.max_length = 128
    c.calibration.batch_size = 8
    c.eval.perplexity_windows = 2
    c.eval.window = 128
    c.progress = False
    c.output_dir = str(tmp_path / "run")
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    cfg = small_config(tmp_path_factory.mktemp("e2e"))
    result, report = run(cfg)
    return cfg, result, report


def test_end_to_end_writes_everything(e2e):
    cfg, result, report = e2e
    assert result.model.config.num_hidden_layers == 22
    assert report["blocks"] == {"dense": 30, "pruned": 22}
    out = cfg.output_dir
    saved = json.load(open(f"{out}/report.json"))
    assert saved["cuts"][0]["cut"] == list(result.cuts[0]) and result.cuts[0][1] - result.cuts[0][0] == 8
    with np.load(f"{out}/transforms.npz") as z:
        (name,) = z.files
        np.testing.assert_array_equal(z[name], result.transforms[0])
    for f in ("distances.csv", "distances.png", "scores.csv", "scores.png", "orbax/replaceme_orbax.json",
              "hf/config.json"):
        assert (result and __import__("os").path.exists(f"{out}/{f}")), f
    ppl = saved["heldout_perplexity"]
    assert ppl["pruned"]["ppl"] > ppl["dense"]["ppl"] > 1
    from replaceme_jax.replaceme.report import format_report
    cal = saved["calibration"]
    assert cal["layout"] == "passages" and cal["passages"] == 16
    assert f"calibration: {cal['sequences']} sequences, {cal['tokens']} tokens from boolq" in format_report(saved)
    stream = {**saved, "calibration": {**cal, "layout": "stream", "sequences": 5}}
    assert f"calibration: 16 passages joined into 5 rows, {cal['tokens']} tokens" in format_report(stream)
    mixed = {**saved, "calibration": {**cal, "layout": "mixed", "sequences": 11}}
    assert ("calibration: 16 passages, the first half as sequences and the rest joined (11 rows), "
            f"{cal['tokens']} tokens") in format_report(mixed)


def test_exported_checkpoint_matches_transformers(e2e):
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    from transformers import AutoModelForCausalLM
    cfg, result, _ = e2e
    hf = AutoModelForCausalLM.from_pretrained(f"{cfg.output_dir}/hf", dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 22
    # The exported tensors are exactly ours ...
    from replaceme_jax.checkpoints.hf import load_hf
    from replaceme_jax.checkpoints.keymap import hf_state_dict
    back, _ = load_hf(f"{cfg.output_dir}/hf")
    for (n1, a), (n2, b) in zip(hf_state_dict(result.model), hf_state_dict(back)):
        assert n1 == n2 and np.array_equal(a, b), n1
    # ... so logits differ only by float32 arithmetic. SmolLM2's residual stream reaches ~2e4
    # (massive activations), so two correct float32 implementations differ by ~1e-4 on logits of
    # ~35 (measured: ours vs transformers-float64 1.6e-4, transformers float32 vs float64 5e-5);
    # the random small configs in test_checkpoints_hf.py hold the 1e-4 bound.
    ids = np.random.default_rng(0).integers(0, 49152, (2, 24)).astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(result.model(jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 3e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_rerun_refuses_then_overwrites(e2e, smollm2):
    cfg, _, _ = e2e
    with pytest.raises(ReplaceMeError, match="already holds files"):
        from replaceme_jax.replaceme.save import save_run
        save_run(cfg, e2e[1], smollm2[1], {})


@pytest.mark.parametrize("field,value,match", [
    ("num_blocks", 30, "num_blocks=30"),
    ("solver", "nope", "unknown solver"),
    ("cuts", "3-8,5-9", "overlap"),
    ("selection", "nope", "unknown selection rule"),
])
def test_bad_settings(smollm2, tmp_path, field, value, match):
    model, tok = smollm2
    cfg = small_config(tmp_path, **{field: value})
    with pytest.raises(ReplaceMeError, match=match):
        prune(model, [], cfg)


def test_empty_calibration(smollm2, tmp_path):
    _, tok = smollm2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cfg = small_config(tmp_path, **{"calibration.source": str(empty), "calibration.num_samples": None})
    with pytest.raises(ReplaceMeError, match="no non-empty text|empty"):
        calibration_batches(tok, cfg.calibration)


def test_multi_cut_one_pass_vs_sequential():
    """Two cuts: one_pass estimates both on the original model; sequential re-calibrates the second
    on the model with the first already replaced (same first transform, different second)."""
    from replaceme_jax.data import make_batches
    from replaceme_jax.models.config import ModelConfig
    from replaceme_jax.models.modeling import CausalLM
    model = CausalLM(ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=10,
                                 num_attention_heads=2, num_key_value_heads=2))
    batches = make_batches([np.random.default_rng(i).integers(0, 64, size=20) for i in range(30)],
                           batch_size=8, max_length=20)
    c = default_config()
    c.num_blocks, c.num_transforms, c.merge_consecutive, c.progress = 2, 2, False, False
    c.refit.anchor = False  # the transforms themselves are compared
    c.multi_cut = "one_pass"
    one = prune(model, batches, c)
    c.multi_cut = "sequential"
    seq = prune(model, batches, c)
    assert one.cuts == seq.cuts and len(one.cuts) == 2
    assert one.model.config.num_hidden_layers == seq.model.config.num_hidden_layers == 6
    np.testing.assert_allclose(one.transforms[0], seq.transforms[0], rtol=1e-6, atol=1e-8)
    assert not np.allclose(one.transforms[1], seq.transforms[1])


def test_budget_and_healing_end_to_end(tmp_path):
    """The main job with a split budget and the healing stage (anchor tuning, then LoRA): the report
    lists the combinations confirmed on validation text, the healed model is saved, and a re-run
    reuses the tuned anchors and resumes the healing to the same model. Plumbing, so a random
    10-block model with SmolLM2's tokenizer stands in for the real 30 blocks (the e2e fixture runs those)."""
    import os
    from replaceme_jax.checkpoints import load_pretrained
    from tiny_models import save_tiny_checkpoint
    tiny = save_tiny_checkpoint(tmp_path / "tiny", 10)
    cfg = small_config(tmp_path, **{"model": str(tiny), "budget.blocks": 4, "budget.min_cut_blocks": 2, "budget.confirm": 2,
                                    "eval.perplexity_windows": 1,
                                    "calibration.validation_samples": 4, "heal.steps": 2, "heal.num_samples": 8,
                                    "heal.max_length": 64, "heal.batch_size": 2, "heal.checkpoint_every": 1,
                                    "heal.anchor_steps": 3, "export_hf": False})
    result, report = run(cfg)
    assert sum(e - s for s, e in result.cuts) == 4 and result.model.config.num_hidden_layers == 6
    considered = report["budget"]["candidates"]
    assert len(considered) >= 2 and all(c["validation_nll"] is not None for c in considered)
    best = min(considered, key=lambda c: c["validation_nll"])
    assert best["cuts"] == [f"{s}-{e}" for s, e in result.cuts]
    assert report["heal"]["steps"] == 2 and report["heal"]["resumed_from"] == 0
    tuning = report["anchor_tuning"]
    assert tuning["restored"] is False and len(tuning["final_loss"]) == len(result.cuts)
    assert tuning["kept"] == (tuning["validation_nll"]["after"] < tuning["validation_nll"]["before"])
    assert {"pruned", "unhealed", "dense"} <= set(report["heldout_perplexity"])
    saved, _ = load_pretrained(os.path.join(cfg.output_dir, "orbax"))
    assert saved.config.num_hidden_layers == 6
    assert os.path.exists(cfg.output_dir + ".heal/heal_run.json")
    cfg.overwrite = True  # the same command again: the finished healing state is reused, not redone
    result_again, again = run(cfg)
    assert again["heal"]["resumed_from"] == 2 and again["cuts"] == report["cuts"]
    assert again["anchor_tuning"]["restored"] is True
    from flax import nnx
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(result.model)), nnx.to_flat_state(nnx.state(result_again.model))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_anchor_tuning_that_overfits_is_not_kept(tmp_path, capsys):
    """A diverging anchor tuning (absurd lr) raises the validation NLL: the untuned model is saved."""
    cfg = small_config(tmp_path, **{"cuts": "12-20", "heal.anchor_steps": 4, "heal.anchor_lr": 3.0, "heal.warmup": 0,
                                    "calibration.validation_samples": 4, "eval.perplexity_windows": 0,
                                    "export_hf": False})
    result, report = run(cfg)
    assert report["anchor_tuning"]["kept"] is False
    assert report["anchor_tuning"]["validation_nll"]["after"] > report["anchor_tuning"]["validation_nll"]["before"]
    assert "untuned anchors are kept" in capsys.readouterr().err
    from flax import nnx
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.replaceme.surgery import apply_cuts
    assert result.refits and not result.refits[0].kept_prior  # the default re-fit is part of the untuned model
    plain = apply_cuts(load_pretrained(cfg.model)[0], result.cuts, result.transforms, [f.kernel for f in result.refits])
    for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(result.model)), nnx.to_flat_state(nnx.state(plain))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
