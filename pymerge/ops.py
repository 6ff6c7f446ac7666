"""Python face of the compiled merge ops: argument checks, fake (meta) kernels, pure-torch references.

Every public op here dispatches to torch.ops.pymerge.<name> (csrc/) and has a `<name>_reference` beside it,
written plainly in torch, that the tests compare against.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from pymerge import _extension

_HAS_EXT = _extension.load()


def _check_list(name: str, tensors: Sequence[torch.Tensor], *, max_len: int = 16) -> None:
    if not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
        raise ValueError(f"{name}: expected a non-empty list of tensors, got {type(tensors).__name__} of length 0"
                         if isinstance(tensors, (list, tuple)) else
                         f"{name}: expected a list of tensors, got {type(tensors).__name__}")
    if len(tensors) > max_len:
        raise ValueError(f"{name}: at most {max_len} models are supported, got {len(tensors)}")
    ref = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(f"{name}[{i}]: shape {tuple(t.shape)} does not match {name}[0] shape {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name}[{i}]: dtype {t.dtype} does not match {name}[0] dtype {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name}[{i}]: device {t.device} does not match {name}[0] device {ref.device}")


# ----------------------------------------------------------------------------------------------
# weighted_sum
# ----------------------------------------------------------------------------------------------
def weighted_sum_reference(tensors, weights, base=None):
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    if base is not None:
        acc += base.float()
    for w, t in zip(weights, tensors):
        acc += float(w) * t.float()
    return acc.to(tensors[0].dtype)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: Optional[torch.Tensor] = None):
    """base + Σ_i w_i t_i in one pass (averaging, task arithmetic, general task arithmetic)."""
    _check_list("tensors", tensors)
    if len(weights) != len(tensors):
        raise ValueError(f"weights: expected {len(tensors)} values (one per tensor), got {len(weights)}")
    if base is not None:
        _check_list("base", [tensors[0], base], max_len=2)
    if _HAS_EXT:
        return torch.ops.pymerge.weighted_sum(list(tensors), [float(w) for w in weights], base)
    return weighted_sum_reference(tensors, weights, base)


# TODO(ops helper): fisher_merge, dfmerge_combine, ties_merge, dare with references and register_fake.

# ----------------------------------------------------------------------------------------------
# sq_grad_accumulate (owned by the Fisher engine)
# ----------------------------------------------------------------------------------------------
def _sq_grad_as_3d(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() != 3:
        raise ValueError(f"{name}: expected [N, T, features] or [N, features], got shape {tuple(t.shape)}")
    return t


def _check_sq_grad(fisher, inputs, grad_outputs, weights):
    if not isinstance(fisher, torch.Tensor) or fisher.dim() != 2 or fisher.dtype != torch.float32:
        raise ValueError("fisher: expected a float32 [d, k] tensor, got "
                         + (f"{fisher.dtype} of shape {tuple(fisher.shape)}" if isinstance(fisher, torch.Tensor)
                            else type(fisher).__name__))
    if not fisher.is_contiguous():
        raise ValueError("fisher: expected a contiguous tensor (it is updated in place)")
    z = _sq_grad_as_3d("inputs", inputs)
    g = _sq_grad_as_3d("grad_outputs", grad_outputs)
    if z.shape[:2] != g.shape[:2]:
        raise ValueError(f"inputs {tuple(inputs.shape)} and grad_outputs {tuple(grad_outputs.shape)} disagree on N/T")
    if (z.shape[2], g.shape[2]) != tuple(fisher.shape):
        raise ValueError(f"fisher: shape {tuple(fisher.shape)} does not match inputs features {z.shape[2]} x "
                         f"grad_outputs features {g.shape[2]}")
    for name, t in (("inputs", z), ("grad_outputs", g)):
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.device != fisher.device:
            raise ValueError(f"{name}: device {t.device} does not match fisher device {fisher.device}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != (z.shape[0],):
            raise ValueError(f"weights: expected a [N] = [{z.shape[0]}] tensor, got "
                             f"{tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__}")
        if weights.device != fisher.device:
            raise ValueError(f"weights: device {weights.device} does not match fisher device {fisher.device}")
    return z, g


def sq_grad_accumulate_reference(fisher, inputs, grad_outputs, weights=None):
    """Plain torch: materialise every per-example gradient Z_n^T G_n in fp32, square, weight, sum."""
    z = _sq_grad_as_3d("inputs", inputs).float()
    g = _sq_grad_as_3d("grad_outputs", grad_outputs).float()
    per_example = torch.bmm(z.transpose(1, 2), g)  # [N, d, k]
    w = torch.ones(z.shape[0], device=z.device) if weights is None else weights.float()
    fisher += (w[:, None, None] * per_example.square()).sum(0)


def _has_kernel(op: str, device: torch.device) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return _HAS_EXT and key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"pymerge::{op}", key)


def sq_grad_accumulate(fisher: torch.Tensor, inputs: torch.Tensor, grad_outputs: torch.Tensor,
                       weights: Optional[torch.Tensor] = None) -> None:
    """In place: fisher [d, k] (fp32) += Σ_n w_n (Z_nᵀ G_n)² for Z = inputs [N, T, d], G = grad_outputs [N, T, k].

    [N, d] / [N, k] mean T = 1 (one GEMM on the squares). fp16/bf16 inputs accumulate in fp32; per-example
    gradients are only ever formed a memory-bounded chunk at a time (PYMERGE_SQ_GRAD_BUDGET_MB, default 32).
    """
    z, g = _check_sq_grad(fisher, inputs, grad_outputs, weights)
    if _has_kernel("sq_grad_accumulate", fisher.device):
        torch.ops.pymerge.sq_grad_accumulate(fisher, z, g, weights)
    else:
        sq_grad_accumulate_reference(fisher, z, g, weights)


if _HAS_EXT:
    @torch.library.register_fake("pymerge::sq_grad_accumulate")
    def _sq_grad_accumulate_fake(fisher, inputs, grad_outputs, weights):
        return None
