"""Per-layer-type rules: the per-example gradient of a layer's parameters from its input Z and output
gradient G, as squared sums (fast path, `accumulate`) or as dense per-example tensors (`per_example`, used
when one parameter is shared by several modules, e.g. tied embeddings, so contributions add before squaring).

All rules take, per layer call, the inputs and output gradient regrouped example-major: a batch of B rows is
N examples of B / N rows each (several sequences per example for multiple choice). Sums over an example's
rows (tokens, choices, calls) are what make the gradient per example; squaring happens after them.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pymerge import ops


class NotPerExample(Exception):
    """A layer call whose rows cannot be assigned to examples (e.g. computed once for the whole batch)."""


def group_rows(t: torch.Tensor, n: int, feature_dims: int) -> torch.Tensor:
    """[B, ..., f] -> [N, rows, f] (feature_dims trailing dims kept), with B a multiple of N, example-major."""
    if t.dim() < feature_dims + 1 or t.shape[0] % n != 0:
        raise NotPerExample(f"leading dimension {t.shape[0] if t.dim() else None} is not a multiple of {n} examples")
    tail = t.shape[t.dim() - feature_dims:] if feature_dims else ()
    return t.reshape(n, -1, *tail)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except Exception:  # transformers absent: no HF Conv1D layers to handle
        return None


# A Pair is (module inputs, output gradient) of one call; G has the output's shape.
Pair = Tuple[Tuple[torch.Tensor, ...], torch.Tensor]


class Rule:
    """Base: parameters the rule covers and its two ways of producing per-example squared gradients."""

    def accumulate(self, module: nn.Module, pairs: Sequence[Pair], n: int, acc: Dict[str, torch.Tensor]) -> None:
        for local, pe in self.per_example(module, pairs, n).items():
            acc[local] += pe.float().square().sum(0)

    def per_example(self, module: nn.Module, pairs: Sequence[Pair], n: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


def _cat_rows(pairs: Sequence[Pair], n: int, z_dims: int, g_dims: int):
    zs = [group_rows(z[0], n, z_dims) for z, _ in pairs]
    gs = [group_rows(g, n, g_dims) for _, g in pairs]
    return (zs[0] if len(zs) == 1 else torch.cat(zs, 1)), (gs[0] if len(gs) == 1 else torch.cat(gs, 1))


def _bias_sq(g: torch.Tensor) -> torch.Tensor:
    return g.float().sum(1).square().sum(0)


class LinearRule(Rule):
    """nn.Linear (weight [k, d]) and HF Conv1D (weight [d, k]): grad_n = G_nᵀ Z_n, bias grad_n = Σ_rows G_n."""

    def __init__(self, transposed: bool):
        self.transposed = transposed  # Conv1D stores [in, out]

    def accumulate(self, module, pairs, n, acc):
        z, g = _cat_rows(pairs, n, 1, 1)
        if self.transposed:
            ops.sq_grad_accumulate(acc["weight"], z, g)
        else:
            ops.sq_grad_accumulate(acc["weight"], g, z)
        if "bias" in acc:
            acc["bias"] += _bias_sq(g)

    def per_example(self, module, pairs, n):
        z, g = _cat_rows(pairs, n, 1, 1)
        z, g = z.float(), g.float()
        out = {"weight": torch.bmm(z.transpose(1, 2), g) if self.transposed else torch.bmm(g.transpose(1, 2), z)}
        if module.bias is not None:
            out["bias"] = g.sum(1)
        return out


class EmbeddingRule(Rule):
    """nn.Embedding: row v of example n's gradient is the sum of G over that example's tokens equal to v
    (summed before squaring: a token repeated in one example adds up). padding_idx rows get no gradient."""

    def _keys(self, module, pairs, n):
        ids, g = _cat_rows(pairs, n, 0, 1)
        ids = ids.reshape(n, -1)
        vocab = module.num_embeddings
        keys = (torch.arange(n, device=ids.device)[:, None] * vocab + ids).reshape(-1)
        g = g.reshape(-1, g.shape[-1]).float()
        if module.padding_idx is not None:
            keep = ids.reshape(-1) != module.padding_idx
            keys, g = keys[keep], g[keep]
        return keys, g, vocab

    def accumulate(self, module, pairs, n, acc):
        keys, g, vocab = self._keys(module, pairs, n)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        summed = torch.zeros(uniq.numel(), g.shape[1], device=g.device).index_put_((inverse,), g, accumulate=True)
        acc["weight"].index_put_((uniq % vocab,), summed.square(), accumulate=True)

    def per_example(self, module, pairs, n):
        keys, g, vocab = self._keys(module, pairs, n)
        dense = torch.zeros(n * vocab, g.shape[1], device=g.device).index_add_(0, keys, g)
        return {"weight": dense.reshape(n, vocab, -1)}


class LayerNormRule(Rule):
    """nn.LayerNorm: weight grad_n = Σ_rows G ∘ x̂ with x̂ the normalised input, bias grad_n = Σ_rows G."""

    def per_example(self, module, pairs, n):
        dims = len(module.normalized_shape)
        xs, gs = [], []
        for (x, *_), g in pairs:
            xhat = F.layer_norm(x.float(), module.normalized_shape, eps=module.eps)
            xs.append(group_rows(xhat, n, dims).reshape(n, -1, *module.normalized_shape))
            gs.append(group_rows(g, n, dims).reshape(n, -1, *module.normalized_shape))
        xhat = xs[0] if len(xs) == 1 else torch.cat(xs, 1)
        g = (gs[0] if len(gs) == 1 else torch.cat(gs, 1)).float()
        out = {}
        if module.weight is not None:
            out["weight"] = (g * xhat).sum(1)
        if module.bias is not None:
            out["bias"] = g.sum(1)
        return out


class GenericModuleRule(Rule):
    """Any other leaf module called on one tensor: per-example VJP of the module itself (torch.func vmap over
    examples, each example's rows as a small batch). Correct for any module whose output rows depend only on
    the same example's input rows."""

    chunk = 64

    def per_example(self, module, pairs, n):
        from torch.func import functional_call, vjp, vmap

        params = {k: v.detach() for k, v in module.named_parameters(recurse=False)}
        total = {k: torch.zeros(n, *v.shape, device=v.device) for k, v in params.items()}
        for inputs, g in pairs:
            if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
                raise NotPerExample("generic rule needs exactly one tensor input")
            x = inputs[0]
            if x.shape[0] != g.shape[0] or x.shape[0] % n:
                raise NotPerExample("input and output rows do not match the examples")
            xg = x.reshape(n, -1, *x.shape[1:])
            gg = g.reshape(n, -1, *g.shape[1:])

            def one(xn, gn):
                _, pull = vjp(lambda p: functional_call(module, p, (xn,)), params)
                return pull(gn.to(x.dtype if x.is_floating_point() else gn.dtype))[0]

            for lo in range(0, n, self.chunk):
                got = vmap(one)(xg[lo:lo + self.chunk], gg[lo:lo + self.chunk])
                for k in total:
                    total[k][lo:lo + self.chunk] += got[k].float()
        return total


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The rule for a module owning parameters directly; None when it has children (no per-layer rule)."""
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        return LinearRule(transposed=False)
    if conv1d is not None and isinstance(module, conv1d):
        return LinearRule(transposed=True)
    if isinstance(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq:
        return EmbeddingRule()
    if isinstance(module, nn.LayerNorm):
        return LayerNormRule()
    if next(module.children(), None) is None:
        return GenericModuleRule()
    return None
