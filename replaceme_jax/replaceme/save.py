"""Saving a run: everything in ``output_dir`` appears complete or not at all (``io_utils``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from replaceme_jax.io_utils import atomic_output_dir, atomic_write_json, is_primary
from replaceme_jax.replaceme.report import distances_csv, plot_distances, plot_scores, scores_csv


def save_run(cfg, result, tokenizer, report: dict) -> Path:
    """Everything of a run in ``cfg.output_dir``, which appears complete or not at all."""
    from replaceme_jax.checkpoints.hf import save_hf
    from replaceme_jax.checkpoints.orbax_io import save_orbax
    with atomic_output_dir(cfg.output_dir, overwrite=cfg.overwrite, what="run output") as tmp:
        if is_primary():  # plain files from process 0; the checkpoints below need every process
            np.savez(tmp / "transforms.npz", **{f"cut_{s}_{e}": T for (s, e), T in zip(result.cuts, result.transforms)
                                                if T is not None})
            if result.stats is not None and result.stats.distances is not None:
                (tmp / "distances.csv").write_text(distances_csv(result.stats.distances))
                plot_distances(result.stats.distances, tmp / "distances.png", result.cuts)
            if result.scores:
                (tmp / "scores.csv").write_text(scores_csv(result.scores))
                plot_scores(result.scores, tmp / "scores.png", result.cuts)
        if cfg.save_orbax:
            save_orbax(result.model, tmp / "orbax", tokenizer=tokenizer,
                       metadata={"cuts": [list(c) for c in result.cuts], "solver": cfg.solver})
        if cfg.export_hf:
            save_hf(result.model, tmp / "hf", tokenizer=tokenizer)
        atomic_write_json(tmp / "report.json", report)
    return Path(cfg.output_dir)


def write_report_json(output_dir, report: dict) -> None:
    atomic_write_json(Path(output_dir) / "report.json", report)
