"""Coefficient search: optimisers (GP-BO with EI / UCB, grid, any nevergrad optimiser), the trial log, and
DF-Merge's objective. Entry point: `pymerge.dfmerge(...)` (pymerge.search.api).

The public names are loaded on first use (PEP 562), so `pymerge.search.config` and `pymerge.search.log` import
without torch (command modules and `pymerge --help` stay cheap).
"""
import importlib

_LAZY = {
    "DFMergeResult": "pymerge.search.api", "dfmerge": "pymerge.search.api",
    "best_trial": "pymerge.search.loop", "run_search": "pymerge.search.loop",
    "DFMergeObjective": "pymerge.search.objective", "InsufficientMemoryError": "pymerge.search.objective",
    "make_optimizer": "pymerge.search.optimizers",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'pymerge.search' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
