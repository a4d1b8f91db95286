"""Prune a model with ReplaceMe and print the report.

    python scripts/prune.py --config=configs/smollm2_135m.py
    python scripts/prune.py --config=configs/smollm2_135m.py --config.solver=cosine --config.num_blocks=8
    python scripts/prune.py --config=configs/smollm2_135m.py --config.cuts=20-28 --config.overwrite
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from replaceme_jax.cli import run_main
from replaceme_jax.errors import ReplaceMeError

CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py).",
                                         lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}; pass settings as --config.<field>=...")
    from replaceme_jax.replaceme.pipeline import run
    from replaceme_jax.replaceme.report import format_report
    _, report = run(CONFIG.value)
    print(format_report(report))
    print(f"outputs: {CONFIG.value.output_dir} (report.json, transforms.npz, distances/scores .csv/.png, "
          "orbax/, hf/)")
    return 0


if __name__ == "__main__":
    run_main(main)
