"""Compute the angular-distance table alone (all n x all start blocks) and plot it.

    python scripts/distances.py --model=smollm2-135m --output_dir=runs/distances
"""
from __future__ import annotations

from pathlib import Path

from absl import flags

from replaceme_jax.cli import run_main
from replaceme_jax.errors import ReplaceMeError

MODEL = flags.DEFINE_string("model", "smollm2-135m", "Registry name, .gguf, HF dir or Orbax dir.")
SOURCE = flags.DEFINE_string("source", "boolq", "Calibration source (see README).")
NUM_SAMPLES = flags.DEFINE_integer("num_samples", 256, "Calibration passages.")
MAX_LENGTH = flags.DEFINE_integer("max_length", 512, "Tokens per passage (truncation).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per batch.")
INCLUDE_PAD = flags.DEFINE_bool("include_pad", False, "Count pad tokens (the official code does).")
OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/distances", "Where distances.csv/.png go.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}; pass everything as --flags")
    import numpy as np

    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.io_utils import atomic_output_dir
    from replaceme_jax.replaceme.config import default_config
    from replaceme_jax.replaceme.pipeline import calibration_batches
    from replaceme_jax.replaceme.report import distances_csv, plot_distances
    from replaceme_jax.replaceme.statistics import StatsRequest, gather_statistics

    model, tokenizer = load_pretrained(MODEL.value)
    cal = default_config().calibration
    cal.source, cal.num_samples, cal.max_length = SOURCE.value, NUM_SAMPLES.value, MAX_LENGTH.value
    cal.batch_size = BATCH_SIZE.value
    batches = calibration_batches(tokenizer, cal)
    n_blocks = model.config.num_hidden_layers
    stats = gather_statistics(model, batches, StatsRequest(max_distance_blocks=n_blocks - 1,
                                                           include_pad=INCLUDE_PAD.value), progress=True)
    with atomic_output_dir(OUTPUT_DIR.value, overwrite=OVERWRITE.value, what="distances output") as tmp:
        (tmp / "distances.csv").write_text(distances_csv(stats.distances))
        plot_distances(stats.distances, tmp / "distances.png")
    print(f"{stats.num_sequences} sequences, {stats.num_tokens} tokens; wrote {Path(OUTPUT_DIR.value)}/distances.csv/.png")
    for n in (4, 8, 12):
        if n < n_blocks:
            row = stats.distances[n - 1, 1:]  # start >= 1 keeps an anchor block
            s = int(np.nanargmin(row)) + 1
            print(f"  n={n:2d}: best cut [{s}, {s + n}) angular distance {row[s - 1]:.4f}")
    return 0


if __name__ == "__main__":
    run_main(main)
