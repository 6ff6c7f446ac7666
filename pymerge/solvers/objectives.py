"""Merging objectives as linear systems A x = b, A = Σ_m λ_m C_m, b = Σ_m λ_m C_m θ_m, over a batch of layers.

Each objective keeps only what its matvec needs (A is never formed) plus b and the constant
c = ½ Σ_m λ_m θ_mᵀ C_m θ_m, so that the merging loss ½ Σ_m λ_m (x - θ_m)ᵀ C_m (x - θ_m) = ½xᵀAx - xᵀb + c
can be reported. Parameters use torch's layout: a linear layer's weight with its bias is X = [W | b] of shape
[k, d'] (out × in, d' = d + 1 with a bias), so with the input Gram G (d' × d') and the output-gradient factor
G_out (k × k):

    averaging      C_m x = x                          A x = (Σ λ) x
    diagonal       C_m x = F_m ∘ x                    A x = (Σ λ F_m) ∘ x
    RegMean        C_m X = X G_m                      A X = X (Σ λ G_m)           (Jin et al. 2022)
    K-FAC          C_m X = G_out,m X A_m              A X = Σ λ G_out,m X A_m     (MaTS eq. 13-14)

The K-FAC form is (G_out ⊗ A) vec(X) for row-major vec, evaluated as two matrix products per model.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _weights(weights: Optional[Sequence[float]], m: int):
    if weights is None:
        return [1.0] * m
    weights = [float(w) for w in weights]
    if len(weights) != m:
        raise ValueError(f"weights: expected one per model ({m}), got {len(weights)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights: expected >= 0 with a positive sum, got {weights}")
    return weights


def _dot(a, b):
    return (a * b).flatten(1).sum(1)


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's G̃ = α G + (1 - α) diag(G) (on the last two dimensions): shrinks the off-diagonals by α."""
    if alpha == 1.0:
        return gram
    out = gram * alpha
    out.diagonal(dim1=-2, dim2=-1).add_(gram.diagonal(dim1=-2, dim2=-1), alpha=1.0 - alpha)
    return out


class Objective:
    """A batch of B linear systems: `matvec(x)`, `b`, `constant`; `value(x)` is the merging loss per system."""

    b: torch.Tensor
    constant: torch.Tensor

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """½xᵀAx - xᵀb + c per system (the merging loss; >= 0 up to rounding)."""
        x = x.to(self.b.dtype)
        return 0.5 * _dot(x, self.matvec(x)) - _dot(x, self.b) + self.constant


class AverageObjective(Objective):
    """C_m = I: the solution is the λ-weighted average."""

    def __init__(self, thetas: Sequence[torch.Tensor], weights=None, dtype=torch.float32):
        w = _weights(weights, len(thetas))
        self.total = sum(w)
        self.b = sum(wi * t.to(dtype) for wi, t in zip(w, thetas))
        self.constant = 0.5 * sum(wi * _dot(t.to(dtype), t.to(dtype)) for wi, t in zip(w, thetas))

    def matvec(self, x):
        return x * self.total


class DiagonalFisherObjective(Objective):
    """C_m = diag(F_m): the solution is Fisher merging's Σ λ F θ / Σ λ F (where Σ λ F > 0)."""

    def __init__(self, thetas, fishers, weights=None, dtype=torch.float32):
        w = _weights(weights, len(thetas))
        if len(fishers) != len(thetas):
            raise ValueError(f"fishers: expected one per model ({len(thetas)}), got {len(fishers)}")
        self.diag = sum(wi * f.to(dtype) for wi, f in zip(w, fishers))
        self.b = torch.zeros_like(self.diag)
        self.constant = torch.zeros(self.diag.shape[0], dtype=dtype, device=self.diag.device)
        for wi, t, f in zip(w, thetas, fishers):
            ft = f.to(dtype) * t.to(dtype)
            self.b.add_(ft, alpha=wi)
            self.constant += 0.5 * wi * _dot(ft, t.to(dtype))

    def matvec(self, x):
        return x * self.diag


class GramObjective(Objective):
    """RegMean's objective: C_m X = X G_m per layer. thetas [B, k, d'], grams [B, d', d'] (per model)."""

    def __init__(self, thetas, grams, weights=None, dtype=torch.float32):
        w = _weights(weights, len(thetas))
        if len(grams) != len(thetas):
            raise ValueError(f"grams: expected one per model ({len(thetas)}), got {len(grams)}")
        self.gram = sum(wi * g.to(dtype) for wi, g in zip(w, grams))
        self.b = None
        self.constant = None
        for wi, t, g in zip(w, thetas, grams):
            tg = t.to(dtype) @ g.to(dtype)
            self.b = tg * wi if self.b is None else self.b.add_(tg, alpha=wi)
            c = 0.5 * wi * _dot(tg, t.to(dtype))
            self.constant = c if self.constant is None else self.constant + c

    def matvec(self, x):
        return x @ self.gram


class KFACObjective(Objective):
    """Block-diagonal (K-FAC) Fisher: C_m X = G_out,m X A_m. thetas [B, k, d'], a_in [B, d', d'], g_out [B, k, k]."""

    def __init__(self, thetas, a_in, g_out, weights=None, dtype=torch.float32):
        w = _weights(weights, len(thetas))
        if not len(a_in) == len(g_out) == len(thetas):
            raise ValueError(f"a_in / g_out: expected one per model ({len(thetas)}), got {len(a_in)} / {len(g_out)}")
        # λ_m folded into the (smaller) output factor
        self.g = torch.stack([g.to(dtype) * wi for wi, g in zip(w, g_out)])   # [M, B, k, k]
        self.a = torch.stack([a.to(dtype) for a in a_in])                      # [M, B, d', d']
        th = torch.stack([t.to(dtype) for t in thetas])                        # [M, B, k, d']
        ct = self.g @ th @ self.a
        self.b = ct.sum(0)
        self.constant = 0.5 * (ct * th).flatten(2).sum(2).sum(0)

    def matvec(self, x):
        return (self.g @ x.unsqueeze(0) @ self.a).sum(0)
