"""Sample a calibration corpus from a model itself (data-free calibration, or a share of a mixture).

    python scripts/generate_calibration.py --output=runs/selfgen/smollm2_T1.jsonl
    bash scripts/run_prune.sh --config.calibration.source=boolq+runs/selfgen/smollm2_T1.jsonl

Each passage continues a document start (<|endoftext|>, else BOS, else EOS) for --max_new_tokens
tokens at --temperature (1 = the model's own distribution); with --prompts_from=boolq it continues
the first --prompt_tokens tokens of a text of that source instead (the prefix stays in the passage).
Interrupted runs resume from <output>.partial; the finished file is never overwritten. See replaceme_jax/data/self_generated.py.
"""
from __future__ import annotations

import sys
import time

from absl import flags

from replaceme_jax.cli import run_main
from replaceme_jax.errors import ReplaceMeError

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Registry name or checkpoint path (the dense model).")
_OUTPUT = flags.DEFINE_string("output", None, "Where the corpus goes (.jsonl).", required=True)
_NUM = flags.DEFINE_integer("num_samples", 1152, "Passages (10 % of them fall in the validation part).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 160, "Tokens per passage.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off; < 1 sorts the vocabulary every step: slow on a CPU).")
_SEED = flags.DEFINE_integer("seed", 1000, "Batch b samples with key seed + b * batch_size.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Passages per batch.")
_PROMPTS = flags.DEFINE_string("prompts_from", "", "A calibration source (e.g. boolq) whose texts' first --prompt_tokens "
                                "tokens each passage continues; empty: continue a bare document start.")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 32, "Tokens of each prompt text kept (with --prompts_from).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the checkpoint's).")


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}; pass everything as --flags")
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.data.self_generated import generate_corpus

    model, tokenizer = load_pretrained(_MODEL.value, dtype=_DTYPE.value)
    if tokenizer is None:
        raise ReplaceMeError(f"{_MODEL.value} carries no tokenizer. Fix: load a checkpoint saved with one.")
    t0 = time.perf_counter()

    def progress(done, total):
        print(f"{done}/{total} passages, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    prompts = None
    if _PROMPTS.value:
        from replaceme_jax.data.calibration import load_calibration_texts
        prompts = load_calibration_texts(_PROMPTS.value, num_samples=_NUM.value, seed=_SEED.value, tokenizer=tokenizer)
    path = generate_corpus(_OUTPUT.value, model, tokenizer, num_samples=_NUM.value, max_new_tokens=_MAX_NEW.value,
                           temperature=_TEMPERATURE.value, top_p=_TOP_P.value, seed=_SEED.value,
                           batch_size=_BATCH.value, prompts=prompts, prompt_tokens=_PROMPT_TOKENS.value,
                           progress=progress)
    print(f"wrote {path} ({_NUM.value} passages x {_MAX_NEW.value} tokens) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
