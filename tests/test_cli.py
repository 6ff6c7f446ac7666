"""The command line: merge (YAML, --force, errors), inspect (report, exit status), fisher (lazy), demo."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine_models as em
from pymerge.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return em.build_zoo(tmp_path_factory.mktemp("zoo"))


def _yaml(tmp_path, zoo, method="fisher", extra=""):
    text = (f"merge_method: {method}\n"
            f"base_model: {zoo['bert_base']}\n"
            "models:\n"
            f"  - model: {zoo['sst']}\n    parameters: {{weight: 0.6, fisher: {zoo['sst_fisher']}}}\n"
            f"  - model: {zoo['topic']}\n    parameters: {{weight: 0.4, fisher: {zoo['topic_fisher']}}}\n"
            + extra)
    path = tmp_path / "merge.yml"
    path.write_text(text)
    return path


def test_merge_command(zoo, tmp_path, capsys):
    cfg = _yaml(tmp_path, zoo)
    out = tmp_path / "out"
    assert main(["merge", str(cfg), "-o", str(out), "--no-progress"]) == 0
    assert "merged 39 tensors with fisher" in capsys.readouterr().out
    merged = em.load_dir(out)
    a, b = em.load_dir(zoo["sst"]), em.load_dir(zoo["topic"])
    from pymerge.fisher import store

    fa, fb = store.load(zoo["sst_fisher"]), store.load(zoo["topic_fisher"])
    k = "bert.encoder.layer.0.attention.self.query.weight"
    want = (0.6 * fa[k] * a[k] + 0.4 * fb[k] * b[k]) / (0.6 * fa[k] + 0.4 * fb[k])
    torch.testing.assert_close(merged[k], want)
    assert sorted(p.name for p in (out / "heads").iterdir()) == [
        "sst.config.json", "sst.safetensors", "topic.config.json", "topic.safetensors"]
    # existing output: refused without --force, replaced with it
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["merge", str(cfg), "-o", str(out), "--no-progress"]) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert main(["merge", str(cfg), "-o", str(out), "--no-progress", "--force"]) == 0


def test_merge_command_errors_are_one_line(zoo, tmp_path, capsys):
    cfg = _yaml(tmp_path, zoo, method="fishr")
    assert main(["merge", str(cfg), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "unknown merge_method 'fishr'; did you mean 'fisher'" in err and "Traceback" not in err
    cfg = _yaml(tmp_path, zoo, extra="parameters: {fallbak: average}\n")
    assert main(["merge", str(cfg), "-o", str(tmp_path / "o")]) == 1
    assert "did you mean 'fallback'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_inspect_command(zoo, capsys):
    assert main(["inspect", str(zoo["sst"]), str(zoo["topic"]), "--base", str(zoo["bert_base"])]) == 0
    out = capsys.readouterr().out
    assert "shared tensors: 39" in out and "classifier.weight" in out and "mergeable: yes" in out
    assert main(["inspect", str(zoo["sst"]), str(zoo["topic"]), "--head-pattern", "nothing.*"]) == 1
    out = capsys.readouterr().out
    assert "SHAPES differ" in out and "'classifier.weight' has shapes (2, 8)" in out and "mergeable: NO" in out
    assert main(["inspect", str(zoo["sst"]), str(zoo["gpt2_ft0"])]) == 1
    assert "model_type" in capsys.readouterr().out
    assert main(["inspect", "/nonexistent/model"]) == 1
    assert "model not found" in capsys.readouterr().err


def test_help_and_usage_errors_do_not_import_torch():
    # `pymerge --help`, `pymerge merge --help` and argument errors stay fast: no torch, no Fisher engine
    code = ("import sys; from pymerge.cli import main\n"
            "for argv in (['--help'], ['merge', '--help'], ['merge'], ['nosuchcommand'], ['--version']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'pymerge.fisher.command' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.stdout.strip().splitlines()[-1] == "False False", r.stdout + r.stderr
    assert "pymerge 0." in r.stdout  # --version


def test_fisher_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fisher", "--help"])
    assert exc.value.code == 0 and "--data" in capsys.readouterr().out


def test_merge_output_positional_or_option(zoo, tmp_path, capsys):
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: average\nmodels: [{zoo['sst']}, {zoo['rte']}]\n")
    assert main(["merge", str(cfg), str(tmp_path / "a"), "--no-progress"]) == 0
    assert main(["merge", str(cfg), "-o", str(tmp_path / "b"), "--no-progress"]) == 0
    a, b = em.load_dir(tmp_path / "a"), em.load_dir(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["merge", str(cfg), "--no-progress"]) == 2
    assert "no output directory" in capsys.readouterr().err
    assert main(["merge", str(cfg), str(tmp_path / "c"), "-o", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "two different outputs" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_merge_command_allow_pickle(zoo, tmp_path, capsys):
    import shutil

    pick = tmp_path / "pickled"
    pick.mkdir()
    shutil.copy(zoo["rte"] / "config.json", pick / "config.json")
    torch.save(em.load_dir(zoo["rte"]), pick / "pytorch_model.bin")
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: average\nmodels: [{zoo['sst']}, {pick}]\n")
    assert main(["merge", str(cfg), "-o", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "pickle" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["merge", str(cfg), "-o", str(tmp_path / "o"), "--no-progress", "--allow-pickle"]) == 0
    a, b, got = em.load_dir(zoo["sst"]), em.load_dir(zoo["rte"]), em.load_dir(tmp_path / "o")
    k = "bert.embeddings.word_embeddings.weight"
    torch.testing.assert_close(got[k], (a[k] + b[k]) / 2)
