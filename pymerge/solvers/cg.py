"""Batched conjugate gradient: B independent SPD systems A_i x_i = b_i of one shape, solved together.

Each system keeps its own step sizes; a system whose relative residual ||b - A x|| / ||b|| falls to `tolerance`
is frozen while the others go on, and the loop ends when all are frozen or after `iterations` steps. Everything
stays in torch on b's device (one matvec per step for the whole batch, no host round trip except one small
`all()` check per step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class CGResult:
    x: torch.Tensor            # [B, ...] the solutions
    residuals: torch.Tensor    # [steps + 1, B] relative residual before the first and after every step
    objectives: Optional[torch.Tensor]  # [steps + 1, B] merging objective per step (when a constant was given)
    iterations: int            # steps taken (<= the iteration budget)
    converged: torch.Tensor    # [B] bool: relative residual <= tolerance


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-system inner products over all but the batch dimension: [B]."""
    return (a * b).flatten(1).sum(1)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       x0: Optional[torch.Tensor] = None, *, iterations: int = 100, tolerance: float = 1e-6,
                       constant: Optional[torch.Tensor] = None) -> CGResult:
    """Solve A x = b for a batch [B, ...] of symmetric positive (semi-)definite systems.

    matvec: x [B, ...] -> A x [B, ...]. x0: the initialisation (default 0). iterations: the most steps taken.
    tolerance: stop a system once ||r|| <= tolerance * ||b|| (a system with b = 0 stops at once with x = x0
    unless A x0 != 0). constant: c [B] such that the merging objective is ½xᵀAx - xᵀb + c; when given, its value
    after every step is returned (it costs no extra matvec: ½xᵀAx - xᵀb = -½xᵀ(b + r)).
    """
    if b.dim() < 2:
        raise ValueError(f"b: expected a batch [B, ...] of right-hand sides, got shape {tuple(b.shape)}")
    if iterations < 0:
        raise ValueError(f"iterations: expected >= 0, got {iterations}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance: expected >= 0, got {tolerance}")
    x = torch.zeros_like(b) if x0 is None else x0.to(dtype=b.dtype, device=b.device).clone()
    if x.shape != b.shape:
        raise ValueError(f"x0: shape {tuple(x.shape)} does not match b {tuple(b.shape)}")
    r = b - matvec(x) if x0 is not None else b.clone()
    b_norm = _dot(b, b).sqrt()
    scale = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    rr = _dot(r, r)
    p = r.clone()

    def objective():
        return -0.5 * _dot(x, b + r) + constant

    residuals = [rr.sqrt() / scale]
    objectives = [objective()] if constant is not None else None
    active = residuals[0] > tolerance
    tiny = torch.finfo(b.dtype).tiny
    steps = 0
    for _ in range(iterations):
        if not bool(active.any()):
            break
        ap = matvec(p)
        pap = _dot(p, ap)
        # frozen systems, and those with a zero curvature direction (A singular on p), take no step
        ok = active & (pap > tiny)
        alpha = torch.where(ok, rr / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x.add_(_expand(alpha, x) * p)
        r.sub_(_expand(alpha, r) * ap)
        rr_new = _dot(r, r)
        beta = torch.where(ok, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p.mul_(_expand(beta, p)).add_(r)
        rr = torch.where(ok, rr_new, rr)
        steps += 1
        rel = rr.sqrt() / scale
        residuals.append(rel)
        if objectives is not None:
            objectives.append(objective())
        active = ok & (rel > tolerance)
    res = torch.stack(residuals)
    return CGResult(x, res, torch.stack(objectives) if objectives is not None else None, steps,
                    res[-1] <= tolerance)
