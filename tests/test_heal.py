"""The healing stage: KL against float64 numpy, adapters start as the identity edit and fold into W,
distillation lowers the KL, and an interrupted run resumes to the same result."""
import numpy as np
import pytest
from flax import nnx

from replaceme_jax.data import make_batches
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.config import ModelConfig
from replaceme_jax.replaceme.heal import distillation_loss, fold, heal, init_adapters, pruned_neighbours
from replaceme_jax.replaceme.surgery import apply_cuts
from replaceme_jax.settings import Settings
from tiny_models import random_model

L, D, V = 6, 16, 40
CUTS = [(2, 4)]


@pytest.fixture(scope="module")
def pair():
    cfg = ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=L,
                      num_attention_heads=2, num_key_value_heads=1)
    dense = random_model(cfg, seed=3, scale=0.3)  # O(1) logits: a KL well above float32 rounding
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, V, size=int(k)) for k in rng.integers(8, 20, size=64)]
    batches = make_batches(seqs, batch_size=4, max_length=20, buckets=(20,))
    return dense, apply_cuts(dense, CUTS), batches


def params(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def kl_numpy(dense, student, batches):
    """Mean KL(dense ‖ student) over real tokens, float64 numpy on the two models' logits."""
    total, count = 0.0, 0
    for b in batches:
        t = np.asarray(dense(b.input_ids, b.attention_mask), np.float64)
        s = np.asarray(student(b.input_ids, b.attention_mask), np.float64)
        lt = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1, keepdims=True)
        ls = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
        kl = (np.exp(lt) * (lt - ls)).sum(-1)
        real = np.asarray(b.attention_mask) > 0
        total, count = total + kl[real].sum(), count + real.sum()
    return total / count


def test_neighbours_of_cuts_in_pruned_indices():
    for cuts, depth in (([(2, 4), (6, 7)], 9), ([(1, 3)], 5), ([(3, 5)], 5)):
        kept = [i for i in range(depth) if not any(s <= i < e for s, e in cuts)]
        want = sorted({kept.index(s - 1) for s, _ in cuts} | {kept.index(e) for _, e in cuts if e < depth})
        assert pruned_neighbours(cuts, depth) == want


def test_loss_is_the_kl_and_fresh_adapters_change_nothing(pair):
    dense, student, batches = pair
    b = batches[0]
    ours = float(distillation_loss(dense(b.input_ids, b.attention_mask), student(b.input_ids, b.attention_mask),
                                   b.attention_mask))
    np.testing.assert_allclose(ours, kl_numpy(dense, student, [b]), rtol=2e-5)
    adapters = init_adapters(student, [1, 2], ["down_proj", "q_proj"], 4, 0)
    same = fold(student, adapters, 2.0)
    for k, v in params(student).items():
        np.testing.assert_array_equal(params(same)[k], v)


@pytest.mark.parametrize("blocks", ["adjacent", "all"])
def test_healing_lowers_the_kl_and_touches_only_the_adapted_kernels(pair, blocks):
    dense, student, batches = pair
    before = params(student)
    settings = Settings().replace(**{"heal.steps": 48, "heal.lr": 1e-2, "heal.rank": 4, "heal.warmup": 2,
                                     "heal.modules": "o_proj,down_proj,up_proj", "heal.blocks": blocks})
    train, held_out = batches[:12], batches[12:]
    result = heal(student, dense, train, settings, cuts=CUTS)
    adapted_blocks = [1, 2] if blocks == "adjacent" else list(range(student.config.num_hidden_layers))
    assert result.blocks == adapted_blocks and result.steps == 48
    assert result.tokens == sum(int((np.asarray(b.attention_mask) > 0).sum()) for b in train) * 4
    assert kl_numpy(dense, result.model, train) < 0.5 * kl_numpy(dense, student, train)
    assert kl_numpy(dense, result.model, held_out) < 0.9 * kl_numpy(dense, student, held_out)
    after = params(result.model)
    assert params(student).keys() == after.keys()
    for k, v in before.items():
        np.testing.assert_array_equal(params(student)[k], v)  # the student is not modified
        adapted = k[2:3] in [(b,) for b in adapted_blocks] and k[-2] in ("o_proj", "down_proj", "up_proj")
        assert adapted != np.array_equal(after[k], v), k


def test_interrupted_healing_resumes_to_the_same_model(pair, tmp_path):
    dense, student, batches = pair
    settings = Settings().replace(**{"heal.steps": 10, "heal.lr": 3e-3, "heal.rank": 4, "heal.checkpoint_every": 4,
                                     "heal.modules": "down_proj"})
    whole = heal(student, dense, batches[:3], settings, cuts=CUTS)

    def stop(step, _):
        if step == 6:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        heal(student, dense, batches[:3], settings, cuts=CUTS, directory=tmp_path / "h", on_step=stop)
    resumed = heal(student, dense, batches[:3], settings, cuts=CUTS, directory=tmp_path / "h")
    assert resumed.resumed_from == 6 and resumed.steps == 10
    assert [s for s, _ in resumed.losses] == list(range(1, 11))
    np.testing.assert_allclose([v for _, v in resumed.losses], [v for _, v in whole.losses], rtol=1e-5)
    for k, v in params(whole.model).items():
        np.testing.assert_allclose(params(resumed.model)[k], v, rtol=1e-5, atol=1e-7)
    with pytest.raises(ReplaceMeError, match="holds a healing run with other settings"):
        heal(student, dense, batches[:3], settings.replace(**{"heal.lr": 1e-3}), cuts=CUTS, directory=tmp_path / "h")
    # Another start (the pruned model before healing) is another run, never resumed from this state.
    for change, key in (({"refit.anchor": not settings.refit.anchor}, "refit"), ({"solver": "diag"}, "solver"),
                        ({"calibration.num_samples": 3}, "calibration")):
        with pytest.raises(ReplaceMeError, match=rf"other settings \({key} differ\)"):
            heal(student, dense, batches[:3], settings.replace(**change), cuts=CUTS, directory=tmp_path / "h")
    assert settings.pruning_dict().keys().isdisjoint({"heal", "output_dir", "eval", "mesh", "progress"})


def test_heal_settings_errors():
    for changes, message in (({"heal.steps": 5, "heal.lr": 0.0}, "heal.lr"),
                             ({"heal.steps": 5, "heal.modules": "ffn"}, "heal.modules"),
                             ({"heal.steps": 5, "heal.blocks": "x"}, "heal.blocks"),
                             ({"heal.steps": -1}, "heal.steps"),
                             ({"heal.steps": 5, "heal.rank": 0}, "heal.rank"),
                             ({"heal.anchor_steps": -1}, "heal.anchor_steps"),
                             ({"heal.anchor_steps": 5, "heal.anchor_lr": 0.0}, "heal.anchor_lr"),
                             ({"heal.anchor_steps": 5, "heal.anchor_loss": "msee"}, "did you mean 'mse'")):
        with pytest.raises(ReplaceMeError, match=message):
            Settings().replace(**changes)
