"""Task arithmetic (Ilharco et al.): θ = θ_pre + λ Σ w_i τ_i with τ_i = θ_i - θ_pre.

Computed in one fused pass as (1 - λ Σ w_i) θ_pre + Σ λ w_i θ_i, so no task vector is materialised.
"""
from pymerge import ops
from pymerge.methods.base import MergeMethod, Param
from pymerge.methods.registry import register


def task_vector_sum(x, coeffs):
    """θ_pre + Σ c_i (θ_i - θ_pre) with the fused weighted sum."""
    return ops.weighted_sum(list(x.models) + [x.base], list(coeffs) + [1.0 - sum(coeffs)])


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    elementwise = True
    description = "pretrained + lambda * sum of (weighted) task vectors"
    needs_base = True
    params = (
        Param("lambda", float, 1.0, help="scaling λ of the summed task vectors"),
        Param("weight", float, 1.0, scope="model", help="per-model factor w_i (coefficient λ w_i)"),
        Param("normalize", bool, False, help="divide the weights by their sum (mergekit)"),
        Param("int8_mask", bool, False, help="accepted for mergekit configs; no effect"),
    )

    def merge_tensor(self, x):
        lam, w = x.params["lambda"], x.per_model("weight")
        div = sum(w) if x.params["normalize"] else 1.0
        if abs(div) < 1e-8:  # as mergekit: a vanishing sum of weights is not divided by
            div = 1.0
        return task_vector_sum(x, [lam * wi / div for wi in w])
