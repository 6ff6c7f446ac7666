"""Fisher merging (Matena & Raffel eq. 4): θ = Σ λ_i F_i θ_i / Σ λ_i F_i, per parameter.

Where every Fisher is ~0 the op falls back to the target (first) model's value, or to the plain λ-weighted
average (`fallback: average`). `normalize: true` divides each model's Fisher by its global L2 norm (over all
tensors of its Fisher file), as in the authors' code, so models whose Fishers differ in scale count equally;
it is folded into the weights (λ_i / ||F_i||), so it costs one extra read of the Fisher files and no extra op.
"""
import math

from pymerge import ops
from pymerge.io.chunks import row_chunks
from pymerge.methods.base import ConfigError, MergeMethod, Param, in_range
from pymerge.methods.registry import register


@register
class FisherMerge(MergeMethod):
    name = "fisher"
    elementwise = True
    description = "Fisher-weighted average of the models"
    params = (
        Param("weight", float, 1.0, scope="model", check=in_range(0.0), help="per-model coefficient λ_i"),
        Param("fisher", "file", scope="model", help="the model's Fisher file (pymerge fisher)"),
        Param("fallback", str, "target", choices=("target", "average"), help="where all Fishers are ~0"),
        Param("eps", float, 1e-8, check=in_range(0.0), help="Fisher mass below which the fallback is used"),
        Param("normalize", bool, False, help="divide each Fisher by its global L2 norm"),
    )

    def prepare(self, inputs):
        if not inputs.params["normalize"]:
            return {}
        norms = []
        for src in inputs.aux_sources["fisher"]:
            sq = 0.0
            for name in src.keys():
                for rows in row_chunks(src.shape(name), 2**26):  # bounded memory for huge tensors
                    sq += float(src.read(name, rows).double().square().sum())
            norm = math.sqrt(sq)
            if norm == 0.0:
                raise ConfigError(f"{src.label}: Fisher is zero everywhere, cannot normalize it")
            norms.append(norm)
        return {"fisher_norms": norms}

    def merge_tensor(self, x):
        w = x.per_model("weight")
        norms = x.state.get("fisher_norms")
        if norms is not None:
            w = [wi / n for wi, n in zip(w, norms)]
        return ops.fisher_merge(x.models, x.aux["fisher"], w, eps=x.params["eps"], fallback=x.params["fallback"])
