"""`pymerge search CONFIG -o OUT` on tiny BERT checkpoints on disk: end to end, resume, refusals."""
import json

import pytest

from pymerge import cli
from tests import engine_models as em
from tests.search_configs import write_search_config


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return em.build_zoo(tmp_path_factory.mktemp("zoo"))


def _config(tmp_path, zoo, extra=""):
    return write_search_config(
        tmp_path, zoo, topic_parameters="validation: topic-val.jsonl, metric: macro_f1",
        parameters=f"optimizer: gp-ucb, n_init: 2, n_iter: 1, fisher_examples: 3, seed: 1{extra}")


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
