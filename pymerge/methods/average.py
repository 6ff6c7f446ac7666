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


@register
class Linear(Average):
    """mergekit's `linear`: the weighted average, or with `normalize: false` the plain weighted sum Σ w_i θ_i."""

    name = "linear"
    description = "mergekit's linear: weighted average (normalize: true) or weighted sum"
    params = (Param("weight", float, 1.0, scope="model", help="weight w_i"),
              Param("normalize", bool, True, help="divide by Σ w_i"))

    def merge_tensor(self, x):
        if x.params["normalize"]:
            return super().merge_tensor(x)
        return ops.weighted_sum(x.models, x.per_model("weight"))
