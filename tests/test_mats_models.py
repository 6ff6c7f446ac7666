"""RegMean and MaTS on tiny Hugging Face models: BERT (nn.Linear), GPT-2 (Conv1D, weights stored [in, out]) and T5
(encoder-decoder, tied lm_head; statistics from pymerge.stats on multiple choice),
statistics files on disk in the SEAMS.md format, merged from YAML through the CLI, reloaded with from_pretrained,
and equal to float64 references computed here from the checkpoints and the statistics files."""
import json
import os

import pytest
import torch

import engine_models as em
from layer_stats_fixtures import write_layer_stats
from pymerge.cli import main
from pymerge.engine import merge_state_dicts

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from transformers import BertForSequenceClassification, BertModel, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("mats_zoo")
    torch.manual_seed(0)
    z = {}
    base = BertModel(em.bert_config())
    z["bert_base"] = root / "bert_base"
    base.save_pretrained(z["bert_base"])
    gbase = GPT2LMHeadModel(em.gpt2_config())
    z["gpt2_base"] = root / "gpt2_base"
    gbase.save_pretrained(z["gpt2_base"])
    for i in range(2):
        m = BertForSequenceClassification(em.bert_config())
        m.bert.load_state_dict(base.state_dict())
        em._perturb(m, seed=10 + i, scale=0.05)
        z[f"bert{i}"] = root / f"bert{i}"
        m.save_pretrained(z[f"bert{i}"])
        g = GPT2LMHeadModel(em.gpt2_config())
        g.load_state_dict(gbase.state_dict())
        em._perturb(g, seed=20 + i, scale=0.05)
        z[f"gpt2{i}"] = root / f"gpt2{i}"
        g.save_pretrained(z[f"gpt2{i}"])
        for kind in ("gram", "kfac"):
            z[f"bert{i}_{kind}"] = write_layer_stats(m, root / f"bert{i}.{kind}.safetensors", kind, seed=i)
            z[f"gpt2{i}_{kind}"] = write_layer_stats(g, root / f"gpt2{i}.{kind}.safetensors", kind, seed=i)
    return z


def _stats(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["layers"])


def _augmented(state, info):
    w = state[info["weight"]].double()
    w = w.T if info["transposed"] else w
    return torch.cat([w, state[info["bias"]].double()[:, None]], 1) if info["bias"] else w


def _split(x, info):
    d = info["in_features"]
    w = x[:, :d]
    out = {info["weight"]: w.T if info["transposed"] else w}
    if info["bias"]:
        out[info["bias"]] = x[:, d]
    return out


def regmean_reference(states, stats_paths, alpha):
    out = {}
    loaded = [_stats(p) for p in stats_paths]
    for m, info in loaded[0][1].items():
        if info["weight"] not in states[0]:
            continue  # not stored (tied lm_head)
        gt = [alpha * t[m + ".gram"].double() + (1 - alpha) * torch.diag(torch.diag(t[m + ".gram"].double()))
              for t, _ in loaded]
        x = sum(_augmented(s, info) @ g for s, g in zip(states, gt)) @ torch.linalg.inv(sum(gt))
        out.update(_split(x, info))
    return out


def kfac_residuals(merged, states, stats_paths):
    """Per layer, ||A x - b|| / ||b|| of the dense float64 system Σ (G_out ⊗ A) vec X = Σ (G_out ⊗ A) vec X_m
    (tiny layers only). A residual, not a solution: with few examples G_out is singular (e.g. a classifier's
    layers see gradients at one token per example), so the solution set is an affine space and CG lands on the
    point of it nearest its initialisation. These random tiny models have output-gradient factors with
    eigenvalues down to 1e-11, so CG does not reach a tiny residual in a few hundred steps; the exact solution on
    a well-conditioned K-FAC system (Conv1D layout included) is tested in test_mats.py."""
    out = {}
    loaded = [_stats(p) for p in stats_paths]
    for m, info in loaded[0][1].items():
        ks = [torch.kron(t[m + ".kfac_out"].double(), t[m + ".kfac_in"].double()) for t, _ in loaded]
        b = sum(k @ _augmented(s, info).reshape(-1) for k, s in zip(ks, states))
        x = _augmented(merged, info).reshape(-1)
        out[m] = float((sum(ks) @ x - b).norm() / b.norm())
    return out


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_regmean_on_hf_models_equals_float64_reference_and_reloads(zoo, tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = {"merge_method": "regmean", "parameters": {"alpha": 0.9},
           "models": [{"model": str(zoo[f"{family}{i}"]), "parameters": {"stats": str(zoo[f"{family}{i}_gram"])}}
                      for i in range(2)]}
    res = merge_state_dicts(cfg)
    states = [em.load_dir(zoo[f"{family}{i}"]) for i in range(2)]
    ref = regmean_reference(states, [zoo[f"{family}{i}_gram"] for i in range(2)], 0.9)
    assert len(res.plan.layers) == len(ref) // 2 and len(ref) > 0
    for name, t in ref.items():
        torch.testing.assert_close(res.state_dict[name].double(), t, rtol=1e-4, atol=1e-5)
    for name in states[0]:
        if name not in ref and states[0][name].is_floating_point() and "classifier" not in name:
            torch.testing.assert_close(res.state_dict[name], (states[0][name] + states[1][name]) / 2)
    # the same merge from YAML through the CLI, reloaded by transformers
    yml = tmp_path / "merge.yml"
    import yaml

    yml.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["merge", str(yml), str(out), "--no-progress"]) == 0
    auto = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    model = auto.from_pretrained(out)
    sd = model.state_dict()
    for name, t in ref.items():
        torch.testing.assert_close(sd[name].double(), t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_mats_kfac_on_hf_models_matches_dense_solve_and_reloads(zoo, tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    stats = [zoo[f"{family}{i}_kfac"] for i in range(2)]
    cfg = {"merge_method": "mats", "base_model": str(zoo[f"{family}_base"]),
           "parameters": {"objective": "kfac", "iterations": 400, "tolerance": 1e-10, "solve_dtype": "float64"},
           "models": [{"model": str(zoo[f"{family}{i}"]), "parameters": {"stats": str(stats[i])}} for i in range(2)]}
    out = tmp_path / "out"
    from pymerge.engine import merge

    res = merge(cfg, out, progress=False)
    states = [em.load_dir(zoo[f"{family}{i}"]) for i in range(2)]
    auto = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    sd = auto.from_pretrained(out).state_dict()
    res_after = kfac_residuals({k: v.double() for k, v in sd.items()}, states, stats)
    init = {k: v for k, v in em.load_dir(zoo[f"{family}_base"]).items()}
    prefix = "bert." if family == "bert" else ""
    init = {prefix + k: v for k, v in init.items()}
    ta = {k: init[k] + 0.3 * sum(s[k] - init[k] for s in states) for k in states[0] if k in init}
    res_before = kfac_residuals(ta, states, stats)
    assert len(res_after) == len(res.plan.layers) > 0
    for m, r in res_after.items():
        assert r < 0.01 * res_before[m], (m, r, res_before[m])
    hist = res.plan.config.method.history
    assert set(res.plan.layers) <= set(hist)
    assert all(len(h["residuals"]) == len(h["objectives"]) >= 2 for h in hist.values())


def test_statistics_from_pymerge_stats_drive_regmean_and_mats(tmp_path):
    """The real producer: pymerge.stats.collect on GPT-2 (its tied lm_head has statistics but no stored weight)
    and BERT, saved with pymerge.stats.save; regmean equals the float64 reference from those files."""
    from transformers import BertForSequenceClassification, GPT2LMHeadModel

    import pymerge.stats as ps

    torch.manual_seed(1)
    for family, cls, config in (("gpt2", GPT2LMHeadModel, em.gpt2_config()),
                                ("bert", BertForSequenceClassification, em.bert_config())):
        base = cls(config)
        models, files = [], []
        for i in range(2):
            m = cls(config)
            m.load_state_dict(base.state_dict())
            em._perturb(m, seed=40 + i, scale=0.05)
            batch = {"input_ids": torch.randint(5, 30, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
            if family == "bert":
                batch["labels"] = torch.tensor([0, 1, 1])
            path = tmp_path / f"{family}{i}.gram.safetensors"
            ps.save(path, ps.collect(m, [batch], kind="gram"))
            m.save_pretrained(tmp_path / f"{family}{i}")
            models.append(em.load_dir(tmp_path / f"{family}{i}"))
            files.append(path)
        res = merge_state_dicts({"merge_method": "regmean", "models": [
            {"model": str(tmp_path / f"{family}{i}"), "parameters": {"stats": str(files[i])}} for i in range(2)]})
        if family == "gpt2":
            assert "lm_head" in res.plan.unused_layers  # tied to the embedding, merged by policy instead
        ref = regmean_reference(models, [f for f in files], 0.9)
        merged_layers = {n for info in res.plan.layers.values() for n in (info.weight, info.bias) if n}
        assert merged_layers and merged_layers <= set(ref)
        for name in merged_layers:
            torch.testing.assert_close(res.state_dict[name].double(), ref[name], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- T5 (encoder-decoder, no biases, tied lm_head)
def _t5_batches(seed, n=8, choices=3):
    """Multiple choice for T5 (pymerge.stats' seq2seq format): questions of 6-9 tokens, answers of 2-4 tokens."""
    import fisher_models as fm

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, 10, (n,), generator=g)
    ids = torch.randint(1, fm.VOCAB, (n, 10), generator=g)
    am = (torch.arange(10)[None] < lengths[:, None]).long()
    ans_len = torch.randint(2, 5, (n, choices), generator=g)
    answers = torch.randint(1, fm.VOCAB, (n, choices, 4), generator=g)
    answers = answers.masked_fill(torch.arange(4)[None, None] >= ans_len[..., None], -100)
    labels = torch.randint(0, choices, (n,), generator=g)
    return [dict(input_ids=ids[i:i + 4].masked_fill(am[i:i + 4] == 0, fm.PAD), attention_mask=am[i:i + 4],
                 choice_ids=answers[i:i + 4], labels=labels[i:i + 4]) for i in (0, 4)]


@pytest.fixture(scope="module")
def t5_zoo(tmp_path_factory):
    """A tiny random T5 base, two perturbed fine-tunes on disk, and their gram / kfac files from pymerge stats."""
    import fisher_models as fm
    import pymerge.stats as ps

    root = tmp_path_factory.mktemp("t5_zoo")
    base = fm.t5(dtype=torch.float32)
    base.save_pretrained(root / "base")
    z = {"base": root / "base"}
    for i in range(2):
        m = fm.t5(dtype=torch.float32)
        em._perturb(m, seed=60 + i, scale=0.05)
        m.save_pretrained(root / f"t5{i}")
        z[f"t5{i}"] = root / f"t5{i}"
        for kind in ("gram", "kfac"):
            z[f"t5{i}_{kind}"] = ps.save(root / f"t5{i}.{kind}.safetensors",
                                         ps.collect(m, _t5_batches(seed=i), kind=kind))
    return z


T5_MERGES = {
    "regmean": {"merge_method": "regmean", "parameters": {"alpha": 0.9}},
    "mats_regmean": {"merge_method": "mats", "parameters": {"objective": "regmean", "alpha": 0.9, "init": "average",
                                                            "iterations": 300, "tolerance": 1e-9,
                                                            "solve_dtype": "float64"}},
    "mats_kfac": {"merge_method": "mats", "parameters": {"objective": "kfac", "iterations": 10}},
}


@pytest.mark.parametrize("merge", T5_MERGES)
def test_t5_merges_written_reload_equal_to_the_in_memory_merge(t5_zoo, tmp_path, merge):
    """RegMean and MaTS (regmean and K-FAC objectives) of tiny T5s: every linear layer but the tied lm_head merged
    as a layer, the merge written to disk reloads with from_pretrained equal to the in-memory merge (tensors and
    logits), and the RegMean objective reaches the float64 closed form."""
    from transformers import T5ForConditionalGeneration

    from pymerge.engine import merge as merge_to_disk

    kind = "kfac" if merge == "mats_kfac" else "gram"
    cfg = dict(T5_MERGES[merge], models=[{"model": str(t5_zoo[f"t5{i}"]),
                                          "parameters": {"stats": str(t5_zoo[f"t5{i}_{kind}"])}} for i in range(2)])
    if merge == "mats_kfac":  # init task_arithmetic: the pretrained model
        cfg["base_model"] = str(t5_zoo["base"])
    res = merge_state_dicts(cfg)
    merged = res.state_dict
    linear = {n for n, m in T5ForConditionalGeneration.from_pretrained(t5_zoo["t50"]).named_modules()
              if isinstance(m, torch.nn.Linear)}
    assert set(res.plan.layers) == linear - {"lm_head"} and res.plan.unused_layers == ["lm_head"]
    states = [em.load_dir(t5_zoo[f"t5{i}"]) for i in range(2)]
    if merge != "mats_kfac":
        ref = regmean_reference(states, [t5_zoo[f"t5{i}_gram"] for i in range(2)], 0.9)
        assert set(ref) == {m + ".weight" for m in res.plan.layers}
        for name, t in ref.items():
            torch.testing.assert_close(merged[name].double(), t, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    else:  # CG moved every layer away from its task-arithmetic start
        base = em.load_dir(t5_zoo["base"])
        for m in res.plan.layers:
            w = m + ".weight"
            ta = base[w] + 0.3 * sum(s[w] - base[w] for s in states)
            assert not torch.allclose(merged[w], ta), w
    out = tmp_path / "out"
    merge_to_disk(cfg, out, progress=False)
    reloaded = T5ForConditionalGeneration.from_pretrained(out).eval()
    sd = reloaded.state_dict()
    assert set(merged) <= set(sd)
    for name, t in merged.items():
        assert torch.equal(sd[name], t), name
    assert torch.equal(sd["lm_head.weight"], merged["shared.weight"])  # tied again on reload
    in_memory = T5ForConditionalGeneration(reloaded.config).eval()
    missing, unexpected = in_memory.load_state_dict(merged, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                               "lm_head.weight"}  # tied to shared.weight
    batch = _t5_batches(seed=5)[0]
    dec = torch.tensor([[0, 3, 4, 5]] * 4)
    with torch.no_grad():
        a = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec)
        b = in_memory(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec)
    assert torch.equal(a.logits, b.logits)
