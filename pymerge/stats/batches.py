"""Batches in, sums out: the checks every estimator applies to a batch, the rank's share of the batches under
torch.distributed (torchrun), and the all-reduce of accumulated sums. Estimators hold sums and counts, never
means, so one all-reduce of a flat buffer gives every rank the result of one process over all batches."""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch


def check_batch(batch, index: int) -> Dict[str, torch.Tensor]:
    """The batch's tensors, after checks that name the batch and key at fault."""
    if not isinstance(batch, dict):
        raise TypeError(f"batch {index}: expected a dict of tensors, got {type(batch).__name__}")
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"batch {index}: contains no tensors")
    sizes = {k: v.shape[0] if v.dim() else None for k, v in tensors.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch {index}: tensors disagree on the number of examples (first dimension): {sizes}")
    ids = tensors.get("input_ids")
    for key in ("attention_mask", "token_type_ids", "choice_mask"):
        if ids is not None and key in tensors and tensors[key].shape != ids.shape:
            raise ValueError(f"batch {index}: {key} has shape {tuple(tensors[key].shape)}, "
                             f"expected input_ids' shape {tuple(ids.shape)}")
    if "choice_ids" in tensors and "choice_attention_mask" in tensors:
        if tensors["choice_attention_mask"].shape != tensors["choice_ids"].shape:
            raise ValueError(f"batch {index}: choice_attention_mask shape {tuple(tensors['choice_attention_mask'].shape)}"
                             f" != choice_ids shape {tuple(tensors['choice_ids'].shape)}")
    return tensors


def distributed():
    """torch.distributed when a process group of more than one rank is up (torchrun), else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def my_batches(batches: Iterable, device) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
    """(index, checked batch on `device`) for this rank's share (batch i goes to rank i mod world)."""
    dist = distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    for index, raw in enumerate(batches):
        batch = check_batch(raw, index)
        if index % world != rank:
            continue
        yield index, {k: v.to(device) for k, v in batch.items()}


def all_reduce_sums(sums: Dict[str, torch.Tensor], counts: Optional[List[float]] = None) -> List[float]:
    """Sum `sums` (in place, per key) and `counts` over the ranks; a no-op in one process."""
    counts = list(counts or [])
    dist = distributed()
    if dist is None or not sums and not counts:
        return counts
    names = sorted(sums)
    device = next(iter(sums.values())).device if sums else torch.device("cpu")
    for dtype in sorted({sums[k].dtype for k in names}, key=str):  # one flat buffer per dtype
        group = [k for k in names if sums[k].dtype == dtype]
        flat = torch.cat([sums[k].reshape(-1) for k in group])
        dist.all_reduce(flat)
        offset = 0
        for k in group:
            numel = sums[k].numel()
            sums[k].copy_(flat[offset:offset + numel].view_as(sums[k]))
            offset += numel
    if counts:
        c = torch.tensor(counts, dtype=torch.float64, device=device)
        dist.all_reduce(c)
        counts = c.tolist()
    return counts


def gather_first(value):
    """The first non-None of every rank's `value` (e.g. the model kind one rank saw)."""
    dist = distributed()
    if dist is None:
        return value
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return next((v for v in values if v is not None), None)
