"""Experiment runners: the resumable ablation sweep behind ``scripts/ablate.py`` and its outputs.

- ``sweep``: settings (``sweep_config``), rows, the ``Sweep`` runner (``run_sweep``), ``load_rows``.
- ``tables``: results.csv / results.md / selection.md / plots.png from finished rows.
- ``statistics_cache``: statistics passes on disk, keyed by calibration setting and cut size.
"""
