"""Fisher merging with mask Fishers (Fisher of head / FFN-neuron masks mapped onto parameter blocks).

The mask-Fisher files are ordinary per-parameter Fisher files with metadata mode="masks"; merging them is
Fisher merging, and this method insists the files are of that kind.
"""
from pymerge.methods.fisher import FisherMerge
from pymerge.methods.registry import register


@register
class MaskFisherMerge(FisherMerge):
    name = "mask_fisher"
    description = "Fisher merging with mask-Fisher files (pymerge fisher --mode masks)"
    fisher_mode = "masks"
