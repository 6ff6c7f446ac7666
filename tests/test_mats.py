"""MaTS through the engine: each objective against its closed form or a dense solve, each initialisation, the
per-iteration history, and the K-FAC objective against the explicit Kronecker-product system."""
import pytest
import torch

from pymerge import ops
from pymerge.engine import merge_state_dicts
from pymerge.methods import ConfigError
from pymerge.solvers.closed_form import StatisticsError
from test_regmean import BASE, GRAMS, LAYERS, M, MODELS, OTHER, SHAPES, augmented, cfg, fishers, layer_stats, \
    regmean_reference


def mats(stats=GRAMS, params=None, **kw):
    return merge_state_dicts(cfg(stats, method="mats", params=params, base=True, **kw))


def test_regmean_objective_with_alpha_reaches_regmean_closed_form():
    res = mats(params={"alpha": 0.9, "iterations": 200, "tolerance": 1e-7, "solve_dtype": "float64"})
    out, history = res.state_dict, res.plan.config.method.history
    for m in LAYERS:
        for name, ref in regmean_reference(m, 0.9).items():
            torch.testing.assert_close(out[name].double(), ref, rtol=1e-4, atol=1e-5)
        assert history[m]["residuals"][-1] <= 1e-7
        obj = history[m]["objectives"]
        assert all(b <= a + 1e-9 for a, b in zip(obj, obj[1:]))  # CG decreases the merging loss
    for name in OTHER:  # average objective: the mean, in one step
        torch.testing.assert_close(out[name], sum(st[name] for st in MODELS) / M)
        assert len(res.plan.config.method.history[name]["residuals"]) == 2


def test_regmean_objective_without_scaling_beats_the_closed_forms_loss():
    """MaTS' claim (section 6.2): CG on the unscaled RegMean objective reaches a lower objective than RegMean's
    α-scaled closed form. Checked with the loss computed here from the Grams."""
    res = mats(params={"iterations": 100, "tolerance": 0.0, "solve_dtype": "float64"}).state_dict
    for m in LAYERS:
        def loss(state_x):
            x = augmented(state_x, m)
            return sum(0.5 * float((((x - augmented(st, m)) @ s.tensors[m + ".gram"].double())
                                    * (x - augmented(st, m))).sum()) for st, s in zip(MODELS, GRAMS))
        closed = {k: v.float() for k, v in regmean_reference(m, 0.9).items()}
        assert loss(res) < loss(closed)


def test_fisher_objective_converges_to_fisher_merge_from_any_init():
    fi = fishers()
    for init in ("task_arithmetic", "pretrained", "average"):
        out = merge_state_dicts(cfg([f for f in fi], method="mats", base=True, params={
            "objective": "fisher", "init": init, "iterations": 300, "tolerance": 1e-7})).state_dict
        for name in SHAPES:
            ref = ops.fisher_merge([st[name] for st in MODELS], [f.tensors[name] for f in fi], [1.0] * M)
            torch.testing.assert_close(out[name], ref, rtol=1e-4, atol=1e-4)


def test_zero_iterations_return_the_initialisation():
    lam = 0.4
    ta = mats(params={"iterations": 0, "lambda": lam}).state_dict
    for name in SHAPES:
        torch.testing.assert_close(ta[name], BASE[name] + lam * sum(st[name] - BASE[name] for st in MODELS))
    pre = mats(params={"iterations": 0, "init": "pretrained"}).state_dict
    for name in SHAPES:
        torch.testing.assert_close(pre[name], BASE[name])
    given = {k: torch.full(s, 0.5) for k, s in SHAPES.items()}
    start = mats(params={"iterations": 0, "init": "model", "init_model": given}).state_dict
    for name in SHAPES:
        torch.testing.assert_close(start[name], given[name])
    with pytest.raises(ConfigError, match="init: model needs `init_model`"):
        mats(params={"init": "model"})
    with pytest.raises(ValueError, match="init_model.*no entry for 'emb.weight'"):
        mats(params={"init": "model", "init_model": {k: v for k, v in given.items() if k != "emb.weight"}})


def test_kfac_objective_solves_the_kronecker_system():
    stats = [layer_stats(i, "kfac") for i in range(M)]
    weights = [1.0, 0.5, 2.0]
    res = mats(stats, params={"objective": "kfac", "iterations": 300, "tolerance": 1e-9, "solve_dtype": "float64"},
               extra_model={"weight": weights})
    out = res.state_dict
    for m, (d, k, bias, tr) in LAYERS.items():
        a = sum(w * torch.kron(s.tensors[m + ".kfac_out"].double(), s.tensors[m + ".kfac_in"].double())
                for w, s in zip(weights, stats))
        b = sum(w * torch.kron(s.tensors[m + ".kfac_out"].double(), s.tensors[m + ".kfac_in"].double())
                @ augmented(st, m).reshape(-1) for w, s, st in zip(weights, stats, MODELS))
        x = torch.linalg.solve(a, b).reshape(k, -1)
        torch.testing.assert_close(augmented(out, m), x, rtol=1e-4, atol=1e-4)


def test_mats_rejects_bad_statistics_and_missing_files():
    stats = [layer_stats(i, "kfac") for i in range(M)]
    bad = dict(stats[2].tensors)
    bad["enc.1.kfac_out"] = -bad["enc.1.kfac_out"]
    stats[2] = type(stats[2])(tensors=bad, metadata=stats[2].metadata)
    with pytest.raises(StatisticsError, match=r"layer 'enc\.1' \(stats of m2\): kfac_out matrix has negative"):
        mats(stats, params={"objective": "kfac"})
    with pytest.raises(ConfigError, match="objective kfac needs each model's `stats`"):
        merge_state_dicts({"merge_method": "mats", "base_model": {"model": BASE}, "parameters": {"objective": "kfac"},
                           "models": [{"model": m} for m in MODELS]})
    with pytest.raises(ValueError, match="holds 'gram' statistics, this merge needs 'kfac'"):
        mats(params={"objective": "kfac"})


@pytest.mark.parametrize("objective", ["regmean", "kfac", "fisher", "average"])
def test_base_model_only_where_the_initialisation_needs_it(objective):
    """init average / model need no base_model (and equal the merge with one); task arithmetic and pretrained
    refuse to start without it, naming the parameter."""
    stats = {"regmean": GRAMS, "kfac": [layer_stats(i, "kfac") for i in range(M)], "fisher": fishers(),
             "average": GRAMS}[objective]
    given = {k: torch.full(s, 0.5) for k, s in SHAPES.items()}
    for init, extra in (("average", {}), ("model", {"init_model": given})):
        params = {"objective": objective, "init": init, "iterations": 5, **extra}
        without = merge_state_dicts(cfg(stats, method="mats", params=params, base=False))
        assert not without.plan.config.method.needs_base  # the engine reads no base tensor
        with_base = merge_state_dicts(cfg(stats, method="mats", params=params, base=True)).state_dict
        assert set(without.state_dict) == set(with_base) == set(SHAPES)
        for name in SHAPES:
            assert torch.equal(without.state_dict[name], with_base[name]), (init, name)
    for init in ("task_arithmetic", "pretrained"):
        with pytest.raises(ConfigError, match=rf"merge_method 'mats' needs `base_model` .*: it starts from the "
                                              rf"pretrained model with init: {init} \(init: average or init: model"):
            merge_state_dicts(cfg(stats, method="mats", params={"objective": objective, "init": init}))
    zero = {"objective": objective, "init": "average", "iterations": 0}
    out = merge_state_dicts(cfg(stats, method="mats", params=zero)).state_dict
    for name in SHAPES:  # zero steps from the average: the average, with no base anywhere
        torch.testing.assert_close(out[name], sum(st[name] for st in MODELS) / M)
