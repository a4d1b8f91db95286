"""Anchor tuning (``heal.anchor_steps``): each cut's anchor learns the removed run, nothing else moves."""
import jax
import numpy as np
import pytest
from flax import nnx

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme.anchor_tuning import tune_anchors
from replaceme_jax.replaceme.surgery import apply_cuts
from test_streamline import _batches, _rel_error, _stream
from tiny_models import random_tiny_llama


def _token_rel_error(a, b, mask):
    w = np.asarray(mask) > 0
    return float(np.mean((np.sum((a - b) ** 2, -1) / np.sum(b ** 2, -1))[w]))


def _flat(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("loss", ["mse", "token"])
def test_two_cuts_each_anchor_trained_from_the_start_model(loss):
    model = random_tiny_llama(64, num_hidden_layers=9)
    cuts = [(2, 4), (6, 8)]  # pruned: 7 blocks; anchors 1 and 6 - 1 - 2 = 3
    rng = np.random.default_rng(0)
    transforms = [np.eye(64, dtype=np.float32) + 0.05 * rng.standard_normal((64, 64)).astype(np.float32)
                  for _ in cuts]
    start = apply_cuts(model, cuts, transforms)
    before = _flat(start)
    batches = _batches(64)
    tuned = tune_anchors(model, start, batches, cuts, steps=40, lr=3e-3, loss=loss)
    after = _flat(tuned.model)
    jax.tree.map(np.testing.assert_array_equal, before, _flat(start))  # the start model is untouched
    changed = {p[:3] for p in after if not np.array_equal(after[p], before[p])}
    assert changed == {("model", "layers", 1), ("model", "layers", 3)}
    # Step 0's loss is the start anchor's error on that batch, computed independently in float64.
    error = _rel_error if loss == "mse" else _token_rel_error
    b = batches[int(np.random.default_rng(0).permutation(len(batches))[0])]
    dense_h = _stream(model, b, 4)[3]
    assert tuned.losses[(2, 4)][0] == pytest.approx(error(_stream(start, b, 2)[1], dense_h, b.attention_mask), rel=1e-4)
    # The first anchor reads the dense stream: its error to h_3 falls on every batch.
    for b in batches:
        dense_h = _stream(model, b, 4)[3]
        assert (error(_stream(tuned.model, b, 2)[1], dense_h, b.attention_mask)
                < error(_stream(start, b, 2)[1], dense_h, b.attention_mask))
    for c in cuts:
        assert np.mean(tuned.losses[c][-5:]) < tuned.losses[c][0]


def test_anchor_tuning_errors():
    model = random_tiny_llama(64, num_hidden_layers=5)
    start = apply_cuts(model, [(2, 4)])
    with pytest.raises(ReplaceMeError, match="loss='l1'"):
        tune_anchors(model, start, _batches(64, n=1), [(2, 4)], steps=2, lr=1e-3, loss="l1")
    with pytest.raises(ReplaceMeError, match="leaves 3"):
        tune_anchors(model, model, _batches(64, n=1), [(2, 4)], steps=2, lr=1e-3)
    with pytest.raises(ReplaceMeError, match="no calibration batches"):
        tune_anchors(model, start, [], [(2, 4)], steps=2, lr=1e-3)


def test_tuned_anchors_are_restored_only_for_the_same_run(tmp_path):
    from replaceme_jax.replaceme.anchor_tuning import tune_or_restore
    from replaceme_jax.settings import Settings
    model = random_tiny_llama(64, num_hidden_layers=5)
    cuts = [(2, 4)]
    start = apply_cuts(model, cuts)
    settings = Settings().replace(**{"heal.anchor_steps": 3, "heal.warmup": 1})
    batches = _batches(64, n=2)
    tuned, record = tune_or_restore(model, start, batches, cuts, settings, directory=tmp_path)
    assert record is not None
    restored, again = tune_or_restore(model, start, batches, cuts, settings, directory=tmp_path)
    assert again is None  # read back, not trained again
    jax.tree.map(np.testing.assert_array_equal, _flat(tuned), _flat(restored))
    # Another start (re-fit off, another solver, other calibration) or other tuning settings: refused.
    for change in ({"refit.anchor": False}, {"solver": "diag"}, {"calibration.num_samples": 3}, {"heal.anchor_lr": 1e-2}):
        with pytest.raises(ReplaceMeError, match="holds anchors tuned with other settings"):
            tune_or_restore(model, start, batches, cuts, settings.replace(**change), directory=tmp_path)
