"""A slow float64 reference of the merges a mergekit-style config describes, written plainly from the
documented semantics (mergekit's, with pymerge's documented defaults), independent of pymerge's engine and
method code. The random masks follow pymerge's RNG contract (the DARE hash of (seed, model, tensor) and a
torch generator seeded with `tensor_seed`), the only thing shared with the implementation."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file

from pymerge import ops
from pymerge.methods.sparsify import tensor_seed

LAYER = re.compile(r"\.layers\.(\d+)\.")

# (consensus, sparsification, normalize, rescale) per method: mergekit's registry, pymerge's density defaults
GTA = {
    "task_arithmetic": (None, None, False, False),
    "ties": ("sum", "magnitude", True, False),
    "dare_ties": ("sum", "random", False, True),
    "dare_linear": (None, "random", False, True),
    "breadcrumbs": (None, "outliers", False, False),
    "breadcrumbs_ties": ("sum", "outliers", False, False),
    "della": ("sum", "della", True, True),
    "della_linear": (None, "della", False, True),
}
DENSITY_DEFAULT = {"ties": 0.2}


def load(path) -> Dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update({k: v.double() for k, v in load_file(str(f)).items()})
    return out


def setting(value, name: str, t: float):
    """mergekit's evaluate_setting: scalar, gradient list, or filter list (substring / '*' / fallback)."""
    if isinstance(value, list):
        if all(isinstance(x, (int, float)) for x in value):
            scaled = t * (len(value) - 1)
            i0 = int(scaled)
            i1 = min(len(value) - 1, i0 + 1)
            return (1 - (scaled - i0)) * value[i0] + (scaled - i0) * value[i1]
        for c in value:
            f = c.get("filter")
            if f is None or f == "*" or f in name:
                return setting(c["value"], name, t)
        return None
    return value


def param(key, name, t, model_params, global_params, default=None):
    for source in (model_params or {}, global_params or {}):
        if key in source:
            v = setting(source[key], name, t)
            if v is not None:
                return v
    return default


class Virtual:
    """A model as the config assembles it: {output name: (tensor, depth)}."""

    def __init__(self, tensors: Dict[str, torch.Tensor], depths: Dict[str, float]):
        self.tensors, self.depths = tensors, depths


def whole(path) -> Virtual:
    ts = load(path)
    layers = {int(m.group(1)) for k in ts for m in [LAYER.search(k)] if m}
    n = max(layers) + 1
    depths = {}
    for k in ts:
        m = LAYER.search(k)
        depths[k] = (1.0 if n == 1 else int(m.group(1)) / (n - 1)) if m else 0.0
    return Virtual(ts, depths)


def stacked(parts) -> Virtual:
    """parts: [(path, (a, b))]: layers a..b-1 of each, renumbered; embeddings from the first, rest from last."""
    loaded = [load(p) for p, _ in parts]
    ts, depths, off = {}, {}, 0
    for k, v in loaded[0].items():
        if not LAYER.search(k) and "embed" in k:
            ts[k], depths[k] = v, 0.0
    for src, (_, (a, b)) in zip(loaded, parts):
        for j, i in enumerate(range(a, b)):
            for k, v in src.items():
                m = LAYER.search(k)
                if m and int(m.group(1)) == i:
                    out = k[:m.start(1)] + str(off + j) + k[m.end(1):]
                    ts[out], depths[out] = v, (1.0 if b - a == 1 else j / (b - a - 1))
        off += b - a
    for k, v in loaded[-1].items():
        if not LAYER.search(k) and "embed" not in k:
            ts[k], depths[k] = v, 0.0
    return Virtual(ts, depths)


def _mask_random(tv, density, seed, i, name):
    if density >= 1:
        return torch.ones_like(tv, dtype=torch.bool)
    bits = torch.from_numpy(ops.dare_random_bits(tensor_seed(seed, i, name), tv.numel())).reshape(tv.shape)
    return bits >= math.ceil((1.0 - density) * 16777216.0)


def _mask_magnitude(tv, density, trim):
    if density >= 1:
        return torch.ones_like(tv, dtype=torch.bool)
    n = tv.numel()
    k = math.ceil(density * n) if trim == "ceil" else int(density * n)
    threshold = torch.sort(tv.abs().flatten(), descending=True).values[k - 1]
    return tv.abs() >= threshold  # entries tied with the k-th largest are all kept (documented)


def _mask_outliers(tv, density, gamma):
    if density >= 1:
        return torch.ones_like(tv, dtype=torch.bool)
    n = tv.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    ranked = torch.sort(tv.abs().flatten()).values  # keep ascending ranks n_bot+1 .. n-n_top, ties by value
    mask = torch.ones_like(tv, dtype=torch.bool)
    if n_top > 0:
        mask &= tv.abs() <= ranked[n - n_top - 1]
    if n_bot > 0:
        mask &= tv.abs() > ranked[n_bot - 1]
    return mask


def _mask_della(tv, density, eps, seed, i, name):
    if density >= 1:
        return torch.ones_like(tv, dtype=torch.bool)
    t2 = tv.unsqueeze(0) if tv.dim() < 2 else tv
    ranks = torch.argsort(torch.argsort(t2.abs(), dim=1), dim=1).double()
    probs = (density - eps) + ranks / (t2.shape[1] - 1) * 2 * eps
    g = torch.Generator().manual_seed(tensor_seed(seed, i, name))
    u = torch.rand(tv.shape, generator=g).double()
    return u < probs.reshape(tv.shape)


def gta(method, base, tvs, mps, gp, name, t):
    consensus, sparsify, norm_default, rescale_default = GTA[method]
    if consensus is not None and "consensus" in gp:
        consensus = gp["consensus"]
    normalize = param("normalize", name, t, None, gp, norm_default)
    rescale = param("rescale", name, t, None, gp, rescale_default)
    lam = param("lambda", name, t, None, gp, 1.0)
    seed = gp.get("seed", 0)
    trim = gp.get("trim_count", "ceil" if method == "ties" else "floor")
    if rescale is True or rescale == "l1":
        rescale = True
    elif rescale in (False, "none"):
        rescale = False
    weights, kept = [], []
    for i, (tv, mp) in enumerate(zip(tvs, mps)):
        w = param("weight", name, t, mp, gp, 1.0)
        d = param("density", name, t, mp, gp, DENSITY_DEFAULT.get(method, 1.0))
        if sparsify == "magnitude":
            mask = _mask_magnitude(tv, d, trim)
        elif sparsify == "random":
            mask = _mask_random(tv, d, seed, i, name)
        elif sparsify == "outliers":
            mask = _mask_outliers(tv, d, param("gamma", name, t, mp, gp, 0.01))
        elif sparsify == "della":
            mask = _mask_della(tv, d, param("epsilon", name, t, mp, gp, 0.15), seed, i, name)
        else:
            mask = torch.ones_like(tv, dtype=torch.bool)
        masked = tv * mask
        if rescale and sparsify is not None and d < 1:
            before, after = tv.abs().sum(), masked.abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                masked = masked * (before / after)
        weights.append(w)
        kept.append(masked * w)
    wd = torch.stack(kept)
    wt = torch.tensor(weights, dtype=torch.float64).reshape((-1,) + (1,) * tvs[0].dim())
    if consensus:
        s = wd.sum(0) if consensus == "sum" else wd.sign().sum(0)
        majority = torch.where(s >= 0, 1.0, -1.0).double()
        agree = wd.sign() == majority
        mixed = (wd * agree).sum(0)
        div = (wt * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = wt.sum(0)
        div[div.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


def slerp(t, a, b):
    na, nb = a.norm(), b.norm()
    an = a / na if na > 1e-8 else a
    bn = b / nb if nb > 1e-8 else b
    dot = (an * bn).sum()
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b
    th = torch.arccos(dot)
    return torch.sin(th * (1 - t)) / torch.sin(th) * a + torch.sin(th * t) / torch.sin(th) * b


def model_stock(base, ms, filter_wise):
    n = len(ms)
    if filter_wise:
        vs = [(m - base).unsqueeze(0) if base.dim() < 2 else (m - base) for m in ms]
    else:
        vs = [(m - base).flatten() for m in ms]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            c = (vs[i] * vs[j]).sum(-1) / (vs[i].norm(dim=-1) * vs[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append(c.clamp(-1, 1))
    c = torch.stack(cos).mean(0)
    t = n * c / (1 + (n - 1) * c)
    if filter_wise:
        t = t.reshape((-1,) + (1,) * (base.dim() - 1)) if base.dim() >= 2 else t
    return t * (sum(ms) / n) + (1 - t) * base


def reference(cfg: dict) -> Dict[str, torch.Tensor]:
    """float64 merged tensors for a config whose model references are local paths."""
    method = cfg["merge_method"]
    gp = cfg.get("parameters") or {}
    base_path = cfg.get("base_model")
    if "slices" in cfg:
        cols = list(zip(*[s["sources"] for s in cfg["slices"]]))
        srcs = [(stacked([(s["model"], tuple(s["layer_range"])) for s in col]), col[0].get("parameters"),
                 col[0]["model"]) for col in cols]
    else:
        ms = [m if isinstance(m, dict) else {"model": m} for m in cfg["models"]]
        srcs = [(whole(m["model"]), m.get("parameters"), m["model"]) for m in ms]
    base = None
    if base_path is not None and method != "linear" and method != "passthrough":
        found = [s for s in srcs if str(s[2]) == str(base_path)]
        base = found[0][0] if found else whole(base_path)
        srcs = [s for s in srcs if str(s[2]) != str(base_path)]
    models = [s[0] for s in srcs]
    mps = [s[1] for s in srcs]
    out = {}
    for name in models[0].tensors:
        t = models[0].depths[name]
        xs = [m.tensors[name] for m in models]
        if method == "linear":
            ws = [param("weight", name, t, mp, gp, 1.0) for mp in mps]
            r = sum(w * x for w, x in zip(ws, xs))
            out[name] = r / sum(ws) if param("normalize", name, t, None, gp, True) else r
        elif method == "passthrough":
            out[name] = xs[0] * param("scale", name, t, mps[0], gp, 1.0)
        elif method == "slerp":
            out[name] = slerp(param("t", name, t, None, gp), base.tensors[name], xs[0])
        elif method == "model_stock":
            out[name] = model_stock(base.tensors[name], xs, bool(gp.get("filter_wise", False)))
        else:
            b = base.tensors[name]
            out[name] = gta(method, b, [x - b for x in xs], mps, gp, name, t)
    return out
