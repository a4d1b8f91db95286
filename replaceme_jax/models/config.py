"""ModelConfig: one frozen dataclass for the Llama / Mistral / Qwen2 / Qwen3 decoder family.

Built from a Hugging Face ``config.json`` dict and written back to one, so a pruned model exports
with the right ``num_hidden_layers`` and per-layer fields.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from replaceme_jax.errors import ReplaceMeError

# HF model_type -> our family name. Mistral uses the Llama block (sliding window aside).
SUPPORTED_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}
_HF_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_SUPPORTED_ROPE = ("default", "linear", "llama3")
# HF fields that hold one entry per block and so must shrink with the model.
PER_LAYER_FIELDS = ("layer_types",)
_DTYPES = ("float32", "bfloat16", "float16")


def _freeze(value: Any) -> Any:
    """Turn dicts/lists into hashable tuples so the dataclass stays frozen and hashable."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _canonical_json(obj: Mapping[str, Any]) -> str:
    """Extra config.json fields as canonical JSON: hashable, and nested dicts survive a round trip."""
    return json.dumps(dict(obj), sort_keys=True, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str = "llama"  # HF model_type: llama | mistral | qwen2 | qwen3
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # frozen items of the HF rope_scaling dict
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v (and o for llama/qwen3) biases; Qwen2 has q/k/v bias only
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k
    bos_token_id: int | None = None
    eos_token_id: Any = None
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    # Everything else from config.json, kept verbatim for export (canonical JSON text).
    extra: str = "{}"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ReplaceMeError(
                f"unsupported architecture model_type={self.model_type!r}; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}. Convert the checkpoint to one of these families."
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ReplaceMeError(f"{name}={getattr(self, name)!r} is not one of {_DTYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ReplaceMeError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        rope_type = self.rope_type
        if rope_type not in _SUPPORTED_ROPE:
            raise ReplaceMeError(
                f"rope_scaling type {rope_type!r} is not supported (supported: {_SUPPORTED_ROPE})"
            )

    # ---- derived ----
    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling_dict
        if not rs:
            return "default"
        return rs.get("rope_type", rs.get("type", "default"))

    @property
    def extra_dict(self) -> dict:
        return json.loads(self.extra)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | str, **overrides) -> "ModelConfig":
        """Build from a config.json dict (or a path to one)."""
        if isinstance(hf, str):
            with open(hf, encoding="utf-8") as f:
                hf = json.load(f)
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            arch = hf.get("architectures")
            raise ReplaceMeError(
                f"unsupported architecture model_type={model_type!r} (architectures={arch}); "
                f"supported model types: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers>=5 may keep rope_theta inside rope_parameters.
        rope_params = hf.get("rope_parameters") or {}
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) in (
            None, "default"):
            rope_scaling = None
        rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        known = {
            "model_type": model_type,
            "vocab_size": hf["vocab_size"],
            "hidden_size": hf["hidden_size"],
            "intermediate_size": hf["intermediate_size"],
            "num_hidden_layers": hf["num_hidden_layers"],
            "num_attention_heads": hf["num_attention_heads"],
            "num_key_value_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
            "head_dim": hf.get("head_dim"),
            "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
            "rope_theta": float(rope_theta),
            "rope_scaling": _freeze(rope_scaling) if rope_scaling else None,
            "max_position_embeddings": hf.get("max_position_embeddings", 4096),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "bos_token_id": hf.get("bos_token_id"),
            "eos_token_id": _freeze(hf.get("eos_token_id")),
            "pad_token_id": hf.get("pad_token_id"),
        }
        if model_type == "qwen2":
            known["attention_bias"] = True
        elif model_type in ("llama", "qwen3"):
            known["attention_bias"] = bool(hf.get("attention_bias", False))
            # transformers' Llama and Qwen3 attention both give o_proj a bias when attention_bias is set.
            known["o_proj_bias"] = bool(hf.get("attention_bias", False))
            known["mlp_bias"] = bool(hf.get("mlp_bias", False)) and model_type == "llama"
        known["qk_norm"] = model_type == "qwen3"
        consumed = set(known) | {"rope_parameters", "rope_scaling", "attention_bias", "mlp_bias",
                                 "torch_dtype", "dtype", "transformers_version", "architectures"}
        extra = {k: v for k, v in hf.items() if k not in consumed}
        known["extra"] = _canonical_json(extra)
        known.update(overrides)
        return cls(**known)

    def to_hf_config(self, torch_dtype: str | None = None) -> dict:
        """A config.json dict transformers can load (per-layer fields trimmed to the depth)."""
        out = dict(self.extra_dict)
        for k in PER_LAYER_FIELDS:
            if k in out and out[k] is not None and len(out[k]) != self.num_hidden_layers:
                raise ReplaceMeError(
                    f"config field {k} has {len(out[k])} entries for {self.num_hidden_layers} layers")
        out.update({
            "model_type": self.model_type,
            "architectures": [_HF_CLASS[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype or self.param_dtype,
        })
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.rope_scaling is not None:
            rp = dict(self.rope_scaling_dict)
            rp.setdefault("rope_type", rp.get("type"))
            rp["rope_theta"] = self.rope_theta
            out["rope_parameters"] = rp
        return out

    def without_layers(self, dropped: list[int] | tuple[int, ...]) -> "ModelConfig":
        """Config of the model with the given block indices removed (per-layer fields follow)."""
        dropped = set(int(i) for i in dropped)
        bad = [i for i in dropped if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ReplaceMeError(f"cannot drop blocks {bad}: model has {self.num_hidden_layers} blocks")
        extra = self.extra_dict
        for k in PER_LAYER_FIELDS:
            if extra.get(k) is not None:
                extra[k] = [v for i, v in enumerate(extra[k]) if i not in dropped]
        if "max_window_layers" in extra and isinstance(extra["max_window_layers"], int):
            extra["max_window_layers"] = min(extra["max_window_layers"],
                                             self.num_hidden_layers - len(dropped))
        return self.replace(num_hidden_layers=self.num_hidden_layers - len(dropped),
                            extra=_canonical_json(extra))
