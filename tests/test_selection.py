"""Selection rules and the greedy choice of non-overlapping cuts."""
import pytest

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme.cuts import parse_cuts
from replaceme_jax.replaceme.selection import choose_cuts, get_rule


def test_choose_single_best():
    scores = {(1, 3): 0.5, (2, 4): 0.1, (3, 5): 0.3}
    assert choose_cuts(scores) == [(2, 4)]


def test_choose_several_keeps_anchors_alive():
    scores = {(1, 3): 0.2, (2, 4): 0.1, (3, 5): 0.15, (4, 6): 0.12, (5, 7): 0.3, (6, 8): 0.9}
    # (2,4) first; (4,6) touches it -> merged with merge_consecutive
    assert choose_cuts(scores, num_transforms=2, merge_consecutive=True) == [(2, 6)]
    # without merging, touching/overlapping cuts are skipped: next is (5,7)... overlaps (4,6)? no: (4,6)
    # is rejected (touches (2,4)), (3,5) overlaps, (1,3) overlaps, (5,7) is separated by block 4.
    assert choose_cuts(scores, num_transforms=2, merge_consecutive=False) == [(2, 4), (5, 7)]


def test_not_enough_cuts():
    with pytest.raises(ReplaceMeError, match="non-overlapping"):
        choose_cuts({(1, 3): 0.1, (2, 4): 0.2}, num_transforms=2, merge_consecutive=False)


def test_parse_cuts():
    assert parse_cuts("20-28, 5-7", 30) == [(5, 7), (20, 28)]
    with pytest.raises(ReplaceMeError, match="overlap"):
        parse_cuts("3-8,5-9", 30)
    with pytest.raises(ReplaceMeError, match="anchor"):
        parse_cuts("3-5,5-9", 30)
    with pytest.raises(ReplaceMeError, match="invalid cut"):
        parse_cuts("25-31", 30)
    with pytest.raises(ReplaceMeError, match="cannot parse"):
        parse_cuts("a-b", 30)


def test_unknown_rule():
    with pytest.raises(ReplaceMeError, match="unknown selection rule"):
        get_rule("nope")


def test_residual_rule_warns_once_when_tokens_are_too_few(caplog):
    """Fewer calibration tokens than the hidden size: MᵀM is singular for every candidate, so the
    residual cannot rank cuts; one warning says so and names the fixes (not one per candidate)."""
    import numpy as np
    from flax import nnx

    from replaceme_jax.data import make_batches
    from replaceme_jax.models.config import ModelConfig
    from replaceme_jax.models.modeling import CausalLM
    from replaceme_jax.replaceme.cuts import candidate_cuts
    from replaceme_jax.replaceme.statistics import StatsRequest, gather_statistics

    model = CausalLM(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                 num_attention_heads=4, num_key_value_heads=2), rngs=nnx.Rngs(0))
    seqs = [list(np.random.default_rng(i).integers(0, 64, size=6)) for i in range(3)]  # 18 tokens < 32
    stats = gather_statistics(model, make_batches(seqs, batch_size=4, max_length=8),
                              StatsRequest(cuts=tuple(candidate_cuts(5, 2))))
    with caplog.at_level("WARNING"):
        scores = get_rule("residual")(stats, 2)
    assert len(scores) == len(candidate_cuts(5, 2))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "singular for 3 of 3 candidate cuts (18 calibration tokens" in messages[0]
    assert "selection='angular'" in messages[0]
