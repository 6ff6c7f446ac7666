"""Mask Fisher (004_638e5f0688748e6a.txt, after Kwon et al. 2022): the Fisher of virtual head and neuron masks.

A mask m = 1 multiplies every attention head's context and every FFN neuron's activation, so the model's output
is unchanged. The per-example mask gradient is g_{n,h} = Σ_{t,j∈h} a_{n,t,j} ∂log p_n/∂a_{n,t,j}: no mask is
inserted into the model; the shared capture (capture.LayerCapture, as for every statistic) records the
projections around the mask sites, and ONE batched forward and ONE backward of log-probabilities summed over the
batch give, per example, the activations a and their gradients (examples do not interact). Model weights are
frozen meanwhile: the backward computes activation gradients only, no weight gradients, nothing lands in `.grad`.

Mask Fisher (eq. 4): I = (1/N) Σ_n E_y g_n(y)², E_y exact over classes (each class a pseudo-example weighted by
p_c; off one forward, C - 1 backwards since the score has mean zero, one for binary tasks) or empirical (the
true label, one backward). It is then mapped onto parameter blocks (paper's scheme by default: rows of Q and K
of head h get the head's value, rows of the FFN-in projection get the neuron's, every other parameter F = 1),
giving a full per-parameter `Fisher` that the merge engine reads like any other Fisher file.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from pymerge.stats.batches import all_reduce_sums, distributed
from pymerge.stats.capture import FrozenParameters, LayerCapture, streamed_backward
from pymerge.stats.logprobs import LABEL_KEYS as _LABEL_KEYS
from pymerge.stats.logprobs import class_labels as _labels
from pymerge.stats.logprobs import classification_log_probs, is_normalised as _normalised
from pymerge.stats.masks_structure import MaskStructure, Projection, find_mask_structure, is_projection
from pymerge.stats.registry import register
from pymerge.stats.store import Statistics, base_metadata

Fisher = Statistics
MODES = ("empirical", "exact")  # true labels (the paper's choice) or the expectation over all classes

LogProbFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]

_ATTENTION_TARGETS = ("q", "k", "v", "o")
_FFN_TARGETS = ("in", "out")


@dataclass(frozen=True)
class MaskMapping:
    """Which parameter blocks take a mask's Fisher.

    attention: among "q", "k", "v" (output rows of head h, bias included; with grouped-query attention a shared
    K/V head takes the mean of its query heads) and "o" (the input columns of the attention output projection
    that read head h). ffn: among "in" (output rows of neuron j in every FFN-in projection, bias included) and
    "out" (the input column of neuron j in the FFN-out projection). Every other parameter gets `default`.
    """

    attention: Tuple[str, ...] = ("q", "k")
    ffn: Tuple[str, ...] = ("in",)
    default: float = 1.0

    def __post_init__(self):
        for field_name, allowed in (("attention", _ATTENTION_TARGETS), ("ffn", _FFN_TARGETS)):
            value = getattr(self, field_name)
            if isinstance(value, str):
                value = (value,)
            value = tuple(value)
            bad = [t for t in value if t not in allowed]
            if bad:
                raise ValueError(f"mapping.{field_name}: unknown targets {bad}; expected a subset of {allowed}")
            object.__setattr__(self, field_name, value)
        object.__setattr__(self, "default", float(self.default))

    @classmethod
    def resolve(cls, mapping: Union[str, "MaskMapping", Mapping]) -> "MaskMapping":
        if isinstance(mapping, MaskMapping):
            return mapping
        if isinstance(mapping, str):
            if mapping not in MAPPING_PRESETS:
                raise ValueError(f"mapping={mapping!r}: unknown preset; expected one of {sorted(MAPPING_PRESETS)}, "
                                 f"a MaskMapping or a dict")
            return MAPPING_PRESETS[mapping]
        if isinstance(mapping, Mapping):
            unknown = set(mapping) - {"attention", "ffn", "default"}
            if unknown:
                raise ValueError(f"mapping: unknown keys {sorted(unknown)}; expected 'attention', 'ffn', 'default'")
            return cls(**dict(mapping))
        raise TypeError(f"mapping: expected a preset name, MaskMapping or dict, got {type(mapping).__name__}")

    def to_json(self) -> str:
        return json.dumps({"attention": list(self.attention), "ffn": list(self.ffn), "default": self.default})


MAPPING_PRESETS: Dict[str, MaskMapping] = {
    "paper": MaskMapping(),  # 004: Q/K rows of each head, FFN-in rows of each neuron, F = 1 elsewhere
    "qkv": MaskMapping(attention=("q", "k", "v")),
    "all": MaskMapping(attention=("q", "k", "v", "o"), ffn=("in", "out")),
}


@dataclass
class MaskFisher:
    """The compact mask Fisher: per attention block a [num_heads] tensor, per FFN a [num_neurons] tensor."""

    heads: Dict[str, torch.Tensor]
    neurons: Dict[str, torch.Tensor]
    num_examples: int
    mode: str
    structure: Optional[MaskStructure] = field(default=None, repr=False)
    neuron_site: str = "activation"


# --------------------------------------------------------------------------------------------------- estimation

NEURON_SITES = ("activation", "pre_activation")


@dataclass(frozen=True)
class _Site:
    """One mask site on a captured projection: mask gradients go to accumulator `slot` in `groups` groups."""

    slot: int
    groups: int
    pre_activation: bool  # False: the mask scales the projection's input; True: the W1 x part of its output


class _MaskSites:
    """Where the masks sit, read off the shared capture (capture.LayerCapture) of the projections around them:
    no mask is inserted into the model. A mask m = 1 scaling a projection's input x has the per-example gradient
    Σ_rows Σ_{j∈group} x_j (∂ log p/∂x)_j with ∂ log p/∂x = G W (G W ᵀ for Conv1D), G the captured output
    gradient; one scaling W1 x inside act(W1 x + b1) has Σ_rows (y - b1)_j G_j (y the projection's output).

    Heads: the input of the attention output projection. Neurons: the input of the FFN-out projection
    ("activation", Kwon et al.: mask 0 removes the neuron) or, with "pre_activation", the W1 x part of every
    FFN-in projection's output (eq. 2 of the paper: act(m ⊙ W1 x + b1); one mask shared by gate and up).
    """

    def __init__(self, structure: MaskStructure, neuron_site: str = "activation"):
        self.sites: Dict[str, _Site] = {}
        self.modules: Dict[str, nn.Module] = {}
        for i, block in enumerate(structure.attention):
            self._add(block.out, _Site(i, block.num_heads, False))
        offset = len(structure.attention)
        for i, ffn in enumerate(structure.ffn):
            if neuron_site == "activation":
                self._add(ffn.out, _Site(offset + i, ffn.width, False))
            else:
                for proj in ffn.inputs:
                    self._add(proj, _Site(offset + i, ffn.width, True))
        self.batch_shape: Optional[Tuple[int, ...]] = None  # [N, T] of the batch's token inputs
        self.round: List[Optional[torch.Tensor]] = []

    def _add(self, proj: Projection, site: _Site) -> None:
        self.sites[proj.name] = site
        self.modules[proj.name] = proj.module

    def _per_example(self, x: torch.Tensor, n: int, name: str) -> torch.Tensor:
        """x as [N, rows, F]: activations flattened to [N*T, F] (OPT's FFN) are viewed back per example."""
        shape = self.batch_shape
        if x.dim() == 2 and shape is not None and len(shape) == 2 and x.shape[0] != shape[0] \
                and x.shape[0] == shape[0] * shape[1]:
            x = x.view(shape[0], shape[1], x.shape[-1])
        if x.dim() < 2 or x.shape[0] != n:
            raise RuntimeError(f"mask Fisher: the mask site {name} saw {x.shape[0] if x.dim() else 0} rows but the "
                               f"batch has {n} examples; per-example masks need [batch, ..., features] activations")
        return x.reshape(n, -1, x.shape[-1])

    def start_round(self, slots: int) -> None:
        self.round = [None] * slots

    def on_grad(self, call, g: torch.Tensor, n: int) -> None:
        """Adds this call's per-example mask gradients [N, groups] (fp64) to the round's (calls add up)."""
        site, module = self.sites[call.name], call.module
        dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
        if site.pre_activation:
            y = call.output.detach()
            if y.shape[-1] != site.groups:
                raise RuntimeError(f"mask Fisher: output of {call.name} is not a [batch, ..., {site.groups}] tensor")
            bias = getattr(module, "bias", None)
            x = (y - bias if bias is not None else y).to(dtype)
            dx = g.to(dtype)
        else:
            x = call.inputs[0].to(dtype)
            w = module.weight.detach().to(dtype)
            dx = g.to(dtype) @ (w.T if is_projection(module) and not isinstance(module, nn.Linear) else w)
            if x.shape[-1] % site.groups:
                raise RuntimeError(f"mask Fisher: input of {call.name} has {x.shape[-1]} features, not a multiple "
                                   f"of {site.groups} mask groups")
        prod = self._per_example(x * dx, n, call.name)
        grad = prod.reshape(n, -1, site.groups, prod.shape[-1] // site.groups).sum((1, 3)).double()
        slot = site.slot
        self.round[slot] = grad if self.round[slot] is None else self.round[slot] + grad


def _mask_grads(sites: _MaskSites, logp: torch.Tensor, calls, cotangent: torch.Tensor, n: int, slots: int,
                retain: bool) -> List[Optional[torch.Tensor]]:
    """Per-example gradients [N, groups] (fp64) of <cotangent, logp> w.r.t. every block's mask (None: unused),
    from one backward streamed through the captured projections."""
    sites.start_round(slots)
    streamed_backward(logp, calls, cotangent, lambda call, g: sites.on_grad(call, g, n), retain_graph=retain)
    return sites.round


def _one_hot(logp: torch.Tensor, classes: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A cotangent on logp [N, C]: 1 (or `weight`) at column classes[n] of row n."""
    cot = torch.zeros_like(logp).scatter_(1, classes[:, None], 1.0)
    return cot if weight is None else cot * weight[:, None]


def _exact_all_classes(sites, logp, calls, n, acc) -> None:
    """E_y g² with one backward per class: each (example, class) a pseudo-example of weight p_c (the log-prob
    scaled by sqrt(p_c) scales its gradient by sqrt(p_c), so the squared gradient carries p_c)."""
    root_p = logp.detach().exp().sqrt()
    classes = logp.shape[1]
    for c in range(classes):
        cls = torch.full((n,), c, dtype=torch.long, device=logp.device)
        grads = _mask_grads(sites, logp, calls, _one_hot(logp, cls, root_p[:, c]), n, len(acc), c < classes - 1)
        for a, g in zip(acc, grads):
            if g is not None:
                a += g.square().sum(0)


def _exact_one_class_fewer(sites, logp, calls, n, acc) -> None:
    """E_y g² with C - 1 backwards for a normalised distribution: Σ_c p_c g_c = 0 (the score has mean zero), so
    the most probable class's gradient is -(Σ_{c≠top} p_c g_c) / p_top; p_top >= 1/C keeps that stable. Binary
    classification costs one backward, like the empirical Fisher."""
    p = logp.detach().exp().double()
    order = torch.argsort(p, dim=1, descending=True)
    top, others = order[:, 0], order[:, 1:]
    p_top = p.gather(1, top[:, None])  # [N, 1]
    p_others = p.gather(1, others)  # [N, C-1]
    k_count = others.shape[1]
    weighted: List[Optional[torch.Tensor]] = [None] * len(acc)  # Σ_k p_k g_k per block, [N, groups]
    for k in range(k_count):
        grads = _mask_grads(sites, logp, calls, _one_hot(logp, others[:, k]), n, len(acc), k < k_count - 1)
        pk = p_others[:, k:k + 1]
        for i, g in enumerate(grads):
            if g is None:
                continue
            acc[i] += (pk * g.square()).sum(0)
            weighted[i] = pk * g if weighted[i] is None else weighted[i] + pk * g
    for i, w in enumerate(weighted):
        if w is not None:
            acc[i] += (w.square() / p_top).sum(0)


def _batch_size(batch: Mapping) -> Optional[int]:
    """Leading size of the first tensor input (None when there is none): empty batches are skipped."""
    for k, v in batch.items():
        if k not in _LABEL_KEYS and torch.is_tensor(v) and v.dim() > 0:
            return v.shape[0]
    return None


def _token_shape(batch: Mapping) -> Optional[Tuple[int, ...]]:
    for k in ("input_ids", "attention_mask", "inputs_embeds"):
        v = batch.get(k)
        if torch.is_tensor(v) and v.dim() >= 2:
            return tuple(v.shape[:2])
    return None


def _to_device(batch: Mapping, device) -> Dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def estimate_masks(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    mode: str = "empirical",
    mapping: Union[str, MaskMapping, Mapping] = "paper",
    log_prob_fn: Optional[LogProbFn] = None,
    return_mask_fisher: bool = False,
    structure: Optional[MaskStructure] = None,
    neuron_site: str = "activation",
    exact_backwards: str = "auto",
    mask_mode: Optional[str] = None,
    **unused,
) -> Union[Fisher, Tuple[Fisher, MaskFisher]]:
    """Mask Fisher of every attention head and FFN neuron, mapped onto a full per-parameter Fisher.

    batches: dicts as HF models take (input_ids, attention_mask, ..., labels). mode: "empirical" (true labels)
    or "exact" (expectation over all classes). mapping: see MaskMapping ("paper" by default). The other arguments
    are those of `estimate_mask_fisher`. mask_mode: overrides mode, for `pymerge.fisher.estimate(model, batches,
    mode="masks", mask_mode="exact")`, which hands its other keyword arguments on. Returns the Fisher (metadata
    mode="masks"), and the compact MaskFisher too with return_mask_fisher=True.
    """
    if mask_mode is not None:
        mode = mask_mode
    if unused:
        raise TypeError(f"estimate_masks: unexpected arguments {sorted(unused)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    mapping = MaskMapping.resolve(mapping)
    structure = structure if structure is not None else find_mask_structure(model)
    mask_fisher = estimate_mask_fisher(model, batches, mode=mode, log_prob_fn=log_prob_fn, structure=structure,
                                       neuron_site=neuron_site, exact_backwards=exact_backwards)
    fisher = mask_fisher_to_parameters(model, mask_fisher, mapping=mapping, structure=structure)
    return (fisher, mask_fisher) if return_mask_fisher else fisher


def estimate_mask_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    mode: str = "empirical",
    log_prob_fn: Optional[LogProbFn] = None,
    structure: Optional[MaskStructure] = None,
    neuron_site: str = "activation",
    exact_backwards: str = "auto",
) -> MaskFisher:
    """The compact mask Fisher: per attention block [num_heads], per FFN [num_neurons].

    log_prob_fn(model, batch) -> [N, C] log-probabilities replaces the default HF sequence classification
    scoring. structure: override the discovered heads / FFNs. neuron_site: "activation" (mask on the neuron's
    output, Kwon et al.) or "pre_activation" (m ⊙ W1 x, eq. 2). exact_backwards: "auto" (C - 1 backwards when the
    log-probs are normalised, else C) or "all" (C).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: mask Fisher supports {MODES}")
    if neuron_site not in NEURON_SITES:
        raise ValueError(f"neuron_site={neuron_site!r}: expected one of {NEURON_SITES}")
    if exact_backwards not in ("auto", "all"):
        raise ValueError(f"exact_backwards={exact_backwards!r}: expected 'auto' or 'all'")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batches, Mapping):
        batches = [batches]
    structure = structure if structure is not None else find_mask_structure(model)
    score = log_prob_fn or classification_log_probs
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")

    acc_heads = [torch.zeros(b.num_heads, dtype=torch.float64, device=device) for b in structure.attention]
    acc_neurons = [torch.zeros(f.width, dtype=torch.float64, device=device) for f in structure.ffn]
    acc = acc_heads + acc_neurons
    sites = _MaskSites(structure, neuron_site)
    dist = distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    total = 0
    # frozen: backward computes activation gradients only, nothing lands in .grad
    with FrozenParameters(model), LayerCapture(sites.modules) as capture, torch.enable_grad():
        for index, batch in enumerate(batches):
            if not isinstance(batch, Mapping):
                raise TypeError(f"batch {index}: expected a dict of tensors, got {type(batch).__name__}")
            if _batch_size(batch) == 0 or index % world != rank:
                continue
            batch = _to_device(batch, device)
            capture.clear()
            sites.batch_shape = _token_shape(batch)
            logp = score(model, batch)
            if not torch.is_tensor(logp) or logp.dim() != 2:
                raise ValueError(f"batch {index}: log-probabilities must be a [N, C] tensor, got "
                                 f"{tuple(logp.shape) if torch.is_tensor(logp) else type(logp).__name__}")
            n, classes = logp.shape
            if n == 0:
                continue
            missed = sorted({c.name for c in capture.calls if c.output is None})
            if missed:
                raise RuntimeError(f"mask Fisher: {missed[0]} was called without a [batch, ..., features] tensor "
                                   f"input")
            calls = list(capture.calls)
            if not calls:
                raise RuntimeError("mask Fisher: no mask site was reached in the forward pass (were the "
                                   "attention / FFN output projections called?)")
            if mode == "empirical":
                y = _labels(batch, index, n, classes, logp.device)
                for a, g in zip(acc, _mask_grads(sites, logp, calls, _one_hot(logp, y), n, len(acc), False)):
                    if g is not None:
                        a += g.square().sum(0)
            elif exact_backwards == "all" or not _normalised(logp):
                _exact_all_classes(sites, logp, calls, n, acc)
            else:
                _exact_one_class_fewer(sites, logp, calls, n, acc)
            total += n
            capture.clear()
            del calls, logp
    (total,) = all_reduce_sums({str(i): a for i, a in enumerate(acc)}, [float(total)])
    total = int(total)
    if total == 0:
        raise ValueError("batches: no examples (empty iterable or batches of size 0); mask Fisher needs at least one")

    unused_blocks = [b.name for b, a in zip(structure.attention, acc_heads) if not bool(a.any())]
    if unused_blocks:
        warnings.warn(f"mask Fisher: attention blocks with zero Fisher (never used in the forward?): {unused_blocks}")
    return MaskFisher(
        heads={b.name: (a / total).float().cpu() for b, a in zip(structure.attention, acc_heads)},
        neurons={f.name: (a / total).float().cpu() for f, a in zip(structure.ffn, acc_neurons)},
        num_examples=total, mode=mode, structure=structure, neuron_site=neuron_site)


# ------------------------------------------------------------------------------------------------------ mapping

def _set_out_rows(f_weight: torch.Tensor, f_bias: Optional[torch.Tensor], proj: Projection, values: torch.Tensor):
    """Give output features [offset, offset + len(values)) of `proj` the per-feature `values` (bias included)."""
    sl = slice(proj.offset, proj.offset + values.numel())
    if proj.transposed:
        f_weight[:, sl] = values[None, :]
    else:
        f_weight[sl, :] = values[:, None]
    if f_bias is not None:
        f_bias[sl] = values


def _set_in_columns(f_weight: torch.Tensor, proj: Projection, values: torch.Tensor):
    """Give input feature i of `proj` the value values[i] (its bias reads no input: left alone)."""
    if proj.transposed:
        f_weight[:, :] = values[:, None]
    else:
        f_weight[:, :] = values[None, :]


def mask_fisher_to_parameters(model: nn.Module, mask_fisher: MaskFisher, *,
                              mapping: Union[str, MaskMapping, Mapping] = "paper",
                              structure: Optional[MaskStructure] = None) -> Fisher:
    """A full per-parameter Fisher (fp32, CPU) from a compact mask Fisher, by `mapping`; `default` elsewhere."""
    mapping = MaskMapping.resolve(mapping)
    structure = structure or mask_fisher.structure or find_mask_structure(model)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {n: torch.full(p.shape, mapping.default, dtype=torch.float32) for n, p in model.named_parameters()}

    def blocks_of(proj: Projection):
        w = tensors[names[id(proj.module.weight)]]
        b = getattr(proj.module, "bias", None)
        return w, (tensors[names[id(b)]] if b is not None else None)

    def values_for(table, name, count, unit, where):  # one block's mask Fisher, checked against the model
        values = table.get(name)
        if values is None:
            raise KeyError(f"mask Fisher has no {unit} values for {where} {name!r}")
        if values.numel() != count:
            raise ValueError(f"mask Fisher for {name!r}: {values.numel()} {unit}s, model has {count}")
        return values.float().cpu()

    for block in structure.attention:
        heads = values_for(mask_fisher.heads, block.name, block.num_heads, "head", "attention block")
        per_q = heads.repeat_interleave(block.head_dim)  # head h covers features [h*dh, (h+1)*dh)
        per_kv = heads.view(block.num_kv_heads, block.kv_group).mean(1).repeat_interleave(block.head_dim)
        for target, proj, values in (("q", block.q, per_q), ("k", block.k, per_kv), ("v", block.v, per_kv)):
            if target in mapping.attention:
                _set_out_rows(*blocks_of(proj), proj, values)
        if "o" in mapping.attention:
            _set_in_columns(blocks_of(block.out)[0], block.out, per_q)
    for ffn in structure.ffn:
        neurons = values_for(mask_fisher.neurons, ffn.name, ffn.width, "neuron", "FFN")
        if "in" in mapping.ffn:
            for proj in ffn.inputs:
                _set_out_rows(*blocks_of(proj), proj, neurons)
        if "out" in mapping.ffn:
            _set_in_columns(blocks_of(ffn.out)[0], ffn.out, neurons)

    metadata = base_metadata("masks", "masks", mask_fisher.num_examples, model)
    metadata.update(mask_mode=mask_fisher.mode, mask_mapping=mapping.to_json(),
                    mask_neuron_site=mask_fisher.neuron_site)
    return Statistics(tensors, metadata)


@register("masks", modes=MODES, default_mode="empirical",
          summary="mask Fisher of attention heads and FFN neurons, mapped onto every parameter")
def collect_masks(model, batches, *, mode: str, **options) -> Statistics:
    return estimate_masks(model, batches, mode=mode, **options)
