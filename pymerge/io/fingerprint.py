"""Fingerprints of a model read from its checkpoint headers (plus a few sampled values), without loading it.

They reproduce `structure_fingerprint` / `weights_fingerprint` of the statistics store (pymerge.fisher.store),
which hash a model's named parameters when a Fisher or other statistics file is computed; a file stores both,
and the merge checks them against the model the file is paired with. A checkpoint may hold a few tensors that
are not parameters (persistent buffers, integer tensors), so the candidates are: every tensor, the floating
point tensors, and the tensors the statistics file names; for an in-memory module, its named parameters (tied
weights once, as `named_parameters` lists them, while its state dict repeats them). tests/test_faults.py checks the equality with the
store's functions on real models.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from pymerge.io.reader import TensorSource

SAMPLES = 64  # values per tensor in the weights fingerprint (as the store's default)


def name_sets(src: TensorSource, stats_keys: Optional[Sequence[str]] = None) -> List[List[str]]:
    """The tensor sets a statistics file's fingerprints may have been computed over (see the module doc)."""
    every = list(src.keys())
    sets = [every, [k for k in every if src.dtype(k).is_floating_point]]
    params = getattr(src, "parameter_names", None)  # an in-memory module: exactly what the store hashes
    if params:
        sets.insert(0, [k for k in params if k in src])
    if stats_keys:
        sets.append([k for k in stats_keys if k in src])
    out: List[List[str]] = []
    for s in sets:
        if s and sorted(s) not in [sorted(o) for o in out]:
            out.append(s)
    return out


class ModelFingerprints:
    """Fingerprints of one model source, computed on first use and kept. The structure costs a pass over the
    header; the weights ~64 small reads per tensor, done once per tensor whatever the candidate sets."""

    def __init__(self, src: TensorSource):
        self.src = src
        self._samples: Dict[str, bytes] = {}
        self._cache: Dict[tuple, str] = {}

    def structure(self, names: Sequence[str]) -> str:
        key = ("structure",) + tuple(sorted(names))
        if key not in self._cache:
            h = hashlib.sha256()
            for name in sorted(names):
                h.update(f"{name}:{tuple(self.src.shape(name))};".encode())
            self._cache[key] = h.hexdigest()[:16]
        return self._cache[key]

    def weights(self, names: Sequence[str]) -> str:
        key = ("weights",) + tuple(sorted(names))
        if key not in self._cache:
            h = hashlib.sha256()
            for name in sorted(names):
                sample = self._sample(name)
                if sample:
                    h.update(name.encode())
                    h.update(sample)
            self._cache[key] = h.hexdigest()[:16]
        return self._cache[key]

    def _sample(self, name: str) -> bytes:
        if name not in self._samples:
            n = 1
            for s in self.src.shape(name):
                n *= s
            if not n:
                self._samples[name] = b""
            else:
                idx = torch.linspace(0, n - 1, min(SAMPLES, n), dtype=torch.float64).long().tolist()
                self._samples[name] = self.src.read_elements(name, idx).float().numpy().tobytes()
        return self._samples[name]

    def structures(self, stats_keys=None) -> Iterator[str]:
        return (self.structure(s) for s in name_sets(self.src, stats_keys))

    def weights_candidates(self, stats_keys=None) -> Iterator[str]:
        return (self.weights(s) for s in name_sets(self.src, stats_keys))

    def has_structure(self, stored: str, stats_keys=None) -> bool:
        return any(fp == stored for fp in self.structures(stats_keys))  # stops at the first match

    def has_weights(self, stored: str, stats_keys=None) -> bool:
        return any(fp == stored for fp in self.weights_candidates(stats_keys))
