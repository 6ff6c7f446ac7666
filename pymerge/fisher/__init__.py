"""Compatibility names for the Fisher: the statistics engine is `pymerge.stats` (every kind, one file format).

`pymerge.fisher.estimate(model, batches, mode=...)`, `load`, `save`, `Fisher` keep working as before.
"""
from pymerge.stats.store import Statistics as Fisher, load, save, structure_fingerprint, weights_fingerprint  # noqa: F401
from pymerge.fisher.estimate import estimate  # noqa: F401,E402
