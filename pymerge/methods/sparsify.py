"""Generalized task arithmetic (mergekit's family): sparsify each task vector, weight, elect signs, combine.

    τ̃_i = rescale(mask_i ⊙ τ_i)                   mask: magnitude top-k | random (DARE) | outliers (breadcrumbs)
                                                     | rank-dependent random (DELLA)
    d_i = w_i τ̃_i
    s   = sign consensus of the d_i: "sum" sign(Σ d_i) or "count" sign(Σ sign d_i), ties -> +1 (mergekit)
    θ   = θ_pre + λ Σ_i [d_i agrees with s] d_i / D,  D = Σ_i [agrees] w_i if `normalize` (else 1)

Without consensus every d_i counts and D = Σ w_i. The task vectors are fp32; masks are boolean, never
materialised in the weight dtype (mergekit's `int8_mask` has nothing to change here and is accepted as is).
Random masks depend only on (seed, model index, tensor name), as DARE's do.
"""
from __future__ import annotations

import math
import zlib
from typing import List, Optional, Sequence

import torch

from pymerge import ops
from pymerge.methods.base import ConfigError, MergeMethod, Param, in_range

def tensor_seed(seed: int, model_index: int, name: str) -> int:
    """The random stream of model i's tensor NAME: independent of processing order and device."""
    return (seed * 1_000_003 + zlib.crc32(f"{model_index}:{name}".encode())) % (2**62)


TRIM_COUNTS = ("ceil", "floor")   # k = ceil(d·n) (pymerge's TIES op) or int(d·n) (mergekit)
CONSENSUS = ("sum", "count")
RESCALES = ("l1", "inverse", "none")  # L1-norm preserving (mergekit), 1/(1-p) (DARE paper), none
RESCALE_ALIASES = ((True, "l1"), (False, "none"))


def keep_count(n: int, density: float, trim_count: str) -> int:
    k = math.ceil(density * n) if trim_count == "ceil" else int(density * n)
    return min(n, max(k, 0))


def _kth_smallest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """k-th smallest (1-based) of a flat tensor, by selection."""
    return torch.kthvalue(mag, k).values


def fused_density(n: int, density: float, trim_count: str) -> Optional[float]:
    """The density that makes the fused TIES op (k = ceil(d'·n)) keep the entries `trim_count` asks for:
    floor -> d' = (k - 1/2) / n with k = int(d·n), so ceil(d'·n) = k whatever the rounding. None: k = 0."""
    if trim_count == "ceil" or density >= 1:
        return density
    k = int(density * n)
    return (k - 0.5) / n if k >= 1 else None


def magnitude_mask(tv: torch.Tensor, density: float, trim_count: str = "ceil", where: str = "") -> torch.Tensor:
    """Keep the k largest |τ| (k = ceil or int of density·n; ties at the threshold all kept)."""
    n = tv.numel()
    if density >= 1 or n == 0:
        return torch.ones_like(tv, dtype=torch.bool)
    k = keep_count(n, density, trim_count)
    if k <= 0:
        raise ConfigError(f"{where}: density {density} keeps no entry of a tensor of {n} elements "
                          f"(trim_count {trim_count!r}); raise density or use trim_count: ceil")
    mag = tv.abs()
    return mag >= _kth_smallest(mag.flatten(), n - k + 1)


def trim_magnitudes(tv: torch.Tensor, density: float, trim_count: str = "ceil", where: str = "") -> torch.Tensor:
    """tv * magnitude_mask(tv, ...), exactly (same k, ties at the threshold all kept), by the compiled TIES
    selection instead of a sort-based kthvalue: TIES of one model on a zero base is its trimmed task vector (one
    model's elected sign is its own, its disjoint mean itself). Finite inputs (the engine checks them first)."""
    n = tv.numel()
    if density >= 1 or n == 0:
        return tv
    fused = fused_density(n, density, trim_count)
    if fused is None or not tv.is_floating_point() or tv.dtype == torch.float64:
        return tv * magnitude_mask(tv, density, trim_count, where)  # raises for k = 0; dtypes the op lacks
    return ops.ties_merge(torch.zeros_like(tv), [tv], fused, 1.0)


def outlier_mask(tv: torch.Tensor, density: float, gamma: float, trim_count: str = "floor") -> torch.Tensor:
    """Model Breadcrumbs: drop the int(γ·n) largest |τ| and the smallest ones, keeping k = d·n entries
    (fewer large ones are dropped when d + γ > 1)."""
    n = tv.numel()
    if density >= 1 or n == 0:
        return torch.ones_like(tv, dtype=torch.bool)
    target = keep_count(n, density, trim_count)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    hi = n - n_top  # keep the entries of ascending rank in (n_bot, hi]
    if hi <= n_bot:
        return torch.zeros_like(tv, dtype=torch.bool)
    mag = tv.abs()
    flat = mag.flatten()
    keep = mag <= _kth_smallest(flat, hi) if n_top > 0 else torch.ones_like(tv, dtype=torch.bool)
    if n_bot > 0:
        keep &= mag > _kth_smallest(flat, n_bot)
    return keep


def _generator(seed: int, model_index: int, name: str, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(tensor_seed(seed, model_index, name))
    return g


def della_keep_probabilities(tv: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune: keep probability grows linearly with the magnitude rank within each row
    (dim 1; a vector is one row), from density - ε (smallest) to density + ε (largest)."""
    t = tv.unsqueeze(0) if tv.dim() < 2 else tv
    order = torch.argsort(t.abs(), dim=1)
    n1 = t.shape[1]
    ranks = torch.empty(t.shape, dtype=torch.float32, device=t.device)  # 0-based rank of each entry (one sort)
    ranks.scatter_(1, order, torch.arange(n1, dtype=torch.float32, device=t.device).expand(order.shape).contiguous())
    rank_norm = ranks / (n1 - 1) if n1 > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + rank_norm * (2 * epsilon)).reshape(tv.shape)


def della_mask(tv: torch.Tensor, density: float, epsilon: float, seed: int, model_index: int,
               name: str) -> torch.Tensor:
    if density >= 1 or tv.numel() == 0:
        return torch.ones_like(tv, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(tv, dtype=torch.bool)
    u = torch.rand(tv.shape, generator=_generator(seed, model_index, name, tv.device), device=tv.device)
    return u < della_keep_probabilities(tv, density, epsilon)


def random_drop(tv: torch.Tensor, density: float, seed: int, model_index: int, name: str,
                rescale: str) -> torch.Tensor:
    """DARE with keep probability `density` through the fused op (same mask as `dare` with p = 1 - density)."""
    if density >= 1:
        return tv
    p = 1.0 - density
    dropped = ops.dare(tv, p, tensor_seed(seed, model_index, name))  # survivors × 1/(1-p)
    if rescale == "inverse":
        return dropped
    return apply_rescale(tv, torch.where(dropped != 0, tv, torch.zeros((), dtype=tv.dtype)), rescale)


def apply_rescale(tv: torch.Tensor, masked: torch.Tensor, rescale: str, keep_prob: Optional[float] = None,
                  eps: float = 1e-7) -> torch.Tensor:
    """L1: scale the masked task vector back to the L1 norm of the full one (mergekit's `rescale: true`;
    left as is when either norm is below eps); inverse: × 1/keep_prob; none: as is."""
    if rescale == "l1":
        before = float(tv.abs().sum(dtype=torch.float64))
        after = float(masked.abs().sum(dtype=torch.float64))
        if before < eps or after < eps:
            return masked
        return masked * (before / after)
    if rescale == "inverse" and keep_prob is not None and keep_prob < 1:
        return masked / keep_prob
    return masked


def combine(base: torch.Tensor, tvs: Sequence[torch.Tensor], weights: Sequence[float],
            consensus: Optional[str], normalize: bool, lam: float) -> torch.Tensor:
    """θ_pre + λ (Σ agreeing w_i τ̃_i) / D (see the module docstring); fp32 task vectors, base's dtype out."""
    if consensus is None:
        div = sum(weights) if normalize else 1.0
        if abs(div) < 1e-8:
            div = 1.0
        return ops.weighted_sum(list(tvs), [lam * w / div for w in weights], base=base.to(tvs[0].dtype))
    weighted = [t * w for t, w in zip(tvs, weights)]
    if consensus == "sum":
        total = weighted[0].clone()
        for d in weighted[1:]:
            total += d
    else:
        total = torch.sign(weighted[0])
        for d in weighted[1:]:
            total += torch.sign(d)
    majority = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    del total
    mixed = torch.zeros_like(weighted[0])
    div = torch.zeros_like(weighted[0])
    for d, w in zip(weighted, weights):
        agree = torch.sign(d) == majority
        mixed += torch.where(agree, d, 0.0)
        div += agree.to(div.dtype) * w
    if normalize:
        div[div == 0] = 1.0
        mixed /= div
    if lam != 1:
        mixed *= lam
    return base.to(mixed.dtype) + mixed


# The parameters every method of the family shares (mergekit's names and meanings).
def family_params(*, normalize: bool, rescale: str, density: float = 1.0, trim_count: Optional[str] = None,
                  consensus: Optional[str] = None, weight_default=1.0) -> tuple:
    params = [
        Param("weight", float, weight_default, scope="model", help="per-model weight w_i"),
        Param("density", float, density, scope="model", check=in_range(0.0, 1.0, lo_open=True),
              help="fraction of each task vector kept"),
        Param("normalize", bool, normalize, help="divide by the sum of the (agreeing) weights"),
        Param("lambda", float, 1.0, help="scaling λ of the merged task vector"),
        Param("int8_mask", bool, False, help="accepted for mergekit configs; no effect (masks are boolean)"),
    ]
    if rescale != "fixed":
        params.append(Param("rescale", str, rescale, choices=RESCALES, aliases=RESCALE_ALIASES,
                            help="after dropping: l1 (keep the L1 norm; mergekit's true), inverse (1/keep), none"))
    if trim_count is not None:
        params.append(Param("trim_count", str, trim_count, choices=TRIM_COUNTS,
                            help="kept entries: ceil(d·n) or floor = mergekit's int(d·n)"))
    if consensus is not None:
        params.append(Param("consensus", str, consensus, choices=CONSENSUS,
                            help="sign election: sum (TIES) or count (majority of signs)"))
    return tuple(params)


def float_task_vectors(x) -> List[torch.Tensor]:
    """τ_i in fp32, subtracted in fp32 (a bf16 / fp16 difference would round before any mask is chosen)."""
    if x.base.dtype == torch.float32:
        return x.task_vectors()
    base = x.base.float()
    return [m.float() - base for m in x.models]


class SparsifiedTaskVectors(MergeMethod):
    """A method of the family: drop entries of each model's fp32 task vector (`sparsify`), then `combine` them with
    the family's parameters (weight, consensus, normalize, lambda)."""

    needs_base = True

    def sparsify(self, x, i: int, tv: torch.Tensor) -> torch.Tensor:
        """Model i's task vector τ_i (fp32) with entries dropped and rescaled."""
        raise NotImplementedError

    def merge_tensor(self, x):
        p = x.params
        tvs = [self.sparsify(x, i, tv) for i, tv in enumerate(float_task_vectors(x))]
        return combine(x.base, tvs, x.per_model("weight"), p.get("consensus"), p["normalize"], p["lambda"])


def random_drop_params(*, normalize: bool, consensus: Optional[str], extra: tuple = ()) -> tuple:
    """The parameters of a random-drop method of the family (mergekit's dare_* / della*): the family's, L1
    rescale by default, `extra`, then the `seed` of the random masks."""
    return family_params(normalize=normalize, rescale="l1", consensus=consensus) + tuple(extra) + (
        Param("seed", int, 0, help="random seed"),)


def register_variants(base: type, module: str, **variants) -> tuple:
    """Register one subclass of `base` per variant, class name=(method name, description, params); returns the
    classes in that order. The variants of a method differ only in these (e.g. with and without sign consensus)."""
    from pymerge.methods.registry import register

    return tuple(register(type(cls, (base,), {"name": name, "description": description, "params": params,
                                              "__module__": module, "__doc__": description}))
                 for cls, (name, description, params) in variants.items())
