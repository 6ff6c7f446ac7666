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
    assert "SHAPES differ" in out and "classifier.weight: (2, 8)" in out and "mergeable: NO" in out
    assert main(["inspect", str(zoo["sst"]), str(zoo["gpt2_ft0"])]) == 1
    assert "model_type" in capsys.readouterr().out
    assert main(["inspect", "/nonexistent/model"]) == 1
    assert "model not found" in capsys.readouterr().err


def test_fisher_subcommand_is_lazy(capsys):
    # `pymerge merge` must not import the Fisher engine; `pymerge fisher` reports clearly when it is absent
    code = ("import sys; from pymerge.cli import main\n"
            "try:\n    main(['merge', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('pymerge.fisher.command' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.stdout.strip().endswith("False"), r.stderr
    try:
        import pymerge.fisher.command  # noqa: F401
    except ImportError:
        assert main(["fisher", "model", "--data", "x.jsonl", "-o", "f.safetensors"]) == 2
        assert "Fisher engine (pymerge.fisher.command) is not available" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as exc:
            main(["fisher", "--help"])
        assert exc.value.code == 0 and "--data" in capsys.readouterr().out


def test_demo_still_runs(capsys):
    assert main(["demo"]) == 0
    assert "pymerge demo" in capsys.readouterr().out
