"""Generate text from any model we load: dense or pruned, with a KV cache.

    python scripts/generate.py --model=smollm2-135m --prompt="The capital of France is"
    python scripts/generate.py --model=runs/smollm2-135m --chat --prompt="Name three rivers." \\
        --temperature=0.7 --top_p=0.9 --seed=1
    python scripts/generate.py --model=path/to/hf_dir --prompts_file=prompts.txt --max_new_tokens=64

--model: a registry name, a Hugging Face directory, a .gguf file, an Orbax checkpoint, or a pruning
run's output directory. A single prompt streams to the terminal; several (--prompt repeated, or one
per line of --prompts_file) run batched and print in order.
"""
from __future__ import annotations

import sys

from absl import flags

from replaceme_jax.cli import run_main
from replaceme_jax.errors import ReplaceMeError

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Registry name or checkpoint path.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeat for several).")
_FILE = flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Most new tokens per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed: same seed, same tokens.")
_STOP = flags.DEFINE_multi_string("stop", [], "A stop string (repeat for several); not included in the output.")
_CHAT = flags.DEFINE_boolean("chat", False, "Wrap each prompt in the tokenizer's chat template.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Most prompts per batch.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the checkpoint's).")


def _prompts() -> list[str]:
    prompts = list(_PROMPT.value)
    if _FILE.value:
        try:
            with open(_FILE.value, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise ReplaceMeError(f"cannot read --prompts_file {_FILE.value}: {e.strerror}. Fix: check the path.")
    if not prompts:
        raise ReplaceMeError("no prompt given. Fix: pass --prompt=\"...\" or --prompts_file=FILE.")
    return prompts


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}; pass everything as --flags")
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.inference import Generator, SamplingParams

    prompts = _prompts()
    if _MAX_NEW.value < 1:
        raise ReplaceMeError(f"--max_new_tokens must be >= 1; got {_MAX_NEW.value}")
    sampling = SamplingParams(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)  # validated before loading
    model, tokenizer = load_pretrained(_MODEL.value, dtype=_DTYPE.value)
    if tokenizer is None:
        raise ReplaceMeError(f"{_MODEL.value} carries no tokenizer. Fix: load a checkpoint saved with one.")
    gen = Generator(model, tokenizer, max_batch_size=_BATCH.value)
    kwargs = dict(max_new_tokens=_MAX_NEW.value, sampling=sampling, seed=_SEED.value, stop=_STOP.value,
                  chat=_CHAT.value)
    if len(prompts) == 1:
        def stream(piece):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write(prompts[0] if not _CHAT.value else "")
        result = gen.generate(prompts, stream=stream, **kwargs)[0]
        print(f"\n[{len(result.tokens)} tokens, {result.finish_reason}]", file=sys.stderr)
        return 0
    for i, (prompt, result) in enumerate(zip(prompts, gen.generate(prompts, **kwargs))):
        print(f"=== {i}: {prompt}\n{result.text}\n[{len(result.tokens)} tokens, {result.finish_reason}]")
    return 0


if __name__ == "__main__":
    run_main(main)
