"""The statistics file format: safetensors (fp32 tensors) with string metadata, for every kind of statistic.

Metadata always present: `pymerge_stats` (format version), `kind` (a registered estimator: fisher | masks |
gram | kfac), `mode`, `num_examples`, `structure` (hash of parameter names and shapes of the model it was
computed on) and `weights` (hash of sampled weight values: which checkpoint). Per kind:
- fisher / masks: tensor key = parameter name, shape = the parameter's shape. These files also carry
  `pymerge_fisher` so that readers of the older Fisher format take them unchanged.
- gram / kfac: one entry per linear layer (module name m): metadata `layers` = JSON {m: {"weight", "bias",
  "transposed", "in_features", "out_features", "tokens"}}; gram: m + ".gram" [d', d']; kfac: m + ".kfac_in"
  [d', d'] and m + ".kfac_out" [k, k]; d' = d + 1 when the layer has a bias (inputs augmented with a 1).

Files written before this format (metadata `pymerge_fisher`, no `kind`) load as kind fisher (masks when their
mode is "masks"), with their metadata untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch

from pymerge.io.errors import CheckpointError

FORMAT_VERSION = "1"  # of `pymerge_stats`; also written as `pymerge_fisher` for per-parameter kinds
FISHER_FORMAT_VERSION = "1"
KINDS = ("fisher", "masks", "gram", "kfac")
PER_PARAMETER_KINDS = ("fisher", "masks")
LAYER_KINDS = ("gram", "kfac")
REQUIRED_METADATA = ("mode", "num_examples", "structure", "weights")
# The tensors of one layer, per layer kind: (suffix, shape from (d', k)); the tensor of module m is "m.suffix".
LAYER_TENSORS = {
    "gram": (("gram", lambda d, k: (d, d)),),
    "kfac": (("kfac_in", lambda d, k: (d, d)), ("kfac_out", lambda d, k: (k, k))),
}
LAYER_FIELDS = ("weight", "bias", "transposed", "in_features", "out_features", "tokens")


def kind_of(metadata: Mapping[str, str]) -> str:
    """The kind of a file's metadata; legacy Fisher files (no `kind`) are fisher, or masks by their mode."""
    kind = metadata.get("kind")
    if kind is not None:
        return kind
    return "masks" if metadata.get("mode") == "masks" else "fisher"


@dataclass(frozen=True)
class LayerInfo:
    """A linear layer as a statistics file describes it (nn.Linear: weight [k, d]; HF Conv1D: [d, k]).
    `tokens` (rows counted) differs between the files of two models and takes no part in equality."""

    module: str
    weight: str
    bias: Optional[str]
    transposed: bool
    in_features: int
    out_features: int
    tokens: Optional[float] = field(default=None, compare=False, repr=False)

    @property
    def d_aug(self) -> int:
        """Columns of X = [W | b]: inputs, plus one for the bias."""
        return self.in_features + (self.bias is not None)

    @property
    def weight_shape(self) -> Tuple[int, int]:
        k, d = self.out_features, self.in_features
        return (d, k) if self.transposed else (k, d)

    def tensor_shapes(self, kind: str) -> Dict[str, Tuple[int, ...]]:
        """Suffix -> shape of this layer's tensors in a statistics file of `kind`."""
        return {suffix: shape_of(self.d_aug, self.out_features) for suffix, shape_of in LAYER_TENSORS[kind]}

    def describe(self) -> str:
        return (f"a layer with {self.in_features} inputs{' + 1 for the bias' if self.bias is not None else ''} "
                f"and {self.out_features} outputs")


def parse_layers(metadata: Mapping[str, str], kind: str, where: str, keys: Iterable[str],
                 shape: Callable[[str], Tuple[int, ...]]) -> Dict[str, LayerInfo]:
    """The `layers` metadata of a gram / kfac file, checked against the file's tensors (names `keys`, shapes by
    `shape(name)`): every layer's tensors present and shaped for it, no tensor outside a layer. Errors
    (CheckpointError, a ValueError) name `where` (the file), the layer and what was expected."""
    try:
        raw = json.loads(metadata["layers"])
    except KeyError:
        raise CheckpointError(f"{where}: {kind} statistics need a `layers` metadata entry") from None
    except (TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: `layers` metadata is not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: `layers` metadata must be a JSON object of module name -> layer, "
                              f"got {type(raw).__name__}")
    keys = set(keys)
    layers: Dict[str, LayerInfo] = {}
    for m, info in raw.items():
        try:
            if not isinstance(info["transposed"], bool):
                raise TypeError
            layer = LayerInfo(m, str(info["weight"]), None if info.get("bias") is None else str(info["bias"]),
                              info["transposed"], int(info["in_features"]), int(info["out_features"]),
                              float(info["tokens"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: layer {m!r}: `layers` entry needs {', '.join(LAYER_FIELDS)} "
                                  f"(transposed true / false, sizes integers); got {info!r}") from None
        for suffix, want in layer.tensor_shapes(kind).items():
            key = f"{m}.{suffix}"
            if key not in keys:
                raise CheckpointError(f"{where}: layer {m!r} has no tensor {key!r}")
            got = tuple(shape(key))
            if got != want:
                raise CheckpointError(f"{where}: layer {m!r}: tensor {key!r} has shape {got}, expected {want} for "
                                      f"{layer.describe()}")
            keys.discard(key)
        layers[m] = layer
    if keys:
        raise CheckpointError(f"{where}: tensors {sorted(keys)[:5]} belong to no layer of the `layers` metadata "
                              f"(expected only {', '.join('<module>.' + s for s, _ in LAYER_TENSORS[kind])})")
    return layers


@dataclass
class Statistics:
    """Model statistics of one kind: name -> fp32 tensor, plus string metadata (see the module doc)."""

    tensors: Dict[str, torch.Tensor]
    metadata: Dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return kind_of(self.metadata)

    @property
    def layers(self) -> Dict[str, dict]:
        """gram / kfac: module name -> layer description (weight / bias names, transposed, sizes, tokens)."""
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"statistics of kind {self.kind!r} are per parameter, not per layer")
        return json.loads(self.metadata["layers"])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()


def _named_tensors(model_or_state) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_state, torch.nn.Module):
        return dict(model_or_state.named_parameters())
    return model_or_state


def structure_fingerprint(model_or_state) -> str:
    """Hash of sorted parameter names and shapes: equal for two checkpoints of one architecture."""
    h = hashlib.sha256()
    for name, t in sorted(_named_tensors(model_or_state).items()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
    return h.hexdigest()[:16]


def weights_fingerprint(model_or_state, samples: int = 64) -> str:
    """Hash of a few strided values from every tensor: tells two checkpoints apart cheaply."""
    h = hashlib.sha256()
    for name, t in sorted(_named_tensors(model_or_state).items()):
        flat = t.detach().reshape(-1)
        if flat.numel():
            # float64: a float32 linspace rounds past the end for tensors over 2**24 elements
            idx = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), dtype=torch.float64).long()
            h.update(name.encode())
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def base_metadata(kind: str, mode: str, num_examples: int, model) -> Dict[str, str]:
    """The metadata every statistics file carries."""
    meta = {"pymerge_stats": FORMAT_VERSION, "kind": kind, "mode": mode, "num_examples": str(int(num_examples)),
            "structure": structure_fingerprint(model), "weights": weights_fingerprint(model)}
    if kind in PER_PARAMETER_KINDS:
        meta["pymerge_fisher"] = FISHER_FORMAT_VERSION
    return meta


def check(stats: Statistics, where: str) -> None:
    """Metadata complete, kind known, tensors fp32, and for layer kinds every layer's tensors present and shaped
    as its `layers` entry says. `where` names the file or object in the errors."""
    meta = stats.metadata
    if meta.get("pymerge_stats") is None and meta.get("pymerge_fisher") is None:
        raise ValueError(f"{where}: no pymerge statistics metadata (was it written by pymerge?)")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if meta.get("pymerge_stats") is not None and "kind" not in meta:
        missing.append("kind")
    if missing:
        raise ValueError(f"{where}: statistics metadata is missing {missing}")
    kind = stats.kind
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown statistics kind {kind!r}; expected one of {KINDS}")
    for name, t in stats.tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"{where}: tensor {name!r} has dtype {t.dtype}, expected float32")
    if kind in LAYER_KINDS:
        parse_layers(meta, kind, where, stats.tensors.keys(), lambda key: stats.tensors[key].shape)


def save(path: Union[str, os.PathLike], stats: Statistics, *, overwrite: bool = False) -> Path:
    """Write atomically (temporary file beside the target, then rename); refuse to clobber unless overwrite."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: statistics file exists; pass overwrite=True (CLI: --force) to replace it")
    check(stats, f"statistics for {path}")
    tensors = {name: t.detach().contiguous().cpu() for name, t in stats.tensors.items()}
    from pymerge.io.writer import atomic_file  # stale temporary files, signals, umask, disk full: one mechanism

    with atomic_file(path, expected_bytes=sum(t.numel() * t.element_size() for t in tensors.values())) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in stats.metadata.items()})
    return path


def load(path: Union[str, os.PathLike], *, device: str = "cpu", kind: str = None) -> Statistics:
    """Read a statistics file (any kind; older Fisher files too); clear errors for missing, corrupt, foreign or
    inconsistent files, and when `kind` is given and the file holds another kind."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: statistics file not found")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    stats = Statistics(tensors, metadata)
    check(stats, str(path))
    if kind is not None and stats.kind != kind:
        raise ValueError(f"{path}: holds {stats.kind!r} statistics, expected {kind!r}")
    return stats
