"""Fingerprints of a model read from its checkpoint headers (plus a few sampled values), without loading it.

They reproduce `structure_fingerprint` / `weights_fingerprint` of the statistics store (pymerge.fisher.store),
which hash a model's named parameters when a Fisher or other statistics file is computed; a file stores both,
and the merge checks them against the model the file is paired with. A checkpoint may hold a few tensors that
are not parameters (persistent buffers, integer tensors), so the candidates are: every tensor, the floating
point tensors, and the tensors the statistics file names. tests/test_faults.py checks the equality with the
store's functions on real models.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from pymerge.io.reader import TensorSource

SAMPLES = 64  # values per tensor in the weights fingerprint (as the store's default)


def structure_of(src: TensorSource, names: Iterable[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(f"{name}:{tuple(src.shape(name))};".encode())
    return h.hexdigest()[:16]


def weights_of(src: TensorSource, names: Iterable[str], samples: int = SAMPLES) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        n = 1
        for s in src.shape(name):
            n *= s
        if n:
            idx = torch.linspace(0, n - 1, min(samples, n), dtype=torch.float64).long()
            h.update(name.encode())
            h.update(src.read_elements(name, idx.tolist()).float().numpy().tobytes())
    return h.hexdigest()[:16]


def name_sets(src: TensorSource, stats_keys: Optional[Sequence[str]] = None) -> List[List[str]]:
    """The tensor sets a statistics file's fingerprints may have been computed over (see the module doc)."""
    every = list(src.keys())
    sets = [every, [k for k in every if src.dtype(k).is_floating_point]]
    if stats_keys:
        sets.append([k for k in stats_keys if k in src])
    out: List[List[str]] = []
    for s in sets:
        if s and sorted(s) not in [sorted(o) for o in out]:
            out.append(s)
    return out


class ModelFingerprints:
    """Fingerprints of one model source, computed on first use and kept (each costs a pass over the header,
    the weights one also ~64 small reads per tensor)."""

    def __init__(self, src: TensorSource):
        self.src = src
        self._structure: Dict[tuple, str] = {}
        self._weights: Dict[tuple, str] = {}

    def structures(self, stats_keys=None) -> List[str]:
        return [self._get(self._structure, structure_of, s) for s in name_sets(self.src, stats_keys)]

    def weights(self, stats_keys=None) -> List[str]:
        return [self._get(self._weights, weights_of, s) for s in name_sets(self.src, stats_keys)]

    def _get(self, cache, fn, names):
        key = tuple(sorted(names))
        if key not in cache:
            cache[key] = fn(self.src, names)
        return cache[key]
