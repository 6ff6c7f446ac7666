"""What the per-layer matrix statistics (Gram, K-FAC) share: which layers they cover, the layer metadata of
the file format, which token rows count (padding masked), the second moment of a layer's inputs, and the
refusal, before any work, of what cannot fit in memory.

A linear layer is an nn.Linear (weight [k, d]) or HF Conv1D (weight [d, k], "transposed"). Its input rows z
(one per token) are augmented with a trailing 1 when the layer has a bias, so weight and bias are one matrix
W' = [W | b] of shape [k, d + 1].
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pymerge.errors import PymergeError
from pymerge.stats.rules import _conv1d_type


class StatisticsTooLarge(PymergeError, MemoryError):
    """The per-layer matrices of a statistic would not fit in memory (raised before any work)."""


def linear_layers(model: nn.Module, exclude: Sequence[str] = ()) -> Dict[str, nn.Module]:
    """Module name -> nn.Linear / Conv1D, each module once, without those matching an `exclude` glob pattern."""
    conv1d = _conv1d_type()
    kinds = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    if isinstance(exclude, str):
        exclude = (exclude,)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds) and name
            and not any(fnmatch.fnmatchcase(name, pat) for pat in exclude)}


def sizes(module: nn.Module) -> Tuple[int, int, bool]:
    """(in_features d, out_features k, transposed) of a linear layer."""
    transposed = not isinstance(module, nn.Linear)
    d, k = module.weight.shape if transposed else module.weight.shape[::-1]
    return int(d), int(k), transposed


def layer_metadata(layers: Dict[str, nn.Module], tokens: Dict[str, float]) -> str:
    """The `layers` metadata entry (JSON) of the file format."""
    out = {}
    for name, module in layers.items():
        d, k, transposed = sizes(module)
        out[name] = {"weight": f"{name}.weight", "bias": f"{name}.bias" if module.bias is not None else None,
                     "transposed": transposed, "in_features": d, "out_features": k, "tokens": int(tokens[name])}
    return json.dumps(out, sort_keys=True)


# ------------------------------------------------------------------------------------------------------ memory
def _available_bytes(device: torch.device) -> Tuple[int, str]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_memory(kind: str, layers: Dict[str, nn.Module], matrices, device: torch.device, acc_dtype: torch.dtype,
                 max_memory_bytes: Optional[int] = None) -> int:
    """Refuse (StatisticsTooLarge, a MemoryError, with the numbers) when the per-layer matrices cannot fit; return the bytes needed.

    matrices(d', k) -> list of matrix sides per layer (gram: [d'], kfac: [d', k]). Counted: the accumulators
    (acc_dtype, on `device`; fp32 results are formed in them, apart on another device or dtype) and one scratch
    product of the widest input."""
    per_layer = []
    for name, module in layers.items():
        d, k, _ = sizes(module)
        sides = matrices(d + (module.bias is not None), k)
        per_layer.append((sum(s * s for s in sides), name, sides))
    elems = sum(e for e, _, _ in per_layer)
    apart = device.type != "cpu" or acc_dtype != torch.float32  # results copied out of the accumulators
    widest = max(sizes(m)[0] for m in layers.values())
    need = elems * (torch.finfo(acc_dtype).bits // 8 + (4 if apart else 0)) + widest * (widest + 1) * 4
    budget, what = (max_memory_bytes, "allowed (max_memory_bytes)") if max_memory_bytes is not None \
        else _available_bytes(device)
    if need > budget:
        top = sorted(per_layer, reverse=True)[:3]
        biggest = ", ".join(f"{n} {'+'.join(f'{s}x{s}' for s in sides)}" for _, n, sides in top)
        raise StatisticsTooLarge(f"{kind} statistics of {len(layers)} linear layers need {_gib(need)} "
                          f"({elems:,} matrix entries, accumulated in {str(acc_dtype).replace('torch.', '')}"
                          f"{' plus fp32 results on the CPU' if apart else ''}) but only {_gib(budget)} are {what}; largest layers: {biggest}. Leave "
                          f"layers out with exclude=[pattern, ...] (CLI: --exclude), e.g. the LM head")
    return need


# ------------------------------------------------------------------------------------------ token rows that count
class TokenRows:
    """Which rows of a layer's input are real tokens: matched by the input's leading shape against the batch's
    token masks (attention_mask; for multiple choice per choice; for encoder-decoder the encoder's, repeated per
    answer, and the answers'). Inputs with no matching mask (pooler, classifier on [N, d]) count every row."""

    def __init__(self):
        self.masks: List[torch.Tensor] = []
        self.ambiguous: set = set()

    def set_batch(self, batch: Dict[str, torch.Tensor]) -> None:
        masks = []
        am = batch.get("attention_mask")
        if am is not None:
            am2 = am.reshape(-1, am.shape[-1]) > 0
            masks.append(am2)
        if "choice_ids" in batch:
            choices = batch["choice_ids"]
            n, c, length = choices.shape
            dec = choices.reshape(n * c, length) != -100
            cam = batch.get("choice_attention_mask")
            if cam is not None:
                dec = dec & (cam.reshape(n * c, length) > 0)
            masks.append(dec)
            if am is not None:
                masks.append(am2.repeat_interleave(c, 0))
        self.ambiguous = set()
        for i, a in enumerate(masks):
            for b in masks[:i]:
                if a.shape == b.shape and not torch.equal(a, b):
                    self.ambiguous.add(tuple(a.shape))
        self.masks = masks

    def select(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x [..., f] -> the counted rows [rows, f]."""
        lead = tuple(x.shape[:-1])
        flat = x.reshape(-1, x.shape[-1])
        for m in self.masks:
            if tuple(m.shape) == lead or (len(lead) == 1 and lead[0] != m.shape[0] and m.numel() == lead[0]):
                if tuple(m.shape) in self.ambiguous:
                    raise ValueError(f"layer {name!r}: cannot tell its padding rows apart (two token masks of shape "
                                     f"{tuple(m.shape)} differ, e.g. encoder length == answer length); pad the "
                                     f"answers to another length")
                keep = m.reshape(-1)
                return flat if bool(keep.all()) else flat[keep]
        return flat


# ------------------------------------------------------------------------------------------ products
# One full GEMM per product: computing only the upper blocks of the symmetric zᵀz (about 2/3 of the
# multiply-adds for 3 blocks) measured no faster on the 2-core CPU of bench/stats.py, so it was left out.
def add_gram_(acc: torch.Tensor, z: torch.Tensor, *, beta: float = 1.0) -> None:
    """acc[:d, :d] = beta * acc[:d, :d] + zᵀz, in place (a strided view when acc is bias-augmented)."""
    d = z.shape[1]
    acc[:d, :d].addmm_(z.T, z, beta=beta)


def complete_(acc: torch.Tensor, d: int) -> torch.Tensor:
    """For a bias-augmented [d + 1, d + 1] accumulator, its last row from its last column (symmetry)."""
    if acc.shape[0] > d:
        acc[d, :d] = acc[:d, d]
    return acc


class SecondMoments:
    """Per layer, Σ z' z'ᵀ of the bias-augmented rows z' = [z, 1] accumulated straight into the [d', d'] result
    (Σ z zᵀ, Σ z in the last column, the row count in the corner), in fp32 (fp64 for fp64
    models). A product is formed once in a scratch buffer reused across calls and batches, then added to every
    layer reading that same input tensor one after the other (q, k, v)."""

    def __init__(self, layers: Dict[str, nn.Module], device, dtype: torch.dtype):
        self.layers = layers
        self.dtype = dtype
        self.acc = {}
        for n, m in layers.items():
            side = sizes(m)[0] + (m.bias is not None)
            self.acc[n] = torch.zeros(side, side, dtype=dtype, device=device)
        self.count = {n: 0.0 for n in layers}
        self._scratch: Dict[int, torch.Tensor] = {}  # d -> [d, d + 1]: product and column sums
        self._last = None  # (input tensor, version, masks, scratch, count) of the previous call

    def add(self, name: str, x: torch.Tensor, rows: TokenRows) -> None:
        last = self._last
        if last is not None and last[0].data_ptr() == x.data_ptr() and last[0].shape == x.shape \
                and last[0].stride() == x.stride() and last[1] == x._version and last[2] is rows.masks:
            scratch, count = last[3], last[4]
        else:
            z = rows.select(name, x).to(self.dtype)
            d = z.shape[1]
            scratch = self._scratch.get(d)
            if scratch is None:
                scratch = self._scratch[d] = z.new_zeros(d, d + 1)
            add_gram_(scratch, z, beta=0.0)
            torch.sum(z, 0, out=scratch[:, d])
            count = float(z.shape[0])
            self._last = (x, x._version, rows.masks, scratch, count)
        acc = self.acc[name]
        d = scratch.shape[0]
        if acc.shape[0] == d:  # no bias: the product only
            acc.add_(scratch[:, :d])
        else:  # bias: product and column sums, the row count in the corner
            acc[:d].add_(scratch)
            acc[d, d] += count
        self.count[name] += count

    def end_batch(self) -> None:
        self._last = None

    def sums(self) -> Dict[str, torch.Tensor]:
        return self.acc

    def mean_(self, name: str, count: float) -> torch.Tensor:
        """(1/N) Σ z' z'ᵀ as fp32 [d', d'], formed in place in the accumulator."""
        d = sizes(self.layers[name])[0]
        return complete_(self.acc[name], d).div_(max(count, 1.0)).float().cpu()


def accumulation_dtype(model: nn.Module) -> torch.dtype:
    params = list(model.parameters())
    return torch.float64 if params and params[0].dtype == torch.float64 else torch.float32


def prepare(kind: str, model: nn.Module, exclude: Sequence[str], matrices, max_memory_bytes: Optional[int]):
    """Checks shared by the layer statistics, all before any work: (layers, device, accumulation dtype)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layers = linear_layers(model, exclude)
    if not layers:
        raise ValueError(f"{kind}: model {type(model).__name__} has no nn.Linear / Conv1D layers"
                         f"{' left after exclude=' + repr(list(exclude)) if exclude else ''}")
    device = next(iter(layers.values())).weight.device
    dtype = accumulation_dtype(model)
    check_memory(kind, layers, matrices, device, dtype, max_memory_bytes)
    return layers, device, dtype


def check_captured(calls) -> None:
    """Every call of a covered layer was captured (a call with keyword inputs cannot be)."""
    missed = sorted({c.name for c in calls if not c.inputs})
    if missed:
        raise ValueError(f"layers {missed[:5]} were called with keyword inputs or returned a non-tensor: their "
                         f"input rows cannot be captured; leave them out with exclude=[...]")
