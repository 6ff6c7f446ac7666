"""`pymerge search CONFIG -o OUT` on tiny BERT checkpoints on disk: end to end, resume, refusals."""
import json

import pytest
import torch

from pymerge import cli
from tests import engine_models as em


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return em.build_zoo(tmp_path_factory.mktemp("zoo"))


def _data(path, n, labels, seed):
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            y = rng.randrange(labels)
            words = " ".join(f"w{rng.randrange(27)}" for _ in range(rng.randint(2, 6)))
            f.write(json.dumps({"text": f"w{y} {words}", "label": y}) + "\n")
    return path


def _config(tmp_path, zoo, extra=""):
    for name, labels in (("sst", 2), ("topic", 3)):
        _data(tmp_path / f"{name}-val.jsonl", 8, labels, 1)
        _data(tmp_path / f"{name}-test.jsonl", 5, labels, 2)
    cfg = tmp_path / "search.yml"
    cfg.write_text(f"""
base_model: {zoo['bert_base']}
models:
  - model: {zoo['sst']}
    name: sst
    parameters: {{validation: sst-val.jsonl, test: sst-test.jsonl}}
  - model: {zoo['topic']}
    name: topic
    parameters: {{validation: topic-val.jsonl, metric: macro_f1}}
parameters: {{optimizer: gp-ucb, n_init: 2, n_iter: 1, fisher_examples: 3, seed: 1{extra}}}
""")
    return cfg


def test_search_command_end_to_end_and_resume(zoo, tmp_path, capsys):
    from pymerge.io.heads import load_with_head

    cfg = _config(tmp_path, zoo)
    out = tmp_path / "out"
    assert cli.main(["search", str(cfg), "-o", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "pymerge_search.json").read_text())
    assert "best λ" in printed and report["tasks"] == ["sst", "topic"] and len(report["trials"]) == 3
    assert report["test"]["topic"] is None and 0.0 <= report["test"]["sst"] <= 1.0
    load_with_head(out, "topic")  # HF-loadable with each head
    log = tmp_path / "out.trials.jsonl"
    lines = log.read_text().splitlines()
    assert json.loads(lines[0])["header"]["tasks"] == ["sst", "topic"] and len(lines) == 4
    # a second run refuses to clobber; --resume with everything logged evaluates nothing new and agrees
    assert cli.main(["search", str(cfg), "-o", str(out), "--no-progress"]) != 0
    assert "exists" in capsys.readouterr().err
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])  # one trial lost, one cut mid-write
    assert cli.main(["search", str(cfg), "-o", str(out), "--no-progress", "--resume", "--force"]) == 0
    again = json.loads((out / "pymerge_search.json").read_text())
    assert again["best"] == report["best"] and again["validation"] == report["validation"]


def test_search_command_config_errors_are_one_line(zoo, tmp_path, capsys):
    cfg = _config(tmp_path, zoo, extra=", n_iters: 3")
    assert cli.main(["search", str(cfg), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'n_iters' (did you mean 'n_iter'?)" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_search_command_backend_ray_without_ray_is_a_one_line_error(zoo, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    cfg = _config(tmp_path, zoo, extra=", workers: 2")
    assert cli.main(["search", str(cfg), "-o", str(tmp_path / "o"), "--backend", "ray"]) == 1
    err = capsys.readouterr().err
    assert "backend ray needs `pip install pymerge[ray]`" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.trials.jsonl").exists()
