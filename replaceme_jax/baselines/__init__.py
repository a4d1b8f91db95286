"""Baselines next to ReplaceMe, on the same data, statistics and selection code.

- ``methods``: ``replaceme``, ``drop`` (UIDL without healing), ``shortgpt``, ``sleb`` -> ``MethodResult``.
- ``linear_patch.orth_diag``: LinearPatch-style T = Q diag(s) (registered as solver ``orth_diag``).
- ``search``: the exhaustive ``search`` selection rule (registered with ``selection``).
- ``shortgpt.block_influence``, ``sleb.sleb_order``, ``nll.mean_nll``.
- ``statistics_cache``: statistics on disk, keyed by calibration setting and cut size.
- ``ablation``: the resumable sweep behind ``scripts/ablate.py`` (tables and plots).

Importing the package registers the ``orth_diag`` solver and the ``search`` rule.
"""
from replaceme_jax.baselines.linear_patch import orth_diag
from replaceme_jax.baselines.methods import METHODS, MethodResult, drop, replaceme, shortgpt, sleb
from replaceme_jax.baselines.search import search_scores
from replaceme_jax.replaceme.surgery import drop_blocks

__all__ = ["METHODS", "MethodResult", "drop", "drop_blocks", "orth_diag", "replaceme", "search_scores",
           "shortgpt", "sleb"]
