"""Compatibility module: the mask Fisher lives in pymerge.stats.masks."""
from pymerge.stats.masks import (  # noqa: F401
    MAPPING_PRESETS, NEURON_SITES, MaskFisher, MaskMapping, estimate_mask_fisher, estimate_masks,
    mask_fisher_to_parameters)
from pymerge.stats.logprobs import classification_log_probs  # noqa: F401
