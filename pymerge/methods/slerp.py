"""SLERP: spherical interpolation between the base model (t = 0) and one other model (t = 1), per tensor.

    cos Ω = <a, b> / (|a| |b|),  θ = sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b

with a = base, b = the model, each tensor flattened; nearly colinear tensors (|cos Ω| > 0.9995) are linearly
interpolated, as in mergekit. `t` may vary per tensor (filters) and across layers (`t: [0, 0.5, 1]`).
The angle needs one pass (a dot product and two norms, fp64 accumulation); the result is one fused
weighted sum.
"""
import math

import torch

from pymerge import ops
from pymerge.methods.base import ConfigError, MergeMethod, Param
from pymerge.methods.registry import register

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: float):
    """(c_a, c_b) with slerp(t; a, b) = c_a a + c_b b."""
    af, bf = a.reshape(-1).float(), b.reshape(-1).float()
    na = math.sqrt(float(torch.sum(af * af, dtype=torch.float64)))
    nb = math.sqrt(float(torch.sum(bf * bf, dtype=torch.float64)))
    dot = float(torch.sum(af * bf, dtype=torch.float64))
    # mergekit normalises a vector only when its norm exceeds eps
    dot /= (na if na > NORM_EPS else 1.0) * (nb if nb > NORM_EPS else 1.0)
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(theta)
    return math.sin(theta - theta * t) / s, math.sin(theta * t) / s


@register
class Slerp(MergeMethod):
    name = "slerp"
    description = "spherical interpolation from the base model (t=0) to one other model (t=1)"
    needs_base = True
    params = (Param("t", float, help="interpolation factor (required); a list varies it across layers"),
              Param("weight", float, 1.0, scope="model", help="accepted for mergekit configs; no effect (as there)"),)

    def validate(self, global_params, model_params):
        if len(model_params) != 1:
            raise ConfigError(f"slerp interpolates between base_model and exactly one other model, got "
                              f"{len(model_params)} models besides the base")

    def merge_tensor(self, x):
        ca, cb = slerp_coefficients(x.base, x.models[0], x.params["t"])
        return ops.weighted_sum([x.base, x.models[0]], [ca, cb])
