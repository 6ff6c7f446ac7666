"""Model statistics: every kind (diagonal Fisher, mask Fisher, RegMean Gram, K-FAC factors) is an estimator
registered by name over one capture of layer inputs / output gradients (capture.py) and one way to get
log-probabilities (logprobs.py), stored in one safetensors format with metadata (store.py).

    stats = pymerge.stats.collect(model, batches, kind="gram")
    pymerge.stats.save("ft-a.gram.safetensors", stats)
    pymerge.stats.load("ft-a.gram.safetensors").kind   # "gram"
"""
from pymerge.stats.registry import collect, get, kinds, register  # noqa: F401
from pymerge.stats.store import (  # noqa: F401
    KINDS, Statistics, load, save, structure_fingerprint, weights_fingerprint)
