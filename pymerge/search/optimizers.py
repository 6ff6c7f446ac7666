"""Optimisers over the coefficient box [lo, hi]^M behind nevergrad's ask / tell interface.

`make_optimizer("gp-ei" | "gp-ucb" | "grid" | any nevergrad name ("NGOpt", "CMA", "DE", "RandomSearch", ...), ...)`.
Our own optimisers are nevergrad optimisers registered by name (PymergeGPEI, PymergeGPUCB, PymergeGrid), so
they are chosen exactly like nevergrad's.

Seeding: the parametrization's random state is seeded, and our optimisers draw from a generator keyed by
(seed, ask number), so an ask depends only on the seed and the history told so far: replaying a trial log (ask,
then tell the logged loss, in order) brings any of them back to the same state bit for bit.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import nevergrad as ng
from nevergrad.optimization import base
from scipy.optimize import minimize

from pymerge.search import gp

GP_DEFAULTS = {"n_init": 10, "beta": 2.576 ** 2, "xi": 0.0, "candidates": 2048, "restarts": 4}
ALIASES = {"gp-ei": "PymergeGPEI", "gp-ucb": "PymergeGPUCB", "grid": "PymergeGrid", "random": "RandomSearch",
           "cma": "CMA", "de": "DE", "ngopt": "NGOpt"}


class _Box:
    """Bounds of the parametrization, and the map to / from the unit cube the GP works in."""

    def __init__(self, parametrization):
        lo, hi = getattr(parametrization, "bounds", (None, None))
        self.lo = None if lo is None else np.asarray(lo, dtype=np.float64).ravel()
        self.hi = None if hi is None else np.asarray(hi, dtype=np.float64).ravel()

    def check(self):
        if self.lo is None or self.hi is None:
            raise ValueError("this optimiser needs a bounded parametrization (ng.p.Array(lower=..., upper=...))")

    def to_unit(self, value) -> np.ndarray:
        return (np.asarray(value, dtype=np.float64).ravel() - self.lo) / (self.hi - self.lo)

    def from_unit(self, u) -> np.ndarray:
        return np.clip(self.lo + np.asarray(u) * (self.hi - self.lo), self.lo, self.hi)


class _SeededOptimizer(base.Optimizer):
    def __init__(self, parametrization, budget=None, num_workers=1):
        super().__init__(parametrization, budget=budget, num_workers=num_workers)
        self._seed = int(self._rng.randint(2 ** 31 - 1))  # from the parametrization's (seeded) random state
        self._box = _Box(self.parametrization)
        self._told_x: List[np.ndarray] = []
        self._told_y: List[float] = []  # -loss: the GP maximises
        self._pending: Dict[str, np.ndarray] = {}

    def _generator(self) -> np.random.Generator:
        return np.random.default_rng([self._seed, self.num_ask])

    def _child(self, unit_point) -> "ng.p.Parameter":
        cand = self.parametrization.spawn_child(new_value=self._box.from_unit(unit_point))
        self._pending[cand.uid] = np.asarray(unit_point, dtype=np.float64)
        return cand

    def _internal_tell_candidate(self, candidate, loss) -> None:
        self._pending.pop(candidate.uid, None)
        self._told_x.append(self._box.to_unit(candidate.value))
        self._told_y.append(-float(loss))

    def _internal_tell_not_asked(self, candidate, loss) -> None:
        self._internal_tell_candidate(candidate, loss)

    def _internal_provide_recommendation(self):
        return None  # nevergrad's archive keeps the best told point


class _GPBayesOpt(_SeededOptimizer):
    """GP Bayesian optimisation: n_init uniform random points, then the maximiser of EI or UCB.

    The acquisition is maximised over `candidates` uniform points, the best `restarts` of them polished by
    L-BFGS-B. Points asked but not yet told (batch asks, workers > 1) count as observed at the GP's mean
    ("kriging believer"), so a batch spreads out.
    """

    def __init__(self, parametrization, budget=None, num_workers=1, acquisition="ei", n_init=10,
                 beta=GP_DEFAULTS["beta"], xi=GP_DEFAULTS["xi"], candidates=GP_DEFAULTS["candidates"],
                 restarts=GP_DEFAULTS["restarts"]):
        super().__init__(parametrization, budget=budget, num_workers=num_workers)
        if acquisition not in ("ei", "ucb"):
            raise ValueError(f"acquisition: expected 'ei' or 'ucb', got {acquisition!r}")
        if int(n_init) < 1:
            raise ValueError(f"n_init: expected at least 1 random point, got {n_init!r}")
        if float(beta) < 0 or float(xi) < 0:
            raise ValueError(f"beta and xi must be >= 0, got beta={beta!r}, xi={xi!r}")
        self.acquisition, self.n_init = acquisition, int(n_init)
        self.beta, self.xi = float(beta), float(xi)
        self.candidates, self.restarts = int(candidates), int(restarts)

    def _internal_ask_candidate(self):
        self._box.check()
        rng = self._generator()
        d = self.dimension
        if self.num_ask < self.n_init or not self._told_y:
            return self._child(rng.random(d))
        x = np.array(self._told_x)
        y = np.array(self._told_y)
        if self._pending:  # kriging believer: pending points at the mean of a GP fitted to the real data
            model = gp.GaussianProcess.fit(x, y)
            pend = np.array(list(self._pending.values()))
            x = np.vstack([x, pend])
            y = np.concatenate([y, model.predict(pend)[0]])
        model = gp.GaussianProcess.fit(x, y)
        best = float(np.max(self._told_y))

        def acq(points):
            mu, sigma = model.predict(np.atleast_2d(points))
            if self.acquisition == "ei":
                return gp.expected_improvement(mu, sigma, best, self.xi)  # ξ in objective units
            return gp.upper_confidence_bound(mu, sigma, self.beta)

        pool = rng.random((self.candidates, d))
        values = acq(pool)
        order = np.argsort(-values, kind="stable")[:self.restarts]
        top_x, top_v = pool[order[0]], values[order[0]]
        for start in pool[order]:
            res = minimize(lambda u: -float(acq(u)[0]), start, method="L-BFGS-B", bounds=[(0.0, 1.0)] * d,
                           options={"maxiter": 50})
            if np.all(np.isfinite(res.x)) and -res.fun > top_v:
                top_x, top_v = np.clip(res.x, 0.0, 1.0), -res.fun
        return self._child(top_x)


class _Grid(_SeededOptimizer):
    """The points of a regular grid (`steps` values per coordinate, ends included), in lexicographic order."""

    def __init__(self, parametrization, budget=None, num_workers=1, steps: Optional[int] = None):
        super().__init__(parametrization, budget=budget, num_workers=num_workers)
        d = self.dimension
        if steps is None:
            steps = max(2, int(np.floor((budget or 11 ** d) ** (1.0 / d) + 1e-9)))
        self.steps = int(steps)

    def _internal_ask_candidate(self):
        self._box.check()
        k, d = self.num_ask % self.steps ** self.dimension, self.dimension
        digits = [(k // self.steps ** (d - 1 - j)) % self.steps for j in range(d)]
        return self._child(np.array(digits, dtype=np.float64) / max(1, self.steps - 1))


class GPBayesOpt(base.ConfiguredOptimizer):
    """Configured GP Bayesian optimisation (acquisition "ei" | "ucb", n_init, beta, xi, candidates, restarts)."""

    def __init__(self, *, acquisition="ei", n_init=10, beta=GP_DEFAULTS["beta"], xi=GP_DEFAULTS["xi"],
                 candidates=GP_DEFAULTS["candidates"], restarts=GP_DEFAULTS["restarts"]):
        super().__init__(_GPBayesOpt, locals())


class Grid(base.ConfiguredOptimizer):
    def __init__(self, *, steps: Optional[int] = None):
        super().__init__(_Grid, locals())


def _register(name, configured):
    if name not in ng.optimizers.registry:
        configured.set_name(name, register=True)


_register("PymergeGPEI", GPBayesOpt(acquisition="ei"))
_register("PymergeGPUCB", GPBayesOpt(acquisition="ucb"))
_register("PymergeGrid", Grid())


def resolve_name(name: str) -> str:
    """The nevergrad registry name of an optimiser name (our aliases, or a registry name in any case)."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer: expected a name, got {type(name).__name__}")
    key = ALIASES.get(name.lower(), name)
    if key in ng.optimizers.registry:
        return key
    folded = {k.lower(): k for k in ng.optimizers.registry}
    if key.lower() in folded:
        return folded[key.lower()]
    raise ValueError(f"optimizer: unknown {name!r}; use one of {sorted(ALIASES)} or a nevergrad optimiser name "
                     f"(e.g. NGOpt, CMA, DE, RandomSearch, TwoPointsDE, PSO)")


def make_optimizer(name: str, dimension: int, *, lo: float = 0.0, hi: float = 1.0, budget: Optional[int] = None,
                   seed: int = 0, workers: int = 1, options: Optional[dict] = None) -> base.Optimizer:
    """A seeded nevergrad optimiser over [lo, hi]^dimension. options configure ours (n_init, beta, xi, steps ...)
    or are passed to a nevergrad ConfiguredOptimizer family by name (e.g. {"popsize": 8} is not; use its
    registered variants instead)."""
    if not isinstance(dimension, int) or dimension < 1:
        raise ValueError(f"dimension: expected a positive integer, got {dimension!r}")
    if not (float(lo) < float(hi)):
        raise ValueError(f"bounds: expected lo < hi, got [{lo}, {hi}]")
    key = resolve_name(name)
    options = dict(options or {})
    if key in ("PymergeGPEI", "PymergeGPUCB"):
        configured = GPBayesOpt(acquisition="ei" if key == "PymergeGPEI" else "ucb", **options)
    elif key == "PymergeGrid":
        configured = Grid(**options)
    else:
        if options:
            raise ValueError(f"optimizer {key}: options {sorted(options)} apply only to gp-ei / gp-ucb / grid")
        configured = ng.optimizers.registry[key]
    param = ng.p.Array(shape=(dimension,), lower=float(lo), upper=float(hi))
    param.random_state = np.random.RandomState(seed)
    return configured(parametrization=param, budget=budget, num_workers=workers)


def phase(name: str, trial: int, options: Optional[dict] = None) -> str:
    """'random' for the initial random points of the GP (and for random search), else 'search'."""
    key = resolve_name(name)
    if key in ("PymergeGPEI", "PymergeGPUCB"):
        return "random" if trial < int((options or {}).get("n_init", GP_DEFAULTS["n_init"])) else "search"
    return "random" if key == "RandomSearch" else "search"


def values(candidate) -> List[float]:
    return [float(v) for v in np.asarray(candidate.value, dtype=np.float64).ravel()]


__all__: Sequence[str] = ("make_optimizer", "resolve_name", "phase", "GPBayesOpt", "Grid", "values")
