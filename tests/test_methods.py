"""Merge methods: registry, parameter validation, and each method against its formula (in memory)."""
import pytest
import torch

from pymerge import ops
from pymerge.config import load_config
from pymerge.fisher import store
from pymerge.engine import merge_state_dicts
from pymerge.methods import ConfigError, MergeMethod, Param, available, get_method, register
from pymerge.methods.dare import tensor_seed

M = 3
SHAPES = {"enc.0.w": (6, 4), "enc.0.b": (6,), "enc.1.w": (4, 6), "ln.weight": (4,)}


def _state(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


BASE = _state(0)
MODELS = [{k: BASE[k] + 0.1 * v for k, v in _state(i + 1).items()} for i in range(M)]


def _fisher(seed, mode="exact", zero=None):
    g = torch.Generator().manual_seed(100 + seed)
    t = {k: torch.rand(s, generator=g) + 0.01 for k, s in SHAPES.items()}
    if zero:
        t[zero] = torch.zeros(SHAPES[zero])
    meta = {"pymerge_fisher": "1", "mode": mode, "num_examples": "4",  # computed on model `seed`
            "structure": store.structure_fingerprint(MODELS[seed]), "weights": store.weights_fingerprint(MODELS[seed])}
    return store.Fisher(t, meta)


FISHERS = [_fisher(i) for i in range(M)]


def _cfg(method, params=None, per_model=None, base=True, **extra):
    models = []
    for i in range(M):
        entry = {"model": MODELS[i], "name": f"m{i}"}
        if per_model:
            entry["parameters"] = {k: v[i] for k, v in per_model.items()}
        models.append(entry)
    cfg = {"merge_method": method, "models": models, "parameters": params or {}}
    if base:
        cfg["base_model"] = {"model": BASE}
    cfg.update(extra)
    return cfg


def _merged(cfg):
    return merge_state_dicts(cfg).state_dict


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_registry_lists_all_methods():
    expected = ["average", "linear", "task_arithmetic", "general_task_arithmetic", "ties", "dare", "dare_ties",
                "dare_linear", "fisher", "dfmerge", "mask_fisher", "slerp", "passthrough", "model_stock", "della",
                "della_linear", "breadcrumbs", "breadcrumbs_ties", "regmean", "mats"]
    assert [n for n in available() if n in expected] == expected  # other branches may register more


def test_average_weighted():
    out = _merged(_cfg("average", per_model={"weight": [1.0, 2.0, 3.0]}, base=False))
    for k in SHAPES:
        _close(out[k], (MODELS[0][k] + 2 * MODELS[1][k] + 3 * MODELS[2][k]) / 6)


def test_task_arithmetic_and_general():
    out = _merged(_cfg("task_arithmetic", {"lambda": 0.7}, per_model={"weight": [1.0, 0.5, 2.0]}))
    for k in SHAPES:
        tv = sum(w * (MODELS[i][k] - BASE[k]) for i, w in enumerate([1.0, 0.5, 2.0]))
        _close(out[k], BASE[k] + 0.7 * tv)
    lams = [0.2, -0.3, 1.1]
    out = _merged(_cfg("general_task_arithmetic", per_model={"lambda": lams}))
    for k in SHAPES:
        _close(out[k], BASE[k] + sum(l * (MODELS[i][k] - BASE[k]) for i, l in enumerate(lams)))


def test_ties_matches_reference_per_tensor():
    out = _merged(_cfg("ties", {"density": 0.4, "lambda": 0.9}))
    for k in SHAPES:
        tvs = [MODELS[i][k] - BASE[k] for i in range(M)]
        _close(out[k], ops.ties_merge_reference(BASE[k], tvs, 0.4, 0.9))


@pytest.mark.parametrize("over", ["task_arithmetic", "ties"])
def test_dare_over_ta_and_ties(over):
    params = {"p": 0.5, "seed": 7, "over": over, "lambda": 0.8}
    out = _merged(_cfg("dare", params))
    for k in SHAPES:
        tvs = [ops.dare_reference(MODELS[i][k] - BASE[k], 0.5, tensor_seed(7, i, k)) for i in range(M)]
        want = (ops.ties_merge_reference(BASE[k], tvs, 1.0, 0.8) if over == "ties"
                else BASE[k] + 0.8 * sum(tvs))
        _close(out[k], want)
    again = _merged(_cfg("dare", params))
    other = _merged(_cfg("dare", {**params, "seed": 8}))
    assert all(torch.equal(out[k], again[k]) for k in SHAPES)
    assert not all(torch.equal(out[k], other[k]) for k in SHAPES)
    # the masks differ between models and tensors (seeded by model index and name)
    assert tensor_seed(7, 0, "a") != tensor_seed(7, 1, "a") != tensor_seed(7, 1, "b")


def test_fisher_merge_formula_fallback_and_normalize():
    lams = [1.0, 2.0, 0.5]
    fishers = [_fisher(i, zero="ln.weight") for i in range(M)]
    out = _merged(_cfg("fisher", per_model={"weight": lams, "fisher": fishers}, base=False))
    for k in SHAPES:
        if k == "ln.weight":  # all Fishers zero: falls back to the target (first) model
            _close(out[k], MODELS[0][k])
            continue
        num = sum(l * f.tensors[k] * MODELS[i][k] for i, (l, f) in enumerate(zip(lams, fishers)))
        den = sum(l * f.tensors[k] for l, f in zip(lams, fishers))
        _close(out[k], num / den)
    avg = _merged(_cfg("fisher", {"fallback": "average"}, per_model={"weight": lams, "fisher": fishers}, base=False))
    _close(avg["ln.weight"], sum(l * MODELS[i]["ln.weight"] for i, l in enumerate(lams)) / sum(lams))

    # normalize: each Fisher divided by its global L2 norm, so scaling one Fisher changes nothing
    scaled = [store.Fisher({k: v * (1000.0 if i == 1 else 1.0) for k, v in f.tensors.items()}, f.metadata)
              for i, f in enumerate(FISHERS)]
    a = _merged(_cfg("fisher", {"normalize": True}, per_model={"fisher": FISHERS}, base=False))
    b = _merged(_cfg("fisher", {"normalize": True}, per_model={"fisher": scaled}, base=False))
    c = _merged(_cfg("fisher", per_model={"fisher": scaled}, base=False))
    norms = [torch.sqrt(sum((v.double() ** 2).sum() for v in f.tensors.values())) for f in FISHERS]
    for k in SHAPES:
        _close(a[k], b[k])
        w = [1.0 / float(n) for n in norms]
        want = sum(w[i] * FISHERS[i].tensors[k] * MODELS[i][k] for i in range(M)) / \
            sum(w[i] * FISHERS[i].tensors[k] for i in range(M))
        _close(a[k], want)
    assert not torch.allclose(a["enc.0.w"], c["enc.0.w"])


def test_dfmerge_formula():
    lams = [0.3, 0.6, 0.9]
    out = _merged(_cfg("dfmerge", per_model={"lambda": lams, "fisher": FISHERS}))
    for k in SHAPES:
        num = sum(FISHERS[i].tensors[k] * lams[i] * (MODELS[i][k] - BASE[k]) for i in range(M))
        den = sum(FISHERS[i].tensors[k] for i in range(M))
        _close(out[k], BASE[k] + M * num / den)


def test_mask_fisher_requires_mask_mode():
    with pytest.raises(ValueError, match="mode 'masks'"):
        _merged(_cfg("mask_fisher", per_model={"fisher": FISHERS}, base=False))
    masks = [_fisher(i, mode="masks") for i in range(M)]
    out = _merged(_cfg("mask_fisher", per_model={"fisher": masks}, base=False))
    # the same tensors as parameter Fishers: mask-Fisher merging is Fisher merging
    same = [store.Fisher(m.tensors, {**m.metadata, "mode": "exact"}) for m in masks]
    ref = _merged(_cfg("fisher", per_model={"fisher": same}, base=False))
    assert all(torch.equal(out[k], ref[k]) for k in SHAPES)
    # ... but a mask Fisher is not accepted where a parameter Fisher is expected (issue 9)
    with pytest.raises(ValueError, match="is a masks statistics file"):
        _merged(_cfg("fisher", per_model={"fisher": masks}, base=False))


def test_per_tensor_filters():
    params = {"lambda": [{"filter": "enc.0.*", "value": 0.25}, {"filter": "ln", "value": 2.0}, {"value": 1.0}]}
    out = _merged(_cfg("task_arithmetic", params))
    for k, lam in (("enc.0.w", 0.25), ("enc.0.b", 0.25), ("ln.weight", 2.0), ("enc.1.w", 1.0)):
        _close(out[k], BASE[k] + lam * sum(MODELS[i][k] - BASE[k] for i in range(M)))
    # per-model values may be filtered too
    per = {"weight": [[{"filter": "enc.1.w", "value": 0.0}, {"value": 1.0}], 1.0, 1.0]}
    out = _merged(_cfg("average", per_model=per, base=False))
    _close(out["enc.1.w"], (MODELS[1]["enc.1.w"] + MODELS[2]["enc.1.w"]) / 2)
    _close(out["enc.0.w"], sum(MODELS[i]["enc.0.w"] for i in range(M)) / 3)
    with pytest.raises(ConfigError, match="no filter matches"):
        _merged(_cfg("task_arithmetic", {"lambda": [{"filter": "enc", "value": 1.0}]}))
    with pytest.raises(ConfigError, match="per-tensor entries"):
        _cfg_checked("task_arithmetic", {"lambda": [{"pattern": "enc", "value": 1.0}]})


def _cfg_checked(*a, **k):
    return load_config(_cfg(*a, **k))


@pytest.mark.parametrize("cfg, match", [
    (dict(method="averge", base=False), "unknown merge_method 'averge'; did you mean 'average'"),
    (dict(method="ties", params={"densty": 0.3}), "unknown parameter 'densty'.*did you mean 'density'"),
    (dict(method="ties", params={"density": 1.5}), "density.*must be <= 1"),
    (dict(method="ties", params={"density": "high"}), "density.*expects float"),
    (dict(method="dare", params={}), "needs parameter 'p'"),
    (dict(method="general_task_arithmetic"), "needs parameter 'lambda' for every model"),
    (dict(method="ties", base=False), "needs `base_model`"),
    (dict(method="ties", per_model={"lambda": [0.1, 0.2, 0.3]}), "'lambda' of 'ties' is global"),
    (dict(method="fisher", base=False), "needs parameter 'fisher' for every model"),
    (dict(method="fisher", params={"fallback": "zero"}, per_model={"fisher": FISHERS}, base=False),
     "fallback.*one of"),
    (dict(method="dare", params={"p": 0.1, "seed": 1.5}), "seed.*expects int"),
])
def test_bad_parameters_are_named(cfg, match):
    method = cfg.pop("method")
    with pytest.raises(ConfigError, match=match):
        load_config(_cfg(method, cfg.get("params"), cfg.get("per_model"), cfg.get("base", True)))


def test_bad_top_level_keys_suggest():
    with pytest.raises(ConfigError, match="unknown key 'head_pattern'.*did you mean 'head_patterns'"):
        load_config({**_cfg("average", base=False), "head_pattern": []})
    with pytest.raises(ConfigError, match="dtype 'float31'"):
        load_config({**_cfg("average", base=False), "dtype": "float31"})
    with pytest.raises(ConfigError, match="share the name"):
        load_config({"merge_method": "average", "models": [{"model": MODELS[0], "name": "a"},
                                                           {"model": MODELS[1], "name": "a"}]})


def test_custom_method_can_register_with_side_inputs():
    """The extension point regmean / mats use: a new method with per-model side files whose entries are named
    and shaped differently from the tensors (a Gram matrix per 2-D weight, nothing for the others)."""

    @register
    class GramMix(MergeMethod):
        name = "test_gram_mix"
        params = (Param("scale", float, 2.0), Param("gram", "file", scope="model", file_format="tensors"))

        def aux_key(self, param, tensor_name):
            return tensor_name[:-2] + ".gram" if tensor_name.endswith(".w") else None

        def aux_shape_error(self, param, tensor_name, tensor_shape, aux_shape):
            d = tensor_shape[-1]
            return None if tuple(aux_shape) == (d, d) else f"should be ({d}, {d})"

        def merge_tensor(self, x):
            grams = x.aux["gram"]
            if grams[0] is None:
                return x.params["scale"] * sum(x.models) / len(x.models)
            return sum(m @ g for m, g in zip(x.models, grams)) / len(x.models)

    grams = [{k[:-2] + ".gram": torch.randn(s[1], s[1]) for k, s in SHAPES.items() if k.endswith(".w")}
             for _ in range(M)]
    try:
        out = _merged(_cfg("test_gram_mix", per_model={"gram": grams}, base=False))
        _close(out["enc.0.w"], sum(MODELS[i]["enc.0.w"] @ grams[i]["enc.0.gram"] for i in range(M)) / M)
        _close(out["ln.weight"], 2.0 * sum(MODELS[i]["ln.weight"] for i in range(M)) / M)
        bad = [dict(g, **{"enc.1.gram": torch.ones(2, 2)}) for g in grams]
        with pytest.raises(ValueError, match="'enc.1.gram' should be \\(6, 6\\)"):
            _merged(_cfg("test_gram_mix", per_model={"gram": bad}, base=False))
        assert get_method("test_gram_mix").name == "test_gram_mix"
    finally:
        from pymerge.methods import registry

        registry._METHODS.pop("test_gram_mix", None)
