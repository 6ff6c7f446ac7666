"""DELLA (Deep et al. 2024, MagPrune): drop task-vector entries at random with a keep probability that grows
with their magnitude rank in the row (density ± epsilon), rescale, then merge with sign consensus (`della`)
or as a weighted sum (`della_linear`). mergekit's semantics and defaults; `rescale: true` keeps the L1 norm
of each task vector (mergekit), `rescale: inverse` divides each survivor by its keep probability (the paper).
"""
from pymerge.methods.base import ConfigError, Param, in_range
from pymerge.methods.sparsify import (SparsifiedTaskVectors, apply_rescale, della_keep_probabilities, della_mask,
                                      random_drop_params, register_variants)


def _della_params(normalize, consensus):
    return random_drop_params(normalize=normalize, consensus=consensus, extra=(
        Param("epsilon", float, 0.15, scope="model", check=in_range(0.0),
              help="keep probabilities span density ± epsilon over the magnitude ranks"),))


def _check_epsilon(method: str, where: str, d: float, eps: float) -> None:
    if d < 1 and (d + eps >= 1 or d - eps <= 0):
        raise ConfigError(f"{method}: {where}: epsilon {eps} must keep density ± epsilon inside (0, 1) "
                          f"(density {d})")


class _Della(SparsifiedTaskVectors):
    def validate(self, global_params, model_params):
        """Before any tensor is read, where density and epsilon are plain numbers (else per tensor)."""
        for i, mp in enumerate(model_params):
            d, eps = mp["density"], mp["epsilon"]
            if isinstance(d, float) and isinstance(eps, float):
                _check_epsilon(self.name, f"model {i}", d, eps)

    def sparsify(self, x, i, tv):
        p, d, eps = x.params, x.model_params[i]["density"], x.model_params[i]["epsilon"]
        _check_epsilon(self.name, f"tensor {x.name!r}, model {i}", d, eps)
        masked = tv * della_mask(tv, d, eps, p["seed"], i, x.name)
        if p["rescale"] == "inverse" and d < 1:
            return masked / della_keep_probabilities(tv, d, eps)
        return apply_rescale(tv, masked, p["rescale"])


Della, DellaLinear = register_variants(
    _Della, __name__,
    Della=("della", "DELLA: magnitude-ranked random drop, rescale, sign consensus (mergekit's della)",
           _della_params(normalize=True, consensus="sum")),
    DellaLinear=("della_linear", "DELLA without sign consensus: weighted sum of the pruned task vectors",
                 _della_params(normalize=False, consensus=None)))
