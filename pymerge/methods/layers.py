"""Side inputs by kind, and a linear layer's tensors handed to a method together (weight with its bias).

A method declares what it reads besides the models with `side_inputs(params)`, a tuple of `SideInput`s:
    kind "fisher" / "masks": per parameter, same name and shape as the tensor (a pymerge Fisher file)
    kind "gram" / "kfac":    per linear layer, keyed by module name (statistics files with `layers` metadata,
                             see SEAMS.md / pymerge.stats); the method then merges those layers with
                             `merge_layer(LayerInputs)` and every other tensor with `merge_tensor`
    kind "model":            a whole checkpoint read alongside (e.g. a merged model to start from)
    kind "tensors":          any same-named tensors (a method's own file format, `Param(file_format="tensors")`)
The engine opens them at planning time, checks them against the models (names, shapes, the layers' weight /
bias names and orientation) before any tensor data is read, and budgets prefetching by `SideInput.nbytes`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from pymerge.io.errors import CheckpointError, IncompatibleModelsError
from pymerge.io.reader import CheckpointDir, StateDictSource, TensorSource, open_source
from pymerge.stats.store import LAYER_KINDS, LAYER_TENSORS, LayerInfo, kind_of, parse_layers  # noqa: F401 (re-exported)

PER_PARAMETER_KINDS = ("fisher", "masks", "model", "tensors")

@dataclass(frozen=True)
class SideInput:
    """One side input a method reads: from file parameter `param`, of statistics kind `kind`, stored as `dtype`.

    scope "model": one file per model (the parameter's per-model value); "global": one for the whole merge.
    optional: models without the file get None (the method decides what to do)."""

    param: str
    kind: str
    dtype: torch.dtype = torch.float32
    scope: str = "model"
    optional: bool = False

    @property
    def per_layer(self) -> bool:
        return self.kind in LAYER_KINDS

    def nbytes(self, shape: Tuple[int, ...], layer: Optional["LayerInfo"] = None) -> int:
        """Bytes read for one tensor of `shape` (per-parameter kinds) or one layer (layer kinds)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        if self.per_layer:
            if layer is None:
                return 0
            return size * sum(_numel(s) for s in layer.tensor_shapes(self.kind).values())
        return size * _numel(shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class LayerStatistics:
    """A gram / kfac statistics file (or in-memory object with .tensors and .metadata), read lazily."""

    def __init__(self, obj, label: str):
        if isinstance(obj, (str, os.PathLike)):
            path = Path(obj)
            if not path.is_file():
                raise FileNotFoundError(f"{label} ({path}): statistics file not found")
            self.source: TensorSource = CheckpointDir(path)
            self.label = f"{label} ({path})"
        elif isinstance(obj, TensorSource):
            self.source, self.label = obj, label
        elif hasattr(obj, "tensors") and hasattr(obj, "metadata"):
            self.source, self.label = StateDictSource(obj.tensors, label=label, metadata=obj.metadata), label
        else:
            raise TypeError(f"{label}: expected a statistics file path or Statistics object, got {type(obj).__name__}")
        meta = self.source.metadata
        if meta.get("pymerge_stats") is None:
            raise CheckpointError(f"{self.label}: has no pymerge statistics metadata (was it written by "
                                  "`pymerge stats`?)")
        self.kind = kind_of(meta)
        self.metadata = dict(meta)
        self.layers: Dict[str, LayerInfo] = {}
        if self.kind in LAYER_KINDS:
            self.layers = parse_layers(meta, self.kind, self.label, self.source.keys(), self.source.shape)

    def read_layer(self, module: str) -> Dict[str, torch.Tensor]:
        return {suffix: self.source.read(f"{module}.{suffix}") for suffix, _ in LAYER_TENSORS[self.kind]}

    def check_model(self, model: TensorSource, model_label: str) -> List[str]:
        """Every layer's weight / bias has the shapes the statistics were computed for. Layers whose weight the
        checkpoint does not store (a tied `lm_head` saved only as the embedding) are dropped and returned; a file
        none of whose layers the model has is another model's."""
        problems, absent = [], []
        for m, info in self.layers.items():
            if info.weight not in model:
                absent.append(m)
                continue
            if tuple(model.shape(info.weight)) != info.weight_shape:
                problems.append(f"layer {m!r}: weight {info.weight!r} has shape {tuple(model.shape(info.weight))} in "
                                f"the model, the statistics are for {info.weight_shape}"
                                f"{' (Conv1D, [in, out])' if info.transposed else ''}")
            if info.bias is not None:
                if info.bias not in model:
                    problems.append(f"layer {m!r}: the model has no bias {info.bias!r}")
                elif tuple(model.shape(info.bias)) != (info.out_features,):
                    problems.append(f"layer {m!r}: bias {info.bias!r} has shape {tuple(model.shape(info.bias))}, "
                                    f"expected ({info.out_features},)")
        if absent and len(absent) == len(self.layers):
            problems.append(f"the model has none of its layers' weights (e.g. {self.layers[absent[0]].weight!r})")
        if problems:
            more = f" ... and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise IncompatibleModelsError(f"{self.label} does not match model {model_label} (statistics of another "
                                          f"model?): {'; '.join(problems[:3])}{more}")
        for m in absent:
            del self.layers[m]
        return absent


def open_side_input(spec: SideInput, value, label: str):
    """Open one side input's file / object: LayerStatistics for layer kinds, a TensorSource otherwise."""
    if spec.per_layer:
        stats = LayerStatistics(value, label)
        if stats.kind != spec.kind:
            raise CheckpointError(f"{stats.label}: holds {stats.kind!r} statistics, this merge needs {spec.kind!r} "
                                  f"(pymerge stats --kind {spec.kind})")
        return stats
    if spec.kind in ("model", "tensors"):
        src = open_source(value, label=label)
        if isinstance(value, (str, os.PathLike)):
            src.label = f"{label} ({value})"
        return src
    from pymerge.io.reader import open_fisher

    src = open_fisher(value, label=label)
    if isinstance(value, (str, os.PathLike)):
        src.label = f"{label} ({value})"
    return src


@dataclass
class LayerInputs:
    """One linear layer of every model, with its statistics. X_m = [W_m | b_m] is [k, d'] in torch's layout."""

    info: LayerInfo
    weights: List[torch.Tensor]                    # per model, as stored (Conv1D: [d, k])
    biases: Optional[List[torch.Tensor]]           # per model, or None (layer without bias)
    base_weight: Optional[torch.Tensor]
    base_bias: Optional[torch.Tensor]
    stats: Dict[str, List[Optional[Dict[str, torch.Tensor]]]]   # side-input param -> per model {suffix: tensor}
    params: Dict[str, Any]
    model_params: List[Dict[str, Any]]
    state: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = field(default_factory=dict)  # global "model" inputs: (weight, bias)
    labels: Dict[str, List[str]] = field(default_factory=dict)  # side-input param -> per model, for messages

    @property
    def name(self) -> str:
        return self.info.module

    def per_model(self, key: str) -> List[Any]:
        return [p[key] for p in self.model_params]

    def describe(self) -> str:
        return f"layer {self.info.module!r}"

    def stats_labels(self, param: str) -> List[str]:
        return self.labels.get(param) or [f"model {i}" for i in range(len(self.weights))]

    def augmented(self, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype=None) -> torch.Tensor:
        w = weight.t() if self.info.transposed else weight
        if dtype is not None:
            w = w.to(dtype)
        if bias is None:
            return w.contiguous()
        return torch.cat([w, bias.to(w.dtype).unsqueeze(1)], 1)

    def thetas(self, dtype=torch.float32) -> List[torch.Tensor]:
        bs = self.biases if self.biases is not None else [None] * len(self.weights)
        return [self.augmented(w, b, dtype) for w, b in zip(self.weights, bs)]

    def base_theta(self, dtype=torch.float32) -> torch.Tensor:
        return self.augmented(self.base_weight, self.base_bias, dtype)

    def split(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """[k, d'] back to the layer's stored tensors (weight in its orientation, bias), in the models' dtype."""
        dtype = self.weights[0].dtype
        w = x[:, :self.info.in_features]
        out = {self.info.weight: (w.t() if self.info.transposed else w).contiguous().to(dtype)}
        if self.info.bias is not None:
            out[self.info.bias] = x[:, self.info.in_features].contiguous().to(dtype)
        return out
