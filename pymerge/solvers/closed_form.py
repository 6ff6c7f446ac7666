"""RegMean's closed form (Jin et al. 2022): W = (Σ_m W_m G̃_m)(Σ_m G̃_m)^{-1}, by a Cholesky solve.

G̃_m = α G_m + (1 - α) diag(G_m): shrinking the off-diagonals keeps Σ G̃ well conditioned. With the torch layout
X = [W | b] ([k, d'], out × in) the merged X solves S Xᵀ = Bᵀ with S = Σ G̃ (symmetric), B = Σ X_m G̃_m; the
inverse is never formed. Statistics are checked first: a non-finite, asymmetric or non-PSD Gram gets an error
naming its layer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from pymerge.solvers.objectives import _weights, scale_off_diagonal


class StatisticsError(ValueError):
    """Statistics that cannot define a merging objective (non-finite, not symmetric, not PSD, wrong shape)."""


def check_spd_factors(mats: torch.Tensor, label: str, what: str = "Gram matrix") -> None:
    """mats [..., d, d]: finite, symmetric and positive semi-definite, or a StatisticsError naming `label`.

    PSD is tested by a Cholesky of M + δI, δ = 1e-6 · trace(M) (≥ the largest diagonal entry): rounding of a PSD
    matrix with zero directions (a constant input feature, a low-rank K-FAC factor) must pass, and an fp32 average
    of outer products moves eigenvalues by ~eps32 · ||M||₂ ≤ eps32 · trace(M), far more than the largest diagonal
    entry allows when the spectrum is concentrated (real MiniLM K-FAC G factors: λ_min ≈ -1e-6 · max diag); a
    negative eigenvalue beyond rounding fails."""
    if not bool(torch.isfinite(mats).all()):
        raise StatisticsError(f"{label}: {what} contains NaN or Inf")
    m64 = mats.double()
    scale = m64.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True).clamp_min(1e-30)
    asym = (m64 - m64.transpose(-1, -2)).abs().amax((-2, -1)) / scale.squeeze(-1)
    if bool((asym > 1e-4).any()):
        raise StatisticsError(f"{label}: {what} is not symmetric (relative asymmetry {float(asym.max()):.3g})")
    if bool((m64.diagonal(dim1=-2, dim2=-1) < 0).any()):
        raise StatisticsError(f"{label}: {what} has negative diagonal entries, so it is not positive semi-definite")
    eye = torch.eye(m64.shape[-1], dtype=m64.dtype, device=m64.device)
    trace = m64.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True).clamp_min(1e-30)
    _, info = torch.linalg.cholesky_ex(m64 + eye * (1e-6 * trace.unsqueeze(-1)))
    if bool((info != 0).any()):
        raise StatisticsError(f"{label}: {what} is not positive semi-definite (it has a negative eigenvalue); "
                              "statistics must be averages of outer products E[z zᵀ]")


def regmean_solve(thetas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 0.9, *,
                  weights: Optional[Sequence[float]] = None, ridge: float = 0.0, dtype=torch.float64,
                  label: str = "layer", model_labels: Optional[Sequence[str]] = None,
                  check: bool = True) -> torch.Tensor:
    """The RegMean merge of one layer ([k, d']) or a batch of layers ([B, k, d']); returns `dtype`.

    thetas: per model X_m = [W_m | b_m]. grams: per model G_m ([d', d'] or [B, d', d']). alpha: the off-diagonal
    scale (1 keeps G). weights: per-model λ_m scaling G_m (default 1). ridge: adds ridge · mean(diag S) · I to S
    (for layers whose inputs never span some direction). label: names the layer in errors, model_labels each
    model's statistics (default "model i").
    """
    w = _weights(weights, len(thetas))
    if len(grams) != len(thetas):
        raise ValueError(f"grams: expected one per model ({len(thetas)}), got {len(grams)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected in [0, 1], got {alpha}")
    model_labels = list(model_labels) if model_labels is not None else [f"model {i}" for i in range(len(thetas))]
    for i, (t, g) in enumerate(zip(thetas, grams)):
        d = t.shape[-1]
        if tuple(g.shape[-2:]) != (d, d) or g.shape[:-2] != t.shape[:-2]:
            raise StatisticsError(f"{label}: Gram matrix of {model_labels[i]} has shape {tuple(g.shape)}, expected "
                                  f"{tuple(t.shape[:-2]) + (d, d)} for the weight (with bias) {tuple(t.shape)}")
        if check:
            check_spd_factors(g, f"{label} ({model_labels[i]})")
    s = None
    rhs = None
    for wi, t, g in zip(w, thetas, grams):
        gt = scale_off_diagonal(g.to(dtype), alpha)
        s = gt * wi if s is None else s.add_(gt, alpha=wi)
        tg = t.to(dtype) @ gt
        rhs = tg * wi if rhs is None else rhs.add_(tg, alpha=wi)
    if ridge > 0:
        diag = s.diagonal(dim1=-2, dim2=-1)
        diag.add_(diag.mean(-1, keepdim=True) * ridge)
    chol, info = torch.linalg.cholesky_ex(s)
    if bool((info != 0).any()):
        raise StatisticsError(
            f"{label}: the summed Gram matrix Σ G̃ is singular (some input direction is never seen by any model); "
            "lower `alpha` or set `ridge` (e.g. 1e-4)")
    return torch.cholesky_solve(rhs.transpose(-1, -2), chol).transpose(-1, -2)
