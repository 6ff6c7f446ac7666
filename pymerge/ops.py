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
# TODO(fisher helper): sq_grad_accumulate(fisher, inputs, grad_outputs, weights=None) and its reference.
