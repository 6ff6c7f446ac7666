"""RegMean (Jin et al. 2022): each linear layer's weight and bias X = [W | b] solve
min_X Σ_m ||Z_m Xᵀ - Z_m X_mᵀ||², i.e. X = (Σ_m X_m G̃_m)(Σ_m G̃_m)^{-1}, G̃ = α G + (1 - α) diag(G),
from each model's input Gram G_m = ZᵀZ / N (`pymerge stats --kind gram`), by a Cholesky solve.

Parameters without layer statistics (embeddings, LayerNorm, heads kept per task are untouched) follow `others`:
the weighted average, or Fisher merging with each model's diagonal Fisher (`fisher: FILE`).
"""
from pymerge import ops
from pymerge.methods.base import REQUIRED, ConfigError, MergeMethod, Param, in_range
from pymerge.methods.layers import SideInput
from pymerge.methods.registry import register

DTYPES = ("float64", "float32")


def merge_others(x, policy: str):
    """Average or diagonal-Fisher merge of a tensor outside the layers with statistics (closed forms)."""
    w = x.per_model("weight")
    if policy == "fisher":
        return ops.fisher_merge(x.models, x.aux["fisher"], w, fallback="average")
    return ops.weighted_sum(x.models, [wi / sum(w) for wi in w])


def check_others(params, model_params, method: str) -> None:
    if params["others"] == "fisher":
        missing = [i for i, m in enumerate(model_params) if m.get("fisher") is None]
        if missing:
            raise ConfigError(f"{method}: others: fisher needs a `fisher` file for every model; models {missing} "
                              "have none")
    if sum(m["weight"] for m in model_params if not hasattr(m["weight"], "rules")) <= 0:
        raise ConfigError(f"{method}: the models' weights must have a positive sum")


@register
class RegMean(MergeMethod):
    name = "regmean"
    description = "RegMean: per linear layer, the least-squares fit to every model's outputs (Gram statistics)"
    params = (
        Param("stats", "file", REQUIRED, scope="model", help="the model's Gram statistics (pymerge stats --kind gram)"),
        Param("weight", float, 1.0, scope="model", check=in_range(0.0), help="per-model weight λ_m of its Gram"),
        Param("alpha", float, 0.9, check=in_range(0.0, 1.0), help="scale of the Grams' off-diagonal entries"),
        Param("ridge", float, 0.0, check=in_range(0.0),
              help="adds ridge · mean(diag) to Σ G̃ (layers whose inputs never span some direction)"),
        Param("others", str, "average", choices=("average", "fisher"),
              help="parameters without layer statistics: weighted average or diagonal Fisher merging"),
        Param("fisher", "file", None, scope="model", help="the model's diagonal Fisher (others: fisher)"),
        Param("solve_dtype", str, "float64", choices=DTYPES, help="precision of the Cholesky solve"),
    )

    def side_inputs(self, params, model_params=()):
        out = (SideInput("stats", "gram"),)
        if params["others"] == "fisher":
            out += (SideInput("fisher", "fisher"),)
        return out

    def validate(self, global_params, model_params):
        check_others(global_params, model_params, self.name)

    def merge_layer(self, x):
        import torch

        from pymerge.solvers import regmean_solve

        dtype = getattr(torch, x.params["solve_dtype"])
        merged = regmean_solve(x.thetas(dtype), [s["gram"] for s in x.stats["stats"]], x.params["alpha"],
                               weights=x.per_model("weight"), ridge=x.params["ridge"], dtype=dtype,
                               label=x.describe(), model_labels=x.stats_labels("stats"))
        return x.split(merged)

    def merge_tensor(self, x):
        return merge_others(x, x.params["others"])
