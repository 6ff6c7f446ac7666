"""One set of module hooks that captures, per layer call, the layer's input Z and its output O in one batched
forward, so that the output gradients G = dS/dO of a later backward can be paired with Z.

The one capture of every statistic built from (Z, G) pairs: the diagonal Fisher (per-example squared
gradients), the Gram (Z only: `need_grads=False`), K-FAC (Z and G) and the mask Fisher (G of the projections
whose inputs or outputs the masks scale). `LayerCapture` knows nothing about any of them. Weights stay frozen:
gradients are taken with respect to the captured outputs (torch.autograd.grad), so autograd never forms
weight gradients and nothing is written to `.grad`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn


@dataclass
class LayerCall:
    """One call of a hooked module: its (detached) positional inputs and its output (still in the graph)."""

    name: str
    module: nn.Module
    inputs: Tuple[torch.Tensor, ...]
    output: Optional[torch.Tensor]  # None: the call could not be captured (keyword inputs, non-tensor output)
    root: Optional[torch.Tensor] = None  # set where the hook made the output a graph leaf (first layers)


@dataclass
class LayerCapture:
    """Forward hooks on `modules` (name -> module) recording every call as a LayerCall.

    `batch_size` (set before each forward) lets the hooks undo broadcasting: a layer evaluated once for the
    whole batch (HF position embeddings on position_ids of shape [1, T]) is expanded to `batch_size` rows, so
    its output gradient is per example instead of summed over the batch. `on_call(call)` runs after each
    capture (e.g. to keep only statistics of Z).
    """

    modules: Dict[str, nn.Module]
    batch_size: Optional[int] = None
    on_call: Optional[Callable[[LayerCall], None]] = None
    enabled: bool = True
    need_grads: bool = True  # False: forward-only statistics (Gram): inputs only, outputs never made graph leaves
    calls: List[LayerCall] = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def __enter__(self) -> "LayerCapture":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.calls.clear()

    def clear(self) -> None:
        self.calls.clear()

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            if not self.enabled:
                return None
            if kwargs or not isinstance(output, torch.Tensor) or not args or not output.is_floating_point():
                self.calls.append(LayerCall(name, module, (), None))  # its parameters take the generic path
                return None
            inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            if not self.need_grads:
                call = LayerCall(name, module, inputs, None)
                if self.on_call is not None:
                    self.on_call(call)
                return None
            expand = (self.batch_size is not None and self.batch_size > 1 and output.dim() > 0
                      and output.shape[0] == 1 and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() > 0
                      and inputs[0].shape[0] == 1)
            root = None
            if not output.requires_grad:  # first layers (embeddings): make them a leaf of the graph
                output = root = output.detach().requires_grad_()
            returned = output
            if expand:  # broadcast over the batch later: expand here so each example gets its own gradient
                output = output.expand(self.batch_size, *output.shape[1:])
                inputs = (inputs[0].expand(self.batch_size, *inputs[0].shape[1:]),) + inputs[1:]
                returned = output
            call = LayerCall(name, module, inputs, output, root)
            self.calls.append(call)
            if self.on_call is not None:
                self.on_call(call)
            return returned

        return hook

    def outputs(self) -> List[torch.Tensor]:
        return [c.output for c in self.calls if c.output is not None]


def output_gradients(scores: torch.Tensor, calls: Sequence[LayerCall], cotangents: torch.Tensor,
                     *, retain_graph: bool = False) -> List[Optional[torch.Tensor]]:
    """G for every captured call, for R cotangents on `scores` at once: cotangents has shape [R, *scores.shape].

    R > 1 runs one vmapped (batched) backward (`is_grads_batched`), not R backward passes; each returned G
    has shape [R, *output.shape] (None where the output does not influence the scores).
    """
    outputs = [c.output for c in calls]  # callers pass captured calls only (output not None)
    if cotangents.shape[0] == 1:
        grads = torch.autograd.grad(scores, outputs, cotangents[0], retain_graph=retain_graph, allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    return list(torch.autograd.grad(scores, outputs, cotangents, retain_graph=retain_graph, allow_unused=True,
                                    is_grads_batched=True))


def streamed_backward(scores: torch.Tensor, calls: Sequence[LayerCall], cotangent: torch.Tensor,
                      on_grad: Callable[[LayerCall, torch.Tensor], None], *, retain_graph: bool = False) -> None:
    """One backward of <cotangent, scores> calling on_grad(call, G) for every captured call as soon as autograd
    produces its G (a tensor hook), so the output gradients are never all alive at once. The backward runs
    towards the graph leaves the capture made (first layers); without any, towards the outputs themselves."""
    roots = [c.root for c in calls if c.root is not None]
    if not roots:
        grads = torch.autograd.grad(scores, [c.output for c in calls], cotangent, allow_unused=True,
                                    retain_graph=retain_graph)
        for c, g in zip(calls, grads):
            if g is not None:
                on_grad(c, g)
        return

    def hook_for(call):
        def hook(g):
            on_grad(call, g)
        return hook

    handles = [c.output.register_hook(hook_for(c)) for c in calls]
    try:
        torch.autograd.grad(scores, roots, cotangent, allow_unused=True, retain_graph=retain_graph)
    finally:
        for h in handles:
            h.remove()


class FrozenParameters:
    """Context: every parameter requires_grad=False and the model in eval mode; both restored on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self._requires = {p: p.requires_grad for p in self.model.parameters()}
        self._training = {m: m.training for m in self.model.modules()}
        for p in self._requires:
            p.requires_grad_(False)
        self.model.eval()
        return self

    def __exit__(self, *exc):
        for p, r in self._requires.items():
            p.requires_grad_(r)
        for m, t in self._training.items():
            m.training = t
