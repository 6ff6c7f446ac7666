"""Diagonal Fisher estimation: F = (1/N) Σ_n E_{y ~ p(y|x_n)} (∇_θ log p(y|x_n))², per example, never the
square of a batch-summed gradient.

One batched forward captures every layer's input Z (hooks.LayerCapture); one batched backward from the
log-probabilities gives every layer's output gradient G; per-layer rules (rules.py) turn (Z, G) into per-example
squared gradients, the Linear/Conv1D ones with the fused op `pymerge.ops.sq_grad_accumulate`.

Modes: the expectation over y is exact (one pseudo-example per (example, outcome), its output gradient scaled by
√p, all outcomes in one vmapped backward), sampled (num_samples draws y ~ p, each weighted 1/num_samples), or
empirical (y = the label).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from pymerge.fisher import objectives
from pymerge.fisher.hooks import FrozenParameters, LayerCapture, output_gradients
from pymerge.fisher.rules import NotPerExample, rule_for
from pymerge.fisher.store import FORMAT_VERSION, Fisher, structure_fingerprint, weights_fingerprint

MODES = ("exact", "sampled", "empirical", "masks")
# Parameters only ever computed for the whole batch at once (T5 relative position bias): generic path.
_NOT_PER_EXAMPLE_NAMES = ("relative_attention_bias",)
_DENSE_BUDGET_BYTES = 64 << 20


class _Plan:
    """Which module computes which parameter's per-example gradient, and how."""

    def __init__(self, model: nn.Module, trainable: Dict[str, nn.Parameter]):
        by_param = {id(p): name for name, p in trainable.items()}
        self.modules: Dict[str, nn.Module] = {}
        self.rules = {}
        self.owners: Dict[str, List[tuple]] = defaultdict(list)  # param name -> [(module name, local name)]
        generic = set()
        for mname, module in model.named_modules(remove_duplicate=False):
            own = [(local, p) for local, p in module.named_parameters(recurse=False) if id(p) in by_param]
            if not own:
                continue
            rule = rule_for(module)
            if rule is None or any(part in mname for part in _NOT_PER_EXAMPLE_NAMES):
                generic.update(by_param[id(p)] for _, p in own)
                continue
            if mname not in self.modules and module not in self.modules.values():
                self.modules[mname] = module
                self.rules[mname] = rule
            key = next(k for k, m in self.modules.items() if m is module)
            for local, p in own:
                if (key, local) not in self.owners[by_param[id(p)]]:
                    self.owners[by_param[id(p)]].append((key, local))
        self.generic = generic  # parameters no layer rule covers: per-example autograd path
        for name in generic:
            self.owners.pop(name, None)


def _check_batch(batch, index: int) -> Dict[str, torch.Tensor]:
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


def _cotangents(out: objectives.Outcomes, mode: str, num_samples: int, generator: torch.Generator,
                index: int) -> torch.Tensor:
    """[R, N, F, C] output gradients of the log-probabilities: one slice per pseudo-example round."""
    lp = out.log_probs
    n, f, c = lp.shape
    mask = out.mask.to(lp.dtype)
    if mode == "empirical":
        if out.labels is None:
            raise ValueError(f"batch {index}: mode='empirical' needs 'labels' in every batch")
        labels = out.labels.reshape(n, -1)
        if labels.shape[1] != f:
            raise ValueError(f"batch {index}: labels shape {tuple(out.labels.shape)} does not match {n} x {f} outcomes")
        if ((labels >= c) | (labels < -100) | ((labels < 0) & (labels != -100))).any():
            raise ValueError(f"batch {index}: labels must be in [0, {c}) (or -100 to ignore)")
        valid = mask * (labels != -100).to(lp.dtype)
        return (torch.nn.functional.one_hot(labels.clamp(min=0), c).to(lp.dtype) * valid[..., None]).unsqueeze(0)
    p = lp.detach().exp()
    if mode == "exact":
        if f > 1:
            raise ValueError("mode='exact' enumerates one categorical outcome per example (classification, multiple "
                             "choice); token-level LM Fishers need mode='sampled' or 'empirical'")
        eye = torch.eye(c, dtype=lp.dtype, device=lp.device)  # round k: class k with output gradient × √p_k
        return eye[:, None, None, :] * (p.sqrt() * mask[..., None]).permute(2, 0, 1)[..., None]
    draws = torch.multinomial(p.reshape(-1, c), num_samples, replacement=True, generator=generator)
    onehot = torch.nn.functional.one_hot(draws.T.reshape(num_samples, n, f), c).to(lp.dtype)
    return onehot * mask[None, ..., None] / math.sqrt(num_samples)


def _slice_pairs(pairs, n: int, lo: int, hi: int):
    out = []
    for inputs, g in pairs:
        rows = g.shape[0] // n
        out.append((tuple(x[lo * rows:hi * rows] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == g.shape[0]
                          else x for x in inputs), g[lo * rows:hi * rows]))
    return out


class _Estimator:
    def __init__(self, model, plan: _Plan, trainable, mode, num_samples, length_normalize, seed, max_rounds,
                 batched_backward):
        self.model, self.plan, self.trainable = model, plan, trainable
        self.batched_backward = batched_backward
        self.mode, self.num_samples, self.length_normalize = mode, num_samples, length_normalize
        self.seed, self.max_rounds = seed, max_rounds
        self.acc = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in trainable.items()}
        self.count = 0

    def batch(self, capture: LayerCapture, objective, batch, index: int) -> None:
        capture.clear()
        capture.enabled = True
        with torch.enable_grad():
            out = objective(self.model, batch, self._set_rows(capture), self.length_normalize)
        capture.enabled = False  # rules may call modules again (generic VJP): not a capture
        n = out.log_probs.shape[0]
        gen = torch.Generator(device=out.log_probs.device).manual_seed(self.seed * 1_000_003 + index)
        cot = _cotangents(out, self.mode, self.num_samples, gen, index)
        calls = [c for c in capture.calls if c.output is not None]
        generic = set(self.plan.generic)
        for c in capture.calls:
            if c.output is None:  # could not capture this call: its parameters take the generic path
                generic.update(p for p, owners in self.plan.owners.items() if any(m == c.name for m, _ in owners))
        if calls and (cot.shape[0] == 1 or not self.batched_backward):
            for r in range(cot.shape[0]):  # one streamed backward per round (retain the graph between them)
                self._streamed_round(out.log_probs, calls, cot[r], n, generic, retain_graph=r + 1 < cot.shape[0])
        for lo in range(0, cot.shape[0] if cot.shape[0] > 1 and self.batched_backward else 0, self.max_rounds):
            grads = output_gradients(out.log_probs, calls, cot[lo:lo + self.max_rounds],
                                     retain_graph=lo + self.max_rounds < cot.shape[0])
            for r in range(grads[0].shape[0] if grads else 0):
                self._accumulate_round(calls, [None if g is None else g[r] for g in grads], n, generic)
        capture.clear()
        del out, calls
        if generic:
            self._generic(capture, objective, batch, cot, n, sorted(generic))
        self.count += n

    @staticmethod
    def _set_rows(capture):
        def set_rows(rows: int) -> None:
            capture.batch_size = rows

        return set_rows

    def _streamed_round(self, scores, calls, cotangent, n, generic: set, retain_graph: bool = False) -> None:
        """One round, consumed during the backward: each single-call layer's G is turned into squared
        per-example gradients by a tensor hook as soon as autograd produces it, then freed, so activation
        gradients are never all alive at once. Layers called several times or sharing a parameter wait for
        the end of the backward (their contributions must add up before squaring)."""
        counts = defaultdict(int)
        for c in calls:
            counts[c.name] += 1
        shared = {m for owners in self.plan.owners.values() if len(owners) > 1 for m, _ in owners}
        streamed = [c for c in calls if counts[c.name] == 1 and c.name not in shared]
        later = [c for c in calls if counts[c.name] > 1 or c.name in shared]

        def hook_for(call):
            def hook(g):
                self._accumulate_round([call], [g], n, generic, dense=False)
            return hook

        handles = [c.output.register_hook(hook_for(c)) for c in streamed]
        try:
            roots = [c.root for c in calls if c.root is not None]
            grads = torch.autograd.grad(scores, roots + [c.output for c in later], cotangent, allow_unused=True,
                                        retain_graph=retain_graph)
        finally:
            for h in handles:
                h.remove()
        if later:
            self._accumulate_round(later, list(grads[len(roots):]), n, generic)

    def _accumulate_round(self, calls, grads, n, generic: set, dense: bool = True) -> None:
        pairs = defaultdict(list)
        for call, g in zip(calls, grads):
            if g is not None:
                pairs[call.name].append((call.inputs, g))
        shared = {pname: owners for pname, owners in self.plan.owners.items()
                  if len(owners) > 1 and pname not in generic}
        for mname, module_pairs in pairs.items():
            module, rule = self.plan.modules[mname], self.plan.rules[mname]
            locals_ = {local: pname for pname, owners in self.plan.owners.items() if pname not in shared
                       and pname not in generic for m, local in owners if m == mname}
            if not locals_:
                continue
            acc = {local: self.acc[pname] for local, pname in locals_.items()}
            try:
                rule.accumulate(module, module_pairs, n, acc)
            except NotPerExample:
                generic.update(locals_.values())
        for pname, owners in shared.items() if dense else ():
            self._dense(pname, owners, pairs, n, generic)

    def _dense(self, pname, owners, pairs, n, generic) -> None:
        """A parameter shared by several modules: per-example gradients summed over owners, then squared."""
        shape = self.acc[pname].shape
        chunk = max(1, _DENSE_BUDGET_BYTES // max(1, 4 * math.prod(shape)))
        try:
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                total = None
                for mname, local in owners:
                    if mname not in pairs:
                        continue
                    sliced = _slice_pairs(pairs[mname], n, lo, hi)
                    part = self.plan.rules[mname].per_example(self.plan.modules[mname], sliced, hi - lo)[local]
                    total = part if total is None else total + part
                if total is not None:
                    self.acc[pname] += total.square().sum(0)
        except NotPerExample:
            generic.add(pname)

    def _generic(self, capture, objective, batch, cot, n, names: List[str]) -> None:
        """Parameters without a per-layer rule: one example at a time with autograd (slow, always correct)."""
        params = [self.trainable[k] for k in names]
        try:
            for p in params:
                p.requires_grad_(True)
            for i in range(n):
                sub = {k: v[i:i + 1] for k, v in batch.items()}
                with torch.enable_grad():
                    out = objective(self.model, sub, lambda rows: None, self.length_normalize)
                    for r in range(cot.shape[0]):
                        grads = torch.autograd.grad(out.log_probs, params, cot[r, i:i + 1],
                                                    retain_graph=r + 1 < cot.shape[0], allow_unused=True)
                        for k, g in zip(names, grads):
                            if g is not None:
                                self.acc[k] += g.float().square()
        finally:
            for p in params:
                p.requires_grad_(False)


def _distributed():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def estimate(model: nn.Module, batches: Iterable[Dict[str, torch.Tensor]], mode: str = "exact", num_samples: int = 1,
             log_prob_fn: Optional[Callable] = None, length_normalize: bool = False, *, kind: str = "auto",
             seed: int = 0, max_rounds_per_backward: int = 32, batched_backward: bool = True,
             **kwargs) -> Fisher:
    """Diagonal Fisher of `model` over `batches` (dicts of tensors; formats in pymerge.fisher.objectives).

    mode: "exact" (expectation over all classes / answer choices), "sampled" (num_samples draws per example),
    "empirical" (the labels), or "masks" (head/neuron mask Fisher, pymerge.fisher.masks). log_prob_fn(model,
    batch) -> normalised log-probs [N, C] (or [N, F, C]) makes any model estimable. Only parameters with
    requires_grad=True get a Fisher; the model is left as it was (requires_grad, train/eval) and no .grad is
    written. batched_backward=False runs the R > 1 pseudo-example rounds (exact classes, samples) as R
    streamed backwards over one retained graph instead of one vmapped backward (less memory). Under torch.distributed (torchrun) batches are sharded across ranks and the sums all-reduced.
    """
    if mode == "masks":
        try:
            from pymerge.fisher.masks import estimate_masks
        except ImportError as exc:
            raise ImportError("mode='masks' needs pymerge.fisher.masks (the mask Fisher), which is not available "
                              f"in this installation ({exc})") from exc
        if log_prob_fn is not None:
            kwargs["log_prob_fn"] = log_prob_fn
        return estimate_masks(model, batches, **kwargs)
    if kwargs:
        raise TypeError(f"estimate() got unexpected arguments {sorted(kwargs)}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "sampled" and (not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("model has no trainable parameters (requires_grad=True): nothing to estimate a Fisher for")
    if any(not p.is_floating_point() for p in trainable.values()):
        raise ValueError("model: trainable parameters must be floating point")
    device = next(iter(trainable.values())).device
    dist = _distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    plan = _Plan(model, trainable)
    est = _Estimator(model, plan, trainable, "sampled" if mode == "sampled" else mode, num_samples,
                     length_normalize, seed, max_rounds_per_backward, batched_backward)
    kind_name = None
    with FrozenParameters(model), LayerCapture(plan.modules) as capture:
        for index, raw in enumerate(batches):
            batch = _check_batch(raw, index)
            if index % world != rank:
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            name, objective = objectives.resolve(model, batch, kind, log_prob_fn)
            kind_name = kind_name or name
            est.batch(capture, objective, batch, index)
    count = torch.tensor([float(est.count)], dtype=torch.float64, device=device)
    if dist:
        names = sorted(est.acc)
        flat = torch.cat([est.acc[k].reshape(-1) for k in names])
        dist.all_reduce(flat)
        dist.all_reduce(count)
        offset = 0
        for k in names:
            numel = est.acc[k].numel()
            est.acc[k] = flat[offset:offset + numel].view_as(est.acc[k])
            offset += numel
        kinds = [None] * world
        dist.all_gather_object(kinds, kind_name)
        kind_name = next((k for k in kinds if k), None)
    total = int(count.item())
    if total == 0:
        raise ValueError("batches: no examples (the iterable was empty)")
    tensors = {k: (v / total).cpu() for k, v in est.acc.items()}
    metadata = {
        "pymerge_fisher": FORMAT_VERSION,
        "mode": mode,
        "num_examples": str(total),
        "structure": structure_fingerprint(model),
        "weights": weights_fingerprint(model),
        "model_kind": kind_name or "unknown",
        "model_class": type(model).__name__,
        "length_normalize": str(bool(length_normalize)),
    }
    if mode == "sampled":
        metadata["num_samples"] = str(num_samples)
        metadata["seed"] = str(seed)
    return Fisher(tensors, metadata)
