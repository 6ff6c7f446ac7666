"""Weighted parameter average: θ = Σ w_i θ_i / Σ w_i (w_i = 1 gives the plain mean)."""
from pymerge import ops
from pymerge.methods.base import ConfigError, MergeMethod, Param, in_range
from pymerge.methods.registry import register


@register
class Average(MergeMethod):
    name = "average"
    elementwise = True
    description = "weighted average of the models (isotropic merging)"
    params = (Param("weight", float, 1.0, scope="model", check=in_range(0.0), help="relative weight w_i"),)

    def merge_tensor(self, x):
        w = x.per_model("weight")
        total = sum(w)
        if total <= 0:
            raise ConfigError(f"average: the weights of tensor {x.name!r} sum to {total}; at least one must be > 0")
        return ops.weighted_sum(x.models, [wi / total for wi in w])
