"""Baselines next to ReplaceMe, on the same data, statistics and selection code.

- ``methods``: ``replaceme``, ``drop`` (UIDL without healing), ``shortgpt``, ``sleb`` -> ``MethodResult``.
- ``shortgpt.block_influence``, ``sleb.sleb_order``; their surgery is ``replaceme.surgery.drop_blocks``.
The sweep that runs them side by side is ``replaceme_jax.experiments``.

The ``orth_diag`` solver and the ``search`` rule live with the other solvers and rules
(``replaceme.solvers``, ``replaceme.selection``).
"""
from replaceme_jax.baselines.methods import METHODS, MethodResult, drop, replaceme, shortgpt, sleb
from replaceme_jax.replaceme.surgery import drop_blocks

__all__ = ["METHODS", "MethodResult", "drop", "drop_blocks", "replaceme", "shortgpt", "sleb"]
