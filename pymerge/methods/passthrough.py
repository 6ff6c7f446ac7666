"""Passthrough: one model's tensors unchanged (times an optional per-tensor `scale`), as in mergekit; with
`slices` / `layer_range` in the config it stacks layers of one or more models (frankenmerges)."""
from pymerge import ops
from pymerge.methods.base import ConfigError, MergeMethod, Param
from pymerge.methods.registry import register


@register
class Passthrough(MergeMethod):
    name = "passthrough"
    elementwise = True
    description = "copy one model (or stacked slices of models) unchanged, optionally scaled"
    params = (Param("scale", float, 1.0, scope="model", help="factor applied to the tensor"),)

    def validate(self, global_params, model_params):
        if len(model_params) != 1:
            raise ConfigError(f"passthrough takes exactly one model (or one source per slice), got "
                              f"{len(model_params)}")

    def merge_tensor(self, x):
        scale = x.model_params[0]["scale"]
        if scale == 1.0:
            return x.models[0]
        return ops.weighted_sum([x.models[0]], [scale])
