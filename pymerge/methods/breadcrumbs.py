"""Model Breadcrumbs (Davari & Belilovsky 2023): per tensor, drop the largest `gamma` share of task-vector
magnitudes (outliers) and the smallest ones, keeping `density` of the entries; then a weighted sum
(`breadcrumbs`) or sign consensus (`breadcrumbs_ties`). mergekit's semantics and defaults: kept count
int(d·n) (`trim_count: floor`). Where int(γ·n) is 0 no outlier is dropped (mergekit 0.1.5 keeps nothing then:
its slice `[n_bot:-0]` is empty).
"""
from pymerge.methods.base import Param, in_range
from pymerge.methods.sparsify import (SparsifiedTaskVectors, apply_rescale, family_params, outlier_mask,
                                      register_variants)


def _params(consensus):
    return family_params(normalize=False, rescale="none", trim_count="floor", consensus=consensus) + (
        Param("gamma", float, 0.01, scope="model", check=in_range(0.0, 1.0), help="share of largest entries dropped"),
    )


class _Breadcrumbs(SparsifiedTaskVectors):
    def sparsify(self, x, i, tv):
        d, g = x.model_params[i]["density"], x.model_params[i]["gamma"]
        return apply_rescale(tv, tv * outlier_mask(tv, d, g, x.params["trim_count"]), x.params["rescale"],
                             keep_prob=d)


Breadcrumbs, BreadcrumbsTies = register_variants(
    _Breadcrumbs, __name__,
    Breadcrumbs=("breadcrumbs", "Model Breadcrumbs: drop outliers and small entries of each task vector, "
                 "weighted sum", _params(None)),
    BreadcrumbsTies=("breadcrumbs_ties", "Model Breadcrumbs with TIES sign consensus", _params("sum")))
