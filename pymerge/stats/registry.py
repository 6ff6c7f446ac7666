"""Estimators registered by name: each kind of statistic declares its modes once, here, and `collect` is the one
entry point (no string ladders elsewhere). A new statistic is one module that calls `register`."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

# Modules that register the built-in estimators (imported on first look-up: no import cost before).
_BUILTIN = ("pymerge.stats.fisher", "pymerge.stats.masks", "pymerge.stats.gram", "pymerge.stats.kfac")


@dataclass(frozen=True)
class Estimator:
    kind: str
    modes: Tuple[str, ...]
    default_mode: str
    fn: Callable  # fn(model, batches, *, mode, **options) -> Statistics
    summary: str


_REGISTRY: Dict[str, Estimator] = {}


def register(kind: str, *, modes: Iterable[str], default_mode: str, summary: str):
    """Decorator: `fn(model, batches, *, mode, **options) -> Statistics` estimates statistics of `kind`."""
    modes = tuple(modes)
    if default_mode not in modes:
        raise ValueError(f"estimator {kind!r}: default mode {default_mode!r} is not among its modes {modes}")

    def wrap(fn):
        _REGISTRY[kind] = Estimator(kind, modes, default_mode, fn, summary)
        return fn

    return wrap


def _load_builtin() -> None:
    for module in _BUILTIN:
        importlib.import_module(module)


def kinds() -> Tuple[str, ...]:
    _load_builtin()
    return tuple(_REGISTRY)


def get(kind: str) -> Estimator:
    _load_builtin()
    if kind not in _REGISTRY:
        raise ValueError(f"kind: unknown statistics kind {kind!r}; expected one of {tuple(_REGISTRY)}")
    return _REGISTRY[kind]


def collect(model, batches, kind: str = "fisher", mode: Optional[str] = None, **options):
    """Statistics of `kind` (fisher | masks | gram | kfac, or any registered one) of `model` over `batches`.

    mode: the estimator's mode (its default when None); options go to the estimator (e.g. num_samples, seed,
    log_prob_fn, model_kind for fisher / kfac; mapping for masks; exclude, max_memory_bytes for gram / kfac).
    """
    est = get(kind)
    mode = est.default_mode if mode is None else mode
    if mode not in est.modes:
        raise ValueError(f"mode: {kind} statistics take one of {est.modes}, got {mode!r}")
    return est.fn(model, batches, mode=mode, **options)
