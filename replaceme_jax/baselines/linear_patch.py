"""LinearPatch-style constrained transform: T = Q diag(s) with Q orthogonal.

A rotation followed by a per-channel scale has d(d-1)/2 + d degrees of freedom instead of lstsq's
d², so it cannot absorb calibration noise the way a full matrix can; it sits between ``diag``
(scale only) and ``lstsq`` (any matrix). Both factors come in closed form from the same normal
equations as ReplaceMe's solvers:

- Q solves the orthogonal Procrustes problem min_Q ||M Q - R||: since ||M Q||_F does not depend
  on an orthogonal Q, it maximises tr(Qᵀ MᵀR), so Q = U Vᵀ from the SVD MᵀR = U Σ Vᵀ.
- s is then the per-channel least squares fit of R by P = M Q:
  s_j = (Qᵀ MᵀR)_jj / ((Qᵀ MᵀM Q)_jj + α).
"""
from __future__ import annotations

import time

import numpy as np

from replaceme_jax.replaceme.solvers import (SOLVERS, NormalEquations, SolveResult, _check_alpha,
                                             _host_statistics, relative_residual)


def orth_diag(ne: NormalEquations, alpha: float = 0.0) -> SolveResult:
    """T = Q diag(s): Procrustes rotation of the cross term, then a ridge per-channel scale (float64)."""
    start = time.perf_counter()
    alpha = _check_alpha(alpha)
    mtm, mtr, _ = _host_statistics(ne)
    u, sigma, vt = np.linalg.svd(mtr)
    q = u @ vt
    numerator = np.sum(q * mtr, axis=0)                  # diag(Qᵀ MᵀR)
    denominator = np.sum(q * (mtm @ q), axis=0) + alpha  # diag(Qᵀ MᵀM Q) + α
    dead = denominator <= 0
    s = np.where(dead, 0.0, numerator / np.where(dead, 1.0, denominator))
    T = q * s[None, :]
    info = {"solver": "orth_diag", "alpha": alpha, "tokens": int(ne.count), "loss": "relative_residual",
            "procrustes_fit": float(sigma.sum()), "scale_range": [float(s.min()), float(s.max())],
            "seconds": time.perf_counter() - start}
    return SolveResult(T=T, loss_history=(), final_loss=relative_residual(ne, T), info=info)


# Registered next to lstsq/diag so ``solvers.get_solver("orth_diag")`` finds it.
SOLVERS.setdefault("orth_diag", orth_diag)
