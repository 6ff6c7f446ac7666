"""Tensor sources: the engine reads every model, base model and Fisher through this one small interface.

A source knows its tensor names, shapes and dtypes without reading data, and reads one tensor at a time:
- `CheckpointDir`: a Hugging Face model directory (config.json + model.safetensors, or sharded *.safetensors with
  model.safetensors.index.json), or one .safetensors file; `.bin` pickle checkpoints only with allow_pickle.
- `StateDictSource`: an in-memory nn.Module or state dict (the Python API and the tests).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

from pymerge.io.errors import CheckpointError
from pymerge.io.safetensors_file import SafetensorsFile

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class TensorSource:
    """Named tensors read lazily. `label` names the source in messages; `directory` holds config/tokenizer."""

    label: str = "<source>"
    directory: Optional[Path] = None
    config: Optional[dict] = None
    metadata: Dict[str, str] = {}

    def keys(self) -> List[str]:
        raise NotImplementedError

    def shape(self, name: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def read(self, name: str, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The tensor (a fresh CPU tensor for files), or rows [start, stop) of its first dimension."""
        raise NotImplementedError

    def input_paths(self) -> List[Path]:
        """The files / directories this source reads (an output may never touch them); none in memory.
        Wrappers delegate to the source they wrap (`inner`)."""
        inner = getattr(self, "inner", None)
        return inner.input_paths() if isinstance(inner, TensorSource) else []

    def read_elements(self, name: str, flat_indices) -> torch.Tensor:
        """Elements of the flattened tensor at `flat_indices` (sources on disk read only those bytes)."""
        return self.read(name).reshape(-1)[torch.as_tensor(list(flat_indices), dtype=torch.long)]

    # Whether `read` returns a fresh tensor the caller may modify in place (files: yes; in-memory: no).
    owned = True

    def __contains__(self, name: str) -> bool:
        return name in self._key_set()

    def _key_set(self):
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def num_params(self) -> int:
        total = 0
        for k in self.keys():
            n = 1
            for s in self.shape(k):
                n *= s
            total += n
        return total


class StateDictSource(TensorSource):
    """An nn.Module (its state_dict) or a mapping name -> tensor held in memory."""

    def __init__(self, obj, label: str = "<state dict>", config: Optional[dict] = None,
                 metadata: Optional[Mapping[str, str]] = None):
        self.parameter_names: Optional[List[str]] = None
        if isinstance(obj, torch.nn.Module):
            if config is None and getattr(obj, "config", None) is not None and hasattr(obj.config, "to_dict"):
                config = obj.config.to_dict()
            # its parameters once each (tied weights under their first name), as statistics fingerprint them
            self.parameter_names = [n for n, _ in obj.named_parameters()]
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise TypeError(f"{label}: expected a path, nn.Module or state dict, got {type(obj).__name__}")
        for k, v in obj.items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"{label}: entry {k!r} is a {type(v).__name__}, not a tensor")
        self._tensors = dict(obj)
        self.label = label
        self.config = config
        self.metadata = dict(metadata or {})

    def keys(self):
        return list(self._tensors)

    def shape(self, name):
        return tuple(self._tensors[name].shape)

    def dtype(self, name):
        return self._tensors[name].dtype

    owned = False

    def read(self, name, rows=None):
        t = self._tensors[name].detach().to("cpu")
        return t if rows is None else t[rows[0]:rows[1]]


class CheckpointDir(TensorSource):
    """A model directory or single checkpoint file on disk, opened without reading any tensor data."""

    def __init__(self, path: Union[str, os.PathLike], *, allow_pickle: bool = False):
        path = Path(path)
        self.label = str(path)
        self.path = path
        if not path.exists():
            raise FileNotFoundError(f"{path}: model not found (expected a model directory or .safetensors file)")
        if path.is_file():
            self.directory = None
            files = self._single_file(path, allow_pickle)
        else:
            self.directory = path
            self.config = read_model_config(path)
            files = self._directory_files(path, allow_pickle)
        self._files: List[SafetensorsFile] = []
        self._where: Dict[str, object] = {}  # name -> SafetensorsFile or in-memory pickle dict
        for f in files:
            if isinstance(f, dict):
                for k, v in f.items():
                    self._add(k, f)
                continue
            self._files.append(f)
            for k in f.keys():
                self._add(k, f)
        if self._files:
            self.metadata = dict(self._files[0].metadata)

    def _add(self, name, holder):
        if name in self._where:
            raise CheckpointError(f"{self.label}: tensor {name!r} appears in more than one file")
        self._where[name] = holder

    def _single_file(self, path: Path, allow_pickle: bool):
        if path.suffix in (".bin", ".pt", ".pth"):
            return [_load_pickle(path, allow_pickle)]
        return [SafetensorsFile(path)]  # any other file must be safetensors (clear error if it is not)

    def _directory_files(self, path: Path, allow_pickle: bool):
        index = path / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = _read_index(index)
            shards = {}
            for name, shard in weight_map.items():
                if shard not in shards:
                    shard_path = path / shard
                    if not shard_path.is_file():
                        raise FileNotFoundError(f"{index}: lists shard {shard!r} which is missing in {path}")
                    shards[shard] = SafetensorsFile(shard_path)
                if name not in shards[shard].entries:
                    raise CheckpointError(f"{index}: says {name!r} is in {shard}, but that shard has no such tensor")
            files = list(shards.values())
            listed = set(weight_map)
            for f in files:
                extra = [k for k in f.keys() if k not in listed]
                if extra:
                    raise CheckpointError(f"{f.path}: holds tensors not listed in {index.name}: {extra[:5]}")
            return files
        single = path / "model.safetensors"
        if single.is_file():
            return [SafetensorsFile(single)]
        found = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
        if found:
            return [SafetensorsFile(p) for p in found]
        pickles = sorted(p for p in path.glob("*.bin") if not p.name.startswith(".")) + \
            sorted(p for p in path.glob("*.pt*") if p.suffix in (".pt", ".pth"))
        if pickles:
            pindex = path / "pytorch_model.bin.index.json"
            if pindex.is_file():
                shard_names = sorted(set(_read_index(pindex).values()))
                pickles = [path / s for s in shard_names]
            return [_load_pickle(p, allow_pickle) for p in pickles]
        raise CheckpointError(
            f"{path}: no model weights found (expected model.safetensors, or sharded *.safetensors with "
            f"{SAFETENSORS_INDEX})")

    def keys(self):
        return list(self._where)

    def shape(self, name):
        h = self._where[name]
        return h.shape(name) if isinstance(h, SafetensorsFile) else tuple(h[name].shape)

    def dtype(self, name):
        h = self._where[name]
        return h.dtype(name) if isinstance(h, SafetensorsFile) else h[name].dtype

    def input_paths(self):
        return [self.path]

    def read_elements(self, name, flat_indices):
        h = self._where[name]
        if isinstance(h, SafetensorsFile):
            return h.read_elements(name, flat_indices)
        return super().read_elements(name, flat_indices)

    def read(self, name, rows=None):
        h = self._where[name]
        if isinstance(h, SafetensorsFile):
            return h.read(name, rows)
        t = h[name]  # a memory-mapped pickle tensor: copy so in-place use cannot reach the mapping
        return (t if rows is None else t[rows[0]:rows[1]]).clone()


def read_model_config(path: Union[str, os.PathLike]) -> Optional[dict]:
    """config.json of a model directory as a dict (None when absent); a clear error naming the file when it is
    unreadable or not a JSON object. Commands that hand a directory to transformers should check it here first."""
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return None
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{cfg}: unreadable model config ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object (a model config), got a JSON {type(config).__name__}")
    return config


def _read_index(index: Path) -> Dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not an object of tensor name -> shard file name")
        return weight_map
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: unreadable shard index ({exc})") from exc


def _load_pickle(path: Path, allow_pickle: bool) -> Dict[str, torch.Tensor]:
    if not allow_pickle:
        raise CheckpointError(
            f"{path}: is a pickle checkpoint; unpickling untrusted files can run arbitrary code, so it is refused. "
            "Convert it to safetensors, or pass --allow-pickle (allow_pickle: true) to load it with "
            "torch.load(weights_only=True)")
    try:
        try:  # mmap keeps a large checkpoint out of memory until each tensor is used
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: could not be loaded with torch.load(weights_only=True): {exc}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    return dict(obj)


def open_source(obj, *, label: Optional[str] = None, allow_pickle: bool = False) -> TensorSource:
    """A path (directory or file), an nn.Module, a state dict, a pymerge Fisher, or an existing source."""
    if isinstance(obj, TensorSource):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return CheckpointDir(obj, allow_pickle=allow_pickle)
    from pymerge.fisher.store import Fisher

    if isinstance(obj, Fisher):
        return StateDictSource(obj.tensors, label=label or "<Fisher>", metadata=obj.metadata)
    return StateDictSource(obj, label=label or f"<{type(obj).__name__}>")


def open_fisher(obj, *, label: Optional[str] = None) -> TensorSource:
    """A Fisher file (path) or in-memory `pymerge.fisher.Fisher`, read lazily; checks it is a pymerge Fisher."""
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Fisher file not found")
        src = CheckpointDir(path)
    else:
        src = open_source(obj, label=label)
    if src.metadata.get("pymerge_fisher") is None:
        kind = src.metadata.get("kind") if src.metadata.get("pymerge_stats") is not None else None
        if kind:  # statistics of another kind (gram, kfac): say so rather than "not pymerge's"
            raise CheckpointError(f"{src.label}: is a {kind} statistics file, not a per-parameter Fisher")
        raise CheckpointError(f"{src.label}: has no pymerge Fisher metadata (was it written by `pymerge fisher`?)")
    for name in src.keys():
        if src.dtype(name) != torch.float32:
            raise CheckpointError(f"{src.label}: Fisher tensor {name!r} has dtype {src.dtype(name)}, expected float32")
    return src


_read_config = read_model_config  # older name
