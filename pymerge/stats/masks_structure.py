"""Where the virtual masks of mask Fisher sit: attention heads and FFN neurons, found by module structure.

An attention block is a module with query/key/value projections (separate Linear layers, or GPT-2's packed
Conv1D `c_attn`); its head count comes from the module's attributes or config, its output projection is the
first projection after it whose input is the concatenated head contexts. The FFN of a transformer layer is
found in the smallest ancestor of an attention block that holds projections outside every attention block:
the projection(s) hidden -> D are the FFN "in" (two for gated MLPs: gate and up), the one D -> hidden the
FFN "out". This covers BERT / RoBERTa, GPT-2 and LLaMA-style blocks (and similar layouts) without relying on
one model's full parameter names.

Masks are applied where Kwon et al. (2022) put them: the input of the attention output projection (the per-head
contexts, head h = features [h*dh, (h+1)*dh)) and the input of the FFN-out projection (the neuron activations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

# Conventional child names of the q/k/v projections of an attention module (separate Linear layers).
_SEPARATE_QKV_NAMES: Tuple[Tuple[str, str, str], ...] = (
    ("query", "key", "value"),  # BERT, RoBERTa, ELECTRA, ...
    ("q_proj", "k_proj", "v_proj"),  # LLaMA, Mistral, Qwen, OPT, BART, ...
    ("q", "k", "v"),  # T5
    ("q_lin", "k_lin", "v_lin"),  # DistilBERT
)
# Packed projections whose output features are laid out [Q | K | V] (each contiguous, heads in order).
_PACKED_QKV_NAMES: Tuple[str, ...] = ("c_attn", "qkv_proj")
# Preferred child names of an attention module's own output projection.
_OUT_NAMES: Tuple[str, ...] = ("o_proj", "out_proj", "c_proj", "o", "out_lin", "dense")
_HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_head", "n_heads")
_HEAD_DIM_ATTRS = ("attention_head_size", "head_dim")


def is_projection(module: nn.Module) -> bool:
    """nn.Linear (and subclasses) or HF's Conv1D (a Linear with a transposed [in, out] weight)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


@dataclass(frozen=True)
class Projection:
    """One projection module, or one role (Q, K or V) inside a packed one: output features [offset, offset+size)."""

    name: str
    module: nn.Module
    offset: int = 0
    size: Optional[int] = None

    @property
    def transposed(self) -> bool:
        """True for Conv1D, whose weight is [in, out]: output features are columns there."""
        return _is_conv1d(self.module)

    @property
    def in_features(self) -> int:
        w = self.module.weight
        return w.shape[0] if self.transposed else w.shape[1]

    @property
    def total_out_features(self) -> int:
        w = self.module.weight
        return w.shape[1] if self.transposed else w.shape[0]

    @property
    def out_features(self) -> int:
        return self.total_out_features if self.size is None else self.size


@dataclass(frozen=True)
class AttentionBlock:
    name: str
    num_heads: int
    head_dim: int
    num_kv_heads: int
    q: Projection
    k: Projection
    v: Projection
    out: Projection  # its input holds the per-head contexts: the head-mask site

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class FFNBlock:
    name: str  # the layer module that holds the FFN
    width: int  # number of neurons D
    inputs: Tuple[Projection, ...]  # hidden -> D (gate and up for gated MLPs): neuron j = output feature j
    out: Projection  # D -> hidden: its input holds the neuron activations, the neuron-mask site


@dataclass(frozen=True)
class MaskStructure:
    attention: Tuple[AttentionBlock, ...]
    ffn: Tuple[FFNBlock, ...]

    def describe(self) -> str:
        lines = [f"{a.name}: {a.num_heads} heads x {a.head_dim} (kv heads {a.num_kv_heads}), out {a.out.name}"
                 for a in self.attention]
        lines += [f"{f.name}: {f.width} neurons, in {[p.name for p in f.inputs]}, out {f.out.name}" for f in self.ffn]
        return "\n".join(lines)


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


def _parent(name: str) -> Optional[str]:
    if name == "":
        return None
    return name.rsplit(".", 1)[0] if "." in name else ""


def _config_value(module: nn.Module, model: nn.Module, attrs: Sequence[str]) -> Optional[int]:
    for source in (module, getattr(module, "config", None), getattr(model, "config", None)):
        if source is None:
            continue
        for attr in attrs:
            value = getattr(source, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _qkv_projections(name: str, module: nn.Module) -> Optional[Tuple[Projection, Projection, Projection, bool]]:
    """(q, k, v, packed) when `module` is an attention module, else None. Sizes of packed roles set later."""
    children = dict(module.named_children())
    for qn, kn, vn in _SEPARATE_QKV_NAMES:
        if all(n in children and is_projection(children[n]) for n in (qn, kn, vn)):
            return (Projection(_join(name, qn), children[qn]), Projection(_join(name, kn), children[kn]),
                    Projection(_join(name, vn), children[vn]), False)
    for pn in _PACKED_QKV_NAMES:
        if pn in children and is_projection(children[pn]):
            p = Projection(_join(name, pn), children[pn])
            return p, p, p, True
    return None


def _find_out_projection(name: str, module: nn.Module, width: int, modules: Dict[str, nn.Module],
                         exclude: Sequence[nn.Module], order: Dict[str, int]) -> Optional[Projection]:
    """The projection that consumes the concatenated head contexts (`width` input features)."""
    children = dict(module.named_children())
    for n in _OUT_NAMES:
        c = children.get(n)
        if c is not None and is_projection(c) and all(c is not e for e in exclude) \
                and Projection(n, c).in_features == width:
            return Projection(_join(name, n), c)
    # BERT-style: the output projection is a sibling (BertAttention.output.dense). Look in the parent (then the
    # grandparent) for the first projection after this module, outside it, with `width` inputs.
    ancestor = _parent(name)
    for _ in range(2):
        if ancestor is None:
            break
        prefix = ancestor + "." if ancestor else ""
        candidates = [n for n, m in modules.items()
                      if n.startswith(prefix) and not (n == name or n.startswith(name + "."))
                      and order[n] > order[name] and is_projection(m) and all(m is not e for e in exclude)
                      and Projection(n, m).in_features == width]
        if candidates:
            n = min(candidates, key=order.__getitem__)
            return Projection(n, modules[n])
        ancestor = _parent(ancestor)
    return None


def _attention_block(name: str, module: nn.Module, model: nn.Module, modules: Dict[str, nn.Module],
                     order: Dict[str, int]) -> Optional[AttentionBlock]:
    found = _qkv_projections(name, module)
    if found is None:
        return None
    q, k, v, packed = found
    heads = _config_value(module, model, _HEAD_ATTRS)
    if heads is None:
        raise ValueError(f"attention module {name!r} ({type(module).__name__}): cannot find its number of heads "
                         f"(looked for attributes {_HEAD_ATTRS} on the module, its config and the model config)")
    children = dict(module.named_children())
    if packed:
        total = q.total_out_features
        q_attn = children.get("q_attn")  # GPT-2 cross-attention: Q separate, c_attn packs [K | V]
        if q_attn is not None and is_projection(q_attn):
            q = Projection(_join(name, "q_attn"), q_attn)
            kv = total // 2
            k, v = Projection(k.name, k.module, 0, kv), Projection(v.name, v.module, kv, kv)
        else:
            head_dim = _config_value(module, model, _HEAD_DIM_ATTRS) or None
            if head_dim is None or heads * head_dim * 3 == total:
                if total % (3 * heads):
                    raise ValueError(f"attention module {name!r}: packed projection {q.name!r} has {total} output "
                                     f"features, not 3 x {heads} heads x head size")
                qs = kvs = total // 3
            else:  # grouped-query packing [Q (H*dh) | K (KV*dh) | V (KV*dh)]
                qs = heads * head_dim
                kvs = (total - qs) // 2
            q = Projection(q.name, q.module, 0, qs)
            k = Projection(k.name, k.module, qs, kvs)
            v = Projection(v.name, v.module, qs + kvs, kvs)
    head_dim = _config_value(module, model, _HEAD_DIM_ATTRS) if not packed else q.out_features // heads
    if head_dim is None or heads * head_dim != q.out_features:
        if q.out_features % heads:
            raise ValueError(f"attention module {name!r}: query projection {q.name!r} has {q.out_features} output "
                             f"features, not a multiple of its {heads} heads")
        head_dim = q.out_features // heads
    if k.out_features % head_dim or heads % (k.out_features // head_dim):
        raise ValueError(f"attention module {name!r}: key projection {k.name!r} has {k.out_features} output "
                         f"features; expected a divisor of {heads} heads times head size {head_dim}")
    kv_heads = k.out_features // head_dim
    width = heads * head_dim
    out = _find_out_projection(name, module, width, modules, (q.module, k.module, v.module), order)
    if out is None:
        raise ValueError(f"attention module {name!r}: no output projection with {width} input features found in it "
                         f"or beside it")
    return AttentionBlock(name, heads, head_dim, kv_heads, q, k, v, out)


def _ffn_block(layer: str, layer_blocks: List[AttentionBlock], modules: Dict[str, nn.Module],
               attention_modules: set) -> FFNBlock:
    prefix = layer + "." if layer else ""
    hidden = layer_blocks[0].q.in_features
    projs = [Projection(n, m) for n, m in modules.items()
             if n.startswith(prefix) and is_projection(m) and id(m) not in attention_modules]
    outs = [p for p in projs if p.out_features == hidden]
    if not outs:
        raise ValueError(f"layer {layer!r}: no FFN output projection (D -> {hidden} features) outside the attention "
                         f"blocks; found {[p.name for p in projs]}")
    out = outs[-1]  # the FFN-out comes last in the layer
    width = out.in_features
    inputs = tuple(p for p in projs if p is not out and p.module is not out.module
                   and p.in_features == hidden and p.out_features == width)
    if not inputs:
        raise ValueError(f"layer {layer!r}: FFN output projection {out.name!r} has {width} inputs but no projection "
                         f"{hidden} -> {width} (the FFN-in) was found; found {[p.name for p in projs]}")
    return FFNBlock(layer, width, inputs, out)


def find_mask_structure(model: nn.Module) -> MaskStructure:
    """All attention blocks and FFNs of `model`, with their mask sites and parameter blocks."""
    modules = dict(model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    blocks: List[AttentionBlock] = []
    inside: List[str] = []  # attention modules already taken: their children are not attention modules
    for name, module in modules.items():
        if any(name.startswith(p + ".") for p in inside):
            continue
        block = _attention_block(name, module, model, modules, order)
        if block is not None:
            blocks.append(block)
            inside.append(name)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no attention layers found (looked for modules with query/key/value "
                         f"projections named {[n for n in _SEPARATE_QKV_NAMES]} or packed {_PACKED_QKV_NAMES}); "
                         f"pass structure= explicitly for other architectures")
    attention_modules = {id(m) for b in blocks for m in (b.q.module, b.k.module, b.v.module, b.out.module)}
    # The layer of an attention block: its smallest ancestor holding projections outside every attention block.
    layers: Dict[str, List[AttentionBlock]] = {}
    for block in blocks:
        ancestor = _parent(block.name)
        while ancestor is not None:
            prefix = ancestor + "." if ancestor else ""
            if any(n.startswith(prefix) and is_projection(m) and id(m) not in attention_modules
                   for n, m in modules.items()):
                break
            ancestor = _parent(ancestor)
        if ancestor is None or ancestor == "":
            raise ValueError(f"attention block {block.name!r}: no feed-forward layer found beside it (no projection "
                             f"outside the attention blocks in any of its layer modules)")
        layers.setdefault(ancestor, []).append(block)
    ffn = tuple(_ffn_block(layer, bl, modules, attention_modules) for layer, bl in layers.items())
    return MaskStructure(tuple(blocks), ffn)
