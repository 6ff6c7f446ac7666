"""RegMean through the engine: layers merged together (weight with bias, Conv1D transposed) against a float64
closed-form reference, other parameters by policy, and bad statistics rejected naming the layer."""
import json
from types import SimpleNamespace

import pytest
import torch

from pymerge import ops
from pymerge.engine import merge_state_dicts
from pymerge.fisher import store
from pymerge.io.errors import CheckpointError, IncompatibleModelsError
from pymerge.methods import ConfigError
from pymerge.solvers.closed_form import StatisticsError

M = 3
# module -> (in, out, bias, transposed); plus tensors outside any layer
LAYERS = {"enc.0": (4, 6, True, False), "enc.1": (6, 4, False, False), "h.0.c_attn": (4, 5, True, True)}
OTHER = {"ln.weight": (4,), "emb.weight": (10, 4)}


def _shapes():
    out = dict(OTHER)
    for m, (d, k, bias, tr) in LAYERS.items():
        out[m + ".weight"] = (d, k) if tr else (k, d)
        if bias:
            out[m + ".bias"] = (k,)
    return out


SHAPES = _shapes()


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


BASE = _state(0)
MODELS = [{k: BASE[k] + 0.3 * v for k, v in _state(i + 1).items()} for i in range(M)]


def layer_stats(seed, kind="gram", layers=LAYERS, rows=12):
    """Statistics in the SEAMS.md format, from random layer inputs (bias-augmented)."""
    g = torch.Generator().manual_seed(1000 + seed)
    tensors, meta_layers = {}, {}
    for m, (d, k, bias, tr) in layers.items():
        z = torch.randn(rows, d, generator=g, dtype=torch.float64)
        if bias:
            z = torch.cat([z, torch.ones(rows, 1, dtype=torch.float64)], 1)
        if kind == "gram":
            tensors[m + ".gram"] = (z.T @ z / rows).float()
        else:
            o = torch.randn(rows, k, generator=g, dtype=torch.float64)
            tensors[m + ".kfac_in"] = (z.T @ z / rows).float()
            tensors[m + ".kfac_out"] = (o.T @ o / rows).float()
        meta_layers[m] = {"weight": m + ".weight", "bias": m + ".bias" if bias else None, "transposed": tr,
                          "in_features": d, "out_features": k, "tokens": rows}
    meta = {"pymerge_stats": "1", "kind": kind, "mode": "inputs", "num_examples": str(rows),
            "layers": json.dumps(meta_layers)}
    return SimpleNamespace(tensors=tensors, metadata=meta)


GRAMS = [layer_stats(i) for i in range(M)]


def fishers(seed=0):
    out = []
    for i in range(M):
        g = torch.Generator().manual_seed(200 + i + seed)
        t = {k: torch.rand(s, generator=g) + 0.01 for k, s in SHAPES.items()}
        out.append(store.Fisher(t, {"pymerge_fisher": "1", "mode": "exact", "num_examples": "4"}))
    return out


def cfg(stats=GRAMS, method="regmean", params=None, extra_model=None, base=False, models=MODELS):
    entries = []
    for i in range(M):
        p = {"stats": stats[i]}
        if extra_model:
            p.update({k: v[i] for k, v in extra_model.items()})
        entries.append({"model": models[i], "name": f"m{i}", "parameters": p})
    out = {"merge_method": method, "models": entries, "parameters": params or {}}
    if base:
        out["base_model"] = {"model": BASE}
    return out


def augmented(state, m):
    d, k, bias, tr = LAYERS[m]
    w = state[m + ".weight"].double()
    w = w.T if tr else w
    return torch.cat([w, state[m + ".bias"].double()[:, None]], 1) if bias else w


def regmean_reference(m, alpha, weights=(1.0,) * M):
    """float64 RegMean of one layer straight from the paper (explicit inverse: fine for a reference)."""
    gt = []
    for s, w in zip(GRAMS, weights):
        g = s.tensors[m + ".gram"].double()
        gt.append(w * (alpha * g + (1 - alpha) * torch.diag(torch.diag(g))))
    x = sum(augmented(st, m) @ g for st, g in zip(MODELS, gt)) @ torch.linalg.inv(sum(gt))
    d, k, bias, tr = LAYERS[m]
    w = x[:, :d]
    out = {m + ".weight": w.T if tr else w}
    if bias:
        out[m + ".bias"] = x[:, d]
    return out


@pytest.mark.parametrize("alpha", [0.9, 0.5, 1.0])
def test_regmean_equals_the_float64_reference_layer_by_layer(alpha):
    weights = [1.0, 2.0, 0.5]
    out = merge_state_dicts(cfg(params={"alpha": alpha}, extra_model={"weight": weights})).state_dict
    for m in LAYERS:
        for name, ref in regmean_reference(m, alpha, weights).items():
            assert out[name].dtype == torch.float32
            torch.testing.assert_close(out[name].double(), ref, rtol=1e-5, atol=1e-6)
    for name in OTHER:  # outside the layers: the weighted average
        ref = sum(w * st[name] for w, st in zip(weights, MODELS)) / sum(weights)
        torch.testing.assert_close(out[name], ref)


def test_regmean_with_one_model_returns_it_and_other_parameters_by_fisher():
    one = merge_state_dicts({"merge_method": "regmean", "models": [
        {"model": MODELS[1], "parameters": {"stats": GRAMS[1]}}]}).state_dict
    for k in SHAPES:
        torch.testing.assert_close(one[k], MODELS[1][k], rtol=1e-5, atol=1e-5)
    fi = fishers()
    out = merge_state_dicts(cfg(params={"others": "fisher"}, extra_model={"fisher": fi})).state_dict
    for name in OTHER:
        ref = ops.fisher_merge([st[name] for st in MODELS], [f.tensors[name] for f in fi], [1.0] * M)
        torch.testing.assert_close(out[name], ref)
    with pytest.raises(ConfigError, match="others: fisher needs a `fisher` file"):
        merge_state_dicts(cfg(params={"others": "fisher"}))


def test_layer_statistics_merge_weight_and_bias_together_in_output_order():
    from pymerge.engine import plan_merge

    plan = plan_merge(cfg())
    names = [e.name for e in plan.entries]
    for m, (d, k, bias, tr) in LAYERS.items():
        if bias:
            assert names.index(m + ".bias") == names.index(m + ".weight") + 1
    assert set(plan.layers) == set(LAYERS)
    assert plan.summary()["side_inputs"] == ["stats: gram"]


def _with(stats, key, value):
    t = dict(stats.tensors)
    t[key] = value
    return SimpleNamespace(tensors=t, metadata=dict(stats.metadata))


def test_bad_statistics_are_rejected_naming_the_layer():
    g = GRAMS[1].tensors["enc.0.gram"].clone()
    g[0, 1] = g[1, 0] = 10 * float(g[0, 0] + g[1, 1])  # symmetric, an eigenvalue < 0
    bad = [GRAMS[0], _with(GRAMS[1], "enc.0.gram", g), GRAMS[2]]
    with pytest.raises(StatisticsError, match=r"layer 'enc\.0' \(stats of m1\).*positive semi-definite"):
        merge_state_dicts(cfg(bad))
    nan = g.clone()
    nan[2, 2] = float("nan")
    with pytest.raises(StatisticsError, match=r"layer 'enc\.0' \(stats of m1\).*NaN"):
        merge_state_dicts(cfg([GRAMS[0], _with(GRAMS[1], "enc.0.gram", nan), GRAMS[2]]))
    # shape that does not fit the layer the metadata describes
    with pytest.raises(CheckpointError, match=r"layer 'enc\.1'.*'enc\.1\.gram' has shape \(5, 5\), expected \(6, 6\)"):
        merge_state_dicts(cfg([GRAMS[0], _with(GRAMS[1], "enc.1.gram", torch.eye(5)), GRAMS[2]]))


def test_statistics_of_another_model_are_rejected():
    other = layer_stats(1, layers={"enc.0": (4, 6, True, False), "enc.1": (6, 4, False, False),
                                   "h.0.c_attn": (5, 4, True, True)})  # Conv1D with in/out swapped
    with pytest.raises(IncompatibleModelsError, match=r"stats of m1 does not match model m1.*layer 'h\.0\.c_attn'"):
        merge_state_dicts(cfg([GRAMS[0], other, GRAMS[2]]))
    renamed = layer_stats(1, layers={"dec.0": (4, 6, True, False)})
    with pytest.raises(IncompatibleModelsError, match="none of its layers' weights.*'dec.0.weight'"):
        merge_state_dicts(cfg([GRAMS[0], renamed, GRAMS[2]]))
    # a layer whose weight the checkpoints do not store (GPT-2's lm_head, tied to the embedding) is left out
    tied = [layer_stats(i, layers=dict(LAYERS, lm_head=(4, 10, False, False))) for i in range(M)]
    res = merge_state_dicts(cfg(tied))
    assert res.plan.unused_layers == ["lm_head"] and set(res.plan.layers) == set(LAYERS)
    with pytest.raises(IncompatibleModelsError, match="stats of m2 and stats of m0 describe different layers"):
        merge_state_dicts(cfg([GRAMS[0], GRAMS[1], layer_stats(2, layers={"enc.0": LAYERS["enc.0"]})]))
    with pytest.raises(CheckpointError, match="holds 'kfac' statistics, this merge needs 'gram'"):
        merge_state_dicts(cfg([layer_stats(i, "kfac") for i in range(M)]))
    with pytest.raises(CheckpointError, match="no pymerge statistics metadata"):
        merge_state_dicts(cfg([SimpleNamespace(tensors=GRAMS[0].tensors, metadata={})] + GRAMS[1:]))
    with pytest.raises(ConfigError, match="needs parameter 'stats' for every model"):
        merge_state_dicts({"merge_method": "regmean", "models": [{"model": m} for m in MODELS]})


def test_half_precision_models_are_solved_in_float64_and_written_in_their_dtype():
    bf = [{k: v.to(torch.bfloat16) for k, v in st.items()} for st in MODELS]
    out = merge_state_dicts(cfg(models=bf)).state_dict
    for m in LAYERS:
        for name, ref in regmean_reference(m, 0.9).items():
            assert out[name].dtype == torch.bfloat16
            # the inputs were rounded to bf16, so compare at bf16 precision
            torch.testing.assert_close(out[name].double(), ref, rtol=2e-2, atol=2e-2)


def test_prefetch_budget_counts_side_inputs_by_kind_and_dtype():
    from pymerge.engine import plan_merge
    from pymerge.engine.run import _task_bytes

    plan = plan_merge(cfg())
    by_name = {e.name: e for e in plan.entries}
    w, b = by_name["enc.0.weight"], by_name["enc.0.bias"]
    # a layer: M weights [6, 4] and biases [6] in fp32, plus M Grams [5, 5] in fp32 (not tensor-shaped Fishers)
    assert _task_bytes(plan, w, None, b) == M * 4 * (6 * 4 + 6) + M * 4 * 5 * 5
    ln = by_name["ln.weight"]  # outside the layers: the Gram side input costs nothing
    assert _task_bytes(plan, ln, None, None) == M * 4 * 4
    fi = fishers()
    plan = plan_merge(cfg(params={"others": "fisher"}, extra_model={"fisher": fi}))
    ln = {e.name: e for e in plan.entries}["ln.weight"]
    assert _task_bytes(plan, ln, None, None) == M * 4 * 4 + M * 4 * 4  # + one fp32 Fisher per model
