"""The packed scorer (shared contexts, several items per row, head at scored positions only)
against a plain forward of each (context + continuation) row alone, in float64 numpy."""
import numpy as np
import pytest

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.eval.scoring import TokenScorer
from replaceme_jax.models.config import ModelConfig
from tiny_models import random_model

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
# Not tiny_models.FAMILIES on purpose: the check is against our own plain forward (no transformers
# reference), so these are ModelConfig fields; 2 blocks, vocabulary 97, a window of 5 and a llama3
# original context of 16 that this file's contexts (up to ~48 tokens) cross, and weights of scale
# 0.2 (``random_model``'s recipe otherwise). Sharing tiny_models' table would change the weights and
# lengths every assertion here was written against.
FAMILIES = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "mistral-window": dict(model_type="mistral", sliding_window=5, tie_word_embeddings=False),
    "qwen2-bias": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3-qknorm": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    "llama3-rope": dict(model_type="llama", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
}


def _model(family, seed=0):
    return random_model(ModelConfig.from_hf_config({**BASE, **FAMILIES[family]}), seed, scale=0.2)


def _reference(model, pairs):
    """log p(cont | ctx) and greedy flag per pair, each its own right-padded row of one plain
    forward, log-softmax in float64."""
    width = max(len(c) + len(k) - 1 for c, k in pairs)
    ids = np.zeros((len(pairs), width), np.int32)
    mask = np.zeros((len(pairs), width), np.int32)
    for r, (ctx, cont) in enumerate(pairs):
        row = list(ctx) + list(cont[:-1])
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
    logits = np.asarray(model(ids, mask), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
    out = []
    for r, (ctx, cont) in enumerate(pairs):
        at = np.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        out.append((float(np.sum(logp[r, at, cont])),
                    bool(np.all(np.argmax(logits[r, at], -1) == np.asarray(cont)))))
    return out


def _pairs(seed=0, n_items=12):
    """Multiple-choice-like items (a context with 1-4 continuations), duplicates, one-token answers."""
    rng = np.random.RandomState(seed)
    pairs = []
    for _ in range(n_items):
        ctx = tuple(rng.randint(3, VOCAB, rng.randint(1, 40)))
        for _ in range(rng.randint(1, 5)):
            pairs.append((ctx, tuple(rng.randint(3, VOCAB, rng.randint(1, 9)))))
    pairs.append(pairs[0])                                  # an exact duplicate
    pairs += [(pairs[1][0], (7,)), (pairs[1][0], (8,))]      # one-token answers on a shared context
    return pairs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_scores_equal_one_row_per_pair(family):
    model = _model(family)
    pairs = _pairs()
    scorer = TokenScorer(model, max_length=128, max_batch_tokens=256, max_batch_size=8)
    logprob, greedy = scorer.score_pairs(pairs)
    for (ctx, cont), lp, g, (ref_lp, ref_g) in zip(pairs, logprob, greedy, _reference(model, pairs)):
        assert abs(lp - ref_lp) < 1e-4 * max(1.0, len(cont)), (family, len(ctx), len(cont), lp, ref_lp)
        assert g == ref_g
    # Several items shared each row, and every context ran once.
    distinct_ctx = {ctx for ctx, _ in pairs}
    fed = sum(len(c) for c in distinct_ctx) + sum(len(cont) - 1 for _, cont in set(pairs))
    assert scorer.tokens_fed == fed
    assert len(scorer.shapes) < len(distinct_ctx)


def test_greedy_continuation_is_flagged():
    model = _model("llama")
    ctx = (5, 9, 11, 4)
    cont = []
    row = list(ctx)
    for _ in range(3):  # the model's own greedy continuation
        nxt = int(np.argmax(np.asarray(model(np.asarray([row], np.int32)))[0, -1]))
        cont.append(nxt)
        row.append(nxt)
    scorer = TokenScorer(model, max_length=64)
    _, greedy = scorer.score_pairs([(ctx, tuple(cont)), (ctx, tuple(cont[:2]) + ((cont[2] + 1) % VOCAB,))])
    assert greedy.tolist() == [True, False]


def test_little_padding_on_short_items():
    model = _model("llama")
    pairs = _pairs(seed=1, n_items=200)
    scorer = TokenScorer(model, max_length=256, max_batch_tokens=2048, max_batch_size=16)
    scorer.score_pairs(pairs)
    assert scorer.positions_run < 1.25 * scorer.tokens_fed, (scorer.positions_run, scorer.tokens_fed)


def test_layout_counts_what_scoring_runs():
    """``layout`` (bench_eval's position and FLOP table) predicts, without running the model, the
    tokens and row positions that scoring then runs; scored positions are the distinct pairs'
    continuation tokens."""
    model = _model("llama")
    pairs = _pairs(seed=2, n_items=60)
    scorer = TokenScorer(model, max_length=256, max_batch_tokens=1024, max_batch_size=8)
    plan = scorer.layout(pairs)
    assert scorer.tokens_fed == scorer.positions_run == 0  # nothing ran
    scorer.score_pairs(pairs)
    assert plan == {"fed": scorer.tokens_fed, "run": scorer.positions_run,
                    "scored": sum(len(cont) for _, cont in set(pairs))}
    assert scorer.layout([]) == {"fed": 0, "run": 0, "scored": 0}


def test_long_item_split_and_max_length():
    model = _model("qwen2-bias")
    ctx = tuple(range(3, 33))
    conts = [tuple([10 + i] * 12) for i in range(6)]    # 30 + 6 * 11 > 48: split over items
    scorer = TokenScorer(model, max_length=48)
    logprob, _ = scorer.score_pairs([(ctx, c) for c in conts])
    for lp, (ref, _) in zip(logprob, _reference(model, [(ctx, c) for c in conts])):
        assert abs(lp - ref) < 1e-3
    with pytest.raises(ReplaceMeError, match="exceeds max_length"):
        scorer.score_pairs([(tuple(range(3, 43)), tuple([5] * 10))])
    with pytest.raises(ReplaceMeError, match="empty"):
        scorer.score_pairs([((), (5,))])


def test_on_done_reports_every_pair_once():
    model = _model("llama")
    pairs = _pairs(seed=2)
    seen = []
    scorer = TokenScorer(model, max_length=128, max_batch_tokens=128, max_batch_size=2)
    logprob, _ = scorer.score_pairs(pairs, on_done=lambda i, lp, g: seen.extend(zip(i.tolist(), lp)))
    assert sorted(i for i, _ in seen) == list(range(len(pairs)))
    for i, lp in seen:
        assert lp == logprob[i]


def _trie_nodes(pairs):
    """Distinct prefixes of the model inputs (context + continuation without its last token)."""
    return len({tuple(c + k[:-1])[:j] for c, k in pairs for j in range(1, len(c) + len(k))})


@pytest.mark.parametrize("family", ["llama", "mistral-window", "qwen3-qknorm"])
def test_shared_prefixes_of_different_contexts_run_once(family):
    """WinoGrande's shape: the options differ inside the context (few-shot examples and sentence
    start shared, then the option, then a shared continuation), and PIQA's: answers that begin
    alike. Every distinct prefix is fed once, and scores equal one plain row per pair."""
    model = _model(family)
    rng = np.random.RandomState(3)
    pairs = []
    for _ in range(6):
        shots = tuple(rng.randint(3, VOCAB, rng.randint(10, 30)))
        tail = tuple(rng.randint(3, VOCAB, 4))
        for option in range(2):
            pairs.append((shots + tuple(rng.randint(3, VOCAB, rng.randint(1, 4))), tail))
        goal = tuple(rng.randint(3, VOCAB, 5))
        start = tuple(rng.randint(3, VOCAB, 6))
        for _ in range(2):
            pairs.append((goal, start + tuple(rng.randint(3, VOCAB, rng.randint(1, 6)))))
    scorer = TokenScorer(model, max_length=128, max_batch_tokens=512)
    logprob, greedy = scorer.score_pairs(pairs)
    for (ctx, cont), lp, g, (ref_lp, ref_g) in zip(pairs, logprob, greedy, _reference(model, pairs)):
        assert abs(lp - ref_lp) < 1e-4 * max(1.0, len(cont)), (family, lp, ref_lp)
        assert g == ref_g
    assert scorer.tokens_fed == _trie_nodes(pairs)
    contexts_once = sum(len(c) for c in {c for c, _ in pairs}) + sum(len(k) - 1 for _, k in pairs)
    assert scorer.tokens_fed < 0.75 * contexts_once


def test_unrelated_inputs_sharing_a_few_tokens_stay_apart():
    """Inputs that share only a short opening (a title, "Question:") are separate items: merging
    them would save two tokens each and make one long item."""
    from replaceme_jax.eval.scoring import _build_items
    model = _model("llama")
    rng = np.random.RandomState(4)
    pairs = [((5, 6) + tuple(rng.randint(3, VOCAB, 30)), (7,)) for _ in range(8)]
    assert len(_build_items(pairs, 256)[0]) == 8
    scorer = TokenScorer(model, max_length=256, max_batch_tokens=512)
    logprob, _ = scorer.score_pairs(pairs)
    assert scorer.tokens_fed == sum(len(c) for c, _ in pairs)
    for lp, (ref, _) in zip(logprob, _reference(model, pairs)):
        assert abs(lp - ref) < 1e-4


def test_row_width_follows_the_items():
    """Items of ~150 tokens: a power-of-two 256-token row would be 41 % padding; the scorer picks
    the width its cost model prefers and runs little padding."""
    model = _model("llama")
    rng = np.random.RandomState(5)
    pairs = [(tuple(rng.randint(3, VOCAB, int(rng.randint(140, 160)))), (9, 10)) for _ in range(40)]
    scorer = TokenScorer(model, max_length=1024, max_batch_tokens=2048)
    scorer.score_pairs(pairs)
    assert scorer.positions_run < 1.3 * scorer.tokens_fed, (scorer.positions_run, scorer.tokens_fed, scorer.shapes)
    assert all(width != 256 for _, width, _ in scorer.shapes), scorer.shapes
    # The cost model's choice is no worse than any single row width it considered.
    from replaceme_jax.eval.scoring import _build_items
    items, _ = _build_items(pairs, scorer.buckets[-1])
    chosen = scorer.cost(scorer._pack(items))
    for floor in scorer.buckets:
        if floor <= scorer.max_batch_tokens:
            assert chosen <= scorer.cost(scorer._fill(sorted(items, key=lambda it: -len(it.tokens)), floor))


@pytest.mark.parametrize("family", ["llama", "mistral-window", "qwen3-qknorm"])
def test_wide_rows_of_short_items_read_only_their_keys(family):
    """Short items packed into wide rows: each query chunk reads only the keys its items can see
    (a key span, see modeling.SpanBias), and every score still equals its row's own forward."""
    model = _model(family)
    pairs = _pairs(seed=3, n_items=60)
    scorer = TokenScorer(model, max_length=512, max_batch_tokens=1024, buckets=(128, 512))
    # Force 512-wide rows (the cost model of this tiny model prefers 128).
    scorer._pack = lambda items: scorer._fill(sorted(items, key=lambda it: -len(it.tokens)), 512)
    logprob, greedy = scorer.score_pairs(pairs)
    assert any(width == 512 and span == 128 for _, width, span in scorer.shapes), scorer.shapes
    for (ctx, cont), lp, g, (ref_lp, ref_g) in zip(pairs, logprob, greedy, _reference(model, pairs)):
        assert abs(lp - ref_lp) < 1e-4 * max(1.0, len(cont)), (family, len(ctx), len(cont), lp, ref_lp)
        assert g == ref_g


@pytest.mark.slow
def test_bench_eval_position_table(tmp_path):
    """`bench_eval.py --positions_only`: the real harness requests of two tasks, counted for both
    backends without timing; ours never feeds more positions than the HF backend."""
    import json
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "scripts/bench_eval.py", "--tasks=boolq,piqa", "--items=3",
                           "--positions_only", f"--output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["task"]: r for r in json.load(open(tmp_path / "bench_eval.json"))["positions"]}
    assert set(rows) == {"boolq", "piqa", "all"}
    assert rows["boolq"]["requests"] == 6 and rows["boolq"]["scored"] == 6  # yes/no, one token each
    for r in rows.values():
        assert 0 < r["fed"] <= r["hf_positions"] and r["fed"] <= r["run"] and r["flop_ratio"] >= 1
    assert "| **all** |" in proc.stdout
