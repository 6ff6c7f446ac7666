"""DF-Merge combine (Lee et al. 2025, eq. 8) for given coefficients λ_i:

    θ = θ_pre + M Σ_i F_i λ_i τ_i / Σ_i F_i,   F_i estimated at θ_pre + λ_i τ_i.

The Fishers must have been computed at those points (e.g. by the coefficient search); the coefficients
themselves are searched elsewhere (pymerge search).
"""
from pymerge import ops
from pymerge.methods.base import MergeMethod, Param, in_range
from pymerge.methods.registry import register


@register
class DFMerge(MergeMethod):
    name = "dfmerge"
    elementwise = True
    description = "DF-Merge: Fisher-weighted task vectors with per-model λ_i"
    needs_base = True
    stats_at_model_weights = False  # its Fishers are estimated at θ_pre + λ_i τ_i, not at θ_i
    params = (
        Param("lambda", float, scope="model", help="per-model coefficient λ_i (required)"),
        Param("fisher", "file", scope="model", help="Fisher estimated at θ_pre + λ_i τ_i"),
        Param("eps", float, 1e-8, check=in_range(0.0), help="Fisher mass below which the task vectors are averaged"),
    )

    def merge_tensor(self, x):
        return ops.dfmerge_combine(x.base, x.task_vectors(), x.aux["fisher"], x.per_model("lambda"),
                                   eps=x.params["eps"])
