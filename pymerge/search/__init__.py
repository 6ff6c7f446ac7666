"""Coefficient search: optimisers (GP-BO with EI / UCB, grid, any nevergrad optimiser), the trial log, and
DF-Merge's objective. Entry point: `pymerge.dfmerge(...)` (pymerge.search.api)."""
from pymerge.search.api import DFMergeResult, dfmerge  # noqa: F401
from pymerge.search.loop import best_trial, run_search  # noqa: F401
from pymerge.search.objective import DFMergeObjective, InsufficientMemoryError  # noqa: F401
from pymerge.search.optimizers import make_optimizer  # noqa: F401
