"""Compatibility module: the file format of every statistic lives in pymerge.stats.store."""
from pymerge.stats.store import (  # noqa: F401
    FISHER_FORMAT_VERSION as FORMAT_VERSION, Statistics as Fisher, load, save, structure_fingerprint,
    weights_fingerprint)
