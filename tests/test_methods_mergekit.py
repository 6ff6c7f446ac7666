"""The mergekit-family methods and options on a tiny Llama family, each against the float64 reference of
tests/mergekit_reference.py; values across layers; out_dtype; tokenizer_source; LoRA through PEFT."""
import json

import pytest
import torch
from safetensors.torch import load_file

import mergekit_models as mm
import mergekit_reference as ref
from pymerge.engine import merge, merge_state_dicts
from pymerge.methods.base import ConfigError, Gradient, layer_depth, parse_value
from pymerge.methods.registry import get_method


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return mm.build_family(tmp_path_factory.mktemp("fam"), "llama", 3, layers=3)


def _cfg(fam, method, params=None, per_model=None, base=True, n=3):
    models = [{"model": str(fam[f"ft{i}"]), "parameters": {k: v[i] for k, v in (per_model or {}).items()}}
              for i in range(n)]
    cfg = {"merge_method": method, "models": models, "parameters": params or {}}
    if base:
        cfg["base_model"] = str(fam["base"])
    return cfg


def _check(cfg, rtol=1e-5, atol=1e-6):
    got = merge_state_dicts(cfg).state_dict
    want = ref.reference(cfg)
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        torch.testing.assert_close(got[k].double(), w, rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
    return got


CASES = [
    ("ties", {"density": 0.5, "consensus": "count", "trim_count": "floor"}, {"weight": [1.0, 0.5, 2.0]}),
    ("ties", {"normalize": False, "rescale": True, "lambda": 0.7}, {"density": [0.3, 0.5, 0.9]}),
    ("ties", {"density": 0.4}, None),  # the fused op path
    ("ties", {"density": 0.45, "trim_count": "floor"}, None),  # fused op, density adjusted to keep int(d·n)
    ("dare_ties", {"consensus": "count", "seed": 3}, {"density": [0.5, 0.7, 0.9], "weight": [0.5, 1.0, 1.5]}),
    ("dare_linear", {"rescale": False, "normalize": True}, {"density": [0.5, 0.7, 0.9]}),
    ("dare_linear", {"lambda": 0.5}, {"density": [0.5, 0.7, 0.9]}),
    ("della", {"epsilon": 0.1, "seed": 5}, {"density": [0.5, 0.6, 0.7]}),
    ("della_linear", {"rescale": False}, {"density": [0.5, 0.6, 0.7], "weight": [1.0, 0.2, 0.3]}),
    ("breadcrumbs", {"density": 0.8}, {"gamma": [0.01, 0.05, 0.1]}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.1, "normalize": True}, {"weight": [1.0, 0.5, 2.0]}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.8}, {"weight": [1.0, 0.5, 2.0]}),
    ("model_stock", {}, None),
    ("model_stock", {"filter_wise": True}, None),
]


@pytest.mark.parametrize("method,params,per_model", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_method_matches_float64_reference(fam, method, params, per_model):
    _check(_cfg(fam, method, params, per_model))


def test_linear_and_passthrough(fam):
    _check(_cfg(fam, "linear", {"normalize": False}, {"weight": [0.2, 0.3, 0.4]}, base=False))
    _check(_cfg(fam, "linear", None, {"weight": [[{"filter": "mlp", "value": [0, 1]}, {"value": 1.0}], 2.0, 1.0]},
                base=False))
    got = _check({"merge_method": "passthrough",
                  "models": [{"model": str(fam["ft0"]), "parameters": {"scale": [{"filter": "o_proj", "value": 0},
                                                                                 {"value": 1}]}}]})
    assert all((v == 0).all() for k, v in got.items() if "o_proj" in k)


def test_slerp_across_layers_and_endpoints(fam):
    cfg = {"merge_method": "slerp", "base_model": str(fam["base"]), "models": [str(fam["base"]), str(fam["ft1"])],
           "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": [1, 0]}]}}
    got = _check(cfg)
    base, ft = load_file(str(fam["base"] / "model.safetensors")), load_file(str(fam["ft1"] / "model.safetensors"))
    torch.testing.assert_close(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(got["model.layers.2.self_attn.q_proj.weight"], ft["model.layers.2.self_attn.q_proj.weight"])
    torch.testing.assert_close(got["model.layers.2.mlp.up_proj.weight"], base["model.layers.2.mlp.up_proj.weight"])
    torch.testing.assert_close(got["model.embed_tokens.weight"], ft["model.embed_tokens.weight"])  # t = 0 -> [1, 0] at 0


def test_gradient_semantics():
    g = Gradient((0.0, 0.5, 0.3, 0.7, 1.0))
    assert [round(g.at(t), 6) for t in (0, 0.125, 0.25, 1)] == [0.0, 0.25, 0.5, 1.0]
    assert layer_depth("model.layers.3.mlp.w", 7) == 0.5 and layer_depth("lm_head.weight", 7) == 0.0
    assert layer_depth("model.layers.0.mlp.w", 1) == 1.0
    with pytest.raises(ConfigError, match="cannot vary across layers"):
        parse_value(get_method("dare").param("seed"), [1, 2], "cfg")


def test_model_filter_without_fallback_uses_global_value(fam):
    cfg = _cfg(fam, "task_arithmetic", {"weight": 0.25}, {"weight": [[{"filter": "mlp", "value": 2.0}], 1.0, 1.0]})
    _check(cfg)


def test_option_errors_are_named(fam):
    with pytest.raises(ConfigError, match="consensus.*one of"):
        merge_state_dicts(_cfg(fam, "ties", {"consensus": "vote"}))
    with pytest.raises(ConfigError, match="slerp interpolates between base_model and exactly one"):
        merge_state_dicts(_cfg(fam, "slerp", {"t": 0.5}))
    with pytest.raises(ConfigError, match="model_stock needs at least 2"):
        merge_state_dicts(_cfg(fam, "model_stock", n=1))
    from pymerge.config import load_config

    with pytest.raises(ConfigError, match="della: model 1: epsilon 0.6 must keep density"):  # before any read
        load_config(_cfg(fam, "della", {"epsilon": 0.6}, {"density": [1.0, 0.5, 0.5]}))
    with pytest.raises(ConfigError, match="density 0.01 keeps no entry"):
        merge_state_dicts(_cfg(fam, "ties", {"density": 0.01, "trim_count": "floor"}))


def test_dare_rescale_modes(fam):
    base = _cfg(fam, "dare", {"p": 0.5, "seed": 1})
    inv = merge_state_dicts(base).state_dict
    none = merge_state_dicts({**base, "parameters": {"p": 0.5, "seed": 1, "rescale": "none"}}).state_dict
    b = load_file(str(fam["base"] / "model.safetensors"))
    for k in inv:
        torch.testing.assert_close((inv[k] - b[k]) * 0.5, none[k] - b[k], rtol=1e-5, atol=1e-6)
    l1 = merge_state_dicts({**base, "parameters": {"p": 0.5, "seed": 1, "rescale": "l1"}}).state_dict
    assert all(torch.equal((l1[k] - b[k]) != 0, (none[k] - b[k]) != 0) for k in inv if "layers" in k)


def test_out_dtype_and_model_card(tmp_path, fam):
    cfg = _cfg(fam, "ties", {"density": 0.5}, None)
    cfg.update(dtype="float32", out_dtype="bfloat16")
    out = merge(cfg, tmp_path / "o", progress=False).out_dir
    got = load_file(str(out / "model.safetensors"))
    want = ref.reference(cfg)
    for k, w in want.items():
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k], w.to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    import pymerge

    for text in ("**ties**", str(fam["base"]), str(fam["ft2"]), "density: 0.5", "out_dtype: bfloat16",
                 pymerge.__version__):
        assert text in card, text
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got) and set(index["weight_map"].values()) == {"model.safetensors"}


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory, fam):
    root = tmp_path_factory.mktemp("vocab")
    words = mm.WORDS[:10] + ["extra1"] + mm.WORDS[10:] + ["extra2"]  # shifted ids and two new tokens
    return mm.make_model(root / "ext", 30, base=fam["base"], words=words)


@pytest.mark.parametrize("source", ["base", "union", "ext"])
def test_tokenizer_source_permutes_embeddings(tmp_path, fam, vocab_family, source):
    from transformers import AutoTokenizer

    cfg = {"merge_method": "linear", "base_model": str(fam["base"]),
           "models": [{"model": str(fam["ft0"]), "name": "ft0"}, {"model": str(vocab_family), "name": "ext"}],
           "tokenizer_source": source}
    out = merge(cfg, tmp_path / "o", progress=False).out_dir
    tok = AutoTokenizer.from_pretrained(str(out))
    got = load_file(str(out / "model.safetensors"))
    vocab = tok.get_vocab()
    assert got["model.embed_tokens.weight"].shape[0] == len(vocab) == json.loads(
        (out / "config.json").read_text())["vocab_size"]
    e0 = load_file(str(fam["ft0"] / "model.safetensors"))
    e1 = load_file(str(vocab_family / "model.safetensors"))
    eb = load_file(str(fam["base"] / "model.safetensors"))
    v0, v1 = AutoTokenizer.from_pretrained(str(fam["ft0"])).get_vocab(), \
        AutoTokenizer.from_pretrained(str(vocab_family)).get_vocab()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for t, i in vocab.items():
            r0 = e0[name][v0[t]] if t in v0 else e1[name][v1[t]]  # missing in ft0: the only model with it
            r1 = e1[name][v1[t]] if t in v1 else (eb[name][v0[t]] if t in v0 else None)  # else: the base's row
            torch.testing.assert_close(got[name][i], (r0 + r1) / 2, msg=lambda m: f"{name} {t}: {m}")
    assert ("extra1" in vocab) == (source != "base")


def test_lora_reference_is_merged_through_peft(tmp_path, fam):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fam["base"]))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    lora.save_pretrained(str(tmp_path / "adapter"))
    merged = lora.merge_and_unload().state_dict()
    cfg = {"merge_method": "linear", "models": [f"{fam['base']}+{tmp_path / 'adapter'}", str(fam["ft0"])]}
    got = merge_state_dicts(cfg).state_dict
    ft0 = load_file(str(fam["ft0"] / "model.safetensors"))
    for k in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        torch.testing.assert_close(got[k], (merged[k] + ft0[k]) / 2)
    base = load_file(str(fam["base"] / "model.safetensors"))
    assert not torch.allclose(merged["model.layers.1.self_attn.q_proj.weight"],
                              base["model.layers.1.self_attn.q_proj.weight"])
    with pytest.raises(ConfigError, match="not a LoRA adapter"):
        merge_state_dicts({"merge_method": "linear", "models": [f"{fam['base']}+{fam['ft0']}"]})


def test_tokenizer_source_with_a_base_named_without_the_models_prefix(tmp_path, fam, vocab_family):
    """A bare-backbone base (LlamaModel: `embed_tokens.weight`, no lm_head) beside *ForCausalLM models
    (`model.embed_tokens.weight`): the embeddings are matched across the prefix, and a tensor the base lacks
    (lm_head) is permuted from the models alone. Same output as with the full base for the prefixed names."""
    import shutil

    from safetensors.torch import save_file

    bare = tmp_path / "bare"
    shutil.copytree(fam["base"], bare)
    sd = load_file(str(fam["base"] / "model.safetensors"))
    (bare / "model.safetensors").unlink()
    save_file({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}, str(bare / "model.safetensors"))

    def run(base, out):
        cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "head_patterns": ["lm_head.*"],
               "models": [{"model": str(fam["ft0"]), "name": "ft0"}, {"model": str(vocab_family), "name": "ext"}],
               "tokenizer_source": "union", "heads": "drop"}
        return load_file(str(merge(cfg, tmp_path / out, progress=False).out_dir / "model.safetensors"))

    got, want = run(bare, "o1"), run(fam["base"], "o2")
    assert "model.embed_tokens.weight" in got and got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("trim_count", ["ceil", "floor"])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.97])
@pytest.mark.parametrize("n", [7, 1000, 70_001])
def test_trim_magnitudes_equals_the_mask_path(n, density, trim_count):
    """The generalized TIES / DARE-TIES path trims through the compiled selection: it must equal the kthvalue
    mask exactly, with tied magnitudes at the threshold (values quantized to a few levels) all kept."""
    from pymerge.methods.sparsify import magnitude_mask, trim_magnitudes

    g = torch.Generator().manual_seed(n)
    for tv in (torch.randn(n, generator=g), torch.randint(-6, 7, (n,), generator=g).float() * 0.25):
        if trim_count == "floor" and int(density * n) == 0:  # keeps nothing: both refuse, with the same message
            for f in (magnitude_mask, trim_magnitudes):
                with pytest.raises(ConfigError, match="keeps no entry"):
                    f(tv, density, trim_count)
            continue
        want = tv * magnitude_mask(tv, density, trim_count)
        got = trim_magnitudes(tv, density, trim_count)
        assert torch.equal(got != 0, want != 0), (n, density, trim_count)
        assert torch.equal(got, want)
