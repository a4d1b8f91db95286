"""The statistics pass against an independent float64 numpy computation on materialised activations."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from replaceme_jax.eval.nll import mean_nll, subset_batches
from replaceme_jax.data import load_calibration_texts, make_batches, tokenize_texts
from replaceme_jax.data.batching import sequences
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.config import ModelConfig
from replaceme_jax.models.modeling import CausalLM
from replaceme_jax.replaceme.cuts import candidate_cuts
from replaceme_jax.replaceme.statistics import StatsRequest, add_statistics, gather_statistics

CUTS = ((20, 28), (5, 9))


@pytest.fixture(scope="module")
def smol_batches(smollm2):
    _, tok = smollm2
    # ~3k tokens: well above d = 576, so the least-squares problem is determined (as in real use).
    # One batch shape (4 x [6, 160]): each pass and the reference forward compile once, not per shape
    # (compiling the 30-block model is most of this test's time on a CPU).
    texts = load_calibration_texts("boolq", num_samples=24, seed=3)
    return make_batches(tokenize_texts(texts, tok, 160, add_bos=False), batch_size=6, max_length=160,
                        buckets=[160], pad_id=tok.pad_token_id)


def materialise(model, batches, blocks):
    """Per-token Y, M, L of ``blocks`` at every position of the non-empty sequences (float64), whether each
    position is a real token, and every block's output (plus the embeddings) on each last real token."""
    rows = {"Y": [], "M": [], "L": [], "real": [], "last": []}
    # The plain forward, jitted (eager is slower than compiling it once for the one batch shape).
    forward = nnx.jit(lambda m, ids, mask: (m(ids, mask, return_intermediates=True)[1], m.embed(ids)))
    for b in batches:
        inter, embedded = forward(model, jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask))
        mask = b.attention_mask.astype(bool)
        valid = mask.any(-1)
        for key, x in (("Y", inter.attn_residual), ("M", inter.mlp_output), ("L", inter.block_output)):
            rows[key].append(np.asarray(x, np.float64)[list(blocks)][:, valid].reshape(len(blocks), -1, x.shape[-1]))
        rows["real"].append(mask[valid].reshape(-1))
        h0 = np.asarray(embedded, np.float64)
        hs = np.concatenate([h0[None], np.asarray(inter.block_output, np.float64)], 0)  # [L+1, B, T, d]
        last = mask.sum(-1) - 1
        rows["last"].append(hs[:, np.arange(len(last)), np.maximum(last, 0)][:, valid])
    out = {k: np.concatenate(v, axis=0 if k == "real" else 1) for k, v in rows.items()}
    out["index"] = {blk: i for i, blk in enumerate(blocks)}
    return out


@pytest.fixture(scope="module")
def smol_reference(smollm2, smol_batches):
    """The materialised activations, once for both pad settings (the expensive part of the check)."""
    blocks = sorted({s - 1 for s, _ in CUTS} | {e - 1 for _, e in CUTS})
    return materialise(smollm2[0], smol_batches, blocks)


def numpy_distances(last, max_n):
    u = last / np.linalg.norm(last, axis=-1, keepdims=True)
    nb = last.shape[0] - 1
    out = np.full((max_n, nb), np.nan)
    for n in range(1, max_n + 1):
        for s in range(0, nb - n + 1):
            cos = np.clip((u[s] * u[s + n]).sum(-1), -1, 1)
            out[n - 1, s] = np.mean(np.arccos(cos) / np.pi)
    return out


@pytest.mark.parametrize("include_pad", [False, True])
def test_smollm2_statistics_match_float64_numpy(smollm2, smol_batches, smol_reference, include_pad):
    model, _ = smollm2
    stats = gather_statistics(model, smol_batches, StatsRequest(max_distance_blocks=29, cuts=CUTS,
                                                                include_pad=include_pad))
    ref, idx = smol_reference, smol_reference["index"]
    rows = slice(None) if include_pad else ref["real"]
    assert stats.num_tokens == ref["M"][:, rows].shape[1]
    np.testing.assert_allclose(stats.distances, numpy_distances(ref["last"], 29), atol=1e-5, equal_nan=True)
    for s, e in CUTS:
        M = ref["M"][idx[s - 1], rows]
        R = ref["L"][idx[e - 1], rows] - ref["Y"][idx[s - 1], rows]
        ne = stats.normal_equations((s, e))
        T_ours = np.linalg.solve(ne.mtm, ne.mtr)
        T_ref = np.linalg.lstsq(M, R, rcond=None)[0]
        assert np.linalg.norm(T_ours - T_ref) / np.linalg.norm(T_ref) <= 1e-5
        assert abs(ne.rtr - (R * R).sum()) / (R * R).sum() <= 1e-6
        # The stream energy after the cut's last block (the budget selection's scale).
        h = ref["L"][idx[e - 1], rows]
        assert abs(stats.stream_sq[e] - (h * h).sum()) / (h * h).sum() <= 1e-6


def test_padding_side_does_not_change_statistics():
    """Left- and right-padded batches of the same sequences give the same sums."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                      num_attention_heads=4, num_key_value_heads=2)
    model = CausalLM(cfg)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 64, size=n) for n in (5, 9, 12, 3, 16, 7)]
    req = StatsRequest(max_distance_blocks=3, cuts=((1, 3), (2, 5)))
    right = gather_statistics(model, make_batches(seqs, batch_size=4, max_length=16), req)
    left = gather_statistics(model, make_batches(seqs, batch_size=4, max_length=16, padding_side="left"), req)
    np.testing.assert_allclose(right.gram, left.gram, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(right.cross, left.cross, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(right.distances, left.distances, atol=1e-6, equal_nan=True)
    assert right.num_tokens == sum(len(s) for s in seqs)
    # Passes over two halves add up to the pass over all (what the calibration study relies on).
    halves = [gather_statistics(model, make_batches(part, batch_size=4, max_length=16), req)
              for part in (seqs[:3], seqs[3:])]
    total = add_statistics(*halves)
    for name in ("gram", "cross", "target_sq", "stream_sq", "distance_sum"):
        np.testing.assert_allclose(getattr(total, name), getattr(right, name), rtol=1e-5, atol=1e-5)
    assert (total.num_tokens, total.num_sequences) == (right.num_tokens, right.num_sequences)
    with pytest.raises(ReplaceMeError, match="different requests"):
        add_statistics(right, gather_statistics(model, make_batches(seqs, batch_size=4, max_length=16),
                                                StatsRequest(cuts=((1, 3),))))


def test_packed_rows_give_the_same_statistics_logits_and_nll():
    """Several sequences per row, kept apart by the mask (RoPE positions restarting per sequence),
    give the sums, distances, per-sequence logits and calibration NLL of one sequence per row."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                      num_attention_heads=4, num_key_value_heads=2)
    model = CausalLM(cfg)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 64, size=n) for n in (5, 9, 12, 3, 16, 7, 2, 11, 4, 30)]
    padded = make_batches(seqs, batch_size=2, max_length=32)
    packed = make_batches(seqs, batch_size=2, max_length=32, pack=True)
    assert sum(b.input_ids.size for b in packed) < sum(b.input_ids.size for b in padded) / 2
    assert packed[0].attention_mask.max() > 1  # rows really hold several sequences
    req = StatsRequest(max_distance_blocks=4, cuts=((1, 3), (2, 5), (1, 5)))
    a, b = gather_statistics(model, padded, req), gather_statistics(model, packed, req)
    assert (a.num_tokens, a.num_sequences) == (b.num_tokens, b.num_sequences) == (sum(map(len, seqs)), len(seqs))
    for name in ("gram", "cross", "target_sq"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.distances, a.distances, atol=1e-6, equal_nan=True)
    # Logits: each packed segment equals its sequence run alone.
    batch = packed[0]
    logits = np.asarray(model(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)))
    for r, row in enumerate(batch.attention_mask):
        for k in range(1, row.max() + 1):
            ids = batch.input_ids[r][row == k]
            alone = np.asarray(model(jnp.asarray(ids[None])))[0]
            np.testing.assert_allclose(logits[r][row == k], alone, atol=1e-5)
    assert mean_nll(model, packed) == pytest.approx(mean_nll(model, padded), rel=1e-6)
    # SLEB's scoring subset: exactly the first sequences, packed as the input was.
    for batches in (packed, padded):
        first = [s.tolist() for b in batches for s in sequences(b)][:3]
        assert [s.tolist() for b in subset_batches(batches, 3) for s in sequences(b)] == first


def test_float32_kahan_accumulation_close_to_float64():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4)
    model = CausalLM(cfg)
    seqs = [np.random.default_rng(i).integers(0, 64, size=16) for i in range(40)]
    batches = make_batches(seqs, batch_size=2, max_length=16)
    f64 = gather_statistics(model, batches, StatsRequest(cuts=((1, 3),), accum_dtype="float64"))
    f32 = gather_statistics(model, batches, StatsRequest(cuts=((1, 3),), accum_dtype="float32"))
    assert np.linalg.norm(f32.gram - f64.gram) / np.linalg.norm(f64.gram) < 1e-6


def test_bad_requests():
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=2)
    model = CausalLM(cfg)
    batches = make_batches([np.arange(8)], batch_size=1, max_length=8)
    with pytest.raises(ReplaceMeError, match="invalid cut"):
        gather_statistics(model, batches, StatsRequest(cuts=((0, 2),)))
    with pytest.raises(ReplaceMeError, match="invalid cut"):
        gather_statistics(model, batches, StatsRequest(cuts=((2, 5),)))
    with pytest.raises(ReplaceMeError, match="cannot remove 4 blocks"):
        candidate_cuts(4, 4)
    with pytest.raises(ReplaceMeError, match="no calibration batches"):
        gather_statistics(model, [], StatsRequest(cuts=((1, 2),)))
    with pytest.raises(ReplaceMeError, match="accum_dtype"):
        gather_statistics(model, batches, StatsRequest(cuts=((1, 2),), accum_dtype="float16"))


def test_non_finite_statistics_are_reported():
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=2)
    model = CausalLM(cfg)
    k = model.model.layers[1].mlp.down_proj.kernel
    k.set_value(k[...].at[0, 0].set(np.inf))
    batches = make_batches([np.arange(8)], batch_size=1, max_length=8)
    with pytest.raises(ReplaceMeError, match="non-finite values"):
        gather_statistics(model, batches, StatsRequest(cuts=((2, 3),)))
