"""TIES-merging (Yadav et al.): trim each task vector to its top-density magnitudes, elect signs, disjoint mean.

Trimming is per tensor (as mergekit does), never over a flattened whole model.
"""
from pymerge import ops
from pymerge.methods.base import MergeMethod, Param, in_range
from pymerge.methods.registry import register


@register
class Ties(MergeMethod):
    name = "ties"
    description = "trim, elect sign, disjoint merge of task vectors"
    needs_base = True
    params = (
        Param("density", float, 0.2, check=in_range(0.0, 1.0, lo_open=True), help="fraction of entries kept"),
        Param("lambda", float, 1.0, help="scaling of the merged task vector"),
    )

    def merge_tensor(self, x):
        return ops.ties_merge(x.base, x.task_vectors(), x.params["density"], x.params["lambda"])
