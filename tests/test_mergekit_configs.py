"""mergekit's own example and test configs (tests/data/mergekit/, copied with their source noted) run as they
are on tiny Llama / Mistral models, each output tensor against a float64 reference (tests/mergekit_reference)."""
import re
from pathlib import Path

import pytest
import torch
import yaml

import mergekit_models as mm
import mergekit_reference as ref
from pymerge.engine import merge
from pymerge.methods.base import ConfigError

DATA = Path(__file__).parent / "data" / "mergekit"

# mergekit's model names -> roles in our tiny families
EXAMPLE_NAMES = {
    "TheBloke/Llama-2-13B-fp16": "base", "psmathur/orca_mini_v3_13b": "ft0", "garage-bAInd/Platypus2-13B": "ft1",
    "WizardLM/WizardMath-13B-V1.0": "ft2", "WizardLM/WizardLM-13B-V1.2": "ft2",
    "mistralai/Mistral-7B-v0.1": "base", "mistralai/Mistral-7B-Instruct-v0.2": "ft0",
    "BioMistral/BioMistral-7B": "ft1",
}
TEST_NAMES = {"model_a": "ft0", "model_b": "ft1", "model_c": "ft2"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, None: torch.float32}

ACCEPTED = [  # (file, family)
    ("example-ties.yml", "llama40"), ("example-bio-merge.yml", "mistral"), ("example-gradient-slerp.yml", "llama40"),
    ("example-linear.yml", "llama40"), ("example-orcamini-platy-44layer.yml", "llama40"),
    ("test-linear.yml", "llama"), ("test-slerp.yml", "llama"), ("test-task_arithmetic.yml", "llama"),
    ("test-breadcrumbs.yml", "llama"), ("test-ties.yml", "mistral"), ("test-dare_ties.yml", "llama"),
    ("test-della.yml", "llama"), ("test-model_stock.yml", "llama"), ("test-model_stock_filterwise.yml", "mistral"),
    ("test-passthrough_copy.yml", "llama"), ("test-passthrough_stack.yml", "llama"),
    ("test-passthrough_scale.yml", "llama"),
]
REFUSED = [("example-arcee_fusion.yml", "unknown merge_method 'arcee_fusion'"),
           ("test-nuslerp.yml", "unknown merge_method 'nuslerp'"),
           ("test-della_invalid_epsilon.yml", "epsilon 1.35 must keep density")]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    return {"llama": mm.build_family(root / "llama", "llama", 3, layers=2),
            "mistral": mm.build_family(root / "mistral", "mistral", 3, layers=2),
            "llama40": mm.build_family(root / "llama40", "llama", 3, layers=40)}


def _localise(text: str, family: dict) -> str:
    """The YAML text with mergekit's model names replaced by our tiny models' paths (nothing else changed)."""
    for name, role in list(EXAMPLE_NAMES.items()) + list(TEST_NAMES.items()):
        text = re.sub(rf"(?<![\w/-]){re.escape(name)}(?![\w/-])", str(family[role]), text)
    return text


def _run(tmp_path, fname, family):
    text = _localise((DATA / fname).read_text(), family)
    (tmp_path / "c.yml").write_text(text)
    out = merge(tmp_path / "c.yml", tmp_path / "out", progress=False)
    return yaml.safe_load(text), out.out_dir


def _load_out(d):
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


@pytest.mark.parametrize("fname,fam", ACCEPTED)
def test_mergekit_config_matches_float64_reference(tmp_path, families, fname, fam, monkeypatch):
    cfg, out_dir = _run(tmp_path, fname, families[fam])
    got = _load_out(out_dir)
    dtype = DTYPES[cfg.get("dtype")]
    monkeypatch.setattr(ref, "load", lambda p: {k: v.to(dtype).double() for k, v in _load_out(Path(p)).items()})
    want = ref.reference(cfg)
    assert sorted(got) == sorted(want)
    eps = torch.finfo(dtype).eps
    for k, w in want.items():
        assert got[k].dtype == dtype, k
        torch.testing.assert_close(got[k].double(), w, rtol=eps, atol=eps * 1e-3, msg=lambda m: f"{k}: {m}")
    assert (out_dir / "README.md").is_file() and (out_dir / "model.safetensors.index.json").is_file()


def test_stacked_configs_update_layer_count(tmp_path, families):
    from transformers import AutoConfig

    _, out_dir = _run(tmp_path, "example-orcamini-platy-44layer.yml", families["llama40"])
    assert AutoConfig.from_pretrained(out_dir).num_hidden_layers == 44
    got = _load_out(out_dir)
    src = _load_out(families["llama40"]["ft1"])  # output layer 24 + j is Platypus (ft1) layer 20 + j
    torch.testing.assert_close(got["model.layers.30.mlp.up_proj.weight"],
                               src["model.layers.26.mlp.up_proj.weight"].half())


@pytest.mark.parametrize("fname,match", REFUSED)
def test_unsupported_mergekit_configs_are_refused_clearly(tmp_path, families, fname, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        _run(tmp_path, fname, families["llama"])
