"""A model assembled from layer ranges of other models (mergekit's `slices` / `layer_range`), read lazily.

Output layer j of slice k is input layer `layer_range[0] + j` of that slice's model; the output layers are
numbered consecutively over the slices. Tensors outside the numbered layers come from the first slice's model
when they are embeddings (name contains `embed`, `wte` or `wpe`: mergekit's "pre" weights) and from the last
slice's model otherwise (final norm, LM head: "post" weights). The config is the first model's with the layer
count (and any per-layer list such as `layer_types`) updated.

Each tensor also knows its depth for values that vary across layers: j / (n_k - 1) within its slice of n_k
layers (1 for a one-layer slice), 0 outside the layers, as mergekit's gradients do.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from pymerge.io.errors import CheckpointError
from pymerge.io.reader import TensorSource, open_source

_LAYER = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")
PRE_MARKERS = ("embed", "wte", "wpe")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _split(name: str) -> Optional[Tuple[str, int, str]]:
    m = _LAYER.search("." + name)
    if not m:
        return None
    start, end = m.start(1) - 1, m.end(1) - 1
    return name[:start], int(m.group(1)), name[end:]


class LayerStack(TensorSource):
    """parts: [(model (path or source), (first, stop))] in output order."""

    def __init__(self, parts: Sequence[Tuple[object, Tuple[int, int]]], label: str = "<slices>",
                 allow_pickle: bool = False):
        self.parts = [(m, (int(a), int(b))) for m, (a, b) in parts]
        self.label = label
        self.allow_pickle = allow_pickle
        self._map: Optional[Dict[str, Tuple[TensorSource, str, float]]] = None
        self._config: Optional[dict] = None
        self._directory: Optional[Path] = None

    def input_paths(self):
        out = []
        for m, _ in self.parts:
            out += m.input_paths() if isinstance(m, TensorSource) else [Path(m)] if isinstance(m, (str, os.PathLike)) else []
        return out

    # the mapping is built on first use (headers only)
    def _build(self):
        if self._map is not None:
            return
        opened: Dict[str, TensorSource] = {}
        sources = []
        for m, _ in self.parts:
            key = str(m)
            if key not in opened:
                opened[key] = open_source(m, label=f"{self.label} ({m})", allow_pickle=self.allow_pickle)
            sources.append(opened[key])
        mapping: Dict[str, Tuple[TensorSource, str, float]] = {}
        first, last = sources[0], sources[-1]
        for n in first.keys():
            if _split(n) is None and any(k in n for k in PRE_MARKERS):
                mapping[n] = (first, n, 0.0)
        offset = 0
        for src, (_, (a, b)) in zip(sources, self.parts):
            layers: Dict[int, List[Tuple[str, str, str]]] = {}
            for n in src.keys():
                s = _split(n)
                if s is not None:
                    layers.setdefault(s[1], []).append((n, s[0], s[2]))
            have = sorted(layers)
            if b <= a or a < 0 or (have and b > have[-1] + 1) or not have:
                raise CheckpointError(f"{src.label}: layer_range [{a}, {b}] does not fit its "
                                      f"{len(have)} layers (expected 0 <= first < stop <= {len(have)})")
            count = b - a
            for j, i in enumerate(range(a, b)):
                depth = 1.0 if count == 1 else j / (count - 1)
                for n, head, tail in layers.get(i, []):
                    mapping[f"{head}{offset + j}{tail}"] = (src, n, depth)
            offset += count
        for n in last.keys():
            if _split(n) is None and not any(k in n for k in PRE_MARKERS):
                mapping[n] = (last, n, 0.0)
        self._map = mapping
        self._config = self._stacked_config(first.config, sources, offset)
        self._directory = first.directory

    def _stacked_config(self, config, sources, total) -> Optional[dict]:
        if config is None:
            return None
        config = copy.deepcopy(config)
        for k in LAYER_COUNT_KEYS:
            if k in config:
                config[k] = total
        for key, value in list(config.items()):  # per-layer lists (layer_types ...) follow the slices
            if isinstance(value, list) and sources[0].config and len(value) == self._layer_count(sources[0]):
                stacked = []
                for src, (_, (a, b)) in zip(sources, self.parts):
                    stacked += list((src.config or {}).get(key, value))[a:b]
                config[key] = stacked
        return config

    @staticmethod
    def _layer_count(src) -> Optional[int]:
        for k in LAYER_COUNT_KEYS:
            if src.config and isinstance(src.config.get(k), int):
                return src.config[k]
        return None

    @property
    def config(self):
        self._build()
        return self._config

    @property
    def directory(self):
        self._build()
        return self._directory

    def layer_depth(self, name: str) -> float:
        self._build()
        return self._map[name][2] if name in self._map else 0.0

    def origin(self, name: str) -> Tuple[str, str]:
        """(input model label, input tensor name) of an output tensor."""
        self._build()
        src, n, _ = self._map[name]
        return src.label, n

    def keys(self):
        self._build()
        return list(self._map)

    def shape(self, name):
        self._build()
        src, n, _ = self._map[name]
        return src.shape(n)

    def dtype(self, name):
        self._build()
        src, n, _ = self._map[name]
        return src.dtype(n)

    def read(self, name, rows=None):
        self._build()
        src, n, _ = self._map[name]
        return src.read(n, rows)

    @property
    def owned(self):
        self._build()
        return all(s.owned for s, _, _ in self._map.values())

    def __repr__(self):
        return f"LayerStack({self.parts})"
