"""DARE (Yu et al.): drop each task-vector entry with probability p, rescale, then merge the sparsified task
vectors with task arithmetic or TIES.

`dare` is pymerge's form (drop probability `p`, `over: task_arithmetic | ties`, survivors × 1/(1-p)).
`dare_ties` and `dare_linear` are mergekit's: per-model keep probability `density`, `rescale: true` keeps
each task vector's L1 norm (mergekit) and `normalize` / sign consensus as in its generalized task arithmetic.

The random mask of model i and tensor NAME depends only on (seed, i, NAME), so a merge is reproducible and
does not depend on the order tensors are processed in or on the device.
"""
from pymerge import ops
from pymerge.methods.base import MergeMethod, Param, in_range
from pymerge.methods.registry import register
from pymerge.methods.sparsify import (SparsifiedTaskVectors, combine, float_task_vectors, fused_density,
                                      random_drop, random_drop_params, register_variants, tensor_seed,
                                      trim_magnitudes)

__all__ = ["Dare", "DareTies", "DareLinear", "tensor_seed"]


@register
class Dare(MergeMethod):
    name = "dare"
    description = "drop-and-rescale task vectors, then task arithmetic or TIES"
    needs_base = True
    params = (
        Param("p", float, check=in_range(0.0, 1.0, hi_open=True), help="drop probability (required)"),
        Param("seed", int, 0, help="random seed"),
        Param("over", str, "task_arithmetic", choices=("task_arithmetic", "ties"), help="how to combine"),
        Param("lambda", float, 1.0, help="scaling of the merged task vector"),
        Param("weight", float, 1.0, scope="model", help="per-model factor w_i"),
        Param("density", float, 1.0, check=in_range(0.0, 1.0, lo_open=True),
              help="TIES trim density after dropping (over: ties; 1 = sign election only)"),
        Param("rescale", str, "inverse", choices=("inverse", "l1", "none"), aliases=((True, "inverse"),
              (False, "none")), help="survivors × 1/(1-p) (inverse), keep the L1 norm (l1), or none"),
        Param("consensus", str, "sum", choices=("sum", "count"), help="sign election (over: ties)"),
        Param("trim_count", str, "ceil", choices=("ceil", "floor"), help="TIES kept entries (over: ties)"),
    )

    def merge_tensor(self, x):
        p, seed, rescale = x.params["p"], x.params["seed"], x.params["rescale"]
        lam, weights = x.params["lambda"], x.per_model("weight")
        if rescale == "inverse":
            tvs = [ops.dare(tv, p, tensor_seed(seed, i, x.name)) for i, tv in enumerate(x.task_vectors())]
        else:
            tvs = [random_drop(tv, 1.0 - p, seed, i, x.name, rescale) for i, tv in enumerate(float_task_vectors(x))]
        if x.params["over"] == "ties":
            density, trim = x.params["density"], x.params["trim_count"]
            fused = fused_density(x.base.numel(), density, trim)
            if all(w == 1.0 for w in weights) and x.params["consensus"] == "sum" and fused is not None:
                return ops.ties_merge(x.base, tvs, fused, lam)
            tvs = [trim_magnitudes(t.float(), density, trim, where=f"dare: tensor {x.name!r}") for t in tvs]
            return combine(x.base, tvs, weights, x.params["consensus"], True, lam)
        coeffs = [lam * w for w in weights]
        return ops.weighted_sum(tvs, coeffs, base=x.base.to(tvs[0].dtype))


class _MergekitDare(SparsifiedTaskVectors):
    """mergekit's dare_ties / dare_linear: random drop with keep probability `density` per model."""

    def sparsify(self, x, i, tv):
        return random_drop(tv, x.model_params[i]["density"], x.params["seed"], i, x.name, x.params["rescale"])


DareTies, DareLinear = register_variants(
    _MergekitDare, __name__,
    DareTies=("dare_ties", "mergekit's DARE TIES: random drop (keep `density`), L1 rescale, sign consensus",
              random_drop_params(normalize=False, consensus="sum")),
    DareLinear=("dare_linear", "mergekit's linear DARE: random drop (keep `density`), L1 rescale, weighted sum",
                random_drop_params(normalize=False, consensus=None)))
