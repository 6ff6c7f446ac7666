"""The Fisher file format: safetensors (parameter name -> fp32 tensor) with string metadata.

Shared by the Fisher engine (writes), the merge engine (reads) and mask Fisher. Metadata keys always present:
`pymerge_fisher` (format version), `mode`, `num_examples`, `structure` (hash of parameter names and shapes of
the model it was computed on) and `weights` (hash of sampled weight values: which checkpoint, e.g. the
point θ_pre + λ τ at which DF-Merge re-estimated it).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Union

import torch

FORMAT_VERSION = "1"
REQUIRED_METADATA = ("pymerge_fisher", "mode", "num_examples", "structure", "weights")


@dataclass
class Fisher:
    """A diagonal Fisher: parameter name -> fp32 tensor of the parameter's shape, plus metadata."""

    tensors: Dict[str, torch.Tensor]
    metadata: Dict[str, str] = field(default_factory=dict)

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


def save(path: Union[str, os.PathLike], fisher: Fisher, *, overwrite: bool = False) -> Path:
    """Write atomically (temporary file beside the target, then rename); refuse to clobber unless overwrite."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: Fisher file exists; pass overwrite=True (CLI: --force) to replace it")
    missing = [k for k in REQUIRED_METADATA if k not in fisher.metadata]
    if missing:
        raise ValueError(f"Fisher metadata is missing {missing}")
    tensors = {}
    for name, t in fisher.tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"Fisher tensor {name!r}: expected float32, got {t.dtype}")
        tensors[name] = t.detach().contiguous().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in fisher.metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: Union[str, os.PathLike], *, device: str = "cpu") -> Fisher:
    """Read a Fisher file written by `save`; clear errors for missing, corrupt or foreign files."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Fisher file not found")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    if metadata.get("pymerge_fisher") is None:
        raise ValueError(f"{path}: safetensors file has no pymerge Fisher metadata (was it written by pymerge?)")
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"{path}: Fisher tensor {name!r} has dtype {t.dtype}, expected float32")
    return Fisher(tensors, metadata)
