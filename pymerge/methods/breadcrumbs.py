"""Model Breadcrumbs (Davari & Belilovsky 2023): per tensor, drop the largest `gamma` share of task-vector
magnitudes (outliers) and the smallest ones, keeping `density` of the entries; then a weighted sum
(`breadcrumbs`) or sign consensus (`breadcrumbs_ties`). mergekit's semantics and defaults: kept count
int(d·n) (`trim_count: floor`). Where int(γ·n) is 0 no outlier is dropped (mergekit 0.1.5 keeps nothing then:
its slice `[n_bot:-0]` is empty).
"""
from pymerge.methods.base import MergeMethod, Param, in_range
from pymerge.methods.registry import register
from pymerge.methods.sparsify import apply_rescale, combine, family_params, float_task_vectors, outlier_mask


def _params(consensus):
    return family_params(normalize=False, rescale="none", trim_count="floor", consensus=consensus) + (
        Param("gamma", float, 0.01, scope="model", check=in_range(0.0, 1.0), help="share of largest entries dropped"),
    )


class _Breadcrumbs(MergeMethod):
    needs_base = True

    def merge_tensor(self, x):
        p = x.params
        tvs = [apply_rescale(tv, tv * outlier_mask(tv, d, g, p["trim_count"]), p["rescale"], keep_prob=d)
               for tv, d, g in zip(float_task_vectors(x), x.per_model("density"), x.per_model("gamma"))]
        return combine(x.base, tvs, x.per_model("weight"), p.get("consensus"), p["normalize"], p["lambda"])


@register
class Breadcrumbs(_Breadcrumbs):
    name = "breadcrumbs"
    description = "Model Breadcrumbs: drop outliers and small entries of each task vector, weighted sum"
    params = _params(None)


@register
class BreadcrumbsTies(_Breadcrumbs):
    name = "breadcrumbs_ties"
    description = "Model Breadcrumbs with TIES sign consensus"
    params = _params("sum")
