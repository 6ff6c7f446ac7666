"""DELLA (Deep et al. 2024, MagPrune): drop task-vector entries at random with a keep probability that grows
with their magnitude rank in the row (density ± epsilon), rescale, then merge with sign consensus (`della`)
or as a weighted sum (`della_linear`). mergekit's semantics and defaults; `rescale: true` keeps the L1 norm
of each task vector (mergekit), `rescale: inverse` divides each survivor by its keep probability (the paper).
"""
from pymerge.methods.base import ConfigError, MergeMethod, Param, in_range
from pymerge.methods.registry import register
from pymerge.methods.sparsify import (apply_rescale, combine, della_keep_probabilities, della_mask, family_params,
                                      float_task_vectors)


def _della_params(normalize, consensus):
    return family_params(normalize=normalize, rescale="l1", consensus=consensus) + (
        Param("epsilon", float, 0.15, scope="model", check=in_range(0.0),
              help="keep probabilities span density ± epsilon over the magnitude ranks"),
        Param("seed", int, 0, help="random seed"),
    )


def _check_epsilon(method: str, where: str, d: float, eps: float) -> None:
    if d < 1 and (d + eps >= 1 or d - eps <= 0):
        raise ConfigError(f"{method}: {where}: epsilon {eps} must keep density ± epsilon inside (0, 1) "
                          f"(density {d})")


class _Della(MergeMethod):
    needs_base = True

    def validate(self, global_params, model_params):
        """Before any tensor is read, where density and epsilon are plain numbers (else per tensor)."""
        for i, mp in enumerate(model_params):
            d, eps = mp["density"], mp["epsilon"]
            if isinstance(d, float) and isinstance(eps, float):
                _check_epsilon(self.name, f"model {i}", d, eps)

    def merge_tensor(self, x):
        p = x.params
        tvs = []
        for i, (tv, d, eps) in enumerate(zip(float_task_vectors(x), x.per_model("density"), x.per_model("epsilon"))):
            _check_epsilon(self.name, f"tensor {x.name!r}, model {i}", d, eps)
            keep = della_mask(tv, d, eps, p["seed"], i, x.name)
            masked = tv * keep
            if p["rescale"] == "inverse" and d < 1:
                masked = masked / della_keep_probabilities(tv, d, eps)
            else:
                masked = apply_rescale(tv, masked, p["rescale"])
            tvs.append(masked)
        return combine(x.base, tvs, x.per_model("weight"), p.get("consensus"), p["normalize"], p["lambda"])


@register
class Della(_Della):
    name = "della"
    description = "DELLA: magnitude-ranked random drop, rescale, sign consensus (mergekit's della)"
    params = _della_params(normalize=True, consensus="sum")


@register
class DellaLinear(_Della):
    name = "della_linear"
    description = "DELLA without sign consensus: weighted sum of the pruned task vectors"
    params = _della_params(normalize=False, consensus=None)
