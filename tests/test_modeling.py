"""Module-by-module parity with Hugging Face transformers' PyTorch modules, in float32.

For each family (the random configs of tests/tiny_models.py, plus a Qwen2 config whose
layers mix sliding-window and full attention) a random transformers model is saved with
``save_pretrained`` and loaded with our ``load_hf``; then the same float32 inputs go through each
pair of corresponding submodules: token embedding, every RMSNorm (q/k norms included), RoPE tables,
attention masks, attention (GQA, biases, q/k norm, sliding window; a causal batch and a batch with
right and left padding), MLP, each decoder layer, all layers, final norm + LM head and the full
forward. Each test is named after the module it compares, so a failure says which module differs.
Padded query rows are not compared (their outputs are never used; the two sides fill them
differently), everything else is, at the single tolerance ``ATOL``.
"""
import numpy as np
import pytest

import jax.numpy as jnp

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask  # noqa: E402

from replaceme_jax.checkpoints.hf import load_hf  # noqa: E402
from replaceme_jax.models.modeling import attention_bias, layer_windows  # noqa: E402
from tiny_models import FAMILIES, SMALL, padded_batch, randomize, reference_pair  # noqa: E402

# Largest |ours - transformers| allowed for any module output, float32 on both sides. Observed
# maxima (O(1) activations, logits up to ~5): RoPE 6e-8, MLP 2.4e-7, attention 4.8e-7, RMSNorm
# 9.5e-7, LM head 9.5e-7, one decoder layer 1.5e-6, logits 2.2e-6, three stacked layers 3.2e-6.
# 1e-5 leaves ~3x headroom for other CPUs/BLAS builds; a wrong RoPE, head grouping, bias, q/k norm,
# mask or window gives >= 1e-2, and even an RMSNorm eps of 1e-2 instead of 1e-6 gives 1.8e-2.
ATOL = 1e-5

# FAMILIES plus one config only the module tests need (kept out of FAMILIES, which the checkpoint
# and generation tests also run: its per-layer masks are a module-level property).
MODEL_FAMILIES = {
    **FAMILIES,
    # Qwen2 with sliding windows on layers >= max_window_layers: per-layer masks differ.
    "qwen2-mixed-window": lambda: transformers.Qwen2Config(
        **SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=1),
}
SEQ = 12


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny torch ops are ~50x slower with several threads on a small shared CPU (thread wake-ups)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(MODEL_FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, our model loaded from its save_pretrained directory)."""
    return reference_pair(request.param, MODEL_FAMILIES[request.param](), tmp_path_factory)


@pytest.fixture(params=["causal", "padded"])
def batch(request, family):
    """(ids [3, T], 0/1 mask [3, T], positions [3, T]): no padding, or rows full / right / left padded."""
    ids, mask = padded_batch(family[2].config.vocab_size, SEQ)
    if request.param == "causal":
        mask = np.ones_like(mask)
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    return ids, mask, positions


def _hidden(shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def _t(x):
    return torch.tensor(np.asarray(x))


def _np(x):
    return x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


def _check(module, name, ours, ref, mask=None, atol=ATOL):
    """Max abs difference over real (unmasked) token rows; fails naming the module."""
    ours, ref = _np(ours), _np(ref)
    assert ours.shape == ref.shape, f"{module} [{name}]: shape {ours.shape} != transformers' {ref.shape}"
    if mask is not None:
        real = mask.astype(bool)
        ours, ref = ours[real], ref[real]
    err = float(np.abs(ours - ref).max())
    print(f"{module:>16s} {name:<22s} max|diff| = {err:.2e}")
    assert err <= atol, f"{module} differs from transformers [{name}]: max |diff| {err:.3e} > {atol:g}"
    return err


def batch_kind(mask):
    return "causal" if mask.all() else "padded"


def _hf_rope(ref, x, positions):
    return ref.model.rotary_emb(x, position_ids=_t(positions))


def _hf_masks(ref, x, mask, positions):
    """transformers' own 4-D additive masks [B, 1, T, T] for each layer (full or sliding window)."""
    cfg = ref.config
    args = dict(config=cfg, inputs_embeds=x, attention_mask=_t(mask), cache=None,
                position_ids=_t(positions))
    types = getattr(cfg, "layer_types", None)
    if types is None:  # Mistral: one window (or none) for every layer
        types = ["sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
                 ] * cfg.num_hidden_layers
    made = {}
    for ty in set(types):
        fn = create_sliding_window_causal_mask if ty == "sliding_attention" else create_causal_mask
        made[ty] = fn(**args)
    return [made[ty] for ty in types]


def _inputs(family, batch):
    """Shared inputs for the block-level tests: ours (cos, sin, biases) and transformers' ones."""
    name, ref, model = family
    ids, mask, positions = batch
    x = _hidden((ids.shape[0], ids.shape[1], model.config.hidden_size), seed=1)
    cos, sin, biases = model.attention_inputs(jnp.asarray(mask))
    xt = _t(x)
    return x, (cos, sin, biases), (xt, _hf_rope(ref, xt, positions), _hf_masks(ref, xt, mask, positions))


# ----------------------------------------------------------------------------- single modules
def test_embedding_matches_transformers(family):
    name, ref, model = family
    ids, _ = padded_batch(model.config.vocab_size, SEQ)
    with torch.no_grad():
        expected = ref.model.embed_tokens(_t(ids))
    _check("embed_tokens", name, model.embed(jnp.asarray(ids)), expected)


def test_rmsnorm_matches_transformers(family):
    """Every RMSNorm: per-layer input/post-attention norms, the final norm, Qwen3's q/k norms."""
    name, ref, model = family
    c = model.config
    x = _hidden((3, SEQ, c.hidden_size), seed=2)
    xh = _hidden((3, SEQ, c.num_attention_heads, c.head_dim), seed=3)
    pairs = [("model.norm", model.model.norm, ref.model.norm, x)]
    for i, (ours, theirs) in enumerate(zip(model.model.layers, ref.model.layers)):
        pairs += [(f"layers.{i}.input_layernorm", ours.input_layernorm, theirs.input_layernorm, x),
                  (f"layers.{i}.post_attention_layernorm", ours.post_attention_layernorm,
                   theirs.post_attention_layernorm, x)]
        if c.qk_norm:
            pairs += [(f"layers.{i}.self_attn.q_norm", ours.self_attn.q_norm, theirs.self_attn.q_norm, xh),
                      (f"layers.{i}.self_attn.k_norm", ours.self_attn.k_norm, theirs.self_attn.k_norm, xh)]
    for where, ours, theirs, inp in pairs:
        with torch.no_grad():
            expected = theirs(_t(inp))
        _check("rmsnorm", f"{name} {where}", ours(jnp.asarray(inp)), expected)


def test_rotary_embedding_matches_transformers(family, batch):
    """cos/sin tables (default, rope_theta and llama3 scaling) at the positions both sides use."""
    name, ref, model = family
    ids, mask, positions = batch
    x = torch.zeros(ids.shape[0], ids.shape[1], model.config.hidden_size)
    cos, sin, _ = model.attention_inputs(jnp.asarray(mask))
    hf_cos, hf_sin = _hf_rope(ref, x, positions)
    _check("rotary_emb", f"{name} cos", cos, hf_cos)
    _check("rotary_emb", f"{name} sin", sin, hf_sin)


def test_attention_mask_matches_transformers(family, batch):
    """Which keys each real query sees, per layer (causal, padding, sliding window)."""
    name, ref, model = family
    ids, mask, positions = batch
    x = torch.zeros(ids.shape[0], ids.shape[1], model.config.hidden_size)
    _, _, biases = model.attention_inputs(jnp.asarray(mask))
    real = mask.astype(bool)
    for i, (ours, theirs) in enumerate(zip(biases, _hf_masks(ref, x, mask, positions))):
        ours_allowed = np.asarray(ours) == 0
        hf_allowed = _np(theirs)[:, 0] == 0
        bad = (ours_allowed != hf_allowed)[real]
        assert not bad.any(), (f"attention mask differs from transformers [{name} layer {i}]: "
                               f"{int(bad.sum())} query/key pairs")
    full = np.asarray(attention_bias(jnp.asarray(mask))) == 0
    for i, w in enumerate(layer_windows(model.config)):  # a window must really cut keys here
        assert w is None or ((np.asarray(biases[i]) == 0) != full)[real].any(), (name, i, w)


def test_attention_matches_transformers(family, batch):
    """self_attn of every layer on the same input, each side with its own RoPE tables and mask."""
    name, ref, model = family
    mask = batch[1]
    x, (cos, sin, biases), (xt, rope, hf_masks) = _inputs(family, batch)
    for i, (ours, theirs) in enumerate(zip(model.model.layers, ref.model.layers)):
        with torch.no_grad():
            expected, _ = theirs.self_attn(hidden_states=xt, position_embeddings=rope,
                                           attention_mask=hf_masks[i])
        _check("self_attn", f"{name} layer {i} {batch_kind(mask)}",
               ours.self_attn(jnp.asarray(x), cos, sin, biases[i]), expected, mask)


def test_mlp_matches_transformers(family):
    name, ref, model = family
    x = _hidden((3, SEQ, model.config.hidden_size), seed=4)
    for i, (ours, theirs) in enumerate(zip(model.model.layers, ref.model.layers)):
        with torch.no_grad():
            expected = theirs.mlp(_t(x))
        _check("mlp", f"{name} layer {i}", ours.mlp(jnp.asarray(x)), expected)


def test_decoder_layer_matches_transformers(family, batch):
    """Each whole block (norms, attention, residuals, MLP) on the same input."""
    name, ref, model = family
    mask = batch[1]
    x, (cos, sin, biases), (xt, rope, hf_masks) = _inputs(family, batch)
    for i, (ours, theirs) in enumerate(zip(model.model.layers, ref.model.layers)):
        with torch.no_grad():
            expected = theirs(xt, attention_mask=hf_masks[i], position_embeddings=rope,
                              position_ids=_t(batch[2]))
        if isinstance(expected, tuple):  # older transformers return (hidden,)
            expected = expected[0]
        _check("decoder_layer", f"{name} layer {i} {batch_kind(mask)}",
               ours(jnp.asarray(x), cos, sin, biases[i]), expected, mask)


def test_lm_head_matches_transformers(family):
    """Final norm + LM head (tied or untied) on the same hidden states."""
    name, ref, model = family
    x = _hidden((3, SEQ, model.config.hidden_size), seed=5)
    with torch.no_grad():
        expected = ref.lm_head(ref.model.norm(_t(x)))
    _check("lm_head", name, model.head(jnp.asarray(x)), expected)


# ----------------------------------------------------------------------------- whole stack
def _full_forward(family, batch):
    """(ours: logits, Intermediates), (transformers: logits, per-layer outputs, pre-norm final state)."""
    name, ref, model = family
    ids, mask, positions = batch
    captured = {}

    def grab(module, inputs, output):  # returns None: a forward hook's return value replaces output
        captured["h"] = inputs[0]

    hook = ref.model.norm.register_forward_hook(grab)
    try:
        with torch.no_grad():
            out = ref(input_ids=_t(ids), attention_mask=_t(mask), position_ids=_t(positions),
                      output_hidden_states=True)
    finally:
        hook.remove()
    ours = model(jnp.asarray(ids), jnp.asarray(mask), return_intermediates=True)
    return ours, (out.logits, out.hidden_states, captured["h"])


def test_all_layers_match_transformers(family, batch):
    """The full stack from token ids: every block's output and the final (pre-norm) hidden state."""
    name, _, model = family
    mask = batch[1]
    (_, inter), (_, hidden_states, final) = _full_forward(family, batch)
    n = model.config.num_hidden_layers
    assert len(hidden_states) == n + 1
    _check("embed_tokens", f"{name} stack input", hidden_states[0], model.embed(jnp.asarray(batch[0])), mask)
    for k in range(n - 1):  # hidden_states[-1] is after the final norm
        _check("layers", f"{name} after layer {k} {batch_kind(mask)}", inter.block_output[k],
               hidden_states[k + 1], mask)
    _check("layers", f"{name} final hidden {batch_kind(mask)}", inter.block_output[-1], final, mask)
    _check("model.norm", f"{name} last_hidden_state", model.model.norm(inter.block_output[-1]),
           hidden_states[-1], mask)


def test_logits_match_transformers(family, batch):
    name, _, _ = family
    mask = batch[1]
    (logits, _), (hf_logits, _, _) = _full_forward(family, batch)
    assert np.abs(_np(hf_logits)).max() > 1.0  # a meaningful comparison, not near-zero logits
    _check("logits", f"{name} {batch_kind(mask)}", logits, hf_logits, mask)


# ----------------------------------------------------------------------------- qwen3 with attention_bias
def test_qwen3_attention_bias_loads(tmp_path):
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen3Config(**SMALL, head_dim=16, attention_bias=True),
        attn_implementation="eager").eval()
    assert ref.model.layers[0].self_attn.o_proj.bias is not None
    randomize(ref)
    ref.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")[0]
    ids, mask = padded_batch(SMALL["vocab_size"], SEQ)
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    x, (cos, sin, biases), (xt, rope, hf_masks) = _inputs(("qwen3-bias", ref, model), (ids, mask, positions))
    with torch.no_grad():
        expected, _ = ref.model.layers[0].self_attn(hidden_states=xt, position_embeddings=rope,
                                                    attention_mask=hf_masks[0])
    _check("self_attn", "qwen3-bias layer 0",
           model.model.layers[0].self_attn(jnp.asarray(x), cos, sin, biases[0]), expected, mask)
