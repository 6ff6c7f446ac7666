"""Diagonal Fisher estimation: F = (1/N) Σ_n E_{y ~ p(y|x_n)} (∇_θ log p(y|x_n))², per example, never the
square of a batch-summed gradient.

One batched forward captures every layer's input Z (capture.LayerCapture); one batched backward from the
log-probabilities gives every layer's output gradient G; per-layer rules (rules.py) turn (Z, G) into per-example
squared gradients, the Linear/Conv1D ones with the fused op `pymerge.ops.sq_grad_accumulate`.

Modes: the expectation over y is exact (C - 1 pseudo-examples per example whose output gradients have the
second moment of the C outcomes weighted by p, see logprobs.compact_exact_rounds; one per outcome scaled by √p
for a user's log_prob_fn), sampled (num_samples draws y ~ p, each weighted 1/num_samples), or
empirical (y = the label).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from pymerge.stats import logprobs
from pymerge.stats.batches import all_reduce_sums, gather_first, my_batches
from pymerge.stats.capture import FrozenParameters, LayerCapture, output_gradients
from pymerge.stats.registry import register
from pymerge.stats.rules import NotPerExample, rule_for
from pymerge.stats.store import Statistics, base_metadata

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


def _slice_pairs(pairs, n: int, lo: int, hi: int):
    out = []
    for inputs, g in pairs:
        rows = g.shape[0] // n
        out.append((tuple(x[lo * rows:hi * rows] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == g.shape[0]
                          else x for x in inputs), g[lo * rows:hi * rows]))
    return out


class _Estimator:
    def __init__(self, model, plan: _Plan, trainable, mode, num_samples, length_normalize, seed, max_rounds,
                 batched_backward, out=None):
        self.model, self.plan, self.trainable = model, plan, trainable
        self.batched_backward = batched_backward
        self.mode, self.num_samples, self.length_normalize = mode, num_samples, length_normalize
        self.seed, self.max_rounds = seed, max_rounds
        if out is None:
            self.acc = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                        for name, p in trainable.items()}
        else:
            self.acc = {name: out[name].zero_() for name in trainable}
        self.count = 0

    def batch(self, capture: LayerCapture, objective, batch, index: int, compact: bool = False) -> None:
        capture.clear()
        capture.enabled = True
        with torch.enable_grad():
            out = objective(self.model, batch, self._set_rows(capture), self.length_normalize)
        capture.enabled = False  # rules may call modules again (generic VJP): not a capture
        n = out.log_probs.shape[0]
        gen = torch.Generator(device=out.log_probs.device).manual_seed(self.seed * 1_000_003 + index)
        cot = logprobs.cotangents(out, self.mode, self.num_samples, gen, index, compact=compact)
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


def _check_out(out, trainable) -> None:
    if not isinstance(out, dict):
        raise TypeError(f"out: expected a dict of tensors by parameter name, got {type(out).__name__}")
    for name, p in trainable.items():
        t = out.get(name)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"out: no tensor for trainable parameter {name!r}")
        if t.dtype != torch.float32 or tuple(t.shape) != tuple(p.shape) or t.device != p.device:
            raise ValueError(f"out[{name!r}]: expected float32 {tuple(p.shape)} on {p.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")


def estimate(model: nn.Module, batches: Iterable[Dict[str, torch.Tensor]], mode: str = "exact", num_samples: int = 1,
             log_prob_fn: Optional[Callable] = None, length_normalize: bool = False, *, kind: str = "auto",
             seed: int = 0, max_rounds_per_backward: int = 32, batched_backward: bool = True,
             out: Optional[Dict[str, torch.Tensor]] = None, **kwargs) -> Statistics:
    """Diagonal Fisher of `model` over `batches` (dicts of tensors; formats in pymerge.stats.logprobs).

    mode: "exact" (expectation over all classes / answer choices), "sampled" (num_samples draws per example),
    "empirical" (the labels), or "masks" (head/neuron mask Fisher, pymerge.stats.masks, which takes the other
    keyword arguments). kind: the model kind of pymerge.stats.logprobs ("auto" by default). log_prob_fn(model,
    batch) -> normalised log-probs [N, C] (or [N, F, C]) makes any model estimable. Only parameters with
    requires_grad=True get a Fisher; the model is left as it was (requires_grad, train/eval) and no .grad is
    written. batched_backward=False runs the R > 1 pseudo-example rounds (exact classes, samples) as R
    streamed backwards over one retained graph instead of one vmapped backward (less memory). Under
    torch.distributed (torchrun) batches are sharded across ranks and the sums all-reduced.
    out: {name: fp32 tensor of the parameter's shape, on its device} for every trainable parameter (e.g. the
    tensors of a previous result): the Fisher is accumulated and returned in them (overwritten, no .cpu()), so
    a caller estimating again and again (the DF-Merge search) allocates nothing per call; the values are the
    same as without out, bit for bit.
    """
    if mode == "masks":  # the mask Fisher is its own estimator; this entry point keeps delegating to it
        from pymerge.stats import masks

        if log_prob_fn is not None:
            kwargs["log_prob_fn"] = log_prob_fn
        return masks.estimate_masks(model, batches, **kwargs)
    if kwargs:
        raise TypeError(f"estimate() got unexpected arguments {sorted(kwargs)}")
    logprobs.check_mode(mode, num_samples)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("model has no trainable parameters (requires_grad=True): nothing to estimate a Fisher for")
    if any(not p.is_floating_point() for p in trainable.values()):
        raise ValueError("model: trainable parameters must be floating point")
    device = next(iter(trainable.values())).device
    if out is not None:
        _check_out(out, trainable)
    plan = _Plan(model, trainable)
    est = _Estimator(model, plan, trainable, mode, num_samples, length_normalize, seed, max_rounds_per_backward,
                     batched_backward, out)
    kind_name = None
    with FrozenParameters(model), LayerCapture(plan.modules) as capture:
        for index, batch in my_batches(batches, device):
            name, objective = logprobs.resolve(model, batch, kind, log_prob_fn)
            kind_name = kind_name or name
            # exact mode with the built-in objectives (log-softmax outputs, normalised as functions of θ): C - 1
            # rounds (logprobs.compact_exact_rounds); a user's log_prob_fn keeps all C
            est.batch(capture, objective, batch, index, compact=name != "custom")
    (total,) = all_reduce_sums(est.acc, [float(est.count)])
    kind_name = gather_first(kind_name)
    total = int(total)
    if total == 0:
        raise ValueError("batches: no examples (the iterable was empty)")
    if out is not None:
        tensors = {k: v.div_(total) for k, v in est.acc.items()}  # same rounding as v / total
    else:
        tensors = {k: (v / total).cpu() for k, v in est.acc.items()}
    metadata = base_metadata("fisher", mode, total, model)
    metadata.update(model_kind=kind_name or "unknown", model_class=type(model).__name__,
                    length_normalize=str(bool(length_normalize)))
    if mode == "sampled":
        metadata["num_samples"] = str(num_samples)
        metadata["seed"] = str(seed)
    return Statistics(tensors, metadata)


@register("fisher", modes=logprobs.MODES, default_mode="exact",
          summary="diagonal Fisher per parameter (per-example squared gradients of the log-likelihood)")
def collect_fisher(model, batches, *, mode: str, model_kind: str = "auto", **options) -> Statistics:
    return estimate(model, batches, mode=mode, kind=model_kind, **options)
