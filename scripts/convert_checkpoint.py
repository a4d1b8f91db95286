"""Convert a checkpoint (registry name, GGUF file, Hugging Face dir or Orbax dir) to HF or Orbax.

    python scripts/convert_checkpoint.py --input=smollm2-135m --output=/tmp/smollm2-hf --format=hf
    python scripts/convert_checkpoint.py --input=/tmp/smollm2-hf --output=/tmp/smollm2-orbax \
        --format=orbax --dtype=bfloat16
"""
from __future__ import annotations

from pathlib import Path

from absl import flags

from replaceme_jax.checkpoints import load_pretrained
from replaceme_jax.checkpoints.hf import save_hf
from replaceme_jax.checkpoints.orbax_io import save_orbax
from replaceme_jax.cli import run_main
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.modeling import num_parameters

INPUT = flags.DEFINE_string("input", None, "Registry name (e.g. smollm2-135m), .gguf file, Hugging Face "
                            "directory or Orbax checkpoint directory.", required=True)
OUTPUT = flags.DEFINE_string("output", None, "Output directory (written atomically).", required=True)
FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "orbax"], "Output format.")
DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                          "Parameter dtype of the output (default: as loaded; float32 for GGUF).")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory.")


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}; pass everything as --flags")
    out = Path(OUTPUT.value)
    # Checked before loading so a big model is not converted only to be refused at the end.
    if out.is_dir() and any(out.iterdir()) and not OVERWRITE.value:
        raise ReplaceMeError(f"output directory {out} already holds files. Fix: pass --overwrite "
                             "or choose another --output.")
    model, tokenizer = load_pretrained(INPUT.value, param_dtype=DTYPE.value, dtype=DTYPE.value)
    save = save_hf if FORMAT.value == "hf" else save_orbax
    save(model, out, tokenizer=tokenizer, overwrite=OVERWRITE.value)
    c = model.config
    print(f"wrote {FORMAT.value} checkpoint {out} from {INPUT.value}: {c.model_type}, "
          f"{c.num_hidden_layers} blocks, d={c.hidden_size}, {num_parameters(model) / 1e6:.1f}M params, "
          f"{c.param_dtype}, tokenizer {'included' if tokenizer is not None else 'none'}")
    return 0


if __name__ == "__main__":
    run_main(main)
