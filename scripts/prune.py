"""Prune a model with ReplaceMe and print the report.

    python scripts/prune.py --config=configs/smollm2_135m.py
    python scripts/prune.py --config=configs/smollm2_135m.py --config.solver=cosine --config.num_blocks=8
    python scripts/prune.py --config=configs/smollm2_135m.py --config.cuts=20-28 --config.overwrite
    python scripts/prune.py --config=configs/llama3_8b.py --dry_run --dry_run_backend=gpu
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from replaceme_jax.cli import run_main
from replaceme_jax.errors import ReplaceMeError

CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py).",
                                         lock_config=True)
flags.mark_flags_as_required(["config"])
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the memory per device of the run's statistics pass "
                            "(from shapes: no weights are loaded) and exit.")
DRY_RUN_BACKEND = flags.DEFINE_enum("dry_run_backend", None, ["cpu", "gpu", "tpu"],
                                    "Backend to plan the dry run for (default: this machine's).")


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}; pass settings as --config.<field>=...")
    from replaceme_jax.settings import Settings
    settings = Settings.from_config(CONFIG.value)  # every setting checked before anything is loaded
    if DRY_RUN.value:
        from replaceme_jax.memory import dry_run
        print(dry_run(settings, backend=DRY_RUN_BACKEND.value).format())
        return 0
    from replaceme_jax.replaceme.pipeline import run
    from replaceme_jax.replaceme.report import format_report
    _, report = run(settings)
    print(format_report(report))
    saved = [name for name, on in (("orbax/", settings.save_orbax), ("hf/", settings.export_hf)) if on]
    print(f"outputs: {settings.output_dir} (report.json, transforms.npz, distances/scores .csv/.png"
          + "".join(f", {s}" for s in saved) + ")")
    if settings.export_hf:
        print("load the pruned model: replaceme_jax.checkpoints.load_pretrained(<output>/hf or <output>/orbax); "
              "transformers.AutoModelForCausalLM.from_pretrained(<output>/hf) needs PyTorch installed")
    return 0


if __name__ == "__main__":
    run_main(main)
