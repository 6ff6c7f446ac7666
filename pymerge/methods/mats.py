"""MaTS (Tam et al. 2024): merging as the linear system Σ_m C_m θ = Σ_m C_m θ_m, solved by conjugate gradient.

`objective` chooses C_m (see pymerge.solvers.objectives): average (C = I), fisher (diagonal Fisher), regmean
(input Grams, `alpha` scales their off-diagonals; MaTS' default 1 keeps them) or kfac (block-diagonal Fisher
G_out ⊗ A, MaTS eq. 13-14). CG starts from `init`: task arithmetic θ_pre + λ Σ τ_m (λ = 0.3, the paper's
recipe), the average, the pretrained model, or any merged model (`init_model`, e.g. a DF-Merge result), and runs
at most `iterations` steps (stopping early at relative residual `tolerance`). Parameters outside the layers with
statistics (regmean / kfac objectives) use the `others` objective, average or diagonal Fisher.

Each tensor's (layer's) residual and objective per iteration are kept in `method.history` for inspection.
"""
from __future__ import annotations

from typing import Dict, List

from pymerge.methods.base import ConfigError, MergeMethod, Param, in_range
from pymerge.methods.layers import SideInput
from pymerge.methods.regmean import DTYPES, check_others
from pymerge.methods.registry import register

OBJECTIVES = ("regmean", "kfac", "fisher", "average")
INITS = ("task_arithmetic", "average", "pretrained", "model")


@register
class MaTS(MergeMethod):
    name = "mats"
    needs_base = True  # by default (init: task_arithmetic); not for init average / model, see base_needed
    description = "MaTS: conjugate gradient on a merging objective (RegMean, K-FAC, diagonal Fisher, average)"
    params = (
        Param("objective", str, "regmean", choices=OBJECTIVES, help="the matrices C_m of Σ C_m θ = Σ C_m θ_m"),
        Param("stats", "file", None, scope="model",
              help="the model's statistics: gram (objective regmean), kfac, or fisher (objective fisher)"),
        Param("fisher", "file", None, scope="model", help="the model's diagonal Fisher (objective fisher / others)"),
        Param("weight", float, 1.0, scope="model", check=in_range(0.0), help="per-model weight λ_m of C_m"),
        Param("init", str, "task_arithmetic", choices=INITS, help="where conjugate gradient starts"),
        Param("lambda", float, 0.3, help="task-arithmetic scale of the initialisation"),
        Param("init_model", "file", None, help="init: model: the merged model (checkpoint or state dict) to start from"),
        Param("iterations", int, 100, check=in_range(0), help="most conjugate-gradient steps per layer"),
        Param("tolerance", float, 1e-6, check=in_range(0.0), help="stop at this relative residual ||r|| / ||b||"),
        Param("alpha", float, 1.0, check=in_range(0.0, 1.0), help="regmean objective: off-diagonal scale of the Grams"),
        Param("others", str, "average", choices=("average", "fisher"),
              help="objective of parameters without layer statistics"),
        Param("solve_dtype", str, "float32", choices=DTYPES, help="precision of the solve"),
        Param("device", str, "cpu", help="torch device of the solve (e.g. cuda)"),
    )

    def __init__(self):
        self.history: Dict[str, Dict[str, List[float]]] = {}

    def side_inputs(self, params, model_params=()):
        obj = params["objective"]
        out = ()
        if obj in ("regmean", "kfac"):
            out += (SideInput("stats", "gram" if obj == "regmean" else "kfac"),)
        if obj == "fisher" and model_params and all(m.get("fisher") is None for m in model_params):
            out += (SideInput("stats", "fisher"),)  # the Fisher given as `stats: FILE` of kind fisher
        elif obj == "fisher" or params["others"] == "fisher":
            out += (SideInput("fisher", "fisher"),)
        if params["init"] == "model":
            out += (SideInput("init_model", "model", scope="global"),)
        return out

    def validate(self, global_params, model_params):
        for key in ("objective", "init", "others", "solve_dtype", "device", "iterations"):
            if hasattr(global_params[key], "rules"):
                raise ConfigError(f"mats: {key} must be one value, not per tensor")
        obj = global_params["objective"]
        if obj in ("regmean", "kfac"):
            missing = [i for i, m in enumerate(model_params) if m.get("stats") is None]
            if missing:
                raise ConfigError(f"mats: objective {obj} needs each model's `stats` file (pymerge stats --kind "
                                  f"{'gram' if obj == 'regmean' else 'kfac'}); models {missing} have none")
        if obj == "fisher":
            stats_only = all(m.get("fisher") is None for m in model_params)
            missing = [i for i, m in enumerate(model_params) if m.get("stats" if stats_only else "fisher") is None]
            if missing:
                raise ConfigError(f"mats: objective fisher needs each model's `fisher` (or `stats`) file; models "
                                  f"{missing} have none")
        else:
            check_others(global_params, model_params, self.name)
        if global_params["init"] == "model" and global_params.get("init_model") is None:
            raise ConfigError("mats: init: model needs `init_model` (a merged checkpoint to start from)")

    def base_needed(self, global_params):
        """Only the initialisation can use the pretrained model: the objectives never do."""
        init = global_params["init"]
        if init in ("task_arithmetic", "pretrained"):
            return f"starts from the pretrained model with init: {init} (init: average or init: model need none)"
        return None

    # ------------------------------------------------------------------------------------------
    def _init(self, x, models, base, init_tensor, dtype):
        init = x.params["init"]
        if init == "model":
            return init_tensor.to(dtype)
        if init == "pretrained":
            return base.to(dtype)
        if init == "average":
            return sum(models) / len(models)
        lam = x.params["lambda"]
        return base.to(dtype) + lam * sum(m - base.to(dtype) for m in models)

    def _solve(self, name, objective, x0, p):
        from pymerge.solvers import GramObjective, conjugate_gradient

        if isinstance(objective, GramObjective):  # same CG steps, elementwise matvec (see in_eigenbasis)
            rotated = objective.in_eigenbasis()
            res = conjugate_gradient(rotated.matvec, rotated.b, rotated.to_basis(x0), iterations=p["iterations"],
                                     tolerance=p["tolerance"], constant=rotated.constant)
            x = rotated.from_basis(res.x)
        else:
            res = conjugate_gradient(objective.matvec, objective.b, x0, iterations=p["iterations"],
                                     tolerance=p["tolerance"], constant=objective.constant)
            x = res.x
        self.history[name] = {"residuals": res.residuals[:, 0].tolist(), "objectives": res.objectives[:, 0].tolist()}
        return x[0]

    def merge_layer(self, x):
        import torch

        from pymerge.solvers import GramObjective, KFACObjective, scale_off_diagonal
        from pymerge.solvers.closed_form import check_spd_factors

        dtype, dev = getattr(torch, x.params["solve_dtype"]), torch.device(x.params["device"])
        thetas = [t.to(dev) for t in x.thetas(dtype)]
        base = x.base_theta(dtype).to(dev) if x.base_weight is not None else None
        init_t = None
        if "init_model" in x.extra:
            init_t = x.augmented(*x.extra["init_model"], dtype=dtype).to(dev)
        x0 = self._init(x, thetas, base, init_t, dtype)
        stats = x.stats["stats"]
        labels = x.stats_labels("stats")
        w = x.per_model("weight")
        for s, lab in zip(stats, labels):
            for key, t in s.items():
                check_spd_factors(t, f"{x.describe()} ({lab})", f"{key} matrix")
        if x.params["objective"] == "regmean":
            grams = [scale_off_diagonal(s["gram"].to(dev, dtype), x.params["alpha"]).unsqueeze(0) for s in stats]
            obj = GramObjective([t.unsqueeze(0) for t in thetas], grams, w, dtype=dtype)
        else:
            obj = KFACObjective([t.unsqueeze(0) for t in thetas], [s["kfac_in"].to(dev, dtype).unsqueeze(0) for s in stats],
                                [s["kfac_out"].to(dev, dtype).unsqueeze(0) for s in stats], w, dtype=dtype)
        out = self._solve(x.name, obj, x0.unsqueeze(0), x.params)
        return x.split(out.cpu())

    def merge_tensor(self, x):
        import torch

        from pymerge.solvers import AverageObjective, DiagonalFisherObjective

        dtype, dev = getattr(torch, x.params["solve_dtype"]), torch.device(x.params["device"])
        shape = x.models[0].shape
        flat = [m.to(dev, dtype).reshape(1, -1) for m in x.models]
        base = x.base.to(dev, dtype).reshape(1, -1) if x.base is not None else None
        init_t = x.aux["init_model"][0].to(dev, dtype).reshape(1, -1) if "init_model" in x.aux else None
        x0 = self._init(x, flat, base, init_t, dtype)
        w = x.per_model("weight")
        use_fisher = x.params["objective"] == "fisher" or (
            x.params["objective"] in ("regmean", "kfac") and x.params["others"] == "fisher")
        if use_fisher:
            fishers = x.aux["fisher"] if "fisher" in x.aux else x.aux["stats"]
            obj = DiagonalFisherObjective(flat, [f.to(dev).reshape(1, -1) for f in fishers], w, dtype=dtype)
        else:
            obj = AverageObjective(flat, w, dtype=dtype)
        return self._solve(x.name, obj, x0, x.params).reshape(shape).cpu().to(x.models[0].dtype)
