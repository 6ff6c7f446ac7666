"""What a merge method is: typed parameters declared once, and a function of one tensor name's inputs.

Parameter values come from three places, most specific first: a model's `parameters`, the top-level
`parameters` (also the default for per-model parameters), and the declared default. Any value parameter may be
given per tensor as a list of `{filter: PATTERN, value: V}` entries, the first whose pattern matches the tensor
name wins, and an entry without `filter` is the fallback. A pattern is an fnmatch glob against the full name;
one without wildcards matches as a substring (as in mergekit).

A float value may also vary across layers (mergekit's gradients): a list of numbers `[v_0, ..., v_{K-1}]`,
alone or as the `value` of a filter entry, is interpolated piecewise-linearly at the tensor's depth
t in [0, 1]: t = layer / (num_layers - 1) for a tensor of a numbered layer (`....layers.7.`), t = 0 for
tensors outside the layers (embeddings, final norm, head), as mergekit does.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from pymerge.errors import excerpt


class ConfigError(ValueError):
    """A merge configuration is invalid (unknown method or parameter, wrong type, missing value...)."""


REQUIRED = object()


def suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; expected one of {sorted(candidates)}"


@dataclass(frozen=True)
class Param:
    """One declared parameter.

    scope: "global" (top-level `parameters` only) or "model" (per model, with the top-level value as default).
    type: float, int, bool or str; "file" for a per-model tensor file read lazily alongside each tensor (a
    Fisher, a Gram matrix file ...), handed to the method as `inputs.aux[name]`.
    """

    name: str
    type: Any
    default: Any = REQUIRED
    scope: str = "global"
    choices: Tuple[Any, ...] = ()
    check: Optional[Callable[[Any], Optional[str]]] = None  # returns an error message or None
    help: str = ""
    file_format: str = "fisher"  # file params: "fisher" (pymerge Fisher file, checked) or "tensors" (any)
    aliases: Tuple[Tuple[Any, Any], ...] = ()  # accepted spellings, e.g. ((True, "l1"), (False, "none"))

    @property
    def is_file(self) -> bool:
        return self.type == "file"

    def coerce(self, value, where: str):
        """Type-check and normalise one scalar value (not a filter list)."""
        t = self.type
        for alias, meant in self.aliases:
            if value is alias or (type(value) is type(alias) and value == alias):
                value = meant
                break
        if self.is_file:
            if value is None or isinstance(value, (str, os.PathLike)) or hasattr(value, "tensors") \
                    or isinstance(value, Mapping):
                return value
            raise ConfigError(f"{where}: parameter {self.name!r} expects a file path, got {type(value).__name__}")
        ok = True
        if t is bool:
            ok = isinstance(value, bool)
        elif t is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif t is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                value = float(value)
                if not math.isfinite(value):
                    raise ConfigError(f"{where}: parameter {self.name!r} must be finite, got {value}")
        elif t is str:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(f"{where}: parameter {self.name!r} expects {getattr(t, '__name__', t)}, "
                              f"got {excerpt(value)} ({type(value).__name__})")
        if self.choices and value not in self.choices:
            raise ConfigError(f"{where}: parameter {self.name!r} must be one of {list(self.choices)}, got {excerpt(value)}")
        if self.check is not None:
            msg = self.check(value)
            if msg:
                raise ConfigError(f"{where}: parameter {self.name!r} {msg}, got {excerpt(value)}")
        return value


def in_range(lo=None, hi=None, lo_open=False, hi_open=False):
    def check(v):
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return f"must be {'<' if hi_open else '<='} {hi}"
        return None
    return check


def pattern_matches(pattern: str, name: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(tensor_name: str) -> Optional[int]:
    """The transformer layer a tensor belongs to (`model.layers.3.mlp...` -> 3), or None outside the layers."""
    m = LAYER_INDEX.search("." + tensor_name)
    return int(m.group(1)) if m else None


def layer_depth(tensor_name: str, num_layers: Optional[int]) -> float:
    """mergekit's gradient position: layer / (num_layers - 1) in the layers (1 when there is one layer),
    0 outside them."""
    i = layer_index(tensor_name)
    if i is None or not num_layers:
        return 0.0
    return 1.0 if num_layers <= 1 else min(1.0, i / (num_layers - 1))


@dataclass(frozen=True)
class Gradient:
    """A value interpolated over layer depth t in [0, 1] from K anchors spread evenly (mergekit semantics)."""

    values: Tuple[float, ...]

    def at(self, t: float) -> float:
        v = self.values
        scaled = min(max(float(t), 0.0), 1.0) * (len(v) - 1)
        i0 = int(scaled)
        i1 = min(len(v) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * v[i0] + frac * v[i1]


def _is_gradient(raw) -> bool:
    return isinstance(raw, list) and bool(raw) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw)


def _parse_scalar_or_gradient(param: "Param", raw, where: str):
    if _is_gradient(raw):
        if param.type is not float:
            raise ConfigError(f"{where}: parameter {param.name!r} cannot vary across layers (a list of numbers "
                              f"is only accepted for float parameters), got {raw!r}")
        return Gradient(tuple(param.coerce(x, where) for x in raw))
    return param.coerce(raw, where)


@dataclass
class Filtered:
    """A per-tensor value: [(pattern or None, value)], first match wins, None is the fallback."""

    rules: List[Tuple[Optional[str], Any]]

    def has_fallback(self) -> bool:
        return any(p is None or p == "*" for p, _ in self.rules)

    def resolve(self, tensor_name: str, param: str):
        for pattern, value in self.rules:
            if pattern is None or pattern_matches(pattern, tensor_name):
                return value
        raise ConfigError(f"parameter {param!r}: no filter matches tensor {tensor_name!r} and there is no "
                          "fallback entry (one without `filter`)")


def parse_value(param: Param, raw, where: str):
    """A scalar, a list of numbers (across layers: a Gradient), or a list of {filter, value} dicts (per tensor;
    each value a scalar or a list of numbers). Returns the coerced value, a Gradient or a Filtered."""
    if isinstance(raw, list) and not param.is_file and _is_gradient(raw):
        return _parse_scalar_or_gradient(param, raw, where)
    if isinstance(raw, list) and not param.is_file:
        rules = []
        for i, entry in enumerate(raw):
            w = f"{where}: {param.name}[{i}]"
            if not isinstance(entry, Mapping) or "value" not in entry or set(entry) - {"filter", "value"}:
                raise ConfigError(f"{w}: per-tensor entries must look like {{filter: PATTERN, value: V}} "
                                  f"(or {{value: V}} as the fallback), got {excerpt(entry)}")
            pattern = entry.get("filter")
            if pattern is not None and not isinstance(pattern, str):
                raise ConfigError(f"{w}: filter must be a string pattern, got {excerpt(pattern)}")
            rules.append((pattern, _parse_scalar_or_gradient(param, entry["value"], w)))
        if not rules:
            raise ConfigError(f"{where}: parameter {param.name!r} is an empty list")
        return Filtered(rules)
    return param.coerce(raw, where)


def resolve(value, tensor_name: str, param: str, depth: float = 0.0):
    """The value of one parameter for one tensor: filter entries matched on its name, gradients at `depth`."""
    if isinstance(value, Filtered):
        value = value.resolve(tensor_name, param)
    if isinstance(value, Gradient):
        value = value.at(depth)
    return value


def chain(specific, general):
    """`specific` (a model's value) with `general` (the top-level value) where no filter entry of it matches:
    mergekit falls back to the next level when a model's filter list has no match."""
    if isinstance(specific, Filtered) and not specific.has_fallback() and general is not REQUIRED:
        rest = general.rules if isinstance(general, Filtered) else [(None, general)]
        return Filtered(list(specific.rules) + list(rest))
    return specific


@dataclass
class TensorInputs:
    """Everything a method sees for one tensor name."""

    name: str
    models: List[torch.Tensor]                       # one per model, same shape and dtype
    base: Optional[torch.Tensor]                     # the pretrained tensor (methods with needs_base)
    params: Dict[str, Any]                           # global parameters resolved for this tensor
    model_params: List[Dict[str, Any]]               # per-model parameters resolved for this tensor
    aux: Dict[str, List[Optional[torch.Tensor]]] = field(default_factory=dict)  # file params, per model
    state: Dict[str, Any] = field(default_factory=dict)  # whatever `prepare` returned
    owned: bool = False  # the engine read `models` fresh from disk: they may be reused in place
    # Set for methods with `checks_finite`: merge_tensor must check `models` and `base` for NaN / Inf itself
    # (the engine did not), raising pymerge.ops.NonFiniteInputError ("models", i) or ("pretrained", None).
    check_finite: bool = False

    def per_model(self, key: str) -> List[Any]:
        return [p[key] for p in self.model_params]

    def task_vectors(self) -> List[torch.Tensor]:
        """τ_i = θ_i - θ_pre. When the engine owns the model tensors they become the task vectors in place
        (saves one tensor per model); do not use `models` after calling this."""
        if self.owned:
            return [m.sub_(self.base) for m in self.models]
        return [m - self.base for m in self.models]


class MergeMethod:
    """Subclass, declare `name`, `params` (and `needs_base`), implement `merge_tensor`; then `register` it."""

    name: str = ""
    description: str = ""
    params: Tuple[Param, ...] = ()
    needs_base: bool = False
    elementwise: bool = False  # output element j depends only on input elements j: the engine may chunk rows
    fisher_mode: Optional[str] = None  # required `mode` metadata of the file parameter `fisher`, if any
    # Statistics files are computed on each model's own weights (their weights fingerprint is checked against
    # the paired model); False for methods whose statistics come from other points (DF-Merge).
    stats_at_model_weights: bool = True
    # merge_tensor checks its models and base for NaN / Inf when `inputs.check_finite` is set (in a pass its op
    # makes anyway), so the engine skips its own check of those tensors (side inputs are still checked).
    checks_finite: bool = False

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def validate(self, global_params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> None:
        """Cross-parameter checks after each value passed its own (override when needed)."""

    def base_needed(self, global_params: Mapping[str, Any]) -> Optional[str]:
        """Why this merge reads `base_model`, given the global parameter values, or None when it does not (the
        engine then reads no base tensor). Default: every merge of a method with `needs_base` (task vectors)."""
        return "works on task vectors" if self.needs_base else None

    def prepare(self, inputs: "PrepareInputs") -> Dict[str, Any]:
        """Optional whole-model pass before merging (e.g. Fisher norms); returns `TensorInputs.state`."""
        return {}

    def aux_key(self, param: str, tensor_name: str) -> Optional[str]:
        """Name of the entry of file parameter `param` that goes with `tensor_name` (default: the same name).
        None: this tensor has no side input (the method then gets None in `inputs.aux[param]`)."""
        return tensor_name

    def aux_shape_error(self, param: str, tensor_name: str, tensor_shape, aux_shape) -> Optional[str]:
        """Why a side input's shape does not fit the tensor (default: it must be the tensor's shape)."""
        if tuple(aux_shape) != tuple(tensor_shape):
            return f"has shape {tuple(aux_shape)}, the model {tuple(tensor_shape)}"
        return None

    def merge_tensor(self, inputs: TensorInputs) -> torch.Tensor:
        raise NotImplementedError

    def side_inputs(self, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> tuple:
        """The side inputs this merge reads, as `pymerge.methods.layers.SideInput`s (kind and dtype), given the
        global and per-model parameter values. Default: every file parameter is a per-parameter Fisher file
        (kind `fisher_mode` or "fisher"; file_format "tensors": any same-named tensors). A method that declares
        a layer kind (gram, kfac) also implements `merge_layer`."""
        from pymerge.methods.layers import SideInput

        return tuple(SideInput(p.name, (self.fisher_mode or "fisher") if p.file_format == "fisher" else "tensors",
                               scope=p.scope) for p in self.params if p.is_file)

    def merge_layer(self, inputs) -> Dict[str, torch.Tensor]:
        """Merge one linear layer's tensors together (`pymerge.methods.layers.LayerInputs`): returns the merged
        tensor per name (its weight and, if any, its bias). Only for methods with a layer side input."""
        raise NotImplementedError(f"{self.name}: declares a layer side input but no merge_layer")


@dataclass
class PrepareInputs:
    params: Dict[str, Any]
    model_params: List[Dict[str, Any]]
    aux_sources: Dict[str, List[Any]]   # file param -> per-model TensorSource (or None)
    merged_names: List[str]             # names of the tensors that will be merged (model naming)
