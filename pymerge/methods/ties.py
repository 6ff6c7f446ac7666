"""TIES-merging (Yadav et al.): trim each task vector to its top-density magnitudes, elect signs, disjoint mean.

Trimming is per tensor (as mergekit does), never over a flattened whole model. With its defaults (weights 1,
one density, `normalize: true`, `consensus: sum`, `trim_count: ceil`) a tensor is one fused op
(`ops.ties_merge`); per-model weights or densities and the other options run the generalized path of
`sparsify.combine` (mergekit's semantics). mergekit keeps int(d·n) entries: `trim_count: floor` (still the
fused op, with the density adjusted to keep exactly that many).
"""
from pymerge import ops
from pymerge.methods.base import MergeMethod
from pymerge.methods.registry import register
from pymerge.methods.sparsify import (apply_rescale, combine, family_params, float_task_vectors, fused_density,
                                      trim_magnitudes)


@register
class Ties(MergeMethod):
    name = "ties"
    description = "trim, elect sign, disjoint merge of task vectors"
    needs_base = True
    checks_finite = True
    params = family_params(normalize=True, rescale="none", density=0.2, trim_count="ceil", consensus="sum")

    def merge_tensor(self, x):
        p = x.params
        weights, densities = x.per_model("weight"), x.per_model("density")
        fused = (all(w == 1.0 for w in weights) and len(set(densities)) == 1 and p["normalize"]
                 and p["consensus"] == "sum" and p["rescale"] == "none")
        density = fused_density(x.base.numel(), densities[0], p["trim_count"]) if fused else None
        if density is not None:  # the op forms τ_i = θ_i - θ_pre itself and checks every input for NaN / Inf
            return ops.ties_merge(x.base, x.models, density, p["lambda"], models=True, check_finite=x.check_finite)
        if x.check_finite:
            ops.check_inputs_finite(x.base, x.models)
        tvs = float_task_vectors(x)
        tvs = [apply_rescale(t, trim_magnitudes(t, d, p["trim_count"], where=f"ties: tensor {x.name!r}"),
                             p["rescale"], keep_prob=d) for t, d in zip(tvs, densities)]
        return combine(x.base, tvs, weights, p["consensus"], p["normalize"], p["lambda"])
