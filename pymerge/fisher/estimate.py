"""Compatibility module: the diagonal Fisher lives in pymerge.stats.fisher."""
from pymerge.stats.fisher import estimate  # noqa: F401
from pymerge.stats.logprobs import MODES  # noqa: F401
